// gemm_4bit for batches above the decode sizes (prefill, batched serving): out[m, j] = sum_k A[m, k] *
// W[j, k] (+ bias[j]), W the [N, K] 4-bit weight, dequantized in registers and fed to tensor cores
// (mma.sync m16n8k16, sm_80 and newer), accumulated in float32.
//
// Layout read: W exactly as quantize_4bit writes it (row-major codes, two per byte, first element in
// the high nibble; one scale per block of `blocksize` consecutive elements of the flat N*K array, plain
// float32 or double-quantized, read directly). No repacked copy of the weight exists.
//
// Algorithm. The product is computed transposed, out^T = W A^T: W is the 16x16 "A" operand of the MMA
// (rows of W = MMA rows), the activations the 16x8 "B" operand (rows of A = MMA columns), so a warp's
// weight registers are reused across all its activation rows. A block owns kBN = 128 rows of W and kBM
// rows of A (16, 32, 64 or 128); 8 warps, 4 along W (32 rows, two 16-row MMA tiles each) by 2 along A
// (kBM / 2 rows, kBM / 16 eight-row MMA tiles each); grid x over W, y over A, z over splits of K (when
// there are fewer tiles than two per SM). K advances in stages of 64 through a 4-deep cp.async pipeline
// in shared memory (per stage: 128 rows x 32 bytes of codes, their scales, kBM rows x 128 bytes of A,
// the A rows' 16-byte chunks XOR-swizzled by row so the fragment loads are conflict-free).
// K order inside a stage is permuted, identically for W and A, so that every fragment is one wide
// shared-memory load: lane (g = lane / 4, q = lane % 4) reads bytes [8q, 8q + 8) of its W rows (codes
// 16q .. 16q + 15) and elements [16q, 16q + 16) of its A rows; MMA step s (0..3) uses codes
// 16q + 4s .. 16q + 4s + 3 as its k-slots (2q, 2q + 1, 2q + 8, 2q + 9). The sum over k is the same.
// A code becomes bf16/fp16 as round(level * scale) with the product in float32, the same value
// dequantize_4bit writes, so the result is that of dequantize + matmul up to the order of the float32
// sums. Levels come by warp shuffle (lane L holds table[L % 16]). Block scales travel with the stage
// through the cp.async pipeline (4 bytes per row: the float32 absmax, or the word holding the 8-bit code
// plus the nested absmax; the array's last partial word by byte loads), so no load waits on DRAM inside
// the loop.
// Epilogue: the accumulators go through shared memory (float32) and leave as 16-byte row stores:
// bias added, rounded to A's dtype (one split), or as float32 partial sums (split K: grid z splits
// the stages; gemm_4bit_reduce_kernel adds the splits in order, so results are deterministic).
//
// Limits: float16/bfloat16 A with 16-byte aligned rows, K % 64 == 0, blocksize >= 64 (a stage's 64
// codes of a row then share one scale), `packed` 16-byte aligned, N % 8 == 0, nested absmax codes
// 4-byte aligned, M <= 65535 * 128; the caller (cuda_ops.cpp) sends other shapes elsewhere. 64-bit
// element indices.
//
// sm_90a variant (gemm_4bit_prefill_wgmma_kernel, 128 x 128 tiles, two warp groups): the same pipeline
// and dequantize, but wgmma.mma_async m64n128k16 with the weight fragment from registers and A read by
// the tensor cores from the swizzled stage tile through a descriptor; the next stage is dequantized
// while a stage's wgmma run. Built when HALFBYTE_CUDA_ARCHS has 90a, run on compute capability 9.0.
//
// Bottleneck (ncu on the H100, 14336 x 4096): not DRAM (7-14% of peak); the mma.sync kernel keeps the
// shared-memory/L1 pipe 72% busy (2 shuffles per code, the activation fragment loads, each code
// dequantized by both warps sharing its rows) with issue slots 41-51% busy at 16 warps per SM; the wgmma
// kernel removes the fragment loads and the duplicate dequantize but still issues at 49% with the tensor
// pipe 32% busy. So these kernels beat dequantize + cuBLAS only while the weight stream dominates
// (M <= 128 on large weights, see cuda_ops.cpp): 14336 x 4096 at M = 64 65 us and at M = 128 79 us
// (wgmma) against about 100 us; at M = 2048 they take 1.05 ms (mma.sync) and 0.78 ms (wgmma) where
// cuBLAS' bf16 GEMM takes 0.36 ms. Per-row lookup tables with byte permutes instead of shuffles, and
// 256-row wgmma tiles, were tried and measured no faster (benchmarks/notes_gemm_4bit_prefill.md).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "device_attributes.cuh"
#include "gemm_4bit_prefill_output.cuh"
#include "halfbyte/cuda_kernels.h"
#include "mma_sync.cuh"
#include "wgmma_register_a.cuh"
#include "wgmma_tiles.cuh"

