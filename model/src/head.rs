//! The output layer fused with log-softmax, gather and entropy, in chunks of rows, so that the
//! full `[tokens, vocab]` logits never exist at once in either direction.
//!
//! The losses need only each scored token's log-prob and the entropy of its next-token
//! distribution. Autograd through `linear → log_softmax → gather` keeps the f32 logits of every
//! scored token for the backward (8192 tokens × 151,936 vocab = 5 GB, several times over). Here
//! the forward runs chunk by chunk on detached weights and keeps only `[N, 3]` (log-prob,
//! entropy, and the log-partition that lets the backward turn logits into `dz` in one pass); the
//! backward recomputes each chunk's logits and turns them into `dz`, written in place into its
//! group's buffer, which then makes `dh = dz·W` and `dW` (the recompute costs one more
//! output-layer matmul).
//!
//! Where the forward keeps its 16-bit logits for the backward (see [`KEEP_BYTES`]), it computes
//! them in one matmul rather than 38 thin ones that each read the `[V, H]` weight again, and the
//! backward turns them into `dz` in place (no group buffer) and runs one matmul each for `dh`
//! and `dW`: `dW` comes in the weight's dtype straight from the matmul's f32 accumulator, with
//! no group products added in f32.
//!
//! The logits stay in the matmul's dtype: the log-prob kernels read them as they are and apply
//! the temperature as they go, and write `dz` in that dtype too, so a chunk costs no f32 copy.
//! With [`set_f32_logits`] the forward's logits come in f32 from the matmul's accumulator
//! ([`logits`]) and are not kept; the backward recomputes them in the weight's dtype and turns
//! them into `dz` with the forward's f32 log-partitions.
//! `dW = dzᵀ·h` runs once per *group* of chunks (about [`GROUP_BYTES`] of `dz`), not per chunk:
//! a chunk's 220 rows would make it a thin matmul whose `[V, H]` result (136M entries for
//! Qwen2.5-0.5B) is cast and added in f32 38 times a step at 8192 tokens; a group of 3,533 rows
//! makes that three times.

use candle_core::{DType, Tensor};

use crate::attach::attach;
use crate::error::Result;
use crate::forward::linear;
use crate::ops::{logprob_entropy_backward, logprob_entropy_stats};

