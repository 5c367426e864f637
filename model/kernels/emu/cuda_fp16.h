// Stand-in for CUDA's cuda_fp16.h when kernels/ferrite.cu is compiled for the CPU by the kernel
// emulation tests (see cuda_emu.h): f16 as the host compiler's IEEE binary16 `_Float16`, which
// converts as the GPU's __float2half does (round to nearest even; out of range to infinity).
#pragma once

typedef _Float16 __half;

inline float __half2float(__half x) { return float(x); }
inline __half __float2half(float f) { return __half(f); }

#include <cstdint>
#include <cstring>

inline unsigned short __half_as_ushort(__half x) {
    unsigned short u;
    std::memcpy(&u, &x, 2);
    return u;
}
inline __half __ushort_as_half(unsigned short u) {
    __half x;
    std::memcpy(&x, &u, 2);
    return x;
}
