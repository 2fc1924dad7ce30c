// Blockwise 8-bit quantization with a sorted 256-entry code (the dynamic map) on raw device pointers.
//
// Algorithm (bit-identical to halfbyte::cpu::quantize_blockwise_8bit / dequantize_blockwise_8bit):
//   quantize:   for each block of `blocksize` consecutive elements (the last may be shorter)
//               absmax = NaN-propagating max |x| with subnormals as 0 (absmax_step),
//               recip = rcp.approx.ftz(absmax) (reciprocal_like_cuda, as bitsandbytes; 1/0 = inf),
//               code = quantize_with_code256(code, float(x) * recip) (codebooks.h; binary search with
//               bitsandbytes' tie rule), evaluated by code8_index (the same search, restated on a
//               bank-conflict-free shared-memory layout of the 256 levels; see there).
//   dequantize: out = convert(code[c] * absmax[i / blocksize]), fp32 product, round-to-nearest-even.
//
// Layout: one code byte per element; one float32 absmax per block.
//
// Work split, quantize (256 threads per thread block), as in blockwise_4bit.cu (blockwise_common.cuh):
//   A thread holds 2 (blocksize <= 512) or 4 (blocksize >= 1024) vectors of 8 elements (16-byte loads;
//   two per vector for fp32) and writes 8 code bytes per vector (one 8-byte store). A quantization
//   block belongs to blocksize / (8 * vectors) threads: 2..32 lanes of one warp for blocksize <= 1024
//   (absmax reduced with xor shuffles, or one redux.sync for a whole warp), 2 or 4 warps for 2048 /
//   4096 (warp redux, then shared memory). Vector k of a thread sits at element
//   (k * threads_per_block + lane) * 8 of its quantization block, so every warp load and store touches
//   whole 32-byte sectors. The max is taken over the |x| bit patterns (unsigned), exact and order-free;
//   NaN bit patterns exceed infinity, so a NaN block is detected, and only then (warp- or
//   block-uniform branch) the CPU's absmax bits (those of the last NaN of the block) are looked up.
//   The search: levels 1-2 compare with registers, levels 3-7 and the final neighbour with one shared
//   load each; entry i sits at word 1 + i + i / 32, which puts the pivots of every level in distinct
//   banks (the plain layout puts all pivots of a level in one to four banks: 4-way conflicts).
// Work split, dequantize: a thread handles 32 elements per tile as runs of one 16-byte store each
//   (8 fp16/bf16 or 4 fp32 elements), the runs of a warp adjacent, so each warp store writes 512
//   contiguous bytes; the 256 levels sit in shared memory.
//   A NaN product (absmax NaN/inf, or a non-finite level) gets the CPU's bits (see cpu_nan_bits).
//
// Ragged ends and alignment: tiles that end past n (the last one) use element-wise guarded loads and
// stores. When the input is not 16-byte aligned or the codes not 8-byte aligned (dequantize: output
// not 16-byte / codes not 8-byte aligned), every tile takes that guarded path.
//
// Limits: blocksize a power of two in 32..4096, any n >= 0 (64-bit indices, grid-stride loops).
// The scaling instructions are explicit (rcp.approx.ftz, mul.ftz via codebooks.h), as in bitsandbytes.
//
// Shared with blockwise_4bit.cu, in blockwise_common.cuh: the launch shape and host helpers, the input
// vectors and guarded loads, the absmax of a quantization block with its NaN rule (the first half of a
// quantize tile, quantize_tile_prologue), and the dequantize tile loop with its output conversion and
// NaN bits (dequantize_tiles, launch_dequantize). Here: the code search (code8_index), the code byte
// stores, and how dequantize reads code bytes (ByteCodes).
//
// Expected bottleneck: quantize is bound by instruction issue and shared-memory loads, not HBM:
// ~40 instructions and 7 shared loads per element. 14336x4096 bf16 moves 117 MB in and 59 MB out
// (~63 us at copy bandwidth); measured 119-121 us on an H100 (bf16 / fp16, any blocksize; fp32 131-136).
// Dequantize is HBM-bound: 59 MB in, 117 MB out, ~5 instructions per element; measured 68 us
// (~2.6 TB/s, ~93% of the 2.8 TB/s copy bandwidth of that run).
#include <cuda_runtime.h>

