//! Which fields of a row hold the prompt, the answer and a preference pair.
//!
//! Defaults cover the formats users bring: TRL `prompt` (string or messages) and chat
//! `messages`, GSM8K `question` / `answer`, MATH `problem` / `solution`, knights-and-knaves
//! `quiz` / `solution_text_format`, preference `prompt` / `chosen` / `rejected`.

use serde_json::{Map, Value};

use crate::record::{Message, Prompt, Record};

#[derive(Debug, Clone, PartialEq)]
pub struct Fields {
    /// Candidates for the prompt, first present wins.
    pub prompt: Vec<String>,
    /// Candidates for the gold answer (optional in a row).
    pub answer: Vec<String>,
    /// When set, rows must carry `chosen` and `rejected`.
    pub preference: Option<(String, String)>,
    /// With `preference`: a row may instead carry a `completion` and a boolean `label` (TRL's
    /// unpaired preference format: true for a desirable completion), kept as `chosen` or
    /// `rejected` by its label, or only one of `chosen` and `rejected`.
    pub unpaired: bool,
}

impl Default for Fields {
    fn default() -> Self {
        let s = |xs: &[&str]| xs.iter().map(|x| x.to_string()).collect();
        Fields {
            prompt: s(&[
                "prompt",
                "messages",
                "question",
                "problem",
                "quiz",
                "query",
                "instruction",
            ]),
            answer: s(&[
                "answer",
                "solution",
                "solution_text_format",
                "target",
                "ground_truth",
                "label",
            ]),
            preference: None,
            unpaired: false,
        }
    }
}

impl Fields {
    pub fn preference() -> Self {
        Fields {
            preference: Some(("chosen".into(), "rejected".into())),
            ..Fields::default()
        }
    }

    /// Unpaired preference rows (KTO): `completion` and `label`, or `chosen` and / or `rejected`.
    pub fn unpaired() -> Self {
        Fields {
            unpaired: true,
            ..Fields::preference()
        }
    }

