//! Launchers for the CUDA kernels of `kernels/ferrite.cu` (feature `cuda`): the GPU side of the
//! fused ops in [`crate::ops`]. Forward launchers work on candle's `CudaStorage` (they serve the
//! custom ops' `cuda_fwd`); backward launchers take and return tensors (they serve `bwd`).
//! Inputs must be contiguous; the callers in `ops` make them so.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    result, sys, CudaFunction, CudaSlice, CudaStream, CudaView, DevicePtr, DeviceRepr, LaunchArgs,
    LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{CudaStorage, DType, Layout, Shape, Storage, Tensor, WithDType};
use sys::CUmemPool_attribute as PoolAttr;

use crate::launch;
use crate::ops::FlashMask;
use crate::signatures::{self, Arg, Elem};

type Result<T> = candle_core::Result<T>;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/ferrite.ptx"));
const MODULE: &str = "ferrite";

fn err(msg: impl Into<String>) -> candle_core::Error {
    candle_core::Error::Msg(msg.into())
}

/// Whether a CUDA error candle boxed is an allocation failing for want of device memory.
pub(crate) fn out_of_memory(e: &(dyn std::error::Error + Send + Sync + 'static)) -> bool {
    use candle_core::cuda_backend::cudarc::cublas::sys::cublasStatus_t;
    use candle_core::cuda_backend::CudaError;
    match e.downcast_ref::<CudaError>() {
        Some(CudaError::Cuda(d)) => d.0 == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY,
        Some(CudaError::Cublas(c)) => c.0 == cublasStatus_t::CUBLAS_STATUS_ALLOC_FAILED,
        _ => false,
    }
}

// ---------------------------------------------------------------- the device

/// CUDA device `ordinal` (a fresh candle device: its own id, stream and cuBLAS handle), set up
/// for a workload of many short-lived tensors, as a learner step or a decode step is:
/// - cudarc's event tracking is off. With it on, every allocation creates two CUDA events and
///   every free destroys them (four driver calls per tensor, under the context's lock), yet they
///   are recorded and waited on only once a context has a second stream, which candle's device
///   (one per-thread default stream) never creates: they cost and guard nothing.
/// - the device's default memory pool, which cudarc's stream-ordered allocations draw from, keeps
///   the memory freed to it. Its release threshold is 0 by default: every synchronization (one
///   per decode step for the sampled tokens, several per learner step) hands the free memory back
///   to the driver, and the next step maps it again. PyTorch's caching allocator keeps it too;
///   [`release_cached`] hands it back on request.
pub fn open(ordinal: usize) -> Result<candle_core::Device> {
    let device = candle_core::Device::new_cuda(ordinal)?;
    let candle_core::Device::Cuda(dev) = &device else {
        return Err(err("Device::new_cuda gave a device that is not CUDA"));
    };
    // SAFETY: cudarc's events only order work across streams, and this device runs all of its
    // work on one stream per host thread without a second stream in the context (see above):
    // its slices would carry events that are never recorded or waited on.
    unsafe { dev.disable_event_tracking() };
    keep_freed_memory(&device, true)?;
    Ok(device)
}

/// Whether the default memory pool of `device`'s GPU keeps the memory freed to it through
/// synchronizations (release threshold unbounded) or hands it back at each (0, CUDA's default).
/// The pool is the GPU's: this holds for every candle device on it. A no-op off CUDA and on a
/// GPU without memory pools.
pub fn keep_freed_memory(device: &candle_core::Device, keep: bool) -> Result<()> {
    on_pool(device, (), |pool| {
        let threshold = if keep { u64::MAX } else { 0 };
        set_pool_attribute(pool, PoolAttr::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, threshold)
    })
}

/// Waits for `device`'s work and hands the memory its pool keeps unused back to the driver (a
/// no-op off CUDA): before measuring a peak, or to leave room for another process.
pub fn release_cached(device: &candle_core::Device) -> Result<()> {
    device.synchronize()?;
    on_pool(device, (), |pool| {
        // SAFETY: a valid pool; trimming frees only memory that no allocation holds.
        unsafe { result::mem_pool::trim_to(pool, 0).w() }
    })
}

/// The most memory that allocations from `device`'s memory pool (every tensor candle makes) have
/// held at once since the last [`reset_peak_allocated`]: what `torch.cuda.max_memory_allocated`
/// reports, without the memory the pool keeps free, the context or cuBLAS's workspace. None off
/// CUDA and on a GPU without memory pools.
pub fn peak_allocated(device: &candle_core::Device) -> Result<Option<u64>> {
    on_pool(device, None, |pool| {
        let read = |attr| -> Result<u64> {
            let mut bytes: u64 = 0;
            // SAFETY: a valid pool, and its used-memory attributes are u64s.
            unsafe { result::mem_pool::get_attribute(pool, attr, (&mut bytes as *mut u64).cast()) }
                .w()?;
            Ok(bytes)
        };
        // the high watermark moves at allocations: right after a reset it may lag the memory in
        // use
        let high = read(PoolAttr::CU_MEMPOOL_ATTR_USED_MEM_HIGH)?;
        let now = read(PoolAttr::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)?;
        Ok(Some(high.max(now)))
    })
}

/// Starts [`peak_allocated`] again from the memory allocated now (a no-op off CUDA and on a GPU
/// without memory pools).
pub fn reset_peak_allocated(device: &candle_core::Device) -> Result<()> {
    device.synchronize()?;
    // the high watermark may only be reset to 0
    on_pool(device, (), |pool| {
        set_pool_attribute(pool, PoolAttr::CU_MEMPOOL_ATTR_USED_MEM_HIGH, 0)
    })
}

/// `f` of the default memory pool of `device`'s GPU; `absent` off CUDA and on a GPU without
/// memory pools.
fn on_pool<T>(
    device: &candle_core::Device,
    absent: T,
    f: impl FnOnce(sys::CUmemoryPool) -> Result<T>,
) -> Result<T> {
    let candle_core::Device::Cuda(dev) = device else {
        return Ok(absent);
    };
    match default_pool(dev)? {
        Some(pool) => f(pool),
        None => Ok(absent),
    }
}

/// Sets a `u64` attribute (the release threshold, the used-memory high watermark) of `pool`.
fn set_pool_attribute(pool: sys::CUmemoryPool, attr: PoolAttr, value: u64) -> Result<()> {
    let mut value = value;
    // SAFETY: a valid pool (from `default_pool`), and the attributes set here are u64s.
    unsafe { result::mem_pool::set_attribute(pool, attr, (&mut value as *mut u64).cast()).w() }
}

/// The default memory pool of `dev`'s GPU, which cudarc's stream-ordered allocations use; none
/// where the GPU has no memory pools (cudarc then allocates and frees synchronously).
fn default_pool(dev: &CudaDevice) -> Result<Option<sys::CUmemoryPool>> {
    let ctx = dev.cuda_stream().context().clone();
    ctx.bind_to_thread().w()?;
    let pools = sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED;
    if ctx.attribute(pools).w()? == 0 {
        return Ok(None);
    }
    // SAFETY: the ordinal of a device this context was made for.
    unsafe {
        result::device::get_default_mem_pool(ctx.cu_device())
            .w()
            .map(Some)
    }
}

/// The kernel modules a run may load, by name: ferrite's and candle's (but candle's quantized
/// kernels, which ferrite never calls), as PTX.
fn kernel_modules() -> [(&'static str, &'static str); 11] {
    use candle_core::cuda_backend::kernels as candle;
    [
        (MODULE, PTX),
        ("candle binary", candle::BINARY.ptx()),
        ("candle unary", candle::UNARY.ptx()),
        ("candle indexing", candle::INDEXING.ptx()),
        ("candle conv", candle::CONV.ptx()),
        ("candle reduce", candle::REDUCE.ptx()),
        ("candle cast", candle::CAST.ptx()),
        ("candle ternary", candle::TERNARY.ptx()),
        ("candle affine", candle::AFFINE.ptx()),
        ("candle fill", candle::FILL.ptx()),
        ("candle sort", candle::SORT.ptx()),
    ]
}

/// Compiles every kernel module a run may load for `device`'s GPU, each on its own thread, and
/// returns each module's name, PTX bytes and seconds (none off CUDA).
///
/// The driver compiles a module's PTX to the GPU's code when a process first loads it, at the
/// first launch of one of its kernels: at sm_90, ptxas takes 44 s of one core for all of them
/// here (candle's binary kernels 18 s, ferrite's 7 s; 2026-12-05). It keeps what it compiled in
/// its compute cache on disk (`CUDA_CACHE_PATH`, by default `~/.nv/ComputeCache`), keyed by the
/// PTX, so that a later process on the machine loads the module at once. Run before a workload
/// (`ferrite gpu-check jit`), this fills the cache in parallel, where the workload would compile
/// one module at a time inside its first step.
pub fn compile_modules(device: &candle_core::Device) -> Result<Vec<(&'static str, usize, f64)>> {
    let candle_core::Device::Cuda(dev) = device else {
        return Ok(Vec::new());
    };
    let ctx = dev.cuda_stream().context().clone();
    std::thread::scope(|s| {
        let threads: Vec<_> = kernel_modules()
            .into_iter()
            .map(|(name, ptx)| {
                let ctx = ctx.clone();
                s.spawn(move || -> Result<(&'static str, usize, f64)> {
                    let start = std::time::Instant::now();
                    // dropped at once: the compiled code stays in the driver's cache
                    ctx.load_module(ptx.into())
                        .w()
                        .map_err(|e| err(format!("compiling the {name} kernels: {e}")))?;
                    Ok((name, ptx.len(), start.elapsed().as_secs_f64()))
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| {
                t.join()
                    .unwrap_or_else(|_| Err(err("a compiling thread panicked")))
            })
            .collect()
    })
}

/// The kernel name for element type `T`: `name_f32`, `name_bf16` or `name_f16`.
fn kernel<T: WithDType>(name: &str) -> Result<String> {
    match T::DTYPE {
        DType::F32 => Ok(format!("{name}_f32")),
        DType::BF16 => Ok(format!("{name}_bf16")),
        DType::F16 => Ok(format!("{name}_f16")),
        d => Err(err(format!("ferrite cuda kernel {name}: no {d:?} variant"))),
    }
}

/// Calls `$f::<T>(args)` for the element type `$dtype` (f32, bf16 or f16).
macro_rules! by_dtype {
    ($dtype:expr, $f:ident ( $($a:expr),* $(,)? )) => {
        match $dtype {
            DType::F32 => $f::<f32>($($a),*),
            DType::BF16 => $f::<half::bf16>($($a),*),
            DType::F16 => $f::<half::f16>($($a),*),
            d => Err(err(format!("ferrite cuda kernels: unsupported dtype {d:?}"))),
        }
    };
}

/// The contiguous data of a CUDA storage as a view of `T`.
fn view<'a, T: CudaDType + DeviceRepr>(s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, T>> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| err("ferrite cuda kernel: input not contiguous"))?;
    Ok(s.as_cuda_slice::<T>()?.slice(a..b))
}

/// `span` elements of a CUDA storage from its layout's first element (a strided view's extent).
fn strided<'a, T: CudaDType + DeviceRepr>(
    s: &'a CudaStorage,
    l: &Layout,
    span: usize,
) -> Result<CudaView<'a, T>> {
    let start = l.start_offset();
    Ok(s.as_cuda_slice::<T>()?.slice(start..start + span))
}

/// The elements between consecutive rows of a tensor read as `rows` rows of `n` elements, where
/// each row is contiguous and they are evenly spaced: n for a contiguous tensor, a wider row's
/// for a column slice `[rows, 1, n]` of a matrix (`narrow` of its last dimension). None for any
/// other layout.
fn row_stride(l: &Layout, rows: usize, n: usize) -> Option<usize> {
    if l.shape().elem_count() != rows * n {
        return None;
    }
    if l.is_contiguous() {
        return Some(n);
    }
    let (dims, strides) = (l.dims(), l.stride());
    let last = dims.len().checked_sub(1)?;
    let inner_ones = dims.get(1..last)?.iter().all(|&d| d == 1);
    (last > 0 && dims[0] == rows && dims[last] == n && strides[last] == 1 && inner_ones)
        .then_some(strides[0])
        .filter(|&row| row >= n)
}

fn as_cuda(s: &Storage) -> Result<&CudaStorage> {
    match s {
        Storage::Cuda(s) => Ok(s),
        _ => Err(err("ferrite cuda kernel: expected a CUDA tensor")),
    }
}

/// The CUDA storages and layouts behind `guards` (tensors' `storage_and_layout()`, which keep
/// them readable while views borrow them).
fn on_cuda<'a, G: std::ops::Deref<Target = Storage>, const N: usize>(
    guards: &'a [(G, &'a Layout); N],
) -> Result<[(&'a CudaStorage, &'a Layout); N]> {
    let parts = guards
        .iter()
        .map(|(s, l)| Ok((as_cuda(s)?, *l)))
        .collect::<Result<Vec<_>>>()?;
    parts
        .try_into()
        .map_err(|_| err("ferrite cuda kernel: storage count"))
}

