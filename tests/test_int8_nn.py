"""halfbyte.nn.Int8Params and Linear8bitLt (the INT8 tier), against the INT8 ops (themselves tested against
reference_int8.py in test_int8_ops.py) and bitsandbytes' Linear8bitLt for the attribute set, the state-dict format
and the outputs."""

import copy
import io
import pickle

import halfbyte.functional as F
import halfbyte.reference_int8 as R
import pytest
import torch
from conftest import DEVICES, assert_same_bits, random_tensor
from halfbyte.nn import Int8Params, Linear8bitLt
from torch import nn

BNB_PARAM_ATTRIBUTES = ["CB", "SCB", "has_fp16_weights"]
# Layer output against its float64 statement (R.int8_linear), relative Frobenius error: float32 accumulation for
# float32; rounding the output to the dtype (2^-9 bfloat16, 2^-12 float16 per element), twice with outliers.
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 6e-3, torch.float16: 1.5e-3}


def fp16_exact_weight(N, K, seed=0):
    """float32 values exactly representable in float16: bitsandbytes quantizes through float16, halfbyte in the
    weight's own dtype, so only such weights give both libraries the same input."""
    return (random_tensor((N, K), torch.float32, seed=seed) * 0.05).half().float()


def quantized_layer(device="cpu", N=48, K=128, bias=True, threshold=0.0, seed=0):
    layer = Linear8bitLt(K, N, bias=bias, has_fp16_weights=False, threshold=threshold)
    state = {"weight": fp16_exact_weight(N, K, seed)}
    if bias:
        state["bias"] = random_tensor((N,), torch.float32, seed=seed + 1)
    layer.load_state_dict(state)
    return layer.to(device)


def bnb_or_skip_nn():
    return pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed: not compared")


# ---- Int8Params ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("move", ["to", "method"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_params_quantize_on_move_like_vectorwise_quant(device, move, dtype):
    weight = random_tensor((32, 96), dtype)
    param = Int8Params(weight.clone(), requires_grad=False)
    assert param.dtype != torch.int8 and param.dtype == dtype
    param = param.to(device) if move == "to" else getattr(param, device)()
    CB, SCB, _ = F.int8_vectorwise_quant(weight.to(device))
    assert isinstance(param, Int8Params) and param.dtype == torch.int8 and not param.requires_grad
    assert_same_bits(param.data, CB, "codes")
    assert_same_bits(param.SCB, SCB, "SCB")
    assert param.CB is param.data or torch.equal(param.CB, param.data)
    assert param.device.type == device and param.SCB.device.type == device


def test_int8_params_have_the_bitsandbytes_attribute_set():
    param = Int8Params(torch.randn(8, 64)).to("cpu")
    assert sorted(param.__dict__) == BNB_PARAM_ATTRIBUTES
    bnb = bnb_or_skip_nn()
    assert sorted(bnb.nn.Int8Params(torch.randn(8, 64)).__dict__) == BNB_PARAM_ATTRIBUTES
    # transformers rebuilds the parameter from its __dict__ and the checkpoint's SCB
    kwargs = dict(param.__dict__, SCB=param.SCB)
    rebuilt = Int8Params(param.data, requires_grad=False, **kwargs).to("cpu")
    assert rebuilt.dtype == torch.int8 and torch.equal(rebuilt.data, param.data) and rebuilt.SCB is param.SCB


def test_fp16_weights_stay_in_floating_point_on_move():
    param = Int8Params(torch.randn(8, 64), has_fp16_weights=True, requires_grad=True).to("cpu")
    assert param.dtype != torch.int8 and param.requires_grad and param.SCB is None


