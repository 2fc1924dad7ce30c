"""CPU timings of halfbyte against bitsandbytes' CPU path, side by side in one run.

Ops: quantize_4bit / dequantize_4bit (NF4, blocksize 64, with and without compress_statistics) and
quantize_blockwise / dequantize_blockwise (dynamic map, blocksize 4096 and 64), on 4096x4096 and
14336x4096 tensors in bfloat16 and float32 (``--quick``: one 1024x4096 shape).

Each cell is the median of ``--repeats`` timed calls after ``--warmup`` untimed ones
(time.perf_counter); halfbyte and bitsandbytes calls alternate within each repeat, so that load from
elsewhere on the machine hits both columns alike. GB/s counts the bytes of the inputs read and the
outputs written: the tensor, the codes and the absmax (for compress_statistics, the 8-bit absmax and
its nested absmax and offset). The ratio column is halfbyte speed / bitsandbytes speed (> 1:
halfbyte is faster).

Usage: python benchmarks/bench_cpu.py [--quick] [--json PATH] [--repeats N] [--warmup N] [--only TEXT]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import halfbyte
import halfbyte.functional as F
import torch

try:
    import bitsandbytes
    import bitsandbytes.functional as bnbF
except Exception as exc:  # any import failure (missing library, broken build) only skips its columns
    bnbF = None
    BNB_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"
else:
    BNB_IMPORT_ERROR = None

FULL_SHAPES = [(4096, 4096), (14336, 4096)]
QUICK_SHAPES = [(1024, 4096)]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def median_seconds(fns: list[Callable[[], object]], warmup: int, repeats: int) -> list[float]:
    """Median wall time of each callable. The callables alternate within every repeat, so a load spike
    on the machine hits all of them alike instead of one column."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, t in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            t.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def state_bytes(state) -> int:
    """Bytes of the absmax a state holds (and of the nested absmax when double-quantized)."""
    total = nbytes(state.absmax)
    if getattr(state, "state2", None) is not None:
        total += nbytes(state.state2.absmax, getattr(state, "offset", None))
    return total


def cases(lib, A: torch.Tensor):
    """(op name, callable, bytes moved) for one library on one input tensor."""
    out = []
    for nested in (False, True):
        packed, state = lib.quantize_4bit(A, blocksize=64, compress_statistics=nested, quant_type="nf4")
        moved = nbytes(A, packed) + state_bytes(state)
        label = "nf4 bs64" + (" +cs" if nested else "")
        out.append(
            (
                f"quantize_4bit {label}",
                lambda nested=nested: lib.quantize_4bit(A, blocksize=64, compress_statistics=nested, quant_type="nf4"),
                moved,
            )
        )
        out.append(
            (
                f"dequantize_4bit {label}",
                lambda packed=packed, state=state: lib.dequantize_4bit(packed, state),
                moved,
            )
        )
    for blocksize in (4096, 64):
        codes, state = lib.quantize_blockwise(A, blocksize=blocksize)
        moved = nbytes(A, codes) + state_bytes(state)
        out.append(
            (
                f"quantize_blockwise bs{blocksize}",
                lambda blocksize=blocksize: lib.quantize_blockwise(A, blocksize=blocksize),
                moved,
            )
        )
        out.append(
            (
                f"dequantize_blockwise bs{blocksize}",
                lambda codes=codes, state=state: lib.dequantize_blockwise(codes, state),
                moved,
            )
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one 1024x4096 shape instead of the full set")
    parser.add_argument("--json", metavar="PATH", help="write the numbers to PATH")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--only", metavar="TEXT", help="time only the ops whose name contains TEXT")
    args = parser.parse_args()

    env = {
        "torch": torch.__version__,
        "halfbyte": getattr(halfbyte, "__version__", "unknown"),
        "bitsandbytes": None if bnbF is None else bitsandbytes.__version__,
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "warmup": args.warmup,
    }
    print(
        f"torch {env['torch']}, halfbyte {env['halfbyte']}, bitsandbytes {env['bitsandbytes']}; "
        f"CPU: {env['cpu']}; torch threads: {env['threads']}; median of {args.repeats} after {args.warmup} warm-up"
    )
    if bnbF is None:
        print(f"note: bitsandbytes.functional not importable ({BNB_IMPORT_ERROR}); its columns are skipped")
    print()

    torch.manual_seed(0)
    rows = []
    for shape in QUICK_SHAPES if args.quick else FULL_SHAPES:
        for dtype_name, dtype in DTYPES.items():
            A = torch.randn(shape, dtype=dtype)
            hb_cases = cases(F, A)
            bnb_cases = cases(bnbF, A) if bnbF is not None else [None] * len(hb_cases)
            for hb, bnb in zip(hb_cases, bnb_cases, strict=True):
                op, fn, moved = hb
                if args.only and args.only not in op:
                    continue
                fns = [fn] if bnb is None else [fn, bnb[1]]
                seconds = median_seconds(fns, args.warmup, args.repeats)
                hb_s = seconds[0]
                row = {
                    "op": op,
                    "shape": list(shape),
                    "dtype": dtype_name,
                    "halfbyte_ms": hb_s * 1e3,
                    "halfbyte_gbs": moved / hb_s / 1e9,
                    "bnb_ms": None,
                    "bnb_gbs": None,
                    "speed_ratio": None,
                }
                if bnb is not None:
                    bnb_moved, bnb_s = bnb[2], seconds[1]
                    row.update(bnb_ms=bnb_s * 1e3, bnb_gbs=bnb_moved / bnb_s / 1e9, speed_ratio=bnb_s / hb_s)
                rows.append(row)
            del A

    def cell(value, fmt):
        return "–" if value is None else format(value, fmt)

    print("| op | shape | dtype | halfbyte ms | halfbyte GB/s | bnb ms | bnb GB/s | halfbyte/bnb speed |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['op']} | {r['shape'][0]}x{r['shape'][1]} | {r['dtype']} | {r['halfbyte_ms']:.2f} | "
            f"{r['halfbyte_gbs']:.2f} | {cell(r['bnb_ms'], '.2f')} | {cell(r['bnb_gbs'], '.2f')} | "
            f"{cell(r['speed_ratio'], '.2f')}x |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "results": rows}, f, indent=2)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
