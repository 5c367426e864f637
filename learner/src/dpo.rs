//! The DPO family (spec §5.6, TRL's `DPOTrainer`): sigmoid (with cDPO label smoothing), IPO on
//! length-averaged log-ratios, robust DPO, hinge (SLiC), EXO, NCA, SPPO (hard), APO-zero and
//! APO-down, DiscoPOP, the reference-free SimPO (TRL's `CPOTrainer`), RPO's negative
//! log-likelihood term on the chosen completions, and their implicit-reward metrics.

use candle_core::{DType, Tensor};
use model::Weights;
use serde::{Deserialize, Serialize};

use crate::coupled::{coupled_loss, RunningMean};
use crate::device_sums::DeviceSums;
use crate::error::{LearnerError, Result};
use crate::fit::{by_cost, fitted, halving, padded_tokens};
use crate::optim::AdamW;
use crate::step::{
    cheapest_order, forward_positions, in_given_order, pack, packing_rows, reordered, PackedCost,
    Sequence,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DpoLoss {
    /// `−(1−ε)·log σ(βΔ) − ε·log σ(−βΔ)` (ε = 0: DPO; ε > 0: cDPO).
    Sigmoid,
    /// `(Δ̄ − 1/(2β))²` on length-averaged log-ratios.
    Ipo,
    /// `[−(1−ε)·log σ(βΔ) + ε·log σ(−βΔ)] / (1 − 2ε)`.
    Robust,
    /// `max(0, 1 − βΔ)`.
    Hinge,
    /// EXO (TRL's `exo_pair`): `σ(βΔ)·(log σ(βΔ) − log(1−ε)) + σ(−βΔ)·(log σ(−βΔ) − log ε)`,
    /// ε = `label_smoothing` (1e-3 when 0).
    ExoPair,
    /// NCA (`nca_pair`): `−log σ(βh_w) − ½·log σ(−βh_w) − ½·log σ(−βh_l)`.
    NcaPair,
    /// SPPO with hard probabilities (`sppo_hard`): `(h_w − 1/(2β))² + (h_l + 1/(2β))²`.
    SppoHard,
    /// APO-zero (`apo_zero`): `1 − σ(βh_w) + σ(βh_l)`.
    ApoZero,
    /// APO-down (`apo_down`): `σ(βh_w) + 1 − σ(βΔ)`.
    ApoDown,
    /// DiscoPOP (`discopop`): `−log σ(βΔ)·(1 − m) + e^{−βΔ}·m`, `m = σ(βΔ/τ)`.
    Discopop,
    /// SimPO (TRL's `CPOTrainer`, `loss_type = "simpo"`), reference-free on length-averaged
    /// log-probs: `−(1−ε)·log σ(βu) − ε·log σ(−βu)`, `u = ā_w − ā_l − γ/β`.
    Simpo,
    /// AOT (`aot`): the step's policy log-ratios `log π(y_w) − log π(y_l)` and the reference's,
    /// each sorted, compared rank by rank with the sigmoid loss ([`crate::coupled`]).
    Aot,
    /// AOT-pair (`aot_pair`): the step's chosen log-ratios `h_w` and rejected ones `h_l`, each
    /// sorted, rank by rank ([`crate::coupled`]).
    AotPair,
    /// BCO-pair (`bco_pair`): `−log σ(βh_w − δ) − log σ(−(βh_l − δ))`, δ a running mean of the
    /// steps' mean implicit reward ([`crate::coupled`]).
    BcoPair,
}

impl DpoLoss {
    /// SimPO needs no reference model.
    pub fn reference_free(self) -> bool {
        self == DpoLoss::Simpo
    }

    /// Whether a pair's term depends on the step's other pairs ([`crate::coupled`]).
    pub fn couples_pairs(self) -> bool {
        matches!(self, DpoLoss::Aot | DpoLoss::AotPair | DpoLoss::BcoPair)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DpoConfig {
    pub loss: DpoLoss,
    pub beta: f64,
    pub label_smoothing: f64,
    /// SimPO's target margin γ (TRL's `simpo_gamma`).
    pub simpo_gamma: f64,
    /// DiscoPOP's temperature τ (TRL's `discopop_tau`).
    pub discopop_tau: f64,
    /// RPO (TRL's `rpo_alpha`): the loss gains α × the negative log-likelihood of the chosen
    /// completions, a mean over their tokens; 0: off.
    pub rpo_alpha: f64,
}

impl Default for DpoConfig {
    fn default() -> Self {
        DpoConfig {
            loss: DpoLoss::Sigmoid,
            beta: 0.1,
            label_smoothing: 0.0,
            simpo_gamma: 0.5,
            discopop_tau: 0.05,
            rpo_alpha: 0.0,
        }
    }
}

/// Summed completion log-probs of a micro-batch of pairs, each `[B]`.
pub struct PairLogprobs<'a> {
    pub chosen: &'a Tensor,
    pub rejected: &'a Tensor,
    pub ref_chosen: &'a Tensor,
    pub ref_rejected: &'a Tensor,
    /// Completion token counts (IPO's length average).
    pub chosen_tokens: &'a Tensor,
    pub rejected_tokens: &'a Tensor,
}

/// A micro-batch's [`DpoStats`] as device sums, read back by [`PendingDpoStats::read`] after
/// the backward is queued (see [`DeviceSums`]).
pub struct PendingDpoStats {
    /// pairs whose chosen reward beats the rejected one, Σ margin, Σ chosen reward, Σ rejected
    /// reward
    sums: DeviceSums,
    pairs: usize,
}

impl PendingDpoStats {
    pub fn read(&self) -> Result<DpoStats> {
        let s = self.sums.read()?;
        Ok(DpoStats {
            reward_accuracy: s[0],
            margin: s[1],
            chosen_reward: s[2],
            rejected_reward: s[3],
            pairs: self.pairs as f64,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct DpoStats {
    /// Sums over the micro-batch's pairs (divide by the pair count).
    pub reward_accuracy: f64,
    pub margin: f64,
    pub chosen_reward: f64,
    pub rejected_reward: f64,
    pub pairs: f64,
}

/// `log σ(x)`: `−log(1 + e^{−x})` for x ≥ 0 and `x − log(1 + e^{x})` below, written as
/// `b − log(1 + e^{−a}) − log(1 + e^{b}) + log 2` with `a = max(x, 0)`, `b = min(x, 0)` split by
/// one comparison. No exponent is positive, and the gradient at 0 is σ(0) = ½: the usual
/// `min(x, 0) − log(1 + e^{−|x|})` gets 1 there from autograd's subgradients of `min` and
/// `|x|`, which doubled the gradient of every pair at the reference (margin exactly 0).
fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    let zero = x.zeros_like()?;
    let upper = x.ge(&zero)?;
    let a = upper.where_cond(x, &zero)?;
    let b = upper.where_cond(&zero, x)?;
    let soft = |t: Tensor| -> Result<Tensor> { Ok((t.exp()? + 1.0)?.log()?) };
    let out = ((&b - soft(a.neg()?)?)? - soft(b)?)?;
    Ok((out + std::f64::consts::LN_2)?)
}

pub(crate) fn sigmoid(x: &Tensor) -> Result<Tensor> {
    Ok(log_sigmoid(x)?.exp()?)
}

/// The loss of a micro-batch: the sum over its pairs divided by `total_pairs` (the pairs of the
/// whole optimizer step), so micro-batch losses add up to the step's mean, plus RPO's term over
/// the `total_chosen_tokens` of the step's chosen completions; and its implicit-reward
/// statistics, still on the device.
pub fn dpo_loss(
    x: &PairLogprobs,
    c: &DpoConfig,
    total_pairs: usize,
    total_chosen_tokens: usize,
) -> Result<(Tensor, PendingDpoStats)> {
    let eps = c.label_smoothing;
    if c.loss == DpoLoss::Robust && !(0.0..0.5).contains(&eps) {
        return Err(LearnerError::Invalid(
            "robust DPO needs 0 ≤ label_smoothing < 0.5".into(),
        ));
    }
    let (h_w, h_l) = if c.loss == DpoLoss::Simpo {
        // SimPO's log-probs are length averages, and it has no reference
        (
            x.chosen.div(x.chosen_tokens)?,
            x.rejected.div(x.rejected_tokens)?,
        )
    } else {
        ((x.chosen - x.ref_chosen)?, (x.rejected - x.ref_rejected)?) // [B]
    };
    let delta = (&h_w - &h_l)?;
    let z = (&delta * c.beta)?;
    // −(1−ε)·log σ(z) − ε·log σ(−z)
    let smoothed = |z: &Tensor| -> Result<Tensor> {
        let pos = (log_sigmoid(z)? * -(1.0 - eps))?;
        Ok(if eps != 0.0 {
            (pos - (log_sigmoid(&z.neg()?)? * eps)?)?
        } else {
            pos
        })
    };
    let per_pair = match c.loss {
        DpoLoss::Sigmoid => smoothed(&z)?,
        DpoLoss::Simpo => smoothed(&(z - c.simpo_gamma)?)?,
        DpoLoss::ExoPair => {
            let e = if eps == 0.0 { 1e-3 } else { eps };
            let pos = (sigmoid(&z)? * (log_sigmoid(&z)? - (1.0 - e).ln())?)?;
            let neg = (sigmoid(&z.neg()?)? * (log_sigmoid(&z.neg()?)? - e.ln())?)?;
            (pos + neg)?
        }
        DpoLoss::NcaPair => {
            let (w, l) = ((&h_w * c.beta)?, (&h_l * c.beta)?);
            let a = log_sigmoid(&w)?.neg()?;
            ((a - (log_sigmoid(&w.neg()?)? * 0.5)?)? - (log_sigmoid(&l.neg()?)? * 0.5)?)?
        }
        DpoLoss::SppoHard => {
            let half = 0.5 / c.beta;
            ((&h_w - half)?.sqr()? + (&h_l + half)?.sqr()?)?
        }
        DpoLoss::ApoZero => {
            let w = sigmoid(&(&h_w * c.beta)?)?;
            ((w.neg()? + 1.0)? + sigmoid(&(&h_l * c.beta)?)?)?
        }
        DpoLoss::ApoDown => {
            let w = sigmoid(&(&h_w * c.beta)?)?;
            (w + (sigmoid(&z)?.neg()? + 1.0)?)?
        }
        DpoLoss::Discopop => {
            let m = sigmoid(&(&z / c.discopop_tau)?)?;
            let logistic = (log_sigmoid(&z)?.neg()? * (m.neg()? + 1.0)?)?;
            (logistic + (z.neg()?.exp()? * m)?)?
        }
        DpoLoss::Robust => {
            let pos = (log_sigmoid(&z)? * -(1.0 - eps))?;
            ((pos + (log_sigmoid(&z.neg()?)? * eps)?)? / (1.0 - 2.0 * eps))?
        }
        DpoLoss::Hinge => (z.neg()? + 1.0)?.relu()?,
        DpoLoss::Ipo => {
            let avg = ((h_w.div(x.chosen_tokens)? - h_l.div(x.rejected_tokens)?)?
                - 1.0 / (2.0 * c.beta))?;
            avg.sqr()?
        }
        DpoLoss::Aot | DpoLoss::AotPair | DpoLoss::BcoPair => {
            return Err(LearnerError::Invalid(format!(
                "{:?} couples the step's pairs: see coupled::coupled_loss",
                c.loss
            )))
        }
    };
    let loss = (per_pair.sum_all()? / total_pairs.max(1) as f64)?;
    Ok((
        with_rpo(loss, x.chosen, c, total_chosen_tokens)?,
        implicit_rewards(&h_w, &h_l, c.beta)?,
    ))
}

/// `loss` plus RPO's term: α × the negative log-likelihood of the chosen completions, a mean
/// over the `total_chosen_tokens` of the step's.
fn with_rpo(
    loss: Tensor,
    chosen: &Tensor,
    c: &DpoConfig,
    total_chosen_tokens: usize,
) -> Result<Tensor> {
    if c.rpo_alpha == 0.0 {
        return Ok(loss);
    }
    let scale = -c.rpo_alpha / total_chosen_tokens.max(1) as f64;
    Ok((loss + (chosen.sum_all()? * scale)?)?)
}

/// The micro-batch's implicit-reward statistics from its log-ratios `[B]`, on the device.
fn implicit_rewards(h_w: &Tensor, h_l: &Tensor, beta: f64) -> Result<PendingDpoStats> {
    let r_w = (h_w.detach() * beta)?;
    let r_l = (h_l.detach() * beta)?;
    let sums = DeviceSums::stack(&[
        r_w.gt(&r_l)?.to_dtype(DType::F32)?.sum_all()?,
        (&r_w - &r_l)?.sum_all()?,
        r_w.sum_all()?,
        r_l.sum_all()?,
    ])?;
    let pairs = r_w.dim(0)?;
    Ok(PendingDpoStats { sums, pairs })
}

/// One preference pair, tokenized: the completions end with their end-of-sequence token.
#[derive(Debug, Clone, PartialEq)]
pub struct Pair {
    pub prompt: Vec<u32>,
    pub chosen: Vec<u32>,
    pub rejected: Vec<u32>,
}

/// Each pair's row length (prompt and its longer completion): a pair is two rows of it.
fn pair_lengths(pairs: &[Pair]) -> Vec<usize> {
    pairs
        .iter()
        .map(|p| p.prompt.len() + p.chosen.len().max(p.rejected.len()))
        .collect()
}

/// Splits pairs into micro-batches that hold at most `budget` tokens ([`pair_tokens`]).
fn pair_batches(pairs: &[Pair], budget: usize) -> Vec<std::ops::Range<usize>> {
    by_cost(&pair_tokens(pairs), 0..pairs.len(), budget)
}

/// The tokens a micro-batch of `pairs[range]` holds on the device: its rows packed
/// ([`packed_tokens`]: the prompt once, then both completions) or padded (2 rows per pair ×
/// the longest row), as [`crate::step::set_pack_rows`] says.
fn pair_tokens(pairs: &[Pair]) -> impl Fn(std::ops::Range<usize>) -> usize {
    let lengths = pair_lengths(pairs);
    let packed = packing_rows().then(|| PackedCost::new(&pair_rows(pairs)));
    move |r| match &packed {
        Some(cost) => cost.tokens(2 * r.start..2 * r.end),
        None => padded_tokens(&lengths, 2, r),
    }
}

/// The rows chosen₀, rejected₀, chosen₁, … of `pairs`.
fn pair_rows(pairs: &[Pair]) -> Vec<Sequence> {
    pairs
        .iter()
        .flat_map(|p| {
            [&p.chosen, &p.rejected]
                .map(|c| Sequence::new(p.prompt.clone(), c.clone(), vec![0.0; c.len()], 0.0))
        })
        .collect()
}

/// The order in which micro-batches of `budget` padded tokens take `pairs`: the longer row of
/// each pair shortest first where that runs fewer positions (padding included, a prompt once
/// for its rows in a micro-batch) than the order they come in; None to keep that order (see
/// [`crate::step::by_length`]).
fn pairs_by_length(pairs: &[Pair], budget: usize) -> Option<Vec<usize>> {
    let lengths = pair_lengths(pairs);
    let positions = |order: Option<&[usize]>| {
        let ordered = match order {
            Some(order) => reordered(pairs, order),
            None => pairs.to_vec(),
        };
        pair_batches(&ordered, budget)
            .into_iter()
            .map(|r| forward_positions(&pair_rows(&ordered[r])))
            .sum()
    };
    cheapest_order(pairs.len(), &[&|i| lengths[i]], positions)
}

/// The summed completion log-probs `[n]` of `seqs` (one row each) under `w`, at temperature 1
/// (differentiable when `w` holds `Var`s).
pub(crate) fn completion_logprobs(w: &Weights, seqs: &[Sequence]) -> Result<Tensor> {
    let device = w.embed_tokens.device().clone();
    let p = pack(seqs, &device)?;
    let lp = p.logprobs(w, 1.0, false)?;
    Ok((lp.logprobs * lp.mask)?.sum(1)?)
}

/// `[2n]` rows chosen₀, rejected₀, chosen₁, … of a micro-batch, and the summed completion
/// log-probs `[n]`, `[n]` under `w` (differentiable when `w` holds `Var`s).
fn summed_logprobs(w: &Weights, pairs: &[Pair]) -> Result<(Tensor, Tensor)> {
    let sums = completion_logprobs(w, &pair_rows(pairs))?.reshape((pairs.len(), 2))?; // [n, 2]
    Ok((
        sums.narrow(1, 0, 1)?.squeeze(1)?,
        sums.narrow(1, 1, 1)?.squeeze(1)?,
    ))
}

/// The reference model's summed log-probs of every pair's (chosen, rejected), computed once
/// before training and cached by the caller.
pub fn reference_logprobs(w: &Weights, pairs: &[Pair], budget: usize) -> Result<Vec<(f32, f32)>> {
    let w = w.detach();
    let order = pairs_by_length(pairs, budget);
    let ordered: Vec<Pair>;
    let pairs = match &order {
        Some(order) => {
            ordered = reordered(pairs, order);
            &ordered[..]
        }
        None => pairs,
    };
    let mut out = Vec::with_capacity(pairs.len());
    let mut run = |range: std::ops::Range<usize>| -> Result<Vec<(f32, f32)>> {
        let (c, r) = summed_logprobs(&w, &pairs[range])?;
        Ok(c.to_vec1::<f32>()?
            .into_iter()
            .zip(r.to_vec1::<f32>()?)
            .collect())
    };
    for range in pair_batches(pairs, budget) {
        // no gradient: a micro-batch that does not fit in device memory runs in halves
        out.extend(halving(range, &mut run)?);
    }
    // back in the order the pairs came in
    Ok(match order {
        Some(order) => in_given_order(out, &order),
        None => out,
    })
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct DpoMetrics {
    pub loss: f64,
    /// Means over the step's pairs.
    pub reward_accuracy: f64,
    pub margin: f64,
    pub chosen_reward: f64,
    pub rejected_reward: f64,
    pub grad_norm: f64,
    pub skipped: bool,
    /// Times the step ran again after running out of device memory ([`crate::fit`]).
    pub memory_retries: usize,
}

/// One optimizer step of the DPO family on `pairs` with their cached reference log-probs. The
/// losses that couple the step's pairs ([`crate::coupled`]) take one pass without gradient first
/// and update BCO's running mean `bco`.
#[allow(clippy::too_many_arguments)]
pub fn dpo_step(
    policy: &Weights,
    opt: &mut AdamW,
    pairs: &[Pair],
    reference: &[(f32, f32)],
    cfg: &DpoConfig,
    bco: &mut RunningMean,
    budget: usize,
    lr: f64,
) -> Result<DpoMetrics> {
    if pairs.len() != reference.len() || pairs.is_empty() {
        return Err(LearnerError::Invalid(
            "DPO needs one cached reference pair per preference pair".into(),
        ));
    }
    let device = policy.embed_tokens.device().clone();
    let step_chosen_tokens: usize = pairs.iter().map(|p| p.chosen.len()).sum();
    // the longer rows shortest first where that pads less: the loss is a mean over the pairs,
    // each with its own reference
    let ordered: (Vec<Pair>, Vec<(f32, f32)>);
    let (pairs, reference) = match pairs_by_length(pairs, budget) {
        Some(order) => {
            ordered = (reordered(pairs, &order), reordered(reference, &order));
            (&ordered.0[..], &ordered.1[..])
        }
        None => (pairs, reference),
    };
    // the coupled losses: the step's loss and each log-prob's gradient, from a pass without one
    let coupled = match cfg.loss.couples_pairs() {
        true => {
            let now = reference_logprobs(policy, pairs, budget)?;
            let wide = |x: f32| f64::from(x);
            let (chosen, rejected): (Vec<f64>, Vec<f64>) =
                now.iter().map(|&(c, r)| (wide(c), wide(r))).unzip();
            let refs: Vec<(f64, f64)> =
                reference.iter().map(|&(c, r)| (wide(c), wide(r))).collect();
            let (loss, g_w, g_l) = coupled_loss(&chosen, &rejected, &refs, cfg, bco)
                .ok_or_else(|| LearnerError::Invalid("not a coupled DPO loss".into()))?;
            if !loss.is_finite() {
                return Ok(DpoMetrics {
                    loss,
                    skipped: true,
                    ..Default::default()
                });
            }
            let nll =
                -cfg.rpo_alpha * chosen.iter().sum::<f64>() / step_chosen_tokens.max(1) as f64;
            Some((loss + nll, g_w, g_l))
        }
        false => None,
    };
    let mut m = fitted(
        opt,
        pairs.len(),
        &pair_tokens(pairs),
        budget,
        |opt, plan| {
            let mut m = DpoMetrics {
                memory_retries: plan.retries,
                ..Default::default()
            };
            for piece in plan.pieces() {
                let mb = &pairs[piece.range.clone()];
                let (chosen, rejected) = summed_logprobs(policy, mb)?;
                let refs = &reference[piece.range.clone()];
                let vec = |f: &dyn Fn(usize) -> f32| -> Result<Tensor> {
                    Ok(Tensor::from_vec(
                        (0..mb.len()).map(f).collect(),
                        mb.len(),
                        &device,
                    )?)
                };
                let ref_chosen = vec(&|i| refs[i].0)?;
                let ref_rejected = vec(&|i| refs[i].1)?;
                let chosen_tokens = vec(&|i| mb[i].chosen.len() as f32)?;
                let rejected_tokens = vec(&|i| mb[i].rejected.len() as f32)?;
                let x = PairLogprobs {
                    chosen: &chosen,
                    rejected: &rejected,
                    ref_chosen: &ref_chosen,
                    ref_rejected: &ref_rejected,
                    chosen_tokens: &chosen_tokens,
                    rejected_tokens: &rejected_tokens,
                };
                let (loss, pending) = match &coupled {
                    // Σ g·log π: the coupled loss's gradient on this micro-batch's log-probs
                    Some((_, g_w, g_l)) => {
                        let g = |g: &[f64]| vec(&|i| g[piece.range.start + i] as f32);
                        let linear = ((&chosen * g(g_w)?)?.sum_all()?
                            + (&rejected * g(g_l)?)?.sum_all()?)?;
                        let linear = with_rpo(linear, &chosen, cfg, step_chosen_tokens)?;
                        let h_w = (&chosen - &ref_chosen)?;
                        let h_l = (&rejected - &ref_rejected)?;
                        (linear, implicit_rewards(&h_w, &h_l, cfg.beta)?)
                    }
                    None => dpo_loss(&x, cfg, pairs.len(), step_chosen_tokens)?,
                };
                let (value, done) = opt.backward(&loss)?;
                if done.is_none() {
                    m.skipped = true;
                    m.loss = value;
                    return Ok(m);
                }
                let s = pending.read()?;
                m.loss += value; // a coupled loss's value is the host's, set below
                m.reward_accuracy += s.reward_accuracy;
                m.margin += s.margin;
                m.chosen_reward += s.chosen_reward;
                m.rejected_reward += s.rejected_reward;
            }
            Ok(m)
        },
    )?;
    if m.skipped {
        return Ok(m);
    }
    if let Some((loss, _, _)) = &coupled {
        m.loss = *loss;
    }
    let n = pairs.len() as f64;
    m.reward_accuracy /= n;
    m.margin /= n;
    m.chosen_reward /= n;
    m.rejected_reward /= n;
    let s = opt.step(lr)?;
    m.grad_norm = s.grad_norm;
    m.skipped = s.skipped;
    Ok(m)
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::log_sigmoid;

    #[test]
    fn log_sigmoid_and_its_gradient_hold_everywhere_including_zero() {
        let xs = [-200.0f32, -30.0, -1.5, -1e-3, 0.0, 1e-3, 0.7, 30.0, 200.0];
        let x = Var::new(&xs[..], &Device::Cpu).unwrap();
        let y = log_sigmoid(x.as_tensor()).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        let values = y.to_vec1::<f32>().unwrap();
        let slopes = grads.get(x.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        for ((&x, v), g) in xs.iter().zip(values).zip(slopes) {
            let x = f64::from(x);
            // log σ(x) = −log(1 + e^{−x}); its derivative σ(−x) = 1 / (1 + e^{x})
            let want = if x >= 0.0 {
                -(-x).exp().ln_1p()
            } else {
                x - x.exp().ln_1p()
            };
            let slope = 1.0 / (1.0 + x.exp());
            assert!(
                (f64::from(v) - want).abs() < 1e-6 * want.abs().max(1.0),
                "{x}: {v} vs {want}"
            );
            assert!(
                (f64::from(g) - slope).abs() < 1e-6,
                "{x}: slope {g} vs {slope}"
            );
        }
    }
}
