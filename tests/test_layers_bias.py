"""Layers with ``affine=True, bias=False`` (a weight and no bias, torch.nn 2.1 and later)
against torch.nn golden values (tests/golden/make_torch_nobias.py, PyTorch 2.13.0): outputs,
gradients, running statistics, repr, state-dict keys and loading. torch is not needed here.

Tolerances: float32 epsilons relative to the largest magnitude of the quantity (test_layers.py
bounds each element; here the subject is the semantics of ``bias=False``: a wrong one is off
by O(1)). Ours is held to one rounding against the extended-precision reference as well.
"""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

from instnorm_numba import InstanceNorm, InstanceNorm1d, InstanceNorm2d, InstanceNorm3d
from instnorm_numba import reference as ref
from instnorm_numba.layers import StateDictError

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden" / "torch_layers_nobias.npz"
EPS = float(np.finfo(np.float32).eps)
CLASSES = {1: InstanceNorm1d, 2: InstanceNorm2d, 3: InstanceNorm3d}
CASES = [f"{d}d-track{t}-{m}" for d in (1, 2, 3) for t in (0, 1) for m in ("train", "eval")]


@pytest.fixture(scope="module")
def golden():
    with np.load(GOLDEN) as f:
        return dict(f)


def within(got, want, tol_eps, scale=None):
    want = np.asarray(want, np.float64)
    scale = max(1.0, float(np.abs(want).max())) if scale is None else scale
    err = float(np.abs(np.asarray(got, np.float64) - want).max())
    assert err <= tol_eps * EPS * scale, f"error {err / EPS:.3g} eps of {scale:.3g}"


def test_golden_covers_every_case(golden):
    assert sorted({k.split("/")[0] for k in golden}) == sorted(CASES)


@pytest.mark.parametrize("case", CASES)
def test_matches_torch(golden, case):
    g = {k.split("/", 1)[1]: v for k, v in golden.items() if k.startswith(case + "/")}
    dim, track, mode = int(case[0]), case.split("-")[1] == "track1", case.split("-")[2]
    m = CLASSES[dim](3, affine=True, bias=False, track_running_stats=track, momentum=0.2)
    assert m.bias is None and m.weight.tolist() == [1.0] * 3
    assert repr(m) == str(g["repr"])
    assert list(m.state_dict()) == g["keys"].tolist()
    init = {k[len("init_") :]: v for k, v in g.items() if k.startswith("init_")}
    assert m.load_state_dict(init) == ([], [])
    m.train(mode == "train")
    use_input = mode == "train" or not track
    for s in range(g["x"].shape[0]):
        x, dy = g["x"][s], g["dy"][s]
        rm = None if m.running_mean is None else m.running_mean.astype(np.float64)
        rv = None if m.running_var is None else m.running_var.astype(np.float64)
        y = m(x)
        exact = ref.instance_norm(
            x,
            m.weight,
            None,
            running_mean=rm,
            running_var=rv,
            use_input_stats=use_input,
            exact=True,
        )
        assert ref.ulp_error(y, exact) <= 1.0  # the library's guarantee, without a bias
        within(y, g["y"][s], 16)
        dx = m.backward(dy)
        within(dx, g["dx"][s], 64)
        assert m.grad_bias is None and m.grad_weight.shape == (3,)
        # a float32 sum of L * N terms in PyTorch: bound by (L + N) eps of the magnitudes
        L, n = int(np.prod(x.shape[2:])), x.shape[0]
        within(m.grad_weight, g["grad_weight"][s], L + n, np.abs(dy * 4).sum())
        if track:
            for k in ("running_mean", "running_var"):
                within(getattr(m, k), g[k][s], 8)
        else:
            assert m.running_mean is None
    final = {k[len("final_") :]: v for k, v in g.items() if k.startswith("final_")}
    assert list(m.state_dict()) == list(final) == g["keys"].tolist()


@pytest.mark.parametrize("case", CASES)
def test_loading_a_bias_like_torch(golden, case):
    g = {k.split("/", 1)[1]: v for k, v in golden.items() if k.startswith(case + "/")}
    dim, track = int(case[0]), case.split("-")[1] == "track1"
    m = CLASSES[dim](3, affine=True, bias=False, track_running_stats=track)
    sd = {**m.state_dict(), "bias": np.zeros(3, np.float32)}
    with pytest.raises(StateDictError) as exc:
        m.load_state_dict(sd)
    assert str(exc.value) == str(g["load_error"])
    res = m.load_state_dict(sd, strict=False)
    assert res.unexpected_keys == g["load_unexpected"].tolist() == ["bias"]
    assert m.bias is None


def test_bias_without_affine_and_the_general_layer():
    m = InstanceNorm2d(3, bias=False)  # no affine: nothing to drop, as in torch
    assert m.weight is None and m.bias is None and m.state_dict() == {}
    g = InstanceNorm(3, affine=True, bias=False, channel_axis=-1)
    assert g.bias is None and list(g.state_dict()) == ["weight"]
    g.weight[:] = [0.5, 1.0, 2.0]
    x = np.random.default_rng(0).standard_normal((2, 4, 5, 3)).astype(np.float32)
    y = g(x)
    assert ref.ulp_error(y, ref.instance_norm(x, g.weight, channel_axis=-1, exact=True)) <= 1.0
    g.reset_parameters()
    assert g.weight.tolist() == [1.0] * 3 and g.bias is None
    with pytest.raises(TypeError, match="bias must be a bool; got 1"):
        InstanceNorm2d(3, affine=True, bias=1)
