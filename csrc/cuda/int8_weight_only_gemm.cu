// Weight-only int8 linear for decode-sized batches: out[m, n] = fma(sum_k A[m, k] * W[n, k], SCB[n] / 127,
// bias[n]) for 1 <= M <= 16 rows of float16 / bfloat16 activations A and the int8 weight W [N, K] of a
// Linear8bitLt (row-major codes, one float32 absmax SCB per row). A is not quantized; the int8 weights are
// converted exactly to A's 16-bit type and multiplied on the tensor cores with float32 accumulation.
//
// Algorithm: mma.sync m16n8k16 with the weight as the 16x16 operand (16 rows of W) and A^T as the 16x8
// one (8 rows of A; kNT = 2 tiles for M > 8). A thread block owns 16 * kMT rows of W (kMT = 1 or 2) and
// its warps (8 or 16) split K into 64-column segments, segment s going to warp s % warps. In a segment,
// lane (g, q) = (lane / 4, lane % 4) loads 16 consecutive bytes of W at column 64s + 16q for rows g and
// g + 8 of each 16-row tile (one 16-byte load each; the 4 lanes of a row read 64 contiguous bytes), and the
// same 16 columns of rows g (+ 8 per tile) of A (two 16-byte loads). MMA step u (0..3) takes bytes 4u..4u+3
// of the lane's chunk as its k-slots (2q, 2q+1, 2q+8, 2q+9) and the same four columns of A for the other
// operand: the k order inside an MMA is permuted, identically for both operands, so the dot products are
// unchanged. An int8 value x becomes a 16-bit float exactly, two values per operation: bfloat16 as the
// difference of the bfloat16 patterns 0x43 | x & 0x7f (128 + (x & 127)) and 0x43 | x & 0x80 (128 or 256),
// float16 through the half 1024 + (x + 128) pattern minus 1152. Each warp keeps kStages segments in flight
// (registers, loaded kStages segments ahead of the one it multiplies).
// At the end the warps' partial sums meet in shared memory; one thread per output sums them, applies
// SCB[n] * (1/127) and the bias with one fma in float32 and stores in A's dtype.
//
// Layout: A [M, K] with row stride lda elements (lda % 8 == 0, 16-byte aligned), W [N, K] row-major int8
// (16-byte aligned), out [M, N] contiguous. K % 16 == 0 (a lane's 16-byte chunk never straddles the end of
// a row; a last segment shorter than 64 leaves the lanes past K idle). Rows of W past N and of A past M
// are read as zeros and never written.
//
// Launched with programmatic dependent launch on sm_90 (dependent_launch.cuh): a block prefetches the first
// two segments per warp of its rows into L2 while the previous kernel finishes, then waits for it.
//
// Limits: sm_80 or newer (mma.sync bf16); 64-bit indices; N < 2^35 (grid x). The launcher returns
// cudaErrorInvalidValue for anything int8_weight_only_linear_supported rejects; the op falls back to a
// float32 ATen matmul there.
//
// Expected bottleneck: reading W once, one byte per weight, half the bytes of a bfloat16 F.linear, so at
// M = 1 about 2x faster than bfloat16 on the same memory system. Per 16 weight bytes a lane issues one
// 16-byte load, ~2 loads of A (L1/L2 hits), the conversions (~2 instructions per weight for bfloat16,
// ~1 for float16) and 4 * kNT MMAs: about 3 instructions per weight byte at M <= 8, below the ~9 per byte
// an SM can issue at 3 TB/s across 132 SMs. A is re-read by every thread block from L2 (M * K * 2 bytes per
// block of 16 * kMT rows of W), which is why kMT = 2 is used when N leaves enough blocks.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "dependent_launch.cuh"
#include "device_attributes.cuh"
#include "halfbyte/int8_cuda_kernels.h"
#include "mma_sync.cuh"

