// Output pieces of the 4-bit tensor-core kernels (gemm_4bit_prefill.cu, gemm_4bit_prefill_tma.cu): float32
// to 16-bit rounding, bias reads, the store of a block's staged output tile, and the reduce kernel that adds
// split-K partial sums.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "halfbyte/float_types.h"

namespace halfbyte::cuda::prefill_output {

constexpr int kF16 = static_cast<int>(DType::kFloat16);
constexpr int kBF16 = static_cast<int>(DType::kBFloat16);

// {first in the low half, second in the high half}, each rounded to nearest even in the dtype.
template <int kDType>
__device__ __forceinline__ uint32_t pack2(float first, float second) {
  uint32_t r;
  if constexpr (kDType == kBF16) {
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(second), "f"(first));
  } else {
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(second), "f"(first));
  }
  return r;
}

template <int kDType>
__device__ __forceinline__ uint4 to_dtype8(const float (&v)[8]) {
  return make_uint4(pack2<kDType>(v[0], v[1]), pack2<kDType>(v[2], v[3]), pack2<kDType>(v[4], v[5]),
                    pack2<kDType>(v[6], v[7]));
}

// Element i of a 16-bit array of the dtype, as float.
template <int kDType>
__device__ __forceinline__ float elem_value(const void* p, int64_t i) {
  const unsigned short raw = static_cast<const unsigned short*>(p)[i];
  if constexpr (kDType == kBF16) {
    return __uint_as_float(static_cast<uint32_t>(raw) << 16);
  } else {
    return __half2float(__ushort_as_half(raw));
  }
}

// Writes a block's output tile from the float32 staging area (local row m of A at m * stride, kRowsW
// columns): runs of 8 outputs with the bias added and rounded to the dtype, or float32 partial sums into
// partial[blockIdx.z] when K is split (grid z). Threads `thread` = 0 .. kThreads - 1 of the block take part;
// N % 8 == 0. Rows of A are counted in `Row` (int where the caller bounds M to 32-bit tiles, which keeps its
// registers as they were, int64_t otherwise).
template <int kDType, int kRowsA, int kRowsW, int kStride, int kThreads, typename Row>
__device__ __forceinline__ void store_staged_tile(const float* staged, int thread, Row m0, int64_t n0, Row M,
                                                  int64_t N, const void* bias, void* out, float* partial) {
  const bool split = gridDim.z > 1;
  for (int idx = thread; idx < kRowsA * (kRowsW / 8); idx += kThreads) {
    const int m_local = idx / (kRowsW / 8);
    const int c = idx % (kRowsW / 8);
    const Row m = m0 + m_local;
    const int64_t n = n0 + 8 * c;
    if (m >= M || n >= N) continue;  // N % 8 == 0: a run of 8 is inside or outside
    const float4 v0 = *reinterpret_cast<const float4*>(staged + m_local * kStride + 8 * c);
    const float4 v1 = *reinterpret_cast<const float4*>(staged + m_local * kStride + 8 * c + 4);
    if (split) {
      float4* dst = reinterpret_cast<float4*>(partial + (static_cast<int64_t>(blockIdx.z) * M + m) * N + n);
      dst[0] = v0;
      dst[1] = v1;
    } else {
      float v[8] = {v0.x, v0.y, v0.z, v0.w, v1.x, v1.y, v1.z, v1.w};
      if (bias != nullptr) {
#pragma unroll
        for (int e = 0; e < 8; ++e) v[e] += elem_value<kDType>(bias, n + e);
      }
      *reinterpret_cast<uint4*>(static_cast<unsigned short*>(out) + static_cast<int64_t>(m) * N + n) =
          to_dtype8<kDType>(v);
    }
  }
}

// out[m, n] = sum over splits (in order) of partial[s, m, n] (+ bias[n]), rounded to the dtype; 8 per thread.
template <int kDType>
__global__ void __launch_bounds__(256) gemm_4bit_reduce_kernel(const float* partial, int splits, int64_t M,
                                                               int64_t N, const void* bias, void* out) {
  const int64_t runs = M * N / 8;
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; r < runs;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e = r * 8;
    float v[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int s = 0; s < splits; ++s) {
      const float4* p = reinterpret_cast<const float4*>(partial + s * M * N + e);
      const float4 a = p[0];
      const float4 b = p[1];
      v[0] += a.x, v[1] += a.y, v[2] += a.z, v[3] += a.w, v[4] += b.x, v[5] += b.y, v[6] += b.z, v[7] += b.w;
    }
    if (bias != nullptr) {
      const int64_t n = e % N;
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] += elem_value<kDType>(bias, n + i);
    }
    *reinterpret_cast<uint4*>(static_cast<unsigned short*>(out) + e) = to_dtype8<kDType>(v);
  }
}

// Launches the reduce of `splits` partial sums on `stream` (M * N % 8 == 0).
inline cudaError_t launch_reduce(DType dtype, const float* partial, int splits, int64_t M, int64_t N,
                                 const void* bias, void* out, cudaStream_t stream) {
  int64_t blocks = (M * N / 8 + 255) / 256;
  if (blocks > 4096) blocks = 4096;
  if (dtype == DType::kBFloat16) {
    gemm_4bit_reduce_kernel<kBF16>
        <<<static_cast<unsigned>(blocks), 256, 0, stream>>>(partial, splits, M, N, bias, out);
  } else {
    gemm_4bit_reduce_kernel<kF16>
        <<<static_cast<unsigned>(blocks), 256, 0, stream>>>(partial, splits, M, N, bias, out);
  }
  return cudaGetLastError();
}

}  // namespace halfbyte::cuda::prefill_output
