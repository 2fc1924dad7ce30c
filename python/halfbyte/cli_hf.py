"""The Hugging Face workflows behind ``halfbyte quantize / verify / eval``: checkpoint folders in, reports out.

Each function raises ``CliError`` (a ValueError) with a message meant for a person when its input is wrong:
a folder that does not exist, a config.json that is missing or names an unknown or unsupported model type, a
checkpoint whose 4-bit quant state or 8-bit row absmax (``SCB``) is missing or corrupted.
``quantize_checkpoint`` writes into a temporary folder beside the destination and renames it at the end, so a
failure leaves no partial output.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import halfbyte

from .config import HalfbyteConfig

# A short English text a trained model predicts well; a model that cannot is broken or untrained.
SANITY_TEXT = (
    "The sun rose over the quiet village. Children walked to school, and their parents went to work in the "
    "fields. In the evening, everyone came home for dinner and talked about the day."
)
DEFAULT_PROMPT = "The capital of France is"
EVAL_TEXT = Path(__file__).parent / "data" / "eval_text.txt"  # English prose shipped with halfbyte (see its NOTICE)
MIB = 1024**2


class CliError(ValueError):
    """Bad input to a command, with a message that says what is wrong and what to do."""


# ---- input checks ----------------------------------------------------------------------------------------


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a GPU and halfbyte's CUDA kernels are there, else 'cpu'; others are checked."""
    has_cuda = torch.cuda.is_available() and halfbyte.build_info()["cuda"]
    if device == "auto":
        return "cuda" if has_cuda else "cpu"
    if device.startswith("cuda") and not has_cuda:
        raise CliError(f"--device {device}: no CUDA GPU usable by halfbyte (torch.cuda.is_available() is False or "
                       "halfbyte was built without CUDA kernels)")  # fmt: skip
    if device != "cpu" and not device.startswith("cuda"):
        raise CliError(f"--device must be auto, cpu or cuda[:N], got {device!r}")
    return device


