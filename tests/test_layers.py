"""Layers: InstanceNorm{1d,2d,3d} against torch.nn golden files (tests/golden/
make_torch_layers.py, PyTorch 2.13.0), their state dicts and errors, the general InstanceNorm,
and the example script.  torch is not needed here.

Tolerances: float32, in units of its machine epsilon ``EPS``, per element, from the float32
roundings each library does (ours: one rounding of a float64 result, <= 1 eps relative to
max(1, |value|), the guarantee of test_forward.py / test_backward.py; PyTorch: as described at
each comparison, from aten's batch_norm CPU kernels, which accumulate in double and evaluate the
per-element formulas in float32).
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest

import instnorm_numba
from instnorm_numba import InstanceNorm, InstanceNorm1d, InstanceNorm2d, InstanceNorm3d
from instnorm_numba import reference as ref
from instnorm_numba.layers import IncompatibleKeys, StateDictError

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
GOLDEN = HERE / "golden" / "torch_layers.npz"
GOLDEN_LOAD = HERE / "golden" / "torch_layers_load.json"
EXAMPLE = ROOT / "examples" / "tiny_net.py"
EPS = float(np.finfo(np.float32).eps)
CLASSES = {1: InstanceNorm1d, 2: InstanceNorm2d, 3: InstanceNorm3d}
GROUPS = [f"{d}d-{b}" for d in (1, 2, 3) for b in ("b", "u")]
STATE_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


@pytest.fixture(scope="module")
def golden():
    with np.load(GOLDEN) as f:
        return dict(f)


@pytest.fixture(scope="module")
def golden_load():
    return json.loads(GOLDEN_LOAD.read_text())


def torch_message(msg: str) -> str:
    """PyTorch's message with ``torch.Size([2, 3])`` written as a NumPy shape ``(2, 3)``."""

    def shape(m):
        dims = [d.strip() for d in m.group(1).split(",") if d.strip()]
        return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"

    return re.sub(r"torch\.Size\(\[([^\]]*)\]\)", shape, msg)


def parse_case(name: str):
    dim, batched, affine, track, mode, momentum = name.split("-")
    return dict(
        dim=int(dim[0]),
        batched=batched == "b",
        affine=affine == "affine1",
        track=track == "track1",
        training=mode == "train",
        momentum=None if momentum == "mNone" else float(momentum[1:]),
    )


def present_state(golden, group, i, which):
    """The state dict stored for case ``i`` of ``group`` (``which``: init or final)."""
    sd = {}
    for k in STATE_KEYS:
        v = golden[f"{group}/{which}_{k}"][i]
        if (k == "num_batches_tracked" and v >= 0) or (
            k != "num_batches_tracked" and not np.isnan(v).all()
        ):
            sd[k] = v
    return sd


def stats64(x, batched):
    """Per-instance mean and rstd (eps 1e-5), float64, shape (N, C, 1, ...)."""
    xb = np.asarray(x, np.float64) if batched else np.asarray(x, np.float64)[None]
    axes = tuple(range(2, xb.ndim))
    mean = xb.mean(axis=axes, keepdims=True)
    var = ((xb - mean) ** 2).mean(axis=axes, keepdims=True)
    return xb, mean, 1 / np.sqrt(var + 1e-5)


def cvec(v, ndim):
    return np.asarray(v, np.float64).reshape((1, -1) + (1,) * (ndim - 2))


# --------------------------------------------------------------------------------------------
# every combination against PyTorch, step by step


def all_cases():
    with np.load(GOLDEN) as f:
        return [(g, i, str(n)) for g in GROUPS for i, n in enumerate(f[f"{g}/case"])]


def test_golden_covers_every_combination(golden):
    names = {n for _, _, n in all_cases()}
    assert len(names) == 3 * 2 * 2 * 2 * 2 * 2
    combos = {tuple(parse_case(n).values()) for n in names}
    assert len(combos) == 96
    assert golden["in/2d-b/x"].shape[0] >= 3  # several steps: a running-statistics trajectory


