//! Policy steps on the tiny Qwen2 fixture model: positive advantages raise a completion's
//! log-prob, negative ones lower it; micro-batching does not change the step.

mod common;

use candle_core::{DType, Device};
use common::group;
use learner::grpo::{Aggregation, PolicyLossConfig, Surrogate};
use learner::optim::{AdamW, AdamWConfig};
use learner::ppo::ValueHead;
use learner::step::{
    by_length, critic_step, micro_batches, packed_tokens, policy_step, predict_values,
    step_positions, update, Sequence, StepConfig, UpdateConfig, ValueLossConfig, ValueTargets,
};
use model::logprobs::sequence_logprobs;
use model::Weights;

fn model() -> Weights {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../model/tests/fixtures/tiny-qwen2");
    Weights::load_dir(&dir, DType::F32, &Device::Cpu).unwrap()
}

/// Σ log p(completion | prompt) under `w`.
fn completion_logprob(w: &Weights, s: &Sequence) -> f32 {
    let ids: Vec<u32> = s.prompt.iter().chain(&s.completion).copied().collect();
    let n = ids.len();
    let mask: Vec<u8> = (0..n).map(|i| u8::from(i >= s.prompt.len())).collect();
    let lp = sequence_logprobs(w, &[ids], &[vec![1; n]], &[mask], 1.0).unwrap();
    lp.logprobs.sum_all().unwrap().to_scalar::<f32>().unwrap()
}

fn sequences(w: &Weights) -> Vec<Sequence> {
    let mk = |prompt: Vec<u32>, completion: Vec<u32>, advantage: f32| {
        let n = completion.len();
        let mut s = Sequence::new(prompt, completion, vec![0.0; n], advantage);
        // behaviour log-probs from the model itself (on-policy)
        let ids: Vec<u32> = s.prompt.iter().chain(&s.completion).copied().collect();
        let n = ids.len();
        let mask: Vec<u8> = (0..n).map(|i| u8::from(i >= s.prompt.len())).collect();
        let lp = sequence_logprobs(w, &[ids], &[vec![1; n]], &[mask], 1.0).unwrap();
        let row = lp.logprobs.get(0).unwrap().to_vec1::<f32>().unwrap();
        s.behavior_logprobs = (0..s.completion.len())
            .map(|j| row[s.prompt.len() + j - 1])
            .collect();
        s
    };
    vec![
        mk(vec![5, 6, 7], vec![10, 11, 12, 13], 1.0),
        mk(vec![5, 6, 7], vec![20, 21], -1.0),
        mk(vec![8, 9], vec![30, 31, 32], 0.5),
        mk(vec![8, 9], vec![40, 41, 42, 43, 44], -0.5),
    ]
}

fn config(budget: usize) -> StepConfig {
    StepConfig {
        loss: PolicyLossConfig {
            aggregation: Aggregation::Dapo,
            ..Default::default()
        },
        micro_batch_tokens: budget,
        temperature: 1.0,
        max_completion_length: 8,
        value: None,
    }
}

#[test]
fn advantages_move_log_probs_in_their_direction() {
    let base = model();
    let (vars, w) = base.to_vars().unwrap();
    let mut opt = AdamW::new(vars, AdamWConfig::default()).unwrap();
    let seqs = sequences(&base);
    let before: Vec<f32> = seqs.iter().map(|s| completion_logprob(&base, s)).collect();
    for step in 0..5 {
        let m = policy_step(&w, None, None, &mut opt, &seqs, &config(1 << 12), 2e-3).unwrap();
        assert!(!m.skipped, "{m:?}");
        if step == 0 {
            // on-policy: every ratio is 1, nothing clipped, no gap to the behaviour log-probs
            assert!(
                (m.policy.ratio_mean - 1.0).abs() < 1e-5 && m.policy.clip_high_frac == 0.0,
                "{m:?}"
            );
            assert!(
                m.policy.logprob_diff_max < 1e-5 && m.policy.behaviour_kl.abs() < 1e-6,
                "{m:?}"
            );
            assert!(m.grad_norm > 0.0);
        }
    }
    let after: Vec<f32> = seqs
        .iter()
        .map(|s| completion_logprob(&w.detach(), s))
        .collect();
    for (k, s) in seqs.iter().enumerate() {
        let moved = after[k] - before[k];
        assert!(
            moved * s.advantages[0] > 0.0,
            "sequence {k} (A = {}): {} → {}",
            s.advantages[0],
            before[k],
            after[k]
        );
    }
}

