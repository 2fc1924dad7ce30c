// CPU blockwise 8-bit quantization with a 256-entry code (the dynamic map by default).
//
// Algorithm: per block of `blocksize` elements, absmax = max |x| (NaN propagates),
// recip = reciprocal_like_cuda(absmax) (bitsandbytes' rcp.approx, codebooks.h),
// code = quantize_with_code256(code_table, x * recip) (codebooks.h: binary search, then bitsandbytes'
// nearest-of-three rounding); dequantization is code_table[c] * absmax in float32, cast to the output
// dtype with round-to-nearest-even.
// The search is quantize_with_code256's, for any code table, walked as its path bits k: the pivot at
// depth d is entry (128 >> d) - 1 + (256 >> d) * k (k < 2^d); after 7 steps it ends on entry 2k, whose
// neighbours are 2k - 1 (0 for k = 0) and 2k + 1, so the rounding needs code[2k] and two midpoints
// (computed with quantize_with_code256's float operations). These are gathered once per call into
// SearchTables, and each element is then a fixed sequence of lookups and compares, without branches.
// Two implementations with identical output bits: a portable one (one element at a time), and an
// AVX-512 one (F/BW/DQ/VL, chosen at run time, avx512_block_io.h) that searches 16 elements per step,
// reading the tables with in-register permutes, and dequantizes 64 codes per step with VBMI byte
// permutes (the 256 entries as 4 byte planes; gathers without VBMI). float16 input is converted to
// float32 first, float16 output is cast with the scalar float_to_fp16 (block_io.h).
// Layout: flat input of n elements, one code byte per element, one float32 absmax per block.
// Limits: 64-bit indices; blocksize 32..4096; the caller splits the block range over threads.
// Bottleneck: quantize is compute-bound (8 dependent lookup-compare steps per element: about 80 vector
// instructions per 16 elements on AVX-512, 10 dependent loads per element on the portable path);
// dequantize is memory-bound on AVX-512 (one gathered load per element on the portable path).
#include <algorithm>
#include <cstdint>

#include "avx512_block_io.h"
#include "block_io.h"
#include "halfbyte/cpu_kernels.h"

namespace halfbyte::cpu {
namespace {

// ---- portable ------------------------------------------------------------------------------------

// The entries of a 256-entry code in the order quantize_with_code256 reads them.
struct SearchTables {
  // Depth d = 0..6: the 2^d pivots (128 >> d) - 1 + (256 >> d) * k, zero-padded to 64.
  alignas(64) float pivots[7][64];
  // Per end point k (search ended on entry 2k): code[2k], and the midpoints towards the upper
  // neighbour 2k + 1 and the lower neighbour 2k - 1 (entry 0 for k = 0).
  alignas(64) float level[128];
  alignas(64) float upper_midpoint[128];
  alignas(64) float lower_midpoint[128];

