//! The decoder against Hugging Face transformers on tiny random models
//! (fixtures from scripts/make_model_fixtures.py): padded-batch logits, gradients of a
//! log-prob loss, greedy generation, KV-cache decode logits, and checkpoint round trips.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use model::generate::{generate, generate_continuous, Completion, GenerationConfig};
use model::kv_cache::KvCache;
use model::logprobs::{behaviour_and_learners, sequence_logprobs};
use model::sampling::SamplingParams;
use model::{forward, Batch, Weights};

const MODELS: [&str; 3] = ["tiny-qwen2", "tiny-llama", "tiny-qwen3"];

#[test]
fn padded_batch_logits_match_transformers() {
    for name in MODELS {
        check_padded_batch_logits(name);
    }
}

#[test]
fn logprob_loss_gradients_match_transformers() {
    for name in MODELS {
        check_logprob_loss_gradients(name);
    }
}

#[test]
fn greedy_generation_matches_transformers_in_a_padded_batch_and_in_slots() {
    for (name, w) in MODELS.iter().flat_map(|m| both_layouts(m)) {
        let w = w.detach();
        let (json, _) = golden(name.split(',').next().unwrap());
        let prompts = u32_rows(&json["prompts"]);
        let expected = u32_rows(&json["greedy"]);
        let cfg = GenerationConfig {
            max_new_tokens: expected[0].len(),
            sampling: SamplingParams::greedy(),
            ..Default::default()
        };
        let out = generate(&w, &prompts, &cfg, None).unwrap();
        for (k, c) in out.iter().enumerate() {
            assert_eq!(c.tokens, expected[k], "{name}: prompt {k}");
            assert_eq!(c.logprobs.len(), c.tokens.len());
        }
        // Continuous batching in one and two slots: each finished sequence's slot is refilled
        // with the next prompt, and every completion is still transformers' greedy one.
        for slots in [1, 2] {
            let out = continuous(&w, &prompts, &cfg, slots);
            for (k, c) in out.iter().enumerate() {
                assert_eq!(c.tokens, expected[k], "{name}: {slots} slots, prompt {k}");
            }
        }
    }
}

/// `generate_continuous`'s completions in prompt order, checking each arrives once.
fn continuous(
    w: &Weights,
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
    slots: usize,
) -> Vec<Completion> {
    let mut out: Vec<Option<Completion>> = vec![None; prompts.len()];
    generate_continuous(w, prompts, cfg, None, slots, |i, c| {
        assert!(out[i].is_none(), "prompt {i} completed twice");
        out[i] = Some(c);
        Ok(())
    })
    .unwrap();
    out.into_iter()
        .map(|c| c.expect("every prompt completes"))
        .collect()
}

/// Sampling at temperature 1.3 with two stop tokens, up to 10 new tokens.
fn sampled(seed: u64) -> GenerationConfig {
    GenerationConfig {
        max_new_tokens: 10,
        sampling: SamplingParams {
            temperature: 1.3,
            ..Default::default()
        },
        stop_token_ids: vec![5, 7],
        seed,
        ..Default::default()
    }
}

/// Every prompt completed, with the tokens and finish of `all` and log-probs within 1e-4.
fn assert_same_completions(all: &[Completion], out: &[Option<Completion>], label: &str) {
    for (k, (a, b)) in all.iter().zip(out).enumerate() {
        let b = b.as_ref().expect("every prompt completes");
        assert_eq!(a.tokens, b.tokens, "{label}, prompt {k}");
        assert_eq!(a.finish, b.finish, "{label}, prompt {k}");
        for (x, y) in a.logprobs.iter().zip(&b.logprobs) {
            assert!((x - y).abs() < 1e-4, "{label}, prompt {k}: {x} vs {y}");
        }
    }
}

