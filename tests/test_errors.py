"""The error table (cf. PyTorch OpInfo ``error_inputs``): every invalid argument of every
public function and layer, the exact exception type, a message naming the argument and its
value, and no side effect on the caller's data."""

from __future__ import annotations

import fractions
import warnings

import numpy as np
import pytest
from conftest import result_of, run_python

import instnorm_numba
from instnorm_numba import output_pool

PUBLIC = set(instnorm_numba.__all__) - {"__version__"}
HAVE_BACKWARD = "instance_norm_backward" in PUBLIC
HAVE_LAYERS = "InstanceNorm2d" in PUBLIC


# ----------------------------------------------------------------------------------------------
# the error-input table (cf. PyTorch OpInfo ``error_inputs``): every invalid argument of every
# public function, the exact exception type, a message naming the argument, and no side effect


def _x():
    x = np.random.default_rng(3).standard_normal((2, 3, 4))
    return x


def _ro(shape):
    a = np.zeros(shape)
    a.flags.writeable = False
    return a


def _fwd(**kw):
    """instance_norm on a fresh (2, 3, 4) input with ``kw`` (``x`` replaces the input)."""
    x = kw.pop("x", None)
    return lambda: instnorm_numba.instance_norm(_x() if x is None else x, **kw)


def _ragged():
    return [[[1.0, 2.0], [3.0]]]


FWD = "instance_norm"
E = [  # (public name, id, call, exception type, regex the message must match)
    (FWD, "x-str", _fwd(x="abc"), TypeError, r"^x must have a real"),
    (FWD, "x-ragged", _fwd(x=_ragged()), TypeError, r"^x must be an array_like"),
    (FWD, "x-none", _fwd(x=np.array(None)), TypeError, r"^x must have a real"),
    (FWD, "x-complex", _fwd(x=np.ones((2, 3, 4), complex)), TypeError, r"^x must .*complex128"),
    (FWD, "x-object", _fwd(x=np.ones((2, 3, 4), object)), TypeError, r"^x must .*object"),
    (FWD, "x-datetime", _fwd(x=np.zeros((2, 3, 4), "M8[s]")), TypeError, r"^x must .*datetime"),
    (FWD, "x-longdouble", _fwd(x=np.ones((2, 3, 4), np.longdouble)), TypeError, r"^x has dtype"),
    (FWD, "x-2d", _fwd(x=np.ones((2, 3))), ValueError, r"^x must have at least 3 dim.*ndim=2"),
    (FWD, "x-0d", _fwd(x=np.float64(1.0)), ValueError, r"^x must have at least 3 dim.*ndim=0"),
    (FWD, "weight-shape", _fwd(weight=np.ones(4)), ValueError, r"^weight must have shape \(3,\)"),
    (FWD, "weight-2d", _fwd(weight=np.ones((1, 3))), ValueError, r"^weight must have shape"),
    (FWD, "weight-scalar", _fwd(weight=2.0), ValueError, r"^weight must have shape .* \(\)"),
    (FWD, "weight-complex", _fwd(weight=np.ones(3, complex)), TypeError, r"^weight must .*complex"),
    (FWD, "weight-str", _fwd(weight="abc"), TypeError, r"^weight must have a real"),
    (FWD, "weight-ragged", _fwd(weight=[[1.0], [2.0, 3.0]]), TypeError, r"^weight must be None or"),
    (FWD, "bias-shape", _fwd(bias=np.ones(2)), ValueError, r"^bias must have shape \(3,\)"),
    (FWD, "bias-object", _fwd(bias=np.array([1, 2, None], object)), TypeError, r"^bias must"),
    (FWD, "eps-negative", _fwd(eps=-1.0), ValueError, r"^eps must be >= 0"),
    (FWD, "eps-nan", _fwd(eps=float("nan")), ValueError, r"^eps must be finite"),
    (FWD, "eps-inf", _fwd(eps=float("inf")), ValueError, r"^eps must be finite"),
    (FWD, "eps-str", _fwd(eps="1e-5"), TypeError, r"^eps must be a real number"),
    (FWD, "eps-bool", _fwd(eps=True), TypeError, r"^eps must be a real number"),
    (FWD, "eps-none", _fwd(eps=None), TypeError, r"^eps must be a real number"),
    (FWD, "eps-array", _fwd(eps=np.array([1e-5])), TypeError, r"^eps must be a real number"),
    (FWD, "eps-complex", _fwd(eps=1j), TypeError, r"^eps must be a real number"),
    (FWD, "axis-batch", _fwd(channel_axis=0), ValueError, r"^channel_axis=0 names axis 0"),
    (FWD, "axis-batch-neg", _fwd(channel_axis=-3), ValueError, r"^channel_axis=-3 names axis 0"),
    (FWD, "axis-high", _fwd(channel_axis=3), ValueError, r"^channel_axis=3 is out of range"),
    (FWD, "axis-low", _fwd(channel_axis=-4), ValueError, r"^channel_axis=-4 is out of range"),
    (FWD, "axis-float", _fwd(channel_axis=1.0), TypeError, r"^channel_axis must be an integer"),
    (FWD, "axis-bool", _fwd(channel_axis=True), TypeError, r"^channel_axis must be an integer"),
    (FWD, "axis-none", _fwd(channel_axis=None), TypeError, r"^channel_axis must be an integer"),
    (FWD, "axis-str", _fwd(channel_axis="1"), TypeError, r"^channel_axis must be an integer"),
    (
        FWD,
        "running-mean-only",
        _fwd(running_mean=np.zeros(3)),
        ValueError,
        r"running_mean and running_var go together: only running_mean",
    ),
    (
        FWD,
        "running-var-only",
        _fwd(running_var=np.ones(3)),
        ValueError,
        r"running_mean and running_var go together: only running_var",
    ),
    (
        FWD,
        "eval-without-running",
        _fwd(use_input_stats=False),
        ValueError,
        r"^use_input_stats=False needs running_mean and running_var",
    ),
    (
        FWD,
        "use-input-stats-str",
        _fwd(use_input_stats="yes"),
        TypeError,
        r"^use_input_stats must be a bool",
    ),
    (
        FWD,
        "use-input-stats-int",
        _fwd(use_input_stats=1),
        TypeError,
        r"^use_input_stats must be a bool",
    ),
    (
        FWD,
        "use-input-stats-none",
        _fwd(use_input_stats=None),
        TypeError,
        r"^use_input_stats must be a bool",
    ),
    (
        FWD,
        "running-mean-list-updated",
        _fwd(running_mean=[0.0] * 3, running_var=np.ones(3)),
        TypeError,
        r"^running_mean must be a numpy.ndarray",
    ),
    (
        FWD,
        "running-var-list-updated",
        _fwd(running_mean=np.zeros(3), running_var=[1.0] * 3),
        TypeError,
        r"^running_var must be a numpy.ndarray",
    ),
    (
        FWD,
        "running-mean-shape",
        _fwd(running_mean=np.zeros(4), running_var=np.ones(3)),
        ValueError,
        r"^running_mean must have shape \(3,\)",
    ),
    (
        FWD,
        "running-var-shape",
        _fwd(running_mean=np.zeros(3), running_var=np.ones(4)),
        ValueError,
        r"^running_var must have shape \(3,\)",
    ),
    (
        FWD,
        "running-mean-int",
        _fwd(running_mean=np.zeros(3, int), running_var=np.ones(3)),
        TypeError,
        r"^running_mean must have a float16, float32 or float64 dtype",
    ),
    (
        FWD,
        "running-var-complex",
        _fwd(running_mean=np.zeros(3), running_var=np.ones(3, complex)),
        TypeError,
        r"^running_var must have a float16, float32 or float64 dtype",
    ),
    (
        FWD,
        "running-mean-longdouble",
        _fwd(running_mean=np.zeros(3, np.longdouble), running_var=np.ones(3)),
        TypeError,
        r"^running_mean must have a float16, float32 or float64 dtype",
    ),
    (
        FWD,
        "running-mean-read-only-updated",
        _fwd(running_mean=_ro(3), running_var=np.ones(3)),
        ValueError,
        r"^running_mean is read-only",
    ),
    (
        FWD,
        "running-var-read-only-updated",
        _fwd(running_mean=np.zeros(3), running_var=_ro(3)),
        ValueError,
        r"^running_var is read-only",
    ),
    (
        FWD,
        "running-mean-shape-eval",
        _fwd(running_mean=np.zeros(4), running_var=np.ones(3), use_input_stats=False),
        ValueError,
        r"^running_mean must have shape",
    ),
    (
        FWD,
        "running-mean-str-eval",
        _fwd(running_mean="abc", running_var=np.ones(3), use_input_stats=False),
        TypeError,
        r"^running_mean must have a float",
    ),
    (
        FWD,
        "running-spatial-1",
        _fwd(x=np.ones((2, 3, 1)), running_mean=np.zeros(3), running_var=np.ones(3)),
        ValueError,
        r"running_mean, running_var with use_input_stats=True",
    ),
    (FWD, "momentum-nan", _fwd(momentum=float("nan")), ValueError, r"^momentum must be finite"),
    (FWD, "momentum-str", _fwd(momentum="0.1"), TypeError, r"^momentum must be a real number"),
    (FWD, "momentum-none", _fwd(momentum=None), TypeError, r"^momentum must be a real number"),
    (FWD, "out-list", _fwd(out=[[[0.0]]]), TypeError, r"^out must be a numpy.ndarray or None"),
    (FWD, "out-shape", _fwd(out=np.zeros((2, 3, 5))), ValueError, r"^out must have shape"),
    (
        FWD,
        "out-dtype",
        _fwd(out=np.zeros((2, 3, 4), np.float32)),
        TypeError,
        r"^out must have dtype float64",
    ),
    (
        FWD,
        "out-byteswapped",
        _fwd(out=np.zeros((2, 3, 4), ">f8")),
        TypeError,
        r"^out must have dtype float64",
    ),
    (FWD, "out-read-only", _fwd(out=_ro((2, 3, 4))), ValueError, r"^out is read-only"),
    (
        FWD,
        "out-alias-int-input",
        _fwd(x=np.ones((2, 3, 4), np.int64), out=np.ones((2, 3, 4), int)),
        TypeError,
        r"^out must have dtype float64",
    ),
    (FWD, "return-stats-str", _fwd(return_stats="no"), TypeError, r"^return_stats must be a bool"),
    (FWD, "return-stats-none", _fwd(return_stats=None), TypeError, r"^return_stats must be a bool"),
    (
        FWD,
        "unknown-keyword",
        _fwd(epsilon=1.0),
        TypeError,
        r"unexpected keyword argument 'epsilon'",
    ),
    (
        FWD,
        "eps-positional",
        lambda: instnorm_numba.instance_norm(_x(), None, None, 1e-5),
        TypeError,
        r"positional argument",
    ),
]

