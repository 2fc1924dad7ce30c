// gemm_4bit for the decode shapes: out[m, j] = sum_k A[m, k] * W[j, k] (+ bias[j]), W the [N, K]
// 4-bit weight (NF4/FP4 codes with float32 or double-quantized block scales), A with few rows
// (the launcher runs M in chunks of at most 16 rows of A, one launch per chunk).
//
// Layout read: W as quantize_4bit writes it, flat over the N*K elements: element e = j*K + k has
// its code in byte e/2 (high nibble for even e) and its scale in block e / blocksize. When
// K % 32 == 0 and `packed` is 16-byte aligned, elements [32c, 32c + 32) of row j are 16 bytes at
// byte offset (j*K + 32c)/2 (a "chunk"), inside one row and one block (blocksize >= 32 is a power
// of two); a 64-element "segment" (32 bytes) lies in one block when blocksize >= 64. Other shapes
// take the scalar generic kernel.
//
// Kernels and the split of the work:
// - gemm_4bit_table_kernel: float16/bfloat16 A, 2 <= M <= 16, K % 64 == 0, K < 2^31, blocksize
//   >= 64, A rows 16-byte aligned (the Llama decode case). Tensor cores (mma.sync m16n8k16, W as
//   the 16x16 operand, A^T as the 16x8 one) on unscaled levels rounded to A's type, each row's
//   segment sum scaled in float32 afterwards. The rounding (2^-9 of a level in bfloat16, 2^-12 in
//   float16) is the one dequantize_4bit + F.linear makes on level * scale; the products and sums are
//   exact / float32. Decode: a shared-memory table holds, for each byte value, its two rounded
//   levels in every lane's own column, so one byte permute (the offset) and one conflict-free
//   4-byte load give a lane the weight fragment register of two codes; one MMA per 16x16 weight
//   tile and 8 rows of A. Persistent grid of 8-warp blocks (two per SM; one
//   16-warp block per SM when there are fewer 32-row tiles than that): a block walks its tiles of
//   32 rows (64 or 128 when there are tiles enough to give every block two, reading A less often);
//   each warp owns 32 rows and a contiguous range of K and streams it one chunk (4 segments) ahead,
//   across tiles. Lane q loads 16 bytes of a row's pair of segments (a warp load covers 8 rows x 64
//   bytes) and swaps 8 of them with lane q ^ 2, so every lane holds 8 bytes of each segment; scales
//   come 8 rows x 4 segments per warp load and reach the lanes by shuffles. Cross-warp reduction in
//   shared memory per tile; bias added in float32.
// - gemm_4bit_mma_scale_before_kernel: float16/bfloat16 A, 4 <= M <= 16, the other aligned shapes
//   (blocksize 32, K % 64 == 32, unaligned rows of A). A block owns 32 rows of W, its 8 warps split
//   K in groups of 4 chunks; the 4 lanes of a quad may sit in different blocks, so each weight is
//   dequantized to float32 level * scale first (levels by warp shuffle: lane L holds table[L % 16])
//   and split into bf16 hi + lo per code.
// - gemv_4bit_kernel: M = 1 with 16-bit A, float32 A (any M, chunks of up to 4 rows), M <= 3 where no
//   tensor-core kernel applies, and 2 or 3 rows on weights below 2^24 / 2^23 elements (gemm_4bit_ffma_rows).
//   A block of 128 threads owns 8 rows of W (4 when M > 1 or float32); its threads stride over the chunks
//   (one 16-byte load per row and chunk, all rows in flight, L1 bypassed), read the matching elements of A
//   with 16-byte loads (L1-cached), look each code up with one warp shuffle (lane L holds table[L % 16]; shfl
//   reads only the low 5 bits of its lane operand, so `word >> (4 * nibble)` is the whole index computation),
//   accumulate level * a with FFMA and scale once per chunk. Warp reduce-scatter, then 4 warps through shared
//   memory; bias added in float32. Address work per row and step is one wide multiply-add (32-bit
//   row offsets); for M = 1 with aligned 16-bit A (the decode case) the last block of rows overlaps
//   the one before instead of checking rows, and scales advance by a row stride when K is a
//   multiple of the blocksize: 890 instead of 981 instructions per step of 256 codes (the shuffle,
//   shift and FFMA per code are 744 of them).
// - gemm_4bit_generic_kernel: K % 32 != 0, `packed` not 16-byte aligned, or K == 0. One warp per
//   row of W, one element per lane and step with byte loads; correct for any shape, not fast.
// A whose rows are not 16-byte aligned (odd lda or pointer) is read with scalar loads.
//
// The table and FFMA kernels use programmatic dependent launch (sm_90): a block may start while the
// previous kernel on the stream finishes, prefetching its first weight bytes into L2 with a bulk
// prefetch; griddepcontrol.wait precedes every other read and every write.
//
// Bandwidth (H100, bf16, NF4, blocksize 64, CUDA graph over weight copies; details and history in
// benchmarks/notes_gemm_4bit_decode.md). Floor: the codes once (N*K/2 bytes) plus the scales. Per
// 2048 codes a warp moves ~32 shared-memory wavefronts of table data (2 bytes per code), the FFMA
// kernel ~64 of shuffles; both are bound by issue and latency, not by DRAM. Measured: M = 1 85-91% of the
// device-to-device copy rate on 128256x4096, 66-72% on 14336x4096 and 4096x14336, 52% on 4096x4096;
// M = 4 49-57% and M = 16 38-47% on the three large shapes (1.34-1.49x and 1.64-1.84x the M = 1 time).
//
// Limits: sm_80 or newer (mma.sync bf16, cvt.rn.bf16x2, L2 fetch-size hint); dependent launch and
// the L2 bulk prefetch only on sm_90 and newer. 64-bit element indices; N < 2^33 (grid x dimension
// of the FFMA kernel); K < 2^32 for the vector kernels (32-bit row offsets; longer rows take the
// generic kernel). The table kernel takes 74-101 KB of dynamic shared memory per
// block.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

#include "dependent_launch.cuh"
#include "device_attributes.cuh"
#include "halfbyte/cuda_kernels.h"
#include "mma_sync.cuh"

namespace halfbyte::cuda {
namespace {

constexpr int kF32 = static_cast<int>(DType::kFloat32);
constexpr int kF16 = static_cast<int>(DType::kFloat16);
constexpr int kBF16 = static_cast<int>(DType::kBFloat16);
constexpr unsigned kFullMask = 0xffffffffu;

constexpr int kGemvThreads = 128;  // 4 warps share the rows of a block and split K

constexpr int kMmaWarps = 8;      // warps of a block, splitting K
constexpr int kMmaRows = 32;      // rows of W per block (two 16-row MMA tiles per warp)
constexpr int kMmaMaxM = 16;      // rows of A per launch (two 8-column MMA tiles)
constexpr int kTableMinRows = 2;  // fewer rows of 16-bit A take the FFMA kernel

using host::kMaxDevices;

constexpr int kGenericWarps = 8;
constexpr int kGenericRowsOfA = 8;

struct GemmArgs {
  const void* A;  // first row of this chunk of A
  int64_t lda;    // elements
  int rows;       // rows of A in this launch (M chunk)
  int64_t K;
  int64_t N;
  const uint8_t* packed;
  BlockScales scales;
  const float* table;
  int log2_blocksize;
  const void* bias;  // nullptr or N entries of A's dtype
  void* out;         // first row of this chunk of out, row stride N
};

// ---- element conversions ---------------------------------------------------------------------

template <int kDType>
__device__ __forceinline__ float load_elem(const void* p, int64_t i) {
  if constexpr (kDType == kF32) {
    return __ldg(static_cast<const float*>(p) + i);
  } else if constexpr (kDType == kF16) {
    return __half2float(__ushort_as_half(__ldg(static_cast<const unsigned short*>(p) + i)));
  } else {
    return __uint_as_float(static_cast<uint32_t>(__ldg(static_cast<const unsigned short*>(p) + i)) << 16);
  }
}

template <int kDType>
__device__ __forceinline__ void store_elem(void* p, int64_t i, float v) {
  if constexpr (kDType == kF32) {
    static_cast<float*>(p)[i] = v;
  } else if constexpr (kDType == kF16) {
    static_cast<unsigned short*>(p)[i] = __half_as_ushort(__float2half_rn(v));
  } else {
    static_cast<unsigned short*>(p)[i] = __bfloat16_as_ushort(__float2bfloat16_rn(v));
  }
}

// Two 16-bit elements packed in a word (first element in the low half) as float32.
template <int kDType>
__device__ __forceinline__ float2 unpack2(uint32_t w) {
  if constexpr (kDType == kF16) {
    return make_float2(__half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xffffu))),
                       __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16))));
  } else {
    return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xffff0000u));
  }
}