namespace halfbyte::cuda {
namespace {

using prefill_output::kBF16;
using prefill_output::kF16;
using prefill_output::pack2;

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kThreads = 256;
constexpr int kWarpsN = 4;       // warps along the rows of W
constexpr int kWarpsM = 2;       // warps along the rows of A
constexpr int kBN = 128;         // rows of W per block (mma.sync kernel)
constexpr int kWgmmaRows = 128;  // rows of W per block (wgmma kernel)
constexpr int kBK = 64;          // elements of K per pipeline stage

template <int kBM, int kRowsW = kBN>
struct Tile {
  static constexpr int kThreadsPerBlock = 2 * kRowsW;  // one 16-byte copy of codes per thread and stage
  static constexpr int kWarpRowsA = kBM / kWarpsM;     // rows of A per warp (mma.sync kernel)
  static constexpr int kNT = kWarpRowsA / 8;           // 8-row MMA tiles of A per warp (mma.sync kernel)
  static constexpr int kABytes = kBM * kBK * 2;        // A per stage
  static constexpr int kWBytes = kRowsW * kBK / 2;     // codes per stage
  static constexpr int kScaleBytes = kRowsW * 8;  // per row: float32 absmax, or code word + nested absmax
  static constexpr int kStageBytes = kABytes + kWBytes + kScaleBytes;
  static constexpr int kStages = 4;  // cp.async slots
  static constexpr int kPipeBytes = kStages * kStageBytes;
  static constexpr int kEpiStride = kRowsW + 4;  // floats per staged output row (conflict-free writes)
  static constexpr int kEpiBytes = kBM * kEpiStride * 4;
  static constexpr int kSmem = kPipeBytes > kEpiBytes ? kPipeBytes : kEpiBytes;
  static_assert(kNT >= 1, "at least one 8-row tile of A per warp");
};

struct PrefillArgs {
  const void* A;
  int64_t lda;  // elements
  int M;
  int64_t K;
  int64_t N;
  const uint8_t* packed;
  BlockScales scales;
  const float* table;
  int log2_blocksize;
  int64_t blocks;    // scale blocks of W
  const void* bias;  // nullptr or N elements of A's dtype
  void* out;         // [M, N], A's dtype
  float* partial;    // split K: [splits, M, N] float32
  int stages_per_split;
};

// ---- small pieces ---------------------------------------------------------------------------------

using wgmma_tiles::smem_address;

// 16-byte global -> shared copy, zero-filled when !valid (src must still be a mapped address).
__device__ __forceinline__ void copy_16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16, %2;" ::"r"(dst), "l"(src),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void copy_commit() { asm volatile("cp.async.commit_group;"); }
template <int kPending>
__device__ __forceinline__ void copy_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(kPending));
}

template <int kDType>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  mma::m16n8k16<kDType == kBF16>(d, a, b0, b1);
}

// The two codes of byte `p` (0..3) of `word`, dequantized: {level(high nibble) * scale in the low
// half, level(low nibble) * scale in the high half}. Lane L holds table[L % 16]; shfl reads the low 5
// bits of its lane operand, so the shifted word is the whole index computation.
template <int kDType>
__device__ __forceinline__ uint32_t dequantize_byte(float table_lane, uint32_t word, int p, float scale) {
  const float first = __shfl_sync(kFullMask, table_lane, static_cast<int>(word >> (8 * p + 4)));
  const float second = __shfl_sync(kFullMask, table_lane, static_cast<int>(word >> (8 * p)));
  return pack2<kDType>(multiply_like_cuda(first, scale), multiply_like_cuda(second, scale));
}

