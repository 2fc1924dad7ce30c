"""The tensor-core gemm_4bit kernel for larger batches (csrc/cuda/gemm_4bit_prefill.cu), through the op.

The dispatch (cuda_ops.cpp) sends 16 < M <= 32 (64 on large weights) there for the shapes it supports;
the environment variable HALFBYTE_GEMM_4BIT_KERNEL forces the path for any M in these tests: "prefill" is the
mma.sync kernel (sm_80 code; on the H100 this runs the sm_80 path), "wgmma" its sm_90a variant, "tma" the
warp-specialized sm_90a kernel (gemm_4bit_prefill_tma.cu; where the device has them; elsewhere the default rule
applies and the same assertions hold). HALFBYTE_GEMM_4BIT_TMA_PLAN=rows,splits sets the TMA kernel's tile and
split of K.
"""

import os
from contextlib import contextmanager

import halfbyte
import halfbyte.functional as F
import pytest
import torch
from conftest import assert_graph_and_compile_equal_eager, assert_same_bits, random_tensor
from test_matmul import TOLERANCE, _reference, relative_error

pytestmark = pytest.mark.cuda


@contextmanager
def _environment(name, value):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def forced_kernel(name):
    return _environment("HALFBYTE_GEMM_4BIT_KERNEL", name)


@contextmanager
def forced_tma_plan(rows, splits):
    with forced_kernel("tma"), _environment("HALFBYTE_GEMM_4BIT_TMA_PLAN", f"{rows},{splits}"):
        yield