// bf16x2 word {lo_elem in the low half, hi_elem in the high half}, round to nearest even.
__device__ __forceinline__ uint32_t pack_bf16x2(float lo_elem, float hi_elem) {
  uint32_t r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi_elem), "f"(lo_elem));
  return r;
}

// w0, w1 -> bf16x2 hi and lo with w = hi + lo + e, |e| <= 2^-16 |w| (w - hi is exact in float32).
__device__ __forceinline__ void split_bf16x2(float w0, float w1, uint32_t& hi, uint32_t& lo) {
  hi = pack_bf16x2(w0, w1);
  const float h0 = __uint_as_float(hi << 16);
  const float h1 = __uint_as_float(hi & 0xffff0000u);
  lo = pack_bf16x2(w0 - h0, w1 - h1);
}

// ---- loads -----------------------------------------------------------------------------------

// Streamed once: keep out of L1, ask L2 for 256-byte lines.
__device__ __forceinline__ uint4 load_stream_16(const uint8_t* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
}

// Word w of a 16-byte load; w is a compile-time constant after unrolling.
__device__ __forceinline__ uint32_t word_at(const uint4& v, int w) {
  return w == 0 ? v.x : w == 1 ? v.y : w == 2 ? v.z : v.w;
}

// Bit offset of element e (0..7) of a 32-bit word of codes: byte e/2, high nibble for even e.
__host__ __device__ constexpr int nibble_shift(int e) { return 8 * (e >> 1) + ((e & 1) ? 0 : 4); }

// The level of code (shifted & 15): lane L holds table[L % 16]; shfl uses the low 5 bits only.
__device__ __forceinline__ float level_of(float table_lane, uint32_t shifted) {
  return __shfl_sync(kFullMask, table_lane, static_cast<int>(shifted));
}

template <bool kNested>
__device__ __forceinline__ float block_scale(const BlockScales& s, float offset, int64_t b) {
  if constexpr (!kNested) {
    return __ldg(s.absmax + b);
  } else {
    const float code = __ldg(s.nested_code + __ldg(s.absmax_codes + b));
    return __fadd_rn(__fmul_rn(code, __ldg(s.nested_absmax + (b >> 8))), offset);
  }
}

// A block scale in two steps, so that a double-quantized scale's dependent lookup (nested_code at
// the loaded 8-bit code) is issued only where the scale is used, long after the loads it depends
// on; issued next to them it would stall the warp before its other loads go out. The zero value
// (nothing loaded) finishes to 0 for plain scales and to `offset` for nested ones: callers leave
// it only where the matching A values are zero or the output is not written.
template <bool kNested>
struct ScaleLoad;
template <>
struct ScaleLoad<false> {
  float absmax = 0.0f;
};
template <>
struct ScaleLoad<true> {
  uint32_t code = 0;
  float nested_absmax = 0.0f;
};

template <bool kNested>
__device__ __forceinline__ ScaleLoad<kNested> load_scale(const BlockScales& s, int64_t b) {
  ScaleLoad<kNested> r;
  if constexpr (!kNested) {
    r.absmax = __ldg(s.absmax + b);
  } else {
    r.code = __ldg(s.absmax_codes + b);
    r.nested_absmax = __ldg(s.nested_absmax + (b >> 8));
  }
  return r;
}

// The offset is read where it is used (an L1 hit) rather than held in a register.
template <bool kNested>
__device__ __forceinline__ float finish_scale(const BlockScales& s, const ScaleLoad<kNested>& r) {
  if constexpr (!kNested) {
    return r.absmax;
  } else {
    return __fadd_rn(__fmul_rn(__ldg(s.nested_code + r.code), r.nested_absmax), __ldg(s.offset));
  }
}

// 8 consecutive elements of A (idx a multiple of 8) as float32; zeros when !valid.
template <int kDType, bool kAVec>
__device__ __forceinline__ void load_a8(const void* A, int64_t idx, bool valid, float (&a)[8]) {
#pragma unroll
  for (int i = 0; i < 8; ++i) a[i] = 0.0f;
  if (!valid) return;
  if constexpr (kDType == kF32) {
    const float* p = static_cast<const float*>(A) + idx;
    if constexpr (kAVec) {
      const float4 v0 = __ldg(reinterpret_cast<const float4*>(p));
      const float4 v1 = __ldg(reinterpret_cast<const float4*>(p) + 1);
      a[0] = v0.x, a[1] = v0.y, a[2] = v0.z, a[3] = v0.w;
      a[4] = v1.x, a[5] = v1.y, a[6] = v1.z, a[7] = v1.w;
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) a[i] = __ldg(p + i);
    }
  } else {
    if constexpr (kAVec) {
      const uint4 v = __ldg(reinterpret_cast<const uint4*>(static_cast<const unsigned short*>(A) + idx));
      const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float2 f = unpack2<kDType>(w[i]);
        a[2 * i] = f.x;
        a[2 * i + 1] = f.y;
      }
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) a[i] = load_elem<kDType>(A, idx + i);
    }
  }
}

// 8 consecutive 16-bit elements of A (idx a multiple of 8) as raw bits; zeros when !valid.
template <bool kAVec>
__device__ __forceinline__ uint4 load_a8_raw16(const void* A, int64_t idx, bool valid) {
  uint4 v = make_uint4(0u, 0u, 0u, 0u);
  if (!valid) return v;
  const unsigned short* p = static_cast<const unsigned short*>(A) + idx;
  if constexpr (kAVec) {
    v = __ldg(reinterpret_cast<const uint4*>(p));
  } else {
    uint32_t w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      w[i] = static_cast<uint32_t>(__ldg(p + 2 * i)) | (static_cast<uint32_t>(__ldg(p + 2 * i + 1)) << 16);
    }
    v = make_uint4(w[0], w[1], w[2], w[3]);
  }
  return v;
}

// ---- warp reduce-scatter -----------------------------------------------------------------------
// Sums V values over the 32 lanes of a warp. Where V is even at a level, the values are halved
// (each lane keeps one half and receives its partner's sum of that half), so a lane ends with
// kFinalCount totals, for original indices [run()'s return value, + kFinalCount); all lanes with
// the same (lane & ~kReplicaMask) hold the same totals.
template <int V, int O>
struct WarpReduceScatter {
  static constexpr bool kHalve = (V % 2 == 0);
  static constexpr int kNextV = kHalve ? V / 2 : V;
  using Next = WarpReduceScatter<kNextV, O / 2>;
  static constexpr int kFinalCount = Next::kFinalCount;
  static constexpr int kReplicaMask = (kHalve ? 0 : O) | Next::kReplicaMask;

  static __device__ __forceinline__ int run(float* v, int lane) {
    int base = 0;
    if constexpr (kHalve) {
      const bool upper = (lane & O) != 0;
#pragma unroll
      for (int i = 0; i < kNextV; ++i) {
        const float send = upper ? v[i] : v[i + kNextV];
        const float keep = upper ? v[i + kNextV] : v[i];
        v[i] = keep + __shfl_xor_sync(kFullMask, send, O);
      }
      base = upper ? kNextV : 0;
    } else {
#pragma unroll
      for (int i = 0; i < V; ++i) v[i] += __shfl_xor_sync(kFullMask, v[i], O);
    }
    return base + Next::run(v, lane);
  }
};

template <int V>
struct WarpReduceScatter<V, 0> {
  static constexpr int kFinalCount = V;
  static constexpr int kReplicaMask = 0;
  static __device__ __forceinline__ int run(float*, int) { return 0; }
};

// ---- programmatic dependent launch (sm_90): dependent_launch.cuh -------------------------------------
using dependent_launch::allow_dependent_grids;
using dependent_launch::wait_for_prior_grids;

// Bytes [offset, offset + bytes) of rows [row0, row0 + rows) of the packed weight into L2, one bulk
// prefetch per row, rows spread over `threads` threads. offset and bytes: multiples of 16, inside a row.
__device__ __forceinline__ void prefetch_rows_l2(const GemmArgs& args, int64_t row0, int64_t rows,
                                                 int64_t offset, int64_t bytes, int thread, int threads) {
#if __CUDA_ARCH__ >= 900
  const int64_t row_bytes = args.K >> 1;
  if (offset + bytes > row_bytes) bytes = row_bytes - offset;
  if (bytes <= 0) return;
  for (int64_t r = thread; r < rows && row0 + r < args.N; r += threads) {
    dependent_launch::prefetch_l2(args.packed + (row0 + r) * row_bytes + offset,
                                  static_cast<uint32_t>(bytes));
  }
#endif
}

