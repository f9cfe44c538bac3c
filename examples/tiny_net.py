"""Run a small PyTorch-trained network in NumPy, with instnorm_numba's layers.

The network is convolution-free, as in the last stages of a style-transfer model:

    InstanceNorm2d(3, affine)  ->  per-pixel affine map 3 -> 16  ->  tanh
    ->  InstanceNorm2d(16, affine, running statistics, eval mode)  ->  leaky ReLU(0.2)
    ->  per-pixel affine map 16 -> 3  ->  sigmoid

Its parameters come from ``tiny_net_state.npz`` beside this file: PyTorch's ``state_dict``
saved with ``np.savez`` by tests/golden/make_torch_layers.py (PyTorch 2.13.0), keys such as
``norm_mid.running_var``. The network runs on a 256 x 256 RGB image and its output is compared
with PyTorch's, stored in tests/golden/torch_tiny_net.npz. PyTorch is not needed here.

    python examples/tiny_net.py
"""

from __future__ import annotations

import pathlib
import sys

import numpy as np

from instnorm_numba import InstanceNorm2d

HERE = pathlib.Path(__file__).resolve().parent
STATE = HERE / "tiny_net_state.npz"
GOLDEN = HERE.parent / "tests" / "golden" / "torch_tiny_net.npz"
#: largest |ours - PyTorch| accepted on the output (values in (0, 1)): 8 float32 epsilons
TOLERANCE = 8 * float(np.finfo(np.float32).eps)


def example_image(height=256, width=256):
    """A (1, 3, H, W) float32 image in [0, 1]: gradients, a ripple and some noise."""
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:height, 0:width] / np.array([height, width])[:, None, None]
    base = np.stack([xx, yy, 0.5 + 0.5 * np.sin(6 * np.pi * xx * yy)])
    img = 0.8 * base + 0.2 * rng.random((3, height, width))
    return img[None].astype(np.float32)


def submodule(state, prefix):
    """The entries of a whole model's state dict that belong to one submodule, unprefixed."""
    return {k[len(prefix) :]: state[k] for k in state if k.startswith(prefix)}


class TinyNet:
    def __init__(self, state):
        self.norm_in = InstanceNorm2d(3, affine=True)
        self.norm_mid = InstanceNorm2d(16, affine=True, track_running_stats=True)
        self.norm_in.load_state_dict(submodule(state, "norm_in."))
        self.norm_mid.load_state_dict(submodule(state, "norm_mid."))
        self.mix_w, self.mix_b = state["mix.weight"], state["mix.bias"]  # (16, 3), (16,)
        self.head_w, self.head_b = state["head.weight"], state["head.bias"]  # (3, 16), (3,)

    def eval(self):
        self.norm_in.eval()
        self.norm_mid.eval()
        return self

    @staticmethod
    def pointwise(h, w, b):
        """``torch.nn.Linear`` applied to every pixel's channel vector (a 1 x 1 affine map)."""
        return np.einsum("oc,nchw->nohw", w, h) + b[:, None, None]

    def __call__(self, x):
        h = self.norm_in(x)
        h = np.tanh(self.pointwise(h, self.mix_w, self.mix_b))
        h = self.norm_mid(h)
        h = np.where(h >= 0, h, np.float32(0.2) * h)
        z = self.pointwise(h, self.head_w, self.head_b)
        return 1 / (1 + np.exp(-z))


def main() -> int:
    with np.load(STATE) as f:
        state = dict(f)
    net = TinyNet(state).eval()
    x = example_image()
    y = net(x)

    with np.load(GOLDEN) as g:
        golden = dict(g)
    assert np.isclose(x.astype(np.float64).sum(), golden["input_sum"], rtol=1e-12, atol=0)
    assert y.shape == tuple(golden["output_shape"]), (y.shape, golden["output_shape"])
    # PyTorch's output is stored at every 4th pixel (3 x 64 x 64 values), with channel means
    diff = np.abs(y[:, :, ::4, ::4].astype(np.float64) - golden["output_every4"])
    means = y.astype(np.float64).mean(axis=(0, 2, 3))
    print(f"input {x.shape} {x.dtype}, output {y.shape} {y.dtype}")
    print(f"output channel means: ours {np.round(means, 6)}")
    print(f"                   PyTorch {np.round(golden['output_channel_mean'], 6)}")
    print(f"max |ours - PyTorch| over {diff.size} sampled outputs: {diff.max():.2e}")
    # float32 throughout: each norm is within an epsilon or so of exact in both libraries;
    # the affine maps sum 3 and 16 such terms (weights below 1) and the sigmoid's slope is at
    # most 1/4, so the outputs (below 1) differ by a few float32 epsilons (1.2e-7) at most
    ok = diff.max() <= TOLERANCE and np.allclose(
        means, golden["output_channel_mean"], rtol=0, atol=TOLERANCE
    )
    print("matches PyTorch" if ok else f"DIFFERS from PyTorch (tolerance {TOLERANCE})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
