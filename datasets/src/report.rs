//! Malformed rows: skipped, counted, reported with file and line; too many is an error.

use std::path::{Path, PathBuf};

use crate::error::{DataError, Result};

/// How many malformed rows a file may have before reading it is an error.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BadRowPolicy {
    /// Largest allowed fraction of bad rows.
    pub max_fraction: f64,
}

impl Default for BadRowPolicy {
    fn default() -> Self {
        BadRowPolicy { max_fraction: 0.01 }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRow {
    /// 1-based line (JSONL) or row number (Parquet).
    pub line: u64,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BadRowReport {
    pub file: PathBuf,
    pub total_rows: u64,
    pub bad_rows: u64,
    /// The first few, for the log.
    pub examples: Vec<BadRow>,
}

const KEPT_EXAMPLES: usize = 20;

impl BadRowReport {
    pub fn new(file: &Path) -> Self {
        BadRowReport {
            file: file.to_path_buf(),
            total_rows: 0,
            bad_rows: 0,
            examples: Vec::new(),
        }
    }

    pub fn bad(&mut self, line: u64, reason: String) {
        self.bad_rows += 1;
        if self.examples.len() < KEPT_EXAMPLES {
            self.examples.push(BadRow { line, reason });
        }
    }

    /// Errors when the bad rows exceed the policy, or nothing is usable.
    pub fn check(&self, policy: BadRowPolicy) -> Result<()> {
        if self.total_rows > 0
            && self.bad_rows as f64 > policy.max_fraction * self.total_rows as f64
        {
            let first = self
                .examples
                .first()
                .map(|b| format!("line {}: {}", b.line, b.reason))
                .unwrap_or_default();
            return Err(DataError::TooManyBadRows {
                path: self.file.clone(),
                bad: self.bad_rows,
                total: self.total_rows,
                max_fraction: policy.max_fraction,
                first,
            });
        }
        if self.total_rows == self.bad_rows {
            return Err(DataError::Empty {
                path: self.file.clone(),
            });
        }
        Ok(())
    }
}

impl std::fmt::Display for BadRowReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {} of {} rows skipped",
            self.file.display(),
            self.bad_rows,
            self.total_rows
        )?;
        for b in &self.examples {
            write!(f, "\n  {}:{}: {}", self.file.display(), b.line, b.reason)?;
        }
        Ok(())
    }
}