@pytest.mark.parametrize("group,i,name", all_cases(), ids=[c[2] for c in all_cases()])
def test_matches_torch_step_by_step(golden, group, i, name):
    c = parse_case(name)
    m = CLASSES[c["dim"]](
        4, momentum=c["momentum"], affine=c["affine"], track_running_stats=c["track"]
    )
    init = present_state(golden, group, i, "init")
    assert m.load_state_dict(init) == ([], [])
    assert m.train(c["training"]) is m and m.training is c["training"]
    X, DY = golden[f"in/{group}/x"], golden[f"in/{group}/dy"]
    for s in range(X.shape[0]):
        x, dy = X[s], DY[s]
        x_before = x.copy()
        y = m(x)
        np.testing.assert_array_equal(x, x_before)
        assert y.shape == x.shape and y.dtype == np.float32
        t = golden[f"{group}/y"][i, s]
        xb, mean, rstd = stats64(x, c["batched"])
        use_input = c["training"] or not c["track"]
        if not use_input:  # normalized with the running statistics (constants here)
            mean = cvec(m.running_mean, xb.ndim)
            rstd = 1 / np.sqrt(cvec(m.running_var, xb.ndim) + 1e-5)
        w = cvec(m.weight if c["affine"] else np.ones(4), xb.ndim)
        b = cvec(m.bias if c["affine"] else np.zeros(4), xb.ndim)
        a = rstd * w
        # PyTorch: y = x * a + (b - mean * a) in float32, a and the offset rounded first:
        # <= eps * (|x a| + |mean a| + |b| + |y|); ours <= eps * max(1, |y|)
        yb = y if c["batched"] else y[None]
        tb = t if c["batched"] else t[None]
        bound = EPS * (
            np.abs(xb * a) + np.abs(mean * a) + np.abs(b) + 2 * np.maximum(1, np.abs(tb))
        )
        assert (np.abs(yb - tb.astype(np.float64)) <= bound).all(), f"y, step {s}"

        dx = m.backward(dy)
        assert dx.shape == x.shape and dx.dtype == np.float32
        td = golden[f"{group}/dx"][i, s]
        dyb = np.asarray(dy, np.float64) if c["batched"] else np.asarray(dy, np.float64)[None]
        axes = tuple(range(2, xb.ndim))
        xhat = (xb - mean) * rstd
        if use_input:
            mdy = dyb.mean(axis=axes, keepdims=True)
            proj = (dyb * xhat).mean(axis=axes, keepdims=True)
        else:
            mdy = proj = np.zeros_like(mean)
        # PyTorch: dx = (dy - mean(dy) - (x - mean) * rstd * proj) * rstd * w in float32,
        # after its double sums, with mean and rstd saved as float32 (rounded: eps |mean|):
        # a few roundings of each term; ours one rounding of the float64 result
        dxb = dx if c["batched"] else dx[None]
        tdb = td if c["batched"] else td[None]
        mean_err = np.abs(mean) * rstd  # |mean| * rstd: the saved mean's rounding, in xhat
        terms = np.abs(a) * (np.abs(dyb) + np.abs(mdy) + (np.abs(xhat) + mean_err) * np.abs(proj))
        bound = EPS * (3 * terms + 2 * np.maximum(1, np.abs(tdb)))
        assert (np.abs(dxb - tdb.astype(np.float64)) <= bound).all(), f"dx, step {s}"

        if c["affine"]:
            # PyTorch may accumulate in float32 (its eval-mode kernel does), then sums the N
            # per-instance results (its weight is repeated N times); it uses the saved float32
            # mean (rounded by eps |mean|). The classical bound of a float32 sum of L * N terms
            # applies: (L + N) eps times the sum of the terms' magnitudes. Ours one rounding.
            L = int(np.prod(xb.shape[2:]))
            n = xb.shape[0]
            mag_w = (np.abs(dyb) * (np.abs(xhat) + mean_err)).sum(axis=(0,) + axes)
            mag_b = np.abs(dyb).sum(axis=(0,) + axes)
            for got, key, mag in (
                (m.grad_weight, "grad_weight", mag_w),
                (m.grad_bias, "grad_bias", mag_b),
            ):
                want = golden[f"{group}/{key}"][i, s].astype(np.float64)
                assert got.dtype == np.float32 and got.shape == (4,)
                bound = EPS * ((L + n) * mag + np.maximum(1, np.abs(want)))
                assert (np.abs(got - want) <= bound).all(), f"{key}, step {s}"
        else:
            assert m.grad_weight is None and m.grad_bias is None

        if c["track"]:
            for key in ("running_mean", "running_var"):
                got = getattr(m, key)
                want = golden[f"{group}/{key}"][i, s].astype(np.float64)
                assert got.dtype == np.float32
                if c["momentum"] is None or not c["training"]:  # frozen: exactly as loaded
                    np.testing.assert_array_equal(got, init[key])
                # PyTorch updates N float32 copies and averages them in float32: N + 1
                # roundings per step, each <= eps / 2 relative; ours 1. Earlier steps' errors
                # carry over with the factor (1 - momentum) <= 1.
                n = xb.shape[0]
                bound = (s + 1) * (n + 2) * EPS / 2 * np.maximum(1, np.abs(want))
                assert (np.abs(got - want) <= bound).all(), f"{key}, step {s}"
            assert m.num_batches_tracked.shape == () and m.num_batches_tracked.dtype == np.int64
            # PyTorch's InstanceNorm never counts (F.instance_norm is called directly)
            assert m.num_batches_tracked == golden[f"{group}/num_batches_tracked"][i, s] == 0
        else:
            assert m.running_mean is None and m.running_var is None
            assert m.num_batches_tracked is None

    # state_dict round trip: ours after the steps against PyTorch's final state dict
    final = present_state(golden, group, i, "final")
    ours = m.state_dict()
    assert list(ours) == list(final)  # same keys, same order
    for k, v in final.items():
        assert ours[k].dtype == v.dtype and ours[k].shape == v.shape, k
        n = 3 if c["batched"] else 1
        tol = X.shape[0] * (n + 2) * EPS / 2 * np.maximum(1, np.abs(v.astype(np.float64)))
        assert (np.abs(ours[k].astype(np.float64) - v) <= tol).all(), k
    fresh = CLASSES[c["dim"]](4, affine=c["affine"], track_running_stats=c["track"])
    assert fresh.load_state_dict(final) == ([], [])
    back = fresh.state_dict()
    assert list(back) == list(final)
    for k, v in final.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        np.testing.assert_array_equal(back[k], v)


