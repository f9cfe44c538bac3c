"""The tasks of the Dask graphs (:mod:`instnorm_numba.dask`): what runs on one chunk.

Module-level functions on NumPy blocks, so that they travel to distributed workers by pickle;
no Dask import.  ``Geometry`` says which axes index instances and how a block is seen as the
in-memory kernels want it.  The fields of a part's moments are ``(count, mean of x - shift,
M2)`` (``_COUNT, _MEAN, _M2``) in the last axis; the finished statistics are ``(mean, rstd,
mean of x - shift, var)`` (``_ST_*``).

Kernels run serially inside each task (``TASK_THREADS``): Dask supplies the parallelism.
"""

from __future__ import annotations

import contextlib
import math
import string
from dataclasses import dataclass

import numpy as np

from . import _api, _args
from . import _kernels as K
from . import _moments_api as M
from ._jit import dispatch, num_threads

#: Numba threads inside one Dask task (Dask runs the tasks in parallel)
TASK_THREADS = 1
#: the fields of a part's moments, in the last axis of the moments arrays
_COUNT, _MEAN, _M2 = range(3)
#: the fields of the finished statistics
_ST_MEAN, _ST_RSTD, _ST_OFFSET, _ST_VAR = range(4)


@contextlib.contextmanager
def _task_threads():
    """Numba's (thread-local) thread count set to TASK_THREADS for the in-memory calls."""
    import numba

    old = num_threads()
    if old == TASK_THREADS or old < 2:
        yield
        return
    numba.set_num_threads(TASK_THREADS)
    try:
        yield
    finally:
        numba.set_num_threads(old)


# --------------------------------------------------------------------------------------------
# geometry: which axes index instances, and a block seen as the kernels want it


@dataclass(frozen=True)
class Geometry:
    """``inst``: the instance axes.  ``axis`` set: the API's ``(0, axis)``, parameters are
    per channel.  ``axis`` None: the leading ``len(inst)`` axes (xarray), parameters are per
    instance."""

    ndim: int
    inst: tuple
    axis: int | None

    @property
    def spatial(self) -> tuple:
        return tuple(i for i in range(self.ndim) if i not in self.inst)

    @property
    def index(self) -> str:
        return string.ascii_lowercase[: self.ndim]

    @property
    def inst_index(self) -> str:
        return "".join(self.index[i] for i in self.inst)

    @property
    def param_index(self) -> str:
        return self.index[self.axis] if self.axis is not None else self.inst_index

    def inst_shape(self, shape) -> tuple:
        return tuple(shape[i] for i in self.inst)

    def kept_shape(self, shape) -> tuple:
        """``shape`` with every spatial axis of length 1."""
        return tuple(s if i in self.inst else 1 for i, s in enumerate(shape))

    def canon(self, block: np.ndarray):
        """(array, channel_axis) for the in-memory functions: the block itself in the API's
        geometry, else ``(1, P, *spatial)`` with one channel per instance."""
        if self.axis is not None:
            return block, self.axis
        k = len(self.inst)
        P = math.prod(block.shape[:k])
        return block.reshape((1, P) + block.shape[k:]), 1

    def to3(self, a: np.ndarray) -> np.ndarray:
        """A per-instance block (instance axes' shape) as ``(N, C)`` of ``canon``."""
        return a if self.axis is not None else a.reshape(1, -1)

    def layout(self, block: np.ndarray):
        arr, ca = self.canon(block)
        return _api.canonicalize(arr, ca, _args.result_dtype(arr.dtype))

    def full(self, p: np.ndarray, inst_shape) -> np.ndarray:
        """A parameter block (``param_index``) broadcast to the instance axes' shape."""
        if self.axis is None:
            return np.broadcast_to(p, inst_shape)
        return np.broadcast_to(p[None, :], inst_shape)


def _first(v):
    while isinstance(v, list):  # blockwise hands contracted single chunks as nested lists
        v = v[0]
    return v


def _pick(t, i):
    return _first(t)[i]


# --------------------------------------------------------------------------------------------
# the tasks (module-level functions: they travel to distributed workers by pickle)


def _fused_block(block, w, b, *, geo, eps, stats=True):
    """Every spatial axis in this chunk: the in-memory call; (y, mean, rstd), or y alone."""
    arr, ca = geo.canon(block)
    with _task_threads():
        y, mean, rstd = _api.instance_norm(
            arr, w.reshape(-1), b.reshape(-1), eps=eps, channel_axis=ca, return_stats=True
        )
    if not stats:
        return y.reshape(block.shape)
    ishape = geo.inst_shape(block.shape)
    return y.reshape(block.shape), mean.reshape(ishape), rstd.reshape(ishape)


def _shift_block(block, *, geo):
    lay = geo.layout(block)
    return M.layout_shift(lay, False).reshape(geo.inst_shape(block.shape))


def _moments_block(block, shift, *, geo):
    """One chunk's (count, mean of x - shift, M2), shaped ``kept_shape + (3,)``."""
    lay = geo.layout(block)
    mean, m2 = M.layout_moments(lay, geo.to3(shift), False)
    kept = geo.kept_shape(block.shape)
    out = np.empty(kept + (3,))
    out[..., _COUNT] = lay.L
    out[..., _MEAN] = mean.reshape(kept)
    out[..., _M2] = m2.reshape(kept)
    return out


def _parts(x, axis):
    """(G, k, F) parts of an array whose ``axis`` (a tuple) are reduced, fields last."""
    axis = tuple(a % x.ndim for a in axis)
    keep = tuple(i for i in range(x.ndim - 1) if i not in axis)
    t = x.transpose(keep + axis + (x.ndim - 1,))
    G = math.prod(x.shape[i] for i in keep)
    k = math.prod(x.shape[i] for i in axis)
    out_shape = tuple(1 if i in axis else s for i, s in enumerate(x.shape[:-1]))
    return t.reshape(G, k, x.shape[-1]), out_shape


