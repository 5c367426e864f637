//! One experiment: an optional supervised warm start, then asynchronous GRPO with rollout
//! workers, Parquet logs, periodic evaluation and checkpoints; resumable from its directory.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use learner::checkpoint::{self, TrainerState};
use learner::collect::Collector;
use learner::optim::{AdamW, AdamWConfig};
use learner::sft::sft_step;
use model::Weights;
use rollout::policy::{Admission, PolicyStore};
use rollout::pool::{Feed, FeedState, Pool, PoolConfig};
use rollout::schema::Finish;
use rollout::task::Task;
use serde::{Deserialize, Serialize};

use crate::algo::{Algorithm, Critic};
use crate::config::Config;
use crate::eval::{evaluate, EvalResult};
use crate::logs::{RolloutLog, StepTable};
use crate::setup;
use crate::tensorboard::Board;

pub const CONFIG_FILE: &str = "config.toml";
pub const SUMMARY_FILE: &str = "summary.json";

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub dir: PathBuf,
    /// Continue the run in `dir` from its last complete checkpoint.
    pub resume: bool,
    pub progress: bool,
    /// Set (by Ctrl-C) to stop after the current step with a checkpoint.
    pub stop: Arc<AtomicBool>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct Summary {
    /// Greedy held-out accuracy of the initial model (when there is a warm start).
    pub accuracy_initial: Option<f64>,
    /// At the start of RL (after the warm start).
    pub accuracy_start: f64,
    pub accuracy_final: f64,
    pub pass_at_k_start: f64,
    pub pass_at_k_final: f64,
    /// Held-out pass@1: the share of correct samples at the rollout temperature.
    pub pass_at_1_start: f64,
    pub pass_at_1_final: f64,
    pub steps: u64,
    pub samples: u64,
    pub dropped_rows: u64,
    /// Groups with equal rewards dropped by `algorithm.filter_groups`.
    pub filtered_groups: u64,
    pub seconds_sft: f64,
    pub seconds_rl: f64,
    /// True when the run stopped early (Ctrl-C) with a checkpoint.
    pub interrupted: bool,
}

fn adamw(c: &Config) -> AdamWConfig {
    let o = &c.optimizer;
    AdamWConfig {
        beta1: o.beta1,
        beta2: o.beta2,
        eps: o.eps,
        weight_decay: o.weight_decay,
        max_grad_norm: (o.grad_clip > 0.0).then_some(o.grad_clip),
        initial_loss_scale: o.loss_scale,
        loss_scale_window: o.loss_scale_window,
    }
}