#include <cstdint>

#include "blockwise_common.cuh"
#include "halfbyte/codebooks.h"
#include "halfbyte/cuda_kernels.h"
#include "halfbyte/float_types.h"

namespace halfbyte::cuda {
namespace detail {
namespace {

constexpr int kCodeSize = 256;

// ------------------------------------------------------------------------------------------------
// Quantize.

// The code as the search reads it: entry i at word 1 + i + i / 32 (rows of 32 entries plus one word),
// so that the pivots a warp reads at each search level fall in different banks (the plain layout puts
// all pivots of a level in one to four banks). Word 0 repeats code[0] and the extra word of row r
// repeats code[32 r + 31]: the entry below entry i is then always the word below its word.
constexpr int kCodeWords = 1 + 33 * (kCodeSize / 32);

__device__ __forceinline__ int code_word(int i) { return 1 + i + (i >> 5); }

struct CodeTop {
  float root, left, right;  // code[127], code[63], code[191]: the first two search levels
};

// The float at `byte_offset` bytes from `base` (shared memory; 32-bit offsets fold into the load).
__device__ __forceinline__ float load_at(const char* base, uint32_t byte_offset) {
  return *reinterpret_cast<const float*>(base + byte_offset);
}

// One search level of step s: pivot b + s - 1 is in the row of b (b is a multiple of 2s), so its word
// is s - 1 words after b's; going right moves b's word by s (+ 1 when crossing into the next row).
template <int kStep>
__device__ __forceinline__ uint32_t search_level(const char* entry0, uint32_t at_b, float x) {
  return x > load_at(entry0, at_b + 4 * (kStep - 1)) ? at_b + 4 * (kStep + kStep / 32) : at_b;
}

// == quantize_with_code256(code, x) for every float x and any 256-entry code (codebooks.h).
// That function's search visits pivots b + s - 1 for s = 128, 64, ..., 2, where b (a multiple of 2s)
// grows by s whenever x > code[pivot]; it ends on pivot b with lower_index = max(b - 1, 0) and
// upper_index = b + 1 (checked for all 128 paths), and lower / upper are code[lower_index] /
// code[upper_index]. Here the search keeps at_b = 4 * (b + b / 32), the byte offset of b's word.
__device__ __forceinline__ uint32_t code8_index(const float* words, const CodeTop& top, float x) {
  const bool right0 = x > top.root;
  const bool right1 = x > (right0 ? top.right : top.left);
  const char* entry0 = reinterpret_cast<const char*>(words + 1);
  uint32_t at_b = 4 * ((right0 ? 128 + 4 : 0) + (right1 ? 64 + 2 : 0));
  at_b = search_level<32>(entry0, at_b, x);
  at_b = search_level<16>(entry0, at_b, x);
  at_b = search_level<8>(entry0, at_b, x);
  at_b = search_level<4>(entry0, at_b, x);
  at_b = search_level<2>(entry0, at_b, x);
  const float value = load_at(entry0, at_b);
  const bool above = x > value;
  const float neighbor = load_at(entry0, above ? at_b + 4 : at_b - 4);  // code[b + 1] or code[max(b - 1, 0)]
  const float midpoint = (neighbor + value) * 0.5f;
  const int step = above ? (x > midpoint ? 1 : 0) : (x < midpoint ? -1 : 0);
  const int w = static_cast<int>(at_b / 4);
  return max(w - w / 33 + step, 0);  // b + step; b - 1 is clamped to lower_index 0
}

struct QuantizeShared {
  float code[kCodeWords];
  AbsmaxShared reduction;
};

// Processes one tile: kQblocksPerTile quantization blocks starting at block tile * kQblocksPerTile
// (loads and absmax in quantize_tile_prologue, then the codes). kVectorAccess: the whole tile lies
// below n and the pointers are aligned (16-byte loads, 8-byte stores); otherwise element-wise guarded
// loads and stores.
template <typename T, int kBlocksize, bool kVectorAccess>
__device__ __forceinline__ void quantize_8bit_tile(const T* __restrict__ input, int64_t n, int64_t tile,
                                                   int parity, const CodeTop& top, QuantizeShared& shared,
                                                   float* __restrict__ absmax, uint8_t* __restrict__ codes) {
  using Thread = QuantizeThread<T, kBlocksize>;
  const Thread t =
      quantize_tile_prologue<T, kBlocksize, kVectorAccess>(input, n, tile, parity, shared.reduction, absmax);
#pragma unroll
  for (int k = 0; k < Thread::kVectors; ++k) {
    uint32_t word[2] = {0u, 0u};
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const uint32_t code =
          code8_index(shared.code, top, multiply_like_cuda(element_value(t.v[k], j), t.recip));
      word[j / 4] |= code << (8 * (j % 4));
    }
    const int64_t e0 = t.vector_start(k);
    if (kVectorAccess) {
      *reinterpret_cast<uint2*>(codes + e0) = make_uint2(word[0], word[1]);
    } else {
      const int count = elements_below(e0, n);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        if (j < count) codes[e0 + j] = static_cast<uint8_t>(word[j / 4] >> (8 * (j % 4)));
      }
    }
  }
}

template <typename T, int kBlocksize, bool kAligned>
__global__ void __launch_bounds__(kThreadsPerBlock, 1)
    quantize_8bit_kernel(const T* __restrict__ input, int64_t n, const float* __restrict__ code,
                         float* __restrict__ absmax, uint8_t* __restrict__ codes) {
  using Layout = QuantizeLayout<kBlocksize>;
  static_assert(kThreadsPerBlock == kCodeSize, "one code entry per thread");
  __shared__ QuantizeShared shared;
  const int i = threadIdx.x;
  const float level = code[i];
  shared.code[code_word(i)] = level;
  if (i % 32 == 31) shared.code[code_word(i) + 1] = level;
  if (i == 0) shared.code[0] = level;
  __syncthreads();
  const CodeTop top{shared.code[code_word(127)], shared.code[code_word(63)], shared.code[code_word(191)]};

  const int64_t tiles = tile_count(n, Layout::kTileElements);
  int parity = 0;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x, parity ^= 1) {
    if (kAligned && (tile + 1) * Layout::kTileElements <= n) {
      quantize_8bit_tile<T, kBlocksize, true>(input, n, tile, parity, top, shared, absmax, codes);
    } else {
      quantize_8bit_tile<T, kBlocksize, false>(input, n, tile, parity, top, shared, absmax, codes);
    }
  }
}