# --------------------------------------------------------------------------------------------
# load_state_dict and forward errors, against what PyTorch returned or raised


def _as_arrays(d, dname):
    out = {}
    for k, v in d.items():
        if dname == "float64":
            dtype = np.float64
        else:
            dtype = np.int64 if k == "num_batches_tracked" else np.float32
        out[k] = np.asarray(v, dtype=dtype)
    return out


def _load_ids():
    data = json.loads(GOLDEN_LOAD.read_text())
    return [
        f"{r['dict']}-affine{int(r['affine'])}-track{int(r['track'])}-strict{int(r['strict'])}"
        for r in data["load"]
    ]


@pytest.mark.parametrize("k", range(len(_load_ids())), ids=_load_ids())
def test_load_state_dict_like_torch(golden_load, k):
    rec = golden_load["load"][k]
    C = golden_load["C"]
    sd = _as_arrays(golden_load["dicts"][rec["dict"]], rec["dict"])
    m = InstanceNorm2d(C, affine=rec["affine"], track_running_stats=rec["track"])
    before = m.state_dict()
    if "error" in rec:
        with pytest.raises(StateDictError) as info:
            m.load_state_dict(sd, strict=rec["strict"])
        assert isinstance(info.value, RuntimeError) and isinstance(info.value, ValueError)
        assert str(info.value) == torch_message(rec["message"])
        after = m.state_dict()  # never half-loaded (PyTorch sometimes is: torch_half_loaded)
        assert list(after) == list(before)
        for key in before:
            np.testing.assert_array_equal(after[key], before[key])
    else:
        res = m.load_state_dict(sd, strict=rec["strict"])
        assert isinstance(res, IncompatibleKeys)
        assert res.missing_keys == rec["missing"] and res.unexpected_keys == rec["unexpected"]
        missing, unexpected = res
        assert (missing, unexpected) == (rec["missing"], rec["unexpected"])
        after = m.state_dict()
        assert list(after) == list(rec["loaded"])
        for key, v in rec["loaded"].items():
            np.testing.assert_array_equal(after[key], np.asarray(v))
            assert after[key].dtype == before[key].dtype


def test_some_torch_loads_half_load_and_ours_never(golden_load):
    # the golden table has cases where PyTorch copied entries before raising: the test above
    # shows ours loads nothing in each of them
    assert any(r["torch_half_loaded"] for r in golden_load["load"])


