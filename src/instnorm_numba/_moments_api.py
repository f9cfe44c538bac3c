"""Building blocks for inputs held in parts: per-instance moments of an array (or of one part
of it), their exact merge, and normalization with given per-instance statistics.

Useful without Dask (a volume read slab by slab, statistics gathered over several files),
and what ``instnorm_numba.dask`` is built on.  The statistics are carried as
:class:`Moments`: a count, a shift ``K`` per instance, the mean of ``x - K`` and the centred
sum of squares ``M2``.  Keeping the shift apart from the small residual mean is what keeps
data far from zero exact (``1e4 + noise`` in float64): a mean folded into one float64 number
has already lost the digits that the normalization needs.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import _kernels as K
from ._api import (
    _kernel_view,
    canonicalize,
    layout_plan,
    prepare_output,
)
from ._args import (
    _fmt_shape,
    as_array,
    as_input,
    channel_vector,
    check_out,
    normalize_channel_axis,
    real_scalar,
    result_dtype,
    stats_matrix,
)
from ._jit import dispatch

__all__ = [
    "Moments",
    "instance_moments",
    "merge_moments",
    "moments_to_stats",
    "normalize_with_stats",
]


class Moments(NamedTuple):
    """Per-instance moments of (a part of) an input, each field of shape ``(N, C)``.

    Attributes
    ----------
    count : ndarray of int64
        Number of elements of each instance seen.
    shift : ndarray of float64
        The shift ``K`` the moments are taken around (one per instance).
    mean_offset : ndarray of float64
        Mean of ``x - K``: the instance's mean is ``shift + mean_offset``.
    m2 : ndarray of float64
        Centred sum of squares ``sum((x - mean)**2)``: the biased variance is ``m2 / count``.
    """

    count: np.ndarray
    shift: np.ndarray
    mean_offset: np.ndarray
    m2: np.ndarray


# --------------------------------------------------------------------------------------------
# layout-level helpers (also the per-chunk work of ``instnorm_numba.dask``)


def _per_instance(a: np.ndarray, kind: str) -> np.ndarray:
    """An (N, C) float64 array as the kernels of layout ``kind`` take it."""
    a = np.ascontiguousarray(a, dtype=np.float64)
    return a.reshape(-1) if kind == "cf" else a


def layout_shift(lay, parallel: bool) -> np.ndarray:
    """The shift of every instance of a canonical layout, (N, C): the in-memory kernels'."""
    N, C = lay.N, lay.C
    xk = _kernel_view(lay.data)
    shift = np.empty((N, C))
    if lay.kind == "cf":
        dispatch(K.cf_chunk_shift, parallel, xk, shift.reshape(-1))
    else:
        dispatch(K.cl_chunk_shift, parallel, xk, shift)
    return shift


def layout_moments(lay, shift: np.ndarray, parallel: bool):
    """(mean of x - shift, M2), each (N, C), of a canonical layout around ``shift`` (N, C)."""
    N, C = lay.N, lay.C
    xk = _kernel_view(lay.data)
    mean = np.empty((N, C))
    m2 = np.empty((N, C))
    sk = _per_instance(shift, lay.kind)
    if lay.kind == "cf":
        dispatch(K.cf_chunk_moments, parallel, xk, sk, mean.reshape(-1), m2.reshape(-1))
    else:
        dispatch(K.cl_chunk_moments, parallel, xk, sk, mean, m2)
    return mean, m2


def layout_apply(lay, y: np.ndarray, shift, c, a, b, parallel: bool, nchunks: int = 1):
    """``y = ((x - shift) - c) * a + b`` with per-instance (N, C) arrays, into canonical ``y``."""
    xk, yk = _kernel_view(lay.data), _kernel_view(y)
    args = tuple(
        _per_instance(np.broadcast_to(t, (lay.N, lay.C)), lay.kind) for t in (shift, c, a, b)
    )
    apply = K.cf_apply if lay.kind == "cf" else K.cl_apply
    dispatch(apply, parallel, xk, yk, max(1, nchunks), *args)


def merge_parts(pn, pmean, pm2):
    """Parts ``(G, k)`` around one shift per row -> (count, mean_offset, m2), each (G,)."""
    G = pn.shape[0]
    n, mean, m2 = np.empty(G), np.empty(G), np.empty(G)
    K.merge_chunks(
        np.ascontiguousarray(pn, dtype=np.float64),
        np.ascontiguousarray(pmean, dtype=np.float64),
        np.ascontiguousarray(pm2, dtype=np.float64),
        n,
        mean,
        m2,
    )
    return n, mean, m2


def finish_stats(count, shift, mean_offset, m2, eps: float):
    """(mean, rstd, var) from moments; NaN for instances without elements."""
    with np.errstate(all="ignore"):
        count = np.asarray(count, dtype=np.float64)
        empty = count == 0
        mean = np.where(empty, np.nan, np.asarray(shift) + np.asarray(mean_offset))
        var = np.where(empty, np.nan, np.asarray(m2) / count)
        rstd = 1.0 / np.sqrt(var + eps)
    return mean, rstd, var


# --------------------------------------------------------------------------------------------
# the public functions


