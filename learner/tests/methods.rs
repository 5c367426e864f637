//! Issue 5's estimators and losses against independent PyTorch values
//! (scripts/make_learner_fixtures.py) on padded batches of unequal lengths: RLOO, REINFORCE++
//! with and without baseline, GDPO, GRPO pass@k, OPO, ReMax, PPO token rewards and GAE,
//! whitening, AR, EM-RL rewards, the adaptive KL controller, on-policy distillation's teacher
//! term, the clipped value loss, the DPO family (TRL's DPO losses, SimPO, RPO, the batch-coupled
//! AOT and BCO-pair), KTO (TRL's `kto` and `apo_zero_unpaired`) and Lopti's two passes.

use candle_core::{Device, Tensor, Var};
use learner::advantages::{
    discounted_returns, distill, gae, gdpo, grpo_passk, opo, reinforce_pp, reinforce_pp_baseline,
    remax, reweight, rloo, token_rewards, whiten, EntropyReward, KlController,
};
use learner::coupled::{coupled_loss, RunningMean};
use learner::dpo::{dpo_loss, DpoConfig, DpoLoss, PairLogprobs};
use learner::grpo::{
    policy_loss, Aggregation, KlEstimator, PolicyInputs, PolicyLossConfig, ScaleRewards, StepTotals,
};
use learner::kto::{kto_loss, reference_point, KtoConfig, KtoLoss};
use learner::ppo::value_loss;
use learner::step::{lopti_passes, Sequence};
use serde_json::Value;

const TOL: f64 = 1e-5;

