"""Resources: installs without a writable cache directory, memory that stays flat over
thousands of calls, and ``out=`` that allocates nothing proportional to the input."""

from __future__ import annotations

import gc
import pathlib
import shutil
import tracemalloc

import numpy as np
import pytest
from conftest import result_of, run_python

import instnorm_numba

PUBLIC = set(instnorm_numba.__all__) - {"__version__"}
HAVE_BACKWARD = "instance_norm_backward" in PUBLIC
HAVE_LAYERS = "InstanceNorm2d" in PUBLIC


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
    for d in (pkg, pkg / "_kernels", probe):
        (d / "__pycache__").write_text("")
    blocker = _make_unwritable(tmp_path)
    for d in (pkg, pkg / "_kernels", probe):
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
        for d in (pkg, pkg / "_kernels", probe):
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
    big = r.standard_normal((1, 8, 256, 256)).astype(np.float32)  # 2 MiB results: pooled
    calls["output_pool"] = lambda: (
        instnorm_numba.output_pool(),
        instnorm_numba.instance_norm(big),
        instnorm_numba.instance_norm(big, channel_axis=-1),
    )
    # the moments building blocks (issue 14)
    m = instnorm_numba.instance_moments(x)
    m_mean, m_rstd = instnorm_numba.moments_to_stats(m)
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
                x, m.mean_offset, m_rstd, w, b, shift=m.shift, out=out
            ),
        }
    )
    if HAVE_BACKWARD:
        _, mean, rstd = instnorm_numba.instance_norm(x, w, return_stats=True)
        calls["instance_norm_backward"] = lambda: (
            instnorm_numba.instance_norm_backward(dy, x, mean, rstd, w),
            instnorm_numba.instance_norm_backward(dy, x, mean, rstd, w, out=out),
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
