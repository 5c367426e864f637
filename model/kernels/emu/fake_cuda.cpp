// A CPU stand-in for the CUDA libraries a `--features cuda` ferrite binary links (libcuda.so.1,
// libcublas.so.13, libcurand.so.10, libcudart.so.13), so that the binary's launchers of
// kernels/ferrite.cu (model/src/cuda.rs) run on a machine without a GPU: `scripts/fake-gpu.sh`
// builds it and runs `ferrite gpu-check glue` against it.
//
// Device memory is host memory (a device address is the host address; FAKE_CUDA_MEMORY_GIB of
// it, 128 by default, past which an allocation fails as out of memory), copies are memcpy, and
// streams, events and contexts are tokens: everything runs at once, in order. A launch of one of
// ferrite's kernels runs it in the kernel emulator (cuda_emu.h: a fiber per CUDA thread, barriers,
// shuffles, shared memory checked for races) with its parameters read from the launch's argument
// list by the kernel's own C++ signature. Candle's elementwise, cast, copy, fill, where, indexing
// and reduction kernels run as loops on the host, and cuBLAS's strided batched matrix multiply as
// a threaded loop; any other launch fails with CUDA_ERROR_NOT_SUPPORTED, naming the kernel.
//
// FAKE_CUDA_MEMORY_ONLY=1 measures memory and launches instead: every launch of ferrite's
// kernels, candle's launches of more than 65,536 threads and every matrix multiply return at once
// without computing anything, so that a learner step or a decode loop at its full size
// (Qwen2.5-0.5B, 8 × 1024 tokens; 256 rows) runs in seconds on the host while every allocation,
// free and launch is still made, in the same order. The memory pool's high watermark is then the
// step's peak allocated memory, as the GPU's pool would report it. The values are wrong (zeros
// where the compute was skipped); candle's small launches (a mask's sum, a scalar) still run, so
// that what the host reads back stays finite. FAKE_CUDA_PROFILE=1 prints at exit every kernel
// launch and cuBLAS GEMM by kernel and geometry, with counts and host time (see `Profile`).
//
// Built once per library, with FAKE_CUDA_LIB set to which (see scripts/fake-gpu.sh); the test's
// kernels.inc and registry.inc (ferrite.cu with its shared memory rewritten, and the kernels'
// names) are generated beside the build.
#include "cuda_emu.h"

#include <algorithm>
#include <chrono>
#include <cstdarg>
#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

using CUresult = int;
using CUdeviceptr = unsigned long long;
constexpr CUresult CUDA_SUCCESS = 0;
constexpr CUresult CUDA_ERROR_INVALID_VALUE = 1;
constexpr CUresult CUDA_ERROR_OUT_OF_MEMORY = 2;
constexpr CUresult CUDA_ERROR_NOT_FOUND = 500;
constexpr CUresult CUDA_ERROR_NOT_SUPPORTED = 801;

// the most threads a launch of candle's kernels has that the memory-only mode still computes
constexpr size_t memory_only_threads = 65536;

// the environment variable `name` is set, and not empty or 0
inline bool env_flag(const char* name) {
    const char* v = std::getenv(name);
    return v != nullptr && *v != '\0' && std::strcmp(v, "0") != 0;
}
inline bool memory_only() {
    static const bool on = env_flag("FAKE_CUDA_MEMORY_ONLY");
    return on;
}

