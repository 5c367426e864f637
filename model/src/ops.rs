//! Fused CPU kernels with their own backward, for the elementwise and row-wise parts of the
//! decoder: RMSNorm, softmax, SwiGLU, rotary embedding, and log-softmax + gather / entropy over the
//! vocabulary. candle's composed ops run these one pass and one allocation per op on a single
//! thread; these run one or two passes over rows in parallel.
//!
//! Each public function dispatches: f32 CPU tensors take the fused CPU kernel; with the `cuda`
//! feature, f32 or bf16 CUDA tensors take the CUDA kernels of `kernels/ferrite.cu` (launched from
//! [`crate::cuda`]); anything else the composed reference in [`composed`], which is also what the
//! tests (and `gpu-check` on the GPU) compare the kernels against.

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Storage, Tensor, D,
};
use rayon::prelude::*;

use crate::error::Result;

static CUDA_KERNELS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Turns the CUDA kernels on or off process-wide (on by default): off, CUDA tensors take the
/// composed ops, e.g. to measure what the kernels gain or to get round a faulty one.
pub fn set_cuda_kernels(enabled: bool) {
    CUDA_KERNELS.store(enabled, std::sync::atomic::Ordering::Relaxed);
}

/// Whether CUDA tensors take the CUDA kernels (see [`set_cuda_kernels`]).
pub fn cuda_kernels() -> bool {
    cfg!(feature = "cuda") && CUDA_KERNELS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Whether ferrite's CUDA kernels have an entry point for `dtype` (f32, bf16, f16; the flash
/// kernels bf16 and f16 only).
pub fn kernel_dtype(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::BF16 | DType::F16)
}

/// Whether the fused kernel takes `ts`: f32 CPU tensors, or (feature `cuda`) CUDA tensors of one
/// dtype, f32, bf16 or f16, on one device.
fn fused(ts: &[&Tensor]) -> bool {
    let Some(first) = ts.first() else {
        return false;
    };
    if first.device().is_cpu() {
        return ts
            .iter()
            .all(|t| t.device().is_cpu() && t.dtype() == DType::F32);
    }
    cuda_kernels()
        && first.device().is_cuda()
        && kernel_dtype(first.dtype())
        && ts
            .iter()
            .all(|t| t.device().same_device(first.device()) && t.dtype() == first.dtype())
}

/// Whether a backward runs on the GPU kernels.
#[cfg(feature = "cuda")]
fn on_gpu(t: &Tensor) -> bool {
    t.device().is_cuda()
}

/// The contiguous f32 data of a CPU storage.
fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("fused op: expected f32");
    };
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("fused op: not contiguous".into()))?;
    Ok(&v[a..b])
}

/// Runs `f` on the f32 data of a contiguous CPU tensor.
fn with_data<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("fused op: expected a CPU tensor");
    };
    Ok(f(slice(cpu, layout)?))
}

fn rows_of(shape: &Shape) -> candle_core::Result<(usize, usize)> {
    let last = shape.dims().last().copied().unwrap_or(1);
    Ok((shape.elem_count() / last.max(1), last))
}

fn tensor(v: Vec<f32>, shape: &Shape) -> candle_core::Result<Tensor> {
    Tensor::from_vec(v, shape.clone(), &candle_core::Device::Cpu)
}

// ---------------------------------------------------------------- rows: embedding, selection

/// The contiguous u32 data of a CPU storage.
fn u32_slice<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [u32]> {
    let CpuStorage::U32(v) = s else {
        candle_core::bail!("fused op: expected u32 ids");
    };
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("fused op: not contiguous".into()))?;
    Ok(&v[a..b])
}

/// A row gather `x[ids]`: `x [M, H]`, `ids [N]` u32 → `[N, H]`. Its backward depends on what
/// the ids may hold.
struct Gather(GatherBackward);

enum GatherBackward {
    /// Ids that repeat (a step's token ids): each distinct id's rows of the upstream gradient
    /// summed into its row of zeros.
    SumPerId,
    /// Distinct rows of an `m`-row `x`: the upstream rows scattered into zeros ([`ScatterRows`]).
    Scatter { m: usize },
}

impl CustomOp2 for Gather {
    fn name(&self) -> &'static str {
        match self.0 {
            GatherBackward::SumPerId => "ferrite-embedding",
            GatherBackward::Scatter { .. } => "ferrite-select-rows",
        }
    }

    /// An id ≥ M is an error.
    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        is: &CpuStorage,
        il: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(xs, xl)?;
        let (m, h) = rows_of(xl.shape())?;
        let ids = u32_slice(is, il)?;
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= m) {
            candle_core::bail!(
                "row {bad} of a table of {m} rows (a token id past the vocabulary?)"
            );
        }
        let mut y = vec![0f32; ids.len() * h];
        y.par_chunks_mut(h.max(1))
            .zip(ids.par_iter())
            .for_each(|(y, &id)| y.copy_from_slice(&x[id as usize * h..(id as usize + 1) * h]));
        Ok((CpuStorage::F32(y), Shape::from((ids.len(), h))))
    }

    /// A row of NaN for an id ≥ M (see [`embedding`]).
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        is: &candle_core::CudaStorage,
        il: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (n, h) = (
            il.shape().elem_count(),
            xl.dims().last().copied().unwrap_or(1),
        );
        Ok((
            crate::cuda::gather_rows(xs, xl, is, il)?,
            Shape::from((n, h)),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        ids: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = match self.0 {
            GatherBackward::SumPerId => sum_per_id(x, ids, g)?,
            GatherBackward::Scatter { m } => g.contiguous()?.apply_op2(ids, ScatterRows { m })?,
        };
        Ok((Some(dx), None))
    }
}

/// The gradient of the table `w [V, H]` of a gather by the repeating `ids`: each distinct id's
/// rows of `g` summed in f32, in position order.
fn sum_per_id(w: &Tensor, ids: &Tensor, g: &Tensor) -> candle_core::Result<Tensor> {
    let (v, h) = w.dims2()?;
    // the one host read of the step's ids (a few kB), at the end of the backward
    let ids = ids.to_vec1::<u32>()?;
    let (table, u) = token_segments(&ids, v);
    #[cfg(feature = "cuda")]
    if on_gpu(w) {
        return crate::cuda::embedding_bwd(g, &table, u, v, w.dtype());
    }
    let (tokens, rest) = table.split_at(u);
    let (starts, order) = rest.split_at(u + 1);
    let mut segment = vec![u32::MAX; v];
    for (k, &t) in tokens.iter().enumerate() {
        segment[t as usize] = k as u32;
    }
    let dw = with_data(g, |g| {
        let mut dw = vec![0f32; v * h];
        dw.par_chunks_mut(h.max(1))
            .zip(segment.par_iter())
            .filter(|(_, &k)| k != u32::MAX)
            .for_each(|(row, &k)| {
                let (first, last) = (starts[k as usize], starts[k as usize + 1]);
                for &p in &order[first as usize..last as usize] {
                    let p = p as usize;
                    for (d, x) in row.iter_mut().zip(&g[p * h..(p + 1) * h]) {
                        *d += x;
                    }
                }
            });
        dw
    })?;
    tensor(dw, w.shape())
}

/// The embedding backward's table for the token `ids` of a step: its `u` distinct tokens below
/// `vocab` in increasing order, then their `u + 1` segment starts, then the positions sorted by
/// token (each token's positions in increasing order), all in one `u32` buffer; and `u`. Ids ≥
/// `vocab` (NaN rows in the CUDA forward) get no gradient.
pub fn token_segments(ids: &[u32], vocab: usize) -> (Vec<u32>, usize) {
    let mut order: Vec<u32> = (0..ids.len() as u32)
        .filter(|&p| (ids[p as usize] as usize) < vocab)
        .collect();
    order.sort_by_key(|&p| (ids[p as usize], p));
    let mut tokens = Vec::new();
    let mut starts = Vec::new();
    for (k, &p) in order.iter().enumerate() {
        if tokens.last() != Some(&ids[p as usize]) {
            tokens.push(ids[p as usize]);
            starts.push(k as u32);
        }
    }
    starts.push(order.len() as u32);
    let u = tokens.len();
    tokens.extend(starts);
    tokens.extend(order);
    (tokens, u)
}

/// Rows `ids` (u32, any shape) of the embedding table `w [V, H]` → `[ids…, H]`. On the fused
/// path (f32 CPU, f32 / bf16 CUDA) the backward sums each distinct token's rows of the upstream
/// gradient in f32, in position order, and writes each once: deterministic, where candle's
/// `index_add` on CUDA runs one thread per column through every id in turn (8,192 dependent
/// read-modify-writes per thread at the learner's step). An id ≥ V is an error, except in the
/// CUDA kernel, which cannot read the ids on the host without a sync: it writes a row of NaN, so
/// the loss is non-finite and the learner skips the step, rather than a fault that would end the
/// process.
pub fn embedding(w: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let mut dims = ids.dims().to_vec();
    dims.push(w.dim(D::Minus1)?);
    let flat = ids.flatten_all()?;
    if fused(&[w]) && w.rank() == 2 && ids.dtype() == DType::U32 {
        return Ok(w
            .contiguous()?
            .apply_op2(&flat.contiguous()?, Gather(GatherBackward::SumPerId))?
            .reshape(dims)?);
    }
    Ok(w.index_select(&flat, 0)?.reshape(dims)?)
}

