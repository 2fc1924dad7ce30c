// gemm_4bit on sm_90a for batches above the decode sizes: out[m, j] = sum_k A[m, k] * W[j, k] (+ bias[j]),
// W the [N, K] 4-bit weight dequantized in registers and fed to wgmma, float32 accumulation. A
// warp-specialized Hopper GEMM on the pipeline of int8_scaled_mm.cu (tma_pipeline.cuh).
//
// Layout read: W exactly as quantize_4bit writes it (row-major codes, two per byte, first element in the high
// nibble; one scale per block of `blocksize` consecutive elements of the flat N*K array, plain float32 or
// double-quantized, read directly). No repacked copy of the weight exists.
//
// Algorithm. out^T = W A^T per block: 128 rows of W (two consumer warp groups of 64 rows, the wgmma M side)
// by kRowsA = 64, 128 or 256 rows of A (the wgmma N side). K advances in stages of 64 elements through a ring
// of shared-memory slots; per slot: the A tile (kRowsA rows x 128 bytes, 128-byte swizzled by TMA: the layout
// the wgmma descriptor reads), the W tile (128 rows x 32 bytes of codes, by TMA), and the rows' scales (4
// bytes per row: the float32 absmax, or the 4-byte word holding the 8-bit code; + 4 bytes of nested absmax),
// copied by the 32 lanes of the producer warp with cp.async, which arrive on the slot's "full" mbarrier when
// their copies land. Each consumer thread arrives on the slot's "empty" mbarrier once the wgmma that read it
// finished. Consumers: lane (g = lane / 4, q = lane % 4) of warp w owns rows 16 (w % 4) + g and + 8 of its
// group's 64; per stage it loads those rows' 32 bytes and dequantizes byte q of each 4-byte word (the wgmma
// register fragment's k-slots 2q, 2q + 1 of step s are code byte 8s + q, slots 2q + 8, 2q + 9 byte 8s + 4 +
// q): a rotate and a lop3 turn the byte into its address in a float32 pair table in static shared memory
// (both levels of the byte, 16 lane columns: a half warp's 8-byte loads never share a bank), two float32
// products with the row's scale are rounded to A's dtype: the values dequantize_4bit writes. So the result is
// dequantize + matmul up to the order of the float32 sums. Stage it + 1's fragment is built while stage it's
// wgmma run, and no block barrier is met inside the K loop (the two consumer warp groups keep the tensor
// cores busy in each other's gaps). Split K (few tiles for the SMs): grid z splits the stages, each split
// writes float32 partial sums, and prefill_output::gemm_4bit_reduce_kernel adds them in order
// (deterministic). Grid x runs over the tiles of A so that blocks running together share their W tile (read
// from DRAM about once). Epilogue: the accumulators go through shared memory (the drained ring) and leave as
// 16-byte row stores with the bias added and rounded to A's dtype.
//
// Limits: compute capability 9.0 with the 90a build and a driver with cuTensorMapEncodeTiled; float16 or
// bfloat16 A with rows 16-byte aligned (lda * 2 % 16 == 0), K % 64 == 0, blocksize >= 64 (a stage's 64 codes
// of a row share one scale), `packed` 16-byte aligned, nested absmax codes 4-byte aligned, N % 8 == 0,
// M < 2^31, N / 128 < 65536, K < 2^31. The caller (cuda_ops.cpp) sends other shapes elsewhere.
//
// Expected bottleneck: each warp's serial chain per stage (wgmma issue, full-barrier wait, dequantize, wgmma
// wait), not the issue rate: the pair table took the loop from ~265 to ~200 instructions per warp and stage
// but the time only by 6-11%. Cycle stamps (14336 x 4096, one block per SM) put a stage at ~1100 cycles at M
// = 64: ~450 issuing the four wgmma (waiting for the tensor core and the warp group), ~120 on the full
// barrier, ~490 dequantizing and waiting for the wgmma; at M = 256 the wgmma issue alone takes ~960 (tensor-
// and shared-memory-bound). Measured on the H100: 14336 x 4096 at M = 64 40 us, M = 256 59 us (bf16 F.linear
// 48-50 and 53-56 us); dequantize + cuBLAS stays faster above M = 512. Versions, predictions and profiles:
// benchmarks/notes_gemm_4bit_prefill.md.

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "device_attributes.cuh"
#include "gemm_4bit_prefill_output.cuh"
#include "halfbyte/cuda_kernels.h"
#include "tma_pipeline.cuh"
#include "wgmma_register_a.cuh"
#include "wgmma_tiles.cuh"

