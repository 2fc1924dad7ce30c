"""Int8Params and Linear8bitLt: the INT8 tier (LLM.int8-style row-wise int8 weights), as bitsandbytes' layers.

``Int8Params`` holds the float weight until it is moved to a device (``.to(device)``, ``.cuda()``, ``.cpu()``,
or the module's ``.to``); then, unless ``has_fp16_weights``, it is quantized there row by row: ``data`` becomes
the int8 codes ``CB`` [out_features, in_features] and ``SCB`` holds one float32 absmax per row (the weight is
``CB * SCB / 127``). A quantized Int8Params moves between devices with its codes unchanged and is never cast.
Its attribute set (``CB``, ``SCB``, ``has_fp16_weights``) is bitsandbytes', so code that rebuilds it from
``weight.__dict__`` (transformers' loader) works.

``Linear8bitLt.forward`` runs one op, ``halfbyte::int8_linear``: up to 16 rows of input it multiplies by the
int8 weight directly (the input is not quantized: a weight-only kernel on the GPU, float32 accumulation);
for more rows it follows LLM.int8 (input quantized row-wise, int8 tensor-core matmul), and with
``threshold > 0`` the input columns holding a value ``|x| >= threshold`` go through the input's dtype with the
dequantized weight. Gradients reach the input (through the dequantized weight) and the bias. With
``has_fp16_weights=True`` the weight stays in floating point, is quantized afresh at each forward, and gets a
gradient computed in floating point.

State dicts use bitsandbytes' keys: ``weight`` (int8), ``bias``, ``SCB`` (float32 [out_features]) and
``weight_format`` (uint8 0, "row"). A quantized dict loads into a fresh layer (bitsandbytes needs the layer
quantized first), a quantized layer, or a meta-device layer; a float dict into an unquantized layer (quantized
later by ``.to``) or a quantized one (quantized on the spot). Truncated or inconsistent dicts name the key.

Differences from bitsandbytes, all deliberate: the weight is quantized in its own dtype (bitsandbytes casts it
to float16 first; identical for float16 / bfloat16 weights in float16's range); the bias is cast per call, not
in place; ``SCB`` stays on the weight (bitsandbytes moves it to ``state`` at the first forward; ``state.CB``
and ``state.SCB`` read the weight's here); an unquantized layer with ``has_fp16_weights=False`` refuses to run
instead of quantizing at every call.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from .. import functional as F
from .quantized_parameter import QuantizedParameter
from .quantized_state_dict import load_target_device

_ATTRIBUTES = ("CB", "SCB", "has_fp16_weights")
_WEIGHT_FORMATS = {"row": 0}  # bitsandbytes' LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING (only "row" is still written)


def _check_threshold(owner: str, threshold) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"{owner}: threshold must be a number, got {type(threshold).__name__}")
    if not math.isfinite(threshold) or threshold < 0:
        raise ValueError(f"{owner}: threshold must be a finite number >= 0 (0 disables outliers), got {threshold}")
    return float(threshold)


class Int8Params(QuantizedParameter):
    """An int8 weight (see the module docstring). Quantized when ``data`` is int8."""

    _attribute_names = _ATTRIBUTES

    def __new__(
        cls,
        data: torch.Tensor | None = None,
        requires_grad: bool = True,
        has_fp16_weights: bool = False,
        CB: torch.Tensor | None = None,
        SCB: torch.Tensor | None = None,
        **kwargs,  # other entries of a bitsandbytes Int8Params' __dict__ (ignored, as bitsandbytes does)
    ) -> Int8Params:
        if data is None:
            data = torch.empty(0)
        # int8 codes cannot require a gradient; a float weight keeps the caller's choice.
        self = torch.Tensor._make_subclass(cls, data, requires_grad and data.is_floating_point())
        self.CB = CB if CB is not None or data.dtype != torch.int8 else data
        self.SCB = SCB
        self.has_fp16_weights = has_fp16_weights
        return self

    # ---- quantization on move -------------------------------------------------------------------------

    def _quantize(self, device: torch.device) -> Int8Params:
        if self.data.device.type == "meta":
            raise RuntimeError(
                "Int8Params: the weight is still on the meta device (no values to quantize); load real weights "
                "into it (load_state_dict) before moving it to a device"
            )
        if not self.data.is_floating_point():
            raise TypeError(f"Int8Params: cannot quantize a {self.data.dtype} weight (float16/bfloat16/float32 only)")
        CB, SCB, _ = F.int8_vectorwise_quant(self.data.to(device).contiguous())
        self.requires_grad_(False)
        self.data = CB
        self.CB = CB
        self.SCB = SCB
        return self

    def to(self, *args, **kwargs) -> Int8Params:
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        quantized = self.data.dtype == torch.int8
        if not quantized and not self.has_fp16_weights and device is not None and device.type != "meta":
            return self._quantize(device)
        if quantized:
            dtype = None  # int8 codes are never cast
        moved = super().to(device=device, dtype=dtype, non_blocking=non_blocking)
        new = Int8Params(moved, requires_grad=self.requires_grad, has_fp16_weights=self.has_fp16_weights)
        if quantized:
            if device is not None and self.SCB is not None and self.SCB.device.type != "meta":
                # in place as well: Module._apply keeps this Parameter object and only swaps its data
                self.SCB = self.SCB.to(device, non_blocking=non_blocking)
            self.CB = moved
            new.CB, new.SCB = new.data, self.SCB
        return new

    # ---- copy, deepcopy, pickle -----------------------------------------------------------------------

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if self.data.dtype == torch.int8:
            self.CB = self.data

    def __deepcopy__(self, memo: dict) -> Int8Params:
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        state = self.__getstate__()
        state["data"] = copy.deepcopy(state["data"], memo)
        state["SCB"] = copy.deepcopy(state["SCB"], memo)
        state["CB"] = None
        new.__setstate__(state)
        return new

    def _pickled_attributes(self) -> dict[str, Any]:
        return self._attributes() | {"CB": None}  # the codes are `data`

    def __repr__(self) -> str:
        if self.data.dtype != torch.int8:
            return f"Int8Params(unquantized, has_fp16_weights={self.has_fp16_weights}):\n{super().__repr__()}"
        return f"Int8Params(int8 {list(self.data.shape)} on {self.data.device}, SCB {list(self.SCB.shape)})"


class Int8State:
    """bitsandbytes' ``MatmulLtState`` fields that code reads from ``layer.state``: the layer's threshold and
    has_fp16_weights, and ``CB`` / ``SCB`` / ``is_training`` taken from the layer and its weight."""

    def __init__(self, module: nn.Module, threshold: float, has_fp16_weights: bool):
        self.module = module
        self.threshold = threshold
        self.has_fp16_weights = has_fp16_weights
        self.use_pool = False  # kept for code that reads it; outliers are not pooled across layers

    @property
    def is_training(self) -> bool:
        return self.module.training

    @property
    def CB(self) -> torch.Tensor | None:
        weight = self.module.weight
        return weight.data if weight.dtype == torch.int8 else None

    @property
    def SCB(self) -> torch.Tensor | None:
        return getattr(self.module.weight, "SCB", None)

    @SCB.setter
    def SCB(self, value: torch.Tensor | None) -> None:
        self.module.weight.SCB = value

    def __repr__(self) -> str:
        return f"Int8State(threshold={self.threshold}, has_fp16_weights={self.has_fp16_weights})"


class _Int8MatmulOfFloatWeight(torch.autograd.Function):
    """Forward with the weight quantized afresh (has_fp16_weights=True); gradients in floating point."""

    @staticmethod
    def forward(ctx, x, weight, bias, threshold):
        CB, SCB, _ = torch.ops.halfbyte.int8_vectorwise_quant(weight.detach(), 0.0)
        ctx.save_for_backward(x, CB, SCB)
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return torch.ops.halfbyte.int8_linear(x, CB, SCB, bias, threshold)

    @staticmethod
    def backward(ctx, grad_out):
        x, CB, SCB = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ torch.ops.halfbyte.int8_vectorwise_dequant(CB, SCB).to(grad_out.dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_2d.t() @ x.reshape(-1, x.shape[-1]).to(grad_2d.dtype)).to(ctx.weight_dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_2d.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_weight, grad_bias, None


class Linear8bitLt(nn.Linear):
    """A Linear layer with an int8 weight (LLM.int8); bitsandbytes' signature. See the module docstring."""

    def __init__(
        self,
        input_features: int,
        output_features: int,
        bias: bool = True,
        has_fp16_weights: bool = True,
        threshold: float = 0.0,
        index=None,
        device=None,
    ):
        threshold = _check_threshold("Linear8bitLt", threshold)
        super().__init__(input_features, output_features, bias, device)
        self.state = Int8State(self, threshold, bool(has_fp16_weights))
        self.index = index
        self.weight = Int8Params(self.weight.data, requires_grad=has_fp16_weights, has_fp16_weights=has_fp16_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"Linear8bitLt: input has {x.shape[-1]} features in its last dimension (shape {list(x.shape)}), the "
                f"layer expects in_features={self.in_features}"
            )
        bias = None if self.bias is None else self.bias.to(x.dtype)
        weight = self.weight
        if weight.dtype == torch.int8:
            SCB = getattr(weight, "SCB", None)
            if SCB is None:
                raise RuntimeError("Linear8bitLt: the int8 weight has no SCB (its row absmax); load it with the weight")
            return torch.ops.halfbyte.int8_linear(x, weight, SCB, bias, self.state.threshold)
        if not self.state.has_fp16_weights:
            raise RuntimeError(
                "Linear8bitLt: the weight is not quantized yet. Move the layer to a device to quantize it "
                "(layer.to('cuda') / .cuda() / .cpu()), or load a quantized state dict"
            )
        return _Int8MatmulOfFloatWeight.apply(x, weight, bias, self.state.threshold)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, threshold={self.state.threshold}, "
            f"has_fp16_weights={self.state.has_fp16_weights}, quantized={self.weight.dtype == torch.int8}"
        )

    # ---- state dicts (bitsandbytes' keys) -----------------------------------------------------------------

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)  # weight (int8 codes or float) and bias
        SCB = getattr(self.weight, "SCB", None)
        if self.weight.dtype == torch.int8 and SCB is not None:
            destination[prefix + "SCB"] = SCB if keep_vars else SCB.detach()
            destination[prefix + "weight_format"] = torch.tensor(_WEIGHT_FORMATS["row"], dtype=torch.uint8)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        weight_key, scb_key, format_key = prefix + "weight", prefix + "SCB", prefix + "weight_format"
        rest = dict(state_dict)
        weight_format = rest.pop(format_key, None)
        SCB = rest.pop(scb_key, None)
        weight = state_dict.get(weight_key)
        handled = False
        if weight_format is not None and not _is_row_format(weight_format):
            error_msgs.append(f"unsupported '{format_key}' {_format_name(weight_format)}: only 'row' (0) is supported")
            handled = True
        elif weight is not None and weight.dtype == torch.int8:
            handled = True
            if SCB is None:
                error_msgs.append(f"missing key '{scb_key}' (the row absmax of the int8 weight '{weight_key}')")
            else:
                self._load_quantized(weight_key, scb_key, weight, SCB, error_msgs)
        elif SCB is not None:
            handled = True
            what = f"a {weight.dtype} weight" if weight is not None else f"no '{weight_key}'"
            error_msgs.append(f"'{scb_key}' comes with {what}; a quantized checkpoint has an int8 '{weight_key}'")
        elif weight is not None and self.weight.dtype == torch.int8:
            handled = True
            self._load_float_into_quantized(weight_key, weight, error_msgs)
        if handled:
            rest.pop(weight_key, None)
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if handled and weight_key in missing_keys:
            missing_keys.remove(weight_key)

    def _check_shape(self, key: str, shape, error_msgs) -> bool:
        expected = [self.out_features, self.in_features]
        if list(shape) != expected:
            error_msgs.append(f"size mismatch for {key}: the checkpoint has shape {list(shape)}, the module {expected}")
            return False
        return True

    def _load_quantized(self, weight_key, scb_key, weight, SCB, error_msgs) -> None:
        if not self._check_shape(weight_key, weight.shape, error_msgs):
            return
        if SCB.dtype != torch.float32 or SCB.numel() != self.out_features:
            error_msgs.append(
                f"'{scb_key}' must be float32 with {self.out_features} entries (one per output feature), got "
                f"{SCB.dtype} with {SCB.numel()}"
            )
            return
        device = load_target_device(self.weight, weight)
        self.weight = Int8Params(
            weight.detach().to(device), requires_grad=False, has_fp16_weights=False,
            SCB=SCB.detach().reshape(-1).to(device, torch.float32),
        )  # fmt: skip
        self.state.has_fp16_weights = False

    def _load_float_into_quantized(self, weight_key, weight, error_msgs) -> None:
        if not weight.is_floating_point():
            error_msgs.append(f"'{weight_key}' is {weight.dtype}: a float weight, or int8 codes with SCB, expected")
            return
        if not self._check_shape(weight_key, weight.shape, error_msgs):
            return
        fresh = Int8Params(weight.detach(), requires_grad=False, has_fp16_weights=False)
        self.weight = fresh.to(self.weight.device)  # quantized on the module's device


def _is_row_format(value) -> bool:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            return False
        value = value.item()
    return value in ("row", _WEIGHT_FORMATS["row"])


def _format_name(value) -> str:
    return repr(value.tolist()) if isinstance(value, torch.Tensor) else repr(value)
