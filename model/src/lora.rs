//! LoRA (Hu et al. 2021) as PEFT computes and stores it: a frozen projection `W [out, in]` plus
//! a trainable low-rank update, `y = x·Wᵀ + (α/r)·(x·Aᵀ)·Bᵀ` with `A [r, in]`, `B [out, r]`.
//! A fresh adapter has PEFT's initialisation (`A` Kaiming-uniform, bound `1/√in`; `B` zeros), so
//! training starts from the base model exactly. Adapters are saved and loaded in PEFT's layout
//! (`adapter_model.safetensors` with `base_model.model.<module>.lora_A.weight` names, and
//! `adapter_config.json`), and folded into the weights (`W + (α/r)·B·A`) wherever a forward
//! runs without a graph: generation always runs on merged weights.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};
use crate::rng::Rng;
use crate::weights::{LayerWeights, Weights};

/// A projection LoRA can adapt, by its HF module name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Target {
    #[serde(rename = "q_proj")]
    Q,
    #[serde(rename = "k_proj")]
    K,
    #[serde(rename = "v_proj")]
    V,
    #[serde(rename = "o_proj")]
    O,
    #[serde(rename = "gate_proj")]
    Gate,
    #[serde(rename = "up_proj")]
    Up,
    #[serde(rename = "down_proj")]
    Down,
}

impl Target {
    pub const ALL: [Target; 7] = [
        Target::Q,
        Target::K,
        Target::V,
        Target::O,
        Target::Gate,
        Target::Up,
        Target::Down,
    ];

    /// The module's path inside a decoder layer (`self_attn.q_proj`).
    pub fn module(self) -> &'static str {
        match self {
            Target::Q => "self_attn.q_proj",
            Target::K => "self_attn.k_proj",
            Target::V => "self_attn.v_proj",
            Target::O => "self_attn.o_proj",
            Target::Gate => "mlp.gate_proj",
            Target::Up => "mlp.up_proj",
            Target::Down => "mlp.down_proj",
        }
    }

    /// PEFT's `target_modules` name.
    pub fn name(self) -> &'static str {
        self.module().rsplit('.').next().unwrap_or_default()
    }

    pub fn from_name(name: &str) -> Option<Target> {
        Target::ALL.into_iter().find(|t| t.name() == name)
    }

    /// The layer's frozen weight `[out, in]` this target adapts.
    pub fn weight(self, w: &LayerWeights) -> &Tensor {
        match self {
            Target::Q => &w.q_proj,
            Target::K => &w.k_proj,
            Target::V => &w.v_proj,
            Target::O => &w.o_proj,
            Target::Gate => &w.gate_proj,
            Target::Up => &w.up_proj,
            Target::Down => &w.down_proj,
        }
    }

    fn weight_mut(self, w: &mut LayerWeights) -> &mut Tensor {
        match self {
            Target::Q => &mut w.q_proj,
            Target::K => &mut w.k_proj,
            Target::V => &mut w.v_proj,
            Target::O => &mut w.o_proj,
            Target::Gate => &mut w.gate_proj,
            Target::Up => &mut w.up_proj,
            Target::Down => &mut w.down_proj,
        }
    }
}

/// The adapter's shape: rank `r`, `alpha` (the update is scaled by `alpha / r`) and the
/// projections it adapts in every layer.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    pub targets: Vec<Target>,
}

impl LoraConfig {
    /// The configuration with its targets in one order and each once (as PEFT's set of
    /// `target_modules`: the order written does not matter).
    pub fn new(rank: usize, alpha: f64, mut targets: Vec<Target>) -> LoraConfig {
        targets.sort();
        targets.dedup();
        LoraConfig {
            rank,
            alpha,
            targets,
        }
    }

    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }
}

/// One projection's update: `A [r, in]`, `B [out, r]`.
#[derive(Debug, Clone)]
pub struct Adapter {
    pub a: Tensor,
    pub b: Tensor,
}

/// A layer's adapters and their scale `α/r`.
#[derive(Debug, Clone)]
pub struct LayerLora {
    pub scale: f64,
    pub adapters: Vec<(Target, Adapter)>,
}

impl LayerLora {
    pub fn get(&self, target: Target) -> Option<&Adapter> {
        self.adapters
            .iter()
            .find(|(t, _)| *t == target)
            .map(|(_, a)| a)
    }

    fn map(&self, f: &impl Fn(&Tensor) -> Result<Tensor>) -> Result<LayerLora> {
        let adapters = self
            .adapters
            .iter()
            .map(|(t, ad)| {
                Ok((
                    *t,
                    Adapter {
                        a: f(&ad.a)?,
                        b: f(&ad.b)?,
                    },
                ))
            })
            .collect::<Result<_>>()?;
        Ok(LayerLora {
            scale: self.scale,
            adapters,
        })
    }
}

