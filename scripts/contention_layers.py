"""Measure instance_norm under CPU contention for each threading-layer configuration.

For each configuration a fresh interpreter (the layer is fixed at the first parallel call)
times one call on a small (in-cache) and a large input, first on an idle machine, then
beside one busy-loop process per core; medians, and contended/idle in the same run.
Run it under ``flock /work/bench.lock`` on a shared machine::

    flock /work/bench.lock python scripts/contention_layers.py

The figures in README "Reliability" come from this script.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

CHILD = r"""
import json, os, statistics, subprocess, sys, time
import numpy as np
import instnorm_numba as inn
from instnorm_numba import _jit, _contention

def median_ms(fn, seconds, most):
    fn(); fn()
    times, t_end = [], time.perf_counter() + seconds
    while len(times) < most and (time.perf_counter() < t_end or len(times) < 5):
        t0 = time.perf_counter(); fn(); times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3

res = {"layer": _jit.describe(), "load": os.getloadavg()[0]}
r = np.random.default_rng(0)
ROUNDS = 3  # idle and busy alternate, so that other work on the machine hits both alike
for name, shape, most in (("small", (8, 32, 64, 64), 300), ("large", (2, 32, 64, 64, 64), 20)):
    x = r.standard_normal(shape).astype(np.float32)
    out = np.empty_like(x)
    fn = lambda: inn.instance_norm(x, out=out)
    idle, busy = [], []
    for _ in range(ROUNDS):
        idle.append(median_ms(fn, 1.5, most))
        with _contention.burners():
            busy.append(median_ms(fn, 1.5, most))
    res[name + "_idle"] = statistics.median(idle)
    res[name + "_busy"] = statistics.median(busy)
print("RESULT " + json.dumps(res))
"""

CONFIGS = {
    # GNU OpenMP as Numba loads it without help: idle workers spin 300000 times before sleeping
    "omp, GNU default spinning": {"NUMBA_THREADING_LAYER": "omp", "GOMP_SPINCOUNT": "300000"},
    "omp + OMP_WAIT_POLICY=PASSIVE (set by the user)": {
        "NUMBA_THREADING_LAYER": "omp",
        "OMP_WAIT_POLICY": "PASSIVE",
    },
    # what the library now does on its own when tbb is absent (passive around the launch)
    "omp, library default (no tbb)": {"NUMBA_THREADING_LAYER": "omp"},
    "tbb": {"NUMBA_THREADING_LAYER": "tbb"},
    "workqueue": {"NUMBA_THREADING_LAYER": "workqueue"},
    "serial (NUMBA_NUM_THREADS=1)": {"NUMBA_NUM_THREADS": "1"},
}


def main(argv):
    only = argv[1:] or list(CONFIGS)
    rows = []
    for name in only:
        env = {
            k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
        }
        env.update(CONFIGS[name])
        proc = subprocess.run(
            [sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=900
        )
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not line:
            print(f"{name}: failed\n{proc.stderr[-2000:]}")
            continue
        r = json.loads(line[-1][7:])
        rows.append((name, r))
        print(
            f"{name:<48} small idle {r['small_idle']:7.3f} ms busy {r['small_busy']:7.3f} ms "
            f"(x{r['small_busy'] / r['small_idle']:5.1f})  large idle {r['large_idle']:7.2f} ms "
            f"busy {r['large_busy']:7.2f} ms (x{r['large_busy'] / r['large_idle']:5.1f})  "
            f"[{r['layer']}; load {r['load']:.1f}]",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
