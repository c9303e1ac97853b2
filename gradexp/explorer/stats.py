"""Exact statistics behind the distribution, compare and gradient-flow views: NumPy only, no I/O.

Each step's values are sorted once (NumPy's vectorised sort: ~5 ms for a million float32 here);
everything else is read off the sorted array with ``searchsorted`` — the histogram over given
edges exactly as ``np.histogram`` counts it, the NaN/±Inf/zero counts, and exact quantiles.

Values are a tensor's elements as real numbers, as the history's summaries take them: floats
as they are (float16, bfloat16 and float8 widened to float32, exactly), integers as float64,
bool as 0/1, complex by magnitude. Histograms and quantiles are over the finite values;
NaN, +Inf and -Inf are counted apart. Quantiles are NumPy's default (``method="linear"``,
Hyndman & Fan's type 7) of the finite values widened to float64, bit for bit what
``np.quantile(finite.astype(np.float64), q)`` returns.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from gradexp.core.arrow import from_numpy
from gradexp.core.stats import _as_real

__all__ = [
    "LAYER_STATS",
    "QUANTILES",
    "QUANTILE_NAMES",
    "SCALES",
    "Distribution",
    "StepHistogram",
    "bit_equal",
    "compare_arrays",
    "default_linthresh",
    "layer_stat",
    "make_edges",
    "quantiles_of_sorted",
    "step_histogram",
    "values",
]

QUANTILES = (0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 1.0)
QUANTILE_NAMES = ("min", "p1", "p5", "p25", "p50", "p75", "p95", "p99", "max")
SCALES = ("linear", "symlog")
LAYER_STATS = ("l2", "rms", "maxabs", "zero_frac", "nonfinite")

SYMLOG_DECADES = 5
"""The default linear threshold of the symlog axis is ``max|x| / 10**SYMLOG_DECADES``: values
that many decades below the largest still get bins of their own."""


def values(arr: np.ndarray) -> np.ndarray:
    """A tensor's elements as a 1-D real array (see the module docstring)."""
    return _as_real(np.asarray(arr).reshape(-1))


# -- edges -------------------------------------------------------------------------------------

def default_linthresh(lo: float | None, hi: float | None) -> float:
    """The symlog axis's linear threshold for finite values spanning ``[lo, hi]``."""
    top = max(abs(lo or 0.0), abs(hi or 0.0))
    return max(top / 10.0 ** SYMLOG_DECADES, sys.float_info.min) if top > 0 else 1.0


def make_edges(lo: float | None, hi: float | None, *, bins: int, scale: str = "linear",
               linthresh: float | None = None) -> np.ndarray:
    """``bins + 1`` non-decreasing float64 edges from ``lo`` to ``hi`` (both exactly).

    ``lo``/``hi`` are the smallest and largest finite value over all steps (``None``: there is
    none). Like ``np.histogram``, a single value ``v`` gets the range ``[v - 0.5, v + 0.5]``.
    With ``scale="symlog"`` the edges are evenly spaced in ``sign(x) * log1p(|x| / linthresh)``.
    """
    if bins < 1:
        raise ValueError(f"bins must be at least 1, not {bins}")
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {', '.join(SCALES)}, not {scale!r}")
    if lo is None or hi is None:
        lo, hi = 0.0, 1.0
    elif lo == hi:
        lo, hi = lo - 0.5, hi + 0.5
    lo, hi = float(lo), float(hi)
    if scale == "linear":
        f = np.linspace(0.0, 1.0, bins + 1)
        if math.isfinite(hi - lo):
            edges = lo + (hi - lo) * f
        else:  # the span overflows float64: weigh the ends instead
            edges = lo * (1.0 - f) + hi * f
    else:
        c = linthresh if linthresh is not None else default_linthresh(lo, hi)
        if not (c > 0 and math.isfinite(c)):
            raise ValueError(f"linthresh must be a positive finite number, not {linthresh}")
        tlo, thi = _symlog(lo, c), _symlog(hi, c)
        if not math.isfinite(thi - tlo):
            raise ValueError(f"linthresh {c} is too small for values from {lo} to {hi}")
        t = np.linspace(tlo, thi, bins + 1)
        with np.errstate(over="ignore"):  # an end edge may round past float64's max: clipped below
            edges = np.sign(t) * c * np.expm1(np.abs(t))
    edges[0], edges[-1] = lo, hi
    np.clip(edges, lo, hi, out=edges)
    return np.maximum.accumulate(edges)


