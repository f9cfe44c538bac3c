"""The command line: ``instnorm-numba info`` and ``instnorm-numba bench``."""

from __future__ import annotations

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
