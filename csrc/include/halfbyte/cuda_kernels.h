// CUDA kernels of halfbyte on raw device pointers (no torch). Every launcher enqueues on `stream`,
// never synchronizes the host, allocates nothing and returns the launch status (cudaGetLastError
// after the launch), so callers can capture it in a CUDA graph. Index arithmetic is 64-bit.
//
// Results are bit-identical to the CPU kernels of cpu_kernels.h (same layouts, same rules from
// codebooks.h). Half types are passed as raw 16-bit patterns (DType says which).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "halfbyte/codebooks.h"
#include "halfbyte/float_types.h"

namespace halfbyte::cuda {

// Device address of the 16 levels of `type` (a table in device memory of the current device, set
// at module load; no copy, so it is safe during graph capture).
cudaError_t table_4bit(QuantType type, const float** device_table);

cudaError_t quantize_4bit(const void* input, DType input_dtype, int64_t n, int64_t blocksize, QuantType type,
                          float* absmax, uint8_t* packed, cudaStream_t stream);

// `code`: device pointer to a sorted 256-entry float32 code.
cudaError_t quantize_blockwise_8bit(const void* input, DType input_dtype, int64_t n, int64_t blocksize,
                                    const float* code, float* absmax, uint8_t* codes, cudaStream_t stream);

cudaError_t dequantize_blockwise_8bit(const uint8_t* codes, const float* absmax, const float* code, int64_t n,
                                      int64_t blocksize, DType output_dtype, void* output,
                                      cudaStream_t stream);

// Per-block scale of a 4-bit weight, plain or double-quantized:
//   plain:  scale[b] = absmax[b]
//   nested: scale[b] = nested_code[absmax_codes[b]] * nested_absmax[b / 256] + *offset
struct BlockScales {
  const float* absmax = nullptr;          // plain float32 absmax, or nullptr when nested
  const uint8_t* absmax_codes = nullptr;  // nested: 8-bit codes of (absmax - offset)
  const float* nested_absmax = nullptr;   // nested: float32 absmax per 256 codes
  const float* nested_code = nullptr;     // nested: 256-entry code
  const float* offset = nullptr;          // nested: device pointer to the 0-dim float32 offset
};

// output[i] = table[code of i] * scale[i / blocksize] (float32, mul.ftz), cast to output_dtype with
// round-to-nearest-even. `table`: device pointer to 16 float32 levels. `scales`: plain (absmax set) or
// double-quantized (absmax nullptr and the four nested pointers set, else cudaErrorInvalidValue); a
// nested scale is multiply_like_cuda(nested_code[absmax_codes[b]], nested_absmax[b / 256]) + *offset
// with a separate (unfused) float32 add, bit-identical to computing it so on the CPU and passing it to
// cpu::dequantize_4bit.
cudaError_t dequantize_4bit(const uint8_t* packed, BlockScales scales, const float* table, int64_t n,
                            int64_t blocksize, DType output_dtype, void* output, cudaStream_t stream);

// out[m, j] = sum_k A[m, k] * W[j, k] (+ bias[j]), W = dequantized [N, K] 4-bit weight (row-major
// codes as written by quantize_4bit), accumulated in float32. A is [M, K] with row stride lda
// (elements), out is [M, N] contiguous, same dtype as A. `table`: device pointer to 16 levels.
cudaError_t gemm_4bit(const void* A, DType dtype, int64_t M, int64_t K, int64_t lda, const uint8_t* packed,
                      BlockScales scales, const float* table, int64_t N, int64_t blocksize, const void* bias,
                      void* out, cudaStream_t stream);

// Whether `rows` (2 or 3) rows of 16-bit A in one launch of gemm_4bit take the FFMA kernel rather than the
// table kernel (the dispatch reads it, and the GoogleTest that replays the dispatch): the table kernel's
// persistent grid and table cost about 5.5 us on an H100 whatever the size, the FFMA kernel's time grows with
// the rows of A. Measured (bf16, NF4, blocksize 64, FFMA vs table): M = 2 on 1024x4096 3.4 vs 5.7 us,
// 4096x4096 8.3 vs 8.4, 14336x4096 23.6 vs 21.4, 128256x4096 182 vs 168; M = 3 on 1024x4096 4.6 vs 6.6 (table
// before its levels were rounded to A's type), 4096x4096 11.7 vs 9.5 (same).
inline constexpr bool gemm_4bit_ffma_rows(int64_t rows, int64_t weight_elements) {
  return (rows == 2 && weight_elements <= (int64_t{1} << 24)) ||
         (rows == 3 && weight_elements <= (int64_t{1} << 23));
}

// gemm_4bit for larger M on tensor cores (gemm_4bit_prefill.cu): same contract as gemm_4bit for the
// arguments gemm_4bit_prefill_supported accepts (16-bit A with 16-byte aligned rows, K % 64 == 0,
// N % 8 == 0, blocksize >= 64, `packed` 16-byte aligned, nested absmax codes (nullptr when plain) 4-byte
// aligned). gemm_4bit_prefill_plan picks the tile
// height and the split of K for the current device; a plan with splits > 1 needs a float32 workspace
// of workspace_floats elements on the same stream.
struct PrefillPlan {
  bool wgmma = false;        // the sm_90a kernel (wgmma) instead of the mma.sync one
  int rows_per_block = 0;    // rows of A per thread block: 16, 32, 64 or 128
  int splits = 1;            // thread blocks along K; their float32 partial sums are added in order
  int stages_per_split = 0;  // 64-element steps of K per split
  int64_t workspace_floats = 0;
};
// Sets a plan's split of K: `splits` (>= 1) requested splits of `k_stages` stages become splits of equal
// length (the last may be shorter; none is empty), with the float32 workspace an [M, N] output then needs.
inline void set_prefill_splits(PrefillPlan& plan, int64_t k_stages, int64_t splits, int64_t M, int64_t N) {
  const int64_t per = (k_stages + splits - 1) / splits;
  plan.stages_per_split = static_cast<int>(per);
  plan.splits = static_cast<int>((k_stages + per - 1) / per);
  plan.workspace_floats = plan.splits > 1 ? plan.splits * M * N : 0;
}
bool gemm_4bit_prefill_supported(DType dtype, int64_t M, int64_t N, int64_t K, int64_t lda, const void* A,
                                 const uint8_t* packed, int64_t blocksize, const uint8_t* absmax_codes);
// Whether the wgmma kernel runs here: built for sm_90a and the current device is compute capability 9.0.
bool gemm_4bit_prefill_has_wgmma();
// `wgmma`: use the sm_90a kernel where gemm_4bit_prefill_has_wgmma() (else the mma.sync one, sm_80+).
cudaError_t gemm_4bit_prefill_plan(int64_t M, int64_t N, int64_t K, bool wgmma, PrefillPlan* plan);
cudaError_t gemm_4bit_prefill(const void* A, DType dtype, int64_t M, int64_t K, int64_t lda,
                              const uint8_t* packed, BlockScales scales, const float* table, int64_t N,
                              int64_t blocksize, const void* bias, void* out, const PrefillPlan& plan,
                              float* workspace, cudaStream_t stream);

// The sm_90a warp-specialized kernel for the same product (gemm_4bit_prefill_tma.cu): TMA copies, wgmma with
// the weight fragment from registers. Supported where gemm_4bit_prefill_supported holds, the build has 90a,
// the device is compute capability 9.0 and the driver encodes TMA maps. Its plan: rows_per_block (rows of A
// per block) 64, 128 or 256, `wgmma` set; the same split-K workspace contract.
bool gemm_4bit_prefill_tma_supported(DType dtype, int64_t M, int64_t N, int64_t K, int64_t lda, const void* A,
                                     const uint8_t* packed, int64_t blocksize, const uint8_t* absmax_codes);
cudaError_t gemm_4bit_prefill_tma_plan(int64_t M, int64_t N, int64_t K, PrefillPlan* plan);
cudaError_t gemm_4bit_prefill_tma(const void* A, DType dtype, int64_t M, int64_t K, int64_t lda,
                                  const uint8_t* packed, BlockScales scales, const float* table, int64_t N,
                                  int64_t blocksize, const void* bias, void* out, const PrefillPlan& plan,
                                  float* workspace, cudaStream_t stream);

}  // namespace halfbyte::cuda
