"""Channels-first forward: one contiguous row ``x[r]`` of length ``L`` per ``(n, c)`` instance.

* ``cf_fused``: one task per row: shift, moments (``moments.row_stats``), normalization, while
  the row is hot in cache.
* ``cf_partial`` + ``moments.merge_partials`` + ``cf_apply``: few long rows, split into chunks
  across threads.  The apply visits the chunks in the reverse order, so the part of an input
  larger than the last-level cache read last is still in it.
* ``cf_short``: many short rows (``L <= SHORT_ROW``), a block of rows per task, statistics of
  the whole block first; float32 rows of at most 16 elements eight at a time in vector IR
  (``vector.rows8``).

The normalization is ``y = ((x - K) - c) * a + b`` with ``a = rstd * weight``, in float64 and
rounded once; float32/float16 rows fold the shift into one subtraction while the dtype leaves
room (``row_normalize``, see ``elements``).
"""

from __future__ import annotations

import numpy as np
from numba import prange

from .._jit import FM_APPLY, FM_REDUCE, FM_STRICT, kernel
from .elements import (
    FOLD_LIMIT,
    _sub,
    affine_like,
    cast_like,
    f64_to_f32_odd,
    half,
    half32_ok,
    to64,
    wide,
)
from .moments import row_shift, row_stats, task_span
from .vector import SIMD_ROW, rows8, simd_rows


@kernel(fastmath=FM_APPLY)
def row_apply(x, y, start, stop, K, c, a, b):
    xs = x[start:stop]
    ys = y[start:stop]
    for i in range(xs.shape[0]):
        d = _sub(_sub(to64(xs[i]), K), c)
        ys[i] = cast_like(d * a + b, ys)


@kernel(fastmath=FM_APPLY)
def _row_apply_folded(x, y, start, stop, M, a, b):
    """``y = (x - M) * a + b``: float64 coefficients, or float32 ones for float16 data."""
    xs = x[start:stop]
    ys = y[start:stop]
    for i in range(xs.shape[0]):
        ys[i] = affine_like(xs[i], M, a, b, ys)


@kernel(fastmath=FM_STRICT)
def row_normalize(x, y, start, stop, K, c, a, b):
    """``y = ((x - K) - c) * a + b``, with one subtraction when the dtype leaves room."""
    if not wide(x):
        M = K + c
        if half(x) and half32_ok(M, a, b):
            _row_apply_folded(x, y, start, stop, np.float32(M), np.float32(a), f64_to_f32_odd(b))
            return
        if abs(M * a) <= FOLD_LIMIT:
            _row_apply_folded(x, y, start, stop, M, a, b)
            return
    row_apply(x, y, start, stop, K, c, a, b)


# --------------------------------------------------------------------------------------------
# channels-first kernels


@kernel(fastmath=FM_STRICT, parallel=True)
def cf_fused(x, y, w, b, C, eps, mean_out, var_out):
    """Statistics and normalization of each row in one task, while the row is hot in cache."""
    R = x.shape[0]
    L = x.shape[1]
    for r in prange(R):
        xr = x[r]
        K = row_shift(xr)
        n, c, m2 = row_stats(xr, 0, L, K)
        var = m2 / L
        rstd = 1.0 / np.sqrt(var + eps)
        ch = r % C
        row_normalize(xr, y[r], 0, L, K, c, rstd * w[ch], b[ch])
        mean_out[r] = K + c
        var_out[r] = var


@kernel(fastmath=FM_STRICT, parallel=True)
def cf_partial(x, nchunks, K_out, pn, pmean, pm2):
    """Moments of each of ``nchunks`` chunks of every row: tasks ``R * nchunks``."""
    R = x.shape[0]
    L = x.shape[1]
    for t in prange(R * nchunks):
        r, j, s, e = task_span(t, nchunks, L)
        xr = x[r]
        K = row_shift(xr)
        n, mean, m2 = row_stats(xr, s, e, K)
        pn[r, j] = n
        pmean[r, j, 0] = mean
        pm2[r, j, 0] = m2
        if j == 0:
            K_out[r] = K


@kernel(fastmath=FM_STRICT, parallel=True)
def cf_apply(x, y, nchunks, K, c, a, b):
    """``y = ((x - K) - c) * a + b`` with per-row K, c, a, b: tasks ``R * nchunks``.

    Chunks run in the reverse order of ``cf_partial``'s: the ones its pass read last are the
    ones still in the last-level cache when an input larger than the cache comes back.
    """
    R = x.shape[0]
    L = x.shape[1]
    T = R * nchunks
    for t0 in prange(T):
        t = T - 1 - t0
        r, j, s, e = task_span(t, nchunks, L)
        row_normalize(x[r], y[r], s, e, K[r], c[r], a[r], b[r])


# --------------------------------------------------------------------------------------------
# short rows: many tiny instances (L up to SHORT_ROW)
#
# Per-row overhead dominates here: no slices, no blocks, no merges, no division to find the
# channel.  The shift is the row's first element, so the one-pass sums lose at most
# ``L * 2**-53`` of M2 relative (``M2 >= (K - mean)**2``).

