//! The learner with and without shared prompts (`learner::step::set_share_prompts`): a GRPO
//! update with a KL term to a reference and a value loss on a shared head, the reference
//! log-probs and the values it reads, and an SFT step give the same numbers either way. Its own
//! test binary: the switch is process-wide.

mod common;

use candle_core::{DType, Device, Tensor};
use common::max_diff;
use learner::grpo::{Aggregation, PolicyLossConfig};
use learner::optim::{AdamW, AdamWConfig};
use learner::ppo::ValueHead;
use learner::sft::sft_step;
use learner::step::{
    predict_values, set_share_prompts, token_logprobs, update, Sequence, StepConfig, UpdateConfig,
    ValueLossConfig, ValueTargets,
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
}

fn run(share: bool) -> Outcome {
    set_share_prompts(share);
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
        micro_batch_tokens: 1 << 12,
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
    let reference = token_logprobs(&base, &seqs, 1 << 12, 0.8).unwrap();
    let values = predict_values(&w.detach(), &head, &seqs, 1 << 12).unwrap();
    let examples: Vec<(Vec<u32>, Vec<u32>)> = seqs
        .iter()
        .map(|s| (s.prompt.clone(), s.completion.clone()))
        .collect();
    let sft = sft_step(&w, &mut opt, &examples, 1 << 12, 1.0).unwrap();
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
    }
}

#[test]
fn shared_prompts_change_no_number() {
    let calls = model::forward::shared_prompt_calls;
    let before = calls();
    let whole = run(false);
    assert_eq!(calls(), before, "sharing is off");
    let shared = run(true);
    // the update's policy and reference passes, the reference log-probs, the values, SFT
    assert!(
        calls() >= before + 5,
        "sharing is on: {} calls",
        calls() - before
    );
    let close = |a: f64, b: f64, what: &str| {
        assert!(
            (a - b).abs() <= 1e-5 * a.abs().max(1.0),
            "{what}: {a} vs {b}"
        );
    };
    close(whole.loss, shared.loss, "policy loss");
    close(whole.kl, shared.kl, "KL");
    close(whole.value_loss, shared.value_loss, "value loss");
    close(whole.sft_loss, shared.sft_loss, "SFT loss");
    assert!(
        whole.kl > 0.0 && whole.value_loss > 0.0,
        "terms that mean something"
    );
    for (a, b) in whole.reference.iter().zip(&shared.reference) {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .for_each(|(x, y)| close(*x as f64, *y as f64, "reference log-prob"));
    }
    for (a, b) in whole.values.iter().zip(&shared.values) {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .for_each(|(x, y)| close(*x as f64, *y as f64, "value"));
    }
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
    for ((name, a), (_, b)) in whole.weights.iter().zip(&shared.weights) {
        let d = max_diff(a, b);
        assert!(d < 1e-5, "{name}: weights differ by {d}");
    }
}
