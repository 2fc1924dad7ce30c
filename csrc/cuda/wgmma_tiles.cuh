// Pieces of the sm_90 wgmma kernels (gemm_4bit_prefill.cu, gemm_4bit_prefill_tma.cu, int8_scaled_mm.cu): the
// 32-bit shared-memory address of a pointer, the matrix descriptor of the tiles they stage, and the register
// fence that keeps a wgmma's operands in place. Device functions only.
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

// Keeps registers live and in place across an asynchronous wgmma: the compiler cannot see that the
// instruction reads (and for accumulators writes) them after it was issued, so each is marked read and
// written here.
template <int kN>
__device__ __forceinline__ void fence_registers(float (&d)[kN]) {
#pragma unroll
  for (int i = 0; i < kN; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
template <int kN>
__device__ __forceinline__ void fence_registers(int32_t (&d)[kN]) {
#pragma unroll
  for (int i = 0; i < kN; ++i) asm volatile("" : "+r"(d[i])::"memory");
}
// A 64 x 16 wgmma A-operand fragment per k16 step of a 64-element stage.
__device__ __forceinline__ void fence_registers(uint32_t (&a)[4][4]) {
#pragma unroll
  for (int s = 0; s < 4; ++s) {
#pragma unroll
    for (int r = 0; r < 4; ++r) asm volatile("" : "+r"(a[s][r])::"memory");
  }
}

}  // namespace halfbyte::cuda::wgmma_tiles
