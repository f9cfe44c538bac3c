"""Property tests: hostile inputs drawn by Hypothesis (every dtype, layout, channel axis,
value kind, NaN/Inf, out= aliasing, running statistics) for the forward, the backward and the
layers, each against the extended-precision reference or the documented error."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from conftest import HYPOTHESIS, RUNNING_TOL_EPS, TOL_EPS, assert_matches_reference
from hypothesis import given
from hypothesis import strategies as st

import instnorm_numba
from instnorm_numba import reference as ref

X_DTYPES = ["f2", "f4", "f8", ">f2", ">f4", ">f8", "i1", "u1", "i2", ">i4", "i8", "u8", "?"]
VALUE_KINDS = ["normal", "offset", "constant", "extreme", "subnormal", "tiny-spread", "integer"]


def _values(r, shape, dtype: np.dtype, kind: str) -> np.ndarray:
    """float64 values of one kind, representable in ``dtype`` (integers within 2**53)."""
    if dtype.kind == "b":
        return (r.random(shape) > 0.5).astype(np.float64)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        lo, hi = max(info.min, -(2**53)), min(info.max, 2**53)
        if kind in ("offset", "extreme"):
            base = r.integers(lo, hi, dtype=np.int64, endpoint=True)
            v = base + r.integers(-3, 4, shape)
        else:
            v = r.integers(max(lo, -100), min(hi, 100), shape, endpoint=True)
        return np.clip(v, lo, hi).astype(np.float64)
    big = float(np.finfo(dtype).max)
    tiny = float(np.finfo(dtype).smallest_subnormal)
    if kind == "normal":
        v = r.standard_normal(shape) * 10.0 ** r.integers(-3, 4)
    elif kind == "offset":  # far from zero, small spread: a naive sum of squares loses it all
        off = {2: 1e3, 4: 1e6, 8: 1e12}[dtype.itemsize] * r.choice([-1, 1])
        v = off + r.standard_normal(shape) * {2: 4.0, 4: 1.0, 8: 1e-2}[dtype.itemsize]
    elif kind == "constant":
        v = np.full(shape, r.standard_normal() * 100)
    elif kind == "extreme":  # near the dtype's limit (float32: 3e38), both signs
        v = r.uniform(0.5, 1.0, shape) * big * r.choice([-1, 1], shape)
        if dtype.itemsize == 8:
            v *= 1e-160  # float64: the squared spread must stay finite (README "Accuracy")
    elif kind == "subnormal":
        v = r.integers(-20, 21, shape) * tiny
    elif kind == "tiny-spread":  # one instance varying in its last bits
        v = 1.0 + r.integers(0, 3, shape) * float(np.finfo(dtype).eps)
    else:
        v = r.integers(-5, 6, shape).astype(np.float64)
    return v


@st.composite
def cases(draw):
    seed = draw(st.integers(0, 2**32 - 1))
    r = np.random.default_rng(seed)
    ndim = draw(st.integers(3, 5))
    big = draw(st.sampled_from([False] * 9 + [True]))  # now and then: parallel / split paths
    if big:
        shape = [draw(st.integers(1, 2)), draw(st.integers(1, 3))]
        shape += [draw(st.sampled_from([1, 2, 3]))] * (ndim - 3) + [draw(st.integers(23000, 70000))]
    else:
        sizes = st.sampled_from([0, 1, 1, 2, 3, 4, 5, 7])
        shape = [draw(sizes) for _ in range(ndim)]
    axis = draw(st.integers(1, ndim - 1))
    channel_axis = draw(st.sampled_from([axis, axis - ndim]))
    dtype = np.dtype(draw(st.sampled_from(X_DTYPES)))
    kind = draw(st.sampled_from(VALUE_KINDS))
    layout = draw(st.sampled_from(["C", "F", "strided", "reversed", "transposed"]))
    # the values, in a layout
    shape = tuple(shape)
    if layout == "strided":
        full = _values(r, shape[:-1] + (2 * shape[-1] + 1,), dtype, kind)
        vals = full[..., 1::2]
    else:
        vals = _values(r, shape, dtype, kind)
    nonfinite = draw(st.sampled_from(["none"] * 3 + ["nan", "inf", "mixed"]))
    if nonfinite != "none" and dtype.kind == "f" and vals.size:
        k = draw(st.integers(1, 3))
        for _ in range(k):
            idx = tuple(r.integers(0, s) for s in vals.shape)
            bad = {"nan": np.nan, "inf": np.inf * r.choice([-1, 1])}.get(
                nonfinite, r.choice([np.nan, np.inf, -np.inf])
            )
            vals[idx] = bad
    with np.errstate(all="ignore"):
        x = vals.astype(dtype)
    if layout == "F":
        x = np.asfortranarray(x)
    elif layout == "reversed":
        x = x[::-1, ..., ::-1]
    elif layout == "transposed" and ndim >= 4:
        x = np.ascontiguousarray(np.swapaxes(x, -1, -2)).swapaxes(-1, -2)
    C = x.shape[channel_axis]
    kw = {"channel_axis": channel_axis, "eps": draw(st.sampled_from([1e-5, 0.0, 1e-3, 1.0]))}
    if kind == "subnormal" and dtype.itemsize == 8 and kw["eps"] == 0.0:
        # documented limit: float64 statistics are float64, so with eps=0 a spread below
        # ~1e-154 squares to 0 (and one above ~1e154 to inf); eps > 0 is fine
        kw["eps"] = 1e-300
    weight = bias = None
    if draw(st.booleans()):
        weight = (r.standard_normal(C) * 3).astype(draw(st.sampled_from(["f8", "f4", "i4"])))
    if draw(st.booleans()):
        bias = r.standard_normal(C) * 3
    running = draw(st.sampled_from(["none", "none", "update", "eval"]))
    if running != "none":
        rdt = draw(st.sampled_from(["f8", "f4"]))
        kw["running_mean"] = (r.standard_normal(C) * 2).astype(rdt)
        kw["running_var"] = r.uniform(0.1, 5.0, C).astype(rdt)
        kw["use_input_stats"] = running == "update"
        kw["momentum"] = draw(st.sampled_from([0.1, 0.0, 1.0, 0.5]))
    out = draw(st.sampled_from(["none", "none", "fresh", "fresh-F", "alias", "overlap"]))
    return x, weight, bias, kw, out, draw(st.booleans())


def _expect_error(x, kw):
    """The documented exception a case must raise, or None."""
    axis = kw["channel_axis"] % x.ndim
    spatial = int(np.prod([s for i, s in enumerate(x.shape) if i not in (0, axis)]))
    if kw.get("use_input_stats", True) and "running_mean" in kw and spatial <= 1:
        return ValueError, "running statistics"
    return None


@HYPOTHESIS
@given(cases())
def test_hostile_input_matches_reference_or_raises_documented_error(case):
    x, weight, bias, kw, out_kind, return_stats = case
    rdt = ref.result_dtype(x.dtype)
    before = x.copy()
    running_before = {k: kw[k].copy() for k in ("running_mean", "running_var") if k in kw}
    out = None
    x_call = x
    if out_kind == "fresh":
        out = np.full(x.shape, 7, rdt)
    elif out_kind == "fresh-F":
        out = np.asfortranarray(np.full(x.shape, 7, rdt))
    elif out_kind == "alias":
        out = x  # a dtype other than the result dtype must be refused (documented TypeError)
    elif out_kind == "overlap" and x.shape[-1] >= 1 and x.dtype == rdt:
        # x and out are shifted views of one buffer: a partial overlap
        buf = np.zeros(x.shape[:-1] + (x.shape[-1] + 1,), rdt)
        buf[..., :-1] = x
        x_call, out = buf[..., :-1], buf[..., 1:]

    expected_error = _expect_error(x, kw)
    if out is x and x.dtype != rdt:
        expected_error = (TypeError, "out must have dtype")
    if expected_error is not None:
        exc_type, match = expected_error
        with pytest.raises(exc_type, match=match) as info:
            instnorm_numba.instance_norm(x_call, weight, bias, out=out, **kw)
        assert type(info.value) is exc_type
        np.testing.assert_array_equal(x_call, before)
        for k, v in running_before.items():  # nothing half-done on error
            np.testing.assert_array_equal(kw[k], v)
        return

    ref_kw = dict(kw)
    for k in running_before:
        ref_kw[k] = running_before[k].copy()  # the reference updates its own copies
    xin = before.astype(np.float64) if before.dtype.kind in "iub" else before
    exact, emean, erstd = ref.instance_norm(
        xin, weight, bias, return_stats=True, exact=True, **ref_kw
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no stray RuntimeWarning from NaN/Inf input
        res = instnorm_numba.instance_norm(
            x_call, weight, bias, out=out, return_stats=return_stats, **kw
        )
    y, mean, rstd = res if return_stats else (res, None, None)
    assert isinstance(y, np.ndarray) and y.dtype == rdt and y.shape == x.shape
    if out is not None:
        assert y is out
    else:
        np.testing.assert_array_equal(x_call, before)  # the input is unchanged

    scale = None
    if rdt == np.float64:
        scale = ref.accuracy_scale(
            xin, weight, bias, **{k: v for k, v in ref_kw.items() if k != "momentum"}
        )
    assert_matches_reference(y, exact, dtype=rdt, scale=scale)  # beyond range: +-inf

    if return_stats:
        assert mean.dtype == rstd.dtype == np.float64 and mean.shape == rstd.shape
        for got, want in ((mean, emean), (rstd, erstd)):
            want = np.asarray(want, dtype=np.float64)
            if not kw.get("use_input_stats", True):
                want = np.broadcast_to(want, got.shape)
            # non-finite exactly where the reference is (the reference's NaN may be -inf
            # here: the mean of [1, -inf, 2] is -inf, and NumPy agrees)
            fin = np.isfinite(want)
            np.testing.assert_array_equal(np.isfinite(got), fin)
            spread = np.where(np.isfinite(erstd) & (erstd > 0), 1 / erstd.astype(np.float64), 0)
            spread = np.broadcast_to(spread, got.shape)
            tol = 1e-13 * (np.abs(want) + spread) + 1e-300
            assert np.all(np.abs(got[fin] - want[fin]) <= tol[fin])

    if running_before and kw["use_input_stats"]:
        # the batch statistic s itself (momentum 1), to scale the error of (1-m) r + m s
        s_kw = {**ref_kw, "momentum": 1.0}
        for k in running_before:
            s_kw[k] = running_before[k].astype(np.float64)
        ref.instance_norm(xin, weight, bias, **s_kw)
    for k, old in running_before.items():  # running statistics updated as the reference does
        got, want = kw[k], ref_kw[k]
        assert got.dtype == old.dtype
        if not kw["use_input_stats"]:
            np.testing.assert_array_equal(got, old)
        else:
            m = kw["momentum"]
            with np.errstate(all="ignore"):
                scale = abs(1 - m) * np.abs(old.astype(np.float64)) + abs(m) * np.abs(s_kw[k])
            # an Inf in the input may give -inf or NaN statistics: non-finite either way
            fin = np.isfinite(want)
            np.testing.assert_array_equal(np.isfinite(got), fin)
            err = ref.ulp_error(got[fin], want[fin], dtype=got.dtype, scale=scale[fin])
            assert err <= RUNNING_TOL_EPS[got.dtype], (k, err, got, want)


@pytest.mark.parametrize(
    "shape,channel_axis", [((1, 4096, 200), 1), ((1, 2, 3, 3, 23000), 4)], ids=["cf", "cl"]
)
def test_float64_guarantee_on_many_instances(shape, channel_axis):
    x = np.random.default_rng(0).standard_normal(shape) * 1e-2
    y = instnorm_numba.instance_norm(x, channel_axis=channel_axis)
    exact = ref.instance_norm(x, channel_axis=channel_axis, exact=True)
    assert ref.ulp_error(y, exact) <= 4.0


# ----------------------------------------------------------------------------------------------
# hostile input for the backward pass


@st.composite
def backward_cases(draw):
    x, weight, _bias, kw, _out, _stats = draw(cases())
    rdt = ref.result_dtype(x.dtype)
    r = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    dy_order = draw(st.sampled_from(["=", "swapped"]))
    dy_dtype = rdt if dy_order == "=" else rdt.newbyteorder()
    with np.errstate(all="ignore"):
        dy = (r.standard_normal(x.shape) * draw(st.sampled_from([1.0, 1e-3, 100.0]))).astype(
            dy_dtype
        )
    if draw(st.booleans()):
        dy = np.asfortranarray(dy)
    out = draw(st.sampled_from(["none", "none", "fresh", "alias-dy", "alias-x"]))
    return x, dy, weight, kw["channel_axis"], kw["eps"], out


@HYPOTHESIS
@given(backward_cases())
def test_hostile_input_backward_matches_reference_or_raises_documented_error(case):
    x, dy, weight, channel_axis, eps, out_kind = case
    rdt = ref.result_dtype(x.dtype)
    _, mean, rstd = instnorm_numba.instance_norm(
        x, weight, eps=eps, channel_axis=channel_axis, return_stats=True
    )
    before = [a.copy() for a in (x, dy, mean, rstd)]
    out = {"none": None, "fresh": np.full(x.shape, 7, rdt), "alias-dy": dy, "alias-x": x}[out_kind]
    if out is not None and out.dtype != rdt:  # documented: out must have the result dtype
        with pytest.raises(TypeError, match="^out must have dtype"):
            instnorm_numba.instance_norm_backward(
                dy, x, mean, rstd, weight, channel_axis=channel_axis, out=out
            )
        for a, b in zip((x, dy, mean, rstd), before, strict=True):
            np.testing.assert_array_equal(a, b)
        return
    xin = before[0].astype(np.float64) if x.dtype.kind in "iub" else before[0]
    edx, egw, egb = ref.instance_norm_backward(
        before[1], xin, weight, eps=eps, channel_axis=channel_axis, exact=True
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dx, gw, gb = instnorm_numba.instance_norm_backward(
            dy, x, mean, rstd, weight, channel_axis=channel_axis, out=out
        )
    assert dx.dtype == rdt and dx.shape == x.shape
    assert gw.dtype == gb.dtype == np.float64 and gw.shape == gb.shape == (x.shape[channel_axis],)
    if out is not None:
        assert dx is out
    for a, b, name in zip((x, dy), before[:2], ("x", "grad_output"), strict=True):
        if a is not out:
            np.testing.assert_array_equal(a, b, err_msg=f"{name} was modified")
    scale = ref.backward_accuracy_scale(before[1], xin, weight, eps=eps, channel_axis=channel_axis)
    with np.errstate(all="ignore"):
        overflow = np.isfinite(edx) & np.isinf(edx.astype(rdt))
        edx = np.where(overflow, edx.astype(rdt).astype(edx.dtype), edx)
    if rdt == np.float64:
        err = ref.ulp_error(dx, edx, dtype=rdt, scale=scale)
        assert err <= TOL_EPS[rdt], f"dx error {err:.3g} eps of {rdt}"
    else:
        # float32/float16: 1 eps of the dtype relative to max(1, |dx|), plus what float64
        # arithmetic can lose where the terms cancel: with eps=0 and a tiny variance rstd
        # reaches 1e44 and the terms ~1e44 * |dy| cancel to ~0 (documented exception)
        with np.errstate(all="ignore"):
            a, e = dx.astype(ref.XP), edx.astype(ref.XP)
            same = (np.isnan(a) & np.isnan(e)) | (a == e)
            bound = TOL_EPS[rdt] * ref.XP(np.finfo(rdt).eps) * np.maximum(1, np.abs(e))
            bound = bound + 8 * ref.XP(np.finfo(np.float64).eps) * np.abs(scale)
            ok = same | (np.abs(a - e) <= bound)
        assert ok.all(), f"dx off at {np.argwhere(~ok)[:3].tolist()}: {a[~ok][:3]} vs {e[~ok][:3]}"
    # parameter gradients: float64 sums, accurate relative to the sum of magnitudes
    for got, want in ((gw, egw), (gb, egb)):
        fin = np.isfinite(want)
        np.testing.assert_array_equal(np.isfinite(got), fin)
        mag = np.abs(want[fin]).astype(np.float64) + 1.0
        assert np.all(np.abs(got[fin] - want[fin]) <= 1e-9 * mag * max(1, x.size))


# ----------------------------------------------------------------------------------------------
# hostile input for the layers: a training step, then eval, against the reference


@st.composite
def layer_cases(draw):
    x, weight, bias, kw, _out, _stats = draw(cases())
    layer_dtype = draw(st.sampled_from([np.float32, np.float64]))
    affine = draw(st.booleans())
    track = draw(st.booleans())
    momentum = draw(st.sampled_from([0.1, None, 1.0]))
    return x, kw["channel_axis"], kw["eps"], layer_dtype, affine, track, momentum, weight, bias


@HYPOTHESIS
@given(layer_cases())
def test_hostile_input_layer_matches_reference_or_raises_documented_error(case):
    x, channel_axis, eps, ldt, affine, track, momentum, weight, bias = case
    C = x.shape[channel_axis]
    make = lambda: instnorm_numba.InstanceNorm(  # noqa: E731
        C,
        eps=eps,
        momentum=momentum,
        affine=affine,
        track_running_stats=track,
        channel_axis=channel_axis,
        dtype=ldt,
    )
    if C == 0:
        with pytest.raises(ValueError, match="^num_features must be >= 1"):
            make()
        return
    layer = make()
    if affine:
        if weight is not None:
            layer.weight[...] = weight
        if bias is not None:
            layer.bias[...] = bias
    w = layer.weight.copy() if affine else None
    b = layer.bias.copy() if affine else None
    rm = layer.running_mean.copy() if track else None
    rv = layer.running_var.copy() if track else None
    before = x.copy()
    rdt = ref.result_dtype(x.dtype)
    xin = before.astype(np.float64) if x.dtype.kind in "iub" else before
    axis = channel_axis % x.ndim
    spatial = int(np.prod([s for i, s in enumerate(x.shape) if i not in (0, axis)]))
    if spatial == 1:  # torch's rule for input statistics, documented
        with pytest.raises(ValueError, match="^Expected more than 1 spatial element"):
            layer(x)
        return
    if spatial == 0 and track:  # no unbiased variance to track: instance_norm refuses
        with pytest.raises(ValueError, match="updating running statistics"):
            layer(x)
        np.testing.assert_array_equal(layer.running_mean, rm)
        return
    # training step: input statistics, running statistics updated in place
    rkw = {}
    if track:
        rkw = {
            "running_mean": rm.copy(),
            "running_var": rv.copy(),
            "momentum": 0.0 if momentum is None else momentum,
        }
    exact = ref.instance_norm(xin, w, b, eps=eps, channel_axis=channel_axis, exact=True, **rkw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = layer(x)
    np.testing.assert_array_equal(x, before)
    assert y.dtype == rdt and y.shape == x.shape
    scale = None
    if rdt == np.float64:
        scale = ref.accuracy_scale(xin, w, b, eps=eps, channel_axis=channel_axis)
    assert_matches_reference(y, exact, dtype=rdt, scale=scale)
    if not track:
        return
    for got, want in (
        (layer.running_mean, rkw["running_mean"]),
        (layer.running_var, rkw["running_var"]),
    ):
        assert got.dtype == ldt
        fin = np.isfinite(want)
        np.testing.assert_array_equal(np.isfinite(got), fin)
        np.testing.assert_allclose(
            got[fin],
            want[fin],
            rtol=1e-6 if ldt == np.float32 else 1e-12,
            atol=1e-6 if ldt == np.float32 else 1e-12,
        )
    # eval: the running statistics normalize, nothing changes
    layer.eval()
    rm2, rv2 = layer.running_mean.copy(), layer.running_var.copy()
    exact = ref.instance_norm(
        xin,
        w,
        b,
        eps=eps,
        channel_axis=channel_axis,
        running_mean=rm2,
        running_var=rv2,
        use_input_stats=False,
        exact=True,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = layer(x)
    np.testing.assert_array_equal(layer.running_mean, rm2)
    np.testing.assert_array_equal(layer.running_var, rv2)
    if rdt == np.float64:
        scale = ref.accuracy_scale(
            xin,
            w,
            b,
            eps=eps,
            channel_axis=channel_axis,
            running_mean=rm2,
            running_var=rv2,
            use_input_stats=False,
        )
    assert_matches_reference(y, exact, dtype=rdt, scale=scale)
