// gemm_4bit for the decode shapes: out[m, j] = sum_k A[m, k] * W[j, k] (+ bias[j]), W the [N, K]
// 4-bit weight (NF4/FP4 codes with float32 or double-quantized block scales), A with few rows
// (the launcher runs M in chunks of at most 16 rows of A, one launch per chunk).
//
// Layout read: W as quantize_4bit writes it, flat over the N*K elements: element e = j*K + k has
// its code in byte e/2 (high nibble for even e) and its scale in block e / blocksize. When
// K % 32 == 0 and `packed` is 16-byte aligned, elements [32c, 32c + 32) of row j are 16 bytes at
// byte offset (j*K + 32c)/2 (a "chunk"), inside one row and one block (blocksize >= 32 is a power
// of two). Other shapes take the scalar generic kernel.
//
// Decoding a code: the 16 levels live one per lane (lane L holds table[L % 16]) and a code is
// looked up with one warp shuffle whose source lane is the code; shfl reads only the low 5 bits
// of its lane operand, so `word >> (4 * nibble)` is the whole index computation.
//
// Kernels and the split of the work:
// - gemm_4bit_mma_scale_after_kernel: float16/bfloat16 A, 2 <= M <= 16, K % 64 == 0, blocksize
//   >= 64, A rows 16-byte aligned (the Llama decode case). A block owns 32 rows of W; its 8 warps
//   (16 when N <= 8192) split K in groups of 128 columns. In a 64-column segment (32 bytes, one
//   block) lane (g, q) = (lane/4, lane%4) loads bytes [8q, 8q+8) of rows g, g+8, g+16, g+24 (every
//   warp load covers 8 full 32-byte sectors), so the 16 k-slots of each tensor-core MMA
//   (mma.sync m16n8k16, W as the 16x16 operand, A^T as the 16x8 one) come from one block. The
//   MMAs multiply the unscaled levels, split once per lane into bf16 hi + lo (|level - hi - lo| <=
//   2^-16 |level|), by A (float16 A is split exactly into bf16 hi + lo too), accumulate the
//   segment in float32, and each row's segment sum is multiplied by its block scale in float32.
//   Per code: one shift, one shuffle (returning the {hi, lo} pair), one byte permute. The k order
//   inside an MMA is permuted (lane q's four k-slots are four consecutive codes of its own 16),
//   with the same permutation on A. The next group's codes and scales are loaded before the
//   current group is computed. Cross-warp reduction in shared memory; bias added in float32.
// - gemm_4bit_mma_scale_before_kernel: float16/bfloat16 A, 4 <= M <= 16, the other aligned shapes
//   (blocksize 32, K % 64 == 32, unaligned rows of A). Same block/warp split with 16-byte chunks
//   (lane q loads chunk q of the group for its 4 rows); the 4 lanes of a quad may sit in different
//   blocks, so each weight is dequantized to float32 level * scale first and split into bf16
//   hi + lo per code (more work per code than scale-after).
// - gemv_4bit_kernel: float32 A (any M, chunks of up to 4 rows), M = 1, and M <= 3 where no
//   tensor-core kernel applies. A block of 128 threads owns 8 rows of W (4 when M > 1 or float32);
//   its threads stride over the chunks (one 16-byte load per row and chunk, all rows in flight,
//   L1 bypassed), read the 32 matching elements of each row of A with 16-byte loads (L1-cached:
//   every block reads the same A), accumulate level * a per chunk with FFMA and multiply by the
//   chunk's scale once. Warp reduce-scatter with __shfl_xor_sync, then 4 warps through shared
//   memory; bias added in float32.
// - gemm_4bit_generic_kernel: K % 32 != 0, `packed` not 16-byte aligned, or K == 0. One warp per
//   row of W, one element per lane and step with byte loads; correct for any shape, not fast.
// A whose rows are not 16-byte aligned (odd lda or pointer) is read with scalar loads.
//
// Bandwidth (H100, bf16, NF4, blocksize 64; benchmarks/notes_gemm_4bit_decode.md): the floor is
// reading the codes once (N*K/2 bytes) plus the scales (4 or 1 byte per 64 codes). The M = 1 loop
// issues ~3.8 instructions per code, one of them a shuffle; at the full 3 TB/s an SM must decode
// ~26 codes per clock and shuffles run at 32 lanes per clock per SM, so the kernel is memory-bound
// with ~20% slack on the shuffle unit. Measured M = 1 (CUDA graph, weights not in L2): 91% of
// copy bandwidth on 128256x4096, 66% on 14336x4096 and 4096x14336, 44% on 4096x4096 (launch
// and ramp-up bound); double quantization within 0-6% of plain. The scale-after MMA loop issues
// ~4.8 (M <= 8) / ~5.4 (M <= 16) instructions per code, which would allow ~1.1x the M = 1 time,
// but it measures 1.3-2.3x (not profiled yet; the notes list the suspects).
//
// Limits: sm_80 or newer (mma.sync bf16, cvt.rn.bf16x2, L2 prefetch hint). 64-bit element
// indices throughout; N < 2^33 (grid x dimension).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "halfbyte/cuda_kernels.h"

