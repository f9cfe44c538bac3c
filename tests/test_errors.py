"""The error table (cf. PyTorch OpInfo ``error_inputs``): every invalid argument of every
public function and layer, the exact exception type, a message naming the argument and its
value, and no side effect on the caller's data."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import instnorm_numba

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
