//! The DPO stage of a run: preference pairs from a file, or built from the warm-started model's
//! own samples ranked by the verifier; reference log-probs computed once; the DPO-family loss;
//! the same metrics, evaluation and checkpoint files as the RL stage.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::Context;
use datasets::record::Prompt;
use datasets::Record;
use learner::checkpoint::{self, TrainerState};
use learner::dpo::{dpo_step, DpoConfig, Pair};
use learner::optim::AdamW;
use model::Weights;
use rollout::pool::{generate_fitting, rollout_groups, Feed, PoolConfig};
use rollout::schema::{Finish, Sample};
use rollout::task::Task;

use crate::config::Config;
use crate::logs::StepTable;
use crate::run::StepTop;
use crate::setup;

pub const PREFERENCES_FILE: &str = "preferences.jsonl";

/// Samples `rollout.group_size` completions for each of `algorithm.preference_prompts` train
/// prompts and pairs the best-rewarded completion (chosen) with the worst (rejected); prompts
/// whose completions all score the same give no pair. Each pair keeps its prompt record's
/// fields, so the prompt renders as it did. The groups are generated as the rollout workers
/// batch theirs (`rollout.groups_per_batch`), each from its own sampling streams, so the pairs
/// do not depend on the batching. None when `stop` (Ctrl-C, SIGTERM) came first.
pub fn build_preferences(
    c: &Config,
    w: &Weights,
    task: &Task,
    feed: &mut Feed,
    stop: &AtomicBool,
) -> anyhow::Result<Option<Vec<Record>>> {
    let cfg = PoolConfig {
        workers: 1,
        group_size: c.rollout.group_size.max(2),
        generation: setup::generation(c, &task.tokenizer),
        seed: c.run.seed ^ 0xD90,
        entropy_reward: Default::default(),
        groups_per_batch: c.groups_per_batch()?,
    };
    let w = w.detach();
    let mut out = Vec::new();
    let mut left = c.algorithm.preference_prompts;
    while left > 0 {
        if stop.load(Ordering::SeqCst) {
            return Ok(None);
        }
        let mut groups = Vec::new();
        for _ in 0..cfg.groups_per_batch.min(left) {
            let (group_id, record) = feed.next_group()?;
            feed.done(group_id);
            groups.push((group_id, record));
        }
        left -= groups.len();
        let results = generate_fitting(stop, &mut std::thread::sleep, &groups, &mut |g| {
            Ok(rollout_groups(task, &w, 0, g, &cfg)?.0)
        });
        for ((_, record), samples) in groups.iter().zip(results) {
            match samples {
                Ok(samples) => out.extend(preference(record, &samples)),
                Err(e) => tracing::warn!("preference prompt {}: {e}", record.id),
            }
        }
    }
    Ok(Some(out))
}

/// The pair of a prompt's samples: the best-rewarded (chosen) and the worst (rejected), with
/// the prompt record's fields; None when they all score the same.
fn preference(record: &Record, samples: &[Sample]) -> Option<Record> {
    let best = samples
        .iter()
        .max_by(|a, b| a.reward.total_cmp(&b.reward))?;
    let worst = samples
        .iter()
        .min_by(|a, b| a.reward.total_cmp(&b.reward))?;
    if best.reward <= worst.reward {
        return None;
    }
    let mut metadata = record.metadata.clone();
    metadata.insert("chosen_reward".into(), best.reward.into());
    metadata.insert("rejected_reward".into(), worst.reward.into());
    metadata.insert("chosen_stop".into(), (best.finish == Finish::Stop).into());
    metadata.insert(
        "rejected_stop".into(),
        (worst.finish == Finish::Stop).into(),
    );
    Some(Record {
        id: record.id,
        prompt: record.prompt.clone(),
        answer: record.answer.clone(),
        chosen: Some(Prompt::Text(best.completion_text.clone())),
        rejected: Some(Prompt::Text(worst.completion_text.clone())),
        metadata,
    })
}

