"""Masks, channels-first rows: statistics over the valid elements only, forward and backward.

A mask is canonical like ``x``: ``(N * Cm, L)`` rows of ``uint8`` 0/1, ``Cm`` being 1 (one mask
for every channel) or ``C``. Moments are the dense ones with a select: ``d = x - K`` where
valid, ``0`` elsewhere (a select, never a product, so a NaN or Inf in an invalid position cannot
reach the sums), the count of valid elements taken per block in the same loop, the blocks merged
with Chan et al.'s update weighted by their counts (``moments.merge_moments``). The shift ``K``
is a valid element (the first), or for long float32/float16 rows the mean of the valid elements
of the first block, which keeps the one-pass bound of ``moments`` with ``n0 >= 1``. float64
keeps the corrected two-pass blocks. The apply is the dense one (folded when the dtype allows,
float16 in float32 arithmetic when ``half32_ok``) followed by a select of 0.

An instance with no valid element gets NaN statistics, zeros in its output and zero sums in the
backward. The counts are returned (float64) for the running update.

Rows few against the threads are split into chunks, as the dense ones are (``cf_mask_shift``,
``cf_mask_partial``, ``moments.merge_partials``, ``cf_mask_apply``; backward
``cf_bwd_mask_partial``, ``moments.bwd_finish``, ``cf_bwd_mask_apply``).
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
from .lengths import zero_fill
from .moments import (
    BLOCK,
    BLOCK_ONEPASS,
    SHIFT_FROM_MEAN,
    bwd_coeffs,
    merge_moments,
    task_span,
)
from .rows_backward import row_bwd_sums

# --------------------------------------------------------------------------------------------
# masks, channels-first rows: x (R, L), mask rows (N * Cm, L) of 0/1


@kernel(fastmath=FM_STRICT)
def first_valid(m):
    """Index of the first nonzero of a 1-D mask, or -1."""
    for i in range(m.shape[0]):
        if m[i] != 0:
            return i
    return -1


@kernel(fastmath=FM_REDUCE)
def _mblock_sum(x, m, start, stop, K):
    """(count, sum of x - K) over the valid elements of ``start:stop``."""
    xs = x[start:stop]
    ms = m[start:stop]
    s = 0.0
    cnt = 0
    for i in range(xs.shape[0]):
        d = _sub(to64(xs[i]), K)
        v = ms[i] != 0
        s += d if v else 0.0
        cnt += ms[i]
    return cnt, s


@kernel(fastmath=FM_REDUCE)
def _mblock_m2(x, m, start, stop, K, mb):
    """(sum d, sum d*d), d = (x - K) - mb over the valid elements: as ``_block_m2``."""
    xs = x[start:stop]
    ms = m[start:stop]
    s1 = 0.0
    s2 = 0.0
    for i in range(xs.shape[0]):
        d = _sub(_sub(to64(xs[i]), K), mb)
        d = d if ms[i] != 0 else 0.0
        s1 += d
        s2 += d * d
    return s1, s2


@kernel(fastmath=FM_REDUCE)
def _mblock_sums(x, m, start, stop, K):
    """(count, sum d, sum d*d), d = x - K over the valid elements (one pass)."""
    xs = x[start:stop]
    ms = m[start:stop]
    s1 = 0.0
    s2 = 0.0
    cnt = 0
    for i in range(xs.shape[0]):
        d = _sub(to64(xs[i]), K)
        d = d if ms[i] != 0 else 0.0
        s1 += d
        s2 += d * d
        cnt += ms[i]
    return cnt, s1, s2


@kernel(fastmath=FM_STRICT)
def mblock_moments(x, m, b, e, K):
    """(count, mean of x - K, M2) over the valid elements of ``x[b:e]``: ``block_moments``
    with a mask."""
    if wide(x):
        cnt, s = _mblock_sum(x, m, b, e, K)
        if cnt == 0:
            return 0.0, 0.0, 0.0
        nb = float(cnt)
        mb = s / nb
        sd, m2b = _mblock_m2(x, m, b, e, K, mb)
        mb += sd / nb
        m2b -= sd * (sd / nb)
    else:
        cnt, s1, s2 = _mblock_sums(x, m, b, e, K)
        if cnt == 0:
            return 0.0, 0.0, 0.0
        nb = float(cnt)
        mb = s1 / nb
        m2b = s2 - s1 * mb
    if m2b < 0.0:  # (not max(): NaN must survive)
        m2b = 0.0
    return nb, mb, m2b


@kernel(fastmath=FM_STRICT)
def mrow_shift(x, m, f):
    """The shift of a masked row whose first valid element is ``x[f]``: that element, or the
    mean of the valid elements among the BLOCK from there for float64 rows and for rows longer
    than SHIFT_FROM_MEAN.  Close to the row's mean, it keeps the roundings of the block merges
    small (every merge rounds the running mean of ``x - K``: float64 has no spare bits for
    them), and bounds the one-pass error of long float32/float16 rows as ``row_shift`` does.
    (Short float32/float16 rows skip it: a third of a pass for L = 3000.)"""
    K = to64(x[f])
    L = x.shape[0]
    if wide(x) or L > SHIFT_FROM_MEAN:
        cnt, s = _mblock_sum(x, m, f, min(L, f + BLOCK), K)
        K = K + s / cnt
    return K


@kernel(fastmath=FM_STRICT)
def mrow_stats(x, m, start, stop, K):
    """(count, mean of x - K, M2) over the valid elements of ``x[start:stop]``."""
    step = BLOCK if wide(x) else BLOCK_ONEPASS
    n = mean = cmean = m2 = comp = 0.0
    b = start
    while b < stop:
        e = min(b + step, stop)
        nb, mb, m2b = mblock_moments(x, m, b, e, K)
        n, mean, cmean, m2, comp = merge_moments(n, mean, cmean, m2, comp, nb, mb, m2b)
        b = e
    return n, mean + cmean, m2 + comp


@kernel(fastmath=FM_APPLY)
def _mrow_apply(x, m, y, K, c, a, b):
    ms = m
    z = cast_like(0.0, y)
    for i in range(x.shape[0]):
        d = _sub(_sub(to64(x[i]), K), c)
        v = cast_like(d * a + b, y)
        y[i] = v if ms[i] != 0 else z


@kernel(fastmath=FM_APPLY)
def _mrow_apply_folded(x, m, y, M, a, b):
    z = cast_like(0.0, y)
    for i in range(x.shape[0]):
        v = affine_like(x[i], M, a, b, y)
        y[i] = v if m[i] != 0 else z


@kernel(fastmath=FM_STRICT)
def mrow_normalize(x, m, y, K, c, a, b):
    """``y = ((x - K) - c) * a + b`` where ``m`` is set, 0 elsewhere (see ``row_normalize``)."""
    if not wide(x):
        M = K + c
        if half(x) and half32_ok(M, a, b):
            _mrow_apply_folded(x, m, y, np.float32(M), np.float32(a), f64_to_f32_odd(b))
            return
        if abs(M * a) <= FOLD_LIMIT:
            _mrow_apply_folded(x, m, y, M, a, b)
            return
    _mrow_apply(x, m, y, K, c, a, b)


@kernel(fastmath=FM_STRICT)
def mask_row(mask, r, C, Cm):
    """The mask row of instance row ``r``."""
    n = r // C
    return mask[n * Cm + (r - n * C if Cm > 1 else 0)]


@kernel(fastmath=FM_STRICT, parallel=True)
def cf_mask_fused(x, mask, Cm, y, w, b, C, eps, mean_out, var_out, count_out):
    """Masked statistics and normalization of each row in one task."""
    R = x.shape[0]
    L = x.shape[1]
    for r in prange(R):
        mr = mask_row(mask, r, C, Cm)
        f = first_valid(mr)
        if f < 0:
            mean_out[r] = np.nan
            var_out[r] = np.nan
            count_out[r] = 0.0
            zero_fill(y[r], 0)
        else:
            xr = x[r]
            K = mrow_shift(xr, mr, f)
            n, c, m2 = mrow_stats(xr, mr, f, L, K)
            var = m2 / n
            rstd = 1.0 / np.sqrt(var + eps)
            ch = r % C
            zero_fill(y[r, :f], 0)
            mrow_normalize(xr[f:], mr[f:], y[r, f:], K, c, rstd * w[ch], b[ch])
            mean_out[r] = K + c
            var_out[r] = var
            count_out[r] = n


@kernel(fastmath=FM_STRICT, parallel=True)
def cf_mask_apply(x, mask, Cm, y, C, nchunks, K, c, a, b):
    """``y = ((x - K) - c) * a + b`` where valid, 0 elsewhere, per-row coefficients: tasks
    ``R * nchunks``, in the reverse order of ``cf_mask_partial``'s (see ``rows.cf_apply``)."""
    R = x.shape[0]
    T = R * nchunks
    for t0 in prange(T):
        r, j, s, e = task_span(T - 1 - t0, nchunks, x.shape[1])
        mr = mask_row(mask, r, C, Cm)
        mrow_normalize(x[r, s:e], mr[s:e], y[r, s:e], K[r], c[r], a[r], b[r])


