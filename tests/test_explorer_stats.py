"""The explorer's statistics against NumPy's own: histograms over the same edges, quantiles,
non-finite and zero counts, differences and the gradient-flow statistics."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gradexp.core.arrow import summaries_array
from gradexp.core.stats import summarize
from gradexp.explorer.stats import (
    QUANTILES,
    Distribution,
    compare_arrays,
    layer_stat,
    make_edges,
    quantiles_of_sorted,
    step_histogram,
)

FLOATS = st.sampled_from([np.float16, np.float32, np.float64])
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _arrays(dtype: st.SearchStrategy) -> st.SearchStrategy[np.ndarray]:
    """Arrays with NaN, ±Inf, zeros (both signs), subnormals and repeated values."""
    return dtype.flatmap(lambda dt: hnp.arrays(
        dt, hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=12),
        elements=st.one_of(
            hnp.from_dtype(np.dtype(dt), allow_nan=True, allow_infinity=True),
            st.sampled_from([0.0, -0.0, 1.0, -1.0, float("nan"), float("inf"), float("-inf")]))))


def _expected(x: np.ndarray, edges: np.ndarray) -> dict:
    v = x.reshape(-1)
    finite = v[np.isfinite(v)]
    return {"counts": np.histogram(finite, edges)[0], "nan": int(np.isnan(v).sum()),
            "posinf": int(np.isposinf(v).sum()), "neginf": int(np.isneginf(v).sum()),
            "zero": int((v == 0).sum())}


def _check(x: np.ndarray, edges: np.ndarray) -> None:
    h = step_histogram(x, edges)
    want = _expected(x, edges)
    np.testing.assert_array_equal(h.counts, want["counts"])
    assert (h.nan, h.posinf, h.neginf, h.zero) == (want["nan"], want["posinf"], want["neginf"],
                                                   want["zero"])
    finite = x.reshape(-1)[np.isfinite(x.reshape(-1))].astype(np.float64)
    if finite.size:
        np.testing.assert_array_equal(h.quantiles, np.quantile(finite, QUANTILES))
        assert h.outside == int(((finite < edges[0]) | (finite > edges[-1])).sum())
    else:
        assert np.isnan(h.quantiles).all()


@SETTINGS
@given(_arrays(FLOATS), st.integers(1, 70), st.sampled_from(["linear", "symlog"]))
def test_histogram_equals_numpy_over_own_range(x, bins, scale):
    finite = x[np.isfinite(x)]
    lo = float(finite.min()) if finite.size else None
    hi = float(finite.max()) if finite.size else None
    edges = make_edges(lo, hi, bins=bins, scale=scale)
    assert edges.size == bins + 1 and np.all(np.diff(edges) >= 0)
    _check(x, edges)
    assert step_histogram(x, edges).outside == 0  # every finite value is counted


@SETTINGS
@given(_arrays(FLOATS), st.floats(-1e3, 1e3), st.floats(0, 1e3), st.integers(1, 40))
def test_histogram_equals_numpy_over_other_edges(x, lo, span, bins):
    """Edges not made from the data (another step's range): values outside are dropped and
    counted in ``outside``, as np.histogram drops them."""
    _check(x, make_edges(lo, lo + span, bins=bins))


@SETTINGS
@given(hnp.arrays(st.sampled_from([np.int8, np.uint16, np.int64, np.bool_]),
                  hnp.array_shapes(min_dims=1, max_dims=2, max_side=20)), st.integers(1, 20))
def test_integers_and_bool(x, bins):
    v = x.reshape(-1).astype(np.float64)
    edges = make_edges(float(v.min()), float(v.max()), bins=bins)
    h = step_histogram(x, edges)
    np.testing.assert_array_equal(h.counts, np.histogram(v, edges)[0])
    np.testing.assert_array_equal(h.quantiles, np.quantile(v, QUANTILES))
    assert h.zero == int((v == 0).sum()) and h.nan == h.posinf == h.neginf == 0


@SETTINGS
@given(hnp.arrays(np.float64, st.integers(1, 200),
                  elements=st.floats(allow_nan=False, allow_infinity=False)),
       st.lists(st.floats(0, 1), min_size=1, max_size=12))
def test_quantiles_bit_equal_numpy(x, q):
    np.testing.assert_array_equal(quantiles_of_sorted(np.sort(x), q), np.quantile(x, q))


def test_bfloat16_is_widened_exactly():
    x = (np.random.default_rng(1).standard_normal(5000)).astype(ml_dtypes.bfloat16)
    x[:7] = np.nan
    x[7] = np.inf
    v = x.astype(np.float32)
    edges = make_edges(float(np.nanmin(v[np.isfinite(v)])), float(v[np.isfinite(v)].max()),
                       bins=64, scale="symlog")
    _check(v, edges)
    h = step_histogram(x, edges)
    np.testing.assert_array_equal(h.counts, step_histogram(v, edges).counts)
    assert (h.nan, h.posinf) == (7, 1)


def test_symlog_edges_are_log_spaced_and_exact_at_ends():
    e = make_edges(-100.0, 1000.0, bins=40, scale="symlog", linthresh=0.01)
    assert e[0] == -100.0 and e[-1] == 1000.0
    t = np.sign(e) * np.log1p(np.abs(e) / 0.01)
    np.testing.assert_allclose(np.diff(t), np.diff(t)[0], rtol=1e-9)
    with pytest.raises(ValueError, match="linthresh"):
        make_edges(-1e300, 1e300, bins=4, scale="symlog", linthresh=1e-300)
    with pytest.raises(ValueError, match="scale"):
        make_edges(0.0, 1.0, bins=4, scale="log")


def test_edges_of_huge_span_stay_finite():
    e = make_edges(-1.7e308, 1.7e308, bins=8)
    assert np.isfinite(e).all() and np.all(np.diff(e) > 0)


def test_distribution_arrow_and_row():
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal((3, 50)).astype(np.float32) for _ in range(4)]
    arrays[2][0, :5] = [np.nan, np.inf, -np.inf, 0, 0]
    edges = make_edges(float(min(np.nanmin(a[np.isfinite(a)]) for a in arrays)),
                       float(max(a[np.isfinite(a)].max() for a in arrays)), bins=16)
    d = Distribution.of([10, 20, 30, 40], [step_histogram(a, edges) for a in arrays], edges,
                        scale="linear", linthresh=None)
    t = d.to_arrow()
    assert t.column("step").to_pylist() == [10, 20, 30, 40]
    assert t.column("counts")[2].as_py() == _expected(arrays[2], edges)["counts"].tolist()
    assert t.column("nan").to_pylist() == [0, 0, 1, 0] and t.column("zero")[2].as_py() == 2
    assert t.column("p50")[1].as_py() == float(np.quantile(arrays[1].astype(np.float64), 0.5))
    row = d.row(30)
    assert row["counts"] == t.column("counts")[2].as_py() and row["posinf"] == 1
    with pytest.raises(KeyError):
        d.row(25)
    both = d.extended(d)
    assert both.counts.shape == (8, 16) and both.nbytes > d.nbytes


def test_compare_arrays():
    a = np.array([[1.0, 2.0], [3.0, np.nan]], np.float32)
    b = np.array([[1.0, 0.0], [-0.0, np.nan]], np.float32)
    diff, st_ = compare_arrays(a, b)
    np.testing.assert_array_equal(diff[:3], [0.0, 2.0, 3.0])
    assert math.isnan(diff[3])
    assert st_["max_abs"] == 3.0 and not st_["bit_equal"] and st_["differing"] == 2
    x, y = np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 3.0])
    assert st_["cosine"] == pytest.approx(1.0 / math.sqrt(14))
    assert compare_arrays(x, y)[1] == {"bit_equal": True, "differing": 0, "max_abs": 0.0,
                                       "cosine": pytest.approx(1.0)}
    z = np.zeros(3, np.float32)
    assert compare_arrays(z, -z)[1]["differing"] == 3  # -0.0 is not 0.0 bit for bit
    with pytest.raises(ValueError, match="shapes differ"):
        compare_arrays(np.zeros(3), np.zeros(4))


def test_layer_stats_equal_numpy():
    rng = np.random.default_rng(2)
    tensors = [rng.standard_normal(n).astype(np.float32) for n in (10, 1000, 300_000)]
    tensors[1][::7] = 0
    tensors[1][3] = np.inf
    tensors[0][:] = np.nan
    col = summaries_array([summarize(t) for t in tensors] + [None])
    for t, l2, rms, mx, zf, nf in zip(tensors, *(layer_stat(col, s) for s in
                                                 ("l2", "rms", "maxabs", "zero_frac", "nonfinite"))):
        f = t[np.isfinite(t)].astype(np.float64)
        assert nf == np.count_nonzero(~np.isfinite(t))
        assert zf == np.count_nonzero(t == 0) / t.size
        if f.size:
            assert mx == np.abs(f).max()
            assert l2 == pytest.approx(np.sqrt(np.sum(f * f)), rel=1e-6)
            assert rms == pytest.approx(np.sqrt(np.mean(f * f)), rel=1e-6)
    assert all(math.isnan(layer_stat(col, s)[-1]) for s in ("l2", "maxabs", "nonfinite"))
    with pytest.raises(ValueError, match="stat"):
        layer_stat(col, "mean")


@pytest.mark.parametrize("dtype", [np.float16, np.float32, ml_dtypes.bfloat16])
def test_float64_edges_between_narrow_values(dtype):
    """Edges a hair off a float32 value: counted as float64 compares, not as rounded edges."""
    x = np.array([1.0, 1.0, 2.0, 3.0], dtype)
    for edges, want in (([0.5, 1 + 1e-12, 3.0], [2, 2]), ([0.5, 1 - 1e-12, 3.0], [0, 4]),
                        ([0.5, 2.0, 3 - 1e-12], [2, 1]), ([-1e300, 1.0, 1e300], [0, 4])):
        h = step_histogram(x, np.array(edges))
        assert h.counts.tolist() == want
        assert h.counts.tolist() == np.histogram(x.astype(np.float64), edges)[0].tolist()


@pytest.mark.parametrize("v", [np.finfo(np.float64).max, 5e-324, -np.finfo(np.float64).max])
def test_symlog_edges_at_float64_extremes(v):
    x = np.array([v, 0.0, -v / 2])
    edges = make_edges(float(x.min()), float(x.max()), bins=16, scale="symlog")
    assert np.isfinite(edges).all() and edges[0] == x.min() and edges[-1] == x.max()
    _check(x, edges)


# -- adversarial bit patterns, every float dtype the views take -------------------------------

BITS_DTYPES = [np.float16, np.float32, np.float64, ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn,
               ml_dtypes.float8_e5m2]
SPECIAL = [0.0, -0.0, float("nan"), float("inf"), float("-inf"), 1.0, -1.0]


@st.composite
def _adversarial(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    """An array drawn from a small pool of raw bit patterns (so every NaN payload, ±Inf, ±0,
    subnormals, the largest and smallest magnitudes and many repeats, all-equal arrays too)
    and edges: the float64 values of some of its own elements (values exactly on edges),
    or ``make_edges`` over its range or over an unrelated one."""
    dt = np.dtype(draw(st.sampled_from(BITS_DTYPES)))
    uint = np.dtype(f"u{dt.itemsize}")
    top = np.iinfo(uint).max
    pool = draw(st.lists(st.one_of(st.integers(0, top),
                                   st.sampled_from(SPECIAL).map(lambda v: int(np.array(v).astype(dt).view(uint)))),
                         min_size=1, max_size=8))
    n = draw(st.integers(0, 300))
    idx = draw(hnp.arrays(np.intp, n, elements=st.integers(0, len(pool) - 1)))
    x = np.asarray(pool, dtype=uint)[idx].view(dt)
    v = x.astype(np.float64)
    finite = np.unique(v[np.isfinite(v)])  # -0.0 and 0.0 are one value here
    how = draw(st.sampled_from(["own values", "own range", "other range"]))
    if how == "own values" and finite.size >= 2:
        picks = draw(st.lists(st.integers(0, finite.size - 1), min_size=2, max_size=12))
        edges = np.sort(finite[picks])  # repeats allowed: empty bins, as np.histogram has them
    elif how == "other range" or not finite.size:
        lo = draw(st.floats(-1e6, 1e6))
        edges = make_edges(lo, lo + draw(st.floats(0, 1e6)), bins=draw(st.integers(1, 40)))
    else:
        edges = make_edges(float(finite[0]), float(finite[-1]), bins=draw(st.integers(1, 70)),
                           scale=draw(st.sampled_from(["linear", "symlog"])))
    return x, edges


@SETTINGS
@given(_adversarial(), st.booleans())
def test_counts_and_quantiles_equal_numpy_on_adversarial_bits(case, overwrite):
    """Counts equal ``np.histogram`` over the same edges, strips equal NumPy's counts, the
    quantiles equal ``np.quantile`` (method "linear") of the finite values widened to float64
    bit for bit; with ``overwrite`` too (the tensor sorted in place), and without it the
    tensor is left as it was."""
    x, edges = case
    before = x.copy()
    h = step_histogram(x, edges, overwrite=overwrite)
    v = before.astype(np.float64)
    finite = v[np.isfinite(v)]
    np.testing.assert_array_equal(h.counts, np.histogram(finite, edges)[0])
    assert (h.nan, h.posinf, h.neginf, h.zero) == (
        int(np.isnan(v).sum()), int(np.isposinf(v).sum()), int(np.isneginf(v).sum()), int((v == 0).sum()))
    assert h.outside == int(((finite < edges[0]) | (finite > edges[-1])).sum())
    want = np.quantile(finite, QUANTILES) if finite.size else np.full(len(QUANTILES), np.nan)
    np.testing.assert_array_equal(h.quantiles, want)
    if not overwrite:
        assert before.tobytes() == x.tobytes()
