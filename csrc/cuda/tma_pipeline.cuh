// Pieces of the warp-specialized sm_90 kernels (int8_scaled_mm.cu, gemm_4bit_prefill_tma.cu): mbarrier
// operations, the 2-D TMA tensor copy, and on the host the TMA map encoder taken from the driver through the
// runtime (cudaGetDriverEntryPointByVersion: no link against libcuda).
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

namespace halfbyte::cuda::tma_pipeline {

// ---- device: mbarriers and copies ------------------------------------------------------------------

__device__ __forceinline__ void barrier_init(uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}
// One arrival that also announces `bytes` of copies completing on this barrier's current phase.
__device__ __forceinline__ void barrier_arrive_expect(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void barrier_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}
// One arrival on `bar` once every cp.async this thread issued before has landed (counted in the barrier's
// expected arrivals: .noinc).
__device__ __forceinline__ void barrier_arrive_after_copies(uint32_t bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];" ::"r"(bar) : "memory");
}
// Waits until the phase of parity `parity` has completed.
__device__ __forceinline__ void barrier_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred done;\nWAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT;\n}" ::"r"(bar),
      "r"(parity)
      : "memory");
}
// Copies the box at element coordinates (x, y) of `map` to shared memory at `dst`, completing its bytes on
// `bar` (zeros where the box lies past the tensor's ends).
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const CUtensorMap* map, int x, int y,
                                            uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], "
      "[%4];" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(x), "r"(y), "r"(bar)
      : "memory");
}

// ---- host: TMA maps ----------------------------------------------------------------------------------

using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                 const cuuint64_t*, const cuuint32_t*, const cuuint32_t*,
                                 CUtensorMapInterleave, CUtensorMapSwizzle, CUtensorMapL2promotion,
                                 CUtensorMapFloatOOBfill);

// cuTensorMapEncodeTiled from the driver, looked up once; cudaErrorNotSupported where the driver lacks it.
inline cudaError_t encode_tiled_function(EncodeTiled& fn) {
  static std::atomic<EncodeTiled> cached{nullptr};
  fn = cached.load(std::memory_order_acquire);
  if (fn != nullptr) return cudaSuccess;
  void* entry = nullptr;
  cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
  const cudaError_t err =
      cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &entry, 12000, cudaEnableDefault, &found);
  if (err != cudaSuccess) return err;
  if (found != cudaDriverEntryPointSuccess || entry == nullptr) return cudaErrorNotSupported;
  fn = reinterpret_cast<EncodeTiled>(entry);
  cached.store(fn, std::memory_order_release);
  return cudaSuccess;
}

// The TMA map of a row-major [rows, cols] matrix of `type` (elements of `element_bytes`) whose rows lie
// `row_stride_bytes` apart (a multiple of 16), copied in boxes of box_cols x box_rows elements; zeros past
// the ends.
inline cudaError_t encode_2d_map(CUtensorMap& map, CUtensorMapDataType type, const void* base, int64_t rows,
                                 int64_t cols, int64_t row_stride_bytes, int box_cols, int box_rows,
                                 CUtensorMapSwizzle swizzle, CUtensorMapL2promotion promotion) {
  EncodeTiled encode = nullptr;
  const cudaError_t err = encode_tiled_function(encode);
  if (err != cudaSuccess) return err;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(cols), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(row_stride_bytes)};
  const cuuint32_t box[2] = {static_cast<cuuint32_t>(box_cols), static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t element_strides[2] = {1, 1};
  const CUresult r =
      encode(&map, type, 2, const_cast<void*>(base), dims, strides, box, element_strides,
             CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, promotion, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

}  // namespace halfbyte::cuda::tma_pipeline
