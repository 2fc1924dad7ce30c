// AVX-512 building blocks of the CPU kernels: the runtime choice between the portable kernels and their
// AVX-512 versions, 16-lane loads of float32 / bfloat16 runs, and 16-lane forms of the codebooks.h
// rules (flush_subnormal, multiply_like_cuda, absmax_step over a block, float_to_bf16).
//
// Every 16-lane function gives in each lane the bits its scalar counterpart gives (codebooks.h,
// float_types.h); the kernels rely on that to stay bit-identical to the portable path.
// The AVX-512 functions carry a target attribute, so this header compiles without -mavx512*; they
// may only run when cpu_isa() allows them. HALFBYTE_CPU_ISA (read once per process) selects a
// lesser path on a capable CPU, so that every path can be tested on one machine.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "block_io.h"
#include "halfbyte/codebooks.h"
#include "halfbyte/float_types.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HALFBYTE_HAVE_AVX512_KERNELS 1
// GCC 12 reports the deliberately undefined pass-through operands of some AVX-512 intrinsics as
// (maybe-)uninitialized (GCC bug 105593); the warnings point into the header.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#else
#define HALFBYTE_HAVE_AVX512_KERNELS 0
#endif

namespace halfbyte::cpu {

// The instruction sets the CPU kernels may use, chosen once per process: the AVX-512 kernels need
// F, BW, DQ and VL; kAvx512Vbmi adds VBMI (byte permutes, used by the 8-bit dequantization).
// HALFBYTE_CPU_ISA=scalar or =avx512 in the environment caps the choice.
enum class CpuIsa : int { kPortable = 0, kAvx512 = 1, kAvx512Vbmi = 2 };

inline CpuIsa cpu_isa() {
#if HALFBYTE_HAVE_AVX512_KERNELS
  static const CpuIsa isa = [] {
    __builtin_cpu_init();
    const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
    CpuIsa best = !avx512                                ? CpuIsa::kPortable
                  : __builtin_cpu_supports("avx512vbmi") ? CpuIsa::kAvx512Vbmi
                                                         : CpuIsa::kAvx512;
    const char* cap = std::getenv("HALFBYTE_CPU_ISA");
    if (cap != nullptr && std::strcmp(cap, "scalar") == 0) best = CpuIsa::kPortable;
    if (cap != nullptr && std::strcmp(cap, "avx512") == 0 && best == CpuIsa::kAvx512Vbmi)
      best = CpuIsa::kAvx512;
    return best;
  }();
  return isa;
#else
  return CpuIsa::kPortable;
#endif
}

#if HALFBYTE_HAVE_AVX512_KERNELS

#define HALFBYTE_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl")))
#define HALFBYTE_AVX512_INLINE \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl"), always_inline)) inline
#define HALFBYTE_AVX512_LAMBDA __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl"), always_inline))
#define HALFBYTE_AVX512_VBMI __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi")))
#define HALFBYTE_AVX512_VBMI_LAMBDA \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi"), always_inline))

// Lanes [0, remaining) of a 16-lane mask (all when remaining >= 16, none when remaining <= 0).
HALFBYTE_AVX512_INLINE __mmask16 lanes16(int64_t remaining) {
  if (remaining >= 16) return 0xffff;
  if (remaining <= 0) return 0;
  return static_cast<__mmask16>((1u << remaining) - 1u);
}

HALFBYTE_AVX512_INLINE __mmask32 lanes32(int64_t remaining) {
  if (remaining >= 32) return 0xffffffffu;
  if (remaining <= 0) return 0;
  return static_cast<__mmask32>((1u << remaining) - 1u);
}

// Elements [i, i + 16) of a float32 (kIn = kFloat32) or bfloat16 (kBFloat16) run as float32; lanes
// outside `mask` read nothing and are 0.0. Without a mask all 16 are read (plain loads; masked
// accesses are slower on some CPUs, so the kernels use them only for the tail of a run).
template <DType kIn>
HALFBYTE_AVX512_INLINE __m512 load16(const void* p, int64_t i, __mmask16 mask) {
  static_assert(kIn == DType::kFloat32 || kIn == DType::kBFloat16);
  if constexpr (kIn == DType::kFloat32) {
    return _mm512_maskz_loadu_ps(mask, static_cast<const float*>(p) + i);
  } else {
    const __m256i h = _mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(p) + i);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
}

template <DType kIn>
HALFBYTE_AVX512_INLINE __m512 load16(const void* p, int64_t i) {
  static_assert(kIn == DType::kFloat32 || kIn == DType::kBFloat16);
  if constexpr (kIn == DType::kFloat32) {
    return _mm512_loadu_ps(static_cast<const float*>(p) + i);
  } else {
    const __m256i h =
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(p) + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
}

// flush_subnormal: |x| < FLT_MIN (zeros included) becomes the zero of x's sign (x * 0.0f); NaN kept.
HALFBYTE_AVX512_INLINE __m512 flush_subnormal16(__m512 x) {
  const __m512i bits = _mm512_castps_si512(x);
  const __mmask16 tiny = _mm512_cmplt_epu32_mask(_mm512_and_si512(bits, _mm512_set1_epi32(0x7fffffff)),
                                                 _mm512_set1_epi32(0x00800000));
  return _mm512_castsi512_ps(
      _mm512_mask_and_epi32(bits, tiny, bits, _mm512_set1_epi32(static_cast<int32_t>(0x80000000u))));
}

// multiply_like_cuda(a, b) with b already flushed (the scale of a block, flushed once).
HALFBYTE_AVX512_INLINE __m512 multiply_like_cuda16(__m512 a, __m512 b_flushed) {
  return flush_subnormal16(_mm512_mul_ps(flush_subnormal16(a), b_flushed));
}

// float_to_bf16 of 16 lanes: round to nearest even, every NaN -> 0x7FC0.
HALFBYTE_AVX512_INLINE __m256i float_to_bf16_16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i bias = _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                                        _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1)));
  __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, bias), 16);
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(bits, _mm512_set1_epi32(0x7fffffff)),
                                                _mm512_set1_epi32(0x7f800000));
  rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7fc0));
  return _mm512_cvtepi32_epi16(rounded);
}

