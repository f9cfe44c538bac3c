"""Stateful instance-normalization layers with PyTorch-compatible state.

``InstanceNorm1d``, ``InstanceNorm2d`` and ``InstanceNorm3d`` behave as their
``torch.nn`` twins do in train and eval mode, and load and save the same ``state_dict`` keys,
so a trained model's norm layers run in a NumPy pipeline without PyTorch.  ``InstanceNorm``
takes any ``ndim >= 3`` and a ``channel_axis``.  Built on the public API (:mod:`._api`) only.

Deliberate differences from ``torch.nn.InstanceNorm*d``, all documented on the class:

- ``load_state_dict`` validates everything before it assigns anything: on error nothing is
  loaded (PyTorch copies the valid entries before it raises).
- ``backward`` overwrites ``grad_weight`` / ``grad_bias``; PyTorch accumulates into ``.grad``.
- An empty batch leaves the running statistics unchanged (PyTorch sets them to NaN).
- The output dtype follows the input's (``instance_norm``'s promotion); PyTorch refuses an
  input whose dtype differs from the layer's parameters.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

from ._api import (
    instance_norm,
)
from ._args import (
    _fmt_shape,
    as_array,
    as_input,
    normalize_channel_axis,
    real_scalar,
    result_dtype,
    short_repr,
)
from ._state_dict import IncompatibleKeys, StateDictError, _is_bool, load_state

__all__ = [
    "IncompatibleKeys",
    "InstanceNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "StateDictError",
]


def _layer_dtype(dtype) -> np.dtype:
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be float16, float32 or float64; got {dtype!r}") from None
    if dt.kind != "f" or dt.itemsize not in (2, 4, 8):
        raise TypeError(f"dtype must be float16, float32 or float64; got {dtype!r}")
    return dt.newbyteorder("=")


class InstanceNorm:
    """Instance normalization layer for input of any ``ndim >= 3``, with PyTorch's state.

    Axis 0 is the batch, ``channel_axis`` the channels, every other axis is spatial. Forward
    logic, parameters, buffers and ``state_dict`` keys are those of ``torch.nn.InstanceNorm2d``
    (``torch.nn.modules.instancenorm._InstanceNorm``):

    - input statistics are used when ``training`` or when running statistics are not tracked;
      otherwise ``running_mean`` / ``running_var`` normalize;
    - the running statistics are updated, in place, only when ``training`` and tracking:
      ``r = (1 - momentum) * r + momentum * s``, ``s`` the per-instance mean or *unbiased*
      variance averaged over the batch. ``momentum=None`` freezes them, as in PyTorch's
      InstanceNorm (which passes ``momentum=0``; the cumulative average of BatchNorm is not
      used), and ``num_batches_tracked`` stays 0, as PyTorch's InstanceNorm never counts.

    Parameters
    ----------
    num_features : int
        ``C``, the number of channels. Without ``affine`` a different channel count only warns,
        as in PyTorch; with ``affine`` it raises ``ValueError``.
    eps : float, default 1e-5
        Added to the variance; finite and >= 0.
    momentum : float or None, default 0.1
        Weight of the new statistics in the running update; None freezes the running statistics.
    affine : bool, default False
        Learnable ``weight`` (ones) and ``bias`` (zeros) of shape ``(num_features,)``.
    track_running_stats : bool, default False
        Keep ``running_mean`` (zeros), ``running_var`` (ones) and ``num_batches_tracked``
        (a 0-d int64 array, 0).
    bias : bool, default True
        Keyword only, as in ``torch.nn`` (2.1 and later). With ``affine``, False keeps the
        ``weight`` but no ``bias`` (``bias`` is None, no ``"bias"`` in the state dict). Without
        ``affine`` it changes nothing.
    channel_axis : int, default 1
        Keyword only. The channel axis of the input (1, or -1 for channels-last; never 0).
    dtype : float16, float32 or float64, default float32
        Keyword only. dtype of parameters and buffers. The output dtype follows the input, as
        :func:`instnorm_numba.instance_norm` promotes it.

    Attributes
    ----------
    weight, bias : ndarray of shape (num_features,) or None
    running_mean, running_var : ndarray of shape (num_features,) or None
    num_batches_tracked : 0-d int64 ndarray or None
    training : bool
        True after construction; set by :meth:`train` and :meth:`eval`.
    grad_weight, grad_bias : ndarray or None
        Set by :meth:`backward` when ``affine`` (overwritten by each call; PyTorch accumulates).

    Notes
    -----
    :meth:`forward` keeps a reference to its input and its statistics for :meth:`backward`;
    do not modify the input in place between the two. :meth:`load_state_dict` checks every
    entry before it assigns any, so on error nothing is loaded.

    Examples
    --------
    >>> import numpy as np
    >>> from instnorm_numba import InstanceNorm
    >>> norm = InstanceNorm(3, affine=True, channel_axis=-1)      # channels-last (N, H, W, C)
    >>> x = np.random.default_rng(0).standard_normal((2, 8, 8, 3)).astype(np.float32)
    >>> y = norm(x)
    >>> y.shape, y.dtype
    ((2, 8, 8, 3), dtype('float32'))
    >>> sorted(norm.state_dict())
    ['bias', 'weight']
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = False,
        track_running_stats: bool = False,
        *,
        bias: bool = True,
        channel_axis: int = 1,
        dtype: DTypeLike = np.float32,
    ) -> None:
        if _is_bool(num_features) or not isinstance(num_features, numbers.Integral):
            raise TypeError(f"num_features must be an integer; got {short_repr(num_features)}")
        if num_features < 1:
            raise ValueError(f"num_features must be >= 1; got {short_repr(num_features)}")
        if num_features > _MAX_FEATURES:  # np.ones(C) would raise, unnamed, or exhaust memory
            raise ValueError(
                f"num_features must be <= {_MAX_FEATURES}; got {short_repr(num_features)}"
            )
        eps_value = real_scalar(eps, "eps", minimum=0.0)
        if momentum is not None:
            real_scalar(momentum, "momentum")
        if not _is_bool(affine):
            raise TypeError(f"affine must be a bool; got {affine!r}")
        if not _is_bool(track_running_stats):
            raise TypeError(f"track_running_stats must be a bool; got {track_running_stats!r}")
        if not _is_bool(bias):
            raise TypeError(f"bias must be a bool; got {bias!r}")
        if _is_bool(channel_axis) or not isinstance(channel_axis, numbers.Integral):
            raise TypeError(f"channel_axis must be an integer; got {channel_axis!r}")
        if channel_axis == 0:
            raise ValueError(
                "channel_axis=0 names axis 0, the batch axis; the channel axis must be >= 1 "
                "(or negative, -1 for channels-last)"
            )
        self.num_features = int(num_features)
        self.eps = eps_value
        self.momentum = None if momentum is None else float(momentum)
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.channel_axis = int(channel_axis)
        self.dtype = _layer_dtype(dtype)
        self.training = True
        C, dt = self.num_features, self.dtype
        self.weight: np.ndarray | None = np.ones(C, dt) if self.affine else None
        self.bias: np.ndarray | None = np.zeros(C, dt) if self.affine and bias else None
        self.running_mean: np.ndarray | None = None
        self.running_var: np.ndarray | None = None
        self.num_batches_tracked: np.ndarray | None = None
        if self.track_running_stats:
            self.running_mean = np.zeros(C, dt)
            self.running_var = np.ones(C, dt)
            self.num_batches_tracked = np.array(0, dtype=np.int64)
        self.grad_weight: np.ndarray | None = None
        self.grad_bias: np.ndarray | None = None
        self._saved = None

    # ---------------------------------------------------------------------------------------
    # module-like plumbing

    def train(self, mode: bool = True) -> InstanceNorm:
        """Set training mode (``mode=False`` is eval mode); return self."""
        if not _is_bool(mode):
            raise TypeError(f"mode must be a bool; got {mode!r}")
        self.training = bool(mode)
        return self

    def eval(self) -> InstanceNorm:
        """Set eval mode; return self."""
        return self.train(False)

    def reset_running_stats(self) -> None:
        """Running mean 0, running variance 1, ``num_batches_tracked`` 0 (when tracking)."""
        if self.track_running_stats:
            self.running_mean[...] = 0
            self.running_var[...] = 1
            self.num_batches_tracked[...] = 0

    def reset_parameters(self) -> None:
        """Running statistics reset; ``weight`` ones and ``bias`` zeros (when affine)."""
        self.reset_running_stats()
        if self.affine:
            self.weight[...] = 1
            if self.bias is not None:
                self.bias[...] = 0

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, bias={self.bias is not None}, "
            f"track_running_stats={self.track_running_stats}"
        )

    def __repr__(self) -> str:
        extra = self.extra_repr()
        if type(self) is InstanceNorm:
            extra += f", channel_axis={self.channel_axis}"
        if self.dtype != np.float32:
            extra += f", dtype={self.dtype.name}"
        return f"{type(self).__name__}({extra})"

    # ---------------------------------------------------------------------------------------
    # forward

    def _batched(self, x):
        """``x`` as an ndarray with a batch axis; whether one was added."""
        return as_input(x), False

    def _feature_dim(self, x: np.ndarray) -> int:
        return normalize_channel_axis(self.channel_axis, x.ndim)

    def __call__(
        self, x: ArrayLike, *, mask: ArrayLike | None = None, lengths: ArrayLike | None = None
    ) -> np.ndarray:
        """Same as :meth:`forward`."""
        return self._forward(x, mask, lengths)

    def forward(
        self, x: ArrayLike, *, mask: ArrayLike | None = None, lengths: ArrayLike | None = None
    ) -> np.ndarray:
        """Normalize ``x``; update the running statistics in training mode when tracking.

        ``mask`` / ``lengths`` name the valid elements as in
        :func:`instnorm_numba.instance_norm` (for an unbatched input: without the batch axis,
        ``lengths`` a single integer); :meth:`backward` uses them too.  Returns an ndarray of
        ``x``'s shape with ``instance_norm``'s result dtype.
        """
        return self._forward(x, mask, lengths)

    def _forward(self, x, mask=None, lengths=None):
        x, unbatched = self._batched(x)
        if unbatched:  # the valid set of the one sample, given a batch axis like x
            mask = None if mask is None else as_array(mask, "mask", "a boolean array_like")[None]
            lengths = None if lengths is None else as_array(lengths, "lengths")[None]
        axis = self._feature_dim(x)
        C = x.shape[axis]
        if C != self.num_features:
            dim = axis - 1 if unbatched else axis
            if self.affine:
                raise ValueError(
                    f"expected input's size at dim={dim} to match num_features "
                    f"({self.num_features}), but got: {C}."
                )
            warnings.warn(
                f"input's size at dim={dim} does not match num_features. You can silence "
                "this warning by not passing in num_features, which is not used because "
                "affine=False",
                UserWarning,
                stacklevel=3,  # the caller of forward() or __call__()
            )
        use_input_stats = self.training or not self.track_running_stats
        if use_input_stats:
            spatial = math.prod(s for i, s in enumerate(x.shape) if i not in (0, axis))
            if spatial == 1:  # as torch.nn.functional.instance_norm, even without tracking
                raise ValueError(
                    "Expected more than 1 spatial element when training, got input size "
                    f"{_fmt_shape(x.shape)}"
                )
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats:
            running = {"running_mean": self.running_mean, "running_var": self.running_var}
        else:
            running = {}
        y, mean, rstd = instance_norm(
            x,
            self.weight,
            self.bias,
            eps=self.eps,
            channel_axis=axis,
            use_input_stats=use_input_stats,
            momentum=momentum,
            return_stats=True,
            mask=mask,
            lengths=lengths,
            **running,
        )
        if not use_input_stats:  # the constants of the normalization, per channel
            mean = np.array(self.running_mean, dtype=np.float64)
            with np.errstate(divide="ignore", invalid="ignore"):  # var 0, eps 0: inf, as _api
                rstd = 1.0 / np.sqrt(np.asarray(self.running_var, dtype=np.float64) + self.eps)
        self._saved = _Saved(
            x, axis, unbatched, use_input_stats, mean, rstd, y.dtype, mask, lengths
        )
        return y[0] if unbatched else y

    # ---------------------------------------------------------------------------------------
    # backward

    def backward(self, grad_output: ArrayLike) -> np.ndarray:
        """Gradient of the last :meth:`forward` with respect to its input.

        Parameters
        ----------
        grad_output : array_like
            Shape of the last forward's input (batched or not, as it was).

        Returns
        -------
        grad_input : ndarray
            Shape of the input, the forward's result dtype. When that forward used input
            statistics the gradient flows through them (training mode); when it normalized
            with the running statistics they are constants.

        With ``affine``, ``grad_weight`` and ``grad_bias`` (the parameters' dtype) are stored
        on the layer, replacing the previous ones.
        """
        s = self._saved
        if s is None:
            raise RuntimeError("backward() needs a forward() first: nothing was saved")
        dy = as_array(grad_output, "grad_output")
        result_dtype(dy.dtype, "grad_output")
        shape = s.x.shape[1:] if s.unbatched else s.x.shape
        if dy.shape != shape:
            raise ValueError(
                f"grad_output must have shape {_fmt_shape(shape)}, the shape of the last "
                f"forward's input; got shape {_fmt_shape(dy.shape)}"
            )
        dy = np.asarray(dy[None] if s.unbatched else dy, dtype=s.dtype)
        if s.use_input_stats:
            from ._api import instance_norm_backward  # lazily: issue 3 lands separately

            gx, gw, gb = instance_norm_backward(
                dy, s.x, s.mean, s.rstd, self.weight, channel_axis=s.axis, mask=s.mask,
                lengths=s.lengths,
            )  # fmt: skip
        else:
            gx, gw, gb = self._backward_fixed_stats(dy, s)
        if self.affine:
            self.grad_weight = np.asarray(gw, dtype=self.dtype)
            self.grad_bias = None if self.bias is None else np.asarray(gb, dtype=self.dtype)
        return gx[0] if s.unbatched else gx

    def _backward_fixed_stats(self, dy, s):
        """Gradients when the statistics were constants: ``y = (x - m[c]) * r[c] * w[c] + b[c]``."""
        C = s.x.shape[s.axis]
        w = np.ones(C) if self.weight is None else np.asarray(self.weight, dtype=np.float64)
        valid = self._valid(s)
        # dx = dy * r * w, in one parallel pass: normalize dy by mean 0, variance 1, eps 0
        gx = instance_norm(
            dy,
            s.rstd * w,
            eps=0.0,
            channel_axis=s.axis,
            running_mean=np.zeros(C),
            running_var=np.ones(C),
            use_input_stats=False,
            mask=valid,
        )
        N = dy.shape[0]
        xd = np.ma.getdata(s.x)
        d = np.moveaxis(dy, s.axis, 1).reshape(N, C, -1).astype(np.float64)
        xc = np.moveaxis(xd, s.axis, 1).reshape(N, C, -1).astype(np.float64)
        xc -= s.mean[:, None]
        if valid is not None:  # sums of the valid elements only (invalid ones may be NaN)
            v = np.moveaxis(valid, s.axis, 1).reshape(N, C, -1)
            d = np.where(v, d, 0.0)
            xc = np.where(v, xc, 0.0)
        gb = d.sum(axis=(0, 2))
        gw = np.einsum("ncl,ncl->c", d, xc) * s.rstd
        return gx, gw, gb

    @staticmethod
    def _valid(s):
        """The last forward's valid set as a boolean array of its input's shape, or None."""
        if s.mask is None and s.lengths is None and not isinstance(s.x, np.ma.MaskedArray):
            return None
        from . import _masked

        xd, ma = _masked.unmask(s.x)
        L = math.prod(n for i, n in enumerate(xd.shape) if i not in (0, s.axis))
        valid = _masked.resolve(s.mask, s.lengths, ma, xd.shape, s.axis, L)
        return _masked.valid_mask(valid, xd.shape, s.axis)

    # ---------------------------------------------------------------------------------------
    # state dict

    def _local_state(self) -> dict:
        names = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}

    def state_dict(self) -> dict[str, np.ndarray]:
        """PyTorch's keys and values: copies of the parameters and buffers that are not None.

        ``weight``, ``bias``, ``running_mean``, ``running_var`` (shape ``(num_features,)``,
        the layer's dtype) and ``num_batches_tracked`` (0-d int64), in PyTorch's order.
        """
        return {k: np.array(v, copy=True) for k, v in self._local_state().items()}

    def load_state_dict(
        self, state_dict: Mapping[str, ArrayLike], strict: bool = True
    ) -> IncompatibleKeys:
        """Load parameters and buffers, reporting missing and unexpected keys like PyTorch.

        Parameters
        ----------
        state_dict : Mapping of str to array_like
            For example ``{k: v.numpy() for k, v in module.state_dict().items()}`` or an
            ``.npz`` file opened with ``np.load``. Values are cast to the layer's dtype and
            copied into the existing arrays.
        strict : bool, default True
            Missing or unexpected keys raise.

        Returns
        -------
        IncompatibleKeys
            ``(missing_keys, unexpected_keys)``.

        Raises
        ------
        StateDictError
            (a ``ValueError`` and a ``RuntimeError``) with PyTorch's messages: missing and
            unexpected keys when ``strict``; a shape mismatch; running statistics given to a
            layer with ``track_running_stats=False`` (even when not ``strict``, as PyTorch).
            Nothing is loaded then.

        Notes
        -----
        As in PyTorch, a missing ``num_batches_tracked`` is not reported (checkpoints older
        than PyTorch 0.4.1 lack it) and a one-element 1-D value loads into a 0-d buffer. A
        mapping carrying PyTorch's ``_metadata`` with a version is honoured as PyTorch does.
        """
        return load_state(self, state_dict, strict)