// 4-byte global -> shared copy.
__device__ __forceinline__ void copy_4(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(dst), "l"(src), "r"(src_bytes));
}

// ---- the kernel -----------------------------------------------------------------------------------

// Issues the copies of stage `kt` (64 elements of K) into shared-memory slot `slot`: the codes, A, and
// the block scale of each of the 128 rows (a stage's 64 codes of a row share one block).
template <int kBM, bool kNested, int kRowsW = kBN>
__device__ __forceinline__ void load_stage(const PrefillArgs& args, uint8_t* smem, int slot, int64_t kt,
                                           int64_t n0, int m0) {
  using T = Tile<kBM, kRowsW>;
  uint8_t* a_tile = smem + slot * T::kStageBytes;
  uint8_t* w_tile = a_tile + T::kABytes;
  uint8_t* scale_tile = w_tile + T::kWBytes;
  const int tid = static_cast<int>(threadIdx.x);
  // Codes: kRowsW rows x 2 chunks of 16 bytes, one per thread.
  {
    const int row = tid >> 1;
    const int half = tid & 1;
    const int64_t j = n0 + row;
    const bool valid = j < args.N;
    const uint8_t* src = valid ? args.packed + ((j * args.K + kt * kBK) >> 1) + half * 16 : args.packed;
    copy_16(smem_address(w_tile + row * 32 + half * 16), src, valid);
  }
  // Scales: thread r < 128 the plain absmax (or the 4-byte word holding the 8-bit code) of row r,
  // thread 128 + r the nested absmax of row r. Rows past N copy row N - 1's (their output is dropped).
  {
    const int row = tid & (kRowsW - 1);
    int64_t j = n0 + row;
    if (j >= args.N) j = args.N - 1;
    const int64_t b = (j * args.K + kt * kBK) >> args.log2_blocksize;
    if constexpr (!kNested) {
      if (tid < kRowsW) copy_4(smem_address(scale_tile + row * 4), args.scales.absmax + b, 4);
    } else {
      if (tid < kRowsW) {
        const int64_t word = b & ~int64_t{3};
        const int64_t left = args.blocks - word;
        if (left >= 4) {
          copy_4(smem_address(scale_tile + row * 4), args.scales.absmax_codes + word, 4);
        } else {  // the array's last, partial word: byte loads (a 4-byte copy would read past its end)
          uint32_t value = 0;
          for (int i = 0; i < left; ++i)
            value |= static_cast<uint32_t>(__ldg(args.scales.absmax_codes + word + i)) << (8 * i);
          *reinterpret_cast<uint32_t*>(scale_tile + row * 4) = value;
        }
      } else {
        copy_4(smem_address(scale_tile + kRowsW * 4 + row * 4), args.scales.nested_absmax + (b >> 8), 4);
      }
    }
  }
  // A: kBM rows x 8 chunks of 16 bytes; chunk c of row r lands at chunk c ^ (r & 7).
  const unsigned short* a = static_cast<const unsigned short*>(args.A);
#pragma unroll
  for (int c = tid; c < kBM * 8; c += T::kThreadsPerBlock) {
    const int row = c >> 3;
    const int chunk = c & 7;
    const bool valid = m0 + row < args.M;
    const unsigned short* src = valid ? a + (m0 + row) * args.lda + kt * kBK + chunk * 8 : a;
    copy_16(smem_address(a_tile + row * 128 + ((chunk ^ (row & 7)) << 4)), src, valid);
  }
}

// The scale of local row `row` in a stage's scale tile.
template <bool kNested, int kRowsW = kBN>
__device__ __forceinline__ float stage_scale(const PrefillArgs& args, const uint8_t* scale_tile, int row,
                                             int64_t j, int64_t kt) {
  if constexpr (!kNested) {
    return reinterpret_cast<const float*>(scale_tile)[row];
  } else {
    const int64_t b = (j * args.K + kt * kBK) >> args.log2_blocksize;
    const uint32_t word = reinterpret_cast<const uint32_t*>(scale_tile)[row];
    const uint32_t code = (word >> (8 * static_cast<int>(b & 3))) & 0xffu;
    const float nested_absmax = reinterpret_cast<const float*>(scale_tile + kRowsW * 4)[row];
    return __fadd_rn(multiply_like_cuda(__ldg(args.scales.nested_code + code), nested_absmax),
                     __ldg(args.scales.offset));
  }
}