namespace halfbyte::cuda {
namespace {

constexpr int kF32 = static_cast<int>(DType::kFloat32);
constexpr int kF16 = static_cast<int>(DType::kFloat16);
constexpr int kBF16 = static_cast<int>(DType::kBFloat16);
constexpr unsigned kFullMask = 0xffffffffu;

constexpr int kGemvThreads = 128;  // 4 warps share the rows of a block and split K

constexpr int kMmaWarps = 8;  // warps of a block, splitting K
constexpr int kMmaRows = 32;  // rows of W per block (two 16-row MMA tiles per warp)
constexpr int kMmaMaxM = 16;  // rows of A per launch (two 8-column MMA tiles)

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

__device__ __forceinline__ uint2 load_stream_8(const uint8_t* p) {
  uint2 v;
  asm("ld.global.nc.L1::no_allocate.L2::256B.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
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

// {hi, lo} bf16 pair of the level of code (shifted & 15), held like table_lane in level_of.
__device__ __forceinline__ uint32_t level_pair_of(uint32_t pair_lane, uint32_t shifted) {
  return __shfl_sync(kFullMask, pair_lane, static_cast<int>(shifted));
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

template <int kDType, int kMT, bool kAVec, bool kNested>
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
  const float table_lane = __ldg(args.table + (lane & 15));
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int64_t rows_left = args.N - row0;
  const int64_t nchunks = args.K >> 5;

  float acc[kRows][kMT];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
#pragma unroll
    for (int m = 0; m < kMT; ++m) acc[r][m] = 0.0f;
  }

  // c - lane is the first chunk of this warp's step: the loop condition is warp-uniform.
  for (int64_t c = tid; c - lane < nchunks; c += kGemvThreads) {
    const bool valid = c < nchunks;
    uint4 codes[kRows];
    ScaleLoad<kNested> scale[kRows];
    const int64_t e0 = row0 * args.K + c * 32;  // element index of the chunk's first code in row row0
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if (valid && r < rows_left) {
        const int64_t e = e0 + r * args.K;
        codes[r] = load_stream_16(args.packed + (e >> 1));
        scale[r] = load_scale<kNested>(args.scales, e >> args.log2_blocksize);
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
        acc[r][m] = fmaf(finish_scale<kNested>(args.scales, scale[r]), p, acc[r][m]);
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

// ---- tensor-core kernel: float16/bfloat16 A, 4 <= M <= 16 ----------------------------------------

__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                               uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Blocks of 8 warps per SM the register allocation must allow: 2 (128 registers), 1 for float16 A
// with 16 rows (its split of A into bf16 hi + lo needs more).
template <int kDType, int kNT>
constexpr int mma_min_blocks() {
  return kDType == kF16 && kNT == 2 ? 1 : 2;
}

// Sums the per-warp accumulators of a 32-row block over its warps and writes out (+ bias).
// acc[mt][nt][i]: row 16*mt + g + 8*(i/2) of the block's W rows, row 8*nt + 2*q + i%2 of A.
template <int kDType, int kNT, int kWarps>
__device__ __forceinline__ void mma_block_epilogue(const GemmArgs& args, int64_t row0,
                                                   const float (&acc)[2][kNT][4]) {
  __shared__ float partial[kWarps][kMmaRows][8 * kNT + 1];
  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int g = (tid & 31) >> 2;
  const int q = tid & 3;
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i)
        partial[warp][16 * mt + g + 8 * (i >> 1)][8 * nt + 2 * q + (i & 1)] = acc[mt][nt][i];
    }
  }
  __syncthreads();
  for (int idx = tid; idx < kMmaRows * 8 * kNT; idx += kWarps * 32) {
    const int m = idx / kMmaRows;
    const int r = idx % kMmaRows;
    const int64_t row = row0 + r;
    if (m < args.rows && row < args.N) {
      float total = 0.0f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) total += partial[w][r][m];
      if (args.bias != nullptr) total += load_elem<kDType>(args.bias, row);
      store_elem<kDType>(args.out, m * args.N + row, total);
    }
  }
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
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) d[mt][nt][i] = 0.0f;
    }
  }