/// Tokenized pairs: the prompt as the task renders it, each completion's text and its
/// end-of-sequence token (unless the record says the sample was cut at the length limit).
pub fn tokenize(task: &Task, records: &[Record]) -> anyhow::Result<Vec<Pair>> {
    let eos = setup::stop_ids(&task.tokenizer);
    let text = |p: &Option<Prompt>, what: &str| -> anyhow::Result<String> {
        match p {
            Some(Prompt::Text(t)) => Ok(t.clone()),
            Some(Prompt::Messages(m)) => Ok(m
                .iter()
                .filter(|m| m.role == "assistant")
                .map(|m| m.content.clone())
                .collect::<Vec<_>>()
                .join("")),
            None => anyhow::bail!("no {what} completion"),
        }
    };
    let mut pairs = Vec::with_capacity(records.len());
    for r in records {
        let completion = |p: &Option<Prompt>, what: &str| -> anyhow::Result<Vec<u32>> {
            let mut ids = task.tokenizer.encode(&text(p, what)?, false)?;
            let stopped = r
                .metadata
                .get(&format!("{what}_stop"))
                .and_then(serde_json::Value::as_bool)
                .unwrap_or(true);
            if stopped {
                ids.extend(eos.first());
            }
            anyhow::ensure!(!ids.is_empty(), "an empty {what} completion");
            Ok(ids)
        };
        let pair = (|| -> anyhow::Result<Pair> {
            Ok(Pair {
                prompt: task.prompt_ids(r)?,
                chosen: completion(&r.chosen, "chosen")?,
                rejected: completion(&r.rejected, "rejected")?,
            })
        })()
        .with_context(|| format!("preference record {}", r.id))?;
        pairs.push(pair);
    }
    Ok(pairs)
}

/// The pairs of one step: `n` pairs from a seeded order over the set, a fresh permutation each
/// epoch, so a resumed run sees the same pairs.
pub fn step_pairs(len: usize, n: usize, seed: u64, step: u64) -> Vec<usize> {
    let epoch_of = |k: u64| k / len as u64;
    let perm = |epoch: u64| datasets::rng::Stream::new(seed, 0xD90, epoch).permutation(len);
    (0..n as u64)
        .map(|k| {
            let at = step * n as u64 + k;
            perm(epoch_of(at))[(at % len as u64) as usize] as usize
        })
        .collect()
}

