"""What log() accepts and rejects, on the caller's thread, before anything is queued."""

from __future__ import annotations

import argparse
import mmap
import time

import ml_dtypes
import numpy as np
import pytest

import gradexp
from gradexp.core.buffers import BufferPool
from gradexp.write.values import Keys
from gradexp.write.values import prepare as _prepare


def prepare(data, keys):
    """prepare() with a plain dict standing in for the run's key registry."""
    reg = Keys()
    reg.add(keys)
    out = _prepare(data, reg)
    keys.update(reg.kinds)
    return out


def test_nested_dicts_flatten_with_slashes():
    p = prepare({"loss": 1.0, "opt": {"lr": 1e-3, "sched": {"warm": True}}}, {})
    assert p.scalars == {"loss": 1.0, "opt/lr": 1e-3, "opt/sched/warm": True}


def test_numpy_scalars_and_0d_arrays_are_scalars():
    p = prepare({"a": np.float32(0.5), "b": np.array(3, dtype=np.int16), "c": np.bool_(True)}, {})
    assert set(p.scalars) == {"a", "b", "c"} and not p.tensors
    assert p.scalars["b"] == 3


@pytest.mark.parametrize("value, kind", [
    ({1, 2}, "set"), (object(), "object"), (np.array(["a", "b"]), "dtype <U1"),
    (np.array([object()]), "dtype object"), (b"bytes", "bytes"),
    (np.array([1.0], dtype=np.float128) if hasattr(np, "float128") else set(), ""),
])
def test_bad_values_raise_typeerror_naming_the_key(value, kind):
    kinds: dict[str, str] = {}
    with pytest.raises(TypeError, match="'bad'"):
        prepare({"ok": 1.0, "bad": value}, kinds)
    assert kinds == {}, "nothing may be registered when the call fails"


@pytest.mark.parametrize("key, exc", [
    ("_private", ValueError), ("step", ValueError), ("", ValueError), ("a//b", ValueError),
    ("a/", ValueError), ("x" * 2000, ValueError), (3, TypeError), (None, TypeError),
])
def test_bad_keys(key, exc):
    with pytest.raises(exc):
        prepare({key: 1.0}, {})


def test_nested_private_segment_is_allowed():
    assert prepare({"a": {"_b": 1}}, {}).scalars == {"a/_b": 1}


def test_a_key_keeps_its_kind():
    kinds: dict[str, str] = {}
    prepare({"x": 1.0, "t": np.zeros(3)}, kinds)
    prepare({"x": 2}, kinds)  # int after float is still a number
    with pytest.raises(TypeError, match="'x'.*number.*text"):
        prepare({"x": "hello"}, kinds)
    with pytest.raises(TypeError, match="'t'"):
        prepare({"t": 1.0}, kinds)


def test_snapshot_is_a_copy():
    a = np.arange(10, dtype=np.float32)
    p = prepare({"a": a}, {})
    a[:] = -1
    assert np.array_equal(p.tensors["a"].array, np.arange(10, dtype=np.float32))


def test_non_contiguous_and_big_endian_are_snapshotted_native():
    a = np.arange(24, dtype=">f8").reshape(4, 6)[:, ::2]
    t = prepare({"a": a}, {}).tensors["a"]
    assert t.array.flags.c_contiguous and t.array.dtype.isnative
    assert t.logical == np.dtype(">f8")
    assert np.array_equal(t.array, a)


class DLPackOnly:
    def __init__(self, arr):
        self._arr = arr

    def __dlpack__(self, **kw):
        return self._arr.__dlpack__(**kw)

    def __dlpack_device__(self):
        return self._arr.__dlpack_device__()


class ArrayOnly:
    def __init__(self, arr):
        self._arr = arr

    def __array__(self, dtype=None, copy=None):
        return self._arr


class FakeTorch:
    """Quacks like a torch.Tensor on a device: detach() / cpu() / numpy()."""

    def __init__(self, arr, device="cuda"):
        self._arr = arr
        self.device = type("Device", (), {"type": device})()
        self.dtype = "torch.float32"
        self.calls = []

    def detach(self):
        self.calls.append("detach")
        return self

    def cpu(self):
        self.calls.append("cpu")
        return FakeTorch(self._arr.copy(), "cpu")

    def numpy(self):
        return self._arr


def test_duck_typed_array_likes():
    base = np.arange(6, dtype=np.int32).reshape(2, 3)
    t = FakeTorch(base)
    p = prepare({"d": DLPackOnly(base), "a": ArrayOnly(base), "t": t, "l": [1.0, 2.0]}, {})
    for key in "dat":
        assert np.array_equal(p.tensors[key].array, base)
    assert t.calls == ["detach", "cpu"]
    assert p.tensors["l"].array.dtype == np.float64


def real_torch():
    """torch, which the test extra installs (the CPU wheel): missing, it fails in CI, skips elsewhere."""
    try:
        import torch
    except ImportError:
        from services import unavailable

        unavailable("torch is not installed: pip install -e '.[test]'")
    return torch


def test_real_torch_tensors():
    torch = real_torch()
    x = torch.arange(6, dtype=torch.bfloat16).reshape(2, 3).requires_grad_(False)
    p = prepare({"bf": x, "f": torch.ones(3, requires_grad=True) * 2}, {})
    assert p.tensors["bf"].array.dtype == ml_dtypes.bfloat16
    assert np.array_equal(p.tensors["bf"].array.astype(np.float32), x.float().numpy())
    assert np.array_equal(p.tensors["f"].array, np.full(3, 2, np.float32))


