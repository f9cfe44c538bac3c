"""Time the PyTorch bridge (instnorm_numba.torch) against PyTorch's own instance norm.

    flock /work/bench.lock python scripts/bench_torch.py --json torch_bench.json

Per layer: ``torch.nn.InstanceNorm*d(affine=True)`` and its converted twin, forward under
``torch.no_grad()`` and forward + backward, contiguous and channels-last. End to end: a
MONAI DynUNet-style 3-D U-Net (InstanceNorm3d) and Johnson et al.'s fast style transfer
network (InstanceNorm2d), in eval mode under ``torch.no_grad()`` (CPU inference), eager and
``torch.compile``d, in both memory formats, each with PyTorch's norms and with converted ones.

One process, the same thread count for everyone (``torch.set_num_threads`` and Numba's
default, both ``--threads``). Each configuration is timed in its own block of back-to-back
calls after untimed warm-up, and the blocks run twice, the second pass in reverse order;
the median of all calls of a configuration is reported. ``--quick``: tiny shapes, eager only
(a smoke run).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time

import numba
import numpy as np
import torch
from torch import nn

import instnorm_numba
from instnorm_numba import torch as bridge
from instnorm_numba._networks import DynUNet, StyleNet

CL = {4: torch.channels_last, 5: torch.channels_last_3d}


# --------------------------------------------------------------------------------------------
# timing


def block(fn, budget, min_calls=3, warmup=1):
    """Times of back-to-back calls after ``warmup`` untimed ones: at least ``min_calls``,
    more while the block has taken less than ``budget`` seconds."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_calls or time.perf_counter() - start < budget:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= 200:
            break
    return times


def run_blocks(configs, budget, min_calls, warmup):
    """configs: {name: fn}. Two passes of blocks, the second reversed; medians in ms."""
    samples = {k: [] for k in configs}
    order = list(configs)
    for names in (order, order[::-1]):
        for k in names:
            samples[k] += block(configs[k], budget, min_calls, warmup)
    return {k: 1e3 * statistics.median(v) for k, v in samples.items()}, {
        k: len(v) for k, v in samples.items()
    }


def layer_cases(quick):
    if quick:
        return [("InstanceNorm3d", (1, 8, 16, 16, 16)), ("InstanceNorm2d", (1, 16, 32, 32))]
    return [("InstanceNorm3d", (1, 32, 96, 96, 96)), ("InstanceNorm2d", (1, 64, 256, 256))]


def per_layer(args):
    rows = []
    for cls_name, shape in layer_cases(args.quick):
        C = shape[1]
        theirs = getattr(nn, cls_name)(C, affine=True)
        ours = bridge.convert(copy.deepcopy(theirs))
        gen = torch.Generator().manual_seed(0)
        base = torch.randn(shape, generator=gen) * 2 + 1
        for cl in (False, True):
            x = base.to(memory_format=CL[len(shape)]) if cl else base.contiguous()
            xg = x.clone().requires_grad_(True)
            dy = torch.randn(shape, generator=gen).to(
                memory_format=CL[len(shape)] if cl else torch.contiguous_format
            )

            def fwd(m, x=x):
                with torch.no_grad():
                    m(x)

            def fwd_bwd(m, xg=xg, dy=dy):
                m.zero_grad(set_to_none=True)
                xg.grad = None
                m(xg).backward(dy)

            with torch.no_grad():
                err = (ours(x) - theirs(x)).abs().max().item()
            configs = {
                "torch fwd": lambda m=theirs, f=fwd: f(m),
                "ours fwd": lambda m=ours, f=fwd: f(m),
                "torch fwd+bwd": lambda m=theirs, f=fwd_bwd: f(m),
                "ours fwd+bwd": lambda m=ours, f=fwd_bwd: f(m),
            }
            med, n = run_blocks(configs, args.budget, 5, 2)
            rows.append(
                {
                    "layer": cls_name,
                    "shape": list(shape),
                    "format": "channels_last" if cl else "contiguous",
                    "ms": med,
                    "calls": n,
                    "max_abs_diff": err,
                    "speedup_fwd": med["torch fwd"] / med["ours fwd"],
                    "speedup_fwd_bwd": med["torch fwd+bwd"] / med["ours fwd+bwd"],
                }
            )
            print_row(rows[-1])
    return rows