  explicit SearchTables(const float* code) {
    for (int depth = 0; depth < 7; ++depth) {
      for (int k = 0; k < 64; ++k) {
        pivots[depth][k] = k < (1 << depth) ? code[(128 >> depth) - 1 + (256 >> depth) * k] : 0.0f;
      }
    }
    for (int k = 0; k < 128; ++k) {
      const float value = code[2 * k];
      const float upper = code[2 * k + 1];
      const float lower = code[k == 0 ? 0 : 2 * k - 1];
      level[k] = value;
      upper_midpoint[k] = (upper + value) * 0.5f;
      lower_midpoint[k] = (lower + value) * 0.5f;
    }
  }
};

// quantize_with_code256(code, x): the same 7 steps, walked as the path bits k, without branches.
inline uint8_t search(const SearchTables& t, float x) {
  int k = 0;
  for (int depth = 0; depth < 7; ++depth) k = 2 * k + (x > t.pivots[depth][k]);
  const bool above = x > t.level[k];
  const int to_upper = above & (x > t.upper_midpoint[k]);
  const int to_lower = !above & (k != 0) & (x < t.lower_midpoint[k]);
  return static_cast<uint8_t>(2 * k + to_upper - to_lower);
}

void quantize_blockwise_8bit_portable(const void* input, DType input_dtype, int64_t n, int64_t blocksize,
                                      const float* code, float* absmax, uint8_t* codes, int64_t block_begin,
                                      int64_t block_end) {
  const SearchTables tables(code);
  float buffer[kMaxBlocksize];
  for (int64_t b = block_begin; b < block_end; ++b) {
    const int64_t first = b * blocksize;
    const int64_t count = std::min(blocksize, n - first);
    load_block(input, input_dtype, first, count, buffer);
    const float m = block_absmax(buffer, count);
    absmax[b] = m;
    const float recip = flush_subnormal_select(reciprocal_like_cuda(m));
    for (int64_t i = 0; i < count; ++i) {  // multiply_like_cuda(buffer[i], recip)
      buffer[i] = flush_subnormal_select(flush_subnormal_select(buffer[i]) * recip);
    }
    uint8_t* out = codes + first;
    for (int64_t i = 0; i < count; ++i) out[i] = search(tables, buffer[i]);
  }
}

void dequantize_blockwise_8bit_portable(const uint8_t* codes, const float* absmax, const float* code,
                                        int64_t n, int64_t blocksize, DType output_dtype, void* output,
                                        int64_t block_begin, int64_t block_end) {
  float flushed_code[256];  // multiply_like_cuda flushes both factors
  for (int c = 0; c < 256; ++c) flushed_code[c] = flush_subnormal_select(code[c]);
  float buffer[kMaxBlocksize];
  for (int64_t b = block_begin; b < block_end; ++b) {
    const int64_t first = b * blocksize;
    const int64_t count = std::min(blocksize, n - first);
    const float scale = flush_subnormal_select(absmax[b]);
    const uint8_t* in = codes + first;
    for (int64_t i = 0; i < count; ++i) buffer[i] = flushed_code[in[i]];
    for (int64_t i = 0; i < count; ++i) buffer[i] = flush_subnormal_select(buffer[i] * scale);
    store_block(buffer, count, output_dtype, output, first);
  }
}

// ---- AVX-512 -------------------------------------------------------------------------------------
#if HALFBYTE_HAVE_AVX512_KERNELS

// table[k] for k < 64 (64 floats at `table`).
HALFBYTE_AVX512_INLINE __m512 lookup64(const float* table, __m512i k) {
  const __m512 low = _mm512_permutex2var_ps(_mm512_load_ps(table), k, _mm512_load_ps(table + 16));
  const __m512 high = _mm512_permutex2var_ps(_mm512_load_ps(table + 32), k, _mm512_load_ps(table + 48));
  return _mm512_mask_mov_ps(low, _mm512_test_epi32_mask(k, _mm512_set1_epi32(32)), high);
}

// table[k] for k < 128.
HALFBYTE_AVX512_INLINE __m512 lookup128(const float* table, __m512i k) {
  return _mm512_mask_mov_ps(lookup64(table, k), _mm512_test_epi32_mask(k, _mm512_set1_epi32(64)),
                            lookup64(table + 64, k));
}

// quantize_with_code256 of 16 values, as 32-bit codes.
HALFBYTE_AVX512_INLINE __m512i search16(const SearchTables& t, __m512 x) {
  const __m512i one = _mm512_set1_epi32(1);
  // k: the path so far, one bit per step (1: x > pivot, went up).
  __m512i k = _mm512_setzero_si512();
  __m512 pivot = _mm512_set1_ps(t.pivots[0][0]);
  for (int depth = 1; depth <= 7; ++depth) {
    const __mmask16 up = _mm512_cmp_ps_mask(x, pivot, _CMP_GT_OQ);
    k = _mm512_mask_add_epi32(_mm512_add_epi32(k, k), up, _mm512_add_epi32(k, k), one);
    if (depth <= 4) {
      pivot = _mm512_permutexvar_ps(k, _mm512_load_ps(t.pivots[depth]));
    } else if (depth == 5) {
      pivot = _mm512_permutex2var_ps(_mm512_load_ps(t.pivots[5]), k, _mm512_load_ps(t.pivots[5] + 16));
    } else if (depth == 6) {
      pivot = lookup64(t.pivots[6], k);
    }
  }
  const __mmask16 above = _mm512_cmp_ps_mask(x, lookup128(t.level, k), _CMP_GT_OQ);
  const __mmask16 to_upper = _mm512_mask_cmp_ps_mask(above, x, lookup128(t.upper_midpoint, k), _CMP_GT_OQ);
  const __mmask16 to_lower =
      _mm512_mask_cmp_ps_mask(static_cast<__mmask16>(~above & _mm512_test_epi32_mask(k, k)), x,
                              lookup128(t.lower_midpoint, k), _CMP_LT_OQ);
  const __m512i end = _mm512_add_epi32(k, k);
  return _mm512_mask_sub_epi32(_mm512_mask_add_epi32(end, to_upper, end, one), to_lower, end, one);
}

template <DType kIn>
HALFBYTE_AVX512 void quantize_block_avx512(const SearchTables& tables, const void* values, int64_t count,
                                           float* absmax, uint8_t* codes) {
  const float m = block_absmax16<kIn>(values, count);
  *absmax = m;
  const __m512 recip = _mm512_set1_ps(flush_subnormal(reciprocal_like_cuda(m)));
  int64_t i = 0;
  for (; i + 16 <= count; i += 16) {
    const __m512i c = search16(tables, multiply_like_cuda16(load16<kIn>(values, i), recip));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + i), _mm512_cvtepi32_epi8(c));
  }
  if (i < count) {
    const __mmask16 lanes = lanes16(count - i);
    const __m512i c = search16(tables, multiply_like_cuda16(load16<kIn>(values, i, lanes), recip));
    _mm_mask_storeu_epi8(codes + i, lanes, _mm512_cvtepi32_epi8(c));
  }
}

