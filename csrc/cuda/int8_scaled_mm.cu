// int8_scaled_mm fused on sm_90a: out[m, n] = int8_mm_dequant_value(sum_k A[m, k] * B[n, k], row_stats[m],
// col_stats[n], bias[n]) in one kernel, A the int8 activations [M, K], B the int8 weight [N, K] (both
// row-major, contiguous), the int32 sum exact (wrapping past 2^31 like cuBLAS), the dequantization the
// element rule of int8_kernels.h. So the result is bit-identical to int8_linear_matmul + int8_mm_dequant,
// without the [M, N] int32 matrix making a round trip through memory (4 bytes written and read per output,
// which at M = 256..2048 costs as much as a third of the matmul).
//
// Algorithm: a warp-specialized Hopper GEMM. wgmma.mma_async m64n128k32 (or m64n256k32 when M > 128)
// s32.s8.s8, both operands read by the tensor cores from shared memory. A block owns 128 rows of B (two
// consumer warp groups, 64 rows each: the instruction's M side) and 128 or 256 rows of A (its N side), so
// it computes the transposed tile out^T = B A^T in int32 registers (64 or 128 per thread). K advances in
// stages of 128 bytes through a ring of 4-6 slots in shared memory, filled by one producer warp with TMA
// bulk tensor copies (cuTensorMapEncodeTiled maps of A and B, 128-byte swizzle, zero fill past the ends of
// M, N and K); per slot a "full" mbarrier (the copies' transaction bytes) and an "empty" one (one arrival
// per consumer warp once the wgmma that read the slot has finished: wait_group 1 keeps one stage's group in
// flight). The consumers issue no copies and meet at no block barrier inside the K loop.
// Split K: when there are few tiles for the SMs, grid z splits the stages and each split writes its int32
// sums to a workspace; int8_scaled_mm_reduce_kernel adds them (exact, modulo 2^32) and dequantizes.
// Epilogue: the accumulators go through shared memory (the drained ring) and leave as runs of 8 outputs
// (16- or 32-byte stores).
//
// Limits: compute capability 9.0 with the 90a build and a driver that hands out cuTensorMapEncodeTiled
// (int8_scaled_mm_supported), K % 16 == 0 (the TMA row stride), N % 8 == 0, A, B and out 16-byte aligned,
// M <= 65535 * 128, N and K < 2^31. Other shapes and devices take int8_linear_matmul + int8_mm_dequant
// (csrc/torch/int8_cuda_ops.cpp).
//
// Expected bottleneck: the tensor pipe for large M (8 MOP of int8 work per 48 KB stage with 256 rows of A:
// 1024 cycles at the SM's int8 peak, so the L2 must deliver ~48 B per cycle per SM), the weight stream
// for M up to a few hundred. Measurements: benchmarks/notes_int8.md.

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "device_attributes.cuh"
#include "halfbyte/int8_cuda_kernels.h"
#include "int8_output_elements.cuh"
#include "tma_pipeline.cuh"
#include "wgmma_tiles.cuh"

