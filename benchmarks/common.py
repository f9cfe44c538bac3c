"""Shared data, warm-up and peers for the asv benchmarks.

asv calls ``setup`` before every timed run, so everything expensive (random data, the first
call that loads or compiles a kernel, building a peer's session) sits in cached module-level
helpers and ``setup`` only looks it up.  Only the public API of instnorm_numba is used, so the
suite also runs against older commits (``asv continuous``).
"""

from __future__ import annotations

import functools

import numba
import numpy as np

#: case -> (N, C, *spatial): the suite of ``instnorm-numba bench``
SHAPES = {
    "style": (1, 64, 256, 256),
    "batch": (8, 32, 64, 64),
    "audio": (16, 80, 3000),
    "3d": (2, 32, 64, 64, 64),
    "tiny": (256, 256, 4, 4),
    "huge": (1, 3, 2048, 2048),
}
DTYPES = ["float32", "float16", "float64"]
LAYOUTS = ["channels_first", "channels_last"]
PARAMS = [list(SHAPES), DTYPES, LAYOUTS]
PARAM_NAMES = ["case", "dtype", "layout"]

#: the extended-precision reference is timed only up to this many elements
REFERENCE_MAX_ELEMENTS = 1 << 22


@functools.cache
def threads() -> int:
    """Numba's thread count, after one call of ours has let the library pick its threading
    layer (launching the pool first, for a peer, would fix Numba's default layer instead)."""
    from instnorm_numba import instance_norm

    instance_norm(np.zeros((1, 1, 2), np.float32))
    return numba.get_num_threads()


def channel_axis(layout: str) -> int:
    return -1 if layout == "channels_last" else 1


@functools.lru_cache(maxsize=2)
def data(case: str, dtype: str, layout: str):
    """(x, weight, bias, out, dy): deterministic inputs in the layout, and a result buffer."""
    shape = SHAPES[case]
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape, dtype=np.float32) * 2.0 + 0.5
    if layout == "channels_last":
        x = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    x = x.astype(dtype)
    C = shape[1]
    weight = rng.uniform(0.5, 1.5, C)
    bias = rng.uniform(-0.5, 0.5, C)
    dy = rng.standard_normal(x.shape, dtype=np.float32).astype(dtype)
    return x, weight, bias, np.empty_like(x), dy


@functools.cache
def warm(case: str, dtype: str, layout: str):
    """Call ours and the copy once, so that kernels are loaded (or compiled) before anything is
    timed."""
    from instnorm_numba import instance_norm

    x, w, b, out, _ = data(case, dtype, layout)
    instance_norm(x, w, b, channel_axis=channel_axis(layout), out=out)
    roofline_copy(*copy_words(x, out))  # compiles the copy for this word size
    return True


# --------------------------------------------------------------------------------------------
# the roofline: a parallel copy of the same bytes into a preallocated buffer


@numba.njit(parallel=True, cache=False)
def _copy(src, dst, nchunks):
    n = src.shape[0]
    chunk = (n + nchunks - 1) // nchunks
    for t in numba.prange(nchunks):
        s = min(t * chunk, n)
        e = min(s + chunk, n)
        a = src[s:e]
        b = dst[s:e]
        for i in range(a.shape[0]):
            b[i] = a[i]


def copy_words(x: np.ndarray, out: np.ndarray):
    """Flat views of ``x`` and ``out`` in the widest words their size allows."""
    a, b = x.reshape(-1), out.reshape(-1)
    for word in (np.uint64, np.uint32, np.uint16):
        if a.nbytes % np.dtype(word).itemsize == 0:
            return a.view(word), b.view(word)
    return a, b


def roofline_copy(a: np.ndarray, b: np.ndarray) -> None:
    nchunks = max(1, min(4 * threads(), a.size // 4096))
    _copy(a, b, nchunks)


# --------------------------------------------------------------------------------------------
# peers (optional: a benchmark whose peer is missing is skipped)


def torch_or_skip():
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        raise NotImplementedError("torch is not installed") from None
    torch.set_num_threads(threads())
    return torch, F


def torch_tensors(case: str, dtype: str, layout: str):
    torch, _ = torch_or_skip()
    x, w, b, _, dy = data(case, dtype, layout)
    t, g = torch.from_numpy(x), torch.from_numpy(dy)
    if layout == "channels_last":  # NHWC memory, NCHW logical shape
        t, g = t.movedim(-1, 1), g.movedim(-1, 1)
    return t, torch.from_numpy(w.astype(dtype)), torch.from_numpy(b.astype(dtype)), g


@functools.lru_cache(maxsize=2)
def ort_session(case: str, dtype: str, layout: str):
    """An ONNX Runtime CPU session of InstanceNormalization (channels-last: wrapped in the two
    Transposes a user would add, ONNX being channels-first only)."""
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        raise NotImplementedError("onnxruntime/onnx are not installed") from None
    x, w, b, _, _ = data(case, dtype, layout)
    elem = {
        "float16": TensorProto.FLOAT16,
        "float32": TensorProto.FLOAT,
        "float64": TensorProto.DOUBLE,
    }[dtype]
    nd = x.ndim
    nodes, src, dst = [], "x", "y"
    if layout == "channels_last":
        perm = [0, nd - 1, *range(1, nd - 1)]
        nodes.append(helper.make_node("Transpose", ["x"], ["xt"], perm=perm))
        src, dst = "xt", "yt"
    nodes.append(
        helper.make_node("InstanceNormalization", [src, "scale", "B"], [dst], epsilon=1e-5)
    )
    if layout == "channels_last":
        nodes.append(helper.make_node("Transpose", ["yt"], ["y"], perm=[0, *range(2, nd), 1]))
    graph = helper.make_graph(
        nodes,
        "instnorm",
        [helper.make_tensor_value_info("x", elem, list(x.shape))],
        [helper.make_tensor_value_info("y", elem, list(x.shape))],
        initializer=[
            numpy_helper.from_array(w.astype(dtype), "scale"),
            numpy_helper.from_array(b.astype(dtype), "B"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 9)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads()
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    try:
        sess = ort.InferenceSession(
            model.SerializeToString(), so, providers=["CPUExecutionProvider"]
        )
        sess.run(None, {"x": x})
    except Exception as exc:  # onnxruntime's own exception types: no kernel for this dtype
        raise NotImplementedError(f"onnxruntime cannot run this case: {exc}") from None
    return sess
