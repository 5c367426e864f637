//! The output layer fused with log-softmax, gather and entropy, in chunks of rows, so that the
//! full `[tokens, vocab]` logits never exist at once in either direction.
//!
//! The losses need only each scored token's log-prob and the entropy of its next-token
//! distribution. Autograd through `linear → log_softmax → gather` keeps the f32 logits of every
//! scored token for the backward (8192 tokens × 151,936 vocab = 5 GB, several times over). Here
//! the forward runs chunk by chunk on detached weights and keeps only `[N, 2]`; the backward
//! recomputes each chunk's logits, turns them into `dz` and folds it into `dh = dz·W` and
//! `dW += dzᵀ·h` before the next chunk (the recompute costs one more output-layer matmul).

use candle_core::{DType, Tensor};

use crate::attach::attach;
use crate::error::Result;
use crate::forward::linear;
use crate::ops::{logprob_and_entropy, logprob_entropy_backward};

/// Logit elements (f32) one chunk may hold: 2²⁵ = 128 MiB, e.g. 220 rows of a 151,936 vocab.
pub const CHUNK_ELEMENTS: usize = 1 << 25;

/// Rows per chunk for a vocabulary of `vocab` entries.
pub fn chunk_rows(vocab: usize) -> usize {
    (CHUNK_ELEMENTS / vocab.max(1)).max(1)
}

/// Per-row log-prob of `targets` and entropy under `softmax(states · weightᵀ / temperature)`:
/// `states [N, H]`, `weight [V, H]`, `targets [N]` u32 → `([N], [N])` f32, differentiable in
/// `states` and `weight`, with at most `chunk` rows of logits alive at a time.
pub fn output_logprobs(
    states: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
    temperature: f64,
    chunk: usize,
) -> Result<(Tensor, Tensor)> {
    let (n, _) = states.dims2()?;
    let chunk = chunk.max(1);
    let (sd, wd) = (states.detach(), weight.detach());
    let mut parts = Vec::new();
    for start in (0..n).step_by(chunk) {
        let len = chunk.min(n - start);
        let z = chunk_logits(&sd.narrow(0, start, len)?, &wd, temperature)?; // [c, V]
        let (lp, ent) = logprob_and_entropy(&z, &targets.narrow(0, start, len)?)?;
        parts.push(Tensor::stack(&[lp, ent], 1)?); // [c, 2]
    }
    let stats = Tensor::cat(&parts, 0)?.contiguous()?; // [N, 2]
    let op = OutputLogprobs {
        targets: targets.clone(),
        temperature,
        chunk,
    };
    // [N, 2], the values of `stats`, which is also the third input the backward reads
    let out = attach(states, weight, &stats, stats.clone(), move |s, w, y, g| {
        let (ds, dw) = op.backward(s, w, y, g)?;
        Ok([Some(ds), Some(dw), None])
    })?;
    Ok((
        out.narrow(1, 0, 1)?.squeeze(1)?,
        out.narrow(1, 1, 1)?.squeeze(1)?,
    ))
}

/// `states [c, H] · weightᵀ / temperature` as f32 `[c, V]`.
fn chunk_logits(states: &Tensor, weight: &Tensor, temperature: f64) -> Result<Tensor> {
    let z = linear(states, weight, None)?.to_dtype(DType::F32)?;
    Ok(if temperature != 1.0 {
        (z / temperature)?
    } else {
        z
    })
}

/// The chunked backward: gradients of the states and the output weight.
struct OutputLogprobs {
    targets: Tensor,
    temperature: f64,
    chunk: usize,
}

