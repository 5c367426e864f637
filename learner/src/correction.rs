//! Behaviour-policy correction (TRL's `vllm_importance_sampling_correction`, verl's rollout
//! correction, AReaL's decoupled PPO): the learner recomputes each completion token's log-prob
//! under its own weights at the start of the step (the proximal policy π_prox), the clipped
//! ratio is taken against π_prox instead of the sampler's π_behav, and each token's policy
//! term is multiplied by a detached importance weight `π_prox / π_behav`, truncated or masked
//! at a cap. It corrects what the sampler and the learner disagree on: a policy version or more
//! of asynchrony (`max_staleness`), and the numerics of a 16-bit sampler.

use serde::{Deserialize, Serialize};

/// How the importance weight `w = π_prox / π_behav` is taken and bounded (TRL's
/// `vllm_importance_sampling_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BehaviourCorrection {
    /// No recomputation: the ratio is taken against the sampler's log-probs.
    #[default]
    None,
    /// Per token, `min(w_t, cap)` (truncated importance sampling, TIS).
    TokenTruncate,
    /// Per token, `w_t`, or 0 where `w_t > cap` (masked importance sampling, MIS).
    TokenMask,
    /// Per sequence, `min(exp(Σ_t log w_t), cap)` on each of its tokens.
    SequenceTruncate,
    /// Per sequence, `exp(Σ_t log w_t)`, or 0 where it exceeds `cap`.
    SequenceMask,
}

impl BehaviourCorrection {
    fn sequence_level(self) -> bool {
        matches!(
            self,
            BehaviourCorrection::SequenceTruncate | BehaviourCorrection::SequenceMask
        )
    }

    fn masks(self) -> bool {
        matches!(
            self,
            BehaviourCorrection::TokenMask | BehaviourCorrection::SequenceMask
        )
    }
}

/// What a step's correction measured (TRL's `sampling/*` metrics). The weights' statistics are
/// over tokens in the token modes and over sequences in the sequence modes, as TRL takes them.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct CorrectionStats {
    /// Mean and largest `|log π_prox − log π_behav|` over the completion tokens.
    pub logprob_diff_mean: f64,
    pub logprob_diff_max: f64,
    /// The weights after truncation or masking.
    pub weight_min: f64,
    pub weight_mean: f64,
    pub weight_max: f64,
    /// The share of weights above the cap (truncated, or masked to 0).
    pub capped_frac: f64,
}

/// One weight per completion token of each sequence, and the step's statistics, from the
/// learner's recomputed log-probs `proximal` and the sampler's `behaviour` (same lengths).
/// `BehaviourCorrection::None` gives weights of 1.
pub fn importance_weights<B: AsRef<[f32]>>(
    proximal: &[Vec<f32>],
    behaviour: &[B],
    mode: BehaviourCorrection,
    cap: f64,
) -> (Vec<Vec<f32>>, CorrectionStats) {
    // the weight and whether it passed the cap
    let bound = |w: f64| -> (f64, bool) {
        match (mode, w > cap) {
            (BehaviourCorrection::None, _) => (1.0, false),
            (_, false) => (w, false),
            (_, true) if mode.masks() => (0.0, true),
            (_, true) => (cap, true),
        }
    };
    let (mut diff_sum, mut diff_max, mut tokens) = (0f64, 0f64, 0usize);
    let mut taken: Vec<(f64, bool)> = Vec::new(); // the weights the statistics cover
    let weights = proximal
        .iter()
        .zip(behaviour)
        .map(|(p, b)| {
            let log_w: Vec<f64> = p
                .iter()
                .zip(b.as_ref())
                .map(|(&p, &b)| f64::from(p) - f64::from(b))
                .collect();
            for d in &log_w {
                diff_sum += d.abs();
                diff_max = diff_max.max(d.abs());
            }
            tokens += log_w.len();
            if mode.sequence_level() {
                let w = bound(log_w.iter().sum::<f64>().exp());
                taken.push(w);
                vec![w.0 as f32; log_w.len()]
            } else {
                log_w
                    .iter()
                    .map(|d| {
                        let w = bound(d.exp());
                        taken.push(w);
                        w.0 as f32
                    })
                    .collect()
            }
        })
        .collect();
    let n = taken.len().max(1) as f64;
    let stats = CorrectionStats {
        logprob_diff_mean: diff_sum / tokens.max(1) as f64,
        logprob_diff_max: diff_max,
        weight_min: taken.iter().map(|w| w.0).fold(f64::INFINITY, f64::min),
        weight_mean: taken.iter().map(|w| w.0).sum::<f64>() / n,
        weight_max: taken.iter().map(|w| w.0).fold(0.0, f64::max),
        capped_frac: taken.iter().filter(|w| w.1).count() as f64 / n,
    };
    (weights, stats)
}