// FAKE_CUDA_PROFILE=1: each library's launches (libcuda's kernels and device-to-device copies,
// libcublas's GEMMs) by kernel and geometry (a copy by its size), with their count and the host
// time they took, printed at exit: the costliest, then the most frequent. Under FAKE_CUDA_MEMORY_ONLY the ones that take time are candle's launches of
// at most 65,536 threads, so a costly row is a launch where few GPU threads walk much memory
// (candle's full reduction is one block); the counts are what a step launches.
struct Profile {
    const char* what;
    std::mutex lock;
    std::map<std::string, std::pair<size_t, double>> rows;  // count, seconds
    ~Profile() {
        if (rows.empty()) return;
        std::vector<std::pair<std::string, std::pair<size_t, double>>> by(rows.begin(), rows.end());
        size_t total = 0;
        for (auto& r : by) total += r.second.first;
        std::fprintf(stderr, "fake cuda: %zu %s in all; the costliest on the host, then the most frequent\n", total,
                     what);
        const auto print = [&](auto longer) {
            std::sort(by.begin(), by.end(), longer);
            for (size_t i = 0; i < by.size() && i < 30; ++i)
                std::fprintf(stderr, "%10.3f s %9zu x  %s\n", by[i].second.second, by[i].second.first,
                             by[i].first.c_str());
        };
        print([](auto& a, auto& b) { return a.second.second > b.second.second; });
        std::fputs("  ...\n", stderr);
        print([](auto& a, auto& b) { return a.second.first > b.second.first; });
    }
};
// the library's profile with FAKE_CUDA_PROFILE set, else null
Profile* profile(const char* what) {
    static const bool on = env_flag("FAKE_CUDA_PROFILE");
    static Profile p{what, {}, {}};  // prints at exit
    return on ? &p : nullptr;
}
// runs `work`, and with FAKE_CUDA_PROFILE counts it and its host time in the row `key()` names
template <typename Key, typename Work>
void profiled(const Key& key, const Work& work) {
    Profile* p = profile(FAKE_CUDA_LIB == 2 ? "cuBLAS GEMMs" : "kernel launches and device-to-device copies");
    if (p == nullptr) return work();
    const auto start = std::chrono::steady_clock::now();
    work();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::lock_guard g(p->lock);
    auto& row = p->rows[key()];
    row.first += 1;
    row.second += s;
}

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
// Candle's kernels, as loops on the host, by the families of candle-kernels' sources (parameters as
// they declare them; `info` is dims then strides, null where contiguous): unary `u<op>_<t>`,
// binary `b<op>_<t>` and the comparisons `<eq|ne|lt|le|gt|ge>_<t>` (to u8), `affine_<t>`,
// `cast_<a>_<b>`, `copy2d_<t>`, `fill_<t>`, the reductions `fast_<sum|max|min|argmax|argmin>_<t>`
// and `fast_sum_small_<t>`, `where_<ids>_<t>`, `const_set_<t>` and the indexing kernels, for
// f32, bf16, f16, f64, u32, u8 and i64 (bf16 and f16 computed in f32, as candle's kernels do;
// f16 is the compiler's `_Float16`, which rounds to nearest even as the GPU does). Others are
// refused.
enum class Ty { F32, BF16, F16, F64, U32, U8, I64, None };
Ty ty_of(const std::string& t) {
    return t == "f32"    ? Ty::F32
           : t == "bf16" ? Ty::BF16
           : t == "f16"  ? Ty::F16
           : t == "f64"  ? Ty::F64
           : t == "u32"  ? Ty::U32
           : t == "u8"   ? Ty::U8
           : t == "i64"  ? Ty::I64
                         : Ty::None;
}
double load(Ty t, const void* p, size_t i) {
    switch (t) {
        case Ty::F32: return static_cast<const float*>(p)[i];
        case Ty::BF16: return __bfloat162float(static_cast<const bf16*>(p)[i]);
        case Ty::F16: return float(static_cast<const _Float16*>(p)[i]);
        case Ty::U32: return static_cast<const uint32_t*>(p)[i];
        case Ty::U8: return static_cast<const uint8_t*>(p)[i];
        case Ty::F64: return static_cast<const double*>(p)[i];
        case Ty::I64: return double(static_cast<const int64_t*>(p)[i]);
        default: return 0;
    }
}
void store(Ty t, void* p, size_t i, double v) {
    switch (t) {
        case Ty::F32: static_cast<float*>(p)[i] = float(v); break;
        case Ty::BF16: static_cast<bf16*>(p)[i] = __float2bfloat16(float(v)); break;
        case Ty::F16: static_cast<_Float16*>(p)[i] = _Float16(float(v)); break;
        case Ty::U32: static_cast<uint32_t*>(p)[i] = uint32_t(v); break;
        case Ty::U8: static_cast<uint8_t*>(p)[i] = uint8_t(v); break;
        case Ty::F64: static_cast<double*>(p)[i] = v; break;
        case Ty::I64: static_cast<int64_t*>(p)[i] = int64_t(v); break;
        default: break;
    }
}
// a scalar parameter of type t (affine's mul and add, fill's value) as a double
double scalar(Ty t, const void* p) { return load(t, p, 0); }
// element i (in logical, row-major order) of a tensor of `dims` dims laid out by `strides`
size_t strided(size_t i, size_t dims, const size_t* sizes, const size_t* strides) {
    if (!sizes) return i;
    size_t at = 0;
    for (size_t d = dims; d-- > 0;) {
        at += (i % sizes[d]) * strides[d];
        i /= sizes[d];
    }
    return at;
}
template <class T>
T param(void** params, int i) {
    return *static_cast<T*>(params[i]);
}
using Host = std::function<void(void**)>;
// The parameters most of candle's kernels start with, (numel, num_dims, info): `info` is the dims,
// then the strides of each strided operand in turn, null where all are contiguous.
struct Layout {
    size_t n, dims;
    const size_t* info;
    explicit Layout(void** p)
        : n(param<size_t>(p, 0)), dims(param<size_t>(p, 1)), info(param<const size_t*>(p, 2)) {}
    // where element i (in logical order) of the k-th strided operand lies
    size_t at(size_t i, int k = 1) const { return strided(i, dims, info, info ? info + k * dims : nullptr); }
};

