//! Per-token log-probs and entropies of given completions, in f32 through log-sum-exp.

use candle_core::{DType, Tensor, D};

use crate::error::Result;
use crate::forward::{forward, Batch};
use crate::weights::Weights;

/// Log-softmax over the last dimension in f32: `x − max − log Σ exp(x − max)`.
pub fn log_softmax(logits: &Tensor) -> Result<Tensor> {
    let x = logits.to_dtype(DType::F32)?;
    let m = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&m)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}

/// `log p(target)` and the entropy of `p` at each position.
/// `logits [B, T, V]`, `targets [B, T]` u32 → `([B, T], [B, T])` f32.
pub fn token_logprobs_and_entropy(logits: &Tensor, targets: &Tensor) -> Result<(Tensor, Tensor)> {
    let logp = log_softmax(logits)?; // [B, T, V]
    let picked = logp
        .gather(&targets.unsqueeze(D::Minus1)?.contiguous()?, D::Minus1)?
        .squeeze(D::Minus1)?;
    let entropy = (logp.exp()? * &logp)?.sum(D::Minus1)?.neg()?;
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
