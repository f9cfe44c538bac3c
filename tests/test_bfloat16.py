"""bfloat16 policy: ``ml_dtypes.bfloat16`` arrays (what JAX and ONNX tooling hand over) are
refused with a TypeError naming the argument, everywhere an array enters; float32 is the way in
(every bfloat16 value is exact in float32)."""

from __future__ import annotations

import numpy as np
import pytest

ml_dtypes = pytest.importorskip("ml_dtypes", reason="ml_dtypes is not installed")

from instnorm_numba import (  # noqa: E402
    InstanceNorm,
    InstanceNorm1d,
    InstanceNorm2d,
    instance_norm,
    instance_norm_backward,
)
from instnorm_numba import reference as ref  # noqa: E402
from instnorm_numba.layers import StateDictError  # noqa: E402

BF16 = np.dtype(ml_dtypes.bfloat16)
F = np.ones((2, 3, 8), np.float32)
B = np.arange(48).reshape(2, 3, 8).astype(BF16)
STATS = np.zeros((2, 3)), np.ones((2, 3))

CASES = [
    (lambda: instance_norm(B), "x has dtype bfloat16, which is not supported: convert it"),
    (lambda: instance_norm(B.reshape(2, 8, 3), channel_axis=-1), "x has dtype bfloat16"),
    (lambda: instance_norm(F, np.ones(3, BF16)), "weight must have a real floating.*bfloat16"),
    (lambda: instance_norm(F, None, np.ones(3, BF16)), "bias must have a real floating.*bfloat16"),
    (
        lambda: instance_norm(F, running_mean=np.zeros(3, BF16), running_var=np.ones(3)),
        "running_mean must have a float16, float32 or float64 dtype; got bfloat16",
    ),
    (lambda: instance_norm(F, out=np.empty(F.shape, BF16)), "out must have dtype float32"),
    (lambda: instance_norm_backward(B, F, *STATS), "grad_output has dtype bfloat16"),
    (lambda: instance_norm_backward(F, B, *STATS), "x has dtype bfloat16"),
    (
        lambda: instance_norm_backward(F, F, STATS[0].astype(BF16), STATS[1]),
        "mean must have a floating dtype",
    ),
    (lambda: InstanceNorm2d(3, dtype=BF16), "dtype must be float16, float32 or float64"),
    (lambda: InstanceNorm1d(3)(B), "x has dtype bfloat16"),
    (lambda: InstanceNorm(3, channel_axis=-1)(B.reshape(2, 8, 3)), "x has dtype bfloat16"),
]


@pytest.mark.parametrize("call,match", CASES)
def test_bfloat16_is_refused_by_name(call, match):
    before = B.copy()
    with pytest.raises(TypeError, match=match):
        call()
    np.testing.assert_array_equal(B.view(np.uint16), before.view(np.uint16))  # untouched


def test_bfloat16_checkpoint_is_refused_and_nothing_loaded():
    m = InstanceNorm1d(3, affine=True)
    with pytest.raises(StateDictError, match='"weight".*of dtype bfloat16'):
        m.load_state_dict({"weight": np.full(3, 2, BF16), "bias": np.ones(3)})
    assert m.weight.tolist() == [1.0] * 3 and m.bias.tolist() == [0.0] * 3


def test_the_way_in_is_float32():
    y = instance_norm(B.astype(np.float32))
    assert y.dtype == np.float32
    assert ref.ulp_error(y, ref.instance_norm(B.astype(np.float64), exact=True)) <= 1.0