def _forward_ids():
    data = json.loads(GOLDEN_LOAD.read_text())
    return [
        f"{r['dim']}d-{'x'.join(map(str, r['shape']))}-"
        + (
            f"affine{int(r['affine'])}"
            if "affine" in r
            else f"track{int(r['track'])}-train{int(r['training'])}"
        )
        for r in data["forward"]
    ]


@pytest.mark.parametrize("k", range(len(_forward_ids())), ids=_forward_ids())
def test_forward_errors_and_warnings_like_torch(golden_load, k):
    rec = golden_load["forward"][k]
    C = golden_load["C"]
    m = CLASSES[rec["dim"]](
        C, affine=rec.get("affine", False), track_running_stats=rec.get("track", False)
    ).train(rec.get("training", True))
    x = np.zeros(rec["shape"], np.float32)
    if "error" in rec:
        assert rec["error"] == "ValueError"
        with pytest.raises(ValueError) as info:
            m(x)
        assert str(info.value) == torch_message(rec["message"])
    elif rec["warnings"]:
        with pytest.warns(UserWarning) as record:
            y = m(x)
        assert [str(w.message) for w in record] == rec["warnings"]
        assert record[0].filename == __file__  # points at the caller
        assert y.shape == x.shape
    else:
        assert m(x).shape == x.shape  # no warning (warnings are errors here)


def test_mismatch_warning_points_at_the_caller_of_forward_too():
    m = InstanceNorm2d(3)
    with pytest.warns(UserWarning, match="does not match num_features") as record:
        m.forward(np.ones((2, 5, 3, 3), np.float32))
    assert record[0].filename == __file__


# --------------------------------------------------------------------------------------------
# state dicts: files, mappings, errors


def test_state_dict_is_a_copy_with_torch_types():
    m = InstanceNorm3d(5, affine=True, track_running_stats=True, dtype=np.float64)
    sd = m.state_dict()
    assert list(sd) == list(STATE_KEYS)
    assert sd["weight"].dtype == np.float64 and sd["num_batches_tracked"].dtype == np.int64
    assert sd["num_batches_tracked"].shape == ()
    sd["weight"][:] = 7
    assert (m.weight == 1).all()
    assert InstanceNorm1d(2).state_dict() == {}


def test_npz_round_trip(tmp_path):
    m = InstanceNorm2d(3, affine=True, track_running_stats=True)
    rng = np.random.default_rng(3)
    for _ in range(2):
        m(rng.standard_normal((2, 3, 4, 4)).astype(np.float32))
    m.weight[:] = [0.5, 2.0, 3.0]
    np.savez(tmp_path / "norm.npz", **m.state_dict())
    other = InstanceNorm2d(3, affine=True, track_running_stats=True)
    weight = other.weight
    with np.load(tmp_path / "norm.npz") as f:
        assert other.load_state_dict(f) == ([], [])
    assert other.weight is weight  # copied in place, as PyTorch's param.copy_
    for k, v in m.state_dict().items():
        np.testing.assert_array_equal(other.state_dict()[k], v)
    x = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    np.testing.assert_array_equal(m.eval()(x), other.eval()(x))


def test_load_casts_to_layer_dtype_and_accepts_array_likes():
    m = InstanceNorm1d(2, affine=True, track_running_stats=True, dtype=np.float64)
    m.load_state_dict(
        {
            "weight": [1, 2],
            "bias": (0.5, 0.25),
            "running_mean": np.float32([1, 2]),
            "running_var": [3.0, 4.0],
            "num_batches_tracked": 3,
        }
    )
    assert m.weight.dtype == np.float64 and m.weight.tolist() == [1.0, 2.0]
    assert m.running_var.tolist() == [3.0, 4.0] and int(m.num_batches_tracked) == 3


def test_metadata_version_is_honoured_as_torch_does():
    class Versioned(dict):
        pass

    sd = Versioned(running_mean=np.zeros(3), running_var=np.ones(3))
    sd._metadata = {"": {"version": 2}}
    m = InstanceNorm2d(3)
    # with a version, PyTorch reports the buffers as plain unexpected keys
    with pytest.raises(
        StateDictError,
        match='Unexpected key\\(s\\) in state_dict: "running_mean", "running_var". $',
    ):
        m.load_state_dict(sd)
    assert m.load_state_dict(sd, strict=False) == ([], ["running_mean", "running_var"])
    t = InstanceNorm2d(3, track_running_stats=True)
    with pytest.raises(
        StateDictError, match='Missing key\\(s\\) in state_dict: "num_batches_tracked"'
    ):
        t.load_state_dict(sd)


