"""gemm_4bit / gemv_4bit / matmul_4bit against dequantize + matmul in float64 (reference.gemm_4bit).

Tolerances are relative Frobenius errors ||out - ref|| / ||ref|| with the reason on each: the kernels may
round the dequantized weight to the activation dtype and round the output to it; float32 accumulation
order adds ~1e-6.
"""

import halfbyte
import halfbyte.functional as F
import pytest
import torch
from conftest import DEVICES, random_tensor
from halfbyte import reference as R
from halfbyte.autograd import gemm_4bit_args

# bf16: weight and output rounded to 8 mantissa bits (2^-9 relative each); fp16: 11 bits; fp32: accumulation only.
TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}


def relative_error(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


def _weight(N, K, blocksize, quant_type, nested, device, seed=0):
    W = random_tensor((N, K), torch.float32, device, seed=seed)
    return F.quantize_4bit(W, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)


def _reference(A, packed, state, bias=None):
    args, nested = gemm_4bit_args(packed, state)
    nested = {k: v.cpu() for k, v in nested.items()}
    B, shapeB, absmax, blocksize, quant_type = args
    return R.gemm_4bit(
        A.cpu(),
        B.cpu(),
        shapeB,
        absmax.cpu(),
        blocksize,
        quant_type,
        bias.cpu() if bias is not None else None,
        **nested,
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("M", [1, 3, 16, 17, 64])
def test_gemm_4bit_matches_reference(device, dtype, quant_type, nested, M):
    N, K = 96, 200  # K not a multiple of the blocksize: blocks straddle rows of W
    packed, state = _weight(N, K, 64, quant_type, nested, device)
    A = random_tensor((M, K), dtype, device, seed=M)
    bias = random_tensor((N,), dtype, device, seed=99)
    out = halfbyte.matmul_4bit(A, packed.t(), state, bias=bias)
    assert out.shape == (M, N) and out.dtype == dtype
    assert relative_error(out.cpu(), _reference(A, packed, state, bias)) < TOLERANCE[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("blocksize", [32, 128, 256, 1024, 4096])
def test_every_blocksize_and_odd_shapes(device, blocksize):
    for N, K in ((1, 33), (7, 4099), (33, 64)):
        packed, state = _weight(N, K, blocksize, "nf4", False, device, seed=K)
        for M in (1, 5, 20):
            A = random_tensor((M, K), torch.bfloat16, device, seed=M)
            out = halfbyte.matmul_4bit(A, packed, state)
            assert relative_error(out.cpu(), _reference(A, packed, state)) < TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("device", DEVICES)
def test_leading_batch_dims_and_non_contiguous_input(device):
    packed, state = _weight(48, 128, 64, "nf4", True, device)
    A = random_tensor((2, 3, 5, 256), torch.float16, device)[..., ::2]  # [2, 3, 5, 128], strided
    assert not A.is_contiguous()
    out = halfbyte.matmul_4bit(A, packed, state)
    assert out.shape == (2, 3, 5, 48)
    ref = _reference(A.reshape(-1, 128), packed, state).reshape(2, 3, 5, 48)
    assert relative_error(out.cpu(), ref) < TOLERANCE[torch.float16]
    # Transposed A (column-major rows): same result
    At = random_tensor((128, 4), torch.float16, device).t()
    assert relative_error(halfbyte.matmul_4bit(At, packed, state).cpu(), _reference(At, packed, state)) < 2e-3


@pytest.mark.parametrize("device", DEVICES)
def test_gemv_4bit_and_out_argument(device):
    packed, state = _weight(64, 128, 64, "fp4", True, device)
    A = random_tensor((1, 128), torch.bfloat16, device)
    out = F.gemv_4bit(A, packed.t(), state=state)
    ref = _reference(A, packed, state)
    assert relative_error(out.cpu(), ref) < TOLERANCE[torch.bfloat16]
    buffer = torch.empty(1, 64, dtype=torch.bfloat16, device=device)
    assert F.gemv_4bit(A, packed, out=buffer, state=state) is buffer
    assert torch.equal(buffer, out)
    target = torch.empty(1, 64, dtype=torch.bfloat16, device=device)
    assert halfbyte.matmul_4bit(A, packed, state, out=target) is target


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    packed, state = _weight(16, 64, 64, "nf4", False, device)
    out = halfbyte.matmul_4bit(torch.empty(0, 64, device=device), packed, state)
    assert out.shape == (0, 16)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nested", [False, True])
def test_gradients_for_input_and_bias(device, nested):
    packed, state = _weight(40, 72, 64, "nf4", nested, device)
    weight = F.dequantize_4bit(packed, state)  # float32 [40, 72]
    A = random_tensor((6, 72), torch.float32, device).requires_grad_()
    bias = random_tensor((40,), torch.float32, device, seed=3).requires_grad_()
    grad = random_tensor((6, 40), torch.float32, device, seed=4)
    halfbyte.matmul_4bit(A, packed, state, bias=bias).backward(grad)
    A_ref = A.detach().clone().requires_grad_()
    bias_ref = bias.detach().clone().requires_grad_()
    torch.nn.functional.linear(A_ref, weight, bias_ref).backward(grad)
    torch.testing.assert_close(A.grad, A_ref.grad, rtol=1e-5, atol=1e-5)  # float32, accumulation order only
    torch.testing.assert_close(bias.grad, bias_ref.grad, rtol=1e-6, atol=1e-6)
    assert packed.grad is None and state.absmax.grad is None  # the 4-bit weight is frozen


def test_gradient_with_checkpointing_and_batch_dims():
    packed, state = _weight(32, 64, 64, "nf4", True, "cpu")
    A = random_tensor((2, 5, 64), torch.float32).requires_grad_()
    out = torch.utils.checkpoint.checkpoint(
        lambda x: halfbyte.matmul_4bit(x, packed, state).relu().sum(), A, use_reentrant=False
    )
    out.backward()
    A_ref = A.detach().clone().requires_grad_()
    torch.nn.functional.linear(A_ref, F.dequantize_4bit(packed, state)).relu().sum().backward()
    torch.testing.assert_close(A.grad, A_ref.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph_forward_and_backward(device):
    torch._dynamo.reset()
    packed, state = _weight(48, 64, 64, "nf4", True, device)

    def layer(x, bias):
        return halfbyte.matmul_4bit(x, packed, state, bias=bias).square().sum()

    compiled = torch.compile(layer, fullgraph=True)
    x = random_tensor((4, 64), torch.float32, device).requires_grad_()
    bias = torch.zeros(48, device=device, requires_grad=True)
    loss = compiled(x, bias)
    loss.backward()
    x_ref = x.detach().clone().requires_grad_()
    bias_ref = bias.detach().clone().requires_grad_()
    loss_ref = layer(x_ref, bias_ref)
    loss_ref.backward()
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)  # same kernels; fused elementwise order
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bias.grad, bias_ref.grad, rtol=1e-5, atol=1e-5)


def test_torch_compile_of_quantize_and_dequantize():
    torch._dynamo.reset()

    def round_trip(w):
        packed, absmax = torch.ops.halfbyte.quantize_4bit(w, 64, "nf4", torch.uint8)
        return torch.ops.halfbyte.dequantize_4bit(packed, absmax, 64, "nf4", list(w.shape), w.dtype)

    w = random_tensor((32, 128), torch.bfloat16)
    assert torch.equal(torch.compile(round_trip, fullgraph=True)(w), round_trip(w))


def test_weight_quantized_as_k_by_n_still_works_with_a_warning():
    W = random_tensor((64, 32), torch.float32)  # [K, N] by mistake
    packed, state = F.quantize_4bit(W, quant_type="nf4")
    A = random_tensor((3, 64), torch.float32)
    with pytest.warns(UserWarning, match="quantized as \\[K, N\\]"):
        out = halfbyte.matmul_4bit(A, packed, state)
    torch.testing.assert_close(out, A @ F.dequantize_4bit(packed, state), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_inference_path_equals_the_autograd_path(device):
    packed, state = _weight(48, 64, 64, "nf4", True, device)
    A = random_tensor((3, 64), torch.bfloat16, device)
    bias = random_tensor((48,), torch.bfloat16, device, seed=2)
    with_graph = halfbyte.matmul_4bit(A.clone().requires_grad_(), packed, state, bias=bias)
    assert with_graph.grad_fn is not None
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            out = halfbyte.matmul_4bit(A, packed, state, bias=bias)  # below the autograd key
        assert out.grad_fn is None and torch.equal(out, with_graph.detach())
