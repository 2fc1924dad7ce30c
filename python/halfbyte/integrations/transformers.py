"""Hugging Face transformers integration: ``from_pretrained(..., quantization_config=HalfbyteConfig(...))``.

``register()`` (run when halfbyte is imported with transformers installed) registers ``HalfbyteConfig`` and
``HalfbyteHfQuantizer`` under the method name "halfbyte". Then:

- **Quantize while loading** a full-precision checkpoint: the Linear layers of the model skeleton become
  halfbyte ``Linear4bit`` (``load_in_4bit``) or ``Linear8bitLt`` (``load_in_8bit``, LLM.int8) shells on the meta
  device, and each weight is quantized on its device right after it is read, before the next one is read
  (transformers loads synchronously when it quantizes), so peak memory is the final footprint plus one
  full-precision weight. transformers' "Loading weights" bar shows the progress.
- **Load a pre-quantized checkpoint** (saved by halfbyte or by bitsandbytes: the same tensors and keys) without
  re-quantizing: the packed bytes and the quant state (4-bit), or the int8 codes and their row absmax ``SCB``
  (8-bit), are used as they are, bit for bit. The quant state of every layer is checked before any weight is
  read, so a missing or corrupted one is a clear error that names the key.
- **Save**: ``save_pretrained`` writes bitsandbytes' keys and bytes (8-bit: ``weight`` int8, ``SCB`` float32,
  ``weight_format`` uint8 0), and config.json says ``"quant_method": "bitsandbytes"``, so bitsandbytes loads
  halfbyte checkpoints as its own.
- **Load a bitsandbytes checkpoint into halfbyte layers** (the documented call): pass a HalfbyteConfig::

      model = AutoModelForCausalLM.from_pretrained("some/llama-bnb-4bit", quantization_config=HalfbyteConfig())

  transformers alone would refuse a HalfbyteConfig for a checkpoint whose config.json names bitsandbytes;
  ``register()`` teaches ``AutoHfQuantizer.merge_quantization_configs`` this one case (a HalfbyteConfig passed
  for a bitsandbytes 4-bit or 8-bit checkpoint) and leaves every other case to transformers. The checkpoint's
  format fields win (they describe the stored tensors); a ``bnb_4bit_compute_dtype`` or ``llm_int8_threshold``
  you pass (not the default) wins over the saved one, as both only change how the layers compute.

lm_head (and any weight tied to the input embeddings) stays in 16 bits by default, as with bitsandbytes;
``HalfbyteConfig(llm_int8_skip_modules=[])`` quantizes every Linear including an untied lm_head. Generation
with a static cache and torch.compile works (the quantizer reports itself compileable), and
``model.get_memory_footprint()`` counts the quant state too (absmax, code tables, SCB), not only the packed bytes.

Written for transformers 5.x (checked against 5.17 and 5.23: their quantizer hooks differ slightly, both are
served here).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps, WeightConverter
from transformers.pytorch_utils import Conv1D
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    AutoHfQuantizer,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.quantizers.quantizers_utils import get_module_from_name, should_convert_module

from .. import functional as F
from ..config import QUANT_METHOD, SAVED_QUANT_METHOD, HalfbyteConfig
from ..nn.linear4bit import Linear4bit
from ..nn.linear8bit import Int8Params, Linear8bitLt
from ..nn.params4bit import Params4bit

logger = logging.getLogger("halfbyte")

# The state-dict entries of one 4-bit weight, as bitsandbytes writes them (shared/COMPAT.md). "weight" is last:
# transformers 5.17 matches a key against these patterns in order.
QUANT_STATE_SUFFIXES = (
    "weight.nested_absmax",
    "weight.nested_quant_map",
    "weight.quant_map",
    "weight.absmax",
    "weight.quant_state.bitsandbytes__nf4",
    "weight.quant_state.bitsandbytes__fp4",
)
SERIALIZED_WEIGHT_NAMES = ("weight",) + QUANT_STATE_SUFFIXES
_PACKED_STATE_MARKER = ".weight.quant_state.bitsandbytes__"

# The state-dict entries of one 8-bit (LLM.int8) weight, as bitsandbytes writes them beside the module's weight
# (not under it): ``weight`` the int8 codes [out, in], ``SCB`` one float32 absmax per output row, ``weight_format``
# the layout (uint8 0, "row"). "weight" is last: transformers 5.17 matches a key against these patterns in order,
# and "weight" would also match inside "weight_format".
INT8_SERIALIZED_NAMES = ("SCB", "weight_format", "weight")
_INT8_ROW_FORMAT = 0  # bitsandbytes' LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING["row"], the only layout it still writes

QUANTIZED_LAYERS = (Linear4bit, Linear8bitLt)


class CheckpointError(ValueError):
    """A pre-quantized checkpoint whose quant state (4-bit) or row absmax (8-bit) is missing, corrupted, or does
    not fit the model."""


# ---- checking a pre-quantized checkpoint before loading it -------------------------------------------------


@dataclass(frozen=True)
class QuantizedTensorInfo:
    """What the checkpoint says about one 4-bit weight (from its packed quant-state JSON)."""

    quant_type: str
    blocksize: int
    shape: tuple[int, ...]
    dtype: str
    nested: bool


def _read_safetensors_headers(path: str) -> dict[str, tuple[str, list[int]]]:
    """{key: (dtype, shape)} of one .safetensors file, from its header only (no tensor data is read)."""
    with open(path, "rb") as handle:
        size_bytes = handle.read(8)
        if len(size_bytes) != 8:
            raise CheckpointError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        size = int.from_bytes(size_bytes, "little")
        if size <= 0 or size > 100_000_000:
            raise CheckpointError(f"{path}: not a safetensors file (header length {size})")
        try:
            header = json.loads(handle.read(size))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CheckpointError(f"{path}: corrupted safetensors header ({error})") from None
    return {k: (v["dtype"], list(v["shape"])) for k, v in header.items() if k != "__metadata__"}


def inspect_quantized_checkpoint(checkpoint_files: Iterable[str]) -> dict[str, QuantizedTensorInfo]:
    """Check the 4-bit quant state of every quantized weight in `checkpoint_files` (.safetensors; other files are
    skipped) and return it by module name (``"model.layers.0.mlp.down_proj"``).

    Reads only the safetensors headers and the small packed-JSON tensors. Raises CheckpointError listing the
    problems: a quant-state key without its weight, a missing absmax / quant_map / nested entry, JSON that
    does not parse or lacks a field, an absmax or packed weight whose size does not fit the recorded shape.
    """
    from safetensors import safe_open

    headers: dict[str, tuple[str, list[int]]] = {}
    packed_json: dict[str, tuple[str, str]] = {}  # module -> (file, key)
    for path in checkpoint_files:
        path = os.fspath(path)
        if not path.endswith(".safetensors"):
            continue
        for key, entry in _read_safetensors_headers(path).items():
            headers[key] = entry
            if _PACKED_STATE_MARKER in key:
                packed_json[key.split(_PACKED_STATE_MARKER)[0]] = (path, key)

    problems: list[str] = []
    infos: dict[str, QuantizedTensorInfo] = {}
    for module, (path, key) in sorted(packed_json.items()):
        info = _check_one_quantized_weight(module, path, key, headers, problems, safe_open)
        if info is not None:
            infos[module] = info
    # absmax / quant_map without the packed JSON: the quant state is incomplete.
    for key in headers:
        for suffix in (".weight.absmax", ".weight.quant_map"):
            module = key[: -len(suffix)]
            if key.endswith(suffix) and module not in packed_json:
                problems.append(f"'{module}': has '{key}' but no '{module}.weight.quant_state.bitsandbytes__<nf4|fp4>'")
    if problems:
        shown = "\n  ".join(problems[:8]) + (f"\n  ... and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise CheckpointError(f"the checkpoint's 4-bit quant state is missing or corrupted:\n  {shown}")
    return infos


def _check_one_quantized_weight(module, path, key, headers, problems, safe_open) -> QuantizedTensorInfo | None:
    suffix_type = key.rsplit("__", 1)[1]
    with safe_open(path, framework="pt") as handle:
        raw = handle.get_tensor(key)
    try:
        fields = json.loads(bytes(raw.to(torch.uint8).numpy()).decode("utf-8"))
        quant_type, blocksize = fields["quant_type"], int(fields["blocksize"])
        shape, dtype = tuple(int(d) for d in fields["shape"]), str(fields["dtype"])
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        problems.append(f"'{module}': '{key}' does not hold the quant-state JSON ({type(error).__name__}: {error})")
        return None
    if quant_type != suffix_type:
        problems.append(f"'{module}': '{key}' says quant_type {quant_type!r}")
        return None
    nested = "nested_blocksize" in fields or f"{module}.weight.nested_absmax" in headers
    required = ["weight", "weight.absmax", "weight.quant_map"]
    if nested:
        required += ["weight.nested_absmax", "weight.nested_quant_map"]
        if not all(k in fields for k in ("nested_blocksize", "nested_offset", "nested_dtype")):
            problems.append(f"'{module}': nested (double) quantization without nested_blocksize/offset/dtype in {key}")
            return None
    missing = [f"{module}.{name}" for name in required if f"{module}.{name}" not in headers]
    if missing:
        problems.append(f"'{module}': missing {missing}")
        return None
    numel = math.prod(shape)
    blocks = -(-numel // blocksize) if blocksize > 0 else -1
    absmax_numel = math.prod(headers[f"{module}.weight.absmax"][1])
    if absmax_numel != blocks:
        problems.append(
            f"'{module}': weight.absmax has {absmax_numel} entries, shape {list(shape)} in blocks of {blocksize} "
            f"needs {blocks}"
        )
        return None
    weight_dtype, weight_shape = headers[f"{module}.weight"]
    itemsize = {"U8": 1, "I8": 1, "F16": 2, "BF16": 2, "F32": 4, "F64": 8}.get(weight_dtype, 0)
    packed_bytes = math.prod(weight_shape) * itemsize
    if not (0 <= packed_bytes - (numel + 1) // 2 < max(itemsize, 1)):
        problems.append(
            f"'{module}': weight has {packed_bytes} bytes ({weight_shape} x {weight_dtype}); a 4-bit "
            f"{list(shape)} tensor needs {(numel + 1) // 2}"
        )
        return None
    return QuantizedTensorInfo(quant_type, blocksize, shape, dtype, nested)


def inspect_int8_checkpoint(checkpoint_files: Iterable[str]) -> dict[str, tuple[int, int]]:
    """Check every 8-bit (LLM.int8) weight in `checkpoint_files` (.safetensors; other files are skipped) and
    return its shape [out_features, in_features] by module name (``"model.layers.0.mlp.down_proj"``).

    Reads only the safetensors headers and the small ``SCB`` and ``weight_format`` tensors (4 bytes per output
    row). Raises CheckpointError listing the problems, each naming its key: an ``SCB`` without its weight, an int8
    weight without its ``SCB``, an ``SCB`` that is not float32 with one entry per output row or holds negative,
    NaN or infinite values, a weight that is not a 2-D int8 tensor, a ``weight_format`` other than "row" (0).
    """
    from safetensors import safe_open

    headers: dict[str, tuple[str, list[int]]] = {}
    files: dict[str, str] = {}
    for path in checkpoint_files:
        path = os.fspath(path)
        if not path.endswith(".safetensors"):
            continue
        for key, entry in _read_safetensors_headers(path).items():
            headers[key] = entry
            files[key] = path

    problems: list[str] = []
    shapes: dict[str, tuple[int, int]] = {}
    modules = sorted(key.removesuffix(".SCB") for key in headers if key.endswith(".SCB"))
    for module in modules:
        weight_key, scb_key, format_key = f"{module}.weight", f"{module}.SCB", f"{module}.weight_format"
        if weight_key not in headers:
            problems.append(f"'{module}': has '{scb_key}' but no int8 weight '{weight_key}'")
            continue
        weight_dtype, weight_shape = headers[weight_key]
        if weight_dtype != "I8" or len(weight_shape) != 2:
            problems.append(
                f"'{module}': '{weight_key}' is {weight_shape} x {weight_dtype}; beside '{scb_key}' it must hold the "
                "2-D int8 (I8) codes"
            )
            continue
        scb_dtype, scb_shape = headers[scb_key]
        if scb_dtype != "F32" or math.prod(scb_shape) != weight_shape[0]:
            problems.append(
                f"'{module}': '{scb_key}' must be float32 with one entry per output row ({weight_shape[0]}), got "
                f"{scb_shape} x {scb_dtype}"
            )
            continue
        with safe_open(files[scb_key], framework="pt") as handle:
            row_absmax = handle.get_tensor(scb_key)
        if not bool((torch.isfinite(row_absmax) & (row_absmax >= 0)).all()):
            problems.append(f"'{module}': '{scb_key}' holds negative, NaN or infinite values (a corrupted row absmax)")
            continue
        if format_key in headers:
            with safe_open(files[format_key], framework="pt") as handle:
                weight_format = handle.get_tensor(format_key)
            if weight_format.numel() != 1 or weight_format.item() != _INT8_ROW_FORMAT:
                problems.append(
                    f"'{module}': '{format_key}' is {weight_format.tolist()}; only the row layout (0) is supported"
                )
                continue
        shapes[module] = (weight_shape[0], weight_shape[1])
    for key, (dtype, _) in headers.items():
        module = key.removesuffix(".weight").removesuffix(".weight_format")
        if module in modules or module == key:
            continue
        if key.endswith(".weight_format") or dtype == "I8":
            problems.append(f"'{module}': has '{key}' but no row absmax '{module}.SCB'")
    if problems:
        shown = "\n  ".join(problems[:8]) + (f"\n  ... and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise CheckpointError(f"the checkpoint's 8-bit weights are incomplete or corrupted:\n  {shown}")
    return shapes


def _linear_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or a transformers Conv1D (whose weight is [in, out])."""
    if isinstance(module, Conv1D):
        in_features, out_features = module.weight.shape
        return in_features, out_features
    return module.in_features, module.out_features


