"""Dask arrays in, Dask arrays out: :func:`instance_norm` and :func:`instance_norm_backward`,
lazily and exactly, at any chunking.

``instnorm_numba.instance_norm`` and ``instance_norm_backward`` route Dask arrays here, so
the same call works on both; this module adds one keyword, ``two_pass``.  Nothing is
computed when the functions return (except the statistics behind an in-place update of
``running_mean`` / ``running_var``, see below); Dask itself is imported only when a Dask
array arrives.

Which graph (NB: the one place that decides):

* every spatial axis in one chunk: one task per chunk runs the in-memory function on it
  (statistics and normalization in one pass over the chunk);
* spatial axes split into several chunks: a shift per instance from the chunk holding its
  first elements (a tiny task), every chunk's moments around that shift (float64), a tree
  reduction merging them exactly (``SPLIT_EVERY`` parts per task; ``merge_chunks``), then one
  apply task per chunk.  ``two_pass`` (default: on in this case) makes the apply re-read the
  source after the statistics exist (``dask.graph_manipulation.bind``), so that no chunk is
  held in memory while the statistics wait for the rest: an input larger than the workers'
  memory streams through twice.  Without it the graph reads the source once, and holds the
  chunks of an instance until its statistics are known.

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

__all__ = ["instance_norm", "instance_norm_backward", "is_dask_array"]

#: parts merged per task of the statistics' tree reduction
SPLIT_EVERY = 16
#: Numba threads inside one Dask task (Dask runs the tasks in parallel)
TASK_THREADS = 1
#: the fields of a part's moments, in the last axis of the moments arrays
_COUNT, _MEAN, _M2 = range(3)
#: the fields of the finished statistics
_ST_MEAN, _ST_RSTD, _ST_OFFSET, _ST_VAR = range(4)


def is_dask_array(x) -> bool:
    """Whether ``x`` is a Dask array (checked without importing Dask)."""
    return type(x).__module__.startswith("dask.") and hasattr(x, "__dask_graph__")


def _da():
    import dask.array as da

    return da


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
# argument checking for Dask inputs (the same messages as ``_api``)


def _check_input(x, name="x"):
    _args.result_dtype(x.dtype, name)
    if x.ndim < 3:
        raise ValueError(
            f"{name} must have at least 3 dimensions (N, C, *spatial); got ndim={x.ndim} "
            f"with shape {_args._fmt_shape(x.shape)}"
        )
    if any(math.isnan(s) for s in x.shape):
        raise ValueError(
            f"{name} has unknown chunk sizes (shape {x.shape}); call "
            f"{name}.compute_chunk_sizes() first"
        )
    return x


def _small_dask(v, name, shape, chunks, *, kinds, what):
    """A Dask parameter checked as ``_api`` checks it; float64, chunked like x's instances."""
    dt = v.dtype
    if dt.kind not in kinds or (dt.kind == "f" and dt.itemsize > 8):
        raise TypeError(f"{name} must have {what}; got {dt}")
    if tuple(v.shape) != tuple(shape):
        raise ValueError(
            f"{name} must have shape {_args._fmt_shape(shape)} to match x; got shape "
            f"{_args._fmt_shape(v.shape)}"
        )
    return v.astype(np.float64).rechunk(chunks)


def _channel_param(v, name, C, chunks, default):
    da = _da()
    if is_dask_array(v):
        return _small_dask(
            v, name, (C,), chunks, kinds="fiub", what="a real floating, integer or bool dtype"
        )
    return da.from_array(_args.channel_vector(v, name, C, default), chunks=chunks)


def _stats_param(v, name, N, C, chunks):
    da = _da()
    if is_dask_array(v):
        return _small_dask(
            v,
            name,
            (N, C),
            chunks,
            kinds="f",
            what="a floating dtype (instance_norm returns float64)",
        )
    return da.from_array(_args.stats_matrix(v, name, N, C), chunks=chunks)


def _no_out(out, what):
    if out is not None:
        raise TypeError(
            f"out= is not supported when {what} is a Dask array: the result is a lazy Dask "
            f"array (write it with dask.array.store or to_zarr); got out of type "
            f"{type(out).__name__}"
        )


