//! Errors of the model crate: each names the file, field or tensor at fault.

use std::path::PathBuf;

pub type Result<T> = std::result::Result<T, ModelError>;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{file}: missing or invalid field `{field}` ({expected})")]
    Field {
        file: String,
        field: String,
        expected: &'static str,
    },
    #[error("unsupported architecture `{0}` (supported: Qwen2ForCausalLM, LlamaForCausalLM)")]
    UnsupportedArchitecture(String),
    #[error("unsupported model option: {0}")]
    Unsupported(String),
    #[error("tensor `{name}`: {problem}")]
    Tensor { name: String, problem: String },
    #[error("not a model directory or file: {0}")]
    UnknownModelFiles(PathBuf),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("generation: {0}")]
    Generation(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl ModelError {
    /// Whether this is the device running out of memory (see [`out_of_memory`]).
    pub fn is_out_of_memory(&self) -> bool {
        matches!(self, ModelError::Candle(e) if out_of_memory(e))
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ModelError::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn field(file: &str, field: &str, expected: &'static str) -> Self {
        ModelError::Field {
            file: file.to_string(),
            field: field.to_string(),
            expected,
        }
    }

    pub(crate) fn tensor(name: &str, problem: impl Into<String>) -> Self {
        ModelError::Tensor {
            name: name.to_string(),
            problem: problem.into(),
        }
    }
}

/// Reads and parses a JSON file.
pub(crate) fn read_json(path: &std::path::Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    serde_json::from_str(&text).map_err(|source| ModelError::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// Whether `e` is the device running out of memory: CUDA's allocator (a tensor, a kernel's
/// buffer) or cuBLAS's (its workspace), through any context candle wrapped it in. Memory is
/// freed as the failed work's tensors drop, so work that fits can run again on the same device.
/// Never on the CPU, whose allocations abort the process instead.
pub fn out_of_memory(e: &candle_core::Error) -> bool {
    use candle_core::Error as E;
    match e {
        E::Context { inner, .. } | E::WithPath { inner, .. } | E::WithBacktrace { inner, .. } => {
            out_of_memory(inner)
        }
        #[cfg(feature = "cuda")]
        E::Cuda(e) => crate::cuda::out_of_memory(e.as_ref()),
        _ => false,
    }
}
