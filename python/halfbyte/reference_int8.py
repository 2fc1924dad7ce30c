"""Pure-PyTorch statement of the INT8 ops (LLM.int8-style row-wise int8): the readable algorithm and the test
oracle. The C++ and CUDA kernels give the same bits as the exact functions here (csrc/include/halfbyte/
int8_kernels.h states the same rules); ``int8_linear`` returns the float64 value the kernels approximate.

Row-wise quantization follows bitsandbytes' CUDA kernel: scale = 127 * rcp.approx(absmax) (its __fdividef),
code = round-half-even(x * scale). A NaN makes its row's absmax NaN and the row's codes 0 (bitsandbytes'
kernel skips the NaN). The outlier threshold is compared in the input's dtype (float32 first, then rounded to
the dtype), as ``A.abs() >= threshold`` compares in torch.
"""

from __future__ import annotations

import math

import torch

from .reference import flush_subnormal, multiply_like_cuda, reciprocal_like_cuda

INT8_MATMUL_DEQUANT_SCALE = 6.200012e-05  # float32(1 / 127**2): bitsandbytes' MM_DEQUANT_CONST
INT8_INVERSE_127 = 7.874015718698502e-3  # float32(1 / 127): the factor of int8_vectorwise_dequant
WEIGHT_ONLY_MAX_ROWS = 16  # int8_linear multiplies by the weight alone (A not quantized) up to this many rows


def _f32(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32)


def threshold_in_dtype(threshold: float, dtype: torch.dtype) -> float:
    return _f32(threshold).to(dtype).float().item()


def int8_row_scale(absmax: torch.Tensor) -> torch.Tensor:
    """127 / absmax as bitsandbytes' kernel computes it: 127 * rcp.approx.ftz(absmax), mul.ftz."""
    return multiply_like_cuda(_f32(127.0).to(absmax.device), reciprocal_like_cuda(absmax))


def int8_codes(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """round-half-even(x * scale) as int8; NaN (0 * inf, or a NaN in the row) -> 0."""
    v = multiply_like_cuda(x, scale)
    return torch.where(torch.isnan(v), 0.0, v.round().clamp(-127, 127)).to(torch.int8)


def int8_vectorwise_quant(A: torch.Tensor, threshold: float = 0.0):
    """(codes int8 like A, row_stats float32 [rows], outlier_cols int64 or None); rows = leading dimensions."""
    K = A.shape[-1]
    x = A.reshape(-1, K).float()
    magnitude = x.abs()
    if threshold > 0.0:
        outlier = magnitude >= threshold_in_dtype(threshold, A.dtype)
    else:
        outlier = torch.zeros_like(magnitude, dtype=torch.bool)
    kept = torch.where(outlier, 0.0, magnitude)
    absmax = kept.amax(dim=1) if K > 0 else torch.zeros(x.shape[0], device=A.device)  # NaN propagates
    codes = int8_codes(x, int8_row_scale(absmax)[:, None])
    codes = torch.where(outlier, 0, codes)
    outlier_cols = None
    if threshold > 0.0:
        columns = outlier.any(dim=0)
        codes = torch.where(columns[None, :], 0, codes)
        outlier_cols = columns.nonzero().view(-1)
    return codes.reshape(A.shape), absmax, outlier_cols


def int8_vectorwise_dequant(A: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    """(A * stats) * float32(1/127) in float32, per row."""
    K = A.shape[-1]
    values = A.reshape(-1, K).float() * stats.reshape(-1, 1).float()
    return (values * _f32(INT8_INVERSE_127).to(A.device)).reshape(A.shape)


def int8_linear_matmul(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """A [..., K] @ B [N, K]^T in int32 (exact in int64, wrapped to int32)."""
    K = A.shape[-1]
    out = A.reshape(-1, K).long() @ B.long().T
    return out.to(torch.int32).reshape(*A.shape[:-1], B.shape[0])


def int8_mm_dequant(
    A: torch.Tensor,
    row_stats: torch.Tensor,
    col_stats: torch.Tensor,
    dtype: torch.dtype | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """fma(A * row_stat * col_stat, float32(1/127^2), bias) in float32 (ftz), cast to dtype (float16 default).

    The fma is evaluated in float64 (the product of two float32 is exact there) and rounded to float32; that
    double rounding differs from a true fma only when the float64 sum lands exactly on a float32 midpoint."""
    N = A.shape[-1]
    acc = A.reshape(-1, N).float()
    v = multiply_like_cuda(multiply_like_cuda(acc, row_stats.reshape(-1, 1).float()), col_stats.reshape(1, -1).float())
    b = flush_subnormal(bias.float()).double() if bias is not None else torch.zeros((), dtype=torch.float64)
    scale = _f32(INT8_MATMUL_DEQUANT_SCALE).double()
    result = flush_subnormal((v.double() * scale + b.to(A.device)).float())
    return result.to(dtype or torch.float16).reshape(A.shape)


def int8_scaled_mm(A, B, row_stats, col_stats, bias=None, dtype=None) -> torch.Tensor:
    return int8_mm_dequant(int8_linear_matmul(A, B), row_stats, col_stats, dtype or torch.float16, bias)


def dequantized_weight(CB: torch.Tensor, SCB: torch.Tensor) -> torch.Tensor:
    """The weight an int8 layer stands for, CB * SCB / 127, in float64."""
    return CB.double() * SCB.double()[:, None] / 127.0


def int8_linear(
    A: torch.Tensor,
    CB: torch.Tensor,
    SCB: torch.Tensor,
    bias: torch.Tensor | None = None,
    threshold: float = 0.0,
) -> torch.Tensor:
    """What int8_linear computes, in float64 (before its float32 accumulation and the cast to A's dtype).

    Rows M <= 16: A @ W^T + bias with W = CB * SCB / 127 (weight only). M > 16 (LLM.int8): A quantized row-wise
    with `threshold`, (CA @ CB^T) * SCA * SCB / 127^2 + bias, plus A[:, outliers] @ W[:, outliers]^T."""
    K = A.shape[-1]
    A2 = A.reshape(-1, K)
    M = A2.shape[0]
    if M <= WEIGHT_ONLY_MAX_ROWS:
        out = A2.double() @ dequantized_weight(CB, SCB).T
    else:
        CA, SCA, cols = int8_vectorwise_quant(A2, threshold)
        acc = int8_linear_matmul(CA, CB).double()
        out = acc * SCA.double()[:, None] * SCB.double()[None, :] / (127.0 * 127.0)
        if cols is not None and cols.numel() > 0:
            out = out + A2[:, cols].double() @ dequantized_weight(CB[:, cols], SCB).T
    if bias is not None:
        out = out + bias.double()
    return out.reshape(*A.shape[:-1], CB.shape[0])


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Frobenius-norm relative error in float64."""
    expected = expected.double()
    return ((actual.double() - expected).norm() / expected.norm().clamp_min(math.ulp(1.0))).item()
