"""Moments of one chunk of every instance around a given shift, and their exact merge.

For inputs held in pieces (Dask chunks, or any caller that sees one part of an instance at a
time), the statistics of an instance are built from the parts:

1. one shift ``K`` per instance, taken once from the part holding its first elements
   (``cf_chunk_shift`` / ``cl_chunk_shift``: the same choice as the in-memory kernels,
   ``moments.row_shift`` and ``slabs.slab_pilot``);
2. every part's ``(n, mean of x - K, M2)`` around that common ``K`` (``cf_chunk_moments`` /
   ``cl_chunk_moments``: the blocks of ``moments.row_stats`` and ``slabs.slab_moments``), so
   that the mean carried between parts is the small residual ``mean - K``, never the mean
   itself (folding a part's mean into one float64 loses the digits of data far from zero:
   1,660 epsilon of float64 at an offset of 1e4);
3. ``merge_chunks``: the parts of each instance merged in two passes over the parts: the
   residual mean ``c = sum(n_j * m_j) / n`` with the sum compensated (Neumaier), then
   ``M2 = sum(M2_j + n_j * (m_j - c)**2)``, a sum of non-negative terms.  The error of ``c``
   is about one rounding of the largest ``|m_j|`` whatever the number of parts (a chain of
   pairwise Chan updates would add one per part), and ``M2`` is within a few roundings.

``add_chunks`` adds the backward's per-part sums the same way (compensated), for
``bwd_finish``.  These kernels are serial: the parts are the caller's unit of parallelism.
"""

from __future__ import annotations

from numba import prange

from .._jit import FM_STRICT, kernel
from .moments import neumaier_add, row_shift, row_stats
from .slabs import slab_moments, slab_pilot


@kernel(fastmath=FM_STRICT, parallel=True)
def cf_chunk_shift(x, K_out):
    """The shift of every row of ``(R, L)`` rows, as the in-memory kernels take it."""
    for r in prange(x.shape[0]):
        K_out[r] = row_shift(x[r])


@kernel(fastmath=FM_STRICT, parallel=True)
def cl_chunk_shift(x, K_out):
    """Per-channel shifts ``(N, C)`` of ``(N, L, C)`` slabs (median of three rows)."""
    for n in prange(x.shape[0]):
        slab_pilot(x[n], K_out[n])


@kernel(fastmath=FM_STRICT, parallel=True)
def cf_chunk_moments(x, K, mean_out, m2_out):
    """``(mean of x - K, M2)`` of every row of ``(R, L)`` around the given ``K`` (R,)."""
    L = x.shape[1]
    for r in prange(x.shape[0]):
        _, mean_out[r], m2_out[r] = row_stats(x[r], 0, L, K[r])


@kernel(fastmath=FM_STRICT, parallel=True)
def cl_chunk_moments(x, K, mean_out, m2_out):
    """Per-channel ``(mean of x - K, M2)`` of ``(N, L, C)`` slabs around ``K`` (N, C)."""
    L = x.shape[1]
    for n in prange(x.shape[0]):
        slab_moments(x[n], 0, L, K[n], mean_out[n], m2_out[n])


@kernel(fastmath=FM_STRICT)
def merge_chunks(pn, pmean, pm2, n_out, mean_out, m2_out):
    """Merge parts ``(G, k)`` (count, mean of x - K, M2; one K per row ``g``) into ``(G,)``.

    Parts with no elements are skipped; an instance with none has count 0, mean 0 and M2 0
    (the caller makes its statistics NaN)."""
    G = pn.shape[0]
    k = pn.shape[1]
    for g in range(G):
        n = 0.0
        s = 0.0
        comp = 0.0
        for j in range(k):
            nj = pn[g, j]
            if nj > 0.0:
                n += nj
                s, comp = neumaier_add(s, comp, nj * pmean[g, j])
        if n == 0.0:
            n_out[g] = 0.0
            mean_out[g] = 0.0
            m2_out[g] = 0.0
            continue
        c = (s + comp) / n
        m2 = 0.0
        m2c = 0.0
        for j in range(k):
            nj = pn[g, j]
            if nj > 0.0:
                d = pmean[g, j] - c
                m2, m2c = neumaier_add(m2, m2c, pm2[g, j] + nj * (d * d))
        n_out[g] = n
        mean_out[g] = c
        m2_out[g] = m2 + m2c


@kernel(fastmath=FM_STRICT)
def add_chunks(parts, out):
    """Compensated (Neumaier) sums of ``(G, k)`` parts into ``(G,)``."""
    for g in range(parts.shape[0]):
        s = 0.0
        comp = 0.0
        for j in range(parts.shape[1]):
            s, comp = neumaier_add(s, comp, parts[g, j])
        out[g] = s + comp
