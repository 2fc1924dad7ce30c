// halfbyte._C: importing it loads this library, which registers the halfbyte ops with torch
// (TORCH_LIBRARY in csrc/torch/). The pybind11 functions below only report how it was built; no op
// is bound through pybind11.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "build_info.h"

namespace {

bool built_with_cuda() {
#ifdef HALFBYTE_WITH_CUDA
  return true;
#else
  return false;
#endif
}

std::vector<std::string> compiled_kernels() {
  std::vector<std::string> kernels = {"cpu:quantize_4bit",      "cpu:dequantize_4bit",
                                      "cpu:quantize_blockwise", "cpu:dequantize_blockwise",
                                      "cpu:gemm_4bit",          "cpu:gemv_4bit"};
  for (const char* name :
       {"cpu:int8_vectorwise_quant", "cpu:int8_linear_matmul", "cpu:int8_mm_dequant", "cpu:int8_linear"}) {
    kernels.emplace_back(name);
  }
#ifdef HALFBYTE_WITH_CUDA
  for (const char* name :
       {"cuda:quantize_4bit", "cuda:dequantize_4bit", "cuda:quantize_blockwise", "cuda:dequantize_blockwise",
        "cuda:gemm_4bit", "cuda:gemv_4bit", "cuda:int8_vectorwise_quant", "cuda:int8_mm_dequant",
        "cuda:int8_weight_only_linear"}) {
    kernels.emplace_back(name);
  }
#endif
  return kernels;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "halfbyte native library: registers torch.ops.halfbyte.* and reports build information";
  m.attr("__version__") = HALFBYTE_VERSION;
  m.def(
      "version", []() { return std::string(HALFBYTE_VERSION); }, "halfbyte version the library was built as");
  m.def("built_with_cuda", &built_with_cuda, "whether the CUDA kernels were compiled");
  m.def(
      "cuda_archs", []() { return built_with_cuda() ? std::string(HALFBYTE_CUDA_ARCHS_STR) : std::string(); },
      "CUDA architectures the kernels were compiled for (CMake syntax), empty without CUDA");
  m.def("compiled_kernels", &compiled_kernels, "kernels compiled into this build, as 'device:op'");
}
