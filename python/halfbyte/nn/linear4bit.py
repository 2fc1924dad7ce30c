"""Linear4bit, LinearNF4, LinearFP4: nn.Linear with a 4-bit weight, as bitsandbytes' layers.

The weight is a Params4bit: it is quantized when the layer is moved to a device (``layer.to("cuda")``,
``.cuda()``, ``.cpu()``), or loaded already quantized from a state dict. ``forward`` casts the input to
``compute_dtype`` (when set), runs ``halfbyte.matmul_4bit`` (one fused op for every batch size, with autograd to
the input and the bias, and no graph breaks under torch.compile) and casts the result back to the input's
dtype. With ``compute_dtype=None`` the layer computes in the input's dtype.

Unlike bitsandbytes the layer keeps no hidden per-call state: the compute dtype is not changed by the first
input, and the bias parameter is not cast in place.
"""

from __future__ import annotations

import logging
import weakref

import torch
from torch import nn

from .. import functional as F
from ..autograd import _needs_gradient, gemm_4bit_from_scale_args, matmul_4bit
from .params4bit import Params4bit
from .quantized_state_dict import QuantizedWeightStateDict

logger = logging.getLogger("halfbyte")
_warned_slow_compute_dtype = False


def _warn_slow_compute_dtype_once(x: torch.Tensor, compute_dtype: torch.dtype | None) -> None:
    """Log once per process when a CUDA layer will compute in float32 (the tensor-core paths need 16 bits)."""
    global _warned_slow_compute_dtype
    if _warned_slow_compute_dtype or torch.compiler.is_compiling():
        return
    effective = compute_dtype if compute_dtype is not None else x.dtype
    if x.device.type == "cuda" and effective == torch.float32:
        _warned_slow_compute_dtype = True
        logger.warning(
            "Linear4bit computes in float32 (input dtype %s, compute_dtype %s): this is slow on the GPU. Pass "
            "compute_dtype=torch.bfloat16 (or float16) to the layer / HalfbyteConfig(bnb_4bit_compute_dtype=...).",
            x.dtype,
            compute_dtype,
        )


def ensure_quant_state(module: nn.Module) -> None:
    """Make ``module.weight`` a quantized Params4bit with its QuantState, or raise a clear error.

    A wrapper that flattens parameters (FSDP) can hand back the packed bytes as a plain Parameter; the module's
    own ``quant_state`` then restores it (as bitsandbytes does)."""
    weight = module.weight
    if getattr(weight, "quant_state", None) is not None and getattr(weight, "bnb_quantized", True):
        return
    state = getattr(module, "quant_state", None)
    if state is None or weight.dim() != 2 or weight.shape[1] != 1:
        raise RuntimeError(
            f"{type(module).__name__}: the weight is not quantized yet. Move the layer to a device to quantize it "
            "(layer.to('cuda') / .cuda() / .cpu()), or load a quantized state dict"
        )
    if not isinstance(weight, Params4bit):
        module.weight = Params4bit(
            weight.data, quant_storage=weight.dtype, quant_type=state.quant_type, blocksize=state.blocksize,
            compress_statistics=state.nested, module=module, bnb_quantized=True,
        )  # fmt: skip
    module.weight.quant_state = state


_LINKED_INPUTS = "_kernel_inputs"
_LINKED_WEIGHT = "_kernel_inputs_weight"
_EAGER_ARGS = "eager_scale_args"  # in the linked dict: the eager operands, made once per link
_EAGER_CALL = "eager_call"  # in the linked dict: (K, positional operands before and after the bias)
_GEMM_4BIT = torch.ops.halfbyte.gemm_4bit.default
_BELOW_AUTOGRAD = torch._C._AutoDispatchBelowAutograd


def _link_kernel_inputs(module: nn.Module, weight: torch.Tensor, state) -> dict:
    """``functional.kernel_inputs`` of the weight's state, also kept in the module's ``__dict__`` with a weak
    reference to the weight it belongs to (a replaced weight is neither used nor kept alive), and holding the
    eager forward's operands (``functional.scale_args_of`` of it); returns it."""
    inputs = F.kernel_inputs(state)
    shape, absmax, blocksize, quant_type, nested = inputs[_EAGER_ARGS] = F.scale_args_of(inputs)
    after_bias = (nested["absmax_8bit"], nested["absmax_code"], nested["absmax_offset"]) if nested else ()
    K = shape[1] if shape is not None and len(shape) == 2 else -1  # -1: no fast path (forward)
    inputs[_EAGER_CALL] = (K, (shape, absmax, blocksize, quant_type), after_bias)
    fields = module.__dict__
    linked = fields.get(_LINKED_WEIGHT)
    if fields.get(_LINKED_INPUTS) is not inputs or linked is None or linked() is not weight:
        fields[_LINKED_INPUTS] = inputs
        fields[_LINKED_WEIGHT] = weakref.ref(weight)
    return inputs


