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

The threading state is decided once (``threading_layer``) and read without a lock afterwards;
what must not be interrupted by a signal handler's exception (the pool launch, a kernel's
first compilation) runs in a helper thread (``outside_signals``).
"""

from __future__ import annotations

import contextlib
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
    global _forked_unsafe, _workqueue_lock, _state_lock, _launcher
    _workqueue_lock = threading.Lock()
    _state_lock = threading.Lock()
    if _layer is None:  # a launch thread of the parent does not exist here
        _launcher = None
    if _pool_launched():
        try:
            layer = numba.threading_layer()
        except ValueError:  # pragma: no cover
            layer = None
        if layer not in ("tbb", "workqueue"):
            _forked_unsafe = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _lockfree_thread_count():
    """Numba's own getter of the caller's thread count, without ``numba.get_num_threads``'s
    two locks (a ``multiprocessing.RLock`` whose Python-level ``__enter__`` a signal handler
    can interrupt after the acquire: the lock then stays held and every later call from
    another thread hangs).  None when Numba's private name moved (then the public call)."""
    try:
        from numba.np.ufunc import parallel as _numba_parallel

        fn = _numba_parallel._get_num_threads
    except (ImportError, AttributeError):  # pragma: no cover - private API moved
        return None
    return fn if callable(fn) else None


#: the caller's own OpenMP spin settings, honoured as given
_OMP_SPIN_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def _libgomp_loaded() -> bool | None:
    """Whether a GNU OpenMP runtime is already mapped in this process (None: cannot tell)."""
    try:
        with open("/proc/self/maps") as f:
            return "libgomp" in f.read()
    except OSError:
        return None


@contextlib.contextmanager
def _passive_openmp(enabled: bool):
    """``OMP_WAIT_POLICY=PASSIVE`` for the GNU OpenMP runtime Numba's ``omp`` layer loads now.

    GNU OpenMP's idle workers spin for ~0.3 s before sleeping.  With another process keeping
    the cores busy, every parallel region then waits for spinning threads that the kernel
    has descheduled: one small call measured ~30x slower than with tbb (README "Reliability:
    under load").  libgomp reads the variable once, when it is loaded, so it is set only
    around the pool's launch and removed after: it reaches the runtime Numba loads here (only
    if no libgomp is loaded yet), not one that another library loaded before or bundles
    (torch's), and never applies when the caller set ``OMP_WAIT_POLICY`` or
    ``GOMP_SPINCOUNT``.  With the tbb layer (the default install where tbb wheels exist) this
    changes nothing.
    """
    if (
        not enabled
        or any(k in os.environ for k in _OMP_SPIN_SETTINGS)
        or _libgomp_loaded() is not False
    ):
        yield False
        return
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    try:
        yield True
    finally:
        os.environ.pop("OMP_WAIT_POLICY", None)


def _launch() -> None:
    """Launch Numba's pool and record the layer (or the reason none loads).  Runs in a helper
    thread: Python runs signal handlers in the main thread only, so a Ctrl-C or SIGALRM
    exception can never land inside Numba's initialisation locks."""
    global _layer_or_error, _thread_count, _omp_passive
    preloaded = _preload_tbb()
    try:
        with _passive_openmp(enabled=preloaded is None) as passive:
            numba.get_num_threads()  # launches Numba's thread pool
        layer = numba.threading_layer()
        _omp_passive = passive and layer == "omp"
    except ValueError as exc:  # "No threading layer could be loaded"
        _layer_or_error = ("error", str(exc).splitlines()[0])
        return
    _thread_count = _lockfree_thread_count() or numba.get_num_threads
    _layer_or_error = ("layer", layer)


_layer_or_error: tuple | None = None
_omp_passive = False  # the omp layer runs with OMP_WAIT_POLICY=PASSIVE set by _passive_openmp
_thread_count = None  # the thread-count getter once the pool runs
_launcher: threading.Thread | None = None