# few long rows, split across the threads: the shift of each row, then the moments of each
# chunk around it (merged by ``moments.merge_partials``), then ``cf_mask_apply``


@kernel(fastmath=FM_STRICT, parallel=True)
def cf_mask_shift(x, mask, Cm, C, K_out):
    """The shift of each masked row (``mrow_shift``; 0 for a row with no valid element)."""
    for r in prange(x.shape[0]):
        mr = mask_row(mask, r, C, Cm)
        f = first_valid(mr)
        K_out[r] = mrow_shift(x[r], mr, f) if f >= 0 else 0.0


@kernel(fastmath=FM_STRICT, parallel=True)
def cf_mask_partial(x, mask, Cm, C, nchunks, K, pn, pmean, pm2):
    """Count and moments of the valid elements of each of ``nchunks`` chunks of every row."""
    R = x.shape[0]
    for t in prange(R * nchunks):
        r, j, s, e = task_span(t, nchunks, x.shape[1])
        n, mean, m2 = mrow_stats(x[r], mask_row(mask, r, C, Cm), s, e, K[r])
        pn[r, j] = n
        pmean[r, j, 0] = mean
        pm2[r, j, 0] = m2


# backward, channels-first masks


@kernel(fastmath=FM_APPLY)
def mrow_bwd_apply(x, dy, m, dx, mu, xbar, a, mdy, k):
    z = cast_like(0.0, dx)
    for i in range(x.shape[0]):
        e = _sub(_sub(to64(x[i]), mu), xbar)
        t = _sub(to64(dy[i]), mdy)
        v = cast_like(a * t - e * k, dx)
        dx[i] = v if m[i] != 0 else z


