// GoogleTest of the INT8 CUDA kernels (csrc/cuda/int8_rowwise.cu, int8_weight_only_gemm.cu) on raw device
// buffers: the row-wise quantization and int8_mm_dequant against the CPU kernels bit for bit, the weight-only
// linear against a float64 host reference. Skipped when no CUDA device is present.
//
// Weight-only tolerance: |out - ref| <= 1e-5 * sum_k |a * w| * scale + u * |ref|: float32 tensor-core
// accumulation in another order than the reference, then the rounding to the output dtype (u = 2^-8 bfloat16,
// 2^-11 float16). The int8 weights and 16-bit activations enter the MMAs exactly.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "halfbyte/int8_cuda_kernels.h"
#include "halfbyte/int8_kernels.h"

namespace halfbyte {
namespace {

bool cuda_available() {
  int count = 0;
  return cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
}

// Device copy of a host vector (plus `extra` spare bytes), freed on scope exit.
class Device {
 public:
  Device(const void* host, size_t bytes, size_t extra = 0) : bytes_(bytes + extra) {
    EXPECT_EQ(cudaMalloc(&ptr_, bytes_ == 0 ? 1 : bytes_), cudaSuccess);
    EXPECT_EQ(cudaMemset(ptr_, 0, bytes_ == 0 ? 1 : bytes_), cudaSuccess);
    if (host != nullptr && bytes > 0)
      EXPECT_EQ(cudaMemcpy(ptr_, host, bytes, cudaMemcpyHostToDevice), cudaSuccess);
  }
  explicit Device(size_t bytes) : Device(nullptr, bytes) {}
  ~Device() { cudaFree(ptr_); }
  Device(const Device&) = delete;
  Device& operator=(const Device&) = delete;
  template <typename T>
  T* get(size_t byte_offset = 0) const {
    return reinterpret_cast<T*>(static_cast<char*>(ptr_) + byte_offset);
  }
  template <typename T>
  std::vector<T> download(size_t count, size_t byte_offset = 0) const {
    std::vector<T> v(count);
    EXPECT_EQ(cudaMemcpy(v.data(), get<char>(byte_offset), count * sizeof(T), cudaMemcpyDeviceToHost),
              cudaSuccess);
    return v;
  }

