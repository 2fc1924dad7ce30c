// CPU kernels of halfbyte on raw pointers (no torch). Each works on the blocks
// [block_begin, block_end) of a flat tensor of n elements, so the caller can split the blocks over
// threads; blocks are independent and write disjoint outputs.
//
// Layouts (shared/COMPAT.md): 4-bit codes two per byte, first element in the high nibble; the
// packed buffer holds (n + 1) / 2 bytes, and an odd n pads the last low nibble with the code of 0
// scaled like the rest of its block. absmax: one float32 per block of `blocksize` elements
// (the last block may be shorter). 8-bit: one code byte per element.
#pragma once

#include <cstdint>

#include "halfbyte/codebooks.h"
#include "halfbyte/float_types.h"

namespace halfbyte::cpu {

// x -> (absmax per block, packed 4-bit codes).
void quantize_4bit(const void* input, DType input_dtype, int64_t n, int64_t blocksize, QuantType type,
                   float* absmax, uint8_t* packed, int64_t block_begin, int64_t block_end);

// (packed codes, absmax) -> table[code] * absmax (float32), cast to output_dtype. `table` holds the 16
// levels (the NF4 or FP4 table, or any 16-entry code a caller passes).
void dequantize_4bit(const uint8_t* packed, const float* absmax, const float* table, int64_t n,
                     int64_t blocksize, DType output_dtype, void* output, int64_t block_begin,
                     int64_t block_end);

// x -> (absmax per block, one code per element) with a sorted 256-entry code.
void quantize_blockwise_8bit(const void* input, DType input_dtype, int64_t n, int64_t blocksize,
                             const float* code, float* absmax, uint8_t* codes, int64_t block_begin,
                             int64_t block_end);

// (codes, absmax) -> code[c] * absmax (float32), cast to output_dtype.
void dequantize_blockwise_8bit(const uint8_t* codes, const float* absmax, const float* code, int64_t n,
                               int64_t blocksize, DType output_dtype, void* output, int64_t block_begin,
                               int64_t block_end);

}  // namespace halfbyte::cpu
