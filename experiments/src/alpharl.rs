//! AlphaRL (spec §2) on a run's checkpoints: the rank-1 reconstruction of an RL update and its
//! held-out accuracy relative to the full checkpoint (`ferrite analyze alpharl`), and the
//! extrapolation of the early window's rank-1 trajectories to a target accuracy
//! (`ferrite alpharl extrapolate`). Both write ordinary checkpoints that `ferrite eval`,
//! `ferrite export` and transformers load.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{Device, Tensor};
use learner::alpharl::{align_signs, rank1_update, top_triplet, Pls1};
use learner::checkpoint::{self, TrainerState};
use model::tokenizer::Tokenizer;
use model::Weights;
use serde::{Deserialize, Serialize};

use crate::analyze::{is_layer_matrix, load};
use crate::config::Config;
use crate::eval::evaluate;
use crate::setup;

type Named = BTreeMap<String, Tensor>;

/// `ΔW = after − before` of one matrix, row-major, with its shape.
fn delta(before: &Named, after: &Named, name: &str) -> anyhow::Result<(Vec<f32>, usize, usize)> {
    let (b, a) = (&before[name], &after[name]);
    let (m, n) = b.dims2()?;
    let d = (a - b)?.flatten_all()?.to_vec1::<f32>()?;
    Ok((d, m, n))
}

fn matrices(named: &Named) -> Vec<String> {
    named
        .iter()
        .filter(|(n, t)| is_layer_matrix(n) && t.rank() == 2)
        .map(|(n, _)| n.clone())
        .collect()
}

/// `target[name] = start[name] + update` (row-major `[m, n]`) for each listed matrix.
fn add_updates(start: &Named, updates: &BTreeMap<String, Vec<f32>>) -> anyhow::Result<Named> {
    let mut out = start.clone();
    for (name, u) in updates {
        let t = &start[name];
        let add = Tensor::from_slice(u, t.dims(), &Device::Cpu)?;
        out.insert(name.clone(), (t + add)?);
    }
    Ok(out)
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Rank1Stats {
    pub matrices: usize,
    /// Mean `σ₁ / ‖ΔW‖_F`: the share of the update's norm in its unscaled rank-1 part.
    pub sigma1_share: f64,
    /// Mean `σ₁² / ‖ΔW‖_F²`: the share of its energy.
    pub sigma1_energy: f64,
}

/// The rank-1 model of an update: `W_0 + λ · ‖ΔW‖_F · u₁ v₁ᵀ` on every 2-D attention and MLP
/// matrix; every other tensor (embeddings, norms, biases, lm_head) stays at the base's value.
pub fn rank1_model(base: &Named, full: &Named, lambda: f64) -> anyhow::Result<(Named, Rank1Stats)> {
    let mut updates = BTreeMap::new();
    let mut stats = Rank1Stats::default();
    for name in matrices(base) {
        let (d, m, n) = delta(base, full, &name)?;
        let t = top_triplet(&d, m, n)?;
        if t.frobenius > 0.0 {
            stats.sigma1_share += t.sigma / t.frobenius;
            stats.sigma1_energy += (t.sigma / t.frobenius).powi(2);
        }
        stats.matrices += 1;
        updates.insert(name, rank1_update(&t, lambda));
    }
    let k = stats.matrices.max(1) as f64;
    stats.sigma1_share /= k;
    stats.sigma1_energy /= k;
    Ok((add_updates(base, &updates)?, stats))
}

/// Where the extrapolated rank-1 update goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Placement {
    /// `W_K + a* v₁ᵀ` (the authors' `AlphaRLBuildPerdictModel.py`).
    Code,
    /// `W_0 + a* v₁ᵀ` (the paper's §2 reading: rank-1 updates of the base).
    Paper,
}

impl std::str::FromStr for Placement {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s {
            "code" => Ok(Placement::Code),
            "paper" => Ok(Placement::Paper),
            _ => bail!("placement {s:?}: code (W_K + a v^T) or paper (W_0 + a v^T)"),
        }
    }
}

impl std::fmt::Display for Placement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Placement::Code => "code",
            Placement::Paper => "paper",
        })
    }
}

