//! AdamW against torch.optim.AdamW + clip_grad_norm_ (fixture from
//! scripts/make_learner_fixtures.py), on both update paths; state round trips; masks.

mod common;

use candle_core::{Device, Tensor, Var};
use common::max_diff;
use learner::optim::{AdamW, AdamWConfig};
use serde_json::Value;

fn fixture() -> Value {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/adamw.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn t2(v: &Value) -> Tensor {
    let rows: Vec<Vec<f32>> = serde_json::from_value(v.clone()).unwrap();
    Tensor::new(rows, &Device::Cpu).unwrap()
}

fn t1(v: &Value) -> Tensor {
    let xs: Vec<f32> = serde_json::from_value(v.clone()).unwrap();
    Tensor::new(xs, &Device::Cpu).unwrap()
}

fn run(composed: bool) {
    let f = fixture();
    let w = Var::from_tensor(&t2(&f["init"]["w"])).unwrap();
    let b = Var::from_tensor(&t1(&f["init"]["b"])).unwrap();
    let config = AdamWConfig {
        weight_decay: 0.1,
        max_grad_norm: Some(1.0),
        ..Default::default()
    };
    let vars = vec![("w".to_string(), w.clone()), ("b".to_string(), b.clone())];
    let mut opt = if composed {
        AdamW::new_composed(vars, config)
    } else {
        AdamW::new(vars, config)
    }
    .unwrap();
    for (k, s) in f["steps"].as_array().unwrap().iter().enumerate() {
        // a loss whose gradient is exactly the fixture's: Σ w·Gw + Σ b·Gb
        let loss = ((w.as_tensor() * t2(&s["grad_w"]))
            .unwrap()
            .sum_all()
            .unwrap()
            + (b.as_tensor() * t1(&s["grad_b"]))
                .unwrap()
                .sum_all()
                .unwrap())
        .unwrap();
        let missing = opt.accumulate(&loss.backward().unwrap(), 1.0).unwrap();
        assert!(missing.is_empty());
        let stats = opt.step(0.01).unwrap();
        let norm = s["grad_norm"].as_f64().unwrap();
        assert!(
            (stats.grad_norm - norm).abs() < 1e-5 * norm,
            "step {k}: grad norm {} vs {norm}",
            stats.grad_norm
        );
        assert_eq!(stats.clipped, norm > 1.0);
        let dw = max_diff(w.as_tensor(), &t2(&s["w"]));
        let db = max_diff(b.as_tensor(), &t1(&s["b"]));
        assert!(
            dw < 1e-6 && db < 1e-6,
            "composed={composed} step {k}: {dw:e} {db:e}"
        );
    }
}

#[test]
fn adamw_matches_torch_fused_host_path() {
    run(false);
}

#[test]
fn adamw_matches_torch_composed_path() {
    run(true);
}

#[test]
fn state_round_trips_and_masks_freeze_parameters() {
    let w =
        Var::from_tensor(&Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &Device::Cpu).unwrap()).unwrap();
    let grad = Tensor::new(&[[0.5f32, -0.5], [0.25, 1.0]], &Device::Cpu).unwrap();
    let config = AdamWConfig {
        weight_decay: 0.5,
        max_grad_norm: None,
        ..Default::default()
    };
    let step = |opt: &mut AdamW| {
        let loss = (w.as_tensor() * &grad).unwrap().sum_all().unwrap();
        opt.accumulate(&loss.backward().unwrap(), 1.0).unwrap();
        opt.step(0.1).unwrap();
    };
    let mut a = AdamW::new(vec![("w".into(), w.clone())], config).unwrap();
    a.set_mask("w", vec![true, false, true, false]).unwrap();
    step(&mut a);
    let after: Vec<f32> = w.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(
        (after[1], after[3]),
        (2.0, 4.0),
        "masked entries never move, weight decay included"
    );
    assert_ne!(after[0], 1.0);
    let dir = std::env::temp_dir().join(format!("ferrite-optim-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    a.save(&dir).unwrap();
    step(&mut a);
    let continued: Vec<f32> = w.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
    // restore the weights and the saved state, take the same step again
    w.set(
        &Tensor::new(after.clone(), &Device::Cpu)
            .unwrap()
            .reshape((2, 2))
            .unwrap(),
    )
    .unwrap();
    let mut b = AdamW::new(vec![("w".into(), w.clone())], config).unwrap();
    b.set_mask("w", vec![true, false, true, false]).unwrap();
    b.load(&dir).unwrap();
    assert_eq!(b.steps(), 1);
    step(&mut b);
    let resumed: Vec<f32> = w.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(
        resumed, continued,
        "a resumed optimizer takes the identical step"
    );
}

#[test]
fn non_finite_gradients_skip_the_step() {
    let w = Var::from_tensor(&Tensor::new(&[1f32, 2.0], &Device::Cpu).unwrap()).unwrap();
    let mut opt = AdamW::new(vec![("w".into(), w.clone())], AdamWConfig::default()).unwrap();
    let loss = (w.as_tensor() * Tensor::new(&[f32::NAN, 1.0], &Device::Cpu).unwrap())
        .unwrap()
        .sum_all()
        .unwrap();
    opt.accumulate(&loss.backward().unwrap(), 1.0).unwrap();
    let stats = opt.step(0.1).unwrap();
    assert!(stats.skipped);
    assert_eq!(w.as_tensor().to_vec1::<f32>().unwrap(), vec![1.0, 2.0]);
    assert_eq!(opt.steps(), 0);
}

/// A non-finite micro-batch loss is reported with no gradient and drops what the step had
/// accumulated: the step then moves each weight by the later micro-batch's gradient alone
/// (Adam's first step is about `lr · sign(g)`; with the dropped `[1, 1]` kept, the second weight
/// would see a zero gradient and not rise).
#[test]
fn a_non_finite_loss_drops_the_steps_gradient() {
    let w = Var::from_tensor(&Tensor::new(&[1f32, 2.0], &Device::Cpu).unwrap()).unwrap();
    let mut opt = AdamW::new(vec![("w".into(), w.clone())], AdamWConfig::default()).unwrap();
    let loss_times = |c: &[f32]| {
        (w.as_tensor() * Tensor::new(c, &Device::Cpu).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
    };
    let (value, missing) = opt.backward(&loss_times(&[1.0, 1.0])).unwrap();
    assert_eq!((value, missing), (3.0, Some(vec![])));
    let (value, missing) = opt.backward(&loss_times(&[f32::INFINITY, 1.0])).unwrap();
    assert!(
        value.is_infinite() && missing.is_none(),
        "{value} {missing:?}"
    );
    let (value, missing) = opt.backward(&loss_times(&[1.0, -1.0])).unwrap();
    assert_eq!((value, missing), (-1.0, Some(vec![])));
    opt.step(0.1).unwrap();
    assert_eq!(opt.steps(), 1);
    let after = w.as_tensor().to_vec1::<f32>().unwrap();
    assert!(after[0] < 1.0 && after[1] > 2.0, "{after:?}");
}

/// bf16 parameters keep an f32 master copy on both update paths: updates far below bf16's
/// resolution (lr 1e-4 on weights near 1, whose bf16 spacing is 2⁻⁷) accumulate in the master
/// and reach the weights, the two paths agree, and a saved state resumes from the master.
#[test]
fn bf16_parameters_update_through_an_f32_master() {
    use candle_core::DType;
    let init = Tensor::new(&[[1f32, -1.0], [0.5, 2.0]], &Device::Cpu)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    let grad = Tensor::new(&[[1f32, -1.0], [1.0, 1.0]], &Device::Cpu).unwrap();
    let config = AdamWConfig {
        weight_decay: 0.0,
        max_grad_norm: None,
        ..Default::default()
    };
    let step = |w: &Var, opt: &mut AdamW| {
        let loss = (w.as_tensor().to_dtype(DType::F32).unwrap() * &grad)
            .unwrap()
            .sum_all()
            .unwrap();
        opt.accumulate(&loss.backward().unwrap(), 1.0).unwrap();
        opt.step(1e-4).unwrap();
    };
    let values = |w: &Var| -> Vec<f32> {
        w.as_tensor()
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let mut finals = Vec::new();
    for composed in [false, true] {
        let w = Var::from_tensor(&init).unwrap();
        let vars = vec![("w".to_string(), w.clone())];
        let mut opt = if composed {
            AdamW::new_composed(vars, config)
        } else {
            AdamW::new(vars, config)
        }
        .unwrap();
        step(&w, &mut opt);
        assert_eq!(
            values(&w),
            values(&Var::from_tensor(&init).unwrap()),
            "one step of 1e-4 is below bf16's spacing"
        );
        for _ in 0..99 {
            step(&w, &mut opt);
        }
        // Adam's steps are ~lr each: 100 of them move every weight by about 0.01 against its gradient
        let after = values(&w);
        let before = [1f32, -1.0, 0.5, 2.0];
        let signs = [1f32, -1.0, 1.0, 1.0];
        for i in 0..4 {
            let moved = (before[i] - after[i]) * signs[i];
            assert!(
                (0.005..0.02).contains(&moved),
                "composed={composed} weight {i} moved {moved}"
            );
        }
        // the saved state carries the master: a fresh optimizer over the rounded weights
        // continues exactly as the original does
        let dir = std::env::temp_dir().join(format!(
            "ferrite-optim-bf16-{}-{composed}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        opt.save(&dir).unwrap();
        let w2 = Var::from_tensor(w.as_tensor()).unwrap();
        let vars = vec![("w".to_string(), w2.clone())];
        let mut resumed = if composed {
            AdamW::new_composed(vars, config)
        } else {
            AdamW::new(vars, config)
        }
        .unwrap();
        resumed.load(&dir).unwrap();
        for _ in 0..50 {
            step(&w, &mut opt);
            step(&w2, &mut resumed);
        }
        assert_eq!(
            values(&w2),
            values(&w),
            "composed={composed}: resumed from the master"
        );
        finals.push(values(&w));
        std::fs::remove_dir_all(&dir).ok();
    }
    assert_eq!(finals[0], finals[1], "host and composed paths agree");
}

/// A step of one micro-batch keeps a bf16 parameter's gradient in bf16 until the update widens
/// it (no f32 copy of every gradient); two half-weighted micro-batches accumulate in f32. The
/// two must update the weights, the master and the gradient norm identically (halving and
/// doubling are exact), with and without clipping.
#[test]
fn a_single_bf16_gradient_updates_as_the_f32_accumulated_one() {
    use candle_core::DType;
    let init = Tensor::new(&[[1f32, -1.0, 0.25], [0.5, 2.0, -3.0]], &Device::Cpu)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    let grad = Tensor::new(&[[0.3f32, -1.7, 0.01], [2.5, 1.1, -0.4]], &Device::Cpu).unwrap();
    for max_grad_norm in [None, Some(0.5)] {
        let config = AdamWConfig {
            weight_decay: 0.1,
            max_grad_norm,
            ..Default::default()
        };
        let run = |micro_batches: usize| {
            let w = Var::from_tensor(&init).unwrap();
            let vars = vec![("w".to_string(), w.clone())];
            let mut opt = AdamW::new_composed(vars, config).unwrap();
            let mut norms = Vec::new();
            for _ in 0..3 {
                for _ in 0..micro_batches {
                    let loss = (w.as_tensor().to_dtype(DType::F32).unwrap() * &grad)
                        .unwrap()
                        .sum_all()
                        .unwrap();
                    let grads = loss.backward().unwrap();
                    assert_eq!(grads.get(w.as_tensor()).unwrap().dtype(), DType::BF16);
                    opt.accumulate(&grads, 1.0 / micro_batches as f64).unwrap();
                }
                norms.push(opt.step(1e-2).unwrap().grad_norm);
            }
            let dir = std::env::temp_dir().join(format!(
                "ferrite-optim-bf16-grad-{}-{micro_batches}-{max_grad_norm:?}",
                std::process::id()
            ));
            std::fs::create_dir_all(&dir).unwrap();
            opt.save(&dir).unwrap();
            let saved = std::fs::read(dir.join("optimizer.safetensors")).unwrap();
            let _ = std::fs::remove_dir_all(&dir);
            let w = w
                .as_tensor()
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap();
            (w.to_vec1::<f32>().unwrap(), norms, saved)
        };
        let (one, two) = (run(1), run(2));
        assert_ne!(
            one.0,
            init.to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        );
        assert_eq!(one.0, two.0, "weights, clip {max_grad_norm:?}");
        assert_eq!(one.1, two.1, "gradient norms, clip {max_grad_norm:?}");
        assert!(
            one.2 == two.2,
            "masters and moments, clip {max_grad_norm:?}"
        );
    }
}

/// f16 parameters: the loss is scaled before its backward and the gradient unscaled before the
/// update. A gradient of 1e-9, below f16's smallest subnormal (6e-8), reaches the weights through
/// the default scale (2¹⁶) and is flushed to zero without one (scale 1); the reported norm is the
/// unscaled gradient's, as f32 parameters report it.
#[test]
fn the_loss_scale_carries_f16_gradients_below_f16s_range() {
    use candle_core::DType;
    let tiny = Tensor::new(&[1e-9f32, -1e-9], &Device::Cpu).unwrap();
    let step = |dtype: DType, initial_loss_scale: f64| {
        let init = Tensor::new(&[1f32, 1.0], &Device::Cpu).unwrap();
        let w = Var::from_tensor(&init.to_dtype(dtype).unwrap()).unwrap();
        let config = AdamWConfig {
            initial_loss_scale,
            ..Default::default()
        };
        let mut opt = AdamW::new(vec![("w".into(), w.clone())], config).unwrap();
        assert_eq!(opt.loss_scale().is_some(), dtype == DType::F16);
        let loss = (w.as_tensor().to_dtype(DType::F32).unwrap() * &tiny)
            .unwrap()
            .sum_all()
            .unwrap();
        opt.backward(&loss).unwrap();
        let stats = opt.step(0.1).unwrap();
        let w = w.as_tensor().to_dtype(DType::F32).unwrap();
        (stats.grad_norm, w.to_vec1::<f32>().unwrap())
    };
    let (norm32, w32) = step(DType::F32, 65536.0);
    let (norm16, w16) = step(DType::F16, 65536.0);
    assert!(
        (norm16 - norm32).abs() < 1e-3 * norm32,
        "{norm16:e} vs {norm32:e}"
    );
    // Adam's first step, g/(|g| + eps) = ±1/11 of lr (eps = 1e-8 damps a gradient this small):
    // 0.991 and 1.009, which f16 holds to its spacing there (2⁻¹⁰)
    assert!(w32[0] < 0.995 && w32[1] > 1.005, "{w32:?}");
    for (a, b) in w16.iter().zip(&w32) {
        assert!((a - b).abs() < 1e-3, "{w16:?} vs {w32:?}");
    }
    let (norm, w) = step(DType::F16, 1.0);
    assert_eq!(
        (norm, w),
        (0.0, vec![1.0, 1.0]),
        "unscaled, the gradient flushes to zero"
    );
}

/// A scaled f16 gradient that overflows (3 · 2¹⁶ > 65504) halves the scale and the step runs
/// again on the same batch through `fitted`, until it is finite (here at 2¹⁴): the step is taken,
/// not skipped, with the unscaled gradient. Its state (scale, overflows) survives a save and load.
/// Where even scale 1 overflows the gradient is the step's own: it is skipped, the scale stays 1.
#[test]
fn an_overflowing_f16_gradient_runs_again_at_half_the_scale() {
    use candle_core::DType;
    let dir = std::env::temp_dir().join(format!("ferrite-loss-scale-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fresh = || {
        let init = Tensor::new(&[1f32, 1.0], &Device::Cpu).unwrap();
        let w = Var::from_tensor(&init.to_dtype(DType::F16).unwrap()).unwrap();
        let opt = AdamW::new(vec![("w".into(), w.clone())], AdamWConfig::default()).unwrap();
        (w, opt)
    };
    let run = |w: &Var, opt: &mut AdamW, grad: [f32; 2]| {
        let g = Tensor::new(&grad, &Device::Cpu).unwrap();
        let mut calls = 0;
        learner::fit::fitted(opt, 1, &|r| r.len(), 1, |opt, _| {
            calls += 1;
            let loss = (w.as_tensor().to_dtype(DType::F32)? * &g)?.sum_all()?;
            opt.backward(&loss)
        })
        .unwrap();
        (calls, opt.step(0.01).unwrap())
    };
    let (w, mut opt) = fresh();
    let (calls, stats) = run(&w, &mut opt, [3.0, 1.0]);
    let scale = opt.loss_scale().unwrap();
    assert_eq!((calls, scale.scale, scale.overflows), (3, 16384.0, 2));
    assert!(!stats.skipped);
    assert!((stats.grad_norm - 10f64.sqrt()).abs() < 1e-6, "{stats:?}");
    assert_eq!(opt.steps(), 1);

    opt.save(&dir).unwrap();
    let (_, mut resumed) = fresh();
    resumed.load(&dir).unwrap();
    assert_eq!(resumed.loss_scale(), opt.loss_scale());
    std::fs::remove_dir_all(&dir).ok();

    let before = w.as_tensor().to_dtype(DType::F32).unwrap();
    let (calls, stats) = run(&w, &mut opt, [1e5, 1.0]);
    let scale = opt.loss_scale().unwrap();
    assert_eq!(
        (calls, scale.scale),
        (15, 1.0),
        "16384 halves 14 times to 1"
    );
    assert!(stats.skipped && opt.steps() == 1, "{stats:?}");
    let after = w.as_tensor().to_dtype(DType::F32).unwrap();
    assert_eq!(max_diff(&before, &after), 0.0);

    // a step taken without `fitted` skips an overflow and halves the scale for the next
    let (w, mut opt) = fresh();
    let loss = (w.as_tensor().to_dtype(DType::F32).unwrap()
        * Tensor::new(&[3f32, 1.0], &Device::Cpu).unwrap())
    .unwrap()
    .sum_all()
    .unwrap();
    opt.backward(&loss).unwrap();
    assert!(opt.step(0.01).unwrap().skipped);
    assert_eq!(opt.loss_scale().unwrap().scale, 32768.0);
}
