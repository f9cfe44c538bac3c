"""Dask arrays: lazy, exact at any chunking, same errors as in memory; the distributed
scheduler; the two-pass schedule; the public moments building blocks they rest on."""

from __future__ import annotations

import doctest
import importlib
import threading
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

da = pytest.importorskip("dask.array", reason="dask is not installed")
dask = pytest.importorskip("dask", reason="dask is not installed")

from instnorm_numba import dask as dask_impl  # noqa: E402
from instnorm_numba import (  # noqa: E402
    instance_moments,
    instance_norm,
    instance_norm_backward,
    merge_moments,
    moments_to_stats,
    normalize_with_stats,
)
from instnorm_numba import reference as ref  # noqa: E402

TOL_EPS = {np.dtype(np.float16): 1.0, np.dtype(np.float32): 1.0, np.dtype(np.float64): 4.0}
FLAGS = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS


def rng(seed):
    return np.random.default_rng(zlib.crc32(repr(seed).encode()))


def data(shape, dtype, offset, seed):
    r = rng((shape, dtype, offset, seed))
    dt = np.dtype(dtype)
    if dt.kind in "iu":
        return r.integers(0, 100, shape).astype(dt)
    return (r.standard_normal(shape) * 3 + offset).astype(dt)


def to_channels_last(chunks):
    """Chunks of (N, C, *spatial) reordered for (N, *spatial, C)."""
    return (chunks[0],) + tuple(chunks[2:]) + (chunks[1],)


# (N, C, H, W) = (2, 3, 24, 30): name -> chunks in channels-first order
CHUNKINGS = {
    "one chunk": (2, 3, 24, 30),
    "batch": (1, 3, 24, 30),
    "channel": (2, 1, 24, 30),
    "batch and channel": (1, 2, 24, 30),
    "spatial H": (2, 3, 8, 30),
    "spatial W": (2, 3, 24, 7),
    "spatial both": (1, 1, 7, 11),
    "everything uneven": ((1, 1), (2, 1), (5, 19), (13, 17)),
    "single elements": (2, 3, 1, 30),
    "an empty chunk": ((2,), (3,), (0, 10, 14), (30,)),
}
SHAPE = (2, 3, 24, 30)


def check_forward(x, chunks, channel_axis, weight=None, bias=None, **kw):
    before = x.copy()
    X = da.from_array(x, chunks=chunks)
    y, mean, rstd = instance_norm(
        X, weight, bias, channel_axis=channel_axis, return_stats=True, **kw
    )
    assert isinstance(y, da.Array) and isinstance(mean, da.Array) and isinstance(rstd, da.Array)
    assert y.dtype == ref.result_dtype(x.dtype)
    assert y.chunks == X.chunks
    assert mean.shape == rstd.shape == (x.shape[0], x.shape[channel_axis])
    yv, mv, rv = dask.compute(y, mean, rstd, scheduler="threads")
    assert yv.dtype == y.dtype and yv.shape == x.shape
    exact, em, er = ref.instance_norm(
        x, weight, bias, channel_axis=channel_axis, return_stats=True, exact=True
    )
    scale = None
    if yv.dtype == np.float64:
        scale = ref.accuracy_scale(x, weight, bias, channel_axis=channel_axis)
    err = ref.ulp_error(yv, exact, scale=scale)
    assert err <= TOL_EPS[yv.dtype], f"error {err:.3g} eps"
    big = max(1.0, float(np.abs(x.astype(np.float64)).max()))
    np.testing.assert_allclose(mv, em.astype(np.float64), rtol=1e-13, atol=1e-13 * big)
    np.testing.assert_allclose(rv, er.astype(np.float64), rtol=1e-13)
    np.testing.assert_array_equal(x, before)
    return yv