def test_quantized_params_ignore_dtype_casts_and_meta_cannot_be_quantized():
    param = Int8Params(torch.randn(16, 64)).to("cpu")
    codes = param.data.clone()
    for cast in (param.to(torch.float16), param.to("cpu", torch.float32)):
        assert isinstance(cast, Int8Params) and cast.dtype == torch.int8
        assert_same_bits(cast.data, codes, "codes after a dtype cast")
    layer = quantized_layer().half()
    assert layer.weight.dtype == torch.int8 and layer.bias.dtype == torch.float16
    meta = Int8Params(torch.empty(8, 64, device="meta"))
    assert meta.to("meta").dtype != torch.int8
    with pytest.raises(RuntimeError, match="meta device"):
        meta.to("cpu")


def test_copy_deepcopy_and_pickle():
    layer = quantized_layer()
    x = random_tensor((3, 128), torch.float32)
    expected = layer(x)
    shallow = copy.copy(layer.weight)
    assert shallow.data_ptr() == layer.weight.data_ptr() and shallow.SCB is layer.weight.SCB
    deep = copy.deepcopy(layer)
    assert deep.weight.data_ptr() != layer.weight.data_ptr() and deep.state.module is deep
    assert torch.equal(deep(x), expected)
    for restored in (pickle.loads(pickle.dumps(layer.weight)), pickle.loads(pickle.dumps(layer)).weight):
        assert isinstance(restored, Int8Params) and sorted(restored.__dict__) == BNB_PARAM_ATTRIBUTES
        assert_same_bits(restored.data, layer.weight.data, "pickled codes")
        assert_same_bits(restored.SCB, layer.weight.SCB, "pickled SCB")
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    assert torch.equal(torch.load(buffer, weights_only=False)(x), expected)


@pytest.mark.cuda
def test_moving_between_host_and_gpu_keeps_the_codes():
    layer = quantized_layer("cpu")
    codes, scb = layer.weight.data.clone(), layer.weight.SCB.clone()
    x = random_tensor((5, 128), torch.float32)
    expected = layer(x)
    layer.cuda()
    assert layer.weight.device.type == "cuda" and layer.weight.SCB.device.type == "cuda"
    assert layer.state.SCB is layer.weight.SCB and layer.state.CB.device.type == "cuda"
    assert_same_bits(layer.weight.data, codes, "codes on the GPU")
    # same codes, another kernel: float32 accumulation order only
    assert R.relative_error(layer(x.cuda()).cpu(), expected) < TOLERANCE[torch.float32]
    layer.cpu()
    assert_same_bits(layer.weight.data, codes, "codes back")
    assert_same_bits(layer.weight.SCB, scb, "SCB back")
    assert torch.equal(layer(x), expected)


# ---- forward ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 16, 24])  # weight-only up to 16 rows, LLM.int8 above
@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_forward_matches_the_reference(device, dtype, rows, threshold):
    layer = quantized_layer(device, threshold=threshold)
    x = random_tensor((rows, 128), dtype, device, seed=rows, scale=2.0)
    x[:, 5] = 8.0  # an outlier column (beyond the threshold)
    out = layer(x.view(2, -1, 128) if rows % 2 == 0 else x)
    assert out.dtype == dtype and out.shape[-1] == 48
    ref = R.int8_linear(x.cpu(), layer.weight.data.cpu(), layer.weight.SCB.cpu(), layer.bias.cpu().to(dtype), threshold)
    assert R.relative_error(out.reshape(rows, 48).cpu(), ref) < TOLERANCE[dtype]
    assert layer.bias.dtype == torch.float32  # cast per call, not in place (bitsandbytes casts bias.data)


def test_threshold_sends_outlier_columns_through_the_input_dtype():
    layer = quantized_layer(K=256, threshold=6.0)
    x = random_tensor((32, 256), torch.float32, seed=9)
    x[:, [3, 77]] = torch.tensor([40.0, -25.0])
    exact = x.double() @ R.dequantized_weight(layer.weight.data, layer.weight.SCB).T + layer.bias.double()
    without = Linear8bitLt(256, 48, has_fp16_weights=False)
    without.load_state_dict(layer.state_dict())
    err_with, err_without = R.relative_error(layer(x), exact), R.relative_error(without(x), exact)
    # int8 steps of absmax / 127: ~3 / 127 for the ordinary columns with the outliers in float32, 40 / 127 without
    assert err_with < 5e-3 and err_without > 3 * err_with, (err_with, err_without)


