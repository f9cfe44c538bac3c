"""Element conversion and the element expressions every kernel shares.

Element types: float32, float64, and float16 carried as its ``uint16`` bit pattern (Numba cannot
load float16).  ``to64`` widens any of them to float64 exactly, ``cast_like`` rounds a float64
once to the type of an output array (float16 correctly rounded, through a round-to-odd float32
on F16C hosts: Boldo & Melquiond), and ``affine_like`` is the one element expression of a folded
apply, ``(x - M) * a + b``.  ``_sub`` is a subtraction kept out of reach of a reassociating
caller, which must not turn ``sum(x - K)`` into ``sum(x) - n*K``.

The folded apply is used for float32/float16 data while ``|M * a| <= FOLD_LIMIT``: the one
subtraction of ``M = K + c`` costs ``|M * a| * 2**-53`` of ``max(1, |y|)``, far below the 0.5
epsilon (``2**-24``) left after the final rounding.  float16 data is normalized in float32
arithmetic while ``|M * a| <= HALF32_SHIFT`` and ``|b| <= HALF32_BIAS`` (``half32_ok``): see
the comment above those constants for its 0.51-epsilon bound.

Two implementations of each float16 conversion exist, chosen once at import from the CPU
features Numba compiles for (``HAS_F16C``); Numba's cache keys on the CPU name and features, so
a kernel cached with one choice is never loaded by a process that would make the other.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

from .._jit import FM_STRICT, kernel

# --------------------------------------------------------------------------------------------
# element conversion
#
# Two implementations of each float16 conversion, chosen once at import.  With F16C the CPU
# converts in hardware (vcvtph2ps / vcvtps2ph, also on whole vectors); without it LLVM's
# ``half`` conversions become libcalls that Numba's JIT may fail to link, so the integer
# versions (``*_soft``) are used and the ``half`` type is never emitted.


def _target_features() -> dict:
    """The CPU features Numba compiles for, ``{name: enabled}``: from ``NUMBA_CPU_FEATURES``,
    else the host's (which applies ``NUMBA_ENABLE_AVX``); empty when unknown.

    Numba's cache keys on the CPU name and feature string, so a cached kernel compiled with
    one choice is never loaded by a process that would make the other.
    """
    try:
        from numba.core import codegen, config

        features = config.CPU_FEATURES
        if features is None:
            features = codegen.get_host_cpu_features()
        state = {}
        for f in str(features).split(","):  # "+f16c,-avx512fp16,...": the last one wins
            f = f.strip()
            if f[:1] in "+-" and len(f) > 1:
                state[f[1:]] = f[0] == "+"
        return state
    except Exception:  # pragma: no cover - unknown features: the portable code
        return {}


def _target_has_f16c() -> bool:
    """True when the code Numba generates may use F16C; False when unknown."""
    state = _target_features()
    # f16c needs avx in LLVM: "-avx" after "+f16c" would turn it off again
    return state.get("f16c", False) and state.get("avx", False)


#: the kernels use the hardware float16 conversions (decided once, at import)
HAS_F16C = _target_has_f16c()


def _half_widening(to_type, to_ir):
    """An intrinsic: uint16 bit pattern -> ``to_type`` through LLVM's ``half`` (exact; F16C
    hosts only)."""

    @intrinsic
    def widen(typingctx, h):
        def codegen(context, builder, signature, args):
            return builder.fpext(builder.bitcast(args[0], ir.HalfType()), to_ir)

        return to_type(types.uint16), codegen

    return widen


_half_bits_to_f64 = _half_widening(types.float64, ir.DoubleType())
_half_bits_to_f32 = _half_widening(types.float32, ir.FloatType())


@intrinsic
def _f32_to_half_bits(typingctx, f):
    """float32 -> uint16 bit pattern, round to nearest even (``vcvtps2ph``; F16C hosts only)."""
    sig = types.uint16(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return sig, codegen


_TWO_1008 = 2.0**1008


@kernel(fastmath=FM_STRICT)
def half_to_f64_soft(h):
    """IEEE binary16 bit pattern (uint16) -> float64, exactly, without F16C.

    Branch-free, so loops over float16 data vectorize: the 15 magnitude bits are placed at
    the top of a float64's exponent and mantissa fields and rescaled by 2**1008 (exact, also
    for subnormals); an all-ones half exponent becomes the float64 infinity or NaN.
    """
    hi = np.int64(h)
    mag = (hi & 0x7FFF) << 42
    v = np.int64(mag).view(np.float64) * _TWO_1008
    if (hi & 0x7C00) == 0x7C00:
        v = np.int64(mag | 0x7FF0000000000000).view(np.float64)
    if hi & 0x8000:
        v = -v
    return v


@kernel(fastmath=FM_STRICT)
def f64_to_half_soft(v):
    """float64 -> IEEE binary16 bit pattern, rounded to nearest, ties to even, without F16C.

    Branch-free (selects only), so loops writing float16 vectorize.  Normal results round the
    float64 bit pattern directly (a carry into the exponent is the right answer); subnormal
    ones are counted in units of 2**-24 by adding 2**28, whose float64 spacing is 2**-24.
    """
    bits = np.float64(v).view(np.int64)
    a = abs(np.float64(v))
    ab = np.float64(a).view(np.int64)
    hn = ((ab + 0x1FFFFFFFFFF + ((ab >> 42) & 1)) >> 42) - 0xFC000  # (1023 - 15) << 10
    hs = np.float64(a + 268435456.0).view(np.int64) - 0x41B0000000000000  # bits of 2**28
    h = hn if a >= 6.103515625e-05 else hs  # 2**-14, smallest normal
    if a >= 65520.0:  # halfway between 65504 and 2**16 rounds to even: infinity
        h = 0x7C00
    if v != v:
        h = 0x7E00
    elif bits < 0:
        h = h | 0x8000
    return np.uint16(h)


@kernel(fastmath=FM_STRICT)
def half_to_f64_f16c(h):
    """IEEE binary16 bit pattern (uint16) -> float64, exactly, by ``vcvtph2ps``."""
    return _half_bits_to_f64(h)


#: the 29 low float64 mantissa bits that float32 does not have
_LOW29 = (1 << 29) - 1


@kernel(fastmath=FM_STRICT)
def f64_to_f32_odd(v):
    """float64 -> float32 rounded to odd (see ``f64_to_half_f16c``): rounding that value to
    float16 afterwards rounds ``v`` once, correctly."""
    b = np.float64(v).view(np.int64)
    t = np.int64((b | ((b & _LOW29) + _LOW29)) & ~_LOW29)
    return np.float32(t.view(np.float64))


@kernel(fastmath=FM_STRICT)
def f64_to_half_f16c(v):
    """float64 -> IEEE binary16 bit pattern, rounded to nearest, ties to even, by ``vcvtps2ph``.

    Rounding to float32 and then to float16, both to nearest, would round twice (a value just
    above a float16 midpoint can land on it and then go to even).  The first step rounds to
    odd instead, which makes the second one correct (Boldo & Melquiond: 24 >= 11 + 2 bits):
    the float64 pattern keeps float32's 24 significant bits, and the last one is set when any
    of the 29 dropped bits was (adding 2**29 - 1 to them carries into it exactly then).  That
    value converts to float32 exactly in its normal range; above, it overflows to inf (right:
    it is >= 65520); below 2**-126 any float32 rounding still ends in a float16 zero of v's
    sign.  A NaN keeps a payload bit, so stays NaN.  Integer operations only: it vectorizes,
    and costs half of doing the rounding to odd through a float32 round trip.
    """
    return _f32_to_half_bits(f64_to_f32_odd(v))


@kernel(fastmath=FM_STRICT)
def half_to_f32_soft(h):
    return np.float32(half_to_f64_soft(h))  # exact: float16 values are float32 values


@kernel(fastmath=FM_STRICT)
def f32_to_half_soft(v):
    return f64_to_half_soft(np.float64(v))


if HAS_F16C:
    half_to_f64 = half_to_f64_f16c
    f64_to_half = f64_to_half_f16c
    half_to_f32 = _half_bits_to_f32
    f32_to_half = _f32_to_half_bits
else:
    half_to_f64 = half_to_f64_soft
    f64_to_half = f64_to_half_soft
    half_to_f32 = half_to_f32_soft
    f32_to_half = f32_to_half_soft


def to64(v):  # pragma: no cover - replaced by the overload inside kernels
    return float(v)


@overload(to64)
def _ov_to64(v):
    if isinstance(v, types.Integer):
        return lambda v: half_to_f64(v)
    return lambda v: np.float64(v)


def cast_like(v, arr):  # pragma: no cover - replaced by the overload inside kernels
    return v


@overload(cast_like)
def _ov_cast_like(v, arr):
    if isinstance(arr.dtype, types.Integer):
        return lambda v, arr: f64_to_half(v)
    if arr.dtype == types.float32:
        return lambda v, arr: np.float32(v)
    return lambda v, arr: v


@kernel(fastmath=FM_STRICT)
def _sub(a, b):
    # kept strict: a reassociating caller must not turn sum(x - K) into sum(x) - n*K
    return a - b


#: the one-subtraction apply is used while |(K + c) * a| stays below this
FOLD_LIMIT = 2.0**16


def wide(x):  # pragma: no cover - replaced by the overload inside kernels
    return x.dtype == np.float64


@overload(wide)
def _ov_wide(x):
    if x.dtype == types.float64:
        return lambda x: True
    return lambda x: False


def affine_like(v, M, a, b, arr):  # pragma: no cover - replaced by the overload inside kernels
    return (v - M) * a + b


@overload(affine_like)
def _ov_affine_like(v, M, a, b, arr):
    """``(v - M) * a + b`` stored like ``arr``: in float32 for float16 data with float32
    coefficients (``half32_ok`` said so), else in float64."""
    if M == types.float32 and isinstance(v, types.Integer):
        return lambda v, M, a, b, arr: f32_to_half((half_to_f32(v) - M) * a + b)
    return lambda v, M, a, b, arr: cast_like((to64(v) - M) * a + b, arr)


# float16 data: float32 arithmetic is enough for the normalization itself when the shift and
# the bias are small.  ``y = (x - M) * a + b`` in float32 (M, a rounded to nearest, b to odd,
# one FMA) is off by at most ``2**-24 * (|M * a| + 3 * |y| + 3 * |b|)`` before it is rounded to
# float16: with ``|M * a| <= HALF32_SHIFT`` and ``|b| <= HALF32_BIAS`` that is under 0.01 of
# float16's epsilon relative to max(1, |y|), so the result stays within 0.51 epsilon of the
# exact one (the float64 path rounds correctly: 0.5).  It halves the cost of float16, whose
# float64 apply is mostly conversions.  ``b`` rounded to odd keeps an element equal to the
# mean mapped to float16(b) exactly.

#: float16 rows are normalized in float32 while |M * a| and |b| stay within these
HALF32_SHIFT = 64.0
HALF32_BIAS = 32.0


def half(x):  # pragma: no cover - replaced by the overload inside kernels
    return False


@overload(half)
def _ov_half(x):
    if isinstance(x.dtype, types.Integer):
        return lambda x: True
    return lambda x: False


@kernel(fastmath=FM_STRICT)
def half32_ok(M, a, b):
    return abs(M * a) <= HALF32_SHIFT and abs(b) <= HALF32_BIAS
