//! Rollouts: the task (prompt rendering and scoring), the worker pool that generates and scores
//! groups of completions, the Arrow sample schema that carries them to the learner (the producer
//! owns the contract), policy versions, and the staleness bound.

pub mod policy;
pub mod pool;
pub mod schema;
pub mod task;
