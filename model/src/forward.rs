//! The decoder forward pass, written with composed candle ops so that every op has a backward.
//!
//! Shapes: B batch, T new tokens, S key positions (cache + new), H hidden, D head_dim,
//! Hq query heads, Hkv key/value heads, G = Hq / Hkv, V vocab.
//!
//! Grouped-query attention never copies K/V per query head: the G query heads that share a
//! K/V head are folded into the row dimension (`[B, Hkv, G·T, D]`), so one batched matmul
//! serves them all.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};

use crate::config::{ModelConfig, RopeScaling};
use crate::error::{ModelError, Result};
use crate::kv_cache::KvCache;
use crate::lora::Target;
use crate::ops::rope_heads;
use crate::weights::{LayerWeights, Weights};

/// Additive attention bias for positions a query must not see. Finite, so that a row with no
/// visible key (a padding query) gives a uniform distribution instead of NaN.
const MASKED: f32 = -1e9;

/// The inputs of one forward call.
#[derive(Debug, Clone)]
pub struct Batch {
    /// `[B, T]` u32 token ids.
    pub input_ids: Tensor,
    /// `[B·T]` u32 rotary positions (each sequence counts its own tokens, padding excluded).
    pub positions: Tensor,
    /// The largest of `positions` (the rotary table's rows needed, less one).
    pub max_position: u32,
    /// `[B, 1, 1, T, S]` additive bias: 0 where the query may attend, a large negative elsewhere.
    pub attention_bias: Tensor,
}

impl Batch {
    /// A batch without a cache. `input_ids` and `attention_mask` are `B` rows of `T` entries
    /// (mask 1 on real tokens, 0 on padding; left or right padding both work). Positions count
    /// real tokens, so a padded row gives the same logits as the sequence alone.
    pub fn new(
        input_ids: &[Vec<u32>],
        attention_mask: &[Vec<u8>],
        device: &Device,
    ) -> Result<Self> {
        let t = input_ids.first().map_or(0, Vec::len);
        if attention_mask.len() != input_ids.len() || attention_mask.iter().any(|m| m.len() != t) {
            return Err(ModelError::Generation(
                "attention_mask must have the shape of input_ids".into(),
            ));
        }
        let valid = valid_slots(attention_mask);
        let positions = valid.iter().map(|v| positions_of(v, 0)).collect::<Vec<_>>();
        Self::from_parts(input_ids, &positions, &valid, 0, t, device)
    }

    /// General form: `positions[b]` for the `T` new tokens, `key_valid[b]` over all `S` key
    /// slots (cache then new), and `q_offset` the slot of the first new token.
    pub fn from_parts(
        input_ids: &[Vec<u32>],
        positions: &[Vec<u32>],
        key_valid: &[Vec<bool>],
        q_offset: usize,
        t: usize,
        device: &Device,
    ) -> Result<Self> {
        let b = input_ids.len();
        let s = q_offset + t;
        let rows_ok = positions.len() == b
            && key_valid.len() == b
            && input_ids.iter().all(|r| r.len() == t)
            && positions.iter().all(|r| r.len() == t)
            && key_valid.iter().all(|r| r.len() == s);
        if b == 0 || t == 0 || !rows_ok {
            return Err(ModelError::Generation(format!(
                "malformed batch: {b} rows of {t} tokens expected, with {s} key slots each"
            )));
        }
        let ids: Vec<u32> = input_ids.iter().flatten().copied().collect();
        let pos: Vec<u32> = positions.iter().flatten().copied().collect();
        Ok(Batch {
            input_ids: Tensor::from_vec(ids, (b, t), device)?,
            max_position: pos.iter().copied().max().unwrap_or(0),
            positions: Tensor::from_vec(pos, b * t, device)?,
            attention_bias: crate::ops::attention_bias(key_valid, t, q_offset, MASKED, device)?,
        })
    }

    /// A decode step: row `b`'s one token `tokens[b]` goes to cache slot `L`, and its sequence
    /// fills slots `starts[b]..=L`, so the token's position is `L − starts[b]`.
    /// [`Batch::from_parts`] with `T = 1`, `q_offset = L` and `key_valid[b][j] = j ≥ starts[b]`,
    /// built without the `B·(L + 1)` flags (on CUDA only the starts go to the device: at B = 256
    /// and L = 383 the flags were 98,304 values to build on the host and 393 KB to send every
    /// step).
    pub fn decode(tokens: &[u32], starts: &[usize], l: usize, device: &Device) -> Result<Self> {
        let b = tokens.len();
        if b == 0 || starts.len() != b || starts.iter().any(|&s| s > l) {
            return Err(ModelError::Generation(format!(
                "malformed decode step: {b} tokens at slot {l}, starts {starts:?}"
            )));
        }
        let positions: Vec<u32> = starts.iter().map(|&s| (l - s) as u32).collect();
        Ok(Batch {
            input_ids: Tensor::from_slice(tokens, (b, 1), device)?,
            max_position: positions.iter().copied().max().unwrap_or(0),
            positions: Tensor::from_vec(positions, b, device)?,
            attention_bias: crate::ops::decode_bias(starts, l + 1, MASKED, device)?,
        })
    }
}

static SHARED_CALLS: AtomicUsize = AtomicUsize::new(0);

/// How many forwards over shared prompts this process has run.
pub fn shared_prompt_calls() -> usize {
    SHARED_CALLS.load(Ordering::Relaxed)
}

static LINEAR_CALLS: AtomicUsize = AtomicUsize::new(0);

/// How many [`linear`] products this process has run (one matmul launch each on CUDA, and one
/// more for a bias): `gpu-check` counts a decode step's launches with it.
pub fn linear_calls() -> usize {
    LINEAR_CALLS.load(Ordering::Relaxed)
}

