"""from_pretrained / save_pretrained with HalfbyteConfig(load_in_8bit=True) (LLM.int8) on a tiny Llama, on CPU.

References: halfbyte.functional.int8_vectorwise_quant (bit-exact, tested against bitsandbytes in test_int8_ops.py)
for the weights quantized while loading; the bf16 model for the outputs; the checkpoint files for pre-quantized
loading; bitsandbytes' CPU path for the 8-bit checkpoints it writes and reads.
"""

import json

import halfbyte.functional as F
import pytest
import torch
from conftest import assert_same_bits
from halfbyte import HalfbyteConfig
from halfbyte.nn import Int8Params, Linear8bitLt

transformers = pytest.importorskip("transformers", reason="transformers not installed: HF integration not tested")
safetensors_torch = pytest.importorskip("safetensors.torch")
from halfbyte.integrations import transformers as integration  # noqa: E402
from halfbyte.integrations.transformers import CheckpointError  # noqa: E402
from test_transformers import linear_names, load, rewrite_checkpoint, save_tiny_llama, tokens  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

LAYERS = [
    f"model.layers.{i}.{name}" for i in range(2)
    for name in ("mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj", "self_attn.o_proj",
                 "self_attn.q_proj", "self_attn.v_proj")
]  # fmt: skip


@pytest.fixture(scope="module")
def bf16_folder(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("bf16"))


@pytest.fixture(scope="module")
def int8_folder(tmp_path_factory, bf16_folder):
    """A halfbyte 8-bit checkpoint (threshold 0) of the bf16 model."""
    folder = tmp_path_factory.mktemp("int8")
    load(bf16_folder, HalfbyteConfig(load_in_8bit=True, llm_int8_threshold=0.0)).save_pretrained(folder)
    return folder


def bf16_logits(folder):
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)(tokens()).logits.float()


# ---- quantizing while loading -------------------------------------------------------------------------


@pytest.mark.parametrize("threshold", [6.0, 0.0])
def test_load_in_8bit_quantizes_every_linear_like_int8_vectorwise_quant_and_keeps_lm_head(bf16_folder, threshold):
    config = HalfbyteConfig(load_in_8bit=True, llm_int8_threshold=threshold)
    model = load(bf16_folder, config, dtype=torch.bfloat16)
    checkpoint = safetensors_torch.load_file(bf16_folder / "model.safetensors")
    assert linear_names(model, Linear8bitLt) == LAYERS and linear_names(model, torch.nn.Linear) == ["lm_head"]
    for name in LAYERS:
        layer = model.get_submodule(name)
        codes, row_absmax, _ = F.int8_vectorwise_quant(checkpoint[f"{name}.weight"])
        assert isinstance(layer.weight, Int8Params) and not layer.weight.requires_grad, name
        assert_same_bits(layer.weight.data, codes, name)
        assert_same_bits(layer.weight.SCB, row_absmax, f"{name}.SCB")
        assert layer.state.threshold == threshold and not layer.state.has_fp16_weights
    assert_same_bits(model.lm_head.weight.data, checkpoint["lm_head.weight"], "lm_head")
    assert model.config.quantization_config == config and model.hf_quantizer.is_compileable
    # The outputs stay close to the bf16 model's: row-wise int8 moves each weight by at most 1/254 of its row's
    # absmax, which after two layers and bf16 activations leaves the logits within a few percent (measured: 1.4%).
    logits, reference = model(tokens()).logits.float().detach(), bf16_logits(bf16_folder)
    assert (logits - reference).norm() / reference.norm() < 0.03
    assert torch.equal(logits.argmax(-1), reference.argmax(-1))


def test_weights_are_quantized_one_at_a_time_as_they_arrive(bf16_folder, monkeypatch):
    """When a weight is quantized it is still bf16 and every other 8-bit layer is either not loaded yet (meta) or
    already int8: the model never holds two full-precision Linear weights (peak = final footprint + one layer)."""
    seen = []
    original = integration._quantize_into
    original_preprocess = integration.HalfbyteHfQuantizer._process_model_before_weight_loading

    def spy(module, value, config):
        float_weights = [
            other for other in spy.model.modules()
            if isinstance(other, Linear8bitLt) and other is not module and other.weight.device.type != "meta"
            and other.weight.dtype != torch.int8
        ]  # fmt: skip
        seen.append((value.dtype, len(float_weights)))
        return original(module, value, config)

    def preprocess(self, model, **kwargs):
        spy.model = model
        return original_preprocess(self, model, **kwargs)

    monkeypatch.setattr(integration.HalfbyteHfQuantizer, "_process_model_before_weight_loading", preprocess)
    monkeypatch.setattr(integration, "_quantize_into", spy)
    load(bf16_folder, HalfbyteConfig(load_in_8bit=True))
    assert seen == [(torch.bfloat16, 0)] * len(LAYERS)