fn wrap(s: CudaStorage, shape: impl Into<Shape>) -> Tensor {
    Tensor::from_storage(Storage::Cuda(s), shape, BackpropOp::none(), false)
}

/// The cudarc launch of a [`launch::Geometry`].
fn config(g: launch::Geometry) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (g.grid, 1, 1),
        block_dim: (g.block, 1, 1),
        shared_mem_bytes: g.shared_bytes,
    }
}

// ---------------------------------------------------------------- checked launches

/// An element type of the kernels' buffers, as [`signatures`] names it.
trait KernelElem {
    const ELEM: Elem;
}
impl KernelElem for f32 {
    const ELEM: Elem = Elem::F32;
}
impl KernelElem for half::bf16 {
    const ELEM: Elem = Elem::Bf16;
}
impl KernelElem for half::f16 {
    const ELEM: Elem = Elem::F16;
}
impl KernelElem for u32 {
    const ELEM: Elem = Elem::U32;
}
impl KernelElem for u64 {
    const ELEM: Elem = Elem::U64;
}

/// The kernels' float types, f32, bf16 and f16: their `_f32`, `_bf16` and `_f16` variants.
trait Float: CudaDType + DeviceRepr + WithDType + KernelElem {}
impl Float for f32 {}
impl Float for half::bf16 {}
impl Float for half::f16 {}

/// A launch argument: what it is, for the signature check, and how cudarc passes it.
trait KernelArg {
    fn kind(&self) -> Arg;
    fn push<'a>(&'a self, l: &mut LaunchArgs<'a>);
}

/// `KernelArg` for a type (with its generics in brackets) that cudarc passes as it is.
macro_rules! kernel_arg {
    ([$($generics:tt)*] $t:ty => $kind:expr) => {
        impl<$($generics)*> KernelArg for $t {
            fn kind(&self) -> Arg {
                $kind
            }
            fn push<'a>(&'a self, l: &mut LaunchArgs<'a>) {
                l.arg(self);
            }
        }
    };
}
kernel_arg!([T: KernelElem] CudaSlice<T> => Arg::Buffer { elem: T::ELEM, writable: true });
kernel_arg!(['v, T: KernelElem] CudaView<'v, T> => Arg::Buffer { elem: T::ELEM, writable: false });
kernel_arg!([] i32 => Arg::Int);
kernel_arg!([] f32 => Arg::Float);
kernel_arg!([] usize => Arg::Size);
// a raw device address: a destination inside another tensor's buffer
kernel_arg!([] u64 => Arg::Address);

/// A launch of one kernel of `ferrite.cu`, its arguments checked against the kernel's C
/// signature ([`signatures::check`]) before it runs: a missing, swapped or mistyped argument, or
/// a read-only view where the kernel writes, is an error naming the kernel and the parameter,
/// not a kernel reading garbage.
static LAUNCHES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many of ferrite's own kernels this process has launched (candle's ops and cuBLAS not
/// counted): `gpu-check` counts a decode step's launches with it.
pub fn kernel_launches() -> u64 {
    LAUNCHES.load(std::sync::atomic::Ordering::Relaxed)
}

struct Launch<'a> {
    kernel: String,
    func: CudaFunction,
    stream: std::sync::Arc<CudaStream>,
    args: Vec<&'a dyn KernelArg>,
}

impl<'a> Launch<'a> {
    /// Loads `kernel` (the module once per device).
    fn new(dev: &CudaDevice, kernel: &str) -> Result<Self> {
        Ok(Launch {
            kernel: kernel.to_string(),
            func: dev
                .get_or_load_custom_func(kernel, MODULE, PTX)?
                .into_cuda_function(),
            stream: dev.cuda_stream(),
            args: Vec::new(),
        })
    }

    fn arg(&mut self, x: &'a dyn KernelArg) -> &mut Self {
        self.args.push(x);
        self
    }

    /// # Safety
    /// The kernel must stay within its buffers for these arguments and this geometry, as each
    /// launcher's SAFETY note argues: the check covers the arguments' types, not their sizes.
    unsafe fn launch(&self, g: launch::Geometry) -> Result<()> {
        LAUNCHES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let kinds: Vec<Arg> = self.args.iter().map(|a| a.kind()).collect();
        signatures::check(&self.kernel, &kinds).map_err(err)?;
        let mut l = self.stream.launch_builder(&self.func);
        for a in &self.args {
            a.push(&mut l);
        }
        // SAFETY: the caller's.
        unsafe { l.launch(config(g)) }.w()?;
        Ok(())
    }
}

fn rows_of(l: &Layout) -> (usize, usize) {
    let n = l.dims().last().copied().unwrap_or(1).max(1);
    (l.shape().elem_count() / n, n)
}

// ---------------------------------------------------------------- rows

/// Rows `ids [N]` (u32) of `x [M, H]` → `[N, H]`; a row of NaN for an id ≥ M.
pub fn gather_rows(
    x: &CudaStorage,
    xl: &Layout,
    ids: &CudaStorage,
    il: &Layout,
) -> Result<CudaStorage> {
    rows_kernel("gather_rows", x, xl, ids, il, None)
}

/// `x [N, H]` written to rows `ids [N]` (distinct) of `m` zero rows → `[m, H]`; ids ≥ m skipped.
pub fn scatter_rows(
    x: &CudaStorage,
    xl: &Layout,
    ids: &CudaStorage,
    il: &Layout,
    m: usize,
) -> Result<CudaStorage> {
    rows_kernel("scatter_rows", x, xl, ids, il, Some(m))
}

/// `gather_rows` (`scatter_into` None: M is x's rows) or `scatter_rows` into `m` zero rows.
fn rows_kernel(
    name: &str,
    x: &CudaStorage,
    xl: &Layout,
    ids: &CudaStorage,
    il: &Layout,
    scatter_into: Option<usize>,
) -> Result<CudaStorage> {
    fn go<T: Float + ValidAsZeroBits>(
        name: &str,
        x: &CudaStorage,
        xl: &Layout,
        ids: &CudaStorage,
        il: &Layout,
        scatter_into: Option<usize>,
    ) -> Result<CudaStorage> {
        let dev = x.device().clone();
        let (rows, h) = rows_of(xl);
        let n = il.shape().elem_count();
        if scatter_into.is_some() && rows != n {
            return Err(err(format!("scatter_rows: {rows} rows for {n} ids")));
        }
        let (xv, iv) = (view::<T>(x, xl)?, view::<u32>(ids, il)?);
        let (m, y) = match scatter_into {
            None => (rows, unsafe { dev.alloc::<T>(n * h)? }),
            Some(m) => (m, dev.alloc_zeros::<T>(m * h)?),
        };
        let (h32, m32, elems) = (h as i32, m as i32, n * h);
        let mut b = Launch::new(&dev, &kernel::<T>(name)?)?;
        b.arg(&xv).arg(&iv).arg(&y).arg(&h32).arg(&m32).arg(&elems);
        // SAFETY: n ids; the kernel reads (gather) or writes (scatter) only rows below m of the
        // m·h side, and n·h elements of the other.
        unsafe { b.launch(launch::elems(elems)) }?;
        Ok(T::wrap_cuda_slice(y, dev))
    }
    by_dtype!(x.dtype(), go(name, x, xl, ids, il, scatter_into))
}

/// The embedding table's gradient `[V, H]` in `dtype` from the upstream `g [N, H]` and the
/// step's `table` of `u` distinct tokens (`ops::token_segments`): zeros but for the tokens'
/// rows, each the f32 sum of its positions' rows of `g`.
pub fn embedding_bwd(
    g: &Tensor,
    table: &[u32],
    u: usize,
    v: usize,
    dtype: DType,
) -> Result<Tensor> {
    fn go<T: Float + ValidAsZeroBits>(
        g: &Tensor,
        table: &[u32],
        u: usize,
        v: usize,
    ) -> Result<Tensor> {
        let g = g.contiguous()?.to_dtype(T::DTYPE)?;
        let (n, h) = g.dims2()?;
        // what the kernel's reads rely on, checked on the host (the table is a few kB)
        let fits = table.len() > 2 * u && {
            let (tokens, rest) = table.split_at(u);
            let (starts, order) = rest.split_at(u + 1);
            tokens.iter().all(|&t| (t as usize) < v)
                && starts.windows(2).all(|s| s[0] <= s[1])
                && starts.last() == Some(&(order.len() as u32))
                && order.iter().all(|&p| (p as usize) < n)
        };
        if !fits {
            return Err(err(
                "embedding_bwd: the token table does not fit the gradient",
            ));
        }
        let (gs, gl) = g.storage_and_layout();
        let gs = as_cuda(&gs)?;
        let dev = gs.device().clone();
        let gv = view::<T>(gs, gl)?;
        let dw = dev.alloc_zeros::<T>(v * h)?;
        if u > 0 {
            // pieces of each token's segment (from the checked starts), in one upload with the
            // table: table | pieces | merges
            let starts = &table[u..2 * u + 1];
            let (pieces, merges, slots) = launch::embedding_pieces(starts, launch::EMBEDDING_PIECE);
            let all: Vec<u32> = [table, &pieces, &merges].concat();
            let all = dev.cuda_stream().clone_htod(&all).w()?;
            let (a, b) = (table.len(), table.len() + pieces.len());
            let (tv, pv, mv) = (all.slice(..a), all.slice(a..b), all.slice(b..));
            let scratch = unsafe { dev.alloc::<f32>((slots * h).max(1))? };
            let (n_pieces, n_merges) = (pieces.len() / 4, merges.len() / 3);
            let (u32_, pieces32, h32) = (u as i32, n_pieces as i32, h as i32);
            let mut l = Launch::new(&dev, &kernel::<T>("embedding_bwd")?)?;
            l.arg(&gv)
                .arg(&tv)
                .arg(&pv)
                .arg(&dw)
                .arg(&scratch)
                .arg(&u32_)
                .arg(&pieces32)
                .arg(&h32);
            // SAFETY: checked above: tokens < v, segments within the positions, positions < n;
            // each piece lies in its token's segment and writes its token's row of dw (v·h) or
            // its own scratch row (slots·h); reads the positions' rows of g (n·h).
            unsafe { l.launch(launch::embedding_bwd(n_pieces, h)) }?;
            if n_merges > 0 {
                let merges32 = n_merges as i32;
                let mut l = Launch::new(&dev, &kernel::<T>("embedding_merge")?)?;
                l.arg(&tv)
                    .arg(&mv)
                    .arg(&scratch)
                    .arg(&dw)
                    .arg(&merges32)
                    .arg(&h32);
                // SAFETY: each merge reads its token's slots, all written above (slots·h), and
                // writes its token's row of dw.
                unsafe { l.launch(launch::embedding_bwd(n_merges, h)) }?;
            }
        }
        Ok(wrap(T::wrap_cuda_slice(dw, dev), (v, h)))
    }
    by_dtype!(dtype, go(g, table, u, v))
}

// ---------------------------------------------------------------- bias add

/// `x [N, out] + b [out]`, broadcast over the rows.
pub fn bias_add(x: &CudaStorage, xl: &Layout, b: &CudaStorage, bl: &Layout) -> Result<CudaStorage> {
    fn go<T: Float>(
        x: &CudaStorage,
        xl: &Layout,
        b: &CudaStorage,
        bl: &Layout,
    ) -> Result<CudaStorage> {
        let dev = x.device().clone();
        let (_, out) = rows_of(xl);
        let n = xl.shape().elem_count();
        if bl.shape().elem_count() != out {
            return Err(err("bias_add: the bias must have the rows' width"));
        }
        let (xv, bv) = (view::<T>(x, xl)?, view::<T>(b, bl)?);
        let y = unsafe { dev.alloc::<T>(n)? };
        let out32 = out as i32;
        let mut l = Launch::new(&dev, &kernel::<T>("bias_add")?)?;
        l.arg(&xv).arg(&bv).arg(&y).arg(&out32).arg(&n);
        // SAFETY: n elements of x and y, `out` of b (checked above).
        unsafe { l.launch(launch::elems(n)) }?;
        Ok(T::wrap_cuda_slice(y, dev))
    }
    by_dtype!(x.dtype(), go(x, xl, b, bl))
}

