"""The NumPy-shaped API: layout canonicalisation, allocation and dispatch to a kernel, after the
argument checks of ``_args``.  No loops over data live here."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, overload

import numpy as np
from numpy.typing import ArrayLike

from . import _kernels as K
from . import _pool
from ._args import (
    as_input,
    channel_vector,
    check_grad_output,
    check_out,
    normalize_channel_axis,
    real_scalar,
    result_dtype,
    running_options,
    running_vector,
    spatial_size,
    stats_matrix,
)
from ._jit import dispatch, jit_disabled, num_threads, shield_compilation

__all__ = ["instance_norm", "instance_norm_backward"]

# a Ctrl-C during a kernel's first (compiling) call must not break Numba's compiler
shield_compilation(vars(K).values())

#: below this many elements a call runs the serial kernel: a parallel launch costs more
PARALLEL_MIN_ELEMENTS = 1 << 16
#: an instance shorter than this is never split across threads
SPLIT_MIN_ELEMENTS = 1 << 14
#: a split chunk holds at least this many elements (channels-first) or rows (channels-last)
CHUNK_MIN_ELEMENTS = 1 << 12
#: a channels-last split chunk holds at least this many rows
CL_CHUNK_MIN_ROWS = 64


# --------------------------------------------------------------------------------------------
# layout


@dataclass
class Layout:
    """An input viewed as the kernels want it, and the way back to the caller's shape."""

    kind: str  # "cf": (N*C, L) rows; "cl": (N, L, C) slabs
    axis: int
    N: int
    C: int
    L: int
    spatial: tuple
    data: np.ndarray  # canonical, C-contiguous, of the compute dtype
    copied: bool  # data is a private copy (x's memory is never written)

    @property
    def canonical_shape(self):
        return (self.N * self.C, self.L) if self.kind == "cf" else (self.N, self.L, self.C)

    def restore(self, y: np.ndarray) -> np.ndarray:
        """A canonical array seen in the caller's shape (a view)."""
        if self.kind == "cf":
            moved = y.reshape((self.N, self.C) + self.spatial)
        else:
            moved = y.reshape((self.N,) + self.spatial + (self.C,))
        dst = _channel_slot(self.kind, moved.ndim)
        return moved if dst == self.axis else np.moveaxis(moved, dst, self.axis)

    def view(self, a: np.ndarray):
        """``a`` (caller's shape) seen canonically without a copy, or None."""
        v = _moved(a, self.axis, self.kind)
        if not v.flags.c_contiguous:
            return None
        return v.reshape(self.canonical_shape)


def _channel_slot(kind: str, ndim: int) -> int:
    return 1 if kind == "cf" else ndim - 1


def _moved(a: np.ndarray, axis: int, kind: str) -> np.ndarray:
    """``a`` with its channel axis where ``kind`` keeps it (a no-op, not a view, if there)."""
    dst = _channel_slot(kind, a.ndim)
    return a if axis == dst else np.moveaxis(a, axis, dst)


def canonicalize(x: np.ndarray, axis: int, dtype: np.dtype) -> Layout:
    """View (or, for other strides, copy once) ``x`` as channels-first rows or channels-last
    slabs."""
    if dtype == np.float16 and jit_disabled():
        # the float16 kernels rely on machine-integer arithmetic on the bit patterns, which
        # Python's integers do not reproduce: refused, never silently wrong
        raise TypeError(
            "x has dtype float16, which NUMBA_DISABLE_JIT=1 cannot compute (the float16 kernels "
            "run as compiled code only); unset NUMBA_DISABLE_JIT or convert to float32 first"
        )
    N, C = x.shape[0], x.shape[axis]
    spatial = tuple(s for i, s in enumerate(x.shape) if i not in (0, axis))
    L = math.prod(spatial)
    same = x.dtype == dtype  # the native-order compute dtype: no conversion needed
    if same:
        for kind in ("cf", "cl"):
            v = _moved(x, axis, kind)
            if v.flags.c_contiguous:
                lay = Layout(kind, axis, N, C, L, spatial, None, False)
                lay.data = v.reshape(lay.canonical_shape)
                return lay
    kind = "cl" if axis == x.ndim - 1 else "cf"
    v = _moved(x, axis, kind)
    lay = Layout(kind, axis, N, C, L, spatial, None, True)
    lay.data = np.ascontiguousarray(v, dtype=dtype).reshape(lay.canonical_shape)
    return lay


