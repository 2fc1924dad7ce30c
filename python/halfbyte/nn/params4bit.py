"""Params4bit: a weight Parameter that is quantized to 4 bits when it is moved to a device.

bitsandbytes' contract, kept so that code written for it works: an unquantized Params4bit holds the float
weight; ``.to(device)`` / ``.cuda()`` / ``.cpu()`` quantizes it there (NF4/FP4, blockwise absmax, optional
double quantization) and from then on ``data`` is the packed bytes (shape ``[bytes / itemsize, 1]`` in
``quant_storage``) and ``quant_state`` says how to decode them. A quantized Params4bit moves between devices
with its bytes unchanged and its dtype never cast (casting packed bytes would destroy them). The attribute set
(``blocksize``, ``compress_statistics``, ``quant_type``, ``quant_state``, ``quant_storage``, ``bnb_quantized``,
``module``) is bitsandbytes', so code that rebuilds a Params4bit from ``weight.__dict__`` (peft's merge) works.

Differences from bitsandbytes, all on the side of keeping data intact: pickling keeps the class (bitsandbytes
comes back as a plain Parameter), ``.to(dtype)`` of a quantized weight leaves the bytes alone, and quantizing a
weight that is still on the meta device is a clear error.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from .. import functional as F
from .. import reference
from ..packed_scales import pack_nested_scales
from ..quant_state import QuantState
from .quantized_parameter import QuantizedParameter

_ATTRIBUTES = (
    "blocksize",
    "compress_statistics",
    "quant_type",
    "quant_state",
    "quant_storage",
    "bnb_quantized",
    "module",
)


def _check_format(blocksize, quant_type, quant_storage) -> None:
    if blocksize not in reference.BLOCKSIZES:
        raise ValueError(f"Params4bit: blocksize must be a power of two from 32 to 4096, got {blocksize!r}")
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"Params4bit: quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    if quant_storage not in reference.STORAGE_DTYPES:
        raise TypeError(f"Params4bit: quant_storage must be uint8, float16, bfloat16 or float32, got {quant_storage}")


class Params4bit(QuantizedParameter):
    """A 4-bit weight (see the module docstring). ``requires_grad`` defaults to False: the base is frozen."""

    _attribute_names = _ATTRIBUTES

    def __new__(
        cls,
        data: torch.Tensor | None = None,
        requires_grad: bool = False,
        quant_state: QuantState | None = None,
        blocksize: int | None = None,
        compress_statistics: bool = True,
        quant_type: str = "fp4",
        quant_storage: torch.dtype = torch.uint8,
        module: torch.nn.Module | None = None,
        bnb_quantized: bool = False,
        **kwargs,  # other entries of a bitsandbytes Params4bit's __dict__ (ignored, as bitsandbytes does)
    ) -> Params4bit:
        if data is None:
            data = torch.empty(0)
        blocksize = 64 if blocksize is None else blocksize
        _check_format(blocksize, quant_type, quant_storage)
        self = torch.Tensor._make_subclass(cls, data, requires_grad)
        self.blocksize = blocksize
        self.compress_statistics = compress_statistics
        self.quant_type = quant_type
        self.quant_state = quant_state
        self.quant_storage = quant_storage
        self.bnb_quantized = bnb_quantized
        self.module = module
        return self

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "quant_state":
            # Another state for these bytes: empty the old state's cached kernel inputs (functional.kernel_inputs)
            # in place, since a module may still hold them for its compiled forward (nn/linear4bit.py).
            old = self.__dict__.get("quant_state")
            cached = None if old is None or old is value else old.__dict__.get("_kernel_inputs")
            if cached:
                cached.clear()
            if isinstance(value, QuantState):
                # once per state, as it is quantized or loaded: one buffer for the double-quantized scales, so
                # that a compiled model guards fewer tensors (packed_scales.py)
                pack_nested_scales(value)
        super().__setattr__(name, value)

    # ---- construction from a checkpoint ---------------------------------------------------------------

    @classmethod
    def from_prequantized(
        cls,
        data: torch.Tensor,
        quantized_stats: dict[str, Any],
        requires_grad: bool = False,
        device: torch.device | str = "cuda",
        module: torch.nn.Module | None = None,
        **kwargs,
    ) -> Params4bit:
        """A quantized Params4bit from packed bytes and the ``weight.*`` quant-state entries of a state dict
        (keys with or without the ``weight.`` prefix, packed or unpacked, as ``QuantState.from_dict`` takes)."""
        if not isinstance(data, torch.Tensor):
            raise TypeError(f"Params4bit.from_prequantized: data must be a tensor, got {type(data).__name__}")
        state = QuantState.from_dict(quantized_stats, device=device)
        check_packed_matches_state(data, state, "data")
        self = cls.wrapping_packed(data.to(device), state, module)
        self.requires_grad = requires_grad
        return self

    @classmethod
    def wrapping_packed(cls, packed: torch.Tensor, state: QuantState, module: torch.nn.Module | None) -> Params4bit:
        """A quantized Params4bit around `packed` bytes decoded by `state` (format fields taken from the state);
        sets ``module.quant_state``."""
        self = cls(
            packed, requires_grad=False, quant_state=state, blocksize=state.blocksize,
            compress_statistics=state.nested, quant_type=state.quant_type, quant_storage=packed.dtype, module=module,
            bnb_quantized=True,
        )  # fmt: skip
        if module is not None:
            module.quant_state = state
        return self

    # ---- quantization on move -------------------------------------------------------------------------

    def _quantize(self, device: torch.device, dtype: torch.dtype | None = None) -> Params4bit:
        if self.data.device.type == "meta":
            raise RuntimeError(
                "Params4bit: the weight is still on the meta device (no values to quantize); load real weights "
                "into it (load_state_dict) before moving it to a device"
            )
        weight = self.data.to(device=device, dtype=dtype).contiguous()
        packed, state = F.quantize_4bit(
            weight,
            blocksize=self.blocksize,
            compress_statistics=self.compress_statistics,
            quant_type=self.quant_type,
            quant_storage=self.quant_storage,
        )
        self.data = packed
        self.quant_state = state
        self.bnb_quantized = True
        if self.module is not None:
            self.module.quant_state = state
        return self

    def to(self, *args, **kwargs) -> Params4bit:
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        if device is not None and device.type != "meta" and not self.bnb_quantized:
            return self._quantize(device, dtype)
        if self.bnb_quantized:
            dtype = None  # packed bytes are never cast
        if self.quant_state is not None and device is not None:
            self.quant_state.to(device)  # in place, like bitsandbytes: Module._apply keeps this Parameter object
        moved = super().to(device=device, dtype=dtype, non_blocking=non_blocking)
        return Params4bit(moved, requires_grad=self.requires_grad, **self._attributes())

    def _cast(self, dtype: torch.dtype) -> torch.Tensor:
        # Module.half() / .float() / .bfloat16() reach here for a float quant_storage: packed bytes stay as they are
        return self if self.bnb_quantized else self.to(dtype)

    def half(self, memory_format=torch.preserve_format):
        return self._cast(torch.float16)

    def float(self, memory_format=torch.preserve_format):
        return self._cast(torch.float32)

    def bfloat16(self, memory_format=torch.preserve_format):
        return self._cast(torch.bfloat16)

    def double(self, memory_format=torch.preserve_format):
        return self._cast(torch.float64)

    # ---- copy, deepcopy, pickle -----------------------------------------------------------------------

    def __deepcopy__(self, memo: dict) -> Params4bit:
        """Copies the bytes and the QuantState; the module is the copy when the module is being deep-copied
        (it is then in `memo`), otherwise the same module (as bitsandbytes)."""
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        state = self.__getstate__()
        state["data"] = copy.deepcopy(state["data"], memo)
        state["quant_state"] = copy.deepcopy(state["quant_state"], memo)
        state["module"] = memo.get(id(state["module"]), state["module"])
        new.__setstate__(state)
        return new

    # ---- quant-state fields as attributes (FSDP resolves "weight.absmax" etc. through getattr) ---------

    def _state_field(self, name: str, nested: bool = False):
        state = self.__dict__.get("quant_state")
        if state is None or (nested and state.state2 is None):
            raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")
        return state

    absmax = property(lambda self: self._state_field("absmax").absmax)
    code = property(lambda self: self._state_field("code").code)
    quant_map = property(lambda self: self._state_field("quant_map").code)
    offset = property(lambda self: self._state_field("offset").offset)
    state2 = property(lambda self: self._state_field("state2").state2)
    nested_absmax = property(lambda self: self._state_field("nested_absmax", True).state2.absmax)
    nested_blocksize = property(lambda self: self._state_field("nested_blocksize", True).state2.blocksize)
    nested_quant_map = property(lambda self: self._state_field("nested_quant_map", True).state2.code)
    nested_dtype = property(lambda self: self._state_field("nested_dtype", True).state2.dtype)
    nested_offset = property(lambda self: self._state_field("nested_offset").offset)

    def __repr__(self) -> str:
        if not self.bnb_quantized:
            return f"Params4bit(unquantized, {self.quant_type}, blocksize={self.blocksize}):\n{super().__repr__()}"
        return f"Params4bit({self.quant_state}, {self.data.numel()} x {self.data.dtype} on {self.data.device})"


def packed_byte_count(numel: int) -> int:
    """Bytes of packed 4-bit codes for `numel` values (two per byte)."""
    return (numel + 1) // 2


def check_packed_matches_state(packed: torch.Tensor, state: QuantState, name: str) -> None:
    """ValueError naming `name` when the packed bytes or the absmax cannot belong to `state`."""
    if state.shape is None:
        raise ValueError(f"{name}: the quant state has no shape")
    numel = 1
    for dim in state.shape:
        numel *= dim
    have = packed.numel() * packed.element_size()
    need = packed_byte_count(numel)
    if have < need or have - need >= packed.element_size():
        raise ValueError(
            f"{name}: {have} packed bytes ({list(packed.shape)} x {packed.dtype}) do not hold a 4-bit tensor of "
            f"shape {list(state.shape)} ({need} bytes)"
        )
    blocks = -(-numel // state.blocksize)
    if state.absmax.numel() != blocks:
        raise ValueError(
            f"{name}: absmax has {state.absmax.numel()} entries, but shape {list(state.shape)} with blocksize "
            f"{state.blocksize} has {blocks} blocks"
        )
    if state.nested and state.state2.absmax.numel() != -(-blocks // state.state2.blocksize):
        raise ValueError(
            f"{name}: nested_absmax has {state.state2.absmax.numel()} entries, expected "
            f"{-(-blocks // state.state2.blocksize)} for {blocks} blocks"
        )


def requantized(param: Params4bit, weight: torch.Tensor) -> Params4bit:
    """A new quantized Params4bit holding `weight` in `param`'s format, on `param`'s device, attached to the
    same module (used to merge an adapter into a 4-bit weight)."""
    fresh = Params4bit(
        weight.detach(),
        requires_grad=False,
        blocksize=param.blocksize,
        compress_statistics=param.compress_statistics,
        quant_type=param.quant_type,
        quant_storage=param.quant_storage,
        module=param.module,
    )
    return fresh.to(param.device)  # quantizes, and sets module.quant_state
