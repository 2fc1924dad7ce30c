// Shared parts of the blockwise CUDA kernels, for blockwise_4bit.cu and blockwise_8bit.cu only (names in
// halfbyte::cuda::detail). Device functions are force-inlined, so each kernel compiles as if they were
// written in its own file. Those files describe the algorithms, layouts and work split; this header
// holds the parts that do not depend on the code format:
//   - launch shape and host helpers: 256 threads per thread block, grids capped at 2^30 thread blocks
//     (grid-stride loops), grid size, log2(blocksize), alignment tests, the dispatch of DType and
//     blocksize to template arguments, and this host's NaN bits for 0 * inf (host_default_nan_bits);
//   - quantize input: vectors of 8 elements (fp32 / fp16 / bf16) held as raw 32-bit words, read by
//     16-byte loads or by element-wise guarded loads (0.0 past n), and an element's float value;
//   - quantize absmax: how threads share a quantization block (QuantizeLayout) and
//     quantize_tile_prologue, the first half of every quantize tile. It loads the vectors, takes the
//     exact max over the |x| bit patterns, reduced over the block's threads (shuffles or redux, plus
//     shared memory across warps), takes the CPU's absmax bits (those of the block's last NaN) for a
//     block with a NaN, stores the absmax and returns its reciprocal;
//   - dequantize: the tile loop (dequantize_tiles, parameterized by how the codes are stored and by
//     the scale source: plain float32 absmax, or double-quantized scales read through
//     NestedScaleReader), 16-byte runs of level * scale with the CPU's NaN bits (cpu_nan_bits,
//     OutputTraits, dequantize_run), the element-wise guarded path and the host launcher
//     (launch_dequantize).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "device_attributes.cuh"
#include "halfbyte/codebooks.h"
#include "halfbyte/float_types.h"

namespace halfbyte::cuda::detail {

inline constexpr int kThreadsPerBlock = 256;
inline constexpr int kWarpsPerBlock = kThreadsPerBlock / 32;
inline constexpr unsigned kFullMask = 0xffffffffu;
inline constexpr int64_t kMaxGridBlocks = int64_t{1} << 30;  // larger problems loop (grid-stride)

// ------------------------------------------------------------------------------------------------
// Host helpers.

// The float32 NaN this host's FPU makes of 0 * inf (x86: 0xFFC00000). The CPU kernels produce it for a
// zero level times an infinite absmax; the GPU's own NaN (0x7FFFFFFF) differs.
inline uint32_t host_default_nan_bits() {
  volatile float zero = 0.0f;
  volatile float infinity = INFINITY;
  const float product = zero * infinity;
  uint32_t bits;
  std::memcpy(&bits, &product, 4);
  return bits;
}

// Tiles of `tile_elements` covering n elements.
__host__ __device__ __forceinline__ int64_t tile_count(int64_t n, int64_t tile_elements) {
  return (n + tile_elements - 1) / tile_elements;
}

// One thread block per tile, at most kMaxGridBlocks.
inline unsigned grid_blocks(int64_t n, int64_t tile_elements) {
  return static_cast<unsigned>(std::min(tile_count(n, tile_elements), kMaxGridBlocks));
}

using host::log2_of;  // log2 of a power-of-two blocksize

inline bool is_aligned(const void* pointer, uintptr_t bytes) {
  return reinterpret_cast<uintptr_t>(pointer) % bytes == 0;
}

template <typename T>
struct TypeTag {
  using type = T;
};

// f(TypeTag<T>{}) for the element type T of dtype (float, __half, __nv_bfloat16).
template <typename F>
cudaError_t dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32:
      return f(TypeTag<float>{});
    case DType::kFloat16:
      return f(TypeTag<__half>{});
    case DType::kBFloat16:
      return f(TypeTag<__nv_bfloat16>{});
  }
  return cudaErrorInvalidValue;
}