#: rows up to this length take the short-row kernel
SHORT_ROW = 256
#: rows per task of the short-row kernel
SHORT_ROWS_PER_TASK = 64


@kernel(fastmath=FM_REDUCE)
def _short_sums(x, r, K):
    s1 = 0.0
    s2 = 0.0
    for i in range(x.shape[1]):
        d = _sub(to64(x[r, i]), K)
        s1 += d
        s2 += d * d
    return s1, s2


@kernel(fastmath=FM_REDUCE)
def _short_sum(x, r, K):
    s = 0.0
    for i in range(x.shape[1]):
        s += _sub(to64(x[r, i]), K)
    return s


@kernel(fastmath=FM_REDUCE)
def _short_m2(x, r, K, c):
    """(sum d, sum d*d), d = (x - K) - c: corrected two-pass, as ``_block_m2``."""
    s1 = 0.0
    s2 = 0.0
    for i in range(x.shape[1]):
        d = _sub(_sub(to64(x[r, i]), K), c)
        s1 += d
        s2 += d * d
    return s1, s2


@kernel(fastmath=FM_APPLY)
def _short_apply_folded(x, y, r, M, a, b):
    for i in range(x.shape[1]):
        y[r, i] = affine_like(x[r, i], M, a, b, y)


@kernel(fastmath=FM_APPLY)
def _short_apply(x, y, r, K, c, a, b):
    for i in range(x.shape[1]):
        d = _sub(_sub(to64(x[r, i]), K), c)
        y[r, i] = cast_like(d * a + b, y)


@kernel(fastmath=FM_STRICT)
def _short_block_onepass(x, y, r0, r1, w, b, C, eps, mean_out, var_out):
    """Rows r0..r1 of float32/float16 input, in two phases, so that no row's statistics ->
    sqrt -> normalization chain of latencies stands between two rows: the statistics of the
    whole block first (independent rows overlap in the out-of-order window), then the
    normalization."""
    L = x.shape[1]
    inv_l = 1.0 / L
    for r in range(r0, r1):
        K = to64(x[r, 0])
        s1, s2 = _short_sums(x, r, K)
        c = s1 * inv_l
        m2 = s2 - s1 * c
        if m2 < 0.0:
            m2 = 0.0
        mean_out[r] = K + c
        var_out[r] = m2 * inv_l
    ch = r0 % C
    for r in range(r0, r1):
        M = mean_out[r]
        a = w[ch] / np.sqrt(var_out[r] + eps)
        if abs(M * a) <= FOLD_LIMIT:
            if half(x) and half32_ok(M, a, b[ch]):
                _short_apply_folded(x, y, r, np.float32(M), np.float32(a), f64_to_f32_odd(b[ch]))
            else:
                _short_apply_folded(x, y, r, M, a, b[ch])
        else:  # far from zero: the exact form needs K and c apart (recomputed, same values)
            K = to64(x[r, 0])
            c = _short_sums(x, r, K)[0] * inv_l
            _short_apply(x, y, r, K, c, a, b[ch])
        ch += 1
        if ch == C:
            ch = 0


@kernel(fastmath=FM_STRICT, parallel=True)
def cf_short(x, y, w, b, C, eps, mean_out, var_out):
    """``cf_fused`` for short rows (``0 < L <= SHORT_ROW``): a block of rows per task."""
    R = x.shape[0]
    L = x.shape[1]
    ntasks = (R + SHORT_ROWS_PER_TASK - 1) // SHORT_ROWS_PER_TASK
    for t in prange(ntasks):
        r0 = t * SHORT_ROWS_PER_TASK
        r1 = min(r0 + SHORT_ROWS_PER_TASK, R)
        if wide(x):
            ch = r0 % C
            for r in range(r0, r1):
                K = to64(x[r, 0])
                c = _short_sum(x, r, K) / L
                sd, s2 = _short_m2(x, r, K, c)
                c += sd / L
                m2 = s2 - sd * (sd / L)
                if m2 < 0.0:  # (not max(): NaN must survive)
                    m2 = 0.0
                var = m2 / L
                _short_apply(x, y, r, K, c, w[ch] / np.sqrt(var + eps), b[ch])
                mean_out[r] = K + c
                var_out[r] = var
                ch += 1
                if ch == C:
                    ch = 0
        elif simd_rows(x, y) and L <= SIMD_ROW:
            r = r0
            ch = r0 % C
            while r + 8 <= r1:
                if rows8(x, y, r, ch, w, b, eps, mean_out, var_out) == 0:
                    _short_block_onepass(x, y, r, r + 8, w, b, C, eps, mean_out, var_out)
                r += 8
                ch += 8
                while ch >= C:
                    ch -= C
            if r < r1:
                _short_block_onepass(x, y, r, r1, w, b, C, eps, mean_out, var_out)
        else:
            _short_block_onepass(x, y, r0, r1, w, b, C, eps, mean_out, var_out)