def test_unquantized_layer_wrong_input_and_bad_arguments_give_clear_errors():
    with pytest.raises(RuntimeError, match="not quantized yet"):
        Linear8bitLt(64, 8, has_fp16_weights=False)(torch.randn(2, 64))
    with pytest.raises(ValueError, match="in_features=64"):
        quantized_layer(K=64)(torch.randn(2, 32))
    with pytest.raises(ValueError, match="threshold must be a finite number >= 0"):
        Linear8bitLt(64, 8, threshold=-1.0)
    with pytest.raises(TypeError, match="threshold must be a number"):
        Linear8bitLt(64, 8, threshold="6")


def test_bitsandbytes_state_fields_read_the_weight():
    layer = quantized_layer(threshold=6.0)
    assert layer.state.threshold == 6.0 and not layer.state.has_fp16_weights
    assert layer.state.CB.data_ptr() == layer.weight.data_ptr() and layer.state.SCB is layer.weight.SCB
    assert layer.state.is_training and not layer.eval().state.is_training
    layer.state.SCB = layer.weight.SCB * 2  # transformers' dequantize_bnb_weight assigns state.SCB
    assert torch.equal(layer.weight.SCB, layer.state.SCB)


# ---- gradients, has_fp16_weights, compile -----------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows", [3, 20])
def test_gradients_reach_input_and_bias(device, rows):
    layer = quantized_layer(device, threshold=6.0)
    layer.bias.requires_grad_(True)
    x = random_tensor((rows, 128), torch.float32, device).requires_grad_()
    layer(x).square().sum().backward()
    weight = F.int8_vectorwise_dequant(layer.weight.data, layer.weight.SCB)
    out = layer(x).detach()
    grad_out = 2 * out
    torch.testing.assert_close(x.grad, grad_out @ weight, rtol=1e-5, atol=1e-5)  # float32 accumulation order
    torch.testing.assert_close(layer.bias.grad, grad_out.sum(0), rtol=1e-5, atol=1e-5)
    assert layer.weight.grad is None


@pytest.mark.parametrize("device", DEVICES)
def test_fp16_weights_are_quantized_at_each_forward_and_trained_in_floating_point(device):
    torch.manual_seed(0)
    layer = Linear8bitLt(64, 24, has_fp16_weights=True).to(device)
    assert layer.weight.dtype == torch.float32 and layer.weight.requires_grad
    x = random_tensor((5, 64), torch.float32, device).requires_grad_()
    out = layer(x)
    CB, SCB, _ = F.int8_vectorwise_quant(layer.weight.detach())
    assert torch.equal(out, F.int8_linear(x, CB, SCB, layer.bias))
    out.sum().backward()
    ones = torch.ones_like(out)
    torch.testing.assert_close(layer.weight.grad, ones.t() @ x.detach(), rtol=1e-5, atol=1e-5)  # float32 order
    torch.testing.assert_close(x.grad, ones @ F.int8_vectorwise_dequant(CB, SCB), rtol=1e-5, atol=1e-5)
    assert "SCB" not in layer.state_dict()
    with torch.no_grad():
        layer.weight.mul_(2)  # a training step: the next forward quantizes the new weight
    CB2, _, _ = F.int8_vectorwise_quant(layer.weight.detach())
    assert torch.equal(layer(x), F.int8_linear(x, CB2, SCB * 2, layer.bias))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph_of_a_linear8bit_model(device):
    torch._dynamo.reset()
    torch.manual_seed(0)
    first = Linear8bitLt(64, 96, has_fp16_weights=False)
    model = nn.Sequential(first, nn.GELU(), Linear8bitLt(96, 32, threshold=6.0, has_fp16_weights=False)).to(device)
    for layer in (model[0], model[2]):
        layer.bias.requires_grad_(True)
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    for rows in (4, 24):  # the weight-only and the LLM.int8 path
        x = random_tensor((rows, 64), torch.float32, device, seed=rows, scale=3.0).requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        out = compiled(x)
        out.square().sum().backward()
        grads = [x.grad.clone(), model[0].bias.grad.clone()]
        for p in model.parameters():
            p.grad = None
        out_ref = model(x_ref)
        out_ref.square().sum().backward()
        # the same ops; inductor fuses the elementwise ops around them (float32 rounding order)
        torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
        for grad, ref in zip(grads, [x_ref.grad, model[0].bias.grad], strict=True):
            torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-5)
        for p in model.parameters():
            p.grad = None


