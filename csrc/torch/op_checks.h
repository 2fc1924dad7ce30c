// Argument validation shared by the CPU and CUDA implementations of the halfbyte ops. Every failure
// is a TORCH_CHECK whose message names the op, the argument, what was expected and what was given.
#pragma once

#include <ATen/ATen.h>

#include <string>

#include "halfbyte/codebooks.h"
#include "halfbyte/float_types.h"

namespace halfbyte::ops {

// Error text is assembled here and handed to TORCH_CHECK as one string: numbers go through
// std::to_string, never through an ostream. Built with a newer GCC than torch (GCC 13 against torch
// 2.11 on the GPU machine), formatting an integer into c10::str's ostringstream crashed the process.
namespace message_parts {
inline void append(std::string& s, const char* v) { s += v; }
inline void append(std::string& s, const std::string& v) { s += v; }
inline void append(std::string& s, c10::string_view v) { s.append(v.data(), v.size()); }
inline void append(std::string& s, int64_t v) { s += std::to_string(v); }
inline void append(std::string& s, int v) { s += std::to_string(v); }
inline void append(std::string& s, size_t v) { s += std::to_string(v); }
inline void append(std::string& s, at::ScalarType v) { s += c10::toString(v); }
inline void append(std::string& s, const c10::Device& v) { s += v.str(); }
inline void append(std::string& s, at::IntArrayRef v) {
  s += "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  s += "]";
}
}  // namespace message_parts

template <class... Parts>
std::string message(const Parts&... parts) {
  std::string s;
  (message_parts::append(s, parts), ...);
  return s;
}

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

inline DType to_dtype(at::ScalarType t) {
  return t == at::kFloat ? DType::kFloat32 : (t == at::kHalf ? DType::kFloat16 : DType::kBFloat16);
}

inline void check_float_input(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(is_float_dtype(t.scalar_type()),
                   message(op, ": ", name, " must be float16, bfloat16 or float32, got ", t.scalar_type()));
}

inline void check_output_dtype(const char* op, at::ScalarType dtype) {
  TORCH_CHECK_TYPE(is_float_dtype(dtype),
                   message(op, ": dtype must be float16, bfloat16 or float32, got ", dtype));
}

inline void check_blocksize(const char* op, int64_t blocksize) {
  TORCH_CHECK_VALUE(is_valid_blocksize(blocksize),
                    message(op, ": blocksize must be a power of two from 32 to 4096, got ", blocksize));
}

inline QuantType parse_quant_type(const char* op, const std::string& quant_type) {
  if (quant_type == "nf4") return QuantType::kNF4;
  TORCH_CHECK_VALUE(quant_type == "fp4",
                    message(op, ": quant_type must be 'nf4' or 'fp4', got '", quant_type, "'"));
  return QuantType::kFP4;
}

inline void check_same_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref) {
  TORCH_CHECK_VALUE(t.device() == ref.device(),
                    message(op, ": ", name, " must be on ", ref.device(), " like A, got ", t.device()));
}

inline int64_t block_count(int64_t n, int64_t blocksize) { return (n + blocksize - 1) / blocksize; }

// Bytes of the packed 4-bit tensor of n elements in a storage dtype of `itemsize` bytes: (n + 1) / 2
// rounded up to whole storage elements (the zero padding is never read).
inline int64_t packed_storage_elements(int64_t n, int64_t itemsize) {
  const int64_t bytes = (n + 1) / 2;
  return (bytes + itemsize - 1) / itemsize;
}

inline void check_absmax(const char* op, const at::Tensor& absmax, int64_t expected_blocks,
                         const at::Tensor& A, const char* name = "absmax") {
  check_same_device(op, name, absmax, A);
  TORCH_CHECK_TYPE(absmax.scalar_type() == at::kFloat,
                   message(op, ": ", name, " must be float32, got ", absmax.scalar_type()));
  TORCH_CHECK_VALUE(absmax.numel() == expected_blocks,
                    message(op, ": ", name, " must have ", expected_blocks, " entries (one per block), got ",
                            absmax.numel()));
}