def read_model_config(path: str | os.PathLike) -> dict[str, Any]:
    """config.json of a model folder, checked: the folder exists, the model type is one transformers knows and
    a causal language model (what quantize/verify/eval handle)."""
    folder = Path(path)
    if not folder.exists():
        raise CliError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise CliError(f"{folder}: not a folder (expected a Hugging Face model folder with config.json)")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CliError(f"{folder}: no config.json (not a Hugging Face model folder)")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CliError(f"{config_file}: not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise CliError(f"{config_file}: expected a JSON object")
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = config.get("model_type")
    if model_type is None:
        raise CliError(f"{config_file}: no model_type (not a transformers model config)")
    if model_type not in CONFIG_MAPPING:
        import transformers

        raise CliError(
            f"{folder}: unsupported model type {model_type!r} (unknown to transformers {transformers.__version__})"
        )
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise CliError(
            f"{folder}: unsupported model type {model_type!r}: halfbyte's commands handle causal language models "
            "(AutoModelForCausalLM); quantize other models from Python with from_pretrained(..., "
            "quantization_config=HalfbyteConfig(load_in_4bit=True))"
        )
    return config


def saved_quantization(config: dict[str, Any]) -> dict[str, Any] | None:
    """The quantization_config of a config.json when it is a bitsandbytes/halfbyte (4-bit or 8-bit) one; None
    when the checkpoint is not quantized; CliError for any other quantization."""
    saved = config.get("quantization_config")
    if not saved:
        return None
    method = saved.get("quant_method")
    if method not in ("bitsandbytes", "halfbyte"):
        raise CliError(
            f"the checkpoint is quantized with {method!r}; halfbyte reads bitsandbytes 4-bit and 8-bit checkpoints only"
        )
    return saved


def is_8bit(saved: dict[str, Any]) -> bool:
    """Whether a bitsandbytes/halfbyte quantization_config is LLM.int8 (load_in_8bit)."""
    return bool(saved.get("load_in_8bit", saved.get("_load_in_8bit", False)))


def describe_format(saved: dict[str, Any]) -> str:
    if is_8bit(saved):
        return f"8-bit LLM.int8, threshold {float(saved.get('llm_int8_threshold', 6.0)):g} (bitsandbytes format)"
    quant_type = str(saved.get("bnb_4bit_quant_type", "fp4")).upper()
    nested = " + double quantization" if saved.get("bnb_4bit_use_double_quant") else ""
    return f"4-bit {quant_type}{nested} (bitsandbytes format)"


def checkpoint_files(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.glob("*.safetensors")) + sorted(str(p) for p in folder.glob("*.bin"))


def check_quant_state(folder: Path, load_in_8bit: bool = False) -> int:
    """Check the quant state of every 4-bit weight (the int8 codes and row absmax of every 8-bit weight with
    `load_in_8bit`) of a pre-quantized folder; returns how many there are."""
    from .integrations.transformers import CheckpointError, inspect_int8_checkpoint, inspect_quantized_checkpoint

    files = checkpoint_files(folder)
    if not files:
        raise CliError(f"{folder}: no weights (*.safetensors or *.bin)")
    try:
        infos = inspect_int8_checkpoint(files) if load_in_8bit else inspect_quantized_checkpoint(files)
    except CheckpointError as error:
        raise CliError(f"{folder}: {error}") from None
    if not infos and any(f.endswith(".safetensors") for f in files):
        bits = "8-bit" if load_in_8bit else "4-bit"
        what = "an 8-bit row absmax (SCB)" if load_in_8bit else "a 4-bit quant state"
        raise CliError(f"{folder}: config.json says {bits}, but no weight has {what}")
    return len(infos)


# ---- loading --------------------------------------------------------------------------------------------


def _loading_errors(folder: Path):
    """Context for from_pretrained: its errors about a bad checkpoint become CliErrors."""
    from contextlib import contextmanager

    from safetensors import SafetensorError

    from .integrations.transformers import CheckpointError

    @contextmanager
    def guard():
        try:
            yield
        except CheckpointError as error:
            raise CliError(f"{folder}: {error}") from None
        except (OSError, RuntimeError, SafetensorError) as error:
            raise CliError(f"{folder}: loading failed: {error}") from error

    return guard()


def load_model(
    folder: str | os.PathLike,
    device: str,
    quantization_config: HalfbyteConfig | None = None,
    dtype: torch.dtype = torch.bfloat16,
):
    """AutoModelForCausalLM from `folder` on `device`: a pre-quantized (bitsandbytes-format) folder loads into
    halfbyte layers as it is; otherwise `quantization_config` (None: full precision in `dtype`)."""
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    config = read_model_config(folder)
    saved = saved_quantization(config)
    if saved is not None:
        check_quant_state(folder, is_8bit(saved))
        quantization_config = quantization_config or HalfbyteConfig(bnb_4bit_compute_dtype=dtype)
    with _loading_errors(folder):
        return AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=quantization_config, dtype=dtype, device_map={"": device}
        )