namespace halfbyte::cuda {
namespace {

constexpr int kF16 = static_cast<int>(DType::kFloat16);
constexpr int kBF16 = static_cast<int>(DType::kBFloat16);
constexpr int kMaxWarps = 16;
constexpr int kSegment = 64;  // columns of K per segment: 4 lanes x 16 bytes

struct WeightOnlyArgs {
  const unsigned short* A;  // [M, K], row stride lda
  int64_t lda;
  int M;
  int64_t K;
  int64_t N;
  const int8_t* W;             // [N, K]
  const float* row_scale;      // [N]
  const unsigned short* bias;  // [N] or nullptr
  unsigned short* out;         // [M, N]
  unsigned early_blocks;       // blocks of the first resident wave (the ones that prefetch under PDL)
};

// Streamed once: keep out of L1, ask L2 for 256-byte lines. volatile: never speculated past its guard.
__device__ __forceinline__ uint4 load_stream_16(const int8_t* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

__device__ __forceinline__ uint32_t word_at(const uint4& v, int w) {
  return w == 0 ? v.x : w == 1 ? v.y : w == 2 ? v.z : v.w;
}

// The four int8 of `word` (element 0 in the low byte) as two 16-bit pairs of kDType, exactly:
// lo = {e0, e1}, hi = {e2, e3}, first element in the low half.
template <int kDType>
__device__ __forceinline__ void int8x4_to_pairs(uint32_t word, uint32_t& lo, uint32_t& hi) {
  if constexpr (kDType == kBF16) {
    // Each byte x under a 0x43 high byte: with bit 7 cleared it is the bfloat16 128 + (x & 127), with
    // only bit 7 kept it is 128 (bit 7 clear) or 256 (set), and their difference is x, exactly, in one
    // fma.rn.bf16x2 (a - b * 1: the product and the integer result are exact).
    const uint32_t p01 = __byte_perm(word, 0x43434343u, 0x4140);
    const uint32_t p23 = __byte_perm(word, 0x43434343u, 0x4342);
    constexpr uint32_t kMinusOne = 0xBF80BF80u;  // bfloat16x2 {-1, -1}
    asm("fma.rn.bf16x2 %0, %1, %2, %3;"
        : "=r"(lo)
        : "r"(p01 & 0xFF80FF80u), "r"(kMinusOne), "r"(p01 & 0xFF7FFF7Fu));
    asm("fma.rn.bf16x2 %0, %1, %2, %3;"
        : "=r"(hi)
        : "r"(p23 & 0xFF80FF80u), "r"(kMinusOne), "r"(p23 & 0xFF7FFF7Fu));
  } else {
    const uint32_t biased = word ^ 0x80808080u;                     // x + 128 in each byte
    const uint32_t h01 = __byte_perm(biased, 0x64646464u, 0x4140);  // halves 1024 + (x + 128)
    const uint32_t h23 = __byte_perm(biased, 0x64646464u, 0x4342);
    asm("sub.f16x2 %0, %1, %2;" : "=r"(lo) : "r"(h01), "r"(0x64806480u));  // - 1152
    asm("sub.f16x2 %0, %1, %2;" : "=r"(hi) : "r"(h23), "r"(0x64806480u));
  }
}

template <int kDType>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  mma::m16n8k16<kDType == kBF16>(d, a, b0, b1);
}

__device__ __forceinline__ float half_bits_to_float(int dtype, unsigned short bits) {
  return dtype == kBF16 ? __uint_as_float(static_cast<uint32_t>(bits) << 16)
                        : __half2float(__ushort_as_half(bits));
}

__device__ __forceinline__ unsigned short float_to_half_bits(int dtype, float v) {
  return dtype == kBF16 ? __bfloat16_as_ushort(__float2bfloat16_rn(v)) : __half_as_ushort(__float2half_rn(v));
}

// Segments in flight per warp: the registers of a segment grow with kMT (W) and kNT (A); with more than
// 16 + 16 bytes per lane and segment, 2 stay within the 128 registers of a 512-thread block.
template <int kMT, int kNT>
constexpr int stages() {
  return kMT + kNT == 2 ? 4 : 2;
}

template <int kMT, int kNT>
struct Segment {
  uint4 w[kMT][2];  // rows 16*mt + g and 16*mt + g + 8 of the block's tile: 16 bytes at column 64s + 16q
  uint4 a[kNT][2];  // row 8*nt + g of A: columns 64s + 16q + [0, 8) and [8, 16)
};

template <int kDType, int kMT, int kNT>
__global__ void __launch_bounds__(kMaxWarps * 32) int8_weight_only_mma_kernel(const WeightOnlyArgs args) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  constexpr int kRows = 16 * kMT;
  constexpr int kCols = 8 * kNT;
  constexpr int kStages = stages<kMT, kNT>();
  __shared__ float partial[kMaxWarps][kRows][kCols + 1];
  const int warps = static_cast<int>(blockDim.x >> 5);
  const int warp = static_cast<int>(threadIdx.x >> 5);
  const int lane = static_cast<int>(threadIdx.x & 31);
  const int g = lane >> 2;
  const int q = lane & 3;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int64_t segments = (args.K + kSegment - 1) / kSegment;

