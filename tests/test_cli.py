"""python -m halfbyte memory / info."""

import json
import subprocess
import sys

import pytest
from halfbyte import memory
from halfbyte.__main__ import main


def run(*args):
    return subprocess.run([sys.executable, "-m", "halfbyte", *args], capture_output=True, text=True, timeout=120)


def test_default_is_the_memory_table_of_an_8b_model():
    result = run()
    assert result.returncode == 0, result.stderr
    assert "Llama-3-8B-shaped" in result.stdout and "8.03B parameters" in result.stdout
    for precision in memory.PRECISIONS:
        assert f"\n{precision} " in result.stdout
    assert "NF4+DQ (blocks of 64)" in result.stdout


def test_memory_json_counts_match_the_formats(capsys):
    assert main(["memory", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = {r["precision"]: r for r in report["memory"]}
    assert rows["FP16"]["bytes"] == 2 * report["params"]
    assert rows["FP32"]["bytes"] == 4 * report["params"]
    # 4-bit with blocksize 64: 4 bits + 32/64 bits of absmax on the Linear weights; the rest in 16 bits.
    model = memory.from_config(memory.llama3_8b_config())
    linear = sum(n * k for n, k in model.linear)
    assert rows["NF4"]["bytes"] == linear // 2 + 4 * (linear // 64) + 2 * model.other
    assert rows["NF4+DQ"]["bytes"] < rows["NF4"]["bytes"] < rows["INT8"]["bytes"] < rows["FP16"]["bytes"]
    errors = {e["format"]: e for e in report["errors"]}
    assert errors["NF4 (blocks of 64)"]["mean_abs_err"] < 0.0733  # COMPAT.md bound
    assert errors["FP4 (blocks of 64)"]["mean_abs_err"] < 0.0973
    assert errors["8-bit dynamic (blocks of 64)"]["mean_abs_err"] < 0.011


def test_memory_of_a_size_in_billions_and_of_a_config_file(tmp_path, capsys):
    assert main(["memory", "--params", "70", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert abs(report["params"] - 70e9) < 5000
    config = memory.llama3_8b_config() | {"num_hidden_layers": 2, "vocab_size": 1000, "_name_or_path": "tiny"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert main(["memory", "--config", str(tmp_path), "--quantize-lm-head", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"].startswith("tiny")
    per_layer = 2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 14336 * 4096
    assert report["params"] == 2 * per_layer + 2 * 1000 * 4096 + 5 * 4096


@pytest.mark.parametrize(
    "args,message",
    [
        (["memory", "--params", "-1"], "positive"),
        (["memory", "--config", "/nonexistent"], "no config.json"),
        (["memory", "--blocksize", "48"], "power of two"),
    ],
)
def test_bad_arguments_exit_with_a_message(args, message):
    result = run(*args)
    assert result.returncode == 2 and message in result.stderr


def test_info_prints_build_information():
    result = run("info")
    assert result.returncode == 0
    info = json.loads(result.stdout)
    assert info["version"] == "0.1.0" and "cpu:quantize_4bit" in info["kernels"]
