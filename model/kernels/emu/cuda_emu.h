// A CUDA execution model on the CPU, for the kernel emulation tests (model/tests/kernel_emulation.rs):
// kernels/ferrite.cu compiles with g++ against this header and runs with one fiber (its own stack)
// per CUDA thread, so its index arithmetic, its barriers, warp shuffles, shared
// memory and atomics are exercised on a machine without a GPU.
//
// The model: blocks run one after another; the threads of a block run as fibers on one OS thread,
// each until it waits at a barrier or returns, in turn; `__syncthreads` is a barrier of the
// block's live threads, `__shfl_xor_sync` exchanges through one slot per thread between two
// barriers of the warp; a thread that returns drops out of both barriers, as exited threads do on
// Volta and later. A round in which every live thread waits and none is released is a deadlock,
// and fails the launch. Launches check CUDA's limits: at most 1024 threads a block, 48 KiB of
// dynamic shared memory. Only 1-D grids and blocks, as ferrite launches. Fast-math intrinsics are
// their exact libm counterparts.
//
// (One OS thread per CUDA thread, as this emulator had first, spent most of its time in the
// kernel: every barrier of 256 threads on two cores was 256 futex waits, wake-ups and context
// switches. A fiber switch is a function call: the registers the ABI keeps, and the stack pointer.)
//
// Shared memory is checked for races, as compute-sanitizer's racecheck does: the test rewrites
// every `__shared__` declaration to an `emu::Shared` array, which starts each block as NaN bytes
// (it is uninitialised on the GPU) and records who read and wrote each element since the last
// barrier. An element written by one thread and read, written or updated atomically by another
// between the same two barriers is a race: the launch stops with exit status 4 and says where.
// The race check does not depend on the order the fibers run in: it records every access. One OS
// thread runs every fiber, so the shared arrays, the registry and the atomics need no locks.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <memory>
#include <vector>

#include <sys/mman.h>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

// The switch between the scheduler and a fiber. On x86-64 it is our own: the callee-saved
// registers pushed on the stack being left, the stack pointer saved and the other one's restored,
// and popped from there. glibc's swapcontext also saves and restores the signal mask, a system
// call each way, which was three quarters of the fake CUDA library's time (perf, 2026-12-05). The
// MXCSR and x87 control words, callee-saved too, are not switched: no kernel or emulator code
// changes the rounding mode or the exception masks, and saving them (stmxcsr, fnstcw, ldmxcsr,
// fldcw) was a quarter of the fake's time. Elsewhere, or with EMU_UCONTEXT defined: ucontext.
#if defined(__x86_64__) && !defined(EMU_UCONTEXT)
#define EMU_OWN_SWITCH 1
// emu_switch(save, to): saves the running stack's pointer in *save and continues on `to`'s.
extern "C" void emu_switch(void** save, void* to);
asm(R"(
    .pushsection .text.emu_switch,"axG",@progbits,emu_switch,comdat
    .globl emu_switch
    .hidden emu_switch
    .type emu_switch,@function
emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_switch, .-emu_switch
    .popsection
)");
#else
#define EMU_OWN_SWITCH 0
#include <ucontext.h>
#endif

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

namespace emu {
// the running fiber's: the scheduler sets them before it switches to a fiber
inline dim3 thread_idx, block_idx;
inline dim3 block_dim, grid_dim;
class Barrier;
inline Barrier* block_barrier = nullptr;
inline std::vector<std::unique_ptr<Barrier>> warp_barriers;
inline std::vector<float> lanes;
inline std::vector<uint32_t> mma_regs;  // a warp's mma fragments: 6 per thread (a0..a3, b0, b1)
inline std::vector<size_t> ldsm_rows;   // a warp's ldmatrix row addresses: 1 per thread

[[noreturn]] inline void fail(const char* what) {
    std::fprintf(stderr, "emu: %s\n", what);
    std::fflush(stderr);
    std::_Exit(3);
}

inline unsigned epoch = 0;  // block barriers the running thread has passed (saved per fiber)

// Who touched one shared element since the last barrier (epochs are per block).
struct Access {
    unsigned write_epoch = ~0u, read_epoch = ~0u, atomic_epoch = ~0u;
    int writer = -1, reader = -1;  // reader -2: several threads
};

struct SharedBase {
    virtual void reset() = 0;
    virtual ~SharedBase() = default;
};
inline std::vector<SharedBase*> registry;

template <class T>
class Shared;
// `&a[i]` of a shared array, for the atomics.
template <class T>
struct SharedPtr {
    Shared<T>* s;
    size_t i;
};

// A `__shared__` array (or scalar: element 0) under race checking.
template <class T>
class Shared : public SharedBase {
   public:
    // `registered`: reset at the start of every block (static declarations)
    Shared(const char* name, size_t n, bool registered = true) : name_(name), data_(n), meta_(n) {
        reset();
        if (!registered) return;
        registry.push_back(this);
    }
    void reset() override {
        std::memset(static_cast<void*>(data_.data()), 0xff, data_.size() * sizeof(T));
        meta_.assign(meta_.size(), Access{});
    }