namespace halfbyte::cuda {
// A named namespace (not an anonymous one): builds for other architectures compile the kernel body away,
// and would warn about every helper it uses.
namespace int8_scaled_mm_detail {

constexpr int kConsumerThreads = 256;            // two warp groups of consumers (warps 0-7)
constexpr int kThreads = kConsumerThreads + 32;  // + one producer warp (warp 8)
constexpr int kConsumerWarps = kConsumerThreads / 32;
static_assert(kConsumerWarps == 8, "two consumer warp groups");
constexpr int kRowsB = 128;   // rows of B per block (64 per warp group: the instruction's M side)
constexpr int kStageK = 128;  // bytes (int8 elements) of K per stage: one 128-byte swizzle row
constexpr int kTileBBytes = kRowsB * kStageK;

// kRowsA rows of A per block (the instruction's N side: 128, or 256 for large M, which halves the re-reads
// of B from L2).
template <int kRowsA>
struct Config {
  static constexpr int kTileABytes = kRowsA * kStageK;
  static constexpr int kStageBytes = kTileBBytes + kTileABytes;  // B tile, then A tile
  static constexpr int kStages = kRowsA == 128 ? 6 : 4;          // 192 KB of ring
  static constexpr int kAcc = kRowsA / 2;                        // int32 accumulators per thread
  static constexpr int kEpiStride = kRowsB + 4;                  // int32 per staged row of the output tile
  static constexpr int kPipeBytes = kStages * kStageBytes;
  static constexpr int kEpiBytes = kRowsA * kEpiStride * 4;
  static constexpr int kBarrierOffset = kPipeBytes > kEpiBytes ? kPipeBytes : kEpiBytes;
  static constexpr int kSmem = kBarrierOffset + 2 * kStages * 8 + 1024;  // + barriers, + alignment
  static_assert(kStages >= 2, "wait_group 1 keeps one slot in use beyond the one computed");
};

struct ScaledMmArgs {
  int64_t M;
  int64_t N;
  int64_t K;
  const float* row_stats;  // M
  const float* col_stats;  // N
  const void* bias;        // nullptr or N of bias_dtype
  DType bias_dtype;
  void* out;         // [M, N] of the kernel's output type
  int32_t* partial;  // split K: [splits, M, N]
  int stages_per_split;
};

using wgmma_tiles::smem_address;

using tma_pipeline::barrier_arrive;
using tma_pipeline::barrier_arrive_expect;
using tma_pipeline::barrier_init;
using tma_pipeline::barrier_wait;
using tma_pipeline::encode_tiled_function;
using tma_pipeline::EncodeTiled;
using tma_pipeline::tma_load_2d;
using wgmma_tiles::swizzled_tile_descriptor;

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define HALFBYTE_INT8_WGMMA 1
#endif

// d[64] += B(64 x 32, descriptor b) x A^T(32 x 128, descriptor a), int32.
__device__ __forceinline__ void wgmma_m64n128k32_s8(int32_t (&d)[64], uint64_t b, uint64_t a) {
#if defined(HALFBYTE_INT8_WGMMA)
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\nwgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, "
      "%21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, "
      "%41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, "
      "%61, %62, %63}, %64, %65, p;\n}"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]),
        "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]),
        "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]),
        "+r"(d[23]), "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]),
        "+r"(d[30]), "+r"(d[31]), "+r"(d[32]), "+r"(d[33]), "+r"(d[34]), "+r"(d[35]), "+r"(d[36]),
        "+r"(d[37]), "+r"(d[38]), "+r"(d[39]), "+r"(d[40]), "+r"(d[41]), "+r"(d[42]), "+r"(d[43]),
        "+r"(d[44]), "+r"(d[45]), "+r"(d[46]), "+r"(d[47]), "+r"(d[48]), "+r"(d[49]), "+r"(d[50]),
        "+r"(d[51]), "+r"(d[52]), "+r"(d[53]), "+r"(d[54]), "+r"(d[55]), "+r"(d[56]), "+r"(d[57]),
        "+r"(d[58]), "+r"(d[59]), "+r"(d[60]), "+r"(d[61]), "+r"(d[62]), "+r"(d[63])
      : "l"(b), "l"(a), "r"(1));
#endif
}

// d[128] += B(64 x 32, descriptor b) x A^T(32 x 256, descriptor a), int32.
__device__ __forceinline__ void wgmma_m64n256k32_s8(int32_t (&d)[128], uint64_t b, uint64_t a) {
#if defined(HALFBYTE_INT8_WGMMA)
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\nwgmma.mma_async.sync.aligned.m64n256k32.s32.s8.s8 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, "
      "%22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, "
      "%42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, "
      "%62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, "
      "%82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, "
      "%102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, "
      "%119, %120, %121, %122, %123, %124, %125, %126, %127}, %128, %129, p;\n}"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]),
        "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]),
        "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]),
        "+r"(d[23]), "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]),
        "+r"(d[30]), "+r"(d[31]), "+r"(d[32]), "+r"(d[33]), "+r"(d[34]), "+r"(d[35]), "+r"(d[36]),
        "+r"(d[37]), "+r"(d[38]), "+r"(d[39]), "+r"(d[40]), "+r"(d[41]), "+r"(d[42]), "+r"(d[43]),
        "+r"(d[44]), "+r"(d[45]), "+r"(d[46]), "+r"(d[47]), "+r"(d[48]), "+r"(d[49]), "+r"(d[50]),
        "+r"(d[51]), "+r"(d[52]), "+r"(d[53]), "+r"(d[54]), "+r"(d[55]), "+r"(d[56]), "+r"(d[57]),
        "+r"(d[58]), "+r"(d[59]), "+r"(d[60]), "+r"(d[61]), "+r"(d[62]), "+r"(d[63]), "+r"(d[64]),
        "+r"(d[65]), "+r"(d[66]), "+r"(d[67]), "+r"(d[68]), "+r"(d[69]), "+r"(d[70]), "+r"(d[71]),
        "+r"(d[72]), "+r"(d[73]), "+r"(d[74]), "+r"(d[75]), "+r"(d[76]), "+r"(d[77]), "+r"(d[78]),
        "+r"(d[79]), "+r"(d[80]), "+r"(d[81]), "+r"(d[82]), "+r"(d[83]), "+r"(d[84]), "+r"(d[85]),
        "+r"(d[86]), "+r"(d[87]), "+r"(d[88]), "+r"(d[89]), "+r"(d[90]), "+r"(d[91]), "+r"(d[92]),
        "+r"(d[93]), "+r"(d[94]), "+r"(d[95]), "+r"(d[96]), "+r"(d[97]), "+r"(d[98]), "+r"(d[99]),
        "+r"(d[100]), "+r"(d[101]), "+r"(d[102]), "+r"(d[103]), "+r"(d[104]), "+r"(d[105]), "+r"(d[106]),
        "+r"(d[107]), "+r"(d[108]), "+r"(d[109]), "+r"(d[110]), "+r"(d[111]), "+r"(d[112]), "+r"(d[113]),
        "+r"(d[114]), "+r"(d[115]), "+r"(d[116]), "+r"(d[117]), "+r"(d[118]), "+r"(d[119]), "+r"(d[120]),
        "+r"(d[121]), "+r"(d[122]), "+r"(d[123]), "+r"(d[124]), "+r"(d[125]), "+r"(d[126]), "+r"(d[127])
      : "l"(b), "l"(a), "r"(1));