#[test]
fn micro_batching_does_not_change_the_step() {
    let base = model();
    let seqs = sequences(&base);
    let run = |budget: usize| {
        let (vars, w) = base.to_vars().unwrap();
        let mut opt = AdamW::new(vars, AdamWConfig::default()).unwrap();
        let m = policy_step(&w, None, None, &mut opt, &seqs, &config(budget), 1e-3).unwrap();
        (
            m,
            w.detach()
                .embed_tokens
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
        )
    };
    let (one, w1) = run(1 << 12);
    let (many, w2) = run(8);
    assert_eq!(one.micro_batches, 1);
    assert_eq!(many.micro_batches, 4);
    assert!(
        (one.loss - many.loss).abs() < 1e-6,
        "{} vs {}",
        one.loss,
        many.loss
    );
    assert!((one.grad_norm - many.grad_norm).abs() < 1e-5 * one.grad_norm);
    // four micro-batches' statistics merge into the one's: token-weighted means, the maximum
    assert_eq!(one.policy.tokens, many.policy.tokens);
    for (a, b, what) in [
        (one.policy.entropy_mean, many.policy.entropy_mean, "entropy"),
        (one.policy.ratio_mean, many.policy.ratio_mean, "ratio mean"),
        (one.policy.ratio_max, many.policy.ratio_max, "ratio max"),
    ] {
        assert!(
            (a - b).abs() < 1e-5 * a.abs().max(1.0),
            "{what}: {a} vs {b}"
        );
    }
    let d = w1
        .iter()
        .zip(&w2)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(d < 1e-6, "weights differ by {d}");
}

/// TRL's `mask_truncated_completions`: a masked sequence leaves the loss's numerator, the
/// statistics and BNPO's token mean, but its completion still counts in GRPO's sequence mean,
/// DAPO's `num_items_in_batch` and Dr. GRPO's `B × L_max`. So the step with sequence 3 (5 of the
/// 14 tokens) masked is the step without it, scaled by 3/4 (GRPO, Dr. GRPO), 9/14 (DAPO) or 1
/// (BNPO, one micro-batch), entropy bonus included.
#[test]
fn a_masked_sequence_leaves_the_loss_and_counts_where_trl_counts_it() {
    let base = model();
    let mut masked = sequences(&base);
    masked[3].masked = true;
    let without = sequences(&base)[..3].to_vec();
    let run = |seqs: &[Sequence], aggregation: Aggregation| {
        let (vars, w) = base.to_vars().unwrap();
        let mut opt = AdamW::new(vars, AdamWConfig::default()).unwrap();
        let mut cfg = config(1 << 12);
        cfg.loss.aggregation = aggregation;
        cfg.loss.entropy_coef = 0.01;
        policy_step(&w, None, None, &mut opt, seqs, &cfg, 1e-3).unwrap()
    };
    for (aggregation, scale) in [
        (Aggregation::Grpo, 3.0 / 4.0),
        (Aggregation::Bnpo, 1.0),
        (Aggregation::Dapo, 9.0 / 14.0),
        (Aggregation::DrGrpo, 3.0 / 4.0),
    ] {
        let (m, m0) = (run(&masked, aggregation), run(&without, aggregation));
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-5 * b.abs().max(1e-3);
        assert!(
            close(m.loss, m0.loss * scale) && close(m.grad_norm, m0.grad_norm * scale),
            "{aggregation:?}: loss {} vs {} × {scale}, |g| {} vs {}",
            m.loss,
            m0.loss,
            m.grad_norm,
            m0.grad_norm
        );
        assert_eq!(
            m.policy.tokens, 9.0,
            "{aggregation:?}: statistics over the kept tokens"
        );
        assert!(close(m.policy.entropy_mean, m0.policy.entropy_mean));
        assert_eq!(m.tokens, 14, "the learner still ran every token");
    }
}

