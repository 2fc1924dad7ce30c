"""The INT8 ops (LLM.int8-style row-wise int8) against reference_int8.py, bit for bit where the algorithm is exact,
on every device present; torch.library.opcheck; bad input; parity with bitsandbytes 0.50.2.

bitsandbytes' CPU path (the one installed here) differs from its own CUDA kernels, which halfbyte follows, in
three documented places, and only there may halfbyte differ from it: (a) int8_vectorwise_quant scales a row by
127 / absmax with an IEEE division where the CUDA kernel uses __fdividef (127 * rcp.approx(absmax)), so a value
whose x * 127 / absmax is within ~1e-5 of a half-integer may get the neighbouring code; (b) int8_mm_dequant
multiplies by 6.200124e-05 where the CUDA kernel uses 6.200012e-05 = 1/127^2 (a relative 1.8e-5), in another
order; (c) a NaN makes the CPU path's absmax NaN (as halfbyte does) while the CUDA kernel skips it. Against
bitsandbytes' CUDA kernels (when it is importable on the GPU machine) codes and stats must be identical.
"""

import halfbyte.functional as F
import halfbyte.reference_int8 as R
import pytest
import torch
from conftest import DEVICES, assert_same_bits, assert_same_values, bnb_or_skip, random_tensor

ops = torch.ops.halfbyte
FLOATS = [torch.float16, torch.bfloat16, torch.float32]
# Relative (Frobenius) error of int8_linear against its float64 statement: float32 accumulation only for float32
# output; rounding the output to the dtype (at most 2^-9 bfloat16 / 2^-12 float16 per element) for 16-bit ones,
# twice where the outlier columns are added in the 16-bit dtype.
LINEAR_TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 6e-3, torch.float16: 1.5e-3}


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def assert_quant_equal(got, want, what=""):
    codes, stats, cols = got
    ref_codes, ref_stats, ref_cols = want
    assert_same_bits(codes.cpu(), ref_codes, f"{what} codes")
    assert_same_values(stats.cpu(), ref_stats, f"{what} row_stats")
    if ref_cols is None:
        assert cols is None, f"{what}: outlier_cols must be None without a threshold"
    else:
        assert_same_bits(cols.cpu(), ref_cols, f"{what} outlier_cols")


