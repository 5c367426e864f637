// The kernel emulation tests' launcher: runs one kernel of kernels/ferrite.cu on the CPU (see
// cuda_emu.h) and writes back its buffers. The test generates `kernels.inc` (ferrite.cu with its
// `extern __shared__` declarations rewritten) and `registry.inc` (one `{"name", runner(name)},`
// per kernel) next to this file's copy.
//
// stdin:  name (u32 length, bytes), grid, block, shared bytes (u32 each), the argument count (u32),
//         then per argument a tag byte and its value: 'F' f32 / 'B' bf16 / 'H' f16 / 'U' u32 buffer (u64
//         element count, then the elements), 'i' int (i32), 'z' size_t (u64), 'f' float (f32),
//         'P' a table of device addresses (`const u64*`: u64 count, then per entry 'n' for a null
//         address or a tagged buffer, which the table points to).
// stdout: every buffer argument after the launch, in order, as its element count and elements (a
//         table's buffers in its place), then the keys the flash kernels' walks visited (two u64:
//         the forward's, dQ's; see EMU_COUNT_KEYS).
// Arguments must match the kernel's parameters in number, order and type, or the launch fails.
#include "cuda_emu.h"

#include "kernels.inc"

#include <functional>
#include <map>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

namespace {

struct Arg {
    char tag;
    std::vector<unsigned char> bytes;
    std::vector<Arg> table;  // 'P': the buffers its addresses point to ('n': none)
};

template <class E>
constexpr char buffer_tag() {
    if constexpr (std::is_same_v<E, float>) return 'F';
    else if constexpr (std::is_same_v<E, bf16>) return 'B';
    else if constexpr (std::is_same_v<E, f16>) return 'H';
    else if constexpr (std::is_same_v<E, uint32_t>) return 'U';
    else if constexpr (std::is_same_v<E, unsigned long long>) return 'P';
    else return '?';
}

template <class T>
constexpr char tag_of() {
    if constexpr (std::is_pointer_v<T>) return buffer_tag<std::remove_cv_t<std::remove_pointer_t<T>>>();
    else if constexpr (std::is_same_v<T, int>) return 'i';
    else if constexpr (std::is_same_v<T, size_t>) return 'z';
    else if constexpr (std::is_same_v<T, float>) return 'f';
    else return '?';
}

template <class T>
T get(Arg& a, size_t i) {
    if (a.tag != tag_of<T>()) {
        std::fprintf(stderr, "emu: argument %zu is '%c', the kernel takes '%c'\n", i, a.tag, tag_of<T>());
        std::fflush(stderr);
        std::_Exit(2);
    }
    if constexpr (std::is_pointer_v<T>) {
        return reinterpret_cast<T>(a.bytes.data());
    } else {
        T v;
        std::memcpy(&v, a.bytes.data(), sizeof(T));
        return v;
    }
}

template <class... A, size_t... I>
std::tuple<A...> typed(std::vector<Arg>& args, std::index_sequence<I...>) {
    return {get<A>(args[I], I)...};
}

// Faulty kernels that the tests expect the emulator to reject: a shared-memory race (thread 0
// writes what the others read with no barrier between), a read past the end of a buffer, a read
// past the end of a thread's own array (on its fiber's stack), and a deadlock (thread 0 waits at
// the block's barrier while its warp waits for it at a shuffle: a GPU would hang), an
// asynchronous copy read before it has landed, blocks or threads that depend on the order they
// run in,
// and a misaligned 32-bit load.
extern "C" __global__ void emu_racy(float* out) {
    EMU_SHARED(float, cell, 1);
    if (threadIdx.x == 0) cell = 1.f;
    out[threadIdx.x] = cell;
}
extern "C" __global__ void emu_overflow(const float* x, float* y) { y[threadIdx.x] = x[threadIdx.x + 1]; }
extern "C" __global__ void emu_stack_overflow(float* y, int n) {
    float own[4] = {1.f, 2.f, 3.f, 4.f};
    y[threadIdx.x] = own[(threadIdx.x + n) % 8];
}
// cp.async of x's first 16 bytes (and 16 zero bytes, from a copy that is not valid) by thread 0,
// read by every thread: correct with `wait_first` (thread 0 waits before the barrier), a race
// without (it waits after the barrier, so the others read what is still in flight).
extern "C" __global__ void emu_async_copy(const float* x, float* y, int wait_first) {
    EMU_SHARED(uint32_t, cell, 8);
    if (threadIdx.x == 0) {
        cp_async_16(cell, 0, reinterpret_cast<const bf16*>(x), true);
        cp_async_16(cell, 4, reinterpret_cast<const bf16*>(x), false);
        cp_async_commit();
        if (wait_first) cp_async_wait<0>();
    }
    __syncthreads();
    if (threadIdx.x == 0 && !wait_first) cp_async_wait<0>();
    y[threadIdx.x] = __uint_as_float(cell[threadIdx.x % 8]);
}
// Each thread reads what the thread before it (in the grid) wrote, with no barrier, in the same
// launch: right only where blocks and threads run first to last, which a GPU does not promise.
extern "C" __global__ void emu_chain(float* y) {
    const unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    y[i] = i == 0 ? 1.f : y[i - 1] + 1.f;
}
// Two bf16 elements as one 32-bit load (ferrite.cu's ld_pair) at x + offset: an odd offset is a
// misaligned address.
extern "C" __global__ void emu_misaligned(const bf16* x, float* y, int offset) {
    y[threadIdx.x] = float(ld_pair(x + offset) & 0xffffu);
}
extern "C" __global__ void emu_deadlock(float* y) {
    if (threadIdx.x == 0) __syncthreads();
    else y[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.f, 1);
}

using Runner = std::function<void(std::vector<Arg>&, unsigned, unsigned, size_t)>;

template <class... A>
Runner runner(void (*kernel)(A...)) {
    return [kernel](std::vector<Arg>& args, unsigned grid, unsigned block, size_t shared) {
        if (args.size() != sizeof...(A)) {
            std::fprintf(stderr, "emu: %zu arguments, the kernel takes %zu\n", args.size(), sizeof...(A));
            std::fflush(stderr);
            std::_Exit(2);
        }
        const auto values = typed<A...>(args, std::index_sequence_for<A...>{});
        emu::launch(grid, block, shared, [&] { std::apply(kernel, values); });
    };
}

void read(void* p, size_t n) {
    if (std::fread(p, 1, n, stdin) != n) emu::fail("short input");
}
template <class T>
T read() {
    T v;
    read(&v, sizeof v);
    return v;
}

size_t elem_size(char tag) { return tag == 'B' || tag == 'H' ? 2 : 4; }
bool is_buffer(char tag) { return tag == 'F' || tag == 'B' || tag == 'H' || tag == 'U'; }

void read_buffer(Arg& a) {
    const size_t n = read<uint64_t>() * elem_size(a.tag);
    a.bytes.resize(std::max<size_t>(n, 1));
    read(a.bytes.data(), n);
}

void write_buffer(const Arg& a) {
    const uint64_t n = a.bytes.size() / elem_size(a.tag);
    std::fwrite(&n, 8, 1, stdout);
    std::fwrite(a.bytes.data(), 1, a.bytes.size(), stdout);
}

}  // namespace

