"""Command line: ``python -m halfbyte memory`` (the default) and ``python -m halfbyte info``."""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="halfbyte", description="4-bit and 8-bit weight quantization for PyTorch")
    commands = parser.add_subparsers(dest="command")
    memory = commands.add_parser("memory", help="memory per precision for a model, and measured quantization error")
    source = memory.add_mutually_exclusive_group()
    source.add_argument("--params", type=float, help="model size in billions of parameters")
    source.add_argument("--config", help="a Hugging Face config.json (or its folder); default: Llama-3-8B's shape")
    memory.add_argument("--blocksize", type=int, default=64, help="4-bit block size (default 64)")
    memory.add_argument("--quantize-lm-head", action="store_true", help="count lm_head as quantized")
    memory.add_argument("--json", action="store_true", help="print JSON instead of tables")
    commands.add_parser("info", help="how halfbyte was built")
    args = parser.parse_args(argv)

    import halfbyte

    if args.command == "info":
        print(json.dumps(halfbyte.build_info(), indent=2))
        return 0
    from . import memory as mem

    args_memory = args if args.command == "memory" else parser.parse_args(["memory"])
    try:
        if args_memory.params is not None:
            model = mem.from_billions(args_memory.params)
        else:
            config = mem.load_config(args_memory.config) if args_memory.config else mem.llama3_8b_config()
            model = mem.from_config(config, quantize_lm_head=args_memory.quantize_lm_head)
        if args_memory.blocksize not in halfbyte.functional.BLOCKSIZES:
            raise ValueError(f"--blocksize must be a power of two from 32 to 4096, got {args_memory.blocksize}")
    except ValueError as error:
        print(f"halfbyte memory: {error}", file=sys.stderr)
        return 2
    errors = mem.measured_errors(blocksize=args_memory.blocksize)
    if args_memory.json:
        print(
            json.dumps(
                {
                    "model": model.name,
                    "params": model.total,
                    "memory": mem.memory_table(model, args_memory.blocksize),
                    "errors": errors,
                },
                indent=2,
            )
        )
    else:
        print(mem.format_report(model, args_memory.blocksize, errors))
    return 0


if __name__ == "__main__":
    sys.exit(main())
