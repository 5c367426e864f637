//! Grouped-query attention that keeps no `[T, S]` probabilities for the backward. On CUDA in
//! bf16 it is FlashAttention-2 ([`crate::ops::flash_attention`], [`flash_attention_backward`]:
//! kernels on the tensor cores that keep the scores on chip, the forward saving each row's
//! log-partition for the backward). Elsewhere (the CPU, f32, a head dimension the kernels do not take) the forward
//! runs in chunks of query rows and keeps only the output; the backward recomputes each chunk's
//! probabilities from `q`, `k` and the mask and turns them into `dq`, `dk`, `dv` (the same
//! recurrence at the granularity of a chunk of rows, on the device's matmuls). Between the
//! matmuls, one row kernel per chunk on CUDA ([`attention_probs`] forward,
//! [`attention_probs_backward`] backward) reads and writes the scores in the model's dtype.
//!
//! The bias is causal (the model's batches always are): query row `i` sits at key slot
//! `S − T + i` and sees no later slot. So a chunk of rows `start..start+len` reads only the keys
//! `0..S−T+start+len`, and the matmuls and row kernels skip the rest: at T = S = 1024 in chunks
//! of 146 rows that is 43% of the scores never computed, forward or backward.
//!
//! Autograd through `q·kᵀ → softmax → ·v` keeps the f32 probabilities of every layer until the
//! backward: at B=8, T=1024 and 14 heads that is 470 MB a layer, 11 GB for 24 layers. Here a
//! chunk holds at most [`chunk_elements`] scores (default [`CHUNK_ELEMENTS`]), and only while it
//! is being computed.

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use candle_core::{DType, Device, Tensor};

use crate::attach::attach;
use crate::error::Result;
use crate::ops::{
    attention_probs, attention_probs_backward, flash_attention_backward, flash_attention_value,
    FlashMask,
};

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
/// `bias [B, 1, 1, T, S]` f32 → `[B, T, Hq·D]` token-major in `v`'s dtype (head `h`'s `D`
/// columns at `h·D`: the output projection's input, see [`token_major`]); at most `chunk` query
/// rows of scores alive at a time. Differentiable in `q`, `k` and `v`.
///
/// The bias must be causal: it masks every key slot past `S − T + i` for query row `i`, and
/// below that limit each row's bias is the last row's (a key slot's validity), as every
/// [`crate::forward::Batch`]'s is. Keys past a row's limit are never read, and the flash kernels
/// read only the bias's last row. (A row that sees no valid key at all, a left-padding query,
/// then averages the values of some of its keys rather than of all `S`: padding rows are
/// garbage either way, no real token attends to them, and their upstream gradient is 0.)
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
    let (q0, k0, v0) = (q.detach(), k.detach(), v.detach());
    // on CUDA in bf16: the flash kernels, forward and backward (the chunked backward where theirs
    // does not apply: it needs only q, k and v); the graph takes the kernel's output buffer over
    if let Some((out, lse)) = flash_attention_value(&q0, &k0, &v0, FlashMask::Bias(bias), scale)? {
        return attach(q, k, v, out, move |q, k, v, y, g| {
            let g = g.to_dtype(v.dtype())?;
            let mask = FlashMask::Bias(&op.bias);
            let (dq, dk, dv) = match flash_attention_backward(q, k, v, mask, y, &g, &lse, op.scale)?
            {
                Some(grads) => grads,
                None => op.backward(q, k, v, &g)?,
            };
            Ok([Some(dq), Some(dk), Some(dv)])
        });
    }
    let out = op.forward(&q0, &k0, &v0)?;
    attach(q, k, v, out, move |q, k, v, _, g| {
        let (dq, dk, dv) = op.backward(q, k, v, g)?;
        Ok([Some(dq), Some(dk), Some(dv)])
    })
}

