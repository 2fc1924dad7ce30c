// CUDA blockwise 4-bit / 8-bit kernels against the CPU kernels, bit for bit: codes, absmax bits
// (memcmp, so NaN payloads count) and dequantized output bits. Skipped without a CUDA device.
//
// Inputs: random normal data (fixed seed), blocks of special values (zeros, -0, subnormals, NaN with
// different signs and payloads, infinities, exactly +-1), every 16-bit pattern of bf16 / fp16, float32
// values on and next to every code threshold, sizes that are odd / not a multiple of the blocksize /
// span several tiles, misaligned pointers (the guarded fallback path) and a tensor of more than
// 2^31 elements (compared on its first and last blocks). 4-bit dequantization with double-quantized
// scales is compared against the CPU kernel given the scales computed on the host.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "halfbyte/codebooks.h"
#include "halfbyte/cpu_kernels.h"
#include "halfbyte/cuda_kernels.h"
#include "halfbyte/float_types.h"

namespace halfbyte {
namespace {

bool has_cuda_device() {
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess) {
    cudaGetLastError();  // clear it
    return false;
  }
  return count > 0;
}

#define HB_SKIP_WITHOUT_CUDA()                                \
  do {                                                        \
    if (!has_cuda_device()) GTEST_SKIP() << "no CUDA device"; \
  } while (0)

#define HB_CUDA_ASSERT(expr)                                                             \
  do {                                                                                   \
    const cudaError_t hb_status = (expr);                                                \
    ASSERT_EQ(hb_status, cudaSuccess) << #expr << ": " << cudaGetErrorString(hb_status); \
  } while (0)

const DType kDTypes[] = {DType::kFloat32, DType::kFloat16, DType::kBFloat16};
const int64_t kBlocksizes[] = {32, 64, 128, 256, 512, 1024, 2048, 4096};
const QuantType kQuantTypes[] = {QuantType::kNF4, QuantType::kFP4};

const char* dtype_name(DType d) {
  return d == DType::kFloat32 ? "float32" : (d == DType::kFloat16 ? "float16" : "bfloat16");
}

const char* type_name(QuantType t) { return t == QuantType::kNF4 ? "nf4" : "fp4"; }

// Owns a device allocation.
class DeviceBuffer {
 public:
  explicit DeviceBuffer(size_t bytes) : bytes_(bytes) { status_ = cudaMalloc(&ptr_, bytes ? bytes : 1); }
  ~DeviceBuffer() {
    if (ptr_ != nullptr) cudaFree(ptr_);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  cudaError_t status() const { return status_; }
  size_t bytes() const { return bytes_; }
  template <typename T = void>
  T* get() const {
    return static_cast<T*>(ptr_);
  }
  uint8_t* bytes_ptr() const { return static_cast<uint8_t*>(ptr_); }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
  cudaError_t status_ = cudaSuccess;
};

// Raw input in one dtype: 2 or 4 bytes per element.
struct RawInput {
  DType dtype;
  int64_t n = 0;
  std::vector<uint8_t> bytes;
};

uint32_t raw_from_float(float value, DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return float_to_bits(value);
    case DType::kFloat16:
      return float_to_fp16(value);
    case DType::kBFloat16:
      return float_to_bf16(value);
  }
  return 0;
}

void set_raw(RawInput& input, int64_t i, uint32_t raw) {
  if (input.dtype == DType::kFloat32) {
    std::memcpy(input.bytes.data() + 4 * i, &raw, 4);
  } else {
    const uint16_t h = static_cast<uint16_t>(raw);
    std::memcpy(input.bytes.data() + 2 * i, &h, 2);
  }
}

RawInput encode(const std::vector<float>& values, DType dtype) {
  RawInput input{dtype, static_cast<int64_t>(values.size()), {}};
  input.bytes.resize(values.size() * dtype_size(dtype));
  for (size_t i = 0; i < values.size(); ++i)
    set_raw(input, static_cast<int64_t>(i), raw_from_float(values[i], dtype));
  return input;
}

std::vector<float> normal_values(int64_t n, uint32_t seed) {
  std::mt19937 generator(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> values(n);
  for (float& v : values) v = normal(generator);
  return values;
}

// NaN bit patterns of each dtype: quiet, negative quiet, with payload.
struct NanPatterns {
  uint32_t quiet, negative, payload;
};

NanPatterns nan_patterns(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return {0x7fc00000u, 0xffc00000u, 0x7fc01234u};
    case DType::kFloat16:
      return {0x7e00u, 0xfe00u, 0x7e2bu};
    case DType::kBFloat16:
      return {0x7fc0u, 0xffc0u, 0x7fd5u};
  }
  return {0, 0, 0};
}

// Blocks of special values (each `blocksize` long), then a ragged tail block with a NaN, n odd.
RawInput special_input(DType dtype, int64_t blocksize) {
  const int kBlocks = 12;
  const int64_t n = kBlocks * blocksize + blocksize / 2 + 1;
  std::vector<float> values = normal_values(n, 1234u + static_cast<uint32_t>(blocksize));
  auto block = [&](int b, int64_t i) -> float& { return values[b * blocksize + i]; };
  const float inf = std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < blocksize; ++i) {
    block(0, i) = 0.0f;                                            // all zero: recip = inf, 0 * inf = NaN
    block(1, i) = -0.0f;                                           // all negative zero
    block(2, i) = (i % 2 ? -1.0f : 1.0f) * 1e-40f;                 // float32 / bf16 subnormals: absmax 0
    block(3, i) = (i % 3 ? 1e-40f : 1.5e-38f) * (i % 2 ? -1 : 1);  // tiny normals and subnormals
    block(4, i) = static_cast<float>(i % 7) / 6.0f - 0.5f;         // values with exact +-1 below
    block(10, i) = (i % 2 ? -1.0f : 1.0f) * 3e-8f;                 // fp16 subnormals
  }
  block(4, 3) = 1.0f;
  block(4, blocksize - 2) = -1.0f;
  for (int64_t i = 0; i < blocksize; ++i) block(5, i) = std::max(-0.9f, std::min(0.9f, block(5, i) * 0.3f));
  block(5, blocksize / 3) = -1.0f;  // -1 is the absmax
  block(6, blocksize / 2) = inf;    // inf: recip 0, inf * 0 = NaN, dequantizes to NaN / inf
  block(7, 1) = -inf;
  block(8, blocksize - 1) = 3e38f;  // huge absmax: small values scale to subnormals, flushed
  block(9, 0) = 65504.0f;           // fp16 max
  block(11, 5) = 1e30f;             // fp16: inf
  RawInput input = encode(values, dtype);
  const NanPatterns nan = nan_patterns(dtype);
  // Block 7: -inf and a NaN; block 9: three NaNs (the last one's bits are the CPU's absmax).
  set_raw(input, 7 * blocksize + blocksize / 2, nan.quiet);
  set_raw(input, 9 * blocksize + 2, nan.quiet);
  set_raw(input, 9 * blocksize + blocksize / 2, nan.payload);
  set_raw(input, 9 * blocksize + blocksize - 3, nan.negative);
  set_raw(input, n - 2, nan.negative);  // ragged tail
  return input;
}