// f(std::integral_constant<int, blocksize>{}) for a blocksize of is_valid_blocksize (32..4096).
template <typename F>
cudaError_t dispatch_blocksize(int64_t blocksize, F&& f) {
  switch (blocksize) {
    case 32:
      return f(std::integral_constant<int, 32>{});
    case 64:
      return f(std::integral_constant<int, 64>{});
    case 128:
      return f(std::integral_constant<int, 128>{});
    case 256:
      return f(std::integral_constant<int, 256>{});
    case 512:
      return f(std::integral_constant<int, 512>{});
    case 1024:
      return f(std::integral_constant<int, 1024>{});
    case 2048:
      return f(std::integral_constant<int, 2048>{});
    case 4096:
      return f(std::integral_constant<int, 4096>{});
    default:
      return cudaErrorInvalidValue;
  }
}

// ------------------------------------------------------------------------------------------------
// Quantize input: raw vectors of 8 elements held as 32-bit words.

template <typename T>
struct ElementTraits;

template <>
struct ElementTraits<float> {
  static constexpr int kWords = 8;
  static constexpr uint32_t kInfinityBits = 0x7f800000u;  // |x| bit patterns above this are NaN
};

template <>
struct ElementTraits<__half> {
  static constexpr int kWords = 4;
  static constexpr uint32_t kInfinityBits = 0x7c00u;
};

template <>
struct ElementTraits<__nv_bfloat16> {
  static constexpr int kWords = 4;
  static constexpr uint32_t kInfinityBits = 0x7f80u;
};

template <typename T>
struct RawVector {
  uint32_t word[ElementTraits<T>::kWords];
};

template <typename T>
__device__ __forceinline__ RawVector<T> load_vector(const T* __restrict__ input, int64_t e0) {
  RawVector<T> v;
  const uint4* source = reinterpret_cast<const uint4*>(input + e0);
#pragma unroll
  for (int q = 0; q < ElementTraits<T>::kWords / 4; ++q) {
    const uint4 chunk = __ldcs(source + q);
    v.word[4 * q + 0] = chunk.x;
    v.word[4 * q + 1] = chunk.y;
    v.word[4 * q + 2] = chunk.z;
    v.word[4 * q + 3] = chunk.w;
  }
  return v;
}

// Number of the 8 elements from e0 that lie below n.
__device__ __forceinline__ int elements_below(int64_t e0, int64_t n) {
  const int64_t left = n - e0;
  return left <= 0 ? 0 : (left >= 8 ? 8 : static_cast<int>(left));
}

// Elements at or past n read as 0.0.
template <typename T>
__device__ __forceinline__ RawVector<T> load_vector_guarded(const T* __restrict__ input, int64_t e0,
                                                            int64_t n) {
  const int count = elements_below(e0, n);
  RawVector<T> v;
  if constexpr (sizeof(T) == 4) {
    const uint32_t* source = reinterpret_cast<const uint32_t*>(input) + e0;
#pragma unroll
    for (int j = 0; j < 8; ++j) v.word[j] = j < count ? source[j] : 0u;
  } else {
    const uint16_t* source = reinterpret_cast<const uint16_t*>(input) + e0;
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      const uint32_t lo = 2 * w < count ? source[2 * w] : 0u;
      const uint32_t hi = 2 * w + 1 < count ? source[2 * w + 1] : 0u;
      v.word[w] = lo | (hi << 16);
    }
  }
  return v;
}

template <typename T>
__device__ __forceinline__ uint32_t raw_element(const RawVector<T>& v, int j) {
  if constexpr (sizeof(T) == 4) {
    return v.word[j];
  } else {
    return (j & 1) ? (v.word[j / 2] >> 16) : (v.word[j / 2] & 0xffffu);
  }
}

template <typename T>
__device__ __forceinline__ float element_value(const RawVector<T>& v, int j) {
  if constexpr (sizeof(T) == 4) {
    return __uint_as_float(v.word[j]);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __uint_as_float((j & 1) ? (v.word[j / 2] & 0xffff0000u) : (v.word[j / 2] << 16));
  } else {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(raw_element(v, j))));
  }
}

