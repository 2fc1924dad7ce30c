// Validation, allocation and the backend-independent parts of the INT8 ops, shared by int8_cpu_ops.cpp
// and int8_cuda_ops.cpp. Every check is a TORCH_CHECK whose message names the op and the argument.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <string>
#include <tuple>
#include <vector>

#include "halfbyte/int8_kernels.h"
#include "op_checks.h"

namespace halfbyte::ops::int8 {

// Rows of A seen as [rows, A.size(-1)]: the product of the leading dimensions (1 for a 1-D tensor).
inline int64_t leading_rows(const at::Tensor& A) {
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < A.dim(); ++d) rows *= A.size(d);
  return rows;
}

inline void check_has_last_dim(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.dim() >= 1,
                    message(op, ": ", name, " must have at least one dimension, got a 0-dim tensor"));
}

// torch's name of a dtype (int8, float32, ...), for messages.
inline std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kChar:
      return "int8";
    case at::kByte:
      return "uint8";
    case at::kInt:
      return "int32";
    case at::kLong:
      return "int64";
    case at::kHalf:
      return "float16";
    case at::kBFloat16:
      return "bfloat16";
    case at::kFloat:
      return "float32";
    case at::kDouble:
      return "float64";
    case at::kBool:
      return "bool";
    default:
      return c10::toString(t);
  }
}

inline void check_dtype(const char* op, const char* name, const at::Tensor& t, at::ScalarType dtype) {
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, message(op, ": ", name, " must be ", dtype_name(dtype), ", got ",
                                                     dtype_name(t.scalar_type())));
}

// A per-row or per-column float32 vector of `count` entries (any shape with that many elements).
inline void check_stats(const char* op, const char* name, const at::Tensor& stats, int64_t count,
                        const at::Tensor& A, const char* what) {
  check_same_device(op, name, stats, A);
  check_dtype(op, name, stats, at::kFloat);
  TORCH_CHECK_VALUE(stats.numel() == count, message(op, ": ", name, " must have ", count,
                                                    " entries (one per ", what, "), got ", stats.numel()));
}

// int8 weight B [N, K] whose K matches A's last dimension.
inline void check_int8_weight(const char* op, const char* name, const at::Tensor& B, const at::Tensor& A) {
  check_same_device(op, name, B, A);
  check_dtype(op, name, B, at::kChar);
  TORCH_CHECK_VALUE(B.dim() == 2, message(op, ": ", name, " must be 2-D [N, K], got shape ", B.sizes()));
  TORCH_CHECK_VALUE(A.size(-1) == B.size(1),
                    message(op, ": A's last dimension (", A.size(-1), ") must equal K = ", name,
                            ".shape[1] (", B.size(1), ")"));
}

inline std::vector<int64_t> shape_with_last(const at::Tensor& A, int64_t last) {
  std::vector<int64_t> shape = A.sizes().vec();
  shape.back() = last;
  return shape;
}

// [rows, K] view of A with unit column stride (a copy only when A's layout needs one).
inline at::Tensor rows_view(const at::Tensor& A) {
  const int64_t K = A.size(-1);
  at::Tensor A2 = A.reshape({leading_rows(A), K});
  if ((K > 1 && A2.stride(1) != 1) || (A2.size(0) > 1 && A2.stride(0) < K)) A2 = A2.contiguous();
  return A2;
}

// ---- int8_vectorwise_quant -------------------------------------------------------------------------

inline void check_threshold(const char* op, double threshold) {
  TORCH_CHECK_VALUE(std::isfinite(threshold) && threshold >= 0.0,
                    message(op, ": threshold must be a finite number >= 0 (0 disables outliers), got ",
                            std::to_string(threshold)));
}

// The threshold as the input dtype holds it (what `A.abs() >= threshold` compares against in torch).
inline float threshold_in_dtype(double threshold, at::ScalarType dtype) {
  const float t = static_cast<float>(threshold);
  if (dtype == at::kHalf) return fp16_to_float(float_to_fp16(t));
  if (dtype == at::kBFloat16) return bf16_to_float(float_to_bf16(t));
  return t;
}

