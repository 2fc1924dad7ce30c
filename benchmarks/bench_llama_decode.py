"""End to end: a Llama-3-8B-shaped model saved and loaded with from_pretrained, halfbyte beside bitsandbytes.

    python benchmarks/bench_llama_decode.py --workdir /tmp/llama8b --json results/decode.json

Builds a LlamaConfig with Llama-3-8B's shape (hidden 4096, intermediate 14336, 32 layers, 32 heads, 8 KV heads,
vocab 128256; ``--layers`` for fewer) with random bf16 weights, saves it once into ``--workdir`` (reused when
present), then for each variant loads it with ``from_pretrained(..., quantization_config=...)`` onto the GPU and
measures, in one process:

- load time (from_pretrained call, weights already in the page cache after the first variant reads them),
- GPU memory allocated after load, the peak during load (``torch.cuda.max_memory_allocated``) and the largest
  bf16 Linear weight (the peak should stay within "after load + one bf16 layer"),
- batch-1 greedy decode tokens/s, eager (dynamic cache) and, for the first variant (all with
  ``--compile-all``), with a static cache and torch.compile through transformers' own path
  (``generation_config.cache_implementation = "static"``; transformers compiles the decoding step when the
  quantizer says it is compileable, which bitsandbytes' does not). Decode speed is
  (N - 1) / (time to generate N tokens - time to generate 1 token): prefill excluded.

With ``--eager-rounds R``, each halfbyte variant and its bitsandbytes counterpart are then loaded together and
their eager decode is measured alternately in R short rounds (``--eager-round-tokens`` each, the order reversed
every other round; tokens/s from the median decode step of the round, timed by a streamer that stamps every token):
the eager columns above come from one library after the other, and the GPU machine's host speed drifts between
such runs by more than the libraries differ, so the median of the per-round ratios is the comparison.

Variants, in groups chosen with ``--variants`` (default ``nf4,int8,nf4-lm-head``), measured in this order:

- ``nf4``: halfbyte NF4 + double quantization (lm_head bf16), bitsandbytes the same;
- ``int8``: halfbyte ``Linear8bitLt`` (``HalfbyteConfig(load_in_8bit=True, llm_int8_threshold=0.0)``) beside
  bitsandbytes ``load_in_8bit`` with threshold 0 (LLM.int8 without the outlier path; lm_head bf16);
- ``nf4-lm-head``: halfbyte with lm_head quantized too (and bitsandbytes likewise with ``--bnb-lm-head``);
- ``bf16``: the unquantized model (also ``--bf16``).

The run fits in one 600 s GPU call: a variant is skipped (and says so) when the time left before ``--budget-s``
(540 s from the start of the script by default, checkpoint build included) is shorter than the longest variant
measured so far without compilation. JSON is rewritten after every variant, so a run cut short keeps what it
measured. ``--device cpu`` runs the same code on a tiny model (a smoke test of the script, not a benchmark).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

GIB = 1024**3


def llama_config(layers: int, tiny: bool):
    from transformers import LlamaConfig

    if tiny:
        return LlamaConfig(
            hidden_size=256, intermediate_size=512, num_hidden_layers=layers, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=1024, max_position_embeddings=512, tie_word_embeddings=False,
        )  # fmt: skip
    return LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
        tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001,
    )  # fmt: skip


def build_checkpoint(folder: Path, config, device: str) -> float:
    """Random bf16 weights (transformers' init, on `device` for speed) saved to `folder`; returns seconds."""
    from transformers import LlamaForCausalLM

    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        saved = json.loads((folder / "config.json").read_text())
        if (
            saved.get("num_hidden_layers") == config.num_hidden_layers
            and saved.get("hidden_size") == config.hidden_size
        ):
            print(f"reusing the checkpoint in {folder}")
            return 0.0
    started = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="4GB")
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return time.perf_counter() - started


VARIANT_GROUPS = ("nf4", "int8", "nf4-lm-head", "bf16")  # in the order they are measured
DEFAULT_VARIANTS = "nf4,int8,nf4-lm-head"