/// Importance weights ([`Sequence::importance_weights`], the behaviour correction's) scale each
/// token's policy term and nothing else: weights of ½ on every token halve every aggregation's
/// loss and gradient. A weight of 0 on every token of sequence 3 (TRL's masking of a sequence
/// whose weight passes the cap) drops its terms but, unlike `masked`, keeps its 5 tokens in
/// every denominator and in the statistics: BNPO and DAPO scale the other three's step by 9/14.
#[test]
fn importance_weights_scale_the_policy_term_and_keep_the_denominators() {
    let base = model();
    let weighted = |w: &dyn Fn(usize) -> f32| {
        let mut seqs = sequences(&base);
        for (i, s) in seqs.iter_mut().enumerate() {
            s.importance_weights = Some(vec![w(i); s.completion.len()]);
        }
        seqs
    };
    let run = |seqs: &[Sequence], aggregation: Aggregation| {
        let (vars, w) = base.to_vars().unwrap();
        let mut opt = AdamW::new(vars, AdamWConfig::default()).unwrap();
        let mut cfg = config(1 << 12);
        cfg.loss.aggregation = aggregation;
        policy_step(&w, None, None, &mut opt, seqs, &cfg, 1e-3).unwrap()
    };
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-5 * b.abs().max(1e-3);
    let aggregations = [
        Aggregation::Grpo,
        Aggregation::Bnpo,
        Aggregation::Dapo,
        Aggregation::DrGrpo,
    ];
    for aggregation in aggregations {
        let m = run(&weighted(&|_| 0.5), aggregation);
        let m0 = run(&sequences(&base), aggregation);
        assert!(
            close(m.loss, m0.loss * 0.5) && close(m.grad_norm, m0.grad_norm * 0.5),
            "{aggregation:?}: loss {} vs {} / 2, |g| {} vs {} / 2",
            m.loss,
            m0.loss,
            m.grad_norm,
            m0.grad_norm
        );
    }
    let without = sequences(&base)[..3].to_vec();
    for (aggregation, scale) in aggregations
        .into_iter()
        .zip([0.75, 9.0 / 14.0, 9.0 / 14.0, 0.75])
    {
        let m = run(&weighted(&|i| f32::from(u8::from(i != 3))), aggregation);
        let m0 = run(&without, aggregation);
        assert!(
            close(m.loss, m0.loss * scale) && close(m.grad_norm, m0.grad_norm * scale),
            "{aggregation:?}: loss {} vs {} × {scale}",
            m.loss,
            m0.loss
        );
        assert_eq!(
            m.policy.tokens, 14.0,
            "{aggregation:?}: statistics over every token"
        );
    }
}

#[test]
fn micro_batches_respect_the_token_budget() {
    let s = |n: usize| Sequence::new(vec![1; 2], vec![2; n], vec![0.0; n], 0.0);
    let seqs = vec![s(2), s(2), s(6), s(1), s(30)];
    // packed: the shared prompt's first token once, then each row's last prompt token and
    // completion with no padding: 1 + 3 + 3 + 7 + 2 = 16 tokens
    assert_eq!(packed_tokens(&seqs[..4]), 16);
    let r = micro_batches(&seqs, 16);
    assert_eq!(r, vec![0..4, 4..5]);
    // rows whose prompts no other row continues run whole
    let lone = |p: u32, n: usize| Sequence::new(vec![p, p + 1], vec![2; n], vec![0.0; n], 0.0);
    assert_eq!(
        packed_tokens(&[lone(5, 2), lone(7, 5), s(1), s(4)]),
        4 + 7 + 1 + 2 + 5
    );
}

