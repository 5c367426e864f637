//! The learner with its micro-batches packed into one row or padded (`learner::step::set_pack_rows`),
//! with and without shared prompts (`learner::step::set_share_prompts`), and with its sequences
//! taken shortest first or as they come (`learner::step::set_order_by_length`): a GRPO update
//! with a KL term to a reference and a value loss on a shared head, the reference log-probs and
//! the values it reads, an SFT step, and DPO's reference log-probs and step give the same numbers
//! every way. Its own test binary, one test: the switches are process-wide.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{group, max_diff};
use learner::dpo::{dpo_step, reference_logprobs, DpoConfig, DpoLoss, Pair};
use learner::grpo::{Aggregation, PolicyLossConfig};
use learner::optim::{AdamW, AdamWConfig};
use learner::ppo::ValueHead;
use learner::sft::sft_step;
use learner::step::{
    by_length, micro_batches, packed_tokens, policy_step, predict_values, set_order_by_length,
    set_pack_rows, set_share_prompts, step_positions, token_logprobs, update, Sequence, StepConfig,
    UpdateConfig, ValueLossConfig, ValueTargets,
};
use model::Weights;

fn model() -> Weights {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../model/tests/fixtures/tiny-qwen2");
    Weights::load_dir(&dir, DType::F32, &Device::Cpu).unwrap()
}

/// Three groups of unequal prompts (two of them share all but the last prompt token) and
/// completions of unequal lengths, with made-up behaviour log-probs, advantages and returns.
fn sequences() -> Vec<Sequence> {
    let prompts = [vec![5u32, 6, 7, 8, 9], vec![11, 12], vec![5, 6, 7, 8, 30]];
    let mut out = Vec::new();
    for (g, prompt) in prompts.iter().enumerate() {
        for k in 0..3usize {
            let n = 1 + (g + 2 * k) % 4;
            let completion: Vec<u32> = (0..n).map(|j| (40 + 7 * g + 3 * k + j) as u32).collect();
            let behaviour: Vec<f32> = (0..n).map(|j| -3.0 - 0.2 * (j + k) as f32).collect();
            let mut s = Sequence::new(prompt.clone(), completion, behaviour, k as f32 - 1.0);
            s.values = Some(ValueTargets {
                returns: vec![0.3 * k as f32; n],
                old_values: vec![0.1; n],
            });
            out.push(s);
        }
    }
    out
}

struct Outcome {
    weights: Vec<(String, Tensor)>,
    loss: f64,
    kl: f64,
    value_loss: f64,
    reference: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    sft_loss: f64,
    dpo_reference: Vec<(f32, f32)>,
    dpo_loss: f64,
}

/// Preference pairs on one prompt whose longer rows are 1, 9, 2 and 10 tokens: in micro-batches
/// of 52 padded tokens (2 rows × 13 × 2 pairs), as they come the short pairs pad to the long
/// ones beside them (88 positions); by length the two short pairs go together (60).
fn pairs() -> Vec<Pair> {
    let pair = |chosen: usize, rejected: usize| Pair {
        prompt: vec![5, 6, 7],
        chosen: (0..chosen).map(|j| 41 + j as u32).collect(),
        rejected: (0..rejected).map(|j| 60 + j as u32).collect(),
    };
    vec![pair(1, 1), pair(9, 1), pair(1, 2), pair(10, 2)]
}

/// The outcome with rows packed or padded, prompts shared or not, sequences taken by length or as
/// they come, in micro-batches of `budget` tokens.
fn run(pack: bool, share: bool, order: bool, budget: usize) -> Outcome {
    set_pack_rows(pack);
    set_share_prompts(share);
    set_order_by_length(order);
    let base = model();
    let (mut vars, w) = base.to_vars().unwrap();
    let head = ValueHead::from_values(
        (0..w.config.hidden_size)
            .map(|i| 0.01 * (i % 5) as f32)
            .collect(),
        0.1,
        &Device::Cpu,
    )
    .unwrap();
    vars.extend(head.vars());
    // eps 1: updates proportional to the gradients, so that rounding-level differences in
    // near-zero gradients are not blown up to ±lr by Adam's normalisation
    let adam = AdamWConfig {
        eps: 1.0,
        ..Default::default()
    };
    let mut opt = AdamW::new(vars.clone(), adam).unwrap();
    let cfg = StepConfig {
        loss: PolicyLossConfig {
            aggregation: Aggregation::Grpo,
            kl_coef: 0.1,
            ..Default::default()
        },
        micro_batch_tokens: budget,
        temperature: 0.8,
        max_completion_length: 8,
        value: Some(ValueLossConfig {
            vf_coef: 0.5,
            clip: Some(0.2),
        }),
    };
    let seqs = sequences();
    // the second update's KL to the reference is not zero
    let mut m = Default::default();
    for _ in 0..2 {
        m = update(
            &w,
            Some(&base),
            Some(&head),
            &mut opt,
            &seqs,
            &cfg,
            &UpdateConfig::default(),
            1.0,
        )
        .unwrap();
    }
    let reference = token_logprobs(&base, &seqs, budget, 0.8).unwrap();
    let values = predict_values(&w.detach(), &head, &seqs, budget).unwrap();
    let examples: Vec<(Vec<u32>, Vec<u32>)> = seqs
        .iter()
        .map(|s| (s.prompt.clone(), s.completion.clone()))
        .collect();
    let sft = sft_step(&w, &mut opt, &examples, budget, 1.0).unwrap();
    let pairs = pairs();
    let dpo_reference = reference_logprobs(&base, &pairs, 52).unwrap();
    let dpo = DpoConfig {
        loss: DpoLoss::Sigmoid,
        beta: 0.5,
        label_smoothing: 0.0,
        ..DpoConfig::default()
    };
    let dpo_loss = dpo_step(
        &w,
        &mut opt,
        &pairs,
        &dpo_reference,
        &dpo,
        &mut Default::default(),
        52,
        1.0,
    )
    .unwrap()
    .loss;
    Outcome {
        weights: vars
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().copy().unwrap()))
            .collect(),
        loss: m.loss,
        kl: m.policy.kl_mean,
        value_loss: m.value_loss,
        reference,
        values,
        sft_loss: sft.loss,
        dpo_reference,
        dpo_loss,
    }
}