/// The transpose of a gather of distinct rows: `x [N, H]` written to rows `ids` of `m` zero
/// rows. Each is the other's backward.
struct ScatterRows {
    m: usize,
}

impl CustomOp2 for ScatterRows {
    fn name(&self) -> &'static str {
        "ferrite-scatter-rows"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        is: &CpuStorage,
        il: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(xs, xl)?;
        let (_, h) = rows_of(xl.shape())?;
        let rows = u32_slice(is, il)?;
        let mut y = vec![0f32; self.m * h];
        for (i, &r) in rows.iter().enumerate() {
            if let Some(dst) = y.get_mut(r as usize * h..(r as usize + 1) * h) {
                dst.copy_from_slice(&x[i * h..(i + 1) * h]);
            }
        }
        Ok((CpuStorage::F32(y), Shape::from((self.m, h))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        is: &candle_core::CudaStorage,
        il: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let h = xl.dims().last().copied().unwrap_or(1);
        let y = crate::cuda::scatter_rows(xs, xl, is, il, self.m)?;
        Ok((y, Shape::from((self.m, h))))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        rows: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = g
            .contiguous()?
            .apply_op2(rows, Gather(GatherBackward::Scatter { m: self.m }))?;
        Ok((Some(dx), None))
    }
}

/// Checks that `rows` increase strictly and stay below `m`, and puts them on `device`.
fn distinct_rows(rows: &[u32], m: usize, device: &candle_core::Device) -> Result<Tensor> {
    let increasing = rows.windows(2).all(|w| w[0] < w[1]);
    if !increasing || rows.last().is_some_and(|&r| r as usize >= m) {
        return Err(candle_core::Error::Msg(format!(
            "row selection: {} rows must increase strictly and stay below {m}",
            rows.len()
        ))
        .into());
    }
    Ok(Tensor::new(rows, device)?)
}

/// Rows `rows` (strictly increasing, below M) of `x [M, H]` → `[N, H]`. The backward writes the
/// upstream rows into zeros in one parallel pass (fused path: f32 CPU, f32 / bf16 CUDA), where
/// candle's `index_add` backward of `index_select` runs one thread per column through every row.
pub fn select_rows(x: &Tensor, rows: &[u32]) -> Result<Tensor> {
    let (m, _) = x.dims2()?;
    let ids = distinct_rows(rows, m, x.device())?;
    if fused(&[x]) {
        return Ok(x
            .contiguous()?
            .apply_op2(&ids, Gather(GatherBackward::Scatter { m }))?);
    }
    Ok(x.index_select(&ids, 0)?)
}

/// The transpose of [`select_rows`]: `x [N, H]` written to rows `rows` (strictly increasing,
/// below `m`) of `m` zero rows → `[m, H]`; its backward selects the rows again. candle's
/// `index_add` forward runs one thread per column through every row.
pub fn scatter_rows(x: &Tensor, rows: &[u32], m: usize) -> Result<Tensor> {
    let (n, h) = x.dims2()?;
    if n != rows.len() {
        return Err(candle_core::Error::Msg(format!(
            "row scatter: {n} rows of values for {} row ids",
            rows.len()
        ))
        .into());
    }
    let ids = distinct_rows(rows, m, x.device())?;
    if fused(&[x]) {
        return Ok(x.contiguous()?.apply_op2(&ids, ScatterRows { m })?);
    }
    Ok(Tensor::zeros((m, h), x.dtype(), x.device())?.index_add(&ids, x, 0)?)
}

// ---------------------------------------------------------------- bias add

/// `x + b` over the last dimension, on CUDA.
struct BiasAdd;

impl CustomOp2 for BiasAdd {
    fn name(&self) -> &'static str {
        "ferrite-bias-add"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, b) = (slice(xs, xl)?, slice(bs, bl)?);
        let out = b.len().max(1);
        let y = x.iter().enumerate().map(|(e, v)| v + b[e % out]).collect();
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        bs: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        Ok((crate::cuda::bias_add(xs, xl, bs, bl)?, xl.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // db = 1ᵀ·g [1, out]: one matmul reading g once, coalesced, summed in f32 by cuBLAS
        let out = b.elem_count();
        let g2 = g.reshape((g.elem_count() / out.max(1), out))?;
        let ones = Tensor::ones((1, g2.dim(0)?), g2.dtype(), g2.device())?;
        let db = ones.matmul(&g2)?.reshape(b.shape())?;
        Ok((Some(g.clone()), Some(db)))
    }
}

/// `x [.., out] + b [out]`. On CUDA with the kernels (f32 or bf16, one dtype) one kernel, whose
/// backward passes the upstream gradient on to `x` and gives `b` the gradient's column sums as a
/// matmul by a row of ones; candle's `broadcast_add` backward sums the token dimension with one
/// block per column reading at the row stride. Elsewhere candle's `broadcast_add`, so that the
/// CPU's numerics stay as they are.
pub fn bias_add(x: &Tensor, b: &Tensor) -> Result<Tensor> {
    if x.device().is_cuda() && fused(&[x, b]) && b.rank() == 1 {
        return Ok(x.contiguous()?.apply_op2(&b.contiguous()?, BiasAdd)?);
    }
    Ok(x.broadcast_add(b)?)
}

// ---------------------------------------------------------------- RMSNorm

struct RmsNorm {
    eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "ferrite-rms-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, w) = (slice(xs, xl)?, slice(ws, wl)?);
        let h = w.len();
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(h).zip(x.par_chunks(h)).for_each(|(y, x)| {
            let r = inv_rms(x, self.eps);
            for i in 0..h {
                y[i] = x[i] * r * w[i];
            }
        });
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let y = crate::cuda::rms_norm_fwd(xs, xl, ws, wl, self.eps)?;
        Ok((y, xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        #[cfg(feature = "cuda")]
        if on_gpu(x) {
            let (dx, dw) = crate::cuda::rms_norm_bwd(x, w, g, self.eps)?;
            return Ok((Some(dx), Some(dw)));
        }
        let h = w.elem_count();
        let (dx, dw) = with_data(x, |x| {
            with_data(w, |w| {
                with_data(g, |g| {
                    let mut dx = vec![0f32; x.len()];
                    // dx = r·(w∘g) − r³·x·mean(x∘w∘g);  dw = Σ_rows g∘x·r
                    let partial: Vec<Vec<f32>> = dx
                        .par_chunks_mut(h)
                        .zip(x.par_chunks(h).zip(g.par_chunks(h)))
                        .chunks(64)
                        .map(|rows| {
                            let mut dw = vec![0f32; h];
                            for (dx, (x, g)) in rows {
                                let r = inv_rms(x, self.eps);
                                let dot: f32 =
                                    (0..h).map(|i| x[i] * w[i] * g[i]).sum::<f32>() / h as f32;
                                for i in 0..h {
                                    dx[i] = r * w[i] * g[i] - r * r * r * x[i] * dot;
                                    dw[i] += g[i] * x[i] * r;
                                }
                            }
                            dw
                        })
                        .collect();
                    let mut dw = vec![0f32; h];
                    for p in partial {
                        for i in 0..h {
                            dw[i] += p[i];
                        }
                    }
                    (dx, dw)
                })
            })
        })???;
        Ok((Some(tensor(dx, x.shape())?), Some(tensor(dw, w.shape())?)))
    }
}

fn inv_rms(x: &[f32], eps: f32) -> f32 {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    1.0 / (ms + eps).sqrt()
}

/// `w · x / sqrt(mean(x²) + eps)` over the last dimension (computed in f32).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if fused(&[x, w]) {
        return Ok(x.contiguous()?.apply_op2(w, RmsNorm { eps: eps as f32 })?);
    }
    composed::rms_norm(x, w, eps)
}

/// The residual add and the RMSNorm after it: `(x + res, rms_norm(x + res, w))`. Where no
/// gradient is taken (a decode step, a prefill, a no-grad forward) and the kernels apply, one
/// CUDA launch gives both, bit-identical to the two it replaces; elsewhere it is the add and
/// [`rms_norm`].
pub fn add_rms_norm(x: &Tensor, res: &Tensor, w: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda()
        && fused(&[x, res, w])
        && !(x.track_op() || res.track_op() || w.track_op())
    {
        return Ok(crate::cuda::add_rms_norm(x, res, w, eps as f32)?);
    }
    let sum = (x + res)?;
    let y = rms_norm(&sum, w, eps)?;
    Ok((sum, y))
}