# ---- int8_vectorwise_quant / dequant ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (37, 301), (2, 5, 64), (4, 4104), (6,)])
@pytest.mark.parametrize("threshold", [0.0, 1.5])
def test_vectorwise_quant_matches_reference(device, dtype, shape, threshold):
    A = random_tensor(shape, dtype, device, seed=sum(shape), scale=0.7)
    got = ops.int8_vectorwise_quant(A, threshold)
    assert got[0].shape == A.shape and got[0].dtype == torch.int8 and got[1].shape == (A.numel() // shape[-1],)
    assert_quant_equal(got, R.int8_vectorwise_quant(A.cpu(), threshold), f"{dtype} {shape}")
    out = ops.int8_vectorwise_dequant(got[0], got[1])
    assert out.dtype == torch.float32 and out.shape == A.shape
    assert_same_bits(out.cpu(), R.int8_vectorwise_dequant(got[0].cpu(), got[1].cpu()))


@pytest.mark.parametrize("dtype", FLOATS)
def test_values_on_half_integers_round_like_the_reference(device, dtype):
    # Rows of absmax 127 (scale 127 * rcp(127), about 1): every k + 0.5 and its float neighbours.
    halves = torch.arange(-126.5, 127.0, 1.0)
    x = torch.stack([torch.nextafter(halves, halves - 1), halves, torch.nextafter(halves, halves + 1)], 1).reshape(-1)
    rows = torch.cat([torch.full((x.numel(), 1), 127.0), x[:, None]], 1).reshape(-1, 2)
    A = rows.reshape(-1, 6).to(dtype).to(device)
    assert_quant_equal(ops.int8_vectorwise_quant(A), R.int8_vectorwise_quant(A.cpu()), "half-integers")
    A = (rows * 0.37).to(dtype).to(device)  # absmax 46.99: a scale away from 1
    assert_quant_equal(ops.int8_vectorwise_quant(A), R.int8_vectorwise_quant(A.cpu()), "half-integers scaled")


def test_special_rows_stay_inside_their_row(device):
    A = torch.randn(6, 40)
    A[0] = 0.0  # zero row: stats 0, codes 0
    A[1, 3] = float("nan")  # NaN: this row's stats NaN and codes 0 (dequantizes to NaN), no other row
    A[2, 5] = float("inf")  # inf: stats inf, codes 0
    A[3] = 1e-40  # only subnormals: rcp.approx.ftz flushes them, codes 0
    A = A.to(device)
    codes, stats, _ = ops.int8_vectorwise_quant(A)
    assert_quant_equal((codes, stats, None), R.int8_vectorwise_quant(A.cpu()), "special rows")
    codes, stats = codes.cpu(), stats.cpu()
    assert stats[0] == 0 and torch.isnan(stats[1]) and torch.isinf(stats[2]) and stats[3] > 0
    assert torch.all(codes[:4] == 0)
    assert torch.all(codes[4:].abs().amax(1) == 127), "ordinary rows use the full code range"
    out = ops.int8_vectorwise_dequant(codes, stats)
    assert torch.isnan(out[1]).all() and torch.isfinite(out[[0, 3, 4, 5]]).all()


def test_outlier_columns_are_zeroed_in_every_row(device):
    A = random_tensor((5, 16), torch.float16, device, seed=3)
    A[1, 2] = 7.0
    A[4, 9] = -6.0  # exactly on the threshold: an outlier (|x| >= threshold)
    A[0, 11] = 5.99
    codes, stats, cols = ops.int8_vectorwise_quant(A, 6.0)
    assert cols.dtype == torch.int64 and cols.tolist() == [2, 9]
    assert torch.all(codes[:, [2, 9]] == 0) and codes[0, 11] == 127
    # the outliers are left out of their row's absmax, the other rows keep theirs
    kept = A.float().abs().masked_fill(A.float().abs() >= 6.0, 0).amax(1)
    assert_same_bits(stats, kept, "row absmax without outliers")
    no_outliers = ops.int8_vectorwise_quant(A.clamp(-1, 1), 6.0)[2]
    assert no_outliers.shape == (0,) and no_outliers.dtype == torch.int64


@pytest.mark.parametrize(
    "dtype, row, outliers",
    [
        (torch.bfloat16, [1.0, 6.0, 5.96875], [1]),  # 6.01 in bfloat16 is 6.0: the 6.0 is an outlier
        (torch.float16, [1.0, 6.01171875, 6.0078125], [1]),  # 6.01 in float16 is 6.01171875
    ],
)
def test_threshold_is_compared_in_the_input_dtype(device, dtype, row, outliers):
    A = torch.tensor([row], dtype=dtype, device=device)
    assert ops.int8_vectorwise_quant(A, 6.01)[2].tolist() == outliers
    assert_quant_equal(ops.int8_vectorwise_quant(A, 6.01), R.int8_vectorwise_quant(A.cpu(), 6.01))


# ---- int8_linear_matmul / int8_mm_dequant / int8_scaled_mm -------------------------------------------------


def int8_tensor(shape, device, seed, low=-127, high=128):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, shape, generator=g, dtype=torch.int8).to(device)


@pytest.mark.parametrize("M, K, N", [(1, 64, 32), (5, 300, 33), (17, 64, 48), (33, 1031, 7), (40, 4096, 64)])
def test_linear_matmul_is_exact(device, M, K, N):
    A, B = int8_tensor((M, K), device, 1), int8_tensor((N, K), device, 2)
    out = ops.int8_linear_matmul(A, B)
    assert out.dtype == torch.int32
    assert_same_bits(out.cpu(), R.int8_linear_matmul(A.cpu(), B.cpu()))
    extreme = torch.full((M, K), -127, dtype=torch.int8, device=device)  # the largest sums (-127 * -127 * K)
    assert_same_bits(ops.int8_linear_matmul(extreme, -extreme[:1].expand(N, K)).cpu(),
                     torch.full((M, N), -127 * 127 * K, dtype=torch.int32))  # fmt: skip