def test_fake_tensor_forward_gives_the_output_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    layer = quantized_layer(threshold=6.0)
    # plain tensors in: torch 2.11's FakeTensorMode does not take a Parameter subclass as a non-fake input
    tensors = (layer.weight.data.clone(), layer.weight.SCB.clone(), layer.bias.detach().to(torch.bfloat16))
    with FakeTensorMode() as mode:
        CB, SCB, bias = (mode.from_tensor(t) for t in tensors)
        for rows in (2, 40):
            x = mode.from_tensor(torch.randn(rows, 3, 128, dtype=torch.bfloat16))
            out = torch.ops.halfbyte.int8_linear(x, CB, SCB, bias, 6.0)
            assert out.shape == (rows, 3, 48) and out.dtype == torch.bfloat16


# ---- state dicts ---------------------------------------------------------------------------------------------


def bnb_layer(weight, bias, device="cpu", threshold=0.0):
    bnb = bnb_or_skip_nn()
    layer = bnb.nn.Linear8bitLt(weight.shape[1], weight.shape[0], has_fp16_weights=False, threshold=threshold)
    layer.weight.data.copy_(weight)
    layer.bias.data.copy_(bias)
    return layer.to(device)


def test_state_dict_has_bitsandbytes_keys_and_bytes():
    layer = quantized_layer()
    ours = layer.state_dict()
    theirs = bnb_layer(fp16_exact_weight(48, 128), layer.bias.detach()).state_dict()
    assert list(ours) == list(theirs) == ["weight", "bias", "SCB", "weight_format"]
    for key in ours:
        # float16-exact weights on this seed have no value on a half-integer tie (test_int8_ops.py, difference (a))
        assert_same_bits(ours[key], theirs[key], key)


def test_bitsandbytes_state_dict_loads_into_halfbyte_and_back():
    bnb = bnb_or_skip_nn()
    theirs = bnb_layer(fp16_exact_weight(48, 128, seed=5), random_tensor((48,), torch.float32, seed=6)).state_dict()
    ours = Linear8bitLt(128, 48)  # fresh, unquantized, even has_fp16_weights=True
    result = ours.load_state_dict(theirs)
    assert not result.missing_keys and not result.unexpected_keys
    assert ours.weight.dtype == torch.int8 and not ours.state.has_fp16_weights
    for key, value in ours.state_dict().items():
        assert_same_bits(value, theirs[key], key)
    # and bitsandbytes reads halfbyte's dict (into a layer it has quantized first, as it requires)
    back = bnb.nn.Linear8bitLt(128, 48, has_fp16_weights=False).to("cpu")
    back.load_state_dict(ours.state_dict())
    assert_same_bits(back.weight.data, ours.weight.data, "codes")
    assert_same_bits(back.weight.SCB, ours.weight.SCB, "SCB")
    # weight-only rows: bitsandbytes' training-mode CPU path is weight-only too (dequantized weight, F.linear)
    x = random_tensor((4, 128), torch.float32, seed=7)
    assert R.relative_error(ours(x), back.train()(x)) < TOLERANCE[torch.float32]