def threading_layer() -> str:
    """The Numba threading layer in use, launching the thread pool if needed.

    ``NO_LAYER`` when Numba could load none (kernels then run serially).  Determined once;
    later calls read a module global, no lock.
    """
    global _layer, _launcher
    if _layer is not None:
        return _layer
    with _state_lock:
        if _layer is None:
            if _launcher is None:
                _launcher = threading.Thread(target=_launch, name="instnorm_numba launch")
                _launcher.daemon = True
                _launcher.start()
            # an interrupt here leaves the launch running; the next call waits for it again
            _launcher.join()
            kind, value = _layer_or_error or ("error", "the launch did not finish")
            if kind == "error":
                warnings.warn(
                    "instnorm_numba: Numba could not load a threading layer "
                    f"(NUMBA_THREADING_LAYER={numba.config.THREADING_LAYER!r}: "
                    f"{value}); kernels will run serially.",
                    RuntimeWarning,
                    stacklevel=3,
                )
                value = NO_LAYER
            _layer = value
    return _layer


def outside_signals(fn, *args, **kws):
    """``fn(*args, **kws)`` where no signal handler can interrupt it, with its result or error.

    Python runs signal handlers (Ctrl-C's KeyboardInterrupt, a SIGALRM timeout) in the main
    thread only: there ``fn`` runs in a helper thread that the caller waits for.  An interrupt
    then ends the wait, not ``fn``, which finishes and leaves its state whole.  Other threads
    call ``fn`` directly.
    """
    if threading.current_thread() is not threading.main_thread():
        return fn(*args, **kws)
    box = {}

    def run():
        try:
            box["value"] = fn(*args, **kws)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller below
            box["error"] = exc

    helper = threading.Thread(target=run, name="instnorm_numba compile", daemon=True)
    helper.start()
    helper.join()
    if "error" in box:
        raise box.pop("error")
    return box["value"]


def shield_compilation(objects) -> None:
    """Compile (or load from the cache) each kernel among ``objects`` outside signals.

    Numba's compiler is not safe against an exception raised at an arbitrary point: a
    KeyboardInterrupt inside its typing-registry generators leaves them exhausted, and every
    later compilation in the process fails with "generator raised StopIteration".  Numba's
    dispatcher calls its ``_compile_for_args`` method (looked up on the instance) whenever
    no compiled version matches the arguments; wrapped here, the first call of each
    signature compiles in ``outside_signals``.  Calls that find a compiled version are
    untouched.
    """
    for obj in objects:
        for disp in (obj.parallel, obj.serial) if isinstance(obj, ParallelKernel) else (obj,):
            if not isinstance(disp, numba.core.registry.CPUDispatcher):
                continue
            if disp.__dict__.get("_instnorm_shielded"):
                continue
            compile_for_args = disp._compile_for_args

            def shielded(*args, _compile=compile_for_args, **kws):
                return outside_signals(_compile, *args, **kws)

            disp._compile_for_args = shielded
            disp._instnorm_shielded = True


def jit_disabled() -> bool:
    """``NUMBA_DISABLE_JIT=1``: kernels run as plain Python (debugging)."""
    return bool(numba.config.DISABLE_JIT)


def describe() -> str:
    """``threading_layer()`` with what this process does with it (for ``instnorm-numba info``)."""
    layer = threading_layer()
    notes = []
    if _tbb_preloaded and layer == "tbb":
        notes.append(f"libtbb from the tbb package: {_tbb_preloaded}")
    if _omp_passive:
        notes.append("OMP_WAIT_POLICY=PASSIVE for its pool; pip install tbb for the tbb layer")
    if _forked_unsafe:
        notes.append("serial in this process: forked after GNU OpenMP ran")
    elif layer == "workqueue":
        notes.append("not thread-safe: one caller at a time runs in parallel")
    return layer + (f" ({'; '.join(notes)})" if notes else "")


def num_threads() -> int:
    """The caller's Numba thread count (thread-local, never changed here); 1 with no layer.

    Called on every API call: after the first, no lock is taken (see ``_lockfree_thread_count``).
    """
    if threading_layer() == NO_LAYER:
        return 1
    n = _thread_count()
    return n if n > 0 else numba.get_num_threads()


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
