"""matmul_4bit: ``A @ W.T (+ bias)`` for a 4-bit weight, differentiable in A and bias.

One call of ``torch.ops.halfbyte.gemm_4bit`` for every batch size (the op reads double-quantized absmax
directly); its autograd is registered on the op (python/halfbyte/_ops.py), so eager, autograd and
torch.compile all take the same path. The weight is frozen: it gets no gradient.
"""

from __future__ import annotations

import warnings

import torch

from . import functional as F
from .quant_state import QuantState


def gemm_4bit_args(B: torch.Tensor, quant_state: QuantState) -> tuple:
    """(B, shapeB, absmax, blocksize, quant_type) and the nested keyword arguments of gemm_4bit."""
    return _args_from_inputs(B, F.kernel_inputs(quant_state))


def _args_from_inputs(B: torch.Tensor, inputs: dict) -> tuple:
    return _args_from_scale_args(B, F.scale_args_of(inputs))


def _args_from_scale_args(B: torch.Tensor, scale_args: tuple) -> tuple:
    shape, absmax, blocksize, quant_type, kwargs = scale_args
    # Params4bit is stored [bytes, 1] already; a no-op reshape still costs a dispatcher call per layer call.
    column = B if B.dim() == 2 and B.shape[1] == 1 else B.reshape(-1, 1)
    return (column, shape, absmax, blocksize, quant_type), kwargs


def gemm_4bit_from_inputs(A: torch.Tensor, B: torch.Tensor, inputs: dict, bias: torch.Tensor | None) -> torch.Tensor:
    """The fused op on ``functional.kernel_inputs`` of B's state (B stored as [N, K], A of shape [..., K])."""
    return gemm_4bit_from_scale_args(A, B, F.scale_args_of(inputs), bias)


def gemm_4bit_from_scale_args(A: torch.Tensor, B: torch.Tensor, scale_args: tuple, bias: torch.Tensor | None):
    """The fused op on (shape, absmax, blocksize, quant_type, nested keyword arguments) of B's state: from
    ``functional.scale_args_of`` (eager) or ``functional.traced_scale_args`` (compiled)."""
    args, kwargs = _args_from_scale_args(B, scale_args)
    if torch.compiler.is_compiling() or _needs_gradient(A, bias):
        return torch.ops.halfbyte.gemm_4bit(A, *args, bias=bias, **kwargs)
    # Inference: no gradient can flow, so call the kernel below the autograd key. This skips the op's Python
    # autograd wrapper, a host cost paid on every layer call of eager decoding.
    with torch._C._AutoDispatchBelowAutograd():
        return torch.ops.halfbyte.gemm_4bit.default(A, *args, bias=bias, **kwargs)


def _needs_gradient(A: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and (A.requires_grad or (bias is not None and bias.requires_grad))


def matmul_4bit(
    A: torch.Tensor,
    B: torch.Tensor,
    quant_state: QuantState,
    out: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``A @ dequantize(B).T + bias`` with A of shape [..., K] and a weight quantized from [N, K].

    B is the packed weight (any view of it: ``weight`` or ``weight.t()``); quant_state.shape is [N, K].
    """
    if quant_state is None:
        raise ValueError("matmul_4bit: quant_state is required")
    if not isinstance(quant_state, QuantState):
        raise TypeError(f"matmul_4bit: quant_state must be a QuantState, got {type(quant_state).__name__}")
    inputs = F.kernel_inputs(quant_state)
    shape = inputs["shape"]
    if shape is None or len(shape) != 2:
        raise ValueError(f"matmul_4bit: quant_state.shape must be [N, K], got {shape}")
    N, K = shape
    if A.shape[-1] == N and N != K:
        # A weight quantized from its [K, N] transpose (old bitsandbytes code): still correct, not fused.
        if not torch.compiler.is_compiling():
            warnings.warn(
                f"matmul_4bit: weight was quantized as [K, N] = {list(shape)}; quantize the "
                "[out_features, in_features] weight instead for the fused kernel",
                stacklevel=2,
            )
        weight = F.dequantize_4bit(B.reshape(-1, 1), quant_state).to(A.dtype)
        result = torch.nn.functional.linear(A, weight.t(), bias)
    else:
        result = gemm_4bit_from_inputs(A, B, inputs, bias)
    if out is not None:
        return out.copy_(result)
    return result
