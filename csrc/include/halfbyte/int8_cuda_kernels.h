// CUDA kernels of the INT8 tier on raw device pointers (no torch). Like cuda_kernels.h: every launcher
// enqueues on `stream`, never synchronizes the host, allocates nothing, and returns the launch status,
// so the callers can be captured in a CUDA graph. Index arithmetic is 64-bit. The element rules are
// those of int8_kernels.h, so results are bit-identical to the CPU kernels there.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "halfbyte/float_types.h"
#include "halfbyte/int8_kernels.h"

namespace halfbyte::cuda {

// cpu::int8_vectorwise_quant for all `rows` rows. outlier_columns: `cols` bytes the caller zeroed,
// or nullptr when !has_threshold.
cudaError_t int8_vectorwise_quant(const void* input, DType input_dtype, int64_t rows, int64_t cols,
                                  int64_t lda, bool has_threshold, float threshold, int8_t* codes,
                                  float* row_stats, uint8_t* outlier_columns, cudaStream_t stream);

// cpu::int8_mm_dequant for all `rows` rows; bias: nullptr or `cols` entries of bias_dtype.
cudaError_t int8_mm_dequant(const int32_t* A, int64_t rows, int64_t cols, const float* row_stats,
                            const float* col_stats, const void* bias, DType bias_dtype, DType out_dtype,
                            void* out, cudaStream_t stream);

// Weight-only int8 linear for few rows of activations:
//   out[m, n] = fma(sum_k A[m, k] * W[n, k], row_scale[n] * (1/127), bias[n])
// with A float16 or bfloat16 ([M, K], row stride lda elements), W int8 [N, K] row-major, row_scale the
// float32 absmax of each weight row (SCB), out [M, N] contiguous in A's dtype, bias nullptr or N values of
// A's dtype, products accumulated in float32 (tensor cores). Supported: 1 <= M <= kInt8WeightOnlyMaxRows,
// K % 16 == 0, A and W 16-byte aligned, lda % 8 == 0, a device of compute capability 8.0 or newer
// (int8_weight_only_linear_supported says so); cudaErrorInvalidValue otherwise.
bool int8_weight_only_linear_supported(const void* A, DType dtype, int64_t M, int64_t K, int64_t lda,
                                       const int8_t* W);
cudaError_t int8_weight_only_linear(const void* A, DType dtype, int64_t M, int64_t K, int64_t lda,
                                    const int8_t* W, const float* row_scale, int64_t N, const void* bias,
                                    void* out, cudaStream_t stream);

// int8_linear_matmul + int8_mm_dequant in one pass (csrc/cuda/int8_scaled_mm.cu, sm_90a: TMA + wgmma,
// warp-specialized):
//   out[m, n] = int8_mm_dequant_value(sum_k A[m, k] * B[n, k], row_stats[m], col_stats[n], bias[n] or 0)
// cast to out_dtype, bit-identical to the two-step path. A [M, K] and B [N, K] contiguous int8, out [M, N]
// contiguous. Supported (int8_scaled_mm_supported): a device of compute capability 9.0 and a build with 90a,
// K % 16 == 0, N % 8 == 0 and N < 2^31, K < 2^31, A, B and out 16-byte aligned, 1 <= M <= 65535 * 128. The
// plan says how K is split; with splits > 1 the caller passes a workspace of plan.workspace_ints int32.
struct Int8ScaledMmPlan {
  int rows_a = 128;  // rows of A per block: 128, or 256 when M > 128
  int splits = 1;
  int stages_per_split = 1;
  int64_t workspace_ints = 0;
};
bool int8_scaled_mm_supported(const int8_t* A, const int8_t* B, int64_t M, int64_t N, int64_t K,
                              const void* out);
// Whether the fused kernel is the faster path for this shape on the current device (measured; false only
// where cuBLASLt + int8_mm_dequant was faster on the H100). Both give the same bits.
bool int8_scaled_mm_preferred(int64_t M, int64_t N, int64_t K);
cudaError_t int8_scaled_mm_plan(int64_t M, int64_t N, int64_t K, Int8ScaledMmPlan* plan);
cudaError_t int8_scaled_mm(const int8_t* A, const int8_t* B, int64_t M, int64_t N, int64_t K,
                           const float* row_stats, const float* col_stats, const void* bias, DType bias_dtype,
                           DType out_dtype, void* out, const Int8ScaledMmPlan& plan, int32_t* workspace,
                           cudaStream_t stream);

}  // namespace halfbyte::cuda
