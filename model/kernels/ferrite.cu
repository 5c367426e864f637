// ferrite's fused CUDA kernels: the GPU side of model/src/ops.rs and model/src/head.rs.
//
// Every kernel has an f32, a bf16 and an f16 entry point (`<name>_f32`, `<name>_bf16`, `<name>_f16`)
// over the same template, but the flash attention kernels, which have bf16 and f16 ones (their
// tensor-core fragments are 16-bit); arithmetic is f32 throughout, bf16 or f16 only at loads and
// stores (and, in the flash kernels, at the tensor cores' inputs). Row-wise kernels run one
// block per row (blockDim a multiple of 32, at most 1024); elementwise kernels one thread per
// element. The CPU kernels in ops.rs are the reference: the formulas below are theirs.
//
// Compiled to PTX at build time by model/build.rs (feature `cuda`) and loaded through candle's
// CudaDevice::get_or_load_custom_func.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

typedef __nv_bfloat16 bf16;
typedef __half f16;
typedef unsigned long long u64;

__device__ __forceinline__ float ld(float x) { return x; }
__device__ __forceinline__ float ld(bf16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float ld(f16 x) { return __half2float(x); }
template <typename T> __device__ __forceinline__ T st(float x);
template <> __device__ __forceinline__ float st<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 st<bf16>(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ f16 st<f16>(float x) { return __float2half(x); }

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Block-wide sum / max; every thread gets the result. The leading barrier lets consecutive calls
// reuse the shared scratch safely.
__device__ float block_sum(float v) {
    __shared__ float scratch[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    return warp_sum(lane < warps ? scratch[lane] : 0.f);
}
__device__ float block_max(float v) {
    __shared__ float scratch[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    return warp_max(lane < warps ? scratch[lane] : -INFINITY);
}

__device__ __forceinline__ float sigmoidf(float x) { return 1.f / (1.f + __expf(-x)); }

// ------------------------------------------------------------------------------- rows
// Row gather and scatter over rows of h, one thread per element (any h, 1 included):
// gather_rows:  y[i] = x[rows[i]], a row of NaN where rows[i] ≥ m (an embedding's bad token id:
//               the loss is then non-finite and the step skipped, where reading past x would fault);
// scatter_rows: y[rows[i]] = x[i] into a zeroed y of m rows (the rows distinct), rows ≥ m skipped.
// The token embedding's backward, embedding_bwd: dw[token] = Σ g[i] over the positions i holding
// that token, summed in f32 in position order and written once; `table` (from the host,
// ops::token_segments) holds the u distinct tokens, their segment starts (u + 1) and the positions
// sorted by token. One block per piece of at most launch::EMBEDDING_PIECE positions of a token's
// segment, threads over h: a token of one piece has its row written by that block; a longer one
// (a padding token repeated through a batch) has its pieces' partial sums written to f32 scratch
// and added in piece order by embedding_merge, so no block walks a long segment alone. dw is
// zeroed beforehand. Deterministic, and no thread walks every id (candle's index_add runs one
// thread per column through all ids).

template <typename T>
__device__ void gather_rows(const T* x, const uint32_t* rows, T* y, int h, int m, size_t n) {
    for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < n; e += (size_t)gridDim.x * blockDim.x) {
        const uint32_t r = rows[e / h];
        y[e] = r < (uint32_t)m ? x[(size_t)r * h + e % h] : st<T>(NAN);
    }
}
extern "C" __global__ void gather_rows_f32(const float* x, const uint32_t* rows, float* y, int h, int m,
                                           size_t n) {
    gather_rows<float>(x, rows, y, h, m, n);
}
extern "C" __global__ void gather_rows_bf16(const bf16* x, const uint32_t* rows, bf16* y, int h, int m,
                                            size_t n) {
    gather_rows<bf16>(x, rows, y, h, m, n);
}
extern "C" __global__ void gather_rows_f16(const f16* x, const uint32_t* rows, f16* y, int h, int m,
                                           size_t n) {
    gather_rows<f16>(x, rows, y, h, m, n);
}

template <typename T>
__device__ void scatter_rows(const T* x, const uint32_t* rows, T* y, int h, int m, size_t n) {
    for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < n; e += (size_t)gridDim.x * blockDim.x) {
        const uint32_t r = rows[e / h];
        if (r < (uint32_t)m) y[(size_t)r * h + e % h] = x[e];
    }
}
extern "C" __global__ void scatter_rows_f32(const float* x, const uint32_t* rows, float* y, int h, int m,
                                            size_t n) {
    scatter_rows<float>(x, rows, y, h, m, n);
}
extern "C" __global__ void scatter_rows_bf16(const bf16* x, const uint32_t* rows, bf16* y, int h, int m,
                                             size_t n) {
    scatter_rows<bf16>(x, rows, y, h, m, n);
}
extern "C" __global__ void scatter_rows_f16(const f16* x, const uint32_t* rows, f16* y, int h, int m,
                                            size_t n) {
    scatter_rows<f16>(x, rows, y, h, m, n);
}

template <typename T>
__device__ void embedding_bwd(const T* g, const uint32_t* table, const uint32_t* pieces, T* dw, float* scratch,
                              int u, int n, int h) {
    const uint32_t *tokens = table, *order = table + 2 * u + 1;
    for (int q = blockIdx.x; q < n; q += gridDim.x) {
        const uint32_t* piece = pieces + 4 * (size_t)q;
        const uint32_t k = piece[0], first = piece[1], end = piece[2], slot = piece[3];
        for (int i = threadIdx.x; i < h; i += blockDim.x) {
            float s = 0.f;
#pragma unroll 4
            for (uint32_t p = first; p < end; ++p) s += ld(g[(size_t)order[p] * h + i]);
            if (slot == 0xffffffffu)
                dw[(size_t)tokens[k] * h + i] = st<T>(s);
            else
                scratch[(size_t)slot * h + i] = s;
        }
    }
}
extern "C" __global__ void embedding_bwd_f32(const float* g, const uint32_t* table, const uint32_t* pieces,
                                             float* dw, float* scratch, int u, int n, int h) {
    embedding_bwd<float>(g, table, pieces, dw, scratch, u, n, h);
}
extern "C" __global__ void embedding_bwd_bf16(const bf16* g, const uint32_t* table, const uint32_t* pieces,
                                              bf16* dw, float* scratch, int u, int n, int h) {
    embedding_bwd<bf16>(g, table, pieces, dw, scratch, u, n, h);
}
extern "C" __global__ void embedding_bwd_f16(const f16* g, const uint32_t* table, const uint32_t* pieces,
                                             f16* dw, float* scratch, int u, int n, int h) {
    embedding_bwd<f16>(g, table, pieces, dw, scratch, u, n, h);
}

// A split token's row: its pieces' partial sums added in piece order; merges (k, first slot, count).
template <typename T>
__device__ void embedding_merge(const uint32_t* table, const uint32_t* merges, const float* scratch, T* dw, int n,
                                int h) {
    for (int q = blockIdx.x; q < n; q += gridDim.x) {
        const uint32_t* merge = merges + 3 * (size_t)q;
        const uint32_t k = merge[0], first = merge[1], count = merge[2];
        for (int i = threadIdx.x; i < h; i += blockDim.x) {
            float s = 0.f;
            for (uint32_t j = 0; j < count; ++j) s += scratch[(size_t)(first + j) * h + i];
            dw[(size_t)table[k] * h + i] = st<T>(s);
        }
    }
}
extern "C" __global__ void embedding_merge_f32(const uint32_t* table, const uint32_t* merges, const float* scratch,
                                               float* dw, int n, int h) {
    embedding_merge<float>(table, merges, scratch, dw, n, h);
}
extern "C" __global__ void embedding_merge_bf16(const uint32_t* table, const uint32_t* merges, const float* scratch,
                                                bf16* dw, int n, int h) {
    embedding_merge<bf16>(table, merges, scratch, dw, n, h);
}
extern "C" __global__ void embedding_merge_f16(const uint32_t* table, const uint32_t* merges, const float* scratch,
                                               f16* dw, int n, int h) {
    embedding_merge<f16>(table, merges, scratch, dw, n, h);
}

// ------------------------------------------------------------------------------- bias add
// y = x + b over rows of `out`, one thread per element, rounded to T once (as candle's add). Its
// backward is the upstream gradient itself for x and, for b, its column sums as one matmul by a
// row of ones (ops::bias_add), where candle sums the token dimension strided.

template <typename T>
__device__ void bias_add(const T* x, const T* b, T* y, int out, size_t n) {
    for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < n; e += (size_t)gridDim.x * blockDim.x)
        y[e] = st<T>(ld(x[e]) + ld(b[e % out]));
}
extern "C" __global__ void bias_add_f32(const float* x, const float* b, float* y, int out, size_t n) {
    bias_add<float>(x, b, y, out, n);
}
extern "C" __global__ void bias_add_bf16(const bf16* x, const bf16* b, bf16* y, int out, size_t n) {
    bias_add<bf16>(x, b, y, out, n);
}
extern "C" __global__ void bias_add_f16(const f16* x, const f16* b, f16* y, int out, size_t n) {
    bias_add<f16>(x, b, y, out, n);
}

// ------------------------------------------------------------------------------- attention bias
// A batch's additive attention bias [B, 1, 1, T, S] (forward.rs's Batch), built on the device from
// which key slots hold a token, valid [B, S] (1 or 0): query row i (at key slot q_offset + i) sees
// slot j when j ≤ q_offset + i and valid[b, j]; 0 where it sees it, `masked` elsewhere. One thread
// per element: the host sends B·S flags instead of the B·T·S floats (32 MB at B=8, T=S=1024).

extern "C" __global__ void attention_bias_f32(const uint32_t* valid, float* bias, int t, int s, int q_offset,
                                              float masked, size_t n) {
    for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < n; e += (size_t)gridDim.x * blockDim.x) {
        const size_t row = e / s, b = row / t;
        const int i = row % t, j = e % s;
        bias[e] = j <= q_offset + i && valid[b * s + j] ? 0.f : masked;
    }
}

// A decode step's bias [B, 1, 1, 1, S]: one query per row, at the last slot S − 1, whose sequence
// fills slots start[b]..S (the slots before it hold padding, or the sequence that had the row
// before): 0 from start[b] on, `masked` before. The host sends B starts, not B·S flags.
extern "C" __global__ void decode_bias_f32(const uint32_t* start, float* bias, int s, float masked, size_t n) {
    for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < n; e += (size_t)gridDim.x * blockDim.x)
        bias[e] = e % s >= start[e / s] ? 0.f : masked;
}

// ------------------------------------------------------------------------------- RMSNorm
// y = x · r · w, r = 1 / sqrt(mean(x²) + eps), per row of h.

template <typename T>
__device__ void rms_norm_fwd(const T* x, const T* w, T* y, int h, float eps) {
    const size_t row = blockIdx.x;
    x += row * h;
    y += row * h;
    float ss = 0.f;
    for (int i = threadIdx.x; i < h; i += blockDim.x) {
        const float v = ld(x[i]);
        ss += v * v;
    }
    const float r = rsqrtf(block_sum(ss) / h + eps);
    for (int i = threadIdx.x; i < h; i += blockDim.x) y[i] = st<T>(ld(x[i]) * r * ld(w[i]));
}
extern "C" __global__ void rms_norm_fwd_f32(const float* x, const float* w, float* y, int h, float eps) {
    rms_norm_fwd<float>(x, w, y, h, eps);
}
extern "C" __global__ void rms_norm_fwd_bf16(const bf16* x, const bf16* w, bf16* y, int h, float eps) {
    rms_norm_fwd<bf16>(x, w, y, h, eps);
}
extern "C" __global__ void rms_norm_fwd_f16(const f16* x, const f16* w, f16* y, int h, float eps) {
    rms_norm_fwd<f16>(x, w, y, h, eps);
}

// The residual add and the RMSNorm after it, in one pass, where no gradient is taken (a decode
// step, a prefill, a no-grad forward): s = x + res, rounded to T as a separate add stores it, and
// y = RMSNorm(s)·w as rms_norm_fwd computes it from the stored s, so both are bit-identical to
// the two launches they replace. One block per row of h.
template <typename T>
__device__ void add_rms_norm(const T* x, const T* res, const T* w, T* sum, T* y, int h, float eps) {
    const size_t row = blockIdx.x;
    x += row * h;
    res += row * h;
    sum += row * h;
    y += row * h;
    float ss = 0.f;
    for (int i = threadIdx.x; i < h; i += blockDim.x) {
        const T s = st<T>(ld(x[i]) + ld(res[i]));
        sum[i] = s;
        const float v = ld(s);
        ss += v * v;
    }
    const float r = rsqrtf(block_sum(ss) / h + eps);
    for (int i = threadIdx.x; i < h; i += blockDim.x) y[i] = st<T>(ld(sum[i]) * r * ld(w[i]));
}
extern "C" __global__ void add_rms_norm_f32(const float* x, const float* res, const float* w, float* sum, float* y,
                                            int h, float eps) {
    add_rms_norm<float>(x, res, w, sum, y, h, eps);
}
extern "C" __global__ void add_rms_norm_bf16(const bf16* x, const bf16* res, const bf16* w, bf16* sum, bf16* y,
                                             int h, float eps) {
    add_rms_norm<bf16>(x, res, w, sum, y, h, eps);
}
extern "C" __global__ void add_rms_norm_f16(const f16* x, const f16* res, const f16* w, f16* sum, f16* y,
                                            int h, float eps) {
    add_rms_norm<f16>(x, res, w, sum, y, h, eps);
}

// dx = r·(w∘g) − r³·x·mean(x∘w∘g) per row; dw = Σ_rows g∘x·r. A grid-stride loop over rows; each
// block sums its rows' dw in shared memory (h floats of dynamic shared memory) and writes it as
// its row of the f32 `dw_blocks` [gridDim.x, h], which the caller sums over the blocks in a fixed
// order: float atomic adds of the blocks' shares into one row (as this kernel had) round in
// whatever order the blocks finish, so two runs of one step could differ in their last bits.
template <typename T>
__device__ void rms_norm_bwd(const T* x, const T* w, const T* g, T* dx, float* dw_blocks, int rows,
                             int h, float eps) {
    extern __shared__ float dw_block[];
    for (int i = threadIdx.x; i < h; i += blockDim.x) dw_block[i] = 0.f;
    for (int row = blockIdx.x; row < rows; row += gridDim.x) {
        const T* xr = x + (size_t)row * h;
        const T* gr = g + (size_t)row * h;
        T* dxr = dx + (size_t)row * h;
        float ss = 0.f, dot = 0.f;
        for (int i = threadIdx.x; i < h; i += blockDim.x) {
            const float xv = ld(xr[i]);
            ss += xv * xv;
            dot += xv * ld(w[i]) * ld(gr[i]);
        }
        ss = block_sum(ss);
        dot = block_sum(dot) / h;
        const float r = rsqrtf(ss / h + eps);
        for (int i = threadIdx.x; i < h; i += blockDim.x) {
            const float xv = ld(xr[i]), gv = ld(gr[i]);
            dxr[i] = st<T>(r * ld(w[i]) * gv - r * r * r * xv * dot);
            dw_block[i] += gv * xv * r;
        }
    }
    // each thread wrote only its own columns of dw_block: no barrier needed before the store
    float* own = dw_blocks + (size_t)blockIdx.x * h;
    for (int i = threadIdx.x; i < h; i += blockDim.x) own[i] = dw_block[i];
}
extern "C" __global__ void rms_norm_bwd_f32(const float* x, const float* w, const float* g, float* dx,
                                            float* dw_blocks, int rows, int h, float eps) {
    rms_norm_bwd<float>(x, w, g, dx, dw_blocks, rows, h, eps);
}
extern "C" __global__ void rms_norm_bwd_bf16(const bf16* x, const bf16* w, const bf16* g, bf16* dx,
                                             float* dw_blocks, int rows, int h, float eps) {
    rms_norm_bwd<bf16>(x, w, g, dx, dw_blocks, rows, h, eps);
}
extern "C" __global__ void rms_norm_bwd_f16(const f16* x, const f16* w, const f16* g, f16* dx,
                                            float* dw_blocks, int rows, int h, float eps) {
    rms_norm_bwd<f16>(x, w, g, dx, dw_blocks, rows, h, eps);
}