if HAVE_BACKWARD:
    BWD = "instance_norm_backward"

    def _bwd(**kw):
        def call():
            x = kw.pop("x", None)
            x = _x() if x is None else x
            args = {
                "grad_output": np.ones((2, 3, 4)),
                "mean": np.zeros((2, 3)),
                "rstd": np.ones((2, 3)),
            }
            args.update(kw)
            return instnorm_numba.instance_norm_backward(
                args.pop("grad_output"), x, args.pop("mean"), args.pop("rstd"), **args
            )

        return call

    def _bwd32(**kw):
        """The backward of a float32 (2, 3, 10) input, its own statistics, ``kw`` replacing."""

        def call():
            r = np.random.default_rng(0)
            x = r.standard_normal((2, 3, 10)).astype(np.float32)
            _, mean, rstd = instnorm_numba.instance_norm(x, return_stats=True)
            args = {"grad_output": r.standard_normal(x.shape).astype(np.float32), "x": x}
            args.update(mean=mean, rstd=rstd)
            args.update(kw)
            pos = [args.pop(k) for k in ("grad_output", "x", "mean", "rstd")]
            return instnorm_numba.instance_norm_backward(*pos, **args)

        return call

    E += [
        (
            BWD,
            "grad-output-shape",
            _bwd(grad_output=np.ones((2, 3, 5))),
            ValueError,
            r"^grad_output must have shape \(2, 3, 4\) to match x; got shape \(2, 3, 5\)",
        ),
        (
            BWD,
            "grad-output-dtype",
            _bwd(grad_output=np.ones((2, 3, 4), np.float32)),
            TypeError,
            r"^grad_output must have dtype float64",
        ),
        (
            BWD,
            "grad-output-int",
            _bwd(grad_output=np.ones((2, 3, 4), int)),
            TypeError,
            r"^grad_output must have dtype float64",
        ),
        (BWD, "grad-output-str", _bwd(grad_output="abc"), TypeError, r"^grad_output must have"),
        (
            BWD,
            "grad-output-2d",
            _bwd(grad_output=np.ones((2, 3))),
            ValueError,
            r"^grad_output must have at least 3 dim",
        ),
        (BWD, "x-complex", _bwd(x=np.ones((2, 3, 4), complex)), TypeError, r"^x must have a real"),
        (BWD, "x-2d", _bwd(x=np.ones((2, 3))), ValueError, r"^x must have at least 3 dim"),
        (
            BWD,
            "mean-shape",
            _bwd(mean=np.zeros((1, 3))),
            ValueError,
            r"^mean must have shape \(2, 3\) to match N=2 samples and C=3 channels of x; "
            r"got shape \(1, 3\)",
        ),
        (
            BWD,
            "mean-int",
            _bwd(mean=np.zeros((2, 3), int)),
            TypeError,
            r"^mean must have a floating dtype",
        ),
        (
            BWD,
            "mean-ragged",
            _bwd(mean=[[1.0], [1.0, 2.0]]),
            TypeError,
            r"^mean must be an array_like",
        ),
        (
            BWD,
            "rstd-shape",
            _bwd(rstd=np.ones((3, 2))),
            ValueError,
            r"^rstd must have shape \(2, 3\) to match .*; got shape \(3, 2\)",
        ),
        (BWD, "rstd-str", _bwd(rstd="abc"), TypeError, r"^rstd must have a floating dtype"),
        (
            BWD,
            "weight-shape",
            _bwd(weight=np.ones(4)),
            ValueError,
            r"^weight must have shape \(3,\) to match C=3 channels; got shape \(4,\)",
        ),
        (BWD, "weight-complex", _bwd(weight=np.ones(3, complex)), TypeError, r"^weight must"),
        (BWD, "axis-batch", _bwd(channel_axis=0), ValueError, r"^channel_axis=0 names axis 0"),
        (BWD, "axis-high", _bwd(channel_axis=5), ValueError, r"^channel_axis=5 is out of range"),
        (BWD, "axis-float", _bwd(channel_axis=1.0), TypeError, r"^channel_axis must be an integer"),
        (BWD, "out-shape", _bwd(out=np.zeros((2, 3, 5))), ValueError, r"^out must have shape"),
        (
            BWD,
            "out-dtype",
            _bwd(out=np.zeros((2, 3, 4), np.float32)),
            TypeError,
            r"^out must have dtype float64",
        ),
        (BWD, "out-read-only", _bwd(out=_ro((2, 3, 4))), ValueError, r"^out is read-only"),
        (BWD, "out-list", _bwd(out=[1.0]), TypeError, r"^out must be a numpy.ndarray"),
        (BWD, "unknown-keyword", _bwd(eps=1e-5), TypeError, r"unexpected keyword argument 'eps'"),
        # a float32 input with its real statistics (from test_backward.test_bad_arguments)
        (
            BWD,
            "f32-grad-output-float64",
            _bwd32(grad_output=np.zeros((2, 3, 10))),
            TypeError,
            r"^grad_output must have dtype float32 .*got float64",
        ),
        (
            BWD,
            "f32-grad-output-float16",
            _bwd32(grad_output=np.zeros((2, 3, 10), np.float16)),
            TypeError,
            r"^grad_output must have dtype float32 .*got float16",
        ),
        (
            BWD,
            "f32-grad-output-complex",
            _bwd32(grad_output=np.zeros((2, 3, 10), complex)),
            TypeError,
            r"^grad_output .*complex",
        ),
        (
            BWD,
            "f32-mean-1d",
            _bwd32(mean=np.zeros(3)),
            ValueError,
            r"^mean must have shape \(2, 3\) to match N=2 samples and C=3 channels of x; "
            r"got shape \(3,\)",
        ),
        (
            BWD,
            "f32-mean-complex",
            _bwd32(mean=np.zeros((2, 3), complex)),
            TypeError,
            r"^mean must have a floating dtype",
        ),
        (
            BWD,
            "f32-rstd-int64",
            _bwd32(rstd=np.zeros((2, 3), np.int64)),
            TypeError,
            r"^rstd must have a floating dtype.*int64",
        ),
        (
            BWD,
            "f32-axis-last-stats-shape",
            _bwd32(channel_axis=-1),
            ValueError,
            r"^mean must have shape \(2, 10\)",
        ),
        (
            BWD,
            "f32-out-float64",
            _bwd32(out=np.zeros((2, 3, 10))),
            TypeError,
            r"^out must have dtype float32.*got float64",
        ),
        (
            BWD,
            "f32-out-shape",
            _bwd32(out=np.zeros((2, 3, 9), np.float32)),
            ValueError,
            r"^out must have shape",
        ),
    ]