fn progress_bar(len: u64, prefix: &str, show: bool) -> ProgressBar {
    let bar = if show {
        ProgressBar::new(len)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{prefix:>5} [{bar:30}] {pos}/{len} {msg} (ETA {eta})")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(prefix.to_string());
    bar
}

/// The checkpoint of a warm start stopped part way (Ctrl-C, SIGTERM), which `--resume` continues.
const SFT_PARTIAL: &str = "sft-partial";

/// The supervised warm start, or its checkpoint when a resumed run has one. Returns the weights
/// after it and the data cursor where RL starts; None when a stop (Ctrl-C, SIGTERM) came during
/// it: then the steps done are in a checkpoint of their own (`sft-partial`: weights, optimizer,
/// data cursor), from which `--resume` continues to the warm start the whole stage would give.
fn sft_stage(
    c: &Config,
    dir: &Path,
    base: &Weights,
    task: &Task,
    opts: &RunOptions,
) -> anyhow::Result<Option<(Weights, FeedState, f64)>> {
    let root = dir.join("checkpoints");
    let ckpt = root.join("sft");
    if opts.resume && ckpt.join(checkpoint::STATE_FILE).is_file() {
        let w = setup::load_weights(c, &ckpt)?;
        return Ok(Some((w, checkpoint::load_state(&ckpt)?.feed, 0.0)));
    }
    if c.sft.steps == 0 {
        return Ok(Some((base.clone(), FeedState::default(), 0.0)));
    }
    let mut loader = setup::train_loader(c)?;
    let start = Instant::now();
    let partial = root.join(SFT_PARTIAL);
    let resumed = opts.resume && partial.join(checkpoint::STATE_FILE).is_file();
    let (first, from) = match resumed {
        true => {
            let state = checkpoint::load_state(&partial)?;
            loader.seek(state.feed.cursor);
            tracing::info!(step = state.step, "resuming the warm start");
            (state.step, setup::load_weights(c, &partial)?)
        }
        false => (0, base.clone()),
    };
    let (vars, w) = from.to_vars()?;
    let mut opt = AdamW::new(vars, adamw(c))?;
    if resumed {
        opt.load(&partial)?;
    }
    let eos = setup::stop_ids(&task.tokenizer);
    let table_path = dir.join("sft.parquet");
    let mut table = match resumed {
        true => StepTable::reopen(table_path, first)?,
        false => StepTable::new(table_path),
    };
    if c.run.tensorboard {
        let board = Board::rebuild(dir, &[("sft", table.named_rows())])?;
        table.mirror(&board, "sft");
    }
    let bar = progress_bar(c.sft.steps, "sft", opts.progress);
    bar.set_position(first);
    // the warm start's state after `step` steps, the data cursor where the next batch starts
    let state_at = |step: u64, cursor| TrainerState {
        step,
        policy_version: 0,
        feed: FeedState {
            cursor,
            next_group: 0,
        },
        seed: c.run.seed,
        samples_seen: 0,
        kl_coef: None,
        bco_reward_mean: None,
    };
    // the steps done so far in a checkpoint of their own, which `--resume` continues
    let save_partial = |state: &TrainerState, opt: &AdamW| -> anyhow::Result<String> {
        checkpoint::save(
            &root,
            SFT_PARTIAL,
            &opt.master_weights(&w.snapshot()?)?,
            &task.tokenizer,
            Some(opt),
            state,
            &[(CONFIG_FILE, &c.to_toml())],
            None,
        )?;
        Ok(SFT_PARTIAL.into())
    };
    for step in first..c.sft.steps {
        if opts.stop.load(Ordering::SeqCst) {
            bar.finish_and_clear();
            save_partial(&state_at(step, loader.cursor()), &opt)?;
            tracing::info!(
                step,
                "stopped in the warm start; resume with --resume {}",
                dir.display()
            );
            return Ok(None);
        }
        let top = StepTop {
            state: state_at(step, loader.cursor()),
            optimizer_steps: opt.steps(),
        };
        let progress = step as f64 / c.sft.steps as f64;
        let lr = c.sft.lr * (1.0 - progress).max(c.sft.min_lr_ratio);
        let done = caught(|| {
            let mut batch = Vec::with_capacity(c.sft.batch_size);
            for r in loader.take(c.sft.batch_size)? {
                let text = rollout::task::fill_template(&c.sft.completion_template, &r)?;
                let mut completion = task.tokenizer.encode(&text, false)?;
                completion.extend(eos.first());
                batch.push((task.prompt_ids(&r)?, completion));
            }
            crate::failpoint::check("sft-step", step)?;
            anyhow::Ok(sft_step(
                &w,
                &mut opt,
                &batch,
                c.optimizer.micro_batch_tokens,
                lr,
            )?)
        });
        let m = match done {
            Ok(m) => m,
            Err(e) => {
                bar.finish_and_clear();
                let steps = opt.steps();
                return Err(rescued(
                    e,
                    "warm-start",
                    Some(top),
                    steps,
                    first,
                    dir,
                    |s| save_partial(s, &opt),
                ));
            }
        };
        warn_memory_retries(step, m.memory_retries, opt.fit());
        let mut row = vec![
            ("loss".into(), m.loss),
            ("grad_norm".into(), m.grad_norm),
            ("lr".into(), lr),
            ("memory_retries".into(), m.memory_retries as f64),
        ];
        row.extend(loss_scale_columns(&opt));
        row.extend([
            ("tokens".into(), m.tokens as f64),
            ("seconds".into(), start.elapsed().as_secs_f64()),
        ]);
        table.push(step + 1, &row)?;
        bar.set_position(step + 1);
        bar.set_message(format!("loss {:.3}", m.loss));
        if step % 100 == 0 {
            tracing::info!(step, loss = m.loss, "sft");
        }
    }
    bar.finish_and_clear();
    let state = state_at(0, loader.cursor());
    let w = w.snapshot()?;
    checkpoint::save(
        &root,
        "sft",
        &opt.master_weights(&w)?,
        &task.tokenizer,
        None,
        &state,
        &[(CONFIG_FILE, &c.to_toml())],
        None,
    )?;
    if partial.exists() {
        std::fs::remove_dir_all(&partial).with_context(|| partial.display().to_string())?;
    }
    Ok(Some((w, state.feed, start.elapsed().as_secs_f64())))
}

/// The policy the RL stage starts from: the RL start `start`, or a resumed run's checkpoint
/// `ckpt`. With LoRA the start stays frozen and the adapters train: fresh ones (seeded from
/// `run.seed`), or the checkpoint's, read back onto the start.
fn policy_start(c: &Config, start: &Weights, ckpt: Option<&Path>) -> anyhow::Result<Weights> {
    Ok(match (c.lora.config(), ckpt) {
        (None, None) => start.clone(),
        (None, Some(ckpt)) => setup::load_weights(c, ckpt)?,
        (Some(lc), None) => start.with_lora(&lc, c.run.seed)?,
        (Some(lc), Some(ckpt)) => {
            let (saved, named) = model::lora::load_adapter(&ckpt.join(model::lora::ADAPTER_DIR))?;
            anyhow::ensure!(
                saved == lc,
                "{}: its adapter is {saved:?}, the config asks for {lc:?}: resume with the run's \
                 [lora]",
                ckpt.display()
            );
            start.with_lora_named(&lc, &named)?
        }
    })
}

/// The evaluation at `step`, its batch of `data.eval_batch` rows halved while it runs out of
/// device memory.
fn eval_row(
    c: &Config,
    w: &Weights,
    task: &Task,
    records: &[datasets::Record],
    step: u64,
) -> anyhow::Result<EvalResult> {
    let generation = setup::generation(c, &task.tokenizer);
    let w = w.detach();
    fewer_rows_while_out_of_memory(c.data.eval_batch, |rows| {
        evaluate(
            &w,
            task,
            records,
            &generation,
            c.data.eval_samples,
            datasets::rng::mix(c.run.seed, 0xE7A1, step),
            rows,
        )
    })
}

/// A due evaluation during training: its row, or, when it fails, a warning and none. The run
/// goes on to its checkpoint: a failed evaluation (the device out of memory beside the workers,
/// say) costs that row, not the steps since the last checkpoint.
fn eval_during_training(
    c: &Config,
    w: &Weights,
    task: &Task,
    records: &[datasets::Record],
    step: u64,
) -> Option<EvalResult> {
    match eval_row(c, w, task, records, step) {
        Ok(e) => Some(e),
        Err(e) => {
            tracing::warn!(step, "evaluation failed, the run goes on without it: {e:#}");
            None
        }
    }
}

/// Whether `e`, anywhere in its chain, is the device running out of memory.
fn out_of_memory(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<model::ModelError>()
            .is_some_and(|m| m.is_out_of_memory())
            || c.downcast_ref::<learner::error::LearnerError>()
                .is_some_and(|l| l.is_out_of_memory())
            || c.downcast_ref::<candle_core::Error>()
                .is_some_and(model::error::out_of_memory)
    })
}

