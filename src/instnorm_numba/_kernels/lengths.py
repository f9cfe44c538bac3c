"""Variable lengths: the first ``lengths[n]`` positions of sample ``n`` are valid (one spatial
axis), in both layouts, forward and backward.

The valid part of a row ``x[r, :len]`` (channels-first) or of a slab ``x[n, :len]``
(channels-last) is itself a contiguous array, so the dense machinery runs on it unchanged
(``row_shift``, ``row_stats``, ``row_normalize``; ``slab_pilot``, ``slab_moments``,
``slab_normalize``; the backward sums and sweeps), and the tail is filled with zeros
(``zero_fill`` / ``zero_rows``, which the mask kernels use too).  On a full length the
arithmetic is the dense one, element for element.  An instance of length 0 gets NaN statistics,
zeros in its output and zero sums in the backward.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from .._jit import FM_APPLY, FM_STRICT, kernel
from .elements import (
    cast_like,
)
from .moments import (
    bwd_coeffs,
    row_shift,
    row_stats,
)
from .rows import row_normalize
from .rows_backward import row_bwd_apply, row_bwd_sums
from .slabs import (
    slab_moments,
    slab_normalize,
    slab_pilot,
)
from .slabs_backward import slab_bwd_apply, slab_bwd_sums

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