def _forward_traced(self: Linear4bit, x: torch.Tensor) -> torch.Tensor:
    """forward as torch.compile traces it: the same result, reading as few objects as it can.

    Every object the traced code reads is re-checked by a guard before each call of the compiled model, and
    with 224 layers those checks cost milliseconds per decode step (benchmarks/README.md, issue 7). The
    cheapest reads are dict lookups from the module: the weight in ``_parameters`` and the kernel inputs that
    the eager forward linked into the module's ``__dict__`` (the QuantState's own cached dict, emptied in place
    whenever the state, its nested state or the weight's state changes), of which it reads the layout as one
    constant tuple, the scales as one tensor (a double-quantized state's absmax, nested absmax and offset packed
    into one buffer, packed_scales.py) and a nested state's code (usually one tensor for all layers). That path
    is taken when the link is there, belongs to this weight and is not emptied; otherwise the weight's
    QuantState is read, as in eager, with more guards. The float32 warning is skipped (it never fires under
    compile)."""
    fields = self.__dict__
    weight = self._parameters["weight"]
    inputs = fields.get(_LINKED_INPUTS)
    linked = fields.get(_LINKED_WEIGHT)
    # An emptied dict has no "traced" (get, not len: len would make Dynamo guard every entry of the dict).
    traced = None if inputs is None else inputs.get("traced")
    if traced is not None and linked is not None and linked() is weight:
        return _matmul(self, x, weight, F.traced_scale_args(inputs, traced))
    if linked is None or linked() is not weight or not F.kernel_inputs_intact(inputs):
        state = weight.quant_state if isinstance(weight, Params4bit) else None
        if state is None:
            ensure_quant_state(self)  # raises the clear error, or repairs an FSDP-flattened weight
            weight, state = self.weight, self.weight.quant_state
        inputs = F.kernel_inputs(state)
    return _matmul(self, x, weight, F.scale_args_of(inputs))


def _matmul(self: Linear4bit, x: torch.Tensor, weight: torch.Tensor, scale_args: tuple) -> torch.Tensor:
    """The rest of forward, eager and traced: checks, compute dtype, the fused op, the cast back.
    ``scale_args``: (shape, absmax, blocksize, quant_type, nested keyword arguments) of the weight's state."""
    if x.shape[-1] != self.in_features:
        raise ValueError(
            f"Linear4bit: input has {x.shape[-1]} features in its last dimension (shape {list(x.shape)}), the "
            f"layer expects in_features={self.in_features}"
        )
    # Casts only where the dtype differs: a no-op .to() still costs a dispatcher call, paid on every layer call
    # of eager decoding.
    input_dtype = x.dtype
    compute_dtype = self.compute_dtype
    if compute_dtype is not None and compute_dtype != input_dtype:
        x = x.to(compute_dtype)
    bias = self._parameters["bias"]
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    N, K = scale_args[0]
    if x.shape[-1] == N and N != K:  # a state of the [K, N] transpose: matmul_4bit's unfused path, with its warning
        out = matmul_4bit(x, weight, quant_state=weight.quant_state, bias=bias)
    else:
        out = gemm_4bit_from_scale_args(x, weight, scale_args, bias)
    return out if out.dtype == input_dtype else out.to(input_dtype)


