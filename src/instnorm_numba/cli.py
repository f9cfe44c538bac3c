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


def _cache_dir() -> str:
    import instnorm_numba
    from instnorm_numba import _jit

    if os.environ.get("NUMBA_CACHE_DIR"):
        where = os.environ["NUMBA_CACHE_DIR"]
    else:
        pkg = os.path.dirname(instnorm_numba.__file__)
        where = os.path.join(pkg, "__pycache__")
    state = {True: "on", False: "off (no writable location)", None: "on"}[_jit.cache_enabled()]
    return f"{where} [{state}]"


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
        ("threads", str(numba.get_num_threads())),
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
    from . import _bench

    return _bench.main(args)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="instnorm-numba", description="Fast, accurate instance normalization on the CPU."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="versions, threading layer, threads, cache, CPU")
    p_info.set_defaults(func=info)
    p_bench = sub.add_parser("bench", help="time realistic shapes and check them")
    p_bench.add_argument("--quick", action="store_true", help="fewer repeats, smaller suite")
    p_bench.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p_bench.add_argument("--repeat", type=int, default=None, help="timed calls per case")
    p_bench.set_defaults(func=bench)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