def test_outputs_match_bitsandbytes_llm_int8():
    bnb_or_skip_nn()
    layer = quantized_layer(threshold=6.0)
    theirs = bnb_layer(fp16_exact_weight(48, 128), layer.bias.detach(), threshold=6.0).eval()
    x = random_tensor((40, 128), torch.float16, seed=8, scale=2.0)
    x[:, 9] = 7.5
    # Both quantize the float16 rows alike (up to half-integer ties) and add the outlier column in float16;
    # bitsandbytes' CPU dequantization constant differs by 1.8e-5, and each side rounds to float16 (2^-11).
    assert R.relative_error(layer.half()(x), theirs.half()(x)) < 2e-3


def test_load_state_dict_onto_the_meta_device_and_with_assign():
    source = quantized_layer()
    with torch.device("meta"):
        shell = Linear8bitLt(128, 48, has_fp16_weights=False)
    shell.load_state_dict(source.state_dict(), assign=True)
    assert shell.weight.device.type == "cpu" and shell.bias.device.type == "cpu"
    x = random_tensor((2, 128), torch.float32)
    assert torch.equal(shell(x), source(x))


def test_float_state_dict_into_unquantized_and_quantized_layers():
    weight, bias = random_tensor((48, 128), torch.float32, seed=7), random_tensor((48,), torch.float32, seed=8)
    CB, SCB, _ = F.int8_vectorwise_quant(weight)
    plain = Linear8bitLt(128, 48, has_fp16_weights=False)
    plain.load_state_dict({"weight": weight, "bias": bias})
    plain.to("cpu")
    quantized = quantized_layer()
    quantized.load_state_dict({"weight": weight, "bias": bias})  # quantized on the spot
    for layer in (plain, quantized):
        assert_same_bits(layer.weight.data, CB, "codes")
        assert_same_bits(layer.weight.SCB, SCB, "SCB")


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda sd: sd.pop("SCB"), "missing key 'SCB'"),
        (lambda sd: sd.update({"SCB": sd["SCB"][:-1]}), "'SCB' must be float32 with 48 entries"),
        (lambda sd: sd.update({"SCB": sd["SCB"].half()}), "'SCB' must be float32 with 48 entries"),
        (lambda sd: sd.update({"weight": sd["weight"][:, :100]}), r"size mismatch for weight: .*\[48, 100\]"),
        (lambda sd: sd.update({"weight_format": torch.tensor(1, dtype=torch.uint8)}), "unsupported 'weight_format' 1"),
        (lambda sd: sd.update({"weight": sd["weight"].float()}), "'SCB' comes with a torch.float32 weight"),
        (lambda sd: sd.pop("weight"), "'SCB' comes with no 'weight'"),
    ],
    ids=["no-scb", "short-scb", "half-scb", "short-weight", "format", "float-weight-with-scb", "no-weight"],
)
def test_truncated_or_corrupted_state_dict_names_the_key(damage, message):
    state_dict = quantized_layer().state_dict()
    damage(state_dict)
    with pytest.raises(RuntimeError, match=message):
        Linear8bitLt(128, 48, has_fp16_weights=False).load_state_dict(state_dict)


def test_weight_format_row_is_accepted_in_every_spelling():
    state_dict = quantized_layer().state_dict()
    for spelling in ("row", 0, torch.tensor(0, dtype=torch.uint8)):
        fresh = Linear8bitLt(128, 48, has_fp16_weights=False)
        fresh.load_state_dict(dict(state_dict, weight_format=spelling))
        assert fresh.weight.dtype == torch.int8
    with pytest.raises(RuntimeError, match="size mismatch for weight"):
        quantized_layer().load_state_dict({"weight": torch.randn(48, 64), "bias": torch.randn(48)})
