//! A GRPO step on completions of RL-like lengths in three layouts, in this process: its
//! micro-batches' rows padded to the longest with the sequences as they come (a group's rows
//! together), padded with the sequences shortest first where that pads less
//! (`learner::step::set_order_by_length`), and packed end to end with no padding, each prompt once
//! (`learner::step::set_pack_rows`): the positions each runs, its seconds a step and the ratios.
//! First, the keys the packed flash kernels' forward visits over those rows, with their query
//! tiles' two spans and from each tile's first key (`learner::synthetic::packed_attention_keys`).
//!
//!     cargo run --release -p ferrite-learner --example bench_order [hidden layers]
//!
//! 16 prompts of 40–120 tokens, 8 completions each of 8–512 tokens (uniform in the logarithm:
//! many short ones, a few long: `learner::synthetic::rl_like_step`), micro-batches of 8,192
//! tokens (the default `optimizer.micro_batch_tokens`), on the built-in model's shape (hidden 128,
//! 4 layers) unless given another.

use candle_core::Device;
use learner::optim::{AdamW, AdamWConfig};
use learner::synthetic::{compare_layouts, packed_attention_keys, rl_like_step, LAYOUTS};

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
    let real: usize = seqs
        .iter()
        .map(|s| s.prompt.len() + s.completion.len())
        .sum();
    println!(
        "{} sequences, {tokens} completion tokens ({real} prompt and completion tokens)",
        seqs.len()
    );
    // what the packed flash kernels' spans save (in keys: the same on any device)
    let [spans, from_first, seen] = packed_attention_keys(&seqs, 8192)?;
    println!(
        "BENCH packed attention keys (summed over 64-row query tiles): {spans} visited with the \
         spans, {from_first} from each tile's first key ({:.2}× fewer with the spans), {seen} seen \
         by a tile's rows",
        from_first as f64 / spans as f64
    );
    let runs = compare_layouts(&w, &mut opt, &seqs, 8192, 3)?;
    for (run, label) in runs.iter().zip(LAYOUTS) {
        println!(
            "BENCH layout {label}: {:.2} s a step, {:.0} completion tokens/s, {} positions \
             ({:.2}× the first's speed)",
            run.seconds,
            tokens as f64 / run.seconds,
            run.positions,
            runs[0].seconds / run.seconds
        );
    }
    Ok(())
}