// Every 16-bit pattern, in blocks that start with 1.0 (so the scale is rcp(1.0) for most blocks).
RawInput all_16bit_patterns(DType dtype, int64_t blocksize) {
  std::vector<uint16_t> raw;
  const uint16_t one = dtype == DType::kFloat16 ? 0x3c00 : 0x3f80;
  for (uint32_t p = 0; p < 65536; ++p) {
    if (raw.size() % blocksize == 0) raw.push_back(one);
    raw.push_back(static_cast<uint16_t>(p));
  }
  RawInput input{dtype, static_cast<int64_t>(raw.size()), {}};
  input.bytes.resize(raw.size() * 2);
  std::memcpy(input.bytes.data(), raw.data(), input.bytes.size());
  return input;
}

// Largest float x with below(x) (monotone, true at -inf, false at +inf), by bisection.
template <typename Predicate>
float boundary(Predicate below) {
  auto key = [](float f) {
    const uint32_t b = float_to_bits(f);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
  };
  auto value = [](uint32_t k) { return bits_to_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k); };
  uint32_t lo = key(-std::numeric_limits<float>::infinity());
  uint32_t hi = key(std::numeric_limits<float>::infinity());
  while (hi - lo > 1) {
    const uint32_t mid = lo + (hi - lo) / 2;
    (below(value(mid)) ? lo : hi) = mid;
  }
  return value(lo);
}

// float32 values on and within 3 ulps of every NF4 threshold and FP4 magnitude threshold (both
// signs), in blocks of 64 that start with 1.0.
RawInput threshold_input() {
  std::vector<float> points;
  for (int c = 1; c < 16; ++c) points.push_back(boundary([c](float x) { return quantize_nf4(x) < c; }));
  for (int r = 1; r < 8; ++r) {
    // FP4 rank r boundary on |x|: the largest magnitude whose code has fewer than r magnitude steps.
    float sorted[8];
    for (int c = 0; c < 8; ++c) sorted[c] = fp4_level(c);
    std::sort(sorted, sorted + 8);
    const float magnitude = sorted[r];
    points.push_back(
        boundary([magnitude](float a) { return a < 0.0f || fp4_level(quantize_fp4(a)) < magnitude; }));
  }
  std::vector<float> values;
  for (float t : points) {
    for (float sign : {1.0f, -1.0f}) {
      float x = sign * t;
      for (int k = 0; k < 3; ++k) x = std::nextafter(x, -std::numeric_limits<float>::infinity());
      for (int k = 0; k < 7; ++k) {
        if (values.size() % 64 == 0) values.push_back(1.0f);
        values.push_back(x);
        x = std::nextafter(x, std::numeric_limits<float>::infinity());
      }
    }
  }
  return encode(values, DType::kFloat32);
}

// The 8-bit dynamic map as python/halfbyte/reference.py builds it (torch.linspace in float32,
// float32 midpoints and products, sorted): 127 negatives, zero, 128 positives.
std::vector<float> dynamic_map() {
  std::vector<float> values;
  for (int i = 0; i < 7; ++i) {
    const int items = (1 << i) + 1;
    const float start = 0.1f;
    const float end = 1.0f;
    const float step = (end - start) / static_cast<float>(items - 1);
    std::vector<float> boundaries(items);
    for (int k = 0; k < items; ++k) {
      boundaries[k] = k < items / 2 ? std::fma(step, static_cast<float>(k), start)
                                    : std::fma(-step, static_cast<float>(items - 1 - k), end);
    }
    const float power = static_cast<float>(std::pow(10.0, i - 6));
    for (int k = 0; k + 1 < items; ++k) {
      const float mean = (boundaries[k] + boundaries[k + 1]) / 2.0f;
      values.push_back(power * mean);
      values.push_back(-power * mean);
    }
  }
  values.push_back(0.0f);
  values.push_back(1.0f);
  std::sort(values.begin(), values.end());
  return values;
}