// out[c] = Σ_r in[r·h + c] over `rows` rows of f32, in one fixed order: a block of 1024 threads
// takes 32 columns; thread (lane x, warp y) adds rows y, y + 32, … of column x, and lane x of
// warp 0 then adds the 32 partial sums in the order y = 0, 1, …, 31. A warp reads 32 adjacent
// floats of a row (one 128-byte line), where a reduction with a block per column reads a float
// per 32-byte sector. RMSNorm's backward sums its blocks' weight-gradient rows with it.
extern "C" __global__ void column_sum_f32(const float* in, float* out, int rows, int h) {
    __shared__ float part[32 * 32];
    const int x = threadIdx.x % 32, y = threadIdx.x / 32;
    const int c = blockIdx.x * 32 + x;
    float s = 0.f;
    if (c < h)
        for (int r = y; r < rows; r += 32) s += in[(size_t)r * h + c];
    part[y * 32 + x] = s;
    __syncthreads();
    if (y == 0 && c < h) {
        float total = 0.f;
        for (int k = 0; k < 32; ++k) total += part[k * 32 + x];
        out[c] = total;
    }
}

// ------------------------------------------------------------------------------- SwiGLU
// y = silu(a)·b;  da = g·b·s·(1 + a·(1 − s)), db = g·a·s with s = sigmoid(a).
// The backward writes [da; db] into one buffer of 2n.

template <typename T>
__device__ void swiglu_fwd(const T* a, const T* b, T* y, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const float av = ld(a[i]);
        y[i] = st<T>(av * sigmoidf(av) * ld(b[i]));
    }
}
template <typename T>
__device__ void swiglu_bwd(const T* a, const T* b, const T* g, T* dab, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const float av = ld(a[i]), s = sigmoidf(av), gv = ld(g[i]);
        dab[i] = st<T>(gv * ld(b[i]) * s * (1.f + av * (1.f - s)));
        dab[n + i] = st<T>(gv * av * s);
    }
}
extern "C" __global__ void swiglu_fwd_f32(const float* a, const float* b, float* y, size_t n) {
    swiglu_fwd<float>(a, b, y, n);
}
extern "C" __global__ void swiglu_fwd_bf16(const bf16* a, const bf16* b, bf16* y, size_t n) {
    swiglu_fwd<bf16>(a, b, y, n);
}
extern "C" __global__ void swiglu_fwd_f16(const f16* a, const f16* b, f16* y, size_t n) {
    swiglu_fwd<f16>(a, b, y, n);
}
// y [rows, n] = silu(gu[:, :n])·gu[:, n:] of a packed gate/up projection gu [rows, 2n], forward only:
// each element as swiglu_fwd computes it from the two halves.
template <typename T>
__device__ void swiglu_packed_fwd(const T* gu, T* y, int n, size_t count) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < count;
         i += (size_t)gridDim.x * blockDim.x) {
        const T* row = gu + (i / n) * 2 * n;
        const int j = i % n;
        const float av = ld(row[j]);
        y[i] = st<T>(av * sigmoidf(av) * ld(row[n + j]));
    }
}
extern "C" __global__ void swiglu_packed_fwd_f32(const float* gu, float* y, int n, size_t count) {
    swiglu_packed_fwd<float>(gu, y, n, count);
}
extern "C" __global__ void swiglu_packed_fwd_bf16(const bf16* gu, bf16* y, int n, size_t count) {
    swiglu_packed_fwd<bf16>(gu, y, n, count);
}
extern "C" __global__ void swiglu_packed_fwd_f16(const f16* gu, f16* y, int n, size_t count) {
    swiglu_packed_fwd<f16>(gu, y, n, count);
}
extern "C" __global__ void swiglu_bwd_f32(const float* a, const float* b, const float* g, float* dab,
                                          size_t n) {
    swiglu_bwd<float>(a, b, g, dab, n);
}
extern "C" __global__ void swiglu_bwd_bf16(const bf16* a, const bf16* b, const bf16* g, bf16* dab,
                                           size_t n) {
    swiglu_bwd<bf16>(a, b, g, dab, n);
}
extern "C" __global__ void swiglu_bwd_f16(const f16* a, const f16* b, const f16* g, f16* dab,
                                          size_t n) {
    swiglu_bwd<f16>(a, b, g, dab, n);
}

// ------------------------------------------------------------------------------- RoPE
// x, y [B, H, T, D] each at its own strides (elements) of b, h and t, D contiguous: a transposed
// view of a projection's [B, T, H, D] rows is read in place, and the adjoint writes back in that
// order; cos / sin [B, 1, T, D] contiguous. One thread per (row, i < D/2).
// forward:  y_i = a·cos_i − b·sin_i,      y_{i+h} = b·cos_{i+h} + a·sin_{i+h}
// adjoint:  y_i = a·cos_i + b·sin_{i+h},  y_{i+h} = b·cos_{i+h} − a·sin_i
// with (a, b) = (x_i, x_{i+h}) and h = D/2.

template <typename T>
__device__ void rope(const T* x, const T* cos, const T* sin, T* y, int heads, int t, int d,
                     size_t pairs, int transpose, size_t xb, size_t xh, size_t xt, size_t yb,
                     size_t yh, size_t yt) {
    const int half = d / 2;
    for (size_t k = blockIdx.x * (size_t)blockDim.x + threadIdx.x; k < pairs;
         k += (size_t)gridDim.x * blockDim.x) {
        const size_t row = k / half;
        const int i = k % half;
        const size_t b = row / ((size_t)heads * t);
        const size_t head = (row / t) % heads;
        const int ti = row % t;
        const size_t xo = b * xb + head * xh + ti * xt, yo = b * yb + head * yh + ti * yt;
        const size_t co = (b * t + ti) * d;
        const float a = ld(x[xo + i]), bv = ld(x[xo + i + half]);
        float lo, hi;
        if (transpose) {
            lo = a * ld(cos[co + i]) + bv * ld(sin[co + i + half]);
            hi = bv * ld(cos[co + i + half]) - a * ld(sin[co + i]);
        } else {
            lo = a * ld(cos[co + i]) - bv * ld(sin[co + i]);
            hi = bv * ld(cos[co + i + half]) + a * ld(sin[co + i + half]);
        }
        y[yo + i] = st<T>(lo);
        y[yo + i + half] = st<T>(hi);
    }
}
extern "C" __global__ void rope_f32(const float* x, const float* c, const float* s, float* y, int heads,
                                    int t, int d, size_t pairs, int transpose, size_t xb, size_t xh,
                                    size_t xt, size_t yb, size_t yh, size_t yt) {
    rope<float>(x, c, s, y, heads, t, d, pairs, transpose, xb, xh, xt, yb, yh, yt);
}
extern "C" __global__ void rope_bf16(const bf16* x, const bf16* c, const bf16* s, bf16* y, int heads,
                                     int t, int d, size_t pairs, int transpose, size_t xb, size_t xh,
                                     size_t xt, size_t yb, size_t yh, size_t yt) {
    rope<bf16>(x, c, s, y, heads, t, d, pairs, transpose, xb, xh, xt, yb, yh, yt);
}
extern "C" __global__ void rope_f16(const f16* x, const f16* c, const f16* s, f16* y, int heads,
                                    int t, int d, size_t pairs, int transpose, size_t xb, size_t xh,
                                    size_t xt, size_t yb, size_t yh, size_t yt) {
    rope<f16>(x, c, s, y, heads, t, d, pairs, transpose, xb, xh, xt, yb, yh, yt);
}

// ------------------------------------------------------------------------------- decode q/k/v
// One decode step's projections, finished in one pass: the q/k/v biases (when the model has
// them; rounded to T as a separate add would), the rotary embedding of q and k, and the KV
// cache's write of k and v at slot `slot`. q [B, Hq·D], k, v [B, Hkv·D] are the projections'
// outputs, their rows q_row, k_row, v_row elements apart (Hq·D and Hkv·D when each is its own
// matmul's; (Hq + 2·Hkv)·D for all three when they are column slices of one packed matmul's),
// qb [Hq·D], kb, vb [Hkv·D] the biases (read only when has_bias), cos, sin [B, D] the
// step's tables; writes q_out [B, Hq·D] (= [B, Hkv, G, D]) and slot `slot` of the caches
// [B, Hkv, cap, D]. One thread per (row, head, i < D/2) pair, as the rope kernel: its lo/hi
// arithmetic exactly. Replaces three bias adds, two rope launches and two cache copies.

// One (head, i) pair of a decode step's projections: elements i and i + D/2 of the row `src`, its
// bias added (rounded to T as a separate add would) when has_bias, then rotated by the row's cos,
// sin [D] when `rotate` (q and k): f32 (lo, hi), which the caller rounds as it stores them.
template <typename T>
__device__ __forceinline__ void qkv_pair(const T* src, const T* bias, int has_bias, bool rotate,
                                         const T* cos, const T* sin, int i, int half, float& lo, float& hi) {
    float a = ld(src[i]), bv = ld(src[i + half]);
    if (has_bias) {
        a = ld(st<T>(a + ld(bias[i])));
        bv = ld(st<T>(bv + ld(bias[i + half])));
    }
    lo = a;
    hi = bv;
    if (rotate) {
        lo = a * ld(cos[i]) - bv * ld(sin[i]);
        hi = bv * ld(cos[i + half]) + a * ld(sin[i + half]);
    }
}

template <typename T>
__device__ void decode_qkv(const T* q, const T* k, const T* v, int q_row, int k_row, int v_row, const T* qb,
                           const T* kb, const T* vb, int has_bias, const T* cos, const T* sin, T* q_out,
                           T* k_cache, T* v_cache, int hq, int hkv, int d, int cap, int slot, size_t pairs) {
    const int half = d / 2, heads = hq + 2 * hkv;
    for (size_t p = blockIdx.x * (size_t)blockDim.x + threadIdx.x; p < pairs;
         p += (size_t)gridDim.x * blockDim.x) {
        const size_t row = p / half;
        const int i = p % half;
        const size_t b = row / heads;
        const int h = row % heads;
        const T *src, *bias;
        T* dst;
        if (h < hq) {
            src = q + b * q_row + (size_t)h * d;
            bias = qb + (size_t)h * d;
            dst = q_out + (b * hq + h) * d;
        } else if (h < hq + hkv) {
            const int kh = h - hq;
            src = k + b * k_row + (size_t)kh * d;
            bias = kb + (size_t)kh * d;
            dst = k_cache + ((b * hkv + kh) * cap + slot) * d;
        } else {
            const int vh = h - hq - hkv;
            src = v + b * v_row + (size_t)vh * d;
            bias = vb + (size_t)vh * d;
            dst = v_cache + ((b * hkv + vh) * cap + slot) * d;
        }
        float lo, hi;
        qkv_pair(src, bias, has_bias, h < hq + hkv, cos + b * d, sin + b * d, i, half, lo, hi);
        dst[i] = st<T>(lo);
        dst[i + half] = st<T>(hi);
    }
}
extern "C" __global__ void decode_qkv_f32(const float* q, const float* k, const float* v, int q_row, int k_row,
                                          int v_row, const float* qb, const float* kb, const float* vb,
                                          int has_bias, const float* cos, const float* sin, float* q_out,
                                          float* k_cache, float* v_cache, int hq, int hkv, int d, int cap,
                                          int slot, size_t pairs) {
    decode_qkv<float>(q, k, v, q_row, k_row, v_row, qb, kb, vb, has_bias, cos, sin, q_out, k_cache, v_cache, hq,
                      hkv, d, cap, slot, pairs);
}
extern "C" __global__ void decode_qkv_bf16(const bf16* q, const bf16* k, const bf16* v, int q_row, int k_row,
                                           int v_row, const bf16* qb, const bf16* kb, const bf16* vb,
                                           int has_bias, const bf16* cos, const bf16* sin, bf16* q_out,
                                           bf16* k_cache, bf16* v_cache, int hq, int hkv, int d, int cap,
                                           int slot, size_t pairs) {
    decode_qkv<bf16>(q, k, v, q_row, k_row, v_row, qb, kb, vb, has_bias, cos, sin, q_out, k_cache, v_cache, hq,
                     hkv, d, cap, slot, pairs);
}
extern "C" __global__ void decode_qkv_f16(const f16* q, const f16* k, const f16* v, int q_row, int k_row,
                                          int v_row, const f16* qb, const f16* kb, const f16* vb,
                                          int has_bias, const f16* cos, const f16* sin, f16* q_out,
                                          f16* k_cache, f16* v_cache, int hq, int hkv, int d, int cap,
                                          int slot, size_t pairs) {
    decode_qkv<f16>(q, k, v, q_row, k_row, v_row, qb, kb, vb, has_bias, cos, sin, q_out, k_cache, v_cache, hq,
                    hkv, d, cap, slot, pairs);
}

// ------------------------------------------------------------------------------- softmax
// Attention probabilities y = softmax(scale·x + bias), x [B, Hkv, G, T, S] (rows of S) in T,
// bias [B, 1, 1, T, S] f32, `heads` = Hkv·G; y in O: f32 for the autograd op (ops.rs's
// MaskedSoftmax), or the scores' own type for the chunked attention (attention.rs), which needs no
// f32 copy. Three passes over x (max, sum, write) rather than through stored exponentials, so that
// a bf16 y is rounded once.

template <typename T>
__device__ float masked_row_max(const T* xr, const float* br, int s, float scale) {
    float m = -INFINITY;
    for (int j = threadIdx.x; j < s; j += blockDim.x) m = fmaxf(m, scale * ld(xr[j]) + br[j]);
    return block_max(m);
}
template <typename T>
__device__ float masked_row_sum(const T* xr, const float* br, int s, float scale, float m) {
    float sum = 0.f;
    for (int j = threadIdx.x; j < s; j += blockDim.x) sum += __expf(scale * ld(xr[j]) + br[j] - m);
    return block_sum(sum);
}

