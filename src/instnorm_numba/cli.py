"""Command line: ``instnorm-numba info`` and ``instnorm-numba bench`` (also ``python -m
instnorm_numba``).  Built on the public API only."""

from __future__ import annotations

import argparse
import os
import platform
import sys


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _numba_cache_path() -> str | None:
    """The directory Numba's cache locator chose for the kernels (in the package, under
    NUMBA_CACHE_DIR, or the user-wide cache), asked of a kernel's own cache object."""
    from instnorm_numba import _jit
    from instnorm_numba import _kernels as K

    for obj in vars(K).values():
        disp = obj.parallel if isinstance(obj, _jit.ParallelKernel) else obj
        path = getattr(getattr(disp, "_cache", None), "_cache_path", None)
        if isinstance(path, str):
            return path
    return None


def _cache_dir() -> str:
    from instnorm_numba import _jit

    if _jit.cache_enabled() is False:
        return "none: kernels compile in memory (no writable location; set NUMBA_CACHE_DIR)"
    where = _numba_cache_path()
    if where is None:  # pragma: no cover - Numba's private cache attributes moved
        return "on (location unknown to this Numba version)"
    return f"{where} [on]"


def _cpu_kernels() -> str:
    """Which CPU-dependent kernels this process compiles (chosen once, from Numba's target)."""
    from instnorm_numba import _kernels as K

    f16 = "F16C" if K.HAS_F16C else "integer (no F16C)"
    vec = "on (AVX2)" if K.HAS_SIMD_ROWS else "off (no AVX2: the general loops)"
    return f"float16 conversions {f16}; vector kernels {vec}"


def info(args) -> int:
    import numba
    import numpy as np

    import instnorm_numba
    from instnorm_numba import _jit

    rows = [
        ("instnorm_numba", instnorm_numba.__version__),
        ("python", platform.python_version()),
        ("numpy", np.__version__),
        ("numba", numba.__version__),
        ("threading layer", _jit.describe()),
        ("threads", str(_jit.num_threads())),
        ("cache directory", _cache_dir()),
        ("cpu", f"{_cpu_name()} ({os.cpu_count()} logical cores)"),
        ("cpu kernels", _cpu_kernels()),
        ("platform", platform.platform()),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


def bench(args) -> int:
    if args.contended:
        from . import _contention

        return _contention.main(args)
    from . import _bench

    return _bench.main(args)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1; got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1; got {value}")
    return value


def _writable_path(text: str) -> str:
    """A path the results can be written to, checked before any work (no file created)."""
    path = os.path.abspath(text)
    parent = os.path.dirname(path)
    if os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{text!r} is a directory")
    if not os.path.isdir(parent):
        raise argparse.ArgumentTypeError(f"{text!r}: directory {parent!r} does not exist")
    target = path if os.path.exists(path) else parent
    if not os.access(target, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text!r} cannot be written (permission denied)")
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="instnorm-numba", description="Fast, accurate instance normalization on the CPU."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="versions, threading layer, threads, cache, CPU")
    p_info.set_defaults(func=info)
    p_bench = sub.add_parser("bench", help="time realistic shapes and check them")
    p_bench.add_argument("--quick", action="store_true", help="fewer repeats, smaller suite")
    p_bench.add_argument(
        "--json", metavar="PATH", type=_writable_path, help="also write the results as JSON"
    )
    p_bench.add_argument(
        "--repeat", type=_positive_int, default=None, help="timed calls per case (>= 1)"
    )
    p_bench.add_argument(
        "--contended",
        action="store_true",
        help="time each case idle and beside one busy-loop process per core",
    )
    p_bench.set_defaults(func=bench)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