impl OutputLogprobs {
    fn backward(
        &self,
        states: &Tensor,
        weight: &Tensor,
        y: &Tensor,
        g: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let (n, _) = states.dims2()?;
        let (sd, wd) = (states.detach(), weight.detach());
        let mut d_states = Vec::new();
        let mut d_weight: Option<Tensor> = None; // [V, H] f32
        for start in (0..n).step_by(self.chunk) {
            let len = self.chunk.min(n - start);
            let s = sd.narrow(0, start, len)?; // [c, H]
            let z = chunk_logits(&s, &wd, self.temperature)?; // [c, V]
            let dz = logprob_entropy_backward(
                &z,
                &self.targets.narrow(0, start, len)?,
                &y.narrow(0, start, len)?.contiguous()?,
                &g.narrow(0, start, len)?.contiguous()?,
            )?;
            drop(z);
            let dz = if self.temperature != 1.0 {
                (dz / self.temperature)?
            } else {
                dz
            };
            let dz = dz.to_dtype(wd.dtype())?; // [c, V]
            d_states.push(dz.matmul(&wd)?); // [c, H]
            let dw = dz.t()?.matmul(&s)?.to_dtype(DType::F32)?; // [V, H]
            d_weight = Some(match d_weight {
                None => dw,
                Some(acc) => (acc + dw)?,
            });
        }
        let d_weight = match d_weight {
            Some(d) => d.to_dtype(weight.dtype())?,
            None => weight.zeros_like()?,
        };
        Ok((
            Tensor::cat(&d_states, 0)?.to_dtype(states.dtype())?,
            d_weight,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::composed;
    use crate::test_util::{max_rel, random};
    use candle_core::{Device, Var};

    /// `lp + 0.37·H` weighted per row by random `u`, so that both outputs' gradients count.
    fn objective(lp: &Tensor, ent: &Tensor, u: &Tensor) -> Tensor {
        ((lp + (ent * 0.37).unwrap()).unwrap() * u)
            .unwrap()
            .sum_all()
            .unwrap()
    }

    /// The chunked op against autograd through the composed ops (full logits), for chunk sizes
    /// that divide the rows, do not, and exceed them, at temperature 1 and 0.7.
    #[test]
    fn chunked_output_layer_matches_composed() {
        let (n, h, v) = (13, 16, 40);
        let s0 = random(&[n, h], 1, 1.0);
        let w0 = random(&[v, h], 2, 0.5);
        let u = random(&[n], 3, 1.0);
        let t: Vec<u32> = (0..n as u32).map(|i| (i * 7 + 3) % v as u32).collect();
        let t = Tensor::new(t.as_slice(), &Device::Cpu).unwrap();
        for temperature in [1.0, 0.7] {
            let (s, w) = (
                Var::from_tensor(&s0).unwrap(),
                Var::from_tensor(&w0).unwrap(),
            );
            let z = (linear(s.as_tensor(), w.as_tensor(), None).unwrap() / temperature).unwrap();
            let lp = composed::logprob_gather(&z, &t).unwrap();
            let ent = composed::entropy(&z).unwrap();
            let g = objective(&lp, &ent, &u).backward().unwrap();
            let (want_s, want_w) = (
                g.get(s.as_tensor()).unwrap().clone(),
                g.get(w.as_tensor()).unwrap().clone(),
            );
            for chunk in [1, 4, 13, 100] {
                let (s, w) = (
                    Var::from_tensor(&s0).unwrap(),
                    Var::from_tensor(&w0).unwrap(),
                );
                let (lp2, ent2) =
                    output_logprobs(s.as_tensor(), w.as_tensor(), &t, temperature, chunk).unwrap();
                assert!(max_rel(&lp2, &lp) < 1e-5, "log-probs, chunk {chunk}");
                assert!(max_rel(&ent2, &ent) < 1e-5, "entropy, chunk {chunk}");
                let g = objective(&lp2, &ent2, &u).backward().unwrap();
                let ds = g.get(s.as_tensor()).expect("grad of states");
                let dw = g.get(w.as_tensor()).expect("grad of weight");
                assert!(
                    max_rel(ds, &want_s) < 1e-4,
                    "d states, chunk {chunk}: {}",
                    max_rel(ds, &want_s)
                );
                assert!(
                    max_rel(dw, &want_w) < 1e-4,
                    "d weight, chunk {chunk}: {}",
                    max_rel(dw, &want_w)
                );
            }
        }
    }

    /// The composed backward (the path of non-CPU devices) against the fused one.
    #[test]
    fn composed_logprob_backward_matches_fused() {
        let z = random(&[5, 30], 4, 3.0);
        let t = Tensor::new(&[0u32, 29, 7, 7, 11], &Device::Cpu).unwrap();
        let (lp, ent) = logprob_and_entropy(&z, &t).unwrap();
        let y = Tensor::stack(&[lp, ent], 1).unwrap();
        let g = random(&[5, 2], 5, 1.0);
        let fused = logprob_entropy_backward(&z, &t, &y, &g).unwrap();
        let composed = composed::logprob_entropy_backward(&z, &t, &y, &g).unwrap();
        assert!(
            max_rel(&composed, &fused) < 1e-5,
            "{}",
            max_rel(&composed, &fused)
        );
    }
}
