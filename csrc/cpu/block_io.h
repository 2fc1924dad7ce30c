// Loading a run of float32 / float16 / bfloat16 elements into a float32 buffer and storing a float32
// buffer back in one of those dtypes, for the CPU kernels (exact conversions of float_types.h), and
// the per-block steps of codebooks.h written as loops without branches, which compilers vectorize.
#pragma once

#include <algorithm>
#include <cstdint>

#include "halfbyte/codebooks.h"
#include "halfbyte/float_types.h"

namespace halfbyte::cpu {

// flush_subnormal as a bit select: |x| < FLT_MIN (zeros included) becomes the zero of x's sign (what
// x * 0.0f gives); NaN and infinity are kept. Same bits as flush_subnormal for every input.
inline float flush_subnormal_select(float x) {
  const uint32_t bits = float_to_bits(x);
  return bits_to_float((bits & 0x7fffffffu) < 0x00800000u ? (bits & 0x80000000u) : bits);
}

// The absmax of `count` values as absmax_step folds them from 0.0f. Without NaN it is the largest |x|
// with subnormals as zero, i.e. the largest bit pattern of |x| (patterns of non-negative floats order
// like their values); a block holding a NaN is folded in order, its absmax being its last NaN.
inline float block_absmax(const float* values, int64_t count) {
  int32_t largest = 0;
  for (int64_t i = 0; i < count; ++i) {
    largest = std::max(largest, static_cast<int32_t>(float_to_bits(values[i]) & 0x7fffffffu));
  }
  if (largest > 0x7f800000) {
    float m = 0.0f;
    for (int64_t i = 0; i < count; ++i) m = absmax_step(m, values[i]);
    return m;
  }
  return largest < 0x00800000 ? 0.0f : bits_to_float(static_cast<uint32_t>(largest));
}

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
