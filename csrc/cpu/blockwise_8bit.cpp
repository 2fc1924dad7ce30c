// CPU blockwise 8-bit quantization with a 256-entry code (the dynamic map by default).
//
// Algorithm: per block of `blocksize` elements, absmax = max |x| (NaN propagates),
// recip = reciprocal_like_cuda(absmax) (bitsandbytes' rcp.approx, codebooks.h),
// code = quantize_with_code256(code_table, x * recip) (codebooks.h: binary search, then bitsandbytes'
// nearest-of-three rounding); dequantization is code_table[c] * absmax in float32, cast to the output
// dtype with round-to-nearest-even.
// Layout: flat input of n elements, one code byte per element, one float32 absmax per block.
// Limits: 64-bit indices; blocksize 32..4096; the caller splits the block range over threads.
// Bottleneck: the 8-step binary search per element (compute-bound on CPU), memory for dequantize.
#include <algorithm>
#include <cstdint>

#include "block_io.h"
#include "halfbyte/cpu_kernels.h"

namespace halfbyte::cpu {

void quantize_blockwise_8bit(const void* input, DType input_dtype, int64_t n, int64_t blocksize,
                             const float* code, float* absmax, uint8_t* codes, int64_t block_begin,
                             int64_t block_end) {
  float buffer[kMaxBlocksize];
  for (int64_t b = block_begin; b < block_end; ++b) {
    const int64_t first = b * blocksize;
    const int64_t count = std::min(blocksize, n - first);
    load_block(input, input_dtype, first, count, buffer);
    float m = 0.0f;
    for (int64_t i = 0; i < count; ++i) m = absmax_step(m, buffer[i]);
    absmax[b] = m;
    const float recip = reciprocal_like_cuda(m);
    uint8_t* out = codes + first;
    for (int64_t i = 0; i < count; ++i) out[i] = quantize_with_code256(code, multiply_like_cuda(buffer[i], recip));
  }
}

void dequantize_blockwise_8bit(const uint8_t* codes, const float* absmax, const float* code, int64_t n,
                               int64_t blocksize, DType output_dtype, void* output, int64_t block_begin,
                               int64_t block_end) {
  float buffer[kMaxBlocksize];
  for (int64_t b = block_begin; b < block_end; ++b) {
    const int64_t first = b * blocksize;
    const int64_t count = std::min(blocksize, n - first);
    const float scale = absmax[b];
    const uint8_t* in = codes + first;
    for (int64_t i = 0; i < count; ++i) buffer[i] = multiply_like_cuda(code[in[i]], scale);
    store_block(buffer, count, output_dtype, output, first);
  }
}

}  // namespace halfbyte::cpu
