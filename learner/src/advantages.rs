//! Advantage estimators beside GRPO's (spec §1.3, §5.5, §5.7 and verl's `core_algos`): RLOO,
//! REINFORCE++ with and without a group baseline, PPO's token rewards and GAE, masked whitening,
//! Advantage Reweighting, Lopti's token split, the entropy-minimisation rewards and on-policy
//! distillation's teacher term.
//!
//! Everything here is computed once per step from detached numbers, so it works on ragged
//! per-sequence vectors: `xs[i][t]` is completion token t of sequence i (no padding).

use serde::{Deserialize, Serialize};

/// RLOO (Ahmadian et al.; verl `compute_rloo_outcome_advantage`): each response's baseline is the
/// mean of the other responses of its prompt; a group of one gets advantage 0.
pub fn rloo(rewards: &[f32], group_ids: &[u64]) -> Vec<f32> {
    rewards
        .iter()
        .enumerate()
        .map(|(i, &r)| {
            let others: Vec<f64> = (0..rewards.len())
                .filter(|&j| j != i && group_ids[j] == group_ids[i])
                .map(|j| f64::from(rewards[j]))
                .collect();
            if others.is_empty() {
                0.0
            } else {
                (f64::from(r) - others.iter().sum::<f64>() / others.len() as f64) as f32
            }
        })
        .collect()
}

/// The mean of each response's group (the REINFORCE++-baseline and GRPO-without-std baseline).
fn group_means(rewards: &[f32], group_ids: &[u64]) -> Vec<f64> {
    group_ids
        .iter()
        .map(|g| {
            let members: Vec<f64> = (0..rewards.len())
                .filter(|&j| group_ids[j] == *g)
                .map(|j| f64::from(rewards[j]))
                .collect();
            members.iter().sum::<f64>() / members.len() as f64
        })
        .collect()
}

/// `(x − mean) / sqrt(var + 1e-8)` over every token of every sequence, with verl's unbiased
/// variance (`masked_whiten`, `masked_var(unbiased=True)`).
pub fn whiten(xs: &[Vec<f32>]) -> Vec<Vec<f32>> {
    let n: usize = xs.iter().map(Vec::len).sum();
    if n == 0 {
        return xs.to_vec();
    }
    let all = || xs.iter().flatten().map(|&x| f64::from(x));
    let mean = all().sum::<f64>() / n as f64;
    let var = all().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
    let var = if n > 1 {
        var * n as f64 / (n - 1) as f64
    } else {
        var
    };
    let scale = 1.0 / (var + 1e-8).sqrt();
    xs.iter()
        .map(|row| {
            row.iter()
                .map(|&x| ((f64::from(x) - mean) * scale) as f32)
                .collect()
        })
        .collect()
}

/// PPO's token rewards (verl `apply_kl_penalty`, TRL's `non_score_reward`): `−β·kl_t` on every
/// token and the score added at the last one. `kl[t]` is the per-token k1 `logπ_old − logπ_ref`.
pub fn token_rewards(score: f32, kl: Option<&[f32]>, beta: f64, len: usize) -> Vec<f32> {
    let mut r: Vec<f32> = match kl {
        Some(kl) => kl.iter().map(|&k| (-beta * f64::from(k)) as f32).collect(),
        None => vec![0.0; len],
    };
    if let Some(last) = r.last_mut() {
        *last += score;
    }
    r
}

/// Discounted returns `G_t = r_t + γ G_{t+1}` of one sequence.
pub fn discounted_returns(rewards: &[f32], gamma: f64) -> Vec<f32> {
    let mut out = vec![0f32; rewards.len()];
    let mut g = 0f64;
    for t in (0..rewards.len()).rev() {
        g = f64::from(rewards[t]) + gamma * g;
        out[t] = g as f32;
    }
    out
}

/// REINFORCE++ (verl `compute_reinforce_plus_plus_outcome_advantage`): whitened discounted
/// returns of the token rewards.
pub fn reinforce_pp(token_rewards: &[Vec<f32>], gamma: f64) -> Vec<Vec<f32>> {
    let returns: Vec<Vec<f32>> = token_rewards
        .iter()
        .map(|r| discounted_returns(r, gamma))
        .collect();
    whiten(&returns)
}

/// The finite rewards of each group, by group id.
fn finite_groups(rewards: &[f32], group_ids: &[u64]) -> std::collections::HashMap<u64, Vec<usize>> {
    let mut groups: std::collections::HashMap<u64, Vec<usize>> = Default::default();
    for (i, (&r, &g)) in rewards.iter().zip(group_ids).enumerate() {
        if r.is_finite() {
            groups.entry(g).or_default().push(i);
        }
    }
    groups
}