// ---- FFMA kernel: float32 A or M <= 3 ----------------------------------------------------------

// Rows of W per block: 8 for one 16-bit row of A (A is read once per 8 rows of W), else 4
// (registers). Blocks per SM the register allocation must allow: 4 (16 warps), 3 for the
// register-heavy variants.
template <int kDType, int kMT>
constexpr int gemv_rows() {
  return kMT == 1 && kDType != kF32 ? 8 : 4;
}
template <int kDType, int kMT>
constexpr int gemv_min_blocks() {
  return kMT >= 3 || kDType == kF32 ? 3 : 4;
}

// kWholeRows: N >= kRows and the last block starts at N - kRows (its first rows are also the previous
// block's; both compute them in the same order and write the same bits), so no row needs a bounds
// check. kRowBlocks: K % blocksize == 0, so row r's scales start r * K / blocksize blocks after row 0's.
// Both only for the M = 1, 16-bit, aligned-A variant (the decode case); the others take false, false.
template <int kDType, int kMT, bool kAVec, bool kNested, bool kWholeRows, bool kRowBlocks>
__global__ void __launch_bounds__(kGemvThreads, (gemv_min_blocks<kDType, kMT>()))
    gemv_4bit_kernel(const GemmArgs args) {
  constexpr int kRows = gemv_rows<kDType, kMT>();
  constexpr int kValues = kRows * kMT;
  constexpr int kChains = kMT == 1 ? 2 : 1;  // independent FFMA chains per output
  using Reduce = WarpReduceScatter<kValues, 16>;
  __shared__ float partial[kGemvThreads / 32][kValues];

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRows;
  if constexpr (kWholeRows) row0 = row0 + kRows <= args.N ? row0 : args.N - kRows;
  const int64_t rows_left = args.N - row0;
  const int64_t nchunks = args.K >> 5;
  prefetch_rows_l2(args, row0, kRows, 0, 16 * kGemvThreads, tid, kGemvThreads);  // the block's first step
  wait_for_prior_grids();
  allow_dependent_grids();
  const float table_lane = __ldg(args.table + (lane & 15));

  float acc[kRows][kMT];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
#pragma unroll
    for (int m = 0; m < kMT; ++m) acc[r][m] = 0.0f;
  }

  // Row r of a step is r * row_bytes past row 0's codes (32-bit factors, K < 2^32): one wide multiply-add
  // per row rather than 64-bit element arithmetic. Lanes past the last chunk (the last step of a K that
  // is not a multiple of 4096) read the last chunk again with A taken as zero and the scale as zero, so
  // the code loads need no check and add exactly nothing.
  const uint32_t row_bytes = static_cast<uint32_t>(args.K >> 1);
  const uint32_t row_blocks = static_cast<uint32_t>(args.K >> args.log2_blocksize);
  const uint8_t* const row0_codes = args.packed + row0 * static_cast<int64_t>(row_bytes);
  const uint64_t row0_elem = static_cast<uint64_t>(row0) * static_cast<uint64_t>(args.K);
  // c - lane is the first chunk of this warp's step: the loop condition is warp-uniform.
  for (int64_t c = tid; c - lane < nchunks; c += kGemvThreads) {
    const bool valid = c < nchunks;
    const int64_t chunk = valid ? c : nchunks - 1;
    const uint8_t* codes_at = row0_codes + chunk * 16;
    const uint64_t e0 = row0_elem + static_cast<uint64_t>(chunk) * 32;  // element of the chunk's first code
    const int64_t block0 = static_cast<int64_t>(e0 >> args.log2_blocksize);
    uint4 codes[kRows];
    ScaleLoad<kNested> scale[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if (kWholeRows || r < rows_left) {
        codes[r] = load_stream_16(codes_at + static_cast<uint64_t>(r) * row_bytes);
        const int64_t block =
            kRowBlocks
                ? block0 + static_cast<int64_t>(static_cast<uint64_t>(r) * row_blocks)
                : static_cast<int64_t>((e0 + static_cast<uint64_t>(r) * args.K) >> args.log2_blocksize);
        scale[r] = load_scale<kNested>(args.scales, block);
      } else {
        codes[r] = make_uint4(0u, 0u, 0u, 0u);
        scale[r] = ScaleLoad<kNested>();
      }
    }
    // 16-bit A: the 32 elements of each row of A for this chunk, loaded together (4 x 16 bytes).
    uint4 a_raw[kDType == kF32 ? 1 : kMT][4];
    if constexpr (kDType != kF32) {
#pragma unroll
      for (int m = 0; m < kMT; ++m) {
#pragma unroll
        for (int w = 0; w < 4; ++w)
          a_raw[m][w] = load_a8_raw16<kAVec>(args.A, m * args.lda + c * 32 + w * 8, valid);
      }
    }
    float part[kRows][kMT][kChains];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
#pragma unroll
      for (int m = 0; m < kMT; ++m) {
#pragma unroll
        for (int h = 0; h < kChains; ++h) part[r][m][h] = 0.0f;
      }
    }
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      float a[kMT][8];
#pragma unroll
      for (int m = 0; m < kMT; ++m) {
        if constexpr (kDType == kF32) {
          load_a8<kDType, kAVec>(args.A, m * args.lda + c * 32 + w * 8, valid, a[m]);
        } else {
          const uint4 v = a_raw[m][w];
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const float2 f = unpack2<kDType>(word_at(v, i));
            a[m][2 * i] = f.x;
            a[m][2 * i + 1] = f.y;
          }
        }
      }
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const uint32_t x = word_at(codes[r], w);
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          const float lv = level_of(table_lane, x >> nibble_shift(e));
#pragma unroll
          for (int m = 0; m < kMT; ++m) part[r][m][e % kChains] = fmaf(a[m][e], lv, part[r][m][e % kChains]);
        }
      }
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
#pragma unroll
      for (int m = 0; m < kMT; ++m) {
        float p = part[r][m][0];
#pragma unroll
        for (int h = 1; h < kChains; ++h) p += part[r][m][h];
        acc[r][m] = fmaf(valid ? finish_scale<kNested>(args.scales, scale[r]) : 0.0f, p, acc[r][m]);
      }
    }
  }

  float v[kValues];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
#pragma unroll
    for (int m = 0; m < kMT; ++m) v[r * kMT + m] = acc[r][m];
  }
  const int base = Reduce::run(v, lane);
  if ((lane & Reduce::kReplicaMask) == 0) {
#pragma unroll
    for (int i = 0; i < Reduce::kFinalCount; ++i) partial[warp][base + i] = v[i];
  }
  __syncthreads();
  if (tid < kValues) {
    const int r = tid / kMT;
    const int m = tid % kMT;
    const int64_t row = row0 + r;
    if (row < args.N && m < args.rows) {
      float total = 0.0f;
#pragma unroll
      for (int w = 0; w < kGemvThreads / 32; ++w) total += partial[w][tid];
      if (args.bias != nullptr) total += load_elem<kDType>(args.bias, row);
      store_elem<kDType>(args.out, m * args.N + row, total);
    }
  }
}

// ---- tensor cores: pieces of the two MMA kernels ---------------------------------------------------
// ActFragment and mma_weight_pair: the scale-before kernel's exact bf16 hi + lo products;
// store_block_tile: both kernels' tile reduction.

// The activation operand of one k-step for one 8-row tile of A: b0 holds k-slots (2q, 2q+1) and b1
// k-slots (2q+8, 2q+9) of row g, as 16-bit pairs. float16 A is split exactly into bf16 hi + lo.
template <int kDType>
struct ActFragment {
  uint32_t hi0, hi1, lo0, lo1;
  __device__ __forceinline__ ActFragment(uint32_t b0, uint32_t b1) {
    if constexpr (kDType == kF16) {
      const float2 f0 = unpack2<kF16>(b0);
      const float2 f1 = unpack2<kF16>(b1);
      split_bf16x2(f0.x, f0.y, hi0, lo0);  // exact: a float16 has 11 significant bits
      split_bf16x2(f1.x, f1.y, hi1, lo1);
    } else {
      hi0 = b0, hi1 = b1, lo0 = 0u, lo1 = 0u;
    }
  }
};