struct QuantPlan {
  at::Tensor input;          // contiguous
  at::Tensor codes;          // int8, A's shape
  at::Tensor row_stats;      // float32 [rows]
  at::Tensor outlier_flags;  // uint8 [cols] zeros, when has_threshold
  int64_t rows = 0, cols = 0;
  DType dtype = DType::kFloat32;
  bool has_threshold = false;
  float threshold = 0.0f;
};

inline QuantPlan plan_vectorwise_quant(const at::Tensor& A, double threshold) {
  const char* op = "halfbyte::int8_vectorwise_quant";
  check_float_input(op, "A", A);
  check_has_last_dim(op, "A", A);
  check_threshold(op, threshold);
  QuantPlan p;
  p.input = A.contiguous();
  p.rows = leading_rows(A);
  p.cols = A.size(-1);
  p.dtype = to_dtype(A.scalar_type());
  p.has_threshold = threshold > 0.0;
  p.threshold = threshold_in_dtype(threshold, A.scalar_type());
  p.codes = at::empty(A.sizes(), A.options().dtype(at::kChar));
  p.row_stats = at::empty({p.rows}, A.options().dtype(at::kFloat));
  if (p.has_threshold) p.outlier_flags = at::zeros({p.cols}, A.options().dtype(at::kByte));
  return p;
}

// After the kernel: zero the outlier columns in every row and list them (a host synchronization on
// CUDA, inherent in returning a data-dependent number of columns).
inline std::tuple<at::Tensor, at::Tensor, c10::optional<at::Tensor>> finish_vectorwise_quant(QuantPlan& p) {
  if (!p.has_threshold) return {p.codes, p.row_stats, c10::nullopt};
  const at::Tensor column_mask = p.outlier_flags.to(at::kBool);
  if (p.rows > 1 && p.cols > 0) p.codes.view({p.rows, p.cols}).masked_fill_(column_mask.view({1, p.cols}), 0);
  return {p.codes, p.row_stats, at::nonzero(column_mask).view({-1})};
}

// ---- int8_vectorwise_dequant (same arithmetic as bitsandbytes: (A * stats) * float32(1/127)) ------------

inline at::Tensor vectorwise_dequant(const at::Tensor& A, const at::Tensor& stats) {
  const char* op = "halfbyte::int8_vectorwise_dequant";
  check_dtype(op, "A", A, at::kChar);
  check_has_last_dim(op, "A", A);
  check_stats(op, "stats", stats, leading_rows(A), A, "row of A");
  const int64_t K = A.size(-1);
  const at::Tensor values = A.reshape({leading_rows(A), K}).to(at::kFloat);
  return values.mul(stats.reshape({-1, 1})).mul_(static_cast<double>(kInt8Inverse127)).view(A.sizes());
}

// ---- int8_linear_matmul ------------------------------------------------------------------------------

struct MatmulPlan {
  at::Tensor A2;  // contiguous [M, K]
  at::Tensor B;   // contiguous [N, K]
  int64_t M = 0, N = 0, K = 0;
  std::vector<int64_t> out_shape;
};

inline MatmulPlan plan_linear_matmul(const char* op, const at::Tensor& A, const at::Tensor& B) {
  check_dtype(op, "A", A, at::kChar);
  check_has_last_dim(op, "A", A);
  check_int8_weight(op, "B", B, A);
  MatmulPlan p;
  p.K = A.size(-1);
  p.N = B.size(0);
  p.A2 = A.reshape({leading_rows(A), p.K}).contiguous();
  p.M = p.A2.size(0);
  p.B = B.contiguous();
  p.out_shape = shape_with_last(A, p.N);
  return p;
}

inline void check_matmul_out(const char* op, const at::Tensor& out, const MatmulPlan& p,
                             const at::Tensor& A) {
  check_same_device(op, "out", out, A);
  check_dtype(op, "out", out, at::kInt);
  TORCH_CHECK_VALUE(
      out.sizes() == at::IntArrayRef(p.out_shape),
      message(op, ": out must have shape ", at::IntArrayRef(p.out_shape), ", got ", out.sizes()));
}

