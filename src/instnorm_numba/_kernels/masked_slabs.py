"""Masks, channels-last slabs: statistics over the valid elements only, forward and backward.

A mask is canonical like ``x``: ``(N, L, Cm)`` of ``uint8`` 0/1, ``Cm`` being 1 (one mask for
every channel) or ``C``.  The arithmetic is that of ``masked_rows`` (a select of ``x - K``, a
count per block, counts-weighted merges, a valid element or the mean of the first block's valid
elements as the shift, the dense apply then a select of 0), per channel.

One mask for all channels is a row mask: the dense slab code takes it (``slabs.slab_moments``
and ``slabs_backward.slab_bwd_sums`` with a row mask: blocks whose rows are all valid go
through the dense block kernels), and runs of at least ``RUN_MIN_ROWS`` valid rows go through
the dense apply; other rows branch.  float16 (normalized in float32) goes row by row instead,
the mask as bit masks on the input and the result, without a branch.  A mask
per channel selects each element.  An instance with no valid element gets NaN statistics,
zeros in its output and zero sums in the backward.

Slabs few against the threads are split into row chunks, as the dense ones are
(``cl_mask_shift``, ``cl_mask_partial`` with per-channel counts, ``moments.merge_partials``,
``cl_mask_apply``; backward ``cl_bwd_mask_partial``, ``moments.bwd_finish``,
``cl_bwd_mask_apply``).
"""

from __future__ import annotations

import numpy as np
from numba import prange, types
from numba.extending import overload

from .._jit import FM_APPLY, FM_REDUCE, FM_STRICT, kernel
from .elements import (
    _sub,
    affine_like,
    cast_like,
    to64,
    wide,
)
from .lengths import zero_rows
from .masked_rows import first_valid
from .moments import merge_moments, task_span
from .slabs import (
    apply_mode,
    flat_rows,
    rowmask_block_sum,
    slab_block_rows,
    slab_coeffs,
    slab_moments,
    slab_normalize_mode,
    stretch_rows,
    tile,
)
from .slabs_backward import bwd_workspace, slab_bwd_coeffs, slab_bwd_sums

#: channels-last row masks: runs of at least this many valid rows use the dense apply
RUN_MIN_ROWS = 16

# --------------------------------------------------------------------------------------------
# masks, channels-last slabs: x (N, L, C), mask (N, L, Cm)


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
def _rowmask_runs(x2, m1, y2, r0, r1, mode, K, cm, M, a, b, M32, a32, b32):
    """Rows ``r0:r1`` by runs: runs of at least RUN_MIN_ROWS valid rows through
    ``slab_normalize_mode``, shorter ones row by row, invalid ones set to 0."""
    i = r0
    while i < r1:
        j = i + 1
        if m1[i] != 0:
            while j < r1 and m1[j] != 0:
                j += 1
            if j - i >= RUN_MIN_ROWS:
                slab_normalize_mode(x2, y2, i, j, mode, K, cm, M, a, b, M32, a32, b32)
            else:
                _rowmask_rows(x2, y2, i, j, mode, K, cm, M, a, b, M32, a32, b32)
        else:
            while j < r1 and m1[j] == 0:
                j += 1
            zero_rows(y2, i, j)
        i = j


@kernel(fastmath=FM_APPLY)
def _rowmask_select_half(x2, m1, y2, M32, a32, b32):
    """float16 in float32 (mode 2), every row without a branch: the row's mask byte becomes a
    bit mask (all ones or zero) that is ANDed into each input (an invalid NaN or Inf reads as
    +0) and into each result (an invalid row stores +0).

    By runs (``_rowmask_runs``) each run of a random mask paid a mispredicted end, a loop
    set-up and the vector loop's overlap checks: at density 0.5, about 1500 runs per slab of
    3000 x 80 at about 70 ns each.  Measured (16 slabs of 3000 x 80 in turn, one thread, per
    slab; the dense apply 28-39 us): density 0.1 37.7 -> 26.2 us, 0.3 62.4 -> 30.3, 0.5
    81.2 -> 37.9, 0.7 69.8 -> 30.6, 0.9 71.8 -> 39.9 (then by blocks, dense then zeroed).
    The results are the same bits."""
    C = x2.shape[1]
    for i in range(x2.shape[0]):
        bits = np.uint16(0xFFFF) if m1[i] != 0 else np.uint16(0)
        xr = x2[i]
        yr = y2[i]
        for c in range(C):
            v = affine_like(_and_bits(xr[c], bits), M32[c], a32[c], b32[c], yr)
            yr[c] = _and_bits(v, bits)


