//! Launch geometry of the CUDA kernels in `kernels/ferrite.cu`: grid, block and dynamic shared
//! memory per kernel family. Plain numbers, built without the `cuda` feature, so that the kernel
//! emulation tests (`tests/kernel_emulation.rs`, which run the kernels' source on the CPU) launch
//! them exactly as [`crate::cuda`] does on the GPU.

use candle_core::DType;

/// One 1-D launch: `grid` blocks of `block` threads with `shared_bytes` of dynamic shared memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub grid: u32,
    pub block: u32,
    pub shared_bytes: u32,
}

/// Row-wise kernels: one block per row of `n`, a multiple of 32 threads, at most 1024.
pub fn rows(rows: usize, n: usize) -> Geometry {
    Geometry {
        grid: rows as u32,
        block: n.div_ceil(32).clamp(1, 32) as u32 * 32,
        shared_bytes: 0,
    }
}

/// Elementwise kernels: grid-stride over `n` items, 256 threads a block, at most 8192 blocks.
pub fn elems(n: usize) -> Geometry {
    Geometry {
        grid: n.div_ceil(256).clamp(1, 8192) as u32,
        block: 256,
        shared_bytes: 0,
    }
}

/// Elements in a chunk of the multi-tensor kernels (AdamW, the gradient norm).
pub const MULTI_TENSOR_CHUNK: usize = 65536;

/// The chunks of tensors of `sizes` elements, `chunk` elements each (a tensor's last one
/// shorter, none for an empty tensor): for each chunk, its tensor and its index in the tensor.
pub fn chunk_table(sizes: &[usize], chunk: usize) -> (Vec<u32>, Vec<u32>) {
    sizes
        .iter()
        .enumerate()
        .flat_map(|(i, &n)| (0..n.div_ceil(chunk)).map(move |k| (i as u32, k as u32)))
        .unzip()
}

/// The multi-tensor kernels: blocks of 512 threads striding over the chunks, at most 2048.
pub fn multi_tensor(chunks: usize) -> Geometry {
    Geometry {
        grid: chunks.clamp(1, 2048) as u32,
        block: 512,
        shared_bytes: 0,
    }
}

/// Dynamic shared memory a block may use without opting in: 48 KiB.
pub const MAX_SHARED_BYTES: usize = 48 * 1024;

/// RMSNorm's backward: grid-stride over `rows` rows of `h` with at most 1024 blocks, each summing
/// its rows' weight gradient in `h` floats of shared memory and writing it as its row of a
/// `[grid, h]` f32 buffer, which the caller sums. None when `h` floats exceed
/// [`MAX_SHARED_BYTES`].
pub fn rms_norm_bwd(rows_: usize, h: usize) -> Option<Geometry> {
    (h * 4 <= MAX_SHARED_BYTES).then(|| Geometry {
        grid: rows_.clamp(1, 1024) as u32,
        block: rows(1, h).block,
        shared_bytes: (h * 4) as u32,
    })
}

/// `column_sum_f32` over `h` columns: a block of 1024 threads per 32 columns.
pub fn column_sum(h: usize) -> Geometry {
    Geometry {
        grid: h.div_ceil(32).max(1) as u32,
        block: 1024,
        shared_bytes: 0,
    }
}

/// The sampler: one block of 1024 threads per row (each scans a contiguous segment of the row).
pub fn sample_rows(rows: usize) -> Geometry {
    Geometry {
        grid: rows as u32,
        block: 1024,
        shared_bytes: 0,
    }
}

/// Query heads per KV head that the decode attention kernel takes (`DECODE_MAX_G` in
/// `ferrite.cu`).
pub const DECODE_MAX_G: usize = 16;
/// Head dimension that the decode attention kernel takes (`DECODE_MAX_D`).
pub const DECODE_MAX_D: usize = 128;
/// Whether the decode attention kernels (and the fused q/k/v + attention launch) take `hq` query
/// heads over `hkv` KV heads of dimension `d`.
pub fn decode_attention_fits(hq: usize, hkv: usize, d: usize) -> bool {
    hkv > 0 && hq.is_multiple_of(hkv) && hq / hkv <= DECODE_MAX_G && d <= DECODE_MAX_D
}

