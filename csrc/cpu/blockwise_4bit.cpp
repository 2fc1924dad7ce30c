// CPU blockwise 4-bit (NF4 / FP4) quantization and dequantization.
//
// Algorithm: per block of `blocksize` elements, absmax = max |x| (NaN propagates),
// recip = reciprocal_like_cuda(absmax) (bitsandbytes' rcp.approx, codebooks.h),
// code = quantize_{nf4,fp4}(x * recip) (codebooks.h); dequantization is table[code] * absmax in
// float32, cast to the output dtype with round-to-nearest-even. Dequantization scales the 16 levels
// once per block (and casts them to the output dtype), then each code is a lookup in those 16.
// The absmax is the largest bit pattern of |x| (a block holding a NaN is folded in order instead,
// block_io.h). Two implementations with identical output bits: a portable one in fixed-width passes
// (scale, code, pack) that compilers vectorize, and an AVX-512 one (F/BW/DQ/VL, chosen at run time,
// avx512_block_io.h) that handles 16 elements per step: the NF4/FP4 thresholds as 16-lane compares,
// and dequantization as in-register permutes of the 16 scaled levels, 32 codes per step. float16
// input is converted to float32 first (block_io.h), float16 output is cast with the scalar
// float_to_fp16 (16 levels per block).
// Layout: flat input of n elements; two codes per byte, first element in the high nibble; one float32
// absmax per block. Blocksize is even (32..4096), so every block starts on a byte boundary.
// Limits: 64-bit indices; the caller splits the block range over threads.
// Bottleneck: memory bandwidth for dequantize; for quantize the threshold compares (15 per element for
// NF4) and, with blocksize 64, the per-block reciprocal (a lookup in a 2 MiB table, about 12% of the
// AVX-512 quantize time).
#include <algorithm>
#include <cstdint>

#include "avx512_block_io.h"
#include "block_io.h"
#include "halfbyte/cpu_kernels.h"