#endif
}

using wgmma_tiles::fence_registers;

using int8_output::bias_at;
using int8_output::bits16;

// Dequantizes 8 sums of row m, columns n .. n + 7, and stores them to out (16-byte aligned run).
template <typename Out>
__device__ __forceinline__ void store_run(const ScaledMmArgs& args, int64_t m, int64_t n,
                                          const int32_t (&acc)[8]) {
  const float row_stat = __ldg(args.row_stats + m);
  float v[8];
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    v[e] = int8_mm_dequant_value(acc[e], row_stat, __ldg(args.col_stats + n + e),
                                 bias_at(args.bias, args.bias_dtype, n + e));
  }
  if constexpr (sizeof(Out) == 4) {
    float4* dst = reinterpret_cast<float4*>(static_cast<float*>(args.out) + m * args.N + n);
    dst[0] = make_float4(v[0], v[1], v[2], v[3]);
    dst[1] = make_float4(v[4], v[5], v[6], v[7]);
  } else {
    uint32_t w[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      w[e] = static_cast<uint32_t>(bits16(Out(), v[2 * e])) |
             (static_cast<uint32_t>(bits16(Out(), v[2 * e + 1])) << 16);
    }
    *reinterpret_cast<uint4*>(static_cast<unsigned short*>(args.out) + m * args.N + n) =
        make_uint4(w[0], w[1], w[2], w[3]);
  }
}

template <typename Out, int kRowsA>
__global__ void __launch_bounds__(kThreads, 1)
    int8_scaled_mm_kernel(const __grid_constant__ CUtensorMap map_b,
                          const __grid_constant__ CUtensorMap map_a, const ScaledMmArgs args) {
  using C = Config<kRowsA>;
#if defined(HALFBYTE_INT8_WGMMA)
  extern __shared__ __align__(16) uint8_t smem_raw[];
  uint8_t* smem =
      reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t{1023});
  const uint32_t full_bar = smem_address(smem + C::kBarrierOffset);  // kStages x 8 bytes
  const uint32_t empty_bar = full_bar + 8 * C::kStages;
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kRowsB;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kRowsA;
  const int64_t k_stages = (args.K + kStageK - 1) / kStageK;
  const int64_t kt_begin = static_cast<int64_t>(blockIdx.z) * args.stages_per_split;
  int64_t kt_end = kt_begin + args.stages_per_split;
  if (kt_end > k_stages) kt_end = k_stages;
  const int count = kt_begin < kt_end ? static_cast<int>(kt_end - kt_begin) : 0;

  if (tid == 0) {
#pragma unroll
    for (int s = 0; s < C::kStages; ++s) {
      barrier_init(full_bar + 8 * s, 1);
      barrier_init(empty_bar + 8 * s, kConsumerWarps);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  if (warp == kConsumerWarps) {  // the producer warp: one lane issues every copy
    if (lane == 0) {
      asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(&map_b)) : "memory");
      asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(&map_a)) : "memory");
      for (int it = 0; it < count; ++it) {
        const int slot = it % C::kStages;
        const int use = it / C::kStages;
        if (use > 0) barrier_wait(empty_bar + 8 * slot, (use - 1) & 1);  // the slot's last reader is done
        const uint32_t full = full_bar + 8 * slot;
        barrier_arrive_expect(full, C::kStageBytes);
        const uint32_t tile = smem_address(smem + slot * C::kStageBytes);
        const int k = static_cast<int>((kt_begin + it) * kStageK);
        tma_load_2d(tile, &map_b, k, static_cast<int>(n0), full);
        tma_load_2d(tile + kTileBBytes, &map_a, k, static_cast<int>(m0), full);
      }
    }
    return;
  }

  // Consumers: warp group `group` computes rows 64 * group .. + 63 of the B tile against the whole A tile.
  const int group = warp >> 2;
  const int g = lane >> 2;
  const int q = lane & 3;
  int32_t acc[C::kAcc];
