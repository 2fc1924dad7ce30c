"""Bad input gets a clear TypeError / ValueError naming the argument, from the ops and from functional;
never a crash, a read out of bounds or silently wrong numbers."""

import halfbyte.functional as F
import pytest
import torch
from conftest import DEVICES
from halfbyte import QuantState, matmul_4bit

ops = torch.ops.halfbyte


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def _quantized(device, n=4096, nested=False):
    A = torch.randn(n, device=device)
    return A, *F.quantize_4bit(A.view(64, -1), quant_type="nf4", compress_statistics=nested)


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.float64, torch.bool])
def test_non_float_input_is_rejected(device, dtype):
    A = torch.zeros(128, device=device).to(dtype)
    with pytest.raises(TypeError, match="quantize_4bit: A must be float16, bfloat16 or float32"):
        ops.quantize_4bit(A, 64, "nf4", torch.uint8)
    with pytest.raises(TypeError, match="quantize_blockwise: A must be float16"):
        ops.quantize_blockwise(A, F.create_dynamic_map().to(device), 64)
    with pytest.raises(TypeError, match="quantize_4bit: A must be float16"):
        F.quantize_4bit(A)


@pytest.mark.parametrize("blocksize", [0, -64, 16, 48, 100, 8192])
def test_blocksize_not_allowed(device, blocksize):
    A = torch.randn(256, device=device)
    with pytest.raises(ValueError, match=f"blocksize must be a power of two from 32 to 4096, got {blocksize}"):
        ops.quantize_4bit(A, blocksize, "nf4", torch.uint8)
    with pytest.raises(ValueError, match="blocksize must be a power of two"):
        ops.quantize_blockwise(A, F.create_dynamic_map().to(device), blocksize)
    with pytest.raises(ValueError, match="blocksize must be a power of two"):
        F.quantize_4bit(A, blocksize=blocksize)


def test_unknown_quant_type(device):
    A = torch.randn(256, device=device)
    with pytest.raises(ValueError, match="quant_type must be 'nf4' or 'fp4', got 'int4'"):
        ops.quantize_4bit(A, 64, "int4", torch.uint8)
    packed, absmax = ops.quantize_4bit(A, 64, "nf4", torch.uint8)
    with pytest.raises(ValueError, match="quant_type must be 'nf4' or 'fp4'"):
        ops.dequantize_4bit(packed, absmax, 64, "nf5", [256], torch.float32)
    with pytest.raises(ValueError, match="quant_type must be 'nf4' or 'fp4'"):
        F.quantize_4bit(A, quant_type="NF4")


def test_bad_quant_storage(device):
    with pytest.raises(ValueError, match="quant_storage must be uint8, float16, bfloat16 or float32"):
        ops.quantize_4bit(torch.randn(64, device=device), 64, "nf4", torch.int64)


def test_absmax_of_the_wrong_length_or_dtype(device):
    _, packed, state = _quantized(device)
    with pytest.raises(ValueError, match="absmax must have 64 entries \\(one per block\\), got 63"):
        ops.dequantize_4bit(packed, state.absmax[:63], 64, "nf4", [64, 64], torch.float32)
    with pytest.raises(TypeError, match="absmax must be float32, got Half"):
        ops.dequantize_4bit(packed, state.absmax.half(), 64, "nf4", [64, 64], torch.float32)
    codes, absmax8 = ops.quantize_blockwise(torch.randn(1000, device=device), F.create_dynamic_map().to(device), 64)
    with pytest.raises(ValueError, match="absmax must have 16 entries"):
        ops.dequantize_blockwise(codes, absmax8[:15], F.create_dynamic_map().to(device), 64, torch.float32)


def test_double_quantized_scales_are_checked(device):
    _, packed, state = _quantized(device, nested=True)
    args = (packed, state.state2.absmax, 64, "nf4", [64, 64], torch.float32)
    with pytest.raises(ValueError, match="absmax_8bit must be uint8 with one entry per block \\(64\\)"):
        ops.dequantize_4bit(*args, state.absmax[:10], state.state2.code, state.offset)
    with pytest.raises(ValueError, match="absmax_code is required"):
        ops.dequantize_4bit(*args, state.absmax)
    with pytest.raises(ValueError, match="absmax_offset must be a float32 scalar"):
        ops.dequantize_4bit(*args, state.absmax, state.state2.code, state.state2.absmax.repeat(2))


def test_packed_size_must_match_shape(device):
    _, packed, state = _quantized(device)
    with pytest.raises(ValueError, match="size does not match shape"):
        ops.dequantize_4bit(packed[:-1], state.absmax, 64, "nf4", [64, 64], torch.float32)
    with pytest.raises(ValueError, match="size does not match shape"):
        ops.dequantize_4bit(packed, state.absmax, 64, "nf4", [64, 65], torch.float32)
    state.shape = torch.Size([64, 128])  # a state that claims more elements than the bytes hold
    with pytest.raises(ValueError):
        F.dequantize_4bit(packed, state)
    with pytest.raises(ValueError, match="shape must have non-negative sizes"):
        ops.dequantize_4bit(packed, state.absmax, 64, "nf4", [-64, -64], torch.float32)


def test_bad_code_table(device):
    A = torch.randn(256, device=device)
    with pytest.raises(ValueError, match="code must be a float32 tensor of 256 entries, got Float with 255"):
        ops.quantize_blockwise(A, F.create_dynamic_map()[:255].to(device), 64)
    with pytest.raises(ValueError, match="code must be a float32 tensor of 256 entries, got Double"):
        ops.quantize_blockwise(A, F.create_dynamic_map().double().to(device), 64)


