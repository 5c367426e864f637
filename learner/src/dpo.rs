//! The DPO family (spec §5.6, TRL's `DPOTrainer`): sigmoid (with cDPO label smoothing), IPO on
//! length-averaged log-ratios, robust DPO and hinge (SLiC), and their implicit-reward metrics.

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{LearnerError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DpoLoss {
    /// `−(1−ε)·log σ(βΔ) − ε·log σ(−βΔ)` (ε = 0: DPO; ε > 0: cDPO).
    Sigmoid,
    /// `(Δ̄ − 1/(2β))²` on length-averaged log-ratios.
    Ipo,
    /// `[−(1−ε)·log σ(βΔ) + ε·log σ(−βΔ)] / (1 − 2ε)`.
    Robust,
    /// `max(0, 1 − βΔ)`.
    Hinge,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DpoConfig {
    pub loss: DpoLoss,
    pub beta: f64,
    pub label_smoothing: f64,
}

impl Default for DpoConfig {
    fn default() -> Self {
        DpoConfig {
            loss: DpoLoss::Sigmoid,
            beta: 0.1,
            label_smoothing: 0.0,
        }
    }
}

/// Summed completion log-probs of a micro-batch of pairs, each `[B]`.
pub struct PairLogprobs<'a> {
    pub chosen: &'a Tensor,
    pub rejected: &'a Tensor,
    pub ref_chosen: &'a Tensor,
    pub ref_rejected: &'a Tensor,
    /// Completion token counts (IPO's length average).
    pub chosen_tokens: &'a Tensor,
    pub rejected_tokens: &'a Tensor,
}

#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct DpoStats {
    /// Sums over the micro-batch's pairs (divide by the pair count).
    pub reward_accuracy: f64,
    pub margin: f64,
    pub chosen_reward: f64,
    pub rejected_reward: f64,
    pub pairs: f64,
}

/// `log σ(x) = min(x, 0) − log(1 + e^{−|x|})`, stable for large |x|.
fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    let soft = ((x.abs()?.neg()?.exp()? + 1.0)?).log()?;
    Ok((x.minimum(0f32)? - soft)?)
}

/// The loss of a micro-batch: the sum over its pairs divided by `total_pairs` (the pairs of the
/// whole optimizer step), so micro-batch losses add up to the step's mean.
pub fn dpo_loss(x: &PairLogprobs, c: &DpoConfig, total_pairs: usize) -> Result<(Tensor, DpoStats)> {
    let eps = c.label_smoothing;
    if c.loss == DpoLoss::Robust && !(0.0..0.5).contains(&eps) {
        return Err(LearnerError::Invalid(
            "robust DPO needs 0 ≤ label_smoothing < 0.5".into(),
        ));
    }
    let h_w = (x.chosen - x.ref_chosen)?; // [B]
    let h_l = (x.rejected - x.ref_rejected)?;
    let delta = (&h_w - &h_l)?;
    let z = (&delta * c.beta)?;
    let per_pair = match c.loss {
        DpoLoss::Sigmoid => {
            let pos = (log_sigmoid(&z)? * -(1.0 - eps))?;
            if eps != 0.0 {
                (pos - (log_sigmoid(&z.neg()?)? * eps)?)?
            } else {
                pos
            }
        }
        DpoLoss::Robust => {
            let pos = (log_sigmoid(&z)? * -(1.0 - eps))?;
            ((pos + (log_sigmoid(&z.neg()?)? * eps)?)? / (1.0 - 2.0 * eps))?
        }
        DpoLoss::Hinge => (z.neg()? + 1.0)?.relu()?,
        DpoLoss::Ipo => {
            let avg = ((h_w.div(x.chosen_tokens)? - h_l.div(x.rejected_tokens)?)?
                - 1.0 / (2.0 * c.beta))?;
            avg.sqr()?
        }
    };
    let loss = (per_pair.sum_all()? / total_pairs.max(1) as f64)?;
    let sum =
        |t: Tensor| -> Result<f64> { Ok(t.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?) };
    let r_w = (h_w.detach() * c.beta)?;
    let r_l = (h_l.detach() * c.beta)?;
    let stats = DpoStats {
        reward_accuracy: sum(r_w.gt(&r_l)?.to_dtype(DType::F32)?)?,
        margin: sum((&r_w - &r_l)?)?,
        chosen_reward: sum(r_w)?,
        rejected_reward: sum(r_l)?,
        pairs: delta.dim(0)? as f64,
    };
    Ok((loss, stats))
}
