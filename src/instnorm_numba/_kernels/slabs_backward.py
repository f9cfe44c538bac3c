"""Channels-last backward: both sweeps of ``instance_norm_backward`` over ``(L, C)`` slabs.

The arithmetic is that of ``rows_backward``, vectorized over the channels: per-channel sums in
blocks of rows as large as the forward's (``slabs.slab_block_rows``), four rows per sweep over
the channels, few channels swept flat in periodic stretches (``slabs.periodic_stretches``), the
block totals compensated; then ``dx``, folded over flat stretches of whole rows when every
channel allows it (``moments.bwd_fold``).
"""

from __future__ import annotations

import numpy as np
from numba import prange

from .._jit import FM_APPLY, FM_REDUCE, FM_STRICT, kernel
from .elements import _sub, cast_like, to64, wide
from .moments import at, bwd_coeffs, bwd_fold, neumaier_add, task_span
from .slabs import (
    CL_PERIODIC_ROWS,
    flat_rows,
    fold_periodic,
    periodic_stretches,
    slab_block_rows,
    tile,
)

# --------------------------------------------------------------------------------------------
# backward, channels-last building blocks (slab (L, C), vectorized over channels)


@kernel(fastmath=FM_REDUCE)
def _slab_bwd_block(x2, g2, b, e, m, s0, s1, s2):
    """Per-channel sums of rows b..e into ``s0, s1, s2``, four rows per sweep over the
    channels: a quarter of the accumulator loads and stores (they, not the arithmetic, bound
    this loop; see ``_slab_block_onepass``)."""
    C = x2.shape[1]
    xs = x2[b:e]
    gs = g2[b:e]
    nb = xs.shape[0]
    for c in range(C):
        s0[c] = 0.0
        s1[c] = 0.0
        s2[c] = 0.0
    nfull = periodic_stretches(nb, C)
    if nfull > 0:  # few channels: periodic flat stretches, as in ``_slab_block_onepass``
        W = CL_PERIODIC_ROWS * C
        xf = flat_rows(xs, nfull * CL_PERIODIC_ROWS)
        gf = flat_rows(gs, nfull * CL_PERIODIC_ROWS)
        mw = tile(m, W)
        a0 = np.zeros(W)
        a1 = np.zeros(W)
        a2 = np.zeros(W)
        for j in range(nfull):
            xq = xf[j * W : (j + 1) * W]
            gq = gf[j * W : (j + 1) * W]
            for q in range(W):
                g = to64(gq[q])
                d = _sub(to64(xq[q]), mw[q])
                a0[q] += g
                a1[q] += d
                a2[q] += g * d
        fold_periodic(a0, s0)
        fold_periodic(a1, s1)
        fold_periodic(a2, s2)
    i = nfull * CL_PERIODIC_ROWS
    while i + 4 <= nb:
        xa = xs[i]
        xb = xs[i + 1]
        xc = xs[i + 2]
        xd = xs[i + 3]
        ga = gs[i]
        gb = gs[i + 1]
        gc = gs[i + 2]
        gd = gs[i + 3]
        for c in range(C):
            mc = m[c]
            g0 = to64(ga[c])
            g1 = to64(gb[c])
            g2_ = to64(gc[c])
            g3 = to64(gd[c])
            d0 = _sub(to64(xa[c]), mc)
            d1 = _sub(to64(xb[c]), mc)
            d2 = _sub(to64(xc[c]), mc)
            d3 = _sub(to64(xd[c]), mc)
            s0[c] += (g0 + g1) + (g2_ + g3)
            s1[c] += (d0 + d1) + (d2 + d3)
            s2[c] += (g0 * d0 + g1 * d1) + (g2_ * d2 + g3 * d3)
        i += 4
    while i < nb:
        xr = xs[i]
        gr = gs[i]
        for c in range(C):
            g = to64(gr[c])
            d = _sub(to64(xr[c]), m[c])
            s0[c] += g
            s1[c] += d
            s2[c] += g * d
        i += 1


