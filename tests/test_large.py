"""Tensors of more than 2**31 elements (64-bit indexing; bitsandbytes' kernels fail there)."""

import pytest
import torch
from conftest import DEVICES, assert_same_bits
from halfbyte import reference as R

N = 2**31 + 3 * 64 + 5  # past int32, odd, last block partial


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_quantize_and_dequantize_past_2_31_elements(device):
    try:
        A = torch.empty(N, dtype=torch.bfloat16, device=device)
    except (RuntimeError, torch.OutOfMemoryError):
        pytest.skip("not enough memory for a 4 GiB tensor")
    A.fill_(0.5)
    tail = torch.linspace(-3, 3, 8 * 64 + 5).to(torch.bfloat16)  # distinct values in the last 8 blocks + tail
    A[-tail.numel() :] = tail.to(device)
    packed, absmax = torch.ops.halfbyte.quantize_4bit(A, 64, "nf4", torch.uint8)
    assert packed.shape == ((N + 1) // 2, 1) and absmax.shape == (-(-N // 64),)
    # Blocks are independent: the last blocks must equal the quantization of those blocks alone.
    start = (N // 64 - 8) * 64
    ref_packed, ref_absmax = R.quantize_4bit(A[start:].cpu(), 64, "nf4", torch.uint8)
    assert_same_bits(packed[start // 2 :].cpu(), ref_packed, "codes past 2**31")
    assert_same_bits(absmax[start // 64 :].cpu(), ref_absmax, "absmax past 2**31")
    assert torch.all(absmax[: start // 64] == 0.5) and torch.all(packed[: start // 2] == 0xFF)
    del A
    out = torch.ops.halfbyte.dequantize_4bit(packed, absmax, 64, "nf4", [N], torch.bfloat16)
    ref = R.dequantize_4bit(ref_packed, ref_absmax, 64, "nf4", [N - start], torch.bfloat16)
    assert_same_bits(out[start:].cpu(), ref, "dequantized past 2**31")
    assert torch.all(out[:start] == 0.5)