#pragma unroll
  for (int t = 0; t < 8; ++t) {
    uint4 av[kNT];
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) av[nt] = load_a8_raw16<kAVec>(a_chunk[nt], (t >> 1) * 8, a_valid[nt]);
    // Weight operand: k-slots (2q, 2q+1, 2q+8, 2q+9) of this thread = elements 4t..4t+3 of its chunk.
    uint32_t a_hi[2][4];
    uint32_t a_lo[2][4];
#pragma unroll
    for (int rho = 0; rho < 4; ++rho) {
      const uint32_t x = word_at(f.codes[rho], t >> 1);
      const int e0 = 4 * (t & 1);
      float w[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) w[i] = level_of(table_lane, x >> nibble_shift(e0 + i)) * scale[rho];
      const int mt = rho >> 1;
      const int odd = rho & 1;  // rows g + 8 of the tile go to registers 1 and 3
      split_bf16x2(w[0], w[1], a_hi[mt][odd], a_lo[mt][odd]);
      split_bf16x2(w[2], w[3], a_hi[mt][2 + odd], a_lo[mt][2 + odd]);
    }
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
      const uint32_t b0 = (t & 1) ? av[nt].z : av[nt].x;  // elements 4t, 4t+1 of row n of A
      const uint32_t b1 = (t & 1) ? av[nt].w : av[nt].y;  // elements 4t+2, 4t+3
      if constexpr (kDType == kF16) {
        const float2 f0 = unpack2<kF16>(b0);
        const float2 f1 = unpack2<kF16>(b1);
        uint32_t b0_hi, b0_lo, b1_hi, b1_lo;
        split_bf16x2(f0.x, f0.y, b0_hi, b0_lo);  // exact: a float16 has 11 significant bits
        split_bf16x2(f1.x, f1.y, b1_hi, b1_lo);
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          mma_bf16_16816(d[mt][nt], a_hi[mt], b0_hi, b1_hi);
          mma_bf16_16816(d[mt][nt], a_lo[mt], b0_hi, b1_hi);
          mma_bf16_16816(d[mt][nt], a_hi[mt], b0_lo, b1_lo);
        }
      } else {
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          mma_bf16_16816(d[mt][nt], a_hi[mt], b0, b1);
          mma_bf16_16816(d[mt][nt], a_lo[mt], b0, b1);
        }
      }
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
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mt][nt][i] = 0.0f;
    }
  }

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

  mma_block_epilogue<kDType, kNT, kMmaWarps>(args, row0, acc);
}

// ---- tensor-core kernel, scale applied after the MMA (K % 64 == 0, blocksize >= 64) -------------
//
// A 64-column segment of a row (32 bytes, one sector) lies inside one block. Lane (g, q) loads
// bytes [8q, 8q + 8) of the segment (16 codes) for rows g + 8*rho, and each MMA k-step takes four
// codes from every lane of the quad, so all 16 k-slots of an MMA come from one segment: the MMAs
// multiply the unscaled levels (split once per lane into bf16 hi + lo: level = hi + lo, error at
// most 2^-16 relative) and the segment's per-row sum is scaled in float32 afterwards. Decode per
// code: one shift, one shuffle returning {hi, lo} of the level, one byte permute.

// Scales of the two segments of a group for row g + 8*q (lane q of the quad holds rho = q).
// Double-quantized: load() fetches the two 8-bit codes (one register); finish(), called a whole
// group of work later, looks them up in nested_code, so the loop carries finished floats.
template <bool kNested>
struct SegmentScales {
  float value[2] = {0.0f, 0.0f};
  uint32_t codes = 0;  // nested: segment j's code in byte j until finish()

