//! The training–inference gap on a real model: SmolLM2-135M-Instruct (the GGUF that
//! `scripts/fetch-assets.sh` fetches) samples 128 tokens for each of 8 prompts at temperature 1
//! from its KV cache on a packed snapshot, as a rollout worker does, then the learner's path
//! (the whole rows, unpacked trainable weights) scores the same tokens. Prints the largest and
//! the mean |behaviour − learner log-prob| over the sampled tokens, and each path's largest and
//! mean distance from the learner's path in f32 on the same (rounded) weights.
//!
//! With `f32-logits`, the output layer gives its logits in f32 in both paths
//! (`model.f32_logits`).
//!
//!     cargo run --release -p ferrite-model --example behaviour_gap -- [bf16|f16|f32] [f32-logits]

use candle_core::{DType, Device};
use model::generate::GenerationConfig;
use model::logprobs::behaviour_and_learners;
use model::sampling::SamplingParams;

const MODEL: &str = "assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
const PROMPTS: [&str; 8] = [
    "What is 17 + 25? Answer:",
    "The capital of France is",
    "def fib(n):",
    "Once upon a time, there was",
    "Q: 3*4=? A:",
    "List three colors:",
    "import numpy as np\n",
    "The quick brown fox",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    model::tune_process();
    let dtype = match std::env::args().nth(1).as_deref() {
        None | Some("bf16") => DType::BF16,
        Some("f16") => DType::F16,
        Some("f32") => DType::F32,
        Some(other) => return Err(format!("dtype {other}: bf16, f16 or f32").into()),
    };
    let f32_logits = std::env::args().nth(2).as_deref() == Some("f32-logits");
    model::head::set_f32_logits(f32_logits);
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(MODEL);
    let g = model::gguf::load(&path, dtype, &Device::Cpu)
        .map_err(|e| format!("{e} (scripts/fetch-assets.sh fetches it)"))?;
    let prompts: Vec<Vec<u32>> = PROMPTS
        .iter()
        .map(|t| g.tokenizer.encode(t, false))
        .collect::<Result<_, _>>()?;
    let cfg = GenerationConfig {
        max_new_tokens: 128,
        sampling: SamplingParams {
            temperature: 1.0,
            ..Default::default()
        },
        seed: 7,
        ..Default::default()
    };
    let (_, trainable) = g.weights.to_vars()?;
    let exact = g.weights.to(DType::F32, &Device::Cpu)?;
    let tokens = behaviour_and_learners(
        &g.weights.snapshot()?,
        &[&trainable, &exact],
        &prompts,
        &cfg,
    )?;
    // max and mean |a − b| over the sampled tokens of columns a and b (0 behaviour, 1 learner,
    // 2 the learner's path in f32)
    let gap = |a: usize, b: usize| {
        let d: Vec<f32> = tokens.iter().map(|t| (t[a] - t[b]).abs()).collect();
        let max = d.iter().fold(0f32, |m, &x| m.max(x));
        format!(
            "max {max:.2e}, mean {:.2e}",
            d.iter().sum::<f32>() / d.len().max(1) as f32
        )
    };
    println!(
        "{dtype:?}{}, {} sampled tokens: |behaviour − learner| {}; from f32: behaviour {}, learner {}",
        if f32_logits { ", f32 logits" } else { "" },
        tokens.len(),
        gap(0, 1),
        gap(0, 2),
        gap(1, 2),
    );
    Ok(())
}
