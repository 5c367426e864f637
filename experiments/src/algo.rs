//! The policy-gradient algorithms of a run: from a step's scored samples to sequences with
//! per-token advantages (GRPO, RLOO, REINFORCE++, PPO's GAE; AR on top), and the update (Lopti's
//! passes, PPO epochs and mini-batches, the critic).

use std::path::Path;

use anyhow::Context;
use candle_core::{DType, Device};
use learner::advantages::{self, KlController};
use learner::correction::{importance_weights, m2_kept, BehaviourCorrection, CorrectionStats};
use learner::grpo::{group_advantages, PolicyLossConfig, Surrogate};
use learner::optim::AdamW;
use learner::ppo::ValueHead;
use learner::step::{
    critic_step, predict_values, token_logprobs, update, Sequence, StepConfig, StepMetrics,
    UpdateConfig, ValueLossConfig, ValueTargets,
};
use model::Weights;
use rollout::schema::{Finish, Sample};

use crate::config::{Config, PolicyLoss};

const HEAD_FILE: &str = "value_head.safetensors";
const CRITIC_DIR: &str = "critic";

/// PPO's critic.
pub enum Critic {
    None,
    /// A value head on the policy trunk, trained with the policy's optimizer.
    Head(ValueHead),
    /// Its own trunk, head and optimizer.
    Separate(Box<SeparateCritic>),
}

pub struct SeparateCritic {
    pub weights: Weights,
    pub head: ValueHead,
    pub opt: AdamW,
}

impl Critic {
    /// The critic `c` asks for, fresh from `init` or restored from `checkpoint`. A head's
    /// variables must join the policy optimizer: they are returned for that.
    pub fn new(
        c: &Config,
        init: &Weights,
        checkpoint: Option<&Path>,
        adamw: learner::optim::AdamWConfig,
    ) -> anyhow::Result<(Critic, Vec<(String, candle_core::Var)>)> {
        if c.algorithm.name != "ppo" {
            return Ok((Critic::None, Vec::new()));
        }
        let device = init.embed_tokens.device().clone();
        let hidden = init.config.hidden_size;
        let load_head = |dir: &Path| -> anyhow::Result<ValueHead> {
            let t = candle_core::safetensors::load(dir.join(HEAD_FILE), &Device::Cpu)
                .with_context(|| format!("{}: {HEAD_FILE}", dir.display()))?;
            let w = t
                .get("weight")
                .context("value head weight")?
                .to_vec1::<f32>()?;
            let b = t.get("bias").context("value head bias")?.to_vec1::<f32>()?;
            Ok(ValueHead::from_values(w, b[0], &device)?)
        };
        if c.algorithm.critic == "head" {
            let head = match checkpoint {
                Some(dir) => load_head(dir)?,
                None => ValueHead::zeros(hidden, &device)?,
            };
            let vars = head.vars();
            return Ok((Critic::Head(head), vars));
        }
        let (weights, head) = match checkpoint {
            Some(dir) => {
                let d = dir.join(CRITIC_DIR);
                (
                    Weights::load_dir(&d, init.embed_tokens.dtype(), &device)?,
                    load_head(&d)?,
                )
            }
            None => (init.snapshot()?, ValueHead::zeros(hidden, &device)?),
        };
        let (mut vars, weights) = weights.to_vars()?;
        vars.extend(head.vars());
        let mut opt = AdamW::new(vars, adamw)?;
        if let Some(dir) = checkpoint {
            opt.load(&dir.join(CRITIC_DIR))?;
        }
        Ok((
            Critic::Separate(Box::new(SeparateCritic { weights, head, opt })),
            Vec::new(),
        ))
    }

    /// Writes the critic into a checkpoint directory.
    pub fn save(&self, dir: &Path) -> learner::error::Result<()> {
        let write_head = |head: &ValueHead, dir: &Path| -> learner::error::Result<()> {
            let tensors = std::collections::HashMap::from([
                ("weight".to_string(), head.weight.as_tensor().clone()),
                ("bias".to_string(), head.bias.as_tensor().clone()),
            ]);
            candle_core::safetensors::save(&tensors, dir.join(HEAD_FILE))?;
            Ok(())
        };
        match self {
            Critic::None => Ok(()),
            Critic::Head(head) => write_head(head, dir),
            Critic::Separate(sc) => {
                let d = dir.join(CRITIC_DIR);
                sc.weights.save_dir(&d, DType::F32, 4 << 30)?;
                write_head(&sc.head, &d)?;
                sc.opt.save(&d)
            }
        }
    }
}

