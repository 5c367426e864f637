//! Subnetwork analysis against PyTorch / NumPy (scripts/make_analysis_fixtures.py): the bf16
//! bitwise and `|Δ| > 1e-5` masks, Frobenius norms, sparsity, overlaps and their random
//! baselines; and subnetwork-only training leaves every masked parameter bit-identical.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use learner::optim::{AdamW, AdamWConfig};
use learner::step::{policy_step, Sequence, StepConfig};
use learner::subnetwork::{model_update, overlap, sparsity, Bitset};
use model::Weights;
use serde_json::Value;

fn fixture() -> Value {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/subnetwork.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn tensor(v: &Value) -> Tensor {
    match v {
        Value::Array(rows) if rows.first().is_some_and(Value::is_array) => {
            let rows: Vec<Vec<f32>> = serde_json::from_value(v.clone()).unwrap();
            Tensor::new(rows, &Device::Cpu).unwrap()
        }
        _ => Tensor::new(
            serde_json::from_value::<Vec<f32>>(v.clone()).unwrap(),
            &Device::Cpu,
        )
        .unwrap(),
    }
}

fn bits(v: &Value) -> Vec<bool> {
    serde_json::from_value::<Vec<u8>>(v.clone())
        .unwrap()
        .into_iter()
        .map(|b| b == 1)
        .collect()
}

#[test]
fn update_masks_norms_and_sparsity_match_the_reference() {
    let f = fixture();
    let u = &f["update"];
    let tol = u["tol"].as_f64().unwrap();
    let mut base = BTreeMap::new();
    let mut updated = BTreeMap::new();
    for (name, t) in u["tensors"].as_object().unwrap() {
        base.insert(name.clone(), tensor(&t["base"]));
        updated.insert(name.clone(), tensor(&t["updated"]));
    }
    let updates = model_update(&base, &updated, tol).unwrap();
    for up in &updates {
        let want = &u["tensors"][&up.name];
        let got_bf: Vec<bool> = (0..up.numel()).map(|i| up.changed_bf16.get(i)).collect();
        let got_tol: Vec<bool> = (0..up.numel()).map(|i| up.changed_tol.get(i)).collect();
        assert_eq!(got_bf, bits(&want["changed_bf16"]), "{} bf16", up.name);
        assert_eq!(got_tol, bits(&want["changed_tol"]), "{} tol", up.name);
        let frob = want["frobenius"].as_f64().unwrap();
        assert!(
            (up.frobenius - frob).abs() < 1e-6 * frob.max(1.0),
            "{}",
            up.name
        );
        // the fixture mixes untouched, sub-resolution and moved entries
        assert!(up.changed_bf16.count() > 0 && up.changed_bf16.count() < up.numel() as u64);
    }
    let s = sparsity(&updates);
    let all = s.iter().find(|g| g.group == "all").unwrap();
    assert_eq!(all.parameters, u["all"]["parameters"].as_u64().unwrap());
    assert!((all.unchanged_bf16 - u["all"]["unchanged_bf16"].as_f64().unwrap()).abs() < 1e-12);
    assert!((all.unchanged_tol - u["all"]["unchanged_tol"].as_f64().unwrap()).abs() < 1e-12);
    let groups: Vec<&str> = s.iter().map(|g| g.group.as_str()).collect();
    for g in [
        "layer.000",
        "layer.001",
        "type.q_proj",
        "type.up_proj",
        "type.input_layernorm",
        "type.embed_tokens",
    ] {
        assert!(groups.contains(&g), "{g} in {groups:?}");
    }
    let layer1 = s.iter().find(|g| g.group == "layer.001").unwrap();
    assert_eq!(layer1.parameters, 6 * 4 + 6);
}

#[test]
fn overlaps_and_random_baselines_match_the_reference() {
    let f = fixture();
    let o = &f["overlap"];
    let a = bits(&o["a"]);
    let b = bits(&o["b"]);
    // split into two "tensors" to exercise the per-tensor sum
    let (a1, a2) = a.split_at(600);
    let (b1, b2) = b.split_at(600);
    let mk = |x: &[bool]| Bitset::from_fn(x.len(), |i| x[i]);
    let (a1, a2, b1, b2) = (mk(a1), mk(a2), mk(b1), mk(b2));
    let got = overlap(&[&a1, &a2], &[&b1, &b2]).unwrap();
    for (name, value) in [
        ("o1", got.o1),
        ("o2", got.o2),
        ("jaccard", got.jaccard),
        ("o1_random", got.o1_random),
        ("o2_random", got.o2_random),
        ("jaccard_random", got.jaccard_random),
    ] {
        let want = o[name].as_f64().unwrap();
        assert!((value - want).abs() < 1e-12, "{name}: {value} vs {want}");
    }
    // the closed forms agree with the script's Monte Carlo over random masks of the same sizes
    let mc = &o["monte_carlo"];
    assert!((got.o1_random - mc["o1"].as_f64().unwrap()).abs() < 0.005);
    assert!((got.jaccard_random - mc["jaccard"].as_f64().unwrap()).abs() < 0.005);
    assert!(overlap(&[&a1], &[&b2]).is_err(), "masks of different sizes");
    // bitsets round-trip through their stored bytes
    assert_eq!(Bitset::from_bytes(a1.len, &a1.to_bytes()).unwrap(), a1);
    assert!(Bitset::from_bytes(a1.len, &a1.to_bytes()[1..]).is_err());
}

#[test]
fn subnetwork_only_training_leaves_masked_parameters_bit_identical() {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../model/tests/fixtures/tiny-qwen2");
    let base = Weights::load_dir(&dir, DType::F32, &Device::Cpu).unwrap();
    let (vars, w) = base.to_vars().unwrap();
    let mut opt = AdamW::new(
        vars,
        AdamWConfig {
            weight_decay: 0.1,
            ..Default::default()
        },
    )
    .unwrap();
    // a mask that frees every third entry of every tensor
    let names: Vec<(String, usize)> = opt
        .vars()
        .map(|(n, v)| (n.to_string(), v.as_tensor().elem_count()))
        .collect();
    for (name, n) in &names {
        opt.set_mask(name, (0..*n).map(|i| i % 3 == 0).collect())
            .unwrap();
    }
    let seqs = vec![
        Sequence::new(vec![5, 6, 7], vec![10, 11, 12], vec![-3.0; 3], 1.0),
        Sequence::new(vec![8, 9], vec![30, 31], vec![-3.0; 2], -1.0),
    ];
    let cfg = StepConfig {
        loss: Default::default(),
        micro_batch_tokens: 1 << 12,
        temperature: 1.0,
        max_completion_length: 3,
        value: None,
    };
    for _ in 0..4 {
        let m = policy_step(&w, None, None, &mut opt, &seqs, &cfg, 1e-2).unwrap();
        assert!(m.grad_norm > 0.0);
    }
    let before = base.named();
    let after = w.detach().named();
    let updates = model_update(&before, &after, 0.0).unwrap();
    let mut moved = 0;
    for (name, b) in &before {
        let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let a = after[name].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (i, (x, y)) in b.iter().zip(&a).enumerate() {
            if i % 3 != 0 {
                assert_eq!(x.to_bits(), y.to_bits(), "{name}[{i}] moved");
            } else if x != y {
                moved += 1;
            }
        }
    }
    assert!(moved > 0, "the free entries train");
    // the analysis sees the same thing: nothing outside the mask changed
    for u in &updates {
        assert!(
            (0..u.numel()).all(|i| i % 3 == 0 || !u.changed_bf16.get(i)),
            "{}",
            u.name
        );
    }
}