def _and_bits(v, bits):  # pragma: no cover - replaced by the overload inside kernels
    return v & bits


@overload(_and_bits)
def _ov_and_bits(v, bits):
    """``v & bits`` for float16 bits; other data never takes the float16 path (typed only)."""
    if isinstance(v, types.Integer):
        return lambda v, bits: v & bits
    return lambda v, bits: v


@kernel(fastmath=FM_STRICT)
def rowmask_normalize(x2, m1, y2, K, cm, a, b):
    """``y = ((x - K) - cm) * a + b`` on the valid rows, 0 on the others: float16 in float32
    row by row without a branch (``_rowmask_select_half``), other data by runs
    (``_rowmask_runs``)."""
    mode, M, M32, a32, b32 = apply_mode(x2, K, cm, a, b)
    if mode == 2:
        _rowmask_select_half(x2, m1, y2, M32, a32, b32)
    else:
        _rowmask_runs(x2, m1, y2, 0, x2.shape[0], mode, K, cm, M, a, b, M32, a32, b32)


@kernel(fastmath=FM_STRICT)
def rowmask_shift(x2, m1, K, mb):
    """K[c] = the first valid row's element, plus the mean of the valid rows of the first
    block from there (see ``masked_rows.mrow_shift``); 0 without a valid row."""
    f = first_valid(m1)
    if f < 0:
        K[:] = 0.0
        return
    for c in range(x2.shape[1]):
        K[c] = to64(x2[f, c])
    rows = rowmask_block_sum(x2, m1, f, min(x2.shape[0], f + slab_block_rows(x2)), K, mb)
    for c in range(x2.shape[1]):
        K[c] += mb[c] / rows


# per-channel masks: each element selected


@kernel(fastmath=FM_REDUCE)
def _elmask_window_sums(x2, m2, r0, r1, first, rb, K, s, cnt):
    """Per channel c, the sum of ``x - K[c]`` and the count of the valid elements of rows
    ``first[c] : first[c] + rb`` (within ``r0:r1``)."""
    C = x2.shape[1]
    for i in range(r0, r1):
        xr = x2[i]
        mr = m2[i]
        for c in range(C):
            f = first[c]
            v = (mr[c] != 0) & (i >= f) & (i < f + rb)
            d = _sub(to64(xr[c]), K[c])
            s[c] += d if v else 0.0
            cnt[c] += 1.0 if v else 0.0