#pragma unroll
  for (int i = 0; i < C::kAcc; ++i) acc[i] = 0;

  for (int it = 0; it < count; ++it) {
    const int slot = it % C::kStages;
    barrier_wait(full_bar + 8 * slot, (it / C::kStages) & 1);  // the slot's copies have landed
    const uint8_t* b_tile = smem + slot * C::kStageBytes;
    const uint64_t b_desc = swizzled_tile_descriptor(smem_address(b_tile + group * 64 * kStageK));
    const uint64_t a_desc = swizzled_tile_descriptor(smem_address(b_tile + kTileBBytes));
    fence_registers(acc);
    asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#pragma unroll
    for (int step = 0; step < kStageK / 32; ++step) {
      if constexpr (kRowsA == 128) {
        wgmma_m64n128k32_s8(acc, b_desc + 2 * step, a_desc + 2 * step);
      } else {
        wgmma_m64n256k32_s8(acc, b_desc + 2 * step, a_desc + 2 * step);
      }
    }
    asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
    asm volatile("wgmma.wait_group.sync.aligned 1;" ::: "memory");  // stage it - 1's group has finished
    fence_registers(acc);
    if (it > 0 && lane == 0) barrier_arrive(empty_bar + 8 * ((it - 1) % C::kStages));
  }
  asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
  fence_registers(acc);
  // Every consumer is done with the ring (all copies landed: each was waited for) before it becomes the
  // output staging area. Named barrier 1 counts the consumers only (the producer warp has returned).
  asm volatile("bar.sync 1, %0;" ::"n"(kConsumerThreads) : "memory");

  // acc[4j + i]: row 64 * group + 16 * (warp % 4) + g + 8 (i / 2) of the B tile (output column), row
  // 8j + 2q + (i % 2) of the A tile (output row).
  int32_t* staged = reinterpret_cast<int32_t*>(smem);
#pragma unroll
  for (int j = 0; j < kRowsA / 8; ++j) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      staged[(8 * j + 2 * q + (i & 1)) * C::kEpiStride + 64 * group + 16 * (warp & 3) + g + 8 * (i >> 1)] =
          acc[4 * j + i];
    }
  }
  asm volatile("bar.sync 1, %0;" ::"n"(kConsumerThreads) : "memory");

  const bool split = gridDim.z > 1;
  for (int idx = tid; idx < kRowsA * (kRowsB / 8); idx += kConsumerThreads) {
    const int m_local = idx / (kRowsB / 8);
    const int c = idx % (kRowsB / 8);
    const int64_t m = m0 + m_local;
    const int64_t n = n0 + 8 * c;
    if (m >= args.M || n >= args.N) continue;  // N % 8 == 0: a run of 8 is inside or outside
    const int4 v0 = *reinterpret_cast<const int4*>(staged + m_local * C::kEpiStride + 8 * c);
    const int4 v1 = *reinterpret_cast<const int4*>(staged + m_local * C::kEpiStride + 8 * c + 4);
    if (split) {
      int4* dst = reinterpret_cast<int4*>(args.partial +
                                          (static_cast<int64_t>(blockIdx.z) * args.M + m) * args.N + n);
      dst[0] = v0;
      dst[1] = v1;
    } else {
      const int32_t run[8] = {v0.x, v0.y, v0.z, v0.w, v1.x, v1.y, v1.z, v1.w};
      store_run<Out>(args, m, n, run);
    }
  }
