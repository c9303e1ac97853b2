"""Property tests: whatever log() accepts comes back bit-exact, in its dtype and shape."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import gradexp

DTYPES = [np.dtype(t) for t in (
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64", "complex64", "complex128", ">f4", ">i8", ">c16")] + [
    np.dtype(ml_dtypes.bfloat16), np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2)]


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape
            and np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes())


@st.composite
def arrays(draw, max_side=6):
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=max_side))
    raw = draw(st.binary(min_size=dtype.itemsize * int(np.prod(shape)),
                         max_size=dtype.itemsize * int(np.prod(shape))))
    return np.frombuffer(raw, dtype=dtype).reshape(shape)  # any bit pattern: NaNs, infs, -0.0


keys = st.text(st.sampled_from("abcxyz/._-0"), min_size=1, max_size=8).filter(
    lambda k: not k.startswith(("/", "_")) and not k.endswith("/") and "//" not in k and k != "step")

SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@SETTINGS
@given(st.lists(st.dictionaries(keys, arrays(), min_size=1, max_size=3), min_size=1, max_size=4),
       st.sampled_from([0, 64]))
def test_tensors_round_trip_bit_exact(tmp_path_factory, steps, small):
    # Keys seen as tensors stay tensors; drop later keys that collide with a nested prefix.
    d = tmp_path_factory.mktemp("rt")
    logged: dict[tuple[str, int], np.ndarray] = {}
    with gradexp.init("p", dir=d, small_tensor_bytes=small or 256 * 1024) as run:
        for step, data in enumerate(steps):
            flat = {k: v for k, v in data.items()
                    if not any(o.startswith(k + "/") or k.startswith(o + "/") for o in data if o != k)}
            run.log(flat)
            for k, v in flat.items():
                logged[(k, step)] = v.copy()
    r = gradexp.Api().run(run.dir)
    for (k, step), v in logged.items():
        got = r.tensor(k, step)
        assert same_bits(got, v), (k, step, v.dtype, got.dtype)
    for k in {k for k, _ in logged}:
        expect = sorted(s for kk, s in logged if kk == k)
        assert r.steps(k) == expect
        assert [s for s, _ in r.tensors(k)] == expect


finite = st.floats(allow_nan=True, allow_infinity=True, width=64)
scalars = st.one_of(finite, st.integers(-(2**63), 2**63 - 1), st.booleans())


@SETTINGS
@given(st.lists(st.tuples(st.dictionaries(st.sampled_from(["a", "b", "c/d", "e"]), scalars, max_size=4),
                          st.booleans()), min_size=1, max_size=30))
def test_scalar_history_round_trip(tmp_path_factory, rows):
    """A key's column is bool if it only saw bools, int64 if it saw ints (and bools), else
    float64, whether the values share a history frame or not (``flush`` splits frames)."""
    d = tmp_path_factory.mktemp("h")
    with gradexp.init("p", dir=d) as run:
        for row, flush in rows:
            run.log(row)
            if flush:
                run.flush()
    table = gradexp.Api().run(run.dir).history()
    assert table.column("step").to_pylist() == list(range(len(rows)))
    seen: dict[str, set[type]] = {}
    for row, _ in rows:
        for k, v in row.items():
            seen.setdefault(k, set()).add(type(v))
    for i, (row, _) in enumerate(rows):
        for k, v in row.items():
            got = table.column(k)[i].as_py()
            expect = float(v) if float in seen[k] else int(v) if int in seen[k] else v
            if isinstance(v, float) and math.isnan(v):
                assert math.isnan(got)
            else:
                assert got == expect and type(got) is type(expect), (k, v, got)


def test_nan_and_inf_are_values(tmp_path):
    bits = np.array([np.nan, -np.inf, np.inf, -0.0], dtype=np.float32)
    bits = np.concatenate([bits, np.array([0x7FC00001], np.uint32).view(np.float32)])  # NaN payload
    with gradexp.init("p", dir=tmp_path) as run:
        run.log({"x": float("nan"), "y": float("-inf"), "t": bits})
    r = gradexp.Api().run(run.dir)
    row = r.history().to_pylist()[0]
    assert math.isnan(row["x"]) and row["y"] == float("-inf")
    assert r.tensor("t", 0).tobytes() == bits.tobytes()
    assert row["t"]["nonfinite"] == 4 and row["t"]["count"] == 5


def test_summaries_match_numpy(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((300, 400)).astype(np.float32)  # large: summarised on a worker
    a[0, :100] = 0
    b = (rng.standard_normal(50) + 1000).astype(np.float64)  # large mean, small spread
    with gradexp.init("p", dir=tmp_path) as run:
        run.log({"a": a, "b": b})
    row = gradexp.Api().run(run.dir).history().to_pylist()[0]
    for key, x in (("a", a), ("b", b)):
        s = row[key]
        x64 = x.astype(np.float64)
        assert s["count"] == x.size and s["nonfinite"] == 0
        assert math.isclose(s["mean"], x64.mean(), rel_tol=1e-6, abs_tol=1e-9)
        assert math.isclose(s["std"], x64.std(), rel_tol=1e-4)
        assert math.isclose(s["norm"], np.linalg.norm(x64), rel_tol=1e-5)
        assert (s["min"], s["max"]) == (float(x.min()), float(x.max()))
        assert math.isclose(s["zero_frac"], np.mean(x == 0))
        assert sum(s["hist"]) == x.size and len(s["hist"]) == 64
        ref, _ = np.histogram(x64, bins=64, range=(float(x.min()), float(x.max())))
        assert np.abs(np.array(s["hist"]) - ref).sum() <= x.size * 1e-4  # edge rounding only


def test_ints_beyond_int64_are_refused_and_the_column_stays_exact(tmp_path):
    with gradexp.init("p", dir=tmp_path) as run:
        run.log({"x": 2**62 + 1})
        with pytest.raises(ValueError, match="'x'.*outside int64"):
            run.log({"x": 2**70})
        run.log({"x": 1})
    assert gradexp.Api().run(run.dir).history().column("x").to_pylist() == [2**62 + 1, 1]


def test_summary_of_values_whose_float32_sum_overflows(tmp_path):
    big = np.array([3e38, 3e38, -1.0] * 100_000, dtype=np.float32)  # large: a worker summarises it
    with gradexp.init("p", dir=tmp_path) as run:
        run.log({"w": big})
    s = gradexp.Api().run(run.dir).history().to_pylist()[0]["w"]
    assert s["nonfinite"] == 0 and math.isfinite(s["mean"]) and math.isfinite(s["norm"])
    assert math.isclose(s["mean"], big.astype(np.float64).mean(), rel_tol=1e-6)