def parse_variant_groups(text: str) -> list[str]:
    """The groups named in a comma-separated ``--variants`` value, checked, in VARIANT_GROUPS order."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in VARIANT_GROUPS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown group(s) {unknown or [text]}; choose from {', '.join(VARIANT_GROUPS)}"
        )
    return [group for group in VARIANT_GROUPS if group in names]


def variants(args) -> list[tuple[str, str, object]]:
    """(name, library, quantization_config) to measure, in order."""
    import halfbyte
    from transformers import BitsAndBytesConfig

    groups = list(args.variants)
    if args.bf16 and "bf16" not in groups:
        groups.append("bf16")
    common = dict(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )  # fmt: skip
    int8 = dict(load_in_8bit=True, llm_int8_threshold=0.0)
    chosen = []
    if "nf4" in groups:
        chosen.append(("halfbyte NF4+DQ", "halfbyte", halfbyte.HalfbyteConfig(**common)))
        if args.bnb:
            chosen.append(("bitsandbytes NF4+DQ", "bitsandbytes", BitsAndBytesConfig(**common)))
    if "int8" in groups:
        chosen.append(("halfbyte int8 (threshold 0)", "halfbyte", halfbyte.HalfbyteConfig(**int8)))
        if args.bnb:
            chosen.append(("bitsandbytes int8 (threshold 0)", "bitsandbytes", BitsAndBytesConfig(**int8)))
    if "nf4-lm-head" in groups:
        chosen.append(
            ("halfbyte NF4+DQ, lm_head 4-bit", "halfbyte", halfbyte.HalfbyteConfig(**common, llm_int8_skip_modules=[]))
        )
        if args.bnb and args.bnb_lm_head:
            chosen.append(
                (
                    "bitsandbytes NF4+DQ, lm_head 4-bit",
                    "bitsandbytes",
                    BitsAndBytesConfig(**common, llm_int8_skip_modules=[]),
                )
            )
    if "bf16" in groups:
        chosen.append(("bf16", "torch", None))
    return chosen


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed_generate(model, prompt: torch.Tensor, new_tokens: int, device: str, streamer=None) -> float:
    """Seconds of one greedy generation of exactly `new_tokens` tokens (GPU synchronized before and after)."""
    synchronize(device)
    started = time.perf_counter()
    output = model.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        do_sample=False, pad_token_id=0, streamer=streamer,
    )  # fmt: skip
    synchronize(device)
    assert output.shape[1] == prompt.shape[1] + new_tokens
    return time.perf_counter() - started


def decode_tokens_per_second(model, prompt, new_tokens: int, device: str, repeats: int = 3) -> tuple[float, float]:
    """(decode tokens/s, seconds of the first, warm-up generation: compilation included when compiled).

    Decode rate = (N - 1) / (best time for N tokens - best time for 1 token): the prefill cancels out."""
    warmup = timed_generate(model, prompt, new_tokens, device)
    timed_generate(model, prompt, 1, device)
    full = min(timed_generate(model, prompt, new_tokens, device) for _ in range(repeats))
    one = min(timed_generate(model, prompt, 1, device) for _ in range(repeats))
    return ((new_tokens - 1) / (full - one) if full > one else float("nan")), warmup


def largest_linear_bf16_bytes(config, quantized_lm_head: bool) -> int:
    layer = max(config.intermediate_size * config.hidden_size, config.hidden_size * config.hidden_size)
    return 2 * (max(layer, config.vocab_size * config.hidden_size) if quantized_lm_head else layer)


def measure(name, library, quantization_config, folder: Path, config, args, first: bool) -> dict:
    from transformers import AutoModelForCausalLM, CompileConfig

    device = args.device
    row = {"variant": name, "library": library}
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=quantization_config, dtype=torch.bfloat16, device_map={"": device}
    )
    synchronize(device)
    row["load_s"] = time.perf_counter() - started
    lm_head_class = type(model.lm_head).__name__
    quantized_lm_head = lm_head_class in ("Linear4bit", "Linear8bitLt")
    row["lm_head"] = {"Linear4bit": "4-bit", "Linear8bitLt": "int8"}.get(lm_head_class, "bf16")
    if device == "cuda":
        row["gpu_memory_gib"] = (torch.cuda.memory_allocated() - base) / GIB
        row["peak_during_load_gib"] = (torch.cuda.max_memory_allocated() - base) / GIB
        row["largest_bf16_linear_gib"] = largest_linear_bf16_bytes(config, quantized_lm_head) / GIB
        row["peak_within_final_plus_one_layer"] = (
            row["peak_during_load_gib"] <= row["gpu_memory_gib"] + row["largest_bf16_linear_gib"] + 1e-6
        )
    row["memory_footprint_gib"] = model.get_memory_footprint() / GIB
    generator = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, config.vocab_size, (1, args.prompt_tokens), generator=generator).to(device)
    row["eager_tokens_per_s"], _ = decode_tokens_per_second(model, prompt, args.new_tokens, device)
    row["eager_variant_s"] = time.perf_counter() - started  # load + eager decode: what budgets the next variant
    print(f"  {name}: loaded in {row['load_s']:.1f} s, eager {row['eager_tokens_per_s']:.1f} tokens/s", flush=True)
    if args.compile and (first or args.compile_all) and time.perf_counter() < args.deadline:
        model.generation_config.cache_implementation = "static"
        if device != "cuda":
            compile_config = CompileConfig(mode="default")
            compile_config._compile_all_devices = True
            model.generation_config.compile_config = compile_config
        torch._dynamo.reset()
        row["static_compile_tokens_per_s"], row["static_compile_first_call_s"] = decode_tokens_per_second(
            model, prompt, args.new_tokens, device
        )
        row["compiled"] = hasattr(model, "_compiled_call")
        print(f"  {name}: static cache + compile {row['static_compile_tokens_per_s']:.1f} tokens/s", flush=True)
    del model
    gc.collect()
    return row


class StepClock:
    """A generate() streamer that only stamps the time of each put: the prompt, then every new token. generate
    synchronizes at every step (its stopping check reads the GPU), so the gaps between the stamps after the first
    token are the decode steps' wall times."""

    def __init__(self):
        self.stamps: list[float] = []

    def put(self, value) -> None:
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