#else
  (void)map_b, (void)map_a, (void)args;
#endif
}

// out[m, n .. n + 7] from the sum over splits of partial[s, m, n .. n + 7] (modulo 2^32, as one int32
// accumulation would wrap), dequantized.
template <typename Out>
__global__ void __launch_bounds__(256) int8_scaled_mm_reduce_kernel(const ScaledMmArgs args, int splits) {
  const int64_t runs = args.M * args.N / 8;
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; r < runs;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e = r * 8;
    uint32_t sum[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int s = 0; s < splits; ++s) {
      const int4* p = reinterpret_cast<const int4*>(args.partial + s * args.M * args.N + e);
      const int4 a = __ldcs(p);
      const int4 b = __ldcs(p + 1);
      sum[0] += static_cast<uint32_t>(a.x), sum[1] += static_cast<uint32_t>(a.y);
      sum[2] += static_cast<uint32_t>(a.z), sum[3] += static_cast<uint32_t>(a.w);
      sum[4] += static_cast<uint32_t>(b.x), sum[5] += static_cast<uint32_t>(b.y);
      sum[6] += static_cast<uint32_t>(b.z), sum[7] += static_cast<uint32_t>(b.w);
    }
    int32_t acc[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] = static_cast<int32_t>(sum[i]);
    store_run<Out>(args, e / args.N, e % args.N, acc);
  }
}

// The TMA map of a contiguous int8 [rows, K] matrix in boxes of 128 bytes of K x box_rows rows, 128-byte
// swizzled (the layout the wgmma descriptors read), zeros past the ends.
cudaError_t encode_map(CUtensorMap& map, const int8_t* base, int64_t rows, int64_t K, int box_rows) {
  return tma_pipeline::encode_2d_map(map, CU_TENSOR_MAP_DATA_TYPE_UINT8, base, rows, K, K, kStageK, box_rows,
                                     CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B);
}

template <typename Out, int kRowsA>
cudaError_t launch(const int8_t* A, const int8_t* B, const ScaledMmArgs& args, dim3 grid, int splits,
                   cudaStream_t stream) {
  constexpr int kSmem = Config<kRowsA>::kSmem;
  cudaError_t err = host::allow_dynamic_shared_memory<int8_scaled_mm_kernel<Out, kRowsA>, kSmem>();
  if (err != cudaSuccess) return err;
  CUtensorMap map_b, map_a;
  err = encode_map(map_b, B, args.N, args.K, kRowsB);
  if (err == cudaSuccess) err = encode_map(map_a, A, args.M, args.K, kRowsA);
  if (err != cudaSuccess) return err;
  int8_scaled_mm_kernel<Out, kRowsA><<<grid, kThreads, kSmem, stream>>>(map_b, map_a, args);
  err = cudaGetLastError();
  if (err != cudaSuccess || splits == 1) return err;
  int64_t blocks = (args.M * args.N / 8 + 255) / 256;
  if (blocks > 4096) blocks = 4096;
  int8_scaled_mm_reduce_kernel<Out><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(args, splits);
  return cudaGetLastError();
}