@kernel(fastmath=FM_REDUCE)
def _slab_mbwd_block(x2, g2, m2, b, e, mu, s0, s1, s2):
    """``_slab_bwd_block`` over the valid elements of a mask ``m2`` of shape (L, 1), one flag
    a row for every channel, or (L, C), each element selected (``masked_slabs``)."""
    C = x2.shape[1]
    per = m2.shape[1] != 1 or C == 1
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
def slab_bwd_sums(x2, g2, r0, r1, m, S0, S1, S2, m2=None):
    """Per-channel sums over rows ``r0:r1`` of a slab into ``S0, S1, S2`` (shape (C,)); with a
    mask ``m2`` over its valid elements only.

    Blocks of float32/float16 rows are as large as the forward's one-pass blocks: the block
    totals are compensated, and fewer blocks mean fewer strict scalar merges per channel."""
    C = x2.shape[1]
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
    b = r0
    while b < r1:
        e = min(b + rb, r1)
        if m2 is None:
            _slab_bwd_block(x2, g2, b, e, m, b0, b1, b2)
        else:
            _slab_mbwd_block(x2, g2, m2, b, e, m, b0, b1, b2)
        for c in range(C):
            S0[c], c0[c] = neumaier_add(S0[c], c0[c], b0[c])
            S1[c], c1[c] = neumaier_add(S1[c], c1[c], b1[c])
            S2[c], c2[c] = neumaier_add(S2[c], c2[c], b2[c])
        b = e
    for c in range(C):
        S0[c] += c0[c]
        S1[c] += c1[c]
        S2[c] += c2[c]


@kernel(fastmath=FM_STRICT)
def bwd_workspace(C):
    """``(S0, S1, S2, xbar, a, mdy, k)``: per-channel sums and coefficients of one slab
    (separate arrays: rows of one (7, C) array measured slower, as in ``slabs.slab_moments``)."""
    return (np.empty(C), np.empty(C), np.empty(C), np.empty(C), np.empty(C), np.empty(C),
            np.empty(C))  # fmt: skip


@kernel(fastmath=FM_STRICT)
def slab_bwd_coeffs(n, S0, S1, S2, rstd, w, xbar, a, mdy, k, sdy_out, sdyx_out):
    """Per channel: the second sweep's coefficients and ``sum(dy)``, ``sum(dy * xhat)`` from the
    sums of ``n`` valid rows (a number, or per-channel counts: a channel with none gets zero
    coefficients and sums)."""
    for c in range(S0.shape[0]):
        nc = at(n, c)
        if nc == 0.0:
            xbar[c] = a[c] = mdy[c] = k[c] = 0.0
            sdyx_out[c] = 0.0
            sdy_out[c] = 0.0
        else:
            xbar[c], a[c], mdy[c], k[c], sdyx_out[c] = bwd_coeffs(
                nc, S0[c], S1[c], S2[c], rstd[c], w[c]
            )
            sdy_out[c] = S0[c]


@kernel(fastmath=FM_APPLY)
def _slab_bwd_apply(x2, g2, o2, r0, r1, m, xbar, a, mdy, k):
    C = x2.shape[1]
    xs = x2[r0:r1]
    gs = g2[r0:r1]
    os = o2[r0:r1]
    for i in range(xs.shape[0]):
        for c in range(C):
            e = _sub(_sub(to64(xs[i, c]), m[c]), xbar[c])
            t = _sub(to64(gs[i, c]), mdy[c])
            os[i, c] = cast_like(a[c] * t - e * k[c], os)


#: the folded channels-last apply sweeps stretches of whole rows at least this many elements long
CL_BWD_STRETCH = 512