Host unary(const std::string& op, Ty t) {
    std::function<double(double)> f;
    if (op == "copy") f = [](double x) { return x; };
    else if (op == "neg") f = [](double x) { return -x; };
    else if (op == "recip") f = [](double x) { return 1.0 / x; };
    else if (op == "exp") f = [](double x) { return std::exp(float(x)); };
    else if (op == "log") f = [](double x) { return std::log(float(x)); };
    else if (op == "sin") f = [](double x) { return std::sin(float(x)); };
    else if (op == "cos") f = [](double x) { return std::cos(float(x)); };
    else if (op == "tanh") f = [](double x) { return std::tanh(float(x)); };
    else if (op == "abs") f = [](double x) { return std::fabs(x); };
    else if (op == "sqr") f = [](double x) { return double(float(x) * float(x)); };
    else if (op == "sqrt") f = [](double x) { return std::sqrt(float(x)); };
    else if (op == "silu") f = [](double x) { return float(x) / (1.f + std::exp(-float(x))); };
    else if (op == "sigmoid") f = [](double x) { return 1.f / (1.f + std::exp(-float(x))); };
    else if (op == "relu") f = [](double x) { return x > 0 ? x : 0; };
    else if (op == "sign") f = [](double x) { return double((x > 0) - (x < 0)); };
    else return nullptr;
    return [f, t](void** p) {
        const Layout l(p);
        const void* in = param<const void*>(p, 3);
        void* out = param<void*>(p, 4);
        std::vector<double> y(l.n);
        for (size_t i = 0; i < l.n; ++i) y[i] = f(in ? load(t, in, l.at(i)) : load(t, out, i));
        for (size_t i = 0; i < l.n; ++i) store(t, out, i, y[i]);
    };
}

// `to`: the output's type (u8 for the comparisons)
Host binary(const std::string& op, Ty t, Ty to) {
    // in f64: rounded to f32, bf16 or f16 as it is stored, + − × ÷ are then rounded once, as on a GPU
    std::function<double(double, double)> f;
    if (op == "add") f = [](double x, double y) { return x + y; };
    else if (op == "sub") f = [](double x, double y) { return x - y; };
    else if (op == "mul") f = [](double x, double y) { return x * y; };
    else if (op == "div") f = [](double x, double y) { return x / y; };
    else if (op == "maximum") f = [](double x, double y) { return std::max(x, y); };
    else if (op == "minimum") f = [](double x, double y) { return std::min(x, y); };
    else if (op == "eq") f = [](double x, double y) { return double(x == y); };
    else if (op == "ne") f = [](double x, double y) { return double(x != y); };
    else if (op == "lt") f = [](double x, double y) { return double(x < y); };
    else if (op == "le") f = [](double x, double y) { return double(x <= y); };
    else if (op == "gt") f = [](double x, double y) { return double(x > y); };
    else if (op == "ge") f = [](double x, double y) { return double(x >= y); };
    else return nullptr;
    return [f, t, to](void** p) {
        const Layout l(p);
        const void *lhs = param<const void*>(p, 3), *rhs = param<const void*>(p, 4);
        void* out = param<void*>(p, 5);
        for (size_t i = 0; i < l.n; ++i) store(to, out, i, f(load(t, lhs, l.at(i, 1)), load(t, rhs, l.at(i, 2))));
    };
}

Host affine(Ty t) {
    return [t](void** p) {
        const Layout l(p);
        const void* in = param<const void*>(p, 3);
        void* out = param<void*>(p, 4);
        const float mul = float(scalar(t, p[5])), add = float(scalar(t, p[6]));
        for (size_t i = 0; i < l.n; ++i) {
            const float x = float(in ? load(t, in, l.at(i)) : load(t, out, i));
            store(t, out, i, x * mul + add);
        }
    };
}

