"""instance_norm next to its speed limit, its reference and its peers, over case x dtype x layout.

Every class has the same parameters, so one ``asv run`` gives every ratio of the performance
issue: ``Forward.time_ours`` over ``Forward.time_copy`` (the roofline), ``Torch.time_torch``
and ``OnnxRuntime.time_onnxruntime`` over ``Forward.time_ours``.
"""

from __future__ import annotations

import numpy as np

from . import common
from .common import PARAM_NAMES, PARAMS, channel_axis, data, warm


class Forward:
    """Ours with ``out=`` (no allocation) and without, and the parallel copy of the same bytes."""

    params = PARAMS
    param_names = PARAM_NAMES
    timeout = 300

    def setup(self, case, dtype, layout):
        from instnorm_numba import instance_norm

        self.fn = instance_norm
        self.x, self.w, self.b, self.out, _ = data(case, dtype, layout)
        self.axis = channel_axis(layout)
        warm(case, dtype, layout)
        self.src, self.dst = common.copy_words(self.x, self.out)

    def time_ours(self, case, dtype, layout):
        self.fn(self.x, self.w, self.b, channel_axis=self.axis, out=self.out)

    def time_ours_alloc(self, case, dtype, layout):
        self.fn(self.x, self.w, self.b, channel_axis=self.axis)

    def time_copy(self, case, dtype, layout):
        common.roofline_copy(self.src, self.dst)

    def peakmem_ours(self, case, dtype, layout):
        self.fn(self.x, self.w, self.b, channel_axis=self.axis, out=self.out)

    def peakmem_ours_alloc(self, case, dtype, layout):
        self.fn(self.x, self.w, self.b, channel_axis=self.axis)


class Reference:
    """The extended-precision NumPy oracle (slow; only cases up to 4M elements)."""

    params = PARAMS
    param_names = PARAM_NAMES
    timeout = 300
    number = 1
    repeat = (1, 3, 30.0)

    def setup(self, case, dtype, layout):
        from instnorm_numba import reference

        self.fn = reference.instance_norm
        self.x, self.w, self.b, _, _ = data(case, dtype, layout)
        if self.x.size > common.REFERENCE_MAX_ELEMENTS:
            raise NotImplementedError("the reference is timed on cases up to 4M elements")
        self.axis = channel_axis(layout)

    def time_reference(self, case, dtype, layout):
        self.fn(self.x, self.w, self.b, channel_axis=self.axis)


class Torch:
    """PyTorch CPU ``F.instance_norm`` with the same thread count (skipped without torch)."""

    params = PARAMS
    param_names = PARAM_NAMES
    timeout = 300

    def setup(self, case, dtype, layout):
        torch, F = common.torch_or_skip()
        self.torch, self.F = torch, F
        self.t, self.w, self.b, _ = common.torch_tensors(case, dtype, layout)
        try:
            self.time_torch(case, dtype, layout)
        except RuntimeError as exc:  # e.g. a dtype without a CPU kernel
            raise NotImplementedError(str(exc)) from None

    def time_torch(self, case, dtype, layout):
        with self.torch.no_grad():
            self.F.instance_norm(self.t, weight=self.w, bias=self.b, eps=1e-5)


class OnnxRuntime:
    """ONNX Runtime CPU ``InstanceNormalization``, same thread count (skipped without it)."""

    params = PARAMS
    param_names = PARAM_NAMES
    timeout = 300

    def setup(self, case, dtype, layout):
        self.sess = common.ort_session(case, dtype, layout)
        self.feed = {"x": data(case, dtype, layout)[0]}

    def time_onnxruntime(self, case, dtype, layout):
        self.sess.run(None, self.feed)


class Backward:
    """``instance_norm_backward`` (dx into a preallocated buffer, dw, db)."""

    params = PARAMS
    param_names = PARAM_NAMES
    timeout = 300

    def setup(self, case, dtype, layout):
        import instnorm_numba

        if not hasattr(instnorm_numba, "instance_norm_backward"):
            raise NotImplementedError("this version has no instance_norm_backward")
        self.fn = instnorm_numba.instance_norm_backward
        self.x, self.w, self.b, self.out, self.dy = data(case, dtype, layout)
        self.axis = channel_axis(layout)
        _, self.mean, self.rstd = instnorm_numba.instance_norm(
            self.x, self.w, self.b, channel_axis=self.axis, return_stats=True
        )
        self.dx = np.empty_like(self.x)
        self.time_ours_backward(case, dtype, layout)

    def time_ours_backward(self, case, dtype, layout):
        self.fn(self.dy, self.x, self.mean, self.rstd, self.w, channel_axis=self.axis, out=self.dx)


class TorchBackward:
    """PyTorch autograd through ``F.instance_norm``: the backward alone (skipped without torch)."""

    params = PARAMS
    param_names = PARAM_NAMES
    timeout = 300

    def setup(self, case, dtype, layout):
        torch, F = common.torch_or_skip()
        t, w, b, self.g = common.torch_tensors(case, dtype, layout)
        self.t = t.detach().clone().requires_grad_(True)
        self.w = w.clone().requires_grad_(True)
        self.b = b.clone().requires_grad_(True)
        self.torch = torch
        try:
            self.y = F.instance_norm(self.t, weight=self.w, bias=self.b, eps=1e-5)
            self.time_torch_backward(case, dtype, layout)
        except RuntimeError as exc:
            raise NotImplementedError(str(exc)) from None

    def time_torch_backward(self, case, dtype, layout):
        self.torch.autograd.grad(self.y, (self.t, self.w, self.b), self.g, retain_graph=True)