def test_no_half_load_on_a_bad_value():
    m = InstanceNorm2d(3, affine=True, track_running_stats=True)
    sd = {k: v + 1 for k, v in m.state_dict().items()}
    sd["running_var"] = np.array(["a", "b", "c"])
    with pytest.raises(
        StateDictError,
        match='While copying the parameter named "running_var", expected an array_like of '
        "real numbers from checkpoint but received ndarray of dtype <U1",
    ):
        m.load_state_dict(sd, strict=False)
    assert (m.weight == 1).all() and (m.bias == 0).all() and (m.running_mean == 0).all()
    sd["running_var"] = np.ones(3)
    sd["num_batches_tracked"] = np.array(2.5)
    with pytest.raises(StateDictError, match="expected an integer from checkpoint but received"):
        m.load_state_dict(sd)
    assert (m.weight == 1).all() and m.num_batches_tracked == 0


# test_load_state_dict_bad_arguments: rows "load-state-dict-*" of the error table, test_errors.py


# --------------------------------------------------------------------------------------------
# construction, modes, running statistics


# test_constructor_errors_name_argument_and_value, test_general_constructor_channel_axis and
# test_nd_classes_take_no_channel_axis: rows of the error table in test_errors.py


def test_defaults_and_attributes():
    m = InstanceNorm2d(3)
    assert (m.eps, m.momentum, m.affine, m.track_running_stats, m.training) == (
        1e-5,
        0.1,
        False,
        False,
        True,
    )
    assert m.weight is None and m.bias is None and m.running_mean is None
    a = InstanceNorm1d(4, affine=True, track_running_stats=True, dtype=np.float16)
    assert a.weight.dtype == np.float16 and a.weight.tolist() == [1.0] * 4
    assert a.bias.tolist() == [0.0] * 4 and a.running_var.tolist() == [1.0] * 4
    assert a.running_mean.tolist() == [0.0] * 4 and a.num_batches_tracked == 0
    assert repr(a) == (
        "InstanceNorm1d(4, eps=1e-05, momentum=0.1, affine=True, bias=True, "
        "track_running_stats=True, dtype=float16)"
    )
    assert m.eval() is m and not m.training
    assert m.train() is m and m.training
    with pytest.raises(TypeError, match="mode must be a bool; got 'x'"):
        m.train("x")


def test_eval_uses_running_stats_and_train_updates_them():
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((4, 2, 6, 5)) * 3 + 2).astype(np.float64)
    m = InstanceNorm2d(2, momentum=0.5, track_running_stats=True, dtype=np.float64)
    m(x)
    L = 30
    var = x.var(axis=(2, 3)) * L / (L - 1)
    np.testing.assert_allclose(m.running_mean, 0.5 * x.mean(axis=(2, 3)).mean(0), rtol=1e-14)
    np.testing.assert_allclose(m.running_var, 0.5 + 0.5 * var.mean(0), rtol=1e-14)
    rm, rv = m.running_mean.copy(), m.running_var.copy()
    y = m.eval()(x)
    np.testing.assert_array_equal(m.running_mean, rm)  # eval never updates
    want = (x - rm[:, None, None]) / np.sqrt(rv[:, None, None] + 1e-5)
    np.testing.assert_allclose(y, want, rtol=1e-13, atol=1e-13)
    # not tracking: input statistics in eval mode too
    n = InstanceNorm2d(2).eval()
    np.testing.assert_allclose(n(x), ref.instance_norm(x), rtol=1e-13, atol=1e-13)


def test_momentum_none_freezes_running_stats():
    m = InstanceNorm1d(3, momentum=None, track_running_stats=True)
    m(np.random.default_rng(0).standard_normal((2, 3, 9)).astype(np.float32) + 5)
    assert m.running_mean.tolist() == [0.0] * 3 and m.running_var.tolist() == [1.0] * 3


def test_empty_batch_leaves_running_stats_unchanged():
    # PyTorch 2.13 sets them to NaN (the mean over no sample); we keep them
    m = InstanceNorm2d(3, track_running_stats=True)
    y = m(np.zeros((0, 3, 4, 4), np.float32))
    assert y.shape == (0, 3, 4, 4)
    assert m.running_mean.tolist() == [0.0] * 3 and m.running_var.tolist() == [1.0] * 3


