"""HalfbyteConfig: the quantization config of a Hugging Face model loaded into halfbyte's 4-bit or 8-bit layers.

It carries the fields of transformers' ``BitsAndBytesConfig`` with the same names and defaults, so code and
configs written for bitsandbytes move over by changing the class name::

    model = AutoModelForCausalLM.from_pretrained(
        path,
        quantization_config=HalfbyteConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True,
        ),
        device_map="auto",
    )

or, for LLM.int8() (row-wise int8 weights in ``halfbyte.nn.Linear8bitLt``; ``llm_int8_threshold=0.0`` turns the
outlier decomposition off, the fastest setting)::

    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=HalfbyteConfig(load_in_8bit=True), dtype=torch.bfloat16, device_map="auto"
    )

What is saved is bitsandbytes' format: ``to_dict()`` (the ``quantization_config`` of config.json) is exactly
what ``BitsAndBytesConfig.to_dict()`` writes, ``"quant_method": "bitsandbytes"`` included, and the tensors are
bitsandbytes' (shared/COMPAT.md; 8-bit: ``weight`` int8, ``SCB``, ``weight_format``). A halfbyte checkpoint is
therefore a bitsandbytes checkpoint: the bitsandbytes loader reads it as it is, and any bitsandbytes 4-bit or
8-bit checkpoint (the Hub's "-bnb-4bit" / "-bnb-8bit" models) loads into halfbyte layers with
``from_pretrained(path, quantization_config=HalfbyteConfig())`` (see ``halfbyte.integrations.transformers``).

Differences from BitsAndBytesConfig, all of them errors where bitsandbytes would fail later or silently:
field values are checked (quant type, storage and compute dtypes halfbyte supports, a threshold that is a finite
number >= 0), an unknown keyword is a TypeError that names it, and an integer ``llm_int8_threshold`` is accepted
as a float. The config works without transformers installed (it is then a plain object); with transformers it is
a ``QuantizationConfigMixin``.
"""

from __future__ import annotations

import copy
import difflib
import json
import logging
import math
from typing import Any

import torch

try:  # the base transformers requires of a registered config; optional so halfbyte imports without it
    from transformers.utils.quantization_config import QuantizationConfigMixin as _ConfigBase
except ImportError:  # pragma: no cover - exercised only without transformers
    _ConfigBase = object

logger = logging.getLogger("halfbyte")

QUANT_METHOD = "halfbyte"
"""The method name registered with transformers (``AutoHfQuantizer`` dispatches a HalfbyteConfig on it)."""

SAVED_QUANT_METHOD = "bitsandbytes"
"""The ``quant_method`` written into config.json: halfbyte checkpoints are bitsandbytes checkpoints."""

QUANT_TYPES = ("fp4", "nf4")
COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
STORAGE_DTYPES = (torch.uint8, torch.float16, torch.bfloat16, torch.float32)

# (name, default) of every field, in BitsAndBytesConfig's order. None defaults of the two dtypes become
# float32 / uint8 as in BitsAndBytesConfig.
FIELDS: tuple[tuple[str, Any], ...] = (
    ("load_in_8bit", False),
    ("load_in_4bit", False),
    ("llm_int8_threshold", 6.0),
    ("llm_int8_skip_modules", None),
    ("llm_int8_enable_fp32_cpu_offload", False),
    ("llm_int8_has_fp16_weight", False),
    ("bnb_4bit_compute_dtype", None),
    ("bnb_4bit_quant_type", "fp4"),
    ("bnb_4bit_use_double_quant", False),
    ("bnb_4bit_quant_storage", None),
)
FIELD_NAMES = tuple(name for name, _ in FIELDS)
# Keys of a saved quantization_config that are not constructor fields and carry nothing new.
_DERIVED_KEYS = ("quant_method", "_load_in_4bit", "_load_in_8bit")


