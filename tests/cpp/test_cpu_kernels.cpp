// GoogleTest of the CPU kernels on raw buffers (csrc/cpu/), independent of torch.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "halfbyte/cpu_kernels.h"

namespace halfbyte {
namespace {

std::vector<float> normal_values(int64_t n, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 2.0f);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

int64_t blocks_of(int64_t n, int64_t blocksize) { return (n + blocksize - 1) / blocksize; }

TEST(CpuKernels, Quantize4bitFollowsTheRulesElementByElement) {
  for (int64_t blocksize : {32, 64, 4096}) {
    for (int64_t n : {1, 63, 64, 65, 5001}) {
      const auto x = normal_values(n, static_cast<unsigned>(n + blocksize));
      const int64_t blocks = blocks_of(n, blocksize);
      std::vector<float> absmax(blocks);
      std::vector<uint8_t> packed((n + 1) / 2);
      cpu::quantize_4bit(x.data(), DType::kFloat32, n, blocksize, QuantType::kNF4, absmax.data(),
                         packed.data(), 0, blocks);
      for (int64_t i = 0; i < n; ++i) {
        const int64_t b = i / blocksize;
        float m = 0.0f;
        for (int64_t j = b * blocksize; j < std::min(n, (b + 1) * blocksize); ++j)
          m = std::max(m, std::fabs(x[j]));
        ASSERT_EQ(absmax[b], m);
        const uint8_t expected = quantize_nf4(multiply_like_cuda(x[i], reciprocal_like_cuda(m)));
        const uint8_t code = (i % 2 == 0) ? packed[i / 2] >> 4 : packed[i / 2] & 15;
        ASSERT_EQ(code, expected) << "n=" << n << " i=" << i;
      }
      if (n % 2) EXPECT_EQ(packed.back() & 15, quantize_nf4(0.0f));  // padding nibble: the code of 0
    }
  }
}

TEST(CpuKernels, BlockRangesAreIndependent) {
  const int64_t n = 10000, blocksize = 64, blocks = blocks_of(n, blocksize);
  const auto x = normal_values(n, 7);
  std::vector<float> a1(blocks), a2(blocks);
  std::vector<uint8_t> p1((n + 1) / 2), p2((n + 1) / 2);
  cpu::quantize_4bit(x.data(), DType::kFloat32, n, blocksize, QuantType::kFP4, a1.data(), p1.data(), 0,
                     blocks);
  for (int64_t b = blocks; b-- > 0;) {  // one block at a time, backwards
    cpu::quantize_4bit(x.data(), DType::kFloat32, n, blocksize, QuantType::kFP4, a2.data(), p2.data(), b,
                       b + 1);
  }
  EXPECT_EQ(0, std::memcmp(a1.data(), a2.data(), blocks * sizeof(float)));
  EXPECT_EQ(p1, p2);
}

TEST(CpuKernels, DequantizeInvertsQuantizeWithinHalfAStep) {
  const int64_t n = 4097, blocksize = 128, blocks = blocks_of(n, blocksize);
  const auto x = normal_values(n, 3);
  std::vector<float> absmax(blocks), out(n);
  std::vector<uint8_t> packed((n + 1) / 2);
  float table[16];
  for (int c = 0; c < 16; ++c) table[c] = nf4_level(c);
  cpu::quantize_4bit(x.data(), DType::kFloat32, n, blocksize, QuantType::kNF4, absmax.data(), packed.data(),
                     0, blocks);
  cpu::dequantize_4bit(packed.data(), absmax.data(), table, n, blocksize, DType::kFloat32, out.data(), 0,
                       blocks);
  float largest_gap = 0.0f;
  for (int c = 1; c < 16; ++c) largest_gap = std::max(largest_gap, nf4_level(c) - nf4_level(c - 1));
  for (int64_t i = 0; i < n; ++i) {
    // Nearest-level rounding: no value is farther than half the largest gap (times absmax); 1e-4 for
    // the float32 scaling.
    EXPECT_LE(std::fabs(out[i] - x[i]), 0.5f * largest_gap * absmax[i / blocksize] * 1.0001f) << i;
  }
}

TEST(CpuKernels, HalfInputsGiveTheSameCodesAsTheirFloatValues) {
  const int64_t n = 999, blocksize = 64, blocks = blocks_of(n, blocksize);
  const auto x = normal_values(n, 11);
  std::vector<uint16_t> bf16(n), fp16(n);
  std::vector<float> bf16_as_float(n), fp16_as_float(n);
  for (int64_t i = 0; i < n; ++i) {
    bf16[i] = float_to_bf16(x[i]);
    fp16[i] = float_to_fp16(x[i]);
    bf16_as_float[i] = bf16_to_float(bf16[i]);
    fp16_as_float[i] = fp16_to_float(fp16[i]);
  }
  auto quantize = [&](const void* input, DType dtype) {
    std::vector<float> absmax(blocks);
    std::vector<uint8_t> codes(n);
    std::vector<float> code(256);
    for (int i = 0; i < 256; ++i) code[i] = -1.0f + 2.0f * i / 255.0f;
    cpu::quantize_blockwise_8bit(input, dtype, n, blocksize, code.data(), absmax.data(), codes.data(), 0,
                                 blocks);
    return codes;
  };
  EXPECT_EQ(quantize(bf16.data(), DType::kBFloat16), quantize(bf16_as_float.data(), DType::kFloat32));
  EXPECT_EQ(quantize(fp16.data(), DType::kFloat16), quantize(fp16_as_float.data(), DType::kFloat32));
}

TEST(CpuKernels, Dequantize8bitWritesCodeTimesAbsmaxInTheOutputDtype) {
  const int64_t n = 300, blocksize = 256;
  std::vector<uint8_t> codes(n);
  std::vector<float> code(256), absmax = {2.0f, 0.5f};
  for (int i = 0; i < 256; ++i) code[i] = i / 255.0f;
  for (int64_t i = 0; i < n; ++i) codes[i] = static_cast<uint8_t>(i * 7);
  std::vector<uint16_t> out(n);
  cpu::dequantize_blockwise_8bit(codes.data(), absmax.data(), code.data(), n, blocksize, DType::kBFloat16,
                                 out.data(), 0, 2);
  for (int64_t i = 0; i < n; ++i)
    EXPECT_EQ(out[i], float_to_bf16(code[codes[i]] * absmax[i / blocksize])) << i;
}

}  // namespace
}  // namespace halfbyte
