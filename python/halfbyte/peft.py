"""QLoRA with peft on halfbyte's 4-bit layers.

peft knows bitsandbytes' Linear4bit by class, not halfbyte's, so LoRA on a halfbyte model goes through peft's
custom-module registration: ``LoraLinear4bit`` is peft's own dense LoRA layer (forward: frozen 4-bit base plus
the float adapter) with merging and unmerging done the 4-bit way (dequantize, add the adapter's delta,
quantize again into a new 4-bit weight in the same format). Use:

    from peft import LoraConfig
    import halfbyte.peft

    model = halfbyte.replace_linear(model, quant_type="nf4", compute_dtype=torch.bfloat16)  # or HalfbyteConfig
    model = halfbyte.peft.prepare_model_for_kbit_training(model)  # peft's, with gradient checkpointing
    model = halfbyte.peft.get_peft_model(model, LoraConfig(r=16, target_modules="all-linear"))
    ...train...
    model.save_pretrained("adapter")
    # later, on a freshly quantized base:
    model = halfbyte.peft.load_adapter(base, "adapter")
    merged = model.merge_and_unload()  # 4-bit layers holding base + adapter

``register(config)`` adds the mapping to a LoraConfig you pass to peft yourself. DoRA is not supported on
halfbyte layers (a clear error).
"""

from __future__ import annotations

import warnings

import peft
import torch
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from peft.tuners.tuners_utils import check_adapters_to_merge

from . import functional as F
from .nn.linear4bit import Linear4bit
from .nn.params4bit import requantized

__all__ = ["LoraLinear4bit", "get_peft_model", "load_adapter", "prepare_model_for_kbit_training", "register"]


class LoraLinear4bit(PeftLoraLinear):
    """peft's LoRA Linear around a halfbyte Linear4bit; merge/unmerge re-quantize the 4-bit base weight."""

    def __init__(self, base_layer, adapter_name, *args, config=None, **kwargs):
        if config is not None and getattr(config, "use_dora", False):
            raise ValueError("halfbyte.peft: DoRA (use_dora=True) is not supported on halfbyte 4-bit layers")
        if config is not None:
            kwargs["config"] = config
        super().__init__(base_layer, adapter_name, *args, **kwargs)

    def _dequantized_base(self) -> torch.Tensor:
        weight = self.get_base_layer().weight
        return F.dequantize_4bit(weight.data, weight.quant_state).float()

    def _replace_base_weight(self, values: torch.Tensor) -> None:
        base = self.get_base_layer()
        base.weight = requantized(base.weight, values.to(base.weight.quant_state.dtype))

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the active adapters into the 4-bit weight (dequantize, add, quantize: rounding changes outputs a
        little, as with bitsandbytes)."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        for adapter in adapter_names:
            if adapter not in self.lora_A:
                continue
            warnings.warn(
                "halfbyte.peft: merging LoRA into a 4-bit weight re-quantizes it (rounding error)", stacklevel=2
            )
            merged = self._dequantized_base() + self.get_delta_weight(adapter).float()
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"halfbyte.peft: NaN/inf in the merged weight; adapter {adapter!r} seems broken")
            self._replace_base_weight(merged)
            if self.lora_bias[adapter]:
                base = self.get_base_layer()
                base.bias.data = base.bias.data + self.lora_B[adapter].bias.to(base.bias.dtype)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Subtract merged adapters again (re-quantizes; not an exact inverse)."""
        if not self.merged:
            warnings.warn("halfbyte.peft: already unmerged, nothing to do", stacklevel=2)
            return
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter not in self.lora_A:
                continue
            self._replace_base_weight(self._dequantized_base() - self.get_delta_weight(adapter).float())
            if self.lora_bias[adapter]:
                base = self.get_base_layer()
                base.bias.data = base.bias.data - self.lora_B[adapter].bias.to(base.bias.dtype)


def prepare_model_for_kbit_training(model: torch.nn.Module, use_gradient_checkpointing: bool = True, **kwargs):
    """peft's ``prepare_model_for_kbit_training`` for a model with halfbyte 4-bit layers: freezes the base,
    upcasts the remaining 16-bit parameters to float32 (never the packed 4-bit weights) and enables gradient
    checkpointing.

    peft turns checkpointing on only for models marked ``is_loaded_in_4bit``, a flag halfbyte does not leave
    on the model (transformers imports bitsandbytes whenever it sees it), so it is set for this call only."""
    marked = "is_loaded_in_4bit" in vars(model)
    previous = getattr(model, "is_loaded_in_4bit", None)
    model.is_loaded_in_4bit = True
    try:
        return peft.prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=use_gradient_checkpointing, **kwargs
        )
    finally:
        if marked:
            model.is_loaded_in_4bit = previous
        else:
            del model.is_loaded_in_4bit


def register(config: peft.LoraConfig) -> peft.LoraConfig:
    """Let `config` put LoraLinear4bit on halfbyte Linear4bit layers; returns the config."""
    if not isinstance(config, peft.LoraConfig):
        raise TypeError(f"halfbyte.peft.register: expected a peft.LoraConfig, got {type(config).__name__}")
    config._register_custom_module({Linear4bit: LoraLinear4bit})
    return config


def get_peft_model(model: torch.nn.Module, config: peft.LoraConfig, **kwargs) -> peft.PeftModel:
    """``peft.get_peft_model`` with halfbyte's 4-bit layers registered in `config`."""
    return peft.get_peft_model(model, register(config), **kwargs)


def load_adapter(model: torch.nn.Module, path, adapter_name: str = "default", is_trainable: bool = False, **kwargs):
    """``peft.PeftModel.from_pretrained`` for a model with halfbyte 4-bit layers (the saved LoraConfig does not
    carry the custom-module mapping, so it is added here)."""
    config = peft.LoraConfig.from_pretrained(path)
    return peft.PeftModel.from_pretrained(
        model, path, adapter_name=adapter_name, is_trainable=is_trainable, config=register(config), **kwargs
    )
