//! Rows that continue shared prompts (`model::forward::SharedPrompts`): each distinct prompt runs
//! through the trunk once and its rows attend to its keys and values; and the same rows packed
//! end to end in one row (`model::forward::PackedRows`), each prompt head once before the rows
//! that continue it. Their log-probs, entropies, hidden states and every parameter's gradient
//! must equal those of the whole sequences run row by row (the path the golden tests check
//! against transformers), on both tiny fixture models, with padding, unequal prompts and
//! completions, plain, with per-layer checkpointing and with chunked attention. Its own test
//! binary: both switches are process-wide.

mod common;

use candle_core::{Device, Tensor};
use common::*;
use model::forward::{PackedRows, Segment, SharedPrompts};
use model::logprobs::{
    packed_logprobs, sequence_logprobs, shared_prompt_logprobs, SequenceLogprobs,
};

/// Completions and the index of the prompt each continues.
type Rows = Vec<(usize, Vec<u32>)>;

/// Prompts of 2–7 tokens (the last two share all but their last token) and the completions
/// that continue them, of 1–6 tokens.
fn cases() -> (Vec<Vec<u32>>, Rows) {
    let prompts = vec![
        vec![5, 17, 3],
        vec![9, 2, 44, 8, 31, 6, 12],
        vec![21, 4],
        vec![7, 7, 30, 11, 2],
        vec![7, 7, 30, 11, 19],
    ];
    let rows = vec![
        (0, vec![40, 41, 42]),
        (1, vec![13]),
        (0, vec![40, 2, 8, 9, 10, 11]),
        (2, vec![6, 6]),
        (1, vec![25, 26, 27, 28]),
        (3, vec![1, 2, 3]),
        (4, vec![1, 2, 3, 4, 5]),
        (0, vec![3]),
    ];
    (prompts, rows)
}

/// Right-pads rows to their longest, with the mask of real tokens.
fn padded(rows: &[Vec<u32>]) -> (Vec<Vec<u32>>, Vec<Vec<u8>>) {
    let t = rows.iter().map(Vec::len).max().unwrap();
    let ids = rows
        .iter()
        .map(|r| {
            r.iter()
                .copied()
                .chain(std::iter::repeat(0))
                .take(t)
                .collect()
        })
        .collect();
    let mask = rows
        .iter()
        .map(|r| (0..t).map(|i| u8::from(i < r.len())).collect())
        .collect();
    (ids, mask)
}

/// The scored entries of a `[B, T−1]` (or `[B, T−1, H]`) tensor: row b's completion tokens,
/// which start at position `start[b]`.
fn completion_part(x: &Tensor, start: &[usize], lens: &[usize]) -> Vec<Tensor> {
    start
        .iter()
        .zip(lens)
        .enumerate()
        .map(|(b, (&s, &n))| x.get(b).unwrap().narrow(0, s, n).unwrap())
        .collect()
}

