//! What a rollout worker needs to know about the task: how a record becomes prompt tokens (the
//! chat template, or a template over the record's fields), and how a completion is scored.

use datasets::Record;
use model::tokenizer::{Message, Tokenizer};
use rewards::compose::{Gold, PartKind, RewardSpec, Sample, Scored};
use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error("record {id}: {message}")]
    Record { id: u64, message: String },
    #[error(transparent)]
    Model(#[from] model::ModelError),
}

/// Renders prompts and scores completions.
#[derive(Debug, Clone)]
pub struct Task {
    pub tokenizer: Tokenizer,
    /// When set, the user message is this text with `{prompt}`, `{answer}` and `{field}` (any
    /// metadata field) replaced; otherwise the record's own prompt or messages.
    pub prompt_template: Option<String>,
    /// A system message put first (unless the record brings its own).
    pub system_prompt: Option<String>,
    pub reward: RewardSpec,
}

fn field_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

impl Task {
    /// The chat messages of a record.
    pub fn messages(&self, r: &Record) -> Result<Vec<Message>, TaskError> {
        let mut messages: Vec<Message> = match &self.prompt_template {
            None => r
                .prompt
                .messages()
                .into_iter()
                .map(|m| Message::new(&m.role, &m.content))
                .collect(),
            Some(t) => vec![Message::new("user", &fill_template(t, r)?)],
        };
        if let Some(system) = &self.system_prompt {
            if messages.first().is_none_or(|m| m.role != "system") {
                messages.insert(0, Message::new("system", system));
            }
        }
        Ok(messages)
    }

    /// Prompt token ids: the chat template with the generation prompt, tokenized.
    pub fn prompt_ids(&self, r: &Record) -> Result<Vec<u32>, TaskError> {
        let text = self
            .tokenizer
            .apply_chat_template(&self.messages(r)?, true)?;
        Ok(self.tokenizer.encode(&text, false)?)
    }

    /// The gold answer in the shape the reward's first task part expects (a cosine-scaled part
    /// judges the gold answer of the part before it, and with none, the record's answer as a
    /// math answer, as Open-R1's does).
    pub fn gold(&self, r: &Record) -> Gold {
        let task_part = self.reward.parts.iter().find(|p| {
            matches!(
                p.kind,
                PartKind::MathAnswer
                    | PartKind::DigitMatch
                    | PartKind::Countdown
                    | PartKind::KnightsKnaves { .. }
                    | PartKind::Cosine { .. }
            )
        });
        let Some(part) = task_part else {
            return Gold::None;
        };
        match part.kind {
            PartKind::MathAnswer | PartKind::DigitMatch | PartKind::Cosine { .. } => {
                r.answer.clone().map_or(Gold::None, Gold::Math)
            }
            PartKind::Countdown => {
                let target = r.metadata.get("target").and_then(Value::as_i64);
                let nums = r
                    .metadata
                    .get("nums")
                    .and_then(Value::as_array)
                    .map(|a| a.iter().filter_map(Value::as_i64).collect::<Vec<_>>());
                match (target, nums) {
                    (Some(target), Some(nums)) => Gold::Countdown { target, nums },
                    _ => Gold::None,
                }
            }
            _ => r
                .answer
                .as_deref()
                .and_then(rewards::knights::parse_solution)
                .map_or(Gold::None, Gold::KnightsKnaves),
        }
    }

    /// Whether a reward part is an external program ([`PartKind::Command`]).
    pub fn external(&self) -> bool {
        let parts = &self.reward.parts;
        parts.iter().any(|p| matches!(p.kind, PartKind::Command(_)))
    }

    /// What scoring a record's completions needs: the gold answer ([`Task::gold`]) and, when a
    /// reward part is an external program, the record as the JSON object it receives (`prompt`
    /// as the record gives it, text or messages, `answer`, `metadata`).
    pub fn reference(&self, r: &Record) -> Reference {
        let context = match self.external() {
            true => serde_json::json!({
                "prompt": r.prompt,
                "answer": r.answer,
                "metadata": r.metadata,
            })
            .to_string(),
            false => "{}".into(),
        };
        Reference {
            gold: self.gold(r),
            context,
        }
    }

    pub fn score(
        &self,
        completion: &str,
        completion_tokens: usize,
        reference: &Reference,
    ) -> Scored {
        self.reward.score(&Sample {
            completion,
            completion_tokens,
            gold: &reference.gold,
            context: &reference.context,
        })
    }
}

/// A record's side of scoring ([`Task::reference`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Reference {
    pub gold: Gold,
    /// The record as one JSON object, for external reward programs; `{}` without one.
    pub context: String,
}