def test_real_torch_tensors_round_trip_through_a_run(tmp_path):
    """Logged from torch (grad-tracking, non-contiguous, bfloat16...), read back bit-exact."""
    torch = real_torch()
    g = torch.Generator().manual_seed(0)
    logged = {
        "w": torch.randn(64, 32, generator=g, requires_grad=True),
        "wt": torch.randn(64, 32, generator=g).t(),                 # a non-contiguous view
        "bf": torch.randn(1000, generator=g).to(torch.bfloat16),
        "h": torch.randn(7, 3, generator=g).half(),
        "i": torch.randint(-2**40, 2**40, (5,), generator=g),
        "b": torch.rand(9, generator=g) > 0.5,
        "big": torch.randn(300, 300, generator=g),                  # a frame of its own
    }
    with gradexp.init("p", dir=tmp_path) as run:
        for step in range(3):
            run.log({k: v * (step + 1) if v.dtype != torch.bool else v for k, v in logged.items()})
    r = gradexp.Api().run(run.dir)
    for key, v in logged.items():
        want = (v * 3 if v.dtype != torch.bool else v).detach()
        got = r.tensor(key, 2)
        assert got.shape == tuple(want.shape), key
        expect = want.float().numpy().astype(ml_dtypes.bfloat16) if v.dtype == torch.bfloat16 \
            else want.numpy()
        assert got.dtype == expect.dtype and got.tobytes() == np.ascontiguousarray(expect).tobytes(), key


def test_config_accepts_namespace(tmp_path):
    ns = argparse.Namespace(lr=0.1, layers=[1, 2])
    with gradexp.init("p", config=ns, dir=tmp_path) as run:
        assert run.config["lr"] == 0.1 and run.config.layers == [1, 2]
        with pytest.raises(TypeError, match="'bad'"):
            run.config.update(bad=object())


# -- the snapshot buffer pool ---------------------------------------------------------------

MiB = 1 << 20


def test_pool_reuses_the_last_buffer_given_back():
    pool = BufferPool(16 * MiB)
    a, b = pool.take(2 * MiB), pool.take(2 * MiB)
    assert a.flags.writeable and a.nbytes == 2 * MiB
    assert a.ctypes.data % mmap.PAGESIZE == 0  # page-aligned private mapping
    pool.give(a)
    pool.give(b)
    assert pool.idle_bytes == 4 * MiB
    assert pool.take(2 * MiB) is b and pool.take(2 * MiB) is a  # last in, first out
    assert pool.take(2 * MiB) is not a and pool.idle_bytes == 0
    assert pool.take(3 * MiB).nbytes == 3 * MiB  # another size never gets a wrong-size buffer


def test_pool_keeps_at_most_max_bytes_and_ignores_small_buffers():
    pool = BufferPool(5 * MiB)
    bufs = [pool.take(2 * MiB) for _ in range(3)]
    for buf in bufs:
        pool.give(buf)
    assert pool.idle_bytes == 4 * MiB  # the third did not fit
    small = pool.take(1000)
    pool.give(small)
    assert pool.idle_bytes == 4 * MiB and pool.take(1000) is not small


def test_pool_trim_unmaps_buffers_idle_for_idle_s():
    pool = BufferPool(64 * MiB, idle_s=30.0)
    old, new = pool.take(2 * MiB), pool.take(2 * MiB)
    now = time.monotonic()
    pool.give(old)
    pool._free[2 * MiB][0] = (now - 31.0, old)  # given back 31 s ago
    pool.give(new)
    assert pool.trim(now) == 2 * MiB
    assert pool.idle_bytes == 2 * MiB and pool.take(2 * MiB) is new
    assert pool.trim(now + 60.0) == 0


def test_a_second_burst_of_large_tensors_reuses_the_first_bursts_memory(tmp_path):
    xs = [np.full(600_000, i, np.float32) for i in range(12)]
    with gradexp.init("p", dir=tmp_path) as run:
        pool = run._writer.pool
        for i, x in enumerate(xs):
            run.log({"g": x}, step=i)
        run.flush()
        # The writer may hand a buffer back while the burst goes on, and the next call
        # reuses it, so the first burst mapped between a few and 12 snapshot buffers.
        first = {id(buf) for _, buf in pool._free[x.nbytes]}
        assert 1 <= len(first) <= 12
        for i, x in enumerate(xs[:len(first)]):
            run.log({"g": x}, step=12 + i)
        run.flush()
        again = {id(buf) for _, buf in pool._free[x.nbytes]}
    assert again == first  # the second burst copied into the same memory, mapped none anew
    assert pool.idle_bytes == 0 and not pool._free  # finish() gave the memory back
    r = gradexp.Api().run(run.dir)
    assert [int(r.tensor("g", s)[0]) for s in range(12 + len(first))] == list(range(12)) + list(range(len(first)))


def test_idle_buffers_are_unmapped_even_while_the_user_flushes_often(tmp_path):
    with gradexp.init("p", dir=tmp_path) as run:
        pool = run._writer.pool
        pool._idle_s = 0.2
        for i in range(4):
            run.log({"g": np.full(600_000, i, np.float32)})
        run.flush()
        assert pool.idle_bytes > 0
        deadline = time.monotonic() + 3.0
        while pool.idle_bytes and time.monotonic() < deadline:
            run.flush()  # each flush restarts the periodic-flush clock
            time.sleep(0.05)
        assert pool.idle_bytes == 0