/// The fit of one matrix's trajectory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModuleFit {
    pub name: String,
    pub r2: f64,
    /// `τ*` relative to the window's scores: 0 at the first checkpoint's score, 1 at the last's.
    pub tau_position: f64,
    /// Sign flips made by the alignment.
    pub flips: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Extrapolation {
    pub window_steps: Vec<u64>,
    pub accuracies: Vec<f64>,
    pub target: f64,
    pub modules: Vec<ModuleFit>,
    /// Modules whose trajectory does not correlate with accuracy (left at the placement's start).
    pub skipped: Vec<String>,
    pub seconds: f64,
}

impl Extrapolation {
    pub fn mean_r2(&self) -> f64 {
        self.modules.iter().map(|m| m.r2).sum::<f64>() / self.modules.len().max(1) as f64
    }
}

/// AlphaRL's rule (spec §2.4) over checkpoints `window` (weights after steps `1..K`, with their
/// accuracies `y`) of an RL stage that started from `base`: per matrix, the sign-aligned
/// trajectory `a_t = σ₁(t) u₁(t)` of `ΔW_t = W_t − W_0`, a one-component PLS + OLS against `y`,
/// inverted at `target`; the update `a* v₁(K)ᵀ` is added to `W_K` or `W_0`, one model per
/// placement asked for (the fit is shared).
pub fn extrapolate(
    base: &Named,
    window: &[Named],
    y: &[f64],
    target: f64,
    placements: &[Placement],
) -> anyhow::Result<(Vec<Named>, Extrapolation)> {
    let t0 = Instant::now();
    anyhow::ensure!(
        window.len() >= 2 && window.len() == y.len(),
        "AlphaRL needs at least two checkpoints with an accuracy each (found {} and {})",
        window.len(),
        y.len()
    );
    let last = window.last().expect("non-empty");
    let mut updates = BTreeMap::new();
    let (mut modules, mut skipped) = (Vec::new(), Vec::new());
    for name in matrices(base) {
        let mut a = Vec::with_capacity(window.len());
        let mut v_last = Vec::new();
        let mut shape = (0, 0);
        for w in window {
            let (d, m, n) = delta(base, w, &name)?;
            let t = top_triplet(&d, m, n)?;
            a.push(t.u.iter().map(|u| u * t.sigma).collect::<Vec<f64>>());
            v_last = t.v;
            shape = (m, n);
        }
        // the last vector is the reference of the alignment and is never flipped
        let flips = align_signs(&mut a).iter().filter(|f| **f).count();
        let pls = match Pls1::fit(&a, y) {
            Ok(p) => p,
            Err(_) => {
                skipped.push(name);
                continue;
            }
        };
        let a_star = pls.inverse(target);
        let tau_star = (target - pls.intercept) / pls.slope;
        let (lo, hi) = (pls.scores[0], *pls.scores.last().expect("non-empty"));
        modules.push(ModuleFit {
            name: name.clone(),
            r2: pls.r2,
            tau_position: if hi != lo {
                (tau_star - lo) / (hi - lo)
            } else {
                f64::NAN
            },
            flips,
        });
        let (m, n) = shape;
        let mut u = Vec::with_capacity(m * n);
        for ai in &a_star {
            u.extend(v_last.iter().map(|vj| (ai * vj) as f32));
        }
        updates.insert(name, u);
    }
    let models = placements
        .iter()
        .map(|p| match p {
            Placement::Code => add_updates(last, &updates),
            Placement::Paper => add_updates(base, &updates),
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok((
        models,
        Extrapolation {
            window_steps: Vec::new(),
            accuracies: y.to_vec(),
            target,
            modules,
            skipped,
            seconds: t0.elapsed().as_secs_f64(),
        },
    ))
}

/// What a held-out evaluation gives AlphaRL: greedy accuracy and, with samples, pass@1.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Score {
    pub greedy: f64,
    pub pass_at_1: Option<f64>,
    pub seconds: f64,
}

impl Score {
    /// The metric AlphaRL fits: pass@1 when sampled, else greedy accuracy.
    pub fn metric(&self) -> f64 {
        self.pass_at_1.unwrap_or(self.greedy)
    }
}

/// Held-out evaluation of a run's weights, cached in `alpharl/scores.json` by label and weights
/// checksum.
pub struct Evaluator {
    pub config: Config,
    pub run: PathBuf,
    samples: usize,
    tokenizer: Tokenizer,
    task: rollout::task::Task,
    records: Vec<datasets::Record>,
    generation: model::generate::GenerationConfig,
    model: model::ModelConfig,
    /// The RL stage's start: `checkpoints/sft`, or the initial model when the run had no SFT.
    pub start: Named,
    cache: BTreeMap<String, Score>,
}

impl Evaluator {
    /// `samples` completions per prompt at the rollout temperature give pass@1 (0: greedy only).
    pub fn new(run: &Path, samples: usize) -> anyhow::Result<Evaluator> {
        let path = run.join(crate::run::CONFIG_FILE);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("{} is not a run directory", run.display()))?;
        let config = Config::from_toml(&text, &path.display().to_string())?.on_host();
        let sft = run.join("checkpoints/sft");
        let (start, tokenizer) = if sft.is_dir() {
            (
                Weights::load_dir(&sft, candle_core::DType::F32, &Device::Cpu)
                    .with_context(|| sft.display().to_string())?,
                Tokenizer::from_dir(&sft)?,
            )
        } else {
            setup::load_model(&config)?
        };
        let cache = std::fs::read_to_string(run.join("alpharl/scores.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        let task = setup::task(&config, tokenizer.clone())?;
        let records = setup::eval_records(&config)?;
        let generation = setup::generation(&config, &task.tokenizer);
        Ok(Evaluator {
            config,
            run: run.to_path_buf(),
            samples,
            tokenizer,
            task,
            records,
            generation,
            model: start.config.clone(),
            start: start.named(),
            cache,
        })
    }

    pub fn score(&mut self, label: &str, named: &Named) -> anyhow::Result<Score> {
        let w = Weights::from_named(&self.model, named)?;
        // keyed by the weights' checksum: a score never outlives the weights it measured
        let key = format!("{label} {:016x} k={}", w.checksum()?, self.samples);
        if let Some(s) = self.cache.get(&key) {
            return Ok(*s);
        }
        let t = Instant::now();
        let c = &self.config;
        let r = evaluate(
            &w,
            &self.task,
            &self.records,
            &self.generation,
            self.samples,
            datasets::rng::mix(c.run.seed, 0xE7A1, 0),
            c.data.eval_batch,
        )?;
        let s = Score {
            greedy: r.greedy_accuracy,
            pass_at_1: (self.samples > 0).then_some(r.pass_at_1),
            seconds: t.elapsed().as_secs_f64(),
        };
        self.cache.insert(key, s);
        let dir = self.run.join("alpharl");
        std::fs::create_dir_all(&dir)?;
        std::fs::write(
            dir.join("scores.json"),
            serde_json::to_string_pretty(&self.cache)?,
        )?;
        Ok(s)
    }

    /// Writes weights as a checkpoint (HF layout, the tokenizer and the run's config).
    pub fn save(&self, dir: &Path, named: &Named, state: &TrainerState) -> anyhow::Result<()> {
        let w = Weights::from_named(&self.model, named)?;
        let parent = dir.parent().context("output directory has no parent")?;
        let name = dir
            .file_name()
            .and_then(|n| n.to_str())
            .context("output directory name")?;
        checkpoint::save(
            parent,
            name,
            &w,
            &self.tokenizer,
            None,
            state,
            &[(crate::run::CONFIG_FILE, &self.config.to_toml())],
            None,
        )?;
        Ok(())
    }
}

fn fmt_score(s: &Score) -> String {
    match s.pass_at_1 {
        Some(p) => format!("greedy {:.3}, pass@1 {p:.3}", s.greedy),
        None => format!("greedy {:.3}", s.greedy),
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Rank1Result {
    pub step: u64,
    pub lambda: f64,
    pub start: Score,
    pub full: Score,
    pub rank1: Score,
    pub stats: Rank1Stats,
    pub checkpoint: PathBuf,
}

impl Rank1Result {
    /// acc(rank-1) / acc(full), the paper's relative accuracy.
    pub fn relative(&self) -> f64 {
        self.rank1.metric() / self.full.metric()
    }

    /// The share of the RL gain the rank-1 model keeps: `(rank-1 − start) / (full − start)`.
    pub fn gain_recovery(&self) -> f64 {
        (self.rank1.metric() - self.start.metric()) / (self.full.metric() - self.start.metric())
    }
}

/// `ferrite analyze alpharl RUN_DIR`: builds the rank-1 model of checkpoint `step` (default: the
/// newest) and evaluates it beside the full checkpoint and the RL start.
pub fn analyze(
    run: &Path,
    step: Option<u64>,
    lambda: f64,
    ev: &mut Evaluator,
) -> anyhow::Result<Rank1Result> {
    let ckpts = checkpoint::list(&run.join("checkpoints"))?;
    let (step, dir) = match step {
        Some(s) => ckpts
            .into_iter()
            .find(|(k, _)| *k == s)
            .with_context(|| format!("{}: no checkpoint of step {s}", run.display()))?,
        None => ckpts
            .into_iter()
            .next_back()
            .with_context(|| format!("{}: no RL checkpoint", run.display()))?,
    };
    let base = ev.start.clone();
    let full = load(&dir)?;
    let (rank1, stats) = rank1_model(&base, &full, lambda)?;
    let out = run
        .join("alpharl")
        .join(format!("rank1-{}", checkpoint::step_name(step)));
    ev.save(&out, &rank1, &checkpoint::load_state(&dir)?)?;
    let result = Rank1Result {
        step,
        lambda,
        start: ev.score("start", &base)?,
        full: ev.score(&checkpoint::step_name(step), &full)?,
        rank1: ev.score(
            &format!("rank1-{} λ={lambda}", checkpoint::step_name(step)),
            &rank1,
        )?,
        stats,
        checkpoint: out.clone(),
    };
    println!("RL start:      {}", fmt_score(&result.start));
    println!("step {step:<8} {}", fmt_score(&result.full));
    println!(
        "rank-1 (λ {lambda}): {}  → relative accuracy {:.3}, gain recovered {:.3}",
        fmt_score(&result.rank1),
        result.relative(),
        result.gain_recovery()
    );
    println!(
        "{} matrices; unscaled rank-1 part holds {:.1} % of ‖ΔW‖_F ({:.1} % of its energy)",
        stats.matrices,
        100.0 * stats.sigma1_share,
        100.0 * stats.sigma1_energy
    );
    println!("rank-1 checkpoint: {}", out.display());
    std::fs::write(
        run.join("alpharl").join("rank1.json"),
        serde_json::to_string_pretty(&result)?,
    )?;
    Ok(result)
}

/// `ferrite alpharl extrapolate RUN_DIR --window K --target ACC`: fits the trajectories of the
/// checkpoints of steps `1..=K` and writes the extrapolated model of each placement to its
/// directory. Returns the fit and the held-out scores of the window's checkpoints.
pub fn extrapolate_run(
    run: &Path,
    window: u64,
    target: f64,
    outputs: &[(Placement, PathBuf)],
    ev: &mut Evaluator,
) -> anyhow::Result<(Extrapolation, Vec<Score>)> {
    let ckpts: Vec<(u64, PathBuf)> = checkpoint::list(&run.join("checkpoints"))?
        .into_iter()
        .filter(|(s, _)| (1..=window).contains(s))
        .collect();
    if ckpts.len() < 2 {
        bail!(
            "{}: {} checkpoint(s) in steps 1..={window}; AlphaRL needs at least two \
             (run with run.checkpoint_every small and run.keep_checkpoints = 0)",
            run.display(),
            ckpts.len()
        );
    }
    let base = ev.start.clone();
    let mut weights = Vec::new();
    let mut scores = Vec::new();
    for (step, dir) in &ckpts {
        let w = load(dir)?;
        scores.push(ev.score(&checkpoint::step_name(*step), &w)?);
        weights.push(w);
    }
    let y: Vec<f64> = scores.iter().map(Score::metric).collect();
    let placements: Vec<Placement> = outputs.iter().map(|(p, _)| *p).collect();
    let (models, mut x) = extrapolate(&base, &weights, &y, target, &placements)?;
    x.window_steps = ckpts.iter().map(|(s, _)| *s).collect();
    let (_, last_dir) = ckpts.last().expect("two or more");
    let state = checkpoint::load_state(last_dir)?;
    for ((placement, out), model) in outputs.iter().zip(&models) {
        ev.save(out, model, &state)?;
        std::fs::write(
            out.join("alpharl.json"),
            serde_json::to_string_pretty(&serde_json::json!({
                "placement": placement,
                "fit": &x,
            }))?,
        )?;
        println!(
            "extrapolated checkpoint ({placement} placement): {}",
            out.display()
        );
    }
    let mut r2: Vec<f64> = x.modules.iter().map(|m| m.r2).collect();
    r2.sort_by(f64::total_cmp);
    println!(
        "window: steps {:?}, accuracies {:?}",
        x.window_steps,
        y.iter()
            .map(|v| (v * 1000.0).round() / 1000.0)
            .collect::<Vec<_>>()
    );
    println!(
        "{} matrices fitted ({} skipped: no correlation); R² mean {:.3}, median {:.3}; target {target}; {:.1} s",
        x.modules.len(),
        x.skipped.len(),
        x.mean_r2(),
        r2.get(r2.len() / 2).copied().unwrap_or(f64::NAN),
        x.seconds
    );
    Ok((x, scores))
}

/// `10%` of `steps`, or a step count.
pub fn window_steps(spec: &str, steps: u64) -> anyhow::Result<u64> {
    let k = match spec.strip_suffix('%') {
        Some(p) => {
            let p: f64 = p
                .trim()
                .parse()
                .with_context(|| format!("window {spec:?}: a percentage such as 10%"))?;
            anyhow::ensure!(
                p > 0.0 && p <= 100.0,
                "window {spec}: between 0 % and 100 %"
            );
            (steps as f64 * p / 100.0).round() as u64
        }
        None => spec
            .parse()
            .with_context(|| format!("window {spec:?}: a step count or a percentage"))?,
    };
    anyhow::ensure!(k >= 1, "window {spec}: less than one step of {steps}");
    Ok(k)
}

fn sum_until(rows: &crate::logs::Rows, column: &str, step: u64) -> f64 {
    let Some(i) = rows.0.iter().position(|c| c == column) else {
        return f64::NAN;
    };
    rows.1
        .iter()
        .filter(|(s, _)| *s <= step)
        .map(|(_, r)| r[i])
        .filter(|v| v.is_finite())
        .sum()
}

/// One window's line of the report.
struct WindowResult {
    percent: f64,
    step: u64,
    early: Score,
    fit: Extrapolation,
    /// The code placement's score, then the paper placement's.
    scores: Vec<Score>,
    /// RL seconds (rollouts and training) to step K.
    rl_seconds: f64,
    /// The held-out evaluations of the window's checkpoints and the fit.
    overhead_seconds: f64,
}

/// `ferrite alpharl report`: runs the experiment with frequent checkpoints (or continues it in
/// `out/run`), then reports the update sparsity of RL against SFT, the rank-1 recovery ratio,
/// and AlphaRL's accuracy from early windows against the full run, with the wall time saved.
pub fn report(
    c: &Config,
    out: &Path,
    percents: &[f64],
    samples: usize,
    progress: bool,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> anyhow::Result<()> {
    let run_dir = out.join("run");
    let mut c = c.clone();
    c.run.checkpoint_every = (c.run.steps / 30).max(1);
    c.run.keep_checkpoints = 0;
    c.run.eval_every = 0;
    c.run.track_subnetwork = true;
    let done = checkpoint::list(&run_dir.join("checkpoints"))?
        .last()
        .is_some_and(|(s, _)| *s >= c.run.steps);
    if !done {
        let resume = run_dir.join(crate::run::CONFIG_FILE).is_file();
        let summary = crate::run::run(
            &c,
            &crate::run::RunOptions {
                dir: run_dir.clone(),
                resume,
                progress,
                stop,
            },
        )?;
        anyhow::ensure!(
            !summary.interrupted,
            "stopped; rerun the same command to continue"
        );
    }
    let mut ev = Evaluator::new(&run_dir, samples)?;
    let steps = ev.config.run.steps;
    // sparsity: the SFT row (step 0) and the last checkpoint's row of the live tracker
    let (cols, rows) = crate::logs::read_step_table(&run_dir.join(crate::analyze::TABLE))?;
    let get = |row: Option<&(u64, Vec<f64>)>, name: &str| {
        row.and_then(|(_, r)| cols.iter().position(|c| c == name).map(|i| r[i]))
            .unwrap_or(f64::NAN)
    };
    let sft_row = rows.iter().find(|(s, _)| *s == 0);
    let rl_row = rows.iter().rev().find(|(s, _)| *s > 0);
    let rank1 = analyze(&run_dir, None, 1.0, &mut ev)?;
    let full = rank1.full;
    let metrics = crate::logs::read_step_table(&run_dir.join("metrics.parquet"))?;
    let full_seconds = sum_until(&metrics, "time/step", steps);
    let ckpt_steps: Vec<u64> = checkpoint::list(&run_dir.join("checkpoints"))?
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    let mut windows = Vec::new();
    for &p in percents {
        let want = window_steps(&format!("{p}%"), steps)?;
        // the last checkpoint inside the window
        let Some(&k) = ckpt_steps.iter().rev().find(|&&s| s <= want) else {
            bail!("no checkpoint inside the {p} % window");
        };
        let outputs: Vec<(Placement, PathBuf)> = [Placement::Code, Placement::Paper]
            .into_iter()
            .map(|p| {
                let name = format!("extrapolate-{}-{p}", checkpoint::step_name(k));
                (p, run_dir.join("alpharl").join(name))
            })
            .collect();
        let (fit, window_scores) = extrapolate_run(&run_dir, k, full.metric(), &outputs, &mut ev)?;
        // the window ends at checkpoint K: its score is the early stop's
        let early = *window_scores
            .last()
            .expect("a fitted window has checkpoints");
        let evals: f64 = window_scores.iter().map(|s| s.seconds).sum();
        let mut scores = Vec::new();
        for (p, dir) in &outputs {
            scores.push(ev.score(&format!("extrapolate-{k}-{p}"), &load(dir)?)?);
        }
        windows.push(WindowResult {
            percent: p,
            step: k,
            early,
            rl_seconds: sum_until(&metrics, "time/step", k),
            overhead_seconds: evals + fit.seconds,
            fit,
            scores,
        });
    }
    let metric = if samples > 0 {
        format!("pass@1 ({samples} samples per prompt at the rollout temperature)")
    } else {
        "greedy accuracy".into()
    };
    let mut md = String::new();
    let pct = |v: f64| format!("{:.2} %", 100.0 * v);
    md.push_str(&format!(
        "# AlphaRL and update-sparsity report\n\nRun: `{}` ({} RL steps of {}, checkpoints every {} steps). Held-out metric: {metric} on {} problems.\n\n",
        run_dir.display(),
        steps,
        ev.config.algorithm.name,
        ev.config.run.checkpoint_every,
        ev.config.data.eval_size,
    ));
    md.push_str("## Update sparsity (parameters left unchanged)\n\n| update | bf16 bitwise | abs(Δ) ≤ tol | ‖Δ‖_F | numerical rank / full |\n|---|---|---|---|---|\n");
    for (label, row) in [
        ("SFT vs initial model", sft_row),
        ("RL (last step) vs SFT", rl_row),
    ] {
        md.push_str(&format!(
            "| {label} | {} | {} | {:.3} | {:.3} |\n",
            pct(get(row, "all/unchanged_bf16")),
            pct(get(row, "all/unchanged_tol")),
            get(row, "all/frobenius"),
            get(row, "rank_fraction"),
        ));
    }
    md.push_str(&format!(
        "\n## Rank-1 reconstruction of the final update (λ = 1)\n\n| model | greedy | pass@1 |\n|---|---|---|\n| RL start (SFT) | {:.3} | {} |\n| full RL, step {} | {:.3} | {} |\n| rank-1 | {:.3} | {} |\n\nRecovery ratio acc(rank-1)/acc(full) = **{:.3}**; share of the RL gain kept (rank-1 − start)/(full − start) = {:.3}. The unscaled rank-1 part holds {:.1} % of ‖ΔW‖_F on average over {} matrices.\n\n",
        rank1.start.greedy,
        opt(rank1.start.pass_at_1),
        rank1.step,
        rank1.full.greedy,
        opt(rank1.full.pass_at_1),
        rank1.rank1.greedy,
        opt(rank1.rank1.pass_at_1),
        rank1.relative(),
        rank1.gain_recovery(),
        100.0 * rank1.stats.sigma1_share,
        rank1.stats.matrices,
    ));
    md.push_str(&format!(
        "## AlphaRL extrapolation (target: the full run's {:.3})\n\n| window | stop at | early stop | AlphaRL W_K + a v1ᵀ (code) | AlphaRL W_0 + a v1ᵀ (paper) | mean R² | τ* | RL to K | evals + fit | saved, RL only | saved, with evals |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
        full.metric(),
    ));
    for w in &windows {
        let (code, paper) = (&w.scores[0], &w.scores[1]);
        let mut tau: Vec<f64> = w.fit.modules.iter().map(|m| m.tau_position).collect();
        tau.sort_by(f64::total_cmp);
        let saved = |cost: f64| {
            format!(
                "{:.0} s ({:.0} %)",
                full_seconds - cost,
                100.0 * (full_seconds - cost) / full_seconds
            )
        };
        md.push_str(&format!(
            "| {:.0} % | step {} | {:.3} | {:.3} ({:.1} % of full) | {:.3} ({:.1} % of full) | {:.3} | {:.1} | {:.0} s | {:.0} s | {} | {} |\n",
            w.percent,
            w.step,
            w.early.metric(),
            code.metric(),
            100.0 * code.metric() / full.metric(),
            paper.metric(),
            100.0 * paper.metric() / full.metric(),
            w.fit.mean_r2(),
            tau.get(tau.len() / 2).copied().unwrap_or(f64::NAN),
            w.rl_seconds,
            w.overhead_seconds,
            saved(w.rl_seconds),
            saved(w.rl_seconds + w.overhead_seconds),
        ));
    }
    md.push_str(&format!(
        "\nFull run: {} at step {steps}, {full_seconds:.0} s of RL (rollouts and training: `time/step` summed over metrics.parquet). τ*: the median over matrices of where the target's PLS score lies, with the window's first checkpoint at 0 and its last at 1 (above 1: extrapolation). AlphaRL also needs the held-out accuracy of every checkpoint in the window; \"with evals\" counts those evaluations and the fit.\n\nFigures: `{}`; per-window fits: `alpharl.json` in each extrapolated checkpoint.\n",
        fmt_score(&full),
        run_dir.join("subnetwork.png").display()
    ));
    let path = out.join("alpharl-report.md");
    std::fs::write(&path, &md)?;
    println!("{md}");
    println!("{}", path.display());
    Ok(())
}

fn opt(v: Option<f64>) -> String {
    v.map_or("–".into(), |v| format!("{v:.3}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const UP: &str = "model.layers.0.mlp.up_proj.weight";
    const Q: &str = "model.layers.1.self_attn.q_proj.weight";
    const NORM: &str = "model.layers.0.input_layernorm.weight";

    fn pseudo(n: usize, seed: u64) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let x = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15 ^ seed);
                ((x >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect()
    }

    fn t(v: Vec<f32>, dims: &[usize]) -> Tensor {
        Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
    }

    fn outer(u: &[f32], v: &[f32], scale: f32) -> Vec<f32> {
        u.iter()
            .flat_map(|a| v.iter().map(move |b| scale * a * b))
            .collect()
    }

    fn base() -> Named {
        BTreeMap::from([
            (UP.to_string(), t(pseudo(6 * 4, 1), &[6, 4])),
            (Q.to_string(), t(pseudo(5 * 5, 2), &[5, 5])),
            (NORM.to_string(), t(vec![1.0; 4], &[4])),
        ])
    }

    fn plus(named: &Named, name: &str, d: &[f32]) -> Named {
        let mut out = named.clone();
        let x = &named[name];
        out.insert(name.into(), (x + t(d.to_vec(), x.dims())).unwrap());
        out
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn a_rank_one_update_is_its_own_rank_one_model_and_other_tensors_stay_at_the_base() {
        let b = base();
        let (u1, v1) = (pseudo(6, 3), pseudo(4, 4));
        let (u2, v2) = (pseudo(5, 5), pseudo(5, 6));
        let mut full = plus(&b, UP, &outer(&u1, &v1, 0.3));
        full = plus(&full, Q, &outer(&u2, &v2, -0.2));
        full = plus(&full, NORM, &[0.1; 4]);
        let (r1, stats) = rank1_model(&b, &full, 1.0).unwrap();
        assert!(max_diff(&r1[UP], &full[UP]) < 1e-6);
        assert!(max_diff(&r1[Q], &full[Q]) < 1e-6);
        assert_eq!(
            max_diff(&r1[NORM], &b[NORM]),
            0.0,
            "1-D tensors stay at W_0"
        );
        assert_eq!(stats.matrices, 2);
        assert!((stats.sigma1_share - 1.0).abs() < 1e-6);
        // λ scales the update; a rank-2 update keeps its norm but not its second direction
        let (half, _) = rank1_model(&b, &full, 0.5).unwrap();
        let mid = ((&b[UP] + &full[UP]).unwrap() * 0.5).unwrap();
        assert!(max_diff(&half[UP], &mid) < 1e-6);
        let two = plus(
            &plus(&b, UP, &outer(&u1, &v1, 0.3)),
            UP,
            &outer(
                &[1.0, -1.0, 1.0, -1.0, 1.0, -1.0],
                &[1.0, 1.0, -1.0, -1.0],
                0.05,
            ),
        );
        let (r, stats) = rank1_model(&b, &two, 1.0).unwrap();
        let norm = |x: &Tensor| {
            x.sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                .sqrt()
        };
        let (d_full, d_r) = ((&two[UP] - &b[UP]).unwrap(), (&r[UP] - &b[UP]).unwrap());
        assert!((norm(&d_full) - norm(&d_r)).abs() < 1e-5, "norm-matched");
        assert!(max_diff(&d_full, &d_r) > 1e-3);
        assert!(stats.sigma1_share < 1.0);
    }

    /// A trajectory that moves along a fixed rank-1 direction while the accuracy rises linearly
    /// with the step: AlphaRL's inversion must land exactly on the step of the target accuracy.
    #[test]
    fn a_linear_rank_one_trajectory_extrapolates_to_the_target_step() {
        let b = base();
        let (u, v) = (pseudo(6, 11), pseudo(4, 12));
        let (uq, vq) = (pseudo(5, 13), pseudo(5, 14));
        let at = |s: f32| {
            // a little of a second direction keeps the SVD honest; its weight grows as s²
            let w = plus(&b, UP, &outer(&u, &v, 0.1 * s));
            plus(
                &plus(&w, Q, &outer(&uq, &vq, -0.05 * s)),
                NORM,
                &[0.01 * s; 4],
            )
        };
        let window: Vec<Named> = (1..=4).map(|s| at(s as f32)).collect();
        let y: Vec<f64> = (1..=4).map(|s| 0.2 + 0.05 * s as f64).collect();
        // target: the accuracy of step 10
        let (models, x) =
            extrapolate(&b, &window, &y, 0.7, &[Placement::Paper, Placement::Code]).unwrap();
        let (paper, code) = (&models[0], &models[1]);
        assert!(x.skipped.is_empty());
        assert!(x.modules.iter().all(|m| (m.r2 - 1.0).abs() < 1e-9));
        for m in &x.modules {
            // scores of steps 1 and 4 span [0, 1]; step 10 sits at (10 − 1) / 3 = 3
            assert!((m.tau_position - 3.0).abs() < 1e-6, "{m:?}");
        }
        let want = at(10.0);
        assert!(max_diff(&paper[UP], &want[UP]) < 1e-5);
        assert!(max_diff(&paper[Q], &want[Q]) < 1e-5);
        assert_eq!(max_diff(&paper[NORM], &b[NORM]), 0.0);
        // the code placement adds the same update to W_K, and keeps W_K's other tensors
        let delta = |m: &Named| (&m[UP] - &b[UP]).unwrap();
        let expected = (delta(&want) + delta(&window[3])).unwrap();
        assert!(max_diff(&delta(code), &expected) < 1e-5);
        assert_eq!(max_diff(&code[NORM], &window[3][NORM]), 0.0);
        // a target inside the window interpolates: step 2's accuracy gives step 2's weights
        let (two, _) = extrapolate(&b, &window, &y, 0.3, &[Placement::Paper]).unwrap();
        assert!(max_diff(&two[0][UP], &window[1][UP]) < 1e-5);
    }

    #[test]
    fn too_short_a_window_or_flat_accuracies_are_errors_or_skips() {
        let b = base();
        let w = plus(&b, UP, &outer(&pseudo(6, 1), &pseudo(4, 2), 0.1));
        assert!(extrapolate(
            &b,
            std::slice::from_ref(&w),
            &[0.5],
            0.6,
            &[Placement::Code]
        )
        .is_err());
        let w2 = plus(&b, UP, &outer(&pseudo(6, 1), &pseudo(4, 2), 0.2));
        let (_, x) = extrapolate(&b, &[w, w2], &[0.5, 0.5], 0.6, &[Placement::Code]).unwrap();
        assert_eq!(x.modules.len(), 0);
        assert_eq!(x.skipped.len(), 2);
    }

    #[test]
    fn windows_are_steps_or_percentages() {
        assert_eq!(window_steps("10%", 60).unwrap(), 6);
        assert_eq!(window_steps("40%", 60).unwrap(), 24);
        assert_eq!(window_steps("7", 60).unwrap(), 7);
        assert!(window_steps("0%", 60).is_err());
        assert!(window_steps("1%", 10).is_err());
        assert!(window_steps("ten", 60).is_err());
        assert!("diagonal".parse::<Placement>().is_err());
    }
}