// d += W A^T for one 16x16 weight tile given as bf16 hi + lo: 2 MMAs, 3 for float16 A (whose lo
// part multiplies the weight's hi part).
template <int kDType>
__device__ __forceinline__ void mma_weight_pair(float (&d)[4], const uint32_t (&w_hi)[4],
                                                const uint32_t (&w_lo)[4], const ActFragment<kDType>& a) {
  mma::m16n8k16<true>(d, w_hi, a.hi0, a.hi1);
  mma::m16n8k16<true>(d, w_lo, a.hi0, a.hi1);
  if constexpr (kDType == kF16) mma::m16n8k16<true>(d, w_hi, a.lo0, a.lo1);
}

// Sums the accumulators of the warps that split K over each row of a block tile, writes out (+ bias)
// and zeroes acc. The tile has 32 * row_groups rows of W from row0; warp w works on rows
// 32 * (w / k_splits) + [0, 32). acc[mt][nt][i]: row 16*mt + g + 8*(i/2) of the warp's 32 rows, row
// 8*nt + 2*q + i%2 of A. partial: kWarps * 32 * (8 * kNT + 1) floats of shared memory.
template <int kDType, int kNT, int kWarps>
__device__ __forceinline__ void store_block_tile(const GemmArgs& args, float* partial, int64_t row0,
                                                 int row_groups, int k_splits, float (&acc)[2][kNT][4]) {
  constexpr int kStride = 8 * kNT + 1;
  const int tid = threadIdx.x;
  const int g = (tid & 31) >> 2;
  const int q = tid & 3;
  float* own = partial + (tid >> 5) * 32 * kStride;
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        own[(16 * mt + g + 8 * (i >> 1)) * kStride + 8 * nt + 2 * q + (i & 1)] = acc[mt][nt][i];
        acc[mt][nt][i] = 0.0f;
      }
    }
  }
  __syncthreads();
  const int tile_rows = 32 * row_groups;
  for (int idx = tid; idx < tile_rows * 8 * kNT; idx += kWarps * 32) {
    const int m = idx / tile_rows;
    const int r = idx - m * tile_rows;
    const int64_t row = row0 + r;
    if (m < args.rows && row < args.N) {
      const float* p = partial + ((r >> 5) * k_splits * 32 + (r & 31)) * kStride + m;
      float total = 0.0f;
      for (int w = 0; w < k_splits; ++w) total += p[w * 32 * kStride];
      if (args.bias != nullptr) total += load_elem<kDType>(args.bias, row);
      store_elem<kDType>(args.out, m * args.N + row, total);
    }
  }
  __syncthreads();  // partial is written again for the next tile
}

// ---- tensor-core kernel, scale applied before the MMA (the shapes the table kernel does not take) --

// Blocks of 8 warps per SM the register allocation of the scale-before kernel must allow: 2 (128
// registers), 1 for float16 A with 16 rows (its split of A into bf16 hi + lo needs more).
template <int kDType, int kNT>
constexpr int mma_min_blocks() {
  return kDType == kF16 && kNT == 2 ? 1 : 2;
}

// One group of 128 columns as seen by one thread: chunk q of rows g + 8*rho (rho = 0..3) of the
// block's 32 rows (codes and scales).
template <bool kNested>
struct ChunkWeights {
  uint4 codes[4];
  ScaleLoad<kNested> scale[4];
};

// e_row: element index of the first code of row row0 + g. rows_left: N - (row0 + g).
template <bool kNested>
__device__ __forceinline__ void load_chunk_weights(const GemmArgs& args, int64_t group, int64_t e_row,
                                                   int64_t rows_left, int q, int64_t nchunks,
                                                   ChunkWeights<kNested>& f) {
  const int64_t c = group * 4 + q;
  const bool chunk_valid = c < nchunks;
  const int64_t e0 = e_row + c * 32;
#pragma unroll
  for (int rho = 0; rho < 4; ++rho) {
    if (chunk_valid && 8 * rho < rows_left) {
      const int64_t e = e0 + 8 * rho * args.K;
      f.codes[rho] = load_stream_16(args.packed + (e >> 1));
      f.scale[rho] = load_scale<kNested>(args.scales, e >> args.log2_blocksize);
    } else {
      f.codes[rho] = make_uint4(0u, 0u, 0u, 0u);
      f.scale[rho] = ScaleLoad<kNested>();
    }
  }
}

// The A operand of a group (32 columns of rows 8*nt + g of A) is loaded 8 columns at a time next
// to its use, so that the register-capped scheduler can place the loads.
template <int kDType, int kNT, bool kAVec, bool kNested>
__device__ __forceinline__ void compute_chunk_group(const GemmArgs& args, int64_t group, int g, int q,
                                                    int64_t nchunks, const ChunkWeights<kNested>& f,
                                                    float table_lane, float (&acc)[2][kNT][4]) {
  const int64_t c = group * 4 + q;
  float scale[4];
#pragma unroll
  for (int rho = 0; rho < 4; ++rho) scale[rho] = finish_scale<kNested>(args.scales, f.scale[rho]);
  const void* a_chunk[kNT];  // element 32c of row 8*nt + g of A
  bool a_valid[kNT];
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt) {
    const int n = 8 * nt + g;
    a_valid[nt] = c < nchunks && n < args.rows;
    a_chunk[nt] = static_cast<const unsigned short*>(args.A) + (n * args.lda + c * 32);
  }
  float d[2][kNT][4];
  mma::zero(d);
#pragma unroll
  for (int t = 0; t < 8; ++t) {
    uint4 av[kNT];
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) av[nt] = load_a8_raw16<kAVec>(a_chunk[nt], (t >> 1) * 8, a_valid[nt]);
    // Weight operand: k-slots (2q, 2q+1, 2q+8, 2q+9) of this thread = elements 4t..4t+3 of its chunk.
    uint32_t w_hi[2][4];
    uint32_t w_lo[2][4];
#pragma unroll
    for (int rho = 0; rho < 4; ++rho) {
      const uint32_t x = word_at(f.codes[rho], t >> 1);
      const int e0 = 4 * (t & 1);
      float w[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) w[i] = level_of(table_lane, x >> nibble_shift(e0 + i)) * scale[rho];
      const int mt = rho >> 1;
      const int odd = rho & 1;  // rows g + 8 of the tile go to registers 1 and 3
      split_bf16x2(w[0], w[1], w_hi[mt][odd], w_lo[mt][odd]);
      split_bf16x2(w[2], w[3], w_hi[mt][2 + odd], w_lo[mt][2 + odd]);
    }
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
      const ActFragment<kDType> act((t & 1) ? av[nt].z : av[nt].x,   // elements 4t, 4t+1 of row n of A
                                    (t & 1) ? av[nt].w : av[nt].y);  // elements 4t+2, 4t+3
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) mma_weight_pair<kDType>(d[mt][nt], w_hi[mt], w_lo[mt], act);
    }
  }
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mt][nt][i] += d[mt][nt][i];
    }
  }
}

template <int kDType, int kNT, bool kAVec, bool kNested>
__global__ void __launch_bounds__(kMmaWarps * 32, (mma_min_blocks<kDType, kNT>()))
    gemm_4bit_mma_scale_before_kernel(const GemmArgs args) {
  __shared__ float partial[kMmaWarps * kMmaRows * (8 * kNT + 1)];
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int g = lane >> 2;
  const int q = lane & 3;
  const float table_lane = __ldg(args.table + (lane & 15));
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kMmaRows;
  const int64_t nchunks = args.K >> 5;
  const int64_t ngroups = (nchunks + 3) >> 2;

  float acc[2][kNT][4];
  mma::zero(acc);

  // Software pipeline: the next group's weights are in flight while this group is computed.
  const int64_t e_row = (row0 + g) * args.K;
  const int64_t rows_left = args.N - (row0 + g);
  ChunkWeights<kNested> current;
  load_chunk_weights<kNested>(args, warp, e_row, rows_left, q, nchunks, current);
  for (int64_t group = warp; group < ngroups; group += kMmaWarps) {
    ChunkWeights<kNested> next;
    load_chunk_weights<kNested>(args, group + kMmaWarps, e_row, rows_left, q, nchunks, next);
    compute_chunk_group<kDType, kNT, kAVec, kNested>(args, group, g, q, nchunks, current, table_lane, acc);
    current = next;
  }

  store_block_tile<kDType, kNT, kMmaWarps>(args, partial, row0, 1, kMmaWarps, acc);
}

