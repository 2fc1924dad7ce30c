"""QuantState: everything needed to dequantize a blockwise-quantized tensor, and its serialized form.

Compatible with bitsandbytes' QuantState: the same fields, the same list view for old code, and the same
``as_dict(packed=True)`` keys and JSON (shared/COMPAT.md), so state dicts move between the two libraries.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch

from .packed_scales import PACKED_KEY, move_packed_scales, with_own_storage

QUANT_TYPES = ("fp4", "nf4")
_PACKED_PREFIX = "quant_state.bitsandbytes__"
_VALID_KEYS = {
    "absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state", "quant_type", "blocksize",
    "dtype", "shape", "nested_blocksize", "nested_dtype", "nested_offset",
}  # fmt: skip
_REQUIRED_KEYS = ("quant_type", "absmax", "blocksize", "quant_map", "dtype", "shape")
# Caches of functional.kernel_inputs: the state's own dict, a nested state's dict, and in a nested state the list
# of the dicts of the states that nest it (emptied with it).
_KERNEL_INPUT_KEYS = ("_kernel_inputs", "_kernel_inputs_nested", "_kernel_inputs_users")
_NOT_PICKLED = (*_KERNEL_INPUT_KEYS, PACKED_KEY)  # rebuilt on first use
_REQUIRED_NESTED_KEYS = ("nested_absmax", "nested_blocksize", "nested_quant_map", "nested_dtype", "nested_offset")


def pack_dict_to_tensor(source: Mapping[str, Any]) -> torch.Tensor:
    """JSON of `source` as a uint8 tensor (how non-tensor fields travel in a state dict)."""
    return torch.tensor(list(json.dumps(source).encode("utf-8")), dtype=torch.uint8)


def unpack_tensor_to_dict(tensor: torch.Tensor) -> dict[str, Any]:
    try:
        text = bytes(tensor.detach().cpu().to(torch.uint8).numpy()).decode("utf-8")
        value = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"quant_state: the packed '{_PACKED_PREFIX}*' tensor is not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise ValueError(f"quant_state: the packed JSON must be an object, got {type(value).__name__}")
    return value


def _same_bits(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    as_bytes = lambda t: t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)  # noqa: E731
    return torch.equal(as_bytes(a), as_bytes(b))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: Any, key: str) -> torch.dtype:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"quant_state: '{key}' must name a torch dtype, got {name!r}")
    return dtype


class QuantState:
    """Quantization state of one tensor (absmax, shape, code table, blocksize, quant_type, dtype, nesting)."""

    valid_quant_types = QUANT_TYPES
    valid_qs_type_keys = [f"bitsandbytes__{q}" for q in QUANT_TYPES]
    valid_qs_keys = sorted(_VALID_KEYS)

    def __init__(
        self,
        absmax: torch.Tensor,
        shape: torch.Size | tuple[int, ...] | None = None,
        code: torch.Tensor | None = None,
        blocksize: int | None = None,
        quant_type: str | None = None,
        dtype: torch.dtype | None = None,
        offset: torch.Tensor | None = None,
        state2: QuantState | None = None,
    ):
        self.absmax = absmax
        self.shape = torch.Size(shape) if shape is not None else None
        self.code = code
        self.dtype = dtype
        self.blocksize = blocksize
        self.quant_type = quant_type
        self.offset = offset
        self.state2 = state2

    @property
    def nested(self) -> bool:
        return self.state2 is not None

    # ---- the kernels' view of the state (functional.kernel_inputs) ------------------------------------------
    #
    # A dict of the tensors and values the 4-bit ops read, kept in ``__dict__["_kernel_inputs"]``. A compiled
    # model reads a layer's state through it (nn/linear4bit.py links it into the module): torch.compile checks
    # its guards on every object the traced code read before each call, dict lookups are the cheapest reads
    # (tensors found in an unchanged dict are not re-checked), and with 224 layers reading the state as
    # attributes made that check take 3 ms of each decode step (benchmarks/README.md, issue 7).
    # Setting any attribute empties the dict in place, so a compiled graph reading it fails its guards and is
    # traced again; a nested state's dict (``_kernel_inputs_nested``: its absmax and code) is shared with the
    # states that nest it, and it keeps their dicts (``_kernel_inputs_users``), so changing the nested state
    # empties those too.

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        if name not in _KERNEL_INPUT_KEYS:
            users = self.__dict__.get("_kernel_inputs_users")
            for cached in users or ():
                cached.clear()
            for key in _KERNEL_INPUT_KEYS:
                cached = self.__dict__.get(key)
                if cached:
                    cached.clear()

    def __getstate__(self) -> dict[str, Any]:
        # the caches are rebuilt on first use; copies and pickles carry only the fields, each tensor in storage
        # of its own (torch.save cannot write views of one packed buffer as different dtypes)
        return {k: with_own_storage(v) for k, v in self.__dict__.items() if k not in _NOT_PICKLED}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __getattr__(self, name: str):
        # FSDP resolves the packed key "quant_state.bitsandbytes__nf4" through getattr.
        if name.startswith("bitsandbytes__"):
            packed = self.as_dict(packed=True)
            key = "quant_state." + name
            if key in packed:
                return packed[key]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    def __getitem__(self, index):
        """The old list layout: [absmax, shape, dtype, blocksize, [offset, state2] or None, quant_type]."""
        nested = [self.offset, self.state2] if self.nested else None
        return [self.absmax, self.shape, self.dtype, self.blocksize, nested, self.quant_type][index]

    @classmethod
    def from_dict(cls, qs_dict: Mapping[str, Any], device: torch.device | str) -> QuantState:
        """Rebuild from the output of ``as_dict`` (packed or not), keys possibly prefixed (``weight.absmax``)."""
        items = dict(qs_dict)
        packed_keys = [k for k, v in items.items() if "quant_state" in k and isinstance(v, torch.Tensor)]
        if "quant_type" not in items:
            if not packed_keys:
                raise ValueError(
                    "quant_state: expected a packed 'quant_state.bitsandbytes__<nf4|fp4>' tensor or unpacked "
                    f"fields, found neither among keys {sorted(items)}"
                )
            if len(packed_keys) != 1 or packed_keys[0].split(".")[-1] not in cls.valid_qs_type_keys:
                raise ValueError(
                    f"quant_state: expected exactly one key ending in {cls.valid_qs_type_keys}, found {packed_keys}"
                )
        if len(packed_keys) == 1:
            items.update(unpack_tensor_to_dict(items.pop(packed_keys[0])))
        items = {k.split(".")[-1]: v for k, v in items.items()}
        unknown = set(items) - _VALID_KEYS
        if unknown:
            raise ValueError(f"quant_state: unexpected keys {sorted(unknown)}")
        missing = [k for k in _REQUIRED_KEYS if k not in items]
        nested = any(k in items for k in _REQUIRED_NESTED_KEYS)
        if nested:
            missing += [k for k in _REQUIRED_NESTED_KEYS if k not in items]
        if missing:
            raise ValueError(f"quant_state: missing keys {missing}")
        if items["quant_type"] not in QUANT_TYPES:
            raise ValueError(f"quant_state: quant_type must be 'nf4' or 'fp4', got {items['quant_type']!r}")
        for key in ("absmax", "quant_map") + (("nested_absmax", "nested_quant_map") if nested else ()):
            if not isinstance(items[key], torch.Tensor):
                raise ValueError(f"quant_state: '{key}' must be a tensor, got {type(items[key]).__name__}")
        shape = items["shape"]
        if shape is not None and not (isinstance(shape, list | tuple) and all(isinstance(d, int) for d in shape)):
            raise ValueError(f"quant_state: 'shape' must be a list of ints, got {shape!r}")
        offset = state2 = None
        if nested:
            offset = torch.tensor(float(items["nested_offset"]), dtype=torch.float32, device=device)
            state2 = cls(
                absmax=items["nested_absmax"].to(device),
                blocksize=int(items["nested_blocksize"]),
                code=items["nested_quant_map"].to(device),
                dtype=_dtype_from_name(items["nested_dtype"], "nested_dtype"),
            )
        return cls(
            quant_type=items["quant_type"],
            absmax=items["absmax"].to(device),
            blocksize=int(items["blocksize"]),
            code=items["quant_map"].to(device),
            dtype=_dtype_from_name(items["dtype"], "dtype"),
            shape=torch.Size(shape) if shape is not None else None,
            offset=offset,
            state2=state2,
        )

    def as_dict(self, packed: bool = False) -> dict[str, Any]:
        """Tensors and plain values for serialization; ``packed=True`` gives only tensors (safetensors)."""
        fields: dict[str, Any] = {
            "quant_type": self.quant_type,
            "absmax": with_own_storage(self.absmax),
            "blocksize": self.blocksize,
            # a copy: the code table may be shared by many states (safetensors refuses shared tensors)
            "quant_map": self.code.clone() if isinstance(self.code, torch.Tensor) else self.code,
            "dtype": _dtype_name(self.dtype),
            "shape": tuple(self.shape) if self.shape is not None else None,
        }
        if self.nested:
            fields.update(
                {
                    "nested_absmax": with_own_storage(self.state2.absmax),
                    "nested_blocksize": self.state2.blocksize,
                    "nested_quant_map": self.state2.code.clone(),  # a copy, as quant_map
                    "nested_dtype": _dtype_name(self.state2.dtype),
                    "nested_offset": self.offset.item(),
                }
            )
        if not packed or self.quant_type is None:
            return fields
        tensors = {k: v for k, v in fields.items() if isinstance(v, torch.Tensor)}
        tensors[_PACKED_PREFIX + self.quant_type] = pack_dict_to_tensor(
            {k: v for k, v in fields.items() if not isinstance(v, torch.Tensor)}
        )
        return tensors

    def to(self, device) -> QuantState:
        """Move the tensors to `device` (in place, like bitsandbytes); returns self for chaining. Packed scales
        (packed_scales.py) move as one buffer and stay packed."""
        self.code = self.code.to(device)
        if move_packed_scales(self, device):
            self.state2.code = self.state2.code.to(device)
            return self
        self.absmax = self.absmax.to(device)
        if self.nested:
            self.offset = self.offset.to(device)
            self.state2.absmax = self.state2.absmax.to(device)
            self.state2.code = self.state2.code.to(device)
        return self

    def __eq__(self, other: object) -> bool:
        """Same format and bit-identical tensors (stricter than bitsandbytes' allclose)."""
        if not isinstance(other, QuantState):
            return NotImplemented
        if (self.state2 is None) != (other.state2 is None):
            return False
        return (
            self.shape == other.shape
            and self.dtype == other.dtype
            and self.blocksize == other.blocksize
            and self.quant_type == other.quant_type
            and _same_bits(self.absmax, other.absmax)
            and _same_bits(self.code, other.code)
            and _same_bits(self.offset, other.offset)
            and (self.state2 is None or self.state2 == other.state2)
        )

    __hash__ = None  # mutable container

    def __repr__(self) -> str:
        nested = f", nested (offset={self.offset.item():.6g})" if self.nested else ""
        return (
            f"QuantState({self.quant_type}, shape={list(self.shape) if self.shape is not None else None}, "
            f"blocksize={self.blocksize}, dtype={self.dtype}{nested})"
        )