namespace halfbyte::cpu {
namespace {

// ---- portable ------------------------------------------------------------------------------------

// Codes of one block in three fixed-width passes: scale, code, pack.
template <QuantType kType>
void quantize_block(float* values, int64_t count, float recip, uint8_t* packed) {
  const float r = flush_subnormal_select(recip);
  for (int64_t i = 0; i < count; ++i) {  // multiply_like_cuda(values[i], recip)
    values[i] = flush_subnormal_select(flush_subnormal_select(values[i]) * r);
  }
  uint8_t codes[kMaxBlocksize + 1];
  for (int64_t i = 0; i < count; ++i) {
    codes[i] = kType == QuantType::kNF4 ? quantize_nf4(values[i]) : quantize_fp4(values[i]);
  }
  // An odd tail is padded with the code of 0.0 scaled like the block.
  const float padding = multiply_like_cuda(0.0f, recip);
  codes[count] = kType == QuantType::kNF4 ? quantize_nf4(padding) : quantize_fp4(padding);
  const int64_t bytes = (count + 1) / 2;
  for (int64_t i = 0; i < bytes; ++i)
    packed[i] = static_cast<uint8_t>((codes[2 * i] << 4) | codes[2 * i + 1]);
}

void quantize_4bit_portable(const void* input, DType input_dtype, int64_t n, int64_t blocksize,
                            QuantType type, float* absmax, uint8_t* packed, int64_t block_begin,
                            int64_t block_end) {
  float buffer[kMaxBlocksize];
  for (int64_t b = block_begin; b < block_end; ++b) {
    const int64_t first = b * blocksize;
    const int64_t count = std::min(blocksize, n - first);
    load_block(input, input_dtype, first, count, buffer);
    const float m = block_absmax(buffer, count);
    absmax[b] = m;
    const float recip = reciprocal_like_cuda(m);
    if (type == QuantType::kNF4) {
      quantize_block<QuantType::kNF4>(buffer, count, recip, packed + first / 2);
    } else {
      quantize_block<QuantType::kFP4>(buffer, count, recip, packed + first / 2);
    }
  }
}

void dequantize_4bit_portable(const uint8_t* packed, const float* absmax, const float* table, int64_t n,
                              int64_t blocksize, DType output_dtype, void* output, int64_t block_begin,
                              int64_t block_end) {
  float buffer[kMaxBlocksize];
  for (int64_t b = block_begin; b < block_end; ++b) {
    const int64_t first = b * blocksize;
    const int64_t count = std::min(blocksize, n - first);
    const float scale = absmax[b];
    float scaled_table[16];
    for (int c = 0; c < 16; ++c) scaled_table[c] = multiply_like_cuda(table[c], scale);
    const uint8_t* bytes = packed + first / 2;
    const int64_t pairs = count / 2;
    for (int64_t i = 0; i < pairs; ++i) {
      buffer[2 * i] = scaled_table[bytes[i] >> 4];
      buffer[2 * i + 1] = scaled_table[bytes[i] & 15];
    }
    if (count % 2) buffer[count - 1] = scaled_table[bytes[pairs] >> 4];
    store_block(buffer, count, output_dtype, output, first);
  }
}

// ---- AVX-512 -------------------------------------------------------------------------------------
#if HALFBYTE_HAVE_AVX512_KERNELS

// quantize_nf4 / quantize_fp4 of 16 scaled values, as 32-bit codes.
template <QuantType kType>
HALFBYTE_AVX512_INLINE __m512i codes16(__m512 x) {
  const __m512i one = _mm512_set1_epi32(1);
  __m512i code = _mm512_setzero_si512();
  if constexpr (kType == QuantType::kNF4) {
    // The thresholds of quantize_nf4, in its order.
    constexpr float kThresholds[15] = {-0.8480964004993439f,   -0.6106329262256622f,  -0.4599952697753906f,
                                       -0.33967943489551544f,  -0.23460740596055984f, -0.13791173323988914f,
                                       -0.045525018125772476f, 0.03979014977812767f,  0.1202552504837513f,
                                       0.2035212516784668f,    0.2920137718319893f,   0.3893125355243683f,
                                       0.5016634166240692f,    0.6427869200706482f,   0.8614784181118011f};
    for (float t : kThresholds) {
      code = _mm512_mask_add_epi32(code, _mm512_cmp_ps_mask(x, _mm512_set1_ps(t), _CMP_GT_OQ), code, one);
    }
    return code;
  } else {
    // The magnitude thresholds of quantize_fp4. |x| may differ from quantize_fp4's `a` only in the
    // sign of a zero or a NaN, which no threshold compare can tell apart.
    constexpr float kThresholds[7] = {0.00260417f, 0.0859375f, 0.20833333f, 0.29166667f,
                                      0.4166667f,  0.583333f,  0.8333333f};
    const __m512 a = _mm512_abs_ps(x);
    for (float t : kThresholds) {
      code = _mm512_mask_add_epi32(code, _mm512_cmp_ps_mask(a, _mm512_set1_ps(t), _CMP_GT_OQ), code, one);
    }
    const __m512i pattern =
        _mm512_permutexvar_epi32(code, _mm512_setr_epi32(0, 1, 6, 7, 4, 5, 2, 3, 0, 0, 0, 0, 0, 0, 0, 0));
    const __mmask16 negative = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
    return _mm512_mask_or_epi32(pattern, negative, pattern, _mm512_set1_epi32(8));
  }
}

// 16 codes (one per 32-bit lane, < 16) -> 8 bytes, even element in the high nibble.
HALFBYTE_AVX512_INLINE __m128i pack_codes16(__m512i codes) {
  const __m512i pairs = _mm512_or_si512(_mm512_slli_epi64(codes, 4), _mm512_srli_epi64(codes, 32));
  return _mm512_cvtepi64_epi8(pairs);  // low byte of each 64-bit lane
}

template <QuantType kType, DType kIn>
HALFBYTE_AVX512 void quantize_block_avx512(const void* values, int64_t count, float* absmax,
                                           uint8_t* packed) {
  const float m = block_absmax16<kIn>(values, count);
  *absmax = m;
  const __m512 recip = _mm512_set1_ps(flush_subnormal(reciprocal_like_cuda(m)));
  // Lanes past `count` load 0.0, whose code is the padding code of an odd tail.
  auto bytes16 = [&](__m512 x0, __m512 x1) HALFBYTE_AVX512_LAMBDA {
    const __m128i lo = pack_codes16(codes16<kType>(multiply_like_cuda16(x0, recip)));
    const __m128i hi = pack_codes16(codes16<kType>(multiply_like_cuda16(x1, recip)));
    return _mm_unpacklo_epi64(lo, hi);
  };
  int64_t i = 0;
  for (; i + 32 <= count; i += 32) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(packed + i / 2),
                     bytes16(load16<kIn>(values, i), load16<kIn>(values, i + 16)));
  }
  if (i < count) {
    const __m128i bytes = bytes16(load16<kIn>(values, i, lanes16(count - i)),
                                  load16<kIn>(values, i + 16, lanes16(count - i - 16)));
    _mm_mask_storeu_epi8(packed + i / 2, lanes16((count - i + 1) / 2), bytes);
  }
}

