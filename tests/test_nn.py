"""halfbyte.nn: Params4bit, Linear4bit / LinearNF4 / LinearFP4, Embedding4bit, replace_linear.

References: the functional API (quantize_4bit / dequantize_4bit, themselves tested bit-for-bit against
bitsandbytes' CUDA kernels) and bitsandbytes' own layers for the attribute set and the state-dict format.
"""

import copy
import io
import logging
import pickle

import halfbyte
import halfbyte.functional as F
import pytest
import torch
from conftest import DEVICES, HAS_CUDA, assert_same_bits, random_tensor
from halfbyte.nn import Embedding4bit, EmbeddingNF4, Linear4bit, LinearFP4, LinearNF4, Params4bit, replace_linear
from torch import nn

# Output of a 4-bit layer against F.linear with the dequantized weight, relative Frobenius error: float32
# accumulation order only (1e-5); bf16/fp16 round the activations, the weight and the output (2^-9 / 2^-12 each).
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2, torch.float16: 3e-3}
BNB_PARAM_ATTRIBUTES = [
    "blocksize", "bnb_quantized", "compress_statistics", "module", "quant_state", "quant_storage", "quant_type",
]  # fmt: skip


def relative_error(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def quantized_linear(device="cpu", N=48, K=128, quant_type="nf4", nested=True, bias=True, **kwargs):
    torch.manual_seed(0)
    layer = Linear4bit(K, N, bias=bias, quant_type=quant_type, compress_statistics=nested, **kwargs)
    return layer.to(device)


# ---- Params4bit ------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("move", ["to", "method"])
def test_params4bit_quantizes_on_move_like_quantize_4bit(device, move):
    weight = random_tensor((32, 96), torch.bfloat16)
    param = Params4bit(weight.clone(), quant_type="nf4", blocksize=128, compress_statistics=True)
    assert not param.bnb_quantized and param.dtype == torch.bfloat16
    param = param.to(device) if move == "to" else getattr(param, device)()
    packed, state = F.quantize_4bit(weight.to(device), blocksize=128, compress_statistics=True, quant_type="nf4")
    assert isinstance(param, Params4bit) and param.bnb_quantized and not param.requires_grad
    assert_same_bits(param.data, packed, "packed")
    assert param.quant_state == state
    assert param.device.type == device


def test_params4bit_has_the_bitsandbytes_attribute_set():
    param = Params4bit(torch.randn(8, 64)).to("cpu")
    assert sorted(param.__dict__) == BNB_PARAM_ATTRIBUTES
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed: attribute set not compared")
    assert sorted(bnb.nn.Params4bit(torch.randn(8, 64)).__dict__) == BNB_PARAM_ATTRIBUTES
    # quant-state fields reachable as attributes, as FSDP resolves "weight.absmax"
    assert param.absmax is param.quant_state.absmax and param.quant_map is param.quant_state.code
    assert param.nested_absmax is param.quant_state.state2.absmax and param.nested_offset is param.quant_state.offset
    with pytest.raises(AttributeError):
        Params4bit(torch.randn(8, 64)).absmax  # noqa: B018  (not quantized: no state)


def test_params4bit_rejects_bad_format_arguments():
    with pytest.raises(ValueError, match="blocksize"):
        Params4bit(torch.randn(4, 64), blocksize=48)
    with pytest.raises(ValueError, match="quant_type"):
        Params4bit(torch.randn(4, 64), quant_type="int4")
    with pytest.raises(TypeError, match="quant_storage"):
        Params4bit(torch.randn(4, 64), quant_storage=torch.int32)


def test_params4bit_on_meta_device_cannot_be_quantized():
    param = Params4bit(torch.empty(8, 64, device="meta"))
    assert not param.to("meta").bnb_quantized  # moving to meta is allowed, not quantizing
    with pytest.raises(RuntimeError, match="meta device"):
        param.to("cpu")


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16])
def test_quantized_params4bit_ignores_dtype_casts(storage):
    param = Params4bit(torch.randn(16, 64), quant_storage=storage).to("cpu")
    before = param.data.clone()
    for cast in (param.to(torch.float16), param.to("cpu", torch.float32)):
        assert isinstance(cast, Params4bit) and cast.bnb_quantized
        assert_same_bits(cast.data, before, "packed bytes after a dtype cast")
    layer = Linear4bit(64, 16, quant_storage=storage).to("cpu")
    packed = layer.weight.data.clone()
    for cast in (lambda m: m.to(torch.float16), nn.Module.half, nn.Module.float, nn.Module.bfloat16):
        cast(layer)
        assert isinstance(layer.weight, Params4bit) and layer.weight.bnb_quantized
        assert_same_bits(layer.weight.data, packed, "packed bytes after a module cast")
    assert layer.bias.dtype == torch.bfloat16