    struct Ref {
        Shared* s;
        size_t i;
        operator T() const { return s->read(i); }
        Ref& operator=(T v) {
            s->write(i, v);
            return *this;
        }
        Ref& operator+=(T v) {
            s->write(i, s->read(i) + v);
            return *this;
        }
        SharedPtr<T> operator&() const { return {s, i}; }
    };
    Ref operator[](size_t i) { return {this, i}; }
    Shared& operator=(T v) {
        write(0, v);
        return *this;
    }
    operator T() { return read(0); }

    T read(size_t i) {
        Access& a = at(i);
        const int t = int(thread_idx.x);
        if (a.write_epoch == epoch && a.writer != t) race(i, "written by thread", a.writer, "read");
        if (a.atomic_epoch == epoch) race(i, "updated atomically", -1, "read");
        if (a.read_epoch == epoch && a.reader != t) a.reader = -2;
        else if (a.read_epoch != epoch) a.read_epoch = epoch, a.reader = t;
        return data_[i];
    }
    void write(size_t i, T v) {
        Access& a = at(i);
        const int t = int(thread_idx.x);
        if (a.write_epoch == epoch && a.writer != t) race(i, "written by thread", a.writer, "written");
        if (a.read_epoch == epoch && a.reader != t) race(i, "read by thread", a.reader, "written");
        if (a.atomic_epoch == epoch) race(i, "updated atomically", -1, "written");
        a.write_epoch = epoch;
        a.writer = t;
        data_[i] = v;
    }
    // `f(old)` stored atomically; returns the old value.
    template <class F>
    T atomic(size_t i, F f) {
        Access& a = at(i);
        const int t = int(thread_idx.x);
        if (a.write_epoch == epoch && a.writer != t)
            race(i, "written by thread", a.writer, "updated atomically");
        if (a.read_epoch == epoch && a.reader != t) race(i, "read by thread", a.reader, "updated atomically");
        a.atomic_epoch = epoch;
        const T old = data_[i];
        data_[i] = f(old);
        return old;
    }

