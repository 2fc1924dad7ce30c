// CPU kernels of the INT8 tier: row-wise int8 quantization, the int8 x int8 -> int32 matmul, and the
// dequantization of its int32 result.
//
// Algorithms (rules in int8_kernels.h):
// - int8_vectorwise_quant: per row, one pass for the absmax (leaving out |x| >= threshold when a
//   threshold is set), then one pass writing int8_code(x, int8_row_scale(absmax)) (0 for outliers,
//   whose column is flagged). Rows are independent.
// - int8_linear_matmul: C = A B^T, each output an int32 dot product of two int8 rows, accumulated in
//   uint32 (wraps like int32 arithmetic on the GPU, without undefined behaviour). Tasks are (row of A,
//   run of 64 rows of B) so that a decode-shaped call (one row of A) still splits over threads.
// - int8_mm_dequant: per element int8_mm_dequant_value, cast to the output dtype.
// Layout: row-major, codes [rows, cols] int8, row_stats [rows] float32, int32 accumulators [M, N].
// Limits: 64-bit indices; the caller validates shapes and splits rows / tasks over threads.
// Bottleneck: quantize and dequantize are memory-bound loops the compiler vectorizes; the matmul is
// compute-bound (the int8 dot product vectorizes to 16-bit multiply-adds, about 8-16 MACs per cycle),
// far from a tuned GEMM, and is meant for tests and small CPU batches.
#include <algorithm>
#include <cstdint>

#include "block_io.h"
#include "halfbyte/int8_kernels.h"

namespace halfbyte::cpu {
namespace {

// Chunk of a row held in a buffer at a time (the row is processed in pieces of this many elements).
constexpr int64_t kRowChunk = 4096;

uint32_t dot_int8(const int8_t* a, const int8_t* b, int64_t K) {
  uint32_t sum = 0;
  for (int64_t k = 0; k < K; ++k) {
    sum +=
        static_cast<uint32_t>(static_cast<int32_t>(static_cast<int16_t>(a[k]) * static_cast<int16_t>(b[k])));
  }
  return sum;
}

float load_bias(const void* bias, DType dtype, int64_t i) {
  if (bias == nullptr) return 0.0f;
  if (dtype == DType::kFloat32) return static_cast<const float*>(bias)[i];
  const uint16_t bits = static_cast<const uint16_t*>(bias)[i];
  return dtype == DType::kBFloat16 ? bf16_to_float(bits) : fp16_to_float(bits);
}

}  // namespace

void int8_vectorwise_quant(const void* input, DType input_dtype, int64_t cols, int64_t lda,
                           bool has_threshold, float threshold, int8_t* codes, float* row_stats,
                           uint8_t* outlier_columns, int64_t row_begin, int64_t row_end) {
  float buffer[kRowChunk];
  for (int64_t r = row_begin; r < row_end; ++r) {
    float absmax = 0.0f;
    for (int64_t c0 = 0; c0 < cols; c0 += kRowChunk) {
      const int64_t count = std::min(kRowChunk, cols - c0);
      load_block(input, input_dtype, r * lda + c0, count, buffer);
      for (int64_t i = 0; i < count; ++i) {
        const float magnitude = buffer[i] < 0.0f ? -buffer[i] : buffer[i];
        if (has_threshold && magnitude >= threshold) continue;
        absmax = int8_absmax_step(absmax, magnitude);
      }
    }
    row_stats[r] = absmax;
    const float scale = int8_row_scale(absmax);
    int8_t* out = codes + r * cols;
    for (int64_t c0 = 0; c0 < cols; c0 += kRowChunk) {
      const int64_t count = std::min(kRowChunk, cols - c0);
      load_block(input, input_dtype, r * lda + c0, count, buffer);
      for (int64_t i = 0; i < count; ++i) {
        const float magnitude = buffer[i] < 0.0f ? -buffer[i] : buffer[i];
        if (has_threshold && magnitude >= threshold) {
          out[c0 + i] = 0;
          __atomic_store_n(outlier_columns + c0 + i, uint8_t{1}, __ATOMIC_RELAXED);
        } else {
          out[c0 + i] = int8_code(buffer[i], scale);
        }
      }
    }
  }
}

void int8_linear_matmul(const int8_t* A, int64_t lda, const int8_t* B, int64_t ldb, int64_t K, int64_t N,
                        int32_t* C, int64_t task_begin, int64_t task_end) {
  const int64_t runs = (N + kInt8MatmulColumnsPerTask - 1) / kInt8MatmulColumnsPerTask;
  for (int64_t task = task_begin; task < task_end; ++task) {
    const int64_t m = task / runs;
    const int64_t n_begin = (task % runs) * kInt8MatmulColumnsPerTask;
    const int64_t n_end = std::min(N, n_begin + kInt8MatmulColumnsPerTask);
    const int8_t* a = A + m * lda;
    for (int64_t n = n_begin; n < n_end; ++n) {
      C[m * N + n] = static_cast<int32_t>(dot_int8(a, B + n * ldb, K));
    }
  }
}

void int8_mm_dequant(const int32_t* A, int64_t cols, const float* row_stats, const float* col_stats,
                     const void* bias, DType bias_dtype, DType out_dtype, void* out, int64_t row_begin,
                     int64_t row_end) {
  float buffer[kRowChunk];
  for (int64_t r = row_begin; r < row_end; ++r) {
    const float row_stat = row_stats[r];
    for (int64_t c0 = 0; c0 < cols; c0 += kRowChunk) {
      const int64_t count = std::min(kRowChunk, cols - c0);
      const int32_t* acc = A + r * cols + c0;
      for (int64_t i = 0; i < count; ++i) {
        buffer[i] =
            int8_mm_dequant_value(acc[i], row_stat, col_stats[c0 + i], load_bias(bias, bias_dtype, c0 + i));
      }
      store_block(buffer, count, out_dtype, out, r * cols + c0);
    }
  }
}

}  // namespace halfbyte::cpu