@pytest.mark.parametrize("name", list(CHUNKINGS))
@pytest.mark.parametrize(
    ("dtype", "offset"),
    [(d, o) for d in ("float16", "float32", "float64") for o in (0.0, 1e4)] + [("int32", 0.0)],
)
@pytest.mark.parametrize("channel_axis", [1, -1])
def test_forward_any_chunking(name, dtype, offset, channel_axis):
    x = data(SHAPE, dtype, offset, (name, channel_axis))
    chunks = CHUNKINGS[name]
    if channel_axis == -1:
        x = np.ascontiguousarray(np.moveaxis(x, 1, -1))
        chunks = to_channels_last(chunks)
    r = rng((name, dtype))
    check_forward(x, chunks, channel_axis, r.uniform(0.5, 2, 3), r.standard_normal(3))


@pytest.mark.parametrize(
    "chunks", [(1, 5, 2, 6, 8), (1, 2, 2, 6, 4), (2, 3, 5, 3, 8), (1, 1, 4, 3, 2)]
)
def test_forward_middle_channel_axis_3d(chunks):
    x = data((2, 5, 3, 6, 8), "float64", 1e4, chunks)  # channel axis 2, C = 3
    check_forward(x, chunks, 2)


def test_forward_thousand_parts_per_instance():
    # 1000 parts per instance: three levels of the merge tree (SPLIT_EVERY = 16)
    x = data((1, 2, 4000), "float64", 1e4, "thousand") * 1e-3
    check_forward(x, (1, 1, 4), 1)
    check_forward(x.astype(np.float32), (1, 2, 3), 1)


@st.composite
def chunked_inputs(draw):
    ndim = draw(st.integers(3, 4))
    shape = tuple(draw(st.integers(1, 9)) for _ in range(ndim))
    chunks = []
    for s in shape:
        cuts = sorted(draw(st.sets(st.integers(1, s - 1), max_size=3))) if s > 1 else []
        edges = [0, *cuts, s]
        chunks.append(tuple(b - a for a, b in zip(edges[:-1], edges[1:], strict=True)))
    dtype = draw(st.sampled_from(["float16", "float32", "float64"]))
    offset = draw(st.sampled_from([0.0, 1e4, -3e3]))
    channel_axis = draw(st.sampled_from([1, -1]))
    seed = draw(st.integers(0, 2**16))
    return shape, tuple(chunks), dtype, offset, channel_axis, seed


@settings(max_examples=40, deadline=None)
@given(chunked_inputs())
def test_forward_random_chunkings(case):
    shape, chunks, dtype, offset, channel_axis, seed = case
    x = data(shape, dtype, offset if dtype != "float16" else offset / 100, seed)
    check_forward(x, chunks, channel_axis)


def test_forward_byteswapped_and_fortran():
    x = np.asfortranarray(data(SHAPE, ">f8", 1e4, "bs"))
    check_forward(x, (1, 2, 8, 13), 1)


def test_backward_any_chunking():
    for name in ["one chunk", "batch and channel", "spatial both", "everything uneven"]:
        for dtype in ["float32", "float64", "float16"]:
            for channel_axis in (1, -1):
                x = data(SHAPE, dtype, 1e4, (name, "bwd"))
                dy = data(SHAPE, dtype, 0.0, (name, "dy"))
                chunks = CHUNKINGS[name]
                if channel_axis == -1:
                    x, dy = (np.ascontiguousarray(np.moveaxis(a, 1, -1)) for a in (x, dy))
                    chunks = to_channels_last(chunks)
                w = rng(name).uniform(0.5, 2, 3)
                _, mean, rstd = instance_norm(x, w, channel_axis=channel_axis, return_stats=True)
                X, DY = da.from_array(x, chunks=chunks), da.from_array(dy, chunks=chunks)
                dx, gw, gb = instance_norm_backward(DY, X, mean, rstd, w, channel_axis=channel_axis)
                assert all(isinstance(a, da.Array) for a in (dx, gw, gb))
                assert gw.shape == gb.shape == (3,) and dx.chunks == X.chunks
                dxv, gwv, gbv = dask.compute(dx, gw, gb)
                assert dxv.dtype == x.dtype
                edx, egw, egb = ref.instance_norm_backward(
                    dy, x, w, channel_axis=channel_axis, exact=True
                )
                scale = None
                if dxv.dtype == np.float64:
                    scale = ref.backward_accuracy_scale(dy, x, w, channel_axis=channel_axis)
                err = ref.ulp_error(dxv, edx, scale=scale)
                assert err <= TOL_EPS[dxv.dtype], (name, dtype, channel_axis, err)
                # the same sums as in memory (float64, a different order of additions)
                mdx, mgw, mgb = instance_norm_backward(
                    dy, x, mean, rstd, w, channel_axis=channel_axis
                )
                np.testing.assert_allclose(gwv, mgw, rtol=1e-12, atol=1e-9)
                np.testing.assert_allclose(gbv, mgb, rtol=1e-12, atol=1e-9)


