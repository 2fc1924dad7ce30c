"""from_pretrained / save_pretrained with HalfbyteConfig on a tiny Llama (and GPT-2) built from its config, on CPU.

References: halfbyte.functional.quantize_4bit (bit-exact, tested against bitsandbytes elsewhere) for the weights
quantized while loading; the checkpoint files themselves for pre-quantized loading; bitsandbytes' CPU path for
the checkpoints it writes and reads.
"""

import json

import halfbyte.functional as F
import pytest
import torch
from conftest import assert_same_bits
from halfbyte import HalfbyteConfig
from halfbyte.nn import Linear4bit

transformers = pytest.importorskip("transformers", reason="transformers not installed: HF integration not tested")
safetensors_torch = pytest.importorskip("safetensors.torch")
from halfbyte.integrations import transformers as integration  # noqa: E402
from halfbyte.integrations.transformers import CheckpointError  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402

NF4_DQ = {
    "load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
    "bnb_4bit_compute_dtype": torch.bfloat16,
}  # fmt: skip
QUANT_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4")


def tiny_llama_config(**overrides):
    fields = dict(
        hidden_size=128, intermediate_size=320, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=384, max_position_embeddings=128, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        pad_token_id=0,
    )  # fmt: skip
    return LlamaConfig(**(fields | overrides))


def save_tiny_llama(folder, **overrides):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(**overrides)).to(torch.bfloat16)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bf16_folder(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("bf16"))


@pytest.fixture(scope="module")
def quantized_folder(tmp_path_factory, bf16_folder):
    folder = tmp_path_factory.mktemp("nf4")
    load(bf16_folder, HalfbyteConfig(**NF4_DQ)).save_pretrained(folder)
    return folder


def load(folder, config, **kwargs):
    kwargs.setdefault("device_map", "cpu")  # without one, the quantizer picks the GPU where there is one
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, **kwargs)


def linear_names(model, cls):
    return sorted(name for name, module in model.named_modules() if type(module) is cls)


def tokens():
    return torch.tensor([[1, 17, 99, 250, 7, 42, 5, 300]])


# ---- quantizing while loading -------------------------------------------------------------------------


@pytest.mark.parametrize("quant_type,nested", [("nf4", True), ("nf4", False), ("fp4", False)])
def test_loading_quantizes_every_linear_like_quantize_4bit_and_keeps_lm_head(bf16_folder, quant_type, nested):
    config = HalfbyteConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=nested)
    model = load(bf16_folder, config)
    checkpoint = safetensors_torch.load_file(bf16_folder / "model.safetensors")
    quantized = linear_names(model, Linear4bit)
    assert len(quantized) == 2 * 7 and "lm_head" not in quantized
    assert linear_names(model, torch.nn.Linear) == ["lm_head"]
    for name in quantized:
        layer = model.get_submodule(name)
        packed, state = F.quantize_4bit(
            checkpoint[f"{name}.weight"], blocksize=64, compress_statistics=nested, quant_type=quant_type
        )
        assert_same_bits(layer.weight.data, packed, name)
        assert layer.weight.quant_state == state, name
        assert layer.compute_dtype == torch.float32  # BitsAndBytesConfig's default
    assert_same_bits(model.lm_head.weight.data, checkpoint["lm_head.weight"], "lm_head")
    assert model.hf_quantizer.is_compileable and model.config.quantization_config == config


def test_weights_are_quantized_one_at_a_time_as_they_arrive(bf16_folder, monkeypatch):
    """When a weight is quantized, every other 4-bit layer is either not loaded yet (meta) or already packed:
    the model never holds two full-precision Linear weights (peak = final footprint + one layer)."""
    seen = []
    original = integration._quantize_into

    def spy(module, value, config):
        float_weights = [
            other
            for other in spy.model.modules()
            if isinstance(other, Linear4bit) and other is not module and other.weight.device.type != "meta"
            and not other.weight.bnb_quantized
        ]  # fmt: skip
        seen.append((value.dtype, len(float_weights)))
        return original(module, value, config)

    def preprocess(self, model, **kwargs):
        spy.model = model
        return original_preprocess(self, model, **kwargs)

    original_preprocess = integration.HalfbyteHfQuantizer._process_model_before_weight_loading
    monkeypatch.setattr(integration.HalfbyteHfQuantizer, "_process_model_before_weight_loading", preprocess)
    monkeypatch.setattr(integration, "_quantize_into", spy)
    load(bf16_folder, HalfbyteConfig(**NF4_DQ))
    assert len(seen) == 14 and all(dtype == torch.bfloat16 and others == 0 for dtype, others in seen)


