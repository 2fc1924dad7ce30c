"""Every op against reference.py, bit for bit, on every device present (CPU always; CUDA when there is one).

The reference is the statement of the algorithm; the kernels must produce the same bytes for every dtype,
blocksize, quant_type, storage dtype, odd size and memory layout.
"""

import halfbyte.functional as F
import pytest
import torch
from conftest import DEVICES, assert_same_bits, assert_same_values, random_tensor
from halfbyte import reference as R

SIZES = [1, 2, 31, 33, 64, 4097, 23 * 311]  # odd, tiny, not multiples of any blocksize


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", R.FLOAT_DTYPES)
@pytest.mark.parametrize("blocksize", R.BLOCKSIZES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_quantize_dequantize_4bit_match_reference(device, dtype, blocksize, quant_type):
    for seed, n in enumerate(SIZES):
        A = random_tensor((n,), dtype, device, seed=seed, scale=3.0)
        packed, absmax = torch.ops.halfbyte.quantize_4bit(A, blocksize, quant_type, torch.uint8)
        ref_packed, ref_absmax = R.quantize_4bit(A.cpu(), blocksize, quant_type, torch.uint8)
        assert_same_bits(packed.cpu(), ref_packed, f"packed n={n}")
        assert_same_bits(absmax.cpu(), ref_absmax, f"absmax n={n}")
        out = torch.ops.halfbyte.dequantize_4bit(packed, absmax, blocksize, quant_type, [n], dtype)
        ref = R.dequantize_4bit(ref_packed, ref_absmax, blocksize, quant_type, [n], dtype)
        assert_same_bits(out.cpu(), ref, f"dequantized n={n}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("storage", R.STORAGE_DTYPES)
def test_quant_storage_holds_the_same_bytes(device, storage):
    for n in (4096, 4097, 4098, 4100, 4101):  # byte counts that do and do not fill whole storage elements
        A = random_tensor((n,), torch.bfloat16, device, seed=n)
        packed, absmax = torch.ops.halfbyte.quantize_4bit(A, 64, "nf4", storage)
        plain, _ = torch.ops.halfbyte.quantize_4bit(A, 64, "nf4", torch.uint8)
        itemsize = torch.empty((), dtype=storage).element_size()
        assert packed.dtype == storage and packed.shape == (R.packed_storage_elements(n, itemsize), 1)
        raw = packed.reshape(-1).view(torch.uint8)
        assert_same_bits(raw[: plain.numel()], plain.reshape(-1), f"storage {storage} n={n}")
        assert torch.all(raw[plain.numel() :] == 0), "padding bytes of the last storage element are zero"
        out = torch.ops.halfbyte.dequantize_4bit(packed, absmax, 64, "nf4", [n], torch.bfloat16)
        assert_same_bits(out, torch.ops.halfbyte.dequantize_4bit(plain, absmax, 64, "nf4", [n], torch.bfloat16))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", R.FLOAT_DTYPES)
@pytest.mark.parametrize("blocksize", R.BLOCKSIZES)
def test_quantize_dequantize_blockwise_match_reference(device, dtype, blocksize):
    code = F.create_dynamic_map().to(device)
    for seed, n in enumerate(SIZES):
        A = random_tensor((n,), dtype, device, seed=seed)
        codes, absmax = torch.ops.halfbyte.quantize_blockwise(A, code, blocksize)
        ref_codes, ref_absmax = R.quantize_blockwise(A.cpu(), code.cpu(), blocksize)
        assert_same_bits(codes.cpu(), ref_codes, f"codes n={n}")
        assert_same_bits(absmax.cpu(), ref_absmax, f"absmax n={n}")
        out = torch.ops.halfbyte.dequantize_blockwise(codes, absmax, code, blocksize, dtype)
        assert_same_bits(out.cpu(), R.dequantize_blockwise(ref_codes, ref_absmax, code.cpu(), blocksize, dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_values_on_every_threshold_round_like_the_reference(device):
    # Each threshold / midpoint and its float32 neighbours, in blocks of absmax exactly 1.
    def around(values):
        t = torch.tensor(values, dtype=torch.float32)
        near = [torch.nextafter(t, t - 1), t, torch.nextafter(t, t + 1)]
        x = torch.stack(near, 1).reshape(-1)
        return torch.cat([torch.ones(1), x, -x])

    code = F.create_dynamic_map()
    cases = {
        "nf4": around(R.NF4_THRESHOLDS),
        "fp4": around(R.FP4_THRESHOLDS),
        "8bit": around(((code[:-1] + code[1:]) / 2).tolist()),
    }
    for kind, x in cases.items():
        x = x.to(device)
        if kind == "8bit":
            got = torch.ops.halfbyte.quantize_blockwise(x, code.to(device), 4096)[0]
            ref = R.quantize_blockwise(x.cpu(), code, 4096)[0]
        else:
            got = torch.ops.halfbyte.quantize_4bit(x, 4096, kind, torch.uint8)[0]
            ref = R.quantize_4bit(x.cpu(), 4096, kind, torch.uint8)[0]
        assert_same_bits(got.cpu(), ref, kind)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_and_multidimensional_inputs(device):
    base = random_tensor((64, 96), torch.float16, device, seed=3)
    for A in (base.t(), base[:, ::2], base[::3], base.view(4, 16, 96).transpose(0, 1)):
        assert not A.is_contiguous()
        packed, absmax = torch.ops.halfbyte.quantize_4bit(A, 64, "nf4", torch.uint8)
        ref_packed, ref_absmax = torch.ops.halfbyte.quantize_4bit(A.contiguous(), 64, "nf4", torch.uint8)
        assert_same_bits(packed, ref_packed)
        assert_same_bits(absmax, ref_absmax)
        codes, absmax8 = torch.ops.halfbyte.quantize_blockwise(A, F.create_dynamic_map().to(device), 64)
        assert codes.shape == A.shape
        assert_same_bits(
            codes.contiguous(),
            torch.ops.halfbyte.quantize_blockwise(A.contiguous(), F.create_dynamic_map().to(device), 64)[0],
        )


@pytest.mark.parametrize("device", DEVICES)
def test_out_variants_write_into_the_given_tensor(device):
    A = random_tensor((33, 70), torch.bfloat16, device)
    packed, absmax = torch.ops.halfbyte.quantize_4bit(A, 64, "fp4", torch.uint8)
    out = torch.full((33, 70), float("nan"), dtype=torch.bfloat16, device=device)
    torch.ops.halfbyte.dequantize_4bit.out(packed, absmax, 64, "fp4", [33, 70], torch.bfloat16, out=out)
    assert_same_bits(out, torch.ops.halfbyte.dequantize_4bit(packed, absmax, 64, "fp4", [33, 70], torch.bfloat16))
    code = F.create_dynamic_map().to(device)
    codes, absmax8 = torch.ops.halfbyte.quantize_blockwise(A, code, 128)
    out8 = torch.full((33, 70), float("nan"), dtype=torch.float32, device=device)
    torch.ops.halfbyte.dequantize_blockwise.out(codes, absmax8, code, 128, torch.float32, out=out8)
    assert_same_bits(out8, torch.ops.halfbyte.dequantize_blockwise(codes, absmax8, code, 128, torch.float32))


@pytest.mark.parametrize("device", DEVICES)
def test_special_values_stay_inside_their_block(device):
    x = torch.randn(6, 64)
    x[0] = 0.0  # zero block: dequantizes to (signed) zeros
    x[1, 3] = float("nan")  # NaN: this block becomes NaN, no other
    x[2, 5] = float("inf")  # inf: this block becomes non-finite, no other
    x[3, :] = 1e-40  # subnormals count as zero (as in bitsandbytes' flush-to-zero kernels)
    x = x.reshape(-1).to(device)
    for quant_type in ("nf4", "fp4"):
        packed, absmax = torch.ops.halfbyte.quantize_4bit(x, 64, quant_type, torch.uint8)
        out = torch.ops.halfbyte.dequantize_4bit(packed, absmax, 64, quant_type, [x.numel()], torch.float32)
        out = out.view(6, 64).cpu()
        assert torch.all(out[0] == 0) and torch.all(out[3] == 0)
        assert torch.isnan(absmax[1]) and torch.all(torch.isnan(out[1]))
        assert torch.isinf(absmax[2]) and not torch.isfinite(out[2]).any()
        assert torch.isfinite(out[[0, 3, 4, 5]]).all(), "non-finite values leaked out of their block"
        ref = R.dequantize_4bit(
            *R.quantize_4bit(x.cpu(), 64, quant_type, torch.uint8), 64, quant_type, [x.numel()], torch.float32
        )
        assert_same_values(out.reshape(-1), ref)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_tensors_give_empty_results(device):
    A = torch.empty(0, 16, dtype=torch.float16, device=device)
    packed, absmax = torch.ops.halfbyte.quantize_4bit(A, 64, "nf4", torch.uint8)
    assert packed.shape == (0, 1) and absmax.shape == (0,)
    out = torch.ops.halfbyte.dequantize_4bit(packed, absmax, 64, "nf4", [0, 16], torch.float16)
    assert out.shape == (0, 16)
    codes, absmax8 = torch.ops.halfbyte.quantize_blockwise(A, F.create_dynamic_map().to(device), 64)
    assert codes.shape == (0, 16) and absmax8.shape == (0,)


def test_opcheck_every_op():
    A = random_tensor((24, 80), torch.bfloat16)
    code = F.create_dynamic_map()
    packed, absmax = torch.ops.halfbyte.quantize_4bit(A, 64, "nf4", torch.uint8)
    codes, absmax8 = torch.ops.halfbyte.quantize_blockwise(A, code, 64)
    x = random_tensor((3, 80), torch.bfloat16, seed=1)
    nested_codes, nested_absmax = torch.ops.halfbyte.quantize_blockwise(absmax - absmax.mean(), code, 256)
    calls = [
        (torch.ops.halfbyte.quantize_4bit.default, (A, 64, "nf4", torch.uint8)),
        (torch.ops.halfbyte.dequantize_4bit.default, (packed, absmax, 64, "nf4", [24, 80], torch.bfloat16)),
        (
            torch.ops.halfbyte.dequantize_4bit.out,
            (packed, absmax, 64, "nf4", [24, 80], torch.bfloat16, torch.empty(24, 80, dtype=torch.bfloat16)),
        ),
        (torch.ops.halfbyte.quantize_blockwise.default, (A, code, 64)),
        (torch.ops.halfbyte.dequantize_blockwise.default, (codes, absmax8, code, 64, torch.float32)),
        (torch.ops.halfbyte.dequantize_blockwise.out, (codes, absmax8, code, 64, torch.float32, torch.empty(24, 80))),
        (torch.ops.halfbyte.gemm_4bit.default, (x, packed, [24, 80], absmax, 64, "nf4")),
        (
            torch.ops.halfbyte.gemm_4bit.default,
            (x, packed, [24, 80], nested_absmax, 64, "nf4", None, nested_codes, code, absmax.mean()),
        ),
        (torch.ops.halfbyte.gemv_4bit.default, (x, packed, [24, 80], absmax, F.get_4bit_type("nf4"), 64)),
        (
            torch.ops.halfbyte.dequantize_4bit.default,
            (packed, nested_absmax, 64, "nf4", [24, 80], torch.bfloat16, nested_codes, code, absmax.mean()),
        ),
    ]
    for op, args in calls:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", R.FLOAT_DTYPES)
@pytest.mark.parametrize("blocksize", [32, 64, 4096])
def test_dequantize_4bit_reads_double_quantized_scales(device, dtype, blocksize):
    # The scales as stored by double quantization (uint8 codes, nested absmax per 256 blocks, code, offset)
    # give exactly the bits of dequantizing with the float32 scales resolved first.
    n = 300 * blocksize + 33  # blocks not a multiple of 256, n odd
    A = random_tensor((n,), dtype, device, seed=blocksize, scale=2.0)
    packed, absmax = torch.ops.halfbyte.quantize_4bit(A, blocksize, "nf4", torch.uint8)
    code = F.create_dynamic_map().to(device)
    for offset in (absmax.mean(), -absmax.mean()):
        codes, nested = torch.ops.halfbyte.quantize_blockwise(absmax - offset, code, 256)
        nested = nested.clone()
        nested[1] = float("inf") if offset > 0 else float("nan")  # a non-finite nested absmax stays in its group
        got = torch.ops.halfbyte.dequantize_4bit(packed, nested, blocksize, "nf4", [n], dtype, codes, code, offset)
        scales = R.nested_absmax(codes.cpu(), nested.cpu(), code.cpu(), offset.cpu())
        want = R.dequantize_4bit(packed.cpu(), scales, blocksize, "nf4", [n], dtype)
        assert_same_values(got.cpu(), want, f"nested offset={offset.item():.3f}")
        assert_same_values(
            got.cpu(),
            R.dequantize_4bit(
                packed.cpu(), nested.cpu(), blocksize, "nf4", [n], dtype, codes.cpu(), code.cpu(), offset.cpu()
            ),
        )
        out = torch.empty(n, dtype=dtype, device=device)
        torch.ops.halfbyte.dequantize_4bit.out(
            packed,
            nested,
            blocksize,
            "nf4",
            [n],
            dtype,
            out=out,
            absmax_8bit=codes,
            absmax_code=code,
            absmax_offset=offset,
        )
        assert_same_values(out, got)
