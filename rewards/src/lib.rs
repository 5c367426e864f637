//! Verifiable rewards: text in, score out. Every function here is total (no panics on any
//! input) and bounded (a work budget and a deadline), so a pathological completion scores as a
//! failure instead of hanging or crashing a rollout worker.
//!
//! - [`math`]: final-answer extraction and equivalence (GSM8K, MATH styles).
//! - [`countdown`]: TinyZero's Countdown verifier.
//! - [`knights`]: Logic-RL's knights-and-knaves verifier.
//! - [`format`]: tag structure, DAPO's overlong penalty, Kimi's length reward.
//! - [`command`]: an external program's reward, under a deadline.
//! - [`compose`]: weighted sums of named parts.

pub mod budget;
pub mod command;
pub mod compose;
pub mod countdown;
pub mod format;
pub mod knights;
pub mod math;

pub use compose::{Gold, Part, PartKind, RewardSpec, Sample, Scored};