namespace halfbyte::cuda {
// A named namespace (not an anonymous one): builds for other architectures compile the kernel body away and
// would warn about every helper it uses.
namespace gemm_4bit_prefill_tma_detail {

using prefill_output::kBF16;
using prefill_output::kF16;
using prefill_output::pack2;
using tma_pipeline::barrier_arrive;
using tma_pipeline::barrier_arrive_after_copies;
using tma_pipeline::barrier_arrive_expect;
using tma_pipeline::barrier_init;
using tma_pipeline::barrier_wait;
using tma_pipeline::tma_load_2d;
using wgmma_tiles::fence_registers;
using wgmma_tiles::smem_address;
using wgmma_tiles::swizzled_tile_descriptor;

constexpr int kConsumerThreads = 256;  // two warp groups of consumers (warps 0-7)
constexpr int kConsumerWarps = kConsumerThreads / 32;
static_assert(kConsumerWarps == 8, "two consumer warp groups");
constexpr int kRowsW = 128;                        // rows of W per block
constexpr int kStageK = 64;                        // elements of K per stage
constexpr int kTileWBytes = kRowsW * kStageK / 2;  // codes
constexpr int kScaleBytes = kRowsW * 8;            // per row: absmax or code word; nested absmax
constexpr int kStaticSmem = 256 * 16 * 8 + 1024;   // the kernel's tables: level pairs, nested code

template <int kRowsA>
struct Config {
  static constexpr int kTileABytes = kRowsA * kStageK * 2;                     // 1024-byte multiple
  static constexpr int kStageBytes = kTileABytes + kTileWBytes + kScaleBytes;  // A, W, scales
  static constexpr int kBlocksPerSm = kRowsA == 64 ? 2 : 1;
  // 256-row tiles need 128 accumulators per consumer thread: a whole producer warp group (one working warp)
  // then hands its registers to the consumers (setmaxnreg), since ptxas sizes registers for 4-warp multiples
  // (288 threads would cap every thread at 168). Smaller tiles: one producer warp.
  static constexpr bool kRegisterHandOff = kRowsA == 256;
  static constexpr int kThreads = kConsumerThreads + (kRegisterHandOff ? 128 : 32);
  // Dynamic shared memory per block: the SM's 228 KB shared by the blocks, each of which also holds 1 KB
  // reserved by the system and the static table; at most 227 KB less the static table for one block.
  static constexpr int kShare = 233472 / kBlocksPerSm - 1024 - kStaticSmem;  // this block's part of the SM
  static constexpr int kBudget = kShare < 232448 - kStaticSmem ? kShare : 232448 - kStaticSmem;
  static constexpr int kStages = (kBudget - 1024 - 256) / kStageBytes;
  static constexpr int kAcc = kRowsA / 2;        // float32 accumulators per consumer thread
  static constexpr int kEpiStride = kRowsW + 4;  // floats per staged output row
  static constexpr int kPipeBytes = kStages * kStageBytes;
  static constexpr int kEpiBytes = kRowsA * kEpiStride * 4;
  static constexpr int kBarrierOffset = kPipeBytes > kEpiBytes ? kPipeBytes : kEpiBytes;
  static constexpr int kSmem = kBarrierOffset + 2 * kStages * 8 + 1024;  // + barriers, + alignment
  static_assert(kStages >= 3, "a deep enough ring");
  static_assert(kSmem <= kBudget, "fits the SM");
};

struct TmaPrefillArgs {
  int64_t M;
  int64_t N;
  int64_t K;
  BlockScales scales;
  const float* table;  // 16 levels
  int log2_blocksize;
  int64_t blocks;    // scale blocks of W
  const void* bias;  // nullptr or N elements of A's dtype
  void* out;         // [M, N], A's dtype
  float* partial;    // split K: [splits, M, N] float32
  int stages_per_split;
};

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define HALFBYTE_PREFILL_TMA 1
#endif

// 4-byte global -> shared copy of the first src_bytes (the rest zero).
__device__ __forceinline__ void copy_4(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(dst), "l"(src), "r"(src_bytes)
               : "memory");
}

// Byte q of `word` (rotate = (8 q + 25) % 32) dequantized through the pair table: the table's entry for the
// byte at bits [7, 15) after the rotation, in lane column `column_offset` = 8 * (lane % 16); returns
// {level(high nibble) * scale in the low half, level(low nibble) * scale in the high half}, each product in
// float32 rounded to A's dtype (dequantize_4bit's value).
template <int kDType>
__device__ __forceinline__ uint32_t dequantize_byte(const uint8_t* pair_table, uint32_t word, uint32_t rotate,
                                                    uint32_t column_offset, float scale) {
  uint32_t at;  // (rotated & 0x7f80) | column_offset in one lop3 (left to itself, ptxas splits it in two)
  asm("lop3.b32 %0, %1, 0x7f80, %2, 0xea;"
      : "=r"(at)
      : "r"(__funnelshift_r(word, word, rotate)), "r"(column_offset));
  const float2 levels = *reinterpret_cast<const float2*>(pair_table + at);
  return pack2<kDType>(multiply_like_cuda(levels.x, scale), multiply_like_cuda(levels.y, scale));
}

template <int kDType, int kRowsA, bool kNested>
__global__ void __launch_bounds__(Config<kRowsA>::kThreads, Config<kRowsA>::kBlocksPerSm)
    gemm_4bit_prefill_tma_kernel(const __grid_constant__ CUtensorMap map_a,
                                 const __grid_constant__ CUtensorMap map_w, const TmaPrefillArgs args) {
  using C = Config<kRowsA>;
#if defined(HALFBYTE_PREFILL_TMA)
  // The pair table: for code byte b, lane column c (= lane % 16) at byte 128 b + 8 c, the float32 levels of
  // the byte's high and low nibble. A warp's 8-byte loads are served per half warp, whose 16 lanes read 16
  // different columns: no bank conflicts whatever the bytes. Static, so that its address is an immediate.
  __shared__ float2 pair_levels[256 * 16];
  __shared__ float nested_code[256];
  extern __shared__ __align__(16) uint8_t smem_raw[];
  const uint8_t* pair_table = reinterpret_cast<const uint8_t*>(pair_levels);
  // The ring, 1024-byte aligned by pointer arithmetic on the shared array (a round trip through an integer
  // would turn every shared-memory load into a generic one)
  uint8_t* smem = smem_raw + ((1024u - (smem_address(smem_raw) & 1023u)) & 1023u);
  const uint32_t full_bar = smem_address(smem + C::kBarrierOffset);  // kStages x 8 bytes
  const uint32_t empty_bar = full_bar + 8 * C::kStages;
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kRowsA;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kRowsW;
  const int64_t k_stages = args.K / kStageK;
  const int64_t kt_begin = static_cast<int64_t>(blockIdx.z) * args.stages_per_split;
  int64_t kt_end = kt_begin + args.stages_per_split;
  if (kt_end > k_stages) kt_end = k_stages;
  const int count = kt_begin < kt_end ? static_cast<int>(kt_end - kt_begin) : 0;

  for (int i = tid; i < 256 * 16; i += C::kThreads) {
    pair_levels[i] = make_float2(__ldg(args.table + (i >> 8)), __ldg(args.table + ((i >> 4) & 15)));
  }
  if constexpr (kNested) {
    for (int i = tid; i < 256; i += C::kThreads) nested_code[i] = __ldg(args.scales.nested_code + i);
  }
  if (tid == 0) {
#pragma unroll 1
    for (int s = 0; s < C::kStages; ++s) {
      barrier_init(full_bar + 8 * s, 1 + 32);  // the TMA arrival + one per producer lane's scale copies
      barrier_init(empty_bar + 8 * s, kConsumerThreads);  // every consumer thread releases its own reads
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  if (warp >= kConsumerWarps) {  // the producer warp (warp 8; in a producer warp group warps 9-11 leave)
    if constexpr (C::kRegisterHandOff) asm volatile("setmaxnreg.dec.sync.aligned.u32 40;" ::: "memory");
    if (warp != kConsumerWarps) return;
    if (lane == 0) {
      asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(&map_a)) : "memory");
      asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(&map_w)) : "memory");
    }
    // Rows lane, lane + 32, lane + 64, lane + 96 of the W tile (clamped to N - 1: their output is dropped).
    int64_t row_element[4];
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      int64_t j = n0 + lane + 32 * r;
      if (j >= args.N) j = args.N - 1;
      row_element[r] = j * args.K;
    }
    for (int it = 0; it < count; ++it) {
      const int slot = it % C::kStages;
      const int use = it / C::kStages;
      if (use > 0) barrier_wait(empty_bar + 8 * slot, (use - 1) & 1);  // the slot's last readers are done
      const uint32_t full = full_bar + 8 * slot;
      const uint32_t tile = smem_address(smem + slot * C::kStageBytes);
      const int64_t k = (kt_begin + it) * kStageK;
      if (lane == 0) {
        barrier_arrive_expect(full, C::kTileABytes + kTileWBytes);
        tma_load_2d(tile, &map_a, static_cast<int>(k), static_cast<int>(m0), full);
        tma_load_2d(tile + C::kTileABytes, &map_w, static_cast<int>(k / 2), static_cast<int>(n0), full);
      }
      const uint32_t scale_tile = tile + C::kTileABytes + kTileWBytes;
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int row = lane + 32 * r;
        const int64_t b = (row_element[r] + k) >> args.log2_blocksize;
        if constexpr (!kNested) {
          copy_4(scale_tile + 4 * row, args.scales.absmax + b, 4);
        } else {
          // The array's last word may be partial: its rows read their code from global memory instead.
          const int64_t word = b & ~int64_t{3};
          if (word + 4 <= args.blocks) copy_4(scale_tile + 4 * row, args.scales.absmax_codes + word, 4);
          copy_4(scale_tile + 4 * kRowsW + 4 * row, args.scales.nested_absmax + (b >> 8), 4);
        }
      }
      barrier_arrive_after_copies(full);
    }
    asm volatile("cp.async.wait_all;" ::: "memory");  // no copy outlives the warp that issued it
    return;
  }

  // Consumers.
  if constexpr (C::kRegisterHandOff) asm volatile("setmaxnreg.inc.sync.aligned.u32 232;" ::: "memory");
  const int group = warp >> 2;
  const int g = lane >> 2;
  const int q = lane & 3;
  const int rows[2] = {64 * group + 16 * (warp & 3) + g, 64 * group + 16 * (warp & 3) + g + 8};
  int64_t row_element[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    int64_t j = n0 + rows[h];
    if (j >= args.N) j = args.N - 1;
    row_element[h] = j * args.K;
  }
  const uint32_t rotate = (8u * static_cast<uint32_t>(q) + 25u) & 31u;  // byte q to bits [7, 15)
  const uint32_t column_offset = 8u * static_cast<uint32_t>(lane & 15);
  float offset = 0.0f;
  if constexpr (kNested) offset = __ldg(args.scales.offset);

  float acc[C::kAcc];