def decode_step_seconds(model, prompt: torch.Tensor, new_tokens: int, device: str) -> list[float]:
    """Wall time of each decode step of one greedy generation (prefill, the first new token, excluded)."""
    clock = StepClock()
    timed_generate(model, prompt, new_tokens, device, streamer=clock)
    stamps = clock.stamps[1:]  # [first new token, second, ...]
    assert len(stamps) == new_tokens
    return [later - earlier for earlier, later in zip(stamps[:-1], stamps[1:], strict=True)]


def interleaved_eager(pairs, folder: Path, config, args) -> dict[str, list[float]]:
    """Eager tokens/s of each variant of `pairs` [(name, library, quantization_config)], all loaded at once and
    measured in turn, ``--eager-rounds`` times, each round one generation of ``--eager-round-tokens`` per model,
    the order reversed every other round, tokens/s = 1 / the median decode step of the round. The host's speed
    drifts by more than the libraries differ (in earlier runs bitsandbytes alone went from 18 to 32 tokens/s within
    one process), so only short rounds taken alternately compare them; the median of many per-round ratios does."""
    from transformers import AutoModelForCausalLM

    models = {}
    for name, _, quantization_config in pairs:
        models[name] = AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=quantization_config, dtype=torch.bfloat16, device_map={"": args.device}
        )
    generator = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, config.vocab_size, (1, args.prompt_tokens), generator=generator).to(args.device)
    for model in models.values():  # warm-up at the full length (attention plans, allocator)
        timed_generate(model, prompt, args.eager_round_tokens, args.device)
    rates: dict[str, list[float]] = {name: [] for name in models}
    names = list(models)
    for round_index in range(args.eager_rounds):
        for name in names if round_index % 2 == 0 else names[::-1]:
            steps = decode_step_seconds(models[name], prompt, args.eager_round_tokens, args.device)
            rates[name].append(1.0 / statistics.median(steps))
    del models
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return rates