def _instance_matrix(v, name: str, N: int, C: int) -> np.ndarray:
    arr = as_array(v, name)
    if arr.dtype.kind not in "fiu" or (arr.dtype.kind == "f" and arr.dtype.itemsize > 8):
        raise TypeError(f"{name} must have a real floating or integer dtype; got {arr.dtype}")
    if arr.shape != (N, C):
        raise ValueError(
            f"{name} must have shape ({N}, {C}) to match N={N} samples and C={C} channels of "
            f"x; got shape {_fmt_shape(arr.shape)}"
        )
    out = np.array(arr, dtype=np.float64, order="C", copy=True)
    if not np.isfinite(out).all():
        raise ValueError(f"{name} must be finite; got {out[~np.isfinite(out)][0]!r}")
    return out


def instance_moments(x, *, channel_axis=1, shift=None) -> Moments:
    """Per-instance moments of ``x``, or of one part of a larger input.

    The moments of every instance ``(n, c)`` over its spatial elements, accumulated in float64
    around a shift ``K`` exactly as :func:`instance_norm` does.  Moments of disjoint parts
    of the same instances (slabs of a volume, chunks of an array) combine exactly with
    :func:`merge_moments`; pass the same ``shift`` to every part (for example
    ``instance_moments(first_part).shift``) so that the merge never re-bases.

    Parameters
    ----------
    x : array_like, ndim >= 3
        As for :func:`instance_norm`: axis 0 the batch, ``channel_axis`` the channels, every
        other axis spatial.  float16/32/64, integers and bools.
    channel_axis : int, default 1
        As in :func:`instance_norm`.
    shift : array_like of shape (N, C), optional
        The shift to take the moments around (finite).  By default one of each instance's own
        values (or, for long float32/float16 instances, the mean of its first elements).

    Returns
    -------
    Moments
        ``(count, shift, mean_offset, m2)``, each of shape ``(N, C)``.

    Examples
    --------
    >>> import numpy as np
    >>> from instnorm_numba import instance_moments, merge_moments, moments_to_stats
    >>> x = 1e4 + np.arange(24.0).reshape(1, 2, 12)     # N=1, C=2, 12 elements each
    >>> whole = instance_moments(x)
    >>> first = instance_moments(x[..., :5])
    >>> rest = instance_moments(x[..., 5:], shift=first.shift)
    >>> merged = merge_moments(first, rest)
    >>> merged.count
    array([[12, 12]])
    >>> mean, rstd = moments_to_stats(merged, eps=0.0)
    >>> mean
    array([[10005.5, 10017.5]])
    >>> bool(np.allclose(rstd, 1 / x.std(axis=-1), rtol=1e-15))
    True
    """
    x = as_input(x)
    axis = normalize_channel_axis(channel_axis, x.ndim)
    dtype = result_dtype(x.dtype)
    N, C = x.shape[0], x.shape[axis]
    if shift is not None:
        shift = _instance_matrix(shift, "shift", N, C)
    lay = canonicalize(x, axis, dtype)
    parallel = layout_plan(lay)[0]
    if shift is None:
        shift = layout_shift(lay, parallel)
    mean, m2 = layout_moments(lay, shift, parallel)
    count = np.full((N, C), lay.L, dtype=np.int64)
    return Moments(count, shift, mean, m2)


def _check_moments(m, name: str) -> Moments:
    if not isinstance(m, Moments):
        raise TypeError(f"{name} must be a Moments (from instance_moments); got {type(m).__name__}")
    return m


def merge_moments(*parts: Moments) -> Moments:
    """The moments of the union of disjoint parts of the same instances, exactly.

    The residual means are combined with a compensated sum and the sums of squares with
    ``M2 = sum(M2_j + n_j * (m_j - m)**2)`` (Chan et al.), so merging costs about one
    rounding however many parts there are.  Parts taken around different shifts are
    re-based onto the first part's (exact when the shifts are within a factor of two of each
    other); pass one ``shift`` to :func:`instance_moments` for every part to avoid it.

    Parameters
    ----------
    *parts : Moments
        One or more results of :func:`instance_moments` (or of this function), all of the
        same ``(N, C)``.

    Returns
    -------
    Moments
        Around the first part's shift.

    Examples
    --------
    >>> import numpy as np
    >>> from instnorm_numba import instance_moments, merge_moments
    >>> x = np.array([[[1.0, 2.0, 3.0, 4.0, 10.0]]])
    >>> a = instance_moments(x[..., :2])
    >>> b = instance_moments(x[..., 2:], shift=a.shift)
    >>> m = merge_moments(a, b)
    >>> m.count, m.shift + m.mean_offset, m.m2 / m.count
    (array([[5]]), array([[4.]]), array([[10.]]))
    """
    if not parts:
        raise TypeError("merge_moments needs at least one Moments")
    parts = [_check_moments(p, f"parts[{i}]") for i, p in enumerate(parts)]
    shape = np.shape(parts[0].count)
    for i, p in enumerate(parts):
        for field in p:
            if np.shape(field) != shape:
                raise ValueError(
                    f"parts[{i}] has fields of shape {_fmt_shape(np.shape(field))}; parts[0] "
                    f"has {_fmt_shape(shape)}: merge moments of the same instances only"
                )
    K0 = np.asarray(parts[0].shift, dtype=np.float64)
    with np.errstate(all="ignore"):
        pmean = np.stack(
            [
                np.asarray(p.mean_offset, dtype=np.float64)
                + (np.asarray(p.shift, dtype=np.float64) - K0)
                if i and not np.array_equal(p.shift, K0)
                else np.asarray(p.mean_offset, dtype=np.float64)
                for i, p in enumerate(parts)
            ],
            axis=-1,
        )
    pn = np.stack([np.asarray(p.count, dtype=np.float64) for p in parts], axis=-1)
    pm2 = np.stack([np.asarray(p.m2, dtype=np.float64) for p in parts], axis=-1)
    k = len(parts)
    n, mean, m2 = merge_parts(pn.reshape(-1, k), pmean.reshape(-1, k), pm2.reshape(-1, k))
    return Moments(
        n.reshape(shape).astype(np.int64), K0.copy(), mean.reshape(shape), m2.reshape(shape)
    )