def load_tokenizer(folder: str | os.PathLike):
    """The folder's tokenizer, or None when it has none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError, KeyError):
        return None


def quantized_layers(model) -> tuple[list[str], list[str]]:
    """(names of Linear4bit / Linear8bitLt layers, names of Linear layers kept in full precision)."""
    from torch import nn

    from .nn import Linear4bit, Linear8bitLt

    quantized = [name for name, m in model.named_modules() if isinstance(m, Linear4bit | Linear8bitLt)]
    kept = [name for name, m in model.named_modules() if type(m) is nn.Linear]
    return quantized, kept


# ---- quantize -------------------------------------------------------------------------------------------


@dataclass
class QuantizeReport:
    source: Path
    destination: Path
    format: str
    quantized: list[str]
    kept: list[str]
    source_bytes: int
    destination_bytes: int
    seconds: float


def folder_weight_bytes(folder: Path) -> int:
    return sum(os.path.getsize(f) for f in checkpoint_files(folder))


def quantize_checkpoint(
    source: str | os.PathLike,
    destination: str | os.PathLike,
    config: HalfbyteConfig,
    device: str = "cpu",
    overwrite: bool = False,
) -> QuantizeReport:
    """Quantize the full-precision checkpoint folder `source` into a pre-quantized folder `destination`
    (bitsandbytes' tensors and keys; the tokenizer is copied). Nothing is left at `destination` on failure."""
    source, destination = Path(source), Path(destination)
    model_config = read_model_config(source)
    if saved_quantization(model_config) is not None:
        raise CliError(f"{source}: already quantized ({describe_format(model_config['quantization_config'])})")
    if not (config.load_in_4bit or config.load_in_8bit):
        raise CliError("quantize: the config must have load_in_4bit=True or load_in_8bit=True")
    if destination.resolve() == source.resolve():
        raise CliError("quantize: DST must differ from SRC")
    if destination.exists() and not overwrite:
        raise CliError(f"{destination}: already exists (pass --overwrite to replace it)")
    if not destination.parent.is_dir():
        raise CliError(f"{destination.parent}: no such folder (the parent of DST must exist)")
    started = time.perf_counter()
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.partial-", dir=destination.parent))
    try:
        dtype = torch.bfloat16
        if config.load_in_4bit and config.bnb_4bit_compute_dtype != torch.float32:
            dtype = config.bnb_4bit_compute_dtype
        model = load_model(source, device, config, dtype=dtype)
        quantized, kept = quantized_layers(model)
        model.save_pretrained(staging)
        tokenizer = load_tokenizer(source)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        del model
        if destination.exists():
            shutil.rmtree(destination)
        staging.rename(destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return QuantizeReport(
        source, destination, describe_format(config.to_dict()), quantized, kept, folder_weight_bytes(source),
        folder_weight_bytes(destination), time.perf_counter() - started,
    )  # fmt: skip


# ---- verify ---------------------------------------------------------------------------------------------


@dataclass
class VerifyReport:
    folder: Path
    format: str
    device: str
    device_name: str
    load_seconds: float
    footprint_bytes: int
    gpu_allocated_bytes: int | None
    quantized: list[str]
    kept: list[str]
    prompt: str
    completion: str
    new_tokens: int
    tokens_per_second: float
    sanity_perplexity: float | None
    vocab_size: int
    checks: dict[str, bool] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    bits: int = 4  # 4 (Linear4bit layers) or 8 (Linear8bitLt)

    @property
    def ok(self) -> bool:
        return all(self.checks.values())


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    import platform

    return platform.processor() or platform.machine() or "CPU"


@torch.no_grad()
def perplexity(model, token_ids: torch.Tensor, window: int = 1024) -> float:
    """exp(mean next-token loss) of `model` over `token_ids` (1-D), in non-overlapping windows of `window`."""
    if token_ids.numel() < 2:
        raise CliError("perplexity needs at least 2 tokens of text")
    device = next(p.device for p in model.parameters())
    total_loss, total_count = 0.0, 0
    for start in range(0, token_ids.numel() - 1, window):
        chunk = token_ids[start : start + window + 1].to(device)
        if chunk.numel() < 2:
            break
        logits = model(chunk[None, :-1]).logits[0].float()
        loss = torch.nn.functional.cross_entropy(logits, chunk[1:], reduction="sum")
        total_loss += loss.item()
        total_count += chunk.numel() - 1
    return math.exp(total_loss / total_count)


def _encode(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)


def verify_checkpoint(
    folder: str | os.PathLike, device: str = "cpu", prompt: str = DEFAULT_PROMPT, max_new_tokens: int = 20
) -> VerifyReport:
    """Load `folder` into halfbyte layers and check it as a person would: where it is, how much memory it
    takes, a short greedy generation, and that its numbers are sane (quant state consistent, every layer
    quantized, logits finite, a reference sentence predicted better than chance)."""
    folder = Path(folder)
    config = read_model_config(folder)
    saved = saved_quantization(config)
    checks: dict[str, bool] = {}
    warnings: list[str] = []
    bits = 8 if saved is not None and is_8bit(saved) else 4
    if saved is not None:
        count = check_quant_state(folder, bits == 8)
        checks[f"quant state of {count} weights consistent"] = True
        form = describe_format(saved)
        load_config = None
    else:
        form = "full precision, quantized while loading to 4-bit NF4 + double quantization"
        load_config = HalfbyteConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )  # fmt: skip
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    model = load_model(folder, device, load_config)
    load_seconds = time.perf_counter() - started
    gpu_bytes = torch.cuda.memory_allocated(torch.device(device)) if device.startswith("cuda") else None
    quantized, kept = quantized_layers(model)
    checks[f"model has {bits}-bit layers"] = bool(quantized)
    checks[f"every {bits}-bit layer holds quantized weights"] = all(
        _holds_quantized_weight(model.get_submodule(name)) for name in quantized
    )
    tokenizer = load_tokenizer(folder)
    vocab_size = model.config.get_text_config().vocab_size
    if tokenizer is None:
        warnings.append("no tokenizer in the folder: generation shown as token ids, no perplexity check")
        input_ids = torch.tensor([[model.config.bos_token_id or 1]])
    else:
        input_ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    input_ids = input_ids.to(device)
    pad_token_id = model.generation_config.eos_token_id if tokenizer is None else tokenizer.eos_token_id

    def generate(new_tokens: int) -> torch.Tensor:
        with torch.no_grad():
            return model.generate(
                input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens, do_sample=False,
                pad_token_id=pad_token_id,
            )  # fmt: skip

    generate(1)  # warm-up: first-call setup is not generation speed
    started = time.perf_counter()
    output = generate(max_new_tokens)
    seconds = time.perf_counter() - started
    new_ids = output[0, input_ids.shape[1] :]
    completion = tokenizer.decode(new_ids, skip_special_tokens=True) if tokenizer else str(new_ids.tolist())
    checks["generation produced tokens"] = new_ids.numel() > 0
    sample = _encode(tokenizer, SANITY_TEXT) if tokenizer else input_ids[0].cpu()
    with torch.no_grad():
        logits = model(sample[None].to(device)).logits
    checks["logits finite"] = bool(torch.isfinite(logits).all())
    sanity = None
    if tokenizer is not None and checks["logits finite"]:
        sanity = perplexity(model, sample)
        if sanity > math.sqrt(vocab_size):
            warnings.append(
                f"perplexity {sanity:.1f} on a plain English sentence (a uniform guess scores {vocab_size}): the model "
                "looks untrained, or its weights are damaged"
            )
    report = VerifyReport(
        folder, form, device, device_name(device), load_seconds, model.get_memory_footprint(), gpu_bytes, quantized,
        kept, prompt if tokenizer else str(input_ids[0].tolist()), completion, new_ids.numel(),
        new_ids.numel() / seconds if seconds > 0 else float("inf"), sanity, vocab_size, checks, warnings, bits,
    )  # fmt: skip
    return report


def _holds_quantized_weight(layer) -> bool:
    """A Linear4bit with packed bytes, or a Linear8bitLt with int8 codes and their row absmax."""
    weight = layer.weight
    if weight.dtype == torch.int8:
        return getattr(weight, "SCB", None) is not None
    return bool(getattr(weight, "bnb_quantized", False))


# ---- eval -----------------------------------------------------------------------------------------------

# name -> HalfbyteConfig / BitsAndBytesConfig keyword arguments (None: full precision). int8 is LLM.int8 as
# BitsAndBytesConfig(load_in_8bit=True) gives it: row-wise int8 weights, outlier threshold 6.0.
FORMATS = {
    "bf16": None,
    "int8": {"load_in_8bit": True, "llm_int8_threshold": 6.0},
    "NF4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": False},
    "NF4+DQ": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True},
    "FP4": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": False},
}


