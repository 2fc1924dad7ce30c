// CUDA kernels of the INT8 tier: row-wise int8 quantization (int8_vectorwise_quant) and the
// dequantization of an int32 matmul result (int8_mm_dequant). Element rules: int8_kernels.h, the same
// functions as the CPU kernels (csrc/cpu/int8_rowwise.cpp), so the results are bit-identical.
//
// int8_vectorwise_quant_kernel: one thread block (256 threads) per row, grid-stride over rows. Pass 1
// reads the row (8 elements per thread and step: one 16-byte load for float16/bfloat16, two for float32,
// when the row is 16-byte aligned and cols % 8 == 0; element loads otherwise) and folds |x| into the
// row's absmax with int8_absmax_step (NaN sticks), skipping outliers (|x| >= threshold) when a threshold
// is set; warp shuffles then shared memory reduce it. Pass 2 reads the row again (from L1/L2: a row is at
// most a few tens of KB) and writes int8_code(x, int8_row_scale(absmax)), 8 codes per 8-byte store, or 0
// for an outlier, whose column byte is set to 1 (plain stores of the same value from any thread).
// Layout: input [rows, cols] with row stride lda elements, codes [rows, cols] contiguous, row_stats[rows].
//
// int8_mm_dequant_kernel: grid-stride over the [rows, cols] int32 matrix, 4 elements per thread and step
// (one 16-byte load, 8- or 16-byte store) when cols % 4 == 0 and the pointers allow it, one otherwise;
// each element is int8_mm_dequant_value(acc, row_stats[r], col_stats[c], bias[c]) cast with
// round-to-nearest-even.
//
// Limits: 64-bit indices; grids capped at 2^30 blocks (the loops cover the rest).
// Bottleneck: both are memory-bound. quantize reads its input once from DRAM (the second pass hits the
// caches) and writes 1 byte per element; mm_dequant reads 4 and writes 2 (or 4) bytes per element.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "halfbyte/int8_cuda_kernels.h"
#include "int8_output_elements.cuh"

namespace halfbyte::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kMaxGrid = int64_t{1} << 30;
constexpr unsigned kFullMask = 0xffffffffu;

bool is_aligned(const void* p, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

unsigned grid_for(int64_t items, int64_t per_block) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min((items + per_block - 1) / per_block, kMaxGrid)));
}

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// 8 consecutive elements from a 16-byte-aligned address as float32.
__device__ __forceinline__ void load8(const float* p, float (&v)[8]) {
  const float4 a = __ldg(reinterpret_cast<const float4*>(p));
  const float4 b = __ldg(reinterpret_cast<const float4*>(p) + 1);
  v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}

template <typename T>
__device__ __forceinline__ void load8(const T* p, float (&v)[8]) {
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
  const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint16_t lo = static_cast<uint16_t>(words[i] & 0xffffu);
    const uint16_t hi = static_cast<uint16_t>(words[i] >> 16);
    if constexpr (std::is_same_v<T, __half>) {
      v[2 * i] = __half2float(__ushort_as_half(lo));
      v[2 * i + 1] = __half2float(__ushort_as_half(hi));
    } else {
      v[2 * i] = __uint_as_float(static_cast<uint32_t>(lo) << 16);
      v[2 * i + 1] = __uint_as_float(static_cast<uint32_t>(hi) << 16);
    }
  }
}

__device__ __forceinline__ float absmax_of_block(float m, float* shared) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1)
    m = int8_absmax_step(m, __shfl_xor_sync(kFullMask, m, offset));
  const int warp = threadIdx.x >> 5;
  if ((threadIdx.x & 31) == 0) shared[warp] = m;
  __syncthreads();
  float total = shared[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) total = int8_absmax_step(total, shared[w]);
  return total;
}