def test_skip_modules_lm_head_and_fp16_weights(bf16_folder):
    model = load(bf16_folder, HalfbyteConfig(load_in_8bit=True, llm_int8_skip_modules=["model.layers.1"]))
    assert isinstance(model.lm_head, Linear8bitLt)  # an explicit list replaces the defaults, as with bitsandbytes
    assert linear_names(model, Linear8bitLt) == sorted([n for n in LAYERS if "layers.1." not in n] + ["lm_head"])
    # llm_int8_has_fp16_weight: the layers keep the 16-bit weights and quantize them at each forward
    model = load(bf16_folder, HalfbyteConfig(load_in_8bit=True, llm_int8_has_fp16_weight=True), dtype=torch.bfloat16)
    layer = model.model.layers[0].mlp.up_proj
    checkpoint = safetensors_torch.load_file(bf16_folder / "model.safetensors")
    assert layer.state.has_fp16_weights and layer.weight.dtype == torch.bfloat16
    assert_same_bits(layer.weight.data, checkpoint["model.layers.0.mlp.up_proj.weight"], "up_proj")
    with torch.no_grad():
        assert torch.isfinite(model(tokens()).logits).all()


def test_memory_footprint_counts_int8_codes_and_row_absmax(bf16_folder):
    model = load(bf16_folder, HalfbyteConfig(load_in_8bit=True), dtype=torch.bfloat16)
    expected = 0
    for name, param in model.named_parameters():
        if isinstance(model.get_submodule(name.rpartition(".")[0]), Linear8bitLt) and name.endswith(".weight"):
            expected += param.numel() + 4 * param.shape[0]  # int8 codes, one float32 absmax per row
        else:
            expected += param.numel() * param.element_size()
    expected += sum(b.numel() * b.element_size() for b in model.buffers())
    assert model.get_memory_footprint() == expected
    assert type(model).get_memory_footprint(model) < expected  # transformers' own count misses SCB


# ---- saving and loading pre-quantized checkpoints --------------------------------------------------------


def test_save_pretrained_writes_bitsandbytes_8bit_keys_and_config(int8_folder):
    saved = json.loads((int8_folder / "config.json").read_text())["quantization_config"]
    assert saved == BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.0).to_dict()
    tensors = safetensors_torch.load_file(int8_folder / "model.safetensors")
    for name in LAYERS:
        out_features = tensors[f"{name}.weight"].shape[0]
        assert tensors[f"{name}.weight"].dtype == torch.int8, name
        assert tensors[f"{name}.SCB"].dtype == torch.float32 and tensors[f"{name}.SCB"].shape == (out_features,)
        assert_same_bits(tensors[f"{name}.weight_format"], torch.tensor(0, dtype=torch.uint8), name)
    assert tensors["lm_head.weight"].dtype == torch.bfloat16 and "lm_head.SCB" not in tensors
    assert not any(key.endswith(".weight.SCB") for key in tensors)  # SCB sits beside the weight, not under it


def test_prequantized_8bit_checkpoint_loads_bit_identically_without_requantizing(int8_folder, tmp_path, monkeypatch):
    calls = []
    original = integration._quantize_into
    monkeypatch.setattr(integration, "_quantize_into", lambda *args: calls.append(args) or original(*args))
    model = load(int8_folder, HalfbyteConfig())  # the documented call
    assert calls == []  # nothing was quantized again
    checkpoint = safetensors_torch.load_file(int8_folder / "model.safetensors")
    state = model.state_dict()
    assert set(state) == set(checkpoint)
    for key, tensor in checkpoint.items():
        assert_same_bits(state[key], tensor, key)
    assert model.model.layers[0].mlp.down_proj.state.threshold == 0.0  # from the saved config
    model.save_pretrained(tmp_path)  # and saving it again gives the same file contents
    again = safetensors_torch.load_file(tmp_path / "model.safetensors")
    assert again.keys() == checkpoint.keys() and all(torch.equal(again[k], checkpoint[k]) for k in again)
    other = load(int8_folder, HalfbyteConfig(llm_int8_threshold=4.0))
    assert other.model.layers[0].mlp.down_proj.state.threshold == 4.0  # a passed threshold wins (runtime only)