// ---- tensor-core kernel with a shared-memory decode table (K % 64 == 0, blocksize >= 64) ----------
//
// A 64-column segment of a row (32 bytes) lies inside one block, so the MMAs multiply unscaled levels
// and each row's segment sum is scaled afterwards. A lane holds 8 bytes (16 codes) of each segment for
// rows g + 8*rho; k-step u of the segment takes its bytes 2u and 2u + 1, exactly the four k-slots
// (2q, 2q+1, 2q+8, 2q+9) of the weight operand: each byte is one fragment register. A byte is decoded
// by one byte permute (the table offset) and two 4-byte shared-memory loads, the register for the hi
// MMA and the one for the lo MMA.
//
// Loads: lane q reads bytes [16q, 16q + 16) of a row's pair of segments (one 16-byte load; a warp load
// touches 8 rows x 64 bytes), then swaps its second 8 bytes with lane q ^ 2, so that every lane holds
// 8 bytes of each segment: of the first segment bytes [o(q), o(q) + 8) with o = 0, 16, 8, 24 for
// q = 0..3, of the second bytes [o'(q), o'(q) + 8) with o' = 8, 24, 0, 16. The k-slots of lane q map
// to columns 2*o + [0, 16) of the segment, the same for every row and for A. Scales are loaded per
// chunk of 4 segments, 8 rows x 4 segments per warp load, and passed to the lanes that need them
// with shuffles.

// Per code byte, 256 bytes: the level pair of each of the 32 lanes (128 B), then 128 B unused.
constexpr int kTableBytes = 256 * 256;
constexpr int kNestedCodeBytes = 256 * 4;  // the nested code, for double-quantized scales
constexpr int kChunkSegments = 4;          // segments per chunk: a warp loads a chunk's scales at once
constexpr int kPairsPerChunk = kChunkSegments / 2;

// kWarps warps per block: 8 (two blocks per SM), or 16 (one) where there are fewer block tiles than
// resident 8-warp blocks.
template <int kNT, int kWarps>
constexpr int table_kernel_smem_bytes() {
  return kTableBytes + kNestedCodeBytes + kWarps * 32 * (8 * kNT + 1) * static_cast<int>(sizeof(float));
}

struct TablePlan {
  int64_t ntiles;      // block tiles of 32 * row_groups rows of W
  int row_groups;      // 32-row groups per block tile; the block's warps / row_groups split K in each
  int k_splits;        // warps per row group
  int steps_per_tile;  // segments per warp and tile (a multiple of kChunkSegments; some may be past K)
};

// Row v (256 bytes) of the table holds, for the byte value v, the levels of its two codes rounded to A's
// 16-bit type (`pair`) at byte 4*L for every lane L; the high nibble (the even element, the lower k-slot) is
// in the low half. Every lane reads its own column, so a warp's lookups never share a bank. The row's last
// 128 bytes are unused: a 256-byte row is what one byte permute can address (byte * 256 + 4 * lane), and
// shared memory does not limit the blocks per SM here (registers do). Threads 0..255 fill a row each.
__device__ __forceinline__ void fill_decode_table(uint8_t* table, int v, uint32_t pair) {
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const int column = (j + v) & 7;  // rotated, so that a warp's stores spread over the banks
    *reinterpret_cast<uint4*>(table + 256 * v + 16 * column) = make_uint4(pair, pair, pair, pair);
  }
}

// Fragment register of the two codes in byte b of word: the byte permute builds the offset 256 * byte +
// 4 * lane (lane4 = 4 * lane has zero upper bytes).
__device__ __forceinline__ uint32_t decode_byte(const uint8_t* table, uint32_t word, int b, uint32_t lane4) {
  return *reinterpret_cast<const uint32_t*>(table + __byte_perm(word, lane4, 0x5504 | (b << 4)));
}

// Where a lane reads a block tile: row g of its row group.
struct TileCursor {
  const uint8_t* codes;  // byte 16q of row g
  int64_t row;           // row g
  int rows;              // bit rho: row g + 8*rho exists
};

__device__ __forceinline__ TileCursor tile_cursor(const GemmArgs& args, int64_t tile, int tile_rows,
                                                  int row_group, int g, int q) {
  TileCursor c;
  c.row = tile * tile_rows + 32 * row_group + g;
  const int64_t left = args.N - c.row;
  c.codes = args.packed + c.row * (args.K >> 1) + 16 * q;
  c.rows = left >= 25 ? 15 : left >= 17 ? 7 : left >= 9 ? 3 : left >= 1 ? 1 : 0;
  return c;
}

// Bytes [16q, 16q + 16) of segments (first, first + 1) of rows g + 8*rho (in segment first + q / 2);
// zeros where !valid.
__device__ __forceinline__ void load_pair(const TileCursor& c, int64_t row_stride8, int first, bool valid,
                                          uint4 (&codes)[4]) {
  const uint8_t* p = c.codes + 32 * first;
#pragma unroll
  for (int rho = 0; rho < 4; ++rho) {
    codes[rho] = valid && (c.rows >> rho & 1) ? load_stream_16(p) : make_uint4(0u, 0u, 0u, 0u);
    p += row_stride8;
  }
}

// Scales of a chunk: lane (g, q) loads, for rho = 0..3, the scale of row g + 8*rho and segment
// first + q (raw: a double-quantized one is finished later, by finish_chunk_scales).
template <bool kNested>
struct ChunkScales {
  // Plain: the scale. Nested: the scale after finish_chunk_scales (before it, with kEarly, the nested
  // absmax).
  float value[4];
  uint32_t code[4];
};

// A block scale (or its 8-bit code), asking L2 for the 256 bytes around it: the rest of the row's
// scales, which the warps working on the row's other columns read next.
__device__ __forceinline__ float load_absmax_256(const float* p) {
  float v;
  asm("ld.global.nc.L2::256B.f32 %0, [%1];" : "=f"(v) : "l"(p));
  return v;
}
__device__ __forceinline__ uint32_t load_code_256(const uint8_t* p) {
  uint32_t v;
  asm("ld.global.nc.L2::256B.u8 %0, [%1];" : "=r"(v) : "l"(p));
  return v;
}

// kEarly (double-quantized scales, one 8-row tile of A): the nested absmax is loaded here too, a chunk
// ahead, rather than in finish_chunk_scales where it is used (4096x4096 M = 4: 12% -> -2% over plain
// absmax). With two tiles the four extra registers per buffer spill more than they save.
template <bool kNested, bool kEarly>
__device__ __forceinline__ void load_chunk_scales(const GemmArgs& args, const TileCursor& c, int first,
                                                  int seg_end, int q, ChunkScales<kNested>& s) {
  const int segment = first + q;
  const int64_t e = c.row * args.K + 64 * segment;
#pragma unroll
  for (int rho = 0; rho < 4; ++rho) {
    const bool valid = segment < seg_end && (c.rows >> rho & 1);
    const int64_t b = (e + 8 * rho * args.K) >> args.log2_blocksize;
    if constexpr (kNested) {
      s.code[rho] = valid ? load_code_256(args.scales.absmax_codes + b) : 0u;
      if constexpr (kEarly) s.value[rho] = valid ? __ldg(args.scales.nested_absmax + (b >> 8)) : 0.0f;
    } else {
      s.value[rho] = valid ? load_absmax_256(args.scales.absmax + b) : 0.0f;
    }
  }
}

// nested_code: the 256 floats in shared memory. Blocks that were not loaded finish to `offset`; their
// segments have zero A, so the value is never used.
template <bool kNested, bool kEarly>
__device__ __forceinline__ void finish_chunk_scales(const GemmArgs& args, const float* nested_code,
                                                    const TileCursor& c, int first, int seg_end, int q,
                                                    ChunkScales<kNested>& s) {
  if constexpr (kNested) {
    const int segment = first + q;
    const int64_t e = c.row * args.K + 64 * segment;
    const float offset = __ldg(args.scales.offset);
#pragma unroll
    for (int rho = 0; rho < 4; ++rho) {
      float absmax = s.value[rho];
      if constexpr (!kEarly) {
        const int64_t b = (e + 8 * rho * args.K) >> args.log2_blocksize;
        const bool valid = segment < seg_end && (c.rows >> rho & 1);
        absmax = valid ? __ldg(args.scales.nested_absmax + (b >> 8)) : 0.0f;
      }
      s.value[rho] = __fadd_rn(__fmul_rn(nested_code[s.code[rho]], absmax), offset);
    }
  }
}

