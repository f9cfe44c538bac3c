"""Numba kernels.  Canonical, contiguous inputs only; no validation happens here.

Layouts (made by ``_api``):

* channels-first: ``x`` is ``(R, L)``, one row per ``(n, c)`` instance, ``R = N*C``;
* channels-last: ``x`` is ``(N, L, C)``, instance ``(n, c)`` is column ``c`` of slab ``n``.

Element types: float32, float64, and float16 carried as its ``uint16`` bit pattern (Numba cannot
load float16); every value is widened to float64 on load and rounded once on store (float16
with the CPU's F16C conversions where it has them, and normalized in float32 arithmetic when
the shift and bias are small: see "float16 data" below).

Accuracy scheme, per instance:

1. a shift ``K``, the median of three samples of the instance (exactly the value of a constant
   instance);
2. moments of ``x - K`` block by block: each block of ``BLOCK`` elements is summed twice while it
   sits in L1 (its mean, then its centred sum of squares, a two-pass within the block), and the
   blocks are merged with Chan et al.'s pairwise update, the sum of squares compensated
   (Neumaier).  Data offset far from zero (``1e6 + noise``) costs no digits: ``x - K`` is exact
   when ``x`` and ``K`` lie within a factor of two (Sterbenz);
3. ``y = ((x - K) - c) * a + b`` with ``c`` the mean of ``x - K``, ``a = rstd * weight``, computed
   in float64 and rounded once.

Fast-math flags are chosen per function and LLVM keeps them per instruction after inlining: the
block reductions may be reassociated (that is what lets them vectorize), while the shift, the
merges and the compensation are strict.  ``fastmath=True`` is never used: it assumes no NaN/Inf.

Two loops LLVM's vectorizer cannot vectorize well are written as vector IR through Numba
intrinsics (float32, CPUs with AVX2 and up, chosen at import): rows of at most 16 elements,
eight rows at a time (``_rows8_f32``), and the channels-last normalization, 16 channels at a
time with their coefficients in registers (``_cl_columns``).  They do the same arithmetic as
the loops they replace, and fall back to them elsewhere.  They stay in this file because
Numba's cache is keyed to the file of the kernel: a kernel cached from here would not notice a
change to an intrinsic imported from another module.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from ._jit import kernel

# Flag sets, one per kind of loop.
FM_STRICT = False
FM_REDUCE = set({"reassoc", "nsz", "contract"})  # block sums: vectorized reductions
FM_APPLY = set({"contract"})  # y = d * a + b as one fused multiply-add

#: elements per block in a channels-first row (8 KiB of float64: stays in L1)
BLOCK = 1024
#: cap on the elements per channels-last row block
CL_BLOCK_ELEMS = 4096
CL_MAX_ROWS = 128
CL_MIN_ROWS = 16


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


@intrinsic
def _half_bits_to_f64(typingctx, h):
    """uint16 bit pattern -> float64 through LLVM's ``half`` (exact; F16C hosts only)."""
    sig = types.float64(types.uint16)

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.DoubleType())

    return sig, codegen


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
    b = np.float64(v).view(np.int64)
    t = np.int64((b | ((b & _LOW29) + _LOW29)) & ~_LOW29)
    return _f32_to_half_bits(np.float32(t.view(np.float64)))


@intrinsic
def _half_bits_to_f32(typingctx, h):
    """uint16 bit pattern -> float32 through LLVM's ``half`` (exact; F16C hosts only)."""
    sig = types.float32(types.uint16)

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return sig, codegen


@kernel(fastmath=FM_STRICT)
def half_to_f32_soft(h):
    return np.float32(half_to_f64_soft(h))  # exact: float16 values are float32 values


@kernel(fastmath=FM_STRICT)
def f32_to_half_soft(v):
    return f64_to_half_soft(np.float64(v))


@kernel(fastmath=FM_STRICT)
def f64_to_f32_odd(v):
    """float64 -> float32 rounded to odd (see ``f64_to_half_f16c``): rounding that value to
    float16 afterwards rounds ``v`` once, correctly."""
    b = np.float64(v).view(np.int64)
    t = np.int64((b | ((b & _LOW29) + _LOW29)) & ~_LOW29)
    return np.float32(t.view(np.float64))


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


@kernel(fastmath=FM_STRICT)
def median3(a, b, c):
    return max(min(a, b), min(max(a, b), c))


@kernel(fastmath=FM_STRICT)
def merge_moments(n, mean, m2, comp, nb, mb, m2b):
    """Chan et al.: fold a part (nb, mb, m2b) into (n, mean, m2 + comp); m2 compensated."""
    if nb == 0:
        return n, mean, m2, comp
    nn = n + nb
    delta = mb - mean
    mean = mean + delta * (nb / nn)
    inc = m2b + delta * delta * (n * (nb / nn))
    t = m2 + inc
    if abs(m2) >= abs(inc):
        comp += (m2 - t) + inc
    else:
        comp += (inc - t) + m2
    return nn, mean, t, comp


@kernel(fastmath=FM_STRICT)
def task_span(t, nchunks, L):
    """Task ``t`` of a split into ``nchunks`` chunks per group of length ``L``:
    ``(group, chunk, start, stop)``."""
    g = t // nchunks
    j = t - g * nchunks
    chunk = (L + nchunks - 1) // nchunks
    s = min(j * chunk, L)
    return g, j, s, min(s + chunk, L)


# --------------------------------------------------------------------------------------------
# channels-first building blocks (one contiguous row per instance)


@kernel(fastmath=FM_REDUCE)
def _block_sum(x, start, stop, K):
    # loops run over a slice from 0: an index that cannot be negative needs no wraparound
    # check, which is what lets LLVM vectorize the loop
    xs = x[start:stop]
    s = 0.0
    for i in range(xs.shape[0]):
        s += _sub(to64(xs[i]), K)
    return s


@kernel(fastmath=FM_REDUCE)
def _block_m2(x, start, stop, K, mb):
    """(sum d, sum d*d) with d = (x - K) - mb: the second pass of a corrected two-pass block.

    ``sum d`` is what the first pass's rounding left over (Chan, Golub & LeVeque's
    correction): adding ``sum d / n`` to ``mb`` removes the summation error of the block mean,
    which would otherwise reach a few epsilon of the spread."""
    xs = x[start:stop]
    s1 = 0.0
    s2 = 0.0
    for i in range(xs.shape[0]):
        d = _sub(_sub(to64(xs[i]), K), mb)
        s1 += d
        s2 += d * d
    return s1, s2


