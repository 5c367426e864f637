//! `ferrite run --dry-run`: everything a run reads, checked in seconds before hours are spent —
//! the config, the model and tokenizer, the teacher, the data sources (malformed rows counted),
//! the rendered prompts and their length against the model's context, and the reward: each
//! record's reference completion (`sft.completion_template`) goes through the verifier, so a
//! reward that would score right answers 0 (a wrong answer field, reward kind or template) shows
//! before the run. Nothing is trained and no run directory is written; the problems found end it
//! with an error that lists them.

use anyhow::bail;

use crate::config::Config;
use crate::setup;

/// Records whose prompts and reference completions are checked.
const CHECKED: usize = 256;

/// Runs the checks, printing a line per subject; returns the problems found.
pub fn dry_run(c: &Config) -> anyhow::Result<Vec<String>> {
    let mut problems = Vec::new();
    let a = &c.algorithm;
    let r = &c.rollout;
    println!("ferrite dry run: nothing is trained and no run directory is written");
    println!(
        "config     valid: {} for {} steps, {} prompts × {} samples a step, lr {}",
        a.name, c.run.steps, r.prompts_per_step, r.group_size, c.optimizer.lr
    );
    let (device, dtype) = setup::placement(c)?;
    let (weights, tokenizer) = setup::load_model(c)?;
    let m = &weights.config;
    let parameters = m.num_parameters();
    println!(
        "model      {}: {} layers, hidden {}, vocabulary {}, {parameters} parameters, {} \
         positions; {}, {}",
        c.model.path,
        m.num_hidden_layers,
        m.hidden_size,
        m.vocab_size,
        m.max_position_embeddings,
        format!("{device:?}").to_lowercase(),
        format!("{dtype:?}").to_lowercase()
    );
    println!(
        "tokenizer  {} tokens, end of sequence {:?}, chat template: {}",
        tokenizer.vocab_size(),
        tokenizer.eos_token().unwrap_or("none"),
        if tokenizer.chat_template().is_some() {
            "yes"
        } else {
            "none (the prompt as it is)"
        }
    );
    if let Some(t) = setup::load_teacher(c, &tokenizer, m.vocab_size, None)? {
        let t = &t.config;
        println!(
            "teacher    {}: {} layers, hidden {}, {} parameters, the student's tokenizer",
            c.distill.teacher,
            t.num_hidden_layers,
            t.hidden_size,
            t.num_parameters()
        );
    }
    let task = setup::task(c, tokenizer)?;
    let mut loader = setup::train_loader(c)?;
    let (size, per_epoch) = source_size(loader.source());
    println!("train      {}: {size}", c.data.train);
    let records = loader.take(per_epoch.map_or(CHECKED, |n| n.min(CHECKED as u64) as usize))?;
    let eval = setup::eval_records(c)?;
    println!(
        "eval       {} held-out records ({})",
        eval.len(),
        if c.data.eval.is_empty() {
            &c.data.train
        } else {
            &c.data.eval
        }
    );
    if eval.is_empty() {
        problems.push("the held-out split is empty: set data.eval or data.test_fraction".into());
    }
    let Some(first) = records.first() else {
        bail!("data.train = {}: no records", c.data.train);
    };
    let text = task
        .tokenizer
        .apply_chat_template(&task.messages(first)?, true)?;
    let ids = task.prompt_ids(first)?;
    println!(
        "prompt     record {} as the model sees it ({} tokens): {:?}",
        first.id,
        ids.len(),
        shortened(&text, 400)
    );
    let mut lengths = Vec::with_capacity(records.len());
    for rec in &records {
        lengths.push(task.prompt_ids(rec)?.len());
    }
    let (shortest, longest) = (
        lengths.iter().copied().min().unwrap_or(0),
        lengths.iter().copied().max().unwrap_or(0),
    );
    let need = longest + r.max_new_tokens;
    println!(
        "prompts    {} records: {shortest}–{longest} tokens, + max_new_tokens {} = {need} of \
         the model's {} positions",
        records.len(),
        r.max_new_tokens,
        m.max_position_embeddings
    );
    if need > m.max_position_embeddings {
        problems.push(format!(
            "the longest prompt ({longest} tokens) and rollout.max_new_tokens ({}) need {need} \
             positions, past the model's {}",
            r.max_new_tokens, m.max_position_embeddings
        ));
    }
    problems.extend(reference_rewards(c, &task, &records)?);
    Ok(problems)
}

/// The reference completions of `records` through the reward: prints their statistics and
/// returns the problems they show.
fn reference_rewards(
    c: &Config,
    task: &rollout::task::Task,
    records: &[datasets::Record],
) -> anyhow::Result<Vec<String>> {
    let mut problems = Vec::new();
    let (mut no_gold, mut correct, mut wrong, mut failed, mut sum) = (0, 0, 0, 0, 0.0);
    let mut first_failure = None;
    let mut first_wrong = None;
    for rec in records {
        let reference = task.reference(rec);
        // an external program judges by the record itself
        let gold_less = matches!(reference.gold, rewards::compose::Gold::None) && !task.external();
        let completion = rollout::task::fill_template(&c.sft.completion_template, rec)?;
        let tokens = task.tokenizer.encode(&completion, false)?.len();
        if gold_less {
            no_gold += 1;
            continue; // the reward has nothing to compare with
        }
        let s = task.score(&completion, tokens, &reference);
        sum += f64::from(s.total);
        match s.correct {
            Some(true) => correct += 1,
            Some(false) => {
                wrong += 1;
                first_wrong.get_or_insert_with(|| (rec.id, completion.clone()));
            }
            None => {}
        }
        if let Some((part, why)) = s.failures.first() {
            failed += 1;
            first_failure.get_or_insert_with(|| format!("{part}: {why}"));
        }
    }
    let n = records.len();
    println!(
        "reward     the reference completions (sft.completion_template {:?}) of {n} records: \
         mean reward {:.3}, {correct} right, {wrong} wrong, {failed} failed, {no_gold} without \
         a gold answer",
        c.sft.completion_template,
        sum / n.max(1) as f64
    );
    if no_gold > 0 {
        problems.push(format!(
            "{no_gold} of {n} records have no gold answer the reward can use (name the answer's \
             field with data.answer_field, or check reward.parts' kind)"
        ));
    }
    if let Some((id, completion)) = first_wrong {
        problems.push(format!(
            "{wrong} of {n} reference completions score as wrong, e.g. record {id}: {:?} (check \
             sft.completion_template, data.answer_field and reward.parts' kind)",
            shortened(&completion, 200)
        ));
    }
    if let Some(f) = first_failure {
        problems.push(format!(
            "{failed} of {n} reference completions failed to score: {f}"
        ));
    }
    Ok(problems)
}

/// "N records in the train split, M of T rows malformed and skipped" for a file, "generated"
/// for a built-in source; and the records of an epoch (None: unlimited).
fn source_size(source: &datasets::order::Source) -> (String, Option<u64>) {
    let per_epoch = source.records_per_epoch();
    let text = match (per_epoch, source.report()) {
        (Some(n), Some(report)) => format!(
            "{n} records in the train split; {} of {} rows malformed and skipped",
            report.bad_rows, report.total_rows
        ),
        (Some(n), None) => format!("{n} records in the train split"),
        (None, _) => "generated, unlimited".into(),
    };
    (text, per_epoch)
}

/// `text` cut to `max` characters, with an ellipsis when cut.
fn shortened(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_string(),
    }
}
