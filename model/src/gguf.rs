//! Import of llama.cpp GGUF files: config from the metadata, dequantized weights under HF
//! names, and the tokenizer and chat template the file embeds.
//!
//! llama.cpp stores the Q and K projections of `llama` models with rows permuted for its own
//! rope layout; we undo that permutation as transformers' GGUF loader does, so logits match
//! the original HF model. `qwen2` and `qwen3` files are stored unpermuted. A tensor whose name
//! maps to no parameter is an error that names it, unless the config derives it (`rope_freqs`).

use std::collections::BTreeMap;
use std::fs::File;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value as GgufValue};
use candle_core::{DType, Device, Tensor};
use serde_json::json;

use crate::config::{Architecture, ModelConfig, RopeScaling};
use crate::error::{ModelError, Result};
use crate::tokenizer::Tokenizer;
use crate::weights::Weights;

/// A GGUF file's model and tokenizer.
pub struct GgufModel {
    pub weights: Weights,
    pub tokenizer: Tokenizer,
}

pub fn load(path: &Path, dtype: DType, device: &Device) -> Result<GgufModel> {
    let mut file = File::open(path).map_err(|e| ModelError::io(path, e))?;
    let content = Content::read(&mut file).map_err(|e| {
        ModelError::tensor(&path.display().to_string(), format!("not a GGUF file: {e}"))
    })?;
    let md = Metadata {
        file: path.display().to_string(),
        map: &content.metadata,
    };
    let config = config_from(&md)?;
    let mut named = BTreeMap::new();
    for (gguf_name, info) in &content.tensor_infos {
        let Some(hf) = hf_name(gguf_name) else {
            if derived(gguf_name) {
                continue;
            }
            return Err(ModelError::tensor(
                gguf_name,
                format!(
                    "in the GGUF file but not a parameter ferrite maps ({arch_name} file)",
                    arch_name = config.architecture.model_type()
                ),
            ));
        };
        let q = content
            .tensor(&mut file, gguf_name, &Device::Cpu)
            .map_err(|e| {
                ModelError::tensor(
                    gguf_name,
                    format!("cannot read ({:?}): {e}", info.ggml_dtype),
                )
            })?;
        let mut t = q.dequantize(&Device::Cpu)?; // [out, in] row-major, f32
        if config.architecture == Architecture::Llama {
            if hf.ends_with("self_attn.q_proj.weight") {
                t = unpermute_rope_rows(&t, config.num_attention_heads)?;
            } else if hf.ends_with("self_attn.k_proj.weight") {
                t = unpermute_rope_rows(&t, config.num_key_value_heads)?;
            }
        }
        named.insert(hf, t.to_dtype(dtype)?.to_device(device)?);
    }
    let mut config = config;
    if !named.contains_key("lm_head.weight") {
        config.tie_word_embeddings = true;
    }
    let weights = Weights::from_named(&config, &named)?;
    let tokenizer = tokenizer_from(&md)?;
    Ok(GgufModel { weights, tokenizer })
}

/// Inverse of llama.cpp's `permute`: rows `[h, 2, d/2]` were stored as `[h, d/2, 2]`.
/// `w [heads·D, in]` → same shape with each head's rows back in HF rotate-half order.
pub fn unpermute_rope_rows(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let half = rows / heads / 2;
    Ok(w.reshape((heads, half, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

/// A GGUF tensor that the config derives and loading passes over: llama.cpp's rotary
/// frequencies (`rope_freqs.weight`, and the older per-layer `attn_rot_embd`).
fn derived(gguf: &str) -> bool {
    gguf.starts_with("rope_freqs.") || gguf.ends_with(".attn_rot_embd")
}

fn hf_name(gguf: &str) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let hf = match part {
        "attn_norm.weight" => "input_layernorm.weight",
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_q.bias" => "self_attn.q_proj.bias",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_k.bias" => "self_attn.k_proj.bias",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_v.bias" => "self_attn.v_proj.bias",
        "attn_q_norm.weight" => "self_attn.q_norm.weight",
        "attn_k_norm.weight" => "self_attn.k_norm.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}"))
}

struct Metadata<'a> {
    file: String,
    map: &'a std::collections::HashMap<String, GgufValue>,
}

impl Metadata<'_> {
    fn get(&self, key: &str) -> Option<&GgufValue> {
        self.map.get(key)
    }

    fn u32(&self, key: &str) -> Result<u32> {
        self.get(key)
            .and_then(|v| {
                v.to_u32()
                    .ok()
                    .or_else(|| v.to_u64().ok().map(|x| x as u32))
            })
            .ok_or_else(|| ModelError::field(&self.file, key, "an integer"))
    }

    fn f32(&self, key: &str) -> Result<f32> {
        self.get(key)
            .and_then(|v| v.to_f32().ok())
            .ok_or_else(|| ModelError::field(&self.file, key, "a number"))
    }

    fn string(&self, key: &str) -> Result<&str> {
        self.get(key)
            .and_then(|v| v.to_string().ok())
            .map(String::as_str)
            .ok_or_else(|| ModelError::field(&self.file, key, "a string"))
    }

    fn strings(&self, key: &str) -> Result<Vec<&str>> {
        let list = self
            .get(key)
            .and_then(|v| v.to_vec().ok())
            .ok_or_else(|| ModelError::field(&self.file, key, "a list of strings"))?;
        list.iter()
            .map(|v| {
                v.to_string()
                    .map(String::as_str)
                    .map_err(|_| ModelError::field(&self.file, key, "a list of strings"))
            })
            .collect()
    }
}