// ---- int8_mm_dequant ------------------------------------------------------------------------------

struct MmDequantPlan {
  at::Tensor A2;                    // contiguous int32 [rows, N]
  at::Tensor row_stats, col_stats;  // contiguous float32
  at::Tensor bias;                  // contiguous, or undefined
  at::Tensor out;                   // [rows, N] in dtype
  int64_t rows = 0, N = 0;
  DType out_dtype = DType::kFloat16;
  DType bias_dtype = DType::kFloat32;
  std::vector<int64_t> out_shape;
};

// The output dtype (float16 by default) and the bias (N entries, one per `per`) of a dequantized product;
// fills out_dtype, bias and bias_dtype of p.
inline at::ScalarType check_dequant_output(const char* op, const at::Tensor& A, int64_t N, const char* per,
                                           c10::optional<at::ScalarType> dtype,
                                           const c10::optional<at::Tensor>& bias, MmDequantPlan& p) {
  const at::ScalarType out_dtype = dtype.value_or(at::kHalf);
  check_output_dtype(op, out_dtype);
  p.out_dtype = to_dtype(out_dtype);
  if (bias.has_value()) {
    check_same_device(op, "bias", *bias, A);
    check_float_input(op, "bias", *bias);
    TORCH_CHECK_VALUE(bias->numel() == N, message(op, ": bias must have ", N, " entries (one per ", per,
                                                  "), got ", bias->numel()));
    p.bias = bias->contiguous();
    p.bias_dtype = to_dtype(bias->scalar_type());
  }
  return out_dtype;
}

inline MmDequantPlan plan_mm_dequant(const char* op, const at::Tensor& A, const at::Tensor& row_stats,
                                     const at::Tensor& col_stats, c10::optional<at::ScalarType> dtype,
                                     const c10::optional<at::Tensor>& bias) {
  check_dtype(op, "A", A, at::kInt);
  check_has_last_dim(op, "A", A);
  MmDequantPlan p;
  p.N = A.size(-1);
  p.rows = leading_rows(A);
  check_stats(op, "row_stats", row_stats, p.rows, A, "row of A");
  check_stats(op, "col_stats", col_stats, p.N, A, "column of A");
  const at::ScalarType out_dtype = check_dequant_output(op, A, p.N, "column of A", dtype, bias, p);
  p.A2 = A.reshape({p.rows, p.N}).contiguous();
  p.row_stats = row_stats.contiguous();
  p.col_stats = col_stats.contiguous();
  p.out_shape = A.sizes().vec();
  p.out = at::empty({p.rows, p.N}, A.options().dtype(out_dtype));
  return p;
}

// ---- int8_scaled_mm ---------------------------------------------------------------------------------

inline void check_scaled_mm(const char* op, const at::Tensor& A, const at::Tensor& B,
                            const at::Tensor& row_stats, const at::Tensor& col_stats) {
  check_dtype(op, "A", A, at::kChar);
  check_has_last_dim(op, "A", A);
  check_int8_weight(op, "B", B, A);
  check_stats(op, "row_stats", row_stats, leading_rows(A), A, "row of A");
  check_stats(op, "col_stats", col_stats, B.size(0), A, "row of B");
}

// ---- int8_linear --------------------------------------------------------------------------------------

struct LinearPlan {
  at::Tensor A2;   // [M, K] view of A with unit column stride
  at::Tensor CB;   // contiguous int8 [N, K]
  at::Tensor SCB;  // contiguous float32 [N]
  c10::optional<at::Tensor> bias;
  int64_t M = 0, N = 0, K = 0;
  double threshold = 0.0;
  std::vector<int64_t> out_shape;
};

