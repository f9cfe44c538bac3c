"""xarray: instance normalization of a ``DataArray`` over named dims.

:func:`instance_norm` normalizes over the dims named in ``dims``; every other dim indexes
instances (batch and channel alike).  NumPy-backed arrays, and Dask-backed arrays whose
``dims`` are each in one chunk, go through ``xarray.apply_ufunc`` (``dask="parallelized"``):
one in-memory call per chunk.  Dask-backed arrays chunked along ``dims`` go through
``instnorm_numba.dask`` (exact moments merged over the chunks).  Either way a Dask-backed
array stays lazy.  xarray is imported only when this module's function is called.
"""

from __future__ import annotations

import contextlib

import numpy as np

from . import _api, _args

__all__ = ["instance_norm"]


def _np_instance_norm(x, w, b, *, k, eps, in_task):
    """The in-memory call on a block whose last ``k`` axes are the normalized dims (serial
    kernels when it is one of many Dask tasks)."""
    from ._dask_blocks import _task_threads

    lead = x.shape[: x.ndim - k]
    P = int(np.prod(lead))
    x3 = x.reshape((1, P) + x.shape[x.ndim - k :])
    wv = np.broadcast_to(w, lead).reshape(P)
    bv = np.broadcast_to(b, lead).reshape(P)
    with _task_threads() if in_task else contextlib.nullcontext():
        y = _api.instance_norm(x3, wv, bv, eps=eps, channel_axis=1)
    return y.reshape(x.shape)


def _param(v, name, da, others):
    """weight/bias: None, or a DataArray whose dims are among the instance dims of ``da``."""
    import xarray as xr

    if v is None:
        return None
    if not isinstance(v, xr.DataArray):
        raise TypeError(
            f"{name} must be None or an xarray.DataArray (aligned with the data by dim "
            f"name); got {type(v).__name__}"
        )
    bad = [d for d in v.dims if d not in others]
    if bad:
        raise ValueError(
            f"{name} has dims {bad} that are not instance dims of the data; its dims must be "
            f"among {list(others)} (the dims of the data not normalized over); got {name} "
            f"with dims {list(v.dims)}"
        )
    for d in v.dims:
        if v.sizes[d] != da.sizes[d]:
            raise ValueError(
                f"{name} has size {v.sizes[d]} along dim {d!r}, the data has size {da.sizes[d]}"
            )
    if v.dtype.kind not in "fiub" or (v.dtype.kind == "f" and v.dtype.itemsize > 8):
        raise TypeError(f"{name} must have a real floating, integer or bool dtype; got {v.dtype}")
    try:
        xr.align(da, v, join="exact")
    except ValueError as exc:
        raise ValueError(f"{name} is not aligned with the data: {exc}") from None
    return v


def _instance_shaped(v, da, others, default):
    """A parameter as an array over ``others`` (NumPy or Dask), broadcast."""
    shape = tuple(da.sizes[d] for d in others)
    if v is None:
        return np.full(shape, default)
    order = [d for d in others if d in v.dims]
    data = v.transpose(*order).data
    expanded = tuple(da.sizes[d] if d in v.dims else 1 for d in others)
    data = data.reshape(expanded)
    from .dask import is_dask_array

    if is_dask_array(data):
        import dask.array as dsa

        return dsa.broadcast_to(data.astype(np.float64), shape)
    return np.broadcast_to(np.asarray(data, dtype=np.float64), shape)