/// The policy's weights for the workers (a packed snapshot) and their checksum, after step
/// `step`. On one GPU the workers' batches may hold the memory a snapshot needs while the step's
/// update is in no checkpoint yet: one that runs out is tried again after the workers' waits
/// (`rollout::pool::OUT_OF_MEMORY_WAITS`, about 13 s in all) as their batches finish, rather
/// than ending the run there.
fn publishable(policy: &Weights, step: u64) -> anyhow::Result<(Weights, u64)> {
    let snapshot = || -> anyhow::Result<(Weights, u64)> {
        let snap = policy.snapshot()?;
        let checksum = snap.checksum()?;
        Ok((snap, checksum))
    };
    let wait = |d: Duration| {
        tracing::warn!(
            step,
            wait_s = d.as_secs_f64(),
            "out of device memory for the policy's snapshot: trying again"
        );
        std::thread::sleep(d);
    };
    let never = AtomicBool::new(false);
    rollout::pool::after_out_of_memory_waits(&never, wait, out_of_memory, snapshot)
        .context("publishing the policy's weights to the workers")
}

/// `f(rows)`, with `rows` halved (down to 1) while `f` runs out of device memory.
fn fewer_rows_while_out_of_memory<T>(
    mut rows: usize,
    mut f: impl FnMut(usize) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    loop {
        match f(rows) {
            Err(e) if rows > 1 && out_of_memory(&e) => {
                rows /= 2;
                tracing::warn!(
                    rows,
                    "out of device memory: evaluating in batches of fewer rows"
                );
            }
            done => return done,
        }
    }
}