#[test]
fn continuous_batching_samples_what_one_batch_samples() {
    // Twelve prompts of 1–9 tokens with a stop token, sampled: every slot count gives each
    // prompt the completion it gets when all prompts share one batch (its stream depends on
    // the prompt's index only). With two slots the sequences outrun the cache's capacity
    // (2 × (longest prompt + max_new_tokens)), so the rows are compacted on the way. Prompts
    // 8–11 repeat prompts 0–3: a batch prefills a repeated prompt once and copies its rows,
    // which one slot never does.
    let w = load("tiny-qwen2").detach();
    let prompts: Vec<Vec<u32>> = (0..12u32)
        .map(|i| {
            let i = i % 8;
            (0..1 + (i * 5) % 9)
                .map(|j| 3 + (i * 7 + j * 3) % 40)
                .collect()
        })
        .collect();
    let cfg = sampled(11);
    let all = generate(&w, &prompts, &cfg, None).unwrap();
    let stopped = all.iter().filter(|c| c.tokens.len() < 10).count();
    assert!(
        (2..12).contains(&stopped),
        "mixed lengths: {stopped} stopped early"
    );
    let tokens: usize = all.iter().map(|c| c.tokens.len()).sum();
    assert!(tokens / 2 > 2 * (9 + 10), "two slots must fill the cache");
    for slots in [1, 2, 3, 5] {
        let out = continuous(&w, &prompts, &cfg, slots);
        let out: Vec<Option<Completion>> = out.into_iter().map(Some).collect();
        assert_same_completions(&all, &out, &format!("{slots} slots"));
    }
}

#[test]
fn a_stream_of_prompts_raises_and_grows_the_cache_and_samples_what_one_batch_samples() {
    // Prompts handed out one at a time as slots free (the rollout workers' refills), the
    // first two short: a later prompt longer than the rows' shared length moves them up, and
    // one longer than the cache's span grows the cache. Every completion is still the one of
    // one big batch, and once the source runs dry it is not asked again.
    let w = load("tiny-qwen2").detach();
    let lengths = [1usize, 2, 6, 3, 30, 1, 12, 2];
    let prompts: Vec<Vec<u32>> = lengths
        .iter()
        .enumerate()
        .map(|(i, &n)| (0..n).map(|j| 3 + ((i * 11 + j * 7) % 40) as u32).collect())
        .collect();
    let cfg = sampled(17);
    let all = generate(&w, &prompts, &cfg, None).unwrap();
    // the completions, and what happened in order: `Some(true)` a prompt handed out,
    // `Some(false)` the source asked past its end, `None` a completion
    let stream = |room: model::generate::Room| {
        let events: std::cell::RefCell<Vec<Option<bool>>> = Default::default();
        let mut asked = 0;
        let mut out: Vec<Option<Completion>> = vec![None; prompts.len()];
        let decoded = model::generate::generate_stream(
            &w,
            &cfg,
            None,
            room,
            || {
                asked += 1;
                events.borrow_mut().push(Some(asked <= prompts.len()));
                prompts.get(asked - 1).map(|ids| model::generate::Prompt {
                    ids: ids.clone(),
                    stream: (17, asked as u64 - 1),
                    greedy: false,
                })
            },
            |i, c| {
                assert!(out[i].is_none(), "prompt {i} completed twice");
                out[i] = Some(c);
                events.borrow_mut().push(None);
                Ok(())
            },
        )
        .unwrap();
        // every token after a completion's first comes from a decode step in which its row ran
        let after_first: usize = out.iter().flatten().map(|c| c.tokens.len() - 1).sum();
        assert_eq!(decoded.rows, after_first, "{room:?}");
        assert!(decoded.rows <= room.slots * decoded.steps);
        let events = events.into_inner();
        (out, events)
    };
    let room = model::generate::Room {
        slots: 2,
        longest: 0,
        refills: true,
        refill_rows: 1,
    };
    let (out, events) = stream(room);
    let past_end = events.iter().filter(|e| **e == Some(false)).count();
    assert_eq!(past_end, 1, "asked once past the end");
    assert_same_completions(&all, &out, "a stream");
    // three slots refilled two at a time: after the first three, the prompts go out in pairs
    // (the last may be cut short by the end)
    let (out, events) = stream(model::generate::Room {
        slots: 3,
        refill_rows: 2,
        ..room
    });
    assert_same_completions(&all, &out, "three slots, refilled in pairs");
    let runs: Vec<usize> = events
        .split(Option::is_none)
        .map(|run| run.iter().filter(|e| **e == Some(true)).count())
        .filter(|&n| n > 0)
        .collect();
    assert_eq!(runs[0], 3, "{runs:?}");
    let (last, pairs) = runs[1..].split_last().expect("refills");
    assert!(
        pairs.iter().all(|&n| n % 2 == 0) && (1..=2).contains(last),
        "{runs:?}"
    );
    // with no new tokens to generate, every prompt gets an empty completion at once
    let none = GenerationConfig {
        max_new_tokens: 0,
        ..cfg.clone()
    };
    let mut done = Vec::new();
    let mut left = prompts.iter();
    model::generate::generate_stream(
        &w,
        &none,
        None,
        room,
        || {
            left.next().map(|ids| model::generate::Prompt {
                ids: ids.clone(),
                stream: (0, 0),
                greedy: false,
            })
        },
        |i, c| {
            assert!(c.tokens.is_empty());
            done.push(i);
            Ok(())
        },
    )
    .unwrap();
    assert_eq!(done, (0..prompts.len()).collect::<Vec<_>>());
    // a bad prompt from the stream is an error, as in a list
    let bad = model::generate::generate_stream(
        &w,
        &cfg,
        None,
        room,
        {
            let mut n = 0;
            move || {
                n += 1;
                (n <= 3).then(|| model::generate::Prompt {
                    ids: vec![3, if n == 3 { 10_000 } else { 4 }],
                    stream: (0, n),
                    greedy: false,
                })
            }
        },
        |_, _| Ok(()),
    );
    assert!(
        bad.unwrap_err().to_string().contains("vocab size"),
        "a token past the vocabulary"
    );
}