/// `template` with `{prompt}` (the last message), `{answer}` and `{field}` (any metadata field)
/// replaced from the record; a field the record lacks is an error that names it.
pub fn fill_template(template: &str, r: &Record) -> Result<String, TaskError> {
    let mut out = String::with_capacity(template.len() + 32);
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let Some(close) = rest[open..].find('}') else {
            out.push_str(&rest[open..]);
            return Ok(out);
        };
        let key = &rest[open + 1..open + close];
        let value = match key {
            "prompt" => r
                .prompt
                .messages()
                .last()
                .map(|m| m.content.clone())
                .unwrap_or_default(),
            "answer" => r.answer.clone().unwrap_or_default(),
            _ => match r.metadata.get(key) {
                Some(v) => field_text(v),
                None => {
                    return Err(TaskError::Record {
                        id: r.id,
                        message: format!(
                            "the prompt template names `{key}`, which the record lacks"
                        ),
                    })
                }
            },
        };
        out.push_str(&value);
        rest = &rest[open + close + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use datasets::generators::{arithmetic::Arithmetic, countdown::Countdown, Generator};
    use rewards::compose::Part;

    fn task(kind: PartKind, template: Option<&str>) -> Task {
        Task {
            tokenizer: model::builtin::char_tokenizer().unwrap(),
            prompt_template: template.map(str::to_string),
            system_prompt: None,
            reward: RewardSpec {
                parts: vec![Part {
                    name: "answer".into(),
                    kind,
                    weight: 1.0,
                }],
            },
        }
    }

    #[test]
    fn templates_fill_from_metadata_and_name_missing_fields() {
        let r = Arithmetic {
            max_digits: 2,
            max_operands: 2,
            operators: vec!['+'],
        }
        .generate(0, 0, 3);
        let t = task(PartKind::MathAnswer, Some("{expression}="));
        let expr = r.metadata["expression"].as_str().unwrap();
        let ids = t.prompt_ids(&r).unwrap();
        let text = t.tokenizer.decode(&ids, false).unwrap();
        assert_eq!(
            text,
            format!("<|im_start|>user\n{expr}=<|im_end|>\n<|im_start|>assistant\n")
        );
        let answer = r.answer.clone().unwrap();
        assert_eq!(t.score(&answer, 3, &t.reference(&r)).total, 1.0);
        let bad = task(PartKind::MathAnswer, Some("{nope}"));
        let e = bad.prompt_ids(&r).unwrap_err().to_string();
        assert!(e.contains("`nope`"), "{e}");
    }

    /// A cosine-scaled part alone judges the record's answer as a math answer.
    #[test]
    fn a_cosine_part_alone_takes_the_math_answer() {
        let r = Arithmetic {
            max_digits: 2,
            max_operands: 2,
            operators: vec!['+'],
        }
        .generate(0, 0, 3);
        let cosine = PartKind::Cosine {
            rewards: rewards::format::CosineRewards::default(),
            think_in_prompt: false,
        };
        let t = task(cosine, None);
        let gold = t.gold(&r);
        assert!(matches!(gold, Gold::Math(_)), "{gold:?}");
        let answer = r.answer.clone().unwrap();
        let s = t.score(&answer, 3, &t.reference(&r));
        assert_eq!(s.correct, Some(true));
        assert!(s.total > 0.99, "{}", s.total);
    }

    #[test]
    fn countdown_gold_comes_from_metadata() {
        let r = Countdown::default().generate(1, 0, 0);
        let t = task(PartKind::Countdown, None);
        let gold = t.gold(&r);
        assert!(matches!(gold, Gold::Countdown { .. }), "{gold:?}");
        let solution = r.metadata["solution"].as_str().unwrap();
        let s = t.score(
            &format!("<answer>{solution}</answer>"),
            10,
            &t.reference(&r),
        );
        assert_eq!(s.correct, Some(true));
    }
}

/// EM-RL's intrinsic rewards (spec §5.7): the verifier's reward is replaced by one, from the sampling policy's own statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum EntropyReward {
    /// The verifier's reward.
    #[default]
    None,
    /// `−Σ_t H(π(·|y_<t))`.
    Token,
    /// `Σ_t log π(y_t|y_<t)`.
    Sequence,
}

impl EntropyReward {
    /// The reward of one completion from its sampled log-probs and per-step entropies.
    pub fn reward(self, logprobs: &[f32], entropies: &[f32]) -> Option<f32> {
        match self {
            EntropyReward::None => None,
            EntropyReward::Token => {
                Some(-entropies.iter().map(|&h| f64::from(h)).sum::<f64>() as f32)
            }
            EntropyReward::Sequence => {
                Some(logprobs.iter().map(|&l| f64::from(l)).sum::<f64>() as f32)
            }
        }
    }
}