#[test]
fn packing_shared_prompts_and_length_order_change_no_number() {
    padded_positions();
    let calls = model::forward::shared_prompt_calls;
    let before = calls();
    let whole = run(false, false, false, 1 << 12);
    assert_eq!(calls(), before, "sharing is off");
    let shared = run(false, true, false, 1 << 12);
    // the update's policy and reference passes, the reference log-probs, the values, SFT
    assert!(
        calls() >= before + 5,
        "sharing is on: {} calls",
        calls() - before
    );
    assert_same(&whole, &shared);
    let base = model().named();
    let moved = whole
        .weights
        .iter()
        .filter_map(|(name, a)| base.get(name).map(|b| max_diff(a, b)))
        .fold(0f32, f32::max);
    assert!(
        moved > 1e-3,
        "the updates moved the weights by {moved} only"
    );

    // micro-batches of 14 padded tokens: shortest first runs fewer positions than the groups as
    // they come, and every pass takes that order (the reference and the values come back in
    // the sequences' own order)
    let (seqs, budget) = (sequences(), 14);
    set_pack_rows(false);
    set_order_by_length(true);
    let order = by_length(&seqs, budget).expect("by length pads less");
    let sorted: Vec<Sequence> = order.iter().map(|&i| seqs[i].clone()).collect();
    let (given, less) = (
        step_positions(&seqs, budget),
        step_positions(&sorted, budget),
    );
    assert!(less < given, "{less} positions vs {given}");
    let as_they_come = run(false, true, false, budget);
    let taken = learner::step::ordered_by_length();
    let by_length = run(false, true, true, budget);
    // the two updates' passes, the reference log-probs, the values, SFT, and DPO's reference
    // log-probs and step
    assert!(
        learner::step::ordered_by_length() >= taken + 7,
        "{} ordered",
        learner::step::ordered_by_length() - taken
    );
    assert_same(&as_they_come, &by_length);
    assert_same(&whole, &by_length);

    // packed: the rows end to end, each prompt that several rows continue once, in one
    // micro-batch, in several (14 tokens), and with every row whole (sharing off)
    let packed_calls = model::attention::packed_calls;
    let before = packed_calls();
    let packed = run(true, true, false, 1 << 12);
    // the update's two passes of two optimizer steps each... at least the five passes above
    assert!(
        packed_calls() >= before + 5,
        "{} packed",
        packed_calls() - before
    );
    assert_same(&whole, &packed);
    set_share_prompts(true);
    let micro = micro_batches(&seqs, budget).len();
    assert!(
        micro >= 3,
        "{micro} packed micro-batches of {budget} tokens"
    );
    assert_same(&whole, &run(true, true, true, budget));
    assert_same(&whole, &run(true, false, false, budget));
    packed_pieces();
}