@kernel(fastmath=FM_STRICT)
def elmask_shift(x2, m2, K):
    """K[c] = the first valid element of channel c plus the mean of its valid elements among
    the block of rows from there (see ``masked_rows.mrow_shift``); 0 where there is none.

    The block starts at each channel's own first valid row: from row 0, a mask whose first
    block has no valid element left K a single element, 3 standard deviations from the mean
    at worst, and the one-pass moments put ``rstd`` off by a relative 1.2e-13 (float32, 40000
    rows of 3 channels, the first 8000 invalid; 5e-16 with this shift).  The blocks are summed
    in one sweep over the rows they span (``_elmask_window_sums``)."""
    L = x2.shape[0]
    C = x2.shape[1]
    rb = slab_block_rows(x2)
    first = np.full(C, L)  # each channel's first valid row; L where there is none
    left = C
    i = 0
    while i < L and left > 0:
        mr = m2[i]
        for c in range(C):
            if first[c] == L and mr[c] != 0:
                first[c] = i
                left -= 1
        i += 1
    r0 = L
    r1 = 0
    for c in range(C):
        K[c] = 0.0
        if first[c] < L:
            v = to64(x2[first[c], c])
            K[c] = 0.0 if np.isnan(v) else v  # (a NaN: the statistics are NaN anyway)
            r0 = min(r0, first[c])
            r1 = max(r1, min(L, first[c] + rb))
    s = np.zeros(C)
    cnt = np.zeros(C)
    _elmask_window_sums(x2, m2, r0, r1, first, rb, K, s, cnt)
    for c in range(C):
        d = s[c] / cnt[c] if cnt[c] > 0.0 else 0.0
        if np.isfinite(d):
            K[c] += d


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
def _elmask_block_sums(x2, m2, b, e, K, mb, m2b, cnt, ci):
    """One-pass sums of the valid elements of rows ``b:e`` per channel (float32/float16), and
    their counts: four rows per sweep over the channels, as the dense block
    (``slabs._slab_block_onepass``), the counts added as integers (``ci`` workspace).

    Row by row with a float64 count, the sums cost 120-138 us a slab of 3000 x 80 float16
    (one thread, in cache); four rows with integer counts 56-75 us (the dense block: 38)."""
    C = x2.shape[1]
    for c in range(C):
        mb[c] = 0.0
        m2b[c] = 0.0
        ci[c] = 0
    i = b
    while i + 4 <= e:
        x0, x1, x2_, x3 = x2[i], x2[i + 1], x2[i + 2], x2[i + 3]
        q0, q1, q2, q3 = m2[i], m2[i + 1], m2[i + 2], m2[i + 3]
        for c in range(C):
            k = K[c]
            d0 = _sub(to64(x0[c]), k)
            d1 = _sub(to64(x1[c]), k)
            d2 = _sub(to64(x2_[c]), k)
            d3 = _sub(to64(x3[c]), k)
            d0 = d0 if q0[c] != 0 else 0.0
            d1 = d1 if q1[c] != 0 else 0.0
            d2 = d2 if q2[c] != 0 else 0.0
            d3 = d3 if q3[c] != 0 else 0.0
            mb[c] += (d0 + d1) + (d2 + d3)
            m2b[c] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
            ci[c] += (np.int32(q0[c]) + np.int32(q1[c])) + (np.int32(q2[c]) + np.int32(q3[c]))
        i += 4
    while i < e:
        xr = x2[i]
        mr = m2[i]
        for c in range(C):
            d = _sub(to64(xr[c]), K[c])
            d = d if mr[c] != 0 else 0.0
            mb[c] += d
            m2b[c] += d * d
            ci[c] += np.int32(mr[c])
        i += 1
    for c in range(C):
        cnt[c] = float(ci[c])


@kernel(fastmath=FM_STRICT)
def elmask_moments(x2, m2, K, mean, m2out, count):
    """Per-channel (mean of x - K, M2, count) over the valid elements of a slab."""
    L = x2.shape[0]
    C = x2.shape[1]
    rb = slab_block_rows(x2)
    comp = np.zeros(C)
    cmean = np.zeros(C)
    mb = np.empty(C)
    m2b = np.empty(C)
    sd = np.empty(C)
    cnt = np.empty(C)
    ci = np.empty(C, np.int32)
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
            _elmask_block_sums(x2, m2, b, e, K, mb, m2b, cnt, ci)
            for c in range(C):
                if cnt[c] > 0.0:
                    s1 = mb[c]
                    mb[c] = s1 / cnt[c]
                    v = m2b[c] - s1 * mb[c]
                    m2b[c] = 0.0 if v < 0.0 else v
        for c in range(C):
            count[c], mean[c], cmean[c], m2out[c], comp[c] = merge_moments(
                count[c], mean[c], cmean[c], m2out[c], comp[c], cnt[c], mb[c], m2b[c]
            )
        b = e
    for c in range(C):
        mean[c] += cmean[c]
        m2out[c] += comp[c]