/// `[B, Hkv, G·T, D]` (query head `kv·G + j`'s rows at `j·T..`) → `[B, T, Hq·D]`: the output
/// projection's input, token-major (a copy, differentiable).
pub fn token_major(x: &Tensor, t: usize) -> Result<Tensor> {
    let (b, hkv, gt, d) = x.dims4()?;
    let hq = hkv * gt / t;
    Ok(x.reshape((b, hq, t, d))?
        .transpose(1, 2)?
        .reshape((b, t, hq * d))?)
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

    /// How many leading key slots query rows `start..start+len` can see under a causal bias
    /// over `t` queries and `s` keys: up to the last row's own slot, `s − t + start + len`.
    fn visible_keys(t: usize, s: usize, start: usize, len: usize) -> usize {
        (s.saturating_sub(t) + start + len).min(s)
    }

    /// The scores of query rows `start..start+len` against the first `keys` key slots,
    /// `[B, Hkv, G, len, keys]` in `q`'s dtype, and their block of the bias.
    fn scores(
        &self,
        q_c: &Tensor,
        k: &Tensor,
        g: usize,
        start: usize,
        len: usize,
        keys: usize,
    ) -> Result<(Tensor, Tensor)> {
        let (b, hkv, _, _) = q_c.dims4()?;
        let k = k.narrow(2, 0, keys)?; // [B, Hkv, keys, D], a view
        let scores = q_c.matmul(&k.t()?)?.reshape((b, hkv, g, len, keys))?;
        let bias = self.bias.narrow(3, start, len)?.narrow(4, 0, keys)?;
        Ok((scores, bias))
    }

    /// The output token-major, `[B, T, Hq·D]`: each chunk's rows go to their place in one copy.
    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let (b, hkv, g, t, s, d) = self.dims(q, k)?;
        let v = v.contiguous()?;
        let mut parts = Vec::new();
        for start in (0..t).step_by(self.chunk) {
            let len = self.chunk.min(t - start);
            let keys = Self::visible_keys(t, s, start, len);
            let q_c = Self::rows(q, g, t, start, len)?;
            let (scores, bias) = self.scores(&q_c, k, g, start, len, keys)?;
            let p = attention_probs(&scores, &bias, self.scale)? // [B, Hkv, G, len, keys]
                .reshape((b, hkv, g * len, keys))?
                .to_dtype(v.dtype())?;
            let v_c = v.narrow(2, 0, keys)?; // [B, Hkv, keys, D]
            let y_c = p.matmul(&v_c)?.reshape((b, hkv, g, len, d))?; // [B, Hkv, G, len, D]
            parts.push(y_c.permute((0, 3, 1, 2, 4))?); // [B, len, Hkv, G, D], a view
        }
        Ok(Tensor::cat(&parts, 1)?.reshape((b, t, hkv * g * d))?)
    }

    /// The query rows `start..start+len` of every head of a token-major `x [B, T, Hq·D]` as
    /// `[B, Hkv, G·len, D]`.
    fn token_rows(x: &Tensor, hkv: usize, g: usize, start: usize, len: usize) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let d = x.dim(2)? / (hkv * g);
        Ok(x.reshape((b, t, hkv, g, d))?
            .narrow(1, start, len)?
            .permute((0, 2, 3, 1, 4))?
            .contiguous()?
            .reshape((b, hkv, g * len, d))?)
    }

    /// `(dq, dk, dv)` from the upstream `d_out [B, T, Hq·D]` (token-major), chunk by chunk:
    /// `dv += pᵀ·dO`, `ds = scale·p∘(dO·vᵀ − Σ …)`, `dq = ds·k`, `dk += dsᵀ·q`, each over the
    /// chunk's visible keys only (the rest get nothing from it).
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
        // the last rows first: they see every key, so their gradients start the f32 sums whole,
        // and each earlier chunk adds into a prefix of them in place
        let starts: Vec<usize> = (0..t).step_by(self.chunk).collect();
        let mut dq = Vec::with_capacity(starts.len());
        let (mut dk, mut dv) = (None, None);
        for &start in starts.iter().rev() {
            let len = self.chunk.min(t - start);
            let keys = Self::visible_keys(t, s, start, len);
            let (k_c, v_c) = (k.narrow(2, 0, keys)?, v.narrow(2, 0, keys)?); // [B, Hkv, keys, D]
            let q_c = Self::rows(&q, g, t, start, len)?; // [B, Hkv, G·len, D]
            let do_c = Self::token_rows(&d_out, hkv, g, start, len)?; // [B, Hkv, G·len, D]
            let (scores, bias) = self.scores(&q_c, &k, g, start, len, keys)?; // [B, Hkv, G, len, keys]
            let dp = do_c.matmul(&v_c.t()?)?.reshape(scores.shape())?;
            let (p, ds) = attention_probs_backward(&scores, &bias, &dp, self.scale)?;
            let rows = (b, hkv, g * len, keys);
            let (p, ds) = (p.reshape(rows)?, ds.reshape(rows)?.to_dtype(k.dtype())?);
            let dv_c = p.to_dtype(v.dtype())?.t()?.matmul(&do_c)?; // [B, Hkv, keys, D]
            dv = Some(add_prefix(dv, dv_c.to_dtype(DType::F32)?, s)?);
            dq.push(ds.matmul(&k_c)?.reshape((b, hkv, g, len, d))?);
            let dk_c = ds.t()?.matmul(&q_c)?; // [B, Hkv, keys, D]
            dk = Some(add_prefix(dk, dk_c.to_dtype(DType::F32)?, s)?);
        }
        dq.reverse();
        let zeros = || Tensor::zeros((b, hkv, s, d), DType::F32, k.device());
        let (dk, dv) = (dk.map_or_else(zeros, Ok)?, dv.map_or_else(zeros, Ok)?);
        let dq = Tensor::cat(&dq, 3)?.reshape((b, hkv, g * t, d))?;
        Ok((
            dq.to_dtype(q.dtype())?,
            dk.to_dtype(k.dtype())?,
            dv.to_dtype(v.dtype())?,
        ))
    }
}

