"""instance_norm forward: against the extended-precision reference, PyTorch golden values, and
every edge case of the engine issue."""

from __future__ import annotations

import math
import pathlib

import numba
import numpy as np
import pytest
from conftest import TOL_EPS, assert_matches_reference, rng, run_python

from instnorm_numba import instance_norm
from instnorm_numba import reference as ref

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden" / "torch_forward.npz"

# the accuracy guarantee (conftest.TOL_EPS), in machine epsilons of the result dtype, relative
# to max(1, |y|); for float64 relative to max(1, |y|, |weight| * max(1, |xhat|) + |bias|)
# (``reference.accuracy_scale``): the affine step scales xhat's error by |weight|


def check(x, *, weight=None, bias=None, channel_axis=1, **kw):
    """Run ours and the reference; assert the guarantee, the dtype, and an untouched input."""
    before = np.array(x, copy=True)
    y, mean, rstd = instance_norm(
        x, weight, bias, channel_axis=channel_axis, return_stats=True, **kw
    )
    exact, emean, erstd = ref.instance_norm(
        before, weight, bias, channel_axis=channel_axis, return_stats=True, exact=True, **kw
    )
    assert y.dtype == ref.result_dtype(np.asarray(x).dtype)
    assert y.shape == np.shape(x)
    scale = None
    if y.dtype == np.float64:
        scale = ref.accuracy_scale(before, weight, bias, channel_axis=channel_axis, **kw)
    err = assert_matches_reference(y, exact, scale=scale)
    np.testing.assert_array_equal(np.asarray(x), before)  # input unchanged (NaNs equal too)
    emean, erstd = emean.astype(np.float64), erstd.astype(np.float64)
    finite = np.isfinite(emean) & np.isfinite(erstd)
    assert not (np.isfinite(mean) & np.isfinite(rstd))[~finite].any()
    big = np.max(np.abs(before.astype(np.float64)), initial=1.0, where=np.isfinite(before))
    np.testing.assert_allclose(mean[finite], emean[finite], rtol=1e-13, atol=1e-13 * big)
    np.testing.assert_allclose(rstd[finite], erstd[finite], rtol=1e-13)
    return y, err


# ----------------------------------------------------------------------------------------------
# accuracy across dtypes, layouts, channel axes and offsets

DTYPES = ["float16", "float32", "float64", ">f4", ">f8", "int32", "uint8", "int64", "bool"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channel_axis", [1, -1])
@pytest.mark.parametrize("shape", [(2, 3, 50), (2, 3, 7, 9), (2, 4, 3, 5, 6)])
def test_dtypes_axes_ndim(dtype, channel_axis, shape):
    dt = np.dtype(dtype)
    r = rng((dtype, channel_axis, shape))
    if dt.kind == "b":
        x = r.random(shape) > 0.5
    elif dt.kind in "iu":
        x = r.integers(0, 100, shape).astype(dt)
    else:
        x = (r.standard_normal(shape) * 3 + 1).astype(dt)
    C = shape[channel_axis]
    check(x, weight=r.standard_normal(C), bias=r.standard_normal(C), channel_axis=channel_axis)


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("offset", [0.0, 1e4, 1e6])
@pytest.mark.parametrize("channel_axis", [1, -1])
def test_offset_data_keeps_every_digit(dtype, offset, channel_axis):
    if dtype == "float16" and offset > 1e3:
        offset = 1e3  # float16 tops out at 65504; 1e3 + noise still has few bits left
    x = (offset + rng(1).standard_normal((3, 4, 33, 31))).astype(dtype)
    if channel_axis == -1:
        x = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    check(x, channel_axis=channel_axis)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda a: np.asfortranarray(a), id="fortran"),
        pytest.param(lambda a: a[:, :, ::2, 1:], id="strided"),
        pytest.param(lambda a: a[::-1, :, ::-1, ::-1], id="reversed"),
        pytest.param(lambda a: a.transpose(0, 1, 3, 2), id="transposed-spatial"),
        pytest.param(
            lambda a: np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2),
            id="channels-last-memory",
        ),
        pytest.param(lambda a: np.broadcast_to(a[:, :, :1], a.shape), id="broadcast-readonly"),
    ],
)
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
def test_any_strides(make, dtype):
    base = (rng(2).standard_normal((3, 4, 10, 12)) * 2 + 5).astype(dtype)
    x = make(base)
    check(x, weight=np.arange(1, 5), bias=np.arange(4) / 4)