def instance_norm(da, dims, *, weight=None, bias=None, eps=1e-5):
    """Normalize a ``DataArray`` over the named ``dims``, one instance per other index.

    ``y = (x - mean) / sqrt(var + eps) * weight + bias`` with the mean and the biased
    variance taken over ``dims`` for every combination of the other dims (batch, channel,
    time, ...), accumulated in float64 with the library's accuracy guarantee.

    Parameters
    ----------
    da : xarray.DataArray
        NumPy- or Dask-backed; float16/32/64 keep their dtype, integers and bools give float64.
    dims : str or sequence of str
        The dims to normalize over (the spatial dims), at least one.
    weight, bias : xarray.DataArray, optional
        Scale and offset per instance, aligned with ``da`` by dim name: their dims must be
        among the dims not in ``dims`` (for example ``("channel",)``), with matching sizes
        and coordinates.  Default 1 and 0.
    eps : float, default 1e-5
        Added to the variance.

    Returns
    -------
    xarray.DataArray
        Same dims in the same order, coords, name and attrs as ``da``; lazy when ``da`` is
        Dask-backed.

    Raises
    ------
    ValueError
        ``dims`` not in ``da`` (named), or a weight/bias over other dims.

    Examples
    --------
    >>> import numpy as np
    >>> import xarray as xr
    >>> from instnorm_numba.xarray import instance_norm
    >>> da = xr.DataArray(
    ...     np.arange(12.0).reshape(2, 3, 2), dims=("channel", "y", "x"), name="img",
    ...     attrs={"units": "K"},
    ... )
    >>> y = instance_norm(da, ("y", "x"), eps=0.0)
    >>> y.dims, y.name, y.attrs
    (('channel', 'y', 'x'), 'img', {'units': 'K'})
    >>> y.isel(channel=0).values.round(3)
    array([[-1.464, -0.878],
           [-0.293,  0.293],
           [ 0.878,  1.464]])
    """
    import xarray as xr

    from .dask import Geometry, is_dask_array, normalize

    if not isinstance(da, xr.DataArray):
        raise TypeError(f"da must be an xarray.DataArray; got {type(da).__name__}")
    if isinstance(dims, str):
        dims = (dims,)
    try:
        dims = tuple(dims)
    except TypeError:
        raise TypeError(f"dims must be a dim name or a sequence of them; got {dims!r}") from None
    if not dims:
        raise ValueError("dims must name at least one dim to normalize over; got ()")
    missing = [d for d in dims if d not in da.dims]
    if missing:
        raise ValueError(f"dims {missing} are not dims of the data; its dims are {list(da.dims)}")
    if len(set(dims)) != len(dims):
        raise ValueError(f"dims must not repeat a dim; got {list(dims)}")
    dtype = _args.result_dtype(da.dtype, "da")
    eps = _args.real_scalar(eps, "eps", minimum=0.0)
    others = tuple(d for d in da.dims if d not in dims)
    w = _param(weight, "weight", da, others)
    b = _param(bias, "bias", da, others)
    data = da.data
    chunked = is_dask_array(data) and any(len(da.chunksizes[d]) > 1 for d in dims)
    if not chunked:
        wa = xr.DataArray(1.0) if w is None else w
        ba = xr.DataArray(0.0) if b is None else b
        res = xr.apply_ufunc(
            _np_instance_norm,
            da,
            wa,
            ba,
            input_core_dims=[list(dims), [], []],
            output_core_dims=[list(dims)],
            dask="parallelized",
            output_dtypes=[dtype],
            kwargs={"k": len(dims), "eps": eps, "in_task": is_dask_array(data)},
        )
        return da.copy(data=res.transpose(*da.dims).data)
    t = da.transpose(*others, *dims)
    x = t.data
    geo = Geometry(x.ndim, tuple(range(len(others))), None)
    ichunks = x.chunks[: len(others)]
    dsa = _dask_array()
    ws = dsa.asarray(_instance_shaped(w, da, others, 1.0)).rechunk(ichunks)
    bs = dsa.asarray(_instance_shaped(b, da, others, 0.0)).rechunk(ichunks)
    if not others:  # every dim normalized: one instance
        x = x[None]
        geo = Geometry(x.ndim, (0,), None)
        ws, bs = ws[None], bs[None]
    y = normalize(x, geo, ws, bs, eps, want_stats=False)[0]
    if not others:
        y = y[0]
    return da.copy(data=t.copy(data=y).transpose(*da.dims).data)


def _dask_array():
    import dask.array as dsa

    return dsa
