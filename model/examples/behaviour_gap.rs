//! The training–inference gap on a real model: SmolLM2-135M-Instruct (the GGUF that
//! `scripts/fetch-assets.sh` fetches) samples 32 tokens for each of 8 prompts at temperature 1
//! from its KV cache on a packed snapshot, as a rollout worker does, then the learner's path
//! (the whole rows, unpacked trainable weights) scores the same tokens. Prints the largest and
//! the mean |behaviour − learner log-prob| over the sampled tokens, and each path's largest
//! distance from the learner's path in f32 on the same (rounded) weights.
//!
//!     cargo run --release -p ferrite-model --example behaviour_gap -- [bf16|f16|f32]

use candle_core::{DType, Device};
use model::generate::{generate, GenerationConfig};
use model::logprobs::sequence_logprobs;
use model::sampling::SamplingParams;
use model::weights::Weights;

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
        max_new_tokens: 32,
        sampling: SamplingParams {
            temperature: 1.0,
            ..Default::default()
        },
        seed: 7,
        ..Default::default()
    };
    let out = generate(&g.weights.snapshot()?, &prompts, &cfg, None)?;
    // the rows padded to one length; each scores its completion's tokens
    let rows: Vec<Vec<u32>> = prompts
        .iter()
        .zip(&out)
        .map(|(p, c)| p.iter().chain(&c.tokens).copied().collect())
        .collect();
    let t = rows.iter().map(Vec::len).max().unwrap_or(0);
    let (mut ids, mut attn, mut scored) = (Vec::new(), Vec::new(), Vec::new());
    for (p, row) in prompts.iter().zip(&rows) {
        ids.push([&row[..], &vec![0; t - row.len()]].concat());
        attn.push((0..t).map(|i| u8::from(i < row.len())).collect::<Vec<u8>>());
        let own = |i: usize| i >= p.len() && i < row.len();
        scored.push((0..t).map(|i| u8::from(own(i))).collect::<Vec<u8>>());
    }
    let score = |w: &Weights| -> Result<Vec<Vec<f32>>, Box<dyn std::error::Error>> {
        let lp = sequence_logprobs(w, &ids, &attn, &scored, 1.0)?.logprobs;
        Ok(lp.to_dtype(DType::F32)?.to_vec2::<f32>()?)
    };
    let (_, trainable) = g.weights.to_vars()?;
    let learner = score(&trainable)?;
    let exact = score(&g.weights.to(DType::F32, &Device::Cpu)?)?;
    let (mut gap, mut sum, mut n, mut from_exact) = (0f32, 0f32, 0usize, [0f32; 2]);
    for (k, (p, c)) in prompts.iter().zip(&out).enumerate() {
        for (i, &behaviour) in c.logprobs.iter().enumerate() {
            let at = p.len() + i - 1; // the state before token i of the completion
            let d = (learner[k][at] - behaviour).abs();
            (gap, sum, n) = (gap.max(d), sum + d, n + 1);
            from_exact[0] = from_exact[0].max((behaviour - exact[k][at]).abs());
            from_exact[1] = from_exact[1].max((learner[k][at] - exact[k][at]).abs());
        }
    }
    println!(
        "{dtype:?}, {n} sampled tokens: |behaviour − learner| max {gap:.2e}, mean {:.2e}; \
         from f32: behaviour max {:.2e}, learner max {:.2e}",
        sum / n.max(1) as f32,
        from_exact[0],
        from_exact[1],
    );
    Ok(())
}