// absmax of `count` elements (a block) as absmax_step folds it from 0.0f. Without NaN this is the
// largest |x| (subnormals as zero), found as the largest bit pattern of |x|; a block holding a NaN is
// folded element by element, since its absmax is the bit pattern of its last NaN.
template <DType kIn>
HALFBYTE_AVX512 float block_absmax16(const void* p, int64_t count) {
  __m512i largest = _mm512_setzero_si512();
  const __m512i magnitude_mask = _mm512_set1_epi32(0x7fffffff);
  int64_t i = 0;
  for (; i + 16 <= count; i += 16) {
    const __m512i bits = _mm512_castps_si512(load16<kIn>(p, i));
    largest = _mm512_max_epu32(largest, _mm512_and_si512(bits, magnitude_mask));
  }
  if (i < count) {
    const __m512i bits = _mm512_castps_si512(load16<kIn>(p, i, lanes16(count - i)));
    largest = _mm512_max_epu32(largest, _mm512_and_si512(bits, magnitude_mask));
  }
  const uint32_t largest_bits = _mm512_reduce_max_epu32(largest);
  if (largest_bits > 0x7f800000u) {  // a NaN: fold in order
    float m = 0.0f;
    for (i = 0; i < count; ++i) {
      if constexpr (kIn == DType::kFloat32) {
        m = absmax_step(m, static_cast<const float*>(p)[i]);
      } else {
        m = absmax_step(m, bf16_to_float(static_cast<const uint16_t*>(p)[i]));
      }
    }
    return m;
  }
  return largest_bits < 0x00800000u ? 0.0f : bits_to_float(largest_bits);
}

#endif  // HALFBYTE_HAVE_AVX512_KERNELS

}  // namespace halfbyte::cpu