// First differing element of two byte buffers with `stride`-byte elements, or an empty string.
std::string first_difference(const uint8_t* expected, const uint8_t* actual, size_t bytes, size_t stride) {
  if (std::memcmp(expected, actual, bytes) == 0) return "";
  for (size_t i = 0; i < bytes; i += stride) {
    if (std::memcmp(expected + i, actual + i, stride) != 0) {
      uint32_t e = 0;
      uint32_t a = 0;
      std::memcpy(&e, expected + i, stride);
      std::memcpy(&a, actual + i, stride);
      std::ostringstream message;
      message << "element " << i / stride << " of " << bytes / stride << ": expected 0x" << std::hex << e
              << ", got 0x" << a;
      return message.str();
    }
  }
  return "";
}

template <typename T>
void upload(const T* host, size_t bytes, void* device) {
  HB_CUDA_ASSERT(cudaMemcpy(device, host, bytes, cudaMemcpyHostToDevice));
}

std::vector<uint8_t> download(const void* device, size_t bytes) {
  std::vector<uint8_t> host(bytes);
  const cudaError_t status = cudaMemcpy(host.data(), device, bytes, cudaMemcpyDeviceToHost);
  EXPECT_EQ(status, cudaSuccess) << cudaGetErrorString(status);
  return host;
}

// Plain float32 absmax as the scales of cuda::dequantize_4bit.
cuda::BlockScales plain_scales(const float* absmax) {
  cuda::BlockScales scales;
  scales.absmax = absmax;
  return scales;
}

// Quantizes `input` with both kernels and compares absmax and packed codes; then dequantizes the
// CPU's result with both kernels to every output dtype and compares. `offset` shifts every device
// pointer by that many elements / bytes (misaligned pointers take the guarded path).
void check_4bit(const RawInput& input, int64_t blocksize, QuantType type, int64_t offset = 0) {
  SCOPED_TRACE(::testing::Message() << dtype_name(input.dtype) << " n=" << input.n << " blocksize="
                                    << blocksize << " " << type_name(type) << " offset=" << offset);
  const int64_t n = input.n;
  const int64_t blocks = (n + blocksize - 1) / blocksize;
  const int64_t packed_bytes = (n + 1) / 2;
  const int element = dtype_size(input.dtype);

  std::vector<float> cpu_absmax(blocks);
  std::vector<uint8_t> cpu_packed(packed_bytes);
  cpu::quantize_4bit(input.bytes.data(), input.dtype, n, blocksize, type, cpu_absmax.data(),
                     cpu_packed.data(), 0, blocks);

  DeviceBuffer d_input((n + offset) * element);
  DeviceBuffer d_absmax(blocks * sizeof(float));
  DeviceBuffer d_packed(packed_bytes + offset);
  HB_CUDA_ASSERT(d_input.status());
  HB_CUDA_ASSERT(d_absmax.status());
  HB_CUDA_ASSERT(d_packed.status());
  uint8_t* input_ptr = d_input.bytes_ptr() + offset * element;
  uint8_t* packed_ptr = d_packed.bytes_ptr() + offset;
  ASSERT_NO_FATAL_FAILURE(upload(input.bytes.data(), input.bytes.size(), input_ptr));
  HB_CUDA_ASSERT(cudaMemset(d_absmax.get(), 0xAB, d_absmax.bytes()));
  HB_CUDA_ASSERT(cudaMemset(d_packed.get(), 0xCD, d_packed.bytes()));
  HB_CUDA_ASSERT(cuda::quantize_4bit(input_ptr, input.dtype, n, blocksize, type, d_absmax.get<float>(),
                                     packed_ptr, nullptr));
  HB_CUDA_ASSERT(cudaDeviceSynchronize());

  const std::vector<uint8_t> gpu_absmax = download(d_absmax.get(), blocks * sizeof(float));
  const std::vector<uint8_t> gpu_packed = download(packed_ptr, packed_bytes);
  const std::string absmax_diff = first_difference(reinterpret_cast<const uint8_t*>(cpu_absmax.data()),
                                                   gpu_absmax.data(), blocks * sizeof(float), 4);
  ASSERT_TRUE(absmax_diff.empty()) << "absmax " << absmax_diff;
  const std::string packed_diff = first_difference(cpu_packed.data(), gpu_packed.data(), packed_bytes, 1);
  ASSERT_TRUE(packed_diff.empty()) << "packed " << packed_diff;

  float table[16];
  for (int c = 0; c < 16; ++c) table[c] = level_4bit(type, c);
  DeviceBuffer d_table(sizeof(table));
  HB_CUDA_ASSERT(d_table.status());
  ASSERT_NO_FATAL_FAILURE(upload(table, sizeof(table), d_table.get()));
  HB_CUDA_ASSERT(
      cudaMemcpy(d_absmax.get(), cpu_absmax.data(), blocks * sizeof(float), cudaMemcpyHostToDevice));
  for (DType out_dtype : kDTypes) {
    SCOPED_TRACE(::testing::Message() << "dequantize to " << dtype_name(out_dtype));
    const int out_element = dtype_size(out_dtype);
    std::vector<uint8_t> cpu_out(n * out_element);
    cpu::dequantize_4bit(cpu_packed.data(), cpu_absmax.data(), table, n, blocksize, out_dtype, cpu_out.data(),
                         0, blocks);
    DeviceBuffer d_out((n + offset) * out_element);
    HB_CUDA_ASSERT(d_out.status());
    uint8_t* out_ptr = d_out.bytes_ptr() + offset * out_element;
    HB_CUDA_ASSERT(cudaMemset(d_out.get(), 0xEF, d_out.bytes()));
    HB_CUDA_ASSERT(cuda::dequantize_4bit(packed_ptr, plain_scales(d_absmax.get<float>()),
                                         d_table.get<float>(), n, blocksize, out_dtype, out_ptr, nullptr));
    HB_CUDA_ASSERT(cudaDeviceSynchronize());
    const std::vector<uint8_t> gpu_out = download(out_ptr, n * out_element);
    const std::string out_diff =
        first_difference(cpu_out.data(), gpu_out.data(), cpu_out.size(), out_element);
    ASSERT_TRUE(out_diff.empty()) << "output " << out_diff;
  }
}