def test_read_only_input():
    x = rng(3).standard_normal((2, 3, 40)).astype(np.float32)
    x.flags.writeable = False
    check(x)


@pytest.mark.parametrize("channel_axis", [2, 3, -2])
def test_middle_channel_axis(channel_axis):
    x = rng(4).standard_normal((2, 5, 6, 7)).astype(np.float32)
    y, _ = check(x, channel_axis=channel_axis, weight=np.ones(x.shape[channel_axis]) * 2)
    assert y.flags.c_contiguous
    w = np.ones(x.shape[channel_axis]) * 2
    moved = instance_norm(np.moveaxis(x, channel_axis, 1), weight=w)
    np.testing.assert_array_equal(np.moveaxis(y, channel_axis, 1), moved)


@pytest.mark.parametrize(
    "shape,channel_axis",
    [
        ((1, 2, 300_000), 1),  # few huge instances: split across threads
        ((1, 3, 500, 501), 1),
        ((3, 1, 70_000), 1),
        ((1, 400, 300, 3), -1),  # channels-last, one slab: split across threads
        ((2, 250, 250, 16), -1),
        ((64, 32, 8, 8), 1),  # many small instances
        ((128, 64, 4, 4), 1),
        ((32, 7, 7, 64), -1),
    ],
)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_parallel_shapes(shape, channel_axis, dtype):
    x = (rng(5).standard_normal(shape) * 4 + 100).astype(dtype)
    C = shape[channel_axis]
    w, b = rng(6).standard_normal(C), rng(7).standard_normal(C)
    check(x, weight=w, bias=b, channel_axis=channel_axis)


@pytest.mark.parametrize("threads", [1, 2])
def test_thread_count_does_not_change_result(threads):
    x = (rng(8).standard_normal((1, 3, 300, 300)) + 7).astype(np.float32)
    prev = numba.get_num_threads()
    try:
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        y, _ = check(x)
    finally:
        numba.set_num_threads(prev)
    assert numba.get_num_threads() == prev


# ----------------------------------------------------------------------------------------------
# edge cases


@pytest.mark.parametrize("shape", [(0, 3, 5), (0, 3, 4, 4), (2, 0, 5), (2, 3, 0), (2, 3, 0, 4)])
def test_empty(shape):
    x = np.ones(shape, np.float32)
    y, mean, rstd = instance_norm(x, return_stats=True)
    assert y.shape == shape and y.dtype == np.float32
    assert mean.shape == rstd.shape == (shape[0], shape[1])
    if shape[0] and shape[1]:  # instances with no elements have no statistics
        assert np.isnan(mean).all() and np.isnan(rstd).all()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("channel_axis", [1, -1])
