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
}