/// One sequence of a packed row ([`crate::forward::PackedRows`]): its `len` tokens from slot
/// `start` attend causally to their own, after all of `prefix` (`(start, len)` of the row: the
/// leading tokens of an earlier segment with no prefix of its own, the prompt it continues).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub start: usize,
    pub len: usize,
    pub prefix: Option<(usize, usize)>,
}

impl Segment {
    /// The prefix's length (0 without one): the key slots before the segment's own.
    pub fn prefix_len(&self) -> usize {
        self.prefix.map_or(0, |(_, len)| len)
    }
}

/// What the flash kernels over a packed row of `n` tokens read of its `segments` (the `_varlen`
/// kernels of `ferrite.cu`): each row's own segment's first slot and its prefix's range
/// (`[n·3]`: own, p0, p1; p0 = p1 = 0 without a prefix), then the tiles' bounds (`[4·tiles]`):
/// per tile of [`crate::launch::FLASH_ROWS`] query rows, the keys its rows see as two spans,
/// `[a0, a1)` then `[b0, ..)` up to its last row (`key_spans`), and per tile of as many keys,
/// one past the last query row that sees any of them.
pub fn varlen_rows(segments: &[Segment], n: usize) -> (Vec<u32>, Vec<u32>) {
    let tile = crate::launch::FLASH_ROWS;
    let tiles = n.div_ceil(tile);
    let mut seg = vec![0u32; 3 * n];
    // each key's last viewer: the last row of its own segment, or of a segment it is a prefix of
    let mut last = vec![0usize; n];
    for s in segments {
        let (p0, p1) = s.prefix.map_or((0, 0), |(p, len)| (p, p + len));
        for i in s.start..s.start + s.len {
            seg[3 * i..3 * i + 3].copy_from_slice(&[s.start as u32, p0 as u32, p1 as u32]);
            last[i] = last[i].max(s.start + s.len - 1);
        }
        for l in &mut last[p0..p1] {
            *l = (*l).max(s.start + s.len - 1);
        }
    }
    let mut bounds = vec![0u32; 4 * tiles];
    for t in 0..tiles {
        let rows = t * tile..((t + 1) * tile).min(n);
        let spans = key_spans(rows.clone().map(|i| {
            let (own, p0, p1) = (seg[3 * i], seg[3 * i + 1], seg[3 * i + 2]);
            (own..i as u32 + 1, p0..p1)
        }));
        bounds[3 * t..3 * t + 3].copy_from_slice(&spans);
        bounds[3 * tiles + t] = rows.map(|j| last[j] + 1).max().unwrap_or(0) as u32;
    }
    (seg, bounds)
}

