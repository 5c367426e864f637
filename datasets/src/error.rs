use std::path::PathBuf;

pub type Result<T> = std::result::Result<T, DataError>;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a {expected} file ({why})")]
    WrongFormat {
        path: PathBuf,
        expected: &'static str,
        why: String,
    },
    #[error("{path}: {bad} of {total} rows are malformed (more than the allowed {max_fraction}); first: {first}")]
    TooManyBadRows {
        path: PathBuf,
        bad: u64,
        total: u64,
        max_fraction: f64,
        first: String,
    },
    #[error("{path}: no usable rows")]
    Empty { path: PathBuf },
    #[error("{path}: parquet: {message}")]
    Parquet { path: PathBuf, message: String },
    #[error("unknown data source {0:?} (a .jsonl / .parquet path or builtin:arithmetic|countdown|knights_knaves)")]
    UnknownSource(String),
    #[error("invalid data option: {0}")]
    Invalid(String),
}

impl DataError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.into(),
            source,
        }
    }
}
