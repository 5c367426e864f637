//! KTO (Ethayarajh et al. 2024, arXiv 2402.01306; TRL's `KTOTrainer`): preference optimisation
//! from unpaired examples, each a completion labelled desirable or undesirable, against a
//! reference point `z₀`, the policy's KL from the reference estimated on mismatched
//! prompt–completion pairs. With `h = log π(y|x) − log π_ref(y|x)` (summed over the completion):
//!
//! ```text
//! kto:                desirable  w_D·(1 − σ(β(h − z₀)))    undesirable  w_U·(1 − σ(β(z₀ − h)))
//! apo_zero_unpaired:  desirable  w_D·(1 − σ(βh))           undesirable  w_U·σ(βh)
//! z₀ = max(0, mean over the step's examples of log π(y'|x) − log π_ref(y'|x)), no gradient
//! ```
//!
//! The loss is the mean over the step's examples. `y'` is another example's completion
//! ([`mismatched`]). TRL estimates `z₀` on each device's micro-batch; here it is one estimate
//! over the whole optimizer step (the policy's log-probs of its mismatched pairs, without a
//! gradient, before the step's first backward), so it does not depend on how the step is split.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::device_sums::DeviceSums;
use crate::dpo::{completion_logprobs, sigmoid};
use crate::error::{LearnerError, Result};
use crate::fit::{by_cost, fitted, halving};
use crate::optim::AdamW;
use crate::step::{tokens_of, Sequence};
use model::Weights;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum KtoLoss {
    /// Eq. (7) of the KTO paper (TRL's `loss_type = "kto"`).
    #[default]
    Kto,
    /// The unpaired APO-zero (TRL's `"apo_zero_unpaired"`): no reference point; desirable
    /// completions are pushed above the reference, undesirable ones below it.
    ApoZeroUnpaired,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct KtoConfig {
    pub loss: KtoLoss,
    pub beta: f64,
    /// `w_D` and `w_U` (TRL's `desirable_weight`, `undesirable_weight`, 1.0 each).
    pub desirable_weight: f64,
    pub undesirable_weight: f64,
}

impl Default for KtoConfig {
    fn default() -> Self {
        KtoConfig {
            loss: KtoLoss::Kto,
            beta: 0.1,
            desirable_weight: 1.0,
            undesirable_weight: 1.0,
        }
    }
}

impl KtoConfig {
    /// Whether the loss needs the reference point `z₀` (and so the mismatched completions).
    pub fn uses_kl(&self) -> bool {
        self.loss == KtoLoss::Kto
    }
}

/// One unpaired example, tokenized: the completion ends with its end-of-sequence token unless it
/// was cut at the length limit; `kl_completion` is another example's completion ([`mismatched`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub prompt: Vec<u32>,
    pub completion: Vec<u32>,
    pub desirable: bool,
    pub kl_completion: Vec<u32>,
}

/// Examples from `(prompt, completion, desirable)`, each given a mismatched completion for the
/// KL estimate: in a seeded order over the examples, the completion of the nearest example
/// before it (cyclically) whose prompt differs from its own (TRL cycles completions by one
/// within each batch of its dataset; a prompt that several examples share, as a prompt's samples
/// do, would otherwise give an example a completion of its own prompt). When every example has
/// the same prompt, the one before it.
pub fn mismatched(items: Vec<(Vec<u32>, Vec<u32>, bool)>, seed: u64) -> Vec<Example> {
    let n = items.len();
    let order = datasets::rng::Stream::new(seed, 0x470, 0).permutation(n);
    let mut partner = vec![0usize; n];
    for k in 0..n {
        let me = order[k] as usize;
        let before = |j: usize| order[(k + n - j) % n] as usize;
        let other = (1..n).map(before).find(|&o| items[o].0 != items[me].0);
        partner[me] = other.unwrap_or_else(|| before(1));
    }
    let completions: Vec<Vec<u32>> = items.iter().map(|i| i.1.clone()).collect();
    items
        .into_iter()
        .zip(partner)
        .map(|((prompt, completion, desirable), p)| Example {
            prompt,
            completion,
            desirable,
            kl_completion: completions[p].clone(),
        })
        .collect()
}

/// A micro-batch's [`KtoStats`] as device sums, read back after the backward is queued.
pub struct PendingKtoStats {
    /// Σ chosen reward, Σ rejected reward
    sums: DeviceSums,
    desirable: usize,
    undesirable: usize,
}