/// `(α/r)·(x·Aᵀ)·Bᵀ` for `x [.., in]` → `[.., out]`: two thin products, never `B·A`.
pub fn delta(x: &Tensor, adapter: &Adapter, scale: f64) -> Result<Tensor> {
    let down = crate::forward::linear(x, &adapter.a, None)?; // [.., r]
    Ok((crate::forward::linear(&down, &adapter.b, None)? * scale)?)
}

/// `W + (α/r)·B·A` in f32, returned in `dtype` (None: `w`'s).
pub fn merged(w: &Tensor, adapter: &Adapter, scale: f64, dtype: Option<DType>) -> Result<Tensor> {
    let f32 = |t: &Tensor| t.to_dtype(DType::F32);
    let update = (f32(&adapter.b)?.matmul(&f32(&adapter.a)?)? * scale)?; // [out, in]
    Ok((f32(w)? + update)?.to_dtype(dtype.unwrap_or(w.dtype()))?)
}

/// PEFT's name of a layer's adapter matrix (`which`: `lora_A` or `lora_B`).
pub fn peft_name(layer: usize, target: Target, which: &str) -> String {
    format!(
        "base_model.model.model.layers.{layer}.{}.{which}.weight",
        target.module()
    )
}

pub const ADAPTER_FILE: &str = "adapter_model.safetensors";
/// A checkpoint's directory of its adapter (beside the merged model).
pub const ADAPTER_DIR: &str = "adapter";
pub const ADAPTER_CONFIG: &str = "adapter_config.json";

/// PEFT's `adapter_config.json` fields that ferrite reads and writes.
#[derive(Debug, Serialize, Deserialize)]
struct PeftConfig {
    peft_type: String,
    task_type: Option<String>,
    r: usize,
    lora_alpha: f64,
    target_modules: Vec<String>,
    #[serde(default)]
    lora_dropout: f64,
    #[serde(default)]
    bias: String,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    fan_in_fan_out: bool,
    #[serde(default)]
    base_model_name_or_path: Option<String>,
    #[serde(default)]
    inference_mode: bool,
    /// Options that would make PEFT apply the adapter otherwise than plain LoRA: refused when set.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    rank_pattern: BTreeMap<String, serde_json::Value>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    alpha_pattern: BTreeMap<String, serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    layers_to_transform: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    modules_to_save: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    lora_bias: bool,
}

impl Weights {
    /// The weights with fresh adapters on every layer's `targets` (PEFT's initialisation from a
    /// seeded stream: the same seed, the same adapters), in the weights' dtype; the base
    /// tensors are shared.
    pub fn with_lora(&self, c: &LoraConfig, seed: u64) -> Result<Weights> {
        if c.rank == 0 || c.targets.is_empty() || !(c.alpha.is_finite() && c.alpha > 0.0) {
            return Err(ModelError::Unsupported(format!(
                "LoRA rank {}, alpha {}, {} targets: a positive rank and alpha and a target",
                c.rank,
                c.alpha,
                c.targets.len()
            )));
        }
        let mut rng = Rng::stream(seed, 0x4c6f_5241);
        let mut named = BTreeMap::new();
        for (l, layer) in self.layers.iter().enumerate() {
            for &t in &c.targets {
                let (out, inp) = t.weight(layer).dims2()?;
                let bound = 1.0 / (inp as f64).sqrt();
                let a: Vec<f32> = (0..c.rank * inp)
                    .map(|_| ((2.0 * rng.uniform() - 1.0) * bound) as f32)
                    .collect();
                let a = Tensor::from_vec(a, (c.rank, inp), &Device::Cpu)?;
                named.insert(peft_name(l, t, "lora_A"), a);
                named.insert(
                    peft_name(l, t, "lora_B"),
                    Tensor::zeros((out, c.rank), DType::F32, &Device::Cpu)?,
                );
            }
        }
        self.with_lora_named(c, &named)
    }

