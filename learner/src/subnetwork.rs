//! Which parameters an update changed (spec §3): per tensor, the bf16-bitwise mask (Zhu et al.)
//! and the `|Δ| > tol` mask on bf16 values (Mukherjee et al., tol 1e-5), kept as bitsets;
//! `‖Δ‖_F`; aggregates per layer and per matrix type; overlaps between masks (o1, o2, Jaccard)
//! beside their random baselines.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};
use half::bf16;
use serde::{Deserialize, Serialize};

use crate::error::{LearnerError, Result};

/// A fixed-length set of bits, 64 to a word.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bitset {
    pub len: usize,
    pub words: Vec<u64>,
}

impl Bitset {
    pub fn from_fn(len: usize, f: impl Fn(usize) -> bool) -> Bitset {
        let mut words = vec![0u64; len.div_ceil(64)];
        for i in 0..len {
            if f(i) {
                words[i / 64] |= 1 << (i % 64);
            }
        }
        Bitset { len, words }
    }

    pub fn get(&self, i: usize) -> bool {
        self.words[i / 64] >> (i % 64) & 1 == 1
    }

    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    fn zip_count(&self, other: &Bitset, f: impl Fn(u64, u64) -> u64) -> Result<u64> {
        if self.len != other.len {
            return Err(LearnerError::Invalid(format!(
                "masks of {} and {} parameters",
                self.len, other.len
            )));
        }
        Ok(self
            .words
            .iter()
            .zip(&other.words)
            .map(|(&a, &b)| u64::from(f(a, b).count_ones()))
            .sum())
    }

    /// Little-endian bytes of the words (the stored form).
    pub fn to_bytes(&self) -> Vec<u8> {
        self.words.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    pub fn from_bytes(len: usize, bytes: &[u8]) -> Result<Bitset> {
        if bytes.len() != len.div_ceil(64) * 8 {
            return Err(LearnerError::Invalid(format!(
                "a mask of {len} bits needs {} bytes, found {}",
                len.div_ceil(64) * 8,
                bytes.len()
            )));
        }
        let words = bytes
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        Ok(Bitset { len, words })
    }
}

/// The overlap of two runs' updated sets `I1`, `I2` over `n` parameters, with the expectation of
/// each figure for random masks of the same sizes (spec §3.4).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Overlap {
    /// `|I1 ∩ I2| / |I1|` and its baseline `|I2| / n`.
    pub o1: f64,
    pub o1_random: f64,
    /// `|I1 ∩ I2| / |I2|` and its baseline `|I1| / n`.
    pub o2: f64,
    pub o2_random: f64,
    /// `|I1 ∩ I2| / |I1 ∪ I2|` and its independent-Bernoulli baseline `pq / (p + q − pq)`.
    pub jaccard: f64,
    pub jaccard_random: f64,
}

/// Overlap of masks given as matching lists of per-tensor bitsets.
pub fn overlap(a: &[&Bitset], b: &[&Bitset]) -> Result<Overlap> {
    if a.len() != b.len() {
        return Err(LearnerError::Invalid("masks of different models".into()));
    }
    let (mut n, mut i1, mut i2, mut both) = (0u64, 0u64, 0u64, 0u64);
    for (x, y) in a.iter().zip(b) {
        both += x.zip_count(y, |p, q| p & q)?;
        i1 += x.count();
        i2 += y.count();
        n += x.len as u64;
    }
    let ratio = |num: u64, den: u64| {
        if den == 0 {
            0.0
        } else {
            num as f64 / den as f64
        }
    };
    let (p, q) = (ratio(i1, n), ratio(i2, n));
    let union = i1 + i2 - both;
    let pq = p * q;
    Ok(Overlap {
        o1: ratio(both, i1),
        o1_random: q,
        o2: ratio(both, i2),
        o2_random: p,
        jaccard: ratio(both, union),
        jaccard_random: if p + q - pq > 0.0 {
            pq / (p + q - pq)
        } else {
            0.0
        },
    })
}

/// What an update did to one tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorUpdate {
    pub name: String,
    pub shape: Vec<usize>,
    /// Changed in bf16: the bf16 roundings of base and update differ bitwise.
    pub changed_bf16: Bitset,
    /// Changed by Mukherjee's test: `|bf16(bf16(θ1) − bf16(θ0))| > tol`.
    pub changed_tol: Bitset,
    /// `‖θ1 − θ0‖_F` in f64 over the f32 values.
    pub frobenius: f64,
}

