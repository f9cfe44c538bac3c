"""Make tests/golden/torch_forward.npz: PyTorch's F.instance_norm on fixed inputs.

Run with a local CPU build of PyTorch (never a dependency of this project):

    pip install torch==2.13.0
    python tests/golden/make_torch_forward.py

Each case stores its inputs, the running statistics before and after, and PyTorch's output,
under keys ``<case>/<name>``.  tests/test_forward.py reads the file; torch is not needed there.
"""

from __future__ import annotations

import pathlib

import numpy as np
import torch
import torch.nn.functional as F

HERE = pathlib.Path(__file__).resolve().parent


def cases():
    rng = np.random.default_rng(20261123)
    for dtype in ("float32", "float64"):
        for shape in ((2, 3, 17), (3, 4, 9, 11), (2, 2, 5, 6, 7)):
            for affine in (False, True):
                for mode in ("plain", "train", "eval"):
                    C = shape[1]
                    x = (rng.standard_normal(shape) * 2.5 + rng.uniform(-3, 3)).astype(dtype)
                    case = {
                        "x": x,
                        "eps": np.float64(1e-5 if mode != "eval" else 1e-3),
                        "momentum": np.float64(0.1 if mode != "train" else 0.3),
                    }
                    if affine:
                        case["weight"] = rng.uniform(0.5, 1.5, C).astype(dtype)
                        case["bias"] = rng.uniform(-1, 1, C).astype(dtype)
                    if mode != "plain":
                        case["running_mean"] = rng.uniform(-1, 1, C).astype(dtype)
                        case["running_var"] = rng.uniform(0.5, 2, C).astype(dtype)
                    dims = "x".join(map(str, shape))
                    name = f"{dtype}_{dims}_{'affine' if affine else 'plain'}_{mode}"
                    yield name, mode, case


def run(mode, case):
    arrays = {k: v for k, v in case.items() if isinstance(v, np.ndarray) and v.ndim}
    t = {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}
    rm = t.get("running_mean")
    rv = t.get("running_var")
    rm_t = rm.clone() if rm is not None else None
    rv_t = rv.clone() if rv is not None else None
    y = F.instance_norm(
        t["x"],
        running_mean=rm_t,
        running_var=rv_t,
        weight=t.get("weight"),
        bias=t.get("bias"),
        use_input_stats=mode != "eval",
        momentum=float(case["momentum"]),
        eps=float(case["eps"]),
    )
    result = {"y": y.numpy()}
    if rm_t is not None:
        result["running_mean_after"] = rm_t.numpy()
        result["running_var_after"] = rv_t.numpy()
    return result


def main():
    torch.set_num_threads(1)
    out = {"torch_version": np.array(torch.__version__)}
    for name, mode, case in cases():
        for k, v in case.items():
            out[f"{name}/{k}"] = v
        out[f"{name}/mode"] = np.array(mode)
        for k, v in run(mode, case).items():
            out[f"{name}/{k}"] = v
    np.savez_compressed(HERE / "torch_forward.npz", **out)
    print(f"wrote {len(out)} arrays from torch {torch.__version__}")


if __name__ == "__main__":
    main()