def print_row(r):
    ms = "  ".join(f"{k} {v:8.2f}" for k, v in r["ms"].items())
    extra = {k: v for k, v in r.items() if k.startswith("speedup")}
    extra_s = "  ".join(f"{k} {v:5.2f}" for k, v in extra.items())
    label = r.get("layer") or r.get("network")
    print(f"{label:15s} {'x'.join(map(str, r['shape'])):16s} {r['format']:13s} {ms}  {extra_s}")
    sys.stdout.flush()


def network_cases(quick):
    if quick:
        return [
            ("DynUNet", lambda: DynUNet(widths=(4, 8)), (1, 1, 16, 16, 16)),
            ("StyleNet", lambda: StyleNet(width=4, blocks=1), (1, 3, 32, 32)),
        ]
    return [
        ("DynUNet", DynUNet, (1, 1, 96, 96, 96)),
        ("StyleNet", StyleNet, (1, 3, 256, 256)),
    ]


def end_to_end(args):
    rows = []
    for name, make, shape in network_cases(args.quick):
        if args.network and name != args.network:
            continue
        torch.manual_seed(0)
        theirs = make().eval()
        ours = bridge.convert(copy.deepcopy(theirs)).eval()
        n_norms = sum(type(m) in bridge._TO_TORCH for m in ours.modules())
        base = torch.randn(shape, generator=torch.Generator().manual_seed(1))
        for cl in (False, True):
            fmt = CL[len(shape)] if cl else torch.contiguous_format
            x = base.to(memory_format=fmt)
            nets = {
                "torch": copy.deepcopy(theirs).to(memory_format=fmt),
                "ours": copy.deepcopy(ours).to(memory_format=fmt),
            }
            configs = {}
            compile_s = {}
            for k, net in nets.items():
                configs[f"{k} eager"] = lambda net=net, x=x: run_inference(net, x)
            if not args.quick and not args.no_compile:
                for k, net in nets.items():
                    torch._dynamo.reset()
                    compiled = torch.compile(net, fullgraph=True)
                    t0 = time.perf_counter()
                    run_inference(compiled, x)
                    compile_s[k] = time.perf_counter() - t0
                    configs[f"{k} compiled"] = lambda c=compiled, x=x: run_inference(c, x)
            with torch.no_grad():
                err = (nets["ours"](x) - nets["torch"](x)).abs().max().item()
            med, n = run_blocks(configs, args.budget_net, 3, 1)
            row = {
                "network": name,
                "shape": list(shape),
                "format": "channels_last" if cl else "contiguous",
                "instance_norms": n_norms,
                "ms": med,
                "calls": n,
                "max_abs_diff": err,
                "compile_s": compile_s,
                "speedup_eager": med["torch eager"] / med["ours eager"],
            }
            if "ours compiled" in med:
                row["speedup_compiled"] = med["torch compiled"] / med["ours compiled"]
                row["ours_compiled_vs_torch_eager"] = med["torch eager"] / med["ours compiled"]
            rows.append(row)
            print_row(row)
    return rows


def run_inference(net, x):
    with torch.no_grad():
        net(x)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--budget", type=float, default=1.0, help="seconds per layer block")
    p.add_argument("--budget-net", type=float, default=3.0, help="seconds per network block")
    p.add_argument("--quick", action="store_true", help="tiny shapes, eager only")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    p.add_argument("--only", choices=("layers", "networks"), default=None)
    p.add_argument("--network", choices=("DynUNet", "StyleNet"), default=None, help="only this")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    # the library's layer choice first (it loads tbb when installed, before Numba's pool runs)
    layer = instnorm_numba._jit.threading_layer()
    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    meta = {
        "torch": torch.__version__,
        "numba": numba.__version__,
        "numpy": np.__version__,
        "instnorm_numba": instnorm_numba.__version__,
        "python": platform.python_version(),
        "threads": args.threads,
        "threading_layer": layer,
        "cpu": platform.processor() or platform.machine(),
        "loadavg": os.getloadavg(),
    }
    print(json.dumps(meta))
    res = {"meta": meta}
    if args.only in (None, "layers"):
        res["layers"] = per_layer(args)
    if args.only in (None, "networks"):
        res["networks"] = end_to_end(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
