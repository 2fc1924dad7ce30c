"""INT8 linear layers on the GPU: halfbyte beside bitsandbytes and torch bf16 F.linear, one run.

    python benchmarks/bench_int8_cuda.py [--json results/int8.json] [--batches 1,16,256,2048]

Llama-3-8B layer shapes (N x K), bf16 activations, Linear8bitLt with threshold 0 and has_fp16_weights=False in
both libraries (no bias), against F.linear with the bf16 weight. Each configuration is timed as CUDA-graph replays
(timing.py) over enough weight copies that the weights are not served from the 50 MB L2; median microseconds per
call, the three timed in alternating rounds (timing.interleaved_median_us). halfbyte runs its weight-only kernel up
to 16 rows and LLM.int8 (int8 activations, cuBLASLt int8 matmul) above; bitsandbytes runs LLM.int8 at every batch
size. Bytes for the bandwidth column: int8 weight + SCB + activations + output. The last column is halfbyte's
relative error against the bf16 F.linear (int8 weights, and int8 activations above 16 rows: about 1e-2 is
expected), a check that the kernels computed the product.
"""

from __future__ import annotations

import argparse
import logging
import math
from functools import partial

import halfbyte
import torch
from timing import bitsandbytes_or_none, copy_bandwidth_gbs, environment, interleaved_median_us, layer_row, report

SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336), (128256, 4096)]


def int8_layer(library, weight: torch.Tensor) -> torch.nn.Module:
    """A quantized Linear8bitLt of `library` (halfbyte or bitsandbytes) holding `weight` (bf16, on the GPU)."""
    N, K = weight.shape
    layer = library.nn.Linear8bitLt(K, N, bias=False, has_fp16_weights=False, threshold=0.0, device="meta")
    # bitsandbytes' CUDA quantization takes float16 (exact for these weights); halfbyte's takes the bf16 as is
    source = weight.half() if library is not halfbyte else weight
    CB, SCB, _ = library.functional.int8_vectorwise_quant(source)
    layer.weight = library.nn.Int8Params(CB, requires_grad=False, has_fp16_weights=False)
    layer.weight.CB, layer.weight.SCB = CB, SCB
    return layer.eval()


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json")
    parser.add_argument("--batches", default="1,16,256,2048")
    parser.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES))
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")]
    bnb = bitsandbytes_or_none()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its bf16 -> fp16 cast warning at every call
    copy = copy_bandwidth_gbs()
    rows = []
    for N, K in shapes:
        copies = max(1, min(16, math.ceil(400e6 / (N * K))))
        bf16_copies = max(1, min(16, math.ceil(400e6 / (2 * N * K))))
        weights = [
            torch.randn(N, K, dtype=torch.bfloat16, device="cuda") * 0.02 for _ in range(max(copies, bf16_copies))
        ]
        ours = [int8_layer(halfbyte, w) for w in weights[:copies]]
        theirs = [int8_layer(bnb, w) for w in weights[:copies]] if bnb else []
        for M in batches:
            x = torch.randn(M, K, dtype=torch.bfloat16, device="cuda")
            nbytes = N * K + 4 * N + 2 * M * K + 2 * M * N
            with torch.inference_mode():
                # alternating rounds: compute-bound calls measured back to back see different clocks
                competitors = [[partial(layer, x) for layer in ours]]
                competitors.append([partial(torch.nn.functional.linear, x, w) for w in weights[:bf16_copies]])
                if bnb:
                    competitors.append([partial(layer, x) for layer in theirs])
                times = interleaved_median_us(competitors)
                us, bf16_us = times[0], times[1]
                bnb_us = times[2] if bnb else None
                err = relative_error(ours[0](x), torch.nn.functional.linear(x, weights[0]))
            rows.append(layer_row(N, K, M, nbytes, us, bnb_us, bf16_us, copy) | {"rel_err_vs_bf16": err})
            print(rows[-1], flush=True)
        del ours, theirs, weights
        torch.cuda.empty_cache()
    env = environment() | {"copy_gbs": copy, "bitsandbytes": bnb.__version__ if bnb else None}
    report(rows, env, args.json, after=[("rel err vs bf16", lambda r: f"{r['rel_err_vs_bf16']:.1e}")])


if __name__ == "__main__":
    main()