def _spatial_split(x, geo) -> bool:
    return any(len(x.chunks[i]) > 1 for i in geo.spatial)


# --------------------------------------------------------------------------------------------
# the graphs


def _fused(x, geo, w, b, eps, dtype, want_stats=True):
    """(y, mean, rstd): one in-memory call per chunk (every spatial axis in one chunk); with
    ``want_stats`` False, ``mean`` and ``rstd`` are None and each chunk is one task."""
    da = _da()
    ind, iind, pind = geo.index, geo.inst_index, geo.param_index
    if not want_stats:
        y = da.blockwise(
            _fused_block, ind, x, ind, w, pind, b, pind, geo=geo, eps=eps, stats=False,
            concatenate=True, meta=np.empty((0,) * x.ndim, dtype),
        )  # fmt: skip
        return y, None, None
    obj = np.empty((0,) * x.ndim, dtype=object)
    t = da.blockwise(
        _fused_block, ind, x, ind, w, pind, b, pind, geo=geo, eps=eps, meta=obj,
        concatenate=True,
    )  # fmt: skip
    y = da.blockwise(_pick, ind, t, ind, 0, None, dtype=dtype, meta=np.empty((0,) * x.ndim, dtype))
    stats = [
        da.blockwise(
            _pick,
            iind,
            t,
            ind,
            i,
            None,
            concatenate=False,
            meta=np.empty((0,) * len(geo.inst)),
        )  # fmt: skip
        for i in (1, 2)
    ]
    return y, stats[0], stats[1]


def _statistics(x, geo, eps):
    """(shift, st): per-instance shift and finished statistics (fields ``_ST_*``) as Dask
    arrays over x's instance axes, for any chunking."""
    da = _da()
    ind, iind = geo.index, geo.inst_index
    ninst = len(geo.inst)
    # the shift: from the first non-empty chunk of every spatial axis
    first = []
    for i in range(x.ndim):
        if i in geo.inst:
            first.append(slice(None))
            continue
        start = 0
        for c in x.chunks[i]:
            if c:
                break
            start += c
        first.append(slice(start, start + max(c, 1) if x.shape[i] else 0))
    x0 = x[tuple(first)]
    shift = da.blockwise(
        _shift_block, iind, x0, ind, geo=geo, concatenate=True, meta=np.empty((0,) * ninst)
    )
    F = "Z"
    mo = da.blockwise(
        _moments_block, ind + F, x, ind, shift, iind, geo=geo, new_axes={F: 3},
        adjust_chunks={ind[i]: 1 for i in geo.spatial}, meta=np.empty((0,) * (x.ndim + 1)),
    )  # fmt: skip
    red = da.reduction(
        mo,
        chunk=_identity,
        combine=_merge_reduce,
        aggregate=_merge_reduce,
        axis=geo.spatial,
        keepdims=True,
        dtype=np.float64,
        concatenate=True,
        split_every=SPLIT_EVERY,
        meta=np.empty((0,) * (x.ndim + 1)),
    )
    red = red[tuple(0 if i in geo.spatial else slice(None) for i in range(x.ndim))]
    st = da.blockwise(
        _stats_block, iind + F, red, iind + F, shift, iind, eps=eps, adjust_chunks={F: 4},
        meta=np.empty((0,) * (ninst + 1)),
    )  # fmt: skip
    return shift, st


def _apply(src, geo, shift, st, w, b, dtype):
    da = _da()
    ind, iind, pind = geo.index, geo.inst_index, geo.param_index
    return da.blockwise(
        _apply_block, ind, src, ind, shift, iind, st, iind + "Z", w, pind, b, pind,
        geo=geo, out_dtype=dtype, concatenate=True, meta=np.empty((0,) * src.ndim, dtype),
    )  # fmt: skip


def _bound_source(x, parents):
    """``x`` re-read after ``parents`` exist: the same graph under new keys, depending on
    them (the two-pass schedule)."""
    from dask.graph_manipulation import bind

    return bind(x, parents)


