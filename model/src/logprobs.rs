//! Per-token log-probs and entropies of given completions, in f32 through log-sum-exp.

use candle_core::{DType, Tensor};

use crate::error::Result;
use crate::forward::{hidden_states, hidden_states_shared, Batch, SharedPrompts};
use crate::weights::Weights;

/// Log-probs of a batch of token sequences under the model.
#[derive(Debug, Clone)]
pub struct SequenceLogprobs {
    /// `[B, T−1]`: log-prob of token t+1 given tokens ..=t.
    pub logprobs: Tensor,
    /// `[B, T−1]`: entropy of the next-token distribution.
    pub entropy: Tensor,
    /// `[B, T−1]` f32: 1 where token t+1 is one whose log-prob counts (a completion token).
    pub mask: Tensor,
    /// `[B, T−1, H]`: the final hidden state at position t (what a value head reads).
    pub hidden: Tensor,
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
    check_rows(input_ids, loss_mask)?;
    let batch = Batch::new(input_ids, attention_mask, w.embed_tokens.device())?;
    let hidden = hidden_states(w, &batch, None)?; // [B, T, H]
    score(w, hidden, input_ids, loss_mask, temperature)
}

/// [`sequence_logprobs`] of rows that continue shared prompts (`shared`, built from the same
/// `input_ids`): the log-probs, masks and hidden states cover the rows' own positions
/// (`[N, T−1]`: position t predicts the row's token t+1). To score a completion's first token,
/// a row starts with its prompt's last token.
pub fn shared_prompt_logprobs(
    w: &Weights,
    shared: &SharedPrompts,
    input_ids: &[Vec<u32>],
    loss_mask: &[Vec<u8>],
    temperature: f64,
) -> Result<SequenceLogprobs> {
    check_rows(input_ids, loss_mask)?;
    let hidden = hidden_states_shared(w, shared)?; // [N, T, H]
    score(w, hidden, input_ids, loss_mask, temperature)
}

fn check_rows(input_ids: &[Vec<u32>], loss_mask: &[Vec<u8>]) -> Result<()> {
    if input_ids.first().map_or(0, Vec::len) < 2 || loss_mask.len() != input_ids.len() {
        return Err(crate::error::ModelError::Generation(
            "log-probs need rows of at least 2 tokens and a loss mask per row".into(),
        ));
    }
    Ok(())
}

/// Log-probs and entropies of the tokens `loss_mask` marks, from the final hidden states
/// `[B, T, H]` of `input_ids`.
fn score(
    w: &Weights,
    hidden: Tensor,
    input_ids: &[Vec<u32>],
    loss_mask: &[Vec<u8>],
    temperature: f64,
) -> Result<SequenceLogprobs> {
    let device = w.embed_tokens.device();
    let (b, t, h) = hidden.dims3()?;
    // Only the scored positions go through the output layer: hidden row b·T+i predicts token
    // i+1, whose log-prob is output row b·(T−1)+i.
    let (mut rows, mut out_rows, mut targets) = (Vec::new(), Vec::new(), Vec::new());
    for (r, (ids, m)) in input_ids.iter().zip(loss_mask).enumerate() {
        for i in 0..t - 1 {
            if m.get(i + 1).copied().unwrap_or(0) != 0 {
                rows.push((r * t + i) as u32);
                out_rows.push((r * (t - 1) + i) as u32);
                targets.push(ids[i + 1]);
            }
        }
    }
    let mask: Vec<f32> = loss_mask
        .iter()
        .flat_map(|row| row[1..].iter().map(|&m| f32::from(u8::from(m != 0))))
        .collect();
    let mask = Tensor::from_vec(mask, (b, t - 1), device)?;
    let zeros = Tensor::zeros((b, t - 1), DType::F32, device)?;
    if rows.is_empty() {
        return Ok(SequenceLogprobs {
            logprobs: zeros.clone(),
            entropy: zeros,
            mask,
            hidden: hidden.narrow(1, 0, t - 1)?,
        });
    }
    let n = rows.len();
    let states = crate::ops::select_rows(&hidden.reshape((b * t, h))?, &rows)?; // [N, H]
    let targets = Tensor::from_vec(targets, n, device)?;
    // [N] each; the [N, V] logits exist a chunk of rows at a time
    let (lp, entropy) = crate::head::output_logprobs(
        &states,
        w.output_weight(),
        &targets,
        temperature,
        crate::head::chunk_rows(w.output_weight().dim(0)?),
    )?;
    let scatter = |x: Tensor| -> Result<Tensor> {
        let x = x.reshape((n, 1))?;
        Ok(crate::ops::scatter_rows(&x, &out_rows, b * (t - 1))?.reshape((b, t - 1))?)
    };
    Ok(SequenceLogprobs {
        logprobs: scatter(lp)?,
        entropy: scatter(entropy)?,
        mask,
        hidden: hidden.narrow(1, 0, t - 1)?,
    })
}