def test_skip_modules_and_quantizing_lm_head(bf16_folder, tmp_path):
    model = load(bf16_folder, HalfbyteConfig(load_in_4bit=True, llm_int8_skip_modules=[]))
    assert isinstance(model.lm_head, Linear4bit)  # the documented option: an explicit (empty) list
    model = load(
        bf16_folder, HalfbyteConfig(load_in_4bit=True, llm_int8_skip_modules=["mlp.down_proj", "model.layers.1"])
    )
    assert isinstance(model.lm_head, Linear4bit)  # an explicit list replaces the defaults, as with bitsandbytes
    assert linear_names(model, torch.nn.Linear) == sorted(
        ["model.layers.0.mlp.down_proj"] + [f"model.layers.1.{n}" for n in
         ("mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj", "self_attn.o_proj",
          "self_attn.q_proj", "self_attn.v_proj")]
    )  # fmt: skip
    # a lm_head tied to the embeddings stays tied and in 16 bits, even when asked to quantize everything
    tied = save_tiny_llama(tmp_path / "tied", tie_word_embeddings=True)
    model = load(tied, HalfbyteConfig(load_in_4bit=True, llm_int8_skip_modules=[]))
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight is model.model.embed_tokens.weight


def test_memory_footprint_counts_packed_weights_and_quant_state(bf16_folder):
    model = load(bf16_folder, HalfbyteConfig(**NF4_DQ))
    expected = 0
    for name, param in model.named_parameters():
        if isinstance(model.get_submodule(name.rpartition(".")[0]), Linear4bit):
            numel = param.quant_state.shape.numel()
            blocks = numel // 64
            expected += numel // 2 + blocks + 4 * (-(-blocks // 256)) + 4  # codes, uint8 absmax, nested, offset
        else:
            expected += param.numel() * param.element_size()
    expected += sum(b.numel() * b.element_size() for b in model.buffers())
    expected += 16 * 4 + 256 * 4  # the NF4 table and the 8-bit dynamic map, shared by every layer
    assert model.get_memory_footprint() == expected
    assert type(model).get_memory_footprint(model) < expected  # transformers' own count misses the quant state


# ---- saving and loading pre-quantized checkpoints --------------------------------------------------------


def test_save_pretrained_writes_bitsandbytes_keys_and_config(quantized_folder):
    saved = json.loads((quantized_folder / "config.json").read_text())["quantization_config"]
    assert saved == BitsAndBytesConfig(**NF4_DQ).to_dict()
    keys = set(safetensors_torch.load_file(quantized_folder / "model.safetensors"))
    layer = "model.layers.0.mlp.down_proj.weight"
    assert {layer} | {f"{layer}.{s}" for s in QUANT_SUFFIXES} <= keys
    assert "lm_head.weight" in keys and "lm_head.weight.absmax" not in keys


def test_prequantized_checkpoint_loads_bit_identically_without_requantizing(quantized_folder, monkeypatch):
    calls = []
    monkeypatch.setattr(integration, "_quantize_into", lambda *args: calls.append(args))
    model = load(quantized_folder, HalfbyteConfig())
    assert calls == []  # nothing was quantized again
    checkpoint = safetensors_torch.load_file(quantized_folder / "model.safetensors")
    state = model.state_dict()
    assert set(state) == set(checkpoint)
    for key, tensor in checkpoint.items():
        assert_same_bits(state[key], tensor, key)
    assert model.model.layers[0].mlp.down_proj.compute_dtype == torch.bfloat16  # from the saved config
    again = load(quantized_folder, HalfbyteConfig(bnb_4bit_compute_dtype=torch.float16))
    assert again.model.layers[0].mlp.down_proj.compute_dtype == torch.float16  # a passed compute dtype wins