def normalize(x, geo: Geometry, w, b, eps, *, stats="input", two_pass=None, want_stats=True):
    """The core: ``(y, mean, rstd, var)`` as Dask arrays (``var`` None on the fused path;
    ``mean`` and ``rstd`` too there without ``want_stats``).

    ``w``, ``b``: Dask arrays over ``geo.param_index``.  ``stats``: ``"input"`` (lazy),
    ``"computed"`` (statistics computed now, NumPy), or a tuple ``(mean, var)`` of Dask
    arrays over the instance axes (running statistics)."""
    da = _da()
    dtype = _args.result_dtype(x.dtype)
    ichunks = tuple(x.chunks[i] for i in geo.inst)
    if isinstance(stats, tuple):
        rm, rv = stats
        st = da.map_blocks(
            _running_stats_block, rm, rv, eps=eps, new_axis=rm.ndim,
            chunks=ichunks + ((4,),), meta=np.empty((0,) * (rm.ndim + 1)),
        )  # fmt: skip
        y = _apply(x, geo, rm, st, w, b, dtype)
        return y, st[..., _ST_MEAN], st[..., _ST_RSTD], rv
    split = _spatial_split(x, geo)
    if stats == "input" and not split:
        y, mean, rstd = _fused(x, geo, w, b, eps, dtype, want_stats)
        return y, mean, rstd, None
    shift, st = _statistics(x, geo, eps)
    if stats == "computed":
        import dask

        shift_v, st_v = dask.compute(shift, st)
        shift = da.from_array(shift_v, chunks=ichunks)
        st = da.from_array(st_v, chunks=ichunks + ((4,),))
        src = x
    else:
        if two_pass is None:
            two_pass = split
        src = _bound_source(x, [st]) if two_pass else x
    y = _apply(src, geo, shift, st, w, b, dtype)
    return y, st[..., _ST_MEAN], st[..., _ST_RSTD], st[..., _ST_VAR]