/// Head dimension up to which the decode attention's `_d64` entries serve (`DECODE_SMALL_D`):
/// their per-lane rows are half as long, so they need fewer registers and less shared memory.
pub const DECODE_SMALL_D: usize = 64;

/// The decode attention kernel family for head dimension `d` (≤ [`DECODE_MAX_D`]).
pub fn decode_attention_kernel(d: usize) -> &'static str {
    if d <= DECODE_SMALL_D {
        "decode_attention_d64"
    } else {
        "decode_attention"
    }
}

/// The fused decode q/k/v + attention kernel family for head dimension `d` (≤
/// [`DECODE_MAX_D`]), launched as [`decode_attention`] is.
pub fn decode_qkv_attention_kernel(d: usize) -> &'static str {
    if d <= DECODE_SMALL_D {
        "decode_qkv_attention_d64"
    } else {
        "decode_qkv_attention"
    }
}

/// Warps a decode attention block runs (`DECODE_WARPS`: its shared memory is sized for them).
pub const DECODE_WARPS: usize = 4;

/// Decode attention: one block of [`DECODE_WARPS`] warps per (batch row, KV head).
pub fn decode_attention(batch_kv_heads: usize) -> Geometry {
    Geometry {
        grid: batch_kv_heads as u32,
        block: DECODE_WARPS as u32 * 32,
        shared_bytes: 0,
    }
}

/// Warps a flash attention block runs (`FLASH_WARPS`), each over 16 query rows.
pub const FLASH_WARPS: usize = 4;
/// Query rows a flash attention block takes (`FLASH_ROWS`).
pub const FLASH_ROWS: usize = 16 * FLASH_WARPS;

/// Keys a flash attention block's tile holds (`FLASH_KEYS`).
pub const FLASH_KEYS: usize = 64;

/// The flash kernels' element type in their names: bf16 and f16 (None for any other).
fn flash_elem(dtype: DType) -> Option<&'static str> {
    match dtype {
        DType::BF16 => Some("bf16"),
        DType::F16 => Some("f16"),
        _ => None,
    }
}

/// The flash attention kernel for head dimension `d` and `dtype` (bf16 or f16; its tiles are
/// sized for D = 64 and D = 128), None for any other.
pub fn flash_attention_kernel(d: usize, dtype: DType) -> Option<String> {
    let t = flash_elem(dtype)?;
    matches!(d, 64 | 128).then(|| format!("flash_attention_d{d}_{t}"))
}

/// Flash attention: one block per [`FLASH_ROWS`] query rows of each (batch row, query head).
pub fn flash_attention(batch_heads: usize, t: usize) -> Geometry {
    Geometry {
        grid: (batch_heads * t.div_ceil(FLASH_ROWS)) as u32,
        block: (32 * FLASH_WARPS) as u32,
        shared_bytes: 0,
    }
}

/// The flash attention backward's two kernels (dQ, then dK/dV) for head dimension `d` and
/// `dtype`: D = 64 or 128, bf16 or f16, None for any other.
pub fn flash_attention_backward_kernels(d: usize, dtype: DType) -> Option<(String, String)> {
    let t = flash_elem(dtype)?;
    matches!(d, 64 | 128).then(|| {
        (
            format!("flash_attention_bwd_dq_d{d}_{t}"),
            format!("flash_attention_bwd_dkv_d{d}_{t}"),
        )
    })
}

/// The flash attention kernels over a packed row (forward, dQ, dK/dV; see `_varlen` in
/// `ferrite.cu`) for head dimension `d` and `dtype`: the same geometry as the others.
pub fn flash_attention_varlen_kernels(d: usize, dtype: DType) -> Option<(String, String, String)> {
    let t = flash_elem(dtype)?;
    matches!(d, 64 | 128).then(|| {
        (
            format!("flash_attention_varlen_d{d}_{t}"),
            format!("flash_attention_varlen_bwd_dq_d{d}_{t}"),
            format!("flash_attention_varlen_bwd_dkv_d{d}_{t}"),
        )
    })
}