impl PendingKtoStats {
    pub fn read(&self) -> Result<KtoStats> {
        let s = self.sums.read()?;
        Ok(KtoStats {
            chosen_reward: s[0],
            rejected_reward: s[1],
            desirable: self.desirable as f64,
            undesirable: self.undesirable as f64,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct KtoStats {
    /// Sums of the implicit reward `β·h` over the desirable and the undesirable examples.
    pub chosen_reward: f64,
    pub rejected_reward: f64,
    pub desirable: f64,
    pub undesirable: f64,
}

/// The loss of a micro-batch, `logps` and `ref_logps` `[n]` (summed completion log-probs) with
/// their labels: the sum of its examples' losses over `total` (the examples of the optimizer
/// step), so micro-batch losses add up to the step's mean; `kl` is the step's `z₀` (unused by
/// `apo_zero_unpaired`).
pub fn kto_loss(
    logps: &Tensor,
    ref_logps: &Tensor,
    desirable: &[bool],
    kl: f64,
    c: &KtoConfig,
    total: usize,
) -> Result<(Tensor, PendingKtoStats)> {
    let n = desirable.len();
    if logps.dims() != [n] || ref_logps.dims() != [n] {
        return Err(LearnerError::Invalid(format!(
            "KTO: {n} labels for log-probs of shape {:?} and {:?}",
            logps.dims(),
            ref_logps.dims()
        )));
    }
    let device = logps.device();
    let d: Vec<f32> = desirable.iter().map(|&d| f32::from(u8::from(d))).collect();
    let d = Tensor::from_vec(d, n, device)?.to_dtype(logps.dtype())?; // [n], 1 = desirable
    let u = (d.neg()? + 1.0)?;
    let h = (logps - ref_logps)?; // [n]
    let (chosen, rejected) = match c.loss {
        KtoLoss::Kto => (
            (sigmoid(&((&h - kl)? * c.beta)?)?.neg()? + 1.0)?,
            (sigmoid(&((h.neg()? + kl)? * c.beta)?)?.neg()? + 1.0)?,
        ),
        KtoLoss::ApoZeroUnpaired => {
            let s = sigmoid(&(&h * c.beta)?)?;
            ((s.neg()? + 1.0)?, s)
        }
    };
    let per =
        ((chosen * (&d * c.desirable_weight)?)? + (rejected * (&u * c.undesirable_weight)?)?)?;
    let loss = (per.sum_all()? / total.max(1) as f64)?;
    let r = (h.detach() * c.beta)?;
    let sums = DeviceSums::stack(&[(&r * &d)?.sum_all()?, (&r * &u)?.sum_all()?])?;
    let desirable = desirable.iter().filter(|&&d| d).count();
    Ok((
        loss,
        PendingKtoStats {
            sums,
            desirable,
            undesirable: n - desirable,
        },
    ))
}

/// KTO's reference point `z₀ = max(0, mean(log π(y'|x) − log π_ref(y'|x)))` from the summed
/// log-probs of the mismatched pairs under the policy and the reference.
pub fn reference_point(policy: &[f32], reference: &[f32]) -> f64 {
    let sum: f64 = policy
        .iter()
        .zip(reference)
        .map(|(p, r)| f64::from(*p) - f64::from(*r))
        .sum();
    (sum / policy.len().max(1) as f64).max(0.0)
}

/// The rows of `examples`: each prompt with its completion, or with its mismatched one.
fn rows(examples: &[Example], kl: bool) -> Vec<Sequence> {
    examples
        .iter()
        .map(|e| {
            let c = if kl { &e.kl_completion } else { &e.completion };
            Sequence::new(e.prompt.clone(), c.clone(), vec![0.0; c.len()], 0.0)
        })
        .collect()
}

/// Summed completion log-probs of `seqs` under `w` without a gradient, in micro-batches of
/// `budget` tokens (halved where the device runs out of memory).
fn logprobs_without_gradient(w: &Weights, seqs: &[Sequence], budget: usize) -> Result<Vec<f32>> {
    let w = w.detach();
    let mut out = Vec::with_capacity(seqs.len());
    let mut run = |r: std::ops::Range<usize>| -> Result<Vec<f32>> {
        Ok(completion_logprobs(&w, &seqs[r])?.to_vec1::<f32>()?)
    };
    for range in by_cost(&tokens_of(seqs), 0..seqs.len(), budget) {
        out.extend(halving(range, &mut run)?);
    }
    Ok(out)
}

/// The reference model's summed log-probs of every example's completion and of its mismatched
/// one (`kl`: false skips the latter, 0), computed once before training and cached by the caller.
pub fn reference_logprobs(
    w: &Weights,
    examples: &[Example],
    kl: bool,
    budget: usize,
) -> Result<Vec<(f32, f32)>> {
    let own = logprobs_without_gradient(w, &rows(examples, false), budget)?;
    let other = match kl {
        true => logprobs_without_gradient(w, &rows(examples, true), budget)?,
        false => vec![0.0; examples.len()],
    };
    Ok(own.into_iter().zip(other).collect())
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct KtoMetrics {
    pub loss: f64,
    /// The reference point `z₀` (0 for `apo_zero_unpaired`).
    pub kl: f64,
    /// Means of `β·h` over the step's desirable and undesirable examples (NaN with none).
    pub chosen_reward: f64,
    pub rejected_reward: f64,
    pub desirable: usize,
    pub undesirable: usize,
    pub grad_norm: f64,
    pub skipped: bool,
    pub memory_retries: usize,
}

/// One optimizer step of KTO on `examples` with their cached reference log-probs
/// ([`reference_logprobs`]).
pub fn kto_step(
    policy: &Weights,
    opt: &mut AdamW,
    examples: &[Example],
    reference: &[(f32, f32)],
    cfg: &KtoConfig,
    budget: usize,
    lr: f64,
) -> Result<KtoMetrics> {
    if examples.len() != reference.len() || examples.is_empty() {
        return Err(LearnerError::Invalid(
            "KTO needs one cached reference entry per example".into(),
        ));
    }
    let kl = match cfg.uses_kl() {
        true => {
            let policy_kl = logprobs_without_gradient(policy, &rows(examples, true), budget)?;
            let ref_kl: Vec<f32> = reference.iter().map(|r| r.1).collect();
            reference_point(&policy_kl, &ref_kl)
        }
        false => 0.0,
    };
    let device = policy.embed_tokens.device().clone();
    let seqs = rows(examples, false);
    let mut m = fitted(
        opt,
        examples.len(),
        &tokens_of(&seqs),
        budget,
        |opt, plan| {
            let mut m = KtoMetrics {
                memory_retries: plan.retries,
                kl,
                ..Default::default()
            };
            for piece in plan.pieces() {
                let r = piece.range.clone();
                let logps = completion_logprobs(policy, &seqs[r.clone()])?;
                let refs: Vec<f32> = reference[r.clone()].iter().map(|x| x.0).collect();
                let refs = Tensor::from_vec(refs, r.len(), &device)?.to_dtype(logps.dtype())?;
                let labels: Vec<bool> = examples[r].iter().map(|e| e.desirable).collect();
                let (loss, pending) = kto_loss(&logps, &refs, &labels, kl, cfg, examples.len())?;
                let (value, done) = opt.backward(&loss)?;
                if done.is_none() {
                    m.skipped = true;
                    m.loss = value;
                    return Ok(m);
                }
                let s = pending.read()?;
                m.loss += value;
                m.chosen_reward += s.chosen_reward;
                m.rejected_reward += s.rejected_reward;
            }
            Ok(m)
        },
    )?;
    if m.skipped {
        return Ok(m);
    }
    m.desirable = examples.iter().filter(|e| e.desirable).count();
    m.undesirable = examples.len() - m.desirable;
    m.chosen_reward /= m.desirable as f64; // NaN without desirable examples, as TRL leaves it out
    m.rejected_reward /= m.undesirable as f64;
    let s = opt.step(lr)?;
    m.grad_norm = s.grad_norm;
    m.skipped = s.skipped;
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mismatched_completions_come_from_other_prompts() {
        // three prompts' samples, as a self-built set holds them: consecutive and shared
        let items: Vec<_> = (0..12u32)
            .map(|i| (vec![i / 4], vec![100 + i], i % 2 == 0))
            .collect();
        let examples = mismatched(items.clone(), 7);
        for (e, (p, c, d)) in examples.iter().zip(&items) {
            assert_eq!((&e.prompt, &e.completion, e.desirable), (p, c, *d));
            let owner = (e.kl_completion[0] - 100) / 4;
            assert_ne!(owner, p[0], "a completion of its own prompt");
        }
        // the same order for the same seed, another for another
        assert_eq!(mismatched(items.clone(), 7), examples);
        assert_ne!(mismatched(items.clone(), 8), examples);
        // one prompt only: the example before, never its own completion
        let one: Vec<_> = (0..5u32).map(|i| (vec![1], vec![i], true)).collect();
        for e in mismatched(one, 3) {
            assert_ne!(e.kl_completion, e.completion);
        }
        // a single example is its own partner
        let single = mismatched(vec![(vec![1], vec![2], false)], 0);
        assert_eq!(single[0].kl_completion, vec![2]);
    }
}
