// The NF4 and FP4 level tables in device memory, so launchers that take a table pointer can be
// called with a built-in quant type without copying from the host (graph-capture safe). The address of
// each table is asked once per device (cudaGetSymbolAddress cost ~1 us of host time on every 4-bit matmul
// call of eager decoding).
#include <atomic>

#include "device_attributes.cuh"
#include "halfbyte/cuda_kernels.h"

namespace halfbyte::cuda {
namespace {

#define HB_LEVELS(fn)                                           \
  {fn(0), fn(1), fn(2),  fn(3),  fn(4),  fn(5),  fn(6),  fn(7), \
   fn(8), fn(9), fn(10), fn(11), fn(12), fn(13), fn(14), fn(15)}
__device__ const float nf4_table[16] = HB_LEVELS(nf4_level);
__device__ const float fp4_table[16] = HB_LEVELS(fp4_level);
#undef HB_LEVELS

}  // namespace

cudaError_t table_4bit(QuantType type, const float** device_table) {
  static std::atomic<const float*> known[host::kMaxDevices][2];  // nullptr: not asked yet
  int device = 0;
  cudaError_t status = cudaGetDevice(&device);
  if (status != cudaSuccess) return status;
  if (device < 0 || device >= host::kMaxDevices) return cudaErrorInvalidDevice;
  const int index = type == QuantType::kNF4 ? 0 : 1;
  const float* table = known[device][index].load(std::memory_order_relaxed);
  if (table == nullptr) {
    void* address = nullptr;
    status = type == QuantType::kNF4 ? cudaGetSymbolAddress(&address, nf4_table)
                                     : cudaGetSymbolAddress(&address, fp4_table);
    if (status != cudaSuccess) return status;
    table = static_cast<const float*>(address);
    known[device][index].store(table, std::memory_order_relaxed);
  }
  *device_table = table;
  return cudaSuccess;
}

}  // namespace halfbyte::cuda
