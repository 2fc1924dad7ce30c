"""Pure-PyTorch statement of every halfbyte op: the readable algorithm and the test oracle.

Slow and exact. The C++ and CUDA kernels must give the same bits as these functions for every input
(see shared/COMPAT.md for the formats). Scaling follows bitsandbytes' CUDA kernels, which are built
with fast math: a block is scaled by ``x * rcp.approx.ftz(absmax)`` and subnormal inputs/products are
flushed to zero; ``reciprocal_like_cuda`` reproduces rcp.approx from a measured table.

One deliberate difference from bitsandbytes: a NaN in a block makes that block's absmax NaN (so the
block dequantizes to NaN); bitsandbytes skips the NaN and silently turns it into -absmax.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Sequence
from importlib import resources

import torch

# ---- codebooks --------------------------------------------------------------------------------------

NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)  # fmt: skip

# Midpoint thresholds as the float32 values the kernels compare against (exact hex floats).
NF4_THRESHOLDS = tuple(
    float.fromhex(h)
    for h in (
        "-0x1.b239b2p-1", "-0x1.38a4ep-1", "-0x1.d709p-2", "-0x1.5bd4ecp-2", "-0x1.e079d8p-3",
        "-0x1.1a7178p-3", "-0x1.74f0e2p-5", "0x1.45f5fep-5", "0x1.ec90c6p-4", "0x1.a0cfcp-3",
        "0x1.2b05a8p-2", "0x1.8ea7f2p-2", "0x1.00da06p-1", "0x1.491b5ep-1", "0x1.b913b2p-1",
    )
)  # fmt: skip
FP4_THRESHOLDS = tuple(
    float.fromhex(h)
    for h in ("0x1.555572p-9", "0x1.6p-4", "0x1.aaaaaap-3", "0x1.2aaaaap-2", "0x1.aaaaacp-2", "0x1.2aaaap-1",
              "0x1.aaaaaap-1")
)  # fmt: skip
# FP4 raw magnitudes of the 3-bit patterns 0..7 (divide by 12), and the pattern of each magnitude rank.
FP4_RAW = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)
FP4_RANK_TO_PATTERN = (0, 1, 6, 7, 4, 5, 2, 3)

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
STORAGE_DTYPES = (torch.uint8, torch.float16, torch.bfloat16, torch.float32)
_TINY = 1.17549435e-38  # smallest normal float32


def nf4_table(device=None) -> torch.Tensor:
    return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)


def fp4_table(device=None) -> torch.Tensor:
    """The FP4 quant map as bitsandbytes stores it (``quant_map`` in state dicts): code 8 holds +0.0."""
    raw = [0.0 if v == 0 else v for v in FP4_RAW + tuple(-v for v in FP4_RAW)]
    return torch.tensor(raw, dtype=torch.float32, device=device) / 12.0


def table_4bit(quant_type: str, device=None) -> torch.Tensor:
    """The 16-entry quant map of `quant_type` (index = code), as stored in QuantState.code."""
    if quant_type == "nf4":
        return nf4_table(device)
    if quant_type == "fp4":
        return fp4_table(device)
    raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")


def levels_4bit(quant_type: str, device=None) -> torch.Tensor:
    """The levels the dequantization kernels decode: the quant map, except FP4 code 8 decodes to -0.0
    (sign bit set), as in bitsandbytes' CUDA kernels."""
    table = table_4bit(quant_type, device)
    if quant_type == "fp4":
        table[8] = -0.0
    return table


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """The 8-bit dynamic map: for each decade, midpoints of a linspace in [0.1, 1] scaled by a power of 10.

    The midpoints and their product with the power of ten are float32 tensor ops (as in bitsandbytes;
    a float64 product would differ in 30 of the 256 entries), then the list is sorted.
    """
    non_sign_bits = total_bits - 1  # one bit is reserved even when unsigned (as in bitsandbytes)
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1

    def decade(items: int, power: int) -> list[float]:
        boundaries = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        values = ((10**power) * means).tolist()
        return values + ((-(10**power)) * means).tolist() if signed else values

    values: list[float] = []
    for i in range(max_exponent_bits):
        exponent_bits = i + non_sign_bits - max_exponent_bits
        items = 2**exponent_bits + 1 if signed else 2 ** (exponent_bits + 1) + 1
        values += decade(items, -(max_exponent_bits - 1) + i)
    if additional_items > 0:
        values += decade(additional_items + 1, 0)
    values += [0.0, 1.0]
    values += [0.0] * (256 - len(values))  # always a 256-entry code
    return torch.tensor(sorted(values), dtype=torch.float32)


def create_normal_map(offset: float = 0.9677083, use_extra_value: bool = True) -> torch.Tensor:
    """The NF4 construction: normal quantiles, 8 positive and 7 negative, normalized to [-1, 1].

    Returned as a 256-entry code (the 16 levels and zero padding), as bitsandbytes does. Quantiles come
    from torch.special.ndtri in float64; they agree with NF4_LEVELS to float32 rounding.
    """
    positives = 9 if use_extra_value else 8
    negatives = 8 if use_extra_value else 9
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, positives, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, negatives, dtype=torch.float64)[:-1])
    pad = 256 - (positives - 1) - (negatives - 1)
    values = torch.cat([pos, torch.zeros(pad, dtype=torch.float64), neg]).to(torch.float32)
    values = values.sort().values
    return values / values.max()


