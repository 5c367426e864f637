//! Tokenizer (`tokenizer.json` through the `tokenizers` crate) and chat template
//! (`tokenizer_config.json`'s Jinja template rendered with minijinja the way transformers'
//! `apply_chat_template` renders it: `trim_blocks`, `lstrip_blocks`, Python string methods,
//! `tojson` as Python's `json.dumps(ensure_ascii=False)`, `raise_exception`).

use std::path::Path;

use minijinja::value::{Kwargs, Value as JinjaValue};
use minijinja::{Environment, ErrorKind};
use serde_json::Value;

use crate::error::{read_json, ModelError, Result};

/// One chat message (`role` and `content`); richer messages (tool calls, reasoning content)
/// go through [`Tokenizer::render_chat`] as JSON.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }
}

#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    chat_template: Option<String>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    pad_token: Option<String>,
    unk_token: Option<String>,
    /// Extra variables of the chat template (transformers' `apply_chat_template(**kwargs)`).
    template_kwargs: serde_json::Map<String, Value>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("has_chat_template", &self.chat_template.is_some())
            .finish()
    }
}

impl Tokenizer {
    /// Reads `tokenizer.json` and, when present, `tokenizer_config.json` from a directory.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let config = dir.join("tokenizer_config.json");
        let config = if config.exists() {
            Some(read_json(&config)?)
        } else {
            None
        };
        Self::from_file(&dir.join("tokenizer.json"), config.as_ref())
    }

    pub fn from_file(tokenizer_json: &Path, config: Option<&Value>) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(tokenizer_json)
            .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", tokenizer_json.display())))?;
        Ok(Self::from_parts(inner, config))
    }

    /// Wraps a built tokenizer with the fields of a `tokenizer_config.json`.
    pub fn from_parts(inner: tokenizers::Tokenizer, config: Option<&Value>) -> Self {
        let token = |name: &str| config.and_then(|c| special_token(c.get(name)));
        Tokenizer {
            inner,
            chat_template: config.and_then(chat_template_of),
            bos_token: token("bos_token"),
            eos_token: token("eos_token"),
            pad_token: token("pad_token"),
            unk_token: token("unk_token"),
            template_kwargs: serde_json::Map::new(),
        }
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    pub fn set_chat_template(&mut self, template: Option<String>) {
        self.chat_template = template;
    }

    /// Extra variables every rendering of the chat template sees, as the keyword arguments of
    /// transformers' `apply_chat_template` (Qwen3's `enable_thinking = false`, say); the
    /// template's own variables (`messages`, `add_generation_prompt`, the special tokens) keep
    /// their values.
    pub fn set_template_kwargs(&mut self, kwargs: serde_json::Map<String, Value>) {
        self.template_kwargs = kwargs;
    }

    pub fn set_special_tokens(&mut self, bos: Option<String>, eos: Option<String>) {
        self.bos_token = bos;
        self.eos_token = eos;
    }

    /// Writes `tokenizer.json` and a `tokenizer_config.json` (chat template and special tokens)
    /// that transformers' `AutoTokenizer` loads.
    pub fn save_dir(&self, dir: &Path) -> Result<()> {
        let path = dir.join("tokenizer.json");
        self.inner
            .save(&path, false)
            .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", path.display())))?;
        let config = serde_json::json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "chat_template": self.chat_template,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "unk_token": self.unk_token,
            "clean_up_tokenization_spaces": false,
        });
        crate::weights::write_json(&dir.join("tokenizer_config.json"), &config)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// Token ids of `text`; `add_special_tokens` applies the post-processor (e.g. a BOS).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))
    }

    /// Renders `role` / `content` messages with the chat template.
    pub fn apply_chat_template(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let messages = serde_json::to_value(messages).expect("messages serialize");
        self.render_chat(&messages, add_generation_prompt)
    }

    /// Renders any list of message objects (tool calls, reasoning content...) as transformers'
    /// `apply_chat_template(messages, tokenize=False, add_generation_prompt=...)` does.
    pub fn render_chat(&self, messages: &Value, add_generation_prompt: bool) -> Result<String> {
        let source = self
            .chat_template
            .as_deref()
            .ok_or_else(|| ModelError::Template("the tokenizer has no chat template".into()))?;
        let env = chat_environment();
        let template = env
            .template_from_str(source)
            .map_err(|e| ModelError::Template(format!("cannot compile: {e}")))?;
        let ctx = minijinja::context! {
            messages => JinjaValue::from_serialize(messages),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
            pad_token => self.pad_token.clone(),
            unk_token => self.unk_token.clone(),
            tools => JinjaValue::from(()),
            documents => JinjaValue::from(()),
            ..JinjaValue::from_serialize(&self.template_kwargs)
        };
        template
            .render(ctx)
            .map_err(|e| ModelError::Template(e.to_string()))
    }
}