@pytest.mark.parametrize("shape", [(2, 3, 40), (1, 2, 200_000)])
def test_nan_inf_stays_in_its_instance(bad, channel_axis, shape):
    x = rng(9).standard_normal(shape).astype(np.float32)
    if channel_axis == -1:
        x = np.ascontiguousarray(np.moveaxis(x, 1, -1))
        x[1 % shape[0], 5, 1] = bad
    else:
        x[1 % shape[0], 1, 5] = bad
    y, _ = check(x, channel_axis=channel_axis)
    yc = np.moveaxis(y, channel_axis, 1)
    hit = np.zeros(yc.shape[:2], bool)
    hit[1 % shape[0], 1] = True
    assert np.isnan(yc[hit]).all()
    assert np.isfinite(yc[~hit]).all()


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize(
    "shape, channel_axis",
    [
        ((4, 3, 5), 1),  # short rows
        ((2, 3, 5, 5), 1),
        ((64, 4, 5, 4), 1),
        ((2, 3, 4100), 1),  # long rows
        ((1, 1, 300000), 1),  # few long instances: split across threads
        ((2, 25, 3), -1),  # channels-last, few channels
        ((2, 100, 64), -1),
        ((1, 50000, 2), -1),  # channels-last, split
    ],
)
def test_element_at_the_mean_gives_bias_exactly(dtype, shape, channel_axis):
    # x == mean must give (x - mean) * a + b == b exactly, as in PyTorch: a constant
    # background, or integer data whose mean is an integer, must not pick up rounding noise
    # (a folded x * a + (b - mean * a) would leave ~1e-16 * |mean * a| there)
    C = shape[channel_axis]
    n = math.prod(shape)
    pattern = np.array([-2.0, -1.0, 0.0, 1.0, 2.0])
    x = (7.0 + np.resize(pattern, n)).reshape(shape)
    if channel_axis == -1:  # every instance must hold whole periods: vary along the rows
        x = np.moveaxis((7.0 + np.resize(pattern, n)).reshape(np.roll(shape, 1)), 0, -1)
    x = np.ascontiguousarray(x).astype(dtype)
    bias = np.linspace(-1.5, 2.0, C)
    bias[0] = 0.0  # where noise would show most: y must be exactly 0, not 1e-16
    weight = np.linspace(0.5, 3.0, C)
    y, mean, _ = instance_norm(x, weight, bias, channel_axis=channel_axis, return_stats=True)
    np.testing.assert_array_equal(mean, 7.0)
    at_mean = x == 7
    assert at_mean.sum() * 5 == n
    expect = np.broadcast_to(
        bias.astype(dtype).reshape((C,) + (1,) * (len(shape) - 2) if channel_axis == 1 else C),
        shape,
    )
    if dtype == "float64" and math.prod(shape[1:]) >= 100000:
        # split instances: the float64 mean comes from Chan merges, whose rounding (one ulp)
        # is all that x - mean can show; float32/float16 data fold the shift and stay exact
        tol = 4 * 2.0**-52 * max(1.0, np.abs(bias).max())  # the float64 guarantee
        np.testing.assert_allclose(y[at_mean], expect[at_mean], rtol=0, atol=tol)
    else:
        np.testing.assert_array_equal(y[at_mean], expect[at_mean])


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("value", [0.0, 0.1, -3.7, 1e4])
def test_constant_instance_gives_bias(dtype, value):
    x = np.full((2, 3, 5, 5), value, dtype)
    bias = np.array([0.5, -1.25, 3.0])
    y = instance_norm(x, np.array([2.0, 3.0, 4.0]), bias)
    np.testing.assert_array_equal(y, np.broadcast_to(bias.astype(dtype)[:, None, None], y.shape))


def test_constant_instance_with_zero_eps_is_nan_like_torch():
    y = instance_norm(np.ones((1, 2, 4), np.float32), eps=0.0)
    assert np.isnan(y).all()


@pytest.mark.parametrize("channel_axis", [1, -1])
def test_float32_extremes_do_not_overflow(channel_axis):
    big = np.float32(3.0e38)
    x = np.array([big, -big, big * 0.5, -big * 0.25, big], np.float32)
    x = np.tile(x, (2, 3, 4)).reshape(2, 3, 20)
    if channel_axis == -1:
        x = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    y, _ = check(x, channel_axis=channel_axis)
    assert np.isfinite(y).all()


def test_subnormal_float32():
    x = (rng(10).standard_normal((2, 2, 64)) * 1e-40).astype(np.float32)
    check(x, eps=0.0)


def test_single_spatial_element_gives_bias_without_running_stats():
    x = rng(11).standard_normal((4, 3, 1)).astype(np.float32)
    y = instance_norm(x, bias=np.array([1.0, 2.0, 3.0]))
    np.testing.assert_array_equal(y[..., 0], np.tile([1.0, 2.0, 3.0], (4, 1)).astype(np.float32))


def test_array_like_input():
    x = [[[1, 2, 3, 4]], [[10, 10, 20, 20]]]
    y = instance_norm(x, eps=0.0)
    assert y.dtype == np.float64
    np.testing.assert_allclose(y[1, 0], [-1, -1, 1, 1])
    np.testing.assert_allclose(y[0, 0], np.array([-1.5, -0.5, 0.5, 1.5]) / np.sqrt(1.25))


def test_worked_example_from_readme():
    x = np.array([[[1.0, 2.0, 3.0, 4.0]], [[10.0, 10.0, 20.0, 20.0]]])
    y, mean, rstd = instance_norm(x, eps=0.0, return_stats=True)
    np.testing.assert_allclose(mean, [[2.5], [15.0]])
    np.testing.assert_allclose(1 / rstd**2, [[1.25], [25.0]])
    assert abs(y[0, 0, 0] - (-1.5 / np.sqrt(1.25))) < 1e-15
    assert abs(y[0, 0, 0] + 1.7320508) > 0.3  # not the batch-pooled (0.5-2)/sqrt(0.75)


# ----------------------------------------------------------------------------------------------
# out=