HALFBYTE_AVX512 void quantize_blockwise_8bit_avx512(const void* input, DType input_dtype, int64_t n,
                                                    int64_t blocksize, const float* code, float* absmax,
                                                    uint8_t* codes, int64_t block_begin, int64_t block_end) {
  const SearchTables tables(code);
  float buffer[kMaxBlocksize];
  for (int64_t b = block_begin; b < block_end; ++b) {
    const int64_t first = b * blocksize;
    const int64_t count = std::min(blocksize, n - first);
    if (input_dtype == DType::kFloat32) {
      quantize_block_avx512<DType::kFloat32>(tables, static_cast<const float*>(input) + first, count,
                                             absmax + b, codes + first);
    } else if (input_dtype == DType::kBFloat16) {
      quantize_block_avx512<DType::kBFloat16>(tables, static_cast<const uint16_t*>(input) + first, count,
                                              absmax + b, codes + first);
    } else {
      load_block(input, input_dtype, first, count, buffer);
      quantize_block_avx512<DType::kFloat32>(tables, buffer, count, absmax + b, codes + first);
    }
  }
}

// Writes multiply_like_cuda(code entries, scale) for 16 elements [index, index + 16) (those in `lanes`
// unless kAll) cast to kOut; entries and scale are already flushed. Full runs use plain stores, which
// are faster than masked ones on some CPUs.
template <DType kOut, bool kAll>
HALFBYTE_AVX512_INLINE void store_scaled16(__m512 entries, __m512 scale, void* output, int64_t index,
                                           __mmask16 lanes) {
  const __m512 v = flush_subnormal16(_mm512_mul_ps(entries, scale));
  if constexpr (kOut == DType::kFloat32) {
    float* out = static_cast<float*>(output) + index;
    kAll ? _mm512_storeu_ps(out, v) : _mm512_mask_storeu_ps(out, lanes, v);
  } else if constexpr (kOut == DType::kBFloat16) {
    uint16_t* out = static_cast<uint16_t*>(output) + index;
    const __m256i halves = float_to_bf16_16(v);
    kAll ? _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), halves)
         : _mm256_mask_storeu_epi16(out, lanes, halves);
  } else {
    alignas(64) float values[16];
    _mm512_store_ps(values, v);
    uint16_t* out = static_cast<uint16_t*>(output) + index;
    for (int j = 0; j < 16; ++j) {
      if (kAll || ((lanes >> j) & 1)) out[j] = float_to_fp16(values[j]);
    }
  }
}

