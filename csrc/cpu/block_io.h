// Loading a run of float32 / float16 / bfloat16 elements into a float32 buffer and storing a float32
// buffer back in one of those dtypes, for the CPU kernels (exact conversions of float_types.h).
#pragma once

#include <algorithm>
#include <cstdint>

#include "halfbyte/float_types.h"

namespace halfbyte::cpu {

inline void load_block(const void* input, DType dtype, int64_t first, int64_t count, float* buffer) {
  if (dtype == DType::kFloat32) {
    const float* p = static_cast<const float*>(input) + first;
    std::copy(p, p + count, buffer);
  } else if (dtype == DType::kBFloat16) {
    const uint16_t* p = static_cast<const uint16_t*>(input) + first;
    for (int64_t i = 0; i < count; ++i) buffer[i] = bf16_to_float(p[i]);
  } else {
    const uint16_t* p = static_cast<const uint16_t*>(input) + first;
    for (int64_t i = 0; i < count; ++i) buffer[i] = fp16_to_float(p[i]);
  }
}

inline void store_block(const float* values, int64_t count, DType dtype, void* output, int64_t first) {
  if (dtype == DType::kFloat32) {
    std::copy(values, values + count, static_cast<float*>(output) + first);
  } else if (dtype == DType::kBFloat16) {
    uint16_t* p = static_cast<uint16_t*>(output) + first;
    for (int64_t i = 0; i < count; ++i) p[i] = float_to_bf16(values[i]);
  } else {
    uint16_t* p = static_cast<uint16_t*>(output) + first;
    for (int64_t i = 0; i < count; ++i) p[i] = float_to_fp16(values[i]);
  }
}

}  // namespace halfbyte::cpu
