// The NF4 and FP4 level tables in device memory, so launchers that take a table pointer can be
// called with a built-in quant type without copying from the host (graph-capture safe).
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
  void* address = nullptr;
  const cudaError_t status = type == QuantType::kNF4 ? cudaGetSymbolAddress(&address, nf4_table)
                                                     : cudaGetSymbolAddress(&address, fp4_table);
  *device_table = static_cast<const float*>(address);
  return status;
}

}  // namespace halfbyte::cuda
