// CPU blockwise 4-bit (NF4 / FP4) quantization and dequantization.
//
// Algorithm: per block of `blocksize` elements, absmax = max |x| (NaN propagates),
// recip = reciprocal_like_cuda(absmax) (bitsandbytes' rcp.approx, codebooks.h),
// code = quantize_{nf4,fp4}(x * recip) (codebooks.h); dequantization is table[code] * absmax in
// float32, cast to the output dtype with round-to-nearest-even.
// Layout: flat input of n elements; two codes per byte, first element in the high nibble; one float32
// absmax per block. Blocksize is even (32..4096), so every block starts on a byte boundary.
// Limits: 64-bit indices; the caller splits the block range over threads.
// Bottleneck: memory bandwidth on large tensors; per-element compares and the 16-bit conversions
// otherwise. Loops are written so the compiler can vectorize them (fixed-width inner loops).
#include <algorithm>
#include <cstdint>

#include "block_io.h"
#include "halfbyte/cpu_kernels.h"

namespace halfbyte::cpu {
namespace {

template <QuantType kType>
void quantize_block(const float* values, int64_t count, float recip, uint8_t* packed) {
  auto code = [](float x) {
    return kType == QuantType::kNF4 ? quantize_nf4(x) : quantize_fp4(x);
  };
  const int64_t pairs = count / 2;
  for (int64_t i = 0; i < pairs; ++i) {
    packed[i] = static_cast<uint8_t>((code(multiply_like_cuda(values[2 * i], recip)) << 4) | code(multiply_like_cuda(values[2 * i + 1], recip)));
  }
  if (count % 2) {  // odd tail: the padding element is 0.0 scaled like the block
    packed[pairs] = static_cast<uint8_t>((code(multiply_like_cuda(values[count - 1], recip)) << 4) | code(multiply_like_cuda(0.0f, recip)));
  }
}

}  // namespace

void quantize_4bit(const void* input, DType input_dtype, int64_t n, int64_t blocksize, QuantType type,
                   float* absmax, uint8_t* packed, int64_t block_begin, int64_t block_end) {
  float buffer[kMaxBlocksize];
  for (int64_t b = block_begin; b < block_end; ++b) {
    const int64_t first = b * blocksize;
    const int64_t count = std::min(blocksize, n - first);
    load_block(input, input_dtype, first, count, buffer);
    float m = 0.0f;
    for (int64_t i = 0; i < count; ++i) m = absmax_step(m, buffer[i]);
    absmax[b] = m;
    const float recip = reciprocal_like_cuda(m);
    if (type == QuantType::kNF4) {
      quantize_block<QuantType::kNF4>(buffer, count, recip, packed + first / 2);
    } else {
      quantize_block<QuantType::kFP4>(buffer, count, recip, packed + first / 2);
    }
  }
}

void dequantize_4bit(const uint8_t* packed, const float* absmax, const float* table, int64_t n,
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

}  // namespace halfbyte::cpu