// ---------------------------------------------------------------- softmax

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "ferrite-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s, l)?;
        let (_, n) = rows_of(l.shape())?;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(n).zip(x.par_chunks(n)).for_each(|(y, x)| {
            let m = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let mut sum = 0f32;
            for i in 0..n {
                y[i] = (x[i] - m).exp();
                sum += y[i];
            }
            let inv = 1.0 / sum;
            y.iter_mut().for_each(|v| *v *= inv);
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        Ok((crate::cuda::softmax_fwd(s, l)?, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(softmax_backward(y, g, 1.0)?))
    }
}

/// Gradient of `softmax(scale·x)` from its output `y` and upstream `g`:
/// `dx = scale · y ∘ (g − Σ y∘g)` per row.
fn softmax_backward(y: &Tensor, g: &Tensor, scale: f32) -> candle_core::Result<Tensor> {
    #[cfg(feature = "cuda")]
    if on_gpu(y) {
        return crate::cuda::softmax_bwd(y, g, scale);
    }
    let n = y.dims().last().copied().unwrap_or(1);
    let dx = with_data(y, |y| {
        with_data(g, |g| {
            let mut dx = vec![0f32; y.len()];
            dx.par_chunks_mut(n)
                .zip(y.par_chunks(n).zip(g.par_chunks(n)))
                .for_each(|(dx, (y, g))| {
                    let dot: f32 = y.iter().zip(g).map(|(a, b)| a * b).sum();
                    for i in 0..n {
                        dx[i] = scale * y[i] * (g[i] - dot);
                    }
                });
            dx
        })
    })??;
    tensor(dx, y.shape())
}

/// Softmax over the last dimension.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if fused(&[x]) {
        return Ok(x.contiguous()?.apply_op1(Softmax)?);
    }
    composed::softmax_last_dim(x)
}

// ---------------------------------------------------------------- attention softmax

/// `softmax(scale·x + bias)` for attention scores `x [B, Hkv, G, T, S]` and an additive mask
/// `bias [B, 1, 1, T, S]` (no gradient to the bias).
struct MaskedSoftmax {
    scale: f32,
}

impl CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "ferrite-masked-softmax"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, bias) = (slice(xs, xl)?, slice(bs, bl)?);
        let dims = xl.dims();
        let (heads, t, s) = (dims[1] * dims[2], dims[3], dims[4]);
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(s)
            .zip(x.par_chunks(s))
            .enumerate()
            .for_each(|(r, (y, x))| {
                let (bi, ti) = (r / (heads * t), r % t);
                let bias = &bias[(bi * t + ti) * s..(bi * t + ti + 1) * s];
                let mut m = f32::NEG_INFINITY;
                for j in 0..s {
                    y[j] = self.scale * x[j] + bias[j];
                    m = m.max(y[j]);
                }
                let mut sum = 0f32;
                for v in y.iter_mut() {
                    *v = (*v - m).exp();
                    sum += *v;
                }
                let inv = 1.0 / sum;
                y.iter_mut().for_each(|v| *v *= inv);
            });
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        bs: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let y = crate::cuda::masked_softmax_fwd(xs, xl, bs, bl, self.scale)?;
        Ok((y, xl.shape().clone()))
    }

    /// `y` is f32; the gradient goes back in the scores' dtype.
    fn bwd(
        &self,
        x: &Tensor,
        _bias: &Tensor,
        y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = softmax_backward(y, g, self.scale)?.to_dtype(x.dtype())?;
        Ok((Some(dx), None))
    }
}

/// Attention probabilities `softmax(scale·scores + bias)` in f32:
/// `scores [B, Hkv, G, T, S]`, `bias [B, 1, 1, T, S]`.
pub fn masked_softmax(scores: &Tensor, bias: &Tensor, scale: f64) -> Result<Tensor> {
    if fused(&[scores])
        && bias.dtype() == DType::F32
        && bias.device().same_device(scores.device())
        && scores.rank() == 5
    {
        return Ok(scores.contiguous()?.apply_op2(
            &bias.contiguous()?,
            MaskedSoftmax {
                scale: scale as f32,
            },
        )?);
    }
    composed::masked_softmax(scores, bias, scale)
}

/// The gradient of [`masked_softmax`] with respect to its scores, from its output `p` (f32) and
/// the upstream gradient `g` (same shape, any float dtype): `scale · p ∘ (g − Σ p∘g)` in f32.
pub fn masked_softmax_backward(p: &Tensor, g: &Tensor, scale: f64) -> Result<Tensor> {
    let g = g.to_dtype(DType::F32)?;
    if fused(&[p, &g]) {
        return Ok(softmax_backward(
            &p.contiguous()?,
            &g.contiguous()?,
            scale as f32,
        )?);
    }
    let dot = (p * &g)?.sum_keepdim(D::Minus1)?;
    Ok(((g.broadcast_sub(&dot)? * p)? * scale)?)
}

/// Attention probabilities `softmax(scale·scores + bias)` in `scores`' dtype, outside autograd
/// (the chunked attention's forward): `scores [B, Hkv, G, T, S]`, `bias [B, 1, 1, T, S]` f32.
/// One kernel on CUDA; elsewhere [`masked_softmax`] (f32), cast.
pub fn attention_probs(scores: &Tensor, bias: &Tensor, scale: f64) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if on_gpu(scores) && fused(&[scores]) && bias.dtype() == DType::F32 && scores.rank() == 5 {
        return Ok(crate::cuda::attention_probs(scores, bias, scale as f32)?);
    }
    Ok(masked_softmax(scores, bias, scale)?.to_dtype(scores.dtype())?)
}

/// The chunked attention's backward through its probabilities, outside autograd: from `scores`,
/// `bias` (as [`attention_probs`]) and `dp = dO·Vᵀ` (`scores`' shape), `(p, ds)` in `scores`'
/// dtype with `p = softmax(scale·scores + bias)` and `ds = scale·p∘(dp − Σ p∘dp)` computed in
/// f32. One kernel on CUDA; elsewhere [`masked_softmax`] and [`masked_softmax_backward`].
pub fn attention_probs_backward(
    scores: &Tensor,
    bias: &Tensor,
    dp: &Tensor,
    scale: f64,
) -> Result<(Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    if on_gpu(scores)
        && fused(&[scores, dp])
        && bias.dtype() == DType::F32
        && scores.rank() == 5
        && dp.dims() == scores.dims()
    {
        return Ok(crate::cuda::attention_probs_bwd(
            scores,
            bias,
            dp,
            scale as f32,
        )?);
    }
    let p = masked_softmax(scores, bias, scale)?;
    let ds = masked_softmax_backward(&p, dp, scale)?;
    Ok((p.to_dtype(scores.dtype())?, ds.to_dtype(scores.dtype())?))
}

// ---------------------------------------------------------------- SwiGLU

struct SwiGlu;

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "ferrite-swiglu"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (gate, up) = (slice(gs, gl)?, slice(us, ul)?);
        let mut y = vec![0f32; gate.len()];
        y.par_chunks_mut(4096)
            .zip(gate.par_chunks(4096).zip(up.par_chunks(4096)))
            .for_each(|(y, (a, b))| {
                for i in 0..y.len() {
                    y[i] = a[i] * sigmoid(a[i]) * b[i];
                }
            });
        Ok((CpuStorage::F32(y), gl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
        us: &candle_core::CudaStorage,
        ul: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        Ok((crate::cuda::swiglu_fwd(gs, gl, us, ul)?, gl.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        #[cfg(feature = "cuda")]
        if on_gpu(gate) {
            let (da, db) = crate::cuda::swiglu_bwd(gate, up, g)?;
            return Ok((Some(da), Some(db)));
        }
        let (dgate, dup) = with_data(gate, |a| {
            with_data(up, |b| {
                with_data(g, |g| {
                    let mut da = vec![0f32; a.len()];
                    let mut db = vec![0f32; a.len()];
                    da.par_chunks_mut(4096)
                        .zip(db.par_chunks_mut(4096))
                        .enumerate()
                        .for_each(|(k, (da, db))| {
                            let o = k * 4096;
                            for i in 0..da.len() {
                                let (x, s) = (a[o + i], sigmoid(a[o + i]));
                                db[i] = g[o + i] * x * s;
                                da[i] = g[o + i] * b[o + i] * s * (1.0 + x * (1.0 - s));
                            }
                        });
                    (da, db)
                })
            })
        })???;
        Ok((
            Some(tensor(dgate, gate.shape())?),
            Some(tensor(dup, up.shape())?),
        ))
    }
}

/// `silu(gate) · up`.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if fused(&[gate, up]) {
        return Ok(gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)?);
    }
    Ok((gate.silu()? * up)?)
}

/// [`swiglu`] of a packed gate/up projection, forward only: rows `[gate (n), up (n)]` in, rows
/// of `silu(gate) · up` out, each element as [`SwiGlu`] computes it.
struct SwiGluPacked;

impl CustomOp1 for SwiGluPacked {
    fn name(&self) -> &'static str {
        "ferrite-swiglu-packed"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let gu = slice(s, l)?;
        let (rows, two_n) = rows_of(l.shape())?;
        let n = two_n / 2;
        let mut y = vec![0f32; rows * n];
        y.par_chunks_mut(n.max(1))
            .zip(gu.par_chunks(two_n.max(1)))
            .for_each(|(y, gu)| {
                let (a, b) = gu.split_at(n);
                for i in 0..n {
                    y[i] = a[i] * sigmoid(a[i]) * b[i];
                }
            });
        Ok((CpuStorage::F32(y), half_last_dim(l.shape())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        Ok((crate::cuda::swiglu_packed(s, l)?, half_last_dim(l.shape())))
    }
}

/// A shape with its last dimension halved.
fn half_last_dim(shape: &Shape) -> Shape {
    let mut dims = shape.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last /= 2;
    }
    Shape::from(dims)
}