// ---------------------------------------------------------------- attention bias

/// A batch's attention bias `[B, 1, 1, T, S]` f32 built on `dev` from `valid` (`[B, S]`, 1 where
/// a key slot holds a token): 0 where query row `i` (slot `q_offset + i`) sees slot `j`
/// (`j ≤ q_offset + i`, valid), `masked` elsewhere.
pub fn attention_bias(
    valid: &[u32],
    b: usize,
    t: usize,
    s: usize,
    q_offset: usize,
    masked: f32,
    dev: &CudaDevice,
) -> Result<Tensor> {
    if valid.len() != b * s {
        return Err(err("attention_bias: valid must hold B·S flags"));
    }
    let n = b * t * s;
    let valid = dev.clone_htod(valid)?;
    let bias = unsafe { dev.alloc::<f32>(n)? };
    let (t32, s32, offset32) = (t as i32, s as i32, q_offset as i32);
    let mut l = Launch::new(dev, "attention_bias_f32")?;
    l.arg(&valid).arg(&bias).arg(&t32).arg(&s32).arg(&offset32);
    l.arg(&masked).arg(&n);
    // SAFETY: bias holds B·T·S elements, valid B·S (checked above).
    unsafe { l.launch(launch::elems(n)) }?;
    Ok(wrap(
        f32::wrap_cuda_slice(bias, dev.clone()),
        (b, 1, 1, t, s),
    ))
}

/// A decode step's bias `[B, 1, 1, 1, S]` from each row's first slot `start [B]`.
pub fn decode_bias(start: &[u32], s: usize, masked: f32, dev: &CudaDevice) -> Result<Tensor> {
    let b = start.len();
    let n = b * s;
    let start = dev.clone_htod(start)?;
    let bias = unsafe { dev.alloc::<f32>(n)? };
    let s32 = s as i32;
    let mut l = Launch::new(dev, "decode_bias_f32")?;
    l.arg(&start).arg(&bias).arg(&s32).arg(&masked).arg(&n);
    // SAFETY: bias holds B·S elements, start B.
    unsafe { l.launch(launch::elems(n)) }?;
    Ok(wrap(
        f32::wrap_cuda_slice(bias, dev.clone()),
        (b, 1, 1, 1, s),
    ))
}

// ---------------------------------------------------------------- RMSNorm

pub fn rms_norm_fwd(
    x: &CudaStorage,
    xl: &Layout,
    w: &CudaStorage,
    wl: &Layout,
    eps: f32,
) -> Result<CudaStorage> {
    fn go<T: Float>(
        x: &CudaStorage,
        xl: &Layout,
        w: &CudaStorage,
        wl: &Layout,
        eps: f32,
    ) -> Result<CudaStorage> {
        let dev = x.device().clone();
        let (rows, h) = rows_of(xl);
        let (xv, wv) = (view::<T>(x, xl)?, view::<T>(w, wl)?);
        let y = unsafe { dev.alloc::<T>(rows * h)? };
        let h32 = h as i32;
        let mut b = Launch::new(&dev, &kernel::<T>("rms_norm_fwd")?)?;
        b.arg(&xv).arg(&wv).arg(&y).arg(&h32).arg(&eps);
        // SAFETY: the kernel reads rows·h inputs and h weights and writes rows·h outputs.
        unsafe { b.launch(launch::rows(rows, h)) }?;
        Ok(T::wrap_cuda_slice(y, dev))
    }
    by_dtype!(x.dtype(), go(x, xl, w, wl, eps))
}

/// `(dx, dw)` of RMSNorm; `dw` is summed in f32, in the same order every run, and returned in
/// `w`'s dtype.
pub fn rms_norm_bwd(x: &Tensor, w: &Tensor, g: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
    fn go<T: Float>(x: &Tensor, w: &Tensor, g: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
        let (x, w, g) = (
            x.contiguous()?,
            w.contiguous()?,
            g.contiguous()?.to_dtype(T::DTYPE)?,
        );
        let guards = [&x, &w, &g].map(|t| t.storage_and_layout());
        let [(xs, xl), (ws, wl), (gs, gl)] = on_cuda(&guards)?;
        let dev = xs.device().clone();
        let (rows, h) = rows_of(xl);
        let geometry = launch::rms_norm_bwd(rows, h).ok_or_else(|| {
            err(format!(
                "rms_norm_bwd: hidden size {h} exceeds the shared-memory budget"
            ))
        })?;
        let (xv, wv, gv) = (view::<T>(xs, xl)?, view::<T>(ws, wl)?, view::<T>(gs, gl)?);
        let dx = unsafe { dev.alloc::<T>(rows * h)? };
        let blocks = geometry.grid as usize;
        let dw_blocks = unsafe { dev.alloc::<f32>(blocks * h)? };
        let (rows32, h32) = (rows as i32, h as i32);
        let mut b = Launch::new(&dev, &kernel::<T>("rms_norm_bwd")?)?;
        b.arg(&xv)
            .arg(&wv)
            .arg(&gv)
            .arg(&dx)
            .arg(&dw_blocks)
            .arg(&rows32)
            .arg(&h32)
            .arg(&eps);
        // SAFETY: reads rows·h of x and g, h of w; writes rows·h of dx and each block's h of
        // dw_blocks.
        unsafe { b.launch(geometry) }?;
        let dx = wrap(T::wrap_cuda_slice(dx, dev.clone()), x.shape());
        // the blocks' shares summed in a fixed order, so that a step's dw is the same bits from
        // run to run
        let dw = unsafe { dev.alloc::<f32>(h)? };
        let blocks32 = blocks as i32;
        let mut b = Launch::new(&dev, "column_sum_f32")?;
        b.arg(&dw_blocks).arg(&dw).arg(&blocks32).arg(&h32);
        // SAFETY: reads blocks·h f32 of dw_blocks, all written above; writes h of dw.
        unsafe { b.launch(launch::column_sum(h)) }?;
        let dw = wrap(f32::wrap_cuda_slice(dw, dev), w.shape());
        Ok((dx, dw.to_dtype(w.dtype())?))
    }
    by_dtype!(x.dtype(), go(x, w, g, eps))
}

/// `(x + res, RMSNorm(x + res)·w)` in one launch, for a forward that takes no gradient: both
/// bit-identical to the add and `rms_norm_fwd` it replaces (`ferrite.cu`).
pub fn add_rms_norm(x: &Tensor, res: &Tensor, w: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
    fn go<T: Float>(x: &Tensor, res: &Tensor, w: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
        let (x, res, w) = (x.contiguous()?, res.contiguous()?, w.contiguous()?);
        let guards = [&x, &res, &w].map(|t| t.storage_and_layout());
        let [(xs, xl), (rs, rl), (ws, wl)] = on_cuda(&guards)?;
        let dev = xs.device().clone();
        let (rows, h) = rows_of(xl);
        let (xv, rv, wv) = (view::<T>(xs, xl)?, view::<T>(rs, rl)?, view::<T>(ws, wl)?);
        let sum = unsafe { dev.alloc::<T>(rows * h)? };
        let y = unsafe { dev.alloc::<T>(rows * h)? };
        let h32 = h as i32;
        let mut b = Launch::new(&dev, &kernel::<T>("add_rms_norm")?)?;
        b.arg(&xv)
            .arg(&rv)
            .arg(&wv)
            .arg(&sum)
            .arg(&y)
            .arg(&h32)
            .arg(&eps);
        // SAFETY: reads rows·h of x and res and h of w; writes rows·h of sum and of y.
        unsafe { b.launch(launch::rows(rows, h)) }?;
        let sum = wrap(T::wrap_cuda_slice(sum, dev.clone()), x.shape());
        let y = wrap(T::wrap_cuda_slice(y, dev), x.shape());
        Ok((sum, y))
    }
    if x.shape() != res.shape() || w.dims() != [x.dim(candle_core::D::Minus1)?] {
        return Err(err(format!(
            "add_rms_norm: x {:?}, res {:?}, w {:?}",
            x.shape(),
            res.shape(),
            w.shape()
        )));
    }
    by_dtype!(x.dtype(), go(x, res, w, eps))
}

// ---------------------------------------------------------------- SwiGLU

pub fn swiglu_fwd(
    a: &CudaStorage,
    al: &Layout,
    b: &CudaStorage,
    bl: &Layout,
) -> Result<CudaStorage> {
    fn go<T: Float>(
        a: &CudaStorage,
        al: &Layout,
        b: &CudaStorage,
        bl: &Layout,
    ) -> Result<CudaStorage> {
        let dev = a.device().clone();
        let n = al.shape().elem_count();
        let (av, bv) = (view::<T>(a, al)?, view::<T>(b, bl)?);
        let y = unsafe { dev.alloc::<T>(n)? };
        let mut l = Launch::new(&dev, &kernel::<T>("swiglu_fwd")?)?;
        l.arg(&av).arg(&bv).arg(&y).arg(&n);
        // SAFETY: n elements in, n out.
        unsafe { l.launch(launch::elems(n)) }?;
        Ok(T::wrap_cuda_slice(y, dev))
    }
    by_dtype!(a.dtype(), go(a, al, b, bl))
}

/// `gu [rows, 2n]` (contiguous) → `silu(gu[:, :n]) · gu[:, n:]` `[rows, n]`, forward only.
pub fn swiglu_packed(s: &CudaStorage, l: &Layout) -> Result<CudaStorage> {
    fn go<T: Float>(s: &CudaStorage, l: &Layout) -> Result<CudaStorage> {
        let dev = s.device().clone();
        let (rows, two_n) = rows_of(l);
        let (n, count) = (two_n / 2, rows * (two_n / 2));
        let gu = view::<T>(s, l)?;
        let y = unsafe { dev.alloc::<T>(count)? };
        let n32 = n as i32;
        let mut b = Launch::new(&dev, &kernel::<T>("swiglu_packed_fwd")?)?;
        b.arg(&gu).arg(&y).arg(&n32).arg(&count);
        // SAFETY: rows·2n elements in, rows·n out.
        unsafe { b.launch(launch::elems(count)) }?;
        Ok(T::wrap_cuda_slice(y, dev))
    }
    by_dtype!(s.dtype(), go(s, l))
}

pub fn swiglu_bwd(a: &Tensor, b: &Tensor, g: &Tensor) -> Result<(Tensor, Tensor)> {
    fn go<T: Float>(a: &Tensor, b: &Tensor, g: &Tensor) -> Result<(Tensor, Tensor)> {
        let (a, b, g) = (
            a.contiguous()?,
            b.contiguous()?,
            g.contiguous()?.to_dtype(T::DTYPE)?,
        );
        let guards = [&a, &b, &g].map(|t| t.storage_and_layout());
        let [(as_, al), (bs, bl), (gs, gl)] = on_cuda(&guards)?;
        let dev = as_.device().clone();
        let n = al.shape().elem_count();
        let (av, bv, gv) = (view::<T>(as_, al)?, view::<T>(bs, bl)?, view::<T>(gs, gl)?);
        let dab = unsafe { dev.alloc::<T>(2 * n)? };
        let mut l = Launch::new(&dev, &kernel::<T>("swiglu_bwd")?)?;
        l.arg(&av).arg(&bv).arg(&gv).arg(&dab).arg(&n);
        // SAFETY: n elements of each input; 2n outputs.
        unsafe { l.launch(launch::elems(n)) }?;
        let both = wrap(T::wrap_cuda_slice(dab, dev), (2, n));
        Ok((
            both.narrow(0, 0, 1)?.reshape(a.shape())?,
            both.narrow(0, 1, 1)?.reshape(b.shape())?,
        ))
    }
    by_dtype!(a.dtype(), go(a, b, g))
}

// ---------------------------------------------------------------- RoPE

/// Where a rope launch reads `x` and writes `y`, both `[B, H, T, D]` with D contiguous: their
/// element strides of b, h and t, and the elements `x` spans from its layout's first element.
struct RopeOrder {
    dims: [usize; 4],
    x: [usize; 3],
    x_span: usize,
    y: [usize; 3],
}

impl RopeOrder {
    /// Strides `[H·T·D, T·D, D]`: a contiguous `[B, H, T, D]` tensor.
    fn head_major([_, h, t, d]: [usize; 4]) -> [usize; 3] {
        [h * t * d, t * d, d]
    }

    /// Strides `[T·H·D, D, H·D]`: the rows of a contiguous `[B, T, H·D]` projection.
    fn token_major([_, h, t, d]: [usize; 4]) -> [usize; 3] {
        [t * h * d, d, h * d]
    }
}