def _kernel_view(a: np.ndarray) -> np.ndarray:
    # Numba cannot load float16: it travels as its bit pattern
    return a.view(np.uint16) if a.dtype == np.float16 else a


def _same_memory(a: np.ndarray, b: np.ndarray) -> bool:
    return (
        a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
        and a.strides == b.strides
        and a.shape == b.shape
    )


def prepare_output(lay: Layout, x: np.ndarray, out, dtype: np.dtype):
    """(canonical array the kernel writes, array returned to the caller, copy-back target).

    The kernel writes straight into ``out`` when it can be seen canonically and does not
    partly overlap the input; otherwise into a temporary copied into ``out`` afterwards, so
    a partial overlap never gives wrong values.
    """
    if out is None:  # (results from the pool: reused once no one holds them, see _pool)
        if lay.copied and lay.axis not in (1, x.ndim - 1):  # middle channel axis: C-ordered
            return np.empty(lay.canonical_shape, dtype), None, _pool.empty(x.shape, dtype)
        y = _pool.empty(lay.canonical_shape, dtype)
        return y, lay.restore(y), None
    ov = lay.view(out)
    if ov is not None:
        if lay.copied or not np.may_share_memory(out, x) or _same_memory(ov, lay.data):
            return ov, out, None
    return np.empty(lay.canonical_shape, dtype), None, out


# --------------------------------------------------------------------------------------------
# dispatch


