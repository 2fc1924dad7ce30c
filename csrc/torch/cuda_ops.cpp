// CUDA implementations of the halfbyte ops: validation and allocation from op_plans.h, then the
// torch-free launchers of csrc/cuda/ on the current stream under a device guard. No host
// synchronization and no host->device copies, so every op can be captured in a CUDA graph.
//
// gemm_4bit / gemv_4bit dispatch (rows M = A.numel() / K), see choose_gemm_kernel:
//   M <= kDecodeMaxRows  -> the fused decode kernels (gemm_4bit_decode.cu): stream the 4-bit weight once.
//   on sm_90a builds running on CC 9.0 with the driver's TMA encoder: 16 < M <= 512 with N * K >= 2^25, or
//                           16 < M <= 128 with N * K >= 2^24 -> the warp-specialized TMA kernel
//                           (gemm_4bit_prefill_tma.cu).
//   otherwise 16 < M <= 32, or M <= 64 with N * K >= 2^25 -> the fused mma.sync kernel
//   (gemm_4bit_prefill.cu); 64 < M <= 128 with N * K >= 2^25 -> its wgmma variant where the device has it
//   (Hopper without the TMA
//                           encoder), else the mma.sync one.
//   otherwise            -> dequantize the weight to A's dtype, then at::linear (cuBLAS); a weight whose
//                           16-bit copy exceeds 256 MiB in chunks of rows (gemm_4bit_dequantized).
// The rule is measured (H100, benchmarks/README.md): the fused kernels are limited by their dequantize and
// issue work, so they beat dequantize + cuBLAS only while the bf16 copy of the weight costs more than that
// work. TMA kernel against dequantize + cuBLAS: 14336 x 4096 at M = 64 43 against 100 us, M = 512 129 against
// 141, M = 1024 234 against 204; 4096 x 4096 at M = 128 26 against 28, M = 256 36 against 32; 1024 x 4096 at
// M = 64 13 against
// 12. Without the TMA kernel (sm_80): 14336 x 4096 at M = 64 65 us (mma.sync), M = 128 79 us (wgmma) against
// 100. HALFBYTE_GEMM_4BIT_KERNEL=decode|prefill|wgmma|tma|dequantize forces one path where it applies (tests,
// benchmarks); "prefill" is the mma.sync (sm_80) kernel, "wgmma" its sm_90a variant, "tma" the
// warp-specialized one; HALFBYTE_GEMM_4BIT_TMA_PLAN=rows,splits sets the TMA kernel's plan.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <tuple>

#include "halfbyte/cuda_kernels.h"
#include "op_plans.h"

