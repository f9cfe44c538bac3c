"""``instnorm-numba bench``: realistic shapes, checked against the reference, timed side by side.

In one process and with one thread count for everyone, each case of the suite times:

* ``ours``: :func:`instnorm_numba.instance_norm` with ``out=`` (a preallocated result) and
  without it (one fresh output array per call);
* ``copy``: the roofline, a parallel Numba copy of the same bytes into a preallocated buffer.
  Instance normalization reads every element and writes every element, so it cannot beat this;
* ``ref``: the NumPy reference (:mod:`instnorm_numba.reference`, extended precision);
* the peers, when importable: PyTorch CPU ``F.instance_norm`` and ONNX Runtime CPU
  ``InstanceNormalization``.

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
from ._jit import dispatch, kernel, num_threads

# --------------------------------------------------------------------------------------------
# the suite


@dataclass(frozen=True)
class Case:
    name: str
    shape: tuple
    dtype: str = "float32"
    channel_axis: int = 1

    @property
    def layout(self) -> str:
        return "channels-last" if self.channel_axis == -1 else "channels-first"

    @property
    def C(self) -> int:
        return self.shape[self.channel_axis]


SUITE = (
    Case("style transfer", (1, 64, 256, 256)),
    Case("batch", (8, 32, 64, 64)),
    Case("audio", (16, 80, 3000)),
    Case("3-D", (2, 32, 64, 64, 64)),
    Case("tiny instances", (256, 256, 4, 4)),
    Case("few huge", (1, 3, 2048, 2048)),
    Case("channels-last", (1, 256, 256, 64), channel_axis=-1),
    Case("style float64", (1, 64, 256, 256), "float64"),
    Case("style float16", (1, 64, 256, 256), "float16"),
)

#: the backward pass is timed on these cases (when ``instance_norm_backward`` exists)
BACKWARD_CASES = ("style transfer", "batch", "audio", "channels-last")

#: instances checked against the extended-precision reference hold at most this many elements
CHECK_ELEMENTS = 1 << 22


def make_input(case: Case, seed: int = 0):
    """Deterministic data: per-channel offsets and scales around unit normal noise."""
    rng = np.random.default_rng(seed)
    C = case.C
    x = rng.standard_normal(case.shape, dtype=np.float32)
    shape = [1] * len(case.shape)
    shape[case.channel_axis] = C
    scale = rng.uniform(0.5, 4.0, C).astype(np.float32).reshape(shape)
    offset = rng.uniform(-3.0, 3.0, C).astype(np.float32).reshape(shape)
    x = (x * scale + offset).astype(case.dtype)
    weight = rng.uniform(0.5, 1.5, C)
    bias = rng.uniform(-0.5, 0.5, C)
    return x, weight, bias


# --------------------------------------------------------------------------------------------
# the roofline


@kernel(fastmath=False, parallel=True)
def _copy_kernel(src, dst, nchunks):
    n = src.shape[0]
    chunk = (n + nchunks - 1) // nchunks
    for t in numba.prange(nchunks):
        s = min(t * chunk, n)
        e = min(s + chunk, n)
        a = src[s:e]
        b = dst[s:e]
        for i in range(a.shape[0]):
            b[i] = a[i]


def roofline_copy(src: np.ndarray, dst: np.ndarray) -> None:
    """Parallel copy of ``src`` into ``dst`` (same shape, C-contiguous): the speed limit."""
    a = src.reshape(-1)
    b = dst.reshape(-1)
    # the same bytes in the widest words: the fastest copy is the honest speed limit
    for word in (np.uint64, np.uint32, np.uint16):
        if a.nbytes % np.dtype(word).itemsize == 0:
            a, b = a.view(word), b.view(word)
            break
    threads = num_threads()
    nchunks = max(1, min(4 * threads, a.size // 4096))
    dispatch(_copy_kernel, nchunks > 1, a, b, nchunks)


# --------------------------------------------------------------------------------------------
# peers


def _torch():
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None
    return torch, F


def torch_forward(case: Case, x, weight, bias, threads: int):
    """A callable running PyTorch's ``F.instance_norm`` on ``x``, or a reason it cannot."""
    mods = _torch()
    if mods is None:
        return None, "not installed"
    torch, F = mods
    torch.set_num_threads(threads)
    t = torch.from_numpy(x)
    if case.channel_axis == -1:  # NHWC memory, NCHW logical shape: torch's channels_last
        t = t.movedim(-1, 1)
    w = torch.from_numpy(weight.astype(x.dtype))
    b = torch.from_numpy(bias.astype(x.dtype))

    def run():
        with torch.no_grad():
            return F.instance_norm(t, weight=w, bias=b, eps=1e-5)

    try:
        run()
    except (RuntimeError, TypeError) as exc:
        return None, f"unsupported: {str(exc).splitlines()[0][:60]}"
    return run, None


