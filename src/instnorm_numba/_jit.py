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

import ctypes
import importlib.metadata
import os
import re
import threading
import types
import warnings

import numba

__all__ = ["kernel", "dispatch", "threading_layer", "num_threads", "describe", "cache_enabled"]

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
#
# Which layer, and why (measured on Linux, Numba 0.68; see README "Reliability"):
#
# * ``tbb`` is thread-safe and fork-safe.  Numba picks it first when it can load libtbb, but
#   the PyPI ``tbb`` wheel installs ``libtbb.so.12`` into ``<prefix>/lib``, where Numba's
#   ``tbbpool`` extension cannot find it: without help Numba silently falls back to ``omp``,
#   and ``NUMBA_THREADING_LAYER=tbb`` fails outright.  So, when the ``tbb`` distribution is
#   installed (``pip install "instnorm_numba[tbb]"``) and the caller's Numba configuration
#   allows tbb, the library loads that libtbb (RTLD_GLOBAL) just before the thread pool is
#   first launched, and Numba then picks tbb by its own rules.
# * ``omp`` (GNU OpenMP, the default without tbb) is thread-safe, but a child forked after the
#   parent ran a parallel region is terminated at its first one.  A forked child of such a
#   parent runs the serial twins instead (same arithmetic, same results).
# * ``workqueue`` aborts the process when two threads enter it: one caller at a time gets the
#   pool, concurrent callers run the serial twin in their own thread.
# * No layer loadable (e.g. ``NUMBA_THREADING_LAYER=tbb`` with no tbb anywhere): one warning,
#   then serial kernels, rather than an exception from every call.
#
# The library never calls ``numba.set_num_threads``: the caller's (thread-local) count is read
# for planning and honoured by Numba inside the parallel kernels.

_state_lock = threading.Lock()
_workqueue_lock = threading.Lock()
_layer: str | None = None
_forked_unsafe = False
_tbb_preloaded: str | None = None

#: values of NUMBA_THREADING_LAYER under which Numba may choose tbb
_TBB_ELIGIBLE = ("default", "safe", "threadsafe", "forksafe", "tbb")
#: the oldest oneTBB Numba accepts (TBB_INTERFACE_VERSION 12060)
_TBB_MIN_VERSION = (2021, 6)
_LIBTBB_NAMES = ("libtbb.so.12", "libtbb.12.dylib", "tbb12.dll")
#: the value of ``threading_layer()`` when no Numba layer could be loaded
NO_LAYER = "none (serial)"


def _pool_launched() -> bool:
    try:
        from numba.np.ufunc import parallel as _numba_parallel

        return bool(_numba_parallel._is_initialized)
    except (ImportError, AttributeError):  # pragma: no cover - private API moved
        return _layer is not None


def _libtbb_path() -> str | None:
    """The libtbb of the installed PyPI ``tbb`` distribution, if any and recent enough."""
    try:
        dist = importlib.metadata.distribution("tbb")
    except importlib.metadata.PackageNotFoundError:
        return None
    parts = tuple(int(p) for p in re.findall(r"\d+", dist.version or "")[:2])
    if len(parts) < 2 or parts < _TBB_MIN_VERSION:
        return None
    for f in dist.files or ():
        if f.name in _LIBTBB_NAMES:
            path = os.path.abspath(str(dist.locate_file(f)))
            if os.path.isfile(path):
                return path
    return None


def _preload_tbb() -> str | None:
    """Load pip's libtbb so that Numba can choose its tbb layer; the path loaded, or None.

    Does nothing once Numba's pool is running (the layer is then fixed) or when the caller
    configured a layer that excludes tbb (``NUMBA_THREADING_LAYER=omp`` or ``workqueue``, or
    a priority putting another layer first, which Numba still honours).
    """
    global _tbb_preloaded
    if _pool_launched():
        return None
    if str(numba.config.THREADING_LAYER).lower() not in _TBB_ELIGIBLE:
        return None
    path = _libtbb_path()
    if path is None:
        return None
    try:
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError:
        return None
    _tbb_preloaded = path
    return path


def _after_fork_in_child():
    # GNU OpenMP's thread pool does not survive fork(): a child that starts a parallel region
    # after the parent already ran one is terminated.  From then on this process runs serial
    # kernels.  tbb and workqueue are fork-safe.  Checked against Numba's own state, so a pool
    # that the host program (not this library) launched counts too.
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
    """The Numba threading layer in use, launching the thread pool if needed.

    ``NO_LAYER`` when Numba could load none (kernels then run serially).
    """
    global _layer
    if _layer is None:
        with _state_lock:
            if _layer is None:
                _preload_tbb()
                try:
                    numba.get_num_threads()  # launches Numba's thread pool
                    layer = numba.threading_layer()
                except ValueError as exc:  # "No threading layer could be loaded"
                    warnings.warn(
                        "instnorm_numba: Numba could not load a threading layer "
                        f"(NUMBA_THREADING_LAYER={numba.config.THREADING_LAYER!r}: "
                        f"{str(exc).splitlines()[0]}); kernels will run serially.",
                        RuntimeWarning,
                        stacklevel=3,
                    )
                    layer = NO_LAYER
                _layer = layer
    return _layer


def describe() -> str:
    """``threading_layer()`` with what this process does with it (for ``instnorm-numba info``)."""
    layer = threading_layer()
    notes = []
    if _tbb_preloaded and layer == "tbb":
        notes.append(f"libtbb from the tbb package: {_tbb_preloaded}")
    if _forked_unsafe:
        notes.append("serial in this process: forked after GNU OpenMP ran")
    elif layer == "workqueue":
        notes.append("not thread-safe: one caller at a time runs in parallel")
    return layer + (f" ({'; '.join(notes)})" if notes else "")


def num_threads() -> int:
    """The caller's Numba thread count (thread-local, never changed here); 1 with no layer."""
    if threading_layer() == NO_LAYER:
        return 1
    return numba.get_num_threads()


def parallel_allowed() -> bool:
    return not _forked_unsafe and threading_layer() != NO_LAYER


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
    if layer == NO_LAYER:
        return pk.serial(*args)
    return pk.parallel(*args)