/// `y = rope(x)`, or its adjoint where `transpose` (the backward), in a fresh buffer, each read
/// and written as `order` says; `cos, sin [B, 1, T, D]` contiguous.
#[allow(clippy::too_many_arguments)]
fn rope_launch(
    x: &CudaStorage,
    xl: &Layout,
    c: &CudaStorage,
    cl: &Layout,
    s: &CudaStorage,
    sl: &Layout,
    transpose: bool,
    order: RopeOrder,
) -> Result<CudaStorage> {
    #[allow(clippy::too_many_arguments)]
    fn go<T: Float>(
        x: &CudaStorage,
        xl: &Layout,
        c: &CudaStorage,
        cl: &Layout,
        s: &CudaStorage,
        sl: &Layout,
        transpose: bool,
        order: &RopeOrder,
    ) -> Result<CudaStorage> {
        let dev = x.device().clone();
        let [b, h, t, d] = order.dims;
        let n = b * h * t * d;
        let pairs = n / 2;
        if cl.shape().elem_count() != b * t * d || sl.shape().elem_count() != b * t * d {
            return Err(err("rope: cos and sin must be [B, 1, T, D]"));
        }
        let xv = strided::<T>(x, xl, order.x_span)?;
        let (cv, sv) = (view::<T>(c, cl)?, view::<T>(s, sl)?);
        let y = unsafe { dev.alloc::<T>(n)? };
        let (h32, t32, d32, tr) = (h as i32, t as i32, d as i32, i32::from(transpose));
        let mut l = Launch::new(&dev, &kernel::<T>("rope")?)?;
        l.arg(&xv)
            .arg(&cv)
            .arg(&sv)
            .arg(&y)
            .arg(&h32)
            .arg(&t32)
            .arg(&d32)
            .arg(&pairs)
            .arg(&tr);
        for stride in order.x.iter().chain(&order.y) {
            l.arg(stride);
        }
        // SAFETY: x is read within its span; y's strides are one of RopeOrder's two orders of
        // B·H·T·D elements, each written once; cos / sin hold B·T·D (checked above).
        unsafe { l.launch(launch::elems(pairs)) }?;
        Ok(T::wrap_cuda_slice(y, dev))
    }
    if c.dtype() != x.dtype() || s.dtype() != x.dtype() {
        return Err(err("rope: cos and sin must have x's dtype"));
    }
    by_dtype!(x.dtype(), go(x, xl, c, cl, s, sl, transpose, &order))
}

/// `x [B, H, T, D]` contiguous, `cos, sin [B, 1, T, D]` → `[B, H, T, D]`.
pub fn rope(
    x: &CudaStorage,
    xl: &Layout,
    c: &CudaStorage,
    cl: &Layout,
    s: &CudaStorage,
    sl: &Layout,
) -> Result<CudaStorage> {
    let dims: [usize; 4] = xl
        .dims()
        .try_into()
        .map_err(|_| err("rope: x must be [B, H, T, D]"))?;
    if !xl.is_contiguous() {
        return Err(err("rope: x must be contiguous"));
    }
    let contiguous = RopeOrder::head_major(dims);
    let order = RopeOrder {
        dims,
        x: contiguous,
        x_span: xl.shape().elem_count(),
        y: contiguous,
    };
    rope_launch(x, xl, c, cl, s, sl, false, order)
}

/// [`rope`]'s backward: `g [B, H, T, D]` → `dx [B, H, T, D]`.
pub fn rope_bwd(g: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    rope_adjoint(g, cos, sin, false)
}

/// A projection's rows `y [B, T, H·D]` (each row contiguous, at any row stride: a narrow of a
/// packed q/k/v projection too) split into heads and rotated in one pass, `[B, H, T, D]`
/// contiguous out: the transpose's copy and the rotation's pass in one.
pub fn rope_heads(
    y: &CudaStorage,
    yl: &Layout,
    heads: usize,
    c: &CudaStorage,
    cl: &Layout,
    s: &CudaStorage,
    sl: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let (b, t, hd) = yl
        .shape()
        .dims3()
        .map_err(|_| err("rope_heads: y must be [B, T, H·D]"))?;
    let st = yl.stride();
    if heads == 0 || hd % heads != 0 || (st[2] != 1 && hd > 1) {
        return Err(err("rope_heads: y's rows must be contiguous, H·D of them"));
    }
    let dims = [b, heads, t, hd / heads];
    let x = [st[0], dims[3], st[1]];
    let x_span = match b * t {
        0 => 0,
        _ => (b - 1) * st[0] + (t - 1) * st[1] + hd,
    };
    let order = RopeOrder {
        dims,
        x,
        x_span,
        y: RopeOrder::head_major(dims),
    };
    let out = rope_launch(y, yl, c, cl, s, sl, false, order)?;
    Ok((out, Shape::from(dims.to_vec())))
}

/// [`rope_heads`]'s backward: `g [B, H, T, D]` → `dy [B, T, H·D]`, written in the projection's
/// order (no transpose's copy).
pub fn rope_heads_bwd(g: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    rope_adjoint(g, cos, sin, true)
}

/// The rotation's adjoint of `g [B, H, T, D]`, written head-major (`[B, H, T, D]`) or, where
/// `token_major`, in a projection's order (`[B, T, H·D]`).
fn rope_adjoint(g: &Tensor, cos: &Tensor, sin: &Tensor, token_major: bool) -> Result<Tensor> {
    let (g, cos, sin) = (g.contiguous()?, cos.contiguous()?, sin.contiguous()?);
    let (b, h, t, d) = g.dims4()?;
    let dims = [b, h, t, d];
    let guards = [&g, &cos, &sin].map(|t| t.storage_and_layout());
    let [(gs, gl), (cs, cl), (ss, sl)] = on_cuda(&guards)?;
    let order = RopeOrder {
        dims,
        x: RopeOrder::head_major(dims),
        x_span: g.elem_count(),
        y: match token_major {
            true => RopeOrder::token_major(dims),
            false => RopeOrder::head_major(dims),
        },
    };
    let out = rope_launch(gs, gl, cs, cl, ss, sl, true, order)?;
    Ok(match token_major {
        true => wrap(out, (b, t, h * d)),
        false => wrap(out, (b, h, t, d)),
    })
}

// ---------------------------------------------------------------- softmax

/// `softmax(scale·x + bias)` in `O` for scores `x [B, Hkv, G, T, S]` of `T` and `bias [B, 1, 1, T, S]`
/// f32: `masked_softmax_fwd_<t>` (f32 out) or `masked_softmax_fwd_bf16_bf16`.
fn masked_softmax_as<T, O>(
    x: &CudaStorage,
    xl: &Layout,
    bias: &CudaStorage,
    bl: &Layout,
    scale: f32,
) -> Result<CudaStorage>
where
    T: Float,
    O: Float,
{
    if bias.dtype() != DType::F32 {
        return Err(err("masked_softmax: the bias must be f32"));
    }
    let name = match (T::DTYPE, O::DTYPE) {
        (_, DType::F32) => kernel::<T>("masked_softmax_fwd")?,
        (t, o) if t == o => kernel::<T>("masked_softmax_fwd")? + &kernel::<T>("")?,
        (t, o) => return Err(err(format!("masked_softmax: no {t:?} → {o:?} kernel"))),
    };
    let dev = x.device().clone();
    let (heads, t, s) = score_dims(xl);
    let (rows, _) = rows_of(xl);
    let (xv, bv) = (view::<T>(x, xl)?, view::<f32>(bias, bl)?);
    let y = unsafe { dev.alloc::<O>(rows * s)? };
    let s32 = s as i32;
    let mut l = Launch::new(&dev, &name)?;
    l.arg(&xv)
        .arg(&bv)
        .arg(&y)
        .arg(&heads)
        .arg(&t)
        .arg(&s32)
        .arg(&scale);
    // SAFETY: rows·S scores and outputs; the bias holds B·T·S.
    unsafe { l.launch(launch::rows(rows, s)) }?;
    Ok(O::wrap_cuda_slice(y, dev))
}

/// `(heads, t, s)` of attention scores `[B, Hkv, G, T, S]`, as the row kernels index them.
fn score_dims(l: &Layout) -> (i32, i32, usize) {
    let d = l.dims();
    ((d[1] * d[2]) as i32, d[3] as i32, d[4])
}

/// `softmax(scale·x + bias)` in f32 for `x [B, Hkv, G, T, S]` (f32 or bf16), `bias [B, 1, 1, T, S]` f32.
pub fn masked_softmax_fwd(
    x: &CudaStorage,
    xl: &Layout,
    bias: &CudaStorage,
    bl: &Layout,
    scale: f32,
) -> Result<CudaStorage> {
    match x.dtype() {
        DType::F32 => masked_softmax_as::<f32, f32>(x, xl, bias, bl, scale),
        DType::BF16 => masked_softmax_as::<half::bf16, f32>(x, xl, bias, bl, scale),
        DType::F16 => masked_softmax_as::<half::f16, f32>(x, xl, bias, bl, scale),
        d => Err(err(format!("masked_softmax: unsupported dtype {d:?}"))),
    }
}

pub fn softmax_fwd(x: &CudaStorage, xl: &Layout) -> Result<CudaStorage> {
    fn go<T: Float>(x: &CudaStorage, xl: &Layout) -> Result<CudaStorage> {
        let dev = x.device().clone();
        let (rows, n) = rows_of(xl);
        let xv = view::<T>(x, xl)?;
        let y = unsafe { dev.alloc::<T>(rows * n)? };
        let n32 = n as i32;
        let mut l = Launch::new(&dev, &kernel::<T>("softmax_fwd")?)?;
        l.arg(&xv).arg(&y).arg(&n32);
        // SAFETY: rows·n in and out.
        unsafe { l.launch(launch::rows(rows, n)) }?;
        Ok(T::wrap_cuda_slice(y, dev))
    }
    by_dtype!(x.dtype(), go(x, xl))
}

/// `scale · y ∘ (g − Σ y∘g)` per row, in `y`'s dtype.
pub fn softmax_bwd(y: &Tensor, g: &Tensor, scale: f32) -> Result<Tensor> {
    fn go<T: Float>(y: &Tensor, g: &Tensor, scale: f32) -> Result<Tensor> {
        let (y, g) = (y.contiguous()?, g.contiguous()?.to_dtype(T::DTYPE)?);
        let guards = [&y, &g].map(|t| t.storage_and_layout());
        let [(ys, yl), (gs, gl)] = on_cuda(&guards)?;
        let dev = ys.device().clone();
        let (rows, n) = rows_of(yl);
        let (yv, gv) = (view::<T>(ys, yl)?, view::<T>(gs, gl)?);
        let dx = unsafe { dev.alloc::<T>(rows * n)? };
        let n32 = n as i32;
        let mut l = Launch::new(&dev, &kernel::<T>("softmax_bwd")?)?;
        l.arg(&yv).arg(&gv).arg(&dx).arg(&n32).arg(&scale);
        // SAFETY: rows·n of each.
        unsafe { l.launch(launch::rows(rows, n)) }?;
        Ok(wrap(T::wrap_cuda_slice(dx, dev), y.shape()))
    }
    by_dtype!(y.dtype(), go(y, g, scale))
}

// ---------------------------------------------------------------- chunked attention

/// `softmax(scale·x + bias)` in `x`'s dtype for scores `x [B, Hkv, G, T, S]` (f32, bf16, f16) and
/// `bias [B, 1, 1, T, S]` f32, outside autograd.
pub fn attention_probs(x: &Tensor, bias: &Tensor, scale: f32) -> Result<Tensor> {
    let (x, bias) = (x.contiguous()?, bias.contiguous()?);
    let guards = [&x, &bias].map(|t| t.storage_and_layout());
    let [(xs, xl), (bs, bl)] = on_cuda(&guards)?;
    let y = match x.dtype() {
        DType::F32 => masked_softmax_as::<f32, f32>(xs, xl, bs, bl, scale)?,
        DType::BF16 => masked_softmax_as::<half::bf16, half::bf16>(xs, xl, bs, bl, scale)?,
        DType::F16 => masked_softmax_as::<half::f16, half::f16>(xs, xl, bs, bl, scale)?,
        d => return Err(err(format!("attention_probs: unsupported dtype {d:?}"))),
    };
    Ok(wrap(y, x.shape()))
}

