//! Grouped-query attention that keeps no `[T, S]` probabilities for the backward: the forward
//! runs in chunks of query rows and keeps only the output; the backward recomputes each chunk's
//! probabilities from `q`, `k` and the mask and turns them into `dq`, `dk`, `dv` (the
//! FlashAttention-2 recurrence at the granularity of a chunk of rows, on the device's matmuls).
//! Between the matmuls, one row kernel per chunk on CUDA ([`attention_probs`] forward,
//! [`attention_probs_backward`] backward) reads and writes the scores in the model's dtype.
//!
//! Autograd through `q·kᵀ → softmax → ·v` keeps the f32 probabilities of every layer until the
//! backward: at B=8, T=1024 and 14 heads that is 470 MB a layer, 11 GB for 24 layers. Here a
//! chunk holds at most [`chunk_elements`] scores (default [`CHUNK_ELEMENTS`]), and only while it
//! is being computed.

use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{DType, Tensor};

use crate::attach::attach;
use crate::error::Result;
use crate::ops::{attention_probs, attention_probs_backward};

/// Score elements one chunk may hold by default: 2²⁴ (64 MiB in f32).
pub const CHUNK_ELEMENTS: usize = 1 << 24;

static BUDGET: AtomicUsize = AtomicUsize::new(CHUNK_ELEMENTS);
static CALLS: AtomicUsize = AtomicUsize::new(0);

/// How many chunked attentions this process has run (a layer's forward counts once).
pub fn chunked_calls() -> usize {
    CALLS.load(Ordering::Relaxed)
}

/// Sets the process-wide budget of score elements per chunk (and the size past which attention
/// is chunked at all): lower saves memory, higher saves the backward's recompute.
pub fn set_chunk_elements(n: usize) {
    BUDGET.store(n.max(1), Ordering::Relaxed);
}

/// The current budget of score elements per chunk.
pub fn chunk_elements() -> usize {
    BUDGET.load(Ordering::Relaxed)
}

/// Query rows per chunk so that `batch · heads · rows · keys` stays within the budget.
pub fn chunk_rows(batch: usize, heads: usize, keys: usize) -> usize {
    (chunk_elements() / (batch * heads * keys).max(1)).max(1)
}

/// Whether the attention of these sizes is worth chunking: its scores exceed one chunk.
pub fn worth_chunking(batch: usize, heads: usize, queries: usize, keys: usize) -> bool {
    batch * heads * queries * keys > chunk_elements()
}

/// `softmax(scale·q·kᵀ + bias)·v` per query head, with `G` query heads sharing each K/V head:
/// `q [B, Hkv, G·T, D]` (head `kv·G + j` at rows `j·T..`), `k, v [B, Hkv, S, D]`,
/// `bias [B, 1, 1, T, S]` f32 → `[B, Hkv, G·T, D]` in `v`'s dtype; at most `chunk` query
/// rows of scores alive at a time. Differentiable in `q`, `k` and `v`.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    scale: f64,
    chunk: usize,
) -> Result<Tensor> {
    CALLS.fetch_add(1, Ordering::Relaxed);
    let op = ChunkedAttention {
        bias: bias.clone(),
        scale,
        chunk: chunk.max(1),
    };
    let out = op.forward(&q.detach(), &k.detach(), &v.detach())?;
    attach(q, k, v, out, move |q, k, v, g| {
        let (dq, dk, dv) = op.backward(q, k, v, g)?;
        Ok([Some(dq), Some(dk), Some(dv)])
    })
}

struct ChunkedAttention {
    bias: Tensor,
    scale: f64,
    chunk: usize,
}

impl ChunkedAttention {
    fn dims(&self, q: &Tensor, k: &Tensor) -> Result<(usize, usize, usize, usize, usize, usize)> {
        let (b, hkv, gt, d) = q.dims4()?;
        let s = k.dim(2)?;
        let t = self.bias.dim(3)?;
        Ok((b, hkv, gt / t, t, s, d))
    }