#[test]
fn groups_batched_with_their_own_streams_sample_what_each_samples_alone() {
    // two groups of three rows (the rollout workers' case: a group's rows share its prompt and
    // seed), of prompts 2 and 7 tokens long, sampled together and apart, and with a greedy row
    let w = load("tiny-qwen2").detach();
    let cfg = |seed| GenerationConfig {
        max_new_tokens: 8,
        sampling: SamplingParams {
            temperature: 1.3,
            ..Default::default()
        },
        stop_token_ids: vec![5],
        seed,
        ..Default::default()
    };
    let groups = [(vec![3u32, 9], 21u64), (vec![4, 8, 15, 16, 23, 42, 11], 22)];
    let alone: Vec<Completion> = groups
        .iter()
        .flat_map(|(p, seed)| generate(&w, &vec![p.clone(); 3], &cfg(*seed), None).unwrap())
        .collect();
    let prompts: Vec<Vec<u32>> = groups
        .iter()
        .flat_map(|(p, _)| vec![p.clone(); 3])
        .collect();
    let streams: Vec<(u64, u64)> = groups
        .iter()
        .flat_map(|(_, seed)| (0..3).map(move |k| (*seed, k)))
        .collect();
    let mut together: Vec<Option<Completion>> = vec![None; 6];
    model::generate::generate_continuous_streams(
        &w,
        &prompts,
        &streams,
        &cfg(0),
        None,
        6,
        |i, c| {
            together[i] = Some(c);
            Ok(())
        },
    )
    .unwrap();
    let distinct: std::collections::HashSet<&Vec<u32>> = alone.iter().map(|c| &c.tokens).collect();
    assert!(distinct.len() > 2, "the rows' streams differ");
    for (k, (a, b)) in alone.iter().zip(&together).enumerate() {
        let b = b.as_ref().expect("every prompt completes");
        assert_eq!(a.tokens, b.tokens, "row {k}");
        for (x, y) in a.logprobs.iter().zip(&b.logprobs) {
            assert!((x - y).abs() < 1e-4, "row {k}: {x} vs {y}");
        }
    }
    // each group with a greedy row after its three (ReMax's baseline): the sampled rows are
    // as before, the greedy rows what greedy decoding of the prompt alone gives
    let rows: Vec<model::generate::Prompt> = groups
        .iter()
        .flat_map(|(p, seed)| {
            (0..4).map(move |k| model::generate::Prompt {
                ids: p.clone(),
                stream: (*seed, k),
                greedy: k == 3,
            })
        })
        .collect();
    let mut mixed: Vec<Option<Completion>> = vec![None; 8];
    model::generate::generate_prompts(&w, rows, &cfg(0), None, 8, |i, c| {
        mixed[i] = Some(c);
        Ok(())
    })
    .unwrap();
    let greedy = GenerationConfig {
        sampling: SamplingParams::greedy(),
        ..cfg(0)
    };
    for (g, (p, _)) in groups.iter().enumerate() {
        let got = |k: usize| mixed[4 * g + k].as_ref().expect("every row completes");
        for k in 0..3 {
            assert_eq!(got(k).tokens, alone[3 * g + k].tokens, "group {g} row {k}");
        }
        let want = &generate(&w, std::slice::from_ref(p), &greedy, None).unwrap()[0];
        assert_eq!(got(3).tokens, want.tokens, "group {g}'s greedy row");
        assert!(alone[3 * g..3 * g + 3]
            .iter()
            .any(|c| c.tokens != want.tokens));
    }
    let e = model::generate::generate_continuous_streams(
        &w,
        &prompts,
        &streams[1..],
        &cfg(0),
        None,
        6,
        |_, _| Ok(()),
    );
    assert!(e.is_err(), "one stream a prompt");
}

