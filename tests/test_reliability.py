"""Reliability (issue 6): threads, fork, thread counts, read-only installs, hostile input,
the error-input table, and leaks.

Anything that could take a process down (fork, workqueue, odd installs) runs in a subprocess
with a timeout, so a crash fails one test instead of killing the run.
"""

from __future__ import annotations

import gc
import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap
import threading
import tracemalloc
import warnings

import numba
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import instnorm_numba
from instnorm_numba import _jit
from instnorm_numba import _kernels as K
from instnorm_numba import reference as ref

PUBLIC = set(instnorm_numba.__all__) - {"__version__"}
HAVE_BACKWARD = "instance_norm_backward" in PUBLIC
HAVE_LAYERS = "InstanceNorm2d" in PUBLIC
SUBPROCESS_TIMEOUT = 600  # a first compile on a loaded 2-core machine takes a while


def _have_pip_tbb() -> bool:
    return _jit._libtbb_path() is not None


# ----------------------------------------------------------------------------------------------
# subprocess plumbing


def run_python(code: str, *, env: dict | None = None, cwd=None, timeout=SUBPROCESS_TIMEOUT):
    """Run ``code`` in a fresh interpreter; a crash or hang comes back as a failed result."""
    full_env = dict(os.environ)
    full_env.pop("NUMBA_THREADING_LAYER", None)
    full_env.setdefault("NUMBA_NUM_THREADS", "2")  # parallel paths even on a 1-core runner
    full_env.update(env or {})
    try:
        return subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)],
            env=full_env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:  # a hang is a failure, not a stuck suite
        pytest.fail(f"subprocess hung for {timeout}s:\n{exc.stdout}\n{exc.stderr}")


def result_of(proc) -> dict:
    """The JSON object the script printed on its last ``RESULT`` line; fails with the output."""
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (
        f"subprocess exited with {proc.returncode}\n--- stdout\n{proc.stdout}\n"
        f"--- stderr\n{proc.stderr}"
    )
    return json.loads(lines[-1][len("RESULT ") :])


# The workloads every concurrency test runs: each public function on inputs large enough for
# the parallel kernels (>= 2**16 elements), each call on its own arrays.  Shared verbatim by the
# in-process tests and the subprocess scripts.
WORKLOADS_SRC = r"""
import numpy as np
import instnorm_numba as inn

def _data(seed, shape, dtype):
    return (np.random.default_rng(seed).standard_normal(shape) * 3 + 1).astype(dtype)

def w_cf_f32(seed):
    return (inn.instance_norm(_data(seed, (2, 8, 64, 64), np.float32)),)

def w_split_f32(seed):  # few long instances: split across threads
    x = _data(seed, (1, 2, 128, 512), np.float32)
    return inn.instance_norm(x, np.arange(1.0, 3.0), np.ones(2), return_stats=True)

def w_cl_f64(seed):
    return (inn.instance_norm(_data(seed, (4, 32, 32, 16), np.float64), channel_axis=-1),)

def w_f16_out(seed):
    x = _data(seed, (2, 4, 96, 96), np.float16)
    out = np.empty_like(x)
    return (inn.instance_norm(x, out=out), out)

def w_running(seed):
    x = _data(seed, (4, 4, 64, 64), np.float64)
    rm, rv = np.zeros(4), np.ones(4)
    y = inn.instance_norm(x, running_mean=rm, running_var=rv, momentum=0.3)
    return y, rm, rv

def w_eval(seed):
    x = _data(seed, (4, 4, 64, 64), np.float32)
    return (inn.instance_norm(x, running_mean=np.full(4, 0.5), running_var=np.full(4, 2.0),
                              use_input_stats=False),)

WORKLOADS = [w_cf_f32, w_split_f32, w_cl_f64, w_f16_out, w_running, w_eval]

if hasattr(inn, "instance_norm_backward"):
    def w_backward(seed):
        x = _data(seed, (2, 8, 64, 64), np.float32)
        dy = _data(seed + 1, x.shape, np.float32)
        w = np.linspace(0.5, 2.0, 8)
        _, mean, rstd = inn.instance_norm(x, w, return_stats=True)
        return inn.instance_norm_backward(dy, x, mean, rstd, w)

    def w_backward_cl(seed):
        x = _data(seed, (2, 64, 64, 8), np.float64)
        dy = _data(seed + 1, x.shape, np.float64)
        _, mean, rstd = inn.instance_norm(x, channel_axis=-1, return_stats=True)
        return inn.instance_norm_backward(dy, x, mean, rstd, channel_axis=-1)

    WORKLOADS += [w_backward, w_backward_cl]

if hasattr(inn, "InstanceNorm2d"):
    def w_layer(seed):
        layer = inn.InstanceNorm2d(8, affine=True, track_running_stats=True)
        x = _data(seed, (2, 8, 64, 64), np.float32)
        y = layer(x)
        res = [y, np.asarray(layer.running_mean), np.asarray(layer.running_var)]
        if hasattr(layer, "backward"):
            res.append(layer.backward(_data(seed + 1, x.shape, np.float32)))
            res += [layer.grad_weight, layer.grad_bias]
        layer.eval()
        res.append(layer(x))
        return tuple(np.asarray(r) if not isinstance(r, tuple) else r for r in res)

    WORKLOADS += [w_layer]

def flatten(res):
    out = []
    for r in res:
        if isinstance(r, tuple):
            out.extend(flatten(r))
        else:
            out.append(np.asarray(r))
    return out

def same(a, b):
    a, b = flatten(a), flatten(b)
    return len(a) == len(b) and all(
        x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y, equal_nan=True)
        for x, y in zip(a, b)
    )
"""

_workloads = {}
exec(compile(WORKLOADS_SRC, "<reliability workloads>", "exec"), _workloads)