#: the largest num_features: a channel count any index type of NumPy can address
_MAX_FEATURES = 2**31 - 1


class _Saved(NamedTuple):
    x: np.ndarray  # batched input
    axis: int
    unbatched: bool
    use_input_stats: bool
    mean: np.ndarray  # float64: (N, C) input statistics, or (C,) running ones
    rstd: np.ndarray  # float64, as mean
    dtype: np.dtype  # result dtype
    mask: object = None  # the forward's mask= / lengths=, as given (batched)
    lengths: object = None


class _InstanceNormNd(InstanceNorm):
    """Channels-first ``(N, C, *spatial)`` or unbatched ``(C, *spatial)``, fixed spatial ndim."""

    _spatial_ndim: int

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = False,
        track_running_stats: bool = False,
        *,
        bias: bool = True,
        dtype: DTypeLike = np.float32,
    ) -> None:
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            bias=bias,
            channel_axis=1,
            dtype=dtype,
        )

    def _check_input_dim(self, x):
        arr = as_array(x, "x")
        result_dtype(arr.dtype, "x")  # a TypeError naming x comes before any shape complaint
        k = self._spatial_ndim
        if arr.ndim not in (k + 1, k + 2):
            raise ValueError(f"expected {k + 1}D or {k + 2}D input (got {arr.ndim}D input)")
        return arr

    def _batched(self, x):
        arr = self._check_input_dim(x)
        unbatched = arr.ndim == self._spatial_ndim + 1
        return as_input(arr[None] if unbatched else arr), unbatched

    def _feature_dim(self, x: np.ndarray) -> int:
        return 1