 private:
  void* ptr_ = nullptr;
  size_t bytes_;
};

std::vector<float> normal_values(int64_t n, unsigned seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

std::vector<uint16_t> to_16bit(const std::vector<float>& v, DType dtype) {
  std::vector<uint16_t> out(v.size());
  for (size_t i = 0; i < v.size(); ++i)
    out[i] = dtype == DType::kFloat16 ? float_to_fp16(v[i]) : float_to_bf16(v[i]);
  return out;
}

float from_16bit(uint16_t bits, DType dtype) {
  return dtype == DType::kFloat16 ? fp16_to_float(bits) : bf16_to_float(bits);
}

TEST(CudaInt8, VectorwiseQuantMatchesTheCpuKernel) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  for (DType dtype : {DType::kFloat16, DType::kBFloat16}) {
    for (int64_t cols : {4096, 4099, 5}) {  // vector path, element path, fewer columns than threads
      for (bool has_threshold : {false, true}) {
        const int64_t rows = 37;
        auto values = normal_values(rows * cols, static_cast<unsigned>(cols), 2.0f);
        values[3 * cols + 1] = NAN;
        for (int64_t c = 0; c < cols; ++c) values[5 * cols + c] = 0.0f;
        const auto x = to_16bit(values, dtype);
        const float threshold = has_threshold ? from_16bit(to_16bit({5.0f}, dtype)[0], dtype) : 0.0f;
        std::vector<int8_t> codes(rows * cols);
        std::vector<float> stats(rows);
        std::vector<uint8_t> flags(cols, 0);
        cpu::int8_vectorwise_quant(x.data(), dtype, cols, cols, has_threshold, threshold, codes.data(),
                                   stats.data(), flags.data(), 0, rows);
        Device d_x(x.data(), x.size() * 2), d_codes(codes.size()), d_stats(rows * 4), d_flags(cols);
        ASSERT_EQ(cuda::int8_vectorwise_quant(d_x.get<void>(), dtype, rows, cols, cols, has_threshold,
                                              threshold, d_codes.get<int8_t>(), d_stats.get<float>(),
                                              has_threshold ? d_flags.get<uint8_t>() : nullptr, nullptr),
                  cudaSuccess);
        ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
        EXPECT_EQ(d_codes.download<int8_t>(codes.size()), codes) << "cols " << cols;
        const auto gpu_stats = d_stats.download<float>(rows);
        for (int64_t r = 0; r < rows; ++r) {
          if (std::isnan(stats[r])) {
            EXPECT_TRUE(std::isnan(gpu_stats[r]));
          } else {
            EXPECT_EQ(gpu_stats[r], stats[r]) << "row " << r;
          }
        }
        if (has_threshold) EXPECT_EQ(d_flags.download<uint8_t>(cols), flags);
      }
    }
  }
}

TEST(CudaInt8, MmDequantMatchesTheCpuKernel) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  for (int64_t cols : {64, 63}) {  // 4 per thread, and one
    const int64_t rows = 33;
    std::vector<int32_t> acc(rows * cols);
    for (int64_t i = 0; i < rows * cols; ++i)
      acc[i] = static_cast<int32_t>((i * 2654435761u) % 4000001) - 2000000;
    const auto row_stats = normal_values(rows, 1);
    const auto col_stats = normal_values(cols, 2);
    const auto bias = to_16bit(normal_values(cols, 3), DType::kFloat16);
    for (DType out_dtype : {DType::kFloat16, DType::kBFloat16, DType::kFloat32}) {
      const size_t width = out_dtype == DType::kFloat32 ? 4 : 2;
      std::vector<uint8_t> out(rows * cols * width);
      cpu::int8_mm_dequant(acc.data(), cols, row_stats.data(), col_stats.data(), bias.data(), DType::kFloat16,
                           out_dtype, out.data(), 0, rows);
      Device d_acc(acc.data(), acc.size() * 4), d_rows(row_stats.data(), rows * 4),
          d_cols(col_stats.data(), cols * 4), d_bias(bias.data(), cols * 2), d_out(out.size());
      ASSERT_EQ(
          cuda::int8_mm_dequant(d_acc.get<int32_t>(), rows, cols, d_rows.get<float>(), d_cols.get<float>(),
                                d_bias.get<void>(), DType::kFloat16, out_dtype, d_out.get<void>(), nullptr),
          cudaSuccess);
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      EXPECT_EQ(d_out.download<uint8_t>(out.size()), out) << "cols " << cols;
    }
  }
}

struct LinearCase {
  int64_t M, N, K, lda;
};

TEST(CudaInt8, WeightOnlyLinearMatchesAFloat64Reference) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  const LinearCase cases[] = {{1, 40, 64, 64},     {5, 1000, 4096, 4096}, {8, 96, 4112, 4112},
                              {9, 8448, 256, 256}, {16, 33, 512, 520},    {3, 17, 16, 24}};
  for (DType dtype : {DType::kBFloat16, DType::kFloat16}) {
    for (const auto& t : cases) {
      std::mt19937 rng(static_cast<unsigned>(t.N + t.K));
      std::uniform_int_distribution<int> dist(-127, 127);
      std::vector<int8_t> W(t.N * t.K);
      for (auto& v : W) v = static_cast<int8_t>(dist(rng));
      auto scale = normal_values(t.N, 4, 0.05f);
      for (auto& s : scale) s = std::fabs(s);
      const auto A = to_16bit(normal_values(t.M * t.lda, 5), dtype);
      const auto bias = to_16bit(normal_values(t.N, 6), dtype);
      Device d_A(A.data(), A.size() * 2), d_W(W.data(), W.size()), d_scale(scale.data(), t.N * 4),
          d_bias(bias.data(), t.N * 2), d_out(t.M * t.N * 2);
      ASSERT_TRUE(cuda::int8_weight_only_linear_supported(d_A.get<void>(), dtype, t.M, t.K, t.lda,
                                                          d_W.get<int8_t>()));
      ASSERT_EQ(cuda::int8_weight_only_linear(d_A.get<void>(), dtype, t.M, t.K, t.lda, d_W.get<int8_t>(),
                                              d_scale.get<float>(), t.N, d_bias.get<void>(),
                                              d_out.get<void>(), nullptr),
                cudaSuccess);
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      const auto out = d_out.download<uint16_t>(t.M * t.N);
      const double u = dtype == DType::kBFloat16 ? 1.0 / 256 : 1.0 / 2048;
      for (int64_t m = 0; m < t.M; ++m) {
        for (int64_t n = 0; n < t.N; ++n) {
          double sum = 0.0, magnitude = 0.0;
          for (int64_t k = 0; k < t.K; ++k) {
            const double p = double(from_16bit(A[m * t.lda + k], dtype)) * W[n * t.K + k];
            sum += p;
            magnitude += std::fabs(p);
          }
          const double s = double(scale[n]) / 127.0;
          const double ref = sum * s + from_16bit(bias[n], dtype);
          const double got = from_16bit(out[m * t.N + n], dtype);
          ASSERT_LE(std::fabs(got - ref), 1e-5 * magnitude * s + u * std::fabs(ref) + 1e-30)
              << "M " << t.M << " N " << t.N << " K " << t.K << " at " << m << ", " << n;
        }
      }
    }
  }
}

