"""Make the golden files of the layers (instnorm_numba.layers) from torch.nn.InstanceNorm*d.

Run with a local CPU build of PyTorch (never a dependency of this project):

    pip install torch==2.13.0
    python tests/golden/make_torch_layers.py

Writes
- tests/golden/torch_layers.npz: for every combination of dimensionality (1d/2d/3d) x batched
  or unbatched input x affine x track_running_stats x train/eval x momentum (0.1, None), a
  layer started from a random state dict and run for several steps: per step the output, the
  running statistics, ``num_batches_tracked``, and the gradients of a backward pass; at the end
  the layer's state dict.  Inputs under ``in/<group>/x`` and ``dy``, results stacked per group
  (see ``layer_cases``).
- tests/golden/torch_layers_load.json: what ``load_state_dict`` returns or raises for a table of
  state dicts, and PyTorch's forward errors and warning texts.
- examples/tiny_net_state.npz: the state dict of a small convolution-free network (instance
  norms, per-pixel affine maps, pointwise nonlinearities), and
  tests/golden/torch_tiny_net.npz: its output on the image of examples/tiny_net.py.

tests/test_layers.py reads these files; torch is not needed there.
"""

from __future__ import annotations

import itertools
import json
import pathlib
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
STEPS = 3
C = 4
#: batched shapes; the unbatched input is the first sample, without the batch axis
SHAPES = {1: (3, C, 8), 2: (2, C, 3, 4), 3: (2, C, 2, 3, 2)}
CLASSES = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}


def case_name(dim, batched, affine, track, mode, momentum):
    return (
        f"{dim}d-{'b' if batched else 'u'}-affine{int(affine)}-track{int(track)}-{mode}"
        f"-m{'None' if momentum is None else momentum}"
    )


def all_cases():
    return itertools.product(
        (1, 2, 3), (True, False), (False, True), (False, True), ("train", "eval"), (0.1, None)
    )


def inputs(rng):
    """Per (dim, batched): STEPS inputs with per-channel offsets and scales, and gradients."""
    data = {}
    for dim, shape in SHAPES.items():
        for batched in (True, False):
            sh = shape if batched else shape[1:]
            caxis = 1 if batched else 0
            bshape = [1] * len(sh)
            bshape[caxis] = C
            xs, dys = [], []
            for _ in range(STEPS):
                offset = rng.uniform(-3, 3, C).reshape(bshape)
                scale = rng.uniform(0.5, 2.0, C).reshape(bshape)
                xs.append(rng.standard_normal(sh) * scale + offset)
                dys.append(rng.standard_normal(sh))
            group = f"{dim}d-{'b' if batched else 'u'}"
            data[f"in/{group}/x"] = np.stack(xs).astype(np.float32)  # (STEPS, *shape)
            data[f"in/{group}/dy"] = np.stack(dys).astype(np.float32)
    return data


def initial_state(rng, affine, track):
    sd = {}
    if affine:
        sd["weight"] = rng.uniform(0.5, 1.5, C).astype(np.float32)
        sd["bias"] = rng.uniform(-0.5, 0.5, C).astype(np.float32)
    if track:
        sd["running_mean"] = rng.uniform(-1, 1, C).astype(np.float32)
        sd["running_var"] = rng.uniform(0.5, 2.0, C).astype(np.float32)
        sd["num_batches_tracked"] = np.array(0, dtype=np.int64)
    return sd


