// A CPU stand-in for the CUDA libraries a `--features cuda` ferrite binary links (libcuda.so.1,
// libcublas.so.13, libcurand.so.10, libcudart.so.13), so that the binary's launchers of
// kernels/ferrite.cu (model/src/cuda.rs) run on a machine without a GPU: `scripts/fake-gpu.sh`
// builds it and runs `ferrite gpu-check glue` against it.
//
// Device memory is host memory (a device address is the host address), copies are memcpy, and
// streams, events and contexts are tokens: everything runs at once, in order. A launch of one of
// ferrite's kernels runs it in the kernel emulator (cuda_emu.h: a fiber per CUDA thread, barriers,
// shuffles, shared memory checked for races) with its parameters read from the launch's argument
// list by the kernel's own C++ signature. Of candle's kernels only the f32 sums and the f32 → bf16
// cast run (on the host), and cuBLAS's matrix multiplies not at all: other launches fail with
// CUDA_ERROR_NOT_SUPPORTED, naming the kernel, so only what uses ferrite's kernels, copies and
// those three can run here.
//
// Built once per library, with FAKE_CUDA_LIB set to which (see scripts/fake-gpu.sh); the test's
// kernels.inc and registry.inc (ferrite.cu with its shared memory rewritten, and the kernels'
// names) are generated beside the build.
#include "cuda_emu.h"

#include <cstdarg>
#include <cstdint>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <utility>

using CUresult = int;
using CUdeviceptr = unsigned long long;
constexpr CUresult CUDA_SUCCESS = 0;
constexpr CUresult CUDA_ERROR_INVALID_VALUE = 1;
constexpr CUresult CUDA_ERROR_OUT_OF_MEMORY = 2;
constexpr CUresult CUDA_ERROR_NOT_FOUND = 500;
constexpr CUresult CUDA_ERROR_NOT_SUPPORTED = 801;

#if FAKE_CUDA_LIB == 1  // libcuda.so.1: the driver API

#include "kernels.inc"

