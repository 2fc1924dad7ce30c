"""Memory of a model at each precision, and the measured error of each quantization format.

Counts what the formats store (shared/COMPAT.md): FP32/FP16 weights; INT8 as LLM.int8 stores it (one
int8 per weight, one float32 scale per output row); INT4 and NF4 as 4-bit codes plus one float32 absmax
per block; NF4 with double quantization as 4-bit codes, one uint8 absmax per block, and one float32 per
256 blocks. Like bitsandbytes, only the Linear layers are quantized; embeddings, norms and (by default)
lm_head stay in 16 bits.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

GIB = 1024**3


@dataclass(frozen=True)
class ModelParams:
    """Parameter counts split by how they are stored."""

    name: str
    linear: list[tuple[int, int]]  # (out_features, in_features) of every quantizable Linear weight
    other: int  # parameters kept in 16 bits (embeddings, norms, biases, a kept lm_head)

    @property
    def total(self) -> int:
        return sum(n * k for n, k in self.linear) + self.other


def from_billions(billions: float) -> ModelParams:
    """A model of `billions` parameters, all of them in 4096-wide Linear layers (an upper bound on savings)."""
    if not (billions > 0 and math.isfinite(billions)):
        raise ValueError(f"--params must be a positive number of billions, got {billions}")
    rows = int(round(billions * 1e9 / 4096))
    return ModelParams(f"{billions:g}B parameters (all in Linear layers)", [(rows, 4096)], 0)


def from_config(config: dict, quantize_lm_head: bool = False) -> ModelParams:
    """Parameter counts of a decoder-only transformer from its Hugging Face config.json (Llama, Mistral,
    Qwen and similar: hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, vocab_size)."""
    try:
        hidden = int(config["hidden_size"])
        intermediate = int(config["intermediate_size"])
        layers = int(config["num_hidden_layers"])
        heads = int(config["num_attention_heads"])
        vocab = int(config["vocab_size"])
    except KeyError as missing:
        raise ValueError(f"config.json lacks {missing}; need a decoder-only transformer config") from None
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    tied = bool(config.get("tie_word_embeddings", False))
    per_layer = [
        (heads * head_dim, hidden), (kv_heads * head_dim, hidden), (kv_heads * head_dim, hidden),
        (hidden, heads * head_dim), (intermediate, hidden), (intermediate, hidden), (hidden, intermediate),
    ]  # fmt: skip
    linear = per_layer * layers
    other = vocab * hidden + (2 * layers + 1) * hidden  # embeddings + norms
    if not tied:
        if quantize_lm_head:
            linear = linear + [(vocab, hidden)]
        else:
            other += vocab * hidden
    name = config.get("_name_or_path") or config.get("model_type", "model")
    return ModelParams(f"{name} ({config.get('model_type', '?')}, {layers} layers)", linear, other)


def llama3_8b_config() -> dict:
    """The built-in default: the shape of Llama-3-8B."""
    return {
        "_name_or_path": "Llama-3-8B-shaped", "model_type": "llama", "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False,
    }  # fmt: skip


def weight_bytes(linear: list[tuple[int, int]], precision: str, blocksize: int = 64) -> int:
    """Bytes that the quantizable weights take at `precision`."""
    total = 0
    for n, k in linear:
        elements = n * k
        blocks = -(-elements // blocksize)
        if precision == "FP32":
            total += 4 * elements
        elif precision in ("FP16", "BF16"):
            total += 2 * elements
        elif precision == "INT8":
            total += elements + 4 * n
        elif precision in ("INT4", "NF4", "FP4"):
            total += (elements + 1) // 2 + 4 * blocks
        elif precision == "NF4+DQ":
            total += (elements + 1) // 2 + blocks + 4 * -(-blocks // 256) + 4
        else:
            raise ValueError(f"unknown precision {precision!r}")
    return total


PRECISIONS = ("FP32", "FP16", "INT8", "INT4", "NF4", "NF4+DQ")


def memory_table(model: ModelParams, blocksize: int = 64) -> list[dict]:
    rows = []
    for precision in PRECISIONS:
        other = model.other * (4 if precision == "FP32" else 2)
        total = weight_bytes(model.linear, precision, blocksize) + other
        rows.append(
            {"precision": precision, "bytes": total, "gib": total / GIB, "bits_per_param": 8 * total / model.total}
        )
    return rows


def measured_errors(size: int = 1024, blocksize: int = 64, seed: int = 0) -> list[dict]:
    """Mean absolute and relative error of each format on N(0, 1) data of shape [size, size]."""
    from . import functional as F

    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(size, size, generator=generator)
    rows = []

    def record(name, approx):
        diff = (x - approx).abs()
        rows.append(
            {
                "format": name,
                "mean_abs_err": diff.mean().item(),
                "mean_rel_err": (diff / (x.abs() + 1e-8)).mean().item(),
            }
        )

    scale = x.abs().amax(dim=1, keepdim=True) / 127.0
    record("INT8 (row-wise absmax)", (x / scale).round().clamp(-127, 127) * scale)
    codes, state = F.quantize_blockwise(x, blocksize=blocksize)
    record(f"8-bit dynamic (blocks of {blocksize})", F.dequantize_blockwise(codes, state))
    for quant_type, nested in (("fp4", False), ("nf4", False), ("nf4", True)):
        packed, state = F.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)
        name = f"{quant_type.upper()}{'+DQ' if nested else ''} (blocks of {blocksize})"
        record(name, F.dequantize_4bit(packed, state))
    return rows


def load_config(path: str) -> dict:
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        raise ValueError(f"no config.json at {path}") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{p} is not valid JSON: {error}") from None


def format_report(model: ModelParams, blocksize: int, errors: list[dict]) -> str:
    lines = [f"Memory of {model.name}: {model.total / 1e9:.2f}B parameters", ""]
    lines.append(f"{'precision':<10} {'GiB':>8} {'GB':>8} {'bits/param':>11}")
    for row in memory_table(model, blocksize):
        lines.append(
            f"{row['precision']:<10} {row['gib']:>8.2f} {row['bytes'] / 1e9:>8.2f} {row['bits_per_param']:>11.3f}"
        )
    lines += ["", "Quantization error on N(0,1) data (1024x1024), measured:"]
    lines.append(f"{'format':<28} {'mean abs err':>13} {'mean rel err':>13}")
    for row in errors:
        lines.append(f"{row['format']:<28} {row['mean_abs_err']:>13.4f} {row['mean_rel_err']:>13.4f}")
    return "\n".join(lines)