// One segment: `half` selects the pair's first (0) or second (1) segment; codes hold the exchanged
// bytes (words 0, 1: the lane's own first 8 bytes; words 2, 3: its partner's second 8 bytes).
// a_row[nt]: row 8*nt + g of A (a_valid: that row exists); scales: the chunk's, segment j of it. A
// segment past the warp's range (valid false) reads zero A and adds nothing.
template <int kDType, int kNT, bool kNested>
__device__ __forceinline__ void compute_segment(const uint8_t* table, uint32_t lane4, const uint4 (&codes)[4],
                                                int half, int segment, bool valid,
                                                const ChunkScales<kNested>& scales, int j,
                                                const unsigned short* const (&a_row)[kNT],
                                                const bool (&a_valid)[kNT], int g, int q,
                                                float (&acc)[2][kNT][4]) {
  // Lanes 0, 1 hold the first segment in words 0, 1; lanes 2, 3 in words 2, 3.
  const bool own = ((q >> 1) ^ half) == 0;
  const int column = 64 * segment + 32 * (q & 1) + 16 * ((q >> 1) ^ half);  // 2 * o(q) (first) or 2 * o'(q)
  uint4 av[kNT][2];
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt) {
    av[nt][0] = load_a8_raw16<true>(a_row[nt], column, valid && a_valid[nt]);
    av[nt][1] = load_a8_raw16<true>(a_row[nt], column + 8, valid && a_valid[nt]);
  }
  uint32_t word[4][2];
#pragma unroll
  for (int rho = 0; rho < 4; ++rho) {
    word[rho][0] = own ? codes[rho].x : codes[rho].z;
    word[rho][1] = own ? codes[rho].y : codes[rho].w;
  }
  // The two 16-row tiles one after the other (rows g + 16*mt and g + 8 + 16*mt = rho 2*mt, 2*mt + 1),
  // so that only one tile's accumulators and fragments are live.
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) {
    float d[kNT][4];
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) d[nt][i] = 0.0f;
    }
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      uint32_t w[4];
#pragma unroll
      for (int odd = 0; odd < 2; ++odd) {  // rows g + 8 of the tile go to registers 1 and 3
        const uint32_t x = word[2 * mt + odd][u >> 1];
        w[odd] = decode_byte(table, x, 2 * (u & 1), lane4);          // k-slots 2q, 2q+1
        w[2 + odd] = decode_byte(table, x, 2 * (u & 1) + 1, lane4);  // 2q+8, 2q+9
      }
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
        const uint4& v = av[nt][u >> 1];
        mma::m16n8k16<kDType == kBF16>(d[nt], w, (u & 1) ? v.z : v.x,  // columns 4u, 4u+1 of this lane's 16
                                       (u & 1) ? v.w : v.y);           // columns 4u+2, 4u+3
      }
    }
    // d[nt][i] holds row rho = 2*mt + i/2 of the tile; lane (g, j) holds its scale.
#pragma unroll
    for (int odd = 0; odd < 2; ++odd) {
      const float scale = __shfl_sync(kFullMask, scales.value[2 * mt + odd], (g << 2) | j);
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
        acc[mt][nt][2 * odd] = fmaf(scale, d[nt][2 * odd], acc[mt][nt][2 * odd]);
        acc[mt][nt][2 * odd + 1] = fmaf(scale, d[nt][2 * odd + 1], acc[mt][nt][2 * odd + 1]);
      }
    }
  }
}

// Persistent: block b computes block tiles b, b + gridDim.x, ...; warp (row group, k-split) owns a
// contiguous range of steps_per_tile segments of its 32 rows. Each warp streams its (tile, chunk)
// sequence one chunk ahead of the one it computes, across tile boundaries, so the memory system stays
// busy through the per-tile reduction.
template <int kDType, int kNT, bool kNested, int kWarps>
__global__ void __launch_bounds__(kWarps * 32, 2 * 8 / kWarps)
    gemm_4bit_table_kernel(const GemmArgs args, const TablePlan plan) {
  extern __shared__ __align__(16) uint8_t smem[];
  uint8_t* table = smem;
  float* nested_code = reinterpret_cast<float*>(smem + kTableBytes);
  float* partial = reinterpret_cast<float*>(smem + kTableBytes + kNestedCodeBytes);
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int g = lane >> 2;
  const int q = lane & 3;
  const uint32_t lane4 = 4u * static_cast<uint32_t>(lane);
  const int row_group = warp / plan.k_splits;
  const int nsegments = static_cast<int>(args.K >> 6);  // K < 2^31 (checked by the launcher)
  const int seg_begin = (warp - row_group * plan.k_splits) * plan.steps_per_tile;
  const int seg_end = min(seg_begin + plan.steps_per_tile, nsegments);
  const int tile_rows = 32 * plan.row_groups;
  const int chunks_per_tile = plan.steps_per_tile / kChunkSegments;
  const int64_t row_stride8 = 8 * (args.K >> 1);
  constexpr bool kEarlyAbsmax = kNT == 1;

  // This warp's first chunk of its first tile: 4 segments of its 32 rows.
  prefetch_rows_l2(args, blockIdx.x * static_cast<int64_t>(tile_rows) + 32 * row_group, 32, 32 * seg_begin,
                   32 * kChunkSegments, lane, 32);
  wait_for_prior_grids();
  allow_dependent_grids();
  // The table entry of this thread first (thread v < 256: byte value v), so that its loads do not queue
  // behind the weights.
  const int entry = tid & 255;
  const float level_hi_nibble = __ldg(args.table + (entry >> 4));
  const float level_lo_nibble = __ldg(args.table + (entry & 15));
  const float nested_code_entry = kNested ? __ldg(args.scales.nested_code + entry) : 0.0f;

  const unsigned short* a_row[kNT];
  bool a_valid[kNT];
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt) {
    const int n = 8 * nt + g;
    a_valid[nt] = n < args.rows;
    a_row[nt] = static_cast<const unsigned short*>(args.A) + n * args.lda;
  }
  float acc[2][kNT][4];
  mma::zero(acc);

  // The load cursor runs one chunk ahead of the compute cursor: after computing pair p of a chunk, a
  // warp loads pair p of its next chunk (possibly of its next tile) in its place, and it loads the next
  // chunk's scales into the other of two scale buffers when it starts a chunk.
  int64_t load_tile = blockIdx.x;
  int load_chunk = 0;
  TileCursor load_at = tile_cursor(args, load_tile, tile_rows, row_group, g, q);
  uint4 codes[kPairsPerChunk][4];
#pragma unroll
  for (int p = 0; p < kPairsPerChunk; ++p) {
    load_pair(load_at, row_stride8, seg_begin + 2 * p, seg_begin + 2 * p + (q >> 1) < seg_end, codes[p]);
  }
  ChunkScales<kNested> scales[2];
  load_chunk_scales<kNested, kEarlyAbsmax>(args, load_at, seg_begin, seg_end, q, scales[0]);
  TileCursor compute_at = load_at;
  auto advance_load = [&]() {
    if (++load_chunk == chunks_per_tile) {
      load_chunk = 0;
      load_tile += gridDim.x;
      load_at = tile_cursor(args, load_tile, tile_rows, row_group, g, q);
    }
  };
  advance_load();

  {
    uint32_t pair;  // the two levels rounded to A's type, the high nibble's in the low half
    if constexpr (kDType == kBF16) {
      pair = pack_bf16x2(level_hi_nibble, level_lo_nibble);
    } else {
      const __half2 h = __floats2half2_rn(level_hi_nibble, level_lo_nibble);
      pair = *reinterpret_cast<const uint32_t*>(&h);
    }
    if (tid < 256) {
      fill_decode_table(table, tid, pair);
      if constexpr (kNested) nested_code[tid] = nested_code_entry;
    }
  }
  __syncthreads();

  int64_t tile = blockIdx.x;
  int chunk = 0;
  while (tile < plan.ntiles) {
#pragma unroll
    for (int h = 0; h < 2;
         ++h) {                  // the chunk's scales are in scales[h], the next chunk's go to scales[h ^ 1]
      if (tile < plan.ntiles) {  // block-uniform
        const int first = seg_begin + chunk * kChunkSegments;
        finish_chunk_scales<kNested, kEarlyAbsmax>(args, nested_code, compute_at, first, seg_end, q,
                                                   scales[h]);
        const int load_first = seg_begin + load_chunk * kChunkSegments;
        const bool load_tile_valid = load_tile < plan.ntiles;
        load_chunk_scales<kNested, kEarlyAbsmax>(args, load_at, load_first, load_tile_valid ? seg_end : 0, q,
                                                 scales[h ^ 1]);
#pragma unroll
        for (int p = 0; p < kPairsPerChunk; ++p) {
          const int pair_first = first + 2 * p;
          if (pair_first < seg_end) {  // warp-uniform
            uint4 exchanged[4];
#pragma unroll
            for (int rho = 0; rho < 4; ++rho) {
              exchanged[rho] = codes[p][rho];
              exchanged[rho].z = __shfl_xor_sync(kFullMask, codes[p][rho].z, 2);
              exchanged[rho].w = __shfl_xor_sync(kFullMask, codes[p][rho].w, 2);
            }
#pragma unroll
            for (int half = 0; half < 2; ++half) {
              compute_segment<kDType, kNT, kNested>(table, lane4, exchanged, half, pair_first + half,
                                                    pair_first + half < seg_end, scales[h], 2 * p + half,
                                                    a_row, a_valid, g, q, acc);
            }
          }
          const int load_pair_first = load_first + 2 * p;
          load_pair(load_at, row_stride8, load_pair_first,
                    load_tile_valid && load_pair_first + (q >> 1) < seg_end, codes[p]);
        }
        compute_at = load_at;
        advance_load();
        if (++chunk == chunks_per_tile) {
          store_block_tile<kDType, kNT, kWarps>(args, partial, tile * tile_rows, plan.row_groups,
                                                plan.k_splits, acc);
          chunk = 0;
          tile += gridDim.x;
        }
      }
    }
  }
}