template <typename T, int kBlocksize>
cudaError_t launch_quantize_8bit(const void* input, int64_t n, const float* code, float* absmax,
                                 uint8_t* codes, cudaStream_t stream) {
  using Layout = QuantizeLayout<kBlocksize>;
  const unsigned grid = grid_blocks(n, Layout::kTileElements);
  const T* typed_input = static_cast<const T*>(input);
  const bool aligned = is_aligned(input, 16) && is_aligned(codes, 8);
  if (aligned) {
    quantize_8bit_kernel<T, kBlocksize, true>
        <<<grid, kThreadsPerBlock, 0, stream>>>(typed_input, n, code, absmax, codes);
  } else {
    quantize_8bit_kernel<T, kBlocksize, false>
        <<<grid, kThreadsPerBlock, 0, stream>>>(typed_input, n, code, absmax, codes);
  }
  return cudaGetLastError();
}

// ------------------------------------------------------------------------------------------------
// Dequantize.

// Level of byte j (0..3) of a 32-bit word of codes.
template <int j>
__device__ __forceinline__ float level_of_byte(const float* table, uint32_t word) {
  if constexpr (j == 0) {
    return level_at(table, (word << 2) & 0x3fcu);
  } else {
    return level_at(table, (word >> (8 * j - 2)) & 0x3fcu);
  }
}