def environment(device: str) -> dict:
    import halfbyte
    import transformers

    info = {
        "device": device, "torch": torch.__version__, "cuda": torch.version.cuda,
        "transformers": transformers.__version__, "halfbyte": halfbyte.__version__, "python": platform.python_version(),
    }  # fmt: skip
    if device == "cuda":
        sys.path.insert(0, str(Path(__file__).parent))
        from timing import environment as gpu_environment

        info |= gpu_environment()
    try:
        import bitsandbytes

        info["bitsandbytes"] = bitsandbytes.__version__
    except Exception as error:  # noqa: BLE001  (any import failure: run without it, and say so)
        info["bitsandbytes"] = f"not importable ({type(error).__name__})"
    return info


def format_speedups(rows: list[dict]) -> str:
    """One line per halfbyte variant that has a bitsandbytes counterpart: the eager decode speed ratio."""
    by_name = {row["variant"]: row for row in rows}
    lines = []
    for row in rows:
        if row["library"] != "halfbyte":
            continue
        theirs = by_name.get(row["variant"].replace("halfbyte", "bitsandbytes", 1))
        if theirs and theirs["eager_tokens_per_s"] > 0:
            ratio = row["eager_tokens_per_s"] / theirs["eager_tokens_per_s"]
            lines.append(f"{row['variant']}: eager decode {ratio:.2f}x bitsandbytes'")
        if row.get("eager_interleaved") and theirs and theirs.get("eager_interleaved"):
            pairs = [(a, b) for a, b in zip(row["eager_interleaved"], theirs["eager_interleaved"], strict=True)]
            pairs = [(a, b) for a, b in pairs if math.isfinite(a) and math.isfinite(b) and b > 0]  # nan: too short
            if not pairs:
                continue
            ours, them = [a for a, _ in pairs], [b for _, b in pairs]
            ratios = sorted(a / b for a, b in pairs)
            lines.append(
                f"{row['variant']}: eager decode measured alternately, {len(ratios)} rounds: median "
                f"{statistics.median(ours):.1f} vs {statistics.median(them):.1f} tokens/s, per-round ratio "
                f"{ratios[0]:.2f}-{ratios[-1]:.2f}x (median {statistics.median(ratios):.2f}x)"
            )
    return "\n".join(lines)


