"""halfbyte.functional and QuantState: the bitsandbytes-shaped API, serialization, accuracy bounds."""

import json

import halfbyte
import halfbyte.functional as F
import pytest
import torch
from conftest import DEVICES, assert_same_bits, random_tensor
from halfbyte import QuantState
from halfbyte import reference as R


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
def test_quantize_4bit_state_and_round_trip(device, quant_type, nested):
    A = random_tensor((300, 257), torch.bfloat16, device)
    packed, state = F.quantize_4bit(A, blocksize=128, compress_statistics=nested, quant_type=quant_type)
    assert packed.shape == ((300 * 257 + 1) // 2, 1) and packed.dtype == torch.uint8
    assert state.shape == A.shape and state.dtype == A.dtype and state.blocksize == 128
    assert state.quant_type == quant_type and state.nested == nested
    assert_same_bits(state.code.cpu(), R.table_4bit(quant_type))
    raw_packed, raw_absmax = torch.ops.halfbyte.quantize_4bit(A, 128, quant_type, torch.uint8)
    assert_same_bits(packed, raw_packed)
    if nested:
        assert state.absmax.dtype == torch.uint8 and state.state2.blocksize == 256
        assert_same_bits(state.offset, raw_absmax.mean(), "offset is absmax.mean()")
        codes, absmax2 = torch.ops.halfbyte.quantize_blockwise(
            raw_absmax - raw_absmax.mean(), F.create_dynamic_map().to(device), 256
        )
        assert_same_bits(state.absmax, codes)
        assert_same_bits(state.state2.absmax, absmax2)
    else:
        assert_same_bits(state.absmax, raw_absmax)
    out = F.dequantize_4bit(packed, state)
    assert out.shape == A.shape and out.dtype == A.dtype
    # Double quantization changes the scale by at most one 8-bit step of the absmax: error stays 4-bit sized.
    limit = 0.08 if quant_type == "nf4" else 0.105
    assert (out.float() - A.float()).abs().mean() < limit


def test_nested_dequantize_equals_plain_with_the_dequantized_absmax():
    A = random_tensor((128, 512), torch.float32)
    packed, state = F.quantize_4bit(A, compress_statistics=True, quant_type="nf4")
    absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    ref = R.dequantize_4bit(packed, absmax, 64, "nf4", [128, 512], torch.float32)
    assert_same_bits(F.dequantize_4bit(packed, state), ref)


def test_quantize_nf4_fp4_shortcuts_and_storage():
    A = random_tensor((64, 64), torch.float16)
    for quant, dequant, quant_type in (
        (F.quantize_nf4, F.dequantize_nf4, "nf4"),
        (F.quantize_fp4, F.dequantize_fp4, "fp4"),
    ):
        packed, state = quant(A, quant_storage=torch.bfloat16)
        assert packed.dtype == torch.bfloat16 and state.quant_type == quant_type
        assert_same_bits(dequant(packed, state), F.dequantize_4bit(packed, state))


@pytest.mark.parametrize("blocksize", [64, 256, 4096])
def test_quantize_blockwise_nested_and_plain(blocksize):
    A = random_tensor((100, 333), torch.float32)
    codes, state = F.quantize_blockwise(A, blocksize=blocksize)
    out = F.dequantize_blockwise(codes, state)
    assert out.dtype == torch.float32 and (out - A).abs().mean() < 0.011  # COMPAT.md bound for 8-bit
    ncodes, nstate = F.quantize_blockwise(A, blocksize=blocksize, nested=True)
    assert_same_bits(ncodes, codes)
    assert nstate.nested and nstate.absmax.dtype == torch.uint8
    assert (F.dequantize_blockwise(ncodes, nstate) - out).abs().max() < 0.05


def test_dequantize_4bit_without_state_uses_absmax_and_out():
    A = random_tensor((16, 64), torch.float32)
    packed, state = F.quantize_4bit(A, quant_type="nf4")
    out = torch.empty(16, 64)
    F.dequantize_4bit(packed, absmax=state.absmax, out=out, quant_type="nf4")
    assert_same_bits(out, F.dequantize_4bit(packed, state))


def test_dequantize_4bit_of_transposed_packed_bytes_is_transposed_like_bitsandbytes():
    A = random_tensor((16, 64), torch.float32)
    packed, state = F.quantize_4bit(A, quant_type="nf4")
    assert_same_bits(F.dequantize_4bit(packed.t(), state), F.dequantize_4bit(packed, state).t())


@pytest.mark.parametrize(
    "blocksize,nf4_abs,nf4_rel,fp4_abs,fp4_rel",
    [
        (32, 0.0682, 0.1919, 0.0896, 0.2448),
        (64, 0.0733, 0.2057, 0.0973, 0.2628),
        (128, 0.0775, 0.2180, 0.1039, 0.2788),
        (256, 0.0811, 0.2289, 0.1100, 0.2933),
        (4096, 0.0951, 0.2695, 0.1338, 0.3458),
    ],
)
def test_error_within_bitsandbytes_bounds(blocksize, nf4_abs, nf4_rel, fp4_abs, fp4_rel):
    # The bounds bitsandbytes' own tests hold (shared/COMPAT.md), on 1024x1024 N(0, 1).
    A = random_tensor((1024, 1024), torch.float32, seed=7)
    for quant_type, abs_bound, rel_bound in (("nf4", nf4_abs, nf4_rel), ("fp4", fp4_abs, fp4_rel)):
        packed, state = F.quantize_4bit(A, blocksize=blocksize, quant_type=quant_type)
        err = (F.dequantize_4bit(packed, state) - A).abs()
        assert err.mean() < abs_bound
        assert (err / (A.abs() + 1e-8)).mean() < rel_bound


def test_codebooks_match_the_format_tables():
    assert F.get_4bit_type("nf4").tolist() == [pytest.approx(v, abs=0) for v in R.NF4_LEVELS]
    fp4 = torch.tensor([0, 0.0625, 8, 12, 4, 6, 2, 3, 0, -0.0625, -8, -12, -4, -6, -2, -3]) / 12
    assert_same_bits(F.get_4bit_type("fp4"), fp4)  # the stored quant map: +0.0 at code 8, as bitsandbytes
    fp4[8] = -0.0
    assert_same_bits(R.levels_4bit("fp4"), fp4)  # what the kernels decode: code 8 has its sign bit
    dynamic = F.create_dynamic_map()
    assert dynamic.shape == (256,) and dynamic[127] == 0 and dynamic[-1] == 1.0 and dynamic[0] == -0.99296875
    assert torch.all(dynamic[1:] >= dynamic[:-1])
    normal = F.create_normal_map()
    levels = normal[normal != 0]
    # ndtri vs scipy's ppf: the same quantiles to float32 rounding (1 ulp at most)
    torch.testing.assert_close(torch.cat([levels[:7], torch.zeros(1), levels[7:]]), R.nf4_table(), rtol=0, atol=1.2e-7)


def test_reciprocal_emulation_properties():
    m = torch.tensor([1.0, 2.0, 0.5, 3.0, 7.5, 1e-30, 1e30, 0.0, 1e-40, float("inf"), float("nan"), 2.0**127])
    r = R.reciprocal_like_cuda(m)
    assert r[:3].tolist() == [1.0, 0.5, 2.0]  # powers of two are exact
    assert r[7] == float("inf") and r[8] == float("inf")  # zero and subnormal -> inf (ftz)
    assert r[9] == 0 and torch.isnan(r[10]) and r[11] == 0  # inf -> 0, NaN -> NaN, subnormal result -> 0
    ieee = 1.0 / m[:7]
    ulps = (r[:7].view(torch.int32) - ieee.view(torch.int32)).abs()
    assert ulps.max() <= 1, "rcp.approx is within one ulp of the IEEE reciprocal"
    # The table really deviates (this is why codes differ on ties): about 13% of mantissas.
    table = R._rcp_delta_table()
    assert table.numel() == 2**23 and 0.10 < (table != 0).float().mean() < 0.16


# ---- QuantState serialization ---------------------------------------------------------------------


def _state(nested, quant_type="nf4"):
    A = random_tensor((64, 96), torch.bfloat16)
    return F.quantize_4bit(A, compress_statistics=nested, quant_type=quant_type)


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_as_dict_packed_keys_and_json(nested, quant_type):
    _, state = _state(nested, quant_type)
    d = state.as_dict(packed=True)
    expected = {"absmax", "quant_map", f"quant_state.bitsandbytes__{quant_type}"}
    if nested:
        expected |= {"nested_absmax", "nested_quant_map"}
    assert set(d) == expected
    assert all(isinstance(v, torch.Tensor) for v in d.values())
    info = json.loads(bytes(d[f"quant_state.bitsandbytes__{quant_type}"].tolist()).decode())
    keys = {"quant_type", "blocksize", "dtype", "shape"}
    if nested:
        keys |= {"nested_blocksize", "nested_dtype", "nested_offset"}
    assert set(info) == keys
    assert info["dtype"] == "bfloat16" and info["shape"] == [64, 96] and info["blocksize"] == 64
    if nested:
        assert info["nested_blocksize"] == 256 and info["nested_dtype"] == "float32"
        assert info["nested_offset"] == state.offset.item()
    restored = QuantState.from_dict({f"weight.{k}": v for k, v in d.items()}, device="cpu")
    assert restored == state


def test_from_dict_accepts_unpacked_and_moves_devices():
    _, state = _state(True)
    assert QuantState.from_dict(state.as_dict(packed=False), device="cpu") == state
    assert state.to("cpu") is state
    assert state[0] is state.absmax and state[3] == 64 and state[4][0] is state.offset  # old list layout


def test_equality_is_bitwise():
    _, a = _state(False)
    _, b = _state(False)
    assert a == b
    b.absmax = b.absmax.clone()
    b.absmax[0] = torch.nextafter(b.absmax[0], torch.tensor(10.0))
    assert a != b
    _, nested = _state(True)
    assert a != nested


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda d: d.pop("absmax"), "missing keys \\['absmax'\\]"),
        (lambda d: d.pop("quant_state.bitsandbytes__nf4"), "found neither"),
        (
            lambda d: d.__setitem__("quant_state.bitsandbytes__nf4", d["quant_state.bitsandbytes__nf4"][:-7]),
            "not valid JSON",
        ),
        (
            lambda d: d.__setitem__(
                "quant_state.bitsandbytes__nf4", torch.tensor(list(b'{"quant_type": "nf4"}'), dtype=torch.uint8)
            ),
            "missing keys",
        ),
        (lambda d: d.pop("nested_absmax"), "missing keys \\['nested_absmax'\\]"),
        (lambda d: d.__setitem__("bogus", torch.zeros(1)), "unexpected keys"),
        (
            lambda d: d.__setitem__("quant_state.bitsandbytes__xx4", d.pop("quant_state.bitsandbytes__nf4")),
            "exactly one key",
        ),
    ],
)
def test_from_dict_rejects_truncated_or_corrupted_state(mutate, message):
    _, state = _state(True)
    d = state.as_dict(packed=True)
    mutate(d)
    with pytest.raises(ValueError, match=message):
        QuantState.from_dict(d, device="cpu")


