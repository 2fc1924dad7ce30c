// GoogleTest of the torch-free codebooks and conversions (csrc/include/halfbyte/).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>

#include "halfbyte/codebooks.h"
#include "halfbyte/float_types.h"

namespace halfbyte {
namespace {

TEST(Codebooks, Nf4LevelsAreSortedWithExactZeroAndUnitEnds) {
  EXPECT_EQ(nf4_level(0), -1.0f);
  EXPECT_EQ(nf4_level(7), 0.0f);
  EXPECT_EQ(nf4_level(15), 1.0f);
  for (int c = 1; c < 16; ++c) EXPECT_LT(nf4_level(c - 1), nf4_level(c)) << c;
}

TEST(Codebooks, Nf4QuantizationPicksTheNearestLevel) {
  // Every level maps to itself, and a value nearer to one level than to the others takes that level.
  for (int c = 0; c < 16; ++c) EXPECT_EQ(quantize_nf4(nf4_level(c)), c);
  for (float x = -1.0f; x <= 1.0f; x += 1.0f / 1024) {
    int best = 0;
    for (int c = 1; c < 16; ++c) {
      if (std::fabs(nf4_level(c) - x) < std::fabs(nf4_level(best) - x)) best = c;
    }
    EXPECT_EQ(quantize_nf4(x), best) << x;
  }
}

TEST(Codebooks, ThresholdsAreStrict) {
  // A value exactly on a threshold takes the lower level.
  const float t = 0.03979014977812767f;  // between NF4 codes 7 and 8
  EXPECT_EQ(quantize_nf4(t), 7);
  EXPECT_EQ(quantize_nf4(std::nextafter(t, 1.0f)), 8);
  const float f = 0.29166667f;  // FP4 between 0.25 (pattern 7) and 1/3 (pattern 4)
  EXPECT_EQ(quantize_fp4(f), 7);
  EXPECT_EQ(quantize_fp4(std::nextafter(f, 1.0f)), 4);
}

TEST(Codebooks, Fp4SignAndMagnitudes) {
  for (int c = 0; c < 16; ++c) EXPECT_EQ(quantize_fp4(fp4_level(c)), c == 8 ? 0 : c) << c;  // -0.0 is not < 0
  EXPECT_EQ(quantize_fp4(-1e-6f), 8);  // tiny negatives keep their sign: -0
  EXPECT_EQ(quantize_fp4(1e-6f), 0);
  EXPECT_TRUE(std::signbit(fp4_level(8)));
  EXPECT_FLOAT_EQ(fp4_level(2), 8.0f / 12.0f);
}

TEST(Codebooks, NanTakesCodeZero) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  EXPECT_EQ(quantize_nf4(nan), 0);
  EXPECT_EQ(quantize_fp4(nan), 0);
}

TEST(Codebooks, Code256SearchTakesTheNearestAndHandlesEnds) {
  float code[256];
  for (int i = 0; i < 256; ++i) code[i] = -1.0f + 2.0f * i / 255.0f;  // any sorted code
  for (int i = 0; i < 256; ++i) EXPECT_EQ(quantize_with_code256(code, code[i]), i);
  EXPECT_EQ(quantize_with_code256(code, -2.0f), 0);
  EXPECT_EQ(quantize_with_code256(code, 2.0f), 255);
  EXPECT_EQ(quantize_with_code256(code, code[10] + 0.3f * (code[11] - code[10])), 10);
  EXPECT_EQ(quantize_with_code256(code, code[10] + 0.7f * (code[11] - code[10])), 11);
}

TEST(Codebooks, AbsmaxPropagatesNanAndFlushesSubnormals) {
  float m = 0.0f;
  m = absmax_step(m, -3.0f);
  EXPECT_EQ(m, 3.0f);
  EXPECT_EQ(absmax_step(m, 1e-40f), 3.0f);
  EXPECT_EQ(absmax_step(0.0f, 1e-40f), 0.0f);
  m = absmax_step(m, std::numeric_limits<float>::quiet_NaN());
  EXPECT_TRUE(std::isnan(m));
  EXPECT_TRUE(std::isnan(absmax_step(m, 100.0f)));
}

TEST(Codebooks, BlocksizesArePowersOfTwoFrom32To4096) {
  for (int64_t b : {32, 64, 128, 256, 512, 1024, 2048, 4096}) EXPECT_TRUE(is_valid_blocksize(b));
  for (int64_t b : {0, -64, 16, 48, 100, 8192}) EXPECT_FALSE(is_valid_blocksize(b));
}

TEST(Reciprocal, ExactOnPowersOfTwoWithinOneUlpElsewhere) {
  EXPECT_EQ(reciprocal_like_cuda(1.0f), 1.0f);
  EXPECT_EQ(reciprocal_like_cuda(4.0f), 0.25f);
  int deviating = 0;
  for (uint32_t mantissa = 0; mantissa < (1u << 23); mantissa += 997) {
    const float m = bits_to_float(0x3f800000u | mantissa);
    const float r = reciprocal_like_cuda(m);
    const int64_t ulps =
        static_cast<int64_t>(float_to_bits(r)) - static_cast<int64_t>(float_to_bits(1.0f / m));
    EXPECT_LE(std::abs(ulps), 1);
    deviating += ulps != 0;
    // The exponent only shifts the result.
    EXPECT_EQ(reciprocal_like_cuda(m * 1024.0f), r / 1024.0f);
  }
  EXPECT_GT(deviating, 0);
}

TEST(Reciprocal, FlushToZeroRules) {
  EXPECT_TRUE(std::isinf(reciprocal_like_cuda(0.0f)));
  EXPECT_TRUE(std::isinf(reciprocal_like_cuda(1e-40f)));
  EXPECT_EQ(reciprocal_like_cuda(std::numeric_limits<float>::infinity()), 0.0f);
  EXPECT_EQ(reciprocal_like_cuda(1.5e38f), 0.0f);  // the result would be subnormal
  EXPECT_TRUE(std::isnan(reciprocal_like_cuda(std::numeric_limits<float>::quiet_NaN())));
  EXPECT_EQ(multiply_like_cuda(1e-20f, 1e-20f), 0.0f);
  EXPECT_TRUE(std::signbit(multiply_like_cuda(-1e-20f, 1e-20f)));
}

TEST(FloatTypes, HalfConversionsRoundTripEveryPattern) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const uint16_t bits = static_cast<uint16_t>(h);
    const float f16 = fp16_to_float(bits);
    if (!std::isnan(f16)) EXPECT_EQ(float_to_fp16(f16), bits) << h;
    const float b16 = bf16_to_float(bits);
    if (!std::isnan(b16)) EXPECT_EQ(float_to_bf16(b16), bits) << h;
  }
}

TEST(FloatTypes, RoundToNearestEven) {
  // 1 + 2^-11 lies halfway between fp16 1.0 and 1 + 2^-10: ties go to the even mantissa (1.0).
  EXPECT_EQ(float_to_fp16(1.0f + 0.00048828125f), 0x3c00);
  EXPECT_EQ(float_to_fp16(1.0f + 3 * 0.00048828125f), 0x3c02);
  EXPECT_EQ(float_to_fp16(65520.0f), 0x7c00);  // rounds to infinity
  EXPECT_EQ(float_to_fp16(65519.0f), 0x7bff);
  EXPECT_EQ(float_to_fp16(2.9802322e-08f), 0x0000);  // 2^-25: tie between 0 and the smallest subnormal
  EXPECT_EQ(float_to_fp16(2.9802326e-08f), 0x0001);
  EXPECT_EQ(float_to_bf16(1.0f + 1.0f / 256), 0x3f80);  // tie to even
  EXPECT_EQ(float_to_bf16(1.0f + 3.0f / 256), 0x3f82);
  EXPECT_EQ(float_to_bf16(std::numeric_limits<float>::quiet_NaN()), 0x7fc0);
}

}  // namespace
}  // namespace halfbyte
