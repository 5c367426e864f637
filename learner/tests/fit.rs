//! A step that runs out of device memory runs again in pieces (learner::fit), with the update it
//! would have made whole. The CPU's allocations cannot fail, so the device's room is simulated
//! (`fit::with_room`: a piece of more padded tokens fails as out of memory when it is packed, after
//! the pieces before it have run); `ferrite gpu-check` runs the same on a GPU whose memory is
//! filled.

use candle_core::{DType, Device};
use learner::dpo::{dpo_step, reference_logprobs, DpoConfig, DpoLoss, Pair};
use learner::fit::{with_room, Fit};
use learner::grpo::{Aggregation, PolicyLossConfig};
use learner::optim::{AdamW, AdamWConfig};
use learner::sft::sft_step;
use learner::step::{policy_step, Sequence, StepConfig, StepMetrics};
use model::logprobs::sequence_logprobs;
use model::Weights;

/// Every test here counts a piece's tokens as its rows padded to the longest (the fit's
/// arithmetic is the same packed: `shared_prompts.rs` runs a packed step in pieces).
fn padded_rows() {
    learner::step::set_pack_rows(false);
}

fn model() -> Weights {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../model/tests/fixtures/tiny-qwen2");
    Weights::load_dir(&dir, DType::F32, &Device::Cpu).unwrap()
}

/// On-policy sequences of 5, 5, 7 and 7 tokens: micro-batches of 16 tokens are the first two
/// (10 padded tokens) and the last two (14).
fn sequences(w: &Weights) -> Vec<Sequence> {
    let mk = |prompt: Vec<u32>, completion: Vec<u32>, advantage: f32| {
        let ids: Vec<u32> = prompt.iter().chain(&completion).copied().collect();
        let n = ids.len();
        let mask: Vec<u8> = (0..n).map(|i| u8::from(i >= prompt.len())).collect();
        let lp = sequence_logprobs(w, &[ids], &[vec![1; n]], &[mask], 1.0).unwrap();
        let row = lp.logprobs.get(0).unwrap().to_vec1::<f32>().unwrap();
        let old = (0..completion.len())
            .map(|j| row[prompt.len() + j - 1])
            .collect();
        Sequence::new(prompt, completion, old, advantage)
    };
    vec![
        mk(vec![8, 9], vec![30, 31, 32], 0.5),
        mk(vec![5, 6, 7], vec![20, 21], -1.0),
        mk(vec![5, 6, 7], vec![10, 11, 12, 13], 1.0),
        mk(vec![8, 9], vec![40, 41, 42, 43, 44], -0.5),
    ]
}

fn config(aggregation: Aggregation) -> StepConfig {
    StepConfig {
        loss: PolicyLossConfig {
            aggregation,
            ..Default::default()
        },
        micro_batch_tokens: 16,
        temperature: 1.0,
        max_completion_length: 8,
        value: None,
    }
}