// Every int8 value, -128 included, through the kernel's exact int8 -> 16-bit conversion: A's row m is one-hot
// at column m, so out[m, n] = fma(W[n, m], SCB[n] * (1/127), bias[n]) with an exact sum, computed on the
// host in float32 the same way and compared bit for bit. W[n, m] = 16 n + m - 128 covers the 256 values;
// the other columns hold random bytes (multiplied by zero).
TEST(CudaInt8, WeightOnlyLinearConvertsEveryInt8Exactly) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  constexpr int64_t M = 16, N = 16, K = 64;
  std::mt19937 rng(11);
  std::vector<int8_t> W(N * K);
  for (auto& v : W) v = static_cast<int8_t>(static_cast<int>(rng() % 256) - 128);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t m = 0; m < M; ++m) W[n * K + m] = static_cast<int8_t>(16 * n + m - 128);
  }
  auto scale = normal_values(N, 12, 1.0f);
  for (auto& s : scale) s = std::fabs(s) + 0.5f;
  for (DType dtype : {DType::kBFloat16, DType::kFloat16}) {
    std::vector<float> a(M * K, 0.0f);
    for (int64_t m = 0; m < M; ++m) a[m * K + m] = 1.0f;
    const auto A = to_16bit(a, dtype);
    const auto bias = to_16bit(normal_values(N, 13, 0.25f), dtype);
    Device d_A(A.data(), A.size() * 2), d_W(W.data(), W.size()), d_scale(scale.data(), N * 4),
        d_bias(bias.data(), N * 2), d_out(M * N * 2);
    ASSERT_EQ(cuda::int8_weight_only_linear(d_A.get<void>(), dtype, M, K, K, d_W.get<int8_t>(),
                                            d_scale.get<float>(), N, d_bias.get<void>(), d_out.get<void>(),
                                            nullptr),
              cudaSuccess);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    const auto out = d_out.download<uint16_t>(M * N);
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t n = 0; n < N; ++n) {
        const float row_scale = scale[n] * kInt8Inverse127;
        const float expected =
            std::fma(static_cast<float>(W[n * K + m]), row_scale, from_16bit(bias[n], dtype));
        const uint16_t bits = dtype == DType::kFloat16 ? float_to_fp16(expected) : float_to_bf16(expected);
        ASSERT_EQ(out[m * N + n], bits)
            << "int8 value " << int{W[n * K + m]} << " (row " << n << ", column " << m << ")";
      }
    }
  }
}

TEST(CudaInt8, WeightOnlyLinearRejectsWhatItDoesNotSupport) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  Device d_A(4096), d_W(4096);
  const void* A = d_A.get<void>();
  const int8_t* W = d_W.get<int8_t>();
  EXPECT_TRUE(cuda::int8_weight_only_linear_supported(A, DType::kBFloat16, 16, 64, 64, W));
  EXPECT_FALSE(cuda::int8_weight_only_linear_supported(A, DType::kFloat32, 1, 64, 64, W));
  EXPECT_FALSE(cuda::int8_weight_only_linear_supported(A, DType::kBFloat16, 17, 64, 64, W));
  EXPECT_FALSE(cuda::int8_weight_only_linear_supported(A, DType::kBFloat16, 0, 64, 64, W));
  EXPECT_FALSE(cuda::int8_weight_only_linear_supported(A, DType::kBFloat16, 2, 72, 72, W));  // K % 16
  EXPECT_FALSE(cuda::int8_weight_only_linear_supported(A, DType::kBFloat16, 2, 64, 68, W));  // lda % 8
  EXPECT_FALSE(cuda::int8_weight_only_linear_supported(d_A.get<char>(2), DType::kBFloat16, 1, 64, 64, W));
  EXPECT_FALSE(cuda::int8_weight_only_linear_supported(A, DType::kBFloat16, 1, 64, 64, d_W.get<int8_t>(8)));
  EXPECT_EQ(
      cuda::int8_weight_only_linear(A, DType::kBFloat16, 2, 72, 72, W, nullptr, 4, nullptr, nullptr, nullptr),
      cudaErrorInvalidValue);
}

}  // namespace
}  // namespace halfbyte
