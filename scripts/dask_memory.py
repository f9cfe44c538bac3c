"""Peak memory per worker while normalizing an input larger than the workers' memory.

A float32 input of several times one worker's ``memory_limit`` is generated lazily from a
seeded random generator (nothing of it exists before the run), normalized with its spatial
axes chunked, and consumed by a reduction (per-instance mean and variance of the result, which
must come out 0 and 1), so that only chunks in flight ever exist.  A thread in this process
polls every worker's resident set size (RSS) and Dask's managed and spilled bytes.

Schedules compared:

* ``two-pass`` (the default for spatially chunked input): the statistics first, then the
  normalization re-reads (here: regenerates) the source;
* ``one-pass``: one read, every chunk of an instance held until its statistics exist, which
  on an input larger than memory means spilling to disk (or workers killed).

Usage::

    python scripts/dask_memory.py                     # 2 workers of 1 GiB, input 4x that
    python scripts/dask_memory.py --limit-mib 512 --factor 4 --schedules two-pass
"""

from __future__ import annotations

import argparse
import json
import math
import threading
import time


def _worker_memory(dask_worker):
    import psutil

    data = dask_worker.data
    fast = getattr(getattr(data, "fast", None), "total_weight", None)
    if fast is None:
        fast = sum(getattr(v, "nbytes", 0) for v in data.values())
    spilled = getattr(data, "spilled_total", None)  # distributed's SpillBuffer
    return {
        "rss": psutil.Process().memory_info().rss,
        "managed": int(fast or 0),
        "spilled": int(spilled.memory) if spilled is not None else 0,
    }


class Poller:
    """Polls every worker's memory in a thread; keeps each worker's peaks."""

    def __init__(self, client, interval=0.05):
        self.client = client
        self.interval = interval
        self.peak: dict = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                now = self.client.run(_worker_memory)
            except Exception:  # a worker restarting: keep polling
                now = {}
            for w, m in now.items():
                p = self.peak.setdefault(w, dict.fromkeys(m, 0))
                for k, v in m.items():
                    p[k] = max(p[k], v)
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _input(shape, chunks, seed, offset):
    import dask.array as da

    rng = da.random.default_rng(seed)
    return rng.standard_normal(shape, chunks=chunks, dtype="float32") * 2.0 + offset


def _check(y, axes):
    """Per-instance mean and variance of ``y`` in float64 (a streaming reduction)."""
    y64 = y.astype("float64")
    return y64.mean(axis=axes), y64.var(axis=axes)


def measure(
    *,
    limit_mib=1024,
    factor=4.0,
    n_workers=2,
    channels=4,
    chunk_mib=16,
    schedules=("two-pass", "one-pass"),
    seed=0,
    offset=1e4,
    timeout=600.0,
):
    """Run each schedule on a fresh LocalCluster; a dict of the figures per schedule."""
    import numpy as np
    from distributed import Client, LocalCluster

    from instnorm_numba import dask as inx_dask

    limit = int(limit_mib * 2**20)
    total = factor * limit  # bytes of float32 input
    L = int(total / 4 / channels)
    # (1, C, H, W, D): spatial axes chunked along D, chunk_mib per chunk
    H = W = 256
    D = max(1, L // (H * W))
    cd = max(1, int(chunk_mib * 2**20 / 4 / (H * W)))
    shape = (1, channels, H, W, D)
    chunks = (1, 1, H, W, cd)
    nbytes = 4 * math.prod(shape)
    results = {
        "input": {
            "shape": shape,
            "chunks": chunks,
            "gib": nbytes / 2**30,
            "instance_mib": nbytes / channels / 2**20,
            "worker_limit_mib": limit_mib,
            "input_over_worker_limit": nbytes / limit,
            "workers": n_workers,
        }
    }
    for schedule in schedules:
        with (
            LocalCluster(
                n_workers=n_workers,
                threads_per_worker=1,
                processes=True,
                memory_limit=limit,
                dashboard_address=None,
            ) as cluster,
            Client(cluster) as client,
        ):
            # warm each worker (imports and kernels from the cache) before the baseline
            warm = inx_dask.instance_norm(_input((1, 2, 8, 8, 64), (1, 1, 8, 8, 16), 1, 0.0))
            client.compute(_check(warm, (2, 3, 4)), sync=True)
            base = client.run(_worker_memory)
            x = _input(shape, chunks, seed, offset)
            y = inx_dask.instance_norm(x, two_pass=(schedule == "two-pass"))
            mean, var = _check(y, (2, 3, 4))
            t0 = time.perf_counter()
            status = "ok"
            with Poller(client) as poll:
                try:
                    fut = client.compute([mean, var])
                    m, v = client.gather(fut, errors="raise")
                    del fut
                except Exception as exc:  # e.g. KilledWorker when memory runs out
                    status = f"failed: {type(exc).__name__}: {str(exc)[:200]}"
                    m = v = None
            seconds = time.perf_counter() - t0
            r = {
                "status": status,
                "seconds": seconds,
                "baseline_rss_mib": {w: b["rss"] / 2**20 for w, b in base.items()},
                "peak_rss_mib": {w: p["rss"] / 2**20 for w, p in poll.peak.items()},
                "peak_managed_mib": {w: p["managed"] / 2**20 for w, p in poll.peak.items()},
                "peak_spilled_mib": {w: p["spilled"] / 2**20 for w, p in poll.peak.items()},
            }
            if m is not None:
                r["max_abs_mean"] = float(np.abs(m).max())
                r["max_abs_var_minus_1"] = float(np.abs(v - 1).max())
            results[schedule] = r
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit-mib", type=float, default=1024)
    p.add_argument("--factor", type=float, default=4.0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--chunk-mib", type=float, default=16)
    p.add_argument("--channels", type=int, default=2, help="instances (each input/channels)")
    p.add_argument("--schedules", nargs="+", default=["two-pass", "one-pass"])
    p.add_argument("--json", help="write the figures here")
    a = p.parse_args(argv)
    res = measure(
        limit_mib=a.limit_mib,
        factor=a.factor,
        n_workers=a.workers,
        chunk_mib=a.chunk_mib,
        channels=a.channels,
        schedules=tuple(a.schedules),
    )
    text = json.dumps(res, indent=2, default=str)
    print(text)
    if a.json:
        with open(a.json, "w") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
