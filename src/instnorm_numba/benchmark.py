"""The benchmark cases, the roofline and the peers: one table for ``instnorm-numba bench``, the
asv suite (``benchmarks/``) and their smoke tests.

* ``SHAPES``: the workloads, by id: a label, the logical shape ``(N, C, *spatial)`` and a small
  stand-in of the same rank that the smoke tests run.
* ``SUITE``: the cases ``instnorm-numba bench`` times, each a shape in one dtype and layout.
  The asv suite crosses every shape with every dtype and layout instead.
* ``roofline_copy``: a parallel Numba copy of the same bytes into a preallocated buffer,
  the speed limit of any normalization (it must read and write every element).
* The peers, each used the way its own users would use it at its fastest: PyTorch CPU
  ``F.instance_norm``; ONNX Runtime ``InstanceNormalization`` (wrapped in two ``Transpose``
  for channels-last data, ONNX being channels-first); OpenVINO's CPU ``MVN`` (opset 13) over
  the spatial axes times ``weight`` plus ``bias``, compiled with ``INFERENCE_NUM_THREADS`` and
  ``INFERENCE_PRECISION_HINT`` and run with ``share_inputs`` / ``share_outputs`` (it writes into
  a buffer it reuses); JAX on the CPU, a jitted mean / variance / ``rsqrt``.  Each ``*_forward``
  returns ``(callable, None)`` or ``(None, reason)`` when the peer is not installed or cannot
  run the case.

Examples
--------
>>> from instnorm_numba import benchmark
>>> [c.name for c in benchmark.SUITE][:3]
['style transfer', 'batch', 'audio']
>>> x, weight, bias = benchmark.make_input(benchmark.case("batch"))
>>> x.shape, x.dtype
((8, 32, 64, 64), dtype('float32'))
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import numpy as np

from ._jit import dispatch, num_threads
from ._kernels import copy_chunks

__all__ = [
    "SHAPES",
    "SUITE",
    "Case",
    "case",
    "make_input",
    "roofline_copy",
    "PEERS",
    "peer_forward",
    "torch_forward",
    "torch_backward",
    "ort_forward",
    "openvino_forward",
    "jax_forward",
]

#: id -> (label, logical shape (N, C, *spatial), small stand-in of the same rank)
SHAPES = {
    "style": ("style transfer", (1, 64, 256, 256), (1, 4, 16, 16)),
    "batch": ("batch", (8, 32, 64, 64), (2, 3, 8, 8)),
    "audio": ("audio", (16, 80, 3000), (2, 5, 30)),
    "3d": ("3-D", (2, 32, 64, 64, 64), (1, 2, 4, 4, 4)),
    "3d_large": ("3-D large", (1, 32, 128, 128, 128), (1, 2, 6, 6, 6)),
    "tiny": ("tiny instances", (256, 256, 4, 4), (8, 6, 2, 2)),
    "huge": ("few huge", (1, 3, 2048, 2048), (1, 2, 64, 64)),
}
DTYPES = ("float32", "float16", "float64")
LAYOUTS = ("channels_first", "channels_last")


@dataclass(frozen=True)
class Case:
    """One workload in one dtype and layout; ``shape`` is the array's (layout applied)."""

    id: str
    dtype: str = "float32"
    layout: str = "channels_first"
    backward: bool = False  # the bench times the backward pass too
    small: bool = False  # the stand-in shape (smoke tests)

    @property
    def logical_shape(self) -> tuple:
        return SHAPES[self.id][2 if self.small else 1]

    @property
    def shape(self) -> tuple:
        s = self.logical_shape
        return (s[0], *s[2:], s[1]) if self.layout == "channels_last" else s

    @property
    def channel_axis(self) -> int:
        return -1 if self.layout == "channels_last" else 1

    @property
    def C(self) -> int:
        return self.logical_shape[1]

    @property
    def name(self) -> str:
        label = SHAPES[self.id][0]
        if self.layout == "channels_last":
            label = "channels-last" + ("" if self.id == "style" else f" {label}")
        return label if self.dtype == "float32" else f"{SHAPES[self.id][0].split()[0]} {self.dtype}"


#: what ``instnorm-numba bench`` times, in this order
SUITE = (
    Case("style", backward=True),
    Case("batch", backward=True),
    Case("audio", backward=True),
    Case("3d"),
    Case("3d_large"),
    Case("tiny"),
    Case("huge"),
    Case("style", layout="channels_last", backward=True),
    Case("3d", layout="channels_last"),
    Case("style", "float64"),
    Case("style", "float16"),
)


def case(id: str, dtype: str = "float32", layout: str = "channels_first", **kw) -> Case:
    """The case of shape ``id`` in ``dtype`` and ``layout``."""
    if id not in SHAPES:
        raise ValueError(f"id must be one of {sorted(SHAPES)}; got {id!r}")
    return Case(id, dtype, layout, **kw)