def _symlog(x: float, c: float) -> float:
    return math.copysign(math.log1p(abs(x) / c), x)


# -- one step ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class StepHistogram:
    """One step's exact histogram over given edges, its non-finite and zero counts and its
    quantiles. ``counts`` equals ``np.histogram(finite, edges)[0]``; ``outside`` counts the
    finite values beyond the edges (which ``np.histogram`` drops too; 0 for edges made from
    the step's own range). ``zero`` counts exact zeros, which ``counts`` includes in their bin."""

    counts: np.ndarray
    nan: int
    posinf: int
    neginf: int
    zero: int
    outside: int
    quantiles: np.ndarray

    @property
    def lo(self) -> float | None:
        """The smallest finite value (None if there is none)."""
        v = float(self.quantiles[0])
        return None if math.isnan(v) else v

    @property
    def hi(self) -> float | None:
        v = float(self.quantiles[-1])
        return None if math.isnan(v) else v


def step_histogram(arr: np.ndarray, edges: np.ndarray, *, overwrite: bool = False) -> StepHistogram:
    """Histogram, strips and quantiles of one tensor: one sort, then binary searches.

    ``overwrite``: ``arr`` may be sorted in place (the caller is done with it), which saves a
    copy of the tensor (1.4 of ~14 ms a 1M-float32 step here)."""
    v = values(arr)
    if (overwrite and v.flags.writeable) or not np.may_share_memory(v, arr):  # or a copy of it
        v.sort()
        s = v
    else:
        s = np.sort(v)
    n = s.size
    dt = s.dtype.type
    if s.dtype.kind == "f":
        first_nan = int(np.searchsorted(s, dt(np.nan), side="left"))  # NaN sorts last
        neginf = int(np.searchsorted(s, dt(-np.inf), side="right"))
        inf_at = int(np.searchsorted(s[:first_nan], dt(np.inf), side="left"))
        nan, posinf = n - first_nan, first_nan - inf_at
        finite = s[neginf:inf_at]
    else:
        nan = posinf = neginf = 0
        finite = s
    # np.histogram's own counting for explicit edges (numpy/lib/_histograms_impl.py):
    # [e_i, e_i+1) for every bin but the last, which also holds its right edge.
    cum = np.concatenate((np.searchsorted(finite, _probe(edges[:-1], s.dtype, "left"), side="left"),
                          np.searchsorted(finite, _probe(edges[-1:], s.dtype, "right"), side="right")))
    counts = np.diff(cum).astype(np.int64)
    zero = int(np.searchsorted(finite, dt(0), side="right") - np.searchsorted(finite, dt(0), side="left"))
    return StepHistogram(counts=counts, nan=nan, posinf=posinf, neginf=neginf, zero=zero,
                         outside=int(finite.size - (cum[-1] - cum[0])),
                         quantiles=quantiles_of_sorted(finite, QUANTILES))


def _probe(v: np.ndarray, dtype: np.dtype, side: str) -> np.ndarray:
    """float64 search values as ``dtype`` values that ``searchsorted`` answers alike for
    ``side`` on an array of that dtype: float64 ones would make it convert the whole array
    (~5 ms a million elements). ``x < v`` iff ``x < ceil(v)`` and ``x <= v`` iff
    ``x <= floor(v)``, rounding ``v`` to ``dtype`` up or down."""
    if dtype == v.dtype:
        return v
    with np.errstate(over="ignore"):
        w = v.astype(dtype)
    off = w < v if side == "left" else w > v
    w[off] = np.nextafter(w[off], np.asarray(np.inf if side == "left" else -np.inf, dtype))
    return w


def quantiles_of_sorted(s: np.ndarray, q: Sequence[float]) -> np.ndarray:
    """``np.quantile(s.astype(np.float64), q)`` (method "linear") of an ascending ``s``
    without NaN, bit for bit, from the two order statistics around each quantile
    (NaN where ``s`` is empty)."""
    qs = np.asarray(q, dtype=np.float64)
    n = s.size
    if n == 0:
        return np.full(qs.shape, np.nan)
    virtual = (n - 1) * qs  # numpy's "linear": get_virtual_index, _get_indexes, _lerp
    prev = np.floor(virtual)
    nxt = prev + 1
    top = virtual >= n - 1
    prev[top] = -1
    nxt[top] = -1
    gamma = virtual - prev
    a = s[prev.astype(np.intp)].astype(np.float64)
    b = s[nxt.astype(np.intp)].astype(np.float64)
    diff = b - a
    out = a + diff * gamma
    np.subtract(b, diff * (1 - gamma), out=out, where=gamma >= 0.5)
    return out


