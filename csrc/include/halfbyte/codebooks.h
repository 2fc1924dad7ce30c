// Codebooks and per-element quantization rules of the bitsandbytes formats (shared/COMPAT.md).
//
// Torch-free; usable from C++ and CUDA (host and device). Every rule here is exact: the same
// float32 input gives the same code on the CPU, on the GPU and in python/halfbyte/reference.py.
//
// Scaling follows bitsandbytes' CUDA kernels bit for bit. They are built with --use_fast_math, so
// a block is scaled by x * rcp.approx.ftz(absmax), not by an IEEE 1 / absmax, and subnormal inputs
// and products are flushed to zero (measured on an H100: the IEEE reciprocal differs from
// rcp.approx on 13% of mantissas, which changes codes of values on a threshold). On the GPU the
// same instructions are used; on the CPU reciprocal_like_cuda() reproduces rcp.approx exactly from
// a table of its deviation from the IEEE reciprocal (python/halfbyte/data/, see tools/make_rcp_table.py).
//
// - NF4: 16 sorted levels; the code of x is the number of midpoint thresholds t with x > t
//   (strict, so a value exactly on a threshold takes the lower level). NaN exceeds no threshold
//   and gets code 0, as in bitsandbytes' CUDA kernels.
// - FP4: bit 3 is the sign (x < 0), the magnitude index is the number of thresholds |x| exceeds,
//   mapped to the 3-bit FP4 pattern.
// - 8-bit dynamic map (or any sorted 256-entry code): a uniform binary search over the code,
//   then the nearest of the three neighbouring levels with bitsandbytes' tie rule (a value exactly
//   on a midpoint takes the level the search ended on). Equals nearest-level rounding everywhere
//   except exactly on a midpoint.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define HB_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define HB_HOST_DEVICE inline
#endif

namespace halfbyte {

// Host emulation of rcp.approx.ftz.f32 (csrc/cpu/reciprocal_approx.cpp).
float host_reciprocal_approx(float m);

// A subnormal float becomes a zero of the same sign (what .ftz instructions do to inputs/outputs).
HB_HOST_DEVICE float flush_subnormal(float x) {
  return (x > -1.17549435e-38f && x < 1.17549435e-38f) ? x * 0.0f : x;
}

// 1 / m as bitsandbytes' kernels compute it: rcp.approx.ftz.f32.
HB_HOST_DEVICE float reciprocal_like_cuda(float m) {
#if defined(__CUDA_ARCH__)
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(m));
  return r;
#else
  return host_reciprocal_approx(m);
#endif
}