def test_round_trip_gives_the_same_model(bf16_folder, tmp_path):
    first = load(bf16_folder, HalfbyteConfig(**NF4_DQ))
    first.save_pretrained(tmp_path / "once")
    second = load(tmp_path / "once", HalfbyteConfig())
    second.save_pretrained(tmp_path / "twice")
    for key, tensor in first.state_dict().items():
        assert_same_bits(second.state_dict()[key], tensor, key)
    with torch.no_grad():
        assert_same_bits(second(tokens()).logits, first(tokens()).logits, "logits")
    a = safetensors_torch.load_file(tmp_path / "once" / "model.safetensors")
    b = safetensors_torch.load_file(tmp_path / "twice" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a)


def test_bitsandbytes_loads_a_halfbyte_checkpoint(quantized_folder):
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed: its loader not checked")
    model = AutoModelForCausalLM.from_pretrained(quantized_folder, device_map="cpu")  # config.json: bitsandbytes
    assert isinstance(model.model.layers[0].mlp.down_proj, bnb.nn.Linear4bit)
    checkpoint = safetensors_torch.load_file(quantized_folder / "model.safetensors")
    state = model.state_dict()
    for key, tensor in checkpoint.items():
        assert_same_bits(state[key], tensor, key)


@pytest.mark.parametrize("quant_type,nested", [("nf4", True), ("fp4", False)])
def test_bitsandbytes_checkpoint_loads_into_halfbyte_layers_bit_identically(bf16_folder, tmp_path, quant_type, nested):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed: no bitsandbytes checkpoint to load")
    bnb_config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=nested,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )  # fmt: skip
    load(bf16_folder, bnb_config, device_map="cpu").save_pretrained(tmp_path)
    model = load(tmp_path, HalfbyteConfig())  # the documented call
    assert isinstance(model.model.layers[1].self_attn.q_proj, Linear4bit)
    checkpoint = safetensors_torch.load_file(tmp_path / "model.safetensors")
    state = model.state_dict()
    assert set(state) == set(checkpoint)
    for key, tensor in checkpoint.items():
        assert_same_bits(state[key], tensor, key)
    # and it computes with those weights: a layer's output is F.linear with its dequantized weight
    layer = model.model.layers[1].self_attn.q_proj
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    reference = torch.nn.functional.linear(
        x.float(), F.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    )
    # bf16 compute: one bf16 rounding of the output and the float32 accumulation order (2^-8 relative)
    torch.testing.assert_close(layer(x).float(), reference, rtol=2**-7, atol=1e-3)


# ---- generation: static cache + torch.compile ------------------------------------------------------------


def test_static_cache_compiled_generation_equals_eager(quantized_folder):
    from transformers import CompileConfig

    torch._dynamo.reset()
    model = load(quantized_folder, HalfbyteConfig())
    eager = model.generate(tokens(), max_new_tokens=10, do_sample=False)
    model.generation_config.cache_implementation = "static"
    compile_config = CompileConfig(fullgraph=True, mode="default")
    compile_config._compile_all_devices = True  # transformers compiles on its own only on GPUs
    model.generation_config.compile_config = compile_config
    torch._dynamo.utils.counters.clear()
    compiled = model.generate(tokens(), max_new_tokens=10, do_sample=False)
    assert hasattr(model, "_compiled_call")  # transformers took its compiled path
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    assert torch.equal(compiled, eager)


# ---- dequantize ----------------------------------------------------------------------------------------


def test_dequantize_gives_plain_linear_layers_with_the_decoded_weights(quantized_folder):
    model = load(quantized_folder, HalfbyteConfig())
    layer = model.model.layers[0].mlp.up_proj
    expected = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    model.dequantize(dtype=torch.bfloat16)
    assert type(model.model.layers[0].mlp.up_proj) is torch.nn.Linear and not linear_names(model, Linear4bit)
    assert_same_bits(model.model.layers[0].mlp.up_proj.weight.data, expected.to(torch.bfloat16), "up_proj")
    assert not hasattr(model, "hf_quantizer")


# ---- GPT-2: Conv1D layers --------------------------------------------------------------------------------


