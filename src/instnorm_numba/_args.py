"""Argument checking for the NumPy-shaped API: every bad argument becomes a ``TypeError`` or
``ValueError`` that names it and its value.  Shared by ``_api``, ``_masked``, ``dask`` and the
layers; arrays of other libraries meet the duck-array policy (``_duck``) first."""

from __future__ import annotations

import math
import numbers
import operator

import numpy as np

from ._duck import refuse_or_convert

# --------------------------------------------------------------------------------------------
# argument checking


def _fmt_shape(shape):
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def result_dtype(dtype: np.dtype, name: str = "x") -> np.dtype:
    """float16/32/64 keep their dtype (in native byte order); integers and bools give float64."""
    if dtype.kind == "f":
        if dtype.itemsize in (2, 4, 8):
            return dtype.newbyteorder("=")
        raise TypeError(
            f"{name} has dtype {dtype}, which is not supported: convert it to float64 first"
        )
    if dtype.kind in "iub":
        return np.dtype(np.float64)
    if dtype.name == "bfloat16":  # ml_dtypes' (JAX, ONNX tooling): refused, see README
        raise TypeError(
            f"{name} has dtype bfloat16, which is not supported: convert it to float32 first "
            f"(every bfloat16 value is exact in float32)"
        )
    raise TypeError(f"{name} must have a real floating, integer or bool dtype; got dtype {dtype}")


def as_array(v, name: str, what: str = "an array_like of real numbers") -> np.ndarray:
    """``np.asarray(v)``; NumPy's conversion errors become a TypeError naming ``name``.

    Arrays of other libraries meet the duck-array policy first (``_duck.refuse_or_convert``).
    """
    refuse_or_convert(v, name)
    try:
        return np.asarray(v)
    except (ValueError, TypeError, RuntimeError) as exc:  # RuntimeError: some __array__s
        raise TypeError(f"{name} must be {what}; got {exc}") from None


def as_input(x, name: str = "x") -> np.ndarray:
    """``x`` as an ndarray with ndim >= 3 and a supported dtype (no copy unless needed)."""
    arr = x if type(x) is np.ndarray else as_array(x, name)
    result_dtype(arr.dtype, name)
    if arr.ndim < 3:
        raise ValueError(
            f"{name} must have at least 3 dimensions (N, C, *spatial); got ndim={arr.ndim} "
            f"with shape {_fmt_shape(arr.shape)}"
        )
    return arr


def normalize_channel_axis(channel_axis, ndim: int) -> int:
    if isinstance(channel_axis, bool) or not isinstance(channel_axis, numbers.Integral):
        raise TypeError(f"channel_axis must be an integer; got {short_repr(channel_axis)}")
    ax = operator.index(channel_axis)
    if not -ndim <= ax < ndim:
        raise ValueError(
            f"channel_axis={short_repr(ax)} is out of range for an input with ndim={ndim}"
        )
    ax %= ndim
    if ax == 0:
        raise ValueError(
            f"channel_axis={channel_axis} names axis 0, the batch axis; the channel axis must "
            f"be one of 1..{ndim - 1} (or -1 for channels-last)"
        )
    return ax


def short_repr(value) -> str:
    """``repr(value)``, but an integer too large for a float (or for ``repr``: Python refuses
    over 4300 digits) is described by its size."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        bits = int(value).bit_length()
        if bits > 64:
            return f"{'a negative' if value < 0 else 'an'} integer of {bits} bits"
    return repr(value)


def real_scalar(value, name: str, *, minimum=None) -> float:
    """A finite float from a real number; a value no float can hold is a ValueError too."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number; got {short_repr(value)}")
    try:
        v = float(value)
    except OverflowError:  # a huge int or Fraction: Python holds it, a float cannot
        v = math.inf
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite; got {short_repr(value)}")
    if minimum is not None and v < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {short_repr(value)}")
    return v


def channel_vector(v, name: str, C: int, default: float) -> np.ndarray:
    """weight/bias: None or array_like of shape (C,), returned as contiguous float64."""
    if v is None:
        return np.full(C, default)
    arr = as_array(v, name, "None or an array_like of real numbers")
    if arr.dtype.kind not in "fiub" or (arr.dtype.kind == "f" and arr.dtype.itemsize > 8):
        raise TypeError(f"{name} must have a real floating, integer or bool dtype; got {arr.dtype}")
    if arr.shape != (C,):
        raise ValueError(
            f"{name} must have shape ({C},) to match C={C} channels; got shape "
            f"{_fmt_shape(arr.shape)}"
        )
    return np.ascontiguousarray(arr, dtype=np.float64)


