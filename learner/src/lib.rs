//! The learner: the GRPO-family losses, the optimizer and learning-rate schedules, the train
//! step, the collector that turns rollout groups into steps, and checkpoints.

pub mod advantages;
pub mod alpharl;
pub mod checkpoint;
pub mod collect;
pub mod correction;
pub mod coupled;
pub mod covariance;
pub mod device_sums;
pub mod dpo;
pub mod error;
pub mod fit;
pub mod grpo;
pub mod kto;
pub mod optim;
pub mod ppo;
pub mod scaler;
pub mod schedule;
pub mod sft;
pub mod step;
pub mod subnetwork;
pub mod synthetic;
