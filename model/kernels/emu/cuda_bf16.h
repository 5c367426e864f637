// Stand-in for CUDA's cuda_bf16.h when kernels/ferrite.cu is compiled for the CPU by the kernel
// emulation tests (see cuda_emu.h): bf16 as its 16 bits, converted as the GPU does (round to
// nearest even; NaN stays NaN).
#pragma once
#include <cstdint>
#include <cstring>

struct __nv_bfloat16 {
    uint16_t bits;
};

inline float __bfloat162float(__nv_bfloat16 x) {
    const uint32_t u = uint32_t(x.bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

inline __nv_bfloat16 __float2bfloat16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return {uint16_t((u >> 16) | 0x40u)};
    u += 0x7fffu + ((u >> 16) & 1u);
    return {uint16_t(u >> 16)};
}

inline uint16_t __bfloat16_as_ushort(__nv_bfloat16 x) { return x.bits; }