/// A packed step that runs out of device memory (`learner::fit::with_room`, counting packed
/// tokens) runs again in pieces of half its tokens and makes the update it makes whole.
fn packed_pieces() {
    set_pack_rows(true);
    set_share_prompts(true);
    let seqs = sequences();
    let tokens = packed_tokens(&seqs);
    let step = |room: Option<usize>| {
        let (vars, w) = model().to_vars().unwrap();
        let mut opt = AdamW::new(vars, AdamWConfig::default()).unwrap();
        let cfg = StepConfig {
            loss: PolicyLossConfig::default(),
            micro_batch_tokens: 1 << 12,
            temperature: 1.0,
            max_completion_length: 8,
            value: None,
        };
        let mut run = || policy_step(&w, None, None, &mut opt, &seqs, &cfg, 1e-3).unwrap();
        let m = match room {
            Some(room) => learner::fit::with_room(room, run),
            None => run(),
        };
        (m, opt.fit(), w.detach().named())
    };
    let (whole, _, want) = step(None);
    let (pieces, fit, got) = step(Some(tokens - 1));
    assert_eq!(whole.memory_retries, 0);
    assert_eq!(pieces.memory_retries, 1);
    assert_eq!(fit.piece_tokens, Some(tokens / 2), "{tokens} tokens whole");
    assert!(
        (whole.loss - pieces.loss).abs() < 1e-5,
        "{whole:?} vs {pieces:?}"
    );
    for (name, a) in &want {
        // Adam normalises each gradient, so rounding in a near-zero one moves its weight by a
        // fraction of lr = 1e-3 (measured 1.6e-6); `fit.rs` bounds it the same
        let d = max_diff(a, &got[name]);
        assert!(d < 1e-4, "{name}: {d}");
    }
}

/// The positions padded micro-batches run and the orders they take (the defaults pack).
fn padded_positions() {
    set_pack_rows(false);
    set_share_prompts(true);
    let s = |n: usize| Sequence::new(vec![1; 2], vec![2; n], vec![0.0; n], 0.0);
    let seqs = vec![s(2), s(2), s(6), s(1), s(30)];
    // rows of 4 and 4 pad to 8, of 8 and 3 to 16
    assert_eq!(micro_batches(&seqs, 16), vec![0..2, 2..4, 4..5]);
    // two groups of 5-token prompts, each with one 30-token completion: as they come, each
    // micro-batch of 140 padded tokens pads a group's rows to 31 (prompt once: 2 × (4 + 4 × 31));
    // by length, six short rows share one (2 × 4 + 6 × 2) and the long two another (2 × 35)
    let skewed = [group(1..6, &[1, 1, 1, 30]), group(6..11, &[1, 1, 1, 30])].concat();
    assert_eq!(step_positions(&skewed, 140), 256);
    assert_eq!(by_length(&skewed, 140), Some(vec![0, 1, 2, 4, 5, 6, 3, 7]));
    // 20-token prompts, completions of 1 and 9 in each group: by length, each micro-batch would
    // run both prompts (2 × (2 × 19) + 4 × 2 + 4 × 10 = 124) where the groups as they come run
    // one each (2 × (19 + 4 × 10) = 118): they stay as they come
    let even = [group(1..21, &[1, 9, 1, 9]), group(21..41, &[1, 9, 1, 9])].concat();
    assert_eq!(step_positions(&even, 116), 118);
    assert_eq!(by_length(&even, 116), None);
    let sorted: Vec<Sequence> = [0, 2, 4, 6, 1, 3, 5, 7]
        .iter()
        .map(|&i| even[i].clone())
        .collect();
    assert_eq!(step_positions(&sorted, 116), 124);
}

/// The numbers of two outcomes agree within float rounding.
fn assert_same(a: &Outcome, b: &Outcome) {
    let close = |x: f64, y: f64, what: &str| {
        assert!(
            (x - y).abs() <= 1e-5 * x.abs().max(1.0),
            "{what}: {x} vs {y}"
        );
    };
    close(a.loss, b.loss, "policy loss");
    close(a.kl, b.kl, "KL");
    close(a.value_loss, b.value_loss, "value loss");
    close(a.sft_loss, b.sft_loss, "SFT loss");
    close(a.dpo_loss, b.dpo_loss, "DPO loss");
    assert_eq!(a.dpo_reference.len(), b.dpo_reference.len());
    for (x, y) in a.dpo_reference.iter().zip(&b.dpo_reference) {
        close(x.0 as f64, y.0 as f64, "DPO reference, chosen");
        close(x.1 as f64, y.1 as f64, "DPO reference, rejected");
    }
    assert!(
        a.kl > 0.0 && a.value_loss > 0.0,
        "terms that mean something"
    );
    for (x, y) in a.reference.iter().zip(&b.reference) {
        assert_eq!(x.len(), y.len());
        x.iter()
            .zip(y)
            .for_each(|(p, q)| close(*p as f64, *q as f64, "reference log-prob"));
    }
    for (x, y) in a.values.iter().zip(&b.values) {
        assert_eq!(x.len(), y.len());
        x.iter()
            .zip(y)
            .for_each(|(p, q)| close(*p as f64, *q as f64, "value"));
    }
    for ((name, x), (_, y)) in a.weights.iter().zip(&b.weights) {
        let d = max_diff(x, y);
        assert!(d < 1e-5, "{name}: weights differ by {d}");
    }
}