def test_backward_takes_lazy_stats_and_numpy_grad():
    x = data(SHAPE, "float32", 0.0, "lazy stats")
    dy = data(SHAPE, "float32", 0.0, "lazy dy")
    X = da.from_array(x, chunks=(1, 3, 8, 30))
    _, mean, rstd = instance_norm(X, return_stats=True)
    dx, gw, gb = instance_norm_backward(dy, X, mean, rstd)  # dy: NumPy
    ref_dx, ref_gw, ref_gb = instance_norm_backward(dy, x, *instance_norm(x, return_stats=True)[1:])
    np.testing.assert_allclose(dx.compute(), ref_dx, rtol=0, atol=1e-6)
    np.testing.assert_allclose(gw.compute(), ref_gw, rtol=1e-12)


def test_forward_matches_in_memory_bitwise_on_single_spatial_chunks():
    # one chunk of the spatial axes runs the in-memory function on it: identical results
    x = data(SHAPE, "float32", 5.0, "bitwise")
    y = instance_norm(da.from_array(x, chunks=(1, 2, 24, 30))).compute()
    np.testing.assert_array_equal(y, instance_norm(x))


# --------------------------------------------------------------------------------------------
# laziness


class Counter:
    """A pass-through map_blocks function counting the non-empty blocks it produced."""

    def __init__(self):
        self.n = 0
        self.lock = threading.Lock()

    def __call__(self, block):
        if block.size:
            with self.lock:
                self.n += 1
        return block


def counted(x, chunks):
    c = Counter()
    X = da.from_array(x, chunks=chunks).map_blocks(c, meta=np.empty((0,) * x.ndim, x.dtype))
    return X, c


@pytest.mark.parametrize("chunks", [(1, 3, 24, 30), (1, 1, 7, 11)])
def test_nothing_is_computed_until_compute(chunks):
    from dask.callbacks import Callback

    x = data(SHAPE, "float32", 1.0, "lazy")
    X, c = counted(x, chunks)
    started = []
    with Callback(start=lambda dsk: started.append(1)):
        y, mean, rstd = instance_norm(X, return_stats=True)
        dx, gw, gb = instance_norm_backward(y, X, mean, rstd)
        yr = instance_norm(X, running_mean=np.zeros(3), running_var=np.ones(3),
                           use_input_stats=False)  # fmt: skip
        assert started == [] and c.n == 0  # no scheduler ran while the graphs were built
        dask.compute(y, mean, rstd, dx, gw, gb, yr)
        assert c.n > 0 and started


def test_two_pass_rereads_the_source_one_pass_does_not():
    x = data(SHAPE, "float64", 1e4, "two pass")
    chunks = (1, 3, 8, 10)
    nblocks = 2 * 3 * 3
    X, c = counted(x, chunks)
    y2 = dask_impl.instance_norm(X, two_pass=True).compute()
    assert c.n == 2 * nblocks  # statistics, then the apply re-reads every block
    X, c = counted(x, chunks)
    y1 = dask_impl.instance_norm(X, two_pass=False).compute()
    assert c.n == nblocks
    np.testing.assert_array_equal(y1, y2)


