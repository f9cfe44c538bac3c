"""Make tests/golden/torch_masked.npz: PyTorch autograd through the masked instance norm.

PyTorch has no masked instance normalization (its issue #81985 asks for one), so the masked
formula is written out with torch operations in float64 and differentiated by autograd::

    n = sum(m),  mean = sum(m * x) / n,  var = sum(m * (x - mean)**2) / n
    y = where(m, (x - mean) / sqrt(var + eps) * w + b, 0)

(sums over the spatial axes of each (n, c) instance; ``m`` the valid set).  The masked-out
elements are set to NaN in ``x`` and ``dy`` after torch has run on zeros there, so the test also
proves that nothing leaks from them.  Run with a local CPU build of PyTorch (never a dependency
of this project):

    pip install torch==2.13.0
    python tests/golden/make_torch_masked.py

Each case stores ``x``, ``dy``, ``weight``, ``bias``, ``channel_axis``, ``mask`` (boolean, in a
shape instance_norm accepts) or ``lengths``, and torch's ``y``, ``mean``, ``dx``, ``dw``, ``db``,
under keys ``<case>/<name>``.  tests/test_masks.py reads the file; torch is not needed there.
"""

from __future__ import annotations

import pathlib

import numpy as np
import torch

HERE = pathlib.Path(__file__).resolve().parent
EPS = 1e-5


def masked_norm(x, m, w, b, eps):
    """x, m: (N, C, L) float64 / bool tensors; w, b: (C,).

    An instance with no valid element divides by a count clamped to 1 (its output is 0 and its
    gradients are 0; an unclamped 0/0 would send NaN through ``where``'s backward into
    ``dw``), and its mean is reported as NaN, instance_norm's convention."""
    mf = m.to(x.dtype)
    xz = torch.where(m, x, torch.zeros_like(x))
    count = mf.sum(-1, keepdim=True)
    n = count.clamp(min=1.0)
    mean = xz.sum(-1, keepdim=True) / n
    d = torch.where(m, xz - mean, torch.zeros_like(x))
    var = (d * d).sum(-1, keepdim=True) / n
    y = d / torch.sqrt(var + eps) * w[:, None] + b[:, None]
    mean = torch.where(count > 0, mean, torch.full_like(mean, float("nan")))
    return torch.where(m, y, torch.zeros_like(y)), mean[..., 0]


def cases():
    rng = np.random.default_rng(20261201)
    # (shape in (N, C, *spatial), channel_axis, kind)
    specs = [
        ((4, 3, 50), 1, "lengths"),
        ((4, 3, 50), -1, "lengths"),
        ((3, 4, 9, 11), 1, "shared"),
        ((3, 4, 9, 11), -1, "shared"),
        ((2, 5, 40), 1, "per"),
        ((2, 5, 40), -1, "per"),
        ((2, 3, 4, 5, 6), 1, "one"),
    ]
    for shape, axis, kind in specs:
        N, C = shape[:2]
        L = int(np.prod(shape[2:]))
        x = rng.standard_normal(shape) * 2.5 + rng.uniform(-3, 3)
        dy = rng.standard_normal(shape) + 0.5
        w = rng.uniform(-1.5, 1.5, C)
        b = rng.uniform(-1, 1, C)
        case = {"channel_axis": np.int64(axis), "weight": w, "bias": b}
        if kind == "lengths":
            lengths = np.array([L, 0, 1] + list(rng.integers(2, L, N - 3)))
            v = np.broadcast_to((np.arange(L)[None, :] < lengths[:, None])[:, None], (N, C, L))
            case["lengths"] = lengths
        else:
            if kind == "shared":
                m = rng.random((N, *shape[2:])) < 0.6
                v = np.broadcast_to(m[:, None], shape)
            elif kind == "one":
                m = rng.random((N, 1, *shape[2:])) < 0.6
                v = np.broadcast_to(m, shape)
            else:
                m = rng.random(shape) < 0.6
                m[0, 0] = False  # an instance with no valid element
                v = m
            mm = m if kind == "shared" else np.moveaxis(m, 1, axis)
            case["mask"] = np.ascontiguousarray(mm)
            v = np.broadcast_to(v, shape)
        v = np.array(v.reshape(N, C, L), copy=True)
        xt = torch.from_numpy(np.where(v, x.reshape(N, C, L), 0.0)).requires_grad_(True)
        wt = torch.from_numpy(w.copy()).requires_grad_(True)
        bt = torch.from_numpy(b.copy()).requires_grad_(True)
        y, mean = masked_norm(xt, torch.from_numpy(np.ascontiguousarray(v)), wt, bt, EPS)
        gt = torch.from_numpy(np.where(v, dy.reshape(N, C, L), 0.0))
        gx, gw, gb = torch.autograd.grad(y, (xt, wt, bt), gt)
        gx = torch.where(torch.from_numpy(np.ascontiguousarray(v)), gx, torch.zeros_like(gx))
        xn = np.where(v, x.reshape(N, C, L), np.nan).reshape(shape)
        dyn = np.where(v, dy.reshape(N, C, L), np.nan).reshape(shape)
        case["x"] = np.ascontiguousarray(np.moveaxis(xn, 1, axis))
        case["dy"] = np.ascontiguousarray(np.moveaxis(dyn, 1, axis))
        case["y"] = np.ascontiguousarray(np.moveaxis(y.detach().numpy().reshape(shape), 1, axis))
        case["mean"] = mean.detach().numpy()
        case["dx"] = np.ascontiguousarray(np.moveaxis(gx.numpy().reshape(shape), 1, axis))
        case["dw"] = gw.numpy()
        case["db"] = gb.numpy()
        name = f"{kind}_{'x'.join(map(str, shape))}_axis{axis}"
        yield name, case


def main():
    torch.manual_seed(0)
    out = {}
    for name, case in cases():
        for k, v in case.items():
            out[f"{name}/{k}"] = v
    np.savez_compressed(HERE / "torch_masked.npz", **out)
    print(f"wrote {len(out)} arrays to {HERE / 'torch_masked.npz'}")


if __name__ == "__main__":
    main()