/// The attention work of the packed forward (and dQ) over a row of `n` tokens laid out as
/// `segments`, in keys summed over its tiles of [`crate::launch::FLASH_ROWS`] query rows: the
/// keys they visit (their tiles' two spans, walked `key_tile` keys at a time: the forward's
/// [`crate::launch::FLASH_KEYS`]), the keys they would visit from each tile's first key on
/// (before the spans), and the keys some row of the tile sees (the least a tiled kernel could
/// visit). The kernel emulation test checks the first against the kernels' own walks.
pub fn varlen_work(segments: &[Segment], n: usize, key_tile: usize) -> [usize; 3] {
    let tile = crate::launch::FLASH_ROWS;
    let (seg, bounds) = varlen_rows(segments, n);
    let mut work = [0usize; 3];
    for t in 0..n.div_ceil(tile) {
        let rows = t * tile..((t + 1) * tile).min(n);
        let keys = rows.end; // the tile's last row sees no key past itself
        let [a0, a1, b0] = [0, 1, 2].map(|i| bounds[3 * t + i] as usize);
        // as the kernels walk them: a tile of keys at a time, from a0 while below a1, then b0
        let mut k0 = if a0 < a1 { a0 } else { b0 };
        let first = k0;
        while k0 < keys {
            work[0] += key_tile.min(keys - k0);
            let next = k0 + key_tile;
            k0 = if k0 < a1 && next >= a1 {
                next.max(b0)
            } else {
                next
            };
        }
        work[1] += keys - first;
        let mut seen = vec![false; keys];
        for i in rows {
            let (own, p0, p1) = (seg[3 * i] as usize, seg[3 * i + 1], seg[3 * i + 2]);
            seen[own..=i].fill(true);
            seen[p0 as usize..p1 as usize].fill(true);
        }
        work[2] += seen.iter().filter(|&&s| s).count();
    }
    work
}

/// The keys a tile of query rows visits, as `[a0, a1, b0]`: the span `[a0, a1)`, then from `b0`
/// on to its last row, covering every key each row sees (`rows`: its own segment's keys up to
/// it, and its prefix's). Where those keys are more than two spans, the spans cover the keys
/// between them but for the widest gap; the kernels mask each key a row does not see anyway. A
/// packed row as the learner lays it out ([`crate::forward::PackedRows`]) makes two at most: a
/// tile's own keys run on from its first segment's start, and a later segment's prefix lies
/// within them. One span: `a0 = a1 = b0`.
fn key_spans(rows: impl Iterator<Item = (Range<u32>, Range<u32>)>) -> [u32; 3] {
    let mut spans: Vec<Range<u32>> = rows
        .flat_map(|(own, prefix)| [own, prefix])
        .filter(|r| !r.is_empty())
        .collect();
    spans.sort_by_key(|r| r.start);
    let mut merged: Vec<Range<u32>> = Vec::new();
    for r in spans {
        match merged.last_mut() {
            Some(m) if r.start <= m.end => m.end = m.end.max(r.end),
            _ => merged.push(r),
        }
    }
    let widest = merged
        .windows(2)
        .enumerate()
        .max_by_key(|(_, w)| w[1].start - w[0].end)
        .map(|(i, _)| i);
    match widest {
        Some(i) => [merged[0].start, merged[i].end, merged[i + 1].start],
        None => [merged.first().map_or(0, |r| r.start); 3],
    }
}

