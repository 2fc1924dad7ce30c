// Blockwise 4-bit (NF4 / FP4) quantization and dequantization on raw device pointers.
//
// Algorithm (bit-identical to halfbyte::cpu::quantize_4bit / dequantize_4bit):
//   quantize:   for each block of `blocksize` consecutive elements (the last may be shorter)
//               absmax = NaN-propagating max |x| with subnormals as 0 (absmax_step),
//               recip = rcp.approx.ftz(absmax) (reciprocal_like_cuda, as bitsandbytes; 1/0 = inf),
//               code = nearest level of float(x) * recip by the thresholds of quantize_nf4 / quantize_fp4.
//   dequantize: out = convert(table[code] * scale[i / blocksize]), fp32 product, round-to-nearest-even.
//               Scale sources (the kernel's Scales template argument): plain, scale[b] = absmax[b]; or
//               nested (double-quantized), scale[b] = multiply_like_cuda(nested_code[absmax_codes[b]],
//               nested_absmax[b / 256]) + offset, an unfused IEEE add (add_like_cpu), as the CPU computes
//               the scales it passes to cpu::dequantize_4bit; a NaN scale gets the CPU's bits.
//
// Layout: two codes per byte, element 2i in the high nibble of byte i; (n + 1) / 2 bytes; an odd n pads
// the last low nibble with the code of 0.0f * recip. One float32 absmax per block.
//
// Work split, quantize (256 threads per thread block):
//   A thread holds 2 (blocksize <= 512) or 4 (blocksize >= 1024) vectors of 8 elements (16-byte loads;
//   two per vector for fp32) and writes 4 packed bytes per vector. A quantization block belongs to
//   blocksize / (8 * vectors) threads: 2..32 lanes of one warp for blocksize <= 1024 (absmax reduced with
//   xor shuffles, or one redux.sync for a whole warp), 2 or 4 warps for 2048 / 4096 (warp redux, then
//   shared memory). Vector k of a thread sits at element (k * threads_per_block + lane) * 8 of its
//   quantization block, so every load and store instruction of a warp touches whole 32-byte sectors.
//   The max is taken over the |x| bit patterns (unsigned), exact and order-free; NaN bit patterns
//   exceed infinity, so a NaN block is detected, and only then (warp- or block-uniform branch) the
//   CPU's absmax bits (those of the last NaN of the block) are found with an ordered key reduction.
//   Codes: instead of 15 (NF4) or 7 (FP4) comparisons per element, one 8-byte shared-memory load from
//   a cell table (cells of width 1/32, at most one threshold each; see "Per-element rules" below) and
//   one comparison: ~13 instructions per element in all. The thresholds are not restated: the host
//   recovers them by bisection from quantize_nf4 / quantize_fp4 (codebooks.h), so the codes equal
//   those functions for every float, NaN and infinities included.
// Work split, dequantize: a thread handles 32 elements per tile as runs of one 16-byte store each
//   (8 fp16/bf16 elements from 4 packed bytes, or 4 fp32 from 2), the runs of a warp adjacent, so each
//   warp store writes 512 contiguous bytes; the 16 levels sit in shared memory.
//   A NaN product (scale NaN/inf, or a non-finite table entry) gets the CPU's bits (see cpu_nan_bits).
//   Nested scales: nested_code is copied to shared memory next to the levels and the offset read once per
//   thread block; a tile (8192 elements) lies inside one group of 256 blocks for every blocksize, so it
//   reads one nested_absmax, and each run reads one absmax code byte (where plain reads a float32
//   absmax) and finishes its scale with a shared-memory lookup, a mul.ftz and an add. Scale traffic:
//   1 byte per block (plain: 4) plus 4 bytes per 256 blocks, and 1 KiB of code per thread block (L2).
//
// Ragged ends and alignment: tiles that end past n (the last one) use element-wise guarded loads
// (padding with 0.0, which is exactly the odd-n padding element) and byte-wise guarded stores. When
// the input is not 16-byte aligned or packed not 4-byte aligned (or, dequantize, output not 16-byte /
// packed not 4-byte aligned), every tile takes that guarded path.
//
// Limits: blocksize a power of two in 32..4096, any n >= 0 (64-bit indices, grid-stride loops).
// The scaling instructions are explicit (rcp.approx.ftz, mul.ftz via codebooks.h), as in bitsandbytes.
//
// Shared with blockwise_8bit.cu, in blockwise_common.cuh: the launch shape and host helpers, the input
// vectors and guarded loads, the absmax of a quantization block with its NaN rule (the first half of a
// quantize tile, quantize_tile_prologue), and the dequantize tile loop with its output conversion and
// NaN bits and both scale sources (dequantize_tiles, NestedScaleReader, launch_dequantize). Here: the
// cell tables and per-element codes, the nibble packing and stores, and how dequantize reads nibbles
// (NibbleCodes).
//
// Expected bottleneck: HBM bandwidth. Quantize 14336x4096 bf16, blocksize 64: 117.4 MB read, 31.2 MB
// written (~54 us at the ~2.8 TB/s copy bandwidth measured alongside); ~15 instructions per element
// (~28 us of issue) stay below the memory time. Measured on an H100: quantize 66 us (2.27 TB/s, 81% of
// copy; 60-67 us for other blocksizes), dequantize 59 us (2.55 TB/s, 91%); fp32 input / output: 97 /
// 100 us (2.7 TB/s).
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "blockwise_common.cuh"
#include "halfbyte/codebooks.h"
#include "halfbyte/cuda_kernels.h"
#include "halfbyte/float_types.h"