def test_linear_matmul_of_views_and_out(device):
    base = int8_tensor((3 * 64 + 1,), device, 5)
    A = base[1:].view(3, 64)  # storage offset of one byte (unaligned pointer)
    B = int8_tensor((64, 48), device, 6).t()  # transposed view
    want = R.int8_linear_matmul(A.cpu(), B.cpu())
    assert_same_bits(ops.int8_linear_matmul(A, B).cpu(), want)
    A3 = int8_tensor((2, 3, 64), device, 7)
    assert_same_bits(ops.int8_linear_matmul(A3, B).cpu(), R.int8_linear_matmul(A3.cpu(), B.cpu()))
    out = torch.full((3, 48), 7, dtype=torch.int32, device=device)
    assert F.int8_linear_matmul(A, B, out=out) is out
    assert_same_bits(out.cpu(), want)
    strided = torch.zeros(48, 3, dtype=torch.int32, device=device).t()
    ops.int8_linear_matmul.out(A, B, strided)
    assert_same_bits(strided.cpu().contiguous(), want)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("bias_dtype", [None, torch.float16, torch.bfloat16, torch.float32])
def test_mm_dequant_matches_reference(device, dtype, bias_dtype):
    acc = torch.randint(-(2**22), 2**22, (9, 36), dtype=torch.int32, device=device)
    acc[0, :4] = torch.tensor([0, 2**31 - 1, -(2**31), 1])
    row_stats = random_tensor((9,), torch.float32, device, seed=1).abs() * 3
    col_stats = random_tensor((36,), torch.float32, device, seed=2).abs() * 3
    bias = None if bias_dtype is None else random_tensor((36,), bias_dtype, device, seed=3)
    out = ops.int8_mm_dequant(acc, row_stats, col_stats, dtype=dtype, bias=bias)
    assert out.dtype == dtype and out.shape == acc.shape
    ref = R.int8_mm_dequant(acc.cpu(), row_stats.cpu(), col_stats.cpu(), dtype, None if bias is None else bias.cpu())
    assert_same_values(out.cpu(), ref, f"{dtype} bias {bias_dtype}")
    if dtype == torch.float16:
        assert torch.isinf(out[0, 1:3]).all(), "float16 output overflows to inf like bitsandbytes' kernel"
    default = ops.int8_mm_dequant(acc.view(3, 3, 36), row_stats, col_stats)
    assert default.dtype == torch.float16 and default.shape == (3, 3, 36)


# On an H100 most of these shapes take the fused sm_90a kernel (K % 16 == 0, N % 8 == 0; a split K when there are
# few 128 x 128 tiles; 256 rows of A per tile for (260, 144, 4224)); (5, 300, 30) takes the two-step path. Both
# must give the two-step result bit for bit.
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize(
    "M, K, N", [(20, 96, 24), (1, 16, 8), (130, 4096, 264), (300, 272, 1032), (260, 144, 4224), (5, 300, 30)]
)
def test_scaled_mm_is_matmul_then_dequant(device, dtype, M, K, N):
    A, B = int8_tensor((M, K), device, 8), int8_tensor((N, K), device, 9)
    row_stats = random_tensor((M,), torch.float32, device, seed=4).abs()
    col_stats = random_tensor((N,), torch.float32, device, seed=5).abs() / 16
    bias = random_tensor((N,), dtype, device, seed=6)
    out = ops.int8_scaled_mm(A, B, row_stats, col_stats, bias=bias, dtype=dtype)
    want = ops.int8_mm_dequant(ops.int8_linear_matmul(A, B), row_stats, col_stats, dtype=dtype, bias=bias)
    assert_same_bits(out, want)
    assert ops.int8_scaled_mm(A, B, row_stats, col_stats).dtype == torch.float16
    A3 = A.view(1, M, K)  # leading batch dimensions
    assert_same_bits(ops.int8_scaled_mm(A3, B, row_stats, col_stats, bias=bias, dtype=dtype), want.view(1, M, N))


def test_scaled_mm_wraps_like_the_int32_matmul(device):
    K = 133152  # 127 * 127 * K passes 2^31: the int32 sum wraps, and int8_scaled_mm wraps the same way
    A = torch.full((3, K), 127, dtype=torch.int8, device=device)
    stats = torch.ones(3, device=device)
    col_stats = torch.ones(8, device=device)
    want = ops.int8_mm_dequant(ops.int8_linear_matmul(A, A[:1].expand(8, K)), stats, col_stats, dtype=torch.float32)
    assert (want < 0).all()
    assert_same_bits(ops.int8_scaled_mm(A, A[:1].expand(8, K), stats, col_stats, dtype=torch.float32), want)


