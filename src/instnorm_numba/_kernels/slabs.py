"""Channels-last forward: a slab ``x[n]`` of shape ``(L, C)`` per batch element, channels
contiguous; instance ``(n, c)`` is column ``c``.  No transpose: rows of ``C`` values are walked
accumulating per-channel vectors.

* Moments (``slab_moments``): blocks of rows sized by ``slab_block_rows`` (in L1), two-pass for
  float64 and one pass for float32/float16, merged per channel as in ``moments``.  Fewer
  channels than ``CL_PERIODIC_C`` are swept flat: the rows seen flat are periodic with period
  ``C``, one accumulator per position of a stretch of ``CL_PERIODIC_ROWS`` rows
  (``periodic_stretches`` / ``fold_periodic``, shared with the backward).
* Normalization (``slab_normalize``): folded ``(x - M) * a + b`` over flat stretches of whole
  rows against tiled coefficients (``tile``), 16 channels at a time in vector IR for float32
  (``vector.cl_apply_vec``), float32 arithmetic for float16 when ``half32_ok``.
* ``cl_fused``: one task per slab; ``cl_partial`` + ``cl_apply``: few slabs, split into row
  chunks across threads.
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
from .moments import at, median3, merge_moments, task_span
from .vector import cl_apply_vec

#: cap on the elements per channels-last row block
CL_BLOCK_ELEMS = 4096
CL_MAX_ROWS = 128
CL_MIN_ROWS = 16


# --------------------------------------------------------------------------------------------
# channels-last building blocks (a slab (L, C) per batch element, channels contiguous)


@kernel(fastmath=FM_STRICT)
def cl_rows_per_block(C):
    # at least CL_MIN_ROWS rows even when that outgrows L1: every merge of a block into the
    # running mean rounds it once, and with one row per block (C > 4096) those roundings add
    # up to more than the float64 guarantee allows
    return max(CL_MIN_ROWS, min(CL_MAX_ROWS, CL_BLOCK_ELEMS // max(C, 1)))


@kernel(fastmath=FM_STRICT)
def slab_pilot(x2, K):
    L = x2.shape[0]
    C = x2.shape[1]
    if L == 0:
        K[:] = 0.0
        return
    for c in range(C):
        K[c] = median3(to64(x2[0, c]), to64(x2[L // 2, c]), to64(x2[L - 1, c]))


@kernel(fastmath=FM_STRICT)
def _slab_block_twopass(x2, b, e, K, mb, m2b, sd):
    """Per-channel block mean and centred sum of squares of rows b..e (vectorized over C),
    corrected two-pass as ``_block_m2`` (``sd`` is workspace)."""
    C = x2.shape[1]
    xs = x2[b:e]
    nb = xs.shape[0]
    mb[:] = 0.0
    m2b[:] = 0.0
    for i in range(nb):
        for c in range(C):
            mb[c] += _sub(to64(xs[i, c]), K[c])
    for c in range(C):
        mb[c] /= nb
        sd[c] = 0.0
    for i in range(nb):
        for c in range(C):
            d = _sub(_sub(to64(xs[i, c]), K[c]), mb[c])
            sd[c] += d
            m2b[c] += d * d
    for c in range(C):
        mb[c] += sd[c] / nb
        v = m2b[c] - sd[c] * (sd[c] / nb)
        m2b[c] = 0.0 if v < 0.0 else v  # (not max(): NaN must survive)


#: one-pass (float32/float16) channels-last blocks: elements and rows per block
CL_BLOCK_ELEMS_ONEPASS = 16384
CL_MAX_ROWS_ONEPASS = 256
#: channels-last input with fewer channels than this is swept flat, CL_PERIODIC_ROWS rows at a time
CL_PERIODIC_C = 16
CL_PERIODIC_ROWS = 32


@kernel(fastmath=FM_STRICT)
def slab_block_rows(x2):
    """Rows per block of the channels-last sums, the forward's moments and the backward's
    alike: two-pass float64 blocks stay in L1 (``cl_rows_per_block``); one-pass float32/float16
    blocks are larger, since fewer blocks mean fewer strict scalar merges per channel."""
    C = x2.shape[1]
    if wide(x2):
        return cl_rows_per_block(C)
    rb = max(1, CL_BLOCK_ELEMS_ONEPASS // max(C, 1))
    if C >= CL_PERIODIC_C:
        rb = min(CL_MAX_ROWS_ONEPASS, rb)
    return rb


@kernel(fastmath=FM_STRICT)
def periodic_stretches(nb, C):
    """How many stretches of CL_PERIODIC_ROWS rows a block of ``nb`` rows sweeps flat.

    With fewer than CL_PERIODIC_C channels the rows, seen flat, are periodic with period C:
    a stretch of ``W = CL_PERIODIC_ROWS * C`` elements with one accumulator per position is a
    loop long enough to vectorize, and ``fold_periodic`` folds the positions into channels
    afterwards.  0: sweep row by row."""
    if C < CL_PERIODIC_C and nb >= CL_PERIODIC_ROWS:
        return nb // CL_PERIODIC_ROWS
    return 0


@kernel(fastmath=FM_STRICT)
def flat_rows(xs, rows):
    """The first ``rows`` rows of an ``(n, C)`` block seen as one flat run of elements."""
    return xs[:rows].reshape(rows * xs.shape[1])


@kernel(fastmath=FM_STRICT)
def tile(v, W):
    """``v`` of shape (C,) repeated to length ``W`` (a multiple of C), to line up with a flat
    stretch of whole rows."""
    C = v.shape[0]
    out = np.empty(W, v.dtype)
    for q in range(W):
        out[q] = v[q % C]
    return out


@kernel(fastmath=FM_STRICT)
def fold_periodic(acc, out):
    """``out[q % C] += acc[q]``: the per-position accumulators of a periodic stretch, into
    their channels."""
    C = out.shape[0]
    for q in range(acc.shape[0]):
        out[q % C] += acc[q]


@kernel(fastmath=FM_REDUCE)
def _slab_block_onepass(x2, b, e, K, mb, m2b):
    """Per-channel block mean and M2 of rows b..e in one pass (float32/float16 input)."""
    C = x2.shape[1]
    xs = x2[b:e]
    nb = xs.shape[0]
    mb[:] = 0.0
    m2b[:] = 0.0
    nfull = periodic_stretches(nb, C)
    if nfull > 0:  # few channels: periodic flat stretches
        W = CL_PERIODIC_ROWS * C
        flat = flat_rows(xs, nfull * CL_PERIODIC_ROWS)
        kw = tile(K, W)
        a1 = np.zeros(W)
        a2 = np.zeros(W)
        for j in range(nfull):
            sub = flat[j * W : (j + 1) * W]
            for k in range(W):
                d = _sub(to64(sub[k]), kw[k])
                a1[k] += d
                a2[k] += d * d
        fold_periodic(a1, mb)
        fold_periodic(a2, m2b)
    i = nfull * CL_PERIODIC_ROWS
    # four rows per sweep over the channels: a quarter of the accumulator loads and stores
    # (they, not the arithmetic, bound this loop)
    while i + 4 <= nb:
        x0 = xs[i]
        x1 = xs[i + 1]
        x2_ = xs[i + 2]
        x3 = xs[i + 3]
        for c in range(C):
            k = K[c]
            d0 = _sub(to64(x0[c]), k)
            d1 = _sub(to64(x1[c]), k)
            d2 = _sub(to64(x2_[c]), k)
            d3 = _sub(to64(x3[c]), k)
            mb[c] += (d0 + d1) + (d2 + d3)
            m2b[c] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
        i += 4
    while i < nb:
        xr = xs[i]
        for c in range(C):
            d = _sub(to64(xr[c]), K[c])
            mb[c] += d
            m2b[c] += d * d
        i += 1
    for c in range(C):
        s1 = mb[c]
        mb[c] = s1 / nb
        v = m2b[c] - s1 * mb[c]
        m2b[c] = 0.0 if v < 0.0 else v


# row masks (``masked_slabs``: one mask for every channel, ``m1[i]`` nonzero for a valid row):
# the same blocks with the invalid rows skipped, blocks of valid rows only through the dense
# block kernels above


@kernel(fastmath=FM_REDUCE)
def rowmask_block_sum(x2, m1, b, e, K, mb):
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
def block_finish(nb, mb, m2b, sd, wide_):
    """Per-channel sums of a block of ``nb`` elements to (mean, M2), in place: corrected
    two-pass (``sd`` the residual sums) or one pass (``mb``, ``m2b`` the sums)."""
    for c in range(mb.shape[0]):
        if wide_:
            mb[c] += sd[c] / nb
            v = m2b[c] - sd[c] * (sd[c] / nb)
        else:
            s1 = mb[c]
            mb[c] = s1 / nb
            v = m2b[c] - s1 * mb[c]
        m2b[c] = 0.0 if v < 0.0 else v  # (not max(): NaN must survive)


@kernel(fastmath=FM_STRICT)
def rowmask_block(x2, m1, b, e, K, mb, m2b, sd):
    """Per-channel (mean of x - K, M2) of the valid rows of ``b:e``; the row count."""
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
        rowmask_block_sum(x2, m1, b, e, K, mb)
        for c in range(x2.shape[1]):
            mb[c] /= nb
        _rowmask_block_m2(x2, m1, b, e, K, mb, m2b, sd)
    else:
        _rowmask_block_sums(x2, m1, b, e, K, mb, m2b)
    block_finish(nb, mb, m2b, sd, wide(x2))
    return full


@kernel(fastmath=FM_STRICT)
def merge_channels(n, nb, mean, cmean, m2, comp, mb, m2b):
    """Fold a block's per-channel ``(mb, m2b)`` of ``nb`` elements into the running moments
    of ``n`` elements (``moments.merge_moments``, per channel)."""
    for c in range(mean.shape[0]):
        _, mean[c], cmean[c], m2[c], comp[c] = merge_moments(
            n, mean[c], cmean[c], m2[c], comp[c], nb, mb[c], m2b[c]
        )


@kernel(fastmath=FM_STRICT)
def slab_moments(x2, r0, r1, K, mean, m2, m1=None):
    """Per-channel (mean of x - K, M2) over rows r0..r1 of a slab; returns the row count.
    With a row mask ``m1`` (one flag per row, for every channel), over its valid rows only."""
    C = x2.shape[1]
    rb = slab_block_rows(x2)
    cmean = np.zeros(C)  # (separate arrays: rows of one (5, C) array measured slower)
    comp = np.zeros(C)
    mb = np.empty(C)
    m2b = np.empty(C)
    sd = np.empty(C)
    mean[:] = 0.0
    m2[:] = 0.0
    n = 0.0
    b = r0
    while b < r1:
        e = min(b + rb, r1)
        if m1 is None:
            nb = float(e - b)
            if wide(x2):
                _slab_block_twopass(x2, b, e, K, mb, m2b, sd)
            else:
                _slab_block_onepass(x2, b, e, K, mb, m2b)
        else:
            nb = float(rowmask_block(x2, m1, b, e, K, mb, m2b, sd))
        if nb > 0.0:
            merge_channels(n, nb, mean, cmean, m2, comp, mb, m2b)
            n += nb
        b = e
    for c in range(C):
        mean[c] += cmean[c]
        m2[c] += comp[c]
    return n


@kernel(fastmath=FM_APPLY)
def slab_apply(x2, y2, r0, r1, K, cm, a, b):
    C = x2.shape[1]
    xs = x2[r0:r1]
    ys = y2[r0:r1]
    for i in range(xs.shape[0]):
        for c in range(C):
            d = _sub(_sub(to64(xs[i, c]), K[c]), cm[c])
            ys[i, c] = cast_like(d * a[c] + b[c], ys)


#: the channels-last apply sweeps stretches of whole rows of about this many elements
CL_APPLY_STRETCH = 256


@kernel(fastmath=FM_STRICT)
def stretch_rows(C):
    """Rows per flat stretch of the channels-last apply (about CL_APPLY_STRETCH elements)."""
    return max(1, CL_APPLY_STRETCH // max(C, 1))


@kernel(fastmath=FM_APPLY)
def apply_tiled(x2, y2, r0, r1, M, a, b, mw, aw, bw):
    """``y = (x - M) * a + b`` per channel over rows r0..r1, swept flat: stretches of
    ``stretch_rows`` whole rows against ``mw``, ``aw``, ``bw``, the coefficients tiled to one
    stretch (``tile``); the rows left over one by one.

    Row by row, a row of C = 64 float32 is exactly one pass of LLVM's vector body, preceded
    by its overlap checks on five arrays: 0.31 ns an element, twice the channels-first apply.
    One long loop per stretch pays those once."""
    C = x2.shape[1]
    xs = x2[r0:r1]
    ys = y2[r0:r1]
    rows = stretch_rows(C)
    W = rows * C
    nfull = xs.shape[0] // rows
    i0 = nfull * rows
    xf = flat_rows(xs, i0)
    yf = flat_rows(ys, i0)
    for j in range(nfull):
        xsub = xf[j * W : (j + 1) * W]
        ysub = yf[j * W : (j + 1) * W]
        for k in range(W):
            ysub[k] = affine_like(xsub[k], mw[k], aw[k], bw[k], ysub)
    xr = xs[i0:]
    yr = ys[i0:]
    for i in range(xr.shape[0]):
        for c in range(C):
            yr[i, c] = affine_like(xr[i, c], M[c], a[c], b[c], yr)


@kernel(fastmath=FM_STRICT)
def _slab_apply_folded(x2, y2, r0, r1, M, a, b):
    """``apply_tiled``, the coefficients tiled here."""
    W = stretch_rows(x2.shape[1]) * x2.shape[1]
    apply_tiled(x2, y2, r0, r1, M, a, b, tile(M, W), tile(a, W), tile(b, W))


@kernel(fastmath=FM_STRICT)
def apply_mode(x2, K, cm, a, b):
    """How the valid elements of a slab are normalized, and its coefficients: ``(mode, M,
    M32, a32, b32)``, mode 2 float16 in float32 arithmetic (``half32_ok``), 1 folded
    (``|M * a| <= FOLD_LIMIT``), 0 exact; ``M = K + cm``."""
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
    return mode, M, M32, a32, b32


@kernel(fastmath=FM_STRICT)
def slab_normalize_mode(x2, y2, r0, r1, mode, K, cm, M, a, b, M32, a32, b32):
    """``slab_normalize`` with the choice and coefficients of ``apply_mode`` made already."""
    if mode == 2:  # float16 in float32 arithmetic (see "float16 data" in ``elements``)
        _slab_apply_folded(x2, y2, r0, r1, M32, a32, b32)
    elif mode == 1:
        # (few channels would fill a fraction of each 16-lane vector: swept flat instead)
        if x2.shape[1] < CL_PERIODIC_C or not cl_apply_vec(x2, y2, r0, r1, M, a, b):
            _slab_apply_folded(x2, y2, r0, r1, M, a, b)
    else:
        slab_apply(x2, y2, r0, r1, K, cm, a, b)


@kernel(fastmath=FM_STRICT)
def slab_normalize(x2, y2, r0, r1, K, cm, a, b):
    """``y = ((x - K) - cm) * a + b`` per channel; one subtraction when the dtype leaves room
    (see ``row_normalize``)."""
    mode, M, M32, a32, b32 = apply_mode(x2, K, cm, a, b)
    slab_normalize_mode(x2, y2, r0, r1, mode, K, cm, M, a, b, M32, a32, b32)


# --------------------------------------------------------------------------------------------
# channels-last kernels


@kernel(fastmath=FM_STRICT)
def slab_coeffs(n, K, cm, m2, w, eps, a, mean_out, var_out):
    """Per channel of a slab of ``n`` valid rows: ``a = rstd * w``, the mean and the variance
    (``n`` a number, or an array of per-channel counts; no valid element: NaN statistics,
    ``a = 0``)."""
    for c in range(K.shape[0]):
        nc = at(n, c)
        if nc == 0.0:
            mean_out[c] = np.nan
            var_out[c] = np.nan
            a[c] = 0.0
        else:
            var = m2[c] / nc
            a[c] = (1.0 / np.sqrt(var + eps)) * w[c]
            mean_out[c] = K[c] + cm[c]
            var_out[c] = var


@kernel(fastmath=FM_STRICT)
def slab_fused(x2, y2, w, b, eps, mean_out, var_out):
    """Statistics and normalization of one slab ``(L, C)``, every row valid."""
    C = x2.shape[1]
    L = x2.shape[0]
    K = np.empty(C)
    cm = np.empty(C)
    m2 = np.empty(C)
    a = np.empty(C)
    slab_pilot(x2, K)
    slab_moments(x2, 0, L, K, cm, m2)
    slab_coeffs(float(L), K, cm, m2, w, eps, a, mean_out, var_out)
    slab_normalize(x2, y2, 0, L, K, cm, a, b)


@kernel(fastmath=FM_STRICT, parallel=True)
def cl_fused(x, y, w, b, eps, mean_out, var_out):
    """One task per batch element: per-channel statistics of its slab, then normalization."""
    for n in prange(x.shape[0]):
        slab_fused(x[n], y[n], w, b, eps, mean_out[n], var_out[n])


@kernel(fastmath=FM_STRICT, parallel=True)
def cl_partial(x, nchunks, K_out, pn, pmean, pm2):
    """Per-channel moments of ``nchunks`` row chunks of every slab: tasks ``N * nchunks``."""
    N = x.shape[0]
    L = x.shape[1]
    C = x.shape[2]
    for t in prange(N * nchunks):
        n, j, s, e = task_span(t, nchunks, L)
        K = np.empty(C)
        slab_pilot(x[n], K)
        pn[n, j] = slab_moments(x[n], s, e, K, pmean[n, j], pm2[n, j])
        if j == 0:
            K_out[n, :] = K


@kernel(fastmath=FM_STRICT, parallel=True)
def cl_apply(x, y, nchunks, K, cm, a, b):
    """``y = ((x - K) - cm) * a + b`` with per-(n, c) K, cm, a, b: tasks ``N * nchunks``, in
    the reverse order of ``cl_partial``'s (see ``cf_apply``)."""
    N = x.shape[0]
    L = x.shape[1]
    T = N * nchunks
    for t0 in prange(T):
        t = T - 1 - t0
        n, j, s, e = task_span(t, nchunks, L)
        slab_normalize(x[n], y[n], s, e, K[n], cm[n], a[n], b[n])
