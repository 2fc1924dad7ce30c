// Programmatic dependent launch (sm_90), shared by the decode kernels (gemm_4bit_decode.cu,
// int8_weight_only_gemm.cu). Such a kernel is launched with programmatic stream serialization: its blocks may
// start while the previous kernel on the stream is finishing. Until wait_for_prior_grids() a block only asks
// L2 for weight bytes (a bulk prefetch reads nothing into registers, so it cannot see stale data); every read
// of what an earlier kernel may have written (activations, scales, ...) and every write comes after it, so
// the kernel stays ordered after whatever ran before it. On older devices the launch is an ordinary one and
// the device functions are no-ops.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "device_attributes.cuh"

namespace halfbyte::cuda::dependent_launch {

__device__ __forceinline__ void wait_for_prior_grids() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// The next kernel on the stream may launch (its blocks take SM slots as this grid's blocks leave).
__device__ __forceinline__ void allow_dependent_grids() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;");
#endif
}

// `bytes` (a multiple of 16) from the 16-byte aligned `p` into L2.
__device__ __forceinline__ void prefetch_l2(const void* p, uint32_t bytes) {
#if __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(bytes) : "memory");
#else
  (void)p, (void)bytes;
#endif
}

// Whether the current device runs programmatic dependent launches (sm_90 or newer).
inline cudaError_t device_has_dependent_launch(bool& has) {
  int major = 0;
  const cudaError_t err = host::device_attribute<cudaDevAttrComputeCapabilityMajor>(major);
  has = major >= 9;
  return err;
}

// Launches a kernel that orders itself after the previous kernel with wait_for_prior_grids(), allowing it to
// start early where the device supports it.
template <typename... Params>
cudaError_t launch(void (*kernel)(Params...), dim3 grid, int threads, int smem, cudaStream_t stream,
                   Params... params) {
  bool dependent = false;
  const cudaError_t err = device_has_dependent_launch(dependent);
  if (err != cudaSuccess) return err;
  cudaLaunchAttribute attribute;
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = dim3(threads);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = dependent ? 1 : 0;
  return cudaLaunchKernelEx(&config, kernel, params...);
}

}  // namespace halfbyte::cuda::dependent_launch