// ------------------------------------------------------------------------------------------------
// Quantize absmax.

// Running max of |x| bit patterns: one unsigned max per fp32 element; for 16-bit types two lanes of
// 16 bits per word (vmax.u16x2), folded by fold_abs_bits.
template <typename T>
__device__ __forceinline__ uint32_t accumulate_abs_bits(const RawVector<T>& v, uint32_t running) {
#pragma unroll
  for (int w = 0; w < ElementTraits<T>::kWords; ++w) {
    if constexpr (sizeof(T) == 4) {
      running = max(running, v.word[w] & 0x7fffffffu);
    } else {
      running = __vmaxu2(running, v.word[w] & 0x7fff7fffu);
    }
  }
  return running;
}

template <typename T>
__device__ __forceinline__ uint32_t fold_abs_bits(uint32_t running) {
  if constexpr (sizeof(T) == 4) {
    return running;
  } else {
    return max(running & 0xffffu, running >> 16);
  }
}

// absmax of a block from its (non-NaN) max |x| bit pattern; exact. A subnormal maximum means every
// element is zero or subnormal, and absmax_step counts subnormals as zero (fp16 has no float32
// subnormals).
template <typename T>
__device__ __forceinline__ float abs_bits_to_float(uint32_t bits) {
  if constexpr (sizeof(T) == 4) {
    return __uint_as_float(bits < 0x00800000u ? 0u : bits);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __uint_as_float(bits < 0x0080u ? 0u : bits << 16);
  } else {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
  }
}

// float32 bits the CPU kernels make of a NaN element (float_types.h conversions keep sign and payload).
template <typename T>
__device__ __forceinline__ uint32_t nan_element_float_bits(uint32_t raw) {
  if constexpr (sizeof(T) == 4) {
    return raw;
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return raw << 16;
  } else {
    return ((raw & 0x8000u) << 16) | 0x7f800000u | ((raw & 0x3ffu) << 13);
  }
}

template <int kBlocksize>
struct QuantizeLayout {
  static constexpr int kVectorsPerThread = kBlocksize <= 512 ? 2 : 4;
  static constexpr int kThreadsPerQblock = kBlocksize / (8 * kVectorsPerThread);  // 2..128
  static constexpr int kQblocksPerTile = kThreadsPerBlock / kThreadsPerQblock;
  static constexpr int kTileElements = kThreadsPerBlock * 8 * kVectorsPerThread;
  static_assert(kThreadsPerQblock >= 2 && kThreadsPerQblock <= kThreadsPerBlock, "layout");
};

// Shared memory of the absmax reduction (used by quantization blocks that span several warps).
struct AbsmaxShared {
  uint32_t warp_max[2][kWarpsPerBlock];  // double-buffered over tiles
  uint32_t warp_scratch[kWarpsPerBlock];
};

// Max of `value` over the threads of one quantization block, kGroupThreads <= 32: every lane of the
// warp calls it (full-mask shuffles stay inside the aligned group).
template <int kGroupThreads>
__device__ __forceinline__ uint32_t warp_group_max(uint32_t value) {
  if constexpr (kGroupThreads == 32) {
    return __reduce_max_sync(kFullMask, value);
  } else {
#pragma unroll
    for (int offset = kGroupThreads / 2; offset > 0; offset >>= 1) {
      value = max(value, __shfl_xor_sync(kFullMask, value, offset));
    }
    return value;
  }
}