def test_single_spatial_element_in_eval_with_running_stats():
    m = InstanceNorm3d(2, track_running_stats=True).eval()
    m.running_mean[:] = [1.0, 2.0]
    y = m(np.array([[[[[3.0]]], [[[2.0]]]]], np.float32))
    np.testing.assert_allclose(y.ravel(), [2.0 / np.sqrt(1 + 1e-5), 0.0], rtol=1e-6)


def test_output_dtype_follows_input():
    m = InstanceNorm2d(2, affine=True)
    x = np.arange(2 * 2 * 3 * 3).reshape(2, 2, 3, 3)
    assert m(x).dtype == np.float64
    assert m(x.astype(np.float16)).dtype == np.float16
    with pytest.raises(TypeError, match="x must have a real floating, integer or bool dtype"):
        m(x.astype(np.complex64))


def test_unbatched_equals_batched_of_one():
    rng = np.random.default_rng(8)
    for k, klass in CLASSES.items():
        x = rng.standard_normal((3,) + (5,) * k).astype(np.float32)
        a = klass(3, affine=True, track_running_stats=True)
        b = klass(3, affine=True, track_running_stats=True)
        ya, yb = a(x), b(x[None])
        assert ya.shape == x.shape
        np.testing.assert_array_equal(ya, yb[0])
        np.testing.assert_array_equal(a.running_var, b.running_var)
        dy = rng.standard_normal(x.shape).astype(np.float32)
        np.testing.assert_array_equal(a.backward(dy), b.backward(dy[None])[0])
        np.testing.assert_array_equal(a.grad_weight, b.grad_weight)


# --------------------------------------------------------------------------------------------
# the general layer