Host cast(Ty from, Ty to) {
    return [from, to](void** p) {
        const Layout l(p);
        const void* in = param<const void*>(p, 3);
        void* out = param<void*>(p, 4);
        for (size_t i = 0; i < l.n; ++i) store(to, out, i, load(from, in, l.at(i)));
    };
}

// copy2d(src, dst, d1, d2, src_s, dst_s): dst[i·dst_s + j] = src[i·src_s + j]
Host copy2d(Ty t) {
    return [t](void** p) {
        const void* src = param<const void*>(p, 0);
        void* dst = param<void*>(p, 1);
        const uint32_t d1 = param<uint32_t>(p, 2), d2 = param<uint32_t>(p, 3);
        const uint32_t ss = param<uint32_t>(p, 4), ds = param<uint32_t>(p, 5);
        for (size_t i = 0; i < d1; ++i)
            for (size_t j = 0; j < d2; ++j) store(t, dst, i * ds + j, load(t, src, i * ss + j));
    };
}

Host fill(Ty t) {
    return [t](void** p) {
        void* buf = param<void*>(p, 0);
        const double v = scalar(t, p[1]);
        const size_t n = param<size_t>(p, 2);
        for (size_t i = 0; i < n; ++i) store(t, buf, i, v);
    };
}

// fast_<op>(src_numel, n, dims, info, src, dst) and fast_sum_small(dst_el, n, …): output o
// reduces the input's elements o·n … o·n + n − 1 (in logical order)
Host reduce(const std::string& op, Ty t, bool small) {
    if (op != "sum" && op != "max" && op != "min" && op != "argmax" && op != "argmin") return nullptr;
    return [op, t, small](void** p) {
        const auto [count, n, dims] = std::tuple{param<size_t>(p, 0), param<size_t>(p, 1), param<size_t>(p, 2)};
        const auto* info = param<const size_t*>(p, 3);
        const void* src = param<const void*>(p, 4);
        void* dst = param<void*>(p, 5);
        const size_t* strides = info ? info + dims : nullptr;
        const size_t outputs = small ? count : n == 0 ? 0 : count / n;
        for (size_t o = 0; o < outputs; ++o) {
            double acc = op == "sum" ? 0.0 : load(t, src, strided(o * n, dims, info, strides));
            uint32_t at = 0;
            for (size_t i = 0; i < n; ++i) {
                const double x = load(t, src, strided(o * n + i, dims, info, strides));
                if (op == "sum") acc += x;
                else if ((op == "max" || op == "argmax") ? x > acc : x < acc) acc = x, at = uint32_t(i);
            }
            if (op.rfind("arg", 0) == 0) static_cast<uint32_t*>(dst)[o] = at;
            else store(t, dst, o, acc);
        }
    };
}

// where_<ids>_<t>(numel, dims, info, ids, t, f, out); info: dims, then the strides of ids, t, f
Host where(Ty ids, Ty t) {
    return [ids, t](void** p) {
        const Layout l(p);
        const void *c = param<const void*>(p, 3), *on_true = param<const void*>(p, 4), *on_false = param<const void*>(p, 5);
        void* out = param<void*>(p, 6);
        for (size_t i = 0; i < l.n; ++i)
            store(t, out, i, load(ids, c, l.at(i, 1)) != 0 ? load(t, on_true, l.at(i, 2)) : load(t, on_false, l.at(i, 3)));
    };
}

// const_set_<t>(numel, dims, info, value, out): every element of the (strided) output
Host const_set(Ty t) {
    return [t](void** p) {
        const Layout l(p);
        const double v = scalar(t, p[3]);
        void* out = param<void*>(p, 4);
        for (size_t i = 0; i < l.n; ++i) store(t, out, l.at(i), v);
    };
}

