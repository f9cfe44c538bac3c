"""Variable lengths: the first ``lengths[n]`` positions of sample ``n`` are valid (one spatial
axis), in both layouts, forward and backward.

The valid part of a row ``x[r, :len]`` (channels-first) or of a slab ``x[n, :len]``
(channels-last) is itself a contiguous array, so the dense machinery runs on it unchanged
(``row_shift``, ``row_stats``, ``row_normalize``; ``slabs.slab_fused``; the backward sums and
sweeps, ``slabs_backward.slab_bwd``), and the tail is filled with zeros (``zero_fill`` /
``zero_rows``, which the mask kernels use too).  On a full length the arithmetic is the dense
one, element for element.  An instance of length 0 gets NaN statistics, zeros in its output
and zero sums in the backward.

The rows (or slabs) are shared out between the threads by their cost, one contiguous run each
(``balanced_tasks``): a prange over the rows would give each thread as many rows, whatever
their lengths.  Rows (slabs) few against the threads are split instead, as the dense ones are:
each valid prefix and each padding into ``nchunks`` chunks (``len_task``), the chunk moments
(``cf_len_partial`` / ``cl_len_partial``) merged by ``moments.merge_partials``, then
``cf_len_apply_split`` / ``cl_len_apply_split``; the backward likewise (``*_bwd_len_partial``,
``moments.bwd_finish``, ``*_bwd_len_apply``).
"""

from __future__ import annotations

import numpy as np
from numba import prange

from .._jit import FM_APPLY, FM_STRICT, kernel
from .elements import cast_like
from .moments import bwd_coeffs, chunk_span, row_shift, row_stats
from .rows import row_normalize
from .rows_backward import row_bwd_apply, row_bwd_sums
from .slabs import slab_fused, slab_moments, slab_normalize, slab_pilot
from .slabs_backward import slab_bwd, slab_bwd_apply, slab_bwd_sums

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


#: the cost of writing one zero of padding, against normalizing one valid element (measured:
#: 0.14 ns against 0.6 ns an element, float32, one thread)
ZERO_COST = 0.25