def moments_to_stats(m: Moments, eps=1e-5):
    """``(mean, rstd)`` from moments, as ``instance_norm(..., return_stats=True)`` gives them.

    ``mean = shift + mean_offset`` and ``rstd = 1 / sqrt(m2 / count + eps)``, float64 of shape
    ``(N, C)``; NaN for an instance with no elements.  To normalize exactly, give the shift and
    the residual mean to :func:`normalize_with_stats` rather than ``mean``.

    Examples
    --------
    >>> import numpy as np
    >>> from instnorm_numba import instance_moments, moments_to_stats
    >>> mean, rstd = moments_to_stats(instance_moments(np.array([[[1.0, 3.0]]])), eps=0.0)
    >>> mean, rstd
    (array([[2.]]), array([[1.]]))
    """
    _check_moments(m, "m")
    eps = real_scalar(eps, "eps", minimum=0.0)
    mean, rstd, _ = finish_stats(m.count, m.shift, m.mean_offset, m.m2, eps)
    return mean, rstd


def normalize_with_stats(
    x, mean, rstd, weight=None, bias=None, *, shift=None, channel_axis=1, out=None
):
    """Normalize with given per-instance statistics: ``((x - shift) - mean) * rstd * w + b``.

    The second half of :func:`instance_norm`, for statistics gathered elsewhere (over the
    parts of an input with :func:`merge_moments`, or kept from an earlier pass).  Rounded
    once to the result dtype, as :func:`instance_norm` rounds.

    Parameters
    ----------
    x : array_like, ndim >= 3
        As for :func:`instance_norm` (same dtypes, layouts and ``channel_axis``).
    mean, rstd : array_like of shape (N, C)
        The per-instance mean (with ``shift``: the mean of ``x - shift``, i.e.
        ``Moments.mean_offset``) and ``1 / sqrt(var + eps)``.
    weight, bias : array_like of shape (C,), optional
        Per-channel scale and offset (default 1 and 0).
    shift : array_like of shape (N, C), optional
        ``Moments.shift``: subtracted first, in float64, exactly for data near it.  Keeps
        float64 results within the library's accuracy for data far from zero, where a mean
        rounded to float64 alone would not.
    channel_axis : int, default 1
        As in :func:`instance_norm`.
    out : ndarray, optional
        Receives the result, as in :func:`instance_norm` (``out=x`` works in place).

    Returns
    -------
    y : ndarray
        ``x``'s shape, the result dtype (float16/32/64 kept; integers and bools give float64).

    Examples
    --------
    >>> import numpy as np
    >>> from instnorm_numba import instance_moments, normalize_with_stats
    >>> x = np.array([[[1.0, 2.0, 3.0, 4.0]]])
    >>> m = instance_moments(x)
    >>> rstd = 1 / np.sqrt(m.m2 / m.count)
    >>> normalize_with_stats(x, m.mean_offset, rstd, shift=m.shift)
    array([[[-1.34164079, -0.4472136 ,  0.4472136 ,  1.34164079]]])
    """
    x = as_input(x)
    axis = normalize_channel_axis(channel_axis, x.ndim)
    dtype = result_dtype(x.dtype)
    N, C = x.shape[0], x.shape[axis]
    mean = stats_matrix(mean, "mean", N, C)
    rstd = stats_matrix(rstd, "rstd", N, C)
    shift = np.zeros((N, C)) if shift is None else _instance_matrix(shift, "shift", N, C)
    w = channel_vector(weight, "weight", C, 1.0)
    b = channel_vector(bias, "bias", C, 0.0)
    if out is not None:
        check_out(out, x.shape, dtype)
    lay = canonicalize(x, axis, dtype)
    y, result, target = prepare_output(lay, x, out, dtype)
    if y.size:
        parallel, nch = layout_plan(lay)
        with np.errstate(all="ignore"):
            a = rstd * w
        layout_apply(lay, y, shift, mean, a, np.broadcast_to(b, (N, C)), parallel, nch)
    if target is not None:
        np.copyto(target, lay.restore(y))
        result = target
    return result