/// The flash attention backward's dK/dV kernel: one block per [`FLASH_ROWS`] keys (16 a warp)
/// of each (batch row, query head). (Its dQ kernel runs on the forward's grid.)
pub fn flash_attention_dkv(batch_heads: usize, s: usize) -> Geometry {
    Geometry {
        grid: (batch_heads * s.div_ceil(FLASH_ROWS)) as u32,
        ..flash_attention(1, 1)
    }
}

/// Positions one block of the embedding backward sums at most: a token's segment longer than
/// this (a padding token repeated through a padded batch) is split into pieces over several
/// blocks, whose partial sums a second kernel adds in order.
pub const EMBEDDING_PIECE: usize = 64;

/// The embedding backward's work from the segment `starts` (`u + 1` of them, as
/// `ops::token_segments` lays them out), in pieces of at most `piece` positions: per piece
/// `(token index, first position, end, slot)`, with slot `u32::MAX` when the piece is its token's
/// whole segment (the block writes the gradient row itself) and otherwise the row of f32 scratch
/// it writes its partial sum to; per split token `(token index, first slot, pieces)`, for the
/// merge; and the scratch rows needed.
pub fn embedding_pieces(starts: &[u32], piece: usize) -> (Vec<u32>, Vec<u32>, usize) {
    let piece = piece.max(1) as u32;
    let (mut pieces, mut merges, mut slots) = (Vec::new(), Vec::new(), 0u32);
    for (k, w) in starts.windows(2).enumerate() {
        let (first, end) = (w[0], w[1]);
        if end - first <= piece {
            pieces.extend([k as u32, first, end, u32::MAX]);
            continue;
        }
        let count = (end - first).div_ceil(piece);
        merges.extend([k as u32, slots, count]);
        for j in 0..count {
            let a = first + j * piece;
            pieces.extend([k as u32, a, (a + piece).min(end), slots + j]);
        }
        slots += count;
    }
    (pieces, merges, slots as usize)
}

/// The embedding backward's two kernels: a block per piece, or per split token, with threads
/// over the `h` columns.
pub fn embedding_bwd(items: usize, h: usize) -> Geometry {
    rows(items, h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_whole_warps_within_the_limits() {
        assert_eq!(rows(3, 1).block, 32);
        assert_eq!(rows(3, 33).block, 64);
        assert_eq!(rows(3, 151_936).block, 1024);
        assert_eq!(elems(1).grid, 1);
        assert_eq!(elems(257).grid, 2);
        assert_eq!(elems(usize::MAX / 2).grid, 8192);
        assert_eq!(rms_norm_bwd(5000, 896).unwrap().grid, 1024);
        assert_eq!(rms_norm_bwd(5, 896).unwrap().shared_bytes, 3584);
        assert!(rms_norm_bwd(5, 12_289).is_none());
        assert_eq!(multi_tensor(0).grid, 1);
        assert_eq!(multi_tensor(10_000).grid, 2048);
    }

    #[test]
    fn chunks_cover_every_element_once() {
        let (param, index) = chunk_table(&[5, 0, 4, 1], 2);
        assert_eq!(param, [0, 0, 0, 2, 2, 3]);
        assert_eq!(index, [0, 1, 2, 0, 1, 0]);
    }

    #[test]
    fn a_long_segment_is_split_into_pieces_merged_in_order() {
        // token 0: positions 0..2 (whole); token 1: 2..9 (pieces of 3: 2..5, 5..8, 8..9); token
        // 2: 9..12 (whole, exactly one piece)
        let (pieces, merges, slots) = embedding_pieces(&[0, 2, 9, 12], 3);
        let whole = u32::MAX;
        assert_eq!(
            pieces,
            [0, 0, 2, whole, 1, 2, 5, 0, 1, 5, 8, 1, 1, 8, 9, 2, 2, 9, 12, whole]
        );
        assert_eq!((merges, slots), (vec![1, 0, 3], 3));
    }
}
