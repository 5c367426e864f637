//! Clip-Cov and KL-Cov (Cui et al. 2025, "The Entropy Mechanism of Reinforcement Learning for
//! Reasoning Language Models", arXiv 2505.22617; verl's `policy_loss = "clip_cov"` and
//! `"kl_cov"`). Under a policy gradient the policy's entropy falls by about the covariance of
//! `log π(a)` and `A(a)` over the sampled tokens; a few tokens of the largest covariance drive
//! the collapse. Both methods pick those tokens at each optimizer step:
//!
//! - Clip-Cov: `max(1, ⌊ratio·N⌋)` tokens drawn at random among those whose covariance lies in
//!   `(low, high)` lose their policy gradient;
//! - KL-Cov: the `max(1, ⌊ratio·N⌋)` tokens of the largest covariance take a penalty
//!   `coef·|log π_θ − log π_old|` beside the unclipped surrogate `−A·r`.
//!
//! A token's covariance is `(A − Ā)·(log π_old − mean log π_old)`, means over the N valid tokens
//! of the optimizer step: the log-probs the batch was sampled with (or the learner's at the
//! step's start under a behaviour correction), so the choice is made once per optimizer step,
//! whatever its micro-batching. verl makes it within each micro-batch from the current
//! log-probs; at a step's first optimizer step on its own samples the two are the same tokens
//! when the step is one micro-batch (and verl's Clip-Cov then leaves out no token for being
//! clipped already: every ratio is 1).

use model::rng::Rng;

use crate::grpo::Surrogate;
use crate::step::Sequence;

/// Each completion token's covariance term (see the module's documentation), one vector per
/// sequence; a masked sequence ([`Sequence::masked`]) is out of the loss and of the means, and
/// gets NaN.
pub fn covariances(seqs: &[Sequence]) -> Vec<Vec<f64>> {
    let valid = || seqs.iter().filter(|s| !s.masked);
    let n = valid().map(|s| s.completion.len()).sum::<usize>().max(1) as f64;
    let mean_of =
        |f: fn(&Sequence) -> &[f32]| valid().flat_map(f).map(|&x| f64::from(x)).sum::<f64>() / n;
    let mean_a = mean_of(|s| &s.advantages);
    let mean_lp = mean_of(|s| &s.behavior_logprobs);
    seqs.iter()
        .map(|s| {
            s.advantages
                .iter()
                .zip(&s.behavior_logprobs)
                .map(|(&a, &lp)| match s.masked {
                    true => f64::NAN,
                    false => (f64::from(a) - mean_a) * (f64::from(lp) - mean_lp),
                })
                .collect()
        })
        .collect()
}

