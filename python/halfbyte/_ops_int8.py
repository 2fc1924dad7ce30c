"""Fake (meta) kernels and autograd of the INT8 ops (csrc/torch/registration_int8.cpp).

The fake kernels give torch.compile / FakeTensor the output shapes and run the same argument checks as the C++
implementations. int8_vectorwise_quant with a threshold returns a data-dependent number of outlier columns (an
unbacked size, as bitsandbytes' fake kernel does). int8_linear carries its own autograd: the gradient of A goes
through the dequantized weight (as bitsandbytes' MatMul8bitLt), the bias gets the sum of the output gradient,
the int8 weight gets none.
"""

from __future__ import annotations

import math

import torch

from . import _C  # noqa: F401  (loads the library that defines the schemas)

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
register_fake = torch.library.register_fake


def _check_float(op: str, name: str, dtype: torch.dtype) -> None:
    torch._check_type(dtype in _FLOATS, lambda: f"{op}: {name} must be float16, bfloat16 or float32, got {dtype}")


def _check_dtype(op: str, name: str, t: torch.Tensor, dtype: torch.dtype) -> None:
    torch._check_type(t.dtype == dtype, lambda: f"{op}: {name} must be {dtype}, got {t.dtype}")


def _check_has_last_dim(op: str, name: str, t: torch.Tensor) -> None:
    torch._check_value(t.dim() >= 1, lambda: f"{op}: {name} must have at least one dimension, got a 0-dim tensor")


def _rows(t: torch.Tensor) -> int:
    return math.prod(t.shape[:-1])


def _check_stats(op: str, name: str, stats: torch.Tensor, count, what: str) -> None:
    _check_dtype(op, name, stats, torch.float32)
    torch._check_value(
        stats.numel() == count, lambda: f"{op}: {name} must have {count} entries (one per {what}), got {stats.numel()}"
    )


def _check_weight(op: str, name: str, B: torch.Tensor, A: torch.Tensor) -> None:
    _check_dtype(op, name, B, torch.int8)
    torch._check_value(B.dim() == 2, lambda: f"{op}: {name} must be 2-D [N, K], got shape {list(B.shape)}")
    torch._check_value(
        A.shape[-1] == B.shape[1],
        lambda: f"{op}: A's last dimension ({A.shape[-1]}) must equal K = {name}.shape[1] ({B.shape[1]})",
    )


def _check_threshold(op: str, threshold: float) -> None:
    torch._check_value(
        math.isfinite(threshold) and threshold >= 0.0,
        lambda: f"{op}: threshold must be a finite number >= 0 (0 disables outliers), got {threshold}",
    )


@register_fake("halfbyte::int8_vectorwise_quant")
def _(A: torch.Tensor, threshold: float = 0.0):
    op = "halfbyte::int8_vectorwise_quant"
    _check_float(op, "A", A.dtype)
    _check_has_last_dim(op, "A", A)
    _check_threshold(op, threshold)
    codes = A.new_empty(A.shape, dtype=torch.int8)
    row_stats = A.new_empty((_rows(A),), dtype=torch.float32)
    if threshold == 0.0:
        return codes, row_stats, None
    count = torch.library.get_ctx().new_dynamic_size()
    return codes, row_stats, A.new_empty((count,), dtype=torch.int64)


@register_fake("halfbyte::int8_vectorwise_dequant")
def _(A: torch.Tensor, stats: torch.Tensor):
    op = "halfbyte::int8_vectorwise_dequant"
    _check_dtype(op, "A", A, torch.int8)
    _check_has_last_dim(op, "A", A)
    _check_stats(op, "stats", stats, _rows(A), "row of A")
    return A.new_empty(A.shape, dtype=torch.float32)


def _matmul_checks(op: str, A: torch.Tensor, B: torch.Tensor) -> tuple[int, ...]:
    _check_dtype(op, "A", A, torch.int8)
    _check_has_last_dim(op, "A", A)
    _check_weight(op, "B", B, A)
    return (*A.shape[:-1], B.shape[0])