template <typename T, typename O>
__device__ void masked_softmax_fwd(const T* x, const float* bias, O* y, int heads, int t, int s, float scale) {
    const size_t row = blockIdx.x;
    const size_t bi = row / ((size_t)heads * t);
    const int ti = row % t;
    const T* xr = x + row * s;
    const float* br = bias + (bi * t + ti) * s;
    const float m = masked_row_max(xr, br, s, scale);
    const float inv = 1.f / masked_row_sum(xr, br, s, scale, m);
    for (int j = threadIdx.x; j < s; j += blockDim.x)
        y[row * s + j] = st<O>(__expf(scale * ld(xr[j]) + br[j] - m) * inv);
}
extern "C" __global__ void masked_softmax_fwd_f32(const float* x, const float* bias, float* y, int heads,
                                                  int t, int s, float scale) {
    masked_softmax_fwd<float, float>(x, bias, y, heads, t, s, scale);
}
extern "C" __global__ void masked_softmax_fwd_bf16(const bf16* x, const float* bias, float* y, int heads,
                                                   int t, int s, float scale) {
    masked_softmax_fwd<bf16, float>(x, bias, y, heads, t, s, scale);
}
extern "C" __global__ void masked_softmax_fwd_f16(const f16* x, const float* bias, float* y, int heads,
                                                  int t, int s, float scale) {
    masked_softmax_fwd<f16, float>(x, bias, y, heads, t, s, scale);
}
extern "C" __global__ void masked_softmax_fwd_bf16_bf16(const bf16* x, const float* bias, bf16* y, int heads,
                                                        int t, int s, float scale) {
    masked_softmax_fwd<bf16, bf16>(x, bias, y, heads, t, s, scale);
}
extern "C" __global__ void masked_softmax_fwd_f16_f16(const f16* x, const float* bias, f16* y, int heads,
                                                       int t, int s, float scale) {
    masked_softmax_fwd<f16, f16>(x, bias, y, heads, t, s, scale);
}

// Plain softmax over rows of n, same type in and out.
template <typename T>
__device__ void softmax_fwd(const T* x, T* y, int n) {
    const size_t row = blockIdx.x;
    const T* xr = x + row * n;
    T* yr = y + row * n;
    float m = -INFINITY;
    for (int j = threadIdx.x; j < n; j += blockDim.x) m = fmaxf(m, ld(xr[j]));
    m = block_max(m);
    float sum = 0.f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) sum += __expf(ld(xr[j]) - m);
    const float inv = 1.f / block_sum(sum);
    for (int j = threadIdx.x; j < n; j += blockDim.x) yr[j] = st<T>(__expf(ld(xr[j]) - m) * inv);
}
extern "C" __global__ void softmax_fwd_f32(const float* x, float* y, int n) { softmax_fwd<float>(x, y, n); }
extern "C" __global__ void softmax_fwd_bf16(const bf16* x, bf16* y, int n) { softmax_fwd<bf16>(x, y, n); }
extern "C" __global__ void softmax_fwd_f16(const f16* x, f16* y, int n) { softmax_fwd<f16>(x, y, n); }

// dx = scale · y ∘ (g − Σ y∘g) per row of n; y, g and dx of one type.
template <typename T>
__device__ void softmax_bwd(const T* y, const T* g, T* dx, int n, float scale) {
    const size_t row = blockIdx.x;
    const T* yr = y + row * n;
    const T* gr = g + row * n;
    T* dr = dx + row * n;
    float dot = 0.f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) dot += ld(yr[j]) * ld(gr[j]);
    dot = block_sum(dot);
    for (int j = threadIdx.x; j < n; j += blockDim.x)
        dr[j] = st<T>(scale * ld(yr[j]) * (ld(gr[j]) - dot));
}
extern "C" __global__ void softmax_bwd_f32(const float* y, const float* g, float* dx, int n, float scale) {
    softmax_bwd<float>(y, g, dx, n, scale);
}
extern "C" __global__ void softmax_bwd_bf16(const bf16* y, const bf16* g, bf16* dx, int n, float scale) {
    softmax_bwd<bf16>(y, g, dx, n, scale);
}
extern "C" __global__ void softmax_bwd_f16(const f16* y, const f16* g, f16* dx, int n, float scale) {
    softmax_bwd<f16>(y, g, dx, n, scale);
}

// ------------------------------------------------------------------------------- chunked attention
// The chunked attention's backward at its probabilities, outside autograd, per row of scores x
// (as masked_softmax_fwd): p = softmax(scale·x + bias) recomputed in f32 and
// ds = scale·p∘(dp − Σ p∘dp) from dp = dO·Vᵀ, writing p (for dV = pᵀ·dO) and ds (for dQ = ds·K,
// dK = dsᵀ·Q) in T: one pass instead of an f32 softmax, its cast, dp's cast to f32, the f32
// softmax backward and its cast. (Its forward is masked_softmax_fwd with O = T.)

template <typename T>
__device__ void attention_probs_bwd(const T* x, const float* bias, const T* dp, T* p, T* ds, int heads, int t,
                                    int s, float scale) {
    const size_t row = blockIdx.x;
    const size_t bi = row / ((size_t)heads * t);
    const int ti = row % t;
    const T* xr = x + row * s;
    const T* dr = dp + row * s;
    const float* br = bias + (bi * t + ti) * s;
    const float m = masked_row_max(xr, br, s, scale);
    const float inv = 1.f / masked_row_sum(xr, br, s, scale, m);
    float dot = 0.f;
    for (int j = threadIdx.x; j < s; j += blockDim.x)
        dot += __expf(scale * ld(xr[j]) + br[j] - m) * inv * ld(dr[j]);
    dot = block_sum(dot);
    for (int j = threadIdx.x; j < s; j += blockDim.x) {
        const float pj = __expf(scale * ld(xr[j]) + br[j] - m) * inv;
        p[row * s + j] = st<T>(pj);
        ds[row * s + j] = st<T>(scale * pj * (ld(dr[j]) - dot));
    }
}
extern "C" __global__ void attention_probs_bwd_f32(const float* x, const float* bias, const float* dp, float* p,
                                                   float* ds, int heads, int t, int s, float scale) {
    attention_probs_bwd<float>(x, bias, dp, p, ds, heads, t, s, scale);
}
extern "C" __global__ void attention_probs_bwd_bf16(const bf16* x, const float* bias, const bf16* dp, bf16* p,
                                                    bf16* ds, int heads, int t, int s, float scale) {
    attention_probs_bwd<bf16>(x, bias, dp, p, ds, heads, t, s, scale);
}
extern "C" __global__ void attention_probs_bwd_f16(const f16* x, const float* bias, const f16* dp, f16* p,
                                                   f16* ds, int heads, int t, int s, float scale) {
    attention_probs_bwd<f16>(x, bias, dp, p, ds, heads, t, s, scale);
}

// ------------------------------------------------------------------------------- log-probs
// Per row of logits z [N, V] in T, at temperature 1/inv_t (x = inv_t·z, in f32), in one pass with
// a running max: m = max x, S = Σ e^(x−m), Σ e^(x−m)·x, each thread over its share, then merged
// across the block. out[3r] = log p(target) = x_t − L, out[3r+1] = entropy H = L − Σ p·x,
// out[3r+2] = the log-partition L = m + ln S, which the backward reads instead of a pass of its
// own. The logits are read in the output layer's dtype as its matmul wrote them: no f32 copy, no
// pass for the temperature.

template <typename T>
__device__ void logprob_entropy_fwd(const T* z, const uint32_t* targets, float* out, int v, float inv_t) {
    const size_t row = blockIdx.x;
    const T* zr = z + row * v;
    float m = -INFINITY, s = 0.f, sx = 0.f;
    for (int j = threadIdx.x; j < v; j += blockDim.x) {
        const float x = inv_t * ld(zr[j]);
        if (x > m) {  // a new max: rescale the sums to it (e^(−∞) = 0 at the first element)
            const float r = __expf(m - x);
            s = s * r + 1.f;
            sx = sx * r + x;
            m = x;
        } else {
            const float e = __expf(x - m);
            s += e;
            sx += e * x;
        }
    }
    const float mb = block_max(m);
    const float r = m == -INFINITY ? 0.f : __expf(m - mb);  // 0 for a thread with no element
    s = block_sum(s * r);
    sx = block_sum(sx * r);
    if (threadIdx.x == 0) {
        const float l = mb + logf(s);
        out[3 * row] = inv_t * ld(zr[targets[row]]) - l;
        out[3 * row + 1] = l - sx / s;
        out[3 * row + 2] = l;
    }
}
extern "C" __global__ void logprob_entropy_fwd_f32(const float* z, const uint32_t* targets, float* out, int v,
                                                   float inv_t) {
    logprob_entropy_fwd<float>(z, targets, out, v, inv_t);
}
extern "C" __global__ void logprob_entropy_fwd_bf16(const bf16* z, const uint32_t* targets, float* out, int v,
                                                    float inv_t) {
    logprob_entropy_fwd<bf16>(z, targets, out, v, inv_t);
}
extern "C" __global__ void logprob_entropy_fwd_f16(const f16* z, const uint32_t* targets, float* out, int v,
                                                   float inv_t) {
    logprob_entropy_fwd<f16>(z, targets, out, v, inv_t);
}

// dz_j = inv_t·(−g_lp·p_j − g_h·p_j·(log p_j + H) + 1[j = t]·g_lp) with log p_j = x_j − L, from
// y = (log p_t, H, L) and g [N, 3] (its third column unused): one pass over the logits. dz is
// written in T (the dtype of the output layer's matmuls that take it), possibly into rows of a
// weight-gradient group's buffer.
template <typename T>
__device__ void logprob_entropy_bwd(const T* z, const uint32_t* targets, const float* y, const float* g, T* dz,
                                    int v, float inv_t) {
    const size_t row = blockIdx.x;
    const T* zr = z + row * v;
    T* dr = dz + row * v;
    const float g_lp = g[3 * row], g_h = g[3 * row + 1], h = y[3 * row + 1], l = y[3 * row + 2];
    const uint32_t t = targets[row];
    for (int j = threadIdx.x; j < v; j += blockDim.x) {
        const float lp = inv_t * ld(zr[j]) - l, p = __expf(lp);
        dr[j] = st<T>(inv_t * (-g_lp * p - g_h * p * (lp + h) + (j == (int)t ? g_lp : 0.f)));
    }
}
extern "C" __global__ void logprob_entropy_bwd_f32(const float* z, const uint32_t* targets, const float* y,
                                                   const float* g, float* dz, int v, float inv_t) {
    logprob_entropy_bwd<float>(z, targets, y, g, dz, v, inv_t);
}
extern "C" __global__ void logprob_entropy_bwd_bf16(const bf16* z, const uint32_t* targets, const float* y,
                                                    const float* g, bf16* dz, int v, float inv_t) {
    logprob_entropy_bwd<bf16>(z, targets, y, g, dz, v, inv_t);
}
extern "C" __global__ void logprob_entropy_bwd_f16(const f16* z, const uint32_t* targets, const float* y,
                                                   const float* g, f16* dz, int v, float inv_t) {
    logprob_entropy_bwd<f16>(z, targets, y, g, dz, v, inv_t);
}

// ------------------------------------------------------------------------------- sampling
// One row of logits z [V] per block, in T (f32, or bf16 as the output layer's matmul wrote them:
// no f32 copy of a decode step's [B, V] logits): the next token, its log-prob under the
// distribution it was drawn from, and the entropy of softmax(z / t) — what crate::sampling::draw
// computes on the host from the same (f32-widened) logits. `inv_t` = 1/temperature, or 0 for greedy (first argmax, log-prob and entropy at t = 1).
// `top_k` (0: off) and `top_p` (≥ 1: off) truncate, as transformers does: top-k, then top-p over
// the renormalised rest. `u` [B] are the rows' uniforms in [0, 1), drawn on the host from each
// row's own stream; the token is the first kept j with u·Σ_kept e < Σ_{kept i≤j} e_i,
// e_i = exp((z_i − max)/t). Thread k scans the contiguous segment [k·seg, (k+1)·seg).