// Writes a block's output tile from the float32 staging area (row m_local of A at m_local * kEpiStride).
template <int kDType, int kBM, int kRowsW = kBN>
__device__ __forceinline__ void store_tile(const PrefillArgs& args, const float* staged, int m0, int64_t n0) {
  using T = Tile<kBM, kRowsW>;
  prefill_output::store_staged_tile<kDType, kBM, kRowsW, T::kEpiStride, T::kThreadsPerBlock>(
      staged, static_cast<int>(threadIdx.x), m0, n0, args.M, args.N, args.bias, args.out, args.partial);
}

// Stages of K this block's split computes, from stage kt_begin (the last split may have fewer).
__device__ __forceinline__ int split_stage_count(const PrefillArgs& args, int64_t kt_begin) {
  const int64_t k_stages = args.K / kBK;
  int64_t kt_end = kt_begin + args.stages_per_split;
  if (kt_end > k_stages) kt_end = k_stages;
  return kt_begin < kt_end ? static_cast<int>(kt_end - kt_begin) : 0;
}

template <int kDType, int kBM, bool kNested>
__global__ void __launch_bounds__(kThreads, 2) gemm_4bit_prefill_kernel(const PrefillArgs args) {
  using T = Tile<kBM>;
  constexpr int kNT = T::kNT;
  constexpr int kStages = T::kStages;
  extern __shared__ __align__(16) uint8_t smem[];

  const int lane = static_cast<int>(threadIdx.x & 31);
  const int warp = static_cast<int>(threadIdx.x >> 5);
  const int g = lane >> 2;
  const int q = lane & 3;
  const int warp_n = warp % kWarpsN;
  const int warp_m = warp / kWarpsN;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kBN;
  const int m0 = static_cast<int>(blockIdx.y) * kBM;
  const int64_t kt_begin = static_cast<int64_t>(blockIdx.z) * args.stages_per_split;
  const int count = split_stage_count(args, kt_begin);

  const float table_lane = __ldg(args.table + (lane & 15));

  // The four rows of W this lane dequantizes: tile t (0, 1), half h (row g or g + 8); local and global.
  int local_row[2][2];
  int64_t w_row[2][2];
#pragma unroll
  for (int t = 0; t < 2; ++t) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      local_row[t][h] = warp_n * 32 + t * 16 + g + 8 * h;
      const int64_t j = n0 + local_row[t][h];
      w_row[t][h] = j < args.N ? j : args.N - 1;  // as load_stage clamps it
    }
  }

  float acc[2][kNT][4];
  mma::zero(acc);

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < count) load_stage<kBM, kNested>(args, smem, s, kt_begin + s, n0, m0);
    copy_commit();
  }

  for (int it = 0; it < count; ++it) {
    copy_wait<kStages - 2>();
    __syncthreads();
    {
      const int ahead = it + kStages - 1;
      if (ahead < count) load_stage<kBM, kNested>(args, smem, ahead % kStages, kt_begin + ahead, n0, m0);
      copy_commit();
    }
    const uint8_t* a_tile = smem + (it % kStages) * T::kStageBytes;
    const uint8_t* w_tile = a_tile + T::kABytes;
    float scale[2][2];
#pragma unroll
    for (int t = 0; t < 2; ++t) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        scale[t][h] =
            stage_scale<kNested>(args, w_tile + T::kWBytes, local_row[t][h], w_row[t][h], kt_begin + it);
      }
    }
    // This lane's 8 code bytes of each of its four rows.
    uint2 codes[2][2];
#pragma unroll
    for (int t = 0; t < 2; ++t) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        codes[t][h] = *reinterpret_cast<const uint2*>(w_tile + local_row[t][h] * 32 + q * 8);
      }
    }
    // Two halves: chunk 2q + half of each A row holds the elements of steps 2 * half and 2 * half + 1,
    // which use code bytes 4 * half + {0, 1} and 4 * half + {2, 3} of the lane's 8 (word `half`).
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      uint32_t w[2][2][4];  // [step][tile][register]
#pragma unroll
      for (int step = 0; step < 2; ++step) {
#pragma unroll
        for (int t = 0; t < 2; ++t) {
          const uint32_t row_lo = half == 0 ? codes[t][0].x : codes[t][0].y;
          const uint32_t row_hi = half == 0 ? codes[t][1].x : codes[t][1].y;
          w[step][t][0] = dequantize_byte<kDType>(table_lane, row_lo, 2 * step, scale[t][0]);
          w[step][t][1] = dequantize_byte<kDType>(table_lane, row_hi, 2 * step, scale[t][1]);
          w[step][t][2] = dequantize_byte<kDType>(table_lane, row_lo, 2 * step + 1, scale[t][0]);
          w[step][t][3] = dequantize_byte<kDType>(table_lane, row_hi, 2 * step + 1, scale[t][1]);
        }
      }