namespace {

void say(const char* fmt, ...) {
    std::va_list args;
    va_start(args, fmt);
    std::fputs("fake cuda: ", stderr);
    std::vfprintf(stderr, fmt, args);
    std::fputc('\n', stderr);
    std::fflush(stderr);
    va_end(args);
}

using Runner = void (*)(void**, unsigned, unsigned, unsigned);

template <class... A, size_t... I>
void call(void (*kernel)(A...), void** params, std::index_sequence<I...>) {
    // each parameter's value lies at params[i]: a pointer parameter's as the u64 device address
    kernel(*static_cast<std::remove_cv_t<A>*>(params[I])...);
}

template <class... A>
void run_kernel(void (*kernel)(A...), void** params, unsigned grid, unsigned block, unsigned shared) {
    emu::launch(grid, block, shared, [&] { call(kernel, params, std::index_sequence_for<A...>{}); });
}

#define runner(k) +[](void** p, unsigned g, unsigned b, unsigned s) { run_kernel(k, p, g, b, s); }

const std::map<std::string, Runner>& kernels() {
    static const std::map<std::string, Runner> table = {
#include "registry.inc"
    };
    return table;
}

struct Module {
    bool ferrite;  // the PTX of kernels/ferrite.cu, else another's (candle's)
};
// Two of candle's kernels, as loops on the host: the sum over a dimension and the f32 → bf16 cast
// (the flash attention backward sums its per-query-head dK and dV over each K/V head's G heads
// with them). Parameters as candle-kernels' reduce.cu and cast.cu declare them; `info` is the
// input's dims then strides (null: contiguous).
size_t strided(size_t i, size_t dims, const size_t* info) {
    if (!info) return i;
    size_t at = 0;
    for (size_t d = dims; d-- > 0;) {
        at += (i % info[d]) * info[dims + d];
        i /= info[d];
    }
    return at;
}
template <class T>
T param(void** params, int i) {
    return *static_cast<T*>(params[i]);
}
// fast_sum_f32(src_numel, el_to_sum_per_block, num_dims, info, src, dst) and
// fast_sum_small_f32(dst_el, …): dst[i] = the sum of the input's elements i·n … i·n + n − 1
template <bool small>
void candle_sum_f32(void** p) {
    const auto [count, n, dims] = std::tuple{param<size_t>(p, 0), param<size_t>(p, 1), param<size_t>(p, 2)};
    const auto* info = param<const size_t*>(p, 3);
    const auto* src = param<const float*>(p, 4);
    auto* dst = param<float*>(p, 5);
    const size_t outputs = small ? count : n == 0 ? 0 : count / n;
    for (size_t o = 0; o < outputs; ++o) {
        float sum = 0.f;
        for (size_t i = 0; i < n; ++i) sum += src[strided(o * n + i, dims, info)];
        dst[o] = sum;
    }
}
// cast_f32_bf16(numel, num_dims, info, inp, out)
void candle_cast_f32_bf16(void** p) {
    const auto [n, dims] = std::tuple{param<size_t>(p, 0), param<size_t>(p, 1)};
    const auto* info = param<const size_t*>(p, 2);
    const auto* src = param<const float*>(p, 3);
    auto* dst = param<bf16*>(p, 4);
    for (size_t i = 0; i < n; ++i) dst[i] = __float2bfloat16(src[strided(i, dims, info)]);
}
const std::map<std::string, void (*)(void**)> candle_kernels = {
    {"fast_sum_f32", candle_sum_f32<false>},
    {"fast_sum_small_f32", candle_sum_f32<true>},
    {"cast_f32_bf16", candle_cast_f32_bf16},
};

struct Function {
    std::string name;
    Runner run;               // one of ferrite's kernels, emulated
    void (*host)(void**);     // one of candle's, on the host
};

std::mutex lock;  // one launch at a time: the emulator's state is global
std::map<uintptr_t, size_t> allocations;
size_t used = 0, used_high = 0;
constexpr size_t total_memory = size_t(64) << 30;

CUresult allocate(CUdeviceptr* p, size_t n) {
    void* m = std::calloc(std::max<size_t>(n, 1), 1);
    if (!m) return CUDA_ERROR_OUT_OF_MEMORY;
    std::lock_guard g(lock);
    allocations[reinterpret_cast<uintptr_t>(m)] = n;
    used += n;
    used_high = std::max(used_high, used);
    *p = reinterpret_cast<CUdeviceptr>(m);
    return CUDA_SUCCESS;
}

CUresult release(CUdeviceptr p) {
    if (p == 0) return CUDA_SUCCESS;
    std::lock_guard g(lock);
    const auto a = allocations.find(uintptr_t(p));
    if (a == allocations.end()) {
        say("free of %#llx, which no allocation returned", p);
        return CUDA_ERROR_INVALID_VALUE;
    }
    used -= a->second;
    allocations.erase(a);
    std::free(reinterpret_cast<void*>(p));
    return CUDA_SUCCESS;
}

int token;  // what contexts, streams, events and pools point at

}  // namespace