/// `silu(gate) · up` of a packed projection `gu [.., 2·n]` whose last dimension holds gate's n
/// values, then up's (a [`Packed`](crate::weights::Packed) layer's one matmul for both): `[.., n]`.
/// Where no gradient is taken and the kernels apply, one pass reads both halves in place; elsewhere
/// it is [`swiglu`] of the two halves.
pub fn swiglu_packed(gu: &Tensor) -> Result<Tensor> {
    let two_n = gu.dim(D::Minus1)?;
    if two_n % 2 != 0 {
        return Err(crate::error::ModelError::Unsupported(format!(
            "a packed gate/up projection of odd width {two_n}"
        )));
    }
    if fused(&[gu]) && !gu.track_op() {
        return Ok(gu.contiguous()?.apply_op1(SwiGluPacked)?);
    }
    let n = two_n / 2;
    swiglu(&gu.narrow(D::Minus1, 0, n)?, &gu.narrow(D::Minus1, n, n)?)
}

// ---------------------------------------------------------------- rotary embedding

struct Rope;

/// `y = x·cos + rotate_half(x)·sin` for one row of D, `rotate_half([a, b]) = [−b, a]`.
fn rope_row(y: &mut [f32], x: &[f32], cos: &[f32], sin: &[f32], transpose: bool) {
    let h = x.len() / 2;
    for i in 0..h {
        let (a, b) = (x[i], x[i + h]);
        if transpose {
            // the adjoint: dx = g·cos + rotate_halfᵀ(g·sin), rotate_halfᵀ([u, v]) = [v, −u]
            y[i] = a * cos[i] + b * sin[i + h];
            y[i + h] = b * cos[i + h] - a * sin[i];
        } else {
            y[i] = a * cos[i] - b * sin[i];
            y[i + h] = b * cos[i + h] + a * sin[i + h];
        }
    }
}

/// `y [B, H, T, D]` (head-major): the rotation of `x`, or its adjoint where `transpose`, with `x`
/// read from `start` at element strides `xs` of b, h and t, D contiguous: a contiguous
/// `[B, H, T, D]` tensor, or a projection's rows `[B, T, H·D]` split into heads in place (a column
/// slice of a packed projection too). `cos, sin [B, 1, T, D]` contiguous.
fn rope_head_major(
    x: &[f32],
    start: usize,
    xs: [usize; 3],
    [b, h, t, d]: [usize; 4],
    (cos, sin): (&[f32], &[f32]),
    transpose: bool,
) -> Vec<f32> {
    let mut y = vec![0f32; b * h * t * d];
    y.par_chunks_mut((t * d).max(1))
        .enumerate()
        .for_each(|(bh, y)| {
            let (bi, hi) = (bh / h, bh % h);
            for ti in 0..t {
                let at = start + bi * xs[0] + hi * xs[1] + ti * xs[2];
                let cs = (bi * t + ti) * d;
                rope_row(
                    &mut y[ti * d..(ti + 1) * d],
                    &x[at..at + d],
                    &cos[cs..cs + d],
                    &sin[cs..cs + d],
                    transpose,
                );
            }
        });
    y
}

/// `cos` and `sin` are the `[B, 1, T, D]` tables that [`rope_head_major`] indexes.
fn rope_tables_fit(tables: [&[usize]; 2], [b, t, d]: [usize; 3]) -> candle_core::Result<()> {
    if tables.iter().any(|dims| *dims != [b, 1, t, d]) {
        candle_core::bail!(
            "rope: cos and sin must be [B, 1, T, D] = [{b}, 1, {t}, {d}], not {tables:?}"
        );
    }
    Ok(())
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "ferrite-rope"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        cs: &CpuStorage,
        cl: &Layout,
        ss: &CpuStorage,
        sl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, h, t, d) = xl.shape().dims4()?;
        rope_tables_fit([cl.dims(), sl.dims()], [b, t, d])?;
        let y = rope_head_major(
            slice(xs, xl)?,
            0,
            [h * t * d, t * d, d],
            [b, h, t, d],
            (slice(cs, cl)?, slice(ss, sl)?),
            false,
        );
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        cs: &candle_core::CudaStorage,
        cl: &Layout,
        ss: &candle_core::CudaStorage,
        sl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let y = crate::cuda::rope(xs, xl, cs, cl, ss, sl)?;
        Ok((y, xl.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        #[cfg(feature = "cuda")]
        if on_gpu(g) {
            return Ok((Some(crate::cuda::rope_bwd(g, cos, sin)?), None, None));
        }
        let (b, h, t, d) = g.dims4()?;
        let dx = with_data(g, |g| {
            with_data(cos, |c| {
                with_data(sin, |s| {
                    rope_head_major(g, 0, [h * t * d, t * d, d], [b, h, t, d], (c, s), true)
                })
            })
        })???;
        Ok((Some(tensor(dx, g.shape())?), None, None))
    }
}

/// Rotary embedding of `x [B, H, T, D]` with `cos, sin [B, 1, T, D]` (no gradient to cos / sin).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if fused(&[x, cos, sin]) && x.rank() == 4 {
        return Ok(x
            .contiguous()?
            .apply_op3(&cos.contiguous()?, &sin.contiguous()?, Rope)?);
    }
    composed::rope(x, cos, sin)
}

/// [`rope_heads`]: the split into heads and the rotation in one pass each way, on the CPU as
/// on CUDA.
struct RopeHeads {
    heads: usize,
}

/// The adjoint of [`rope_head_major`] on a projection's heads: `g [B, n, T, D]` (contiguous) →
/// `dy [B, T, n·D]`, written in the projection's order.
fn rope_heads_adjoint(g: &[f32], dims: &[usize], cos: &[f32], sin: &[f32]) -> Vec<f32> {
    let (n, t, d) = (dims[1], dims[2], dims[3]);
    let mut dy = vec![0f32; g.len()];
    dy.par_chunks_mut((n * d).max(1))
        .enumerate()
        .for_each(|(row, dy)| {
            let (bi, ti) = (row / t.max(1), row % t.max(1));
            let cs = (bi * t + ti) * d;
            for h in 0..n {
                let at = ((bi * n + h) * t + ti) * d;
                rope_row(
                    &mut dy[h * d..(h + 1) * d],
                    &g[at..at + d],
                    &cos[cs..cs + d],
                    &sin[cs..cs + d],
                    true,
                );
            }
        });
    dy
}

