//! The optimizer with per-layer activation checkpointing: `AdamW::backward` collects the
//! recomputed layers' weight gradients, so a step with checkpointing lands where a step without
//! it does. Its own test binary: the switch is process-wide.

mod common;

use candle_core::{Device, Tensor};
use common::max_diff;
use learner::optim::{AdamW, AdamWConfig};
use model::logprobs::sequence_logprobs;

/// Two AdamW steps on a padded batch's mean negative log-prob; the weights after them.
fn two_steps(checkpoint: bool) -> Vec<(String, Tensor)> {
    model::checkpoint::set_enabled(checkpoint);
    let c = model::builtin::tiny_config(64, 3);
    let w = model::init::random_weights(&c, 0.1, 7, &Device::Cpu).unwrap();
    let (vars, trainable) = w.to_vars().unwrap();
    let mut opt = AdamW::new(vars.clone(), AdamWConfig::default()).unwrap();
    let ids: Vec<Vec<u32>> = (0..3u32)
        .map(|r| (0..12).map(|j| (r * 31 + j * 7) % 90 + 5).collect())
        .collect();
    let attention: Vec<Vec<u8>> = (0..3)
        .map(|r| (0..12).map(|j| u8::from(j < 12 - 3 * r)).collect())
        .collect();
    let before = model::checkpoint::recomputed_layers();
    for _ in 0..2 {
        let lp = sequence_logprobs(&trainable, &ids, &attention, &attention, 1.0).unwrap();
        let n = lp.mask.sum_all().unwrap().to_scalar::<f32>().unwrap() as f64;
        let loss = ((lp.logprobs * &lp.mask)
            .unwrap()
            .sum_all()
            .unwrap()
            .neg()
            .unwrap()
            / n)
            .unwrap();
        let (_, missing) = opt.backward(&loss).unwrap();
        assert_eq!(missing, Some(vec![]), "every parameter gets a gradient");
        opt.step(1e-2).unwrap();
    }
    let recomputed = model::checkpoint::recomputed_layers() - before;
    assert_eq!(recomputed, if checkpoint { 2 * 3 } else { 0 });
    vars.into_iter()
        .map(|(n, v)| (n, v.as_tensor().copy().unwrap()))
        .collect()
}

#[test]
fn checkpointed_steps_equal_plain_steps() {
    let plain = two_steps(false);
    let checkpointed = two_steps(true);
    for ((name, a), (_, b)) in plain.iter().zip(&checkpointed) {
        let diff = max_diff(a, b);
        assert!(diff < 1e-5, "{name}: {diff}");
    }
}