extern "C" {
CUresult cuInit(unsigned) { return CUDA_SUCCESS; }
CUresult cuDeviceGet(int* device, int ordinal) {
    if (ordinal != 0) return CUDA_ERROR_INVALID_VALUE;
    *device = 0;
    return CUDA_SUCCESS;
}
CUresult cuDeviceGetAttribute(int* value, int attribute, int) {
    switch (attribute) {
        case 1: *value = 1024; break;         // max threads per block
        case 2: *value = 1024; break;         // max block dim x
        case 5: *value = 2147483647; break;   // max grid dim x
        case 8: *value = 48 * 1024; break;    // max shared memory per block
        case 10: *value = 32; break;          // warp size
        case 16: *value = 132; break;         // multiprocessors
        case 75: *value = 9; break;           // compute capability major
        case 76: *value = 0; break;           // minor
        case 115: *value = 1; break;          // memory pools supported
        default: *value = 0;
    }
    return CUDA_SUCCESS;
}
CUresult cuDeviceGetDefaultMemPool(void** pool, int) {
    *pool = &token;
    return CUDA_SUCCESS;
}
CUresult cuDevicePrimaryCtxRetain(void** ctx, int) {
    *ctx = &token;
    return CUDA_SUCCESS;
}
CUresult cuDevicePrimaryCtxRelease_v2(int) { return CUDA_SUCCESS; }
CUresult cuCtxSetCurrent(void*) { return CUDA_SUCCESS; }
CUresult cuCtxGetCurrent(void** ctx) {
    *ctx = &token;
    return CUDA_SUCCESS;
}
CUresult cuCtxDestroy_v2(void*) { return CUDA_SUCCESS; }
CUresult cuEventCreate(void** event, unsigned) {
    *event = &token;
    return CUDA_SUCCESS;
}
CUresult cuEventDestroy_v2(void*) { return CUDA_SUCCESS; }
CUresult cuEventRecord(void*, void*) { return CUDA_SUCCESS; }
CUresult cuStreamDestroy_v2(void*) { return CUDA_SUCCESS; }
CUresult cuStreamIsCapturing(void*, int* status) {
    *status = 0;
    return CUDA_SUCCESS;
}
CUresult cuStreamSynchronize(void*) { return CUDA_SUCCESS; }
CUresult cuStreamWaitEvent(void*, void*, unsigned) { return CUDA_SUCCESS; }
CUresult cuGetErrorString(CUresult error, const char** text) {
    switch (error) {
        case CUDA_ERROR_INVALID_VALUE: *text = "invalid argument (fake cuda)"; break;
        case CUDA_ERROR_OUT_OF_MEMORY: *text = "out of memory (fake cuda)"; break;
        case CUDA_ERROR_NOT_FOUND: *text = "named symbol not found (fake cuda)"; break;
        case CUDA_ERROR_NOT_SUPPORTED: *text = "operation not supported: not emulated (fake cuda)"; break;
        default: *text = "error (fake cuda)";
    }
    return CUDA_SUCCESS;
}

CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t n) { return allocate(p, n); }
CUresult cuMemAllocAsync(CUdeviceptr* p, size_t n, void*) { return allocate(p, n); }
CUresult cuMemFree_v2(CUdeviceptr p) { return release(p); }
CUresult cuMemFreeAsync(CUdeviceptr p, void*) { return release(p); }
CUresult cuMemGetInfo_v2(size_t* free, size_t* total) {
    std::lock_guard g(lock);
    *total = total_memory;
    *free = total_memory - std::min(used, total_memory);
    return CUDA_SUCCESS;
}
// the pool's used-memory attributes (7: current, 8: high watermark) are the allocations'
CUresult cuMemPoolGetAttribute(void*, int attribute, void* value) {
    std::lock_guard g(lock);
    uint64_t v = attribute == 7 ? used : attribute == 8 ? used_high : 0;
    std::memcpy(value, &v, 8);
    return CUDA_SUCCESS;
}
CUresult cuMemPoolSetAttribute(void*, int attribute, void* value) {
    if (attribute == 8) {
        std::lock_guard g(lock);
        uint64_t v;
        std::memcpy(&v, value, 8);
        used_high = std::max<size_t>(v, used);
    }
    return CUDA_SUCCESS;
}
CUresult cuMemPoolTrimTo(void*, size_t) { return CUDA_SUCCESS; }
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t n, void*) {
    std::memcpy(reinterpret_cast<void*>(dst), src, n);
    return CUDA_SUCCESS;
}
CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t n, void*) {
    std::memcpy(dst, reinterpret_cast<const void*>(src), n);
    return CUDA_SUCCESS;
}
CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, void*) {
    std::memmove(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), n);
    return CUDA_SUCCESS;
}
CUresult cuMemcpyPeerAsync(CUdeviceptr dst, void*, CUdeviceptr src, void*, size_t n, void*) {
    std::memmove(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), n);
    return CUDA_SUCCESS;
}
CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char value, size_t n, void*) {
    std::memset(reinterpret_cast<void*>(dst), value, n);
    return CUDA_SUCCESS;
}

