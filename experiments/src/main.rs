//! `ferrite`: asynchronous RL post-training for LLM reasoning.
//!
//! `ferrite` alone runs the built-in experiment: a tiny Qwen2-architecture model with the
//! built-in character tokenizer learns two-digit addition by a short supervised warm start,
//! then asynchronous GRPO raises its held-out accuracy, on a laptop CPU in minutes.

mod algo;
mod alpharl;
mod analyze;
mod bench;
mod config;
mod dpo;
mod dryrun;
mod eval;
mod failpoint;
#[cfg(feature = "cuda")]
mod gpu_check;
mod logs;
mod report;
mod run;
mod setup;
mod sweep;
mod tensorboard;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use config::Config;

#[derive(Parser)]
#[command(
    name = "ferrite",
    version,
    about = "RL post-training for LLM reasoning"
)]
struct Cli {
    /// error, warn, info, debug or trace.
    #[arg(long, global = true, default_value = "info")]
    log_level: tracing::Level,
    /// No progress bars.
    #[arg(long, global = true)]
    no_progress: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Args, Clone, Default)]
struct ConfigArgs {
    /// A TOML config (a path, or the name of a preset in experiments/configs); none: the
    /// built-in default.
    config: Option<String>,
    /// Override a key: `--set optimizer.lr=3e-5` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Run an experiment (no config: the built-in default).
    Run {
        #[command(flatten)]
        config: ConfigArgs,
        /// The run directory (default: `run.output_dir/run.name-<unix time>`).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Continue the run in this directory from its last complete checkpoint.
        #[arg(long, value_name = "RUN_DIR", conflicts_with = "out")]
        resume: Option<PathBuf>,
        /// Train only the subnetwork of a `*.masks.safetensors` from `ferrite analyze
        /// subnetwork` (sets `optimizer.subnetwork_mask`).
        #[arg(long, value_name = "PATH")]
        subnetwork_mask: Option<PathBuf>,
        /// Check everything the run reads (config, model, tokenizer, teacher, data, prompts
        /// against the context, the reward of each record's reference completion) and stop:
        /// nothing trained, no run directory written; problems found end it with an error.
        #[arg(long)]
        dry_run: bool,
    },
    /// Held-out accuracy, pass@1, pass@k and (math answers) maj@k of a checkpoint (or a run's latest one).
    Eval {
        checkpoint: PathBuf,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Write a checkpoint as a plain Hugging Face model directory.
    Export {
        checkpoint: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// float32, bfloat16 or float16.
        #[arg(long, default_value = "bfloat16")]
        dtype: String,
    },
    /// Run every variant of the config's [sweep] section for every seed (shared warm start per
    /// seed), then print the report; rerun to continue a stopped sweep.
    Sweep {
        #[command(flatten)]
        config: ConfigArgs,
        #[arg(long)]
        out: PathBuf,
    },
    /// The table of held-out accuracies of the runs in a directory (a sweep's `--out`), by
    /// variant; given one run's directory, redraw its report.png.
    Report { dir: PathBuf },
    /// Analyses of a run's checkpoints.
    #[command(subcommand)]
    Analyze(Analysis),
    /// AlphaRL: extrapolate a run's early rank-1 trajectories, or the one-command report.
    #[command(subcommand)]
    Alpharl(AlphaRl),
    /// Run the same experiment with max_staleness 0 and 1 and compare throughput and accuracy.
    BenchStaleness {
        #[command(flatten)]
        config: ConfigArgs,
        #[arg(long, default_value = "runs/bench-staleness")]
        out: PathBuf,
    },
    /// The CUDA kernels against their CPU references, and the Qwen2.5-0.5B-shape learner and
    /// generation benchmarks (`scripts/gpu-check.sh` runs it beside PyTorch's).
    #[cfg(feature = "cuda")]
    GpuCheck {
        /// checks, bench, all, jit (compile every kernel module into the driver's cache) or glue
        /// (the launchers against the CPU path, as `scripts/fake-gpu.sh` runs them).
        #[arg(default_value = "all")]
        what: String,
    },
}

#[derive(Subcommand)]
enum Analysis {
    /// Update sparsity (bf16 bitwise and |Δ| ≤ tol), norms, numerical rank and mask overlaps of
    /// every checkpoint against the RL start, and of the SFT stage against the initial model;
    /// writes subnetwork.parquet and the masks.
    Subnetwork {
        run: PathBuf,
        #[arg(long, default_value_t = 1e-5)]
        tol: f64,
    },
    /// The rank-1 model of a checkpoint's RL update (W_0 + λ‖ΔW‖_F u1 v1ᵀ per attention and
    /// MLP matrix) evaluated beside the full checkpoint: AlphaRL's recovery ratio.
    Alpharl {
        run: PathBuf,
        /// The checkpoint (default: the newest).
        #[arg(long)]
        step: Option<u64>,
        #[arg(long, default_value_t = 1.0)]
        lambda: f64,
        /// Samples per prompt for pass@1 (0: greedy accuracy only).
        #[arg(long, default_value_t = 0)]
        samples: usize,
    },
    /// Overlap of two subnetworks (masks files, or runs: their newest checkpoint's masks) as
    /// o1, o2 and Jaccard beside the random baselines, overall and per matrix type.
    Overlap {
        a: PathBuf,
        b: PathBuf,
        /// tol (|Δ| > tol) or bf16 (bitwise).
        #[arg(long, default_value = "tol")]
        kind: String,
    },
}

#[derive(Subcommand)]
enum AlphaRl {
    /// Fit the rank-1 trajectories of the checkpoints of steps 1..=K against their held-out
    /// accuracy (one-component PLS + OLS) and write the model predicted for a target accuracy.
    Extrapolate {
        run: PathBuf,
        /// The window's last step: a step count, or a percentage of the run's steps (`20%`).
        #[arg(long)]
        window: String,
        /// The held-out accuracy to extrapolate to (the paper: the full run's).
        #[arg(long)]
        target: f64,
        /// code (W_K + a v1ᵀ, the authors' script) or paper (W_0 + a v1ᵀ).
        #[arg(long, default_value = "code")]
        placement: String,
        /// Samples per prompt for pass@1 as the fitted accuracy (0: greedy accuracy).
        #[arg(long, default_value_t = 0)]
        samples: usize,
        /// Where the checkpoint goes (default: RUN/alpharl/extrapolate-step-K-PLACEMENT).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Evaluate the extrapolated model on the held-out split.
        #[arg(long)]
        eval: bool,
    },
    /// Run the experiment with checkpoints every few steps, then report the update sparsity of
    /// RL against SFT, the rank-1 recovery ratio and AlphaRL from 10/20/40 % windows against
    /// the full run, with the wall time saved (rerun to continue).
    Report {
        #[command(flatten)]
        config: ConfigArgs,
        #[arg(long, default_value = "runs/alpharl")]
        out: PathBuf,
        /// Window sizes in percent of the RL steps.
        #[arg(long, value_delimiter = ',', default_value = "10,20,40")]
        windows: Vec<f64>,
        /// Samples per prompt for pass@1 as the fitted accuracy (0: greedy accuracy).
        #[arg(long, default_value_t = 4)]
        samples: usize,
    },
}

/// A config path, a preset name, or the built-in default; then the overrides.
fn load_config(args: &ConfigArgs) -> anyhow::Result<Config> {
    let base = match &args.config {
        None => Config::default(),
        Some(name) => {
            let path = [
                PathBuf::from(name),
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("configs")
                    .join(format!("{name}.toml")),
            ]
            .into_iter()
            .find(|p| p.is_file())
            .with_context(|| {
                format!("no config file {name} (nor a preset of that name in experiments/configs)")
            })?;
            let text = std::fs::read_to_string(&path)?;
            Config::from_toml(&text, &path.display().to_string())?
        }
    };
    base.with_overrides(&args.sets)
}

/// Resolves when the process is asked to stop: Ctrl-C (SIGINT), or on Unix SIGTERM (what `kill`
/// and a cluster scheduler's preemption send); says which.
async fn stop_requested() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            return tokio::select! {
                _ = tokio::signal::ctrl_c() => "Ctrl-C",
                _ = term.recv() => "SIGTERM",
            };
        }
    }
    let _ = tokio::signal::ctrl_c().await;
    "Ctrl-C"
}