def run_concurrently(workloads, same, nthreads=8, reps=4):
    """``nthreads`` threads, each calling its workload ``reps`` times on its own arrays, all
    released at once; returns the names of the (thread, workload) pairs that disagreed with
    the serial result, and any exceptions."""
    serial = {i: workloads[i % len(workloads)](100 + i) for i in range(nthreads)}
    bad, errors = [], []
    barrier = threading.Barrier(nthreads)

    def work(i):
        fn = workloads[i % len(workloads)]
        try:
            barrier.wait()
            for _ in range(reps):
                if not same(fn(100 + i), serial[i]):
                    bad.append(f"thread {i}: {fn.__name__}")
                    return
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(f"thread {i}: {fn.__name__}: {exc!r}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(nthreads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=SUBPROCESS_TIMEOUT)
    hung = [t.name for t in threads if t.is_alive()]
    return bad, errors, hung


def test_workloads_cover_every_public_function():
    names = " ".join(f.__name__ for f in _workloads["WORKLOADS"])
    assert "cf" in names
    if HAVE_BACKWARD:
        assert "backward" in names
    if HAVE_LAYERS:
        assert "layer" in names


# ----------------------------------------------------------------------------------------------
# threads, in this process, under the default layer


def test_threads_match_serial_under_default_layer():
    nthreads = max(8, len(_workloads["WORKLOADS"]))
    bad, errors, hung = run_concurrently(_workloads["WORKLOADS"], _workloads["same"], nthreads)
    assert not hung and not errors and not bad, (hung, errors, bad)
    assert _jit.threading_layer() in ("tbb", "omp", "workqueue")


def test_info_shows_the_threading_layer(capsys):
    from instnorm_numba import cli

    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out.splitlines()
    line = next(ln for ln in out if "threading layer" in ln)
    assert line.split()[2] == _jit.threading_layer()
    from instnorm_numba import _kernels as K

    kernels = next(ln for ln in out if ln.startswith("cpu kernels"))
    assert ("F16C" in kernels and "no F16C" not in kernels) == K.HAS_F16C
    assert ("on (AVX2)" in kernels) == K.HAS_SIMD_ROWS


# ----------------------------------------------------------------------------------------------
# each layer in its own process: threads, fork after a kernel ran, thread counts

LAYER_SCRIPT = (
    WORKLOADS_SRC
    + r"""
import json, multiprocessing as mp, os, sys, threading
import numba
from instnorm_numba import _jit, _kernels as K

# count which twin of every parallel kernel runs
COUNTS = {"parallel": 0, "serial": 0}
def _spy(kind, fn):
    def call(*args):
        COUNTS[kind] += 1
        return fn(*args)
    return call
for pk in vars(K).values():
    if isinstance(pk, _jit.ParallelKernel):
        pk.parallel, pk.serial = _spy("parallel", pk.parallel), _spy("serial", pk.serial)

result = {"layer": _jit.threading_layer(), "requested": os.environ.get("NUMBA_THREADING_LAYER")}
assert numba.get_num_threads() == 2

serial = [fn(7) for fn in WORKLOADS]
result["parent_parallel_calls"] = COUNTS["parallel"]
assert COUNTS["parallel"] > 0, COUNTS  # the parent really ran parallel kernels before forking

# 8+ threads at once, each on its own arrays
nthreads = max(8, len(WORKLOADS))
refs = {i: WORKLOADS[i % len(WORKLOADS)](20 + i) for i in range(nthreads)}
bad = []
barrier = threading.Barrier(nthreads)
def work(i):
    barrier.wait()
    for _ in range(4):
        if not same(WORKLOADS[i % len(WORKLOADS)](20 + i), refs[i]):
            bad.append(i)
            return
ts = [threading.Thread(target=work, args=(i,)) for i in range(nthreads)]
for t in ts: t.start()
for t in ts: t.join()
result["threads_bad"] = bad

# fork after the parent ran kernels (the default start method on Linux before 3.14)
def child(q):
    COUNTS["parallel"] = COUNTS["serial"] = 0
    ok = all(same(fn(7), s) for fn, s in zip(WORKLOADS, serial))
    q.put({"ok": ok, "counts": dict(COUNTS), "info": _jit.describe()})
ctx = mp.get_context("fork")
q = ctx.Queue()
p = ctx.Process(target=child, args=(q,))
p.start()
p.join(300)
result["fork_exitcode"] = p.exitcode
result["fork"] = q.get(timeout=10) if p.exitcode == 0 else None

# the caller's thread count is honoured and never changed
numba.set_num_threads(1)
COUNTS["parallel"] = COUNTS["serial"] = 0
same(WORKLOADS[0](7), serial[0]) or bad.append("k=1")
result["k1_counts"] = dict(COUNTS)
result["k1_after"] = numba.get_num_threads()
numba.set_num_threads(2)
COUNTS["parallel"] = COUNTS["serial"] = 0
WORKLOADS[0](7)
result["k2_counts"] = dict(COUNTS)
result["k2_after"] = numba.get_num_threads()
seen = []
def other():
    numba.set_num_threads(1)
    WORKLOADS[0](8)
    seen.append(numba.get_num_threads())
t = threading.Thread(target=other); t.start(); t.join()
result["other_thread"] = seen
result["main_after_other"] = numba.get_num_threads()
print("RESULT " + json.dumps(result))
"""
)

LAYERS = [
    pytest.param(None, id="default"),
    pytest.param("omp", id="omp"),
    pytest.param("workqueue", id="workqueue"),
    pytest.param(
        "tbb",
        id="tbb",
        marks=pytest.mark.skipif(not _have_pip_tbb(), reason="the tbb package is not installed"),
    ),
]


@pytest.mark.parametrize("layer", LAYERS)
def test_threads_fork_and_thread_count_per_layer(layer):
    env = {"NUMBA_THREADING_LAYER": layer} if layer else {}
    res = result_of(run_python(LAYER_SCRIPT, env=env))
    if layer:
        assert res["layer"] == layer
    elif _have_pip_tbb():
        assert res["layer"] == "tbb"  # pip's libtbb was loaded, so Numba picked tbb
    else:
        assert res["layer"] in ("omp", "workqueue")
    assert res["threads_bad"] == []
    # the forked child survived and computed the parent's results exactly
    assert res["fork_exitcode"] == 0, res
    assert res["fork"]["ok"], res
    if res["layer"] == "omp":  # GNU OpenMP cannot be used after fork: serial twins only
        assert res["fork"]["counts"]["parallel"] == 0 and res["fork"]["counts"]["serial"] > 0
        assert "serial in this process" in res["fork"]["info"]
    else:  # tbb and workqueue survive fork: the child stays parallel
        assert res["fork"]["counts"]["parallel"] > 0
    # numba.set_num_threads(k) honoured, never changed
    assert res["k1_counts"]["parallel"] == 0 and res["k1_counts"]["serial"] > 0
    assert res["k1_after"] == 1
    assert res["k2_counts"]["parallel"] > 0 and res["k2_after"] == 2
    assert res["other_thread"] == [1] and res["main_after_other"] == 2


FORK_CONTROL = r"""
import json, multiprocessing as mp
import numpy as np
import instnorm_numba as inn
from instnorm_numba import _jit

x = np.random.default_rng(0).standard_normal((4, 8, 64, 64))
y = inn.instance_norm(x)
assert _jit.threading_layer() == "omp"

def child(disable_guard):
    if disable_guard:
        _jit._forked_unsafe = False  # what the library did before the fork guard
    ok = np.array_equal(inn.instance_norm(x), y)
    raise SystemExit(0 if ok else 3)

codes = {}
for disable in (False, True):
    p = mp.get_context("fork").Process(target=child, args=(disable,))
    p.start()
    p.join(300)
    codes[str(disable)] = p.exitcode
print("RESULT " + json.dumps(codes))
"""


def test_fork_guard_is_what_keeps_an_openmp_child_alive():
    """Control for the fork test: with the guard switched off, GNU OpenMP kills the child."""
    res = result_of(run_python(FORK_CONTROL, env={"NUMBA_THREADING_LAYER": "omp"}))
    assert res["False"] == 0  # guarded: alive and right
    assert res["True"] not in (0, 3, None)  # unguarded: killed ("fork() ... GNU OpenMP")


WORKQUEUE_CONTROL = r"""
import threading
import numba, numpy as np

@numba.njit(parallel=True, nogil=True)
def total(a):
    s = 0.0
    for i in numba.prange(a.shape[0]):
        s += a[i]
    return s

a = np.ones(1 << 22)
total(a)
ts = [threading.Thread(target=lambda: [total(a) for _ in range(50)]) for _ in range(8)]
for t in ts: t.start()
for t in ts: t.join()
print("RESULT {}")
"""


def test_workqueue_unguarded_aborts_so_the_guard_matters():
    """Control for the workqueue test: a plain parallel Numba function aborts the process."""
    proc = run_python(WORKQUEUE_CONTROL, env={"NUMBA_THREADING_LAYER": "workqueue"})
    assert proc.returncode != 0
    assert "Concurrent access has been detected" in proc.stderr


NO_LAYER_SCRIPT = r"""
import json, warnings
import numpy as np
import instnorm_numba as inn
from instnorm_numba import _jit, reference as ref

_jit._libtbb_path = lambda: None  # as if the tbb package were absent
x = np.random.default_rng(0).standard_normal((2, 8, 64, 128))
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    y = inn.instance_norm(x)
    y2 = inn.instance_norm(x)
err = ref.ulp_error(y, ref.instance_norm(x, exact=True))
print("RESULT " + json.dumps({
    "layer": _jit.threading_layer(), "warnings": [str(m.message) for m in w],
    "err": err, "same": bool(np.array_equal(y, y2)),
}))
"""


def test_no_loadable_layer_warns_once_and_runs_serially():
    res = result_of(run_python(NO_LAYER_SCRIPT, env={"NUMBA_THREADING_LAYER": "tbb"}))
    assert res["layer"] == _jit.NO_LAYER
    assert len(res["warnings"]) == 1 and "threading layer" in res["warnings"][0]
    assert res["err"] <= 4 and res["same"]


def test_user_choice_of_omp_is_respected_even_with_tbb_installed():
    code = """
    import json, numpy as np, instnorm_numba as inn
    from instnorm_numba import _jit
    inn.instance_norm(np.ones((2, 2, 8)))
    print("RESULT " + json.dumps([_jit.threading_layer(), _jit._tbb_preloaded]))
    """
    layer, preloaded = result_of(run_python(code, env={"NUMBA_THREADING_LAYER": "omp"}))
    assert layer == "omp" and preloaded is None


# ----------------------------------------------------------------------------------------------
# installs without a writable cache

READ_ONLY_SCRIPT = r"""
import json, os, sys, warnings
import numpy as np

result = {}
# Numba itself refuses cache=True here (the situation the fallback exists for)
import numba
sys.path.insert(0, os.environ["PROBE_DIR"])
try:
    import probe
    numba.njit(cache=True)(probe.f)
    result["numba_refuses"] = False
except RuntimeError as exc:
    result["numba_refuses"] = "cannot cache" in str(exc)

with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    import instnorm_numba as inn
    from instnorm_numba import _jit, reference as ref
    x = np.random.default_rng(0).standard_normal((2, 3, 5, 7)).astype(np.float32)
    y = inn.instance_norm(x)
    y64 = inn.instance_norm(x.astype(np.float64), channel_axis=-1)
result["file"] = inn.__file__
result["warnings"] = [(m.category.__name__, str(m.message)) for m in w]
result["cache_enabled"] = _jit.cache_enabled()
result["err"] = ref.ulp_error(y, ref.instance_norm(x, exact=True))
result["err64"] = ref.ulp_error(
    y64, ref.instance_norm(x.astype(np.float64), channel_axis=-1, exact=True))
print("RESULT " + json.dumps(result))
"""


def _make_unwritable(tmp: pathlib.Path):
    """Locations nobody, root included, can create a directory in: paths under a regular file
    (``makedirs`` fails with NotADirectoryError whatever the permissions)."""
    blocker = tmp / "blocker"
    blocker.write_text("a regular file, not a directory\n")
    return blocker


def test_read_only_install_imports_and_computes_with_one_warning(tmp_path):
    site = tmp_path / "site"
    pkg = site / "instnorm_numba"
    shutil.copytree(
        pathlib.Path(instnorm_numba.__file__).parent,
        pkg,
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.nbi", "*.nbc"),
    )
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "probe.py").write_text("def f(a):\n    return a + 1\n")
    # __pycache__ as a regular file: Numba's in-tree cache cannot be created even by root;
    # and read-only permissions on top, for the non-root case
    for d in (pkg, probe):
        (d / "__pycache__").write_text("")
    blocker = _make_unwritable(tmp_path)
    for d in (pkg, probe):
        for p in [d, *d.rglob("*")]:
            p.chmod(0o555 if p.is_dir() else 0o444)
    try:
        env = {
            "PYTHONPATH": str(site),
            "PROBE_DIR": str(probe),
            "NUMBA_CACHE_DIR": str(blocker / "numba"),
            "HOME": str(blocker / "home"),
            "XDG_CACHE_HOME": str(blocker / "cache"),
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        res = result_of(run_python(READ_ONLY_SCRIPT, env=env, cwd=tmp_path))
    finally:
        for d in (pkg, probe):
            for p in [d, *d.rglob("*")]:
                p.chmod(0o755 if p.is_dir() else 0o644)
    assert res["numba_refuses"], "the setup did not make Numba's cache unusable"
    assert res["file"].startswith(str(site))  # the read-only copy, not the installed one
    assert len(res["warnings"]) == 1, res["warnings"]
    category, message = res["warnings"][0]
    assert category == "RuntimeWarning" and "no writable cache directory" in message
    assert res["cache_enabled"] is False
    assert res["err"] <= 1 and res["err64"] <= 4
    # nothing was written into the package
    assert not any(p.suffix in (".nbi", ".nbc") for p in pkg.rglob("*"))


# ----------------------------------------------------------------------------------------------
# numba.set_num_threads in this process (the subprocess test covers every layer)


def _spy_parallel_kernels(monkeypatch):
    counts = {"parallel": 0, "serial": 0}

    def spy(kind, fn):
        def call(*args):
            counts[kind] += 1
            return fn(*args)

        return call

    for pk in vars(K).values():
        if isinstance(pk, _jit.ParallelKernel):
            monkeypatch.setattr(pk, "parallel", spy("parallel", pk.parallel))
            monkeypatch.setattr(pk, "serial", spy("serial", pk.serial))
    return counts


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 Numba threads")
def test_set_num_threads_is_honoured_and_restored(monkeypatch):
    counts = _spy_parallel_kernels(monkeypatch)
    x = np.random.default_rng(0).standard_normal((2, 8, 64, 64))
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        y1 = instnorm_numba.instance_norm(x)
        assert counts["parallel"] == 0 and counts["serial"] > 0
        assert numba.get_num_threads() == 1
        numba.set_num_threads(2)
        y2 = instnorm_numba.instance_norm(x)
        assert counts["parallel"] > 0
        assert numba.get_num_threads() == 2
    finally:
        numba.set_num_threads(before)
    assert ref.ulp_error(y1, ref.instance_norm(x, exact=True), scale=None) <= 4
    assert ref.ulp_error(y2, ref.instance_norm(x, exact=True), scale=None) <= 4


# ----------------------------------------------------------------------------------------------
# hostile input, property-tested against the reference

#: the accuracy guarantee (README "Accuracy"), in epsilons of the result dtype, relative to
#: max(1, |y|) -- for float64 also to ``reference.accuracy_scale`` (weight/bias cancellation).
#: float64: 4, as the README promises (hypothesis found 6.6 eps on many-instance inputs before
#: the block means were corrected; test_float64_guarantee_on_many_instances pins those inputs).
TOL_EPS = {np.dtype(np.float16): 1.0, np.dtype(np.float32): 1.0, np.dtype(np.float64): 4.0}

#: running statistics: float32 ones are rounded once from float64 (1 eps); float64 ones carry
#: the variance's own error, ~10 eps on long instances (the unbiased correction and the
#: blend add a few roundings), measured relative to |(1 - m) r| + |m s|
RUNNING_TOL_EPS = {np.dtype(np.float32): 1.0, np.dtype(np.float64): 16.0}

HYPOTHESIS = settings(
    derandomize=True,  # the same examples in CI as here
    max_examples=int(os.environ.get("INSTNORM_HYPOTHESIS_EXAMPLES", "800")),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

X_DTYPES = ["f2", "f4", "f8", ">f2", ">f4", ">f8", "i1", "u1", "i2", ">i4", "i8", "u8", "?"]
VALUE_KINDS = ["normal", "offset", "constant", "extreme", "subnormal", "tiny-spread", "integer"]


def _values(r, shape, dtype: np.dtype, kind: str) -> np.ndarray:
    """float64 values of one kind, representable in ``dtype`` (integers within 2**53)."""
    if dtype.kind == "b":
        return (r.random(shape) > 0.5).astype(np.float64)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        lo, hi = max(info.min, -(2**53)), min(info.max, 2**53)
        if kind in ("offset", "extreme"):
            base = r.integers(lo, hi, dtype=np.int64, endpoint=True)
            v = base + r.integers(-3, 4, shape)
        else:
            v = r.integers(max(lo, -100), min(hi, 100), shape, endpoint=True)
        return np.clip(v, lo, hi).astype(np.float64)
    big = float(np.finfo(dtype).max)
    tiny = float(np.finfo(dtype).smallest_subnormal)
    if kind == "normal":
        v = r.standard_normal(shape) * 10.0 ** r.integers(-3, 4)
    elif kind == "offset":  # far from zero, small spread: a naive sum of squares loses it all
        off = {2: 1e3, 4: 1e6, 8: 1e12}[dtype.itemsize] * r.choice([-1, 1])
        v = off + r.standard_normal(shape) * {2: 4.0, 4: 1.0, 8: 1e-2}[dtype.itemsize]
    elif kind == "constant":
        v = np.full(shape, r.standard_normal() * 100)
    elif kind == "extreme":  # near the dtype's limit (float32: 3e38), both signs
        v = r.uniform(0.5, 1.0, shape) * big * r.choice([-1, 1], shape)
        if dtype.itemsize == 8:
            v *= 1e-160  # float64: the squared spread must stay finite (README "Accuracy")
    elif kind == "subnormal":
        v = r.integers(-20, 21, shape) * tiny
    elif kind == "tiny-spread":  # one instance varying in its last bits
        v = 1.0 + r.integers(0, 3, shape) * float(np.finfo(dtype).eps)
    else:
        v = r.integers(-5, 6, shape).astype(np.float64)
    return v


@st.composite
def cases(draw):
    seed = draw(st.integers(0, 2**32 - 1))
    r = np.random.default_rng(seed)
    ndim = draw(st.integers(3, 5))
    big = draw(st.sampled_from([False] * 9 + [True]))  # now and then: parallel / split paths
    if big:
        shape = [draw(st.integers(1, 2)), draw(st.integers(1, 3))]
        shape += [draw(st.sampled_from([1, 2, 3]))] * (ndim - 3) + [draw(st.integers(23000, 70000))]
    else:
        sizes = st.sampled_from([0, 1, 1, 2, 3, 4, 5, 7])
        shape = [draw(sizes) for _ in range(ndim)]
    axis = draw(st.integers(1, ndim - 1))
    channel_axis = draw(st.sampled_from([axis, axis - ndim]))
    dtype = np.dtype(draw(st.sampled_from(X_DTYPES)))
    kind = draw(st.sampled_from(VALUE_KINDS))
    layout = draw(st.sampled_from(["C", "F", "strided", "reversed", "transposed"]))
    # the values, in a layout
    shape = tuple(shape)
    if layout == "strided":
        full = _values(r, shape[:-1] + (2 * shape[-1] + 1,), dtype, kind)
        vals = full[..., 1::2]
    else:
        vals = _values(r, shape, dtype, kind)
    nonfinite = draw(st.sampled_from(["none"] * 3 + ["nan", "inf", "mixed"]))
    if nonfinite != "none" and dtype.kind == "f" and vals.size:
        k = draw(st.integers(1, 3))
        for _ in range(k):
            idx = tuple(r.integers(0, s) for s in vals.shape)
            bad = {"nan": np.nan, "inf": np.inf * r.choice([-1, 1])}.get(
                nonfinite, r.choice([np.nan, np.inf, -np.inf])
            )
            vals[idx] = bad
    with np.errstate(all="ignore"):
        x = vals.astype(dtype)
    if layout == "F":
        x = np.asfortranarray(x)
    elif layout == "reversed":
        x = x[::-1, ..., ::-1]
    elif layout == "transposed" and ndim >= 4:
        x = np.ascontiguousarray(np.swapaxes(x, -1, -2)).swapaxes(-1, -2)
    C = x.shape[channel_axis]
    kw = {"channel_axis": channel_axis, "eps": draw(st.sampled_from([1e-5, 0.0, 1e-3, 1.0]))}
    if kind == "subnormal" and dtype.itemsize == 8 and kw["eps"] == 0.0:
        # documented limit: float64 statistics are float64, so with eps=0 a spread below
        # ~1e-154 squares to 0 (and one above ~1e154 to inf); eps > 0 is fine
        kw["eps"] = 1e-300
    weight = bias = None
    if draw(st.booleans()):
        weight = (r.standard_normal(C) * 3).astype(draw(st.sampled_from(["f8", "f4", "i4"])))
    if draw(st.booleans()):
        bias = r.standard_normal(C) * 3
    running = draw(st.sampled_from(["none", "none", "update", "eval"]))
    if running != "none":
        rdt = draw(st.sampled_from(["f8", "f4"]))
        kw["running_mean"] = (r.standard_normal(C) * 2).astype(rdt)
        kw["running_var"] = r.uniform(0.1, 5.0, C).astype(rdt)
        kw["use_input_stats"] = running == "update"
        kw["momentum"] = draw(st.sampled_from([0.1, 0.0, 1.0, 0.5]))
    out = draw(st.sampled_from(["none", "none", "fresh", "fresh-F", "alias", "overlap"]))
    return x, weight, bias, kw, out, draw(st.booleans())


def _expect_error(x, kw):
    """The documented exception a case must raise, or None."""
    axis = kw["channel_axis"] % x.ndim
    spatial = int(np.prod([s for i, s in enumerate(x.shape) if i not in (0, axis)]))
    if kw.get("use_input_stats", True) and "running_mean" in kw and spatial <= 1:
        return ValueError, "running statistics"
    return None


@HYPOTHESIS
@given(cases())
def test_hostile_input_matches_reference_or_raises_documented_error(case):
    x, weight, bias, kw, out_kind, return_stats = case
    rdt = ref.result_dtype(x.dtype)
    before = x.copy()
    running_before = {k: kw[k].copy() for k in ("running_mean", "running_var") if k in kw}
    out = None
    x_call = x
    if out_kind == "fresh":
        out = np.full(x.shape, 7, rdt)
    elif out_kind == "fresh-F":
        out = np.asfortranarray(np.full(x.shape, 7, rdt))
    elif out_kind == "alias":
        out = x  # a dtype other than the result dtype must be refused (documented TypeError)
    elif out_kind == "overlap" and x.shape[-1] >= 1 and x.dtype == rdt:
        # x and out are shifted views of one buffer: a partial overlap
        buf = np.zeros(x.shape[:-1] + (x.shape[-1] + 1,), rdt)
        buf[..., :-1] = x
        x_call, out = buf[..., :-1], buf[..., 1:]

    expected_error = _expect_error(x, kw)
    if out is x and x.dtype != rdt:
        expected_error = (TypeError, "out must have dtype")
    if expected_error is not None:
        exc_type, match = expected_error
        with pytest.raises(exc_type, match=match) as info:
            instnorm_numba.instance_norm(x_call, weight, bias, out=out, **kw)
        assert type(info.value) is exc_type
        np.testing.assert_array_equal(x_call, before)
        for k, v in running_before.items():  # nothing half-done on error
            np.testing.assert_array_equal(kw[k], v)
        return

    ref_kw = dict(kw)
    for k in running_before:
        ref_kw[k] = running_before[k].copy()  # the reference updates its own copies
    xin = before.astype(np.float64) if before.dtype.kind in "iub" else before
    exact, emean, erstd = ref.instance_norm(
        xin, weight, bias, return_stats=True, exact=True, **ref_kw
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no stray RuntimeWarning from NaN/Inf input
        res = instnorm_numba.instance_norm(
            x_call, weight, bias, out=out, return_stats=return_stats, **kw
        )
    y, mean, rstd = res if return_stats else (res, None, None)
    assert isinstance(y, np.ndarray) and y.dtype == rdt and y.shape == x.shape
    if out is not None:
        assert y is out
    else:
        np.testing.assert_array_equal(x_call, before)  # the input is unchanged

    scale = None
    if rdt == np.float64:
        scale = ref.accuracy_scale(
            xin, weight, bias, **{k: v for k, v in ref_kw.items() if k != "momentum"}
        )
    with np.errstate(all="ignore"):  # results beyond the dtype's range are correctly +-inf
        overflow = np.isfinite(exact) & np.isinf(exact.astype(rdt))
        exact = np.where(overflow, exact.astype(rdt).astype(exact.dtype), exact)
    err = ref.ulp_error(y, exact, dtype=rdt, scale=scale)
    assert err <= TOL_EPS[rdt], f"error {err:.3g} eps of {rdt}"

    if return_stats:
        assert mean.dtype == rstd.dtype == np.float64 and mean.shape == rstd.shape
        for got, want in ((mean, emean), (rstd, erstd)):
            want = np.asarray(want, dtype=np.float64)
            if not kw.get("use_input_stats", True):
                want = np.broadcast_to(want, got.shape)
            # non-finite exactly where the reference is (the reference's NaN may be -inf
            # here: the mean of [1, -inf, 2] is -inf, and NumPy agrees)
            fin = np.isfinite(want)
            np.testing.assert_array_equal(np.isfinite(got), fin)
            spread = np.where(np.isfinite(erstd) & (erstd > 0), 1 / erstd.astype(np.float64), 0)
            spread = np.broadcast_to(spread, got.shape)
            tol = 1e-13 * (np.abs(want) + spread) + 1e-300
            assert np.all(np.abs(got[fin] - want[fin]) <= tol[fin])

    if running_before and kw["use_input_stats"]:
        # the batch statistic s itself (momentum 1), to scale the error of (1-m) r + m s
        s_kw = {**ref_kw, "momentum": 1.0}
        for k in running_before:
            s_kw[k] = running_before[k].astype(np.float64)
        ref.instance_norm(xin, weight, bias, **s_kw)
    for k, old in running_before.items():  # running statistics updated as the reference does
        got, want = kw[k], ref_kw[k]
        assert got.dtype == old.dtype
        if not kw["use_input_stats"]:
            np.testing.assert_array_equal(got, old)
        else:
            m = kw["momentum"]
            with np.errstate(all="ignore"):
                scale = abs(1 - m) * np.abs(old.astype(np.float64)) + abs(m) * np.abs(s_kw[k])
            # an Inf in the input may give -inf or NaN statistics: non-finite either way
            fin = np.isfinite(want)
            np.testing.assert_array_equal(np.isfinite(got), fin)
            err = ref.ulp_error(got[fin], want[fin], dtype=got.dtype, scale=scale[fin])
            assert err <= RUNNING_TOL_EPS[got.dtype], (k, err, got, want)


@pytest.mark.parametrize(
    "shape,channel_axis", [((1, 4096, 200), 1), ((1, 2, 3, 3, 23000), 4)], ids=["cf", "cl"]
)
def test_float64_guarantee_on_many_instances(shape, channel_axis):
    x = np.random.default_rng(0).standard_normal(shape) * 1e-2
    y = instnorm_numba.instance_norm(x, channel_axis=channel_axis)
    exact = ref.instance_norm(x, channel_axis=channel_axis, exact=True)
    assert ref.ulp_error(y, exact) <= 4.0


# ----------------------------------------------------------------------------------------------
# the error-input table (cf. PyTorch OpInfo ``error_inputs``): every invalid argument of every
# public function, the exact exception type, a message naming the argument, and no side effect


def _x():
    x = np.random.default_rng(3).standard_normal((2, 3, 4))
    return x


def _ro(shape):
    a = np.zeros(shape)
    a.flags.writeable = False
    return a


def _fwd(**kw):
    """instance_norm on a fresh (2, 3, 4) input with ``kw`` (``x`` replaces the input)."""
    x = kw.pop("x", None)
    return lambda: instnorm_numba.instance_norm(_x() if x is None else x, **kw)


def _ragged():
    return [[[1.0, 2.0], [3.0]]]


FWD = "instance_norm"
E = [  # (public name, id, call, exception type, regex the message must match)
    (FWD, "x-str", _fwd(x="abc"), TypeError, r"^x must have a real"),
    (FWD, "x-ragged", _fwd(x=_ragged()), TypeError, r"^x must be an array_like"),
    (FWD, "x-none", _fwd(x=np.array(None)), TypeError, r"^x must have a real"),
    (FWD, "x-complex", _fwd(x=np.ones((2, 3, 4), complex)), TypeError, r"^x must .*complex128"),
    (FWD, "x-object", _fwd(x=np.ones((2, 3, 4), object)), TypeError, r"^x must .*object"),
    (FWD, "x-datetime", _fwd(x=np.zeros((2, 3, 4), "M8[s]")), TypeError, r"^x must .*datetime"),
    (FWD, "x-longdouble", _fwd(x=np.ones((2, 3, 4), np.longdouble)), TypeError, r"^x has dtype"),
    (FWD, "x-2d", _fwd(x=np.ones((2, 3))), ValueError, r"^x must have at least 3 dim.*ndim=2"),
    (FWD, "x-0d", _fwd(x=np.float64(1.0)), ValueError, r"^x must have at least 3 dim.*ndim=0"),
    (FWD, "weight-shape", _fwd(weight=np.ones(4)), ValueError, r"^weight must have shape \(3,\)"),
    (FWD, "weight-2d", _fwd(weight=np.ones((1, 3))), ValueError, r"^weight must have shape"),
    (FWD, "weight-scalar", _fwd(weight=2.0), ValueError, r"^weight must have shape .* \(\)"),
    (FWD, "weight-complex", _fwd(weight=np.ones(3, complex)), TypeError, r"^weight must .*complex"),
    (FWD, "weight-str", _fwd(weight="abc"), TypeError, r"^weight must have a real"),
    (FWD, "weight-ragged", _fwd(weight=[[1.0], [2.0, 3.0]]), TypeError, r"^weight must be None or"),
    (FWD, "bias-shape", _fwd(bias=np.ones(2)), ValueError, r"^bias must have shape \(3,\)"),
    (FWD, "bias-object", _fwd(bias=np.array([1, 2, None], object)), TypeError, r"^bias must"),
    (FWD, "eps-negative", _fwd(eps=-1.0), ValueError, r"^eps must be >= 0"),
    (FWD, "eps-nan", _fwd(eps=float("nan")), ValueError, r"^eps must be finite"),
    (FWD, "eps-inf", _fwd(eps=float("inf")), ValueError, r"^eps must be finite"),
    (FWD, "eps-str", _fwd(eps="1e-5"), TypeError, r"^eps must be a real number"),
    (FWD, "eps-bool", _fwd(eps=True), TypeError, r"^eps must be a real number"),
    (FWD, "eps-none", _fwd(eps=None), TypeError, r"^eps must be a real number"),
    (FWD, "eps-array", _fwd(eps=np.array([1e-5])), TypeError, r"^eps must be a real number"),
    (FWD, "eps-complex", _fwd(eps=1j), TypeError, r"^eps must be a real number"),
    (FWD, "axis-batch", _fwd(channel_axis=0), ValueError, r"^channel_axis=0 names axis 0"),
    (FWD, "axis-batch-neg", _fwd(channel_axis=-3), ValueError, r"^channel_axis=-3 names axis 0"),
    (FWD, "axis-high", _fwd(channel_axis=3), ValueError, r"^channel_axis=3 is out of range"),
    (FWD, "axis-low", _fwd(channel_axis=-4), ValueError, r"^channel_axis=-4 is out of range"),
    (FWD, "axis-float", _fwd(channel_axis=1.0), TypeError, r"^channel_axis must be an integer"),
    (FWD, "axis-bool", _fwd(channel_axis=True), TypeError, r"^channel_axis must be an integer"),
    (FWD, "axis-none", _fwd(channel_axis=None), TypeError, r"^channel_axis must be an integer"),
    (FWD, "axis-str", _fwd(channel_axis="1"), TypeError, r"^channel_axis must be an integer"),
    (
        FWD,
        "running-mean-only",
        _fwd(running_mean=np.zeros(3)),
        ValueError,
        r"running_mean and running_var go together: only running_mean",
    ),
    (
        FWD,
        "running-var-only",
        _fwd(running_var=np.ones(3)),
        ValueError,
        r"running_mean and running_var go together: only running_var",
    ),
    (
        FWD,
        "eval-without-running",
        _fwd(use_input_stats=False),
        ValueError,
        r"^use_input_stats=False needs running_mean and running_var",
    ),
    (
        FWD,
        "use-input-stats-str",
        _fwd(use_input_stats="yes"),
        TypeError,
        r"^use_input_stats must be a bool",
    ),
    (
        FWD,
        "use-input-stats-int",
        _fwd(use_input_stats=1),
        TypeError,
        r"^use_input_stats must be a bool",
    ),
    (
        FWD,
        "use-input-stats-none",
        _fwd(use_input_stats=None),
        TypeError,
        r"^use_input_stats must be a bool",
    ),
    (
        FWD,
        "running-mean-list-updated",
        _fwd(running_mean=[0.0] * 3, running_var=np.ones(3)),
        TypeError,
        r"^running_mean must be a numpy.ndarray",
    ),
    (
        FWD,
        "running-var-list-updated",
        _fwd(running_mean=np.zeros(3), running_var=[1.0] * 3),
        TypeError,
        r"^running_var must be a numpy.ndarray",
    ),
    (
        FWD,
        "running-mean-shape",
        _fwd(running_mean=np.zeros(4), running_var=np.ones(3)),
        ValueError,
        r"^running_mean must have shape \(3,\)",
    ),
    (
        FWD,
        "running-var-shape",
        _fwd(running_mean=np.zeros(3), running_var=np.ones(4)),
        ValueError,
        r"^running_var must have shape \(3,\)",
    ),
    (
        FWD,
        "running-mean-int",
        _fwd(running_mean=np.zeros(3, int), running_var=np.ones(3)),
        TypeError,
        r"^running_mean must have a float16, float32 or float64 dtype",
    ),
    (
        FWD,
        "running-var-complex",
        _fwd(running_mean=np.zeros(3), running_var=np.ones(3, complex)),
        TypeError,
        r"^running_var must have a float16, float32 or float64 dtype",
    ),
    (
        FWD,
        "running-mean-longdouble",
        _fwd(running_mean=np.zeros(3, np.longdouble), running_var=np.ones(3)),
        TypeError,
        r"^running_mean must have a float16, float32 or float64 dtype",
    ),
    (
        FWD,
        "running-mean-read-only-updated",
        _fwd(running_mean=_ro(3), running_var=np.ones(3)),
        ValueError,
        r"^running_mean is read-only",
    ),
    (
        FWD,
        "running-var-read-only-updated",
        _fwd(running_mean=np.zeros(3), running_var=_ro(3)),
        ValueError,
        r"^running_var is read-only",
    ),
    (
        FWD,
        "running-mean-shape-eval",
        _fwd(running_mean=np.zeros(4), running_var=np.ones(3), use_input_stats=False),
        ValueError,
        r"^running_mean must have shape",
    ),
    (
        FWD,
        "running-mean-str-eval",
        _fwd(running_mean="abc", running_var=np.ones(3), use_input_stats=False),
        TypeError,
        r"^running_mean must have a float",
    ),
    (
        FWD,
        "running-spatial-1",
        _fwd(x=np.ones((2, 3, 1)), running_mean=np.zeros(3), running_var=np.ones(3)),
        ValueError,
        r"running_mean, running_var with use_input_stats=True",
    ),
    (FWD, "momentum-nan", _fwd(momentum=float("nan")), ValueError, r"^momentum must be finite"),
    (FWD, "momentum-str", _fwd(momentum="0.1"), TypeError, r"^momentum must be a real number"),
    (FWD, "momentum-none", _fwd(momentum=None), TypeError, r"^momentum must be a real number"),
    (FWD, "out-list", _fwd(out=[[[0.0]]]), TypeError, r"^out must be a numpy.ndarray or None"),
    (FWD, "out-shape", _fwd(out=np.zeros((2, 3, 5))), ValueError, r"^out must have shape"),
    (
        FWD,
        "out-dtype",
        _fwd(out=np.zeros((2, 3, 4), np.float32)),
        TypeError,
        r"^out must have dtype float64",
    ),
    (
        FWD,
        "out-byteswapped",
        _fwd(out=np.zeros((2, 3, 4), ">f8")),
        TypeError,
        r"^out must have dtype float64",
    ),
    (FWD, "out-read-only", _fwd(out=_ro((2, 3, 4))), ValueError, r"^out is read-only"),
    (
        FWD,
        "out-alias-int-input",
        _fwd(x=np.ones((2, 3, 4), np.int64), out=np.ones((2, 3, 4), int)),
        TypeError,
        r"^out must have dtype float64",
    ),
    (FWD, "return-stats-str", _fwd(return_stats="no"), TypeError, r"^return_stats must be a bool"),
    (FWD, "return-stats-none", _fwd(return_stats=None), TypeError, r"^return_stats must be a bool"),
    (
        FWD,
        "unknown-keyword",
        _fwd(epsilon=1.0),
        TypeError,
        r"unexpected keyword argument 'epsilon'",
    ),
    (
        FWD,
        "eps-positional",
        lambda: instnorm_numba.instance_norm(_x(), None, None, 1e-5),
        TypeError,
        r"positional argument",
    ),
]

if HAVE_BACKWARD:
    BWD = "instance_norm_backward"

    def _bwd(**kw):
        def call():
            x = kw.pop("x", None)
            x = _x() if x is None else x
            args = {
                "grad_output": np.ones((2, 3, 4)),
                "mean": np.zeros((2, 3)),
                "rstd": np.ones((2, 3)),
            }
            args.update(kw)
            return instnorm_numba.instance_norm_backward(
                args.pop("grad_output"), x, args.pop("mean"), args.pop("rstd"), **args
            )

        return call

    E += [
        (
            BWD,
            "grad-output-shape",
            _bwd(grad_output=np.ones((2, 3, 5))),
            ValueError,
            r"^grad_output must have shape \(2, 3, 4\)",
        ),
        (
            BWD,
            "grad-output-dtype",
            _bwd(grad_output=np.ones((2, 3, 4), np.float32)),
            TypeError,
            r"^grad_output must have dtype float64",
        ),
        (
            BWD,
            "grad-output-int",
            _bwd(grad_output=np.ones((2, 3, 4), int)),
            TypeError,
            r"^grad_output must have dtype float64",
        ),
        (BWD, "grad-output-str", _bwd(grad_output="abc"), TypeError, r"^grad_output must have"),
        (
            BWD,
            "grad-output-2d",
            _bwd(grad_output=np.ones((2, 3))),
            ValueError,
            r"^grad_output must have at least 3 dim",
        ),
        (BWD, "x-complex", _bwd(x=np.ones((2, 3, 4), complex)), TypeError, r"^x must have a real"),
        (BWD, "x-2d", _bwd(x=np.ones((2, 3))), ValueError, r"^x must have at least 3 dim"),
        (
            BWD,
            "mean-shape",
            _bwd(mean=np.zeros((1, 3))),
            ValueError,
            r"^mean must have shape \(2, 3\)",
        ),
        (
            BWD,
            "mean-int",
            _bwd(mean=np.zeros((2, 3), int)),
            TypeError,
            r"^mean must have a floating dtype",
        ),
        (
            BWD,
            "mean-ragged",
            _bwd(mean=[[1.0], [1.0, 2.0]]),
            TypeError,
            r"^mean must be an array_like",
        ),
        (
            BWD,
            "rstd-shape",
            _bwd(rstd=np.ones((3, 2))),
            ValueError,
            r"^rstd must have shape \(2, 3\)",
        ),
        (BWD, "rstd-str", _bwd(rstd="abc"), TypeError, r"^rstd must have a floating dtype"),
        (BWD, "weight-shape", _bwd(weight=np.ones(4)), ValueError, r"^weight must have shape"),
        (BWD, "weight-complex", _bwd(weight=np.ones(3, complex)), TypeError, r"^weight must"),
        (BWD, "axis-batch", _bwd(channel_axis=0), ValueError, r"^channel_axis=0 names axis 0"),
        (BWD, "axis-high", _bwd(channel_axis=5), ValueError, r"^channel_axis=5 is out of range"),
        (BWD, "axis-float", _bwd(channel_axis=1.0), TypeError, r"^channel_axis must be an integer"),
        (BWD, "out-shape", _bwd(out=np.zeros((2, 3, 5))), ValueError, r"^out must have shape"),
        (
            BWD,
            "out-dtype",
            _bwd(out=np.zeros((2, 3, 4), np.float32)),
            TypeError,
            r"^out must have dtype float64",
        ),
        (BWD, "out-read-only", _bwd(out=_ro((2, 3, 4))), ValueError, r"^out is read-only"),
        (BWD, "out-list", _bwd(out=[1.0]), TypeError, r"^out must be a numpy.ndarray"),
        (BWD, "unknown-keyword", _bwd(eps=1e-5), TypeError, r"unexpected keyword argument 'eps'"),
    ]

if HAVE_LAYERS:
    from instnorm_numba.layers import StateDictError

    def _layer(cls="InstanceNorm", *args, **kw):
        return lambda: getattr(instnorm_numba, cls)(*args, **kw)

    def _trained(cls="InstanceNorm", C=3, x_shape=(2, 3, 4), **kw):
        layer = getattr(instnorm_numba, cls)(C, **kw)
        layer(np.random.default_rng(0).standard_normal(x_shape))
        return layer

    def _affine():
        return instnorm_numba.InstanceNorm(3, affine=True)

    LAYER_CLASSES = ["InstanceNorm", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d"]
    for cls in LAYER_CLASSES:
        E += [
            (
                cls,
                "num-features-str",
                _layer(cls, "3"),
                TypeError,
                r"^num_features must be an integer",
            ),
            (
                cls,
                "num-features-float",
                _layer(cls, 3.0),
                TypeError,
                r"^num_features must be an integer",
            ),
            (
                cls,
                "num-features-bool",
                _layer(cls, True),
                TypeError,
                r"^num_features must be an integer",
            ),
            (cls, "num-features-zero", _layer(cls, 0), ValueError, r"^num_features must be >= 1"),
            (cls, "eps-negative", _layer(cls, 3, eps=-1), ValueError, r"^eps must be >= 0"),
            (cls, "eps-str", _layer(cls, 3, eps="x"), TypeError, r"^eps must be a real number"),
            (
                cls,
                "momentum-nan",
                _layer(cls, 3, momentum=float("nan")),
                ValueError,
                r"^momentum must be finite",
            ),
            (
                cls,
                "momentum-str",
                _layer(cls, 3, momentum="x"),
                TypeError,
                r"^momentum must be a real number",
            ),
            (cls, "affine-int", _layer(cls, 3, affine=1), TypeError, r"^affine must be a bool"),
            (
                cls,
                "track-str",
                _layer(cls, 3, track_running_stats="yes"),
                TypeError,
                r"^track_running_stats must be a bool",
            ),
            (
                cls,
                "dtype-int",
                _layer(cls, 3, dtype=np.int32),
                TypeError,
                r"^dtype must be float16, float32 or float64",
            ),
            (
                cls,
                "dtype-junk",
                _layer(cls, 3, dtype="junk"),
                TypeError,
                r"^dtype must be float16, float32 or float64",
            ),
            (
                cls,
                "train-mode-int",
                lambda cls=cls: getattr(instnorm_numba, cls)(3).train(1),
                TypeError,
                r"^mode must be a bool",
            ),
            (
                cls,
                "backward-before-forward",
                lambda cls=cls: getattr(instnorm_numba, cls)(3).backward(np.ones((2, 3, 4, 4))),
                RuntimeError,
                r"^backward\(\) needs a forward\(\) first",
            ),
        ]
    E += [
        (
            "InstanceNorm",
            "channel-axis-float",
            _layer("InstanceNorm", 3, channel_axis=1.0),
            TypeError,
            r"^channel_axis must be an integer",
        ),
        (
            "InstanceNorm",
            "channel-axis-batch",
            _layer("InstanceNorm", 3, channel_axis=0),
            ValueError,
            r"^channel_axis=0 names axis 0",
        ),
        (
            "InstanceNorm2d",
            "channel-axis-not-taken",
            _layer("InstanceNorm2d", 3, channel_axis=1),
            TypeError,
            r"unexpected keyword argument 'channel_axis'",
        ),
        (
            "InstanceNorm",
            "forward-x-2d",
            lambda: instnorm_numba.InstanceNorm(3)(np.ones((2, 3))),
            ValueError,
            r"^x must have at least 3 dim",
        ),
        (
            "InstanceNorm",
            "forward-x-complex",
            lambda: instnorm_numba.InstanceNorm(3)(np.ones((2, 3, 4), complex)),
            TypeError,
            r"^x must have a real",
        ),
        (
            "InstanceNorm",
            "forward-channels-affine",
            lambda: instnorm_numba.InstanceNorm(4, affine=True)(_x()),
            ValueError,
            r"to match num_features \(4\), but got: 3",
        ),
        (
            "InstanceNorm",
            "forward-channel-axis-range",
            lambda: instnorm_numba.InstanceNorm(3, channel_axis=5)(_x()),
            ValueError,
            r"^channel_axis=5 is out of range",
        ),
        (
            "InstanceNorm",
            "forward-spatial-1-training",
            lambda: instnorm_numba.InstanceNorm(3)(np.ones((2, 3, 1))),
            ValueError,
            r"^Expected more than 1 spatial element when training",
        ),
        (
            "InstanceNorm1d",
            "forward-4d",
            lambda: instnorm_numba.InstanceNorm1d(3)(np.ones((2, 3, 4, 4))),
            ValueError,
            r"^expected 2D or 3D input \(got 4D input\)",
        ),
        (
            "InstanceNorm2d",
            "forward-5d",
            lambda: instnorm_numba.InstanceNorm2d(3)(np.ones((2, 3, 4, 4, 4))),
            ValueError,
            r"^expected 3D or 4D input \(got 5D input\)",
        ),
        (
            "InstanceNorm2d",
            "forward-string",
            lambda: instnorm_numba.InstanceNorm2d(3)("abc"),
            TypeError,
            r"^x must have a real floating, integer or bool dtype; got dtype <U3",
        ),
        (
            "InstanceNorm3d",
            "forward-3d",
            lambda: instnorm_numba.InstanceNorm3d(3)(np.ones((2, 3, 4))),
            ValueError,
            r"^expected 4D or 5D input \(got 3D input\)",
        ),
        (
            "InstanceNorm",
            "backward-shape",
            lambda: _trained().backward(np.ones((2, 3, 5))),
            ValueError,
            r"^grad_output must have shape \(2, 3, 4\)",
        ),
        (
            "InstanceNorm",
            "backward-complex",
            lambda: _trained().backward(np.ones((2, 3, 4), complex)),
            TypeError,
            r"^grad_output must have a real",
        ),
        (
            "InstanceNorm",
            "backward-ragged",
            lambda: _trained().backward(_ragged()),
            TypeError,
            r"^grad_output must be an array_like",
        ),
        (
            "InstanceNorm",
            "load-state-dict-list",
            lambda: _affine().load_state_dict([1]),
            TypeError,
            r"^state_dict must be a mapping",
        ),
        (
            "InstanceNorm",
            "load-state-dict-strict-int",
            lambda: _affine().load_state_dict({}, strict=1),
            TypeError,
            r"^strict must be a bool",
        ),
        (
            "InstanceNorm",
            "load-state-dict-key-int",
            lambda: _affine().load_state_dict({1: 2}),
            TypeError,
            r"^state_dict keys must be str",
        ),
        (
            "InstanceNorm",
            "load-state-dict-missing",
            lambda: _affine().load_state_dict({"weight": np.ones(3)}),
            StateDictError,
            r'Missing key\(s\) in state_dict: "bias"',
        ),
        (
            "InstanceNorm",
            "load-state-dict-unexpected",
            lambda: _affine().load_state_dict({"weight": np.ones(3), "bias": np.ones(3), "foo": 1}),
            StateDictError,
            r'Unexpected key\(s\) in state_dict: "foo"',
        ),
        (
            "InstanceNorm",
            "load-state-dict-shape",
            lambda: _affine().load_state_dict({"weight": np.ones(4), "bias": np.ones(3)}),
            StateDictError,
            r"size mismatch for weight",
        ),
        (
            "InstanceNorm",
            "load-state-dict-complex",
            lambda: _affine().load_state_dict({"weight": np.ones(3, complex), "bias": np.ones(3)}),
            StateDictError,
            r'parameter named "weight"',
        ),
    ]

# the moments building blocks (issue 14)
E += [
    (
        "Moments",
        "missing-fields",
        lambda: instnorm_numba.Moments(1, 2),
        TypeError,
        r"missing 2 required positional arguments",
    ),
    (
        "instance_moments",
        "shift-shape",
        lambda: instnorm_numba.instance_moments(np.ones((2, 3, 4)), shift=np.zeros(3)),
        ValueError,
        r"^shift must have shape \(2, 3\) to match N=2 samples and C=3 channels",
    ),
    (
        "merge_moments",
        "not-moments",
        lambda: instnorm_numba.merge_moments((1, 2, 3, 4)),
        TypeError,
        r"^parts\[0\] must be a Moments",
    ),
    (
        "moments_to_stats",
        "eps-negative",
        lambda: instnorm_numba.moments_to_stats(
            instnorm_numba.instance_moments(np.ones((2, 3, 4))), eps=-1.0
        ),
        ValueError,
        r"^eps must be >= 0",
    ),
    (
        "normalize_with_stats",
        "rstd-shape",
        lambda: instnorm_numba.normalize_with_stats(np.ones((2, 3, 4)), np.zeros((2, 3)), 1.0),
        ValueError,
        r"^rstd must have shape \(2, 3\)",
    ),
]

ERROR_TABLE = E


def test_error_table_covers_every_public_function():
    covered = {name for name, *_ in ERROR_TABLE}
    assert covered == PUBLIC, f"public functions without error cases: {PUBLIC - covered}"


@pytest.mark.parametrize(
    "call,exc_type,match",
    [pytest.param(c, t, m, id=f"{name}-{i}") for name, i, c, t, m in ERROR_TABLE],
)
def test_error_inputs(call, exc_type, match):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(BaseException) as info:
            call()
    assert type(info.value) is exc_type, f"{type(info.value).__name__}: {info.value}"
    assert info.match(match)


def test_errors_leave_arguments_untouched():
    """A refused call changes nothing: running statistics, out, the input."""
    x = _x()
    x_before = x.copy()
    rm, rv, out = np.full(3, 0.5), np.full(3, 2.0), np.full((2, 3, 4), 7.0)
    bad = [
        {"eps": -1.0},
        {"momentum": "0.1"},
        {"weight": np.ones(4)},
        {"return_stats": None},
        {"out": np.zeros((2, 3, 5))},
    ]
    for kw in bad:
        args = {"running_mean": rm, "running_var": rv, "out": out, **kw}
        with pytest.raises((TypeError, ValueError)):
            instnorm_numba.instance_norm(x, **args)
    np.testing.assert_array_equal(x, x_before)
    np.testing.assert_array_equal(rm, np.full(3, 0.5))
    np.testing.assert_array_equal(rv, np.full(3, 2.0))
    np.testing.assert_array_equal(out, np.full((2, 3, 4), 7.0))


# ----------------------------------------------------------------------------------------------
# no leaks

RSS_SLACK = 4 * 2**20  # "within a few MB": the allocator may keep a few pages


def _leak_calls():
    """One representative call per public name, on fixed arrays (every option exercised)."""
    r = np.random.default_rng(0)
    x = r.standard_normal((4, 8, 32, 32)).astype(np.float32)
    dy = r.standard_normal(x.shape).astype(np.float32)
    out = np.empty_like(x)
    rm, rv = np.zeros(8), np.ones(8)
    w, b = np.linspace(0.5, 2, 8), np.zeros(8)
    calls = {
        "instance_norm": lambda: (
            instnorm_numba.instance_norm(x, w, b, return_stats=True),
            instnorm_numba.instance_norm(x, out=out, running_mean=rm, running_var=rv),
            instnorm_numba.instance_norm(x, running_mean=rm, running_var=rv, use_input_stats=False),
            instnorm_numba.instance_norm(x.astype(np.float16)[:, :, ::2], channel_axis=-1),
        )
    }
    if HAVE_BACKWARD:
        _, mean, rstd = instnorm_numba.instance_norm(x, w, return_stats=True)
        calls["instance_norm_backward"] = lambda: (
            instnorm_numba.instance_norm_backward(dy, x, mean, rstd, w),
            instnorm_numba.instance_norm_backward(dy, x, mean, rstd, w, out=out),
        )
    if "instance_moments" in PUBLIC:  # the moments building blocks (issue 14)
        m = instnorm_numba.instance_moments(x)
        mean, rstd = instnorm_numba.moments_to_stats(m)
        calls.update(
            {
                "Moments": lambda: instnorm_numba.Moments(*m),
                "instance_moments": lambda: (
                    instnorm_numba.instance_moments(x),
                    instnorm_numba.instance_moments(x[:, :, :8], shift=m.shift),
                ),
                "merge_moments": lambda: instnorm_numba.merge_moments(m, m, m),
                "moments_to_stats": lambda: instnorm_numba.moments_to_stats(m),
                "normalize_with_stats": lambda: instnorm_numba.normalize_with_stats(
                    x, m.mean_offset, rstd, w, b, shift=m.shift, out=out
                ),
            }
        )
    if HAVE_LAYERS:
        shapes = {
            "InstanceNorm": x.shape,
            "InstanceNorm1d": (4, 8, 64),
            "InstanceNorm2d": x.shape,
            "InstanceNorm3d": (2, 8, 8, 8, 8),
        }
        for name, shape in shapes.items():
            layer = getattr(instnorm_numba, name)(8, affine=True, track_running_stats=True)
            xs = r.standard_normal(shape).astype(np.float32)
            gs = r.standard_normal(shape).astype(np.float32)

            def call(layer=layer, xs=xs, gs=gs):
                layer.train()
                layer(xs)
                layer.backward(gs)
                layer.eval()
                return layer(xs)

            calls[name] = call
    return calls


def test_leak_table_covers_every_public_function():
    assert set(_leak_calls()) == PUBLIC


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_1000_calls_keep_rss_flat(name):
    psutil = pytest.importorskip("psutil")
    call = _leak_calls()[name]
    proc = psutil.Process()
    for _ in range(50):  # compile, warm the allocator
        call()
    gc.collect()
    before = proc.memory_info().rss
    for _ in range(1000):
        call()
    gc.collect()
    grown = proc.memory_info().rss - before
    assert grown < RSS_SLACK, f"RSS grew {grown / 2**20:.2f} MB over 1000 calls of {name}"


def _out_cases():
    """name -> (call writing into a preallocated out, the input); inputs of 2 MiB."""
    r = np.random.default_rng(1)
    big = r.standard_normal((2, 4, 256, 256)).astype(np.float32)
    cl64 = np.ascontiguousarray(big.transpose(0, 2, 3, 1)).astype(np.float64)
    b16 = big.astype(np.float16)
    one = np.ascontiguousarray(big[:1, :1])  # one long instance: the split path
    inplace = big.copy()
    out, out64, out16, out1 = (np.empty_like(a) for a in (big, cl64, b16, one))
    IN = instnorm_numba.instance_norm
    cases = {
        "cf-float32": (lambda: IN(big, out=out), big),
        "cl-float64": (lambda: IN(cl64, channel_axis=-1, out=out64), cl64),
        "float16": (lambda: IN(b16, out=out16), b16),
        "in-place": (lambda: IN(inplace, out=inplace), inplace),
        "split-one-instance": (lambda: IN(one, out=out1), one),
        "running-eval": (
            lambda: IN(
                big,
                out=out,
                running_mean=np.zeros(4),
                running_var=np.ones(4),
                use_input_stats=False,
            ),
            big,
        ),
    }
    if HAVE_BACKWARD:
        dy = r.standard_normal(big.shape).astype(np.float32)
        _, mean, rstd = IN(big, return_stats=True)
        cases["backward"] = (
            lambda: instnorm_numba.instance_norm_backward(dy, big, mean, rstd, out=out),
            big,
        )
    return cases


OUT_CASES = [
    "cf-float32",
    "cl-float64",
    "float16",
    "in-place",
    "split-one-instance",
    "running-eval",
] + (["backward"] if HAVE_BACKWARD else [])


@pytest.mark.parametrize("case", OUT_CASES)
def test_out_allocates_nothing_proportional_to_the_input(case):
    call, x = _out_cases()[case]
    call()  # compile outside the trace
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        call()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # statistics of shape (N, C) and per-chunk partials only: far below the input's size
    assert peak < max(64 * 1024, x.nbytes // 32), f"peak {peak} B for an input of {x.nbytes} B"


HOST_POOL_FORK = r"""
import json, multiprocessing as mp
import numba, numpy as np
import instnorm_numba as inn
from instnorm_numba import _jit

@numba.njit(parallel=True)
def host_kernel(a):  # the host program's own parallel code, not the library's
    s = 0.0
    for i in numba.prange(a.shape[0]):
        s += a[i]
    return s

host_kernel(np.ones(1 << 20))
x = np.random.default_rng(0).standard_normal((4, 8, 64, 64))

def child(q):
    q.put(float(np.abs(inn.instance_norm(x) - inn.instance_norm(x[::-1])[::-1]).max()))

ctx = mp.get_context("fork")
q = ctx.Queue()
p = ctx.Process(target=child, args=(q,))
p.start()
p.join(300)
print("RESULT " + json.dumps({"exitcode": p.exitcode, "diff": q.get(timeout=10) if p.exitcode == 0
                              else None, "layer": numba.threading_layer()}))
"""


def test_fork_after_the_host_program_used_openmp():
    """The guard looks at Numba's pool, not only at the library's own calls."""
    res = result_of(run_python(HOST_POOL_FORK, env={"NUMBA_THREADING_LAYER": "omp"}))
    assert res["layer"] == "omp"
    assert res["exitcode"] == 0 and res["diff"] == 0.0


# ----------------------------------------------------------------------------------------------
# hostile input for the backward pass


@st.composite
def backward_cases(draw):
    x, weight, _bias, kw, _out, _stats = draw(cases())
    rdt = ref.result_dtype(x.dtype)
    r = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    dy_order = draw(st.sampled_from(["=", "swapped"]))
    dy_dtype = rdt if dy_order == "=" else rdt.newbyteorder()
    with np.errstate(all="ignore"):
        dy = (r.standard_normal(x.shape) * draw(st.sampled_from([1.0, 1e-3, 100.0]))).astype(
            dy_dtype
        )
    if draw(st.booleans()):
        dy = np.asfortranarray(dy)
    out = draw(st.sampled_from(["none", "none", "fresh", "alias-dy", "alias-x"]))
    return x, dy, weight, kw["channel_axis"], kw["eps"], out


@HYPOTHESIS
@given(backward_cases())
def test_hostile_input_backward_matches_reference_or_raises_documented_error(case):
    x, dy, weight, channel_axis, eps, out_kind = case
    rdt = ref.result_dtype(x.dtype)
    _, mean, rstd = instnorm_numba.instance_norm(
        x, weight, eps=eps, channel_axis=channel_axis, return_stats=True
    )
    before = [a.copy() for a in (x, dy, mean, rstd)]
    out = {"none": None, "fresh": np.full(x.shape, 7, rdt), "alias-dy": dy, "alias-x": x}[out_kind]
    if out is not None and out.dtype != rdt:  # documented: out must have the result dtype
        with pytest.raises(TypeError, match="^out must have dtype"):
            instnorm_numba.instance_norm_backward(
                dy, x, mean, rstd, weight, channel_axis=channel_axis, out=out
            )
        for a, b in zip((x, dy, mean, rstd), before, strict=True):
            np.testing.assert_array_equal(a, b)
        return
    xin = before[0].astype(np.float64) if x.dtype.kind in "iub" else before[0]
    edx, egw, egb = ref.instance_norm_backward(
        before[1], xin, weight, eps=eps, channel_axis=channel_axis, exact=True
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dx, gw, gb = instnorm_numba.instance_norm_backward(
            dy, x, mean, rstd, weight, channel_axis=channel_axis, out=out
        )
    assert dx.dtype == rdt and dx.shape == x.shape
    assert gw.dtype == gb.dtype == np.float64 and gw.shape == gb.shape == (x.shape[channel_axis],)
    if out is not None:
        assert dx is out
    for a, b, name in zip((x, dy), before[:2], ("x", "grad_output"), strict=True):
        if a is not out:
            np.testing.assert_array_equal(a, b, err_msg=f"{name} was modified")
    scale = ref.backward_accuracy_scale(before[1], xin, weight, eps=eps, channel_axis=channel_axis)
    with np.errstate(all="ignore"):
        overflow = np.isfinite(edx) & np.isinf(edx.astype(rdt))
        edx = np.where(overflow, edx.astype(rdt).astype(edx.dtype), edx)
    if rdt == np.float64:
        err = ref.ulp_error(dx, edx, dtype=rdt, scale=scale)
        assert err <= TOL_EPS[rdt], f"dx error {err:.3g} eps of {rdt}"
    else:
        # float32/float16: 1 eps of the dtype relative to max(1, |dx|), plus what float64
        # arithmetic can lose where the terms cancel: with eps=0 and a tiny variance rstd
        # reaches 1e44 and the terms ~1e44 * |dy| cancel to ~0 (documented exception)
        with np.errstate(all="ignore"):
            a, e = dx.astype(ref.XP), edx.astype(ref.XP)
            same = (np.isnan(a) & np.isnan(e)) | (a == e)
            bound = TOL_EPS[rdt] * ref.XP(np.finfo(rdt).eps) * np.maximum(1, np.abs(e))
            bound = bound + 8 * ref.XP(np.finfo(np.float64).eps) * np.abs(scale)
            ok = same | (np.abs(a - e) <= bound)
        assert ok.all(), f"dx off at {np.argwhere(~ok)[:3].tolist()}: {a[~ok][:3]} vs {e[~ok][:3]}"
    # parameter gradients: float64 sums, accurate relative to the sum of magnitudes
    for got, want in ((gw, egw), (gb, egb)):
        fin = np.isfinite(want)
        np.testing.assert_array_equal(np.isfinite(got), fin)
        mag = np.abs(want[fin]).astype(np.float64) + 1.0
        assert np.all(np.abs(got[fin] - want[fin]) <= 1e-9 * mag * max(1, x.size))


# ----------------------------------------------------------------------------------------------
# hostile input for the layers: a training step, then eval, against the reference


@st.composite
def layer_cases(draw):
    x, weight, bias, kw, _out, _stats = draw(cases())
    layer_dtype = draw(st.sampled_from([np.float32, np.float64]))
    affine = draw(st.booleans())
    track = draw(st.booleans())
    momentum = draw(st.sampled_from([0.1, None, 1.0]))
    return x, kw["channel_axis"], kw["eps"], layer_dtype, affine, track, momentum, weight, bias


@HYPOTHESIS
@given(layer_cases())
def test_hostile_input_layer_matches_reference_or_raises_documented_error(case):
    x, channel_axis, eps, ldt, affine, track, momentum, weight, bias = case
    C = x.shape[channel_axis]
    make = lambda: instnorm_numba.InstanceNorm(  # noqa: E731
        C,
        eps=eps,
        momentum=momentum,
        affine=affine,
        track_running_stats=track,
        channel_axis=channel_axis,
        dtype=ldt,
    )
    if C == 0:
        with pytest.raises(ValueError, match="^num_features must be >= 1"):
            make()
        return
    layer = make()
    if affine:
        if weight is not None:
            layer.weight[...] = weight
        if bias is not None:
            layer.bias[...] = bias
    w = layer.weight.copy() if affine else None
    b = layer.bias.copy() if affine else None
    rm = layer.running_mean.copy() if track else None
    rv = layer.running_var.copy() if track else None
    before = x.copy()
    rdt = ref.result_dtype(x.dtype)
    xin = before.astype(np.float64) if x.dtype.kind in "iub" else before
    axis = channel_axis % x.ndim
    spatial = int(np.prod([s for i, s in enumerate(x.shape) if i not in (0, axis)]))
    if spatial == 1:  # torch's rule for input statistics, documented
        with pytest.raises(ValueError, match="^Expected more than 1 spatial element"):
            layer(x)
        return
    if spatial == 0 and track:  # no unbiased variance to track: instance_norm refuses
        with pytest.raises(ValueError, match="updating running statistics"):
            layer(x)
        np.testing.assert_array_equal(layer.running_mean, rm)
        return
    # training step: input statistics, running statistics updated in place
    rkw = {}
    if track:
        rkw = {
            "running_mean": rm.copy(),
            "running_var": rv.copy(),
            "momentum": 0.0 if momentum is None else momentum,
        }
    exact = ref.instance_norm(xin, w, b, eps=eps, channel_axis=channel_axis, exact=True, **rkw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = layer(x)
    np.testing.assert_array_equal(x, before)
    assert y.dtype == rdt and y.shape == x.shape
    scale = None
    if rdt == np.float64:
        scale = ref.accuracy_scale(xin, w, b, eps=eps, channel_axis=channel_axis)
    with np.errstate(all="ignore"):
        overflow = np.isfinite(exact) & np.isinf(exact.astype(rdt))
        exact = np.where(overflow, exact.astype(rdt).astype(exact.dtype), exact)
    assert ref.ulp_error(y, exact, dtype=rdt, scale=scale) <= TOL_EPS[rdt]
    if not track:
        return
    for got, want in (
        (layer.running_mean, rkw["running_mean"]),
        (layer.running_var, rkw["running_var"]),
    ):
        assert got.dtype == ldt
        fin = np.isfinite(want)
        np.testing.assert_array_equal(np.isfinite(got), fin)
        np.testing.assert_allclose(
            got[fin],
            want[fin],
            rtol=1e-6 if ldt == np.float32 else 1e-12,
            atol=1e-6 if ldt == np.float32 else 1e-12,
        )
    # eval: the running statistics normalize, nothing changes
    layer.eval()
    rm2, rv2 = layer.running_mean.copy(), layer.running_var.copy()
    exact = ref.instance_norm(
        xin,
        w,
        b,
        eps=eps,
        channel_axis=channel_axis,
        running_mean=rm2,
        running_var=rv2,
        use_input_stats=False,
        exact=True,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = layer(x)
    np.testing.assert_array_equal(layer.running_mean, rm2)
    np.testing.assert_array_equal(layer.running_var, rv2)
    if rdt == np.float64:
        scale = ref.accuracy_scale(
            xin,
            w,
            b,
            eps=eps,
            channel_axis=channel_axis,
            running_mean=rm2,
            running_var=rv2,
            use_input_stats=False,
        )
    with np.errstate(all="ignore"):
        overflow = np.isfinite(exact) & np.isinf(exact.astype(rdt))
        exact = np.where(overflow, exact.astype(rdt).astype(exact.dtype), exact)
    assert ref.ulp_error(y, exact, dtype=rdt, scale=scale) <= TOL_EPS[rdt]