// An order-preserving key of a float: a < b ⇔ order_key(a) < order_key(b) (NaN aside).
__device__ __forceinline__ uint32_t order_key(float x) {
    const uint32_t b = __float_as_uint(x);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// A weight e ∈ [0, 1] in fixed point, 2^-40 units: a row's sum (< 2^23 weights) is exact, so
// top-p's histograms do not depend on the order of their atomic adds.
__device__ __forceinline__ u64 fixed_weight(float e) { return (u64)(e * 1099511627776.f); }

// The smallest key that top-k (`top_k` in 1..v) and then top-p (`top_p` < 1) keep in the row
// `zr`, whose weights are e = exp((z − m)·it): the kept tokens are those with order_key(z) at
// least the result, as crate::sampling::kept_floor defines them. A radix select from the top
// byte of the key down, one pass over the row per byte, with shared histograms of counts and of
// fixed-point weights; thread 0 picks each byte. Top-k's stage finds the k-th largest key and the
// weight kept at or above it; top-p's finds the largest key at or above which the weight reaches
// top_p times that. Every thread returns the same key.
template <typename T>
__device__ uint32_t kept_floor(const T* zr, int v, float m, float it, int top_k, float top_p) {
    __shared__ unsigned int hist_count[256];
    __shared__ u64 hist_weight[256];
    __shared__ uint32_t picked;
    const bool by_k = top_k > 0 && top_k < v, by_p = top_p < 1.f;
    uint32_t floor = 0;
    u64 kept = 0;  // thread 0: the weight at or above `floor` (0: not yet summed)
    for (int stage = by_k ? 0 : 1; stage < (by_p ? 2 : 1); ++stage) {
        uint32_t prefix = 0, mask = 0;
        unsigned int above_count = 0;  // thread 0: tokens above the prefix's range
        u64 above_weight = 0;          // thread 0: and their weight
        double target = 0.0;           // thread 0: top-p's weight to reach
        for (int shift = 24; shift >= 0; shift -= 8) {
            for (int d = threadIdx.x; d < 256; d += blockDim.x) {
                hist_count[d] = 0;
                hist_weight[d] = 0;
            }
            __syncthreads();
            for (int j = threadIdx.x; j < v; j += blockDim.x) {
                const uint32_t key = order_key(ld(zr[j]));
                if ((key & mask) != prefix) continue;
                const int d = (key >> shift) & 255;
                atomicAdd(&hist_count[d], 1u);
                if (by_p) atomicAdd(&hist_weight[d], fixed_weight(__expf((ld(zr[j]) - m) * it)));
            }
            __syncthreads();
            if (threadIdx.x == 0) {
                int d = 255;
                if (stage == 0) {
                    for (; d > 0 && above_count + hist_count[d] < (unsigned)top_k; --d) {
                        above_count += hist_count[d];
                        above_weight += hist_weight[d];
                    }
                    if (shift == 0) kept = above_weight + hist_weight[d];
                } else {
                    if (shift == 24) {
                        if (kept == 0)
                            for (int i = 0; i < 256; ++i) kept += hist_weight[i];
                        target = (double)top_p * (double)kept;
                    }
                    for (; d > 0 && (hist_count[d] == 0 || (double)(above_weight + hist_weight[d]) < target);
                         --d)
                        above_weight += hist_weight[d];
                }
                picked = prefix | ((uint32_t)d << shift);
            }
            __syncthreads();
            prefix = picked;
            mask |= 0xffu << shift;
        }
        floor = prefix;
    }
    return floor;
}

template <typename T>
__device__ void sample_rows(const T* z, const float* u, float inv_t, int top_k, float top_p, uint32_t* ids,
                            float* logprobs, float* entropies, int v) {
    __shared__ float seg_sum[1024];
    __shared__ int chosen;
    const size_t row = blockIdx.x;
    const T* zr = z + row * v;
    const bool greedy = inv_t <= 0.f;
    const float it = greedy ? 1.f : inv_t;
    float m = -INFINITY;
    for (int j = threadIdx.x; j < v; j += blockDim.x) m = fmaxf(m, ld(zr[j]));
    m = block_max(m);
    const int seg = (v + blockDim.x - 1) / blockDim.x;
    const int lo = min(v, (int)threadIdx.x * seg), hi = min(v, lo + seg);
    float s = 0.f, es = 0.f;
    int best = lo;
    for (int j = lo; j < hi; ++j) {
        const float x = (ld(zr[j]) - m) * it, e = __expf(x);
        s += e;
        es += e * x;
        if (ld(zr[j]) > ld(zr[best])) best = j;
    }
    const float total = block_sum(s);
    const float total_es = block_sum(es);
    // truncation: keep the keys at or above `floor` (0 keeps every token)
    const bool truncate = !greedy && ((top_k > 0 && top_k < v) || top_p < 1.f);
    const uint32_t floor = truncate ? kept_floor(zr, v, m, it, top_k, top_p) : 0u;
    if (truncate) {
        s = 0.f;
        for (int j = lo; j < hi; ++j)
            if (order_key(ld(zr[j])) >= floor) s += __expf((ld(zr[j]) - m) * it);
    }
    seg_sum[threadIdx.x] = s;
    const float kept_total = truncate ? block_sum(s) : total;
    if (threadIdx.x == 0) chosen = v - 1;
    __syncthreads();
    if (greedy) {
        // first maximum: the lowest index among the segments' maxima that equal the row max
        if (lo < hi && ld(zr[best]) == m) atomicMin(&chosen, best);
    } else if (threadIdx.x == 0) {
        // exclusive scan of the segment sums by one thread (≤ 1024 adds), then find the segment;
        // past the end (rounding), the last kept token
        float t = u[row] * kept_total, acc = 0.f;
        int k = 0, last = -1;
        for (; k < (int)blockDim.x; ++k) {
            if (seg_sum[k] > 0.f) last = k;
            if (t < acc + seg_sum[k]) break;
            acc += seg_sum[k];
        }
        if (k < (int)blockDim.x) {
            t -= acc;
        } else {
            k = last;
            t = INFINITY;
        }
        int pick = v - 1;
        if (k >= 0) {
            const int a = min(v, k * seg), b = min(v, a + seg);
            for (int j = a; j < b; ++j) {
                if (order_key(ld(zr[j])) < floor) continue;
                const float e = __expf((ld(zr[j]) - m) * it);
                pick = j;
                if (t < e) break;
                t -= e;
            }
        }
        chosen = pick;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        const int j = chosen;
        ids[row] = (uint32_t)j;
        logprobs[row] = (ld(zr[j]) - m) * it - logf(kept_total);
        entropies[row] = logf(total) - total_es / total;
    }
}
extern "C" __global__ void sample_rows_f32(const float* z, const float* u, float inv_t, int top_k, float top_p,
                                           uint32_t* ids, float* logprobs, float* entropies, int v) {
    sample_rows<float>(z, u, inv_t, top_k, top_p, ids, logprobs, entropies, v);
}
extern "C" __global__ void sample_rows_bf16(const bf16* z, const float* u, float inv_t, int top_k, float top_p,
                                            uint32_t* ids, float* logprobs, float* entropies, int v) {
    sample_rows<bf16>(z, u, inv_t, top_k, top_p, ids, logprobs, entropies, v);
}
extern "C" __global__ void sample_rows_f16(const f16* z, const float* u, float inv_t, int top_k, float top_p,
                                           uint32_t* ids, float* logprobs, float* entropies, int v) {
    sample_rows<f16>(z, u, inv_t, top_k, top_p, ids, logprobs, entropies, v);
}

// ------------------------------------------------------------------------------- decode attention
// One decode step of grouped-query attention (one new token) over a KV cache, one block per
// (batch row b, KV head kv), for the G query heads that share the KV head:
//   y[g] = Σ_j p_j v_j,  p = softmax_j(scale·q[g]·k_j + bias[b, j]),  j < S
// q, y [B, Hkv, G, D]; key j of (b, kv) at k + (b·Hkv + kv)·kv_stride + j·D (the cache's buffers,
// read in place; likewise v); bias [B, S] f32. Warp w runs an online softmax over keys w, w + W, …
// with lane l keeping the output's elements d = l, l + 32, …; the warps' (max, sum, output) merge
// through shared memory. Probabilities stay f32. G ≤ DECODE_MAX_G, D ≤ MAX_D, W warps ≤
// DECODE_WARPS (the launcher checks). Each lane's query and output rows are sized for MAX_D: the
// `_d64` entries (MAX_D = DECODE_SMALL_D) serve D ≤ 64 (Qwen2.5-0.5B, Llama 3.2 1B) with half the
// registers and shared memory of the D ≤ DECODE_MAX_D ones.

#define DECODE_MAX_G 16
#define DECODE_MAX_D 128
#define DECODE_SMALL_D 64
#define DECODE_WARPS 4

// One block's attention: its G query rows qb [G, D] (a pointer to global T, or the fused kernel's
// shared f32 array), its KV head's keys kb and values vb [S, D], its batch row's bias br [S], its
// output yb [G, D].
template <typename T, int MAX_D, typename Q>
__device__ void decode_attend(Q&& qb, const T* kb, const T* vb, const float* br, T* yb, int g_heads, int s,
                              int d, float scale) {
    __shared__ float part_m[DECODE_WARPS * DECODE_MAX_G];
    __shared__ float part_l[DECODE_WARPS * DECODE_MAX_G];
    __shared__ float part_o[DECODE_WARPS * DECODE_MAX_G * MAX_D];
    constexpr int DL = MAX_D / 32;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    float qr[DECODE_MAX_G][DL], o[DECODE_MAX_G][DL], m[DECODE_MAX_G], l[DECODE_MAX_G];
#pragma unroll
    for (int g = 0; g < DECODE_MAX_G; ++g) {
        m[g] = -INFINITY;
        l[g] = 0.f;
#pragma unroll
        for (int i = 0; i < DL; ++i) {
            const int e = lane + 32 * i;
            qr[g][i] = g < g_heads && e < d ? ld(qb[g * d + e]) : 0.f;
            o[g][i] = 0.f;
        }
    }
    for (int j = warp; j < s; j += warps) {
        float kr[DL], vr[DL];
#pragma unroll
        for (int i = 0; i < DL; ++i) {
            const int e = lane + 32 * i;
            kr[i] = e < d ? ld(kb[(size_t)j * d + e]) : 0.f;
            vr[i] = e < d ? ld(vb[(size_t)j * d + e]) : 0.f;
        }
        const float bj = br[j];
#pragma unroll
        for (int g = 0; g < DECODE_MAX_G; ++g) {
            if (g >= g_heads) break;
            float dot = 0.f;
#pragma unroll
            for (int i = 0; i < DL; ++i) dot += qr[g][i] * kr[i];
            const float score = scale * warp_sum(dot) + bj;
            const float mn = fmaxf(m[g], score);
            const float alpha = __expf(m[g] - mn), p = __expf(score - mn);
            l[g] = l[g] * alpha + p;
#pragma unroll
            for (int i = 0; i < DL; ++i) o[g][i] = o[g][i] * alpha + p * vr[i];
            m[g] = mn;
        }
    }
#pragma unroll
    for (int g = 0; g < DECODE_MAX_G; ++g) {
        if (g >= g_heads) break;
        const int slot = warp * DECODE_MAX_G + g;
        if (lane == 0) {
            part_m[slot] = m[g];
            part_l[slot] = l[g];
        }
#pragma unroll
        for (int i = 0; i < DL; ++i) {
            const int e = lane + 32 * i;
            if (e < d) part_o[slot * MAX_D + e] = o[g][i];
        }
    }
    __syncthreads();
    for (int e = threadIdx.x; e < g_heads * d; e += blockDim.x) {
        const int g = e / d, dd = e % d;
        float mx = -INFINITY;
        for (int w = 0; w < warps; ++w) mx = fmaxf(mx, part_m[w * DECODE_MAX_G + g]);
        float sum = 0.f, out = 0.f;
        for (int w = 0; w < warps; ++w) {
            const int slot = w * DECODE_MAX_G + g;
            const float c = __expf(part_m[slot] - mx);
            sum += part_l[slot] * c;
            out += part_o[slot * MAX_D + dd] * c;
        }
        yb[e] = st<T>(out / sum);
    }
}
template <typename T, int MAX_D>
__device__ void decode_attention(const T* q, const T* k, const T* v, const float* bias, T* y, int hkv,
                                 int g_heads, int s, int d, size_t kv_stride, float scale) {
    const size_t bk = blockIdx.x, b = bk / hkv;
    decode_attend<T, MAX_D>(q + bk * g_heads * d, k + bk * kv_stride, v + bk * kv_stride, bias + b * s,
                            y + bk * g_heads * d, g_heads, s, d, scale);
}
extern "C" __global__ void decode_attention_f32(const float* q, const float* k, const float* v,
                                                const float* bias, float* y, int hkv, int g_heads, int s,
                                                int d, size_t kv_stride, float scale) {
    decode_attention<float, DECODE_MAX_D>(q, k, v, bias, y, hkv, g_heads, s, d, kv_stride, scale);
}
extern "C" __global__ void decode_attention_bf16(const bf16* q, const bf16* k, const bf16* v,
                                                 const float* bias, bf16* y, int hkv, int g_heads, int s,
                                                 int d, size_t kv_stride, float scale) {
    decode_attention<bf16, DECODE_MAX_D>(q, k, v, bias, y, hkv, g_heads, s, d, kv_stride, scale);
}
extern "C" __global__ void decode_attention_f16(const f16* q, const f16* k, const f16* v,
                                                const float* bias, f16* y, int hkv, int g_heads, int s,
                                                int d, size_t kv_stride, float scale) {
    decode_attention<f16, DECODE_MAX_D>(q, k, v, bias, y, hkv, g_heads, s, d, kv_stride, scale);
}
extern "C" __global__ void decode_attention_d64_f32(const float* q, const float* k, const float* v,
                                                    const float* bias, float* y, int hkv, int g_heads,
                                                    int s, int d, size_t kv_stride, float scale) {
    decode_attention<float, DECODE_SMALL_D>(q, k, v, bias, y, hkv, g_heads, s, d, kv_stride, scale);
}
extern "C" __global__ void decode_attention_d64_bf16(const bf16* q, const bf16* k, const bf16* v,
                                                     const float* bias, bf16* y, int hkv, int g_heads,
                                                     int s, int d, size_t kv_stride, float scale) {
    decode_attention<bf16, DECODE_SMALL_D>(q, k, v, bias, y, hkv, g_heads, s, d, kv_stride, scale);
}
extern "C" __global__ void decode_attention_d64_f16(const f16* q, const f16* k, const f16* v,
                                                    const float* bias, f16* y, int hkv, int g_heads,
                                                    int s, int d, size_t kv_stride, float scale) {
    decode_attention<f16, DECODE_SMALL_D>(q, k, v, bias, y, hkv, g_heads, s, d, kv_stride, scale);
}

// A decode step's q/k/v epilogue and its attention in one launch: decode_qkv's work for the block's
// (batch row b, KV head kv) — its G query heads h = kv·G + j, its key and value head — then
// decode_attention over the cache's slots 0 … slot. The rotated queries stay in shared memory,
// rounded to T as decode_qkv stores them; the key and value go to the cache's slot, which the
// block's own threads read back after the barrier. Arguments as decode_qkv's (the caches
// [B, Hkv, cap, D]) and decode_attention's (bias [B, slot + 1] f32, y [B, Hkv, G, D]); the same
// values as those two launches, bit for bit. One block per (b, kv), DECODE_WARPS warps.

//
// With has_norm (Qwen3), each query and key head is RMS-normed over its D before the rotation,
// by the weights qn, kn [D], as the RMSNorm kernel would do it (x·r·w rounded to T, r from the
// head's biased values rounded to T): the heads are first kept unrotated (q in q_rot, k in k_raw),
// a warp sums each head's squares, and the pairs are then normed and rotated in place. The sum's
// order is not the RMSNorm kernel's, so r may differ in its last bit from the unfused path's.

// One (head, i) pair (x_lo, x_hi: elements i and i + D/2) normed by r·w and rounded to T as the
// RMSNorm kernel stores it, then rotated by the row's cos, sin [D]: f32 (lo, hi), which the
// caller rounds as it stores them.
template <typename T>
__device__ __forceinline__ void normed_pair(float x_lo, float x_hi, const T* w, float r, const T* cos,
                                            const T* sin, int i, int half, float& lo, float& hi) {
    const float a = ld(st<T>(x_lo * r * ld(w[i])));
    const float bv = ld(st<T>(x_hi * r * ld(w[i + half])));
    lo = a * ld(cos[i]) - bv * ld(sin[i]);
    hi = bv * ld(cos[i + half]) + a * ld(sin[i + half]);
}

template <typename T, int MAX_D>
__device__ void decode_qkv_attention(const T* q, const T* k, const T* v, int q_row, int k_row, int v_row,
                                     const T* qb, const T* kb, const T* vb, int has_bias, const T* qn,
                                     const T* kn, int has_norm, float eps, const T* cos, const T* sin,
                                     T* k_cache, T* v_cache, const float* bias, T* y, int hkv, int g_heads,
                                     int d, int cap, int slot, float scale) {
    __shared__ float q_rot[DECODE_MAX_G * MAX_D];
    __shared__ float k_raw[MAX_D];
    __shared__ float inv_rms[DECODE_MAX_G + 1];
    const size_t bk = blockIdx.x, b = bk / hkv;
    const int kv = bk % hkv, half = d / 2;
    const T *cs = cos + b * d, *sn = sin + b * d;
    T* k_rows = k_cache + bk * cap * d;
    T* v_rows = v_cache + bk * cap * d;
    // the heads biased and rounded to T: the queries into shared memory, the key and the value
    // to the cache's slot; with the norms the query and key heads stay unrotated (the key in
    // k_raw) until normed below
    const bool rotate = !has_norm;
    for (int p = threadIdx.x; p < (g_heads + 2) * half; p += blockDim.x) {
        const int j = p / half, i = p % half;
        float lo, hi;
        if (j < g_heads) {
            const size_t h = (size_t)kv * g_heads + j;
            qkv_pair(q + b * q_row + h * d, qb + h * d, has_bias, rotate, cs, sn, i, half, lo, hi);
            q_rot[j * d + i] = ld(st<T>(lo));
            q_rot[j * d + i + half] = ld(st<T>(hi));
        } else {
            const bool is_k = j == g_heads;
            const T* src = is_k ? k + b * k_row + (size_t)kv * d : v + b * v_row + (size_t)kv * d;
            qkv_pair(src, (is_k ? kb : vb) + (size_t)kv * d, has_bias, is_k && rotate, cs, sn, i, half, lo, hi);
            if (is_k && has_norm) {
                k_raw[i] = ld(st<T>(lo));
                k_raw[i + half] = ld(st<T>(hi));
            } else {
                T* dst = (is_k ? k_rows : v_rows) + (size_t)slot * d;
                dst[i] = st<T>(lo);
                dst[i + half] = st<T>(hi);
            }
        }
    }
    if (has_norm) {
        __syncthreads();
        // r = 1/√(mean of squares + eps) of each query head and the key head, a warp a head
        const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
        for (int j = warp; j <= g_heads; j += warps) {
            float ss = 0.f;
            for (int i = lane; i < d; i += 32) {
                const float x = j < g_heads ? q_rot[j * d + i] : k_raw[i];
                ss += x * x;
            }
            ss = warp_sum(ss);
            if (lane == 0) inv_rms[j] = rsqrtf(ss / d + eps);
        }
        __syncthreads();
        // normed, rotated: the queries in place, the key to its slot
        for (int p = threadIdx.x; p < (g_heads + 1) * half; p += blockDim.x) {
            const int j = p / half, i = p % half;
            float lo, hi;
            if (j < g_heads) {
                normed_pair<T>(q_rot[j * d + i], q_rot[j * d + i + half], qn, inv_rms[j], cs, sn, i, half, lo, hi);
                q_rot[j * d + i] = ld(st<T>(lo));
                q_rot[j * d + i + half] = ld(st<T>(hi));
            } else {
                normed_pair<T>(k_raw[i], k_raw[i + half], kn, inv_rms[j], cs, sn, i, half, lo, hi);
                T* dst = k_rows + (size_t)slot * d;
                dst[i] = st<T>(lo);
                dst[i + half] = st<T>(hi);
            }
        }
    }
    __syncthreads();
    const int s = slot + 1;
    decode_attend<T, MAX_D>(q_rot, k_rows, v_rows, bias + b * s, y + bk * g_heads * d, g_heads, s, d, scale);
}
extern "C" __global__ void decode_qkv_attention_f32(const float* q, const float* k, const float* v, int q_row,
        int k_row, int v_row, const float* qb, const float* kb, const float* vb, int has_bias, const float* qn,
        const float* kn, int has_norm, float eps, const float* cos,
        const float* sin, float* k_cache, float* v_cache, const float* bias, float* y, int hkv, int g_heads, int d,
        int cap, int slot, float scale) {
    decode_qkv_attention<float, DECODE_MAX_D>(q, k, v, q_row, k_row, v_row, qb, kb, vb, has_bias, qn, kn, has_norm, eps, cos, sin, k_cache,
                                      v_cache, bias, y, hkv, g_heads, d, cap, slot, scale);
}
extern "C" __global__ void decode_qkv_attention_bf16(const bf16* q, const bf16* k, const bf16* v, int q_row,
        int k_row, int v_row, const bf16* qb, const bf16* kb, const bf16* vb, int has_bias, const bf16* qn,
        const bf16* kn, int has_norm, float eps, const bf16* cos,
        const bf16* sin, bf16* k_cache, bf16* v_cache, const float* bias, bf16* y, int hkv, int g_heads, int d,
        int cap, int slot, float scale) {
    decode_qkv_attention<bf16, DECODE_MAX_D>(q, k, v, q_row, k_row, v_row, qb, kb, vb, has_bias, qn, kn, has_norm, eps, cos, sin, k_cache,
                                      v_cache, bias, y, hkv, g_heads, d, cap, slot, scale);
}
extern "C" __global__ void decode_qkv_attention_f16(const f16* q, const f16* k, const f16* v, int q_row,
       int k_row, int v_row, const f16* qb, const f16* kb, const f16* vb, int has_bias, const f16* qn,
        const f16* kn, int has_norm, float eps, const f16* cos,
       const f16* sin, f16* k_cache, f16* v_cache, const float* bias, f16* y, int hkv, int g_heads, int d,
       int cap, int slot, float scale) {
    decode_qkv_attention<f16, DECODE_MAX_D>(q, k, v, q_row, k_row, v_row, qb, kb, vb, has_bias, qn, kn, has_norm, eps, cos, sin, k_cache,
                                     v_cache, bias, y, hkv, g_heads, d, cap, slot, scale);
}
extern "C" __global__ void decode_qkv_attention_d64_f32(const float* q, const float* k, const float* v, int q_row,
        int k_row, int v_row, const float* qb, const float* kb, const float* vb, int has_bias, const float* qn,
        const float* kn, int has_norm, float eps, const float* cos,
        const float* sin, float* k_cache, float* v_cache, const float* bias, float* y, int hkv, int g_heads, int d,
        int cap, int slot, float scale) {
    decode_qkv_attention<float, DECODE_SMALL_D>(q, k, v, q_row, k_row, v_row, qb, kb, vb, has_bias, qn, kn, has_norm, eps, cos, sin, k_cache,
                                      v_cache, bias, y, hkv, g_heads, d, cap, slot, scale);
}
extern "C" __global__ void decode_qkv_attention_d64_bf16(const bf16* q, const bf16* k, const bf16* v, int q_row,
        int k_row, int v_row, const bf16* qb, const bf16* kb, const bf16* vb, int has_bias, const bf16* qn,
        const bf16* kn, int has_norm, float eps, const bf16* cos,
        const bf16* sin, bf16* k_cache, bf16* v_cache, const float* bias, bf16* y, int hkv, int g_heads, int d,
        int cap, int slot, float scale) {
    decode_qkv_attention<bf16, DECODE_SMALL_D>(q, k, v, q_row, k_row, v_row, qb, kb, vb, has_bias, qn, kn, has_norm, eps, cos, sin, k_cache,
                                      v_cache, bias, y, hkv, g_heads, d, cap, slot, scale);
}
extern "C" __global__ void decode_qkv_attention_d64_f16(const f16* q, const f16* k, const f16* v, int q_row,
       int k_row, int v_row, const f16* qb, const f16* kb, const f16* vb, int has_bias, const f16* qn,
        const f16* kn, int has_norm, float eps, const f16* cos,
       const f16* sin, f16* k_cache, f16* v_cache, const float* bias, f16* y, int hkv, int g_heads, int d,
       int cap, int slot, float scale) {
    decode_qkv_attention<f16, DECODE_SMALL_D>(q, k, v, q_row, k_row, v_row, qb, kb, vb, has_bias, qn, kn, has_norm, eps, cos, sin, k_cache,
                                     v_cache, bias, y, hkv, g_heads, d, cap, slot, scale);
}

// ------------------------------------------------------------------------------- flash attention
// softmax(scale·q·kᵀ + bias)·v over a batch of query rows (the learner's forward, a prompt's
// prefill) and its backward, FlashAttention-2 style: no score leaves the chip. Every product runs
// on the tensor cores (mma.sync m16n8k16, bf16 in, f32 accumulate), each warp over 16 rows of its
// left operand; a product's right operand comes from a tile in shared memory (row-major, D/2
// pairs a row) through ldmatrix (transposed where the product takes the tile itself), its left
// one from registers: loaded once from global memory, or a probability
// or score tile rounded to bf16 straight from the accumulators (two m16n8 accumulators are one
// m16k16 A fragment). bf16 only.
//
// q, dq [B, Hkv, G·T, D] (query head h = kv·G + j at rows j·T.., so head (b, h)'s rows start at
// (b·Hq + h)·T·D); y, dy token-major [B, T, Hq·D], as the output projection takes them (head (b, h)'s
// row i at (b·T + i)·Hq·D + h·D: no transpose either way); key j of (b, kv) at k + (b·Hkv + kv)·kv_stride + j·D (a KV cache's buffers
// read in place, or kv_stride = S·D; likewise v); bias [B, 1, 1, T, S] f32; lse and delta [B·Hq·T]
// f32. The bias must be causal, as every bias the model builds is (forward.rs's Batch): query row
// i sees no key past S − T + i, and below that limit its bias is the last row's (0 for a valid
// key slot, the mask for padding). So the kernels read only the bias's last row, one value per
// key (flash_logit), rather than a value per score (a block's bias tile was as much global
// traffic as its K and V tiles); they skip the keys past a tile's last row's and the rows before
// a key tile's first.
//
// Fragment layouts (PTX ISA, mma.m16n8k16 .bf16): lane = 4·g + c; A (16×16, row-major) holds
// a0 = (row g, cols 2c, 2c+1), a1 = (g+8, 2c..), a2 = (g, 2c+8..), a3 = (g+8, 2c+8..); B (16×8)
// b0 = (rows 2c, 2c+1, col g), b1 = (rows 2c+8.., col g); the f32 accumulator c0, c1 = (row g,
// cols 2c, 2c+1), c2, c3 = (row g+8, ...). Two bf16 in a u32: the lower column in the low half.

#define FLASH_WARPS 4
#define FLASH_ROWS (16 * FLASH_WARPS)
#define FLASH_KEYS 64

// The logit x = scale·S + bias of query row `row` and key `key` (key < S) under a causal bias
// whose last row holds `last` at the key: that value (0, or the mask on a padding slot) up to the
// row's own slot S − T + row, −∞ past it. The bias masks those keys with a finite value instead;
// e^(x − m) is 0 either way for a row that sees a valid key, and a row that sees none (a padding
// query: its output is never read and its upstream gradient is 0) still sees key 0, so no row's
// max is −∞.
__device__ __forceinline__ float flash_logit(float sc, float scale, float last, int key, int row, int t,
                                             int s) {
    return key > s - t + row ? -INFINITY : scale * sc + last;
}

// Packed rows (the `_varlen` kernels): one row of T = S tokens (B = 1) in which each query row
// belongs to a segment and sees its segment's keys up to its own slot, after its prefix's keys
// (a shared prompt earlier in the row), and no other. seg [T·3] u32 holds each row's own
// segment's first slot and its prefix's [p0, p1) (p0 = p1 without one). bounds [4·tiles] u32:
// per tile of FLASH_ROWS query rows, the keys its rows see as two spans, [a0, a1) then b0 on
// (the forward and dQ visit those keys only: a row of a GRPO group's later completion skips its
// earlier siblings between the prompt and its own tokens), then per tile of FLASH_ROWS keys, one
// past the last query row that sees any of them (dK/dV stop their rows there). The bias is
// never read. A query tile may hold rows of segments that see none of its first key tile: their
// running max stays −∞ until a key they see, and the online softmax takes that as "nothing yet"
// rather than e^(−∞ + ∞).
struct SegRow {
    int own, p0, p1;
};
__device__ __forceinline__ SegRow seg_row(const uint32_t* seg, int t, int row) {
    if (row >= t) return {0, 0, 0};
    return {(int)seg[3 * row], (int)seg[3 * row + 1], (int)seg[3 * row + 2]};
}
__device__ __forceinline__ float varlen_logit(float sc, float scale, int key, int row, SegRow r) {
    return (key >= r.own && key <= row) || (key >= r.p0 && key < r.p1) ? scale * sc : -INFINITY;
}
// The key tiles a query tile visits: from a0 while below a1, then from b0 on (one span: a0 = a1
// = b0). Not packed, all of them from key 0.
//
// EMU_COUNT_KEYS(walk, keys): the kernel emulator counts the keys each block's walk visits (walk
// 0: the forward's, 1: dQ's), which its test compares with model::attention::varlen_work; nothing
// on a GPU.
#ifndef EMU_COUNT_KEYS
#define EMU_COUNT_KEYS(walk, keys)
#endif
struct KeySpans {
    int a0, a1, b0;
    __device__ __forceinline__ int first() const { return a0 < a1 ? a0 : b0; }
    // the tile after the one at k0 (`step` keys a tile); one that reaches past a1 jumps to b0
    __device__ __forceinline__ int next(int k0, int step) const {
        const int n = k0 + step;
        return k0 < a1 && n >= a1 ? max(n, b0) : n;
    }
};
template <bool V>
__device__ __forceinline__ KeySpans key_spans(const uint32_t* bounds, int t) {
    if (!V) return {0, 0, 0};
    const int tile = blockIdx.x % ((t + FLASH_ROWS - 1) / FLASH_ROWS);
    return {(int)bounds[3 * tile], (int)bounds[3 * tile + 1], (int)bounds[3 * tile + 2]};
}
// e^(x − m), 0 where m is −∞ (a row that has seen no key yet; x is −∞ there too)
template <bool V>
__device__ __forceinline__ float exp_from(float x, float m) {
    return V && m == -INFINITY ? 0.f : __expf(x - m);
}

// Two 16-bit elements as one 32-bit load or store, which a GPU faults on ("misaligned address",
// and the context is lost) unless p is 4-byte aligned: the emulator checks it (EMU_ALIGNED).
#ifndef EMU_ALIGNED
#define EMU_ALIGNED(p, bytes)
#endif
template <typename T>
__device__ __forceinline__ uint32_t ld_pair(const T* p) {
#ifdef __CUDA_ARCH__
    return *reinterpret_cast<const uint32_t*>(p);
#else
    EMU_ALIGNED(p, 4);
    uint32_t u;
    memcpy(&u, p, 4);
    return u;
#endif
}
template <typename T>
__device__ __forceinline__ void st_pair(T* p, uint32_t u) {
#ifdef __CUDA_ARCH__
    *reinterpret_cast<uint32_t*>(p) = u;
#else
    EMU_ALIGNED(p, 4);
    memcpy(p, &u, 4);
#endif
}
// A 16-bit value's bits, and back.
__device__ __forceinline__ uint32_t bits16(bf16 x) { return __bfloat16_as_ushort(x); }
__device__ __forceinline__ uint32_t bits16(f16 x) { return __half_as_ushort(x); }
template <typename T> __device__ __forceinline__ float from_bits16(uint32_t u);
template <> __device__ __forceinline__ float from_bits16<bf16>(uint32_t u) { return __uint_as_float(u << 16); }
template <> __device__ __forceinline__ float from_bits16<f16>(uint32_t u) {
    return __half2float(__ushort_as_half((unsigned short)u));
}
// Two floats rounded to T in a u32 (lo in the low half), and each half of such a u32 as a float.
template <typename T>
__device__ __forceinline__ uint32_t pack_f32(float lo, float hi) {
    return bits16(st<T>(lo)) | (bits16(st<T>(hi)) << 16);
}
template <typename T>
__device__ __forceinline__ float lo_f32(uint32_t u) { return from_bits16<T>(u & 0xffffu); }
template <typename T>
__device__ __forceinline__ float hi_f32(uint32_t u) { return from_bits16<T>(u >> 16); }

// c += a·b for one warp's m16n8k16 tile of T (bf16 or f16; the layouts above are both's).
template <typename T> struct TensorCore;  // whether the tensor cores read T as f16 (else bf16)
template <> struct TensorCore<bf16> { static constexpr bool f16 = false; };
template <> struct TensorCore<f16> { static constexpr bool f16 = true; };
#define MMA_16816(TY)                                                                               \
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." TY "." TY ".f32 {%0, %1, %2, %3}, "       \
                 "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"                                   \
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                                    \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]))
template <typename T>
__device__ __forceinline__ void mma_16816(float* c, const uint32_t* a, const uint32_t* b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    if constexpr (TensorCore<T>::f16) MMA_16816("f16");
    else MMA_16816("bf16");
#elif defined(__CUDA_ARCH__)
    __trap();  // the tensor cores' 16-bit mma needs sm_80 or later
#else
    emu::mma_m16n8k16<TensorCore<T>::f16>(c, a, b);
#endif
}

// A tile in shared memory: rows of D/2 pairs, padded by 4 words so that a fragment's 32 loads
// (either kind below) hit 32 banks.
template <int D>
struct Pitch {
    static constexpr int words = D / 2 + 4;
};

// 16 bytes (8 bf16 or f16) of global memory into words word..word+3 of a shared array, asynchronously
// (cp.async, sm_80 on: the copy bypasses the registers and is in flight until the issuing thread's
// cp_async_wait; a barrier after that wait makes it every thread's); zeros where !valid (src is
// then not read, but must still be an address in the buffer). Both ends 16-byte aligned.
template <typename Smem, typename T>
__device__ __forceinline__ void cp_async_16(Smem& dst, int word, const T* src, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    const uint32_t addr = (uint32_t)__cvta_generic_to_shared(&dst[word]);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(addr), "l"(src), "r"(valid ? 16 : 0)
                 : "memory");
#elif defined(__CUDA_ARCH__)
    __trap();  // the flash kernels need sm_80 or later
#else
    emu::cp_async_16(dst, word, src, valid);
#endif
}
// Closes this thread's group of copies issued since the last commit.
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#elif !defined(__CUDA_ARCH__)
    emu::cp_async_commit();
