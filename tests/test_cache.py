"""The kernel package and its on-disk cache: a change to any kernel module, or to the
decorator, recompiles every kernel (Numba alone checks only the kernel's own file); every
kernel names one of the fast-math flag sets."""

from __future__ import annotations

import ast
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import numba
import pytest

import instnorm_numba
from instnorm_numba import _jit
from instnorm_numba import _kernels as K

PKG = pathlib.Path(instnorm_numba.__file__).parent
KERNEL_MODULES = sorted((PKG / "_kernels").glob("*.py"))

# a kernel module of the copied package: calls a helper of another module (elements._sub)
PROBE = """
from .._jit import FM_STRICT, kernel
from .elements import _sub


@kernel(fastmath=FM_STRICT)
def probe(a, b):
    return _sub(a, b) / b
"""

RUN = """
import json
from instnorm_numba._kernels import probe
try:
    value = probe.probe(3.0, 0.5)
    zero = repr(probe.probe(1.0, 0.0))
except ZeroDivisionError as exc:
    zero = "ZeroDivisionError"
stats = probe.probe.stats
print(json.dumps({"value": value, "zero": zero, "hits": sum(stats.cache_hits.values()),
                  "misses": sum(stats.cache_misses.values())}))
"""


@pytest.fixture
def package_copy(tmp_path):
    """A private copy of the package (plus the probe kernel) and a private cache directory."""
    root = tmp_path / "src"
    shutil.copytree(PKG, root / "instnorm_numba", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "instnorm_numba" / "_kernels" / "probe.py").write_text(PROBE)
    env = dict(os.environ, PYTHONPATH=str(root), NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("NUMBA_DISABLE_JIT", None)

    def run():
        proc = subprocess.run(
            [sys.executable, "-c", RUN], env=env, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, proc.stderr
        import json

        return json.loads(proc.stdout.strip().splitlines()[-1])

    return root / "instnorm_numba", run


def _edit(path: pathlib.Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def test_a_second_process_loads_the_cached_kernel(package_copy):
    _, run = package_copy
    first = run()
    assert first == {"value": 5.0, "zero": "inf", "hits": 0, "misses": 1}
    second = run()
    assert second == {"value": 5.0, "zero": "inf", "hits": 1, "misses": 0}


def test_a_changed_helper_in_another_module_recompiles(package_copy):
    pkg, run = package_copy
    assert run()["value"] == 5.0
    # the helper lives in elements.py; probe.py, the kernel's own file, is untouched, so
    # Numba's own stamp (probe.py's mtime and size) still matches
    _edit(pkg / "_kernels" / "elements.py", "    return a - b\n", "    return a - b + 100.0\n")
    after = run()
    assert after["value"] == (3.0 - 0.5 + 100.0) / 0.5  # the new behaviour
    assert after["misses"] == 1 and after["hits"] == 0  # recompiled, not loaded
    assert run()["hits"] == 1  # and cached again under the new stamp


def test_changed_decorator_options_recompile(package_copy):
    pkg, run = package_copy
    assert run()["zero"] == "inf"  # error_model="numpy": 1 / 0 is inf
    _edit(pkg / "_jit.py", 'error_model="numpy"', 'error_model="python"')
    after = run()
    assert after["zero"] == "ZeroDivisionError"  # the new option is in the machine code
    assert after["misses"] >= 1 and after["hits"] == 0


def test_the_stamp_covers_every_kernel_module_and_the_decorator():
    assert len(_jit.SOURCE_STAMP) == 64
    assert _jit._STAMPED_DIR == str(PKG / "_kernels")
    assert {p.name for p in KERNEL_MODULES} >= {
        "__init__.py",
        "elements.py",
        "moments.py",
        "vector.py",
        "rows.py",
        "rows_backward.py",
        "slabs.py",
        "slabs_backward.py",
    }


def test_numbas_private_caching_api_is_as_pinned():
    """The names and the constructor the stamped cache relies on (see _jit._stamped_cache_class)."""
    from numba.core.caching import FunctionCache, IndexDataCacheFile

    cls = _jit._stamped_cache_class()
    assert issubclass(cls, FunctionCache)
    params = IndexDataCacheFile.__init__.__code__.co_varnames
    assert {"cache_path", "filename_base", "source_stamp"} <= set(params)
    dispatcher = K.cf_fused.parallel
    if _jit.cache_enabled():
        assert type(dispatcher._cache).__name__ == "StampedFunctionCache"
        stamp = dispatcher._cache._cache_file._source_stamp
        assert stamp[1] == _jit.SOURCE_STAMP


def test_private_api_change_falls_back_to_no_cache_with_one_warning(tmp_path):
    """Numba without the names the stamped cache needs: one warning, kernels compiled in
    memory, the same results."""
    code = textwrap.dedent(
        """
        import warnings
        import numba.core.caching as caching
        del caching.IndexDataCacheFile  # as if Numba had renamed it
        import numpy as np
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import instnorm_numba
            from instnorm_numba import _jit, reference
            x = np.random.default_rng(0).standard_normal((2, 3, 40)).astype(np.float32)
            y = instnorm_numba.instance_norm(x)
        exact = reference.instance_norm(x)
        print(len(caught), _jit.cache_enabled(), float(np.abs(y - exact).max()))
        print(caught[0].message)
        """
    )
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    first, message = proc.stdout.strip().splitlines()
    count, enabled, err = first.split()
    assert (count, enabled) == ("1", "False")
    assert float(err) <= 6e-8
    assert "caching internals changed" in message and "compiled in memory" in message
    assert not any(tmp_path.rglob("*.nbi"))  # nothing was written to the cache


def _kernel_decorations():
    for path in KERNEL_MODULES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef):
                for dec in node.decorator_list:
                    if isinstance(dec, ast.Call) and getattr(dec.func, "id", None) == "kernel":
                        yield path.name, node.name, dec


def test_every_kernel_names_a_flag_set():
    decorations = list(_kernel_decorations())
    assert len(decorations) > 60
    for module, name, dec in decorations:
        (kw,) = [k for k in dec.keywords if k.arg == "fastmath"]
        assert isinstance(kw.value, ast.Name) and kw.value.id in _jit.FLAG_SETS, (module, name)


def test_no_kernel_module_calls_numba_njit_directly():
    for path in KERNEL_MODULES:
        text = path.read_text()
        assert "njit" not in text and "numba.jit" not in text, path.name


def test_every_compiled_kernel_carries_its_flag_set():
    """What Numba received, for every dispatcher in the package, is one of the named sets."""
    allowed = [_jit._numba_fastmath(v) for v in _jit.FLAG_SETS.values()]
    seen = 0
    for path in KERNEL_MODULES:
        mod = sys.modules[f"instnorm_numba._kernels.{path.stem}"] if path.stem != "__init__" else K
        for obj in vars(mod).values():
            targets = [obj.parallel, obj.serial] if isinstance(obj, _jit.ParallelKernel) else [obj]
            for d in targets:
                if isinstance(d, numba.core.registry.CPUDispatcher):
                    assert d.targetoptions["fastmath"] in allowed, d
                    seen += 1
    assert seen > 60


@pytest.mark.parametrize("flags", [True, {"reassoc"}, set(), None])
def test_the_decorator_refuses_anything_but_a_named_set(flags):
    with pytest.raises(ValueError, match="named flag sets"):
        _jit.kernel(fastmath=flags)
