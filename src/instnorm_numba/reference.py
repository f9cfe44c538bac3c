"""The test oracle: instance normalization in plain NumPy, in extended precision.

Slow and obviously right.  Every value is widened to ``np.longdouble`` (80-bit extended on x86,
64-bit significand), shifted by one of its instance's own elements so that data offset far
from zero loses nothing, and reduced with NumPy's pairwise summation.  The result is rounded
once to the result dtype, or returned unrounded with ``exact=True`` so that errors can be
measured against it.

Same signature and semantics as :func:`instnorm_numba.instance_norm` (without ``out``),
``mask=`` / ``lengths=`` included: statistics of the valid elements only, 0 elsewhere.
"""

from __future__ import annotations

import warnings

import numpy as np

__all__ = [
    "instance_norm",
    "instance_norm_backward",
    "result_dtype",
    "ulp_error",
    "accuracy_scale",
    "backward_accuracy_scale",
]

XP = np.longdouble


def result_dtype(dtype) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype.kind == "f" and dtype.itemsize in (2, 4, 8):
        return dtype.newbyteorder("=")
    if dtype.kind in "iub":
        return np.dtype(np.float64)
    raise TypeError(f"unsupported dtype {dtype}")


def _to_ncl(x, channel_axis):
    x = np.asarray(x)
    axis = channel_axis % x.ndim
    v = np.moveaxis(x, axis, 1)
    N, C = v.shape[:2]
    L = int(np.prod(v.shape[2:]))  # not -1: a reshape cannot infer it when N or C is 0
    return v.reshape(N, C, L).astype(XP), axis, v.shape


def _from_ncl(y, axis, moved_shape):
    return np.moveaxis(y.reshape(moved_shape), 1, axis)


def _valid_ncl(shape, mask, lengths, channel_axis):
    """The valid set as a boolean ``(N, C, L)`` array, or None when everything is valid."""
    if mask is None and lengths is None:
        return None
    nd = len(shape)
    axis = channel_axis % nd
    N, C = shape[0], shape[axis]
    if lengths is not None:
        L = shape[3 - axis]
        v = np.arange(L)[None, :] < np.asarray(lengths)[:, None]
        return np.broadcast_to(v[:, None, :], (N, C, L))
    m = np.asarray(mask, dtype=bool)
    if m.ndim == nd - 1:
        m = np.expand_dims(m, axis)
    m = np.moveaxis(np.broadcast_to(m, shape), axis, 1)
    return m.reshape(N, C, -1) if N * C else m.reshape(N, C, int(np.prod(m.shape[2:])))


