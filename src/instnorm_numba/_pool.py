"""Result arrays that cost no more than ``out=``: a pool that reuses an output buffer once no one
references it any more.

A fresh NumPy array above glibc's mmap threshold (at most 32 MB, and often from 128 KB up) is
made of newly mapped pages: the kernel faults each one in and zeroes it on the first write,
which costs about as much as the normalization itself (3-D ``2x32x64^3`` float32: 4.8 ms
allocating against 2.3 ms with ``out=``).  Peers that reuse their output buffers (OpenVINO,
ONNX Runtime) pay that once.

The pool keeps a reference to each large buffer it hands out (a flat ``uint8`` array; the
caller receives a view of it).  When a later call needs a buffer of the same size, it takes
one whose only reference is the pool's own: every array the caller ever got from it, and
every view of those, is gone, which is exactly when NumPy would have freed the memory.  An
array that anyone still holds (directly, through a view, a memoryview, a ``torch.from_numpy``
tensor...) is never handed out again, so no buffer ever has two owners.

Bounded: the pool tracks at most ``max_buffers`` buffers of ``min_bytes`` to ``max_bytes``
bytes, ``max_bytes`` in all; beyond that it forgets the least recently used ones (free ones
first; a forgotten buffer still held by a caller is freed by NumPy as usual).  The memory it
keeps that no caller holds is therefore at most ``max_bytes`` (default 1 GiB, or the
``INSTNORM_NUMBA_POOL_BYTES`` environment variable).  ``output_pool(max_bytes=0)`` switches it
off: every result is then a fresh ``np.empty``.
"""

from __future__ import annotations

import math
import os
import sys
import threading

import numpy as np

__all__ = ["output_pool", "empty"]

#: arrays smaller than this come from np.empty (malloc reuses small blocks without faults)
MIN_BYTES = 1 << 20
#: default bound on the bytes the pool tracks
DEFAULT_MAX_BYTES = 1 << 30
#: default bound on the buffers the pool tracks
DEFAULT_MAX_BUFFERS = 4


def _env_bytes() -> int:
    raw = os.environ.get("INSTNORM_NUMBA_POOL_BYTES")
    if raw is None:
        return DEFAULT_MAX_BYTES
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(
            f"INSTNORM_NUMBA_POOL_BYTES must be an integer number of bytes; got {raw!r}"
        ) from None
    return max(value, 0)


class _Pool:
    def __init__(self):
        self.lock = threading.Lock()
        self.buffers: list[np.ndarray] = []  # least recently used first
        self.max_bytes = _env_bytes()
        self.max_buffers = DEFAULT_MAX_BUFFERS
        self.min_bytes = MIN_BYTES
        self.reused = 0
        self.allocated = 0

    def _free(self, i: int) -> bool:
        # the list's reference and getrefcount's argument: nobody else holds the buffer
        return sys.getrefcount(self.buffers[i]) == 2

    def _trim(self) -> None:
        bufs = self.buffers
        while len(bufs) > self.max_buffers or sum(b.nbytes for b in bufs) > self.max_bytes:
            free = [i for i in range(len(bufs)) if self._free(i)]
            del bufs[free[0] if free else 0]

    def empty(self, shape, dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        if not self.min_bytes <= nbytes <= self.max_bytes or self.max_buffers < 1:
            return np.empty(shape, dtype)
        with self.lock:
            bufs = self.buffers
            for i in range(len(bufs)):
                if bufs[i].nbytes == nbytes and self._free(i):
                    buf = bufs.pop(i)
                    bufs.append(buf)
                    self.reused += 1
                    return buf.view(dtype).reshape(shape)
            buf = np.empty(nbytes, np.uint8)
            bufs.append(buf)
            self.allocated += 1
            self._trim()
            return buf.view(dtype).reshape(shape)

    def stats(self) -> dict:
        with self.lock:
            held = [not self._free(i) for i in range(len(self.buffers))]
            return {
                "max_bytes": self.max_bytes,
                "max_buffers": self.max_buffers,
                "min_bytes": self.min_bytes,
                "buffers": len(self.buffers),
                "bytes": sum(b.nbytes for b in self.buffers),
                "free_bytes": sum(
                    b.nbytes for b, h in zip(self.buffers, held, strict=True) if not h
                ),
                "reused": self.reused,
                "allocated": self.allocated,
            }


_POOL = _Pool()


def empty(shape, dtype) -> np.ndarray:
    """An uninitialised result array: from the pool when it is large enough, else np.empty."""
    return _POOL.empty(shape, dtype)


def _count(value, name: str) -> int:
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer; got {value!r}")
    value = int(value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0; got {value}")
    if value > _INT64_MAX:
        raise ValueError(f"{name} must be at most 2**63 - 1; got {value}")
    return value


_INT64_MAX = (1 << 63) - 1


def output_pool(*, max_bytes=None, max_buffers=None, min_bytes=None) -> dict:
    """Configure, or look at, the pool that reuses large result arrays.

    Results of :func:`instance_norm` and :func:`instance_norm_backward` called without
    ``out=`` come from a pool: a buffer is reused only once nothing references any array it
    was handed out as (as NumPy would have freed it), so a fresh result costs what ``out=``
    costs instead of the page faults of new memory.  The pool tracks at most ``max_buffers``
    buffers of ``min_bytes`` to ``max_bytes`` bytes and ``max_bytes`` in all, so the memory it
    keeps that no caller holds is at most ``max_bytes``.

    Parameters
    ----------
    max_bytes : int, optional
        Bound on the bytes tracked (default 1 GiB, or ``INSTNORM_NUMBA_POOL_BYTES``);
        0 switches the pool off and releases what it keeps.
    max_buffers : int, optional
        Bound on the buffers tracked (default 4).
    min_bytes : int, optional
        Smaller results come from ``np.empty`` (default 1 MiB).

    Returns
    -------
    dict
        The settings after the change, and ``buffers``, ``bytes``, ``free_bytes`` (kept, held
        by no caller), ``reused`` and ``allocated`` (counts since the process started).

    Examples
    --------
    >>> import numpy as np
    >>> from instnorm_numba import instance_norm, output_pool
    >>> before = output_pool()
    >>> x = np.ones((1, 64, 64, 64), np.float32)
    >>> y = instance_norm(x)                     # 1 MiB: from the pool
    >>> del y                                    # no one holds it: free for the next call
    >>> y = instance_norm(x)
    >>> output_pool()["reused"] - before["reused"]
    1
    >>> settings = output_pool(max_bytes=0)      # off: every result is a fresh np.empty
    >>> y = instance_norm(x)
    >>> settings["buffers"], output_pool()["buffers"]
    (0, 0)
    >>> _ = output_pool(max_bytes=before["max_bytes"])
    """
    given = {"max_bytes": max_bytes, "max_buffers": max_buffers, "min_bytes": min_bytes}
    checked = {k: _count(v, k) for k, v in given.items() if v is not None}  # all, before any
    with _POOL.lock:
        for k, v in checked.items():
            setattr(_POOL, k, v)
        _POOL._trim()
    return _POOL.stats()