// Max over a quantization block spanning several warps; every thread of the thread block calls it.
template <int kGroupThreads>
__device__ __forceinline__ uint32_t block_group_max(uint32_t value, uint32_t* scratch) {
  constexpr int kGroupWarps = kGroupThreads / 32;
  const int warp = threadIdx.x / 32;
  value = __reduce_max_sync(kFullMask, value);
  __syncthreads();  // scratch free
  if (threadIdx.x % 32 == 0) scratch[warp] = value;
  __syncthreads();
  const int first_warp = warp / kGroupWarps * kGroupWarps;
#pragma unroll
  for (int w = 0; w < kGroupWarps; ++w) value = max(value, scratch[first_warp + w]);
  return value;
}

template <int kGroupThreads>
__device__ __forceinline__ uint32_t group_max(uint32_t value, uint32_t* scratch) {
  if constexpr (kGroupThreads <= 32) {
    return warp_group_max<kGroupThreads>(value);
  } else {
    return block_group_max<kGroupThreads>(value, scratch);
  }
}

template <typename T>
__device__ __forceinline__ bool is_nan_raw(uint32_t raw) {
  return (raw & (sizeof(T) == 4 ? 0x7fffffffu : 0x7fffu)) > ElementTraits<T>::kInfinityBits;
}

// The CPU's absmax of a block holding a NaN: the float bits of its last NaN element (absmax_step keeps
// the sign and payload of each NaN it meets). Every thread calls it; the result is meaningful for
// blocks with a NaN.
template <typename T, int kVectors, int kGroupThreads>
__device__ __forceinline__ uint32_t last_nan_bits(const RawVector<T> (&v)[kVectors], int lane_in_group,
                                                  uint32_t* scratch) {
  // Offsets in the block are (k * kGroupThreads + lane_in_group) * 8 + j; find the largest of a NaN.
  uint32_t local_last = 0;  // local position + 1, local position = k * kGroupThreads * 8 + j
#pragma unroll
  for (int k = 0; k < kVectors; ++k) {
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      if (is_nan_raw<T>(raw_element(v[k], j))) local_last = k * kGroupThreads * 8 + j + 1;
    }
  }
  const uint32_t last =
      group_max<kGroupThreads>(local_last ? local_last + lane_in_group * 8 : 0u, scratch);  // offset + 1
  const uint32_t target = last - 1u - lane_in_group * 8u;  // local position of that element, if ours
  uint32_t bits = 0;
#pragma unroll
  for (int k = 0; k < kVectors; ++k) {
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      if (target == static_cast<uint32_t>(k * kGroupThreads * 8 + j)) {
        bits = nan_element_float_bits<T>(raw_element(v[k], j));
      }
    }
  }
  return group_max<kGroupThreads>(bits, scratch);  // one owner; NaN bits are nonzero
}

// A thread's part of one quantization block in a quantize tile, after quantize_tile_prologue.
template <typename T, int kBlocksize>
struct QuantizeThread {
  using Layout = QuantizeLayout<kBlocksize>;
  static constexpr int kVectors = Layout::kVectorsPerThread;
  static constexpr int kGroupThreads = Layout::kThreadsPerQblock;

  int lane_in_group;    // index among the kGroupThreads threads of the quantization block
  int64_t block_start;  // first element of the quantization block
  RawVector<T> v[kVectors];
  float recip;  // reciprocal_like_cuda(absmax of the block)

  // First element of vector k; the k-th vectors of the group's threads are adjacent.
  __device__ __forceinline__ int64_t vector_start(int k) const {
    return block_start + (k * kGroupThreads + lane_in_group) * 8;
  }
};