def _is_convertible(module: nn.Module) -> bool:
    return type(module) is nn.Linear or isinstance(module, Conv1D)


def _new_linear4bit(module: nn.Module, config: HalfbyteConfig, pre_quantized: bool) -> Linear4bit:
    """A Linear4bit shell on the meta device in place of `module` (nn.Linear or Conv1D)."""
    in_features, out_features = _linear_shape(module)
    with torch.device("meta"):
        layer = Linear4bit(
            in_features,
            out_features,
            bias=module.bias is not None,
            compute_dtype=config.bnb_4bit_compute_dtype,
            compress_statistics=config.bnb_4bit_use_double_quant,
            quant_type=config.bnb_4bit_quant_type,
            quant_storage=config.bnb_4bit_quant_storage,
        )
        if pre_quantized:
            # The meta weight gets the checkpoint's storage dtype, so no loader casts the packed bytes.
            layer.weight = Params4bit(
                torch.empty(out_features, in_features, dtype=config.bnb_4bit_quant_storage),
                requires_grad=False,
                compress_statistics=config.bnb_4bit_use_double_quant,
                quant_type=config.bnb_4bit_quant_type,
                quant_storage=config.bnb_4bit_quant_storage,
                module=layer,
            )
    layer.source_cls = type(module)
    layer.requires_grad_(False)
    return layer