    /// The weights reading their adapters from `named` (PEFT's names; every target of `c` in
    /// every layer, with the shapes the weights imply), converted to the weights' dtype and
    /// device. A missing or misshapen matrix, or one `c` does not explain, is an error.
    pub fn with_lora_named(
        &self,
        c: &LoraConfig,
        named: &BTreeMap<String, Tensor>,
    ) -> Result<Weights> {
        let (dtype, device) = (self.embed_tokens.dtype(), self.embed_tokens.device());
        let mut used = 0;
        let mut layers = Vec::with_capacity(self.layers.len());
        for (l, layer) in self.layers.iter().enumerate() {
            let mut adapters = Vec::new();
            for &t in &c.targets {
                let (out, inp) = t.weight(layer).dims2()?;
                let mut get = |which: &str, shape: (usize, usize)| -> Result<Tensor> {
                    let name = peft_name(l, t, which);
                    let m = named
                        .get(&name)
                        .ok_or_else(|| ModelError::tensor(&name, "missing from the adapter"))?;
                    if m.dims() != [shape.0, shape.1] {
                        return Err(ModelError::tensor(
                            &name,
                            format!("shape {:?}, expected {shape:?}", m.dims()),
                        ));
                    }
                    used += 1;
                    Ok(m.to_device(device)?.to_dtype(dtype)?)
                };
                let a = get("lora_A", (c.rank, inp))?;
                let b = get("lora_B", (out, c.rank))?;
                adapters.push((t, Adapter { a, b }));
            }
            // a packed layer's projections are row views of its packed matrices: the base
            // reads them as they are, and each projection takes its own update
            let mut layer = layer.clone();
            layer.packed = None;
            layer.lora = Some(LayerLora {
                scale: c.scale(),
                adapters,
            });
            layers.push(layer);
        }
        if used != named.len() {
            let extra = named
                .keys()
                .find(|n| {
                    !(0..self.layers.len()).any(|l| {
                        c.targets.iter().any(|&t| {
                            **n == peft_name(l, t, "lora_A") || **n == peft_name(l, t, "lora_B")
                        })
                    })
                })
                .cloned()
                .unwrap_or_default();
            return Err(ModelError::tensor(
                &extra,
                "not an adapter matrix of this configuration",
            ));
        }
        Ok(Weights {
            layers,
            ..self.clone()
        })
    }

    /// The adapters' matrices under PEFT's names (empty without LoRA).
    pub fn lora_named(&self) -> BTreeMap<String, Tensor> {
        let mut out = BTreeMap::new();
        for (l, layer) in self.layers.iter().enumerate() {
            for (t, ad) in layer.lora.iter().flat_map(|x| &x.adapters) {
                out.insert(peft_name(l, *t, "lora_A"), ad.a.clone());
                out.insert(peft_name(l, *t, "lora_B"), ad.b.clone());
            }
        }
        out
    }

    /// The adapter's configuration, None without LoRA.
    pub fn lora_config(&self) -> Option<LoraConfig> {
        let first = self.layers.first()?.lora.as_ref()?;
        let ad = &first.adapters.first()?.1;
        let rank = ad.a.dim(0).ok()?;
        Some(LoraConfig {
            rank,
            alpha: first.scale * rank as f64,
            targets: first.adapters.iter().map(|(t, _)| *t).collect(),
        })
    }

    /// Trainable adapters: one `Var` per adapter matrix (PEFT's names), and weights whose base
    /// is detached (frozen) and whose adapters read the `Var`s.
    pub fn lora_to_vars(&self) -> Result<(Vec<(String, Var)>, Weights)> {
        let c = self.lora_config().ok_or_else(|| {
            ModelError::Unsupported("trainable adapters of weights without LoRA".into())
        })?;
        let mut vars = Vec::new();
        let mut named = BTreeMap::new();
        for (n, t) in self.lora_named() {
            let v = Var::from_tensor(&t.detach())?;
            named.insert(n.clone(), v.as_tensor().clone());
            vars.push((n, v));
        }
        let mut base = self.detach();
        for l in &mut base.layers {
            l.lora = None;
        }
        // the Vars' tensors as they are: no conversion that would cut them from the Vars
        let layers = base
            .layers
            .iter()
            .enumerate()
            .map(|(l, layer)| {
                let adapters = c
                    .targets
                    .iter()
                    .map(|&t| {
                        let a = named[&peft_name(l, t, "lora_A")].clone();
                        let b = named[&peft_name(l, t, "lora_B")].clone();
                        (t, Adapter { a, b })
                    })
                    .collect();
                let mut layer = layer.clone();
                layer.lora = Some(LayerLora {
                    scale: c.scale(),
                    adapters,
                });
                layer
            })
            .collect();
        Ok((vars, Weights { layers, ..base }))
    }

    /// The weights with every adapter folded in (`W + (α/r)·B·A`) and none left; weights
    /// without LoRA as they are (storage shared).
    pub fn merged(&self) -> Result<Weights> {
        self.merged_as(None)
    }

    /// [`Weights::merged`] with the merged projections in `dtype` (None: their own): a
    /// checkpoint of bf16 weights writes `W + (α/r)·B·A` in f32, not its bf16 rounding, in which
    /// a small update would vanish.
    pub fn merged_as(&self, dtype: Option<DType>) -> Result<Weights> {
        let mut out = self.clone();
        for layer in &mut out.layers {
            let Some(lora) = layer.lora.take() else {
                continue;
            };
            for (t, ad) in &lora.adapters {
                let w = t.weight(layer).detach();
                *t.weight_mut(layer) = merged(&w, &ad.detach(), lora.scale, dtype)?;
            }
        }
        Ok(out)
    }

