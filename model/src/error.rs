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

/// A size (of pieces, of batches) that was reduced for want of device memory, and when it tries
/// a larger one again: a shortage may pass (on one GPU the rollout workers' batches come and go
/// beside the learner). After `every` runs that fitted at a reduced size, the next run tries
/// the next larger one ([`Regrow::grow`] before each run); if that runs out of memory, it goes
/// back to the size before, and the next try waits twice as long.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Regrow<S> {
    size: S,
    /// The size before the larger one being tried.
    before: Option<S>,
    /// Runs that fitted since the size last changed.
    fitted: usize,
    every: usize,
}

impl<S: Copy + PartialEq> Regrow<S> {
    pub fn new(size: S, every: usize) -> Self {
        Regrow {
            size,
            before: None,
            fitted: 0,
            every,
        }
    }

    /// The size the next run takes.
    pub fn size(&self) -> S {
        self.size
    }

    /// Sets the size (one that changes counts its runs afresh).
    pub fn set(&mut self, size: S) {
        if size != self.size {
            self.size = size;
            self.fitted = 0;
        }
    }

    /// Before a run: after `every` runs that fitted at this size, the size becomes
    /// `larger(size)`, if there is one (None: the size is as large as it goes).
    pub fn grow(&mut self, larger: impl FnOnce(S) -> Option<S>) {
        if self.fitted >= self.every {
            if let Some(l) = larger(self.size) {
                self.before = Some(self.size);
                self.set(l);
            }
        }
    }

    /// A run fitted at the current size.
    pub fn fitted(&mut self) {
        self.before = None;
        self.fitted += 1;
    }

    /// A run ran out of memory. True if it was trying a larger size: the size is back to the
    /// one before, and the next try waits twice as long. False otherwise: the caller reduces
    /// the size ([`Regrow::set`]).
    pub fn ran_out(&mut self) -> bool {
        match self.before.take() {
            Some(before) => {
                self.set(before);
                self.every *= 2;
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reduced_size_regrows_after_runs_that_fit_and_backs_off_when_that_runs_out() {
        // sizes 1, 2 and 4: a larger size doubles, up to 4; `runs` runs that fit, each after
        // `grow`, and the size the next run takes
        let larger = |s: u32| (s < 4).then_some(2 * s);
        let run = |r: &mut Regrow<u32>, runs: usize| {
            for _ in 0..runs {
                r.grow(larger);
                r.fitted();
            }
            r.grow(larger);
            r.size()
        };
        let mut r = Regrow::new(1u32, 3);
        assert_eq!(run(&mut r, 2), 1);
        assert_eq!(run(&mut r, 1), 2, "tried after 3 runs that fitted");
        assert!(r.ran_out(), "the try ran out");
        assert_eq!(r.size(), 1);
        assert_eq!(run(&mut r, 5), 1, "the next try waits 6 runs");
        assert_eq!(run(&mut r, 1), 2);
        r.fitted();
        assert!(!r.ran_out(), "a run after the try fitted: no longer a try");
        assert_eq!(r.size(), 2, "the caller reduces it");
        r.set(1);
        assert_eq!(run(&mut r, 6), 2);
        assert_eq!(run(&mut r, 6), 4);
        assert_eq!(run(&mut r, 30), 4, "as large as it goes");
    }
}
