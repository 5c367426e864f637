//! PPO's critic (spec §5.5): a linear value head on the policy trunk or on a separate critic
//! model, and the clipped value loss.

use candle_core::{DType, Device, Tensor, Var};

use crate::device_sums::DeviceSums;
use crate::error::Result;

/// `V(s_t) = h_t · w + b`, read from the final hidden states.
pub struct ValueHead {
    /// `[H]`
    pub weight: Var,
    /// `[1]`
    pub bias: Var,
}

impl ValueHead {
    /// A zero head: every value starts at 0, the value of an unrewarded state.
    pub fn zeros(hidden: usize, device: &Device) -> Result<Self> {
        Ok(ValueHead {
            weight: Var::zeros(hidden, DType::F32, device)?,
            bias: Var::zeros(1, DType::F32, device)?,
        })
    }

    pub fn from_values(weight: Vec<f32>, bias: f32, device: &Device) -> Result<Self> {
        let n = weight.len();
        Ok(ValueHead {
            weight: Var::from_tensor(&Tensor::from_vec(weight, n, device)?)?,
            bias: Var::from_tensor(&Tensor::new(&[bias], device)?)?,
        })
    }

    /// The optimizer's names for the head's parameters.
    pub fn vars(&self) -> Vec<(String, Var)> {
        vec![
            ("value_head.weight".into(), self.weight.clone()),
            ("value_head.bias".into(), self.bias.clone()),
        ]
    }

    /// `hidden [B, T, H]` → values `[B, T]`.
    pub fn values(&self, hidden: &Tensor) -> Result<Tensor> {
        let (b, t, h) = hidden.dims3()?;
        let w = self.weight.as_tensor().reshape((h, 1))?;
        let v = hidden
            .to_dtype(DType::F32)?
            .reshape((b * t, h))?
            .matmul(&w)?
            .broadcast_add(self.bias.as_tensor())?; // [B·T, 1]
        Ok(v.reshape((b, t))?)
    }
}

/// Statistics of the value loss over a micro-batch.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ValueStats {
    /// Fraction of valid tokens where the clipped error was the larger.
    pub clip_frac: f64,
    pub value_mean: f64,
    /// The valid tokens the statistics cover.
    pub tokens: f64,
}

impl ValueStats {
    /// The statistics of `self`'s tokens and `other`'s together (token-weighted means).
    pub fn merge(self, other: &ValueStats) -> ValueStats {
        let tokens = self.tokens + other.tokens;
        let mean = |a: f64, b: f64| (a * self.tokens + b * other.tokens) / tokens.max(1.0);
        ValueStats {
            clip_frac: mean(self.clip_frac, other.clip_frac),
            value_mean: mean(self.value_mean, other.value_mean),
            tokens,
        }
    }
}

/// A micro-batch's value loss and [`ValueStats`] as device sums, read back by
/// [`PendingValueStats::read`] after the backward is queued (see [`DeviceSums`]).
pub struct PendingValueStats {
    /// the loss, valid tokens, tokens where the clipped error was the larger, Σ value
    sums: DeviceSums,
}

impl PendingValueStats {
    /// The loss's value and the statistics.
    pub fn read(&self) -> Result<(f64, ValueStats)> {
        let s = self.sums.read()?;
        let n = s[1];
        let stats = ValueStats {
            clip_frac: s[2] / n.max(1.0),
            value_mean: s[3] / n.max(1.0),
            tokens: n,
        };
        Ok((s[0], stats))
    }
}

/// The clipped value loss `½·Σ M·max((V − R)², (clip(V, V_old ± c) − R)²) / tokens` (token mean
/// over the `tokens` valid tokens of the whole step, so micro-batches sum to the step's loss),
/// and its statistics, still on the device.
/// `values`, `old_values`, `returns`, `mask`: `[B, T]`; `clip` None: unclipped.
pub fn value_loss(
    values: &Tensor,
    old_values: &Tensor,
    returns: &Tensor,
    mask: &Tensor,
    clip: Option<f64>,
    tokens: f64,
) -> Result<(Tensor, PendingValueStats)> {
    let err = (values - returns)?.sqr()?;
    let worst = match clip {
        Some(c) => {
            let low = (old_values - c)?;
            let high = (old_values + c)?;
            let clipped = values.maximum(&low)?.minimum(&high)?;
            let err_clipped = (clipped - returns)?.sqr()?;
            err.maximum(&err_clipped)?
        }
        None => err.clone(),
    };
    let loss = ((worst.clone() * mask)?.sum_all()? * (0.5 / tokens.max(1.0)))?;
    let clipped = worst.gt(&err)?.to_dtype(DType::F32)?;
    let sums = DeviceSums::stack(&[
        loss.detach(),
        mask.sum_all()?,
        (clipped * mask)?.sum_all()?,
        (values.detach() * mask)?.sum_all()?,
    ])?;
    Ok((loss, PendingValueStats { sums }))
}