    /// Writes the adapters as PEFT does (`adapter_model.safetensors` in `dtype`,
    /// `adapter_config.json`), `base` naming the base model where known.
    pub fn save_adapter(&self, dir: &Path, dtype: DType, base: Option<&str>) -> Result<()> {
        let c = self.lora_config().ok_or_else(|| {
            ModelError::Unsupported("saving the adapter of weights without LoRA".into())
        })?;
        std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
        let config = PeftConfig {
            peft_type: "LORA".into(),
            task_type: Some("CAUSAL_LM".into()),
            r: c.rank,
            lora_alpha: c.alpha,
            target_modules: c.targets.iter().map(|t| t.name().to_string()).collect(),
            lora_dropout: 0.0,
            bias: "none".into(),
            use_rslora: false,
            use_dora: false,
            fan_in_fan_out: false,
            base_model_name_or_path: base.map(str::to_string),
            inference_mode: true,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            layers_to_transform: None,
            modules_to_save: None,
            lora_bias: false,
        };
        let path = dir.join(ADAPTER_CONFIG);
        let json = serde_json::to_string_pretty(&config).map_err(|source| ModelError::Json {
            path: path.clone(),
            source,
        })?;
        std::fs::write(&path, json).map_err(|e| ModelError::io(&path, e))?;
        let tensors = self
            .lora_named()
            .into_iter()
            .map(|(n, t)| Ok((n, t.to_device(&Device::Cpu)?.to_dtype(dtype)?.contiguous()?)))
            .collect::<Result<Vec<_>>>()?;
        let path = dir.join(ADAPTER_FILE);
        candle_core::safetensors::save(&tensors.into_iter().collect(), &path)?;
        Ok(())
    }
}

impl Adapter {
    fn detach(&self) -> Adapter {
        Adapter {
            a: self.a.detach(),
            b: self.b.detach(),
        }
    }
}

impl LayerWeights {
    /// The layer's adapters through `f` (None stays None).
    pub(crate) fn map_lora(
        &self,
        f: &impl Fn(&Tensor) -> Result<Tensor>,
    ) -> Result<Option<LayerLora>> {
        self.lora.as_ref().map(|l| l.map(f)).transpose()
    }
}

/// Reads a PEFT adapter directory: its configuration and its matrices (f32, on the CPU). An
/// adapter ferrite would not apply as PEFT does (DoRA, rsLoRA, trained biases, fan-in-fan-out
/// layouts, other PEFT methods, other modules) is an error that says which.
pub fn load_adapter(dir: &Path) -> Result<(LoraConfig, BTreeMap<String, Tensor>)> {
    let path = dir.join(ADAPTER_CONFIG);
    let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
    let pc: PeftConfig = serde_json::from_str(&text).map_err(|source| ModelError::Json {
        path: path.clone(),
        source,
    })?;
    let unsupported = |what: &str| ModelError::Unsupported(format!("{}: {what}", path.display()));
    if pc.peft_type != "LORA" {
        return Err(unsupported(&format!(
            "peft_type {} (LORA only)",
            pc.peft_type
        )));
    }
    if pc.use_dora
        || pc.use_rslora
        || pc.fan_in_fan_out
        || pc.lora_bias
        || !matches!(pc.bias.as_str(), "" | "none")
    {
        return Err(unsupported(
            "DoRA, rsLoRA, fan_in_fan_out or trained biases (plain LoRA only)",
        ));
    }
    if !pc.rank_pattern.is_empty()
        || !pc.alpha_pattern.is_empty()
        || pc
            .layers_to_transform
            .as_ref()
            .is_some_and(|v| !v.is_null())
        || pc.modules_to_save.as_ref().is_some_and(|v| !v.is_null())
    {
        return Err(unsupported(
            "per-module ranks or alphas, a subset of layers, or fully trained modules \
             (modules_to_save): one rank and alpha on every layer only",
        ));
    }
    let targets = pc
        .target_modules
        .iter()
        .map(|n| Target::from_name(n).ok_or_else(|| unsupported(&format!("target module {n}"))))
        .collect::<Result<Vec<_>>>()?;
    let file = dir.join(ADAPTER_FILE);
    let named: BTreeMap<String, Tensor> = candle_core::safetensors::load(&file, &Device::Cpu)?
        .into_iter()
        .map(|(n, t)| Ok((n, t.to_dtype(DType::F32)?)))
        .collect::<Result<_>>()?;
    Ok((LoraConfig::new(pc.r, pc.lora_alpha, targets), named))
}