def _merge_reduce(x, axis=None, keepdims=True):
    """Combine / aggregate of the moments' tree reduction."""
    p, out_shape = _parts(x, axis)
    n, mean, m2 = M.merge_parts(p[..., _COUNT], p[..., _MEAN], p[..., _M2])
    out = np.stack([n, mean, m2], axis=-1).reshape(out_shape + (3,))
    return out if keepdims else out.reshape(tuple(s for s in out_shape if s != 1) + (3,))


def _sum_reduce(x, axis=None, keepdims=True):
    """Combine / aggregate of the backward sums' tree reduction (compensated)."""
    p, out_shape = _parts(x, axis)
    F = x.shape[-1]
    out = np.empty(p.shape[0] * F)
    K.add_chunks(np.ascontiguousarray(p.transpose(0, 2, 1)).reshape(-1, p.shape[1]), out)
    return out.reshape(out_shape + (F,))


def _identity(x, axis=None, keepdims=True):
    return x


def _stats_block(red, shift, *, eps):
    """(mean, rstd, mean of x - shift, var) from the merged moments, fields last."""
    red = _first(red)
    mean, rstd, var = M.finish_stats(red[..., _COUNT], shift, red[..., _MEAN], red[..., _M2], eps)
    return np.stack([mean, rstd, red[..., _MEAN], var], axis=-1)


def _running_stats_block(rm, rv, *, eps):
    """Running statistics as the fields ``_ST_*``: shift = running mean, offset 0."""
    with np.errstate(all="ignore"):
        rstd = 1.0 / np.sqrt(rv + eps)
    return np.stack([rm, rstd, np.zeros_like(rm), rv], axis=-1)


def _apply_block(block, shift, st, w, b, *, geo, out_dtype):
    """``y = ((x - shift) - c) * rstd * w + b`` on one chunk."""
    st = _first(st)
    lay = geo.layout(block)
    ishape = geo.inst_shape(block.shape)
    with np.errstate(all="ignore"):
        a = st[..., _ST_RSTD] * geo.full(w, ishape)
    bb = geo.full(b, ishape)
    y = np.empty(lay.canonical_shape, out_dtype)
    if y.size:
        to3 = geo.to3
        M.layout_apply(lay, y, to3(shift), to3(st[..., _ST_OFFSET]), to3(a), to3(bb), False)
    return np.ascontiguousarray(lay.restore(y)).reshape(block.shape)


# --------------------------------------------------------------------------------------------
# the backward's tasks


def _bwd_fused_block(x, g, mean, rstd, w, *, axis):
    """Every spatial axis in this chunk: the in-memory backward; (dx, grad_w, grad_b), the
    last two over this chunk's samples, shaped (1, cb)."""
    with _task_threads():
        dx, gw, gb = _api.instance_norm_backward(g, x, mean, rstd, w, channel_axis=axis)
    return dx, gw[None, :], gb[None, :]


def _bwd_sums_block(x, g, mean, *, geo):
    """One chunk's backward sums (sum dy, sum (x - mean), sum dy * (x - mean)),
    ``kept_shape + (3,)``."""
    lay = geo.layout(x)
    dtype = _args.result_dtype(x.dtype)
    gk, _ = _api.as_layout(lay, geo.canon(g)[0], dtype)
    N, C = lay.N, lay.C
    G, Cp = (N * C, 1) if lay.kind == "cf" else (N, C)
    ps = [np.zeros((G, 1, Cp)) for _ in range(3)]
    m = np.ascontiguousarray(geo.to3(mean), dtype=np.float64)
    xk, gk = _api._kernel_view(lay.data), _api._kernel_view(gk)
    if lay.kind == "cf":
        dispatch(K.cf_bwd_partial, False, xk, gk, m.reshape(-1), 1, *ps)
    else:
        dispatch(K.cl_bwd_partial, False, xk, gk, m, 1, *ps)
    kept = geo.kept_shape(x.shape)
    return np.stack([p.reshape(kept) for p in ps], axis=-1)


def _bwd_coeff_block(sums, rstd, w, *, L, geo):
    """(xbar, a, mdy, k, sum dy, sum dy * xhat) per instance, fields last."""
    sums = _first(sums)
    ishape = sums.shape[:-1]
    G = math.prod(ishape)
    ps = [np.ascontiguousarray(sums[..., i]).reshape(G, 1, 1) for i in range(3)]
    wg = np.ascontiguousarray(geo.full(w, ishape), dtype=np.float64).reshape(G, 1)
    outs = [np.empty((G, 1)) for _ in range(6)]
    r = np.ascontiguousarray(rstd, dtype=np.float64).reshape(G, 1)
    with np.errstate(all="ignore"):
        K.bwd_finish(float(L), *ps, r, wg, *outs)
    return np.stack([o.reshape(ishape) for o in outs], axis=-1)


def _bwd_apply_block(x, g, mean, co, *, geo, out_dtype):
    co = _first(co)
    lay = geo.layout(x)
    gk, _ = _api.as_layout(lay, geo.canon(g)[0], out_dtype)
    dx = np.empty(lay.canonical_shape, out_dtype)
    if dx.size:
        fields = [mean] + [co[..., i] for i in range(4)]
        args = [M._per_instance(geo.to3(f), lay.kind) for f in fields]
        xk, gk, dk = (_api._kernel_view(a) for a in (lay.data, gk, dx))
        bwd = K.cf_bwd_apply if lay.kind == "cf" else K.cl_bwd_apply
        dispatch(bwd, False, xk, gk, dk, 1, *args)
    return np.ascontiguousarray(lay.restore(dx)).reshape(x.shape)
