"""Masks and variable lengths (issue 13): which elements are valid, checked and canonicalised,
and the masked forward and backward dispatch.  Called by ``_api`` after it validated everything
else; no loops over data live here either.

The valid set is named by one of

* ``lengths``, an integer array_like of shape ``(N,)`` for input with one spatial axis: the
  first ``lengths[n]`` positions of sample ``n``;
* ``mask``, a boolean array_like of shape ``(N, *spatial)``, or ``(N, 1, *spatial)`` /
  ``(N, C, *spatial)`` in the layout of ``x`` (broadcastable to ``x`` without enlarging its
  channel axis); True marks a valid element;
* the mask of a ``numpy.ma.MaskedArray`` ``x`` (``~x.mask`` is valid).

A valid set that covers every element runs the dense kernels: the result is then exactly the
unmasked one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import _kernels as K
from ._api import (
    _kernel_view,
    _moved,
    _same_memory,
    as_layout,
    canonicalize,
    layout_plan,
    prepare_output,
)
from ._args import (
    _fmt_shape,
    as_array,
)
from ._jit import dispatch, num_threads

__all__ = ["Valid", "resolve", "forward", "backward", "valid_mask"]


@dataclass
class Valid:
    """A checked valid set: ``lengths`` (N,) int64, or ``mask`` in ``x``'s layout with a channel
    axis of size ``Cm`` (1 or C); ``ma_mask`` the MaskedArray mask to give back, if any."""

    lengths: np.ndarray | None
    mask: np.ndarray | None
    ma_mask: np.ndarray | None
    dense: bool


def unmask(x):
    """``(data, mask)`` of a ``numpy.ma.MaskedArray`` (its full boolean mask, True = masked),
    else ``(x, None)``."""
    if isinstance(x, np.ma.MaskedArray):
        return np.ma.getdata(x), np.ma.getmaskarray(x)
    return x, None


def _lengths(lengths, shape) -> np.ndarray:
    N = shape[0]
    if len(shape) != 3:
        raise ValueError(
            f"lengths needs an input with exactly one spatial axis (ndim 3); got x of shape "
            f"{_fmt_shape(shape)}: use mask= for more spatial axes"
        )
    arr = as_array(lengths, "lengths", "an array_like of integers")
    if arr.dtype.kind not in "iu":
        raise TypeError(
            f"lengths must have an integer dtype; got dtype {arr.dtype} ({_short(lengths)})"
        )
    if arr.shape != (N,):
        raise ValueError(
            f"lengths must have shape ({N},), one length per sample of x; got shape "
            f"{_fmt_shape(arr.shape)}"
        )
    return arr


def _short(v) -> str:
    r = repr(v)
    return r if len(r) <= 80 else r[:77] + "..."


def resolve(mask, lengths, ma_mask, shape, axis: int, L: int) -> Valid:
    """Check ``mask`` / ``lengths`` (or a MaskedArray's mask) against ``x``'s ``shape``."""
    if mask is not None and lengths is not None:
        raise ValueError("mask and lengths name the same thing: give at most one of them")
    if ma_mask is not None and (mask is not None or lengths is not None):
        given = "mask" if mask is not None else "lengths"
        raise ValueError(
            f"x is a numpy.ma.MaskedArray, whose mask names the valid elements; {given} "
            "cannot be given as well"
        )
    if lengths is not None:
        arr = _lengths(lengths, shape)
        lo, hi = (arr.min(), arr.max()) if arr.size else (L, L)  # (2 reductions, not 4)
        if lo < 0 or hi > L:
            i = int(np.flatnonzero((arr < 0) | (arr > L))[0])
            raise ValueError(
                f"lengths must lie in 0..{L} (the spatial length of x); got lengths[{i}]={arr[i]}"
            )
        out = np.ascontiguousarray(arr, dtype=np.int64)
        return Valid(out, None, None, bool(lo == L))
    if ma_mask is not None:
        valid = ~ma_mask
        return Valid(None, valid, ma_mask, bool(valid.all()))
    arr = as_array(mask, "mask", "a boolean array_like")
    if arr.dtype != np.bool_:
        raise TypeError(
            f"mask must be a boolean array_like (True marks a valid element); got dtype {arr.dtype}"
        )
    nd = len(shape)
    axis %= nd
    if arr.ndim == nd - 1:  # (a reshape: np.expand_dims costs 3 us)
        arr = arr.reshape(arr.shape[:axis] + (1,) + arr.shape[axis:])
    bad = arr.ndim != nd or any(m not in (1, s) for m, s in zip(arr.shape, shape, strict=False))
    if bad:
        no_c = tuple(s for i, s in enumerate(shape) if i != axis)
        with_1 = tuple(1 if i == axis else s for i, s in enumerate(shape))
        raise ValueError(
            f"mask must be broadcastable to x's shape {_fmt_shape(shape)} without enlarging "
            f"its channel axis: {_fmt_shape(no_c)}, {_fmt_shape(with_1)} or "
            f"{_fmt_shape(shape)}; got shape {_fmt_shape(np.shape(mask))}"
        )
    full = shape[:axis] + (arr.shape[axis],) + shape[axis + 1 :]
    if arr.shape != full:
        arr = np.broadcast_to(arr, full)
    return Valid(None, arr, None, bool(arr.all()))


def _canonical_mask(valid: Valid, lay):
    """The mask as the kernels want it: (N*Cm, L) or (N, L, Cm) of uint8, and Cm."""
    m = valid.mask
    Cm = m.shape[lay.axis]
    v = _moved(m, lay.axis, lay.kind)
    shape = (lay.N * Cm, lay.L) if lay.kind == "cf" else (lay.N, lay.L, Cm)
    mk = np.ascontiguousarray(v).reshape(shape).view(np.uint8)
    # always read-only: Numba compiles a read-only and a writeable argument separately, and two
    # compilations of one kernel may round its reassociated sums differently (a kernel
    # compiled in this process and one loaded from the disk cache did: 1 ulp, float64), so a
    # MaskedArray (writeable mask) and the same mask= (a read-only broadcast) ran different
    # machine code
    mk.flags.writeable = False
    return mk, Cm


def _split_forward(lay, xk, yk, lengths, mk, w, b, eps, nch):
    """Few long instances, split across the threads as the dense ones are: chunk moments
    around each instance's shift, merged per instance, then the apply by chunks.  Returns the
    ``(N, C)`` mean, variance and count."""
    N, C = lay.N, lay.C
    cf = lay.kind == "cf"
    G, Cp = (N * C, 1) if cf else (N, C)
    shift = np.empty(G) if cf else np.empty((G, C))
    per_channel_counts = not cf and lengths is None  # (cl_mask_partial counts per channel)
    pn = np.empty((G, nch, C) if per_channel_counts else (G, nch))
    pmean = np.empty((G, nch, Cp))
    pm2 = np.empty((G, nch, Cp))
    if lengths is not None:
        if cf:
            dispatch(K.cf_len_partial, True, xk, lengths, C, nch, shift, pn, pmean, pm2)
        else:
            dispatch(K.cl_len_partial, True, xk, lengths, nch, shift, pn, pmean, pm2)
    elif cf:
        Cm = mk.shape[0] // N
        dispatch(K.cf_mask_shift, False, xk, mk, Cm, C, shift)  # (few rows)
        dispatch(K.cf_mask_partial, True, xk, mk, Cm, C, nch, shift, pn, pmean, pm2)
    else:
        dispatch(K.cl_mask_shift, False, xk, mk, shift)  # (few slabs)
        dispatch(K.cl_mask_partial, True, xk, mk, nch, shift, pn, pmean, pm2)
    mean, var, count, cm, a, bb = (np.empty((G, Cp)) for _ in range(6))
    stats = (mean, var, count, cm, a, bb)
    K.finish_partials(pn, pmean, pm2, shift.reshape(G, Cp), w, b, eps, *stats)
    if cf:
        args = (nch, shift, cm.reshape(-1), a.reshape(-1), bb.reshape(-1))
        if lengths is not None:
            dispatch(K.cf_len_apply_split, True, xk, yk, lengths, C, *args)
        else:
            dispatch(K.cf_mask_apply, True, xk, mk, Cm, yk, C, *args)
    elif lengths is not None:
        dispatch(K.cl_len_apply_split, True, xk, yk, lengths, nch, shift, cm, a, bb)
    else:
        dispatch(K.cl_mask_apply, True, xk, mk, yk, nch, shift, cm, a, bb)
    return mean.reshape(N, C), var.reshape(N, C), count.reshape(N, C)


def _split_backward(lay, xk, gk, dk, lengths, mk, count, mean, rstd, w, sdy, sdyx, nch):
    """The backward of few long instances, split as the dense one is: chunk sums, added per
    instance with its own count (``bwd_finish``), then the second sweep by chunks; ``sdy``
    and ``sdyx`` (N, C) are filled in."""
    N, C = lay.N, lay.C
    cf = lay.kind == "cf"
    G, Cp = (N * C, 1) if cf else (N, C)
    ps0, ps1, ps2 = (np.empty((G, nch, Cp)) for _ in range(3))
    m = np.ascontiguousarray(mean.reshape(G, Cp))
    mg = m.reshape(-1) if cf else m
    Cm = 0 if mk is None else mk.shape[0] // N
    if lengths is not None:
        if cf:
            dispatch(K.cf_bwd_len_partial, True, xk, gk, lengths, C, mg, nch, ps0, ps1, ps2)
        else:
            dispatch(K.cl_bwd_len_partial, True, xk, gk, lengths, mg, nch, ps0, ps1, ps2)
    else:  # a mask: the chunks' counts come with their sums
        pc = np.empty((G, nch, Cp))
        if cf:
            args = (Cm, C, mg, nch, ps0, ps1, ps2, pc)
            dispatch(K.cf_bwd_mask_partial, True, xk, gk, mk, *args)
        else:
            dispatch(K.cl_bwd_mask_partial, True, xk, gk, mk, mg, nch, ps0, ps1, ps2, pc)
        count = pc.sum(axis=1).reshape(N, C)
    n = np.ascontiguousarray(np.broadcast_to(count, (N, C)), dtype=np.float64).reshape(G, Cp)
    wg = np.ascontiguousarray(np.broadcast_to(w, (N, C))).reshape(G, Cp)
    rg = np.ascontiguousarray(rstd, dtype=np.float64).reshape(G, Cp)
    xbar, a, mdy, k = (np.empty((G, Cp)) for _ in range(4))
    sums = (sdy.reshape(G, Cp), sdyx.reshape(G, Cp))
    K.bwd_finish(n, ps0, ps1, ps2, rg, wg, xbar, a, mdy, k, *sums)  # (zeros where n == 0)
    coeffs = (m, xbar, a, mdy, k)
    if cf:
        coeffs = tuple(t.reshape(-1) for t in coeffs)
        if lengths is not None:
            dispatch(K.cf_bwd_len_apply, True, xk, gk, dk, lengths, C, nch, *coeffs)
        else:
            dispatch(K.cf_bwd_mask_apply, True, xk, gk, dk, mk, Cm, C, nch, *coeffs)
    elif lengths is not None:
        dispatch(K.cl_bwd_len_apply, True, xk, gk, dk, lengths, nch, *coeffs)
    else:
        dispatch(K.cl_bwd_mask_apply, True, xk, gk, dk, mk, nch, *coeffs)


def _remask(result, valid: Valid, out):
    """The result given back as a MaskedArray when the input was one."""
    if valid.ma_mask is None:
        return result
    if isinstance(out, np.ma.MaskedArray) and result is not None:
        out.mask = valid.ma_mask.copy()
        return out
    return np.ma.MaskedArray(result, mask=valid.ma_mask.copy())


def _out_data(out):
    return np.ma.getdata(out) if isinstance(out, np.ma.MaskedArray) else out


def valid_mask(valid: Valid, shape, axis: int) -> np.ndarray:
    """The valid set as a boolean array of ``x``'s shape (read-only, maybe a broadcast view)."""
    if valid.lengths is not None:
        m = np.arange(shape[3 - axis])[None, :] < valid.lengths[:, None]  # (N, L)
        return np.broadcast_to(np.expand_dims(m, axis), shape)
    return np.broadcast_to(valid.mask, shape)


def forward(
    x,
    axis,
    dtype,
    w,
    b,
    eps,
    running_mean,
    running_var,
    use_input_stats,
    update,
    momentum,
    out,
    return_stats,
    valid: Valid,
):
    """``instance_norm`` over the valid elements only (arguments already checked by ``_api``,
    ``out`` too)."""
    if valid.dense:  # every element valid: the dense kernels, exactly the unmasked result
        from ._api import instance_norm

        res = instance_norm(
            x,
            w,
            b,
            eps=eps,
            channel_axis=axis,
            running_mean=running_mean,
            running_var=running_var,
            use_input_stats=use_input_stats,
            momentum=momentum,
            out=_out_data(out),
            return_stats=return_stats,
        )
        if return_stats:
            return (_remask(res[0], valid, out), res[1], res[2])
        return _remask(res, valid, out)

    out_arr = _out_data(out)
    lay = canonicalize(x, axis, dtype)
    y, result, target = prepare_output(lay, x, out_arr, dtype)
    N, C = lay.N, lay.C
    xk, yk = _kernel_view(lay.data), _kernel_view(y)
    parallel, nch = layout_plan(lay)
    split = nch > 1  # few long instances: split across the threads as the dense ones are
    T = num_threads() if parallel else 1  # (the lengths kernels share out rows by cost)
    cf = lay.kind == "cf"
    lengths = valid.lengths
    mk, Cm = None, 0
    count = None  # (N, C) valid elements per instance: made for lengths only when needed
    if lengths is None:
        mk, Cm = _canonical_mask(valid, lay)
        count = np.empty((N, C))
    with np.errstate(all="ignore"):
        if use_input_stats:
            if y.size:  # the kernels fill every instance's statistics (NaN where none is valid)
                mean, var = np.empty((N, C)), np.empty((N, C))
            else:
                mean, var = np.full((N, C), np.nan), np.full((N, C), np.nan)
            if y.size and split:
                mean, var, count = _split_forward(lay, xk, yk, lengths, mk, w, b, eps, nch)
            elif y.size and lengths is not None:
                if cf:
                    stats = (mean.reshape(-1), var.reshape(-1))
                    dispatch(K.cf_len_fused, parallel, xk, yk, lengths, T, w, b, C, eps, *stats)
                else:
                    dispatch(K.cl_len_fused, parallel, xk, yk, lengths, T, w, b, eps, mean, var)
            elif y.size:
                if cf:
                    stats = (mean.reshape(-1), var.reshape(-1), count.reshape(-1))
                    dispatch(K.cf_mask_fused, parallel, xk, mk, Cm, yk, w, b, C, eps, *stats)
                else:
                    dispatch(K.cl_mask_fused, parallel, xk, mk, yk, w, b, eps, mean, var, count)
            else:
                count = np.zeros((N, C))
            if return_stats:
                rstd = 1.0 / np.sqrt(var + eps)
        else:
            mean = np.ascontiguousarray(
                np.broadcast_to(np.asarray(running_mean, dtype=np.float64), (N, C))
            )
            rv = np.asarray(running_var, dtype=np.float64)
            rstd = np.ascontiguousarray(np.broadcast_to(1.0 / np.sqrt(rv + eps), (N, C)))
            a = rstd * w
            bb = np.ascontiguousarray(np.broadcast_to(b, (N, C)))
            zero = np.zeros_like(mean)
            ch = max(nch, 1)
            if y.size:
                if cf:
                    rows = (mean.reshape(-1), a.reshape(-1), bb.reshape(-1))
                    if lengths is None:
                        z = zero.reshape(-1)
                        args = (ch, rows[0], z, rows[1], rows[2])
                        dispatch(K.cf_mask_apply, parallel, xk, mk, Cm, yk, C, *args)
                    elif split:
                        args = (nch, rows[0], zero.reshape(-1), rows[1], rows[2])
                        dispatch(K.cf_len_apply_split, parallel, xk, yk, lengths, C, *args)
                    else:
                        dispatch(K.cf_len_apply, parallel, xk, yk, lengths, T, C, *rows)
                elif lengths is None:
                    dispatch(K.cl_mask_apply, parallel, xk, mk, yk, ch, mean, zero, a, bb)
                elif split:
                    args = (nch, mean, zero, a, bb)
                    dispatch(K.cl_len_apply_split, parallel, xk, yk, lengths, *args)
                else:
                    dispatch(K.cl_len_apply, parallel, xk, yk, lengths, T, mean, a, bb)
        if target is not None:
            np.copyto(target, lay.restore(y))
            result = target
        if update and N > 0:
            if count is None:
                count = np.broadcast_to(lengths.astype(np.float64)[:, None], (N, C))
            _running_update(running_mean, running_var, mean, var, count, momentum)
    result = _remask(result, valid, out)
    if return_stats:
        return result, mean, rstd
    return result


def _running_update(running_mean, running_var, mean, var, count, momentum):
    """Average over the instances that have statistics: a mean needs one valid element, an
    unbiased variance two.  A channel with no such instance keeps its running value."""
    has_mean = count > 0
    has_var = count > 1
    nm = has_mean.sum(axis=0)
    nv = has_var.sum(axis=0)
    m_avg = np.where(has_mean, mean, 0.0).sum(axis=0) / np.maximum(nm, 1)
    unbiased = np.where(has_var, var * count / np.where(has_var, count - 1, 1), 0.0)
    v_avg = unbiased.sum(axis=0) / np.maximum(nv, 1)
    new_m = (1.0 - momentum) * running_mean + momentum * m_avg
    new_v = (1.0 - momentum) * running_var + momentum * v_avg
    running_mean[...] = np.where(nm > 0, new_m, running_mean)
    running_var[...] = np.where(nv > 0, new_v, running_var)


def backward(g, x, mean, rstd, w, axis, dtype, out, valid: Valid):
    """``instance_norm_backward`` of the masked forward (arguments already checked)."""
    from ._api import instance_norm_backward

    if valid.dense:
        gx, gw, gb = instance_norm_backward(
            g, x, mean, rstd, w, channel_axis=axis, out=_out_data(out)
        )
        return _remask(gx, valid, None), gw, gb
    out = _out_data(out)
    lay = canonicalize(x, axis, dtype)
    N, C = lay.N, lay.C
    gk, g_copied = as_layout(lay, g, dtype)
    dx, result, target = prepare_output(lay, x, out, dtype)
    if out is not None and target is None and not g_copied and np.may_share_memory(out, g):
        if not _same_memory(dx, gk):  # out partly overlaps grad_output: go through a temporary
            dx, result, target = np.empty(lay.canonical_shape, dtype), None, out
    sdy = np.zeros((N, C))
    sdyx = np.zeros((N, C))
    if dx.size:
        xk, gv, dk = _kernel_view(lay.data), _kernel_view(gk), _kernel_view(dx)
        parallel, nch = layout_plan(lay)
        T = num_threads() if parallel else 1
        cf = lay.kind == "cf"
        if valid.lengths is not None:
            mk, Cm, count = None, 0, valid.lengths[:, None]
        else:
            mk, Cm = _canonical_mask(valid, lay)
            count = None  # (the split counts in its partial sums)
            if nch <= 1:
                count = np.empty((N, C))
                if cf:
                    dispatch(K.cf_mask_count, parallel, mk, Cm, N * C, C, count.reshape(-1))
                else:
                    dispatch(K.cl_mask_count, parallel, mk, C, count)
        stats = (mean, rstd, w, sdy, sdyx)
        if cf:
            rows = (mean.reshape(-1), rstd.reshape(-1), w, C, sdy.reshape(-1), sdyx.reshape(-1))
        if nch > 1:  # few long instances: split across the threads as the dense ones are
            _split_backward(lay, xk, gv, dk, valid.lengths, mk, count, *stats, nch)
        elif valid.lengths is not None:
            if cf:
                dispatch(K.cf_bwd_len_fused, parallel, xk, gv, dk, valid.lengths, T, *rows)
            else:
                dispatch(K.cl_bwd_len_fused, parallel, xk, gv, dk, valid.lengths, T, *stats)
        elif cf:
            cnt = count.reshape(-1)
            dispatch(K.cf_bwd_mask_fused, parallel, xk, gv, dk, mk, Cm, cnt, *rows)
        else:
            dispatch(K.cl_bwd_mask_fused, parallel, xk, gv, dk, mk, count, *stats)
    if target is not None:
        np.copyto(target, lay.restore(dx))
        result = target
    return _remask(result, valid, None), sdyx.sum(axis=0), sdy.sum(axis=0)