#endif
}
// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#elif !defined(__CUDA_ARCH__)
    emu::cp_async_wait(N);
#endif
}

// Rows first..first+n of a matrix of D columns whose rows start `stride` elements apart into the
// shared tile at word `at` of `dst`, zeros from row `end` on (first < end), 16 bytes a copy
// through cp_async_16: the caller commits and waits. A warp's 32 copies are 4 rows of 128 bytes
// at D = 64 (2 at D = 128), each row's in consecutive banks. src and stride 16-byte aligned.
template <int D, typename Smem, typename T>
__device__ __forceinline__ void load_tile_async(Smem& dst, int at, const T* src, size_t stride, int first, int n,
                                                int end) {
    constexpr int pieces = D / 8;  // of 16 bytes a row
    for (int e = threadIdx.x; e < n * pieces; e += blockDim.x) {
        const int r = e / pieces, p = e % pieces;
        const bool valid = first + r < end;
        cp_async_16(dst, at + r * Pitch<D>::words + 4 * p, src + (size_t)(valid ? first + r : first) * stride + 8 * p,
                    valid);
    }
}
// Four 8×8 bf16 matrices of a shared tile into this lane's registers (ldmatrix .x4): lane l gives
// the address (a word index, 16-byte aligned) of row l % 8 of matrix l / 8 and gets in r[i] matrix
// i's row l / 4, columns 2(l % 4) and +1; TRANS: its column l / 4, rows 2(l % 4) and +1.
template <bool TRANS, typename Smem>
__device__ __forceinline__ void ldsm_x4(Smem& tile, int word, uint32_t* r) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    const uint32_t addr = (uint32_t)__cvta_generic_to_shared(&tile[word]);
    if constexpr (TRANS)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(addr));
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(addr));
#elif defined(__CUDA_ARCH__)
    __trap();  // the flash kernels need sm_80 or later