# ---- bitsandbytes' CUDA arithmetic ------------------------------------------------------------------


@functools.cache
def _rcp_delta_table() -> torch.Tensor:
    """int8 deviation of rcp.approx.ftz.f32 from the IEEE reciprocal, for each of the 2**23 mantissas."""
    packed = zlib.decompress(resources.files("halfbyte").joinpath("data/rcp_approx_delta.bin.zlib").read_bytes())
    raw = torch.frombuffer(bytearray(packed), dtype=torch.uint8)
    fields = torch.stack([(raw >> (2 * i)) & 3 for i in range(4)], dim=1).reshape(-1)
    return fields.to(torch.int8) - 1


def flush_subnormal(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x.abs() < _TINY, x * 0.0, x)


def reciprocal_like_cuda(m: torch.Tensor) -> torch.Tensor:
    """rcp.approx.ftz.f32 of a float32 tensor, bit for bit."""
    m = m.to(torch.float32)
    bits = m.view(torch.int32)
    magnitude = bits & 0x7FFFFFFF
    ieee = 1.0 / m
    delta = _rcp_delta_table().to(m.device)[(bits & 0x7FFFFF).long()].to(torch.int32)
    result = (ieee.view(torch.int32) + delta).view(torch.float32)
    sign_inf = torch.where(m < 0, -math.inf, math.inf).to(torch.float32)
    result = torch.where(ieee.abs() < _TINY, ieee * 0.0, result)  # subnormal result -> 0
    result = torch.where(magnitude < 0x00800000, sign_inf, result)  # zero / subnormal -> inf
    result = torch.where(magnitude == 0x7F800000, torch.copysign(torch.zeros_like(m), m), result)  # inf -> 0
    return torch.where(torch.isnan(m), m, result)