// Elements [first, last) of a blockwise 8-bit tensor; every run of 16 lies in one block (blocksize
// is a multiple of 16), whose absmax is absmax[index >> blocksize_log2].
struct DequantizeRange {
  const uint8_t* codes;
  const float* absmax;
  int blocksize_log2;
  int64_t first;
  int64_t last;
};

HALFBYTE_AVX512_INLINE __m512 block_scale16(const DequantizeRange& r, int64_t index) {
  return _mm512_set1_ps(flush_subnormal(r.absmax[index >> r.blocksize_log2]));
}

// Code entries by gathers, 16 elements per step.
template <DType kOut>
HALFBYTE_AVX512 void dequantize_range_gather(const DequantizeRange& r, const float* code, void* output) {
  int64_t i = r.first;
  for (; i + 16 <= r.last; i += 16) {
    const __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r.codes + i)));
    store_scaled16<kOut, true>(_mm512_i32gather_ps(c, code, 4), block_scale16(r, i), output, i, 0xffff);
  }
  if (i < r.last) {
    const __mmask16 lanes = lanes16(r.last - i);
    const __m512i c = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(lanes, r.codes + i));
    store_scaled16<kOut, false>(_mm512_i32gather_ps(c, code, 4), block_scale16(r, i), output, i, lanes);
  }
}

// Code entries by byte permutes (VBMI), 64 elements per step. The table is held as 4 planes (byte k of
// every entry, 256 bytes each), each looked up with two 128-entry permutes picked by bit 7 of the
// code; the planes are then interleaved back into float32 lanes with unpacks, which work within
// 128-bit lanes, so the codes are first reordered to make the result come out in element order.
template <DType kOut>
HALFBYTE_AVX512_VBMI void dequantize_range_vbmi(const DequantizeRange& r, const float* code, void* output) {
  alignas(64) uint8_t planes[4][256];
  for (int c = 0; c < 256; ++c) {
    const uint32_t bits = float_to_bits(code[c]);
    for (int k = 0; k < 4; ++k) planes[k][c] = static_cast<uint8_t>(bits >> (8 * k));
  }
  __m512i table[4][4];
  for (int k = 0; k < 4; ++k) {
    for (int q = 0; q < 4; ++q) table[k][q] = _mm512_load_si512(planes[k] + 64 * q);
  }
  // Byte 16 * lane + 4 * m + j takes code 16 * m + 4 * lane + j (a 4x4 transpose of 4-byte groups).
  alignas(64) uint8_t order_bytes[64];
  for (int lane = 0; lane < 4; ++lane) {
    for (int m = 0; m < 4; ++m) {
      for (int j = 0; j < 4; ++j)
        order_bytes[16 * lane + 4 * m + j] = static_cast<uint8_t>(16 * m + 4 * lane + j);
    }
  }
  const __m512i order = _mm512_load_si512(order_bytes);
  // The 4 runs of 16 entries of codes [i, i + 64), in element order.
  auto lookup64 = [&](__m512i codes, __m512i entries[4]) HALFBYTE_AVX512_VBMI_LAMBDA {
    const __m512i c = _mm512_permutexvar_epi8(order, codes);
    const __mmask64 high = _mm512_movepi8_mask(c);
    __m512i plane[4];
    for (int k = 0; k < 4; ++k) {
      plane[k] = _mm512_mask_blend_epi8(high, _mm512_permutex2var_epi8(table[k][0], c, table[k][1]),
                                        _mm512_permutex2var_epi8(table[k][2], c, table[k][3]));
    }
    const __m512i w0 = _mm512_unpacklo_epi8(plane[0], plane[1]);
    const __m512i w1 = _mm512_unpackhi_epi8(plane[0], plane[1]);
    const __m512i w2 = _mm512_unpacklo_epi8(plane[2], plane[3]);
    const __m512i w3 = _mm512_unpackhi_epi8(plane[2], plane[3]);
    entries[0] = _mm512_unpacklo_epi16(w0, w2);
    entries[1] = _mm512_unpackhi_epi16(w0, w2);
    entries[2] = _mm512_unpacklo_epi16(w1, w3);
    entries[3] = _mm512_unpackhi_epi16(w1, w3);
  };
  int64_t i = r.first;
  for (; i + 64 <= r.last; i += 64) {
    __m512i entries[4];
    lookup64(_mm512_loadu_si512(r.codes + i), entries);
    for (int g = 0; g < 4; ++g) {
      store_scaled16<kOut, true>(_mm512_castsi512_ps(entries[g]), block_scale16(r, i + 16 * g), output,
                                 i + 16 * g, 0xffff);
    }
  }
  if (i < r.last) {
    const int64_t remaining = r.last - i;
    __m512i entries[4];
    lookup64(_mm512_maskz_loadu_epi8((__mmask64{1} << remaining) - 1, r.codes + i), entries);
    for (int g = 0; 16 * g < remaining; ++g) {
      store_scaled16<kOut, false>(_mm512_castsi512_ps(entries[g]), block_scale16(r, i + 16 * g), output,
                                  i + 16 * g, lanes16(remaining - 16 * g));
    }
  }
}