  const int8_t* w_row[kMT][2];
  bool w_valid[kMT][2];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t row = row0 + 16 * mt + 8 * h + g;
      w_valid[mt][h] = row < args.N;
      w_row[mt][h] = args.W + (w_valid[mt][h] ? row : 0) * args.K + 16 * q;
    }
  }
  // Programmatic dependent launch: the first segments of the block's rows into L2 while the previous kernel
  // finishes (only blocks of the first wave can start that early; later ones would only add L2 requests:
  // +5-8% on 128256x4096 when every block prefetched); A (which it may have written) and everything else
  // only after the wait.
  {
    const int64_t bytes = args.K < kSegment * warps * 2 ? args.K : kSegment * warps * 2;
    const int r = static_cast<int>(threadIdx.x);
    if (blockIdx.x < args.early_blocks && r < kRows && row0 + r < args.N) {
      dependent_launch::prefetch_l2(args.W + (row0 + r) * args.K, static_cast<uint32_t>(bytes));
    }
  }
  dependent_launch::wait_for_prior_grids();
  dependent_launch::allow_dependent_grids();
  const unsigned short* a_row[kNT];
  bool a_valid[kNT];
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt) {
    const int m = 8 * nt + g;
    a_valid[nt] = m < args.M;
    a_row[nt] = args.A + (a_valid[nt] ? m : 0) * args.lda + 16 * q;
  }

  auto load = [&](Segment<kMT, kNT>& s, int64_t segment) {
    const int64_t k0 = segment * kSegment;
    const bool chunk = segment < segments && k0 + 16 * q < args.K;
    const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
      for (int h = 0; h < 2; ++h)
        s.w[mt][h] = chunk && w_valid[mt][h] ? load_stream_16(w_row[mt][h] + k0) : zero;
    }
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
      const bool ok = chunk && a_valid[nt];
      s.a[nt][0] = ok ? __ldg(reinterpret_cast<const uint4*>(a_row[nt] + k0)) : zero;
      s.a[nt][1] = ok ? __ldg(reinterpret_cast<const uint4*>(a_row[nt] + k0 + 8)) : zero;
    }
  };

  float acc[kMT][kNT][4];
  mma::zero(acc);

  auto multiply = [&](const Segment<kMT, kNT>& s) {
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      uint32_t wa[kMT][4];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        // registers 0 / 2: row g, k-slots (2q, 2q+1) / (2q+8, 2q+9); registers 1 / 3: the same for row g + 8
        int8x4_to_pairs<kDType>(word_at(s.w[mt][0], u), wa[mt][0], wa[mt][2]);
        int8x4_to_pairs<kDType>(word_at(s.w[mt][1], u), wa[mt][1], wa[mt][3]);
      }
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
        const uint4& av = s.a[nt][u >> 1];
        const uint32_t b0 = (u & 1) ? av.z : av.x;  // columns 4u, 4u+1 of the lane's 16
        const uint32_t b1 = (u & 1) ? av.w : av.y;  // columns 4u+2, 4u+3
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) mma_16816<kDType>(acc[mt][nt], wa[mt], b0, b1);
      }
    }
  };

  Segment<kMT, kNT> slot[kStages];
#pragma unroll
  for (int j = 0; j < kStages; ++j) load(slot[j], warp + static_cast<int64_t>(j) * warps);
  for (int64_t base = warp; base < segments; base += static_cast<int64_t>(kStages) * warps) {
#pragma unroll
    for (int j = 0; j < kStages; ++j) {
      const int64_t segment = base + static_cast<int64_t>(j) * warps;
      if (segment < segments) multiply(slot[j]);
      load(slot[j], segment + static_cast<int64_t>(kStages) * warps);
    }
  }

  // acc[mt][nt][i]: row 16*mt + g + 8*(i/2) of the tile, row 8*nt + 2q + i%2 of A.
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i)
        partial[warp][16 * mt + g + 8 * (i >> 1)][8 * nt + 2 * q + (i & 1)] = acc[mt][nt][i];
    }
  }
  __syncthreads();
  for (int idx = static_cast<int>(threadIdx.x); idx < kRows * args.M; idx += static_cast<int>(blockDim.x)) {
    const int m = idx / kRows;
    const int r = idx - m * kRows;
    const int64_t n = row0 + r;
    if (n < args.N) {
      float total = 0.0f;
      for (int w = 0; w < warps; ++w) total += partial[w][r][m];
      const float scale = __fmul_rn(__ldg(args.row_scale + n), kInt8Inverse127);
      const float bias = args.bias != nullptr ? half_bits_to_float(kDType, __ldg(args.bias + n)) : 0.0f;
      args.out[static_cast<int64_t>(m) * args.N + n] = float_to_half_bits(kDType, fmaf(total, scale, bias));
    }
  }