def make_input(c: Case, seed: int = 0):
    """``(x, weight, bias)``: per-channel offsets and scales around unit normal noise, in the
    case's dtype and layout (deterministic)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(c.shape, dtype=np.float32)
    bshape = [1] * len(c.shape)
    bshape[c.channel_axis] = c.C
    scale = rng.uniform(0.5, 4.0, c.C).astype(np.float32).reshape(bshape)
    offset = rng.uniform(-3.0, 3.0, c.C).astype(np.float32).reshape(bshape)
    x = (x * scale + offset).astype(c.dtype)
    weight = rng.uniform(0.5, 1.5, c.C)
    bias = rng.uniform(-0.5, 0.5, c.C)
    return x, weight, bias


# --------------------------------------------------------------------------------------------
# the roofline


def _words(a: np.ndarray) -> np.ndarray:
    """A flat view of C-contiguous ``a`` in the widest words its size allows."""
    flat = a.reshape(-1)
    for word in (np.uint64, np.uint32, np.uint16):
        if flat.nbytes % np.dtype(word).itemsize == 0:
            return flat.view(word)
    return flat


def roofline_copy(src: np.ndarray, dst: np.ndarray) -> None:
    """Parallel copy of ``src`` into ``dst`` (same shape and dtype, C-contiguous), in the
    widest words: the fastest copy is the honest speed limit."""
    a, b = _words(src), _words(dst)
    nchunks = max(1, min(4 * num_threads(), a.size // 4096))
    dispatch(copy_chunks, nchunks > 1, a, b, nchunks)


# --------------------------------------------------------------------------------------------
# peers


def _spatial_axes(x: np.ndarray, channel_axis: int) -> list:
    ax = channel_axis % x.ndim
    return [i for i in range(1, x.ndim) if i != ax]


def _affine_shape(x: np.ndarray, channel_axis: int) -> list:
    shape = [1] * x.ndim
    shape[channel_axis % x.ndim] = x.shape[channel_axis]
    return shape


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:80]


def _torch(threads: int):
    """(torch, F) set to ``threads`` threads, or None when PyTorch is not installed."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None
    torch.set_num_threads(threads)
    return torch, F


def torch_forward(x, weight, bias, channel_axis: int, threads: int):
    """PyTorch CPU ``F.instance_norm`` (channels-last data: a ``channels_last`` tensor)."""
    if (mods := _torch(threads)) is None:
        return None, "not installed"
    torch, F = mods
    t = torch.from_numpy(x)
    if channel_axis == -1:  # NHWC memory, NCHW logical shape: torch's channels_last
        t = t.movedim(-1, 1)
    w = torch.from_numpy(weight.astype(x.dtype))
    b = torch.from_numpy(bias.astype(x.dtype))

    def run():
        with torch.no_grad():
            return F.instance_norm(t, weight=w, bias=b, eps=1e-5)

    try:
        run()
    except (RuntimeError, TypeError) as exc:
        return None, f"unsupported: {_first_line(exc)}"
    return run, None


def torch_backward(x, weight, dy, channel_axis: int, threads: int):
    """PyTorch autograd's backward of ``F.instance_norm`` alone (the graph is built once)."""
    if (mods := _torch(threads)) is None:
        return None, "not installed"
    torch, F = mods
    t = torch.from_numpy(x.copy())
    g = torch.from_numpy(dy)
    if channel_axis == -1:
        t, g = t.movedim(-1, 1), g.movedim(-1, 1)
    t.requires_grad_(True)
    w = torch.from_numpy(weight.astype(x.dtype)).requires_grad_(True)
    b = torch.zeros_like(w).requires_grad_(True)
    try:
        y = F.instance_norm(t, weight=w, bias=b, eps=1e-5)

        def run():
            return torch.autograd.grad(y, (t, w, b), g, retain_graph=True)

        run()
    except (RuntimeError, TypeError) as exc:
        return None, f"unsupported: {_first_line(exc)}"
    return run, None


def ort_forward(x, weight, bias, channel_axis: int, threads: int):
    """ONNX Runtime's CPU ``InstanceNormalization``; channels-last data goes through the graph
    a user would build, ``Transpose -> InstanceNormalization -> Transpose``."""
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return None, "not installed"
    elem = {
        np.float32: TensorProto.FLOAT,
        np.float64: TensorProto.DOUBLE,
        np.float16: TensorProto.FLOAT16,
    }[x.dtype.type]
    nd = x.ndim
    inits = [
        numpy_helper.from_array(weight.astype(x.dtype), "scale"),
        numpy_helper.from_array(bias.astype(x.dtype), "B"),
    ]
    nodes, src, dst = [], "x", "y"
    if channel_axis == -1:
        nodes.append(
            helper.make_node("Transpose", ["x"], ["xt"], perm=[0, nd - 1, *range(1, nd - 1)])
        )
        src, dst = "xt", "yt"
    nodes.append(
        helper.make_node("InstanceNormalization", [src, "scale", "B"], [dst], epsilon=1e-5)
    )
    if channel_axis == -1:
        nodes.append(helper.make_node("Transpose", ["yt"], ["y"], perm=[0, *range(2, nd), 1]))
    graph = helper.make_graph(
        nodes,
        "instnorm",
        [helper.make_tensor_value_info("x", elem, list(x.shape))],
        [helper.make_tensor_value_info("y", elem, list(x.shape))],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 9)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    feed = {"x": x}
    try:
        sess = ort.InferenceSession(
            model.SerializeToString(), so, providers=["CPUExecutionProvider"]
        )
        sess.run(None, feed)
    except Exception as exc:  # onnxruntime raises its own exception types
        msg = _first_line(exc)
        return None, "unsupported: " + (msg[msg.find("Could not find") :] or msg)[:60]

    def run():
        return sess.run(None, feed)

    return run, None


