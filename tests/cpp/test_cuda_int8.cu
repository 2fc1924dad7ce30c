// GoogleTest of the INT8 CUDA kernels (csrc/cuda/int8_rowwise.cu, int8_weight_only_gemm.cu,
// int8_scaled_mm.cu) on raw device buffers: the row-wise quantization and int8_mm_dequant against the CPU
// kernels bit for bit, the weight-only linear against a float64 host reference, the fused scaled matmul
// against the int32 path bit for bit. Skipped when no CUDA device is present.
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
  // N >= 64 * SMs (8448 on an H100) takes the two-tile, 4-warp blocks; 8456 also ends in a partial tile.
  const LinearCase cases[] = {{1, 40, 64, 64},      {5, 1000, 4096, 4096}, {8, 96, 4112, 4112},
                              {9, 8448, 256, 256},  {16, 33, 512, 520},    {3, 17, 16, 24},
                              {1, 8456, 1024, 1024}};
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

// The fused int8_scaled_mm (sm_90a) against the two-step definition computed on the host: the exact int32
// sum (wrapping modulo 2^32) and int8_mm_dequant_value, rounded to the output dtype; bit for bit. The cases
// cover one and many tiles of 128 x 128 and 128 x 256, rows of A and B past a tile's end, K past a 128-byte
// stage, split K (few tiles, long K), the three output dtypes, float32 and 16-bit bias, and a sum that wraps
// past 2^31.
struct ScaledMmCase {
  int64_t M, N, K;
  DType out, bias;  // bias kFloat32 / kBFloat16 / kFloat16; `none` below when absent
  bool has_bias, extreme;
};

TEST(CudaInt8, ScaledMmMatchesTheInt32PathBitForBit) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  {
    Device probe(256);
    if (!cuda::int8_scaled_mm_supported(probe.get<int8_t>(), probe.get<int8_t>(), 1, 8, 16,
                                        probe.get<void>()))
      GTEST_SKIP() << "the fused kernel needs compute capability 9.0 and a 90a build";
  }
  const ScaledMmCase cases[] = {
      {1, 8, 16, DType::kBFloat16, DType::kBFloat16, true, false},
      {20, 24, 96, DType::kFloat16, DType::kFloat16, true, false},
      {130, 264, 4096, DType::kBFloat16, DType::kFloat32, true, false},  // few tiles: split K
      {300, 1032, 272, DType::kFloat32, DType::kFloat32, false, false},  // K past a stage, many tiles
      {129, 136, 4112, DType::kBFloat16, DType::kBFloat16, false, false},
      {260, 4224, 144, DType::kBFloat16, DType::kFloat16, true, false},  // 256-row tiles of A, a 4-row tail
      {3, 8, 133152, DType::kFloat32, DType::kFloat32, false, true},     // 127 * 127 * K wraps past 2^31
  };
  for (const auto& t : cases) {
    std::mt19937 rng(static_cast<unsigned>(t.M * 7 + t.N + t.K));
    std::uniform_int_distribution<int> dist(-127, 127);
    std::vector<int8_t> A(t.M * t.K), B(t.N * t.K);
    for (auto& v : A) v = static_cast<int8_t>(t.extreme ? 127 : dist(rng));
    for (auto& v : B) v = static_cast<int8_t>(t.extreme ? 127 : dist(rng));
    auto row_stats = normal_values(t.M, 21, 2.0f), col_stats = normal_values(t.N, 22, 0.1f);
    for (auto& v : row_stats) v = std::fabs(v);
    for (auto& v : col_stats) v = std::fabs(v);
    const auto bias_f = normal_values(t.N, 23);
    std::vector<uint16_t> bias16 =
        to_16bit(bias_f, t.bias == DType::kFloat16 ? DType::kFloat16 : DType::kBFloat16);
    const void* bias_host =
        t.bias == DType::kFloat32 ? static_cast<const void*>(bias_f.data()) : bias16.data();
    const size_t bias_bytes = t.N * (t.bias == DType::kFloat32 ? 4 : 2);
    const size_t out_bytes = t.M * t.N * (t.out == DType::kFloat32 ? 4 : 2);
    Device d_A(A.data(), A.size()), d_B(B.data(), B.size()), d_rows(row_stats.data(), t.M * 4),
        d_cols(col_stats.data(), t.N * 4), d_bias(bias_host, bias_bytes), d_out(out_bytes);
    ASSERT_TRUE(cuda::int8_scaled_mm_supported(d_A.get<int8_t>(), d_B.get<int8_t>(), t.M, t.N, t.K,
                                               d_out.get<void>()));
    cuda::Int8ScaledMmPlan plan;
    ASSERT_EQ(cuda::int8_scaled_mm_plan(t.M, t.N, t.K, &plan), cudaSuccess);
    if (t.K == 4096) EXPECT_GT(plan.splits, 1) << "this case is meant to split K";
    if (t.N == 4224) EXPECT_EQ(plan.rows_a, 256) << "this case is meant to take 256 rows of A per tile";
    Device d_work(static_cast<size_t>(plan.workspace_ints) * 4);
    ASSERT_EQ(cuda::int8_scaled_mm(d_A.get<int8_t>(), d_B.get<int8_t>(), t.M, t.N, t.K, d_rows.get<float>(),
                                   d_cols.get<float>(), t.has_bias ? d_bias.get<void>() : nullptr, t.bias,
                                   t.out, d_out.get<void>(), plan,
                                   plan.splits > 1 ? d_work.get<int32_t>() : nullptr, nullptr),
              cudaSuccess);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    const auto out32 = d_out.download<uint32_t>(t.out == DType::kFloat32 ? t.M * t.N : 0);
    const auto out16 = d_out.download<uint16_t>(t.out == DType::kFloat32 ? 0 : t.M * t.N);
    for (int64_t m = 0; m < t.M; ++m) {
      for (int64_t n = 0; n < t.N; ++n) {
        uint32_t sum = 0;  // modulo 2^32, as the int32 accumulation wraps
        for (int64_t k = 0; k < t.K; ++k)
          sum += static_cast<uint32_t>(int32_t{A[m * t.K + k]} * int32_t{B[n * t.K + k]});
        const float bias = !t.has_bias                 ? 0.0f
                           : t.bias == DType::kFloat32 ? bias_f[n]
                                                       : from_16bit(bias16[n], t.bias);
        const float v = int8_mm_dequant_value(static_cast<int32_t>(sum), row_stats[m], col_stats[n], bias);
        if (t.out == DType::kFloat32) {
          ASSERT_EQ(out32[m * t.N + n], float_to_bits(v))
              << "M " << t.M << " N " << t.N << " K " << t.K << " at " << m << ", " << n;
        } else {
          const uint16_t bits = t.out == DType::kFloat16 ? float_to_fp16(v) : float_to_bf16(v);
          ASSERT_EQ(out16[m * t.N + n], bits)
              << "M " << t.M << " N " << t.N << " K " << t.K << " at " << m << ", " << n;
        }
      }
    }
  }
}