# ---- int8_linear ------------------------------------------------------------------------------------------


def int8_weight(N, K, device, seed=0):
    W = random_tensor((N, K), torch.float32, seed=seed) * 0.05
    CB, SCB, _ = ops.int8_vectorwise_quant(W)
    return CB.to(device), SCB.to(device)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("M", [1, 3, 8, 9, 16, 17, 40])
@pytest.mark.parametrize("K", [256, 144, 100])  # K % 64 == 0, K % 64 == 16, K % 16 != 0
def test_linear_matches_reference(device, dtype, M, K):
    N = 72
    CB, SCB = int8_weight(N, K, device, seed=K)
    bias = random_tensor((N,), dtype, device, seed=1)
    A = random_tensor((M, K), dtype, device, seed=M)
    for threshold in (0.0, 2.5):
        out = ops.int8_linear(A, CB, SCB, bias, threshold)
        assert out.dtype == dtype and out.shape == (M, N)
        ref = R.int8_linear(A.cpu(), CB.cpu(), SCB.cpu(), bias.cpu(), threshold)
        assert R.relative_error(out.cpu(), ref) < LINEAR_TOLERANCE[dtype], f"threshold {threshold}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_linear_takes_strided_rows_3d_inputs_and_no_bias(device, dtype):
    CB, SCB = int8_weight(40, 128, device)
    big = random_tensor((2, 3, 136), dtype, device, seed=2)
    for A in (big[..., :128], big[..., 8:], big.transpose(0, 1)[..., :128], big[:1, :1, :128]):
        out = ops.int8_linear(A, CB, SCB)
        assert out.shape == (*A.shape[:-1], 40)
        ref = R.int8_linear(A.cpu(), CB.cpu(), SCB.cpu())
        assert R.relative_error(out.cpu(), ref) < LINEAR_TOLERANCE[dtype]


def test_linear_outlier_columns_go_through_the_input_dtype(device):
    # 24 rows (LLM.int8 path): one input column 50x larger than the others. Without a threshold it sets every
    # row's absmax and crushes the other columns; with threshold 6 it is multiplied in float32 instead.
    CB, SCB = int8_weight(64, 256, device)
    A = random_tensor((24, 256), torch.float32, device, seed=4)
    A[:, 17] = 50.0
    exact = A.cpu().double() @ R.dequantized_weight(CB.cpu(), SCB.cpu()).T
    err_plain = R.relative_error(ops.int8_linear(A, CB, SCB, None, 0.0).cpu(), exact)
    err_outliers = R.relative_error(ops.int8_linear(A, CB, SCB, None, 6.0).cpu(), exact)
    # with the outlier in float32 only the int8 rounding of the other columns remains (steps of absmax / 127
    # with absmax ~3: a few 1e-3); without, the steps are 50 / 127 and the error is ten times larger
    assert err_outliers < 5e-3 and err_plain > 2e-2, (err_outliers, err_plain)
    ref = R.int8_linear(A.cpu(), CB.cpu(), SCB.cpu(), None, 6.0)
    assert R.relative_error(ops.int8_linear(A, CB, SCB, None, 6.0).cpu(), ref) < LINEAR_TOLERANCE[torch.float32]


# ---- empty tensors, opcheck, bad input ---------------------------------------------------------------------


def test_empty_tensors_give_empty_results(device):
    A = torch.empty(0, 16, dtype=torch.float16, device=device)
    codes, stats, cols = ops.int8_vectorwise_quant(A, 1.0)
    assert codes.shape == (0, 16) and stats.shape == (0,) and cols.shape == (0,)
    codes, stats, _ = ops.int8_vectorwise_quant(torch.empty(3, 0, device=device))
    assert codes.shape == (3, 0) and torch.all(stats == 0)
    B = int8_tensor((8, 16), device, 1)
    assert ops.int8_linear_matmul(codes.new_empty(0, 16), B).shape == (0, 8)
    no_k = ops.int8_linear_matmul(codes, int8_tensor((8, 0), device, 1))
    assert_same_bits(no_k.cpu(), torch.zeros(3, 8, dtype=torch.int32))
    CB, SCB = int8_weight(8, 16, device)
    assert ops.int8_linear(A, CB, SCB).shape == (0, 8)
    bias = torch.ones(8, device=device)
    out = ops.int8_linear(torch.empty(2, 0, device=device), CB[:, :0], SCB, bias)
    assert_same_bits(out.cpu(), torch.ones(2, 8))