#[test]
fn a_step_takes_its_sequences_by_length_only_where_that_runs_fewer_positions() {
    // packed (the default: padded micro-batches' orders are `shared_prompts.rs`'s), two groups
    // of 5-token prompts with one 30-token completion each run no padding as they come (each
    // prompt once: 2 × (4 + 3 × 2 + 31) = 82 positions, one micro-batch); shortest first would
    // split the groups and run each prompt twice: they stay as they come
    let skewed = [group(1..6, &[1, 1, 1, 30]), group(6..11, &[1, 1, 1, 30])].concat();
    assert_eq!(step_positions(&skewed, 140), 82);
    assert_eq!(by_length(&skewed, 140), None);
    // in micro-batches of 41 tokens, a group each
    assert_eq!(micro_batches(&skewed, 41), vec![0..4, 4..8]);
}

#[test]
fn sft_lowers_the_loss_of_its_examples() {
    let base = model();
    let (vars, w) = base.to_vars().unwrap();
    let mut opt = AdamW::new(vars, AdamWConfig::default()).unwrap();
    let examples = vec![
        (vec![5, 6, 7], vec![10, 11, 12]),
        (vec![8, 9], vec![30, 31, 32, 33]),
    ];
    let first = learner::sft::sft_step(&w, &mut opt, &examples, 64, 1e-2).unwrap();
    let mut last = first.clone();
    for _ in 0..10 {
        last = learner::sft::sft_step(&w, &mut opt, &examples, 4, 1e-2).unwrap();
    }
    assert_eq!(first.tokens, 7);
    assert!(
        last.loss < 0.5 * first.loss,
        "{} → {}",
        first.loss,
        last.loss
    );
    assert!(learner::sft::sft_step(&w, &mut opt, &[(vec![1], vec![])], 64, 1e-2).is_err());
}

/// Every parameter of `w`, flattened in name order.
fn flat(w: &Weights) -> Vec<f32> {
    w.named()
        .values()
        .flat_map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .collect()
}

fn run_update(
    base: &Weights,
    seqs: &[Sequence],
    up: &UpdateConfig,
    lr: f64,
) -> (learner::step::StepMetrics, Vec<f32>, u64) {
    let (vars, w) = base.to_vars().unwrap();
    let mut opt = AdamW::new(
        vars,
        AdamWConfig {
            weight_decay: 0.1,
            ..Default::default()
        },
    )
    .unwrap();
    let m = update(&w, None, None, &mut opt, seqs, &config(1 << 12), up, lr).unwrap();
    (m, flat(&w.detach()), opt.steps())
}

#[test]
fn lopti_without_low_probability_tokens_is_one_plain_pass() {
    let base = model();
    let seqs = sequences(&base);
    let plain = run_update(&base, &seqs, &UpdateConfig::default(), 1e-3);
    // no behaviour probability is below 1e-12: the first group is empty
    let lopti = UpdateConfig {
        lopti_eta: Some(1e-12),
        ..Default::default()
    };
    let split = run_update(&base, &seqs, &lopti, 1e-3);
    assert_eq!(split.0.optimizer_steps, 1);
    assert_eq!(split.2, 1);
    assert_eq!(plain.1, split.1, "the same weights bit for bit");
    assert_eq!(plain.0.loss, split.0.loss);
}

#[test]
fn lopti_takes_two_optimizer_steps_whose_first_losses_sum_to_the_plain_loss() {
    let base = model();
    let seqs = sequences(&base);
    // the tiny model's behaviour probabilities straddle 0.002
    let probs: Vec<f32> = seqs
        .iter()
        .flat_map(|s| s.behavior_logprobs.iter().map(|l| l.exp()))
        .collect();
    let eta = 0.002f64;
    assert!(
        probs.iter().any(|&p| f64::from(p) < eta) && probs.iter().any(|&p| f64::from(p) >= eta),
        "{probs:?}"
    );
    let lopti = UpdateConfig {
        lopti_eta: Some(eta),
        ..Default::default()
    };
    let (m, w, steps) = run_update(&base, &seqs, &lopti, 1e-3);
    assert_eq!((m.optimizer_steps, steps), (2, 2));
    assert_ne!(w, flat(&base));
    // with lr 0 the second pass sees the first pass's parameters: the losses add up exactly
    let plain = run_update(&base, &seqs, &UpdateConfig::default(), 0.0).0;
    let split = run_update(&base, &seqs, &lopti, 0.0).0;
    assert!(
        (plain.loss - split.loss).abs() < 1e-6,
        "{} vs {}",
        plain.loss,
        split.loss
    );
    // epochs and mini-batches multiply the optimizer steps
    let many = UpdateConfig {
        epochs: 2,
        mini_batches: 2,
        lopti_eta: Some(eta),
        ..Default::default()
    };
    assert_eq!(run_update(&base, &seqs, &many, 1e-3).0.optimizer_steps, 8);
}