TEST(CudaInt8, ScaledMmRejectsWhatItDoesNotSupport) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  Device d(4096);
  const int8_t* p = d.get<int8_t>();
  if (!cuda::int8_scaled_mm_supported(p, p, 1, 8, 16, d.get<void>())) GTEST_SKIP() << "no sm_90a kernel here";
  EXPECT_FALSE(cuda::int8_scaled_mm_supported(p, p, 0, 8, 16, d.get<void>()));
  EXPECT_FALSE(cuda::int8_scaled_mm_supported(p, p, 1, 12, 16, d.get<void>()));  // N % 8
  EXPECT_FALSE(cuda::int8_scaled_mm_supported(p, p, 1, 8, 24, d.get<void>()));   // K % 16
  EXPECT_FALSE(cuda::int8_scaled_mm_supported(d.get<int8_t>(8), p, 1, 8, 16, d.get<void>()));
  EXPECT_FALSE(cuda::int8_scaled_mm_supported(p, p, 1, 8, 16, d.get<char>(4)));
  cuda::Int8ScaledMmPlan plan;
  EXPECT_EQ(cuda::int8_scaled_mm(p, p, 1, 12, 16, d.get<float>(), d.get<float>(), nullptr, DType::kFloat32,
                                 DType::kFloat32, d.get<void>(), plan, nullptr, nullptr),
            cudaErrorInvalidValue);
  plan.splits = 2;  // a split plan without a workspace
  EXPECT_EQ(cuda::int8_scaled_mm(p, p, 1, 8, 16, d.get<float>(), d.get<float>(), nullptr, DType::kFloat32,
                                 DType::kFloat32, d.get<void>(), plan, nullptr, nullptr),
            cudaErrorInvalidValue);
}

}  // namespace
}  // namespace halfbyte
