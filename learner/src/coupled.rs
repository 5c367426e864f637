//! DPO losses that couple the pairs of an optimizer step (TRL's `DPOTrainer` loss types `aot`,
//! `aot_pair` and `bco_pair`): AOT sorts the step's log-ratios and compares them rank by rank,
//! BCO shifts every reward by a running mean of the rewards. A pair's term then depends on pairs
//! in other micro-batches, so these losses are computed on the host from one pass without
//! gradient over the step ([`crate::dpo::reference_logprobs`] under the policy), and their
//! gradient reaches the model through a linear surrogate `Σ g_w·log π(y_w) + g_l·log π(y_l)` on
//! each micro-batch, `g` the loss's gradient with respect to each summed log-prob: the gradient
//! of TRL's loss over the whole step as one batch, independent of the micro-batching (TRL sorts
//! and averages within each device's micro-batch).

use serde::{Deserialize, Serialize};

use crate::dpo::{DpoConfig, DpoLoss};

/// TRL's `RunningMoments` mean as BCO uses it: each update averages in one value (the step's
/// mean reward) with the weight of one observation; it starts empty. Saved in checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct RunningMean {
    pub mean: f64,
    pub count: f64,
}

impl RunningMean {
    /// Averages `x` in, as `RunningMoments.update` does for a batch of one (its initial count
    /// of 1e-24 makes the first mean `x`).
    pub fn update(&mut self, x: f64) {
        let total = self.count.max(1e-24) + 1.0;
        self.mean += (x - self.mean) / total;
        self.count = total;
    }
}

/// The step's loss (a mean over its pairs) and its gradient with respect to each pair's summed
/// chosen and rejected log-probs, from the detached policy log-probs `chosen`, `rejected` and
/// the cached reference `(chosen, rejected)`; BCO's running mean is updated with the step's
/// mean implicit reward first, as TRL updates it before the loss. `None` for the losses that do
/// not couple their pairs.
pub fn coupled_loss(
    chosen: &[f64],
    rejected: &[f64],
    reference: &[(f64, f64)],
    c: &DpoConfig,
    bco: &mut RunningMean,
) -> Option<(f64, Vec<f64>, Vec<f64>)> {
    let n = chosen.len();
    let (beta, eps) = (c.beta, c.label_smoothing);
    let h_w: Vec<f64> = (0..n).map(|i| chosen[i] - reference[i].0).collect();
    let h_l: Vec<f64> = (0..n).map(|i| rejected[i] - reference[i].1).collect();
    let (mut g_w, mut g_l) = (vec![0.0; n], vec![0.0; n]);
    let mut loss = 0.0;
    // cDPO's term of a sorted difference d: its value and derivative
    let smoothed = |d: f64| {
        let z = beta * d;
        let value = -(1.0 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z);
        (value, beta * (sigmoid(z) - (1.0 - eps)))
    };
    // `left` and `right` each sorted, rank against rank: the pairs (j, k) they pair up, and the
    // term's value and slope at `left[j] − right[k]`
    let ranked = |left: &[f64], right: &[f64]| -> Vec<(usize, usize, f64, f64)> {
        let (by_left, by_right) = (ascending(left), ascending(right));
        let ranks = by_left.into_iter().zip(by_right);
        ranks
            .map(|(j, k)| {
                let (value, slope) = smoothed(left[j] - right[k]);
                (j, k, value, slope)
            })
            .collect()
    };
    match c.loss {
        DpoLoss::Aot => {
            // the policy's log-ratios against the reference's
            let pi: Vec<f64> = (0..n).map(|i| chosen[i] - rejected[i]).collect();
            let refs: Vec<f64> = reference.iter().map(|r| r.0 - r.1).collect();
            for (j, _, value, slope) in ranked(&pi, &refs) {
                loss += value;
                g_w[j] += slope;
                g_l[j] -= slope;
            }
        }
        DpoLoss::AotPair => {
            // the chosen log-ratios against the rejected ones
            for (j, k, value, slope) in ranked(&h_w, &h_l) {
                loss += value;
                g_w[j] += slope;
                g_l[k] -= slope;
            }
        }
        DpoLoss::BcoPair => {
            let rewards: f64 = h_w.iter().chain(&h_l).map(|h| beta * h).sum();
            bco.update(rewards / (2 * n).max(1) as f64);
            let delta = bco.mean;
            for i in 0..n {
                let (w, l) = (beta * h_w[i] - delta, beta * h_l[i] - delta);
                loss += -log_sigmoid(w) - log_sigmoid(-l);
                g_w[i] = -beta * sigmoid(-w);
                g_l[i] = beta * sigmoid(l);
            }
        }
        _ => return None,
    }
    let n = n.max(1) as f64;
    for g in g_w.iter_mut().chain(g_l.iter_mut()) {
        *g /= n;
    }
    Some((loss / n, g_w, g_l))
}

/// The indices of `xs` in ascending order of their values (ties by index).
fn ascending(xs: &[f64]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..xs.len()).collect();
    order.sort_by(|&a, &b| xs[a].total_cmp(&xs[b]).then(a.cmp(&b)));
    order
}

fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// `log σ(x)`, without overflow on either side.
fn log_sigmoid(x: f64) -> f64 {
    x.min(0.0) - (-x.abs()).exp().ln_1p()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_running_mean_averages_the_updates_and_starts_at_the_first() {
        let mut m = RunningMean::default();
        m.update(0.4);
        assert!((m.mean - 0.4).abs() < 1e-12);
        m.update(-0.2);
        m.update(0.1);
        assert!((m.mean - 0.1).abs() < 1e-12 && (m.count - 3.0).abs() < 1e-9);
    }

    #[test]
    fn the_gradient_is_the_losss_slope() {
        // finite differences of the loss against the analytic gradient, for each loss
        let chosen = [-3.1, -7.4, -2.2, -5.0];
        let rejected = [-4.0, -6.1, -2.7, -8.3]; // no two log-ratios tie
        let reference = [(-3.5, -3.8), (-7.0, -6.6), (-2.0, -3.4), (-5.6, -7.7)];
        // (BCO's shift is a detached running mean: its slope is checked against TRL's values)
        for loss in [DpoLoss::Aot, DpoLoss::AotPair] {
            let c = DpoConfig {
                loss,
                beta: 0.5,
                label_smoothing: 0.1,
                ..Default::default()
            };
            let at = |ch: &[f64], rj: &[f64]| {
                let mut bco = RunningMean {
                    mean: 0.05,
                    count: 2.0,
                };
                coupled_loss(ch, rj, &reference, &c, &mut bco).unwrap()
            };
            let (_, g_w, g_l) = at(&chosen, &rejected);
            for i in 0..4 {
                let h = 1e-6;
                let (mut up, mut down) = (chosen, chosen);
                up[i] += h;
                down[i] -= h;
                let slope = (at(&up, &rejected).0 - at(&down, &rejected).0) / (2.0 * h);
                assert!((slope - g_w[i]).abs() < 1e-6, "{loss:?} chosen {i}");
                let (mut up, mut down) = (rejected, rejected);
                up[i] += h;
                down[i] -= h;
                let slope = (at(&chosen, &up).0 - at(&chosen, &down).0) / (2.0 * h);
                assert!((slope - g_l[i]).abs() < 1e-6, "{loss:?} rejected {i}");
            }
        }
    }
}
