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