def _masked_moments(xl, v):
    """``_moments`` over the valid elements ``v`` only (NaN for an instance with none)."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        cnt = v.sum(axis=-1).astype(XP)
        first = np.argmax(v, axis=-1)[..., None] if v.shape[-1] else None
        if first is None:
            nan = np.full(xl.shape[:2], np.nan, dtype=XP)
            return nan, nan.copy(), xl, cnt
        shift = np.take_along_axis(np.where(v, xl, 0), first, axis=-1)
        d0 = np.where(v, xl - shift, 0)
        m0 = d0.sum(axis=-1, keepdims=True) / cnt[..., None]
        d = np.where(v, d0 - m0, 0)
        var = (d * d).sum(axis=-1) / cnt
        return (shift + m0)[..., 0], var, d, cnt


def _unmask(x, mask):
    if isinstance(x, np.ma.MaskedArray):
        return np.ma.getdata(x), ~np.ma.getmaskarray(x)
    return x, mask


def _moments(xl):
    """Per-instance mean and biased variance of an (N, C, L) longdouble array."""
    L = xl.shape[-1]
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        if L == 0:
            nan = np.full(xl.shape[:2], np.nan, dtype=XP)
            return nan, nan.copy(), xl
        shift = xl[..., L // 2 : L // 2 + 1]
        d0 = xl - shift
        m0 = d0.mean(axis=-1, keepdims=True)
        d = d0 - m0
        var = (d * d).mean(axis=-1)
        return (shift + m0)[..., 0], var, d


def instance_norm(
    x,
    weight=None,
    bias=None,
    *,
    eps=1e-5,
    channel_axis=1,
    running_mean=None,
    running_var=None,
    use_input_stats=True,
    momentum=0.1,
    return_stats=False,
    exact=False,
    mask=None,
    lengths=None,
):
    """Reference forward pass.  ``exact=True`` returns longdouble arrays, unrounded.

    With ``mask`` / ``lengths`` (or a ``numpy.ma.MaskedArray``, whose result comes back as a
    plain array): statistics over the valid elements, invalid outputs 0, the running update
    over the instances with one (mean) or two (variance, ``n / (n - 1)``) valid elements.
    """
    x, mask = _unmask(x, mask)
    x = np.asarray(x)
    v = _valid_ncl(x.shape, mask, lengths, channel_axis)
    out_dtype = XP if exact else result_dtype(x.dtype)
    xl, axis, moved = _to_ncl(x, channel_axis)
    N, C, L = xl.shape
    w = np.ones(C, XP) if weight is None else np.asarray(weight).astype(XP)
    b = np.zeros(C, XP) if bias is None else np.asarray(bias).astype(XP)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        cnt = None
        if use_input_stats and v is not None:
            mean, var, d, cnt = _masked_moments(xl, v)
        elif use_input_stats:
            mean, var, d = _moments(xl)
        else:
            mean = np.broadcast_to(np.asarray(running_mean).astype(XP), (N, C))
            var = np.broadcast_to(np.asarray(running_var).astype(XP), (N, C))
            d = xl - mean[..., None]
        rstd = 1 / np.sqrt(var + XP(eps))
        y = d * (rstd * w)[..., None] + b[:, None]
        if v is not None:
            y = np.where(v, y, 0)
        if use_input_stats and running_mean is not None and N > 0 and cnt is not None:
            m = XP(momentum)
            for c in range(C):
                hm, hv = cnt[:, c] > 0, cnt[:, c] > 1
                if hm.any():
                    new = (1 - m) * XP(running_mean[c]) + m * mean[hm, c].mean()
                    running_mean[c] = new
                if hv.any():
                    unb = var[hv, c] * cnt[hv, c] / (cnt[hv, c] - 1)
                    running_var[c] = (1 - m) * XP(running_var[c]) + m * unb.mean()
        elif use_input_stats and running_mean is not None and N > 0:
            unbiased = var * XP(L) / XP(L - 1)
            m = XP(momentum)
            running_mean[...] = (1 - m) * running_mean.astype(XP) + m * mean.mean(axis=0)
            running_var[...] = (1 - m) * running_var.astype(XP) + m * unbiased.mean(axis=0)
        y = _from_ncl(y, axis, moved).astype(out_dtype)
    if return_stats:
        stat = XP if exact else np.float64
        return y, np.array(mean, dtype=stat), np.array(rstd, dtype=stat)
    return y


def instance_norm_backward(
    grad_output, x, weight=None, *, eps=1e-5, channel_axis=1, exact=False, mask=None, lengths=None
):
    """Reference training-mode gradients ``(grad_input, grad_weight, grad_bias)``.

    ``dx = rstd * w * (dy - mean(dy) - xhat * mean(dy * xhat))`` per instance;
    ``grad_weight = sum(dy * xhat)`` and ``grad_bias = sum(dy)`` over batch and spatial axes.
    Statistics are recomputed from ``x`` with :func:`instance_norm`'s definition.  With
    ``mask`` / ``lengths`` every mean and sum runs over the valid elements, ``dx`` is 0
    elsewhere.
    """
    x, mask = _unmask(x, mask)
    x = np.asarray(x)
    v = _valid_ncl(x.shape, mask, lengths, channel_axis)
    out_dtype = XP if exact else result_dtype(x.dtype)
    xl, axis, moved = _to_ncl(x, channel_axis)
    dy = np.moveaxis(np.ma.getdata(grad_output), axis, 1).reshape(xl.shape).astype(XP)
    N, C, L = xl.shape
    w = np.ones(C, XP) if weight is None else np.asarray(weight).astype(XP)
    if v is not None:
        return _masked_backward(dy, xl, v, w, eps, axis, moved, out_dtype, exact)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        _, var, d = _moments(xl)
        rstd = (1 / np.sqrt(var + XP(eps)))[..., None]
        xhat = d * rstd
        mdy = dy.mean(axis=-1, keepdims=True)
        mdyx = (dy * xhat).mean(axis=-1, keepdims=True)
        dx = rstd * w[:, None] * (dy - mdy - xhat * mdyx)
        gw = (dy * xhat).sum(axis=(0, 2))
        gb = dy.sum(axis=(0, 2))
    stat = XP if exact else np.float64
    dx = _from_ncl(dx, axis, moved).astype(out_dtype)
    return dx, gw.astype(stat), gb.astype(stat)


def _masked_backward(dy, xl, v, w, eps, axis, moved, out_dtype, exact):
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        _, var, d, cnt = _masked_moments(xl, v)
        rstd = (1 / np.sqrt(var + XP(eps)))[..., None]
        xhat = np.where(v, d * rstd, 0)
        dyv = np.where(v, dy, 0)
        n = cnt[..., None]
        mdy = dyv.sum(axis=-1, keepdims=True) / n
        mdyx = (dyv * xhat).sum(axis=-1, keepdims=True) / n
        dx = np.where(v, rstd * w[:, None] * (dyv - mdy - xhat * mdyx), 0)
        gw = (dyv * xhat).sum(axis=(0, 2))
        gb = dyv.sum(axis=(0, 2))
    stat = XP if exact else np.float64
    dx = _from_ncl(dx, axis, moved).astype(out_dtype)
    return dx, gw.astype(stat), gb.astype(stat)


def accuracy_scale(
    x,
    weight=None,
    bias=None,
    *,
    eps=1e-5,
    channel_axis=1,
    running_mean=None,
    running_var=None,
    use_input_stats=True,
    mask=None,
    lengths=None,
    **_ignored,
):
    """``|weight| * max(1, |xhat|) + |bias|``, exactly: the size of the terms summed into ``y``.

    The float64 accuracy guarantee is stated relative to this: ``xhat`` is accurate to a few
    epsilon relative to ``max(1, |xhat|)``, and the affine step can only scale that (by
    ``|weight|``) and add to it (``bias``); where ``xhat * weight`` and ``bias`` cancel, no
    float64 result is accurate relative to the small sum itself.  With ``mask`` / ``lengths``,
    ``xhat`` is that of the masked statistics, and 0 at invalid positions.
    """
    x, mask = _unmask(x, mask)
    x = np.asarray(x)
    v = _valid_ncl(x.shape, mask, lengths, channel_axis)
    xl, axis, moved = _to_ncl(x, channel_axis)
    N, C, L = xl.shape
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        if use_input_stats and v is not None:
            _, var, d, _ = _masked_moments(xl, v)
        elif use_input_stats:
            _, var, d = _moments(xl)
        else:
            var = np.broadcast_to(np.asarray(running_var).astype(XP), (N, C))
            d = xl - np.asarray(running_mean).astype(XP)[:, None]
        xhat = d / np.sqrt(var + XP(eps))[..., None]
        if v is not None:
            xhat = np.where(v, xhat, 0)
    w = np.ones(C, XP) if weight is None else np.abs(np.asarray(weight).astype(XP))
    b = np.zeros(C, XP) if bias is None else np.abs(np.asarray(bias).astype(XP))
    scale = w[:, None] * np.maximum(1, np.abs(xhat)) + b[:, None]
    return _from_ncl(scale, axis, moved)


def backward_accuracy_scale(
    grad_output, x, weight=None, *, eps=1e-5, channel_axis=1, mask=None, lengths=None
):
    """``|rstd * w| * (|dy| + mean(|dy|) + |xhat| * mean(|dy * xhat|))``, exactly.

    The size of the terms summed into ``dx``: the float64 backward guarantee is stated
    relative to it.  The means are of magnitudes, because the rounding of ``mean(dy)`` and
    ``mean(dy * xhat)`` grows with the magnitudes summed, not with their (possibly cancelled)
    sums, and every element of the instance carries it.  With ``mask`` / ``lengths``, over the
    valid elements.
    """
    x, mask = _unmask(x, mask)
    x = np.asarray(x)
    v = _valid_ncl(x.shape, mask, lengths, channel_axis)
    xl, axis, moved = _to_ncl(x, channel_axis)
    dyl = np.moveaxis(np.ma.getdata(grad_output), axis, 1).reshape(xl.shape).astype(XP)
    C = xl.shape[1]
    w = np.ones(C, XP) if weight is None else np.abs(np.asarray(weight).astype(XP))
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        if v is not None:
            _, var, d, cnt = _masked_moments(xl, v)
            dyl = np.where(v, dyl, 0)
        else:
            _, var, d = _moments(xl)
            cnt = XP(xl.shape[-1])
        rstd = (1 / np.sqrt(var + XP(eps)))[..., None]
        xhat = d * rstd if v is None else np.where(v, d * rstd, 0)
        n = cnt[..., None] if v is not None else cnt
        mdy = np.abs(dyl).sum(axis=-1, keepdims=True) / n
        mdyx = np.abs(dyl * xhat).sum(axis=-1, keepdims=True) / n
        scale = rstd * w[:, None] * (np.abs(dyl) + mdy + np.abs(xhat) * mdyx)
    return _from_ncl(scale, axis, moved)


def ulp_error(actual, exact, dtype=None, scale=None) -> float:
    """Largest ``|actual - exact| / max(1, |exact|, scale)`` in units of the dtype's epsilon.

    ``scale`` (broadcast against ``exact``), e.g. :func:`accuracy_scale`, names the size of
    the terms that were added to make ``exact``: where they cancel, no float64 result can be
    accurate relative to the small sum, only relative to the terms.  Positions where
    both are NaN, or both the same infinity, count as exact; a NaN or infinity on one side
    only is an infinite error.
    """
    actual = np.asarray(actual)
    dtype = np.dtype(dtype or actual.dtype)
    a = actual.astype(XP)
    e = np.asarray(exact).astype(XP)
    if a.shape != e.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {e.shape}")
    if a.size == 0:
        return 0.0
    with np.errstate(all="ignore"):
        same = (np.isnan(a) & np.isnan(e)) | (a == e)
        denom = np.maximum(1, np.abs(e))
        if scale is not None:
            denom = np.maximum(denom, np.abs(np.asarray(scale).astype(XP)))
        err = np.abs(a - e) / denom
        err = np.where(same, 0, err)
        err = np.where(np.isnan(err), np.inf, err)
    return float(err.max() / XP(np.finfo(dtype).eps))