// Double-quantized scales: random packed codes (both nibbles of every byte), random absmax codes q, the
// dynamic map as nested_code, random nested_absmax with group 1 NaN (sign and payload) and group 2
// infinite. The CPU computes scale[b] = multiply_like_cuda(code[q[b]], absmax2[b / 256]) + offset (a
// separate float add) and dequantizes with cpu::dequantize_4bit; the GPU dequantizes from q, absmax2,
// code and offset. `blocks` is the number of blocks, the last one ragged (n odd). `misalign` shifts the
// output pointer by that many elements (the guarded kernel).
void check_4bit_nested(int64_t blocksize, int64_t blocks, QuantType type, float offset,
                       int64_t misalign = 0) {
  const int64_t n = (blocks - 1) * blocksize + blocksize / 2 + 1;
  const int64_t groups = (blocks + 255) / 256;
  SCOPED_TRACE(::testing::Message() << "nested n=" << n << " blocksize=" << blocksize << " blocks=" << blocks
                                    << " " << type_name(type) << " offset=" << offset
                                    << " misalign=" << misalign);
  ASSERT_GE(groups, 4);
  std::mt19937 generator(static_cast<uint32_t>(blocksize * 7919 + blocks));
  std::uniform_int_distribution<int> byte(0, 255);
  std::uniform_real_distribution<float> uniform(0.05f, 3.0f);
  std::vector<uint8_t> packed((n + 1) / 2);
  for (uint8_t& p : packed) p = static_cast<uint8_t>(byte(generator));
  std::vector<uint8_t> q(blocks);
  for (uint8_t& c : q) c = static_cast<uint8_t>(byte(generator));
  std::vector<float> absmax2(groups);
  for (float& a : absmax2) a = uniform(generator);
  absmax2[1] = bits_to_float(0xffc01234u);  // negative quiet NaN with a payload
  absmax2[2] = std::numeric_limits<float>::infinity();
  const std::vector<float> code = dynamic_map();
  ASSERT_EQ(code.size(), 256u);
  std::vector<float> scales(blocks);
  for (int64_t b = 0; b < blocks; ++b) {
    const float product = multiply_like_cuda(code[q[b]], absmax2[b / 256]);
    scales[b] = product + offset;
  }
  float table[16];
  for (int c = 0; c < 16; ++c) table[c] = level_4bit(type, c);

  DeviceBuffer d_packed(packed.size());
  DeviceBuffer d_q(blocks);
  DeviceBuffer d_absmax2(groups * sizeof(float));
  DeviceBuffer d_code(256 * sizeof(float));
  DeviceBuffer d_offset(sizeof(float));
  DeviceBuffer d_table(sizeof(table));
  for (const DeviceBuffer* buffer : {&d_packed, &d_q, &d_absmax2, &d_code, &d_offset, &d_table}) {
    HB_CUDA_ASSERT(buffer->status());
  }
  ASSERT_NO_FATAL_FAILURE(upload(packed.data(), packed.size(), d_packed.get()));
  ASSERT_NO_FATAL_FAILURE(upload(q.data(), q.size(), d_q.get()));
  ASSERT_NO_FATAL_FAILURE(upload(absmax2.data(), groups * sizeof(float), d_absmax2.get()));
  ASSERT_NO_FATAL_FAILURE(upload(code.data(), 256 * sizeof(float), d_code.get()));
  ASSERT_NO_FATAL_FAILURE(upload(&offset, sizeof(float), d_offset.get()));
  ASSERT_NO_FATAL_FAILURE(upload(table, sizeof(table), d_table.get()));
  cuda::BlockScales nested;
  nested.absmax_codes = d_q.get<uint8_t>();
  nested.nested_absmax = d_absmax2.get<float>();
  nested.nested_code = d_code.get<float>();
  nested.offset = d_offset.get<float>();

  for (DType out_dtype : kDTypes) {
    SCOPED_TRACE(::testing::Message() << "dequantize to " << dtype_name(out_dtype));
    const int out_element = dtype_size(out_dtype);
    std::vector<uint8_t> cpu_out(n * out_element);
    cpu::dequantize_4bit(packed.data(), scales.data(), table, n, blocksize, out_dtype, cpu_out.data(), 0,
                         blocks);
    DeviceBuffer d_out((n + misalign) * out_element);
    HB_CUDA_ASSERT(d_out.status());
    uint8_t* out_ptr = d_out.bytes_ptr() + misalign * out_element;
    HB_CUDA_ASSERT(cudaMemset(d_out.get(), 0xEF, d_out.bytes()));
    HB_CUDA_ASSERT(cuda::dequantize_4bit(d_packed.get<uint8_t>(), nested, d_table.get<float>(), n, blocksize,
                                         out_dtype, out_ptr, nullptr));
    HB_CUDA_ASSERT(cudaDeviceSynchronize());
    const std::vector<uint8_t> gpu_out = download(out_ptr, n * out_element);
    const std::string out_diff =
        first_difference(cpu_out.data(), gpu_out.data(), cpu_out.size(), out_element);
    ASSERT_TRUE(out_diff.empty()) << "output " << out_diff;
  }
}

