"""Hugging Face transformers integration: ``from_pretrained(..., quantization_config=HalfbyteConfig(...))``.

``register()`` (run when halfbyte is imported with transformers installed) registers ``HalfbyteConfig`` and
``HalfbyteHfQuantizer`` under the method name "halfbyte". Then:

- **Quantize while loading** a full-precision checkpoint: the Linear layers of the model skeleton become
  halfbyte ``Linear4bit`` shells on the meta device, and each weight is quantized on its device right after it is
  read, before the next one is read (transformers loads synchronously when it quantizes), so peak memory is the
  final footprint plus one full-precision weight. transformers' "Loading weights" bar shows the progress.
- **Load a pre-quantized checkpoint** (saved by halfbyte or by bitsandbytes: the same tensors and keys) without
  re-quantizing: the packed bytes and the quant state are used as they are, bit for bit. The quant state of
  every layer is checked before any weight is read, so a missing or corrupted one is a clear error.
- **Save**: ``save_pretrained`` writes bitsandbytes' keys and bytes, and config.json says
  ``"quant_method": "bitsandbytes"``, so bitsandbytes loads halfbyte checkpoints as its own.
- **Load a bitsandbytes checkpoint into halfbyte layers** (the documented call): pass a HalfbyteConfig::

      model = AutoModelForCausalLM.from_pretrained("some/llama-bnb-4bit", quantization_config=HalfbyteConfig())

  transformers alone would refuse a HalfbyteConfig for a checkpoint whose config.json names bitsandbytes;
  ``register()`` teaches ``AutoHfQuantizer.merge_quantization_configs`` this one case (a HalfbyteConfig passed
  for a bitsandbytes 4-bit checkpoint) and leaves every other case to transformers. The checkpoint's format
  fields win (they describe the stored tensors); a ``bnb_4bit_compute_dtype`` you pass wins over the saved one.

lm_head (and any weight tied to the input embeddings) stays in 16 bits by default, as with bitsandbytes;
``HalfbyteConfig(llm_int8_skip_modules=[])`` quantizes every Linear including an untied lm_head. Generation
with a static cache and torch.compile works (the quantizer reports itself compileable), and
``model.get_memory_footprint()`` counts the quant state too (absmax, code tables), not only the packed bytes.

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


class CheckpointError(ValueError):
    """A pre-quantized checkpoint whose 4-bit quant state is missing, corrupted, or does not fit the model."""


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


def replace_with_halfbyte_linear(
    model: nn.Module,
    config: HalfbyteConfig,
    modules_to_not_convert: list[str] | None = None,
    pre_quantized: bool = False,
    only: set[str] | None = None,
) -> list[str]:
    """Replace the nn.Linear / Conv1D modules of a meta-device model skeleton by Linear4bit shells, in place.

    `modules_to_not_convert` uses transformers' matching (full path prefix, regex or suffix); `only`, when
    given, converts exactly those module names instead. Returns the names converted."""
    converted = []
    for name, module in list(model.named_modules()):
        if not name or not _is_convertible(module):
            continue
        if only is not None:
            if name not in only:
                continue
        elif not should_convert_module(name, modules_to_not_convert):
            continue
        model.set_submodule(name, _new_linear4bit(module, config, pre_quantized))
        converted.append(name)
    return converted


# ---- conversion operations of the transformers loader ---------------------------------------------------


def _first(value):
    return value[0] if isinstance(value, list) else value


def _quantize_into(module: Linear4bit, value: torch.Tensor, config: HalfbyteConfig) -> Params4bit:
    """`value` (a full-precision weight on its target device) quantized for `module`."""
    if issubclass(getattr(module, "source_cls", nn.Linear), Conv1D):
        value = value.t()  # Conv1D stores [in, out]; the 4-bit format is [out, in] (bitsandbytes does the same)
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
    """Loader op: one 4-bit weight from its packed bytes and quant-state tensors, bytes unchanged."""

    def __init__(self, hf_quantizer: HalfbyteHfQuantizer):
        self.hf_quantizer = hf_quantizer

    def convert(
        self, input_dict: dict[str, Any], model: nn.Module | None = None, full_layer_name: str | None = None, **kwargs
    ) -> dict[str, Any]:
        tensors = {key: _first(value) for key, value in input_dict.items()}
        module, _ = get_module_from_name(model, full_layer_name)
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


# ---- the quantizer ---------------------------------------------------------------------------------------


def memory_footprint(model: nn.Module, return_buffers: bool = True) -> int:
    """Bytes held by `model`'s parameters (and buffers), quant state included: the packed 4-bit bytes, every
    absmax, nested absmax, offset and code table. Storage shared between tensors (tied weights, the code
    tables all states share) is counted once."""
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
        state = getattr(tensor, "quant_state", None)
        if state is not None:
            for part in (state.absmax, state.code, state.offset):
                count(part)
            if state.state2 is not None:
                count(state.state2.absmax)
                count(state.state2.code)
    return total


def _element_size(config: HalfbyteConfig, blocksize: int = 64) -> float:
    """Bytes per weight element of the 4-bit format, absmax included (for device-map planning)."""
    if config.bnb_4bit_use_double_quant:
        return 0.5 + 1 / blocksize + 4 / (blocksize * F.NESTED_BLOCKSIZE)
    return 0.5 + 4 / blocksize


class HalfbyteHfQuantizer(HfQuantizer):
    """transformers quantizer for halfbyte's 4-bit layers (see the module docstring)."""

    requires_calibration = False
    quantization_config: HalfbyteConfig

    # transformers 5.23: the serialized names of a quantized "weight", and the op that loads them.
    serialized_names = {"weight": list(SERIALIZED_WEIGHT_NAMES)}

    def __init__(self, quantization_config: HalfbyteConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.modules_to_not_convert: list[str] = []

    # -- environment and placement --

    def validate_environment(self, *args, **kwargs) -> None:
        config = self.quantization_config
        if config.load_in_8bit:
            raise NotImplementedError(
                "HalfbyteConfig(load_in_8bit=True): halfbyte has no 8-bit (LLM.int8) layers yet; use load_in_4bit=True"
            )
        if not self.pre_quantized and not config.load_in_4bit:
            raise ValueError(
                "HalfbyteConfig: load_in_4bit is False, so there is nothing to quantize; pass load_in_4bit=True "
                "(a HalfbyteConfig() without it only loads checkpoints that are already 4-bit)"
            )
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and not config.llm_int8_enable_fp32_cpu_offload:
            places = {str(value) for value in device_map.values()}
            if "disk" in places or ("cpu" in places and places != {"cpu"}):
                raise ValueError(
                    f"halfbyte: the device_map puts modules on {sorted(places)}; 4-bit layers cannot be offloaded to "
                    "the CPU or disk while others run on a GPU. Give the GPU more room (max_memory), load the whole "
                    "model on one device, or set HalfbyteConfig(llm_int8_enable_fp32_cpu_offload=True) to keep the "
                    "offloaded modules unquantized."
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
        return isinstance(module, Linear4bit) and name == "weight"

    def param_element_size(self, model: nn.Module, param_name: str, param: torch.Tensor) -> float:
        if self.param_needs_quantization(model, param_name):
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
        """Names of the model's Linear modules that the checkpoint holds 4-bit weights for (None when the
        checkpoint's names cannot be matched to the model's, e.g. a model whose loading renames keys)."""
        if not checkpoint_files:
            return None
        infos = inspect_quantized_checkpoint(checkpoint_files)
        safetensors_files = [f for f in checkpoint_files if os.fspath(f).endswith(".safetensors")]
        if safetensors_files and not infos:
            raise CheckpointError(
                "config.json says the weights are bitsandbytes/halfbyte 4-bit, but the checkpoint holds no "
                "'*.weight.quant_state.bitsandbytes__<nf4|fp4>' tensors (a full-precision checkpoint with a "
                "leftover quantization_config?)"
            )
        linear = {name: module for name, module in model.named_modules() if _is_convertible(module)}
        prefix = getattr(model, "base_model_prefix", "")
        matched: set[str] = set()
        for name in infos:
            candidates = [name, f"{prefix}.{name}", name.removeprefix(f"{prefix}.")]
            found = next((c for c in candidates if c in linear), None)
            if found is None:
                return None  # renamed keys: fall back to the config's skip list
            in_features, out_features = _linear_shape(linear[found])
            if list(infos[name].shape) != [out_features, in_features]:
                raise CheckpointError(
                    f"'{name}': the checkpoint's 4-bit weight has shape {list(infos[name].shape)}, the model's layer "
                    f"is [{out_features}, {in_features}] (a checkpoint of another model size?)"
                )
            matched.add(found)
        return matched

    def _process_model_after_weight_loading(self, model, **kwargs):
        unquantized = [
            name
            for name, module in model.named_modules()
            if isinstance(module, Linear4bit) and not getattr(module.weight, "bnb_quantized", False)
        ]
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
        return [
            WeightConverter(
                source_patterns=list(QUANT_STATE_SUFFIXES) + ["weight"],
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
        """Replace every Linear4bit by a full-precision nn.Linear (or Conv1D) holding its dequantized weight."""
        for name, module in list(model.named_modules()):
            if not isinstance(module, Linear4bit):
                continue
            weight = F.dequantize_4bit(module.weight.data, module.weight.quant_state)
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


def _bitsandbytes_4bit_dict(quantization_config) -> dict | None:
    """The saved quantization_config as a dict when it is bitsandbytes' (4-bit), else None."""
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
    if load_in_8bit:
        raise ValueError(
            "halfbyte: this checkpoint is bitsandbytes LLM.int8 (load_in_8bit); halfbyte loads 4-bit checkpoints only"
        )
    return quantization_config


def config_for_checkpoint(saved: dict, requested: HalfbyteConfig) -> HalfbyteConfig:
    """The HalfbyteConfig that loads a checkpoint saved with `saved` (a bitsandbytes/halfbyte
    quantization_config) when the caller passed `requested`: the saved format fields, the requested compute
    dtype when it is not the default."""
    config = HalfbyteConfig.from_dict(saved)
    default = HalfbyteConfig()
    if requested.bnb_4bit_compute_dtype != default.bnb_4bit_compute_dtype:
        config.bnb_4bit_compute_dtype = requested.bnb_4bit_compute_dtype
    ignored = [
        key
        for key, value in requested.to_dict().items()
        if key not in ("bnb_4bit_compute_dtype", "_load_in_4bit", "load_in_4bit")
        and value != default.to_dict()[key]
        and value != config.to_dict()[key]
    ]
    if ignored:
        logger.warning(
            "halfbyte: the checkpoint is already quantized; its own %s are used, not the ones passed", ignored
        )
    return config


def _merge_quantization_configs(cls, quantization_config, quantization_config_from_args):
    """AutoHfQuantizer.merge_quantization_configs, plus: a HalfbyteConfig passed for a bitsandbytes 4-bit
    checkpoint loads it into halfbyte layers."""
    if isinstance(quantization_config_from_args, HalfbyteConfig):
        saved = _bitsandbytes_4bit_dict(quantization_config)
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
