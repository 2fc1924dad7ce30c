// Schemas of the INT8 tier (LLM.int8-style row-wise int8), added to the halfbyte library defined in
// registration.cpp. The first six follow bitsandbytes 0.50's schemas (bitsandbytes::int8_*) argument for
// argument; int8_linear is halfbyte's own (the Linear8bitLt forward in one op).
// Implementations: int8_cpu_ops.cpp (CPU), int8_cuda_ops.cpp (CUDA); fake kernels and autograd:
// python/halfbyte/_ops_int8.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(halfbyte, m) {
  // Row-wise absmax quantization of A [..., K] (rows = all leading dimensions): (codes int8 like A,
  // row_stats float32 [rows], outlier_cols). threshold > 0: values with |A| >= threshold (compared in A's
  // dtype) are left out of the absmax and their columns are zeroed in every row; outlier_cols are those
  // columns (int64, ascending, possibly empty). threshold == 0: no outliers, outlier_cols is None.
  m.def("int8_vectorwise_quant(Tensor A, float threshold=0.0) -> (Tensor, Tensor, Tensor?)");
  // A int8 [..., K], stats float32 [rows] -> float32 A * stats * (1/127).
  m.def("int8_vectorwise_dequant(Tensor A, Tensor stats) -> Tensor");
  // A int8 [..., K] @ B int8 [N, K]^T -> int32 [..., N], exact (wrapping like int32 on overflow).
  m.def("int8_linear_matmul(Tensor A, Tensor B) -> Tensor");
  m.def("int8_linear_matmul.out(Tensor A, Tensor B, Tensor! out) -> ()");
  // A int32 [..., N] -> dtype (default float16): A * row_stats * col_stats / 127^2 + bias, one fma.
  m.def(
      "int8_mm_dequant(Tensor A, Tensor row_stats, Tensor col_stats, ScalarType? dtype=None, Tensor? "
      "bias=None) "
      "-> Tensor");
  // int8_mm_dequant(int8_linear_matmul(A, B), row_stats, col_stats, dtype, bias).
  m.def(
      "int8_scaled_mm(Tensor A, Tensor B, Tensor row_stats, Tensor col_stats, Tensor? bias=None, "
      "ScalarType? dtype=None) -> Tensor");
  // A float [..., K] @ W^T (+ bias) for the int8 weight CB [N, K] with row absmax SCB [N] (W = CB * SCB /
  // 127), in A's dtype. M = rows of A <= 16: weight only (A is not quantized; float32 accumulation). M > 16:
  // LLM.int8: A is quantized row-wise with `threshold` (int8_vectorwise_quant), multiplied in int8
  // (int8_scaled_mm), and the outlier columns of A are added back in A's dtype with the dequantized weight.
  m.def("int8_linear(Tensor A, Tensor CB, Tensor SCB, Tensor? bias=None, float threshold=0.0) -> Tensor");
}