def test_copy_deepcopy_and_pickle():
    layer = quantized_linear()
    weight = layer.weight
    shallow = copy.copy(weight)
    assert shallow.data_ptr() == weight.data_ptr() and shallow.quant_state is weight.quant_state
    assert shallow.module is layer

    deep = copy.deepcopy(weight)
    assert isinstance(deep, Params4bit) and deep.data_ptr() != weight.data_ptr()
    assert deep.quant_state == weight.quant_state and deep.quant_state is not weight.quant_state
    assert deep.module is layer  # the module is shared unless it is being deep-copied too

    x = random_tensor((3, 128), torch.float32)
    layer_copy = copy.deepcopy(layer)
    assert layer_copy.weight.module is layer_copy
    assert torch.equal(layer_copy(x), layer(x))

    for restored in (pickle.loads(pickle.dumps(weight)), pickle.loads(pickle.dumps(layer)).weight):
        assert isinstance(restored, Params4bit)  # bitsandbytes comes back as a plain Parameter
        assert sorted(restored.__dict__) == BNB_PARAM_ATTRIBUTES
        assert_same_bits(restored.data, weight.data, "pickled bytes")
        assert restored.quant_state == weight.quant_state

    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    assert torch.equal(torch.load(buffer, weights_only=False)(x), layer(x))


@pytest.mark.cuda
def test_moving_between_cpu_and_gpu_keeps_the_bytes():
    layer = quantized_linear("cpu")
    packed = layer.weight.data.clone()
    state = copy.deepcopy(layer.weight.quant_state)
    x = random_tensor((5, 128), torch.float32)
    expected = layer(x)
    layer.cuda()
    assert layer.weight.device.type == "cuda" and layer.weight.quant_state.absmax.device.type == "cuda"
    assert layer.quant_state is layer.weight.quant_state
    assert_same_bits(layer.weight.data, packed, "bytes on the GPU")
    # same bytes, different kernels: float32 accumulation order only
    assert relative_error(layer(x.cuda()).cpu(), expected) < TOLERANCE[torch.float32]
    layer.cpu()
    assert_same_bits(layer.weight.data, packed, "bytes back on the CPU")
    assert layer.weight.quant_state == state
    assert torch.equal(layer(x), expected)


