// CPU implementations of the INT8 ops: validation from int8_op_plans.h, the torch-free kernels of
// csrc/cpu/int8_rowwise.cpp split over threads (at::parallel_for), and for int8_linear's weight-only path
// (M <= 16) a float32 matmul of the int8 weight (exact in float32) with ATen.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "int8_op_plans.h"

namespace halfbyte::ops::int8 {
namespace {

// About 32K elements of work per task.
int64_t grain(int64_t work_per_item) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, work_per_item));
}

std::tuple<at::Tensor, at::Tensor, c10::optional<at::Tensor>> vectorwise_quant_cpu(const at::Tensor& A,
                                                                                   double threshold) {
  QuantPlan p = plan_vectorwise_quant(A, threshold);
  const void* in = p.input.const_data_ptr();
  int8_t* codes = p.codes.data_ptr<int8_t>();
  float* stats = p.row_stats.data_ptr<float>();
  uint8_t* flags = p.has_threshold ? p.outlier_flags.data_ptr<uint8_t>() : nullptr;
  at::parallel_for(0, p.rows, grain(p.cols), [&](int64_t begin, int64_t end) {
    cpu::int8_vectorwise_quant(in, p.dtype, p.cols, p.cols, p.has_threshold, p.threshold, codes, stats, flags,
                               begin, end);
  });
  return finish_vectorwise_quant(p);
}

at::Tensor vectorwise_dequant_cpu(const at::Tensor& A, const at::Tensor& stats) {
  return vectorwise_dequant(A, stats);
}

void linear_matmul_into(const MatmulPlan& p, int32_t* C) {
  const int64_t runs = (p.N + cpu::kInt8MatmulColumnsPerTask - 1) / cpu::kInt8MatmulColumnsPerTask;
  const int8_t* A = p.A2.const_data_ptr<int8_t>();
  const int8_t* B = p.B.const_data_ptr<int8_t>();
  at::parallel_for(
      0, p.M * runs, grain(cpu::kInt8MatmulColumnsPerTask * p.K),
      [&](int64_t begin, int64_t end) { cpu::int8_linear_matmul(A, p.K, B, p.K, p.K, p.N, C, begin, end); });
}

at::Tensor linear_matmul_cpu(const at::Tensor& A, const at::Tensor& B) {
  const MatmulPlan p = plan_linear_matmul("halfbyte::int8_linear_matmul", A, B);
  at::Tensor out = at::empty({p.M, p.N}, A.options().dtype(at::kInt));
  linear_matmul_into(p, out.data_ptr<int32_t>());
  return out.view(p.out_shape);
}

void linear_matmul_out_cpu(const at::Tensor& A, const at::Tensor& B, at::Tensor out) {
  const char* op = "halfbyte::int8_linear_matmul.out";
  const MatmulPlan p = plan_linear_matmul(op, A, B);
  check_matmul_out(op, out, p, A);
  if (out.is_contiguous()) {
    linear_matmul_into(p, out.data_ptr<int32_t>());
  } else {
    at::Tensor result = at::empty({p.M, p.N}, A.options().dtype(at::kInt));
    linear_matmul_into(p, result.data_ptr<int32_t>());
    out.copy_(result.view(p.out_shape));
  }
}

at::Tensor mm_dequant_planned(const MmDequantPlan& p) {
  const int32_t* acc = p.A2.const_data_ptr<int32_t>();
  const float* rows = p.row_stats.const_data_ptr<float>();
  const float* cols = p.col_stats.const_data_ptr<float>();
  const void* bias = p.bias.defined() ? p.bias.const_data_ptr() : nullptr;
  void* out = p.out.data_ptr();
  at::parallel_for(0, p.rows, grain(p.N), [&](int64_t begin, int64_t end) {
    cpu::int8_mm_dequant(acc, p.N, rows, cols, bias, p.bias_dtype, p.out_dtype, out, begin, end);
  });
  return p.out.view(p.out_shape);
}

at::Tensor mm_dequant_cpu(const at::Tensor& A, const at::Tensor& row_stats, const at::Tensor& col_stats,
                          c10::optional<at::ScalarType> dtype, const c10::optional<at::Tensor>& bias) {
  return mm_dequant_planned(
      plan_mm_dequant("halfbyte::int8_mm_dequant", A, row_stats, col_stats, dtype, bias));
}

at::Tensor scaled_mm_cpu(const at::Tensor& A, const at::Tensor& B, const at::Tensor& row_stats,
                         const at::Tensor& col_stats, const c10::optional<at::Tensor>& bias,
                         c10::optional<at::ScalarType> dtype) {
  const char* op = "halfbyte::int8_scaled_mm";
  check_scaled_mm(op, A, B, row_stats, col_stats);
  const MatmulPlan mp = plan_linear_matmul(op, A, B);
  at::Tensor acc = at::empty({mp.M, mp.N}, A.options().dtype(at::kInt));
  linear_matmul_into(mp, acc.data_ptr<int32_t>());
  return mm_dequant_planned(plan_mm_dequant(op, acc.view(mp.out_shape), row_stats, col_stats, dtype, bias));
}

at::Tensor linear_cpu(const at::Tensor& A, const at::Tensor& CB, const at::Tensor& SCB,
                      const c10::optional<at::Tensor>& bias, double threshold) {
  const LinearPlan p = plan_linear(A, CB, SCB, bias, threshold);
  return linear(p, weight_only_linear_aten, vectorwise_quant_cpu,
                [](const at::Tensor& CA, const at::Tensor& CB_, const at::Tensor& SCA, const at::Tensor& SCB_,
                   const c10::optional<at::Tensor>& bias_,
                   at::ScalarType dtype) { return scaled_mm_cpu(CA, CB_, SCA, SCB_, bias_, dtype); });
}

}  // namespace

TORCH_LIBRARY_IMPL(halfbyte, CPU, m) {
  m.impl("int8_vectorwise_quant", &vectorwise_quant_cpu);
  m.impl("int8_vectorwise_dequant", &vectorwise_dequant_cpu);
  m.impl("int8_linear_matmul", &linear_matmul_cpu);
  m.impl("int8_linear_matmul.out", &linear_matmul_out_cpu);
  m.impl("int8_mm_dequant", &mm_dequant_cpu);
  m.impl("int8_scaled_mm", &scaled_mm_cpu);
  m.impl("int8_linear", &linear_cpu);
}

}  // namespace halfbyte::ops::int8