impl CustomOp3 for RopeHeads {
    fn name(&self) -> &'static str {
        "ferrite-rope-heads"
    }

    fn cpu_fwd(
        &self,
        ys: &CpuStorage,
        yl: &Layout,
        cs: &CpuStorage,
        cl: &Layout,
        ss: &CpuStorage,
        sl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = ys else {
            candle_core::bail!("fused op: expected f32");
        };
        let (b, t, nd) = yl.shape().dims3()?;
        let n = self.heads;
        rope_tables_fit([cl.dims(), sl.dims()], [b, t, nd / n])?;
        let (st, d) = (yl.stride(), nd / n);
        let y = rope_head_major(
            data,
            yl.start_offset(),
            [st[0], d, st[1]],
            [b, n, t, d],
            (slice(cs, cl)?, slice(ss, sl)?),
            false,
        );
        Ok((CpuStorage::F32(y), Shape::from((b, n, t, d))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        ys: &candle_core::CudaStorage,
        yl: &Layout,
        cs: &candle_core::CudaStorage,
        cl: &Layout,
        ss: &candle_core::CudaStorage,
        sl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::rope_heads(ys, yl, self.heads, cs, cl, ss, sl)
    }

    fn bwd(
        &self,
        _y: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _out: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        #[cfg(feature = "cuda")]
        if on_gpu(g) {
            return Ok((Some(crate::cuda::rope_heads_bwd(g, cos, sin)?), None, None));
        }
        let dims = g.dims().to_vec();
        // cos and sin [B, 1, T, D]: the forward checked them
        let (b, n, t, d) = g.dims4()?;
        let dy = with_data(g, |g| {
            with_data(cos, |c| {
                with_data(sin, |s| rope_heads_adjoint(g, &dims, c, s))
            })
        })???;
        Ok((Some(tensor(dy, &Shape::from((b, t, n * d)))?), None, None))
    }
}

/// The rows of a projection `y [B, T, n·D]` split into `n` heads and rotated: `[B, n, T, D]`,
/// [`rope`] of their head-major copy. With the kernels (the CPU's or CUDA's) one pass reads the
/// rows in place (any row stride: a narrow of a packed q/k/v projection too) and the backward
/// writes `dy` in their order, so neither direction copies the transpose.
pub fn rope_heads(y: &Tensor, n: usize, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (b, t, nd) = y.dims3()?;
    if fused(&[y, cos, sin]) && y.stride()[2] == 1 && n > 0 && nd % n == 0 {
        return Ok(y.apply_op3(
            &cos.contiguous()?,
            &sin.contiguous()?,
            RopeHeads { heads: n },
        )?);
    }
    let x = y.reshape((b, t, n, nd / n.max(1)))?.transpose(1, 2)?;
    rope(&x.contiguous()?, cos, sin)
}

// ---------------------------------------------------------------- log-probs and entropy

/// At temperature `1 / inv_t`.
struct LogprobEntropy {
    inv_t: f32,
}

/// One pass per row of logits `z` at temperature `1 / inv_t` (`x = inv_t·z`), with a running
/// max: `m`, `S = Σ e^(x−m)` and `Σ e^(x−m)·x`, so that `log p_t = x_t − L` with the log-partition
/// `L = m + ln S`, and `H = L − Σ p·x`. Returns `(L, H)`.
fn row_stats(z: &[f32], inv_t: f32) -> (f32, f32) {
    let (mut m, mut s, mut sx) = (f32::NEG_INFINITY, 0f32, 0f32);
    for &v in z {
        let x = inv_t * v;
        if x > m {
            // rescale the sums to the new max
            let r = (m - x).exp();
            (s, sx, m) = (s * r + 1.0, sx * r + x, x);
        } else {
            let e = (x - m).exp();
            s += e;
            sx += e * x;
        }
    }
    let l = m + s.ln();
    (l, l - sx / s)
}

impl CustomOp2 for LogprobEntropy {
    fn name(&self) -> &'static str {
        "ferrite-logprob-entropy"
    }

    fn cpu_fwd(
        &self,
        zs: &CpuStorage,
        zl: &Layout,
        ts: &CpuStorage,
        tl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let z = slice(zs, zl)?;
        let t = u32_slice(ts, tl)?;
        let (n, v) = rows_of(zl.shape())?;
        let mut out = vec![0f32; 3 * n];
        out.par_chunks_mut(3).enumerate().for_each(|(r, o)| {
            let row = &z[r * v..(r + 1) * v];
            let (l, h) = row_stats(row, self.inv_t);
            o[0] = self.inv_t * row[t[r] as usize] - l;
            o[1] = h;
            o[2] = l;
        });
        Ok((CpuStorage::F32(out), Shape::from((n, 3))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        zs: &candle_core::CudaStorage,
        zl: &Layout,
        ts: &candle_core::CudaStorage,
        tl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let n = zl.shape().elem_count() / zl.dims().last().copied().unwrap_or(1).max(1);
        let out = crate::cuda::logprob_entropy_fwd(zs, zl, ts, tl, self.inv_t)?;
        Ok((out, Shape::from((n, 3))))
    }

    fn bwd(
        &self,
        z: &Tensor,
        targets: &Tensor,
        y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dz = logprob_entropy_backward(z, targets, y, g, 1.0 / self.inv_t as f64, None)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        Ok((Some(dz), None))
    }
}

/// The gradient of [`logprob_entropy_stats`] at `temperature` with respect to the logits:
/// `logits [N, V]`, `targets [N]`, `y [N, 3]` f32 (its output: log-prob, entropy, log-partition)
/// and the upstream `g [N, 3]` (the third column unused) → `dz [N, V]` in the logits' dtype, with
/// `x = z / temperature`, `d log p_t / dx_j = 1[j = t] − p_j` and
/// `dH / dx_j = −p_j (log p_j + H)`, times `1 / temperature`, where `log p_j = x_j − L`: one pass
/// over the logits. One kernel on CUDA (f32 or bf16 logits, computed in f32), fused on the CPU
/// (f32), composed ops elsewhere. `into`: rows `row..row + N` of a contiguous `[M, V]` tensor of
/// the logits' dtype to write `dz` to, in place (a weight-gradient group's buffer); the returned
/// `dz` is then those rows.
pub fn logprob_entropy_backward(
    z: &Tensor,
    targets: &Tensor,
    y: &Tensor,
    g: &Tensor,
    temperature: f64,
    into: Option<(&Tensor, usize)>,
) -> Result<Tensor> {
    let inv_t = (1.0 / temperature) as f32;
    let (n, v) = z.dims2()?;
    #[cfg(feature = "cuda")]
    if on_gpu(z) && fused(&[z]) && [y, g].iter().all(|t| t.device().same_device(z.device())) {
        return Ok(crate::cuda::logprob_entropy_bwd(
            z, targets, y, g, inv_t, into,
        )?);
    }
    let dz = if fused(&[z, y, g]) && z.device().is_cpu() {
        let t = targets.flatten_all()?.to_vec1::<u32>()?;
        let dz = with_data(z, |z| {
            with_data(y, |y| {
                with_data(g, |g| {
                    let mut dz = vec![0f32; z.len()];
                    dz.par_chunks_mut(v)
                        .zip(z.par_chunks(v))
                        .enumerate()
                        .for_each(|(r, (dz, z))| {
                            let (g_lp, g_h) = (g[3 * r], g[3 * r + 1]);
                            let (h, l) = (y[3 * r + 1], y[3 * r + 2]);
                            for j in 0..v {
                                let lp = inv_t * z[j] - l;
                                let p = lp.exp();
                                dz[j] = inv_t * (-g_lp * p - g_h * p * (lp + h));
                            }
                            dz[t[r] as usize] += inv_t * g_lp;
                        });
                    dz
                })
            })
        })???;
        tensor(dz, z.shape())?
    } else {
        let x = scaled(&z.to_dtype(DType::F32)?, inv_t)?;
        let dz = composed::logprob_entropy_backward(&x, targets, y, g)?;
        scaled(&dz, inv_t)?.to_dtype(z.dtype())?
    };
    Ok(match into {
        Some((dst, row)) => {
            dst.slice_set(&dz, 0, row)?;
            dst.narrow(0, row, n)?
        }
        None => dz,
    })
}

/// A `[rows, v]` buffer in `dtype` for [`logprob_entropy_backward`] to write every row of:
/// uninitialised on CUDA with the kernels (no memset of a weight-gradient group's gigabyte),
/// zeros elsewhere.
pub fn rows_buffer(
    rows: usize,
    v: usize,
    dtype: DType,
    device: &candle_core::Device,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if cuda_kernels() && device.is_cuda() && kernel_dtype(dtype) {
        return Ok(crate::cuda::uninit((rows, v), dtype, device)?);
    }
    Ok(Tensor::zeros((rows, v), dtype, device)?)
}

/// `x · s`, or `x` itself at `s = 1`.
fn scaled(x: &Tensor, s: f32) -> Result<Tensor> {
    Ok(if s == 1.0 { x.clone() } else { (x * s as f64)? })
}

/// `log softmax(logits / temperature)[target]` and the entropy of `softmax(logits / temperature)`
/// per row: `logits [N, V]`, `targets [N]` u32 → `([N], [N])` f32. One kernel that reads the
/// logits as they are (f32 on the CPU; f32 or bf16 on CUDA) and computes in f32; elsewhere the
/// composed ops on the f32 logits.
pub fn logprob_and_entropy(
    logits: &Tensor,
    targets: &Tensor,
    temperature: f64,
) -> Result<(Tensor, Tensor)> {
    let stats = logprob_entropy_stats(logits, targets, temperature)?; // [N, 3]
    Ok((
        stats.narrow(1, 0, 1)?.squeeze(1)?,
        stats.narrow(1, 1, 1)?.squeeze(1)?,
    ))
}

/// Whether [`logprob_entropy_stats`] and [`logprob_entropy_backward`] run on the fused kernels
/// for logits on `t`'s device in its dtype, reading all rows in one pass whatever their number
/// (the composed ops make f32 temporaries of the logits' size).
pub fn logprob_kernels_apply(t: &Tensor) -> bool {
    fused(&[t])
}

/// `[N, 3]` f32 per row of `logits [N, V]` at `temperature`: the target's log-prob, the entropy,
/// and the log-partition `L = log Σ_j e^(x_j)` of `x = logits / temperature`, which lets the
/// backward ([`logprob_entropy_backward`]) take one pass over the logits. Differentiable in the
/// logits through the first two columns.
pub fn logprob_entropy_stats(
    logits: &Tensor,
    targets: &Tensor,
    temperature: f64,
) -> Result<Tensor> {
    let inv_t = (1.0 / temperature) as f32;
    if fused(&[logits]) && logits.rank() == 2 {
        return Ok(logits
            .contiguous()?
            .apply_op2(&targets.contiguous()?, LogprobEntropy { inv_t })?);
    }
    let x = scaled(&logits.to_dtype(DType::F32)?, inv_t)?;
    let m = x.max_keepdim(1)?.detach(); // [N, 1]
    let l = (x.broadcast_sub(&m)?.exp()?.sum_keepdim(1)?.log()? + m)?;
    Ok(Tensor::cat(
        &[
            composed::logprob_gather(&x, targets)?.unsqueeze(1)?,
            composed::entropy(&x)?.unsqueeze(1)?,
            l,
        ],
        1,
    )?)
}

// ---------------------------------------------------------------- decode attention

/// One decode step's attention over a KV cache in one fused kernel, on CUDA: `q [B, Hkv, G, D]`
/// (one new token, the G query heads of each KV head), `k, v [B, Hkv, S, D]` (views of the
/// cache), `bias [B, 1, 1, 1, S]` f32 → `[B, Hkv, G, D]` in `q`'s dtype, with no backward (the
/// cache serves generation, on detached weights). None where the kernel does not apply (the CPU,
/// kernels off, shapes or layouts past its limits): the caller then takes the composed ops.
pub fn decode_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    scale: f64,
) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    if cuda_kernels() && q.device().is_cuda() && kernel_dtype(q.dtype()) && !q.track_op() {
        return Ok(crate::cuda::decode_attention(q, k, v, bias, scale as f32)?);
    }
    let _ = (q, k, v, bias, scale);
    Ok(None)
}

