"""``summarize_rows`` (the writer's summaries of small tensors, one per history cell)
against a float64 reference computed element by element with ``math.fsum``."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gradexp.core.arrow import HIST_BINS
from gradexp.core.stats import summarize, summarize_rows

SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
REL = 1e-9
"""Tolerance of mean, std and norm, relative to the row's largest magnitude: float64
accumulation of at most a few thousand terms is ~1e-13 off; the sum of squares' cancellation
is bounded by the two-pass fallback below a spread of 3% of the mean."""
REL_MASKED = 1e-4
"""Rows with NaN or inf go through ``summarize()`` (unchanged here), which accumulates in the
input's precision, float32 at least: its sum of squares is ~1e-7 off, and E[x^2] - mean^2
magnifies that up to 1e3x before the two-pass fallback."""


def _reference(row: np.ndarray) -> dict:
    """The documented statistics of one row, from Python floats (exact sums)."""
    v = row.astype(np.float64) if row.dtype.kind != "b" else row.astype(np.uint8).astype(np.float64)
    n = v.size
    if n == 0:
        return {"count": 0, "nonfinite": 0, "zero_frac": None, "mean": None, "std": None,
                "min": None, "max": None, "norm": None, "hist": []}
    f = v[np.isfinite(v)]
    m = f.size
    out = {"count": n, "nonfinite": n - m}
    if m == 0:
        return {**out, "zero_frac": 0.0, "mean": None, "std": None, "min": None, "max": None,
                "norm": None, "hist": [0] * HIST_BINS}
    vals = f.tolist()
    mean = math.fsum(vals) / m
    lo, hi = min(vals), max(vals)
    if hi > lo and math.isfinite(HIST_BINS / (hi - lo)):  # a subnormal span: all in bin 0
        idx = np.minimum(((f - lo) * (HIST_BINS / (hi - lo))).astype(np.int64), HIST_BINS - 1)
        hist = np.bincount(idx, minlength=HIST_BINS).tolist()
    else:
        hist = [m] + [0] * (HIST_BINS - 1)
    return {**out, "zero_frac": int(np.count_nonzero(f == 0)) / n, "mean": mean,
            "std": math.sqrt(math.fsum((x - mean) ** 2 for x in vals) / m), "min": lo, "max": hi,
            "norm": math.sqrt(math.fsum(x * x for x in vals)), "hist": hist}


def _check(stacked: np.ndarray) -> None:
    got = summarize_rows(stacked)
    assert len(got) == stacked.shape[0]
    for row, g in zip(stacked.reshape(stacked.shape[0], -1), got):
        r = _reference(row)
        for k in ("count", "nonfinite", "zero_frac", "min", "max"):  # exact
            assert g[k] == r[k], (k, g[k], r[k], row)
        if r["mean"] is None:
            assert g["mean"] is g["std"] is g["norm"] is None
            assert g["hist"] == r["hist"]
            continue
        scale = max(abs(r["min"]), abs(r["max"]))
        rel = REL if r["nonfinite"] == 0 or stacked.dtype.itemsize == 8 else REL_MASKED
        for k in ("mean", "std", "norm"):
            assert abs(g[k] - r[k]) <= rel * scale * (math.sqrt(r["count"]) if k == "norm" else 1), \
                (k, g[k], r[k], row)
        if r["nonfinite"] == 0:  # binned in float64 as the reference is: the same counts
            assert g["hist"] == r["hist"], (g["hist"], r["hist"], row)
        else:  # masked rows go through summarize(), binned in the input's precision
            assert sum(g["hist"]) == r["count"] - r["nonfinite"]


DTYPES = [np.float16, np.float32, np.float64, ml_dtypes.bfloat16, np.int8, np.int32, np.int64,
          np.uint8, np.bool_]


def _elements(dt: np.dtype) -> st.SearchStrategy:
    if dt.kind == "f" or dt == np.dtype(ml_dtypes.bfloat16):
        # Sums of float64 beyond 1e154 overflow (as any float64 sum does): not this test's point.
        base = hnp.from_dtype(np.dtype(np.float16 if dt == np.dtype(ml_dtypes.bfloat16) else dt),
                              **({"min_value": -1e150, "max_value": 1e150} if dt.itemsize == 8
                                 else {"allow_nan": True, "allow_infinity": True}))
        special = st.sampled_from([0.0, -0.0, 1.0, -1.0, 1e-3, float("nan"), float("inf"), float("-inf")])
        return st.one_of(base, special, special)
    return hnp.from_dtype(dt)


@st.composite
def _stacked(draw: st.DrawFn) -> np.ndarray:
    dt = np.dtype(draw(st.sampled_from(DTYPES)))
    rows = draw(st.integers(1, 5))
    n = draw(st.integers(0, 40))
    if draw(st.booleans()):  # rows of repeated values: all-equal rows, spread small against the mean
        pool = draw(st.lists(_elements(dt), min_size=1, max_size=3))
        flat = draw(st.lists(st.sampled_from(pool), min_size=rows * n, max_size=rows * n))
        return np.array(flat, dtype=np.float64 if dt == np.dtype(ml_dtypes.bfloat16) else dt) \
            .astype(dt).reshape(rows, n)
    return draw(hnp.arrays(dt, (rows, n), elements=_elements(dt)))


@SETTINGS
@given(_stacked())
def test_summaries_equal_the_float64_reference(stacked: np.ndarray) -> None:
    _check(stacked)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16, np.int32])
@pytest.mark.parametrize("rows", [1, 3])
def test_long_rows_equal_the_reference(dtype: type, rows: int) -> None:
    """Rows of 18,432 elements (a conv weight's), taken one at a time, and 1,000-element
    rows with a spread of 1e-4 and 1e-8 against the mean (the two-pass fallback)."""
    rng = np.random.default_rng(rows)
    _check((rng.standard_normal((rows, 18432)) * 50).astype(dtype))
    _check((1000 + rng.standard_normal((rows, 1000)) * 0.1).astype(np.float64).astype(dtype))
    _check(np.full((rows, 3000), 7, dtype))
    _check(1e8 + rng.standard_normal((rows, 1000)))  # float64: E[x^2] - mean^2 would be off by ~1


@SETTINGS
@given(_stacked())
def test_history_cells_are_the_same_with_and_without_null_rows(stacked: np.ndarray) -> None:
    """The history's summary column of fully logged, finite rows (built per field) equals
    the general build's (taken when a row is missing)."""
    from gradexp.core.arrow import summaries_array

    items = summarize_rows(stacked)
    got = summaries_array(items)
    want = summaries_array([*items, None]).slice(0, len(items))
    assert got.to_pylist() == want.to_pylist()
    assert got.equals(want)


@pytest.mark.parametrize("n", [2, 4096])  # the vectorised path and the row-at-a-time path
def test_a_subnormal_span_puts_every_value_in_the_first_bin_as_large_tensors_do(n):
    # max - min = 5e-324: HIST_BINS / span is inf, and (x - min) * inf was NaN for x == min,
    # which cast to a negative bin and made bincount raise inside the writer.
    row = np.where(np.arange(n) % 2 == 0, 0.0, 5e-324)
    stacked = np.stack([row, row + 1.0, row])
    got = summarize_rows(stacked)
    for g in (got[0], got[2]):
        assert g["hist"] == [n] + [0] * (HIST_BINS - 1) == summarize(row)["hist"]
    assert got[1]["hist"] == [n] + [0] * (HIST_BINS - 1)  # 1.0 + 5e-324 == 1.0: one value
    _check(stacked)