def _new_linear8bit(module: nn.Module, config: HalfbyteConfig, pre_quantized: bool) -> Linear8bitLt:
    """A Linear8bitLt shell on the meta device in place of `module` (nn.Linear or Conv1D)."""
    in_features, out_features = _linear_shape(module)
    with torch.device("meta"):
        layer = Linear8bitLt(
            in_features,
            out_features,
            bias=module.bias is not None,
            has_fp16_weights=config.llm_int8_has_fp16_weight,
            threshold=config.llm_int8_threshold,
        )
        if pre_quantized:
            # An int8 meta weight, so that no loader casts the int8 codes of the checkpoint to the model's dtype.
            layer.weight = Int8Params(
                torch.empty(out_features, in_features, dtype=torch.int8), requires_grad=False, has_fp16_weights=False
            )
    layer.source_cls = type(module)
    layer.requires_grad_(False)
    return layer


def replace_with_halfbyte_linear(
    model: nn.Module,
    config: HalfbyteConfig,
    modules_to_not_convert: list[str] | None = None,
    pre_quantized: bool = False,
    only: set[str] | None = None,
) -> list[str]:
    """Replace the nn.Linear / Conv1D modules of a meta-device model skeleton by Linear4bit shells (Linear8bitLt
    with ``config.load_in_8bit``), in place.

    `modules_to_not_convert` uses transformers' matching (full path prefix, regex or suffix); `only`, when
    given, converts exactly those module names instead. Returns the names converted."""
    new_layer = _new_linear8bit if config.load_in_8bit else _new_linear4bit
    converted = []
    for name, module in list(model.named_modules()):
        if not name or not _is_convertible(module):
            continue
        if only is not None:
            if name not in only:
                continue
        elif not should_convert_module(name, modules_to_not_convert):
            continue
        model.set_submodule(name, new_layer(module, config, pre_quantized))
        converted.append(name)
    return converted