STATE_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def layer_cases(rng):
    """Stacked per group (dim, batched): ``<group>/<name>`` of shape (cases, STEPS, ...).

    ``<group>/case`` names the cases in order (``case_name``). Quantities a case does not have
    (gradients of the weight without affine, running statistics without tracking) are NaN,
    or -1 for ``num_batches_tracked``; ``init_<key>`` / ``final_<key>`` hold the state dict the
    case starts from and the one PyTorch ends with.
    """
    out = inputs(rng)
    groups = {}
    for dim, batched, affine, track, mode, momentum in all_cases():
        group = f"{dim}d-{'b' if batched else 'u'}"
        name = case_name(dim, batched, affine, track, mode, momentum)
        m = CLASSES[dim](C, momentum=momentum, affine=affine, track_running_stats=track)
        init = initial_state(rng, affine, track)
        m.load_state_dict({k: torch.from_numpy(v) for k, v in init.items()})
        m.train(mode == "train")
        rec = {"case": name}
        nan = np.full(C, np.nan, np.float32)
        for k in STATE_KEYS:
            absent = np.array(-1, np.int64) if k == "num_batches_tracked" else nan
            rec[f"init_{k}"] = init.get(k, absent)
        steps = {k: [] for k in ("y", "dx", "grad_weight", "grad_bias", *STATE_KEYS[2:])}
        for i in range(STEPS):
            x = torch.from_numpy(out[f"in/{group}/x"][i]).requires_grad_(True)
            dy = torch.from_numpy(out[f"in/{group}/dy"][i])
            m.zero_grad(set_to_none=True)
            y = m(x)
            y.backward(dy)
            steps["y"].append(y.detach().numpy().copy())
            steps["dx"].append(x.grad.numpy().copy())
            steps["grad_weight"].append(m.weight.grad.numpy().copy() if affine else nan)
            steps["grad_bias"].append(m.bias.grad.numpy().copy() if affine else nan)
            for k in STATE_KEYS[2:4]:
                steps[k].append(getattr(m, k).numpy().copy() if track else nan)
            nbt = m.num_batches_tracked.numpy().copy() if track else np.array(-1, np.int64)
            steps["num_batches_tracked"].append(nbt)
        rec.update({k: np.stack(v) for k, v in steps.items()})
        final = m.state_dict()
        assert list(final) == [k for k in STATE_KEYS if k in final]
        for k in STATE_KEYS:
            absent = np.array(-1, np.int64) if k == "num_batches_tracked" else nan
            rec[f"final_{k}"] = final[k].detach().numpy().copy() if k in final else absent
        groups.setdefault(group, []).append(rec)
    for group, recs in groups.items():
        for k in recs[0]:
            out[f"{group}/{k}"] = np.stack([r[k] for r in recs])
    return out


def _outcome(fn):
    try:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            r = fn()
    except Exception as exc:  # noqa: BLE001 - recorded, whatever it is
        return {"error": type(exc).__name__, "message": str(exc)}
    res = {"warnings": [str(x.message) for x in w]}
    if hasattr(r, "missing_keys"):
        res.update(missing=list(r.missing_keys), unexpected=list(r.unexpected_keys))
    return res


def load_cases():
    """load_state_dict over a table of layer configurations and state dicts."""
    full = {
        "weight": np.full(C, 2.0, np.float32),
        "bias": np.full(C, 0.5, np.float32),
        "running_mean": np.full(C, 0.25, np.float32),
        "running_var": np.full(C, 3.0, np.float32),
        "num_batches_tracked": np.array(7, np.int64),
    }
    dicts = {
        "full": full,
        "empty": {},
        "params_only": {k: full[k] for k in ("weight", "bias")},
        "stats_only": {k: full[k] for k in ("running_mean", "running_var")},
        "stats_and_count": {
            k: full[k] for k in ("running_mean", "running_var", "num_batches_tracked")
        },
        "full_no_count": {k: v for k, v in full.items() if k != "num_batches_tracked"},
        "only_running_mean": {"running_mean": full["running_mean"]},
        "extra_keys": {**full, "foo": np.ones(1, np.float32), "norm.weight": full["weight"]},
        "wrong_shape": {**full, "weight": np.ones(C + 1, np.float32)},
        "count_1d": {**full, "num_batches_tracked": np.array([5], np.int64)},
        "float64": {k: v.astype(np.float64) for k, v in full.items()},
    }
    out = []
    for affine, track, strict in itertools.product((False, True), (False, True), (True, False)):
        for dname, d in dicts.items():
            m = nn.InstanceNorm2d(C, affine=affine, track_running_stats=track)
            before = {k: v.clone() for k, v in m.state_dict().items()}
            res = _outcome(
                lambda m=m, d=d, strict=strict: m.load_state_dict(
                    {k: torch.from_numpy(np.array(v)) for k, v in d.items()}, strict=strict
                )
            )
            after = {k: v.numpy().tolist() for k, v in m.state_dict().items()}
            res["loaded"] = after if "error" not in res else None
            res["torch_half_loaded"] = "error" in res and any(
                not torch.equal(before[k], v) for k, v in m.state_dict().items()
            )
            out.append({"affine": affine, "track": track, "strict": strict, "dict": dname, **res})
    return {k: {kk: np.array(vv).tolist() for kk, vv in v.items()} for k, v in dicts.items()}, out


