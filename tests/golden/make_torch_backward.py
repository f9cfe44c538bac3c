"""Make tests/golden/torch_backward.npz: PyTorch autograd through F.instance_norm.

Run with a local CPU build of PyTorch (never a dependency of this project):

    pip install torch==2.13.0
    python tests/golden/make_torch_backward.py

Each case stores ``x``, ``grad_output``, ``eps`` and (affine cases) ``weight``/``bias``, and
PyTorch's gradients ``grad_input``, ``grad_weight``, ``grad_bias`` (the last two also for
non-affine cases: they come from a weight of ones and a bias of zeros, which gives the same
forward), under keys ``<case>/<name>``.  tests/test_backward.py reads the file; torch is not
needed there.
"""

from __future__ import annotations

import pathlib

import numpy as np
import torch
import torch.nn.functional as F

HERE = pathlib.Path(__file__).resolve().parent


def cases():
    rng = np.random.default_rng(20261124)
    for dtype in ("float32", "float64"):
        for shape in ((2, 3, 17), (3, 4, 9, 11), (2, 2, 5, 6, 7)):
            for affine in (False, True):
                for offset in (0.0, 1e4):
                    C = shape[1]
                    x = rng.standard_normal(shape) * 2.5 + offset + rng.uniform(-3, 3)
                    case = {
                        "x": x.astype(dtype),
                        "grad_output": (rng.standard_normal(shape) + 0.5).astype(dtype),
                        "eps": np.float64(1e-5),
                    }
                    if affine:
                        case["weight"] = rng.uniform(-1.5, 1.5, C).astype(dtype)
                        case["bias"] = rng.uniform(-1, 1, C).astype(dtype)
                    kind = "affine" if affine else "plain"
                    shape_s = "x".join(map(str, shape))
                    yield f"{dtype}_{shape_s}_{kind}_offset{offset:g}", case


def run(case):
    x = torch.from_numpy(case["x"].copy()).requires_grad_(True)
    C = x.shape[1]
    w = case.get("weight", np.ones(C, case["x"].dtype))
    b = case.get("bias", np.zeros(C, case["x"].dtype))
    w = torch.from_numpy(w.copy()).requires_grad_(True)
    b = torch.from_numpy(b.copy()).requires_grad_(True)
    y = F.instance_norm(x, weight=w, bias=b, eps=float(case["eps"]))
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), torch.from_numpy(case["grad_output"]))
    return {"grad_input": gx.numpy(), "grad_weight": gw.numpy(), "grad_bias": gb.numpy()}


def main():
    torch.manual_seed(0)
    out = {}
    for name, case in cases():
        for k, v in {**case, **run(case)}.items():
            out[f"{name}/{k}"] = v
    path = HERE / "torch_backward.npz"
    np.savez_compressed(path, **out)
    print(f"wrote {path} ({len(out)} arrays, torch {torch.__version__})")


if __name__ == "__main__":
    main()
