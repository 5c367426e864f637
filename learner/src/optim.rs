//! AdamW with f32 moments, decoupled weight decay (not on biases and norm weights), global-norm
//! gradient clipping, gradient accumulation over micro-batches, optional update masks, and a
//! state that checkpoints exactly (candle-nn's AdamW exposes none of this).
//!
//! On the CPU the update is one fused, multi-threaded pass over host buffers per parameter; on
//! other devices it is composed of tensor ops. Parameters that compute in f16 have their loss
//! scaled ([`crate::scaler`]).

use std::collections::HashMap;
use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use model::Weights;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

pub use crate::error::{LearnerError as OptimError, Result};
use crate::fit::{Fit, PROBE_EVERY};
use crate::scaler::{self, LossScale};
use model::error::Regrow;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Clip the global gradient norm to this (None: no clipping).
    pub max_grad_norm: Option<f64>,
    /// The loss scale that f16 parameters start from ([`crate::scaler`]).
    pub initial_loss_scale: f64,
    /// Finite steps in a row after which the loss scale doubles.
    pub loss_scale_window: u64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            max_grad_norm: Some(1.0),
            initial_loss_scale: scaler::INITIAL,
            loss_scale_window: scaler::GROWTH_INTERVAL,
        }
    }
}

/// What one optimizer step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// Global L2 norm of the accumulated gradient, before clipping.
    pub grad_norm: f64,
    pub clipped: bool,
    /// The step was skipped: the gradient was not finite.
    pub skipped: bool,
}

enum Moments {
    /// CPU: master copy and moments as host vectors.
    Host {
        p: Vec<f32>,
        m: Vec<f32>,
        v: Vec<f32>,
    },
    /// Other devices: the moments as f32 tensors, and an f32 master copy of a parameter held
    /// in a lower precision (bf16 compute weights lose any update below their resolution).
    Device {
        m: Tensor,
        v: Tensor,
        master: Option<Tensor>,
    },
}

struct Param {
    name: String,
    var: Var,
    decay: bool,
    moments: Moments,
    /// Accumulated gradient of the current step.
    grad: Option<Tensor>,
    /// Elements that may change (None: all).
    mask: Option<Vec<bool>>,
    /// The mask as 0/1 f32 in the parameter's shape, applied to every gradient.
    mask_tensor: Option<Tensor>,
}

pub struct AdamW {
    config: AdamWConfig,
    params: Vec<Param>,
    step: u64,
    /// How much of a micro-batch the device has room for: learnt by the steps that accumulate
    /// into this optimizer, and kept for the run ([`crate::fit`]).
    pub(crate) fitting: Regrow<Fit>,
    /// The loss scale, where a parameter computes in f16 (None: none does).
    scaler: Option<LossScale>,
    /// The norm of the accumulated (scaled) gradient, where [`AdamW::overflowed`] took it.
    checked_norm: Option<f64>,
}

impl AdamW {
    /// Weight decay applies to matrices (2-D), not to biases and norm weights, as in the
    /// parameter groups of transformers' Trainer.
    pub fn new(vars: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        Self::build(vars, config, false)
    }

    /// The composed-op update that non-CPU devices use, forced on any device (to test it on
    /// the CPU against the fused path).
    pub fn new_composed(vars: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        Self::build(vars, config, true)
    }

