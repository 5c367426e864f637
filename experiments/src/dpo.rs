//! The preference stage of a run (`algorithm.name = "dpo"` or `"kto"`): preference pairs (DPO)
//! or unpaired examples (KTO) from a file, or built from the warm-started model's own samples
//! judged by the verifier; reference log-probs computed once; the DPO-family or KTO loss; the
//! same metrics, evaluation and checkpoint files as the RL stage.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::Context;
use datasets::record::Prompt;
use datasets::Record;
use learner::checkpoint::{self, TrainerState};
use learner::dpo::{dpo_step, DpoConfig, DpoLoss, Pair};
use learner::kto::{kto_step, Example};
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
/// whose completions all score the same give no pair. For KTO every sample is an example of its
/// own: desirable (`chosen`) where the verifier judged it correct, undesirable (`rejected`)
/// otherwise. Each record keeps its prompt record's fields, so the prompt renders as it did.
/// The groups are generated as the rollout workers batch theirs (`rollout.groups_per_batch`),
/// each from its own sampling streams, so the records do not depend on the batching. None when
/// `stop` (Ctrl-C, SIGTERM) came first.
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
        greedy_baseline: false,
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
                Ok(samples) if c.algorithm.name == "kto" => {
                    out.extend(samples.iter().map(|s| unpaired(record, s)))
                }
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

/// A sample as an unpaired example: its completion as `chosen` where the verifier judged it
/// correct (its reward part `correct`), as `rejected` otherwise, with the prompt record's fields.
fn unpaired(record: &Record, sample: &Sample) -> Record {
    let correct = sample
        .reward_parts
        .iter()
        .any(|(name, v)| name == "correct" && *v >= 0.5);
    let side = if correct { "chosen" } else { "rejected" };
    let mut metadata = record.metadata.clone();
    metadata.insert(format!("{side}_reward"), sample.reward.into());
    metadata.insert(
        format!("{side}_stop"),
        (sample.finish == Finish::Stop).into(),
    );
    let completion = Some(Prompt::Text(sample.completion_text.clone()));
    Record {
        id: record.id,
        prompt: record.prompt.clone(),
        answer: record.answer.clone(),
        chosen: if correct { completion.clone() } else { None },
        rejected: if correct { None } else { completion },
        metadata,
    }
}

/// Tokenized pairs: the prompt as the task renders it, each completion's text and its
/// end-of-sequence token (unless the record says the sample was cut at the length limit).
pub fn tokenize(task: &Task, records: &[Record]) -> anyhow::Result<Vec<Pair>> {
    let mut pairs = Vec::with_capacity(records.len());
    for r in records {
        let pair = (|| -> anyhow::Result<Pair> {
            Ok(Pair {
                prompt: task.prompt_ids(r)?,
                chosen: completion_ids(task, r, &r.chosen, "chosen")?,
                rejected: completion_ids(task, r, &r.rejected, "rejected")?,
            })
        })()
        .with_context(|| format!("preference record {}", r.id))?;
        pairs.push(pair);
    }
    Ok(pairs)
}

/// Tokenized unpaired examples (KTO): a record's `chosen` completion is a desirable example, its
/// `rejected` one an undesirable example (a pair gives both), each given another example's
/// completion for KTO's KL estimate ([`learner::kto::mismatched`], seeded by `seed`).
pub fn tokenize_unpaired(
    task: &Task,
    records: &[Record],
    seed: u64,
) -> anyhow::Result<Vec<Example>> {
    let mut items = Vec::with_capacity(records.len());
    for r in records {
        let prompt = task
            .prompt_ids(r)
            .with_context(|| format!("preference record {}", r.id))?;
        for (p, what, desirable) in [
            (&r.chosen, "chosen", true),
            (&r.rejected, "rejected", false),
        ] {
            if p.is_some() {
                let ids = completion_ids(task, r, p, what)
                    .with_context(|| format!("preference record {}", r.id))?;
                items.push((prompt.clone(), ids, desirable));
            }
        }
    }
    Ok(learner::kto::mismatched(items, seed))
}

