//! Work budgets: every parser and evaluator of this crate spends fuel, and fails cleanly when
//! the fuel or the wall-clock deadline runs out. Nothing here can hang or recurse without bound.

use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exceeded;

impl std::fmt::Display for Exceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("work budget exceeded")
    }
}

#[derive(Debug, Clone)]
pub struct Budget {
    steps_left: u64,
    deadline: Instant,
}

impl Budget {
    pub fn new(steps: u64, time: Duration) -> Self {
        Budget {
            steps_left: steps,
            deadline: Instant::now() + time,
        }
    }

    /// Spends `n` steps; checks the clock every so often.
    pub fn spend(&mut self, n: u64) -> Result<(), Exceeded> {
        let before = self.steps_left;
        self.steps_left = self.steps_left.checked_sub(n).ok_or(Exceeded)?;
        if before / 4096 != self.steps_left / 4096 && Instant::now() > self.deadline {
            return Err(Exceeded);
        }
        Ok(())
    }
}

impl Default for Budget {
    /// One reward call: a million steps or 200 ms, whichever comes first.
    fn default() -> Self {
        Budget::new(1_000_000, Duration::from_millis(200))
    }
}