#pragma unroll
      for (int j = 0; j < kNT; ++j) {
        const int row = warp_m * T::kWarpRowsA + j * 8 + g;
        const uint4 act = *reinterpret_cast<const uint4*>(a_tile + row * 128 + (((2 * q + half) ^ g) << 4));
#pragma unroll
        for (int t = 0; t < 2; ++t) {
          mma_16816<kDType>(acc[t][j], w[0][t], act.x, act.y);
          mma_16816<kDType>(acc[t][j], w[1][t], act.z, act.w);
        }
      }
    }
  }
  copy_wait<0>();
  __syncthreads();  // the pipeline's shared memory becomes the output staging area

  // acc[t][j][i]: W row warp_n*32 + 16t + g + 8(i/2), A row warp_m*kWarpRowsA + 8j + 2q + (i%2).
  float* staged = reinterpret_cast<float*>(smem);
#pragma unroll
  for (int t = 0; t < 2; ++t) {
#pragma unroll
    for (int j = 0; j < kNT; ++j) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int n_local = warp_n * 32 + t * 16 + g + 8 * (i >> 1);
        const int m_local = warp_m * T::kWarpRowsA + j * 8 + 2 * q + (i & 1);
        staged[m_local * T::kEpiStride + n_local] = acc[t][j][i];
      }
    }
  }
  __syncthreads();

  store_tile<kDType, kBM>(args, staged, m0, n0);
}

// ---- sm_90a: the same tile with wgmma --------------------------------------------------------------
// A block owns kWgmmaRows = 128 rows of W and 128 rows of A (256 threads: 2 warp groups; 256 rows and 4
// warp groups, halving the re-reads of A from L2, measured no faster). A warp group owns 64 rows of W; its
// weight fragment (each warp 16 rows, mma.sync's A layout) comes from registers as above, but in natural K
// order (lane q dequantizes code bytes q and q + 4 of each 8-byte step), and the 128 rows of A are read by
// the tensor cores straight from the stage's shared memory through a matrix descriptor: the tile is K-major
// with 128-byte rows whose 16-byte chunks are XOR-swizzled by row, which is the hardware's 128-byte swizzle
// when the tile is 1024-byte aligned. No activation fragment loads, and every code is dequantized once per
// block.

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define HALFBYTE_WGMMA 1
#endif

using wgmma_tiles::swizzled_tile_descriptor;

template <int kDType>
__device__ __forceinline__ void wgmma_m64n128k16(float (&d)[64], const uint32_t (&a)[4], uint64_t b) {
  wgmma_register_a::m64n128k16<kDType == kBF16>(d, a, b);
}

using wgmma_tiles::fence_registers;