/// What the advantage stage measured.
#[derive(Debug, Clone, Default)]
pub struct AdvantageStats {
    /// Token advantages, flattened (after AR).
    pub advantages: Vec<f32>,
    /// One per sequence (its first token's advantage; the logged `advantage` column).
    pub per_sequence: Vec<f32>,
    /// Mean per-token k1 KL of the behaviour policy to the reference (KL in the reward).
    pub reward_kl: f64,
    pub reward_kl_coef: f64,
    /// The behaviour correction's statistics (None: off).
    pub correction: Option<CorrectionStats>,
    /// M2PO: the mean second moment `(log π_prox − log π_behav)²` of the step's tokens and the
    /// share it masked (None: off).
    pub m2po: Option<(f64, f64)>,
    /// On-policy distillation: the mean over completion tokens of `log π_old − log π_teacher`
    /// (slime's `opd_reverse_kl`; None: no teacher).
    pub reverse_kl: Option<f64>,
}

/// A separate critic's step: (loss, value clip fraction, grad norm).
pub type CriticMetrics = (f64, f64, f64);

/// The learner side of a run: the algorithm's estimator, AR, the critic and the update.
pub struct Algorithm {
    pub step: StepConfig,
    pub update: UpdateConfig,
    pub critic: Critic,
    pub kl: KlController,
    pub value_clip: Option<f64>,
    /// On-policy distillation's frozen teacher (`[distill]`).
    pub teacher: Option<Weights>,
}

impl Algorithm {
    pub fn new(c: &Config, critic: Critic, kl_coef: Option<f64>) -> Algorithm {
        let a = &c.algorithm;
        Algorithm {
            step: StepConfig {
                loss: PolicyLossConfig {
                    clip_low: a.clip_low,
                    clip_high: a.clip_high,
                    dual_clip: a.dual_clip,
                    ratio: a.ratio,
                    aggregation: a.loss_aggregation,
                    kl: a.kl_estimator,
                    kl_coef: a.kl_coef,
                    entropy_coef: a.entropy_coef,
                    off_policy_mask: a.off_policy_mask,
                    surrogate: match a.policy_loss {
                        PolicyLoss::Clip => Surrogate::Clip,
                        PolicyLoss::Cispo => Surrogate::Cispo { max: a.cispo_max },
                        PolicyLoss::Sapo => Surrogate::Sapo {
                            tau_pos: a.sapo_tau_pos,
                            tau_neg: a.sapo_tau_neg,
                        },
                        PolicyLoss::ClipCov => Surrogate::ClipCov {
                            ratio: a.clip_cov_ratio,
                            low: a.clip_cov_lb,
                            high: a.clip_cov_ub,
                        },
                        PolicyLoss::KlCov => Surrogate::KlCov {
                            ratio: a.kl_cov_ratio,
                            coef: a.kl_cov_coef,
                        },
                        PolicyLoss::DppoTv => Surrogate::DppoTv {
                            low: a.dppo_low,
                            high: a.dppo_high,
                            cap: a.dppo_cap,
                        },
                        PolicyLoss::DppoKl => Surrogate::DppoKl {
                            low: a.dppo_low,
                            high: a.dppo_high,
                            cap: a.dppo_cap,
                        },
                        PolicyLoss::GeoMean => Surrogate::GeoMean,
                        PolicyLoss::Gpg => Surrogate::Gpg,
                    },
                },
                micro_batch_tokens: c.optimizer.micro_batch_tokens,
                temperature: f64::from(c.rollout.temperature),
                max_completion_length: c.rollout.max_new_tokens,
                value: matches!(critic, Critic::Head(_)).then_some(ValueLossConfig {
                    vf_coef: a.vf_coef,
                    clip: a.value_clip,
                }),
            },
            update: UpdateConfig {
                epochs: a.epochs,
                mini_batches: a.mini_batches,
                lopti_eta: a.lopti_eta,
                seed: c.run.seed,
                top_entropy_quantile: a.top_entropy_quantile,
            },
            critic,
            kl: KlController {
                beta: kl_coef.unwrap_or(a.reward_kl_coef),
                target: a.kl_target,
                horizon: a.kl_horizon,
            },
            value_clip: a.value_clip,
            teacher: None,
        }
    }

