"""Loading a PyTorch ``state_dict`` into a layer: every value checked before any is assigned,
with PyTorch's messages (:meth:`instnorm_numba.layers.InstanceNorm.load_state_dict`)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

from ._args import _fmt_shape
from ._duck import refuse_or_convert


def _is_bool(v) -> bool:
    return isinstance(v, (bool, np.bool_))


class IncompatibleKeys(NamedTuple):
    """What :meth:`InstanceNorm.load_state_dict` returns, as PyTorch's ``_IncompatibleKeys``."""

    missing_keys: list
    unexpected_keys: list


class StateDictError(ValueError, RuntimeError):
    """A state dict that cannot be loaded.

    A ``ValueError`` (a bad argument) that is also a ``RuntimeError``, the type PyTorch's
    ``load_state_dict`` raises, so code ported from PyTorch catches it unchanged.
    """


def load_state(layer, state_dict, strict) -> IncompatibleKeys:
    """``layer.load_state_dict(state_dict, strict)``: check everything, then assign."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"state_dict must be a mapping of str to array_like (a dict, an np.load'ed "
            f".npz); got {type(state_dict).__name__}"
        )
    if not _is_bool(strict):
        raise TypeError(f"strict must be a bool; got {strict!r}")
    keys = list(state_dict.keys())
    for k in keys:
        if not isinstance(k, str):
            raise TypeError(f"state_dict keys must be str; got {k!r}")
    klass = type(layer).__name__
    metadata = getattr(state_dict, "_metadata", None)
    version = None
    if isinstance(metadata, Mapping) and isinstance(metadata.get(""), Mapping):
        version = metadata[""].get("version")
    present = set(keys)
    error_msgs, missing, unexpected = [], [], []

    if version is None and not layer.track_running_stats:
        stats = [k for k in ("running_mean", "running_var") if k in present]
        if stats:
            error_msgs.append(
                "Unexpected running stats buffer(s) {names} for {klass} with "
                "track_running_stats=False. If state_dict is a checkpoint saved before "
                "0.4.0, this may be expected because {klass} does not track running stats "
                "by default since 0.4.0. Please remove these keys from state_dict. If the "
                "running stats are actually needed, instead set track_running_stats=True "
                "in {klass} to enable them. See the documentation of {klass} for "
                "details.".format(names=" and ".join(f'"{k}"' for k in stats), klass=klass)
            )
            present -= set(stats)
            keys = [k for k in keys if k in present]

    local = layer._local_state()
    values = {}
    for name, param in local.items():
        if name not in present:
            if name == "num_batches_tracked" and (version is None or version < 2):
                continue  # PyTorch keeps the current value for old checkpoints
            missing.append(name)
            continue
        raw = state_dict[name]
        value, why = _state_value(raw, name)
        if value is None or value.dtype.kind not in "fiub":
            error_msgs.append(
                f'While copying the parameter named "{name}", expected an array_like of '
                f"real numbers from checkpoint but received {type(raw).__name__}"
                + ("" if value is None else f" of dtype {value.dtype}")
                + (f" ({why})" if why else "")
            )
            continue
        pshape = np.shape(param)
        if len(pshape) == 0 and value.shape == (1,):
            value = value[0]
        if value.shape != pshape:
            error_msgs.append(
                f"size mismatch for {name}: copying a param with shape "
                f"{_fmt_shape(value.shape)} from checkpoint, the shape in current model is "
                f"{_fmt_shape(pshape)}."
            )
            continue
        if name == "num_batches_tracked":
            if not _fits_int64(value):
                error_msgs.append(
                    f'While copying the parameter named "{name}", expected an integer '
                    f"from checkpoint but received {value!r} (num_batches_tracked must be "
                    "an integer in the int64 range)"
                )
                continue
            value = value.astype(np.int64)
        values[name] = value

    unexpected = [k for k in keys if k not in local]
    if strict:
        if unexpected:
            error_msgs.insert(
                0,
                "Unexpected key(s) in state_dict: {}. ".format(
                    ", ".join(f'"{k}"' for k in unexpected)
                ),
            )
        if missing:
            error_msgs.insert(
                0,
                "Missing key(s) in state_dict: {}. ".format(", ".join(f'"{k}"' for k in missing)),
            )
    if error_msgs:
        raise StateDictError(
            "Error(s) in loading state_dict for {}:\n\t{}".format(klass, "\n\t".join(error_msgs))
        )
    for name, value in values.items():  # everything checked: now assign
        dtype = np.int64 if name == "num_batches_tracked" else layer.dtype
        current = getattr(layer, name)
        if isinstance(current, np.ndarray) and current.flags.writeable and (current.dtype == dtype):
            current[...] = value
        else:
            setattr(layer, name, np.array(value, dtype=dtype))
    return IncompatibleKeys(missing, unexpected)


def _state_value(raw, name: str):
    """A checkpoint value as an ndarray, or (None, why) when it cannot be one.

    The duck-array policy applies (a masked or dask array is refused), except that a torch
    tensor's ``requires_grad`` does not matter here: loading copies values, no graph.
    """
    try:
        if (type(raw).__module__ or "").startswith("torch") and hasattr(raw, "detach"):
            raw = raw.detach()
        refuse_or_convert(raw, name)
        return np.asarray(raw), None
    except (TypeError, ValueError, RuntimeError) as exc:
        return None, str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _fits_int64(value: np.ndarray) -> bool:
    """A 0-d real value that is an integer within the int64 range."""
    kind = value.dtype.kind
    if kind == "b":
        return True
    if kind in "iu":
        return int(value) <= np.iinfo(np.int64).max  # uint64 beyond 2**63 - 1: refused
    v = float(value)
    return math.isfinite(v) and v == math.floor(v) and -(2.0**63) <= v < 2.0**63


# public through ``instnorm_numba.layers`` (tracebacks and pickles name that module)
IncompatibleKeys.__module__ = StateDictError.__module__ = "instnorm_numba.layers"
