//! Learning-rate schedules with linear warm-up, as transformers' `get_*_schedule_with_warmup`.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Constant,
    Linear,
    Cosine,
}

/// The learning rate at optimizer step `step` (0-based) of `total`, after `warmup` steps.
pub fn learning_rate(base: f64, schedule: Schedule, step: u64, warmup: u64, total: u64) -> f64 {
    if step < warmup {
        return base * step as f64 / warmup.max(1) as f64;
    }
    let progress = (step - warmup) as f64 / total.saturating_sub(warmup).max(1) as f64;
    let progress = progress.min(1.0);
    match schedule {
        Schedule::Constant => base,
        Schedule::Linear => base * (1.0 - progress),
        Schedule::Cosine => base * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_decay() {
        // transformers: lr_lambda(step) = step / warmup during warm-up
        assert_eq!(learning_rate(1.0, Schedule::Cosine, 0, 10, 110), 0.0);
        assert_eq!(learning_rate(1.0, Schedule::Cosine, 5, 10, 110), 0.5);
        assert_eq!(learning_rate(1.0, Schedule::Cosine, 10, 10, 110), 1.0);
        assert!((learning_rate(1.0, Schedule::Cosine, 60, 10, 110) - 0.5).abs() < 1e-12);
        assert!(learning_rate(1.0, Schedule::Cosine, 110, 10, 110).abs() < 1e-12);
        assert_eq!(learning_rate(2.0, Schedule::Linear, 60, 10, 110), 1.0);
        assert_eq!(learning_rate(2.0, Schedule::Constant, 60, 10, 110), 2.0);
    }
}