/// `(p, ds)` in `x`'s dtype from scores `x`, `bias` and `dp` (`x`'s shape and dtype):
/// `p = softmax(scale·x + bias)`, `ds = scale·p∘(dp − Σ p∘dp)`, outside autograd.
pub fn attention_probs_bwd(
    x: &Tensor,
    bias: &Tensor,
    dp: &Tensor,
    scale: f32,
) -> Result<(Tensor, Tensor)> {
    fn go<T: Float>(
        x: &Tensor,
        bias: &Tensor,
        dp: &Tensor,
        scale: f32,
    ) -> Result<(Tensor, Tensor)> {
        let (x, bias, dp) = (x.contiguous()?, bias.contiguous()?, dp.contiguous()?);
        let guards = [&x, &bias, &dp].map(|t| t.storage_and_layout());
        let [(xs, xl), (bs, bl), (ds_, dl)] = on_cuda(&guards)?;
        let dev = xs.device().clone();
        let (heads, t, s) = score_dims(xl);
        let (rows, _) = rows_of(xl);
        let (xv, bv, dv) = (
            view::<T>(xs, xl)?,
            view::<f32>(bs, bl)?,
            view::<T>(ds_, dl)?,
        );
        let p = unsafe { dev.alloc::<T>(rows * s)? };
        let ds = unsafe { dev.alloc::<T>(rows * s)? };
        let s32 = s as i32;
        let mut l = Launch::new(&dev, &kernel::<T>("attention_probs_bwd")?)?;
        l.arg(&xv).arg(&bv).arg(&dv).arg(&p).arg(&ds);
        l.arg(&heads).arg(&t).arg(&s32).arg(&scale);
        // SAFETY: rows·S of x, dp, p and ds; the bias holds B·T·S.
        unsafe { l.launch(launch::rows(rows, s)) }?;
        Ok((
            wrap(T::wrap_cuda_slice(p, dev.clone()), x.shape()),
            wrap(T::wrap_cuda_slice(ds, dev), x.shape()),
        ))
    }
    by_dtype!(x.dtype(), go(x, bias, dp, scale))
}

// ---------------------------------------------------------------- log-probs and entropy

/// `[N, 2]` f32 (log-prob of the target, entropy) of logits `[N, V]` (f32 or bf16) at
/// temperature `1 / inv_t`, and u32 targets `[N]`.
pub fn logprob_entropy_fwd(
    z: &CudaStorage,
    zl: &Layout,
    t: &CudaStorage,
    tl: &Layout,
    inv_t: f32,
) -> Result<CudaStorage> {
    fn go<T: Float>(
        z: &CudaStorage,
        zl: &Layout,
        t: &CudaStorage,
        tl: &Layout,
        inv_t: f32,
    ) -> Result<CudaStorage> {
        let dev = z.device().clone();
        let (rows, v) = rows_of(zl);
        let (zv, tv) = (view::<T>(z, zl)?, view::<u32>(t, tl)?);
        let out = unsafe { dev.alloc::<f32>(3 * rows)? };
        let v32 = v as i32;
        let mut l = Launch::new(&dev, &kernel::<T>("logprob_entropy_fwd")?)?;
        l.arg(&zv).arg(&tv).arg(&out).arg(&v32).arg(&inv_t);
        // SAFETY: N·V logits, N targets (each < V, checked by the caller), 3N outputs.
        unsafe { l.launch(launch::rows(rows, v)) }?;
        Ok(f32::wrap_cuda_slice(out, dev))
    }
    by_dtype!(z.dtype(), go(z, zl, t, tl, inv_t))
}

/// `dz [N, V]` in the logits' dtype from logits `z` (f32 or bf16) at temperature `1 / inv_t`,
/// targets, the forward's `y [N, 3]` f32 (log-prob, entropy, log-partition) and the upstream
/// `g [N, 3]`, in one pass over the logits. `into`: rows `row..row + N` of a contiguous `[M, V]`
/// tensor of the logits' dtype that the kernel writes `dz` to in place (returned as a view).
pub fn logprob_entropy_bwd(
    z: &Tensor,
    targets: &Tensor,
    y: &Tensor,
    g: &Tensor,
    inv_t: f32,
    into: Option<(&Tensor, usize)>,
) -> Result<Tensor> {
    fn go<T: Float>(
        z: &Tensor,
        targets: &Tensor,
        y: &Tensor,
        g: &Tensor,
        inv_t: f32,
        into: Option<(&Tensor, usize)>,
    ) -> Result<Tensor> {
        let (z, targets) = (z.contiguous()?, targets.contiguous()?);
        let y = y.contiguous()?.to_dtype(DType::F32)?;
        let g = g.contiguous()?.to_dtype(DType::F32)?;
        let (rows, v) = z.dims2()?;
        if y.elem_count() != 3 * rows || g.elem_count() != 3 * rows || targets.elem_count() != rows
        {
            return Err(err(
                "logprob_entropy_bwd: y and g must be [N, 3], targets [N]",
            ));
        }
        let dev = cuda_device(&z)?;
        // the destination: a fresh buffer, or rows of `into` (checked to hold them)
        let fresh = match into {
            None => Some(unsafe { dev.alloc::<T>(rows * v)? }),
            Some((dst, row)) => {
                let fits = dst.is_contiguous()
                    && dst.dtype() == T::DTYPE
                    && dst.dims2().is_ok_and(|(m, w)| w == v && row + rows <= m);
                if !fits {
                    return Err(err("logprob_entropy_bwd: the destination cannot take dz"));
                }
                None
            }
        };
        let dst_at = match into {
            Some((dst, row)) => address::<T>(dst)? + (row * v * T::DTYPE.size_in_bytes()) as u64,
            None => 0,
        };
        let guards = [&z, &targets, &y, &g].map(|t| t.storage_and_layout());
        let [(zs, zl), (ts, tl), (ys, yl), (gs, gl)] = on_cuda(&guards)?;
        let (zv, tv) = (view::<T>(zs, zl)?, view::<u32>(ts, tl)?);
        let (yv, gv) = (view::<f32>(ys, yl)?, view::<f32>(gs, gl)?);
        let v32 = v as i32;
        let mut l = Launch::new(&dev, &kernel::<T>("logprob_entropy_bwd")?)?;
        l.arg(&zv).arg(&tv).arg(&yv).arg(&gv);
        match &fresh {
            Some(dz) => l.arg(dz),
            None => l.arg(&dst_at),
        };
        l.arg(&v32).arg(&inv_t);
        // SAFETY: N·V logits, N targets, 3N of y and g (checked above); N·V of dz written, to a
        // fresh buffer or to rows row..row + N of the destination (checked above).
        unsafe { l.launch(launch::rows(rows, v)) }?;
        match (fresh, into) {
            (Some(dz), _) => Ok(wrap(T::wrap_cuda_slice(dz, dev), (rows, v))),
            (None, Some((dst, row))) => dst.narrow(0, row, rows),
            (None, None) => Err(err("logprob_entropy_bwd: no destination")),
        }
    }
    by_dtype!(z.dtype(), go(z, targets, y, g, inv_t, into))
}

/// A `[rows, cols]` tensor of `dtype` (f32 or bf16) on a CUDA `device`, uninitialised: for a
/// buffer whose every element a kernel writes before anything reads it.
pub fn uninit(
    (rows, cols): (usize, usize),
    dtype: DType,
    device: &candle_core::Device,
) -> Result<Tensor> {
    fn go<T: Float>(n: usize, device: &candle_core::Device) -> Result<CudaStorage> {
        let candle_core::Device::Cuda(dev) = device else {
            return Err(err("uninit: expected a CUDA device"));
        };
        // SAFETY: the caller writes every element before any is read.
        let buf = unsafe { dev.alloc::<T>(n)? };
        Ok(T::wrap_cuda_slice(buf, dev.clone()))
    }
    let storage = by_dtype!(dtype, go(rows * cols, device))?;
    Ok(wrap(storage, (rows, cols)))
}

// ---------------------------------------------------------------- sampling

/// Samples one token per row of logits `[B, V]` (f32 or bf16, read as they are) on the device
/// under `p` (temperature, top-k, top-p) from the rows' uniforms `u`. Only `u` goes to the device
/// and the three `[B]` results come back, in one copy: `(token, log-prob, entropy)` per row, as `crate::sampling::draw` defines them.
pub fn sample_rows(
    logits: &Tensor,
    u: &[f32],
    p: &crate::sampling::SamplingParams,
) -> Result<Vec<(u32, f32, f32)>> {
    fn go<T: Float>(
        logits: &Tensor,
        u: &[f32],
        p: &crate::sampling::SamplingParams,
    ) -> Result<Vec<(u32, f32, f32)>> {
        let logits = logits.contiguous()?;
        let (zs, zl) = logits.storage_and_layout();
        let zs = as_cuda(&zs)?;
        let dev = zs.device().clone();
        let (rows, v) = rows_of(zl);
        if u.len() != rows {
            return Err(err(format!(
                "sample_rows: {} uniforms for {rows} rows",
                u.len()
            )));
        }
        let zv = view::<T>(zs, zl)?;
        let stream = dev.cuda_stream();
        let uv = stream.clone_htod(u).w()?;
        // the three [B] results in one buffer, so that one copy (and one wait) brings them back:
        // the tokens, then the bits of the log-probs and of the entropies
        // (passed as addresses: the kernel writes the last two as floats)
        let out = dev.alloc_zeros::<u32>(3 * rows)?;
        let at = out.device_ptr(&stream).0;
        let (ids, lp, ent) = (at, at + 4 * rows as u64, at + 8 * rows as u64);
        let inv_t = if p.is_greedy() {
            0.0
        } else {
            1.0 / p.temperature
        };
        let (top_k, top_p, v32) = (p.top_k.min(v) as i32, p.top_p, v as i32);
        let mut l = Launch::new(&dev, &kernel::<T>("sample_rows")?)?;
        l.arg(&zv)
            .arg(&uv)
            .arg(&inv_t)
            .arg(&top_k)
            .arg(&top_p)
            .arg(&ids)
            .arg(&lp)
            .arg(&ent)
            .arg(&v32);
        // SAFETY: B·V logits, B uniforms and B of each output (32-bit words: u32 tokens, f32
        // log-probs and entropies).
        unsafe { l.launch(launch::sample_rows(rows)) }?;
        let out = stream.clone_dtoh(&out).w()?;
        let word = |k: usize, i: usize| out[k * rows + i];
        Ok((0..rows)
            .map(|i| {
                (
                    word(0, i),
                    f32::from_bits(word(1, i)),
                    f32::from_bits(word(2, i)),
                )
            })
            .collect())
    }
    by_dtype!(logits.dtype(), go(logits, u, p))
}

// ---------------------------------------------------------------- decode q/k/v