@pytest.mark.parametrize("channel_axis", [1, -1])
@pytest.mark.parametrize("shape", [(2, 3, 7, 5), (1, 2, 300_000)])
def test_out_in_place(channel_axis, shape):
    x = (rng(12).standard_normal(shape) + 3).astype(np.float32)
    expected = instance_norm(x, channel_axis=channel_axis)
    res = instance_norm(x, channel_axis=channel_axis, out=x)
    assert res is x
    np.testing.assert_array_equal(x, expected)


def test_out_separate_and_layouts():
    x = rng(13).standard_normal((2, 3, 8, 9)).astype(np.float64)
    expected = instance_norm(x)
    for out in (np.empty_like(x), np.empty_like(x, order="F"), np.empty((2, 3, 8, 18))[..., ::2]):
        res = instance_norm(x, out=out)
        assert res is out
        np.testing.assert_array_equal(out, expected)


def test_out_in_place_non_contiguous_view():
    base = rng(14).standard_normal((2, 3, 8, 10)).astype(np.float32)
    x = base[:, :, :, ::2]
    expected = instance_norm(x.copy())
    res = instance_norm(x, out=x)
    assert res is x
    np.testing.assert_array_equal(base[:, :, :, ::2], expected)


@pytest.mark.parametrize("shift", [1, 7, -3])
def test_out_partly_overlapping_is_right(shift):
    buf = rng(15).standard_normal(2 * 3 * 64 + 16).astype(np.float64)
    lo = 8
    x = buf[lo : lo + 2 * 3 * 64].reshape(2, 3, 64)
    expected = instance_norm(x.copy())
    out = buf[lo + shift : lo + shift + 2 * 3 * 64].reshape(2, 3, 64)
    instance_norm(x, out=out)
    np.testing.assert_array_equal(out, expected)


def test_float16_out():
    x = rng(16).standard_normal((2, 3, 30)).astype(np.float16)
    out = np.empty_like(x)
    instance_norm(x, out=out)
    np.testing.assert_array_equal(out, instance_norm(x))


# ----------------------------------------------------------------------------------------------
# running statistics


@pytest.mark.parametrize("channel_axis", [1, -1])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_running_stats_update_matches_reference(channel_axis, dtype):
    x = (rng(17).standard_normal((4, 3, 6, 5)) * 2 + 1).astype(dtype)
    if channel_axis == -1:
        x = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    rm, rv = np.array([0.1, -0.2, 0.3], dtype), np.array([1.0, 2.0, 0.5], dtype)
    erm, erv = rm.astype(np.float64), rv.astype(np.float64)
    y = instance_norm(x, running_mean=rm, running_var=rv, momentum=0.25, channel_axis=channel_axis)
    ey = ref.instance_norm(
        x,
        running_mean=erm,
        running_var=erv,
        momentum=0.25,
        channel_axis=channel_axis,
        exact=True,
    )
    assert ref.ulp_error(y, ey) <= TOL_EPS[y.dtype]
    tol = 2 * np.finfo(dtype).eps
    np.testing.assert_allclose(rm, erm, rtol=tol, atol=tol)
    np.testing.assert_allclose(rv, erv, rtol=tol, atol=tol)


@pytest.mark.parametrize("channel_axis", [1, -1])
def test_use_input_stats_false_uses_running_stats(channel_axis):
    x = (rng(18).standard_normal((2, 3, 40)) + 2).astype(np.float32)
    if channel_axis == -1:
        x = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    rm = np.array([1.0, 2.0, 3.0])
    rv = np.array([0.5, 1.5, 2.5])
    rm0, rv0 = rm.copy(), rv.copy()
    w, b = np.array([1.0, -2.0, 0.5]), np.array([0.0, 1.0, -1.0])
    y, mean, rstd = instance_norm(
        x,
        w,
        b,
        running_mean=rm,
        running_var=rv,
        use_input_stats=False,
        channel_axis=channel_axis,
        return_stats=True,
    )
    exact = ref.instance_norm(
        x,
        w,
        b,
        running_mean=rm,
        running_var=rv,
        use_input_stats=False,
        channel_axis=channel_axis,
        exact=True,
    )
    assert ref.ulp_error(y, exact) <= 1.0
    np.testing.assert_array_equal(rm, rm0)
    np.testing.assert_array_equal(rv, rv0)
    np.testing.assert_array_equal(mean, np.tile(rm0, (2, 1)))
    np.testing.assert_allclose(rstd, np.tile(1 / np.sqrt(rv0 + 1e-5), (2, 1)), rtol=1e-15)