void dequantize_blockwise_8bit_avx512(const uint8_t* codes, const float* absmax, const float* code_table,
                                      int64_t n, int64_t blocksize, DType output_dtype, void* output,
                                      int64_t block_begin, int64_t block_end) {
  const DequantizeRange r{codes, absmax, __builtin_ctzll(static_cast<uint64_t>(blocksize)),
                          block_begin * blocksize, std::min(block_end * blocksize, n)};
  alignas(64) float code[256];  // multiply_like_cuda flushes both factors
  for (int c = 0; c < 256; ++c) code[c] = flush_subnormal(code_table[c]);
  const bool vbmi = cpu_isa() == CpuIsa::kAvx512Vbmi;
  if (output_dtype == DType::kFloat32) {
    vbmi ? dequantize_range_vbmi<DType::kFloat32>(r, code, output)
         : dequantize_range_gather<DType::kFloat32>(r, code, output);
  } else if (output_dtype == DType::kBFloat16) {
    vbmi ? dequantize_range_vbmi<DType::kBFloat16>(r, code, output)
         : dequantize_range_gather<DType::kBFloat16>(r, code, output);
  } else {
    vbmi ? dequantize_range_vbmi<DType::kFloat16>(r, code, output)
         : dequantize_range_gather<DType::kFloat16>(r, code, output);
  }
}

#endif  // HALFBYTE_HAVE_AVX512_KERNELS

}  // namespace

void quantize_blockwise_8bit(const void* input, DType input_dtype, int64_t n, int64_t blocksize,
                             const float* code, float* absmax, uint8_t* codes, int64_t block_begin,
                             int64_t block_end) {
#if HALFBYTE_HAVE_AVX512_KERNELS
  if (cpu_isa() != CpuIsa::kPortable) {
    quantize_blockwise_8bit_avx512(input, input_dtype, n, blocksize, code, absmax, codes, block_begin,
                                   block_end);
    return;
  }
#endif
  quantize_blockwise_8bit_portable(input, input_dtype, n, blocksize, code, absmax, codes, block_begin,
                                   block_end);
}

void dequantize_blockwise_8bit(const uint8_t* codes, const float* absmax, const float* code, int64_t n,
                               int64_t blocksize, DType output_dtype, void* output, int64_t block_begin,
                               int64_t block_end) {
#if HALFBYTE_HAVE_AVX512_KERNELS
  if (cpu_isa() != CpuIsa::kPortable) {
    dequantize_blockwise_8bit_avx512(codes, absmax, code, n, blocksize, output_dtype, output, block_begin,
                                     block_end);
    return;
  }
#endif
  dequantize_blockwise_8bit_portable(codes, absmax, code, n, blocksize, output_dtype, output, block_begin,
                                     block_end);
}

}  // namespace halfbyte::cpu