@kernel(fastmath=FM_STRICT)
def row_pilot(x):
    """The shift K of a row: the median of its first, middle and last elements."""
    L = x.shape[0]
    if L == 0:
        return 0.0
    return median3(to64(x[0]), to64(x[L // 2]), to64(x[L - 1]))


@kernel(fastmath=FM_STRICT)
def row_moments(x, start, stop, K):
    """(n, mean of x - K, M2) over x[start:stop]."""
    n = 0.0
    mean = 0.0
    m2 = 0.0
    comp = 0.0
    b = start
    while b < stop:
        e = min(b + BLOCK, stop)
        nb = e - b
        mb = _block_sum(x, b, e, K) / nb
        sd, m2b = _block_m2(x, b, e, K, mb)
        mb += sd / nb
        m2b -= sd * (sd / nb)
        if m2b < 0.0:
            m2b = 0.0
        n, mean, m2, comp = merge_moments(n, mean, m2, comp, float(nb), mb, m2b)
        b = e
    return n, mean, m2 + comp


@kernel(fastmath=FM_APPLY)
def row_apply(x, y, start, stop, K, c, a, b):
    xs = x[start:stop]
    ys = y[start:stop]
    for i in range(xs.shape[0]):
        d = _sub(_sub(to64(xs[i]), K), c)
        ys[i] = cast_like(d * a + b, ys)


# --------------------------------------------------------------------------------------------
# per-dtype choices
#
# float32 and float16 values carry 24 and 11 significant bits: in float64 there are 29 spare
# bits, enough to take the sum and the sum of squares of ``x - K`` in one pass over each block
# (``M2 = S2 - S1**2 / n``) and to form ``y`` as ``(x - M) * a + b`` with ``M = K + c`` rounded
# once.  Error bounds, relative: the block one-pass loses at most ``g * 2**-52 * (1 + L / n0)``
# of M2 (``g`` the additions per vector lane in a block, ``n0`` the elements behind the shift:
# for a data-value shift ``M2 >= (K - mean)**2``); the single subtraction costs
# ``|M * a| * 2**-53`` of ``max(1, |y|)``, used only while ``|M * a| <= FOLD_LIMIT``.  Both stay
# far below the 0.5 epsilon (2**-24) left after the final rounding.  float64 input keeps the
# two-pass blocks and the exact double subtraction: there are no spare bits.

#: elements per one-pass block (float32/float16 input)
BLOCK1 = 2048
#: rows beyond this length take their shift from the mean of the first BLOCK elements
SHIFT_FROM_MEAN = 1 << 12
#: the one-subtraction apply is used while |(K + c) * a| stays below this
FOLD_LIMIT = 2.0**16


def wide(x):  # pragma: no cover - replaced by the overload inside kernels
    return x.dtype == np.float64


@overload(wide)
def _ov_wide(x):
    if x.dtype == types.float64:
        return lambda x: True
    return lambda x: False


@kernel(fastmath=FM_REDUCE)
def _block_sums(x, start, stop, K):
    xs = x[start:stop]
    s1 = 0.0
    s2 = 0.0
    for i in range(xs.shape[0]):
        d = _sub(to64(xs[i]), K)
        s1 += d
        s2 += d * d
    return s1, s2


@kernel(fastmath=FM_STRICT)
def row_shift(x):
    """The shift K of a row: float32/float16 rows longer than SHIFT_FROM_MEAN use the mean of
    their first BLOCK elements (which bounds the one-pass error by L / BLOCK), others the
    median-of-three pilot."""
    L = x.shape[0]
    if L > SHIFT_FROM_MEAN and not wide(x):
        return _block_sum(x, 0, BLOCK, 0.0) / BLOCK
    return row_pilot(x)


@kernel(fastmath=FM_STRICT)
def row_moments1(x, start, stop, K):
    """(n, mean of x - K, M2) over x[start:stop], one pass per block of BLOCK1 elements."""
    n = 0.0
    mean = 0.0
    m2 = 0.0
    comp = 0.0
    b = start
    while b < stop:
        e = min(b + BLOCK1, stop)
        nb = e - b
        s1, s2 = _block_sums(x, b, e, K)
        mb = s1 / nb
        m2b = s2 - s1 * mb
        if m2b < 0.0:
            m2b = 0.0
        n, mean, m2, comp = merge_moments(n, mean, m2, comp, float(nb), mb, m2b)
        b = e
    return n, mean, m2 + comp


@kernel(fastmath=FM_STRICT)
def row_stats(x, start, stop, K):
    """(n, mean of x - K, M2): two-pass blocks for float64 input, one-pass blocks otherwise."""
    if wide(x):
        return row_moments(x, start, stop, K)
    return row_moments1(x, start, stop, K)


def affine_like(v, M, a, b, arr):  # pragma: no cover - replaced by the overload inside kernels
    return (v - M) * a + b


@overload(affine_like)
def _ov_affine_like(v, M, a, b, arr):
    """``(v - M) * a + b`` stored like ``arr``: in float32 for float16 data with float32
    coefficients (``half32_ok`` said so), else in float64."""
    if M == types.float32 and isinstance(v, types.Integer):
        return lambda v, M, a, b, arr: f32_to_half((half_to_f32(v) - M) * a + b)
    return lambda v, M, a, b, arr: cast_like((to64(v) - M) * a + b, arr)


@kernel(fastmath=FM_APPLY)
def _row_apply1(x, y, start, stop, M, a, b):
    """``y = (x - M) * a + b``: float64 coefficients, or float32 ones for float16 data."""
    xs = x[start:stop]
    ys = y[start:stop]
    for i in range(xs.shape[0]):
        ys[i] = affine_like(xs[i], M, a, b, ys)


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


@kernel(fastmath=FM_STRICT)
def row_normalize(x, y, start, stop, K, c, a, b):
    """``y = ((x - K) - c) * a + b``, with one subtraction when the dtype leaves room."""
    if not wide(x):
        M = K + c
        if half(x) and half32_ok(M, a, b):
            _row_apply1(x, y, start, stop, np.float32(M), np.float32(a), f64_to_f32_odd(b))
            return
        if abs(M * a) <= FOLD_LIMIT:
            _row_apply1(x, y, start, stop, M, a, b)
            return
    row_apply(x, y, start, stop, K, c, a, b)


# --------------------------------------------------------------------------------------------
# channels-first kernels


@kernel(fastmath=FM_STRICT, parallel=True)
def cf_fused(x, y, w, b, C, eps, mean_out, var_out):
    """Statistics and normalization of each row in one task, while the row is hot in cache."""
    R = x.shape[0]
    L = x.shape[1]
    for r in prange(R):
        xr = x[r]
        K = row_shift(xr)
        n, c, m2 = row_stats(xr, 0, L, K)
        var = m2 / L
        rstd = 1.0 / np.sqrt(var + eps)
        ch = r % C
        row_normalize(xr, y[r], 0, L, K, c, rstd * w[ch], b[ch])
        mean_out[r] = K + c
        var_out[r] = var


@kernel(fastmath=FM_STRICT, parallel=True)
def cf_partial(x, nchunks, K_out, pn, pmean, pm2):
    """Moments of each of ``nchunks`` chunks of every row: tasks ``R * nchunks``."""
    R = x.shape[0]
    L = x.shape[1]
    for t in prange(R * nchunks):
        r, j, s, e = task_span(t, nchunks, L)
        xr = x[r]
        K = row_shift(xr)
        n, mean, m2 = row_stats(xr, s, e, K)
        pn[r, j] = n
        pmean[r, j, 0] = mean
        pm2[r, j, 0] = m2
        if j == 0:
            K_out[r] = K


@kernel(fastmath=FM_STRICT, parallel=True)
def cf_apply(x, y, nchunks, K, c, a, b):
    """``y = ((x - K) - c) * a + b`` with per-row K, c, a, b: tasks ``R * nchunks``.

    Chunks run in the reverse order of ``cf_partial``'s: the ones its pass read last are the
    ones still in the last-level cache when an input larger than the cache comes back.
    """
    R = x.shape[0]
    L = x.shape[1]
    T = R * nchunks
    for t0 in prange(T):
        t = T - 1 - t0
        r, j, s, e = task_span(t, nchunks, L)
        row_normalize(x[r], y[r], s, e, K[r], c[r], a[r], b[r])


# --------------------------------------------------------------------------------------------
# short rows: many tiny instances (L up to SHORT_ROW)
#
# Per-row overhead dominates here: no slices, no blocks, no merges, no division to find the
# channel.  The shift is the row's first element, so the one-pass sums lose at most
# ``L * 2**-53`` of M2 relative (``M2 >= (K - mean)**2``).

#: rows up to this length take the short-row kernel
SHORT_ROW = 256
#: rows per task of the short-row kernel
SHORT_ROWS_PER_TASK = 64


@kernel(fastmath=FM_REDUCE)
def _short_sums(x, r, K):
    s1 = 0.0
    s2 = 0.0
    for i in range(x.shape[1]):
        d = _sub(to64(x[r, i]), K)
        s1 += d
        s2 += d * d
    return s1, s2


@kernel(fastmath=FM_REDUCE)
def _short_sum(x, r, K):
    s = 0.0
    for i in range(x.shape[1]):
        s += _sub(to64(x[r, i]), K)
    return s


@kernel(fastmath=FM_REDUCE)
def _short_m2(x, r, K, c):
    """(sum d, sum d*d), d = (x - K) - c: corrected two-pass, as ``_block_m2``."""
    s1 = 0.0
    s2 = 0.0
    for i in range(x.shape[1]):
        d = _sub(_sub(to64(x[r, i]), K), c)
        s1 += d
        s2 += d * d
    return s1, s2


@kernel(fastmath=FM_APPLY)
def _short_apply1(x, y, r, M, a, b):
    for i in range(x.shape[1]):
        y[r, i] = affine_like(x[r, i], M, a, b, y)


@kernel(fastmath=FM_APPLY)
def _short_apply(x, y, r, K, c, a, b):
    for i in range(x.shape[1]):
        d = _sub(_sub(to64(x[r, i]), K), c)
        y[r, i] = cast_like(d * a + b, y)


@kernel(fastmath=FM_STRICT)
def _short_block1(x, y, r0, r1, w, b, C, eps, mean_out, var_out):
    """Rows r0..r1 of float32/float16 input, in two phases, so that no row's statistics ->
    sqrt -> normalization chain of latencies stands between two rows: the statistics of the
    whole block first (independent rows overlap in the out-of-order window), then the
    normalization."""
    L = x.shape[1]
    inv_l = 1.0 / L
    for r in range(r0, r1):
        K = to64(x[r, 0])
        s1, s2 = _short_sums(x, r, K)
        c = s1 * inv_l
        m2 = s2 - s1 * c
        if m2 < 0.0:
            m2 = 0.0
        mean_out[r] = K + c
        var_out[r] = m2 * inv_l
    ch = r0 % C
    for r in range(r0, r1):
        M = mean_out[r]
        a = w[ch] / np.sqrt(var_out[r] + eps)
        if abs(M * a) <= FOLD_LIMIT:
            if half(x) and half32_ok(M, a, b[ch]):
                _short_apply1(x, y, r, np.float32(M), np.float32(a), f64_to_f32_odd(b[ch]))
            else:
                _short_apply1(x, y, r, M, a, b[ch])
        else:  # far from zero: the exact form needs K and c apart (recomputed, same values)
            K = to64(x[r, 0])
            c = _short_sums(x, r, K)[0] * inv_l
            _short_apply(x, y, r, K, c, a, b[ch])
        ch += 1
        if ch == C:
            ch = 0


# --------------------------------------------------------------------------------------------
# very short float32 rows (L <= SIMD_ROW): eight rows at a time in explicit vector IR
#
# Rows of a few elements (2x2 .. 4x4 feature maps) are too short for LLVM's loop vectorizer:
# its vector body needs 64 float32 elements, so they ran scalar, at ~14 ns a row.  Here each
# row is one masked 16-lane load, and eight rows share the rest: their horizontal sums are
# folded together (a transpose-reduce: 7 vector additions for 8 rows instead of 3 per row),
# and the eight rsqrt / division / fold tests are one vector operation each.  The arithmetic
# is the short-row kernel's, operation for operation (same shift, one-pass sums, strict
# ``m2 = s2 - s1 * c``, ``a = w / sqrt(var + eps)``, ``y = (x - M) * a + b`` with one FMA), the
# sums only reassociated, as the FM_REDUCE loops may.  A group whose fold test fails (data far
# from zero, NaN, Inf) is left untouched and reported, and the caller takes the exact path.

#: longest row the eight-row kernel takes (one 16-lane vector per row)
SIMD_ROW = 16

#: the explicit-vector kernels are used (masked vector loads and stores are native from AVX2)
HAS_SIMD_ROWS = _target_features().get("avx2", False)


def _vector_types(f32, f64):
    """The explicit-vector kernels apply: AVX2 or better, C-contiguous float32 data and
    float64 coefficient arrays."""

    def arrays(ts, dtype):
        return all(isinstance(t, types.Array) and t.dtype == dtype and t.layout == "C" for t in ts)

    return HAS_SIMD_ROWS and arrays(f32, types.float32) and arrays(f64, types.float64)


_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_F64 = ir.DoubleType()


def _vec(ty, n):
    return ir.VectorType(ty, n)


def _splat(builder, v, n):
    vt = _vec(v.type, n)
    u = builder.insert_element(ir.Constant(vt, ir.Undefined), v, ir.Constant(_I32, 0))
    zeros = ir.Constant(_vec(_I32, n), [0] * n)
    return builder.shuffle_vector(u, ir.Constant(vt, ir.Undefined), zeros)


def _shuffle(builder, a, b, lanes):
    return builder.shuffle_vector(a, b, ir.Constant(_vec(_I32, len(lanes)), lanes))


def _vname(vt):
    e = vt.element
    if isinstance(e, ir.FloatType):
        return f"v{vt.count}f32"
    if isinstance(e, ir.DoubleType):
        return f"v{vt.count}f64"
    return f"v{vt.count}i{e.width}"


def _call_intrinsic(builder, name, ret, args):
    fnty = ir.FunctionType(ret, [a.type for a in args])
    fn = builder.module.globals.get(name)
    if fn is None:
        fn = ir.Function(builder.module, fnty, name)
    return builder.call(fn, args)


def _masked_load(builder, ptr, mask, vt, align):
    name = f"llvm.masked.load.{_vname(vt)}.p0"
    return _call_intrinsic(
        builder, name, vt, [ptr, ir.Constant(_I32, align), mask, ir.Constant(vt, None)]
    )


def _masked_store(builder, val, ptr, mask, align):
    name = f"llvm.masked.store.{_vname(val.type)}.p0"
    _call_intrinsic(builder, name, ir.VoidType(), [val, ptr, ir.Constant(_I32, align), mask])


def _transpose_sum8(builder, vs):
    """Eight <8 x double> vectors -> one whose lane i is the sum of the lanes of vs[i]."""
    u = [
        builder.fadd(
            _shuffle(builder, vs[i], vs[i + 1], [0, 1, 2, 3, 8, 9, 10, 11]),
            _shuffle(builder, vs[i], vs[i + 1], [4, 5, 6, 7, 12, 13, 14, 15]),
        )
        for i in (0, 2, 4, 6)
    ]  # u[k]: lanes 0-3 partial sums of vs[2k], lanes 4-7 of vs[2k+1]
    w = [
        builder.fadd(
            _shuffle(builder, u[i], u[i + 1], [0, 1, 8, 9, 4, 5, 12, 13]),
            _shuffle(builder, u[i], u[i + 1], [2, 3, 10, 11, 6, 7, 14, 15]),
        )
        for i in (0, 2)
    ]  # w[0]: pairs of lanes for rows 0, 2, 1, 3; w[1] for rows 4, 6, 5, 7
    z = builder.fadd(
        _shuffle(builder, w[0], w[1], [0, 8, 2, 10, 4, 12, 6, 14]),
        _shuffle(builder, w[0], w[1], [1, 9, 3, 11, 5, 13, 7, 15]),
    )  # rows 0, 4, 2, 6, 1, 5, 3, 7
    return _shuffle(builder, z, z, [0, 4, 2, 6, 1, 5, 3, 7])


@intrinsic
def _rows8_f32(typingctx, x, y, r0, ch0, w, b, eps, mean_out, var_out):
    """Rows r0..r0+7 of float32 ``x`` (``L <= 16``) into ``y``, statistics into mean_out /
    var_out; 1 when done, 0 (nothing written) when a row needs the exact path."""
    sig = types.int64(x, y, r0, ch0, w, b, eps, mean_out, var_out)

    def codegen(context, builder, signature, args):
        xa = context.make_array(signature.args[0])(context, builder, args[0])
        ya = context.make_array(signature.args[1])(context, builder, args[1])
        wa = context.make_array(signature.args[4])(context, builder, args[4])
        ba = context.make_array(signature.args[5])(context, builder, args[5])
        ma = context.make_array(signature.args[7])(context, builder, args[7])
        va = context.make_array(signature.args[8])(context, builder, args[8])
        r0v, ch, epsv = args[2], args[3], args[6]
        L = builder.extract_value(xa.shape, 1)
        C = builder.extract_value(wa.shape, 0)
        f32x16 = _vec(ir.FloatType(), 16)
        f64x16 = _vec(_F64, 16)
        f64x8 = _vec(_F64, 8)
        lanes = ir.Constant(_vec(_I64, 16), list(range(16)))
        mask = builder.icmp_signed("<", lanes, _splat(builder, L, 16))
        zero16 = ir.Constant(f64x16, None)
        lo = list(range(8))
        hi = list(range(8, 16))
        vals, s1s, s2s = [], [], []
        kv = ir.Constant(f64x8, ir.Undefined)
        wv = ir.Constant(f64x8, ir.Undefined)
        bv = ir.Constant(f64x8, ir.Undefined)
        one = ir.Constant(_I64, 1)
        for i in range(8):
            row = builder.add(r0v, ir.Constant(_I64, i))
            p = builder.gep(xa.data, [builder.mul(row, L)])
            v = builder.fpext(_masked_load(builder, p, mask, f32x16, 4), f64x16)
            k = builder.extract_element(v, ir.Constant(_I32, 0))
            d = builder.select(mask, builder.fsub(v, _splat(builder, k, 16)), zero16)
            dl, dh = _shuffle(builder, d, d, lo), _shuffle(builder, d, d, hi)
            s1s.append(builder.fadd(dl, dh, flags=("reassoc", "nsz")))
            sq = builder.fadd(builder.fmul(dl, dl), builder.fmul(dh, dh), flags=("reassoc",))
            s2s.append(sq)
            vals.append(v)
            idx = ir.Constant(_I32, i)
            kv = builder.insert_element(kv, k, idx)
        # weight and bias of the eight rows' channels: one vector load each when the channels
        # run on without wrapping past C, else gathered one by one
        contiguous = builder.icmp_signed("<=", builder.add(ch, ir.Constant(_I64, 8)), C)
        vp = f64x8.as_pointer()
        with builder.if_else(contiguous, likely=True) as (then, otherwise):
            with then:
                w_run, b_run = (
                    builder.load(builder.bitcast(builder.gep(v.data, [ch]), vp), align=8)
                    for v in (wa, ba)
                )
                run_block = builder.block
            with otherwise:
                for i in range(8):
                    idx = ir.Constant(_I32, i)
                    wv = builder.insert_element(wv, builder.load(builder.gep(wa.data, [ch])), idx)
                    bv = builder.insert_element(bv, builder.load(builder.gep(ba.data, [ch])), idx)
                    ch = builder.add(ch, one)
                    ch = builder.select(builder.icmp_signed("==", ch, C), ir.Constant(_I64, 0), ch)
                wrap_block = builder.block
        w_phi = builder.phi(f64x8)
        w_phi.add_incoming(w_run, run_block)
        w_phi.add_incoming(wv, wrap_block)
        b_phi = builder.phi(f64x8)
        b_phi.add_incoming(b_run, run_block)
        b_phi.add_incoming(bv, wrap_block)
        wv, bv = w_phi, b_phi
        s1 = _transpose_sum8(builder, s1s)
        s2 = _transpose_sum8(builder, s2s)
        inv_l = _splat(builder, builder.fdiv(ir.Constant(_F64, 1.0), builder.sitofp(L, _F64)), 8)
        c = builder.fmul(s1, inv_l)
        m2 = builder.fsub(s2, builder.fmul(s1, c))
        zero8 = ir.Constant(f64x8, None)
        m2 = builder.select(builder.fcmp_ordered("<", m2, zero8), zero8, m2)
        mean = builder.fadd(kv, c)
        var = builder.fmul(m2, inv_l)
        sqrt = _call_intrinsic(
            builder, "llvm.sqrt.v8f64", f64x8, [builder.fadd(var, _splat(builder, epsv, 8))]
        )
        a = builder.fdiv(wv, sqrt)
        ma_abs = _call_intrinsic(builder, "llvm.fabs.v8f64", f64x8, [builder.fmul(mean, a)])
        ok = builder.fcmp_ordered("<=", ma_abs, _splat(builder, ir.Constant(_F64, FOLD_LIMIT), 8))
        all_ok = builder.icmp_unsigned(
            "==", builder.bitcast(ok, ir.IntType(8)), ir.Constant(ir.IntType(8), 0xFF)
        )
        with builder.if_then(all_ok, likely=True):
            mp = builder.gep(ma.data, [r0v])
            builder.store(mean, builder.bitcast(mp, f64x8.as_pointer()), align=8)
            vp = builder.gep(va.data, [r0v])
            builder.store(var, builder.bitcast(vp, f64x8.as_pointer()), align=8)
            for i in range(8):
                idx = ir.Constant(_I32, i)
                mi = _splat(builder, builder.extract_element(mean, idx), 16)
                ai = _splat(builder, builder.extract_element(a, idx), 16)
                bi = _splat(builder, builder.extract_element(bv, idx), 16)
                d = builder.fsub(vals[i], mi)
                yv = _call_intrinsic(builder, "llvm.fma.v16f64", f64x16, [d, ai, bi])
                row = builder.add(r0v, ir.Constant(_I64, i))
                p = builder.gep(ya.data, [builder.mul(row, L)])
                _masked_store(builder, builder.fptrunc(yv, f32x16), p, mask, 4)
        return builder.zext(all_ok, _I64)

    return sig, codegen


def rows8(x, y, r0, ch0, w, b, eps, mean_out, var_out):  # pragma: no cover - overloaded
    return 0


@overload(rows8, inline="always")
def _ov_rows8(x, y, r0, ch0, w, b, eps, mean_out, var_out):
    """The eight-row kernel where it applies (float32 in and out, contiguous float64
    parameters, AVX2 or better); elsewhere 0, i.e. "take the general path"."""
    ok = _vector_types(f32=(x, y), f64=(w, b, mean_out, var_out))
    if ok:
        return lambda x, y, r0, ch0, w, b, eps, mean_out, var_out: _rows8_f32(
            x, y, r0, ch0, w, b, eps, mean_out, var_out
        )
    return lambda x, y, r0, ch0, w, b, eps, mean_out, var_out: 0


def simd_rows(x, y):  # pragma: no cover - overloaded
    return False


@overload(simd_rows, inline="always")
def _ov_simd_rows(x, y):
    take = _vector_types(f32=(x, y), f64=())
    return (lambda x, y: True) if take else (lambda x, y: False)


@kernel(fastmath=FM_STRICT, parallel=True)
def cf_short(x, y, w, b, C, eps, mean_out, var_out):
    """``cf_fused`` for short rows (``0 < L <= SHORT_ROW``): a block of rows per task."""
    R = x.shape[0]
    L = x.shape[1]
    ntasks = (R + SHORT_ROWS_PER_TASK - 1) // SHORT_ROWS_PER_TASK
    for t in prange(ntasks):
        r0 = t * SHORT_ROWS_PER_TASK
        r1 = min(r0 + SHORT_ROWS_PER_TASK, R)
        if wide(x):
            ch = r0 % C
            for r in range(r0, r1):
                K = to64(x[r, 0])
                c = _short_sum(x, r, K) / L
                sd, s2 = _short_m2(x, r, K, c)
                c += sd / L
                m2 = s2 - sd * (sd / L)
                if m2 < 0.0:  # (not max(): NaN must survive)
                    m2 = 0.0
                var = m2 / L
                _short_apply(x, y, r, K, c, w[ch] / np.sqrt(var + eps), b[ch])
                mean_out[r] = K + c
                var_out[r] = var
                ch += 1
                if ch == C:
                    ch = 0
        elif simd_rows(x, y) and L <= SIMD_ROW:
            r = r0
            ch = r0 % C
            while r + 8 <= r1:
                if rows8(x, y, r, ch, w, b, eps, mean_out, var_out) == 0:
                    _short_block1(x, y, r, r + 8, w, b, C, eps, mean_out, var_out)
                r += 8
                ch += 8
                while ch >= C:
                    ch -= C
            if r < r1:
                _short_block1(x, y, r, r1, w, b, C, eps, mean_out, var_out)
        else:
            _short_block1(x, y, r0, r1, w, b, C, eps, mean_out, var_out)


# --------------------------------------------------------------------------------------------
# channels-last building blocks (a slab (L, C) per batch element, channels contiguous)


@kernel(fastmath=FM_STRICT)
def cl_rows_per_block(C):
    # at least CL_MIN_ROWS rows even when that outgrows L1: every merge of a block into the
    # running mean rounds it once, and with one row per block (C > 4096) those roundings add
    # up to more than the float64 guarantee allows
    return max(CL_MIN_ROWS, min(CL_MAX_ROWS, CL_BLOCK_ELEMS // max(C, 1)))


@kernel(fastmath=FM_STRICT)
def slab_pilot(x2, K):
    L = x2.shape[0]
    C = x2.shape[1]
    if L == 0:
        K[:] = 0.0
        return
    for c in range(C):
        K[c] = median3(to64(x2[0, c]), to64(x2[L // 2, c]), to64(x2[L - 1, c]))


@kernel(fastmath=FM_STRICT)
def _slab_block(x2, b, e, K, mb, m2b, sd):
    """Per-channel block mean and centred sum of squares of rows b..e (vectorized over C),
    corrected two-pass as ``_block_m2`` (``sd`` is workspace)."""
    C = x2.shape[1]
    xs = x2[b:e]
    nb = xs.shape[0]
    for c in range(C):
        mb[c] = 0.0
        m2b[c] = 0.0
    for i in range(nb):
        for c in range(C):
            mb[c] += _sub(to64(xs[i, c]), K[c])
    for c in range(C):
        mb[c] /= nb
        sd[c] = 0.0
    for i in range(nb):
        for c in range(C):
            d = _sub(_sub(to64(xs[i, c]), K[c]), mb[c])
            sd[c] += d
            m2b[c] += d * d
    for c in range(C):
        mb[c] += sd[c] / nb
        v = m2b[c] - sd[c] * (sd[c] / nb)
        m2b[c] = 0.0 if v < 0.0 else v  # (not max(): NaN must survive)


#: one-pass (float32/float16) channels-last blocks: elements and rows per block
CL_BLOCK_ELEMS1 = 16384
CL_MAX_ROWS1 = 256
#: channels-last input with fewer channels than this is swept flat, CL_PERIODIC_ROWS rows at a time
CL_PERIODIC_C = 16
CL_PERIODIC_ROWS = 32


@kernel(fastmath=FM_REDUCE)
def _slab_block1(x2, b, e, K, mb, m2b):
    """Per-channel block mean and M2 of rows b..e in one pass (float32/float16 input)."""
    C = x2.shape[1]
    xs = x2[b:e]
    nb = xs.shape[0]
    for c in range(C):
        mb[c] = 0.0
        m2b[c] = 0.0
    i = 0
    if C < CL_PERIODIC_C and nb >= CL_PERIODIC_ROWS:
        # few channels: the rows, seen flat, are periodic with period C; sweep them in
        # stretches of W = CL_PERIODIC_ROWS * C elements with one accumulator per position,
        # a loop long enough to vectorize, and fold the positions into channels afterwards
        W = CL_PERIODIC_ROWS * C
        nfull = nb // CL_PERIODIC_ROWS
        flat = xs[: nfull * CL_PERIODIC_ROWS].reshape(nfull * W)
        kw = np.empty(W)
        a1 = np.zeros(W)
        a2 = np.zeros(W)
        for k in range(W):
            kw[k] = K[k % C]
        for j in range(nfull):
            sub = flat[j * W : (j + 1) * W]
            for k in range(W):
                d = _sub(to64(sub[k]), kw[k])
                a1[k] += d
                a2[k] += d * d
        for k in range(W):
            mb[k % C] += a1[k]
            m2b[k % C] += a2[k]
        i = nfull * CL_PERIODIC_ROWS
    # four rows per sweep over the channels: a quarter of the accumulator loads and stores
    # (they, not the arithmetic, bound this loop)
    while i + 4 <= nb:
        x0 = xs[i]
        x1 = xs[i + 1]
        x2_ = xs[i + 2]
        x3 = xs[i + 3]
        for c in range(C):
            k = K[c]
            d0 = _sub(to64(x0[c]), k)
            d1 = _sub(to64(x1[c]), k)
            d2 = _sub(to64(x2_[c]), k)
            d3 = _sub(to64(x3[c]), k)
            mb[c] += (d0 + d1) + (d2 + d3)
            m2b[c] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
        i += 4
    while i < nb:
        xr = xs[i]
        for c in range(C):
            d = _sub(to64(xr[c]), K[c])
            mb[c] += d
            m2b[c] += d * d
        i += 1
    for c in range(C):
        s1 = mb[c]
        mb[c] = s1 / nb
        v = m2b[c] - s1 * mb[c]
        m2b[c] = 0.0 if v < 0.0 else v


@kernel(fastmath=FM_STRICT)
def slab_moments(x2, r0, r1, K, mean, m2):
    """Per-channel (mean of x - K, M2) over rows r0..r1 of a slab; returns the row count."""
    C = x2.shape[1]
    if wide(x2):
        rb = cl_rows_per_block(C)
    else:
        rb = max(1, CL_BLOCK_ELEMS1 // max(C, 1))
        if C >= CL_PERIODIC_C:
            rb = min(CL_MAX_ROWS1, rb)
    comp = np.zeros(C)
    mb = np.empty(C)
    m2b = np.empty(C)
    sd = np.empty(C)
    for c in range(C):
        mean[c] = 0.0
        m2[c] = 0.0
    n = 0.0
    b = r0
    while b < r1:
        e = min(b + rb, r1)
        nb = float(e - b)
        if wide(x2):
            _slab_block(x2, b, e, K, mb, m2b, sd)
        else:
            _slab_block1(x2, b, e, K, mb, m2b)
        for c in range(C):
            _, mean[c], m2[c], comp[c] = merge_moments(
                n, mean[c], m2[c], comp[c], nb, mb[c], m2b[c]
            )
        n += nb
        b = e
    for c in range(C):
        m2[c] += comp[c]
    return n


@kernel(fastmath=FM_APPLY)
def slab_apply(x2, y2, r0, r1, K, cm, a, b):
    C = x2.shape[1]
    xs = x2[r0:r1]
    ys = y2[r0:r1]
    for i in range(xs.shape[0]):
        for c in range(C):
            d = _sub(_sub(to64(xs[i, c]), K[c]), cm[c])
            ys[i, c] = cast_like(d * a[c] + b[c], ys)


#: the channels-last apply sweeps stretches of whole rows of about this many elements
CL_APPLY_STRETCH = 256
#: the vector channels-last apply sweeps blocks of rows of about this many elements
CL_APPLY_BLOCK = 512


@kernel(fastmath=FM_APPLY)
def _slab_apply1(x2, y2, r0, r1, M, a, b):
    """``y = (x - M) * a + b`` per channel over rows r0..r1, swept flat: stretches of whole
    rows (about CL_APPLY_STRETCH elements) against coefficients tiled to the same length.

    Row by row, a row of C = 64 float32 is exactly one pass of LLVM's vector body, preceded
    by its overlap checks on five arrays: 0.31 ns an element, twice the channels-first apply.
    One long loop per stretch pays those once."""
    C = x2.shape[1]
    xs = x2[r0:r1]
    ys = y2[r0:r1]
    n = xs.shape[0]
    rows = max(1, CL_APPLY_STRETCH // max(C, 1))
    W = rows * C
    nfull = n // rows
    i0 = nfull * rows
    xf = xs[:i0].reshape(nfull * W)
    yf = ys[:i0].reshape(nfull * W)
    mw = np.empty(W, M.dtype)
    aw = np.empty(W, M.dtype)
    bw = np.empty(W, M.dtype)
    for i in range(rows):
        for c in range(C):
            mw[i * C + c] = M[c]
            aw[i * C + c] = a[c]
            bw[i * C + c] = b[c]
    for j in range(nfull):
        xsub = xf[j * W : (j + 1) * W]
        ysub = yf[j * W : (j + 1) * W]
        for k in range(W):
            ysub[k] = affine_like(xsub[k], mw[k], aw[k], bw[k], ysub)
    xr = xs[i0:]
    yr = ys[i0:]
    for i in range(xr.shape[0]):
        for c in range(C):
            yr[i, c] = affine_like(xr[i, c], M[c], a[c], b[c], yr)


def _load16(builder, ptr, mask, vt, align):
    """16 lanes from ``ptr``; only the ``mask`` lanes when a mask is given."""
    if mask is None:
        return builder.load(builder.bitcast(ptr, vt.as_pointer()), align=align)
    return _masked_load(builder, ptr, mask, vt, align)


def _store16(builder, val, ptr, mask, align):
    if mask is None:
        builder.store(val, builder.bitcast(ptr, val.type.as_pointer()), align=align)
    else:
        _masked_store(builder, val, ptr, mask, align)


def _cl_columns(builder, C, r0v, r1v, coefs, body):
    """Rows r0..r1 of a channels-last slab, 16 channels at a time: for each block of rows
    (about CL_APPLY_BLOCK elements, so it stays in L1), for each 16-channel column (the last
    one masked), the float64 coefficient vectors of ``coefs`` (data pointers of (C,) arrays)
    are loaded once and ``body(at, mask, vectors)`` runs for every row, ``at`` the element
    index of the row's first channel of the column.  That keeps the coefficients in registers
    down the rows: LLVM's own loop must reload them after every store, which might alias."""
    f64x16 = _vec(_F64, 16)
    lanes = ir.Constant(_vec(_I64, 16), list(range(16)))
    sixteen = ir.Constant(_I64, 16)
    one = ir.Constant(_I64, 1)
    rb = builder.sdiv(ir.Constant(_I64, CL_APPLY_BLOCK), C)
    rb = builder.select(builder.icmp_signed("<", rb, one), one, rb)
    nblk = builder.sdiv(C, sixteen)
    done = builder.mul(nblk, sixteen)
    rest = builder.sub(C, done)
    tail_mask = builder.icmp_signed("<", lanes, _splat(builder, rest, 16))

    def column(rs, nr, off, mask):
        vecs = [_load16(builder, builder.gep(p, [off]), mask, f64x16, 8) for p in coefs]
        with cgutils.for_range(builder, nr) as loop:
            body(builder.add(builder.mul(builder.add(rs, loop.index), C), off), mask, vecs)

    nrb = builder.sdiv(builder.add(builder.sub(r1v, r0v), builder.sub(rb, one)), rb)
    with cgutils.for_range(builder, nrb) as rbl:
        rs = builder.add(r0v, builder.mul(rbl.index, rb))
        nr = builder.sub(r1v, rs)
        nr = builder.select(builder.icmp_signed("<", rb, nr), rb, nr)
        with cgutils.for_range(builder, nblk) as blk:
            column(rs, nr, builder.mul(blk.index, sixteen), None)
        with builder.if_then(builder.icmp_signed(">", rest, ir.Constant(_I64, 0))):
            column(rs, nr, done, tail_mask)


_F32X16 = _vec(ir.FloatType(), 16)
_F64X16 = _vec(_F64, 16)


def _fma16(builder, a, b, c):
    return _call_intrinsic(builder, "llvm.fma.v16f64", _F64X16, [a, b, c])


@intrinsic
def _cl_apply_f32(typingctx, x2, y2, r0, r1, M, a, b):
    """``y = (x - M) * a + b`` over rows r0..r1 of a float32 (L, C) slab (``_cl_columns``)."""
    sig = types.void(x2, y2, r0, r1, M, a, b)

    def codegen(context, builder, signature, args):
        xa, ya, ma, aa, ba = (
            context.make_array(signature.args[i])(context, builder, args[i])
            for i in (0, 1, 4, 5, 6)
        )

        def body(at, mask, vecs):
            mv, av, bv = vecs
            v = _load16(builder, builder.gep(xa.data, [at]), mask, _F32X16, 4)
            d = builder.fsub(builder.fpext(v, _F64X16), mv)
            yv = builder.fptrunc(_fma16(builder, d, av, bv), _F32X16)
            _store16(builder, yv, builder.gep(ya.data, [at]), mask, 4)

        C = builder.extract_value(xa.shape, 1)
        _cl_columns(builder, C, args[2], args[3], [ma.data, aa.data, ba.data], body)
        return context.get_dummy_value()

    return sig, codegen


def cl_apply_vec(x2, y2, r0, r1, M, a, b):  # pragma: no cover - overloaded
    return False


@overload(cl_apply_vec, inline="always")
def _ov_cl_apply_vec(x2, y2, r0, r1, M, a, b):
    """``_cl_apply_f32`` where it applies (float32 slabs, contiguous float64 coefficients,
    AVX2 or better): True when done, False for "take the general path"."""
    ok = _vector_types(f32=(x2, y2), f64=(M, a, b))
    if ok:

        def impl(x2, y2, r0, r1, M, a, b):
            _cl_apply_f32(x2, y2, r0, r1, M, a, b)
            return True

        return impl
    return lambda x2, y2, r0, r1, M, a, b: False


@kernel(fastmath=FM_STRICT)
def slab_normalize(x2, y2, r0, r1, K, cm, a, b):
    """``y = ((x - K) - cm) * a + b`` per channel; one subtraction when the dtype leaves room
    (see ``row_normalize``)."""
    if not wide(x2):
        C = x2.shape[1]
        M = np.empty(C)
        fold = True
        h32 = half(x2)
        for c in range(C):
            M[c] = K[c] + cm[c]
            if not abs(M[c] * a[c]) <= FOLD_LIMIT:
                fold = False
            if not half32_ok(M[c], a[c], b[c]):
                h32 = False
        if h32:  # float16 in float32 arithmetic (see "float16 data" above)
            M32 = np.empty(C, np.float32)
            a32 = np.empty(C, np.float32)
            b32 = np.empty(C, np.float32)
            for c in range(C):
                M32[c] = np.float32(M[c])
                a32[c] = np.float32(a[c])
                b32[c] = f64_to_f32_odd(b[c])
            _slab_apply1(x2, y2, r0, r1, M32, a32, b32)
            return
        if fold:
            # (few channels would fill a fraction of each 16-lane vector: swept flat instead)
            if C < CL_PERIODIC_C or not cl_apply_vec(x2, y2, r0, r1, M, a, b):
                _slab_apply1(x2, y2, r0, r1, M, a, b)
            return
    slab_apply(x2, y2, r0, r1, K, cm, a, b)


# --------------------------------------------------------------------------------------------
# channels-last kernels


@kernel(fastmath=FM_STRICT, parallel=True)
def cl_fused(x, y, w, b, eps, mean_out, var_out):
    """One task per batch element: per-channel statistics of its slab, then normalization."""
    N = x.shape[0]
    L = x.shape[1]
    C = x.shape[2]
    for n in prange(N):
        K = np.empty(C)
        cm = np.empty(C)
        m2 = np.empty(C)
        a = np.empty(C)
        slab_pilot(x[n], K)
        slab_moments(x[n], 0, L, K, cm, m2)
        for c in range(C):
            var = m2[c] / L
            a[c] = (1.0 / np.sqrt(var + eps)) * w[c]
            mean_out[n, c] = K[c] + cm[c]
            var_out[n, c] = var
        slab_normalize(x[n], y[n], 0, L, K, cm, a, b)


@kernel(fastmath=FM_STRICT, parallel=True)
def cl_partial(x, nchunks, K_out, pn, pmean, pm2):
    """Per-channel moments of ``nchunks`` row chunks of every slab: tasks ``N * nchunks``."""
    N = x.shape[0]
    L = x.shape[1]
    C = x.shape[2]
    for t in prange(N * nchunks):
        n, j, s, e = task_span(t, nchunks, L)
        K = np.empty(C)
        slab_pilot(x[n], K)
        pn[n, j] = slab_moments(x[n], s, e, K, pmean[n, j], pm2[n, j])
        if j == 0:
            K_out[n, :] = K


@kernel(fastmath=FM_STRICT, parallel=True)
def cl_apply(x, y, nchunks, K, cm, a, b):
    """``y = ((x - K) - cm) * a + b`` with per-(n, c) K, cm, a, b: tasks ``N * nchunks``, in
    the reverse order of ``cl_partial``'s (see ``cf_apply``)."""
    N = x.shape[0]
    L = x.shape[1]
    T = N * nchunks
    for t0 in prange(T):
        t = T - 1 - t0
        n, j, s, e = task_span(t, nchunks, L)
        slab_normalize(x[n], y[n], s, e, K[n], cm[n], a[n], b[n])


# --------------------------------------------------------------------------------------------
# shared


@kernel(fastmath=FM_STRICT)
def merge_partials(pn, pmean, pm2, mean_out, m2_out):
    """Fold chunk moments ``(G, nchunks[, C])`` into per-instance ``(G, C)`` mean and M2."""
    G = pmean.shape[0]
    nch = pmean.shape[1]
    C = pmean.shape[2]
    for g in range(G):
        for c in range(C):
            n = 0.0
            mean = 0.0
            m2 = 0.0
            comp = 0.0
            for j in range(nch):
                n, mean, m2, comp = merge_moments(
                    n, mean, m2, comp, pn[g, j], pmean[g, j, c], pm2[g, j, c]
                )
            mean_out[g, c] = mean
            m2_out[g, c] = m2 + comp


# ============================================================================================
# backward
#
# Gradients of instance normalization with statistics from the input (training mode), per
# instance, given the forward's ``mean`` and ``rstd``:
#
#     d = x - mean,  S0 = sum(dy),  S1 = sum(d),  S2 = sum(dy * d)      (float64, one sweep)
#     xbar = S1 / L                 what is left of the mean after ``mean`` was rounded
#     sum(dy * xhat) = rstd * (S2 - xbar * S0)                (= grad_weight's share)
#     dx = a * (dy - S0 / L) - ((d - xbar) * k),  a = rstd * w,  k = a * rstd * sum(dy*xhat) / L
#
# ``xhat = (d - xbar) * rstd`` is centred with its own float64 mean: ``mean`` arrives rounded
# to float64, which on data far from zero (1e4 + noise) is off by many epsilon of the noise;
# re-centring removes that, as the forward's shift K does.  The sums are accumulated block by
# block (vectorized, reassociating) and the block totals compensated (Neumaier, strict), so an
# instance of millions of elements loses nothing either.  The second sweep runs while the
# instance is still in cache; instances split across threads (few, long instances) produce
# per-chunk partial sums that are added afterwards, never shared accumulators.


@kernel(fastmath=FM_STRICT)
def neumaier_add(s, comp, v):
    """``s + v`` with its rounding error added to ``comp``."""
    t = s + v
    if abs(s) >= abs(v):
        comp += (s - t) + v
    else:
        comp += (v - t) + s
    return t, comp


@kernel(fastmath=FM_STRICT)
def bwd_coeffs(n, s0, s1, s2, rstd, w):
    """From one instance's sums: ``(xbar, a, mdy, k, sum(dy * xhat))`` for the second sweep."""
    xbar = s1 / n
    sdyx = rstd * (s2 - xbar * s0)
    a = rstd * w
    mdy = s0 / n
    k = a * rstd * (sdyx / n)
    return xbar, a, mdy, k, sdyx


# --------------------------------------------------------------------------------------------
# backward, channels-first building blocks


@kernel(fastmath=FM_REDUCE)
def _bwd_block(x, dy, start, stop, m):
    xs = x[start:stop]
    gs = dy[start:stop]
    s0 = 0.0
    s1 = 0.0
    s2 = 0.0
    for i in range(xs.shape[0]):
        g = to64(gs[i])
        d = _sub(to64(xs[i]), m)
        s0 += g
        s1 += d
        s2 += g * d
    return s0, s1, s2


@kernel(fastmath=FM_STRICT)
def row_bwd_sums(x, dy, start, stop, m):
    """``(sum(dy), sum(x - m), sum(dy * (x - m)))`` over ``start:stop`` of one row."""
    s0 = 0.0
    s1 = 0.0
    s2 = 0.0
    c0 = 0.0
    c1 = 0.0
    c2 = 0.0
    b = start
    while b < stop:
        e = min(b + BLOCK, stop)
        b0, b1, b2 = _bwd_block(x, dy, b, e, m)
        s0, c0 = neumaier_add(s0, c0, b0)
        s1, c1 = neumaier_add(s1, c1, b1)
        s2, c2 = neumaier_add(s2, c2, b2)
        b = e
    return s0 + c0, s1 + c1, s2 + c2


@kernel(fastmath=FM_APPLY)
def _row_bwd_apply(x, dy, dx, start, stop, m, xbar, a, mdy, k):
    xs = x[start:stop]
    gs = dy[start:stop]
    os = dx[start:stop]
    for i in range(xs.shape[0]):
        e = _sub(_sub(to64(xs[i]), m), xbar)
        t = _sub(to64(gs[i]), mdy)
        os[i] = cast_like(a * t - e * k, os)


@kernel(fastmath=FM_APPLY)
def _row_bwd_apply1(x, dy, dx, start, stop, a, k, z):
    xs = x[start:stop]
    gs = dy[start:stop]
    os = dx[start:stop]
    for i in range(xs.shape[0]):
        t = a * to64(gs[i]) + z
        os[i] = cast_like(t - k * to64(xs[i]), os)


#: channels-first rows shorter than this keep the unfolded apply: the folded one costs about
#: 10 ns more per row (measured: 4x4 instances 18% slower, 128-element rows 10%), which only
#: rows of a thousand elements or more win back (3000-4096 elements in cache: 15% faster)
BWD_FOLD_MIN = 1024


@kernel(fastmath=FM_STRICT)
def bwd_fold(m, xbar, a, mdy, k):
    """``(fold, z)``: whether ``dx = a * dy - k * x + z`` may replace
    ``a * (dy - mdy) - ((x - m) - xbar) * k`` for float32/float16 input, and ``z``.

    The folded form adds only ``|k * (m + xbar)|`` to the magnitudes rounded in float64 (the
    two fused multiply-adds and ``z``): while that stays below FOLD_LIMIT it costs at most
    ``2**16 * 2**-51`` of ``max(1, |dx|)``, far below the 0.5 epsilon (``2**-24``) of the final
    rounding, as in ``row_normalize``.  It saves three subtractions and two broadcast
    coefficients per element."""
    M = m + xbar
    km = k * M
    return abs(km) <= FOLD_LIMIT, km - a * mdy


@kernel(fastmath=FM_STRICT)
def row_bwd_apply(x, dy, dx, start, stop, m, xbar, a, mdy, k):
    """``dx`` over ``start:stop`` of one row, folded when the dtype leaves room and the row is
    at least BWD_FOLD_MIN long."""
    if not wide(x) and stop - start >= BWD_FOLD_MIN:
        fold, z = bwd_fold(m, xbar, a, mdy, k)
        if fold:
            _row_bwd_apply1(x, dy, dx, start, stop, a, k, z)
            return
    _row_bwd_apply(x, dy, dx, start, stop, m, xbar, a, mdy, k)


# --------------------------------------------------------------------------------------------
# backward, channels-first kernels


@kernel(fastmath=FM_STRICT, parallel=True)
def cf_bwd_fused(x, dy, dx, mean, rstd, w, C, sdy_out, sdyx_out):
    """Both sweeps of each row in one task: sums, then ``dx`` while the row is hot."""
    R = x.shape[0]
    L = x.shape[1]
    for r in prange(R):
        m = mean[r]
        s0, s1, s2 = row_bwd_sums(x[r], dy[r], 0, L, m)
        xbar, a, mdy, k, sdyx = bwd_coeffs(float(L), s0, s1, s2, rstd[r], w[r % C])
        if L < BWD_FOLD_MIN:  # (decided here: a short row must not even pay for the test)
            _row_bwd_apply(x[r], dy[r], dx[r], 0, L, m, xbar, a, mdy, k)
        else:
            row_bwd_apply(x[r], dy[r], dx[r], 0, L, m, xbar, a, mdy, k)
        sdy_out[r] = s0
        sdyx_out[r] = sdyx


@kernel(fastmath=FM_STRICT, parallel=True)
def cf_bwd_partial(x, dy, mean, nchunks, ps0, ps1, ps2):
    """Sums of each of ``nchunks`` chunks of every row into ``(R, nchunks, 1)``."""
    R = x.shape[0]
    L = x.shape[1]
    for t in prange(R * nchunks):
        r, j, s, e = task_span(t, nchunks, L)
        ps0[r, j, 0], ps1[r, j, 0], ps2[r, j, 0] = row_bwd_sums(x[r], dy[r], s, e, mean[r])


@kernel(fastmath=FM_STRICT, parallel=True)
def cf_bwd_apply(x, dy, dx, nchunks, m, xbar, a, mdy, k):
    """Second sweep with per-row coefficients: tasks ``R * nchunks``."""
    R = x.shape[0]
    L = x.shape[1]
    for t in prange(R * nchunks):
        r, j, s, e = task_span(t, nchunks, L)
        row_bwd_apply(x[r], dy[r], dx[r], s, e, m[r], xbar[r], a[r], mdy[r], k[r])


# --------------------------------------------------------------------------------------------
# backward, channels-last building blocks (slab (L, C), vectorized over channels)


@kernel(fastmath=FM_REDUCE)
def _slab_bwd_block(x2, g2, b, e, m, s0, s1, s2):
    """Per-channel sums of rows b..e into ``s0, s1, s2``, four rows per sweep over the
    channels: a quarter of the accumulator loads and stores (they, not the arithmetic, bound
    this loop; see ``_slab_block1``)."""
    C = x2.shape[1]
    xs = x2[b:e]
    gs = g2[b:e]
    nb = xs.shape[0]
    for c in range(C):
        s0[c] = 0.0
        s1[c] = 0.0
        s2[c] = 0.0
    i = 0
    if C < CL_PERIODIC_C and nb >= CL_PERIODIC_ROWS:
        # few channels: periodic flat stretches, as in ``_slab_block1``
        W = CL_PERIODIC_ROWS * C
        nfull = nb // CL_PERIODIC_ROWS
        xf = xs[: nfull * CL_PERIODIC_ROWS].reshape(nfull * W)
        gf = gs[: nfull * CL_PERIODIC_ROWS].reshape(nfull * W)
        mw = np.empty(W)
        a0 = np.zeros(W)
        a1 = np.zeros(W)
        a2 = np.zeros(W)
        for q in range(W):
            mw[q] = m[q % C]
        for j in range(nfull):
            xq = xf[j * W : (j + 1) * W]
            gq = gf[j * W : (j + 1) * W]
            for q in range(W):
                g = to64(gq[q])
                d = _sub(to64(xq[q]), mw[q])
                a0[q] += g
                a1[q] += d
                a2[q] += g * d
        for q in range(W):
            s0[q % C] += a0[q]
            s1[q % C] += a1[q]
            s2[q % C] += a2[q]
        i = nfull * CL_PERIODIC_ROWS
    while i + 4 <= nb:
        xa = xs[i]
        xb = xs[i + 1]
        xc = xs[i + 2]
        xd = xs[i + 3]
        ga = gs[i]
        gb = gs[i + 1]
        gc = gs[i + 2]
        gd = gs[i + 3]
        for c in range(C):
            mc = m[c]
            g0 = to64(ga[c])
            g1 = to64(gb[c])
            g2_ = to64(gc[c])
            g3 = to64(gd[c])
            d0 = _sub(to64(xa[c]), mc)
            d1 = _sub(to64(xb[c]), mc)
            d2 = _sub(to64(xc[c]), mc)
            d3 = _sub(to64(xd[c]), mc)
            s0[c] += (g0 + g1) + (g2_ + g3)
            s1[c] += (d0 + d1) + (d2 + d3)
            s2[c] += (g0 * d0 + g1 * d1) + (g2_ * d2 + g3 * d3)
        i += 4
    while i < nb:
        xr = xs[i]
        gr = gs[i]
        for c in range(C):
            g = to64(gr[c])
            d = _sub(to64(xr[c]), m[c])
            s0[c] += g
            s1[c] += d
            s2[c] += g * d
        i += 1


@kernel(fastmath=FM_STRICT)
def slab_bwd_sums(x2, g2, r0, r1, m, S0, S1, S2):
    """Per-channel sums over rows ``r0:r1`` of a slab into ``S0, S1, S2`` (shape (C,)).

    Blocks of float32/float16 rows are as large as the forward's one-pass blocks: the block
    totals are compensated, and fewer blocks mean fewer strict scalar merges per channel."""
    C = x2.shape[1]
    if wide(x2):
        rb = cl_rows_per_block(C)
    else:  # as slab_moments
        rb = max(1, CL_BLOCK_ELEMS1 // max(C, 1))
        if C >= CL_PERIODIC_C:
            rb = min(CL_MAX_ROWS1, rb)
    b0 = np.empty(C)
    b1 = np.empty(C)
    b2 = np.empty(C)
    c0 = np.zeros(C)
    c1 = np.zeros(C)
    c2 = np.zeros(C)
    for c in range(C):
        S0[c] = 0.0
        S1[c] = 0.0
        S2[c] = 0.0
    b = r0
    while b < r1:
        e = min(b + rb, r1)
        _slab_bwd_block(x2, g2, b, e, m, b0, b1, b2)
        for c in range(C):
            S0[c], c0[c] = neumaier_add(S0[c], c0[c], b0[c])
            S1[c], c1[c] = neumaier_add(S1[c], c1[c], b1[c])
            S2[c], c2[c] = neumaier_add(S2[c], c2[c], b2[c])
        b = e
    for c in range(C):
        S0[c] += c0[c]
        S1[c] += c1[c]
        S2[c] += c2[c]


@kernel(fastmath=FM_APPLY)
def _slab_bwd_apply(x2, g2, o2, r0, r1, m, xbar, a, mdy, k):
    C = x2.shape[1]
    xs = x2[r0:r1]
    gs = g2[r0:r1]
    os = o2[r0:r1]
    for i in range(xs.shape[0]):
        for c in range(C):
            e = _sub(_sub(to64(xs[i, c]), m[c]), xbar[c])
            t = _sub(to64(gs[i, c]), mdy[c])
            os[i, c] = cast_like(a[c] * t - e * k[c], os)


#: the folded channels-last apply sweeps stretches of whole rows at least this many elements long
CL_BWD_STRETCH = 512


@kernel(fastmath=FM_APPLY)
def _slab_bwd_apply1(x2, g2, o2, r0, r1, a, k, z):
    """Folded ``dx`` of rows r0..r1, the rows seen flat: stretches of P whole rows (``W = P*C``
    elements, coefficients tiled to W), one loop long enough to vectorize whatever C is, with
    no per-row setup (C = 64 rows are only eight vectors long)."""
    C = x2.shape[1]
    xs = x2[r0:r1]
    gs = g2[r0:r1]
    os = o2[r0:r1]
    n = xs.shape[0]
    P = max(1, CL_BWD_STRETCH // max(C, 1))
    W = P * C
    nfull = n // P
    i0 = nfull * P
    if nfull > 0:
        xf = xs[:i0].reshape(nfull * W)
        gf = gs[:i0].reshape(nfull * W)
        of = os[:i0].reshape(nfull * W)
        aw = np.empty(W)
        kw = np.empty(W)
        zw = np.empty(W)
        for q in range(W):
            aw[q] = a[q % C]
            kw[q] = k[q % C]
            zw[q] = z[q % C]
        for j in range(nfull):
            xq = xf[j * W : (j + 1) * W]
            gq = gf[j * W : (j + 1) * W]
            oq = of[j * W : (j + 1) * W]
            for q in range(W):
                t = aw[q] * to64(gq[q]) + zw[q]
                oq[q] = cast_like(t - kw[q] * to64(xq[q]), oq)
    for i in range(i0, n):
        xr = xs[i]
        gr = gs[i]
        orow = os[i]
        for c in range(C):
            t = a[c] * to64(gr[c]) + z[c]
            orow[c] = cast_like(t - k[c] * to64(xr[c]), orow)


@kernel(fastmath=FM_STRICT)
def slab_bwd_apply(x2, g2, o2, r0, r1, m, xbar, a, mdy, k):
    """``dx`` over rows ``r0:r1`` of a slab; folded (see ``bwd_fold``) when every channel
    allows it."""
    if not wide(x2):
        C = x2.shape[1]
        z = np.empty(C)
        fold = True
        for c in range(C):
            ok, z[c] = bwd_fold(m[c], xbar[c], a[c], mdy[c], k[c])
            if not ok:
                fold = False
        if fold:
            _slab_bwd_apply1(x2, g2, o2, r0, r1, a, k, z)
            return
    _slab_bwd_apply(x2, g2, o2, r0, r1, m, xbar, a, mdy, k)


# --------------------------------------------------------------------------------------------
# backward, channels-last kernels


@kernel(fastmath=FM_STRICT, parallel=True)
def cl_bwd_fused(x, dy, dx, mean, rstd, w, sdy_out, sdyx_out):
    """One task per batch element: per-channel sums of its slab, then ``dx``."""
    N = x.shape[0]
    L = x.shape[1]
    C = x.shape[2]
    for n in prange(N):
        S0 = np.empty(C)
        S1 = np.empty(C)
        S2 = np.empty(C)
        xbar = np.empty(C)
        a = np.empty(C)
        mdy = np.empty(C)
        k = np.empty(C)
        slab_bwd_sums(x[n], dy[n], 0, L, mean[n], S0, S1, S2)
        for c in range(C):
            xbar[c], a[c], mdy[c], k[c], sdyx_out[n, c] = bwd_coeffs(
                float(L), S0[c], S1[c], S2[c], rstd[n, c], w[c]
            )
            sdy_out[n, c] = S0[c]
        slab_bwd_apply(x[n], dy[n], dx[n], 0, L, mean[n], xbar, a, mdy, k)


@kernel(fastmath=FM_STRICT, parallel=True)
def cl_bwd_partial(x, dy, mean, nchunks, ps0, ps1, ps2):
    """Per-channel sums of ``nchunks`` row chunks of every slab into ``(N, nchunks, C)``."""
    N = x.shape[0]
    L = x.shape[1]
    for t in prange(N * nchunks):
        n, j, s, e = task_span(t, nchunks, L)
        slab_bwd_sums(x[n], dy[n], s, e, mean[n], ps0[n, j], ps1[n, j], ps2[n, j])


@kernel(fastmath=FM_STRICT, parallel=True)
def cl_bwd_apply(x, dy, dx, nchunks, m, xbar, a, mdy, k):
    """Second sweep with per-(n, c) coefficients: tasks ``N * nchunks``.  (Not in reverse
    order as ``cf_apply``: measured slower here, x and dy together outgrow the cache.)"""
    N = x.shape[0]
    L = x.shape[1]
    T = N * nchunks
    for t in prange(T):
        n, j, s, e = task_span(t, nchunks, L)
        slab_bwd_apply(x[n], dy[n], dx[n], s, e, m[n], xbar[n], a[n], mdy[n], k[n])


# --------------------------------------------------------------------------------------------
# backward, shared


@kernel(fastmath=FM_STRICT)
def bwd_finish(L, ps0, ps1, ps2, rstd, w, xbar, a, mdy, k, sdy, sdyx):
    """Add chunk sums ``(G, nchunks, Cp)`` per instance; coefficients into ``(G, Cp)`` arrays."""
    G = ps0.shape[0]
    nch = ps0.shape[1]
    Cp = ps0.shape[2]
    for g in range(G):
        for c in range(Cp):
            s0 = 0.0
            s1 = 0.0
            s2 = 0.0
            c0 = 0.0
            c1 = 0.0
            c2 = 0.0
            for j in range(nch):
                s0, c0 = neumaier_add(s0, c0, ps0[g, j, c])
                s1, c1 = neumaier_add(s1, c1, ps1[g, j, c])
                s2, c2 = neumaier_add(s2, c2, ps2[g, j, c])
            s0 += c0
            xbar[g, c], a[g, c], mdy[g, c], k[g, c], sdyx[g, c] = bwd_coeffs(
                float(L), s0, s1 + c1, s2 + c2, rstd[g, c], w[g, c]
            )
            sdy[g, c] = s0
