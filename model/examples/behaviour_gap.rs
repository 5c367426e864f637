//! The training–inference gap on a real model: SmolLM2-135M-Instruct (the GGUF that
//! `scripts/fetch-assets.sh` fetches) samples 32 tokens for each of 8 prompts at temperature 1
//! from its KV cache on a packed snapshot, as a rollout worker does, then the learner's path
//! (the whole rows, unpacked trainable weights) scores the same tokens. Prints the largest and
//! the mean |behaviour − learner log-prob| over the sampled tokens, and each path's largest
//! distance from the learner's path in f32 on the same (rounded) weights.
//!
//!     cargo run --release -p ferrite-model --example behaviour_gap -- [bf16|f16|f32]

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
    let (_, trainable) = g.weights.to_vars()?;
    let exact = g.weights.to(DType::F32, &Device::Cpu)?;
    let tokens = behaviour_and_learners(
        &g.weights.snapshot()?,
        &[&trainable, &exact],
        &prompts,
        &cfg,
    )?;
    let (mut gap, mut sum, mut from_exact) = (0f32, 0f32, [0f32; 2]);
    for t in &tokens {
        let [behaviour, learner, exact] = [t[0], t[1], t[2]];
        (gap, sum) = (
            gap.max((learner - behaviour).abs()),
            sum + (learner - behaviour).abs(),
        );
        from_exact[0] = from_exact[0].max((behaviour - exact).abs());
        from_exact[1] = from_exact[1].max((learner - exact).abs());
    }
    let n = tokens.len();
    println!(
        "{dtype:?}, {n} sampled tokens: |behaviour − learner| max {gap:.2e}, mean {:.2e}; \
         from f32: behaviour max {:.2e}, learner max {:.2e}",
        sum / n.max(1) as f32,
        from_exact[0],
        from_exact[1],
    );
    Ok(())
}
