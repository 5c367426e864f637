//! LoRA against Hugging Face PEFT on the tiny Qwen2 fixture (scripts/make_lora_fixtures.py):
//! a PEFT adapter loads, the model's logits with it and merged match PEFT's, the gradients of
//! the adapter matrices match with the base frozen, a saved adapter reads back, and a fresh
//! adapter leaves the model as it was.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use model::logprobs::sequence_logprobs;
use model::lora::{load_adapter, LoraConfig, Target};
use model::{forward, Batch, Weights};

/// The tiny Qwen2 with the fixture's PEFT adapter.
fn adapted() -> Weights {
    let (c, named) = load_adapter(&fixture("tiny-qwen2-lora")).unwrap();
    assert_eq!((c.rank, c.alpha, c.targets.len()), (4, 8.0, 7));
    load("tiny-qwen2").with_lora_named(&c, &named).unwrap()
}

/// The padded batch's logits `[B, T, V]` against `reference` on real tokens: max |Δ|.
fn logits_diff(w: &Weights, json: &serde_json::Value, reference: &Tensor) -> f32 {
    let ids = u32_rows(&json["input_ids"]);
    let mask = u8_rows(&json["attention_mask"]);
    let batch = Batch::new(&ids, &mask, &Device::Cpu).unwrap();
    let logits = forward(w, &batch, None).unwrap();
    let valid: Vec<f32> = mask.iter().flatten().map(|&m| f32::from(m)).collect();
    let valid = Tensor::new(valid, &Device::Cpu)
        .unwrap()
        .reshape((ids.len(), ids[0].len(), 1))
        .unwrap();
    max_abs(
        &(&logits - reference)
            .unwrap()
            .broadcast_mul(&valid)
            .unwrap(),
    )
}

#[test]
fn an_adapted_model_and_its_merge_match_peft() {
    let (json, golden) = golden("tiny-qwen2-lora");
    let w = adapted();
    let d = logits_diff(&w, &json, &golden["logits"]);
    assert!(d < 1e-4, "adapted logits off by {d:e}");
    // the adapter changes the model: the base's logits are far from PEFT's
    let base = logits_diff(&load("tiny-qwen2"), &json, &golden["logits"]);
    assert!(base > 0.1, "the adapter changed nothing: {base}");
    // merged (W + α/r·B·A), and packed as a rollout snapshot (merged on the way)
    for (label, m) in [
        ("merged", w.merged().unwrap()),
        ("packed", w.packed().unwrap()),
    ] {
        assert!(m.layers.iter().all(|l| l.lora.is_none()));
        let d = logits_diff(&m, &json, &golden["merged_logits"]);
        assert!(d < 1e-4, "{label} logits off by {d:e}");
    }
}

#[test]
fn adapter_gradients_match_peft_with_the_base_frozen() {
    let (json, golden) = golden("tiny-qwen2-lora");
    let ids = u32_rows(&json["input_ids"]);
    let mask = u8_rows(&json["attention_mask"]);
    let loss_mask = scored(&mask);
    for checkpointing in [false, true] {
        let (vars, w) = adapted().lora_to_vars().unwrap();
        assert_eq!(
            vars.len(),
            2 * 7 * 2,
            "A and B of 7 projections in 2 layers"
        );
        let loss = model::checkpoint::forced(checkpointing, || {
            let lp = sequence_logprobs(&w, &ids, &mask, &loss_mask, 1.0).unwrap();
            let count = lp.mask.sum_all().unwrap();
            lp.logprobs
                .sum_all()
                .unwrap()
                .neg()
                .unwrap()
                .div(&count)
                .unwrap()
        });
        let want = json["loss"].as_f64().unwrap() as f32;
        let got = loss.to_scalar::<f32>().unwrap();
        assert!((got - want).abs() < 1e-5, "loss {got} vs {want}");
        let recomputed = model::checkpoint::recomputed_layers();
        let grads = model::checkpoint::backward(&loss).unwrap();
        let layers = model::checkpoint::recomputed_layers() - recomputed;
        assert_eq!(
            layers,
            if checkpointing { 2 } else { 0 },
            "layers recomputed"
        );
        let label = format!("checkpointing {checkpointing}");
        let checked = check_gradients(&label, &grads, &vars, &golden);
        assert_eq!(checked, 6);
        assert!(
            grads.get(&w.layers[0].q_proj).is_none() && grads.get(&w.embed_tokens).is_none(),
            "the base is frozen"
        );
    }
}

