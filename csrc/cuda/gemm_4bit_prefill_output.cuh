// Output pieces of the 4-bit tensor-core kernels (gemm_4bit_prefill.cu, gemm_4bit_prefill_tma.cu): float32
// to 16-bit rounding, bias reads, and the reduce kernel that adds split-K partial sums. Device code only.
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
