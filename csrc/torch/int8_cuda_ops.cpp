// CUDA implementations of the INT8 ops: validation from int8_op_plans.h, then the torch-free launchers of
// csrc/cuda/int8_*.cu on the current stream under a device guard. The int8 x int8 -> int32 product is
// cuBLASLt's (at::_int_mm), zero-padded where its shape rules (M > 16, K and N multiples of 8) do not hold.
// No host synchronization except where an op returns a data-dependent size (the outlier columns of
// int8_vectorwise_quant with a threshold), so the threshold-0 paths can be captured in a CUDA graph.
//
// int8_linear dispatch (rows M = A.numel() / K):
//   M <= 16 -> the weight-only tensor-core kernel (int8_weight_only_gemm.cu) for float16 / bfloat16 A with
//              aligned rows and K % 16 == 0; a float32 ATen matmul of the int8 weight otherwise.
//   M > 16  -> LLM.int8: int8_vectorwise_quant of A, then int8_scaled_mm (+ outlier columns): on sm_90a one
//              fused warp-specialized TMA + wgmma kernel (int8_scaled_mm.cu; 1.2-1.6x faster than cuBLASLt +
//              int8_mm_dequant at M >= 256 on the H100), elsewhere, and where int8_scaled_mm_preferred says
//              the library call is faster, at::_int_mm and int8_mm_dequant.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "halfbyte/int8_cuda_kernels.h"
#include "int8_op_plans.h"