# ---- Linear4bit forward ------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_linear4bit_matches_dequantized_linear(device, quant_type, dtype):
    layer = quantized_linear(device, N=40, K=192, quant_type=quant_type)
    x = random_tensor((2, 3, 192), dtype, device)
    out = layer(x)
    assert out.shape == (2, 3, 40) and out.dtype == dtype
    weight = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    ref = nn.functional.linear(x.double(), weight.double(), layer.bias.double())
    assert relative_error(out, ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("device", DEVICES)
def test_compute_dtype_casts_in_and_out(device):
    layer = quantized_linear(device, compute_dtype=torch.bfloat16)
    x = random_tensor((4, 128), torch.float32, device)
    out = layer(x)
    assert out.dtype == torch.float32
    expected = halfbyte.matmul_4bit(
        x.bfloat16(), layer.weight, layer.weight.quant_state, bias=layer.bias.bfloat16()
    ).float()
    assert torch.equal(out, expected)
    assert layer.bias.dtype == torch.float32  # not cast in place (bitsandbytes casts bias.data)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("compute_dtype", [None, torch.bfloat16])
def test_eager_inference_calls_the_op_directly_with_the_same_bits(device, nested, compute_dtype, monkeypatch):
    # Inference on an input in the compute dtype takes forward's direct call of the op; the general path
    # (_matmul: casts, autograd, errors) must give the same bits, and is what every other case takes.
    import halfbyte.nn.linear4bit as linear4bit

    layer = quantized_linear(device, N=40, K=192, nested=nested, compute_dtype=compute_dtype)
    layer.bias.data = layer.bias.data.to(torch.bfloat16)
    x = random_tensor((2, 3, 192), torch.bfloat16, device)
    with torch.no_grad():
        layer(x)  # links the state's kernel inputs
    scale_args = layer.__dict__[linear4bit._LINKED_INPUTS][linear4bit._EAGER_ARGS]
    general = linear4bit._matmul(layer, x, layer.weight, scale_args)
    calls = []
    monkeypatch.setattr(linear4bit, "_matmul", lambda *args: calls.append(args) or general)
    with torch.no_grad():
        direct = layer(x)
    assert not calls  # the direct call, not the general path
    assert_same_bits(direct, general)
    # a cast, a gradient or a wrong input size: the general path
    layer(x.float())
    layer(x.requires_grad_())
    assert len(calls) == 2
    monkeypatch.undo()
    with pytest.raises(ValueError, match="in_features=192"):
        layer(random_tensor((2, 100), torch.bfloat16, device))


def test_layer_variants_and_blocksize():
    assert LinearNF4(64, 8).weight.quant_type == "nf4" and LinearFP4(64, 8).weight.quant_type == "fp4"
    layer = LinearNF4(256, 8, blocksize=128, compress_statistics=False).to("cpu")
    assert layer.weight.quant_state.blocksize == 128 and not layer.weight.quant_state.nested
    assert layer.weight.quant_state.absmax.numel() == 256 * 8 // 128


def test_unquantized_layer_and_wrong_input_give_clear_errors():
    with pytest.raises(RuntimeError, match="not quantized yet"):
        Linear4bit(64, 8)(torch.randn(2, 64))
    with pytest.raises(ValueError, match="in_features=64"):
        Linear4bit(64, 8).to("cpu")(torch.randn(2, 32))
    with pytest.raises(TypeError, match="compute_dtype"):
        Linear4bit(64, 8, compute_dtype=torch.int8)


@pytest.mark.cuda
def test_float32_compute_on_the_gpu_warns_once(caplog):
    import halfbyte.nn.linear4bit as linear4bit_module

    linear4bit_module._warned_slow_compute_dtype = False
    layers = [quantized_linear("cuda") for _ in range(2)]
    with caplog.at_level(logging.WARNING, logger="halfbyte"):
        layers[0](torch.randn(2, 128, device="cuda", dtype=torch.bfloat16))
        assert not caplog.records  # bf16: fast path
        for layer in layers:
            layer(torch.randn(2, 128, device="cuda"))
    assert len(caplog.records) == 1 and "compute_dtype" in caplog.records[0].getMessage()


def test_no_slow_dtype_warning_on_the_cpu(caplog):
    with caplog.at_level(logging.WARNING, logger="halfbyte"):
        quantized_linear("cpu")(torch.randn(2, 128))
    assert not caplog.records


# ---- gradients and compile ---------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradients_reach_input_and_bias(device, checkpointing):
    layer = quantized_linear(device)
    layer.bias.requires_grad_(True)
    x = random_tensor((3, 5, 128), torch.float32, device).requires_grad_()

    def loss_of(inp):
        return layer(inp).square().sum()

    loss = torch.utils.checkpoint.checkpoint(loss_of, x, use_reentrant=False) if checkpointing else loss_of(x)
    loss.backward()
    weight = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    x_ref = x.detach().clone().requires_grad_()
    bias_ref = layer.bias.detach().clone().requires_grad_()
    nn.functional.linear(x_ref, weight, bias_ref).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-4)  # float32 accumulation order
    torch.testing.assert_close(layer.bias.grad, bias_ref.grad, rtol=1e-5, atol=1e-4)
    assert layer.weight.grad is None


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph_of_a_linear4bit_model(device):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(
        Linear4bit(64, 96, quant_type="nf4"), nn.GELU(), Linear4bit(96, 32, quant_type="fp4", compress_statistics=False)
    ).to(device)
    for layer in (model[0], model[2]):
        layer.bias.requires_grad_(True)
    compiled = torch.compile(model, fullgraph=True)
    x = random_tensor((4, 64), torch.float32, device).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    out = compiled(x)
    out.square().sum().backward()
    grads = [x.grad.clone(), model[0].bias.grad.clone(), model[2].bias.grad.clone()]
    for p in model.parameters():
        p.grad = None
    out_ref = model(x_ref)
    out_ref.square().sum().backward()
    # same kernels; inductor fuses the elementwise ops around them (float32 rounding order)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    for grad, ref in zip(grads, [x_ref.grad, model[0].bias.grad, model[2].bias.grad], strict=True):
        torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("eager_first", [False, True], ids=["compiled-first", "eager-first"])