def test_gpt2_conv1d_layers_quantize_and_round_trip(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=1, n_head=2, vocab_size=320, n_positions=64)).save_pretrained(
        tmp_path / "gpt2"
    )
    model = load(tmp_path / "gpt2", HalfbyteConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, Linear4bit) and list(layer.weight.quant_state.shape) == [192, 64]
    checkpoint = safetensors_torch.load_file(tmp_path / "gpt2" / "model.safetensors")
    packed, _ = F.quantize_4bit(checkpoint["transformer.h.0.attn.c_attn.weight"].t().contiguous(), quant_type="nf4")
    assert_same_bits(layer.weight.data, packed, "c_attn ([in, out] Conv1D weight quantized as [out, in])")
    model.save_pretrained(tmp_path / "gpt2-nf4")
    again = load(tmp_path / "gpt2-nf4", HalfbyteConfig())
    with torch.no_grad():
        assert_same_bits(again(tokens()).logits, model(tokens()).logits, "logits")


# ---- bad input -----------------------------------------------------------------------------------------


def rewrite_checkpoint(source, destination, change):
    """Copy a checkpoint folder, applying `change(tensors)` to its tensors."""
    destination.mkdir()
    for name in ("config.json", "generation_config.json"):
        (destination / name).write_bytes((source / name).read_bytes())
    tensors = safetensors_torch.load_file(source / "model.safetensors")
    change(tensors)
    safetensors_torch.save_file(tensors, destination / "model.safetensors", metadata={"format": "pt"})
    return destination


LAYER = "model.layers.1.mlp.gate_proj.weight"
JSON_KEY = f"{LAYER}.quant_state.bitsandbytes__nf4"


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda t: t.pop(f"{LAYER}.absmax"), "has 'model.layers.1.mlp.gate_proj.weight.quant_map' but no|missing"),
        (lambda t: t.pop(JSON_KEY), "but no 'model.layers.1.mlp.gate_proj.weight.quant_state"),
        (lambda t: t.pop(f"{LAYER}.nested_absmax"), r"missing \['model.layers.1.mlp.gate_proj.weight.nested_absmax'\]"),
        (lambda t: t.update({JSON_KEY: torch.tensor([123, 34, 255], dtype=torch.uint8)}),
         "does not hold the quant-state JSON"),
        (lambda t: t.update({f"{LAYER}.absmax": t[f"{LAYER}.absmax"][:-3].clone()}), "weight.absmax has"),
        (lambda t: t.update({LAYER: t[LAYER][:-8].clone()}), "a 4-bit .* tensor needs"),
        (lambda t: [t.pop(k) for k in list(t) if ".weight." in k], "holds no"),
    ],
    ids=["no-absmax", "no-json", "no-nested", "bad-json", "short-absmax", "short-weight", "no-quant-state"],
)  # fmt: skip
def test_missing_or_corrupted_quant_state_is_a_clear_error(quantized_folder, tmp_path, change, message):
    broken = rewrite_checkpoint(quantized_folder, tmp_path / "broken", change)
    with pytest.raises(CheckpointError, match=message):
        load(broken, HalfbyteConfig())


def test_checkpoint_of_another_model_size_is_a_clear_error(quantized_folder, tmp_path):
    folder = rewrite_checkpoint(quantized_folder, tmp_path / "resized", lambda t: None)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"intermediate_size": 256}))
    with pytest.raises(
        CheckpointError, match=r"down_proj': .* has shape \[128, 320\], the model's layer is \[128, 256\]"
    ):
        load(folder, HalfbyteConfig())


def test_bad_loading_requests_are_clear_errors(bf16_folder, tmp_path):
    with pytest.raises(ValueError, match="load_in_4bit and load_in_8bit are both False, so there is nothing to"):
        load(bf16_folder, HalfbyteConfig())
    with pytest.raises(ValueError, match="has no nn.Linear .* not supported"):
        load(bf16_folder, HalfbyteConfig(load_in_4bit=True, llm_int8_skip_modules=["model", "lm_head"]))
    with pytest.raises(ValueError, match="4-bit layers cannot be offloaded"):
        load(bf16_folder, HalfbyteConfig(load_in_4bit=True), device_map={"model": "cuda:0", "lm_head": "disk"})
    int8 = save_tiny_llama(tmp_path / "int8")
    config = json.loads((int8 / "config.json").read_text())
    config["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True).to_dict()
    (int8 / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"says the weights are bitsandbytes/halfbyte 8-bit .* holds no '\*.SCB'"):
        load(int8, HalfbyteConfig())  # a full-precision checkpoint whose config.json says 8-bit