    /// A reference policy is needed for a KL loss or a KL penalty in the reward.
    /// The optimizer steps taken so far by `opt` (the policy's) and a separate critic's.
    pub fn optimizer_steps(&self, opt: &AdamW) -> u64 {
        opt.steps()
            + match &self.critic {
                Critic::Separate(sc) => sc.opt.steps(),
                _ => 0,
            }
    }

    pub fn needs_reference(c: &Config) -> bool {
        c.algorithm.kl_coef != 0.0
            || (c.algorithm.reward_kl_coef != 0.0
                && matches!(c.algorithm.name.as_str(), "ppo" | "reinforce_pp"))
    }

    /// The step's sequences with their per-token advantages (and PPO's value targets).
    pub fn sequences(
        &mut self,
        c: &Config,
        samples: &[&Sample],
        policy: &Weights,
        reference: Option<&Weights>,
    ) -> anyhow::Result<(Vec<Sequence>, AdvantageStats)> {
        let a = &c.algorithm;
        let rewards: Vec<f32> = samples.iter().map(|s| s.reward).collect();
        let group_ids: Vec<u64> = samples.iter().map(|s| s.group_id).collect();
        let lengths: Vec<usize> = samples.iter().map(|s| s.completion_ids.len()).collect();
        let mut seqs: Vec<Sequence> = samples
            .iter()
            .map(|s| Sequence {
                // TRL's mask_truncated_completions: the advantages still count it
                masked: a.mask_truncated && s.finish == Finish::Length,
                ..Sequence::new(
                    s.prompt_ids.clone(),
                    s.completion_ids.clone(),
                    s.behavior_logprobs.clone(),
                    0.0,
                )
            })
            .collect();
        let mut stats = AdvantageStats {
            reward_kl_coef: self.kl.beta,
            ..Default::default()
        };
        // the behaviour correction: from here on the learner's own log-probs at the start of the
        // step are the old policy (the ratio, the reward KL, AR, Lopti), as verl recomputes
        // `old_log_prob`; the sampler's only set the importance weights
        if a.behaviour_correction != BehaviourCorrection::None {
            let proximal = token_logprobs(
                &policy.detach(),
                &seqs,
                c.optimizer.micro_batch_tokens,
                self.step.temperature,
            )?;
            let behaviour: Vec<&[f32]> = seqs
                .iter()
                .map(|s| s.behavior_logprobs.as_slice())
                .collect();
            let (mut weights, correction) = importance_weights(
                &proximal,
                &behaviour,
                a.behaviour_correction,
                a.behaviour_cap,
            );
            if let Some(tau) = a.m2_threshold {
                let valid: Vec<bool> = seqs.iter().map(|s| !s.masked).collect();
                let (kept, m2) = m2_kept(&proximal, &behaviour, &valid, tau);
                let (mut masked, mut tokens) = (0usize, 0usize);
                for ((w, k), v) in weights.iter_mut().zip(kept).zip(&valid) {
                    for (x, k) in w.iter_mut().zip(k) {
                        masked += usize::from(!k);
                        if !k {
                            *x = 0.0;
                        }
                    }
                    tokens += if *v { w.len() } else { 0 };
                }
                stats.m2po = Some((m2, masked as f64 / tokens.max(1) as f64));
            }
            for ((s, p), w) in seqs.iter_mut().zip(proximal).zip(weights) {
                s.sampler_logprobs = Some(std::mem::replace(&mut s.behavior_logprobs, p));
                s.importance_weights = Some(w);
            }
            stats.correction = Some(correction);
        }
        let per_seq = |seqs: &mut Vec<Sequence>, adv: &[f32]| {
            for (s, &x) in seqs.iter_mut().zip(adv) {
                s.advantages = vec![x; s.completion.len()];
            }
        };
        let per_token = |seqs: &mut Vec<Sequence>, adv: Vec<Vec<f32>>| {
            for (s, x) in seqs.iter_mut().zip(adv) {
                s.advantages = x;
            }
        };
        // k1 KL of the behaviour policy to the reference, per token (for the token rewards)
        let token_kl = |seqs: &[Sequence]| -> anyhow::Result<Option<Vec<Vec<f32>>>> {
            let (Some(r), true) = (reference, a.reward_kl_coef != 0.0) else {
                return Ok(None);
            };
            let ref_lp = token_logprobs(
                &r.detach(),
                seqs,
                c.optimizer.micro_batch_tokens,
                self.step.temperature,
            )?;
            Ok(Some(
                seqs.iter()
                    .zip(ref_lp)
                    .map(|(s, r)| {
                        s.behavior_logprobs
                            .iter()
                            .zip(r)
                            .map(|(o, r)| o - r)
                            .collect()
                    })
                    .collect(),
            ))
        };
        match a.name.as_str() {
            "grpo" => per_seq(
                &mut seqs,
                &group_advantages(&rewards, &group_ids, a.scale_rewards, a.std_eps),
            ),
            "rloo" => per_seq(&mut seqs, &advantages::rloo(&rewards, &group_ids)),
            "remax" => per_seq(
                &mut seqs,
                &advantages::remax(&rewards, &named_part(samples, "greedy_reward")?),
            ),
            "grpo_passk" => per_seq(
                &mut seqs,
                &advantages::grpo_passk(&rewards, &group_ids, a.scale_rewards, a.std_eps),
            ),
            "opo" => per_seq(&mut seqs, &advantages::opo(&rewards, &group_ids, &lengths)),
            "gdpo" => per_token(
                &mut seqs,
                advantages::gdpo(
                    &reward_parts(c, samples)?,
                    &c.reward.parts.iter().map(|p| p.weight).collect::<Vec<_>>(),
                    &group_ids,
                    a.scale_rewards,
                    a.std_eps,
                    &lengths,
                ),
            ),
            "reinforce_pp_baseline" => per_token(
                &mut seqs,
                advantages::reinforce_pp_baseline(&rewards, &group_ids, &lengths),
            ),
            "reinforce_pp" | "ppo" => {
                let kl = token_kl(&seqs)?;
                if let Some(kl) = &kl {
                    let n: usize = kl.iter().map(Vec::len).sum();
                    stats.reward_kl =
                        kl.iter().flatten().map(|&x| f64::from(x)).sum::<f64>() / n.max(1) as f64;
                }
                let token_rewards: Vec<Vec<f32>> = rewards
                    .iter()
                    .enumerate()
                    .map(|(i, &r)| {
                        advantages::token_rewards(
                            r,
                            kl.as_ref().map(|k| k[i].as_slice()),
                            self.kl.beta,
                            lengths[i],
                        )
                    })
                    .collect();
                if a.name == "reinforce_pp" {
                    per_token(&mut seqs, advantages::reinforce_pp(&token_rewards, a.gamma));
                } else {
                    let values = match &self.critic {
                        Critic::Head(head) => predict_values(
                            &policy.detach(),
                            head,
                            &seqs,
                            c.optimizer.micro_batch_tokens,
                        )?,
                        Critic::Separate(sc) => predict_values(
                            &sc.weights.detach(),
                            &sc.head,
                            &seqs,
                            c.optimizer.micro_batch_tokens,
                        )?,
                        Critic::None => anyhow::bail!("PPO without a critic"),
                    };
                    let (adv, ret): (Vec<Vec<f32>>, Vec<Vec<f32>>) = token_rewards
                        .iter()
                        .zip(&values)
                        .map(|(r, v)| advantages::gae(r, v, a.gamma, a.lambda))
                        .unzip();
                    let adv = if a.whiten_advantages {
                        advantages::whiten(&adv)
                    } else {
                        adv
                    };
                    for (((s, x), r), v) in seqs.iter_mut().zip(adv).zip(ret).zip(values) {
                        s.advantages = x;
                        s.values = Some(ValueTargets {
                            returns: r,
                            old_values: v,
                        });
                    }
                }
                self.kl.update(stats.reward_kl, samples.len());
            }
            other => anyhow::bail!("algorithm {other} has no advantage estimator"),
        }
        // on-policy distillation: the teacher's term joins the estimator's advantages (slime
        // adds it after the estimator, before any whitening of its own; AR reweights the sum)
        if let Some(t) = &self.teacher {
            let d = &c.distill;
            let teacher = token_logprobs(
                t,
                &seqs,
                c.optimizer.micro_batch_tokens,
                self.step.temperature,
            )?;
            let (mut sum, mut tokens) = (0.0, 0usize);
            for (s, lp) in seqs.iter_mut().zip(teacher) {
                if d.pure {
                    s.advantages.fill(0.0);
                }
                let kl =
                    advantages::distill(&mut s.advantages, &s.behavior_logprobs, &lp, d.kl_coef);
                sum += kl.iter().map(|&x| f64::from(x)).sum::<f64>();
                tokens += kl.len();
            }
            stats.reverse_kl = Some(sum / tokens.max(1) as f64);
        }
        if a.ar_alpha > 0.0 {
            for s in &mut seqs {
                s.advantages =
                    advantages::reweight(&s.advantages, &s.behavior_logprobs, a.ar_alpha);
            }
        }
        stats.per_sequence = seqs
            .iter()
            .map(|s| s.advantages.first().copied().unwrap_or(0.0))
            .collect();
        stats.advantages = seqs
            .iter()
            .flat_map(|s| s.advantages.iter().copied())
            .collect();
        Ok((seqs, stats))
    }