namespace halfbyte::ops {
namespace {

constexpr int64_t kDecodeMaxRows = 16;
constexpr int64_t kDequantizeChunkBytes = int64_t{256} << 20;

void check_cuda(cudaError_t status, const char* op) {
  TORCH_CHECK(status == cudaSuccess,
              message(op, ": CUDA kernel launch failed: ", cudaGetErrorString(status)));
}

const float* table_4bit_cuda(QuantType type) {
  const float* table = nullptr;
  check_cuda(cuda::table_4bit(type, &table), "halfbyte: 4-bit table lookup");
  return table;
}

const uint8_t* bytes_of(const at::Tensor& t) { return static_cast<const uint8_t*>(t.const_data_ptr()); }

std::tuple<at::Tensor, at::Tensor> quantize_4bit_cuda(const at::Tensor& A, int64_t blocksize,
                                                      c10::string_view quant_type,
                                                      at::ScalarType quant_storage) {
  const c10::cuda::CUDAGuard guard(A.device());
  QuantizePlan p = plan_quantize_4bit(A, blocksize, std::string(quant_type), quant_storage);
  check_cuda(cuda::quantize_4bit(p.input.const_data_ptr(), p.dtype, p.n, blocksize, p.type,
                                 p.absmax.data_ptr<float>(), static_cast<uint8_t*>(p.codes.data_ptr()),
                                 c10::cuda::getCurrentCUDAStream()),
             "halfbyte::quantize_4bit");
  return {p.codes, p.absmax};
}

// Device pointers of a 4-bit tensor's block scales (plain or double-quantized), and the contiguous
// tensors they point into.
struct ScaleSource {
  cuda::BlockScales scales;
  at::Tensor keep_alive[3];
};

ScaleSource block_scales(const at::Tensor& absmax, const c10::optional<at::Tensor>& absmax_8bit,
                         const c10::optional<at::Tensor>& absmax_code,
                         const c10::optional<at::Tensor>& absmax_offset) {
  ScaleSource s;
  s.keep_alive[0] = absmax.contiguous();
  if (!absmax_8bit.has_value()) {
    s.scales.absmax = s.keep_alive[0].const_data_ptr<float>();
    return s;
  }
  s.keep_alive[1] = absmax_8bit->contiguous();
  s.keep_alive[2] = absmax_code->contiguous();
  s.scales.absmax_codes = s.keep_alive[1].const_data_ptr<uint8_t>();
  s.scales.nested_absmax = s.keep_alive[0].const_data_ptr<float>();
  s.scales.nested_code = s.keep_alive[2].const_data_ptr<float>();
  s.scales.offset = absmax_offset->const_data_ptr<float>();
  return s;
}

// n codes from `packed` (their first scale at scales[0]) dequantized into `out`, on the current stream.
void dequantize_4bit_into(const uint8_t* packed, const cuda::BlockScales& scales, const float* table,
                          int64_t n, int64_t blocksize, DType dtype, void* out) {
  check_cuda(cuda::dequantize_4bit(packed, scales, table, n, blocksize, dtype, out,
                                   c10::cuda::getCurrentCUDAStream()),
             "halfbyte::dequantize_4bit");
}

at::Tensor dequantize_4bit_cuda(const at::Tensor& A, const at::Tensor& absmax, int64_t blocksize,
                                c10::string_view quant_type, at::IntArrayRef shape, at::ScalarType dtype,
                                const c10::optional<at::Tensor>& absmax_8bit,
                                const c10::optional<at::Tensor>& absmax_code,
                                const c10::optional<at::Tensor>& absmax_offset) {
  const c10::cuda::CUDAGuard guard(A.device());
  DequantizePlan p = plan_dequantize_4bit(A, absmax, blocksize, std::string(quant_type), shape, dtype, {},
                                          absmax_8bit, absmax_code, absmax_offset);
  const ScaleSource s = block_scales(p.absmax, absmax_8bit, absmax_code, absmax_offset);
  dequantize_4bit_into(bytes_of(p.codes), s.scales, table_4bit_cuda(p.type), p.n, blocksize, p.dtype,
                       p.out.data_ptr());
  return p.out;
}

void dequantize_4bit_out_cuda(const at::Tensor& A, const at::Tensor& absmax, int64_t blocksize,
                              c10::string_view quant_type, at::IntArrayRef shape, at::ScalarType dtype,
                              at::Tensor out, const c10::optional<at::Tensor>& absmax_8bit,
                              const c10::optional<at::Tensor>& absmax_code,
                              const c10::optional<at::Tensor>& absmax_offset) {
  const c10::cuda::CUDAGuard guard(A.device());
  DequantizePlan p = plan_dequantize_4bit(A, absmax, blocksize, std::string(quant_type), shape, dtype, out,
                                          absmax_8bit, absmax_code, absmax_offset);
  const ScaleSource s = block_scales(p.absmax, absmax_8bit, absmax_code, absmax_offset);
  dequantize_4bit_into(bytes_of(p.codes), s.scales, table_4bit_cuda(p.type), p.n, blocksize, p.dtype,
                       p.out.data_ptr());
}

std::tuple<at::Tensor, at::Tensor> quantize_blockwise_cuda(const at::Tensor& A, const at::Tensor& code,
                                                           int64_t blocksize) {
  const c10::cuda::CUDAGuard guard(A.device());
  QuantizePlan p = plan_quantize_blockwise(A, code, blocksize);
  const at::Tensor code_c = code.contiguous();
  check_cuda(cuda::quantize_blockwise_8bit(p.input.const_data_ptr(), p.dtype, p.n, blocksize,
                                           code_c.const_data_ptr<float>(), p.absmax.data_ptr<float>(),
                                           p.codes.data_ptr<uint8_t>(), c10::cuda::getCurrentCUDAStream()),
             "halfbyte::quantize_blockwise");
  return {p.codes, p.absmax};
}

void dequantize_blockwise_into(const DequantizePlan& p, const at::Tensor& code, int64_t blocksize) {
  const at::Tensor code_c = code.contiguous();
  check_cuda(cuda::dequantize_blockwise_8bit(bytes_of(p.codes), p.absmax.const_data_ptr<float>(),
                                             code_c.const_data_ptr<float>(), p.n, blocksize, p.dtype,
                                             p.out.data_ptr(), c10::cuda::getCurrentCUDAStream()),
             "halfbyte::dequantize_blockwise");
}

at::Tensor dequantize_blockwise_cuda(const at::Tensor& A, const at::Tensor& absmax, const at::Tensor& code,
                                     int64_t blocksize, at::ScalarType dtype) {
  const c10::cuda::CUDAGuard guard(A.device());
  DequantizePlan p = plan_dequantize_blockwise(A, absmax, code, blocksize, dtype, {});
  dequantize_blockwise_into(p, code, blocksize);
  return p.out;
}

void dequantize_blockwise_out_cuda(const at::Tensor& A, const at::Tensor& absmax, const at::Tensor& code,
                                   int64_t blocksize, at::ScalarType dtype, at::Tensor out) {
  const c10::cuda::CUDAGuard guard(A.device());
  DequantizePlan p = plan_dequantize_blockwise(A, absmax, code, blocksize, dtype, out);
  dequantize_blockwise_into(p, code, blocksize);
}

enum class GemmKernel { kDecode, kPrefill, kPrefillWgmma, kPrefillTma, kDequantize };

// The path for a validated plan; a forced path that cannot run these arguments falls back to the rule.
GemmKernel choose_gemm_kernel(const GemmPlan& p, int64_t blocksize,
                              const c10::optional<at::Tensor>& absmax_8bit) {
  const at::ScalarType dtype = p.A2.scalar_type();
  const bool prefill_ok =
      dtype != at::kFloat &&
      cuda::gemm_4bit_prefill_supported(to_dtype(dtype), p.M, p.N, p.K, p.M > 1 ? p.A2.stride(0) : p.K,
                                        p.A2.const_data_ptr(), bytes_of(p.B), blocksize,
                                        absmax_8bit.has_value() ? bytes_of(*absmax_8bit) : nullptr);
  const bool tma_ok =
      prefill_ok && cuda::gemm_4bit_prefill_tma_supported(
                        to_dtype(dtype), p.M, p.N, p.K, p.M > 1 ? p.A2.stride(0) : p.K, p.A2.const_data_ptr(),
                        bytes_of(p.B), blocksize, absmax_8bit.has_value() ? bytes_of(*absmax_8bit) : nullptr);
  if (const char* forced = std::getenv("HALFBYTE_GEMM_4BIT_KERNEL")) {
    if (std::strcmp(forced, "decode") == 0) return GemmKernel::kDecode;
    if (std::strcmp(forced, "dequantize") == 0) return GemmKernel::kDequantize;
    if (std::strcmp(forced, "prefill") == 0 && prefill_ok) return GemmKernel::kPrefill;
    if (std::strcmp(forced, "wgmma") == 0 && prefill_ok && cuda::gemm_4bit_prefill_has_wgmma()) {
      return GemmKernel::kPrefillWgmma;
    }
    if (std::strcmp(forced, "tma") == 0 && tma_ok) return GemmKernel::kPrefillTma;
  }
  if (p.M <= kDecodeMaxRows) return GemmKernel::kDecode;
  const int64_t weight = p.N * p.K;
  if (tma_ok &&
      ((p.M <= 512 && weight >= (int64_t{1} << 25)) || (p.M <= 128 && weight >= (int64_t{1} << 24)))) {
    return GemmKernel::kPrefillTma;
  }
  const bool large_weight = p.N * p.K >= (int64_t{1} << 25);
  if (prefill_ok && (p.M <= 32 || (p.M <= 64 && large_weight))) return GemmKernel::kPrefill;
  if (prefill_ok && p.M <= 128 && large_weight) {
    return cuda::gemm_4bit_prefill_has_wgmma() ? GemmKernel::kPrefillWgmma : GemmKernel::kPrefill;
  }
  return GemmKernel::kDequantize;
}

// HALFBYTE_GEMM_4BIT_TMA_PLAN=rows,splits replaces the TMA kernel's plan (rows of A per block 64, 128 or 256;
// splits of K, at most one per stage): tests reach every tile and the split path with it, benchmarks sweep
// it.
void forced_tma_plan(const GemmPlan& p, cuda::PrefillPlan& plan) {
  const char* forced = std::getenv("HALFBYTE_GEMM_4BIT_TMA_PLAN");
  if (forced == nullptr) return;
  int rows = 0, splits = 0;
  if (std::sscanf(forced, "%d,%d", &rows, &splits) != 2 || (rows != 64 && rows != 128 && rows != 256) ||
      splits < 1) {
    return;
  }
  const int64_t k_stages = p.K / 64;
  plan.rows_per_block = rows;
  cuda::set_prefill_splits(plan, k_stages, splits, p.M, p.N);
}

// Rows of W dequantized per cuBLAS call on the dequantize path. A weight whose 16-bit copy exceeds
// kDequantizeChunkBytes is dequantized and multiplied a chunk of rows at a time through one reused buffer, so
// the temporary is bounded (256 MiB instead of 1 GiB for a 128256 x 4096 bf16 lm_head) instead of the whole
// weight. Chunks are large on purpose (H100 sweep, benchmarks/notes_gemm_4bit_prefill.md, "v9"): a chunk of
// 4-32 MiB was expected to stay in L2 between the dequantize and cuBLAS and save the DRAM write of the copy,
// but every such chunking measured slower than the whole weight (each cuBLAS call over a few hundred columns
// fills too few SMs), none faster. A chunk starts on a multiple of 256 scale blocks (nested scales keep one
// nested absmax per 256 blocks) and at an even element (two codes per byte); returns N (one chunk) where that
// leaves fewer than two chunks. HALFBYTE_GEMM_4BIT_CHUNK_BYTES overrides the chunk size in bytes of the
// 16-bit chunk (0: whole weight; tests and benchmarks).
int64_t dequantize_chunk_rows(const GemmPlan& p, int64_t blocksize) {
  int64_t chunk_bytes = kDequantizeChunkBytes;
  if (const char* forced = std::getenv("HALFBYTE_GEMM_4BIT_CHUNK_BYTES")) chunk_bytes = std::atoll(forced);
  if (chunk_bytes <= 0 || p.K == 0) return p.N;
  const int64_t unit = 256 * blocksize;  // elements; a multiple of 2 and of blocksize
  const int64_t step = unit / std::gcd(p.K, unit);
  const int64_t element_bytes = p.A2.element_size();
  const int64_t rows = std::max(step, chunk_bytes / (p.K * element_bytes) / step * step);
  return rows * 2 > p.N ? p.N : rows;
}

// out = A @ W^T (+ bias) by dequantizing W to A's dtype, `rows` rows at a time, each chunk multiplied by
// cuBLAS straight into its columns of out (a strided view: ATen passes the row stride to cuBLAS as ldc).
at::Tensor gemm_4bit_dequantized(const GemmPlan& p, const ScaleSource& s, const float* table,
                                 int64_t blocksize, const c10::optional<at::Tensor>& bias) {
  const DType dtype = to_dtype(p.A2.scalar_type());
  const int64_t rows = dequantize_chunk_rows(p, blocksize);
  at::Tensor weight = at::empty({rows, p.K}, p.A2.options());
  if (rows == p.N) {
    dequantize_4bit_into(bytes_of(p.B), s.scales, table, p.N * p.K, blocksize, dtype, weight.data_ptr());
    return at::linear(p.A2, weight, bias).view(p.out_shape);
  }
  at::Tensor out = at::empty({p.M, p.N}, p.A2.options());
  const at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
  for (int64_t row0 = 0; row0 < p.N; row0 += rows) {
    const int64_t n = std::min(rows, p.N - row0);
    const int64_t element0 = row0 * p.K;  // a multiple of 256 * blocksize (dequantize_chunk_rows)
    const int64_t block0 = element0 / blocksize;
    cuda::BlockScales chunk_scales = s.scales;
    if (chunk_scales.absmax != nullptr) {
      chunk_scales.absmax += block0;
    } else {
      chunk_scales.absmax_codes += block0;
      chunk_scales.nested_absmax += block0 / 256;
    }
    dequantize_4bit_into(bytes_of(p.B) + element0 / 2, chunk_scales, table, n * p.K, blocksize, dtype,
                         weight.data_ptr());
    const at::Tensor w = weight.narrow(0, 0, n);
    at::Tensor out_columns = out.narrow(1, row0, n);
    if (bias_c.defined()) {
      at::addmm_out(out_columns, bias_c.narrow(0, row0, n), p.A2, w.t());
    } else {
      at::mm_out(out_columns, p.A2, w.t());
    }
  }
  return out.view(p.out_shape);
}

// out = A @ W^T (+ bias) for a validated plan, choosing the kernel by the number of rows.
at::Tensor gemm_4bit_dispatch(const GemmPlan& p, const at::Tensor& absmax, const float* table,
                              int64_t blocksize, const c10::optional<at::Tensor>& bias,
                              const c10::optional<at::Tensor>& absmax_8bit,
                              const c10::optional<at::Tensor>& absmax_code,
                              const c10::optional<at::Tensor>& absmax_offset) {
  const at::ScalarType dtype = p.A2.scalar_type();
  const GemmKernel kernel = choose_gemm_kernel(p, blocksize, absmax_8bit);
  if (kernel == GemmKernel::kPrefill || kernel == GemmKernel::kPrefillWgmma ||
      kernel == GemmKernel::kPrefillTma) {
    at::Tensor out = at::empty(p.out_shape, p.A2.options());  // [M, N] contiguous, in A's leading shape
    const ScaleSource s = block_scales(absmax, absmax_8bit, absmax_code, absmax_offset);
    const at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
    const bool tma = kernel == GemmKernel::kPrefillTma;
    cuda::PrefillPlan plan;
    check_cuda(tma ? cuda::gemm_4bit_prefill_tma_plan(p.M, p.N, p.K, &plan)
                   : cuda::gemm_4bit_prefill_plan(p.M, p.N, p.K, kernel == GemmKernel::kPrefillWgmma, &plan),
               "halfbyte::gemm_4bit");
    if (tma) forced_tma_plan(p, plan);
    const at::Tensor workspace =
        plan.splits > 1 ? at::empty({plan.workspace_floats}, p.A2.options().dtype(at::kFloat)) : at::Tensor();
    const auto launch = tma ? cuda::gemm_4bit_prefill_tma : cuda::gemm_4bit_prefill;
    check_cuda(launch(p.A2.const_data_ptr(), to_dtype(dtype), p.M, p.K, p.M > 1 ? p.A2.stride(0) : p.K,
                      bytes_of(p.B), s.scales, table, p.N, blocksize,
                      bias_c.defined() ? bias_c.const_data_ptr() : nullptr, out.data_ptr(), plan,
                      workspace.defined() ? workspace.data_ptr<float>() : nullptr,
                      c10::cuda::getCurrentCUDAStream()),
               "halfbyte::gemm_4bit");
    return out;
  }
  if (kernel == GemmKernel::kDecode) {
    at::Tensor out = at::empty(p.out_shape, p.A2.options());  // [M, N] contiguous, in A's leading shape
    const ScaleSource s = block_scales(absmax, absmax_8bit, absmax_code, absmax_offset);
    const at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
    check_cuda(cuda::gemm_4bit(p.A2.const_data_ptr(), to_dtype(dtype), p.M, p.K,
                               p.M > 1 ? p.A2.stride(0) : p.K, bytes_of(p.B), s.scales, table, p.N, blocksize,
                               bias_c.defined() ? bias_c.const_data_ptr() : nullptr, out.data_ptr(),
                               c10::cuda::getCurrentCUDAStream()),
               "halfbyte::gemm_4bit");
    return out;
  }
  const ScaleSource s = block_scales(absmax, absmax_8bit, absmax_code, absmax_offset);
  return gemm_4bit_dequantized(p, s, table, blocksize, bias);
}

at::Tensor gemm_4bit_cuda(const at::Tensor& A, const at::Tensor& B, at::IntArrayRef shapeB,
                          const at::Tensor& absmax, int64_t blocksize, c10::string_view quant_type,
                          const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& absmax_8bit,
                          const c10::optional<at::Tensor>& absmax_code,
                          const c10::optional<at::Tensor>& absmax_offset) {
  const char* op = "halfbyte::gemm_4bit";
  const c10::cuda::CUDAGuard guard(A.device());
  check_blocksize(op, blocksize);
  const QuantType type = parse_quant_type(op, std::string(quant_type));
  GemmPlan p = plan_gemm_4bit(op, A, B, shapeB, bias);
  p.nested = check_gemm_scales(op, absmax, block_count(p.N * p.K, blocksize), absmax_8bit, absmax_code,
                               absmax_offset, A);
  return gemm_4bit_dispatch(p, absmax, table_4bit_cuda(type), blocksize, bias, absmax_8bit, absmax_code,
                            absmax_offset);
}

at::Tensor gemv_4bit_cuda(const at::Tensor& A, const at::Tensor& B, at::IntArrayRef shapeB,
                          const at::Tensor& absmax, const at::Tensor& code, int64_t blocksize) {
  const c10::cuda::CUDAGuard guard(A.device());
  const GemvPlan p = plan_gemv_4bit(A, B, shapeB, absmax, code, blocksize);
  return gemm_4bit_dispatch(p.gemm, absmax, p.table.const_data_ptr<float>(), blocksize, {}, {}, {}, {});
}

void gemv_4bit_out_cuda(const at::Tensor& A, const at::Tensor& B, at::IntArrayRef shapeB,
                        const at::Tensor& absmax, const at::Tensor& code, int64_t blocksize, at::Tensor out) {
  write_gemv_out(gemv_4bit_cuda(A, B, shapeB, absmax, code, blocksize), A, out);
}

}  // namespace

TORCH_LIBRARY_IMPL(halfbyte, CUDA, m) {
  m.impl("quantize_4bit", &quantize_4bit_cuda);
  m.impl("dequantize_4bit", &dequantize_4bit_cuda);
  m.impl("dequantize_4bit.out", &dequantize_4bit_out_cuda);
  m.impl("quantize_blockwise", &quantize_blockwise_cuda);
  m.impl("dequantize_blockwise", &dequantize_blockwise_cuda);
  m.impl("dequantize_blockwise.out", &dequantize_blockwise_out_cuda);
  m.impl("gemm_4bit", &gemm_4bit_cuda);
  m.impl("gemv_4bit", &gemv_4bit_cuda);
  m.impl("gemv_4bit.out", &gemv_4bit_out_cuda);
}

}  // namespace halfbyte::ops