fn config_from(md: &Metadata) -> Result<ModelConfig> {
    let arch_name = md.string("general.architecture")?;
    let architecture = match arch_name {
        "llama" => Architecture::Llama,
        "qwen2" => Architecture::Qwen2,
        "qwen3" => Architecture::Qwen3,
        other => return Err(ModelError::UnsupportedArchitecture(format!("GGUF {other}"))),
    };
    let k = |s: &str| format!("{arch_name}.{s}");
    let hidden = md.u32(&k("embedding_length"))? as usize;
    let heads = md.u32(&k("attention.head_count"))? as usize;
    let kv_heads = md
        .u32(&k("attention.head_count_kv"))
        .unwrap_or(heads as u32) as usize;
    let head_dim = md
        .u32(&k("attention.key_length"))
        .map(|x| x as usize)
        .unwrap_or(hidden / heads.max(1));
    let vocab = match md.u32(&k("vocab_size")) {
        Ok(v) => v as usize,
        Err(_) => md.strings("tokenizer.ggml.tokens")?.len(),
    };
    let token = |key: &str| md.u32(key).ok();
    Ok(ModelConfig {
        architecture,
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: md.u32(&k("feed_forward_length"))? as usize,
        num_hidden_layers: md.u32(&k("block_count"))? as usize,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim,
        rms_norm_eps: md.f32(&k("attention.layer_norm_rms_epsilon"))? as f64,
        rope_theta: md.f32(&k("rope.freq_base")).unwrap_or(10_000.0) as f64,
        rope_scaling: RopeScaling::Default,
        max_position_embeddings: md.u32(&k("context_length"))? as usize,
        tie_word_embeddings: false,
        qkv_bias: architecture == Architecture::Qwen2,
        bos_token_id: token("tokenizer.ggml.bos_token_id"),
        eos_token_ids: token("tokenizer.ggml.eos_token_id").into_iter().collect(),
        pad_token_id: token("tokenizer.ggml.padding_token_id"),
    })
}

/// GPT-2's byte ↔ printable-character table.
fn bytes_to_unicode() -> Vec<char> {
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut extra = 0;
    (0u32..256)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).expect("latin-1")
            } else {
                extra += 1;
                char::from_u32(255 + extra).expect("valid")
            }
        })
        .collect()
}

