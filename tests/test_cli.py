"""The command line: ``instnorm-numba info`` and ``instnorm-numba bench``."""

from __future__ import annotations

import contextlib
import json
import os
import re

import pytest
from conftest import result_of, run_python

from instnorm_numba import _jit


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
# issue 11: every environment where the API works, the real cache directory, bad arguments

NO_LAYER_CLI = r"""
import json, warnings
from instnorm_numba import _bench, _jit, benchmark, cli
_jit._libtbb_path = lambda: None  # as if the tbb package were absent: tbb cannot load
_bench.SUITE = (benchmark.Case("tiny", small=True),)
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    rc_info = cli.main(["info"])
    rc_bench = cli.main(["bench", "--quick", "--repeat", "1"])
print("RESULT " + json.dumps({"rc": [rc_info, rc_bench], "layer": _jit.threading_layer(),
                              "warnings": [str(m.message) for m in w]}))
"""


def test_info_and_bench_work_when_the_requested_layer_cannot_load():
    """Before: ``info`` called numba.get_num_threads() itself and died with Numba's
    "No threading layer could be loaded"; ``bench`` too (its roofline copy)."""
    proc = run_python(NO_LAYER_CLI, env={"NUMBA_THREADING_LAYER": "tbb"})
    res = result_of(proc)
    assert res["rc"] == [0, 0], proc.stdout[-3000:]
    assert res["layer"] == _jit.NO_LAYER
    assert len(res["warnings"]) == 1 and "threading layer" in res["warnings"][0], res
    assert "threading layer  none (serial)" in proc.stdout
    assert "tiny" in proc.stdout


CACHE_CLI = r"""
import io, json, contextlib, pathlib
import numpy as np
from instnorm_numba import cli, instance_norm
buf = io.StringIO()
with contextlib.redirect_stdout(buf):
    cli.main(["info"])
line = next(ln for ln in buf.getvalue().splitlines() if ln.startswith("cache directory"))
instance_norm(np.ones((2, 3, 8)))  # compiles and writes the cache
where = line.split(None, 2)[2].rsplit(" [", 1)[0]
files = sorted(p.suffix for p in pathlib.Path(where).glob("*") if p.suffix in (".nbi", ".nbc"))
print("RESULT " + json.dumps({"line": line, "where": where, "files": files}))
"""


def test_info_reports_the_cache_directory_numba_writes_to(tmp_path):
    """Before: ``info`` printed NUMBA_CACHE_DIR itself, but Numba writes in a subdirectory
    of it named after the package's location."""
    res = result_of(run_python(CACHE_CLI, env={"NUMBA_CACHE_DIR": str(tmp_path)}))
    assert res["where"].startswith(str(tmp_path)) and res["where"] != str(tmp_path), res
    assert ".nbi" in res["files"] and ".nbc" in res["files"], res
    assert res["line"].endswith("[on]")


@pytest.mark.parametrize(
    "argv,match",
    [
        (["bench", "--repeat", "0"], "argument --repeat: must be an integer >= 1; got 0"),
        (["bench", "--repeat", "-3"], "argument --repeat: must be an integer >= 1; got -3"),
        (["bench", "--repeat", "x"], "argument --repeat: must be an integer >= 1; got 'x'"),
        (["bench", "--json", "{tmp}/missing/r.json"], "argument --json: .* does not exist"),
        (["bench", "--json", "{tmp}"], "argument --json: .* is a directory"),
        (["bench", "--json", "{tmp}/file/r.json"], "argument --json: .* does not exist"),
        (["bench", "--contended", "--repeat", "0"], "argument --repeat"),
    ],
)
def test_bad_arguments_are_argument_errors_before_any_work(argv, match, tmp_path, capsys):
    from instnorm_numba import _bench, _contention, cli

    (tmp_path / "file").write_text("a regular file\n")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]

    def no_work(args):
        raise AssertionError("work started before the arguments were checked")

    mp = pytest.MonkeyPatch()
    with mp.context() as m:
        m.setattr(_bench, "main", no_work)
        m.setattr(_contention, "main", no_work)
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
    assert info.value.code == 2
    assert re.search(match, capsys.readouterr().err)


def test_bench_contended_reports_idle_and_contended(tmp_path, monkeypatch, capsys):
    from instnorm_numba import _contention, benchmark, cli

    monkeypatch.setattr(benchmark, "SUITE", (benchmark.Case("tiny", small=True),))
    started = []
    burners = _contention.burners

    @contextlib.contextmanager
    def spy(*a, **k):
        with burners(*a, **k) as procs:
            started.extend(procs)
            yield procs

    monkeypatch.setattr(_contention, "burners", spy)
    path = tmp_path / "c.json"
    assert cli.main(["bench", "--contended", "--quick", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "contended" in out and "tiny" in out and "worst contended/idle" in out
    res = json.loads(path.read_text())
    (row,) = res["rows"]
    assert row["idle_ms"] > 0 and row["contended_ms"] > 0
    assert row["ratio"] == pytest.approx(row["contended_ms"] / row["idle_ms"])
    assert row["burners"] == os.cpu_count() == len(started)
    assert all(p.poll() is not None for p in started)  # every burner stopped