// is_<ids>_<t>(numel, dims, info, ids, inp, out, left, src_dim, ids_dim, right) (index_select: the
// ids laid out by info), gather_<ids>_<t>(numel, ids, inp, out, left, src_dim, ids_dim, right) and
// ia_<ids>_<t>(ids, ids_dim, inp, out, left, src_dim, dst_dim, right) (index_add), and s_ / sa_
// (scatter, scatter_add: the ids shaped as the input)
Host indexing(const std::string& op, Ty ids, Ty t) {
    if (op == "is")
        return [ids, t](void** p) {
            const Layout l(p);
            const void *id = param<const void*>(p, 3), *in = param<const void*>(p, 4);
            void* out = param<void*>(p, 5);
            const auto [left, src, nid, right] =
                std::tuple{param<size_t>(p, 6), param<size_t>(p, 7), param<size_t>(p, 8), param<size_t>(p, 9)};
            for (size_t o = 0; o < l.n && o < left * nid * right; ++o) {
                const size_t r = o % right, i = (o / right) % nid, outer = o / (right * nid);
                const size_t row = size_t(load(ids, id, l.at(i)));
                store(t, out, o, load(t, in, (outer * src + row) * right + r));
            }
        };
    if (op == "gather")
        return [ids, t](void** p) {
            const size_t n = param<size_t>(p, 0);
            const void *id = param<const void*>(p, 1), *in = param<const void*>(p, 2);
            void* out = param<void*>(p, 3);
            const auto [left, src, nid, right] =
                std::tuple{param<size_t>(p, 4), param<size_t>(p, 5), param<size_t>(p, 6), param<size_t>(p, 7)};
            for (size_t o = 0; o < n && o < left * nid * right; ++o) {
                const size_t r = o % right, l = o / (right * nid);
                const size_t row = size_t(load(ids, id, o));
                store(t, out, o, load(t, in, (l * src + row) * right + r));
            }
        };
    if (op == "ia")
        return [ids, t](void** p) {
            const void* id = param<const void*>(p, 0);
            const size_t nid = param<size_t>(p, 1);
            const void* in = param<const void*>(p, 2);
            void* out = param<void*>(p, 3);
            const auto [left, src, dst, right] =
                std::tuple{param<size_t>(p, 4), param<size_t>(p, 5), param<size_t>(p, 6), param<size_t>(p, 7)};
            for (size_t l = 0; l < left; ++l)
                for (size_t i = 0; i < nid; ++i)
                    for (size_t r = 0; r < right; ++r) {
                        const size_t at = (l * dst + size_t(load(ids, id, i))) * right + r;
                        store(t, out, at, load(t, out, at) + load(t, in, (l * src + i) * right + r));
                    }
        };
    if (op == "s" || op == "sa")  // scatter and scatter_add(ids, inp, out, left, src_dim, dst_dim, right)
        return [ids, t, add = op == "sa"](void** p) {
            const void *id = param<const void*>(p, 0), *in = param<const void*>(p, 1);
            void* out = param<void*>(p, 2);
            const auto [left, src, dst, right] =
                std::tuple{param<size_t>(p, 3), param<size_t>(p, 4), param<size_t>(p, 5), param<size_t>(p, 6)};
            for (size_t l = 0; l < left; ++l)
                for (size_t i = 0; i < src; ++i)
                    for (size_t r = 0; r < right; ++r) {
                        const size_t from = (l * src + i) * right + r;
                        const size_t at = (l * dst + size_t(load(ids, id, from))) * right + r;
                        store(t, out, at, (add ? load(t, out, at) : 0.0) + load(t, in, from));
                    }
        };
    return nullptr;
}

Host candle_kernel(const std::string& name) {
    const auto last = name.rfind('_');
    if (last == std::string::npos) return nullptr;
    const std::string head = name.substr(0, last);
    const Ty t = ty_of(name.substr(last + 1));
    if (t == Ty::None) return nullptr;
    if (head == "affine") return affine(t);
    if (head == "copy2d") return copy2d(t);
    if (head == "fill") return fill(t);
    if (head == "const_set") return const_set(t);
    for (const char* op : {"is", "gather", "ia", "sa", "s"}) {
        const std::string prefix = std::string(op) + "_";
        if (head.rfind(prefix, 0) == 0) {
            const Ty ids = ty_of(head.substr(prefix.size()));
            return ids == Ty::None ? nullptr : indexing(op, ids, t);
        }
    }
    if (head.rfind("fast_sum_small", 0) == 0) return reduce("sum", t, true);
    if (head.rfind("fast_", 0) == 0) return reduce(head.substr(5), t, false);
    if (head.rfind("cast_", 0) == 0) {
        const Ty from = ty_of(head.substr(5));
        return from == Ty::None ? nullptr : cast(from, t);
    }
    if (head.rfind("where_", 0) == 0) {
        const Ty ids = ty_of(head.substr(6));
        return ids == Ty::None ? nullptr : where(ids, t);
    }
    if (head[0] == 'u') return unary(head.substr(1), t);
    if (head[0] == 'b') return binary(head.substr(1), t, t);
    for (const char* comparison : {"eq", "ne", "lt", "le", "gt", "ge"})
        if (head == comparison) return binary(head, t, Ty::U8);
    return nullptr;
}

struct Function {
    std::string name;
    Runner run;  // one of ferrite's kernels, emulated
    Host host;   // one of candle's, on the host
};