void check_8bit(const RawInput& input, int64_t blocksize, const std::vector<float>& code,
                int64_t offset = 0) {
  SCOPED_TRACE(::testing::Message() << dtype_name(input.dtype) << " n=" << input.n
                                    << " blocksize=" << blocksize << " offset=" << offset);
  const int64_t n = input.n;
  const int64_t blocks = (n + blocksize - 1) / blocksize;
  const int element = dtype_size(input.dtype);

  std::vector<float> cpu_absmax(blocks);
  std::vector<uint8_t> cpu_codes(n);
  cpu::quantize_blockwise_8bit(input.bytes.data(), input.dtype, n, blocksize, code.data(), cpu_absmax.data(),
                               cpu_codes.data(), 0, blocks);

  DeviceBuffer d_code(code.size() * sizeof(float));
  DeviceBuffer d_input((n + offset) * element);
  DeviceBuffer d_absmax(blocks * sizeof(float));
  DeviceBuffer d_codes(n + offset);
  HB_CUDA_ASSERT(d_code.status());
  HB_CUDA_ASSERT(d_input.status());
  HB_CUDA_ASSERT(d_absmax.status());
  HB_CUDA_ASSERT(d_codes.status());
  uint8_t* input_ptr = d_input.bytes_ptr() + offset * element;
  uint8_t* codes_ptr = d_codes.bytes_ptr() + offset;
  ASSERT_NO_FATAL_FAILURE(upload(code.data(), code.size() * sizeof(float), d_code.get()));
  ASSERT_NO_FATAL_FAILURE(upload(input.bytes.data(), input.bytes.size(), input_ptr));
  HB_CUDA_ASSERT(cudaMemset(d_absmax.get(), 0xAB, d_absmax.bytes()));
  HB_CUDA_ASSERT(cudaMemset(d_codes.get(), 0xCD, d_codes.bytes()));
  HB_CUDA_ASSERT(cuda::quantize_blockwise_8bit(input_ptr, input.dtype, n, blocksize, d_code.get<float>(),
                                               d_absmax.get<float>(), codes_ptr, nullptr));
  HB_CUDA_ASSERT(cudaDeviceSynchronize());

  const std::vector<uint8_t> gpu_absmax = download(d_absmax.get(), blocks * sizeof(float));
  const std::vector<uint8_t> gpu_codes = download(codes_ptr, n);
  const std::string absmax_diff = first_difference(reinterpret_cast<const uint8_t*>(cpu_absmax.data()),
                                                   gpu_absmax.data(), blocks * sizeof(float), 4);
  ASSERT_TRUE(absmax_diff.empty()) << "absmax " << absmax_diff;
  const std::string codes_diff = first_difference(cpu_codes.data(), gpu_codes.data(), n, 1);
  ASSERT_TRUE(codes_diff.empty()) << "codes " << codes_diff;

  HB_CUDA_ASSERT(
      cudaMemcpy(d_absmax.get(), cpu_absmax.data(), blocks * sizeof(float), cudaMemcpyHostToDevice));
  for (DType out_dtype : kDTypes) {
    SCOPED_TRACE(::testing::Message() << "dequantize to " << dtype_name(out_dtype));
    const int out_element = dtype_size(out_dtype);
    std::vector<uint8_t> cpu_out(n * out_element);
    cpu::dequantize_blockwise_8bit(cpu_codes.data(), cpu_absmax.data(), code.data(), n, blocksize, out_dtype,
                                   cpu_out.data(), 0, blocks);
    DeviceBuffer d_out((n + offset) * out_element);
    HB_CUDA_ASSERT(d_out.status());
    uint8_t* out_ptr = d_out.bytes_ptr() + offset * out_element;
    HB_CUDA_ASSERT(cudaMemset(d_out.get(), 0xEF, d_out.bytes()));
    HB_CUDA_ASSERT(cuda::dequantize_blockwise_8bit(codes_ptr, d_absmax.get<float>(), d_code.get<float>(), n,
                                                   blocksize, out_dtype, out_ptr, nullptr));
    HB_CUDA_ASSERT(cudaDeviceSynchronize());
    const std::vector<uint8_t> gpu_out = download(out_ptr, n * out_element);
    const std::string out_diff =
        first_difference(cpu_out.data(), gpu_out.data(), cpu_out.size(), out_element);
    ASSERT_TRUE(out_diff.empty()) << "output " << out_diff;
  }
}

