//! Prompt and preference sources for ferrite.
//!
//! - Files as users publish them: JSONL and Parquet with a prompt (string or chat messages), an
//!   answer and metadata, field names configurable ([`fields`]); bad rows are skipped, counted
//!   and reported with file and line ([`report`]); files are streamed, never loaded whole.
//! - Built-in seeded generators, unlimited and deterministic ([`generators`]): arithmetic,
//!   Countdown, knights and knaves.
//! - Order ([`order`]): splits, seeded block shuffling, epochs, and a cursor that a checkpoint
//!   stores so that a resumed run sees exactly the records the uninterrupted run would have.

pub mod arrow_json;
pub mod error;
pub mod fields;
pub mod generators;
pub mod jsonl;
pub mod order;
pub mod parquet_io;
pub mod record;
pub mod report;
pub mod rng;

pub use error::{DataError, Result};
pub use order::{Cursor, Loader, Source};
pub use record::{Message, Prompt, Record};