/// A record's `chosen` or `rejected` completion (`what`), tokenized: its text (a conversation's
/// assistant turns) and its end-of-sequence token, unless the record says the sample was cut at
/// the length limit (`{what}_stop` false).
fn completion_ids(
    task: &Task,
    r: &Record,
    p: &Option<Prompt>,
    what: &str,
) -> anyhow::Result<Vec<u32>> {
    let text = match p {
        Some(Prompt::Text(t)) => t.clone(),
        Some(Prompt::Messages(m)) => m
            .iter()
            .filter(|m| m.role == "assistant")
            .map(|m| m.content.clone())
            .collect::<Vec<_>>()
            .join(""),
        None => anyhow::bail!("no {what} completion"),
    };
    let mut ids = task.tokenizer.encode(&text, false)?;
    let stopped = r
        .metadata
        .get(&format!("{what}_stop"))
        .and_then(serde_json::Value::as_bool)
        .unwrap_or(true);
    if stopped {
        ids.extend(setup::stop_ids(&task.tokenizer).first());
    }
    anyhow::ensure!(!ids.is_empty(), "an empty {what} completion");
    Ok(ids)
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

/// What the preference stage trains on, with the reference model's summed log-probs of it
/// (computed once, before training).
pub enum Preferences {
    /// DPO's pairs, and the reference's (chosen, rejected) log-probs.
    Pairs(Vec<Pair>, Vec<(f32, f32)>),
    /// KTO's examples, and the reference's (completion, mismatched completion) log-probs.
    Examples(Vec<Example>, Vec<(f32, f32)>),
}

impl Preferences {
    pub fn len(&self) -> usize {
        match self {
            Preferences::Pairs(p, _) => p.len(),
            Preferences::Examples(e, _) => e.len(),
        }
    }
}

/// The items at `idx`, in its order.
fn picked<T: Clone>(items: &[T], idx: &[usize]) -> Vec<T> {
    idx.iter().map(|&i| items[i].clone()).collect()
}

/// Preference optimizer steps (DPO or KTO) from `state.step` to `run.steps`, or until `stop`
/// (Ctrl-C, SIGTERM) is set; one metrics row per step.
#[allow(clippy::too_many_arguments)]
pub fn dpo_stage(
    c: &Config,
    policy: &Weights,
    opt: &mut AdamW,
    data: &Preferences,
    mut state: TrainerState,
    metrics: &mut StepTable,
    on_step: &mut dyn FnMut(&TrainerState, &AdamW) -> anyhow::Result<()>,
    stop: &AtomicBool,
    top: &mut Option<StepTop>,
) -> anyhow::Result<TrainerState> {
    anyhow::ensure!(data.len() > 0, "no preference data to train on");
    let a = &c.algorithm;
    let dpo = DpoConfig {
        loss: a.dpo_loss,
        beta: a.dpo_beta,
        label_smoothing: a.label_smoothing,
        simpo_gamma: a.simpo_gamma,
        discopop_tau: a.discopop_tau,
        rpo_alpha: a.rpo_alpha,
    };
    let kto = c.kto();
    let budget = c.optimizer.micro_batch_tokens;
    // BCO-pair's running mean, carried across checkpoints
    let mut bco = state.bco_reward_mean.unwrap_or_default();
    let start = Instant::now();
    while state.step < c.run.steps && !stop.load(Ordering::SeqCst) {
        *top = Some(StepTop {
            state: state.clone(),
            optimizer_steps: opt.steps(),
        });
        let t0 = Instant::now();
        let idx = step_pairs(data.len(), a.dpo_pairs_per_step, c.run.seed, state.step);
        let lr = c.lr_at(c.optimizer.lr, state.step);
        crate::failpoint::check("dpo-step", state.step)?;
        let (mut row, skipped, retries, counted) = match data {
            Preferences::Pairs(pairs, reference) => {
                let (batch, refs) = (picked(pairs, &idx), picked(reference, &idx));
                let m = dpo_step(policy, opt, &batch, &refs, &dpo, &mut bco, budget, lr)?;
                let bco_delta = match dpo.loss {
                    DpoLoss::BcoPair => {
                        state.bco_reward_mean = Some(bco);
                        bco.mean
                    }
                    _ => f64::NAN,
                };
                let row = vec![
                    ("loss".to_string(), m.loss),
                    ("reward_accuracy".into(), m.reward_accuracy),
                    ("reward_margin".into(), m.margin),
                    ("chosen_reward".into(), m.chosen_reward),
                    ("rejected_reward".into(), m.rejected_reward),
                    ("grad_norm".into(), m.grad_norm),
                    ("bco_delta".into(), bco_delta),
                ];
                (row, m.skipped, m.memory_retries, "pairs")
            }
            Preferences::Examples(examples, reference) => {
                let (batch, refs) = (picked(examples, &idx), picked(reference, &idx));
                let m = kto_step(policy, opt, &batch, &refs, &kto, budget, lr)?;
                let row = vec![
                    ("loss".to_string(), m.loss),
                    ("kl".into(), m.kl),
                    ("reward_margin".into(), m.chosen_reward - m.rejected_reward),
                    ("chosen_reward".into(), m.chosen_reward),
                    ("rejected_reward".into(), m.rejected_reward),
                    (
                        "desirable_frac".into(),
                        m.desirable as f64 / batch.len() as f64,
                    ),
                    ("grad_norm".into(), m.grad_norm),
                ];
                (row, m.skipped, m.memory_retries, "examples")
            }
        };
        if skipped {
            tracing::warn!(
                step = state.step,
                "non-finite {} loss or gradient: step skipped",
                a.name
            );
        }
        crate::run::warn_memory_retries(state.step, retries, opt.fit());
        state.step += 1;
        state.policy_version += 1;
        state.samples_seen += idx.len() as u64;
        row.extend([
            ("lr".into(), lr),
            ("skipped".into(), f64::from(u8::from(skipped))),
            ("memory_retries".into(), retries as f64),
        ]);
        row.extend(crate::run::loss_scale_columns(opt));
        row.extend([
            (counted.into(), state.samples_seen as f64),
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
            loss = row[0].1,
            margin = row
                .iter()
                .find(|r| r.0 == "reward_margin")
                .map_or(f64::NAN, |r| r.1),
            "{}",
            a.name
        );
    }
    Ok(state)
}

/// The preference data of a run: `algorithm.preferences`, or the records this run built (and
/// saved in its directory) from the warm-started policy `start`, tokenized as the algorithm
/// trains on them, with `start`'s (the reference's) log-probs of them. None when a stop (Ctrl-C,
/// SIGTERM) came while it built them: nothing is saved, and `--resume` builds them again.
pub fn preferences(
    c: &Config,
    dir: &Path,
    start: &Weights,
    task: &Task,
    feed: &mut Feed,
    stop: &AtomicBool,
) -> anyhow::Result<Option<Preferences>> {
    let kto = c.algorithm.name == "kto";
    let read = |path: &str| match kto {
        true => setup::unpaired_records(c, path),
        false => setup::preference_records(c, path),
    };
    let records = if !c.algorithm.preferences.is_empty() {
        read(&c.algorithm.preferences)?
    } else {
        let path = dir.join(PREFERENCES_FILE);
        if path.is_file() {
            read(path.to_str().context("a UTF-8 path")?)?
        } else {
            let t = Instant::now();
            let Some(records) = build_preferences(c, start, task, feed, stop)? else {
                return Ok(None);
            };
            datasets::jsonl::write(&path, &records)?;
            tracing::info!(
                records = records.len(),
                prompts = c.algorithm.preference_prompts,
                seconds = t.elapsed().as_secs_f64(),
                path = %path.display(),
                "preference data built from the model's own samples"
            );
            records
        }
    };
    let t = Instant::now();
    let budget = c.optimizer.micro_batch_tokens;
    let data = if kto {
        let examples = tokenize_unpaired(task, &records, c.run.seed)?;
        anyhow::ensure!(!examples.is_empty(), "no KTO examples");
        warn_imbalance(c, &examples);
        let cfg = c.kto();
        let reference = learner::kto::reference_logprobs(start, &examples, cfg.uses_kl(), budget)?;
        Preferences::Examples(examples, reference)
    } else {
        let pairs = tokenize(task, &records)?;
        anyhow::ensure!(!pairs.is_empty(), "no preference pairs");
        let reference = match c.algorithm.dpo_loss.reference_free() {
            true => vec![(0.0, 0.0); pairs.len()],
            false => learner::dpo::reference_logprobs(start, &pairs, budget)?,
        };
        Preferences::Pairs(pairs, reference)
    };
    tracing::info!(
        items = data.len(),
        seconds = t.elapsed().as_secs_f64(),
        "reference log-probs cached"
    );
    Ok(Some(data))
}

/// TRL's advice for KTO's class balance: `desirable_weight·n_D / (undesirable_weight·n_U)`
/// within [1, 4/3]; a warning naming the weight that would bring it there otherwise.
fn warn_imbalance(c: &Config, examples: &[Example]) {
    let d = examples.iter().filter(|e| e.desirable).count() as f64;
    let u = examples.len() as f64 - d;
    if d == 0.0 || u == 0.0 {
        tracing::warn!(
            desirable = d,
            undesirable = u,
            "KTO's examples are all of one kind: no weight balances them, and the other kind's \
             loss never counts"
        );
        return;
    }
    let (wd, wu) = (c.algorithm.desirable_weight, c.algorithm.undesirable_weight);
    let ratio = wd * d / (wu * u);
    if !(1.0..=4.0 / 3.0).contains(&ratio) {
        tracing::warn!(
            desirable = d,
            undesirable = u,
            ratio,
            "KTO's weighted desirable : undesirable ratio is outside TRL's advised [1, 4/3]; \
             algorithm.desirable_weight = {:.3} would make it 1",
            wu * u / d.max(1.0)
        );
    }
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
            let task = setup::task(&c, tokenizer).unwrap();
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
        let task = setup::task(&c, tokenizer).unwrap();
        let mut feed = Feed::new(setup::train_loader(&c).unwrap(), Default::default());
        let stopped = build_preferences(&c, &w, &task, &mut feed, &AtomicBool::new(true));
        assert!(stopped.unwrap().is_none());
    }

    #[test]
    fn pairs_keep_their_end_of_sequence_unless_cut() {
        let c = Config::default();
        let (_, tokenizer) = setup::load_model(&c).unwrap();
        let task = setup::task(&c, tokenizer).unwrap();
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