def test_round_trip_gives_the_same_outputs(bf16_folder, int8_folder):
    first = load(bf16_folder, HalfbyteConfig(load_in_8bit=True, llm_int8_threshold=0.0), dtype=torch.bfloat16)
    second = load(int8_folder, HalfbyteConfig(), dtype=torch.bfloat16)
    with torch.no_grad():
        assert_same_bits(second(tokens()).logits, first(tokens()).logits, "logits")
        eager = first.generate(tokens(), max_new_tokens=6, do_sample=False)
        assert torch.equal(second.generate(tokens(), max_new_tokens=6, do_sample=False), eager)


def test_bitsandbytes_8bit_checkpoint_loads_into_halfbyte_layers_bit_identically(bf16_folder, tmp_path):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed: no bitsandbytes checkpoint to load")
    bnb_config = BitsAndBytesConfig(load_in_8bit=True)
    load(bf16_folder, bnb_config, device_map="cpu", dtype=torch.bfloat16).save_pretrained(tmp_path)
    model = load(tmp_path, HalfbyteConfig(), dtype=torch.bfloat16)  # the documented call
    assert linear_names(model, Linear8bitLt) == LAYERS
    assert model.model.layers[0].mlp.down_proj.state.threshold == 6.0  # bitsandbytes' saved default
    checkpoint = safetensors_torch.load_file(tmp_path / "model.safetensors")
    state = model.state_dict()
    assert set(state) == set(checkpoint)
    for key, tensor in checkpoint.items():
        assert_same_bits(state[key], tensor, key)
    # and it computes with those codes: a layer's output is F.linear with its dequantized weight
    layer = model.model.layers[1].self_attn.q_proj
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    reference = torch.nn.functional.linear(x.float(), F.int8_vectorwise_dequant(layer.weight.data, layer.weight.SCB))
    # up to 16 rows the weight-only path accumulates in float32 and rounds once to bf16 (2^-8 relative)
    torch.testing.assert_close(layer(x).float(), reference, rtol=2**-7, atol=1e-3)


def test_bitsandbytes_loads_a_halfbyte_8bit_checkpoint(int8_folder):
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed: its loader not checked")
    model = AutoModelForCausalLM.from_pretrained(int8_folder, device_map="cpu")  # config.json says bitsandbytes
    assert isinstance(model.model.layers[0].mlp.down_proj, bnb.nn.Linear8bitLt)
    state = model.state_dict()
    for key, tensor in safetensors_torch.load_file(int8_folder / "model.safetensors").items():
        assert_same_bits(state[key], tensor, key)


def test_dequantize_gives_plain_linear_layers_with_the_decoded_weights(int8_folder):
    model = load(int8_folder, HalfbyteConfig())
    layer = model.model.layers[0].mlp.up_proj
    expected = F.int8_vectorwise_dequant(layer.weight.data, layer.weight.SCB).to(torch.bfloat16)
    model.dequantize(dtype=torch.bfloat16)
    assert not linear_names(model, Linear8bitLt)
    assert_same_bits(model.model.layers[0].mlp.up_proj.weight.data, expected, "up_proj")


def test_gpt2_conv1d_layers_quantize_and_round_trip(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=1, n_head=2, vocab_size=320, n_positions=64)).save_pretrained(
        tmp_path / "gpt2"
    )
    model = load(tmp_path / "gpt2", HalfbyteConfig(load_in_8bit=True))
    layer = model.transformer.h[0].attn.c_attn
    checkpoint = safetensors_torch.load_file(tmp_path / "gpt2" / "model.safetensors")
    codes, _, _ = F.int8_vectorwise_quant(checkpoint["transformer.h.0.attn.c_attn.weight"].t().contiguous())
    assert isinstance(layer, Linear8bitLt)
    assert_same_bits(layer.weight.data, codes, "c_attn ([in, out] Conv1D weight quantized as [out, in])")
    model.save_pretrained(tmp_path / "gpt2-int8")
    again = load(tmp_path / "gpt2-int8", HalfbyteConfig())
    with torch.no_grad():
        assert_same_bits(again(tokens()).logits, model(tokens()).logits, "logits")


# ---- bad input -----------------------------------------------------------------------------------------

LAYER = "model.layers.1.mlp.gate_proj"