/// A packed row's segments and what its attention reads of them, each built the first time a
/// path needs it: every segment's causal bias `[1, 1, 1, len, prefix + len]` f32 (all keys
/// valid; the per-segment path), and on CUDA the row's [`varlen_rows`] (the `_varlen` flash
/// kernels, which need no bias).
#[derive(Debug)]
pub struct PackedMask {
    segments: Arc<[Segment]>,
    /// The row's tokens.
    n: usize,
    /// The bias's value where a key is hidden.
    masked: f32,
    device: Device,
    biases: OnceLock<Vec<Tensor>>,
    varlen: OnceLock<(Tensor, Tensor)>,
}

impl PackedMask {
    pub fn new(segments: Arc<[Segment]>, n: usize, masked: f32, device: &Device) -> Self {
        PackedMask {
            segments,
            n,
            masked,
            device: device.clone(),
            biases: OnceLock::new(),
            varlen: OnceLock::new(),
        }
    }

    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// Segment `i`'s causal bias.
    fn bias(&self, i: usize) -> Result<&Tensor> {
        if self.biases.get().is_none() {
            let built = self
                .segments
                .iter()
                .map(|s| {
                    let keys = s.prefix_len() + s.len;
                    let valid = [vec![true; keys]];
                    crate::ops::attention_bias(
                        &valid,
                        s.len,
                        s.prefix_len(),
                        self.masked,
                        &self.device,
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let _ = self.biases.set(built); // another thread's, if it was first: the same
        }
        self.biases.get().and_then(|b| b.get(i)).ok_or_else(|| {
            crate::error::ModelError::Generation(format!("packed row: no segment {i}"))
        })
    }

    /// The row's segments and tiles' bounds on the device, for the `_varlen` flash kernels.
    fn varlen(&self) -> Result<(Tensor, Tensor)> {
        if self.varlen.get().is_none() {
            let (seg, bounds) = varlen_rows(&self.segments, self.n);
            let tiles = bounds.len();
            let built = (
                Tensor::from_vec(seg, 3 * self.n, &self.device)?,
                Tensor::from_vec(bounds, tiles, &self.device)?,
            );
            let _ = self.varlen.set(built);
        }
        let missing = || crate::error::ModelError::Generation("packed row: no bounds".into());
        let (seg, bounds) = self.varlen.get().ok_or_else(missing)?;
        Ok((seg.clone(), bounds.clone()))
    }
}

static PACKED_CALLS: AtomicUsize = AtomicUsize::new(0);

/// How many attentions over packed rows this process has run (a layer's forward counts once).
pub fn packed_calls() -> usize {
    PACKED_CALLS.load(Ordering::Relaxed)
}

/// [`attention`] over one packed row of `N` tokens: `q [1, Hkv, G·N, D]`, `k, v [1, Hkv, N, D]`,
/// whose segments (`mask`'s, in order, covering the row) each attend to their prefix's keys and
/// then causally to their own → `[1, N, Hq·D]` token-major. No key of another segment is read,
/// so a segment's scores are those of its sequence alone (after its prompt): no padding, and no
/// `[N, N]` mask. Where the flash kernels take it (CUDA, bf16, D 64 or 128), the whole row is one
/// launch of the `_varlen` flash kernels each way. Elsewhere each segment runs
/// as its own [`attention`] (the flash kernels, or the chunked path) on copies of its queries
/// and keys, and the backward adds the prefix keys' gradients from every segment that reads
/// them. Differentiable in `q`, `k` and `v`.
pub fn packed_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Arc<PackedMask>,
    scale: f64,
) -> Result<Tensor> {
    PACKED_CALLS.fetch_add(1, Ordering::Relaxed);
    let op = PackedAttention {
        mask: mask.clone(),
        scale,
    };
    let segments = mask.segments();
    let (q0, k0, v0) = (q.detach(), k.detach(), v.detach());
    if crate::ops::flash_attention_takes(q) {
        let (seg, bounds) = mask.varlen()?;
        let rows = FlashMask::Packed {
            seg: &seg,
            bounds: &bounds,
        };
        if let Some((out, lse)) = flash_attention_value(&q0, &k0, &v0, rows, scale)? {
            return attach(q, k, v, out, move |q, k, v, y, g| {
                let g = g.to_dtype(v.dtype())?;
                let rows = FlashMask::Packed {
                    seg: &seg,
                    bounds: &bounds,
                };
                let grads = flash_attention_backward(q, k, v, rows, y, &g, &lse, scale)?;
                let (dq, dk, dv) = match grads {
                    Some(grads) => grads,
                    None => op.backward(q, k, v, y, &g, &vec![None; op.mask.segments.len()])?,
                };
                Ok([Some(dq), Some(dk), Some(dv)])
            });
        }
    }
    let hq = q.dim(1)? * (q.dim(2)? / k.dim(2)?.max(1));
    let mut parts = Vec::with_capacity(segments.len());
    let mut lse = Vec::with_capacity(segments.len());
    for i in 0..segments.len() {
        let (q_s, k_s, v_s) = op.inputs(&q0, &k0, &v0, i)?;
        let bias = op.mask.bias(i)?;
        match flash_attention_value(&q_s, &k_s, &v_s, FlashMask::Bias(bias), scale)? {
            Some((y, l)) => {
                parts.push(y.into_tensor());
                lse.push(Some(l));
            }
            None => {
                let chunked = op.chunked(i, chunk_rows(1, hq, k_s.dim(2)?))?;
                parts.push(chunked.forward(&q_s, &k_s, &v_s)?);
                lse.push(None);
            }
        }
    }
    let out = Tensor::cat(&parts, 1)?; // [1, N, Hq·D]
    drop(parts);
    attach(q, k, v, out, move |q, k, v, y, g| {
        let (dq, dk, dv) = op.backward(q, k, v, y, g, &lse)?;
        Ok([Some(dq), Some(dk), Some(dv)])
    })
}

struct PackedAttention {
    mask: Arc<PackedMask>,
    scale: f64,
}

impl PackedAttention {
    /// Segment `i`'s queries `[1, Hkv, G·len, D]` and its keys and values
    /// `[1, Hkv, prefix + len, D]` (the prefix's, then its own), contiguous copies.
    fn inputs(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        i: usize,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let s = self.mask.segments[i];
        let n = k.dim(2)?;
        let g = q.dim(2)? / n;
        let q_s = ChunkedAttention::rows(q, g, n, s.start, s.len)?;
        let keys = |x: &Tensor| -> Result<Tensor> {
            let own = x.narrow(2, s.start, s.len)?;
            Ok(match s.prefix {
                Some((p, len)) => Tensor::cat(&[&x.narrow(2, p, len)?, &own], 2)?,
                None => own.contiguous()?,
            })
        };
        Ok((q_s, keys(k)?, keys(v)?))
    }

    fn chunked(&self, i: usize, chunk: usize) -> Result<ChunkedAttention> {
        Ok(ChunkedAttention {
            bias: self.mask.bias(i)?.clone(),
            scale: self.scale,
            chunk: chunk.max(1),
        })
    }

    /// `(dq, dk, dv)` from the output `y` and its upstream `d_out [1, N, Hq·D]`, segment by
    /// segment: each one's queries get their own rows of `dq`; its key and value gradients are
    /// added (in f32) into its own slots and its prefix's.
    fn backward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        y: &Tensor,
        d_out: &Tensor,
        lse: &[Option<Tensor>],
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, hkv, gn, d) = q.dims4()?;
        let n = k.dim(2)?;
        let g = gn / n;
        let (q, k, v) = (q.detach(), k.detach(), v.detach());
        let d_out = d_out.to_dtype(v.dtype())?;
        let segments = &self.mask.segments;
        let mut dq = Vec::with_capacity(segments.len());
        let dk = Tensor::zeros((b, hkv, n, d), DType::F32, k.device())?;
        let dv = Tensor::zeros((b, hkv, n, d), DType::F32, k.device())?;
        for (i, s) in segments.iter().enumerate() {
            let (q_s, k_s, v_s) = self.inputs(&q, &k, &v, i)?;
            let do_s = d_out.narrow(1, s.start, s.len)?.contiguous()?; // [1, len, Hq·D]
            let flash = match &lse[i] {
                Some(l) => {
                    let y_s = y.narrow(1, s.start, s.len)?.contiguous()?;
                    let bias = self.mask.bias(i)?;
                    let mask = FlashMask::Bias(bias);
                    flash_attention_backward(&q_s, &k_s, &v_s, mask, &y_s, &do_s, l, self.scale)?
                }
                None => None,
            };
            let (dq_s, dk_s, dv_s) = match flash {
                Some(grads) => grads,
                None => {
                    let chunked = self.chunked(i, chunk_rows(1, g * hkv, k_s.dim(2)?))?;
                    chunked.backward(&q_s, &k_s, &v_s, &do_s)?
                }
            };
            dq.push(dq_s.reshape((b, hkv, g, s.len, d))?);
            for (acc, part) in [(&dk, dk_s), (&dv, dv_s)] {
                let part = part.to_dtype(DType::F32)?;
                let pl = s.prefix_len();
                if let Some((p, len)) = s.prefix {
                    add_at(acc, &part.narrow(2, 0, len)?, p)?;
                }
                add_at(acc, &part.narrow(2, pl, s.len)?, s.start)?;
            }
        }
        let dq = Tensor::cat(&dq, 3)?.reshape((b, hkv, gn, d))?;
        Ok((
            dq.to_dtype(q.dtype())?,
            dk.to_dtype(k.dtype())?,
            dv.to_dtype(v.dtype())?,
        ))
    }
}

