//! Next-token sampling on the host: greedy, temperature, top-k, top-p, in the order
//! transformers applies them (temperature, then top-k, then top-p).
//!
//! Each sampled token comes with its log-prob under the distribution it was drawn from: the
//! tempered, truncated and renormalised one. With `top_k = 0` and `top_p = 1` that is the full
//! softmax at the sampling temperature, which is what the learner recomputes for the
//! importance ratio. Greedy decoding reports the log-prob under the untempered softmax.

use crate::rng::Rng;

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

/// Samples one token from `logits [V]`, returning `(token, log-prob)`.
pub fn sample(logits: &[f32], p: &SamplingParams, rng: &mut Rng) -> (u32, f32) {
    if p.is_greedy() {
        let best = argmax(logits);
        return (best as u32, log_softmax_at(logits, best, 1.0));
    }
    let t = p.temperature as f64;
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
    let mut candidates: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &x)| (i as u32, ((x as f64 - max) / t).exp()))
        .collect();
    let truncate = (p.top_k > 0 && p.top_k < candidates.len()) || p.top_p < 1.0;
    if truncate {
        candidates.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if p.top_k > 0 && p.top_k < candidates.len() {
            // Ties with the k-th value are kept, as transformers' `logits < kth_value` does.
            let kth = candidates[p.top_k - 1].1;
            let keep = candidates.iter().take_while(|c| c.1 >= kth).count();
            candidates.truncate(keep);
        }
        if p.top_p < 1.0 {
            // Keep the smallest prefix whose mass reaches top_p (at least one token).
            let total: f64 = candidates.iter().map(|c| c.1).sum();
            let mut cumulative = 0.0;
            let mut keep = 0;
            for c in &candidates {
                keep += 1;
                cumulative += c.1 / total;
                if cumulative >= p.top_p as f64 {
                    break;
                }
            }
            candidates.truncate(keep);
        }
    }
    let total: f64 = candidates.iter().map(|c| c.1).sum();
    let mut u = rng.uniform() * total;
    let mut chosen = candidates[candidates.len() - 1];
    for c in &candidates {
        if u < c.1 {
            chosen = *c;
            break;
        }
        u -= c.1;
    }
    (chosen.0, (chosen.1 / total).ln() as f32)
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

/// Entropy of `softmax(x / t)` over the whole vocabulary, in f64 (t ≤ 0 reads as 1).
pub fn entropy(xs: &[f32], t: f64) -> f32 {
    let t = if t > 0.0 { t } else { 1.0 };
    let max = xs.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
    let (mut z, mut zx) = (0f64, 0f64);
    for &x in xs {
        let s = (x as f64 - max) / t;
        let e = s.exp();
        z += e;
        zx += e * s;
    }
    // H = log Z − E[s]
    (z.ln() - zx / z) as f32
}

/// What the device sampler (`sample_rows` in `kernels/ferrite.cu`) draws from `logits` with the
/// uniform `u`, computed in f64 on the host: `(token, log-prob, entropy)` of `softmax(x / t)`. At
/// `temperature > 0` the token is the first `j` with `u·Σe < Σ_{i≤j} e_i` (the inverse CDF that
/// [`sample`] walks for top_k 0, top_p 1); at `temperature ≤ 0` it is the first argmax, with
/// log-prob and entropy at t = 1.
pub fn device_draw(logits: &[f32], u: f64, temperature: f64) -> (usize, f64, f64) {
    let t = if temperature > 0.0 { temperature } else { 1.0 };
    let m = logits.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x)) as f64;
    let e: Vec<f64> = logits.iter().map(|&x| ((x as f64 - m) / t).exp()).collect();
    let total: f64 = e.iter().sum();
    let token = if temperature > 0.0 {
        let mut left = u * total;
        let mut pick = logits.len() - 1;
        for (j, ej) in e.iter().enumerate() {
            if left < *ej {
                pick = j;
                break;
            }
            left -= ej;
        }
        pick
    } else {
        argmax(logits)
    };
    let entropy = total.ln()
        - e.iter()
            .zip(logits)
            .map(|(ej, &x)| ej * (x as f64 - m) / t)
            .sum::<f64>()
            / total;
    (token, e[token].ln() - total.ln(), entropy)
}

/// `log softmax(x / t)[i]` in f64.
pub fn log_softmax_at(xs: &[f32], i: usize, t: f64) -> f32 {
    let max = xs.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
    let lse = xs
        .iter()
        .map(|&x| ((x as f64 - max) / t).exp())
        .sum::<f64>()
        .ln();
    ((xs[i] as f64 - max) / t - lse) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entropy_is_that_of_the_tempered_softmax() {
        let logits = [1.0f32, -0.5, 2.0, 0.0];
        for t in [1.0, 0.7, 2.0] {
            let z: f64 = logits.iter().map(|&x| (x as f64 / t).exp()).sum();
            let want: f64 = logits
                .iter()
                .map(|&x| {
                    let p = (x as f64 / t).exp() / z;
                    -p * p.ln()
                })
                .sum();
            assert!((entropy(&logits, t) as f64 - want).abs() < 1e-6, "T = {t}");
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