@register_fake("halfbyte::int8_linear_matmul")
def _(A: torch.Tensor, B: torch.Tensor):
    return A.new_empty(_matmul_checks("halfbyte::int8_linear_matmul", A, B), dtype=torch.int32)


@register_fake("halfbyte::int8_linear_matmul.out")
def _(A: torch.Tensor, B: torch.Tensor, out: torch.Tensor):
    op = "halfbyte::int8_linear_matmul.out"
    shape = _matmul_checks(op, A, B)
    _check_dtype(op, "out", out, torch.int32)
    torch._check_value(
        tuple(out.shape) == shape, lambda: f"{op}: out must have shape {list(shape)}, got {list(out.shape)}"
    )


def _mm_dequant_checks(op, A, row_stats, col_stats, dtype, bias) -> torch.dtype:
    _check_dtype(op, "A", A, torch.int32)
    _check_has_last_dim(op, "A", A)
    _check_stats(op, "row_stats", row_stats, _rows(A), "row of A")
    _check_stats(op, "col_stats", col_stats, A.shape[-1], "column of A")
    dtype = dtype or torch.float16
    _check_float(op, "dtype", dtype)
    if bias is not None:
        _check_float(op, "bias", bias.dtype)
        torch._check_value(
            bias.numel() == A.shape[-1],
            lambda: f"{op}: bias must have {A.shape[-1]} entries (one per column of A), got {bias.numel()}",
        )
    return dtype


@register_fake("halfbyte::int8_mm_dequant")
def _(A, row_stats, col_stats, dtype=None, bias=None):
    dtype = _mm_dequant_checks("halfbyte::int8_mm_dequant", A, row_stats, col_stats, dtype, bias)
    return A.new_empty(A.shape, dtype=dtype)


@register_fake("halfbyte::int8_scaled_mm")
def _(A, B, row_stats, col_stats, bias=None, dtype=None):
    op = "halfbyte::int8_scaled_mm"
    shape = _matmul_checks(op, A, B)
    _check_stats(op, "row_stats", row_stats, _rows(A), "row of A")
    _check_stats(op, "col_stats", col_stats, B.shape[0], "row of B")
    dtype = dtype or torch.float16
    _check_float(op, "dtype", dtype)
    return A.new_empty(shape, dtype=dtype)


@register_fake("halfbyte::int8_linear")
def _(A, CB, SCB, bias=None, threshold=0.0):
    op = "halfbyte::int8_linear"
    _check_float(op, "A", A.dtype)
    _check_has_last_dim(op, "A", A)
    _check_weight(op, "CB", CB, A)
    _check_stats(op, "SCB", SCB, CB.shape[0], "row of CB")
    _check_threshold(op, threshold)
    if bias is not None:
        torch._check_value(
            bias.dim() == 1 and bias.shape[0] == CB.shape[0], lambda: f"{op}: bias must have shape [{CB.shape[0]}]"
        )
        torch._check_type(bias.dtype == A.dtype, lambda: f"{op}: bias dtype ({bias.dtype}) must match A ({A.dtype})")
    return A.new_empty((*A.shape[:-1], CB.shape[0]))


# ---- autograd of int8_linear: d(A) = d(out) @ dequantized weight, d(bias) = sum of d(out) ----------------


def _linear_setup_context(ctx, inputs, output):
    A, CB, SCB, bias, threshold = inputs
    ctx.save_for_backward(CB, SCB)
    ctx.has_bias = bias is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _linear_backward(ctx, grad_out):
    CB, SCB = ctx.saved_tensors
    grad_A = grad_bias = None
    if ctx.needs_input_grad[0]:
        weight = torch.ops.halfbyte.int8_vectorwise_dequant(CB, SCB).to(grad_out.dtype)
        grad_A = grad_out @ weight
    if ctx.has_bias and ctx.needs_input_grad[3]:
        grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0).to(ctx.bias_dtype)
    return grad_A, None, None, grad_bias, None


torch.library.register_autograd("halfbyte::int8_linear", _linear_backward, setup_context=_linear_setup_context)
