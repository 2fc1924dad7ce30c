// Host emulation of the GPU instruction rcp.approx.ftz.f32, bit for bit.
//
// rcp.approx depends only on the mantissa of its input (the exponent shifts the result), and differs
// from the correctly rounded reciprocal by at most one unit in the last place. The table
// halfbyte_rcp_delta_table (2 bits per mantissa, 2 MiB, embedded at build time from
// python/halfbyte/data/rcp_approx_delta.bin.zlib) holds that difference + 1 for each of the 2^23 mantissas;
// it was measured on an H100 by tools/make_rcp_table.py and is checked against the GPU by the CUDA tests.
// Special cases follow the .ftz rules: zero and subnormal inputs give infinity, infinity gives zero,
// results that would be subnormal are flushed to zero.
#include <cstdint>

#include "halfbyte/codebooks.h"
#include "halfbyte/float_types.h"

extern "C" const unsigned char halfbyte_rcp_delta_table[];

namespace halfbyte {

float host_reciprocal_approx(float m) {
  const uint32_t bits = float_to_bits(m);
  const uint32_t sign = bits & 0x80000000u;
  const uint32_t magnitude = bits & 0x7fffffffu;
  if (magnitude > 0x7f800000u) return bits_to_float(0x7fffffffu);         // NaN
  if (magnitude < 0x00800000u) return bits_to_float(sign | 0x7f800000u);  // zero / subnormal -> inf
  if (magnitude == 0x7f800000u) return bits_to_float(sign);               // inf -> 0
  const float ieee = 1.0f / m;
  const uint32_t ieee_bits = float_to_bits(ieee);
  if ((ieee_bits & 0x7fffffffu) < 0x00800000u) return bits_to_float(sign);  // subnormal result -> 0
  const uint32_t mantissa = bits & 0x7fffffu;
  const int delta = ((halfbyte_rcp_delta_table[mantissa >> 2] >> ((mantissa & 3u) * 2u)) & 3u) - 1;
  return bits_to_float(static_cast<uint32_t>(static_cast<int64_t>(ieee_bits) + delta));
}

}  // namespace halfbyte

// The table itself: the decompressed bytes, placed in read-only data by the assembler.
__asm__(
    ".section .rodata\n"
    ".global halfbyte_rcp_delta_table\n"
    ".type halfbyte_rcp_delta_table, @object\n"
    ".balign 64\n"
    "halfbyte_rcp_delta_table:\n"
    ".incbin \"" HALFBYTE_RCP_TABLE_PATH
    "\"\n"
    ".size halfbyte_rcp_delta_table, 2097152\n"
    ".previous\n");
