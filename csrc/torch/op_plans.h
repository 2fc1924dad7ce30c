// Validation and output allocation shared by the CPU and CUDA implementations of each op: a "plan"
// holds the checked, contiguous inputs and the allocated outputs, so a backend only launches its
// kernel on raw pointers.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "op_checks.h"

namespace halfbyte::ops {

struct QuantizePlan {
  at::Tensor input;   // contiguous
  at::Tensor codes;   // packed 4-bit (storage dtype) or 8-bit codes
  at::Tensor absmax;  // float32, one per block
  int64_t n = 0;
  int64_t blocks = 0;
  DType dtype = DType::kFloat32;
  QuantType type = QuantType::kNF4;
};

inline QuantizePlan plan_quantize_4bit(const at::Tensor& A, int64_t blocksize, const std::string& quant_type,
                                       at::ScalarType quant_storage) {
  const char* op = "halfbyte::quantize_4bit";
  check_float_input(op, "A", A);
  check_blocksize(op, blocksize);
  QuantizePlan p;
  p.type = parse_quant_type(op, quant_type);
  TORCH_CHECK_VALUE(
      quant_storage == at::kByte || quant_storage == at::kHalf || quant_storage == at::kBFloat16 ||
          quant_storage == at::kFloat,
      message(op, ": quant_storage must be uint8, float16, bfloat16 or float32, got ", quant_storage));
  p.input = A.contiguous();
  p.n = A.numel();
  p.blocks = block_count(p.n, blocksize);
  p.dtype = to_dtype(A.scalar_type());
  const int64_t itemsize = c10::elementSize(quant_storage);
  const int64_t elements = packed_storage_elements(p.n, itemsize);
  p.codes = at::empty({elements, 1}, A.options().dtype(quant_storage));
  // The kernels write (n + 1) / 2 bytes; zero the padding bytes of a wider storage element.
  if (elements * itemsize != (p.n + 1) / 2) p.codes[elements - 1].zero_();
  p.absmax = at::empty({p.blocks}, A.options().dtype(at::kFloat));
  return p;
}

inline QuantizePlan plan_quantize_blockwise(const at::Tensor& A, const at::Tensor& code, int64_t blocksize) {
  const char* op = "halfbyte::quantize_blockwise";
  check_float_input(op, "A", A);
  check_blocksize(op, blocksize);
  check_code256(op, code, A);
  QuantizePlan p;
  p.input = A.contiguous();
  p.n = A.numel();
  p.blocks = block_count(p.n, blocksize);
  p.dtype = to_dtype(A.scalar_type());
  p.codes = at::empty(A.sizes(), A.options().dtype(at::kByte));
  p.absmax = at::empty({p.blocks}, A.options().dtype(at::kFloat));
  return p;
}

struct DequantizePlan {
  at::Tensor codes;   // contiguous packed / 8-bit codes
  at::Tensor absmax;  // contiguous float32 (the nested absmax when `nested`)
  at::Tensor out;     // output (contiguous)
  int64_t n = 0;
  DType dtype = DType::kFloat32;
  QuantType type = QuantType::kNF4;
  bool nested = false;  // 4-bit: scales are double-quantized (absmax_8bit, absmax_code, absmax_offset)
};

inline void check_out(const char* op, const at::Tensor& out, at::IntArrayRef shape, at::ScalarType dtype,
                      const at::Tensor& A) {
  TORCH_CHECK_VALUE(out.sizes() == shape,
                    message(op, ": out must have shape ", shape, ", got ", out.sizes()));
  TORCH_CHECK_TYPE(out.scalar_type() == dtype,
                   message(op, ": out must have dtype ", dtype, ", got ", out.scalar_type()));
  check_same_device(op, "out", out, A);
  TORCH_CHECK_VALUE(out.is_contiguous(), message(op, ": out must be contiguous"));
}

inline DequantizePlan plan_dequantize_4bit(const at::Tensor& A, const at::Tensor& absmax, int64_t blocksize,
                                           const std::string& quant_type, at::IntArrayRef shape,
                                           at::ScalarType dtype, const c10::optional<at::Tensor>& out,
                                           const c10::optional<at::Tensor>& absmax_8bit,
                                           const c10::optional<at::Tensor>& absmax_code,
                                           const c10::optional<at::Tensor>& absmax_offset) {
  const char* op = "halfbyte::dequantize_4bit";
  check_blocksize(op, blocksize);
  check_output_dtype(op, dtype);
  DequantizePlan p;
  p.type = parse_quant_type(op, quant_type);
  p.n = shape_numel(op, shape);
  check_packed(op, A, p.n, A);
  p.nested =
      check_gemm_scales(op, absmax, block_count(p.n, blocksize), absmax_8bit, absmax_code, absmax_offset, A);
  p.codes = A.contiguous();
  p.absmax = absmax.contiguous();
  p.dtype = to_dtype(dtype);
  if (out.has_value()) {
    check_out(op, *out, shape, dtype, A);
    p.out = *out;
  } else {
    p.out = at::empty(shape, A.options().dtype(dtype));
  }
  return p;
}

inline DequantizePlan plan_dequantize_blockwise(const at::Tensor& A, const at::Tensor& absmax,
                                                const at::Tensor& code, int64_t blocksize,
                                                at::ScalarType dtype, const c10::optional<at::Tensor>& out) {
  const char* op = "halfbyte::dequantize_blockwise";
  TORCH_CHECK_TYPE(A.scalar_type() == at::kByte,
                   message(op, ": A must be uint8 codes, got ", A.scalar_type()));
  check_blocksize(op, blocksize);
  check_output_dtype(op, dtype);
  check_code256(op, code, A);
  DequantizePlan p;
  p.n = A.numel();
  check_absmax(op, absmax, block_count(p.n, blocksize), A);
  p.codes = A.contiguous();
  p.absmax = absmax.contiguous();
  p.dtype = to_dtype(dtype);
  if (out.has_value()) {
    check_out(op, *out, A.sizes(), dtype, A);
    p.out = *out;
  } else {
    p.out = at::empty(A.sizes(), A.options().dtype(dtype));
  }
  return p;
}

struct GemmPlan {
  at::Tensor A2;  // [M, K] view of A with unit column stride
  at::Tensor B;   // contiguous packed weight
  int64_t M = 0, N = 0, K = 0;
  std::vector<int64_t> out_shape;
  bool nested = false;
};

inline GemmPlan plan_gemm_4bit(const char* op, const at::Tensor& A, const at::Tensor& B,
                               at::IntArrayRef shapeB, const c10::optional<at::Tensor>& bias) {
  check_gemm_operands(op, A, B, shapeB, bias);
  GemmPlan p;
  p.N = shapeB[0];
  p.K = shapeB[1];
  p.A2 = A.dim() == 2 ? A : A.reshape({-1, p.K});  // a 2-D A as it is: no view per call
  if (p.K > 1 && p.A2.stride(1) != 1) p.A2 = p.A2.contiguous();
  if (p.A2.size(0) > 1 && p.A2.stride(0) < p.K) p.A2 = p.A2.contiguous();
  p.M = p.A2.size(0);
  p.B = B.contiguous();
  p.out_shape = A.sizes().vec();
  p.out_shape.back() = p.N;
  return p;
}

// gemv_4bit: gemm_4bit with a caller-given 16-level table (`code`) and plain absmax.
struct GemvPlan {
  GemmPlan gemm;
  at::Tensor table;  // contiguous float32 [16]
};

inline GemvPlan plan_gemv_4bit(const at::Tensor& A, const at::Tensor& B, at::IntArrayRef shapeB,
                               const at::Tensor& absmax, const at::Tensor& code, int64_t blocksize) {
  const char* op = "halfbyte::gemv_4bit";
  check_blocksize(op, blocksize);
  GemvPlan p{plan_gemm_4bit(op, A, B, shapeB, {}), at::Tensor()};
  check_absmax(op, absmax, block_count(p.gemm.N * p.gemm.K, blocksize), A);
  check_same_device(op, "code", code, A);
  TORCH_CHECK_VALUE(code.scalar_type() == at::kFloat && code.numel() == 16,
                    message(op, ": code must be a float32 tensor of 16 levels, got ", code.scalar_type(),
                            " with ", code.numel()));
  p.table = code.contiguous();
  return p;
}

// Copies a computed gemv result into the caller's `out` after checking it.
inline void write_gemv_out(const at::Tensor& result, const at::Tensor& A, at::Tensor& out) {
  check_out("halfbyte::gemv_4bit.out", out, result.sizes(), A.scalar_type(), A);
  out.copy_(result);
}

// Float32 per-block scales of a 4-bit weight: the absmax itself, or for double quantization
// code[absmax_8bit[b]] * absmax[b / 256] + offset, the product computed by the backend's
// `dequantize_blockwise_into(plan, code, blocksize)` and the offset added in float32.
template <class DequantizeBlockwiseInto>
at::Tensor resolved_scales(bool nested, const at::Tensor& absmax,
                           const c10::optional<at::Tensor>& absmax_8bit,
                           const c10::optional<at::Tensor>& absmax_code,
                           const c10::optional<at::Tensor>& absmax_offset,
                           DequantizeBlockwiseInto&& dequantize_blockwise_into) {
  if (!nested) return absmax.contiguous();
  DequantizePlan plan =
      plan_dequantize_blockwise(*absmax_8bit, absmax, *absmax_code, kNestedBlocksize, at::kFloat, {});
  dequantize_blockwise_into(plan, *absmax_code, kNestedBlocksize);
  return plan.out.add_(*absmax_offset);
}

}  // namespace halfbyte::ops