@kernel(fastmath=FM_STRICT, parallel=True)
def cf_bwd_mask_fused(x, dy, dx, mask, Cm, count, mean, rstd, w, C, sdy_out, sdyx_out):
    """Both backward sweeps of each masked row; ``dx`` is 0 where invalid."""
    R = x.shape[0]
    for r in prange(R):
        mr = mask_row(mask, r, C, Cm)
        n = count[r]
        if n == 0.0:
            zero_fill(dx[r], 0)
            sdy_out[r] = 0.0
            sdyx_out[r] = 0.0
        else:
            mu = mean[r]
            s0, s1, s2 = row_bwd_sums(x[r], dy[r], 0, x.shape[1], mu, mr)
            xbar, a, mdy, k, sdyx = bwd_coeffs(n, s0, s1, s2, rstd[r], w[r % C])
            mrow_bwd_apply(x[r], dy[r], mr, dx[r], mu, xbar, a, mdy, k)
            sdy_out[r] = s0
            sdyx_out[r] = sdyx


@kernel(fastmath=FM_REDUCE)
def count_valid(m, start, stop):
    """Valid elements of ``m[start:stop]``, a row of a 0/1 mask."""
    ms = m[start:stop]
    s = 0
    for i in range(ms.shape[0]):
        s += ms[i]
    return s


@kernel(fastmath=FM_STRICT, parallel=True)
def cf_mask_count(mask, Cm, R, C, count_out):
    """Valid elements of each row's instance (for the backward, which gets no counts)."""
    for r in prange(R):
        mr = mask_row(mask, r, C, Cm)
        count_out[r] = float(count_valid(mr, 0, mr.shape[0]))


# few long rows, split across the threads: chunk sums (added by ``moments.bwd_finish``), then
# the second sweep by chunks


@kernel(fastmath=FM_STRICT, parallel=True)
def cf_bwd_mask_partial(x, dy, mask, Cm, C, mean, nchunks, ps0, ps1, ps2, pc):
    """Backward sums of the valid elements of each of ``nchunks`` chunks of every row, and
    their count ``pc`` (the chunk's mask is in cache: a separate ``cf_mask_count`` of one long
    row ran on one thread, 0.11 ms of a 1.39 ms backward of 2^21 float32 elements)."""
    R = x.shape[0]
    for t in prange(R * nchunks):
        r, j, s, e = task_span(t, nchunks, x.shape[1])
        mr = mask_row(mask, r, C, Cm)
        ps0[r, j, 0], ps1[r, j, 0], ps2[r, j, 0] = row_bwd_sums(x[r], dy[r], s, e, mean[r], mr)
        pc[r, j, 0] = float(count_valid(mr, s, e))


@kernel(fastmath=FM_STRICT, parallel=True)
def cf_bwd_mask_apply(x, dy, dx, mask, Cm, C, nchunks, m, xbar, a, mdy, k):
    """Second backward sweep where valid, 0 elsewhere: tasks ``R * nchunks``."""
    R = x.shape[0]
    for t in prange(R * nchunks):
        r, j, s, e = task_span(t, nchunks, x.shape[1])
        mr = mask_row(mask, r, C, Cm)
        xs, gs, ms, ds = x[r, s:e], dy[r, s:e], mr[s:e], dx[r, s:e]
        mrow_bwd_apply(xs, gs, ms, ds, m[r], xbar[r], a[r], mdy[r], k[r])