def test_running_statistics_are_computed_at_the_call():
    """The decision: an in-place update of NumPy running buffers computes the statistics at
    the call (one pass), and ``y`` is then a lazy normalization with them."""
    x = data(SHAPE, "float32", 2.0, "running")
    for chunks in [(1, 3, 24, 30), (1, 2, 5, 30)]:
        X, c = counted(x, chunks)
        rm, rv = np.full(3, 0.5), np.full(3, 2.0)
        y = instance_norm(X, running_mean=rm, running_var=rv, momentum=0.3)
        assert c.n == X.npartitions  # one pass, for the statistics
        erm, erv = np.full(3, 0.5), np.full(3, 2.0)
        ey = ref.instance_norm(x, running_mean=erm, running_var=erv, momentum=0.3, exact=True)
        np.testing.assert_allclose(rm, erm, rtol=1e-13)
        np.testing.assert_allclose(rv, erv, rtol=1e-13)
        assert isinstance(y, da.Array)
        assert ref.ulp_error(y.compute(), ey) <= 1.0


def test_eval_mode_with_dask_running_statistics_is_lazy():
    x = data(SHAPE, "float64", 1.0, "eval")
    rm, rv = rng("rm").standard_normal(3), rng("rv").uniform(0.5, 2, 3)
    X, c = counted(x, (1, 1, 8, 30))
    y, mean, rstd = instance_norm(
        X, running_mean=da.from_array(rm), running_var=da.from_array(rv),
        use_input_stats=False, return_stats=True,
    )  # fmt: skip
    assert c.n == 0
    ey = ref.instance_norm(x, running_mean=rm, running_var=rv, use_input_stats=False, exact=True)
    assert ref.ulp_error(y.compute(), ey) <= 4.0
    np.testing.assert_allclose(mean.compute(), np.broadcast_to(rm, (2, 3)))


# --------------------------------------------------------------------------------------------
# errors: the in-memory function's, with the same type and message


def _err(fn):
    try:
        fn()
    except (TypeError, ValueError) as exc:
        return type(exc), str(exc)
    return None


X64 = np.zeros((2, 3, 4, 5))