template <int kDType, bool kNested>
__global__ void __launch_bounds__(2 * kWgmmaRows, kWgmmaRows == 128 ? 2 : 1)
    gemm_4bit_prefill_wgmma_kernel(const PrefillArgs args) {
#if defined(HALFBYTE_WGMMA)
  using T = Tile<128, kWgmmaRows>;
  constexpr int kStages = T::kStages;
  extern __shared__ __align__(16) uint8_t smem_raw[];
  uint8_t* smem =
      reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t{1023});

  const int lane = static_cast<int>(threadIdx.x & 31);
  const int warp = static_cast<int>(threadIdx.x >> 5);
  const int g = lane >> 2;
  const int q = lane & 3;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kWgmmaRows;
  const int m0 = static_cast<int>(blockIdx.y) * 128;
  const int64_t kt_begin = static_cast<int64_t>(blockIdx.z) * args.stages_per_split;
  const int count = split_stage_count(args, kt_begin);
  const float table_lane = __ldg(args.table + (lane & 15));

  // Rows g and g + 8 of the warp's 16 (warp group warp / 4 owns rows 64 * (warp / 4) ..).
  const int local_row[2] = {warp * 16 + g, warp * 16 + g + 8};
  int64_t w_row[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t j = n0 + local_row[h];
    w_row[h] = j < args.N ? j : args.N - 1;
  }

  float acc[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) acc[i] = 0.0f;

  // The weight fragment of one stage: step s uses bytes 8s .. 8s + 7 of a row; the lane's k-slots
  // (2q, 2q + 1) are byte 8s + q, slots (2q + 8, 2q + 9) byte 8s + 4 + q.
  auto dequantize_stage = [&](int it, uint32_t (&a)[4][4]) {
    const uint8_t* w_tile = smem + (it % kStages) * T::kStageBytes + T::kABytes;
    float scale[2];
    uint4 codes[2][2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      scale[h] =
          stage_scale<kNested, kWgmmaRows>(args, w_tile + T::kWBytes, local_row[h], w_row[h], kt_begin + it);
      codes[h][0] = *reinterpret_cast<const uint4*>(w_tile + local_row[h] * 32);
      codes[h][1] = *reinterpret_cast<const uint4*>(w_tile + local_row[h] * 32 + 16);
    }
#pragma unroll
    for (int step = 0; step < 4; ++step) {
      const uint4& c0 = codes[0][step >> 1];
      const uint4& c1 = codes[1][step >> 1];
      const uint32_t lo0 = (step & 1) ? c0.z : c0.x, hi0 = (step & 1) ? c0.w : c0.y;
      const uint32_t lo1 = (step & 1) ? c1.z : c1.x, hi1 = (step & 1) ? c1.w : c1.y;
      a[step][0] = dequantize_byte<kDType>(table_lane, lo0, q, scale[0]);
      a[step][1] = dequantize_byte<kDType>(table_lane, lo1, q, scale[1]);
      a[step][2] = dequantize_byte<kDType>(table_lane, hi0, q, scale[0]);
      a[step][3] = dequantize_byte<kDType>(table_lane, hi1, q, scale[1]);
    }
  };

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < count) load_stage<128, kNested, kWgmmaRows>(args, smem, s, kt_begin + s, n0, m0);
    copy_commit();
  }
  copy_wait<kStages - 2>();                                     // stage 0
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // cp.async data -> the tensor cores' reads
  __syncthreads();
  uint32_t a[4][4];
  if (count > 0) dequantize_stage(0, a);
  // Per stage: issue its 4 wgmma, dequantize the next stage while they run, then wait. Slot it % kStages
  // is refilled only after every warp group's wgmma on it finished (the barrier at the end).
  for (int it = 0; it < count; ++it) {
    {
      const int ahead = it + kStages - 1;
      if (ahead < count)
        load_stage<128, kNested, kWgmmaRows>(args, smem, ahead % kStages, kt_begin + ahead, n0, m0);
      copy_commit();
    }
    const uint64_t desc = swizzled_tile_descriptor(smem_address(smem + (it % kStages) * T::kStageBytes));
    fence_registers(acc);
    asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#pragma unroll
    for (int step = 0; step < 4; ++step) wgmma_m64n128k16<kDType>(acc, a[step], desc + 2 * step);
    asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
    copy_wait<kStages - 2>();  // stage it + 1
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    __syncthreads();
    uint32_t next[4][4];
    if (it + 1 < count) dequantize_stage(it + 1, next);
    asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
    fence_registers(acc);
    fence_registers(a);  // the registers the wgmma read stay untouched until it finished
    __syncthreads();
#pragma unroll
    for (int step = 0; step < 4; ++step) {
#pragma unroll
      for (int r = 0; r < 4; ++r) a[step][r] = next[step][r];
    }
  }
  copy_wait<0>();
  __syncthreads();

  // acc[4j + i]: W row warp*16 + g + 8(i/2), A row 8j + 2q + (i%2).
  float* staged = reinterpret_cast<float*>(smem);
