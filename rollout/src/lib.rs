//! Rollouts: the Arrow sample schema that carries completions to the learner (the producer owns
//! the contract), policy versions, and the staleness bound.

pub mod policy;
pub mod schema;