/// One decode step's q/k/v epilogue in one launch (`decode_qkv` in `kernels/ferrite.cu`): from
/// the projections `q [B, Hq·D]`, `k, v [B, Hkv·D]` (each contiguous, or rows evenly spaced: a
/// packed matmul's column slices), their biases (`[Hq·D]`, `[Hkv·D]`, `[Hkv·D]`) if the model has
/// them, and the step's `cos, sin [B, D]`, writes the rotated k and the v into slot `slot` of
/// `k_cache, v_cache [B, Hkv, cap, D]` (contiguous, written in place). Returns the rotated q
/// `[B, Hq·D]`; or, with `attend` = (bias `[B, 1, 1, 1, slot + 1]` f32, scale), the attention of
/// those queries over the cache's slots 0 … slot in the same launch (`decode_qkv_attention`):
/// `[B, Hkv, G, D]`, with G·D ≤ the decode attention's limits (the caller checks). All of one
/// dtype, f32 or bf16, but the bias.
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
    attend: Option<(&Tensor, f32)>,
    norm: Option<([&Tensor; 2], f32)>,
) -> Result<Tensor> {
    #[allow(clippy::too_many_arguments)]
    fn go<T: Float>(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        bias: Option<[&Tensor; 3]>,
        cos: &Tensor,
        sin: &Tensor,
        k_cache: &Tensor,
        v_cache: &Tensor,
        slot: usize,
        attend: Option<(&Tensor, f32)>,
        norm: Option<([&Tensor; 2], f32)>,
    ) -> Result<Tensor> {
        let (b, hkv, cap, d) = k_cache.dims4()?;
        let hq = q.elem_count() / (b * d);
        let g = hq / hkv.max(1);
        let shapes_ok = q.elem_count() == b * hq * d
            && k.elem_count() == b * hkv * d
            && v.elem_count() == b * hkv * d
            && cos.elem_count() == b * d
            && sin.elem_count() == b * d
            && v_cache.dims() == k_cache.dims()
            && k_cache.is_contiguous()
            && v_cache.is_contiguous()
            && d % 2 == 0
            && slot < cap
            && b > 0
            && bias.is_none_or(|[qb, kb, vb]| {
                qb.elem_count() == hq * d
                    && kb.elem_count() == hkv * d
                    && vb.elem_count() == hkv * d
            })
            && attend.is_none_or(|(bias, _)| {
                bias.dtype() == DType::F32
                    && bias.elem_count() == b * (slot + 1)
                    && g * hkv == hq
                    && g <= launch::DECODE_MAX_G
                    && d <= launch::DECODE_MAX_D
            })
            // the query and key norms only in the launch with the attention
            && norm.is_none_or(|([qn, kn], _)| {
                attend.is_some() && qn.elem_count() == d && kn.elem_count() == d
            });
        if !shapes_ok {
            return Err(err("decode_qkv: shapes do not match the cache"));
        }
        // q, k and v are read in place where their rows are evenly spaced (a packed matmul's
        // column slices among them), else from a contiguous copy
        let in_rows = |t: &Tensor, n: usize| -> Result<(Tensor, usize)> {
            match row_stride(t.layout(), b, n) {
                Some(stride) => Ok((t.clone(), stride)),
                None => Ok((t.contiguous()?, n)),
            }
        };
        let ((q, q_row), (k, k_row), (v, v_row)) = (
            in_rows(q, hq * d)?,
            in_rows(k, hkv * d)?,
            in_rows(v, hkv * d)?,
        );
        let (cos, sin) = (cos.contiguous()?, sin.contiguous()?);
        // without biases the kernel reads none: cos stands in for them; likewise for the
        // attention bias when there is no attention
        let [qb, kb, vb] = bias.unwrap_or([&cos; 3]).map(|t| t.contiguous());
        let (qb, kb, vb) = (qb?, kb?, vb?);
        let [qn, kn] = norm.map_or([&cos; 2], |(n, _)| n).map(|t| t.contiguous());
        let (qn, kn) = (qn?, kn?);
        let attention_bias = attend.map(|(bias, _)| bias.contiguous()).transpose()?;
        let dev = cuda_device(&q)?;
        let out = unsafe { dev.alloc::<T>(b * hq * d)? };
        let (k_at, v_at) = (address::<T>(k_cache)?, address::<T>(v_cache)?);
        let rows = [
            (&q, q_row, hq * d),
            (&k, k_row, hkv * d),
            (&v, v_row, hkv * d),
        ];
        let row_guards = rows.map(|(t, ..)| t.storage_and_layout());
        let row_views = row_guards
            .iter()
            .zip(rows)
            .map(|((s, l), (_, row, n))| strided::<T>(as_cuda(s)?, l, (b - 1) * row + n))
            .collect::<Result<Vec<_>>>()?;
        let guards = [&qb, &kb, &vb, &cos, &sin, &qn, &kn].map(|t| t.storage_and_layout());
        let views = guards
            .iter()
            .map(|(s, l)| view::<T>(as_cuda(s)?, l))
            .collect::<Result<Vec<_>>>()?;
        let bias_guard = attention_bias.as_ref().map(|t| t.storage_and_layout());
        let bias_view = match &bias_guard {
            Some((s, l)) => Some(view::<f32>(as_cuda(s)?, l)?),
            None => None,
        };
        let pairs = b * (hq + 2 * hkv) * d / 2;
        let has_bias = i32::from(bias.is_some());
        let (has_norm, eps) = (i32::from(norm.is_some()), norm.map_or(0.0, |(_, eps)| eps));
        let (hq32, hkv32, g32, d32, cap32, slot32) = (
            hq as i32,
            hkv as i32,
            g as i32,
            d as i32,
            cap as i32,
            slot as i32,
        );
        let [q_row, k_row, v_row] = [q_row, k_row, v_row].map(|r| r as i32);
        let name = match attend {
            Some(_) => launch::decode_qkv_attention_kernel(d),
            None => "decode_qkv",
        };
        let mut l = Launch::new(&dev, &kernel::<T>(name)?)?;
        for view in &row_views {
            l.arg(view);
        }
        l.arg(&q_row).arg(&k_row).arg(&v_row);
        for view in &views[..3] {
            l.arg(view);
        }
        l.arg(&has_bias);
        if attend.is_some() {
            l.arg(&views[5]).arg(&views[6]).arg(&has_norm).arg(&eps);
        }
        l.arg(&views[3]).arg(&views[4]);
        let scale = attend.map_or(0.0, |(_, scale)| scale);
        let geometry = match &bias_view {
            // SAFETY (below): bias holds B·(slot + 1) f32 and out B·Hkv·G·D = B·Hq·D (checked
            // above); each block reads its own (b, kv) rows of the caches, slots 0 … slot.
            Some(bias_view) => {
                l.arg(&k_at).arg(&v_at).arg(bias_view).arg(&out);
                l.arg(&hkv32).arg(&g32).arg(&d32).arg(&cap32).arg(&slot32);
                l.arg(&scale);
                launch::decode_attention(b * hkv)
            }
            None => {
                l.arg(&out).arg(&k_at).arg(&v_at);
                l.arg(&hq32).arg(&hkv32).arg(&d32).arg(&cap32).arg(&slot32);
                l.arg(&pairs);
                launch::elems(pairs)
            }
        };
        // SAFETY: B rows of Hq·D of q and Hkv·D of k and v at their strides (the views span
        // them), B·Hq·D of out, the biases' Hq·D and Hkv·D (checked above), B·D of cos and sin;
        // the caches hold B·Hkv·cap·D and slot < cap.
        unsafe { l.launch(geometry) }?;
        let out = wrap(T::wrap_cuda_slice(out, dev), (b, hq * d));
        Ok(match attend {
            Some(_) => out.reshape((b, hkv, g, d))?,
            None => out,
        })
    }
    let dtype = q.dtype();
    let same = [k, v, cos, sin, k_cache, v_cache]
        .iter()
        .chain(bias.iter().flatten())
        .chain(norm.iter().flat_map(|(n, _)| n))
        .all(|t| t.dtype() == dtype);
    if !same {
        return Err(err("decode_qkv: inputs of mixed dtypes"));
    }
    by_dtype!(
        dtype,
        go(q, k, v, bias, cos, sin, k_cache, v_cache, slot, attend, norm)
    )
}

// ---------------------------------------------------------------- decode attention

/// One decode step's attention over a KV cache (see `decode_attention` in `ferrite.cu`):
/// `q [B, Hkv, G, D]`, `k, v [B, Hkv, S, D]` (views of the cache's `[B, Hkv, capacity, D]`
/// buffers, read in place), `bias [B, 1, 1, 1, S]` f32 → `[B, Hkv, G, D]` in `q`'s dtype. None
/// where the kernel does not apply: G or D past its limits, or K / V rows not contiguous.
pub fn decode_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    scale: f32,
) -> Result<Option<Tensor>> {
    fn go<T: Float>(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        bias: &Tensor,
        scale: f32,
        kv_stride: usize,
    ) -> Result<Tensor> {
        let (b, hkv, g, d) = q.dims4()?;
        let s = k.dim(2)?;
        let (q, bias) = (q.contiguous()?, bias.contiguous()?);
        let guards = [&q, k, v, &bias].map(|t| t.storage_and_layout());
        let [(qs, ql), (ks, kl), (vs, vl), (bs, bl)] = on_cuda(&guards)?;
        let dev = qs.device().clone();
        // K and V from their views' first element to the last (b, kv)'s last key
        let span = (b * hkv - 1) * kv_stride + s * d;
        let (qv, bv) = (view::<T>(qs, ql)?, view::<f32>(bs, bl)?);
        let (kv_, vv) = (strided::<T>(ks, kl, span)?, strided::<T>(vs, vl, span)?);
        let y = unsafe { dev.alloc::<T>(b * hkv * g * d)? };
        let name = kernel::<T>(launch::decode_attention_kernel(d))?;
        let (hkv32, g32, s32, d32) = (hkv as i32, g as i32, s as i32, d as i32);
        let mut l = Launch::new(&dev, &name)?;
        l.arg(&qv).arg(&kv_).arg(&vv).arg(&bv).arg(&y);
        l.arg(&hkv32)
            .arg(&g32)
            .arg(&s32)
            .arg(&d32)
            .arg(&kv_stride)
            .arg(&scale);
        // SAFETY: q and y hold B·Hkv·G·D, the bias B·S; K and V span (B·Hkv − 1)·kv_stride + S·D
        // from their views' starts, which the caller's layouts were checked to cover.
        unsafe { l.launch(launch::decode_attention(b * hkv)) }?;
        Ok(wrap(T::wrap_cuda_slice(y, dev), (b, hkv, g, d)))
    }
    let (b, hkv, g, d) = q.dims4()?;
    let s = k.dim(2)?;
    let kv_stride = k.layout().stride()[1];
    let fits = g <= launch::DECODE_MAX_G
        && d <= launch::DECODE_MAX_D
        && s > 0
        && kv_rows(k, [b, hkv, s, d], kv_stride)
        && kv_rows(v, [b, hkv, s, d], kv_stride)
        && bias.dtype() == DType::F32
        && bias.elem_count() == b * s
        && k.dtype() == q.dtype()
        && v.dtype() == q.dtype();
    if !fits {
        return Ok(None);
    }
    by_dtype!(q.dtype(), go(q, k, v, bias, scale, kv_stride)).map(Some)
}

/// Whether `x` (K or V) has dims `dims` = `[B, Hkv, S, D]` with contiguous rows of D, heads
/// `kv_stride` elements apart (a KV cache's `[B, Hkv, capacity, D]` buffers: capacity·D) and batch
/// rows Hkv heads apart: what the attention kernels read in place.
fn kv_rows(x: &Tensor, dims: [usize; 4], kv_stride: usize) -> bool {
    let (l, [_, hkv, s, d]) = (x.layout(), dims);
    l.dims() == dims
        && l.stride()[3] == 1
        && l.stride()[2] == d
        && l.stride()[1] == kv_stride
        && l.stride()[0] == hkv * kv_stride
        && kv_stride >= s * d
}

/// Attention over a batch of query rows in one kernel (see `flash_attention` in `ferrite.cu`):
/// `q [B, Hkv, G·T, D]`, `k, v [B, Hkv, S, D]` (contiguous, or views of a KV cache's
/// `[B, Hkv, capacity, D]` buffers, read in place), `bias [B, 1, 1, T, S]` f32 and causal →
/// `[B, T, Hq·D]` token-major (the output projection's input, no transpose), all bf16, and each
/// row's log-partition `[B·Hkv·G·T]` f32. The output comes as the kernel wrote it, a fresh
/// buffer and its shape, for [`crate::attach::attach`] to take over with no copy. None where the
/// kernel does not apply: another dtype, D other than 64 or 128, S < T, or K / V rows not
/// contiguous or not 16-byte aligned.
pub fn flash_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: FlashMask,
    scale: f32,
) -> Result<Option<(CudaStorage, Shape, Tensor)>> {
    match q.dtype() {
        DType::BF16 => flash_forward::<half::bf16>(q, k, v, mask, scale),
        DType::F16 => flash_forward::<half::f16>(q, k, v, mask, scale),
        _ => Ok(None),
    }
}

fn flash_forward<T: Float>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: FlashMask,
    scale: f32,
) -> Result<Option<(CudaStorage, Shape, Tensor)>> {
    let Some(a) = FlashArgs::new(q, k, v, &mask)? else {
        return Ok(None);
    };
    let kernel = match mask {
        FlashMask::Bias(_) => launch::flash_attention_kernel(a.d, T::DTYPE),
        FlashMask::Packed { .. } => {
            launch::flash_attention_varlen_kernels(a.d, T::DTYPE).map(|k| k.0)
        }
    };
    let Some(kernel) = kernel else {
        return Ok(None);
    };
    let q = q.contiguous()?;
    let guards = [&q, k, v].map(|t| t.storage_and_layout());
    let [(qs, ql), (ks, kl), (vs, vl)] = on_cuda(&guards)?;
    let mask_tensors = mask.tensors()?;
    let mask_guards = storage_guards(&mask_tensors);
    let views = MaskViews::new(&mask_guards, a.packed)?;
    let dev = qs.device().clone();
    let qv = view::<T>(qs, ql)?;
    let (kv_, vv) = (a.kv_view::<T>(ks, kl)?, a.kv_view::<T>(vs, vl)?);
    let y = unsafe { dev.alloc::<T>(a.rows() * a.d)? };
    let lse = unsafe { dev.alloc::<f32>(a.rows())? };
    let mut l = Launch::new(&dev, &kernel)?;
    l.arg(&qv)
        .arg(&kv_)
        .arg(&vv)
        .arg(views.bias(&lse))
        .arg(&y)
        .arg(&lse);
    let dims = a.dims(scale);
    dims.push_to(&mut l);
    views.push_to(&mut l);
    // SAFETY: q and y hold B·Hkv·G·T·D, the bias B·T·S, lse B·Hkv·G·T; K and V span
    // (B·Hkv − 1)·kv_stride + S·D from their views' starts, which their layouts were checked to
    // cover; D is the kernel's. Packed (B = 1, T = S), seg holds T·3 and bounds 4·⌈T / 64⌉
    // (checked), and the bias is never read.
    unsafe { l.launch(launch::flash_attention(a.heads(), a.t)) }?;
    let y = T::wrap_cuda_slice(y, dev.clone());
    let lse = wrap(f32::wrap_cuda_slice(lse, dev), a.rows());
    Ok(Some((y, Shape::from(&a.token_major()[..]), lse)))
}