fn fixture(name: &str) -> Value {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(format!("tests/fixtures/{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn parse<T: serde::de::DeserializeOwned>(v: &Value) -> T {
    serde_json::from_value(v.clone()).unwrap()
}

fn rows(v: &Value) -> Vec<Vec<f32>> {
    parse(v)
}

fn close_rows(got: &[Vec<f32>], want: &[Vec<f32>], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: row count");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.len(), w.len(), "{what}: row {i} length");
        for (t, (a, b)) in g.iter().zip(w).enumerate() {
            assert!(
                (f64::from(*a) - f64::from(*b)).abs() < TOL,
                "{what}[{i}][{t}]: {a} vs {b}"
            );
        }
    }
}

fn close(got: &[f32], want: &[f32], what: &str) {
    close_rows(&[got.to_vec()], &[want.to_vec()], what);
}

/// Ragged rows → `[B, T]` padded with zeros, and its mask.
fn padded(rows: &[Vec<f32>]) -> (Tensor, Tensor) {
    let t = rows.iter().map(Vec::len).max().unwrap();
    let pad = |r: &Vec<f32>, fill: f32| -> Vec<f32> {
        let mut v = r.clone();
        v.resize(t, fill);
        v
    };
    let data: Vec<Vec<f32>> = rows.iter().map(|r| pad(r, 0.0)).collect();
    let mask: Vec<Vec<f32>> = rows.iter().map(|r| pad(&vec![1.0; r.len()], 0.0)).collect();
    (
        Tensor::new(data, &Device::Cpu).unwrap(),
        Tensor::new(mask, &Device::Cpu).unwrap(),
    )
}

/// A scalar loss against the case's `loss`, within [`TOL`].
fn assert_loss(loss: &Tensor, case: &Value, what: &str) {
    let (got, want) = (scalar(loss), parse::<f64>(&case["loss"]));
    assert!((got - want).abs() < TOL, "{what}: {got} vs {want}");
}

fn scalar(t: &Tensor) -> f64 {
    f64::from(t.to_scalar::<f32>().unwrap())
}

#[test]
fn estimators_match_the_reference() {
    let f = fixture("estimators");
    let lengths: Vec<usize> = parse(&f["lengths"]);
    let scores: Vec<f32> = parse(&f["scores"]);
    let groups: Vec<u64> = parse(&f["groups"]);
    let (old, reference) = (rows(&f["old"]), rows(&f["ref"]));
    let beta: f64 = parse(&f["beta"]);
    let gamma: f64 = parse(&f["gamma"]);
    let lambda: f64 = parse(&f["lambda"]);

    close(
        &rloo(&scores, &groups),
        &parse::<Vec<f32>>(&f["rloo"]),
        "rloo",
    );

    let kl: Vec<Vec<f32>> = old
        .iter()
        .zip(&reference)
        .map(|(o, r)| o.iter().zip(r).map(|(a, b)| a - b).collect())
        .collect();
    let tok: Vec<Vec<f32>> = scores
        .iter()
        .zip(&kl)
        .zip(&lengths)
        .map(|((&s, k), &n)| token_rewards(s, Some(k), beta, n))
        .collect();
    close_rows(&tok, &rows(&f["token_rewards"]), "token rewards");
    close_rows(
        &reinforce_pp(&tok, gamma),
        &rows(&f["reinforce_pp"]),
        "reinforce++",
    );
    close_rows(
        &reinforce_pp_baseline(&scores, &groups, &lengths),
        &rows(&f["reinforce_pp_baseline"]),
        "reinforce++ baseline",
    );
    let parts: Vec<Vec<f32>> = parse(&f["gdpo_parts"]);
    let weights: Vec<f32> = parse(&f["gdpo_weights"]);
    let eps: f64 = parse(&f["gdpo_eps"]);
    for (scale, key) in [
        (ScaleRewards::Group, "gdpo"),
        (ScaleRewards::None, "gdpo_no_std"),
    ] {
        let got = gdpo(&parts, &weights, &groups, scale, eps, &lengths);
        close_rows(&got, &rows(&f[key]), key);
    }
    let passk_eps: f64 = parse(&f["passk_eps"]);
    for (key, case) in f["grpo_passk"].as_object().unwrap() {
        let scale = match key.ends_with("_no_std") {
            true => ScaleRewards::None,
            false => ScaleRewards::Group,
        };
        let got = grpo_passk(
            &parse::<Vec<f32>>(&case["scores"]),
            &groups,
            scale,
            passk_eps,
        );
        close(&got, &parse::<Vec<f32>>(&case["advantages"]), key);
    }
    close(
        &opo(&scores, &groups, &lengths),
        &parse::<Vec<f32>>(&f["opo"]),
        "opo",
    );
    // ReMax: one advantage per response, on each of its tokens as verl's are
    let remax_rows: Vec<Vec<f32>> = remax(&scores, &parse::<Vec<f32>>(&f["remax_baselines"]))
        .iter()
        .zip(&lengths)
        .map(|(&a, &n)| vec![a; n])
        .collect();
    close_rows(&remax_rows, &rows(&f["remax"]), "remax");

    let values = rows(&f["values"]);
    let (adv, ret): (Vec<Vec<f32>>, Vec<Vec<f32>>) = tok
        .iter()
        .zip(&values)
        .map(|(r, v)| gae(r, v, gamma, lambda))
        .unzip();
    close_rows(&adv, &rows(&f["gae_advantages"]), "gae advantages");
    close_rows(&ret, &rows(&f["gae_returns"]), "gae returns");
    close_rows(
        &whiten(&adv),
        &rows(&f["gae_whitened"]),
        "whitened advantages",
    );

    let alpha: f64 = parse(&f["alpha"]);
    let ar: Vec<Vec<f32>> = rows(&f["advantages"])
        .iter()
        .zip(&old)
        .map(|(a, o)| reweight(a, o, alpha))
        .collect();
    close_rows(&ar, &rows(&f["ar"]), "advantage reweighting");

    // on-policy distillation's teacher term on the same advantages
    let coef: f64 = parse(&f["opd_coef"]);
    let mut opd = rows(&f["advantages"]);
    let reverse_kl: Vec<Vec<f32>> = opd
        .iter_mut()
        .zip(old.iter().zip(&rows(&f["teacher"])))
        .map(|(a, (o, t))| distill(a, o, t, coef))
        .collect();
    close_rows(&opd, &rows(&f["opd"]), "on-policy distillation");
    close_rows(&reverse_kl, &rows(&f["opd_reverse_kl"]), "reverse KL");

    let entropy = rows(&f["entropy"]);
    let em = |kind: EntropyReward| -> Vec<f32> {
        old.iter()
            .zip(&entropy)
            .map(|(l, h)| kind.reward(l, h).unwrap())
            .collect()
    };
    close(
        &em(EntropyReward::Sequence),
        &parse::<Vec<f32>>(&f["em_sequence"]),
        "EM-RL sequence",
    );
    close(
        &em(EntropyReward::Token),
        &parse::<Vec<f32>>(&f["em_token"]),
        "EM-RL token",
    );
    assert_eq!(EntropyReward::None.reward(&old[0], &entropy[0]), None);

    let k = &f["kl_controller"];
    let mut ctl = KlController {
        beta: parse(&k["beta0"]),
        target: Some(parse(&k["target"])),
        horizon: parse(&k["horizon"]),
    };
    for u in k["updates"].as_array().unwrap() {
        ctl.update(parse(&u["kl"]), parse(&u["n"]));
        let want: f64 = parse(&u["beta"]);
        assert!(
            (ctl.beta - want).abs() < 1e-12,
            "adaptive β {} vs {want}",
            ctl.beta
        );
    }
    let mut fixed = KlController {
        beta: 0.05,
        target: None,
        horizon: 10000.0,
    };
    fixed.update(1.0, 512);
    assert_eq!(fixed.beta, 0.05);
}

#[test]
fn discounting_and_gae_follow_their_recursions_on_simple_cases() {
    // γ = 1: every token's return is the score; GAE with λ = 1 and zero values is the return
    assert_eq!(
        discounted_returns(&[0.0, 0.0, 2.0], 1.0),
        vec![2.0, 2.0, 2.0]
    );
    assert_eq!(
        discounted_returns(&[0.0, 0.0, 2.0], 0.5),
        vec![0.5, 1.0, 2.0]
    );
    let (a, r) = gae(&[0.0, 1.0], &[0.0, 0.0], 1.0, 1.0);
    assert_eq!((a, r), (vec![1.0, 1.0], vec![1.0, 1.0]));
    // a single-response group has no baseline
    assert_eq!(rloo(&[3.0, 1.0, 2.0], &[0, 1, 1]), vec![0.0, -1.0, 1.0]);
}

#[test]
fn clipped_value_loss_and_gradient_match_the_reference() {
    let f = fixture("value");
    let t = |k: &str| Tensor::new(rows(&f[k]), &Device::Cpu).unwrap();
    let (old_values, returns, mask) = (t("old_values"), t("returns"), t("mask"));
    let tokens: f64 = parse(&f["tokens"]);
    for case in f["cases"].as_array().unwrap() {
        let clip: Option<f64> = parse(&case["clip"]);
        let v = Var::from_tensor(&t("values")).unwrap();
        let (loss, pending) =
            value_loss(v.as_tensor(), &old_values, &returns, &mask, clip, tokens).unwrap();
        assert_loss(&loss, case, &format!("clip {clip:?}"));
        // the statistics read back in one transfer: the loss's value, verl's vf_clipfrac and
        // the mean value over the micro-batch's valid tokens
        let (value, stats) = pending.read().unwrap();
        let want: f64 = parse(&case["loss"]);
        assert!((value - want).abs() < TOL, "clip {clip:?}: read {value}");
        assert_eq!(stats.tokens, parse::<f64>(&case["valid_tokens"]));
        let clip_frac: f64 = parse(&case["clip_frac"]);
        assert!((stats.clip_frac - clip_frac).abs() < 1e-6, "clip {clip:?}");
        let value_mean: f64 = parse(&case["value_mean"]);
        assert!((stats.value_mean - value_mean).abs() < 1e-5, "mean");
        let g = loss.backward().unwrap();
        let got = g.get(v.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
        close_rows(
            &got,
            &rows(&case["grad"]),
            &format!("value grad clip {clip:?}"),
        );
    }
}

#[test]
fn dpo_losses_gradients_and_metrics_match_the_reference() {
    let f = fixture("dpo");
    let v = |k: &str| Tensor::new(parse::<Vec<f32>>(&f[k]), &Device::Cpu).unwrap();
    let total: usize = parse(&f["total_pairs"]);
    let chosen_tokens: usize = parse(&f["total_chosen_tokens"]);
    let cases = f["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 25);
    for case in cases {
        let or = |key: &str, default: f64| case.get(key).map_or(default, parse::<f64>);
        let cfg = DpoConfig {
            loss: parse::<DpoLoss>(&case["loss_type"]),
            beta: parse(&case["beta"]),
            label_smoothing: parse(&case["label_smoothing"]),
            simpo_gamma: or("simpo_gamma", 0.5),
            discopop_tau: or("discopop_tau", 0.05),
            rpo_alpha: or("rpo_alpha", 0.0),
        };
        let chosen = Var::from_tensor(&v("chosen")).unwrap();
        let rejected = Var::from_tensor(&v("rejected")).unwrap();
        let (rc, rr, lc, lr) = (
            v("ref_chosen"),
            v("ref_rejected"),
            v("chosen_tokens"),
            v("rejected_tokens"),
        );
        let x = PairLogprobs {
            chosen: chosen.as_tensor(),
            rejected: rejected.as_tensor(),
            ref_chosen: &rc,
            ref_rejected: &rr,
            chosen_tokens: &lc,
            rejected_tokens: &lr,
        };
        let (loss, pending) = dpo_loss(&x, &cfg, total, chosen_tokens).unwrap();
        assert_loss(&loss, case, &format!("{cfg:?}"));
        let g = loss.backward().unwrap();
        for (var, key) in [(&chosen, "grad_chosen"), (&rejected, "grad_rejected")] {
            let got = g.get(var.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
            close(
                &got,
                &parse::<Vec<f32>>(&case[key]),
                &format!("{cfg:?} {key}"),
            );
        }
        let stats = pending.read().unwrap();
        assert_eq!(
            stats.reward_accuracy,
            parse::<f64>(&case["reward_accuracy"])
        );
        let margin: f64 = parse(&case["margin"]);
        assert!((stats.margin - margin).abs() < 1e-4, "{cfg:?} margin");
        for (got, key) in [
            (stats.chosen_reward, "chosen_reward"),
            (stats.rejected_reward, "rejected_reward"),
        ] {
            let want: f64 = parse(&case[key]);
            assert!((got - want).abs() < 1e-4, "{cfg:?} {key}: {got} vs {want}");
        }
        assert_eq!(stats.pairs, 5.0);
    }
    let bad = DpoConfig {
        loss: DpoLoss::Robust,
        beta: 0.1,
        label_smoothing: 0.5,
        ..DpoConfig::default()
    };
    let z = v("chosen");
    let x = PairLogprobs {
        chosen: &z,
        rejected: &z,
        ref_chosen: &z,
        ref_rejected: &z,
        chosen_tokens: &z,
        rejected_tokens: &z,
    };
    assert!(
        dpo_loss(&x, &bad, 1, 1).is_err(),
        "robust DPO with ε = 0.5 divides by zero"
    );
}

/// TRL's losses that couple a batch's pairs (`aot`, `aot_pair`: sorted log-ratios; `bco_pair`:
/// rewards shifted by a running mean): loss, gradient and the running mean, over a step of 6
/// pairs taken as one batch.
#[test]
fn coupled_dpo_losses_sort_and_shift_as_trl_does() {
    let f = fixture("dpo_coupled");
    let v = |k: &str| parse::<Vec<f64>>(&f[k]);
    let (chosen, rejected) = (v("chosen"), v("rejected"));
    let reference: Vec<(f64, f64)> = v("ref_chosen").into_iter().zip(v("ref_rejected")).collect();
    let cases = f["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 6);
    let near = |got: f64, want: f64, what: &str| {
        assert!(
            (got - want).abs() < 1e-9 * (1.0 + want.abs()),
            "{what}: {got} vs {want}"
        );
    };
    for case in cases {
        let cfg = DpoConfig {
            loss: parse::<DpoLoss>(&case["loss_type"]),
            beta: parse(&case["beta"]),
            label_smoothing: parse(&case["label_smoothing"]),
            ..DpoConfig::default()
        };
        let mut bco = RunningMean::default();
        for x in parse::<Vec<f64>>(&case["earlier"]) {
            bco.update(x);
        }
        let what = format!("{cfg:?}");
        let (loss, g_w, g_l) =
            coupled_loss(&chosen, &rejected, &reference, &cfg, &mut bco).unwrap();
        near(loss, parse(&case["loss"]), &what);
        for (got, key) in [(&g_w, "grad_chosen"), (&g_l, "grad_rejected")] {
            for (g, want) in got.iter().zip(parse::<Vec<f64>>(&case[key])) {
                near(*g, want, &format!("{what} {key}"));
            }
        }
        near(
            bco.mean,
            parse(&case["running_mean"]),
            &format!("{what} running mean"),
        );
    }
    let plain = DpoConfig::default();
    let mut bco = RunningMean::default();
    assert!(coupled_loss(&chosen, &rejected, &reference, &plain, &mut bco).is_none());
}

#[test]
fn kto_losses_gradients_and_reference_point_match_trl() {
    let f = fixture("kto");
    let v = |k: &str| Tensor::new(parse::<Vec<f32>>(&f[k]), &Device::Cpu).unwrap();
    let labels: Vec<bool> = parse(&f["labels"]);
    let total: usize = parse(&f["total"]);
    let kl_policy: Vec<f32> = parse(&f["kl_policy"]);
    let cases = f["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 6);
    for case in cases {
        let cfg = KtoConfig {
            loss: parse::<KtoLoss>(&case["loss_type"]),
            beta: parse(&case["beta"]),
            desirable_weight: parse(&case["desirable_weight"]),
            undesirable_weight: parse(&case["undesirable_weight"]),
        };
        // z₀ from the step's mismatched pairs (clamped at 0 for the "negative" set)
        let kl_set = case["kl_set"].as_str().unwrap();
        let kl_reference: Vec<f32> = parse(&f["kl_reference"][kl_set]);
        let kl = match cfg.uses_kl() {
            true => reference_point(&kl_policy, &kl_reference),
            false => 0.0,
        };
        let want_kl: f64 = parse(&case["kl"]);
        assert!((kl - want_kl).abs() < 1e-5, "{cfg:?}: z₀ {kl} vs {want_kl}");
        assert_eq!(kl == 0.0, kl_set == "negative" || !cfg.uses_kl(), "{cfg:?}");
        let logps = Var::from_tensor(&v("logps")).unwrap();
        let (loss, pending) =
            kto_loss(logps.as_tensor(), &v("ref_logps"), &labels, kl, &cfg, total).unwrap();
        assert_loss(&loss, case, &format!("{cfg:?}"));
        let g = loss.backward().unwrap();
        let got = g.get(logps.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        close(
            &got,
            &parse::<Vec<f32>>(&case["grad"]),
            &format!("{cfg:?} grad"),
        );
        let stats = pending.read().unwrap();
        for (got, key) in [
            (stats.chosen_reward, "chosen_reward"),
            (stats.rejected_reward, "rejected_reward"),
        ] {
            let want: f64 = parse(&case[key]);
            assert!((got - want).abs() < 1e-4, "{cfg:?} {key}: {got} vs {want}");
        }
        assert_eq!((stats.desirable, stats.undesirable), (4.0, 3.0));
    }
    // labels that do not match the log-probs are an error, not a panic
    let cfg = KtoConfig::default();
    assert!(kto_loss(&v("logps"), &v("ref_logps"), &labels[..3], 0.0, &cfg, total).is_err());
}

/// Lopti's two passes, built by `lopti_passes` from AR-reweighted advantages, against the
/// reference at the same parameters; and their sum against the single pass.
#[test]
fn lopti_passes_split_the_single_pass_loss_and_match_the_reference() {
    let f = fixture("lopti");
    let c = &f["config"];
    let cfg = PolicyLossConfig {
        clip_low: parse(&c["clip_low"]),
        clip_high: parse(&c["clip_high"]),
        dual_clip: parse(&c["dual_clip"]),
        aggregation: Aggregation::Dapo,
        kl: KlEstimator::K3,
        kl_coef: parse(&c["kl_coef"]),
        entropy_coef: parse(&c["entropy_coef"]),
        ..Default::default()
    };
    let (logp, old, reference, entropy, advantages) = (
        rows(&f["logp"]),
        rows(&f["old"]),
        rows(&f["ref"]),
        rows(&f["entropy"]),
        rows(&f["advantages"]),
    );
    let (old_t, mask) = padded(&old);
    let (ref_t, _) = padded(&reference);
    let (ent_t, _) = padded(&entropy);
    let tokens: f64 = old.iter().map(Vec::len).sum::<usize>() as f64;
    let totals = StepTotals {
        sequences: old.len(),
        tokens,
        micro_batches: 1,
        max_completion_length: 5,
    };
    for case in f["cases"].as_array().unwrap() {
        let alpha: f64 = parse(&case["alpha"]);
        let eta: f64 = parse(&case["eta"]);
        let seqs: Vec<Sequence> = old
            .iter()
            .zip(&advantages)
            .map(|(o, a)| Sequence {
                prompt: vec![1],
                completion: vec![2; o.len()],
                behavior_logprobs: o.clone(),
                advantages: reweight(a, o, alpha),
                active: None,
                values: None,
                masked: false,
                importance_weights: None,
                sampler_logprobs: None,
                covariance_selected: None,
            })
            .collect();
        let [first, second] = lopti_passes(&seqs, eta);
        let low: usize = first
            .iter()
            .flat_map(|s| s.active.as_ref().unwrap())
            .filter(|&&a| a)
            .count();
        assert_eq!(
            low as f64,
            parse::<f64>(&case["low_tokens"]),
            "α {alpha} η {eta}"
        );
        let mut total = 0.0;
        for (name, pass) in [
            ("single", seqs.clone()),
            ("first", first.clone()),
            ("second", second.clone()),
        ] {
            let (adv, _) = padded(
                &pass
                    .iter()
                    .map(|s| s.advantages.clone())
                    .collect::<Vec<_>>(),
            );
            let active: Vec<Vec<f32>> = pass
                .iter()
                .map(|s| match &s.active {
                    Some(a) => a.iter().map(|&x| f32::from(u8::from(x))).collect(),
                    None => vec![1.0; s.completion.len()],
                })
                .collect();
            let (active, _) = padded(&active);
            let x = Var::from_tensor(&padded(&logp).0).unwrap();
            let inputs = PolicyInputs {
                logprobs: x.as_tensor(),
                old_logprobs: &old_t,
                advantages: &adv,
                mask: &mask,
                ref_logprobs: Some(&ref_t),
                entropy: Some(&ent_t),
                importance_weights: None,
                sampler_logprobs: None,
                covariance_selected: None,
                kl_entropy_mask: Some(&active),
                micro_batch_valid: None,
            };
            let (loss, _) = policy_loss(&inputs, &cfg, &totals).unwrap();
            let want: f64 = parse(&case[name]["loss"]);
            let got = scalar(&loss);
            assert!(
                (got - want).abs() < TOL,
                "α {alpha} η {eta} {name}: {got} vs {want}"
            );
            let g = loss
                .backward()
                .unwrap()
                .get(x.as_tensor())
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            let g: Vec<Vec<f32>> = g
                .iter()
                .zip(&old)
                .map(|(r, o)| r[..o.len()].to_vec())
                .collect();
            close_rows(
                &g,
                &rows(&case[name]["grad"]),
                &format!("α {alpha} η {eta} {name} grad"),
            );
            if name == "single" {
                total = got;
            } else {
                total -= got;
            }
        }
        assert!(
            total.abs() < 1e-6,
            "the two passes' losses sum to the single pass's"
        );
    }
}
