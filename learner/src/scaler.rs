//! Dynamic loss scaling for f16 compute (Micikevicius et al. 2018, "Mixed Precision Training";
//! PyTorch's `GradScaler` and Megatron's `DynamicGradScaler` follow it). f16 keeps 10 mantissa
//! bits where bf16 keeps 7 (the training–inference gap is several times smaller), but its
//! smallest normal number is 6.1e-5: a policy gradient, a token mean over thousands of tokens,
//! would flush to zero on its way back through the layers. So the loss is multiplied by `scale`
//! before its backward and the gradient divided by it (in f32) before the update.
//!
//! A scaled gradient that overflows f16 is not finite. The scale then halves and the step runs
//! again on the same batch (an RL step's batch cost its rollouts, so ferrite does not skip it as
//! `GradScaler` does), down to a scale of 1, where an overflow is the gradient's own and the step
//! is skipped as any non-finite one. After [`LossScale::growth_interval`] finite steps in a row
//! the scale doubles. The state goes into the optimizer's checkpoint.

use serde::{Deserialize, Serialize};

/// The scale at the start: PyTorch's default (2¹⁶).
pub const INITIAL: f64 = 65_536.0;
/// Finite steps in a row before the scale doubles: PyTorch's default.
pub const GROWTH_INTERVAL: u64 = 2000;
/// The smallest scale: Megatron's `min_loss_scale` default.
pub const MIN: f64 = 1.0;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossScale {
    /// What the loss is multiplied by before its backward.
    pub scale: f64,
    /// Finite steps since the scale last changed.
    pub good_steps: u64,
    pub growth_interval: u64,
    /// Overflows so far (each one a backward run again at half the scale).
    pub overflows: u64,
}

impl LossScale {
    pub fn new(initial: f64, growth_interval: u64) -> Self {
        LossScale {
            scale: initial.max(MIN),
            good_steps: 0,
            growth_interval: growth_interval.max(1),
            overflows: 0,
        }
    }

    /// After a scaled gradient that was not finite: halves the scale and returns true (the step
    /// runs again), or returns false where the scale is already at [`MIN`] (the step is skipped).
    pub fn back_off(&mut self) -> bool {
        self.good_steps = 0;
        if self.scale <= MIN {
            return false;
        }
        self.scale = (self.scale / 2.0).max(MIN);
        self.overflows += 1;
        true
    }

    /// After a step whose gradient was finite: doubles the scale after `growth_interval` of them
    /// in a row.
    pub fn stepped(&mut self) {
        self.good_steps += 1;
        if self.good_steps >= self.growth_interval {
            self.scale *= 2.0;
            self.good_steps = 0;
        }
    }
}

impl Default for LossScale {
    fn default() -> Self {
        LossScale::new(INITIAL, GROWTH_INTERVAL)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn halves_on_overflow_down_to_one_and_doubles_after_the_interval() {
        let mut s = LossScale::new(8.0, 3);
        assert!(s.back_off());
        assert_eq!(s.scale, 4.0);
        s.stepped();
        s.stepped();
        assert_eq!(s.scale, 4.0);
        // an overflow restarts the count
        assert!(s.back_off());
        assert_eq!((s.scale, s.good_steps), (2.0, 0));
        for _ in 0..3 {
            s.stepped();
        }
        assert_eq!((s.scale, s.good_steps), (4.0, 0));
        assert!(s.back_off() && s.back_off());
        assert_eq!(s.scale, 1.0);
        assert!(
            !s.back_off(),
            "at the floor an overflow is the gradient's own"
        );
        assert_eq!((s.scale, s.overflows), (1.0, 4));
    }
}