# ---- conversion operations of the transformers loader ---------------------------------------------------


def _first(value):
    return value[0] if isinstance(value, list) else value


def _quantize_into(
    module: Linear4bit | Linear8bitLt, value: torch.Tensor, config: HalfbyteConfig
) -> Params4bit | Int8Params:
    """`value` (a full-precision weight on its target device) quantized for `module`: packed 4-bit for a Linear4bit,
    int8 codes and row absmax for a Linear8bitLt (kept in 16 bits when the layer has ``has_fp16_weights``)."""
    if issubclass(getattr(module, "source_cls", nn.Linear), Conv1D):
        value = value.t()  # Conv1D stores [in, out]; the quantized formats are [out, in] (as bitsandbytes)
    if isinstance(module, Linear8bitLt):
        param = Int8Params(value.contiguous(), requires_grad=False, has_fp16_weights=module.state.has_fp16_weights)
        return param.to(value.device)  # quantized on the device unless has_fp16_weights
    param = Params4bit(
        value.contiguous(),
        requires_grad=False,
        blocksize=module.weight.blocksize,
        compress_statistics=config.bnb_4bit_use_double_quant,
        quant_type=config.bnb_4bit_quant_type,
        quant_storage=config.bnb_4bit_quant_storage,
        module=module,
    )
    return param.to(value.device)


class HalfbyteQuantize(ConversionOps):
    """Loader op: quantize one full-precision weight on its device as soon as it has been read."""

    def __init__(self, hf_quantizer: HalfbyteHfQuantizer):
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict: dict[str, Any], model: nn.Module | None = None, **kwargs) -> dict[str, Any]:
        result = {}
        for param_name, value in input_dict.items():
            module, _ = get_module_from_name(model, param_name)
            result[param_name] = _quantize_into(module, _first(value), self.hf_quantizer.quantization_config)
            module._is_hf_initialized = True
        return result