  __device__ __forceinline__ void load(const BlockScales& s, int j, int64_t b) {
    if constexpr (kNested) {
      codes |= static_cast<uint32_t>(__ldg(s.absmax_codes + b)) << (8 * j);
    } else {
      value[j] = __ldg(s.absmax + b);
    }
  }
  // e_row, rows_left, q, nsegments as for load_segment_weights; group: the group loaded.
  __device__ __forceinline__ void finish(const GemmArgs& args, int64_t e_row, int rows_left, int q,
                                         int nsegments, int group) {
    if constexpr (kNested) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int segment = 2 * group + j;
        if (segment < nsegments && 8 * q < rows_left) {
          const int64_t b = (e_row + int64_t{64} * segment + 8 * q * args.K) >> args.log2_blocksize;
          const float code = __ldg(args.scales.nested_code + ((codes >> (8 * j)) & 0xffu));
          value[j] = __fadd_rn(__fmul_rn(code, __ldg(args.scales.nested_absmax + (b >> 8))),
                               __ldg(args.scales.offset));
        }
      }
    }
  }
};

template <bool kNested>
struct SegmentWeights {
  uint2 codes[2][4];  // [segment of the group][rho]
  SegmentScales<kNested> scale;
};

// e_row: element index of the first code of row row0 + g; rows_left: N - (row0 + g).
template <bool kNested>
__device__ __forceinline__ void load_segment_weights(const GemmArgs& args, int group, int64_t e_row,
                                                     int rows_left, int q, int nsegments,
                                                     SegmentWeights<kNested>& f) {
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const int segment = 2 * group + j;
    const int64_t e0 = e_row + int64_t{64} * segment;
#pragma unroll
    for (int rho = 0; rho < 4; ++rho) {
      if (segment < nsegments && 8 * rho < rows_left) {
        f.codes[j][rho] = load_stream_8(args.packed + ((e0 + 8 * rho * args.K) >> 1) + 8 * q);
      } else {
        f.codes[j][rho] = make_uint2(0u, 0u);
      }
    }
    if (segment < nsegments && 8 * q < rows_left) {
      f.scale.load(args.scales, j, (e0 + 8 * q * args.K) >> args.log2_blocksize);
    }
  }
}

template <int kDType, int kNT, bool kNested>
__device__ __forceinline__ void compute_segment_group(const GemmArgs& args, int group, int g, int q,
                                                      int nsegments, const SegmentWeights<kNested>& f,
                                                      uint32_t level_pair, float (&acc)[2][kNT][4]) {
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const int segment = 2 * group + j;
    // Columns 64*segment + 16q + [0, 16) of rows 8*nt + g of A: k-slots of this lane in 4 MMAs.
    uint4 av[kNT][2];
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
      const int n = 8 * nt + g;
      const bool valid = segment < nsegments && n < args.rows;
      const void* p =
          static_cast<const unsigned short*>(args.A) + (n * args.lda + int64_t{64} * segment + 16 * q);
      av[nt][0] = load_a8_raw16<true>(p, 0, valid);
      av[nt][1] = load_a8_raw16<true>(p, 8, valid);
    }
    float d[2][kNT][4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
        for (int i = 0; i < 4; ++i) d[mt][nt][i] = 0.0f;
      }
    }
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      // Weight operand: k-slots (2q, 2q+1, 2q+8, 2q+9) = codes 4u..4u+3 of this lane's 16.
      uint32_t a_hi[2][4];
      uint32_t a_lo[2][4];