def torch_backward(case: Case, x, weight, dy, threads: int):
    """A callable timing only PyTorch's autograd backward of ``F.instance_norm``."""
    mods = _torch()
    if mods is None:
        return None, "not installed"
    torch, F = mods
    torch.set_num_threads(threads)
    t = torch.from_numpy(x.copy())
    g = torch.from_numpy(dy)
    if case.channel_axis == -1:
        t, g = t.movedim(-1, 1), g.movedim(-1, 1)
    t.requires_grad_(True)
    w = torch.from_numpy(weight.astype(x.dtype)).requires_grad_(True)
    b = torch.zeros_like(w).requires_grad_(True)
    y = F.instance_norm(t, weight=w, bias=b, eps=1e-5)

    def run():
        return torch.autograd.grad(y, (t, w, b), g, retain_graph=True)

    try:
        run()
    except (RuntimeError, TypeError) as exc:
        return None, f"unsupported: {str(exc).splitlines()[0][:60]}"
    return run, None


def ort_forward(case: Case, x, weight, bias, threads: int):
    """A callable running ONNX Runtime's CPU ``InstanceNormalization`` on ``x``.

    ONNX is channels-first only: for channels-last input the graph is the one a user would
    build, ``Transpose -> InstanceNormalization -> Transpose``.
    """
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return None, "not installed"
    elem = {
        np.float32: TensorProto.FLOAT,
        np.float64: TensorProto.DOUBLE,
        np.float16: TensorProto.FLOAT16,
    }[x.dtype.type]
    nd = x.ndim
    inits = [
        numpy_helper.from_array(weight.astype(x.dtype), "scale"),
        numpy_helper.from_array(bias.astype(x.dtype), "B"),
    ]
    nodes = []
    src = "x"
    if case.channel_axis == -1:
        perm = [0, nd - 1, *range(1, nd - 1)]
        nodes.append(helper.make_node("Transpose", ["x"], ["xt"], perm=perm))
        src = "xt"
    dst = "y" if case.channel_axis != -1 else "yt"
    nodes.append(
        helper.make_node("InstanceNormalization", [src, "scale", "B"], [dst], epsilon=1e-5)
    )
    if case.channel_axis == -1:
        nodes.append(helper.make_node("Transpose", ["yt"], ["y"], perm=[0, *range(2, nd), 1]))
    graph = helper.make_graph(
        nodes,
        "instnorm",
        [helper.make_tensor_value_info("x", elem, list(x.shape))],
        [helper.make_tensor_value_info("y", elem, list(x.shape))],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 9)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    try:
        sess = ort.InferenceSession(
            model.SerializeToString(), so, providers=["CPUExecutionProvider"]
        )
        feed = {"x": x}
        sess.run(None, feed)
    except Exception as exc:  # onnxruntime raises its own exception types
        msg = str(exc).splitlines()[0]
        return None, "unsupported: " + (msg[msg.find("Could not find") :] or msg)[:60]

    def run():
        return sess.run(None, feed)

    return run, None


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