const int64_t kSizes[] = {1, 31, 33, 4097, 37 * 301, 3 * 8192 + 100, (int64_t{1} << 20) + 3};

TEST(CudaBlockwise4bit, RandomNormalAllDtypesBlocksizesAndSizes) {
  HB_SKIP_WITHOUT_CUDA();
  for (int64_t n : kSizes) {
    const std::vector<float> values = normal_values(n, static_cast<uint32_t>(n));
    for (DType dtype : kDTypes) {
      const RawInput input = encode(values, dtype);
      for (int64_t blocksize : kBlocksizes) {
        for (QuantType type : kQuantTypes) ASSERT_NO_FATAL_FAILURE(check_4bit(input, blocksize, type));
      }
    }
  }
}

TEST(CudaBlockwise4bit, SpecialValues) {
  HB_SKIP_WITHOUT_CUDA();
  for (DType dtype : kDTypes) {
    for (int64_t blocksize : kBlocksizes) {
      const RawInput input = special_input(dtype, blocksize);
      for (QuantType type : kQuantTypes) ASSERT_NO_FATAL_FAILURE(check_4bit(input, blocksize, type));
    }
  }
}

TEST(CudaBlockwise4bit, Every16BitPattern) {
  HB_SKIP_WITHOUT_CUDA();
  for (DType dtype : {DType::kFloat16, DType::kBFloat16}) {
    for (int64_t blocksize : {int64_t{32}, int64_t{64}, int64_t{4096}}) {
      const RawInput input = all_16bit_patterns(dtype, blocksize);
      for (QuantType type : kQuantTypes) ASSERT_NO_FATAL_FAILURE(check_4bit(input, blocksize, type));
    }
  }
}

TEST(CudaBlockwise4bit, ValuesOnAndNextToThresholds) {
  HB_SKIP_WITHOUT_CUDA();
  const RawInput input = threshold_input();
  for (QuantType type : kQuantTypes) ASSERT_NO_FATAL_FAILURE(check_4bit(input, 64, type));
}

TEST(CudaBlockwise4bit, MisalignedPointersTakeTheGuardedPath) {
  HB_SKIP_WITHOUT_CUDA();
  for (DType dtype : kDTypes) {
    for (int64_t n : {int64_t{4097}, int64_t{3 * 8192 + 100}}) {
      const RawInput input = encode(normal_values(n, 7u), dtype);
      for (int64_t blocksize : {int64_t{32}, int64_t{64}, int64_t{1024}, int64_t{4096}}) {
        ASSERT_NO_FATAL_FAILURE(check_4bit(input, blocksize, QuantType::kNF4, /*offset=*/2));
        ASSERT_NO_FATAL_FAILURE(check_4bit(input, blocksize, QuantType::kFP4, /*offset=*/1));
      }
    }
  }
}

TEST(CudaBlockwise4bit, NestedScalesMatchTheCpuWithHostComputedScales) {
  HB_SKIP_WITHOUT_CUDA();
  // 3 * 256 + 77 blocks: four nested groups (NaN, inf, a partial last one), not a multiple of 256.
  const int64_t blocks = 3 * 256 + 77;
  for (int64_t blocksize : {int64_t{32}, int64_t{64}, int64_t{4096}}) {
    ASSERT_NO_FATAL_FAILURE(check_4bit_nested(blocksize, blocks, QuantType::kNF4, 0.0271f));
    ASSERT_NO_FATAL_FAILURE(check_4bit_nested(blocksize, blocks, QuantType::kFP4, -0.5f));
  }
  ASSERT_NO_FATAL_FAILURE(check_4bit_nested(64, blocks, QuantType::kNF4, 0.0271f, /*misalign=*/1));
}

TEST(CudaBlockwise4bit, EmptyAndInvalidArguments) {
  HB_SKIP_WITHOUT_CUDA();
  EXPECT_EQ(cuda::quantize_4bit(nullptr, DType::kFloat32, 0, 64, QuantType::kNF4, nullptr, nullptr, nullptr),
            cudaSuccess);
  EXPECT_EQ(
      cuda::dequantize_4bit(nullptr, cuda::BlockScales{}, nullptr, 0, 64, DType::kFloat32, nullptr, nullptr),
      cudaSuccess);
  EXPECT_EQ(cuda::quantize_4bit(nullptr, DType::kFloat32, 10, 48, QuantType::kNF4, nullptr, nullptr, nullptr),
            cudaErrorInvalidValue);
  EXPECT_EQ(cuda::dequantize_4bit(nullptr, cuda::BlockScales{}, nullptr, 10, 8192, DType::kFloat32, nullptr,
                                  nullptr),
            cudaErrorInvalidValue);
  // Neither absmax nor a complete set of nested pointers.
  float dummy = 0.0f;
  cuda::BlockScales partial;
  partial.nested_absmax = &dummy;
  partial.nested_code = &dummy;
  partial.offset = &dummy;
  EXPECT_EQ(cuda::dequantize_4bit(nullptr, partial, nullptr, 10, 64, DType::kFloat32, nullptr, nullptr),
            cudaErrorInvalidValue);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
}

