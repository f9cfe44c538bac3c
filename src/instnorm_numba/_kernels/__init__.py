"""Numba kernels: canonical, contiguous inputs only; no validation happens here.

``_api`` makes the layouts and calls only the entry kernels in ``__all__``, through
``_jit.dispatch`` (parallel kernel or its serial twin):

* channels-first: ``x`` is ``(R, L)``, one row per ``(n, c)`` instance, ``R = N*C``;
* channels-last: ``x`` is ``(N, L, C)``, instance ``(n, c)`` is column ``c`` of slab ``n``.

Element types: float32, float64, and float16 carried as its ``uint16`` bit pattern.

The modules, one family each (read them in this order; ``vector`` may be skipped):

=================  ===========================================================================
``elements``       float16 conversion (F16C or integer), ``to64`` / ``cast_like``, the folded
                   element expression ``affine_like`` and when it may be used
``moments``        the shift, block moments (two-pass float64, one-pass float32/float16),
                   Chan and Neumaier merges, task spans, backward coefficients
``vector``         explicit vector IR (AVX2+): eight short rows at once, channels-last apply
``rows``           channels-first forward: fused rows, split rows, short rows
``rows_backward``  channels-first backward
``slabs``          channels-last forward, and the slab helpers the backward shares
``slabs_backward`` channels-last backward
``roofline``       the parallel copy the benchmarks time as the speed limit
``chunks``         an input held in parts (Dask chunks): one part's moments around a given
                   shift, the parts' exact merge, compensated sums of the backward's parts
``lengths``        ``lengths=``: the dense machinery on each valid prefix, both layouts
``masked_rows``    ``mask=`` on channels-first rows, forward and backward
``masked_slabs``   ``mask=`` on channels-last slabs, forward and backward
=================  ===========================================================================

Which path runs (NB: the one table; ``_api.layout_plan`` computes ``parallel`` and ``nchunks``
from the thread count, and the kernels make the per-row choices themselves):

===================================  =========================================================
input                                path
===================================  =========================================================
fewer than 65536 elements, one       the serial twin of the kernel below (``_jit.dispatch``;
thread, a forked OpenMP child,       also under ``workqueue`` when another thread holds it)
or no threading layer
channels-first, ``L <= SHORT_ROW``   ``cf_short``: blocks of 64 rows per task.  float64: exact
                                     two-pass rows.  float32 with AVX2 and ``L <= 16``:
                                     ``vector.rows8``, eight rows at a time.  Otherwise
                                     one-pass rows, statistics of the block first
channels-first, longer rows          ``cf_fused``: a row per task.  Split across threads
                                     (``cf_partial`` -> ``merge_partials`` -> ``cf_apply``)
                                     when the rows are few against the threads and at least
                                     16384 long (``_api.plan``)
channels-last                        ``cl_fused``: a slab per task; split into row chunks
                                     (``cl_partial`` -> ``merge_partials`` -> ``cl_apply``)
                                     when the slabs are few, as above
per dtype, in every path             float64: two-pass blocks, exact double subtraction.
                                     float32/float16: one-pass blocks; the folded apply while
                                     ``|M * a| <= FOLD_LIMIT``; float16 in float32 arithmetic
                                     while ``half32_ok``; F16C conversions where the CPU has
                                     them (``HAS_F16C``)
channels-last apply                  float32 with AVX2 and ``C >= 16``: ``vector.cl_apply_vec``;
                                     ``C < 16``: flat periodic stretches
backward                             the same choice of fused / split kernels
                                     (``cf_bwd_*``, ``cl_bwd_*``, ``bwd_finish``); channels-
                                     first rows of at least ``BWD_FOLD_MIN`` elements and every
                                     channels-last slab use the folded apply when it is exact
                                     enough (``moments.bwd_fold``)
an input in parts (``dask``, the     spatial axes in one part: the paths above on each part.
public moments API), spatial axes    Otherwise ``cf_chunk_shift`` / ``cl_chunk_shift`` on
split                                the part holding each instance's first elements, then
                                     ``cf_chunk_moments`` / ``cl_chunk_moments`` of every
                                     part around that shift, ``merge_chunks`` over the parts
                                     (a tree), and ``cf_apply`` / ``cl_apply`` per part
                                     (``nchunks=1``); the backward: ``cf_bwd_partial`` /
                                     ``cl_bwd_partial`` per part, ``add_chunks``,
                                     ``bwd_finish``, ``cf_bwd_apply`` / ``cl_bwd_apply``.
                                     Serial twins inside each part's task
``lengths=`` (one spatial axis)      ``cf_len_fused`` / ``cl_len_fused``: the dense row or
                                     slab machinery on the valid prefix ``x[r, :len]`` /
                                     ``x[n, :len]``, the padding zero-filled; one contiguous
                                     run of rows / slabs per thread, of equal cost
                                     (``lengths.balanced_tasks``).  ``*_len_apply`` with
                                     running statistics, ``*_bwd_len_fused`` backward.
                                     Split as the dense ones are (same ``_api.layout_plan``):
                                     ``*_len_partial`` -> ``finish_partials`` ->
                                     ``*_len_apply_split``, chunks of each valid prefix and of
                                     each padding
``mask=`` (or a MaskedArray)         ``cf_mask_fused``: a row per task, moments with a select
                                     and a count per block.  ``cl_mask_fused``: a slab per
                                     task; one mask for all channels is a row mask
                                     (``slabs.slab_moments`` / ``slab_bwd_sums`` with a row
                                     mask: all-valid blocks take the dense block kernels; runs
                                     of valid rows the dense apply), a mask per channel
                                     selects each element.
                                     ``*_mask_apply``, ``*_mask_count``, ``*_bwd_mask_fused``.
                                     Split as the dense ones are: ``*_mask_shift`` ->
                                     ``*_mask_partial`` -> ``finish_partials`` (counts per
                                     chunk, per channel for channels-last) ->
                                     ``*_mask_apply``.  The backwards likewise:
                                     ``*_bwd_len_partial`` / ``*_bwd_mask_partial`` ->
                                     ``bwd_finish`` (each instance's count) ->
                                     ``*_bwd_len_apply`` / ``*_bwd_mask_apply``
every element valid                  the dense kernels (``_masked.forward``)
===================================  =========================================================

Fast-math flags come from the named sets in ``_jit`` (``FM_STRICT``, ``FM_REDUCE``,
``FM_APPLY``), chosen per function: LLVM keeps them per instruction after inlining, so the
block reductions may be reassociated (that is what lets them vectorize) while the shift, the
merges and the compensation stay strict.  ``fastmath=True`` is never used: it assumes no
NaN/Inf.  The on-disk cache of every kernel is stamped with the contents of this package and
``_jit.py`` (see ``_jit``), so a change to a helper in any module recompiles every kernel.
"""