   private:
    Access& at(size_t i) {
        if (i >= data_.size()) {
            std::fprintf(stderr, "emu: shared `%s`[%zu] out of bounds (%zu)\n", name_, i, data_.size());
            std::fflush(stderr);
            std::_Exit(4);
        }
        return meta_[i];
    }
    // `first` (by `other`: a thread, -2 several, -1 unnamed), then `then` by this thread, with no
    // barrier between
    [[noreturn]] void race(size_t i, const char* first, int other, const char* then) {
        char by[32] = "";
        if (other == -2) std::snprintf(by, sizeof by, "s (several)");
        else if (other >= 0) std::snprintf(by, sizeof by, " %d", other);
        std::fprintf(stderr,
                     "emu: race on shared `%s`[%zu] in block %u: %s%s, then %s by thread %u, with no "
                     "barrier between\n",
                     name_, i, block_idx.x, first, by, then, thread_idx.x);
        std::fflush(stderr);
        std::_Exit(4);
    }
    const char* name_;
    std::vector<T> data_;
    std::vector<Access> meta_;
};
// cp.async (cp.async.cg.shared.global, 16 bytes) under the race check, made as late as the GPU
// may make it: issued, the copy writes its 4 words with NaN bytes, a write in the issue's barrier
// interval (a thread that read them in that interval races with it); at the issuing thread's
// cp.async.wait_group it writes the bytes it read at the issue, a write in the wait's interval (a
// read by another thread before the barrier after the wait races with it, and a read in between
// sees NaN). A thread that ends with copies it never waited for fails the launch.
struct AsyncCopy {
    Shared<uint32_t>* dst;
    size_t word;
    uint32_t bytes[4];
};
struct AsyncCopies {
    std::vector<AsyncCopy> open;                  // issued since the last commit
    std::vector<std::vector<AsyncCopy>> groups;  // committed, oldest first
};
inline std::vector<AsyncCopies> async_copies;  // per thread of the running block

inline void cp_async_16(Shared<uint32_t>& dst, int word, const void* src, bool valid) {
    if (word < 0 || word % 4 != 0) fail("cp.async: a shared address is not 16-byte aligned");
    if (valid && reinterpret_cast<uintptr_t>(src) % 16 != 0) fail("cp.async: a global address is not 16-byte aligned");
    AsyncCopy c{&dst, size_t(word), {0, 0, 0, 0}};
    if (valid) std::memcpy(c.bytes, src, 16);
    for (size_t i = 0; i < 4; ++i) dst.write(c.word + i, 0xffffffffu);
    async_copies[thread_idx.x].open.push_back(c);
}
inline void cp_async_commit() {
    AsyncCopies& a = async_copies[thread_idx.x];
    a.groups.push_back(std::move(a.open));
    a.open.clear();
}
inline void cp_async_wait(int n) {
    AsyncCopies& a = async_copies[thread_idx.x];
    while (a.groups.size() > size_t(n)) {
        for (const AsyncCopy& c : a.groups.front())
            for (size_t i = 0; i < 4; ++i) c.dst->write(c.word + i, c.bytes[i]);
        a.groups.erase(a.groups.begin());
    }
}

// The block's dynamic shared memory, as floats (all that ferrite's kernels keep there).
inline std::unique_ptr<Shared<float>> dynamic;

inline void start_block(size_t dynamic_floats) {
    for (auto* s : registry) s->reset();
    dynamic = std::make_unique<Shared<float>>("extern __shared__", dynamic_floats, false);
    async_copies.assign(block_dim.x, AsyncCopies{});
}

// The fibers of the running block, and the scheduler's context they switch back to.
struct Fiber {
#if EMU_OWN_SWITCH
    void* sp = nullptr;  // its saved stack pointer while it is switched out
#else
    ucontext_t ctx;
#endif
    char* stack = nullptr;
    bool done = false;
    unsigned epoch = 0;
};
inline constexpr size_t fiber_stack = 256 * 1024;
// Stacks are laid out this far apart, not fiber_stack: at a power-of-two stride every fiber's top
// frames fall in the same cache sets, and each switch missed the cache (two thirds of the fake
// CUDA library's time went to the first pop after a switch). 64 bytes more than a page on top
// spreads them over every set of L1 and over L2's.
inline constexpr size_t fiber_stride = fiber_stack + 4096 + 64;
inline std::vector<Fiber> fibers;
#if EMU_OWN_SWITCH
inline void* scheduler = nullptr;  // the scheduler's saved stack pointer while a fiber runs
#else
inline ucontext_t scheduler;
#endif
inline bool progress = false;  // a thread started, was released from a barrier, or returned
inline void (*body)(void*) = nullptr;
inline void* body_arg = nullptr;

#if EMU_OWN_SWITCH
inline void to_fiber(Fiber& f) { emu_switch(&scheduler, f.sp); }
inline void to_scheduler(Fiber& f) { emu_switch(&f.sp, scheduler); }
#else
inline void to_fiber(Fiber& f) { swapcontext(&scheduler, &f.ctx); }
inline void to_scheduler(Fiber& f) { swapcontext(&f.ctx, &scheduler); }
#endif

// AddressSanitizer must be told of every switch between stacks (its fiber annotations).
#if defined(__SANITIZE_ADDRESS__)
inline const void* main_bottom = nullptr;
inline size_t main_size = 0;
inline void enter_fiber(Fiber& f) {
    void* fake = nullptr;
    __sanitizer_start_switch_fiber(&fake, f.stack, fiber_stack);
    to_fiber(f);
    __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
}
inline void leave_fiber(Fiber& f, bool finished) {
    void* fake = nullptr;
    __sanitizer_start_switch_fiber(finished ? nullptr : &fake, main_bottom, main_size);
    to_scheduler(f);
    __sanitizer_finish_switch_fiber(fake, &main_bottom, &main_size);
}
inline void fiber_started() { __sanitizer_finish_switch_fiber(nullptr, &main_bottom, &main_size); }
inline void unpoison_top(char* stack) {
    constexpr size_t top = 16 * 1024;
    ASAN_UNPOISON_MEMORY_REGION(stack + fiber_stack - top, top);
}
#else
inline void enter_fiber(Fiber& f) { to_fiber(f); }
inline void leave_fiber(Fiber& f, bool) { to_scheduler(f); }
inline void fiber_started() {}
inline void unpoison_top(char*) {}
#endif

// The running thread waits for the others: back to the scheduler until it is its turn again.
inline void yield() { leave_fiber(fibers[thread_idx.x], false); }

// A barrier of a block's (or a warp's) threads, as std::barrier: `arrive_and_wait` returns once
// every participant of the phase has arrived; `arrive_and_drop` arrives and leaves for good.
class Barrier {
   public:
    explicit Barrier(unsigned n) : expected_(n) {}
    void arrive_and_wait() {
        const unsigned long phase = phase_;
        arrive();
        while (phase_ == phase) yield();
        progress = true;
    }
    void arrive_and_drop() {
        --expected_;
        if (arrived_ > 0 && arrived_ >= expected_) complete();
    }