template <typename T, bool kVector>
__global__ void __launch_bounds__(kThreads)
    int8_vectorwise_quant_kernel(const T* __restrict__ input, int64_t rows, int64_t cols, int64_t lda,
                                 bool has_threshold, float threshold, int8_t* __restrict__ codes,
                                 float* __restrict__ row_stats, uint8_t* __restrict__ outlier_columns) {
  __shared__ float warp_absmax[kWarps];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* row = input + r * lda;
    int8_t* out = codes + r * cols;
    float m = 0.0f;
    if constexpr (kVector) {
      for (int64_t c = 8 * static_cast<int64_t>(threadIdx.x); c < cols; c += 8 * kThreads) {
        float v[8];
        load8(row + c, v);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const float magnitude = fabsf(v[i]);
          if (!(has_threshold && magnitude >= threshold)) m = int8_absmax_step(m, magnitude);
        }
      }
    } else {
      for (int64_t c = threadIdx.x; c < cols; c += kThreads) {
        const float magnitude = fabsf(to_float(row[c]));
        if (!(has_threshold && magnitude >= threshold)) m = int8_absmax_step(m, magnitude);
      }
    }
    const float absmax = absmax_of_block(m, warp_absmax);
    if (threadIdx.x == 0) row_stats[r] = absmax;
    const float scale = int8_row_scale(absmax);
    if constexpr (kVector) {
      for (int64_t c = 8 * static_cast<int64_t>(threadIdx.x); c < cols; c += 8 * kThreads) {
        float v[8];
        load8(row + c, v);
        uint32_t word[2] = {0u, 0u};
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          int8_t code = 0;
          if (has_threshold && fabsf(v[i]) >= threshold) {
            outlier_columns[c + i] = 1;
          } else {
            code = int8_code(v[i], scale);
          }
          word[i / 4] |= static_cast<uint32_t>(static_cast<uint8_t>(code)) << (8 * (i % 4));
        }
        *reinterpret_cast<uint2*>(out + c) = make_uint2(word[0], word[1]);
      }
    } else {
      for (int64_t c = threadIdx.x; c < cols; c += kThreads) {
        const float x = to_float(row[c]);
        if (has_threshold && fabsf(x) >= threshold) {
          out[c] = 0;
          outlier_columns[c] = 1;
        } else {
          out[c] = int8_code(x, scale);
        }
      }
    }
    __syncthreads();  // warp_absmax is written again for the next row
  }
}

using int8_output::bias_at;
using int8_output::bits16;

__device__ __forceinline__ void store1(float* out, int64_t i, float v) { out[i] = v; }

template <typename Out>
__device__ __forceinline__ void store1(Out* out, int64_t i, float v) {
  reinterpret_cast<unsigned short*>(out)[i] = bits16(Out(), v);
}

__device__ __forceinline__ void store4(float* out, int64_t i, const float (&v)[4]) {
  *reinterpret_cast<float4*>(out + i) = make_float4(v[0], v[1], v[2], v[3]);
}

template <typename Out>
__device__ __forceinline__ void store4(Out* out, int64_t i, const float (&v)[4]) {
  const uint32_t w0 =
      static_cast<uint32_t>(bits16(Out(), v[0])) | (static_cast<uint32_t>(bits16(Out(), v[1])) << 16);
  const uint32_t w1 =
      static_cast<uint32_t>(bits16(Out(), v[2])) | (static_cast<uint32_t>(bits16(Out(), v[3])) << 16);
  *reinterpret_cast<uint2*>(out + i) = make_uint2(w0, w1);
}

template <typename Out, bool kVector>
__global__ void __launch_bounds__(kThreads)
    int8_mm_dequant_kernel(const int32_t* __restrict__ A, int64_t rows, int64_t cols,
                           const float* __restrict__ row_stats, const float* __restrict__ col_stats,
                           const void* __restrict__ bias, DType bias_dtype, Out* __restrict__ out) {
  const int64_t n = rows * cols;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  if constexpr (kVector) {
    for (int64_t i = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * 4; i < n;
         i += 4 * stride) {
      const int64_t r = i / cols;
      const int64_t c = i - r * cols;  // cols % 4 == 0: the 4 elements share row r
      const int4 acc = __ldcs(reinterpret_cast<const int4*>(A + i));
      const float row_stat = __ldg(row_stats + r);
      const int32_t a[4] = {acc.x, acc.y, acc.z, acc.w};
      float v[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        v[j] =
            int8_mm_dequant_value(a[j], row_stat, __ldg(col_stats + c + j), bias_at(bias, bias_dtype, c + j));
      }
      store4(out, i, v);
    }
  } else {
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n; i += stride) {
      const int64_t r = i / cols;
      const int64_t c = i - r * cols;
      store1(out, i,
             int8_mm_dequant_value(A[i], __ldg(row_stats + r), __ldg(col_stats + c),
                                   bias_at(bias, bias_dtype, c)));
    }
  }
}

