//! Built-in task generators: unlimited, deterministic (record `i` of a seed is always the same),
//! with a difficulty knob for curricula and the gold answer the verifiers of `rewards` check.

pub mod arithmetic;
pub mod countdown;
pub mod knights;

use crate::record::Record;

/// A generator of task records.
pub trait Generator: Send + Sync {
    /// Record `index` of the stream `(seed, split)`.
    fn generate(&self, seed: u64, split: u64, index: u64) -> Record;
    fn name(&self) -> &'static str;
}