/// Runs `f` on a blocking thread under tokio; Ctrl-C or SIGTERM asks it to stop with a
/// checkpoint, and a second one aborts.
fn orchestrate<T: Send + 'static>(
    f: impl FnOnce(Arc<AtomicBool>) -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let stop = Arc::new(AtomicBool::new(false));
        let mut job = tokio::task::spawn_blocking({
            let stop = stop.clone();
            move || f(stop)
        });
        tokio::select! {
            done = &mut job => done?,
            signal = stop_requested() => {
                tracing::warn!("{signal}: stopping after this step with a checkpoint (again to abort)");
                stop.store(true, Ordering::SeqCst);
                tokio::select! {
                    done = &mut job => done?,
                    signal = stop_requested() => bail!("aborted by {signal}"),
                }
            }
        }
    })
}

fn print_summary(dir: &Path, s: &run::Summary) {
    if s.interrupted {
        println!(
            "stopped before the end; continue with: ferrite run --resume {}",
            dir.display()
        );
        if s.steps == 0 {
            // stopped in the warm start or before the first RL step: nothing measured yet
            println!("run directory: {}", dir.display());
            return;
        }
    }
    let initial = s
        .accuracy_initial
        .map(|a| format!("{a:.3} before the warm start, "))
        .unwrap_or_default();
    let pass_k = if s.pass_at_k_start.is_finite() {
        format!(
            "; sampled at the rollout temperature, pass@1 {:.3} -> {:.3}, pass@k {:.3} -> {:.3}",
            s.pass_at_1_start, s.pass_at_1_final, s.pass_at_k_start, s.pass_at_k_final
        )
    } else {
        String::new()
    };
    println!(
        "held-out greedy accuracy: {initial}{:.3} before RL, {:.3} after {} RL steps{pass_k}; warm start {:.0} s, RL {:.0} s",
        s.accuracy_start, s.accuracy_final, s.steps, s.seconds_sft, s.seconds_rl
    );
    println!("run directory: {}", dir.display());
}