def test_opcheck_every_op():
    A = random_tensor((24, 80), torch.bfloat16)
    codes, stats, _ = ops.int8_vectorwise_quant(A)
    B = int8_tensor((16, 80), "cpu", 3)
    acc = ops.int8_linear_matmul(codes, B)
    col_stats = torch.rand(16)
    CB, SCB = int8_weight(16, 80, "cpu")
    calls = [
        (ops.int8_vectorwise_quant.default, (A, 0.0)),
        (ops.int8_vectorwise_quant.default, (A, 1.0)),
        (ops.int8_vectorwise_dequant.default, (codes, stats)),
        (ops.int8_linear_matmul.default, (codes, B)),
        (ops.int8_linear_matmul.out, (codes, B, torch.empty(24, 16, dtype=torch.int32))),
        (ops.int8_mm_dequant.default, (acc, stats, col_stats, torch.bfloat16, torch.randn(16))),
        (ops.int8_scaled_mm.default, (codes, B, stats, col_stats, None, torch.float32)),
        (ops.int8_linear.default, (A[:3].float().requires_grad_(), CB, SCB, torch.randn(16, requires_grad=True), 0.0)),
        (ops.int8_linear.default, (A.float().requires_grad_(), CB, SCB, None, 1.0)),
    ]
    for op, args in calls:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda d: ops.int8_vectorwise_quant(torch.zeros(4, 4, dtype=torch.int32, device=d)), TypeError,
         "int8_vectorwise_quant: A must be float16, bfloat16 or float32, got Int"),
        (lambda d: ops.int8_vectorwise_quant(torch.tensor(1.0, device=d)), ValueError,
         "A must have at least one dimension"),
        (lambda d: ops.int8_vectorwise_quant(torch.zeros(4, 4, device=d), -1.0), ValueError,
         "threshold must be a finite number >= 0"),
        (lambda d: ops.int8_vectorwise_quant(torch.zeros(4, 4, device=d), float("nan")), ValueError,
         "threshold must be a finite number >= 0"),
        (lambda d: ops.int8_vectorwise_dequant(torch.zeros(4, 4, device=d), torch.ones(4, device=d)), TypeError,
         "int8_vectorwise_dequant: A must be int8, got float32"),
        (lambda d: ops.int8_vectorwise_dequant(torch.zeros(4, 4, dtype=torch.int8, device=d), torch.ones(3, device=d)),
         ValueError, "stats must have 4 entries"),
        (lambda d: ops.int8_vectorwise_dequant(torch.zeros(4, 4, dtype=torch.int8, device=d),
                                               torch.ones(4, dtype=torch.float16, device=d)),
         TypeError, "stats must be float32, got float16"),
        (lambda d: ops.int8_linear_matmul(torch.zeros(2, 8, device=d), torch.zeros(3, 8, dtype=torch.int8, device=d)),
         TypeError, "int8_linear_matmul: A must be int8, got float32"),
        (lambda d: ops.int8_linear_matmul(torch.zeros(2, 8, dtype=torch.int8, device=d),
                                          torch.zeros(3, 7, dtype=torch.int8, device=d)),
         ValueError, r"A's last dimension \(8\) must equal K = B.shape\[1\] \(7\)"),
        (lambda d: ops.int8_linear_matmul(torch.zeros(2, 8, dtype=torch.int8, device=d),
                                          torch.zeros(2, 3, 8, dtype=torch.int8, device=d)),
         ValueError, r"B must be 2-D \[N, K\]"),
        (lambda d: ops.int8_linear_matmul.out(torch.zeros(2, 8, dtype=torch.int8, device=d),
                                              torch.zeros(3, 8, dtype=torch.int8, device=d),
                                              torch.zeros(3, 2, dtype=torch.int32, device=d)),
         ValueError, r"out must have shape \[2, 3\]"),
        (lambda d: ops.int8_linear_matmul.out(torch.zeros(2, 8, dtype=torch.int8, device=d),
                                              torch.zeros(3, 8, dtype=torch.int8, device=d),
                                              torch.zeros(2, 3, device=d)),
         TypeError, "out must be int32, got float32"),
        (lambda d: ops.int8_mm_dequant(torch.zeros(2, 3, dtype=torch.int32, device=d), torch.ones(2, device=d),
                                       torch.ones(4, device=d)),
         ValueError, "col_stats must have 3 entries"),
        (lambda d: ops.int8_mm_dequant(torch.zeros(2, 3, dtype=torch.int32, device=d), torch.ones(2, device=d),
                                       torch.ones(3, device=d), torch.int32),
         TypeError, "dtype must be float16, bfloat16 or float32"),
        (lambda d: ops.int8_mm_dequant(torch.zeros(2, 3, dtype=torch.int32, device=d), torch.ones(2, device=d),
                                       torch.ones(3, device=d), None, torch.ones(4, device=d)),
         ValueError, "bias must have 3 entries"),
        (lambda d: ops.int8_scaled_mm(torch.zeros(2, 8, dtype=torch.int8, device=d),
                                      torch.zeros(3, 8, dtype=torch.int8, device=d), torch.ones(3, device=d),
                                      torch.ones(3, device=d)),
         ValueError, "row_stats must have 2 entries"),
        (lambda d: ops.int8_linear(torch.zeros(2, 8, device=d), torch.zeros(3, 8, device=d), torch.ones(3, device=d)),
         TypeError, "int8_linear: CB must be int8, got float32"),
        (lambda d: ops.int8_linear(torch.zeros(2, 8, device=d), torch.zeros(3, 8, dtype=torch.int8, device=d),
                                   torch.ones(2, device=d)),
         ValueError, "SCB must have 3 entries"),
        (lambda d: ops.int8_linear(torch.zeros(2, 8, device=d), torch.zeros(3, 8, dtype=torch.int8, device=d),
                                   torch.ones(3, device=d), torch.ones(3, dtype=torch.float16, device=d)),
         TypeError, r"bias dtype \(float16\) must match A \(float32\)"),
        (lambda d: ops.int8_linear(torch.zeros(2, 8, device=d), torch.zeros(3, 8, dtype=torch.int8, device=d),
                                   torch.ones(3, device=d), torch.ones(2, device=d)),
         ValueError, r"bias must have shape \[3\]"),
        (lambda d: ops.int8_linear(torch.zeros(2, 8, dtype=torch.int8, device=d),
                                   torch.zeros(3, 8, dtype=torch.int8, device=d), torch.ones(3, device=d)),
         TypeError, "int8_linear: A must be float16, bfloat16 or float32"),
        (lambda d: F.int8_linear_matmul(torch.zeros(2, 8, dtype=torch.int8, device=d),
                                        torch.zeros(3, 8, dtype=torch.int8, device=d), dtype=torch.float32),
         TypeError, "dtype must be torch.int32"),
        (lambda d: F.int8_vectorwise_quant(torch.zeros(2, 8, device=d), threshold="6"), TypeError,
         "threshold must be a number"),
        (lambda d: F.int8_vectorwise_quant([1.0, 2.0]), TypeError, "A must be a torch.Tensor, got list"),
        (lambda d: F.int8_double_quant(torch.zeros(2, 8, device=d), out_row=torch.zeros(2, 8)), ValueError,
         "out_row must be None"),
    ],
)  # fmt: skip
def test_bad_input_names_the_argument(device, call, error, message):
    with pytest.raises(error, match=message):
        call(device)


