//! Per-token log-probs and entropies of given completions, in f32 through log-sum-exp.

use candle_core::{DType, Tensor};

use crate::error::Result;
use crate::forward::{forward, Batch};
use crate::weights::Weights;

pub use crate::ops::composed::log_softmax;

/// `log p(target)` and the entropy of `p` at each position, in f32.
/// `logits [B, T, V]`, `targets [B, T]` u32 → `([B, T], [B, T])`.
pub fn token_logprobs_and_entropy(logits: &Tensor, targets: &Tensor) -> Result<(Tensor, Tensor)> {
    let (b, t, v) = logits.dims3()?;
    let flat = logits.to_dtype(DType::F32)?.reshape((b * t, v))?; // [B·T, V]
    let picked = crate::ops::logprob_gather(&flat, &targets.flatten_all()?)?.reshape((b, t))?;
    let entropy = crate::ops::entropy(&flat)?.reshape((b, t))?;
    Ok((picked, entropy))
}

/// Log-probs of a batch of token sequences under the model.
#[derive(Debug, Clone)]
pub struct SequenceLogprobs {
    /// `[B, T−1]`: log-prob of token t+1 given tokens ..=t.
    pub logprobs: Tensor,
    /// `[B, T−1]`: entropy of the next-token distribution.
    pub entropy: Tensor,
    /// `[B, T−1]` f32: 1 where token t+1 is one whose log-prob counts (a completion token).
    pub mask: Tensor,
}

/// Log-probs and entropies of `input_ids` under `w` (training forward: differentiable when `w`
/// holds `Var`s). `loss_mask[b][t]` is 1 on the tokens to score (completion tokens); logits are
/// divided by `temperature` first, so that log-probs match those sampled at that temperature.
pub fn sequence_logprobs(
    w: &Weights,
    input_ids: &[Vec<u32>],
    attention_mask: &[Vec<u8>],
    loss_mask: &[Vec<u8>],
    temperature: f64,
) -> Result<SequenceLogprobs> {
    let device = w.embed_tokens.device();
    if input_ids.first().map_or(0, Vec::len) < 2 || loss_mask.len() != input_ids.len() {
        return Err(crate::error::ModelError::Generation(
            "log-probs need rows of at least 2 tokens and a loss mask per row".into(),
        ));
    }
    let batch = Batch::new(input_ids, attention_mask, device)?;
    let logits = forward(w, &batch, None)?; // [B, T, V]
    let (b, t, _) = logits.dims3()?;
    let logits = logits.narrow(1, 0, t - 1)?;
    let logits = if temperature != 1.0 {
        (logits.to_dtype(DType::F32)? / temperature)?
    } else {
        logits
    };
    let targets = batch.input_ids.narrow(1, 1, t - 1)?; // [B, T−1]
    let (logprobs, entropy) = token_logprobs_and_entropy(&logits, &targets)?;
    let mask: Vec<f32> = loss_mask
        .iter()
        .flat_map(|row| row[1..].iter().map(|&m| f32::from(m)))
        .collect();
    let mask = Tensor::from_vec(mask, (b, t - 1), device)?;
    Ok(SequenceLogprobs {
        logprobs: (logprobs * &mask)?,
        entropy: (entropy * &mask)?,
        mask,
    })
}