@dataclass
class EvalRow:
    format: str
    perplexity: float
    footprint_bytes: int
    bitsandbytes_perplexity: float | None = None


@dataclass
class EvalReport:
    folder: Path
    text: Path
    tokens: int
    window: int
    device: str
    rows: list[EvalRow]

    def relative(self, value: float) -> float:
        """Change of a perplexity against bf16, in percent."""
        return 100.0 * (value / self.rows[0].perplexity - 1.0)


def bitsandbytes_available() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except Exception:
        return False
    return True


def evaluate(
    folder: str | os.PathLike,
    text_file: str | os.PathLike,
    device: str = "cpu",
    max_tokens: int = 8192,
    window: int = 1024,
    with_bitsandbytes: bool = False,
    progress=None,
) -> EvalReport:
    """Perplexity of the full-precision checkpoint `folder` on `text_file` in bf16, int8 (LLM.int8), NF4, NF4 +
    double quantization and FP4 (halfbyte; and bitsandbytes beside it when `with_bitsandbytes`)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    folder, text_file = Path(folder), Path(text_file)
    config = read_model_config(folder)
    if saved_quantization(config) is not None:
        raise CliError(
            f"{folder}: already quantized ({describe_format(config['quantization_config'])}); eval compares the "
            "formats against the full-precision model, so DIR must be a full-precision checkpoint (the SRC of "
            "`halfbyte quantize`)"
        )
    if not text_file.is_file():
        raise CliError(f"--text {text_file}: no such file")
    if max_tokens < 2 or window < 1:
        raise CliError(f"--max-tokens must be at least 2 and --window at least 1, got {max_tokens} and {window}")
    if with_bitsandbytes and not bitsandbytes_available():
        raise CliError("--bitsandbytes: bitsandbytes is not installed (pip install bitsandbytes)")
    tokenizer = load_tokenizer(folder)
    if tokenizer is None:
        raise CliError(f"{folder}: no tokenizer (eval needs one to read the text)")
    try:
        text = text_file.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise CliError(f"--text {text_file}: not UTF-8 text ({error})") from None
    token_ids = _encode(tokenizer, text)[:max_tokens]
    if token_ids.numel() < 2:
        raise CliError(f"--text {text_file}: fewer than 2 tokens of text")
    rows = []
    for name, fields in FORMATS.items():
        if progress:
            progress(name)
        quantization = None if fields is None else HalfbyteConfig(bnb_4bit_compute_dtype=torch.bfloat16, **fields)
        model = load_model(folder, device, quantization)
        row = EvalRow(name, perplexity(model, token_ids, window), model.get_memory_footprint())
        del model
        if fields is not None and with_bitsandbytes:
            if progress:
                progress(f"{name} (bitsandbytes)")
            bnb_config = BitsAndBytesConfig(bnb_4bit_compute_dtype=torch.bfloat16, **fields)
            model = AutoModelForCausalLM.from_pretrained(
                folder, quantization_config=bnb_config, dtype=torch.bfloat16, device_map={"": device}
            )
            row.bitsandbytes_perplexity = perplexity(model, token_ids, window)
            del model
        rows.append(row)
    return EvalReport(folder, text_file, token_ids.numel(), window, device, rows)


def format_eval_table(report: EvalReport) -> str:
    with_bnb = any(row.bitsandbytes_perplexity is not None for row in report.rows)
    header = f"{'format':<8} {'perplexity':>11} {'vs bf16':>9} {'memory MiB':>11}"
    if with_bnb:
        header += f" {'bitsandbytes':>13} {'halfbyte vs bnb':>16}"
    lines = [
        f"Perplexity of {report.folder} on {report.text.name} ({report.tokens} tokens, windows of {report.window}, "
        f"{report.device})",
        header,
    ]
    for row in report.rows:
        change = "-" if row.format == "bf16" else f"{report.relative(row.perplexity):+.2f}%"
        line = f"{row.format:<8} {row.perplexity:>11.4f} {change:>9} {row.footprint_bytes / MIB:>11.1f}"
        if with_bnb:
            if row.bitsandbytes_perplexity is None:
                line += f" {'-':>13} {'-':>16}"
            else:
                gap = 100.0 * (row.perplexity / row.bitsandbytes_perplexity - 1.0)
                line += f" {row.bitsandbytes_perplexity:>13.4f} {gap:>+15.3f}%"
        lines.append(line)
    lines.append("memory: model.get_memory_footprint() (weights, quant state and buffers)")
    if any(row.format == "int8" for row in report.rows):
        lines.append("int8: LLM.int8 (row-wise int8 weights, outlier threshold 6.0), as load_in_8bit=True")
    return "\n".join(lines)


def plot_eval(report: EvalReport, png: str | os.PathLike) -> Path | None:
    """Bar chart of the perplexities (and memory) as a PNG; None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = [row.format for row in report.rows]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    positions = range(len(names))
    left.bar([p - 0.2 for p in positions], [row.perplexity for row in report.rows], width=0.4, label="halfbyte")
    bnb = [row.bitsandbytes_perplexity for row in report.rows]
    if any(value is not None for value in bnb):
        left.bar(
            [p + 0.2 for p in positions], [v if v is not None else 0 for v in bnb], width=0.4, label="bitsandbytes"
        )
    left.set_xticks(list(positions), names)
    left.set_ylabel("perplexity (lower is better)")
    left.set_title(f"{report.text.name}, {report.tokens} tokens")
    low = min(row.perplexity for row in report.rows)
    left.set_ylim(low * 0.9, max(row.perplexity for row in report.rows) * 1.05)
    left.legend()
    right.bar(names, [row.footprint_bytes / MIB for row in report.rows], color="tab:gray")
    right.set_ylabel("model memory (MiB)")
    right.set_title("get_memory_footprint()")
    figure.suptitle(f"halfbyte: {report.folder.name}")
    figure.tight_layout()
    png = Path(png)
    figure.savefig(png, dpi=100)
    plt.close(figure)
    return png