/// Byte-level BPE tokenizer from `tokenizer.ggml.*` (model `gpt2`), with the pre-tokenizer the
/// vocabulary was trained with (`tokenizer.ggml.pre`) and control tokens added as specials.
fn tokenizer_from(md: &Metadata) -> Result<Tokenizer> {
    use tokenizers::models::bpe::{Vocab, BPE};
    use tokenizers::pre_tokenizers::{
        byte_level::ByteLevel, digits::Digits, sequence::Sequence, split::Split,
    };
    use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

    let model = md.string("tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(ModelError::Unsupported(format!(
            "GGUF tokenizer model {model:?} (supported: gpt2 byte-level BPE)"
        )));
    }
    let alphabet = bytes_to_unicode();
    let tokens = md.strings("tokenizer.ggml.tokens")?;
    let spell = |t: &str| -> String {
        if t.chars().all(|c| alphabet.contains(&c)) {
            t.to_string()
        } else {
            t.bytes().map(|b| alphabet[b as usize]).collect()
        }
    };
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (spell(t), i as u32))
        .collect();
    let merges = md
        .strings("tokenizer.ggml.merges")?
        .into_iter()
        .filter_map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
        })
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
    let mut tok = tokenizers::Tokenizer::new(bpe);
    let byte_level = ByteLevel::new(false, true, true);
    let pre = md.string("tokenizer.ggml.pre").unwrap_or("default");
    let pre_tokenizer: PreTokenizerWrapper = match pre {
        // SmolLM's tokenizer.json: digits one by one, then GPT-2's byte-level split.
        "smollm" => Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into(),
        "qwen2" | "deepseek-r1-qwen" => {
            let split = Split::new(
                tokenizers::pre_tokenizers::split::SplitPattern::Regex(QWEN2_SPLIT.into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
            Sequence::new(vec![
                split.into(),
                ByteLevel::new(false, true, false).into(),
            ])
            .into()
        }
        "default" | "gpt2" => byte_level.into(),
        other => {
            return Err(ModelError::Unsupported(format!(
                "GGUF pre-tokenizer {other:?} (supported: smollm, qwen2, gpt2)"
            )))
        }
    };
    tok.with_pre_tokenizer(Some(pre_tokenizer));
    tok.with_decoder(Some(tokenizers::decoders::byte_level::ByteLevel::default()));
    let types: Vec<u32> = md
        .get("tokenizer.ggml.token_type")
        .and_then(|v| v.to_vec().ok())
        .map(|v| {
            v.iter()
                .filter_map(|x| x.to_i32().ok().map(|x| x as u32))
                .collect()
        })
        .unwrap_or_default();
    let specials: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter(|(t, &ty)| ty == 3 && t.chars().all(|c| alphabet.contains(&c)))
        .map(|(t, _)| AddedToken::from(t.to_string(), true).normalized(false))
        .collect();
    tok.add_special_tokens(specials)
        .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
    let user: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter(|(_, &ty)| ty == 4)
        .map(|(t, _)| AddedToken::from(t.to_string(), false).normalized(false))
        .collect();
    tok.add_tokens(user)
        .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
    let name = |key: &str| {
        md.u32(key)
            .ok()
            .and_then(|id| tokens.get(id as usize))
            .map(|t| t.to_string())
    };
    let config = json!({
        "chat_template": md.string("tokenizer.chat_template").ok(),
        "bos_token": name("tokenizer.ggml.bos_token_id"),
        "eos_token": name("tokenizer.ggml.eos_token_id"),
        "pad_token": name("tokenizer.ggml.padding_token_id"),
        "unk_token": name("tokenizer.ggml.unknown_token_id"),
    });
    Ok(Tokenizer::from_parts(tok, Some(&config)))
}

/// Qwen2's pre-tokenizer split (transformers' `Qwen2Tokenizer.PRETOKENIZE_REGEX`).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // llama.cpp: w.reshape(h, 2, d/2, in).swapaxes(1, 2).reshape(w.shape)
        let (h, d, cols) = (2, 4, 3);
        let w: Vec<f32> = (0..(h * d * cols)).map(|x| x as f32).collect();
        let w = Tensor::from_vec(w, (h * d, cols), &Device::Cpu).unwrap();
        let permuted = w
            .reshape((h, 2, d / 2, cols))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((h * d, cols))
            .unwrap();
        let back = unpermute_rope_rows(&permuted, h).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
    }

    #[test]
    fn tensor_names_map_or_are_derived_or_are_errors() {
        assert_eq!(
            hf_name("blk.3.attn_k_norm.weight").as_deref(),
            Some("model.layers.3.self_attn.k_norm.weight")
        );
        assert_eq!(hf_name("output.weight").as_deref(), Some("lm_head.weight"));
        assert!(hf_name("rope_freqs.weight").is_none() && derived("rope_freqs.weight"));
        // an o_proj bias, an MoE router: parameters ferrite has no place for, not passed over
        for name in ["blk.0.attn_output.bias", "blk.0.ffn_gate_inp.weight"] {
            assert!(hf_name(name).is_none() && !derived(name), "{name}");
        }
    }

    #[test]
    fn byte_table_matches_gpt2() {
        let t = bytes_to_unicode();
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
        assert_eq!(t[b'A' as usize], 'A');
        assert_eq!(
            t.iter().collect::<std::collections::HashSet<_>>().len(),
            256
        );
    }

    #[test]
    fn tensor_names_map_to_hf() {
        assert_eq!(
            hf_name("blk.3.ffn_down.weight").unwrap(),
            "model.layers.3.mlp.down_proj.weight"
        );
        assert_eq!(hf_name("output.weight").unwrap(), "lm_head.weight");
        assert!(hf_name("rope_freqs.weight").is_none());
    }
}