// The 8-bit layout for dequantize_tiles: a run is one 8-byte (fp16/bf16 output) or 4-byte (fp32) load.
struct ByteCodes {
  using Run = uint2;

  template <int kRunElements>
  __device__ static __forceinline__ Run load_run(const uint8_t* __restrict__ codes, int64_t e0) {
    if constexpr (kRunElements == 8) {
      return __ldcs(reinterpret_cast<const uint2*>(codes + e0));
    } else {
      return make_uint2(__ldcs(reinterpret_cast<const unsigned int*>(codes + e0)), 0u);
    }
  }

  template <int kRunElements>
  __device__ static __forceinline__ void levels(const float* table, Run run, float (&level)[kRunElements]) {
    level[0] = level_of_byte<0>(table, run.x);
    level[1] = level_of_byte<1>(table, run.x);
    level[2] = level_of_byte<2>(table, run.x);
    level[3] = level_of_byte<3>(table, run.x);
    if constexpr (kRunElements == 8) {
      level[4] = level_of_byte<0>(table, run.y);
      level[5] = level_of_byte<1>(table, run.y);
      level[6] = level_of_byte<2>(table, run.y);
      level[7] = level_of_byte<3>(table, run.y);
    }
  }

  __device__ static __forceinline__ uint8_t code(const uint8_t* codes, int64_t i) { return codes[i]; }
};

template <typename Out, bool kAligned>
__global__ void __launch_bounds__(kThreadsPerBlock, 1)
    dequantize_8bit_kernel(const uint8_t* __restrict__ codes, const float* __restrict__ absmax,
                           const float* __restrict__ code, int64_t n, int log2_blocksize,
                           uint32_t default_nan, Out* __restrict__ output) {
  static_assert(kThreadsPerBlock == kCodeSize, "one code entry per thread");
  __shared__ float shared_code[kCodeSize];
  const float entry = code[threadIdx.x];
  shared_code[threadIdx.x] = entry;
  const bool table_finite = __syncthreads_and(isfinite(entry));
  dequantize_tiles<ByteCodes, Out, kAligned>(codes, absmax, shared_code, table_finite, n, log2_blocksize,
                                             default_nan, output);
}

}  // namespace
}  // namespace detail

cudaError_t quantize_blockwise_8bit(const void* input, DType input_dtype, int64_t n, int64_t blocksize,
                                    const float* code, float* absmax, uint8_t* codes, cudaStream_t stream) {
  if (n < 0 || !is_valid_blocksize(blocksize)) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  return detail::dispatch_dtype(input_dtype, [&](auto element) {
    return detail::dispatch_blocksize(blocksize, [&](auto block) {
      using T = typename decltype(element)::type;
      return detail::launch_quantize_8bit<T, decltype(block)::value>(input, n, code, absmax, codes, stream);
    });
  });
}

cudaError_t dequantize_blockwise_8bit(const uint8_t* codes, const float* absmax, const float* code, int64_t n,
                                      int64_t blocksize, DType output_dtype, void* output,
                                      cudaStream_t stream) {
  if (n < 0 || !is_valid_blocksize(blocksize)) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  return detail::dispatch_dtype(output_dtype, [&](auto element) {
    using Out = typename decltype(element)::type;
    return detail::launch_dequantize<Out>(detail::dequantize_8bit_kernel<Out, true>,
                                          detail::dequantize_8bit_kernel<Out, false>, 8, codes, absmax, code,
                                          n, blocksize, output, stream);
  });
}

}  // namespace halfbyte::cuda
