//! A dataset record: a prompt (text or chat messages), an answer for the verifier, optionally a
//! preference pair, and the remaining fields as metadata.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Messages(Vec<Message>),
}

impl Prompt {
    /// As chat messages: a plain-text prompt is one user message.
    pub fn messages(&self) -> Vec<Message> {
        match self {
            Prompt::Text(t) => vec![Message {
                role: "user".into(),
                content: t.clone(),
            }],
            Prompt::Messages(m) => m.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Stable within its source: the row index of a file, the index of a generated record.
    pub id: u64,
    pub prompt: Prompt,
    /// The gold answer as the source gives it (GSM8K `…#### 72`, a MATH solution, a bare value).
    pub answer: Option<String>,
    /// Preference pairs (DPO): the preferred and the rejected completion.
    pub chosen: Option<Prompt>,
    pub rejected: Option<Prompt>,
    /// Every other field of the row.
    pub metadata: Map<String, Value>,
}