def test_running_stats_read_only_allowed_when_not_updated():
    x = rng(19).standard_normal((2, 3, 10))
    rm, rv = np.zeros(3), np.ones(3)
    rm.flags.writeable = rv.flags.writeable = False
    instance_norm(x, running_mean=rm, running_var=rv, use_input_stats=False)


def test_running_stats_empty_batch_left_alone():
    rm, rv = np.array([0.5, 1.0]), np.array([2.0, 3.0])
    y = instance_norm(np.ones((0, 2, 5)), running_mean=rm, running_var=rv)
    assert y.shape == (0, 2, 5)
    np.testing.assert_array_equal(rm, [0.5, 1.0])
    np.testing.assert_array_equal(rv, [2.0, 3.0])


# ----------------------------------------------------------------------------------------------
# PyTorch golden values (tests/golden/make_torch_forward.py)


def golden_cases():
    data = np.load(GOLDEN)
    names = sorted({k.split("/")[0] for k in data.files if "/" in k})
    return data, names


_DATA, _NAMES = golden_cases()


@pytest.mark.parametrize("name", _NAMES)
def test_torch_golden(name):
    g = {k.split("/", 1)[1]: _DATA[k] for k in _DATA.files if k.startswith(name + "/")}
    mode = str(g["mode"])
    x = g["x"]
    kw = dict(eps=float(g["eps"]), momentum=float(g["momentum"]))
    rm = g["running_mean"].copy() if "running_mean" in g else None
    rv = g["running_var"].copy() if "running_var" in g else None
    y = instance_norm(
        x,
        g.get("weight"),
        g.get("bias"),
        running_mean=rm,
        running_var=rv,
        use_input_stats=mode != "eval",
        **kw,
    )
    # torch accumulates in the input dtype: its float32 results carry float32 rounding of the
    # statistics, ours are correctly rounded.  Allow a few float32 eps relative to max(1, |y|).
    eps = np.finfo(x.dtype).eps
    scale = np.maximum(1, np.abs(g["y"]))
    assert np.max(np.abs(y - g["y"]) / scale) <= 8 * eps
    if rm is not None:
        np.testing.assert_allclose(rm, g["running_mean_after"], rtol=8 * eps, atol=8 * eps)
        np.testing.assert_allclose(rv, g["running_var_after"], rtol=8 * eps, atol=8 * eps)