#pragma unroll
  for (int i = 0; i < C::kAcc; ++i) acc[i] = 0.0f;

  // The weight fragment of stage `it` (slot `slot`).
  auto dequantize_stage = [&](const uint8_t* slot, int64_t kt, uint32_t (&a)[4][4]) {
    const uint8_t* w_tile = slot + C::kTileABytes;
    const uint8_t* scale_tile = w_tile + kTileWBytes;
    float scale[2];
    uint4 words[2][2];  // the row's 32 bytes of codes
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      words[h][0] = *reinterpret_cast<const uint4*>(w_tile + 32 * rows[h]);
      words[h][1] = *reinterpret_cast<const uint4*>(w_tile + 32 * rows[h] + 16);
      if constexpr (!kNested) {
        scale[h] = reinterpret_cast<const float*>(scale_tile)[rows[h]];
      } else {
        const int64_t b = (row_element[h] + kt * kStageK) >> args.log2_blocksize;
        const uint32_t code =
            (b | 3) < args.blocks
                ? (reinterpret_cast<const uint32_t*>(scale_tile)[rows[h]] >> (8 * static_cast<int>(b & 3))) &
                      0xffu
                : __ldg(args.scales.absmax_codes + b);
        const float nested_absmax = reinterpret_cast<const float*>(scale_tile + 4 * kRowsW)[rows[h]];
        scale[h] = __fadd_rn(multiply_like_cuda(nested_code[code], nested_absmax), offset);
      }
    }
    // Step s: a[s][0] row 0 byte 8s + q (byte q of word 2s), a[s][1] row 1 byte 8s + q, a[s][2] / a[s][3]
    // byte 8s + 4 + q (byte q of word 2s + 1).
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const uint32_t w[8] = {words[h][0].x, words[h][0].y, words[h][0].z, words[h][0].w,
                             words[h][1].x, words[h][1].y, words[h][1].z, words[h][1].w};