def multiply_like_cuda(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a * b in float32 with subnormal inputs and result flushed to zero (mul.ftz.f32)."""
    return flush_subnormal(flush_subnormal(a) * flush_subnormal(b))


# ---- blockwise helpers ------------------------------------------------------------------------------


def _blocks(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """[n] -> [blocks, blocksize], the tail padded with zeros."""
    n = flat.numel()
    blocks = -(-n // blocksize)
    padded = torch.zeros(blocks * blocksize, dtype=flat.dtype, device=flat.device)
    padded[:n] = flat
    return padded.view(blocks, blocksize)


def block_absmax(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """max |x| per block; NaN propagates; subnormals count as zero."""
    return flush_subnormal(_blocks(flat.abs(), blocksize)).amax(dim=1)


def _scaled(A: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x * rcp.approx(absmax) per element with one zero padding element for odd n, absmax)."""
    flat = A.reshape(-1).to(torch.float32)
    n = flat.numel()
    absmax = block_absmax(flat, blocksize)
    recip = reciprocal_like_cuda(absmax)
    scaled = multiply_like_cuda(_blocks(flat, blocksize), recip[:, None]).reshape(-1)
    return scaled[: n + (n % 2)], absmax


def _check_blocksize(blocksize: int) -> None:
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be a power of two from 32 to 4096, got {blocksize}")


def quantize_nf4_codes(x: torch.Tensor) -> torch.Tensor:
    t = torch.tensor(NF4_THRESHOLDS, dtype=torch.float32, device=x.device)
    return (x[..., None] > t).sum(-1).to(torch.uint8)


def quantize_fp4_codes(x: torch.Tensor) -> torch.Tensor:
    t = torch.tensor(FP4_THRESHOLDS, dtype=torch.float32, device=x.device)
    rank = (x.abs()[..., None] > t).sum(-1)
    pattern = torch.tensor(FP4_RANK_TO_PATTERN, dtype=torch.uint8, device=x.device)[rank]
    return pattern | torch.where(x < 0, 8, 0).to(torch.uint8)


def quantize_with_code256(code: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Binary search over a sorted 256-entry code, then the nearest of the neighbours (bitsandbytes' ties)."""
    code = code.to(torch.float32)
    pivot = torch.full(x.shape, 127, dtype=torch.long, device=x.device)
    upper_index = torch.full_like(pivot, 255)
    lower_index = torch.zeros_like(pivot)
    lower = torch.full(x.shape, -1.0, dtype=torch.float32, device=x.device)
    upper = torch.full(x.shape, 1.0, dtype=torch.float32, device=x.device)
    value = code[pivot]
    for step in (64, 32, 16, 8, 4, 2, 1):
        above = x > value
        lower_index = torch.where(above, pivot, lower_index)
        lower = torch.where(above, value, lower)
        upper_index = torch.where(above, upper_index, pivot)
        upper = torch.where(above, upper, value)
        pivot = torch.where(above, pivot + step, pivot - step)
        value = code[pivot]
    upper = torch.where(upper_index == 255, code[255], upper)
    lower = torch.where(lower_index == 0, code[0], lower)
    above = x > value
    up_choice = torch.where(x > (upper + value) * 0.5, upper_index, pivot)
    down_choice = torch.where(x < (lower + value) * 0.5, lower_index, pivot)
    return torch.where(above, up_choice, down_choice).to(torch.uint8)


def packed_storage_elements(n: int, itemsize: int) -> int:
    return -(-((n + 1) // 2) // itemsize)


# ---- the ops ----------------------------------------------------------------------------------------


def quantize_4bit(
    A: torch.Tensor, blocksize: int = 64, quant_type: str = "fp4", quant_storage: torch.dtype = torch.uint8
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_blocksize(blocksize)
    table_4bit(quant_type)  # validates quant_type
    scaled, absmax = _scaled(A, blocksize)
    codes = quantize_nf4_codes(scaled) if quant_type == "nf4" else quantize_fp4_codes(scaled)
    packed = (codes[0::2] << 4) | codes[1::2]
    itemsize = torch.empty((), dtype=quant_storage).element_size()
    storage = torch.zeros(packed_storage_elements(A.numel(), itemsize) * itemsize, dtype=torch.uint8, device=A.device)
    storage[: packed.numel()] = packed
    return storage.view(quant_storage).reshape(-1, 1), absmax


def _unpack_codes(A: torch.Tensor, n: int) -> torch.Tensor:
    raw = A.reshape(-1).view(torch.uint8) if A.dtype != torch.uint8 else A.reshape(-1)
    codes = torch.stack([raw >> 4, raw & 15], dim=1).reshape(-1)
    return codes[:n].long()


def dequantize_4bit(
    A: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    quant_type: str,
    shape: Sequence[int],
    dtype: torch.dtype,
    absmax_8bit: torch.Tensor | None = None,
    absmax_code: torch.Tensor | None = None,
    absmax_offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """table[code] * scale; with absmax_8bit given, `absmax` is the nested absmax (see nested_absmax)."""
    _check_blocksize(blocksize)
    if absmax_8bit is not None:
        absmax = nested_absmax(absmax_8bit, absmax, absmax_code, absmax_offset)
    n = math.prod(shape)
    table = levels_4bit(quant_type, A.device)
    codes = _unpack_codes(A, n)
    scale = absmax.to(torch.float32).repeat_interleave(blocksize)[:n]
    return multiply_like_cuda(table[codes], scale).to(dtype).reshape(shape)


def quantize_blockwise(A: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    _check_blocksize(blocksize)
    scaled, absmax = _scaled(A, blocksize)
    codes = quantize_with_code256(code, scaled[: A.numel()])
    return codes.reshape(A.shape), absmax


def dequantize_blockwise(
    A: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, dtype: torch.dtype
) -> torch.Tensor:
    _check_blocksize(blocksize)
    n = A.numel()
    scale = absmax.to(torch.float32).repeat_interleave(blocksize)[:n]
    values = code.to(torch.float32)[A.reshape(-1).long()]
    return multiply_like_cuda(values, scale).to(dtype).reshape(A.shape)


def nested_absmax(
    absmax_8bit: torch.Tensor, nested_absmax: torch.Tensor, code: torch.Tensor, offset: torch.Tensor
) -> torch.Tensor:
    """Per-block float32 scales of a double-quantized weight: code[q] * absmax2[b // 256] + offset."""
    return dequantize_blockwise(absmax_8bit, nested_absmax, code, NESTED_BLOCKSIZE, torch.float32) + offset


def gemm_4bit(
    A: torch.Tensor,
    B: torch.Tensor,
    shapeB: Sequence[int],
    absmax: torch.Tensor,
    blocksize: int,
    quant_type: str,
    bias: torch.Tensor | None = None,
    absmax_8bit: torch.Tensor | None = None,
    absmax_code: torch.Tensor | None = None,
    absmax_offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """A @ dequantize(B).T (+ bias), computed in float64 (the accuracy oracle for the matmul kernels)."""
    weight = dequantize_4bit(
        B, absmax, blocksize, quant_type, shapeB, torch.float32, absmax_8bit, absmax_code, absmax_offset
    ).double()
    out = A.double() @ weight.T
    if bias is not None:
        out = out + bias.double()
    return out


def gemv_4bit(
    A: torch.Tensor, B: torch.Tensor, shapeB: Sequence[int], absmax: torch.Tensor, code: torch.Tensor, blocksize: int
) -> torch.Tensor:
    n = math.prod(shapeB)
    codes = _unpack_codes(B, n)
    scale = absmax.to(torch.float32).repeat_interleave(blocksize)[:n]
    weight = multiply_like_cuda(code.to(torch.float32)[codes], scale).reshape(shapeB).double()
    return A.double() @ weight.T


# ---- the INT8 tier (row-wise int8, LLM.int8): stated in reference_int8.py ------------------------------
from .reference_int8 import (  # noqa: E402, F401
    int8_linear,
    int8_linear_matmul,
    int8_mm_dequant,
    int8_scaled_mm,
    int8_vectorwise_dequant,
    int8_vectorwise_quant,
)
