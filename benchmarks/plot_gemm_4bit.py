"""Plot of the 4-bit matmul sweep: time against batch size M per layer shape, halfbyte beside
bitsandbytes and torch bf16 F.linear (the JSON of bench_gemm_4bit_cuda.py).

    python benchmarks/plot_gemm_4bit.py results/sweep.json benchmarks/gemm_4bit_vs_batch.png
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    source, target = sys.argv[1], sys.argv[2]
    data = json.load(open(source))
    rows = [r for r in data["rows"] if not r["nested"]]
    shapes = sorted({(r["N"], r["K"]) for r in rows}, key=lambda s: s[0] * s[1])
    fig, axes = plt.subplots(1, len(shapes), figsize=(4.2 * len(shapes), 4), squeeze=False)
    for ax, (N, K) in zip(axes[0], shapes, strict=True):
        mine = sorted((r for r in rows if (r["N"], r["K"]) == (N, K)), key=lambda r: r["M"])
        ms = [r["M"] for r in mine]
        ax.plot(ms, [r["halfbyte_us"] for r in mine], "o-", label="halfbyte NF4")
        if all(r["bnb_us"] for r in mine):
            ax.plot(ms, [r["bnb_us"] for r in mine], "s--", label="bitsandbytes NF4")
        ax.plot(ms, [r["bf16_us"] for r in mine], "^:", label="torch bf16 F.linear")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{N} x {K}")
        ax.set_xlabel("batch rows M")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("microseconds per call")
    axes[0][0].legend()
    env = data["env"]
    fig.suptitle(
        f"{env['gpu']}, CUDA {env['cuda']}, torch {env['torch']}, bitsandbytes {env.get('bitsandbytes')}, "
        "NF4 blocksize 64, bf16 activations"
    )
    fig.tight_layout()
    fig.savefig(target, dpi=110)


if __name__ == "__main__":
    main()