fn mean_std(xs: &[f64]) -> (f64, f64) {
    let n = xs.len().max(1) as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

/// Runs (or resumes) the experiment in `opts.dir`.
pub fn run(c: &Config, opts: &RunOptions) -> anyhow::Result<Summary> {
    model::checkpoint::set_enabled(c.optimizer.activation_checkpointing);
    learner::step::set_share_prompts(c.optimizer.share_prompts);
    learner::step::set_order_by_length(c.optimizer.order_by_length);
    learner::step::set_pack_rows(c.pack_rows()?);
    tracing::info!(
        pack_rows = learner::step::packing_rows(),
        "the learner's micro-batches pack their rows"
    );
    let dir = &opts.dir;
    std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
    std::fs::write(dir.join(CONFIG_FILE), c.to_toml())?;
    let (base, tokenizer) = setup::load_model(c)?;
    let task = setup::task(c, tokenizer)?;
    // before the warm start, so that a teacher that cannot serve ends the run at once
    let run = Some((dir.as_path(), opts.resume));
    let teacher = setup::load_teacher(c, &task.tokenizer, base.config.vocab_size, run)?;
    let eval_records = setup::eval_records(c)?;
    let mut summary = Summary::default();
    let ckpt_root = dir.join("checkpoints");
    let resume_from = if opts.resume {
        checkpoint::list(&ckpt_root)?.pop()
    } else {
        None
    };
    let sft_start = !opts.resume && c.sft.steps > 0;
    if sft_start {
        let e = eval_row(c, &base, &task, &eval_records, u64::MAX)?;
        summary.accuracy_initial = Some(e.greedy_accuracy);
        tracing::info!(
            accuracy = e.greedy_accuracy,
            "held-out accuracy of the initial model"
        );
    }
    let Some((start_weights, start_feed, sft_seconds)) = sft_stage(c, dir, &base, &task, opts)?
    else {
        summary.interrupted = true;
        return Ok(summary);
    };
    summary.seconds_sft = sft_seconds;
    // the RL stage
    let lora = c.lora.config();
    let ckpt_dir = resume_from.as_ref().map(|(_, p)| p.as_path());
    let policy_init = policy_start(c, &start_weights, ckpt_dir)?;
    let state = match ckpt_dir {
        Some(ckpt) => checkpoint::load_state(ckpt)?,
        None => TrainerState {
            step: 0,
            policy_version: 0,
            feed: start_feed,
            seed: c.run.seed,
            samples_seen: 0,
            kl_coef: None,
            bco_reward_mean: None,
        },
    };
    let critic_adamw = learner::optim::AdamWConfig {
        weight_decay: 0.0,
        ..adamw(c)
    };
    let (critic, head_vars) = Critic::new(c, &start_weights, ckpt_dir, critic_adamw)?;
    let mut algorithm = Algorithm::new(c, critic, state.kl_coef);
    algorithm.teacher = teacher;
    let reference = Algorithm::needs_reference(c).then(|| start_weights.clone());
    let (mut vars, policy) = match &lora {
        Some(_) => policy_init.lora_to_vars()?,
        None => policy_init.to_vars()?,
    };
    let trainable: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
    let parameters: usize = start_weights.named().values().map(|t| t.elem_count()).sum();
    tracing::info!(
        trainable,
        parameters,
        lora_rank = c.lora.rank,
        "the RL stage's trainable parameters"
    );
    vars.extend(head_vars);
    let mut opt = AdamW::new(vars, adamw(c))?;
    if !c.optimizer.subnetwork_mask.is_empty() {
        crate::analyze::apply_masks(
            &mut opt,
            Path::new(&c.optimizer.subnetwork_mask),
            &c.optimizer.subnetwork_mask_kind,
        )?;
    }
    if let Some((_, ckpt)) = &resume_from {
        opt.load(ckpt)?;
        tracing::info!(step = state.step, path = %ckpt.display(), "resuming");
    }
    let last = resume_from.as_ref().map(|(s, _)| *s);
    let metrics_path = dir.join("metrics.parquet");
    let eval_path = dir.join("eval.parquet");
    // a fresh RL stage starts its tables empty; a resumed one keeps the rows up to its checkpoint
    let (mut metrics, mut eval_table) = match last {
        Some(step) => (
            StepTable::reopen(metrics_path, step)?,
            StepTable::reopen(eval_path, step)?,
        ),
        None => (StepTable::new(metrics_path), StepTable::new(eval_path)),
    };
    if c.run.tensorboard {
        // the warm start's rows from its table, the RL stage's as they stand (a resumed run's
        // up to its checkpoint)
        let tables = [
            (
                "sft",
                StepTable::read(dir.join("sft.parquet"))?.named_rows(),
            ),
            ("train", metrics.named_rows()),
            ("eval", eval_table.named_rows()),
        ];
        let board = Board::rebuild(dir, &tables)?;
        metrics.mirror(&board, "train");
        eval_table.mirror(&board, "eval");
    }
    let rollouts = RolloutLog::open(dir.join("rollouts.parquet"), last)?;
    // live subnetwork tracking: every checkpoint against the RL start
    let mut tracker = if c.run.track_subnetwork {
        let initial = (c.sft.steps > 0).then(|| base.named());
        Some(crate::analyze::Tracker::open(
            dir,
            start_weights.named(),
            initial.as_ref(),
            c.run.subnetwork_tol,
            last,
        )?)
    } else {
        None
    };
    if let (Some(t), Some(step)) = (tracker.as_mut(), last) {
        if step > 0 && !t.has(step) {
            t.record(step, &policy_init.merged()?.named())?;
        }
    }
    if last.is_none() {
        let e = eval_row(c, &policy, &task, &eval_records, 0)?;
        eval_table.push(0, &e.row())?;
        summary.accuracy_start = e.greedy_accuracy;
        summary.pass_at_k_start = if e.k > 0 { e.pass_at_k } else { f64::NAN };
        summary.pass_at_1_start = if e.k > 0 { e.pass_at_1 } else { f64::NAN };
    } else if !eval_table.rows().is_empty() {
        summary.accuracy_start = eval_table.value(0, "greedy_accuracy");
        summary.pass_at_k_start = eval_table.value_like(0, "pass@", "pass@1");
        summary.pass_at_1_start = eval_table.value(0, "pass@1");
    }
    let rl = if c.preference_stage() {
        let start = Instant::now();
        let mut feed = Feed::new(setup::train_loader(c)?, state.feed);
        let built = crate::dpo::preferences(c, dir, &start_weights, &task, &mut feed, &opts.stop)?;
        let Some(data) = built else {
            tracing::info!(
                "stopped while building the preference data; resume with --resume {} (which builds it again)",
                dir.display()
            );
            summary.interrupted = true;
            return Ok(summary);
        };
        let bar = progress_bar(c.run.steps, &c.algorithm.name, opts.progress);
        bar.set_position(state.step);
        let mut on_step = |s: &TrainerState, opt: &AdamW| -> anyhow::Result<()> {
            if c.run.eval_every > 0 && s.step.is_multiple_of(c.run.eval_every)
                || s.step == c.run.steps
            {
                if let Some(e) = eval_during_training(c, &policy, &task, &eval_records, s.step) {
                    eval_table.push(s.step, &e.row())?;
                    tracing::info!(step = s.step, accuracy = e.greedy_accuracy, "eval");
                }
            }
            if c.run.checkpoint_every > 0 && s.step.is_multiple_of(c.run.checkpoint_every)
                || s.step == c.run.steps
            {
                crate::dpo::save(c, dir, &task, &policy, opt, s)?;
                if let Some(t) = tracker.as_mut() {
                    t.record(s.step, &policy.merged()?.named())?;
                }
            }
            bar.set_position(s.step);
            Ok(())
        };
        let mut top = None;
        let end = caught(|| {
            crate::dpo::dpo_stage(
                c,
                &policy,
                &mut opt,
                &data,
                state,
                &mut metrics,
                &mut on_step,
                &opts.stop,
                &mut top,
            )
        });
        bar.finish_and_clear();
        let end = match end {
            Ok(end) => end,
            Err(e) => {
                let saved = last_saved(&ckpt_root);
                let stage = c.algorithm.name.to_uppercase();
                return Err(rescued(e, &stage, top, opt.steps(), saved, dir, |s| {
                    crate::dpo::save(c, dir, &task, &policy, &opt, s)
                }));
            }
        };
        if end.step < c.run.steps {
            // stopped (Ctrl-C, SIGTERM): a checkpoint of the last step
            crate::dpo::save(c, dir, &task, &policy, &opt, &end)?;
            summary.interrupted = true;
        }
        summary.steps = end.step;
        summary.samples = end.samples_seen;
        if let Some(last) = eval_table.rows().len().checked_sub(1) {
            summary.accuracy_final = eval_table.value(last, "greedy_accuracy");
            summary.pass_at_k_final = eval_table.value_like(last, "pass@", "pass@1");
            summary.pass_at_1_final = eval_table.value(last, "pass@1");
        }
        start.elapsed().as_secs_f64()
    } else {
        rl_stage(
            c,
            opts,
            &task,
            &policy,
            algorithm,
            reference.as_ref(),
            &mut opt,
            state,
            &mut metrics,
            &mut eval_table,
            &rollouts,
            &eval_records,
            &mut summary,
            &mut tracker,
        )?
    };
    summary.seconds_rl = rl;
    std::fs::write(
        dir.join(SUMMARY_FILE),
        serde_json::to_string_pretty(&summary).expect("serializes"),
    )?;
    if let Err(e) = crate::report::plot(dir) {
        tracing::warn!("report.png: {e:#}");
    }
    Ok(summary)
}

#[allow(clippy::too_many_arguments)]
fn rl_stage(
    c: &Config,
    opts: &RunOptions,
    task: &Task,
    policy: &Weights,
    mut algorithm: Algorithm,
    reference: Option<&Weights>,
    opt: &mut AdamW,
    mut state: TrainerState,
    metrics: &mut StepTable,
    eval_table: &mut StepTable,
    rollouts: &RolloutLog,
    eval_records: &[datasets::Record],
    summary: &mut Summary,
    tracker: &mut Option<crate::analyze::Tracker>,
) -> anyhow::Result<f64> {
    let start = Instant::now();
    let r = &c.rollout;
    let g = r.group_size;
    let batch_size = r.prompts_per_step * g;
    let store = Arc::new(PolicyStore::new(
        state.policy_version,
        policy.checksum()?,
        policy.snapshot()?,
    ));
    let admission = Arc::new(Admission::new(r.max_staleness, batch_size));
    admission.published(state.policy_version);
    let feed = Arc::new(Mutex::new(Feed::new(setup::train_loader(c)?, state.feed)));
    let (sender, receiver) = crossbeam_channel::bounded(r.channel_capacity.max(1));
    let groups_per_batch = c.groups_per_batch()?;
    tracing::info!(
        groups_per_batch,
        "each rollout worker batches up to this many groups"
    );
    let pool = Pool::spawn(
        PoolConfig {
            workers: r.workers,
            group_size: g,
            generation: setup::generation(c, &task.tokenizer),
            seed: c.run.seed,
            entropy_reward: c.algorithm.entropy_reward,
            groups_per_batch,
            greedy_baseline: c.algorithm.greedy_baseline(),
        },
        Arc::new(task.clone()),
        feed.clone(),
        store.clone(),
        admission.clone(),
        sender,
    );
    let mut collector = Collector::new(receiver, r.max_staleness, r.prompts_per_step);
    if c.algorithm.filter_groups {
        let max = c.algorithm.filter_groups_max_batches;
        collector = collector.filtering(admission.clone(), max);
    }
    let part_names: Vec<String> = task.reward.parts.iter().map(|p| p.name.clone()).collect();
    let bar = progress_bar(c.run.steps, "grpo", opts.progress);
    bar.set_position(state.step);
    let mut skipped_in_a_row = 0;
    let mut top: Option<StepTop> = None;
    let result = caught(|| -> anyhow::Result<()> {
        while state.step < c.run.steps {
            if opts.stop.load(Ordering::SeqCst) {
                summary.interrupted = true;
                break;
            }
            top = Some(StepTop {
                state: with_feed(&state, &feed),
                optimizer_steps: algorithm.optimizer_steps(opt),
            });
            let t0 = Instant::now();
            let batch = collector.next_step(state.policy_version)?;
            {
                let mut f = Feed::locked(&feed);
                for id in &batch.finished_groups {
                    f.done(*id);
                }
            }
            admission
                .consumed(batch.groups.iter().map(Vec::len).sum::<usize>() + batch.dropped_rows);
            let wait = t0.elapsed().as_secs_f64();
            let samples: Vec<_> = batch.groups.iter().flatten().collect();
            let t_adv = Instant::now();
            let (seqs, adv) = algorithm.sequences(c, &samples, policy, reference)?;
            let advantages = &adv.per_sequence;
            let time_advantages = t_adv.elapsed().as_secs_f64();
            let lr = c.lr_at(c.optimizer.lr, state.step);
            let t1 = Instant::now();
            crate::failpoint::check("rl-step", state.step)?;
            let critic_lr = c.lr_at(c.algorithm.critic_lr, state.step);
            let (m, critic) = algorithm.train(policy, reference, opt, &seqs, lr, critic_lr)?;
            state.kl_coef = Some(algorithm.kl.beta);
            let train = t1.elapsed().as_secs_f64();
            if m.skipped {
                skipped_in_a_row += 1;
                tracing::warn!(
                    step = state.step,
                    loss = m.loss,
                    "non-finite loss or gradient: step skipped"
                );
                if skipped_in_a_row == 5 {
                    top = None; // weights that gave five non-finite steps are not worth a checkpoint
                    anyhow::bail!("5 steps in a row with a non-finite loss or gradient; the last checkpoint is intact");
                }
            } else {
                skipped_in_a_row = 0;
            }
            warn_memory_retries(state.step, m.memory_retries, opt.fit());
            state.step += 1;
            state.policy_version += 1;
            state.samples_seen += samples.len() as u64;
            let t2 = Instant::now();
            let (snap, checksum) = publishable(policy, state.step)?;
            store.publish(state.policy_version, checksum, snap)?;
            admission.published(state.policy_version);
            let publish = t2.elapsed().as_secs_f64();
            // metrics
            let hist = batch.staleness_histogram(state.policy_version - 1, r.max_staleness);
            let f64s = |f: &dyn Fn(&rollout::schema::Sample) -> f64| {
                samples.iter().map(|s| f(s)).collect::<Vec<f64>>()
            };
            let (reward_mean, reward_std) = mean_std(&f64s(&|s| f64::from(s.reward)));
            let (adv_mean, adv_std) = mean_std(
                &adv.advantages
                    .iter()
                    .map(|&a| f64::from(a))
                    .collect::<Vec<_>>(),
            );
            let lengths = f64s(&|s| s.completion_ids.len() as f64);
            let part = |name: &str| {
                mean_std(&f64s(&|s| {
                    s.reward_parts
                        .iter()
                        .find(|(n, _)| n == name)
                        .map_or(0.0, |p| f64::from(p.1))
                }))
                .0
            };
            // ReMax's greedy completions (NaN under other algorithms)
            let greedy = |name: &str| match c.algorithm.greedy_baseline() {
                true => part(name),
                false => f64::NAN,
            };
            let mut row: Vec<(String, f64)> = vec![
                ("reward_mean".into(), reward_mean),
                ("reward_std".into(), reward_std),
                ("accuracy".into(), part("correct")),
                ("greedy_reward".into(), greedy("greedy_reward")),
                ("greedy_accuracy".into(), greedy("greedy_correct")),
            ];
            row.extend(part_names.iter().map(|n| (format!("reward/{n}"), part(n))));
            row.extend([
                ("advantage_mean".into(), adv_mean),
                ("advantage_std".into(), adv_std),
                (
                    "advantage_abs_max".into(),
                    adv.advantages
                        .iter()
                        .fold(0f64, |a, &x| a.max(f64::from(x.abs()))),
                ),
                ("reward_kl".into(), adv.reward_kl),
                ("reward_kl_coef".into(), adv.reward_kl_coef),
            ]);
            // the behaviour correction's (NaN when off)
            let corr = |f: fn(&learner::correction::CorrectionStats) -> f64| {
                adv.correction.as_ref().map_or(f64::NAN, f)
            };
            row.extend([
                (
                    "sampler_logprob_diff_mean".into(),
                    corr(|c| c.logprob_diff_mean),
                ),
                (
                    "sampler_logprob_diff_max".into(),
                    corr(|c| c.logprob_diff_max),
                ),
                ("is_weight_min".into(), corr(|c| c.weight_min)),
                ("is_weight_mean".into(), corr(|c| c.weight_mean)),
                ("is_weight_max".into(), corr(|c| c.weight_max)),
                ("is_capped_frac".into(), corr(|c| c.capped_frac)),
                ("m2".into(), adv.m2po.map_or(f64::NAN, |m| m.0)),
                ("m2_masked_frac".into(), adv.m2po.map_or(f64::NAN, |m| m.1)),
                ("opd_reverse_kl".into(), adv.reverse_kl.unwrap_or(f64::NAN)),
                ("value_loss".into(), critic.map_or(m.value_loss, |c| c.0)),
                (
                    "value_clip_frac".into(),
                    critic.map_or(m.value.clip_frac, |c| c.1),
                ),
                ("value_mean".into(), m.value.value_mean),
                ("critic_grad_norm".into(), critic.map_or(f64::NAN, |c| c.2)),
                ("optimizer_steps".into(), m.optimizer_steps as f64),
                ("loss".into(), m.loss),
                ("clip_low_frac".into(), m.policy.clip_low_frac),
                ("clip_high_frac".into(), m.policy.clip_high_frac),
                ("ratio_mean".into(), m.policy.ratio_mean),
                ("ratio_max".into(), m.policy.ratio_max),
                ("behaviour_kl".into(), m.policy.behaviour_kl),
                ("logprob_diff_max".into(), m.policy.logprob_diff_max),
                (
                    "off_policy_masked_frac".into(),
                    m.policy.off_policy_masked_frac,
                ),
                (
                    "covariance_selected_frac".into(),
                    m.policy.covariance_selected_frac,
                ),
                ("kl".into(), m.policy.kl_mean),
                ("entropy".into(), m.policy.entropy_mean),
                ("grad_norm".into(), m.grad_norm),
                ("lr".into(), lr),
                ("skipped".into(), f64::from(u8::from(m.skipped))),
                ("memory_retries".into(), m.memory_retries as f64),
            ]);
            row.extend(loss_scale_columns(opt));
            if let crate::algo::Critic::Separate(sc) = &algorithm.critic {
                let critic = loss_scale_columns(&sc.opt).into_iter();
                row.extend(critic.map(|(name, v)| (format!("critic_{name}"), v)));
            }
            row.extend([
                ("length_mean".into(), mean_std(&lengths).0),
                (
                    "length_min".into(),
                    lengths.iter().copied().fold(f64::INFINITY, f64::min),
                ),
                (
                    "length_max".into(),
                    lengths.iter().copied().fold(0.0, f64::max),
                ),
                (
                    "truncated_frac".into(),
                    mean_std(&f64s(&|s| f64::from(u8::from(s.finish == Finish::Length)))).0,
                ),
                (
                    "error_frac".into(),
                    mean_std(&f64s(&|s| f64::from(u8::from(s.finish == Finish::Error)))).0,
                ),
            ]);
            row.extend(
                hist.iter()
                    .enumerate()
                    .map(|(d, &n)| (format!("staleness_{d}"), n as f64)),
            );
            row.extend([
                ("dropped_rows".into(), batch.dropped_rows as f64),
                ("filtered_groups".into(), batch.filtered_groups as f64),
                ("frac_reward_zero_std".into(), batch.zero_std_frac()),
                ("failed_groups".into(), batch.failed_groups as f64),
                ("policy_version".into(), state.policy_version as f64),
                ("samples".into(), state.samples_seen as f64),
                ("rollout_tokens".into(), batch.rollout_tokens as f64),
                (
                    "rollout_tokens_per_s".into(),
                    batch.rollout_tokens as f64
                        / (batch.rollout_seconds / r.workers as f64).max(1e-9),
                ),
                // how full the workers' decode steps ran (NaN: no generation ended meanwhile)
                (
                    "rollout_rows_per_decode_step".into(),
                    batch.decoded.rows as f64 / batch.decoded.steps as f64,
                ),
                (
                    "learner_tokens_per_s".into(),
                    m.tokens as f64 / train.max(1e-9),
                ),
                ("time/wait_rollout".into(), wait),
                ("time/advantages".into(), time_advantages),
                ("time/train".into(), train),
                ("time/publish".into(), publish),
                ("time/step".into(), t0.elapsed().as_secs_f64()),
                ("time/elapsed".into(), start.elapsed().as_secs_f64()),
            ]);
            for f in &batch.failures {
                tracing::warn!("rollout failed: {f}");
            }
            summary.dropped_rows += batch.dropped_rows as u64;
            summary.filtered_groups += batch.filtered_groups as u64;
            rollouts.write(state.step, &batch.batches, advantages)?;
            let t3 = Instant::now();
            let eval_due = c.run.eval_every > 0 && state.step.is_multiple_of(c.run.eval_every)
                || state.step == c.run.steps;
            if eval_due {
                if let Some(e) = eval_during_training(c, policy, task, eval_records, state.step) {
                    eval_table.push(state.step, &e.row())?;
                    tracing::info!(
                        step = state.step,
                        accuracy = e.greedy_accuracy,
                        pass_at_k = e.pass_at_k,
                        "eval"
                    );
                }
            }
            row.push(("time/eval".into(), t3.elapsed().as_secs_f64()));
            // the row goes to disk before the checkpoint, so a run killed right after its
            // checkpoint resumes with every row up to it; the checkpoint's time follows
            row.push(("time/checkpoint".into(), f64::NAN));
            metrics.push(state.step, &row)?;
            let t4 = Instant::now();
            let ckpt_due = c.run.checkpoint_every > 0
                && state.step.is_multiple_of(c.run.checkpoint_every)
                || state.step == c.run.steps;
            if ckpt_due {
                let state = with_feed(&state, &feed);
                save(c, opts, task, policy, opt, &algorithm.critic, &state)?;
                if let Some(t) = tracker.as_mut() {
                    t.record(state.step, &policy.merged()?.named())?;
                }
            }
            metrics.set_last("time/checkpoint", t4.elapsed().as_secs_f64())?;
            bar.set_position(state.step);
            bar.set_message(format!(
                "reward {reward_mean:.3} acc {:.3}",
                part("correct")
            ));
            tracing::debug!(
                step = state.step,
                reward = reward_mean,
                loss = m.loss,
                "step"
            );
        }
        Ok(())
    });
    bar.finish_and_clear();
    drop(collector);
    pool.stop();
    if let Err(e) = result {
        let steps = algorithm.optimizer_steps(opt);
        let saved = last_saved(&opts.dir.join("checkpoints"));
        return Err(rescued(e, "RL", top, steps, saved, &opts.dir, |s| {
            save(c, opts, task, policy, opt, &algorithm.critic, s)
        }));
    }
    if summary.interrupted {
        let state = with_feed(&state, &feed);
        save(c, opts, task, policy, opt, &algorithm.critic, &state)?;
        tracing::info!(
            step = state.step,
            "stopped; resume with --resume {}",
            opts.dir.display()
        );
    }
    summary.steps = state.step;
    summary.samples = state.samples_seen;
    if let Some(last) = eval_table.rows().len().checked_sub(1) {
        summary.accuracy_final = eval_table.value(last, "greedy_accuracy");
        summary.pass_at_k_final = eval_table.value_like(last, "pass@", "pass@1");
        summary.pass_at_1_final = eval_table.value(last, "pass@1");
    }
    Ok(start.elapsed().as_secs_f64())
}

/// A checkpoint of the RL stage at `state` (the data feed's position included), old ones
/// pruned; returns its name.
#[allow(clippy::too_many_arguments)]
fn save(
    c: &Config,
    opts: &RunOptions,
    task: &Task,
    policy: &Weights,
    opt: &AdamW,
    critic: &Critic,
    state: &TrainerState,
) -> anyhow::Result<String> {
    let root = opts.dir.join("checkpoints");
    let name = checkpoint::step_name(state.step);
    checkpoint::save(
        &root,
        &name,
        policy,
        &task.tokenizer,
        Some(opt),
        state,
        &[(CONFIG_FILE, &c.to_toml())],
        Some(&|dir: &std::path::Path| critic.save(dir)),
    )?;
    checkpoint::prune(&root, c.run.keep_checkpoints)?;
    Ok(name)
}

/// `state` with the data feed's position (where a resumed run draws its next prompts).
fn with_feed(state: &TrainerState, feed: &Mutex<Feed>) -> TrainerState {
    TrainerState {
        feed: Feed::locked(feed).state(),
        ..state.clone()
    }
}

/// `f()`, with a panic in it (a bug) turned into its error, so that a stage's steps done are
/// saved as for any failed step ([`rescued`]). What the panic left half done is judged there:
/// weights that an optimizer step had begun to change are not saved.
fn caught<T>(f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|payload| {
        let message = rollout::pool::panic_message(&*payload);
        Err(anyhow::anyhow!("panicked: {message}"))
    })
}