fn check(name: &str) {
    let w = load(name);
    let (vars, trainable) = w.to_vars().unwrap();
    let (prompts, rows) = cases();
    let lens: Vec<usize> = rows.iter().map(|(_, c)| c.len()).collect();
    // reference: whole sequences
    let whole: Vec<Vec<u32>> = rows
        .iter()
        .map(|(p, c)| prompts[*p].iter().chain(c).copied().collect())
        .collect();
    let (ids, mask) = padded(&whole);
    let loss_mask: Vec<Vec<u8>> = rows
        .iter()
        .zip(&mask)
        .map(|((p, _), m)| {
            m.iter()
                .enumerate()
                .map(|(i, &x)| u8::from(x != 0 && i >= prompts[*p].len()))
                .collect()
        })
        .collect();
    let full = sequence_logprobs(&trainable, &ids, &mask, &loss_mask, 0.7).unwrap();
    let full_start: Vec<usize> = rows.iter().map(|(p, _)| prompts[*p].len() - 1).collect();
    // shared: each distinct prompt head once, rows start with the prompt's last token
    let heads: Vec<Vec<u32>> = vec![
        prompts[0][..2].to_vec(),
        prompts[1][..6].to_vec(),
        prompts[2][..1].to_vec(),
        prompts[3][..4].to_vec(),
    ];
    let head_of = [0usize, 1, 2, 3, 3];
    let (head_ids, head_mask) = padded(&heads);
    let own: Vec<Vec<u32>> = rows
        .iter()
        .map(|(p, c)| {
            std::iter::once(*prompts[*p].last().unwrap())
                .chain(c.iter().copied())
                .collect()
        })
        .collect();
    let (own_ids, own_mask) = padded(&own);
    let own_loss: Vec<Vec<u8>> = own_mask
        .iter()
        .map(|m| {
            m.iter()
                .enumerate()
                .map(|(i, &x)| u8::from(x != 0 && i >= 1))
                .collect()
        })
        .collect();
    let row_heads: Vec<usize> = rows.iter().map(|(p, _)| head_of[*p]).collect();
    let shared = SharedPrompts::new(
        &head_ids,
        &head_mask,
        &row_heads,
        &own_ids,
        &own_mask,
        &Device::Cpu,
    )
    .unwrap();
    let part = shared_prompt_logprobs(&trainable, &shared, &own_ids, &own_loss, 0.7).unwrap();
    // packed: each head, then the rows that continue it, end to end
    let (mut tokens, mut segments, mut starts) = (Vec::new(), Vec::new(), vec![0; rows.len()]);
    for (h, head) in heads.iter().enumerate() {
        let prefix = Some((tokens.len(), head.len()));
        segments.push(Segment {
            start: tokens.len(),
            len: head.len(),
            prefix: None,
        });
        tokens.extend_from_slice(head);
        for r in (0..rows.len()).filter(|&r| row_heads[r] == h) {
            starts[r] = tokens.len();
            segments.push(Segment {
                start: tokens.len(),
                len: own[r].len(),
                prefix,
            });
            tokens.extend_from_slice(&own[r]);
        }
    }
    let row = PackedRows::new(&tokens, &segments, &Device::Cpu).unwrap();
    let packed =
        packed_logprobs(&trainable, &row, &own_ids, &own_loss, &starts, 0.7, true).unwrap();
    let part_start = vec![0usize; rows.len()];
    for (layout, part) in [("shared", &part), ("packed", &packed)] {
        compare(
            &format!("{name}, {layout}"),
            &full,
            &full_start,
            part,
            &part_start,
            &lens,
        );
    }
    // gradients of a loss that weighs each completion token differently
    let loss = |lp: &SequenceLogprobs, start: &[usize]| {
        let mut total: Option<Tensor> = None;
        for (r, (&s, &n)) in start.iter().zip(&lens).enumerate() {
            let k: Vec<f32> = (0..n).map(|j| 1.0 + ((r + j) % 5) as f32 * 0.25).collect();
            let k = Tensor::from_vec(k, n, &Device::Cpu).unwrap();
            let row = lp.logprobs.get(r).unwrap().narrow(0, s, n).unwrap();
            let ent = lp.entropy.get(r).unwrap().narrow(0, s, n).unwrap();
            let term = ((row * &k).unwrap() + (ent * 0.1).unwrap())
                .unwrap()
                .sum_all()
                .unwrap();
            total = Some(match total {
                Some(t) => (t + term).unwrap(),
                None => term,
            });
        }
        total.unwrap()
    };
    let g_full = model::checkpoint::backward(&loss(&full, &full_start)).unwrap();
    for (layout, part) in [("shared", &part), ("packed", &packed)] {
        let g_part = model::checkpoint::backward(&loss(part, &part_start)).unwrap();
        for (param, var) in &vars {
            let (x, y) = (g_full.get(var.as_tensor()), g_part.get(var.as_tensor()));
            let x = x.unwrap_or_else(|| panic!("{name}: no gradient reached {param} (whole rows)"));
            let y = y.unwrap_or_else(|| panic!("{name}: no gradient reached {param} ({layout})"));
            let scale = max_abs(x).max(1e-6);
            let rel = max_abs_diff(x, y) / scale;
            assert!(
                rel < 1e-4,
                "{name}, {layout}: gradient of {param} off by {rel:e} (relative)"
            );
        }
    }
}

/// The completion tokens' log-probs, entropies, hidden states and masks of `part` (rows from
/// `part_start`) against the whole rows' `full` (from `full_start`).
fn compare(
    name: &str,
    full: &SequenceLogprobs,
    full_start: &[usize],
    part: &SequenceLogprobs,
    part_start: &[usize],
    lens: &[usize],
) {
    let pick = |lp: &SequenceLogprobs, start: &[usize]| {
        (
            completion_part(&lp.logprobs, start, lens),
            completion_part(&lp.entropy, start, lens),
            completion_part(lp.hidden.as_ref().expect("hidden states"), start, lens),
            completion_part(&lp.mask, start, lens),
        )
    };
    let (a, b) = (pick(full, full_start), pick(part, part_start));
    for r in 0..lens.len() {
        assert!(
            max_abs_diff(&a.0[r], &b.0[r]) < 1e-5,
            "{name}: log-probs of row {r}"
        );
        assert!(
            max_abs_diff(&a.1[r], &b.1[r]) < 1e-5,
            "{name}: entropies of row {r}"
        );
        assert!(
            max_abs_diff(&a.2[r], &b.2[r]) < 1e-4,
            "{name}: hidden states of row {r}"
        );
        assert_eq!(
            max_abs(&(&a.3[r] - 1.0).unwrap()),
            0.0,
            "{name}: mask of row {r}"
        );
    }
    // the same number of scored tokens: nothing else is masked in
    let count = |lp: &SequenceLogprobs| lp.mask.sum_all().unwrap().to_scalar::<f32>().unwrap();
    assert_eq!(count(full), count(part));
    assert!(
        max_abs(&full.logprobs) > 0.1,
        "{name}: log-probs too small to compare"
    );
}

#[test]
fn shared_prompts_match_whole_sequences() {
    for name in ["tiny-qwen2", "tiny-llama", "tiny-qwen3"] {
        check(name);
    }
    model::checkpoint::set_enabled(true);
    let before = model::checkpoint::recomputed_layers();
    check("tiny-qwen2");
    assert!(
        model::checkpoint::recomputed_layers() > before,
        "no layer was recomputed"
    );
    model::checkpoint::set_enabled(false);
    model::attention::set_chunk_elements(8);
    let before = model::attention::chunked_calls();
    let packed = model::attention::packed_calls();
    check("tiny-llama");
    assert!(
        model::attention::chunked_calls() > before,
        "the attention was not chunked"
    );
    assert!(model::attention::packed_calls() > packed);
}
