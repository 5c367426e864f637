//! The learner: optimizer and learning-rate schedules (the losses and the train step build on
//! these).

pub mod error;
pub mod grpo;
pub mod optim;
pub mod schedule;
pub mod sft;
pub mod step;