# ---- text reports ---------------------------------------------------------------------------------------


def _list(names: list[str], limit: int = 4) -> str:
    if not names:
        return "none"
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def format_quantize_report(report: QuantizeReport) -> str:
    ratio = report.source_bytes / report.destination_bytes if report.destination_bytes else float("nan")
    return "\n".join(
        [
            f"quantized {report.source} -> {report.destination} in {report.seconds:.1f} s",
            f"  format     : {report.format}",
            f"  layers     : {len(report.quantized)} quantized, kept in 16 bits: {_list(report.kept)}",
            f"  weights    : {report.source_bytes / MIB:.1f} MiB -> {report.destination_bytes / MIB:.1f} MiB "
            f"({ratio:.2f}x smaller on disk)",
            "  load it    : AutoModelForCausalLM.from_pretrained(DST, quantization_config=halfbyte.HalfbyteConfig())",
            "               (bitsandbytes reads it too: AutoModelForCausalLM.from_pretrained(DST))",
        ]
    )


def format_verify_report(report: VerifyReport) -> str:
    gpu = f", GPU memory allocated {report.gpu_allocated_bytes / MIB:.1f} MiB" if report.gpu_allocated_bytes else ""
    sanity = (
        f"{report.sanity_perplexity:.2f} on a plain English sentence (a uniform guess: {report.vocab_size})"
        if report.sanity_perplexity is not None
        else "not measured"
    )
    lines = [
        f"verify {report.folder}",
        f"  checkpoint : {report.format}",
        f"  device     : {report.device} ({report.device_name}); torch {torch.__version__}, halfbyte "
        f"{halfbyte.__version__}",
        f"  loaded in  : {report.load_seconds:.2f} s",
        f"  memory     : {report.footprint_bytes / MIB:.1f} MiB (get_memory_footprint){gpu}",
        f"  layers     : {len(report.quantized)} in {report.bits} bits, kept in 16 bits: {_list(report.kept)}",
        f"  generation : {report.prompt!r} -> {report.completion!r}",
        f"               ({report.new_tokens} tokens greedy, {report.tokens_per_second:.1f} tokens/s)",
        f"  perplexity : {sanity}",
    ]
    for name, passed in report.checks.items():
        lines.append(f"  check      : {'ok  ' if passed else 'FAIL'} {name}")
    for warning in report.warnings:
        lines.append(f"  WARNING    : {warning}")
    lines.append("verify: OK" if report.ok else "verify: FAILED")
    return "\n".join(lines)