CUresult cuModuleLoadData(void** module, const void* image) {
    // ferrite's PTX declares its kernels as `.visible .entry name(`
    const bool ferrite = std::strstr(static_cast<const char*>(image), ".entry rms_norm_fwd_f32(") != nullptr;
    *module = new Module{ferrite};
    return CUDA_SUCCESS;
}
CUresult cuModuleLoad(void**, const char* file) {
    say("cuModuleLoad(%s): modules load from memory only", file);
    return CUDA_ERROR_NOT_SUPPORTED;
}
CUresult cuModuleUnload(void* module) {
    delete static_cast<Module*>(module);
    return CUDA_SUCCESS;
}
CUresult cuModuleGetFunction(void** function, void* module, const char* name) {
    Runner run = nullptr;
    void (*host)(void**) = nullptr;
    if (static_cast<Module*>(module)->ferrite) {
        const auto k = kernels().find(name);
        if (k == kernels().end()) {
            say("ferrite's module has no kernel %s", name);
            return CUDA_ERROR_NOT_FOUND;
        }
        run = k->second;
    } else if (const auto k = candle_kernels.find(name); k != candle_kernels.end()) {
        host = k->second;
    }
    *function = new Function{name, run, host};
    return CUDA_SUCCESS;
}
CUresult cuLaunchKernel(void* function, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                        unsigned bz, unsigned shared, void*, void** params, void** extra) {
    const auto* f = static_cast<Function*>(function);
    if (f->host) {
        f->host(params);
        return CUDA_SUCCESS;
    }
    if (!f->run) {
        say("%s is not emulated (ferrite's kernels and three of candle's are)", f->name.c_str());
        return CUDA_ERROR_NOT_SUPPORTED;
    }
    if (gy != 1 || gz != 1 || by != 1 || bz != 1 || extra != nullptr) {
        say("%s: only 1-D launches with a parameter list are emulated", f->name.c_str());
        return CUDA_ERROR_NOT_SUPPORTED;
    }
    std::lock_guard g(lock);
    f->run(params, gx, bx, shared);
    return CUDA_SUCCESS;
}
}  // extern "C"

#elif FAKE_CUDA_LIB == 2  // libcublas.so.13: a handle, and no matrix multiply

extern "C" {
int cublasCreate_v2(void** handle) {
    static int token;
    *handle = &token;
    return 0;
}
int cublasDestroy_v2(void*) { return 0; }
int cublasSetStream_v2(void*, void*) { return 0; }
// CUBLAS_STATUS_NOT_SUPPORTED
int cublasGemmStridedBatchedEx() {
    std::fputs("fake cuda: cuBLAS matrix multiplies are not emulated\n", stderr);
    return 15;
}
int cublasDgemmStridedBatched() { return cublasGemmStridedBatchedEx(); }
}

#elif FAKE_CUDA_LIB == 3  // libcurand.so.10: a generator that generates nothing

extern "C" {
int curandCreateGenerator(void** generator, int) {
    static int token;
    *generator = &token;
    return 0;
}
int curandDestroyGenerator(void*) { return 0; }
int curandSetPseudoRandomGeneratorSeed(void*, unsigned long long) { return 0; }
int curandSetStream(void*, void*) { return 0; }
}

#elif FAKE_CUDA_LIB == 4  // libcudart.so.13

extern "C" {
int cudaGetDevice(int* device) {
    *device = 0;
    return 0;
}
int cudaFuncSetAttribute(const void*, int, int) { return 0; }
// nvcc's host-side registration of the kernels it compiled into the binary (candle's
// mixture-of-experts kernels, which ferrite does not call): accepted, and launches refused
// (cudaErrorNotSupported)
void** __cudaRegisterFatBinary(void*) {
    static void* handle;
    return &handle;
}
void __cudaRegisterFatBinaryEnd(void**) {}
void __cudaUnregisterFatBinary(void**) {}
void __cudaRegisterFunction(void**, const char*, char*, const char*, int, void*, void*, void*, void*, int*) {}
void __cudaRegisterVar(void**, char*, char*, const char*, int, size_t, int, int) {}
unsigned __cudaPushCallConfiguration(dim3, dim3, size_t, void*) { return 0; }
int __cudaPopCallConfiguration(dim3*, dim3*, size_t*, void**) { return 0; }
int __cudaLaunchKernel_ptsz(const void*, dim3, dim3, void**, size_t, void*) {
    std::fputs("fake cuda: kernels nvcc compiled into the binary are not emulated\n", stderr);
    return 801;
}
int __cudaGetKernel(void**, const void*) { return 801; }
}

#endif