TEST(CudaBlockwise8bit, RandomNormalAllDtypesBlocksizesAndSizes) {
  HB_SKIP_WITHOUT_CUDA();
  const std::vector<float> code = dynamic_map();
  ASSERT_EQ(code.size(), 256u);
  for (int64_t n : kSizes) {
    const std::vector<float> values = normal_values(n, static_cast<uint32_t>(n) + 99u);
    for (DType dtype : kDTypes) {
      const RawInput input = encode(values, dtype);
      for (int64_t blocksize : kBlocksizes) ASSERT_NO_FATAL_FAILURE(check_8bit(input, blocksize, code));
    }
  }
}

TEST(CudaBlockwise8bit, SpecialValuesAndEvery16BitPattern) {
  HB_SKIP_WITHOUT_CUDA();
  const std::vector<float> code = dynamic_map();
  for (DType dtype : kDTypes) {
    for (int64_t blocksize : kBlocksizes)
      ASSERT_NO_FATAL_FAILURE(check_8bit(special_input(dtype, blocksize), blocksize, code));
  }
  for (DType dtype : {DType::kFloat16, DType::kBFloat16}) {
    ASSERT_NO_FATAL_FAILURE(check_8bit(all_16bit_patterns(dtype, 64), 64, code));
  }
}

TEST(CudaBlockwise8bit, MisalignedPointersTakeTheGuardedPath) {
  HB_SKIP_WITHOUT_CUDA();
  const std::vector<float> code = dynamic_map();
  for (DType dtype : kDTypes) {
    const RawInput input = encode(normal_values(3 * 8192 + 100, 11u), dtype);
    for (int64_t blocksize : {int64_t{64}, int64_t{4096}}) {
      ASSERT_NO_FATAL_FAILURE(check_8bit(input, blocksize, code, /*offset=*/2));
      ASSERT_NO_FATAL_FAILURE(check_8bit(input, blocksize, code, /*offset=*/1));
    }
  }
}

TEST(CudaBlockwise8bit, EmptyAndInvalidArguments) {
  HB_SKIP_WITHOUT_CUDA();
  EXPECT_EQ(
      cuda::quantize_blockwise_8bit(nullptr, DType::kFloat32, 0, 64, nullptr, nullptr, nullptr, nullptr),
      cudaSuccess);
  EXPECT_EQ(
      cuda::dequantize_blockwise_8bit(nullptr, nullptr, nullptr, 0, 64, DType::kFloat32, nullptr, nullptr),
      cudaSuccess);
  EXPECT_EQ(
      cuda::quantize_blockwise_8bit(nullptr, DType::kFloat32, 10, 16, nullptr, nullptr, nullptr, nullptr),
      cudaErrorInvalidValue);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
}