#pragma unroll
      for (int rho = 0; rho < 4; ++rho) {
        const uint32_t x = (u >> 1) ? f.codes[j][rho].y : f.codes[j][rho].x;
        const int e0 = 4 * (u & 1);
        uint32_t y[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) y[i] = level_pair_of(level_pair, x >> nibble_shift(e0 + i));
        const int mt = rho >> 1;
        const int odd = rho & 1;  // rows g + 8 of the tile go to registers 1 and 3
        a_hi[mt][odd] = __byte_perm(y[0], y[1], 0x5410);
        a_lo[mt][odd] = __byte_perm(y[0], y[1], 0x7632);
        a_hi[mt][2 + odd] = __byte_perm(y[2], y[3], 0x5410);
        a_lo[mt][2 + odd] = __byte_perm(y[2], y[3], 0x7632);
      }
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
        const uint4& v = av[nt][u >> 1];
        const uint32_t b0 = (u & 1) ? v.z : v.x;  // columns 4u, 4u+1 of this lane's 16
        const uint32_t b1 = (u & 1) ? v.w : v.y;  // columns 4u+2, 4u+3
        if constexpr (kDType == kF16) {
          const float2 f0 = unpack2<kF16>(b0);
          const float2 f1 = unpack2<kF16>(b1);
          uint32_t b0_hi, b0_lo, b1_hi, b1_lo;
          split_bf16x2(f0.x, f0.y, b0_hi, b0_lo);  // exact: a float16 has 11 significant bits
          split_bf16x2(f1.x, f1.y, b1_hi, b1_lo);
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) {
            mma_bf16_16816(d[mt][nt], a_hi[mt], b0_hi, b1_hi);
            mma_bf16_16816(d[mt][nt], a_lo[mt], b0_hi, b1_hi);
            mma_bf16_16816(d[mt][nt], a_hi[mt], b0_lo, b1_lo);
          }
        } else {
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) {
            mma_bf16_16816(d[mt][nt], a_hi[mt], b0, b1);
            mma_bf16_16816(d[mt][nt], a_lo[mt], b0, b1);
          }
        }
      }
    }
    // d[mt][nt][i] holds row 16*mt + g + 8*(i/2) = rho 2*mt + i/2 of this segment; its scale is
    // held by lane rho of the quad.
    const float own_scale = f.scale.value[j];
    float scale[4];
#pragma unroll
    for (int rho = 0; rho < 4; ++rho) scale[rho] = __shfl_sync(kFullMask, own_scale, (g << 2) | rho);
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
        for (int i = 0; i < 4; ++i)
          acc[mt][nt][i] = fmaf(scale[2 * mt + (i >> 1)], d[mt][nt][i], acc[mt][nt][i]);
      }
    }
  }
}

// kWarps (8 or 16) warps per block split K; 16 when N is small, so that an SM still has 16 warps.
template <int kDType, int kNT, bool kNested, int kWarps>
__global__ void __launch_bounds__(kWarps * 32, (mma_min_blocks<kDType, kNT>() * 8 / kWarps))
    gemm_4bit_mma_scale_after_kernel(const GemmArgs args) {
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int g = lane >> 2;
  const int q = lane & 3;
  // {bf16 hi, bf16 lo} of table[lane % 16]: hi + lo carries 16 significant bits of the level.
  const float level = __ldg(args.table + (lane & 15));
  uint32_t level_pair;
  {
    uint32_t hi, lo;
    split_bf16x2(level, 0.0f, hi, lo);
    level_pair = (hi & 0xffffu) | (lo << 16);
  }
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kMmaRows;
  const int nsegments = static_cast<int>(args.K >> 6);  // K < 2^37 (checked by the launcher)
  const int ngroups = (nsegments + 1) >> 1;

  float acc[2][kNT][4];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mt][nt][i] = 0.0f;
    }
  }

  // Software pipeline: the next group's weights are in flight while this group is computed.
  const int64_t e_row = (row0 + g) * args.K;
  const int rows_left = static_cast<int>(args.N - (row0 + g) < kMmaRows ? args.N - (row0 + g) : kMmaRows);
  SegmentWeights<kNested> current;
  load_segment_weights<kNested>(args, warp, e_row, rows_left, q, nsegments, current);
  current.scale.finish(args, e_row, rows_left, q, nsegments, warp);
  for (int group = warp; group < ngroups; group += kWarps) {
    SegmentWeights<kNested> next;
    load_segment_weights<kNested>(args, group + kWarps, e_row, rows_left, q, nsegments, next);
    compute_segment_group<kDType, kNT, kNested>(args, group, g, q, nsegments, current, level_pair, acc);
    next.scale.finish(args, e_row, rows_left, q, nsegments, group + kWarps);
    current = next;
  }
  mma_block_epilogue<kDType, kNT, kWarps>(args, row0, acc);
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

int log2_exact(int64_t x) {
  int r = 0;
  while ((int64_t{1} << r) < x) ++r;
  return r;
}

