"""The duck-array policy: what happens to an argument that is not a plain ``numpy.ndarray``.

Every array argument of the public API (``x``, ``weight``, ``bias``, ``running_mean``,
``running_var``, ``out``, ``grad_output``, ``mean``, ``rstd``, and the layers' inputs and
state) passes through :func:`refuse_or_convert` before NumPy sees it (README "Reliability"):

==========================================  ==================================================
plain ``numpy.ndarray``, lists, scalars,    used as they are (``np.asarray``)
objects with only ``__array__``
ndarray subclasses (``np.memmap``, ...)     read as their ndarray data; results are plain
                                            ndarrays
``numpy.ma.MaskedArray``                    ``x``: normalized over its unmasked elements (README
                                            "Masks and variable lengths"); ``grad_output``,
                                            ``out``: their data is used; any other argument:
                                            TypeError (``np.asarray`` would drop the mask)
``numpy.matrix``                            TypeError (2-D only, ``*`` is a matrix product)
dask arrays                                 TypeError: ``np.asarray`` would compute the whole
                                            graph into memory, silently
xarray objects                              TypeError: use ``instnorm_numba.xarray``, or pass
                                            ``.values``
torch tensors with ``requires_grad``        TypeError: converting would lose autograd; use
                                            ``instnorm_numba.torch``
other torch tensors                         converted (``np.asarray``: CPU tensors share memory;
                                            other devices and dtypes NumPy lacks: TypeError)
GPU or other-namespace arrays (CuPy, JAX,   TypeError: they live in another library's memory or
anything with ``__cuda_array_interface__``  namespace; convert explicitly
or a non-NumPy ``__array_namespace__``)
==========================================  ==================================================

The decision depends on the argument's type only, so it is the same on every call whatever
ran before.  The policy never imports dask, xarray or torch: it recognises their types by the
module that defines them.
"""

from __future__ import annotations

import numpy as np

__all__ = ["refuse_or_convert"]


def _root_module(obj) -> str:
    return (type(obj).__module__ or "").split(".", 1)[0]


# ---------------------------------------------------------------------------------------------
# MASKED ARRAYS: ``x`` (and ``grad_output``) are unwrapped by the API before they get here and
# normalized over their unmasked elements, and ``out`` may be one (its data receives the result).
# Anywhere else a mask has no meaning the library could honour: refused, never ignored.


def _masked(v, name: str):
    raise TypeError(
        f"{name} is a numpy.ma.MaskedArray: only x (normalized over its unmasked elements) and "
        f"out may be masked arrays; pass {name}.filled(value) or np.asarray({name}) if every "
        "element should count"
    )


# ---------------------------------------------------------------------------------------------
# DASK ARRAYS: ``x`` / ``grad_output`` of the functions are routed to ``instnorm_numba.dask``
# before they get here (a lazy, chunk-wise result).  Anywhere else: refused rather than computed
# into memory silently.


def _dask(v, name: str):
    raise TypeError(
        f"{name} is a dask array ({type(v).__module__}.{type(v).__name__}): converting it "
        f"would compute the whole graph into memory; call {name}.compute() first if it fits "
        "in memory"
    )


# ---------------------------------------------------------------------------------------------


def _is_dask(v) -> bool:
    return _root_module(v) == "dask" or hasattr(type(v), "__dask_graph__")


def refuse_or_convert(v, name: str):
    """``v`` if NumPy may read it as it is, else a TypeError naming ``name`` (the table above).

    Returns ``v`` itself (plain ndarrays, ndarray subclasses other than the two refused,
    array_likes NumPy converts); the caller then applies ``np.asarray`` as before.
    """
    t = type(v)
    if t is np.ndarray or v is None:
        return v
    if isinstance(v, np.ndarray):
        if isinstance(v, np.ma.MaskedArray):
            return _masked(v, name)
        if isinstance(v, np.matrix):
            raise TypeError(
                f"{name} is a numpy.matrix, which is not supported (always 2-D, '*' is a "
                f"matrix product); pass np.asarray({name})"
            )
        return v  # other subclasses (np.memmap, ...): their ndarray data
    root = _root_module(v)
    if root in ("numpy", "builtins"):
        return v
    if root == "xarray":  # before dask: xarray's classes define __dask_graph__ too
        raise TypeError(
            f"{name} is an xarray.{t.__name__}: use instnorm_numba.xarray, which keeps its "
            f"dims and coords, or pass {name}.values"
        )
    if _is_dask(v):
        return _dask(v, name)
    if root == "torch":
        if getattr(v, "requires_grad", False):
            raise TypeError(
                f"{name} is a torch.Tensor with requires_grad=True: converting it to NumPy "
                "would lose autograd silently; use instnorm_numba.torch (a torch.autograd "
                f"Function), or pass {name}.detach() if no gradient should flow"
            )
        return v  # np.asarray: a CPU tensor's memory; another device is a TypeError there
    if hasattr(v, "__cuda_array_interface__") or hasattr(v, "__array_namespace__"):
        raise TypeError(
            f"{name} is a {t.__module__}.{t.__name__}, an array of another library (GPU memory "
            "or its own array namespace): instnorm_numba computes on NumPy arrays in host "
            f"memory; convert {name} explicitly (for example to a numpy.ndarray)"
        )
    return v
