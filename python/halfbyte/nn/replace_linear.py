"""replace_linear: turn a model's nn.Linear layers into 4-bit Linear4bit layers, in place.

Layers are converted one at a time: each weight is quantized on the device it already lives on and the float
weight is released before the next layer, so peak memory is the model plus one layer. Weights on the meta
device become unquantized Linear4bit shells (load a state dict, then ``.to(device)``). Only exact ``nn.Linear``
modules are converted: subclasses (such as the out_proj of nn.MultiheadAttention, whose weight the parent reads
directly) are left alone.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .linear4bit import Linear4bit
from .params4bit import Params4bit

# Show a progress bar by default when the Linear weights to convert hold at least this many values.
PROGRESS_MIN_PARAMETERS = 100_000_000


def is_skipped(name: str, skip_modules: Iterable[str]) -> bool:
    """True when module `name` (dotted path) is named by an entry of `skip_modules`: the whole path, its last
    components (``"lm_head"`` matches ``"model.lm_head"``), or an enclosing module (``"vision"`` skips
    ``"vision.proj"``)."""
    for entry in skip_modules:
        if name == entry or name.endswith("." + entry) or name.startswith(entry + ".") or f".{entry}." in f".{name}.":
            return True
    return False


def replace_linear(
    model: nn.Module,
    quant_type: str = "nf4",
    compute_dtype: torch.dtype | None = None,
    compress_statistics: bool = True,
    skip_modules: Iterable[str] | None = ("lm_head",),
    blocksize: int = 64,
    quant_storage: torch.dtype = torch.uint8,
    progress: bool | None = None,
) -> nn.Module:
    """Replace every ``nn.Linear`` of `model` (except those named in `skip_modules`) by a quantized Linear4bit.

    Args:
        model: any nn.Module; changed in place and returned.
        quant_type: "nf4" (default, QLoRA's) or "fp4".
        compute_dtype: dtype the layers compute in (None: the input's dtype).
        compress_statistics: double-quantize the absmax (0.37 fewer bits per parameter).
        skip_modules: module names kept in full precision (default: lm_head, like bitsandbytes/transformers);
            pass ``()`` to convert every Linear.
        blocksize: values per absmax, 32..4096 (64 by default).
        quant_storage: dtype of the packed weight tensor (uint8 by default; FSDP wants the compute dtype).
        progress: show a progress bar (None: only for models with at least 1e8 Linear weights).

    The model is not marked ``is_loaded_in_4bit`` (transformers then imports bitsandbytes to count
    parameters); use ``halfbyte.peft.prepare_model_for_kbit_training`` to prepare it for QLoRA.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"replace_linear: model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(skip_modules, str):
        raise TypeError("replace_linear: skip_modules must be a list of module names, not a single string")
    skip = tuple(skip_modules or ())
    # Validates quant_type / blocksize / quant_storage / compute_dtype before anything is changed.
    Linear4bit(1, 1, False, compute_dtype, compress_statistics, quant_type, quant_storage, "meta", blocksize)

    if type(model) is nn.Linear:
        raise ValueError("replace_linear: the model itself is an nn.Linear; wrap it in a module first")
    # Names only: holding the modules would keep every float weight alive until the end.
    names, total = [], 0
    for name, module in model.named_modules():
        if type(module) is nn.Linear and not is_skipped(name, skip):
            names.append(name)
            total += module.weight.numel()
    show = progress if progress is not None else total >= PROGRESS_MIN_PARAMETERS
    from tqdm.auto import tqdm

    for name in tqdm(names, desc="halfbyte: quantizing Linear layers", unit="layer", disable=not show):
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child_name)
        replacement = Linear4bit(
            linear.in_features, linear.out_features, linear.bias is not None, compute_dtype, compress_statistics,
            quant_type, quant_storage, "meta", blocksize,
        )  # fmt: skip
        weight = linear.weight
        replacement.weight = Params4bit(
            weight.data, requires_grad=False, blocksize=blocksize, compress_statistics=compress_statistics,
            quant_type=quant_type, quant_storage=quant_storage, module=replacement,
        )  # fmt: skip
        if linear.bias is not None:
            replacement.bias = linear.bias
        replacement.train(linear.training)
        setattr(parent, child_name, replacement)
        del weight, linear  # the float weight is released once quantized (if nothing else holds it)
        if replacement.weight.device.type != "meta":
            replacement.weight = replacement.weight.to(replacement.weight.device)
    return model
