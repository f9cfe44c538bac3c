"""Dask's overhead against the in-memory call, and 1 vs 2 workers on a LocalCluster.

Run under the machine's benchmark lock (``flock /work/bench.lock python scripts/bench_dask.py``);
medians of ``--repeat`` runs, every ratio taken within one run.

1. **Overhead** (threaded scheduler, the input a NumPy array in memory wrapped by
   ``da.from_array``): ``instance_norm(x)`` in memory against
   ``instance_norm(da.from_array(x, chunks)).compute()`` (graph building included) for a
   chunking with whole spatial axes (the fused per-chunk path) and one with split spatial
   axes (moments, merge, apply: two passes over the data); and ``da.store`` of the result
   into a preallocated array against the in-memory call with ``out=`` (no final
   concatenation on either side).  Also the fused path with Numba's
   own threads inside each task (``TASK_THREADS = 2``) against serial tasks.
2. **Workers**: a lazily generated input (seeded random, on the workers) normalized and
   reduced to per-instance sums on a ``LocalCluster`` of 1 and of 2 single-threaded worker
   processes; the same generation and reduction without the normalization is timed too,
   so the normalization's own cost is the difference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np


def _median_ms(fn, repeat):
    fn()  # warm-up (kernels loaded, graphs' code paths imported)
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)


def overhead(shape, chunkings, repeat, dtype="float32"):
    import dask
    import dask.array as da

    from instnorm_numba import _dask_blocks as inx_dask
    from instnorm_numba import instance_norm

    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape, dtype=np.float32) * 2 + 0.5).astype(dtype)
    out = {"shape": shape, "dtype": dtype, "MB": x.nbytes / 1e6}
    ms_mem = _median_ms(lambda: instance_norm(x), repeat)
    out["in-memory ms"] = ms_mem
    y = np.empty_like(x)
    ms_out = _median_ms(lambda: instance_norm(x, out=y), repeat)
    out["in-memory out= ms"] = ms_out
    rows = []
    for name, chunks in chunkings.items():
        X = da.from_array(x, chunks=chunks)

        def run(X=X):
            return instance_norm(X).compute(scheduler="threads")

        buf = np.empty_like(x)

        def store(X=X, buf=buf):
            da.store(instance_norm(X), buf, lock=False, scheduler="threads")

        row = {"chunking": name, "chunks": str(chunks), "tasks": X.npartitions}
        with dask.config.set(num_workers=2):
            row["dask ms"] = _median_ms(run, repeat)
            row["dask store ms"] = _median_ms(store, repeat)
        row["dask / in-memory"] = row["dask ms"] / ms_mem
        row["dask store / in-memory out="] = row["dask store ms"] / ms_out
        if name.startswith("whole"):
            old = inx_dask.TASK_THREADS
            inx_dask.TASK_THREADS = 2
            try:
                with dask.config.set(num_workers=2):
                    row["dask ms, 2 Numba threads per task"] = _median_ms(run, repeat)
            finally:
                inx_dask.TASK_THREADS = old
        rows.append(row)
    out["rows"] = rows
    return out


def workers(shape, chunks, repeat, counts=(1, 2)):
    import dask.array as da
    from distributed import Client, LocalCluster

    from instnorm_numba import instance_norm

    spatial = tuple(range(2, len(shape)))

    def source():
        rng = da.random.default_rng(0)
        return rng.standard_normal(shape, chunks=chunks, dtype="float32") + 100.0

    res = {"shape": shape, "chunks": chunks, "GB": 4 * np.prod(shape) / 1e9, "rows": []}
    for n in counts:
        with (
            LocalCluster(
                n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None
            ) as cluster,
            Client(cluster) as client,
        ):
            norm = _median_ms(
                lambda: client.compute(instance_norm(source()).sum(axis=spatial), sync=True),
                repeat,
            )
            base = _median_ms(lambda: client.compute(source().sum(axis=spatial), sync=True), repeat)
        res["rows"].append(
            {
                "workers": n,
                "generate+normalize+sum ms": norm,
                "generate+sum ms": base,
                "normalize ms (difference)": norm - base,
            }
        )
    r1, r2 = res["rows"][0], res["rows"][-1]
    res["speed-up 1 -> 2 workers (whole)"] = (
        r1["generate+normalize+sum ms"] / r2["generate+normalize+sum ms"]
    )
    res["speed-up 1 -> 2 workers (normalize alone)"] = (
        r1["normalize ms (difference)"] / r2["normalize ms (difference)"]
    )
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--json", help="write the figures here")
    a = p.parse_args(argv)
    import os

    results = {"load average": os.getloadavg()}
    results["overhead, batch"] = overhead(
        (8, 32, 64, 64),
        {
            "whole spatial, 1 sample per chunk": (1, 32, 64, 64),
            "whole spatial, 8 channels per chunk": (8, 8, 64, 64),
            "spatial split in 4": (8, 32, 32, 32),
        },
        a.repeat,
    )
    results["overhead, 3-D"] = overhead(
        (2, 32, 64, 64, 64),
        {
            "whole spatial, 8 channels per chunk": (1, 8, 64, 64, 64),
            "spatial split in 8": (1, 8, 32, 32, 64),
        },
        a.repeat,
    )
    shape = (4, 8, 128, 128, 128)
    rep = max(3, a.repeat // 2)
    results["workers, whole spatial"] = workers(shape, (1, 2, 128, 128, 128), rep)
    results["workers, spatial split"] = workers(shape, (1, 2, 128, 128, 64), rep)
    text = json.dumps(results, indent=2, default=float)
    print(text)
    if a.json:
        with open(a.json, "w") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
