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

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

#: tiny stand-ins for the suite's shapes: same ranks, same channel counts where cheap
SMALL = {
    "style": (1, 4, 16, 16),
    "batch": (2, 3, 8, 8),
    "audio": (2, 5, 30),
    "3d": (1, 2, 4, 4, 4),
    "tiny": (8, 6, 2, 2),
    "huge": (1, 2, 64, 64),
}


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
    common = importlib.import_module("benchmarks.common")
    assert set(SMALL) == set(common.SHAPES), "update SMALL when the suite's cases change"
    monkeypatch.setattr(common, "SHAPES", SMALL)
    for helper in (common.data, common.warm, common.ort_session):
        helper.cache_clear()
    yield common
    for helper in (common.data, common.warm, common.ort_session):
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
    optional = cls.__name__ in {"Torch", "TorchBackward", "OnnxRuntime"}
    assert ran or optional, f"{cls.__name__}: every parameter combination was skipped"


def test_bench_summary_names_worst_cases_and_unreachable_targets():
    from instnorm_numba._bench import Result, _ratios, summary

    def result(case, direction, mb, ms, dtype="float32"):
        r = Result(case, direction, [1], dtype, "channels-first", mb, 2, dict(ms))
        _ratios(r)
        return r

    results = [
        # ORT within 1.5x of the copy: 2x ORT is out of reach there, and only there
        result("near", "forward", 40.0, {"ours": 1.2, "copy": 1, "onnxruntime": 1.5, "torch": 6}),
        result("far", "forward", 4.0, {"ours": 3.0, "copy": 1, "onnxruntime": 9.0, "torch": 9}),
        result("near", "backward", 40.0, {"ours": 3.0, "torch": 6.0}),
        result("far", "backward", 4.0, {"ours": 5.0, "torch": 9.0}),
    ]
    lines = summary(results)
    assert "ours/copy, cases larger than the LLC (target <= 1.3): 1.20 (near)" in lines
    assert "ours/copy, every case (target <= 2): 3.00 (far)" in lines
    assert "ORT/ours, float32 cases (target >= 2): 1.25 (near)" in lines
    assert "torch/ours, every case (target >= 4): 3.00 (far)" in lines
    reach = [line for line in lines if "ORT/copy below 2" in line]
    assert reach == ["  ORT/copy below 2 (beyond reach without beating the copy): near 1.50"]
    assert not any("torch/copy below" in line for line in lines)
    assert "backward/forward (target <= 2): 2.50 (near)" in lines
    assert "torch/ours, backward (target >= 3): 1.80 (far)" in lines


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
    from instnorm_numba import _bench

    case = _bench.Case("small", (2, 3, 8, 8))
    (res,) = _bench.run_case(case, repeat=2, budget=0.01, threads=1, peers=False)[:1]
    assert {"ours", "ours_alloc", "copy", "reference"} <= set(res.ms)
    assert res.ratios["ours/copy"] > 0
    assert res.max_error_eps <= 1.0
