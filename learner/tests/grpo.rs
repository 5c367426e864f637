//! GRPO-family losses and gradients against the spec's formulas written out in PyTorch
//! (scripts/make_learner_fixtures.py), on a padded batch of unequal lengths; TRL's group
//! advantages; TRL's importance-sampling correction of the sampler's log-probs.

mod common;

use common::max_diff;

use candle_core::{Device, Tensor, Var};
use learner::correction::{importance_weights, BehaviourCorrection};
use learner::covariance::select;
use learner::grpo::{
    group_advantages, policy_loss, Aggregation, KlEstimator, PolicyInputs, PolicyLossConfig,
    RatioLevel, ScaleRewards, StepTotals, Surrogate,
};
use learner::step::{high_entropy, Sequence};
use model::rng::Rng;
use serde_json::Value;

fn fixture(name: &str) -> Value {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(format!("tests/fixtures/{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn t2(v: &Value) -> Tensor {
    let rows: Vec<Vec<f32>> = serde_json::from_value(v.clone()).unwrap();
    Tensor::new(rows, &Device::Cpu).unwrap()
}

fn parse<T: serde::de::DeserializeOwned>(v: &Value) -> T {
    serde_json::from_value(v.clone()).unwrap()
}

/// A fixture's padded batch: the behaviour and reference log-probs, entropies, advantages and
/// mask (`[B, T]`), and the step's totals.
struct Batch {
    old: Tensor,
    reference: Tensor,
    entropy: Tensor,
    adv: Tensor,
    mask: Tensor,
    totals: StepTotals,
}

fn batch(f: &Value) -> Batch {
    let tot = &f["totals"];
    Batch {
        old: t2(&f["old"]),
        reference: t2(&f["ref"]),
        entropy: t2(&f["entropy"]),
        adv: t2(&f["advantages"]),
        mask: t2(&f["mask"]),
        totals: StepTotals {
            sequences: parse(&tot["sequences"]),
            tokens: parse(&tot["tokens"]),
            micro_batches: parse(&tot["micro_batches"]),
            max_completion_length: parse(&tot["max_completion_length"]),
        },
    }
}

#[test]
fn losses_and_gradients_match_the_reference_for_every_variant() {
    let f = fixture("grpo");
    let Batch {
        old,
        reference,
        entropy,
        adv,
        mask,
        totals,
    } = batch(&f);
    let sampling = t2(&f["sampling"]);
    let cases = f["cases"].as_array().unwrap();
    assert_eq!(
        cases.len(),
        194,
        "64 clipped-surrogate cases, 32 CISPO, 32 SAPO, 16 seq-sum, 2 LUSPO (TRL's formula), 36 \
         importance-weighted, 12 off-policy masked"
    );
    for case in cases {
        let c = &case["config"];
        // the weights as the learner computes them from ragged rows (`old` is the proximal policy)
        let weights = (!c["correction"].is_null()).then(|| {
            let mode = parse::<BehaviourCorrection>(&c["correction"]);
            corrected(&f, mode).0
        });
        let config = PolicyLossConfig {
            clip_low: parse(&c["clip_low"]),
            clip_high: parse(&c["clip_high"]),
            dual_clip: parse(&c["dual_clip"]),
            ratio: parse::<RatioLevel>(&c["ratio"]),
            aggregation: parse::<Aggregation>(&c["aggregation"]),
            kl: parse::<KlEstimator>(&c["kl"]),
            kl_coef: parse(&c["kl_coef"]),
            entropy_coef: parse(&c["entropy_coef"]),
            surrogate: match c["loss"].as_str() {
                Some("cispo") => Surrogate::Cispo {
                    max: parse(&c["cispo_max"]),
                },
                Some("sapo") => Surrogate::Sapo {
                    tau_pos: parse(&c["sapo_tau_pos"]),
                    tau_neg: parse(&c["sapo_tau_neg"]),
                },
                _ => Surrogate::Clip,
            },
            off_policy_mask: parse(&c["off_policy_mask"]),
        };
        let logp = Var::from_tensor(&t2(&f["logp"])).unwrap();
        let inputs = PolicyInputs {
            logprobs: logp.as_tensor(),
            old_logprobs: &old,
            advantages: &if c["negate_advantages"] == true {
                adv.neg().unwrap()
            } else {
                adv.clone()
            },
            mask: &mask,
            ref_logprobs: Some(&reference),
            entropy: Some(&entropy),
            importance_weights: weights.as_ref(),
            sampler_logprobs: Some(&sampling),
            covariance_selected: None,
            kl_entropy_mask: None,
            micro_batch_valid: None,
        };
        let (loss, _) = policy_loss(&inputs, &config, &totals).unwrap();
        assert_loss_and_gradient(case, &loss, &logp);
    }
}

/// `loss` against the case's `loss`, and its gradient in `logp` against the case's `grad`.
fn assert_loss_and_gradient(case: &Value, loss: &Tensor, logp: &Var) {
    let c = &case["config"];
    let got = loss.to_scalar::<f32>().unwrap() as f64;
    let want: f64 = parse(&case["loss"]);
    assert!((got - want).abs() < 1e-5, "{c}: loss {got} vs {want}");
    let grads = loss.backward().unwrap();
    let d = max_diff(grads.get(logp.as_tensor()).unwrap(), &t2(&case["grad"]));
    assert!(d < 1e-5, "{c}: gradient off by {d}");
}

/// Clip-Cov and KL-Cov against verl's formulas: the tokens [`select`] picks from the ragged rows
/// (the behaviour log-probs `old` and the advantages) are verl's, and the loss and its gradient
/// with them match.
#[test]
fn clip_cov_and_kl_cov_pick_verls_tokens_and_match_its_loss() {
    let f = fixture("covariance");
    let Batch {
        old,
        reference,
        entropy,
        adv,
        mask,
        totals,
    } = batch(&f);
    let seqs: Vec<Sequence> = ragged(&f, "old")
        .into_iter()
        .zip(ragged(&f, "advantages"))
        .map(|(o, a)| Sequence::new(vec![1], vec![2; o.len()], o, a[0]))
        .collect();
    let cases = f["cases"].as_array().unwrap();
    assert_eq!(
        cases.len(),
        20,
        "3 KL-Cov and 2 Clip-Cov selections × 4 losses"
    );
    for case in cases {
        let c = &case["config"];
        let surrogate = match c["loss"].as_str() {
            Some("kl_cov") => Surrogate::KlCov {
                ratio: parse(&c["kl_cov_ratio"]),
                coef: parse(&c["kl_cov_coef"]),
            },
            _ => Surrogate::ClipCov {
                ratio: parse(&c["clip_cov_ratio"]),
                low: parse(&c["clip_cov_lb"]),
                high: parse(&c["clip_cov_ub"]),
            },
        };
        let picked = select(&seqs, surrogate, &mut Rng::new(0)).unwrap();
        let t = mask.dim(1).unwrap();
        let picked: Vec<Vec<f32>> = picked
            .iter()
            .map(|row| {
                (0..t)
                    .map(|j| f32::from(u8::from(row.get(j) == Some(&true))))
                    .collect()
            })
            .collect();
        let want: Vec<Vec<f32>> = parse(&case["selected"]);
        assert_eq!(picked, want, "{c}: the tokens picked");
        let count: f32 = parse(&case["count"]);
        assert_eq!(picked.iter().flatten().sum::<f32>(), count, "{c}");
        let selected = Tensor::new(picked, &Device::Cpu).unwrap();
        let config = token_loss(c, surrogate);
        let logp = Var::from_tensor(&t2(&f["logp"])).unwrap();
        let inputs = PolicyInputs {
            covariance_selected: Some(&selected),
            ref_logprobs: Some(&reference),
            entropy: Some(&entropy),
            ..row_inputs(logp.as_tensor(), &old, &adv, &mask)
        };
        let (loss, stats) = policy_loss(&inputs, &config, &totals).unwrap();
        let share = stats.read().unwrap().covariance_selected_frac;
        assert!(
            (share - f64::from(count) / totals.tokens).abs() < 1e-9,
            "{c}: {share}"
        );
        assert_loss_and_gradient(case, &loss, &logp);
        // without the selection the loss refuses to run
        let none = PolicyInputs {
            covariance_selected: None,
            ..row_inputs(logp.as_tensor(), &old, &adv, &mask)
        };
        assert!(policy_loss(&none, &config, &totals).is_err());
    }
}

/// DPPO-Binary-TV and -KL against verl's formulas: the loss, its gradient, and the tokens outside
/// the trust region as the clip statistics count them (by the advantage's sign).
#[test]
fn dppo_matches_verls_loss_and_trust_region() {
    let f = fixture("dppo");
    let b = batch(&f);
    let cases = f["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 32, "2 losses × 2 regions × 2 caps × 4 losses");
    for case in cases {
        let c = &case["config"];
        let (low, high, cap) = (
            parse(&c["dppo_low"]),
            parse(&c["dppo_high"]),
            parse(&c["dppo_cap"]),
        );
        let surrogate = match c["loss"].as_str() {
            Some("dppo_tv") => Surrogate::DppoTv { low, high, cap },
            _ => Surrogate::DppoKl { low, high, cap },
        };
        let keys = ["outside_negative", "outside_positive"];
        assert_case(&f, &b, case, &token_loss(c, surrogate), keys);
    }
}

/// A fixture case's loss, gradient and clip shares (`keys`: the low and the high one) under
/// `config`, on the fixture's batch with its reference log-probs and entropies.
fn assert_case(f: &Value, b: &Batch, case: &Value, config: &PolicyLossConfig, keys: [&str; 2]) {
    let c = &case["config"];
    let logp = Var::from_tensor(&t2(&f["logp"])).unwrap();
    let inputs = PolicyInputs {
        ref_logprobs: Some(&b.reference),
        entropy: Some(&b.entropy),
        ..row_inputs(logp.as_tensor(), &b.old, &b.adv, &b.mask)
    };
    let (loss, stats) = policy_loss(&inputs, config, &b.totals).unwrap();
    let stats = stats.read().unwrap();
    for (got, key) in [
        (stats.clip_low_frac, keys[0]),
        (stats.clip_high_frac, keys[1]),
    ] {
        let want: f64 = parse(&case[key]);
        assert!((got - want).abs() < 1e-6, "{c} {key}: {got} vs {want}");
    }
    assert_loss_and_gradient(case, &loss, &logp);
}

#[test]
fn gmpo_and_gpg_match_verls_losses() {
    let f = fixture("gmpo_gpg");
    let b = batch(&f);
    let cases = f["cases"].as_array().unwrap();
    assert_eq!(
        cases.len(),
        8,
        "GMPO: 2 clip ranges × 2 losses; GPG: 2 aggregations × 2"
    );
    for case in cases {
        let c = &case["config"];
        let config = match c["loss"].as_str() {
            Some("geo_mean") => PolicyLossConfig {
                clip_low: parse(&c["clip_low"]),
                clip_high: parse(&c["clip_high"]),
                ..token_loss(c, Surrogate::GeoMean)
            },
            _ => token_loss(c, Surrogate::Gpg),
        };
        assert_case(&f, &b, case, &config, ["clip_low_frac", "clip_high_frac"]);
    }
}

/// TRL's `top_entropy_quantile`: the tokens kept (at or above the valid tokens' `1 − ρ`
/// quantile of entropy) and the loss with the others' policy term weighted 0.
#[test]
fn top_entropy_tokens_and_loss_match_trl() {
    let f = fixture("top_entropy");
    let b = batch(&f);
    let cases = f["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 6, "3 quantiles × 2 losses");
    let entropies = ragged(&f, "entropy");
    for case in cases {
        let c = &case["config"];
        let rho: f64 = parse(&c["top_entropy_quantile"]);
        let keep = high_entropy(&entropies, &[true; 5], rho);
        let want: Vec<Vec<f32>> = parse(&case["keep"]);
        for (got, want) in keep.iter().zip(&want) {
            let want: Vec<bool> = want[..got.len()].iter().map(|&k| k > 0.0).collect();
            assert_eq!(got, &want, "ρ {rho}");
        }
        // the low-entropy tokens' policy term weighted 0, as `update` weights it
        let t = want[0].len();
        let weights: Vec<Vec<f32>> = keep
            .iter()
            .map(|k| {
                let mut w: Vec<f32> = k.iter().map(|&k| f32::from(u8::from(k))).collect();
                w.resize(t, 1.0);
                w
            })
            .collect();
        let weights = Tensor::new(weights, &Device::Cpu).unwrap();
        let config = token_loss(c, Surrogate::Clip);
        let logp = Var::from_tensor(&t2(&f["logp"])).unwrap();
        let inputs = PolicyInputs {
            ref_logprobs: Some(&b.reference),
            entropy: Some(&b.entropy),
            importance_weights: Some(&weights),
            ..row_inputs(logp.as_tensor(), &b.old, &b.adv, &b.mask)
        };
        let (loss, _) = policy_loss(&inputs, &config, &b.totals).unwrap();
        assert_loss_and_gradient(case, &loss, &logp);
    }
    // no valid token: every token kept
    let all = high_entropy(&entropies, &[false; 5], 0.2);
    assert!(all.iter().flatten().all(|&k| k));
}

/// A case's aggregation, KL and entropy terms with `surrogate`, the clip at its defaults.
fn token_loss(c: &Value, surrogate: Surrogate) -> PolicyLossConfig {
    PolicyLossConfig {
        aggregation: parse::<Aggregation>(&c["aggregation"]),
        kl: parse::<KlEstimator>(&c["kl"]),
        kl_coef: parse(&c["kl_coef"]),
        entropy_coef: parse(&c["entropy_coef"]),
        surrogate,
        ..PolicyLossConfig::default()
    }
}

/// The fixture's valid tokens of `key` (`[B, T]`), one vector per row.
fn ragged(f: &Value, key: &str) -> Vec<Vec<f32>> {
    let rows: Vec<Vec<f32>> = parse(&f[key]);
    let mask: Vec<Vec<f32>> = parse(&f["mask"]);
    rows.iter()
        .zip(&mask)
        .map(|(r, m)| r[..m.iter().filter(|&&x| x > 0.0).count()].to_vec())
        .collect()
}

/// `importance_weights` on the fixture's rows (the step's own log-probs `old` against the
/// sampler's), padded back to `[B, T]` with ones.
fn corrected(
    f: &Value,
    mode: BehaviourCorrection,
) -> (Tensor, learner::correction::CorrectionStats) {
    let cap: f64 = parse(&f["correction_cap"]);
    let (w, stats) = importance_weights(&ragged(f, "old"), &ragged(f, "sampling"), mode, cap);
    let t = f["mask"][0].as_array().unwrap().len();
    let padded: Vec<Vec<f32>> = w
        .into_iter()
        .map(|mut r| {
            r.resize(t, 1.0);
            r
        })
        .collect();
    (Tensor::new(padded, &Device::Cpu).unwrap(), stats)
}

/// M2PO's token mask against AReaL's `_get_m2po_loss_mask` on ragged rows: thresholds that mask
/// some tokens, none, and all but one.
#[test]
fn m2po_keeps_the_tokens_areal_keeps() {
    let f = fixture("m2po");
    let (proximal, behaviour): (Vec<Vec<f32>>, Vec<Vec<f32>>) =
        (parse(&f["proximal"]), parse(&f["behaviour"]));
    let valid = vec![true; proximal.len()];
    let cases = f["cases"].as_array().unwrap();
    for case in cases {
        let threshold: f64 = parse(&case["threshold"]);
        let (kept, m2) = learner::correction::m2_kept(&proximal, &behaviour, &valid, threshold);
        assert_eq!(
            kept,
            parse::<Vec<Vec<bool>>>(&case["kept"]),
            "at {threshold}"
        );
        let masked = kept.iter().flatten().filter(|&&k| !k).count();
        assert_eq!(masked, parse::<usize>(&case["masked"]), "at {threshold}");
        assert!(
            (m2 - parse::<f64>(&case["m2"])).abs() < 1e-6,
            "at {threshold}"
        );
    }
    let masked: Vec<usize> = cases.iter().map(|c| parse(&c["masked"])).collect();
    assert!(
        masked.contains(&0) && masked.iter().any(|&m| m > 0 && m < 20),
        "{masked:?}"
    );
}

#[test]
fn importance_weights_and_their_statistics_match_trl() {
    let f = fixture("grpo");
    let mask = t2(&f["mask"]);
    for (name, want) in f["correction"].as_object().unwrap() {
        let mode = parse::<BehaviourCorrection>(&Value::String(name.clone()));
        let (w, s) = corrected(&f, mode);
        // on the valid tokens (TRL's padding holds weights of its own, never used)
        let d = max_diff(
            &(w * &mask).unwrap(),
            &(t2(&want["weights"]) * &mask).unwrap(),
        );
        assert!(d < 1e-5, "{name}: weights off by {d}");
        for (got, key) in [
            (s.weight_min, "min"),
            (s.weight_mean, "mean"),
            (s.weight_max, "max"),
            (s.capped_frac, "capped_frac"),
        ] {
            let want: f64 = parse(&want[key]);
            assert!((got - want).abs() < 1e-5, "{name} {key}: {got} vs {want}");
        }
    }
}

/// The inputs of one row: its log-probs, behaviour log-probs, advantages and mask, no reference.
fn row_inputs<'a>(
    logprobs: &'a Tensor,
    old_logprobs: &'a Tensor,
    advantages: &'a Tensor,
    mask: &'a Tensor,
) -> PolicyInputs<'a> {
    PolicyInputs {
        logprobs,
        old_logprobs,
        advantages,
        mask,
        ref_logprobs: None,
        entropy: None,
        importance_weights: None,
        sampler_logprobs: None,
        covariance_selected: None,
        kl_entropy_mask: None,
        micro_batch_valid: None,
    }
}

/// A step of one sequence of three valid tokens (of four).
fn three_tokens() -> StepTotals {
    StepTotals {
        sequences: 1,
        tokens: 3.0,
        micro_batches: 1,
        max_completion_length: 4,
    }
}

#[test]
fn the_behaviour_gap_is_verls_ppo_kl_and_the_largest_difference_over_valid_tokens() {
    // verl: ppo_kl = masked_mean(old_log_prob − log_prob) = (−0.2 + 0.5 + 0) / 3; the largest
    // |log_prob − old_log_prob| is 0.5 (the padding's 5.2 is not counted)
    let t = |v: [f32; 4]| Tensor::new(&[v], &Device::Cpu).unwrap();
    let (logp, old) = (t([-1.0, -2.5, -0.2, 5.0]), t([-1.2, -2.0, -0.2, -0.2]));
    let (mask, adv) = (t([1.0, 1.0, 1.0, 0.0]), t([1.0, -1.0, 1.0, 1.0]));
    let inputs = row_inputs(&logp, &old, &adv, &mask);
    let totals = three_tokens();
    let (_, s) = policy_loss(&inputs, &PolicyLossConfig::default(), &totals).unwrap();
    let s = s.read().unwrap();
    assert!((s.behaviour_kl - 0.1).abs() < 1e-6, "{s:?}");
    assert!((s.logprob_diff_max - 0.5).abs() < 1e-6, "{s:?}");
}

#[test]
fn clip_statistics_count_the_clipped_tokens() {
    let mask = Tensor::new(&[[1f32, 1.0, 1.0, 0.0]], &Device::Cpu).unwrap();
    // ratios e^0.5 ≈ 1.65 (A > 0: clipped high), e^-0.5 ≈ 0.61 (A < 0: clipped low), 1, padding
    let logp = Tensor::new(&[[0.5f32, -0.5, 0.0, 9.0]], &Device::Cpu).unwrap();
    let old = Tensor::zeros((1, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
    let adv = Tensor::new(&[[1f32, -1.0, 1.0, 1.0]], &Device::Cpu).unwrap();
    let inputs = row_inputs(&logp, &old, &adv, &mask);
    let totals = three_tokens();
    let (_, s) = policy_loss(&inputs, &PolicyLossConfig::default(), &totals).unwrap();
    let s = s.read().unwrap();
    assert!(
        (s.clip_high_frac - 1.0 / 3.0).abs() < 1e-9 && (s.clip_low_frac - 1.0 / 3.0).abs() < 1e-9,
        "{s:?}"
    );
    assert!(
        (s.ratio_max - 0.5f64.exp()).abs() < 1e-5,
        "padding is not counted: {s:?}"
    );
    // CISPO clips no gradient; a weight above its cap counts as clipped high, whatever the
    // advantage's sign: at a cap of 0.9, the ratios 1.65 and 1 (not the padding's)
    let cispo = PolicyLossConfig {
        surrogate: Surrogate::Cispo { max: 0.9 },
        ..Default::default()
    };
    let (_, s) = policy_loss(&inputs, &cispo, &totals).unwrap();
    let s = s.read().unwrap();
    assert!(
        (s.clip_high_frac - 2.0 / 3.0).abs() < 1e-9 && s.clip_low_frac == 0.0,
        "{s:?}"
    );
    let kl = PolicyLossConfig {
        kl_coef: 0.1,
        ..Default::default()
    };
    assert!(
        policy_loss(&inputs, &kl, &totals).is_err(),
        "KL without reference log-probs is an error"
    );
    // KL (k3 against a reference of zeros) and entropy means over the valid tokens only: the
    // padding's k3 would be e^-9 + 9 - 1 and its entropy 100
    let (reference, entropy) = (
        Tensor::zeros((1, 4), candle_core::DType::F32, &Device::Cpu).unwrap(),
        Tensor::new(&[[1f32, 2.0, 3.0, 100.0]], &Device::Cpu).unwrap(),
    );
    let with_kl = PolicyInputs {
        ref_logprobs: Some(&reference),
        entropy: Some(&entropy),
        ..inputs
    };
    let (_, s) = policy_loss(&with_kl, &kl, &totals).unwrap();
    let s = s.read().unwrap();
    let k3 = |x: f64| x.exp() - x - 1.0;
    let want_kl = (k3(-0.5) + k3(0.5) + k3(0.0)) / 3.0;
    assert!((s.kl_mean - want_kl).abs() < 1e-6, "{s:?} vs {want_kl}");
    assert!((s.entropy_mean - 2.0).abs() < 1e-9, "{s:?}");
    assert_eq!(s.tokens, 3.0);
}

#[test]
fn group_advantages_match_trl() {
    let f = fixture("advantages");
    let rewards: Vec<f32> = f["rewards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_f64().map_or(f32::NAN, |x| x as f32))
        .collect();
    let groups: Vec<u64> = parse(&f["groups"]);
    for (name, scale) in [
        ("group", ScaleRewards::Group),
        ("batch", ScaleRewards::Batch),
        ("none", ScaleRewards::None),
    ] {
        let want: Vec<f32> = parse(&f[name]);
        let got = group_advantages(&rewards, &groups, scale, 1e-4);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-5, "{name}: {got:?} vs {want:?}");
        }
    }
}