def _set(key, make):
    return lambda t: t.update({key: make(t)})


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda t: t.pop(f"{LAYER}.SCB"), rf"'{LAYER}': has '{LAYER}.weight' but no row absmax '{LAYER}.SCB'"),
        (lambda t: t.pop(f"{LAYER}.weight"), rf"has '{LAYER}.SCB' but no int8 weight '{LAYER}.weight'"),
        (_set(f"{LAYER}.SCB", lambda t: t[f"{LAYER}.SCB"][:-5].clone()),
         rf"'{LAYER}.SCB' must be float32 with one entry per output row \(320\), got \[315\] x F32"),
        (_set(f"{LAYER}.SCB", lambda t: t[f"{LAYER}.SCB"].half()), rf"'{LAYER}.SCB' must be float32 .* x F16"),
        (_set(f"{LAYER}.SCB", lambda t: t[f"{LAYER}.SCB"].index_fill(0, torch.tensor([3]), float("nan"))),
         rf"'{LAYER}.SCB' holds negative, NaN or infinite values"),
        (_set(f"{LAYER}.SCB", lambda t: -t[f"{LAYER}.SCB"]), rf"'{LAYER}.SCB' holds negative"),
        (_set(f"{LAYER}.weight", lambda t: t[f"{LAYER}.weight"][:, :-8].clone()),
         rf"'{LAYER}': the checkpoint's 8-bit weight has shape \[320, 120\], the model's layer is \[320, 128\]"),
        (_set(f"{LAYER}.weight", lambda t: t[f"{LAYER}.weight"].float()),
         rf"'{LAYER}.weight' is \[320, 128\] x F32; beside '{LAYER}.SCB' it must hold the 2-D int8"),
        (_set(f"{LAYER}.weight_format", lambda t: torch.tensor(1, dtype=torch.uint8)),
         rf"'{LAYER}.weight_format' is 1; only the row layout"),
        (lambda t: [t.pop(k) for k in list(t) if k.endswith((".SCB", ".weight_format"))], r"\.\.\. and 6 more"),
        (lambda t: t.update({k: (v.float() * 0.01).bfloat16() for k, v in t.items() if v.dtype == torch.int8})
         or [t.pop(k) for k in list(t) if k.endswith((".SCB", ".weight_format"))], r"holds no '\*.SCB'"),
    ],
    ids=["no-SCB", "no-weight", "short-SCB", "fp16-SCB", "nan-SCB", "negative-SCB", "narrow-weight", "float-weight",
         "col-format", "no-SCB-at-all", "float-leftover-config"],
)  # fmt: skip
def test_missing_or_corrupted_8bit_weights_are_clear_errors_naming_the_key(int8_folder, tmp_path, change, message):
    broken = rewrite_checkpoint(int8_folder, tmp_path / "broken", change)
    with pytest.raises(CheckpointError, match=message):
        load(broken, HalfbyteConfig())


def test_checkpoint_of_another_model_size_is_a_clear_error(int8_folder, tmp_path):
    folder = rewrite_checkpoint(int8_folder, tmp_path / "resized", lambda t: None)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"intermediate_size": 256}))
    with pytest.raises(CheckpointError, match=r"down_proj': .* 8-bit weight has shape \[128, 320\], .* \[128, 256\]"):
        load(folder, HalfbyteConfig())


def test_bad_8bit_requests_are_clear_errors(bf16_folder):
    with pytest.raises(ValueError, match="llm_int8_threshold must be a finite number >= 0"):
        HalfbyteConfig(load_in_8bit=True, llm_int8_threshold=-1.0)
    with pytest.raises(ValueError, match="8-bit layers cannot be offloaded"):
        load(bf16_folder, HalfbyteConfig(load_in_8bit=True), device_map={"model": "cuda:0", "lm_head": "disk"})


def test_static_cache_compiled_generation_equals_eager(int8_folder):
    from transformers import CompileConfig

    torch._dynamo.reset()
    model = load(int8_folder, HalfbyteConfig(), dtype=torch.bfloat16)
    eager = model.generate(tokens(), max_new_tokens=8, do_sample=False)
    model.generation_config.cache_implementation = "static"
    compile_config = CompileConfig(fullgraph=True, mode="default")
    compile_config._compile_all_devices = True  # transformers compiles on its own only on GPUs
    model.generation_config.compile_config = compile_config
    torch._dynamo.utils.counters.clear()
    compiled = model.generate(tokens(), max_new_tokens=8, do_sample=False)
    assert hasattr(model, "_compiled_call") and torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    assert torch.equal(compiled, eager)