/// A special token given as a string or as an `AddedToken` object `{"content": ...}`.
fn special_token(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

/// `chat_template` as a string, or the `default` entry of a list of named templates.
fn chat_template_of(config: &Value) -> Option<String> {
    match config.get("chat_template")? {
        Value::String(s) => Some(s.clone()),
        Value::Array(list) => list
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|t| t.get("template"))
            .and_then(Value::as_str)
            .map(str::to_string),
        _ => None,
    }
}

fn chat_environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_filter("tojson", tojson);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<JinjaValue, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        },
    );
    env.add_function("strftime_now", |_fmt: String| -> String {
        // Templates use it for a date line; ferrite renders deterministically.
        String::from("26 Jul 2024")
    });
    env
}

/// Python's `json.dumps(x, ensure_ascii=False, indent=indent)`: `", "` and `": "` separators,
/// keys in insertion order, no HTML escaping.
fn tojson(value: JinjaValue, kwargs: Kwargs) -> std::result::Result<JinjaValue, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let v: Value = serde_json::to_value(&value)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let mut out = String::new();
    python_json(&v, indent, 0, &mut out);
    Ok(JinjaValue::from_safe_string(out))
}

fn python_json(v: &Value, indent: Option<usize>, depth: usize, out: &mut String) {
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v {
        Value::Array(a) if !a.is_empty() => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                python_json(x, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push(']');
        }
        Value::Object(o) if !o.is_empty() => {
            out.push('{');
            for (i, (k, x)) in o.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                out.push_str(&serde_json::to_string(k).expect("string"));
                out.push_str(": ");
                python_json(x, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push('}');
        }
        Value::Number(n) if n.is_f64() => {
            let f = n.as_f64().expect("f64");
            if f.fract() == 0.0 && f.abs() < 1e16 {
                out.push_str(&format!("{f:.1}"));
            } else {
                out.push_str(&n.to_string());
            }
        }
        other => out.push_str(&serde_json::to_string(other).expect("JSON value")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tojson_matches_python_json_dumps() {
        // Python: json.dumps({"name": "f", "arguments": {"x": 1, "y": [1.5, "é<"]}}, ensure_ascii=False)
        let v = serde_json::json!({"name": "f", "arguments": {"x": 1, "y": [1.5, "é<"]}, "e": []});
        let mut out = String::new();
        python_json(&v, None, 0, &mut out);
        assert_eq!(
            out,
            r#"{"name": "f", "arguments": {"x": 1, "y": [1.5, "é<"]}, "e": []}"#
        );
        let mut out = String::new();
        python_json(&serde_json::json!({"a": [1, 2]}), Some(2), 0, &mut out);
        assert_eq!(out, "{\n  \"a\": [\n    1,\n    2\n  ]\n}");
    }

    #[test]
    fn template_errors_are_reported_not_panics() {
        let inner = tokenizers::Tokenizer::new(tokenizers::models::bpe::BPE::default());
        let config =
            serde_json::json!({"chat_template": "{{ raise_exception('no system role') }}"});
        let t = Tokenizer::from_parts(inner, Some(&config));
        let e = t
            .apply_chat_template(&[Message::new("user", "hi")], false)
            .unwrap_err();
        assert!(e.to_string().contains("no system role"), "{e}");
    }
}