#else
    emu::ldmatrix_x4(tile, word, TRANS, r);
#endif
}
// The A fragments of rows ra, rb (= ra + 8) of a matrix of D columns in global memory whose rows
// start `stride` elements apart, D in steps of 16; zeros for rows from `end` on.
template <int D, typename T>
__device__ __forceinline__ void frag_a_rows(const T* src, size_t stride, int ra, int rb, int end, int c,
                                            uint32_t (*a)[4]) {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        const int d0 = 16 * kk + 2 * c;
        a[kk][0] = ra < end ? ld_pair(src + ra * stride + d0) : 0u;
        a[kk][1] = rb < end ? ld_pair(src + rb * stride + d0) : 0u;
        a[kk][2] = ra < end ? ld_pair(src + ra * stride + d0 + 8) : 0u;
        a[kk][3] = rb < end ? ld_pair(src + rb * stride + d0 + 8) : 0u;
    }
}
// The A fragment of accumulator tiles n0 (columns 0..8) and n1 (8..16), rounded to T.
template <typename T>
__device__ __forceinline__ void frag_a_acc(const float* n0, const float* n1, uint32_t* a) {
    a[0] = pack_f32<T>(n0[0], n0[1]);
    a[1] = pack_f32<T>(n0[2], n0[3]);
    a[2] = pack_f32<T>(n1[0], n1[1]);
    a[3] = pack_f32<T>(n1[2], n1[3]);
}
// acc[n] = A·Bᵀ over the shared tile of N rows at word `at` (n: its rows in tiles of 8), A =
// fragments of D. Each ldmatrix brings two tiles' B fragments: b0, b1 of rows n·8.. (columns 16kk.., 16kk + 8..), then
// of rows (n + 1)·8.. (non-transposed: lane 4g + c gets row g, columns 2c and +1).
template <typename T, int D, int N, typename Smem>
__device__ __forceinline__ void mma_rows(float (*acc)[4], const uint32_t (*a)[4], Smem& tile, int at, int g, int c) {
    const int lane = 4 * g + c, m = lane >> 3, r8 = lane & 7;
#pragma unroll
    for (int n = 0; n < N / 8; n += 2) {
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[n][e] = acc[n + 1][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            uint32_t b[4];
            ldsm_x4<false>(tile, at + ((n + (m >> 1)) * 8 + r8) * Pitch<D>::words + 8 * kk + 4 * (m & 1), b);
            mma_16816<T>(acc[n], a[kk], b);
            mma_16816<T>(acc[n + 1], a[kk], b + 2);
        }
    }
}
// out[n] += P·tile over the N rows of the shared tile at word `at` (P: accumulator tiles of 8 of
// those rows), out over D.
template <typename T, int D, int N, typename Smem>
__device__ __forceinline__ void mma_cols(float (*out)[4], const float (*p)[4], Smem& tile, int at, int g, int c) {
    const int lane = 4 * g + c, m = lane >> 3, r8 = lane & 7;
#pragma unroll
    for (int j = 0; j < N / 16; ++j) {
        uint32_t a[4];
        frag_a_acc<T>(p[2 * j], p[2 * j + 1], a);
#pragma unroll
        for (int n = 0; n < D / 8; n += 2) {
            // b0, b1 of columns n·8.. (rows 16j.., 16j + 8..), then of columns (n + 1)·8..
            // (transposed: lane 4g + c gets column g, rows 2c and +1)
            uint32_t b[4];
            ldsm_x4<true>(tile, at + (16 * j + 8 * (m & 1) + r8) * Pitch<D>::words + 4 * (n + (m >> 1)), b);
            mma_16816<T>(out[n], a, b);
            mma_16816<T>(out[n + 1], a, b + 2);
        }
    }
}
// A row's value across the 4 lanes that hold it: max, or sum.
__device__ __forceinline__ float quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// Where a query tile's block works: the query head (b·Hq + h), its K/V head (b·Hkv + kv), and
// this lane's rows (tiles of FLASH_ROWS rows, block (b, h)'s consecutive).
struct FlashRows {
    size_t bh, kv, b;
    int ra, rb, last;
};
// Where query head bh = b·Hq + h's row 0 sits in a token-major [B, T, Hq·D] tensor (y and dy: the
// output projection's input and its gradient), whose rows are Hq·D apart.
__device__ __forceinline__ size_t token_major(size_t bh, size_t hq, int t, int d) {
    return ((bh / hq) * t * hq + bh % hq) * d;
}
__device__ __forceinline__ FlashRows flash_rows(int hkv, int g_heads, int t, int lane_row) {
    const int tiles = (t + FLASH_ROWS - 1) / FLASH_ROWS, tile = blockIdx.x % tiles;
    const size_t bh = blockIdx.x / tiles, hq = (size_t)hkv * g_heads, b = bh / hq;
    const int ra = tile * FLASH_ROWS + (threadIdx.x >> 5) * 16 + lane_row;
    return {bh, b * hkv + (bh % hq) / g_heads, b, ra, ra + 8, min(tile * FLASH_ROWS + FLASH_ROWS, t) - 1};
}

// The forward: a block of FLASH_WARPS warps takes FLASH_ROWS query rows of one query head and
// walks the keys in tiles of FLASH_KEYS with an online softmax (running max and sum per row, the
// output rescaled when the max grows): S = Q·Kᵀ, then O += P·V. Writes y and each row's
// log-partition lse = m + ln Σ e^(x − m) over x = scale·S + bias (the backward's P = e^(x − lse)).
// D = 64 or 128. Grid: B·Hq·⌈T / FLASH_ROWS⌉ blocks.
template <typename T, int D, bool V = false>
__device__ void flash_attention(const T* q, const T* k, const T* v, const float* bias, T* y,
                                float* lse, int hkv, int g_heads, int t, int s, size_t kv_stride, float scale,
                                const uint32_t* seg = nullptr, const uint32_t* bounds = nullptr) {
    __shared__ uint32_t ks[FLASH_KEYS * Pitch<D>::words];
    __shared__ uint32_t vs[FLASH_KEYS * Pitch<D>::words];
    const int lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    const FlashRows at = flash_rows(hkv, g_heads, t, g);
    const int ra = at.ra, rb = at.rb;
    const T* kb = k + at.kv * kv_stride;
    const T* vb = v + at.kv * kv_stride;
    const float* last = V ? nullptr : bias + (at.b * t + t - 1) * s;  // the bias's last row
    const SegRow sa = V ? seg_row(seg, t, ra) : SegRow{}, sb = V ? seg_row(seg, t, rb) : SegRow{};
    const KeySpans spans = key_spans<V>(bounds, t);

    uint32_t qf[D / 16][4];
    frag_a_rows<D>(q + at.bh * t * D, D, ra, rb, t, c, qf);
    float o[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    float ma = -INFINITY, mb = -INFINITY, la = 0.f, lb = 0.f;  // rows ra, rb: max, this lane's sum

    const int keys = min(s, s - t + at.last + 1);  // the keys the block's last row sees
    // The tiles' loads overlap the arithmetic: a value tile's with S = Q·Kᵀ and the softmax, the
    // next key tile's with O += P·V (FlashAttention-2's order; one buffer each).
    load_tile_async<D>(ks, 0, kb, D, spans.first(), FLASH_KEYS, keys);
    cp_async_commit();
    for (int k0 = spans.first(); k0 < keys; k0 = spans.next(k0, FLASH_KEYS)) {
        EMU_COUNT_KEYS(0, min(FLASH_KEYS, keys - k0));
        cp_async_wait<0>();
        __syncthreads();  // the key tile is in, and every warp is done with the last value tile
        load_tile_async<D>(vs, 0, vb, D, k0, FLASH_KEYS, keys);
        cp_async_commit();
        float sc[FLASH_KEYS / 8][4];  // S = Q·Kᵀ, keys in tiles of 8
        mma_rows<T, D, FLASH_KEYS>(sc, qf, ks, 0, g, c);
        // x = scale·S + bias; keys past the block's last row's are −∞, rows past T 0 (unwritten)
        float xa = -INFINITY, xb = -INFINITY;
#pragma unroll
        for (int n = 0; n < FLASH_KEYS / 8; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int key = k0 + n * 8 + 2 * c + (e & 1), row = e < 2 ? ra : rb;
                const float x = key >= keys ? -INFINITY
                                : row >= t  ? 0.f
                                : V         ? varlen_logit(sc[n][e], scale, key, row, e < 2 ? sa : sb)
                                            : flash_logit(sc[n][e], scale, last[key], key, row, t, s);
                sc[n][e] = x;
                if (e < 2) xa = fmaxf(xa, x);
                else xb = fmaxf(xb, x);
            }
        }
        // the online rescale (the first tile holds key 0, so every row's max is finite from it on;
        // packed, a row's from the first tile with a key it sees)
        const float na = fmaxf(ma, quad_max(xa)), nb = fmaxf(mb, quad_max(xb));
        const float aa = exp_from<V>(ma, na), ab = exp_from<V>(mb, nb);
        ma = na;
        mb = nb;
        la *= aa;
        lb *= ab;
#pragma unroll
        for (int n = 0; n < D / 8; ++n) {
            o[n][0] *= aa;
            o[n][1] *= aa;
            o[n][2] *= ab;
            o[n][3] *= ab;
        }
#pragma unroll
        for (int n = 0; n < FLASH_KEYS / 8; ++n) {
            sc[n][0] = exp_from<V>(sc[n][0], ma);
            sc[n][1] = exp_from<V>(sc[n][1], ma);
            sc[n][2] = exp_from<V>(sc[n][2], mb);
            sc[n][3] = exp_from<V>(sc[n][3], mb);
            la += sc[n][0] + sc[n][1];
            lb += sc[n][2] + sc[n][3];
        }
        cp_async_wait<0>();
        __syncthreads();  // the value tile is in, and every warp is done with the key tile
        if (spans.next(k0, FLASH_KEYS) < keys) {
            load_tile_async<D>(ks, 0, kb, D, spans.next(k0, FLASH_KEYS), FLASH_KEYS, keys);
            cp_async_commit();
        }
        mma_cols<T, D, FLASH_KEYS>(o, sc, vs, 0, g, c);  // O += P·V
    }
    la = quad_sum(la);
    lb = quad_sum(lb);
    const float ia = 1.f / la, ib = 1.f / lb;
    const size_t hq = (size_t)hkv * g_heads, stride = hq * D;
    T* yb = y + token_major(at.bh, hq, t, D);
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
        const int d = n * 8 + 2 * c;
        if (ra < t) st_pair(yb + ra * stride + d, pack_f32<T>(o[n][0] * ia, o[n][1] * ia));
        if (rb < t) st_pair(yb + rb * stride + d, pack_f32<T>(o[n][2] * ib, o[n][3] * ib));
    }
    if (c == 0 && ra < t) lse[at.bh * t + ra] = ma + logf(la);
    if (c == 0 && rb < t) lse[at.bh * t + rb] = mb + logf(lb);
}
extern "C" __global__ void flash_attention_d64_bf16(const bf16* q, const bf16* k, const bf16* v,
                                                    const float* bias, bf16* y, float* lse, int hkv,
                                                    int g_heads, int t, int s, size_t kv_stride, float scale) {
    flash_attention<bf16, 64>(q, k, v, bias, y, lse, hkv, g_heads, t, s, kv_stride, scale);
}
extern "C" __global__ void flash_attention_d64_f16(const f16* q, const f16* k, const f16* v,
                                                   const float* bias, f16* y, float* lse, int hkv,
                                                   int g_heads, int t, int s, size_t kv_stride, float scale) {
    flash_attention<f16, 64>(q, k, v, bias, y, lse, hkv, g_heads, t, s, kv_stride, scale);
}
extern "C" __global__ void flash_attention_varlen_d64_bf16(const bf16* q, const bf16* k, const bf16* v,
                                                           const float* bias, bf16* y, float* lse, int hkv,
                                                           int g_heads, int t, int s, size_t kv_stride, float scale,
                                                           const uint32_t* seg, const uint32_t* bounds) {
    flash_attention<bf16, 64, true>(q, k, v, bias, y, lse, hkv, g_heads, t, s, kv_stride, scale, seg, bounds);
}
extern "C" __global__ void flash_attention_varlen_d64_f16(const f16* q, const f16* k, const f16* v,
                                                          const float* bias, f16* y, float* lse, int hkv,
                                                          int g_heads, int t, int s, size_t kv_stride, float scale,
                                                          const uint32_t* seg, const uint32_t* bounds) {
    flash_attention<f16, 64, true>(q, k, v, bias, y, lse, hkv, g_heads, t, s, kv_stride, scale, seg, bounds);
}
extern "C" __global__ void flash_attention_varlen_d128_bf16(const bf16* q, const bf16* k, const bf16* v,
                                                            const float* bias, bf16* y, float* lse, int hkv,
                                                            int g_heads, int t, int s, size_t kv_stride, float scale,
                                                            const uint32_t* seg, const uint32_t* bounds) {
    flash_attention<bf16, 128, true>(q, k, v, bias, y, lse, hkv, g_heads, t, s, kv_stride, scale, seg, bounds);
}
extern "C" __global__ void flash_attention_varlen_d128_f16(const f16* q, const f16* k, const f16* v,
                                                           const float* bias, f16* y, float* lse, int hkv,
                                                           int g_heads, int t, int s, size_t kv_stride, float scale,
                                                           const uint32_t* seg, const uint32_t* bounds) {
    flash_attention<f16, 128, true>(q, k, v, bias, y, lse, hkv, g_heads, t, s, kv_stride, scale, seg, bounds);
}
extern "C" __global__ void flash_attention_d128_bf16(const bf16* q, const bf16* k, const bf16* v,
                                                     const float* bias, bf16* y, float* lse, int hkv,
                                                     int g_heads, int t, int s, size_t kv_stride, float scale) {
    flash_attention<bf16, 128>(q, k, v, bias, y, lse, hkv, g_heads, t, s, kv_stride, scale);
}
extern "C" __global__ void flash_attention_d128_f16(const f16* q, const f16* k, const f16* v,
                                                    const float* bias, f16* y, float* lse, int hkv,
                                                    int g_heads, int t, int s, size_t kv_stride, float scale) {
    flash_attention<f16, 128>(q, k, v, bias, y, lse, hkv, g_heads, t, s, kv_stride, scale);
}

