//! The GRPO family of policy losses (spec §5.1–5.4): group-normalised advantages, token- or
//! sequence-level (GSPO) importance ratios against the behaviour log-probs, clip-low / clip-high
//! and dual-clip, the aggregation variants (`grpo`, `bnpo`, `dapo`, `dr_grpo`), KL to a
//! reference policy (k1 / k2 / k3) and an entropy bonus.
//!
//! Shapes: B sequences of a micro-batch, T completion positions (padded); masks are f32 0/1.

use candle_core::{DType, Tensor, D};
use serde::{Deserialize, Serialize};

use crate::device_sums::DeviceSums;
use crate::error::Result;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScaleRewards {
    /// `(r − mean_group) / (std_group + eps)` (TRL's default).
    Group,
    /// `(r − mean_group) / (std_batch + eps)`.
    Batch,
    /// `r − mean_group` (Dr. GRPO).
    None,
}

/// The mean and the Bessel-corrected standard deviation of `xs` (NaN std for fewer than two).
pub(crate) fn mean_and_std(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

/// TRL's group advantages: `nanmean` / `nanstd` (Bessel-corrected) over each group; a NaN reward
/// is left out of the statistics and gets advantage 0, as does a group whose std is undefined.
pub fn group_advantages(
    rewards: &[f32],
    group_ids: &[u64],
    scale: ScaleRewards,
    eps: f64,
) -> Vec<f32> {
    let finite = |ids: &mut dyn Iterator<Item = usize>| -> Vec<f64> {
        ids.filter(|&i| rewards[i].is_finite())
            .map(|i| rewards[i] as f64)
            .collect()
    };
    let batch_std = mean_and_std(&finite(&mut (0..rewards.len()))).1;
    rewards
        .iter()
        .enumerate()
        .map(|(i, &r)| {
            let group = finite(&mut (0..rewards.len()).filter(|&j| group_ids[j] == group_ids[i]));
            let (mean, std) = if group.is_empty() {
                (f64::NAN, f64::NAN)
            } else {
                mean_and_std(&group)
            };
            let mean = if group.len() == 1 { group[0] } else { mean };
            let a = match scale {
                ScaleRewards::Group => (r as f64 - mean) / (std + eps),
                ScaleRewards::Batch => (r as f64 - mean) / (batch_std + eps),
                ScaleRewards::None => r as f64 - mean,
            };
            if a.is_finite() {
                a as f32
            } else {
                0.0
            }
        })
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Aggregation {
    /// `mean_i[Σ_t M·ℓ / Σ_t M]` over the sequences of the step.
    Grpo,
    /// `Σ M·ℓ / Σ M` within each micro-batch, averaged over micro-batches.
    Bnpo,
    /// `Σ M·ℓ / (valid tokens of the whole step)`.
    Dapo,
    /// `Σ M·ℓ / (sequences of the step · max_completion_length)`.
    DrGrpo,
    /// `Σ M·ℓ / sequences of the step`: each sequence's token sum, averaged over the sequences
    /// (verl's `seq-mean-token-sum`). With `ratio = "sequence"` it is LUSPO (TRL's
    /// `loss_type = "luspo"`, `mean_i(ℓ_i·|o_i|)`: a sequence's loss scaled by its length).
    SeqSum,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RatioLevel {
    Token,
    /// GSPO: one ratio per sequence, `exp(mean_t log_ratio)`.
    Sequence,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KlEstimator {
    /// `logp − ref_logp`
    K1,
    /// `½ (ref_logp − logp)²`
    K2,
    /// `e^x − x − 1`, `x = ref_logp − logp` (clamped as verl's `low_var_kl`)
    K3,
}

/// The per-token policy-gradient term, of the ratio `r = π_θ / π_old` and the advantage `A`.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub enum Surrogate {
    /// PPO's clipped surrogate `max(−A·r, −A·clip(r, 1 − ε_low, 1 + ε_high))`, with verl's
    /// dual clip for negative advantages where `dual_clip` is set.
    #[default]
    Clip,
    /// CISPO (MiniMax-M1; ScaleRL; TRL's `loss_type = "cispo"`, where `epsilon_high` holds the
    /// cap): `−sg(min(r, max))·A·log π`, every token keeping a gradient.
    Cispo { max: f64 },
    /// SAPO (Soft Adaptive Policy Optimization; TRL's `loss_type = "sapo"`): a soft gate in place
    /// of the clip, `−σ(τ·(r − 1))·(4/τ)·A`, with `τ = tau_pos` where `A > 0` and `tau_neg`
    /// elsewhere. At `r = 1` its gradient is the unclipped surrogate's; away from 1 it fades
    /// smoothly instead of stopping.
    Sapo { tau_pos: f64, tau_neg: f64 },
    /// Clip-Cov ([`crate::covariance`]; verl's `policy_loss = "clip_cov"`): the clipped
    /// surrogate, less the tokens the step's covariance selection picked (`ratio` of the tokens,
    /// drawn among those whose covariance lies in `(low, high)`), whose term is 0.
    ClipCov { ratio: f64, low: f64, high: f64 },
    /// KL-Cov ([`crate::covariance`]; verl's `policy_loss = "kl_cov"`): the unclipped surrogate
    /// `−A·r`, plus `coef·|log π_θ − log π_old|` on the `ratio` of the tokens of the largest
    /// covariance.
    KlCov { ratio: f64, coef: f64 },
    /// DPPO-Binary-TV (verl's `policy_loss = "dppo_tv"`; PRIME-RL's default loss is of this
    /// family): a trust region on the probability itself in place of the ratio's clip,
    /// `−A·sg(min(r, cap))·log π` on the tokens whose probability rose by at most `high`
    /// (A > 0) or fell by at most `low` (A ≤ 0) since π_old, 0 on the others.
    DppoTv { low: f64, high: f64, cap: f64 },
    /// DPPO-Binary-KL (verl's `"dppo_kl"`): as [`Surrogate::DppoTv`], the region the binary KL
    /// `p_old·log(p_old/p) + (1 − p_old)·log((1 − p_old)/(1 − p))` ≤ `high` (A > 0) or `low`
    /// (A ≤ 0), and every token whose probability moved against its advantage.
    DppoKl { low: f64, high: f64, cap: f64 },
    /// GMPO (Geometric-Mean Policy Optimization, arXiv 2507.20673; verl's `policy_loss =
    /// "geo_mean"`): a sequence's ratio is the geometric mean of its tokens' ratios, each token's
    /// log-ratio clipped to `[−clip_low, clip_high]` (in log space, as verl reads them) on the
    /// side its advantage would push it; `−Ā·exp(mean_t clipped log r_t)`, `Ā` the sequence's
    /// mean advantage, averaged over the step's sequences (verl's `torch.mean`, whatever the
    /// aggregation: the config requires `loss_aggregation = "grpo"`, whose per-sequence token
    /// mean of this constant is the sequence's term).
    GeoMean,
    /// GPG (Group Policy Gradient, verl's `policy_loss = "gpg"`): `−A·log π`, no ratio and no
    /// clip (the on-policy gradient of the surrogate, at every step of an off-policy update).
    Gpg,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PolicyLossConfig {
    pub clip_low: f64,
    pub clip_high: f64,
    /// verl's dual-clip constant `c` for negative advantages (None: off; the clipped surrogate
    /// only).
    pub dual_clip: Option<f64>,
    pub ratio: RatioLevel,
    pub aggregation: Aggregation,
    pub kl: KlEstimator,
    /// β; with 0 no reference log-probs are needed.
    pub kl_coef: f64,
    pub entropy_coef: f64,
    /// The per-token term; `clip_low`, `clip_high` and `dual_clip` shape the clipped one only
    /// (`clip_low` and `clip_high` Clip-Cov's too; the statistics of SAPO and KL-Cov still count
    /// the tokens outside the clip range, as TRL's do SAPO's).
    pub surrogate: Surrogate,
    /// Off-policy sequence masking δ (DeepSeek-V3.2; TRL's `off_policy_mask_threshold`): a
    /// token with a negative advantage in a sequence whose mean `log π_sampler − log π_θ`
    /// (π_θ detached) exceeds δ loses its policy term. None: off.
    pub off_policy_mask: Option<f64>,
}

impl Default for PolicyLossConfig {
    fn default() -> Self {
        PolicyLossConfig {
            clip_low: 0.2,
            clip_high: 0.28,
            dual_clip: None,
            ratio: RatioLevel::Token,
            aggregation: Aggregation::Dapo,
            kl: KlEstimator::K3,
            kl_coef: 0.0,
            entropy_coef: 0.0,
            surrogate: Surrogate::Clip,
            off_policy_mask: None,
        }
    }
}

/// The sizes of the whole optimizer step, which the aggregations divide by.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepTotals {
    pub sequences: usize,
    pub tokens: f64,
    pub micro_batches: usize,
    pub max_completion_length: usize,
}

/// One micro-batch of the policy loss.
pub struct PolicyInputs<'a> {
    /// `[B, T]` log-probs under the current policy (differentiable).
    pub logprobs: &'a Tensor,
    /// `[B, T]` behaviour log-probs recorded at generation.
    pub old_logprobs: &'a Tensor,
    /// `[B, T]` advantages (a sequence's advantage repeated, or token-level).
    pub advantages: &'a Tensor,
    /// `[B, T]` 1 on valid completion tokens.
    pub mask: &'a Tensor,
    /// `[B, T]` reference log-probs (needed when `kl_coef > 0`).
    pub ref_logprobs: Option<&'a Tensor>,
    /// `[B, T]` entropies (needed when `entropy_coef > 0`).
    pub entropy: Option<&'a Tensor>,
    /// `[B, T]` detached weights that multiply each token's policy term, before KL and entropy
    /// are added (TRL's `importance_sampling_ratio`; [`crate::correction`]); None: 1.
    pub importance_weights: Option<&'a Tensor>,
    /// `[B, T]` the sampler's log-probs where they are not `old_logprobs` (a behaviour
    /// correction replaced those): what off-policy sequence masking compares with.
    pub sampler_logprobs: Option<&'a Tensor>,
    /// `[B, T]` 1 on the tokens Clip-Cov or KL-Cov picked ([`crate::covariance::select`]);
    /// needed by those surrogates, ignored by the others.
    pub covariance_selected: Option<&'a Tensor>,
    /// `[B, T]` where KL and entropy count (Lopti restricts them to a token group); the
    /// denominators still use `mask`.
    pub kl_entropy_mask: Option<&'a Tensor>,
    /// The valid tokens of the micro-batch these rows are a piece of (BNPO's denominator), when
    /// it runs in pieces ([`crate::fit`]); None: the rows are the whole micro-batch, and `mask`
    /// counts them.
    pub micro_batch_valid: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct PolicyStats {
    /// Fractions of valid tokens clipped below (`r < 1 − ε_low`, A < 0) and above.
    pub clip_low_frac: f64,
    pub clip_high_frac: f64,
    pub ratio_mean: f64,
    pub ratio_max: f64,
    /// The mean over valid tokens of `log π_behaviour − log π_θ`, the k1 estimate of
    /// KL(behaviour ‖ policy) (verl's `ppo_kl`), and the largest `|log π_θ − log π_behaviour|`:
    /// at a step's first optimizer step on samples of the policy's own version, the gap between
    /// what the sampler recorded and what the learner computes.
    pub behaviour_kl: f64,
    pub logprob_diff_max: f64,
    pub kl_mean: f64,
    pub entropy_mean: f64,
    /// The share of valid tokens off-policy sequence masking took out (0 when off).
    pub off_policy_masked_frac: f64,
    /// The share of valid tokens Clip-Cov or KL-Cov picked (0 for the other surrogates).
    pub covariance_selected_frac: f64,
    /// The valid tokens the statistics cover.
    pub tokens: f64,
}

impl PolicyStats {
    /// The statistics of `self`'s tokens and `other`'s together: token-weighted means, the
    /// larger maximum.
    pub fn merge(self, other: &PolicyStats) -> PolicyStats {
        let tokens = self.tokens + other.tokens;
        let mean = |a: f64, b: f64| (a * self.tokens + b * other.tokens) / tokens.max(1.0);
        PolicyStats {
            clip_low_frac: mean(self.clip_low_frac, other.clip_low_frac),
            clip_high_frac: mean(self.clip_high_frac, other.clip_high_frac),
            ratio_mean: mean(self.ratio_mean, other.ratio_mean),
            ratio_max: self.ratio_max.max(other.ratio_max),
            behaviour_kl: mean(self.behaviour_kl, other.behaviour_kl),
            logprob_diff_max: self.logprob_diff_max.max(other.logprob_diff_max),
            kl_mean: mean(self.kl_mean, other.kl_mean),
            entropy_mean: mean(self.entropy_mean, other.entropy_mean),
            off_policy_masked_frac: mean(self.off_policy_masked_frac, other.off_policy_masked_frac),
            covariance_selected_frac: mean(
                self.covariance_selected_frac,
                other.covariance_selected_frac,
            ),
            tokens,
        }
    }
}

/// A micro-batch's [`PolicyStats`] as device sums, read back by [`PendingStats::read`] after
/// the backward is queued (see [`DeviceSums`]).
pub struct PendingStats {
    /// valid tokens, tokens clipped low, tokens clipped high, Σ ratio, max ratio, Σ KL,
    /// Σ entropy, Σ (behaviour − policy log-prob), max |policy − behaviour log-prob|, tokens
    /// off-policy masked, tokens Clip-Cov or KL-Cov picked (all over valid tokens).
    sums: DeviceSums,
}

impl PendingStats {
    pub fn read(&self) -> Result<PolicyStats> {
        let s = self.sums.read()?;
        let n = s[0];
        let mean = |x: f64| x / n.max(1.0);
        Ok(PolicyStats {
            clip_low_frac: mean(s[1]),
            clip_high_frac: mean(s[2]),
            ratio_mean: mean(s[3]),
            ratio_max: s[4],
            kl_mean: mean(s[5]),
            entropy_mean: mean(s[6]),
            behaviour_kl: mean(s[7]),
            logprob_diff_max: s[8],
            off_policy_masked_frac: mean(s[9]),
            covariance_selected_frac: mean(s[10]),
            tokens: n,
        })
    }
}

/// The loss of one micro-batch (already divided so that summing over the micro-batches of a
/// step gives the step's loss) and its statistics, still on the device.
pub fn policy_loss(
    x: &PolicyInputs,
    c: &PolicyLossConfig,
    totals: &StepTotals,
) -> Result<(Tensor, PendingStats)> {
    let mask = x.mask;
    let valid = mask.sum_all()?; // the micro-batch's valid tokens
    let sum = |t: &Tensor| -> Result<Tensor> { Ok((t * mask)?.sum_all()?) };
    let zero = || Tensor::zeros((), DType::F32, mask.device());
    let log_diff = (x.logprobs - x.old_logprobs)?; // [B, T]
    let log_ratio = log_diff.clamp(-20f32, 20f32)?;
    let log_ratio = match c.ratio {
        RatioLevel::Token => log_ratio,
        RatioLevel::Sequence => {
            let per_seq = (log_ratio * mask)?
                .sum_keepdim(1)?
                .broadcast_div(&mask.sum_keepdim(1)?.clamp(1f32, f32::MAX)?)?;
            per_seq.broadcast_as(mask.shape())?.contiguous()?
        }
    };
    let ratio = log_ratio.exp()?; // [B, T]
    let a = x.advantages;
    let selected = || {
        x.covariance_selected.ok_or_else(|| {
            crate::error::LearnerError::Invalid(
                "Clip-Cov and KL-Cov need the step's covariance selection".into(),
            )
        })
    };
    let clipped_surrogate = || -> Result<Tensor> {
        let clipped = ratio.clamp((1.0 - c.clip_low) as f32, (1.0 + c.clip_high) as f32)?;
        // max(−A·r, −A·clip(r))
        Ok((ratio.broadcast_mul(a)?.neg()?).maximum(&clipped.broadcast_mul(a)?.neg()?)?)
    };
    // DPPO's trust region, kept for its statistics
    let mut region = None;
    let pg = match c.surrogate {
        // pg = −A·sg(min(r, cap))·log π·inside
        Surrogate::DppoTv { low, high, cap } | Surrogate::DppoKl { low, high, cap } => {
            let kl = matches!(c.surrogate, Surrogate::DppoKl { .. });
            let inside = trust_region(x, low, high, kl)?;
            let weight = ratio.clamp(0f32, cap as f32)?.detach();
            let pg = ((weight.broadcast_mul(a)? * x.logprobs)?.neg()? * &inside)?;
            region = Some(inside);
            pg
        }
        // pg = −A·log π
        Surrogate::Gpg => (a * x.logprobs)?.neg()?,
        // pg = −Ā·exp(Σ_t m_t / n) on each of the sequence's tokens, m_t the log-ratio clipped
        // at `clip_high` where A > 0, at `−clip_low` where A < 0, 0 where A = 0
        Surrogate::GeoMean => {
            let high = Tensor::full(c.clip_high as f32, a.shape(), a.device())?;
            let low = Tensor::full(-c.clip_low as f32, a.shape(), a.device())?;
            let up = log_ratio.gt(&high)?.where_cond(&high, &log_ratio)?;
            let down = log_ratio.lt(&low)?.where_cond(&low, &log_ratio)?;
            let m = a
                .gt(0f32)?
                .where_cond(&up, &a.lt(0f32)?.where_cond(&down, &a.zeros_like()?)?)?; // [B, T]
            let n = mask.sum_keepdim(1)?.clamp(1f32, f32::MAX)?; // [B, 1]
            let geo = (m * mask)?.sum_keepdim(1)?.broadcast_div(&n)?.exp()?; // [B, 1]
            let a_seq = (a * mask)?.sum_keepdim(1)?.broadcast_div(&n)?; // [B, 1]
            (a_seq * geo)?
                .neg()?
                .broadcast_as(mask.shape())?
                .contiguous()?
        }
        // pg = −sg(min(r, ε_max))·A·log π
        Surrogate::Cispo { max } => {
            let weight = ratio.clamp(0f32, max as f32)?.detach();
            (weight.broadcast_mul(a)? * x.logprobs)?.neg()?
        }
        // pg = −σ(τ·(r − 1))·(4/τ)·A, τ by the advantage's sign
        Surrogate::Sapo { tau_pos, tau_neg } => {
            let positive = a.gt(0f32)?;
            let tau = positive.where_cond(
                &Tensor::full(tau_pos as f32, a.shape(), a.device())?,
                &Tensor::full(tau_neg as f32, a.shape(), a.device())?,
            )?; // [B, T]
                // σ(z) = 1 / (1 + e^−z), z ≥ −τ since r ≥ 0: no overflow
            let gate = ((((&ratio - 1.0)? * &tau)?.neg()?.exp()? + 1.0)?).recip()?;
            ((gate * 4.0)?.div(&tau)? * a)?.neg()?
        }
        Surrogate::Clip => clipped_surrogate()?,
        // pg = max(−A·r, −A·clip(r))·(1 − selected)
        Surrogate::ClipCov { .. } => (clipped_surrogate()? * (1.0 - selected()?)?)?,
        // pg = −A·r + coef·selected·|log π_θ − log π_old|
        Surrogate::KlCov { coef, .. } => {
            let penalty = ((log_diff.abs()? * selected()?)? * coef)?;
            (ratio.broadcast_mul(a)?.neg()? + penalty)?
        }
    };
    let covariance_selected = match c.surrogate {
        Surrogate::ClipCov { .. } | Surrogate::KlCov { .. } => sum(selected()?)?,
        _ => zero()?,
    };
    let pg = match c.dual_clip {
        Some(cap) if c.surrogate == Surrogate::Clip => {
            let capped = pg.minimum(&(a.neg()? * cap)?)?;
            let negative = a.lt(0f32)?;
            negative.where_cond(&capped, &pg)?
        }
        _ => pg,
    };
    // off-policy sequence masking: keep = A ≥ 0 or the sequence's mean sampler KL ≤ δ
    let (pg, off_policy_masked) = match c.off_policy_mask {
        Some(delta) => {
            let sampler = x.sampler_logprobs.unwrap_or(x.old_logprobs);
            let kl = ((sampler - x.logprobs.detach())? * mask)?
                .sum_keepdim(1)?
                .broadcast_div(&mask.sum_keepdim(1)?.clamp(1f32, f32::MAX)?)?; // [B, 1]
            let low_kl = kl.le(delta as f32)?.to_dtype(DType::F32)?;
            let keep = a
                .ge(0f32)?
                .to_dtype(DType::F32)?
                .broadcast_maximum(&low_kl)?; // [B, T]
            let masked = sum(&(1.0 - &keep)?)?;
            ((pg * keep)?, masked)
        }
        None => (pg, zero()?),
    };
    let pg = match x.importance_weights {
        Some(w) => (pg * w)?,
        None => pg,
    };
    let aux_mask = x.kl_entropy_mask.unwrap_or(mask);
    let mut per_token = pg;
    let mut kl_sum = zero()?;
    if c.kl_coef != 0.0 {
        let reference = x.ref_logprobs.ok_or_else(|| {
            crate::error::LearnerError::Invalid("kl_coef > 0 needs reference log-probs".into())
        })?;
        let kl = kl_term(x.logprobs, reference, c.kl)?;
        kl_sum = sum(&kl.detach())?;
        per_token = (per_token + ((kl * aux_mask)? * c.kl_coef)?)?;
    }
    let mut entropy_sum = zero()?;
    if let Some(h) = x.entropy {
        entropy_sum = sum(&h.detach())?;
        if c.entropy_coef != 0.0 {
            per_token = (per_token - ((h * aux_mask)? * c.entropy_coef)?)?;
        }
    }
    let masked = (per_token * mask)?; // [B, T]
    let loss = match c.aggregation {
        Aggregation::Grpo => {
            let per_seq = masked.sum(1)?.div(&mask.sum(1)?.clamp(1f32, f32::MAX)?)?; // [B]
            (per_seq.sum_all()? / totals.sequences.max(1) as f64)?
        }
        Aggregation::Bnpo => {
            let per_micro_batch = match x.micro_batch_valid {
                // a piece's share of its micro-batch's mean
                Some(n) => (masked.sum_all()? / n.max(1.0))?,
                // this micro-batch's tokens, divided by on the device
                None => masked.sum_all()?.div(&valid.clamp(1f32, f32::MAX)?)?,
            };
            (per_micro_batch / totals.micro_batches.max(1) as f64)?
        }
        Aggregation::Dapo => (masked.sum_all()? / totals.tokens.max(1.0))?,
        Aggregation::SeqSum => (masked.sum_all()? / totals.sequences.max(1) as f64)?,
        Aggregation::DrGrpo => {
            (masked.sum_all()?
                / (totals.sequences.max(1) * totals.max_completion_length.max(1)) as f64)?
        }
    };
    let ratio = ratio.detach();
    let (low, high) = match (c.surrogate, region) {
        // DPPO: the tokens outside its trust region, by their advantage's sign
        (_, Some(inside)) => {
            let outside = (1.0 - inside)?;
            let positive = a.gt(0f32)?.to_dtype(DType::F32)?;
            ((&outside * (1.0 - &positive)?)?, (outside * positive)?)
        }
        // GPG has no ratio to clip
        (Surrogate::Gpg, None) => (ratio.zeros_like()?, ratio.zeros_like()?),
        // GMPO: the tokens whose log-ratio lies outside [−clip_low, clip_high], by their
        // advantage's sign (verl's `pg_clipfrac_lower` / `pg_clipfrac`)
        (Surrogate::GeoMean, None) => {
            let lr = log_ratio.detach();
            let outside = (lr.lt(-c.clip_low as f32)?.to_dtype(DType::F32)?
                + lr.gt(c.clip_high as f32)?.to_dtype(DType::F32)?)?;
            (
                outside.broadcast_mul(&a.lt(0f32)?.to_dtype(DType::F32)?)?,
                outside.broadcast_mul(&a.gt(0f32)?.to_dtype(DType::F32)?)?,
            )
        }
        // CISPO clips no token's gradient; `high` counts the weights capped
        (Surrogate::Cispo { max }, None) => (
            ratio.zeros_like()?,
            ratio.gt(max as f32)?.to_dtype(DType::F32)?,
        ),
        _ => (
            ratio
                .lt((1.0 - c.clip_low) as f32)?
                .to_dtype(DType::F32)?
                .broadcast_mul(&a.lt(0f32)?.to_dtype(DType::F32)?)?,
            ratio
                .gt((1.0 + c.clip_high) as f32)?
                .to_dtype(DType::F32)?
                .broadcast_mul(&a.gt(0f32)?.to_dtype(DType::F32)?)?,
        ),
    };
    let ratio_max = (&ratio * mask)?.flatten_all()?.max(D::Minus1)?;
    let log_diff = log_diff.detach();
    let diff_max = (log_diff.abs()? * mask)?.flatten_all()?.max(D::Minus1)?;
    let sums = DeviceSums::stack(&[
        valid,
        sum(&low)?,
        sum(&high)?,
        sum(&ratio)?,
        ratio_max,
        kl_sum,
        entropy_sum,
        sum(&log_diff.neg()?)?,
        diff_max,
        off_policy_masked,
        covariance_selected,
    ])?;
    Ok((loss, PendingStats { sums }))
}

/// DPPO's trust region `[B, T]`: 1 on the tokens whose probability (`kl`: its binary KL) moved
/// from π_old by at most `high` where A > 0 and `low` elsewhere, as verl's
/// `compute_policy_loss_dppo_tv` / `_kl` bound them; 0 on the others.
fn trust_region(x: &PolicyInputs, low: f64, high: f64, kl: bool) -> Result<Tensor> {
    let (lp, old) = (x.logprobs.detach(), x.old_logprobs);
    let (p, p_old) = (lp.exp()?, old.exp()?);
    let moved = (&p - &p_old)?; // [B, T]
    let (up_ok, down_ok) = if kl {
        // p_old·(log p_old − log p) + (1 − p_old)·log((1 − p_old + 1e-8) / (1 − p + 1e-8))
        let rest = ((1.0 - &p_old)? + 1e-8)?
            .log()?
            .sub(&((1.0 - &p)? + 1e-8)?.log()?)?;
        let bkl = ((&p_old * (old - &lp)?)? + ((1.0 - &p_old)? * rest)?)?;
        // a token that moved against its advantage is always inside
        let fell = moved.le(0f32)?.to_dtype(DType::F32)?;
        let rose = moved.ge(0f32)?.to_dtype(DType::F32)?;
        (
            bkl.le(high as f32)?.to_dtype(DType::F32)?.maximum(&fell)?,
            bkl.le(low as f32)?.to_dtype(DType::F32)?.maximum(&rose)?,
        )
    } else {
        (
            moved.le(high as f32)?.to_dtype(DType::F32)?,
            moved.ge(-low as f32)?.to_dtype(DType::F32)?,
        )
    };
    Ok(x.advantages.gt(0f32)?.where_cond(&up_ok, &down_ok)?)
}

/// Per-token KL estimate between the policy and the reference at the sampled tokens.
pub fn kl_term(logprobs: &Tensor, ref_logprobs: &Tensor, k: KlEstimator) -> Result<Tensor> {
    let x = (ref_logprobs - logprobs)?; // log(π_ref / π_θ)
    Ok(match k {
        KlEstimator::K1 => x.neg()?,
        KlEstimator::K2 => (x.sqr()? * 0.5)?,
        KlEstimator::K3 => {
            let x = x.clamp(-20f32, 20f32)?;
            ((x.exp()? - &x)? - 1.0)?.clamp(-10f32, 10f32)?
        }
    })
}
