// The schemas of every halfbyte op, in one TORCH_LIBRARY. They follow bitsandbytes' schemas
// (bitsandbytes::*) so code written against one ports to the other by changing the namespace.
// Implementations: cpu_ops.cpp (CPU), cuda_ops.cpp (CUDA); fake kernels: python/halfbyte/_ops.py.
#include <torch/library.h>

TORCH_LIBRARY(halfbyte, m) {
  m.def("quantize_blockwise(Tensor A, Tensor code, int blocksize) -> (Tensor, Tensor)");
  m.def(
      "dequantize_blockwise(Tensor A, Tensor absmax, Tensor code, int blocksize, ScalarType dtype) -> "
      "Tensor");
  m.def(
      "dequantize_blockwise.out(Tensor A, Tensor absmax, Tensor code, int blocksize, ScalarType dtype, "
      "Tensor! out) -> ()");
  m.def(
      "quantize_4bit(Tensor A, int blocksize, str quant_type, ScalarType quant_storage) -> (Tensor, Tensor)");
  // dequantize_4bit takes bitsandbytes' arguments plus, like gemm_4bit, optional double-quantized scales:
  // with absmax_8bit given, `absmax` is the nested absmax (one per 256 blocks) and the scale of block b is
  // absmax_code[absmax_8bit[b]] * absmax[b / 256] + absmax_offset.
  m.def(
      "dequantize_4bit(Tensor A, Tensor absmax, int blocksize, str quant_type, int[] shape, ScalarType "
      "dtype, "
      "Tensor? absmax_8bit=None, Tensor? absmax_code=None, Tensor? absmax_offset=None) -> Tensor");
  m.def(
      "dequantize_4bit.out(Tensor A, Tensor absmax, int blocksize, str quant_type, int[] shape, "
      "ScalarType dtype, Tensor! out, Tensor? absmax_8bit=None, Tensor? absmax_code=None, "
      "Tensor? absmax_offset=None) -> ()");
  m.def(
      "gemm_4bit(Tensor A, Tensor B, int[] shapeB, Tensor absmax, int blocksize, str quant_type, "
      "Tensor? bias=None, Tensor? absmax_8bit=None, Tensor? absmax_code=None, Tensor? absmax_offset=None) "
      "-> Tensor");
  m.def("gemv_4bit(Tensor A, Tensor B, int[] shapeB, Tensor absmax, Tensor code, int blocksize) -> Tensor");
  m.def(
      "gemv_4bit.out(Tensor A, Tensor B, int[] shapeB, Tensor absmax, Tensor code, int blocksize, "
      "Tensor! out) -> ()");
}