class HalfbyteDeserialize(ConversionOps):
    """Loader op: one 4-bit weight from its packed bytes and quant-state tensors, or one 8-bit weight from its int8
    codes and ``SCB``; bytes unchanged."""

    def __init__(self, hf_quantizer: HalfbyteHfQuantizer):
        self.hf_quantizer = hf_quantizer

    def convert(
        self, input_dict: dict[str, Any], model: nn.Module | None = None, full_layer_name: str | None = None, **kwargs
    ) -> dict[str, Any]:
        tensors = {key: _first(value) for key, value in input_dict.items()}
        module, _ = get_module_from_name(model, full_layer_name)
        if self.hf_quantizer.quantization_config.load_in_8bit:
            return self._int8_weight(tensors, module, full_layer_name)
        if "weight" not in tensors:
            raise CheckpointError(f"'{full_layer_name}': quant-state tensors {sorted(tensors)} without the weight")
        weight = tensors.pop("weight")
        if not tensors:  # a weight that is not quantized in the checkpoint
            if isinstance(module, Linear4bit):
                if not weight.is_floating_point():
                    raise CheckpointError(f"'{full_layer_name}': packed 4-bit bytes without their quant state")
                logger.info("halfbyte: %s is not quantized in the checkpoint; quantizing it now", full_layer_name)
                module._is_hf_initialized = True
                return {"weight": _quantize_into(module, weight, self.hf_quantizer.quantization_config)}
            return {"weight": weight}
        if not isinstance(module, Linear4bit):
            raise CheckpointError(
                f"'{full_layer_name}': the checkpoint holds a 4-bit weight for a {type(module).__name__} that the "
                "quantization config keeps unquantized"
            )
        try:
            param = Params4bit.from_prequantized(
                weight, tensors, requires_grad=False, device=weight.device, module=module
            )
        except ValueError as error:
            raise CheckpointError(f"'{full_layer_name}': {error}") from None
        expected = [module.out_features, module.in_features]
        if list(param.quant_state.shape) != expected:
            raise CheckpointError(
                f"'{full_layer_name}': the checkpoint's weight has shape {list(param.quant_state.shape)}, the model "
                f"expects {expected}"
            )
        module._is_hf_initialized = True
        return {"weight": param}

    def _int8_weight(self, tensors: dict[str, torch.Tensor], module: nn.Module, full_layer_name: str) -> dict:
        """The Int8Params of one layer from its checkpoint tensors ``weight`` (int8), ``SCB`` and ``weight_format``
        (bitsandbytes' keys beside the weight), checked: every error names the checkpoint key."""
        layer = full_layer_name.rpartition(".")[0]
        weight, SCB, weight_format = (tensors.pop(name, None) for name in ("weight", "SCB", "weight_format"))
        if weight is None:
            raise CheckpointError(f"'{layer}': has '{layer}.SCB' or '{layer}.weight_format' but no '{layer}.weight'")
        if SCB is None:
            if weight_format is not None or weight.dtype == torch.int8:
                raise CheckpointError(
                    f"'{layer}.weight' is an 8-bit weight but '{layer}.SCB' (its row absmax) is missing"
                )
            if isinstance(module, Linear8bitLt):  # a weight that is not quantized in the checkpoint
                logger.info("halfbyte: %s is not quantized in the checkpoint; quantizing it now", layer)
                module._is_hf_initialized = True
                return {"weight": _quantize_into(module, weight, self.hf_quantizer.quantization_config)}
            return {"weight": weight}
        if not isinstance(module, Linear8bitLt):
            raise CheckpointError(
                f"'{layer}': the checkpoint holds an 8-bit weight ('{layer}.SCB') for a {type(module).__name__} that "
                "the quantization config keeps unquantized"
            )
        if weight_format is not None and (weight_format.numel() != 1 or weight_format.item() != _INT8_ROW_FORMAT):
            raise CheckpointError(
                f"'{layer}.weight_format' is {weight_format.tolist()}; only the row layout (0) is supported"
            )
        expected = [module.out_features, module.in_features]
        if weight.dtype != torch.int8 or list(weight.shape) != expected:
            raise CheckpointError(
                f"'{layer}.weight' is {list(weight.shape)} x {weight.dtype}; the model expects int8 codes of shape "
                f"{expected} beside '{layer}.SCB'"
            )
        if SCB.dtype != torch.float32 or SCB.numel() != module.out_features:
            raise CheckpointError(
                f"'{layer}.SCB' must be float32 with {module.out_features} entries (one absmax per output row), got "
                f"{list(SCB.shape)} x {SCB.dtype}"
            )
        if not bool((torch.isfinite(SCB) & (SCB >= 0)).all()):
            raise CheckpointError(f"'{layer}.SCB' holds negative, NaN or infinite values (a corrupted row absmax)")
        module.state.has_fp16_weights = False
        module._is_hf_initialized = True
        return {"weight": Int8Params(weight, requires_grad=False, has_fp16_weights=False, SCB=SCB.reshape(-1))}


# ---- the quantizer ---------------------------------------------------------------------------------------


def memory_footprint(model: nn.Module, return_buffers: bool = True) -> int:
    """Bytes held by `model`'s parameters (and buffers), quant state included: the packed 4-bit bytes, every
    absmax, nested absmax, offset and code table; the int8 codes and the row absmax ``SCB`` of 8-bit weights.
    Storage shared between tensors (tied weights, the code tables all states share) is counted once."""
    seen: set[tuple[str, int, int]] = set()
    total = 0

    def count(tensor: torch.Tensor | None) -> None:
        nonlocal total
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            return
        size = tensor.numel() * tensor.element_size()
        key = (str(tensor.device), tensor.data_ptr(), size)
        if key not in seen:
            seen.add(key)
            total += size

    tensors = list(model.parameters()) + (list(model.buffers()) if return_buffers else [])
    for tensor in tensors:
        count(tensor)
        count(getattr(tensor, "SCB", None))  # an Int8Params' row absmax (its codes are the tensor itself)
        state = getattr(tensor, "quant_state", None)
        if state is not None:
            for part in (state.absmax, state.code, state.offset):
                count(part)
            if state.state2 is not None:
                count(state.state2.absmax)
                count(state.state2.code)
    return total