/// GRPO for pass@k (Chen et al. 2025, arXiv 2503.19595; verl's `adv_estimator = "grpo_passk"`):
/// only the best response of each group learns, with advantage `r_max − r_second`, divided by
/// the group's standard deviation + `eps` (`scale_rewards = "group"`; the batch's with `"batch"`,
/// none with `"none"`); every other response, a group of one and a non-finite reward get 0. Of
/// tied best responses the first learns (its advantage is then 0 anyway).
pub fn grpo_passk(
    rewards: &[f32],
    group_ids: &[u64],
    scale: crate::grpo::ScaleRewards,
    eps: f64,
) -> Vec<f32> {
    let mut out = vec![0f32; rewards.len()];
    let batch_std = match scale {
        crate::grpo::ScaleRewards::Batch => {
            let all: Vec<f64> = rewards
                .iter()
                .filter(|r| r.is_finite())
                .map(|&r| f64::from(r))
                .collect();
            crate::grpo::mean_and_std(&all).1
        }
        _ => f64::NAN,
    };
    for members in finite_groups(rewards, group_ids).values() {
        if members.len() < 2 {
            continue;
        }
        let mut order = members.clone();
        // best first; of equals the earlier
        order.sort_by(|&a, &b| rewards[b].total_cmp(&rewards[a]).then(a.cmp(&b)));
        let gap = f64::from(rewards[order[0]]) - f64::from(rewards[order[1]]);
        let values: Vec<f64> = members.iter().map(|&i| f64::from(rewards[i])).collect();
        let a = match scale {
            crate::grpo::ScaleRewards::Group => gap / (crate::grpo::mean_and_std(&values).1 + eps),
            crate::grpo::ScaleRewards::Batch => gap / (batch_std + eps),
            crate::grpo::ScaleRewards::None => gap,
        };
        out[order[0]] = if a.is_finite() { a as f32 } else { 0.0 };
    }
    out
}

/// ReMax (Li et al. 2023, arXiv 2310.10505; verl's `adv_estimator = "remax"`): `r − b`, the
/// baseline `b` the reward of the prompt's greedy completion under the policy that sampled `r`
/// (one per response: the reward part `greedy_reward` that rollout workers add with
/// `PoolConfig::greedy_baseline`); no normalisation. A non-finite reward or baseline gets 0.
/// verl takes the returns-to-go of its token rewards minus `b` on every token, which with the
/// score on the last token alone is this value on each.
pub fn remax(rewards: &[f32], baselines: &[f32]) -> Vec<f32> {
    rewards
        .iter()
        .zip(baselines)
        .map(|(&r, &b)| {
            let a = r - b;
            if a.is_finite() {
                a
            } else {
                0.0
            }
        })
        .collect()
}

/// OPO (Hao et al. 2025, arXiv 2505.23585; verl's `adv_estimator = "opo"`): `r − b`, the
/// baseline `b` the group's mean reward weighted by each response's length in tokens
/// (`Σ |o|·r / Σ |o|`, the optimal baseline when the gradient's norm grows with the length);
/// a group of one has baseline 0; a non-finite reward gets 0.
pub fn opo(rewards: &[f32], group_ids: &[u64], lengths: &[usize]) -> Vec<f32> {
    let mut out = vec![0f32; rewards.len()];
    for members in finite_groups(rewards, group_ids).values() {
        let baseline = if members.len() == 1 {
            0.0
        } else {
            let weight: f64 = members.iter().map(|&i| lengths[i] as f64).sum();
            let sum: f64 = members
                .iter()
                .map(|&i| lengths[i] as f64 * f64::from(rewards[i]))
                .sum();
            sum / weight.max(1.0)
        };
        for &i in members {
            out[i] = (f64::from(rewards[i]) - baseline) as f32;
        }
    }
    out
}

/// GDPO (Group reward-Decoupled normalization Policy Optimization, arXiv 2601.05242; verl's
/// `adv_estimator = "gdpo"`): each reward part is normalised within its group on its own
/// (`parts[k][i]`, part k of sample i, as [`crate::grpo::group_advantages`] normalises a total),
/// the normalised parts are summed by `weights`, and the sum, on every completion token of
/// `lengths`, is whitened over the batch ([`whiten`]). Within a group every part that varies
/// counts at unit spread (times its weight), where GRPO's normalised sum lets the part of larger
/// variance drown the others.
pub fn gdpo(
    parts: &[Vec<f32>],
    weights: &[f32],
    group_ids: &[u64],
    scale: crate::grpo::ScaleRewards,
    eps: f64,
    lengths: &[usize],
) -> Vec<Vec<f32>> {
    let mut sum = vec![0f64; group_ids.len()];
    for (values, &w) in parts.iter().zip(weights) {
        let normalised = crate::grpo::group_advantages(values, group_ids, scale, eps);
        for (s, a) in sum.iter_mut().zip(normalised) {
            *s += f64::from(w) * f64::from(a);
        }
    }
    let tokens: Vec<Vec<f32>> = sum
        .iter()
        .zip(lengths)
        .map(|(&a, &n)| vec![a as f32; n])
        .collect();
    whiten(&tokens)
}

