"""Bar chart of the ratios from ``instnorm-numba bench --json``, naming the machine it ran on.

    instnorm-numba bench --json bench.json
    python scripts/plot_bench.py bench.json -o docs/bench.png

Left: ours (with ``out=``) over the parallel copy of the same bytes, the memory roofline (lower
is better; the targets 1.3x for cases larger than the last-level cache and 2x for every case
are drawn).  Right: each peer's time over ours (higher is better; 2x for ONNX Runtime and 4x
for PyTorch are drawn).  Needs matplotlib (the ``bench`` extra).
"""

from __future__ import annotations

import argparse
import json
import textwrap

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402


def _label(r: dict) -> str:
    shape = "x".join(map(str, r["shape"]))
    extra = " CL" if r["layout"] in ("channels_last", "channels-last") else ""
    if r.get("direction", "forward") != "forward":
        extra += " bwd"
    return f"{r['case']}\n{shape}{extra}\n{r['dtype']}"


def plot(data: dict, path: str) -> None:
    results = [r for r in data["results"] if r.get("direction", "forward") == "forward"]
    m = data["machine"]
    labels = [_label(r) for r in results]
    y = np.arange(len(results))

    fig, (ax1, ax2) = plt.subplots(
        1,
        2,
        figsize=(13, 0.55 * len(results) + 2.2),
        sharey=True,
        gridspec_kw={"width_ratios": [1, 1.4]},
    )
    copy = [r["ratios"].get("ours/copy", np.nan) for r in results]
    ax1.barh(y, copy, color="#4c72b0")
    for v, yy in zip(copy, y, strict=True):
        if np.isfinite(v):
            ax1.text(v, yy, f" {v:.2f}", va="center", fontsize=8)
    ax1.axvline(1.0, color="k", lw=0.8)
    ax1.set_xlabel("ours / parallel copy (time; lower is better)")
    ax1.set_yticks(y, labels, fontsize=8)
    ax1.invert_yaxis()

    peers = [
        ("torch/ours", "PyTorch CPU", "#8172b3"),
        ("onnxruntime/ours", "ONNX Runtime", "#55a868"),
        ("openvino/ours", "OpenVINO", "#dd8452"),
        ("jax/ours", "JAX", "#937860"),
    ]
    peers = [p for p in peers if any(p[0] in r["ratios"] for r in results)]
    h = 0.8 / max(len(peers), 1)
    for k, (key, name, color) in enumerate(peers):
        vals = [r["ratios"].get(key, np.nan) for r in results]
        pos = y + (k - (len(peers) - 1) / 2) * h
        ax2.barh(pos, vals, height=h, color=color, label=f"{name} / ours")
        for v, yy in zip(vals, pos, strict=True):
            if np.isfinite(v):
                ax2.text(v, yy, f" {v:.1f}", va="center", fontsize=6)
    ax2.axvline(2.0, color="#c44e52", ls="--", lw=1, label="2x target (every peer)")
    ax2.axvline(1.0, color="k", lw=0.8)
    ax2.set_xscale("log")
    ticks = [0.125, 0.25, 0.5, 1, 2, 4, 8, 16, 32]
    ax2.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(ticks))
    ax2.xaxis.set_major_formatter(matplotlib.ticker.FixedFormatter([f"{t:g}x" for t in ticks]))
    ax2.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax2.set_xlabel("peer / ours (time; higher is better, log scale)")
    ax2.legend(fontsize=8, loc="lower right")

    names = ("torch", "onnxruntime", "openvino", "jax")
    peers_v = ", ".join(f"{k} {m[k]}" for k in names if k in m)
    title = (
        f"instnorm_numba {m['instnorm_numba']} on {m['cpu']}, {m['threads']} threads "
        f"({m['threading_layer']}), numba {m['numba']}, numpy {m['numpy']}"
        + (f"; {peers_v}" if peers_v else "")
    )
    fig.suptitle("\n".join(textwrap.wrap(title, 120)), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json", help="output of `instnorm-numba bench --json PATH`")
    p.add_argument("-o", "--output", default="docs/bench.png")
    args = p.parse_args(argv)
    with open(args.json) as f:
        plot(json.load(f), args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
