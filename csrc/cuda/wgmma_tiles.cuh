// Shared-memory pieces of the sm_90 wgmma kernels (gemm_4bit_prefill.cu, int8_scaled_mm.cu): the 32-bit
// shared-memory address of a pointer, and the matrix descriptor of the tiles both kernels stage. Device
// functions only.
#pragma once

#include <cstdint>

namespace halfbyte::cuda::wgmma_tiles {

__device__ __forceinline__ uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Shared-memory matrix descriptor of a K-major, 128-byte-swizzled tile at `address` (1024-byte aligned):
// 8-row groups 1024 bytes apart (stride byte offset), leading byte offset unused (1). The swizzle is the one
// cp.async writers produce by XOR-ing a row's 16-byte chunk index with row % 8, and the one TMA writes with
// CU_TENSOR_MAP_SWIZZLE_128B.
__device__ __forceinline__ uint64_t swizzled_tile_descriptor(uint32_t address) {
  return static_cast<uint64_t>((address & 0x3ffffu) >> 4) | (uint64_t{1} << 16) |
         (uint64_t{1024 >> 4} << 32) | (uint64_t{1} << 62);
}

}  // namespace halfbyte::cuda::wgmma_tiles
