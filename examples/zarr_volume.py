"""Normalize a float32 volume stored as Zarr, chunk by chunk, and write the result back.

The volume ``(N, C, D, H, W)`` lives on disk as a Zarr array chunked along every spatial axis,
as a microscopy or CT volume too large for memory would.  ``instance_norm`` of the Dask array
read from it builds a lazy graph (per-chunk moments, their exact merge, then the
normalization, which re-reads the store: the two-pass schedule), and ``to_zarr`` runs it,
with a progress bar, writing the result chunk by chunk.  Nothing larger than a few chunks is
ever in memory.

On a size that fits, the result is compared with the in-memory call and with the
extended-precision reference.

Needs ``pip install "instnorm_numba[dask]"`` (Dask and Zarr).

    python examples/zarr_volume.py                  # 1 x 2 x 96^3 in a temporary directory
    python examples/zarr_volume.py --size 160 --dir /tmp/volumes
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile
import time

import dask.array as da
import numpy as np
from dask.diagnostics import ProgressBar

from instnorm_numba import instance_norm
from instnorm_numba import reference as ref


def make_volume(path: pathlib.Path, size: int, chunk: int, seed: int = 0) -> None:
    """A float32 volume far from zero (1000 + a smooth field + noise), written as Zarr."""
    rng = da.random.default_rng(seed)
    shape = (1, 2, size, size, size)
    chunks = (1, 1, chunk, chunk, chunk)
    z = da.arange(size, chunks=chunk, dtype=np.float32)[None, None, :, None, None]
    vol = 1000.0 + 0.01 * z + rng.standard_normal(shape, chunks=chunks, dtype=np.float32)
    vol.astype(np.float32).to_zarr(str(path), overwrite=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=96, help="edge of the cubic volume")
    p.add_argument("--chunk", type=int, default=32, help="edge of a cubic chunk")
    p.add_argument("--dir", help="directory for the stores (default: a temporary one)")
    p.add_argument("--no-compare", action="store_true", help="skip the in-memory comparison")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(args.dir or tmp)
        root.mkdir(parents=True, exist_ok=True)
        src, dst = root / "volume.zarr", root / "normalized.zarr"
        make_volume(src, args.size, args.chunk)

        x = da.from_zarr(str(src))
        print(f"input: {x.shape} {x.dtype}, {x.nbytes / 2**20:.1f} MiB in {x.npartitions} chunks")
        weight = np.array([1.0, 2.0])
        bias = np.array([0.0, -1.0])
        y = instance_norm(x, weight, bias)  # lazy: nothing read yet
        t0 = time.perf_counter()
        with ProgressBar():
            y.to_zarr(str(dst), overwrite=True)
        print(f"normalized and written in {time.perf_counter() - t0:.2f} s -> {dst.name}")

        if not args.no_compare:
            out = np.asarray(da.from_zarr(str(dst)))
            xm = np.asarray(x)
            in_memory = instance_norm(xm, weight, bias)
            exact = ref.instance_norm(xm, weight, bias, exact=True)
            print(f"max |zarr - in-memory| = {np.abs(out - in_memory).max():.3g}")
            print(f"error vs exact: {ref.ulp_error(out, exact):.3f} eps (guarantee: 1)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