@pytest.mark.cuda
def test_arguments_on_another_device_are_rejected():
    A = torch.zeros(2, 8, dtype=torch.int8, device="cuda")
    with pytest.raises(ValueError, match="int8_linear_matmul: B must be on cuda:0 like A, got cpu"):
        ops.int8_linear_matmul(A, torch.zeros(3, 8, dtype=torch.int8))
    with pytest.raises(ValueError, match="int8_vectorwise_dequant: stats must be on cuda:0"):
        ops.int8_vectorwise_dequant(A, torch.ones(2))
    with pytest.raises(ValueError, match="int8_linear: SCB must be on cuda:0"):
        ops.int8_linear(A.float(), torch.zeros(3, 8, dtype=torch.int8, device="cuda"), torch.ones(3))


# ---- int8_double_quant ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("threshold", [0.0, 1.0])
def test_double_quant_is_row_and_column_quantization(device, threshold):
    A = random_tensor((12, 40), torch.float16, device, seed=7)
    out_row, out_col, row_stats, col_stats, cols = F.int8_double_quant(A, threshold=threshold)
    assert_quant_equal((out_row, row_stats, cols), R.int8_vectorwise_quant(A.cpu(), threshold), "rows")
    masked = A.cpu().float()
    if threshold > 0:
        masked = masked.masked_fill(masked.abs() >= threshold, 0).half()
    ref_col, ref_col_stats, _ = R.int8_vectorwise_quant(masked.half().t().contiguous())
    assert_same_bits(out_col.cpu(), ref_col.t().contiguous(), "column codes")
    assert_same_bits(col_stats.cpu(), ref_col_stats, "column stats")


