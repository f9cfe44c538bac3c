"""Masks and variable lengths (issue 13): forward and backward against the extended-precision
reference extended for masks, PyTorch autograd golden values of the masked formula, the exact
dense result for an all-valid mask, MaskedArray input, the layers, and the error table."""

from __future__ import annotations

import pathlib
import zlib

import numpy as np
import pytest

from instnorm_numba import (
    InstanceNorm,
    InstanceNorm1d,
    instance_norm,
    instance_norm_backward,
)
from instnorm_numba import _kernels as K
from instnorm_numba import reference as ref

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden" / "torch_masked.npz"

#: the guarantee, as for dense input (tests/test_forward.py, tests/test_backward.py)
TOL_EPS = {np.dtype(np.float16): 1.0, np.dtype(np.float32): 1.0, np.dtype(np.float64): 4.0}


def rng(seed=0):
    if not isinstance(seed, int) or seed < 0:
        seed = zlib.crc32(repr(seed).encode())
    return np.random.default_rng(seed)


def to_layout(a_ncl, channel_axis):
    """An (N, C, *spatial) array with its channel axis moved to ``channel_axis``, contiguous."""
    return np.ascontiguousarray(np.moveaxis(a_ncl, 1, channel_axis))


def check(x, *, weight=None, bias=None, channel_axis=1, **kw):
    """Ours against the reference: the guarantee, zeros where invalid, stats, input unchanged."""
    before = np.array(x, copy=True)
    vkw = {k: kw[k] for k in ("mask", "lengths") if k in kw}
    mbefore = {k: np.array(v, copy=True) for k, v in vkw.items()}
    rkw = {k: np.array(v, copy=True) for k, v in kw.items() if k.startswith("running_")}
    rkw.update({k: kw[k] for k in ("use_input_stats",) if k in kw})
    y, mean, rstd = instance_norm(
        x, weight, bias, channel_axis=channel_axis, return_stats=True, **kw
    )
    exact, emean, erstd = ref.instance_norm(
        before,
        weight,
        bias,
        channel_axis=channel_axis,
        return_stats=True,
        exact=True,
        **vkw,
        **rkw,
    )
    assert y.dtype == ref.result_dtype(before.dtype)
    assert y.shape == before.shape
    scale = None
    if y.dtype == np.float64:
        scale = ref.accuracy_scale(before, weight, bias, channel_axis=channel_axis, **vkw, **rkw)
    err = ref.ulp_error(y, exact, scale=scale)
    assert err <= TOL_EPS[y.dtype], f"error {err:.3g} eps"
    valid = valid_of(before.shape, channel_axis, **vkw)
    assert np.all(y[~valid] == 0)
    np.testing.assert_array_equal(np.asarray(x), before)  # input unchanged (NaNs equal too)
    for k, v in vkw.items():
        np.testing.assert_array_equal(np.asarray(v), mbefore[k])
    emean, erstd = emean.astype(np.float64), erstd.astype(np.float64)
    np.testing.assert_array_equal(np.isnan(mean), np.isnan(emean))
    ok = ~np.isnan(emean)
    vals = np.abs(before.astype(np.float64)[valid])
    big = np.max(vals, initial=1.0, where=np.isfinite(vals))
    np.testing.assert_allclose(mean[ok], emean[ok], rtol=1e-13, atol=1e-13 * big)
    np.testing.assert_allclose(rstd[ok], erstd[ok], rtol=1e-13)
    return y, mean, rstd, err


def valid_of(shape, channel_axis, mask=None, lengths=None):
    """The valid set as a boolean array of x's shape (independently of the library)."""
    axis = channel_axis % len(shape)
    if lengths is not None:
        L = shape[2] if axis == 1 else shape[1]
        v = np.arange(L)[None, :] < np.asarray(lengths)[:, None]
        return np.broadcast_to(np.expand_dims(v, axis), shape)
    m = np.asarray(mask)
    if m.ndim == len(shape) - 1:
        m = np.expand_dims(m, axis)
    return np.broadcast_to(m, shape)


def make(r, shape, dtype, offset=0.0):
    return (r.standard_normal(shape) * 3 + offset).astype(dtype)


def random_mask(r, shape, channel_axis, kind, p=0.6):
    """A mask for x of ``shape``: 'shared' (N, *spatial), 'one' (channel axis 1), 'per' (full)."""
    axis = channel_axis % len(shape)
    if kind == "shared":
        s = tuple(d for i, d in enumerate(shape) if i != axis)
    elif kind == "one":
        s = tuple(1 if i == axis else d for i, d in enumerate(shape))
    else:
        s = shape
    return r.random(s) < p


DTYPES = ["float16", "float32", "float64", ">f4", "int32"]
LAYOUTS = [1, -1]


# ----------------------------------------------------------------------------------------------
# forward accuracy: masks


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channel_axis", LAYOUTS)
@pytest.mark.parametrize("kind", ["shared", "one", "per"])
@pytest.mark.parametrize(
    "shape",
    [(2, 3, 50), (3, 4, 5000), (2, 3, 7, 9), (2, 20, 300), (1, 2, 3, 5, 6), (2, 1, 40)],
)
def test_mask_forward(dtype, channel_axis, kind, shape):
    r = rng((dtype, channel_axis, kind, shape))
    xn = r.standard_normal(shape) * 3 + 1
    x = to_layout(xn, channel_axis).astype(dtype)
    xs = x.shape
    m = random_mask(r, xs, channel_axis, kind)
    C = xs[channel_axis]
    check(x, weight=r.standard_normal(C), bias=r.standard_normal(C), channel_axis=channel_axis,
          mask=m)  # fmt: skip


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("channel_axis", LAYOUTS)
@pytest.mark.parametrize("kind", ["shared", "per"])
@pytest.mark.parametrize("offset", [0.0, 1e4, -3e6])
def test_mask_offset_and_long_rows(dtype, channel_axis, kind, offset):
    """Data far from zero and rows long enough for the block merges and the mean shift."""
    r = rng((dtype, channel_axis, kind, offset))
    if dtype == "float16" and abs(offset) > 1e4:
        offset = 1e3
    x = to_layout(make(r, (2, 3, 20000), np.float64, offset), channel_axis).astype(dtype)
    m = random_mask(r, x.shape, channel_axis, kind, p=0.3)
    check(x, channel_axis=channel_axis, mask=m)