/// The step of the last checkpoint in `root` (0: none, or none readable).
fn last_saved(root: &Path) -> u64 {
    let list = checkpoint::list(root).unwrap_or_default();
    list.last().map_or(0, |(step, _)| *step)
}

/// The run as it stood when the step under way began.
pub(crate) struct StepTop {
    /// Its state then (the data feed's included).
    pub state: TrainerState,
    /// The optimizer steps taken by then.
    pub optimizer_steps: u64,
}

/// The error `e` that ended a `stage` in the step after `top` (None: not one a checkpoint
/// should keep), with where the steps done are. When the step's update had not begun (no
/// optimizer step since `top`: `optimizer_steps` now) and steps were done since the last
/// checkpoint (the one of step `saved`), `save` first writes a checkpoint of `top`'s state,
/// so that `ferrite run --resume` loses none of them. `save` returns the checkpoint's name.
fn rescued(
    e: anyhow::Error,
    stage: &str,
    top: Option<StepTop>,
    optimizer_steps: u64,
    saved: u64,
    dir: &Path,
    save: impl FnOnce(&TrainerState) -> anyhow::Result<String>,
) -> anyhow::Error {
    let Some(top) = top else { return e };
    let (done, resume) = (
        top.state.step,
        format!("`ferrite run --resume {}`", dir.display()),
    );
    let failed = format!("{stage} step {} failed", done + 1);
    let context = if top.optimizer_steps != optimizer_steps {
        format!("{failed} during its update, so the weights are no step's; {resume} continues from the last checkpoint (step {saved})")
    } else if done == saved {
        format!("{failed}: the first since the last checkpoint (or the stage's start), so no step is lost, and {resume} continues")
    } else {
        match save(&top.state) {
            Ok(name) => {
                tracing::warn!(step = done, checkpoint = %name, "{failed}: saved the steps done");
                format!("{failed}; the {done} steps done are saved in checkpoints/{name}, and {resume} continues")
            }
            Err(s) => format!("{failed}, and saving the steps done failed too ({s:#}); {resume} continues from step {saved}"),
        }
    };
    e.context(context)
}