def _decline_openvino_telemetry() -> None:
    """``import openvino`` sends a usage event unless the user opted out, from a process it
    forks in a thread (Numba's tbb layer then warns that the child may be broken).  A
    benchmark run declines, for this process only, as OpenVINO itself does in CI."""
    if "openvino" in sys.modules:
        return
    try:
        from openvino_telemetry.utils.opt_in_checker import OptInChecker
    except ImportError:
        return
    OptInChecker._run_in_ci = staticmethod(lambda: True)


def openvino_forward(x, weight, bias, channel_axis: int, threads: int):
    """OpenVINO's CPU ``MVN`` over the spatial axes (any layout: no transpose), then
    ``* weight + bias``, run in place of its own reused output buffer."""
    _decline_openvino_telemetry()
    try:
        import openvino as ov
        from openvino import opset13 as ops
    except ImportError:
        return None, "not installed"
    types = {np.float32: ov.Type.f32, np.float16: ov.Type.f16, np.float64: ov.Type.f64}
    try:
        p = ops.parameter(list(x.shape), types[x.dtype.type], name="x")
        axes = ops.constant(np.array(_spatial_axes(x, channel_axis), np.int64))
        m = ops.mvn(p, axes, True, 1e-5, "inside_sqrt")
        shape = _affine_shape(x, channel_axis)
        w = ops.constant(weight.astype(x.dtype).reshape(shape))
        b = ops.constant(bias.astype(x.dtype).reshape(shape))
        model = ov.Model([ops.add(ops.multiply(m, w), b)], [p])
        config = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"}
        compiled = ov.Core().compile_model(model, "CPU", config)
        request = compiled.create_infer_request()
        request.infer({0: x}, share_inputs=True, share_outputs=True)
    except Exception as exc:  # OpenVINO raises RuntimeError and its own types
        return None, f"unsupported: {_first_line(exc)}"

    def run():
        return request.infer({0: x}, share_inputs=True, share_outputs=True)

    return run, None


def jax_forward(x, weight, bias, channel_axis: int, threads: int):
    """JAX/XLA on the CPU: ``jax.jit`` of mean, variance and ``rsqrt`` over the spatial axes,
    the input already on the device.  (XLA's CPU thread pool takes every core; ``threads``
    is recorded, not enforced.)"""
    try:
        import jax
        import jax.numpy as jnp
    except ImportError:
        return None, "not installed"
    if x.dtype == np.float64:
        jax.config.update("jax_enable_x64", True)
    axes = tuple(_spatial_axes(x, channel_axis))
    shape = _affine_shape(x, channel_axis)

    @jax.jit
    def f(t, w, b):
        mean = jnp.mean(t, axis=axes, keepdims=True)
        var = jnp.mean(jnp.square(t - mean), axis=axes, keepdims=True)
        return (t - mean) * jax.lax.rsqrt(var + 1e-5) * w + b

    try:
        cpu = jax.devices("cpu")[0]
        t = jax.device_put(x, cpu)
        w = jax.device_put(weight.astype(x.dtype).reshape(shape), cpu)
        b = jax.device_put(bias.astype(x.dtype).reshape(shape), cpu)
        f(t, w, b).block_until_ready()
    except Exception as exc:  # XLA's own error types
        return None, f"unsupported: {_first_line(exc)}"

    def run():
        return f(t, w, b).block_until_ready()

    return run, None


#: peer name -> its forward builder, in the order the bench reports them
PEERS = {
    "torch": torch_forward,
    "onnxruntime": ort_forward,
    "openvino": openvino_forward,
    "jax": jax_forward,
}


def peer_forward(name: str, x, weight, bias, channel_axis: int, threads: int):
    """``PEERS[name](...)``: ``(callable, None)``, or ``(None, reason)``."""
    return PEERS[name](x, weight, bias, channel_axis, threads)


def peer_versions() -> dict:
    """Versions of the importable peers (for the report)."""
    out = {}
    _decline_openvino_telemetry()
    for mod in ("torch", "onnxruntime", "openvino", "jax"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            continue
        except Exception as exc:  # a broken install must not stop the bench
            out[mod] = f"broken ({_first_line(exc)})"
    if "jax" in out:
        out["jax"] += f" ({os.environ.get('XLA_FLAGS', 'default XLA flags')})"
    return out
