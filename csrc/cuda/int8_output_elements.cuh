// Element reads and writes shared by the kernels that finish an int8 product (int8_rowwise.cu's
// int8_mm_dequant, int8_scaled_mm.cu's epilogue): the bias entry as float32 from its stored dtype, and
// float32 rounded to the 16 bits of a half / bfloat16 output (round to nearest even, as torch's casts).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "halfbyte/int8_cuda_kernels.h"

namespace halfbyte::cuda::int8_output {

// bias[c] as float32; 0 when there is no bias.
__device__ __forceinline__ float bias_at(const void* bias, DType dtype, int64_t c) {
  if (bias == nullptr) return 0.0f;
  if (dtype == DType::kFloat32) return __ldg(static_cast<const float*>(bias) + c);
  const unsigned short bits = __ldg(static_cast<const unsigned short*>(bias) + c);
  return dtype == DType::kBFloat16 ? __uint_as_float(static_cast<uint32_t>(bits) << 16)
                                   : __half2float(__ushort_as_half(bits));
}

__device__ __forceinline__ unsigned short bits16(__half, float v) {
  return __half_as_ushort(__float2half_rn(v));
}
__device__ __forceinline__ unsigned short bits16(__nv_bfloat16, float v) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(v));
}

}  // namespace halfbyte::cuda::int8_output
