//! Batched generation with a preallocated KV cache.
//!
//! Prompts of unequal length are left-padded into one batch; every sequence keeps its own
//! rotary positions and key mask, so a padded batch generates what each prompt would alone.
//! Each sequence draws from its own RNG stream (`seed`, index), so a completion does not
//! depend on which other prompts share its batch.

use candle_core::{DType, Tensor};

use crate::error::{ModelError, Result};
use crate::forward::{forward, positions_of, Batch};
use crate::kv_cache::KvCache;
use crate::rng::Rng;
use crate::sampling::{sample, SamplingParams};
use crate::tokenizer::Tokenizer;
use crate::weights::Weights;

#[derive(Debug, Clone)]
pub struct GenerationConfig {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation stops after emitting one of these (the token is kept in the completion).
    pub stop_token_ids: Vec<u32>,
    /// Generation stops once the decoded completion contains one of these; the text is cut
    /// before it, the tokens are kept up to the one that completed it. Needs a tokenizer.
    pub stop_strings: Vec<String>,
    pub seed: u64,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        GenerationConfig {
            max_new_tokens: 64,
            sampling: SamplingParams::default(),
            stop_token_ids: Vec::new(),
            stop_strings: Vec::new(),
            seed: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token or stop string.
    Stop,
    /// `max_new_tokens` reached.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub tokens: Vec<u32>,
    /// Log-prob of each token under the distribution it was sampled from.
    pub logprobs: Vec<f32>,
    /// Entropy of the full next-token distribution (at the sampling temperature) at each step.
    pub entropies: Vec<f32>,
    pub finish: FinishReason,
    /// Decoded text without special tokens, cut before a stop string (with a tokenizer).
    pub text: Option<String>,
}

/// Generates one completion per prompt. `w` should be detached (see [`Weights::detach`]).
pub fn generate(
    w: &Weights,
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
    tokenizer: Option<&Tokenizer>,
) -> Result<Vec<Completion>> {
    if prompts.is_empty() {
        return Ok(Vec::new());
    }
    if prompts.iter().any(Vec::is_empty) {
        return Err(ModelError::Generation("empty prompt".into()));
    }
    if !cfg.stop_strings.is_empty() && tokenizer.is_none() {
        return Err(ModelError::Generation(
            "stop strings need a tokenizer".into(),
        ));
    }
    let vocab = w.config.vocab_size as u32;
    if let Some(bad) = prompts.iter().flatten().find(|&&id| id >= vocab) {
        return Err(ModelError::Generation(format!(
            "prompt token {bad} ≥ vocab size {vocab}"
        )));
    }
    let device = w.embed_tokens.device().clone();
    let b = prompts.len();
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let mut cache = KvCache::new(
        &w.config,
        b,
        longest + cfg.max_new_tokens,
        w.embed_tokens.dtype(),
        &device,
    )?;

    // Prefill: left-padded prompts.
    let mut key_valid: Vec<Vec<bool>> = Vec::with_capacity(b);
    let mut ids = Vec::with_capacity(b);
    let mut positions = Vec::with_capacity(b);
    for p in prompts {
        let pad = longest - p.len();
        let valid: Vec<bool> = (0..longest).map(|j| j >= pad).collect();
        positions.push(positions_of(&valid, 0));
        ids.push(
            std::iter::repeat_n(0, pad)
                .chain(p.iter().copied())
                .collect::<Vec<u32>>(),
        );
        key_valid.push(valid);
    }
    let batch = Batch::from_parts(&ids, &positions, &key_valid, 0, longest, &device)?;
    let mut logits = last_logits(w, &batch, &mut cache)?;

    let mut rngs: Vec<Rng> = (0..b).map(|i| Rng::stream(cfg.seed, i as u64)).collect();
    let mut out: Vec<Completion> = (0..b)
        .map(|_| Completion {
            tokens: Vec::new(),
            logprobs: Vec::new(),
            entropies: Vec::new(),
            finish: FinishReason::Length,
            text: None,
        })
        .collect();
    let mut done = vec![false; b];
    for step in 0..cfg.max_new_tokens {
        let drawn = sample_rows(&logits, &cfg.sampling, &mut rngs, &done)?;
        for i in 0..b {
            if done[i] {
                continue;
            }
            let (token, logprob, entropy) = drawn[i];
            let c = &mut out[i];
            c.tokens.push(token);
            c.logprobs.push(logprob);
            c.entropies.push(entropy);
            if cfg.stop_token_ids.contains(&token) {
                c.finish = FinishReason::Stop;
                done[i] = true;
            } else if !cfg.stop_strings.is_empty() {
                let text = tokenizer.expect("checked").decode(&c.tokens, true)?;
                if cfg.stop_strings.iter().any(|s| text.contains(s.as_str())) {
                    c.finish = FinishReason::Stop;
                    done[i] = true;
                }
            }
        }
        if done.iter().all(|&d| d) || step + 1 == cfg.max_new_tokens {
            break;
        }
        // Decode one token for every row (finished rows feed a dummy token that is never read).
        let next: Vec<Vec<u32>> = out
            .iter()
            .map(|c| vec![*c.tokens.last().unwrap_or(&0)])
            .collect();
        let pos: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| vec![(p.len() + step) as u32])
            .collect();
        for v in &mut key_valid {
            v.push(true);
        }
        let batch = Batch::from_parts(&next, &pos, &key_valid, cache.len(), 1, &device)?;
        logits = last_logits(w, &batch, &mut cache)?;
    }
    if let Some(tok) = tokenizer {
        for c in &mut out {
            let mut text = tok.decode(&c.tokens, true)?;
            if let Some(cut) = cfg
                .stop_strings
                .iter()
                .filter_map(|s| text.find(s.as_str()))
                .min()
            {
                text.truncate(cut);
            }
            c.text = Some(text);
        }
    }
    Ok(out)
}