def format_table(rows: list[dict]) -> str:
    header = "| variant | load s | GPU GiB after load | peak during load GiB | footprint GiB | eager tok/s |"
    lines = [header + " static+compile tok/s |", "|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        cells = [
            row["variant"], f"{row['load_s']:.1f}", f"{row.get('gpu_memory_gib', float('nan')):.2f}",
            f"{row.get('peak_during_load_gib', float('nan')):.2f}", f"{row['memory_footprint_gib']:.2f}",
            f"{row['eager_tokens_per_s']:.1f}",
            f"{row['static_compile_tokens_per_s']:.1f}" if "static_compile_tokens_per_s" in row else "-",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="/tmp/llama3-8b-shaped", help="where the bf16 checkpoint is saved")
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (32 is Llama-3-8B)")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--no-bnb", dest="bnb", action="store_false", help="skip bitsandbytes")
    parser.add_argument("--bnb-lm-head", action="store_true", help="also bitsandbytes with lm_head quantized")
    parser.add_argument(
        "--variants", type=parse_variant_groups, default=parse_variant_groups(DEFAULT_VARIANTS),
        help=f"comma-separated groups to measure, from {', '.join(VARIANT_GROUPS)} (default {DEFAULT_VARIANTS})",
    )  # fmt: skip
    parser.add_argument("--bf16", action="store_true", help="also the unquantized bf16 model (eager)")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip static cache + compile")
    parser.add_argument(
        "--compile-all", action="store_true", help="static cache + compile for every variant (default: the first)"
    )
    parser.add_argument(
        "--deadline-s", type=float, default=None, help="skip what would start this many s after the checkpoint is built"
    )
    parser.add_argument(
        "--budget-s", type=float, default=540.0,
        help="finish within this many s of the start (checkpoint build included; default 540, for a 600 s call): "
        "skip a variant that the time left cannot hold; 0 for no limit",
    )  # fmt: skip
    parser.add_argument(
        "--eager-rounds", type=int, default=0,
        help="after the variants, load each halfbyte variant with its bitsandbytes counterpart together and measure "
        "their eager decode alternately this many rounds (the fair eager comparison on a drifting host); 0: off",
    )  # fmt: skip
    parser.add_argument(
        "--eager-round-tokens", type=int, default=16, help="tokens generated per model and round of --eager-rounds"
    )
    parser.add_argument("--json", help="write the results here (after every variant)")
    args = parser.parse_args()
    script_started = time.perf_counter()
    if args.bnb:
        try:
            import bitsandbytes  # noqa: F401
        except Exception as error:  # noqa: BLE001
            print(f"bitsandbytes not importable ({type(error).__name__}: {error}); measuring halfbyte alone")
            args.bnb = False
    tiny = args.device == "cpu"
    config = llama_config(args.layers, tiny)
    folder = Path(args.workdir)
    report = {"environment": environment(args.device), "layers": args.layers, "tiny": tiny, "rows": []}
    report["build_checkpoint_s"] = build_checkpoint(folder, config, args.device)
    print(f"checkpoint: {folder} ({args.layers} layers), built in {report['build_checkpoint_s']:.1f} s", flush=True)
    started = time.perf_counter()
    args.deadline = started + args.deadline_s if args.deadline_s else float("inf")
    if args.budget_s:
        args.deadline = min(args.deadline, script_started + args.budget_s)
    report["skipped"] = []
    for index, (name, library, quantization_config) in enumerate(variants(args)):
        # the longest variant so far (load + eager decode) is the estimate of the next one
        estimate = max((row["eager_variant_s"] for row in report["rows"]), default=0.0)
        if time.perf_counter() + estimate > args.deadline:
            left = args.deadline - time.perf_counter()
            print(
                f"  {name}: skipped ({left:.0f} s left of --budget-s/--deadline-s, a variant takes ~{estimate:.0f} s)"
            )
            report["skipped"].append(name)
            continue
        report["rows"].append(measure(name, library, quantization_config, folder, config, args, first=index == 0))
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2))
    if args.eager_rounds > 0 and time.perf_counter() > args.deadline:
        print("  interleaved eager: skipped (no time left of --budget-s/--deadline-s)")
    elif args.eager_rounds > 0:
        chosen = {name: (name, library, qc) for name, library, qc in variants(args)}
        measured = {row["variant"]: row for row in report["rows"]}
        for name, (_, library, _) in chosen.items():
            theirs = name.replace("halfbyte", "bitsandbytes", 1)
            if library != "halfbyte" or theirs not in chosen or name not in measured or theirs not in measured:
                continue
            rates = interleaved_eager([chosen[name], chosen[theirs]], folder, config, args)
            measured[name]["eager_interleaved"], measured[theirs]["eager_interleaved"] = rates[name], rates[theirs]
            print(f"  interleaved eager: {name} {rates[name]}, {theirs} {rates[theirs]}", flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(report, indent=2))
    report["total_s"] = time.perf_counter() - script_started
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    print(json.dumps(report["environment"]))
    print(format_table(report["rows"]))
    print(format_speedups(report["rows"]))
    if report["skipped"]:
        print(f"skipped for time: {', '.join(report['skipped'])} (run them with --variants)")
    print(f"total {report['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