def plan(groups: int, length: int, total: int):
    """(parallel, nchunks): nchunks == 0 means one fused task per group."""
    threads = num_threads()  # the caller's numba.set_num_threads(k), never changed here
    if threads < 2 or total < PARALLEL_MIN_ELEMENTS:
        return False, 0
    balanced = groups % threads == 0 and groups >= 2 * threads
    if groups >= 4 * threads or length < SPLIT_MIN_ELEMENTS or balanced:
        return True, 0
    want = threads * max(1, -(-4 // groups))
    return True, max(1, min(want, length // CHUNK_MIN_ELEMENTS))


def layout_plan(lay: Layout):
    """``plan`` for a layout: groups are rows (channels-first) or slabs (channels-last), and a
    slab is split into chunks of at least CL_CHUNK_MIN_ROWS rows."""
    total = lay.N * lay.C * lay.L
    if lay.kind == "cf":
        return plan(lay.N * lay.C, lay.L, total)
    parallel, nch = plan(lay.N, lay.L * lay.C, total)
    return parallel, (min(nch, max(1, lay.L // CL_CHUNK_MIN_ROWS)) if nch else 0)


def moments(lay: Layout, y: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float):
    """Normalize ``lay.data`` into ``y`` with input statistics; return (mean, var), (N, C)."""
    N, C, L = lay.N, lay.C, lay.L
    xk, yk = _kernel_view(lay.data), _kernel_view(y)
    mean = np.empty((N, C))
    var = np.empty((N, C))
    parallel, nch = layout_plan(lay)
    if nch <= 1:
        if lay.kind == "cf":
            fused = K.cf_short if L <= K.SHORT_ROW else K.cf_fused
            dispatch(fused, parallel, xk, yk, w, b, C, eps, mean.reshape(-1), var.reshape(-1))
        else:
            dispatch(K.cl_fused, parallel, xk, yk, w, b, eps, mean, var)
        return mean, var
    G, Cp = (N * C, 1) if lay.kind == "cf" else (N, C)
    shift = np.empty((G, Cp) if lay.kind == "cl" else (G,))
    pn = np.empty((G, nch))
    pmean = np.empty((G, nch, Cp))
    pm2 = np.empty((G, nch, Cp))
    partial = K.cf_partial if lay.kind == "cf" else K.cl_partial
    dispatch(partial, parallel, xk, nch, shift, pn, pmean, pm2)
    cm = np.empty((G, Cp))
    m2 = np.empty((G, Cp))
    K.merge_partials(pn, pmean, pm2, cm, m2)
    v = m2 / L
    rstd = 1.0 / np.sqrt(v + eps)
    if lay.kind == "cf":
        cm, v, rstd = cm[:, 0], v[:, 0], rstd[:, 0]
        a = rstd * np.tile(w, N)
        dispatch(K.cf_apply, parallel, xk, yk, nch, shift, cm, a, np.tile(b, N))
    else:
        a = rstd * w
        dispatch(K.cl_apply, parallel, xk, yk, nch, shift, cm, a, np.broadcast_to(b, (N, C)).copy())
    mean[...] = (shift + cm).reshape(N, C)
    var[...] = v.reshape(N, C)
    return mean, var


def apply_affine(lay: Layout, y: np.ndarray, shift, a, b):
    """``y = (x - shift) * a + b`` with per-(n, c) arrays of shape (N, C)."""
    N, C = lay.N, lay.C
    xk, yk = _kernel_view(lay.data), _kernel_view(y)
    zeros = np.zeros((N, C))
    parallel, nch = layout_plan(lay)
    nch = max(nch, 1)
    if lay.kind == "cf":
        rows = (np.ascontiguousarray(t, dtype=np.float64).reshape(-1) for t in (shift, zeros, a, b))
        dispatch(K.cf_apply, parallel, xk, yk, nch, *rows)
    else:
        slabs = (np.ascontiguousarray(t, dtype=np.float64) for t in (shift, zeros, a, b))
        dispatch(K.cl_apply, parallel, xk, yk, nch, *slabs)


# --------------------------------------------------------------------------------------------
# the public function


def _is_dask(*arrays) -> bool:
    """Dask arrays go to ``instnorm_numba.dask`` (told apart without importing Dask)."""
    return any(
        type(a).__module__.startswith("dask.") and hasattr(a, "__dask_graph__") for a in arrays
    )


def _no_dask_mask(mask, lengths) -> None:
    if mask is not None or lengths is not None:
        given = "mask" if mask is not None else "lengths"
        raise TypeError(
            f"{given}= is not supported with a Dask array x yet; compute x, or mask it "
            "chunk-wise with dask.array.map_blocks"
        )


@overload
def instance_norm(
    x: ArrayLike,
    weight: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    *,
    eps: float = 1e-5,
    channel_axis: int = 1,
    running_mean: np.ndarray | None = None,
    running_var: np.ndarray | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    out: np.ndarray | None = None,
    return_stats: Literal[False] = False,
    mask: ArrayLike | None = None,
    lengths: ArrayLike | None = None,
) -> np.ndarray: ...


@overload
def instance_norm(
    x: ArrayLike,
    weight: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    *,
    eps: float = 1e-5,
    channel_axis: int = 1,
    running_mean: np.ndarray | None = None,
    running_var: np.ndarray | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    out: np.ndarray | None = None,
    return_stats: Literal[True],
    mask: ArrayLike | None = None,
    lengths: ArrayLike | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...


@overload
def instance_norm(
    x: ArrayLike,
    weight: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    *,
    eps: float = 1e-5,
    channel_axis: int = 1,
    running_mean: np.ndarray | None = None,
    running_var: np.ndarray | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    out: np.ndarray | None = None,
    return_stats: bool = False,
    mask: ArrayLike | None = None,
    lengths: ArrayLike | None = None,
) -> np.ndarray | tuple[np.ndarray, np.ndarray, np.ndarray]: ...


def instance_norm(
    x: ArrayLike,
    weight: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    *,
    eps: float = 1e-5,
    channel_axis: int = 1,
    running_mean: np.ndarray | None = None,
    running_var: np.ndarray | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    out: np.ndarray | None = None,
    return_stats: bool = False,
    mask: ArrayLike | None = None,
    lengths: ArrayLike | None = None,
) -> np.ndarray | tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Instance normalization: normalize every ``(n, c)`` slice over its spatial elements.

    ``y = (x - mean) / sqrt(var + eps) * weight[c] + bias[c]``, where ``mean`` and the biased
    ``var`` are taken over all spatial elements of one sample ``n`` and one channel ``c``
    (never pooled over the batch), accumulated in float64.

    Parameters
    ----------
    x : array_like, ndim >= 3
        Axis 0 is the batch; ``channel_axis`` is the channel axis; every other axis is spatial.
        float16, float32 and float64 keep their dtype; integers and bools give float64, as
        ``np.mean`` does. Other dtypes raise ``TypeError``. A Dask array gives a lazy Dask
        array (see ``instnorm_numba.dask``).
    weight, bias : array_like of shape (C,), optional
        Per-channel scale and offset (default 1 and 0).
    eps : float, default 1e-5
        Added to the variance; finite and >= 0.
    channel_axis : int, default 1
        1 for ``(N, C, *spatial)``, -1 for channels-last ``(N, *spatial, C)``; any other axis
        but 0 works through a copy.
    running_mean, running_var : ndarray of shape (C,), optional
        Given together or not at all, as in ``torch.nn.functional.instance_norm``. With
        ``use_input_stats=True`` they are updated in place with
        ``r = (1 - momentum) * r + momentum * s``, ``s`` being the per-instance mean, or the
        per-instance *unbiased* variance, averaged over the batch.
    use_input_stats : bool, default True
        False normalizes with ``running_mean`` / ``running_var`` and updates nothing.
    momentum : float, default 0.1
        Weight of the new statistics in the running update.
    out : ndarray, optional
        Receives the result: shape of ``x``, the result dtype, writeable. ``out=x`` normalizes
        in place.
    return_stats : bool, default False
        Also return ``mean`` and ``rstd = 1 / sqrt(var + eps)``, float64 of shape (N, C).
    mask : array_like of bool, optional
        The valid elements (True): shape ``(N, *spatial)``, or ``(N, 1, *spatial)`` /
        ``(N, C, *spatial)`` in ``x``'s layout (one mask per channel), or anything else
        broadcastable to ``x`` without enlarging its channel axis.  Statistics come from the
        valid elements only; invalid positions of the result hold 0.  An instance with no
        valid element gets NaN statistics, zeros, and stays out of the running statistics
        (whose variance uses each instance's own count, ``n / (n - 1)``).  A
        ``numpy.ma.MaskedArray`` ``x`` is normalized with its own mask and gives one back.
    lengths : array_like of int, shape (N,), optional
        For ``x`` with one spatial axis: the first ``lengths[n]`` positions of sample ``n``
        are valid (``0 <= lengths[n] <= L``), the rest is padding.  Faster than the same
        ``mask``.  At most one of ``mask`` and ``lengths``.

    Returns
    -------
    y : ndarray
        or ``(y, mean, rstd)`` with ``return_stats=True``.

    Examples
    --------
    >>> import numpy as np
    >>> from instnorm_numba import instance_norm
    >>> x = np.array([[[1.0, 2.0, 3.0, 4.0]], [[10.0, 10.0, 20.0, 20.0]]])  # N=2, C=1, L=4
    >>> instance_norm(x, eps=0.0)
    array([[[-1.34164079, -0.4472136 ,  0.4472136 ,  1.34164079]],
    <BLANKLINE>
           [[-1.        , -1.        ,  1.        ,  1.        ]]])
    >>> y, mean, rstd = instance_norm(x, eps=0.0, return_stats=True)
    >>> mean
    array([[ 2.5],
           [15. ]])
    """
    if _is_dask(x):  # a Dask array in, a lazy Dask array out (``instnorm_numba.dask``)
        from . import dask as _dask

        _no_dask_mask(mask, lengths)

        return _dask.instance_norm(
            x, weight, bias, eps=eps, channel_axis=channel_axis, running_mean=running_mean,
            running_var=running_var, use_input_stats=use_input_stats, momentum=momentum,
            out=out, return_stats=return_stats,
        )  # fmt: skip
    ma_mask = None
    if isinstance(x, np.ma.MaskedArray):  # its mask names the invalid elements
        x, ma_mask = np.ma.getdata(x), np.ma.getmaskarray(x)
    x = as_input(x)
    axis = normalize_channel_axis(channel_axis, x.ndim)
    dtype = result_dtype(x.dtype)
    C = x.shape[axis]
    w = channel_vector(weight, "weight", C, 1.0)
    b = channel_vector(bias, "bias", C, 0.0)
    eps = real_scalar(eps, "eps", minimum=0.0)
    momentum = real_scalar(momentum, "momentum")
    has_running, update = running_options(use_input_stats, return_stats, running_mean, running_var)
    if has_running:
        running_mean = running_vector(running_mean, "running_mean", C, update=update)
        running_var = running_vector(running_var, "running_var", C, update=update)
    if out is not None:
        check_out(out, x.shape, dtype)
    N = x.shape[0]
    spatial = spatial_size(x.shape, axis, update)

    if mask is not None or lengths is not None or ma_mask is not None:
        from . import _masked  # (imports this module)

        valid = _masked.resolve(mask, lengths, ma_mask, x.shape, axis, spatial)
        return _masked.forward(
            x, axis, dtype, w, b, eps, running_mean, running_var, use_input_stats, update,
            momentum, out, return_stats, valid,
        )  # fmt: skip

    lay = canonicalize(x, axis, dtype)
    y, result, target = prepare_output(lay, x, out, dtype)

    # NaN/Inf in the data or a zero variance with eps=0 are answers (NaN, as in PyTorch), not
    # warnings: the arithmetic on the small statistics arrays runs quietly.
    with np.errstate(all="ignore"):
        if use_input_stats:
            if y.size:
                mean, var = moments(lay, y, w, b, eps)
            else:  # no element to normalize: an instance with no elements has no statistics
                mean, var = np.full((N, C), np.nan), np.full((N, C), np.nan)
            if return_stats:  # (N*C can be large: 256x256 tiny instances cost 0.1 ms here)
                rstd = 1.0 / np.sqrt(var + eps)
        else:
            rm = np.asarray(running_mean, dtype=np.float64)
            rv = np.asarray(running_var, dtype=np.float64)
            rstd = np.broadcast_to(1.0 / np.sqrt(rv + eps), (N, C))
            mean = np.broadcast_to(rm, (N, C))
            if y.size:
                apply_affine(lay, y, mean, rstd * w, np.broadcast_to(b, (N, C)))
            mean, rstd = mean.copy(), rstd.copy()

        if target is not None:
            np.copyto(target, lay.restore(y))
            result = target
        if update and N > 0:
            unbiased = var * (spatial / (spatial - 1))
            running_mean[...] = (1.0 - momentum) * running_mean + momentum * mean.mean(axis=0)
            running_var[...] = (1.0 - momentum) * running_var + momentum * unbiased.mean(axis=0)
    if return_stats:
        return result, mean, rstd
    return result


# --------------------------------------------------------------------------------------------
# backward


def as_layout(lay: Layout, a: np.ndarray, dtype: np.dtype):
    """``a`` (x's shape) in ``lay``'s canonical form: (array, copied). A view when possible."""
    if a.dtype == dtype:
        v = lay.view(a)
        if v is not None:
            return v, False
    v = _moved(a, lay.axis, lay.kind)
    return np.ascontiguousarray(v, dtype=dtype).reshape(lay.canonical_shape), True


def backward_sweeps(lay: Layout, gk: np.ndarray, dx: np.ndarray, mean, rstd, w):
    """Both sweeps into ``dx``; return per-instance sum(dy) and sum(dy * xhat), (N, C)."""
    N, C, L = lay.N, lay.C, lay.L
    xk, gk, dk = _kernel_view(lay.data), _kernel_view(gk), _kernel_view(dx)
    sdy = np.empty((N, C))
    sdyx = np.empty((N, C))
    parallel, nch = layout_plan(lay)
    if nch <= 1:
        if lay.kind == "cf":
            rows = (mean.reshape(-1), rstd.reshape(-1), w, C, sdy.reshape(-1), sdyx.reshape(-1))
            dispatch(K.cf_bwd_fused, parallel, xk, gk, dk, *rows)
        else:
            dispatch(K.cl_bwd_fused, parallel, xk, gk, dk, mean, rstd, w, sdy, sdyx)
        return sdy, sdyx
    # few long instances: chunk sums on every thread, added per instance, then the second sweep
    G, Cp = (N * C, 1) if lay.kind == "cf" else (N, C)
    ps0, ps1, ps2 = (np.empty((G, nch, Cp)) for _ in range(3))
    m = mean.reshape(G, Cp)
    partial = K.cf_bwd_partial if lay.kind == "cf" else K.cl_bwd_partial
    mk = m.reshape(-1) if lay.kind == "cf" else m
    dispatch(partial, parallel, xk, gk, mk, nch, ps0, ps1, ps2)
    wg = np.ascontiguousarray(np.broadcast_to(w, (N, C))).reshape(G, Cp)
    xbar, a, mdy, k = (np.empty((G, Cp)) for _ in range(4))
    sums = (sdy.reshape(G, Cp), sdyx.reshape(G, Cp))
    K.bwd_finish(L, ps0, ps1, ps2, rstd.reshape(G, Cp), wg, xbar, a, mdy, k, *sums)
    coeffs = (m, xbar, a, mdy, k)
    if lay.kind == "cf":
        coeffs = tuple(t.reshape(-1) for t in coeffs)
        dispatch(K.cf_bwd_apply, parallel, xk, gk, dk, nch, *coeffs)
    else:
        dispatch(K.cl_bwd_apply, parallel, xk, gk, dk, nch, *coeffs)
    return sdy, sdyx


def instance_norm_backward(
    grad_output: ArrayLike,
    x: ArrayLike,
    mean: ArrayLike,
    rstd: ArrayLike,
    weight: ArrayLike | None = None,
    *,
    channel_axis: int = 1,
    out: np.ndarray | None = None,
    mask: ArrayLike | None = None,
    lengths: ArrayLike | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of :func:`instance_norm` (statistics from the input, i.e. training mode).

    With ``xhat = (x - mean) * rstd`` and both means taken per instance ``(n, c)`` over its
    spatial elements::

        grad_input  = rstd * weight[c] * (dy - mean(dy) - xhat * mean(dy * xhat))
        grad_weight = sum(dy * xhat)    over the batch and spatial axes
        grad_bias   = sum(dy)           over the batch and spatial axes

    Sums are accumulated in float64 and ``x - mean`` is formed in float64 (then centred with
    its own mean, which undoes the rounding of ``mean`` to float64), so the result is as
    accurate as the forward's.  This is the gradient of the training-mode forward only
    (``use_input_stats=True``); with running statistics the forward is affine in ``x`` and
    its gradient is simply ``dy * rstd * weight[c]``.

    Parameters
    ----------
    grad_output : array_like
        ``dy``, the gradient of the loss with respect to ``instance_norm``'s result: ``x``'s
        shape and the forward's result dtype (byte order aside).
    x : array_like, ndim >= 3
        The forward's input, as for :func:`instance_norm` (same dtypes, layouts, strides).
        With ``x`` or ``grad_output`` a Dask array, every result is a lazy Dask array
        (see ``instnorm_numba.dask``).
    mean, rstd : array_like of shape (N, C)
        Exactly what ``instance_norm(x, ..., return_stats=True)`` returned (float64).
    weight : array_like of shape (C,), optional
        The forward's ``weight`` (default 1). ``bias`` plays no part in the gradients.
    channel_axis : int, default 1
        As in :func:`instance_norm`.
    out : ndarray, optional
        Receives ``grad_input``: shape of ``x``, the result dtype, writeable.
        ``out=grad_output`` works in place.
    mask, lengths : optional
        The forward's valid set (see :func:`instance_norm`; a ``numpy.ma.MaskedArray`` ``x``
        brings its own): the gradients of the masked forward.  Invalid positions of
        ``grad_input`` are 0 and ``grad_weight`` / ``grad_bias`` sum the valid elements only.

    Returns
    -------
    grad_input : ndarray
        ``x``'s shape, the forward's result dtype (float16/32/64 kept; integers and bools
        give float64).
    grad_weight, grad_bias : ndarray
        float64 of shape (C,), what ``weight`` and ``bias`` would receive, even when the
        forward ran without them.

    Examples
    --------
    >>> import numpy as np
    >>> from instnorm_numba import instance_norm, instance_norm_backward
    >>> x = np.array([[[1.0, 2.0, 3.0, 4.0]], [[10.0, 10.0, 20.0, 20.0]]])  # N=2, C=1, L=4
    >>> y, mean, rstd = instance_norm(x, eps=0.0, return_stats=True)
    >>> dy = np.array([[[1.0, 0.0, 0.0, 0.0]], [[1.0, 1.0, 1.0, 1.0]]])
    >>> dx, dw, db = instance_norm_backward(dy, x, mean, rstd)
    >>> dx.round(4)
    array([[[ 0.2683, -0.3578, -0.0894,  0.1789]],
    <BLANKLINE>
           [[ 0.    ,  0.    ,  0.    ,  0.    ]]])
    >>> dw, db  # sum(dy * xhat), sum(dy)
    (array([-1.34164079]), array([5.]))
    """
    if _is_dask(grad_output, x):  # Dask arrays in, lazy Dask arrays out
        from . import dask as _dask

        _no_dask_mask(mask, lengths)

        return _dask.instance_norm_backward(
            grad_output, x, mean, rstd, weight, channel_axis=channel_axis, out=out
        )
    ma_mask = None
    if isinstance(x, np.ma.MaskedArray):  # its mask names the invalid elements
        x, ma_mask = np.ma.getdata(x), np.ma.getmaskarray(x)
    if isinstance(grad_output, np.ma.MaskedArray):
        grad_output = np.ma.getdata(grad_output)
    x = as_input(x)
    axis = normalize_channel_axis(channel_axis, x.ndim)
    dtype = result_dtype(x.dtype)
    N, C = x.shape[0], x.shape[axis]
    g = as_input(grad_output, "grad_output")
    check_grad_output(g, x)
    mean = stats_matrix(mean, "mean", N, C)
    rstd = stats_matrix(rstd, "rstd", N, C)
    w = channel_vector(weight, "weight", C, 1.0)
    if out is not None:
        check_out(out, x.shape, dtype)

    if mask is not None or lengths is not None or ma_mask is not None:
        from . import _masked  # (imports this module)

        L = math.prod(s for i, s in enumerate(x.shape) if i not in (0, axis))
        valid = _masked.resolve(mask, lengths, ma_mask, x.shape, axis, L)
        return _masked.backward(g, x, mean, rstd, w, axis, dtype, out, valid)

    lay = canonicalize(x, axis, dtype)
    gk, g_copied = as_layout(lay, g, dtype)
    dx, result, target = prepare_output(lay, x, out, dtype)
    if out is not None and target is None and not g_copied and np.may_share_memory(out, g):
        if not _same_memory(dx, gk):  # out partly overlaps grad_output: go through a temporary
            dx, result, target = np.empty(lay.canonical_shape, dtype), None, out

    if dx.size:
        sdy, sdyx = backward_sweeps(lay, gk, dx, mean, rstd, w)
        grad_weight, grad_bias = sdyx.sum(axis=0), sdy.sum(axis=0)
    else:  # nothing to sum: the gradients of weight and bias are zero
        grad_weight, grad_bias = np.zeros(C), np.zeros(C)
    if target is not None:
        np.copyto(target, lay.restore(dx))
        result = target
    return result, grad_weight, grad_bias
