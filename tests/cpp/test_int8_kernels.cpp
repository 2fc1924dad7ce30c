// GoogleTest of the INT8 rules (int8_kernels.h) and CPU kernels (csrc/cpu/int8_rowwise.cpp) on raw buffers,
// independent of torch: every code, stat and sum is checked against the rule written out element by element.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "halfbyte/int8_kernels.h"

namespace halfbyte {
namespace {

std::vector<float> normal_values(int64_t n, unsigned seed, float scale = 2.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

TEST(Int8Rules, CodesRoundHalfToEvenAndNanToZero) {
  const float one = 1.0f;
  EXPECT_EQ(int8_code(2.5f, one), 2);
  EXPECT_EQ(int8_code(3.5f, one), 4);
  EXPECT_EQ(int8_code(-2.5f, one), -2);
  EXPECT_EQ(int8_code(126.9f, one), 127);
  EXPECT_EQ(int8_code(std::numeric_limits<float>::quiet_NaN(), one), 0);
  const float infinite_scale = int8_row_scale(0.0f);  // an all-zero row
  EXPECT_TRUE(std::isinf(infinite_scale));
  EXPECT_EQ(int8_code(0.0f, infinite_scale), 0);  // 0 * inf is NaN: code 0
  EXPECT_EQ(int8_code(5.0f, int8_row_scale(std::numeric_limits<float>::infinity())), 0);
}

TEST(Int8Rules, AbsmaxStepKeepsNan) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  EXPECT_TRUE(std::isnan(int8_absmax_step(1.0f, nan)));
  EXPECT_TRUE(std::isnan(int8_absmax_step(nan, 3.0f)));
  EXPECT_EQ(int8_absmax_step(1.0f, 3.0f), 3.0f);
  EXPECT_EQ(int8_absmax_step(3.0f, 1.0f), 3.0f);
}

TEST(CpuInt8, VectorwiseQuantFollowsTheRules) {
  for (int64_t cols : {1, 7, 64, 5000}) {
    for (bool has_threshold : {false, true}) {
      const int64_t rows = 5;
      const float threshold = 3.0f;
      const auto x = normal_values(rows * cols, static_cast<unsigned>(cols));
      std::vector<int8_t> codes(rows * cols, 99);
      std::vector<float> stats(rows);
      std::vector<uint8_t> flags(cols, 0);
      cpu::int8_vectorwise_quant(x.data(), DType::kFloat32, cols, cols, has_threshold, threshold,
                                 codes.data(), stats.data(), flags.data(), 0, rows);
      for (int64_t r = 0; r < rows; ++r) {
        float m = 0.0f;
        for (int64_t c = 0; c < cols; ++c) {
          const float a = std::fabs(x[r * cols + c]);
          if (!(has_threshold && a >= threshold)) m = std::max(m, a);
        }
        ASSERT_EQ(stats[r], m) << "row " << r;
        const float scale = multiply_like_cuda(127.0f, reciprocal_like_cuda(m));
        for (int64_t c = 0; c < cols; ++c) {
          const float v = x[r * cols + c];
          const bool outlier = has_threshold && std::fabs(v) >= threshold;
          const int expected = outlier ? 0 : static_cast<int>(std::nearbyint(multiply_like_cuda(v, scale)));
          ASSERT_EQ(codes[r * cols + c], expected) << "row " << r << " col " << c;
          if (outlier) ASSERT_EQ(flags[c], 1) << "col " << c;
        }
      }
      for (int64_t c = 0; c < cols; ++c) {
        bool any = false;
        for (int64_t r = 0; r < rows; ++r) any |= has_threshold && std::fabs(x[r * cols + c]) >= threshold;
        ASSERT_EQ(flags[c], any ? 1 : 0) << "col " << c;
      }
    }
  }
}

TEST(CpuInt8, MatmulIsExactForEveryTaskSplit) {
  const int64_t M = 3, N = 130, K = 1000;
  std::mt19937 rng(7);
  std::uniform_int_distribution<int> dist(-127, 127);
  std::vector<int8_t> A(M * K), B(N * K);
  for (auto& v : A) v = static_cast<int8_t>(dist(rng));
  for (auto& v : B) v = static_cast<int8_t>(dist(rng));
  for (int64_t k = 0; k < K; ++k) A[k] = B[k] = -127;  // row 0 of A and of B: the largest sum
  const int64_t runs = (N + cpu::kInt8MatmulColumnsPerTask - 1) / cpu::kInt8MatmulColumnsPerTask;
  std::vector<int32_t> C(M * N, -1);
  for (int64_t task = 0; task < M * runs; ++task)
    cpu::int8_linear_matmul(A.data(), K, B.data(), K, K, N, C.data(), task, task + 1);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < N; ++n) {
      int64_t sum = 0;
      for (int64_t k = 0; k < K; ++k) sum += int64_t{A[m * K + k]} * B[n * K + k];
      ASSERT_EQ(C[m * N + n], sum) << m << ", " << n;
    }
  }
  EXPECT_EQ(C[0], 127 * 127 * K);
}

TEST(CpuInt8, MmDequantIsTheElementRuleCastToTheDtype) {
  const int64_t rows = 4, cols = 9;
  std::vector<int32_t> acc(rows * cols);
  for (int64_t i = 0; i < rows * cols; ++i)
    acc[i] = static_cast<int32_t>((i * 2654435761u) % 2000001) - 1000000;
  const auto row_stats = normal_values(rows, 1);
  const auto col_stats = normal_values(cols, 2);
  const auto bias = normal_values(cols, 3);
  std::vector<uint16_t> out(rows * cols);
  cpu::int8_mm_dequant(acc.data(), cols, row_stats.data(), col_stats.data(), bias.data(), DType::kFloat32,
                       DType::kBFloat16, out.data(), 0, rows);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      const float v = int8_mm_dequant_value(acc[r * cols + c], row_stats[r], col_stats[c], bias[c]);
      ASSERT_EQ(out[r * cols + c], float_to_bf16(v));
      const double product = double(acc[r * cols + c]) * row_stats[r] * col_stats[c] / (127.0 * 127.0);
      // float32: the int32 conversion, two products, the constant 1/127^2 and the fma: a few units of 2^-24
      ASSERT_NEAR(v, product + bias[c], 1e-6 * (std::fabs(product) + std::fabs(bias[c])));
    }
  }
}

}  // namespace
}  // namespace halfbyte
