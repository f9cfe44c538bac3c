"""instance_norm_backward: against the extended-precision reference derivative, central finite
differences of the forward, PyTorch autograd golden values, and the forward's edge cases."""

from __future__ import annotations

import pathlib

import numba
import numpy as np
import pytest
from conftest import HYPOTHESIS_SHORT, TOL_EPS, assert_matches_reference, rng
from hypothesis import given
from hypothesis import strategies as st

from instnorm_numba import _api, instance_norm, instance_norm_backward
from instnorm_numba import reference as ref

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden" / "torch_backward.npz"

# the accuracy guarantee for grad_input, in machine epsilons of the result dtype, relative to
# max(1, |dx|); for float64 relative to max(1, |dx|, backward_scale) (below): the size of the
# terms whose sum is dx.  Measured: <= 0.5 eps for float16/float32 (one rounding of a float64
# result), <= 3.5 eps for float64, offsets up to 1e4 included (conftest.TOL_EPS).


def backward_scale(dy, x, weight, channel_axis, eps=1e-5):
    return ref.backward_accuracy_scale(dy, x, weight, eps=eps, channel_axis=channel_axis)


def forward_stats(x, weight=None, channel_axis=1, eps=1e-5):
    _, mean, rstd = instance_norm(x, weight, channel_axis=channel_axis, eps=eps, return_stats=True)
    return mean, rstd


def check(dy, x, *, weight=None, channel_axis=1, eps=1e-5, **kw):
    """Ours against the reference: the guarantee, dtypes, shapes, and untouched inputs."""
    mean, rstd = forward_stats(x, weight, channel_axis, eps)
    before = [np.array(a, copy=True) for a in (dy, x, mean, rstd)]
    dx, gw, gb = instance_norm_backward(dy, x, mean, rstd, weight, channel_axis=channel_axis, **kw)
    edx, egw, egb = ref.instance_norm_backward(
        before[0], before[1], weight, eps=eps, channel_axis=channel_axis, exact=True
    )
    assert dx.dtype == ref.result_dtype(np.asarray(x).dtype)
    assert dx.shape == np.shape(x)
    assert gw.dtype == gb.dtype == np.float64
    C = np.shape(x)[channel_axis]
    assert gw.shape == gb.shape == (C,)
    scale = backward_scale(before[0], before[1], weight, channel_axis, eps)
    err = assert_matches_reference(dx, edx, scale=scale if dx.dtype == np.float64 else None)
    for a, b in zip((dy, x, mean, rstd), before, strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)  # inputs unchanged (NaNs equal too)
    # grad_weight / grad_bias: float64 sums, a few float64 eps of the sum of magnitudes
    xl, axis, _ = ref._to_ncl(before[1], channel_axis)
    dyl = np.abs(np.moveaxis(np.asarray(before[0]), axis, 1).reshape(xl.shape).astype(float))
    with np.errstate(all="ignore"):
        xhat = np.abs((xl - mean[..., None]) * rstd[..., None]).astype(float)
        mag_b = dyl.sum(axis=(0, 2))
        mag_w = (dyl * xhat).sum(axis=(0, 2))
    tol = 8 * np.finfo(np.float64).eps
    for ours, exact, mag in ((gb, egb, mag_b), (gw, egw, mag_w)):
        exact = exact.astype(float)
        np.testing.assert_array_equal(np.isnan(ours), np.isnan(exact))
        ok = ~np.isnan(exact)
        assert np.all(np.abs(ours - exact)[ok] <= tol * mag[ok]), (ours, exact)
    return dx, gw, gb, err


def grad_dtype(x_dtype):
    """The dtype grad_output must have: the forward's result dtype."""
    return ref.result_dtype(np.dtype(x_dtype))


def make(r, shape, dtype, offset=0.0):
    dt = np.dtype(dtype)
    if dt.kind == "b":
        return r.random(shape) > 0.5
    if dt.kind in "iu":
        return r.integers(0, 100, shape).astype(dt)
    return (r.standard_normal(shape) * 3 + offset).astype(dt)