# ---- parity with the installed bitsandbytes (its CPU path) ---------------------------------------------------


def _assert_codes_equal_except_half_integer_ties(A, ours, theirs, stats):
    """Codes equal except by one where x * 127 / absmax is within 1e-5 of a half-integer (difference (a))."""
    differ = ours != theirs
    assert torch.all((ours.int() - theirs.int()).abs() <= 1)
    scaled = (A.double() * 127 / stats.double()[:, None])[differ]
    assert torch.all((scaled - scaled.floor() - 0.5).abs() < 1e-5), f"unexplained code differences at {scaled[:4]}"


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("threshold", [0.0, 2.0])
def test_vectorwise_quant_matches_installed_bitsandbytes(dtype, threshold):
    bnbF = bnb_or_skip()
    A = random_tensor((64, 1001), dtype, seed=1)
    ours, stats, cols = F.int8_vectorwise_quant(A, threshold)
    theirs, their_stats, their_cols = bnbF.int8_vectorwise_quant(A.clone(), threshold)
    assert_same_bits(stats, their_stats, "row_stats")
    if threshold > 0:
        assert_same_bits(cols, their_cols, "outlier_cols")
    _assert_codes_equal_except_half_integer_ties(A, ours, theirs, stats)
    assert_same_bits(F.int8_vectorwise_dequant(theirs, stats), bnbF.int8_vectorwise_dequant(theirs, their_stats))


def test_matmul_and_dequant_match_installed_bitsandbytes():
    bnbF = bnb_or_skip()
    A, B = int8_tensor((20, 301), "cpu", 1), int8_tensor((30, 301), "cpu", 2)  # exact in float32 too (K < 1040)
    acc = F.int8_linear_matmul(A, B)
    assert_same_bits(acc, bnbF.int8_linear_matmul(A, B))
    g = torch.Generator().manual_seed(0)
    row_stats, col_stats = torch.rand(20, generator=g) * 4, torch.rand(30, generator=g) * 4
    product = acc.double() * row_stats.double()[:, None] * col_stats.double()[None, :] / 127**2
    for dtype, bias in ((torch.float16, torch.randn(30, generator=g).half()), (torch.float32, torch.randn(30))):
        ours = ops.int8_scaled_mm(A, B, row_stats, col_stats, bias=bias, dtype=dtype).double()
        theirs = torch.ops.bitsandbytes.int8_scaled_mm(A, B, row_stats, col_stats, bias=bias, dtype=dtype).double()
        # (b): bitsandbytes' CPU constant is 1.8e-5 of the product off 1/127^2; beyond that, each side rounds the
        # product and the sum with the bias a few times in float32 and once in the output dtype.
        unit = torch.finfo(dtype).eps / 2
        allowed = 2e-5 * product.abs() + 2**-22 * (product.abs() + theirs.abs()) + unit * (ours.abs() + theirs.abs())
        assert torch.all((ours - theirs).abs() <= allowed), f"{dtype}: {((ours - theirs).abs() / allowed).max()}"
    assert_same_bits(F.int8_mm_dequant(acc, row_stats, col_stats), ops.int8_mm_dequant(acc, row_stats, col_stats))


