"""Shared moment arithmetic: the shift, block moments, Chan and Neumaier merges, task spans.

Accuracy scheme, per instance:

1. a shift ``K`` taken from the instance itself: the median of three samples (exactly the value
   of a constant instance), or for long float32/float16 rows the mean of their first ``BLOCK``
   elements (``row_shift``);
2. moments of ``x - K`` block by block.  float64 data: each block of ``BLOCK`` elements is summed
   twice while it sits in L1 (its mean, then its centred sum of squares; the residual sum of
   the second pass corrects the block mean, Chan, Golub & LeVeque).  float32/float16 data: one
   pass per block of ``BLOCK_ONEPASS`` elements, ``M2 = S2 - S1**2 / n``, since float64 has 29
   spare bits over float32 (the one pass loses at most ``g * 2**-52 * (1 + L / n0)`` of M2,
   ``g`` the additions per vector lane in a block, ``n0`` the elements behind the shift).
   Blocks merge with Chan et al.'s pairwise update, the sum of squares compensated (Neumaier).
   Data far from zero (``1e6 + noise``) costs no digits: ``x - K`` is exact when ``x`` and
   ``K`` lie within a factor of two (Sterbenz);
3. instances split across threads (few, long instances) produce per-chunk moments
   (``task_span`` names a task's chunk) merged afterwards by ``merge_partials``, never shared
   accumulators.

The backward's per-instance sums become the coefficients of its second sweep here too
(``bwd_coeffs``, ``bwd_fold``, ``bwd_finish``); the formulas are in ``rows_backward``.
"""

from __future__ import annotations

import numpy as np
from numba import types
from numba.extending import overload

from .._jit import FM_REDUCE, FM_STRICT, kernel
from .elements import FOLD_LIMIT, _sub, to64, wide

#: elements per block in a channels-first row (8 KiB of float64: stays in L1)
BLOCK = 1024


def at(v, c):  # pragma: no cover - replaced by the overload inside kernels
    return v[c] if hasattr(v, "shape") else v


@overload(at)
def _ov_at(v, c):
    """``v[c]`` of an array, or ``v`` itself: an instance count that is one number for every
    channel (dense, lengths) or one per channel (masks); also a chunk's count in
    ``merge_partials`` and an instance's in ``bwd_finish``."""
    if isinstance(v, types.Array):
        return lambda v, c: v[c]
    return lambda v, c: v


@kernel(fastmath=FM_STRICT)
def median3(a, b, c):
    return max(min(a, b), min(max(a, b), c))


@kernel(fastmath=FM_STRICT)
def merge_moments(n, mean, cmean, m2, comp, nb, mb, m2b):
    """Chan et al.: fold a part (nb, mb, m2b) into (n, mean + cmean, m2 + comp).

    Both sums are compensated (Neumaier): the mean as ``mean + cmean``, since a long instance
    merges hundreds of blocks one after the other, and each uncompensated merge rounded the
    running mean once (integer data 0..100 in 128 blocks: 4.4 eps of the spread, beyond the
    float64 guarantee).  Returns ``(n, mean, cmean, m2, comp)``."""
    if nb == 0:
        return n, mean, cmean, m2, comp
    nn = n + nb
    delta = (mb - mean) - cmean
    mean, cmean = neumaier_add(mean, cmean, delta * (nb / nn))
    m2, comp = neumaier_add(m2, comp, m2b + delta * delta * (n * (nb / nn)))
    return nn, mean, cmean, m2, comp


@kernel(fastmath=FM_STRICT)
def chunk_span(j, nchunks, L):
    """``(start, stop)`` of chunk ``j`` of ``nchunks`` over a length ``L``."""
    chunk = (L + nchunks - 1) // nchunks
    s = min(j * chunk, L)
    return s, min(s + chunk, L)


@kernel(fastmath=FM_STRICT)
def task_span(t, nchunks, L):
    """Task ``t`` of a split into ``nchunks`` chunks per group of length ``L``:
    ``(group, chunk, start, stop)``."""
    g = t // nchunks
    j = t - g * nchunks
    s, e = chunk_span(j, nchunks, L)
    return g, j, s, e


# --------------------------------------------------------------------------------------------
# channels-first building blocks (one contiguous row per instance)


@kernel(fastmath=FM_REDUCE)
def _block_sum(x, start, stop, K):
    # loops run over a slice from 0: an index that cannot be negative needs no wraparound
    # check, which is what lets LLVM vectorize the loop
    xs = x[start:stop]
    s = 0.0
    for i in range(xs.shape[0]):
        s += _sub(to64(xs[i]), K)
    return s


