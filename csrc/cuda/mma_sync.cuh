// mma.sync m16n8k16 with float32 accumulators for the tensor-core kernels that take 16-bit operands
// (gemm_4bit_decode.cu, gemm_4bit_prefill.cu, int8_weight_only_gemm.cu): d += A (16x16, 4 registers of 16-bit
// pairs) x B (16x8, 2 registers), the operand dtype chosen at compile time. Device functions only; each
// kernel file keeps its own anonymous namespace around the include.
#pragma once

#include <cstdint>

#include "halfbyte/float_types.h"

namespace halfbyte::cuda::mma {

template <bool kBFloat16>
__device__ __forceinline__ void m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (kBFloat16) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Zeroes a thread's accumulators of kTiles x kCols m16n8 tiles (4 floats each).
template <int kTiles, int kCols>
__device__ __forceinline__ void zero(float (&acc)[kTiles][kCols][4]) {
#pragma unroll
  for (int t = 0; t < kTiles; ++t) {
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[t][c][i] = 0.0f;
    }
  }
}

}  // namespace halfbyte::cuda::mma