inline void check_code256(const char* op, const at::Tensor& code, const at::Tensor& A,
                          const char* name = "code") {
  check_same_device(op, name, code, A);
  TORCH_CHECK_VALUE(code.scalar_type() == at::kFloat && code.numel() == 256,
                    message(op, ": ", name, " must be a float32 tensor of 256 entries, got ",
                            code.scalar_type(), " with ", code.numel(), " entries"));
}

inline int64_t shape_numel(const char* op, at::IntArrayRef shape) {
  int64_t n = 1;
  for (int64_t d : shape) {
    TORCH_CHECK_VALUE(d >= 0, message(op, ": shape must have non-negative sizes, got ", shape));
    n *= d;
  }
  return n;
}

// The packed 4-bit tensor must hold exactly the bytes of `n` codes (in any storage dtype).
inline void check_packed(const char* op, const at::Tensor& packed, int64_t n, const at::Tensor& A,
                         const char* name = "A") {
  check_same_device(op, name, packed, A);
  const int64_t itemsize = packed.element_size();
  TORCH_CHECK_VALUE(
      packed.numel() == packed_storage_elements(n, itemsize),
      message(op, ": ", name, " holds ", packed.numel(), " elements of ", packed.scalar_type(), " but ", n,
              " 4-bit codes need ", packed_storage_elements(n, itemsize), " (size does not match shape)"));
}

// Per-block scales of a 4-bit tensor (gemm_4bit, dequantize_4bit): plain float absmax, or double-quantized
// (absmax_8bit codes + nested absmax per 256 + code + offset). Returns whether they are nested.
inline bool check_gemm_scales(const char* op, const at::Tensor& absmax, int64_t blocks,
                              const c10::optional<at::Tensor>& absmax_8bit,
                              const c10::optional<at::Tensor>& absmax_code,
                              const c10::optional<at::Tensor>& absmax_offset, const at::Tensor& A) {
  if (!absmax_8bit.has_value()) {
    check_absmax(op, absmax, blocks, A);
    return false;
  }
  const at::Tensor& codes = *absmax_8bit;
  check_same_device(op, "absmax_8bit", codes, A);
  TORCH_CHECK_VALUE(codes.scalar_type() == at::kByte && codes.numel() == blocks,
                    message(op, ": absmax_8bit must be uint8 with one entry per block (", blocks, "), got ",
                            codes.scalar_type(), " with ", codes.numel()));
  check_absmax(op, absmax, block_count(blocks, kNestedBlocksize), A, "absmax (nested, one per 256 blocks)");
  TORCH_CHECK_VALUE(absmax_code.has_value(),
                    message(op, ": absmax_code is required when absmax_8bit is given"));
  check_code256(op, *absmax_code, A, "absmax_code");
  TORCH_CHECK_VALUE(absmax_offset.has_value(),
                    message(op, ": absmax_offset is required when absmax_8bit is given"));
  check_same_device(op, "absmax_offset", *absmax_offset, A);
  TORCH_CHECK_VALUE(absmax_offset->scalar_type() == at::kFloat && absmax_offset->numel() == 1,
                    message(op, ": absmax_offset must be a float32 scalar, got ",
                            absmax_offset->scalar_type(), " with ", absmax_offset->numel(), " entries"));
  return true;
}

inline void check_gemm_operands(const char* op, const at::Tensor& A, const at::Tensor& B,
                                at::IntArrayRef shapeB, const c10::optional<at::Tensor>& bias) {
  check_float_input(op, "A", A);
  TORCH_CHECK_VALUE(shapeB.size() == 2, message(op, ": shapeB must be [N, K], got ", shapeB));
  TORCH_CHECK_VALUE(A.dim() >= 1 && A.size(-1) == shapeB[1],
                    message(op, ": A's last dimension (", A.dim() >= 1 ? A.size(-1) : -1,
                            ") must equal K = shapeB[1] (", shapeB[1], ")"));
  check_packed(op, B, shape_numel(op, shapeB), A, "B");
  if (bias.has_value()) {
    check_same_device(op, "bias", *bias, A);
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == shapeB[0],
                      message(op, ": bias must have shape [", shapeB[0], "], got ", bias->sizes()));
    TORCH_CHECK_TYPE(
        bias->scalar_type() == A.scalar_type(),
        message(op, ": bias dtype (", bias->scalar_type(), ") must match A (", A.scalar_type(), ")"));
  }
}

}  // namespace halfbyte::ops