#pragma unroll
      for (int step = 0; step < 4; ++step) {
        a[step][h] = dequantize_byte<kDType>(pair_table, w[2 * step], rotate, column_offset, scale[h]);
        a[step][2 + h] =
            dequantize_byte<kDType>(pair_table, w[2 * step + 1], rotate, column_offset, scale[h]);
      }
    }
  };

  // Stage it's wgmma run while stage it + 1's fragment is built in `next`; then the wait for the wgmma (which
  // frees the slot) and `next` moves into `a`. (Building the fragment straight into a second operand buffer
  // while the wgmma run makes ptxas serialize the wgmma: C7513.)
  uint32_t a[4][4], next[4][4];
  if (count > 0) {
    barrier_wait(full_bar, 0);
    dequantize_stage(smem, kt_begin, a);
  }
  for (int it = 0; it < count; ++it) {
    const uint8_t* tile = smem + (it % C::kStages) * C::kStageBytes;
    const uint64_t desc = swizzled_tile_descriptor(smem_address(tile));
    fence_registers(acc);
    fence_registers(a);
    asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#pragma unroll
    for (int s = 0; s < 4; ++s) wgmma_register_a::m64k16<kDType == kBF16, C::kAcc>(acc, a[s], desc + 2 * s);
    asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
    if (it + 1 < count) {
      const int slot = (it + 1) % C::kStages;
      barrier_wait(full_bar + 8 * slot, ((it + 1) / C::kStages) & 1);
      dequantize_stage(smem + slot * C::kStageBytes, kt_begin + it + 1, next);
    }
    asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
    fence_registers(acc);
    fence_registers(a);  // the registers the wgmma read stay untouched until it finished
    barrier_arrive(empty_bar + 8 * (it % C::kStages));
#pragma unroll
    for (int s = 0; s < 4; ++s) {
#pragma unroll
      for (int r = 0; r < 4; ++r) a[s][r] = next[s][r];
    }
  }
  // Every consumer is done with the ring (each slot's copies were waited for) before it becomes the output
  // staging area. Named barrier 1 counts the consumers only (the producer warp has returned).
  asm volatile("bar.sync 1, %0;" ::"n"(kConsumerThreads) : "memory");

  // acc[4j + i]: W row 64 group + 16 (warp % 4) + g + 8 (i / 2) of the tile (output column), A row
  // 8j + 2q + (i % 2) (output row).
  float* staged = reinterpret_cast<float*>(smem);