template <QuantType kType>
HALFBYTE_AVX512 void quantize_4bit_avx512(const void* input, DType input_dtype, int64_t n, int64_t blocksize,
                                          float* absmax, uint8_t* packed, int64_t block_begin,
                                          int64_t block_end) {
  float buffer[kMaxBlocksize];
  for (int64_t b = block_begin; b < block_end; ++b) {
    const int64_t first = b * blocksize;
    const int64_t count = std::min(blocksize, n - first);
    if (input_dtype == DType::kFloat32) {
      quantize_block_avx512<kType, DType::kFloat32>(static_cast<const float*>(input) + first, count,
                                                    absmax + b, packed + first / 2);
    } else if (input_dtype == DType::kBFloat16) {
      quantize_block_avx512<kType, DType::kBFloat16>(static_cast<const uint16_t*>(input) + first, count,
                                                     absmax + b, packed + first / 2);
    } else {
      load_block(input, input_dtype, first, count, buffer);
      quantize_block_avx512<kType, DType::kFloat32>(buffer, count, absmax + b, packed + first / 2);
    }
  }
}

// 16 packed bytes -> their 32 codes in element order (high nibble first), one per byte.
HALFBYTE_AVX512_INLINE __m256i unpack_codes32(__m128i bytes) {
  const __m256i w = _mm256_cvtepu8_epi16(bytes);
  return _mm256_or_si256(_mm256_srli_epi16(w, 4),
                         _mm256_slli_epi16(_mm256_and_si256(w, _mm256_set1_epi16(15)), 8));
}

// Elements [index, index + 32) (those in `lanes` unless kAll) from their codes: lookups in the block's
// 16 scaled levels, as float32 (`levels`) or as 16-bit patterns of the output dtype (`levels16`).
// Full runs use plain stores, which are faster than masked ones on some CPUs.
template <DType kOut, bool kAll>
HALFBYTE_AVX512_INLINE void store_levels32(__m256i codes, __m512 levels, __m512i levels16, void* output,
                                           int64_t index, __mmask32 lanes) {
  if constexpr (kOut == DType::kFloat32) {
    float* out = static_cast<float*>(output) + index;
    const __m512 v0 = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(codes)), levels);
    const __m512 v1 = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(codes, 1)), levels);
    if constexpr (kAll) {
      _mm512_storeu_ps(out, v0);
      _mm512_storeu_ps(out + 16, v1);
    } else {
      _mm512_mask_storeu_ps(out, static_cast<__mmask16>(lanes), v0);
      _mm512_mask_storeu_ps(out + 16, static_cast<__mmask16>(lanes >> 16), v1);
    }
  } else {
    uint16_t* out = static_cast<uint16_t*>(output) + index;
    const __m512i v = _mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(codes), levels16);
    kAll ? _mm512_storeu_si512(out, v) : _mm512_mask_storeu_epi16(out, lanes, v);
  }
}