# ----------------------------------------------------------------------------------------------
# accuracy across dtypes, layouts, channel axes and offsets

DTYPES = ["float16", "float32", "float64", ">f4", ">f8", "int32", "uint8", "bool"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channel_axis", [1, -1])
@pytest.mark.parametrize("shape", [(2, 3, 50), (2, 3, 7, 9), (2, 4, 3, 5, 6)])
@pytest.mark.parametrize("affine", [False, True])
def test_dtypes_axes_ndim(dtype, channel_axis, shape, affine):
    r = rng((dtype, channel_axis, shape, affine))
    x = make(r, shape, dtype, offset=1.0)
    dy = (r.standard_normal(shape) + 0.5).astype(grad_dtype(dtype))
    w = r.standard_normal(shape[channel_axis]) if affine else None
    check(dy, x, weight=w, channel_axis=channel_axis)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("offset", [0.0, 1e2, 1e4, -1e4])
@pytest.mark.parametrize("channel_axis", [1, -1])
@pytest.mark.parametrize("path", ["serial", "parallel", "split"])
def test_offset_data_keeps_every_digit(dtype, offset, channel_axis, path, monkeypatch):
    """Data far from zero: x - mean in float64, re-centred, on every code path."""
    shape = (2, 3, 40, 33) if channel_axis == 1 else (2, 40, 33, 3)
    r = rng((dtype, offset, channel_axis))
    x = make(r, shape, dtype, offset=offset)
    dy = (r.standard_normal(shape) * 2 + 1).astype(dtype)
    w = r.uniform(-2, 2, 3)
    forced = {"serial": (False, 0), "parallel": (True, 0), "split": (True, 5)}[path]
    monkeypatch.setattr(_api, "plan", lambda groups, length, total: forced)
    check(dy, x, weight=w, channel_axis=channel_axis)


def test_offset_mean_rounding_is_undone():
    """float64 data at 1e4: the forward's mean is off by ~1e4 eps of the noise after rounding
    to float64; the naive formula would carry that into dx, the re-centring does not."""
    r = rng(7)
    x = 1e4 + r.standard_normal((1, 2, 4096)) * 1e-3
    dy = 1.0 + r.standard_normal(x.shape)
    mean, rstd = forward_stats(x)
    dx, _, _ = instance_norm_backward(dy, x, mean, rstd)
    exact, _, _ = ref.instance_norm_backward(dy, x, exact=True)
    xhat = (x - mean[..., None]) * rstd[..., None]
    naive = rstd[..., None] * (
        dy - dy.mean(-1, keepdims=True) - xhat * (dy * xhat).mean(-1, keepdims=True)
    )
    scale = backward_scale(dy, x, None, 1)
    assert ref.ulp_error(dx, exact, scale=scale) <= TOL_EPS[np.dtype(np.float64)]
    assert ref.ulp_error(naive, exact, scale=scale) > 100  # what the re-centring buys


@pytest.mark.parametrize(
    "dtype, offset",
    [("float16", 0.0), ("float16", 1e3), ("float32", 0.0), ("float32", 1e3), ("float32", 3e5)],
)
@pytest.mark.parametrize("channel_axis", [1, -1])
def test_folded_and_exact_apply(dtype, offset, channel_axis):
    """float32/float16 instances long enough for the folded apply (``dx = a*dy - k*x + z``),
    and, with dy following x (a large k) far from zero, past FOLD_LIMIT into the exact form."""
    from instnorm_numba import _kernels as K

    L = 2 * K.BWD_FOLD_MIN
    shape = (2, 3, L) if channel_axis == 1 else (2, L, 3)
    r = rng((dtype, offset, channel_axis, "fold"))
    spread = 3.0 if offset < 1e5 else 1.0  # 3e5 +- 1: |k * mean| ~ 3e5 > FOLD_LIMIT
    x = (r.standard_normal(shape) * spread + offset).astype(dtype)
    xf = np.asarray(x, dtype=float)
    centred = (xf - xf.mean(axis=-1 if channel_axis == 1 else 1, keepdims=True)) / xf.std(
        axis=-1 if channel_axis == 1 else 1, keepdims=True
    )
    dy = (centred + 0.3 * r.standard_normal(shape)).astype(dtype)
    mean, rstd = forward_stats(x, channel_axis=channel_axis)
    # |k * mean| with k = rstd**2 * mean(dy * xhat): which side of FOLD_LIMIT this case is on
    xhat = centred if channel_axis == 1 else np.moveaxis(centred, 1, -1)
    dyl = np.asarray(dy, float) if channel_axis == 1 else np.moveaxis(np.asarray(dy, float), 1, -1)
    km = np.abs(rstd**2 * (dyl * xhat).mean(axis=-1) * mean)
    assert (km.max() > K.FOLD_LIMIT) == (offset > 1e5)
    check(dy, x, channel_axis=channel_axis)


@pytest.mark.parametrize("channel_axis", [1, -1])
@pytest.mark.parametrize("nchunks", [2, 3, 7, 64])
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_split_instances_agree_with_fused(channel_axis, nchunks, dtype, monkeypatch):
    """The split path (chunk sums per thread, added per instance) on small inputs."""
    shape = (1, 3, 300, 11) if channel_axis == 1 else (1, 300, 11, 3)
    r = rng((channel_axis, nchunks, dtype))
    x = make(r, shape, dtype, offset=5.0)
    dy = r.standard_normal(shape).astype(dtype)
    w = r.standard_normal(3)
    monkeypatch.setattr(_api, "plan", lambda groups, length, total: (True, nchunks))
    split = check(dy, x, weight=w, channel_axis=channel_axis)
    monkeypatch.setattr(_api, "plan", lambda groups, length, total: (False, 0))
    fused = check(dy, x, weight=w, channel_axis=channel_axis)
    tol = np.finfo(dtype).eps * np.maximum(1, np.abs(fused[0].astype(float)))
    assert np.all(np.abs(split[0].astype(float) - fused[0].astype(float)) <= 2 * tol)


@pytest.mark.parametrize(
    "shape, channel_axis",
    [((1, 3, 2048, 2048), 1), ((1, 256, 256, 64), -1), ((2, 1, 3_000_000), 1)],
)
def test_few_long_instances_are_split_across_threads(shape, channel_axis, monkeypatch):
    """1x3x2048x2048 on two cores: every thread gets chunks of the three instances."""
    monkeypatch.setattr(_api, "num_threads", lambda: 2)
    x = np.empty(0)  # the plan looks only at the layout's sizes
    N, C = shape[0], shape[channel_axis]
    spatial = tuple(s for i, s in enumerate(shape) if i not in (0, channel_axis % len(shape)))
    kind = "cf" if channel_axis == 1 else "cl"
    lay = _api.Layout(
        kind, channel_axis % len(shape), N, C, int(np.prod(spatial)), spatial, x, False
    )
    parallel, nch = _api.layout_plan(lay)
    assert parallel
    assert nch >= 2
    tasks = (N * C if kind == "cf" else N) * nch
    assert tasks >= 4  # at least two per thread


def test_many_instances_are_not_split(monkeypatch):
    monkeypatch.setattr(_api, "num_threads", lambda: 2)
    lay = _api.Layout("cf", 1, 16, 80, 3000, (3000,), np.empty(0), False)
    assert _api.layout_plan(lay) == (True, 0)
    lay = _api.Layout("cf", 1, 1, 2, 64, (64,), np.empty(0), False)
    assert _api.layout_plan(lay) == (False, 0)  # too small for a parallel launch


def test_large_split_instance_end_to_end():
    """A real split run (no monkeypatch) on a long instance, against the reference."""
    r = rng(11)
    x = (r.standard_normal((1, 2, 1 << 17)) + 100).astype(np.float32)
    dy = r.standard_normal(x.shape).astype(np.float32)
    check(dy, x, weight=np.array([0.5, -2.0]))


@pytest.mark.parametrize("threads", [1, 2])
def test_thread_count_agrees(threads):
    r = rng(threads)
    x = r.standard_normal((4, 8, 64, 64)).astype(np.float32)
    dy = r.standard_normal(x.shape).astype(np.float32)
    old = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        check(dy, x, weight=r.standard_normal(8))
    finally:
        numba.set_num_threads(old)


# ----------------------------------------------------------------------------------------------
# finite differences and PyTorch


def _fd_case(channel_axis):
    r = rng(("fd", channel_axis))
    shape = (2, 3, 4, 5) if channel_axis == 1 else (2, 4, 5, 3)
    x = r.standard_normal(shape) * 2 + 0.5
    dy = r.standard_normal(shape)
    w = r.uniform(-2, 2, 3)
    b = r.uniform(-1, 1, 3)
    return x, dy, w, b


@pytest.mark.parametrize("channel_axis", [1, -1])
def test_central_finite_differences(channel_axis):
    """d/dp sum(dy * instance_norm(x, w, b)) by central differences, for every x, w and b."""
    x, dy, w, b = _fd_case(channel_axis)

    def loss(x_, w_, b_):
        return float(np.sum(dy * instance_norm(x_, w_, b_, channel_axis=channel_axis)))

    mean, rstd = forward_stats(x, w, channel_axis)
    dx, gw, gb = instance_norm_backward(dy, x, mean, rstd, w, channel_axis=channel_axis)

    def fd(f, p):
        g = np.empty_like(p)
        h = 1e-6
        for i in np.ndindex(p.shape):
            old = p[i]
            p[i] = old + h
            up = f()
            p[i] = old - h
            down = f()
            p[i] = old
            g[i] = (up - down) / (2 * h)
        return g

    xc, wc, bc = x.copy(), w.copy(), b.copy()
    f = lambda: loss(xc, wc, bc)  # noqa: E731
    np.testing.assert_allclose(dx, fd(f, xc), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(gw, fd(f, wc), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(gb, fd(f, bc), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("channel_axis", [1, -1])
def test_reference_matches_finite_differences(channel_axis):
    """The oracle itself, checked independently of our kernels."""
    x, dy, w, b = _fd_case(channel_axis)
    dx, gw, gb = ref.instance_norm_backward(dy, x, w, channel_axis=channel_axis)
    h = 1e-6
    for i in [(0, 0, 0, 0), (1, 2, 3, 1), (0, 1, 2, 2), (1, 2, 1, 0)]:
        up, down = x.copy(), x.copy()
        up[i] += h
        down[i] -= h
        fd = np.sum(
            dy
            * (
                ref.instance_norm(up, w, b, channel_axis=channel_axis)
                - ref.instance_norm(down, w, b, channel_axis=channel_axis)
            )
        ) / (2 * h)
        assert abs(dx[i] - fd) <= 1e-6 * max(1, abs(fd))
    xn = np.moveaxis(ref.instance_norm(x, channel_axis=channel_axis), channel_axis, 1)
    dyn = np.moveaxis(dy, channel_axis, 1)
    np.testing.assert_allclose(gw, (dyn * xn).sum(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(gb, dyn.sum(axis=(0, 2, 3)), rtol=1e-12)


_GOLD = np.load(GOLDEN)
_GOLD_CASES = sorted({k.split("/", 1)[0] for k in _GOLD.files})


def test_golden_file_is_there():
    assert len(_GOLD_CASES) == 24


@pytest.mark.parametrize("channel_axis", [1, -1])
@pytest.mark.parametrize("name", _GOLD_CASES)
def test_torch_golden(name, channel_axis):
    g = {k.split("/", 1)[1]: _GOLD[k] for k in _GOLD.files if k.startswith(name + "/")}
    x, dy, eps = g["x"], g["grad_output"], float(g["eps"])
    w = g.get("weight")
    if channel_axis == -1:
        x, dy = np.moveaxis(x, 1, -1).copy(), np.moveaxis(dy, 1, -1).copy()
    y, mean, rstd = instance_norm(
        x, w, g.get("bias"), eps=eps, channel_axis=channel_axis, return_stats=True
    )
    dx, gw, gb = instance_norm_backward(dy, x, mean, rstd, w, channel_axis=channel_axis)
    if channel_axis == -1:
        dx = np.moveaxis(dx, -1, 1)
    # torch forms xhat from rounded statistics: at offset 1e4 it loses ~|x| * rstd epsilons
    # (measured up to 7.7e3 eps in float64), ours are within 1-4 eps of the exact reference
    # there (test_offset_data_keeps_every_digit).  Relative to the size of dx's terms.
    tiny = np.finfo(x.dtype).eps
    off = float(np.max(np.abs(g["x"]))) * rstd.max()  # torch loses |x|/std digits of xhat
    scale = backward_scale(g["grad_output"], g["x"], w, 1, eps).astype(float)
    assert np.max(np.abs(dx - g["grad_input"]) / np.maximum(1, scale)) <= 4 * tiny * max(1, off)
    mag = np.abs(g["grad_output"].astype(float)).sum(axis=tuple(i for i in range(x.ndim) if i != 1))
    np.testing.assert_allclose(gb, g["grad_bias"], rtol=0, atol=4 * tiny * mag.max())
    np.testing.assert_allclose(
        gw, g["grad_weight"], rtol=0, atol=4 * tiny * max(1, off) * mag.max()
    )


# ----------------------------------------------------------------------------------------------
# edge cases of the forward


def _strided_views(a):
    return {
        "fortran": np.asfortranarray(a),
        "strided": np.repeat(a, 2, axis=-1)[..., ::2],
        "reversed": a[::-1, :, ::-1],
        "transposed_spatial": np.ascontiguousarray(np.swapaxes(a, -1, -2)).swapaxes(-1, -2),
    }


@pytest.mark.parametrize("layout_x", ["fortran", "strided", "reversed", "transposed_spatial"])
@pytest.mark.parametrize("layout_dy", ["contiguous", "fortran", "reversed"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_any_strides(layout_x, layout_dy, dtype):
    r = rng((layout_x, layout_dy, dtype))
    x0 = make(r, (3, 4, 6, 5), dtype, offset=2.0)
    dy0 = r.standard_normal(x0.shape).astype(dtype)
    x = _strided_views(x0)[layout_x]
    dy = dy0 if layout_dy == "contiguous" else _strided_views(dy0)[layout_dy]
    w = r.standard_normal(4)
    dx, gw, gb, _ = check(dy, x, weight=w)
    # the same numbers as from contiguous copies of the same values
    xc, dyc = np.ascontiguousarray(x), np.ascontiguousarray(dy)
    mean, rstd = forward_stats(xc)
    dxc, gwc, gbc = instance_norm_backward(dyc, xc, mean, rstd, w)
    np.testing.assert_array_equal(dx, dxc)
    np.testing.assert_array_equal(gw, gwc)


@pytest.mark.parametrize("channel_axis", [2, -2])
def test_middle_channel_axis(channel_axis):
    r = rng(channel_axis)
    x = r.standard_normal((2, 5, 4, 6))
    dy = r.standard_normal(x.shape)
    dx, _, _, _ = check(dy, x, weight=r.standard_normal(4), channel_axis=channel_axis)
    assert dx.flags.c_contiguous  # as the forward: a C-ordered result


def test_read_only_inputs():
    r = rng(3)
    x = r.standard_normal((2, 3, 40)).astype(np.float32)
    dy = r.standard_normal(x.shape).astype(np.float32)
    mean, rstd = forward_stats(x)
    for a in (x, dy, mean, rstd):
        a.flags.writeable = False
    dx, _, _ = instance_norm_backward(dy, x, mean, rstd)
    exact, _, _ = ref.instance_norm_backward(dy, x, exact=True)
    assert ref.ulp_error(dx, exact) <= 1


def test_array_like_inputs():
    x = [[[1.0, 2.0, 4.0, 8.0]], [[0.0, 1.0, 0.0, 1.0]]]
    dy = [[[1.0, -1.0, 0.5, 0.0]], [[2.0, 0.0, 0.0, 1.0]]]
    mean, rstd = forward_stats(np.array(x))
    dx, gw, gb = instance_norm_backward(dy, x, mean.tolist(), rstd.tolist(), [2.0])
    edx, egw, egb = ref.instance_norm_backward(dy, x, [2.0])
    np.testing.assert_allclose(dx, edx, rtol=1e-15, atol=1e-15)
    np.testing.assert_allclose(gw, egw, rtol=1e-15)
    np.testing.assert_allclose(gb, [3.5])


@pytest.mark.parametrize("shape", [(0, 3, 5), (0, 3, 4, 4), (2, 3, 0), (2, 3, 0, 4), (2, 0, 5)])
@pytest.mark.parametrize("channel_axis", [1, -1])
def test_empty(shape, channel_axis):
    x = np.ones(shape, np.float32)
    with np.errstate(all="ignore"):
        mean, rstd = forward_stats(x, channel_axis=channel_axis)
    dx, gw, gb = instance_norm_backward(x.copy(), x, mean, rstd, channel_axis=channel_axis)
    C = shape[channel_axis]
    assert dx.shape == shape and dx.dtype == np.float32
    np.testing.assert_array_equal(gw, np.zeros(C))
    np.testing.assert_array_equal(gb, np.zeros(C))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("where", ["x", "dy"])
@pytest.mark.parametrize("channel_axis", [1, -1])
def test_nan_inf_stays_in_its_instance(bad, where, channel_axis):
    r = rng((str(bad), where, channel_axis))
    shape = (3, 4, 30) if channel_axis == 1 else (3, 30, 4)
    x = r.standard_normal(shape)
    dy = r.standard_normal(shape)
    idx = (1, 2, 7) if channel_axis == 1 else (1, 7, 2)
    (x if where == "x" else dy)[idx] = bad
    with np.errstate(all="ignore"):
        mean, rstd = forward_stats(x, channel_axis=channel_axis)
    dx, gw, gb = instance_norm_backward(dy, x, mean, rstd, channel_axis=channel_axis)
    dxn = np.moveaxis(dx, channel_axis, 1)
    assert not np.isfinite(dxn[1, 2]).any()  # the poisoned instance
    ok = np.ones((3, 4), bool)
    ok[1, 2] = False
    # every other instance is exactly what it is without the bad value
    x2, dy2 = x.copy(), dy.copy()
    (x2 if where == "x" else dy2)[idx] = 0.0
    m2, s2 = forward_stats(x2, channel_axis=channel_axis)
    dx2, gw2, gb2 = instance_norm_backward(dy2, x2, m2, s2, channel_axis=channel_axis)
    np.testing.assert_array_equal(dxn[ok], np.moveaxis(dx2, channel_axis, 1)[ok])
    # only channel 2's parameter gradients see it
    np.testing.assert_array_equal(gw[[0, 1, 3]], gw2[[0, 1, 3]])
    np.testing.assert_array_equal(gb[[0, 1, 3]], gb2[[0, 1, 3]])
    assert not np.isfinite(gw[2])
    if where == "dy":
        assert not np.isfinite(gb[2])
    else:  # grad_bias = sum(dy) never looks at x
        assert gb[2] == gb2[2]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("value", [0.0, 3.0, -1e4])
def test_constant_instance(dtype, value):
    """xhat = 0: dx = rstd * w * (dy - mean(dy)) with rstd = 1/sqrt(eps), grad_weight = 0."""
    r = rng((dtype, value))
    x = np.full((2, 3, 50), value, dtype)
    x[1] += r.standard_normal((3, 50)).astype(dtype)  # sample 1 is not constant
    dy = r.standard_normal(x.shape).astype(dtype)
    w = np.array([1.0, -2.0, 0.5])
    dx, gw, gb, _ = check(dy, x, weight=w)
    dy0 = dy[0].astype(ref.XP)
    mdy = dy0.mean(axis=-1, keepdims=True)
    a = (1 / np.sqrt(ref.XP(1e-5))) * w[:, None]
    expect = a * (dy0 - mdy)
    scale = np.abs(a) * (np.abs(dy0) + np.abs(mdy)) if dtype == "float64" else None
    assert ref.ulp_error(dx[0], expect, scale=scale) <= TOL_EPS[np.dtype(dtype)]


def test_float16_extremes_round_once():
    r = rng(16)
    x = (r.standard_normal((2, 3, 64)) * 1000).astype(np.float16)
    dy = (r.standard_normal(x.shape) * 100).astype(np.float16)
    check(dy, x, weight=np.array([1.0, 50.0, -0.01]))


# ----------------------------------------------------------------------------------------------
# out=


@pytest.mark.parametrize("channel_axis", [1, -1])
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_out_is_grad_output(channel_axis, dtype):
    r = rng((channel_axis, dtype))
    x = make(r, (2, 3, 8, 9), dtype, offset=1.0)
    dy = r.standard_normal(x.shape).astype(dtype)
    mean, rstd = forward_stats(x, channel_axis=channel_axis)
    w = r.standard_normal(x.shape[channel_axis])
    expect = instance_norm_backward(dy, x, mean, rstd, w, channel_axis=channel_axis)
    g = dy.copy()
    dx, gw, gb = instance_norm_backward(g, x, mean, rstd, w, channel_axis=channel_axis, out=g)
    assert dx is g
    np.testing.assert_array_equal(g, expect[0])
    np.testing.assert_array_equal(gw, expect[1])
    np.testing.assert_array_equal(gb, expect[2])


@pytest.mark.parametrize("path", [(False, 0), (True, 0), (True, 4)])
def test_out_is_grad_output_on_every_path(path, monkeypatch):
    monkeypatch.setattr(_api, "plan", lambda groups, length, total: path)
    r = rng(path)
    for shape, ax in (((2, 3, 500), 1), ((2, 500, 3), -1)):
        x = r.standard_normal(shape)
        dy = r.standard_normal(shape)
        mean, rstd = forward_stats(x, channel_axis=ax)
        expect, _, _ = instance_norm_backward(dy, x, mean, rstd, channel_axis=ax)
        instance_norm_backward(dy, x, mean, rstd, channel_axis=ax, out=dy)
        np.testing.assert_array_equal(dy, expect)


def test_out_is_non_contiguous_view_of_grad_output():
    r = rng(5)
    big = r.standard_normal((2, 3, 10, 20))
    dy = big[..., ::2]
    x = r.standard_normal(dy.shape)
    mean, rstd = forward_stats(x)
    expect, _, _ = instance_norm_backward(dy.copy(), x, mean, rstd)
    rest = big[..., 1::2].copy()
    dx, _, _ = instance_norm_backward(dy, x, mean, rstd, out=dy)
    assert dx is dy
    np.testing.assert_array_equal(dy, expect)
    np.testing.assert_array_equal(big[..., 1::2], rest)  # the other half untouched


@pytest.mark.parametrize("which", ["x", "grad_output"])
@pytest.mark.parametrize("shift", [1, 7])
def test_out_partly_overlapping_is_right(which, shift):
    r = rng((which, shift))
    buf = r.standard_normal(2 * 3 * 40 + shift)
    other = r.standard_normal((2, 3, 40))
    inp = buf[shift:].reshape(2, 3, 40)  # overlaps ``out`` shifted by a few elements
    out = buf[: 2 * 3 * 40].reshape(2, 3, 40)
    x, dy = (inp, other) if which == "x" else (other, inp)
    mean, rstd = forward_stats(x)
    expect, _, _ = instance_norm_backward(dy.copy(), x.copy(), mean, rstd)
    instance_norm_backward(dy, x, mean, rstd, out=out)
    np.testing.assert_array_equal(out, expect)


def test_out_separate_and_out_is_x():
    r = rng(9)
    x = r.standard_normal((2, 3, 33)).astype(np.float32)
    dy = r.standard_normal(x.shape).astype(np.float32)
    mean, rstd = forward_stats(x)
    expect, _, _ = instance_norm_backward(dy, x, mean, rstd)
    out = np.empty_like(x)
    assert instance_norm_backward(dy, x, mean, rstd, out=out)[0] is out
    np.testing.assert_array_equal(out, expect)
    out_f = np.empty(x.shape, np.float32, order="F")
    instance_norm_backward(dy, x, mean, rstd, out=out_f)
    np.testing.assert_array_equal(out_f, expect)
    instance_norm_backward(dy, x, mean, rstd, out=x)
    np.testing.assert_array_equal(x, expect)


# ----------------------------------------------------------------------------------------------
# validation: test_bad_arguments and test_read_only_out are rows of the error table in
# test_errors.py ("instance_norm_backward-..."); what remains here also checks a result


def test_integer_input_takes_float64_gradients():
    r = rng(1)
    x = r.integers(0, 10, (2, 3, 12)).astype(np.int16)
    mean, rstd = forward_stats(x)
    dy = r.standard_normal(x.shape)
    with pytest.raises(TypeError, match="grad_output must have dtype float64"):
        instance_norm_backward(dy.astype(np.int64), x, mean, rstd)
    dx, _, _ = instance_norm_backward(dy, x, mean, rstd)
    assert dx.dtype == np.float64


def test_byte_swapped_grad_output_accepted():
    r = rng(2)
    x = r.standard_normal((2, 3, 12)).astype(">f4")
    dy = r.standard_normal(x.shape).astype(">f4")
    dx, _, _, _ = check(dy, x)
    assert dx.dtype == np.dtype("=f4")


# ----------------------------------------------------------------------------------------------
# property test


@HYPOTHESIS_SHORT  # derandomized: the same examples in CI
@given(
    n=st.integers(1, 3),
    c=st.integers(1, 5),
    spatial=st.lists(st.integers(1, 9), min_size=1, max_size=3),
    channels_last=st.booleans(),
    dtype=st.sampled_from(["float32", "float64"]),
    offset=st.sampled_from([0.0, 10.0, -1e3, 1e4]),
    affine=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_property_matches_reference(n, c, spatial, channels_last, dtype, offset, affine, seed):
    r = np.random.default_rng(seed)
    shape = (n, *spatial, c) if channels_last else (n, c, *spatial)
    ax = -1 if channels_last else 1
    x = make(r, shape, dtype, offset=offset)
    dy = (r.standard_normal(shape) * r.uniform(0.1, 10) + r.uniform(-2, 2)).astype(dtype)
    w = r.uniform(-3, 3, c) if affine else None
    check(dy, x, weight=w, channel_axis=ax)


@pytest.mark.parametrize("C", [16, 17, 64, 100])
@pytest.mark.parametrize("N, L", [(1, 7), (2, 333), (1, 3000)])
def test_channels_last_float32_many_channels(N, L, C):
    # channels-last float32 dx swept flat over stretches of whole rows, C not a divisor of
    # the stretch; N = 1 splits the rows across threads
    r = rng(("cl16", N, L, C))
    x = r.standard_normal((N, L, C)) * r.uniform(0.1, 10, C) + r.uniform(-5, 5, C)
    x = x.astype(np.float32)
    dy = r.standard_normal((N, L, C)).astype(np.float32)
    w = r.uniform(0.5, 2.0, C)
    check(dy, x, weight=w, channel_axis=-1)
    mean, rstd = forward_stats(x, w, -1)
    dx = instance_norm_backward(dy, x, mean, rstd, w, channel_axis=-1)[0]
    g = dy.copy()
    assert instance_norm_backward(g, x, mean, rstd, w, channel_axis=-1, out=g)[0] is g
    np.testing.assert_array_equal(g, dx)  # out=grad_output, in place