int main() {
    const std::map<std::string, Runner> kernels = {
#include "registry.inc"
        {"emu_racy", runner(emu_racy)},
        {"emu_overflow", runner(emu_overflow)},
        {"emu_stack_overflow", runner(emu_stack_overflow)},
        {"emu_deadlock", runner(emu_deadlock)},
        {"emu_chain", runner(emu_chain)},
        {"emu_misaligned", runner(emu_misaligned)},
        {"emu_async_copy", runner(emu_async_copy)},
    };
    std::string name(read<uint32_t>(), '\0');
    read(name.data(), name.size());
    const auto grid = read<uint32_t>(), block = read<uint32_t>(), shared = read<uint32_t>();
    std::vector<Arg> args(read<uint32_t>());
    for (auto& a : args) {
        a.tag = read<char>();
        if (is_buffer(a.tag)) {
            read_buffer(a);
            continue;
        }
        if (a.tag == 'P') {
            a.table.resize(read<uint64_t>());
            std::vector<uint64_t> addresses;
            for (auto& t : a.table) {
                t.tag = read<char>();
                if (t.tag == 'n') {
                    addresses.push_back(0);
                    continue;
                }
                if (!is_buffer(t.tag)) emu::fail("a table entry is a buffer or 'n'");
                read_buffer(t);
                addresses.push_back(reinterpret_cast<uint64_t>(t.bytes.data()));
            }
            a.bytes.resize(std::max<size_t>(addresses.size() * 8, 1));
            std::memcpy(a.bytes.data(), addresses.data(), addresses.size() * 8);
            continue;
        }
        size_t n;
        switch (a.tag) {
            case 'i': case 'f': n = 4; break;
            case 'z': n = 8; break;
            default: emu::fail("unknown argument tag");
        }
        a.bytes.resize(n);
        read(a.bytes.data(), n);
    }
    const auto k = kernels.find(name);
    if (k == kernels.end()) emu::fail("no such kernel");
    k->second(args, grid, block, shared);
    for (auto& a : args) {
        if (is_buffer(a.tag)) write_buffer(a);
        for (auto& t : a.table)
            if (t.tag != 'n') write_buffer(t);
    }
    for (const auto& keys : emu::keys_visited) {
        const uint64_t n = keys;
        std::fwrite(&n, 8, 1, stdout);
    }
    return 0;
}