#pragma unroll
  for (int j = 0; j < 16; ++j) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      staged[(8 * j + 2 * q + (i & 1)) * T::kEpiStride + warp * 16 + g + 8 * (i >> 1)] = acc[4 * j + i];
    }
  }
  __syncthreads();
  store_tile<kDType, 128, kWgmmaRows>(args, staged, m0, n0);
#endif
}

// ---- host side ------------------------------------------------------------------------------------

cudaError_t sm_count(int& count) { return host::device_attribute<cudaDevAttrMultiProcessorCount>(count); }

// Launches kKernel with kSmem bytes of dynamic shared memory, raising its limit once per device.
template <auto kKernel, int kThreadsPerBlock, int kSmem>
cudaError_t launch_with_shared_memory(const PrefillArgs& args, dim3 grid, cudaStream_t stream) {
  const cudaError_t err = host::allow_dynamic_shared_memory<kKernel, kSmem>();
  if (err != cudaSuccess) return err;
  kKernel<<<grid, kThreadsPerBlock, kSmem, stream>>>(args);
  return cudaGetLastError();
}

template <int kDType, int kBM, bool kNested>
cudaError_t launch_prefill(const PrefillArgs& args, dim3 grid, cudaStream_t stream) {
  return launch_with_shared_memory<gemm_4bit_prefill_kernel<kDType, kBM, kNested>, kThreads,
                                   Tile<kBM>::kSmem>(args, grid, stream);
}

template <int kDType, bool kNested>
cudaError_t launch_prefill_wgmma(const PrefillArgs& args, dim3 grid, cudaStream_t stream) {
  // + 1024: the kernel aligns its tiles to 1024 bytes
  return launch_with_shared_memory<gemm_4bit_prefill_wgmma_kernel<kDType, kNested>, 2 * kWgmmaRows,
                                   Tile<128, kWgmmaRows>::kSmem + 1024>(args, grid, stream);
}

template <int kDType>
cudaError_t launch_prefill_wgmma(const PrefillArgs& args, bool nested, dim3 grid, cudaStream_t stream) {
  return nested ? launch_prefill_wgmma<kDType, true>(args, grid, stream)
                : launch_prefill_wgmma<kDType, false>(args, grid, stream);
}

template <int kDType, int kBM>
cudaError_t launch_prefill(const PrefillArgs& args, bool nested, dim3 grid, cudaStream_t stream) {
  return nested ? launch_prefill<kDType, kBM, true>(args, grid, stream)
                : launch_prefill<kDType, kBM, false>(args, grid, stream);
}

