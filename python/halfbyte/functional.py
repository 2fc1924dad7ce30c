"""The bitsandbytes-shaped stateless API: blockwise 4-bit / 8-bit quantization and the 4-bit matmul.

Signatures and defaults follow ``bitsandbytes.functional`` so that ``import halfbyte as bnb`` works for
common code; everything runs through ``torch.ops.halfbyte.*`` (CPU and CUDA kernels). Results are
byte-identical to bitsandbytes' CUDA kernels (shared/COMPAT.md). Bad arguments raise ``TypeError`` /
``ValueError`` naming the argument.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from . import (
    _ops,  # noqa: F401  (fake kernels + autograd)
    reference,
)
from .packed_scales import packed_scales_of, unpack_scales
from .quant_state import QuantState, pack_dict_to_tensor, unpack_tensor_to_dict

__all__ = [
    "QuantState", "create_dynamic_map", "create_normal_map", "get_4bit_type", "quantize_blockwise",
    "dequantize_blockwise", "quantize_4bit", "dequantize_4bit", "quantize_nf4", "quantize_fp4",
    "dequantize_nf4", "dequantize_fp4", "gemv_4bit", "pack_dict_to_tensor", "unpack_tensor_to_dict",
]  # fmt: skip

BLOCKSIZES = reference.BLOCKSIZES
NESTED_BLOCKSIZE = reference.NESTED_BLOCKSIZE

create_dynamic_map = reference.create_dynamic_map
create_normal_map = reference.create_normal_map


@functools.cache
def _cached_code(name: str, device: torch.device | str) -> torch.Tensor:
    if name == "dynamic":
        return create_dynamic_map().to(device)
    return reference.table_4bit(name, device)


def _code(name: str, device) -> torch.Tensor:
    """A private copy of a built-in code on `device` (device-side copy of a per-device cached table, so
    no host-to-device transfer happens after the first call: CUDA graph capture stays possible)."""
    return _cached_code(name, device).clone()


def get_4bit_type(typename: str, device=None, blocksize: int = 64) -> torch.Tensor:
    """The 16 levels of 'nf4' or 'fp4' as a float32 tensor (index = 4-bit code)."""
    if typename not in ("nf4", "fp4"):
        raise ValueError(f"get_4bit_type: typename must be 'nf4' or 'fp4', got {typename!r}")
    return _code(typename, device if device is not None else "cpu")


def _check_tensor(name: str, value) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


def _check_input(fn: str, A) -> None:
    _check_tensor(f"{fn}: A", A)
    if A.dtype not in reference.FLOAT_DTYPES:
        raise TypeError(f"{fn}: A must be float16, bfloat16 or float32, got {A.dtype}")


def _check_blocksize(fn: str, blocksize) -> None:
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"{fn}: blocksize must be a power of two from 32 to 4096, got {blocksize}")


def _check_quant_type(fn: str, quant_type) -> None:
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"{fn}: quant_type must be 'nf4' or 'fp4', got {quant_type!r}")


def _mean_offset(absmax: torch.Tensor) -> torch.Tensor:
    """offset of double quantization: absmax.mean() (torch's reduction, as bitsandbytes computes it).

    When a block holds NaN/inf that mean is not finite and would poison every block; then the offset is 0
    (a valid offset: only the precision of the nested step changes), so the non-finite block spoils only
    its group of 256 blocks that share a nested absmax. Chosen on the device: no host synchronization.
    """
    if absmax.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=absmax.device)
    return torch.nan_to_num(absmax.mean(), nan=0.0, posinf=0.0, neginf=0.0)


# ---- 8-bit blockwise ------------------------------------------------------------------------------


def quantize_blockwise(
    A: torch.Tensor,
    code: torch.Tensor | None = None,
    absmax: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    blocksize: int = 4096,
    nested: bool = False,
) -> tuple[torch.Tensor, QuantState]:
    """8-bit blockwise quantization with `code` (default: the dynamic map); one float32 absmax per block.

    With ``nested=True`` the absmax is itself quantized (offset = its mean, blocks of `blocksize`).
    """
    _check_input("quantize_blockwise", A)
    _check_blocksize("quantize_blockwise", blocksize)
    if code is None:
        code = _code("dynamic", A.device)
    else:
        _check_tensor("quantize_blockwise: code", code)
        code = code.to(A.device, copy=True)
    codes, block_absmax = torch.ops.halfbyte.quantize_blockwise(A, code, blocksize)
    if nested:
        offset = _mean_offset(block_absmax)
        qabsmax, state2 = quantize_blockwise(block_absmax - offset, blocksize=blocksize, nested=False)
        state = QuantState(absmax=qabsmax, code=code, blocksize=blocksize, dtype=A.dtype, offset=offset, state2=state2)
    else:
        state = QuantState(absmax=block_absmax, code=code, blocksize=blocksize, dtype=A.dtype)
    if out is not None:
        codes = out.copy_(codes)
    if absmax is not None:
        state.absmax = absmax.copy_(state.absmax)
    return codes, state


def kernel_inputs(state: QuantState) -> dict[str, Any]:
    """What the 4-bit ops read from a QuantState, as one dict cached on the state (see QuantState's notes).

    Keys: ``shape`` ([N, K] list or None), ``absmax``, ``blocksize``, ``quant_type``, ``offset``, ``nested``:
    None, or the nested state's own dict {``absmax``, ``code``}; ``traced``, ``scales`` and ``code``: the same
    as one constant tuple, one tensor and the nested code (``traced_scale_args``), or None. Built on first use
    outside torch.compile, with ``scales`` the packed buffer when the state's scales are packed
    (packed_scales.py); while tracing, a missing or emptied cache is read afresh from the fields (correct, with
    more guards)."""
    fields = vars(state)
    cached = fields.get("_kernel_inputs")
    if kernel_inputs_intact(cached):
        return cached
    compiling = torch.compiler.is_compiling()
    nested_state = fields["state2"]
    nested = None
    if nested_state is not None and vars(nested_state)["blocksize"] != NESTED_BLOCKSIZE:
        raise ValueError(f"double quantization must use blocks of 256, got {vars(nested_state)['blocksize']}")
    packed = None if compiling else packed_scales_of(state)  # reads addresses: not while tracing
    if nested_state is not None:
        nested_fields = vars(nested_state)
        nested = nested_fields.get("_kernel_inputs_nested")
        if not nested:
            nested = {"absmax": nested_fields["absmax"], "code": nested_fields["code"]}
    shape = fields["shape"]
    # What a compiled model reads (traced_scale_args): the layout as one constant tuple and the scales as one
    # tensor, the absmax of a plain state or the packed buffer of a nested one; None when the state has no
    # shape or its nested scales could not be packed (the traced code then reads the fields above).
    traced = scales = None
    if shape is not None and len(shape) == 2 and (nested is None or packed is not None):
        layout = None if packed is None else packed[1]
        traced = (int(shape[0]), int(shape[1]), fields["blocksize"], fields["quant_type"], layout)
        scales = fields["absmax"] if packed is None else packed[0]
    built = {
        "shape": None if shape is None else list(shape),
        "absmax": fields["absmax"],
        "blocksize": fields["blocksize"],
        "quant_type": fields["quant_type"],
        "offset": fields["offset"],
        "nested": nested,
        "traced": traced,
        "scales": scales,
        "code": None if nested is None else nested["code"],
    }
    if not compiling:  # no cache writes while tracing
        if nested_state is not None:
            object.__setattr__(nested_state, "_kernel_inputs_nested", nested)
            # a change of the nested state empties this dict too (QuantState.__setattr__)
            users = [d for d in nested_state.__dict__.get("_kernel_inputs_users") or () if d]
            object.__setattr__(nested_state, "_kernel_inputs_users", [*users, built])
        object.__setattr__(state, "_kernel_inputs", built)
    return built


def kernel_inputs_intact(inputs: dict[str, Any] | None) -> bool:
    """Whether a dict from ``kernel_inputs`` is still whole: not emptied by a change of its state or of the
    nested state since it was built. Written with len() rather than bool(): Dynamo before torch 2.13 cannot
    trace bool() of a dict."""
    return inputs is not None and len(inputs) > 0


def scale_args_of(inputs: dict[str, Any]) -> tuple[list[int], torch.Tensor, int, str, dict]:
    """(shape, absmax, blocksize, quant_type, nested keyword arguments) of the 4-bit ops from a
    ``kernel_inputs`` dict, its tensors as they are (the eager path)."""
    absmax, kwargs = scale_args(inputs)
    return inputs["shape"], absmax, inputs["blocksize"], inputs["quant_type"], kwargs


def traced_scale_args(inputs: dict[str, Any], traced: tuple) -> tuple[list[int], torch.Tensor, int, str, dict]:
    """(shape, absmax, blocksize, quant_type, nested keyword arguments) of the 4-bit ops from the ``traced``,
    ``scales`` and ``code`` entries of a ``kernel_inputs`` dict (``traced`` not None): one constant tuple, one
    tensor (sliced here: inside a compiled graph the slices are free) and, when nested, the nested code (one
    tensor shared by the layers that quantized their absmax alike)."""
    N, K, blocksize, quant_type, layout = traced
    scales = inputs["scales"]
    if layout is None:
        return [N, K], scales, blocksize, quant_type, {}
    absmax_8bit, nested_absmax, offset = unpack_scales(scales, layout)
    kwargs = {"absmax_8bit": absmax_8bit, "absmax_code": inputs["code"], "absmax_offset": offset}
    return [N, K], nested_absmax, blocksize, quant_type, kwargs


def _scale_args(state: QuantState) -> tuple[torch.Tensor, dict]:
    """(absmax, nested keyword arguments) of the 4-bit ops for a QuantState."""
    return scale_args(kernel_inputs(state))


def scale_args(inputs: dict[str, Any]) -> tuple[torch.Tensor, dict]:
    """(absmax, nested keyword arguments) of the 4-bit ops from a ``kernel_inputs`` dict: double-quantized
    scales are passed as they are stored (uint8 codes, nested absmax, code, offset) and resolved inside the
    kernels."""
    nested = inputs["nested"]
    if nested is None:
        return inputs["absmax"], {}
    return nested["absmax"], {
        "absmax_8bit": inputs["absmax"],
        "absmax_code": nested["code"],
        "absmax_offset": inputs["offset"],
    }


def _resolved_absmax(state: QuantState) -> torch.Tensor:
    """float32 absmax of a state, dequantizing it first when it is double-quantized."""
    if not state.nested:
        return state.absmax
    absmax = dequantize_blockwise(state.absmax, state.state2)
    return (absmax + state.offset).float()


def dequantize_blockwise(
    A: torch.Tensor,
    quant_state: QuantState | None = None,
    absmax: torch.Tensor | None = None,
    code: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    blocksize: int = 4096,
    nested: bool = False,
) -> torch.Tensor:
    """Inverse of quantize_blockwise: code[c] * absmax, in the state's dtype (float32 without a state)."""
    _check_tensor("dequantize_blockwise: A", A)
    if A.dtype != torch.uint8:
        raise TypeError(f"dequantize_blockwise: A must be uint8 codes, got {A.dtype}")
    if quant_state is None:
        if absmax is None:
            raise ValueError("dequantize_blockwise: pass quant_state, or absmax (with code and blocksize)")
        quant_state = QuantState(
            absmax=absmax, code=code if code is not None else _code("dynamic", A.device), blocksize=blocksize,
            dtype=torch.float32,
        )  # fmt: skip
    _check_blocksize("dequantize_blockwise", quant_state.blocksize)
    scales = _resolved_absmax(quant_state)
    table = quant_state.code.to(A.device)
    if out is not None:
        torch.ops.halfbyte.dequantize_blockwise.out(A, scales, table, quant_state.blocksize, quant_state.dtype, out=out)
        return out
    return torch.ops.halfbyte.dequantize_blockwise(A, scales, table, quant_state.blocksize, quant_state.dtype)


# ---- 4-bit ----------------------------------------------------------------------------------------


def quantize_4bit(
    A: torch.Tensor,
    absmax: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    blocksize: int | None = None,
    compress_statistics: bool = False,
    quant_type: str = "fp4",
    quant_storage: torch.dtype = torch.uint8,
) -> tuple[torch.Tensor, QuantState]:
    """Blockwise 4-bit (NF4/FP4) quantization: packed codes of shape ``((n+1)//(2*itemsize), 1)`` in
    `quant_storage`, and a QuantState. ``compress_statistics=True`` double-quantizes the absmax (8-bit
    dynamic map, blocks of 256, offset = mean)."""
    blocksize = 64 if blocksize is None else blocksize
    _check_input("quantize_4bit", A)
    _check_blocksize("quantize_4bit", blocksize)
    _check_quant_type("quantize_4bit", quant_type)
    if quant_storage not in reference.STORAGE_DTYPES:
        raise TypeError(
            f"quantize_4bit: quant_storage must be uint8, float16, bfloat16 or float32, got {quant_storage}"
        )
    packed, block_absmax = torch.ops.halfbyte.quantize_4bit(A, blocksize, quant_type, quant_storage)
    code = _cached_code(quant_type, A.device)  # shared, never written; as_dict() serializes a copy
    if compress_statistics:
        offset = _mean_offset(block_absmax)
        dynamic = _cached_code("dynamic", block_absmax.device)  # shared; as_dict() serializes a copy
        qabsmax, nested_absmax = torch.ops.halfbyte.quantize_blockwise(block_absmax - offset, dynamic, NESTED_BLOCKSIZE)
        state2 = QuantState(absmax=nested_absmax, code=dynamic, blocksize=NESTED_BLOCKSIZE, dtype=torch.float32)
        state = QuantState(
            absmax=qabsmax, shape=A.shape, dtype=A.dtype, blocksize=blocksize, code=code, quant_type=quant_type,
            offset=offset, state2=state2,
        )  # fmt: skip
    else:
        state = QuantState(
            absmax=block_absmax, shape=A.shape, dtype=A.dtype, blocksize=blocksize, code=code, quant_type=quant_type
        )
    if out is not None:
        packed = out.copy_(packed)
    if absmax is not None:
        state.absmax = absmax.copy_(state.absmax)
    return packed, state


def dequantize_4bit(
    A: torch.Tensor,
    quant_state: QuantState | None = None,
    absmax: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    blocksize: int | None = None,
    quant_type: str = "fp4",
) -> torch.Tensor:
    """Inverse of quantize_4bit: table[code] * absmax in float32, cast to the state's dtype, shaped like
    the original tensor. Without a state, pass `absmax` and `out` (its shape and dtype are used)."""
    _check_tensor("dequantize_4bit: A", A)
    blocksize = 64 if blocksize is None else blocksize
    if quant_state is None:
        if absmax is None or out is None:
            raise ValueError("dequantize_4bit: pass quant_state, or both absmax and out")
        quant_state = QuantState(
            absmax=absmax, shape=out.shape, dtype=out.dtype, blocksize=blocksize, quant_type=quant_type
        )
    if not isinstance(quant_state, QuantState):
        raise TypeError(f"dequantize_4bit: quant_state must be a QuantState, got {type(quant_state).__name__}")
    if quant_state.shape is None:
        raise ValueError("dequantize_4bit: quant_state.shape is required")
    _check_blocksize("dequantize_4bit", quant_state.blocksize)
    _check_quant_type("dequantize_4bit", quant_state.quant_type)
    if quant_state.dtype not in reference.FLOAT_DTYPES:
        raise TypeError(f"dequantize_4bit: quant_state.dtype must be a float dtype, got {quant_state.dtype}")
    absmax, nested = _scale_args(quant_state)
    args = (A, absmax, quant_state.blocksize, quant_state.quant_type, list(quant_state.shape), quant_state.dtype)
    if out is not None:
        torch.ops.halfbyte.dequantize_4bit.out(*args, out=out, **nested)
    else:
        out = torch.ops.halfbyte.dequantize_4bit(*args, **nested)
    # bitsandbytes compatibility: a packed weight passed transposed ([1, bytes]) gives the output transposed.
    if A.dim() == 2 and A.shape[0] == 1 and out.dim() == 2:
        return out.t()
    return out


def quantize_nf4(A, absmax=None, out=None, blocksize=None, compress_statistics=False, quant_storage=torch.uint8):
    return quantize_4bit(A, absmax, out, blocksize, compress_statistics, "nf4", quant_storage)


def quantize_fp4(A, absmax=None, out=None, blocksize=None, compress_statistics=False, quant_storage=torch.uint8):
    return quantize_4bit(A, absmax, out, blocksize, compress_statistics, "fp4", quant_storage)


def dequantize_nf4(A, quant_state=None, absmax=None, out=None, blocksize=None):
    return dequantize_4bit(A, quant_state, absmax, out, blocksize, "nf4")


def dequantize_fp4(A, quant_state=None, absmax=None, out=None, blocksize=None):
    return dequantize_4bit(A, quant_state, absmax, out, blocksize, "fp4")


def gemv_4bit(
    A: torch.Tensor,
    B: torch.Tensor,
    out: torch.Tensor | None = None,
    transposed_A: bool = False,
    transposed_B: bool = False,
    state: QuantState | None = None,
) -> torch.Tensor:
    """A @ W.T for a 4-bit weight W (its packed bytes B and QuantState `state`), accumulated in float32."""
    if state is None:
        raise ValueError("gemv_4bit: state (the QuantState from quantize_4bit) is required")
    _check_input("gemv_4bit", A)
    _check_tensor("gemv_4bit: B", B)
    scales = _resolved_absmax(state)
    args = (A, B.reshape(-1, 1), list(state.shape), scales, state.code.to(A.device), state.blocksize)
    if out is not None:
        torch.ops.halfbyte.gemv_4bit.out(*args, out=out)
        return out
    return torch.ops.halfbyte.gemv_4bit(*args)


# ---- the INT8 tier (row-wise int8, LLM.int8): functional_int8.py -----------------------------------------
from .functional_int8 import (  # noqa: E402
    int8_double_quant,
    int8_linear,
    int8_linear_matmul,
    int8_mm_dequant,
    int8_vectorwise_dequant,
    int8_vectorwise_quant,
)

__all__ += [
    "int8_vectorwise_quant", "int8_vectorwise_dequant", "int8_linear_matmul", "int8_mm_dequant",
    "int8_double_quant", "int8_linear",
]  # fmt: skip
