"""Compilation and threading policy shared by every kernel.

Three jobs live here, and nothing else:

* ``kernel(...)``: the one decorator the ``_kernels`` package uses, with one of the named
  fast-math flag sets (``FM_STRICT``, ``FM_REDUCE``, ``FM_APPLY``).  It compiles lazily (never
  at import), and for parallel kernels also builds a serial twin from the same source
  (``prange`` runs as ``range``).
* The on-disk cache, made safe for a package of many files.  Numba checks a cached kernel only
  against the source file of the kernel itself (Numba issue #1833): a change to a helper in
  another module, or to the options in ``_decorate`` below, would leave stale machine code.
  Every kernel's cache is therefore stamped with one hash of the contents of every module of
  ``_kernels`` and of this file (``SOURCE_STAMP``), through a cache class installed on each
  dispatcher by the decorator (no process-wide Numba setting is changed).  When the stamp
  differs from the one a cache index was written with, Numba drops that index and recompiles,
  as it does when a kernel's own file changes.  Without a writable cache directory, or if
  Numba's private caching classes change shape, kernels compile in memory, with one warning.
* ``dispatch(...)``: the one place the API decides between the parallel kernel and its serial
  twin: small inputs, a forked child of a parent whose OpenMP pool is live, and concurrent
  callers on Numba's non-thread-safe ``workqueue`` layer all take the serial twin.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.metadata
import os
import re
import threading
import types
import warnings

import numba

__all__ = [
    "FM_APPLY",
    "FM_REDUCE",
    "FM_STRICT",
    "kernel",
    "dispatch",
    "threading_layer",
    "num_threads",
    "describe",
    "cache_enabled",
]

# Fast-math flag sets, one per kind of loop; every kernel names one of them.
#: strict IEEE arithmetic: shifts, merges, compensation, anything that must not be reassociated
FM_STRICT = frozenset()
#: block sums: reassociation is what lets the reductions vectorize
FM_REDUCE = frozenset({"reassoc", "nsz", "contract"})
#: the apply ``y = d * a + b``: one fused multiply-add
FM_APPLY = frozenset({"contract"})
FLAG_SETS = {"FM_STRICT": FM_STRICT, "FM_REDUCE": FM_REDUCE, "FM_APPLY": FM_APPLY}

_cache_warned = False
_cache_enabled: bool | None = None
_StampedCache = None


def cache_enabled() -> bool | None:
    """True when kernels are cached on disk, False when that was impossible, None before any."""
    return _cache_enabled


#: the files whose contents can change a kernel's machine code
_STAMPED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_kernels")


def _source_stamp() -> str:
    """One hash of every module of ``_kernels`` and of this file (contents, not mtimes)."""
    h = hashlib.sha256()
    files = sorted(f for f in os.listdir(_STAMPED_DIR) if f.endswith(".py"))
    for path in [os.path.abspath(__file__)] + [os.path.join(_STAMPED_DIR, f) for f in files]:
        with open(path, "rb") as fh:
            h.update(os.path.basename(path).encode() + b"\0" + fh.read() + b"\0")
    return h.hexdigest()


#: the stamp every kernel's cache index carries beside Numba's own (the kernel file's mtime/size)
SOURCE_STAMP = _source_stamp()


def _stamped_cache_class():
    """A ``numba.core.caching.FunctionCache`` whose index carries ``SOURCE_STAMP`` too.

    Private Numba API (pinned by ``tests/test_cache.py``): ``Cache.__init__`` builds
    ``self._cache_file = IndexDataCacheFile(cache_path, filename_base, source_stamp)`` from
    its locator's ``get_source_stamp()``; the subclass rebuilds it with the pair
    ``(Numba's stamp, SOURCE_STAMP)``.  ``IndexDataCacheFile`` drops an index whose stamp
    differs, so a changed helper module or decorator option means recompilation.
    """
    from numba.core.caching import FunctionCache, IndexDataCacheFile

    class StampedFunctionCache(FunctionCache):
        def __init__(self, py_func):
            super().__init__(py_func)
            self._cache_file = IndexDataCacheFile(
                cache_path=self._cache_path,
                filename_base=self._impl.filename_base,
                source_stamp=(self._impl.locator.get_source_stamp(), SOURCE_STAMP),
            )

    return StampedFunctionCache


def _warn_no_cache(reason: str) -> None:
    global _cache_warned
    if not _cache_warned:
        _cache_warned = True
        warnings.warn(
            f"instnorm_numba: {reason}; kernels will be compiled in memory at first use in "
            "every process.",
            RuntimeWarning,
            stacklevel=5,
        )


_NO_DIR = (
    "no writable cache directory (package directory, NUMBA_CACHE_DIR and ~/.cache are all "
    "read-only). Set NUMBA_CACHE_DIR to a writable directory to cache them"
)


def _decorate(func, **options):
    global _cache_enabled, _StampedCache
    dispatcher = numba.njit(cache=False, error_model="numpy", **options)(func)
    if _cache_enabled is False:
        return dispatcher
    try:
        if _StampedCache is None:
            _StampedCache = _stamped_cache_class()
        dispatcher._cache = _StampedCache(dispatcher.py_func)
    except RuntimeError as exc:  # numba: "cannot cache function ...: no locator available"
        if "cache" not in str(exc):
            raise
        _cache_enabled = False
        _warn_no_cache(_NO_DIR)
        return dispatcher
    except (ImportError, AttributeError, TypeError) as exc:  # Numba's private API moved
        _cache_enabled = False
        _warn_no_cache(f"Numba's caching internals changed ({type(exc).__name__}: {exc})")
        return dispatcher
    _cache_enabled = True
    return dispatcher


def _renamed(func, suffix):
    """A copy of ``func`` under another name, so its cache file does not collide."""
    clone = types.FunctionType(
        func.__code__, func.__globals__, func.__name__ + suffix, func.__defaults__, func.__closure__
    )
    clone.__qualname__ = func.__qualname__ + suffix
    clone.__module__ = func.__module__
    clone.__doc__ = func.__doc__
    return clone


def _numba_fastmath(flags: frozenset):
    """A named flag set as Numba takes it (a plain set, or False for none)."""
    return set(flags) if flags else False


class ParallelKernel:
    """A parallel kernel and its serial twin, compiled from the same source."""

    def __init__(self, func, fastmath):
        self.__name__ = func.__name__
        self.__doc__ = func.__doc__
        fm = _numba_fastmath(fastmath)
        self.parallel = _decorate(func, parallel=True, fastmath=fm, nogil=True)
        self.serial = _decorate(_renamed(func, "_serial"), fastmath=fm, nogil=True)

    def __call__(self, *args):
        return self.parallel(*args)


def kernel(*, fastmath, parallel=False):
    """Decorator for kernels: ``fastmath`` is one of the named flag sets (``FLAG_SETS``)."""
    if not any(fastmath is v for v in FLAG_SETS.values()):
        raise ValueError(
            f"fastmath must be one of the named flag sets {sorted(FLAG_SETS)}; got {fastmath!r} "
            "(fastmath=True assumes no NaN/Inf and breaks NaN handling)"
        )

    def wrap(func):
        if parallel:
            return ParallelKernel(func, fastmath)
        return _decorate(func, fastmath=_numba_fastmath(fastmath), nogil=True)

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