def forward_cases():
    """Errors and warnings of forward: wrong ndim, channel mismatch, one spatial element."""
    out = []
    for dim, klass in CLASSES.items():
        for ndim in range(1, 7):
            for affine in (False, True):
                if ndim == dim + 1:  # unbatched, C + 1 channels
                    shape = (C + 1,) + (3,) * dim
                elif ndim == dim + 2:  # batched, C + 1 channels
                    shape = (2, C + 1) + (3,) * dim
                else:  # wrong ndim
                    shape = (3,) * ndim
                m = klass(C, affine=affine)
                res = _outcome(lambda m=m, shape=shape: m(torch.zeros(shape)))
                out.append({"dim": dim, "affine": affine, "shape": list(shape), **res})
        for track, training in itertools.product((False, True), (True, False)):
            shape = (2, C) + (1,) * dim
            m = klass(C, track_running_stats=track).train(training)
            res = _outcome(lambda m=m, shape=shape: m(torch.zeros(shape)))
            out.append(
                {"dim": dim, "track": track, "training": training, "shape": list(shape), **res}
            )
    return out


# --------------------------------------------------------------------------------------------
# the example network (examples/tiny_net.py builds the same one from the state dict)


class TinyNet(nn.Module):
    """Convolution-free: instance norms, per-pixel affine maps, pointwise nonlinearities."""

    def __init__(self):
        super().__init__()
        self.norm_in = nn.InstanceNorm2d(3, affine=True)
        self.mix = nn.Linear(3, 16)
        self.norm_mid = nn.InstanceNorm2d(16, affine=True, track_running_stats=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = self.norm_in(x)
        h = torch.tanh(self.mix(h.movedim(1, -1)).movedim(-1, 1))
        h = F.leaky_relu(self.norm_mid(h), 0.2)
        return torch.sigmoid(self.head(h.movedim(1, -1)).movedim(-1, 1))


def example_image(height=256, width=256):
    """The example's input, (1, 3, H, W) float32 in [0, 1]: the same code is in the example."""
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:height, 0:width] / np.array([height, width])[:, None, None]
    base = np.stack([xx, yy, 0.5 + 0.5 * np.sin(6 * np.pi * xx * yy)])
    img = 0.8 * base + 0.2 * rng.random((3, height, width))
    return img[None].astype(np.float32)


def tiny_net():
    torch.manual_seed(0)
    net = TinyNet()
    with torch.no_grad():
        for norm in (net.norm_in, net.norm_mid):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
        net.train()  # a few steps on random images fill norm_mid's running statistics
        rng = np.random.default_rng(1)
        for _ in range(5):
            net(torch.from_numpy(rng.random((4, 3, 64, 64), dtype=np.float32)))
        net.eval()
        x = example_image()
        y = net(torch.from_numpy(x)).numpy()
    state = {k: v.numpy().copy() for k, v in net.state_dict().items()}
    golden = {
        "input_sum": np.array(x.astype(np.float64).sum()),
        "output_every4": y[:, :, ::4, ::4].copy(),
        "output_channel_mean": y.astype(np.float64).mean(axis=(0, 2, 3)),
        "output_shape": np.array(y.shape),
    }
    return state, golden


def main():
    assert torch.__version__.startswith("2.13.0"), torch.__version__
    torch.set_num_threads(1)
    rng = np.random.default_rng(20261123)
    np.savez_compressed(HERE / "torch_layers.npz", **layer_cases(rng))
    dicts, loads = load_cases()
    meta = {
        "torch": torch.__version__,
        "C": C,
        "dicts": dicts,
        "load": loads,
        "forward": forward_cases(),
    }
    (HERE / "torch_layers_load.json").write_text(json.dumps(meta, indent=1) + "\n")
    state, golden = tiny_net()
    (ROOT / "examples").mkdir(exist_ok=True)
    np.savez(ROOT / "examples" / "tiny_net_state.npz", **state)
    np.savez_compressed(HERE / "torch_tiny_net.npz", **golden)


if __name__ == "__main__":
    main()
