"""What several test files share: the accuracy guarantee in epsilons, the random generator,
the compare-with-the-reference assertion, the Hypothesis settings, and running Python in a
fresh interpreter with a timeout.

Test files import these names directly (``from conftest import TOL_EPS, rng``): pytest puts
this directory on ``sys.path`` (its default "prepend" import mode).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

from instnorm_numba import reference as ref

#: the accuracy guarantee (README "Accuracy"), in epsilons of the result dtype, relative to
#: max(1, |y|) -- for float64 also to ``reference.accuracy_scale`` (weight/bias cancellation)
#: or ``reference.backward_accuracy_scale`` (the terms whose sum is dx).
#: float64: 4, as the README promises (hypothesis found 6.6 eps on many-instance inputs before
#: the block means were corrected; test_float64_guarantee_on_many_instances pins those inputs).
TOL_EPS = {np.dtype(np.float16): 1.0, np.dtype(np.float32): 1.0, np.dtype(np.float64): 4.0}

#: running statistics: float32 ones are rounded once from float64 (1 eps); float64 ones carry
#: the variance's own error, ~10 eps on long instances (the unbiased correction and the
#: blend add a few roundings), measured relative to |(1 - m) r| + |m s|
RUNNING_TOL_EPS = {np.dtype(np.float32): 1.0, np.dtype(np.float64): 16.0}


def rng(seed=0) -> np.random.Generator:
    """A generator seeded by an int >= 0, or by any other value through the CRC of its repr
    (``rng(("cl16", N, L, C))``): every test draws reproducible data of its own."""
    if not isinstance(seed, int) or seed < 0:
        seed = zlib.crc32(repr(seed).encode())
    return np.random.default_rng(seed)


def assert_matches_reference(y, exact, *, dtype=None, scale=None, tol=None, what="error"):
    """``y`` within the guarantee of ``exact`` (the reference's extended-precision result).

    Where the exact value is finite but beyond the result dtype's range, the correctly rounded
    answer is +-inf: the exact value is rounded there first.  Returns the error in eps.
    """
    rdt = np.dtype(dtype if dtype is not None else np.asarray(y).dtype)
    exact = np.asarray(exact)
    with np.errstate(all="ignore"):
        overflow = np.isfinite(exact) & np.isinf(exact.astype(rdt))
        exact = np.where(overflow, exact.astype(rdt).astype(exact.dtype), exact)
    err = ref.ulp_error(y, exact, dtype=rdt, scale=scale)
    limit = TOL_EPS[rdt] if tol is None else tol
    assert err <= limit, f"{what} {err:.3g} eps of {rdt} (limit {limit})"
    return err


# ----------------------------------------------------------------------------------------------
# Hypothesis: derandomized (the same examples in CI as here), no deadline on a shared machine.
# ``INSTNORM_HYPOTHESIS_EXAMPLES`` scales the long hostile-input searches.

settings.register_profile(
    "instnorm",
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("instnorm")

#: the long searches of test_properties.py
HYPOTHESIS = settings(max_examples=int(os.environ.get("INSTNORM_HYPOTHESIS_EXAMPLES", "800")))
#: the short property tests beside the example tests of one function
HYPOTHESIS_SHORT = settings(max_examples=40)


# ----------------------------------------------------------------------------------------------
# a fresh interpreter: anything that could take the process down (fork, workqueue, odd
# installs, environment variables read at import) runs there, so a crash fails one test

SUBPROCESS_TIMEOUT = 600  # a first compile on a loaded 2-core machine takes a while


def run_python(
    code: str,
    *,
    env: dict | None = None,
    unset=(),
    cwd=None,
    args=(),
    timeout=SUBPROCESS_TIMEOUT,
):
    """Run ``code`` (or, with ``code=None``, ``args`` alone) in a fresh interpreter; a hang is
    a failed test, not a stuck suite.  The parent's ``NUMBA_THREADING_LAYER`` is dropped and
    two Numba threads are the default (parallel paths even on a one-core runner)."""
    full_env = dict(os.environ)
    full_env.pop("NUMBA_THREADING_LAYER", None)
    full_env.setdefault("NUMBA_NUM_THREADS", "2")
    full_env.update(env or {})
    for name in unset:
        full_env.pop(name, None)
    cmd = [sys.executable, *(["-c", textwrap.dedent(code)] if code is not None else []), *args]
    try:
        return subprocess.run(
            cmd, env=full_env, cwd=cwd, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"subprocess hung for {timeout}s:\n{exc.stdout}\n{exc.stderr}")


def result_of(proc) -> dict:
    """The JSON object the script printed on its last ``RESULT`` line; fails with the output."""
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (
        f"subprocess exited with {proc.returncode}\n--- stdout\n{proc.stdout}\n"
        f"--- stderr\n{proc.stderr}"
    )
    return json.loads(lines[-1][len("RESULT ") :])