    /// The query rows `start..start+len` of every head: `[B, Hkv, G·len, D]`.
    fn rows(x: &Tensor, g: usize, t: usize, start: usize, len: usize) -> Result<Tensor> {
        let (b, hkv, _, d) = x.dims4()?;
        Ok(x.reshape((b, hkv, g, t, d))?
            .narrow(3, start, len)?
            .contiguous()?
            .reshape((b, hkv, g * len, d))?)
    }

    /// The scores of query rows `start..start+len`, `[B, Hkv, G, len, S]` in `q`'s dtype, and
    /// their rows of the bias.
    fn scores(
        &self,
        q_c: &Tensor,
        k: &Tensor,
        g: usize,
        start: usize,
        len: usize,
    ) -> Result<(Tensor, Tensor)> {
        let (b, hkv, _, _) = q_c.dims4()?;
        let s = k.dim(2)?;
        let scores = q_c.matmul(&k.t()?)?.reshape((b, hkv, g, len, s))?;
        Ok((scores, self.bias.narrow(3, start, len)?))
    }

    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let (b, hkv, g, t, s, d) = self.dims(q, k)?;
        let v = v.contiguous()?;
        let mut parts = Vec::new();
        for start in (0..t).step_by(self.chunk) {
            let len = self.chunk.min(t - start);
            let q_c = Self::rows(q, g, t, start, len)?;
            let (scores, bias) = self.scores(&q_c, k, g, start, len)?;
            let p = attention_probs(&scores, &bias, self.scale)? // [B, Hkv, G, len, S]
                .reshape((b, hkv, g * len, s))?
                .to_dtype(v.dtype())?;
            parts.push(p.matmul(&v)?.reshape((b, hkv, g, len, d))?); // [B, Hkv, G, len, D]
        }
        Ok(Tensor::cat(&parts, 3)?.reshape((b, hkv, g * t, d))?)
    }

    /// `(dq, dk, dv)` from the upstream `d_out [B, Hkv, G·T, D]`, chunk by chunk:
    /// `dv += pᵀ·dO`, `ds = scale·p∘(dO·vᵀ − Σ …)`, `dq = ds·k`, `dk += dsᵀ·q`.
    fn backward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        d_out: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, hkv, g, t, s, d) = self.dims(q, k)?;
        let (k, v) = (k.detach(), v.detach().contiguous()?);
        let (q, d_out) = (q.detach(), d_out.to_dtype(v.dtype())?);
        let mut dq = Vec::new();
        let mut dk = Tensor::zeros((b, hkv, s, d), DType::F32, k.device())?;
        let mut dv = Tensor::zeros((b, hkv, s, d), DType::F32, v.device())?;
        for start in (0..t).step_by(self.chunk) {
            let len = self.chunk.min(t - start);
            let q_c = Self::rows(&q, g, t, start, len)?; // [B, Hkv, G·len, D]
            let do_c = Self::rows(&d_out, g, t, start, len)?; // [B, Hkv, G·len, D]
            let (scores, bias) = self.scores(&q_c, &k, g, start, len)?; // [B, Hkv, G, len, S]
            let dp = do_c.matmul(&v.t()?)?.reshape(scores.shape())?;
            let (p, ds) = attention_probs_backward(&scores, &bias, &dp, self.scale)?;
            let rows = (b, hkv, g * len, s);
            let (p, ds) = (p.reshape(rows)?, ds.reshape(rows)?.to_dtype(k.dtype())?);
            dv = (dv
                + p.to_dtype(v.dtype())?
                    .t()?
                    .matmul(&do_c)?
                    .to_dtype(DType::F32)?)?;
            dq.push(ds.matmul(&k)?.reshape((b, hkv, g, len, d))?);
            dk = (dk + ds.t()?.matmul(&q_c)?.to_dtype(DType::F32)?)?;
        }
        let dq = Tensor::cat(&dq, 3)?.reshape((b, hkv, g * t, d))?;
        Ok((
            dq.to_dtype(q.dtype())?,
            dk.to_dtype(k.dtype())?,
            dv.to_dtype(v.dtype())?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::composed;
    use crate::test_util::{max_rel, random};
    use candle_core::{Device, Var};

    /// The composed attention (autograd through the full probabilities) as the reference.
    fn reference(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        bias: &Tensor,
        g: usize,
        scale: f64,
    ) -> Tensor {
        let (b, hkv, gt, _) = q.dims4().unwrap();
        let (s, t) = (k.dim(2).unwrap(), gt / g);
        let scores = q
            .matmul(&k.t().unwrap())
            .unwrap()
            .reshape((b, hkv, g, t, s))
            .unwrap();
        let p = composed::masked_softmax(&scores, bias, scale)
            .unwrap()
            .reshape((b, hkv, g * t, s))
            .unwrap();
        p.matmul(v).unwrap()
    }

    /// Causal mask with left padding on row 1 (its first 3 keys masked) and a finite "masked"
    /// value, as the model's batches have.
    fn bias(b: usize, t: usize) -> Tensor {
        let mut v = vec![0f32; b * t * t];
        for bi in 0..b {
            for i in 0..t {
                for j in 0..t {
                    if j > i || (bi == 1 && j < 3 && i >= 3) {
                        v[(bi * t + i) * t + j] = -1e9;
                    }
                }
            }
        }
        Tensor::from_vec(v, (b, 1, 1, t, t), &Device::Cpu).unwrap()
    }

    #[test]
    fn chunked_attention_matches_composed_forward_and_backward() {
        let (b, hkv, g, t, d) = (2, 2, 3, 11, 8);
        let (q0, k0, v0) = (
            random(&[b, hkv, g * t, d], 1, 1.0),
            random(&[b, hkv, t, d], 2, 1.0),
            random(&[b, hkv, t, d], 3, 1.0),
        );
        let u = random(&[b, hkv, g * t, d], 4, 1.0);
        let mask = bias(b, t);
        let scale = 1.0 / (d as f64).sqrt();
        let run = |f: &dyn Fn(&Tensor, &Tensor, &Tensor) -> Tensor| {
            let (q, k, v) = (
                Var::from_tensor(&q0).unwrap(),
                Var::from_tensor(&k0).unwrap(),
                Var::from_tensor(&v0).unwrap(),
            );
            let y = f(q.as_tensor(), k.as_tensor(), v.as_tensor());
            let grads = (&y * &u).unwrap().sum_all().unwrap().backward().unwrap();
            let get = |x: &Var| grads.get(x.as_tensor()).expect("gradient").clone();
            (y, [get(&q), get(&k), get(&v)])
        };
        let (want, want_g) = run(&|q, k, v| reference(q, k, v, &mask, g, scale));
        for chunk in [1, 4, 11, 64] {
            let (y, grads) = run(&|q, k, v| attention(q, k, v, &mask, scale, chunk).unwrap());
            assert!(max_rel(&y, &want) < 1e-5, "output, chunk {chunk}");
            for (name, (a, w)) in ["dq", "dk", "dv"].iter().zip(grads.iter().zip(&want_g)) {
                let e = max_rel(a, w);
                assert!(e < 1e-4, "{name}, chunk {chunk}: {e}");
            }
        }
    }

    #[test]
    fn chunk_sizes_respect_the_budget() {
        assert_eq!(chunk_rows(8, 14, 1024), CHUNK_ELEMENTS / (8 * 14 * 1024));
        assert_eq!(chunk_rows(1, 1, usize::MAX / 2), 1);
        assert!(worth_chunking(8, 14, 1024, 1024));
        assert!(!worth_chunking(8, 4, 64, 64));
    }
}