/// A batch's additive attention bias `[B, 1, 1, T, S]` f32 from which of its `S` key slots hold a
/// token (`key_valid`, `B` rows of `S`): query row `i` sits at slot `q_offset + i` and sees slot
/// `j` when `j ≤ q_offset + i` and the slot is valid; 0 there, `masked` elsewhere. On CUDA (with
/// the kernels on) it is built on the device from the `B·S` flags; elsewhere on the host.
pub fn attention_bias(
    key_valid: &[Vec<bool>],
    t: usize,
    q_offset: usize,
    masked: f32,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let (b, s) = (key_valid.len(), q_offset + t);
    #[cfg(feature = "cuda")]
    if let (true, candle_core::Device::Cuda(dev)) = (cuda_kernels(), device) {
        let flags: Vec<u32> = key_valid.iter().flatten().map(|&v| u32::from(v)).collect();
        return Ok(crate::cuda::attention_bias(
            &flags, b, t, s, q_offset, masked, dev,
        )?);
    }
    let mut bias = vec![masked; b * t * s];
    for (bi, valid) in key_valid.iter().enumerate() {
        for i in 0..t {
            let row = &mut bias[(bi * t + i) * s..(bi * t + i + 1) * s];
            for (j, x) in row.iter_mut().enumerate().take(q_offset + i + 1) {
                if valid[j] {
                    *x = 0.0;
                }
            }
        }
    }
    Ok(Tensor::from_vec(bias, (b, 1, 1, t, s), device)?)
}

/// A decode step's attention bias `[B, 1, 1, 1, S]`: row `b`'s one query sits at slot `S − 1`
/// and sees slots `start[b]..S` (0 there, `masked` before). The same as [`attention_bias`] with
/// `t = 1`, `q_offset = S − 1` and `valid[b][j] = j ≥ start[b]`, without the `B·S` flags: on
/// CUDA only the starts go to the device.
pub fn decode_bias(
    start: &[usize],
    s: usize,
    masked: f32,
    device: &candle_core::Device,
) -> Result<Tensor> {
    if start.is_empty() || s == 0 || start.iter().any(|&x| x >= s) {
        return Err(crate::error::ModelError::Generation(format!(
            "decode bias: {} rows, starts {start:?}, {s} slots (each start must be below the slot count)",
            start.len()
        )));
    }
    #[cfg(feature = "cuda")]
    if let (true, candle_core::Device::Cuda(dev)) = (cuda_kernels(), device) {
        let start: Vec<u32> = start.iter().map(|&x| x as u32).collect();
        return Ok(crate::cuda::decode_bias(&start, s, masked, dev)?);
    }
    let mut bias = vec![0f32; start.len() * s];
    for (row, &first) in bias.chunks_mut(s).zip(start) {
        row[..first].fill(masked);
    }
    Ok(Tensor::from_vec(bias, (start.len(), 1, 1, 1, s), device)?)
}

static FLASH_ATTENTION: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Turns the flash attention kernel on or off process-wide (on by default): off, attention over
/// a batch of rows runs its chunked forward on CUDA too, e.g. to measure what the kernel gains.
pub fn set_flash_attention(enabled: bool) {
    FLASH_ATTENTION.store(enabled, std::sync::atomic::Ordering::Relaxed);
}

/// Whether the flash attention kernels may take `q`'s attention: CUDA, kernels and flash
/// attention on (the launchers then check the shapes, the dtype and the head dimension).
fn flash_applies(q: &Tensor) -> bool {
    cuda_kernels()
        && FLASH_ATTENTION.load(std::sync::atomic::Ordering::Relaxed)
        && q.device().is_cuda()
}

/// Whether the flash kernels take the attention of queries `q [B, Hkv, G·T, D]` by their device,
/// dtype and head dimension (bf16 or f16, D 64 or 128): then a learner's attention takes them at
/// any size (see `forward::attention`), as a prefill's does.
pub fn flash_attention_takes(q: &Tensor) -> bool {
    let d = q.dims().last().copied().unwrap_or(0);
    flash_applies(q) && crate::launch::flash_attention_kernel(d, q.dtype()).is_some()
}

/// `softmax(scale·q·kᵀ + bias)·v` over a batch of query rows in one fused kernel on CUDA (the
/// FlashAttention-2 forward on the tensor cores: no score leaves the chip): `q [B, Hkv, G·T, D]`,
/// `k, v [B, Hkv, S, D]` (contiguous rows; a KV cache's views are read in place), a causal
/// `bias [B, 1, 1, T, S]` f32 (as [`crate::attention::attention`] requires: the kernels read its
/// last row) → the output token-major, `[B, T, Hq·D]` (query head `kv·G + j`'s `D` columns at
/// `(kv·G + j)·D`: what the output projection takes, with no transpose), and each row's
/// log-partition `[B·Hkv·G·T]` f32 (for [`flash_attention_backward`]). No graph:
/// [`crate::attention::attention`] attaches the backward. None where it does not apply: the
/// CPU, kernels or flash attention off, not bf16, D other than 64 or 128.
pub fn flash_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    scale: f64,
) -> Result<Option<(Tensor, Tensor)>> {
    let (q, k, v) = (q.detach(), k.detach(), v.detach());
    let out = flash_attention_value(&q, &k, &v, FlashMask::Bias(bias), scale)?;
    Ok(out.map(|(y, lse)| (y.into_tensor(), lse)))
}

/// Which keys the flash kernels' query rows see.
#[derive(Clone, Copy)]
pub enum FlashMask<'a> {
    /// A causal bias `[B, 1, 1, T, S]` f32, of which they read the last row.
    Bias(&'a Tensor),
    /// One packed row (B = 1, T = S, `crate::forward::PackedRows`): each row's segment
    /// `[T·3]` u32 and the tiles' bounds `[4·⌈T / 64⌉]` u32 ([`crate::attention::varlen_rows`]),
    /// for the `_varlen` kernels (one launch each way).
    Packed { seg: &'a Tensor, bounds: &'a Tensor },
}

/// [`flash_attention`] under any [`FlashMask`], with its output as an [`crate::attach::Value`]
/// that the graph takes over with no copy (the kernel's fresh buffer), for
/// [`crate::attention::attention`] and [`crate::attention::packed_attention`].
pub(crate) fn flash_attention_value(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: FlashMask,
    scale: f64,
) -> Result<Option<(crate::attach::Value, Tensor)>> {
    #[cfg(feature = "cuda")]
    if flash_applies(q) {
        let out = crate::cuda::flash_attention(q, k, v, mask, scale as f32)?;
        if out.is_some() {
            FLASH_CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        return Ok(out.map(|(y, shape, lse)| {
            let y = crate::attach::Value::Storage(candle_core::Storage::Cuda(y), shape);
            (y, lse)
        }));
    }
    let _ = (q, k, v, mask, scale, flash_applies);
    Ok(None)
}

static FLASH_CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How many times this process has run the flash attention kernel (a layer's forward counts
/// once).
pub fn flash_calls() -> usize {
    FLASH_CALLS.load(std::sync::atomic::Ordering::Relaxed)
}

/// The gradients `(dq, dk, dv)` of [`flash_attention`] (under `mask`, as the forward's) from its
/// inputs, its output `y`, the upstream `dy` (token-major like `y`) and its log-partitions `lse`,
/// in two kernels on CUDA (dQ, then dK and dV per query head, summed over each K/V head's G query
/// heads). None where they do not apply: as the forward.
#[allow(clippy::too_many_arguments)]
pub fn flash_attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: FlashMask,
    y: &Tensor,
    dy: &Tensor,
    lse: &Tensor,
    scale: f64,
) -> Result<Option<(Tensor, Tensor, Tensor)>> {
    #[cfg(feature = "cuda")]
    if flash_applies(q) {
        return Ok(crate::cuda::flash_attention_backward(
            q,
            k,
            v,
            mask,
            y,
            dy,
            lse,
            scale as f32,
        )?);
    }
    let _ = (q, k, v, mask, y, dy, lse, scale);
    Ok(None)
}

/// Whether [`decode_qkv`] runs its kernel for activations like `x`: CUDA, kernels on, f32 or
/// bf16, and no graph to keep (generation runs on detached weights).
pub fn decode_qkv_applies(x: &Tensor) -> bool {
    cfg!(feature = "cuda")
        && cuda_kernels()
        && x.device().is_cuda()
        && kernel_dtype(x.dtype())
        && !x.track_op()
}

/// One decode step's q/k/v epilogue in one fused kernel, on CUDA: the projections
/// `q [B, 1, Hq·D]`, `k, v [B, 1, Hkv·D]` (each its own matmul's, or column slices of one packed
/// matmul's, read in place) get their biases (`bias`: q's, k's, v's, if the model has them), q and
/// k their rotary embedding from the step's `cos, sin [B, 1, 1, D]`, and the rotated k and the v
/// are written into slot `slot` of the KV cache's buffers `k_cache, v_cache [B, Hkv, cap, D]`, in
/// place. Returns the rotated q `[B, Hq·D]`; or, with `attend` = (the step's attention bias
/// `[B, 1, 1, 1, slot + 1]` f32, scale), those queries' attention over the cache's slots
/// 0 … slot in the same launch, `[B, Hkv, G, D]` (heads h = kv·G + j), as [`decode_attention`]
/// computes it. With `norm` (`[q_norm, k_norm]` `[D]` and the epsilon: Qwen3), each query and
/// key head is RMS-normed before its rotation, in the launch with the attention only. None where
/// the kernel does not apply (the CPU, kernels off, a graph to keep; with `attend`, also G or D
/// past the decode attention's limits; `norm` without `attend`), with nothing written: the
/// caller then takes the unfused path, which computes the same (with `norm`, up to the last bit
/// of a head's norm: its sum of squares runs in another order).
#[allow(clippy::too_many_arguments)]
pub fn decode_qkv(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<[&Tensor; 3]>,
    cos: &Tensor,
    sin: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    slot: usize,
    attend: Option<(&Tensor, f64)>,
    norm: Option<([&Tensor; 2], f64)>,
) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    if decode_qkv_applies(q) {
        let (b, hkv, _, d) = k_cache.dims4()?;
        let hq = q.elem_count() / (b * d).max(1);
        let fits = crate::launch::decode_attention_fits(hq, hkv, d);
        if (attend.is_some() && !fits) || (norm.is_some() && attend.is_none()) {
            return Ok(None);
        }
        let attend = attend.map(|(bias, scale)| (bias, scale as f32));
        let norm = norm.map(|(n, eps)| (n, eps as f32));
        return Ok(Some(crate::cuda::decode_qkv(
            q, k, v, bias, cos, sin, k_cache, v_cache, slot, attend, norm,
        )?));
    }
    let _ = (
        q, k, v, bias, cos, sin, k_cache, v_cache, slot, attend, norm,
    );
    Ok(None)
}