#pragma unroll
  for (int j = 0; j < kRowsA / 8; ++j) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      staged[(8 * j + 2 * q + (i & 1)) * C::kEpiStride + rows[i >> 1]] = acc[4 * j + i];
    }
  }
  asm volatile("bar.sync 1, %0;" ::"n"(kConsumerThreads) : "memory");

  prefill_output::store_staged_tile<kDType, kRowsA, kRowsW, C::kEpiStride, kConsumerThreads>(
      staged, tid, m0, n0, args.M, args.N, args.bias, args.out, args.partial);
#else
  (void)map_a, (void)map_w, (void)args;
#endif
}

template <int kDType, int kRowsA, bool kNested>
cudaError_t launch(const void* A, int64_t lda, const uint8_t* packed, const TmaPrefillArgs& args, dim3 grid,
                   cudaStream_t stream) {
  constexpr int kSmem = Config<kRowsA>::kSmem;
  constexpr auto kernel = gemm_4bit_prefill_tma_kernel<kDType, kRowsA, kNested>;
  cudaError_t err = host::allow_dynamic_shared_memory<kernel, kSmem>();
  if (err != cudaSuccess) return err;
  CUtensorMap map_a, map_w;
  err = tma_pipeline::encode_2d_map(
      map_a, kDType == kBF16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, A, args.M,
      args.K, lda * 2, kStageK, kRowsA, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B);
  if (err == cudaSuccess) {
    err = tma_pipeline::encode_2d_map(map_w, CU_TENSOR_MAP_DATA_TYPE_UINT8, packed, args.N, args.K / 2,
                                      args.K / 2, kStageK / 2, kRowsW, CU_TENSOR_MAP_SWIZZLE_NONE,
                                      CU_TENSOR_MAP_L2_PROMOTION_L2_256B);
  }
  if (err != cudaSuccess) return err;
  kernel<<<grid, Config<kRowsA>::kThreads, kSmem, stream>>>(map_a, map_w, args);
  return cudaGetLastError();
}

