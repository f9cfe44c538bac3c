"""The two client networks of the PyTorch bridge, as PyTorch modules (needs ``torch``).

``scripts/bench_torch.py`` times them end to end and ``tests/test_torch.py`` trains them
through :func:`instnorm_numba.torch.convert`, so both run the same layers:

* ``DynUNet``: MONAI's DynUNet-style 3-D U-Net for segmentation (InstanceNorm3d);
* ``StyleNet``: Johnson et al.'s (2016) fast style transfer network (InstanceNorm2d).

The ``track_*`` options turn on running statistics in some norms (the originals track none)
so that a test also exercises the running update.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DynUNet", "StyleNet"]


class UNetBlock(nn.Module):
    """MONAI's UnetBasicBlock: (conv 3, InstanceNorm3d(affine=True), LeakyReLU(0.01)) x 2;
    ``track_first``: the first norm tracks running statistics."""

    def __init__(self, cin, cout, stride, track_first=False):
        super().__init__()
        self.conv1 = nn.Conv3d(cin, cout, 3, stride, 1, bias=False)
        self.norm1 = nn.InstanceNorm3d(cout, affine=True, track_running_stats=track_first)
        self.conv2 = nn.Conv3d(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = nn.InstanceNorm3d(cout, affine=True)
        self.act = nn.LeakyReLU(0.01)

    def forward(self, x):
        x = self.act(self.norm1(self.conv1(x)))
        return self.act(self.norm2(self.conv2(x)))


class DynUNet(nn.Module):
    """MONAI DynUNet-style: strided-conv encoder (filters ``widths``, stride 1 then 2),
    transposed-conv decoder with skip concatenations, 1x1x1 head. The default, four levels
    (filters 32, 64, 128, 256: 96^3 down to 12^3), has 14 InstanceNorm3d(affine=True);
    nnU-Net's 96^3 plan, ``widths=(32, 64, 128, 256, 320, 320)``, adds two levels at 6^3 and
    3^3 (22 norms), where the norms cost next to nothing."""

    def __init__(self, cin=1, cout=3, widths=(32, 64, 128, 256), track_first=False):
        super().__init__()
        self.enc = nn.ModuleList()
        c = cin
        for i, w in enumerate(widths):
            self.enc.append(UNetBlock(c, w, 1 if i == 0 else 2, track_first))
            c = w
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for w in reversed(widths[:-1]):
            self.up.append(nn.ConvTranspose3d(c, w, 2, 2, bias=False))
            self.dec.append(UNetBlock(2 * w, w, 1, track_first))
            c = w
        self.head = nn.Conv3d(c, cout, 1)

    def forward(self, x):
        skips = []
        for block in self.enc:
            x = block(x)
            skips.append(x)
        for up, dec, skip in zip(self.up, self.dec, reversed(skips[:-1]), strict=True):
            x = dec(torch.cat([up(x), skip], dim=1))
        return self.head(x)


class ConvIN(nn.Module):
    """Reflection-padded conv, InstanceNorm2d(affine=True), optional ReLU; ``upsample``:
    nearest 2x before the conv."""

    def __init__(self, cin, cout, k, stride=1, relu=True, upsample=False, track=False):
        super().__init__()
        self.upsample = upsample
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, padding_mode="reflect")
        self.norm = nn.InstanceNorm2d(cout, affine=True, track_running_stats=track)
        self.relu = relu

    def forward(self, x):
        if self.upsample:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        x = self.norm(self.conv(x))
        return F.relu(x) if self.relu else x


class Residual(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.a = ConvIN(c, c, 3)
        self.b = ConvIN(c, c, 3, relu=False)

    def forward(self, x):
        return x + self.b(self.a(x))


class StyleNet(nn.Module):
    """Johnson et al. (2016) with instance norm (the PyTorch examples' fast_neural_style):
    9x9 conv 32, 3x3/2 conv 64, 3x3/2 conv 128, five residual blocks, two upsampling convs,
    9x9 conv 3; 15 InstanceNorm2d(affine=True). ``track_up``: the two upsampling norms track
    running statistics."""

    def __init__(self, width=32, blocks=5, track_up=False):
        super().__init__()
        w = width
        self.down = nn.Sequential(
            ConvIN(3, w, 9), ConvIN(w, 2 * w, 3, 2), ConvIN(2 * w, 4 * w, 3, 2)
        )
        self.res = nn.Sequential(*[Residual(4 * w) for _ in range(blocks)])
        self.up = nn.Sequential(
            ConvIN(4 * w, 2 * w, 3, upsample=True, track=track_up),
            ConvIN(2 * w, w, 3, upsample=True, track=track_up),
        )
        self.out = nn.Conv2d(w, 3, 9, 1, 4, padding_mode="reflect")

    def forward(self, x):
        return self.out(self.up(self.res(self.down(x))))
