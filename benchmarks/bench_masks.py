"""Masks and variable lengths (issue 13) next to the dense call, on the audio case and on one
long instance.

``audio``: ``16 x 80 x 3000`` utterances padded to 3000 frames, lengths drawn between 1000 and
3000 (for the smoke test's small stand-in shapes, and for ``long``, ``1 x 1 x 2**21``, between
L/3 and L).  The ratios of the issue, each from
one run: ``Masks.time_lengths`` over ``Masks.time_dense_same_elements`` (a dense array holding
as many elements as the valid prefixes; at most 1.2x), ``Masks.time_mask_*`` over
``Masks.time_dense`` (the full array; at most 1.5x).  ``scripts/bench_masks.py`` prints them.
"""

from __future__ import annotations

import functools

import numpy as np

from . import common
from .common import DTYPES, LAYOUTS, channel_axis

CASES = ["audio", "long"]
PARAMS = [CASES, DTYPES, LAYOUTS]
PARAM_NAMES = ["case", "dtype", "layout"]

#: ``long``: one instance (N = C = 1) of 2**21 elements, split across the threads like the
#: dense one; and its smoke-test stand-in
LONG = ((1, 1, 1 << 21), (1, 1, 300))


def masked_data(case: str, dtype: str, layout: str):
    """x, its valid sets, a dense array of the same valid element count, outputs, dy, and the
    forward's statistics for the backward; every kernel called once."""
    if case == "long":
        shape = LONG[1 if common.SMALL else 0]
    else:
        shape = common.case(case, dtype, layout).logical_shape
    return _masked_data(shape, dtype, layout)


@functools.lru_cache(maxsize=2)  # (keyed by the shape: the smoke test runs the small ones)
def _masked_data(shape, dtype: str, layout: str):
    from instnorm_numba import instance_norm

    N, L = shape[0], int(np.prod(shape[2:]))
    rng = np.random.default_rng(0)
    lo, hi = (1000, 3000) if L == 3000 else (max(1, L // 3), L)
    lengths = rng.integers(lo, hi + 1, N)
    x = (rng.standard_normal(shape, dtype=np.float32) * 2.0 + 0.5).astype(dtype)
    lbar = int(round(lengths.mean()))
    packed = np.ascontiguousarray(x[:, :, :lbar])
    per_channel = rng.random(shape) < 0.5
    if layout == "channels_last":
        x, packed, per_channel = (
            np.ascontiguousarray(np.moveaxis(a, 1, -1)) for a in (x, packed, per_channel)
        )
    d = {
        "x": x,
        "lengths": lengths,
        "prefix": np.arange(L)[None, :] < lengths[:, None],
        "random": rng.random((N, L)) < 0.5,
        "per_channel": per_channel,
        "packed": packed,
        "out": np.empty_like(x),
        "packed_out": np.empty_like(packed),
        "dy": rng.standard_normal(x.shape, dtype=np.float32).astype(dtype),
    }
    ax = channel_axis(layout)
    for kw in ({}, {"lengths": lengths}, {"mask": d["prefix"]}, {"mask": per_channel}):
        _, m, r = instance_norm(x, channel_axis=ax, out=d["out"], return_stats=True, **kw)
        d[("stats",) + tuple(kw)] = (m, r)
    instance_norm(packed, channel_axis=ax, out=d["packed_out"])
    instance_norm(x, channel_axis=ax, out=d["out"], mask=d["random"])
    return d


class Masks:
    """Forward: lengths, masks, and the dense calls they are measured against."""

    params = PARAMS
    param_names = PARAM_NAMES
    timeout = 300

    def setup(self, case, dtype, layout):
        from instnorm_numba import instance_norm

        self.fn = instance_norm
        self.d = masked_data(case, dtype, layout)
        self.axis = channel_axis(layout)

    def time_dense(self, case, dtype, layout):
        self.fn(self.d["x"], channel_axis=self.axis, out=self.d["out"])

    def time_dense_same_elements(self, case, dtype, layout):
        self.fn(self.d["packed"], channel_axis=self.axis, out=self.d["packed_out"])

    def time_lengths(self, case, dtype, layout):
        d = self.d
        self.fn(d["x"], channel_axis=self.axis, out=d["out"], lengths=d["lengths"])

    def time_mask_prefix(self, case, dtype, layout):
        d = self.d
        self.fn(d["x"], channel_axis=self.axis, out=d["out"], mask=d["prefix"])

    def time_mask_random(self, case, dtype, layout):
        d = self.d
        self.fn(d["x"], channel_axis=self.axis, out=d["out"], mask=d["random"])

    def time_mask_per_channel(self, case, dtype, layout):
        d = self.d
        self.fn(d["x"], channel_axis=self.axis, out=d["out"], mask=d["per_channel"])

    def peakmem_lengths(self, case, dtype, layout):
        d = self.d
        self.fn(d["x"], channel_axis=self.axis, lengths=d["lengths"])


class MasksBackward:
    """Backward with lengths and masks, next to the dense backward."""

    params = PARAMS
    param_names = PARAM_NAMES
    timeout = 300

    def setup(self, case, dtype, layout):
        from instnorm_numba import instance_norm_backward

        self.fn = instance_norm_backward
        self.d = masked_data(case, dtype, layout)
        self.axis = channel_axis(layout)
        d = self.d
        for key, kw in (
            (("stats",), {}),
            (("stats", "lengths"), {"lengths": d["lengths"]}),
            (("stats", "mask"), {"mask": d["prefix"]}),
        ):
            m, r = d[key]
            self.fn(d["dy"], d["x"], m, r, channel_axis=self.axis, out=d["out"], **kw)

    def time_backward_dense(self, case, dtype, layout):
        d = self.d
        m, r = d[("stats",)]
        self.fn(d["dy"], d["x"], m, r, channel_axis=self.axis, out=d["out"])

    def time_backward_lengths(self, case, dtype, layout):
        d = self.d
        m, r = d[("stats", "lengths")]
        self.fn(d["dy"], d["x"], m, r, channel_axis=self.axis, out=d["out"], lengths=d["lengths"])

    def time_backward_mask(self, case, dtype, layout):
        d = self.d
        m, r = d[("stats", "mask")]
        self.fn(d["dy"], d["x"], m, r, channel_axis=self.axis, out=d["out"], mask=d["prefix"])