def test_compiled_linear4bit_follows_changes_of_its_quant_state(device, nested, eager_first):
    """The traced forward reads the kernel inputs that eager forward links into the module (cheaper guards); a
    compiled layer must still see every way the weight or its state can change after compilation: a loaded
    state dict, a field replaced on the QuantState (what QuantState.to does), the nested state's absmax
    replaced, another QuantState for the same Params4bit, another Params4bit. Eager calls in between relink."""
    torch._dynamo.reset()
    layer = quantized_linear(device, N=48, K=128, nested=nested)
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    x = random_tensor((3, 128), torch.float32, device)
    with torch.no_grad():
        if eager_first:  # as in generate(): the eager prefill links the kernel inputs before the first trace
            layer(x)
        outputs = [compiled(x)]
        torch.testing.assert_close(outputs[-1], layer(x), rtol=0, atol=0)  # same kernel, same inputs

        other = quantized_linear(device, N=48, K=128, nested=nested)
        other.weight.data.copy_(torch.flip(other.weight.data, [0]))  # different bytes, same shapes

        def replace_absmax():
            state = layer.weight.quant_state
            state.absmax = state.absmax.flip(0)

        def replace_nested_absmax():
            state = layer.weight.quant_state.state2
            state.absmax = state.absmax * 2

        def write_absmax_in_place():  # a layer's nested state: a view of the packed buffer (packed_scales.py)
            absmax = layer.weight.quant_state.absmax
            absmax.copy_(absmax.flip(0))

        def distinct_layer(seed):
            torch.manual_seed(seed)
            fresh = Linear4bit(128, 48, quant_type="nf4", compress_statistics=nested)
            return fresh.to(device)

        def another_state_for_the_bytes():  # the same Params4bit gets other bytes and another QuantState
            fresh = distinct_layer(1)
            layer.weight.data.copy_(fresh.weight.data)
            layer.weight.quant_state = fresh.weight.quant_state

        def another_weight():  # a new Params4bit, as accelerate sets it: straight into _parameters
            layer._parameters["weight"] = copy.deepcopy(distinct_layer(2).weight)

        changes = [lambda: layer.load_state_dict(other.state_dict()), replace_absmax, write_absmax_in_place]
        if nested:
            changes.append(replace_nested_absmax)
        changes += [another_state_for_the_bytes, another_weight]
        for change in changes:
            change()
            outputs.append(compiled(x))
            torch.testing.assert_close(outputs[-1], layer(x), rtol=0, atol=0)
            assert not torch.equal(outputs[-1], outputs[-2])


