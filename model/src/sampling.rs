//! Next-token sampling: greedy, temperature, top-k, top-p, in the order transformers applies
//! them (temperature, then top-k, then top-p). [`draw`] defines it: the host runs it, and the
//! device sampler (`sample_rows` in `kernels/ferrite.cu`) computes the same in f32.
//!
//! Each sampled token comes with its log-prob under the distribution it was drawn from: the
//! tempered, truncated and renormalised one. With `top_k = 0` and `top_p = 1` that is the full
//! softmax at the sampling temperature, which is what the learner recomputes for the
//! importance ratio; with truncation the two differ even on-policy, and the ratio carries the
//! truncation. Greedy decoding reports the log-prob under the untempered softmax.

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 means off.
    pub top_k: usize,
    /// 1 means off.
    pub top_p: f32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            ..Default::default()
        }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }
}

/// The token that the uniform `u ∈ [0, 1)` draws from `logits [V]` under `p`, with its log-prob
/// and the entropy of the full tempered softmax, in f64: `(token, log-prob, entropy)`. This is
/// what the host sampler draws and what the device sampler (`sample_rows` in
/// `kernels/ferrite.cu`) computes in f32.
///
/// With weights `e_i = exp((x_i − max) / t)`, the kept tokens are those with `e_i` at least
/// [`kept_floor`]; the token is the first kept `j`, in index order, with
/// `u·Σ_kept e < Σ_{kept i ≤ j} e_i` (the inverse CDF; the last kept token if rounding leaves
/// `u` beyond the end), and its log-prob is `ln(e_j / Σ_kept e)`. At `temperature ≤ 0` the token
/// is the first argmax, and log-prob and entropy are taken at t = 1.
pub fn draw(logits: &[f32], u: f64, p: &SamplingParams) -> (usize, f64, f64) {
    let greedy = p.is_greedy();
    let t = if greedy { 1.0 } else { p.temperature as f64 };
    let m = logits.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x)) as f64;
    let e: Vec<f64> = logits.iter().map(|&x| ((x as f64 - m) / t).exp()).collect();
    let total: f64 = e.iter().sum();
    let entropy = total.ln()
        - e.iter()
            .zip(logits)
            .map(|(ej, &x)| ej * (x as f64 - m) / t)
            .sum::<f64>()
            / total;
    if greedy {
        let best = argmax(logits);
        return (best, e[best].ln() - total.ln(), entropy);
    }
    let floor = kept_floor(&e, p);
    let kept = || e.iter().enumerate().filter(|(_, &ej)| ej >= floor);
    let kept_total: f64 = kept().map(|(_, ej)| ej).sum();
    let mut left = u * kept_total;
    let mut token = 0;
    for (j, &ej) in kept() {
        token = j;
        if left < ej {
            break;
        }
        left -= ej;
    }
    (token, e[token].ln() - kept_total.ln(), entropy)
}

/// The smallest weight that top-k and then top-p keep, in transformers' order and meaning:
/// top-k keeps the `top_k` largest weights and every tie of the k-th; top-p, over the weights
/// that top-k kept (renormalised), keeps a token when the mass strictly above it in descending
/// order is below `top_p` (the smallest prefix that reaches `top_p`), and every tie of the last
/// one. Ties are kept whole so that the set does not depend on a sort's order. 0 when nothing is
/// truncated.
pub fn kept_floor(e: &[f64], p: &SamplingParams) -> f64 {
    let top_k = p.top_k > 0 && p.top_k < e.len();
    if !top_k && p.top_p >= 1.0 {
        return 0.0;
    }
    let mut sorted = e.to_vec();
    sorted.sort_unstable_by(|a, b| b.total_cmp(a));
    let mut floor = 0.0;
    if top_k {
        floor = sorted[p.top_k - 1];
        let keep = sorted.iter().take_while(|&&x| x >= floor).count();
        sorted.truncate(keep);
    }
    if p.top_p < 1.0 {
        let total: f64 = sorted.iter().sum();
        let mut above = 0.0;
        for &x in &sorted {
            floor = x;
            above += x;
            if above / total >= p.top_p as f64 {
                break;
            }
        }
    }
    floor
}

