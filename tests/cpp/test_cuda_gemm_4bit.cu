// GoogleTest of halfbyte::cuda::gemm_4bit (csrc/cuda/gemm_4bit_decode.cu) and gemm_4bit_prefill
// (csrc/cuda/gemm_4bit_prefill.cu) against a float64 host
// reference: W dequantized on the host (level * block scale in float32, as the format defines it),
// then out = A W^T (+ bias) in double. Skipped when no CUDA device is present.
//
// The table kernel (16-bit A, M >= 2 on the decode shapes) multiplies levels rounded to A's type: for
// the rows of A it computes, the reference rounds the level the same way (level16 * scale), so the
// check stays as tight as for the exact kernels.
//
// Tolerance: |out - ref| <= 1e-5 * sum_k |a*w| + u * |ref|. The first term covers float32
// accumulation in an order different from the reference (per-chunk partial sums, warp and
// tensor-core reductions; the scale-before kernel also carries each float32 weight as a bf16 hi + lo
// pair, at most 2^-16 relative, whose errors have random signs on this data). The second term is
// the final rounding to the output dtype: u = 2^-8 for bfloat16, 2^-11 for float16, 0 for float32.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "halfbyte/codebooks.h"
#include "halfbyte/cuda_kernels.h"
#include "halfbyte/float_types.h"

namespace halfbyte {
namespace {

bool cuda_available() {
  int count = 0;
  return cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
}

// Device allocation freed on scope exit.
class DeviceBuffer {
 public:
  explicit DeviceBuffer(size_t bytes) : bytes_(bytes) {
    if (bytes > 0 && cudaMalloc(&ptr_, bytes) != cudaSuccess) ptr_ = nullptr;
  }
  ~DeviceBuffer() {
    if (ptr_ != nullptr) cudaFree(ptr_);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  template <typename T = void>
  T* get() const {
    return static_cast<T*>(ptr_);
  }
  bool ok() const { return bytes_ == 0 || ptr_ != nullptr; }
  cudaError_t upload(const void* host, size_t bytes, size_t offset = 0) {
    if (bytes == 0) return cudaSuccess;
    return cudaMemcpy(static_cast<char*>(ptr_) + offset, host, bytes, cudaMemcpyHostToDevice);
  }

 private:
  void* ptr_ = nullptr;
  size_t bytes_;
};

const char* dtype_name(DType d) {
  return d == DType::kFloat32 ? "f32" : d == DType::kFloat16 ? "f16" : "bf16";
}

// A float rounded to the dtype, as raw bits (float32: the float's bits).
uint32_t to_bits(float x, DType d) {
  if (d == DType::kFloat32) return float_to_bits(x);
  return d == DType::kFloat16 ? float_to_fp16(x) : float_to_bf16(x);
}

float from_bits(uint32_t bits, DType d) {
  if (d == DType::kFloat32) return bits_to_float(bits);
  const uint16_t h = static_cast<uint16_t>(bits);
  return d == DType::kFloat16 ? fp16_to_float(h) : bf16_to_float(h);
}

// Raw element i of a dtype array.
uint32_t load_bits(const std::vector<uint8_t>& bytes, int64_t i, DType d) {
  if (d == DType::kFloat32) {
    uint32_t v;
    std::memcpy(&v, bytes.data() + 4 * i, 4);
    return v;
  }
  uint16_t v;
  std::memcpy(&v, bytes.data() + 2 * i, 2);
  return v;
}

void store_bits(std::vector<uint8_t>& bytes, int64_t i, uint32_t v, DType d) {
  if (d == DType::kFloat32) {
    std::memcpy(bytes.data() + 4 * i, &v, 4);
  } else {
    const uint16_t h = static_cast<uint16_t>(v);
    std::memcpy(bytes.data() + 2 * i, &h, 2);
  }
}

struct Case {
  int64_t M = 1, N = 1, K = 32, lda = 32;
  int64_t blocksize = 64;
  QuantType qtype = QuantType::kNF4;
  bool nested = false;
  bool bias = false;
  DType dtype = DType::kBFloat16;
  int64_t a_offset = 0;       // elements before A's first row (odd: unaligned rows)
  int64_t packed_offset = 0;  // bytes before the packed codes (nonzero: unaligned)
  bool prefill = false;       // call gemm_4bit_prefill (the tensor-core kernel for larger M)
  bool wgmma = false;         // ... its sm_90a variant, where the device runs it
  bool tma = false;           // call gemm_4bit_prefill_tma (the warp-specialized sm_90a kernel)
  int tma_rows = 0;           // its rows of A per block (0: its plan's), with tma_splits splits of K
  int tma_splits = 0;
};

std::string describe(const Case& c) {
  char buf[256];
  std::snprintf(
      buf, sizeof(buf), "M=%lld N=%lld K=%lld lda=%lld bs=%lld %s %s %s %s a_off=%lld packed_off=%lld",
      static_cast<long long>(c.M), static_cast<long long>(c.N), static_cast<long long>(c.K),
      static_cast<long long>(c.lda), static_cast<long long>(c.blocksize),
      c.qtype == QuantType::kNF4 ? "nf4" : "fp4", c.nested ? "nested" : "plain", c.bias ? "bias" : "nobias",
      dtype_name(c.dtype), static_cast<long long>(c.a_offset), static_cast<long long>(c.packed_offset));
  return buf;
}

// Host copy of a quantized weight with random codes and scales.
struct HostWeight {
  std::vector<uint8_t> packed;
  std::vector<float> absmax;          // plain
  std::vector<uint8_t> absmax_codes;  // nested
  std::vector<float> nested_absmax;
  std::vector<float> nested_code;
  float offset = 0.0f;
  std::vector<float> scale;  // per block, float32 as the kernel must compute it
};

HostWeight make_weight(const Case& c, std::mt19937_64& rng) {
  HostWeight w;
  const int64_t n = c.N * c.K;
  const int64_t nblocks = (n + c.blocksize - 1) / c.blocksize;
  std::uniform_int_distribution<int> byte(0, 255);
  std::uniform_real_distribution<float> pos(0.05f, 2.0f);
  std::uniform_real_distribution<float> sym(-1.0f, 1.0f);
  w.packed.resize((n + 1) / 2);
  for (auto& b : w.packed) b = static_cast<uint8_t>(byte(rng));
  w.scale.resize(nblocks);
  if (!c.nested) {
    w.absmax.resize(nblocks);
    for (int64_t b = 0; b < nblocks; ++b) w.scale[b] = w.absmax[b] = pos(rng);
  } else {
    w.absmax_codes.resize(nblocks);
    for (auto& b : w.absmax_codes) b = static_cast<uint8_t>(byte(rng));
    w.nested_absmax.resize((nblocks + kNestedBlocksize - 1) / kNestedBlocksize);
    for (auto& x : w.nested_absmax) x = pos(rng);
    w.nested_code.resize(256);
    for (auto& x : w.nested_code) x = sym(rng);
    w.offset = pos(rng);
    for (int64_t b = 0; b < nblocks; ++b) {
      const float product = w.nested_code[w.absmax_codes[b]] * w.nested_absmax[b / kNestedBlocksize];
      w.scale[b] = product + w.offset;  // float32: product first, then the add
    }
  }
  return w;
}

struct DeviceWeight {
  DeviceBuffer packed, absmax, absmax_codes, nested_absmax, nested_code, offset, table;
  cuda::BlockScales scales;
  const uint8_t* packed_ptr = nullptr;

