"""The bitsandbytes-shaped functions of the INT8 tier (LLM.int8-style row-wise int8 quantization).

Signatures and defaults follow ``bitsandbytes.functional`` 0.50 (``int8_vectorwise_quant``,
``int8_vectorwise_dequant``, ``int8_linear_matmul``, ``int8_mm_dequant``, ``int8_double_quant``); everything runs
through ``torch.ops.halfbyte.int8_*`` (CPU and CUDA kernels, python/halfbyte/reference_int8.py states them).
Unlike bitsandbytes, every float dtype is accepted where it wants float16 (the absmax is taken in the input's
own dtype). ``int8_linear`` is halfbyte's one-op forward of Linear8bitLt. Bad arguments raise ``TypeError`` /
``ValueError`` naming the argument.
"""

from __future__ import annotations

import torch

from . import _ops  # noqa: F401  (fake kernels + autograd)
from .reference_int8 import threshold_in_dtype

__all__ = [
    "int8_vectorwise_quant", "int8_vectorwise_dequant", "int8_linear_matmul", "int8_mm_dequant",
    "int8_double_quant", "int8_linear",
]  # fmt: skip


def _check_tensor(name: str, value) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


def _check_threshold(fn: str, threshold) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"{fn}: threshold must be a number, got {type(threshold).__name__}")
    return float(threshold)


def int8_vectorwise_quant(A: torch.Tensor, threshold: float = 0.0):
    """Row-wise absmax int8 quantization of A [..., K] (rows = the leading dimensions).

    Returns (codes int8 like A, row_stats float32 [rows], outlier_cols). With threshold > 0, values with
    ``|A| >= threshold`` are left out of their row's absmax and their columns are zeroed in every row;
    outlier_cols lists those columns (int64, ascending, empty when there are none). threshold == 0: None."""
    _check_tensor("int8_vectorwise_quant: A", A)
    return torch.ops.halfbyte.int8_vectorwise_quant(A, _check_threshold("int8_vectorwise_quant", threshold))


def int8_vectorwise_dequant(A: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    """int8 codes back to float32: A * stats[row] * (1/127)."""
    _check_tensor("int8_vectorwise_dequant: A", A)
    _check_tensor("int8_vectorwise_dequant: stats", stats)
    return torch.ops.halfbyte.int8_vectorwise_dequant(A, stats)


def int8_linear_matmul(
    A: torch.Tensor, B: torch.Tensor, out: torch.Tensor | None = None, dtype: torch.dtype = torch.int32
) -> torch.Tensor:
    """A [..., K] @ B [N, K]^T for int8 A and B, exact in int32 (cuBLASLt int8 tensor cores on CUDA)."""
    _check_tensor("int8_linear_matmul: A", A)
    _check_tensor("int8_linear_matmul: B", B)
    if dtype != torch.int32:
        raise TypeError(f"int8_linear_matmul: dtype must be torch.int32, got {dtype}")
    if out is not None:
        torch.ops.halfbyte.int8_linear_matmul.out(A, B, out)
        return out
    return torch.ops.halfbyte.int8_linear_matmul(A, B)


def int8_mm_dequant(
    A: torch.Tensor,
    row_stats: torch.Tensor,
    col_stats: torch.Tensor,
    out: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The int32 result of int8_linear_matmul back to float16: A * row_stats * col_stats / 127^2 + bias."""
    _check_tensor("int8_mm_dequant: A", A)
    result = torch.ops.halfbyte.int8_mm_dequant(A, row_stats, col_stats, dtype=torch.float16, bias=bias)
    if out is not None:
        return out.copy_(result)
    return result


def int8_double_quant(
    A: torch.Tensor,
    col_stats: torch.Tensor | None = None,
    row_stats: torch.Tensor | None = None,
    out_col: torch.Tensor | None = None,
    out_row: torch.Tensor | None = None,
    threshold: float = 0.0,
):
    """Row-wise and column-wise int8 quantization of A [..., K].

    Returns (out_row, out_col, row_stats, col_stats, outlier_cols): the row part is int8_vectorwise_quant(A,
    threshold); the column part quantizes each column of A (outliers, ``|A| >= threshold``, set to 0 first) with
    the same rule, col_stats holding one absmax per column. bitsandbytes computes its column codes in A's dtype
    (float16); here they use the row rule in float32, so a code may differ by one where x * 127 / absmax is
    within float16 rounding of a half-integer. The pre-allocated outputs are not supported (as in bitsandbytes)."""
    for name, value in (("col_stats", col_stats), ("row_stats", row_stats), ("out_col", out_col), ("out_row", out_row)):
        if value is not None:
            raise ValueError(f"int8_double_quant: {name} must be None (pre-allocated outputs are not supported)")
    threshold = _check_threshold("int8_double_quant", threshold)
    quant_row, stats_row, outlier_cols = int8_vectorwise_quant(A, threshold)
    A2 = A.reshape(-1, A.shape[-1])
    if threshold > 0.0:
        A2 = A2.masked_fill(A2.abs().float() >= threshold_in_dtype(threshold, A.dtype), 0.0)
    quant_col_t, stats_col, _ = int8_vectorwise_quant(A2.t().contiguous())
    quant_col = quant_col_t.t().contiguous().reshape(A.shape)
    return quant_row, quant_col, stats_row, stats_col, outlier_cols


def int8_linear(
    A: torch.Tensor,
    CB: torch.Tensor,
    SCB: torch.Tensor,
    bias: torch.Tensor | None = None,
    threshold: float = 0.0,
) -> torch.Tensor:
    """``A @ (CB * SCB / 127).T + bias`` in A's dtype for an int8 weight CB [N, K] with row absmax SCB [N].

    Up to 16 rows of A: weight only (A is not quantized, float32 accumulation). More rows: LLM.int8 (A quantized
    row-wise, int8 tensor-core matmul; with threshold > 0 the outlier columns of A go through A's dtype).
    Differentiable in A and bias."""
    _check_tensor("int8_linear: A", A)
    _check_tensor("int8_linear: CB", CB)
    _check_tensor("int8_linear: SCB", SCB)
    threshold = _check_threshold("int8_linear", threshold)
    return torch.ops.halfbyte.int8_linear(A, CB, SCB, bias, threshold)
