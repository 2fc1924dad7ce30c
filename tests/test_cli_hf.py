"""halfbyte quantize / verify / eval / demo on a tiny Llama with a byte-level tokenizer (CPU, no download)."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import assert_same_bits
from halfbyte.cli import main

transformers = pytest.importorskip("transformers", reason="transformers not installed: HF commands not tested")
safetensors_torch = pytest.importorskip("safetensors.torch")
from halfbyte import HalfbyteConfig, demo  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, ByT5Tokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402

TEXT = "The quick brown fox jumps over the lazy dog. " * 8


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny bf16 Llama checkpoint folder with a tokenizer (ByT5's byte-level one needs no files)."""
    folder = tmp_path_factory.mktemp("src")
    tokenizer = ByT5Tokenizer()
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tokenizer), max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, source):
    destination = tmp_path_factory.mktemp("out") / "nf4"
    assert main(["quantize", str(source), str(destination), "--device", "cpu"]) == 0
    return destination


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if "partial" in p.name)


@pytest.mark.parametrize("command", ["memory", "info", "quantize", "verify", "eval", "demo"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: halfbyte {command}")


def test_console_module_lists_the_subcommands():
    result = subprocess.run([sys.executable, "-m", "halfbyte", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    for command in ("memory", "info", "quantize", "verify", "eval", "demo"):
        assert command in result.stdout


# ---- quantize -------------------------------------------------------------------------------------------


def test_quantize_writes_a_bitsandbytes_checkpoint_with_the_tokenizer(source, quantized, capsys):
    saved = json.loads((quantized / "config.json").read_text())["quantization_config"]
    assert saved == BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    ).to_dict()  # fmt: skip
    assert (quantized / "tokenizer_config.json").is_file()
    assert leftovers(quantized.parent) == []
    # the same bytes as loading SRC with the equivalent HalfbyteConfig
    reference = AutoModelForCausalLM.from_pretrained(source, quantization_config=HalfbyteConfig(**saved))
    written = safetensors_torch.load_file(quantized / "model.safetensors")
    assert set(written) == set(reference.state_dict())
    for key, tensor in reference.state_dict().items():
        assert_same_bits(written[key], tensor, key)


def test_quantize_options_and_report(source, tmp_path, capsys):
    destination = tmp_path / "fp4"
    args = ["quantize", str(source), str(destination), "--quant-type", "fp4", "--no-double-quant", "--quantize-lm-head"]
    assert main(args + ["--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "4-bit FP4 (bitsandbytes format)" in out and "15 quantized, kept in 16 bits: none" in out
    assert "quantization_config=halfbyte.HalfbyteConfig()" in out
    keys = set(safetensors_torch.load_file(destination / "model.safetensors"))
    assert "lm_head.weight.quant_state.bitsandbytes__fp4" in keys and not any("nested" in k for k in keys)


def write_config(folder, config):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    "make_source,message",
    [
        (lambda tmp: tmp / "missing", "no such folder"),
        (lambda tmp: write_config(tmp / "unknown", {"model_type": "nothing"}), "unsupported model type 'nothing'"),
        (lambda tmp: write_config(tmp / "vision", {"model_type": "vit"}), "unsupported model type 'vit': .* causal"),
        (lambda tmp: write_config(tmp / "empty", {}), "no model_type"),
        (lambda tmp: (tmp / "noconfig").mkdir() or tmp / "noconfig", "no config.json"),
    ],
    ids=["missing", "unknown-type", "not-causal", "no-model-type", "no-config"],
)  # fmt: skip
def test_quantize_bad_source_is_a_clear_error_and_writes_nothing(tmp_path, capsys, make_source, message):
    import re

    destination = tmp_path / "out"
    assert main(["quantize", str(make_source(tmp_path)), str(destination), "--device", "cpu"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("halfbyte quantize: ") and re.search(message, error), error
    assert not destination.exists() and leftovers(tmp_path) == []


def test_quantize_refuses_existing_destination_and_quantized_source(source, quantized, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    assert main(["quantize", str(source), str(tmp_path / "taken"), "--device", "cpu"]) == 2
    assert "already exists (pass --overwrite" in capsys.readouterr().err
    assert main(["quantize", str(quantized), str(tmp_path / "again"), "--device", "cpu"]) == 2
    assert "already quantized (4-bit NF4 + double quantization" in capsys.readouterr().err
    assert not (tmp_path / "again").exists()


def test_quantize_failure_half_way_leaves_no_partial_output(source, tmp_path, monkeypatch):
    def fail_while_saving(self, folder, **kwargs):
        (folder / "model.safetensors").write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", fail_while_saving)
    with pytest.raises(OSError, match="disk full"):
        main(["quantize", str(source), str(tmp_path / "out"), "--device", "cpu"])
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_quantize_of_a_truncated_checkpoint_fails_cleanly(source, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in source.iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    assert main(["quantize", str(broken), str(tmp_path / "out"), "--device", "cpu"]) == 2
    assert "loading failed" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_quantize_to_int8_writes_a_bitsandbytes_8bit_checkpoint_that_verify_accepts(source, tmp_path, capsys):
    destination = tmp_path / "int8"
    args = ["quantize", str(source), str(destination), "--quant-type", "int8", "--int8-threshold", "0"]
    assert main(args + ["--device", "cpu"]) == 0
    assert "format     : 8-bit LLM.int8, threshold 0 (bitsandbytes format)" in capsys.readouterr().out
    saved = json.loads((destination / "config.json").read_text())["quantization_config"]
    assert saved == BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.0).to_dict()
    reference = AutoModelForCausalLM.from_pretrained(source, quantization_config=HalfbyteConfig(**saved))
    written = safetensors_torch.load_file(destination / "model.safetensors")
    assert set(written) == set(reference.state_dict())
    for key, tensor in reference.state_dict().items():
        assert_same_bits(written[key], tensor, key)
    assert main(["verify", str(destination), "--device", "cpu", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    for expected in ("checkpoint : 8-bit LLM.int8, threshold 0", "layers     : 14 in 8 bits, kept in 16 bits: lm_head",
                     "ok   quant state of 14 weights consistent", "ok   every 8-bit layer holds quantized weights",
                     "verify: OK"):  # fmt: skip
        assert expected in out, expected
    # a corrupted row absmax is a clear error naming the key
    tensors = safetensors_torch.load_file(destination / "model.safetensors")
    del tensors["model.layers.0.mlp.up_proj.SCB"]
    safetensors_torch.save_file(tensors, destination / "model.safetensors", metadata={"format": "pt"})
    assert main(["verify", str(destination), "--device", "cpu"]) == 2
    assert "no row absmax 'model.layers.0.mlp.up_proj.SCB'" in capsys.readouterr().err


# ---- verify ---------------------------------------------------------------------------------------------


def test_verify_reports_device_memory_generation_and_checks(quantized, capsys):
    assert main(["verify", str(quantized), "--device", "cpu", "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    for expected in ("checkpoint : 4-bit NF4 + double quantization", "device     : cpu", "memory     :",
                     "layers     : 14 in 4 bits, kept in 16 bits: lm_head", "(5 tokens greedy",
                     "ok   quant state of 14 weights consistent", "ok   logits finite", "verify: OK"):  # fmt: skip
        assert expected in out, expected
    assert "looks untrained" in out  # random weights: a person is warned


def test_verify_of_a_corrupted_checkpoint_names_the_layer(quantized, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in quantized.iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    tensors = safetensors_torch.load_file(broken / "model.safetensors")
    del tensors["model.layers.0.self_attn.k_proj.weight.absmax"]
    safetensors_torch.save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    assert main(["verify", str(broken), "--device", "cpu"]) == 2
    assert "'model.layers.0.self_attn.k_proj'" in capsys.readouterr().err
    assert main(["verify", str(tmp_path / "nowhere"), "--device", "cpu"]) == 2
    assert "no such folder" in capsys.readouterr().err


# ---- eval -----------------------------------------------------------------------------------------------


def test_eval_table_json_and_plot(source, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    png = tmp_path / "ppl.png"
    args = ["eval", str(source), "--text", str(text), "--max-tokens", "200", "--window", "64", "--plot", str(png)]
    assert main(args + ["--device", "cpu", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = {row["format"]: row for row in report["rows"]}
    assert list(rows) == ["bf16", "int8", "NF4", "NF4+DQ", "FP4"] and report["tokens"] == 200
    assert all(row["perplexity"] > 1 for row in rows.values())
    footprints = [rows[name]["footprint_bytes"] for name in ("NF4+DQ", "NF4", "int8", "bf16")]
    assert footprints == sorted(footprints) and len(set(footprints)) == 4
    pytest.importorskip("matplotlib", reason="matplotlib not installed: no plot")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_beside_bitsandbytes(source, tmp_path, capsys):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed: no side-by-side column")
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    args = ["eval", str(source), "--text", str(text), "--max-tokens", "100", "--plot", str(tmp_path / "p.png")]
    assert main(args + ["--device", "cpu", "--bitsandbytes"]) == 0
    out = capsys.readouterr().out
    assert "bitsandbytes" in out and "halfbyte vs bnb" in out
    for name in ("int8 ", "NF4 "):
        line = next(line for line in out.splitlines() if line.startswith(name))
        assert line.count("%") == 2, line  # its change against bf16 and its gap to bitsandbytes


def test_eval_bad_input(source, quantized, tmp_path, capsys):
    assert main(["eval", str(quantized), "--text", str(tmp_path / "x.txt"), "--device", "cpu"]) == 2
    assert "already quantized (4-bit NF4 + double quantization" in capsys.readouterr().err
    assert main(["eval", str(source), "--text", str(tmp_path / "x.txt"), "--device", "cpu"]) == 2
    assert "no such file" in capsys.readouterr().err


# ---- demo -----------------------------------------------------------------------------------------------


def check_demo_output(out, workdir):
    for step in range(1, 6):
        assert f"== {step}/5" in out
    assert "verify: OK" in out
    table = out[out.index("format    perplexity") :]
    assert [line.split()[0] for line in table.splitlines()[1:6]] == ["bf16", "int8", "NF4", "NF4+DQ", "FP4"]
    assert (workdir / "perplexity.png").is_file() or "matplotlib is not installed" in out


def test_demo_runs_the_whole_workflow_on_the_default_model(tmp_path, capsys):
    assert main(["demo", "--workdir", str(tmp_path), "--max-tokens", "256", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    check_demo_output(out, tmp_path)
    if demo.gguf_model_path() is not None:
        assert "SmolLM2-135M-Instruct" in out and "RANDOMLY INITIALISED" not in out
        assert "verify: OK" in out and "looks untrained" not in out  # a real model predicts English
    else:
        assert "RANDOMLY INITIALISED" in out


def test_demo_without_the_model_package_says_it_uses_random_weights(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(demo, "gguf_model_path", lambda: None)
    assert main(["demo", "--workdir", str(tmp_path), "--max-tokens", "128", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    check_demo_output(out, tmp_path)
    assert "RANDOMLY INITIALISED" in out and "numbers above only show that the workflow runs" in out