fn flat(w: &Weights) -> Vec<f32> {
    w.named()
        .values()
        .flat_map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

/// Two policy steps on fresh trainable weights, within `room` padded tokens a piece (None: as
/// much as it takes); their metrics, the optimizer's fit and the weights after.
fn two_steps(
    base: &Weights,
    seqs: &[Sequence],
    cfg: &StepConfig,
    room: Option<usize>,
) -> (Vec<StepMetrics>, Fit, Vec<f32>) {
    let (vars, w) = base.to_vars().unwrap();
    let mut opt = AdamW::new(vars, AdamWConfig::default()).unwrap();
    let mut step = || policy_step(&w, None, None, &mut opt, seqs, cfg, 1e-3).unwrap();
    let ms = match room {
        Some(room) => with_room(room, || vec![step(), step()]),
        None => vec![step(), step()],
    };
    (ms, opt.fit(), flat(&w.detach()))
}

#[test]
fn a_step_out_of_memory_runs_again_in_pieces_and_updates_as_it_would_whole() {
    padded_rows();
    let base = model();
    let mut seqs = sequences(&base);
    // BNPO divides by each micro-batch's tokens: its pieces must divide by their micro-batch's,
    // without those of a masked sequence (a truncated completion: `Sequence::masked`)
    let cases = [Aggregation::Bnpo, Aggregation::Dapo, Aggregation::Grpo]
        .into_iter()
        .map(|a| (a, false))
        .chain([(Aggregation::Bnpo, true)]);
    for (aggregation, masked) in cases {
        seqs[3].masked = masked;
        let cfg = config(aggregation);
        let (whole, fit, want) = two_steps(&base, &seqs, &cfg, None);
        assert_eq!(fit, Fit::default());
        assert_eq!(whole[0].memory_retries, 0);
        // room for 12: the first micro-batch (10) runs and accumulates, the second (14) fails;
        // the step runs again in pieces of at most 7 tokens (a sequence each), and the second
        // step starts from there
        let (pieces, fit, got) = two_steps(&base, &seqs, &cfg, Some(12));
        assert_eq!(
            fit,
            Fit {
                piece_tokens: Some(7),
                checkpointed: false
            },
            "{aggregation:?}"
        );
        assert_eq!(pieces[0].memory_retries, 1, "{aggregation:?}");
        assert_eq!(pieces[1].memory_retries, 0, "{aggregation:?}");
        for (a, b) in whole.iter().zip(&pieces) {
            assert_eq!(a.micro_batches, 2);
            assert_eq!(b.micro_batches, 2, "pieces are not micro-batches");
            assert!(
                (a.loss - b.loss).abs() < 1e-6,
                "{aggregation:?}: {a:?} vs {b:?}"
            );
            assert!(
                (a.grad_norm - b.grad_norm).abs() <= 1e-5 * a.grad_norm,
                "{aggregation:?}: {a:?} vs {b:?}"
            );
            assert_eq!(a.policy.tokens, b.policy.tokens);
            assert!((a.policy.ratio_mean - b.policy.ratio_mean).abs() < 1e-5 * a.policy.ratio_mean);
        }
        // AdamW's first steps move each weight by about lr = 1e-3 whatever its gradient's size,
        // so gradients that differ by rounding move weights apart by more than it
        let d = max_diff(&want, &got);
        assert!(d < 1e-4, "{aggregation:?}: weights differ by {d}");
    }
}

#[test]
fn a_sequence_that_fits_nowhere_is_an_error_and_the_weights_stay() {
    padded_rows();
    let base = model();
    let seqs = sequences(&base);
    let (vars, w) = base.to_vars().unwrap();
    let before = flat(&w.detach());
    let mut opt = AdamW::new(vars, AdamWConfig::default()).unwrap();
    let cfg = config(Aggregation::Dapo);
    // every sequence is at least 5 tokens: pieces halve to a sequence each, then checkpointing
    // is turned on and the halving starts again, and a single sequence still fails
    let e = with_room(4, || {
        policy_step(&w, None, None, &mut opt, &seqs, &cfg, 1e-3)
    })
    .unwrap_err();
    assert!(e.is_out_of_memory(), "{e}");
    let text = e.to_string();
    assert!(
        text.contains("a single sequence of 5 tokens") && text.contains("checkpointing"),
        "{text}"
    );
    assert!(opt.fit().checkpointed);
    assert_eq!(opt.steps(), 0);
    assert_eq!(max_diff(&before, &flat(&w.detach())), 0.0);
    // with room, the same optimizer steps, its layers checkpointed from now on
    let recomputed = model::checkpoint::recomputed_layers();
    let m = policy_step(&w, None, None, &mut opt, &seqs, &cfg, 1e-3).unwrap();
    assert!(!m.skipped && m.memory_retries == 0, "{m:?}");
    assert_eq!(opt.steps(), 1);
    assert!(model::checkpoint::recomputed_layers() > recomputed);
    assert!(
        !model::checkpoint::enabled(),
        "only the learner's steps checkpoint"
    );
}

#[test]
fn a_reduced_fit_tries_a_larger_one_after_steps_that_fitted() {
    padded_rows();
    use learner::fit::PROBE_EVERY;
    let base = model();
    let seqs = sequences(&base);
    let (vars, w) = base.to_vars().unwrap();
    let mut opt = AdamW::new(vars, AdamWConfig::default()).unwrap();
    let cfg = config(Aggregation::Dapo);
    let step = |opt: &mut AdamW| {
        policy_step(&w, None, None, opt, &seqs, &cfg, 1e-3)
            .unwrap()
            .memory_retries
    };
    let pieces = |t| Fit {
        piece_tokens: Some(t),
        checkpointed: false,
    };
    // room for 12 tokens: the first step runs again in pieces of 7, and so do the next
    let retries: Vec<usize> = with_room(12, || (0..PROBE_EVERY).map(|_| step(&mut opt)).collect());
    assert_eq!(retries[0], 1);
    assert!(retries[1..].iter().all(|&r| r == 0), "{retries:?}");
    assert_eq!(opt.fit(), pieces(7));
    // the next tries pieces of 14, which run out: it runs again in pieces of 7
    assert_eq!(with_room(12, || step(&mut opt)), 1);
    assert_eq!(opt.fit(), pieces(7));
    // the room grows; the next try waits twice as long, then pieces of 14 fit, and after as
    // many steps again whole micro-batches (of 16 tokens) do
    for _ in 1..2 * PROBE_EVERY {
        assert_eq!(step(&mut opt), 0);
        assert_eq!(opt.fit(), pieces(7));
    }
    assert_eq!(step(&mut opt), 0);
    assert_eq!(opt.fit(), pieces(14));
    for _ in 1..2 * PROBE_EVERY {
        step(&mut opt);
    }
    assert_eq!(opt.fit(), pieces(14));
    assert_eq!(step(&mut opt), 0);
    assert_eq!(opt.fit(), Fit::default());
}

#[test]
fn a_resumed_optimizer_keeps_what_fitted_and_when_it_tries_a_larger_fit() {
    padded_rows();
    use learner::fit::PROBE_EVERY;
    let base = model();
    let seqs = sequences(&base);
    let cfg = config(Aggregation::Dapo);
    let step = |w: &Weights, opt: &mut AdamW| {
        policy_step(w, None, None, opt, &seqs, &cfg, 1e-3)
            .unwrap()
            .memory_retries
    };
    let pieces = |t| Fit {
        piece_tokens: Some(t),
        checkpointed: false,
    };
    // room for 12 tokens: pieces of 7 after one retry; the try of pieces of 14 runs out
    let (vars, w) = base.to_vars().unwrap();
    let mut opt = AdamW::new(vars, AdamWConfig::default()).unwrap();
    with_room(12, || {
        for _ in 0..=PROBE_EVERY {
            step(&w, &mut opt);
        }
    });
    assert_eq!(opt.fit(), pieces(7));
    let dir = std::env::temp_dir().join(format!("ferrite-fit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    opt.save(&dir).unwrap();

    // a fresh optimizer runs out again; a resumed one takes pieces of 7 at once
    let fresh = |dir: Option<&std::path::Path>| {
        let (vars, w) = base.to_vars().unwrap();
        let mut opt = AdamW::new(vars, AdamWConfig::default()).unwrap();
        if let Some(dir) = dir {
            opt.load(dir).unwrap();
        }
        (w, opt)
    };
    let (w_new, mut new) = fresh(None);
    assert_eq!(with_room(12, || step(&w_new, &mut new)), 1);
    let (w_resumed, mut resumed) = fresh(Some(&dir));
    assert_eq!(resumed.fit(), pieces(7));
    assert_eq!(with_room(12, || step(&w_resumed, &mut resumed)), 0);
    // and its next try waits twice as long, as the uninterrupted run's does
    for _ in 2..2 * PROBE_EVERY {
        assert_eq!(step(&w_resumed, &mut resumed), 0);
        assert_eq!(resumed.fit(), pieces(7));
    }
    assert_eq!(step(&w_resumed, &mut resumed), 0);
    assert_eq!(resumed.fit(), pieces(14));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn sft_and_dpo_steps_run_in_pieces_as_they_would_whole() {
    padded_rows();
    let base = model();
    let examples: Vec<(Vec<u32>, Vec<u32>)> = sequences(&base)
        .into_iter()
        .map(|s| (s.prompt, s.completion))
        .collect();
    let sft = |room: Option<usize>| {
        let (vars, w) = base.to_vars().unwrap();
        let mut opt = AdamW::new(vars, AdamWConfig::default()).unwrap();
        let mut step = || sft_step(&w, &mut opt, &examples, 16, 1e-3).unwrap();
        let m = match room {
            Some(room) => with_room(room, &mut step),
            None => step(),
        };
        (m, flat(&w.detach()))
    };
    let ((whole, want), (pieces, got)) = (sft(None), sft(Some(12)));
    assert_eq!((whole.memory_retries, pieces.memory_retries), (0, 1));
    assert!(
        (whole.loss - pieces.loss).abs() < 1e-6,
        "{whole:?} vs {pieces:?}"
    );
    let d = max_diff(&want, &got);
    assert!(d < 1e-6, "weights differ by {d}");

    // pairs of 2 rows of 5 and 2 rows of 7 tokens: one micro-batch of 28 padded tokens; room for
    // 16 runs it again as one pair a piece (10 and 14)
    let pairs = vec![
        Pair {
            prompt: vec![5, 6, 7],
            chosen: vec![10, 11],
            rejected: vec![20],
        },
        Pair {
            prompt: vec![8, 9],
            chosen: vec![30, 31],
            rejected: vec![40, 41, 42, 43, 44],
        },
    ];
    let reference = reference_logprobs(&base, &pairs, 1 << 12).unwrap();
    let cfg = DpoConfig {
        loss: DpoLoss::Sigmoid,
        beta: 0.5,
        label_smoothing: 0.0,
        ..DpoConfig::default()
    };
    let dpo = |room: Option<usize>| {
        let (vars, w) = base.to_vars().unwrap();
        let mut opt = AdamW::new(vars, AdamWConfig::default()).unwrap();
        let mut step = || {
            dpo_step(
                &w,
                &mut opt,
                &pairs,
                &reference,
                &cfg,
                &mut Default::default(),
                1 << 12,
                1e-3,
            )
            .unwrap()
        };
        let m = match room {
            Some(room) => with_room(room, &mut step),
            None => step(),
        };
        (m, opt.fit(), flat(&w.detach()))
    };
    let ((whole, _, want), (pieces, fit, got)) = (dpo(None), dpo(Some(16)));
    assert_eq!((whole.memory_retries, pieces.memory_retries), (0, 1));
    assert_eq!(fit.piece_tokens, Some(14));
    // a pair a piece shares its prompt between two rows, not four: the log-probs differ by float
    // rounding (and the reward accuracy, at margins of 0 ± 1e-6, is not compared)
    for (a, b) in [
        (whole.loss, pieces.loss),
        (whole.margin, pieces.margin),
        (
            whole.grad_norm / whole.grad_norm,
            pieces.grad_norm / whole.grad_norm,
        ),
    ] {
        assert!((a - b).abs() < 1e-5, "{whole:?} vs {pieces:?}");
    }
    let d = max_diff(&want, &got);
    assert!(d < 1e-4, "weights differ by {d}");
}

#[test]
fn passes_without_a_gradient_run_in_halves_where_they_do_not_fit() {
    padded_rows();
    use learner::step::token_logprobs;
    let base = model();
    let seqs = sequences(&base);
    // one micro-batch of 28 padded tokens; room for 7: its halves (10 and 14 tokens) fail too,
    // and it runs a sequence at a time
    let whole = token_logprobs(&base, &seqs, 1 << 12, 1.0).unwrap();
    let halves = with_room(7, || token_logprobs(&base, &seqs, 1 << 12, 1.0)).unwrap();
    assert_eq!(whole.len(), halves.len());
    for (a, b) in whole.iter().zip(&halves) {
        assert_eq!(a.len(), b.len());
        let d = max_diff(a, b);
        assert!(d < 1e-5, "{a:?} vs {b:?}");
    }
    let e = with_room(4, || token_logprobs(&base, &seqs, 1 << 12, 1.0)).unwrap_err();
    assert!(e.is_out_of_memory(), "{e}");

    let pairs: Vec<Pair> = seqs
        .chunks(2)
        .map(|s| Pair {
            prompt: s[0].prompt.clone(),
            chosen: s[0].completion.clone(),
            rejected: s[1].completion.clone(),
        })
        .collect();
    // two pairs of 2 rows, of 5 and 8 tokens: 32 padded tokens together, 10 and 16 apart
    let whole = reference_logprobs(&base, &pairs, 1 << 12).unwrap();
    let halves = with_room(16, || reference_logprobs(&base, &pairs, 1 << 12)).unwrap();
    for ((c, r), (hc, hr)) in whole.iter().zip(&halves) {
        assert!(
            (c - hc).abs() < 1e-4 && (r - hr).abs() < 1e-4,
            "{whole:?} vs {halves:?}"
        );
    }
}
