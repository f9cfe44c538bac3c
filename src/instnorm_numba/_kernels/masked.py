"""Masked and variable-length forward and backward: statistics over the valid elements only.

Two ways to name the valid elements, each in both layouts:

* ``lengths`` (one spatial axis): the first ``lengths[n]`` positions of sample ``n``.  The
  valid part of a row ``x[r, :len]`` (channels-first) or of a slab ``x[n, :len]``
  (channels-last) is itself a contiguous array, so the dense machinery runs on it unchanged
  (``row_shift``, ``row_stats``, ``row_normalize``; ``slab_pilot``, ``slab_moments``,
  ``slab_normalize``; the backward sums and sweeps), and the tail is filled with zeros.  On a
  full length the arithmetic is the dense one, element for element.
* a mask, canonical like ``x``: ``(N * Cm, L)`` rows (channels-first) or ``(N, L, Cm)``
  (channels-last) of ``uint8`` 0/1, ``Cm`` being 1 (one mask for every channel) or ``C``.
  Moments are the dense ones with a select: ``d = x - K`` where valid, ``0`` elsewhere (a select,
  never a product, so a NaN or Inf in an invalid position cannot reach the sums), the count of
  valid elements taken per block in the same loop, the blocks merged with Chan et al.'s update
  weighted by their counts.  The shift ``K`` is a valid element (the first), or for long
  float32/float16 rows the mean of the valid elements of the first block, which keeps the
  one-pass bound of ``moments`` with ``n0 >= 1``.  float64 keeps the corrected two-pass blocks.
  The apply is the dense one (folded when the dtype allows, float16 in float32 arithmetic when
  ``half32_ok``) followed by a select of 0.  Channels-last with a single mask for all channels
  is a row mask: blocks whose rows are all valid go through the dense block kernels, and runs
  of at least ``RUN_MIN_ROWS`` valid rows through ``slab_normalize``; other rows branch.

An instance with no valid element gets NaN statistics, zeros in its output and zero sums in
the backward.  The counts are returned (float64) for the running update.
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
from .moments import (
    BLOCK,
    BLOCK_ONEPASS,
    SHIFT_FROM_MEAN,
    bwd_coeffs,
    merge_moments,
    neumaier_add,
    row_shift,
    row_stats,
)
from .rows import row_normalize
from .rows_backward import row_bwd_apply, row_bwd_sums
from .slabs import (
    _slab_block_onepass,
    _slab_block_twopass,
    slab_block_rows,
    slab_moments,
    slab_normalize,
    slab_pilot,
)
from .slabs_backward import slab_bwd_apply, slab_bwd_sums

#: channels-last row masks: runs of at least this many valid rows use the dense apply
RUN_MIN_ROWS = 16

# --------------------------------------------------------------------------------------------
# shared


@kernel(fastmath=FM_APPLY)
def zero_fill(y, start):
    """``y[start:] = 0`` (a 1-D row, or the rows of a slab from ``start`` on)."""
    ys = y[start:]
    z = cast_like(0.0, ys)
    for i in range(ys.shape[0]):
        ys[i] = z


@kernel(fastmath=FM_APPLY)
def zero_rows(y2, r0, r1):
    """Rows ``r0:r1`` of a 2-D slab set to 0."""
    ys = y2[r0:r1]
    z = cast_like(0.0, ys)
    for i in range(ys.shape[0]):
        for c in range(ys.shape[1]):
            ys[i, c] = z


# --------------------------------------------------------------------------------------------
# lengths, channels-first: the dense row machinery on x[r, :len]


@kernel(fastmath=FM_STRICT, parallel=True)
def cf_len_fused(x, y, lengths, w, b, C, eps, mean_out, var_out):
    """Row ``r`` has ``lengths[r // C]`` valid elements, then padding (output 0)."""
    R = x.shape[0]
    for r in prange(R):
        nv = lengths[r // C]
        ch = r % C
        if nv == 0:
            mean_out[r] = np.nan
            var_out[r] = np.nan
            zero_fill(y[r], 0)
        else:
            xr = x[r, :nv]
            K = row_shift(xr)
            n, c, m2 = row_stats(xr, 0, nv, K)
            var = m2 / nv
            rstd = 1.0 / np.sqrt(var + eps)
            row_normalize(xr, y[r, :nv], 0, nv, K, c, rstd * w[ch], b[ch])
            zero_fill(y[r], nv)
            mean_out[r] = K + c
            var_out[r] = var


@kernel(fastmath=FM_STRICT, parallel=True)
def cf_len_apply(x, y, lengths, C, mean, a, b):
    """``y = (x - mean) * a + b`` on the valid part of each row (running statistics), 0 after."""
    R = x.shape[0]
    for r in prange(R):
        nv = lengths[r // C]
        row_normalize(x[r, :nv], y[r, :nv], 0, nv, mean[r], 0.0, a[r], b[r])
        zero_fill(y[r], nv)


@kernel(fastmath=FM_STRICT, parallel=True)
def cf_bwd_len_fused(x, dy, dx, lengths, mean, rstd, w, C, sdy_out, sdyx_out):
    """Both backward sweeps over the valid part of each row; ``dx`` is 0 on the padding."""
    R = x.shape[0]
    for r in prange(R):
        nv = lengths[r // C]
        if nv == 0:
            zero_fill(dx[r], 0)
            sdy_out[r] = 0.0
            sdyx_out[r] = 0.0
        else:
            m = mean[r]
            xr = x[r, :nv]
            gr = dy[r, :nv]
            s0, s1, s2 = row_bwd_sums(xr, gr, 0, nv, m)
            xbar, a, mdy, k, sdyx = bwd_coeffs(float(nv), s0, s1, s2, rstd[r], w[r % C])
            row_bwd_apply(xr, gr, dx[r, :nv], 0, nv, m, xbar, a, mdy, k)
            zero_fill(dx[r], nv)
            sdy_out[r] = s0
            sdyx_out[r] = sdyx


# --------------------------------------------------------------------------------------------
# lengths, channels-last: the dense slab machinery on x[n, :len]


@kernel(fastmath=FM_STRICT, parallel=True)
def cl_len_fused(x, y, lengths, w, b, eps, mean_out, var_out):
    """Slab ``n`` has ``lengths[n]`` valid rows, then padding rows (output 0)."""
    N = x.shape[0]
    C = x.shape[2]
    for n in prange(N):
        nv = lengths[n]
        if nv == 0:
            for c in range(C):
                mean_out[n, c] = np.nan
                var_out[n, c] = np.nan
            zero_rows(y[n], 0, y.shape[1])
        else:
            xs = x[n, :nv]
            K = np.empty(C)
            cm = np.empty(C)
            m2 = np.empty(C)
            a = np.empty(C)
            slab_pilot(xs, K)
            slab_moments(xs, 0, nv, K, cm, m2)
            for c in range(C):
                var = m2[c] / nv
                a[c] = (1.0 / np.sqrt(var + eps)) * w[c]
                mean_out[n, c] = K[c] + cm[c]
                var_out[n, c] = var
            slab_normalize(xs, y[n, :nv], 0, nv, K, cm, a, b)
            zero_rows(y[n], nv, y.shape[1])


@kernel(fastmath=FM_STRICT, parallel=True)
def cl_len_apply(x, y, lengths, mean, a, b):
    """``y = (x - mean) * a + b`` per channel on the valid rows of each slab, 0 after."""
    N = x.shape[0]
    C = x.shape[2]
    for n in prange(N):
        nv = lengths[n]
        zeros = np.zeros(C)
        slab_normalize(x[n, :nv], y[n, :nv], 0, nv, mean[n], zeros, a[n], b[n])
        zero_rows(y[n], nv, y.shape[1])


@kernel(fastmath=FM_STRICT, parallel=True)
def cl_bwd_len_fused(x, dy, dx, lengths, mean, rstd, w, sdy_out, sdyx_out):
    """Both backward sweeps over the valid rows of each slab; ``dx`` is 0 on the padding."""
    N = x.shape[0]
    C = x.shape[2]
    for n in prange(N):
        nv = lengths[n]
        if nv == 0:
            zero_rows(dx[n], 0, dx.shape[1])
            for c in range(C):
                sdy_out[n, c] = 0.0
                sdyx_out[n, c] = 0.0
        else:
            S0 = np.empty(C)
            S1 = np.empty(C)
            S2 = np.empty(C)
            xbar = np.empty(C)
            a = np.empty(C)
            mdy = np.empty(C)
            k = np.empty(C)
            xs = x[n, :nv]
            gs = dy[n, :nv]
            slab_bwd_sums(xs, gs, 0, nv, mean[n], S0, S1, S2)
            for c in range(C):
                xbar[c], a[c], mdy[c], k[c], sdyx_out[n, c] = bwd_coeffs(
                    float(nv), S0[c], S1[c], S2[c], rstd[n, c], w[c]
                )
                sdy_out[n, c] = S0[c]
            slab_bwd_apply(xs, gs, dx[n, :nv], 0, nv, mean[n], xbar, a, mdy, k)
            zero_rows(dx[n], nv, dx.shape[1])


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
    n = mean = m2 = comp = 0.0
    b = start
    while b < stop:
        e = min(b + step, stop)
        nb, mb, m2b = mblock_moments(x, m, b, e, K)
        n, mean, m2, comp = merge_moments(n, mean, m2, comp, nb, mb, m2b)
        b = e
    return n, mean, m2 + comp


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
def cf_mask_apply(x, mask, Cm, y, C, mean, a, b):
    """``y = (x - mean) * a + b`` where valid, 0 elsewhere, per-row coefficients."""
    R = x.shape[0]
    for r in prange(R):
        mrow_normalize(x[r], mask_row(mask, r, C, Cm), y[r], mean[r], 0.0, a[r], b[r])


# backward, channels-first masks


@kernel(fastmath=FM_REDUCE)
def _mbwd_block(x, dy, m, start, stop, mu):
    xs = x[start:stop]
    gs = dy[start:stop]
    ms = m[start:stop]
    s0 = 0.0
    s1 = 0.0
    s2 = 0.0
    for i in range(xs.shape[0]):
        v = ms[i] != 0
        g = to64(gs[i]) if v else 0.0
        d = _sub(to64(xs[i]), mu) if v else 0.0
        s0 += g
        s1 += d
        s2 += g * d
    return s0, s1, s2


@kernel(fastmath=FM_STRICT)
def mrow_bwd_sums(x, dy, m, mu):
    """``(sum(dy), sum(x - mu), sum(dy * (x - mu)))`` over the valid elements of a row."""
    s0 = s1 = s2 = c0 = c1 = c2 = 0.0
    L = x.shape[0]
    b = 0
    while b < L:
        e = min(b + BLOCK, L)
        b0, b1, b2 = _mbwd_block(x, dy, m, b, e, mu)
        s0, c0 = neumaier_add(s0, c0, b0)
        s1, c1 = neumaier_add(s1, c1, b1)
        s2, c2 = neumaier_add(s2, c2, b2)
        b = e
    return s0 + c0, s1 + c1, s2 + c2


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
            s0, s1, s2 = mrow_bwd_sums(x[r], dy[r], mr, mu)
            xbar, a, mdy, k, sdyx = bwd_coeffs(n, s0, s1, s2, rstd[r], w[r % C])
            mrow_bwd_apply(x[r], dy[r], mr, dx[r], mu, xbar, a, mdy, k)
            sdy_out[r] = s0
            sdyx_out[r] = sdyx


@kernel(fastmath=FM_STRICT, parallel=True)
def cf_mask_count(mask, Cm, R, C, count_out):
    """Valid elements of each row's instance (for the backward, which gets no counts)."""
    for r in prange(R):
        mr = mask_row(mask, r, C, Cm)
        s = 0
        for i in range(mr.shape[0]):
            s += mr[i]
        count_out[r] = float(s)


# --------------------------------------------------------------------------------------------
# masks, channels-last slabs: x (N, L, C), mask (N, L, Cm)


@kernel(fastmath=FM_REDUCE)
def _rowmask_block_sum(x2, m1, b, e, K, mb):
    """Per-channel sum of x - K over the valid rows of ``b:e`` into ``mb``; the row count."""
    C = x2.shape[1]
    for c in range(C):
        mb[c] = 0.0
    cnt = 0
    for i in range(b, e):
        if m1[i] != 0:
            xr = x2[i]
            for c in range(C):
                mb[c] += _sub(to64(xr[c]), K[c])
            cnt += 1
    return cnt


@kernel(fastmath=FM_REDUCE)
def _rowmask_block_m2(x2, m1, b, e, K, mb, m2b, sd):
    C = x2.shape[1]
    for c in range(C):
        sd[c] = 0.0
        m2b[c] = 0.0
    for i in range(b, e):
        if m1[i] != 0:
            xr = x2[i]
            for c in range(C):
                d = _sub(_sub(to64(xr[c]), K[c]), mb[c])
                sd[c] += d
                m2b[c] += d * d


@kernel(fastmath=FM_REDUCE)
def _rowmask_block_sums(x2, m1, b, e, K, mb, m2b):
    C = x2.shape[1]
    for c in range(C):
        mb[c] = 0.0
        m2b[c] = 0.0
    cnt = 0
    for i in range(b, e):
        if m1[i] != 0:
            xr = x2[i]
            for c in range(C):
                d = _sub(to64(xr[c]), K[c])
                mb[c] += d
                m2b[c] += d * d
            cnt += 1
    return cnt


@kernel(fastmath=FM_STRICT)
def rowmask_block(x2, m1, b, e, K, mb, m2b, sd):
    """Per-channel (mean of x - K, M2) of the valid rows of ``b:e``; the row count.  A block of
    valid rows only goes through the dense block kernels."""
    C = x2.shape[1]
    full = 0
    for i in range(b, e):
        full += m1[i]
    if full == e - b:
        if wide(x2):
            _slab_block_twopass(x2, b, e, K, mb, m2b, sd)
        else:
            _slab_block_onepass(x2, b, e, K, mb, m2b)
        return full
    if full == 0:
        return 0
    nb = float(full)
    if wide(x2):
        _rowmask_block_sum(x2, m1, b, e, K, mb)
        for c in range(C):
            mb[c] /= nb
        _rowmask_block_m2(x2, m1, b, e, K, mb, m2b, sd)
        for c in range(C):
            mb[c] += sd[c] / nb
            v = m2b[c] - sd[c] * (sd[c] / nb)
            m2b[c] = 0.0 if v < 0.0 else v
    else:
        _rowmask_block_sums(x2, m1, b, e, K, mb, m2b)
        for c in range(C):
            s1 = mb[c]
            mb[c] = s1 / nb
            v = m2b[c] - s1 * mb[c]
            m2b[c] = 0.0 if v < 0.0 else v
    return full


@kernel(fastmath=FM_STRICT)
def rowmask_moments(x2, m1, K, mean, m2):
    """Per-channel (mean of x - K, M2) over the valid rows of a slab; the row count."""
    L = x2.shape[0]
    C = x2.shape[1]
    rb = slab_block_rows(x2)
    comp = np.zeros(C)
    mb = np.empty(C)
    m2b = np.empty(C)
    sd = np.empty(C)
    for c in range(C):
        mean[c] = 0.0
        m2[c] = 0.0
    n = 0.0
    b = 0
    while b < L:
        e = min(b + rb, L)
        nb = float(rowmask_block(x2, m1, b, e, K, mb, m2b, sd))
        if nb > 0.0:
            for c in range(C):
                _, mean[c], m2[c], comp[c] = merge_moments(
                    n, mean[c], m2[c], comp[c], nb, mb[c], m2b[c]
                )
            n += nb
        b = e
    for c in range(C):
        m2[c] += comp[c]
    return n


@kernel(fastmath=FM_APPLY)
def _rowmask_rows(x2, y2, r0, r1, mode, K, cm, M, a, b, M32, a32, b32):
    """Rows ``r0:r1`` (all valid) one by one: mode 2 float16 in float32, 1 folded, 0 exact."""
    C = x2.shape[1]
    for i in range(r0, r1):
        xr = x2[i]
        yr = y2[i]
        if mode == 2:
            for c in range(C):
                yr[c] = affine_like(xr[c], M32[c], a32[c], b32[c], yr)
        elif mode == 1:
            for c in range(C):
                yr[c] = affine_like(xr[c], M[c], a[c], b[c], yr)
        else:
            for c in range(C):
                d = _sub(_sub(to64(xr[c]), K[c]), cm[c])
                yr[c] = cast_like(d * a[c] + b[c], yr)


@kernel(fastmath=FM_STRICT)
def rowmask_normalize(x2, m1, y2, K, cm, a, b):
    """``y = ((x - K) - cm) * a + b`` on the valid rows, 0 on the others: long runs of valid
    rows through ``slab_normalize``, short ones row by row."""
    L = x2.shape[0]
    C = x2.shape[1]
    M = np.empty(C)
    M32 = np.empty(C, np.float32)
    a32 = np.empty(C, np.float32)
    b32 = np.empty(C, np.float32)
    mode = 0
    if not wide(x2):
        fold = True
        h32 = half(x2)
        for c in range(C):
            M[c] = K[c] + cm[c]
            if not abs(M[c] * a[c]) <= FOLD_LIMIT:
                fold = False
            if not half32_ok(M[c], a[c], b[c]):
                h32 = False
            M32[c] = np.float32(M[c])
            a32[c] = np.float32(a[c])
            b32[c] = f64_to_f32_odd(b[c])
        if h32:
            mode = 2
        elif fold:
            mode = 1
    i = 0
    while i < L:
        j = i + 1
        if m1[i] != 0:
            while j < L and m1[j] != 0:
                j += 1
            if j - i >= RUN_MIN_ROWS:
                slab_normalize(x2, y2, i, j, K, cm, a, b)
            else:
                _rowmask_rows(x2, y2, i, j, mode, K, cm, M, a, b, M32, a32, b32)
        else:
            while j < L and m1[j] == 0:
                j += 1
            zero_rows(y2, i, j)
        i = j


@kernel(fastmath=FM_STRICT)
def _first_row(m1):
    for i in range(m1.shape[0]):
        if m1[i] != 0:
            return i
    return -1


# per-channel masks: each element selected


@kernel(fastmath=FM_STRICT)
def elmask_shift(x2, m2, K):
    """K[c] = the first valid element of channel c (0 where there is none)."""
    L = x2.shape[0]
    C = x2.shape[1]
    left = C
    for c in range(C):
        K[c] = np.nan
    for i in range(L):
        if left == 0:
            break
        for c in range(C):
            if m2[i, c] != 0 and np.isnan(K[c]):
                v = to64(x2[i, c])
                if np.isnan(v):
                    K[c] = 0.0  # (a NaN element: the statistics are NaN whatever the shift)
                else:
                    K[c] = v
                left -= 1
    for c in range(C):
        if np.isnan(K[c]):
            K[c] = 0.0
    # then the mean of the valid elements of the first block (see ``mrow_shift``)
    e = min(L, slab_block_rows(x2))
    mb = np.empty(C)
    cnt = np.empty(C)
    _elmask_block_sum(x2, m2, 0, e, K, mb, cnt)
    for c in range(C):
        if cnt[c] > 0.0:
            K[c] += mb[c] / cnt[c]


@kernel(fastmath=FM_REDUCE)
def _elmask_block_sum(x2, m2, b, e, K, mb, cnt):
    C = x2.shape[1]
    for c in range(C):
        mb[c] = 0.0
        cnt[c] = 0.0
    for i in range(b, e):
        xr = x2[i]
        mr = m2[i]
        for c in range(C):
            d = _sub(to64(xr[c]), K[c])
            v = mr[c] != 0
            mb[c] += d if v else 0.0
            cnt[c] += 1.0 if v else 0.0


@kernel(fastmath=FM_REDUCE)
def _elmask_block_m2(x2, m2, b, e, K, mb, m2b, sd):
    C = x2.shape[1]
    for c in range(C):
        sd[c] = 0.0
        m2b[c] = 0.0
    for i in range(b, e):
        xr = x2[i]
        mr = m2[i]
        for c in range(C):
            d = _sub(_sub(to64(xr[c]), K[c]), mb[c])
            d = d if mr[c] != 0 else 0.0
            sd[c] += d
            m2b[c] += d * d


@kernel(fastmath=FM_REDUCE)
def _elmask_block_sums(x2, m2, b, e, K, mb, m2b, cnt):
    C = x2.shape[1]
    for c in range(C):
        mb[c] = 0.0
        m2b[c] = 0.0
        cnt[c] = 0.0
    for i in range(b, e):
        xr = x2[i]
        mr = m2[i]
        for c in range(C):
            v = mr[c] != 0
            d = _sub(to64(xr[c]), K[c])
            d = d if v else 0.0
            mb[c] += d
            m2b[c] += d * d
            cnt[c] += 1.0 if v else 0.0


@kernel(fastmath=FM_STRICT)
def elmask_moments(x2, m2, K, mean, m2out, count):
    """Per-channel (mean of x - K, M2, count) over the valid elements of a slab."""
    L = x2.shape[0]
    C = x2.shape[1]
    rb = slab_block_rows(x2)
    comp = np.zeros(C)
    mb = np.empty(C)
    m2b = np.empty(C)
    sd = np.empty(C)
    cnt = np.empty(C)
    for c in range(C):
        mean[c] = 0.0
        m2out[c] = 0.0
        count[c] = 0.0
    b = 0
    while b < L:
        e = min(b + rb, L)
        if wide(x2):
            _elmask_block_sum(x2, m2, b, e, K, mb, cnt)
            for c in range(C):
                mb[c] = mb[c] / cnt[c] if cnt[c] > 0.0 else 0.0
            _elmask_block_m2(x2, m2, b, e, K, mb, m2b, sd)
            for c in range(C):
                if cnt[c] > 0.0:
                    mb[c] += sd[c] / cnt[c]
                    v = m2b[c] - sd[c] * (sd[c] / cnt[c])
                    m2b[c] = 0.0 if v < 0.0 else v
        else:
            _elmask_block_sums(x2, m2, b, e, K, mb, m2b, cnt)
            for c in range(C):
                if cnt[c] > 0.0:
                    s1 = mb[c]
                    mb[c] = s1 / cnt[c]
                    v = m2b[c] - s1 * mb[c]
                    m2b[c] = 0.0 if v < 0.0 else v
        for c in range(C):
            count[c], mean[c], m2out[c], comp[c] = merge_moments(
                count[c], mean[c], m2out[c], comp[c], cnt[c], mb[c], m2b[c]
            )
        b = e
    for c in range(C):
        m2out[c] += comp[c]


@kernel(fastmath=FM_APPLY)
def _elmask_rows(x2, m2, y2, mode, K, cm, M, a, b, M32, a32, b32):
    L = x2.shape[0]
    C = x2.shape[1]
    for i in range(L):
        xr = x2[i]
        mr = m2[i]
        yr = y2[i]
        z = cast_like(0.0, yr)
        if mode == 2:
            for c in range(C):
                v = affine_like(xr[c], M32[c], a32[c], b32[c], yr)
                yr[c] = v if mr[c] != 0 else z
        elif mode == 1:
            for c in range(C):
                v = affine_like(xr[c], M[c], a[c], b[c], yr)
                yr[c] = v if mr[c] != 0 else z
        else:
            for c in range(C):
                d = _sub(_sub(to64(xr[c]), K[c]), cm[c])
                v = cast_like(d * a[c] + b[c], yr)
                yr[c] = v if mr[c] != 0 else z


@kernel(fastmath=FM_STRICT)
def slab_mask_normalize(x2, m2, y2, K, cm, a, b):
    """``y = ((x - K) - cm) * a + b`` where ``m2`` (shape (L, 1) or (L, C)) is set, else 0."""
    if m2.shape[1] == 1 and x2.shape[1] != 1:
        rowmask_normalize(x2, m2[:, 0], y2, K, cm, a, b)
        return
    C = x2.shape[1]
    M = np.empty(C)
    M32 = np.empty(C, np.float32)
    a32 = np.empty(C, np.float32)
    b32 = np.empty(C, np.float32)
    mode = 0
    if not wide(x2):
        fold = True
        h32 = half(x2)
        for c in range(C):
            M[c] = K[c] + cm[c]
            if not abs(M[c] * a[c]) <= FOLD_LIMIT:
                fold = False
            if not half32_ok(M[c], a[c], b[c]):
                h32 = False
            M32[c] = np.float32(M[c])
            a32[c] = np.float32(a[c])
            b32[c] = f64_to_f32_odd(b[c])
        if h32:
            mode = 2
        elif fold:
            mode = 1
    _elmask_rows(x2, m2, y2, mode, K, cm, M, a, b, M32, a32, b32)


@kernel(fastmath=FM_STRICT, parallel=True)
def cl_mask_fused(x, mask, y, w, b, eps, mean_out, var_out, count_out):
    """Masked per-channel statistics and normalization of each slab in one task."""
    N = x.shape[0]
    C = x.shape[2]
    per_channel = mask.shape[2] != 1 or C == 1
    for n in prange(N):
        K = np.empty(C)
        cm = np.empty(C)
        m2 = np.empty(C)
        a = np.empty(C)
        cnt = np.empty(C)
        x2 = x[n]
        if per_channel:
            elmask_shift(x2, mask[n], K)
            elmask_moments(x2, mask[n], K, cm, m2, cnt)
        else:
            m1 = mask[n, :, 0]
            f = _first_row(m1)
            for c in range(C):
                K[c] = to64(x2[f, c]) if f >= 0 else 0.0
            if f >= 0:  # the mean of the first block's valid rows (see ``mrow_shift``)
                rows = _rowmask_block_sum(
                    x2, m1, f, min(x2.shape[0], f + slab_block_rows(x2)), K, cm
                )
                for c in range(C):
                    K[c] += cm[c] / rows
            rows = rowmask_moments(x2, m1, K, cm, m2)
            for c in range(C):
                cnt[c] = rows
        for c in range(C):
            if cnt[c] == 0.0:
                mean_out[n, c] = np.nan
                var_out[n, c] = np.nan
                a[c] = 0.0
            else:
                var = m2[c] / cnt[c]
                a[c] = (1.0 / np.sqrt(var + eps)) * w[c]
                mean_out[n, c] = K[c] + cm[c]
                var_out[n, c] = var
            count_out[n, c] = cnt[c]
        slab_mask_normalize(x2, mask[n], y[n], K, cm, a, b)


@kernel(fastmath=FM_STRICT, parallel=True)
def cl_mask_apply(x, mask, y, mean, a, b):
    """``y = (x - mean) * a + b`` per channel where valid, 0 elsewhere."""
    N = x.shape[0]
    C = x.shape[2]
    for n in prange(N):
        zeros = np.zeros(C)
        slab_mask_normalize(x[n], mask[n], y[n], mean[n], zeros, a[n], b[n])


# backward, channels-last masks (one mask for all channels or one per channel, each element
# selected)


@kernel(fastmath=FM_REDUCE)
def _slab_mbwd_block(x2, g2, m2, b, e, mu, per, s0, s1, s2):
    C = x2.shape[1]
    for c in range(C):
        s0[c] = 0.0
        s1[c] = 0.0
        s2[c] = 0.0
    for i in range(b, e):
        xr = x2[i]
        gr = g2[i]
        mr = m2[i]
        if per:
            for c in range(C):
                v = mr[c] != 0
                g = to64(gr[c]) if v else 0.0
                d = _sub(to64(xr[c]), mu[c]) if v else 0.0
                s0[c] += g
                s1[c] += d
                s2[c] += g * d
        elif mr[0] != 0:
            for c in range(C):
                g = to64(gr[c])
                d = _sub(to64(xr[c]), mu[c])
                s0[c] += g
                s1[c] += d
                s2[c] += g * d


@kernel(fastmath=FM_STRICT)
def slab_mbwd_sums(x2, g2, m2, mu, S0, S1, S2):
    """Per-channel masked backward sums of a slab, block totals compensated."""
    L = x2.shape[0]
    C = x2.shape[1]
    per = m2.shape[1] != 1 or C == 1
    rb = slab_block_rows(x2)
    b0 = np.empty(C)
    b1 = np.empty(C)
    b2 = np.empty(C)
    c0 = np.zeros(C)
    c1 = np.zeros(C)
    c2 = np.zeros(C)
    for c in range(C):
        S0[c] = 0.0
        S1[c] = 0.0
        S2[c] = 0.0
    b = 0
    while b < L:
        e = min(b + rb, L)
        _slab_mbwd_block(x2, g2, m2, b, e, mu, per, b0, b1, b2)
        for c in range(C):
            S0[c], c0[c] = neumaier_add(S0[c], c0[c], b0[c])
            S1[c], c1[c] = neumaier_add(S1[c], c1[c], b1[c])
            S2[c], c2[c] = neumaier_add(S2[c], c2[c], b2[c])
        b = e
    for c in range(C):
        S0[c] += c0[c]
        S1[c] += c1[c]
        S2[c] += c2[c]


@kernel(fastmath=FM_APPLY)
def slab_mbwd_apply(x2, g2, m2, o2, mu, xbar, a, mdy, k):
    L = x2.shape[0]
    C = x2.shape[1]
    per = m2.shape[1] != 1 or C == 1
    for i in range(L):
        xr = x2[i]
        gr = g2[i]
        mr = m2[i]
        orow = o2[i]
        z = cast_like(0.0, orow)
        if per:
            for c in range(C):
                e = _sub(_sub(to64(xr[c]), mu[c]), xbar[c])
                t = _sub(to64(gr[c]), mdy[c])
                v = cast_like(a[c] * t - e * k[c], orow)
                orow[c] = v if mr[c] != 0 else z
        elif mr[0] != 0:
            for c in range(C):
                e = _sub(_sub(to64(xr[c]), mu[c]), xbar[c])
                t = _sub(to64(gr[c]), mdy[c])
                orow[c] = cast_like(a[c] * t - e * k[c], orow)
        else:
            for c in range(C):
                orow[c] = z


@kernel(fastmath=FM_STRICT, parallel=True)
def cl_bwd_mask_fused(x, dy, dx, mask, count, mean, rstd, w, sdy_out, sdyx_out):
    """Both backward sweeps of each masked slab; ``dx`` is 0 where invalid."""
    N = x.shape[0]
    C = x.shape[2]
    for n in prange(N):
        S0 = np.empty(C)
        S1 = np.empty(C)
        S2 = np.empty(C)
        xbar = np.empty(C)
        a = np.empty(C)
        mdy = np.empty(C)
        k = np.empty(C)
        slab_mbwd_sums(x[n], dy[n], mask[n], mean[n], S0, S1, S2)
        for c in range(C):
            cn = count[n, c]
            if cn == 0.0:
                xbar[c] = a[c] = mdy[c] = k[c] = 0.0
                sdyx_out[n, c] = 0.0
                sdy_out[n, c] = 0.0
            else:
                xbar[c], a[c], mdy[c], k[c], sdyx_out[n, c] = bwd_coeffs(
                    cn, S0[c], S1[c], S2[c], rstd[n, c], w[c]
                )
                sdy_out[n, c] = S0[c]
        slab_mbwd_apply(x[n], dy[n], mask[n], dx[n], mean[n], xbar, a, mdy, k)


@kernel(fastmath=FM_STRICT, parallel=True)
def cl_mask_count(mask, C, count_out):
    """Valid elements per ``(n, c)`` of a channels-last mask (N, L, Cm)."""
    N = mask.shape[0]
    L = mask.shape[1]
    Cm = mask.shape[2]
    for n in prange(N):
        for c in range(C):
            count_out[n, c] = 0.0
        for i in range(L):
            for c in range(C):
                count_out[n, c] += mask[n, i, c if Cm > 1 else 0]