    fn build(vars: Vec<(String, Var)>, config: AdamWConfig, composed: bool) -> Result<Self> {
        let params = vars
            .into_iter()
            .map(|(name, var)| {
                let t = var.as_tensor();
                let moments = if t.device().is_cpu() && !composed {
                    let p = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                    let n = p.len();
                    Moments::Host {
                        p,
                        m: vec![0.0; n],
                        v: vec![0.0; n],
                    }
                } else {
                    // separate buffers: the fused CUDA step updates them in place
                    let zeros = || Tensor::zeros(t.shape(), DType::F32, t.device());
                    let master = (t.dtype() != DType::F32)
                        .then(|| t.to_dtype(DType::F32))
                        .transpose()?;
                    Moments::Device {
                        m: zeros()?,
                        v: zeros()?,
                        master,
                    }
                };
                Ok(Param {
                    decay: t.rank() >= 2,
                    name,
                    var,
                    moments,
                    grad: None,
                    mask: None,
                    mask_tensor: None,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let f16 = params
            .iter()
            .any(|p| p.var.as_tensor().dtype() == DType::F16);
        Ok(AdamW {
            config,
            params,
            step: 0,
            fitting: Regrow::new(Fit::default(), PROBE_EVERY),
            scaler: f16
                .then(|| LossScale::new(config.initial_loss_scale, config.loss_scale_window)),
            checked_norm: None,
        })
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// What the steps accumulating into this optimizer have learnt fits in device memory.
    pub fn fit(&self) -> Fit {
        self.fitting.size()
    }

    /// Optimizer steps taken.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// The loss scale, where a parameter computes in f16.
    pub fn loss_scale(&self) -> Option<LossScale> {
        self.scaler
    }

    pub fn vars(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.params.iter().map(|p| (p.name.as_str(), &p.var))
    }

    /// Restricts `name` to `mask`: its gradient is multiplied by the mask (so masked entries
    /// count in neither the clipping norm nor the moments) and its update, weight decay
    /// included, skips masked entries.
    pub fn set_mask(&mut self, name: &str, mask: Vec<bool>) -> Result<()> {
        let p = self
            .params
            .iter_mut()
            .find(|p| p.name == name)
            .ok_or_else(|| OptimError::State {
                path: name.into(),
                message: "no such parameter".into(),
            })?;
        if mask.len() != p.var.as_tensor().elem_count() {
            return Err(OptimError::State {
                path: name.into(),
                message: "mask size differs from the parameter".into(),
            });
        }
        let t = p.var.as_tensor();
        let ones: Vec<f32> = mask.iter().map(|&k| f32::from(u8::from(k))).collect();
        p.mask_tensor = Some(Tensor::from_vec(ones, t.shape(), t.device())?);
        p.mask = Some(mask);
        Ok(())
    }

    /// Adds `scale ·` the gradients of one micro-batch to the step's accumulated gradient.
    /// Returns the names of parameters that received no gradient.
    ///
    /// The accumulated gradient is f32, but for a step of one micro-batch (scale 1, no mask) on
    /// a non-CPU device, whose gradient stays as the backward left it: bf16 for a bf16
    /// parameter, which the update widens as it reads (the fused CUDA step in its registers), so
    /// that no f32 copy of every gradient is written. Either way the update sees the same values.
    ///
    /// With f16 parameters `grads` must be of the loss times the loss scale, as
    /// [`AdamW::backward`] takes them: the step divides by it.
    pub fn accumulate(&mut self, grads: &GradStore, scale: f64) -> Result<Vec<String>> {
        self.checked_norm = None;
        let mut missing = Vec::new();
        for p in &mut self.params {
            match grads.get(p.var.as_tensor()) {
                Some(g) => {
                    let as_is = p.grad.is_none()
                        && scale == 1.0
                        && p.mask_tensor.is_none()
                        && matches!(p.moments, Moments::Device { .. });
                    if as_is {
                        p.grad = Some(g.clone());
                        continue;
                    }
                    let mut g = g.to_dtype(DType::F32)?;
                    if scale != 1.0 {
                        g = (g * scale)?;
                    }
                    if let Some(m) = &p.mask_tensor {
                        // ∇ ← m ⊙ ∇: masked entries count neither in the norm nor the moments
                        g = (g * m)?;
                    }
                    p.grad = Some(match p.grad.take() {
                        Some(acc) => (acc.to_dtype(DType::F32)? + g)?,
                        None => g,
                    });
                }
                None => missing.push(p.name.clone()),
            }
        }
        Ok(missing)
    }

    /// Backpropagates a micro-batch loss and accumulates its gradient, unless the loss is not
    /// finite: then the step's gradient is dropped. Returns the loss's value and, when it was
    /// accumulated, the names of parameters that received no gradient.
    ///
    /// The backward is queued before the loss is read back: on a GPU, reading the loss first
    /// would leave the device idle while the host walks the backward graph. A non-finite loss
    /// (rare) costs a discarded backward instead.
    ///
    /// With f16 parameters the backward is of the loss times the loss scale; [`AdamW::step`]
    /// divides the gradient by it.
    pub fn backward(&mut self, loss: &Tensor) -> Result<(f64, Option<Vec<String>>)> {
        let grads = match self.scaler {
            Some(s) => model::checkpoint::backward(&(loss * s.scale)?)?,
            None => model::checkpoint::backward(loss)?,
        };
        let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        if !value.is_finite() {
            self.zero_grad();
            return Ok((value, None));
        }
        Ok((value, Some(self.accumulate(&grads, 1.0)?)))
    }

    /// Drops the accumulated gradient (e.g. after a skipped step).
    pub fn zero_grad(&mut self) {
        self.checked_norm = None;
        for p in &mut self.params {
            p.grad = None;
        }
    }

    /// Whether the accumulated gradient, scaled for f16, overflowed where a smaller scale may
    /// not: then the scale has halved and the gradient is dropped, for the step to run again
    /// ([`crate::fit::fitted`] does). False without f16 parameters, for a finite gradient, and
    /// at the smallest scale (the step then skips it as any non-finite gradient).
    pub fn overflowed(&mut self) -> Result<bool> {
        if self.scaler.is_none() {
            return Ok(false);
        }
        let norm = self.sum_squares()?.sqrt();
        if !norm.is_finite() && self.scaler.as_mut().is_some_and(LossScale::back_off) {
            self.zero_grad();
            return Ok(true);
        }
        self.checked_norm = Some(norm);
        Ok(false)
    }

    /// One AdamW step with learning rate `lr` on the accumulated gradient, then clears it.
    pub fn step(&mut self, lr: f64) -> Result<StepStats> {
        let raw_norm = match self.checked_norm.take() {
            Some(n) => n,
            None => self.sum_squares()?.sqrt(),
        };
        let unscale = self.scaler.map_or(1.0, |s| 1.0 / s.scale);
        let grad_norm = raw_norm * unscale;
        if !grad_norm.is_finite() {
            self.zero_grad();
            if let Some(s) = &mut self.scaler {
                s.back_off(); // a step not run through `overflowed`: the next one runs smaller
            }
            return Ok(StepStats {
                grad_norm,
                clipped: false,
                skipped: true,
            });
        }
        let clip = match self.config.max_grad_norm {
            Some(max) if grad_norm > max => max / (grad_norm + 1e-6),
            _ => 1.0,
        };
        if let Some(s) = &mut self.scaler {
            s.stepped();
        }
        // what each (scaled) gradient is multiplied by: the clip and the loss scale's inverse
        let factor = clip * unscale;
        self.step += 1;
        let c = self.config;
        let t = self.step as i32;
        let bias1 = 1.0 - c.beta1.powi(t);
        let bias2 = 1.0 - c.beta2.powi(t);
        let fused = self.fused_step(lr, factor, bias1, bias2)?;
        for (p, fused) in self.params.iter_mut().zip(fused) {
            let Some(g) = p.grad.take() else { continue };
            if fused {
                continue;
            }
            let decay = if p.decay { lr * c.weight_decay } else { 0.0 };
            let shape = p.var.as_tensor().shape().clone();
            let dtype = p.var.as_tensor().dtype();
            match &mut p.moments {
                Moments::Host { p: w, m, v } => {
                    let g = g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                    let mask = p.mask.as_deref();
                    host_update(
                        w,
                        m,
                        v,
                        &g,
                        mask,
                        HostStep {
                            lr,
                            decay,
                            factor,
                            bias1,
                            bias2,
                            c,
                        },
                    );
                    let t = Tensor::from_slice(w, shape, &Device::Cpu)?.to_dtype(dtype)?;
                    p.var.set(&t)?;
                }
                Moments::Device { m, v, master } => {
                    let g = (g.to_dtype(DType::F32)? * factor)?;
                    *m = ((&*m * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
                    *v = ((&*v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
                    let w = match master {
                        Some(w) => w.clone(),
                        None => p.var.as_tensor().to_dtype(DType::F32)?,
                    };
                    let denom = ((v.sqrt()? / bias2.sqrt())? + c.eps)?;
                    let update = ((m.div(&denom)? * (lr / bias1))? + (&w * decay)?)?;
                    let update = match &p.mask {
                        Some(mask) => {
                            let keep: Vec<f32> =
                                mask.iter().map(|&k| f32::from(u8::from(k))).collect();
                            (update * Tensor::from_vec(keep, w.shape(), w.device())?)?
                        }
                        None => update,
                    };
                    let w = (w - update)?;
                    p.var.set(&w.to_dtype(dtype)?)?;
                    if let Some(master) = master {
                        *master = w;
                    }
                }
            }
        }
        Ok(StepStats {
            grad_norm,
            clipped: clip < 1.0,
            skipped: false,
        })
    }

    /// Σ‖g‖² of the step's gradient (in f32, whatever the gradients' dtype): in one
    /// multi-tensor launch per dtype on a CUDA device, else summed on the device per parameter
    /// with one transfer to the host.
    fn sum_squares(&self) -> Result<f64> {
        let grads: Vec<&Tensor> = self.params.iter().filter_map(|p| p.grad.as_ref()).collect();
        if grads.is_empty() {
            return Ok(0.0);
        }
        #[cfg(feature = "cuda")]
        if model::ops::cuda_kernels()
            && grads
                .iter()
                .all(|g| g.device().is_cuda() && model::ops::kernel_dtype(g.dtype()))
        {
            return Ok(model::cuda::sum_squares(&grads)?);
        }
        let squares = grads
            .iter()
            .map(|g| {
                g.to_dtype(DType::F32)?
                    .sqr()?
                    .sum_all()?
                    .to_dtype(DType::F64)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::stack(&squares, 0)?.sum_all()?.to_scalar::<f64>()?)
    }

    /// Steps, in one multi-tensor launch per compute dtype, every parameter on a CUDA device
    /// that has a gradient and no mask, updating its master, moments and compute weights in
    /// place; returns which parameters it stepped (none without the `cuda` feature, on other
    /// devices, or with the kernels off). Masked parameters take the composed update.
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables, unused_mut))]
    fn fused_step(&self, lr: f64, factor: f64, bias1: f64, bias2: f64) -> Result<Vec<bool>> {
        let mut fused = vec![false; self.params.len()];
        #[cfg(feature = "cuda")]
        if model::ops::cuda_kernels() {
            let c = self.config;
            let mut batch = Vec::new();
            for (p, fused) in self.params.iter().zip(fused.iter_mut()) {
                let (Some(g), Moments::Device { m, v, master }, None) =
                    (&p.grad, &p.moments, &p.mask)
                else {
                    continue;
                };
                let w = p.var.as_tensor();
                // an f32 gradient, or a 16-bit parameter's own 16-bit one
                let dtypes_ok = match master {
                    Some(_) => {
                        matches!(w.dtype(), DType::BF16 | DType::F16)
                            && (g.dtype() == DType::F32 || g.dtype() == w.dtype())
                    }
                    None => w.dtype() == DType::F32 && g.dtype() == DType::F32,
                };
                if !g.device().is_cuda() || !dtypes_ok {
                    continue;
                }
                *fused = true;
                batch.push(model::cuda::AdamWParam {
                    master: master.as_ref().unwrap_or(w),
                    grad: g,
                    m,
                    v,
                    copy: master.as_ref().map(|_| w),
                    decay: if p.decay {
                        (lr * c.weight_decay) as f32
                    } else {
                        0.0
                    },
                });
            }
            model::cuda::adamw(
                &batch,
                model::cuda::AdamWStep {
                    beta1: c.beta1 as f32,
                    beta2: c.beta2 as f32,
                    eps: c.eps as f32,
                    step_size: (lr / bias1) as f32,
                    sqrt_bias2: bias2.sqrt() as f32,
                    clip: factor as f32,
                },
            )?;
        }
        Ok(fused)
    }

    /// `weights` with each parameter that this optimizer holds in a lower precision replaced
    /// by its f32 master (on the host): what a checkpoint saves, so that the model on disk keeps
    /// the precision its updates accumulated in (its bf16 rounding is the compute copy exactly).
    pub fn master_weights(&self, weights: &Weights) -> Result<Weights> {
        let (mut named, mut adapters) = (weights.named(), weights.lora_named());
        for p in &self.params {
            let Some(master) = master_of(p)? else {
                continue;
            };
            if let Some(t) = named.get_mut(&p.name).or(adapters.get_mut(&p.name)) {
                *t = master.reshape(t.shape())?;
            }
        }
        let w = Weights::from_named(&weights.config, &named)?;
        Ok(match weights.lora_config() {
            Some(c) => w.with_lora_named(&c, &adapters)?,
            None => w,
        })
    }

    /// Writes the moments and the step count (`optimizer.safetensors`, `optimizer.json`).
    pub fn save(&self, dir: &Path) -> Result<()> {
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        for p in &self.params {
            let (m, v) = match &p.moments {
                Moments::Host { m, v, .. } => (
                    Tensor::from_slice(m, m.len(), &Device::Cpu)?,
                    Tensor::from_slice(v, v.len(), &Device::Cpu)?,
                ),
                Moments::Device { m, v, .. } => (
                    m.flatten_all()?.to_device(&Device::Cpu)?,
                    v.flatten_all()?.to_device(&Device::Cpu)?,
                ),
            };
            tensors.insert(format!("exp_avg.{}", p.name), m);
            tensors.insert(format!("exp_avg_sq.{}", p.name), v);
            // the f32 master of a parameter held in a lower precision, so that a resumed run
            // continues from it rather than from the rounded weights
            if let Some(master) = master_of(p)? {
                tensors.insert(format!("master.{}", p.name), master);
            }
        }
        let st = dir.join("optimizer.safetensors");
        candle_core::safetensors::save(&tensors, &st)?;
        // what fitted in device memory, and when a larger fit is tried next: a resumed run
        // neither runs out again to learn it nor tries a larger one sooner
        let meta = serde_json::json!({
            "step": self.step,
            "config": self.config,
            "fitting": self.fitting,
            "loss_scale": self.scaler,
        });
        std::fs::write(dir.join("optimizer.json"), meta.to_string()).map_err(|e| {
            OptimError::State {
                path: dir.display().to_string(),
                message: e.to_string(),
            }
        })
    }

    /// Restores what [`AdamW::save`] wrote (the parameters themselves load with the weights).
    pub fn load(&mut self, dir: &Path) -> Result<()> {
        let err = |message: String| OptimError::State {
            path: dir.display().to_string(),
            message,
        };
        let meta: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("optimizer.json")).map_err(|e| err(e.to_string()))?,
        )
        .map_err(|e| err(e.to_string()))?;
        self.step = meta["step"].as_u64().ok_or_else(|| err("no step".into()))?;
        // (states saved before it was kept: the fit learnt afresh)
        if let Some(fitting) = meta.get("fitting") {
            self.fitting = serde_json::from_value(fitting.clone())
                .map_err(|e| err(format!("fitting: {e}")))?;
        }
        // an f16 run's loss scale (states without one keep the scale they start from)
        if let (Some(s), Some(saved)) = (&mut self.scaler, meta.get("loss_scale")) {
            if !saved.is_null() {
                *s = serde_json::from_value(saved.clone())
                    .map_err(|e| err(format!("loss_scale: {e}")))?;
            }
        }
        let tensors =
            candle_core::safetensors::load(dir.join("optimizer.safetensors"), &Device::Cpu)?;
        for p in &mut self.params {
            let get = |k: &str| {
                tensors
                    .get(&format!("{k}.{}", p.name))
                    .cloned()
                    .ok_or_else(|| err(format!("no {k} for {}", p.name)))
            };
            let (m, v) = (get("exp_avg")?, get("exp_avg_sq")?);
            // the saved master, or (f32 parameters, older states) the weights themselves
            let master = match tensors.get(&format!("master.{}", p.name)) {
                Some(w) => w.clone(),
                None => p.var.as_tensor().to_dtype(DType::F32)?.flatten_all()?,
            };
            match &mut p.moments {
                Moments::Host { p: w, m: hm, v: hv } => {
                    *hm = m.to_vec1::<f32>()?;
                    *hv = v.to_vec1::<f32>()?;
                    *w = master.to_device(&Device::Cpu)?.to_vec1::<f32>()?;
                }
                Moments::Device {
                    m: dm,
                    v: dv,
                    master: dmaster,
                } => {
                    let shape = p.var.as_tensor().shape().clone();
                    let device = p.var.as_tensor().device().clone();
                    *dm = m.reshape(shape.clone())?.to_device(&device)?;
                    *dv = v.reshape(shape.clone())?.to_device(&device)?;
                    if let Some(dmaster) = dmaster {
                        *dmaster = master.reshape(shape)?.to_device(&device)?;
                    }
                }
            }
        }
        Ok(())
    }
}

#[derive(Clone, Copy)]
struct HostStep {
    lr: f64,
    decay: f64,
    /// What the gradient is multiplied by: the clip, and the loss scale's inverse.
    factor: f64,
    bias1: f64,
    bias2: f64,
    c: AdamWConfig,
}

/// PyTorch's AdamW update, fused: `w ← w − lr·wd·w − lr/bias1 · m / (sqrt(v)/sqrt(bias2) + eps)`.
fn host_update(
    w: &mut [f32],
    m: &mut [f32],
    v: &mut [f32],
    g: &[f32],
    mask: Option<&[bool]>,
    s: HostStep,
) {
    const CHUNK: usize = 1 << 14;
    let (b1, b2) = (s.c.beta1 as f32, s.c.beta2 as f32);
    let step_size = (s.lr / s.bias1) as f32;
    let sqrt_bias2 = s.bias2.sqrt() as f32;
    let (eps, decay, factor) = (s.c.eps as f32, s.decay as f32, s.factor as f32);
    w.par_chunks_mut(CHUNK)
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .enumerate()
        .for_each(|(k, ((w, m), v))| {
            let g = &g[k * CHUNK..k * CHUNK + w.len()];
            let mask = mask.map(|mk| &mk[k * CHUNK..k * CHUNK + w.len()]);
            for i in 0..w.len() {
                if mask.is_some_and(|mk| !mk[i]) {
                    continue;
                }
                let gi = g[i] * factor;
                m[i] = b1 * m[i] + (1.0 - b1) * gi;
                v[i] = b2 * v[i] + (1.0 - b2) * gi * gi;
                w[i] -= decay * w[i];
                w[i] -= step_size * m[i] / (v[i].sqrt() / sqrt_bias2 + eps);
            }
        });
}
/// The f32 master of a parameter held in a lower precision, flat on the host (None: an f32
/// parameter, its own master).
fn master_of(p: &Param) -> Result<Option<Tensor>> {
    if p.var.as_tensor().dtype() == DType::F32 {
        return Ok(None);
    }
    Ok(match &p.moments {
        Moments::Host { p: w, .. } => Some(Tensor::from_slice(w, w.len(), &Device::Cpu)?),
        Moments::Device {
            master: Some(w), ..
        } => Some(w.flatten_all()?.to_device(&Device::Cpu)?),
        Moments::Device { master: None, .. } => None,
    })
}