/// The composed-op references (also the path for non-CPU devices until fused kernels exist
/// there). Every op here has a candle backward.
pub mod composed {
    use super::*;

    pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
        let dtype = x.dtype();
        let xf = x.to_dtype(DType::F32)?;
        let r = (xf.sqr()?.mean_keepdim(D::Minus1)? + eps)?
            .sqrt()?
            .recip()?; // [.., 1]
        Ok(xf.broadcast_mul(&r)?.to_dtype(dtype)?.broadcast_mul(w)?)
    }

    /// In f32 whatever the input's dtype, as the kernels compute it (a bf16 sum over a long row
    /// loses a third of the mass), returned in the input's dtype. The max is detached: softmax
    /// is shift-invariant, so its gradient is zero.
    pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
        let xf = x.to_dtype(DType::F32)?;
        let m = xf.max_keepdim(D::Minus1)?.detach();
        let e = xf.broadcast_sub(&m)?.exp()?;
        Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?
            .to_dtype(x.dtype())?)
    }

    pub fn masked_softmax(scores: &Tensor, bias: &Tensor, scale: f64) -> Result<Tensor> {
        let x = (scores.to_dtype(DType::F32)? * scale)?.broadcast_add(bias)?;
        softmax_last_dim(&x)
    }

    pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let d = x.dim(D::Minus1)?;
        let x1 = x.narrow(D::Minus1, 0, d / 2)?;
        let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        Ok((x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?)?)
    }

    pub fn log_softmax(logits: &Tensor) -> Result<Tensor> {
        let x = logits.to_dtype(DType::F32)?;
        let m = x.max_keepdim(D::Minus1)?.detach();
        let shifted = x.broadcast_sub(&m)?;
        let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
        Ok(shifted.broadcast_sub(&lse)?)
    }

    pub fn logprob_gather(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let logp = log_softmax(logits)?;
        Ok(logp
            .gather(&targets.unsqueeze(D::Minus1)?.contiguous()?, D::Minus1)?
            .squeeze(D::Minus1)?)
    }

    pub fn entropy(logits: &Tensor) -> Result<Tensor> {
        let logp = log_softmax(logits)?;
        Ok((logp.exp()? * &logp)?.sum(D::Minus1)?.neg()?)
    }

    /// [`super::logprob_entropy_backward`] from composed ops.
    pub fn logprob_entropy_backward(
        z: &Tensor,
        targets: &Tensor,
        y: &Tensor,
        g: &Tensor,
    ) -> Result<Tensor> {
        let logp = log_softmax(z)?; // [N, V]
        let p = logp.exp()?;
        let (g_lp, g_h) = (g.narrow(1, 0, 1)?, g.narrow(1, 1, 1)?); // [N, 1]
        let h = y.narrow(1, 1, 1)?;
        let dz = (p.broadcast_mul(&g_lp)? + (p * logp.broadcast_add(&h)?)?.broadcast_mul(&g_h)?)?
            .neg()?;
        let onehot = Tensor::zeros(dz.shape(), dz.dtype(), dz.device())?.scatter_add(
            &targets.unsqueeze(1)?.contiguous()?,
            &g_lp.contiguous()?,
            1,
        )?;
        Ok((dz + onehot)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{max_rel, random};
    use candle_core::{Device, Var};

    /// Forward and input gradients of `f` (fused) and `g` (composed) agree on random inputs,
    /// with a random upstream gradient.
    fn check(
        inputs: &[Tensor],
        f: impl Fn(&[Tensor]) -> Tensor,
        g: impl Fn(&[Tensor]) -> Tensor,
        grad_of: &[bool],
    ) {
        let run = |op: &dyn Fn(&[Tensor]) -> Tensor| {
            let vars: Vec<Var> = inputs
                .iter()
                .map(|t| Var::from_tensor(t).unwrap())
                .collect();
            let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
            let y = op(&ts);
            let w = random(y.dims(), 99, 1.0);
            let grads = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let gs: Vec<Option<Tensor>> = vars
                .iter()
                .map(|v| grads.get(v.as_tensor()).cloned())
                .collect();
            (y, gs)
        };
        let (yf, gf) = run(&f);
        let (yc, gc) = run(&g);
        assert!(max_rel(&yf, &yc) < 1e-5, "forward {}", max_rel(&yf, &yc));
        for (k, want) in grad_of.iter().enumerate() {
            if *want {
                let (a, b) = (
                    gf[k].as_ref().expect("fused grad"),
                    gc[k].as_ref().expect("composed grad"),
                );
                assert!(max_rel(a, b) < 1e-4, "grad {k}: {}", max_rel(a, b));
            }
        }
    }

    #[test]
    fn rms_norm_matches_composed() {
        let x = random(&[3, 5, 32], 1, 2.0);
        let w = random(&[32], 2, 1.0);
        check(
            &[x, w],
            |t| rms_norm(&t[0], &t[1], 1e-6).unwrap(),
            |t| composed::rms_norm(&t[0], &t[1], 1e-6).unwrap(),
            &[true, true],
        );
    }

    #[test]
    fn softmax_matches_composed() {
        let x = random(&[2, 3, 7, 9], 3, 3.0);
        check(
            &[x],
            |t| softmax_last_dim(&t[0]).unwrap(),
            |t| composed::softmax_last_dim(&t[0]).unwrap(),
            &[true],
        );
    }

    #[test]
    fn a_decode_bias_masks_the_slots_before_each_rows_start() {
        let m = -1e9f32;
        let bias = decode_bias(&[0, 2, 4], 5, m, &Device::Cpu).unwrap();
        assert_eq!(bias.dims(), [3, 1, 1, 1, 5]);
        let want = [[0., 0., 0., 0., 0.], [m, m, 0., 0., 0.], [m, m, m, m, 0.]];
        let got = bias.reshape((3, 5)).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(got, want);
        // the general bias of the same step: one query at slot 4, valid from each start on
        let valid: Vec<Vec<bool>> = [0, 2, 4]
            .iter()
            .map(|&first| (0..5).map(|j| j >= first).collect())
            .collect();
        let general = attention_bias(&valid, 1, 4, m, &Device::Cpu).unwrap();
        assert_eq!(
            general.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            want.concat()
        );
        // a row must see at least its own slot
        assert!(decode_bias(&[0, 5], 5, m, &Device::Cpu).is_err());
        assert!(decode_bias(&[], 5, m, &Device::Cpu).is_err());
    }

    #[test]
    fn masked_softmax_matches_composed() {
        let x = random(&[2, 2, 3, 4, 6], 10, 3.0);
        let mask: Vec<f32> = (0..2 * 4 * 6)
            .map(|i| if (i * 7) % 5 == 0 { -1e9 } else { 0.0 })
            .collect();
        let bias = Tensor::from_vec(mask, (2, 1, 1, 4, 6), &Device::Cpu).unwrap();
        let b2 = bias.clone();
        check(
            &[x],
            move |t| masked_softmax(&t[0], &bias, 0.125).unwrap(),
            move |t| composed::masked_softmax(&t[0], &b2, 0.125).unwrap(),
            &[true],
        );
    }

    #[test]
    fn swiglu_matches_composed() {
        let a = random(&[4, 6, 10], 4, 2.0);
        let b = random(&[4, 6, 10], 5, 2.0);
        check(
            &[a, b],
            |t| swiglu(&t[0], &t[1]).unwrap(),
            |t| (t[0].silu().unwrap() * &t[1]).unwrap(),
            &[true, true],
        );
    }

    #[test]
    fn swiglu_of_a_packed_projection_is_swiglu_of_its_halves() {
        // rows [gate (10), up (10)]: the no-gradient pass gives swiglu's values bit for bit
        let gu = random(&[4, 6, 20], 11, 2.0);
        let (gate, up) = (gu.narrow(2, 0, 10).unwrap(), gu.narrow(2, 10, 10).unwrap());
        let y = swiglu_packed(&gu).unwrap();
        assert_eq!(y.dims(), [4, 6, 10]);
        let want = swiglu(&gate, &up).unwrap();
        assert_eq!(max_rel(&y, &want), 0.0);
        // in bf16 (no CPU kernel): the halves through the composed op
        let y16 = swiglu_packed(&gu.to_dtype(DType::BF16).unwrap()).unwrap();
        assert_eq!(y16.dims(), [4, 6, 10]);
        let d = max_rel(&y16.to_dtype(DType::F32).unwrap(), &want);
        assert!(d < 1e-2, "bf16: {d}");
        // with a graph to keep, the gradient reaches both halves of the projection
        check(
            &[gu],
            |t| swiglu_packed(&t[0]).unwrap(),
            |t| {
                let (g, u) = (
                    t[0].narrow(2, 0, 10).unwrap(),
                    t[0].narrow(2, 10, 10).unwrap(),
                );
                (g.silu().unwrap() * u).unwrap()
            },
            &[true],
        );
        assert!(
            swiglu_packed(&random(&[2, 7], 12, 1.0)).is_err(),
            "odd width"
        );
    }

    #[test]
    fn rope_matches_composed() {
        let x = random(&[2, 3, 5, 8], 6, 1.0);
        let cos = random(&[2, 1, 5, 8], 7, 1.0);
        let sin = random(&[2, 1, 5, 8], 8, 1.0);
        check(
            &[x, cos, sin],
            |t| rope(&t[0], &t[1], &t[2]).unwrap(),
            |t| composed::rope(&t[0], &t[1], &t[2]).unwrap(),
            &[true, false, false],
        );
    }

    #[test]
    fn rope_tables_of_another_shape_are_an_error() {
        // fewer positions would index past the tables, more would rotate by the wrong rows
        let x = random(&[2, 3, 5, 8], 6, 1.0);
        for t in [4, 6] {
            let cos = random(&[2, 1, t, 8], 7, 1.0);
            let e = rope(&x, &cos, &cos).unwrap_err().to_string();
            assert!(e.contains("[2, 1, 5, 8]"), "{e}");
            let y = random(&[2, 5, 24], 12, 1.0);
            let e = rope_heads(&y, 3, &cos, &cos).unwrap_err().to_string();
            assert!(e.contains("[2, 1, 5, 8]"), "{e}");
        }
    }

    #[test]
    fn rope_of_a_projections_heads_matches_composed() {
        // the rows of a projection [2, 5, 3·8] split into 3 heads, and k's columns of a packed
        // q/k/v projection [2, 5, (3+1+1)·8] (a row stride of 40), read in place
        let cos = random(&[2, 1, 5, 8], 7, 1.0);
        let sin = random(&[2, 1, 5, 8], 8, 1.0);
        let heads = |y: &Tensor, n: usize| {
            let (b, t, nd) = y.dims3().unwrap();
            let x = y
                .reshape((b, t, n, nd / n))
                .unwrap()
                .transpose(1, 2)
                .unwrap();
            x.contiguous().unwrap()
        };
        check(
            &[random(&[2, 5, 24], 12, 1.0), cos.clone(), sin.clone()],
            |t| rope_heads(&t[0], 3, &t[1], &t[2]).unwrap(),
            |t| composed::rope(&heads(&t[0], 3), &t[1], &t[2]).unwrap(),
            &[true, false, false],
        );
        let k = |y: &Tensor| y.narrow(2, 24, 8).unwrap();
        check(
            &[random(&[2, 5, 40], 13, 1.0), cos, sin],
            |t| rope_heads(&k(&t[0]), 1, &t[1], &t[2]).unwrap(),
            |t| composed::rope(&heads(&k(&t[0]), 1), &t[1], &t[2]).unwrap(),
            &[true, false, false],
        );
    }

    #[test]
    fn logprobs_and_entropy_match_composed() {
        let z = random(&[6, 50], 9, 3.0);
        let t = Tensor::new(&[0u32, 49, 7, 7, 20, 1], &Device::Cpu).unwrap();
        // both outputs, weighted differently, so both backward paths are checked
        let combine = |(lp, h): (Tensor, Tensor)| (lp + (h * 0.37).unwrap()).unwrap();
        for temperature in [1.0, 0.7] {
            let (t1, t2) = (t.clone(), t.clone());
            check(
                std::slice::from_ref(&z),
                move |x| combine(logprob_and_entropy(&x[0], &t1, temperature).unwrap()),
                move |x| {
                    let x = (&x[0] / temperature).unwrap();
                    combine((
                        composed::logprob_gather(&x, &t2).unwrap(),
                        composed::entropy(&x).unwrap(),
                    ))
                },
                &[true],
            );
        }
    }

    #[test]
    fn the_embedding_sums_each_tokens_rows_like_index_select() {
        let w = random(&[11, 6], 21, 1.0);
        // token 3 three times, 9 twice, 0 and 10 (the table's ends) once, 5 never
        let ids = Tensor::new(&[[3u32, 9, 0, 3], [10, 3, 9, 1]], &Device::Cpu).unwrap();
        let (i1, i2) = (ids.clone(), ids.clone());
        check(
            &[w],
            move |t| embedding(&t[0], &i1).unwrap(),
            move |t| {
                t[0].index_select(&i2.flatten_all().unwrap(), 0)
                    .unwrap()
                    .reshape((2, 4, 6))
                    .unwrap()
            },
            &[true],
        );
        let (table, u) = token_segments(&[3, 9, 0, 3, 10, 3, 9, 1], 11);
        assert_eq!(u, 5);
        assert_eq!(&table[..5], &[0, 1, 3, 9, 10], "distinct tokens");
        assert_eq!(&table[5..11], &[0, 1, 2, 5, 7, 8], "segment starts");
        assert_eq!(
            &table[11..],
            &[2, 7, 0, 3, 5, 1, 6, 4],
            "positions by token"
        );
        // an id past the table: no gradient row on the kernels' side, an error in the forward
        let (table, u) = token_segments(&[4, 11, 4], 11);
        assert_eq!((u, table), (1, vec![4, 0, 2, 0, 2]));
        let bad = Tensor::new(&[1u32, 11], &Device::Cpu).unwrap();
        let err = embedding(&random(&[11, 6], 1, 1.0), &bad).unwrap_err();
        assert!(err.to_string().contains("row 11 of a table of 11"), "{err}");
    }

    #[test]
    fn row_selection_and_its_scatter_match_index_select_and_index_add() {
        let x = random(&[9, 5], 22, 1.0);
        let rows = [0u32, 2, 3, 7, 8];
        let ids = Tensor::new(&rows, &Device::Cpu).unwrap();
        let i1 = ids.clone();
        check(
            std::slice::from_ref(&x),
            |t| select_rows(&t[0], &rows).unwrap(),
            move |t| t[0].index_select(&i1, 0).unwrap(),
            &[true],
        );
        let v = random(&[5, 5], 23, 1.0);
        check(
            &[v],
            |t| scatter_rows(&t[0], &rows, 9).unwrap(),
            move |t| {
                Tensor::zeros((9, 5), DType::F32, &Device::Cpu)
                    .unwrap()
                    .index_add(&ids, &t[0], 0)
                    .unwrap()
            },
            &[true],
        );
        // the two chained: the gradient reaches exactly the selected rows
        let xv = Var::from_tensor(&x).unwrap();
        let y = scatter_rows(&select_rows(xv.as_tensor(), &rows).unwrap(), &rows, 9).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        let want: Vec<f32> = (0..9)
            .flat_map(|r| [f32::from(u8::from(rows.contains(&r))); 5])
            .collect();
        let got = g.get(xv.as_tensor()).unwrap().flatten_all().unwrap();
        assert_eq!(got.to_vec1::<f32>().unwrap(), want);
        // rows that repeat, fall or pass the end are refused
        for bad in [&[1u32, 1][..], &[3, 2], &[8, 9]] {
            assert!(select_rows(&x, bad).is_err(), "{bad:?}");
            assert!(
                scatter_rows(&random(&[2, 5], 1, 1.0), bad, 9).is_err(),
                "{bad:?}"
            );
        }
    }

    /// The CUDA bias add's op, run on the CPU (its dispatcher sends CPU tensors to candle's
    /// `broadcast_add`): the forward and both gradients against `broadcast_add`'s.
    #[test]
    fn the_bias_add_op_matches_broadcast_add() {
        let x = random(&[3, 4, 7], 30, 1.0);
        let b = random(&[7], 31, 1.0);
        check(
            &[x, b],
            |t| t[0].apply_op2(&t[1], BiasAdd).unwrap(),
            |t| t[0].broadcast_add(&t[1]).unwrap(),
            &[true, true],
        );
    }
}