ERRORS = {
    "2-D x": lambda m: instance_norm(m(np.zeros((3, 4)))),
    "complex x": lambda m: instance_norm(m(np.zeros((2, 3, 4), complex))),
    "channel_axis 0": lambda m: instance_norm(m(X64), channel_axis=0),
    "channel_axis out of range": lambda m: instance_norm(m(X64), channel_axis=7),
    "weight shape": lambda m: instance_norm(m(X64), np.ones(4)),
    "bias dtype": lambda m: instance_norm(m(X64), None, np.array(["a", "b", "c"])),
    "eps negative": lambda m: instance_norm(m(X64), eps=-1.0),
    "eps bool": lambda m: instance_norm(m(X64), eps=True),
    "running_mean alone": lambda m: instance_norm(m(X64), running_mean=np.zeros(3)),
    "eval without running": lambda m: instance_norm(m(X64), use_input_stats=False),
    "running_mean shape": lambda m: instance_norm(
        m(X64), running_mean=np.zeros(2), running_var=np.ones(2)
    ),
    "running_mean a list": lambda m: instance_norm(
        m(X64), running_mean=[0.0, 0.0, 0.0], running_var=np.ones(3)
    ),
    "one spatial element": lambda m: instance_norm(
        m(np.zeros((2, 3, 1))), running_mean=np.zeros(3), running_var=np.ones(3)
    ),
    "return_stats not bool": lambda m: instance_norm(m(X64), return_stats=1),
    "bwd dy shape": lambda m: instance_norm_backward(
        m(np.zeros((2, 3, 4, 4))), m(X64), np.zeros((2, 3)), np.ones((2, 3))
    ),
    "bwd dy dtype": lambda m: instance_norm_backward(
        m(X64.astype(np.float32)), m(X64), np.zeros((2, 3)), np.ones((2, 3))
    ),
    "bwd mean shape": lambda m: instance_norm_backward(
        m(X64), m(X64), np.zeros((3, 2)), np.ones((2, 3))
    ),
    "bwd rstd dtype": lambda m: instance_norm_backward(
        m(X64), m(X64), np.zeros((2, 3)), np.ones((2, 3), int)
    ),
    "bwd weight shape": lambda m: instance_norm_backward(
        m(X64), m(X64), np.zeros((2, 3)), np.ones((2, 3)), np.ones(2)
    ),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_errors_are_the_in_memory_ones(case):
    in_memory = _err(lambda: ERRORS[case](np.asarray))
    assert in_memory is not None, "the case must be an error in memory"
    lazy = _err(lambda: ERRORS[case](lambda a: da.from_array(a, chunks=2)))
    assert lazy == in_memory


def test_dask_parameters_are_checked_too():
    X = da.from_array(X64, chunks=2)
    with pytest.raises(ValueError, match=r"weight must have shape \(3,\) to match x; got shape"):
        instance_norm(X, da.ones(4))
    with pytest.raises(TypeError, match="mean must have a floating dtype"):
        instance_norm_backward(X, X, da.zeros((2, 3), dtype=int), np.ones((2, 3)))


def test_out_is_refused_with_a_clear_error():
    X = da.from_array(X64, chunks=2)
    with pytest.raises(TypeError, match="out= is not supported when x is a Dask array"):
        instance_norm(X, out=np.empty_like(X64))
    with pytest.raises(TypeError, match="out= is not supported when x or grad_output"):
        instance_norm_backward(X, X, np.zeros((2, 3)), np.ones((2, 3)), out=np.empty_like(X64))


def test_unknown_chunk_sizes_are_refused():
    X = da.from_array(X64, chunks=2)
    Y = X[X[:, 0, 0, 0] >= 0]  # unknown length along axis 0
    with pytest.raises(ValueError, match="unknown chunk sizes"):
        instance_norm(Y)


def test_numpy_users_see_no_change():
    x = data(SHAPE, "float32", 0.0, "numpy")
    y = instance_norm(x)
    assert type(y) is np.ndarray


# --------------------------------------------------------------------------------------------
# the distributed scheduler


def test_local_cluster_two_processes_same_values():
    distributed = pytest.importorskip("distributed", reason="distributed is not installed")
    x = data(SHAPE, "float32", 1e4, "cluster")
    dy = data(SHAPE, "float32", 0.0, "cluster dy")
    X = da.from_array(x, chunks=(1, 2, 7, 30))
    y, mean, rstd = instance_norm(X, return_stats=True)
    dx, gw, gb = instance_norm_backward(da.from_array(dy, chunks=X.chunks), X, mean, rstd)
    threaded = dask.compute(y, mean, rstd, dx, gw, gb, scheduler="threads")
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster, distributed.Client(cluster) as client:  # fmt: skip
        on_cluster = client.compute([y, mean, rstd, dx, gw, gb], sync=True)
        assert len(client.scheduler_info()["workers"]) == 2
    for a, b in zip(on_cluster, threaded, strict=True):
        np.testing.assert_array_equal(a, b)
    ym, mm, rm = instance_norm(x, return_stats=True)
    assert ref.ulp_error(threaded[0], ref.instance_norm(x, exact=True)) <= 1.0
    np.testing.assert_allclose(threaded[1], mm, rtol=1e-15)
    np.testing.assert_allclose(threaded[0], ym, rtol=0, atol=2e-6)


# --------------------------------------------------------------------------------------------
# the public building blocks


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("channel_axis", [1, -1])
def test_moments_of_parts_merge_to_the_whole(dtype, channel_axis):
    x = data((2, 3, 40, 6), dtype, 1e4, ("parts", dtype))
    if channel_axis == -1:
        x = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    sl = (lambda a, b: x[:, :, a:b]) if channel_axis == 1 else (lambda a, b: x[:, a:b])
    cuts = [0, 1, 9, 10, 33, 40]
    first = instance_moments(sl(0, 1), channel_axis=channel_axis)
    parts = [first] + [
        instance_moments(sl(a, b), channel_axis=channel_axis, shift=first.shift)
        for a, b in zip(cuts[1:-1], cuts[2:], strict=True)
    ]
    m = merge_moments(*parts)
    assert m.count.dtype == np.int64 and (m.count == 40 * 6).all()
    mean, rstd = moments_to_stats(m)
    _, em, er = ref.instance_norm(x, channel_axis=channel_axis, return_stats=True)
    np.testing.assert_allclose(mean, em, rtol=1e-15)
    np.testing.assert_allclose(rstd, er, rtol=1e-13)
    y = normalize_with_stats(x, m.mean_offset, rstd, shift=m.shift, channel_axis=channel_axis)
    exact = ref.instance_norm(x, channel_axis=channel_axis, exact=True)
    scale = ref.accuracy_scale(x, channel_axis=channel_axis) if dtype == "float64" else None
    assert ref.ulp_error(y, exact, scale=scale) <= TOL_EPS[y.dtype]


def test_merge_rebases_parts_with_other_shifts():
    x = data((1, 2, 50), "float64", 1e4, "rebase")
    a, b = instance_moments(x[..., :20]), instance_moments(x[..., 20:])  # own shifts
    assert not np.array_equal(a.shift, b.shift)
    m = merge_moments(a, b)
    whole = instance_moments(x, shift=a.shift)
    np.testing.assert_allclose(m.mean_offset, whole.mean_offset, rtol=1e-14, atol=1e-12)
    np.testing.assert_allclose(m.m2, whole.m2, rtol=1e-14)


def test_moments_api_errors():
    x = np.zeros((2, 3, 4))
    with pytest.raises(ValueError, match=r"shift must have shape \(2, 3\)"):
        instance_moments(x, shift=np.zeros(3))
    with pytest.raises(ValueError, match="shift must be finite"):
        instance_moments(x, shift=np.full((2, 3), np.nan))
    with pytest.raises(TypeError, match="parts\\[1\\] must be a Moments"):
        merge_moments(instance_moments(x), (1, 2, 3, 4))
    with pytest.raises(ValueError, match="merge moments of the same instances"):
        merge_moments(instance_moments(x), instance_moments(np.zeros((1, 3, 4))))
    with pytest.raises(TypeError, match="at least one"):
        merge_moments()
    with pytest.raises(ValueError, match=r"rstd must have shape \(2, 3\)"):
        normalize_with_stats(x, np.zeros((2, 3)), np.ones(3))


@pytest.mark.parametrize("module", ["instnorm_numba._moments_api", "instnorm_numba.dask"])
def test_docstring_examples(module):
    result = doctest.testmod(importlib.import_module(module), optionflags=FLAGS)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.slow
def test_memory_script_runs_at_small_scale():
    """scripts/dask_memory.py (the measurement of peak memory per worker) at a small size:
    the two-pass run on a 2-worker LocalCluster with a memory limit completes and the result
    is normalized (memory itself is measured by the script, never asserted)."""
    pytest.importorskip("distributed", reason="distributed is not installed")
    pytest.importorskip("psutil", reason="psutil is not installed")
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "dask_memory.py"
    spec = importlib.util.spec_from_file_location("dask_memory", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = mod.measure(
        limit_mib=512, factor=0.125, n_workers=2, channels=2, chunk_mib=4, schedules=("two-pass",)
    )
    r = res["two-pass"]
    assert r["status"] == "ok"
    assert len(r["peak_rss_mib"]) == 2
    assert r["max_abs_mean"] < 1e-6
    assert r["max_abs_var_minus_1"] < 1e-4  # var / (var + eps) with var = 4


@pytest.mark.parametrize("kw", [{"mask": np.ones((2, 5), bool)}, {"lengths": [3, 5]}])
def test_masks_with_a_dask_input_are_refused_clearly(kw):
    x = da.ones((2, 3, 5), chunks=(1, 3, 5))
    with pytest.raises(TypeError, match=r"^(mask|lengths)= is not supported with a Dask array x"):
        instance_norm(x, **kw)
    _, mean, rstd = instance_norm(np.ones((2, 3, 5)), return_stats=True)
    with pytest.raises(TypeError, match=r"is not supported with a Dask array x"):
        instance_norm_backward(x, x, mean, rstd, **kw)
