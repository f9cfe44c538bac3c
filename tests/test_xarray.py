"""xarray: normalization over named dims, NumPy- and Dask-backed, metadata kept, errors."""

from __future__ import annotations

import doctest
import zlib

import numpy as np
import pytest

xr = pytest.importorskip("xarray", reason="xarray is not installed")

from instnorm_numba import reference as ref  # noqa: E402
from instnorm_numba import xarray as inx  # noqa: E402

DIMS = ("batch", "channel", "y", "x")
SHAPE = (2, 3, 10, 12)
TOL = {np.dtype(np.float16): 1.0, np.dtype(np.float32): 1.0, np.dtype(np.float64): 4.0}


def rng(seed):
    return np.random.default_rng(zlib.crc32(repr(seed).encode()))


def make(dtype="float64", offset=1e4, seed=0):
    x = (rng((dtype, seed)).standard_normal(SHAPE) * 3 + offset).astype(dtype)
    return xr.DataArray(
        x,
        dims=DIMS,
        coords={"channel": ["r", "g", "b"], "y": np.arange(10) * 0.5, "time": ("batch", [1, 2])},
        name="img",
        attrs={"units": "K", "note": "raw"},
    )


def per_channel(values, name="w"):
    return xr.DataArray(values, dims=("channel",), coords={"channel": ["r", "g", "b"]}, name=name)


def expected(da, dims, w=None, b=None):
    """The reference, with the instance dims flattened into channels of one sample."""
    others = [d for d in da.dims if d not in dims]
    t = da.transpose(*others, *dims)
    x = t.values.reshape((1, -1) + tuple(da.sizes[d] for d in dims))
    lead = tuple(da.sizes[d] for d in others)

    def flat(v, default):
        if v is None:
            return np.full(int(np.prod(lead)), default)
        return (
            v.broadcast_like(t.isel({d: 0 for d in dims}, drop=True))
            .transpose(*others)
            .values.ravel()
        )

    wv, bv = flat(w, 1.0), flat(b, 0.0)
    exact = ref.instance_norm(x, wv, bv, exact=True).reshape(t.shape)
    scale = ref.accuracy_scale(x, wv, bv).reshape(t.shape)
    dims_t = tuple(others) + tuple(dims)
    to = [dims_t.index(d) for d in da.dims]
    return exact.transpose(to), scale.transpose(to)


def check(da, dims, w=None, b=None, lazy=False):
    y = inx.instance_norm(da, dims, weight=w, bias=b)
    assert isinstance(y, xr.DataArray)
    assert y.dims == da.dims and y.name == da.name and y.attrs == da.attrs
    assert set(y.coords) == set(da.coords)
    for c in da.coords:
        xr.testing.assert_identical(y.coords[c], da.coords[c])
    assert y.dtype == ref.result_dtype(da.dtype)
    if lazy:
        import dask.array

        assert isinstance(y.data, dask.array.Array)
        assert y.chunks == da.chunks
    exact, scale = expected(da, dims, w, b)
    err = ref.ulp_error(y.values, exact, scale=scale if y.dtype == np.float64 else None)
    assert err <= TOL[y.dtype], err
    return y


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_numpy_backed(dtype):
    da = make(dtype, 1e4 if dtype != "float16" else 100.0)
    r = rng(dtype)
    check(da, ("y", "x"), per_channel(r.uniform(0.5, 2, 3)), per_channel(r.standard_normal(3)))


CHUNKINGS = [
    {"batch": 1},  # dims in one chunk: apply_ufunc, dask="parallelized"
    {"channel": 1, "batch": 1},
    {"y": 3},  # dims chunked: the Dask path
    {"y": 4, "x": 5},
    {"channel": 2, "x": 7},
]