# -- all steps ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Distribution:
    """A tensor's histograms over steps on common edges, one row per step in step order."""

    steps: np.ndarray      # int64 (n,)
    edges: np.ndarray      # float64 (bins + 1,)
    scale: str
    linthresh: float | None
    counts: np.ndarray     # int64 (n, bins)
    nan: np.ndarray        # int64 (n,), likewise posinf, neginf, zero
    posinf: np.ndarray
    neginf: np.ndarray
    zero: np.ndarray
    quantiles: np.ndarray  # float64 (n, len(QUANTILES)); NaN where a step has no finite value

    @classmethod
    def of(cls, steps: Sequence[int], hists: Sequence[StepHistogram], edges: np.ndarray, *,
           scale: str, linthresh: float | None) -> Distribution:
        bins = edges.size - 1
        def col(name: str) -> np.ndarray:
            return np.fromiter((getattr(h, name) for h in hists), np.int64, len(hists))
        return cls(steps=np.asarray(steps, dtype=np.int64), edges=edges, scale=scale,
                   linthresh=linthresh,
                   counts=np.array([h.counts for h in hists], dtype=np.int64).reshape(-1, bins),
                   nan=col("nan"), posinf=col("posinf"), neginf=col("neginf"), zero=col("zero"),
                   quantiles=np.array([h.quantiles for h in hists],
                                      dtype=np.float64).reshape(-1, len(QUANTILES)))

    def extended(self, more: Distribution) -> Distribution:
        """This distribution followed by ``more``'s later steps (on the same edges)."""
        return Distribution(
            steps=np.concatenate((self.steps, more.steps)), edges=self.edges, scale=self.scale,
            linthresh=self.linthresh, counts=np.concatenate((self.counts, more.counts)),
            nan=np.concatenate((self.nan, more.nan)),
            posinf=np.concatenate((self.posinf, more.posinf)),
            neginf=np.concatenate((self.neginf, more.neginf)),
            zero=np.concatenate((self.zero, more.zero)),
            quantiles=np.concatenate((self.quantiles, more.quantiles)))

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in (self.steps, self.edges, self.counts, self.nan, self.posinf,
                                           self.neginf, self.zero, self.quantiles)))

    def index(self, step: int) -> int:
        """The row of ``step`` (``KeyError`` if it was not logged)."""
        i = int(np.searchsorted(self.steps, step))
        if i == self.steps.size or self.steps[i] != step:
            raise KeyError(step)
        return i

    def row(self, step: int) -> dict[str, Any]:
        """One step's histogram: ``edges``, ``counts``, ``nan``, ``posinf``, ``neginf``, ``zero``."""
        i = self.index(step)
        return {"step": int(step), "edges": self.edges.tolist(), "counts": self.counts[i].tolist(),
                "nan": int(self.nan[i]), "posinf": int(self.posinf[i]),
                "neginf": int(self.neginf[i]), "zero": int(self.zero[i]),
                "scale": self.scale, "linthresh": self.linthresh}

    def to_arrow(self) -> pa.Table:
        """One row per step: ``step``, ``counts`` (list of int64), ``nan``, ``posinf``,
        ``neginf``, ``zero`` and a float64 column per quantile; schema metadata ``edges``,
        ``scale`` and ``linthresh`` (JSON)."""
        n, bins = self.counts.shape
        offsets = np.arange(0, (n + 1) * bins, bins, dtype=np.int32 if n * bins < 2**31 else np.int64)
        counts = (pa.ListArray if offsets.dtype == np.int32 else pa.LargeListArray).from_arrays(
            from_numpy(offsets), from_numpy(self.counts.reshape(-1)))
        cols: dict[str, pa.Array] = {"step": from_numpy(self.steps), "counts": counts,
                                     "nan": from_numpy(self.nan), "posinf": from_numpy(self.posinf),
                                     "neginf": from_numpy(self.neginf), "zero": from_numpy(self.zero)}
        for j, name in enumerate(QUANTILE_NAMES):
            cols[name] = from_numpy(self.quantiles[:, j])
        meta = {"edges": json.dumps(self.edges.tolist()), "scale": self.scale,
                "linthresh": json.dumps(self.linthresh)}
        return pa.table(cols).replace_schema_metadata(meta)