@pytest.mark.parametrize("channel_axis", LAYOUTS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_mask_structured(channel_axis, dtype):
    """Row masks of long valid runs, single valid elements, all-invalid instances."""
    r = rng((channel_axis, dtype))
    N, C, L = 5, 24, 700
    x = to_layout(make(r, (N, C, L), dtype), channel_axis)
    m = np.zeros((N, L), bool)
    m[0, 10:400] = True  # one long run
    m[1, ::3] = True  # isolated rows
    m[2, 5] = True  # one valid element: variance 0
    m[4] = True  # everything
    m[3, 17:19] = True
    m[3, 100:140] = True
    y, mean, rstd, _ = check(x, channel_axis=channel_axis, mask=m)
    assert np.all(mean[2] == x.take(5, axis=2 if channel_axis == 1 else 1)[2])


@pytest.mark.parametrize("channel_axis", LAYOUTS)
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_nan_and_inf_in_invalid_positions_do_not_leak(channel_axis, dtype):
    r = rng((channel_axis, dtype, "nan"))
    x = to_layout(make(r, (3, 5, 300), dtype), channel_axis)
    for kind in ("shared", "per"):
        m = random_mask(r, x.shape, channel_axis, kind)
        xb = x.copy()
        v = valid_of(x.shape, channel_axis, mask=m)
        xb[~v] = np.where(r.random((~v).sum()) < 0.5, np.nan, np.inf).astype(dtype)
        y, mean, rstd, _ = check(xb, channel_axis=channel_axis, mask=m)
        assert np.isfinite(y).all() and np.isfinite(mean).all() and np.isfinite(rstd).all()
    lengths = np.array([300, 0, 123])
    xb = x.copy()
    v = valid_of(x.shape, channel_axis, lengths=lengths)
    xb[~v] = np.nan
    y, mean, _, _ = check(xb, channel_axis=channel_axis, lengths=lengths)
    assert np.isfinite(y).all() and np.isnan(mean[1]).all() and np.isfinite(mean[[0, 2]]).all()


def test_nan_in_a_valid_position_gives_that_instance_nan_only():
    x = rng(1).standard_normal((2, 3, 40))
    x[0, 1, 7] = np.nan
    m = np.ones((2, 40), bool)
    m[:, 30:] = False
    y, mean, rstd, _ = check(x, mask=m)
    assert np.isnan(mean[0, 1]) and np.isnan(y[0, 1, :30]).all() and (y[0, 1, 30:] == 0).all()
    assert np.isfinite(mean[[0, 0, 1, 1, 1], [0, 2, 0, 1, 2]]).all()


# ----------------------------------------------------------------------------------------------
# forward accuracy: lengths


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channel_axis", LAYOUTS)
@pytest.mark.parametrize("L", [1, 7, 300, 5000])
def test_lengths_forward(dtype, channel_axis, L):
    r = rng((dtype, channel_axis, L))
    lengths = np.array([L, 0, r.integers(0, L + 1), max(L // 2, 1), 1])
    x = to_layout(make(r, (5, 4, L), np.float64, 1.0), channel_axis).astype(dtype)
    C = 4
    check(x, weight=r.standard_normal(C), bias=r.standard_normal(C), channel_axis=channel_axis,
          lengths=lengths)  # fmt: skip


@pytest.mark.parametrize("channel_axis", LAYOUTS)
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_lengths_equal_the_same_mask_and_the_dense_prefix(channel_axis, dtype):
    r = rng((channel_axis, dtype, "eq"))
    N, C, L = 4, 6, 3000
    lengths = r.integers(1000, 3001, N)
    x = to_layout(make(r, (N, C, L), dtype, 0.5), channel_axis)
    y = instance_norm(x, channel_axis=channel_axis, lengths=lengths)
    m = np.arange(L)[None, :] < lengths[:, None]
    ym = instance_norm(x, channel_axis=channel_axis, mask=m)
    e = ref.instance_norm(x, channel_axis=channel_axis, lengths=lengths, exact=True)
    assert ref.ulp_error(y, e) <= TOL_EPS[y.dtype] and ref.ulp_error(ym, e) <= TOL_EPS[y.dtype]
    for n in range(N):  # the valid prefix alone, normalized dense: the same arithmetic
        sl = (slice(n, n + 1), slice(None), slice(0, lengths[n]))
        if channel_axis == -1:
            sl = (slice(n, n + 1), slice(0, lengths[n]), slice(None))
        dense = instance_norm(np.ascontiguousarray(x[sl]), channel_axis=channel_axis)
        np.testing.assert_array_equal(y[sl], dense)


@pytest.mark.parametrize("per", [1, 80])
@pytest.mark.parametrize("threads", [1, 2, 3, 7])
def test_balanced_tasks_cover_every_row_once_in_equal_shares(per, threads):
    """The lengths kernels' split of rows (slabs) between threads: contiguous runs in order,
    covering each row once, each within one row's cost of an equal share."""
    from instnorm_numba._kernels.lengths import ZERO_COST, balanced_tasks

    r = rng((per, threads, "tasks"))
    L = 3000
    for lengths in (r.integers(1000, L + 1, 16), np.array([L, 0, 0, 5, L, 1]), np.zeros(3, int)):
        lengths = lengths.astype(np.int64)
        T, bounds = balanced_tasks(lengths, per, L, threads)
        n = lengths.size * per
        assert T == max(1, min(n, threads)) and bounds.shape == (T + 1,)
        assert bounds[0] == 0 and bounds[-1] == n and np.all(np.diff(bounds) >= 0)
        row_len = np.repeat(lengths, per)
        cost = row_len + ZERO_COST * (L - row_len)
        share = cost.sum() / T
        for t in range(T):
            run = cost[bounds[t] : bounds[t + 1]].sum()
            assert abs(run - share) <= cost.max() + 1e-9 * share


@pytest.mark.parametrize("channel_axis", LAYOUTS)
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_lengths_uneven_on_threads_forward_and_backward(channel_axis, dtype):
    """Large enough for the parallel kernels (above 65536 elements), lengths from 0 to L in
    a batch ordered so that a split by row count would be very uneven."""
    r = rng((channel_axis, dtype, "uneven"))
    N, C, L = 12, 8, 1500
    lengths = np.sort(r.integers(0, L + 1, N))
    lengths[:3] = [0, 1, 2]
    x = to_layout(make(r, (N, C, L), dtype, 1.5), channel_axis)
    w, b = r.standard_normal(C), r.standard_normal(C)
    check(x, weight=w, bias=b, channel_axis=channel_axis, lengths=lengths)
    dy = make(r, x.shape, ref.result_dtype(x.dtype))
    check_backward(dy, x, weight=w, channel_axis=channel_axis, lengths=lengths)
    rm, rv = np.zeros(C), np.ones(C)  # the running-statistics apply kernels
    check(x, weight=w, bias=b, channel_axis=channel_axis, lengths=lengths, running_mean=rm,
          running_var=rv, use_input_stats=False)  # fmt: skip


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("kind", ["shared", "per"])
@pytest.mark.parametrize("C", [1, 3, 20])
def test_channels_last_mask_blocks_empty_full_and_mixed(dtype, kind, C):
    """Channels-last masks whose rows run long stretches with no valid element, every element
    valid, and random ones (the statistics' blocks and the apply's row runs of each kind), NaN
    where invalid."""
    r = rng((dtype, kind, C, "blocks"))
    N, L = 3, 4000
    x = make(r, (N, L, C), dtype, 2.0)
    m = random_mask(r, x.shape, -1, kind, p=0.5)
    m[:, 200:1700] = False
    m[:, 2000:3500] = True
    v = valid_of(x.shape, -1, mask=m)
    x[~v] = np.nan
    check(x, weight=r.standard_normal(C), bias=r.standard_normal(C), channel_axis=-1, mask=m)


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("density", [0.1, 0.5, 0.9, "one invalid row"])
def test_channels_last_row_mask_densities(dtype, density):
    """A row mask (one per sample) of every density over channels-last slabs of 80 channels,
    NaN and Inf where invalid: against the reference, in place (out=x) as out of place.
    float16 (in float32) goes row by row with the mask as bit masks: the same bits as by runs
    (``_rowmask_runs``, the path of the other dtypes)."""
    from instnorm_numba._kernels import masked_slabs, slabs

    r = rng((dtype, density, "row mask blocks"))
    N, L, C = 2, 3000, 80
    x = make(r, (N, L, C), dtype)
    if density == "one invalid row":
        m = np.ones((N, L), bool)
        m[:, 1234] = False
    else:
        m = r.random((N, L)) < density
    x[~m] = np.nan
    x[~m & (r.random((N, L)) < 0.5)] = np.inf
    w, b = r.standard_normal(C), r.standard_normal(C)
    y, _, _, _ = check(x, weight=w, bias=b, channel_axis=-1, mask=m)
    xc = x.copy()
    assert instance_norm(xc, w, b, channel_axis=-1, mask=m, out=xc) is xc
    np.testing.assert_array_equal(xc, y)
    if dtype == "float16":
        xk, m1 = x[0].view(np.uint16), m[0].view(np.uint8)
        K, cm, a, bb = np.zeros(C), r.random(C) - 0.5, w, b
        mode, M, M32, a32, b32 = slabs.apply_mode(xk, K, cm, a, bb)
        assert mode == 2  # float16 in float32 arithmetic
        by_bits, by_runs = np.empty_like(xk), np.empty_like(xk)
        masked_slabs._rowmask_select_half(xk, m1, by_bits, M32, a32, b32)
        masked_slabs._rowmask_runs(xk, m1, by_runs, 0, L, 2, K, cm, M, a, bb, M32, a32, b32)
        np.testing.assert_array_equal(by_bits, by_runs)
        assert not by_bits[m1 == 0].any()  # invalid rows: +0


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("C", [3, 20])
def test_channels_last_per_channel_mask_staggered_first_rows(dtype, C):
    """A mask per channel whose channels start at different rows (0, a few, thousands in, one
    never): each channel's shift comes from its own first block of valid rows, on data far
    from zero (a shift from another channel's rows would cost the moments their precision)."""
    r = rng((dtype, C, "staggered"))
    N, L = 2, 6000
    x = make(r, (N, L, C), np.float64, 300.0 if dtype == "float16" else 3e4).astype(dtype)
    x += np.arange(C) * (8.0 if dtype == "float16" else 500.0)  # channels far apart
    m = r.random((N, L, C)) < 0.4
    starts = r.integers(0, L - 100, (N, C))
    starts[:, 0] = 0
    starts[:, 1] = 3
    for n in range(N):
        for c in range(C):
            m[n, : starts[n, c], c] = False
    m[1, :, C - 1] = False  # a channel with no valid element
    x[~m] = np.nan
    check(x, weight=r.standard_normal(C), bias=r.standard_normal(C), channel_axis=-1, mask=m)


@pytest.fixture
def split_spy(monkeypatch):
    """Four threads as far as the plan knows (whatever this machine has: the split kernels
    run on any number), and a count of the calls that took the split path."""
    from instnorm_numba import _api, _masked

    monkeypatch.setattr(_api, "num_threads", lambda: 4)
    calls = []

    def spy(name, f):
        def counted(*args):
            calls.append(name)
            return f(*args)

        return counted

    for name in ("_split_forward", "_split_backward"):
        monkeypatch.setattr(_masked, name, spy(name, getattr(_masked, name)))
    return calls


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("channel_axis", LAYOUTS)
@pytest.mark.parametrize("how", ["lengths", "shared", "one", "per"])
@pytest.mark.parametrize("shape", [(1, 1, 70000), (2, 3, 40000), (1, 6, 20000)])
def test_few_long_instances_split_across_threads(split_spy, dtype, channel_axis, how, shape):
    """Instances few against the threads are split into chunks as the dense ones are: the
    moments, the running update's counts, the running-statistics apply and the backward,
    against the reference; an instance (lengths 0) or a channel (a mask per channel) with no
    valid element, NaN in invalid positions of x and dy, a long invalid stretch at the
    start."""
    r = rng((dtype, channel_axis, how, shape, "split"))
    N, C, L = shape
    x = to_layout(make(r, shape, np.float64, 40.0), channel_axis).astype(dtype)
    if how == "lengths":
        kw = {"lengths": r.integers(L // 3, L + 1, N)}
        kw["lengths"][-1] = 0 if N > 1 else kw["lengths"][-1]
    else:
        m = random_mask(r, x.shape, channel_axis, how, p=0.5)
        if m.ndim == 2 or channel_axis == -1:  # (N, L), (N, L, Cm)
            m[:, : L // 5] = False
        else:  # (N, Cm, L)
            m[..., : L // 5] = False
        if how == "per" and C > 1:
            m[(0, slice(None), 1) if channel_axis == -1 else (0, 1)] = False
        kw = {"mask": m}
    x[~valid_of(x.shape, channel_axis, **kw)] = np.nan
    w, b = r.standard_normal(C), r.standard_normal(C)
    check(x, weight=w, bias=b, channel_axis=channel_axis, **kw)
    assert split_spy == ["_split_forward"]
    # the running update: each instance's own count
    rm, rv, erm, erv = np.zeros(C), np.ones(C), np.zeros(C), np.ones(C)
    xf = np.where(np.isnan(x), 0, x).astype(dtype)
    instance_norm(xf, channel_axis=channel_axis, running_mean=rm, running_var=rv, **kw)
    ref.instance_norm(xf, channel_axis=channel_axis, running_mean=erm, running_var=erv, **kw)
    np.testing.assert_allclose(rm, erm, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(rv, erv, rtol=1e-12)
    run = {"running_mean": r.standard_normal(C), "running_var": r.uniform(0.5, 2, C)}
    check(x, weight=w, bias=b, channel_axis=channel_axis, use_input_stats=False, **run, **kw)
    dy = make(r, x.shape, ref.result_dtype(x.dtype))
    dy[~valid_of(x.shape, channel_axis, **kw)] = np.nan
    check_backward(dy, x, weight=w, channel_axis=channel_axis, **kw)
    assert split_spy == ["_split_forward"] * 3 + ["_split_backward"]


def test_lengths_and_masks_on_an_empty_batch_and_empty_spatial():
    x = np.zeros((0, 3, 5), np.float32)
    y, mean, rstd = instance_norm(x, lengths=np.zeros(0, int), return_stats=True)
    assert y.shape == x.shape and mean.shape == (0, 3)
    y = instance_norm(x, mask=np.zeros((0, 5), bool))
    assert y.shape == x.shape
    x = np.zeros((2, 3, 0), np.float32)
    y, mean, _ = instance_norm(x, lengths=[0, 0], return_stats=True)
    assert y.shape == x.shape and np.isnan(mean).all()


# ----------------------------------------------------------------------------------------------
# an all-valid mask is the dense call, bitwise; the masked kernels on near-dense masks


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("channel_axis", LAYOUTS)
@pytest.mark.parametrize("shape", [(2, 3, 50), (2, 8, 64, 64), (16, 8, 3000), (300, 5, 4, 4)])
def test_all_valid_is_exactly_dense(dtype, channel_axis, shape):
    r = rng((dtype, channel_axis, shape, "dense"))
    x = to_layout(make(r, shape, dtype, 2.0), channel_axis)
    C = x.shape[channel_axis]
    w, b = r.standard_normal(C), r.standard_normal(C)
    y, mean, rstd = instance_norm(x, w, b, channel_axis=channel_axis, return_stats=True)
    masks = [np.ones(x.shape, bool), random_mask(r, x.shape, channel_axis, "shared", p=2.0)]
    for m in masks:
        ym, mm, rm = instance_norm(x, w, b, channel_axis=channel_axis, return_stats=True, mask=m)
        np.testing.assert_array_equal(ym, y)
        np.testing.assert_array_equal(mm, mean)
        np.testing.assert_array_equal(rm, rstd)
    if len(shape) == 3:
        yl = instance_norm(x, w, b, channel_axis=channel_axis, lengths=[shape[2]] * shape[0])
        np.testing.assert_array_equal(yl, y)
    ma = instance_norm(np.ma.MaskedArray(x, mask=False), w, b, channel_axis=channel_axis)
    np.testing.assert_array_equal(ma.data, y)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("channel_axis", LAYOUTS)
def test_masked_kernels_on_an_all_valid_mask(dtype, channel_axis):
    """The masked kernels themselves (the API sends an all-valid mask to the dense ones)."""
    r = rng((dtype, channel_axis, "kern"))
    N, C, L = 3, 5, 2500
    x = make(r, (N, C, L), dtype, 3.0)
    e = ref.instance_norm(x, exact=True)
    w, b = np.ones(C), np.zeros(C)
    mean, var, cnt = np.empty((N, C)), np.empty((N, C)), np.empty((N, C))
    for Cm in (1, C):
        y = np.empty_like(x)
        mk = np.ones((N * Cm, L), np.uint8)
        K.cf_mask_fused(x.reshape(N * C, L), mk, Cm, y.reshape(N * C, L), w, b, C, 1e-5,
                        mean.reshape(-1), var.reshape(-1), cnt.reshape(-1))  # fmt: skip
        assert ref.ulp_error(y, e) <= TOL_EPS[y.dtype]
        assert (cnt == L).all()
        xl = np.ascontiguousarray(np.moveaxis(x, 1, -1))
        yl = np.empty_like(xl)
        K.cl_mask_fused(xl, np.ones((N, L, Cm), np.uint8), yl, w, b, 1e-5, mean, var, cnt)
        assert ref.ulp_error(np.moveaxis(yl, -1, 1), e) <= TOL_EPS[y.dtype]


# ----------------------------------------------------------------------------------------------
# out=, out=x, layouts that need a copy


@pytest.mark.parametrize("channel_axis", LAYOUTS)
@pytest.mark.parametrize("how", ["mask", "lengths"])
def test_out_and_in_place(channel_axis, how):
    r = rng((channel_axis, how))
    x = to_layout(make(r, (3, 4, 200), np.float32), channel_axis)
    kw = {"lengths": [200, 50, 0]} if how == "lengths" else {"mask": r.random((3, 200)) < 0.5}
    expect = instance_norm(x, channel_axis=channel_axis, **kw)
    out = np.full_like(x, 7.0)
    res = instance_norm(x, channel_axis=channel_axis, out=out, **kw)
    assert res is out
    np.testing.assert_array_equal(out, expect)
    xc = x.copy()
    res = instance_norm(xc, channel_axis=channel_axis, out=xc, **kw)
    assert res is xc
    np.testing.assert_array_equal(xc, expect)


@pytest.mark.parametrize("channel_axis", [1, 2, -1])
def test_middle_channel_axis_and_strided_input(channel_axis):
    r = rng(channel_axis)
    x = make(r, (2, 6, 5, 40), np.float64)[:, :, :, ::2]
    m = r.random((2, 6, 5, 20)) < 0.5
    m = np.take(m, [0], axis=channel_axis)  # channel axis of size 1
    check(x, channel_axis=channel_axis, mask=m)
    mper = r.random(x.shape) < 0.5
    check(x, channel_axis=channel_axis, mask=mper)


def test_mask_broadcasting_shapes():
    r = rng(5)
    x = make(r, (3, 4, 6, 7), np.float32)
    for shape in [(3, 6, 7), (3, 1, 6, 7), (3, 4, 6, 7), (1, 1, 6, 7), (3, 1, 1, 7), (6, 7)[:0]]:
        if not shape:
            continue
        m = r.random(shape) < 0.5
        check(x, mask=m)
    check(x, mask=[[[True] * 7] * 6] * 3)  # nested lists of bools


# ----------------------------------------------------------------------------------------------
# running statistics and eval mode


@pytest.mark.parametrize("channel_axis", LAYOUTS)
@pytest.mark.parametrize("how", ["mask", "lengths"])
def test_running_statistics_use_each_count(channel_axis, how):
    r = rng((channel_axis, how, "run"))
    N, C, L = 4, 3, 60
    x = to_layout(make(r, (N, C, L), np.float64), channel_axis)
    lengths = np.array([60, 0, 1, 25])
    kw = {"lengths": lengths}
    if how == "mask":
        kw = {"mask": np.arange(L)[None, :] < lengths[:, None]}
    rm, rv = np.full(C, 0.5), np.full(C, 2.0)
    erm, erv = rm.copy(), rv.copy()
    instance_norm(x, channel_axis=channel_axis, running_mean=rm, running_var=rv,
                  momentum=0.3, **kw)  # fmt: skip
    ref.instance_norm(x, channel_axis=channel_axis, running_mean=erm, running_var=erv,
                      momentum=0.3, **kw)  # fmt: skip
    np.testing.assert_allclose(rm, erm, rtol=1e-14)
    np.testing.assert_allclose(rv, erv, rtol=1e-14)
    # by hand: the mean over samples 0, 2, 3; the unbiased variance over samples 0 and 3
    xc = np.moveaxis(x, channel_axis, 1)
    seg = [xc[n, :, : lengths[n]] for n in range(N)]
    hm = np.mean([seg[n].mean(axis=-1) for n in (0, 2, 3)], axis=0)
    hv = np.mean([seg[n].var(axis=-1, ddof=1) for n in (0, 3)], axis=0)
    np.testing.assert_allclose(rm, 0.7 * 0.5 + 0.3 * hm, rtol=1e-13)
    np.testing.assert_allclose(rv, 0.7 * 2.0 + 0.3 * hv, rtol=1e-13)


def test_running_statistics_unchanged_when_no_instance_has_any():
    rm, rv = np.full(2, 0.5), np.full(2, 2.0)
    instance_norm(np.ones((2, 2, 5)), running_mean=rm, running_var=rv, lengths=[0, 0])
    np.testing.assert_array_equal(rm, 0.5)
    np.testing.assert_array_equal(rv, 2.0)


@pytest.mark.parametrize("channel_axis", LAYOUTS)
@pytest.mark.parametrize("how", ["shared", "per", "lengths"])
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_running_statistics_normalize_valid_elements(channel_axis, how, dtype):
    r = rng((channel_axis, how, dtype, "eval"))
    x = to_layout(make(r, (3, 5, 400), dtype), channel_axis)
    kw = {"lengths": [400, 0, 77]} if how == "lengths" else {}
    if how != "lengths":
        kw = {"mask": random_mask(r, x.shape, channel_axis, how)}
    rm, rv = r.standard_normal(5), r.uniform(0.5, 2, 5)
    run = {"running_mean": rm, "running_var": rv, "use_input_stats": False}
    check(x, channel_axis=channel_axis, weight=r.standard_normal(5), **run, **kw)


# ----------------------------------------------------------------------------------------------
# MaskedArray


@pytest.mark.parametrize("channel_axis", LAYOUTS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_masked_array(channel_axis, dtype):
    r = rng((channel_axis, dtype, "ma"))
    x = to_layout(make(r, (3, 4, 100), dtype), channel_axis)
    invalid = r.random(x.shape) < 0.3
    xm = np.ma.MaskedArray(x, mask=invalid)
    y, mean, rstd = instance_norm(xm, channel_axis=channel_axis, return_stats=True)
    assert isinstance(y, np.ma.MaskedArray)
    np.testing.assert_array_equal(np.ma.getmaskarray(y), invalid)
    e = ref.instance_norm(x, channel_axis=channel_axis, mask=~invalid, exact=True)
    assert ref.ulp_error(y.data, e) <= TOL_EPS[y.dtype]
    assert np.all(y.data[invalid] == 0)
    np.testing.assert_array_equal(xm.mask, invalid)  # its mask is not changed
    ym = instance_norm(x, channel_axis=channel_axis, mask=~invalid)
    np.testing.assert_array_equal(y.data, ym)
    dy = make(r, x.shape, dtype)
    gx, gw, gb = instance_norm_backward(dy, xm, mean, rstd, channel_axis=channel_axis)
    assert isinstance(gx, np.ma.MaskedArray)
    gm, gwm, gbm = instance_norm_backward(dy, x, mean, rstd, channel_axis=channel_axis,
                                          mask=~invalid)  # fmt: skip
    np.testing.assert_array_equal(gx.data, gm)
    np.testing.assert_array_equal(gw, gwm)


@pytest.mark.parametrize("channel_axis", LAYOUTS)
def test_every_mask_reaches_the_kernels_read_only(channel_axis):
    """A MaskedArray's mask (writeable), a writeable mask= and a broadcast one (read-only) run
    one compilation of each kernel.  Two compilations may round reassociated sums
    differently: with a kernel compiled in this process for one and loaded from the disk
    cache for the other, a MaskedArray and the same mask= differed by 1 ulp (float64)."""
    r = rng((channel_axis, "readonly"))
    x = to_layout(make(r, (3, 4, 100), np.float64), channel_axis)
    invalid = r.random(x.shape) < 0.3
    shared = r.random((3, 100)) < 0.5
    kern = K.cf_mask_fused if channel_axis == 1 else K.cl_mask_fused
    instance_norm(np.ma.MaskedArray(x, mask=invalid), channel_axis=channel_axis)
    instance_norm(x, channel_axis=channel_axis, mask=~invalid)
    instance_norm(x, channel_axis=channel_axis, mask=shared)  # (a broadcast view)
    instance_norm(x, channel_axis=channel_axis, mask=np.broadcast_to(~invalid, x.shape))
    masks = [sig[1] for sig in kern.serial.signatures]
    assert masks and all(not m.mutable for m in masks), masks


def test_masked_array_in_place():
    x = rng(3).standard_normal((2, 3, 30))
    xm = np.ma.MaskedArray(x.copy(), mask=rng(4).random(x.shape) < 0.3)
    expect = instance_norm(x, mask=~xm.mask)
    res = instance_norm(xm, out=xm)
    assert res is xm
    np.testing.assert_array_equal(xm.data, expect)


# ----------------------------------------------------------------------------------------------
# backward


def check_backward(dy, x, *, weight=None, channel_axis=1, eps=1e-5, **kw):
    _, mean, rstd = instance_norm(
        x, weight, channel_axis=channel_axis, eps=eps, return_stats=True, **kw
    )
    before = [np.array(a, copy=True) for a in (dy, x, mean, rstd)]
    dx, gw, gb = instance_norm_backward(dy, x, mean, rstd, weight, channel_axis=channel_axis, **kw)
    edx, egw, egb = ref.instance_norm_backward(
        before[0], before[1], weight, eps=eps, channel_axis=channel_axis, exact=True, **kw
    )
    assert dx.dtype == ref.result_dtype(before[1].dtype) and dx.shape == before[1].shape
    C = before[1].shape[channel_axis]
    assert gw.shape == gb.shape == (C,) and gw.dtype == np.float64
    scale = ref.backward_accuracy_scale(
        before[0], before[1], weight, eps=eps, channel_axis=channel_axis, **kw
    )
    err = ref.ulp_error(dx, edx, scale=scale if dx.dtype == np.float64 else None)
    assert err <= TOL_EPS[dx.dtype], f"error {err:.3g} eps"
    valid = valid_of(before[1].shape, channel_axis, **kw)
    assert np.all(dx[~valid] == 0)
    for a, b in zip((dy, x, mean, rstd), before, strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)
    # sums of the valid elements, within a few float64 eps of the sum of magnitudes
    v = np.moveaxis(valid, channel_axis, 1).reshape(before[1].shape[0], C, -1)
    xl = np.moveaxis(before[1], channel_axis, 1).reshape(v.shape).astype(float)
    dyl = np.moveaxis(before[0], channel_axis, 1).reshape(v.shape).astype(float)
    with np.errstate(all="ignore"):
        xhat = np.where(v, np.abs((xl - mean[..., None]) * rstd[..., None]), 0)
        mag_b = np.where(v, np.abs(dyl), 0).sum(axis=(0, 2))
        mag_w = (np.where(v, np.abs(dyl), 0) * xhat).sum(axis=(0, 2))
    tol = 8 * np.finfo(np.float64).eps
    for ours, exact, mag in ((gb, egb, mag_b), (gw, egw, mag_w)):
        exact = exact.astype(float)
        assert np.all(np.abs(ours - exact) <= tol * mag), (ours, exact)
    return dx, gw, gb


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", ">f8"])
@pytest.mark.parametrize("channel_axis", LAYOUTS)
@pytest.mark.parametrize("how", ["shared", "one", "per", "lengths"])
@pytest.mark.parametrize("L", [9, 300, 5000])
def test_backward(dtype, channel_axis, how, L):
    r = rng((dtype, channel_axis, how, L, "bwd"))
    N, C = 4, 6
    x = to_layout(make(r, (N, C, L), np.float64, 2.0), channel_axis).astype(dtype)
    dy = make(r, x.shape, ref.result_dtype(x.dtype))
    if how == "lengths":
        kw = {"lengths": np.array([L, 0, 1, r.integers(2, L)])}
    else:
        kw = {"mask": random_mask(r, x.shape, channel_axis, how)}
    check_backward(dy, x, weight=r.standard_normal(C), channel_axis=channel_axis, **kw)


@pytest.mark.parametrize("channel_axis", LAYOUTS)
def test_backward_nan_in_invalid_positions_of_x_and_dy(channel_axis):
    r = rng((channel_axis, "bwdnan"))
    x = to_layout(make(r, (3, 4, 200), np.float32), channel_axis)
    dy = make(r, x.shape, np.float32)
    for kw in ({"lengths": [200, 13, 0]}, {"mask": random_mask(r, x.shape, channel_axis, "per")}):
        v = valid_of(x.shape, channel_axis, **kw)
        xb, gb_ = x.copy(), dy.copy()
        xb[~v] = np.nan
        gb_[~v] = np.inf
        dx, gw, gb = check_backward(gb_, xb, channel_axis=channel_axis, **kw)
        assert np.isfinite(dx).all() and np.isfinite(gw).all() and np.isfinite(gb).all()


@pytest.mark.parametrize("channel_axis", LAYOUTS)
def test_backward_out_in_place(channel_axis):
    r = rng((channel_axis, "bwdout"))
    x = to_layout(make(r, (3, 4, 100), np.float64), channel_axis)
    dy = make(r, x.shape, np.float64)
    kw = {"mask": r.random((3, 100)) < 0.5}
    _, mean, rstd = instance_norm(x, channel_axis=channel_axis, return_stats=True, **kw)
    expect = instance_norm_backward(dy, x, mean, rstd, channel_axis=channel_axis, **kw)[0]
    g = dy.copy()
    res = instance_norm_backward(g, x, mean, rstd, channel_axis=channel_axis, out=g, **kw)[0]
    assert res is g
    np.testing.assert_array_equal(g, expect)


# ----------------------------------------------------------------------------------------------
# PyTorch autograd of the masked formula (tests/golden/make_torch_masked.py)

_GOLD = np.load(GOLDEN)
_GOLD_CASES = sorted({k.split("/", 1)[0] for k in _GOLD.files})


def test_golden_file_is_there():
    assert len(_GOLD_CASES) >= 4


@pytest.mark.parametrize("name", _GOLD_CASES)
def test_torch_golden(name):
    g = {k.split("/", 1)[1]: _GOLD[k] for k in _GOLD.files if k.startswith(name + "/")}
    axis = int(g["channel_axis"])
    kw = {"lengths": g["lengths"]} if "lengths" in g else {"mask": g["mask"]}
    x, w, b, dy = g["x"], g["weight"], g["bias"], g["dy"]
    y, mean, rstd = instance_norm(x, w, b, channel_axis=axis, return_stats=True, **kw)
    eps64 = np.finfo(np.float64).eps
    scale = ref.accuracy_scale(x, w, b, channel_axis=axis, **kw)
    assert ref.ulp_error(y, g["y"], scale=scale) <= 8
    np.testing.assert_allclose(mean, g["mean"], rtol=1e-13, atol=1e-13, equal_nan=True)
    dx, gw, gb = instance_norm_backward(dy, x, mean, rstd, w, channel_axis=axis, **kw)
    bscale = ref.backward_accuracy_scale(dy, x, w, channel_axis=axis, **kw)
    assert ref.ulp_error(dx, g["dx"], scale=bscale) <= 16
    v = valid_of(x.shape, axis, **kw)
    ady = np.where(v, np.abs(dy), 0)
    sh = mean.shape + (1,) * (x.ndim - 2)
    xc = np.moveaxis(np.where(v, x, 0), axis, 1)
    xhat = np.abs(xc - np.nan_to_num(mean).reshape(sh)) * np.nan_to_num(rstd).reshape(sh)
    xhat = np.where(v, np.moveaxis(xhat, 1, axis), 0)
    caxes = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    mag_w = (ady * xhat).sum(axis=caxes)
    assert np.all(np.abs(gw - g["dw"]) <= 16 * eps64 * mag_w), (gw, g["dw"])
    assert np.all(np.abs(gb - g["db"]) <= 16 * eps64 * ady.sum(axis=caxes)), (gb, g["db"])


# ----------------------------------------------------------------------------------------------
# layers


@pytest.mark.parametrize("how", ["mask", "lengths"])
def test_layer_forward_backward_with_mask(how):
    r = rng((how, "layer"))
    x = make(r, (3, 4, 120), np.float64)
    lengths = np.array([120, 40, 0])
    kw = {"lengths": lengths}
    if how == "mask":
        kw = {"mask": np.arange(120)[None, :] < lengths[:, None]}
    layer = InstanceNorm1d(4, affine=True, track_running_stats=True, dtype=np.float64)
    layer.weight[...] = r.standard_normal(4)
    layer.bias[...] = r.standard_normal(4)
    y = layer(x, **kw)
    ey = ref.instance_norm(x, layer.weight, layer.bias, **kw)
    np.testing.assert_allclose(y, ey, rtol=1e-14, atol=1e-14)
    erm, erv = np.zeros(4), np.ones(4)
    ref.instance_norm(x, running_mean=erm, running_var=erv, **kw)
    np.testing.assert_allclose(layer.running_mean, erm, rtol=1e-14, atol=1e-16)
    np.testing.assert_allclose(layer.running_var, erv, rtol=1e-14)
    dy = make(r, x.shape, np.float64)
    gx = layer.backward(dy)
    edx, egw, egb = ref.instance_norm_backward(dy, x, layer.weight, **kw)
    np.testing.assert_allclose(gx, edx, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(layer.grad_weight, egw, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.grad_bias, egb, rtol=1e-12, atol=1e-12)
    # eval mode: the running statistics on the valid elements, constant in the gradient
    layer.eval()
    y = layer(x, **kw)
    v = valid_of(x.shape, 1, **kw)
    a = (layer.weight / np.sqrt(layer.running_var + layer.eps))[:, None]
    e = np.where(v, (x - layer.running_mean[:, None]) * a + layer.bias[:, None], 0)
    np.testing.assert_allclose(y, e, rtol=1e-14, atol=1e-14)
    gx = layer.backward(dy)
    np.testing.assert_allclose(gx, np.where(v, dy * a, 0), rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(layer.grad_bias, np.where(v, dy, 0).sum(axis=(0, 2)), rtol=1e-13)
    xhat = np.where(
        v, (x - layer.running_mean[:, None]) / np.sqrt(layer.running_var + 1e-5)[:, None], 0
    )
    np.testing.assert_allclose(layer.grad_weight, (dy * xhat).sum(axis=(0, 2)), rtol=1e-12)


def test_layer_channels_last_and_unbatched():
    r = rng("layer2")
    x = make(r, (2, 50, 3), np.float32)
    m = r.random((2, 50)) < 0.5
    layer = InstanceNorm(3, channel_axis=-1)
    y = layer(x, mask=m)
    np.testing.assert_array_equal(y, instance_norm(x, channel_axis=-1, mask=m))
    gx = layer.backward(np.ones_like(x))
    assert np.all(gx[~m] == 0)
    one = InstanceNorm1d(3)
    xu = make(r, (3, 40), np.float32)
    yu = one(xu, lengths=25)
    np.testing.assert_array_equal(yu, instance_norm(xu[None], lengths=[25])[0])
    assert one.backward(np.ones_like(xu)).shape == xu.shape


# ----------------------------------------------------------------------------------------------
# errors: the new arguments (exact type, the argument and the value named)

X3 = np.zeros((2, 3, 5), np.float32)
X4 = np.zeros((2, 3, 4, 5), np.float32)

ERRORS = [
    # (x, kwargs, exception, words the message must contain)
    (X3, {"mask": np.ones((2, 5), int)}, TypeError, ["mask", "int64"]),
    (X3, {"mask": np.ones((2, 5), np.float32)}, TypeError, ["mask", "float32"]),
    (X3, {"mask": np.ones((2, 4), bool)}, ValueError, ["mask", "(2, 4)"]),
    (X3, {"mask": np.ones((2, 2, 5), bool)}, ValueError, ["mask", "(2, 2, 5)"]),
    (X3, {"mask": np.ones((3, 5), bool)}, ValueError, ["mask", "(3, 5)"]),
    (X3, {"mask": np.ones(5, bool)}, ValueError, ["mask", "(5,)"]),
    (X3, {"mask": np.ones((2, 3, 5, 1), bool)}, ValueError, ["mask", "(2, 3, 5, 1)"]),
    (X3, {"mask": "yes"}, TypeError, ["mask", "<U3"]),
    (X3, {"mask": [[True, False], [True]]}, TypeError, ["mask"]),
    (X3, {"lengths": [1, 6]}, ValueError, ["lengths", "0..5", "lengths[1]=6"]),
    (X3, {"lengths": [-1, 2]}, ValueError, ["lengths", "lengths[0]=-1"]),
    (X3, {"lengths": [1.5, 2.0]}, TypeError, ["lengths", "float64"]),
    (X3, {"lengths": [True, False]}, TypeError, ["lengths", "bool"]),
    (X3, {"lengths": [1, 2, 3]}, ValueError, ["lengths", "(2,)", "(3,)"]),
    (X3, {"lengths": 3}, ValueError, ["lengths", "(2,)", "()"]),
    (X3, {"lengths": "ab"}, TypeError, ["lengths", "<U2"]),
    (X4, {"lengths": [1, 2]}, ValueError, ["lengths", "one spatial axis", "(2, 3, 4, 5)"]),
    (X3, {"lengths": [1, 2], "mask": np.ones((2, 5), bool)}, ValueError, ["mask", "lengths"]),
    (np.ma.MaskedArray(X3), {"lengths": [1, 2]}, ValueError, ["MaskedArray", "lengths"]),
]


@pytest.mark.parametrize("x, kw, exc, words", ERRORS)
@pytest.mark.parametrize("fn", ["forward", "backward"])
def test_errors(x, kw, exc, words, fn):
    with pytest.raises(exc) as info:
        if fn == "forward":
            instance_norm(x, **kw)
        else:
            st = np.zeros((2, 3))
            instance_norm_backward(np.zeros(x.shape, np.float32), x, st, st, **kw)
    assert type(info.value) is exc
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_layer_errors():
    layer = InstanceNorm1d(3)
    with pytest.raises(ValueError, match="lengths"):
        layer(np.zeros((2, 3, 5)), lengths=[7, 1])
    with pytest.raises(TypeError, match="mask"):
        layer(np.zeros((2, 3, 5)), mask=np.ones((2, 5), int))