std::mutex lock;  // one launch at a time: the emulator's state is global
std::map<uintptr_t, size_t> allocations;
size_t used = 0, used_high = 0;
// With FAKE_CUDA_MEMORY_ONLY, freed heap buffers by size, handed out again as they are: zeroing
// a fresh one each time made a decode step's host time at B = 256 6.1 ms, against 1.4 to 2.0
// without, where the GPU's pool zeroes nothing. They hold zeros or what the small launches
// wrote, so what the host reads back stays finite (plain malloc's garbage made the composed
// ops' gradient norm non-finite, which skipped their update: their peak read 30.2 GiB, not 100.8).
std::map<size_t, std::vector<void*>> spare;
// The device's memory: FAKE_CUDA_MEMORY_GIB (128 by default, above the composed ops' 98.6 GiB
// learner step under the memory-only mode), which allocations may not exceed between them, as on
// a GPU: past it, one fails with CUDA_ERROR_OUT_OF_MEMORY.
size_t total_memory() {
    static const size_t total = [] {
        const char* v = std::getenv("FAKE_CUDA_MEMORY_GIB");
        const double gib = v != nullptr && *v != '\0' ? std::atof(v) : 128.0;
        return static_cast<size_t>(gib * 1073741824.0);
    }();
    return total;
}

// With FAKE_CUDA_MEMORY_ONLY an allocation of more than 1 MiB is its own mapping, which takes no
// host memory until it is touched, and copies and memsets of more than 1 MiB are skipped: a
// full-size step's tens of GiB of device memory would not fit in the host's otherwise. (Smaller
// ones come from the heap as before: a mapping each, a decode step's hundreds of small tensors
// spent more time in mmap and munmap than the host code that made them.)
// A buffer of n bytes that the memory-only mode maps and never touches.
bool untouched(size_t n) { return memory_only() && n > (size_t(1) << 20); }
// A buffer of n bytes that is its own mapping, which takes host memory only as it is touched: the
// memory-only mode's, and any of a GiB or more (a ballast that fills the device, as
// `gpu-check`'s memory checks allocate, costs the host nothing).
bool mapped(size_t n) { return untouched(n) || n >= (size_t(1) << 30); }

// FAKE_CUDA_PEAK=1: the live buffers by size at the process's highest use, printed at exit
// (what a peak is made of).
std::string last_launch;  // the kernel launched last (for the peak's log)
struct PeakLog {
    size_t bytes = 0;
    std::string after;
    std::map<size_t, size_t> sizes;  // size → count
    ~PeakLog() {
        if (sizes.empty()) return;
        std::vector<std::pair<size_t, size_t>> by(sizes.begin(), sizes.end());
        std::sort(by.begin(), by.end(), [](auto& a, auto& b) { return a.first * a.second > b.first * b.second; });
        std::fprintf(stderr, "fake cuda: %.2f GiB live at the peak (after %s), by buffer size:\n",
                     bytes / 1073741824.0, after.c_str());
        for (size_t i = 0; i < by.size() && i < 25; ++i)
            std::fprintf(stderr, "%10.3f GiB %6zu x %zu bytes\n", by[i].first * by[i].second / 1073741824.0,
                         by[i].second, by[i].first);
    }
};
void log_peak() {
    static const bool on = env_flag("FAKE_CUDA_PEAK");
    static PeakLog log;
    if (!on || used <= log.bytes) return;
    log.bytes = used;
    log.after = last_launch;
    log.sizes.clear();
    for (const auto& a : allocations) ++log.sizes[a.second];
}

// A fresh allocation holds what the GPU's memory pool hands out: whatever an earlier kernel left
// there, not zeros. Here it is 0xFF bytes (NaN in f32, bf16 and f16; 2^32 - 1 in u32), so that
// a launcher allocating with `alloc` where it needs `alloc_zeros`, or a kernel leaving part of
// an output unwritten, gives NaNs in the checks, where calloc's zeros passed for a right answer.
// FAKE_CUDA_ZEROED=1 hands out zeros instead. The memory-only mode (whose values are wrong
// anyway, and whose buffers are never touched) and mappings of 1 GiB or more (the memory checks'
// ballasts) are left as they come.
void poison(void* m, size_t n) {
    static const bool zeroed = env_flag("FAKE_CUDA_ZEROED");
    if (!zeroed && !memory_only() && !mapped(n)) std::memset(m, 0xff, n);
}