template <int kDType, int kMT, bool kAVec>
cudaError_t launch_gemv(const GemmArgs& args, bool nested, cudaStream_t stream) {
  constexpr int kRows = gemv_rows<kDType, kMT>();
  const dim3 grid(static_cast<unsigned>((args.N + kRows - 1) / kRows));
  if (nested) {
    gemv_4bit_kernel<kDType, kMT, kAVec, true><<<grid, kGemvThreads, 0, stream>>>(args);
  } else {
    gemv_4bit_kernel<kDType, kMT, kAVec, false><<<grid, kGemvThreads, 0, stream>>>(args);
  }
  return cudaGetLastError();
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

template <int kDType, int kNT, bool kAVec, bool kNested>
void launch_mma_kernel(bool scale_after, const GemmArgs& args, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((args.N + kMmaRows - 1) / kMmaRows));
  if constexpr (kAVec) {  // the scale-after kernel reads A with 16-byte loads only
    if (scale_after) {
      // Up to N = 8192 (256 blocks, under two per SM) blocks of 16 warps; float16 A with 16 rows
      // needs more than 128 registers and keeps 8.
      if constexpr (mma_min_blocks<kDType, kNT>() == 2) {
        if (args.N <= 8192) {
          gemm_4bit_mma_scale_after_kernel<kDType, kNT, kNested, 16><<<grid, 16 * 32, 0, stream>>>(args);
          return;
        }
      }
      gemm_4bit_mma_scale_after_kernel<kDType, kNT, kNested, 8><<<grid, 8 * 32, 0, stream>>>(args);
      return;
    }
  }
  gemm_4bit_mma_scale_before_kernel<kDType, kNT, kAVec, kNested><<<grid, kMmaWarps * 32, 0, stream>>>(args);
}

template <int kDType, int kNT>
cudaError_t launch_mma(const GemmArgs& args, bool nested, bool a_vec, bool scale_after, cudaStream_t stream) {
  if (a_vec) {
    nested ? launch_mma_kernel<kDType, kNT, true, true>(scale_after, args, stream)
           : launch_mma_kernel<kDType, kNT, true, false>(scale_after, args, stream);
  } else {
    nested ? launch_mma_kernel<kDType, kNT, false, true>(scale_after, args, stream)
           : launch_mma_kernel<kDType, kNT, false, false>(scale_after, args, stream);
  }
  return cudaGetLastError();
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
  const bool w_vec = args.K > 0 && args.K % 32 == 0 && reinterpret_cast<uintptr_t>(args.packed) % 16 == 0;
  if (!w_vec) {
    // The generic kernel loops over all rows of A itself (int rows: M below 2^31).
    args.rows = static_cast<int>(M);
    return launch_generic<kDType>(args, nested, stream);
  }
  const bool a_vec = reinterpret_cast<uintptr_t>(args.A) % 16 == 0 && (args.lda * kElem) % 16 == 0;
  // Tensor cores for 16-bit A: scale after the MMA when a 64-column segment lies in one block and
  // A's rows are 16-byte aligned, from 2 rows of A on; else scale before it, from 4 rows on (the
  // FFMA kernel below that).
  const bool scale_after =
      args.K % 64 == 0 && args.log2_blocksize >= 6 && a_vec && args.K < (int64_t{1} << 37);
  const int64_t mma_min_rows = scale_after ? 2 : 4;
  const char* a_base = static_cast<const char*>(args.A);
  char* out_base = static_cast<char*>(args.out);
  for (int64_t m0 = 0; m0 < M;) {
    const int64_t left = M - m0;
    GemmArgs chunk = args;
    chunk.A = a_base + m0 * args.lda * kElem;
    chunk.out = out_base + m0 * args.N * kElem;
    cudaError_t err = cudaSuccess;
    if (kDType != kF32 && left >= mma_min_rows) {
      chunk.rows = static_cast<int>(left < kMmaMaxM ? left : kMmaMaxM);
      if constexpr (kDType != kF32) {
        err = chunk.rows > 8 ? launch_mma<kDType, 2>(chunk, nested, a_vec, scale_after, stream)
                             : launch_mma<kDType, 1>(chunk, nested, a_vec, scale_after, stream);
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
  args.log2_blocksize = log2_exact(blocksize);
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
