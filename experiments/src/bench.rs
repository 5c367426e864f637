//! `ferrite bench-staleness`: the same experiment synchronous (`max_staleness = 0`) and
//! one-step asynchronous (`= 1`), from one shared warm start; prints the RL throughput ratio,
//! the final accuracies side by side, and where the time goes in each.

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use crate::config::Config;
use crate::logs::read_step_table;
use crate::run::{self, RunOptions, Summary};
use crate::sweep::copy_dir;

/// Sums of the per-step time columns of a run's metrics.
fn time_split(dir: &Path) -> anyhow::Result<Vec<(String, f64)>> {
    let (cols, rows) = read_step_table(&dir.join("metrics.parquet"))?;
    Ok(cols
        .iter()
        .enumerate()
        .filter(|(_, c)| {
            c.starts_with("time/")
                && !["time/elapsed", crate::logs::WALL_TIME].contains(&c.as_str())
        })
        .map(|(i, c)| (c.clone(), rows.iter().map(|(_, r)| r[i]).sum()))
        .collect())
}

/// The most that asynchrony can speed up a run whose synchronous time split is `split`: every
/// second the learner spent waiting for rollouts hidden, and nothing else slowed down, so a step
/// takes `step - wait_rollout` instead of `step`. Rollout and learner sharing one device only
/// approach it while the device had idle time to give; `None` without both columns.
fn async_bound(split: &[(String, f64)]) -> Option<f64> {
    let get = |name: &str| split.iter().find(|(n, _)| n == name).map(|(_, v)| *v);
    let (step, wait) = (get("time/step")?, get("time/wait_rollout")?);
    (step > wait).then(|| step / (step - wait))
}

/// One arm of the comparison: its staleness, summary and time split.
type Arm = (u64, Summary, Vec<(String, f64)>);

pub fn staleness(
    c: &Config,
    out: &Path,
    progress: bool,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let mut results: Vec<Arm> = Vec::new();
    let first = out.join("staleness-0");
    for s in [0u64, 1] {
        let mut cfg = c.clone();
        cfg.rollout.max_staleness = s;
        cfg.run.name = format!("staleness-{s}");
        let dir = out.join(&cfg.run.name);
        let _ = std::fs::remove_dir_all(&dir);
        let shared_sft = s > 0 && first.join("checkpoints/sft").is_dir();
        if shared_sft {
            copy_dir(&first.join("checkpoints/sft"), &dir.join("checkpoints/sft"))?;
        }
        let opts = RunOptions {
            dir: dir.clone(),
            resume: shared_sft,
            progress,
            stop: stop.clone(),
        };
        let summary = run::run(&cfg, &opts)?;
        let split = time_split(&dir)?;
        results.push((s, summary, split));
    }
    println!(
        "\nmax_staleness | RL seconds | samples/s | accuracy before RL -> after | dropped rows"
    );
    for (s, r, _) in &results {
        println!(
            "{s:>13} | {:>10.1} | {:>9.2} | {:.3} -> {:.3} | {}",
            r.seconds_rl,
            r.samples as f64 / r.seconds_rl,
            r.accuracy_start,
            r.accuracy_final,
            r.dropped_rows
        );
    }
    let rate = |r: &Summary| r.samples as f64 / r.seconds_rl;
    println!(
        "throughput ratio (staleness 1 / staleness 0): {:.2}x",
        rate(&results[1].1) / rate(&results[0].1)
    );
    if let Some(b) = async_bound(&results[0].2) {
        println!("bound (synchronous step time / the same without waiting for rollouts): {b:.2}x");
    }
    println!("\nwhere the learner's time goes (seconds summed over steps):");
    for (s, _, split) in &results {
        let line: Vec<String> = split
            .iter()
            .map(|(n, v)| format!("{} {v:.1}", n.trim_start_matches("time/")))
            .collect();
        println!("  staleness {s}: {}", line.join(", "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::async_bound;

    #[test]
    fn the_bound_hides_only_the_wait() {
        let split = |pairs: &[(&str, f64)]| -> Vec<(String, f64)> {
            pairs.iter().map(|(n, v)| (n.to_string(), *v)).collect()
        };
        // the synchronous run of 2026-12-01 22:21: 22.7 s of steps, 5.4 of them waiting for
        // rollouts and 16.7 training (the rest publishing weights and scoring): the bound keeps
        // everything but the wait, so it is not step / train
        let sync = split(&[
            ("time/wait_rollout", 5.4),
            ("time/train", 16.7),
            ("time/step", 22.7),
        ]);
        assert!((async_bound(&sync).unwrap() - 22.7 / 17.3).abs() < 1e-12);
        assert_eq!(async_bound(&split(&[("time/train", 20.0)])), None);
        assert_eq!(
            async_bound(&split(&[("time/wait_rollout", 3.0), ("time/step", 3.0)])),
            None
        );
    }
}