def _weight(N, K, blocksize=64, quant_type="nf4", nested=False, seed=0):
    W = random_tensor((N, K), torch.float32, "cuda", seed=seed)
    return F.quantize_4bit(W, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("blocksize", [64, 128, 256, 4096])  # 256: 330 scale blocks, a partial last code word
@pytest.mark.parametrize("kernel", ["prefill", "wgmma", "tma"])
def test_one_hot_rows_give_the_dequantized_weight_exactly(dtype, quant_type, nested, blocksize, kernel):
    # A = the first M rows of the identity: out[m, j] = W[j, m] with a single nonzero product per sum, so
    # the output is the dequantized weight, bit for bit, whatever the order of the float32 sums. This
    # checks the kernel's permuted K order, the nibble order, the block scales and the output layout.
    N, K = 264, 320
    packed, state = _weight(N, K, blocksize, quant_type, nested, seed=blocksize)
    expected = F.dequantize_4bit(packed, state).to(dtype)  # [N, K]
    for M in (17, 64, 100, 320):
        A = torch.eye(K, dtype=dtype, device="cuda")[:M]
        with forced_kernel(kernel):
            out = halfbyte.matmul_4bit(A, packed.t(), state)
        # equal values (a -0.0 weight comes out as +0.0: the sum adds +0.0 products of the zero entries)
        assert torch.equal(out, expected[:, :M].t()), f"M={M}"
        assert out.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("M", [17, 33, 64, 65, 128, 129, 300, 1024])
@pytest.mark.parametrize("kernel", ["prefill", "wgmma", "tma"])
def test_matches_the_reference(dtype, nested, M, kernel):
    N, K = 1032, 1088  # N not a multiple of the 128-row tile, K of 17 stages: split and unsplit K
    packed, state = _weight(N, K, 64, "nf4", nested, seed=M)
    A = random_tensor((M, K), dtype, "cuda", seed=M)
    bias = random_tensor((N,), dtype, "cuda", seed=7)
    with forced_kernel(kernel):
        out = halfbyte.matmul_4bit(A, packed.t(), state, bias=bias)
    assert out.shape == (M, N) and out.dtype == dtype
    assert relative_error(out.cpu(), _reference(A, packed, state, bias)) < TOLERANCE[dtype]


@pytest.mark.parametrize("kernel", ["prefill", "wgmma", "tma"])
def test_same_as_dequantize_then_matmul_up_to_summation_order(kernel):
    # Both round the weight the same way; they differ by float32 summation order and the final rounding.
    packed, state = _weight(4096, 4096, 64, "nf4", True, seed=3)
    A = random_tensor((256, 4096), torch.bfloat16, "cuda", seed=4)
    with forced_kernel(kernel):
        ours = halfbyte.matmul_4bit(A, packed.t(), state).float()
    with forced_kernel("dequantize"):
        theirs = halfbyte.matmul_4bit(A, packed.t(), state).float()
    # at most one bf16 step apart where the float32 sums straddle a rounding boundary (2^-7 relative at
    # most), plus the sum order's float32 error against the size of the terms (~1e-6 of sum |a*w|)
    W = F.dequantize_4bit(packed, state).float()
    terms = A.float().abs() @ W.abs().t()
    assert ((ours - theirs).abs() <= theirs.abs() * 2**-7 + 1e-5 * terms).all()


@pytest.mark.parametrize("kernel", ["prefill", "wgmma", "tma"])
def test_split_k_is_deterministic(kernel):
    packed, state = _weight(1024, 4096, 64, "nf4", False, seed=5)  # 8 row tiles: K is split
    A = random_tensor((40, 4096), torch.bfloat16, "cuda", seed=6)
    with forced_kernel(kernel):
        first = halfbyte.matmul_4bit(A, packed.t(), state)
        for _ in range(3):
            assert_same_bits(halfbyte.matmul_4bit(A, packed.t(), state), first)


@pytest.mark.parametrize("kernel", ["prefill", "tma"])
def test_leading_batch_dims_and_strided_rows(kernel):
    N, K = 512, 1024
    packed, state = _weight(N, K, 128, "fp4", True, seed=8)
    big = random_tensor((3, 30, K + 64), torch.bfloat16, "cuda", seed=9)
    A = big[..., :K]  # rows 16-byte aligned with a stride > K: read in place
    with forced_kernel(kernel):
        out = halfbyte.matmul_4bit(A, packed.t(), state)
    assert out.shape == (3, 30, N)
    ref = _reference(A.reshape(-1, K), packed, state).reshape(3, 30, N)
    assert relative_error(out.cpu(), ref) < TOLERANCE[torch.bfloat16]
    odd = random_tensor((90, K + 1), torch.bfloat16, "cuda", seed=10)[:, 1:]  # rows not 16-byte aligned
    with forced_kernel(kernel):
        out = halfbyte.matmul_4bit(odd, packed.t(), state)  # falls back to a path that reads any stride
    assert relative_error(out.cpu(), _reference(odd, packed, state)) < TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize(
    "N, K, blocksize, dtype",
    [
        (96, 200, 64, torch.bfloat16),
        (256, 512, 32, torch.bfloat16),
        (250, 512, 64, torch.float16),
        (256, 512, 64, torch.float32),
    ],
)
def test_shapes_the_kernel_does_not_take_fall_back(N, K, blocksize, dtype):
    # K % 64 != 0, blocksize 32, N % 8 != 0, float32: forced "prefill" falls back to the default rule.
    packed, state = _weight(N, K, blocksize, "nf4", False, seed=N)
    A = random_tensor((80, K), dtype, "cuda", seed=K)
    with forced_kernel("prefill"):
        out = halfbyte.matmul_4bit(A, packed.t(), state)
    assert relative_error(out.cpu(), _reference(A, packed, state)) < TOLERANCE[dtype]


@pytest.mark.parametrize("M, kernel", [(24, "auto"), (256, "prefill"), (256, "wgmma"), (256, "tma")])
def test_cuda_graph_and_compile_equal_eager(M, kernel):
    # M = 24 takes the mma.sync kernel by the default rule; M = 256 forced (K split: 32 or 16 tiles)
    with forced_kernel(kernel):
        _graph_and_compile_equal_eager(M)


@pytest.mark.parametrize("rows", [64, 128, 256])
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("nested", [False, True])
def test_tma_kernel_every_tile_and_split(rows, splits, nested):
    # The TMA kernel with each tile height and K whole or split in three: one-hot rows give the dequantized
    # weight bit for bit (a split adds exact zeros), random rows match the reference.
    N, K = 264, 1088
    packed, state = _weight(N, K, 64, "nf4", nested, seed=rows + splits)
    expected = F.dequantize_4bit(packed, state).to(torch.bfloat16)
    for M in (17, 64, 129, 300):
        A = torch.eye(K, dtype=torch.bfloat16, device="cuda")[:M]
        with forced_tma_plan(rows, splits):
            out = halfbyte.matmul_4bit(A, packed.t(), state)
        assert torch.equal(out, expected[:, :M].t()), f"M={M}"
        A = random_tensor((M, K), torch.bfloat16, "cuda", seed=M)
        bias = random_tensor((N,), torch.bfloat16, "cuda", seed=M + 1)
        with forced_tma_plan(rows, splits):
            out = halfbyte.matmul_4bit(A, packed.t(), state, bias=bias)
        assert relative_error(out.cpu(), _reference(A, packed, state, bias)) < TOLERANCE[torch.bfloat16]


def _graph_and_compile_equal_eager(M):
    packed, state = _weight(2048, 1024, 64, "nf4", True, seed=M)
    x = random_tensor((M, 1024), torch.bfloat16, "cuda", seed=M)
    assert_graph_and_compile_equal_eager(lambda a: halfbyte.matmul_4bit(a, packed.t(), state), x)