template <int kDType>
cudaError_t launch_prefill(const PrefillArgs& args, int bm, bool nested, dim3 grid, cudaStream_t stream) {
  switch (bm) {
    case 16:
      return launch_prefill<kDType, 16>(args, nested, grid, stream);
    case 32:
      return launch_prefill<kDType, 32>(args, nested, grid, stream);
    case 64:
      return launch_prefill<kDType, 64>(args, nested, grid, stream);
    case 128:
      return launch_prefill<kDType, 128>(args, nested, grid, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

bool gemm_4bit_prefill_supported(DType dtype, int64_t M, int64_t N, int64_t K, int64_t lda, const void* A,
                                 const uint8_t* packed, int64_t blocksize, const uint8_t* absmax_codes) {
  return reinterpret_cast<uintptr_t>(absmax_codes) % 4 == 0 && dtype != DType::kFloat32 && M > 0 &&
         M <= int64_t{65535} * 128 && N > 0 && N % 8 == 0 && K > 0 && K % kBK == 0 && blocksize >= 64 &&
         is_valid_blocksize(blocksize) && lda >= K && (lda * 2) % 16 == 0 &&
         reinterpret_cast<uintptr_t>(A) % 16 == 0 && reinterpret_cast<uintptr_t>(packed) % 16 == 0;
}

bool gemm_4bit_prefill_has_wgmma() {
#if defined(HALFBYTE_HAS_SM90A)
  int major = 0, minor = 0;
  return host::device_attribute<cudaDevAttrComputeCapabilityMajor>(major) == cudaSuccess &&
         host::device_attribute<cudaDevAttrComputeCapabilityMinor>(minor) == cudaSuccess && major == 9 &&
         minor == 0;
#else
  return false;
#endif
}

cudaError_t gemm_4bit_prefill_plan(int64_t M, int64_t N, int64_t K, bool wgmma, PrefillPlan* plan) {
  if (plan == nullptr || M <= 0 || N <= 0 || K <= 0 || K % kBK != 0) return cudaErrorInvalidValue;
  int sms = 0;
  const cudaError_t err = sm_count(sms);
  if (err != cudaSuccess) return err;
  plan->wgmma = wgmma && gemm_4bit_prefill_has_wgmma();
  plan->rows_per_block = plan->wgmma ? 128 : M <= 16 ? 16 : M <= 32 ? 32 : M <= 64 ? 64 : 128;
  const int64_t w_rows = plan->wgmma ? kWgmmaRows : kBN;
  const int64_t tiles = ((N + w_rows - 1) / w_rows) * ((M + plan->rows_per_block - 1) / plan->rows_per_block);
  const int64_t k_stages = K / kBK;
  // Split K until about two blocks per SM (one for wgmma) are busy, keeping at least 4 stages per split.
  const int64_t want = (plan->wgmma && kWgmmaRows > 128 ? 1 : 2) * static_cast<int64_t>(sms);
  int64_t splits = tiles >= want ? 1 : (want + tiles - 1) / tiles;
  const int64_t max_splits = k_stages / 4 > 1 ? k_stages / 4 : 1;
  if (splits > max_splits) splits = max_splits;
  if (splits > 32) splits = 32;
  set_prefill_splits(*plan, k_stages, splits, M, N);
  return cudaSuccess;
}

cudaError_t gemm_4bit_prefill(const void* A, DType dtype, int64_t M, int64_t K, int64_t lda,
                              const uint8_t* packed, BlockScales scales, const float* table, int64_t N,
                              int64_t blocksize, const void* bias, void* out, const PrefillPlan& plan,
                              float* workspace, cudaStream_t stream) {
  if (!gemm_4bit_prefill_supported(dtype, M, N, K, lda, A, packed, blocksize, scales.absmax_codes) ||
      out == nullptr || table == nullptr || plan.splits < 1 || plan.stages_per_split < 1 ||
      (plan.splits > 1 && workspace == nullptr)) {
    return cudaErrorInvalidValue;
  }
  const bool nested = scales.absmax == nullptr;
  if (nested &&
      (scales.absmax_codes == nullptr || scales.nested_absmax == nullptr || scales.nested_code == nullptr ||
       scales.offset == nullptr || reinterpret_cast<uintptr_t>(scales.absmax_codes) % 4 != 0)) {
    return cudaErrorInvalidValue;
  }
  PrefillArgs args;
  args.A = A;
  args.lda = lda;
  args.M = static_cast<int>(M);
  args.K = K;
  args.N = N;
  args.packed = packed;
  args.scales = scales;
  args.table = table;
  args.log2_blocksize = host::log2_of(blocksize);
  args.blocks = (N * K + blocksize - 1) / blocksize;
  args.bias = bias;
  args.out = out;
  args.partial = workspace;
  args.stages_per_split = plan.stages_per_split;
  const int64_t m_tiles = (M + plan.rows_per_block - 1) / plan.rows_per_block;
  if (m_tiles > 65535 || plan.splits > 65535) return cudaErrorInvalidValue;
  const int64_t w_rows = plan.wgmma ? kWgmmaRows : kBN;
  const dim3 grid(static_cast<unsigned>((N + w_rows - 1) / w_rows), static_cast<unsigned>(m_tiles),
                  static_cast<unsigned>(plan.splits));
  cudaError_t err;
  if (plan.wgmma) {
    if (!gemm_4bit_prefill_has_wgmma() || plan.rows_per_block != 128) return cudaErrorInvalidValue;
    err = dtype == DType::kBFloat16 ? launch_prefill_wgmma<kBF16>(args, nested, grid, stream)
                                    : launch_prefill_wgmma<kF16>(args, nested, grid, stream);
  } else {
    err = dtype == DType::kBFloat16 ? launch_prefill<kBF16>(args, plan.rows_per_block, nested, grid, stream)
                                    : launch_prefill<kF16>(args, plan.rows_per_block, nested, grid, stream);
  }
  if (err != cudaSuccess || plan.splits == 1) return err;
  return prefill_output::launch_reduce(dtype, workspace, plan.splits, M, N, bias, out, stream);
}

}  // namespace halfbyte::cuda
