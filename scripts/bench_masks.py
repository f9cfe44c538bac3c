"""Time masked and variable-length instance_norm against the dense call (issue 13).

The audio case: ``16 x 80 x 3000`` (N, C, L) with ``lengths`` drawn uniformly between 1000 and
3000.  Ratios, each from one interleaved run:

* ``lengths`` over the dense call on the same valid elements: an array ``(16, 80, Lbar)``
  holding as many elements as the valid prefixes (``Lbar`` their mean length); also over the
  sum of the 16 dense calls on the prefixes themselves;
* ``mask`` (the same prefixes as a boolean ``(N, L)`` mask, and a random mask of density 0.5,
  shared by the channels and per channel) over the dense call on the full array;
* what the padded layout itself costs the memory system, without normalization: NumPy copying
  the valid prefixes from ``x`` into ``out`` (the elements ``lengths`` reads and writes, in
  their padded places) over NumPy copying the packed array;
* and with it: ``lengths`` all equal to ``Lbar`` (the packed array's elements, in their padded
  places, the padding written with zeros) over the dense call on the packed array: the same
  rows, only the row stride and the zeros differ.

``--few-long`` times the other extreme too: one instance of ``FEW_LONG`` elements (N = C = 1),
which the kernels split across the threads (dense, lengths and masks alike), forward and
backward; ``lengths`` is 3/4 of the length.  ``--batch N`` takes N samples instead of 16 (with
2 or 4 the audio case fits in the cache).

Run under the bench lock (the machine is shared):

    flock /work/bench.lock python scripts/bench_masks.py [--dtype float32] [--layout both]

Prints medians and minima (ms) over the blocks and their ratios; ``--json PATH`` writes them
too.  On a loaded machine the minima are the steadier figures.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import numpy as np

from instnorm_numba import instance_norm, instance_norm_backward

SHAPE = (16, 80, 3000)
LOW, HIGH = 1000, 3000


def _median_ms(fns, blocks, number):
    """Median ms per call of each of ``fns``, timed in interleaved blocks (order reversed
    every other block, so drift does not favour one)."""
    times = {k: [] for k in fns}
    keys = list(fns)
    for blk in range(blocks):
        for k in keys if blk % 2 == 0 else keys[::-1]:
            f = fns[k]
            t0 = time.perf_counter()
            for _ in range(number):
                f()
            times[k].append((time.perf_counter() - t0) / number * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}, {
        k: min(v) for k, v in times.items()
    }


def case(dtype: str, layout: str, seed: int = 0, shape=SHAPE):
    rng = np.random.default_rng(seed)
    N, C, L = shape
    lengths = rng.integers(LOW, HIGH + 1, N)
    x = (rng.standard_normal(shape, dtype=np.float32) * 2.0 + 0.5).astype(dtype)
    lbar = int(round(lengths.mean()))
    packed = np.ascontiguousarray(x[:, :, :lbar])
    prefixes = [np.ascontiguousarray(x[n : n + 1, :, : lengths[n]]) for n in range(N)]
    prefix_mask = np.arange(L)[None, :] < lengths[:, None]
    random_mask = rng.random((N, L)) < 0.5
    per_channel = rng.random(shape) < 0.5
    axis = 1
    if layout == "channels_last":
        axis = -1
        x, packed = (np.ascontiguousarray(np.moveaxis(a, 1, -1)) for a in (x, packed))
        prefixes = [np.ascontiguousarray(np.moveaxis(a, 1, -1)) for a in prefixes]
        per_channel = np.ascontiguousarray(np.moveaxis(per_channel, 1, -1))
    return dict(
        x=x,
        axis=axis,
        lengths=lengths,
        packed=packed,
        prefixes=prefixes,
        prefix_mask=prefix_mask,
        random_mask=random_mask,
        per_channel=per_channel,
    )


#: the one-instance case of ``--few-long``: (N, C, L)
FEW_LONG = (1, 1, 1 << 21)


def run_few_long(dtype: str, layout: str, blocks: int, number: int):
    """Dense against lengths and a random mask on one long instance."""
    rng = np.random.default_rng(1)
    N, C, L = FEW_LONG
    x = (rng.standard_normal(FEW_LONG, dtype=np.float32) * 2.0 + 0.5).astype(dtype)
    axis = 1
    if layout == "channels_last":
        axis = -1
        x = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    out = np.empty_like(x)
    lengths = np.array([L * 3 // 4])
    random_mask = rng.random((N, L)) < 0.5
    dy = rng.standard_normal(x.shape).astype(dtype)
    valid = {
        "dense_full": {},
        "lengths": {"lengths": lengths},
        "mask_random": {"mask": random_mask},
    }
    fns = {
        k: functools.partial(instance_norm, x, channel_axis=axis, out=out, **kw)
        for k, kw in valid.items()
    }
    for k, kw in valid.items():  # the backward, with the statistics of the matching forward
        _, mean, rstd = instance_norm(x, channel_axis=axis, return_stats=True, **kw)
        fns["backward " + k] = functools.partial(
            instance_norm_backward, dy, x, mean, rstd, channel_axis=axis, out=out, **kw
        )
    for f in fns.values():
        f()
        f()
    t, tmin = _median_ms(fns, blocks, number)
    ratios = {}
    for tag, tt in (("", t), ("min ", tmin)):
        for d in ("", "backward "):
            for k in ("lengths", "mask_random"):
                ratios[f"{tag}{d}{k} / dense_full"] = tt[d + k] / tt[d + "dense_full"]
    return t, tmin, ratios


def run(dtype: str, layout: str, blocks: int, number: int, shape=SHAPE):
    d = case(dtype, layout, shape=shape)
    x, ax = d["x"], d["axis"]
    out = np.empty_like(x)
    pout = np.empty_like(d["packed"])
    prefix_outs = [np.empty_like(p) for p in d["prefixes"]]
    valid = [(slice(n, n + 1), slice(None), slice(0, k)) for n, k in enumerate(d["lengths"])]
    if ax == -1:
        valid = [(n, k, c) for n, c, k in valid]

    uniform = np.full_like(d["lengths"], d["packed"].shape[2 if ax == 1 else 1])

    def dense_prefixes():
        for p, o in zip(d["prefixes"], prefix_outs, strict=True):
            instance_norm(p, channel_axis=ax, out=o)

    def copy_prefixes():
        for v in valid:
            np.copyto(out[v], x[v])

    fns = {
        "copy_packed": lambda: np.copyto(pout, d["packed"]),
        "copy_prefixes": copy_prefixes,
        "dense_full": lambda: instance_norm(x, channel_axis=ax, out=out),
        "dense_same_elements": lambda: instance_norm(d["packed"], channel_axis=ax, out=pout),
        "dense_prefix_calls": dense_prefixes,
        "lengths": lambda: instance_norm(x, channel_axis=ax, out=out, lengths=d["lengths"]),
        "lengths_uniform": lambda: instance_norm(x, channel_axis=ax, out=out, lengths=uniform),
        "mask_prefix": lambda: instance_norm(x, channel_axis=ax, out=out, mask=d["prefix_mask"]),
        "mask_random": lambda: instance_norm(x, channel_axis=ax, out=out, mask=d["random_mask"]),
        "mask_per_channel": lambda: instance_norm(
            x, channel_axis=ax, out=out, mask=d["per_channel"]
        ),
    }
    for f in fns.values():  # load or compile every kernel first
        f()
        f()
    t, tmin = _median_ms(fns, blocks, number)
    ratios = {}
    for tag, tt in (("", t), ("min ", tmin)):
        ratios.update(_ratios(tt, tag))
    return t, tmin, ratios


def _ratios(t, tag):
    return {
        tag + "lengths / dense_same_elements": t["lengths"] / t["dense_same_elements"],
        tag + "lengths / dense_prefix_calls": t["lengths"] / t["dense_prefix_calls"],
        tag + "copy_prefixes / copy_packed": t["copy_prefixes"] / t["copy_packed"],
        tag + "lengths_uniform / dense_same_elements": t["lengths_uniform"]
        / t["dense_same_elements"],
        tag + "mask_prefix / dense_full": t["mask_prefix"] / t["dense_full"],
        tag + "mask_random / dense_full": t["mask_random"] / t["dense_full"],
        tag + "mask_per_channel / dense_full": t["mask_per_channel"] / t["dense_full"],
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="float32", choices=["float16", "float32", "float64", "all"])
    p.add_argument("--layout", default="both", choices=["channels_first", "channels_last", "both"])
    p.add_argument("--blocks", type=int, default=11)
    p.add_argument("--number", type=int, default=10)
    p.add_argument("--json", default=None)
    p.add_argument("--threads", type=int, default=0, help="numba.set_num_threads (0: default)")
    p.add_argument("--few-long", action="store_true", help=f"one instance {FEW_LONG} instead")
    p.add_argument(
        "--batch",
        type=int,
        default=SHAPE[0],
        help=f"N of the audio case (default {SHAPE[0]}; fewer fit in the cache)",
    )
    a = p.parse_args(argv)
    dtypes = ["float32", "float16", "float64"] if a.dtype == "all" else [a.dtype]
    layouts = ["channels_first", "channels_last"] if a.layout == "both" else [a.layout]
    import numba

    if a.threads:
        numba.set_num_threads(a.threads)
    shape = FEW_LONG if a.few_long else (a.batch,) + SHAPE[1:]
    report = {"shape": shape, "threads": numba.get_num_threads()}
    report["lengths"] = [LOW, HIGH]
    for dt in dtypes:
        for lay in layouts:
            if a.few_long:
                t, tmin, r = run_few_long(dt, lay, a.blocks, a.number)
            else:
                t, tmin, r = run(dt, lay, a.blocks, a.number, shape)
            report[f"{dt}/{lay}"] = {"median_ms": t, "min_ms": tmin, "ratios": r}
            print(f"{'x'.join(map(str, shape))} {dt} {lay} (threads={report['threads']})")
            for k, v in t.items():
                print(f"  {k:<31s} {v:8.3f} ms median {tmin[k]:8.3f} ms min")
            for k, v in r.items():
                print(f"  {k:<41s} {v:6.2f}x")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(report, fh, indent=2)


if __name__ == "__main__":
    main()
