"""Dask arrays against the in-memory call on the same workload (threaded scheduler).

``DaskForward.time_dask`` over ``DaskForward.time_in_memory`` is Dask's overhead, for a
chunking with whole spatial axes (one in-memory call per chunk) and one with the spatial
axes split in two (chunk moments, exact merge, apply).  The class is absent when Dask is not
installed (the rest of the suite runs without it); versions without Dask support skip it.
"""

from __future__ import annotations

from . import common
from .common import data

try:
    import dask
    import dask.array as da
except ImportError:  # pragma: no cover - the suite runs without dask
    dask = None

CHUNKINGS = ["whole_spatial", "split_spatial"]


def chunks_for(shape, chunking):
    """One sample per chunk; the spatial axes whole, or each cut in two."""
    spatial = shape[2:]
    if chunking == "split_spatial":
        spatial = tuple(max(1, (s + 1) // 2) for s in spatial)
    return (1, shape[1]) + tuple(spatial)


if dask is not None:

    class DaskForward:
        """``instance_norm`` of ``da.from_array(x, chunks)``, computed, against the NumPy call."""

        params = [["batch", "3d"], ["float32", "float64"], CHUNKINGS]
        param_names = ["case", "dtype", "chunking"]
        timeout = 300

        def setup(self, case, dtype, chunking):
            from instnorm_numba import instance_norm

            try:
                from instnorm_numba import dask as _  # noqa: F401
            except ImportError:
                raise NotImplementedError("this version has no Dask support") from None
            self.fn = instance_norm
            self.x = data(case, dtype, "channels_first")[0]
            self.X = da.from_array(self.x, chunks=chunks_for(self.x.shape, chunking))
            self.workers = common.threads()
            self.run()  # kernels loaded before anything is timed

        def run(self):
            with dask.config.set(num_workers=self.workers):
                return self.fn(self.X).compute(scheduler="threads")

        def time_dask(self, case, dtype, chunking):
            self.run()

        def time_in_memory(self, case, dtype, chunking):
            self.fn(self.x)

        def peakmem_dask(self, case, dtype, chunking):
            self.run()