  DeviceWeight(const HostWeight& w, const Case& c)
      : packed(w.packed.size() + c.packed_offset),
        absmax(w.absmax.size() * 4),
        absmax_codes(w.absmax_codes.size()),
        nested_absmax(w.nested_absmax.size() * 4),
        nested_code(w.nested_code.size() * 4),
        offset(4),
        table(16 * 4) {}

  cudaError_t upload(const HostWeight& w, const Case& c) {
    if (!packed.ok() || !absmax.ok() || !absmax_codes.ok() || !nested_absmax.ok() || !nested_code.ok() ||
        !offset.ok() || !table.ok()) {
      return cudaErrorMemoryAllocation;
    }
    cudaError_t err = packed.upload(w.packed.data(), w.packed.size(), c.packed_offset);
    packed_ptr = packed.get<uint8_t>() + c.packed_offset;
    float levels[16];
    for (int i = 0; i < 16; ++i) levels[i] = level_4bit(c.qtype, i);
    if (err == cudaSuccess) err = table.upload(levels, sizeof(levels));
    if (!c.nested) {
      if (err == cudaSuccess) err = absmax.upload(w.absmax.data(), w.absmax.size() * 4);
      scales.absmax = absmax.get<float>();
    } else {
      if (err == cudaSuccess) err = absmax_codes.upload(w.absmax_codes.data(), w.absmax_codes.size());
      if (err == cudaSuccess) err = nested_absmax.upload(w.nested_absmax.data(), w.nested_absmax.size() * 4);
      if (err == cudaSuccess) err = nested_code.upload(w.nested_code.data(), w.nested_code.size() * 4);
      if (err == cudaSuccess) err = offset.upload(&w.offset, 4);
      scales.absmax_codes = absmax_codes.get<uint8_t>();
      scales.nested_absmax = nested_absmax.get<float>();
      scales.nested_code = nested_code.get<float>();
      scales.offset = offset.get<float>();
    }
    return err;
  }
};

// Rows of A that gemm_4bit sends through the table kernel, which multiplies levels rounded to A's type (the
// dispatch loop of gemm_4bit_typed in gemm_4bit_decode.cu, replayed): 16-bit A with 16-byte aligned rows,
// aligned codes, K % 64 == 0, blocksize >= 64; launches of at most 16 rows, each of at least 2 rows, except
// that 2 or 3 rows on small weights (gemm_4bit_ffma_rows) take the FFMA kernel (as do single rows), in
// launches of at most 3 rows.
std::vector<bool> table_kernel_rows(const Case& c) {
  std::vector<bool> rows(c.M, false);
  const int64_t esize = dtype_size(c.dtype);
  const bool table = !c.prefill && c.dtype != DType::kFloat32 && c.K > 0 && c.K % 64 == 0 &&
                     c.blocksize >= 64 && c.packed_offset == 0 && (c.a_offset * esize) % 16 == 0 &&
                     (c.lda * esize) % 16 == 0;
  if (!table) return rows;
  const int64_t elements = c.N * c.K;
  for (int64_t m0 = 0; m0 < c.M;) {
    const int64_t left = c.M - m0;
    const bool ffma = cuda::gemm_4bit_ffma_rows(left, elements);
    const int64_t n = left >= 2 && !ffma ? std::min<int64_t>(left, 16) : std::min<int64_t>(left, 3);
    for (int64_t m = m0; m < m0 + n; ++m) rows[m] = left >= 2 && !ffma;
    m0 += n;
  }
  return rows;
}

// Runs one case and compares every output with the reference (failures reported through gtest).
void run_case(const Case& c, uint64_t seed) {
  SCOPED_TRACE(describe(c));
  std::mt19937_64 rng(seed);
  const HostWeight w = make_weight(c, rng);
  const int esize = dtype_size(c.dtype);

  // A: M rows of stride lda after a_offset elements; random values rounded to the dtype.
  const int64_t a_elems = c.a_offset + (c.M > 0 ? (c.M - 1) * c.lda + c.K : 0);
  std::vector<uint8_t> a_bytes(a_elems * esize, 0);
  std::vector<float> a(c.M * c.K);
  std::uniform_real_distribution<float> sym(-1.0f, 1.0f);
  for (int64_t m = 0; m < c.M; ++m) {
    for (int64_t k = 0; k < c.K; ++k) {
      const uint32_t bits = to_bits(sym(rng), c.dtype);
      store_bits(a_bytes, c.a_offset + m * c.lda + k, bits, c.dtype);
      a[m * c.K + k] = from_bits(bits, c.dtype);
    }
  }
  std::vector<uint8_t> bias_bytes(c.bias ? c.N * esize : 0);
  std::vector<float> bias(c.N, 0.0f);
  if (c.bias) {
    for (int64_t j = 0; j < c.N; ++j) {
      const uint32_t bits = to_bits(sym(rng), c.dtype);
      store_bits(bias_bytes, j, bits, c.dtype);
      bias[j] = from_bits(bits, c.dtype);
    }
  }

  DeviceWeight dw(w, c);
  ASSERT_EQ(dw.upload(w, c), cudaSuccess);
  DeviceBuffer d_a(a_bytes.size()), d_bias(bias_bytes.size()), d_out(c.M * c.N * esize);
  ASSERT_TRUE(d_a.ok() && d_bias.ok() && d_out.ok());
  if (!a_bytes.empty()) ASSERT_EQ(d_a.upload(a_bytes.data(), a_bytes.size()), cudaSuccess);
  if (c.bias) ASSERT_EQ(d_bias.upload(bias_bytes.data(), bias_bytes.size()), cudaSuccess);
  // Poison the output with NaN (all-ones bytes) so that an unwritten element fails the check.
  if (c.M * c.N > 0) ASSERT_EQ(cudaMemset(d_out.get(), 0xff, c.M * c.N * esize), cudaSuccess);

  const void* a_ptr = d_a.get<uint8_t>() + c.a_offset * esize;
  if (c.tma) {
    ASSERT_TRUE(cuda::gemm_4bit_prefill_tma_supported(c.dtype, c.M, c.N, c.K, c.lda, a_ptr, dw.packed_ptr,
                                                      c.blocksize, dw.scales.absmax_codes));
    cuda::PrefillPlan plan;
    ASSERT_EQ(cuda::gemm_4bit_prefill_tma_plan(c.M, c.N, c.K, &plan), cudaSuccess);
    if (c.tma_rows > 0) {
      const int64_t stages = c.K / 64;
      plan.rows_per_block = c.tma_rows;
      cuda::set_prefill_splits(plan, stages, c.tma_splits, c.M, c.N);
    }
    DeviceBuffer workspace(plan.workspace_floats * 4);
    ASSERT_TRUE(workspace.ok());
    ASSERT_EQ(
        cuda::gemm_4bit_prefill_tma(a_ptr, c.dtype, c.M, c.K, c.lda, dw.packed_ptr, dw.scales,
                                    dw.table.get<float>(), c.N, c.blocksize, c.bias ? d_bias.get() : nullptr,
                                    d_out.get(), plan, workspace.get<float>(), nullptr),
        cudaSuccess);
  } else if (c.prefill) {
    ASSERT_TRUE(cuda::gemm_4bit_prefill_supported(c.dtype, c.M, c.N, c.K, c.lda, a_ptr, dw.packed_ptr,
                                                  c.blocksize, dw.scales.absmax_codes));
    cuda::PrefillPlan plan;
    ASSERT_EQ(cuda::gemm_4bit_prefill_plan(c.M, c.N, c.K, c.wgmma, &plan), cudaSuccess);
    DeviceBuffer workspace(plan.workspace_floats * 4);
    ASSERT_TRUE(workspace.ok());
    ASSERT_EQ(
        cuda::gemm_4bit_prefill(a_ptr, c.dtype, c.M, c.K, c.lda, dw.packed_ptr, dw.scales,
                                dw.table.get<float>(), c.N, c.blocksize, c.bias ? d_bias.get() : nullptr,
                                d_out.get(), plan, workspace.get<float>(), nullptr),
        cudaSuccess);
  } else {
    ASSERT_EQ(
        cuda::gemm_4bit(a_ptr, c.dtype, c.M, c.K, c.lda, dw.packed_ptr, dw.scales, dw.table.get<float>(), c.N,
                        c.blocksize, c.bias ? d_bias.get() : nullptr, d_out.get(), nullptr),
        cudaSuccess);
  }
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  std::vector<uint8_t> out_bytes(c.M * c.N * esize);
  if (!out_bytes.empty()) {
    ASSERT_EQ(cudaMemcpy(out_bytes.data(), d_out.get(), out_bytes.size(), cudaMemcpyDeviceToHost),
              cudaSuccess);
  }

  // Reference: dequantized weights in float32 (level * scale), products and sums in double; for the rows
  // of A the table kernel computes, the level rounded to A's type first.
  const std::vector<bool> rounded_levels = table_kernel_rows(c);
  std::vector<double> wrow(c.K), wrow_rounded(c.K);
  const double unit = c.dtype == DType::kBFloat16  ? std::ldexp(1.0, -8)
                      : c.dtype == DType::kFloat16 ? std::ldexp(1.0, -11)
                                                   : 0.0;
  int64_t bad = 0;
  for (int64_t j = 0; j < c.N; ++j) {
    for (int64_t k = 0; k < c.K; ++k) {
      const int64_t e = j * c.K + k;
      const uint8_t byte = w.packed[e / 2];
      const int code = (e % 2 == 0) ? (byte >> 4) : (byte & 15);
      const float level = level_4bit(c.qtype, code);
      wrow[k] = level * w.scale[e / c.blocksize];
      if (c.dtype != DType::kFloat32) {
        wrow_rounded[k] =
            static_cast<double>(from_bits(to_bits(level, c.dtype), c.dtype)) * w.scale[e / c.blocksize];
      }
    }
    for (int64_t m = 0; m < c.M; ++m) {
      double sum = 0.0, abs_sum = 0.0;
      const float* am = a.data() + m * c.K;
      const std::vector<double>& wm = rounded_levels[m] ? wrow_rounded : wrow;
      for (int64_t k = 0; k < c.K; ++k) {
        const double p = static_cast<double>(am[k]) * wm[k];
        sum += p;
        abs_sum += std::fabs(p);
      }
      const double ref = sum + bias[j];
      const double got = from_bits(load_bits(out_bytes, m * c.N + j, c.dtype), c.dtype);
      // fp32 adds the bias to the float32 sum: 2^-24 of |bias| more.
      const double tol =
          1e-5 * abs_sum + std::ldexp(std::fabs(bias[j]), -23) + unit * (std::fabs(ref) + 1e-5 * abs_sum) +
          (c.dtype == DType::kFloat16 ? std::ldexp(1.0, -25) : 0.0) +
          // the prefill kernel rounds each weight to the dtype: 2^-9 / 2^-12 of |a*w|
          (c.prefill || c.tma ? std::ldexp(abs_sum, c.dtype == DType::kFloat16 ? -12 : -9) : 0.0);
      const double err = std::fabs(got - ref);
      if (!(err <= tol)) {
        if (++bad <= 5) {
          ADD_FAILURE() << "out[" << m << ", " << j << "] = " << got << ", reference " << ref << ", |err| "
                        << err << " > tol " << tol;
        }
      }
    }
  }
  EXPECT_EQ(bad, 0) << "mismatching outputs";
}

#define SKIP_WITHOUT_CUDA()                                  \
  do {                                                       \
    if (!cuda_available()) GTEST_SKIP() << "no CUDA device"; \
  } while (0)

// Every path for each dtype and M: K = 4096 + 64 takes the table tensor-core kernel (16-bit A,
// 2 <= M <= 16 per launch; 65 segments, so the last warps' ranges are partly past K), K = 4096 + 32
// the scale-before one (M >= 4) or the FFMA kernel, K = 333 the generic kernel; float32 A and M = 1
// take the FFMA kernel.
TEST(CudaGemm4bit, EveryRowCountAndDtype) {
  SKIP_WITHOUT_CUDA();
  uint64_t seed = 1;
  for (DType dtype : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
    for (int64_t M : {1, 2, 3, 4, 7, 8, 16, 17, 33}) {
      for (int64_t K : {int64_t{4096 + 64}, int64_t{4096 + 32}, int64_t{333}}) {
        Case c;
        c.M = M, c.N = 257, c.K = K, c.lda = K, c.blocksize = 64, c.bias = true, c.dtype = dtype;
        run_case(c, seed++);
      }
    }
  }
}

// Every blocksize with every K: chunks inside one block, K not a multiple of the blocksize (blocks
// straddle rows), K shorter than a block, and the generic path.
TEST(CudaGemm4bit, BlocksizesAndOddK) {
  SKIP_WITHOUT_CUDA();
  uint64_t seed = 100;
  for (int64_t bs : {32, 64, 128, 256, 1024, 4096}) {
    for (int64_t K : {32, 64, 100, 4096 + 32, 4096 + 64, 333}) {
      for (int64_t M : {1, 3, 8, 16}) {
        Case c;
        c.M = M, c.N = 64 + 3, c.K = K, c.lda = K, c.blocksize = bs;
        c.nested = (seed % 2) == 0;
        c.qtype = (seed % 3) == 0 ? QuantType::kFP4 : QuantType::kNF4;
        c.dtype = (seed % 5) == 0 ? DType::kFloat16 : DType::kBFloat16;
        run_case(c, seed++);
      }
    }
  }
}

// Row strides and unaligned A: lda > K (aligned and odd), A starting at an odd element.
TEST(CudaGemm4bit, StridedAndUnalignedA) {
  SKIP_WITHOUT_CUDA();
  uint64_t seed = 200;
  for (DType dtype : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
    for (int64_t M : {1, 2, 4, 16}) {
      for (int variant = 0; variant < 3; ++variant) {
        Case c;
        c.M = M, c.N = 100, c.K = 4096 + 64, c.dtype = dtype, c.bias = variant != 1;
        c.lda = variant == 0 ? c.K + 64 : c.K + 3;
        c.a_offset = variant == 2 ? 1 : 0;
        c.nested = variant == 1;
        run_case(c, seed++);
      }
    }
  }
}

// Packed codes at an address that is not 16-byte aligned: the generic path.
TEST(CudaGemm4bit, UnalignedPackedWeights) {
  SKIP_WITHOUT_CUDA();
  for (int64_t M : {1, 5}) {
    Case c;
    c.M = M, c.N = 33, c.K = 256, c.lda = 256, c.packed_offset = 1, c.bias = true;
    run_case(c, 300 + M);
  }
}

// N * K odd, N = 1 and tails of the 8-, 4- and 32-row blocks.
TEST(CudaGemm4bit, SmallAndOddShapes) {
  SKIP_WITHOUT_CUDA();
  uint64_t seed = 400;
  for (int64_t N : {1, 3, 5, 31, 33, 1000}) {
    for (int64_t K : {32, 333}) {
      for (int64_t M : {1, 4, 9}) {
        Case c;
        c.M = M, c.N = N, c.K = K, c.lda = K, c.blocksize = 32, c.bias = (seed % 2) == 1;
        c.nested = (seed % 3) == 0;
        run_case(c, seed++);
      }
    }
  }
}

// Random combinations of everything above.
TEST(CudaGemm4bit, RandomCombinations) {
  SKIP_WITHOUT_CUDA();
  std::mt19937_64 rng(12345);
  const int64_t Ms[] = {1, 2, 3, 4, 7, 8, 16, 17, 33};
  const int64_t Ns[] = {1, 3, 64, 257, 1000};
  const int64_t Ks[] = {32, 64, 100, 4096 + 32, 4096 + 64, 333};
  const int64_t bss[] = {32, 64, 128, 256, 1024, 4096};
  const DType dtypes[] = {DType::kFloat32, DType::kFloat16, DType::kBFloat16};
  auto pick = [&rng](auto& arr) { return arr[rng() % (sizeof(arr) / sizeof(arr[0]))]; };
  for (int i = 0; i < 120; ++i) {
    Case c;
    c.M = pick(Ms), c.N = pick(Ns), c.K = pick(Ks), c.blocksize = pick(bss), c.dtype = pick(dtypes);
    c.qtype = rng() % 2 ? QuantType::kNF4 : QuantType::kFP4;
    c.nested = rng() % 2;
    c.bias = rng() % 2;
    const int stride = static_cast<int>(rng() % 4);  // 0, 1: lda = K; 2: K + 8; 3: K + 5
    c.lda = c.K + (stride == 2 ? 8 : stride == 3 ? 5 : 0);
    c.a_offset = rng() % 8 == 0 ? 3 : 0;
    run_case(c, 1000 + i);
  }
}

// N > 8192, not a multiple of 32; K = 192 is 3 segments (the second of the last pair past K).
TEST(CudaGemm4bit, LargeN) {
  SKIP_WITHOUT_CUDA();
  uint64_t seed = 600;
  for (DType dtype : {DType::kFloat16, DType::kBFloat16}) {
    for (int64_t M : {1, 5, 16}) {
      for (bool nested : {false, true}) {
        Case c;
        c.M = M, c.N = 8192 + 40, c.K = 192, c.lda = 192, c.blocksize = 128, c.dtype = dtype, c.bias = true;
        c.nested = nested;
        run_case(c, seed++);
      }
    }
  }
}

// The table kernel's block shapes, picked from the tile count and the resident blocks (on an H100:
// 16-warp blocks below N = 8448, 8-warp blocks with 32-row tiles above, 64-row tiles from N = 33729,
// 128-row tiles from N = 67457; float16 A with M > 8 always takes 8-warp blocks). K = 192 ends in a
// half-used pair of segments, K = 256 does not.
TEST(CudaGemm4bit, TableKernelTileShapes) {
  SKIP_WITHOUT_CUDA();
  uint64_t seed = 700;
  for (int64_t N : {9000, 40000, 70000}) {
    for (int64_t K : {192, 256}) {
      for (int64_t M : {4, 9, 16}) {  // 2 or 3 rows take the FFMA kernel on weights this small
        Case c;
        c.M = M, c.N = N, c.K = K, c.lda = K, c.blocksize = K == 192 ? 64 : 128, c.bias = true;
        c.dtype = (seed % 2) == 0 ? DType::kBFloat16 : DType::kFloat16;
        c.nested = (seed % 3) == 0;
        run_case(c, seed++);
      }
    }
  }
}

// 2 and 3 rows of A on the table kernel: weights just past the sizes below which those row counts take the
// FFMA kernel (2^24 elements for 2 rows, 2^23 for 3).
TEST(CudaGemm4bit, TableKernelTwoAndThreeRows) {
  SKIP_WITHOUT_CUDA();
  uint64_t seed = 750;
  for (int64_t M : {2, 3}) {
    for (bool nested : {false, true}) {
      Case c;
      c.M = M, c.N = M == 2 ? 16400 : 2100, c.K = 4096, c.lda = 4096, c.blocksize = 64, c.bias = nested;
      c.dtype = nested ? DType::kFloat16 : DType::kBFloat16;
      c.nested = nested;
      run_case(c, seed++);
    }
  }
}

// The tensor-core kernel for larger M (gemm_4bit_prefill): every tile height (M up to 16, 32, 64,
// more), M and N not multiples of the tiles, split K (few tiles) and one split (many), blocksizes from
// 64, nested scales, both dtypes, strided A.
TEST(CudaGemm4bit, PrefillKernel) {
  SKIP_WITHOUT_CUDA();
  uint64_t seed = 900;
  for (int64_t M : {1, 17, 40, 64, 100, 300}) {
    for (int64_t N : {136, 4104}) {
      for (int64_t K : {256, 1088}) {
        Case c;
        c.prefill = true;
        c.M = M, c.N = N, c.K = K, c.lda = (seed % 4) == 0 ? K + 8 : K, c.bias = (seed % 2) == 0;
        c.blocksize = (seed % 3) == 0 ? 128 : (seed % 3) == 1 ? 64 : 1024;
        c.dtype = (seed % 2) == 0 ? DType::kBFloat16 : DType::kFloat16;
        c.nested = (seed % 5) < 2;
        c.qtype = (seed % 7) == 0 ? QuantType::kFP4 : QuantType::kNF4;
        run_case(c, seed++);
        if (cuda::gemm_4bit_prefill_has_wgmma()) {
          c.wgmma = true;
          run_case(c, seed++);
        }
      }
    }
  }
}

// The warp-specialized sm_90a kernel (gemm_4bit_prefill_tma) where the device runs it: each tile height (64,
// 128, 256 rows of A) with one split and with K split, M and N not multiples of the tiles, blocksizes from 64
// (256: the nested codes' last 4-byte word is partial), nested scales, both dtypes, strided A, bias.
TEST(CudaGemm4bit, PrefillTmaKernel) {
  SKIP_WITHOUT_CUDA();
  if (!cuda::gemm_4bit_prefill_tma_supported(DType::kBFloat16, 64, 128, 64, 64, nullptr, nullptr, 64,
                                             nullptr)) {
    GTEST_SKIP() << "needs an sm_90a build on a compute capability 9.0 device";
  }
  uint64_t seed = 1900;
  for (int64_t M : {17, 64, 100, 300}) {
    for (int rows : {64, 128, 256}) {
      for (int splits : {1, 3}) {
        Case c;
        c.tma = true, c.tma_rows = rows, c.tma_splits = splits;
        c.M = M, c.N = (seed % 2) == 0 ? 136 : 264, c.K = (seed % 3) == 0 ? 320 : 1088;
        c.lda = (seed % 4) == 0 ? c.K + 8 : c.K, c.bias = (seed % 2) == 1;
        c.blocksize = (seed % 3) == 0 ? 256 : (seed % 3) == 1 ? 64 : 1024;
        c.dtype = (seed % 2) == 0 ? DType::kBFloat16 : DType::kFloat16;
        c.nested = (seed % 5) < 3;
        c.qtype = (seed % 7) == 0 ? QuantType::kFP4 : QuantType::kNF4;
        run_case(c, seed++);
      }
    }
  }
}

// K == 0: out = bias, or zeros without bias.
TEST(CudaGemm4bit, EmptyK) {
  SKIP_WITHOUT_CUDA();
  for (DType dtype : {DType::kFloat32, DType::kBFloat16}) {
    for (bool bias : {false, true}) {
      Case c;
      c.M = 3, c.N = 70, c.K = 0, c.lda = 0, c.bias = bias, c.dtype = dtype;
      run_case(c, 500);
    }
  }
}

// M == 0 or N == 0: success, nothing written; invalid arguments are rejected.
TEST(CudaGemm4bit, EmptyAndInvalidArguments) {
  SKIP_WITHOUT_CUDA();
  DeviceBuffer buf(4096);
  ASSERT_TRUE(buf.ok());
  ASSERT_EQ(cudaMemset(buf.get(), 0x5a, 4096), cudaSuccess);
  cuda::BlockScales plain;
  plain.absmax = buf.get<float>();
  const float* table = buf.get<float>();
  uint8_t* packed = buf.get<uint8_t>();
  void* out = buf.get<uint8_t>() + 2048;
  EXPECT_EQ(cuda::gemm_4bit(buf.get(), DType::kBFloat16, 0, 64, 64, packed, plain, table, 8, 64, nullptr, out,
                            nullptr),
            cudaSuccess);
  EXPECT_EQ(cuda::gemm_4bit(buf.get(), DType::kBFloat16, 2, 64, 64, packed, plain, table, 0, 64, nullptr, out,
                            nullptr),
            cudaSuccess);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  std::vector<uint8_t> host(4096);
  ASSERT_EQ(cudaMemcpy(host.data(), buf.get(), 4096, cudaMemcpyDeviceToHost), cudaSuccess);
  for (uint8_t b : host) ASSERT_EQ(b, 0x5a);
  // Blocksize not a power of two in 32..4096, lda < K, negative sizes, nested scales incomplete.
  EXPECT_EQ(cuda::gemm_4bit(buf.get(), DType::kBFloat16, 1, 64, 64, packed, plain, table, 8, 48, nullptr, out,
                            nullptr),
            cudaErrorInvalidValue);
  EXPECT_EQ(cuda::gemm_4bit(buf.get(), DType::kBFloat16, 1, 64, 63, packed, plain, table, 8, 64, nullptr, out,
                            nullptr),
            cudaErrorInvalidValue);
  EXPECT_EQ(cuda::gemm_4bit(buf.get(), DType::kBFloat16, -1, 64, 64, packed, plain, table, 8, 64, nullptr,
                            out, nullptr),
            cudaErrorInvalidValue);
  cuda::BlockScales nested;
  nested.absmax_codes = packed;
  EXPECT_EQ(cuda::gemm_4bit(buf.get(), DType::kBFloat16, 1, 64, 64, packed, nested, table, 8, 64, nullptr,
                            out, nullptr),
            cudaErrorInvalidValue);
}

// Comma-separated integers of an environment variable, or `fallback` when it is unset.
std::vector<int64_t> env_list(const char* name, std::vector<int64_t> fallback) {
  const char* text = std::getenv(name);
  if (text == nullptr || *text == '\0') return fallback;
  std::vector<int64_t> values;
  std::stringstream items(text);
  for (std::string item; std::getline(items, item, ',');) values.push_back(std::stoll(item));
  return values;
}

// Timing of the decode shapes (bf16, NF4, blocksize 64), not a correctness test: run with
// --gtest_also_run_disabled_tests --gtest_filter='*Bandwidth*'. Replays a CUDA graph of 20 launches
// over enough weight copies that they do not stay in L2; prints the median microseconds per launch,
// GB/s of the bytes that must move, and that rate as a share of the device-to-device copy rate.
// HALFBYTE_BENCH_N / HALFBYTE_BENCH_M (comma-separated) pick the rows of W (with their Llama K) and of
// A, e.g. to profile one launch.
TEST(CudaGemm4bit, DISABLED_Bandwidth) {
  SKIP_WITHOUT_CUDA();
  struct Shape {
    int64_t N, K;
  };
  const Shape all_shapes[] = {{4096, 4096}, {1024, 4096}, {14336, 4096}, {4096, 14336}, {128256, 4096}};
  const std::vector<int64_t> rows_of_w = env_list("HALFBYTE_BENCH_N", {});
  const std::vector<int64_t> rows_of_a = env_list("HALFBYTE_BENCH_M", {1, 4, 16});
  const int64_t max_m = *std::max_element(rows_of_a.begin(), rows_of_a.end());
  std::vector<Shape> shapes;
  for (const Shape& s : all_shapes) {
    const bool picked =
        rows_of_w.empty() || std::find(rows_of_w.begin(), rows_of_w.end(), s.N) != rows_of_w.end();
    if (picked) shapes.push_back(s);
  }
  cudaStream_t stream;
  ASSERT_EQ(cudaStreamCreate(&stream), cudaSuccess);
  cudaEvent_t start, stop;
  ASSERT_EQ(cudaEventCreate(&start), cudaSuccess);
  ASSERT_EQ(cudaEventCreate(&stop), cudaSuccess);
  // Copy bandwidth of this device (bytes read + written) as the reference rate.
  double copy_gbps = 0.0;
  {
    const size_t bytes = size_t{512} << 20;
    DeviceBuffer src(bytes), dst(bytes);
    ASSERT_TRUE(src.ok() && dst.ok());
    ASSERT_EQ(cudaMemset(src.get(), 1, bytes), cudaSuccess);
    std::vector<float> times;
    for (int rep = 0; rep < 12; ++rep) {
      ASSERT_EQ(cudaEventRecord(start, stream), cudaSuccess);
      ASSERT_EQ(cudaMemcpyAsync(dst.get(), src.get(), bytes, cudaMemcpyDeviceToDevice, stream), cudaSuccess);
      ASSERT_EQ(cudaEventRecord(stop, stream), cudaSuccess);
      ASSERT_EQ(cudaEventSynchronize(stop), cudaSuccess);
      float ms = 0;
      ASSERT_EQ(cudaEventElapsedTime(&ms, start, stop), cudaSuccess);
      if (rep >= 2) times.push_back(ms);
    }
    std::sort(times.begin(), times.end());
    copy_gbps = 2.0 * bytes / (times[times.size() / 2] * 1e-3) * 1e-9;
    cudaDeviceProp prop;
    ASSERT_EQ(cudaGetDeviceProperties(&prop, 0), cudaSuccess);
    std::printf("%s, %d SMs; device-to-device copy %.0f GB/s (read + write)\n", prop.name,
                prop.multiProcessorCount, copy_gbps);
  }
  std::printf("%-12s %3s %6s %10s %9s %7s\n", "NxK", "M", "nested", "us", "GB/s", "%copy");
  for (const Shape& s : shapes) {
    const int64_t n = s.N * s.K;
    const int64_t nblocks = n / 64;
    const int64_t weight_bytes = n / 2 + nblocks * 4;
    const int copies = static_cast<int>(std::max<int64_t>(1, (400ll << 20) / weight_bytes));
    DeviceBuffer packed(copies * (n / 2)), absmax(copies * nblocks * 4), codes(copies * nblocks),
        nested_absmax(copies * (nblocks / 256 + 1) * 4), nested_code(256 * 4), offset(4), table(64),
        a(max_m * s.K * 2), out(max_m * s.N * 2);
    ASSERT_TRUE(packed.ok() && absmax.ok() && codes.ok() && nested_absmax.ok() && a.ok() && out.ok());
    // Random-looking bytes everywhere (never time zeros); positive scales.
    std::vector<float> levels(16);
    for (int i = 0; i < 16; ++i) levels[i] = nf4_level(i);
    ASSERT_EQ(table.upload(levels.data(), 64), cudaSuccess);
    std::vector<uint8_t> host_bytes(1 << 20);
    std::mt19937 rng(7);
    for (auto& b : host_bytes) b = static_cast<uint8_t>(rng());
    auto fill = [&](DeviceBuffer& buf, size_t bytes) {
      for (size_t off = 0; off < bytes; off += host_bytes.size()) {
        ASSERT_EQ(buf.upload(host_bytes.data(), std::min(host_bytes.size(), bytes - off), off), cudaSuccess);
      }
    };
    fill(packed, copies * (n / 2));
    fill(codes, copies * nblocks);
    std::vector<float> ones(std::max<int64_t>(nblocks, 256), 0.5f);
    for (int cp = 0; cp < copies; ++cp) {
      ASSERT_EQ(absmax.upload(ones.data(), nblocks * 4, cp * nblocks * 4), cudaSuccess);
      ASSERT_EQ(nested_absmax.upload(ones.data(), (nblocks / 256 + 1) * 4, cp * (nblocks / 256 + 1) * 4),
                cudaSuccess);
    }
    ASSERT_EQ(nested_code.upload(ones.data(), 256 * 4), cudaSuccess);
    ASSERT_EQ(offset.upload(ones.data(), 4), cudaSuccess);
    std::vector<uint16_t> a_host(max_m * s.K);
    for (auto& x : a_host) x = float_to_bf16(std::uniform_real_distribution<float>(-1, 1)(rng));
    ASSERT_EQ(a.upload(a_host.data(), a_host.size() * 2), cudaSuccess);
    for (int64_t M : rows_of_a) {
      for (bool nested : {false, true}) {
        auto launch = [&](int cp) {
          cuda::BlockScales sc;
          if (nested) {
            sc.absmax_codes = codes.get<uint8_t>() + cp * nblocks;
            sc.nested_absmax = nested_absmax.get<float>() + cp * (nblocks / 256 + 1);
            sc.nested_code = nested_code.get<float>();
            sc.offset = offset.get<float>();
          } else {
            sc.absmax = absmax.get<float>() + cp * nblocks;
          }
          return cuda::gemm_4bit(a.get(), DType::kBFloat16, M, s.K, s.K, packed.get<uint8_t>() + cp * (n / 2),
                                 sc, table.get<float>(), s.N, 64, nullptr, out.get(), stream);
        };
        for (int i = 0; i < 3; ++i) ASSERT_EQ(launch(i % copies), cudaSuccess);
        // A CUDA graph of `inner` launches over rotating copies: times the kernels, not the host's
        // launch overhead.
        const int inner = 20;
        cudaGraph_t graph;
        cudaGraphExec_t exec;
        ASSERT_EQ(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), cudaSuccess);
        for (int i = 0; i < inner; ++i) ASSERT_EQ(launch(i % copies), cudaSuccess);
        ASSERT_EQ(cudaStreamEndCapture(stream, &graph), cudaSuccess);
        ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
        ASSERT_EQ(cudaGraphLaunch(exec, stream), cudaSuccess);
        std::vector<float> times;
        for (int rep = 0; rep < 25; ++rep) {
          ASSERT_EQ(cudaEventRecord(start, stream), cudaSuccess);
          ASSERT_EQ(cudaGraphLaunch(exec, stream), cudaSuccess);
          ASSERT_EQ(cudaEventRecord(stop, stream), cudaSuccess);
          ASSERT_EQ(cudaEventSynchronize(stop), cudaSuccess);
          float ms = 0;
          ASSERT_EQ(cudaEventElapsedTime(&ms, start, stop), cudaSuccess);
          times.push_back(ms * 1000.0f / inner);
        }
        cudaGraphExecDestroy(exec);
        cudaGraphDestroy(graph);
        std::sort(times.begin(), times.end());
        const double us = times[times.size() / 2];
        const double bytes = n / 2.0 + nblocks * (nested ? 1.0 : 4.0) + M * s.K * 2.0 + M * s.N * 2.0;
        char name[32];
        std::snprintf(name, sizeof(name), "%lldx%lld", static_cast<long long>(s.N),
                      static_cast<long long>(s.K));
        std::printf("%-12s %3lld %6s %10.2f %9.0f %6.1f%%\n", name, static_cast<long long>(M),
                    nested ? "yes" : "no", us, bytes / us * 1e-3, 100.0 * bytes / us * 1e-3 / copy_gbps);
      }
    }
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  cudaStreamDestroy(stream);
}

}  // namespace
}  // namespace halfbyte
