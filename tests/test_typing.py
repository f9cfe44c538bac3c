"""The public API's type annotations as a user's type checker sees them: mypy on a small
script, checking the revealed types (the ``return_stats`` overloads included) and that misuse is
an error. Runs only where mypy is installed (CI installs it)."""

from __future__ import annotations

import os
import pathlib
import re
import site
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("mypy", reason="mypy is not installed")

import instnorm_numba  # noqa: E402

SNIPPET = textwrap.dedent(
    """\
    import numpy as np
    from instnorm_numba import InstanceNorm, InstanceNorm2d, instance_norm, instance_norm_backward

    x = np.zeros((1, 2, 3, 4), np.float32)
    flag: bool = bool(x.size)
    norm = InstanceNorm2d(2, affine=True, bias=False)
    reveal_type(instance_norm(x))  # R1
    reveal_type(instance_norm(x, return_stats=True))  # R2
    reveal_type(instance_norm(x, return_stats=flag))  # R3
    reveal_type(instance_norm_backward(x, x, x, x))  # R4
    reveal_type(norm(x))  # R5
    reveal_type(norm.weight)  # R6
    reveal_type(InstanceNorm(2, channel_axis=-1).backward(x))  # R7
    instance_norm(x, return_stats=True).shape  # E1
    instance_norm(x, eps="1e-5")  # E2
    InstanceNorm2d(2, affine=True, bias=False).state_dict()["weight"].shape
    """
)
ARRAY = r"numpy\.ndarray\[[^\]]*\], numpy\.dtype\[Any\]\]"
EXPECTED = {
    "R1": f"^{ARRAY}$",
    "R2": rf"^tuple\[{ARRAY}, {ARRAY}, {ARRAY}\]$",
    "R3": rf"^{ARRAY} \| tuple\[{ARRAY}, {ARRAY}, {ARRAY}\]$",
    "R4": rf"^tuple\[{ARRAY}, {ARRAY}, {ARRAY}\]$",
    "R5": f"^{ARRAY}$",
    "R6": rf"^{ARRAY} \| None$",
    "R7": f"^{ARRAY}$",
}


def test_mypy_sees_the_public_types(tmp_path):
    script = tmp_path / "user_script.py"
    script.write_text(SNIPPET)
    env = dict(os.environ)
    src = str(pathlib.Path(instnorm_numba.__file__).resolve().parents[1])
    if src not in {str(pathlib.Path(p).resolve()) for p in site.getsitepackages()}:
        env["MYPYPATH"] = src  # a source tree (PYTHONPATH): tell mypy; installed: it finds it
    cmd = [sys.executable, "-m", "mypy", "--no-error-summary", "--follow-imports=silent"]
    cmd += ["--cache-dir", str(tmp_path / "cache"), str(script)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    lines = SNIPPET.splitlines()
    tags = {}
    for i, line in enumerate(lines, start=1):
        m = re.search(r"# ([RE]\d)$", line)
        if m:
            tags[i] = m.group(1)
    revealed, errors = {}, {}
    for out in res.stdout.splitlines():
        m = re.match(r".*user_script\.py:(\d+): (note|error): (.*)", out)
        if not m:
            continue
        tag = tags.get(int(m.group(1)))
        if m.group(2) == "note" and m.group(3).startswith("Revealed type is "):
            revealed[tag] = m.group(3)[len("Revealed type is ") :].strip('"')
        elif m.group(2) == "error":
            errors.setdefault(tag, []).append(m.group(3))
    for tag, pattern in EXPECTED.items():
        assert tag in revealed, f"{tag}: nothing revealed\n{res.stdout}{res.stderr}"
        assert re.match(pattern, revealed[tag]), f"{tag}: {revealed[tag]}"
    assert set(errors) == {"E1", "E2"}, res.stdout  # misuse flagged, the rest clean
    assert 'has no attribute "shape"' in errors["E1"][0]
    assert "instance_norm" in errors["E2"][0]