namespace halfbyte::cuda {
namespace detail {
namespace {

// ------------------------------------------------------------------------------------------------
// Per-element rules as cell tables, built on the host from codebooks.h.
//
// The thresholds t_i of quantize_nf4 (15, ascending) and of the FP4 magnitude rank (7) are recovered
// by bisection over the float ordering from quantize_nf4 / quantize_fp4 / fp4_level themselves, so
// nothing is restated. The code of x is then #{i : x > t_i} (NF4) or the pattern of rank #{i : |x| > t_i}
// plus the sign bit (FP4). To evaluate that with one table load instead of 15 comparisons, the clamped
// value v (x in [-1, 1] for NF4, |x| in [0, 1] for FP4) is split into cells of width 1/32 centred on
// k / 32 (- 1 for NF4): k = round(v * 32 (+ 32)) is computed exactly by one fma with the 1.5 * 2^23
// magic constant (the sum lands where the float spacing is 1, so the single rounding is the integer
// rounding). Cell k covers the closed interval [(k - 0.5) / 32, (k + 0.5) / 32] (- 1), the outer cells
// reach to -inf / +inf, and holds
//   lo  = #{i : t_i < lower end}          (NF4 code / FP4 rank, times 4 for FP4)
//   thr = the one threshold inside the cell, or +inf
// so that #{i : x > t_i} = lo + (x > thr) for every x the cell covers. That needs at most one threshold
// per cell, which the host checks (adjacent thresholds are >= 0.08 apart, cells are 0.03125 wide).
// NaN clamps to the lowest cell and fails every comparison: code 0, as in codebooks.h.

constexpr int kCells = 65;                     // NF4: k = 0..64; FP4: k = 0..32
constexpr float kRoundingMagic = 12582912.0f;  // 1.5 * 2^23

struct FourBitCellTable {
  float2 cell[kCells];    // {thr, lo as uint32 bits}
  uint32_t rank_to_code;  // FP4: nibble r = 3-bit pattern of magnitude rank r
  bool valid;
};

// Monotone map from float (not NaN) to uint32.
uint32_t ordered_key(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

float from_ordered_key(uint32_t key) {
  const uint32_t bits = (key & 0x80000000u) ? (key & 0x7fffffffu) : ~key;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Largest float x in [-inf, inf] with below(x) true, for below true at -inf, false at +inf and monotone.
template <typename Predicate>
float last_float_where(Predicate below) {
  uint32_t lo = ordered_key(-INFINITY);
  uint32_t hi = ordered_key(INFINITY);
  while (hi - lo > 1) {
    const uint32_t mid = lo + (hi - lo) / 2;
    if (below(from_ordered_key(mid))) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return from_ordered_key(lo);
}

// Cell table over v = offset + k / 32 for k = 0..last_cell, from ascending thresholds.
FourBitCellTable build_cell_table(const float* thresholds, int count, double offset, int last_cell,
                                  int lo_scale) {
  FourBitCellTable table{};
  table.valid = true;
  for (int k = 0; k < kCells; ++k) {
    const double lower = k == 0 ? -INFINITY : offset + (k - 0.5) / 32.0;
    const double upper = k >= last_cell ? INFINITY : offset + (k + 0.5) / 32.0;
    int below = 0;
    int inside = 0;
    float thr = INFINITY;
    for (int i = 0; i < count; ++i) {
      if (thresholds[i] < lower) ++below;
      if (thresholds[i] >= lower && thresholds[i] <= upper) {
        if (inside++ == 0) thr = thresholds[i];
      }
    }
    if (inside > 1) table.valid = false;
    uint32_t lo = static_cast<uint32_t>(below * lo_scale);
    float lo_bits;
    std::memcpy(&lo_bits, &lo, 4);
    table.cell[k] = make_float2(thr, lo_bits);
  }
  return table;
}

FourBitCellTable build_nf4_table() {
  float thresholds[15];
  for (int c = 1; c < 16; ++c) {
    thresholds[c - 1] = last_float_where([c](float x) { return quantize_nf4(x) < c; });
  }
  return build_cell_table(thresholds, 15, -1.0, 64, 1);
}

FourBitCellTable build_fp4_table() {
  // Magnitudes of the 8 codes, ascending: rank r <-> sorted[r].
  float sorted[8];
  for (int c = 0; c < 8; ++c) sorted[c] = fp4_level(c);
  std::sort(sorted, sorted + 8);
  float thresholds[7];
  uint32_t rank_to_code = quantize_fp4(0.0f) & 7u;
  for (int r = 1; r < 8; ++r) {
    const float magnitude = sorted[r];
    const float threshold =
        last_float_where([magnitude](float a) { return a < 0.0f || fp4_level(quantize_fp4(a)) < magnitude; });
    thresholds[r - 1] = threshold;
    rank_to_code |= (quantize_fp4(std::nextafter(threshold, INFINITY)) & 7u) << (4 * r);
  }
  FourBitCellTable table = build_cell_table(thresholds, 7, 0.0, 32, 4);
  table.rank_to_code = rank_to_code;
  return table;
}

const FourBitCellTable& four_bit_cell_table(QuantType type) {
  static const FourBitCellTable nf4 = build_nf4_table();
  static const FourBitCellTable fp4 = build_fp4_table();
  return type == QuantType::kNF4 ? nf4 : fp4;
}

// ------------------------------------------------------------------------------------------------
// Device helpers.

__device__ __forceinline__ const float2& cell_of(const float2* cells, float v, float magic) {
  const float rounded = fmaf(v, 32.0f, magic);
  return cells[__float_as_uint(rounded) - __float_as_uint(kRoundingMagic)];
}

// == quantize_nf4(x) for every float x.
__device__ __forceinline__ uint32_t nf4_code(float x, const float2* cells) {
  const float2 cell = cell_of(cells, fminf(fmaxf(x, -1.0f), 1.0f), kRoundingMagic + 32.0f);
  return __float_as_uint(cell.y) + (x > cell.x ? 1u : 0u);
}

// == quantize_fp4(x) for every float x.
__device__ __forceinline__ uint32_t fp4_code(float x, const float2* cells, uint32_t rank_to_code) {
  const float a = fabsf(x);
  const float2 cell = cell_of(cells, fminf(fmaxf(a, 0.0f), 1.0f), kRoundingMagic);
  const uint32_t rank_times_4 = __float_as_uint(cell.y) + (a > cell.x ? 4u : 0u);
  return ((rank_to_code >> rank_times_4) & 7u) | (x < 0.0f ? 8u : 0u);
}

// ------------------------------------------------------------------------------------------------
// Quantize.

struct QuantizeShared {
  float2 cells[kCells];
  AbsmaxShared reduction;
};

// Processes one tile: kQblocksPerTile quantization blocks starting at block tile * kQblocksPerTile
// (loads and absmax in quantize_tile_prologue, then the codes). kVectorAccess: the whole tile lies
// below n and the pointers are aligned (16-byte loads, 4-byte stores); otherwise element-wise guarded
// loads (0.0 past n) and byte-wise guarded stores.
template <typename T, int kBlocksize, QuantType kType, bool kVectorAccess>
__device__ __forceinline__ void quantize_4bit_tile(const T* __restrict__ input, int64_t n, int64_t tile,
                                                   int parity, uint32_t rank_to_code, QuantizeShared& shared,
                                                   float* __restrict__ absmax, uint8_t* __restrict__ packed) {
  using Thread = QuantizeThread<T, kBlocksize>;
  const Thread t =
      quantize_tile_prologue<T, kBlocksize, kVectorAccess>(input, n, tile, parity, shared.reduction, absmax);
#pragma unroll
  for (int k = 0; k < Thread::kVectors; ++k) {
    uint32_t word = 0;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const float x = multiply_like_cuda(element_value(t.v[k], j), t.recip);
      const uint32_t code =
          kType == QuantType::kNF4 ? nf4_code(x, shared.cells) : fp4_code(x, shared.cells, rank_to_code);
      word |= code << (4 * (j ^ 1));  // element 2i: high nibble of byte i
    }
    const int64_t e0 = t.vector_start(k);
    if (kVectorAccess) {
      *reinterpret_cast<uint32_t*>(packed + e0 / 2) = word;
    } else {
      const int bytes = (elements_below(e0, n) + 1) / 2;  // an odd n keeps its padding nibble
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        if (i < bytes) packed[e0 / 2 + i] = static_cast<uint8_t>(word >> (8 * i));
      }
    }
  }
}

template <typename T, int kBlocksize, QuantType kType, bool kAligned>
__global__ void __launch_bounds__(kThreadsPerBlock)
    quantize_4bit_kernel(const T* __restrict__ input, int64_t n,
                         const __grid_constant__ FourBitCellTable table, float* __restrict__ absmax,
                         uint8_t* __restrict__ packed) {
  using Layout = QuantizeLayout<kBlocksize>;
  __shared__ QuantizeShared shared;
  if (threadIdx.x < kCells) shared.cells[threadIdx.x] = table.cell[threadIdx.x];
  __syncthreads();

  const int64_t tiles = tile_count(n, Layout::kTileElements);
  int parity = 0;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x, parity ^= 1) {
    if (kAligned && (tile + 1) * Layout::kTileElements <= n) {
      quantize_4bit_tile<T, kBlocksize, kType, true>(input, n, tile, parity, table.rank_to_code, shared,
                                                     absmax, packed);
    } else {
      quantize_4bit_tile<T, kBlocksize, kType, false>(input, n, tile, parity, table.rank_to_code, shared,
                                                      absmax, packed);
    }
  }
}

template <typename T, int kBlocksize, QuantType kType>
cudaError_t launch_quantize_4bit(const void* input, int64_t n, float* absmax, uint8_t* packed,
                                 cudaStream_t stream) {
  using Layout = QuantizeLayout<kBlocksize>;
  const FourBitCellTable& table = four_bit_cell_table(kType);
  if (!table.valid) return cudaErrorNotSupported;  // a codebook with thresholds closer than 1/32
  const unsigned grid = grid_blocks(n, Layout::kTileElements);
  const T* typed_input = static_cast<const T*>(input);
  const bool aligned = is_aligned(input, 16) && is_aligned(packed, 4);
  if (aligned) {
    quantize_4bit_kernel<T, kBlocksize, kType, true>
        <<<grid, kThreadsPerBlock, 0, stream>>>(typed_input, n, table, absmax, packed);
  } else {
    quantize_4bit_kernel<T, kBlocksize, kType, false>
        <<<grid, kThreadsPerBlock, 0, stream>>>(typed_input, n, table, absmax, packed);
  }
  return cudaGetLastError();
}

// ------------------------------------------------------------------------------------------------
// Dequantize.

// Byte offset into the level table of the code of element j (0..7) of a packed 32-bit word.
template <int j>
__device__ __forceinline__ uint32_t level_offset(uint32_t word) {
  constexpr int kShift = 8 * (j / 2) + ((j & 1) ? 0 : 4);  // nibble position
  if constexpr (kShift >= 2) {
    return (word >> (kShift - 2)) & 0x3cu;
  } else {
    return (word << (2 - kShift)) & 0x3cu;
  }
}

template <int j>
__device__ __forceinline__ float level_of(const float* table, uint32_t word) {
  return level_at(table, level_offset<j>(word));
}

// The 4-bit layout for dequantize_tiles: a run is one 32-bit (fp16/bf16 output) or 16-bit (fp32) load.
struct NibbleCodes {
  using Run = uint32_t;