def test_bad_output_dtype_and_out_tensor(device):
    _, packed, state = _quantized(device)
    with pytest.raises(TypeError, match="dtype must be float16, bfloat16 or float32, got Int"):
        ops.dequantize_4bit(packed, state.absmax, 64, "nf4", [64, 64], torch.int32)
    with pytest.raises(ValueError, match="out must have shape"):
        ops.dequantize_4bit.out(
            packed, state.absmax, 64, "nf4", [64, 64], torch.float32, out=torch.empty(64, 63, device=device)
        )
    with pytest.raises(TypeError, match="out must have dtype"):
        ops.dequantize_4bit.out(
            packed,
            state.absmax,
            64,
            "nf4",
            [64, 64],
            torch.float32,
            out=torch.empty(64, 64, dtype=torch.half, device=device),
        )


def test_tensors_on_different_devices_are_rejected():
    if "cuda" not in DEVICES:
        pytest.skip("needs a GPU to put tensors on two devices")
    _, packed, state = _quantized("cuda")
    with pytest.raises(ValueError, match="absmax must be on cuda"):
        ops.dequantize_4bit(packed, state.absmax.cpu(), 64, "nf4", [64, 64], torch.float32)


def test_uint8_codes_required_for_dequantize_blockwise(device):
    with pytest.raises(TypeError, match="A must be uint8 codes"):
        ops.dequantize_blockwise(
            torch.zeros(64, device=device),
            torch.ones(1, device=device),
            F.create_dynamic_map().to(device),
            64,
            torch.float32,
        )
    with pytest.raises(TypeError, match="A must be uint8 codes"):
        F.dequantize_blockwise(torch.zeros(64, device=device), absmax=torch.ones(1, device=device))


def test_functional_argument_errors(device):
    A = torch.randn(64, 64, device=device)
    with pytest.raises(TypeError, match="A must be a torch.Tensor, got list"):
        F.quantize_4bit([1.0, 2.0])
    packed, state = F.quantize_4bit(A)
    with pytest.raises(ValueError, match="pass quant_state, or both absmax and out"):
        F.dequantize_4bit(packed)
    with pytest.raises(ValueError, match="pass quant_state, or absmax"):
        F.dequantize_blockwise(packed)
    with pytest.raises(ValueError, match="state .* is required"):
        F.gemv_4bit(A, packed)
    with pytest.raises(TypeError, match="quant_state must be a QuantState"):
        F.dequantize_4bit(packed, {"absmax": state.absmax})


def test_matmul_shape_and_dtype_errors(device):
    W = torch.randn(32, 64, device=device)
    packed, state = F.quantize_4bit(W, quant_type="nf4")
    with pytest.raises(ValueError, match="A's last dimension .* must equal K = shapeB\\[1\\] \\(64\\)"):
        matmul_4bit(torch.randn(3, 48, device=device), packed, state)
    with pytest.raises(TypeError, match="A must be float16, bfloat16 or float32, got Long"):
        ops.gemm_4bit(torch.ones(3, 64, dtype=torch.long, device=device), packed, [32, 64], state.absmax, 64, "nf4")
    with pytest.raises(ValueError, match="bias must have shape \\[32\\]"):
        matmul_4bit(torch.randn(3, 64, device=device), packed, state, bias=torch.zeros(31, device=device))
    with pytest.raises(TypeError, match="bias dtype"):
        matmul_4bit(
            torch.randn(3, 64, device=device), packed, state, bias=torch.zeros(32, dtype=torch.half, device=device)
        )
    with pytest.raises(ValueError, match="quant_state is required"):
        matmul_4bit(torch.randn(3, 64, device=device), packed, None)
    with pytest.raises(ValueError, match="absmax_code is required"):
        ops.gemm_4bit(
            torch.randn(3, 64, device=device),
            packed,
            [32, 64],
            state.absmax[:1],
            64,
            "nf4",
            absmax_8bit=torch.zeros(32, dtype=torch.uint8, device=device),
        )


@pytest.mark.parametrize("nested", [False, True])
def test_nan_and_inf_inputs_are_documented_not_crashes(device, nested):
    # Documented behaviour: a non-finite value makes its block non-finite after dequantization. With double
    # quantization the unit is the group of 256 blocks sharing a nested absmax (the format cannot mark one
    # block); everything outside stays finite. tests/test_ops.py checks the plain case bit for bit.
    A = torch.randn(600, 64, device=device)
    A[2, 7] = float("nan")  # block 2, nested group 0
    A[300, 0] = float("-inf")  # block 300, nested group 1
    packed, state = F.quantize_4bit(A.reshape(-1), quant_type="fp4", compress_statistics=nested)
    out = F.dequantize_4bit(packed, state).view(600, 64)
    poisoned = [range(0, 256), range(256, 512)] if nested else [[2], [300]]
    assert torch.isnan(out[list(poisoned[0])]).any(dim=1).all()
    assert not torch.isfinite(out[list(poisoned[1])]).all(dim=1).any()
    clean = torch.ones(600, dtype=torch.bool)
    for rows in poisoned:
        clean[list(rows)] = False
    assert torch.isfinite(out[clean]).all()
    reference = F.dequantize_4bit(*F.quantize_4bit(A.reshape(-1).nan_to_num(0, 0, 0), quant_type="fp4")).view(600, 64)
    if not nested:  # plain absmax: the clean blocks are exactly what they would be without the bad values
        assert torch.equal(out[clean], reference[clean])


def test_quant_state_shape_must_be_2d_for_matmul(device):
    packed, state = F.quantize_4bit(torch.randn(4, 8, 64, device=device))
    with pytest.raises(ValueError, match="quant_state.shape must be \\[N, K\\]"):
        matmul_4bit(torch.randn(2, 64, device=device), packed, state)
    assert isinstance(state, QuantState)