inline LinearPlan plan_linear(const at::Tensor& A, const at::Tensor& CB, const at::Tensor& SCB,
                              const c10::optional<at::Tensor>& bias, double threshold) {
  const char* op = "halfbyte::int8_linear";
  check_float_input(op, "A", A);
  check_has_last_dim(op, "A", A);
  check_int8_weight(op, "CB", CB, A);
  check_stats(op, "SCB", SCB, CB.size(0), A, "row of CB");
  check_threshold(op, threshold);
  LinearPlan p;
  p.N = CB.size(0);
  p.K = CB.size(1);
  if (bias.has_value()) {
    check_same_device(op, "bias", *bias, A);
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == p.N,
                      message(op, ": bias must have shape [", p.N, "], got ", bias->sizes()));
    TORCH_CHECK_TYPE(bias->scalar_type() == A.scalar_type(),
                     message(op, ": bias dtype (", dtype_name(bias->scalar_type()), ") must match A (",
                             dtype_name(A.scalar_type()), ")"));
    p.bias = bias->contiguous();
  }
  p.A2 = rows_view(A);
  p.M = p.A2.size(0);
  p.CB = CB.contiguous();
  p.SCB = SCB.contiguous().view({-1});
  p.threshold = threshold;
  p.out_shape = shape_with_last(A, p.N);
  return p;
}

// Weight-only product with ATen ops (the CPU path and the CUDA fallback): float32 A @ float32 W^T per
// chunk of weight rows (int8 -> float32 is exact), then * SCB/127 and + bias in float32, cast to A's dtype.
inline at::Tensor weight_only_linear_aten(const LinearPlan& p) {
  constexpr int64_t kRowsPerChunk = 2048;  // float32 copy of at most 2048 weight rows at a time
  const at::Tensor A2f = p.A2.to(at::kFloat);
  at::Tensor out = at::empty({p.M, p.N}, A2f.options());
  for (int64_t n0 = 0; n0 < p.N; n0 += kRowsPerChunk) {
    const int64_t rows = std::min(kRowsPerChunk, p.N - n0);
    out.narrow(1, n0, rows).copy_(at::mm(A2f, p.CB.narrow(0, n0, rows).to(at::kFloat).t()));
  }
  out.mul_(p.SCB.mul(static_cast<double>(kInt8Inverse127)));
  if (p.bias.has_value()) out.add_(p.bias->to(at::kFloat));
  return out.to(p.A2.scalar_type());
}

// M > 16: LLM.int8 with a backend's quantize and scaled matmul, plus the outlier columns of A in A's
// dtype: out += A[:, cols] @ (CB[:, cols] * SCB / 127)^T (bitsandbytes' int8_mixed_scaled_mm).
template <class Quantize, class ScaledMm>
at::Tensor quantized_linear(const LinearPlan& p, Quantize&& quantize, ScaledMm&& scaled_mm) {
  auto [CA, SCA, outlier_cols] = quantize(p.A2, p.threshold);
  at::Tensor out = scaled_mm(CA, p.CB, SCA, p.SCB, p.bias, p.A2.scalar_type());
  if (outlier_cols.has_value() && outlier_cols->numel() > 0) {
    const at::Tensor sub_A = p.A2.index_select(1, *outlier_cols);
    const at::Tensor sub_W =
        vectorwise_dequant(p.CB.index_select(1, *outlier_cols), p.SCB).to(sub_A.scalar_type());
    out.addmm_(sub_A, sub_W.t());
  }
  return out;
}

// int8_linear for a backend: empty shapes, then weight-only (M <= 16) or quantized (M > 16).
template <class WeightOnly, class Quantize, class ScaledMm>
at::Tensor linear(const LinearPlan& p, WeightOnly&& weight_only, Quantize&& quantize, ScaledMm&& scaled_mm) {
  at::Tensor out;
  if (p.M == 0 || p.N == 0) {
    out = at::empty({p.M, p.N}, p.A2.options());
  } else if (p.K == 0) {
    out = p.bias.has_value() ? p.bias->expand({p.M, p.N}).clone() : at::zeros({p.M, p.N}, p.A2.options());
  } else if (p.M <= kInt8WeightOnlyMaxRows) {
    out = weight_only(p);
  } else {
    out = quantized_linear(p, quantize, scaled_mm);
  }
  return out.view(p.out_shape);
}

}  // namespace halfbyte::ops::int8
