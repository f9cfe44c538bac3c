"""The float16 element conversions, exhaustively: both implementations (hardware F16C and the
portable integer one) against NumPy, and the import-time choice between them."""

from __future__ import annotations

import re

import numba
import numpy as np
import pytest
from conftest import run_python

from instnorm_numba._kernels import elements as K  # the element conversions

IMPLS = [
    pytest.param("soft", id="soft"),
    pytest.param(
        "f16c",
        id="f16c",
        marks=pytest.mark.skipif(not K.HAS_F16C, reason="Numba does not compile for F16C here"),
    ),
]

_loops = {}


def loops(impl):
    """(to64 over an array, to-half over an array) as jitted loops calling ``impl``'s pair."""
    if impl not in _loops:
        h2d = getattr(K, "half_to_f64_" + impl)
        d2h = getattr(K, "f64_to_half_" + impl)

        @numba.njit
        def widen(h, out):
            for i in range(h.shape[0]):
                out[i] = h2d(h[i])

        @numba.njit
        def narrow(v, out):
            for i in range(v.shape[0]):
                out[i] = d2h(v[i])

        _loops[impl] = widen, narrow
    return _loops[impl]


ALL_HALF = np.arange(1 << 16, dtype=np.uint16)


def narrow_cases():
    """Every float16 value, every midpoint (ties) and its float64 neighbours, the overflow
    threshold, the subnormal range, zeros, infinities, NaNs and 10**6 random doubles."""
    h = ALL_HALF.view(np.float16).astype(np.float64)
    fin = np.unique(h[np.isfinite(h)])  # sorted; -0.0 and 0.0 are one value
    mid = (fin[:-1] + fin[1:]) / 2  # exact in float64
    top = np.array([65504.0, 65519.0, 65520.0, 65536.0, 1e5, 3.4e38, 3.5e38, 1e300, 1.7e308])
    near_top = np.concatenate([top, np.nextafter(top, 0), np.nextafter(top, np.inf)])
    tiny = np.array([2.0**-24, 2.0**-25, 3 * 2.0**-26, 2.0**-14, 2.0**-15, 1e-40, 1e-45, 1e-300])
    near_tiny = np.concatenate([tiny, np.nextafter(tiny, 0), np.nextafter(tiny, 1), [5e-324]])
    specials = np.array([0.0, np.inf, np.nan])
    r = np.random.default_rng(20240616)
    n = 10**6
    # random significands over float16's exponent range and well beyond (2**-60 .. 2**40)
    scaled = r.uniform(1.0, 2.0, n) * np.exp2(r.integers(-60, 41, n).astype(np.float64))
    # random float64 bit patterns: every exponent, NaN payloads included
    raw = r.integers(0, 1 << 63, n // 10, dtype=np.int64).view(np.float64)
    pos = np.concatenate(
        [fin, mid, np.nextafter(mid, -np.inf), np.nextafter(mid, np.inf), near_top, near_tiny]
    )
    pos = pos[pos >= 0]
    out = np.concatenate([pos, -pos, specials, -specials, scaled * r.choice([-1.0, 1.0], n), raw])
    return out


CASES = narrow_cases()


def expected_half(v):
    with np.errstate(over="ignore", invalid="ignore"):
        return v.astype(np.float16).view(np.uint16)


@pytest.mark.parametrize("impl", IMPLS)
def test_half_to_f64_all_patterns(impl):
    widen, _ = loops(impl)
    out = np.empty(ALL_HALF.size)
    widen(ALL_HALF, out)
    expect = ALL_HALF.view(np.float16).astype(np.float64)
    np.testing.assert_array_equal(out, expect)  # NaNs compare equal in position
    # signs of zeros, infinities and NaNs survive
    np.testing.assert_array_equal(np.signbit(out), ALL_HALF >= 0x8000)


@pytest.mark.parametrize("impl", IMPLS)
def test_f64_to_half_correctly_rounded(impl):
    _, narrow = loops(impl)
    out = np.empty(CASES.size, np.uint16)
    narrow(CASES, out)
    expect = expected_half(CASES)
    nan = np.isnan(CASES)
    assert nan.sum() > 2
    assert np.isnan(out[nan].view(np.float16)).all()
    bad = np.flatnonzero((out != expect) & ~nan)
    assert bad.size == 0, [(float(CASES[i]).hex(), hex(out[i]), hex(expect[i])) for i in bad[:10]]


@pytest.mark.parametrize("impl", IMPLS)
def test_f64_to_half_ties_both_parities(impl):
    # midpoints between adjacent float16 values go to the even neighbour, below and above 1,
    # in the subnormal range, and at the top (65520 -> inf)
    _, narrow = loops(impl)
    v = np.array([1 + 2.0**-11, 1 + 3 * 2.0**-11, 2.0**-25, 3 * 2.0**-25, 65520.0, 65488.0])
    v = np.concatenate([v, -v])
    out = np.empty(v.size, np.uint16)
    narrow(v, out)
    expect = np.array([0x3C00, 0x3C02, 0x0000, 0x0002, 0x7C00, 0x7BFE], np.uint16)
    np.testing.assert_array_equal(out, np.concatenate([expect, expect | 0x8000]))


@pytest.mark.skipif(not K.HAS_F16C, reason="Numba does not compile for F16C here")
def test_f16c_loops_vectorize():
    # the hardware conversions run on whole vectors (ymm/zmm), not one element at a time
    widen, narrow = loops("f16c")
    widen(ALL_HALF[:4], np.empty(4))
    narrow(np.zeros(4), np.empty(4, np.uint16))
    for fn, op in ((widen, "vcvtph2ps"), (narrow, "vcvtps2ph")):
        asm = fn.inspect_asm(fn.signatures[0])
        wide_ops = [ln for ln in asm.splitlines() if op in ln and re.search(r"%[yz]mm", ln)]
        assert wide_ops, f"no vector {op} in the loop"


def test_selected_implementation():
    impl = "f16c" if K.HAS_F16C else "soft"
    assert K.half_to_f64 is getattr(K, "half_to_f64_" + impl)
    assert K.f64_to_half is getattr(K, "f64_to_half_" + impl)


@pytest.mark.parametrize(
    "features, expect",
    [
        ("+avx,+f16c,+sse2", True),
        ("+sse2,+f16c,-avx512fp16,+avx", True),
        ("+avx,-f16c", False),
        ("+avx,+f16c,-f16c", False),
        ("+f16c", False),  # LLVM's f16c needs avx
        ("+avx,+f16c,-avx", False),
        ("", False),  # the CPU name's defaults: not known, so not assumed
    ],
)
def test_feature_detection(monkeypatch, features, expect):
    monkeypatch.setattr(numba.core.config, "CPU_FEATURES", features)
    assert K._target_has_f16c() is expect


def test_generic_cpu_uses_fallback():
    # NUMBA_CPU_NAME=generic compiles for a CPU without F16C: the portable code is chosen
    code = "from instnorm_numba._kernels import elements as K; print(K.HAS_F16C)"
    res = run_python(code, env={"NUMBA_CPU_NAME": "generic"}, unset=["NUMBA_CPU_FEATURES"])
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "False"
