//! Weights in Hugging Face layout: a name → tensor map with the decoder's structure on top.
//!
//! Loading memory-maps `model.safetensors` or every shard named by
//! `model.safetensors.index.json`, in f32, bf16 or f16, and converts to the compute dtype.
//! Saving writes the same layout (sharded past a size), with `{"format": "pt"}` metadata and
//! without `lm_head.weight` when embeddings are tied, as transformers' `save_pretrained` does.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};

use crate::config::ModelConfig;
use crate::error::{read_json, ModelError, Result};

/// One decoder layer's tensors (HF shapes: linear weights are `[out, in]`).
#[derive(Debug, Clone)]
pub struct LayerWeights {
    pub input_layernorm: Tensor,
    pub q_proj: Tensor,
    pub q_bias: Option<Tensor>,
    pub k_proj: Tensor,
    pub k_bias: Option<Tensor>,
    pub v_proj: Tensor,
    pub v_bias: Option<Tensor>,
    pub o_proj: Tensor,
    pub post_attention_layernorm: Tensor,
    pub gate_proj: Tensor,
    pub up_proj: Tensor,
    pub down_proj: Tensor,
}

impl LayerWeights {
    /// Every tensor of the layer.
    pub fn tensors(&self) -> Vec<&Tensor> {
        let mut out = vec![
            &self.input_layernorm,
            &self.q_proj,
            &self.k_proj,
            &self.v_proj,
            &self.o_proj,
            &self.post_attention_layernorm,
            &self.gate_proj,
            &self.up_proj,
            &self.down_proj,
        ];
        out.extend(
            [&self.q_bias, &self.k_bias, &self.v_bias]
                .into_iter()
                .flatten(),
        );
        out
    }

    /// The same tensors cut from any autograd graph (storage shared).
    pub fn detach(&self) -> Self {
        let d = |t: &Tensor| t.detach();
        LayerWeights {
            input_layernorm: d(&self.input_layernorm),
            q_proj: d(&self.q_proj),
            q_bias: self.q_bias.as_ref().map(d),
            k_proj: d(&self.k_proj),
            k_bias: self.k_bias.as_ref().map(d),
            v_proj: d(&self.v_proj),
            v_bias: self.v_bias.as_ref().map(d),
            o_proj: d(&self.o_proj),
            post_attention_layernorm: d(&self.post_attention_layernorm),
            gate_proj: d(&self.gate_proj),
            up_proj: d(&self.up_proj),
            down_proj: d(&self.down_proj),
        }
    }
}

/// The decoder's weights. Cloning shares storage (candle tensors are reference counted).
#[derive(Debug, Clone)]
pub struct Weights {
    pub config: ModelConfig,
    pub embed_tokens: Tensor,
    pub layers: Vec<LayerWeights>,
    pub norm: Tensor,
    /// `None` when tied to `embed_tokens`.
    pub lm_head: Option<Tensor>,
}

/// The HF parameter names of a config, in a stable order, with their shapes.
pub fn parameter_shapes(c: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (h, i, d) = (c.hidden_size, c.intermediate_size, c.head_dim);
    let q = c.num_attention_heads * d;
    let kv = c.num_key_value_heads * d;
    let mut out = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![c.vocab_size, h],
    )];
    for l in 0..c.num_hidden_layers {
        let p = |s: &str| format!("model.layers.{l}.{s}");
        out.push((p("input_layernorm.weight"), vec![h]));
        out.push((p("self_attn.q_proj.weight"), vec![q, h]));
        out.push((p("self_attn.k_proj.weight"), vec![kv, h]));
        out.push((p("self_attn.v_proj.weight"), vec![kv, h]));
        if c.qkv_bias {
            out.push((p("self_attn.q_proj.bias"), vec![q]));
            out.push((p("self_attn.k_proj.bias"), vec![kv]));
            out.push((p("self_attn.v_proj.bias"), vec![kv]));
        }
        out.push((p("self_attn.o_proj.weight"), vec![h, q]));
        out.push((p("post_attention_layernorm.weight"), vec![h]));
        out.push((p("mlp.gate_proj.weight"), vec![i, h]));
        out.push((p("mlp.up_proj.weight"), vec![i, h]));
        out.push((p("mlp.down_proj.weight"), vec![h, i]));
    }
    out.push(("model.norm.weight".to_string(), vec![h]));
    if !c.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![c.vocab_size, h]));
    }
    out
}

