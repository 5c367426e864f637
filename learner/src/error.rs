pub type Result<T> = std::result::Result<T, LearnerError>;

#[derive(Debug, thiserror::Error)]
pub enum LearnerError {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Model(#[from] model::ModelError),
    #[error("{0}")]
    Invalid(String),
    #[error("optimizer state {path}: {message}")]
    State { path: String, message: String },
    #[error("out of device memory: {0}")]
    OutOfMemory(String),
}

impl LearnerError {
    /// Whether this is the device running out of memory, which a smaller piece of work may not.
    pub fn is_out_of_memory(&self) -> bool {
        match self {
            LearnerError::Candle(e) => model::error::out_of_memory(e),
            LearnerError::Model(e) => e.is_out_of_memory(),
            LearnerError::OutOfMemory(_) => true,
            _ => false,
        }
    }
}
