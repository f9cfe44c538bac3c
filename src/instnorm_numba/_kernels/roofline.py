"""The roofline: a parallel copy of the same bytes, the speed limit of a normalization.

Instance normalization reads every element once and writes it once, so on a CPU it cannot
beat a copy of its input into a preallocated buffer.  ``instnorm-numba bench`` and the asv
suite time this one kernel (through ``instnorm_numba.benchmark.roofline_copy``) beside ours.
"""

from __future__ import annotations

from numba import prange

from .._jit import FM_STRICT, kernel


@kernel(fastmath=FM_STRICT, parallel=True)
def copy_chunks(src, dst, nchunks):
    """``dst[:] = src`` for flat arrays, in ``nchunks`` contiguous chunks, one per task."""
    n = src.shape[0]
    chunk = (n + nchunks - 1) // nchunks
    for t in prange(nchunks):
        s = min(t * chunk, n)
        e = min(s + chunk, n)
        a = src[s:e]
        b = dst[s:e]
        for i in range(a.shape[0]):
            b[i] = a[i]
