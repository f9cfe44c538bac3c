"""Run every asv benchmark body once, on small shapes, so the suite cannot rot.

No timing is asserted (this machine is shared): the test only proves that each ``setup`` and
each ``time_`` / ``peakmem_`` method runs for every parameter combination.  A benchmark whose
setup raises ``NotImplementedError`` (a missing optional peer, a dtype a peer lacks) is asv's
"skipped" and counts as run.
"""

from __future__ import annotations

import importlib
import inspect
import itertools
import pathlib
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _benchmark_modules():
    sys.path.insert(0, str(ROOT))
    try:
        package = importlib.import_module("benchmarks")
        names = sorted(p.stem for p in (ROOT / "benchmarks").glob("bench_*.py"))
        return package, [importlib.import_module(f"benchmarks.{n}") for n in names]
    finally:
        sys.path.remove(str(ROOT))


def _cases():
    _, modules = _benchmark_modules()
    for mod in modules:
        for name, cls in inspect.getmembers(mod, inspect.isclass):
            if cls.__module__ != mod.__name__:
                continue
            methods = [m for m in dir(cls) if m.startswith(("time_", "peakmem_", "mem_"))]
            if methods:
                yield pytest.param(cls, methods, id=f"{mod.__name__.split('.')[-1]}.{name}")


@pytest.fixture
def small_shapes(monkeypatch):
    """The suite on the table's small stand-ins (same ranks) of every shape."""
    common = importlib.import_module("benchmarks.common")
    monkeypatch.setattr(common, "SMALL", True)
    for helper in common.CACHED:
        helper.cache_clear()
    yield common
    for helper in common.CACHED:
        helper.cache_clear()


@pytest.mark.parametrize(("cls", "methods"), list(_cases()))
def test_every_benchmark_body_runs(cls, methods, small_shapes):
    params = getattr(cls, "params", [[]])
    combos = list(itertools.product(*params)) if params and params[0] else [()]
    ran = 0
    for combo in combos:
        bench = cls()
        if hasattr(bench, "setup"):
            try:
                bench.setup(*combo)
            except NotImplementedError:
                continue  # asv: skipped for these parameters
        for m in methods:
            getattr(bench, m)(*combo)
            ran += 1
        if hasattr(bench, "teardown"):
            bench.teardown(*combo)
    optional = cls.__name__ in {"Torch", "TorchBackward", "OnnxRuntime", "OpenVINO", "JAX"}
    assert ran or optional, f"{cls.__name__}: every parameter combination was skipped"


def test_bench_summary_names_worst_cases_and_unreachable_targets():
    from instnorm_numba._bench import Result, _ratios, summary

    def result(case, direction, ms, layout="channels_first", dtype="float32"):
        r = Result(case, direction, [1], dtype, layout, 1.0, 2, dict(ms))
        _ratios(r)
        return r

    fwd = {"ours": 1.2, "ours_alloc": 1.8, "copy": 1, "onnxruntime": 1.5, "torch": 6}
    results = [
        # ORT within 1.5x of the copy: 2x ORT is out of reach there, and only there
        result("near", "forward", fwd),
        result("far", "forward", {"ours": 3.0, "ours_alloc": 3.0, "copy": 1, "jax": 9.0}),
        result("near", "backward", {"ours": 3.0, "copy": 1.5, "torch": 6.0}),
        result("far", "backward", {"ours": 5.0, "copy": 1.5, "torch": 9.0}, "channels_last"),
    ]
    lines = summary(results)
    assert "alloc/out, every case (target <= 1.2): 1.50 (near)" in lines
    assert "fastest peer/ours with out= (target >= 2): 1.25 (near, ORT)" in lines
    assert "fastest peer/ours allocating (target >= 2): 0.83 (near, ORT)" in lines
    assert "backward/floor, channels-first (target <= 2): 2.00 (near)" in lines
    assert "backward/floor, channels-last (target <= 2.5): 3.33 (far)" in lines
    assert "torch/ours, backward (target >= 2): 1.80 (far)" in lines
    reach = [line for line in lines if "peer/copy below 2" in line]
    assert reach == ["  peer/copy below 2 (beyond reach without beating the copy): near ORT 1.50"]
    assert results[1].notes["fastest peer"] == "jax" and results[1].ratios["peer/ours"] == 3.0