class Linear4bit(QuantizedWeightStateDict, nn.Linear):
    """A Linear layer with a 4-bit (NF4 or FP4) weight, quantized when the layer is moved to a device.

    Args:
        input_features: in_features of the layer (K).
        output_features: out_features (N); the weight is [N, K].
        bias: whether the layer has a bias (kept in full precision).
        compute_dtype: dtype the matmul runs in (the input is cast to it and the output cast back); None
            computes in the input's dtype. float32 on a GPU is slow (a warning says so once).
        compress_statistics: double-quantize the absmax (8-bit codes, one float per 256 blocks).
        quant_type: "fp4" (bitsandbytes' default) or "nf4".
        quant_storage: dtype of the packed weight tensor (uint8, or a float dtype for FSDP).
        device: where the float weight is created; quantization happens on ``.to(device)``.
        blocksize: values per absmax, a power of two from 32 to 4096 (64 by default).
    """

    def __init__(
        self,
        input_features: int,
        output_features: int,
        bias: bool = True,
        compute_dtype: torch.dtype | None = None,
        compress_statistics: bool = True,
        quant_type: str = "fp4",
        quant_storage: torch.dtype = torch.uint8,
        device: torch.device | str | None = None,
        blocksize: int = 64,
    ):
        if compute_dtype is not None and compute_dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise TypeError(
                f"Linear4bit: compute_dtype must be float16, bfloat16, float32 or None, got {compute_dtype}"
            )
        super().__init__(input_features, output_features, bias, device)
        self.weight = Params4bit(
            self.weight.data,
            requires_grad=False,
            blocksize=blocksize,
            compress_statistics=compress_statistics,
            quant_type=quant_type,
            quant_storage=quant_storage,
            module=self,
        )
        self.compute_dtype = compute_dtype
        self.compute_type_is_set = compute_dtype is not None
        self.quant_state = None
        self.quant_storage = quant_storage

    def _expected_weight_shape(self) -> list[int]:
        return [self.out_features, self.in_features]

    def set_compute_type(self, x: torch.Tensor) -> None:
        """bitsandbytes' name for the dtype check; here it only warns (the dtype is resolved per call)."""
        _warn_slow_compute_dtype_once(x, self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return _forward_traced(self, x)
        # Eager decoding calls this 224 times per token, so the common case is a few dict lookups: the kernel
        # inputs linked by an earlier call, still whole (any change of the state empties them) and still this
        # weight's. Otherwise check the weight and link its state's inputs (with the operands, kept in them).
        fields = self.__dict__
        weight = self._parameters["weight"]
        inputs = fields.get(_LINKED_INPUTS)
        linked = fields.get(_LINKED_WEIGHT)
        if not (inputs and linked is not None and linked() is weight):
            ensure_quant_state(self)
            weight = self.weight
            inputs = _link_kernel_inputs(self, weight, weight.quant_state)
        compute_dtype = self.compute_dtype
        if compute_dtype is None or compute_dtype == torch.float32:  # the only cases that may warn
            self.set_compute_type(x)
        # Inference on an input already in the compute dtype (decoding): the op itself, positional, below the
        # autograd key (no gradient can flow). Everything else (casts, autograd, a transposed state, a wrong
        # input size and its error) goes through _matmul.
        K, before_bias, after_bias = inputs[_EAGER_CALL]
        bias = self._parameters["bias"]
        dtype = x.dtype
        if (
            (compute_dtype is None or dtype is compute_dtype)
            and (bias is None or bias.dtype is dtype)
            and x.shape[-1] == K == self.in_features
            and not _needs_gradient(x, bias)
        ):
            with _BELOW_AUTOGRAD():
                return _GEMM_4BIT(x, weight, *before_bias, bias, *after_bias)
        return _matmul(self, x, weight, inputs[_EAGER_ARGS])

    def __getstate__(self) -> dict:
        # copies and pickles drop the link to the kernel inputs; the copy links its own on its first forward
        return {k: v for k, v in self.__dict__.items() if k not in (_LINKED_INPUTS, _LINKED_WEIGHT)}

    def extra_repr(self) -> str:
        weight = self.weight
        return (
            f"{super().extra_repr()}, quant_type={weight.quant_type}, blocksize={weight.blocksize}, "
            f"compress_statistics={weight.compress_statistics}, compute_dtype={self.compute_dtype}"
        )


def _init_with_quant_type(quant_type: str):
    """__init__ of a Linear4bit with a fixed quant_type (bitsandbytes' positional signature, less quant_type)."""

    def __init__(
        self,
        input_features,
        output_features,
        bias=True,
        compute_dtype=None,
        compress_statistics=True,
        quant_storage=torch.uint8,
        device=None,
        blocksize: int = 64,
    ):
        Linear4bit.__init__(
            self, input_features, output_features, bias, compute_dtype, compress_statistics, quant_type,
            quant_storage, device, blocksize,
        )  # fmt: skip

    return __init__


class LinearFP4(Linear4bit):
    """Linear4bit with quant_type='fp4'."""

    __init__ = _init_with_quant_type("fp4")


class LinearNF4(Linear4bit):
    """Linear4bit with quant_type='nf4' (levels at the quantiles of a normal distribution; QLoRA's format)."""

    __init__ = _init_with_quant_type("nf4")