def _check_subset(case: Case, x, weight, bias):
    """Channel indices checked against the reference: all, or as many as fit the budget."""
    per_channel = x.size // case.C
    k = max(1, min(case.C, CHECK_ELEMENTS // max(per_channel, 1)))
    return np.linspace(0, case.C - 1, k).round().astype(int) if k < case.C else slice(None)


def max_error(case: Case, x, weight, bias, y) -> float:
    sel = _check_subset(case, x, weight, bias)
    ax = case.channel_axis % x.ndim
    idx = [slice(None)] * x.ndim
    idx[ax] = sel
    idx = tuple(idx)
    exact = reference.instance_norm(
        x[idx], weight[sel], bias[sel], channel_axis=case.channel_axis, exact=True
    )
    return reference.ulp_error(y[idx], exact, x.dtype)


def max_error_backward(case: Case, x, weight, dy, grads) -> float:
    sel = _check_subset(case, x, weight, None)
    ax = case.channel_axis % x.ndim
    idx = [slice(None)] * x.ndim
    idx[ax] = sel
    idx = tuple(idx)
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
        for name, make in (("torch", torch_forward), ("onnxruntime", ort_forward)):
            fn, why = make(case, x, weight, bias, threads)
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
        sel = _check_subset(case, x, weight, bias)
        res.checked_fraction = 1.0 if isinstance(sel, slice) else len(sel) / case.C
    _ratios(res)
    results = [res]

    backward = _backward_fn()
    if backward is not None and case.name in BACKWARD_CASES:
        results.append(
            run_backward(
                case,
                backward,
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


def run_backward(case, backward, x, weight, *, repeat, budget, threads, peers, check):
    rng = np.random.default_rng(1)
    dy = rng.standard_normal(x.shape, dtype=np.float32).astype(x.dtype)
    mb = x.nbytes / 1e6
    res = Result(case.name, "backward", list(case.shape), case.dtype, case.layout, mb, threads)
    ax = case.channel_axis
    _, mean, rstd = instance_norm(x, weight, channel_axis=ax, return_stats=True)
    dx = np.empty_like(x)
    holder = {}

    def ours():
        holder["g"] = backward(dy, x, mean, rstd, weight, channel_axis=ax, out=dx)

    fns = {"ours": ours}
    if peers:
        fn, why = torch_backward(case, x, weight, dy, threads)
        if fn is None:
            res.notes["torch"] = why
        else:
            fns["torch"] = fn
    res.ms = {k: v * 1e3 for k, v in time_blocks(fns, repeat, budget).items()}
    # backward reads x and dy and writes dx
    res.gbps = 3 * x.nbytes / (res.ms["ours"] * 1e-3) / 1e9
    if check:
        res.max_error_eps = max_error_backward(case, x, weight, dy, holder["g"])
    _ratios(res)
    return res


def _ratios(res: Result) -> None:
    ms = res.ms
    ours = ms["ours"]
    if "copy" in ms:
        res.ratios["ours/copy"] = ours / ms["copy"]
    if "ours_alloc" in ms:
        res.ratios["alloc/out"] = ms["ours_alloc"] / ours
    for peer in ("reference", "torch", "onnxruntime"):
        if peer in ms:
            res.ratios[f"{peer}/ours"] = ms[peer] / ours


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
    mods = _torch()
    if mods is not None:
        info["torch"] = mods[0].__version__
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return info


def _fmt(v, spec=".2f") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


def table(results: list) -> str:
    """A Markdown table of the results."""
    head = (
        "| case | dir | shape | dtype | MB | ours ms (out=) | ours ms (alloc) | GB/s | copy ms | "
        "ours/copy | ref ms | torch ms | torch/ours | ORT ms | ORT/ours | max err (eps) |"
    )
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in results:
        ms, ra = r.ms, r.ratios
        err = _fmt(r.max_error_eps, ".2f")
        if r.checked_fraction < 1:
            err += f" ({r.checked_fraction:.0%} checked)"
        lines.append(
            "| "
            + " | ".join(
                [
                    r.case,
                    "fwd" if r.direction == "forward" else "bwd",
                    "x".join(map(str, r.shape)) + (" NHWC" if r.layout == "channels-last" else ""),
                    r.dtype,
                    _fmt(r.mb, ".1f"),
                    _fmt(ms.get("ours"), ".3f"),
                    _fmt(ms.get("ours_alloc"), ".3f"),
                    _fmt(r.gbps, ".1f"),
                    _fmt(ms.get("copy"), ".3f"),
                    _fmt(ra.get("ours/copy")),
                    _fmt(ms.get("reference"), ".1f"),
                    _fmt(ms.get("torch"), ".3f"),
                    _fmt(ra.get("torch/ours")),
                    _fmt(ms.get("onnxruntime"), ".3f"),
                    _fmt(ra.get("onnxruntime/ours")),
                    err,
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def summary(results: list, llc_bytes: int = 32 << 20) -> list:
    """The worst ratio for each target of the performance issue, as printable lines."""
    fwd = [r for r in results if r.direction == "forward"]
    lines = []

    def worst(rs, key, largest=True):
        rs = [r for r in rs if key in r.ratios]
        if not rs:
            return None
        pick = max if largest else min
        return pick(rs, key=lambda r: r.ratios[key])

    big = [r for r in fwd if r.mb * 1e6 > llc_bytes]
    checks = [
        (
            "ours/copy, cases larger than the LLC (target <= 1.3)",
            worst(big, "ours/copy"),
            "ours/copy",
        ),
        ("ours/copy, every case (target <= 2)", worst(fwd, "ours/copy"), "ours/copy"),
        (
            "ORT/ours, float32 cases (target >= 2)",
            worst([r for r in fwd if r.dtype == "float32"], "onnxruntime/ours", False),
            "onnxruntime/ours",
        ),
        ("torch/ours, every case (target >= 4)", worst(fwd, "torch/ours", False), "torch/ours"),
    ]
    for label, r, key in checks:
        if r is None:
            lines.append(f"{label}: n/a")
        else:
            lines.append(f"{label}: {r.ratios[key]:.2f} ({r.case})")
    # a peer that is itself within `target` of the copy can only be beaten by that factor by
    # running faster than a copy of the same bytes: name those cases, with the peer's ratio
    for peer, name, target in (("onnxruntime", "ORT", 2.0), ("torch", "torch", 4.0)):
        tight = [
            f"{r.case} {r.ms[peer] / r.ms['copy']:.2f}"
            for r in fwd
            if peer in r.ms and "copy" in r.ms and r.ms[peer] / r.ms["copy"] < target
        ]
        if tight:
            lines.append(
                f"  {name}/copy below {target:g} (beyond reach without beating the copy): "
                + ", ".join(tight)
            )
    bwd = [r for r in results if r.direction == "backward"]
    fwd_ms = {r.case: r.ms["ours"] for r in fwd}
    per_case = [(r.ms["ours"] / fwd_ms[r.case], r.case) for r in bwd if r.case in fwd_ms]
    if per_case:
        v, case = max(per_case)
        lines.append(f"backward/forward (target <= 2): {v:.2f} ({case})")
    r = worst(bwd, "torch/ours", False)
    if r is not None:
        lines.append(f"torch/ours, backward (target >= 3): {r.ratios['torch/ours']:.2f} ({r.case})")
    for dt in ("float16", "float32", "float64"):
        errs = [r.max_error_eps for r in fwd if r.dtype == dt and not math.isnan(r.max_error_eps)]
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
    peers = []
    if "torch" in info:
        peers.append(f"torch {info['torch']}")
    if "onnxruntime" in info:
        peers.append(f"onnxruntime {info['onnxruntime']}")
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
                    f"  {r.case:<16} {r.direction:<8} ours {r.ms['ours']:8.3f} ms"
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
    print("ratios: ours/copy = time of ours (with out=) over the parallel copy of the same bytes;")
    print("        X/ours = time of X over ours (higher is better for us).")
    for line in summary(results):
        print(line)
    print(f"\ntotal {time.perf_counter() - t0:.1f} s")
    bad = [r for r in results if not r.max_error_eps <= (4 if r.dtype == "float64" else 1)]
    bad = [r for r in bad if r.direction == "forward"]
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