@pytest.mark.parametrize("device", DEVICES)
def test_a_layer_packs_its_double_quantized_scales_into_one_buffer(device, tmp_path):
    """The 8-bit absmax, nested absmax and offset of a layer's double-quantized state are views of one buffer
    (packed_scales.py) from the moment it is quantized or loaded: the bits, dtypes and shapes quantize_4bit gives,
    the same output; a forward never repacks (a CUDA graph captured earlier keeps its addresses); QuantState.to
    keeps the packing; state dicts, safetensors files and pickles are as before."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    weight = random_tensor((48, 256), torch.float32)
    layer = Linear4bit(256, 48, quant_type="nf4", compress_statistics=True)
    layer.weight.data.copy_(weight)
    layer = layer.to(device)
    _, unpacked = F.quantize_4bit(weight.to(device), blocksize=64, compress_statistics=True, quant_type="nf4")
    state = layer.weight.quant_state
    fields = lambda s: [s.absmax, s.offset, s.state2.absmax]  # noqa: E731
    assert len({t.untyped_storage().data_ptr() for t in fields(state)}) == 1, "the scales are not packed"
    for now, reference in zip(fields(state), fields(unpacked), strict=True):
        assert now.dtype == reference.dtype and now.shape == reference.shape
        assert_same_bits(now, reference)
    x = random_tensor((3, 256), torch.float32, device)
    expected = torch.ops.halfbyte.gemm_4bit(
        x, layer.weight.reshape(-1, 1), [48, 256], unpacked.state2.absmax, 64, "nf4", bias=layer.bias,
        absmax_8bit=unpacked.absmax, absmax_code=unpacked.state2.code, absmax_offset=unpacked.offset,
    )  # fmt: skip
    addresses = [t.data_ptr() for t in fields(state)]
    with torch.no_grad():
        out = layer(x)
    assert_same_bits(out, expected)
    assert [t.data_ptr() for t in fields(state)] == addresses, "a forward moved the scales"
    state.to(device)
    assert F.kernel_inputs(state)["traced"][4] is not None, "QuantState.to undid the packing"
    # serialization copies the views out (safetensors refuses shared storage, torch.save mixed dtypes)
    save_file({k: v.contiguous() for k, v in layer.state_dict().items()}, tmp_path / "layer.safetensors")
    fresh = Linear4bit(256, 48, quant_type="nf4", device="meta")
    fresh.load_state_dict(load_file(tmp_path / "layer.safetensors", device=device), assign=True)
    assert fresh.weight.quant_state == state
    assert len({t.untyped_storage().data_ptr() for t in fields(fresh.weight.quant_state)}) == 1
    with torch.no_grad():
        assert_same_bits(fresh(x), out)
        assert_same_bits(pickle.loads(pickle.dumps(layer))(x), out)


class _Stack(nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_compiled_double_quantized_layers_guard_two_tensors_each():
    """The traced forward of a linked layer reads its weight and one scale tensor (issue 7: every tensor a
    compiled model reads is re-checked before each call, and with 224 layers those checks cost milliseconds of
    each decode step); plain and double-quantized layers alike."""
    eval_frame = pytest.importorskip("torch._dynamo.eval_frame")
    if not hasattr(eval_frame, "_debug_get_cache_entry_list"):
        pytest.skip("this torch cannot list a compiled frame's guards")
    torch._dynamo.reset()
    layers = [quantized_linear(N=128, nested=True, bias=False) for _ in range(3)]
    layers[1] = quantized_linear(N=128, nested=False, bias=False)
    for layer in layers[1:]:  # as quantize_4bit makes them: one nested code for all layers
        if layer.weight.quant_state.nested:
            layer.weight.quant_state.state2.code = layers[0].weight.quant_state.state2.code
    model = _Stack(layers)
    x = torch.randn(2, 128)
    with torch.no_grad():
        expected = model(x)  # the eager forward links the kernel inputs
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        assert_same_bits(compiled(x), expected)
    entries = eval_frame._debug_get_cache_entry_list(_Stack.forward.__code__)
    guards = str(entries[0].guard_manager)
    # x, each layer's weight and scales, and the one nested code
    assert guards.count("TENSOR_MATCH") == 1 + 2 * len(layers) + 1, guards


def test_a_replaced_weight_is_not_kept_alive_by_the_layer():
    import gc
    import weakref

    layer = quantized_linear("cpu")
    layer(torch.randn(2, 128))  # links the kernel inputs for the compiled forward
    old = weakref.ref(layer.weight)
    layer._parameters["weight"] = copy.deepcopy(layer.weight)  # how accelerate swaps weights (offloading)
    gc.collect()
    assert old() is None
    layer(torch.randn(2, 128))
    assert pickle.loads(pickle.dumps(layer)).weight.quant_state == layer.weight.quant_state  # the link is not pickled


def test_compiled_linear4bit_raises_the_eager_errors():
    torch._dynamo.reset()
    layer = quantized_linear("cpu", N=48, K=128)
    with pytest.raises(Exception, match="in_features=128"):
        torch.compile(layer, fullgraph=True, backend="eager")(torch.randn(2, 64))
    torch._dynamo.reset()
    unquantized = Linear4bit(128, 48, quant_type="nf4")
    with pytest.raises(Exception, match="not quantized yet"):
        torch.compile(unquantized, fullgraph=True, backend="eager")(torch.randn(2, 128))


# ---- state dicts -------------------------------------------------------------------------------------


def state_dict_of_bnb_layer(weight, bias, quant_type, nested, device="cpu"):
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed: state dicts not compared")
    layer = bnb.nn.Linear4bit(weight.shape[1], weight.shape[0], quant_type=quant_type, compress_statistics=nested)
    layer.weight.data.copy_(weight)
    layer.bias.data.copy_(bias)
    return layer.to(device).state_dict()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
def test_state_dict_has_bitsandbytes_keys_and_bytes(device, quant_type, nested):
    weight = random_tensor((48, 128), torch.float32, seed=1)
    # no value that rounds to zero magnitude: bitsandbytes' CPU fallback writes FP4's -0 code for those where its
    # CUDA kernels (and halfbyte) write +0 (tests/test_bnb_parity.py documents the divergences)
    weight = weight.sign() * (weight.abs() + 0.05)
    bias = random_tensor((48,), torch.float32, seed=2)
    layer = Linear4bit(128, 48, quant_type=quant_type, compress_statistics=nested)
    layer.load_state_dict({"weight": weight, "bias": bias})
    ours = layer.to(device).state_dict()
    theirs = state_dict_of_bnb_layer(weight, bias, quant_type, nested, device)
    assert list(ours) == list(theirs)
    for key in ours:
        assert_same_bits(ours[key], theirs[key], key)


@pytest.mark.parametrize("nested", [False, True])
def test_load_state_dict_into_a_fresh_layer(nested):
    source = quantized_linear(nested=nested, compute_dtype=torch.float32)
    state_dict = source.state_dict()
    fresh = Linear4bit(128, 48, quant_type="fp4", compress_statistics=not nested, compute_dtype=torch.float32)
    result = fresh.load_state_dict(state_dict)
    assert not result.missing_keys and not result.unexpected_keys
    assert fresh.weight.bnb_quantized and fresh.weight.quant_type == "nf4"  # the checkpoint's format wins
    assert fresh.weight.compress_statistics == nested and fresh.quant_state is fresh.weight.quant_state
    assert fresh.weight.module is fresh
    assert_same_bits(fresh.weight.data, source.weight.data, "weight")
    assert fresh.weight.quant_state == source.weight.quant_state
    x = random_tensor((3, 128), torch.float32)
    assert torch.equal(fresh(x), source(x))
    for key, value in fresh.state_dict().items():
        assert_same_bits(value, state_dict[key], key)


def test_load_state_dict_onto_the_meta_device_and_with_assign():
    source = quantized_linear()
    with torch.device("meta"):
        shell = Linear4bit(128, 48, quant_type="nf4")
    shell.load_state_dict(source.state_dict(), assign=True)
    assert shell.weight.device.type == "cpu" and shell.bias.device.type == "cpu"
    x = random_tensor((2, 128), torch.float32)
    assert torch.equal(shell(x), source(x))


def test_bitsandbytes_state_dict_loads_into_halfbyte_and_back():
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed")
    weight, bias = random_tensor((48, 128), torch.float32, seed=5), random_tensor((48,), torch.float32, seed=6)
    theirs = state_dict_of_bnb_layer(weight, bias, "nf4", True)
    ours = Linear4bit(128, 48)
    ours.load_state_dict(theirs)
    for key, value in ours.state_dict().items():
        assert_same_bits(value, theirs[key], key)
    # and bitsandbytes reads halfbyte's dict through its own from_prequantized
    bnb_layer = bnb.nn.Linear4bit(128, 48, quant_type="nf4")
    stats = {k[len("weight.") :]: v for k, v in ours.state_dict().items() if k.startswith("weight.")}
    bnb_layer.weight = bnb.nn.Params4bit.from_prequantized(ours.weight.data, stats, device="cpu", module=bnb_layer)
    reference = F.dequantize_4bit(ours.weight.data, ours.weight.quant_state)
    assert_same_bits(bnb.functional.dequantize_4bit(bnb_layer.weight.data, bnb_layer.weight.quant_state), reference)


def test_from_prequantized_builds_the_same_parameter():
    source = quantized_linear()
    stats = {k: v for k, v in source.state_dict().items() if k.startswith("weight.")}
    layer = Linear4bit(128, 48)
    param = Params4bit.from_prequantized(source.weight.data, stats, device="cpu", module=layer)
    assert param.bnb_quantized and param.module is layer and layer.quant_state is param.quant_state
    assert param.quant_state == source.weight.quant_state and param.quant_type == "nf4" and param.compress_statistics
    with pytest.raises(ValueError, match="data"):
        Params4bit.from_prequantized(source.weight.data[:-3], stats, device="cpu")


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda sd: sd.pop("weight.absmax"), "weight.absmax"),
        (lambda sd: sd.pop("weight.quant_state.bitsandbytes__nf4"), "weight.quant_state.bitsandbytes__"),
        (lambda sd: sd.pop("weight.nested_absmax"), "weight.nested_absmax"),
        (lambda sd: sd.pop("weight"), "missing key 'weight'"),
        (lambda sd: sd.update({"weight": sd["weight"][:100]}), "weight: 100 packed bytes"),
        (lambda sd: sd.update({"weight.absmax": sd["weight.absmax"][:-1]}), "absmax has 95 entries"),
        (lambda sd: sd.update({"weight.quant_state.bitsandbytes__nf4": torch.tensor([1, 2], dtype=torch.uint8)}),
         "under 'weight.': quant_state: the packed"),
    ],
    ids=["absmax", "packed-json", "nested-absmax", "weight", "short-weight", "short-absmax", "corrupt-json"],
)  # fmt: skip
def test_truncated_or_corrupted_state_dict_names_the_key(damage, message):
    state_dict = quantized_linear().state_dict()
    damage(state_dict)
    with pytest.raises(RuntimeError, match=message):
        Linear4bit(128, 48).load_state_dict(state_dict)


def test_state_dict_of_another_shape_names_the_weight():
    state_dict = quantized_linear(N=32).state_dict()
    with pytest.raises(RuntimeError, match=r"size mismatch for weight: .*\[32, 128\].*\[48, 128\]"):
        Linear4bit(128, 48).load_state_dict(state_dict)
    quantized = quantized_linear()
    with pytest.raises(RuntimeError, match="size mismatch for weight"):
        quantized.load_state_dict({"weight": torch.randn(48, 64), "bias": torch.randn(48)})


def test_float_state_dict_into_unquantized_and_quantized_layers():
    weight, bias = random_tensor((48, 128), torch.float32, seed=7), random_tensor((48,), torch.float32, seed=8)
    packed, state = F.quantize_4bit(weight, quant_type="nf4", compress_statistics=True)
    plain = Linear4bit(128, 48, quant_type="nf4")
    plain.load_state_dict({"weight": weight, "bias": bias})
    plain.to("cpu")
    quantized = quantized_linear()
    quantized.load_state_dict({"weight": weight, "bias": bias})  # quantized in the layer's format
    for layer in (plain, quantized):
        assert_same_bits(layer.weight.data, packed, "weight")
        assert layer.weight.quant_state == state


# ---- Embedding4bit -----------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dim, blocksize", [(128, 64), (256, 256), (96, 64)])
def test_embedding4bit_lookup_equals_the_dequantized_table(device, quant_type, nested, dim, blocksize):
    torch.manual_seed(0)
    table = torch.randn(300, dim, dtype=torch.bfloat16)
    emb = Embedding4bit(300, dim, dtype=torch.bfloat16, quant_type=quant_type, blocksize=blocksize,
                        compress_statistics=nested)  # fmt: skip
    emb.load_state_dict({"weight": table})
    emb = emb.to(device)
    indices = torch.tensor([[0, 299, 5], [5, 17, 123]], device=device)
    out = emb(indices)
    full = F.dequantize_4bit(emb.weight.data, emb.weight.quant_state)
    assert out.shape == (2, 3, dim) and out.dtype == torch.bfloat16
    assert_same_bits(out, full[indices], "looked-up rows")  # same decode, rows gathered first or after


def test_embedding4bit_dequantizes_only_the_looked_up_rows(monkeypatch):
    import halfbyte.nn.embedding4bit as embedding_module

    emb = EmbeddingNF4(1000, 128).to("cpu")
    full = F.dequantize_4bit(emb.weight.data, emb.weight.quant_state)
    shapes, dequantize = [], F.dequantize_4bit

    def recording_dequantize(A, quant_state, *args, **kwargs):
        shapes.append(tuple(quant_state.shape))
        return dequantize(A, quant_state, *args, **kwargs)

    monkeypatch.setattr(embedding_module.F, "dequantize_4bit", recording_dequantize)
    indices = torch.tensor([1, 999, 3])
    assert_same_bits(emb(indices), full[indices], "rows 1, 999, 3")
    assert shapes == [(3, 128)]  # three rows decoded, not the 1000-row table


def test_embedding4bit_state_dict_round_trip_and_errors():
    emb = Embedding4bit(50, 64, quant_type="nf4").to("cpu")
    state_dict = emb.state_dict()
    assert sorted(state_dict) == ["weight", "weight.absmax", "weight.quant_map", "weight.quant_state.bitsandbytes__nf4"]
    fresh = Embedding4bit(50, 64)
    fresh.load_state_dict(state_dict)
    indices = torch.arange(50)
    assert torch.equal(fresh(indices), emb(indices))
    with pytest.raises(RuntimeError, match=r"\[40, 64\]"):
        Embedding4bit(40, 64).load_state_dict(state_dict)
    with pytest.raises(TypeError, match="int32 or int64"):
        emb(torch.tensor([1.0]))


def test_embedding4bit_warns_when_rows_are_not_whole_blocks(caplog):
    with caplog.at_level(logging.WARNING, logger="halfbyte"):
        Embedding4bit(10, 96)
    assert "not a multiple of blocksize" in caplog.text


# ---- replace_linear ----------------------------------------------------------------------------------


class TinyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 64)
        self.attn = nn.MultiheadAttention(64, 4, batch_first=True)
        self.blocks = nn.ModuleList(
            [nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64)) for _ in range(2)]
        )
        self.vision = nn.Linear(64, 64)
        self.lm_head = nn.Linear(64, 20, bias=False)

    def forward(self, ids):
        h = self.embed(ids)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        for block in self.blocks:
            h = h + block(h)
        return self.lm_head(h + self.vision(h))


def test_replace_linear_converts_in_place():
    torch.manual_seed(0)
    model = TinyModel()
    originals = {name: m.weight.detach().clone() for name, m in model.named_modules() if type(m) is nn.Linear}
    ids = torch.randint(0, 20, (2, 7))
    expected = model(ids)
    returned = replace_linear(model, quant_type="nf4", compute_dtype=torch.float32, skip_modules=["lm_head", "vision"])
    assert returned is model and not hasattr(model, "is_loaded_in_4bit")  # transformers would import bitsandbytes
    converted = {name for name, m in model.named_modules() if isinstance(m, Linear4bit)}
    assert converted == {"blocks.0.0", "blocks.0.2", "blocks.1.0", "blocks.1.2"}
    assert type(model.lm_head) is nn.Linear and type(model.vision) is nn.Linear
    assert type(model.attn.out_proj) is not Linear4bit  # read directly by MultiheadAttention
    for name in converted:
        layer = model.get_submodule(name)
        packed, state = F.quantize_4bit(originals[name], quant_type="nf4", compress_statistics=True)
        assert_same_bits(layer.weight.data, packed, name)
        assert layer.weight.quant_state == state and layer.weight.module is layer
    # NF4 keeps a small model's output within a few percent (4-bit weights, ~1e-1 relative weight error per value)
    assert relative_error(model(ids), expected) < 0.1


def test_replace_linear_on_meta_device_and_bad_arguments(capsys):
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    replace_linear(model, skip_modules=[], progress=True)
    assert all(isinstance(m, Linear4bit) and not m.weight.bnb_quantized for m in model)
    assert "quantizing Linear layers" in capsys.readouterr().err  # the progress bar
    with pytest.raises(ValueError, match="quant_type"):
        replace_linear(nn.Sequential(nn.Linear(64, 64)), quant_type="int4")
    with pytest.raises(TypeError, match="skip_modules"):
        replace_linear(nn.Sequential(nn.Linear(64, 64)), skip_modules="lm_head")
    with pytest.raises(TypeError, match="nn.Module"):
        replace_linear(torch.randn(3))


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_replace_linear_quantizes_on_the_weights_device():
    model = nn.Sequential(nn.Linear(64, 64)).cuda()
    replace_linear(model, skip_modules=[])
    assert model[0].weight.device.type == "cuda" and model[0].weight.quant_state.absmax.device.type == "cuda"