/// The tokens Clip-Cov or KL-Cov (`surrogate`) picks in one optimizer step's sequences, one
/// flag per completion token; None for the other surrogates. Clip-Cov draws from `rng`.
pub fn select(seqs: &[Sequence], surrogate: Surrogate, rng: &mut Rng) -> Option<Vec<Vec<bool>>> {
    let (ratio, band) = match surrogate {
        Surrogate::ClipCov { ratio, low, high } => (ratio, Some((low, high))),
        Surrogate::KlCov { ratio, .. } => (ratio, None),
        _ => return None,
    };
    let cov = covariances(seqs);
    // (sequence, token) of every valid token, in order
    let tokens: Vec<(usize, usize)> = cov
        .iter()
        .enumerate()
        .flat_map(|(i, row)| (0..row.len()).map(move |j| (i, j)))
        .filter(|&(i, j)| !cov[i][j].is_nan())
        .collect();
    let k = ((ratio * tokens.len() as f64) as usize).max(1);
    let chosen: Vec<(usize, usize)> = match band {
        // k drawn uniformly without replacement among the tokens inside the band
        Some((low, high)) => {
            let mut inside: Vec<(usize, usize)> = tokens
                .into_iter()
                .filter(|&(i, j)| cov[i][j] > low && cov[i][j] < high)
                .collect();
            let k = k.min(inside.len());
            for d in 0..k {
                let pick = d + rng.below((inside.len() - d) as u64) as usize;
                inside.swap(d, pick);
            }
            inside.truncate(k);
            inside
        }
        // the k largest (ties: the earlier token)
        None => {
            let mut order = tokens;
            order.sort_by(|&(a, b), &(c, d)| cov[c][d].total_cmp(&cov[a][b]));
            order.truncate(k);
            order
        }
    };
    let mut flags: Vec<Vec<bool>> = seqs
        .iter()
        .map(|s| vec![false; s.completion.len()])
        .collect();
    for (i, j) in chosen {
        flags[i][j] = true;
    }
    Some(flags)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(advantage: f32, logprobs: &[f32]) -> Sequence {
        Sequence::new(
            vec![1],
            vec![2; logprobs.len()],
            logprobs.to_vec(),
            advantage,
        )
    }

    fn batch() -> Vec<Sequence> {
        vec![
            seq(1.0, &[-0.1, -2.0, -0.5]),
            seq(-1.0, &[-3.0, -0.2]),
            seq(0.5, &[-1.0]),
        ]
    }

    #[test]
    fn covariance_is_the_centred_product_over_the_valid_tokens() {
        let mut seqs = batch();
        // Ā = (3·1 − 2 + 0.5) / 6 = 0.25, mean log π = −6.8 / 6
        let cov = covariances(&seqs);
        let want = (1.0 - 0.25) * (-0.1 + 6.8 / 6.0);
        assert!((cov[0][0] - want).abs() < 1e-6, "{}", cov[0][0]);
        // a masked sequence leaves the means and gets NaN
        seqs[1].masked = true;
        let cov = covariances(&seqs);
        assert!(cov[1].iter().all(|c| c.is_nan()));
        let want = (1.0 - 3.5 / 4.0) * (-0.1 + 3.6 / 4.0);
        assert!((cov[0][0] - want).abs() < 1e-6, "{}", cov[0][0]);
    }

    #[test]
    fn kl_cov_takes_the_largest_and_clip_cov_draws_inside_the_band() {
        let seqs = batch();
        let cov = covariances(&seqs);
        let mut rng = Rng::new(0);
        let top = select(
            &seqs,
            Surrogate::KlCov {
                ratio: 0.34,
                coef: 1.0,
            },
            &mut rng,
        )
        .unwrap();
        // ⌊0.34·6⌋ = 2 tokens: the two largest covariances
        let mut flat: Vec<(f64, bool)> = cov
            .iter()
            .flatten()
            .copied()
            .zip(top.iter().flatten().copied())
            .collect();
        flat.sort_by(|a, b| b.0.total_cmp(&a.0));
        assert_eq!(
            flat.iter().map(|x| x.1).collect::<Vec<_>>(),
            [true, true, false, false, false, false]
        );
        // at least one token, however small the ratio
        let one = select(
            &seqs,
            Surrogate::KlCov {
                ratio: 1e-9,
                coef: 1.0,
            },
            &mut rng,
        )
        .unwrap();
        assert_eq!(one.iter().flatten().filter(|&&x| x).count(), 1);
        // Clip-Cov: 2 of the tokens strictly inside (low, high), different draws by the seed
        let band = (-0.5, 1.2);
        let inside = cov
            .iter()
            .flatten()
            .filter(|&&c| c > band.0 && c < band.1)
            .count();
        assert!(inside > 2, "{inside}");
        let clip = Surrogate::ClipCov {
            ratio: 0.34,
            low: band.0,
            high: band.1,
        };
        let mut draws = std::collections::HashSet::new();
        for seed in 0..20 {
            let picked = select(&seqs, clip, &mut Rng::new(seed)).unwrap();
            let chosen: Vec<f64> = cov
                .iter()
                .flatten()
                .zip(picked.iter().flatten())
                .filter(|(_, &p)| p)
                .map(|(&c, _)| c)
                .collect();
            assert_eq!(chosen.len(), 2);
            assert!(chosen.iter().all(|&c| c > band.0 && c < band.1));
            draws.insert(format!("{picked:?}"));
        }
        assert!(draws.len() > 1, "every seed drew the same tokens");
        // the other surrogates select nothing
        assert!(select(&seqs, Surrogate::Clip, &mut rng).is_none());
    }
}
