"""Fake (meta) kernels and autograd for the torch.ops.halfbyte.* ops registered by the native library.

The fake kernels give torch.compile / FakeTensor the output shapes and run the same argument checks as
the C++ implementations, so a bad call fails the same way traced or eager. gemm_4bit carries its own
autograd (gradient for A and bias; the 4-bit weight is frozen), so it compiles without graph breaks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from . import _C  # noqa: F401  (loads the library that defines the schemas)

_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_STORAGE = (torch.uint8, torch.float16, torch.bfloat16, torch.float32)
register_fake = torch.library.register_fake


def _check_blocksize(op: str, blocksize: int) -> None:
    torch._check_value(
        blocksize in _BLOCKSIZES, lambda: f"{op}: blocksize must be a power of two from 32 to 4096, got {blocksize}"
    )


def _check_quant_type(op: str, quant_type: str) -> None:
    torch._check_value(
        quant_type in ("nf4", "fp4"), lambda: f"{op}: quant_type must be 'nf4' or 'fp4', got '{quant_type}'"
    )


def _check_float(op: str, name: str, dtype: torch.dtype) -> None:
    torch._check_type(dtype in _FLOATS, lambda: f"{op}: {name} must be float16, bfloat16 or float32, got {dtype}")


def _blocks(n: int, blocksize: int) -> int:
    return -(n // -blocksize)


def _packed_elements(n: int, itemsize: int) -> int:
    return -(((n + 1) // 2) // -itemsize)


def _check_packed(op: str, name: str, packed: torch.Tensor, n: int) -> None:
    expected = _packed_elements(n, packed.element_size())
    torch._check_value(
        packed.numel() == expected,
        lambda: (
            f"{op}: {name} holds {packed.numel()} elements of {packed.dtype} but {n} 4-bit codes need "
            f"{expected} (size does not match shape)"
        ),
    )


def _check_absmax(op: str, absmax: torch.Tensor, blocks: int, name: str = "absmax") -> None:
    torch._check_type(absmax.dtype == torch.float32, lambda: f"{op}: {name} must be float32, got {absmax.dtype}")
    torch._check_value(
        absmax.numel() == blocks,
        lambda: f"{op}: {name} must have {blocks} entries (one per block), got {absmax.numel()}",
    )


@register_fake("halfbyte::quantize_4bit")
def _(A: torch.Tensor, blocksize: int, quant_type: str, quant_storage: torch.dtype):
    op = "halfbyte::quantize_4bit"
    _check_float(op, "A", A.dtype)
    _check_blocksize(op, blocksize)
    _check_quant_type(op, quant_type)
    torch._check_value(
        quant_storage in _STORAGE,
        lambda: f"{op}: quant_storage must be uint8, float16, bfloat16 or float32, got {quant_storage}",
    )
    n = A.numel()
    itemsize = torch.empty((), dtype=quant_storage).element_size()
    packed = A.new_empty((_packed_elements(n, itemsize), 1), dtype=quant_storage)
    return packed, A.new_empty((_blocks(n, blocksize),), dtype=torch.float32)


def _check_scales(op, absmax, blocks, absmax_8bit, absmax_code, absmax_offset) -> None:
    """Plain float32 absmax (one per block), or double-quantized: uint8 codes per block + absmax per 256."""
    if absmax_8bit is None:
        _check_absmax(op, absmax, blocks)
        return
    torch._check_value(
        absmax_8bit.dtype == torch.uint8 and absmax_8bit.numel() == blocks,
        lambda: f"{op}: absmax_8bit must be uint8 with one entry per block ({blocks})",
    )
    _check_absmax(op, absmax, _blocks(blocks, 256), "absmax (nested, one per 256 blocks)")
    torch._check_value(absmax_code is not None, lambda: f"{op}: absmax_code is required when absmax_8bit is given")
    torch._check_value(absmax_offset is not None, lambda: f"{op}: absmax_offset is required when absmax_8bit is given")


def _dequantize_4bit_checks(A, absmax, blocksize, quant_type, shape, dtype, absmax_8bit, absmax_code, absmax_offset):
    op = "halfbyte::dequantize_4bit"
    _check_blocksize(op, blocksize)
    _check_quant_type(op, quant_type)
    _check_float(op, "dtype", dtype)
    n = math.prod(shape)
    _check_packed(op, "A", A, n)
    _check_scales(op, absmax, _blocks(n, blocksize), absmax_8bit, absmax_code, absmax_offset)


@register_fake("halfbyte::dequantize_4bit")
def _(A, absmax, blocksize, quant_type, shape, dtype, absmax_8bit=None, absmax_code=None, absmax_offset=None):
    _dequantize_4bit_checks(A, absmax, blocksize, quant_type, shape, dtype, absmax_8bit, absmax_code, absmax_offset)
    return A.new_empty(shape, dtype=dtype)


@register_fake("halfbyte::dequantize_4bit.out")
def _(A, absmax, blocksize, quant_type, shape, dtype, out, absmax_8bit=None, absmax_code=None, absmax_offset=None):
    _dequantize_4bit_checks(A, absmax, blocksize, quant_type, shape, dtype, absmax_8bit, absmax_code, absmax_offset)
    torch._check_value(tuple(out.shape) == tuple(shape), lambda: f"out must have shape {list(shape)}")
    torch._check_type(out.dtype == dtype, lambda: f"out must have dtype {dtype}, got {out.dtype}")


@register_fake("halfbyte::quantize_blockwise")
def _(A: torch.Tensor, code: torch.Tensor, blocksize: int):
    op = "halfbyte::quantize_blockwise"
    _check_float(op, "A", A.dtype)
    _check_blocksize(op, blocksize)
    torch._check_value(code.numel() == 256, lambda: f"{op}: code must have 256 entries, got {code.numel()}")
    return A.new_empty(A.shape, dtype=torch.uint8), A.new_empty((_blocks(A.numel(), blocksize),), dtype=torch.float32)


def _dequantize_blockwise_checks(A, absmax, code, blocksize, dtype) -> None:
    op = "halfbyte::dequantize_blockwise"
    torch._check_type(A.dtype == torch.uint8, lambda: f"{op}: A must be uint8 codes, got {A.dtype}")
    _check_blocksize(op, blocksize)
    _check_float(op, "dtype", dtype)
    _check_absmax(op, absmax, _blocks(A.numel(), blocksize))


@register_fake("halfbyte::dequantize_blockwise")
def _(A, absmax, code, blocksize: int, dtype: torch.dtype):
    _dequantize_blockwise_checks(A, absmax, code, blocksize, dtype)
    return A.new_empty(A.shape, dtype=dtype)


@register_fake("halfbyte::dequantize_blockwise.out")
def _(A, absmax, code, blocksize: int, dtype: torch.dtype, out: torch.Tensor):
    _dequantize_blockwise_checks(A, absmax, code, blocksize, dtype)
    torch._check_value(out.shape == A.shape, lambda: f"out must have shape {list(A.shape)}")


def _gemm_checks(op: str, A: torch.Tensor, B: torch.Tensor, shapeB: Sequence[int], blocksize: int) -> None:
    _check_float(op, "A", A.dtype)
    _check_blocksize(op, blocksize)
    torch._check_value(len(shapeB) == 2, lambda: f"{op}: shapeB must be [N, K], got {list(shapeB)}")
    torch._check_value(
        A.dim() >= 1 and A.shape[-1] == shapeB[1],
        lambda: f"{op}: A's last dimension must equal K = shapeB[1] ({shapeB[1]}), got {list(A.shape)}",
    )
    _check_packed(op, "B", B, shapeB[0] * shapeB[1])


@register_fake("halfbyte::gemm_4bit")
def _(A, B, shapeB, absmax, blocksize, quant_type, bias=None, absmax_8bit=None, absmax_code=None, absmax_offset=None):
    op = "halfbyte::gemm_4bit"
    _gemm_checks(op, A, B, shapeB, blocksize)
    _check_quant_type(op, quant_type)
    _check_scales(op, absmax, _blocks(shapeB[0] * shapeB[1], blocksize), absmax_8bit, absmax_code, absmax_offset)
    if bias is not None:
        torch._check_value(
            bias.dim() == 1 and bias.shape[0] == shapeB[0], lambda: f"{op}: bias must have shape [{shapeB[0]}]"
        )
        torch._check_type(bias.dtype == A.dtype, lambda: f"{op}: bias dtype must match A ({A.dtype})")
    return A.new_empty((*A.shape[:-1], shapeB[0]))


@register_fake("halfbyte::gemv_4bit")
def _(A, B, shapeB, absmax, code, blocksize):
    op = "halfbyte::gemv_4bit"
    _gemm_checks(op, A, B, shapeB, blocksize)
    _check_absmax(op, absmax, _blocks(shapeB[0] * shapeB[1], blocksize))
    return A.new_empty((*A.shape[:-1], shapeB[0]))


@register_fake("halfbyte::gemv_4bit.out")
def _(A, B, shapeB, absmax, code, blocksize, out):
    op = "halfbyte::gemv_4bit"
    _gemm_checks(op, A, B, shapeB, blocksize)
    torch._check_value(
        tuple(out.shape) == (*A.shape[:-1], shapeB[0]),
        lambda: f"{op}: out must have shape {[*A.shape[:-1], shapeB[0]]}",
    )


# ---- autograd of gemm_4bit: d(A) = d(out) @ W, d(bias) = sum of d(out); the weight is frozen ------------


def dequantized_weight(B, shapeB, absmax, blocksize, quant_type, absmax_8bit, absmax_code, absmax_offset, dtype):
    """The [N, K] weight of a gemm_4bit call, dequantized to `dtype` (double-quantized scales read directly)."""
    return torch.ops.halfbyte.dequantize_4bit(
        B, absmax, blocksize, quant_type, list(shapeB), dtype, absmax_8bit, absmax_code, absmax_offset
    )


def _gemm_setup_context(ctx, inputs, output):
    A, B, shapeB, absmax, blocksize, quant_type, bias, absmax_8bit, absmax_code, absmax_offset = inputs
    ctx.save_for_backward(B, absmax, absmax_8bit, absmax_code, absmax_offset)
    ctx.shapeB, ctx.blocksize, ctx.quant_type = list(shapeB), blocksize, quant_type
    ctx.has_bias = bias is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _gemm_backward(ctx, grad_out):
    B, absmax, absmax_8bit, absmax_code, absmax_offset = ctx.saved_tensors
    grad_A = grad_bias = None
    if ctx.needs_input_grad[0]:
        weight = dequantized_weight(
            B, ctx.shapeB, absmax, ctx.blocksize, ctx.quant_type, absmax_8bit, absmax_code, absmax_offset,
            grad_out.dtype,
        )  # fmt: skip
        grad_A = grad_out @ weight
    if ctx.has_bias and ctx.needs_input_grad[6]:
        grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0).to(ctx.bias_dtype)
    return grad_A, None, None, None, None, None, grad_bias, None, None, None


torch.library.register_autograd("halfbyte::gemm_4bit", _gemm_backward, setup_context=_gemm_setup_context)


from . import _ops_int8  # noqa: E402, F401  (fake kernels and autograd of the INT8 ops)