def _lacks_quantized_weight(module: nn.Module) -> bool:
    """True for a halfbyte layer whose weight is not (yet) in its quantized form: still on the meta device, or a
    float weight where the layer wants packed 4-bit bytes or int8 codes."""
    weight = getattr(module, "weight", None)
    if isinstance(module, Linear4bit):
        return not getattr(weight, "bnb_quantized", False)
    if isinstance(module, Linear8bitLt):
        if weight.device.type == "meta":
            return True
        return weight.dtype != torch.int8 and not module.state.has_fp16_weights
    return False


def _element_size(config: HalfbyteConfig, blocksize: int = 64) -> float:
    """Bytes per weight element of the 4-bit format, absmax included (for device-map planning)."""
    if config.bnb_4bit_use_double_quant:
        return 0.5 + 1 / blocksize + 4 / (blocksize * F.NESTED_BLOCKSIZE)
    return 0.5 + 4 / blocksize


class HalfbyteHfQuantizer(HfQuantizer):
    """transformers quantizer for halfbyte's 4-bit and 8-bit layers (see the module docstring)."""

    requires_calibration = False
    quantization_config: HalfbyteConfig

    @property
    def serialized_names(self) -> dict[str, list[str]]:
        """transformers 5.23: the serialized names of a quantized "weight" (4-bit or 8-bit per the config)."""
        names = INT8_SERIALIZED_NAMES if self.quantization_config.load_in_8bit else SERIALIZED_WEIGHT_NAMES
        return {"weight": list(names)}

    def __init__(self, quantization_config: HalfbyteConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.modules_to_not_convert: list[str] = []

    def _format_name(self) -> str:
        """The format's name for messages: 8-bit or 4-bit."""
        return "8-bit" if self.quantization_config.load_in_8bit else "4-bit"

    # -- environment and placement --

    def validate_environment(self, *args, **kwargs) -> None:
        config = self.quantization_config
        if not self.pre_quantized and not (config.load_in_4bit or config.load_in_8bit):
            raise ValueError(
                "HalfbyteConfig: load_in_4bit and load_in_8bit are both False, so there is nothing to quantize; pass "
                "load_in_4bit=True or load_in_8bit=True (a HalfbyteConfig() without them only loads checkpoints "
                "that are already quantized)"
            )
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and not config.llm_int8_enable_fp32_cpu_offload:
            places = {str(value) for value in device_map.values()}
            if "disk" in places or ("cpu" in places and places != {"cpu"}):
                raise ValueError(
                    f"halfbyte: the device_map puts modules on {sorted(places)}; {self._format_name()} layers cannot "
                    "be offloaded to the CPU or disk while others run on a GPU. Give the GPU more room (max_memory), "
                    "load the whole model on one device, or set HalfbyteConfig(llm_int8_enable_fp32_cpu_offload=True) "
                    "to keep the offloaded modules unquantized."
                )

    def update_device_map(self, device_map):
        if device_map is None:
            import halfbyte

            if torch.cuda.is_available() and halfbyte.build_info()["cuda"]:
                device_map = {"": torch.cuda.current_device()}
            else:
                device_map = {"": "cpu"}
            logger.info("halfbyte: no device_map given; loading onto %s", device_map[""])
        return device_map

    def adjust_max_memory(self, max_memory: dict[str, int | str]) -> dict[str, int | str]:
        # Room for the one full-precision weight that is being quantized.
        return {key: value * 0.90 for key, value in max_memory.items()}

    def param_needs_quantization(self, model: nn.Module, param_name: str, **kwargs) -> bool:
        module, name = get_module_from_name(model, param_name)
        return isinstance(module, QUANTIZED_LAYERS) and name == "weight"

    def param_element_size(self, model: nn.Module, param_name: str, param: torch.Tensor) -> float:
        if self.param_needs_quantization(model, param_name):
            module, _ = get_module_from_name(model, param_name)
            if isinstance(module, Linear8bitLt):
                if module.state.has_fp16_weights:
                    return param.element_size()
                return 1 + 4 / module.in_features  # the int8 code and its share of the row's float32 absmax
            return _element_size(self.quantization_config)
        return param.element_size()

    # -- model preparation --

    def _process_model_before_weight_loading(self, model, device_map=None, checkpoint_files=None, **kwargs):
        config = self.quantization_config
        skip = self.get_modules_to_not_convert(model, config.llm_int8_skip_modules, model._keep_in_fp32_modules)
        # A weight tied to the input embeddings is shared with them: it stays in 16 bits whatever the list says.
        tied = getattr(model, "all_tied_weights_keys", None) or {}
        skip += [key.removesuffix(".weight") for pair in tied.items() for key in pair]
        if config.llm_int8_enable_fp32_cpu_offload and isinstance(device_map, dict):
            skip += [name for name, place in device_map.items() if place in ("cpu", "disk")]
        self.modules_to_not_convert = sorted(set(skip))

        only = None
        if self.pre_quantized:
            only = self._modules_quantized_in_checkpoint(model, checkpoint_files)
        converted = replace_with_halfbyte_linear(model, config, self.modules_to_not_convert, self.pre_quantized, only)
        if not converted:
            raise ValueError(
                f"halfbyte: {type(model).__name__} has no nn.Linear (or Conv1D) layers to quantize outside "
                f"llm_int8_skip_modules={config.llm_int8_skip_modules}; this model type is not supported"
            )
        return model

    def _modules_quantized_in_checkpoint(self, model: nn.Module, checkpoint_files) -> set[str] | None:
        """Names of the model's Linear modules that the checkpoint holds 4-bit (8-bit with ``load_in_8bit``)
        weights for (None when the checkpoint's names cannot be matched to the model's, e.g. a model whose loading
        renames keys, or when an 8-bit checkpoint was saved with ``llm_int8_has_fp16_weight``: 16-bit weights)."""
        if not checkpoint_files:
            return None
        config = self.quantization_config
        safetensors_files = [f for f in checkpoint_files if os.fspath(f).endswith(".safetensors")]
        if config.load_in_8bit:
            shapes = inspect_int8_checkpoint(checkpoint_files)
            if safetensors_files and not shapes:
                if config.llm_int8_has_fp16_weight:
                    return None  # saved with 16-bit weights: they are loaded as the config says
                raise CheckpointError(
                    "config.json says the weights are bitsandbytes/halfbyte 8-bit (load_in_8bit), but the checkpoint "
                    "holds no '*.SCB' tensors (a full-precision checkpoint with a leftover quantization_config?)"
                )
        else:
            infos = inspect_quantized_checkpoint(checkpoint_files)
            if safetensors_files and not infos:
                raise CheckpointError(
                    "config.json says the weights are bitsandbytes/halfbyte 4-bit, but the checkpoint holds no "
                    "'*.weight.quant_state.bitsandbytes__<nf4|fp4>' tensors (a full-precision checkpoint with a "
                    "leftover quantization_config?)"
                )
            shapes = {name: tuple(info.shape) for name, info in infos.items()}
        linear = {name: module for name, module in model.named_modules() if _is_convertible(module)}
        prefix = getattr(model, "base_model_prefix", "")
        matched: set[str] = set()
        for name, shape in shapes.items():
            candidates = [name, f"{prefix}.{name}", name.removeprefix(f"{prefix}.")]
            found = next((c for c in candidates if c in linear), None)
            if found is None:
                return None  # renamed keys: fall back to the config's skip list
            in_features, out_features = _linear_shape(linear[found])
            if list(shape) != [out_features, in_features]:
                raise CheckpointError(
                    f"'{name}': the checkpoint's {self._format_name()} weight has shape {list(shape)}, the model's "
                    f"layer is [{out_features}, {in_features}] (a checkpoint of another model size?)"
                )
            matched.add(found)
        return matched

    def _process_model_after_weight_loading(self, model, **kwargs):
        unquantized = [name for name, module in model.named_modules() if _lacks_quantized_weight(module)]
        for name in unquantized:
            module = model.get_submodule(name)
            if module.weight.device.type == "meta":
                raise CheckpointError(f"'{name}.weight' was not loaded: the checkpoint lacks it")
            logger.warning("halfbyte: %s.weight was missing from the checkpoint; quantizing its initial values", name)
            module.weight = _quantize_into(module, module.weight.data, self.quantization_config)
        # The loader's record of conversions is replayed in reverse by save_pretrained; halfbyte's layers already
        # save bitsandbytes' keys, so its own load operations are left out of it.
        conversions = getattr(model, "_weight_conversions", None)
        if conversions:
            model._weight_conversions = [
                conversion
                for conversion in conversions
                if not any(isinstance(op, HalfbyteDeserialize) for op in getattr(conversion, "operations", ()))
            ]
        model.get_memory_footprint = functools.partial(memory_footprint, model)
        return model

    # -- loading pre-quantized weights --

    def get_load_operations(self) -> dict:
        return {"deserialize": HalfbyteDeserialize}

    def get_weight_conversions(self) -> list:
        if not self.pre_quantized:
            return []
        if self.quantization_config.load_in_8bit:
            names = list(INT8_SERIALIZED_NAMES)
        else:
            names = list(QUANT_STATE_SUFFIXES) + ["weight"]
        return [
            WeightConverter(
                source_patterns=names,
                target_patterns="weight",
                operations=[HalfbyteDeserialize(self)],
            )
        ]

    def get_quantize_ops(self) -> HalfbyteQuantize:
        return HalfbyteQuantize(self)

    # -- capabilities --

    def is_serializable(self, *args, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_compileable(self) -> bool:
        return True

    def _dequantize(self, model, dtype=None):
        """Replace every Linear4bit / Linear8bitLt by a full-precision nn.Linear (or Conv1D) holding its
        dequantized weight."""
        for name, module in list(model.named_modules()):
            if isinstance(module, Linear4bit):
                weight = F.dequantize_4bit(module.weight.data, module.weight.quant_state)
            elif isinstance(module, Linear8bitLt):
                weight = module.weight.data
                if weight.dtype == torch.int8:
                    weight = F.int8_vectorwise_dequant(weight, module.weight.SCB)
            else:
                continue
            weight = weight.to(dtype) if dtype is not None else weight
            if issubclass(getattr(module, "source_cls", nn.Linear), Conv1D):
                replacement = Conv1D(module.out_features, module.in_features)
                replacement.weight = nn.Parameter(weight.t().contiguous(), requires_grad=False)
            else:
                with torch.device("meta"):
                    replacement = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
                replacement.weight = nn.Parameter(weight, requires_grad=False)
            if module.bias is not None:
                replacement.bias = module.bias
            model.set_submodule(name, replacement)
        if hasattr(model, "get_memory_footprint") and "get_memory_footprint" in vars(model):
            del model.get_memory_footprint
        return model


# ---- loading bitsandbytes checkpoints through a HalfbyteConfig ------------------------------------------


def _bitsandbytes_saved_dict(quantization_config) -> dict | None:
    """The saved quantization_config as a dict when it is bitsandbytes' (4-bit or 8-bit), else None."""
    if isinstance(quantization_config, HalfbyteConfig):
        return quantization_config.to_dict()
    if not isinstance(quantization_config, dict):
        to_dict = getattr(quantization_config, "to_dict", None)
        quantization_config = to_dict() if callable(to_dict) else None
    if not isinstance(quantization_config, dict):
        return None
    method = quantization_config.get("quant_method")
    method = getattr(method, "value", method)
    load_in_8bit = quantization_config.get("load_in_8bit", quantization_config.get("_load_in_8bit", False))
    load_in_4bit = quantization_config.get("load_in_4bit", quantization_config.get("_load_in_4bit", False))
    if method not in (SAVED_QUANT_METHOD, QUANT_METHOD, None) or not (load_in_4bit or load_in_8bit):
        return None
    return quantization_config


# Fields that only change how the layers compute, not what the checkpoint stores: a value passed for them (other
# than the default) wins over the saved one.
RUNTIME_FIELDS = ("bnb_4bit_compute_dtype", "llm_int8_threshold")


def config_for_checkpoint(saved: dict, requested: HalfbyteConfig) -> HalfbyteConfig:
    """The HalfbyteConfig that loads a checkpoint saved with `saved` (a bitsandbytes/halfbyte
    quantization_config) when the caller passed `requested`: the saved format fields, and the requested
    ``RUNTIME_FIELDS`` (compute dtype, int8 threshold) where they are not the default."""
    config = HalfbyteConfig.from_dict(saved)
    default = HalfbyteConfig()
    for name in RUNTIME_FIELDS:
        if getattr(requested, name) != getattr(default, name):
            setattr(config, name, getattr(requested, name))
    config.post_init()
    ignored = [
        key
        for key, value in requested.to_dict().items()
        if key not in RUNTIME_FIELDS + ("_load_in_4bit", "_load_in_8bit")
        and value != default.to_dict()[key]
        and value != config.to_dict()[key]
    ]
    if ignored:
        logger.warning(
            "halfbyte: the checkpoint is already quantized; its own %s are used, not the ones passed", ignored
        )
    return config


def _merge_quantization_configs(cls, quantization_config, quantization_config_from_args):
    """AutoHfQuantizer.merge_quantization_configs, plus: a HalfbyteConfig passed for a bitsandbytes 4-bit or
    8-bit checkpoint loads it into halfbyte layers."""
    if isinstance(quantization_config_from_args, HalfbyteConfig):
        saved = _bitsandbytes_saved_dict(quantization_config)
        if saved is not None:
            return config_for_checkpoint(saved, quantization_config_from_args)
    return _original_merge.__func__(cls, quantization_config, quantization_config_from_args)


_original_merge = AutoHfQuantizer.merge_quantization_configs
if getattr(_original_merge, "_halfbyte_original", None) is not None:  # module reloaded: wrap the true original
    _original_merge = _original_merge._halfbyte_original


def register() -> None:
    """Register HalfbyteConfig and HalfbyteHfQuantizer with transformers under "halfbyte" (idempotent)."""
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not HalfbyteConfig:
        AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)  # an older copy of this module (reload)
        register_quantization_config(QUANT_METHOD)(HalfbyteConfig)
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not HalfbyteHfQuantizer:
        AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
        register_quantizer(QUANT_METHOD)(HalfbyteHfQuantizer)
    merge = classmethod(_merge_quantization_configs)
    merge.__func__._halfbyte_original = _original_merge
    AutoHfQuantizer.merge_quantization_configs = merge


register()