/// M2PO (Zheng et al. 2025, "Prosperity before Collapse", arXiv 2510.01161; AReaL's
/// `m2_threshold`): which completion tokens keep their policy term so that the mean second moment
/// `(log π_prox − log π_behav)²` of the tokens kept falls below `threshold`. The tokens of the
/// largest second moment go first, one by one, until the mean of the rest is below it (all but
/// one when none is: AReaL's `_get_m2po_loss_mask`); ties go by position. Over the tokens of the
/// `valid` sequences (the others are left out of the policy loss anyway, and kept here), pooled
/// over the step where AReaL pools each micro-batch. Also the mean second moment before masking.
pub fn m2_kept<B: AsRef<[f32]>>(
    proximal: &[Vec<f32>],
    behaviour: &[B],
    valid: &[bool],
    threshold: f64,
) -> (Vec<Vec<bool>>, f64) {
    let m2: Vec<Vec<f64>> = proximal
        .iter()
        .zip(behaviour)
        .map(|(p, b)| {
            p.iter()
                .zip(b.as_ref())
                .map(|(&p, &b)| (f64::from(p) - f64::from(b)).powi(2))
                .collect()
        })
        .collect();
    let mut kept: Vec<Vec<bool>> = m2.iter().map(|r| vec![true; r.len()]).collect();
    // the valid tokens, largest second moment first
    let mut order: Vec<(usize, usize)> = (0..m2.len())
        .filter(|&i| valid[i])
        .flat_map(|i| (0..m2[i].len()).map(move |t| (i, t)))
        .collect();
    let n = order.len();
    if n == 0 {
        return (kept, f64::NAN);
    }
    order.sort_by(|&(i, t), &(j, u)| m2[j][u].total_cmp(&m2[i][t]).then((i, t).cmp(&(j, u))));
    let total: f64 = order.iter().map(|&(i, t)| m2[i][t]).sum();
    // masking the first k leaves the mean of the rest; the first k with that below the threshold
    let mut rest = total;
    let mut masked = n - 1;
    for (k, &(i, t)) in order.iter().enumerate() {
        if rest / ((n - k) as f64) < threshold {
            masked = k;
            break;
        }
        rest -= m2[i][t];
    }
    for &(i, t) in &order[..masked] {
        kept[i][t] = false;
    }
    (kept, total / n as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn m2po_masks_the_largest_second_moments_until_the_rest_is_below_the_threshold() {
        // second moments 0.09, 0.01, 0.25 | 0.0001 | 0.04 (a left-out sequence's: kept)
        let behaviour = vec![vec![0.3f32, -0.1, 0.5], vec![0.01], vec![0.2]];
        let proximal = vec![vec![0.0f32; 3], vec![0.0], vec![0.0]];
        let valid = [true, true, false];
        let run = |tau| m2_kept(&proximal, &behaviour, &valid, tau);
        let (kept, m2) = run(0.05);
        // 0.3501 / 4 ≥ 0.05; without 0.25: 0.1001 / 3 < 0.05
        assert_eq!(kept, vec![vec![true, true, false], vec![true], vec![true]]);
        assert!((m2 - 0.3501 / 4.0).abs() < 1e-6);
        let (kept, _) = run(0.1);
        assert!(
            kept.iter().flatten().all(|&k| k),
            "below the threshold already"
        );
        let (kept, _) = run(1e-9);
        // none suffices: all but the one of the smallest second moment
        assert_eq!(
            kept,
            vec![vec![false, false, false], vec![true], vec![true]]
        );
    }

    #[test]
    fn weights_are_truncated_or_masked_per_token_or_sequence() {
        let ln = |x: f64| x.ln() as f32;
        // token weights 2, 0.5, 4 in one sequence; 1 in the other
        let behaviour = vec![vec![ln(0.1), ln(0.4), ln(0.05)], vec![ln(0.3)]];
        let proximal = vec![vec![ln(0.2), ln(0.2), ln(0.2)], vec![ln(0.3)]];
        let run = |mode| importance_weights(&proximal, &behaviour, mode, 3.0);
        let close = |a: &[Vec<f32>], b: &[&[f64]]| {
            a.iter()
                .flatten()
                .zip(b.iter().copied().flatten())
                .all(|(x, y)| (f64::from(*x) - y).abs() < 1e-5)
        };
        let (w, s) = run(BehaviourCorrection::TokenTruncate);
        assert!(close(&w, &[&[2.0, 0.5, 3.0], &[1.0]]), "{w:?}");
        assert_eq!(s.capped_frac, 0.25);
        assert!((s.weight_mean - 6.5 / 4.0).abs() < 1e-6 && s.weight_max == 3.0);
        let (w, s) = run(BehaviourCorrection::TokenMask);
        assert!(close(&w, &[&[2.0, 0.5, 0.0], &[1.0]]), "{w:?}");
        assert_eq!(s.weight_min, 0.0);
        // the first sequence's weight is 2 · 0.5 · 4 = 4 > 3
        let (w, s) = run(BehaviourCorrection::SequenceTruncate);
        assert!(close(&w, &[&[3.0, 3.0, 3.0], &[1.0]]), "{w:?}");
        assert_eq!((s.capped_frac, s.weight_mean), (0.5, 2.0));
        let (w, _) = run(BehaviourCorrection::SequenceMask);
        assert!(close(&w, &[&[0.0, 0.0, 0.0], &[1.0]]), "{w:?}");
        let (w, s) = run(BehaviourCorrection::None);
        assert!(close(&w, &[&[1.0, 1.0, 1.0], &[1.0]]), "{w:?}");
        assert!((s.logprob_diff_max - 4f64.ln()).abs() < 1e-5);
        assert!((s.logprob_diff_mean - (2.0 * 2f64.ln() + 4f64.ln()) / 4.0).abs() < 1e-5);
    }
}
