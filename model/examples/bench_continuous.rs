//! Continuous batching against fixed batches on completions of unequal length: a random tiny
//! model samples until a stop token (about 1 in 40 draws) or 96 new tokens, for 256 prompts.
//! Fixed batches run `generate` on chunks of `slots` prompts (each chunk waits for its longest
//! completion); continuous batching keeps `slots` rows busy. Prints tokens/s of both and the ratio.
//!
//!     cargo run --release -p ferrite-model --example bench_continuous -- [slots] [hidden] [layers]

use std::time::Instant;

use candle_core::Device;
use model::generate::{generate, generate_continuous, GenerationConfig};
use model::sampling::SamplingParams;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    model::tune_process();
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let slots = args.first().copied().unwrap_or(32);
    let c = model::builtin::tiny_config(
        args.get(1).copied().unwrap_or(256),
        args.get(2).copied().unwrap_or(4),
    );
    let w = model::init::random_weights(&c, 0.02, 0, &Device::Cpu)?;
    let prompts: Vec<Vec<u32>> = (0..256u32)
        .map(|i| (0..8 + i % 9).map(|j| (i * 13 + j * 7) % 90 + 5).collect())
        .collect();
    let cfg = GenerationConfig {
        max_new_tokens: 96,
        sampling: SamplingParams::default(),
        // about 2 of the 100 tokens stop a completion: lengths from 1 to 96
        stop_token_ids: vec![3, 4],
        seed: 1,
        ..Default::default()
    };
    let start = Instant::now();
    let mut fixed = 0;
    for chunk in prompts.chunks(slots) {
        fixed += generate(&w, chunk, &cfg, None)?
            .iter()
            .map(|c| c.tokens.len())
            .sum::<usize>();
    }
    let fixed_s = start.elapsed().as_secs_f64();
    let start = Instant::now();
    let mut continuous = 0;
    generate_continuous(&w, &prompts, &cfg, None, slots, |_, c| {
        continuous += c.tokens.len();
        Ok(())
    })?;
    let continuous_s = start.elapsed().as_secs_f64();
    println!(
        "{} prompts, {slots} rows, hidden {}, {} layers: fixed batches {:.0} tok/s ({fixed} tokens, {fixed_s:.1} s), continuous {:.0} tok/s ({continuous} tokens, {continuous_s:.1} s): {:.2}x",
        prompts.len(),
        c.hidden_size,
        c.num_hidden_layers,
        fixed as f64 / fixed_s,
        continuous as f64 / continuous_s,
        (continuous as f64 / continuous_s) / (fixed as f64 / fixed_s),
    );
    Ok(())
}
