"""gemm_4bit's dequantize + cuBLAS path on CUDA, weight dequantized a chunk of rows at a time (cuda_ops.cpp,
gemm_4bit_dequantized): every chunk must read its own codes and scales (plain and nested, the nested absmax of
its group of 256 blocks) and write its own columns of the output.

HALFBYTE_GEMM_4BIT_KERNEL=dequantize forces the path at any M; HALFBYTE_GEMM_4BIT_CHUNK_BYTES=1 makes every
chunk the smallest that starts on a multiple of 256 scale blocks (256 * blocksize / gcd(K, 256 * blocksize)
rows), so these small weights are cut into several chunks with a shorter last one.
"""

import math

import halfbyte
import halfbyte.functional as F
import pytest
import torch
from conftest import assert_graph_and_compile_equal_eager, random_tensor
from test_gemm_4bit_prefill import _environment, _weight, forced_kernel
from test_matmul import TOLERANCE, _reference, relative_error

pytestmark = pytest.mark.cuda


def smallest_chunk_rows(K, blocksize):
    unit = 256 * blocksize
    return unit // math.gcd(K, unit)


def smallest_chunks():
    return _environment("HALFBYTE_GEMM_4BIT_CHUNK_BYTES", "1")


# (N, K, blocksize) and the smallest chunk: 256 rows (K = 320, 5 blocks of 64 per row), 16 rows (K = 4096 at
# blocksize 256), 256 rows (blocksize 4096), 512 rows (K = 384 at blocksize 256: blocks cross rows); every N
# leaves a shorter last chunk.
SHAPES = [(700, 320, 64), (300, 4096, 256), (600, 4096, 4096), (1100, 384, 256)]


@pytest.mark.parametrize("N, K, blocksize", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_one_hot_rows_give_the_dequantized_weight_exactly(N, K, blocksize, dtype, nested, quant_type):
    # A = rows of the identity: out[m, j] = W[j, m], one nonzero product per sum, so any chunk that read
    # another chunk's codes or scales, or wrote other columns, changes bits.
    assert N > 2 * smallest_chunk_rows(K, blocksize)  # several chunks, or this test tests nothing
    packed, state = _weight(N, K, blocksize, quant_type, nested, seed=N + blocksize)
    expected = F.dequantize_4bit(packed, state).to(dtype)  # [N, K]
    M = min(K, 300)
    A = torch.eye(K, dtype=dtype, device="cuda")[:M]
    with forced_kernel("dequantize"), smallest_chunks():
        out = halfbyte.matmul_4bit(A, packed.t(), state)
    assert out.shape == (M, N) and out.dtype == dtype
    assert torch.equal(out, expected[:, :M].t())


@pytest.mark.parametrize("N, K, blocksize", SHAPES[:2])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("nested", [False, True])
def test_matches_the_reference_with_bias(N, K, blocksize, dtype, nested):
    packed, state = _weight(N, K, blocksize, "nf4", nested, seed=K)
    A = random_tensor((37, K), dtype, "cuda", seed=N)
    bias = random_tensor((N,), dtype, "cuda", seed=blocksize)
    with forced_kernel("dequantize"), smallest_chunks():
        out = halfbyte.matmul_4bit(A, packed.t(), state, bias=bias)
    assert out.shape == (37, N) and out.dtype == dtype
    assert relative_error(out.cpu(), _reference(A, packed, state, bias)) < TOLERANCE[dtype]


def test_leading_batch_dims_and_strided_rows():
    N, K = 700, 320
    packed, state = _weight(N, K, 64, "nf4", True, seed=11)
    big = random_tensor((2, 40, K + 16), torch.bfloat16, "cuda", seed=12)
    A = big[..., :K]  # rows with a stride > K, passed to cuBLAS as lda
    with forced_kernel("dequantize"), smallest_chunks():
        out = halfbyte.matmul_4bit(A, packed.t(), state)
    assert out.shape == (2, 40, N)
    ref = _reference(A.reshape(-1, K), packed, state).reshape(2, 40, N)
    assert relative_error(out.cpu(), ref) < TOLERANCE[torch.bfloat16]


def test_chunked_and_whole_weight_agree_up_to_summation_order():
    # The same rounded weight either way; cuBLAS may pick another kernel (summation order) for a narrower N.
    packed, state = _weight(1024, 4096, 64, "nf4", True, seed=13)
    A = random_tensor((300, 4096), torch.bfloat16, "cuda", seed=14)
    with forced_kernel("dequantize"), smallest_chunks():
        chunked = halfbyte.matmul_4bit(A, packed.t(), state).float()
    with forced_kernel("dequantize"), _environment("HALFBYTE_GEMM_4BIT_CHUNK_BYTES", "0"):
        whole = halfbyte.matmul_4bit(A, packed.t(), state).float()
    # at most one bf16 step apart where the float32 sums straddle a rounding boundary (2^-7 relative at most),
    # plus the sum order's float32 error against the size of the terms (~1e-6 of sum |a*w|)
    W = F.dequantize_4bit(packed, state).float()
    terms = A.float().abs() @ W.abs().t()
    assert ((chunked - whole).abs() <= whole.abs() * 2**-7 + 1e-5 * terms).all()


def test_default_chunks_on_a_large_weight():
    # The default chunk (256 MiB of bf16: 32768 rows of K = 4096) on 66536 rows: two whole chunks and a shorter
    # third; one-hot rows read every row of W through its chunk's codes and first scale block.
    N, K, M = 2 * 32768 + 1000, 4096, 64
    packed, state = _weight(N, K, 64, "nf4", True, seed=15)
    A = torch.eye(K, dtype=torch.bfloat16, device="cuda")[:M]
    with forced_kernel("dequantize"):
        out = halfbyte.matmul_4bit(A, packed.t(), state)
    expected = F.dequantize_4bit(packed, state)[:, :M].to(torch.bfloat16).t()
    assert torch.equal(out, expected)


def test_cuda_graph_and_compile_equal_eager():
    packed, state = _weight(700, 320, 64, "nf4", True, seed=18)
    x = random_tensor((64, 320), torch.bfloat16, "cuda", seed=19)
    with forced_kernel("dequantize"), smallest_chunks():
        assert_graph_and_compile_equal_eager(lambda a: halfbyte.matmul_4bit(a, packed.t(), state), x)
