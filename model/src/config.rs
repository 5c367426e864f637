//! Model configuration read from Hugging Face `config.json` and `generation_config.json`.
//!
//! Supported: `Qwen2ForCausalLM` (q/k/v projections with bias), `Qwen3ForCausalLM` (no bias;
//! each query and key head RMS-normed before the rotary embedding) and `LlamaForCausalLM` (no
//! bias). Rope theta comes from the top-level `rope_theta` or from
//! transformers 5's `rope_parameters`. Anything we cannot run exactly (sliding windows, MLP bias,
//! unknown rope scaling) is an error that names the field, never a silent approximation.

use std::path::Path;

use serde_json::{json, Map, Value};

use crate::error::{read_json, ModelError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Qwen2,
    Qwen3,
    Llama,
}

impl Architecture {
    pub fn hf_class(self) -> &'static str {
        match self {
            Architecture::Qwen2 => "Qwen2ForCausalLM",
            Architecture::Qwen3 => "Qwen3ForCausalLM",
            Architecture::Llama => "LlamaForCausalLM",
        }
    }

    pub fn model_type(self) -> &'static str {
        match self {
            Architecture::Qwen2 => "qwen2",
            Architecture::Qwen3 => "qwen3",
            Architecture::Llama => "llama",
        }
    }
}

/// How rotary frequencies are scaled (transformers' `rope_type`).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    Default,
    /// Positions divided by `factor`.
    Linear {
        factor: f32,
    },
    /// Llama 3.x frequency-dependent scaling.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position_embeddings: usize,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Bias on the q, k and v projections (always on for Qwen2).
    pub qkv_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
}

const CONFIG: &str = "config.json";

