"""quantize_4bit / dequantize_4bit / 8-bit blockwise on the GPU: halfbyte beside bitsandbytes, one run.

    python benchmarks/bench_quantize_cuda.py [--json results/quantize.json]

14336x4096 bf16 (a Llama-3-8B MLP weight), NF4, blocksize 64, with and without double quantization, and
8-bit blockwise (dynamic map) at blocksizes 4096 and 256. Bytes = input read + outputs written; the table
gives microseconds, GB/s, % of the measured copy bandwidth and the speed ratio to bitsandbytes.
"""

from __future__ import annotations

import argparse
import json
from functools import partial

import halfbyte.functional as F
import torch
from timing import bitsandbytes_or_none, copy_bandwidth_gbs, environment, median_us_per_call


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json")
    parser.add_argument("--shape", default="14336x4096")
    args = parser.parse_args()
    N, K = map(int, args.shape.split("x"))
    bnb = bitsandbytes_or_none()
    bnbF = bnb.functional if bnb else None
    copy = copy_bandwidth_gbs()
    W = torch.randn(N, K, dtype=torch.bfloat16, device="cuda")
    n = W.numel()
    rows = []

    def add(name, nbytes, ours, theirs):
        us = median_us_per_call([ours], graph=True)
        bnb_us = median_us_per_call([theirs], graph=False) if theirs else None
        rows.append(
            {
                "op": name,
                "bytes": nbytes,
                "halfbyte_us": us,
                "halfbyte_gbs": nbytes / us / 1e3,
                "pct_copy": 100 * nbytes / us / 1e3 / copy,
                "bnb_us": bnb_us,
                "x_bnb": (bnb_us / us) if bnb_us else None,
            }
        )

    for nested in (False, True):
        tag = "+DQ" if nested else ""
        kwargs = {"quant_type": "nf4", "compress_statistics": nested}
        packed, state = F.quantize_4bit(W, **kwargs)
        q_bytes = 2 * n + n // 2 + state.absmax.numel() * state.absmax.element_size()
        theirs = bnbF.quantize_4bit(W, **kwargs) if bnbF else None
        add(f"quantize_4bit nf4{tag}", q_bytes, partial(F.quantize_4bit, W, **kwargs),
            partial(bnbF.quantize_4bit, W, **kwargs) if bnbF else None)  # fmt: skip
        add(f"dequantize_4bit nf4{tag}", q_bytes, partial(F.dequantize_4bit, packed, state),
            partial(bnbF.dequantize_4bit, *theirs) if bnbF else None)  # fmt: skip
    for blocksize in (4096, 256):
        codes, state8 = F.quantize_blockwise(W, blocksize=blocksize)
        b_bytes = 2 * n + n + 4 * state8.absmax.numel()
        theirs = bnbF.quantize_blockwise(W, blocksize=blocksize) if bnbF else None
        add(f"quantize_blockwise 8-bit bs{blocksize}", b_bytes, partial(F.quantize_blockwise, W, blocksize=blocksize),
            partial(bnbF.quantize_blockwise, W, blocksize=blocksize) if bnbF else None)  # fmt: skip
        add(f"dequantize_blockwise 8-bit bs{blocksize}", b_bytes, partial(F.dequantize_blockwise, codes, state8),
            partial(bnbF.dequantize_blockwise, *theirs) if bnbF else None)  # fmt: skip

    env = environment() | {"copy_gbs": copy, "bitsandbytes": bnb.__version__ if bnb else None, "shape": [N, K]}
    print(f"\n{env}\n")
    print(f"| op (bf16 {N}x{K}) | halfbyte us | GB/s | % of copy | bitsandbytes us | x bnb |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        bnb_cols = f"{r['bnb_us']:.1f} | {r['x_bnb']:.2f}x" if r["bnb_us"] else "- | -"
        print(f"| {r['op']} | {r['halfbyte_us']:.1f} | {r['halfbyte_gbs']:.0f} | {r['pct_copy']:.0f}% | {bnb_cols} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