if HAVE_LAYERS:
    from instnorm_numba.layers import StateDictError

    def _layer(cls="InstanceNorm", *args, **kw):
        return lambda: getattr(instnorm_numba, cls)(*args, **kw)

    def _trained(cls="InstanceNorm", C=3, x_shape=(2, 3, 4), **kw):
        layer = getattr(instnorm_numba, cls)(C, **kw)
        layer(np.random.default_rng(0).standard_normal(x_shape))
        return layer

    def _affine():
        return instnorm_numba.InstanceNorm(3, affine=True)

    LAYER_CLASSES = ["InstanceNorm", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d"]
    for cls in LAYER_CLASSES:
        E += [
            (
                cls,
                "num-features-str",
                _layer(cls, "3"),
                TypeError,
                r"^num_features must be an integer; got '3'",
            ),
            (
                cls,
                "num-features-float",
                _layer(cls, 3.0),
                TypeError,
                r"^num_features must be an integer; got 3\.0$",
            ),
            (
                cls,
                "num-features-bool",
                _layer(cls, True),
                TypeError,
                r"^num_features must be an integer; got True$",
            ),
            (
                cls,
                "num-features-zero",
                _layer(cls, 0),
                ValueError,
                r"^num_features must be >= 1; got 0$",
            ),
            (
                cls,
                "eps-negative",
                _layer(cls, 3, eps=-1),
                ValueError,
                r"^eps must be >= 0\.0; got -1$",
            ),
            (
                cls,
                "eps-negative-tiny",
                _layer(cls, 3, eps=-1e-5),
                ValueError,
                r"^eps must be >= 0\.0; got -1e-05$",
            ),
            (
                cls,
                "eps-str",
                _layer(cls, 3, eps="x"),
                TypeError,
                r"^eps must be a real number; got 'x'",
            ),
            (
                cls,
                "momentum-nan",
                _layer(cls, 3, momentum=float("nan")),
                ValueError,
                r"^momentum must be finite; got nan$",
            ),
            (
                cls,
                "momentum-str",
                _layer(cls, 3, momentum="x"),
                TypeError,
                r"^momentum must be a real number; got 'x'",
            ),
            (
                cls,
                "affine-int",
                _layer(cls, 3, affine=1),
                TypeError,
                r"^affine must be a bool; got 1$",
            ),
            (
                cls,
                "track-str",
                _layer(cls, 3, track_running_stats="yes"),
                TypeError,
                r"^track_running_stats must be a bool; got 'yes'",
            ),
            (
                cls,
                "dtype-int",
                _layer(cls, 3, dtype=np.int32),
                TypeError,
                r"^dtype must be float16, float32 or float64; got",
            ),
            (
                cls,
                "dtype-complex64",
                _layer(cls, 3, dtype="complex64"),
                TypeError,
                r"^dtype must be float16, float32 or float64; got 'complex64'",
            ),
            (
                cls,
                "dtype-junk",
                _layer(cls, 3, dtype="junk"),
                TypeError,
                r"^dtype must be float16, float32 or float64",
            ),
            (
                cls,
                "train-mode-int",
                lambda cls=cls: getattr(instnorm_numba, cls)(3).train(1),
                TypeError,
                r"^mode must be a bool",
            ),
            (
                cls,
                "backward-before-forward",
                lambda cls=cls: getattr(instnorm_numba, cls)(3).backward(np.ones((2, 3, 4, 4))),
                RuntimeError,
                r"^backward\(\) needs a forward\(\) first",
            ),
        ]
    E += [
        (
            "InstanceNorm",
            "channel-axis-float",
            _layer("InstanceNorm", 3, channel_axis=1.0),
            TypeError,
            r"^channel_axis must be an integer",
        ),
        (
            "InstanceNorm",
            "channel-axis-batch",
            _layer("InstanceNorm", 3, channel_axis=0),
            ValueError,
            r"^channel_axis=0 names axis 0, the batch axis",
        ),
        (
            "InstanceNorm",
            "channel-axis-bool",
            _layer("InstanceNorm", 3, channel_axis=True),
            TypeError,
            r"^channel_axis must be an integer; got True",
        ),
        *[
            (
                cls,
                "channel-axis-not-taken" if axis == 1 else "channel-axis-not-taken-last",
                _layer(cls, 3, channel_axis=axis),
                TypeError,
                r"unexpected keyword argument 'channel_axis'",
            )
            for cls in ("InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d")
            for axis in (1, -1)
        ],
        (
            "InstanceNorm",
            "forward-x-2d",
            lambda: instnorm_numba.InstanceNorm(3)(np.ones((2, 3))),
            ValueError,
            r"^x must have at least 3 dim",
        ),
        (
            "InstanceNorm",
            "forward-x-complex",
            lambda: instnorm_numba.InstanceNorm(3)(np.ones((2, 3, 4), complex)),
            TypeError,
            r"^x must have a real",
        ),
        (
            "InstanceNorm",
            "forward-channels-affine",
            lambda: instnorm_numba.InstanceNorm(4, affine=True)(_x()),
            ValueError,
            r"to match num_features \(4\), but got: 3",
        ),
        (
            "InstanceNorm",
            "forward-channel-axis-range",
            lambda: instnorm_numba.InstanceNorm(3, channel_axis=5)(_x()),
            ValueError,
            r"^channel_axis=5 is out of range",
        ),
        (
            "InstanceNorm",
            "forward-spatial-1-training",
            lambda: instnorm_numba.InstanceNorm(3)(np.ones((2, 3, 1))),
            ValueError,
            r"^Expected more than 1 spatial element when training",
        ),
        (
            "InstanceNorm1d",
            "forward-4d",
            lambda: instnorm_numba.InstanceNorm1d(3)(np.ones((2, 3, 4, 4))),
            ValueError,
            r"^expected 2D or 3D input \(got 4D input\)",
        ),
        (
            "InstanceNorm2d",
            "forward-5d",
            lambda: instnorm_numba.InstanceNorm2d(3)(np.ones((2, 3, 4, 4, 4))),
            ValueError,
            r"^expected 3D or 4D input \(got 5D input\)",
        ),
        (
            "InstanceNorm2d",
            "forward-string",
            lambda: instnorm_numba.InstanceNorm2d(3)("abc"),
            TypeError,
            r"^x must have a real floating, integer or bool dtype; got dtype <U3",
        ),
        (
            "InstanceNorm3d",
            "forward-3d",
            lambda: instnorm_numba.InstanceNorm3d(3)(np.ones((2, 3, 4))),
            ValueError,
            r"^expected 4D or 5D input \(got 3D input\)",
        ),
        (
            "InstanceNorm",
            "backward-shape",
            lambda: _trained().backward(np.ones((2, 3, 5))),
            ValueError,
            r"^grad_output must have shape \(2, 3, 4\)",
        ),
        (
            "InstanceNorm2d",
            "backward-unbatched-shape",
            lambda: _trained("InstanceNorm2d", 2, (1, 2, 3, 3), affine=True).backward(
                np.ones((2, 3, 3))
            ),
            ValueError,
            r"^grad_output must have shape \(1, 2, 3, 3\).*got shape \(2, 3, 3\)",
        ),
        (
            "InstanceNorm",
            "backward-complex",
            lambda: _trained().backward(np.ones((2, 3, 4), complex)),
            TypeError,
            r"^grad_output must have a real",
        ),
        (
            "InstanceNorm",
            "backward-ragged",
            lambda: _trained().backward(_ragged()),
            TypeError,
            r"^grad_output must be an array_like",
        ),
        (
            "InstanceNorm",
            "load-state-dict-list",
            lambda: _affine().load_state_dict([1]),
            TypeError,
            r"^state_dict must be a mapping.*got list",
        ),
        (
            "InstanceNorm",
            "load-state-dict-strict-int",
            lambda: _affine().load_state_dict({}, strict=1),
            TypeError,
            r"^strict must be a bool; got 1$",
        ),
        (
            "InstanceNorm",
            "load-state-dict-key-int",
            lambda: _affine().load_state_dict({1: 2}),
            TypeError,
            r"^state_dict keys must be str; got 1$",
        ),
        (
            "InstanceNorm",
            "load-state-dict-missing",
            lambda: _affine().load_state_dict({"weight": np.ones(3)}),
            StateDictError,
            r'Missing key\(s\) in state_dict: "bias"',
        ),
        (
            "InstanceNorm",
            "load-state-dict-unexpected",
            lambda: _affine().load_state_dict({"weight": np.ones(3), "bias": np.ones(3), "foo": 1}),
            StateDictError,
            r'Unexpected key\(s\) in state_dict: "foo"',
        ),
        (
            "InstanceNorm",
            "load-state-dict-shape",
            lambda: _affine().load_state_dict({"weight": np.ones(4), "bias": np.ones(3)}),
            StateDictError,
            r"size mismatch for weight",
        ),
        (
            "InstanceNorm",
            "load-state-dict-complex",
            lambda: _affine().load_state_dict({"weight": np.ones(3, complex), "bias": np.ones(3)}),
            StateDictError,
            r'parameter named "weight"',
        ),
    ]

# numbers Python holds but a float cannot: a ValueError naming the argument, never an
# OverflowError (and never a ValueError from repr of a 5000-digit int)
HUGE = 10**400
E += [
    (FWD, "eps-huge-int", _fwd(eps=HUGE), ValueError, r"^eps must be finite; got an integer of"),
    (
        FWD,
        "eps-huge-negative-int",
        _fwd(eps=-(10**5000)),
        ValueError,
        r"^eps must be finite; got a negative integer of 16610 bits",
    ),
    (
        FWD,
        "eps-huge-fraction",
        _fwd(eps=fractions.Fraction(HUGE, 3)),
        ValueError,
        r"^eps must be finite",
    ),
    (FWD, "momentum-huge-int", _fwd(momentum=HUGE), ValueError, r"^momentum must be finite"),
    (
        FWD,
        "axis-huge-int",
        _fwd(channel_axis=10**5000),
        ValueError,
        r"^channel_axis=an integer of 16610 bits is out of range",
    ),
]
if HAVE_BACKWARD:
    E += [
        (
            BWD,
            "axis-huge-int",
            _bwd(channel_axis=-(10**30)),
            ValueError,
            r"^channel_axis=a negative integer of 100 bits is out of range",
        ),
    ]
if HAVE_LAYERS:
    for cls in LAYER_CLASSES:
        E += [
            (
                cls,
                "num-features-huge-int",
                _layer(cls, 10**5000),
                ValueError,
                r"^num_features must be <= 2147483647; got an integer of 16610 bits",
            ),
            (
                cls,
                "num-features-too-many",
                _layer(cls, 2**40),
                ValueError,
                r"^num_features must be <= 2147483647; got 1099511627776",
            ),
            (cls, "eps-huge-int", _layer(cls, 3, eps=HUGE), ValueError, r"^eps must be finite"),
            (
                cls,
                "momentum-huge-int",
                _layer(cls, 3, momentum=HUGE),
                ValueError,
                r"^momentum must be finite",
            ),
        ]

    class _Unconvertible:
        """An array of some library whose ``__array__`` fails (as a CUDA tensor's does)."""

        def __array__(self, dtype=None, copy=None):
            raise RuntimeError("can't convert cuda:0 device type tensor to numpy")

    def _tracked():
        return instnorm_numba.InstanceNorm(3, track_running_stats=True)

    def _load(**values):
        def call():
            layer = _tracked()
            return layer.load_state_dict({**layer.state_dict(), **values})

        return call

    NBT = (
        r'parameter named "num_batches_tracked", expected an integer from checkpoint but '
        r"received .*\(num_batches_tracked must be an integer in the int64 range\)"
    )
    E += [
        (
            "InstanceNorm",
            "load-num-batches-uint64-beyond-int64",
            _load(num_batches_tracked=np.array(2**63, np.uint64)),
            StateDictError,
            NBT,
        ),
        (
            "InstanceNorm",
            "load-num-batches-float-beyond-int64",
            _load(num_batches_tracked=np.array(1e30)),
            StateDictError,
            NBT,
        ),
        (
            "InstanceNorm",
            "load-num-batches-fraction",
            _load(num_batches_tracked=np.array(2.5)),
            StateDictError,
            NBT,
        ),
        (
            "InstanceNorm",
            "load-num-batches-nan",
            _load(num_batches_tracked=np.array(np.nan)),
            StateDictError,
            NBT,
        ),
        (
            "InstanceNorm",
            "load-num-batches-huge-python-int",
            _load(num_batches_tracked=2**70),
            StateDictError,
            r'parameter named "num_batches_tracked", expected an array_like of real numbers',
        ),
        (
            "InstanceNorm",
            "load-unconvertible-array",
            _load(running_mean=_Unconvertible()),
            StateDictError,
            r'parameter named "running_mean", .*received _Unconvertible \(can\'t convert cuda',
        ),
        (
            "InstanceNorm",
            "load-masked-array",
            _load(running_var=np.ma.masked_array(np.ones(3), [0, 1, 0])),
            StateDictError,
            r'parameter named "running_var", .*only x \(normalized over its unmasked '
            r"elements\) and out may be masked",
        ),
    ]

# the output pool's settings (moved from tests/test_pool.py); a refused setting changes nothing
E += [
    (
        "output_pool",
        "pool-negative-bytes",
        lambda: output_pool(max_bytes=-1),
        ValueError,
        r"max_bytes must be >= 0; got -1",
    ),
    (
        "output_pool",
        "pool-float-buffers",
        lambda: output_pool(max_buffers=1.5),
        TypeError,
        r"max_buffers must be an integer; got 1\.5",
    ),
    (
        "output_pool",
        "pool-bool-min",
        lambda: output_pool(min_bytes=True),
        TypeError,
        r"min_bytes must be an integer; got True",
    ),
    (
        "output_pool",
        "pool-string-bytes",
        lambda: output_pool(max_bytes="1GB"),
        TypeError,
        r"max_bytes must be an integer; got '1GB'",
    ),
    (
        "output_pool",
        "pool-huge-bytes",
        lambda: output_pool(max_bytes=2**200),
        ValueError,
        r"max_bytes must be at most 2\*\*63 - 1; got 1606938\d{54}$",
    ),
]

# the moments building blocks (issue 14)
E += [
    (
        "Moments",
        "missing-fields",
        lambda: instnorm_numba.Moments(1, 2),
        TypeError,
        r"missing 2 required positional arguments",
    ),
    (
        "instance_moments",
        "shift-shape",
        lambda: instnorm_numba.instance_moments(np.ones((2, 3, 4)), shift=np.zeros(3)),
        ValueError,
        r"^shift must have shape \(2, 3\) to match N=2 samples and C=3 channels",
    ),
    (
        "merge_moments",
        "not-moments",
        lambda: instnorm_numba.merge_moments((1, 2, 3, 4)),
        TypeError,
        r"^parts\[0\] must be a Moments",
    ),
    (
        "moments_to_stats",
        "eps-negative",
        lambda: instnorm_numba.moments_to_stats(
            instnorm_numba.instance_moments(np.ones((2, 3, 4))), eps=-1.0
        ),
        ValueError,
        r"^eps must be >= 0",
    ),
    (
        "normalize_with_stats",
        "rstd-shape",
        lambda: instnorm_numba.normalize_with_stats(np.ones((2, 3, 4)), np.zeros((2, 3)), 1.0),
        ValueError,
        r"^rstd must have shape \(2, 3\)",
    ),
]

ERROR_TABLE = E


def test_error_table_covers_every_public_function():
    covered = {name for name, *_ in ERROR_TABLE}
    assert covered == PUBLIC, f"public functions without error cases: {PUBLIC - covered}"


@pytest.mark.parametrize(
    "call,exc_type,match",
    [pytest.param(c, t, m, id=f"{name}-{i}") for name, i, c, t, m in ERROR_TABLE],
)
def test_error_inputs(call, exc_type, match):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(BaseException) as info:
            call()
    assert type(info.value) is exc_type, f"{type(info.value).__name__}: {info.value}"
    assert info.match(match)


def test_errors_leave_arguments_untouched():
    """A refused call changes nothing: running statistics, out, the input."""
    x = _x()
    x_before = x.copy()
    rm, rv, out = np.full(3, 0.5), np.full(3, 2.0), np.full((2, 3, 4), 7.0)
    bad = [
        {"eps": -1.0},
        {"momentum": "0.1"},
        {"weight": np.ones(4)},
        {"return_stats": None},
        {"out": np.zeros((2, 3, 5))},
    ]
    for kw in bad:
        args = {"running_mean": rm, "running_var": rv, "out": out, **kw}
        with pytest.raises((TypeError, ValueError)):
            instnorm_numba.instance_norm(x, **args)
    np.testing.assert_array_equal(x, x_before)
    np.testing.assert_array_equal(rm, np.full(3, 0.5))
    np.testing.assert_array_equal(rv, np.full(3, 2.0))
    np.testing.assert_array_equal(out, np.full((2, 3, 4), 7.0))


@pytest.mark.skipif(not HAVE_BACKWARD, reason="no instance_norm_backward in this version")
def test_refused_backward_changes_nothing():
    """A refused backward call leaves grad_output, x, the statistics and out as they were."""
    r = np.random.default_rng(5)
    x = r.standard_normal((2, 3, 10)).astype(np.float32)
    _, mean, rstd = instnorm_numba.instance_norm(x, return_stats=True)
    dy = r.standard_normal(x.shape).astype(np.float32)
    out = np.full(x.shape, 7.0, np.float32)
    args = [dy, x, mean, rstd, np.ones(3), out]
    before = [a.copy() for a in args]
    for kw in ({"weight": np.ones(4)}, {"channel_axis": 0}, {"out": np.zeros((2, 3, 9))}):
        call = {"weight": np.ones(3), "out": out, **kw}
        with pytest.raises((TypeError, ValueError)):
            instnorm_numba.instance_norm_backward(dy, x, mean, rstd, **call)
    with pytest.raises(TypeError):  # a bad mean after good everything else
        instnorm_numba.instance_norm_backward(dy, x, mean.astype(int), rstd, out=out)
    for a, b in zip(args, before, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.skipif(not HAVE_LAYERS, reason="no layers in this version")
def test_refused_layer_calls_change_nothing():
    """A refused forward, backward or load leaves the layer's state and the caller's arrays."""
    layer = instnorm_numba.InstanceNorm2d(3, affine=True, track_running_stats=True)
    x = np.random.default_rng(6).standard_normal((2, 3, 4, 4))
    layer(x)
    state = {k: np.array(v, copy=True) for k, v in layer.state_dict().items()}
    x_before = x.copy()
    bad = [
        lambda: layer(np.ones((2, 4, 4, 4))),  # wrong channel count
        lambda: layer(np.ones((2, 3, 4), complex)),
        lambda: layer.backward(np.ones((2, 3, 4, 5))),
        lambda: layer.load_state_dict({**state, "running_var": np.array(["a", "b", "c"])}),
        lambda: layer.load_state_dict({**state, "weight": np.ones(4)}),
    ]
    for call in bad:
        with pytest.raises((TypeError, ValueError)):
            call()
    for k, v in layer.state_dict().items():
        np.testing.assert_array_equal(v, state[k], err_msg=k)
    np.testing.assert_array_equal(x, x_before)
    np.testing.assert_array_equal(layer.backward(np.ones_like(x)).shape, x.shape)


# ----------------------------------------------------------------------------------------------
# the duck-array policy (README "Reliability", ``_duck.refuse_or_convert``): every array
# argument of every public function meets the same rule, decided by the argument's type only


class _CudaLike:
    """What CuPy, Numba's device arrays and torch CUDA tensors show: device memory."""

    def __init__(self, a):
        self.shape, self.dtype = a.shape, a.dtype
        self.__cuda_array_interface__ = {"shape": a.shape, "typestr": a.dtype.str, "version": 3}


class _NamespaceLike:
    """An array of another array-API library (JAX, array-api-strict): converts, but is not
    NumPy's, so nothing says a host copy is what the caller wants."""

    def __init__(self, a):
        self._a = a

    def __array_namespace__(self, api_version=None):
        return None

    def __array__(self, dtype=None, copy=None):
        return self._a


class _Subclass(np.ndarray):
    """An ndarray subclass with no special meaning: read as its ndarray data."""


def _torch(a, grad):
    torch = pytest.importorskip("torch", reason="torch is not installed")
    return torch.tensor(a, requires_grad=grad)


def _dask(a):
    da = pytest.importorskip("dask.array", reason="dask is not installed")
    return da.from_array(a, chunks=1)


def _xarray(a):
    xr = pytest.importorskip("xarray", reason="xarray is not installed")
    return xr.DataArray(a)


def _matrix(a):
    """np.matrix of ``a``'s values (always 2-D: the type is refused before any shape check)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        return np.matrix(a.reshape(a.shape[0], -1) if a.ndim > 2 else a)


#: kind -> (make from a float64 ndarray, regex after "<argument> is ")
REFUSED = {
    # masked arrays as x / grad_output / out are normalized over their unmasked elements
    # (tests/test_masks.py, MASK_HANDLED below); anywhere else they are refused
    "masked": (lambda a: np.ma.masked_array(a, np.zeros(a.shape, bool)), "a numpy.ma.Masked"),
    # dask arrays as x / grad_output of the functions are normalized lazily (tests/test_dask.py,
    # DASK_HANDLED below); as any other argument, and to the layers, they are refused
    "dask": (_dask, "a dask array"),
    "xarray": (_xarray, r"an xarray\.DataArray: use instnorm_numba\.xarray"),
    "torch-requires-grad": (
        lambda a: _torch(a, True),
        r"a torch\.Tensor with requires_grad=True: .*use instnorm_numba\.torch",
    ),
    "cuda-array": (_CudaLike, r"a .*_CudaLike, an array of another library"),
    "array-namespace": (_NamespaceLike, r"a .*_NamespaceLike, an array of another library"),
    "matrix": (lambda a: _matrix(a), r"a numpy\.matrix"),
}
#: kind -> make; the result must equal the plain-ndarray call's
CONVERTED = {
    "torch-no-grad": lambda a: _torch(a, False),
    "memmap-like-subclass": lambda a: a.copy().view(_Subclass),
}

SHAPE = (2, 3, 4, 4)


def _base():
    r = np.random.default_rng(7)
    x = r.standard_normal(SHAPE)
    _, mean, rstd = instnorm_numba.instance_norm(x, return_stats=True)
    return {
        "x": x,
        "weight": r.uniform(0.5, 2.0, 3),
        "bias": r.standard_normal(3),
        "running_mean": np.zeros(3),
        "running_var": np.ones(3),
        "out": np.zeros(SHAPE),
        "grad_output": r.standard_normal(SHAPE),
        "mean": mean,
        "rstd": rstd,
    }


def _forward(a, update=True):
    return instnorm_numba.instance_norm(
        a["x"],
        a["weight"],
        a["bias"],
        running_mean=a["running_mean"],
        running_var=a["running_var"],
        use_input_stats=update,
        out=a["out"],
    )


def _backward(a):
    return instnorm_numba.instance_norm_backward(
        a["grad_output"], a["x"], a["mean"], a["rstd"], a["weight"], out=a["out"]
    )


def _layer_forward(a):
    return instnorm_numba.InstanceNorm2d(3, affine=True)(a["x"])


def _layer_backward(a):
    layer = instnorm_numba.InstanceNorm2d(3, affine=True)
    layer(_base()["x"])
    return layer.backward(a["grad_output"])


#: (function, its array arguments, whether out/running statistics are written in place)
DUCK_CALLS = {
    "instance_norm": (_forward, ["x", "weight", "bias", "running_mean", "running_var", "out"]),
    "instance_norm-eval": (
        lambda a: _forward(a, update=False),
        ["running_mean", "running_var"],
    ),
    "instance_norm_backward": (
        _backward,
        ["grad_output", "x", "mean", "rstd", "weight", "out"],
    ),
    "InstanceNorm2d": (_layer_forward, ["x"]),
    "InstanceNorm2d.backward": (_layer_backward, ["grad_output"]),
}
#: written in place: only a numpy.ndarray will do (a converted copy would lose the write)
IN_PLACE = {("instance_norm", "running_mean"), ("instance_norm", "running_var")}
IN_PLACE |= {(f, "out") for f in ("instance_norm", "instance_norm_backward")}


#: (function, argument) where a Dask array is handled, not refused: see tests/test_dask.py
DASK_HANDLED = {
    ("instance_norm", "x"),
    ("instance_norm_backward", "x"),
    ("instance_norm_backward", "grad_output"),
}


#: (function, argument) where a MaskedArray is handled, not refused: see tests/test_masks.py
MASK_HANDLED = {
    ("instance_norm", "x"),
    ("instance_norm", "out"),
    ("instance_norm_backward", "x"),
    ("instance_norm_backward", "grad_output"),
    ("instance_norm_backward", "out"),
    ("InstanceNorm2d", "x"),
    ("InstanceNorm2d.backward", "grad_output"),
}


def _duck_cases(kinds):
    for fname, (_, args) in DUCK_CALLS.items():
        for arg in args:
            for kind in kinds:
                if kind == "dask" and (fname, arg) in DASK_HANDLED:
                    continue
                if kind == "masked" and (fname, arg) in MASK_HANDLED:
                    continue
                yield pytest.param(fname, arg, kind, id=f"{fname}-{arg}-{kind}")


@pytest.mark.parametrize("fname,arg,kind", list(_duck_cases(REFUSED)))
def test_duck_arrays_refused_with_a_type_error_naming_the_argument(fname, arg, kind):
    call, _ = DUCK_CALLS[fname]
    make, why = REFUSED[kind]
    a = _base()
    before = {k: v.copy() for k, v in a.items()}
    a[arg] = make(a[arg])
    for _ in range(2):  # the same answer on every call
        with pytest.raises(TypeError) as info:
            call(a)
        assert type(info.value) is TypeError
        assert info.match(f"^{arg} is {why}"), str(info.value)
    for k, v in before.items():  # nothing written, nothing half-updated
        if k != arg:
            np.testing.assert_array_equal(a[k], v, err_msg=k)


@pytest.mark.parametrize("fname,arg,kind", list(_duck_cases(CONVERTED)))
def test_duck_arrays_converted_give_the_numpy_result(fname, arg, kind):
    call, _ = DUCK_CALLS[fname]
    plain = _base()
    expect = call(plain)
    a = _base()
    a[arg] = CONVERTED[kind](a[arg])
    if (fname, arg) in IN_PLACE and not isinstance(a[arg], np.ndarray):
        # written in place: a converted copy would lose the write, so it is refused
        with pytest.raises(TypeError, match=f"^{arg} must be a numpy.ndarray"):
            call(a)
        return
    for _ in range(2):  # whatever ran before (a refused call, the plain one), the same result
        with pytest.raises(TypeError):  # (np.matrix: refused as every argument)
            call({**_base(), arg: _matrix(_base()[arg])})
        got = call(a)
        for g, e in zip(
            got if isinstance(got, tuple) else (got,),
            expect if isinstance(expect, tuple) else (expect,),
            strict=True,
        ):
            assert type(g) is np.ndarray or (arg == "out" and g is a["out"])  # out= returned
            np.testing.assert_array_equal(g, e)
        a = {**_base(), arg: CONVERTED[kind](_base()[arg])}


@pytest.mark.skipif(not HAVE_LAYERS, reason="no layers in this version")
def test_load_state_dict_takes_torch_tensors_even_with_requires_grad():
    """Loading copies values (no graph to lose): a parameter saved by torch loads."""
    torch = pytest.importorskip("torch", reason="torch is not installed")
    layer = instnorm_numba.InstanceNorm2d(3, affine=True, track_running_stats=True)
    sd = {
        "weight": torch.tensor([1.0, 2.0, 3.0], requires_grad=True),
        "bias": torch.zeros(3),
        "running_mean": torch.ones(3, dtype=torch.float64),
        "running_var": torch.full((3,), 2.0),
        "num_batches_tracked": torch.tensor(7),
    }
    layer.load_state_dict(sd)
    np.testing.assert_array_equal(layer.weight, [1, 2, 3])
    np.testing.assert_array_equal(layer.running_var, [2, 2, 2])
    assert layer.num_batches_tracked == 7 and layer.weight.dtype == np.float32


@pytest.mark.skipif(not HAVE_LAYERS, reason="no layers in this version")
def test_refused_num_batches_tracked_loads_nothing():
    layer = instnorm_numba.InstanceNorm2d(3, affine=True, track_running_stats=True)
    state = {k: np.array(v, copy=True) for k, v in layer.state_dict().items()}
    new = {k: v + 1 for k, v in state.items()}
    for bad in (np.array(2**63, np.uint64), np.array(9.3e18), np.array(-1e19), np.array(2.5)):
        with pytest.raises(StateDictError, match="num_batches_tracked"):
            layer.load_state_dict({**new, "num_batches_tracked": bad})
        for k, v in layer.state_dict().items():
            np.testing.assert_array_equal(v, state[k], err_msg=k)
    layer.load_state_dict({**new, "num_batches_tracked": np.array(2**63 - 1, np.uint64)})
    assert layer.num_batches_tracked == 2**63 - 1


# ----------------------------------------------------------------------------------------------
# NUMBA_DISABLE_JIT=1 (debugging): every dtype right, or refused (float16), never wrong

DISABLE_JIT = r"""
import json
import numpy as np
import instnorm_numba as inn
from instnorm_numba import reference as ref
res = {}
r = np.random.default_rng(0)
for dt in ["float16", "float32", "float64", ">f4", "int32", "uint8", "bool"]:
    for ax in (1, -1):
        x = (r.standard_normal((2, 3, 5, 6)) * 3 + 1).astype(dt)
        w = np.linspace(0.5, 2, x.shape[ax])
        key = f"{dt}/{ax}"
        try:
            y, mean, rstd = inn.instance_norm(x, w, channel_axis=ax, return_stats=True)
            xin = x.astype(np.float64) if x.dtype.kind in "iub" else x
            e = ref.ulp_error(y, ref.instance_norm(xin, w, channel_axis=ax, exact=True),
                              scale=ref.accuracy_scale(xin, w, channel_axis=ax)
                              if y.dtype == np.float64 else None)
            dy = r.standard_normal(x.shape).astype(y.dtype)
            dx = inn.instance_norm_backward(dy, x, mean, rstd, w, channel_axis=ax)[0]
            edx = ref.instance_norm_backward(dy, xin, w, channel_axis=ax, exact=True)[0]
            eb = ref.ulp_error(dx, edx, scale=ref.backward_accuracy_scale(
                dy, xin, w, channel_axis=ax) if dx.dtype == np.float64 else None)
            res[key] = [float(e), float(eb)]
        except Exception as exc:
            res[key] = f"{type(exc).__name__}: {exc}"
print("RESULT " + json.dumps(res))
"""


def test_numba_disable_jit_every_dtype_right_or_refused():
    """Before: float16 under NUMBA_DISABLE_JIT=1 returned inf-eps-wrong numbers silently."""
    res = result_of(run_python(DISABLE_JIT, env={"NUMBA_DISABLE_JIT": "1"}, timeout=900))
    for key, v in res.items():
        if key.startswith("float16"):
            assert v.startswith("TypeError: x has dtype float16, which NUMBA_DISABLE_JIT=1"), v
        else:
            tol = 4 if key.split("/")[0] not in ("float32", ">f4") else 1
            assert isinstance(v, list) and max(v) <= tol, (key, v)