// ---- generic kernel: any K, any alignment ----------------------------------------------------

template <int kDType, bool kNested>
__global__ void __launch_bounds__(kGenericWarps * 32) gemm_4bit_generic_kernel(const GemmArgs args) {
  const int lane = threadIdx.x & 31;
  const float table_lane = __ldg(args.table + (lane & 15));
  const float offset = kNested ? __ldg(args.scales.offset) : 0.0f;
  const int64_t warps_total = static_cast<int64_t>(gridDim.x) * kGenericWarps;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kGenericWarps + (threadIdx.x >> 5); row < args.N;
       row += warps_total) {
    for (int m0 = 0; m0 < args.rows; m0 += kGenericRowsOfA) {
      float acc[kGenericRowsOfA];
#pragma unroll
      for (int m = 0; m < kGenericRowsOfA; ++m) acc[m] = 0.0f;
      for (int64_t k0 = 0; k0 < args.K; k0 += 32) {  // warp-uniform trip count (shuffles below)
        const int64_t k = k0 + lane;
        const bool valid = k < args.K;
        const int64_t e = row * args.K + k;
        uint32_t code = 0;
        float scale = 0.0f;
        if (valid) {
          const uint32_t byte = __ldg(args.packed + (e >> 1));
          code = (e & 1) ? (byte & 15u) : (byte >> 4);
          scale = block_scale<kNested>(args.scales, offset, e >> args.log2_blocksize);
        }
        const float w = level_of(table_lane, code) * scale;
        if (valid) {
#pragma unroll
          for (int m = 0; m < kGenericRowsOfA; ++m) {
            if (m0 + m < args.rows)
              acc[m] = fmaf(load_elem<kDType>(args.A, (m0 + m) * args.lda + k), w, acc[m]);
          }
        }
      }
#pragma unroll
      for (int m = 0; m < kGenericRowsOfA; ++m) {
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) acc[m] += __shfl_xor_sync(kFullMask, acc[m], o);
      }
      if (lane == 0) {
        const float b = args.bias != nullptr ? load_elem<kDType>(args.bias, row) : 0.0f;
#pragma unroll
        for (int m = 0; m < kGenericRowsOfA; ++m) {
          if (m0 + m < args.rows) store_elem<kDType>(args.out, (m0 + m) * args.N + row, acc[m] + b);
        }
      }
    }
  }
}

// ---- launch ------------------------------------------------------------------------------------

// Blocks of kKernel (kThreads threads, kSmem bytes of dynamic shared memory) that the current device
// holds at once: counted once per kernel and device, when the kernel's dynamic shared-memory limit is
// raised. The table kernel is persistent and launches at most this many blocks.
template <auto kKernel, int kThreads, int kSmem>
cudaError_t resident_blocks(int& blocks) {
  static std::atomic<int> counted[kMaxDevices];  // 0: not counted yet
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  if (device < 0 || device >= kMaxDevices) return cudaErrorInvalidDevice;
  blocks = counted[device].load(std::memory_order_relaxed);
  if (blocks > 0) return cudaSuccess;
  int per_sm = 0;
  int sms = 0;
  if (kSmem > 48 * 1024)
    err = cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
  if (err == cudaSuccess)
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kKernel, kThreads, kSmem);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  if (per_sm < 1 || sms < 1) return cudaErrorInvalidConfiguration;
  blocks = per_sm * sms;
  counted[device].store(blocks, std::memory_order_relaxed);
  return cudaSuccess;
}

template <int kDType, int kMT, bool kAVec, bool kNested, bool kWholeRows, bool kRowBlocks>
cudaError_t launch_gemv_kernel(const GemmArgs& args, cudaStream_t stream) {
  constexpr int kRows = gemv_rows<kDType, kMT>();
  const dim3 grid(static_cast<unsigned>((args.N + kRows - 1) / kRows));
  return dependent_launch::launch(gemv_4bit_kernel<kDType, kMT, kAVec, kNested, kWholeRows, kRowBlocks>, grid,
                                  kGemvThreads, 0, stream, args);
}

template <int kDType, int kMT, bool kAVec, bool kNested>
cudaError_t launch_gemv(const GemmArgs& args, cudaStream_t stream) {
  if constexpr (kMT == 1 && kDType != kF32 && kAVec) {
    // The decode case: no row checks when there are rows for a whole block, scales by row stride when
    // the rows hold whole blocks.
    const bool whole_rows = args.N >= gemv_rows<kDType, kMT>();
    const bool row_blocks = (args.K & ((int64_t{1} << args.log2_blocksize) - 1)) == 0;
    if (whole_rows) {
      return row_blocks ? launch_gemv_kernel<kDType, kMT, kAVec, kNested, true, true>(args, stream)
                        : launch_gemv_kernel<kDType, kMT, kAVec, kNested, true, false>(args, stream);
    }
    return row_blocks ? launch_gemv_kernel<kDType, kMT, kAVec, kNested, false, true>(args, stream)
                      : launch_gemv_kernel<kDType, kMT, kAVec, kNested, false, false>(args, stream);
  } else {
    return launch_gemv_kernel<kDType, kMT, kAVec, kNested, false, false>(args, stream);
  }
}

template <int kDType, int kMT, bool kAVec>
cudaError_t launch_gemv(const GemmArgs& args, bool nested, cudaStream_t stream) {
  return nested ? launch_gemv<kDType, kMT, kAVec, true>(args, stream)
                : launch_gemv<kDType, kMT, kAVec, false>(args, stream);
}

template <int kDType, int kMT>
cudaError_t launch_gemv(const GemmArgs& args, bool nested, bool a_vec, cudaStream_t stream) {
  return a_vec ? launch_gemv<kDType, kMT, true>(args, nested, stream)
               : launch_gemv<kDType, kMT, false>(args, nested, stream);
}

template <int kDType>
cudaError_t launch_gemv_rows(const GemmArgs& args, bool nested, bool a_vec, cudaStream_t stream) {
  switch (args.rows) {
    case 1:
      return launch_gemv<kDType, 1>(args, nested, a_vec, stream);
    case 2:
      return launch_gemv<kDType, 2>(args, nested, a_vec, stream);
    case 3:
      return launch_gemv<kDType, 3>(args, nested, a_vec, stream);
    default:
      if constexpr (kDType == kF32) return launch_gemv<kDType, 4>(args, nested, a_vec, stream);
      return cudaErrorInvalidValue;
  }
}

template <int kDType, int kNT, bool kAVec>
cudaError_t launch_scale_before(const GemmArgs& args, bool nested, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((args.N + kMmaRows - 1) / kMmaRows));
  if (nested) {
    gemm_4bit_mma_scale_before_kernel<kDType, kNT, kAVec, true><<<grid, kMmaWarps * 32, 0, stream>>>(args);
  } else {
    gemm_4bit_mma_scale_before_kernel<kDType, kNT, kAVec, false><<<grid, kMmaWarps * 32, 0, stream>>>(args);
  }
  return cudaGetLastError();
}