impl TensorUpdate {
    pub fn numel(&self) -> usize {
        self.changed_bf16.len
    }

    /// The decoder layer of `model.layers.{L}.…`.
    pub fn layer(&self) -> Option<usize> {
        self.name
            .strip_prefix("model.layers.")?
            .split('.')
            .next()?
            .parse()
            .ok()
    }

    /// `q_proj`, `mlp.up_proj` → `up_proj`, `input_layernorm`, `embed_tokens`, …: the name's
    /// last component before `weight` / `bias`.
    pub fn matrix_type(&self) -> String {
        let parts: Vec<&str> = self.name.split('.').collect();
        match parts.as_slice() {
            [.., kind, "weight" | "bias"] => kind.to_string(),
            [.., kind] => kind.to_string(),
            [] => String::new(),
        }
    }
}

fn bf16s(t: &Tensor) -> Result<Vec<bf16>> {
    Ok(t.to_dtype(DType::BF16)?.flatten_all()?.to_vec1::<bf16>()?)
}

/// Compares one tensor of an update with its base.
pub fn tensor_update(
    name: &str,
    base: &Tensor,
    updated: &Tensor,
    tol: f64,
) -> Result<TensorUpdate> {
    if base.shape() != updated.shape() {
        return Err(LearnerError::Invalid(format!(
            "{name}: shapes {:?} and {:?}",
            base.dims(),
            updated.dims()
        )));
    }
    let (b, u) = (bf16s(base)?, bf16s(updated)?);
    let changed_bf16 = Bitset::from_fn(b.len(), |i| b[i].to_bits() != u[i].to_bits());
    let changed_tol = Bitset::from_fn(b.len(), |i| {
        let d = bf16::from_f32(u[i].to_f32() - b[i].to_f32());
        f64::from(d.to_f32().abs()) > tol
    });
    let delta = (updated.to_dtype(DType::F64)? - base.to_dtype(DType::F64)?)?;
    let frobenius = delta.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    Ok(TensorUpdate {
        name: name.to_string(),
        shape: base.dims().to_vec(),
        changed_bf16,
        changed_tol,
        frobenius,
    })
}

/// Every tensor of `updated` against `base` (the same names and shapes), in name order.
pub fn model_update(
    base: &BTreeMap<String, Tensor>,
    updated: &BTreeMap<String, Tensor>,
    tol: f64,
) -> Result<Vec<TensorUpdate>> {
    if base.len() != updated.len() {
        return Err(LearnerError::Invalid(format!(
            "{} tensors in the base, {} in the update",
            base.len(),
            updated.len()
        )));
    }
    base.iter()
        .map(|(name, b)| {
            let u = updated
                .get(name)
                .ok_or_else(|| LearnerError::Invalid(format!("{name} missing from the update")))?;
            tensor_update(name, b, u, tol)
        })
        .collect()
}

/// Unchanged fractions (sparsity) over a group of tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sparsity {
    pub group: String,
    pub parameters: u64,
    /// Fraction with bitwise-equal bf16 values.
    pub unchanged_bf16: f64,
    /// Fraction with `|Δ| ≤ tol`.
    pub unchanged_tol: f64,
    pub frobenius: f64,
}

/// Sparsity of the whole model, of each layer (`layer.L`) and of each matrix type (`type.X`).
pub fn sparsity(updates: &[TensorUpdate]) -> Vec<Sparsity> {
    let mut groups: BTreeMap<String, Vec<&TensorUpdate>> = BTreeMap::new();
    for u in updates {
        groups.entry("all".into()).or_default().push(u);
        if let Some(l) = u.layer() {
            groups.entry(format!("layer.{l:03}")).or_default().push(u);
        }
        groups
            .entry(format!("type.{}", u.matrix_type()))
            .or_default()
            .push(u);
    }
    groups
        .into_iter()
        .map(|(group, us)| {
            let n: u64 = us.iter().map(|u| u.numel() as u64).sum();
            let bf: u64 = us.iter().map(|u| u.changed_bf16.count()).sum();
            let tol: u64 = us.iter().map(|u| u.changed_tol.count()).sum();
            let frob = us.iter().map(|u| u.frobenius.powi(2)).sum::<f64>().sqrt();
            let unchanged = |c: u64| {
                if n == 0 {
                    1.0
                } else {
                    1.0 - c as f64 / n as f64
                }
            };
            Sparsity {
                group,
                parameters: n,
                unchanged_bf16: unchanged(bf),
                unchanged_tol: unchanged(tol),
                frobenius: frob,
            }
        })
        .collect()
}