impl ModelConfig {
    /// Reads `config.json` and, when present, `generation_config.json` from an HF model directory.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join(CONFIG);
        let mut config = Self::from_json(&read_json(&path)?)?;
        let gen = dir.join("generation_config.json");
        if gen.exists() {
            config.apply_generation_config(&read_json(&gen)?);
        }
        Ok(config)
    }

    /// Parses the contents of a `config.json`.
    pub fn from_json(v: &Value) -> Result<Self> {
        let architecture = architecture_of(v)?;
        let usize_field = |name: &str| -> Result<usize> {
            v.get(name)
                .and_then(Value::as_u64)
                .map(|x| x as usize)
                .ok_or_else(|| ModelError::field(CONFIG, name, "a non-negative integer"))
        };
        let hidden_size = usize_field("hidden_size")?;
        let num_attention_heads = usize_field("num_attention_heads")?;
        let num_key_value_heads = match v.get("num_key_value_heads") {
            None | Some(Value::Null) => num_attention_heads,
            Some(_) => usize_field("num_key_value_heads")?,
        };
        let head_dim = match v.get("head_dim") {
            None | Some(Value::Null) => hidden_size / num_attention_heads.max(1),
            Some(_) => usize_field("head_dim")?,
        };
        if num_attention_heads == 0 || num_key_value_heads == 0 {
            return Err(ModelError::field(
                CONFIG,
                "num_attention_heads",
                "at least 1",
            ));
        }
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(ModelError::field(
                CONFIG,
                "num_key_value_heads",
                "a divisor of num_attention_heads",
            ));
        }
        if head_dim % 2 != 0 {
            return Err(ModelError::field(CONFIG, "head_dim", "an even number"));
        }
        let rms_norm_eps = v
            .get("rms_norm_eps")
            .and_then(Value::as_f64)
            .ok_or_else(|| ModelError::field(CONFIG, "rms_norm_eps", "a number"))?;
        let (rope_theta, rope_scaling) = rope_of(v)?;
        // Llama's and Qwen3's attention_bias puts a bias on o_proj as well as on q, k and v
        let qkv_bias = architecture == Architecture::Qwen2;
        if architecture != Architecture::Qwen2 && bool_or(v, "attention_bias", false)? {
            return Err(ModelError::Unsupported(
                "attention_bias = true (biases on q/k/v and o_proj)".into(),
            ));
        }
        if bool_or(v, "mlp_bias", false)? {
            return Err(ModelError::Unsupported("mlp_bias = true".into()));
        }
        if bool_or(v, "use_sliding_window", false)? {
            return Err(ModelError::Unsupported("use_sliding_window = true".into()));
        }
        if let Some(kind) = v
            .get("layer_types")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .find(|t| t.as_str() != Some("full_attention"))
        {
            return Err(ModelError::Unsupported(format!("layer_types with {kind}")));
        }
        if let Some(act) = v.get("hidden_act").and_then(Value::as_str) {
            if act != "silu" {
                return Err(ModelError::Unsupported(format!("hidden_act = {act:?}")));
            }
        }
        Ok(ModelConfig {
            architecture,
            vocab_size: usize_field("vocab_size")?,
            hidden_size,
            intermediate_size: usize_field("intermediate_size")?,
            num_hidden_layers: usize_field("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps,
            rope_theta,
            rope_scaling,
            max_position_embeddings: usize_field("max_position_embeddings")?,
            tie_word_embeddings: bool_or(v, "tie_word_embeddings", false)?,
            qkv_bias,
            bos_token_id: token_id(v.get("bos_token_id")),
            eos_token_ids: token_ids(v.get("eos_token_id")),
            pad_token_id: token_id(v.get("pad_token_id")),
        })
    }

    /// `generation_config.json` overrides bos / eos / pad ids, as transformers' `generate` does.
    pub fn apply_generation_config(&mut self, v: &Value) {
        if let Some(id) = token_id(v.get("bos_token_id")) {
            self.bos_token_id = Some(id);
        }
        let eos = token_ids(v.get("eos_token_id"));
        if !eos.is_empty() {
            self.eos_token_ids = eos;
        }
        if let Some(id) = token_id(v.get("pad_token_id")) {
            self.pad_token_id = Some(id);
        }
    }

    /// Whether each query and key head is RMS-normed over its `head_dim` before the rotary
    /// embedding (Qwen3's `q_norm` and `k_norm`, one `[head_dim]` weight each a layer).
    pub fn qk_norm(&self) -> bool {
        self.architecture == Architecture::Qwen3
    }

    pub fn num_kv_groups(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// Total parameter count (lm_head counted once when tied).
    pub fn num_parameters(&self) -> usize {
        let (h, i, d) = (self.hidden_size, self.intermediate_size, self.head_dim);
        let q = self.num_attention_heads * d;
        let kv = self.num_key_value_heads * d;
        let bias = if self.qkv_bias { q + 2 * kv } else { 0 };
        let qk_norm = if self.qk_norm() { 2 * d } else { 0 };
        let layer = 2 * h + h * q + 2 * h * kv + q * h + bias + qk_norm + 3 * h * i;
        let head = if self.tie_word_embeddings {
            0
        } else {
            self.vocab_size * h
        };
        self.vocab_size * h + self.num_hidden_layers * layer + h + head
    }

    /// The `config.json` that transformers reads back into the same model.
    pub fn to_hf_json(&self, dtype: &str) -> Value {
        let mut m = Map::new();
        m.insert(
            "architectures".into(),
            json!([self.architecture.hf_class()]),
        );
        m.insert("model_type".into(), json!(self.architecture.model_type()));
        m.insert("vocab_size".into(), json!(self.vocab_size));
        m.insert("hidden_size".into(), json!(self.hidden_size));
        m.insert("intermediate_size".into(), json!(self.intermediate_size));
        m.insert("num_hidden_layers".into(), json!(self.num_hidden_layers));
        m.insert(
            "num_attention_heads".into(),
            json!(self.num_attention_heads),
        );
        m.insert(
            "num_key_value_heads".into(),
            json!(self.num_key_value_heads),
        );
        m.insert("head_dim".into(), json!(self.head_dim));
        m.insert("hidden_act".into(), json!("silu"));
        m.insert("rms_norm_eps".into(), json!(self.rms_norm_eps));
        m.insert("rope_theta".into(), json!(self.rope_theta));
        m.insert("rope_scaling".into(), rope_scaling_json(&self.rope_scaling));
        m.insert(
            "max_position_embeddings".into(),
            json!(self.max_position_embeddings),
        );
        m.insert(
            "tie_word_embeddings".into(),
            json!(self.tie_word_embeddings),
        );
        if self.architecture != Architecture::Qwen2 {
            m.insert("attention_bias".into(), json!(false));
        }
        if self.architecture == Architecture::Llama {
            m.insert("mlp_bias".into(), json!(false));
        } else {
            m.insert("use_sliding_window".into(), json!(false));
        }
        m.insert("attention_dropout".into(), json!(0.0));
        m.insert("initializer_range".into(), json!(0.02));
        m.insert("use_cache".into(), json!(true));
        m.insert("torch_dtype".into(), json!(dtype));
        if let Some(id) = self.bos_token_id {
            m.insert("bos_token_id".into(), json!(id));
        }
        match self.eos_token_ids.as_slice() {
            [] => {}
            [one] => {
                m.insert("eos_token_id".into(), json!(one));
            }
            many => {
                m.insert("eos_token_id".into(), json!(many));
            }
        }
        if let Some(id) = self.pad_token_id {
            m.insert("pad_token_id".into(), json!(id));
        }
        Value::Object(m)
    }

    /// The `generation_config.json` beside a saved checkpoint.
    pub fn to_generation_json(&self) -> Value {
        let mut m = Map::new();
        if let Some(id) = self.bos_token_id {
            m.insert("bos_token_id".into(), json!(id));
        }
        if !self.eos_token_ids.is_empty() {
            m.insert("eos_token_id".into(), json!(self.eos_token_ids));
        }
        if let Some(id) = self.pad_token_id {
            m.insert("pad_token_id".into(), json!(id));
        }
        Value::Object(m)
    }
}

