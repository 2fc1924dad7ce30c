// CPU implementations of the halfbyte ops: validation and allocation from op_plans.h, the torch-free
// kernels of csrc/cpu/ split over threads by block ranges (at::parallel_for), and for the 4-bit
// matmuls dequantization followed by at::linear (accumulates in float32 for 16-bit inputs).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "halfbyte/cpu_kernels.h"
#include "op_plans.h"

namespace halfbyte::ops {
namespace {

// About 32K elements per task: large enough to hide the scheduling cost.
int64_t grain_in_blocks(int64_t blocksize) { return std::max<int64_t>(1, 32768 / blocksize); }

const float* table_4bit_cpu(QuantType type) {
  static const float nf4[16] = {nf4_level(0),  nf4_level(1),  nf4_level(2),  nf4_level(3),
                                nf4_level(4),  nf4_level(5),  nf4_level(6),  nf4_level(7),
                                nf4_level(8),  nf4_level(9),  nf4_level(10), nf4_level(11),
                                nf4_level(12), nf4_level(13), nf4_level(14), nf4_level(15)};
  static const float fp4[16] = {fp4_level(0),  fp4_level(1),  fp4_level(2),  fp4_level(3),
                                fp4_level(4),  fp4_level(5),  fp4_level(6),  fp4_level(7),
                                fp4_level(8),  fp4_level(9),  fp4_level(10), fp4_level(11),
                                fp4_level(12), fp4_level(13), fp4_level(14), fp4_level(15)};
  return type == QuantType::kNF4 ? nf4 : fp4;
}

const uint8_t* bytes_of(const at::Tensor& t) { return static_cast<const uint8_t*>(t.const_data_ptr()); }

std::tuple<at::Tensor, at::Tensor> quantize_4bit_cpu(const at::Tensor& A, int64_t blocksize,
                                                     c10::string_view quant_type,
                                                     at::ScalarType quant_storage) {
  QuantizePlan p = plan_quantize_4bit(A, blocksize, std::string(quant_type), quant_storage);
  const void* in = p.input.const_data_ptr();
  float* absmax = p.absmax.data_ptr<float>();
  uint8_t* packed = static_cast<uint8_t*>(p.codes.data_ptr());
  at::parallel_for(0, p.blocks, grain_in_blocks(blocksize), [&](int64_t begin, int64_t end) {
    cpu::quantize_4bit(in, p.dtype, p.n, blocksize, p.type, absmax, packed, begin, end);
  });
  return {p.codes, p.absmax};
}

void dequantize_4bit_into(const at::Tensor& packed, const at::Tensor& absmax, const float* table, int64_t n,
                          int64_t blocksize, DType dtype, at::Tensor& out) {
  const uint8_t* codes = bytes_of(packed);
  const float* scales = absmax.const_data_ptr<float>();
  void* dst = out.data_ptr();
  at::parallel_for(0, block_count(n, blocksize), grain_in_blocks(blocksize), [&](int64_t begin, int64_t end) {
    cpu::dequantize_4bit(codes, scales, table, n, blocksize, dtype, dst, begin, end);
  });
}

void dequantize_blockwise_into(const DequantizePlan& p, const at::Tensor& code, int64_t blocksize);

// Double-quantized scales are resolved to float32 first (a pass over one value per block), then the
// plain kernel runs: the same bits as resolving them inside the kernel.
void dequantize_4bit_planned(const DequantizePlan& p, int64_t blocksize,
                             const c10::optional<at::Tensor>& absmax_8bit,
                             const c10::optional<at::Tensor>& absmax_code,
                             const c10::optional<at::Tensor>& absmax_offset) {
  const at::Tensor scales =
      resolved_scales(p.nested, p.absmax, absmax_8bit, absmax_code, absmax_offset, dequantize_blockwise_into);
  at::Tensor out = p.out;
  dequantize_4bit_into(p.codes, scales, table_4bit_cpu(p.type), p.n, blocksize, p.dtype, out);
}

at::Tensor dequantize_4bit_cpu(const at::Tensor& A, const at::Tensor& absmax, int64_t blocksize,
                               c10::string_view quant_type, at::IntArrayRef shape, at::ScalarType dtype,
                               const c10::optional<at::Tensor>& absmax_8bit,
                               const c10::optional<at::Tensor>& absmax_code,
                               const c10::optional<at::Tensor>& absmax_offset) {
  DequantizePlan p = plan_dequantize_4bit(A, absmax, blocksize, std::string(quant_type), shape, dtype, {},
                                          absmax_8bit, absmax_code, absmax_offset);
  dequantize_4bit_planned(p, blocksize, absmax_8bit, absmax_code, absmax_offset);
  return p.out;
}

void dequantize_4bit_out_cpu(const at::Tensor& A, const at::Tensor& absmax, int64_t blocksize,
                             c10::string_view quant_type, at::IntArrayRef shape, at::ScalarType dtype,
                             at::Tensor out, const c10::optional<at::Tensor>& absmax_8bit,
                             const c10::optional<at::Tensor>& absmax_code,
                             const c10::optional<at::Tensor>& absmax_offset) {
  DequantizePlan p = plan_dequantize_4bit(A, absmax, blocksize, std::string(quant_type), shape, dtype, out,
                                          absmax_8bit, absmax_code, absmax_offset);
  dequantize_4bit_planned(p, blocksize, absmax_8bit, absmax_code, absmax_offset);
}

std::tuple<at::Tensor, at::Tensor> quantize_blockwise_cpu(const at::Tensor& A, const at::Tensor& code,
                                                          int64_t blocksize) {
  QuantizePlan p = plan_quantize_blockwise(A, code, blocksize);
  const at::Tensor code_c = code.contiguous();
  const void* in = p.input.const_data_ptr();
  const float* table = code_c.const_data_ptr<float>();
  float* absmax = p.absmax.data_ptr<float>();
  uint8_t* codes = p.codes.data_ptr<uint8_t>();
  at::parallel_for(0, p.blocks, grain_in_blocks(blocksize), [&](int64_t begin, int64_t end) {
    cpu::quantize_blockwise_8bit(in, p.dtype, p.n, blocksize, table, absmax, codes, begin, end);
  });
  return {p.codes, p.absmax};
}

void dequantize_blockwise_into(const DequantizePlan& p, const at::Tensor& code, int64_t blocksize) {
  const at::Tensor code_c = code.contiguous();
  const uint8_t* codes = bytes_of(p.codes);
  const float* scales = p.absmax.const_data_ptr<float>();
  const float* table = code_c.const_data_ptr<float>();
  void* dst = p.out.data_ptr();
  at::parallel_for(
      0, block_count(p.n, blocksize), grain_in_blocks(blocksize), [&](int64_t begin, int64_t end) {
        cpu::dequantize_blockwise_8bit(codes, scales, table, p.n, blocksize, p.dtype, dst, begin, end);
      });
}

at::Tensor dequantize_blockwise_cpu(const at::Tensor& A, const at::Tensor& absmax, const at::Tensor& code,
                                    int64_t blocksize, at::ScalarType dtype) {
  DequantizePlan p = plan_dequantize_blockwise(A, absmax, code, blocksize, dtype, {});
  dequantize_blockwise_into(p, code, blocksize);
  return p.out;
}

void dequantize_blockwise_out_cpu(const at::Tensor& A, const at::Tensor& absmax, const at::Tensor& code,
                                  int64_t blocksize, at::ScalarType dtype, at::Tensor out) {
  DequantizePlan p = plan_dequantize_blockwise(A, absmax, code, blocksize, dtype, out);
  dequantize_blockwise_into(p, code, blocksize);
}

// Dequantized [N, K] weight in `dtype`, with the block scales resolved (nested -> float32).
at::Tensor dequantized_weight(const GemmPlan& p, const at::Tensor& scales, const float* table,
                              int64_t blocksize, at::ScalarType dtype) {
  at::Tensor weight = at::empty({p.N, p.K}, p.A2.options().dtype(dtype));
  dequantize_4bit_into(p.B, scales, table, p.N * p.K, blocksize, to_dtype(dtype), weight);
  return weight;
}

at::Tensor gemm_4bit_cpu(const at::Tensor& A, const at::Tensor& B, at::IntArrayRef shapeB,
                         const at::Tensor& absmax, int64_t blocksize, c10::string_view quant_type,
                         const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& absmax_8bit,
                         const c10::optional<at::Tensor>& absmax_code,
                         const c10::optional<at::Tensor>& absmax_offset) {
  const char* op = "halfbyte::gemm_4bit";
  check_blocksize(op, blocksize);
  const QuantType type = parse_quant_type(op, std::string(quant_type));
  GemmPlan p = plan_gemm_4bit(op, A, B, shapeB, bias);
  p.nested = check_gemm_scales(op, absmax, block_count(p.N * p.K, blocksize), absmax_8bit, absmax_code,
                               absmax_offset, A);
  const at::Tensor scales =
      resolved_scales(p.nested, absmax, absmax_8bit, absmax_code, absmax_offset, dequantize_blockwise_into);
  const at::Tensor weight = dequantized_weight(p, scales, table_4bit_cpu(type), blocksize, A.scalar_type());
  return at::linear(p.A2, weight, bias).view(p.out_shape);
}

at::Tensor gemv_4bit_cpu(const at::Tensor& A, const at::Tensor& B, at::IntArrayRef shapeB,
                         const at::Tensor& absmax, const at::Tensor& code, int64_t blocksize) {
  const GemvPlan p = plan_gemv_4bit(A, B, shapeB, absmax, code, blocksize);
  const at::Tensor weight = dequantized_weight(p.gemm, absmax.contiguous(), p.table.const_data_ptr<float>(),
                                               blocksize, A.scalar_type());
  return at::linear(p.gemm.A2, weight).view(p.gemm.out_shape);
}

void gemv_4bit_out_cpu(const at::Tensor& A, const at::Tensor& B, at::IntArrayRef shapeB,
                       const at::Tensor& absmax, const at::Tensor& code, int64_t blocksize, at::Tensor out) {
  write_gemv_out(gemv_4bit_cpu(A, B, shapeB, absmax, code, blocksize), A, out);
}

}  // namespace

TORCH_LIBRARY_IMPL(halfbyte, CPU, m) {
  m.impl("quantize_4bit", &quantize_4bit_cpu);
  m.impl("dequantize_4bit", &dequantize_4bit_cpu);
  m.impl("dequantize_4bit.out", &dequantize_4bit_out_cpu);
  m.impl("quantize_blockwise", &quantize_blockwise_cpu);
  m.impl("dequantize_blockwise", &dequantize_blockwise_cpu);
  m.impl("dequantize_blockwise.out", &dequantize_blockwise_out_cpu);
  m.impl("gemm_4bit", &gemm_4bit_cpu);
  m.impl("gemv_4bit", &gemv_4bit_cpu);
  m.impl("gemv_4bit.out", &gemv_4bit_out_cpu);
}

}  // namespace halfbyte::ops