// First half of a quantize tile (kQblocksPerTile quantization blocks starting at block
// tile * kQblocksPerTile), the same for every code: loads the thread's vectors (kVectorAccess: the
// whole tile lies below n and the input is 16-byte aligned; otherwise element-wise guarded loads, 0.0
// past n), reduces the block's max |x| bits (warp- or block-uniform NaN slow path), stores the absmax
// (lane 0, blocks that start below n) and returns its reciprocal with the vectors. Every thread of
// the thread block calls it; `parity` alternates over the tiles of a thread block.
template <typename T, int kBlocksize, bool kVectorAccess>
__device__ __forceinline__ QuantizeThread<T, kBlocksize> quantize_tile_prologue(const T* __restrict__ input,
                                                                                int64_t n, int64_t tile,
                                                                                int parity,
                                                                                AbsmaxShared& shared,
                                                                                float* __restrict__ absmax) {
  using Thread = QuantizeThread<T, kBlocksize>;
  constexpr int kVectors = Thread::kVectors;
  constexpr int kGroupThreads = Thread::kGroupThreads;
  const int lane_in_group = threadIdx.x % kGroupThreads;
  const int64_t qblock = tile * Thread::Layout::kQblocksPerTile + threadIdx.x / kGroupThreads;
  const int64_t block_start = qblock * kBlocksize;
  Thread t;
  t.lane_in_group = lane_in_group;
  t.block_start = block_start;

#pragma unroll
  for (int k = 0; k < kVectors; ++k) {
    const int64_t e0 = t.vector_start(k);
    t.v[k] = kVectorAccess ? load_vector(input, e0) : load_vector_guarded(input, e0, n);
  }

  uint32_t running = 0;
#pragma unroll
  for (int k = 0; k < kVectors; ++k) running = accumulate_abs_bits(t.v[k], running);
  uint32_t bits = fold_abs_bits<T>(running);

  // Max |x| bits of the block; a NaN block takes the (warp- or block-uniform) slow path.
  bool any_nan;
  if constexpr (kGroupThreads <= 32) {
    bits = warp_group_max<kGroupThreads>(bits);
    any_nan = __any_sync(kFullMask, bits > ElementTraits<T>::kInfinityBits);
  } else {
    constexpr int kGroupWarps = kGroupThreads / 32;
    const int warp = threadIdx.x / 32;
    bits = __reduce_max_sync(kFullMask, bits);
    if (threadIdx.x % 32 == 0) shared.warp_max[parity][warp] = bits;
    any_nan = __syncthreads_or(bits > ElementTraits<T>::kInfinityBits);
    const int first_warp = warp / kGroupWarps * kGroupWarps;
#pragma unroll
    for (int w = 0; w < kGroupWarps; ++w) bits = max(bits, shared.warp_max[parity][first_warp + w]);
  }
  float block_absmax = abs_bits_to_float<T>(bits);
  if (any_nan) {
    const uint32_t nan_bits =
        last_nan_bits<T, kVectors, kGroupThreads>(t.v, lane_in_group, shared.warp_scratch);
    if (bits > ElementTraits<T>::kInfinityBits) block_absmax = __uint_as_float(nan_bits);
  }

  if (lane_in_group == 0 && block_start < n) absmax[qblock] = block_absmax;
  t.recip = reciprocal_like_cuda(block_absmax);
  return t;
}

// ------------------------------------------------------------------------------------------------
// Dequantize output.

// A run is the elements of one 16-byte output store: 8 (fp16/bf16) or 4 (fp32) elements. A thread
// handles 32 elements per tile, as runs that are adjacent across a warp.
template <typename Out>
struct DequantizeLayout {
  static constexpr int kRunElements = 16 / sizeof(Out);
  static constexpr int kRunsPerThread = 32 / kRunElements;
};
inline constexpr int kDequantizeTileElements = kThreadsPerBlock * 32;

// Bits the CPU kernels produce for a NaN product level * absmax (x86 SSE semantics: a NaN operand is
// returned quieted, absmax first; 0 * inf gives the host's default NaN).
__device__ __forceinline__ uint32_t cpu_nan_bits(float level, float scale, uint32_t default_nan) {
  const uint32_t scale_bits = __float_as_uint(scale);
  const uint32_t level_bits = __float_as_uint(level);
  if ((scale_bits & 0x7fffffffu) > 0x7f800000u) return scale_bits | 0x00400000u;
  if ((level_bits & 0x7fffffffu) > 0x7f800000u) return level_bits | 0x00400000u;
  return default_nan;
}