# ---- CUDA: bit-identity with the host kernels on large tensors, bitsandbytes' CUDA kernels, graphs ------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", FLOATS)
def test_cuda_quant_equals_host_kernels_on_large_odd_tensors(dtype):
    for cols in (4099, 4096):  # element path and vector path
        A = random_tensor((300, cols), dtype, seed=cols, scale=3.0)
        A[7, 100] = float("nan")
        A[8] = 0
        for threshold in (0.0, 6.0):
            host = ops.int8_vectorwise_quant(A, threshold)
            assert_quant_equal(ops.int8_vectorwise_quant(A.cuda(), threshold), host, f"cols {cols} t {threshold}")
        acc = torch.randint(-(2**20), 2**20, (300, cols), dtype=torch.int32)
        stats = torch.rand(cols) * 5
        host = ops.int8_mm_dequant(acc, host[1], stats, dtype=dtype)
        assert_same_values(ops.int8_mm_dequant(acc.cuda(), ops.int8_vectorwise_quant(A.cuda(), 6.0)[1],
                                               stats.cuda(), dtype=dtype).cpu(), host)  # fmt: skip


@pytest.mark.cuda
def test_cuda_kernels_match_bitsandbytes_cuda():
    bnbF = bnb_or_skip()
    A = random_tensor((257, 4096), torch.float16, "cuda", seed=11, scale=2.0)
    ties = A.clone()  # rows whose x * 127 / absmax are exact half-integers (absmax 127 and 63.5)
    ties[4] = torch.arange(4096, device="cuda") % 254 - 126.5
    ties[4, 0] = 127.0
    ties[5] = ties[4] / 2
    A[3, 5] = 9.0
    for threshold, X in ((0.0, ties), (6.0, A)):
        ours = F.int8_vectorwise_quant(X, threshold)
        theirs = bnbF.int8_vectorwise_quant(X.clone(), threshold)
        assert_same_bits(ours[1], theirs[1], "row_stats")
        differ = ours[0] != theirs[0]
        scaled = (X.double() * 127 / ours[1].double()[:, None])[differ]
        at_ties = bool(torch.all((scaled - scaled.floor() - 0.5).abs() < 1e-5))
        # halfbyte scales by 127 * rcp.approx.ftz(absmax), taken to be what bitsandbytes' __fdividef compiles to
        assert not differ.any(), (
            f"threshold {threshold}: {int(differ.sum())} codes differ from bitsandbytes' CUDA kernel, "
            f"{'all' if at_ties else 'not all'} at half-integer ties (x * 127 / absmax = k + 0.5)"
        )
    B = int8_tensor((384, 4096), "cuda", 3)
    acc = F.int8_linear_matmul(ours[0], B)
    assert_same_bits(acc, bnbF.int8_linear_matmul(ours[0], B))
    col_stats = torch.rand(384, device="cuda") * 3
    bias = random_tensor((384,), torch.float16, "cuda", seed=2)
    assert_same_bits(F.int8_mm_dequant(acc, ours[1], col_stats, bias=bias),
                     bnbF.int8_mm_dequant(acc, ours[1], col_stats, bias=bias))  # fmt: skip


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 2, 7, 8, 9, 16])
def test_weight_only_kernel_on_llama_shapes(dtype, M):
    # N = 1000 (not a multiple of 16), N = 8448 (two 16-row tiles per block on an H100), K = 4112 (K % 64 == 16).
    # The float64 reference is computed on the GPU (the same float64 statement, R.int8_linear).
    for N, K in ((1000, 4096), (8448, 2048), (96, 4112)):
        CB, SCB = int8_weight(N, K, "cuda", seed=N)
        A = random_tensor((M, K), dtype, "cuda", seed=M)
        bias = random_tensor((N,), dtype, "cuda", seed=3)
        out = ops.int8_linear(A, CB, SCB, bias)
        ref = R.int8_linear(A, CB, SCB, bias)
        assert R.relative_error(out, ref) < LINEAR_TOLERANCE[dtype], (N, K)


@pytest.mark.cuda
def test_int8_linear_captures_in_a_cuda_graph():
    CB, SCB = int8_weight(512, 1024, "cuda")
    for M in (1, 12, 64):
        A = random_tensor((M, 1024), torch.bfloat16, "cuda", seed=M)
        eager = ops.int8_linear(A, CB, SCB)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            ops.int8_linear(A, CB, SCB)  # warm-up outside the capture (cuBLASLt workspace)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = ops.int8_linear(A, CB, SCB)
        graph.replay()
        torch.cuda.synchronize()
        assert_same_bits(captured, eager, f"M={M}")