@pytest.mark.parametrize("L", [1, 2, 3, 4, 5, 7, 8, 9, 12, 15, 16, 17])
@pytest.mark.parametrize("N, C", [(8, 1), (3, 3), (13, 5), (4, 11), (9, 8), (2, 69)])
def test_very_short_float32_rows_eight_at_a_time(L, N, C):
    # float32 rows of up to 16 elements go eight at a time through vector code (when the CPU
    # has AVX2); row counts that are not multiples of 8 and 64 leave remainders to the
    # general path, and channel counts below and above 8 wrap the per-row weight lookup
    rng = np.random.default_rng(L * 1000 + N * 10 + C)
    x = rng.standard_normal((N, C, L)).astype(np.float32)
    w = rng.uniform(0.5, 2.0, C)
    b = rng.standard_normal(C)
    check(x, weight=w, bias=b)
    # a row far from zero in the middle of a group: its group takes the exact path, and the
    # neighbours of that row must not notice
    x[1 % N, C // 2] += np.float32(3e5)
    check(x, weight=w, bias=b)
    # NaN and Inf rows: answers for that instance only, as everywhere else
    x[N // 2, 0, 0] = np.nan
    x[-1, -1, -1] = np.inf
    y, _ = check(x, weight=w, bias=b)
    assert np.isnan(y[N // 2, 0]).all() and np.isnan(y[-1, -1]).all()
    x2 = x.copy()
    out = instance_norm(x2, w, b, out=x2)  # in place
    assert out is x2
    np.testing.assert_array_equal(out, instance_norm(x, w, b))


@pytest.mark.parametrize("C", [16, 17, 31, 64, 100, 600])
@pytest.mark.parametrize("N, L", [(1, 1), (2, 7), (1, 333), (3, 1000)])
def test_channels_last_float32_sixteen_channels_at_a_time(N, L, C):
    # channels-last float32 applies 16 channels at a time down blocks of rows (AVX2 and up);
    # C not a multiple of 16 leaves a masked tail, L not a multiple of the block a short block
    rng = np.random.default_rng(N * 100000 + L * 1000 + C)
    x = rng.standard_normal((N, L, C)) * rng.uniform(0.1, 10, C) + rng.uniform(-5, 5, C)
    x = x.astype(np.float32)
    w = rng.uniform(0.5, 2.0, C)
    b = rng.standard_normal(C)
    if L > 1:
        check(x, weight=w, bias=b, channel_axis=-1)
    y = instance_norm(x, w, b, channel_axis=-1)
    x2 = x.copy()
    assert instance_norm(x2, w, b, channel_axis=-1, out=x2) is x2  # in place
    np.testing.assert_array_equal(x2, y)
    yt = instance_norm(np.ascontiguousarray(np.moveaxis(x, -1, 1)), w, b)
    np.testing.assert_array_equal(np.moveaxis(yt, 1, -1), y)  # the layouts agree bit for bit


@pytest.mark.parametrize(
    "mean, bias, bound",
    [
        (0.0, 1.5, 0.51),  # small shift and bias: float32 arithmetic, within 0.51 epsilon
        (0.0, -31.0, 0.51),
        (0.0, 40.0, 0.5),  # |bias| > HALF32_BIAS: float64, correctly rounded
        (300.0, 1.5, 0.5),  # |mean * a| > HALF32_SHIFT: float64, correctly rounded
    ],
)
@pytest.mark.parametrize("L", [12, 5000])
@pytest.mark.parametrize("channel_axis", [1, -1])
def test_float16_rounding_on_both_sides_of_the_float32_apply(mean, bias, bound, L, channel_axis):
    rng = np.random.default_rng(int(mean) + L)
    shape = (3, 4, L) if channel_axis == 1 else (3, L, 4)
    x = (mean + rng.standard_normal(shape)).astype(np.float16)
    w = rng.uniform(0.5, 2.0, 4)
    b = np.full(4, bias)
    y = instance_norm(x, w, b, channel_axis=channel_axis)
    exact = ref.instance_norm(x, w, b, channel_axis=channel_axis, exact=True)
    assert ref.ulp_error(y, exact) <= bound + 1e-9


def test_vector_kernels_fall_back_on_a_cpu_without_avx2(tmp_path):
    # NUMBA_CPU_NAME=generic compiles for a CPU without AVX2: the eight-row and 16-channel
    # vector kernels are not used, and the general loops give the same guarantee
    env = {"NUMBA_CPU_NAME": "generic", "NUMBA_CACHE_DIR": str(tmp_path)}
    code = """
import numpy as np
from instnorm_numba import _kernels as K, instance_norm, reference as ref
assert not K.HAS_SIMD_ROWS
rng = np.random.default_rng(0)
for x, axis in [(rng.standard_normal((5, 7, 4, 4)), 1), (rng.standard_normal((2, 50, 37)), -1)]:
    x = x.astype(np.float32)
    err = ref.ulp_error(instance_norm(x, channel_axis=axis), ref.instance_norm(
        x, channel_axis=axis, exact=True))
    assert err <= 1.0, err
print("ok")
"""
    res = run_python(code, env=env, unset=["NUMBA_CPU_FEATURES"])
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "ok"


@pytest.mark.parametrize("channel_axis", [1, -1])
@pytest.mark.parametrize("shape", [(2, 2, 2, 2, 32882), (1, 2, 4, 65536)], ids=["fused", "split"])
def test_long_float64_instances_keep_the_running_mean_compensated(shape, channel_axis):
    """Found by the property tests: integer data 0..100 in instances of 130k elements merged
    128 blocks one after the other, each merge rounding the running mean (4.5 eps of float64
    before the mean was compensated too; 1.3 after)."""
    x = np.random.default_rng(7).integers(0, 101, shape).astype(np.float64)
    if channel_axis == -1:
        x = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    y, mean, _ = instance_norm(x, channel_axis=channel_axis, return_stats=True)
    exact = ref.instance_norm(x, channel_axis=channel_axis, exact=True)
    assert_matches_reference(y, exact, scale=ref.accuracy_scale(x, channel_axis=channel_axis))
    xm = np.moveaxis(x, channel_axis, 1).reshape(shape[0], shape[1], -1)
    exact_mean = xm.astype(np.int64).sum(axis=2) / xm.shape[2]  # integers: an exact sum
    np.testing.assert_array_equal(mean, exact_mean)
