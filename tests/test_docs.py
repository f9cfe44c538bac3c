"""The README's examples and the public docstrings' Examples sections run as doctests."""

from __future__ import annotations

import doctest
import importlib
import pathlib

import numpy as np
import pytest

import instnorm_numba

ROOT = pathlib.Path(__file__).resolve().parent.parent
FLAGS = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS


def test_readme_examples():
    result = doctest.testfile(
        str(ROOT / "README.md"),
        module_relative=False,
        optionflags=FLAGS,
        globs={"np": np},
        verbose=False,
        report=True,
    )
    assert result.attempted > 0
    assert result.failed == 0


@pytest.mark.parametrize(
    "module",
    [
        "instnorm_numba._api",
        "instnorm_numba.layers",
        "instnorm_numba.reference",
        "instnorm_numba.benchmark",
        "instnorm_numba._pool",
    ],
)
def test_docstring_examples(module):
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError:
        pytest.fail(f"{module} is missing")
    result = doctest.testmod(mod, optionflags=FLAGS, report=True)
    assert result.failed == 0


def test_public_names_are_documented():
    for name in instnorm_numba.__all__:
        obj = getattr(instnorm_numba, name)
        if callable(obj):
            assert obj.__doc__ and len(obj.__doc__) > 40, name
