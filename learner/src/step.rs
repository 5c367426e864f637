//! One policy-gradient optimizer step over a batch of completions: micro-batches by a token
//! budget, the GRPO-family loss with the step's denominators, gradient accumulation, AdamW.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use model::logprobs::sequence_logprobs;
use model::Weights;

use crate::error::{LearnerError, Result};
use crate::grpo::{policy_loss, PolicyInputs, PolicyLossConfig, PolicyStats, StepTotals};
use crate::optim::AdamW;

/// One completion to learn from.
#[derive(Debug, Clone, PartialEq)]
pub struct Sequence {
    pub prompt: Vec<u32>,
    pub completion: Vec<u32>,
    /// Log-prob of each completion token under the policy that sampled it.
    pub behavior_logprobs: Vec<f32>,
    pub advantage: f32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StepConfig {
    pub loss: PolicyLossConfig,
    /// Padded tokens (rows × longest row) per micro-batch.
    pub micro_batch_tokens: usize,
    /// The sampling temperature: log-probs are computed at it, as the behaviour log-probs were.
    pub temperature: f64,
    /// Dr. GRPO's `L_max`.
    pub max_completion_length: usize,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct StepMetrics {
    pub loss: f64,
    pub policy: PolicyStats,
    pub grad_norm: f64,
    pub skipped: bool,
    pub micro_batches: usize,
    pub tokens: usize,
    pub seconds: f64,
}

/// Splits sequences into micro-batches whose padded size stays within `budget` tokens
/// (a sequence longer than the budget gets a micro-batch of its own).
pub fn micro_batches(seqs: &[Sequence], budget: usize) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut longest = 0;
    for (i, s) in seqs.iter().enumerate() {
        let len = s.prompt.len() + s.completion.len();
        let rows = i - start + 1;
        if i > start && rows * longest.max(len) > budget {
            out.push(start..i);
            start = i;
            longest = 0;
        }
        longest = longest.max(len);
    }
    if start < seqs.len() {
        out.push(start..seqs.len());
    }
    out
}

/// Padded inputs of a micro-batch and `[B, T−1]` tensors aligned with its log-probs.
pub(crate) struct Packed {
    pub(crate) ids: Vec<Vec<u32>>,
    pub(crate) attention: Vec<Vec<u8>>,
    pub(crate) loss_mask: Vec<Vec<u8>>,
    old: Tensor,
    advantages: Tensor,
}

pub(crate) fn pack(seqs: &[Sequence], device: &Device) -> Result<Packed> {
    let t = seqs
        .iter()
        .map(|s| s.prompt.len() + s.completion.len())
        .max()
        .unwrap_or(0);
    let mut ids = Vec::new();
    let mut attention = Vec::new();
    let mut loss_mask = Vec::new();
    let mut old = vec![0f32; seqs.len() * (t - 1)];
    let mut adv = vec![0f32; seqs.len() * (t - 1)];
    for (r, s) in seqs.iter().enumerate() {
        if s.behavior_logprobs.len() != s.completion.len() || s.prompt.is_empty() {
            return Err(LearnerError::Invalid(
                "a sequence needs a prompt and one behaviour log-prob per completion token".into(),
            ));
        }
        let n = s.prompt.len() + s.completion.len();
        let mut row: Vec<u32> = s.prompt.iter().chain(&s.completion).copied().collect();
        row.resize(t, 0);
        ids.push(row);
        attention.push((0..t).map(|i| u8::from(i < n)).collect());
        loss_mask.push(
            (0..t)
                .map(|i| u8::from(i >= s.prompt.len() && i < n))
                .collect(),
        );
        for (j, &lp) in s.behavior_logprobs.iter().enumerate() {
            let at = r * (t - 1) + s.prompt.len() + j - 1; // position predicting completion token j
            old[at] = lp;
            adv[at] = s.advantage;
        }
    }
    let b = seqs.len();
    Ok(Packed {
        ids,
        attention,
        loss_mask,
        old: Tensor::from_vec(old, (b, t - 1), device)?,
        advantages: Tensor::from_vec(adv, (b, t - 1), device)?,
    })
}

/// One optimizer step of the policy on `seqs`. `policy` must read the optimizer's `Var`s;
/// `reference` (detached) is needed when the loss has a KL term.
pub fn policy_step(
    policy: &Weights,
    reference: Option<&Weights>,
    opt: &mut AdamW,
    seqs: &[Sequence],
    cfg: &StepConfig,
    lr: f64,
) -> Result<StepMetrics> {
    let start = Instant::now();
    let device = policy.embed_tokens.device().clone();
    let ranges = micro_batches(seqs, cfg.micro_batch_tokens);
    let tokens: usize = seqs.iter().map(|s| s.completion.len()).sum();
    let totals = StepTotals {
        sequences: seqs.len(),
        tokens: tokens as f64,
        micro_batches: ranges.len(),
        max_completion_length: cfg.max_completion_length,
    };
    let mut m = StepMetrics {
        micro_batches: ranges.len(),
        tokens,
        ..Default::default()
    };
    let mut weighted = PolicyStats::default();
    for range in ranges {
        let mb = &seqs[range];
        let p = pack(mb, &device)?;
        let lp = sequence_logprobs(policy, &p.ids, &p.attention, &p.loss_mask, cfg.temperature)?;
        let reference_lp = match (reference, cfg.loss.kl_coef != 0.0) {
            (Some(r), true) => Some(
                sequence_logprobs(r, &p.ids, &p.attention, &p.loss_mask, cfg.temperature)?
                    .logprobs
                    .detach(),
            ),
            (None, true) => {
                return Err(LearnerError::Invalid(
                    "a KL term needs reference weights".into(),
                ))
            }
            _ => None,
        };
        let inputs = PolicyInputs {
            logprobs: &lp.logprobs,
            old_logprobs: &p.old,
            advantages: &p.advantages,
            mask: &lp.mask,
            ref_logprobs: reference_lp.as_ref(),
            entropy: Some(&lp.entropy),
            kl_entropy_mask: None,
        };
        let (loss, stats) = policy_loss(&inputs, &cfg.loss, &totals)?;
        let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        if !value.is_finite() {
            opt.zero_grad();
            m.skipped = true;
            m.loss = value;
            m.seconds = start.elapsed().as_secs_f64();
            return Ok(m);
        }
        m.loss += value;
        let missing = opt.accumulate(&loss.backward()?, 1.0)?;
        if !missing.is_empty() && mb.iter().any(|s| s.advantage != 0.0) {
            return Err(LearnerError::Invalid(format!(
                "no gradient reached {}",
                missing.join(", ")
            )));
        }
        let w = stats.tokens;
        weighted.clip_low_frac += stats.clip_low_frac * w;
        weighted.clip_high_frac += stats.clip_high_frac * w;
        weighted.ratio_mean += stats.ratio_mean * w;
        weighted.ratio_max = weighted.ratio_max.max(stats.ratio_max);
        weighted.kl_mean += stats.kl_mean * w;
        weighted.entropy_mean += stats.entropy_mean * w;
        weighted.tokens += w;
    }
    let n = weighted.tokens.max(1.0);
    m.policy = PolicyStats {
        clip_low_frac: weighted.clip_low_frac / n,
        clip_high_frac: weighted.clip_high_frac / n,
        ratio_mean: weighted.ratio_mean / n,
        ratio_max: weighted.ratio_max,
        kl_mean: weighted.kl_mean / n,
        entropy_mean: weighted.entropy_mean / n,
        tokens: weighted.tokens,
    };
    let s = opt.step(lr)?;
    m.grad_norm = s.grad_norm;
    m.skipped = s.skipped;
    m.seconds = start.elapsed().as_secs_f64();
    Ok(m)
}