#[test]
fn kv_cache_decode_logits_equal_full_forward_logits() {
    for (name, w) in MODELS.iter().flat_map(|m| both_layouts(m)) {
        let w = w.detach();
        let (json, golden) = golden(name.split(',').next().unwrap());
        let prompts = u32_rows(&json["prompts"]);
        let completions = u32_rows(&json["greedy"]);
        let n_new = completions[0].len();
        // all prompts in one left-padded batch, decoded token by token through the cache
        let b = prompts.len();
        let longest = prompts.iter().map(Vec::len).max().unwrap();
        let mut cache =
            KvCache::new(&w.config, b, longest + n_new, DType::F32, &Device::Cpu).unwrap();
        let mut valid: Vec<Vec<bool>> = prompts
            .iter()
            .map(|p| (0..longest).map(|j| j >= longest - p.len()).collect())
            .collect();
        let ids: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| {
                std::iter::repeat_n(0, longest - p.len())
                    .chain(p.iter().copied())
                    .collect()
            })
            .collect();
        let pos: Vec<Vec<u32>> = valid
            .iter()
            .map(|v| model::forward::positions_of(v, 0))
            .collect();
        let batch = Batch::from_parts(&ids, &pos, &valid, 0, longest, &Device::Cpu).unwrap();
        let mut logits = forward(&w, &batch, Some(&mut cache))
            .unwrap()
            .narrow(1, longest - 1, 1)
            .unwrap();
        for step in 0..n_new {
            for (k, p) in prompts.iter().enumerate() {
                let reference = golden[&format!("decode_logits.{k}")].get(step).unwrap();
                let ours = logits.get(k).unwrap().squeeze(0).unwrap();
                let d = max_abs_diff(&ours, &reference);
                assert!(
                    d < 1e-4,
                    "{name}: prompt {k} ({} tokens) step {step}: {d:e}",
                    p.len()
                );
            }
            let next: Vec<Vec<u32>> = completions.iter().map(|c| vec![c[step]]).collect();
            let pos: Vec<Vec<u32>> = prompts
                .iter()
                .map(|p| vec![(p.len() + step) as u32])
                .collect();
            valid.iter_mut().for_each(|v| v.push(true));
            let batch =
                Batch::from_parts(&next, &pos, &valid, cache.len(), 1, &Device::Cpu).unwrap();
            logits = forward(&w, &batch, Some(&mut cache)).unwrap();
        }
    }
}

