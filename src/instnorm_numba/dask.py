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

The tasks, the functions that run on one chunk, are in ``_dask_blocks``; kernels run serially
inside each task (``_dask_blocks.TASK_THREADS``): Dask supplies the parallelism.
"""

from __future__ import annotations

import math

import numpy as np

from . import _args
from ._dask_blocks import (
    _ST_MEAN,
    _ST_RSTD,
    _ST_VAR,
    Geometry,
    _apply_block,
    _bwd_apply_block,
    _bwd_coeff_block,
    _bwd_fused_block,
    _bwd_sums_block,
    _fused_block,
    _identity,
    _merge_reduce,
    _moments_block,
    _pick,
    _running_stats_block,
    _shift_block,
    _stats_block,
    _sum_reduce,
)

__all__ = ["instance_norm", "instance_norm_backward", "is_dask_array"]

#: parts merged per task of the statistics' tree reduction
SPLIT_EVERY = 16


def is_dask_array(x) -> bool:
    """Whether ``x`` is a Dask array (checked without importing Dask)."""
    return type(x).__module__.startswith("dask.") and hasattr(x, "__dask_graph__")


def _da():
    import dask.array as da

    return da


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


def _tree_reduce(parts, merge, geo):
    """Per-chunk results (``kept_shape + (F,)``) merged over the spatial axes by a tree of
    ``merge`` tasks (``SPLIT_EVERY`` parts each): the instance axes' shape ``+ (F,)``."""
    da = _da()
    red = da.reduction(
        parts,
        chunk=_identity,
        combine=merge,
        aggregate=merge,
        axis=geo.spatial,
        keepdims=True,
        dtype=np.float64,
        concatenate=True,
        split_every=SPLIT_EVERY,
        meta=np.empty((0,) * parts.ndim),
    )
    return red[tuple(0 if i in geo.spatial else slice(None) for i in range(geo.ndim))]


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
    red = _tree_reduce(mo, _merge_reduce, geo)
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
    spatial = _args.spatial_size(x.shape, axis, update)
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
    _args.check_grad_output(g, x)
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
    red = _tree_reduce(sums, _sum_reduce, geo)
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