#endif
}

// Multiprocessor count and compute capability of a device, queried once (no stream work).
struct DeviceInfo {
  int sms = 0;
  int major = 0;
};

DeviceInfo device_info() {
  DeviceInfo info;
  if (host::device_attribute<cudaDevAttrMultiProcessorCount>(info.sms) != cudaSuccess ||
      host::device_attribute<cudaDevAttrComputeCapabilityMajor>(info.major) != cudaSuccess) {
    return {};
  }
  return info;
}

bool is_aligned(const void* p, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

template <int kDType, int kMT, int kNT>
cudaError_t launch(const WeightOnlyArgs& args, int sms, cudaStream_t stream) {
  const int64_t blocks = (args.N + 16 * kMT - 1) / (16 * kMT);
  const int64_t segments = (args.K + kSegment - 1) / kSegment;
  // 8 warps per block when every SM gets a block: two such blocks fit an SM's registers (~100 per thread), so
  // up to 2 * SMs blocks run in one wave. Two-tile blocks (N >= 64 * SMs) take 4 warps, four blocks per SM:
  // with K = 4096 a warp of an 8-warp block streams only 8 segments, half of them filling or draining its
  // pipeline (H100, bf16, M = 1: 14336x4096 24.8 -> 23.7 us, 128256x4096 180.6 -> 179.0; the one-tile
  // shapes lose with 4 warps: 4096x4096 8.3 -> 10.5). Fewer blocks than SMs: 16 warps each, for more loads
  // in flight per SM. Never more warps than segments.
  const int64_t warps_wanted = blocks < sms ? kMaxWarps : kMT == 2 ? 4 : 8;
  const int64_t warps = std::max<int64_t>(1, std::min<int64_t>(warps_wanted, segments));
  WeightOnlyArgs launch_args = args;
  launch_args.early_blocks = static_cast<unsigned>((16 / warps) * sms);
  return dependent_launch::launch(int8_weight_only_mma_kernel<kDType, kMT, kNT>,
                                  dim3(static_cast<unsigned>(blocks)), static_cast<int>(32 * warps), 0,
                                  stream, launch_args);
}

template <int kDType>
cudaError_t launch_for_shape(const WeightOnlyArgs& args, int sms, cudaStream_t stream) {
  // Two 16-row tiles per block (A re-read half as often) when that still leaves 2 blocks per SM.
  const bool two_tiles = (args.N + 31) / 32 >= 2 * static_cast<int64_t>(sms);
  if (args.M <= 8) {
    return two_tiles ? launch<kDType, 2, 1>(args, sms, stream) : launch<kDType, 1, 1>(args, sms, stream);
  }
  return two_tiles ? launch<kDType, 2, 2>(args, sms, stream) : launch<kDType, 1, 2>(args, sms, stream);
}

}  // namespace

bool int8_weight_only_linear_supported(const void* A, DType dtype, int64_t M, int64_t K, int64_t lda,
                                       const int8_t* W) {
  if (dtype != DType::kFloat16 && dtype != DType::kBFloat16) return false;
  if (M < 1 || M > kInt8WeightOnlyMaxRows || K <= 0 || K % 16 != 0) return false;
  if (lda % 8 != 0 || (M > 1 && lda < K) || !is_aligned(A, 16) || !is_aligned(W, 16)) return false;
  return device_info().major >= 8;
}

cudaError_t int8_weight_only_linear(const void* A, DType dtype, int64_t M, int64_t K, int64_t lda,
                                    const int8_t* W, const float* row_scale, int64_t N, const void* bias,
                                    void* out, cudaStream_t stream) {
  if (!int8_weight_only_linear_supported(A, dtype, M, K, lda, W) || N < 0 || N >= (int64_t{1} << 35)) {
    return cudaErrorInvalidValue;
  }
  if (N == 0) return cudaSuccess;
  const WeightOnlyArgs args{static_cast<const unsigned short*>(A),
                            lda,
                            static_cast<int>(M),
                            K,
                            N,
                            W,
                            row_scale,
                            static_cast<const unsigned short*>(bias),
                            static_cast<unsigned short*>(out),
                            0};
  const int sms = device_info().sms;
  return dtype == DType::kBFloat16 ? launch_for_shape<kBF16>(args, sms, stream)
                                   : launch_for_shape<kF16>(args, sms, stream);
}

}  // namespace halfbyte::cuda