/// DPO optimizer steps from `state.step` to `run.steps`, or until `stop` (Ctrl-C, SIGTERM) is
/// set; one metrics row per step.
#[allow(clippy::too_many_arguments)]
pub fn dpo_stage(
    c: &Config,
    policy: &Weights,
    opt: &mut AdamW,
    pairs: &[Pair],
    reference: &[(f32, f32)],
    mut state: TrainerState,
    metrics: &mut StepTable,
    on_step: &mut dyn FnMut(&TrainerState, &AdamW) -> anyhow::Result<()>,
    stop: &AtomicBool,
    top: &mut Option<StepTop>,
) -> anyhow::Result<TrainerState> {
    anyhow::ensure!(!pairs.is_empty(), "no preference pairs to train on");
    let a = &c.algorithm;
    let cfg = DpoConfig {
        loss: a.dpo_loss,
        beta: a.dpo_beta,
        label_smoothing: a.label_smoothing,
        simpo_gamma: a.simpo_gamma,
        discopop_tau: a.discopop_tau,
        rpo_alpha: a.rpo_alpha,
    };
    let start = Instant::now();
    while state.step < c.run.steps && !stop.load(Ordering::SeqCst) {
        *top = Some(StepTop {
            state: state.clone(),
            optimizer_steps: opt.steps(),
        });
        let t0 = Instant::now();
        let idx = step_pairs(
            pairs.len(),
            c.algorithm.dpo_pairs_per_step,
            c.run.seed,
            state.step,
        );
        let batch: Vec<Pair> = idx.iter().map(|&i| pairs[i].clone()).collect();
        let refs: Vec<(f32, f32)> = idx.iter().map(|&i| reference[i]).collect();
        let lr = c.lr_at(c.optimizer.lr, state.step);
        crate::failpoint::check("dpo-step", state.step)?;
        let m = dpo_step(
            policy,
            opt,
            &batch,
            &refs,
            &cfg,
            c.optimizer.micro_batch_tokens,
            lr,
        )?;
        if m.skipped {
            tracing::warn!(
                step = state.step,
                "non-finite DPO loss or gradient: step skipped"
            );
        }
        crate::run::warn_memory_retries(state.step, m.memory_retries, opt.fit());
        state.step += 1;
        state.policy_version += 1;
        state.samples_seen += batch.len() as u64;
        let mut row = vec![
            ("loss".to_string(), m.loss),
            ("reward_accuracy".into(), m.reward_accuracy),
            ("reward_margin".into(), m.margin),
            ("chosen_reward".into(), m.chosen_reward),
            ("rejected_reward".into(), m.rejected_reward),
            ("grad_norm".into(), m.grad_norm),
            ("lr".into(), lr),
            ("skipped".into(), f64::from(u8::from(m.skipped))),
            ("memory_retries".into(), m.memory_retries as f64),
        ];
        row.extend(crate::run::loss_scale_columns(opt));
        row.extend([
            ("pairs".into(), state.samples_seen as f64),
            ("time/train".into(), t0.elapsed().as_secs_f64()),
        ]);
        // the row goes to disk before the checkpoint, so a run killed right after its
        // checkpoint resumes with every row up to it
        row.push(("time/eval_checkpoint".into(), f64::NAN));
        row.push(("time/elapsed".into(), start.elapsed().as_secs_f64()));
        metrics.push(state.step, &row)?;
        let t1 = Instant::now();
        on_step(&state, opt)?;
        metrics.set_last("time/eval_checkpoint", t1.elapsed().as_secs_f64())?;
        tracing::info!(
            step = state.step,
            loss = m.loss,
            accuracy = m.reward_accuracy,
            margin = m.margin,
            "dpo"
        );
    }
    Ok(state)
}

/// The preference pairs of a run: `algorithm.preferences`, or the pairs this run built (and
/// saved in its directory) from the warm-started policy. None when a stop (Ctrl-C, SIGTERM)
/// came while it built them: nothing is saved, and `--resume` builds them again.
pub fn preferences(
    c: &Config,
    dir: &Path,
    start: &Weights,
    task: &Task,
    feed: &mut Feed,
    stop: &AtomicBool,
) -> anyhow::Result<Option<Vec<Pair>>> {
    let records = if !c.algorithm.preferences.is_empty() {
        setup::preference_records(c, &c.algorithm.preferences)?
    } else {
        let path = dir.join(PREFERENCES_FILE);
        if path.is_file() {
            setup::preference_records(c, path.to_str().context("a UTF-8 path")?)?
        } else {
            let t = Instant::now();
            let Some(records) = build_preferences(c, start, task, feed, stop)? else {
                return Ok(None);
            };
            datasets::jsonl::write(&path, &records)?;
            tracing::info!(
                pairs = records.len(),
                prompts = c.algorithm.preference_prompts,
                seconds = t.elapsed().as_secs_f64(),
                path = %path.display(),
                "preference pairs built from the model's own samples"
            );
            records
        }
    };
    let pairs = tokenize(task, &records)?;
    anyhow::ensure!(!pairs.is_empty(), "no preference pairs");
    Ok(Some(pairs))
}