// The backward, in two kernels, neither with atomics. With x = scale·S + bias, P = e^(x − lse),
// dP = dO·Vᵀ, Δ = rowsum(dO∘O) and dS = P∘(dP − Δ): dQ = scale·dS·K, dK = scale·dSᵀ·Q, dV = Pᵀ·dO.
//
// flash_attention_bwd_dq: the forward's grid (query tiles); S and dP again per tile of KT keys,
// then dQ += dS·K. It computes each row's Δ from dO and O first and writes it for the next kernel.
// KT = FLASH_KEYS at D = 64, half that at D = 128 (fewer registers for S and dP).
template <typename T, int D, int KT, bool V = false>
__device__ void flash_attention_bwd_dq(const T* q, const T* k, const T* v, const float* bias,
                                       const T* y, const T* dy, const float* lse, T* dq, float* delta,
                                       int hkv, int g_heads, int t, int s, size_t kv_stride, float scale,
                                       const uint32_t* seg = nullptr, const uint32_t* bounds = nullptr) {
    constexpr int span = KT * Pitch<D>::words;  // a tile's words; two buffers of each: one read, the next loaded
    __shared__ uint32_t ks[2 * span];
    __shared__ uint32_t vs[2 * span];
    const int lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    const FlashRows at = flash_rows(hkv, g_heads, t, g);
    const int ra = at.ra, rb = at.rb;
    const size_t rows = at.bh * t * D, hq = (size_t)hkv * g_heads, tok = token_major(at.bh, hq, t, D);
    const T* kb = k + at.kv * kv_stride;
    const T* vb = v + at.kv * kv_stride;
    const float* last = V ? nullptr : bias + (at.b * t + t - 1) * s;  // the bias's last row
    const SegRow sa = V ? seg_row(seg, t, ra) : SegRow{}, sb = V ? seg_row(seg, t, rb) : SegRow{};
    const KeySpans spans = key_spans<V>(bounds, t);

    uint32_t qf[D / 16][4], df[D / 16][4], yf[D / 16][4];
    frag_a_rows<D>(q + rows, D, ra, rb, t, c, qf);
    frag_a_rows<D>(dy + tok, hq * D, ra, rb, t, c, df);
    frag_a_rows<D>(y + tok, hq * D, ra, rb, t, c, yf);
    float da = 0.f, db = 0.f;  // Δ of rows ra, rb
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const float p = lo_f32<T>(df[kk][i]) * lo_f32<T>(yf[kk][i]) + hi_f32<T>(df[kk][i]) * hi_f32<T>(yf[kk][i]);
            if (i & 1) db += p;
            else da += p;
        }
    }
    da = quad_sum(da);
    db = quad_sum(db);
    if (c == 0 && ra < t) delta[at.bh * t + ra] = da;
    if (c == 0 && rb < t) delta[at.bh * t + rb] = db;
    const float lsa = ra < t ? lse[at.bh * t + ra] : 0.f, lsb = rb < t ? lse[at.bh * t + rb] : 0.f;

    float acc[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
    const int keys = min(s, s - t + at.last + 1);
    // the next key and value tiles load into the other buffers while this one's are used
    const auto stage = [&](int k0, int buf) {
        load_tile_async<D>(ks, buf * span, kb, D, k0, KT, keys);
        load_tile_async<D>(vs, buf * span, vb, D, k0, KT, keys);
        cp_async_commit();
    };
    stage(spans.first(), 0);
    for (int k0 = spans.first(), buf = 0; k0 < keys; k0 = spans.next(k0, KT), buf ^= 1) {
        EMU_COUNT_KEYS(1, min(KT, keys - k0));
        cp_async_wait<0>();
        __syncthreads();  // this tile is in, and every warp is done with the other buffers
        if (spans.next(k0, KT) < keys) stage(spans.next(k0, KT), buf ^ 1);
        const int now = buf * span;
        float sc[KT / 8][4], dp[KT / 8][4];
        mma_rows<T, D, KT>(sc, qf, ks, now, g, c);  // S = Q·Kᵀ
        mma_rows<T, D, KT>(dp, df, vs, now, g, c);  // dP = dO·Vᵀ
#pragma unroll
        for (int n = 0; n < KT / 8; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int key = k0 + n * 8 + 2 * c + (e & 1), row = e < 2 ? ra : rb;
                const float x = V ? varlen_logit(sc[n][e], scale, key, row, e < 2 ? sa : sb)
                                  : key < keys && row < t ? flash_logit(sc[n][e], scale, last[key], key, row, t, s)
                                                          : -INFINITY;
                const float p = key < keys && row < t ? __expf(x - (e < 2 ? lsa : lsb)) : 0.f;
                sc[n][e] = p * (dp[n][e] - (e < 2 ? da : db));  // dS
            }
        }
        mma_cols<T, D, KT>(acc, sc, ks, now, g, c);  // dQ += dS·K
    }
    T* dqb = dq + rows;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
        const int d = n * 8 + 2 * c;
        if (ra < t) st_pair(dqb + (size_t)ra * D + d, pack_f32<T>(scale * acc[n][0], scale * acc[n][1]));
        if (rb < t) st_pair(dqb + (size_t)rb * D + d, pack_f32<T>(scale * acc[n][2], scale * acc[n][3]));
    }
}
extern "C" __global__ void flash_attention_bwd_dq_d64_bf16(const bf16* q, const bf16* k, const bf16* v,
                                                           const float* bias, const bf16* y, const bf16* dy,
                                                           const float* lse, bf16* dq, float* delta, int hkv,
                                                           int g_heads, int t, int s, size_t kv_stride,
                                                           float scale) {
    flash_attention_bwd_dq<bf16, 64, FLASH_KEYS>(q, k, v, bias, y, dy, lse, dq, delta, hkv, g_heads, t, s, kv_stride,
                                           scale);
}
extern "C" __global__ void flash_attention_bwd_dq_d64_f16(const f16* q, const f16* k, const f16* v,
                                                          const float* bias, const f16* y, const f16* dy,
                                                          const float* lse, f16* dq, float* delta, int hkv,
                                                          int g_heads, int t, int s, size_t kv_stride,
                                                          float scale) {
    flash_attention_bwd_dq<f16, 64, FLASH_KEYS>(q, k, v, bias, y, dy, lse, dq, delta, hkv, g_heads, t, s, kv_stride,
                                          scale);
}
extern "C" __global__ void flash_attention_varlen_bwd_dq_d64_bf16(
    const bf16* q, const bf16* k, const bf16* v, const float* bias, const bf16* y, const bf16* dy, const float* lse,
    bf16* dq, float* delta, int hkv, int g_heads, int t, int s, size_t kv_stride, float scale, const uint32_t* seg,
    const uint32_t* bounds) {
    flash_attention_bwd_dq<bf16, 64, FLASH_KEYS, true>(q, k, v, bias, y, dy, lse, dq, delta, hkv, g_heads, t, s,
                                                 kv_stride, scale, seg, bounds);
}
extern "C" __global__ void flash_attention_varlen_bwd_dq_d64_f16(
   const f16* q, const f16* k, const f16* v, const float* bias, const f16* y, const f16* dy, const float* lse,
   f16* dq, float* delta, int hkv, int g_heads, int t, int s, size_t kv_stride, float scale, const uint32_t* seg,
   const uint32_t* bounds) {
    flash_attention_bwd_dq<f16, 64, FLASH_KEYS, true>(q, k, v, bias, y, dy, lse, dq, delta, hkv, g_heads, t, s,
                                                kv_stride, scale, seg, bounds);
}
extern "C" __global__ void flash_attention_varlen_bwd_dq_d128_bf16(
    const bf16* q, const bf16* k, const bf16* v, const float* bias, const bf16* y, const bf16* dy, const float* lse,
    bf16* dq, float* delta, int hkv, int g_heads, int t, int s, size_t kv_stride, float scale, const uint32_t* seg,
    const uint32_t* bounds) {
    flash_attention_bwd_dq<bf16, 128, FLASH_KEYS / 2, true>(q, k, v, bias, y, dy, lse, dq, delta, hkv, g_heads, t, s,
                                                      kv_stride, scale, seg, bounds);
}
extern "C" __global__ void flash_attention_varlen_bwd_dq_d128_f16(
   const f16* q, const f16* k, const f16* v, const float* bias, const f16* y, const f16* dy, const float* lse,
   f16* dq, float* delta, int hkv, int g_heads, int t, int s, size_t kv_stride, float scale, const uint32_t* seg,
   const uint32_t* bounds) {
    flash_attention_bwd_dq<f16, 128, FLASH_KEYS / 2, true>(q, k, v, bias, y, dy, lse, dq, delta, hkv, g_heads, t, s,
                                                     kv_stride, scale, seg, bounds);
}
extern "C" __global__ void flash_attention_bwd_dq_d128_bf16(const bf16* q, const bf16* k, const bf16* v,
                                                            const float* bias, const bf16* y, const bf16* dy,
                                                            const float* lse, bf16* dq, float* delta, int hkv,
                                                            int g_heads, int t, int s, size_t kv_stride,
                                                            float scale) {
    flash_attention_bwd_dq<bf16, 128, FLASH_KEYS / 2>(q, k, v, bias, y, dy, lse, dq, delta, hkv, g_heads, t, s,
                                                kv_stride, scale);
}
extern "C" __global__ void flash_attention_bwd_dq_d128_f16(const f16* q, const f16* k, const f16* v,
                                                           const float* bias, const f16* y, const f16* dy,
                                                           const float* lse, f16* dq, float* delta, int hkv,
                                                           int g_heads, int t, int s, size_t kv_stride,
                                                           float scale) {
    flash_attention_bwd_dq<f16, 128, FLASH_KEYS / 2>(q, k, v, bias, y, dy, lse, dq, delta, hkv, g_heads, t, s,
                                               kv_stride, scale);
}