   private:
    void arrive() {
        if (++arrived_ >= expected_) complete();
    }
    void complete() {
        arrived_ = 0;
        ++phase_;
        progress = true;
    }
    unsigned expected_, arrived_ = 0;
    unsigned long phase_ = 0;
};

inline void fiber_main(int t) {
    fiber_started();
    progress = true;
    body(body_arg);
    if (!async_copies[t].open.empty() || !async_copies[t].groups.empty())
        fail("a thread ended with cp.async copies it never waited for");
    warp_barriers[unsigned(t) / 32]->arrive_and_drop();
    block_barrier->arrive_and_drop();
    fibers[t].done = true;
    progress = true;
    leave_fiber(fibers[t], true);  // never resumed
    fail("a finished thread was resumed");
}

// Makes `f` start at fiber_main(t) on its own stack when it is first switched to.
#if EMU_OWN_SWITCH
[[noreturn]] inline void fiber_entry() {
    fiber_main(int(thread_idx.x));  // the scheduler sets thread_idx before every switch
    fail("a finished thread returned");
}
inline void start_fiber(Fiber& f, unsigned) {
    // the frame emu_switch pops (from the bottom): r15, r14, r13, r12, rbx, rbp and its return
    // address, fiber_entry's; above that fiber_entry's own return address slot (none), 8 bytes
    // off the 16-byte alignment as at any function's entry
    auto* top = reinterpret_cast<uint64_t*>(f.stack + fiber_stack);
    top[-1] = 0;
    top[-2] = reinterpret_cast<uint64_t>(&fiber_entry);
    for (int r = 3; r <= 8; ++r) top[-r] = 0;
    f.sp = &top[-8];
}
#else
inline void start_fiber(Fiber& f, unsigned t) {
    getcontext(&f.ctx);
    f.ctx.uc_stack = {f.stack, 0, fiber_stack};
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, reinterpret_cast<void (*)()>(fiber_main), 1, int(t));
    // makecontext has placed the stack; a context's stack is what AddressSanitizer's swapcontext
    // clears the shadow of on every switch into it (32 KiB of memset, half the emulation's time
    // when it was used), so the context forgets it
    f.ctx.uc_stack = {nullptr, 0, 0};
}
#endif