impl Weights {
    /// Builds the structure from a name → tensor map, checking every name and shape.
    pub fn from_named(config: &ModelConfig, named: &BTreeMap<String, Tensor>) -> Result<Self> {
        for (name, shape) in parameter_shapes(config) {
            let t = named
                .get(&name)
                .ok_or_else(|| ModelError::tensor(&name, "missing from the checkpoint"))?;
            if t.dims() != shape.as_slice() {
                return Err(ModelError::tensor(
                    &name,
                    format!("shape {:?}, config expects {:?}", t.dims(), shape),
                ));
            }
        }
        let get = |n: &str| named[n].clone();
        let opt = |n: &str| named.get(n).cloned();
        let layers = (0..config.num_hidden_layers)
            .map(|l| {
                let p = |s: &str| format!("model.layers.{l}.{s}");
                let bias = |s: &str| config.qkv_bias.then(|| get(&p(s)));
                LayerWeights {
                    input_layernorm: get(&p("input_layernorm.weight")),
                    q_proj: get(&p("self_attn.q_proj.weight")),
                    q_bias: bias("self_attn.q_proj.bias"),
                    k_proj: get(&p("self_attn.k_proj.weight")),
                    k_bias: bias("self_attn.k_proj.bias"),
                    v_proj: get(&p("self_attn.v_proj.weight")),
                    v_bias: bias("self_attn.v_proj.bias"),
                    o_proj: get(&p("self_attn.o_proj.weight")),
                    post_attention_layernorm: get(&p("post_attention_layernorm.weight")),
                    gate_proj: get(&p("mlp.gate_proj.weight")),
                    up_proj: get(&p("mlp.up_proj.weight")),
                    down_proj: get(&p("mlp.down_proj.weight")),
                }
            })
            .collect();
        Ok(Weights {
            config: config.clone(),
            embed_tokens: get("model.embed_tokens.weight"),
            layers,
            norm: get("model.norm.weight"),
            lm_head: if config.tie_word_embeddings {
                None
            } else {
                opt("lm_head.weight")
            },
        })
    }

    /// Every parameter under its HF name (tied lm_head not repeated).
    pub fn named(&self) -> BTreeMap<String, Tensor> {
        let mut out = BTreeMap::new();
        out.insert(
            "model.embed_tokens.weight".into(),
            self.embed_tokens.clone(),
        );
        for (l, w) in self.layers.iter().enumerate() {
            let p = |s: &str| format!("model.layers.{l}.{s}");
            out.insert(p("input_layernorm.weight"), w.input_layernorm.clone());
            out.insert(p("self_attn.q_proj.weight"), w.q_proj.clone());
            out.insert(p("self_attn.k_proj.weight"), w.k_proj.clone());
            out.insert(p("self_attn.v_proj.weight"), w.v_proj.clone());
            for (name, b) in [
                ("self_attn.q_proj.bias", &w.q_bias),
                ("self_attn.k_proj.bias", &w.k_bias),
                ("self_attn.v_proj.bias", &w.v_bias),
            ] {
                if let Some(b) = b {
                    out.insert(p(name), b.clone());
                }
            }
            out.insert(p("self_attn.o_proj.weight"), w.o_proj.clone());
            out.insert(
                p("post_attention_layernorm.weight"),
                w.post_attention_layernorm.clone(),
            );
            out.insert(p("mlp.gate_proj.weight"), w.gate_proj.clone());
            out.insert(p("mlp.up_proj.weight"), w.up_proj.clone());
            out.insert(p("mlp.down_proj.weight"), w.down_proj.clone());
        }
        out.insert("model.norm.weight".into(), self.norm.clone());
        if let Some(h) = &self.lm_head {
            out.insert("lm_head.weight".into(), h.clone());
        }
        out
    }