template <typename Out>
struct OutputTraits;

template <>
struct OutputTraits<float> {
  __device__ static uint32_t pack(float a, float) { return __float_as_uint(a); }
  __device__ static uint32_t element_bits(float p) { return __float_as_uint(p); }
  __device__ static uint32_t nan_bits(uint32_t cpu_nan) { return cpu_nan; }
};

template <>
struct OutputTraits<__half> {
  __device__ static uint32_t pack(float a, float b) {
    const __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
  __device__ static uint32_t element_bits(float p) { return __half_as_ushort(__float2half_rn(p)); }
  __device__ static uint32_t nan_bits(uint32_t cpu_nan) { return ((cpu_nan >> 16) & 0x8000u) | 0x7e00u; }
};

template <>
struct OutputTraits<__nv_bfloat16> {
  __device__ static uint32_t pack(float a, float b) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
  __device__ static uint32_t element_bits(float p) { return __bfloat16_as_ushort(__float2bfloat16_rn(p)); }
  __device__ static uint32_t nan_bits(uint32_t) { return 0x7fc0u; }
};

// Output bits of level * scale with the CPU's NaN bits.
template <typename Out>
__device__ __forceinline__ uint32_t checked_element_bits(float level, float scale, uint32_t default_nan) {
  const float product = multiply_like_cuda(level, scale);
  if (product != product) return OutputTraits<Out>::nan_bits(cpu_nan_bits(level, scale, default_nan));
  return OutputTraits<Out>::element_bits(product);
}

template <typename Out>
__device__ __forceinline__ void store_element_bits(Out* output, int64_t i, uint32_t bits) {
  if constexpr (sizeof(Out) == 4) {
    reinterpret_cast<uint32_t*>(output)[i] = bits;
  } else {
    reinterpret_cast<uint16_t*>(output)[i] = static_cast<uint16_t>(bits);
  }
}

// The level at `byte_offset` bytes into a (shared-memory) level table.
__device__ __forceinline__ float level_at(const float* table, uint32_t byte_offset) {
  return *reinterpret_cast<const float*>(reinterpret_cast<const char*>(table) + byte_offset);
}

// Output bits of level[j] * scale for the elements of one run, 4 words (one 16-byte store).
template <typename Out, int kElements>
__device__ __forceinline__ uint4 dequantize_run(const float (&level)[kElements], bool table_finite,
                                                float scale, uint32_t default_nan) {
  static_assert(kElements * sizeof(Out) == 16, "one 16-byte store");
  uint32_t out[4];
  if (table_finite && isfinite(scale)) {  // no NaN possible
    if constexpr (sizeof(Out) == 4) {
#pragma unroll
      for (int j = 0; j < 4; ++j) out[j] = __float_as_uint(multiply_like_cuda(level[j], scale));
    } else {
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        out[w] = OutputTraits<Out>::pack(multiply_like_cuda(level[2 * w], scale),
                                         multiply_like_cuda(level[2 * w + 1], scale));
      }
    }
  } else {
    if constexpr (sizeof(Out) == 4) {
#pragma unroll
      for (int j = 0; j < 4; ++j) out[j] = checked_element_bits<Out>(level[j], scale, default_nan);
    } else {
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        out[w] = checked_element_bits<Out>(level[2 * w], scale, default_nan) |
                 (checked_element_bits<Out>(level[2 * w + 1], scale, default_nan) << 16);
      }
    }
  }
  return make_uint4(out[0], out[1], out[2], out[3]);
}

// ------------------------------------------------------------------------------------------------
// Dequantize block scales.
//
// dequantize_tiles takes the scale of block b from one of two sources (its Scales argument):
//   const float* absmax    plain: absmax[b]
//   NestedScaleReader      double-quantized: add_like_cpu(multiply_like_cuda(code[absmax_codes[b]],
//                          nested_absmax[b >> 8]), offset), NaN results with the CPU's bits
// An aligned tile lies inside one group of 256 blocks (kDequantizeTileElements <= 256 * 32, both
// powers of two), so a tile reads one nested_absmax; per run the nested source reads one code byte
// (where the plain source reads a float) and looks it up in a shared-memory copy of the code.