# --------------------------------------------------------------------------------------------
# the public functions


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
    out=None,
    return_stats=False,
    two_pass=None,
):
    """:func:`instnorm_numba.instance_norm` of a Dask array, as a Dask array (lazy).

    Same arguments, dtype rules, errors and results as the in-memory function (to its
    accuracy guarantee, at any chunking), except:

    * ``out=`` is refused (``TypeError``): write the lazy result with ``dask.array.store``
      or ``to_zarr``;
    * ``return_stats=True`` gives ``mean`` and ``rstd`` as lazy ``(N, C)`` Dask arrays;
    * ``running_mean`` / ``running_var`` with ``use_input_stats=True`` are NumPy arrays
      updated in place at this call, as in memory: the statistics are **computed now** (one
      pass over the data, with the current Dask scheduler), and the returned ``y`` is a lazy
      normalization with those statistics (a second pass when computed).  With
      ``use_input_stats=False`` nothing is computed; the running statistics may be Dask
      arrays then.
    * ``two_pass`` (default: when the spatial axes are split into several chunks): the
      normalization re-reads ``x`` after the statistics exist, instead of holding every chunk
      of an instance until then; what makes an input larger than the workers' memory
      stream through.

    Examples
    --------
    >>> import dask.array as da
    >>> import numpy as np
    >>> from instnorm_numba import instance_norm
    >>> x = da.from_array(np.arange(16.0).reshape(1, 2, 8), chunks=(1, 1, 3))
    >>> y = instance_norm(x, eps=0.0)       # nothing computed yet
    >>> y.chunks
    ((1,), (1, 1), (3, 3, 2))
    >>> y.compute().round(3)
    array([[[-1.528, -1.091, -0.655, -0.218,  0.218,  0.655,  1.091,  1.528],
            [-1.528, -1.091, -0.655, -0.218,  0.218,  0.655,  1.091,  1.528]]])
    """
    da = _da()
    if not is_dask_array(x):
        x = da.asarray(x)
    _check_input(x)
    axis = _args.normalize_channel_axis(channel_axis, x.ndim)
    N, C = x.shape[0], x.shape[axis]
    cchunks = x.chunks[axis]
    w = _channel_param(weight, "weight", C, cchunks, 1.0)
    b = _channel_param(bias, "bias", C, cchunks, 0.0)
    eps = _args.real_scalar(eps, "eps", minimum=0.0)
    momentum = _args.real_scalar(momentum, "momentum")
    has_running, update = _args.running_options(
        use_input_stats, return_stats, running_mean, running_var
    )
    if two_pass is not None and not isinstance(two_pass, (bool, np.bool_)):
        raise TypeError(f"two_pass must be None or a bool; got {two_pass!r}")
    ichunks = (x.chunks[0], cchunks)
    if update:
        running_mean = _args.running_vector(running_mean, "running_mean", C, update=True)
        running_var = _args.running_vector(running_var, "running_var", C, update=True)
    elif has_running:
        rm_v, rv_v = running_mean, running_var
        running_mean, running_var = (
            _small_dask(
                v, name, (C,), cchunks, kinds="f", what="a float16, float32 or float64 dtype"
            )
            if is_dask_array(v)
            else da.from_array(
                np.asarray(_args.running_vector(v, name, C, update=False)), chunks=cchunks
            )
            for v, name in ((rm_v, "running_mean"), (rv_v, "running_var"))
        )
    _no_out(out, "x")
    spatial = math.prod(s for i, s in enumerate(x.shape) if i not in (0, axis))
    if update and spatial <= 1:
        raise ValueError(
            f"updating running statistics (running_mean, running_var with use_input_stats=True) "
            f"needs more than 1 spatial element per instance; got x of shape "
            f"{_args._fmt_shape(x.shape)}"
        )
    geo = Geometry(x.ndim, (0, axis), axis)
    if not use_input_stats:
        rm = da.broadcast_to(running_mean.astype(np.float64)[None, :], (N, C), chunks=ichunks)
        rv = da.broadcast_to(running_var.astype(np.float64)[None, :], (N, C), chunks=ichunks)
        y, mean, rstd, _ = normalize(x, geo, w, b, eps, stats=(rm, rv))
    else:
        how = "computed" if update else "input"
        y, mean, rstd, var = normalize(
            x, geo, w, b, eps, stats=how, two_pass=two_pass, want_stats=bool(return_stats)
        )
        if update and N > 0:
            mean_v, var_v = (np.asarray(v) for v in _compute(mean, var))
            with np.errstate(all="ignore"):
                unbiased = var_v * (spatial / (spatial - 1))
                running_mean[...] = (1.0 - momentum) * running_mean + momentum * mean_v.mean(0)
                running_var[...] = (1.0 - momentum) * running_var + momentum * unbiased.mean(0)
    if return_stats:
        return y, mean, rstd
    return y


def _compute(*arrays):
    import dask

    return dask.compute(*arrays)


# --------------------------------------------------------------------------------------------
# backward


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


