"""``instnorm-numba bench``: realistic shapes, checked against the reference, timed side by side.

The cases, the roofline copy and the peers are in :mod:`instnorm_numba.benchmark` (the table
the asv suite reads too).  In one process and with one thread count for everyone, each case
times:

* ``ours``: :func:`instnorm_numba.instance_norm` with ``out=`` (a preallocated result) and
  without it (``ours_alloc``: a fresh output array per call, as most callers write it);
* ``copy``: the roofline, a parallel Numba copy of the same bytes into a preallocated buffer;
* ``ref``: the NumPy reference (:mod:`instnorm_numba.reference`, extended precision);
* the peers, when importable: PyTorch, ONNX Runtime, OpenVINO and JAX on the CPU.

Each implementation is timed in its own block of back-to-back calls, after untimed calls that
warm it up for SETTLE seconds, and the blocks run twice, the second time in reverse order, so a
slow drift of the machine's speed hits all of them alike.  Calls are not interleaved
round-robin: PyTorch's OpenMP threads keep spinning for milliseconds after each call (as ONNX
Runtime's pool does), and on a machine with few cores that stole a core from whichever
implementation was timed next (ours took 2.0 ms instead of 1.2 ms right after PyTorch).
Every result of ours is compared with the extended-precision reference (for the largest cases
on a subset of channels, which are independent instances): the error column is the largest
``|y - exact| / max(1, |exact|)`` in units of the dtype's machine epsilon.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field

import numba
import numpy as np

from . import reference
from ._api import instance_norm
from ._jit import num_threads
from .benchmark import PEERS, SUITE, Case, make_input, peer_versions, roofline_copy, torch_backward

#: instances checked against the extended-precision reference hold at most this many elements
CHECK_ELEMENTS = 1 << 22

# --------------------------------------------------------------------------------------------
# timing


def _once(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


#: seconds of untimed calls before each block of timed ones
SETTLE = 0.05


def time_blocks(fns: dict, repeat: int | None, budget: float) -> dict:
    """Median seconds of each callable, timed in blocks of back-to-back calls.

    Each callable runs untimed for at least SETTLE seconds (and twice), then ``repeat`` timed
    calls; then every block runs again in reverse order and the median is over both.  With
    ``repeat=None`` a block takes about ``budget / (2 * len(fns))`` seconds, 3 to 150 calls
    (one for a callable slower than that).
    """
    samples = {k: [] for k in fns}
    share = budget / (2 * max(len(fns), 1))
    for order in (list(fns), list(fns)[::-1]):
        for k in order:
            f = fns[k]
            t_end = time.perf_counter() + SETTLE
            warm = [_once(f)]
            while time.perf_counter() < t_end or len(warm) < 2 and warm[0] < share:
                warm.append(_once(f))
            # (the slow NumPy reference gets a single timed call per block)
            fewest = 3 if min(warm) < share else 1
            n = repeat if repeat is not None else int(min(150, max(fewest, share / min(warm))))
            samples[k].extend(_once(f) for _ in range(n))
    return {k: float(np.median(v)) for k, v in samples.items()}


# --------------------------------------------------------------------------------------------
# checking


def _check_subset(case: Case, x):
    """Channel indices checked against the reference: all, or as many as fit the budget."""
    per_channel = x.size // case.C
    k = max(1, min(case.C, CHECK_ELEMENTS // max(per_channel, 1)))
    return np.linspace(0, case.C - 1, k).round().astype(int) if k < case.C else slice(None)


def _checked(case: Case, x):
    """(channel selection, index into x) of the instances checked against the reference."""
    sel = _check_subset(case, x)
    idx = [slice(None)] * x.ndim
    idx[case.channel_axis % x.ndim] = sel
    return sel, tuple(idx)


def max_error(case: Case, x, weight, bias, y) -> float:
    sel, idx = _checked(case, x)
    exact = reference.instance_norm(
        x[idx], weight[sel], bias[sel], channel_axis=case.channel_axis, exact=True
    )
    return reference.ulp_error(y[idx], exact, x.dtype)


def max_error_backward(case: Case, x, weight, dy, grads) -> float:
    sel, idx = _checked(case, x)
    dx, _, _ = reference.instance_norm_backward(
        dy[idx], x[idx], weight[sel], channel_axis=case.channel_axis, exact=True
    )
    # relative to max(1, |dx|): the same measure as the forward error
    return reference.ulp_error(np.asarray(grads[0])[idx], dx, x.dtype)


# --------------------------------------------------------------------------------------------
# running the suite


@dataclass
class Result:
    case: str
    direction: str
    shape: list
    dtype: str
    layout: str
    mb: float
    threads: int
    ms: dict = field(default_factory=dict)  # implementation -> median milliseconds
    ratios: dict = field(default_factory=dict)
    gbps: float = float("nan")
    max_error_eps: float = float("nan")
    checked_fraction: float = 1.0
    notes: dict = field(default_factory=dict)


def _backward_fn():
    import instnorm_numba

    if "instance_norm_backward" in getattr(instnorm_numba, "__all__", ()):
        return instnorm_numba.instance_norm_backward
    return None


def run_case(case: Case, *, repeat, budget, threads, peers=True, check=True) -> list:
    x, weight, bias = make_input(case)
    mb = x.nbytes / 1e6
    res = Result(case.name, "forward", list(case.shape), case.dtype, case.layout, mb, threads)
    out = np.empty_like(x)
    buf = np.empty_like(x)
    ax = case.channel_axis
    fns = {
        "ours": lambda: instance_norm(x, weight, bias, channel_axis=ax, out=out),
        "ours_alloc": lambda: instance_norm(x, weight, bias, channel_axis=ax),
        "copy": lambda: roofline_copy(x, buf),
    }
    if peers:
        for name, make in PEERS.items():
            fn, why = make(x, weight, bias, ax, threads)
            if fn is None:
                res.notes[name] = why
            else:
                fns[name] = fn
    res.ms = {k: v * 1e3 for k, v in time_blocks(fns, repeat, budget).items()}
    ref_repeat = 1 if x.size > (1 << 20) else 3
    res.ms["reference"] = 1e3 * min(
        _once(lambda: reference.instance_norm(x, weight, bias, channel_axis=ax))
        for _ in range(ref_repeat)
    )
    res.gbps = 2 * x.nbytes / (res.ms["ours"] * 1e-3) / 1e9
    if check:
        res.max_error_eps = max_error(case, x, weight, bias, out)
        sel = _check_subset(case, x)
        res.checked_fraction = 1.0 if isinstance(sel, slice) else len(sel) / case.C
    _ratios(res)
    results = [res]
    if case.backward:
        results.append(
            run_backward(
                case,
                x,
                weight,
                repeat=repeat,
                budget=budget,
                threads=threads,
                peers=peers,
                check=check,
            )
        )
    return results


def run_backward(case, x, weight, *, repeat, budget, threads, peers, check):
    from ._api import instance_norm_backward

    rng = np.random.default_rng(1)
    dy = rng.standard_normal(x.shape, dtype=np.float32).astype(x.dtype)
    mb = x.nbytes / 1e6
    res = Result(case.name, "backward", list(case.shape), case.dtype, case.layout, mb, threads)
    ax = case.channel_axis
    _, mean, rstd = instance_norm(x, weight, channel_axis=ax, return_stats=True)
    dx = np.empty_like(x)
    buf = np.empty_like(x)
    holder = {}

    def ours():
        holder["g"] = instance_norm_backward(dy, x, mean, rstd, weight, channel_axis=ax, out=dx)

    # the floor of a backward: read x and dy, write dx, 1.5 times the forward's copy
    fns = {"ours": ours, "copy": lambda: roofline_copy(x, buf)}
    if peers:
        fn, why = torch_backward(x, weight, dy, ax, threads)
        if fn is None:
            res.notes["torch"] = why
        else:
            fns["torch"] = fn
    res.ms = {k: v * 1e3 for k, v in time_blocks(fns, repeat, budget).items()}
    res.ms["copy"] *= 1.5
    res.gbps = 3 * x.nbytes / (res.ms["ours"] * 1e-3) / 1e9
    if check:
        res.max_error_eps = max_error_backward(case, x, weight, dy, holder["g"])
    _ratios(res)
    return res


#: how the peers are named in the table
PEER_LABELS = {"torch": "torch", "onnxruntime": "ORT", "openvino": "OpenVINO", "jax": "JAX"}


def _ratios(res: Result) -> None:
    ms = res.ms
    ours = ms["ours"]
    if "copy" in ms:
        res.ratios["ours/copy"] = ours / ms["copy"]
    if "ours_alloc" in ms:
        res.ratios["alloc/out"] = ms["ours_alloc"] / ours
    for peer in ("reference", *PEERS):
        if peer in ms:
            res.ratios[f"{peer}/ours"] = ms[peer] / ours
    fastest = min((ms[p], p) for p in PEERS if p in ms) if any(p in ms for p in PEERS) else None
    if fastest is not None:
        res.notes["fastest peer"] = fastest[1]
        res.ratios["peer/ours"] = fastest[0] / ours
        if "ours_alloc" in ms:
            res.ratios["peer/alloc"] = fastest[0] / ms["ours_alloc"]


# --------------------------------------------------------------------------------------------
# report


def machine() -> dict:
    from . import __version__
    from ._jit import threading_layer

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "instnorm_numba": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "threading_layer": threading_layer(),
        "threads": num_threads(),
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "platform": platform.platform(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    info.update(peer_versions())
    return info


def _fmt(v, spec=".2f") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


def table(results: list) -> str:
    """A Markdown table of the results: times in ms, ratios above 1 favour us."""
    peers = [p for p in PEERS if any(p in r.ms for r in results)]
    cols = ["case", "dir", "shape", "dtype", "MB", "ours (out=)", "ours (alloc)", "alloc/out"]
    cols += ["GB/s", "copy", "ours/copy", "ref"]
    for p in peers:
        cols += [PEER_LABELS[p], f"{PEER_LABELS[p]}/ours"]
    cols += ["fastest peer/ours (out=, alloc)", "max err (eps)"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in results:
        ms, ra = r.ms, r.ratios
        err = _fmt(r.max_error_eps, ".2f")
        if r.checked_fraction < 1:
            err += f" ({r.checked_fraction:.0%} checked)"
        row = [
            r.case,
            "fwd" if r.direction == "forward" else "bwd",
            "x".join(map(str, r.shape)) + (" CL" if r.layout == "channels_last" else ""),
            r.dtype,
            _fmt(r.mb, ".1f"),
            _fmt(ms.get("ours"), ".3f"),
            _fmt(ms.get("ours_alloc"), ".3f"),
            _fmt(ra.get("alloc/out")),
            _fmt(r.gbps, ".1f"),
            _fmt(ms.get("copy"), ".3f"),
            _fmt(ra.get("ours/copy")),
            _fmt(ms.get("reference"), ".1f"),
        ]
        for p in peers:
            row += [_fmt(ms.get(p), ".3f"), _fmt(ra.get(f"{p}/ours"))]
        best = ""
        if "peer/ours" in ra:
            best = f"{ra['peer/ours']:.2f}"
            if "peer/alloc" in ra:
                best += f", {ra['peer/alloc']:.2f}"
            best += f" ({PEER_LABELS[r.notes['fastest peer']]})"
        row += [best or "-", err]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def summary(results: list) -> list:
    """The worst case for each target of the speed issue, as printable lines."""
    fwd = [r for r in results if r.direction == "forward"]
    bwd = [r for r in results if r.direction == "backward"]
    lines = []

    def worst(rs, key, largest=True):
        rs = [r for r in rs if key in r.ratios]
        if not rs:
            return None
        return (max if largest else min)(rs, key=lambda r: r.ratios[key])

    def say(label, r, key):
        if r is None:
            lines.append(f"{label}: n/a")
        else:
            extra = f", {PEER_LABELS[r.notes['fastest peer']]}" if key.startswith("peer/") else ""
            lines.append(f"{label}: {r.ratios[key]:.2f} ({r.case}{extra})")

    say("alloc/out, every case (target <= 1.2)", worst(fwd, "alloc/out"), "alloc/out")
    say("fastest peer/ours with out= (target >= 2)", worst(fwd, "peer/ours", False), "peer/ours")
    say("fastest peer/ours allocating (target >= 2)", worst(fwd, "peer/alloc", False), "peer/alloc")
    cf = [r for r in bwd if r.layout == "channels_first"]
    cl = [r for r in bwd if r.layout == "channels_last"]
    say("backward/floor, channels-first (target <= 2)", worst(cf, "ours/copy"), "ours/copy")
    say("backward/floor, channels-last (target <= 2.5)", worst(cl, "ours/copy"), "ours/copy")
    say("torch/ours, backward (target >= 2)", worst(bwd, "torch/ours", False), "torch/ours")
    # a peer that is itself within 2x of the copy can only be beaten 2x by beating the copy
    tight = []
    for r in fwd:
        for p in PEERS:
            if p in r.ms and "copy" in r.ms and r.ms[p] / r.ms["copy"] < 2.0:
                tight.append(f"{r.case} {PEER_LABELS[p]} {r.ms[p] / r.ms['copy']:.2f}")
    if tight:
        lines.append(
            "  peer/copy below 2 (beyond reach without beating the copy): " + ", ".join(tight)
        )
    for dt in ("float16", "float32", "float64"):
        errs = [
            r.max_error_eps for r in results if r.dtype == dt and not math.isnan(r.max_error_eps)
        ]
        if errs:
            lines.append(f"worst {dt} error: {max(errs):.3f} eps")
    return lines


def main(args) -> int:
    quick = bool(getattr(args, "quick", False))
    repeat = getattr(args, "repeat", None)
    json_path = getattr(args, "json", None)
    # the library's own choice of threading layer (it may preload tbb), before anything else
    # launches Numba's pool with the default layer
    threads = num_threads()
    budget = 0.15 if quick else 1.5
    info = machine()
    print(
        f"instnorm_numba {info['instnorm_numba']} | numba {info['numba']} "
        f"({info['threading_layer']}) | numpy {info['numpy']} | {threads} threads | "
        f"{info['cpu']}"
    )
    peers = [f"{p} {info[p]}" for p in PEERS if p in info]
    print("peers: " + (", ".join(peers) if peers else "none importable (optional)"))
    if info["load_average"]:
        print("load average: " + " ".join(f"{v:.2f}" for v in info["load_average"]))
    print()
    results = []
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's NHWC / thread notices
        for case in SUITE:
            rs = run_case(case, repeat=repeat, budget=budget, threads=threads)
            results.extend(rs)
            for r in rs:
                notes = "; ".join(f"{k}: {v}" for k, v in r.notes.items())
                print(
                    f"  {r.case:<22} {r.direction:<8} ours {r.ms['ours']:8.3f} ms"
                    + (
                        f"  ours/copy {r.ratios['ours/copy']:.2f}"
                        if "ours/copy" in r.ratios
                        else ""
                    )
                    + f"  err {_fmt(r.max_error_eps)} eps"
                    + (f"  [{notes}]" if notes else ""),
                    flush=True,
                )
    print()
    print(table(results))
    print()
    print("ratios: ours/copy = time of ours (with out=) over the parallel copy of the same bytes")
    print("        (backward: over 1.5 copies, the bytes a backward must move);")
    print("        X/ours = time of X over ours (higher is better for us).")
    for line in summary(results):
        print(line)
    print(f"\ntotal {time.perf_counter() - t0:.1f} s")
    bad = [r for r in results if not r.max_error_eps <= (4 if r.dtype == "float64" else 1)]
    if json_path:
        with open(json_path, "w") as f:
            json.dump(
                {
                    "machine": info,
                    "results": [asdict(r) for r in results],
                    "summary": summary(results),
                },
                f,
                indent=1,
            )
        print(f"wrote {json_path}")
    if bad:
        print(
            "ACCURACY FAILURE: " + ", ".join(f"{r.case} ({r.max_error_eps:.2f} eps)" for r in bad),
            file=sys.stderr,
        )
        return 1
    return 0
