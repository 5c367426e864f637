//! A reward as a weighted sum of named parts, every part recorded.
//!
//! A part that panics (which no verifier of this crate should) is caught, scored 0 and recorded
//! as failed, so one bad completion never takes a rollout worker down.

use std::sync::Arc;

use crate::command::Command;
use crate::knights::Role;
use crate::{countdown, format, knights, math};

/// What a verifier needs to know about the right answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Gold {
    /// A math answer (bare, a GSM8K `####` solution, or a MATH `\boxed{}` solution).
    Math(String),
    Countdown {
        target: i64,
        nums: Vec<i64>,
    },
    KnightsKnaves(Vec<(String, Role)>),
    None,
}

#[derive(Debug, Clone, PartialEq)]
pub enum PartKind {
    /// 1 if the final answer is equivalent to the gold answer, else 0.
    MathAnswer,
    /// TinyZero's 1.0 / 0.1 / 0.0.
    Countdown,
    /// Logic-RL's 3 / −0.5 / −1 / −3. `think_in_prompt`: the prompt ends with `<think>`.
    KnightsKnaves { think_in_prompt: bool },
    /// 1 for `<think>…</think><answer>…</answer>`, else 0.
    TagFormat { think_in_prompt: bool },
    /// Partial credit for a numeric answer: the share of the gold answer's characters the
    /// extracted answer matches, aligned from the right (units with units), over the longer of
    /// the two. 1 exactly when the strings are equal.
    DigitMatch,
    /// DAPO's soft overlong penalty (0 to −1) on the completion's token count.
    Overlong {
        max_tokens: usize,
        cache_tokens: usize,
    },
    /// Open-R1's cosine-scaled reward ([`format::cosine_scaled`]): the task's correctness (a math,
    /// countdown or knights-and-knaves gold answer, judged as those parts judge it) scaled by the
    /// completion's length in characters.
    Cosine {
        rewards: format::CosineRewards,
        think_in_prompt: bool,
    },
    /// Open-R1's n-gram repetition penalty ([`format::repetition_penalty`], 0 to `max_penalty`).
    Repetition { ngram_size: usize, max_penalty: f64 },
    /// An external program's reward ([`crate::command`]): the completion and the record's
    /// context go to it as one JSON line, its answer comes back as one.
    Command(Arc<Command>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Part {
    pub name: String,
    pub kind: PartKind,
    pub weight: f32,
}

/// A completion to score.
#[derive(Debug, Clone, Copy)]
pub struct Sample<'a> {
    pub completion: &'a str,
    pub completion_tokens: usize,
    pub gold: &'a Gold,
    /// The record as one JSON object (its `prompt`, `answer` and `metadata`) for an external
    /// program ([`PartKind::Command`]); `{}` where there is none.
    pub context: &'a str,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    /// Σ weight · part.
    pub total: f32,
    /// Each part's unweighted value, by name.
    pub parts: Vec<(String, f32)>,
    /// Whether the task's answer was right (from the first task part), for accuracy.
    pub correct: Option<bool>,
    /// Parts that failed (a panic, or a gold answer of the wrong kind), with the reason.
    pub failures: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct RewardSpec {
    pub parts: Vec<Part>,
}

impl RewardSpec {
    pub fn score(&self, s: &Sample) -> Scored {
        let mut out = Scored {
            total: 0.0,
            parts: Vec::with_capacity(self.parts.len()),
            correct: None,
            failures: Vec::new(),
        };
        for part in &self.parts {
            let result = std::panic::catch_unwind(|| score_part(&part.kind, s));
            let (value, correct) = match result {
                Ok(Ok(v)) => v,
                Ok(Err(why)) => {
                    out.failures.push((part.name.clone(), why));
                    (0.0, None)
                }
                Err(_) => {
                    out.failures
                        .push((part.name.clone(), "the verifier panicked".into()));
                    (0.0, None)
                }
            };
            if out.correct.is_none() {
                out.correct = correct;
            }
            out.total += part.weight * value;
            out.parts.push((part.name.clone(), value));
        }
        out
    }
}

fn score_part(kind: &PartKind, s: &Sample) -> Result<(f32, Option<bool>), String> {
    let wrong_gold = || Err(format!("gold answer {:?} does not fit this reward", s.gold));
    Ok(match (kind, s.gold) {
        (PartKind::MathAnswer, Gold::Math(gold)) => {
            let v = math::verify(s.completion, gold);
            (f32::from(u8::from(v.correct)), Some(v.correct))
        }
        (PartKind::Countdown, Gold::Countdown { target, nums }) => {
            let r = countdown::score(s.completion, *target, nums).reward;
            (r, Some(r == countdown::CORRECT))
        }
        (PartKind::KnightsKnaves { think_in_prompt }, Gold::KnightsKnaves(solution)) => {
            let text = with_think(s.completion, *think_in_prompt);
            let r = knights::score(&text, solution).reward;
            (r, Some(r == knights::CORRECT))
        }
        (PartKind::DigitMatch, Gold::Math(gold)) => {
            (crate::math::digit_match(s.completion, gold), None)
        }
        (PartKind::TagFormat { think_in_prompt }, _) => {
            (format::tag_format(s.completion, *think_in_prompt), None)
        }
        (
            PartKind::Overlong {
                max_tokens,
                cache_tokens,
            },
            _,
        ) => (
            format::overlong_penalty(s.completion_tokens, *max_tokens, *cache_tokens),
            None,
        ),
        (
            PartKind::Cosine {
                rewards,
                think_in_prompt,
            },
            gold,
        ) => {
            let correct = match gold {
                Gold::Math(g) => math::verify(s.completion, g).correct,
                Gold::Countdown { target, nums } => {
                    countdown::score(s.completion, *target, nums).reward == countdown::CORRECT
                }
                Gold::KnightsKnaves(solution) => {
                    let text = with_think(s.completion, *think_in_prompt);
                    knights::score(&text, solution).reward == knights::CORRECT
                }
                Gold::None => return wrong_gold(),
            };
            let chars = s.completion.chars().count();
            (
                format::cosine_scaled(chars, correct, rewards),
                Some(correct),
            )
        }
        (
            PartKind::Repetition {
                ngram_size,
                max_penalty,
            },
            _,
        ) => (
            format::repetition_penalty(s.completion, *ngram_size, *max_penalty),
            None,
        ),
        (PartKind::Command(program), _) => program.score(&request(s))?,
        _ => return wrong_gold(),
    })
}

/// The request line of an external program: the completion, its length in tokens and the
/// fields of the sample's context, as one JSON object.
pub fn request(s: &Sample) -> String {
    let completion = serde_json::Value::from(s.completion);
    let head = format!(
        "{{\"completion\":{completion},\"completion_tokens\":{}",
        s.completion_tokens
    );
    match s.context.trim().strip_prefix('{').map(str::trim_start) {
        Some(rest) if rest != "}" && !rest.is_empty() => format!("{head},{rest}"),
        _ => format!("{head}}}"),
    }
}

/// The completion as the knights-and-knaves verifier reads it: after the `<think>` the prompt
/// ends with, when it does.
fn with_think(completion: &str, think_in_prompt: bool) -> String {
    if think_in_prompt {
        format!("<think>{completion}")
    } else {
        completion.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_external_programs_request_is_the_completion_and_the_context_in_one_object() {
        let gold = Gold::None;
        let s = |completion, context| Sample {
            completion,
            completion_tokens: 7,
            gold: &gold,
            context,
        };
        let one = request(&s("a \"b\"\nc", r#"{"prompt":"p","answer":null}"#));
        assert_eq!(
            one,
            r#"{"completion":"a \"b\"\nc","completion_tokens":7,"prompt":"p","answer":null}"#
        );
        for empty in ["{}", " { } ", ""] {
            let bare = request(&s("x", empty));
            assert_eq!(bare, r#"{"completion":"x","completion_tokens":7}"#);
        }
        let parsed: serde_json::Value = serde_json::from_str(&one).unwrap();
        assert_eq!(parsed["completion"], "a \"b\"\nc");
    }

    #[test]
    fn weighted_parts_are_all_recorded() {
        let spec = RewardSpec {
            parts: vec![
                Part {
                    name: "answer".into(),
                    kind: PartKind::MathAnswer,
                    weight: 1.0,
                },
                Part {
                    name: "format".into(),
                    kind: PartKind::TagFormat {
                        think_in_prompt: false,
                    },
                    weight: 0.1,
                },
                Part {
                    name: "overlong".into(),
                    kind: PartKind::Overlong {
                        max_tokens: 100,
                        cache_tokens: 20,
                    },
                    weight: 1.0,
                },
            ],
        };
        let gold = Gold::Math("#### 42".into());
        let s = Sample {
            completion: "<think>6*7</think><answer>42</answer>",
            completion_tokens: 90,
            gold: &gold,
            context: "{}",
        };
        let r = spec.score(&s);
        assert_eq!(
            r.parts,
            vec![
                ("answer".into(), 1.0),
                ("format".into(), 1.0),
                ("overlong".into(), -0.5)
            ]
        );
        assert!((r.total - 0.6).abs() < 1e-6);
        assert_eq!(r.correct, Some(true));
        // a gold answer of the wrong kind is a recorded failure, not a panic
        let wrong = Gold::Countdown {
            target: 1,
            nums: vec![1],
        };
        let r = spec.score(&Sample { gold: &wrong, ..s });
        assert_eq!(r.failures.len(), 1);
        assert_eq!(r.parts[0].1, 0.0);
    }
}