// flash_attention_bwd_dkv: a block per FLASH_ROWS keys of one query head (grid B·Hq·⌈S /
// FLASH_ROWS⌉, block (b, h)'s consecutive), each warp 16 keys with their K and V rows in
// registers; it walks the tiles of QR query rows that see its keys: Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ,
// then dV += Pᵀ·dO and dK += dSᵀ·Q. Writes this head's share, dk and dv [B, Hkv, G, S, D] f32,
// for the caller to sum over the G query heads of each K/V head (in order: deterministic).
// QR = FLASH_ROWS at D = 64, a quarter of that at D = 128 (fewer registers for Sᵀ and dPᵀ).
template <typename T, int D, int QR, bool V = false>
__device__ void flash_attention_bwd_dkv(const T* q, const T* k, const T* v, const float* bias,
                                        const T* dy, const float* lse, const float* delta, float* dk,
                                        float* dv, int hkv, int g_heads, int t, int s, size_t kv_stride,
                                        float scale, const uint32_t* seg = nullptr, const uint32_t* bounds = nullptr) {
    constexpr int span = QR * Pitch<D>::words;  // a tile's words; two buffers of each: one read, the next loaded
    __shared__ uint32_t qs[2 * span];
    __shared__ uint32_t dos[2 * span];
    __shared__ float ls[2 * QR];
    __shared__ float dl[2 * QR];
    __shared__ SegRow sg[V ? 2 * QR : 1];
    const int lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    const int tiles = (s + FLASH_ROWS - 1) / FLASH_ROWS, tile = blockIdx.x % tiles;
    const size_t bh = blockIdx.x / tiles, hq = (size_t)hkv * g_heads, b = bh / hq;
    const size_t kv = b * hkv + (bh % hq) / g_heads;
    const int k0 = tile * FLASH_ROWS, ka = k0 + (threadIdx.x >> 5) * 16 + g, kb = ka + 8;
    const size_t rows = bh * t * D, tok = token_major(bh, hq, t, D);
    const float* last = V ? nullptr : bias + (b * t + t - 1) * s;  // the bias's last row, at the warp's keys
    const float bka = !V && ka < s ? last[ka] : 0.f, bkb = !V && kb < s ? last[kb] : 0.f;
    const int rows_end = V ? bounds[3 * tiles + tile] : t;  // packed: past the last row that sees these keys

    uint32_t kf[D / 16][4], vf[D / 16][4];
    frag_a_rows<D>(k + kv * kv_stride, D, ka, kb, s, c, kf);
    frag_a_rows<D>(v + kv * kv_stride, D, ka, kb, s, c, vf);
    float dka[D / 8][4], dva[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) dka[n][e] = dva[n][e] = 0.f;

    // the first query row that sees key k0 sits at key slot k0
    const int first = k0 > s - t ? k0 - (s - t) : 0;
    // the next tile of query rows loads into the other buffers while this one's are used
    const auto stage = [&](int r0, int buf) {
        load_tile_async<D>(qs, buf * span, q + rows, D, r0, QR, t);
        load_tile_async<D>(dos, buf * span, dy + tok, hq * D, r0, QR, t);
        cp_async_commit();
        for (int i = threadIdx.x; i < QR; i += blockDim.x) {
            ls[buf * QR + i] = r0 + i < t ? lse[bh * t + r0 + i] : 0.f;
            dl[buf * QR + i] = r0 + i < t ? delta[bh * t + r0 + i] : 0.f;
            if (V) sg[buf * QR + i] = seg_row(seg, t, r0 + i);
        }
    };
    stage(first / QR * QR, 0);
    for (int r0 = first / QR * QR, buf = 0; r0 < rows_end; r0 += QR, buf ^= 1) {
        cp_async_wait<0>();
        __syncthreads();  // this tile is in, and every warp is done with the other buffers
        if (r0 + QR < rows_end) stage(r0 + QR, buf ^ 1);
        const int now = buf * span;
        float st[QR / 8][4], dpt[QR / 8][4];
        mma_rows<T, D, QR>(st, kf, qs, now, g, c);    // Sᵀ = K·Qᵀ, queries in tiles of 8
        mma_rows<T, D, QR>(dpt, vf, dos, now, g, c);  // dPᵀ = V·dOᵀ
#pragma unroll
        for (int n = 0; n < QR / 8; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int i = n * 8 + 2 * c + (e & 1), row = r0 + i, key = e < 2 ? ka : kb;
                const float x = V ? varlen_logit(st[n][e], scale, key, row, sg[buf * QR + i])
                                  : flash_logit(st[n][e], scale, e < 2 ? bka : bkb, key, row, t, s);
                const float p = row < t && key < s ? __expf(x - ls[buf * QR + i]) : 0.f;
                st[n][e] = p;
                dpt[n][e] = p * (dpt[n][e] - dl[buf * QR + i]);  // dSᵀ
            }
        }
        mma_cols<T, D, QR>(dva, st, dos, now, g, c);  // dV += Pᵀ·dO
        mma_cols<T, D, QR>(dka, dpt, qs, now, g, c);  // dK += dSᵀ·Q
    }
    const size_t out = bh * s * D;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int key = e < 2 ? ka : kb, d = n * 8 + 2 * c + (e & 1);
            if (key < s) {
                dk[out + (size_t)key * D + d] = scale * dka[n][e];
                dv[out + (size_t)key * D + d] = dva[n][e];
            }
        }
    }
}
extern "C" __global__ void flash_attention_bwd_dkv_d64_bf16(const bf16* q, const bf16* k, const bf16* v,
                                                            const float* bias, const bf16* dy, const float* lse,
                                                            const float* delta, float* dk, float* dv, int hkv,
                                                            int g_heads, int t, int s, size_t kv_stride,
                                                            float scale) {
    flash_attention_bwd_dkv<bf16, 64, FLASH_ROWS>(q, k, v, bias, dy, lse, delta, dk, dv, hkv, g_heads, t, s, kv_stride,
                                            scale);
}
extern "C" __global__ void flash_attention_bwd_dkv_d64_f16(const f16* q, const f16* k, const f16* v,
                                                           const float* bias, const f16* dy, const float* lse,
                                                           const float* delta, float* dk, float* dv, int hkv,
                                                           int g_heads, int t, int s, size_t kv_stride,
                                                           float scale) {
    flash_attention_bwd_dkv<f16, 64, FLASH_ROWS>(q, k, v, bias, dy, lse, delta, dk, dv, hkv, g_heads, t, s, kv_stride,
                                           scale);
}
extern "C" __global__ void flash_attention_varlen_bwd_dkv_d64_bf16(
    const bf16* q, const bf16* k, const bf16* v, const float* bias, const bf16* dy, const float* lse,
    const float* delta, float* dk, float* dv, int hkv, int g_heads, int t, int s, size_t kv_stride, float scale,
    const uint32_t* seg, const uint32_t* bounds) {
    flash_attention_bwd_dkv<bf16, 64, FLASH_ROWS, true>(q, k, v, bias, dy, lse, delta, dk, dv, hkv, g_heads, t, s,
                                                  kv_stride, scale, seg, bounds);
}
extern "C" __global__ void flash_attention_varlen_bwd_dkv_d64_f16(
   const f16* q, const f16* k, const f16* v, const float* bias, const f16* dy, const float* lse,
   const float* delta, float* dk, float* dv, int hkv, int g_heads, int t, int s, size_t kv_stride, float scale,
   const uint32_t* seg, const uint32_t* bounds) {
    flash_attention_bwd_dkv<f16, 64, FLASH_ROWS, true>(q, k, v, bias, dy, lse, delta, dk, dv, hkv, g_heads, t, s,
                                                 kv_stride, scale, seg, bounds);
}
extern "C" __global__ void flash_attention_varlen_bwd_dkv_d128_bf16(
    const bf16* q, const bf16* k, const bf16* v, const float* bias, const bf16* dy, const float* lse,
    const float* delta, float* dk, float* dv, int hkv, int g_heads, int t, int s, size_t kv_stride, float scale,
    const uint32_t* seg, const uint32_t* bounds) {
    flash_attention_bwd_dkv<bf16, 128, FLASH_ROWS / 4, true>(q, k, v, bias, dy, lse, delta, dk, dv, hkv, g_heads, t, s,
                                                       kv_stride, scale, seg, bounds);
}
extern "C" __global__ void flash_attention_varlen_bwd_dkv_d128_f16(
   const f16* q, const f16* k, const f16* v, const float* bias, const f16* dy, const float* lse,
   const float* delta, float* dk, float* dv, int hkv, int g_heads, int t, int s, size_t kv_stride, float scale,
   const uint32_t* seg, const uint32_t* bounds) {
    flash_attention_bwd_dkv<f16, 128, FLASH_ROWS / 4, true>(q, k, v, bias, dy, lse, delta, dk, dv, hkv, g_heads, t, s,
                                                      kv_stride, scale, seg, bounds);
}
extern "C" __global__ void flash_attention_bwd_dkv_d128_bf16(const bf16* q, const bf16* k, const bf16* v,
                                                             const float* bias, const bf16* dy, const float* lse,
                                                             const float* delta, float* dk, float* dv, int hkv,
                                                             int g_heads, int t, int s, size_t kv_stride,
                                                             float scale) {
    flash_attention_bwd_dkv<bf16, 128, FLASH_ROWS / 4>(q, k, v, bias, dy, lse, delta, dk, dv, hkv, g_heads, t, s,
                                                 kv_stride, scale);
}
extern "C" __global__ void flash_attention_bwd_dkv_d128_f16(const f16* q, const f16* k, const f16* v,
                                                            const float* bias, const f16* dy, const float* lse,
                                                            const float* delta, float* dk, float* dv, int hkv,
                                                            int g_heads, int t, int s, size_t kv_stride,
                                                            float scale) {
    flash_attention_bwd_dkv<f16, 128, FLASH_ROWS / 4>(q, k, v, bias, dy, lse, delta, dk, dv, hkv, g_heads, t, s,
                                                kv_stride, scale);
}

// ------------------------------------------------------------------------------- AdamW
// Multi-tensor kernels: many parameters in one launch. The parameters are cut into chunks of
// `chunk` elements: chunk c is chunk chunk_index[c] of tensor i = chunk_param[c], which has
// sizes[i] elements; block b takes chunks b, b + gridDim.x, … Device addresses come in a table of u64.

// The elements [start, end) of chunk c of tensor i.
__device__ __forceinline__ void chunk_bounds(const uint32_t* sizes, const uint32_t* chunk_index, int c,
                                             uint32_t i, int chunk, size_t& start, size_t& end) {
    start = (size_t)chunk_index[c] * chunk;
    end = start + chunk < sizes[i] ? start + chunk : sizes[i];
}

// Σ g² per chunk of the gradients (f32 or bf16, G) at addresses[i] into partial[c], for the host
// to add in f64: a fixed order, so the global norm does not vary from run to run.
template <typename G>
__device__ void sum_squares(const u64* addresses, const uint32_t* sizes, const uint32_t* chunk_param,
                            const uint32_t* chunk_index, int chunks, int chunk, float* partial) {
    for (int c = blockIdx.x; c < chunks; c += gridDim.x) {
        const uint32_t i = chunk_param[c];
        const G* g = (const G*)addresses[i];
        size_t start, end;
        chunk_bounds(sizes, chunk_index, c, i, chunk, start, end);
        float s = 0.f;
        for (size_t j = start + threadIdx.x; j < end; j += blockDim.x) {
            const float gj = ld(g[j]);
            s += gj * gj;
        }
        s = block_sum(s);
        if (threadIdx.x == 0) partial[c] = s;
    }
}
extern "C" __global__ void sum_squares_f32(const u64* addresses, const uint32_t* sizes,
                                           const uint32_t* chunk_param, const uint32_t* chunk_index,
                                           int chunks, int chunk, float* partial) {
    sum_squares<float>(addresses, sizes, chunk_param, chunk_index, chunks, chunk, partial);
}
extern "C" __global__ void sum_squares_bf16(const u64* addresses, const uint32_t* sizes,
                                            const uint32_t* chunk_param, const uint32_t* chunk_index,
                                            int chunks, int chunk, float* partial) {
    sum_squares<bf16>(addresses, sizes, chunk_param, chunk_index, chunks, chunk, partial);
}
extern "C" __global__ void sum_squares_f16(const u64* addresses, const uint32_t* sizes,
                                           const uint32_t* chunk_param, const uint32_t* chunk_index,
                                           int chunks, int chunk, float* partial) {
    sum_squares<f16>(addresses, sizes, chunk_param, chunk_index, chunks, chunk, partial);
}

// One AdamW step of every parameter, in place, as learner/src/optim.rs's host_update:
//   g' = clip·g;  m = β1·m + (1−β1)·g';  v = β2·v + (1−β2)·g'²;
//   w −= decay·w;  w −= step_size·m / (sqrt(v)/sqrt_bias2 + eps)
// Parameter i's f32 master w, gradient (G: f32, or bf16 as a bf16 parameter's backward left it),
// f32 moments m and v, and compute copy (P, written with the new w; address 0 when the master is
// the parameter itself) are at addresses[5i … 5i+4]; decays[i] is its lr·weight_decay (or 0).
// Kernels adamw_<P> read f32 gradients, adamw_bf16_bf16 bf16 ones.
template <typename P, typename G>
__device__ void adamw(const u64* addresses, const uint32_t* sizes, const float* decays,
                      const uint32_t* chunk_param, const uint32_t* chunk_index, int chunks, int chunk,
                      float beta1, float beta2, float eps, float step_size, float sqrt_bias2, float clip) {
    for (int c = blockIdx.x; c < chunks; c += gridDim.x) {
        const uint32_t i = chunk_param[c];
        float* w = (float*)addresses[5 * i];
        const G* g = (const G*)addresses[5 * i + 1];
        float* m = (float*)addresses[5 * i + 2];
        float* v = (float*)addresses[5 * i + 3];
        P* copy = (P*)addresses[5 * i + 4];
        const float decay = decays[i];
        size_t start, end;
        chunk_bounds(sizes, chunk_index, c, i, chunk, start, end);
        for (size_t j = start + threadIdx.x; j < end; j += blockDim.x) {
            const float gj = ld(g[j]) * clip;
            const float mj = beta1 * m[j] + (1.f - beta1) * gj;
            const float vj = beta2 * v[j] + (1.f - beta2) * gj * gj;
            float wj = w[j];
            wj -= decay * wj;
            wj -= step_size * mj / (sqrtf(vj) / sqrt_bias2 + eps);
            w[j] = wj;
            m[j] = mj;
            v[j] = vj;
            if (copy) copy[j] = st<P>(wj);
        }
    }
}
extern "C" __global__ void adamw_f32(const u64* addresses, const uint32_t* sizes, const float* decays,
                                     const uint32_t* chunk_param, const uint32_t* chunk_index, int chunks,
                                     int chunk, float beta1, float beta2, float eps, float step_size,
                                     float sqrt_bias2, float clip) {
    adamw<float, float>(addresses, sizes, decays, chunk_param, chunk_index, chunks, chunk, beta1, beta2,
                        eps, step_size, sqrt_bias2, clip);
}
extern "C" __global__ void adamw_bf16(const u64* addresses, const uint32_t* sizes, const float* decays,
                                      const uint32_t* chunk_param, const uint32_t* chunk_index, int chunks,
                                      int chunk, float beta1, float beta2, float eps, float step_size,
                                      float sqrt_bias2, float clip) {
    adamw<bf16, float>(addresses, sizes, decays, chunk_param, chunk_index, chunks, chunk, beta1, beta2,
                       eps, step_size, sqrt_bias2, clip);
}
extern "C" __global__ void adamw_f16(const u64* addresses, const uint32_t* sizes, const float* decays,
                                     const uint32_t* chunk_param, const uint32_t* chunk_index, int chunks,
                                     int chunk, float beta1, float beta2, float eps, float step_size,
                                     float sqrt_bias2, float clip) {
    adamw<f16, float>(addresses, sizes, decays, chunk_param, chunk_index, chunks, chunk, beta1, beta2,
                      eps, step_size, sqrt_bias2, clip);
}
extern "C" __global__ void adamw_bf16_bf16(const u64* addresses, const uint32_t* sizes, const float* decays,
                                           const uint32_t* chunk_param, const uint32_t* chunk_index,
                                           int chunks, int chunk, float beta1, float beta2, float eps,
                                           float step_size, float sqrt_bias2, float clip) {
    adamw<bf16, bf16>(addresses, sizes, decays, chunk_param, chunk_index, chunks, chunk, beta1, beta2,
                      eps, step_size, sqrt_bias2, clip);
}
extern "C" __global__ void adamw_f16_f16(const u64* addresses, const uint32_t* sizes, const float* decays,
                                          const uint32_t* chunk_param, const uint32_t* chunk_index,
                                          int chunks, int chunk, float beta1, float beta2, float eps,
                                          float step_size, float sqrt_bias2, float clip) {
    adamw<f16, f16>(addresses, sizes, decays, chunk_param, chunk_index, chunks, chunk, beta1, beta2,
                    eps, step_size, sqrt_bias2, clip);
}