#[test]
fn a_saved_adapter_reads_back_and_a_fresh_one_changes_nothing() {
    let w = adapted();
    let dir = std::env::temp_dir().join(format!("ferrite-lora-{}", std::process::id()));
    w.save_adapter(&dir, DType::F32, Some("tiny-qwen2"))
        .unwrap();
    let (c, named) = load_adapter(&dir).unwrap();
    assert_eq!(Some(c.clone()), w.lora_config());
    for (n, t) in w.lora_named() {
        assert_eq!(max_abs_diff(&t, &named[&n]), 0.0, "{n}");
    }
    // a PEFT adapter ferrite would not apply as PEFT does is refused, naming what
    let config = std::fs::read_to_string(dir.join("adapter_config.json")).unwrap();
    for (from, to, says) in [
        ("\"use_dora\": false", "\"use_dora\": true", "DoRA"),
        (
            "\"r\": 4",
            "\"r\": 4, \"rank_pattern\": {\"q_proj\": 8}",
            "per-module",
        ),
        ("\"q_proj\"", "\"lm_head\"", "lm_head"),
    ] {
        std::fs::write(dir.join("adapter_config.json"), config.replace(from, to)).unwrap();
        let err = load_adapter(&dir).unwrap_err().to_string();
        assert!(err.contains(says), "{err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    // a matrix missing, or one the configuration does not explain
    let base = load("tiny-qwen2");
    let mut missing = named.clone();
    missing.remove("base_model.model.model.layers.1.mlp.up_proj.lora_B.weight");
    let err = base.with_lora_named(&c, &missing).unwrap_err().to_string();
    assert!(
        err.contains("layers.1.mlp.up_proj.lora_B") && err.contains("missing"),
        "{err}"
    );
    let fewer = LoraConfig {
        targets: vec![Target::Q],
        ..c
    };
    let err = base
        .with_lora_named(&fewer, &named)
        .unwrap_err()
        .to_string();
    assert!(err.contains("not an adapter matrix"), "{err}");
    // PEFT's initialisation: B = 0, so the adapted model is the base; A within ±1/√in
    let fresh = base
        .with_lora(
            &LoraConfig {
                rank: 8,
                alpha: 16.0,
                targets: Target::ALL.to_vec(),
            },
            3,
        )
        .unwrap();
    let (json, _) = golden("tiny-qwen2");
    let ids = u32_rows(&json["input_ids"]);
    let mask = u8_rows(&json["attention_mask"]);
    let batch = Batch::new(&ids, &mask, &Device::Cpu).unwrap();
    let (a, b) = (
        forward(&fresh, &batch, None).unwrap(),
        forward(&base, &batch, None).unwrap(),
    );
    assert_eq!(max_abs_diff(&a, &b), 0.0);
    let down = fresh.layers[0]
        .lora
        .as_ref()
        .unwrap()
        .get(Target::Down)
        .unwrap();
    let bound = 1.0 / (base.config.intermediate_size as f32).sqrt();
    assert!(max_abs(&down.a) <= bound && max_abs(&down.a) > 0.5 * bound);
    assert_eq!(down.a.dims(), [8, base.config.intermediate_size]);
}

/// Adapters on some of q, k and v only (the others get a zero block beside the one q/k/v
/// product): the adapted forward equals the merged weights' forward.
#[test]
fn adapters_on_part_of_q_k_v_give_the_merged_models_logits() {
    let (json, _) = golden("tiny-qwen2");
    let (c, named) = load_adapter(&fixture("tiny-qwen2-lora")).unwrap();
    for targets in [
        vec![Target::Q],
        vec![Target::K, Target::Down],
        vec![Target::V, Target::O],
    ] {
        let part = LoraConfig {
            targets: targets.clone(),
            ..c.clone()
        };
        let keep = |n: &String| {
            targets
                .iter()
                .any(|t| n.contains(&format!(".{}.", t.module())))
        };
        let named = named
            .iter()
            .filter(|(n, _)| keep(n))
            .map(|(n, t)| (n.clone(), t.clone()))
            .collect();
        let w = load("tiny-qwen2").with_lora_named(&part, &named).unwrap();
        let merged = w.merged().unwrap();
        let ids = u32_rows(&json["input_ids"]);
        let mask = u8_rows(&json["attention_mask"]);
        let batch = Batch::new(&ids, &mask, &Device::Cpu).unwrap();
        let reference = forward(&merged, &batch, None).unwrap();
        let d = logits_diff(&w, &json, &reference);
        assert!(d < 1e-4, "{targets:?}: {d:e}");
        assert!(
            logits_diff(&load("tiny-qwen2"), &json, &reference) > 1e-3,
            "{targets:?} changed nothing"
        );
    }
}
