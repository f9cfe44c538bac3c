"""Compilation and threading policy shared by every kernel.

Two jobs live here, and nothing else:

* ``kernel(...)``: the one decorator ``_kernels.py`` uses.  It compiles lazily (never at
  import), caches on disk when a cache directory is writable and falls back to in-memory
  compilation with a single warning when none is, and for parallel kernels also builds a
  serial twin from the same source (``prange`` runs as ``range``).
* ``dispatch(...)``: the one place the API decides between the parallel kernel and its serial
  twin: small inputs, a forked child of a parent whose OpenMP pool is live, and concurrent
  callers on Numba's non-thread-safe ``workqueue`` layer all take the serial twin.
"""

from __future__ import annotations

import os
import threading
import types
import warnings

import numba

__all__ = ["kernel", "dispatch", "threading_layer", "cache_enabled"]

_cache_warned = False
_cache_enabled: bool | None = None


def cache_enabled() -> bool | None:
    """True when kernels are cached on disk, False when that was impossible, None before any."""
    return _cache_enabled


def _decorate(func, **options):
    global _cache_warned, _cache_enabled
    try:
        dispatcher = numba.njit(cache=True, error_model="numpy", **options)(func)
        if _cache_enabled is None:
            _cache_enabled = True
        return dispatcher
    except RuntimeError as exc:  # numba: "cannot cache function ...: no locator available"
        if "cache" not in str(exc):
            raise
        _cache_enabled = False
        if not _cache_warned:
            _cache_warned = True
            warnings.warn(
                "instnorm_numba: no writable cache directory (package directory, "
                "NUMBA_CACHE_DIR and ~/.cache are all read-only); kernels will be compiled "
                "in memory at first use in every process. Set NUMBA_CACHE_DIR to a writable "
                "directory to cache them.",
                RuntimeWarning,
                stacklevel=4,
            )
        return numba.njit(cache=False, error_model="numpy", **options)(func)


def _renamed(func, suffix):
    """A copy of ``func`` under another name, so its cache file does not collide."""
    clone = types.FunctionType(
        func.__code__, func.__globals__, func.__name__ + suffix, func.__defaults__, func.__closure__
    )
    clone.__qualname__ = func.__qualname__ + suffix
    clone.__module__ = func.__module__
    clone.__doc__ = func.__doc__
    return clone


class ParallelKernel:
    """A parallel kernel and its serial twin, compiled from the same source."""

    def __init__(self, func, fastmath):
        self.__name__ = func.__name__
        self.__doc__ = func.__doc__
        self.parallel = _decorate(func, parallel=True, fastmath=fastmath, nogil=True)
        self.serial = _decorate(_renamed(func, "_serial"), fastmath=fastmath, nogil=True)

    def __call__(self, *args):
        return self.parallel(*args)


def kernel(*, fastmath, parallel=False):
    """Decorator for kernels: ``fastmath`` is an explicit flag set, never True."""
    if fastmath is True:
        raise ValueError("use an explicit fastmath flag set, not True (it breaks NaN handling)")

    def wrap(func):
        if parallel:
            return ParallelKernel(func, fastmath)
        return _decorate(func, fastmath=fastmath, nogil=True)

    return wrap


# --------------------------------------------------------------------------------------------
# threading policy

_state_lock = threading.Lock()
_workqueue_lock = threading.Lock()
_layer: str | None = None
_forked_unsafe = False


def _pool_launched() -> bool:
    try:
        from numba.np.ufunc import parallel as _numba_parallel

        return bool(_numba_parallel._is_initialized)
    except (ImportError, AttributeError):  # pragma: no cover - private API moved
        return _layer is not None


def _after_fork_in_child():
    # GNU OpenMP's thread pool does not survive fork(): a child that starts a parallel region
    # after the parent already ran one dies.  From then on this process runs serial kernels.
    # tbb and workqueue are fork-safe.  Checked against Numba's own state, so a pool that the
    # host program (not this library) launched counts too.
    global _forked_unsafe, _workqueue_lock, _state_lock
    _workqueue_lock = threading.Lock()
    _state_lock = threading.Lock()
    if _pool_launched():
        try:
            layer = numba.threading_layer()
        except ValueError:  # pragma: no cover
            layer = None
        if layer not in ("tbb", "workqueue"):
            _forked_unsafe = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def threading_layer() -> str:
    """The Numba threading layer in use, launching the thread pool if needed."""
    global _layer
    if _layer is None:
        with _state_lock:
            if _layer is None:
                numba.get_num_threads()  # launches Numba's thread pool
                _layer = numba.threading_layer()
    return _layer


def parallel_allowed() -> bool:
    return not _forked_unsafe


def dispatch(pk: ParallelKernel, parallel: bool, *args):
    """Run ``pk`` in parallel when that is wanted and safe, else its serial twin."""
    if not parallel or _forked_unsafe:
        return pk.serial(*args)
    layer = threading_layer()
    if layer == "workqueue":
        # workqueue aborts the process when two threads enter it at once: the first caller
        # gets the pool, concurrent callers compute serially in their own thread.
        if _workqueue_lock.acquire(blocking=False):
            try:
                return pk.parallel(*args)
            finally:
                _workqueue_lock.release()
        return pk.serial(*args)
    return pk.parallel(*args)