@kernel(fastmath=FM_APPLY)
def _elmask_tiled(x2, m2, y2, M, a, b, mw, aw, bw):
    """``slabs.apply_tiled`` with a select of 0 where the mask ``m2`` (L, C) is not set:
    stretches of whole rows swept flat, the mask with them."""
    C = x2.shape[1]
    n = x2.shape[0]
    rows = stretch_rows(C)
    W = rows * C
    i0 = (n // rows) * rows
    xf = flat_rows(x2, i0)
    mf = flat_rows(m2, i0)
    yf = flat_rows(y2, i0)
    z = cast_like(0.0, y2)
    for j in range(n // rows):
        xs = xf[j * W : (j + 1) * W]
        ms = mf[j * W : (j + 1) * W]
        ys = yf[j * W : (j + 1) * W]
        for k in range(W):
            v = affine_like(xs[k], mw[k], aw[k], bw[k], ys)
            ys[k] = v if ms[k] != 0 else z
    for i in range(i0, n):
        xr = x2[i]
        mr = m2[i]
        yr = y2[i]
        for c in range(C):
            v = affine_like(xr[c], M[c], a[c], b[c], yr)
            yr[c] = v if mr[c] != 0 else z


@kernel(fastmath=FM_APPLY)
def _elmask_exact(x2, m2, y2, K, cm, a, b):
    L = x2.shape[0]
    C = x2.shape[1]
    z = cast_like(0.0, y2)
    for i in range(L):
        xr = x2[i]
        mr = m2[i]
        yr = y2[i]
        for c in range(C):
            d = _sub(_sub(to64(xr[c]), K[c]), cm[c])
            v = cast_like(d * a[c] + b[c], yr)
            yr[c] = v if mr[c] != 0 else z


@kernel(fastmath=FM_STRICT)
def _elmask_rows(x2, m2, y2, mode, K, cm, M, a, b, M32, a32, b32):
    """Each element selected: folded modes swept flat (``_elmask_tiled``), the exact one row
    by row.  A slab of 3000 x 80 float32, one thread, in cache: 58-75 us flat against 66-86
    row by row (float16: 33-43 both ways)."""
    W = stretch_rows(x2.shape[1]) * x2.shape[1]
    if mode == 2:
        _elmask_tiled(x2, m2, y2, M32, a32, b32, tile(M32, W), tile(a32, W), tile(b32, W))
    elif mode == 1:
        _elmask_tiled(x2, m2, y2, M, a, b, tile(M, W), tile(a, W), tile(b, W))
    else:
        _elmask_exact(x2, m2, y2, K, cm, a, b)


@kernel(fastmath=FM_STRICT)
def slab_mask_normalize(x2, m2, y2, K, cm, a, b):
    """``y = ((x - K) - cm) * a + b`` where ``m2`` (shape (L, 1) or (L, C)) is set, else 0."""
    if m2.shape[1] == 1 and x2.shape[1] != 1:
        rowmask_normalize(x2, m2[:, 0], y2, K, cm, a, b)
        return
    mode, M, M32, a32, b32 = apply_mode(x2, K, cm, a, b)
    _elmask_rows(x2, m2, y2, mode, K, cm, M, a, b, M32, a32, b32)


@kernel(fastmath=FM_STRICT)
def _per_channel(mask, C):
    """Whether each element is selected (a mask per channel, or one channel): else a row mask."""
    return mask.shape[2] != 1 or C == 1


@kernel(fastmath=FM_STRICT, parallel=True)
def cl_mask_fused(x, mask, y, w, b, eps, mean_out, var_out, count_out):
    """Masked per-channel statistics and normalization of each slab in one task."""
    N = x.shape[0]
    C = x.shape[2]
    per_channel = _per_channel(mask, C)
    for n in prange(N):
        w4 = np.empty((4, C))
        K, cm, m2, a = w4[0], w4[1], w4[2], w4[3]
        x2 = x[n]
        cnt = count_out[n]
        if per_channel:
            elmask_shift(x2, mask[n], K)
            elmask_moments(x2, mask[n], K, cm, m2, cnt)
        else:
            m1 = mask[n, :, 0]
            rowmask_shift(x2, m1, K, cm)
            cnt[:] = slab_moments(x2, 0, x2.shape[0], K, cm, m2, m1)
        slab_coeffs(cnt, K, cm, m2, w, eps, a, mean_out[n], var_out[n])
        slab_mask_normalize(x2, mask[n], y[n], K, cm, a, b)


@kernel(fastmath=FM_STRICT, parallel=True)
def cl_mask_apply(x, mask, y, nchunks, K, cm, a, b):
    """``y = ((x - K) - cm) * a + b`` per channel where valid, 0 elsewhere: tasks
    ``N * nchunks`` of row chunks, in the reverse order of ``cl_mask_partial``'s."""
    T = x.shape[0] * nchunks
    for t0 in prange(T):
        n, j, s, e = task_span(T - 1 - t0, nchunks, x.shape[1])
        slab_mask_normalize(x[n, s:e], mask[n, s:e], y[n, s:e], K[n], cm[n], a[n], b[n])


# few slabs, split across the threads: the shift of each slab, then the moments of each row
# chunk around it (merged by ``moments.merge_partials``), then ``cl_mask_apply``


@kernel(fastmath=FM_STRICT, parallel=True)
def cl_mask_shift(x, mask, K_out):
    """Per-channel shifts of each masked slab (``elmask_shift`` / ``rowmask_shift``)."""
    C = x.shape[2]
    for n in prange(x.shape[0]):
        if _per_channel(mask, C):
            elmask_shift(x[n], mask[n], K_out[n])
        else:
            rowmask_shift(x[n], mask[n, :, 0], K_out[n], np.empty(C))


@kernel(fastmath=FM_STRICT, parallel=True)
def cl_mask_partial(x, mask, nchunks, K, pn, pmean, pm2):
    """Per-channel counts ``pn`` (N, nchunks, C), also for a row mask, and moments of the
    valid elements of each of ``nchunks`` row chunks of every slab."""
    C = x.shape[2]
    for t in prange(x.shape[0] * nchunks):
        n, j, s, e = task_span(t, nchunks, x.shape[1])
        if _per_channel(mask, C):
            xs, ms = x[n, s:e], mask[n, s:e]
            elmask_moments(xs, ms, K[n], pmean[n, j], pm2[n, j], pn[n, j])
        else:
            m1 = mask[n, :, 0]
            pn[n, j, :] = slab_moments(x[n], s, e, K[n], pmean[n, j], pm2[n, j], m1)


# backward, channels-last masks (one mask for all channels or one per channel, each element
# selected)


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
    for n in prange(x.shape[0]):
        S0, S1, S2, xbar, a, mdy, k = bwd_workspace(x.shape[2])
        slab_bwd_sums(x[n], dy[n], 0, x.shape[1], mean[n], S0, S1, S2, mask[n])
        slab_bwd_coeffs(count[n], S0, S1, S2, rstd[n], w, xbar, a, mdy, k, sdy_out[n], sdyx_out[n])
        slab_mbwd_apply(x[n], dy[n], mask[n], dx[n], mean[n], xbar, a, mdy, k)


@kernel(fastmath=FM_STRICT)
def slab_counts(m2, r0, r1, out):
    """``out[c]`` = valid elements of channel ``c`` in rows ``r0:r1`` of a slab's mask
    ``(L, Cm)`` (``Cm`` 1: the same count for every channel)."""
    Cm = m2.shape[1]
    for c in range(out.shape[0]):
        out[c] = 0.0
    for i in range(r0, r1):
        for c in range(out.shape[0]):
            out[c] += m2[i, c if Cm > 1 else 0]


@kernel(fastmath=FM_STRICT, parallel=True)
def cl_mask_count(mask, C, count_out):
    """Valid elements per ``(n, c)`` of a channels-last mask (N, L, Cm)."""
    for n in prange(mask.shape[0]):
        slab_counts(mask[n], 0, mask.shape[1], count_out[n])


# few slabs, split across the threads: chunk sums (added by ``moments.bwd_finish``), then the
# second sweep by chunks


@kernel(fastmath=FM_STRICT, parallel=True)
def cl_bwd_mask_partial(x, dy, mask, mean, nchunks, ps0, ps1, ps2, pc):
    """Per-channel backward sums of the valid elements of ``nchunks`` row chunks of every
    slab, and their per-channel counts ``pc`` (see ``cf_bwd_mask_partial``)."""
    for t in prange(x.shape[0] * nchunks):
        n, j, s, e = task_span(t, nchunks, x.shape[1])
        slab_bwd_sums(x[n], dy[n], s, e, mean[n], ps0[n, j], ps1[n, j], ps2[n, j], mask[n])
        slab_counts(mask[n], s, e, pc[n, j])


@kernel(fastmath=FM_STRICT, parallel=True)
def cl_bwd_mask_apply(x, dy, dx, mask, nchunks, m, xbar, a, mdy, k):
    """Second backward sweep where valid, 0 elsewhere: tasks ``N * nchunks``."""
    for t in prange(x.shape[0] * nchunks):
        n, j, s, e = task_span(t, nchunks, x.shape[1])
        xs, gs, ms, ds = x[n, s:e], dy[n, s:e], mask[n, s:e], dx[n, s:e]
        slab_mbwd_apply(xs, gs, ms, ds, m[n], xbar[n], a[n], mdy[n], k[n])