def test_matmul_4bit_is_exported():
    assert halfbyte.matmul_4bit is not None


def test_serialized_tables_never_share_memory():
    # Code tables are shared between states in memory; what as_dict() hands to a serializer must not be
    # (safetensors refuses tensors that share storage across keys/layers).
    _, a = _state(True)
    _, b = _state(True)
    da, db = a.as_dict(packed=True), b.as_dict(packed=True)
    pointers = [t.untyped_storage().data_ptr() for d in (da, db) for t in d.values()]
    assert len(pointers) == len(set(pointers))
    assert torch.equal(da["quant_map"], a.code) and torch.equal(da["nested_quant_map"], a.state2.code)


# ---- the kernels' cached view of a QuantState (functional.kernel_inputs) ----------------------------------


def test_kernel_inputs_are_cached_and_match_the_fields():
    _, state = _state(nested=True)
    inputs = F.kernel_inputs(state)
    assert F.kernel_inputs(state) is inputs  # one dict per state, reused
    assert inputs["shape"] == list(state.shape) and inputs["blocksize"] == state.blocksize
    assert inputs["quant_type"] == state.quant_type
    assert inputs["absmax"] is state.absmax and inputs["offset"] is state.offset
    assert inputs["nested"]["absmax"] is state.state2.absmax and inputs["nested"]["code"] is state.state2.code
    _, plain = _state(nested=False)
    assert F.kernel_inputs(plain)["nested"] is None and F.kernel_inputs(plain)["absmax"] is plain.absmax


@pytest.mark.parametrize("change", ["field", "nested field", "to"])
def test_kernel_inputs_follow_every_change_of_the_state(change):
    _, state = _state(nested=True)
    inputs = F.kernel_inputs(state)
    if change == "field":
        state.absmax = state.absmax.clone()
    elif change == "nested field":
        state.state2.absmax = state.state2.absmax * 2
    else:
        state.to("cpu")  # QuantState.to replaces the tensors, even on the same device
    assert not inputs or not inputs["nested"]  # the old dict (what a compiled graph holds) was emptied in place
    fresh = F.kernel_inputs(state)
    assert fresh["absmax"] is state.absmax and fresh["nested"]["absmax"] is state.state2.absmax


def test_copies_and_pickles_of_a_state_carry_no_kernel_inputs():
    import copy
    import pickle

    _, state = _state(nested=True)
    F.kernel_inputs(state)
    for duplicate in (copy.copy(state), copy.deepcopy(state), pickle.loads(pickle.dumps(state))):
        assert "_kernel_inputs" not in vars(duplicate)
        assert duplicate == state
        assert F.kernel_inputs(duplicate)["absmax"] is duplicate.absmax