// The order blocks and threads run in, EMU_BLOCK_ORDER: first to last (unset), `reverse` (a
// grid's blocks last to first, and each block's threads last to first between two barriers) or
// `shuffle` (the blocks in a permutation of its own for every launch of the process). A GPU runs
// a grid's blocks in any order, at once or not, and a block's warps in any order between
// barriers, so a kernel whose result depends on the order (a thread reading global memory
// another wrote in the same launch with no barrier between, floats added atomically, whose
// rounding follows the order of the adds) is a bug, or nondeterministic: the kernel tests run
// every launch first to last and in reverse and ask for the same bits, and the CUDA stand-in
// under `shuffle` runs a step twice in two orders.
enum class Order { Forward, Reverse, Shuffle };
inline Order run_order() {
    const char* v = std::getenv("EMU_BLOCK_ORDER");
    if (v != nullptr && std::strcmp(v, "reverse") == 0) return Order::Reverse;
    if (v != nullptr && std::strcmp(v, "shuffle") == 0) return Order::Shuffle;
    return Order::Forward;
}
inline std::vector<unsigned> block_order(unsigned grid, Order how) {
    std::vector<unsigned> order(grid);
    for (unsigned i = 0; i < grid; ++i) order[i] = i;
    if (how == Order::Reverse) std::reverse(order.begin(), order.end());
    if (how == Order::Shuffle) {
        static uint64_t launches = 0;
        uint64_t state = 0x9e3779b97f4a7c15ull * ++launches;
        for (unsigned i = grid; i > 1; --i) {  // Fisher–Yates, a 64-bit LCG's high bits
            state = state * 6364136223846793005ull + 1442695040888963407ull;
            std::swap(order[i - 1], order[(state >> 33) % i]);
        }
    }
    return order;
}

template <class F>
void launch(unsigned grid, unsigned block, size_t shared_bytes, F kernel) {
    if (block == 0 || block > 1024) fail("block size must be 1..=1024 threads");
    if (grid == 0) fail("empty grid");
    if (shared_bytes > 48 * 1024) fail("more than 48 KiB of dynamic shared memory");
    grid_dim = {grid, 1, 1};
    block_dim = {block, 1, 1};
    body = [](void* k) { (*static_cast<F*>(k))(); };
    body_arg = &kernel;
    fibers.assign(block, Fiber{});
    const size_t bytes = size_t(block) * fiber_stride;
#if defined(__SANITIZE_ADDRESS__)
    void* stacks = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (stacks == MAP_FAILED) fail("no memory for the threads' stacks");
#else
    // without AddressSanitizer (the fake CUDA library, which launches thousands of kernels) the
    // stacks are kept from launch to launch: mapping and faulting them in again cost more than
    // the kernels
    static void* stacks = nullptr;
    static size_t mapped = 0;
    if (bytes > mapped) {
        if (stacks) munmap(stacks, mapped);
        stacks = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (stacks == MAP_FAILED) fail("no memory for the threads' stacks");
        mapped = bytes;
    }
#endif
    for (unsigned t = 0; t < block; ++t) fibers[t].stack = static_cast<char*>(stacks) + t * fiber_stride;
    const Order how = run_order();
    const bool reverse_threads = how == Order::Reverse;
    for (const unsigned b : block_order(grid, how)) {
        Barrier bar(block);
        block_barrier = &bar;
        warp_barriers.clear();
        for (unsigned w = 0; w * 32 < block; ++w)
            warp_barriers.push_back(std::make_unique<Barrier>(std::min(32u, block - w * 32)));
        lanes.assign(block, 0.f);
        mma_regs.assign(size_t(block) * 6, 0u);
        ldsm_rows.assign(block, 0);
        start_block(shared_bytes / sizeof(float));
        for (unsigned t = 0; t < block; ++t) {
            Fiber& f = fibers[t];
            f.done = false;
            f.epoch = 0;
            // The previous block's fiber left its last frames' redzones poisoned at the top of
            // this stack: instrumented frames rewrite their shadow on entry, but start_fiber's
            // writes of the first frame there, or an intercepted libc call reading or writing a
            // stack buffer there, would be reported, so that top is cleared once a block, first
            // (the flash kernels' frames, 2026-12-06, left a redzone where start_fiber writes)
            unpoison_top(f.stack);
            start_fiber(f, t);
        }
        block_idx = {b, 0, 0};
        for (unsigned live = block; live > 0;) {
            progress = false;
            for (unsigned i = 0; i < block; ++i) {
                const unsigned t = reverse_threads ? block - 1 - i : i;
                Fiber& f = fibers[t];
                if (f.done) continue;
                thread_idx = {t, 0, 0};
                epoch = f.epoch;
                enter_fiber(f);
                f.epoch = epoch;
                if (f.done) --live;
            }
            if (live > 0 && !progress) fail("deadlock: every live thread waits at a barrier no other reaches");
        }
    }
#if defined(__SANITIZE_ADDRESS__)
    munmap(stacks, bytes);
#endif
}
}  // namespace emu