template <DType kOut>
HALFBYTE_AVX512 void dequantize_4bit_avx512(const uint8_t* packed, const float* absmax, const float* table,
                                            int64_t n, int64_t blocksize, void* output, int64_t block_begin,
                                            int64_t block_end) {
  const __m512 levels = _mm512_loadu_ps(table);
  for (int64_t b = block_begin; b < block_end; ++b) {
    const int64_t first = b * blocksize;
    const int64_t count = std::min(blocksize, n - first);
    const __m512 scaled = multiply_like_cuda16(levels, _mm512_set1_ps(flush_subnormal(absmax[b])));
    __m512i scaled16 = _mm512_setzero_si512();
    if constexpr (kOut == DType::kBFloat16) {
      scaled16 = _mm512_zextsi256_si512(float_to_bf16_16(scaled));
    } else if constexpr (kOut == DType::kFloat16) {
      alignas(64) float values[16];
      alignas(64) uint16_t halves[32] = {};
      _mm512_store_ps(values, scaled);
      for (int c = 0; c < 16; ++c) halves[c] = float_to_fp16(values[c]);
      scaled16 = _mm512_load_si512(halves);
    }
    const uint8_t* bytes = packed + first / 2;
    int64_t i = 0;
    for (; i + 32 <= count; i += 32) {
      const __m128i codes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes + i / 2));
      store_levels32<kOut, true>(unpack_codes32(codes), scaled, scaled16, output, first + i, ~__mmask32{0});
    }
    if (i < count) {  // the shorter last block
      const __m128i codes = _mm_maskz_loadu_epi8(lanes16((count - i + 1) / 2), bytes + i / 2);
      store_levels32<kOut, false>(unpack_codes32(codes), scaled, scaled16, output, first + i,
                                  lanes32(count - i));
    }
  }
}

#endif  // HALFBYTE_HAVE_AVX512_KERNELS

}  // namespace

void quantize_4bit(const void* input, DType input_dtype, int64_t n, int64_t blocksize, QuantType type,
                   float* absmax, uint8_t* packed, int64_t block_begin, int64_t block_end) {
#if HALFBYTE_HAVE_AVX512_KERNELS
  if (cpu_isa() != CpuIsa::kPortable) {
    if (type == QuantType::kNF4) {
      quantize_4bit_avx512<QuantType::kNF4>(input, input_dtype, n, blocksize, absmax, packed, block_begin,
                                            block_end);
    } else {
      quantize_4bit_avx512<QuantType::kFP4>(input, input_dtype, n, blocksize, absmax, packed, block_begin,
                                            block_end);
    }
    return;
  }
#endif
  quantize_4bit_portable(input, input_dtype, n, blocksize, type, absmax, packed, block_begin, block_end);
}

void dequantize_4bit(const uint8_t* packed, const float* absmax, const float* table, int64_t n,
                     int64_t blocksize, DType output_dtype, void* output, int64_t block_begin,
                     int64_t block_end) {
#if HALFBYTE_HAVE_AVX512_KERNELS
  if (cpu_isa() != CpuIsa::kPortable) {
    if (output_dtype == DType::kFloat32) {
      dequantize_4bit_avx512<DType::kFloat32>(packed, absmax, table, n, blocksize, output, block_begin,
                                              block_end);
    } else if (output_dtype == DType::kBFloat16) {
      dequantize_4bit_avx512<DType::kBFloat16>(packed, absmax, table, n, blocksize, output, block_begin,
                                               block_end);
    } else {
      dequantize_4bit_avx512<DType::kFloat16>(packed, absmax, table, n, blocksize, output, block_begin,
                                              block_end);
    }
    return;
  }
#endif
  dequantize_4bit_portable(packed, absmax, table, n, blocksize, output_dtype, output, block_begin, block_end);
}

}  // namespace halfbyte::cpu