/// REINFORCE++-baseline (verl `compute_reinforce_plus_plus_baseline_outcome_advantage`): the
/// score minus its group's mean on every token, whitened over the batch.
pub fn reinforce_pp_baseline(
    rewards: &[f32],
    group_ids: &[u64],
    lengths: &[usize],
) -> Vec<Vec<f32>> {
    let means = group_means(rewards, group_ids);
    let centred: Vec<Vec<f32>> = rewards
        .iter()
        .zip(&means)
        .zip(lengths)
        .map(|((&r, &m), &n)| vec![(f64::from(r) - m) as f32; n])
        .collect();
    whiten(&centred)
}

/// Generalised advantage estimation of one sequence: `δ_t = r_t + γV_{t+1} − V_t`,
/// `Â_t = δ_t + γλÂ_{t+1}`, V after the end is 0. Returns `(advantages, returns = Â + V)`.
pub fn gae(rewards: &[f32], values: &[f32], gamma: f64, lambda: f64) -> (Vec<f32>, Vec<f32>) {
    let n = rewards.len();
    let mut adv = vec![0f32; n];
    let mut ret = vec![0f32; n];
    let mut next_value = 0f64;
    let mut running = 0f64;
    for t in (0..n).rev() {
        let v = f64::from(values[t]);
        let delta = f64::from(rewards[t]) + gamma * next_value - v;
        running = delta + gamma * lambda * running;
        adv[t] = running as f32;
        ret[t] = (running + v) as f32;
        next_value = v;
    }
    (adv, ret)
}

/// Advantage Reweighting (spec §1.3): `Â ← (α·π_old + (1 − α))·Â`, π_old the behaviour
/// probability of the token (a constant).
pub fn reweight(advantages: &[f32], old_logprobs: &[f32], alpha: f64) -> Vec<f32> {
    advantages
        .iter()
        .zip(old_logprobs)
        .map(|(&a, &lp)| ((alpha * f64::from(lp).exp() + 1.0 - alpha) * f64::from(a)) as f32)
        .collect()
}

/// On-policy distillation (Thinking Machines' tinker cookbook; slime's
/// `apply_opd_kl_to_advantages`): each token's advantage minus `coef · (log π_old − log π_teacher)`,
/// the sampled-token estimate of the reverse KL `KL(π_old ‖ π_teacher)` at that token. Returns the
/// per-token estimates (`log π_old − log π_teacher`).
pub fn distill(
    advantages: &mut [f32],
    old_logprobs: &[f32],
    teacher: &[f32],
    coef: f64,
) -> Vec<f32> {
    advantages
        .iter_mut()
        .zip(old_logprobs.iter().zip(teacher))
        .map(|(a, (&old, &t))| {
            let reverse_kl = f64::from(old) - f64::from(t);
            *a = (f64::from(*a) - coef * reverse_kl) as f32;
            reverse_kl as f32
        })
        .collect()
}

/// Lopti's first group (spec §1.4): `π_old < η` for η > 0; for η < 0 the order is reversed
/// (`π_old ≥ |η|` first), the ablation that collapses training.
pub fn lopti_first(old_logprobs: &[f32], eta: f64) -> Vec<bool> {
    old_logprobs
        .iter()
        .map(|&lp| {
            let p = f64::from(lp).exp();
            if eta > 0.0 {
                p < eta
            } else {
                p >= -eta
            }
        })
        .collect()
}

pub use rollout::task::EntropyReward;

/// Fixed or adaptive KL coefficient (Ziegler et al.; spec §5.4):
/// `β ← β·(1 + clip(KL/target − 1, −0.2, 0.2)·n_steps/horizon)`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct KlController {
    pub beta: f64,
    /// None: fixed.
    pub target: Option<f64>,
    pub horizon: f64,
}

impl KlController {
    pub fn update(&mut self, kl: f64, n_steps: usize) {
        if let Some(target) = self.target {
            let error = (kl / target - 1.0).clamp(-0.2, 0.2);
            self.beta *= 1.0 + error * n_steps as f64 / self.horizon;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grpo::ScaleRewards;

    /// What verl's formulas leave open: a group of one, a non-finite reward, the batch's std.
    #[test]
    fn passk_and_opo_edge_cases() {
        let rewards = [1.0, 0.0, f32::NAN, 2.0, 0.5];
        let groups = [0, 0, 0, 1, 2];
        let none = grpo_passk(&rewards, &groups, ScaleRewards::None, 1e-6);
        assert_eq!(none, vec![1.0, 0.0, 0.0, 0.0, 0.0]);
        // the batch's finite rewards 1, 0, 2, 0.5: std √(35/48)
        let batch = grpo_passk(&rewards, &groups, ScaleRewards::Batch, 0.0);
        assert!((f64::from(batch[0]) - 1.0 / (35.0f64 / 48.0).sqrt()).abs() < 1e-6);
        let lengths = [2, 6, 3, 4, 1];
        // group 0: (2·1 + 6·0) / 8 = 0.25; a group of one has baseline 0
        assert_eq!(
            opo(&rewards, &groups, &lengths),
            vec![0.75, -0.25, 0.0, 2.0, 0.5]
        );
    }
}