def running_vector(v, name: str, C: int, *, update: bool) -> np.ndarray:
    if update:
        refuse_or_convert(v, name)
        if not isinstance(v, np.ndarray):
            raise TypeError(
                f"{name} must be a numpy.ndarray (it is updated in place); got {type(v).__name__}"
            )
        arr = v
    else:
        arr = as_array(v, name)
    if arr.dtype.kind != "f" or arr.dtype.itemsize > 8:
        raise TypeError(f"{name} must have a float16, float32 or float64 dtype; got {arr.dtype}")
    if arr.shape != (C,):
        raise ValueError(
            f"{name} must have shape ({C},) to match C={C} channels; got shape "
            f"{_fmt_shape(arr.shape)}"
        )
    if update and not arr.flags.writeable:
        raise ValueError(f"{name} is read-only, but use_input_stats=True updates it in place")
    return arr


def check_out(out, shape, dtype: np.dtype, name: str = "out") -> np.ndarray:
    if not isinstance(out, np.ma.MaskedArray):  # (a MaskedArray's data receives the result)
        refuse_or_convert(out, name)
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray or None; got {type(out).__name__}")
    if out.shape != tuple(shape):
        raise ValueError(
            f"{name} must have shape {_fmt_shape(shape)} to match x; got shape "
            f"{_fmt_shape(out.shape)}"
        )
    if out.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype} (the result dtype); got {out.dtype}")
    if not out.flags.writeable:
        raise ValueError(f"{name} is read-only")
    return out


def stats_matrix(v, name: str, N: int, C: int) -> np.ndarray:
    """mean/rstd from the forward: array_like of shape (N, C), returned as a float64 copy."""
    arr = as_array(v, name)
    if arr.dtype.kind != "f" or arr.dtype.itemsize > 8:
        raise TypeError(
            f"{name} must have a floating dtype (instance_norm returns float64); got {arr.dtype}"
        )
    if arr.shape != (N, C):
        raise ValueError(
            f"{name} must have shape ({N}, {C}) to match N={N} samples and C={C} channels of "
            f"x; got shape {_fmt_shape(arr.shape)}"
        )
    # a private copy: the kernels must not see memory that ``out`` may share
    return np.array(arr, dtype=np.float64, order="C", copy=True)


def running_options(use_input_stats, return_stats, running_mean, running_var):
    """The flags and the running statistics of a forward call: ``(has_running, update)``."""
    if not isinstance(use_input_stats, (bool, np.bool_)):
        raise TypeError(f"use_input_stats must be a bool; got {use_input_stats!r}")
    if not isinstance(return_stats, (bool, np.bool_)):
        raise TypeError(f"return_stats must be a bool; got {return_stats!r}")
    if (running_mean is None) != (running_var is None):
        given = "running_mean" if running_var is None else "running_var"
        raise ValueError(f"running_mean and running_var go together: only {given} was given")
    has_running = running_mean is not None
    if not use_input_stats and not has_running:
        raise ValueError("use_input_stats=False needs running_mean and running_var")
    return has_running, has_running and bool(use_input_stats)


def spatial_size(shape, axis: int, update: bool) -> int:
    """Elements per instance of an input of ``shape``; refused below 2 when the running
    statistics are updated (their unbiased variance divides by ``L - 1``)."""
    L = math.prod(s for i, s in enumerate(shape) if i not in (0, axis))
    if update and L <= 1:
        raise ValueError(
            f"updating running statistics (running_mean, running_var with use_input_stats=True) "
            f"needs more than 1 spatial element per instance; got x of shape {_fmt_shape(shape)}"
        )
    return L


def check_grad_output(g, x) -> None:
    """``grad_output`` of ``x``'s shape and of the forward's result dtype for ``x``."""
    dtype = result_dtype(x.dtype)
    if g.shape != x.shape:
        raise ValueError(
            f"grad_output must have shape {_fmt_shape(x.shape)} to match x; got shape "
            f"{_fmt_shape(g.shape)}"
        )
    if result_dtype(g.dtype, "grad_output") != dtype or g.dtype.kind != "f":
        raise TypeError(
            f"grad_output must have dtype {dtype} (instance_norm's result dtype for x of dtype "
            f"{x.dtype}); got {g.dtype}"
        )