CUresult allocate(CUdeviceptr* p, size_t n) {
    {
        // reserved first, so that allocations on several threads cannot overrun the device
        std::lock_guard g(lock);
        if (n > total_memory() - std::min(used, total_memory())) return CUDA_ERROR_OUT_OF_MEMORY;
        used += n;
    }
    void* m = nullptr;
    if (mapped(n)) {
        m = mmap(nullptr, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (m == MAP_FAILED) m = nullptr;
    }
    std::lock_guard g(lock);
    if (!mapped(n)) {  // (a mapping that failed is the failure, with no heap buffer instead)
        if (auto s = spare.find(n); s != spare.end() && !s->second.empty()) {
            m = s->second.back();
            s->second.pop_back();
        } else {
            m = std::calloc(std::max<size_t>(n, 1), 1);
        }
    }
    if (!m) {
        used -= n;
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    poison(m, n);
    allocations[reinterpret_cast<uintptr_t>(m)] = n;
    used_high = std::max(used_high, used);
    log_peak();
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
    if (mapped(a->second)) munmap(reinterpret_cast<void*>(p), a->second);
    else if (memory_only()) spare[a->second].push_back(reinterpret_cast<void*>(p));
    else std::free(reinterpret_cast<void*>(p));
    allocations.erase(a);
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
    *total = total_memory();
    *free = total_memory() - std::min(used, total_memory());
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
    if (untouched(n)) return CUDA_SUCCESS;
    std::memcpy(reinterpret_cast<void*>(dst), src, n);
    return CUDA_SUCCESS;
}
CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t n, void*) {
    if (untouched(n)) return CUDA_SUCCESS;
    std::memcpy(dst, reinterpret_cast<const void*>(src), n);
    return CUDA_SUCCESS;
}
CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, void*) {
    // in the profile beside the kernels: a copy on the device moves memory as a kernel does
    const auto key = [&] { return "device-to-device copy of " + std::to_string(n) + " bytes"; };
    profiled(key, [&] {
        if (!untouched(n)) std::memmove(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), n);
    });
    return CUDA_SUCCESS;
}
CUresult cuMemcpyPeerAsync(CUdeviceptr dst, void*, CUdeviceptr src, void*, size_t n, void*) {
    if (untouched(n)) return CUDA_SUCCESS;
    std::memmove(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), n);
    return CUDA_SUCCESS;
}
CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char value, size_t n, void*) {
    if (untouched(n)) return CUDA_SUCCESS;
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
    Host host;
    if (static_cast<Module*>(module)->ferrite) {
        const auto k = kernels().find(name);
        if (k == kernels().end()) {
            say("ferrite's module has no kernel %s", name);
            return CUDA_ERROR_NOT_FOUND;
        }
        run = k->second;
    } else {
        host = candle_kernel(name);
    }
    *function = new Function{name, run, host};
    return CUDA_SUCCESS;
}
CUresult cuLaunchKernel(void* function, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                        unsigned bz, unsigned shared, void*, void** params, void** extra) {
    const auto* f = static_cast<Function*>(function);
    last_launch = f->name;
    const size_t threads = size_t(gx) * gy * gz * bx * by * bz;
    const auto key = [&] {
        return f->name + " <<<" + std::to_string(gx * gy * gz) + ", " + std::to_string(bx * by * bz) + ">>>";
    };
    if (memory_only() && (f->run || (f->host && threads > memory_only_threads))) {
        profiled(key, [] {});
        return CUDA_SUCCESS;
    }
    if (f->host) {
        profiled(key, [&] { f->host(params); });
        return CUDA_SUCCESS;
    }
    if (!f->run) {
        say("%s is not emulated (ferrite's kernels and candle's elementwise, cast, copy, fill, where and reduction kernels are)", f->name.c_str());
        return CUDA_ERROR_NOT_SUPPORTED;
    }
    if (gy != 1 || gz != 1 || by != 1 || bz != 1 || extra != nullptr) {
        say("%s: only 1-D launches with a parameter list are emulated", f->name.c_str());
        return CUDA_ERROR_NOT_SUPPORTED;
    }
    std::lock_guard g(lock);
    profiled(key, [&] { f->run(params, gx, bx, shared); });
    return CUDA_SUCCESS;
}
}  // extern "C"

#elif FAKE_CUDA_LIB == 2  // libcublas.so.13: a handle, and the batched matrix multiply as loops

#include "cuda_bf16.h"

#include <thread>