class InstanceNorm1d(_InstanceNormNd):
    """:class:`InstanceNorm` for ``(N, C, L)`` or unbatched ``(C, L)``, as
    ``torch.nn.InstanceNorm1d``.

    Examples
    --------
    >>> import numpy as np
    >>> from instnorm_numba import InstanceNorm1d
    >>> norm = InstanceNorm1d(1, eps=0.0)
    >>> norm(np.array([[1.0, 2.0, 3.0, 4.0]])).round(3)                # (C, L)
    array([[-1.342, -0.447,  0.447,  1.342]])
    """

    _spatial_ndim = 1


class InstanceNorm2d(_InstanceNormNd):
    """:class:`InstanceNorm` for ``(N, C, H, W)`` or unbatched ``(C, H, W)``, as
    ``torch.nn.InstanceNorm2d``.

    Examples
    --------
    >>> import numpy as np
    >>> from instnorm_numba import InstanceNorm2d
    >>> norm = InstanceNorm2d(3, affine=True, track_running_stats=True)
    >>> x = np.random.default_rng(0).standard_normal((4, 3, 16, 16)).astype(np.float32)
    >>> y = norm(x)                                  # training: input statistics, updates
    >>> norm.running_var.round(1)                   # 0.9 * 1 + 0.1 * (unbiased var ~ 1)
    array([1., 1., 1.], dtype=float32)
    >>> y_eval = norm.eval()(x)                      # eval: normalizes with the running stats
    >>> list(norm.state_dict())
    ['weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked']
    """

    _spatial_ndim = 2


class InstanceNorm3d(_InstanceNormNd):
    """:class:`InstanceNorm` for ``(N, C, D, H, W)`` or unbatched ``(C, D, H, W)``, as
    ``torch.nn.InstanceNorm3d``."""

    _spatial_ndim = 3
