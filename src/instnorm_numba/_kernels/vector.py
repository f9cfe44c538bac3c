"""Explicit vector code (LLVM IR through Numba intrinsics): a reader may skip this module.

Two loops LLVM's vectorizer cannot vectorize well are written here, for float32 data on CPUs
with AVX2 and up (``HAS_SIMD_ROWS``, chosen at import; elsewhere the overloads answer "take the
general path" and the loops in ``rows`` / ``slabs`` run):

* ``rows8``: rows of at most ``SIMD_ROW`` (16) elements, eight rows at a time (``_rows8_f32``);
* ``cl_apply_vec``: the channels-last normalization, 16 channels at a time down blocks of rows,
  with their coefficients held in registers (``_cl_columns``).

They do the same arithmetic as the loops they replace, operation for operation.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from .elements import FOLD_LIMIT, _target_features

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


#: the vector channels-last apply sweeps blocks of rows of about this many elements
CL_APPLY_BLOCK = 512


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