// a * b with subnormal inputs and result flushed to zero: mul.ftz.f32.
HB_HOST_DEVICE float multiply_like_cuda(float a, float b) {
#if defined(__CUDA_ARCH__)
  float r;
  asm("mul.ftz.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  return flush_subnormal(flush_subnormal(a) * flush_subnormal(b));
#endif
}

enum class QuantType : int32_t { kNF4 = 0, kFP4 = 1 };

// The 16 NF4 levels, ascending; code 7 is exactly 0.
constexpr HB_HOST_DEVICE float nf4_level(int code) {
  switch (code & 15) {
    case 0:
      return -1.0f;
    case 1:
      return -0.6961928009986877f;
    case 2:
      return -0.5250730514526367f;
    case 3:
      return -0.39491748809814453f;
    case 4:
      return -0.28444138169288635f;
    case 5:
      return -0.18477343022823334f;
    case 6:
      return -0.09105003625154495f;
    case 7:
      return 0.0f;
    case 8:
      return 0.07958029955625534f;
    case 9:
      return 0.16093020141124725f;
    case 10:
      return 0.24611230194568634f;
    case 11:
      return 0.33791524171829224f;
    case 12:
      return 0.44070982933044434f;
    case 13:
      return 0.5626170039176941f;
    case 14:
      return 0.7229568362236023f;
    default:
      return 1.0f;
  }
}

// FP4 (e2m1 with bias 3, no infinities): raw magnitudes of codes 0..7 are 0, 0.0625, 8, 12, 4, 6, 2, 3,
// divided by 12; bit 3 is the sign.
constexpr HB_HOST_DEVICE float fp4_level(int code) {
  // Each magnitude is the correctly rounded float32 of raw / 12 (as bitsandbytes' tables hold them).
  float magnitude = 0.0f;
  switch (code & 7) {
    case 0:
      magnitude = 0.0f;
      break;
    case 1:
      magnitude = 0.0625f / 12.0f;
      break;
    case 2:
      magnitude = 8.0f / 12.0f;
      break;
    case 3:
      magnitude = 1.0f;
      break;
    case 4:
      magnitude = 4.0f / 12.0f;
      break;
    case 5:
      magnitude = 6.0f / 12.0f;
      break;
    case 6:
      magnitude = 2.0f / 12.0f;
      break;
    default:
      magnitude = 3.0f / 12.0f;
      break;
  }
  return (code & 8) ? -magnitude : magnitude;
}

constexpr HB_HOST_DEVICE float level_4bit(QuantType type, int code) {
  return type == QuantType::kNF4 ? nf4_level(code) : fp4_level(code);
}

// NF4 code of a value already scaled into [-1, 1].
HB_HOST_DEVICE uint8_t quantize_nf4(float x) {
  int code = (x > -0.8480964004993439f) + (x > -0.6106329262256622f) + (x > -0.4599952697753906f) +
             (x > -0.33967943489551544f) + (x > -0.23460740596055984f) + (x > -0.13791173323988914f) +
             (x > -0.045525018125772476f) + (x > 0.03979014977812767f) + (x > 0.1202552504837513f) +
             (x > 0.2035212516784668f) + (x > 0.2920137718319893f) + (x > 0.3893125355243683f) +
             (x > 0.5016634166240692f) + (x > 0.6427869200706482f) + (x > 0.8614784181118011f);
  return static_cast<uint8_t>(code);
}

// FP4 code of a value already scaled into [-1, 1].
HB_HOST_DEVICE uint8_t quantize_fp4(float x) {
  const int sign = x < 0.0f ? 8 : 0;
  const float a = x < 0.0f ? -x : x;
  const int magnitude_rank = (a > 0.00260417f) + (a > 0.0859375f) + (a > 0.20833333f) + (a > 0.29166667f) +
                             (a > 0.4166667f) + (a > 0.583333f) + (a > 0.8333333f);
  // Rank r (ascending magnitude) -> 3-bit pattern: 0,1,6,7,4,5,2,3, packed as nibbles.
  const int pattern = (0x32547610 >> (4 * magnitude_rank)) & 7;
  return static_cast<uint8_t>(sign | pattern);
}

HB_HOST_DEVICE uint8_t quantize_4bit_value(QuantType type, float x) {
  return type == QuantType::kNF4 ? quantize_nf4(x) : quantize_fp4(x);
}

// Code of x in a sorted 256-entry table (the 8-bit dynamic map), bitsandbytes' rounding.
HB_HOST_DEVICE uint8_t quantize_with_code256(const float* code, float x) {
  int pivot = 127;
  int upper_index = 255;
  int lower_index = 0;
  float lower = -1.0f;
  float upper = 1.0f;
  float value = code[pivot];
  for (int step = 64; step > 0; step >>= 1) {
    if (x > value) {
      lower_index = pivot;
      lower = value;
      pivot += step;
    } else {
      upper_index = pivot;
      upper = value;
      pivot -= step;
    }
    value = code[pivot];
  }
  if (upper_index == 255) upper = code[255];
  if (lower_index == 0) lower = code[0];
  if (x > value) {
    const float midpoint = (upper + value) * 0.5f;
    return static_cast<uint8_t>(x > midpoint ? upper_index : pivot);
  }
  const float midpoint = (lower + value) * 0.5f;
  return static_cast<uint8_t>(x < midpoint ? lower_index : pivot);
}

// Block absmax that propagates NaN: a block holding a NaN gets absmax NaN, so it dequantizes to
// NaN instead of silently to finite numbers (bitsandbytes skips NaN here; finite data is unaffected).
// Subnormal values count as zero, as in bitsandbytes' flush-to-zero reduction.
HB_HOST_DEVICE float absmax_step(float running, float value) {
  const float a = flush_subnormal(value < 0.0f ? -value : value);
  return (a > running || a != a) ? a : running;
}

// Fixed sizes of the formats.
constexpr int kMinBlocksize = 32;
constexpr int kMaxBlocksize = 4096;
constexpr int kNestedBlocksize = 256;  // double quantization of the absmax

HB_HOST_DEVICE bool is_valid_blocksize(int64_t blocksize) {
  return blocksize >= kMinBlocksize && blocksize <= kMaxBlocksize && (blocksize & (blocksize - 1)) == 0;
}

}  // namespace halfbyte
