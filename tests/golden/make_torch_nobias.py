"""Make tests/golden/torch_layers_nobias.npz from torch.nn.InstanceNorm*d(affine=True, bias=False).

Run with a local CPU build of PyTorch (never a dependency of this project):

    pip install torch==2.13.0
    python tests/golden/make_torch_nobias.py

For every dimensionality (1d/2d/3d) x track_running_stats x train/eval: a layer with a weight
and no bias (``bias=False``, PyTorch 2.1 and later), started from a random state dict and run
for several steps; per step the output, the input gradient, the weight gradient and the running
statistics; the layer's ``repr`` and its state-dict keys, and what ``load_state_dict`` says
about a state dict that has a ``bias``. Keys ``<case>/<name>``; inputs ``<case>/x``,
``<case>/dy`` (STEPS stacked). tests/test_layers_bias.py reads it; torch is not needed there.
"""

from __future__ import annotations

import itertools
import pathlib

import numpy as np
import torch
from torch import nn

HERE = pathlib.Path(__file__).resolve().parent
STEPS = 3
C = 3
SHAPES = {1: (2, C, 7), 2: (2, C, 4, 5), 3: (2, C, 2, 3, 4)}
CLASSES = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}


def cases(rng):
    out = {}
    for dim, track, mode in itertools.product((1, 2, 3), (False, True), ("train", "eval")):
        name = f"{dim}d-track{int(track)}-{mode}"
        m = CLASSES[dim](C, affine=True, bias=False, track_running_stats=track, momentum=0.2)
        init = {"weight": rng.uniform(0.5, 1.5, C).astype(np.float32)}
        if track:
            init["running_mean"] = rng.uniform(-1, 1, C).astype(np.float32)
            init["running_var"] = rng.uniform(0.5, 2.0, C).astype(np.float32)
            init["num_batches_tracked"] = np.array(0, np.int64)
        m.load_state_dict({k: torch.from_numpy(v) for k, v in init.items()})
        m.train(mode == "train")
        shape = SHAPES[dim]
        xs = (rng.standard_normal((STEPS, *shape)) * 2 + 1).astype(np.float32)
        dys = rng.standard_normal((STEPS, *shape)).astype(np.float32)
        rec = {k: [] for k in ("y", "dx", "grad_weight", "running_mean", "running_var")}
        for i in range(STEPS):
            x = torch.from_numpy(xs[i]).requires_grad_(True)
            m.zero_grad(set_to_none=True)
            y = m(x)
            y.backward(torch.from_numpy(dys[i]))
            rec["y"].append(y.detach().numpy().copy())
            rec["dx"].append(x.grad.numpy().copy())
            rec["grad_weight"].append(m.weight.grad.numpy().copy())
            for k in ("running_mean", "running_var"):
                v = getattr(m, k)
                rec[k].append(np.full(C, np.nan, np.float32) if v is None else v.numpy().copy())
        for k, v in rec.items():
            out[f"{name}/{k}"] = np.stack(v)
        out[f"{name}/x"], out[f"{name}/dy"] = xs, dys
        for k, v in init.items():
            out[f"{name}/init_{k}"] = v
        out[f"{name}/repr"] = np.array(repr(m))
        out[f"{name}/keys"] = np.array(list(m.state_dict()))
        for k, v in m.state_dict().items():
            out[f"{name}/final_{k}"] = v.numpy().copy()
        # a state dict with a bias: PyTorch's message (strict), the unexpected key (not strict)
        with_bias = {**m.state_dict(), "bias": torch.zeros(C)}
        try:
            CLASSES[dim](C, affine=True, bias=False, track_running_stats=track).load_state_dict(
                with_bias
            )
        except RuntimeError as exc:
            out[f"{name}/load_error"] = np.array(str(exc))
        res = CLASSES[dim](C, affine=True, bias=False, track_running_stats=track)
        res = res.load_state_dict(with_bias, strict=False)
        out[f"{name}/load_unexpected"] = np.array(list(res.unexpected_keys))
    return out


def main():
    assert torch.__version__.startswith("2.13.0"), torch.__version__
    torch.set_num_threads(1)
    rng = np.random.default_rng(20261201)
    np.savez_compressed(HERE / "torch_layers_nobias.npz", **cases(rng))


if __name__ == "__main__":
    main()