/// [`update`] picks Clip-Cov's tokens in each optimizer step: with the whole band and a ratio of
/// 1 every token is picked and no gradient is left; half of them leave a gradient.
#[test]
fn clip_cov_picks_its_tokens_in_each_optimizer_step() {
    let base = model();
    let seqs = sequences(&base);
    let run = |ratio: f64| {
        let (vars, w) = base.to_vars().unwrap();
        let mut opt = AdamW::new(vars, AdamWConfig::default()).unwrap();
        let mut step = config(1 << 12);
        step.loss.surrogate = Surrogate::ClipCov {
            ratio,
            low: f64::NEG_INFINITY,
            high: f64::INFINITY,
        };
        let up = UpdateConfig {
            mini_batches: 2,
            ..Default::default()
        };
        update(&w, None, None, &mut opt, &seqs, &step, &up, 1e-3).unwrap()
    };
    let all = run(1.0);
    assert_eq!((all.loss, all.grad_norm), (0.0, 0.0));
    assert_eq!(all.policy.covariance_selected_frac, 1.0);
    let half = run(0.5);
    assert!(half.grad_norm > 0.0);
    let share = half.policy.covariance_selected_frac;
    assert!(share > 0.4 && share <= 0.5, "{share}");
}

#[test]
fn a_value_head_learns_the_returns() {
    let base = model();
    let mut seqs = sequences(&base);
    for (k, s) in seqs.iter_mut().enumerate() {
        let n = s.completion.len();
        s.values = Some(ValueTargets {
            returns: vec![k as f32 * 0.5 - 0.5; n],
            old_values: vec![0.0; n],
        });
        s.advantages = vec![0.0; n];
    }
    let (mut vars, w) = base.to_vars().unwrap();
    let head = ValueHead::zeros(w.config.hidden_size, &Device::Cpu).unwrap();
    vars.extend(head.vars());
    let mut opt = AdamW::new(vars, AdamWConfig::default()).unwrap();
    let cfg = StepConfig {
        value: Some(ValueLossConfig {
            vf_coef: 1.0,
            clip: None,
        }),
        ..config(1 << 12)
    };
    let first = policy_step(&w, None, Some(&head), &mut opt, &seqs, &cfg, 1e-2).unwrap();
    let mut last = first.clone();
    for _ in 0..30 {
        last = policy_step(&w, None, Some(&head), &mut opt, &seqs, &cfg, 1e-2).unwrap();
    }
    assert!(
        last.value_loss < 0.2 * first.value_loss,
        "{} → {}",
        first.value_loss,
        last.value_loss
    );
    let v = predict_values(&w.detach(), &head, &seqs, 1 << 12).unwrap();
    assert_eq!(
        v.iter().map(Vec::len).collect::<Vec<_>>(),
        seqs.iter().map(|s| s.completion.len()).collect::<Vec<_>>()
    );
    // a separate critic trained alone on the same targets
    let (cvars, critic) = base.to_vars().unwrap();
    let chead = ValueHead::zeros(critic.config.hidden_size, &Device::Cpu).unwrap();
    let mut cvars = cvars;
    cvars.extend(chead.vars());
    let mut copt = AdamW::new(cvars, AdamWConfig::default()).unwrap();
    let (l0, _, _) =
        critic_step(&critic, &chead, &mut copt, &seqs, 1 << 12, Some(10.0), 1e-2).unwrap();
    let mut l = l0;
    for _ in 0..30 {
        l = critic_step(&critic, &chead, &mut copt, &seqs, 16, Some(10.0), 1e-2)
            .unwrap()
            .0;
    }
    assert!(l < 0.2 * l0, "critic {l0} → {l}");
}