# -- compare -----------------------------------------------------------------------------------

def compare_arrays(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    """``a - b`` as float64 (``|a - b|`` for complex), flattened row-major, and its statistics:
    ``bit_equal`` (same dtype, shape and bytes), ``differing`` (elements whose bits differ),
    ``max_abs`` and ``cosine`` (over the elements finite in both; NaN where there are none or
    a side is all zero). The arrays must have the same shape."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} and {b.shape}")
    differing = _bits_differ(a, b) if a.dtype == b.dtype else int(a.size)
    complex_ = a.dtype.kind == "c" or b.dtype.kind == "c"
    if complex_:
        x = np.asarray(a, dtype=np.complex128).reshape(-1)
        y = np.asarray(b, dtype=np.complex128).reshape(-1)
    else:
        x = values(a).astype(np.float64)
        y = values(b).astype(np.float64)
    with np.errstate(all="ignore"):
        d = x - y
        both = np.isfinite(x) & np.isfinite(y)
        if not both.all():
            x, y = x[both], y[both]
        max_abs = float(np.max(np.abs(x - y))) if x.size else math.nan
        nx, ny = float(np.linalg.norm(x)), float(np.linalg.norm(y))
        dot = float(np.real(np.vdot(x, y))) if complex_ else float(np.dot(x, y))
        cosine = dot / (nx * ny) if nx > 0 and ny > 0 else math.nan
    diff = np.abs(d) if complex_ else d
    return diff, {"bit_equal": differing == 0 and a.dtype == b.dtype, "differing": differing,
                  "max_abs": max_abs, "cosine": cosine}


def bit_equal(a: np.ndarray, b: np.ndarray) -> bool:
    """Same dtype, shape and bytes: -0.0 differs from 0.0, NaNs compare by payload."""
    return a.dtype == b.dtype and a.shape == b.shape and _bits_differ(a, b) == 0


def _bits_differ(a: np.ndarray, b: np.ndarray) -> int:
    """Elements of two same-dtype, same-shape arrays whose bytes differ."""
    size = a.dtype.itemsize
    x = np.ascontiguousarray(a).reshape(-1)
    y = np.ascontiguousarray(b).reshape(-1)
    if size in (1, 2, 4, 8):
        u = np.dtype(f"u{size}")
        return int(np.count_nonzero(x.view(u) != y.view(u)))
    xb = x.view(np.uint8).reshape(x.size, size)
    yb = y.view(np.uint8).reshape(y.size, size)
    return int(np.count_nonzero((xb != yb).any(axis=1)))


# -- gradient flow -----------------------------------------------------------------------------

def layer_stat(summaries: pa.StructArray | pa.ChunkedArray, stat: str) -> np.ndarray:
    """One statistic per row from the history's tensor summaries (``gradexp.core.stats``),
    float64 with NaN where a row has no summary:

    ``l2`` the L2 norm and ``rms`` the root mean square of the finite values, ``maxabs`` the
    largest finite ``|x|``, ``zero_frac`` the fraction of elements that are exactly zero,
    ``nonfinite`` the count of NaN and ±Inf. ``maxabs``, ``zero_frac`` and ``nonfinite`` are
    exact; ``l2``/``rms`` are summed in the tensor's precision (float32 for float32 tensors).
    """
    if stat not in LAYER_STATS:
        raise ValueError(f"stat must be one of {', '.join(LAYER_STATS)}, not {stat!r}")
    if isinstance(summaries, pa.ChunkedArray):
        summaries = summaries.combine_chunks()
    valid = np.asarray(summaries.is_valid(), dtype=bool)

    def field(name: str) -> np.ndarray:
        col = summaries.field(name).to_numpy(zero_copy_only=False)
        out = np.array(col, dtype=np.float64)  # a copy: null rows become NaN below
        out[~valid] = np.nan
        return out

    with np.errstate(all="ignore"):
        if stat == "l2":
            return field("norm")
        if stat == "rms":
            return field("norm") / np.sqrt(field("count") - field("nonfinite"))
        if stat == "maxabs":
            return np.maximum(np.abs(field("min")), np.abs(field("max")))
        return field(stat)
