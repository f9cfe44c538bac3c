"""Channels-first backward: both sweeps of ``instance_norm_backward`` over rows.

Gradients of instance normalization with statistics from the input (training mode), per
instance, given the forward's ``mean`` and ``rstd``::

    d = x - mean,  S0 = sum(dy),  S1 = sum(d),  S2 = sum(dy * d)      (float64, one sweep)
    xbar = S1 / L                 what is left of the mean after ``mean`` was rounded
    sum(dy * xhat) = rstd * (S2 - xbar * S0)                (= grad_weight's share)
    dx = a * (dy - S0 / L) - ((d - xbar) * k),  a = rstd * w,  k = a * rstd * sum(dy*xhat) / L

``xhat = (d - xbar) * rstd`` is centred with its own float64 mean: ``mean`` arrives rounded to
float64, which on data far from zero (1e4 + noise) is off by many epsilon of the noise;
re-centring removes that, as the forward's shift K does.  The sums are accumulated block by
block (vectorized, reassociating) and the block totals compensated (Neumaier, strict), so an
instance of millions of elements loses nothing either.  The second sweep runs while the
instance is still in cache; instances split across threads produce per-chunk partial sums that
are added afterwards (``moments.bwd_finish``), never shared accumulators.  float32/float16 rows
of at least ``BWD_FOLD_MIN`` elements use the folded apply ``dx = a * dy - k * x + z``
(``moments.bwd_fold``).
"""

from __future__ import annotations

from numba import prange

from .._jit import FM_APPLY, FM_REDUCE, FM_STRICT, kernel
from .elements import _sub, cast_like, to64, wide
from .moments import BLOCK, bwd_coeffs, bwd_fold, neumaier_add, task_span

# --------------------------------------------------------------------------------------------
# backward, channels-first building blocks


@kernel(fastmath=FM_REDUCE)
def _bwd_block(x, dy, start, stop, m):
    xs = x[start:stop]
    gs = dy[start:stop]
    s0 = 0.0
    s1 = 0.0
    s2 = 0.0
    for i in range(xs.shape[0]):
        g = to64(gs[i])
        d = _sub(to64(xs[i]), m)
        s0 += g
        s1 += d
        s2 += g * d
    return s0, s1, s2


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
def row_bwd_sums(x, dy, start, stop, m, mask=None):
    """``(sum(dy), sum(x - m), sum(dy * (x - m)))`` over ``start:stop`` of one row; with a
    ``mask`` row (uint8 0/1) over its valid elements only."""
    s0 = s1 = s2 = c0 = c1 = c2 = 0.0
    b = start
    while b < stop:
        e = min(b + BLOCK, stop)
        if mask is None:
            b0, b1, b2 = _bwd_block(x, dy, b, e, m)
        else:
            b0, b1, b2 = _mbwd_block(x, dy, mask, b, e, m)
        s0, c0 = neumaier_add(s0, c0, b0)
        s1, c1 = neumaier_add(s1, c1, b1)
        s2, c2 = neumaier_add(s2, c2, b2)
        b = e
    return s0 + c0, s1 + c1, s2 + c2


@kernel(fastmath=FM_APPLY)
def _row_bwd_apply(x, dy, dx, start, stop, m, xbar, a, mdy, k):
    xs = x[start:stop]
    gs = dy[start:stop]
    os = dx[start:stop]
    for i in range(xs.shape[0]):
        e = _sub(_sub(to64(xs[i]), m), xbar)
        t = _sub(to64(gs[i]), mdy)
        os[i] = cast_like(a * t - e * k, os)


@kernel(fastmath=FM_APPLY)
def _row_bwd_apply_folded(x, dy, dx, start, stop, a, k, z):
    xs = x[start:stop]
    gs = dy[start:stop]
    os = dx[start:stop]
    for i in range(xs.shape[0]):
        t = a * to64(gs[i]) + z
        os[i] = cast_like(t - k * to64(xs[i]), os)


#: channels-first rows shorter than this keep the unfolded apply: the folded one costs about
#: 10 ns more per row (measured: 4x4 instances 18% slower, 128-element rows 10%), which only
#: rows of a thousand elements or more win back (3000-4096 elements in cache: 15% faster)
BWD_FOLD_MIN = 1024


@kernel(fastmath=FM_STRICT)
def row_bwd_apply(x, dy, dx, start, stop, m, xbar, a, mdy, k):
    """``dx`` over ``start:stop`` of one row, folded when the dtype leaves room and the row is
    at least BWD_FOLD_MIN long."""
    if not wide(x) and stop - start >= BWD_FOLD_MIN:
        fold, z = bwd_fold(m, xbar, a, mdy, k)
        if fold:
            _row_bwd_apply_folded(x, dy, dx, start, stop, a, k, z)
            return
    _row_bwd_apply(x, dy, dx, start, stop, m, xbar, a, mdy, k)


# --------------------------------------------------------------------------------------------
# backward, channels-first kernels


@kernel(fastmath=FM_STRICT, parallel=True)
def cf_bwd_fused(x, dy, dx, mean, rstd, w, C, sdy_out, sdyx_out):
    """Both sweeps of each row in one task: sums, then ``dx`` while the row is hot."""
    R = x.shape[0]
    L = x.shape[1]
    for r in prange(R):
        m = mean[r]
        s0, s1, s2 = row_bwd_sums(x[r], dy[r], 0, L, m)
        xbar, a, mdy, k, sdyx = bwd_coeffs(float(L), s0, s1, s2, rstd[r], w[r % C])
        if L < BWD_FOLD_MIN:  # (decided here: a short row must not even pay for the test)
            _row_bwd_apply(x[r], dy[r], dx[r], 0, L, m, xbar, a, mdy, k)
        else:
            row_bwd_apply(x[r], dy[r], dx[r], 0, L, m, xbar, a, mdy, k)
        sdy_out[r] = s0
        sdyx_out[r] = sdyx


@kernel(fastmath=FM_STRICT, parallel=True)
def cf_bwd_partial(x, dy, mean, nchunks, ps0, ps1, ps2):
    """Sums of each of ``nchunks`` chunks of every row into ``(R, nchunks, 1)``."""
    R = x.shape[0]
    L = x.shape[1]
    for t in prange(R * nchunks):
        r, j, s, e = task_span(t, nchunks, L)
        ps0[r, j, 0], ps1[r, j, 0], ps2[r, j, 0] = row_bwd_sums(x[r], dy[r], s, e, mean[r])


@kernel(fastmath=FM_STRICT, parallel=True)
def cf_bwd_apply(x, dy, dx, nchunks, m, xbar, a, mdy, k):
    """Second sweep with per-row coefficients: tasks ``R * nchunks``."""
    R = x.shape[0]
    L = x.shape[1]
    for t in prange(R * nchunks):
        r, j, s, e = task_span(t, nchunks, L)
        row_bwd_apply(x[r], dy[r], dx[r], s, e, m[r], xbar[r], a[r], mdy[r], k[r])
