"""PyTorch bridge: instance normalization in PyTorch models through this library's kernels.

Optional: this module imports PyTorch, the rest of the package never does (``import
instnorm_numba`` works without it), and PyTorch is no dependency of the package.

- ``torch.ops.instnorm_numba.instance_norm`` and ``torch.ops.instnorm_numba.instance_norm_backward``
  are operators registered with ``torch.library.custom_op``: a CPU kernel (this library's,
  through NumPy views of the tensors: no copy), a shape-only "fake" implementation so that
  ``torch.compile(fullgraph=True)`` traces through them, and autograd
  (``register_autograd``) through :func:`instnorm_numba.instance_norm_backward`.
- :func:`instance_norm` has the signature and semantics of
  ``torch.nn.functional.instance_norm``: it calls the operator when the kernels can take the
  tensors and PyTorch's own function otherwise (see :func:`uses_kernels`), so every call has a
  defined result.
- :class:`InstanceNorm1d`, :class:`InstanceNorm2d`, :class:`InstanceNorm3d` are
  ``torch.nn.InstanceNorm*d`` whose forward calls :func:`instance_norm`: same constructor,
  parameters, buffers, ``state_dict`` keys, ``repr`` and train/eval logic.
  :func:`convert` swaps them into a model, :func:`revert` swaps them back.

The forward operator's schema::

    instnorm_numba::instance_norm(Tensor x, Tensor? weight, Tensor? bias,
        Tensor? running_mean, Tensor? running_var, bool use_input_stats, float momentum,
        float eps) -> (Tensor y, Tensor mean, Tensor rstd, Tensor new_running_mean,
        Tensor new_running_var)

It is functional (``mutates_args=()``): PyTorch registers autograd formulas only on
operators that mutate nothing. When ``use_input_stats`` and the running statistics are given,
it returns their updated values (the library's update, applied to copies), and
:func:`instance_norm` copies them into ``running_mean`` / ``running_var`` in place (under
``torch.no_grad()``), which is what ``F.instance_norm`` does to them; ``torch.compile``
sees an ordinary buffer mutation. Otherwise the last two outputs are empty. ``mean`` and
``rstd`` are the float64 ``(N, C)`` statistics the backward uses. None of these four is
differentiable: gradients flow through ``y``, which has ``x``'s dtype and memory format.
"""

import ctypes
import sys

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._api import instance_norm as _np_instance_norm
from ._api import instance_norm_backward as _np_instance_norm_backward

__all__ = [
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "convert",
    "instance_norm",
    "revert",
    "uses_kernels",
]

#: dtypes the kernels take (float16 travels to them as its bit pattern, as in the NumPy API)
KERNEL_DTYPES = (torch.float16, torch.float32, torch.float64)


#: outputs this large get transparent huge pages (Linux): a fresh 113 MB float32 tensor took
#: 130 ms to allocate and fill with 4 KiB page faults, 24 ms with huge pages (NumPy asks the
#: same for its large arrays; PyTorch's CPU allocator does not)
HUGEPAGE_MIN_BYTES = 4 << 20
_HUGE = 2 << 20
_MADV_HUGEPAGE = 14


def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):  # pragma: no cover - a libc without madvise
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_madvise_fn = _madvise()


