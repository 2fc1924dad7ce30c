// Host-side helpers shared by the CUDA launchers: attributes of the current device, asked once per device
// (cudaDeviceGetAttribute does no stream work, so later calls are safe inside a graph capture), and log2
// of a power-of-two blocksize.
#pragma once

#include <cuda_runtime_api.h>

#include <atomic>
#include <cstdint>

namespace halfbyte::cuda::host {

inline constexpr int kMaxDevices = 64;  // devices whose attributes are remembered

// `kAttribute` of the current device; cudaErrorInvalidDevice past kMaxDevices.
template <cudaDeviceAttr kAttribute>
cudaError_t device_attribute(int& value) {
  static std::atomic<int> known[kMaxDevices];  // value + 1; 0: not asked yet
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  if (device < 0 || device >= kMaxDevices) return cudaErrorInvalidDevice;
  int stored = known[device].load(std::memory_order_relaxed);
  if (stored == 0) {
    int v = 0;
    err = cudaDeviceGetAttribute(&v, kAttribute, device);
    if (err != cudaSuccess) return err;
    stored = v + 1;
    known[device].store(stored, std::memory_order_relaxed);
  }
  value = stored - 1;
  return cudaSuccess;
}

// Raises `kKernel`'s dynamic shared memory limit to `kBytes` on the current device, once per device (the
// attribute stays set; later calls do no CUDA work, so they are safe inside a graph capture).
template <auto kKernel, int kBytes>
cudaError_t allow_dynamic_shared_memory() {
  static std::atomic<bool> configured[kMaxDevices];
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  if (device < 0 || device >= kMaxDevices) return cudaErrorInvalidDevice;
  if (!configured[device].load(std::memory_order_relaxed)) {
    err = cudaFuncSetAttribute(reinterpret_cast<const void*>(kKernel),
                               cudaFuncAttributeMaxDynamicSharedMemorySize, kBytes);
    if (err != cudaSuccess) return err;
    configured[device].store(true, std::memory_order_relaxed);
  }
  return cudaSuccess;
}

// log2 of a power-of-two blocksize.
inline int log2_of(int64_t blocksize) {
  int log2 = 0;
  while ((int64_t{1} << log2) < blocksize) ++log2;
  return log2;
}

}  // namespace halfbyte::cuda::host