/// The gradients `(dq, dk, dv)` of [`flash_attention`] (see `flash_attention_bwd_dq` and
/// `flash_attention_bwd_dkv` in `ferrite.cu`) from its inputs, output `y`, upstream `dy` and
/// log-partitions `lse`; dk and dv per query head in f32, summed here over each K/V head's G
/// query heads. None where the kernels do not apply: as the forward.
#[allow(clippy::too_many_arguments)]
pub fn flash_attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: FlashMask,
    y: &Tensor,
    dy: &Tensor,
    lse: &Tensor,
    scale: f32,
) -> Result<Option<(Tensor, Tensor, Tensor)>> {
    match q.dtype() {
        DType::BF16 => flash_backward::<half::bf16>(q, k, v, mask, y, dy, lse, scale),
        DType::F16 => flash_backward::<half::f16>(q, k, v, mask, y, dy, lse, scale),
        _ => Ok(None),
    }
}

#[allow(clippy::too_many_arguments)]
fn flash_backward<T: Float>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: FlashMask,
    y: &Tensor,
    dy: &Tensor,
    lse: &Tensor,
    scale: f32,
) -> Result<Option<(Tensor, Tensor, Tensor)>> {
    let Some(a) = FlashArgs::new(q, k, v, &mask)? else {
        return Ok(None);
    };
    let kernels = match mask {
        FlashMask::Bias(_) => launch::flash_attention_backward_kernels(a.d, T::DTYPE),
        FlashMask::Packed { .. } => {
            launch::flash_attention_varlen_kernels(a.d, T::DTYPE).map(|k| (k.1, k.2))
        }
    };
    let Some((dq_kernel, dkv_kernel)) = kernels else {
        return Ok(None);
    };
    let tokens = a.token_major();
    if y.dims() != tokens
        || dy.dims() != tokens
        || !aligned16(y, T::DTYPE)
        || !aligned16(dy, T::DTYPE)
    {
        return Ok(None);
    }
    let (q, y, dy) = (q.contiguous()?, y.contiguous()?, dy.contiguous()?);
    let guards = [&q, k, v, &y, &dy, lse].map(|t| t.storage_and_layout());
    let [(qs, ql), (ks, kl), (vs, vl), (ys, yl), (gs, gl), (ls, ll)] = on_cuda(&guards)?;
    let mask_tensors = mask.tensors()?;
    let mask_guards = storage_guards(&mask_tensors);
    let views = MaskViews::new(&mask_guards, a.packed)?;
    let dev = qs.device().clone();
    let qv = view::<T>(qs, ql)?;
    let (yv, gv, lv) = (view::<T>(ys, yl)?, view::<T>(gs, gl)?, view::<f32>(ls, ll)?);
    let (kv_, vv) = (a.kv_view::<T>(ks, kl)?, a.kv_view::<T>(vs, vl)?);
    let dims = a.dims(scale);
    let dq = unsafe { dev.alloc::<T>(a.rows() * a.d)? };
    let delta = unsafe { dev.alloc::<f32>(a.rows())? };
    let mut l = Launch::new(&dev, &dq_kernel)?;
    l.arg(&qv).arg(&kv_).arg(&vv).arg(views.bias(&lv));
    l.arg(&yv).arg(&gv).arg(&lv).arg(&dq).arg(&delta);
    dims.push_to(&mut l);
    views.push_to(&mut l);
    // SAFETY: as the forward's; y, dy and dq hold B·Hkv·G·T·D, lse and delta B·Hkv·G·T.
    unsafe { l.launch(launch::flash_attention(a.heads(), a.t)) }?;
    let per_head = a.heads() * a.s * a.d;
    let dk = unsafe { dev.alloc::<f32>(per_head)? };
    let dv = unsafe { dev.alloc::<f32>(per_head)? };
    let mut l = Launch::new(&dev, &dkv_kernel)?;
    l.arg(&qv).arg(&kv_).arg(&vv).arg(views.bias(&lv));
    l.arg(&gv).arg(&lv).arg(&delta).arg(&dk).arg(&dv);
    dims.push_to(&mut l);
    views.push_to(&mut l);
    // SAFETY: as above; dk and dv hold B·Hkv·G·S·D, every element of which the kernel writes.
    unsafe { l.launch(launch::flash_attention_dkv(a.heads(), a.s)) }?;
    let dq = wrap(T::wrap_cuda_slice(dq, dev.clone()), q.shape());
    let per_kv = |x: CudaSlice<f32>| -> Result<Tensor> {
        let x = wrap(
            f32::wrap_cuda_slice(x, dev.clone()),
            (a.b, a.hkv, a.g, a.s, a.d),
        );
        x.sum(2)?.to_dtype(T::DTYPE) // [B, Hkv, S, D]
    };
    Ok(Some((dq, per_kv(dk)?, per_kv(dv)?)))
}

/// Whether `x` is of the 16-bit `dtype` and starts on a 16-byte boundary: the flash kernels copy
/// their tiles into shared memory 16 bytes at a time (and load and store fragments in pairs).
fn aligned16(x: &Tensor, dtype: DType) -> bool {
    x.dtype() == dtype && x.layout().start_offset().is_multiple_of(8)
}

impl FlashMask<'_> {
    /// Its tensors, contiguous: the bias, or the segments and bounds.
    fn tensors(&self) -> Result<Vec<Tensor>> {
        Ok(match self {
            FlashMask::Bias(b) => vec![b.contiguous()?],
            FlashMask::Packed { seg, bounds } => vec![seg.contiguous()?, bounds.contiguous()?],
        })
    }
}

/// The storage (read-locked) and layout of each of `tensors`, as a launch holds its inputs'.
fn storage_guards(
    tensors: &[Tensor],
) -> Vec<(impl std::ops::Deref<Target = Storage> + '_, &Layout)> {
    tensors.iter().map(|t| t.storage_and_layout()).collect()
}

/// A [`FlashMask`]'s device views: the bias, or a packed row's segments and bounds.
struct MaskViews<'a> {
    bias: Option<CudaView<'a, f32>>,
    packed: Option<(CudaView<'a, u32>, CudaView<'a, u32>)>,
}

impl<'a> MaskViews<'a> {
    /// The views of [`FlashMask::tensors`] through their guards.
    fn new<G: std::ops::Deref<Target = Storage>>(
        guards: &'a [(G, &'a Layout)],
        packed: bool,
    ) -> Result<Self> {
        let part = |i: usize| -> Result<(&'a CudaStorage, &'a Layout)> {
            let (s, l) = guards
                .get(i)
                .ok_or_else(|| err("flash mask: a tensor missing"))?;
            Ok((as_cuda(s)?, *l))
        };
        Ok(match packed {
            false => MaskViews {
                bias: Some(view::<f32>(part(0)?.0, part(0)?.1)?),
                packed: None,
            },
            true => MaskViews {
                bias: None,
                packed: Some((
                    view::<u32>(part(0)?.0, part(0)?.1)?,
                    view::<u32>(part(1)?.0, part(1)?.1)?,
                )),
            },
        })
    }

    /// The kernel's bias argument: the bias, or (packed: never read) `other`.
    fn bias<'b>(&'b self, other: &'b dyn KernelArg) -> &'b dyn KernelArg {
        match &self.bias {
            Some(b) => b,
            None => other,
        }
    }

    /// The packed kernels' trailing segments and bounds.
    fn push_to<'b>(&'b self, l: &mut Launch<'b>) {
        if let Some((seg, bounds)) = &self.packed {
            l.arg(seg).arg(bounds);
        }
    }
}

/// What the flash attention kernels take of their inputs, checked: the sizes and K's and V's
/// head stride.
struct FlashArgs {
    b: usize,
    hkv: usize,
    g: usize,
    t: usize,
    s: usize,
    d: usize,
    kv_stride: usize,
    /// A packed row's (the `_varlen` kernels).
    packed: bool,
}

/// The kernels' trailing scalar arguments: Hkv, G, T, S (i32), kv_stride, scale.
struct FlashDims {
    ints: [i32; 4],
    kv_stride: usize,
    scale: f32,
}

impl FlashDims {
    fn push_to<'a>(&'a self, l: &mut Launch<'a>) {
        for x in &self.ints {
            l.arg(x);
        }
        l.arg(&self.kv_stride).arg(&self.scale);
    }
}

impl FlashArgs {
    /// The sizes of `q [B, Hkv, G·T, D]`, `k, v [B, Hkv, S, D]` and the mask (a bias
    /// `[B, 1, 1, T, S]`, or a packed row's `[T·3]` segments and `[4·⌈T / 64⌉]` bounds with
    /// B = 1 and T = S); None where the kernels do not take them (see [`flash_attention`]; D is
    /// checked by the caller, against its kernels).
    fn new(q: &Tensor, k: &Tensor, v: &Tensor, mask: &FlashMask) -> Result<Option<Self>> {
        let (b, hkv, gt, d) = q.dims4()?;
        let s = k.dim(2)?;
        let (t, mask_fits) = match mask {
            FlashMask::Bias(bias) => match bias.dims() {
                &[_, 1, 1, t, _] => (
                    t,
                    bias.dtype() == DType::F32 && bias.dims() == [b, 1, 1, t, s],
                ),
                _ => return Ok(None),
            },
            FlashMask::Packed { seg, bounds } => (
                s,
                b == 1
                    && seg.dtype() == DType::U32
                    && bounds.dtype() == DType::U32
                    && seg.dims() == [3 * s]
                    && bounds.dims() == [4 * s.div_ceil(launch::FLASH_ROWS)],
            ),
        };
        let kv_stride = k.layout().stride()[1];
        let dtype = q.dtype();
        let fits = matches!(dtype, DType::BF16 | DType::F16)
            && aligned16(q, dtype)
            && aligned16(k, dtype)
            && aligned16(v, dtype)
            && kv_stride.is_multiple_of(8)
            && mask_fits
            && t > 0
            && gt % t == 0
            && s >= t
            && kv_rows(k, [b, hkv, s, d], kv_stride)
            && kv_rows(v, [b, hkv, s, d], kv_stride);
        Ok(fits.then_some(Self {
            b,
            hkv,
            g: gt / t,
            t,
            s,
            d,
            kv_stride,
            packed: matches!(mask, FlashMask::Packed { .. }),
        }))
    }

    /// The output's (and its gradient's) shape, token-major: `[B, T, Hq·D]`.
    fn token_major(&self) -> [usize; 3] {
        [self.b, self.t, self.hkv * self.g * self.d]
    }

    /// Query heads over the batch, B·Hkv·G.
    fn heads(&self) -> usize {
        self.b * self.hkv * self.g
    }

    /// Query rows over the batch, B·Hkv·G·T.
    fn rows(&self) -> usize {
        self.heads() * self.t
    }

    /// K's or V's elements from the view's first to the last (b, kv)'s last key.
    fn kv_view<'a, T: Float>(&self, s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, T>> {
        strided::<T>(
            s,
            l,
            (self.b * self.hkv - 1) * self.kv_stride + self.s * self.d,
        )
    }

    fn dims(&self, scale: f32) -> FlashDims {
        FlashDims {
            ints: [self.hkv, self.g, self.t, self.s].map(|x| x as i32),
            kv_stride: self.kv_stride,
            scale,
        }
    }
}

// ---------------------------------------------------------------- the output layer in f32