template <int kDType, int kRowsA>
cudaError_t launch(const void* A, int64_t lda, const uint8_t* packed, const TmaPrefillArgs& args, bool nested,
                   dim3 grid, cudaStream_t stream) {
  return nested ? launch<kDType, kRowsA, true>(A, lda, packed, args, grid, stream)
                : launch<kDType, kRowsA, false>(A, lda, packed, args, grid, stream);
}

template <int kDType>
cudaError_t launch(const void* A, int64_t lda, const uint8_t* packed, const TmaPrefillArgs& args, bool nested,
                   int rows_a, dim3 grid, cudaStream_t stream) {
  switch (rows_a) {
    case 64:
      return launch<kDType, 64>(A, lda, packed, args, nested, grid, stream);
    case 128:
      return launch<kDType, 128>(A, lda, packed, args, nested, grid, stream);
    case 256:
      return launch<kDType, 256>(A, lda, packed, args, nested, grid, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace gemm_4bit_prefill_tma_detail

using namespace gemm_4bit_prefill_tma_detail;

bool gemm_4bit_prefill_tma_supported(DType dtype, int64_t M, int64_t N, int64_t K, int64_t lda, const void* A,
                                     const uint8_t* packed, int64_t blocksize, const uint8_t* absmax_codes) {
#if defined(HALFBYTE_HAS_SM90A)
  if (!gemm_4bit_prefill_supported(dtype, M, N, K, lda, A, packed, blocksize, absmax_codes) ||
      M >= (int64_t{1} << 31) || (N + kRowsW - 1) / kRowsW > 65535 || K >= (int64_t{1} << 31)) {
    return false;
  }
  int major = 0, minor = 0;
  tma_pipeline::EncodeTiled encode = nullptr;  // a driver without the TMA map encoder: another path
  return host::device_attribute<cudaDevAttrComputeCapabilityMajor>(major) == cudaSuccess &&
         host::device_attribute<cudaDevAttrComputeCapabilityMinor>(minor) == cudaSuccess && major == 9 &&
         minor == 0 && tma_pipeline::encode_tiled_function(encode) == cudaSuccess;
#else
  (void)dtype, (void)M, (void)N, (void)K, (void)lda, (void)A, (void)packed, (void)blocksize,
      (void)absmax_codes;
  return false;
#endif
}

cudaError_t gemm_4bit_prefill_tma_plan(int64_t M, int64_t N, int64_t K, PrefillPlan* plan) {
  if (plan == nullptr || M <= 0 || N <= 0 || K <= 0 || K % kStageK != 0) return cudaErrorInvalidValue;
  int sms = 0;
  const cudaError_t err = host::device_attribute<cudaDevAttrMultiProcessorCount>(sms);
  if (err != cudaSuccess) return err;
  plan->wgmma = true;
  const int64_t w_tiles = (N + kRowsW - 1) / kRowsW;
  // Rules measured on the H100 (benchmarks/notes_gemm_4bit_prefill.md, forced-plan sweep). Rows of A per
  // tile: the smallest of 64 / 128 / 256 that covers M, 256 above. Each block's dequantize work is fixed by
  // its 128 rows of W, so taller tiles of A cost little (4096x4096: 0.67, 0.76, 0.91 us per stage for 64,
  // 128, 256).
  const int rows_a = M <= 64 ? 64 : M <= 128 ? 128 : 256;
  plan->rows_per_block = rows_a;
  const int64_t tiles = w_tiles * ((M + rows_a - 1) / rows_a);
  const int64_t k_stages = K / kStageK;
  // Split K when the tiles leave more than half the SMs idle, into about one block per SM (a second block per
  // SM or a partial wave measured slower), keeping >= 8 stages per split.
  int64_t splits = 2 * tiles >= sms ? 1 : sms / tiles;
  const int64_t max_splits = k_stages / 8 > 1 ? k_stages / 8 : 1;
  if (splits > max_splits) splits = max_splits;
  if (splits > 16) splits = 16;
  set_prefill_splits(*plan, k_stages, splits, M, N);
  return cudaSuccess;
}

cudaError_t gemm_4bit_prefill_tma(const void* A, DType dtype, int64_t M, int64_t K, int64_t lda,
                                  const uint8_t* packed, BlockScales scales, const float* table, int64_t N,
                                  int64_t blocksize, const void* bias, void* out, const PrefillPlan& plan,
                                  float* workspace, cudaStream_t stream) {
  if (!gemm_4bit_prefill_tma_supported(dtype, M, N, K, lda, A, packed, blocksize, scales.absmax_codes) ||
      out == nullptr || table == nullptr || plan.splits < 1 || plan.splits > 65535 ||
      plan.stages_per_split < 1 || (plan.splits > 1 && workspace == nullptr) ||
      (plan.rows_per_block != 64 && plan.rows_per_block != 128 && plan.rows_per_block != 256)) {
    return cudaErrorInvalidValue;
  }
  const bool nested = scales.absmax == nullptr;
  if (nested && (scales.absmax_codes == nullptr || scales.nested_absmax == nullptr ||
                 scales.nested_code == nullptr || scales.offset == nullptr)) {
    return cudaErrorInvalidValue;
  }
  const TmaPrefillArgs args{M,
                            N,
                            K,
                            scales,
                            table,
                            host::log2_of(blocksize),
                            (N * K + blocksize - 1) / blocksize,
                            bias,
                            out,
                            workspace,
                            plan.stages_per_split};
  const int64_t m_tiles = (M + plan.rows_per_block - 1) / plan.rows_per_block;
  const dim3 grid(static_cast<unsigned>(m_tiles), static_cast<unsigned>((N + kRowsW - 1) / kRowsW),
                  static_cast<unsigned>(plan.splits));
  const cudaError_t err = dtype == DType::kBFloat16
                              ? launch<kBF16>(A, lda, packed, args, nested, plan.rows_per_block, grid, stream)
                              : launch<kF16>(A, lda, packed, args, nested, plan.rows_per_block, grid, stream);
  if (err != cudaSuccess || plan.splits == 1) return err;
  return prefill_output::launch_reduce(dtype, workspace, plan.splits, M, N, bias, out, stream);
}

}  // namespace halfbyte::cuda