@pytest.mark.parametrize("chunks", CHUNKINGS, ids=str)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_dask_backed_stays_lazy_and_exact(chunks, dtype):
    pytest.importorskip("dask", reason="dask is not installed")
    da = make(dtype).chunk(chunks)
    r = rng((dtype, str(chunks)))
    w = per_channel(r.uniform(0.5, 2, 3))
    b = per_channel(r.standard_normal(3))
    check(da, ("y", "x"), w, b, lazy=True)


def test_other_dims_and_order():
    da = make().transpose("y", "channel", "x", "batch")
    check(da, ["x", "y"], per_channel(np.array([1.0, 2.0, 3.0])))
    check(da, ("batch",))  # normalize over the batch: every (y, channel, x) an instance
    check(da, "x")
    check(make(), ("batch", "channel", "y", "x"))  # every dim: one instance


def test_other_dims_and_order_dask():
    pytest.importorskip("dask", reason="dask is not installed")
    da = make().transpose("y", "channel", "x", "batch").chunk({"x": 5, "y": 4})
    check(da, ["x", "y"], per_channel(np.array([1.0, 2.0, 3.0])), lazy=True)
    check(make().chunk({"y": 3}), ("batch", "channel", "y", "x"), lazy=True)


def test_weight_over_several_dims_and_dask_weight():
    pytest.importorskip("dask", reason="dask is not installed")
    da = make()
    w = xr.DataArray(
        rng("w2").uniform(0.5, 2, (3, 2)),
        dims=("channel", "batch"),
        coords={"channel": ["r", "g", "b"]},
    )
    check(da, ("y", "x"), w)
    check(da.chunk({"x": 4}), ("y", "x"), w.chunk({"channel": 1}), lazy=True)


def test_nothing_computed_until_asked():
    dask = pytest.importorskip("dask", reason="dask is not installed")
    from dask.callbacks import Callback

    started = []
    with Callback(start=lambda dsk: started.append(1)):
        y1 = inx.instance_norm(make().chunk({"batch": 1}), ("y", "x"))
        y2 = inx.instance_norm(make().chunk({"y": 3}), ("y", "x"))
        assert not started
        dask.compute(y1, y2)
        assert started


def test_errors_name_the_dims():
    da = make()
    with pytest.raises(ValueError, match=r"dims \['z'\] are not dims of the data"):
        inx.instance_norm(da, ("y", "z"))
    with pytest.raises(ValueError, match=r"weight has dims \['y'\] that are not instance dims"):
        inx.instance_norm(da, ("y", "x"), weight=xr.DataArray(np.ones(10), dims=("y",)))
    with pytest.raises(ValueError, match="bias has size 2 along dim 'channel'"):
        inx.instance_norm(da, ("y", "x"), bias=xr.DataArray(np.ones(2), dims=("channel",)))
    with pytest.raises(ValueError, match="weight is not aligned"):
        w = xr.DataArray(np.ones(3), dims=("channel",), coords={"channel": ["a", "b", "c"]})
        inx.instance_norm(da, ("y", "x"), weight=w)
    with pytest.raises(ValueError, match="at least one dim"):
        inx.instance_norm(da, ())
    with pytest.raises(ValueError, match="must not repeat"):
        inx.instance_norm(da, ("y", "y"))
    with pytest.raises(TypeError, match="weight must be None or an xarray.DataArray"):
        inx.instance_norm(da, ("y", "x"), weight=np.ones(3))
    with pytest.raises(TypeError, match="da must be an xarray.DataArray"):
        inx.instance_norm(da.values, ("y", "x"))
    with pytest.raises(ValueError, match="eps must be >= 0"):
        inx.instance_norm(da, ("y", "x"), eps=-1)


def test_input_unchanged_and_integers_promote():
    da = make()
    before = da.copy(deep=True)
    inx.instance_norm(da, ("y", "x"))
    xr.testing.assert_identical(da, before)
    ints = xr.DataArray(np.arange(24).reshape(2, 3, 4), dims=("c", "y", "x"))
    y = inx.instance_norm(ints, ("y", "x"))
    assert y.dtype == np.float64


def test_docstring_examples():
    result = doctest.testmod(inx, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