template <typename Out>
cudaError_t launch(const int8_t* A, const int8_t* B, const ScaledMmArgs& args, int rows_a, dim3 grid,
                   int splits, cudaStream_t stream) {
  return rows_a == 256 ? launch<Out, 256>(A, B, args, grid, splits, stream)
                       : launch<Out, 128>(A, B, args, grid, splits, stream);
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace int8_scaled_mm_detail

using namespace int8_scaled_mm_detail;

bool int8_scaled_mm_supported(const int8_t* A, const int8_t* B, int64_t M, int64_t N, int64_t K,
                              const void* out) {
#if defined(HALFBYTE_HAS_SM90A)
  if (M < 1 || M > int64_t{65535} * 128 || N < 8 || N % 8 != 0 || N >= (int64_t{1} << 31) || K < 16 ||
      K % 16 != 0 || K >= (int64_t{1} << 31) || !aligned16(A) || !aligned16(B) || !aligned16(out)) {
    return false;
  }
  int major = 0, minor = 0;
  EncodeTiled encode = nullptr;  // a driver without the TMA map encoder: the two-step path instead
  return host::device_attribute<cudaDevAttrComputeCapabilityMajor>(major) == cudaSuccess &&
         host::device_attribute<cudaDevAttrComputeCapabilityMinor>(minor) == cudaSuccess && major == 9 &&
         minor == 0 && encode_tiled_function(encode) == cudaSuccess;
#else
  (void)A, (void)B, (void)M, (void)N, (void)K, (void)out;
  return false;
#endif
}

bool int8_scaled_mm_preferred(int64_t M, int64_t N, int64_t K) {
  (void)K;
  int sms = 0;
  if (host::device_attribute<cudaDevAttrMultiProcessorCount>(sms) != cudaSuccess || sms < 1) return true;
  // Few rows of A on a weight of more than 4 waves of tiles (128256x4096 at M = 17: 227 against 204 us):
  // memory-bound, where each of the non-persistent blocks' pipeline fill is paid once per wave.
  const int64_t tiles = (N + kRowsB - 1) / kRowsB;
  return !(M <= 32 && tiles > 4 * static_cast<int64_t>(sms));
}

cudaError_t int8_scaled_mm_plan(int64_t M, int64_t N, int64_t K, Int8ScaledMmPlan* plan) {
  if (plan == nullptr || M < 1 || N < 1 || K < 1) return cudaErrorInvalidValue;
  int sms = 0;
  const cudaError_t err = host::device_attribute<cudaDevAttrMultiProcessorCount>(sms);
  if (err != cudaSuccess) return err;
  // Rules measured on the H100 (benchmarks/notes_int8.md). Rows of A per tile: 256 when M > 128 and the
  // 256-row tiles alone fill at least half the SMs (B is then read from L2 half as often), else 128.
  const int64_t row_tiles_b = (N + kRowsB - 1) / kRowsB;
  plan->rows_a = M > 128 && 2 * row_tiles_b * ((M + 255) / 256) >= sms ? 256 : 128;
  const int64_t tiles = row_tiles_b * ((M + plan->rows_a - 1) / plan->rows_a);
  const int64_t k_stages = (K + kStageK - 1) / kStageK;
  // Split K when the tiles leave more than half the SMs idle: as many splits as fit in one wave (a second,
  // partial wave costs more than idle SMs), at least 8 stages per split. The int32 partial sums' round trip
  // and the reduce launch cost about as much as halving a 16-stage split saves (the small tiles are bound by
  // the L2's bandwidth), so with more than a quarter of the SMs busy a split must keep 32 stages or more.
  int64_t splits = 2 * tiles > sms ? 1 : sms / tiles;
  const int64_t max_splits = k_stages / 8 > 1 ? k_stages / 8 : 1;
  if (splits > max_splits) splits = max_splits;
  if (splits > 16) splits = 16;
  if (4 * tiles > sms && k_stages / splits < 32) splits = 1;
  const int64_t per = (k_stages + splits - 1) / splits;
  plan->stages_per_split = static_cast<int>(per);
  plan->splits = static_cast<int>((k_stages + per - 1) / per);
  plan->workspace_ints = plan->splits > 1 ? plan->splits * M * N : 0;
  return cudaSuccess;
}

cudaError_t int8_scaled_mm(const int8_t* A, const int8_t* B, int64_t M, int64_t N, int64_t K,
                           const float* row_stats, const float* col_stats, const void* bias, DType bias_dtype,
                           DType out_dtype, void* out, const Int8ScaledMmPlan& plan, int32_t* workspace,
                           cudaStream_t stream) {
  if (!int8_scaled_mm_supported(A, B, M, N, K, out) || row_stats == nullptr || col_stats == nullptr ||
      plan.splits < 1 || plan.stages_per_split < 1 || (plan.splits > 1 && workspace == nullptr) ||
      (plan.rows_a != 128 && plan.rows_a != 256)) {
    return cudaErrorInvalidValue;
  }
  const ScaledMmArgs args{M,    N,          K,   row_stats, col_stats,
                          bias, bias_dtype, out, workspace, plan.stages_per_split};
  const dim3 grid(static_cast<unsigned>((N + kRowsB - 1) / kRowsB),
                  static_cast<unsigned>((M + plan.rows_a - 1) / plan.rows_a),
                  static_cast<unsigned>(plan.splits));
  switch (out_dtype) {
    case DType::kFloat32:
      return launch<float>(A, B, args, plan.rows_a, grid, plan.splits, stream);
    case DType::kFloat16:
      return launch<__half>(A, B, args, plan.rows_a, grid, plan.splits, stream);
    case DType::kBFloat16:
      return launch<__nv_bfloat16>(A, B, args, plan.rows_a, grid, plan.splits, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace halfbyte::cuda