pub fn argmax(xs: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// `(token, log-prob)` drawn with one uniform from `rng` (none when greedy), as the
    /// generator draws.
    fn sample(logits: &[f32], p: &SamplingParams, rng: &mut Rng) -> (u32, f32) {
        let u = if p.is_greedy() { 0.0 } else { rng.uniform() };
        let (token, logprob, _) = draw(logits, u, p);
        (token as u32, logprob as f32)
    }

    fn entropy(logits: &[f32], t: f32) -> f32 {
        let p = SamplingParams {
            temperature: t,
            ..Default::default()
        };
        draw(logits, 0.5, &p).2 as f32
    }

    #[test]
    fn entropy_is_that_of_the_tempered_softmax() {
        let logits = [1.0f32, -0.5, 2.0, 0.0];
        for t in [1.0f32, 0.7, 2.0] {
            let t = t as f64;
            let z: f64 = logits.iter().map(|&x| (x as f64 / t).exp()).sum();
            let want: f64 = logits
                .iter()
                .map(|&x| {
                    let p = (x as f64 / t).exp() / z;
                    -p * p.ln()
                })
                .sum();
            assert!(
                (entropy(&logits, t as f32) as f64 - want).abs() < 1e-6,
                "T = {t}"
            );
        }
        // uniform over 4: log 4; one certain token: 0
        assert!((entropy(&[3.0; 4], 1.0) - 4f32.ln()).abs() < 1e-6);
        assert!(entropy(&[0.0, -1e4], 1.0).abs() < 1e-6);
    }

    fn frequencies(logits: &[f32], p: &SamplingParams, n: usize) -> Vec<f64> {
        let mut rng = Rng::new(11);
        let mut counts = vec![0usize; logits.len()];
        for _ in 0..n {
            counts[sample(logits, p, &mut rng).0 as usize] += 1;
        }
        counts.iter().map(|&c| c as f64 / n as f64).collect()
    }

    #[test]
    fn temperature_sampling_follows_softmax_and_reports_its_logprob() {
        let logits = [1.0f32, 2.0, 0.5, -1.0];
        let p = SamplingParams {
            temperature: 0.7,
            ..Default::default()
        };
        let z: f64 = logits.iter().map(|&x| (x as f64 / 0.7).exp()).sum();
        let expected: Vec<f64> = logits.iter().map(|&x| (x as f64 / 0.7).exp() / z).collect();
        let f = frequencies(&logits, &p, 100_000);
        for (a, b) in f.iter().zip(&expected) {
            assert!((a - b).abs() < 0.01, "{f:?} vs {expected:?}");
        }
        let (tok, lp) = sample(&logits, &p, &mut Rng::new(0));
        assert!((lp as f64 - expected[tok as usize].ln()).abs() < 1e-6);
    }

    #[test]
    fn top_k_and_top_p_truncate_and_renormalise() {
        // probabilities 0.5, 0.25, 0.125, 0.125 at temperature 1
        let logits = [0.5f32.ln(), 0.25f32.ln(), 0.125f32.ln(), 0.125f32.ln()];
        let k2 = SamplingParams {
            top_k: 2,
            ..Default::default()
        };
        let f = frequencies(&logits, &k2, 60_000);
        assert!(
            f[2] == 0.0 && f[3] == 0.0 && (f[0] - 2.0 / 3.0).abs() < 0.01,
            "{f:?}"
        );
        let (tok, lp) = sample(&logits, &k2, &mut Rng::new(5));
        let renorm = [2.0 / 3.0, 1.0 / 3.0][tok as usize];
        assert!((lp as f64 - f64::ln(renorm)).abs() < 1e-6);
        // top_p = 0.7 keeps {0.5, 0.25} (0.5 < 0.7 ≤ 0.75).
        let p = SamplingParams {
            top_p: 0.7,
            ..Default::default()
        };
        let f = frequencies(&logits, &p, 60_000);
        assert!(f[2] == 0.0 && f[3] == 0.0, "{f:?}");
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        let (tok, lp) = sample(
            &[0.0, 3.0, 3.0, 1.0],
            &SamplingParams::greedy(),
            &mut Rng::new(0),
        );
        assert_eq!(tok, 1);
        assert!(lp < 0.0);
    }
}
