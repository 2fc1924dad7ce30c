// The INT8 tier (LLM.int8-style row-wise quantization): the per-element rules shared by the CPU and
// CUDA kernels, and the CPU kernels on raw pointers (no torch). The CUDA launchers are declared in
// int8_cuda_kernels.h; python/halfbyte/reference_int8.py states the same rules in PyTorch.
//
// Formats (bitsandbytes 0.50 `int8_vectorwise_quant` / Linear8bitLt):
// - a [rows, cols] tensor is quantized row by row: row_stats[r] = max |x| over the row (the "SCB" of a
//   weight), codes[r, c] = round(x * 127 / row_stats[r]) as int8 in [-127, 127], row-major like x;
// - with an outlier threshold t > 0, values with |x| >= t are left out of the row's absmax and get
//   code 0 (the caller also zeroes their whole columns and reports them, see int8_cpu_ops.cpp);
// - dequantization: code * row_stats * (1/127), float32.
//
// The scale of a row follows bitsandbytes' CUDA kernel (kInt8VectorQuant, built with fast math):
// __fdividef(127, absmax), i.e. div.approx.ftz.f32 = 127 * rcp.approx.ftz(absmax), reproduced here with
// codebooks.h's reciprocal_like_cuda / multiply_like_cuda, then round-half-to-even. bitsandbytes' CPU
// path divides exactly (127 / absmax); the two can differ by one code for values whose x * scale lies
// within about 1e-5 of a half-integer (tests/test_int8_ops.py measures that).
//
// Deliberate differences from bitsandbytes (both documented in the tests): a NaN in a row makes that
// row's absmax NaN and its codes 0, so it dequantizes to NaN (bitsandbytes' CUDA kernel skips the NaN);
// the absmax of a float32 / bfloat16 row is taken in that dtype (bitsandbytes casts to float16 first).
#pragma once

#include <cmath>
#include <cstdint>

#include "halfbyte/codebooks.h"
#include "halfbyte/float_types.h"

namespace halfbyte {

// bitsandbytes' MM_DEQUANT_CONST 6.200012e-05f: float32(1 / (127 * 127)).
constexpr float kInt8MatmulDequantScale = 6.200012e-05f;
// Rows of activations up to which int8_linear multiplies by the weight alone (A not quantized).
constexpr int64_t kInt8WeightOnlyMaxRows = 16;
// float32(1 / 127), the factor of int8_vectorwise_dequant (bitsandbytes' 7.874015718698502e-3).
constexpr float kInt8Inverse127 = 7.874015718698502e-3f;

// 127 / absmax as bitsandbytes' kernel computes it: __fdividef(127.0f, absmax).
HB_HOST_DEVICE float int8_row_scale(float absmax) {
  return multiply_like_cuda(127.0f, reciprocal_like_cuda(absmax));
}

// Code of x in a row of scale `scale`: x * scale (mul.ftz) rounded half to even. NaN (0 * inf of an
// all-zero row, or a NaN in the row) gives 0; the clamp never acts on finite rows (|x| <= absmax).
HB_HOST_DEVICE int8_t int8_code(float x, float scale) {
  const float v = multiply_like_cuda(x, scale);
  if (v != v) return 0;
  const float r = rintf(v);
  return static_cast<int8_t>(r > 127.0f ? 127.0f : (r < -127.0f ? -127.0f : r));
}

// One step of a row's absmax: NaN sticks, otherwise the larger |x| (no flush: the exact max).
HB_HOST_DEVICE float int8_absmax_step(float running, float magnitude) {
  return (magnitude > running || magnitude != magnitude) ? magnitude : running;
}

// Element of int8_mm_dequant: fma(acc * row_stat * col_stat, 1/127^2, bias) in float32 with
// bitsandbytes' fast-math arithmetic (mul.ftz twice, then fma.rn.ftz).
HB_HOST_DEVICE float int8_mm_dequant_value(int32_t acc, float row_stat, float col_stat, float bias) {
  const float v = multiply_like_cuda(multiply_like_cuda(static_cast<float>(acc), row_stat), col_stat);
  return flush_subnormal(fmaf(v, kInt8MatmulDequantScale, flush_subnormal(bias)));
}

namespace cpu {

// Rows [row_begin, row_end) of a [rows, cols] input with row stride `lda` (elements): codes (row-major,
// `cols` per row), row_stats (one float32 per row). With has_threshold, values with |x| >= threshold
// (threshold already rounded to the input dtype) get code 0, are left out of the absmax, and set
// outlier_columns[c] = 1 (a byte per column, relaxed atomic stores, so threads may share it).
void int8_vectorwise_quant(const void* input, DType input_dtype, int64_t cols, int64_t lda,
                           bool has_threshold, float threshold, int8_t* codes, float* row_stats,
                           uint8_t* outlier_columns, int64_t row_begin, int64_t row_end);

// C[m, n] = sum_k A[m, k] * B[n, k] in int32 (wrapping past 2^31, like cuBLAS), for the tasks
// [task_begin, task_end) of a split into rows m and runs of kInt8MatmulColumnsPerTask columns n.
// A: [M, K] with row stride lda; B: [N, K] with row stride ldb; C: [M, N] contiguous.
constexpr int64_t kInt8MatmulColumnsPerTask = 64;
void int8_linear_matmul(const int8_t* A, int64_t lda, const int8_t* B, int64_t ldb, int64_t K, int64_t N,
                        int32_t* C, int64_t task_begin, int64_t task_end);

// out[m, n] = int8_mm_dequant_value(A[m, n], row_stats[m], col_stats[n], bias[n] or 0) cast to out_dtype
// (round to nearest even), rows [row_begin, row_end) of [rows, cols] contiguous int32 A.
void int8_mm_dequant(const int32_t* A, int64_t cols, const float* row_stats, const float* col_stats,
                     const void* bias, DType bias_dtype, DType out_dtype, void* out, int64_t row_begin,
                     int64_t row_end);

}  // namespace cpu
}  // namespace halfbyte