#[test]
fn sampling_is_reproducible_and_batch_independent() {
    let w = load("tiny-qwen2").detach();
    let prompts = vec![vec![3, 4, 5], vec![9, 8], vec![1, 2, 3, 4, 5, 6]];
    let cfg = GenerationConfig {
        max_new_tokens: 12,
        sampling: SamplingParams {
            temperature: 0.9,
            top_k: 20,
            top_p: 0.95,
        },
        stop_token_ids: vec![2],
        seed: 42,
        ..Default::default()
    };
    let a = generate(&w, &prompts, &cfg, None).unwrap();
    let b = generate(&w, &prompts, &cfg, None).unwrap();
    assert_eq!(a, b, "same seed, same completions");
    let other = generate(
        &w,
        &prompts,
        &GenerationConfig {
            seed: 43,
            ..cfg.clone()
        },
        None,
    )
    .unwrap();
    assert_ne!(a, other, "another seed gives other completions");
    for c in &a {
        assert!(c.logprobs.iter().all(|&lp| lp <= 0.0 && lp.is_finite()));
        if c.tokens.last() == Some(&2) {
            assert_eq!(c.finish, model::generate::FinishReason::Stop);
        } else {
            assert_eq!(c.tokens.len(), 12);
        }
    }
}

#[test]
fn behaviour_logprobs_equal_training_logprobs_at_the_sampling_temperature() {
    // The generator's log-probs (KV cache, detached weights) and the learner's (full forward)
    // agree in f32: one model and one set of kernels on both sides (in bf16 the two paths round
    // differently: examples/behaviour_gap.rs measures that gap).
    let w = load("tiny-llama");
    let prompts = vec![vec![3, 4, 5], vec![9, 8, 7, 6, 5]];
    let cfg = GenerationConfig {
        max_new_tokens: 10,
        sampling: SamplingParams {
            temperature: 0.7,
            ..Default::default()
        },
        seed: 5,
        ..Default::default()
    };
    let tokens = behaviour_and_learners(&w.detach(), &[&w], &prompts, &cfg).unwrap();
    let out = generate(&w.detach(), &prompts, &cfg, None).unwrap();
    assert_eq!(
        tokens.len(),
        out.iter().map(|c| c.tokens.len()).sum::<usize>()
    );
    for (i, t) in tokens.iter().enumerate() {
        let [behaviour, learner] = [t[0], t[1]];
        assert!(
            (learner - behaviour).abs() < 1e-5,
            "sampled token {i}: {learner} vs {behaviour}"
        );
    }
}