    /// Builds a record from one row, or says why the row is unusable.
    pub fn record(&self, id: u64, row: Value) -> Result<Record, String> {
        let Value::Object(mut row) = row else {
            return Err(format!("a row must be a JSON object, found {}", kind(&row)));
        };
        // a numeric `id` field names the record; otherwise its row number does
        let id = match row.get("id").and_then(Value::as_u64) {
            Some(own) => {
                row.remove("id");
                own
            }
            None => id,
        };
        let prompt_key = self
            .prompt
            .iter()
            .find(|k| row.get(k.as_str()).is_some_and(|v| !v.is_null()))
            .cloned()
            .ok_or_else(|| format!("no prompt field (looked for {})", self.prompt.join(", ")))?;
        let prompt = to_prompt(row.remove(&prompt_key).expect("present"))
            .map_err(|e| format!("field `{prompt_key}`: {e}"))?;
        // before the answer: TRL's unpaired `label` is also a name answers go by
        let (chosen, rejected) = match &self.preference {
            None => (None, None),
            Some((c, r)) => {
                let take = |row: &mut Map<String, Value>, k: &str| match row.remove(k) {
                    None | Some(Value::Null) => Ok(None),
                    Some(v) => to_completion(v)
                        .map(Some)
                        .map_err(|e| format!("field `{k}`: {e}")),
                };
                if self.unpaired && row.contains_key("completion") {
                    let completion = take(&mut row, "completion")?;
                    match row.remove("label") {
                        Some(Value::Bool(true)) => (completion, None),
                        Some(Value::Bool(false)) => (None, completion),
                        Some(other) => {
                            return Err(format!(
                                "field `label`: expected a boolean, found {}",
                                kind(&other)
                            ))
                        }
                        None => return Err("a `completion` without a `label` field".into()),
                    }
                } else {
                    let (chosen, rejected) = (take(&mut row, c)?, take(&mut row, r)?);
                    let missing = |k: &str| format!("no `{k}` field");
                    match (&chosen, &rejected, self.unpaired) {
                        (None, None, true) => {
                            return Err(format!(
                                "no `completion` and `label`, `{c}` or `{r}` field"
                            ))
                        }
                        (None, _, false) => return Err(missing(c)),
                        (_, None, false) => return Err(missing(r)),
                        _ => {}
                    }
                    (chosen, rejected)
                }
            }
        };
        let answer = match self
            .answer
            .iter()
            .find(|k| row.get(k.as_str()).is_some_and(|v| !v.is_null()))
        {
            None => None,
            Some(k) => Some(
                to_answer(row.remove(k).expect("present"))
                    .map_err(|e| format!("field `{k}`: {e}"))?,
            ),
        };
        Ok(Record {
            id,
            prompt,
            answer,
            chosen,
            rejected,
            metadata: row,
        })
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A string, or a list of `{role, content}` messages.
fn to_prompt(v: Value) -> Result<Prompt, String> {
    match v {
        Value::String(s) if !s.is_empty() => Ok(Prompt::Text(s)),
        Value::String(_) => Err("empty".into()),
        Value::Array(items) if !items.is_empty() => items
            .into_iter()
            .map(|m| match m {
                Value::Object(mut o) => {
                    let mut field = |k: &str| match o.remove(k) {
                        Some(Value::String(s)) => Ok(s),
                        Some(other) => Err(format!("message `{k}` is {}", kind(&other))),
                        None => Err(format!("message without `{k}`")),
                    };
                    Ok(Message {
                        role: field("role")?,
                        content: field("content")?,
                    })
                }
                other => Err(format!("a message is {}", kind(&other))),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Prompt::Messages),
        other => Err(format!(
            "expected a string or a list of messages, found {}",
            kind(&other)
        )),
    }
}

/// A completion: as a prompt, but it may be empty text (a sample that ended at once, its
/// end-of-sequence token alone).
fn to_completion(v: Value) -> Result<Prompt, String> {
    match v {
        Value::String(s) => Ok(Prompt::Text(s)),
        other => to_prompt(other),
    }
}

/// Answers are kept as text; numbers are written as JSON writes them.
fn to_answer(v: Value) -> Result<String, String> {
    match v {
        Value::String(s) => Ok(s),
        Value::Number(n) => Ok(n.to_string()),
        other => Err(format!(
            "expected a string or a number, found {}",
            kind(&other)
        )),
    }
}

/// Rows of a metadata object, for writers.
pub fn record_to_row(r: &Record) -> Map<String, Value> {
    let mut row = Map::new();
    row.insert("id".into(), Value::from(r.id));
    row.insert(
        "prompt".into(),
        serde_json::to_value(&r.prompt).expect("serializable"),
    );
    if let Some(a) = &r.answer {
        row.insert("answer".into(), Value::from(a.clone()));
    }
    if let Some(c) = &r.chosen {
        row.insert(
            "chosen".into(),
            serde_json::to_value(c).expect("serializable"),
        );
    }
    if let Some(c) = &r.rejected {
        row.insert(
            "rejected".into(),
            serde_json::to_value(c).expect("serializable"),
        );
    }
    for (k, v) in &r.metadata {
        row.insert(k.clone(), v.clone());
    }
    row
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn formats_users_bring() {
        let f = Fields::default();
        let gsm = f
            .record(0, json!({"question": "Q?", "answer": "x\n#### 72"}))
            .unwrap();
        assert_eq!(
            (gsm.prompt, gsm.answer.as_deref()),
            (Prompt::Text("Q?".into()), Some("x\n#### 72"))
        );
        let math = f
            .record(
                1,
                json!({"problem": "P", "solution": "\\boxed{3}", "level": "Level 5"}),
            )
            .unwrap();
        assert_eq!(math.answer.as_deref(), Some("\\boxed{3}"));
        assert_eq!(math.metadata["level"], json!("Level 5"));
        let chat = f
            .record(
                2,
                json!({"prompt": [{"role": "user", "content": "hi"}], "answer": 5}),
            )
            .unwrap();
        assert_eq!(chat.prompt.messages()[0].content, "hi");
        assert_eq!(chat.answer.as_deref(), Some("5"));
        let pref = Fields::preference()
            .record(3, json!({"prompt": "p", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"}))
            .unwrap();
        assert_eq!(pref.rejected, Some(Prompt::Text("b".into())));
        // TRL's unpaired rows: the label says which side the completion is, and is no answer
        let u = Fields::unpaired();
        let good = u
            .record(
                4,
                json!({"prompt": "p", "completion": "c", "label": true, "answer": 3}),
            )
            .unwrap();
        assert_eq!(
            (good.chosen, good.rejected),
            (Some(Prompt::Text("c".into())), None)
        );
        assert_eq!(good.answer.as_deref(), Some("3"));
        let bad = u
            .record(5, json!({"prompt": "p", "completion": "c", "label": false}))
            .unwrap();
        assert_eq!(
            (bad.chosen, bad.rejected),
            (None, Some(Prompt::Text("c".into())))
        );
        assert_eq!(bad.answer, None);
        // pairs, and one side of a pair, too
        let pair = u
            .record(6, json!({"prompt": "p", "chosen": "a", "rejected": "b"}))
            .unwrap();
        assert!(pair.chosen.is_some() && pair.rejected.is_some());
        let one = u
            .record(7, json!({"prompt": "p", "rejected": "b"}))
            .unwrap();
        assert_eq!(
            (one.chosen, one.rejected),
            (None, Some(Prompt::Text("b".into())))
        );
    }

    #[test]
    fn bad_rows_say_why() {
        let f = Fields::default();
        assert!(f
            .record(0, json!({"text": "x"}))
            .unwrap_err()
            .contains("no prompt field"));
        assert!(f
            .record(0, json!({"prompt": 3}))
            .unwrap_err()
            .contains("found a number"));
        assert!(f
            .record(0, json!({"prompt": [{"role": "user"}]}))
            .unwrap_err()
            .contains("without `content`"));
        assert!(f
            .record(0, json!([1, 2]))
            .unwrap_err()
            .contains("JSON object"));
        assert!(Fields::preference()
            .record(0, json!({"prompt": "p", "chosen": "a"}))
            .unwrap_err()
            .contains("rejected"));
        let u = Fields::unpaired();
        let err = |row| u.record(0, row).unwrap_err();
        assert!(err(json!({"prompt": "p", "completion": "c"})).contains("without a `label`"));
        assert!(err(json!({"prompt": "p", "completion": "c", "label": 1})).contains("boolean"));
        assert!(err(json!({"prompt": "p", "answer": "3"})).contains("no `completion` and `label`"));
        assert!(err(json!({"prompt": "", "completion": "c", "label": true})).contains("empty"));
        assert!(err(json!({"prompt": "p", "completion": 3, "label": true})).contains("number"));
        // a completion may be empty: a sample that ended at once (its end-of-sequence token)
        let ended = u.record(0, json!({"prompt": "p", "completion": "", "label": false}));
        assert_eq!(ended.unwrap().rejected, Some(Prompt::Text(String::new())));
        let pair =
            Fields::preference().record(0, json!({"prompt": "p", "chosen": "a", "rejected": ""}));
        assert_eq!(pair.unwrap().rejected, Some(Prompt::Text(String::new())));
    }
}