    /// FNV-1a over every parameter's name and f32 values, in name order: the learner stamps
    /// published weights with it and a rollout worker checks its copy before sampling.
    pub fn checksum(&self) -> Result<u64> {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |bytes: &[u8]| {
            for &b in bytes {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        };
        for (name, t) in self.named() {
            eat(name.as_bytes());
            let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            for v in values {
                eat(&v.to_bits().to_le_bytes());
            }
        }
        Ok(h)
    }

    /// The output projection `[vocab, hidden]` (the embedding when tied).
    pub fn output_weight(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }

    /// A copy of every tensor converted to `dtype` on `device`.
    pub fn to(&self, dtype: DType, device: &Device) -> Result<Self> {
        let mut named = BTreeMap::new();
        for (n, t) in self.named() {
            named.insert(n, t.to_device(device)?.to_dtype(dtype)?);
        }
        Self::from_named(&self.config, &named)
    }

    /// The same weights cut from any autograd graph (storage shared, no copy). Generation runs
    /// on these: candle has no no-grad mode, and a KV cache built from `Var`s would keep every
    /// step's graph alive.
    pub fn detach(&self) -> Self {
        let named = self
            .named()
            .into_iter()
            .map(|(n, t)| (n, t.detach()))
            .collect();
        Self::from_named(&self.config, &named).expect("same names and shapes")
    }

    /// A deep copy cut from any graph: what the learner publishes to rollout workers, so that
    /// later optimizer steps (which update the `Var`s in place) never reach it.
    pub fn snapshot(&self) -> Result<Self> {
        let mut named = BTreeMap::new();
        for (n, t) in self.named() {
            named.insert(n, t.detach().copy()?);
        }
        Self::from_named(&self.config, &named)
    }

    /// Trainable copies: one `Var` per parameter, in HF name order and in the weights' own
    /// dtype (bf16 weights train in bf16, the optimizer keeping their f32 master), and weights
    /// that read them.
    pub fn to_vars(&self) -> Result<(Vec<(String, Var)>, Self)> {
        let mut vars = Vec::new();
        let mut named = BTreeMap::new();
        for (n, t) in self.named() {
            let v = Var::from_tensor(&t)?;
            named.insert(n.clone(), v.as_tensor().clone());
            vars.push((n, v));
        }
        let weights = Self::from_named(&self.config, &named)?;
        Ok((vars, weights))
    }

    /// Loads an HF directory: `config.json`, optional `generation_config.json`, and
    /// `model.safetensors` or a sharded index. Weights are converted to `dtype`.
    pub fn load_dir(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let config = ModelConfig::from_dir(dir)?;
        let files = safetensors_files(dir)?;
        // SAFETY: the files are memory-mapped read-only; ferrite never writes to a checkpoint
        // directory it is reading (new checkpoints go to a temporary directory, then rename).
        let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&files)? };
        let wanted = parameter_shapes(&config);
        let mut named = BTreeMap::new();
        for (name, _) in &wanted {
            let t = st
                .load(name, device)
                .map_err(|e| ModelError::tensor(name, format!("cannot load: {e}")))?;
            match t.dtype() {
                DType::F32 | DType::BF16 | DType::F16 => {}
                other => {
                    return Err(ModelError::tensor(
                        name,
                        format!("dtype {other:?} (supported: f32, bf16, f16)"),
                    ))
                }
            }
            named.insert(name.clone(), t.to_dtype(dtype)?);
        }
        Self::from_named(&config, &named)
    }

    /// Saves in HF layout: `config.json`, `generation_config.json` and the weights in `dtype`,
    /// split into shards of at most `max_shard_bytes` with an index when larger.
    pub fn save_dir(&self, dir: &Path, dtype: DType, max_shard_bytes: usize) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
        let dtype_name = match dtype {
            DType::F32 => "float32",
            DType::BF16 => "bfloat16",
            DType::F16 => "float16",
            other => return Err(ModelError::Unsupported(format!("saving as {other:?}"))),
        };
        write_json(
            &dir.join("config.json"),
            &self.config.to_hf_json(dtype_name),
        )?;
        write_json(
            &dir.join("generation_config.json"),
            &self.config.to_generation_json(),
        )?;
        let mut tensors = Vec::new();
        for (name, t) in self.named() {
            let t = t.to_device(&Device::Cpu)?.to_dtype(dtype)?.contiguous()?;
            tensors.push((name, t));
        }
        let shards = split_shards(&tensors, max_shard_bytes);
        let metadata: std::collections::HashMap<String, String> =
            [("format".to_string(), "pt".to_string())].into();
        if shards.len() == 1 {
            let path = dir.join("model.safetensors");
            safetensors::serialize_to_file(
                tensors.iter().map(|(n, t)| (n.as_str(), t)),
                Some(metadata),
                &path,
            )
            .map_err(|e| ModelError::tensor("model.safetensors", e.to_string()))?;
            return Ok(());
        }
        let n = shards.len();
        let mut weight_map = serde_json::Map::new();
        let mut total = 0usize;
        for (k, shard) in shards.iter().enumerate() {
            let file = format!("model-{:05}-of-{:05}.safetensors", k + 1, n);
            for (name, t) in shard {
                weight_map.insert(name.to_string(), serde_json::json!(file));
                total += t.elem_count() * dtype.size_in_bytes();
            }
            safetensors::serialize_to_file(
                shard.iter().map(|(n, t)| (n.as_str(), *t)),
                Some(metadata.clone()),
                &dir.join(&file),
            )
            .map_err(|e| ModelError::tensor(&file, e.to_string()))?;
        }
        let index = serde_json::json!({
            "metadata": {"total_size": total},
            "weight_map": weight_map,
        });
        write_json(&dir.join("model.safetensors.index.json"), &index)
    }
}

/// Groups tensors in order into shards of at most `max_bytes` (a tensor larger than the bound
/// gets a shard of its own).
fn split_shards(tensors: &[(String, Tensor)], max_bytes: usize) -> Vec<Vec<(&String, &Tensor)>> {
    let mut shards: Vec<Vec<(&String, &Tensor)>> = vec![Vec::new()];
    let mut size = 0;
    for (name, t) in tensors {
        let bytes = t.elem_count() * t.dtype().size_in_bytes();
        if size > 0 && size + bytes > max_bytes {
            shards.push(Vec::new());
            size = 0;
        }
        size += bytes;
        shards.last_mut().expect("one shard").push((name, t));
    }
    shards
}

/// The safetensors files of an HF directory: the single file, or every shard of the index.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if !index.exists() {
        return Err(ModelError::UnknownModelFiles(dir.to_path_buf()));
    }
    let v = read_json(&index)?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| {
            ModelError::field("model.safetensors.index.json", "weight_map", "an object")
        })?;
    let mut files: Vec<String> = map
        .values()
        .filter_map(|f| f.as_str().map(str::to_string))
        .collect();
    files.sort();
    files.dedup();
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}

pub(crate) fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).expect("JSON values serialize");
    std::fs::write(path, text + "\n").map_err(|e| ModelError::io(path, e))
}