def test_general_channels_last_equals_2d_on_transposed():
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((3, 6, 7, 4)) * 2 + 1).astype(np.float32)  # N, H, W, C
    dy = rng.standard_normal(x.shape).astype(np.float32)
    g = InstanceNorm(4, affine=True, track_running_stats=True, channel_axis=-1)
    t = InstanceNorm2d(4, affine=True, track_running_stats=True)
    for m in (g, t):
        m.weight[:] = [0.5, 1.0, 1.5, 2.0]
        m.bias[:] = [0.0, 0.1, 0.2, 0.3]
    xt = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    for training in (True, False):
        g.train(training), t.train(training)
        yg, yt = g(x), t(xt)
        np.testing.assert_allclose(yg.transpose(0, 3, 1, 2), yt, rtol=0, atol=2 * EPS * 8)
        np.testing.assert_allclose(g.running_mean, t.running_mean, rtol=2 * EPS, atol=0)
        dg = g.backward(dy)
        dt = t.backward(np.ascontiguousarray(dy.transpose(0, 3, 1, 2)))
        np.testing.assert_allclose(dg.transpose(0, 3, 1, 2), dt, rtol=0, atol=2 * EPS * 8)
        np.testing.assert_allclose(g.grad_weight, t.grad_weight, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(g.grad_bias, t.grad_bias, rtol=1e-5, atol=1e-5)


def test_general_any_ndim():
    rng = np.random.default_rng(12)
    x = rng.standard_normal((2, 3, 2, 2, 2, 3)).astype(np.float64)
    m = InstanceNorm(3, dtype=np.float64)
    np.testing.assert_allclose(m(x), ref.instance_norm(x), rtol=1e-13, atol=1e-13)
    mid = InstanceNorm(2, channel_axis=2, dtype=np.float64)
    np.testing.assert_allclose(mid(x), ref.instance_norm(x, channel_axis=2), rtol=1e-13, atol=1e-13)
    with pytest.raises(ValueError, match="x must have at least 3 dimensions"):
        m(np.ones((3, 4)))
    with pytest.raises(ValueError, match="channel_axis=5 is out of range for an input with ndim=3"):
        InstanceNorm(3, channel_axis=5)(np.ones((2, 3, 4)))
    with pytest.raises(ValueError, match="expected input's size at dim=2 to match num_features"):
        InstanceNorm(3, affine=True, channel_axis=2)(np.ones((2, 3, 4)))


# --------------------------------------------------------------------------------------------
# backward


def test_backward_against_reference_in_training_mode():
    rng = np.random.default_rng(13)
    x = (rng.standard_normal((2, 3, 5, 6)) * 4 + 100).astype(np.float64)
    dy = rng.standard_normal(x.shape)
    m = InstanceNorm2d(3, affine=True, dtype=np.float64)
    m.weight[:] = [0.5, -1.0, 2.0]
    m(x)
    dx = m.backward(dy)
    rdx, rgw, rgb = ref.instance_norm_backward(dy, x, m.weight)
    np.testing.assert_allclose(dx, rdx, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(m.grad_weight, rgw, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(m.grad_bias, rgb, rtol=1e-12, atol=1e-12)


def test_backward_with_running_stats_is_finite_differences():
    rng = np.random.default_rng(14)
    x = rng.standard_normal((2, 2, 7)) * 2
    dy = rng.standard_normal(x.shape)
    m = InstanceNorm1d(2, affine=True, track_running_stats=True, dtype=np.float64).eval()
    m.load_state_dict(
        {
            "weight": [1.5, -0.5],
            "bias": [0.1, 0.2],
            "running_mean": [0.3, -0.2],
            "running_var": [2.0, 0.5],
            "num_batches_tracked": 0,
        }
    )
    m(x)
    dx = m.backward(dy)
    gw, gb = m.grad_weight.copy(), m.grad_bias.copy()
    h = 1e-6

    def loss(key, value):
        n = InstanceNorm1d(2, affine=True, track_running_stats=True, dtype=np.float64).eval()
        n.load_state_dict({**m.state_dict(), key: value})
        return float((n(x) * dy).sum())

    # d loss / d x: the running statistics are constants in eval mode
    num = np.empty_like(x)
    for idx in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[idx] = h
        num[idx] = ((m(x + e) * dy).sum() - (m(x - e) * dy).sum()) / (2 * h)
    np.testing.assert_allclose(dx, num, rtol=1e-6, atol=1e-7)
    for key, got in (("weight", gw), ("bias", gb)):
        base = getattr(m, key).copy()
        want = np.empty(2)
        for c in range(2):
            e = np.zeros(2)
            e[c] = h
            want[c] = (loss(key, base + e) - loss(key, base - e)) / (2 * h)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


# test_backward_errors: rows "backward-*" of the error table in test_errors.py


def test_backward_without_affine_stores_no_gradients():
    m = InstanceNorm2d(2)
    x = np.random.default_rng(1).standard_normal((2, 2, 3, 3)).astype(np.float32)
    m(x)
    dx = m.backward(np.ones_like(x))
    np.testing.assert_allclose(dx, 0, atol=1e-6)  # a constant gradient is normalized away
    assert m.grad_weight is None and m.grad_bias is None


# --------------------------------------------------------------------------------------------
# the example


def test_example_script_runs_and_matches_torch():
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "matches PyTorch" in proc.stdout


def test_example_detects_a_wrong_network(monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("tiny_net_example", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main() == 0
    # forgetting eval() makes norm_mid use input statistics instead of the running ones
    monkeypatch.setattr(mod.TinyNet, "eval", lambda self: self)
    assert mod.main() == 1
    assert "DIFFERS from PyTorch" in capsys.readouterr().out


def test_public_names():
    for name in ("InstanceNorm", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d"):
        assert name in instnorm_numba.__all__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        import instnorm_numba.layers as layers
    src = pathlib.Path(layers.__file__).read_text()
    assert "_kernels" not in src  # built on _api only (house style)


def test_eval_with_zero_running_var_and_eps_zero_is_quiet():
    """Found by the reseeded layer property test: eval mode with running_var 0 and eps=0
    raised numpy's "divide by zero" RuntimeWarning (an error under -W error) from the layer's
    own rstd, where instance_norm answers quietly with inf/NaN, as torch does."""
    m = InstanceNorm1d(1, eps=0.0, track_running_stats=True, momentum=1.0)
    m(np.full((1, 1, 2), 12.57, np.float32))  # a constant instance: running_var becomes 0
    assert m.running_var[0] == 0
    m.eval()
    x = np.array([[[12.57, 13.0]]], np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = m(x)
        want = instnorm_numba.instance_norm(
            x,
            running_mean=m.running_mean,
            running_var=m.running_var,
            eps=0.0,
            use_input_stats=False,
        )
    np.testing.assert_array_equal(y, want)
    assert not np.isfinite(y).any()
