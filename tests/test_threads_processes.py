"""Threads and processes: concurrent callers, fork after a kernel ran, every threading layer
(each in its own process), the caller's thread count, and a host program's own OpenMP pool.

Anything that could take a process down (fork, workqueue) runs in a subprocess with a
timeout (``conftest.run_python``), so a crash fails one test instead of killing the run.
"""

from __future__ import annotations

import pathlib
import threading

import numba
import numpy as np
import pytest
from conftest import SUBPROCESS_TIMEOUT, result_of, run_python

import instnorm_numba
from instnorm_numba import _jit
from instnorm_numba import _kernels as K
from instnorm_numba import reference as ref

PUBLIC = set(instnorm_numba.__all__) - {"__version__"}
HAVE_BACKWARD = "instance_norm_backward" in PUBLIC
HAVE_LAYERS = "InstanceNorm2d" in PUBLIC


def _have_pip_tbb() -> bool:
    return _jit._libtbb_path() is not None


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


# test_info_shows_the_threading_layer: in test_cli.py


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
import pathlib
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
# signals: an exception from a signal handler never leaves a lock held (issue 11)

MANY_INTERRUPTS = r"""
import json, random, signal, threading, time
import numpy as np
import instnorm_numba as inn

class Alarm(Exception):
    pass

armed = False  # an alarm counts only while a call is under way

def handler(signum, frame):
    # a timer that expires after the call returned is delivered at the harness's next
    # check for signals (the loop's jump, say), outside any try: ignored there
    if armed:
        raise Alarm

x = np.random.default_rng(0).standard_normal((2, 3, 16))
want = inn.instance_norm(x)
t0 = time.perf_counter()
for _ in range(200):
    inn.instance_norm(x)
call = (time.perf_counter() - t0) / 200
signal.signal(signal.SIGALRM, handler)
rnd = random.Random(0)

def one(delay):  # one call, one SIGALRM at a random moment inside it (or just after)
    global armed
    try:
        armed = True
        signal.setitimer(signal.ITIMER_REAL, delay)
        inn.instance_norm(x)
        armed = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        return 0
    except Alarm:
        armed = False
        return 1
    except Exception as exc:  # an interrupt turned into another error by code it hit
        armed = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        other.append(f"{type(exc).__name__}: {exc}"[:200])
        return 1

calls = interrupted = 0
other = []
end = time.monotonic() + 6.0
while time.monotonic() < end:
    interrupted += one(rnd.uniform(1e-6, 2 * call))
    calls += 1
# every later call, from another thread and from this one, still runs
res = []
t = threading.Thread(target=lambda: res.append(inn.instance_norm(x)), daemon=True)
t.start()
t.join(60)
other_ok = bool(res) and np.array_equal(res[0], want)
print("RESULT " + json.dumps({"calls": calls, "interrupted": interrupted, "other_ok": other_ok,
                              "main_ok": bool(np.array_equal(inn.instance_norm(x), want)),
                              "other_errors": other[:5]}))
"""


def test_many_interrupts_never_leave_a_lock_held():
    """Before: ``numba.get_num_threads()`` on every call took a multiprocessing RLock whose
    Python-level ``__enter__`` a SIGALRM could interrupt after the acquire; the other thread
    then hung in it (3 runs in 4 hung within 8 s of interrupts)."""
    res = result_of(run_python(MANY_INTERRUPTS, timeout=300))
    assert res["interrupted"] > 1000, res  # the interrupts really landed inside calls
    assert res["other_ok"] and res["main_ok"], res
    # an interrupt may surface as another exception where NumPy or Numba wrap what they
    # catch, but it never becomes a result: those are counted, and rare
    assert len(res["other_errors"]) < 5, res


def test_thread_count_takes_no_lock_after_the_first_call(monkeypatch):
    # the private Numba name the lock-free path reads (a fallback exists if it moves)
    from numba.np.ufunc import parallel as numba_parallel

    _jit.threading_layer()  # launches the pool: Numba then sets its getter
    assert callable(numba_parallel._get_num_threads)
    expect = numba.get_num_threads()

    def locked(*a):
        raise AssertionError("numba.get_num_threads (two locks) called in the hot path")

    monkeypatch.setattr(numba, "get_num_threads", locked)
    assert _jit.num_threads() == expect
    x = np.random.default_rng(0).standard_normal((2, 8, 64, 64))
    instnorm_numba.instance_norm(x)  # plans with num_threads() on every call