fn architecture_of(v: &Value) -> Result<Architecture> {
    let class = v
        .get("architectures")
        .and_then(Value::as_array)
        .and_then(|a| a.first())
        .and_then(Value::as_str);
    let model_type = v.get("model_type").and_then(Value::as_str);
    match (class, model_type) {
        (Some("Qwen2ForCausalLM"), _) | (None, Some("qwen2")) => Ok(Architecture::Qwen2),
        (Some("Qwen3ForCausalLM"), _) | (None, Some("qwen3")) => Ok(Architecture::Qwen3),
        (Some("LlamaForCausalLM"), _) | (None, Some("llama")) => Ok(Architecture::Llama),
        (Some(other), _) => Err(ModelError::UnsupportedArchitecture(other.to_string())),
        (None, Some(other)) => Err(ModelError::UnsupportedArchitecture(other.to_string())),
        (None, None) => Err(ModelError::field(
            CONFIG,
            "architectures",
            "a list naming the model class",
        )),
    }
}

fn bool_or(v: &Value, name: &str, default: bool) -> Result<bool> {
    match v.get(name) {
        None | Some(Value::Null) => Ok(default),
        Some(x) => x
            .as_bool()
            .ok_or_else(|| ModelError::field(CONFIG, name, "true or false")),
    }
}

fn token_id(v: Option<&Value>) -> Option<u32> {
    match v? {
        Value::Number(n) => n.as_u64().map(|x| x as u32),
        Value::Array(a) => a.first().and_then(Value::as_u64).map(|x| x as u32),
        _ => None,
    }
}

fn token_ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_u64)
            .map(|x| x as u32)
            .collect(),
        _ => Vec::new(),
    }
}

