//! Per-token log-probs and entropies of given completions, in f32 through log-sum-exp.

use candle_core::{DType, Tensor};

use crate::error::Result;
use crate::forward::{
    hidden_states, hidden_states_packed, hidden_states_shared, Batch, PackedRows, SharedPrompts,
};
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
    /// `[B, T−1, H]`: the final hidden state at position t (what a value head reads); None from
    /// [`packed_logprobs`] unless asked for.
    pub hidden: Option<Tensor>,
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
    padded_score(w, hidden, input_ids, loss_mask, temperature)
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
    padded_score(w, hidden, input_ids, loss_mask, temperature)
}

/// [`sequence_logprobs`] of rows packed end to end into one (`packed`): row `r` of `input_ids` /
/// `loss_mask` (right-padded rows, as [`shared_prompt_logprobs`] takes them: a row starts with its
/// prompt's last token when its prompt is a prefix of the packed row) sits at
/// `row_starts[r]..` of the packed row. The log-probs, entropies and masks are `[B, T−1]` as the
/// other forms give them; the hidden states `[B, T−1, H]` only `with_hidden` (gathered from the
/// packed row's, 0 past a row's end).
pub fn packed_logprobs(
    w: &Weights,
    packed: &PackedRows,
    input_ids: &[Vec<u32>],
    loss_mask: &[Vec<u8>],
    row_starts: &[usize],
    temperature: f64,
    with_hidden: bool,
) -> Result<SequenceLogprobs> {
    check_rows(input_ids, loss_mask)?;
    if row_starts.len() != input_ids.len() {
        return Err(crate::error::ModelError::Generation(
            "packed log-probs need a start in the packed row per row".into(),
        ));
    }
    let hidden = hidden_states_packed(w, packed)?; // [1, N, H]
    let (_, n, h) = hidden.dims3()?;
    let hidden = hidden.reshape((n, h))?;
    let t = input_ids[0].len();
    let at = |r: usize, i: usize| row_starts[r] + i;
    let (logprobs, entropy, mask) = score(w, &hidden, at, input_ids, loss_mask, temperature)?;
    let hidden = match with_hidden {
        true => {
            let lens: Vec<usize> = input_ids
                .iter()
                .zip(loss_mask)
                .map(|(ids, m)| row_len(ids, m))
                .collect();
            Some(unpack_rows(&hidden, row_starts, &lens, t - 1)?)
        }
        false => None,
    };
    Ok(SequenceLogprobs {
        logprobs,
        entropy,
        mask,
        hidden,
    })
}

/// Both sides of the training–inference gap for sampled tokens: `generate` on `w_gen` samples
/// `prompts`' completions as a rollout worker does (the KV cache, the decode kernels) and records
/// each token's behaviour log-prob; each of `learners` then scores the same tokens over the whole
/// rows ([`sequence_logprobs`], as the learner does). One entry per sampled token, row by row:
/// the behaviour log-prob, then each learner's.
pub fn behaviour_and_learners(
    w_gen: &Weights,
    learners: &[&Weights],
    prompts: &[Vec<u32>],
    cfg: &crate::generate::GenerationConfig,
) -> Result<Vec<Vec<f32>>> {
    let out = crate::generate::generate(w_gen, prompts, cfg, None)?;
    // the rows padded to one length; each scores its own completion's tokens
    let rows: Vec<Vec<u32>> = prompts
        .iter()
        .zip(&out)
        .map(|(p, c)| p.iter().chain(&c.tokens).copied().collect())
        .collect();
    let t = rows.iter().map(Vec::len).max().unwrap_or(0);
    let (mut ids, mut attn, mut scored) = (Vec::new(), Vec::new(), Vec::new());
    for (p, row) in prompts.iter().zip(&rows) {
        ids.push([&row[..], &vec![0; t - row.len()]].concat());
        attn.push((0..t).map(|i| u8::from(i < row.len())).collect::<Vec<u8>>());
        let own = |i: usize| i >= p.len() && i < row.len();
        scored.push((0..t).map(|i| u8::from(own(i))).collect::<Vec<u8>>());
    }
    let scores = learners
        .iter()
        .map(|w| {
            let lp = sequence_logprobs(w, &ids, &attn, &scored, cfg.sampling.temperature.into())?;
            Ok(lp
                .logprobs
                .to_device(&candle_core::Device::Cpu)?
                .to_dtype(DType::F32)?
                .to_vec2::<f32>()?)
        })
        .collect::<Result<Vec<_>>>()?;
    let mut tokens = Vec::new();
    for (k, (p, c)) in prompts.iter().zip(&out).enumerate() {
        for (i, &behaviour) in c.logprobs.iter().enumerate() {
            let at = p.len() + i - 1; // the state before the completion's token i
            tokens.push(
                [behaviour]
                    .into_iter()
                    .chain(scores.iter().map(|s| s[k][at]))
                    .collect(),
            );
        }
    }
    Ok(tokens)
}

fn check_rows(input_ids: &[Vec<u32>], loss_mask: &[Vec<u8>]) -> Result<()> {
    if input_ids.first().map_or(0, Vec::len) < 2 || loss_mask.len() != input_ids.len() {
        return Err(crate::error::ModelError::Generation(
            "log-probs need rows of at least 2 tokens and a loss mask per row".into(),
        ));
    }
    Ok(())
}

