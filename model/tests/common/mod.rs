//! Helpers shared by the golden tests: fixture paths and tensor comparisons.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use model::logprobs::sequence_logprobs;
use model::{forward, Batch, Weights};

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// The real tokenizers and GGUF fetched by `scripts/fetch-assets.sh`.
pub fn asset(rel: &str) -> PathBuf {
    let root = std::env::var_os("FERRITE_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets"));
    let p = root.join(rel);
    assert!(
        p.exists(),
        "{} is missing: run scripts/fetch-assets.sh first",
        p.display()
    );
    p
}

pub fn golden(name: &str) -> (serde_json::Value, HashMap<String, Tensor>) {
    let dir = fixture(name);
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    let tensors =
        candle_core::safetensors::load(dir.join("golden.safetensors"), &Device::Cpu).unwrap();
    (json, tensors)
}

pub fn u32_rows(v: &serde_json::Value) -> Vec<Vec<u32>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        })
        .collect()
}

pub fn u8_rows(v: &serde_json::Value) -> Vec<Vec<u8>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as u8)
                .collect()
        })
        .collect()
}

pub fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// max |a − b|.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    max_abs(&(a - b).unwrap())
}

/// A tiny fixture model in f32 on the CPU.
pub fn load(name: &str) -> Weights {
    Weights::load_dir(&fixture(name), DType::F32, &Device::Cpu).unwrap()
}

/// `name`'s weights as loaded (unpacked, like a learner's) and packed (like a rollout
/// snapshot's: one q/k/v and one gate/up matrix per layer), with a label for failures.
pub fn both_layouts(name: &str) -> [(String, Weights); 2] {
    let w = load(name);
    let packed = w.packed().unwrap();
    assert!(packed.layers.iter().all(|l| l.packed.is_some()));
    [(name.to_string(), w), (format!("{name}, packed"), packed)]
}

/// `name`'s padded-batch logits against transformers', unpacked and packed.
pub fn check_padded_batch_logits(model: &str) {
    for (name, w) in both_layouts(model) {
        let (json, golden) = golden(model);
        let ids = u32_rows(&json["input_ids"]);
        let mask = u8_rows(&json["attention_mask"]);
        let batch = Batch::new(&ids, &mask, &Device::Cpu).unwrap();
        let logits = forward(&w, &batch, None).unwrap(); // [B, T, V]
        let reference = &golden["logits"];
        assert_eq!(logits.dims(), reference.dims());
        let valid = Tensor::new(
            mask.iter()
                .flatten()
                .map(|&m| f32::from(m))
                .collect::<Vec<_>>(),
            &Device::Cpu,
        )
        .unwrap()
        .reshape((ids.len(), ids[0].len(), 1))
        .unwrap();
        let diff = ((&logits - reference).unwrap().broadcast_mul(&valid)).unwrap();
        let d = max_abs(&diff);
        assert!(d < 1e-4, "{name}: max |logit diff| {d:e} on real tokens");
        // and the logits are not trivially small: the comparison means something
        assert!(max_abs(reference) > 1.0, "{name}");
    }
}

/// The gradient of each `Var` that `golden` holds one for (`grad.<its name>`) against it, within
/// 1e-4 relative; returns how many were checked.
pub fn check_gradients(
    label: &str,
    grads: &candle_core::backprop::GradStore,
    vars: &[(String, candle_core::Var)],
    golden: &HashMap<String, Tensor>,
) -> usize {
    let mut checked = 0;
    for (key, reference) in golden.iter().filter(|(k, _)| k.starts_with("grad.")) {
        let param = &key["grad.".len()..];
        let var = &vars.iter().find(|(n, _)| n == param).unwrap().1;
        let g = grads.get(var.as_tensor()).unwrap();
        let rel = max_abs_diff(g, reference) / max_abs(reference);
        assert!(
            rel < 1e-4,
            "{label}: gradient of {param} off by {rel:e} (relative)"
        );
        checked += 1;
    }
    checked
}

/// The fixture scripts' loss mask of a padded batch's attention `mask`: token t is scored when it
/// and its predecessor are real.
pub fn scored(mask: &[Vec<u8>]) -> Vec<Vec<u8>> {
    mask.iter()
        .map(|m| {
            (0..m.len())
                .map(|t| u8::from(t > 0 && m[t] == 1 && m[t - 1] == 1))
                .collect()
        })
        .collect()
}

/// `name`'s log-prob loss and every parameter's gradient against transformers'.
pub fn check_logprob_loss_gradients(name: &str) {
    {
        let w = load(name);
        let (json, golden) = golden(name);
        let ids = u32_rows(&json["input_ids"]);
        let mask = u8_rows(&json["attention_mask"]);
        let loss_mask = scored(&mask);
        let (vars, trainable) = w.to_vars().unwrap();
        let lp = sequence_logprobs(&trainable, &ids, &mask, &loss_mask, 1.0).unwrap();
        let count = lp.mask.sum_all().unwrap();
        let loss = lp
            .logprobs
            .sum_all()
            .unwrap()
            .neg()
            .unwrap()
            .div(&count)
            .unwrap();
        let expected = json["loss"].as_f64().unwrap() as f32;
        let got = loss.to_scalar::<f32>().unwrap();
        assert!(
            (got - expected).abs() < 1e-5,
            "{name}: loss {got} vs {expected}"
        );
        let grads = model::checkpoint::backward(&loss).unwrap();
        for (param, var) in &vars {
            let g = grads.get(var.as_tensor());
            assert!(g.is_some(), "{name}: no gradient reached {param}");
        }
        let checked = check_gradients(name, &grads, &vars, &golden);
        assert!(
            checked >= 5,
            "{name}: only {checked} gradients in the fixture"
        );
    }
}