def instance_norm_backward(
    grad_output, x, mean, rstd, weight=None, *, channel_axis=1, out=None, two_pass=None
):
    """:func:`instnorm_numba.instance_norm_backward` with Dask arrays, lazily.

    ``grad_output`` and ``x`` (either or both Dask arrays; ``grad_output`` is rechunked like
    ``x``), ``mean`` and ``rstd`` (NumPy or lazy Dask, e.g. from
    ``instance_norm(..., return_stats=True)``) and ``weight`` as in memory.  Returns
    ``(grad_input, grad_weight, grad_bias)``: a Dask array chunked like ``x`` and two lazy
    ``(C,)`` float64 Dask arrays.  ``out=`` is refused; ``two_pass`` as in
    :func:`instance_norm` (the second sweep re-reads ``x`` and ``grad_output``).

    Examples
    --------
    >>> import dask.array as da
    >>> import numpy as np
    >>> from instnorm_numba import instance_norm, instance_norm_backward
    >>> x = da.from_array(np.arange(16.0).reshape(1, 2, 8), chunks=(1, 1, 3))
    >>> y, mean, rstd = instance_norm(x, return_stats=True)
    >>> dx, dw, db = instance_norm_backward(y, x, mean, rstd)
    >>> dw.compute().round(3), db.compute().round(3)
    (array([8., 8.]), array([0., 0.]))
    """
    da = _da()
    if not is_dask_array(x):
        x = da.asarray(x)
    if not is_dask_array(grad_output):
        grad_output = da.asarray(grad_output)
    _check_input(x)
    axis = _args.normalize_channel_axis(channel_axis, x.ndim)
    dtype = _args.result_dtype(x.dtype)
    N, C = x.shape[0], x.shape[axis]
    g = _check_input(grad_output, "grad_output")
    if g.shape != x.shape:
        raise ValueError(
            f"grad_output must have shape {_args._fmt_shape(x.shape)} to match x; got shape "
            f"{_args._fmt_shape(g.shape)}"
        )
    if _args.result_dtype(g.dtype, "grad_output") != dtype or g.dtype.kind != "f":
        raise TypeError(
            f"grad_output must have dtype {dtype} (instance_norm's result dtype for x of dtype "
            f"{x.dtype}); got {g.dtype}"
        )
    cchunks = x.chunks[axis]
    ichunks = (x.chunks[0], cchunks)
    mean = _stats_param(mean, "mean", N, C, ichunks)
    rstd = _stats_param(rstd, "rstd", N, C, ichunks)
    w = _channel_param(weight, "weight", C, cchunks, 1.0)
    _no_out(out, "x or grad_output")
    if two_pass is not None and not isinstance(two_pass, (bool, np.bool_)):
        raise TypeError(f"two_pass must be None or a bool; got {two_pass!r}")
    g = g.rechunk(x.chunks)
    geo = Geometry(x.ndim, (0, axis), axis)
    ind, iind, cind = geo.index, geo.inst_index, geo.param_index
    nd = x.ndim
    if not _spatial_split(x, geo):
        t = da.blockwise(
            _bwd_fused_block, ind, x, ind, g, ind, mean, iind, rstd, iind, w, cind,
            axis=axis, concatenate=True, meta=np.empty((0,) * nd, dtype=object),
        )  # fmt: skip
        dx = da.blockwise(_pick, ind, t, ind, 0, None, meta=np.empty((0,) * nd, dtype))
        b0 = ind[0]
        grads = [
            da.blockwise(
                _pick,
                b0 + cind,
                t,
                ind,
                i,
                None,
                concatenate=False,
                adjust_chunks={b0: 1},
                meta=np.empty((0, 0)),
            ).sum(axis=0)  # fmt: skip
            for i in (1, 2)
        ]
        return dx, grads[0], grads[1]
    F = "Z"
    sums = da.blockwise(
        _bwd_sums_block, ind + F, x, ind, g, ind, mean, iind, geo=geo, new_axes={F: 3},
        adjust_chunks={ind[i]: 1 for i in geo.spatial}, meta=np.empty((0,) * (nd + 1)),
    )  # fmt: skip
    red = da.reduction(
        sums,
        chunk=_identity,
        combine=_sum_reduce,
        aggregate=_sum_reduce,
        axis=geo.spatial,
        keepdims=True,
        dtype=np.float64,
        concatenate=True,
        split_every=SPLIT_EVERY,
        meta=np.empty((0,) * (nd + 1)),
    )
    red = red[tuple(0 if i in geo.spatial else slice(None) for i in range(nd))]
    L = math.prod(x.shape[i] for i in geo.spatial)
    co = da.blockwise(
        _bwd_coeff_block, iind + F, red, iind + F, rstd, iind, w, cind, L=L, geo=geo,
        adjust_chunks={F: 6}, meta=np.empty((0,) * 3),
    )  # fmt: skip
    if two_pass is None:
        two_pass = True
    xs, gs = (x, g)
    if two_pass:
        xs, gs = _bound_source((x, g), [co])
    dx = da.blockwise(
        _bwd_apply_block, ind, xs, ind, gs, ind, mean, iind, co, iind + F, geo=geo,
        out_dtype=dtype, concatenate=True, meta=np.empty((0,) * nd, dtype),
    )  # fmt: skip
    return dx, co[..., 5].sum(axis=0), co[..., 4].sum(axis=0)