/// `x [N, H] · wᵀ` for `w [V, H]`, both bf16 or both f16 → `[N, V]` f32: one cuBLAS GEMM with
/// 16-bit inputs and an f32 output, which gets the f32 accumulator as it is (the output layer's
/// logits never rounded to 16 bits: [`crate::head::logits`]). No graph.
pub fn matmul_t_f32(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    use candle_core::cuda_backend::cudarc::cublas::result::gemm_strided_batched_ex;
    use candle_core::cuda_backend::cudarc::cublas::sys as blas;
    use candle_core::cuda_backend::cudarc::driver::DevicePtrMut;
    let ((n, h), (v, hw)) = (x.dims2()?, w.dims2()?);
    let input = match x.dtype() {
        DType::BF16 => blas::cudaDataType_t::CUDA_R_16BF,
        DType::F16 => blas::cudaDataType_t::CUDA_R_16F,
        _ => blas::cudaDataType_t::CUDA_R_32F, // refused below
    };
    if h != hw || !matches!(x.dtype(), DType::BF16 | DType::F16) || w.dtype() != x.dtype() {
        return Err(err(format!(
            "matmul_t_f32: bf16 or f16 [N, H] by [V, H] of the same dtype, got {:?} {:?} by {:?} {:?}",
            x.dtype(),
            x.dims(),
            w.dtype(),
            w.dims()
        )));
    }
    let dim = |d: usize| i32::try_from(d).map_err(|_| err("matmul_t_f32: a dimension past i32"));
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    let dev = cuda_device(&x)?;
    let stream = dev.cuda_stream();
    let mut out = unsafe { dev.alloc::<f32>(n * v)? };
    {
        // (x and w stay alive until the GEMM is queued on the stream, as candle's own GEMMs read)
        let (xp, wp) = match x.dtype() {
            DType::BF16 => (address::<half::bf16>(&x)?, address::<half::bf16>(&w)?),
            _ => (address::<half::f16>(&x)?, address::<half::f16>(&w)?),
        };
        let (op, _o) = out.device_ptr_mut(&stream);
        let (alpha, beta) = (1f32, 0f32);
        let blas_handle = dev.cublas_handle();
        // column-major, as cuBLAS reads: outᵀ [V, N] = (w read as [H, V])ᵀ · (x read as [H, N])
        // SAFETY: x holds N·H elements and w V·H, contiguous; out N·V; one batch, no strides.
        unsafe {
            gemm_strided_batched_ex(
                *blas_handle.handle(),
                blas::cublasOperation_t::CUBLAS_OP_T,
                blas::cublasOperation_t::CUBLAS_OP_N,
                dim(v)?,
                dim(n)?,
                dim(h)?,
                (&alpha as *const f32).cast(),
                wp as *const _,
                input,
                dim(h)?,
                0,
                xp as *const _,
                input,
                dim(h)?,
                0,
                (&beta as *const f32).cast(),
                op as *mut _,
                blas::cudaDataType_t::CUDA_R_32F,
                dim(v)?,
                0,
                1,
                blas::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
            )
        }
        .w()?;
    }
    Ok(wrap(f32::wrap_cuda_slice(out, dev.clone()), (n, v)))
}

// ---------------------------------------------------------------- AdamW and the gradient norm

/// The device address of a contiguous CUDA tensor's first element, as a `T` buffer.
fn address<T: CudaDType + DeviceRepr>(t: &Tensor) -> Result<u64> {
    let (s, l) = t.storage_and_layout();
    let s = as_cuda(&s)?;
    let stream = s.device().cuda_stream();
    let v = view::<T>(s, l)?;
    let ptr = v.device_ptr(&stream).0;
    Ok(ptr)
}

/// What a multi-tensor kernel reads, on the device: the tensors' addresses and sizes, and the
/// chunk table (see `kernels/ferrite.cu`).
struct MultiTensor {
    addresses: CudaSlice<u64>,
    sizes: CudaSlice<u32>,
    param: CudaSlice<u32>,
    index: CudaSlice<u32>,
    chunks: i32,
    chunk: i32,
}

impl MultiTensor {
    /// Tensors of `sizes` elements, with `addresses` (any number per tensor); None when there
    /// is nothing to do.
    fn upload(dev: &CudaDevice, addresses: &[u64], sizes: &[usize]) -> Result<Option<Self>> {
        let stream = dev.cuda_stream();
        let sizes32 = sizes
            .iter()
            .map(|&n| {
                u32::try_from(n)
                    .map_err(|_| err("multi-tensor kernels: a tensor of 2³² elements or more"))
            })
            .collect::<Result<Vec<u32>>>()?;
        let (param, index) = launch::chunk_table(sizes, launch::MULTI_TENSOR_CHUNK);
        if param.is_empty() {
            return Ok(None);
        }
        Ok(Some(MultiTensor {
            addresses: stream.clone_htod(addresses).w()?,
            sizes: stream.clone_htod(&sizes32).w()?,
            chunks: param.len() as i32,
            chunk: launch::MULTI_TENSOR_CHUNK as i32,
            param: stream.clone_htod(&param).w()?,
            index: stream.clone_htod(&index).w()?,
        }))
    }

    fn geometry(&self) -> launch::Geometry {
        launch::multi_tensor(self.chunks as usize)
    }
}

fn cuda_device(t: &Tensor) -> Result<CudaDevice> {
    match t.device() {
        candle_core::Device::Cuda(d) => Ok(d.clone()),
        _ => Err(err("ferrite cuda kernel: expected a CUDA tensor")),
    }
}

/// Σ g² over `grads` (f32 or bf16, on one CUDA device) in one launch per dtype: each chunk of
/// [`launch::MULTI_TENSOR_CHUNK`] elements is summed in f32 on the device, and the chunks' sums
/// are added on the host in f64, in a fixed order (the f32 gradients' chunks, then the bf16
/// ones').
pub fn sum_squares(grads: &[&Tensor]) -> Result<f64> {
    /// The f32 partial sums of `grads`, all of `G`.
    fn go<G: Float>(grads: &[&Tensor]) -> Result<Vec<f32>> {
        let Some(first) = grads.first() else {
            return Ok(Vec::new());
        };
        let dev = cuda_device(first)?;
        let grads = grads
            .iter()
            .map(|g| g.contiguous())
            .collect::<Result<Vec<_>>>()?;
        let addresses = grads
            .iter()
            .map(address::<G>)
            .collect::<Result<Vec<u64>>>()?;
        let sizes: Vec<usize> = grads.iter().map(Tensor::elem_count).collect();
        let Some(t) = MultiTensor::upload(&dev, &addresses, &sizes)? else {
            return Ok(Vec::new());
        };
        let partial = dev.alloc_zeros::<f32>(t.chunks as usize)?;
        let mut l = Launch::new(&dev, &kernel::<G>("sum_squares")?)?;
        l.arg(&t.addresses)
            .arg(&t.sizes)
            .arg(&t.param)
            .arg(&t.index);
        l.arg(&t.chunks).arg(&t.chunk).arg(&partial);
        // SAFETY: the addresses are of the contiguous gradients of G (checked by `address`,
        // alive in `grads` until the transfer below has waited for the kernel); one partial sum
        // per chunk.
        unsafe { l.launch(t.geometry()) }?;
        dev.cuda_stream().clone_dtoh(&partial).w()
    }
    let of =
        |d: DType| -> Vec<&Tensor> { grads.iter().copied().filter(|g| g.dtype() == d).collect() };
    if let Some(g) = grads
        .iter()
        .find(|g| !matches!(g.dtype(), DType::F32 | DType::BF16 | DType::F16))
    {
        return Err(err(format!("sum_squares: no {:?} variant", g.dtype())));
    }
    let partial = [
        go::<f32>(&of(DType::F32))?,
        go::<half::bf16>(&of(DType::BF16))?,
        go::<half::f16>(&of(DType::F16))?,
    ];
    Ok(partial.iter().flatten().map(|&x| x as f64).sum())
}

/// The scalars of one AdamW step (see `learner::optim`'s host update).
#[derive(Debug, Clone, Copy)]
pub struct AdamWStep {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// `lr / (1 − β1ᵗ)`.
    pub step_size: f32,
    /// `sqrt(1 − β2ᵗ)`.
    pub sqrt_bias2: f32,
    /// The global-norm clipping factor.
    pub clip: f32,
}

/// One parameter of a multi-tensor AdamW step. `master`, `m`, `v` and `copy` are updated in
/// place, so they must be contiguous and must not share storage.
pub struct AdamWParam<'a> {
    /// The f32 master weights; the parameter itself when there is no `copy`.
    pub master: &'a Tensor,
    /// The gradient: f32, or bf16 (as a bf16 parameter's backward leaves it) with a bf16 copy.
    pub grad: &'a Tensor,
    /// The f32 moments.
    pub m: &'a Tensor,
    pub v: &'a Tensor,
    /// The parameter in bf16, rewritten from the new master.
    pub copy: Option<&'a Tensor>,
    /// `lr · weight_decay`, or 0 for parameters without decay.
    pub decay: f32,
}

/// One AdamW step of every parameter in `params`, in place, in one launch per kind: without a
/// compute copy (`adamw_f32`), with a bf16 copy and an f32 gradient (`adamw_bf16`), with a bf16
/// copy and a bf16 gradient (`adamw_bf16_bf16`). Each element's master, moments and copy are read
/// and written once, its gradient read once.
pub fn adamw(params: &[AdamWParam], s: AdamWStep) -> Result<()> {
    /// `P`: the compute copies' type (f32: none); `G`: the gradients'.
    fn go<P: Float, G: Float>(params: &[&AdamWParam], s: AdamWStep) -> Result<()> {
        let Some(first) = params.first() else {
            return Ok(());
        };
        let dev = cuda_device(first.master)?;
        let grads = params
            .iter()
            .map(|p| p.grad.contiguous())
            .collect::<Result<Vec<_>>>()?;
        let mut addresses = Vec::with_capacity(5 * params.len());
        for (p, g) in params.iter().zip(&grads) {
            let n = p.master.elem_count();
            let sizes_match = [g, p.m, p.v].iter().all(|t| t.elem_count() == n)
                && p.copy.is_none_or(|c| c.elem_count() == n);
            if !sizes_match {
                return Err(err(
                    "adamw: master, gradient, moments and copy differ in size",
                ));
            }
            addresses.extend([
                address::<f32>(p.master)?,
                address::<G>(g)?,
                address::<f32>(p.m)?,
                address::<f32>(p.v)?,
                p.copy.map(address::<P>).transpose()?.unwrap_or(0),
            ]);
        }
        let sizes: Vec<usize> = params.iter().map(|p| p.master.elem_count()).collect();
        let Some(t) = MultiTensor::upload(&dev, &addresses, &sizes)? else {
            return Ok(());
        };
        let decays: Vec<f32> = params.iter().map(|p| p.decay).collect();
        let decays = dev.cuda_stream().clone_htod(&decays).w()?;
        // adamw_P (f32 gradients) or adamw_P_P (gradients in the copy's dtype)
        let name = match G::DTYPE {
            DType::F32 => kernel::<P>("adamw")?,
            _ => kernel::<P>("adamw")? + &kernel::<G>("")?,
        };
        let mut l = Launch::new(&dev, &name)?;
        l.arg(&t.addresses).arg(&t.sizes).arg(&decays);
        l.arg(&t.param).arg(&t.index).arg(&t.chunks).arg(&t.chunk);
        l.arg(&s.beta1).arg(&s.beta2).arg(&s.eps);
        l.arg(&s.step_size).arg(&s.sqrt_bias2).arg(&s.clip);
        // SAFETY: five addresses per parameter, of contiguous buffers of its size and type
        // (checked above and by `address`); the gradients' contiguous copies and the tables are
        // freed in stream order, after the kernel.
        unsafe { l.launch(t.geometry()) }?;
        Ok(())
    }
    let copy_dtype = |p: &AdamWParam| p.copy.map_or(DType::F32, Tensor::dtype);
    for p in params {
        if [p.master, p.m, p.v].iter().any(|t| t.dtype() != DType::F32) {
            return Err(err("adamw: master and moments must be f32"));
        }
        let kind = (copy_dtype(p), p.grad.dtype());
        let half = |d: DType| matches!(d, DType::BF16 | DType::F16);
        if !(kind == (DType::F32, DType::F32)
            || half(kind.0) && (kind.1 == DType::F32 || kind.1 == kind.0))
        {
            return Err(err(format!(
                "adamw: no variant for a {:?} copy with a {:?} gradient",
                kind.0, kind.1
            )));
        }
    }
    let of = |copy: DType, grad: DType| -> Vec<&AdamWParam> {
        params
            .iter()
            .filter(|p| copy_dtype(p) == copy && p.grad.dtype() == grad)
            .collect()
    };
    go::<f32, f32>(&of(DType::F32, DType::F32), s)?;
    go::<half::bf16, f32>(&of(DType::BF16, DType::F32), s)?;
    go::<half::bf16, half::bf16>(&of(DType::BF16, DType::BF16), s)?;
    go::<half::f16, f32>(&of(DType::F16, DType::F32), s)?;
    go::<half::f16, half::f16>(&of(DType::F16, DType::F16), s)
}
