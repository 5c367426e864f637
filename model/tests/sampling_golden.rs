//! The host sampler against Hugging Face transformers' logits warpers
//! (fixtures/sampling_golden.json, written by scripts/make_sampling_fixtures.py): the same
//! tokens survive temperature, top-k and top-p, and each has the log-prob that transformers
//! gives it. The device sampler is checked against the host one by the kernel emulation tests
//! and by `ferrite gpu-check`.

use model::sampling::{draw, kept_floor, SamplingParams};
use serde::Deserialize;

#[derive(Deserialize)]
struct Golden {
    rows: Vec<Vec<f32>>,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    row: usize,
    temperature: f32,
    top_k: usize,
    top_p: f32,
    kept: Vec<usize>,
    logprobs: Vec<f64>,
}

/// Each case with its row of logits and its sampling parameters.
fn cases() -> Vec<(Case, Vec<f32>, SamplingParams)> {
    let g: Golden = serde_json::from_str(include_str!("fixtures/sampling_golden.json")).unwrap();
    g.cases
        .into_iter()
        .map(|c| {
            let p = SamplingParams {
                temperature: c.temperature,
                top_k: c.top_k,
                top_p: c.top_p,
            };
            let z = g.rows[c.row].clone();
            (c, z, p)
        })
        .collect()
}

#[test]
fn top_k_and_top_p_keep_what_transformers_keeps() {
    for (c, z, p) in cases() {
        let t = c.temperature as f64;
        let m = z.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x)) as f64;
        let e: Vec<f64> = z.iter().map(|&x| ((x as f64 - m) / t).exp()).collect();
        let floor = kept_floor(&e, &p);
        let kept: Vec<usize> = (0..z.len()).filter(|&i| e[i] >= floor).collect();
        assert_eq!(kept, c.kept, "row {}, {p:?}", c.row);
    }
}

#[test]
fn each_kept_token_is_drawn_with_the_log_prob_transformers_gives_it() {
    for (c, z, p) in cases() {
        // the inverse CDF in index order: the middle of token j's interval draws j
        let mut below = 0.0;
        for (&j, &lp) in c.kept.iter().zip(&c.logprobs) {
            let pj = lp.exp();
            let (token, logprob, _) = draw(&z, below + pj / 2.0, &p);
            assert_eq!(token, j, "row {}, {p:?}", c.row);
            assert!(
                (logprob - lp).abs() < 1e-6, // the temperature is an f32 here
                "row {}, {p:?}, token {j}: {logprob} vs {lp}",
                c.row
            );
            below += pj;
        }
        assert!(
            (below - 1.0).abs() < 1e-9,
            "the kept tokens' mass is {below}"
        );
    }
}
