"""Shared data, warm-up and peers for the asv benchmarks.

The cases, the roofline copy and the peers come from :mod:`instnorm_numba.benchmark`, the one
table ``instnorm-numba bench`` reads too.  asv calls ``setup`` before every timed run, so
everything expensive (random data, the first call that loads or compiles a kernel, building a
peer's session) sits in cached module-level helpers and ``setup`` only looks it up.  Only the
public API of instnorm_numba is used; a commit older than the table is skipped.
"""

from __future__ import annotations

import functools

import numba
import numpy as np

try:
    from instnorm_numba import benchmark as table
except ImportError:  # a commit from before the shared table: nothing to time
    table = None

DTYPES = list(table.DTYPES) if table else []
LAYOUTS = list(table.LAYOUTS) if table else []
PARAMS = [list(table.SHAPES), DTYPES, LAYOUTS] if table else [[], [], []]
#: run the table's small stand-in shapes instead (the smoke test sets this)
SMALL = False
PARAM_NAMES = ["case", "dtype", "layout"]

#: the extended-precision reference is timed only up to this many elements
REFERENCE_MAX_ELEMENTS = 1 << 22


def require_table():
    if table is None:
        raise NotImplementedError("this commit has no instnorm_numba.benchmark table")


@functools.cache
def threads() -> int:
    """Numba's thread count, after one call of ours has let the library pick its threading
    layer (launching the pool first, for a peer, would fix Numba's default layer instead)."""
    from instnorm_numba import instance_norm

    instance_norm(np.zeros((1, 1, 2), np.float32))
    return numba.get_num_threads()


def channel_axis(layout: str) -> int:
    return -1 if layout == "channels_last" else 1


def case(case_id: str, dtype: str, layout: str):
    require_table()
    return table.Case(case_id, dtype, layout, small=SMALL)


@functools.lru_cache(maxsize=2)
def data(case_id: str, dtype: str, layout: str):
    """(x, weight, bias, out, dy): the table's deterministic inputs, and a result buffer."""
    x, weight, bias = table.make_input(case(case_id, dtype, layout))
    dy = np.random.default_rng(1).standard_normal(x.shape, dtype=np.float32).astype(dtype)
    return x, weight, bias, np.empty_like(x), dy


@functools.cache
def warm(case_id: str, dtype: str, layout: str):
    """Call ours and the copy once, so that kernels are loaded (or compiled) before anything is
    timed."""
    from instnorm_numba import instance_norm

    x, w, b, out, _ = data(case_id, dtype, layout)
    instance_norm(x, w, b, channel_axis=channel_axis(layout), out=out)
    table.roofline_copy(x, out)
    return True


@functools.lru_cache(maxsize=2)
def peer(name: str, case_id: str, dtype: str, layout: str):
    """The peer's callable for this case; NotImplementedError (asv: skipped) when it is not
    installed or cannot run the case."""
    require_table()
    x, w, b, _, _ = data(case_id, dtype, layout)
    fn, why = table.peer_forward(name, x, w, b, channel_axis(layout), threads())
    if fn is None:
        raise NotImplementedError(f"{name}: {why}")
    return fn


@functools.lru_cache(maxsize=2)
def torch_backward(case_id: str, dtype: str, layout: str):
    require_table()
    x, w, _, _, dy = data(case_id, dtype, layout)
    fn, why = table.torch_backward(x, w, dy, channel_axis(layout), threads())
    if fn is None:
        raise NotImplementedError(f"torch: {why}")
    return fn


#: the cached helpers the smoke test clears when it swaps the shapes
CACHED = (data, warm, peer, torch_backward)