def _dtype_field(name: str, value: Any, default: torch.dtype, allowed: tuple[torch.dtype, ...]) -> torch.dtype:
    """A torch dtype from a dtype, its name ("bfloat16", "torch.bfloat16") or None (the default)."""
    if value is None:
        return default
    dtype = value
    if isinstance(value, str):
        dtype = getattr(torch, value.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"HalfbyteConfig: {name} must be a torch.dtype or its name, got {value!r}")
    if dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise ValueError(f"HalfbyteConfig: {name} must be one of {names}, got {str(dtype).removeprefix('torch.')}")
    return dtype


def _bool_field(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"HalfbyteConfig: {name} must be True or False, got {value!r}")
    return value


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class HalfbyteConfig(_ConfigBase):
    """Quantization config for halfbyte's 4-bit and 8-bit layers, field for field transformers' BitsAndBytesConfig.

    Args:
        load_in_4bit: replace the Linear layers by halfbyte 4-bit layers (NF4/FP4). Default False, as in
            BitsAndBytesConfig; set it to quantize a full-precision checkpoint.
        load_in_8bit: replace the Linear layers by halfbyte ``Linear8bitLt`` layers (LLM.int8: int8 weights with
            one float32 absmax per output row, ``SCB``). Exclusive with load_in_4bit.
        llm_int8_threshold: LLM.int8() outlier threshold (6.0, as bitsandbytes): input columns holding a value
            with ``|x| >= threshold`` go through a 16-bit path. 0.0 turns that off (fastest); unused by 4-bit
            layers.
        llm_int8_skip_modules: module names kept in full precision. None (default): the model's output
            layer (lm_head), tied weights and ``_keep_in_fp32_modules``, as bitsandbytes. An explicit list
            replaces those defaults: ``[]`` quantizes every Linear, lm_head included (a lm_head tied to the
            input embeddings always stays in 16 bits). Names match a module's full path, a regex, or a suffix.
        llm_int8_enable_fp32_cpu_offload: modules a device_map puts on "cpu" or "disk" stay unquantized.
        llm_int8_has_fp16_weight: LLM.int8() training flag: the 8-bit layers keep their weights in 16 bits and
            quantize them at each forward (no memory saved); unused by 4-bit layers.
        bnb_4bit_compute_dtype: dtype the 4-bit layers compute in (float32 by default, as bitsandbytes;
            pass torch.bfloat16 for speed on a GPU).
        bnb_4bit_quant_type: "fp4" (default, as bitsandbytes) or "nf4".
        bnb_4bit_use_double_quant: quantize the absmax too (about 0.37 fewer bits per parameter).
        bnb_4bit_quant_storage: dtype of the packed weight tensors (uint8 by default; FSDP wants the compute
            dtype).
    """

    def __init__(
        self,
        load_in_8bit: bool = False,
        load_in_4bit: bool = False,
        llm_int8_threshold: float = 6.0,
        llm_int8_skip_modules: list[str] | None = None,
        llm_int8_enable_fp32_cpu_offload: bool = False,
        llm_int8_has_fp16_weight: bool = False,
        bnb_4bit_compute_dtype: torch.dtype | str | None = None,
        bnb_4bit_quant_type: str = "fp4",
        bnb_4bit_use_double_quant: bool = False,
        bnb_4bit_quant_storage: torch.dtype | str | None = None,
        **kwargs,
    ):
        unknown = [key for key in kwargs if key not in _DERIVED_KEYS]
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(key, FIELD_NAMES, n=1)
                hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise TypeError(
                f"HalfbyteConfig: unknown argument(s) {', '.join(hints)}; the fields are {list(FIELD_NAMES)}"
            )
        self.quant_method = QUANT_METHOD
        _bool_field("load_in_4bit", load_in_4bit)
        _bool_field("load_in_8bit", load_in_8bit)
        if load_in_4bit and load_in_8bit:
            raise ValueError(
                "HalfbyteConfig: load_in_4bit and load_in_8bit are both True, but only one can be used at a time"
            )
        self._load_in_8bit = load_in_8bit
        self._load_in_4bit = load_in_4bit
        self.llm_int8_threshold = llm_int8_threshold
        self.llm_int8_skip_modules = llm_int8_skip_modules
        self.llm_int8_enable_fp32_cpu_offload = llm_int8_enable_fp32_cpu_offload
        self.llm_int8_has_fp16_weight = llm_int8_has_fp16_weight
        self.bnb_4bit_quant_type = bnb_4bit_quant_type
        self.bnb_4bit_use_double_quant = bnb_4bit_use_double_quant
        self.bnb_4bit_compute_dtype = _dtype_field(
            "bnb_4bit_compute_dtype", bnb_4bit_compute_dtype, torch.float32, COMPUTE_DTYPES
        )
        self.bnb_4bit_quant_storage = _dtype_field(
            "bnb_4bit_quant_storage", bnb_4bit_quant_storage, torch.uint8, STORAGE_DTYPES
        )
        self.post_init()

    # ---- load_in_4bit / load_in_8bit: properties that keep the two exclusive, as BitsAndBytesConfig ----------

    @property
    def load_in_4bit(self) -> bool:
        return self._load_in_4bit

    @load_in_4bit.setter
    def load_in_4bit(self, value: bool) -> None:
        _bool_field("load_in_4bit", value)
        if value and self.load_in_8bit:
            raise ValueError("HalfbyteConfig: load_in_4bit cannot be True while load_in_8bit is True")
        self._load_in_4bit = value

    @property
    def load_in_8bit(self) -> bool:
        return self._load_in_8bit

    @load_in_8bit.setter
    def load_in_8bit(self, value: bool) -> None:
        _bool_field("load_in_8bit", value)
        if value and self.load_in_4bit:
            raise ValueError("HalfbyteConfig: load_in_8bit cannot be True while load_in_4bit is True")
        self._load_in_8bit = value

    def post_init(self) -> None:
        """Check every field (also after attributes were set directly); errors name the field."""
        for name in ("llm_int8_enable_fp32_cpu_offload", "llm_int8_has_fp16_weight", "bnb_4bit_use_double_quant"):
            _bool_field(name, getattr(self, name))
        threshold = self.llm_int8_threshold
        if isinstance(threshold, bool) or not isinstance(threshold, int | float):
            raise TypeError(f"HalfbyteConfig: llm_int8_threshold must be a float, got {threshold!r}")
        if not math.isfinite(threshold) or threshold < 0:
            raise ValueError(
                f"HalfbyteConfig: llm_int8_threshold must be a finite number >= 0 (0 disables the outlier path), "
                f"got {threshold!r}"
            )
        self.llm_int8_threshold = float(threshold)
        skip = self.llm_int8_skip_modules
        if skip is not None:
            if isinstance(skip, str) or not isinstance(skip, list | tuple):
                raise TypeError(
                    f"HalfbyteConfig: llm_int8_skip_modules must be a list of module names or None, got {skip!r}"
                )
            if not all(isinstance(name, str) and name for name in skip):
                raise TypeError(f"HalfbyteConfig: llm_int8_skip_modules must hold non-empty strings, got {skip!r}")
            self.llm_int8_skip_modules = list(skip)
        if not isinstance(self.bnb_4bit_quant_type, str) or self.bnb_4bit_quant_type not in QUANT_TYPES:
            raise ValueError(
                f"HalfbyteConfig: bnb_4bit_quant_type must be 'nf4' or 'fp4', got {self.bnb_4bit_quant_type!r}"
            )
        self.bnb_4bit_compute_dtype = _dtype_field(
            "bnb_4bit_compute_dtype", self.bnb_4bit_compute_dtype, torch.float32, COMPUTE_DTYPES
        )
        self.bnb_4bit_quant_storage = _dtype_field(
            "bnb_4bit_quant_storage", self.bnb_4bit_quant_storage, torch.uint8, STORAGE_DTYPES
        )

    # ---- what BitsAndBytesConfig answers ------------------------------------------------------------------

    def is_quantizable(self) -> bool:
        return self.load_in_8bit or self.load_in_4bit

    def quantization_method(self) -> str | None:
        """'llm_int8', 'fp4', 'nf4', or None when neither load_in_4bit nor load_in_8bit is set."""
        if self.load_in_8bit:
            return "llm_int8"
        if self.load_in_4bit:
            return self.bnb_4bit_quant_type
        return None

    # ---- serialization: bitsandbytes' quantization_config --------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The ``quantization_config`` of config.json: exactly BitsAndBytesConfig's dict (``"quant_method":
        "bitsandbytes"``), so that the bitsandbytes loader reads halfbyte checkpoints."""
        return {
            "quant_method": SAVED_QUANT_METHOD,
            "_load_in_8bit": self.load_in_8bit,
            "_load_in_4bit": self.load_in_4bit,
            "llm_int8_threshold": self.llm_int8_threshold,
            "llm_int8_skip_modules": copy.deepcopy(self.llm_int8_skip_modules),
            "llm_int8_enable_fp32_cpu_offload": self.llm_int8_enable_fp32_cpu_offload,
            "llm_int8_has_fp16_weight": self.llm_int8_has_fp16_weight,
            "bnb_4bit_quant_type": self.bnb_4bit_quant_type,
            "bnb_4bit_use_double_quant": self.bnb_4bit_use_double_quant,
            "bnb_4bit_compute_dtype": _dtype_name(self.bnb_4bit_compute_dtype),
            "bnb_4bit_quant_storage": _dtype_name(self.bnb_4bit_quant_storage),
            "load_in_4bit": self.load_in_4bit,
            "load_in_8bit": self.load_in_8bit,
        }

    def to_diff_dict(self) -> dict[str, Any]:
        """The entries of ``to_dict()`` that differ from a default config."""
        default = HalfbyteConfig().to_dict()
        return {key: value for key, value in self.to_dict().items() if value != default.get(key)}

    def to_json_string(self, use_diff: bool = True) -> str:
        return json.dumps(self.to_diff_dict() if use_diff else self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, json_file_path) -> None:
        with open(json_file_path, "w", encoding="utf-8") as writer:
            writer.write(self.to_json_string(use_diff=False))

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs):
        """A config from a ``quantization_config`` dict: halfbyte's or bitsandbytes' (the same format).

        ``quant_method`` must be "bitsandbytes" or "halfbyte" when present; keys that are not fields are
        ignored with a warning (a newer bitsandbytes may write more), while `kwargs` naming fields override
        the dict (transformers' convention)."""
        if not isinstance(config_dict, dict):
            raise TypeError(f"HalfbyteConfig.from_dict: config_dict must be a dict, got {type(config_dict).__name__}")
        method = config_dict.get("quant_method", SAVED_QUANT_METHOD)
        method = getattr(method, "value", method)
        if method not in (SAVED_QUANT_METHOD, QUANT_METHOD):
            raise ValueError(
                f"HalfbyteConfig.from_dict: quant_method must be 'bitsandbytes' or 'halfbyte', got {method!r} "
                "(a checkpoint quantized with another method cannot load into halfbyte layers)"
            )
        fields = {key: value for key, value in config_dict.items() if key in FIELD_NAMES}
        ignored = sorted(set(config_dict) - set(FIELD_NAMES) - set(_DERIVED_KEYS))
        if ignored:
            logger.warning("HalfbyteConfig.from_dict: ignoring keys that are not fields: %s", ignored)
        for private, public in (("_load_in_4bit", "load_in_4bit"), ("_load_in_8bit", "load_in_8bit")):
            if public not in fields and private in config_dict:
                fields[public] = config_dict[private]
        overrides = {key: value for key, value in kwargs.items() if key in FIELD_NAMES}
        config = cls(**(fields | overrides))
        unused = {key: value for key, value in kwargs.items() if key not in FIELD_NAMES}
        return (config, unused) if return_unused_kwargs else config

    def update(self, **kwargs) -> dict[str, Any]:
        """Set the fields named in `kwargs`, all or none (a bad value raises and changes nothing); returns the
        entries that are not fields."""
        fields = {name: getattr(self, name) for name in FIELD_NAMES}
        checked = HalfbyteConfig(**(fields | {key: value for key, value in kwargs.items() if key in FIELD_NAMES}))
        self.__dict__.update(checked.__dict__)
        return {key: value for key, value in kwargs.items() if key not in FIELD_NAMES}

    def __iter__(self):
        yield from self.to_dict().items()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, HalfbyteConfig):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None  # mutable

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string(use_diff=False)}"