inline constexpr int kNestedGroupLog2 = 8;  // 256 blocks per nested_absmax entry
static_assert(kDequantizeTileElements <= (32 << kNestedGroupLog2), "a tile spans one nested group");

// Kernel parameter of a dequantize kernel with double-quantized scales (the pointers of BlockScales).
struct NestedScales {
  const uint8_t* absmax_codes;  // one per block
  const float* nested_absmax;   // one per 256 blocks
  const float* nested_code;     // 256 entries
  const float* offset;          // one float
};

// How dequantize_tiles reads double-quantized scales: `code` is the kernel's shared-memory copy of
// nested_code and `offset` the offset's value.
struct NestedScaleReader {
  const uint8_t* absmax_codes;
  const float* nested_absmax;
  const float* code;
  float offset;
};

// a + b as one IEEE float32 add (add.rn.f32: never contracted into an fma, no flush to zero whatever
// the compiler flags), as the CPU adds.
__device__ __forceinline__ float add_like_cpu(float a, float b) {
  float r;
  asm("add.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

// The nested scale of a block from its code's value and its group's nested_absmax, with the bits the
// CPU gives a NaN: a NaN product keeps cpu_nan_bits(code value, nested_absmax) (nested_absmax's NaN
// first, 0 * inf the host's default NaN) through the add; otherwise a NaN offset, or inf - inf.
__device__ __forceinline__ float nested_scale(float code_value, float group_absmax, float offset,
                                              uint32_t default_nan) {
  const float product = multiply_like_cuda(code_value, group_absmax);
  const float scale = add_like_cpu(product, offset);
  if (scale == scale) return scale;
  return __uint_as_float(product != product ? cpu_nan_bits(code_value, group_absmax, default_nan)
                                            : cpu_nan_bits(product, offset, default_nan));
}

template <typename Scales>
inline constexpr bool kIsNestedScales = std::is_same_v<Scales, NestedScaleReader>;

// The scale of block b for the guarded path.
__device__ __forceinline__ float block_scale(const float* absmax, int64_t b, uint32_t) { return absmax[b]; }

__device__ __forceinline__ float block_scale(const NestedScaleReader& scales, int64_t b,
                                             uint32_t default_nan) {
  return nested_scale(scales.code[__ldg(scales.absmax_codes + b)],
                      __ldg(scales.nested_absmax + (b >> kNestedGroupLog2)), scales.offset, default_nan);
}

// The tile loop of a dequantize kernel: output[i] = table[code of i] * scale[i >> log2_blocksize]
// over tiles of kDequantizeTileElements (grid-stride). A thread handles kRunsPerThread runs per tile,
// the runs of a warp adjacent; a tile that ends past n, or every tile when !kAligned, takes the
// element-wise guarded path. `table` is the kernel's shared copy of the levels (table_finite: all
// finite); `scales` the scale source (const float* absmax or NestedScaleReader, above). Codes says how
// the codes are stored:
//   Codes::Run                           the codes of one run, as one streaming load reads them
//   Codes::load_run<kRunElements>(c, e0) that load, for the run starting at element e0
//   Codes::levels(table, run, level)     the levels of the run's elements
//   Codes::code(c, i)                    the code of element i (guarded path)
template <typename Codes, typename Out, bool kAligned, typename Scales>
__device__ __forceinline__ void dequantize_tiles(const uint8_t* __restrict__ codes, Scales scales,
                                                 const float* table, bool table_finite, int64_t n,
                                                 int log2_blocksize, uint32_t default_nan,
                                                 Out* __restrict__ output) {
  using Layout = DequantizeLayout<Out>;
  constexpr int kRunElements = Layout::kRunElements;
  constexpr int kRuns = Layout::kRunsPerThread;
  constexpr bool kNested = kIsNestedScales<Scales>;
  const int64_t tiles = tile_count(n, kDequantizeTileElements);
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t tile_start = tile * kDequantizeTileElements;
    if (kAligned && tile_start + kDequantizeTileElements <= n) {
      typename Codes::Run runs[kRuns];
      float scale[kRuns];          // plain: the run's absmax
      uint32_t scale_code[kRuns];  // nested: the run's absmax code, looked up below
      float group_absmax = 0.0f;   // nested: the tile's nested_absmax
      if constexpr (kNested) {
        group_absmax = __ldg(scales.nested_absmax + (tile_start >> (log2_blocksize + kNestedGroupLog2)));
      }
#pragma unroll
      for (int r = 0; r < kRuns; ++r) {
        const int64_t e0 = tile_start + (r * kThreadsPerBlock + threadIdx.x) * kRunElements;
        runs[r] = Codes::template load_run<kRunElements>(codes, e0);
        if constexpr (kNested) {
          scale_code[r] = __ldg(scales.absmax_codes + (e0 >> log2_blocksize));
        } else {
          scale[r] = __ldg(scales + (e0 >> log2_blocksize));
        }
      }
#pragma unroll
      for (int r = 0; r < kRuns; ++r) {
        const int64_t e0 = tile_start + (r * kThreadsPerBlock + threadIdx.x) * kRunElements;
        if constexpr (kNested) {
          scale[r] = nested_scale(scales.code[scale_code[r]], group_absmax, scales.offset, default_nan);
        }
        float level[kRunElements];
        Codes::levels(table, runs[r], level);
        *reinterpret_cast<uint4*>(output + e0) =
            dequantize_run<Out, kRunElements>(level, table_finite, scale[r], default_nan);
      }
    } else {
      const int64_t tile_end =
          n < tile_start + kDequantizeTileElements ? n : tile_start + kDequantizeTileElements;
      for (int64_t i = tile_start + threadIdx.x; i < tile_end; i += kThreadsPerBlock) {
        const uint32_t bits = checked_element_bits<Out>(
            table[Codes::code(codes, i)], block_scale(scales, i >> log2_blocksize, default_nan), default_nan);
        store_element_bits(output, i, bits);
      }
    }
  }
}

// A dequantize kernel instantiation (both kernels take these parameters); Scales: const float* absmax
// or NestedScales.
template <typename Out, typename Scales = const float*>
using DequantizeKernel = void (*)(const uint8_t* codes, Scales scales, const float* table, int64_t n,
                                  int log2_blocksize, uint32_t default_nan, Out* output);

// Launches `aligned_kernel` (kAligned = true) when output is 16-byte aligned and codes are
// `codes_alignment`-byte aligned, else `guarded_kernel` (every tile element-wise).
template <typename Out, typename Scales = const float*>
cudaError_t launch_dequantize(DequantizeKernel<Out, Scales> aligned_kernel,
                              DequantizeKernel<Out, Scales> guarded_kernel, uintptr_t codes_alignment,
                              const uint8_t* codes, typename TypeTag<Scales>::type scales, const float* table,
                              int64_t n, int64_t blocksize, void* output, cudaStream_t stream) {
  static const uint32_t default_nan = host_default_nan_bits();
  const unsigned grid = grid_blocks(n, kDequantizeTileElements);
  const bool aligned = is_aligned(output, 16) && is_aligned(codes, codes_alignment);
  const DequantizeKernel<Out, Scales> kernel = aligned ? aligned_kernel : guarded_kernel;
  kernel<<<grid, kThreadsPerBlock, 0, stream>>>(codes, scales, table, n, log2_of(blocksize), default_nan,
                                                static_cast<Out*>(output));
  return cudaGetLastError();
}

}  // namespace halfbyte::cuda::detail