@kernel(fastmath=FM_REDUCE)
def _block_m2(x, start, stop, K, mb):
    """(sum d, sum d*d) with d = (x - K) - mb: the second pass of a corrected two-pass block.

    ``sum d`` is what the first pass's rounding left over (Chan, Golub & LeVeque's
    correction): adding ``sum d / n`` to ``mb`` removes the summation error of the block mean,
    which would otherwise reach a few epsilon of the spread."""
    xs = x[start:stop]
    s1 = 0.0
    s2 = 0.0
    for i in range(xs.shape[0]):
        d = _sub(_sub(to64(xs[i]), K), mb)
        s1 += d
        s2 += d * d
    return s1, s2


@kernel(fastmath=FM_STRICT)
def row_pilot(x):
    """The shift K of a row: the median of its first, middle and last elements."""
    L = x.shape[0]
    if L == 0:
        return 0.0
    return median3(to64(x[0]), to64(x[L // 2]), to64(x[L - 1]))


# --------------------------------------------------------------------------------------------
# per-dtype choices
#
# float32 and float16 values carry 24 and 11 significant bits: in float64 there are 29 spare
# bits, enough to take the sum and the sum of squares of ``x - K`` in one pass over each block
# (``M2 = S2 - S1**2 / n``) and to form ``y`` as ``(x - M) * a + b`` with ``M = K + c`` rounded
# once.  Error bounds, relative: the block one-pass loses at most ``g * 2**-52 * (1 + L / n0)``
# of M2 (``g`` the additions per vector lane in a block, ``n0`` the elements behind the shift:
# for a data-value shift ``M2 >= (K - mean)**2``); the single subtraction costs
# ``|M * a| * 2**-53`` of ``max(1, |y|)``, used only while ``|M * a| <= FOLD_LIMIT``.  Both stay
# far below the 0.5 epsilon (2**-24) left after the final rounding.  float64 input keeps the
# two-pass blocks and the exact double subtraction: there are no spare bits.

#: elements per one-pass block (float32/float16 input)
BLOCK_ONEPASS = 2048
#: rows beyond this length take their shift from the mean of the first BLOCK elements
SHIFT_FROM_MEAN = 1 << 12


@kernel(fastmath=FM_REDUCE)
def _block_sums(x, start, stop, K):
    xs = x[start:stop]
    s1 = 0.0
    s2 = 0.0
    for i in range(xs.shape[0]):
        d = _sub(to64(xs[i]), K)
        s1 += d
        s2 += d * d
    return s1, s2


@kernel(fastmath=FM_STRICT)
def row_shift(x):
    """The shift K of a row: float32/float16 rows longer than SHIFT_FROM_MEAN use the mean of
    their first BLOCK elements (which bounds the one-pass error by L / BLOCK), others the
    median-of-three pilot."""
    L = x.shape[0]
    if L > SHIFT_FROM_MEAN and not wide(x):
        return _block_sum(x, 0, BLOCK, 0.0) / BLOCK
    return row_pilot(x)


@kernel(fastmath=FM_STRICT)
def block_moments(x, b, e, K):
    """(mean of x - K, M2) of the block ``x[b:e]``: corrected two-pass for float64 input,
    one pass for float32/float16 (see "per-dtype choices")."""
    nb = e - b
    if wide(x):
        mb = _block_sum(x, b, e, K) / nb
        sd, m2b = _block_m2(x, b, e, K, mb)
        mb += sd / nb
        m2b -= sd * (sd / nb)
    else:
        s1, s2 = _block_sums(x, b, e, K)
        mb = s1 / nb
        m2b = s2 - s1 * mb
    if m2b < 0.0:  # (not max(): NaN must survive)
        m2b = 0.0
    return mb, m2b


@kernel(fastmath=FM_STRICT)
def row_stats(x, start, stop, K):
    """(n, mean of x - K, M2) over x[start:stop]: blocks of BLOCK elements (float64) or
    BLOCK_ONEPASS (float32/float16), merged with Chan et al.'s update."""
    step = BLOCK if wide(x) else BLOCK_ONEPASS
    n = mean = cmean = m2 = comp = 0.0
    b = start
    while b < stop:
        e = min(b + step, stop)
        mb, m2b = block_moments(x, b, e, K)
        n, mean, cmean, m2, comp = merge_moments(n, mean, cmean, m2, comp, float(e - b), mb, m2b)
        b = e
    return n, mean + cmean, m2 + comp


# --------------------------------------------------------------------------------------------
# shared


@kernel(fastmath=FM_STRICT)
def merge_partials(pn, pmean, pm2, mean_out, m2_out):
    """Fold chunk moments ``(G, nchunks[, C])`` into per-instance ``(G, C)`` mean and M2; the
    counts ``pn`` are ``(G, nchunks)`` or ``(G, nchunks, C)`` (``at``)."""
    G = pmean.shape[0]
    nch = pmean.shape[1]
    C = pmean.shape[2]
    for g in range(G):
        for c in range(C):
            n = mean = cmean = m2 = comp = 0.0
            for j in range(nch):
                n, mean, cmean, m2, comp = merge_moments(
                    n, mean, cmean, m2, comp, at(pn[g, j], c), pmean[g, j, c], pm2[g, j, c]
                )
            mean_out[g, c] = mean + cmean
            m2_out[g, c] = m2 + comp


@kernel(fastmath=FM_STRICT)
def finish_partials(pn, pmean, pm2, shift, w, b, eps, mean, var, count, cm, a, bb):
    """The chunk moments of few long masked or padded instances (``merge_partials``' input,
    the counts per chunk) to each instance's statistics and apply coefficients, all
    ``(G, Cp)``: ``count``, ``mean = shift + cm``, ``var``, ``a = w / sqrt(var + eps)`` and
    ``bb = b``; an instance with no valid element gets NaN statistics and ``a = 0``.  The
    channel of ``(g, c)`` is ``c`` for channels-last slabs (``Cp = C``), ``g % C`` for
    channels-first rows (``Cp = 1``).

    One call for the dozen NumPy operations on these small arrays, which cost a split call
    20 us."""
    G = pmean.shape[0]
    nch = pmean.shape[1]
    Cp = pmean.shape[2]
    C = w.shape[0]
    merge_partials(pn, pmean, pm2, cm, var)  # (var holds M2 until divided)
    for g in range(G):
        for c in range(Cp):
            n = 0.0
            for j in range(nch):
                n += at(pn[g, j], c)
            ch = c if Cp > 1 else g % C
            count[g, c] = n
            bb[g, c] = b[ch]
            if n == 0.0:
                mean[g, c] = np.nan
                var[g, c] = np.nan
                a[g, c] = 0.0
            else:
                v = var[g, c] / n
                var[g, c] = v
                mean[g, c] = shift[g, c] + cm[g, c]
                a[g, c] = w[ch] / np.sqrt(v + eps)


# --------------------------------------------------------------------------------------------
# backward: per-instance sums to the coefficients of the second sweep (see rows_backward)


@kernel(fastmath=FM_STRICT)
def neumaier_add(s, comp, v):
    """``s + v`` with its rounding error added to ``comp``."""
    t = s + v
    if abs(s) >= abs(v):
        comp += (s - t) + v
    else:
        comp += (v - t) + s
    return t, comp


@kernel(fastmath=FM_STRICT)
def bwd_coeffs(n, s0, s1, s2, rstd, w):
    """From one instance's sums: ``(xbar, a, mdy, k, sum(dy * xhat))`` for the second sweep."""
    xbar = s1 / n
    sdyx = rstd * (s2 - xbar * s0)
    a = rstd * w
    mdy = s0 / n
    k = a * rstd * (sdyx / n)
    return xbar, a, mdy, k, sdyx


@kernel(fastmath=FM_STRICT)
def bwd_fold(m, xbar, a, mdy, k):
    """``(fold, z)``: whether ``dx = a * dy - k * x + z`` may replace
    ``a * (dy - mdy) - ((x - m) - xbar) * k`` for float32/float16 input, and ``z``.

    The folded form adds only ``|k * (m + xbar)|`` to the magnitudes rounded in float64 (the
    two fused multiply-adds and ``z``): while that stays below FOLD_LIMIT it costs at most
    ``2**16 * 2**-51`` of ``max(1, |dx|)``, far below the 0.5 epsilon (``2**-24``) of the final
    rounding, as in ``row_normalize``.  It saves three subtractions and two broadcast
    coefficients per element."""
    M = m + xbar
    km = k * M
    return abs(km) <= FOLD_LIMIT, km - a * mdy


@kernel(fastmath=FM_STRICT)
def bwd_finish(L, ps0, ps1, ps2, rstd, w, xbar, a, mdy, k, sdy, sdyx):
    """Add chunk sums ``(G, nchunks, Cp)`` per instance; coefficients into ``(G, Cp)`` arrays.
    ``L`` is every instance's element count, or a ``(G, Cp)`` array of counts (``at``); an
    instance with none (masks) gets zero sums and zero coefficients."""
    G = ps0.shape[0]
    nch = ps0.shape[1]
    Cp = ps0.shape[2]
    for g in range(G):
        for c in range(Cp):
            n = float(at(at(L, g), c))
            if n == 0.0:
                xbar[g, c] = a[g, c] = mdy[g, c] = k[g, c] = sdy[g, c] = sdyx[g, c] = 0.0
                continue
            s0 = s1 = s2 = c0 = c1 = c2 = 0.0
            for j in range(nch):
                s0, c0 = neumaier_add(s0, c0, ps0[g, j, c])
                s1, c1 = neumaier_add(s1, c1, ps1[g, j, c])
                s2, c2 = neumaier_add(s2, c2, ps2[g, j, c])
            s0 += c0
            xbar[g, c], a[g, c], mdy[g, c], k[g, c], sdyx[g, c] = bwd_coeffs(
                n, s0, s1 + c1, s2 + c2, rstd[g, c], w[g, c]
            )
            sdy[g, c] = s0
