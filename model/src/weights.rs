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
    /// Qwen3's RMSNorm weights `[head_dim]` of each query and key head (before the rotary
    /// embedding); None elsewhere.
    pub q_norm: Option<Tensor>,
    pub k_norm: Option<Tensor>,
    pub o_proj: Tensor,
    pub post_attention_layernorm: Tensor,
    pub gate_proj: Tensor,
    pub up_proj: Tensor,
    pub down_proj: Tensor,
    /// Where set, `q_proj` … `v_bias`, `gate_proj` and `up_proj` are row views of these.
    pub packed: Option<Packed>,
    /// LoRA adapters on the projections ([`crate::lora`]). A layer with adapters is unpacked:
    /// packing merges them first, and adapters given to a packed layer unpack it.
    pub lora: Option<crate::lora::LayerLora>,
}

/// A layer's q, k and v projections stored as one matrix, and its gate and up projections as
/// another, so that a forward with no gradient multiplies once for each pair instead of three
/// and two times (inference weights: [`Weights::snapshot`], [`Weights::packed`]). Trainable
/// weights stay unpacked: each is its own `Var` (a forward concatenates an unpacked layer's q, k
/// and v for its call, so that it too multiplies them once: see `forward::packed_qkv`).
#[derive(Debug, Clone)]
pub struct Packed {
    /// `[Hq·D + 2·Hkv·D, H]`: q's rows, then k's, then v's.
    pub qkv: Tensor,
    /// `[Hq·D + 2·Hkv·D]`, for models with q/k/v biases.
    pub qkv_bias: Option<Tensor>,
    /// `[2·I, H]`: gate's rows, then up's.
    pub gate_up: Tensor,
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
            [
                &self.q_bias,
                &self.k_bias,
                &self.v_bias,
                &self.q_norm,
                &self.k_norm,
            ]
            .into_iter()
            .flatten(),
        );
        for (_, ad) in self.lora.iter().flat_map(|l| &l.adapters) {
            out.extend([&ad.a, &ad.b]);
        }
        out
    }

    /// Whether a forward through the layer trains it: some tensor of it (a weight, or with LoRA
    /// an adapter) is a `Var`.
    pub fn trains(&self) -> bool {
        self.tensors().iter().any(|t| t.is_variable())
    }

    /// The same tensors cut from any autograd graph (storage shared).
    pub fn detach(&self) -> Self {
        self.map(&|t| Ok(t.detach()))
            .expect("detaching cannot fail")
    }

    /// The layer with every tensor it stores passed through `f`: a packed layer's packed
    /// matrices (its views cut again from the results), an unpacked layer's every tensor.
    fn map(&self, f: &impl Fn(&Tensor) -> Result<Tensor>) -> Result<Self> {
        let opt = |t: &Option<Tensor>| t.as_ref().map(f).transpose();
        let layer = LayerWeights {
            lora: self.map_lora(f)?,
            ..self.map_never_packed(f)?
        };
        match &self.packed {
            Some(p) => layer.with_packed(Packed {
                qkv: f(&p.qkv)?,
                qkv_bias: opt(&p.qkv_bias)?,
                gate_up: f(&p.gate_up)?,
            }),
            None => Ok(LayerWeights {
                q_proj: f(&self.q_proj)?,
                q_bias: opt(&self.q_bias)?,
                k_proj: f(&self.k_proj)?,
                k_bias: opt(&self.k_bias)?,
                v_proj: f(&self.v_proj)?,
                v_bias: opt(&self.v_bias)?,
                gate_proj: f(&self.gate_proj)?,
                up_proj: f(&self.up_proj)?,
                ..layer
            }),
        }
    }

    /// The layer packed ([`Packed`], new storage: the concatenations copy) with its other
    /// tensors through `f`; a packed layer has every tensor through `f`. A layer with some of
    /// the q/k/v biases but not all stays unpacked.
    fn pack(&self, f: &impl Fn(&Tensor) -> Result<Tensor>) -> Result<Self> {
        let qkv_bias = match (&self.q_bias, &self.k_bias, &self.v_bias) {
            _ if self.packed.is_some() => return self.map(f),
            (Some(q), Some(k), Some(v)) => Some(Tensor::cat(&[q, k, v], 0)?),
            (None, None, None) => None,
            _ => return self.map(f),
        };
        let packed = Packed {
            qkv: Tensor::cat(&[&self.q_proj, &self.k_proj, &self.v_proj], 0)?,
            qkv_bias,
            gate_up: Tensor::cat(&[&self.gate_proj, &self.up_proj], 0)?,
        };
        self.map_never_packed(f)?.with_packed(packed)
    }

    /// The layer with the tensors that are never packed (the norms, the output and down
    /// projections) through `f`, the others as they are.
    fn map_never_packed(&self, f: &impl Fn(&Tensor) -> Result<Tensor>) -> Result<Self> {
        let opt = |t: &Option<Tensor>| t.as_ref().map(f).transpose();
        Ok(LayerWeights {
            input_layernorm: f(&self.input_layernorm)?,
            q_norm: opt(&self.q_norm)?,
            k_norm: opt(&self.k_norm)?,
            o_proj: f(&self.o_proj)?,
            post_attention_layernorm: f(&self.post_attention_layernorm)?,
            down_proj: f(&self.down_proj)?,
            ..self.clone()
        })
    }

    /// The layer reading its projections from `p`: each one a row view of it (shapes as before).
    fn with_packed(self, p: Packed) -> Result<Self> {
        let (q, kv, i) = (
            self.q_proj.dim(0)?,
            self.k_proj.dim(0)?,
            self.gate_proj.dim(0)?,
        );
        let rows = |t: &Tensor, at: usize, n: usize| t.narrow(0, at, n);
        let bias = |at: usize, n: usize| p.qkv_bias.as_ref().map(|b| rows(b, at, n)).transpose();
        Ok(LayerWeights {
            q_proj: rows(&p.qkv, 0, q)?,
            k_proj: rows(&p.qkv, q, kv)?,
            v_proj: rows(&p.qkv, q + kv, kv)?,
            q_bias: bias(0, q)?,
            k_bias: bias(q, kv)?,
            v_bias: bias(q + kv, kv)?,
            gate_proj: rows(&p.gate_up, 0, i)?,
            up_proj: rows(&p.gate_up, i, i)?,
            packed: Some(p),
            ..self
        })
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

/// A checkpoint's tensor that is not a parameter and that loading passes over: older
/// checkpoints' rotary `inv_freq` buffers (derived from the config) and a tied model's copy of
/// the embedding as `lm_head.weight`.
fn ignorable(c: &ModelConfig, name: &str) -> bool {
    name.ends_with(".rotary_emb.inv_freq") || (c.tie_word_embeddings && name == "lm_head.weight")
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
        if c.qk_norm() {
            out.push((p("self_attn.q_norm.weight"), vec![d]));
            out.push((p("self_attn.k_norm.weight"), vec![d]));
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
    /// Builds the structure from a name → tensor map, checking every name and shape. A tensor
    /// the config does not explain (an o_proj bias, a norm of another architecture: a part of
    /// the model ferrite would not run) is an error that names it, never dropped in silence;
    /// older checkpoints' rotary buffers and a tied model's `lm_head.weight` are passed over.
    pub fn from_named(config: &ModelConfig, named: &BTreeMap<String, Tensor>) -> Result<Self> {
        let shapes = parameter_shapes(config);
        let known: std::collections::HashSet<&str> =
            shapes.iter().map(|(n, _)| n.as_str()).collect();
        if let Some(name) = named
            .keys()
            .find(|n| !known.contains(n.as_str()) && !ignorable(config, n))
        {
            return Err(ModelError::tensor(
                name,
                format!(
                    "not a parameter of this {} config",
                    config.architecture.hf_class()
                ),
            ));
        }
        for (name, shape) in shapes {
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
                let qk_norm = |s: &str| config.qk_norm().then(|| get(&p(s)));
                LayerWeights {
                    input_layernorm: get(&p("input_layernorm.weight")),
                    q_proj: get(&p("self_attn.q_proj.weight")),
                    q_bias: bias("self_attn.q_proj.bias"),
                    k_proj: get(&p("self_attn.k_proj.weight")),
                    k_bias: bias("self_attn.k_proj.bias"),
                    v_proj: get(&p("self_attn.v_proj.weight")),
                    v_bias: bias("self_attn.v_proj.bias"),
                    q_norm: qk_norm("self_attn.q_norm.weight"),
                    k_norm: qk_norm("self_attn.k_norm.weight"),
                    o_proj: get(&p("self_attn.o_proj.weight")),
                    post_attention_layernorm: get(&p("post_attention_layernorm.weight")),
                    gate_proj: get(&p("mlp.gate_proj.weight")),
                    up_proj: get(&p("mlp.up_proj.weight")),
                    down_proj: get(&p("mlp.down_proj.weight")),
                    packed: None,
                    lora: None,
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
                ("self_attn.q_norm.weight", &w.q_norm),
                ("self_attn.k_norm.weight", &w.k_norm),
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
        // with LoRA, of the merged weights: what a snapshot of these holds
        for (name, t) in self.merged()?.named() {
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

    /// A copy of every tensor converted to `dtype` on `device` (packed layers stay packed).
    pub fn to(&self, dtype: DType, device: &Device) -> Result<Self> {
        self.map(|t| Ok(t.to_device(device)?.to_dtype(dtype)?), false)
    }

    /// The same weights cut from any autograd graph (storage shared, no copy). Generation runs
    /// on these: candle has no no-grad mode, and a KV cache built from `Var`s would keep every
    /// step's graph alive.
    pub fn detach(&self) -> Self {
        self.map(|t| Ok(t.detach()), false)
            .expect("detaching cannot fail")
    }

    /// A deep copy cut from any graph, its layers packed: what the learner publishes to rollout
    /// workers, so that later optimizer steps (which update the `Var`s in place) never reach it,
    /// and generation multiplies once for q/k/v and once for gate/up.
    pub fn snapshot(&self) -> Result<Self> {
        self.detach().merged()?.map(|t| Ok(t.copy()?), true)
    }

    /// The same weights cut from any graph with their layers packed ([`Packed`]): only the
    /// packed matrices are new storage.
    pub fn packed(&self) -> Result<Self> {
        self.detach().merged()?.map(|t| Ok(t.clone()), true)
    }

    /// The weights with every tensor they store through `f` (see [`LayerWeights::map`]), and
    /// their layers packed where `pack`.
    fn map(&self, f: impl Fn(&Tensor) -> Result<Tensor>, pack: bool) -> Result<Self> {
        let layers = self
            .layers
            .iter()
            .map(|l| if pack { l.pack(&f) } else { l.map(&f) })
            .collect::<Result<_>>()?;
        Ok(Weights {
            config: self.config.clone(),
            embed_tokens: f(&self.embed_tokens)?,
            layers,
            norm: f(&self.norm)?,
            lm_head: self.lm_head.as_ref().map(&f).transpose()?,
        })
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
        // every tensor of the files, so that `from_named` sees one the config does not explain
        let mut named = BTreeMap::new();
        for (name, _) in st.tensors() {
            if ignorable(&config, &name) {
                continue;
            }
            let t = st
                .load(&name, device)
                .map_err(|e| ModelError::tensor(&name, format!("cannot load: {e}")))?;
            match t.dtype() {
                DType::F32 | DType::BF16 | DType::F16 => {}
                other => {
                    return Err(ModelError::tensor(
                        &name,
                        format!("dtype {other:?} (supported: f32, bf16, f16)"),
                    ))
                }
            }
            named.insert(name, t.to_dtype(dtype)?);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Weights {
        let c = crate::builtin::tiny_config(64, 2);
        crate::init::random_weights(&c, 0.5, 3, &Device::Cpu).unwrap()
    }

    fn values(t: &Tensor) -> Vec<f32> {
        let t = t.to_dtype(DType::F32).unwrap();
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    /// Every named tensor of `a` equals `b`'s, shape and values.
    fn same_named(a: &Weights, b: &Weights) {
        let (a, b) = (a.named(), b.named());
        assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
        for (name, t) in &a {
            assert_eq!(t.dims(), b[name].dims(), "{name}");
            assert_eq!(values(t), values(&b[name]), "{name}");
        }
    }

    #[test]
    fn a_tensor_the_config_does_not_explain_is_an_error_from_any_source() {
        // e.g. a qwen2 GGUF file holding q/k norms: mapped to HF names, then refused here
        let w = tiny();
        let mut named = w.named();
        let norm = "model.layers.0.self_attn.q_norm.weight";
        named.insert(
            norm.into(),
            Tensor::ones(32, DType::F32, &Device::Cpu).unwrap(),
        );
        let e = Weights::from_named(&w.config, &named)
            .unwrap_err()
            .to_string();
        assert!(e.contains(norm) && e.contains("Qwen2ForCausalLM"), "{e}");
        // a tied model's lm_head copy is passed over
        let mut named = w.named();
        named.insert("lm_head.weight".into(), w.embed_tokens.clone());
        assert!(Weights::from_named(&w.config, &named).is_ok());
    }

    #[test]
    fn a_snapshot_packs_each_layer_and_reads_as_the_weights_it_copies() {
        let w = tiny();
        let snap = w.snapshot().unwrap();
        same_named(&w, &snap);
        assert_eq!(w.checksum().unwrap(), snap.checksum().unwrap());
        for (l, layer) in snap.layers.iter().enumerate() {
            let p = layer.packed.as_ref().expect("packed");
            let c = &w.config;
            let (q, kv) = (
                c.num_attention_heads * c.head_dim,
                c.num_key_value_heads * c.head_dim,
            );
            let i = c.intermediate_size;
            assert_eq!(p.qkv.dims(), [q + 2 * kv, 64], "layer {l}");
            assert_eq!(p.qkv_bias.as_ref().unwrap().dims(), [q + 2 * kv]);
            assert_eq!(p.gate_up.dims(), [2 * i, 64]);
            // the projections are its rows: q's, then k's, then v's; gate's, then up's
            let cat = |ts: &[&Tensor]| values(&Tensor::cat(ts, 0).unwrap());
            let unpacked = &w.layers[l];
            let qkv = [&unpacked.q_proj, &unpacked.k_proj, &unpacked.v_proj];
            assert_eq!(values(&p.qkv), cat(&qkv));
            assert_eq!(
                values(&p.gate_up),
                cat(&[&unpacked.gate_proj, &unpacked.up_proj])
            );
        }
        // a deep copy: writing the source leaves the snapshot as it was
        let (vars, trained) = w.to_vars().unwrap();
        let snap = trained.snapshot().unwrap();
        for (_, v) in &vars {
            v.set(&v.as_tensor().affine(0.0, 1.0).unwrap()).unwrap();
        }
        same_named(&w, &snap);
    }

    #[test]
    fn packed_weights_stay_packed_through_to_and_detach_and_train_unpacked() {
        let w = tiny();
        let packed = w.packed().unwrap();
        for moved in [
            packed.detach(),
            packed.to(DType::F32, &Device::Cpu).unwrap(),
        ] {
            assert!(moved.layers.iter().all(|l| l.packed.is_some()));
            same_named(&w, &moved);
        }
        let bf16 = packed.to(DType::BF16, &Device::Cpu).unwrap();
        assert!(bf16.layers.iter().all(|l| l.packed.is_some()));
        same_named(&w.to(DType::BF16, &Device::Cpu).unwrap(), &bf16);
        // trainable copies are one Var per parameter, each its own storage
        let (vars, trained) = packed.to_vars().unwrap();
        assert!(trained.layers.iter().all(|l| l.packed.is_none()));
        same_named(&w, &trained);
        let q = &vars
            .iter()
            .find(|(n, _)| n == "model.layers.0.self_attn.q_proj.weight")
            .unwrap()
            .1;
        q.set(&q.as_tensor().zeros_like().unwrap()).unwrap();
        let k = &trained.layers[0].k_proj;
        assert_eq!(values(k), values(&w.layers[0].k_proj), "k untouched");
        same_named(&w, &packed);
    }

    #[test]
    fn packed_weights_save_as_the_unpacked_do() {
        let dir = std::env::temp_dir().join(format!("ferrite-packed-save-{}", std::process::id()));
        let w = tiny();
        w.packed()
            .unwrap()
            .save_dir(&dir, DType::F32, usize::MAX)
            .unwrap();
        let back = Weights::load_dir(&dir, DType::F32, &Device::Cpu).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        same_named(&w, &back);
    }
}
