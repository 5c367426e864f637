//! `ferrite`: asynchronous RL post-training for LLM reasoning.
//!
//! This first version runs the built-in experiment synchronously: a tiny Qwen2-architecture
//! model with the built-in character tokenizer learns two-digit addition by a short supervised
//! warm start, then GRPO raises its held-out accuracy. The asynchronous worker pool, TOML
//! configs, Parquet logs, checkpoints and resume come with the launcher (issue 4).

mod default_run;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "ferrite",
    version,
    about = "RL post-training for LLM reasoning"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the built-in experiment (the default).
    Run(default_run::Options),
}

fn main() -> anyhow::Result<()> {
    model::tune_allocator();
    let cli = Cli::parse();
    let options = match cli.command {
        Some(Command::Run(o)) => o,
        None => default_run::Options::parse_from(["run"]),
    };
    let summary = default_run::run(&options)?;
    println!(
        "held-out accuracy: {:.3} before SFT, {:.3} after SFT, {:.3} after GRPO ({:.0} s)",
        summary.accuracy_initial, summary.accuracy_sft, summary.accuracy_rl, summary.seconds
    );
    Ok(())
}