fn main() -> anyhow::Result<()> {
    model::tune_process();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_max_level(cli.log_level)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
    let progress = !cli.no_progress;
    let command = cli.command.unwrap_or(Command::Run {
        config: ConfigArgs::default(),
        out: None,
        resume: None,
        subnetwork_mask: None,
        dry_run: false,
    });
    match command {
        Command::Run {
            mut config,
            out,
            resume,
            subnetwork_mask,
            dry_run,
        } => {
            if let Some(mask) = subnetwork_mask {
                config.sets.push(format!(
                    "optimizer.subnetwork_mask={:?}",
                    mask.display().to_string()
                ));
            }
            let (c, dir, resume) = match resume {
                Some(dir) => {
                    let text = std::fs::read_to_string(dir.join(run::CONFIG_FILE))
                        .with_context(|| format!("{} is not a run directory", dir.display()))?;
                    let c = Config::from_toml(&text, "the run's config.toml")?
                        .with_overrides(&config.sets)?;
                    (c, dir, true)
                }
                None => {
                    let c = load_config(&config)?;
                    let dir = out.unwrap_or_else(|| {
                        let t = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map_or(0, |d| d.as_secs());
                        Path::new(&c.run.output_dir).join(format!("{}-{t}", c.run.name))
                    });
                    (c, dir, false)
                }
            };
            if dry_run {
                let problems = dryrun::dry_run(&c)?;
                if !problems.is_empty() {
                    bail!(
                        "the dry run found {} problem(s):\n  - {}",
                        problems.len(),
                        problems.join("\n  - ")
                    );
                }
                println!("dry run: no problems found");
                return Ok(());
            }
            let opts = run::RunOptions {
                dir: dir.clone(),
                resume,
                progress,
                stop: Arc::new(AtomicBool::new(false)),
            };
            let summary = orchestrate(move |stop| run::run(&c, &run::RunOptions { stop, ..opts }))?;
            print_summary(&dir, &summary);
        }
        Command::Eval { checkpoint, config } => {
            let ckpt = setup::resolve_checkpoint(&checkpoint)?;
            let c = match config.config {
                Some(_) => load_config(&config)?,
                None => match std::fs::read_to_string(ckpt.join(run::CONFIG_FILE)) {
                    Ok(text) => Config::from_toml(&text, "the checkpoint's config.toml")?
                        .with_overrides(&config.sets)?,
                    Err(_) => load_config(&config)?,
                },
            };
            let r = eval::evaluate_checkpoint(&c, &ckpt)?;
            let sampled = if r.k > 0 {
                let maj = r
                    .maj_at_k
                    .map(|m| format!(", maj@{} {m:.3}", r.k))
                    .unwrap_or_default();
                format!(
                    ", pass@1 {:.3}, pass@{} {:.3}{maj}",
                    r.pass_at_1, r.k, r.pass_at_k
                )
            } else {
                String::new()
            };
            println!(
                "{}: greedy accuracy {:.3}{sampled} on {} held-out prompts (mean length {:.1})",
                ckpt.display(),
                r.greedy_accuracy,
                r.prompts,
                r.length_mean
            );
        }
        Command::Export {
            checkpoint,
            out,
            dtype,
        } => {
            let ckpt = setup::resolve_checkpoint(&checkpoint)?;
            let dtype = match dtype.as_str() {
                "float32" | "f32" => candle_core::DType::F32,
                "bfloat16" | "bf16" => candle_core::DType::BF16,
                "float16" | "f16" | "fp16" => candle_core::DType::F16,
                other => bail!("--dtype {other}: float32, bfloat16 or float16"),
            };
            let w = model::Weights::load_dir(
                &ckpt,
                candle_core::DType::F32,
                &candle_core::Device::Cpu,
            )?;
            w.save_dir(&out, dtype, 4 << 30)?;
            model::tokenizer::Tokenizer::from_dir(&ckpt)?.save_dir(&out)?;
            println!("exported {} to {}", ckpt.display(), out.display());
        }
        Command::Sweep { config, out } => {
            let c = load_config(&config)?;
            orchestrate(move |stop| sweep::sweep(&c, &out, progress, stop))?;
        }
        Command::Report { dir } => sweep::report(&dir)?,
        Command::Analyze(Analysis::Subnetwork { run, tol }) => analyze::subnetwork(&run, tol)?,
        Command::Analyze(Analysis::Overlap { a, b, kind }) => analyze::overlap_cli(&a, &b, &kind)?,
        Command::Analyze(Analysis::Alpharl {
            run,
            step,
            lambda,
            samples,
        }) => {
            let mut ev = alpharl::Evaluator::new(&run, samples)?;
            alpharl::analyze(&run, step, lambda, &mut ev)?;
        }
        Command::Alpharl(AlphaRl::Extrapolate {
            run,
            window,
            target,
            placement,
            samples,
            out,
            eval,
        }) => {
            let placement: alpharl::Placement = placement.parse()?;
            let mut ev = alpharl::Evaluator::new(&run, samples)?;
            let k = alpharl::window_steps(&window, ev.config.run.steps)?;
            let out = out.unwrap_or_else(|| {
                run.join("alpharl").join(format!(
                    "extrapolate-{}-{placement}",
                    learner::checkpoint::step_name(k)
                ))
            });
            alpharl::extrapolate_run(&run, k, target, &[(placement, out.clone())], &mut ev)?;
            if eval {
                let s = ev.score(&out.display().to_string(), &analyze::load(&out)?)?;
                println!(
                    "extrapolated model: greedy accuracy {:.3}{}",
                    s.greedy,
                    s.pass_at_1
                        .map(|p| format!(", pass@1 {p:.3}"))
                        .unwrap_or_default()
                );
            }
        }
        Command::Alpharl(AlphaRl::Report {
            config,
            out,
            windows,
            samples,
        }) => {
            let c = load_config(&config)?;
            orchestrate(move |stop| alpharl::report(&c, &out, &windows, samples, progress, stop))?;
        }
        Command::BenchStaleness { config, out } => {
            let c = load_config(&config)?;
            orchestrate(move |stop| bench::staleness(&c, &out, progress, stop))?;
        }
        #[cfg(feature = "cuda")]
        Command::GpuCheck { what } => gpu_check::main(&what)?,
    }
    Ok(())
}
