//! Verifiable rewards: text in, score out. Every function here is total (no panics on any
//! input) and bounded (a work budget and a deadline), so a pathological completion scores as a
//! failure instead of hanging or crashing a rollout worker.

pub mod budget;
pub mod math;