template <int kDType, int kNT>
cudaError_t launch_scale_before(const GemmArgs& args, bool nested, bool a_vec, cudaStream_t stream) {
  return a_vec ? launch_scale_before<kDType, kNT, true>(args, nested, stream)
               : launch_scale_before<kDType, kNT, false>(args, nested, stream);
}

// Row groups, K split and tile count of the table kernel for `resident` blocks on the device.
TablePlan make_table_plan(const GemmArgs& args, int warps, int64_t resident) {
  TablePlan p;
  // Taller block tiles read A fewer times (once per tile); taken where there are tiles enough to give
  // every resident block two.
  p.row_groups = 1;
  for (const int row_groups : {4, 2}) {
    if ((args.N + 32 * row_groups - 1) / (32 * row_groups) >= 2 * resident) {
      p.row_groups = row_groups;
      break;
    }
  }
  p.k_splits = warps / p.row_groups;
  p.ntiles = (args.N + 32 * p.row_groups - 1) / (32 * p.row_groups);
  const int nsegments = static_cast<int>(args.K >> 6);
  const int per_warp = (nsegments + p.k_splits - 1) / p.k_splits;
  p.steps_per_tile = (per_warp + kChunkSegments - 1) / kChunkSegments * kChunkSegments;
  return p;
}

// Persistent grid: as many blocks as fit on the device at once, at most one per tile.
template <int kDType, int kNT, bool kNested, int kWarps>
cudaError_t launch_table_kernel(const GemmArgs& args, int resident, cudaStream_t stream) {
  constexpr auto kKernel = gemm_4bit_table_kernel<kDType, kNT, kNested, kWarps>;
  const TablePlan plan = make_table_plan(args, kWarps, resident);
  const dim3 grid(static_cast<unsigned>(plan.ntiles < resident ? plan.ntiles : resident));
  return dependent_launch::launch(kKernel, grid, kWarps * 32, table_kernel_smem_bytes<kNT, kWarps>(), stream,
                                  args, plan);
}

// 8-warp blocks, or 16-warp ones (where registers allow) when there are fewer 32-row tiles than resident
// 8-warp blocks, so that an SM still runs 16 warps.
template <int kDType, int kNT, bool kNested>
cudaError_t launch_table(const GemmArgs& args, cudaStream_t stream) {
  int resident = 0;
  cudaError_t err = resident_blocks<gemm_4bit_table_kernel<kDType, kNT, kNested, 8>, 8 * 32,
                                    table_kernel_smem_bytes<kNT, 8>()>(resident);
  if (err != cudaSuccess) return err;
  if ((args.N + 31) / 32 < resident) {
    err = resident_blocks<gemm_4bit_table_kernel<kDType, kNT, kNested, 16>, 16 * 32,
                          table_kernel_smem_bytes<kNT, 16>()>(resident);
    if (err != cudaSuccess) return err;
    return launch_table_kernel<kDType, kNT, kNested, 16>(args, resident, stream);
  }
  return launch_table_kernel<kDType, kNT, kNested, 8>(args, resident, stream);
}

template <int kDType, int kNT>
cudaError_t launch_table(const GemmArgs& args, bool nested, cudaStream_t stream) {
  return nested ? launch_table<kDType, kNT, true>(args, stream)
                : launch_table<kDType, kNT, false>(args, stream);
}

template <int kDType>
cudaError_t launch_generic(const GemmArgs& args, bool nested, cudaStream_t stream) {
  const int64_t blocks = (args.N + kGenericWarps - 1) / kGenericWarps;
  const dim3 grid(static_cast<unsigned>(blocks < 65536 ? blocks : 65536));
  if (nested) {
    gemm_4bit_generic_kernel<kDType, true><<<grid, kGenericWarps * 32, 0, stream>>>(args);
  } else {
    gemm_4bit_generic_kernel<kDType, false><<<grid, kGenericWarps * 32, 0, stream>>>(args);
  }
  return cudaGetLastError();
}

template <int kDType>
cudaError_t gemm_4bit_typed(GemmArgs args, int64_t M, bool nested, cudaStream_t stream) {
  constexpr int64_t kElem = kDType == kF32 ? 4 : 2;
  // The vector kernels address a row with 32-bit byte offsets (K < 2^32).
  const bool w_vec = args.K > 0 && args.K % 32 == 0 && args.K < (int64_t{1} << 32) &&
                     reinterpret_cast<uintptr_t>(args.packed) % 16 == 0;
  if (!w_vec) {
    // The generic kernel loops over all rows of A itself (int rows: M below 2^31).
    args.rows = static_cast<int>(M);
    return launch_generic<kDType>(args, nested, stream);
  }
  const bool a_vec = reinterpret_cast<uintptr_t>(args.A) % 16 == 0 && (args.lda * kElem) % 16 == 0;
  // Tensor cores for 16-bit A: the table kernel for every row count when a 64-column segment lies in
  // one block and A's rows are 16-byte aligned (except 2 or 3 rows on smaller weights: gemm_4bit_ffma_rows);
  // else the scale-before kernel from 4 rows on (the FFMA kernel below that).
  const bool table =
      kDType != kF32 && args.K % 64 == 0 && args.log2_blocksize >= 6 && a_vec && args.K < (int64_t{1} << 31);
  const char* a_base = static_cast<const char*>(args.A);
  char* out_base = static_cast<char*>(args.out);
  for (int64_t m0 = 0; m0 < M;) {
    const int64_t left = M - m0;
    GemmArgs chunk = args;
    chunk.A = a_base + m0 * args.lda * kElem;
    chunk.out = out_base + m0 * args.N * kElem;
    cudaError_t err = cudaSuccess;
    if (kDType != kF32 && left >= (table ? kTableMinRows : 4) &&
        !gemm_4bit_ffma_rows(left, args.N * args.K)) {
      chunk.rows = static_cast<int>(left < kMmaMaxM ? left : kMmaMaxM);
      if constexpr (kDType != kF32) {
        if (table) {
          err = chunk.rows > 8 ? launch_table<kDType, 2>(chunk, nested, stream)
                               : launch_table<kDType, 1>(chunk, nested, stream);
        } else {
          err = chunk.rows > 8 ? launch_scale_before<kDType, 2>(chunk, nested, a_vec, stream)
                               : launch_scale_before<kDType, 1>(chunk, nested, a_vec, stream);
        }
      }
    } else {
      const int64_t max_rows = kDType == kF32 ? 4 : 3;
      chunk.rows = static_cast<int>(left < max_rows ? left : max_rows);
      err = launch_gemv_rows<kDType>(chunk, nested, a_vec, stream);
    }
    if (err != cudaSuccess) return err;
    m0 += chunk.rows;
  }
  return cudaSuccess;
}

}  // namespace

cudaError_t gemm_4bit(const void* A, DType dtype, int64_t M, int64_t K, int64_t lda, const uint8_t* packed,
                      BlockScales scales, const float* table, int64_t N, int64_t blocksize, const void* bias,
                      void* out, cudaStream_t stream) {
  if (M < 0 || N < 0 || K < 0 || !is_valid_blocksize(blocksize)) return cudaErrorInvalidValue;
  if (M == 0 || N == 0) return cudaSuccess;
  if (out == nullptr || table == nullptr || (K > 0 && (A == nullptr || packed == nullptr || lda < K))) {
    return cudaErrorInvalidValue;
  }
  const bool nested = scales.absmax == nullptr && K > 0;  // K == 0 reads no scales
  if (nested && (scales.absmax_codes == nullptr || scales.nested_absmax == nullptr ||
                 scales.nested_code == nullptr || scales.offset == nullptr)) {
    return cudaErrorInvalidValue;
  }
  GemmArgs args;
  args.A = A;
  args.lda = lda;
  args.rows = 0;
  args.K = K;
  args.N = N;
  args.packed = packed;
  args.scales = scales;
  args.table = table;
  args.log2_blocksize = host::log2_of(blocksize);
  args.bias = bias;
  args.out = out;
  switch (dtype) {
    case DType::kFloat32:
      return gemm_4bit_typed<kF32>(args, M, nested, stream);
    case DType::kFloat16:
      return gemm_4bit_typed<kF16>(args, M, nested, stream);
    case DType::kBFloat16:
      return gemm_4bit_typed<kBF16>(args, M, nested, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace halfbyte::cuda