template <typename T>
cudaError_t launch_quant(const void* input, int64_t rows, int64_t cols, int64_t lda, bool has_threshold,
                         float threshold, int8_t* codes, float* row_stats, uint8_t* outlier_columns,
                         cudaStream_t stream) {
  const T* typed = static_cast<const T*>(input);
  const bool vector = cols % 8 == 0 && lda % 8 == 0 && is_aligned(input, 16) && is_aligned(codes, 8);
  const unsigned grid = grid_for(rows, 1);
  if (vector) {
    int8_vectorwise_quant_kernel<T, true><<<grid, kThreads, 0, stream>>>(
        typed, rows, cols, lda, has_threshold, threshold, codes, row_stats, outlier_columns);
  } else {
    int8_vectorwise_quant_kernel<T, false><<<grid, kThreads, 0, stream>>>(
        typed, rows, cols, lda, has_threshold, threshold, codes, row_stats, outlier_columns);
  }
  return cudaGetLastError();
}

template <typename Out>
cudaError_t launch_mm_dequant(const int32_t* A, int64_t rows, int64_t cols, const float* row_stats,
                              const float* col_stats, const void* bias, DType bias_dtype, void* out,
                              cudaStream_t stream) {
  Out* typed = static_cast<Out*>(out);
  const bool vector = cols % 4 == 0 && is_aligned(A, 16) && is_aligned(out, 4 * sizeof(Out));
  if (vector) {
    int8_mm_dequant_kernel<Out, true><<<grid_for(rows * cols, 4 * kThreads), kThreads, 0, stream>>>(
        A, rows, cols, row_stats, col_stats, bias, bias_dtype, typed);
  } else {
    int8_mm_dequant_kernel<Out, false><<<grid_for(rows * cols, kThreads), kThreads, 0, stream>>>(
        A, rows, cols, row_stats, col_stats, bias, bias_dtype, typed);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t int8_vectorwise_quant(const void* input, DType input_dtype, int64_t rows, int64_t cols,
                                  int64_t lda, bool has_threshold, float threshold, int8_t* codes,
                                  float* row_stats, uint8_t* outlier_columns, cudaStream_t stream) {
  if (rows < 0 || cols < 0 || lda < cols || (has_threshold && outlier_columns == nullptr)) {
    return cudaErrorInvalidValue;
  }
  if (rows == 0) return cudaSuccess;
  switch (input_dtype) {
    case DType::kFloat32:
      return launch_quant<float>(input, rows, cols, lda, has_threshold, threshold, codes, row_stats,
                                 outlier_columns, stream);
    case DType::kFloat16:
      return launch_quant<__half>(input, rows, cols, lda, has_threshold, threshold, codes, row_stats,
                                  outlier_columns, stream);
    case DType::kBFloat16:
      return launch_quant<__nv_bfloat16>(input, rows, cols, lda, has_threshold, threshold, codes, row_stats,
                                         outlier_columns, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t int8_mm_dequant(const int32_t* A, int64_t rows, int64_t cols, const float* row_stats,
                            const float* col_stats, const void* bias, DType bias_dtype, DType out_dtype,
                            void* out, cudaStream_t stream) {
  if (rows < 0 || cols < 0) return cudaErrorInvalidValue;
  if (rows == 0 || cols == 0) return cudaSuccess;
  switch (out_dtype) {
    case DType::kFloat32:
      return launch_mm_dequant<float>(A, rows, cols, row_stats, col_stats, bias, bias_dtype, out, stream);
    case DType::kFloat16:
      return launch_mm_dequant<__half>(A, rows, cols, row_stats, col_stats, bias, bias_dtype, out, stream);
    case DType::kBFloat16:
      return launch_mm_dequant<__nv_bfloat16>(A, rows, cols, row_stats, col_stats, bias, bias_dtype, out,
                                              stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace halfbyte::cuda