/// Runs the forward with the cache and returns each row's last-position logits `[B, V]` in f32,
/// on the model's device.
fn last_logits(w: &Weights, batch: &Batch, cache: &mut KvCache) -> Result<Tensor> {
    let logits = forward(w, batch, Some(cache))?; // [B, T, V]
    let t = logits.dim(1)?;
    Ok(logits
        .narrow(1, t - 1, 1)?
        .squeeze(1)?
        .to_dtype(DType::F32)?) // [B, V]
}

/// `(token, log-prob, entropy)` for every row of `logits [B, V]` (rows that are `done` get a
/// placeholder and draw nothing from their stream). On a CUDA device without top-k / top-p the
/// rows are sampled there and only the results cross to the host; otherwise the logits come to
/// the host and [`sample`] draws. Both consume one uniform per row and step from the row's stream
/// (none when greedy) and pick the same token for it, up to f32 rounding at the boundaries.
fn sample_rows(
    logits: &Tensor,
    p: &SamplingParams,
    rngs: &mut [Rng],
    done: &[bool],
) -> Result<Vec<(u32, f32, f32)>> {
    #[cfg(feature = "cuda")]
    if logits.device().is_cuda() && p.top_k == 0 && p.top_p >= 1.0 {
        let u: Vec<f32> = rngs
            .iter_mut()
            .zip(done)
            .map(|(rng, &d)| {
                if d || p.is_greedy() {
                    0.0
                } else {
                    rng.uniform() as f32
                }
            })
            .collect();
        return Ok(crate::cuda::sample_rows(logits, &u, p.temperature)?);
    }
    let rows = logits.to_vec2::<f32>()?;
    Ok(rows
        .iter()
        .zip(rngs.iter_mut())
        .zip(done)
        .map(|((row, rng), &d)| {
            if d {
                return (0, 0.0, 0.0);
            }
            let (token, logprob) = sample(row, p, rng);
            (
                token,
                logprob,
                crate::sampling::entropy(row, p.temperature as f64),
            )
        })
        .collect())
}
