//! `ferrite sweep`: the variants of a config's `[sweep]` section over its seeds, each variant of
//! a seed starting from the same warm start (one SFT per seed) and data order; a finished run is
//! kept and an unfinished one resumed, so a sweep continues where it stopped.
//! `ferrite report`: the table of held-out accuracies of a directory of runs.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::Context;

use crate::config::Config;
use crate::logs::read_step_table;
use crate::run::{self, RunOptions, Summary, SUMMARY_FILE};

/// Copies a directory tree.
pub fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let p = e?.path();
        let dest = to.join(p.file_name().expect("a file name"));
        if p.is_dir() {
            copy_dir(&p, &dest)?;
        } else {
            std::fs::copy(&p, dest)?;
        }
    }
    Ok(())
}

/// The run name of a variant at a seed.
pub fn run_name(variant: &str, seed: u64) -> String {
    format!("{variant}-seed{seed}")
}

pub fn sweep(c: &Config, out: &Path, progress: bool, stop: Arc<AtomicBool>) -> anyhow::Result<()> {
    anyhow::ensure!(
        !c.sweep.variants.is_empty(),
        "the config has no [sweep] variants"
    );
    let seeds = if c.sweep.seeds.is_empty() {
        vec![c.run.seed]
    } else {
        c.sweep.seeds.clone()
    };
    // every variant's config is checked before anything runs
    let mut configs = Vec::new();
    for v in &c.sweep.variants {
        let vc = c
            .with_overrides(&v.set)
            .with_context(|| format!("sweep variant {}", v.name))?;
        configs.push((v.name.clone(), vc));
    }
    for &seed in &seeds {
        let mut warm_start: Option<std::path::PathBuf> = None;
        for (name, vc) in &configs {
            if stop.load(std::sync::atomic::Ordering::SeqCst) {
                return Ok(());
            }
            let mut cfg = vc.clone();
            cfg.run.seed = seed;
            cfg.run.name = run_name(name, seed);
            cfg.sweep = Default::default();
            let dir = out.join(&cfg.run.name);
            let sft = dir.join("checkpoints/sft");
            if dir.join(SUMMARY_FILE).is_file() {
                tracing::info!(run = %cfg.run.name, "finished earlier; kept");
                warm_start.get_or_insert(sft);
                continue;
            }
            let mut resume = dir.join("checkpoints").is_dir();
            if !resume {
                if let Some(shared) = warm_start.as_ref().filter(|p| p.is_dir()) {
                    copy_dir(shared, &sft)?;
                    resume = true;
                }
            }
            tracing::info!(run = %cfg.run.name, resume, "sweep run");
            let opts = RunOptions {
                dir: dir.clone(),
                resume,
                progress,
                stop: stop.clone(),
            };
            let s = run::run(&cfg, &opts)?;
            if s.interrupted {
                return Ok(());
            }
            warm_start.get_or_insert(sft);
        }
    }
    report(out)
}

/// One finished run of a report.
struct Row {
    seed: u64,
    summary: Summary,
    /// Mean greedy accuracy over the last three evaluations (the paper's protocol).
    last3: f64,
}

fn load_row(dir: &Path) -> anyhow::Result<(String, Row)> {
    // NaN figures (pass@k without samples) are written as null
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join(SUMMARY_FILE))?)?;
    let number = |k: &str| json[k].as_f64().unwrap_or(f64::NAN);
    let summary = Summary {
        accuracy_start: number("accuracy_start"),
        accuracy_final: number("accuracy_final"),
        seconds_rl: number("seconds_rl"),
        ..Summary::default()
    };
    let config = Config::from_toml(
        &std::fs::read_to_string(dir.join(run::CONFIG_FILE))?,
        &dir.display().to_string(),
    )?;
    let (cols, rows) = read_step_table(&dir.join("eval.parquet"))?;
    let at = cols
        .iter()
        .position(|c| c == "greedy_accuracy")
        .context("eval.parquet without greedy_accuracy")?;
    let tail: Vec<f64> = rows.iter().rev().take(3).map(|(_, r)| r[at]).collect();
    let last3 = tail.iter().sum::<f64>() / tail.len().max(1) as f64;
    let seed = config.run.seed;
    let suffix = format!("-seed{seed}");
    let variant = config
        .run
        .name
        .strip_suffix(&suffix)
        .unwrap_or(&config.run.name)
        .to_string();
    Ok((
        variant,
        Row {
            seed,
            summary,
            last3,
        },
    ))
}

fn mean_std(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = if xs.len() > 1 {
        xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var.sqrt())
}

/// Prints, per variant (runs grouped by name without their `-seedN`), the held-out greedy
/// accuracy before and after RL over seeds, the mean of the last three evaluations, and the RL
/// wall time.
/// A single run's directory instead redraws its `report.png`.
pub fn report(dir: &Path) -> anyhow::Result<()> {
    if dir.join("metrics.parquet").is_file() {
        crate::report::plot(dir)?;
        println!("{}", dir.join("report.png").display());
        return Ok(());
    }
    let mut groups: BTreeMap<String, Vec<Row>> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| dir.display().to_string())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join(SUMMARY_FILE).is_file())
        .collect();
    // in the order the runs started (a sweep starts its variants in config order)
    let started = |p: &std::path::PathBuf| {
        std::fs::metadata(p.join(run::CONFIG_FILE))
            .and_then(|m| m.modified())
            .ok()
    };
    entries.sort_by_key(|p| (started(p), p.clone()));
    for p in entries {
        match load_row(&p) {
            Ok((variant, row)) => {
                if !order.contains(&variant) {
                    order.push(variant.clone());
                }
                groups.entry(variant).or_default().push(row);
            }
            Err(e) => tracing::warn!("{}: {e:#}", p.display()),
        }
    }
    anyhow::ensure!(!groups.is_empty(), "{}: no finished runs", dir.display());
    let base = order.first().cloned().unwrap_or_default();
    let base_mean = mean_std(
        &groups[&base]
            .iter()
            .map(|r| r.summary.accuracy_final)
            .collect::<Vec<_>>(),
    )
    .0;
    println!(
        "{:<22} {:>5} {:>9} {:>15} {:>15} {:>9} {:>6}  per seed (after RL)",
        "variant", "seeds", "before RL", "after RL", "last-3 evals", "vs first", "RL s"
    );
    for v in &order {
        let rows = &groups[v];
        let f = |g: &dyn Fn(&Row) -> f64| mean_std(&rows.iter().map(g).collect::<Vec<_>>());
        let (b, _) = f(&|r| r.summary.accuracy_start);
        let (a, sa) = f(&|r| r.summary.accuracy_final);
        let (l, sl) = f(&|r| r.last3);
        let (t, _) = f(&|r| r.summary.seconds_rl);
        let rel = if base_mean > 0.0 {
            format!("{:+.1}%", 100.0 * (a / base_mean - 1.0))
        } else {
            "-".into()
        };
        let per: Vec<String> = rows
            .iter()
            .map(|r| format!("{}:{:.3}", r.seed, r.summary.accuracy_final))
            .collect();
        println!(
            "{v:<22} {:>5} {:>9.3} {:>7.3} ± {:.3} {:>7.3} ± {:.3} {rel:>9} {t:>6.0}  {}",
            rows.len(),
            b,
            a,
            sa,
            l,
            sl,
            per.join(" ")
        );
    }
    Ok(())
}