/// Says that a learner step ran out of device memory and ran again (`learner::fit`), and how
/// the run's steps run from now on.
/// An f16 run's loss scale after the step, and the overflows so far (each a backward run again
/// at half the scale): none for other dtypes.
pub(crate) fn loss_scale_columns(opt: &AdamW) -> Vec<(String, f64)> {
    opt.loss_scale().map_or_else(Vec::new, |s| {
        vec![
            ("loss_scale".into(), s.scale),
            ("loss_scale_overflows".into(), s.overflows as f64),
        ]
    })
}

pub(crate) fn warn_memory_retries(step: u64, retries: usize, fit: learner::fit::Fit) {
    if retries == 0 {
        return;
    }
    let pieces = match fit.piece_tokens {
        Some(t) => format!("micro-batches in pieces of at most {t} padded tokens"),
        None => "whole micro-batches".into(),
    };
    let layers = if fit.checkpointed {
        ", with per-layer checkpointing"
    } else {
        ""
    };
    tracing::warn!(
        step,
        retries,
        "out of device memory: the step ran again; steps now run {pieces}{layers}"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use learner::error::LearnerError;

    fn oom() -> anyhow::Error {
        anyhow::Error::new(LearnerError::OutOfMemory("no room".into())).context("evaluating")
    }

    #[test]
    fn an_evaluation_out_of_memory_runs_again_with_fewer_rows() {
        let mut tried = Vec::new();
        let rows = fewer_rows_while_out_of_memory(16, |rows| {
            tried.push(rows);
            if rows > 4 {
                Err(oom())
            } else {
                Ok(rows)
            }
        });
        assert_eq!((rows.unwrap(), tried), (4, vec![16, 8, 4]));
        // another error is returned at once, and running out with one row is the error
        let mut tries = 0;
        let e = fewer_rows_while_out_of_memory(16, |_| -> anyhow::Result<()> {
            tries += 1;
            anyhow::bail!("a bad template")
        });
        assert!(e.is_err() && tries == 1);
        let mut tried = Vec::new();
        let e = fewer_rows_while_out_of_memory(3, |rows| -> anyhow::Result<()> {
            tried.push(rows);
            Err(oom())
        });
        assert!(out_of_memory(&e.unwrap_err()));
        assert_eq!(tried, vec![3, 1]);
    }
    #[test]
    fn a_panic_is_the_steps_error() {
        let e = caught(|| -> anyhow::Result<()> { panic!("index {} out of range", 7) });
        assert_eq!(
            format!("{:#}", e.unwrap_err()),
            "panicked: index 7 out of range"
        );
        assert_eq!(caught(|| Ok(3)).unwrap(), 3);
        assert!(caught(|| -> anyhow::Result<()> { anyhow::bail!("no room") }).is_err());
    }

    #[test]
    fn a_failed_step_saves_the_steps_done_only_where_its_update_had_not_begun() {
        let top = |step| StepTop {
            state: TrainerState {
                step,
                policy_version: step,
                feed: FeedState::default(),
                seed: 0,
                samples_seen: 0,
                kl_coef: None,
                bco_reward_mean: None,
            },
            optimizer_steps: 7,
        };
        let dir = Path::new("runs/x");
        let mut saves = Vec::new();
        let mut run = |top: Option<StepTop>, steps: u64, saved: u64, ok: bool| {
            let e = rescued(
                anyhow::anyhow!("out of memory"),
                "RL",
                top,
                steps,
                saved,
                dir,
                |s| {
                    saves.push(s.step);
                    match ok {
                        true => Ok(checkpoint::step_name(s.step)),
                        false => anyhow::bail!("disk full"),
                    }
                },
            );
            format!("{e:#}")
        };
        // steps done since the last checkpoint, no optimizer step since the step began: saved
        let e = run(Some(top(5)), 7, 2, true);
        assert!(
            e.contains("RL step 6 failed") && e.contains("checkpoints/step-000005"),
            "{e}"
        );
        assert!(
            e.ends_with("out of memory") && e.contains("--resume runs/x"),
            "{e}"
        );
        // nothing since the last checkpoint; an update under way; no step to keep: not saved
        let e = run(Some(top(5)), 7, 5, true);
        assert!(e.contains("no step is lost"), "{e}");
        let e = run(Some(top(5)), 8, 2, true);
        assert!(
            e.contains("during its update") && e.contains("(step 2)"),
            "{e}"
        );
        assert_eq!(run(None, 7, 2, true), "out of memory");
        // a save that fails too says so, and where a resumed run starts
        let e = run(Some(top(4)), 7, 2, false);
        assert!(e.contains("disk full") && e.contains("from step 2"), "{e}");
        assert_eq!(saves, [5, 4]);
    }
}