#[test]
fn checkpoints_round_trip_sharded_and_in_bf16() {
    for name in MODELS {
        let w = load(name);
        let dir =
            std::env::temp_dir().join(format!("ferrite-roundtrip-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        // shards of at most 40 kB: several files and an index
        w.save_dir(&dir, DType::F32, 40_000).unwrap();
        assert!(dir.join("model.safetensors.index.json").exists());
        let back = Weights::load_dir(&dir, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(back.config, w.config);
        for ((n, a), (_, b)) in w.named().iter().zip(back.named().iter()) {
            assert_eq!(
                max_abs_diff(a, b),
                0.0,
                "{name}: {n} changed in an f32 round trip"
            );
        }
        assert_eq!(w.config.tie_word_embeddings, back.lm_head.is_none());
        // bf16: every value rounds to the nearest bf16
        let dir16 = dir.with_extension("bf16");
        w.save_dir(&dir16, DType::BF16, usize::MAX).unwrap();
        assert!(dir16.join("model.safetensors").exists());
        let back16 = Weights::load_dir(&dir16, DType::F32, &Device::Cpu).unwrap();
        let a = w
            .embed_tokens
            .to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        assert_eq!(max_abs_diff(&a, &back16.embed_tokens), 0.0);
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::remove_dir_all(&dir16).unwrap();
    }
}

#[test]
fn checksums_tell_weights_apart() {
    let w = load("tiny-qwen2");
    let same = load("tiny-qwen2");
    assert_eq!(w.checksum().unwrap(), same.checksum().unwrap());
    let (vars, _) = w.to_vars().unwrap();
    let before = w.checksum().unwrap();
    // one value of one tensor nudged by one ulp changes the checksum
    let (name, var) = &vars[3];
    let mut values = var
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    values[7] = f32::from_bits(values[7].to_bits() + 1);
    let mut named = w.named();
    named.insert(
        name.clone(),
        Tensor::from_vec(values, var.as_tensor().shape(), &Device::Cpu).unwrap(),
    );
    let nudged = Weights::from_named(&w.config, &named).unwrap();
    assert_ne!(nudged.checksum().unwrap(), before);
}

#[test]
fn bad_model_files_are_clear_errors() {
    let dir = std::env::temp_dir().join(format!("ferrite-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let e = Weights::load_dir(&dir, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("config.json"), "{e}");
    std::fs::copy(fixture("tiny-qwen2/config.json"), dir.join("config.json")).unwrap();
    let e = Weights::load_dir(&dir, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a model directory"), "{e}");
    // weights of the other model: a named tensor with the wrong shape
    std::fs::copy(
        fixture("tiny-llama/model.safetensors"),
        dir.join("model.safetensors"),
    )
    .unwrap();
    let e = Weights::load_dir(&dir, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("model."), "{e}");
    std::fs::write(dir.join("config.json"), "{not json").unwrap();
    let e = Weights::load_dir(&dir, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("invalid JSON"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_tensor_the_config_does_not_explain_is_an_error() {
    let dir = std::env::temp_dir().join(format!("ferrite-extra-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(fixture("tiny-qwen2/config.json"), dir.join("config.json")).unwrap();
    let w = load("tiny-qwen2");
    let with = |extra: &[(&str, Tensor)]| {
        let mut named: std::collections::HashMap<String, Tensor> = w.named().into_iter().collect();
        for (name, t) in extra {
            named.insert(name.to_string(), t.clone());
        }
        candle_core::safetensors::save(&named, dir.join("model.safetensors")).unwrap();
        Weights::load_dir(&dir, DType::F32, &Device::Cpu)
    };
    // an o_proj bias (Llama's attention_bias) would change every output: not dropped
    let bias = Tensor::zeros(64, DType::F32, &Device::Cpu).unwrap();
    let e = with(&[("model.layers.0.self_attn.o_proj.bias", bias.clone())])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("model.layers.0.self_attn.o_proj.bias") && e.contains("Qwen2ForCausalLM"),
        "{e}"
    );
    // older checkpoints' rotary buffers are derived from the config: passed over
    let inv_freq = Tensor::ones(8, DType::F32, &Device::Cpu).unwrap();
    let back = with(&[("model.layers.1.self_attn.rotary_emb.inv_freq", inv_freq)]).unwrap();
    assert_eq!(back.checksum().unwrap(), w.checksum().unwrap());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_qwen3_gguf_imports_as_its_safetensors() {
    // tiny-qwen3's weights written by gguf-py under llama.cpp's names (q/k norms included)
    let g = model::gguf::load(&fixture("tiny-qwen3/model.gguf"), DType::F32, &Device::Cpu).unwrap();
    let w = load("tiny-qwen3");
    let mut config = g.weights.config.clone();
    // GGUF stores the epsilon as an f32, which is what the norms compute with
    assert_eq!(config.rms_norm_eps as f32, w.config.rms_norm_eps as f32);
    config.rms_norm_eps = w.config.rms_norm_eps;
    assert_eq!(config, w.config);
    assert_eq!(g.weights.checksum().unwrap(), w.checksum().unwrap());
    // its toy vocabulary: 86 bytes and two merges
    assert_eq!(g.tokenizer.encode("abc", false).unwrap(), vec![87]);
    assert_eq!(g.tokenizer.encode("ab!", false).unwrap(), vec![86, 0]);
}

#[test]
fn malformed_batches_are_errors() {
    let w = load("tiny-qwen2");
    let ragged = vec![vec![1, 2, 3], vec![4, 5]];
    let mask = vec![vec![1, 1, 1], vec![1, 1]];
    assert!(Batch::new(&ragged, &mask, &Device::Cpu).is_err());
    let ids = vec![vec![1, 2, 3]];
    assert!(Batch::new(&ids, &[vec![1, 1]], &Device::Cpu).is_err());
    assert!(sequence_logprobs(&w, &[vec![1]], &[vec![1]], &[vec![1]], 1.0).is_err());
    let cfg = GenerationConfig::default();
    assert!(generate(&w.detach(), &[vec![]], &cfg, None).is_err());
    assert!(
        generate(&w.detach(), &[vec![10_000]], &cfg, None).is_err(),
        "token beyond the vocab"
    );
}
