//! A GRPO step on completions of RL-like lengths, its micro-batches taking the sequences as they
//! come (a group's rows together) and shortest first where that runs fewer positions
//! (`learner::step::set_order_by_length`), both in this process: the positions each runs, its
//! seconds a step and the ratio.
//!
//!     cargo run --release -p ferrite-learner --example bench_order [hidden layers]
//!
//! 16 prompts of 40–120 tokens, 8 completions each of 8–512 tokens (uniform in the logarithm:
//! many short ones, a few long: `learner::synthetic::rl_like_step`), micro-batches of 8,192
//! padded tokens (the default `optimizer.micro_batch_tokens`), on the built-in model's shape
//! (hidden 128, 4 layers) unless given another.

use candle_core::Device;
use learner::optim::{AdamW, AdamWConfig};
use learner::synthetic::{compare_orders, rl_like_step};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    model::tune_process();
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let (hidden, layers) = (*args.first().unwrap_or(&128), *args.get(1).unwrap_or(&4));
    let config = model::builtin::tiny_config(hidden, layers);
    let base = model::init::random_weights(&config, 0.02, 0, &Device::Cpu)?;
    let (vars, w) = base.to_vars()?;
    let mut opt = AdamW::new(vars, AdamWConfig::default())?;
    let seqs = rl_like_step(16, 8, config.vocab_size as u32, 3);
    let tokens: usize = seqs.iter().map(|s| s.completion.len()).sum();
    println!("{} sequences, {tokens} completion tokens", seqs.len());
    let runs = compare_orders(&w, &mut opt, &seqs, 8192, 3)?;
    for (run, label) in runs.iter().zip(["as they come", "by length"]) {
        println!(
            "BENCH order {label}: {:.2} s a step, {:.0} completion tokens/s, {} positions",
            run.seconds,
            tokens as f64 / run.seconds,
            run.positions
        );
    }
    let [given, sorted] = runs;
    println!(
        "by length / as they come: {:.2}× the speed, {:.2}× the positions",
        given.seconds / sorted.seconds,
        sorted.positions as f64 / given.positions as f64
    );
    Ok(())
}