/// Saves a DPO checkpoint (the RL stage's layout).
pub fn save(
    c: &Config,
    dir: &Path,
    task: &Task,
    policy: &Weights,
    opt: &AdamW,
    state: &TrainerState,
) -> anyhow::Result<String> {
    let root = dir.join("checkpoints");
    let name = checkpoint::step_name(state.step);
    checkpoint::save(
        &root,
        &name,
        policy,
        &task.tokenizer,
        Some(opt),
        state,
        &[(crate::run::CONFIG_FILE, &c.to_toml())],
        None,
    )?;
    checkpoint::prune(&root, c.run.keep_checkpoints)?;
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_pairs_cover_each_epoch_once_in_a_seeded_order() {
        let len = 10;
        let mut seen: Vec<usize> = (0..5).flat_map(|s| step_pairs(len, 4, 7, s)).collect();
        assert_eq!(seen.len(), 20);
        // epochs 0 and 1 are each a permutation of the pairs
        let (first, second) = seen.split_at_mut(10);
        first.sort_unstable();
        second.sort_unstable();
        assert_eq!(first, (0..10).collect::<Vec<_>>().as_slice());
        assert_eq!(second, first);
        assert_eq!(step_pairs(len, 4, 7, 3), step_pairs(len, 4, 7, 3));
        assert_ne!(step_pairs(len, 10, 7, 0), step_pairs(len, 10, 8, 0));
    }

    #[test]
    fn preference_pairs_do_not_depend_on_how_their_groups_are_batched() {
        let build = |batch: &str| {
            let set = [
                format!("rollout.groups_per_batch={batch}"),
                "algorithm.preference_prompts=64".into(),
            ];
            let c = Config::default_with(&set.each_ref().map(String::as_str)).unwrap();
            let (w, tokenizer) = setup::load_model(&c).unwrap();
            let task = setup::task(&c, tokenizer);
            let mut feed = Feed::new(setup::train_loader(&c).unwrap(), Default::default());
            let stop = AtomicBool::new(false);
            let pairs = build_preferences(&c, &w, &task, &mut feed, &stop).unwrap();
            (pairs.unwrap(), feed.state().next_group)
        };
        let (one, drawn) = build("1");
        assert!(one.len() >= 3, "{} pairs", one.len());
        assert_eq!(drawn, 64);
        let (batched, drawn) = build("5"); // 12 batches of 5 and one of 4
        assert_eq!(drawn, 64);
        let key = |r: &Record| {
            let text = |p: &Option<Prompt>| match p {
                Some(Prompt::Text(t)) => t.clone(),
                _ => String::new(),
            };
            (r.id, text(&r.chosen), text(&r.rejected))
        };
        assert_eq!(
            one.iter().map(key).collect::<Vec<_>>(),
            batched.iter().map(key).collect::<Vec<_>>()
        );
        // a stop before the first batch builds nothing
        let c = Config::default();
        let (w, tokenizer) = setup::load_model(&c).unwrap();
        let task = setup::task(&c, tokenizer);
        let mut feed = Feed::new(setup::train_loader(&c).unwrap(), Default::default());
        let stopped = build_preferences(&c, &w, &task, &mut feed, &AtomicBool::new(true));
        assert!(stopped.unwrap().is_none());
    }

    #[test]
    fn pairs_keep_their_end_of_sequence_unless_cut() {
        let c = Config::default();
        let (_, tokenizer) = setup::load_model(&c).unwrap();
        let task = setup::task(&c, tokenizer);
        let eos = setup::stop_ids(&task.tokenizer)[0];
        let mut r = Record {
            id: 3,
            prompt: Prompt::Text("12+7".into()),
            answer: Some("19".into()),
            chosen: Some(Prompt::Text("19".into())),
            rejected: Some(Prompt::Text("18".into())),
            metadata: serde_json::Map::from_iter([("expression".to_string(), "12+7".into())]),
        };
        let p = &tokenize(&task, std::slice::from_ref(&r)).unwrap()[0];
        assert_eq!(p.prompt, task.prompt_ids(&r).unwrap());
        assert_eq!(p.chosen.last(), Some(&eos));
        assert_eq!(p.chosen.len(), 3);
        r.metadata.insert("rejected_stop".into(), false.into());
        let p = &tokenize(&task, std::slice::from_ref(&r)).unwrap()[0];
        assert_eq!(p.rejected, task.tokenizer.encode("18", false).unwrap());
        r.rejected = None;
        let e = tokenize(&task, &[r]).unwrap_err();
        assert!(format!("{e:#}").contains("no rejected completion"), "{e:#}");
    }
}