namespace {
// CUDA data types: 0 f32, 2 f16, 14 bf16
int bytes(int type) { return type == 0 ? 4 : 2; }
// an element of a column-major matrix of CUDA data type `type`
float element(int type, const void* p, long long i) {
    switch (type) {
        case 14: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
        case 2: return float(static_cast<const _Float16*>(p)[i]);
        default: return static_cast<const float*>(p)[i];
    }
}
}  // namespace

extern "C" {
int cublasCreate_v2(void** handle) {
    static int token;
    *handle = &token;
    return 0;
}
int cublasDestroy_v2(void*) { return 0; }
int cublasSetStream_v2(void*, void*) { return 0; }
// C = α·op(A)·op(B) + β·C per batch, column-major, in f32 (compute types 32F, with f32 α and β);
// A, B and C f32, f16 or bf16. CUBLAS_STATUS_NOT_SUPPORTED (15) for anything else.
int cublasGemmStridedBatchedEx(void*, int transa, int transb, int m, int n, int k, const void* alpha, const void* a,
                               int atype, int lda, long long stride_a, const void* b, int btype, int ldb,
                               long long stride_b, const void* beta, void* c, int ctype, int ldc, long long stride_c,
                               int batches, int compute, int) {
    const auto known = [](int t) { return t == 0 || t == 2 || t == 14; };
    if (!known(atype) || !known(btype) || !known(ctype) || compute == 64 || compute == 65) {
        std::fprintf(stderr, "fake cuda: cuBLAS gemm of types %d, %d -> %d (compute %d) is not emulated\n", atype,
                     btype, ctype, compute);
        return 15;
    }
    const auto key = [&] {
        std::string shape = "gemm " + std::to_string(m) + " x " + std::to_string(n) + " x " + std::to_string(k);
        if (batches > 1) shape += ", " + std::to_string(batches) + " batches";
        return shape + (ctype == 14 ? " bf16" : ctype == 2 ? " f16" : " f32");
    };
    if (memory_only()) {
        profiled(key, [] {});
        return 0;
    }
    profiled(key, [&] {
        const float al = *static_cast<const float*>(alpha), be = *static_cast<const float*>(beta);
        // per batch: op(A) packed as m rows of k, op(B) as n rows of k, so that each element of C is
        // a dot product of two contiguous rows; the columns of C split over the host's threads
        std::vector<float> ap(size_t(m) * k), bp(size_t(n) * k);
        const unsigned threads = std::max(1u, std::min(16u, std::thread::hardware_concurrency()));
        for (int bt = 0; bt < batches; ++bt) {
            const void* ab = static_cast<const char*>(a) + bt * stride_a * bytes(atype);
            const void* bb = static_cast<const char*>(b) + bt * stride_b * bytes(btype);
            void* cb = static_cast<char*>(c) + bt * stride_c * bytes(ctype);
            for (int i = 0; i < m; ++i)
                for (int l = 0; l < k; ++l)
                    ap[size_t(i) * k + l] = element(atype, ab, transa ? l + (long long)i * lda : i + (long long)l * lda);
            for (int j = 0; j < n; ++j)
                for (int l = 0; l < k; ++l)
                    bp[size_t(j) * k + l] = element(btype, bb, transb ? j + (long long)l * ldb : l + (long long)j * ldb);
            auto columns = [&](int from, int to) {
                for (int j = from; j < to; ++j)
                    for (int i = 0; i < m; ++i) {
                        const float *x = &ap[size_t(i) * k], *y = &bp[size_t(j) * k];
                        float part[8] = {};
                        int l = 0;
                        for (; l + 8 <= k; l += 8)
                            for (int u = 0; u < 8; ++u) part[u] += x[l + u] * y[l + u];
                        float acc = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
                        for (; l < k; ++l) acc += x[l] * y[l];
                        const long long at = i + (long long)j * ldc;
                        const float old = be == 0.f ? 0.f : element(ctype, cb, at);
                        const float v = al * acc + be * old;
                        if (ctype == 14) static_cast<__nv_bfloat16*>(cb)[at] = __float2bfloat16(v);
                        else if (ctype == 2) static_cast<_Float16*>(cb)[at] = _Float16(v);
                        else static_cast<float*>(cb)[at] = v;
                    }
            };
            std::vector<std::thread> pool;
            const int per = (n + int(threads) - 1) / int(threads);
            for (int from = 0; from < n; from += per) pool.emplace_back(columns, from, std::min(n, from + per));
            for (auto& t : pool) t.join();
        }
    });
    return 0;
}
int cublasDgemmStridedBatched() {
    std::fputs("fake cuda: f64 cuBLAS gemm is not emulated\n", stderr);
    return 15;
}
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