/// `acc[.., at..at+len, ..] += part` along dim 2, in place.
fn add_at(acc: &Tensor, part: &Tensor, at: usize) -> Result<()> {
    let sum = (acc.narrow(2, at, part.dim(2)?)? + part)?;
    acc.slice_set(&sum, 2, at)?;
    Ok(())
}

/// `acc + part` over `part`'s leading key slots (dim 2), written into `acc` in place; with no
/// `acc` yet, `part` padded with zeros to `s` slots.
fn add_prefix(acc: Option<Tensor>, part: Tensor, s: usize) -> Result<Tensor> {
    let keys = part.dim(2)?;
    let Some(acc) = acc else {
        return Ok(if keys == s {
            part
        } else {
            part.pad_with_zeros(2, 0, s - keys)?
        });
    };
    let sum = (acc.narrow(2, 0, keys)? + part)?;
    acc.slice_set(&sum, 2, 0)?;
    Ok(acc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::composed;
    use crate::test_util::{max_rel, random};
    use candle_core::{Device, Var};

    #[test]
    fn varlen_work_counts_the_keys_the_spans_visit() {
        // a 10-token prompt head with two rows of 90 and 100 tokens after it: the tiles of rows
        // 128..192 and 192..200 see the prompt and keys 100.. (rows of the second), and visit
        // 0..64, then 100 on (156 and 164 keys) rather than all from key 0 (192 and 200)
        let segments = [
            Segment {
                start: 0,
                len: 10,
                prefix: None,
            },
            Segment {
                start: 10,
                len: 90,
                prefix: Some((0, 10)),
            },
            Segment {
                start: 100,
                len: 100,
                prefix: Some((0, 10)),
            },
        ];
        let [visited, from_first, seen] = varlen_work(&segments, 200, 64);
        assert_eq!(visited, 64 + 128 + 156 + 164);
        assert_eq!(from_first, 64 + 128 + 192 + 200);
        assert_eq!(seen, 64 + 128 + 102 + 110);
    }

    #[test]
    fn a_query_tiles_key_spans_skip_its_widest_gap() {
        // rows of a GRPO group's third completion: the prompt, then their own keys
        let rows = (300..364).map(|i| (250..i + 1, 0..40));
        assert_eq!(key_spans(rows), [0, 40, 250]);
        // four spans (rows that see 0..40 and 250.., others 400..420 and 500..): the two
        // spans skip the widest gap (40..250) and visit the others masked
        let rows = (300..364).map(|i| (250..i + 1, 0..40));
        let next = (500..520).map(|i| (500..i + 1, 400..420));
        assert_eq!(key_spans(rows.chain(next)), [0, 40, 250]);
        // spans that touch merge; a lone row's keys are one span
        let rows = (40..80).map(|i| (40..i + 1, 0..40));
        assert_eq!(key_spans(rows), [0; 3]);
        assert_eq!(key_spans((7..9).map(|i| (7..i + 1, 0..0))), [7; 3]);
    }

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
        token_major(&p.matmul(v).unwrap(), t).unwrap()
    }

    /// Causal mask over `t` queries at key slots `s − t..s` (an earlier `s − t` slots of shared
    /// prompt before them), with row 1's first 3 keys masked as padding, and a finite "masked"
    /// value, as the model's batches have.
    fn bias(b: usize, t: usize, s: usize) -> Tensor {
        let mut v = vec![0f32; b * t * s];
        for bi in 0..b {
            for i in 0..t {
                for j in 0..s {
                    if j > s - t + i || (bi == 1 && j < 3 && s - t + i >= 3) {
                        v[(bi * t + i) * s + j] = -1e9;
                    }
                }
            }
        }
        Tensor::from_vec(v, (b, 1, 1, t, s), &Device::Cpu).unwrap()
    }

    #[test]
    fn chunked_attention_matches_composed_forward_and_backward() {
        let (b, hkv, g, d) = (2, 2, 3, 8);
        // own keys only, then keys of a 5-slot shared prompt before the rows' own
        for (t, s) in [(11, 11), (7, 12)] {
            let (q0, k0, v0) = (
                random(&[b, hkv, g * t, d], 1, 1.0),
                random(&[b, hkv, s, d], 2, 1.0),
                random(&[b, hkv, s, d], 3, 1.0),
            );
            let u = random(&[b, t, hkv * g * d], 4, 1.0); // token-major, as the output
            let mask = bias(b, t, s);
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
            for chunk in [1, 4, t, 64] {
                let (y, grads) = run(&|q, k, v| attention(q, k, v, &mask, scale, chunk).unwrap());
                assert!(
                    max_rel(&y, &want) < 1e-5,
                    "output, T={t} S={s} chunk {chunk}"
                );
                for (name, (a, w)) in ["dq", "dk", "dv"].iter().zip(grads.iter().zip(&want_g)) {
                    let e = max_rel(a, w);
                    assert!(e < 1e-4, "{name}, T={t} S={s} chunk {chunk}: {e}");
                }
            }
        }
    }

    #[test]
    fn a_chunk_reads_the_keys_up_to_its_last_row_only() {
        // T = S = 1024 in chunks of 146 rows: 57% of the full T × S scores
        let (t, s, chunk) = (1024, 1024, 146);
        let read: usize = (0..t)
            .step_by(chunk)
            .map(|start| {
                let len = chunk.min(t - start);
                len * ChunkedAttention::visible_keys(t, s, start, len)
            })
            .sum();
        assert_eq!(read, 598_896);
        // after 100 prompt slots, the first row of 4 sees the prompt and the rows up to its own
        assert_eq!(ChunkedAttention::visible_keys(50, 150, 0, 4), 104);
        assert_eq!(ChunkedAttention::visible_keys(50, 150, 48, 4), 150);
    }

    #[test]
    fn chunk_sizes_respect_the_budget() {
        assert_eq!(chunk_rows(8, 14, 1024), CHUNK_ELEMENTS / (8 * 14 * 1024));
        assert_eq!(chunk_rows(1, 1, usize::MAX / 2), 1);
        assert!(worth_chunking(8, 14, 1024, 1024));
        assert!(!worth_chunking(8, 4, 64, 64));
    }
}
