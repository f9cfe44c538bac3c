"""instance_norm next to its speed limit, its reference and its peers, over case x dtype x layout.

Every class has the same parameters (from ``instnorm_numba.benchmark``, the table
``instnorm-numba bench`` reads), so one ``asv run`` gives every ratio of the speed issue:
``Forward.time_ours`` and ``Forward.time_ours_alloc`` over ``Forward.time_copy`` (the roofline)
and each peer's ``time_*`` over them.
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

    def time_ours(self, case, dtype, layout):
        self.fn(self.x, self.w, self.b, channel_axis=self.axis, out=self.out)

    def time_ours_alloc(self, case, dtype, layout):
        self.fn(self.x, self.w, self.b, channel_axis=self.axis)

    def time_copy(self, case, dtype, layout):
        common.table.roofline_copy(self.x, self.out)

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


class _Peer:
    """A peer's forward on the same data and thread count (skipped when it is not installed
    or cannot run the case)."""

    params = PARAMS
    param_names = PARAM_NAMES
    timeout = 300
    peer = ""

    def setup(self, case, dtype, layout):
        self.run = common.peer(self.peer, case, dtype, layout)


class Torch(_Peer):
    """PyTorch CPU ``F.instance_norm``."""

    peer = "torch"

    def time_torch(self, case, dtype, layout):
        self.run()


class OnnxRuntime(_Peer):
    """ONNX Runtime CPU ``InstanceNormalization``."""

    peer = "onnxruntime"

    def time_onnxruntime(self, case, dtype, layout):
        self.run()


class OpenVINO(_Peer):
    """OpenVINO CPU ``MVN`` over the spatial axes, then the affine step."""

    peer = "openvino"

    def time_openvino(self, case, dtype, layout):
        self.run()


class JAX(_Peer):
    """JAX/XLA on the CPU, a jitted mean / variance / rsqrt."""

    peer = "jax"

    def time_jax(self, case, dtype, layout):
        self.run()


class Backward:
    """``instance_norm_backward`` (dx into a preallocated buffer, dw, db)."""

    params = PARAMS
    param_names = PARAM_NAMES
    timeout = 300

    def setup(self, case, dtype, layout):
        import instnorm_numba

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
        self.run = common.torch_backward(case, dtype, layout)

    def time_torch_backward(self, case, dtype, layout):
        self.run()