/// The states `[B, T, H]` of rows packed end to end, from the packed row's `hidden [N, H]`: row
/// `r`'s first `lens[r]` positions from `starts[r]..`, zeros after.
pub fn unpack_rows(hidden: &Tensor, starts: &[usize], lens: &[usize], t: usize) -> Result<Tensor> {
    let (n, h) = hidden.dims2()?;
    let rows: Vec<u32> = starts
        .iter()
        .zip(lens)
        .flat_map(|(&start, &len)| {
            (0..t).map(move |i| {
                if i < len {
                    (start + i) as u32
                } else {
                    n as u32
                }
            })
        })
        .collect();
    let padded = hidden.pad_with_zeros(0, 0, 1)?; // [N + 1, H]: a zero row for padding
    let idx = Tensor::from_vec(rows, starts.len() * t, hidden.device())?;
    Ok(padded
        .index_select(&idx, 0)?
        .reshape((starts.len(), t, h))?)
}

/// The slots of a right-padded row up to its last scored token: where its log-probs' positions
/// end (position t predicts token t+1).
fn row_len(ids: &[u32], loss_mask: &[u8]) -> usize {
    let last = loss_mask.iter().rposition(|&m| m != 0).unwrap_or(0);
    last.min(ids.len().saturating_sub(1))
}

/// [`score`] of the final hidden states `[B, T, H]` of right-padded `input_ids`.
fn padded_score(
    w: &Weights,
    hidden: Tensor,
    input_ids: &[Vec<u32>],
    loss_mask: &[Vec<u8>],
    temperature: f64,
) -> Result<SequenceLogprobs> {
    let (b, t, h) = hidden.dims3()?;
    let states = hidden.reshape((b * t, h))?;
    let at = |r: usize, i: usize| r * t + i;
    let (logprobs, entropy, mask) = score(w, &states, at, input_ids, loss_mask, temperature)?;
    Ok(SequenceLogprobs {
        logprobs,
        entropy,
        mask,
        hidden: Some(hidden.narrow(1, 0, t - 1)?),
    })
}

/// Log-probs, entropies and the mask `[B, T−1]` of the tokens `loss_mask` marks in the `B` rows
/// of `input_ids`, from final hidden states `[M, H]`, row `at(r, i)` of which is row `r`'s at
/// position `i`.
fn score(
    w: &Weights,
    hidden: &Tensor,
    at: impl Fn(usize, usize) -> usize,
    input_ids: &[Vec<u32>],
    loss_mask: &[Vec<u8>],
    temperature: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let device = w.embed_tokens.device();
    let (b, t) = (input_ids.len(), input_ids[0].len());
    // Only the scored positions go through the output layer: row r's state at position i
    // predicts its token i+1, whose log-prob is output row r·(T−1)+i.
    let (mut rows, mut out_rows, mut targets) = (Vec::new(), Vec::new(), Vec::new());
    for (r, (ids, m)) in input_ids.iter().zip(loss_mask).enumerate() {
        for i in 0..t - 1 {
            if m.get(i + 1).copied().unwrap_or(0) != 0 {
                rows.push(at(r, i) as u32);
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
    if rows.is_empty() {
        let zeros = Tensor::zeros((b, t - 1), DType::F32, device)?;
        return Ok((zeros.clone(), zeros, mask));
    }
    let n = rows.len();
    // the states are read in the order they sit (rows of a packed row need not be in the
    // batch's order), and the results put back in the batch's
    let mut by_state: Vec<usize> = (0..n).collect();
    by_state.sort_by_key(|&k| rows[k]);
    let in_order = by_state.iter().enumerate().all(|(k, &j)| k == j);
    let rows: Vec<u32> = by_state.iter().map(|&k| rows[k]).collect();
    let targets: Vec<u32> = by_state.iter().map(|&k| targets[k]).collect();
    let states = crate::ops::select_rows(hidden, &rows)?; // [N, H]
    let targets = Tensor::from_vec(targets, n, device)?;
    // [N] each; the [N, V] logits exist a chunk of rows at a time
    let (lp, entropy) = crate::head::output_logprobs(
        &states,
        w.output_weight(),
        &targets,
        temperature,
        crate::head::chunk_rows(w.output_weight().dim(0)?),
    )?;
    let back = match in_order {
        true => None,
        false => {
            let mut at = vec![0u32; n];
            for (k, &j) in by_state.iter().enumerate() {
                at[j] = k as u32;
            }
            Some(Tensor::from_vec(at, n, device)?)
        }
    };
    let scatter = |x: Tensor| -> Result<Tensor> {
        let x = match &back {
            Some(at) => x.contiguous()?.index_select(at, 0)?,
            None => x,
        };
        let x = x.reshape((n, 1))?;
        Ok(crate::ops::scatter_rows(&x, &out_rows, b * (t - 1))?.reshape((b, t - 1))?)
    };
    Ok((scatter(lp)?, scatter(entropy)?, mask))
}