def _empty_like(x: Tensor) -> Tensor:
    """``torch.empty_like(x)`` (x's memory format), on huge pages when it is large: advised
    before its first touch, a hint the kernel may ignore (the result is the same either way)."""
    y = torch.empty_like(x)
    nbytes = y.numel() * y.element_size()
    if _madvise_fn is not None and nbytes >= HUGEPAGE_MIN_BYTES:
        start = -(-y.data_ptr() // _HUGE) * _HUGE
        end = (y.data_ptr() + nbytes) // _HUGE * _HUGE
        if end > start:
            _madvise_fn(start, end - start, _MADV_HUGEPAGE)  # failure (EINVAL...) is harmless
    return y


def _view(t: Tensor | None):
    """A NumPy array sharing ``t``'s memory (strides included), or None."""
    return None if t is None else t.detach().numpy()


# --------------------------------------------------------------------------------------------
# the operators


def _forward_kernel(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    use_input_stats: bool,
    momentum: float,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    # y in x's memory format (channels-first, channels_last, or contiguous for other strides):
    # the kernels read x's memory in place and write y's, channels-last through the
    # (N, *spatial, C) view of both, which NumPy sees as C-contiguous
    y = _empty_like(x)
    update = use_input_stats and running_mean is not None
    if update:  # the library updates copies: this operator is functional (see the docstring)
        new_mean, new_var = running_mean.clone(), running_var.clone()
        running = {"running_mean": _view(new_mean), "running_var": _view(new_var)}
    else:
        new_mean, new_var = x.new_empty((0,)), x.new_empty((0,))
        running = {}
        if running_mean is not None:
            running = {"running_mean": _view(running_mean), "running_var": _view(running_var)}
    _, mean, rstd = _np_instance_norm(
        _view(x),
        _view(weight),
        _view(bias),
        eps=eps,
        channel_axis=1,
        use_input_stats=use_input_stats,
        momentum=momentum,
        out=_view(y),
        return_stats=True,
        **running,
    )
    return y, torch.from_numpy(mean), torch.from_numpy(rstd), new_mean, new_var


_forward_op = torch.library.custom_op(
    "instnorm_numba::instance_norm", mutates_args=(), device_types="cpu"
)(_forward_kernel)


@_forward_op.register_fake
def _forward_fake(x, weight, bias, running_mean, running_var, use_input_stats, momentum, eps):
    stats = (x.shape[0], x.shape[1])
    if use_input_stats and running_mean is not None:
        new_mean, new_var = torch.empty_like(running_mean), torch.empty_like(running_var)
    else:
        new_mean, new_var = x.new_empty((0,)), x.new_empty((0,))
    return (
        torch.empty_like(x),
        x.new_empty(stats, dtype=torch.float64),
        x.new_empty(stats, dtype=torch.float64),
        new_mean,
        new_var,
    )


@torch.library.custom_op(
    "instnorm_numba::instance_norm_backward", mutates_args=(), device_types="cpu"
)
def _backward_op(
    grad_output: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    dx = _empty_like(x)
    _, dw, db = _np_instance_norm_backward(
        _view(grad_output), _view(x), _view(mean), _view(rstd), _view(weight), out=_view(dx)
    )
    return dx, torch.from_numpy(dw), torch.from_numpy(db)


@_backward_op.register_fake
def _backward_fake(grad_output, x, mean, rstd, weight):
    C = x.shape[1]
    return (
        torch.empty_like(x),
        x.new_empty((C,), dtype=torch.float64),
        x.new_empty((C,), dtype=torch.float64),
    )


def _setup_context(ctx, inputs, output):
    x, weight, bias, _rm, _rv, use_input_stats, _momentum, eps = inputs
    _, mean, rstd, new_mean, new_var = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.use_input_stats = use_input_stats
    ctx.eps = eps
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.mark_non_differentiable(mean, rstd, new_mean, new_var)


def _per_channel(v: Tensor, ndim: int) -> Tensor:
    """``(C,)`` or ``(N, C)`` shaped to broadcast against ``(N, C, *spatial)``."""
    lead = (1, -1) if v.ndim == 1 else tuple(v.shape)
    return v.reshape(lead + (1,) * (ndim - 2))


def _backward_in_torch_ops(gy, x, weight, eps):
    """The training-mode gradients in differentiable PyTorch ops, for ``create_graph=True``
    (double backward): the statistics are recomputed from ``x`` so that the graph reaches it."""
    dims = tuple(range(2, x.ndim))
    xf = x.double()
    g = gy.double()
    mean = xf.mean(dim=dims, keepdim=True)
    rstd = torch.rsqrt(xf.var(dim=dims, unbiased=False, keepdim=True) + eps)
    xhat = (xf - mean) * rstd
    w = 1.0 if weight is None else _per_channel(weight.double(), x.ndim)
    mdy = g.mean(dim=dims, keepdim=True)
    mdyx = (g * xhat).mean(dim=dims, keepdim=True)
    dx = (rstd * w * (g - mdy - xhat * mdyx)).to(x.dtype)
    dw = (g * xhat).sum(dim=(0,) + dims)
    db = g.sum(dim=(0,) + dims)
    return dx, dw, db


def _backward(ctx, grad_y, *_grad_statistics):
    x, weight, mean, rstd = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if ctx.use_input_stats:
        if torch.is_grad_enabled():  # create_graph=True: a graph of PyTorch's own ops
            dx, dw, db = _backward_in_torch_ops(grad_y, x, weight, ctx.eps)
        else:
            dx, dw, db = torch.ops.instnorm_numba.instance_norm_backward(
                grad_y, x, mean, rstd, weight
            )
    else:  # running statistics: y = (x - m[c]) * r[c] * w[c] + b[c], m and r constants
        r = rstd if weight is None else rstd * weight.double()
        dx = (grad_y.double() * _per_channel(r, x.ndim)).to(x.dtype)
        dims = (0,) + tuple(range(2, x.ndim))
        xhat = (x.double() - _per_channel(mean, x.ndim)) * _per_channel(rstd, x.ndim)
        dw = (grad_y.double() * xhat).sum(dim=dims)
        db = grad_y.double().sum(dim=dims)
    grad_weight = dw.to(weight.dtype) if weight is not None and needs[1] else None
    grad_bias = db.to(ctx.bias_dtype) if ctx.bias_dtype is not None and needs[2] else None
    return (dx if needs[0] else None), grad_weight, grad_bias, None, None, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# the functional form


def _cpu_float(t: Tensor | None) -> bool:
    return t is None or (t.device.type == "cpu" and t.dtype in KERNEL_DTYPES and t.ndim == 1)


def uses_kernels(
    input: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    use_input_stats: bool = True,
) -> bool:
    """Whether :func:`instance_norm` with these arguments runs this library's kernels.

    True for a CPU ``input`` of float16, float32 or float64 with ``ndim >= 3`` and at least one
    element, and CPU float16/32/64 ``weight``, ``bias`` and running statistics of one
    dimension. The kernels read contiguous, ``channels_last`` and ``channels_last_3d``
    (generally: channels-innermost) tensors in place; any other strides cost one copy.

    False (PyTorch's own ``F.instance_norm`` runs) for any other device, any other dtype
    (bfloat16 included), an empty input, and the argument combinations that PyTorch refuses
    (``use_input_stats=False`` without both running statistics, one running statistic alone,
    one spatial element with ``use_input_stats``), so that PyTorch raises its own error. A
    backward with ``create_graph=True`` (double backward) builds its graph from PyTorch ops.
    """
    if not isinstance(input, Tensor) or input.device.type != "cpu":
        return False
    if input.dtype not in KERNEL_DTYPES or input.ndim < 3 or input.numel() == 0:
        return False
    if not all(_cpu_float(t) for t in (weight, bias, running_mean, running_var)):
        return False
    if (running_mean is None) != (running_var is None):
        return False
    if use_input_stats:
        return input[0, 0].numel() > 1
    return running_mean is not None


def instance_norm(
    input: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """``torch.nn.functional.instance_norm`` (same signature and semantics) on this library's
    kernels when :func:`uses_kernels` says they can take the tensors, PyTorch's otherwise.

    With ``running_mean`` and ``running_var`` and ``use_input_stats=True`` both are updated in
    place (``r = (1 - momentum) * r + momentum * s``, ``s`` the batch average of the
    per-instance mean or unbiased variance); ``use_input_stats=False`` normalizes with them.
    The result has ``input``'s dtype and memory format. Differentiable (``weight``, ``bias``,
    ``input``), and traceable by ``torch.compile(fullgraph=True)``.

    Examples
    --------
    >>> import torch
    >>> from instnorm_numba.torch import instance_norm
    >>> x = torch.tensor([[[1.0, 2.0, 3.0, 4.0]], [[10.0, 10.0, 20.0, 20.0]]])
    >>> instance_norm(x, eps=0.0)
    tensor([[[-1.3416, -0.4472,  0.4472,  1.3416]],
    <BLANKLINE>
            [[-1.0000, -1.0000,  1.0000,  1.0000]]])
    """
    if not uses_kernels(input, running_mean, running_var, weight, bias, use_input_stats):
        return F.instance_norm(
            input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps
        )
    args = (input, weight, bias, running_mean, running_var)
    args += (bool(use_input_stats), float(momentum), float(eps))
    if torch.compiler.is_compiling() or (
        torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args[:3])
    ):
        y, _, _, new_mean, new_var = torch.ops.instnorm_numba.instance_norm(*args)
    else:  # eager, no graph to record: the operator's kernel without the dispatcher (~50 us)
        y, _, _, new_mean, new_var = _forward_kernel(*args)
    if use_input_stats and running_mean is not None:
        with torch.no_grad():  # in place, as F.instance_norm updates them
            running_mean.copy_(new_mean)
            running_var.copy_(new_var)
    return y


# --------------------------------------------------------------------------------------------
# modules


if not hasattr(nn.modules.instancenorm._InstanceNorm, "_apply_instance_norm"):  # pragma: no cover
    raise ImportError(
        f"instnorm_numba.torch needs torch.nn.InstanceNorm*d._apply_instance_norm (PyTorch "
        f"2.x); this PyTorch ({torch.__version__}) has none"
    )


class _KernelForward:
    """Mixin: ``torch.nn.InstanceNorm*d``'s forward with :func:`instance_norm` in place of
    ``F.instance_norm``. Everything else (checks, unbatched input, state) is the torch class's."""

    def _apply_instance_norm(self, input):
        return instance_norm(
            input,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self.training or not self.track_running_stats,
            self.momentum if self.momentum is not None else 0.0,
            self.eps,
        )


class InstanceNorm1d(_KernelForward, nn.InstanceNorm1d):
    """``torch.nn.InstanceNorm1d`` running this library's kernels (same arguments and state)."""


class InstanceNorm2d(_KernelForward, nn.InstanceNorm2d):
    """``torch.nn.InstanceNorm2d`` running this library's kernels (same arguments and state)."""


class InstanceNorm3d(_KernelForward, nn.InstanceNorm3d):
    """``torch.nn.InstanceNorm3d`` running this library's kernels (same arguments and state)."""


_TO_OURS = {
    nn.InstanceNorm1d: InstanceNorm1d,
    nn.InstanceNorm2d: InstanceNorm2d,
    nn.InstanceNorm3d: InstanceNorm3d,
}
_TO_TORCH = {v: k for k, v in _TO_OURS.items()}


def _swap(module: nn.Module, table: dict) -> nn.Module:
    """``module`` re-classed per ``table`` (exact types only), sharing every tensor."""
    new_class = table.get(type(module))
    if new_class is not None:
        new = new_class.__new__(new_class)
        state = dict(module.__dict__)
        for k in ("_parameters", "_buffers", "_modules"):  # the same tensors, new dicts
            state[k] = type(state[k])(state[k])
        new.__dict__.update(state)
        module = new
    for name, child in module.named_children():
        swapped = _swap(child, table)
        if swapped is not child:
            setattr(module, name, swapped)
    return module


def convert(module: nn.Module) -> nn.Module:
    """Every ``torch.nn.InstanceNorm1d/2d/3d`` in ``module``'s tree replaced by this
    library's :class:`InstanceNorm1d/2d/3d`.

    The replacements hold the very same parameter and buffer tensors (an optimizer built
    before still updates them), the configuration, train/eval mode and hooks, so
    ``state_dict`` keys and values are unchanged and checkpoints load both ways. Children are
    replaced in place; the result is ``module`` itself, or its replacement when ``module`` is
    an instance norm. Subclasses of the torch classes (which may change the forward) and the
    lazy variants are left alone.

    Examples
    --------
    >>> import torch
    >>> from instnorm_numba.torch import convert, revert
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.InstanceNorm2d(8))
    >>> net = convert(net)
    >>> type(net[1])
    <class 'instnorm_numba.torch.InstanceNorm2d'>
    >>> type(revert(net)[1])
    <class 'torch.nn.modules.instancenorm.InstanceNorm2d'>
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module; got {type(module).__name__}")
    return _swap(module, _TO_OURS)


def revert(module: nn.Module) -> nn.Module:
    """The inverse of :func:`convert`: this library's instance norms back to ``torch.nn``'s."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module; got {type(module).__name__}")
    return _swap(module, _TO_TORCH)