static F32_LOGITS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Turns f32 logits on or off process-wide (off by default; a run's `model.f32_logits`): on, an
/// output layer of 16-bit weights gives its logits in f32 ([`logits`]), in the sampler and the
/// learner alike, where they were rounded to 16 bits. bf16 rounds a logit of 8 to 16 by up to
/// 0.03, which goes into the token's log-prob as it is, differently in the two paths.
pub fn set_f32_logits(on: bool) {
    F32_LOGITS.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Whether the output layer gives f32 logits (see [`set_f32_logits`]).
pub fn f32_logits() -> bool {
    F32_LOGITS.load(std::sync::atomic::Ordering::Relaxed)
}

/// `f()` with f32 logits `on`, then the switch as it was (a check or a bench comparing both).
pub fn with_f32_logits<T>(on: bool, f: impl FnOnce() -> T) -> T {
    let was = F32_LOGITS.swap(on, std::sync::atomic::Ordering::Relaxed);
    let out = f();
    set_f32_logits(was);
    out
}

/// The output layer's logits `states [N, H] · weightᵀ` for `weight [V, H]` → `[N, V]`, with no
/// graph: in the weight's dtype, or in f32 where [`f32_logits`] is on and the weight is 16-bit,
/// straight from the matmul's f32 accumulator and never rounded to 16 bits (on CUDA one cuBLAS
/// GEMM with bf16 or f16 inputs and an f32 output; elsewhere the inputs widened first, which is
/// exact).
pub fn logits(states: &Tensor, weight: &Tensor) -> Result<Tensor> {
    if !f32_logits() || weight.dtype() == DType::F32 {
        return linear(states, weight, None);
    }
    #[cfg(feature = "cuda")]
    if states.device().is_cuda() && states.dtype() == weight.dtype() {
        return Ok(crate::cuda::matmul_t_f32(states, weight)?);
    }
    linear(
        &states.to_dtype(DType::F32)?,
        &weight.to_dtype(DType::F32)?,
        None,
    )
}

/// Logit elements one chunk may hold: 2²⁵ (128 MiB in f32), e.g. 220 rows of a 151,936 vocab.
pub const CHUNK_ELEMENTS: usize = 1 << 25;

/// Bytes of `dz` one weight-gradient matmul takes: 1 GiB, e.g. 3,533 rows of a 151,936 vocab
/// in bf16 (16 chunks of 220).
pub const GROUP_BYTES: usize = 1 << 30;

/// Rows per chunk for a vocabulary of `vocab` entries.
pub fn chunk_rows(vocab: usize) -> usize {
    (CHUNK_ELEMENTS / vocab.max(1)).max(1)
}

/// Rows per weight-gradient matmul: whole chunks of `chunk` rows, at least one, of `dz` in
/// `dtype` within [`GROUP_BYTES`].
pub fn group_rows(chunk: usize, vocab: usize, dtype: DType) -> usize {
    let chunk_bytes = chunk.max(1) * vocab.max(1) * dtype.size_in_bytes();
    chunk.max(1) * (GROUP_BYTES / chunk_bytes).max(1)
}

/// Bytes of 16-bit logits a differentiable forward keeps for its backward, which then skips
/// recomputing them (one output-layer matmul per chunk, about 2.2 TFLOP a step at 8,192 tokens
/// of Qwen2.5-0.5B): 4 GiB, e.g. those 8,192 tokens' 151,936 logits in bf16 (2.3 GiB). Past it,
/// and for f32 logits (which are never all kept), the backward recomputes each chunk's.
pub const KEEP_BYTES: usize = 1 << 32;

/// How the output layer splits its rows: `rows` per chunk of logits, `group` per
/// weight-gradient matmul (rounded down to whole chunks, at least one), and whether the forward
/// keeps its logits for the backward (where a backward may follow and the fused log-prob kernels
/// apply: then all rows are one chunk and one group).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunking {
    pub rows: usize,
    pub group: usize,
    pub keep_logits: bool,
}

impl Chunking {
    /// `chunk` rows per chunk, [`group_rows`] per group, and the logits kept when they are
    /// 16-bit and fit in [`KEEP_BYTES`] for `n` rows of a `vocab` vocabulary in `dtype`.
    pub fn new(n: usize, vocab: usize, chunk: usize, dtype: DType) -> Self {
        let bytes = dtype.size_in_bytes();
        Chunking {
            rows: chunk.max(1),
            group: group_rows(chunk, vocab, dtype),
            keep_logits: bytes == 2 && n * vocab * bytes <= KEEP_BYTES,
        }
    }
}

/// Per-row log-prob of `targets` and entropy under `softmax(states · weightᵀ / temperature)`:
/// `states [N, H]`, `weight [V, H]`, `targets [N]` u32 → `([N], [N])` f32, differentiable in
/// `states` and `weight`, with at most `chunk` rows of logits computed at a time.
pub fn output_logprobs(
    states: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
    temperature: f64,
    chunk: usize,
) -> Result<(Tensor, Tensor)> {
    let (n, _) = states.dims2()?;
    let chunking = Chunking::new(n, weight.dim(0)?, chunk, weight.dtype());
    output_logprobs_with(states, weight, targets, temperature, chunking)
}

/// [`output_logprobs`] split as `chunking` says. The logits are kept only when asked, a
/// backward may follow (the states or the weight are in a graph) and the fused log-prob kernels
/// read them ([`crate::ops::logprob_kernels_apply`]); kept, they are computed whole.
pub fn output_logprobs_with(
    states: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
    temperature: f64,
    chunking: Chunking,
) -> Result<(Tensor, Tensor)> {
    let (n, _) = states.dims2()?;
    // kept logits come in one piece, which only the fused kernels read without temporaries;
    // f32 ones are not kept (the backward recomputes its 16-bit logits)
    let keep = chunking.keep_logits
        && !f32_logits()
        && (states.track_op() || weight.track_op())
        && crate::ops::logprob_kernels_apply(weight);
    // whole chunks per group, so that the backward's chunks are the forward's
    let chunk = chunking.rows.max(1);
    let group = chunk * (chunking.group / chunk).max(1);
    let (sd, wd) = (states.detach(), weight.detach());
    let (mut parts, mut kept) = (Vec::new(), None);
    let step = if keep { n.max(1) } else { chunk };
    for start in (0..n).step_by(step) {
        let len = step.min(n - start);
        // z [c, V]; its stats [c, 3]: log-prob, entropy, log-partition (which spares the
        // backward a pass)
        let z = logits(&sd.narrow(0, start, len)?, &wd)?;
        parts.push(logprob_entropy_stats(
            &z,
            &targets.narrow(0, start, len)?,
            temperature,
        )?);
        if keep {
            kept = Some(z);
        }
    }
    let stats = Tensor::cat(&parts, 0)?.contiguous()?; // [N, 3]
    let op = OutputLogprobs {
        targets: targets.clone(),
        temperature,
        chunk,
        group,
        kept: std::sync::Mutex::new(kept),
    };
    // [N, 3], the values of `stats`, which is also the third input the backward reads
    let out = attach(
        states,
        weight,
        &stats,
        stats.clone(),
        move |s, w, y, _, g| {
            let (ds, dw) = op.backward(s, w, y, g)?;
            Ok([Some(ds), Some(dw), None])
        },
    )?;
    Ok((
        out.narrow(1, 0, 1)?.squeeze(1)?,
        out.narrow(1, 1, 1)?.squeeze(1)?,
    ))
}

/// The chunked backward: gradients of the states and the output weight.
struct OutputLogprobs {
    targets: Tensor,
    temperature: f64,
    chunk: usize,
    group: usize,
    /// The forward's logits `[N, V]`, when it kept them: the first backward takes them and
    /// overwrites them with `dz` (all rows one group), a later one recomputes in chunks.
    kept: std::sync::Mutex<Option<Tensor>>,
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
        // detached, all of them: a gradient computed from a graph tensor (here `y`, the op's
        // output) records its own backward and holds what it read for as long as it lives,
        // which for the weight's is the whole backward
        let (sd, wd, y) = (states.detach(), weight.detach(), &y.detach());
        let mut d_states = Vec::new();
        let mut d_weight: Option<Tensor> = None; // [V, H]; f32 once a second group adds to it
        let mut kept = self.kept.lock().ok().and_then(|mut k| k.take());
        let group = if kept.is_some() { n.max(1) } else { self.group };
        for g_start in (0..n).step_by(group) {
            let g_len = group.min(n - g_start);
            let dz = match kept.take() {
                // the kept logits [N, V] (the one group), overwritten in place by their dz
                Some(z) => logprob_entropy_backward(
                    &z,
                    &self.targets,
                    &y.contiguous()?,
                    &g.contiguous()?,
                    self.temperature,
                    Some((&z, 0)),
                )?,
                None => self.recomputed_dz(&sd, &wd, y, g, g_start, g_len)?,
            }; // [g, V] in the weight's dtype
            d_states.push(dz.matmul(&wd)?); // [g, H]
            let dw = dz.t()?.matmul(&sd.narrow(0, g_start, g_len)?)?; // [V, H]
            d_weight = Some(match d_weight {
                None => dw,
                Some(acc) => (acc.to_dtype(DType::F32)? + dw.to_dtype(DType::F32)?)?,
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

    /// `dz [g, V]` of the group of rows `g_start..g_start + g_len`, its logits recomputed chunk
    /// by chunk from `sd [N, H]` and `wd [V, H]`, each chunk's written into the group's buffer.
    fn recomputed_dz(
        &self,
        sd: &Tensor,
        wd: &Tensor,
        y: &Tensor,
        g: &Tensor,
        g_start: usize,
        g_len: usize,
    ) -> Result<Tensor> {
        // every row is written below, chunk by chunk, in place
        let dz = crate::ops::rows_buffer(g_len, wd.dim(0)?, wd.dtype(), wd.device())?; // [g, V]
        for start in (g_start..g_start + g_len).step_by(self.chunk) {
            let len = self.chunk.min(g_start + g_len - start);
            let z = linear(&sd.narrow(0, start, len)?, wd, None)?; // [c, V]
            logprob_entropy_backward(
                &z,
                &self.targets.narrow(0, start, len)?,
                &y.narrow(0, start, len)?.contiguous()?,
                &g.narrow(0, start, len)?.contiguous()?,
                self.temperature,
                Some((&dz, start - g_start)),
            )?;
        }
        Ok(dz)
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
            // chunk, group: one group; groups of whole chunks with a short last one; a group
            // smaller than a chunk (one chunk); with the logits kept and recomputed
            let splits = [
                (1, 100),
                (4, 100),
                (13, 13),
                (100, 100),
                (2, 6),
                (4, 8),
                (4, 1),
            ];
            for ((rows, group), keep_logits) in splits.into_iter().zip([true, false].repeat(4)) {
                let chunking = Chunking {
                    rows,
                    group,
                    keep_logits,
                };
                let chunk = format!("{chunking:?}");
                let (s, w) = (
                    Var::from_tensor(&s0).unwrap(),
                    Var::from_tensor(&w0).unwrap(),
                );
                let (lp2, ent2) =
                    output_logprobs_with(s.as_tensor(), w.as_tensor(), &t, temperature, chunking)
                        .unwrap();
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

    /// The first backward turns the kept logits into `dz` in place; a second backward through
    /// the same graph recomputes them and gets the same gradients.
    #[test]
    fn a_second_backward_recomputes_the_logits_the_first_overwrote() {
        let (n, h, v) = (9, 8, 30);
        let (s, w) = (
            Var::from_tensor(&random(&[n, h], 6, 1.0)).unwrap(),
            Var::from_tensor(&random(&[v, h], 7, 0.5)).unwrap(),
        );
        let u = random(&[n], 8, 1.0);
        let t: Vec<u32> = (0..n as u32).map(|i| (i * 5 + 1) % v as u32).collect();
        let t = Tensor::new(t.as_slice(), &Device::Cpu).unwrap();
        let chunking = Chunking {
            rows: 2,
            group: 4,
            keep_logits: true,
        };
        let (lp, ent) =
            output_logprobs_with(s.as_tensor(), w.as_tensor(), &t, 0.8, chunking).unwrap();
        let loss = objective(&lp, &ent, &u);
        let grads = |g: candle_core::backprop::GradStore| {
            [s.as_tensor(), w.as_tensor()].map(|x| g.get(x).expect("a gradient").clone())
        };
        let first = grads(loss.backward().unwrap());
        let second = grads(loss.backward().unwrap());
        for (a, b) in first.iter().zip(&second) {
            assert!(max_rel(a, b) < 1e-6, "{}", max_rel(a, b));
        }
    }

    #[test]
    fn only_16_bit_logits_within_the_budget_are_kept() {
        let v = 151_936;
        let chunk = chunk_rows(v); // 220
                                   // the learner's shape in bf16: 2.3 GiB kept, dW per 16 chunks
        let bf16 = Chunking::new(8192, v, chunk, DType::BF16);
        assert_eq!(
            (bf16.rows, bf16.group, bf16.keep_logits),
            (220, 220 * 16, true)
        );
        // twice the tokens pass 4 GiB; f32 logits are never all kept
        assert!(!Chunking::new(16_384, v, chunk, DType::BF16).keep_logits);
        assert!(!Chunking::new(8, v, chunk, DType::F32).keep_logits);
    }

    /// The composed backward (the path of non-CPU devices) against the fused one.
    #[test]
    fn composed_logprob_backward_matches_fused() {
        let z = random(&[5, 30], 4, 3.0);
        let t = Tensor::new(&[0u32, 29, 7, 7, 11], &Device::Cpu).unwrap();
        let y = logprob_entropy_stats(&z, &t, 1.0).unwrap();
        let g = random(&[5, 3], 5, 1.0);
        let fused = logprob_entropy_backward(&z, &t, &y, &g, 1.0, None).unwrap();
        let composed = composed::logprob_entropy_backward(&z, &t, &y, &g).unwrap();
        assert!(
            max_rel(&composed, &fused) < 1e-5,
            "{}",
            max_rel(&composed, &fused)
        );
    }
}