FIRST_CALL_INTERRUPTED = r"""
import json, os, signal, threading, time
import numpy as np
import instnorm_numba as inn
from instnorm_numba import reference as ref

x = np.random.default_rng(0).standard_normal((2, 3, 40))
every = float(os.environ["INTERRUPT_EVERY"])
done = threading.Event()

def ctrl_c():  # Ctrl-C every `every` seconds until a call completes (bounded)
    for _ in range(2000):
        if done.wait(every):
            return
        os.kill(os.getpid(), signal.SIGINT)

threading.Thread(target=ctrl_c, daemon=True).start()
seen = []
y = None
while y is None and len(seen) < 2000:
    try:
        y = inn.instance_norm(x)  # the first call compiles: every retry is interrupted too
    except KeyboardInterrupt:
        seen.append("KeyboardInterrupt")
    except BaseException as exc:
        seen.append(f"{type(exc).__name__}: {str(exc)[:300]}")
        break
done.set()
time.sleep(2 * every)  # a last SIGINT in flight
try:
    y2 = inn.instance_norm(x)
    err = float(ref.ulp_error(y2, ref.instance_norm(x, exact=True)))
except BaseException as exc:
    err = f"{type(exc).__name__}: {str(exc)[:300]}"
print("RESULT " + json.dumps({"seen": seen, "finished": y is not None, "err": err}))
"""


@pytest.mark.parametrize("every", [0.05, 0.3])
def test_interrupting_the_first_compiling_call_raises_keyboard_interrupt(every, tmp_path):
    """Before: a Ctrl-C inside Numba's typing-registry generators left them exhausted; the
    interrupted call raised KeyboardInterrupt and every later call failed with
    "RuntimeError: generator raised StopIteration"."""
    env = {"NUMBA_CACHE_DIR": str(tmp_path / "cache"), "INTERRUPT_EVERY": str(every)}
    res = result_of(run_python(FIRST_CALL_INTERRUPTED, env=env, timeout=900))
    assert res["seen"] and set(res["seen"]) == {"KeyboardInterrupt"}, res["seen"][-3:]
    assert res["finished"] and isinstance(res["err"], float) and res["err"] <= 4, res


# ----------------------------------------------------------------------------------------------
# GNU OpenMP without tbb: a passive wait policy for the pool the library launches (issue 11)

OMP_POLICY = r"""
import json, os
import numpy as np
import instnorm_numba as inn
from instnorm_numba import _jit
inn.instance_norm(np.ones((2, 8, 64, 128)))
print("RESULT " + json.dumps({"layer": _jit.threading_layer(), "info": _jit.describe(),
                              "env_after": os.environ.get("OMP_WAIT_POLICY")}))
"""


@pytest.mark.parametrize("user", [None, "ACTIVE"])
def test_omp_layer_runs_passive_unless_the_caller_chose(user):
    env = {"NUMBA_THREADING_LAYER": "omp", "OMP_DISPLAY_ENV": "VERBOSE"}
    if user:
        env["OMP_WAIT_POLICY"] = user
    unset = ["GOMP_SPINCOUNT"] + ([] if user else ["OMP_WAIT_POLICY"])
    proc = run_python(OMP_POLICY, env=env, unset=unset)
    res = result_of(proc)
    assert res["layer"] == "omp"
    # libgomp's own report of what it read when Numba loaded it
    if user is None:
        assert "GOMP_SPINCOUNT = '0'" in proc.stderr, proc.stderr[-3000:]
        assert "OMP_WAIT_POLICY=PASSIVE" in res["info"]
        assert res["env_after"] is None  # the process environment is left as it was
    else:
        assert "OMP_WAIT_POLICY = 'ACTIVE'" in proc.stderr
        assert "PASSIVE" not in res["info"] and res["env_after"] == "ACTIVE"


def test_tbb_is_a_default_dependency_where_wheels_exist():
    tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python >= 3.11")
    from packaging.requirements import Requirement

    root = pathlib.Path(__file__).resolve().parents[1]
    deps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    tbb = [Requirement(d) for d in deps if d.startswith("tbb")]
    assert len(tbb) == 1 and tbb[0].marker is not None
    for system, machine, want in [
        ("Linux", "x86_64", True),
        ("Windows", "AMD64", True),
        ("Linux", "aarch64", False),  # no tbb wheel on PyPI
        ("Darwin", "arm64", False),
    ]:
        env = {"platform_system": system, "platform_machine": machine}
        assert tbb[0].marker.evaluate(env) is want, (system, machine)
