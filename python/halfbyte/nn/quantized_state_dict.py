"""State-dict saving and loading for modules whose ``weight`` is a Params4bit (Linear4bit, Embedding4bit).

Saving writes bitsandbytes' keys and bytes: ``weight`` (the packed bytes), then the QuantState packed as
tensors under ``weight.`` (``absmax``, ``quant_map``, ``nested_absmax``, ``nested_quant_map``,
``quant_state.bitsandbytes__<nf4|fp4>``; shared/COMPAT.md). Loading accepts three kinds of dict:

- a quantized one (those keys): the weight is replaced by a quantized Params4bit built from it, on the device
  of the module's weight (or, for a meta-device module, the device of the loaded tensors), bytes unchanged.
  bitsandbytes cannot do this (its Linear4bit reports the quant-state keys as unexpected);
- a float weight into an unquantized module: the usual copy, quantized later by ``.to(device)``;
- a float weight into a quantized module: quantized in the module's format on the module's device.

A truncated or inconsistent quantized dict is an error that names the missing or wrong key.
"""

from __future__ import annotations

import torch

from ..quant_state import QuantState
from .params4bit import Params4bit, check_packed_matches_state, requantized

_NESTED_KEYS = ("nested_absmax", "nested_quant_map")


def load_target_device(weight: torch.Tensor, incoming: torch.Tensor) -> torch.device:
    """Where a loaded quantized weight goes: the module weight's device, or for a meta-device module (built
    empty, to be filled from a checkpoint) the device of the loaded tensor."""
    return incoming.device if weight.device.type == "meta" else weight.device


class QuantizedWeightStateDict:
    """Mixin for an nn.Module with a ``weight`` Params4bit; put it before the torch module class."""

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)  # weight (packed bytes) and bias
        state = getattr(self.weight, "quant_state", None)
        if state is not None:
            for key, value in state.as_dict(packed=True).items():
                destination[prefix + "weight." + key] = value if keep_vars else value.detach()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        weight_key = prefix + "weight"
        state_keys = [k for k in state_dict if k.startswith(weight_key + ".")]
        rest = {k: v for k, v in state_dict.items() if k not in state_keys}
        handled = weight_key in state_dict  # loaded here, or its error reported here
        if state_keys:
            self._load_quantized_weight(weight_key, state_dict, state_keys, error_msgs)
            rest.pop(weight_key, None)
        elif handled and getattr(self.weight, "bnb_quantized", False):
            self._load_float_weight_into_quantized(weight_key, state_dict[weight_key], error_msgs)
            rest.pop(weight_key, None)
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if handled and weight_key in missing_keys:
            missing_keys.remove(weight_key)

    def _load_quantized_weight(self, weight_key, state_dict, state_keys, error_msgs) -> bool:
        if weight_key not in state_dict:
            error_msgs.append(f"missing key '{weight_key}' (the packed 4-bit weight) beside {sorted(state_keys)}")
            return False
        packed = state_dict[weight_key]
        fields = {k[len(weight_key) + 1 :]: state_dict[k] for k in state_keys}
        packed_keys = [k for k in fields if k.startswith("quant_state.")]
        required = ["absmax", "quant_map"]
        if any(k in fields for k in _NESTED_KEYS) or any("nested" in k for k in fields):
            required += list(_NESTED_KEYS)
        missing = [f"{weight_key}.{k}" for k in required if k not in fields]
        if not packed_keys:
            missing.append(f"{weight_key}.quant_state.bitsandbytes__<nf4|fp4>")
        if missing:
            error_msgs.append(f"missing quant-state key(s) {missing} for '{weight_key}'")
            return False
        device = load_target_device(self.weight, packed)
        try:
            state = QuantState.from_dict(fields, device=device)
        except ValueError as error:
            error_msgs.append(f"bad quant state under '{weight_key}.': {error}")
            return False
        expected = self._expected_weight_shape()
        if list(state.shape) != expected:
            error_msgs.append(
                f"size mismatch for {weight_key}: the checkpoint's quant state has shape {list(state.shape)}, the "
                f"module expects {expected}"
            )
            return False
        try:
            check_packed_matches_state(packed, state, weight_key)
        except ValueError as error:
            error_msgs.append(str(error))
            return False
        self.weight = Params4bit.wrapping_packed(packed.detach().to(device), state, self)
        return True

    def _load_float_weight_into_quantized(self, weight_key, value, error_msgs) -> bool:
        expected = self._expected_weight_shape()
        if list(value.shape) != expected or not value.is_floating_point():
            error_msgs.append(
                f"size mismatch for {weight_key}: the module holds a quantized {expected} weight; the checkpoint has "
                f"{list(value.shape)} x {value.dtype} and no quant-state keys ('{weight_key}.absmax', ...)"
            )
            return False
        self.weight = requantized(self.weight, value)  # a quantized weight is never on the meta device
        return True

    def _expected_weight_shape(self) -> list[int]:
        raise NotImplementedError