  template <int kRunElements>
  __device__ static __forceinline__ Run load_run(const uint8_t* __restrict__ packed, int64_t e0) {
    if constexpr (kRunElements == 8) {
      return __ldcs(reinterpret_cast<const unsigned int*>(packed + e0 / 2));
    } else {
      return __ldcs(reinterpret_cast<const unsigned short*>(packed + e0 / 2));
    }
  }

  template <int kRunElements>
  __device__ static __forceinline__ void levels(const float* table, Run word, float (&level)[kRunElements]) {
    level[0] = level_of<0>(table, word);
    level[1] = level_of<1>(table, word);
    level[2] = level_of<2>(table, word);
    level[3] = level_of<3>(table, word);
    if constexpr (kRunElements == 8) {
      level[4] = level_of<4>(table, word);
      level[5] = level_of<5>(table, word);
      level[6] = level_of<6>(table, word);
      level[7] = level_of<7>(table, word);
    }
  }

  __device__ static __forceinline__ uint32_t code(const uint8_t* packed, int64_t i) {
    return (packed[i / 2] >> ((i & 1) ? 0 : 4)) & 15u;
  }
};

// Scales: const float* (plain absmax) or NestedScales. The nested kernel copies nested_code to shared
// memory (one entry per thread) next to the levels and reads the offset once; the tile loop reads the
// scales through NestedScaleReader.
template <typename Out, bool kAligned, typename Scales>
__global__ void __launch_bounds__(kThreadsPerBlock, 1)
    dequantize_4bit_kernel(const uint8_t* __restrict__ packed, const Scales scales,
                           const float* __restrict__ table, int64_t n, int log2_blocksize,
                           uint32_t default_nan, Out* __restrict__ output) {
  constexpr bool kNested = std::is_same_v<Scales, NestedScales>;
  __shared__ float shared_table[16];
  bool entry_finite = true;
  if (threadIdx.x < 16) {
    const float level = table[threadIdx.x];
    shared_table[threadIdx.x] = level;
    entry_finite = isfinite(level);
  }
  if constexpr (kNested) {
    static_assert(kThreadsPerBlock == 256, "one nested_code entry per thread");
    __shared__ float shared_code[256];
    shared_code[threadIdx.x] = __ldg(scales.nested_code + threadIdx.x);
    const float offset = __ldg(scales.offset);
    const bool table_finite = __syncthreads_and(entry_finite);
    const NestedScaleReader reader{scales.absmax_codes, scales.nested_absmax, shared_code, offset};
    dequantize_tiles<NibbleCodes, Out, kAligned>(packed, reader, shared_table, table_finite, n,
                                                 log2_blocksize, default_nan, output);
  } else {
    const bool table_finite = __syncthreads_and(entry_finite);
    dequantize_tiles<NibbleCodes, Out, kAligned>(packed, scales, shared_table, table_finite, n,
                                                 log2_blocksize, default_nan, output);
  }
}

}  // namespace
}  // namespace detail

cudaError_t quantize_4bit(const void* input, DType input_dtype, int64_t n, int64_t blocksize, QuantType type,
                          float* absmax, uint8_t* packed, cudaStream_t stream) {
  if (n < 0 || !is_valid_blocksize(blocksize)) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  return detail::dispatch_dtype(input_dtype, [&](auto element) {
    return detail::dispatch_blocksize(blocksize, [&](auto block) {
      using T = typename decltype(element)::type;
      constexpr int kBlocksize = decltype(block)::value;
      switch (type) {
        case QuantType::kNF4:
          return detail::launch_quantize_4bit<T, kBlocksize, QuantType::kNF4>(input, n, absmax, packed,
                                                                              stream);
        case QuantType::kFP4:
          return detail::launch_quantize_4bit<T, kBlocksize, QuantType::kFP4>(input, n, absmax, packed,
                                                                              stream);
      }
      return cudaErrorInvalidValue;
    });
  });
}

cudaError_t dequantize_4bit(const uint8_t* packed, BlockScales scales, const float* table, int64_t n,
                            int64_t blocksize, DType output_dtype, void* output, cudaStream_t stream) {
  if (n < 0 || !is_valid_blocksize(blocksize)) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  const bool nested = scales.absmax == nullptr;
  if (nested && (scales.absmax_codes == nullptr || scales.nested_absmax == nullptr ||
                 scales.nested_code == nullptr || scales.offset == nullptr)) {
    return cudaErrorInvalidValue;
  }
  return detail::dispatch_dtype(output_dtype, [&](auto element) {
    using Out = typename decltype(element)::type;
    if (nested) {
      const detail::NestedScales nested_scales{scales.absmax_codes, scales.nested_absmax, scales.nested_code,
                                               scales.offset};
      return detail::launch_dequantize<Out, detail::NestedScales>(
          detail::dequantize_4bit_kernel<Out, true, detail::NestedScales>,
          detail::dequantize_4bit_kernel<Out, false, detail::NestedScales>, 4, packed, nested_scales, table,
          n, blocksize, output, stream);
    }
    return detail::launch_dequantize<Out>(detail::dequantize_4bit_kernel<Out, true, const float*>,
                                          detail::dequantize_4bit_kernel<Out, false, const float*>, 4, packed,
                                          scales.absmax, table, n, blocksize, output, stream);
  });
}

}  // namespace halfbyte::cuda
