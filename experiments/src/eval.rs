//! Held-out evaluation: greedy accuracy, and pass@1 / pass@k from `k` samples per prompt at the
//! rollout temperature (the unbiased estimator of Chen et al. 2021 with n = k), and for math
//! answers maj@k (verl's maj@N: the majority answer of the k samples, right or not).

use model::generate::{generate_continuous, GenerationConfig};
use model::sampling::SamplingParams;
use model::Weights;
use rollout::task::Task;

use datasets::Record;

#[derive(Debug, Clone, PartialEq, Default)]
pub struct EvalResult {
    pub greedy_accuracy: f64,
    pub pass_at_1: f64,
    pub pass_at_k: f64,
    /// maj@k: the share of prompts whose k samples' majority answer
    /// ([`rewards::math::majority`]) is right; None where the task's answers are not math
    /// answers (a countdown expression or a knights-and-knaves assignment is not voted on).
    pub maj_at_k: Option<f64>,
    pub k: usize,
    pub reward_mean: f64,
    pub length_mean: f64,
    pub prompts: usize,
}

impl EvalResult {
    /// The `eval.parquet` row (pass@1 and pass@k only when samples were drawn).
    pub fn row(&self) -> Vec<(String, f64)> {
        let mut row = vec![("greedy_accuracy".into(), self.greedy_accuracy)];
        if self.k > 0 {
            row.push(("pass@1".into(), self.pass_at_1));
            row.push((format!("pass@{}", self.k), self.pass_at_k));
            if let Some(m) = self.maj_at_k {
                row.push((format!("maj@{}", self.k), m));
            }
        }
        row.push(("reward_mean".into(), self.reward_mean));
        row.push(("length_mean".into(), self.length_mean));
        row
    }
}

/// One completion's score.
#[derive(Debug, Clone, Default)]
struct Scored {
    reward: f32,
    correct: bool,
    tokens: usize,
    /// The answer extracted from it, for a math answer (None: none found, or not math).
    answer: Option<String>,
}

/// Scores of every completion, `n` per record, generated with continuous batching in `slots`
/// rows (a finished sequence's row takes the next prompt).
fn sample(
    w: &Weights,
    task: &Task,
    records: &[Record],
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
    n: usize,
    slots: usize,
) -> anyhow::Result<Vec<Scored>> {
    let expanded: Vec<Vec<u32>> = prompts
        .iter()
        .flat_map(|p| std::iter::repeat_n(p.clone(), n))
        .collect();
    let mut out = vec![Scored::default(); expanded.len()];
    generate_continuous(
        w,
        &expanded,
        cfg,
        Some(&task.tokenizer),
        slots,
        |k, comp| {
            let text = comp.text.as_deref().unwrap_or_default();
            let reference = task.reference(&records[k / n]);
            let s = task.score(text, comp.tokens.len(), &reference);
            let answer = match reference.gold {
                rewards::Gold::Math(_) => {
                    rewards::math::extract::extract_answer(text).map(|e| e.answer)
                }
                _ => None,
            };
            out[k] = Scored {
                reward: s.total,
                correct: s.correct == Some(true),
                tokens: comp.tokens.len(),
                answer,
            };
            Ok(())
        },
    )?;
    Ok(out)
}

/// Evaluates detached weights `w` on `records`; `k` sampled completions per prompt (0: greedy
/// only). `seed` fixes the samples.
pub fn evaluate(
    w: &Weights,
    task: &Task,
    records: &[Record],
    generation: &GenerationConfig,
    k: usize,
    seed: u64,
    slots: usize,
) -> anyhow::Result<EvalResult> {
    let prompts = records
        .iter()
        .map(|r| task.prompt_ids(r))
        .collect::<Result<Vec<_>, _>>()?;
    let n = records.len().max(1) as f64;
    let greedy_cfg = GenerationConfig {
        sampling: SamplingParams::greedy(),
        seed,
        ..generation.clone()
    };
    let greedy = sample(w, task, records, &prompts, &greedy_cfg, 1, slots)?;
    let mut r = EvalResult {
        greedy_accuracy: greedy.iter().filter(|g| g.correct).count() as f64 / n,
        reward_mean: greedy.iter().map(|g| f64::from(g.reward)).sum::<f64>() / n,
        length_mean: greedy.iter().map(|g| g.tokens as f64).sum::<f64>() / n,
        prompts: records.len(),
        k,
        ..Default::default()
    };
    if k > 0 {
        let sampled_cfg = GenerationConfig {
            seed,
            ..generation.clone()
        };
        let s = sample(w, task, records, &prompts, &sampled_cfg, k, slots)?;
        let per_prompt: Vec<usize> = s
            .chunks(k)
            .map(|c| c.iter().filter(|x| x.correct).count())
            .collect();
        r.pass_at_1 = per_prompt.iter().map(|&c| c as f64 / k as f64).sum::<f64>() / n;
        r.pass_at_k = per_prompt.iter().filter(|&&c| c > 0).count() as f64 / n;
        let math = records
            .iter()
            .all(|rec| matches!(task.gold(rec), rewards::Gold::Math(_)));
        r.maj_at_k = math.then(|| maj_at_k(&s, k) / n);
    }
    Ok(r)
}

/// The prompts (each `k` consecutive scores) whose majority answer is right: the vote's winner
/// ([`rewards::math::majority`]) is right when its completion was scored right.
fn maj_at_k(scores: &[Scored], k: usize) -> f64 {
    scores
        .chunks(k)
        .filter(|c| {
            let answers: Vec<Option<&str>> = c.iter().map(|s| s.answer.as_deref()).collect();
            rewards::math::majority(&answers).is_some_and(|i| c[i].correct)
        })
        .count() as f64
}

/// Evaluates a checkpoint directory on the config's held-out split.
pub fn evaluate_checkpoint(
    c: &crate::config::Config,
    checkpoint: &std::path::Path,
) -> anyhow::Result<EvalResult> {
    use crate::setup;
    let w = setup::load_weights(c, checkpoint)?;
    let tokenizer = model::tokenizer::Tokenizer::from_dir(checkpoint)?;
    let task = setup::task(c, tokenizer)?;
    let records = setup::eval_records(c)?;
    let generation = setup::generation(c, &task.tokenizer);
    evaluate(
        &w,
        &task,
        &records,
        &generation,
        c.data.eval_samples,
        datasets::rng::mix(c.run.seed, 0xE7A1, 0),
        c.data.eval_batch,
    )
}

#[cfg(test)]
mod tests {
    use super::{maj_at_k, Scored};

    #[test]
    fn a_prompt_counts_when_its_majority_answer_was_scored_right() {
        let s = |answer: Option<&str>, correct: bool| Scored {
            correct,
            answer: answer.map(str::to_string),
            ..Default::default()
        };
        let scores = [
            // 0.5 and 1/2 outvote 3, and were right
            s(Some("3"), false),
            s(Some("0.5"), true),
            s(Some("1/2"), true),
            // a right answer outvoted: not counted
            s(Some("9"), true),
            s(Some("8"), false),
            s(Some("8"), false),
            // no answer at all
            s(None, false),
            s(None, false),
            s(None, false),
        ];
        assert_eq!(maj_at_k(&scores, 3), 1.0);
    }
}