/// Rows that continue shared prompts (a GRPO group's completions all continue one prompt): the
/// prompts run through the trunk once, and each row attends to its prompt's keys and values,
/// then to its own tokens. The same as running each prompt + row whole (a token's state never
/// depends on what follows it), for a fraction of the compute when the prompts are long.
#[derive(Debug, Clone)]
pub struct SharedPrompts {
    /// The `P` distinct prompts `[P, Lp]`.
    pub prompts: Batch,
    /// `[N]` u32: the prompt each row continues.
    pub rows: Tensor,
    /// The `N` rows `[N, T]`: positions continue their prompt's, and the bias covers the
    /// prompt's `Lp` slots then the row's own (`[N, 1, 1, T, Lp + T]`).
    pub batch: Batch,
}

impl SharedPrompts {
    /// `prompts` and `prompt_mask`: `P` rows of `Lp` entries (mask 1 on real tokens; padding
    /// anywhere); `rows[n]` the prompt that row `n` of `input_ids` / `attention_mask` continues.
    pub fn new(
        prompts: &[Vec<u32>],
        prompt_mask: &[Vec<u8>],
        rows: &[usize],
        input_ids: &[Vec<u32>],
        attention_mask: &[Vec<u8>],
        device: &Device,
    ) -> Result<Self> {
        let t = input_ids.first().map_or(0, Vec::len);
        let shapes_ok = rows.len() == input_ids.len()
            && rows.iter().all(|&r| r < prompts.len())
            && attention_mask.len() == input_ids.len()
            && attention_mask.iter().all(|m| m.len() == t);
        if !shapes_ok {
            return Err(ModelError::Generation(
                "shared prompts: one prompt index and a mask of the ids' shape per row".into(),
            ));
        }
        let prompt_batch = Batch::new(prompts, prompt_mask, device)?;
        let lp = prompts[0].len();
        let prompt_valid = valid_slots(prompt_mask);
        let mut positions = Vec::with_capacity(rows.len());
        let mut key_valid = Vec::with_capacity(rows.len());
        for (&r, own) in rows.iter().zip(valid_slots(attention_mask)) {
            let start = prompt_valid[r].iter().filter(|&&v| v).count() as u32;
            positions.push(positions_of(&own, start));
            key_valid.push(prompt_valid[r].iter().chain(&own).copied().collect());
        }
        let batch = Batch::from_parts(input_ids, &positions, &key_valid, lp, t, device)?;
        let rows: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        Ok(SharedPrompts {
            prompts: prompt_batch,
            rows: Tensor::from_vec(rows.clone(), rows.len(), device)?,
            batch,
        })
    }
}

use crate::attention::PackedMask;
pub use crate::attention::Segment;

/// Sequences laid end to end in one row with no padding (a learner's packed micro-batch): each
/// [`Segment`] attends to its prefix (the prompt it continues, which runs once for all the
/// segments that continue it) and causally to its own tokens, and to no other token of the row.
/// Rotary positions count from 0 in a segment without a prefix and continue the prefix's in one
/// with, so a segment's states are those of its sequence alone.
#[derive(Debug, Clone)]
pub struct PackedRows {
    /// `[1, N]` u32 token ids.
    pub input_ids: Tensor,
    /// `[N]` u32 rotary positions.
    pub positions: Tensor,
    /// The largest of `positions`.
    pub max_position: u32,
    /// The segments in order, covering the row.
    pub segments: Arc<[Segment]>,
    /// What the attention reads of them.
    mask: Arc<PackedMask>,
}

impl PackedRows {
    /// `tokens` of the row and its `segments`: in order, each starting where the last ended,
    /// the last ending at the row's end, none empty; a prefix must be the leading tokens of an
    /// earlier segment that has none.
    pub fn new(tokens: &[u32], segments: &[Segment], device: &Device) -> Result<Self> {
        let malformed = |why: String| Err(ModelError::Generation(format!("packed row: {why}")));
        let mut end = 0;
        let mut positions = Vec::with_capacity(tokens.len());
        for (i, s) in segments.iter().enumerate() {
            if s.start != end || s.len == 0 {
                return malformed(format!("segment {i} ({s:?}) does not start at {end}"));
            }
            if let Some((p, len)) = s.prefix {
                let root = segments[..i]
                    .iter()
                    .any(|r| r.prefix.is_none() && r.start == p && len <= r.len);
                if !root || len == 0 {
                    return malformed(format!("segment {i}'s prefix {p}..{} is not one", p + len));
                }
            }
            let pl = s.prefix_len();
            positions.extend((pl..pl + s.len).map(|p| p as u32));
            end += s.len;
        }
        if end != tokens.len() || end == 0 {
            return malformed(format!("segments cover {end} of {} tokens", tokens.len()));
        }
        let segments: Arc<[Segment]> = segments.into();
        Ok(PackedRows {
            input_ids: Tensor::from_slice(tokens, (1, end), device)?,
            max_position: positions.iter().copied().max().unwrap_or(0),
            positions: Tensor::from_vec(positions, end, device)?,
            mask: Arc::new(PackedMask::new(segments.clone(), end, MASKED, device)),
            segments,
        })
    }

    /// The row's tokens.
    pub fn len(&self) -> usize {
        self.positions.elem_count()
    }