/// Rope theta and scaling from `rope_theta` / `rope_scaling` (transformers 4) or
/// `rope_parameters` (transformers 5).
fn rope_of(v: &Value) -> Result<(f64, RopeScaling)> {
    let params = v.get("rope_parameters").filter(|p| p.is_object());
    let theta = v
        .get("rope_theta")
        .and_then(Value::as_f64)
        .or_else(|| {
            params
                .and_then(|p| p.get("rope_theta"))
                .and_then(Value::as_f64)
        })
        .ok_or_else(|| {
            ModelError::field(
                CONFIG,
                "rope_theta",
                "a number (or rope_parameters.rope_theta)",
            )
        })?;
    let scaling = params.or_else(|| v.get("rope_scaling").filter(|p| p.is_object()));
    let Some(s) = scaling else {
        return Ok((theta, RopeScaling::Default));
    };
    let kind = s
        .get("rope_type")
        .or_else(|| s.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let num = |name: &str| -> Result<f64> {
        s.get(name)
            .and_then(Value::as_f64)
            .ok_or_else(|| ModelError::field(CONFIG, &format!("rope_scaling.{name}"), "a number"))
    };
    let scaling = match kind {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear {
            factor: num("factor")? as f32,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: num("factor")? as f32,
            low_freq_factor: num("low_freq_factor")? as f32,
            high_freq_factor: num("high_freq_factor")? as f32,
            original_max_position_embeddings: num("original_max_position_embeddings")? as usize,
        },
        other => {
            return Err(ModelError::Unsupported(format!(
                "rope scaling type {other:?} (supported: default, linear, llama3)"
            )))
        }
    };
    Ok((theta, scaling))
}

fn rope_scaling_json(s: &RopeScaling) -> Value {
    match s {
        RopeScaling::Default => Value::Null,
        RopeScaling::Linear { factor } => json!({"rope_type": "linear", "factor": factor}),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => json!({
            "rope_type": "llama3",
            "factor": factor,
            "low_freq_factor": low_freq_factor,
            "high_freq_factor": high_freq_factor,
            "original_max_position_embeddings": original_max_position_embeddings,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qwen() -> Value {
        json!({
            "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
            "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
            "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
            "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 32768,
            "tie_word_embeddings": true, "bos_token_id": 151643, "eos_token_id": 151645
        })
    }

    #[test]
    fn qwen2_5_0_5b_config_counts_494m_parameters() {
        let c = ModelConfig::from_json(&qwen()).unwrap();
        assert_eq!(c.architecture, Architecture::Qwen2);
        assert_eq!(c.head_dim, 64);
        assert_eq!(c.num_kv_groups(), 7);
        assert!(c.qkv_bias);
        // Qwen2.5-0.5B has 494,032,768 parameters (model card: 0.49B).
        assert_eq!(c.num_parameters(), 494_032_768);
    }

    #[test]
    fn transformers5_rope_parameters_are_read() {
        let mut v = qwen();
        v.as_object_mut().unwrap().remove("rope_theta");
        v["rope_parameters"] = json!({"rope_type": "default", "rope_theta": 10000.0});
        assert_eq!(ModelConfig::from_json(&v).unwrap().rope_theta, 10000.0);
    }

    #[test]
    fn missing_field_and_unknown_architecture_are_named() {
        let mut v = qwen();
        v.as_object_mut().unwrap().remove("intermediate_size");
        let e = ModelConfig::from_json(&v).unwrap_err().to_string();
        assert!(e.contains("intermediate_size"), "{e}");
        let mut v = qwen();
        v["architectures"] = json!(["Qwen3MoeForCausalLM"]);
        let e = ModelConfig::from_json(&v).unwrap_err().to_string();
        assert!(e.contains("Qwen3MoeForCausalLM"), "{e}");
    }

    /// Qwen3-0.6B's `config.json` (transformers 4.51), its fields as published.
    fn qwen3() -> Value {
        json!({
            "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "attention_bias": false,
            "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
            "head_dim": 128, "hidden_act": "silu", "hidden_size": 1024, "initializer_range": 0.02,
            "intermediate_size": 3072, "max_position_embeddings": 40960, "max_window_layers": 28,
            "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8,
            "rms_norm_eps": 1e-06, "rope_scaling": null, "rope_theta": 1000000,
            "sliding_window": null, "tie_word_embeddings": true, "torch_dtype": "bfloat16",
            "use_cache": true, "use_sliding_window": false, "vocab_size": 151936
        })
    }

    #[test]
    fn qwen3_0_6b_config_counts_596m_parameters() {
        let c = ModelConfig::from_json(&qwen3()).unwrap();
        assert_eq!(c.architecture, Architecture::Qwen3);
        assert!(c.qk_norm() && !c.qkv_bias);
        // head_dim 128, not hidden / heads = 64: q_proj is 1024 → 2048
        assert_eq!(c.head_dim, 128);
        // 596,049,920: transformers' Qwen3ForCausalLM of this config, its parameters counted
        // (model card: 0.6B, 0.44B of them not the embedding)
        assert_eq!(c.num_parameters(), 596_049_920);
        assert_eq!(
            ModelConfig::from_json(&c.to_hf_json("bfloat16")).unwrap(),
            c
        );
        let mut v = qwen3();
        v["attention_bias"] = json!(true);
        assert!(ModelConfig::from_json(&v).is_err());
        let mut v = qwen3();
        v["layer_types"] = json!(["full_attention", "sliding_attention"]);
        let e = ModelConfig::from_json(&v).unwrap_err().to_string();
        assert!(e.contains("sliding_attention"), "{e}");
    }

    #[test]
    fn llama_attention_bias_is_unsupported() {
        // transformers puts it on o_proj as well as on q, k and v; ferrite has no o_proj bias
        let mut v = qwen();
        v["architectures"] = json!(["LlamaForCausalLM"]);
        assert!(!ModelConfig::from_json(&v).unwrap().qkv_bias);
        v["attention_bias"] = json!(true);
        let e = ModelConfig::from_json(&v).unwrap_err().to_string();
        assert!(e.contains("attention_bias"), "{e}");
    }

    #[test]
    fn generation_config_overrides_eos_list() {
        let mut c = ModelConfig::from_json(&qwen()).unwrap();
        c.apply_generation_config(
            &json!({"eos_token_id": [151645, 151643], "pad_token_id": 151643}),
        );
        assert_eq!(c.eos_token_ids, vec![151645, 151643]);
        assert_eq!(c.pad_token_id, Some(151643));
    }

    #[test]
    fn hf_json_round_trips() {
        let c = ModelConfig::from_json(&qwen()).unwrap();
        assert_eq!(ModelConfig::from_json(&c.to_hf_json("float32")).unwrap(), c);
    }
}