@kernel(fastmath=FM_STRICT)
def balanced_tasks(lengths, per, L, threads):
    """``(T, bounds)``: the ``len(lengths) * per`` rows (channels-first; ``per = C``) or slabs
    (``per = 1``) as one contiguous run per thread, of about equal cost (valid elements plus
    ``ZERO_COST`` per padding element); task ``t`` takes ``bounds[t]:bounds[t + 1]``.
    ``threads`` is the caller's thread count (``numba.get_num_threads()`` inside a kernel
    would make it uncacheable).

    Numba's schedule is static, each thread gets as many iterations: a prange over the rows of
    16 samples of lengths drawn between 1000 and 3000 put 58% of the work on one of two
    threads."""
    n = lengths.shape[0] * per
    T = max(1, min(n, threads))
    bounds = np.empty(T + 1, np.int64)
    total = 0.0
    for s in range(lengths.shape[0]):
        total += per * (lengths[s] + ZERO_COST * (L - lengths[s]))
    acc = 0.0
    i = 0
    bounds[0] = 0
    for t in range(1, T):
        target = total * t / T
        while i < n:
            nv = lengths[i // per]
            cost = nv + ZERO_COST * (L - nv)
            if acc + 0.5 * cost > target:  # a row goes to the run that holds its middle
                break
            acc += cost
            i += 1
        bounds[t] = i
    bounds[T] = n
    return T, bounds


# --------------------------------------------------------------------------------------------
# lengths, channels-first: the dense row machinery on x[r, :len]


@kernel(fastmath=FM_STRICT)
def _len_row(xr, yr, w, b, eps):
    """One row whose valid part is ``xr``: ``(mean, var)``; ``yr`` the whole output row."""
    nv = xr.shape[0]
    if nv == 0:
        zero_fill(yr, 0)
        return np.nan, np.nan
    K = row_shift(xr)
    n, c, m2 = row_stats(xr, 0, nv, K)
    var = m2 / nv
    row_normalize(xr, yr, 0, nv, K, c, (1.0 / np.sqrt(var + eps)) * w, b)
    zero_fill(yr, nv)
    return K + c, var


@kernel(fastmath=FM_STRICT, parallel=True)
def cf_len_fused(x, y, lengths, threads, w, b, C, eps, mean_out, var_out):
    """Row ``r`` has ``lengths[r // C]`` valid elements, then padding (output 0)."""
    T, bounds = balanced_tasks(lengths, C, x.shape[1], threads)
    for t in prange(T):
        for r in range(bounds[t], bounds[t + 1]):
            ch = r % C
            xr = x[r, : lengths[r // C]]
            mean_out[r], var_out[r] = _len_row(xr, y[r], w[ch], b[ch], eps)


@kernel(fastmath=FM_STRICT, parallel=True)
def cf_len_apply(x, y, lengths, threads, C, mean, a, b):
    """``y = (x - mean) * a + b`` on the valid part of each row (running statistics), 0 after."""
    T, bounds = balanced_tasks(lengths, C, x.shape[1], threads)
    for t in prange(T):
        for r in range(bounds[t], bounds[t + 1]):
            nv = lengths[r // C]
            row_normalize(x[r, :nv], y[r, :nv], 0, nv, mean[r], 0.0, a[r], b[r])
            zero_fill(y[r], nv)


@kernel(fastmath=FM_STRICT)
def _len_row_bwd(xr, gr, dxr, m, rstd, w):
    """Both backward sweeps of one row whose valid parts are ``xr``, ``gr``: ``(sum(dy),
    sum(dy * xhat))``; ``dxr`` the whole output row."""
    nv = xr.shape[0]
    if nv == 0:
        zero_fill(dxr, 0)
        return 0.0, 0.0
    s0, s1, s2 = row_bwd_sums(xr, gr, 0, nv, m)
    xbar, a, mdy, k, sdyx = bwd_coeffs(float(nv), s0, s1, s2, rstd, w)
    row_bwd_apply(xr, gr, dxr, 0, nv, m, xbar, a, mdy, k)
    zero_fill(dxr, nv)
    return s0, sdyx


@kernel(fastmath=FM_STRICT, parallel=True)
def cf_bwd_len_fused(x, dy, dx, lengths, threads, mean, rstd, w, C, sdy_out, sdyx_out):
    """Both backward sweeps over the valid part of each row; ``dx`` is 0 on the padding."""
    T, bounds = balanced_tasks(lengths, C, x.shape[1], threads)
    for t in prange(T):
        for r in range(bounds[t], bounds[t + 1]):
            nv = lengths[r // C]
            sdy_out[r], sdyx_out[r] = _len_row_bwd(
                x[r, :nv], dy[r, :nv], dx[r], mean[r], rstd[r], w[r % C]
            )


# --------------------------------------------------------------------------------------------
# lengths, channels-last: the dense slab machinery on x[n, :len]


@kernel(fastmath=FM_STRICT, parallel=True)
def cl_len_fused(x, y, lengths, threads, w, b, eps, mean_out, var_out):
    """Slab ``n`` has ``lengths[n]`` valid rows, then padding rows (output 0)."""
    T, bounds = balanced_tasks(lengths, 1, x.shape[1], threads)
    for t in prange(T):
        for n in range(bounds[t], bounds[t + 1]):
            nv = lengths[n]
            if nv == 0:
                mean_out[n, :] = np.nan
                var_out[n, :] = np.nan
            else:
                slab_fused(x[n, :nv], y[n, :nv], w, b, eps, mean_out[n], var_out[n])
            zero_rows(y[n], nv, y.shape[1])


@kernel(fastmath=FM_STRICT, parallel=True)
def cl_len_apply(x, y, lengths, threads, mean, a, b):
    """``y = (x - mean) * a + b`` per channel on the valid rows of each slab, 0 after."""
    T, bounds = balanced_tasks(lengths, 1, x.shape[1], threads)
    for t in prange(T):
        for n in range(bounds[t], bounds[t + 1]):
            nv = lengths[n]
            zeros = np.zeros(x.shape[2])
            slab_normalize(x[n, :nv], y[n, :nv], 0, nv, mean[n], zeros, a[n], b[n])
            zero_rows(y[n], nv, y.shape[1])


@kernel(fastmath=FM_STRICT, parallel=True)
def cl_bwd_len_fused(x, dy, dx, lengths, threads, mean, rstd, w, sdy_out, sdyx_out):
    """Both backward sweeps over the valid rows of each slab; ``dx`` is 0 on the padding."""
    T, bounds = balanced_tasks(lengths, 1, x.shape[1], threads)
    for t in prange(T):
        for n in range(bounds[t], bounds[t + 1]):
            nv = lengths[n]
            if nv == 0:
                sdy_out[n, :] = 0.0
                sdyx_out[n, :] = 0.0
            else:
                xs, gs, ds = x[n, :nv], dy[n, :nv], dx[n, :nv]
                slab_bwd(xs, gs, ds, mean[n], rstd[n], w, sdy_out[n], sdyx_out[n])
            zero_rows(dx[n], nv, dx.shape[1])


# --------------------------------------------------------------------------------------------
# few long instances: each valid prefix split across the threads


@kernel(fastmath=FM_STRICT)
def len_task(t, G, nchunks, lengths, per, L):
    """Task ``t`` of a split of each of ``G`` groups (rows, ``per = C``; slabs, ``per = 1``)
    into ``nchunks`` chunks of its valid prefix and as many of its padding:
    ``(g, j, nv, s, e, ps, pe)``, valid chunk ``s:e`` and padding chunk ``ps:pe``.

    Chunk-major (task ``t`` is chunk ``t // G`` of group ``t % G``): Numba's static schedule
    gives each thread a contiguous run of tasks, so every thread gets the same share of every
    group whatever the lengths, where a group-major order would give one thread the long ones."""
    j = t // G
    g = t - j * G
    nv = lengths[g // per]
    s, e = chunk_span(j, nchunks, nv)
    ps, pe = chunk_span(j, nchunks, L - nv)
    return g, j, nv, s, e, nv + ps, nv + pe


@kernel(fastmath=FM_STRICT, parallel=True)
def cf_len_partial(x, lengths, C, nchunks, K_out, pn, pmean, pm2):
    """Moments of each of ``nchunks`` chunks of every row's valid prefix (``cf_partial``)."""
    R = x.shape[0]
    for t in prange(R * nchunks):
        r, j, nv, s, e, _, _ = len_task(t, R, nchunks, lengths, C, x.shape[1])
        xv = x[r, :nv]
        K = row_shift(xv)
        n, mean, m2 = row_stats(xv, s, e, K)
        pn[r, j] = n
        pmean[r, j, 0] = mean
        pm2[r, j, 0] = m2
        if j == 0:
            K_out[r] = K


@kernel(fastmath=FM_STRICT, parallel=True)
def cf_len_apply_split(x, y, lengths, C, nchunks, K, c, a, b):
    """``y = ((x - K) - c) * a + b`` on each valid chunk, 0 on each padding chunk, per-row
    coefficients; the tasks in the reverse order of ``cf_len_partial``'s (see ``cf_apply``)."""
    R = x.shape[0]
    T = R * nchunks
    for t0 in prange(T):
        r, j, nv, s, e, ps, pe = len_task(T - 1 - t0, R, nchunks, lengths, C, x.shape[1])
        row_normalize(x[r, :nv], y[r, :nv], s, e, K[r], c[r], a[r], b[r])
        zero_fill(y[r, :pe], ps)


@kernel(fastmath=FM_STRICT, parallel=True)
def cl_len_partial(x, lengths, nchunks, K_out, pn, pmean, pm2):
    """Per-channel moments of ``nchunks`` row chunks of every slab's valid rows
    (``cl_partial``)."""
    N = x.shape[0]
    for t in prange(N * nchunks):
        n, j, nv, s, e, _, _ = len_task(t, N, nchunks, lengths, 1, x.shape[1])
        xv = x[n, :nv]
        K = np.empty(x.shape[2])
        slab_pilot(xv, K)
        pn[n, j] = slab_moments(xv, s, e, K, pmean[n, j], pm2[n, j])
        if j == 0:
            K_out[n, :] = K


@kernel(fastmath=FM_STRICT, parallel=True)
def cl_len_apply_split(x, y, lengths, nchunks, K, cm, a, b):
    """``y = ((x - K) - cm) * a + b`` per channel on each valid row chunk, 0 on each padding
    chunk; the tasks in the reverse order of ``cl_len_partial``'s."""
    N = x.shape[0]
    T = N * nchunks
    for t0 in prange(T):
        n, j, nv, s, e, ps, pe = len_task(T - 1 - t0, N, nchunks, lengths, 1, x.shape[1])
        slab_normalize(x[n, :nv], y[n, :nv], s, e, K[n], cm[n], a[n], b[n])
        zero_rows(y[n], ps, pe)


@kernel(fastmath=FM_STRICT, parallel=True)
def cf_bwd_len_partial(x, dy, lengths, C, mean, nchunks, ps0, ps1, ps2):
    """Backward sums of each of ``nchunks`` chunks of every row's valid prefix."""
    R = x.shape[0]
    for t in prange(R * nchunks):
        r, j, nv, s, e, _, _ = len_task(t, R, nchunks, lengths, C, x.shape[1])
        sums = row_bwd_sums(x[r, :nv], dy[r, :nv], s, e, mean[r])
        ps0[r, j, 0], ps1[r, j, 0], ps2[r, j, 0] = sums


@kernel(fastmath=FM_STRICT, parallel=True)
def cf_bwd_len_apply(x, dy, dx, lengths, C, nchunks, m, xbar, a, mdy, k):
    """Second backward sweep on each valid chunk, 0 on each padding chunk."""
    R = x.shape[0]
    for t in prange(R * nchunks):
        r, j, nv, s, e, ps, pe = len_task(t, R, nchunks, lengths, C, x.shape[1])
        xv, gv, dv = x[r, :nv], dy[r, :nv], dx[r, :nv]
        row_bwd_apply(xv, gv, dv, s, e, m[r], xbar[r], a[r], mdy[r], k[r])
        zero_fill(dx[r, :pe], ps)


@kernel(fastmath=FM_STRICT, parallel=True)
def cl_bwd_len_partial(x, dy, lengths, mean, nchunks, ps0, ps1, ps2):
    """Per-channel backward sums of ``nchunks`` row chunks of every slab's valid rows."""
    N = x.shape[0]
    for t in prange(N * nchunks):
        n, j, nv, s, e, _, _ = len_task(t, N, nchunks, lengths, 1, x.shape[1])
        xv, gv = x[n, :nv], dy[n, :nv]
        slab_bwd_sums(xv, gv, s, e, mean[n], ps0[n, j], ps1[n, j], ps2[n, j])


@kernel(fastmath=FM_STRICT, parallel=True)
def cl_bwd_len_apply(x, dy, dx, lengths, nchunks, m, xbar, a, mdy, k):
    """Second backward sweep on each valid row chunk, 0 on each padding chunk."""
    N = x.shape[0]
    for t in prange(N * nchunks):
        n, j, nv, s, e, ps, pe = len_task(t, N, nchunks, lengths, 1, x.shape[1])
        xv, gv, dv = x[n, :nv], dy[n, :nv], dx[n, :nv]
        slab_bwd_apply(xv, gv, dv, s, e, m[n], xbar[n], a[n], mdy[n], k[n])
        zero_rows(dx[n], ps, pe)