@kernel(fastmath=FM_APPLY)
def _slab_bwd_apply_folded(x2, g2, o2, r0, r1, a, k, z):
    """Folded ``dx`` of rows r0..r1, the rows seen flat: stretches of P whole rows (``W = P*C``
    elements, coefficients tiled to W), one loop long enough to vectorize whatever C is, with
    no per-row setup (C = 64 rows are only eight vectors long)."""
    C = x2.shape[1]
    xs = x2[r0:r1]
    gs = g2[r0:r1]
    os = o2[r0:r1]
    n = xs.shape[0]
    P = max(1, CL_BWD_STRETCH // max(C, 1))
    W = P * C
    nfull = n // P
    i0 = nfull * P
    if nfull > 0:
        xf = flat_rows(xs, i0)
        gf = flat_rows(gs, i0)
        of = flat_rows(os, i0)
        aw = tile(a, W)
        kw = tile(k, W)
        zw = tile(z, W)
        for j in range(nfull):
            xq = xf[j * W : (j + 1) * W]
            gq = gf[j * W : (j + 1) * W]
            oq = of[j * W : (j + 1) * W]
            for q in range(W):
                t = aw[q] * to64(gq[q]) + zw[q]
                oq[q] = cast_like(t - kw[q] * to64(xq[q]), oq)
    for i in range(i0, n):
        xr = xs[i]
        gr = gs[i]
        orow = os[i]
        for c in range(C):
            t = a[c] * to64(gr[c]) + z[c]
            orow[c] = cast_like(t - k[c] * to64(xr[c]), orow)


@kernel(fastmath=FM_STRICT)
def slab_bwd_apply(x2, g2, o2, r0, r1, m, xbar, a, mdy, k):
    """``dx`` over rows ``r0:r1`` of a slab; folded (see ``bwd_fold``) when every channel
    allows it."""
    if not wide(x2):
        C = x2.shape[1]
        z = np.empty(C)
        fold = True
        for c in range(C):
            ok, z[c] = bwd_fold(m[c], xbar[c], a[c], mdy[c], k[c])
            if not ok:
                fold = False
        if fold:
            _slab_bwd_apply_folded(x2, g2, o2, r0, r1, a, k, z)
            return
    _slab_bwd_apply(x2, g2, o2, r0, r1, m, xbar, a, mdy, k)


# --------------------------------------------------------------------------------------------
# backward, channels-last kernels


@kernel(fastmath=FM_STRICT)
def slab_bwd(x2, g2, o2, m, rstd, w, sdy_out, sdyx_out):
    """Both sweeps of one slab, every row valid: its sums, then ``dx``."""
    L = x2.shape[0]
    S0, S1, S2, xbar, a, mdy, k = bwd_workspace(x2.shape[1])
    slab_bwd_sums(x2, g2, 0, L, m, S0, S1, S2)
    slab_bwd_coeffs(float(L), S0, S1, S2, rstd, w, xbar, a, mdy, k, sdy_out, sdyx_out)
    slab_bwd_apply(x2, g2, o2, 0, L, m, xbar, a, mdy, k)


@kernel(fastmath=FM_STRICT, parallel=True)
def cl_bwd_fused(x, dy, dx, mean, rstd, w, sdy_out, sdyx_out):
    """One task per batch element: per-channel sums of its slab, then ``dx``."""
    for n in prange(x.shape[0]):
        slab_bwd(x[n], dy[n], dx[n], mean[n], rstd[n], w, sdy_out[n], sdyx_out[n])


@kernel(fastmath=FM_STRICT, parallel=True)
def cl_bwd_partial(x, dy, mean, nchunks, ps0, ps1, ps2):
    """Per-channel sums of ``nchunks`` row chunks of every slab into ``(N, nchunks, C)``."""
    N = x.shape[0]
    L = x.shape[1]
    for t in prange(N * nchunks):
        n, j, s, e = task_span(t, nchunks, L)
        slab_bwd_sums(x[n], dy[n], s, e, mean[n], ps0[n, j], ps1[n, j], ps2[n, j])


@kernel(fastmath=FM_STRICT, parallel=True)
def cl_bwd_apply(x, dy, dx, nchunks, m, xbar, a, mdy, k):
    """Second sweep with per-(n, c) coefficients: tasks ``N * nchunks``.  (Not in reverse
    order as ``cf_apply``: measured slower here, x and dy together outgrow the cache.)"""
    N = x.shape[0]
    L = x.shape[1]
    T = N * nchunks
    for t in prange(T):
        n, j, s, e = task_span(t, nchunks, L)
        slab_bwd_apply(x[n], dy[n], dx[n], s, e, m[n], xbar[n], a[n], mdy[n], k[n])