from __future__ import annotations

from .chunks import (
    add_chunks,
    cf_chunk_moments,
    cf_chunk_shift,
    cl_chunk_moments,
    cl_chunk_shift,
    merge_chunks,
)
from .elements import FOLD_LIMIT as FOLD_LIMIT
from .elements import HAS_F16C as HAS_F16C
from .lengths import (
    cf_bwd_len_apply,
    cf_bwd_len_fused,
    cf_bwd_len_partial,
    cf_len_apply,
    cf_len_apply_split,
    cf_len_fused,
    cf_len_partial,
    cl_bwd_len_apply,
    cl_bwd_len_fused,
    cl_bwd_len_partial,
    cl_len_apply,
    cl_len_apply_split,
    cl_len_fused,
    cl_len_partial,
)
from .masked_rows import (
    cf_bwd_mask_apply,
    cf_bwd_mask_fused,
    cf_bwd_mask_partial,
    cf_mask_apply,
    cf_mask_count,
    cf_mask_fused,
    cf_mask_partial,
    cf_mask_shift,
)
from .masked_slabs import (
    cl_bwd_mask_apply,
    cl_bwd_mask_fused,
    cl_bwd_mask_partial,
    cl_mask_apply,
    cl_mask_count,
    cl_mask_fused,
    cl_mask_partial,
    cl_mask_shift,
)
from .moments import bwd_finish, finish_partials, merge_partials
from .roofline import copy_chunks
from .rows import SHORT_ROW as SHORT_ROW
from .rows import cf_apply, cf_fused, cf_partial, cf_short
from .rows_backward import BWD_FOLD_MIN as BWD_FOLD_MIN
from .rows_backward import cf_bwd_apply, cf_bwd_fused, cf_bwd_partial
from .slabs import cl_apply, cl_fused, cl_partial
from .slabs_backward import cl_bwd_apply, cl_bwd_fused, cl_bwd_partial
from .vector import HAS_SIMD_ROWS as HAS_SIMD_ROWS

# (re-exported with ``as``: SHORT_ROW for ``_api``; HAS_F16C, HAS_SIMD_ROWS for ``info``;
# FOLD_LIMIT and BWD_FOLD_MIN for the tests)

#: the entry kernels ``_api`` calls
__all__ = [
    "cf_short",
    "cf_fused",
    "cf_partial",
    "cf_apply",
    "cl_fused",
    "cl_partial",
    "cl_apply",
    "merge_partials",
    "finish_partials",
    "cf_bwd_fused",
    "cf_bwd_partial",
    "cf_bwd_apply",
    "cl_bwd_fused",
    "cl_bwd_partial",
    "cl_bwd_apply",
    "bwd_finish",
    "copy_chunks",
    "cf_chunk_shift",
    "cl_chunk_shift",
    "cf_chunk_moments",
    "cl_chunk_moments",
    "merge_chunks",
    "add_chunks",
    # masks and lengths
    "cf_len_fused",
    "cf_len_apply",
    "cf_len_partial",
    "cf_len_apply_split",
    "cf_bwd_len_fused",
    "cf_bwd_len_partial",
    "cf_bwd_len_apply",
    "cl_len_fused",
    "cl_len_apply",
    "cl_len_partial",
    "cl_len_apply_split",
    "cl_bwd_len_fused",
    "cl_bwd_len_partial",
    "cl_bwd_len_apply",
    "cf_mask_fused",
    "cf_mask_apply",
    "cf_mask_count",
    "cf_mask_shift",
    "cf_mask_partial",
    "cf_bwd_mask_fused",
    "cf_bwd_mask_partial",
    "cf_bwd_mask_apply",
    "cl_mask_fused",
    "cl_mask_apply",
    "cl_mask_count",
    "cl_mask_shift",
    "cl_mask_partial",
    "cl_bwd_mask_fused",
    "cl_bwd_mask_partial",
    "cl_bwd_mask_apply",
]
