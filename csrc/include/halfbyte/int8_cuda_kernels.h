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

}  // namespace halfbyte::cuda