#[test]
fn dpo_steps_prefer_the_chosen_completions_and_ignore_micro_batching() {
    use learner::dpo::{dpo_step, reference_logprobs, DpoConfig, DpoLoss, Pair};
    let base = model();
    let pairs = vec![
        Pair {
            prompt: vec![5, 6, 7],
            chosen: vec![10, 11, 12],
            rejected: vec![20, 21],
        },
        Pair {
            prompt: vec![8, 9],
            chosen: vec![30, 31],
            rejected: vec![40, 41, 42, 43],
        },
    ];
    let reference = reference_logprobs(&base, &pairs, 1 << 12).unwrap();
    let seq = |p: &[u32], c: &[u32]| Sequence::new(p.to_vec(), c.to_vec(), vec![0.0; c.len()], 0.0);
    for (p, (c, r)) in pairs.iter().zip(&reference) {
        assert!((completion_logprob(&base, &seq(&p.prompt, &p.chosen)) - c).abs() < 1e-4);
        assert!((completion_logprob(&base, &seq(&p.prompt, &p.rejected)) - r).abs() < 1e-4);
    }
    let every = [
        DpoLoss::Sigmoid,
        DpoLoss::Ipo,
        DpoLoss::Hinge,
        DpoLoss::Robust,
        DpoLoss::ExoPair,
        DpoLoss::NcaPair,
        DpoLoss::SppoHard,
        DpoLoss::ApoZero,
        DpoLoss::ApoDown,
        DpoLoss::Discopop,
        DpoLoss::Simpo,
    ];
    let configs = every.iter().map(|&loss| DpoConfig {
        loss,
        // SPPO's squared targets ±1/(2β) lie 5 nats out at 0.1 (at 0.5, ±1 nat, five steps of
        // 1e-3 overshoot them)
        beta: match loss {
            DpoLoss::Simpo => 2.0,
            DpoLoss::SppoHard => 0.1,
            _ => 0.5,
        },
        label_smoothing: if loss == DpoLoss::Robust { 0.1 } else { 0.0 },
        ..DpoConfig::default()
    });
    // RPO's term is a mean over the step's chosen tokens, whatever the micro-batches
    let rpo = DpoConfig {
        rpo_alpha: 1.0,
        ..DpoConfig::default()
    };
    for cfg in configs.chain([rpo]) {
        let loss = cfg.loss;
        let run = |budget: usize, steps: usize| {
            let (vars, w) = base.to_vars().unwrap();
            let mut opt = AdamW::new(vars, AdamWConfig::default()).unwrap();
            let ms: Vec<_> = (0..steps)
                .map(|_| {
                    dpo_step(
                        &w,
                        &mut opt,
                        &pairs,
                        &reference,
                        &cfg,
                        &mut Default::default(),
                        budget,
                        1e-3,
                    )
                    .unwrap()
                })
                .collect();
            (ms, w.detach())
        };
        let (one, _) = run(1 << 12, 1);
        let (split, _) = run(8, 1);
        // one pair per micro-batch shares its prompt between two rows, not four: the log-probs
        // differ from the reference's by float rounding
        assert!((one[0].loss - split[0].loss).abs() < 1e-5, "{loss:?}");
        assert!((one[0].grad_norm - split[0].grad_norm).abs() < 1e-5 * one[0].grad_norm);
        // at the reference every margin is 0 (SimPO's are of the policy alone)
        assert!(loss.reference_free() || one[0].margin.abs() < 1e-6);
        let (ms, w) = run(1 << 12, 5);
        assert!(
            ms[4].loss < ms[0].loss,
            "{loss:?}: {} → {}",
            ms[0].loss,
            ms[4].loss
        );
        assert_eq!(ms[4].reward_accuracy, 1.0, "{loss:?}");
        for (p, (c, r)) in pairs.iter().zip(&reference) {
            let dc = completion_logprob(&w, &seq(&p.prompt, &p.chosen)) - c;
            let dr = completion_logprob(&w, &seq(&p.prompt, &p.rejected)) - r;
            assert!(dc > dr, "{loss:?}: chosen moved {dc}, rejected {dr}");
        }
    }
}
