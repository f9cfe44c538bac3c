"""Result arrays from the output pool: reused only once nothing references them, bounded,
switchable off, thread-safe, and always holding the right values."""

from __future__ import annotations

import gc
import threading

import numpy as np
import pytest

from instnorm_numba import _pool, instance_norm, instance_norm_backward, output_pool
from instnorm_numba import reference as ref

SHAPE = (1, 8, 256, 256)  # 2 MiB of float32: pooled


def _addr(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


@pytest.fixture
def pool():
    """A fresh pool with the default settings, restored afterwards."""
    saved = _pool._POOL
    _pool._POOL = _pool._Pool()
    _pool._POOL.max_bytes = _pool.DEFAULT_MAX_BYTES
    yield _pool._POOL
    _pool._POOL = saved


def _x(seed=0, shape=SHAPE, dtype=np.float32):
    return (np.random.default_rng(seed).standard_normal(shape) * 3 + 7).astype(dtype)


def test_a_released_result_is_reused_with_the_right_values(pool):
    x0, x1 = _x(0), _x(1)
    y0 = instance_norm(x0)
    first = _addr(y0)
    del y0
    y1 = instance_norm(x1)
    assert _addr(y1) == first and pool.reused == 1
    assert ref.ulp_error(y1, ref.instance_norm(x1, exact=True)) <= 1


def test_a_held_result_is_never_handed_out_again(pool):
    x = _x()
    held = [instance_norm(x) for _ in range(3)]
    addrs = {_addr(y) for y in held}
    assert len(addrs) == 3 and pool.reused == 0
    y = instance_norm(x)
    assert _addr(y) not in addrs
    for h in held:
        np.testing.assert_array_equal(h, y)


@pytest.mark.parametrize(
    "keep",
    [
        lambda y: y[0, 1:3],  # a view
        lambda y: y.reshape(-1),  # a reshaped view
        lambda y: memoryview(y),  # a buffer export
        lambda y: np.frombuffer(y, np.uint8),  # an array over its buffer
        lambda y: [y],  # a container
    ],
    ids=["view", "reshape", "memoryview", "frombuffer", "list"],
)
def test_anything_derived_from_a_result_keeps_it_out_of_the_pool(pool, keep):
    x = _x()
    y = instance_norm(x)
    before = np.array(y)  # a copy
    first = _addr(y)
    kept = keep(y)
    del y
    gc.collect()
    z = instance_norm(_x(5))  # other values: would overwrite the buffer if it were reused
    assert _addr(z) != first
    as_array = (lambda k: np.asarray(k[0])) if isinstance(kept, list) else np.asarray
    np.testing.assert_array_equal(as_array(kept), as_array(keep(before)))


def test_torch_tensors_keep_their_result(pool):
    torch = pytest.importorskip("torch", reason="torch is not installed")
    y = instance_norm(_x())
    t = torch.from_numpy(y)
    first = _addr(y)
    del y
    assert _addr(instance_norm(_x(2))) != first
    assert t.data_ptr() == first


def test_backward_results_come_from_the_pool_too(pool):
    x = _x()
    dy = _x(3)
    y, mean, rstd = instance_norm(x, return_stats=True)
    dx, dw, db = instance_norm_backward(dy, x, mean, rstd)
    assert _addr(dx) != _addr(y)
    seen = {_addr(dx), _addr(y)}
    del dx, y
    dx2, dw, db = instance_norm_backward(dy, x, mean, rstd)
    assert _addr(dx2) in seen and pool.reused == 1
    exact = ref.instance_norm_backward(dy, x, exact=True)[0]
    assert ref.ulp_error(dx2, exact) <= 1


@pytest.mark.parametrize("channel_axis", [1, -1, 2])
def test_every_layout_and_dtype_gets_its_result_right_after_reuse(pool, channel_axis):
    for dtype in (np.float32, np.float64, np.float16):
        for seed in range(3):
            x = _x(seed, (2, 4, 128, 130), dtype)
            y = instance_norm(x, channel_axis=channel_axis)
            exact = ref.instance_norm(x, channel_axis=channel_axis, exact=True)
            assert ref.ulp_error(y, exact) <= (4 if dtype == np.float64 else 1)
            assert y.shape == x.shape and y.dtype == dtype
            del y
    assert pool.reused > 0


def test_small_results_are_plain_arrays(pool):
    y = instance_norm(np.ones((2, 3, 16, 16), np.float32))
    assert y.base is None or y.base.base is None and y.flags.c_contiguous
    assert pool.buffers == []


def test_the_pool_is_bounded(pool):
    output_pool(max_bytes=8 << 20, max_buffers=3)
    held = []
    for k in range(1, 7):
        held.append(instance_norm(_x(k, (1, 8, 128, 128 * k))))
        stats = output_pool()
        assert stats["buffers"] <= 3 and stats["bytes"] <= 8 << 20
    del held
    gc.collect()
    stats = output_pool()
    assert stats["free_bytes"] <= 8 << 20


def test_switched_off_every_result_is_fresh(pool):
    x = _x()
    y = instance_norm(x)
    settings = output_pool(max_bytes=0)
    assert settings["buffers"] == 0 and settings["bytes"] == 0
    del y
    counts = (pool.allocated, pool.reused)
    for _ in range(3):
        a = instance_norm(x)
        assert a.base is None or a.base.dtype == a.dtype  # np.empty's, not a pool buffer
        del a
    assert (pool.allocated, pool.reused) == counts and pool.buffers == []


def test_a_refused_setting_changes_nothing(pool):
    # (the messages are in tests/test_errors.py's table)
    before = output_pool()
    for bad in ({"max_bytes": -1}, {"max_buffers": 1.5}, {"min_bytes": True}):
        with pytest.raises((TypeError, ValueError)):
            output_pool(**bad)
        assert output_pool() == before
    with pytest.raises(ValueError):
        output_pool(max_bytes=1 << 20, max_buffers=-1)  # the valid part is not applied either
    assert output_pool() == before


def test_the_environment_sets_the_bound(monkeypatch):
    monkeypatch.setenv("INSTNORM_NUMBA_POOL_BYTES", "12345")
    assert _pool._Pool().max_bytes == 12345
    monkeypatch.setenv("INSTNORM_NUMBA_POOL_BYTES", "lots")
    with pytest.raises(ValueError, match="INSTNORM_NUMBA_POOL_BYTES must be an integer"):
        _pool._Pool()


def test_threads_holding_results_never_share_a_buffer(pool):
    x = _x()
    exact = instance_norm(x).copy()
    errors = []
    addrs_in_use = []
    lock = threading.Lock()

    def work():
        for _ in range(20):
            y = instance_norm(x)
            a = _addr(y)
            with lock:
                if a in addrs_in_use:
                    errors.append("shared")
                addrs_in_use.append(a)
            if not np.array_equal(y, exact):
                errors.append("values")
            with lock:
                addrs_in_use.remove(a)
            del y

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
