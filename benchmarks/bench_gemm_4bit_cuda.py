"""4-bit matmul on the GPU: halfbyte beside bitsandbytes and torch bf16 F.linear, one run.

    python benchmarks/bench_gemm_4bit_cuda.py [--json results/gemm.json] [--batches 1,4,16]
        [--shapes 4096x4096,...] [--nested both|no|yes] [--forced prefill,dequantize]

--forced also times halfbyte with each named kernel path forced (HALFBYTE_GEMM_4BIT_KERNEL), where it
applies, into the columns forced_<path>_us: the data behind the dispatch rule in csrc/torch/cuda_ops.cpp.

Llama-3-8B layer shapes (N x K), bf16 activations, NF4, blocksize 64, with and without double
quantization. Each configuration is timed as CUDA-graph replays over enough weight copies that the
weights are not served from the 50 MB L2; median microseconds per call, halfbyte, bf16 and bitsandbytes
timed in alternating rounds (timing.interleaved_median_us). Bytes for the bandwidth column:
packed weights + absmax + activations + output.
"""

from __future__ import annotations

import argparse
import math
import os
from functools import partial

import halfbyte
import halfbyte.functional as F
import torch
from timing import (
    bitsandbytes_or_none,
    copy_bandwidth_gbs,
    environment,
    interleaved_median_us,
    layer_row,
    median_us_per_call,
    report,
)

SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336), (128256, 4096)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json")
    parser.add_argument("--batches", default="1,4,16,64,256,2048")
    parser.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES))
    parser.add_argument("--nested", choices=["both", "no", "yes"], default="both")
    parser.add_argument("--forced", default="")
    args = parser.parse_args()
    forced = [f for f in args.forced.split(",") if f]
    nested_values = {"both": (False, True), "no": (False,), "yes": (True,)}[args.nested]
    batches = [int(b) for b in args.batches.split(",")]
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")]
    bnb = bitsandbytes_or_none()
    copy = copy_bandwidth_gbs()
    rows = []
    for N, K in shapes:
        packed_bytes = N * K // 2
        copies = max(1, min(32, math.ceil(400e6 / packed_bytes)))
        bf16_copies = max(1, min(16, math.ceil(400e6 / (2 * N * K))))
        weights = [
            torch.randn(N, K, dtype=torch.bfloat16, device="cuda") * 0.02 for _ in range(max(copies, bf16_copies))
        ]
        for nested in nested_values:
            ours = [F.quantize_4bit(w, quant_type="nf4", compress_statistics=nested) for w in weights[:copies]]
            theirs = (
                [
                    bnb.functional.quantize_4bit(w, quant_type="nf4", compress_statistics=nested)
                    for w in weights[:copies]
                ]
                if bnb
                else []
            )
            absmax_bytes = ours[0][1].absmax.numel() * ours[0][1].absmax.element_size()
            for M in batches:
                x = torch.randn(M, K, dtype=torch.bfloat16, device="cuda")
                nbytes = packed_bytes + absmax_bytes + 2 * M * K + 2 * M * N
                # the three measured in alternating rounds: at large M the calls are compute-bound and the
                # clock drifts with power between back-to-back measurements
                competitors = [[partial(halfbyte.matmul_4bit, x, p.t(), s) for p, s in ours]]
                competitors.append([partial(torch.nn.functional.linear, x, w) for w in weights[:bf16_copies]])
                if bnb:
                    competitors.append([partial(bnb.matmul_4bit, x, p.t(), s) for p, s in theirs])
                times = interleaved_median_us(competitors)
                us, bf16_us = times[0], times[1]
                bnb_us = times[2] if bnb else None
                forced_us = {}
                for path in forced:
                    os.environ["HALFBYTE_GEMM_4BIT_KERNEL"] = path  # read when the graph is captured
                    forced_us[f"forced_{path}_us"] = median_us_per_call(
                        [partial(halfbyte.matmul_4bit, x, p.t(), s) for p, s in ours]
                    )
                    del os.environ["HALFBYTE_GEMM_4BIT_KERNEL"]
                row = layer_row(N, K, M, nbytes, us, bnb_us, bf16_us, copy)
                rows.append(row | {"nested": nested} | forced_us)
                print(rows[-1], flush=True)
            del ours, theirs
        del weights
        torch.cuda.empty_cache()
    env = environment() | {"copy_gbs": copy, "bitsandbytes": bnb.__version__ if bnb else None}
    report(rows, env, args.json, before=[("DQ", lambda r: "y" if r["nested"] else "n")])


if __name__ == "__main__":
    main()