namespace halfbyte::ops::int8 {
namespace {

void check_cuda(cudaError_t status, const char* op) {
  TORCH_CHECK(status == cudaSuccess,
              message(op, ": CUDA kernel launch failed: ", cudaGetErrorString(status)));
}

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0; }

int64_t round_up(int64_t x, int64_t multiple) { return (x + multiple - 1) / multiple * multiple; }

// A zero-padded [rows, cols] copy of the contiguous int8 matrix t, or t itself when it already fits.
at::Tensor padded(const at::Tensor& t, int64_t rows, int64_t cols) {
  if (rows == t.size(0) && cols == t.size(1) && aligned16(t)) return t;
  at::Tensor p = at::zeros({rows, cols}, t.options());
  p.narrow(0, 0, t.size(0)).narrow(1, 0, t.size(1)).copy_(t);
  return p;
}

// Exact A2 [M, K] @ B [N, K]^T in int32 through cuBLASLt (both contiguous int8). Zero padding adds nothing
// to the sums.
at::Tensor int_mm_exact(const at::Tensor& A2, const at::Tensor& B) {
  const int64_t M = A2.size(0), K = A2.size(1), N = B.size(0);
  if (M == 0 || N == 0) return at::empty({M, N}, A2.options().dtype(at::kInt));
  if (K == 0) return at::zeros({M, N}, A2.options().dtype(at::kInt));
  const int64_t Mp = std::max<int64_t>(M, 17), Kp = round_up(K, 8), Np = round_up(N, 8);
  const at::Tensor a = padded(A2, Mp, Kp);
  const at::Tensor b = padded(B, Np, Kp);
  at::Tensor c = at::_int_mm(a, b.t());
  if (Mp != M || Np != N) c = c.narrow(0, 0, M).narrow(1, 0, N).contiguous();
  return c;
}

std::tuple<at::Tensor, at::Tensor, c10::optional<at::Tensor>> vectorwise_quant_cuda(const at::Tensor& A,
                                                                                    double threshold) {
  const c10::cuda::CUDAGuard guard(A.device());
  QuantPlan p = plan_vectorwise_quant(A, threshold);
  check_cuda(
      cuda::int8_vectorwise_quant(p.input.const_data_ptr(), p.dtype, p.rows, p.cols, p.cols, p.has_threshold,
                                  p.threshold, p.codes.data_ptr<int8_t>(), p.row_stats.data_ptr<float>(),
                                  p.has_threshold ? p.outlier_flags.data_ptr<uint8_t>() : nullptr,
                                  c10::cuda::getCurrentCUDAStream()),
      "halfbyte::int8_vectorwise_quant");
  return finish_vectorwise_quant(p);
}

at::Tensor vectorwise_dequant_cuda(const at::Tensor& A, const at::Tensor& stats) {
  const c10::cuda::CUDAGuard guard(A.device());
  return vectorwise_dequant(A, stats);
}

at::Tensor linear_matmul_cuda(const at::Tensor& A, const at::Tensor& B) {
  const c10::cuda::CUDAGuard guard(A.device());
  const MatmulPlan p = plan_linear_matmul("halfbyte::int8_linear_matmul", A, B);
  return int_mm_exact(p.A2, p.B).view(p.out_shape);
}

void linear_matmul_out_cuda(const at::Tensor& A, const at::Tensor& B, at::Tensor out) {
  const char* op = "halfbyte::int8_linear_matmul.out";
  const c10::cuda::CUDAGuard guard(A.device());
  const MatmulPlan p = plan_linear_matmul(op, A, B);
  check_matmul_out(op, out, p, A);
  out.copy_(int_mm_exact(p.A2, p.B).view(p.out_shape));
}

at::Tensor mm_dequant_planned(const MmDequantPlan& p) {
  check_cuda(cuda::int8_mm_dequant(p.A2.const_data_ptr<int32_t>(), p.rows, p.N,
                                   p.row_stats.const_data_ptr<float>(), p.col_stats.const_data_ptr<float>(),
                                   p.bias.defined() ? p.bias.const_data_ptr() : nullptr, p.bias_dtype,
                                   p.out_dtype, p.out.data_ptr(), c10::cuda::getCurrentCUDAStream()),
             "halfbyte::int8_mm_dequant");
  return p.out.view(p.out_shape);
}

at::Tensor mm_dequant_cuda(const at::Tensor& A, const at::Tensor& row_stats, const at::Tensor& col_stats,
                           c10::optional<at::ScalarType> dtype, const c10::optional<at::Tensor>& bias) {
  const c10::cuda::CUDAGuard guard(A.device());
  return mm_dequant_planned(
      plan_mm_dequant("halfbyte::int8_mm_dequant", A, row_stats, col_stats, dtype, bias));
}

at::Tensor scaled_mm_cuda(const at::Tensor& A, const at::Tensor& B, const at::Tensor& row_stats,
                          const at::Tensor& col_stats, const c10::optional<at::Tensor>& bias,
                          c10::optional<at::ScalarType> dtype) {
  const char* op = "halfbyte::int8_scaled_mm";
  const c10::cuda::CUDAGuard guard(A.device());
  check_scaled_mm(op, A, B, row_stats, col_stats);
  const MatmulPlan mp = plan_linear_matmul(op, A, B);
  // One validation and one output for both paths: the plan of int8_mm_dequant, with the product filled in
  // below only where the two steps run.
  MmDequantPlan out;
  const at::ScalarType out_dtype = check_dequant_output(op, A, mp.N, "row of B", dtype, bias, out);
  out.rows = mp.M;
  out.N = mp.N;
  out.row_stats = row_stats.contiguous();
  out.col_stats = col_stats.contiguous();
  out.out_shape = mp.out_shape;
  out.out = at::empty({mp.M, mp.N}, A.options().dtype(out_dtype));
  if (mp.M > 0 &&
      cuda::int8_scaled_mm_supported(mp.A2.const_data_ptr<int8_t>(), mp.B.const_data_ptr<int8_t>(), mp.M,
                                     mp.N, mp.K, out.out.const_data_ptr()) &&
      cuda::int8_scaled_mm_preferred(mp.M, mp.N, mp.K)) {
    // One fused kernel (sm_90a): no int32 product in memory; bit-identical to the two steps below.
    cuda::Int8ScaledMmPlan plan;
    check_cuda(cuda::int8_scaled_mm_plan(mp.M, mp.N, mp.K, &plan), op);
    at::Tensor workspace;
    if (plan.splits > 1) workspace = at::empty({plan.workspace_ints}, A.options().dtype(at::kInt));
    check_cuda(cuda::int8_scaled_mm(
                   mp.A2.const_data_ptr<int8_t>(), mp.B.const_data_ptr<int8_t>(), mp.M, mp.N, mp.K,
                   out.row_stats.const_data_ptr<float>(), out.col_stats.const_data_ptr<float>(),
                   out.bias.defined() ? out.bias.const_data_ptr() : nullptr, out.bias_dtype, out.out_dtype,
                   out.out.data_ptr(), plan, plan.splits > 1 ? workspace.data_ptr<int32_t>() : nullptr,
                   c10::cuda::getCurrentCUDAStream()),
               op);
    return out.out.view(mp.out_shape);
  }
  out.A2 = int_mm_exact(mp.A2, mp.B);
  return mm_dequant_planned(out);
}

at::Tensor weight_only_cuda(const LinearPlan& p) {
  const at::ScalarType dtype = p.A2.scalar_type();
  const int64_t lda = p.M > 1 ? p.A2.stride(0) : p.K;
  const int8_t* W = p.CB.const_data_ptr<int8_t>();
  if (dtype == at::kFloat ||
      !cuda::int8_weight_only_linear_supported(p.A2.const_data_ptr(), to_dtype(dtype), p.M, p.K, lda, W)) {
    return weight_only_linear_aten(p);
  }
  at::Tensor out = at::empty({p.M, p.N}, p.A2.options());
  check_cuda(cuda::int8_weight_only_linear(p.A2.const_data_ptr(), to_dtype(dtype), p.M, p.K, lda, W,
                                           p.SCB.const_data_ptr<float>(), p.N,
                                           p.bias.has_value() ? p.bias->const_data_ptr() : nullptr,
                                           out.data_ptr(), c10::cuda::getCurrentCUDAStream()),
             "halfbyte::int8_linear");
  return out;
}

at::Tensor linear_cuda(const at::Tensor& A, const at::Tensor& CB, const at::Tensor& SCB,
                       const c10::optional<at::Tensor>& bias, double threshold) {
  const c10::cuda::CUDAGuard guard(A.device());
  const LinearPlan p = plan_linear(A, CB, SCB, bias, threshold);
  return linear(p, weight_only_cuda, vectorwise_quant_cuda,
                [](const at::Tensor& CA, const at::Tensor& CB_, const at::Tensor& SCA, const at::Tensor& SCB_,
                   const c10::optional<at::Tensor>& bias_,
                   at::ScalarType dtype) { return scaled_mm_cuda(CA, CB_, SCA, SCB_, bias_, dtype); });
}

}  // namespace

TORCH_LIBRARY_IMPL(halfbyte, CUDA, m) {
  m.impl("int8_vectorwise_quant", &vectorwise_quant_cuda);
  m.impl("int8_vectorwise_dequant", &vectorwise_dequant_cuda);
  m.impl("int8_linear_matmul", &linear_matmul_cuda);
  m.impl("int8_linear_matmul.out", &linear_matmul_out_cuda);
  m.impl("int8_mm_dequant", &mm_dequant_cuda);
  m.impl("int8_scaled_mm", &scaled_mm_cuda);
  m.impl("int8_linear", &linear_cuda);
}

}  // namespace halfbyte::ops::int8
