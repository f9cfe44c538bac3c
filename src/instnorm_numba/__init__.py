"""instnorm_numba: fast, accurate instance normalization on the CPU.

Numba-compiled parallel kernels under a NumPy-shaped API.  Nothing is compiled at import:
each kernel compiles (or loads from the on-disk cache) at its first use.
"""

from ._api import instance_norm, instance_norm_backward
from ._moments_api import (
    Moments,
    instance_moments,
    merge_moments,
    moments_to_stats,
    normalize_with_stats,
)
from ._pool import output_pool
from .layers import InstanceNorm, InstanceNorm1d, InstanceNorm2d, InstanceNorm3d

__version__ = "0.1.0"

__all__ = [
    "instance_norm",
    "instance_norm_backward",
    "output_pool",
    "InstanceNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "Moments",
    "instance_moments",
    "merge_moments",
    "moments_to_stats",
    "normalize_with_stats",
    "__version__",
]