#define threadIdx emu::thread_idx
#define blockIdx emu::block_idx
#define blockDim emu::block_dim
#define gridDim emu::grid_dim
// The keys the flash kernels' blocks visit, by walk (ferrite.cu's EMU_COUNT_KEYS: 0 the forward,
// 1 dQ), counted by each block's thread 0; driver.cpp writes them after the buffers.
namespace emu {
inline std::atomic<unsigned long long> keys_visited[2];
}
#define EMU_COUNT_KEYS(walk, keys) \
    (threadIdx.x == 0 ? (void)(emu::keys_visited[walk] += (unsigned long long)(keys)) : (void)0)
// A wide load or store at p (ferrite.cu's ld_pair, st_pair) must be `bytes`-aligned, or the GPU
// faults.
#define EMU_ALIGNED(p, bytes)                                                             \
    (reinterpret_cast<uintptr_t>(p) % (bytes) == 0 ? (void)0                              \
                                                   : emu::fail("a misaligned " #bytes "-byte access"))
// The test rewrites `__shared__ T name[N];`, `__shared__ T name;` and `extern __shared__ T name[];`
// to these.
#define EMU_SHARED(T, name, n) static emu::Shared<T> name(#name, n)
#define EMU_DYNAMIC_SHARED(T, name)                                               \
    static_assert(std::is_same_v<T, float>, "dynamic shared memory holds floats"); \
    emu::Shared<float>& name = *emu::dynamic
#define __global__
#define __device__
#define __forceinline__ inline

inline void __syncthreads() {
    emu::block_barrier->arrive_and_wait();
    ++emu::epoch;
}

inline float __shfl_xor_sync(unsigned mask, float v, int lane_mask) {
    if (mask != 0xffffffffu) emu::fail("only full-warp shuffles are emulated");
    const unsigned t = threadIdx.x, src = t ^ unsigned(lane_mask);
    auto& warp = *emu::warp_barriers[t / 32];
    emu::lanes[t] = v;
    warp.arrive_and_wait();
    const float r = src < blockDim.x ? emu::lanes[src] : v;
    warp.arrive_and_wait();
    return r;
}

inline float atomicAdd(float* p, float v) {
    const float old = *p;
    *p = old + v;
    return old;
}

template <class T>
T atomicAdd(emu::SharedPtr<T> p, std::type_identity_t<T> v) {
    return p.s->atomic(p.i, [v](T old) { return T(old + v); });
}

inline int atomicMin(emu::Shared<int>* p, int v) {
    return p->atomic(0, [v](int old) { return std::min(old, v); });
}

inline float __expf(float x) { return std::exp(x); }
inline uint32_t __float_as_uint(float x) {
    uint32_t u;
    std::memcpy(&u, &x, 4);
    return u;
}
inline float __uint_as_float(uint32_t u) {
    float x;
    std::memcpy(&x, &u, 4);
    return x;
}
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }

namespace emu {
// The tensor cores' mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 for the calling thread's
// warp, by the PTX ISA's fragment layouts: lane = 4·g + c holds A's a0 = (row g, cols 2c, 2c+1),
// a1 = (g+8, 2c..), a2 = (g, 2c+8..), a3 = (g+8, 2c+8..); B's b0 = (rows 2c, 2c+1, col g),
// b1 = (rows 2c+8.., col g); C's c0, c1 = (row g, cols 2c, 2c+1), c2, c3 = (row g+8, ...); two
// bf16 to a u32, the lower index in the low half. Every lane of a full warp must call it (it is
// .sync.aligned); the products are summed in f32 in k order. F16: the .f16 variant, whose
// fragments are laid out alike.
template <bool F16>
inline void mma_m16n8k16(float* c, const uint32_t* a, const uint32_t* b) {
    const unsigned t = threadIdx.x, lane = t & 31, base = t - lane;
    if (blockDim.x < base + 32) fail("mma.sync needs a full warp");
    auto& warp = *warp_barriers[t / 32];
    for (int i = 0; i < 4; ++i) mma_regs[6 * t + i] = a[i];
    mma_regs[6 * t + 4] = b[0];
    mma_regs[6 * t + 5] = b[1];
    warp.arrive_and_wait();
    const auto half = [](uint32_t r, int k) {
        const uint32_t bits = k & 1 ? r >> 16 : r & 0xffffu;
        if constexpr (F16) {
            const uint16_t b16 = uint16_t(bits);
            _Float16 h;
            std::memcpy(&h, &b16, 2);
            return float(h);
        }
        const uint32_t u = bits << 16;
        float f;
        std::memcpy(&f, &u, 4);
        return f;
    };
    const auto at_a = [&](int row, int k) {
        const unsigned from = base + 4 * (row % 8) + (k % 8) / 2;
        return half(mma_regs[6 * from + (row >= 8) + 2 * (k >= 8)], k);
    };
    const auto at_b = [&](int k, int col) {
        const unsigned from = base + 4 * col + (k % 8) / 2;
        return half(mma_regs[6 * from + 4 + (k >= 8)], k);
    };
    const int g = int(lane) / 4, cc = int(lane) % 4;
    // this lane's two rows of A and two columns of B, unpacked once
    float rows[2][16], cols[2][16];
    for (int k = 0; k < 16; ++k) {
        rows[0][k] = at_a(g, k), rows[1][k] = at_a(g + 8, k);
        cols[0][k] = at_b(k, 2 * cc), cols[1][k] = at_b(k, 2 * cc + 1);
    }
    float d[4];
    for (int e = 0; e < 4; ++e) {
        float acc = c[e];
        for (int k = 0; k < 16; ++k) acc += rows[e / 2][k] * cols[e % 2][k];
        d[e] = acc;
    }
    warp.arrive_and_wait();
    for (int e = 0; e < 4; ++e) c[e] = d[e];
}
}  // namespace emu

namespace emu {
// ldmatrix.sync.aligned.m8n8.x4(.trans).shared.b16 for the calling thread's warp, from a shared
// tile of u32 words (two bf16 each, the lower index in the low half): lane l gives `word`, the
// start of row l % 8 of matrix l / 8 (16-byte aligned: a multiple of 4 words), and gets in r[i]
// matrix i's row l / 4, columns 2(l % 4) and +1 (one word); `trans`: its column l / 4, rows
// 2(l % 4) and +1, packed. Every lane of a full warp must call it.
template <class Smem>
void ldmatrix_x4(Smem& tile, int word, bool trans, uint32_t* r) {
    const unsigned t = threadIdx.x, lane = t & 31, base = t - lane;
    if (blockDim.x < base + 32) fail("ldmatrix needs a full warp");
    if (word < 0 || word % 4 != 0) fail("ldmatrix: a row address is not 16-byte aligned");
    auto& warp = *warp_barriers[t / 32];
    ldsm_rows[t] = size_t(word);
    warp.arrive_and_wait();
    uint32_t out[4];
    for (unsigned i = 0; i < 4; ++i) {
        const auto row = [&](unsigned k) { return ldsm_rows[base + 8 * i + k]; };
        if (!trans) {
            out[i] = tile[row(lane / 4) + lane % 4];
            continue;
        }
        const unsigned col = lane / 4, r0 = 2 * (lane % 4);
        const auto elem = [&](unsigned k) -> uint32_t {
            const uint32_t w = tile[row(k) + col / 2];
            return col % 2 ? w >> 16 : w & 0xffffu;
        };
        out[i] = elem(r0) | (elem(r0 + 1) << 16);
    }
    warp.arrive_and_wait();
    for (int i = 0; i < 4; ++i) r[i] = out[i];
}
}  // namespace emu
