//! Training-step and sampling speed of the model on this CPU, for a tiny Qwen2-shaped model and
//! for SmolLM2-135M's shape. `scripts/bench_model.sh` runs it beside PyTorch + transformers on the
//! same shapes and thread count and prints the ratios.
//!
//!     cargo run --release -p ferrite-learner --example bench_model
//!
//!     cargo run --release -p ferrite-learner --example bench_model -- smollm2-135m 4 1024
//!
//! runs one model's case at another batch and length; a fourth argument sets the attention's
//! chunk budget (`model::attention::set_chunk_elements`), and a fifth, `checkpoint`, turns on
//! per-layer activation checkpointing (`model::checkpoint`). Prints `BENCH <model> <train|sample>
//! <tokens/s>` lines; the train line ends with the process's peak resident memory so far.

use std::time::Instant;

use candle_core::Device;
use learner::optim::{AdamW, AdamWConfig};
use model::config::{Architecture, ModelConfig, RopeScaling};
use model::generate::{generate, GenerationConfig};
use model::logprobs::sequence_logprobs;
use model::sampling::SamplingParams;
use model::{init, Weights};

pub fn tiny() -> ModelConfig {
    ModelConfig {
        architecture: Architecture::Qwen2,
        vocab_size: 4096,
        hidden_size: 256,
        intermediate_size: 768,
        num_hidden_layers: 4,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 64,
        rms_norm_eps: 1e-6,
        rope_theta: 10000.0,
        rope_scaling: RopeScaling::Default,
        max_position_embeddings: 1024,
        tie_word_embeddings: true,
        qkv_bias: true,
        bos_token_id: None,
        eos_token_ids: vec![],
        pad_token_id: None,
    }
}

pub fn smollm2() -> ModelConfig {
    ModelConfig {
        architecture: Architecture::Llama,
        vocab_size: 49152,
        hidden_size: 576,
        intermediate_size: 1536,
        num_hidden_layers: 30,
        num_attention_heads: 9,
        num_key_value_heads: 3,
        head_dim: 64,
        rms_norm_eps: 1e-5,
        rope_theta: 100000.0,
        max_position_embeddings: 8192,
        tie_word_embeddings: true,
        qkv_bias: false,
        ..tiny()
    }
}

fn ids(b: usize, t: usize, vocab: usize, salt: u64) -> Vec<Vec<u32>> {
    let mut rng = model::rng::Rng::new(salt);
    (0..b)
        .map(|_| (0..t).map(|_| rng.below(vocab as u64) as u32).collect())
        .collect()
}

/// One step; returns the seconds spent in forward + log-probs, backward, and the optimizer.
fn train_step(
    w: &Weights,
    opt: &mut AdamW,
    ids: &[Vec<u32>],
) -> Result<[f64; 3], Box<dyn std::error::Error>> {
    let t0 = Instant::now();
    let mask: Vec<Vec<u8>> = ids.iter().map(|r| vec![1; r.len()]).collect();
    let lp = sequence_logprobs(w, ids, &mask, &mask, 1.0)?;
    let loss = (lp.logprobs.sum_all()?.neg()? / lp.mask.sum_all()?.to_scalar::<f32>()? as f64)?;
    let t1 = Instant::now();
    let grads = model::checkpoint::backward(&loss)?;
    let t2 = Instant::now();
    opt.accumulate(&grads, 1.0)?;
    opt.step(1e-5)?;
    let t3 = Instant::now();
    Ok([
        (t1 - t0).as_secs_f64(),
        (t2 - t1).as_secs_f64(),
        (t3 - t2).as_secs_f64(),
    ])
}

/// The process's peak resident set (`VmHWM` of /proc/self/status), or "?" off Linux.
fn peak_rss() -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(|l| l["VmHWM:".len()..].trim().to_string())
        })
        .unwrap_or_else(|| "?".into())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    model::tune_process();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let only = args.first().cloned();
    let shape: Option<(usize, usize)> = match (args.get(1), args.get(2)) {
        (Some(b), Some(t)) => Some((b.parse()?, t.parse()?)),
        _ => None,
    };
    if let Some(budget) = args.get(3) {
        model::attention::set_chunk_elements(budget.parse()?);
    }
    model::checkpoint::set_enabled(args.get(4).map(String::as_str) == Some("checkpoint"));
    let cases = [
        ("tiny", tiny(), 8usize, 256usize, 5usize),
        ("smollm2-135m", smollm2(), 4, 256, 3),
    ];
    for (name, config, b, t, reps) in cases {
        if only.as_deref().is_some_and(|o| o != name) {
            continue;
        }
        let (b, t) = shape.unwrap_or((b, t));
        let base = init::random_weights(&config, 0.02, 0, &Device::Cpu)?;
        let (vars, w) = base.to_vars()?;
        let mut opt = AdamW::new(vars, AdamWConfig::default())?;
        let batch = ids(b, t, config.vocab_size, 1);
        train_step(&w, &mut opt, &batch)?; // warm-up
        let start = Instant::now();
        let mut phases = [0f64; 3];
        for _ in 0..reps {
            let p = train_step(&w, &mut opt, &batch)?;
            (0..3).for_each(|k| phases[k] += p[k] / reps as f64);
        }
        let secs = start.elapsed().as_secs_f64() / reps as f64;
        println!(
            "BENCH {name} train {:.1}  # B={b} T={t}: {:.0} ms/step (forward + log-probs {:.0}, backward {:.0}, AdamW {:.0}), peak RSS {}",
            (b * t) as f64 / secs,
            secs * 1e3,
            phases[0] * 1e3,
            phases[1] * 1e3,
            phases[2] * 1e3,
            peak_rss()
        );

        let prompts = ids(16, 32, config.vocab_size, 2);
        let cfg = GenerationConfig {
            max_new_tokens: 128,
            sampling: SamplingParams::default(),
            seed: 0,
            ..Default::default()
        };
        // packed weights, as a rollout worker's snapshot has them, then the learner's unpacked
        let sample = |w: &model::Weights| -> Result<(f64, usize), Box<dyn std::error::Error>> {
            let warm = GenerationConfig {
                max_new_tokens: 4,
                ..cfg.clone()
            };
            generate(w, &prompts[..2], &warm, None)?;
            let start = Instant::now();
            let out = generate(w, &prompts, &cfg, None)?;
            let n: usize = out.iter().map(|c| c.tokens.len()).sum();
            Ok((start.elapsed().as_secs_f64(), n))
        };
        let (secs, n) = sample(&w.packed()?)?;
        println!("BENCH {name} sample {:.1}  # batch 16, 32-token prompts, {n} new tokens in {secs:.1} s, packed weights", n as f64 / secs);
        let (secs_u, n_u) = sample(&w.detach())?;
        println!(
            "  {name} sample on unpacked weights: {:.1} tok/s (packed / unpacked {:.2}x)",
            n_u as f64 / secs_u,
            (n as f64 / secs) / (n_u as f64 / secs_u)
        );
    }
    Ok(())
}