// More than 2^31 elements (64-bit indexing): bf16 zeros with random blocks at both ends, compared on
// the first and last blocks (the CPU kernels take a block range).
TEST(CudaBlockwise, MoreThan2To31Elements) {
  HB_SKIP_WITHOUT_CUDA();
  const int64_t n = (int64_t{1} << 31) + (int64_t{1} << 20) + 3;
  const int64_t edge = 1 << 16;  // elements of random data at each end
  DeviceBuffer d_input(n * 2);
  DeviceBuffer d_out(n * 2);
  DeviceBuffer d_codes(n);
  if (d_input.status() != cudaSuccess || d_out.status() != cudaSuccess || d_codes.status() != cudaSuccess) {
    cudaGetLastError();
    GTEST_SKIP() << "not enough device memory for " << n << " elements";
  }
  HB_CUDA_ASSERT(cudaMemset(d_input.get(), 0, n * 2));
  const RawInput host = encode(normal_values(2 * edge, 5u), DType::kBFloat16);
  // host holds 2 * edge elements: the first `edge` go to the start, the rest to the end.
  ASSERT_NO_FATAL_FAILURE(upload(host.bytes.data(), edge * 2, d_input.get()));
  ASSERT_NO_FATAL_FAILURE(
      upload(host.bytes.data() + edge * 2, edge * 2, d_input.bytes_ptr() + (n - edge) * 2));
  std::vector<uint8_t> full_head(host.bytes.begin(), host.bytes.begin() + edge * 2);
  std::vector<uint8_t> full_tail(host.bytes.begin() + edge * 2, host.bytes.end());

  const float nf4[16] = {nf4_level(0),  nf4_level(1),  nf4_level(2),  nf4_level(3),
                         nf4_level(4),  nf4_level(5),  nf4_level(6),  nf4_level(7),
                         nf4_level(8),  nf4_level(9),  nf4_level(10), nf4_level(11),
                         nf4_level(12), nf4_level(13), nf4_level(14), nf4_level(15)};
  DeviceBuffer d_table(sizeof(nf4));
  HB_CUDA_ASSERT(d_table.status());
  ASSERT_NO_FATAL_FAILURE(upload(nf4, sizeof(nf4), d_table.get()));
  const std::vector<float> code = dynamic_map();
  DeviceBuffer d_code(256 * sizeof(float));
  HB_CUDA_ASSERT(d_code.status());
  ASSERT_NO_FATAL_FAILURE(upload(code.data(), 256 * sizeof(float), d_code.get()));

  struct Case {
    bool eight_bit;
    int64_t blocksize;
  };
  for (const Case c : {Case{false, 64}, Case{false, 4096}, Case{true, 64}, Case{true, 4096}}) {
    SCOPED_TRACE(::testing::Message() << (c.eight_bit ? "8-bit" : "4-bit") << " blocksize=" << c.blocksize);
    const int64_t blocks = (n + c.blocksize - 1) / c.blocksize;
    DeviceBuffer d_absmax(blocks * sizeof(float));
    HB_CUDA_ASSERT(d_absmax.status());
    if (c.eight_bit) {
      HB_CUDA_ASSERT(cuda::quantize_blockwise_8bit(d_input.get(), DType::kBFloat16, n, c.blocksize,
                                                   d_code.get<float>(), d_absmax.get<float>(),
                                                   d_codes.get<uint8_t>(), nullptr));
      HB_CUDA_ASSERT(cuda::dequantize_blockwise_8bit(d_codes.get<uint8_t>(), d_absmax.get<float>(),
                                                     d_code.get<float>(), n, c.blocksize, DType::kBFloat16,
                                                     d_out.get(), nullptr));
    } else {
      HB_CUDA_ASSERT(cuda::quantize_4bit(d_input.get(), DType::kBFloat16, n, c.blocksize, QuantType::kNF4,
                                         d_absmax.get<float>(), d_codes.get<uint8_t>(), nullptr));
      HB_CUDA_ASSERT(cuda::dequantize_4bit(d_codes.get<uint8_t>(), plain_scales(d_absmax.get<float>()),
                                           d_table.get<float>(), n, c.blocksize, DType::kBFloat16,
                                           d_out.get(), nullptr));
    }
    HB_CUDA_ASSERT(cudaDeviceSynchronize());

    // Head: blocks [0, edge / blocksize); tail: the last blocks covering the last `edge` elements.
    for (const bool tail : {false, true}) {
      SCOPED_TRACE(tail ? "tail" : "head");
      const int64_t first_block = tail ? (n - edge + c.blocksize - 1) / c.blocksize : 0;
      const int64_t last_block = tail ? blocks : edge / c.blocksize;
      const int64_t first = first_block * c.blocksize;
      const int64_t count = std::min(n, last_block * c.blocksize) - first;
      // The blocks [first_block, last_block) as a tensor of their own: `first` is a multiple of the
      // blocksize, so its blocks, ragged end and odd-n padding are those of the full tensor.
      std::vector<uint8_t> region(count * 2, 0);
      const std::vector<uint8_t>& source = tail ? full_tail : full_head;
      const int64_t source_first = tail ? n - edge : 0;
      for (int64_t i = 0; i < count; ++i) {
        const int64_t s = first + i - source_first;
        if (s >= 0 && s < edge) std::memcpy(&region[i * 2], &source[s * 2], 2);
      }
      const int64_t region_blocks = last_block - first_block;
      std::vector<float> cpu_absmax(region_blocks);
      const int64_t out_bytes = c.eight_bit ? count : (count + 1) / 2;
      std::vector<uint8_t> cpu_codes(out_bytes);
      std::vector<uint8_t> cpu_out(count * 2);
      if (c.eight_bit) {
        cpu::quantize_blockwise_8bit(region.data(), DType::kBFloat16, count, c.blocksize, code.data(),
                                     cpu_absmax.data(), cpu_codes.data(), 0, region_blocks);
        cpu::dequantize_blockwise_8bit(cpu_codes.data(), cpu_absmax.data(), code.data(), count, c.blocksize,
                                       DType::kBFloat16, cpu_out.data(), 0, region_blocks);
      } else {
        cpu::quantize_4bit(region.data(), DType::kBFloat16, count, c.blocksize, QuantType::kNF4,
                           cpu_absmax.data(), cpu_codes.data(), 0, region_blocks);
        cpu::dequantize_4bit(cpu_codes.data(), cpu_absmax.data(), nf4, count, c.blocksize, DType::kBFloat16,
                             cpu_out.data(), 0, region_blocks);
      }
      const std::vector<uint8_t> gpu_absmax =
          download(d_absmax.get<float>() + first_block, cpu_absmax.size() * sizeof(float));
      const std::vector<uint8_t> gpu_codes =
          download(d_codes.bytes_ptr() + (c.eight_bit ? first : first / 2), out_bytes);
      const std::vector<uint8_t> gpu_out = download(d_out.bytes_ptr() + first * 2, count * 2);
      std::string diff = first_difference(reinterpret_cast<const uint8_t*>(cpu_absmax.data()),
                                          gpu_absmax.data(), gpu_absmax.size(), 4);
      ASSERT_TRUE(diff.empty()) << "absmax " << diff;
      diff = first_difference(cpu_codes.data(), gpu_codes.data(), out_bytes, 1);
      ASSERT_TRUE(diff.empty()) << "codes " << diff;
      diff = first_difference(cpu_out.data(), gpu_out.data(), cpu_out.size(), 2);
      ASSERT_TRUE(diff.empty()) << "output " << diff;
    }
  }
}

}  // namespace
}  // namespace halfbyte