    /// Never: a packed row holds a token at least.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// `true` where a mask (1 real token, 0 padding) holds a real token.
fn valid_slots(mask: &[Vec<u8>]) -> Vec<Vec<bool>> {
    mask.iter()
        .map(|m| m.iter().map(|&x| x != 0).collect())
        .collect()
}

/// Rotary positions of a row: the count of valid tokens before each slot, starting at `start`
/// (padding slots get the position of the next real token, which is never attended to).
pub fn positions_of(valid: &[bool], start: u32) -> Vec<u32> {
    let mut next = start;
    valid
        .iter()
        .map(|&v| {
            let p = next;
            if v {
                next += 1;
            }
            p
        })
        .collect()
}

/// Logits `[B, T, V]` in the weights' dtype. With a cache, the new keys and values are
/// appended and the cache advances by `T`.
pub fn forward(w: &Weights, batch: &Batch, cache: Option<&mut KvCache>) -> Result<Tensor> {
    let hidden = hidden_states(w, batch, cache)?; // [B, T, H]
    linear(&hidden, w.output_weight(), None) // [B, T, V]
}

/// A batch's token embeddings `[B, T, H]`, its rotary tables `[B, 1, T, D]` (cos, sin) and its
/// attention bias in f32.
fn embed(w: &Weights, batch: &Batch) -> Result<(Tensor, Tensor, Tensor, Tensor)> {
    let c = &w.config;
    let (b, t) = batch.input_ids.dims2()?;
    let dtype = w.embed_tokens.dtype();
    let (cos, sin) = rope_tables(c, &batch.positions, batch.max_position, b, t, dtype)?;
    let x = crate::ops::embedding(&w.embed_tokens, &batch.input_ids)?; // [B, T, H]
    Ok((x, cos, sin, batch.attention_bias.to_dtype(DType::F32)?))
}

/// Final-norm hidden states `[B, T, H]` (the trunk, for value heads and chunked log-probs).
pub fn hidden_states(w: &Weights, batch: &Batch, cache: Option<&mut KvCache>) -> Result<Tensor> {
    let (x, cos, sin, bias) = embed(w, batch)?;
    let mask = Mask::Dense(bias);
    match cache {
        Some(cache) => hidden_states_cached(w, x, &cos, &sin, &mask, cache),
        None => layers(w, x, &cos, &sin, &mask),
    }
}

/// The decoder layers over `x [B, T, H]` with no cache (each checkpointed where that is on),
/// then the final norm.
fn layers(w: &Weights, mut x: Tensor, cos: &Tensor, sin: &Tensor, mask: &Mask) -> Result<Tensor> {
    let c = &w.config;
    for layer in &w.layers {
        x = if crate::checkpoint::enabled() && layer.trains() {
            let (c, cos, sin, mask) = (c.clone(), cos.clone(), sin.clone(), mask.clone());
            crate::checkpoint::checkpointed(&x, layer, move |layer, x| {
                decoder_layer(&c, layer, x, &cos, &sin, &mask, Keys::Own)
            })?
        } else {
            decoder_layer(c, layer, &x, cos, sin, mask, Keys::Own)?
        };
    }
    rms_norm(&x, &w.norm, c.rms_norm_eps)
}

/// Final-norm hidden states `[1, N, H]` of a packed row (see [`PackedRows`]).
pub fn hidden_states_packed(w: &Weights, rows: &PackedRows) -> Result<Tensor> {
    let n = rows.input_ids.dim(1)?;
    let dtype = w.embed_tokens.dtype();
    let (cos, sin) = rope_tables(&w.config, &rows.positions, rows.max_position, 1, n, dtype)?;
    let x = crate::ops::embedding(&w.embed_tokens, &rows.input_ids)?; // [1, N, H]
    layers(w, x, &cos, &sin, &Mask::Segments(rows.clone()))
}

/// [`hidden_states`] through a KV cache (a prefill, a decode step): the layers of
/// [`decoder_layer`], each one's last residual add fused with the next layer's input norm (the
/// final norm after the last layer) in `ops::add_rms_norm`.
fn hidden_states_cached(
    w: &Weights,
    mut x: Tensor,
    cos: &Tensor,
    sin: &Tensor,
    mask: &Mask,
    cache: &mut KvCache,
) -> Result<Tensor> {
    let (c, eps, t) = (&w.config, w.config.rms_norm_eps, x.dim(1)?);
    let norms = || w.layers.iter().map(|l| &l.input_layernorm).chain([&w.norm]);
    let mut h = rms_norm(&x, norms().next().expect("the final norm at least"), eps)?;
    for ((l, layer), next_norm) in w.layers.iter().enumerate().zip(norms().skip(1)) {
        let keys = Keys::Cache(cache, l);
        let (x_mid, m, _, _) = layer_before_last_add(c, layer, &x, &h, cos, sin, mask, keys)?;
        (x, h) = crate::ops::add_rms_norm(&x_mid, &m, next_norm, eps)?;
    }
    cache.advance(t);
    Ok(h)
}

/// Final-norm hidden states `[N, T, H]` of rows that continue shared prompts (see
/// [`SharedPrompts`]); the prompts' own states are not returned.
pub fn hidden_states_shared(w: &Weights, s: &SharedPrompts) -> Result<Tensor> {
    SHARED_CALLS.fetch_add(1, Ordering::Relaxed);
    let c = &w.config;
    let (mut xp, cos_p, sin_p, bias_p) = embed(w, &s.prompts)?; // [P, Lp, H]
    let (mut xs, cos_s, sin_s, bias_s) = embed(w, &s.batch)?; // [N, T, H]
    let (bias_p, bias_s) = (Mask::Dense(bias_p), Mask::Dense(bias_s));
    let (p_dims, s_dims) = (xp.dims().to_vec(), xs.dims().to_vec());
    let n_layers = w.layers.len();
    for (l, layer) in w.layers.iter().enumerate() {
        let last = l + 1 == n_layers;
        let (cos_p, sin_p, bias_p) = (cos_p.clone(), sin_p.clone(), bias_p.clone());
        let (cos_s, sin_s, bias_s) = (cos_s.clone(), sin_s.clone(), bias_s.clone());
        let (rows, cfg) = (s.rows.clone(), c.clone());
        let run =
            move |layer: &LayerWeights, xp: &Tensor, xs: &Tensor| -> Result<(Tensor, Tensor)> {
                let h = rms_norm(xp, &layer.input_layernorm, cfg.rms_norm_eps)?;
                // the last layer's prompt states are never read: only its keys and values are
                let (xp, k, v) = if last {
                    let (k, v) = keys_values(&cfg, layer, &h, &cos_p, &sin_p)?;
                    (xp.clone(), k, v)
                } else {
                    decoder_layer_kv(&cfg, layer, xp, &cos_p, &sin_p, &bias_p, Keys::Own)?
                };
                let (k, v) = (k.index_select(&rows, 0)?, v.index_select(&rows, 0)?); // [N, Hkv, Lp, D]
                let xs = decoder_layer(
                    &cfg,
                    layer,
                    xs,
                    &cos_s,
                    &sin_s,
                    &bias_s,
                    Keys::After(&k, &v),
                )?;
                Ok((xp, xs))
            };
        (xp, xs) = if crate::checkpoint::enabled() && layer.trains() {
            // one tensor in and out: the prompts' rows, then the continuations'
            let (np, ns) = (
                xp.elem_count() / c.hidden_size,
                xs.elem_count() / c.hidden_size,
            );
            let packed = Tensor::cat(
                &[
                    xp.reshape((np, c.hidden_size))?,
                    xs.reshape((ns, c.hidden_size))?,
                ],
                0,
            )?;
            let (pd, sd, h) = (p_dims.clone(), s_dims.clone(), c.hidden_size);
            let y = crate::checkpoint::checkpointed(&packed, layer, move |layer, x| {
                let xp = x.narrow(0, 0, np)?.reshape(pd.as_slice())?;
                let xs = x.narrow(0, np, ns)?.reshape(sd.as_slice())?;
                let (xp, xs) = run(layer, &xp, &xs)?;
                Ok(Tensor::cat(
                    &[xp.reshape((np, h))?, xs.reshape((ns, h))?],
                    0,
                )?)
            })?;
            (
                y.narrow(0, 0, np)?.reshape(p_dims.as_slice())?,
                y.narrow(0, np, ns)?.reshape(s_dims.as_slice())?,
            )
        } else {
            run(layer, &xp, &xs)?
        };
    }
    rms_norm(&xs, &w.norm, c.rms_norm_eps)
}

/// A layer's q, k and v projections as one matrix `[(Hq + 2·Hkv)·D, H]` (q's rows, then k's,
/// then v's) and their biases as one vector, so that every forward multiplies them at once: a
/// packed layer's own, or an unpacked layer's (the learner's trainable `Var`s) concatenated for
/// this call. The concatenation copies 1.2M elements a layer (Qwen2.5-0.5B); its backward hands
/// each matrix a view of the one weight gradient. In return a learner step computes one matmul
/// for q, k and v each way instead of three, and no gradient adds: three matmuls with 896, 128
/// and 128 outputs leave most of a large GPU idle. Every forward, with a graph or without, takes
/// the same matmul, so that a batch's log-probs with a graph and without, from the same weights,
/// are the same numbers (at the reference, a DPO margin is exactly 0). None for a layer with some
/// of the q/k/v biases but not all: it multiplies them apart. A layer with LoRA adapters takes the
/// same product, their updates added beside it ([`with_qkv_lora`]).
fn packed_qkv(w: &LayerWeights) -> Result<Option<(Tensor, Option<Tensor>)>> {
    if let Some(p) = &w.packed {
        return Ok(Some((p.qkv.clone(), p.qkv_bias.clone())));
    }
    let bias = match (&w.q_bias, &w.k_bias, &w.v_bias) {
        (Some(q), Some(k), Some(v)) => Some(Tensor::cat(&[q, k, v], 0)?),
        (None, None, None) => None,
        _ => return Ok(None),
    };
    let qkv = Tensor::cat(&[&w.q_proj, &w.k_proj, &w.v_proj], 0)?;
    Ok(Some((qkv, bias)))
}

/// `y [B, T, (Hq + 2·Hkv)·D]`, the one q/k/v product of `x`, plus the layer's LoRA updates of q,
/// k and v side by side (a zero block for a projection without one): the base still multiplies
/// once for the three, and only the thin adapter products are apart.
fn with_qkv_lora(x: &Tensor, w: &LayerWeights, y: Tensor) -> Result<Tensor> {
    let Some(lora) = &w.lora else {
        return Ok(y);
    };
    let parts = [Target::Q, Target::K, Target::V];
    if parts.iter().all(|&t| lora.get(t).is_none()) {
        return Ok(y);
    }
    let deltas = parts
        .iter()
        .map(|&t| match lora.get(t) {
            Some(adapter) => crate::lora::delta(x, adapter, lora.scale),
            None => {
                let mut shape = x.dims().to_vec();
                *shape.last_mut().expect("rank >= 1") = t.weight(w).dim(0)?;
                Ok(Tensor::zeros(shape, y.dtype(), y.device())?)
            }
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((y + Tensor::cat(&deltas, x.rank() - 1)?)?)
}

/// The keys and values a layer's queries attend to, besides their own.
enum Keys<'a> {
    /// Only the new tokens' own.
    Own,
    /// A KV cache's (of this layer) followed by the new tokens', which are appended to it.
    Cache(&'a mut KvCache, usize),
    /// Given keys and values `[B, Hkv, P, D]` (a shared prompt's) followed by the new tokens'.
    After(&'a Tensor, &'a Tensor),
}

/// Which keys each query may see among those of [`Keys`].
#[derive(Clone)]
enum Mask {
    /// An additive bias `[B, 1, 1, T, S]` f32 (a [`Batch`]'s).
    Dense(Tensor),
    /// The segments of one packed row (`B = 1`, [`Keys::Own`]).
    Segments(PackedRows),
}

/// One decoder layer: `x + attn(norm(x))`, then `+ mlp(norm(·))`; `[B, T, H]` in and out.
fn decoder_layer(
    c: &ModelConfig,
    layer: &LayerWeights,
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    mask: &Mask,
    keys: Keys,
) -> Result<Tensor> {
    Ok(decoder_layer_kv(c, layer, x, cos, sin, mask, keys)?.0)
}

/// [`decoder_layer`], also returning the new tokens' rotated keys and values `[B, Hkv, T, D]`.
fn decoder_layer_kv(
    c: &ModelConfig,
    layer: &LayerWeights,
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    mask: &Mask,
    keys: Keys,
) -> Result<(Tensor, Tensor, Tensor)> {
    let h = rms_norm(x, &layer.input_layernorm, c.rms_norm_eps)?;
    let (x, m, k, v) = layer_before_last_add(c, layer, x, &h, cos, sin, mask, keys)?;
    Ok(((&x + &m)?, k, v))
}

/// A decoder layer up to its last residual add, from `x` and its input norm `h`: `x + attn(h)`
/// and the MLP's output on its norm (the caller adds them, or fuses the add with the next norm),
/// and the new tokens' keys and values.
#[allow(clippy::too_many_arguments)]
fn layer_before_last_add(
    c: &ModelConfig,
    layer: &LayerWeights,
    x: &Tensor,
    h: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    mask: &Mask,
    keys: Keys,
) -> Result<(Tensor, Tensor, Tensor, Tensor)> {
    let (attn, k, v) = attention(c, layer, h, cos, sin, mask, keys)?;
    let (x, h) =
        crate::ops::add_rms_norm(x, &attn, &layer.post_attention_layernorm, c.rms_norm_eps)?;
    Ok((x, mlp(layer, &h)?, k, v))
}

/// `x [.., in] · wᵀ [in, out] (+ bias)` → `[.., out]`.
pub fn linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    LINEAR_CALLS.fetch_add(1, Ordering::Relaxed);
    let dims = x.dims().to_vec();
    let inner = dims[dims.len() - 1];
    let rows = x.elem_count() / inner.max(1);
    let y = crate::linear::matmul_t(&x.reshape((rows, inner))?, w)?; // [rows, out]
    let y = match bias {
        Some(b) => crate::ops::bias_add(&y, b)?,
        None => y,
    };
    let mut out = dims;
    *out.last_mut().expect("rank >= 1") = w.dim(0)?;
    Ok(y.reshape(out)?)
}

pub use crate::ops::rms_norm;

fn mlp(w: &LayerWeights, x: &Tensor) -> Result<Tensor> {
    let act = match &w.packed {
        // one matmul for gate and up: [B, T, 2·I]
        Some(p) => crate::ops::swiglu_packed(&linear(x, &p.gate_up, None)?)?,
        None => {
            let gate = project(x, w, Target::Gate, None)?; // [B, T, I]
            let up = project(x, w, Target::Up, None)?; // [B, T, I]
            crate::ops::swiglu(&gate, &up)?
        }
    };
    project(&act, w, Target::Down, None) // [B, T, H]
}

/// A layer's projection `target` of `x [.., in]`: `x·Wᵀ (+ bias)`, plus its LoRA update where
/// the layer has one ([`crate::lora::delta`]).
fn project(x: &Tensor, w: &LayerWeights, target: Target, bias: Option<&Tensor>) -> Result<Tensor> {
    let y = linear(x, target.weight(w), bias)?;
    match w
        .lora
        .as_ref()
        .and_then(|l| Some((l.get(target)?, l.scale)))
    {
        Some((adapter, scale)) => Ok((y + crate::lora::delta(x, adapter, scale)?)?),
        None => Ok(y),
    }
}

/// The new tokens' rotated keys and their values, `[B, Hkv, T, D]` each, from `x [B, T, H]`:
/// through the one q/k/v matmul where [`projections`] takes it (its q columns unused), so that
/// they are the very numbers it computes.
fn keys_values(
    c: &ModelConfig,
    w: &LayerWeights,
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<(Tensor, Tensor)> {
    if let Some((qkv, qkv_bias)) = packed_qkv(w)? {
        let y = with_qkv_lora(x, w, linear(x, &qkv, qkv_bias.as_ref())?)?;
        return packed_keys_values(c, w, &y, cos, sin);
    }
    let k = project(x, w, Target::K, w.k_bias.as_ref())?; // [B, T, Hkv·D]
    let v = heads(
        project(x, w, Target::V, w.v_bias.as_ref())?,
        c.num_key_value_heads,
        c.head_dim,
    )?;
    let k = rotated(c, &k, c.num_key_value_heads, w.k_norm.as_ref(), cos, sin)?;
    Ok((k, v))
}

/// The rotated keys and the values `[B, Hkv, T, D]` of a packed projection
/// `y [B, T, (Hq + 2·Hkv)·D]`, from views of its columns: in the backward each slice's gradient
/// is written into its place in y's (the vendored candle's narrow backward).
fn packed_keys_values(
    c: &ModelConfig,
    w: &LayerWeights,
    y: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let (hq, hkv, d) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
    let k = y.narrow(2, hq * d, hkv * d)?;
    let k = rotated(c, &k, hkv, w.k_norm.as_ref(), cos, sin)?;
    let v = heads(y.narrow(2, (hq + hkv) * d, hkv * d)?, hkv, d)?;
    Ok((k, v))
}

/// The rotated heads `[B, n, T, D]` of `y [B, T, n·D]`, a layer's query or key projection:
/// each head RMS-normed over its D first where the layer has that norm (`norm [D]`: Qwen3's
/// `q_norm`, `k_norm`), as transformers does before the rotary embedding.
fn rotated(
    c: &ModelConfig,
    y: &Tensor,
    n: usize,
    norm: Option<&Tensor>,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<Tensor> {
    let Some(norm) = norm else {
        return rope_heads(y, n, cos, sin);
    };
    let (b, t, _) = y.dims3()?;
    let d = c.head_dim;
    let normed = rms_norm(&y.reshape((b, t, n, d))?, norm, c.rms_norm_eps)?; // [B, T, n, D]
    rope_heads(&normed.reshape((b, t, n * d))?, n, cos, sin)
}

/// `[B, T, n·D]` → `[B, n, T, D]`.
fn heads(y: Tensor, n: usize, d: usize) -> Result<Tensor> {
    let (b, t, _) = y.dims3()?;
    Ok(y.reshape((b, t, n, d))?.transpose(1, 2)?.contiguous()?)
}

/// A layer's rotated queries `[B, Hq, T, D]`, the keys and values they attend to
/// `[B, Hkv, S, D]`, and the new tokens' own keys and values `[B, Hkv, T, D]`.
struct Projections {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_new: Tensor,
    v_new: Tensor,
}

/// [`Projections`] of `x [B, T, H]` through the composed ops; the new keys and values go into
/// the cache, after the shared prompt's, or stand alone, as `keys` says.
fn projections(
    c: &ModelConfig,
    w: &LayerWeights,
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    keys: Keys,
) -> Result<Projections> {
    let (hq, d) = (c.num_attention_heads, c.head_dim);
    // rotated q [B, Hq, T, D], rotated k and v [B, Hkv, T, D]
    let (q, k_new, v_new) = match packed_qkv(w)? {
        Some((qkv, qkv_bias)) => {
            // one matmul for q, k and v: [B, T, (Hq + 2·Hkv)·D]
            let y = with_qkv_lora(x, w, linear(x, &qkv, qkv_bias.as_ref())?)?;
            let q = rotated(c, &y.narrow(2, 0, hq * d)?, hq, w.q_norm.as_ref(), cos, sin)?;
            let (k, v) = packed_keys_values(c, w, &y, cos, sin)?;
            (q, k, v)
        }
        None => {
            let q = project(x, w, Target::Q, w.q_bias.as_ref())?; // [B, T, Hq·D]
            let (k, v) = keys_values(c, w, x, cos, sin)?; // [B, Hkv, T, D]
            (rotated(c, &q, hq, w.q_norm.as_ref(), cos, sin)?, k, v)
        }
    };
    let (k, v) = match keys {
        Keys::Cache(cache, layer) => cache.append(layer, &k_new, &v_new)?, // [B, Hkv, S, D]
        Keys::After(k, v) => (Tensor::cat(&[k, &k_new], 2)?, Tensor::cat(&[v, &v_new], 2)?),
        Keys::Own => (k_new.clone(), v_new.clone()),
    };
    Ok(Projections {
        q,
        k,
        v,
        k_new,
        v_new,
    })
}

/// What a decode step's fused kernels (CUDA) did with a layer's q/k/v projections.
enum DecodeStep {
    /// The epilogue and the attention in one launch: the attention `[B, Hkv, G, D]` (before the
    /// output projection), the new token's key and value `[B, Hkv, 1, D]` (views of the cache).
    Attended(Tensor, Tensor, Tensor),
    /// The epilogue only (G or D past the decode attention's limits): the [`Projections`].
    Projected(Projections),
}

/// A decode step's attention, or its [`Projections`], with the fused kernels after the q/k/v
/// matmul(s) (CUDA: `ops::decode_qkv`): biases, rotary embedding and the cache write in place,
/// and the attention over the cache in the same launch where it fits. None where they do not
/// apply, with nothing computed or written: the CPU, kernels off, a graph to keep, a model with
/// some of the q/k/v biases but not all, or biases in another dtype than its activations; with
/// query and key norms (Qwen3), also where the attention does not fit the fused launch (the
/// epilogue alone has no norm), known before the q/k/v matmul, which the caller then runs.
#[allow(clippy::too_many_arguments)]
fn decode_step(
    c: &ModelConfig,
    w: &LayerWeights,
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    attention_bias: &Tensor,
    cache: &mut KvCache,
    layer: usize,
) -> Result<Option<DecodeStep>> {
    let bias = match (&w.q_bias, &w.k_bias, &w.v_bias) {
        _ if w.lora.is_some() => return Ok(None),
        (Some(qb), Some(kb), Some(vb)) => Some([qb, kb, vb]),
        (None, None, None) => None,
        _ => return Ok(None),
    };
    let same_dtype = bias.is_none_or(|bs| bs.iter().all(|t| t.dtype() == x.dtype()));
    if !same_dtype || !crate::ops::decode_qkv_applies(x) {
        return Ok(None);
    }
    let (b, hq, d) = (x.dim(0)?, c.num_attention_heads, c.head_dim);
    let norm = match (&w.q_norm, &w.k_norm) {
        (Some(qn), Some(kn)) => Some(([qn, kn], c.rms_norm_eps)),
        _ => None,
    };
    if norm.is_some() && !crate::launch::decode_attention_fits(hq, c.num_key_value_heads, d) {
        return Ok(None);
    }
    let (q, k, v) = match &w.packed {
        Some(p) => {
            // one matmul; the kernel reads each part in place, rows of (Hq + 2·Hkv)·D apart
            let (nq, nkv) = (w.q_proj.dim(0)?, w.k_proj.dim(0)?);
            let y = linear(x, &p.qkv, None)?; // [B, 1, Hq·D + 2·Hkv·D]
            (
                y.narrow(2, 0, nq)?,
                y.narrow(2, nq, nkv)?,
                y.narrow(2, nq + nkv, nkv)?,
            )
        }
        None => (
            linear(x, &w.q_proj, None)?, // [B, 1, Hq·D]
            linear(x, &w.k_proj, None)?, // [B, 1, Hkv·D]
            linear(x, &w.v_proj, None)?, // [B, 1, Hkv·D]
        ),
    };
    let (k_cache, v_cache, slot) = cache.next_slot(layer)?;
    let scale = 1.0 / (d as f64).sqrt();
    let fused = |attend| {
        crate::ops::decode_qkv(
            &q, &k, &v, bias, cos, sin, k_cache, v_cache, slot, attend, norm,
        )
    };
    let attended = fused(Some((attention_bias, scale)))?;
    let projected = match attended {
        Some(_) => None,
        None => fused(None)?,
    };
    let (k_all, v_all) = cache.filled(layer, 1)?; // [B, Hkv, S, D]
    let (k_new, v_new) = (k_all.narrow(2, slot, 1)?, v_all.narrow(2, slot, 1)?);
    Ok(match (attended, projected) {
        (Some(out), _) => Some(DecodeStep::Attended(out, k_new, v_new)),
        (None, Some(q)) => Some(DecodeStep::Projected(Projections {
            q: q.reshape((b, hq, 1, d))?,
            k: k_all,
            v: v_all,
            k_new,
            v_new,
        })),
        (None, None) => None,
    })
}

/// The attention block's output `[B, T, H]`, and the new tokens' keys and values.
fn attention(
    c: &ModelConfig,
    w: &LayerWeights,
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    mask: &Mask,
    keys: Keys,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, t, _) = x.dims3()?;
    let bias = match mask {
        Mask::Dense(bias) => bias,
        Mask::Segments(rows) => {
            let p = projections(c, w, x, cos, sin, keys)?;
            let (hq, hkv, d) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
            let q = p.q.reshape((b, hkv, hq / hkv * t, d))?; // heads h = kv·G + j share K/V head kv
            let scale = 1.0 / (d as f64).sqrt();
            let v = p.v.contiguous()?;
            let out = crate::attention::packed_attention(&q, &p.k, &v, &rows.mask, scale)?;
            return Ok((project(&out, w, Target::O, None)?, p.k_new, p.v_new));
        }
    };
    let (hq, hkv, d) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
    let g = hq / hkv;
    let cached = matches!(keys, Keys::Cache(..));
    let step = match keys {
        Keys::Cache(cache, layer) if t == 1 => {
            match decode_step(c, w, x, cos, sin, bias, cache, layer)? {
                Some(step) => step,
                None => DecodeStep::Projected(projections(
                    c,
                    w,
                    x,
                    cos,
                    sin,
                    Keys::Cache(cache, layer),
                )?),
            }
        }
        keys => DecodeStep::Projected(projections(c, w, x, cos, sin, keys)?),
    };
    let Projections {
        q,
        k,
        v,
        k_new,
        v_new,
    } = match step {
        DecodeStep::Attended(out, k_new, v_new) => {
            let out = out.reshape((b, 1, hq * d))?; // [B, Hkv, G, D] → [B, 1, Hq·D]
            return Ok((project(&out, w, Target::O, None)?, k_new, v_new));
        }
        DecodeStep::Projected(p) => p,
    };
    let s = k.dim(2)?;
    let q = q.reshape((b, hkv, g * t, d))?; // heads h = kv·G + j share K/V head kv
    let scale = 1.0 / (d as f64).sqrt();
    if cached && t == 1 {
        // a decode step: one fused kernel on CUDA, reading the cache in place
        if let Some(out) = crate::ops::decode_attention(&q, &k, &v, bias, scale)? {
            let out = out.reshape((b, 1, hq * d))?; // [B, Hkv, G, D] → [B, 1, Hq·D]
            return Ok((project(&out, w, Target::O, None)?, k_new, v_new));
        }
    }
    // no graph to keep (a prefill): one kernel on CUDA, reading a cache in place
    let flash = match t > 1 && !q.track_op() {
        true => crate::ops::flash_attention(&q, &k, &v, bias, scale)?.map(|(out, _)| out),
        false => None,
    };
    // [B, T, Hq·D], token-major as the output projection takes it: the flash kernel and the
    // chunked attention write it so, the composed ops transpose
    let out = if let Some(out) = flash {
        out
    } else if !cached
        && (crate::attention::worth_chunking(b, hq, t, s) || crate::ops::flash_attention_takes(&q))
    {
        // no [T, S] probabilities kept for the backward. Where the flash kernels take it, at any
        // size: fewer launches than the composed ops, and the very kernel a forward without a
        // graph runs, so that a batch's log-probs with a graph and without are the same numbers
        // (the reference's DPO margin exactly 0) at every length, not only past a chunk's.
        let chunk = crate::attention::chunk_rows(b, hq, s);
        crate::attention::attention(&q, &k, &v.contiguous()?, bias, scale, chunk)?
    } else {
        let scores = q.matmul(&k.t()?)?.reshape((b, hkv, g, t, s))?; // [B, Hkv, G, T, S]
        let probs = crate::ops::masked_softmax(&scores, bias, scale)? // bias [B, 1, 1, T, S]
            .to_dtype(v.dtype())?
            .reshape((b, hkv, g * t, s))?;
        // [B, Hkv, G·T, D]; a cache view needs no copy
        crate::attention::token_major(&probs.matmul(&v)?, t)?
    };
    Ok((project(&out, w, Target::O, None)?, k_new, v_new))
}

/// Inverse frequencies `[D/2]` computed in f32 as transformers does, with rope scaling.
pub fn inv_freq(c: &ModelConfig) -> Vec<f32> {
    let d = c.head_dim;
    let base = c.rope_theta as f32;
    let raw = (0..d / 2).map(|i| 1.0 / base.powf((2 * i) as f32 / d as f32));
    match c.rope_scaling {
        RopeScaling::Default => raw.collect(),
        RopeScaling::Linear { factor } => raw.map(|f| f / factor).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            let old = original_max_position_embeddings as f32;
            let low_wavelen = old / low_freq_factor;
            let high_wavelen = old / high_freq_factor;
            raw.map(|f| {
                let wavelen = 2.0 * std::f32::consts::PI / f;
                if wavelen > low_wavelen {
                    f / factor
                } else if wavelen < high_wavelen {
                    f
                } else {
                    let smooth =
                        (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                    (1.0 - smooth) * f / factor + smooth * f
                }
            })
            .collect()
        }
    }
}

/// cos and sin `[B, 1, T, D]` for the given positions `[B·T]`, gathered on the host from
/// [`rope_rows`] and uploaded once each in `dtype`: a decode step costs no trigonometry and no
/// device launch.
fn rope_tables(
    c: &ModelConfig,
    positions: &Tensor,
    max_position: u32,
    b: usize,
    t: usize,
    dtype: DType,
) -> Result<(Tensor, Tensor)> {
    let table = rope_rows(c, max_position as usize + 1);
    let d = c.head_dim;
    let device = positions.device();
    if !device.is_cpu() {
        // the device gathers the rows from its copy of the table, sent once per table: no copy
        // of the positions back to the host, no [B·T, D] tables built there, nothing sent per
        // decode step
        let (cos, sin) = table.on(device, dtype)?;
        let gather = |table: &Tensor| -> Result<Tensor> {
            let rows = crate::ops::embedding(table, positions)?; // [B·T, D]
            Ok(rows.reshape((b, 1, t, d))?)
        };
        return Ok((gather(&cos)?, gather(&sin)?));
    }
    let pos = positions.to_vec1::<u32>()?;
    let gather = |values: &[f32]| -> Result<Tensor> {
        let v: Vec<f32> = pos
            .iter()
            .flat_map(|&p| &values[p as usize * d..(p as usize + 1) * d])
            .copied()
            .collect(); // [B·T, D]
        Ok(Tensor::from_vec(v, (b, 1, t, d), &Device::Cpu)?.to_dtype(dtype)?)
    };
    Ok((gather(&table.cos)?, gather(&table.sin)?))
}

/// The rotary table of one model: `cos`, `sin` `[rows, D]` in f32 for positions `0..rows`, and
/// its copies on devices.
struct RopeRows {
    inv_freq: Vec<f32>,
    head_dim: usize,
    rows: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// (device, dtype, cos, sin `[rows, D]`) for each device and dtype it was asked for.
    copies: Mutex<Vec<(Device, DType, Tensor, Tensor)>>,
}

impl RopeRows {
    /// The table on `device` in `dtype`, sent there the first time it is asked for.
    fn on(&self, device: &Device, dtype: DType) -> Result<(Tensor, Tensor)> {
        let mut copies = self.copies.lock().unwrap_or_else(|e| e.into_inner());
        let found = copies
            .iter()
            .find(|(dev, dt, _, _)| dev.same_device(device) && *dt == dtype);
        if let Some((_, _, cos, sin)) = found {
            return Ok((cos.clone(), sin.clone()));
        }
        let shape = (self.rows, self.head_dim);
        let cos = Tensor::from_slice(&self.cos, shape, device)?.to_dtype(dtype)?;
        let sin = Tensor::from_slice(&self.sin, shape, device)?.to_dtype(dtype)?;
        copies.push((device.clone(), dtype, cos.clone(), sin.clone()));
        Ok((cos, sin))
    }
}

/// The rotary table for positions `0..rows` (at least): the last one computed, when it is for
/// this model's frequencies and long enough, else a new one, grown to a power of two so that a
/// decode that adds one position a step recomputes it a logarithmic number of times.
fn rope_rows(c: &ModelConfig, rows: usize) -> Arc<RopeRows> {
    static LAST: Mutex<Option<Arc<RopeRows>>> = Mutex::new(None);
    let freqs = inv_freq(c);
    let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(table) = last.as_ref() {
        if table.inv_freq == freqs && table.head_dim == c.head_dim && table.rows >= rows {
            return table.clone();
        }
    }
    let rows = rows.next_power_of_two();
    let d = c.head_dim;
    let (mut cos, mut sin) = (Vec::with_capacity(rows * d), Vec::with_capacity(rows * d));
    for p in 0..rows {
        // emb = cat(freqs, freqs): both halves of the head share the frequencies.
        for _ in 0..2 {
            for f in &freqs {
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
    }
    let table = Arc::new(RopeRows {
        inv_freq: freqs,
        head_dim: d,
        rows,
        cos,
        sin,
        copies: Mutex::new(Vec::new()),
    });
    *last = Some(table.clone());
    table
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    /// A rotary table goes to a device once per dtype: a second request gets the same tensors,
    /// and the copy holds the host table's rows.
    #[test]
    fn a_rotary_table_is_sent_to_a_device_once_per_dtype() {
        let c = crate::builtin::tiny_config(64, 1);
        let table = super::rope_rows(&c, 10);
        let dev = Device::Cpu;
        let (cos, sin) = table.on(&dev, DType::F32).unwrap();
        assert_eq!(cos.dims(), [table.rows, c.head_dim]);
        let again = table.on(&dev, DType::F32).unwrap();
        assert_eq!((again.0.id(), again.1.id()), (cos.id(), sin.id()));
        let half = table.on(&dev, DType::BF16).unwrap();
        assert_ne!(half.0.id(), cos.id());
        assert_eq!(half.0.dtype(), DType::BF16);
        let d = c.head_dim;
        let row = |t: &Tensor, p: usize| t.get(p).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(row(&cos, 7), table.cos[7 * d..8 * d]);
        assert_eq!(row(&sin, 9), table.sin[9 * d..10 * d]);
    }

    /// The vendored candle's CPU matmul keeps cuBLAS's layout rule (`vendor/README.md`): a
    /// matrix whose rows are strided (a column slice) fails on the CPU as it would on CUDA,
    /// where a plain or transposed one, as `linear` passes, multiplies.
    #[test]
    fn the_cpu_matmul_rejects_the_layouts_cublas_rejects() {
        let dev = Device::Cpu;
        // a [2, 4] of 0..8 and a [3, 2] weight
        let a = Tensor::arange(0f32, 8., &dev)
            .unwrap()
            .reshape((2, 4))
            .unwrap();
        let w = Tensor::new(&[[1f32, 0.], [0., 1.], [1., 1.]], &dev).unwrap();
        let slice = a.narrow(1, 1, 2).unwrap(); // [[1, 2], [5, 6]], row stride 4
        let err = slice.matmul(&w.t().unwrap()).unwrap_err().to_string();
        assert!(err.contains("cuBLAS"), "{err}");
        let err = w.matmul(&slice.t().unwrap()).unwrap_err().to_string();
        assert!(err.contains("cuBLAS"), "{err}");
        // made contiguous, or through linear (which reshapes, copying the slice)
        let want = [[1f32, 2., 3.], [5., 6., 11.]];
        let y = slice.contiguous().unwrap().matmul(&w.t().unwrap()).unwrap();
        assert_eq!(y.to_vec2::<f32>().unwrap(), want);
        let y = super::linear(&slice, &w, None).unwrap();
        assert_eq!(y.to_vec2::<f32>().unwrap(), want);
    }
}