def test_bench_and_asv_read_one_table():
    from instnorm_numba import _bench, benchmark

    common = importlib.import_module("benchmarks.common")
    assert common.PARAMS == [
        list(benchmark.SHAPES),
        list(benchmark.DTYPES),
        list(benchmark.LAYOUTS),
    ]
    assert _bench.SUITE is benchmark.SUITE
    assert {c.id for c in benchmark.SUITE} == set(benchmark.SHAPES)
    for c in benchmark.SUITE:
        small = benchmark.Case(c.id, c.dtype, c.layout, small=True)
        assert len(small.shape) == len(c.shape) and small.C <= c.C
    names = [c.name for c in benchmark.SUITE]
    assert len(set(names)) == len(names)
    assert any(c.layout == "channels_last" and len(c.shape) == 5 for c in benchmark.SUITE)


def test_bench_times_each_implementation_in_its_own_blocks(monkeypatch):
    from instnorm_numba import _bench

    monkeypatch.setattr(_bench, "SETTLE", 0.0)
    log = []
    fns = {name: (lambda name=name: log.append(name)) for name in ("a", "b", "c")}
    ms = _bench.time_blocks(fns, 3, budget=0.01)
    assert set(ms) == {"a", "b", "c"} and all(v >= 0 for v in ms.values())
    # two passes, the second reversed; each block: 2 warm-up calls, then 3 timed ones
    blocks = [log[i : i + 5] for i in range(0, len(log), 5)]
    assert [b[0] for b in blocks] == ["a", "b", "c", "c", "b", "a"]
    assert all(len(set(b)) == 1 and len(b) == 5 for b in blocks)


def test_bench_case_runs_and_checks_itself():
    from instnorm_numba import _bench, benchmark

    for layout in benchmark.LAYOUTS:
        case = benchmark.Case("batch", layout=layout, backward=True, small=True)
        fwd, bwd = _bench.run_case(case, repeat=2, budget=0.01, threads=1, peers=False)
        assert {"ours", "ours_alloc", "copy", "reference"} <= set(fwd.ms)
        assert fwd.ratios["ours/copy"] > 0 and fwd.ratios["alloc/out"] > 0
        assert fwd.max_error_eps <= 1.0
        assert bwd.direction == "backward" and {"ours", "copy"} <= set(bwd.ms)
        assert bwd.max_error_eps <= 1.0


@pytest.mark.parametrize("name", ["torch", "onnxruntime", "openvino", "jax"])
def test_every_peer_computes_instance_norm(name):
    """Each peer, when installed, computes the same normalization on the table's data (so the
    bench times the right thing); skipped only when the peer is not installed."""
    from instnorm_numba import benchmark, reference

    module = {"onnxruntime": "onnxruntime", "openvino": "openvino"}.get(name, name)
    pytest.importorskip(module, reason=f"{module} is not installed")
    for layout in benchmark.LAYOUTS:
        case = benchmark.Case("batch", layout=layout, small=True)
        x, w, b = benchmark.make_input(case)
        fn, why = benchmark.peer_forward(name, x, w, b, case.channel_axis, 1)
        assert fn is not None, why
        y = fn()
        if name == "torch":
            y = y.movedim(1, -1).numpy() if layout == "channels_last" else y.numpy()
        elif name == "onnxruntime":
            y = y[0]
        elif name == "openvino":
            y = next(iter(y.values()))
        y = np.asarray(y)
        exact = reference.instance_norm(x, w, b, channel_axis=case.channel_axis)
        assert y.shape == x.shape
        np.testing.assert_allclose(y, exact, rtol=1e-4, atol=1e-4)