    /// The update of one RL step; a separate critic takes its own step first, on the same
    /// targets. Returns the policy metrics and, for a separate critic, its (loss, clip fraction, grad norm).
    pub fn train(
        &mut self,
        policy: &Weights,
        reference: Option<&Weights>,
        opt: &mut AdamW,
        seqs: &[Sequence],
        lr: f64,
        critic_lr: f64,
    ) -> anyhow::Result<(StepMetrics, Option<CriticMetrics>)> {
        let critic = match &mut self.critic {
            Critic::Separate(sc) => {
                let (loss, stats, grad) = critic_step(
                    &sc.weights,
                    &sc.head,
                    &mut sc.opt,
                    seqs,
                    self.step.micro_batch_tokens,
                    self.value_clip,
                    critic_lr,
                )?;
                Some((loss, stats.clip_frac, grad))
            }
            _ => None,
        };
        let head = match &self.critic {
            Critic::Head(h) => Some(h),
            _ => None,
        };
        let m = update(
            policy,
            reference,
            head,
            opt,
            seqs,
            &self.step,
            &self.update,
            lr,
        )?;
        Ok((m, critic))
    }
}

/// Each reward part's values over `samples` (`parts[k][i]`: the config's part k of sample i), as
/// the workers recorded them, unweighted (GDPO's input).
/// Each sample's reward part `name` (one the rollout added, as ReMax's `greedy_reward`).
fn named_part(samples: &[&Sample], name: &str) -> anyhow::Result<Vec<f32>> {
    samples
        .iter()
        .map(|s| match s.reward_parts.iter().find(|(n, _)| n == name) {
            Some(&(_, v)) => Ok(v),
            None => anyhow::bail!(
                "sample {}: no reward part `{name}` (a sample generated under another \
                 algorithm?)",
                s.sample_id
            ),
        })
        .collect()
}

fn reward_parts(c: &Config, samples: &[&Sample]) -> anyhow::Result<Vec<Vec<f32>>> {
    c.reward
        .parts
        .iter()
        .enumerate()
        .map(|(k, part)| {
            samples
                .iter()
                .map(|s| match s.reward_parts.get(k) {
                    Some((name, v)) if *name == part.name => Ok(*v),
                    _ => anyhow::bail!(
                        "sample {}: no value of reward part `{}` where the config has it",
                        s.sample_id,
                        part.name
                    ),
                })
                .collect()
        })
        .collect()
}
