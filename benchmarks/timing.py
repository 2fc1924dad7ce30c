"""GPU timing shared by the benchmarks: CUDA events around CUDA-graph replays (or plain launches when a
library cannot be captured), median of many repeats, and the device-to-device copy bandwidth."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Sequence

import torch


def _timed_pass(calls: Sequence[Callable[[], object]], graph: bool) -> Callable[[], None]:
    """A function running one pass over `calls`: a captured CUDA graph's replay, or the eager calls when capture
    fails (a library that copies from the host). Runs the calls once first (module loading, caches, autotuning)."""
    for call in calls:
        call()
    torch.cuda.synchronize()
    if graph:
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for call in calls:
                    call()
            torch.cuda.current_stream().wait_stream(stream)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for call in calls:
                    call()
            return g.replay
        except RuntimeError:
            torch.cuda.synchronize()

    def run():
        for call in calls:
            call()

    return run


def _sample_us(run: Callable[[], None], ncalls: int, repeats: int) -> list[float]:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0 / ncalls)
    return times


def median_us_per_call(calls: Sequence[Callable[[], object]], repeats: int = 50, graph: bool = True) -> float:
    """Median microseconds of one call, timing a pass over `calls` (e.g. one per weight copy, so the data
    is not served from L2). With graph=True the pass is captured once and replayed; if capture fails
    (a library that copies from the host), the calls are launched eagerly instead."""
    run = _timed_pass(calls, graph)
    run()
    return statistics.median(_sample_us(run, len(calls), repeats))


def interleaved_median_us(
    call_lists: Sequence[Sequence[Callable[[], object]]], rounds: int = 5, repeats: int = 10, graph: bool = True
) -> list[float]:
    """median_us_per_call for several competitors, measured in alternating rounds (each round times every
    competitor `repeats` times), so that a drift of the GPU's clock or power state during the measurement
    (large compute-bound calls) is shared by all of them instead of favouring whichever ran first."""
    runs = [_timed_pass(calls, graph) for calls in call_lists]
    samples: list[list[float]] = [[] for _ in call_lists]
    for _ in range(rounds):
        for run, calls, out in zip(runs, call_lists, samples, strict=True):
            run()
            out.extend(_sample_us(run, len(calls), repeats))
    return [statistics.median(s) for s in samples]


def copy_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = median_us_per_call([lambda: dst.copy_(src)], repeats=20, graph=False)
    return 2 * nbytes / us / 1e3


def environment() -> dict:
    import subprocess

    props = torch.cuda.get_device_properties(0)
    try:
        driver = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        driver = "unknown"
    return {
        "gpu": props.name,
        "sms": props.multi_processor_count,
        "driver": driver,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
    }


def bitsandbytes_or_none():
    try:
        import bitsandbytes
        import bitsandbytes.functional  # noqa: F401

        return bitsandbytes
    except Exception as error:  # noqa: BLE001  (any import failure means: run without it, and say so)
        print(f"bitsandbytes not importable ({type(error).__name__}: {error}); its columns are left empty")
        return None


def layer_row(N: int, K: int, M: int, nbytes: int, us: float, bnb_us: float | None, bf16_us: float, copy_gbs: float):
    """One result of a layer benchmark (weight [N, K], M rows): the times, GB/s over `nbytes` moved, percent of
    the copy rate, and the ratios to torch bf16 and to bitsandbytes (None without bitsandbytes)."""
    return {
        "N": N,
        "K": K,
        "M": M,
        "halfbyte_us": us,
        "bnb_us": bnb_us,
        "bf16_us": bf16_us,
        "gbs": nbytes / us / 1e3,
        "pct_copy": 100 * nbytes / us / 1e3 / copy_gbs,
        "x_bf16": bf16_us / us,
        "x_bnb": bnb_us / us if bnb_us else None,
    }


Column = tuple[str, Callable[[dict], str]]


def report(rows: list[dict], env: dict, json_path: str | None, before: Sequence[Column] = (), after=()) -> None:
    """Prints `env` and the markdown table of layer_row results (extra columns `before` the times and `after`
    the ratios, as (header, format) pairs), and writes {"env", "rows"} to `json_path` when given."""
    print(f"\n{env}\n")
    headers = ["N x K", "M", *(h for h, _ in before), "halfbyte us", "GB/s", "% copy", "bnb us", "bf16 us"]
    headers += ["x bf16", "x bnb", *(h for h, _ in after)]
    print("| " + " | ".join(headers) + " |")
    print("|" + "---|" * len(headers))
    for r in rows:
        cells = [f"{r['N']}x{r['K']}", str(r["M"]), *(fmt(r) for _, fmt in before)]
        cells += [f"{r['halfbyte_us']:.1f}", f"{r['gbs']:.0f}", f"{r['pct_copy']:.0f}%"]
        cells += [f"{r['bnb_us']:.1f}" if r["bnb_us"] else "-", f"{r['bf16_us']:.1f}", f"{r['x_bf16']:.2f}"]
        cells += [f"{r['x_bnb']:.2f}" if r["x_bnb"] else "-", *(fmt(r) for _, fmt in after)]
        print("| " + " | ".join(cells) + " |")
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"env": env, "rows": rows}, f, indent=2)
