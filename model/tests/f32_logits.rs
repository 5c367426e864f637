//! The output layer's f32 logits (`model.f32_logits`, `model::head::with_f32_logits`). The switch
//! is process-wide, so these checks have a test binary of their own and run in one test.

mod common;

use candle_core::{DType, Device, Tensor, Var, D};
use common::{max_abs, max_abs_diff};
use model::generate::{generate, GenerationConfig};
use model::head::{output_logprobs, with_f32_logits};
use model::rng::Rng;
use model::sampling::SamplingParams;

fn randn(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = Rng::new(seed);
    let v: Vec<f32> = (0..shape.iter().product())
        .map(|_| rng.normal() as f32)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// Log-probs of `targets` and entropies of `softmax(z)`, `z [N, V]` f32, by candle's ops.
fn log_softmax_stats(z: &Tensor, targets: &Tensor) -> (Tensor, Tensor) {
    let lse = z
        .exp()
        .unwrap()
        .sum_keepdim(D::Minus1)
        .unwrap()
        .log()
        .unwrap();
    let logp = z.broadcast_sub(&lse).unwrap(); // [N, V]
    let picked = logp
        .gather(&targets.unsqueeze(1).unwrap(), 1)
        .unwrap()
        .squeeze(1)
        .unwrap();
    let entropy = (logp.exp().unwrap() * &logp)
        .unwrap()
        .sum(D::Minus1)
        .unwrap()
        .neg()
        .unwrap();
    (picked, entropy)
}

#[test]
fn f32_logits_reach_the_learners_log_probs_and_the_samplers() {
    // the learner's side: bf16 states and weight whose logits are about ±10, where bf16 rounds
    // a logit by up to 0.03
    let (n, h, v) = (40, 64, 300);
    let states = randn(&[n, h], 1).to_dtype(DType::BF16).unwrap();
    let weight = randn(&[v, h], 2).to_dtype(DType::BF16).unwrap();
    let mut rng = Rng::new(3);
    let targets: Vec<u32> = (0..n).map(|_| rng.below(v as u64) as u32).collect();
    let targets = Tensor::from_vec(targets, n, &Device::Cpu).unwrap();
    // the reference: the widened product, every step in f32
    let (s32, w32) = (
        states.to_dtype(DType::F32).unwrap(),
        weight.to_dtype(DType::F32).unwrap(),
    );
    let z = s32.matmul(&w32.t().unwrap()).unwrap();
    let (want_logp, want_entropy) = log_softmax_stats(&z, &targets);

    let var = Var::from_tensor(&states).unwrap();
    let scored = |on: bool| {
        with_f32_logits(on, || {
            output_logprobs(var.as_tensor(), &weight, &targets, 1.0, 16)
        })
        .unwrap()
    };
    let (logp, entropy) = scored(true);
    let (dl, de) = (
        max_abs_diff(&logp, &want_logp),
        max_abs_diff(&entropy, &want_entropy),
    );
    // f32 sums in another order: the entropies' 300 terms reach 2e-5
    assert!(dl < 1e-5 && de < 1e-4, "log-probs {dl}, entropies {de}");
    // rounded to bf16 the logits move the log-probs by bf16's step at 10
    let (logp_bf16, _) = scored(false);
    let rounded = max_abs_diff(&logp_bf16, &want_logp);
    assert!(rounded > 1e-3, "bf16 logits: {rounded}");

    // the backward (16-bit logits recomputed, the forward's f32 log-partitions) against the
    // reference's gradient, within bf16's rounding
    let grad = |logp: &Tensor| {
        let g = logp.sum_all().unwrap().backward().unwrap();
        g.get(var.as_tensor())
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    };
    let got = grad(&logp);
    let s = Var::from_tensor(&s32).unwrap();
    let z = s.as_tensor().matmul(&w32.t().unwrap()).unwrap();
    let want = log_softmax_stats(&z, &targets)
        .0
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let want = want.get(s.as_tensor()).unwrap();
    let rel = max_abs_diff(&got, want) / max_abs(want);
    assert!(rel < 5e-2, "gradient: relative difference {rel}");

    // the sampler's side: a bf16 model draws the same first token with its logits in f32 or not
    // (the same uniform, nowhere near a boundary here) and records its log-prob from either
    let c = model::builtin::tiny_config(64, 2);
    let w = model::init::random_weights(&c, 0.3, 4, &Device::Cpu)
        .unwrap()
        .to(DType::BF16, &Device::Cpu)
        .unwrap();
    let cfg = GenerationConfig {
        max_new_tokens: 12,
        sampling: SamplingParams {
            temperature: 1.0,
            ..Default::default()
        },
        seed: 5,
        ..Default::default()
    };
    let prompts = vec![vec![3, 4, 5, 6], vec![9, 8, 7]];
    let sampled = |on: bool| with_f32_logits(on, || generate(&w, &prompts, &cfg, None)).unwrap();
    let (wide, narrow) = (sampled(true), sampled(false));
    assert_eq!(wide[0].tokens[0], narrow[0].tokens[0]);
    let first = |c: &[model::generate::Completion]| c[0].logprobs[0];
    let moved = (first(&wide) - first(&narrow)).abs();
    assert!(
        moved > 0.0 && moved < 5e-2,
        "the first token's log-prob moved by {moved}"
    );
}
