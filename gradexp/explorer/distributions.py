"""The distribution, compare and gradient-flow endpoints (issue #11, views 5, 7 and 8).

A tensor's distribution over steps is built from the full tensor at every logged step: one
histogram per step on edges common to all steps, its NaN, +Inf, -Inf and zero counts, and
exact quantiles (:mod:`gradexp.explorer.stats`). The common range comes from the history's
per-step summaries (their ``min``/``max`` are exact); where a step has none, or its values
turn out to lie outside (a summary that disagrees with its tensor), the range is taken from
the tensors themselves. The work runs in a worker thread, split over ``WORKERS`` threads
(decompression and NumPy's sort release the GIL), and is cached per (run, key, bins, scale,
linthresh) together with the steps it covers: a request for the same steps is answered from
the cache, and a live run's new steps are added to it when they fit the cached edges.
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import zstandard
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from gradexp.core import arrow as _arrow
from gradexp.core.arrow import from_numpy, summaries_array
from gradexp.core.stats import summarize
from gradexp.explorer.history import history_table
from gradexp.explorer.responses import ARROW_STREAM, HEADERS, RUN_API, ApiError, api, finite_json, json_response
from gradexp.explorer.stats import (
    LAYER_STATS,
    SCALES,
    Distribution,
    StepHistogram,
    bit_equal,
    compare_arrays,
    default_linthresh,
    layer_stat,
    make_edges,
    step_histogram,
    values,
)

if TYPE_CHECKING:
    from gradexp.explorer.context import Explorer
    from gradexp.read.reader import RunReader

__all__ = ["MAX_BINS", "WORKERS", "build_distribution", "first_differing_step", "layers_table",
           "routes"]

MAX_BINS = 4096
WORKERS = min(4, os.cpu_count() or 1)
"""Threads that decode and sort steps at once for one distribution."""


# -- distribution ------------------------------------------------------------------------------

def build_distribution(reader: RunReader, key: str, *, bins: int = 64, scale: str = "linear",
                       linthresh: float | None = None, previous: Distribution | None = None,
                       workers: int = WORKERS) -> Distribution:
    """The distribution of tensor ``key`` over every logged step.

    With ``previous`` (an earlier result for the same parameters) only the steps logged since
    are read, when ``previous`` covers a prefix of today's steps and their values fit its edges.
    """
    if not 1 <= bins <= MAX_BINS:
        raise ValueError(f"bins must be from 1 to {MAX_BINS}, not {bins}")
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {', '.join(SCALES)}, not {scale!r}")
    if linthresh is not None and not (linthresh > 0 and math.isfinite(linthresh)):
        raise ValueError(f"linthresh must be a positive finite number, not {linthresh}")
    steps = reader.steps(key)
    if previous is not None and previous.steps.size <= len(steps) \
            and np.array_equal(previous.steps, steps[:previous.steps.size]):
        new = steps[previous.steps.size:]
        if not new:
            return previous
        hists = _histograms(reader, key, new, previous.edges, workers)
        if not any(h.outside for h in hists):
            return previous.extended(Distribution.of(new, hists, previous.edges, scale=scale,
                                                     linthresh=previous.linthresh))
        # New values outside the edges: every range is known now, no first pass needed.
        ranges = [(float(q[0]), float(q[-1])) for q in previous.quantiles] + \
                 [(_nan(h.lo), _nan(h.hi)) for h in hists]
        return _on_range(reader, key, steps, _span(ranges), bins, scale, linthresh, workers)
    return _on_range(reader, key, steps, _ranges(reader, key, steps, workers), bins, scale,
                     linthresh, workers)


def _on_range(reader: RunReader, key: str, steps: list[int], span: tuple[float | None, float | None],
              bins: int, scale: str, linthresh: float | None, workers: int) -> Distribution:
    lo, hi = span
    for _ in range(2):
        c = (linthresh if linthresh is not None else default_linthresh(lo, hi)) if scale == "symlog" else None
        edges = make_edges(lo, hi, bins=bins, scale=scale, linthresh=c)
        hists = _histograms(reader, key, steps, edges, workers)
        if not any(h.outside for h in hists):
            return Distribution.of(steps, hists, edges, scale=scale, linthresh=c)
        # A summary's range disagreed with its tensor: use the tensors' own ranges.
        lo, hi = _span([(_nan(h.lo), _nan(h.hi)) for h in hists])
    raise AssertionError(f"values of {key!r} outside edges built from their own range")


def _nan(v: float | None) -> float:
    return math.nan if v is None else v


def _span(ranges: Sequence[tuple[float, float]]) -> tuple[float | None, float | None]:
    """The least and greatest of per-step (min, max) pairs; NaN marks a step with no finite value."""
    r = np.asarray(ranges, dtype=np.float64).reshape(-1, 2)
    if r.size == 0 or np.isnan(r).all():
        return None, None
    return float(np.nanmin(r[:, 0])), float(np.nanmax(r[:, 1]))


def _ranges(reader: RunReader, key: str, steps: list[int], workers: int) -> tuple[float | None, float | None]:
    """The finite range over all steps: from the summaries in the history, and by reading the
    tensors of the steps that have none."""
    summaries = _summaries(reader, key)
    known = np.empty(0, np.int64)
    ranges: list[tuple[float, float]] = []
    if summaries is not None:
        hsteps, col = summaries
        valid = np.asarray(col.is_valid(), dtype=bool) & np.isin(hsteps, steps)
        known = hsteps[valid]
        mins = pc.struct_field(col, "min").to_numpy(zero_copy_only=False).astype(np.float64)[valid]
        maxs = pc.struct_field(col, "max").to_numpy(zero_copy_only=False).astype(np.float64)[valid]
        ranges.extend(zip(mins.tolist(), maxs.tolist()))
    have = set(known.tolist())
    missing = [s for s in steps if s not in have]
    if missing:
        ranges.extend(_map_steps(reader, key, missing, _finite_range, workers))
    return _span(ranges)


def _summaries(reader: RunReader, key: str) -> tuple[np.ndarray, pa.StructArray] | None:
    """The history's steps and summary column of tensor ``key`` (None if the history has none)."""
    try:
        table = reader.history([key])
    except KeyError:
        return None
    if key not in table.column_names:
        return None
    col = table.column(key).combine_chunks()
    if not pa.types.is_struct(col.type) or col.type.get_field_index("min") < 0:
        return None
    return table.column("step").to_numpy().astype(np.int64), col


def _finite_range(arr: np.ndarray) -> tuple[float, float]:
    v = values(arr)
    if v.dtype.kind == "f" and not np.isfinite(v).all():
        v = v[np.isfinite(v)]
    return (float(v.min()), float(v.max())) if v.size else (math.nan, math.nan)


def _histograms(reader: RunReader, key: str, steps: Sequence[int], edges: np.ndarray,
                workers: int) -> list[StepHistogram]:
    return _map_steps(reader, key, steps, lambda a: step_histogram(a, edges, overwrite=True), workers)


def _map_steps(reader: RunReader, key: str, steps: Sequence[int], fn: Any, workers: int) -> list[Any]:
    """``fn(tensor)`` for each step, in step order, over ``workers`` threads each reading a
    contiguous run of steps (steps batched in one frame are decoded once). Tensors are read
    with ``reuse``: ``fn`` may modify its tensor and must not keep it."""
    steps = sorted(steps)
    n = min(workers, len(steps))
    if n <= 1:
        return [fn(a) for _, a in reader.tensors(key, steps, reuse=True)]
    cuts = np.linspace(0, len(steps), n + 1).astype(int)
    chunks = [steps[a:b] for a, b in zip(cuts[:-1], cuts[1:])]
    with ThreadPoolExecutor(n, thread_name_prefix="gradexp-distribution") as pool:
        parts = pool.map(lambda c: [fn(a) for _, a in reader.tensors(key, c, reuse=True)], chunks)
        return [r for part in parts for r in part]


# -- compare -----------------------------------------------------------------------------------

def first_differing_step(a: RunReader, b: RunReader, key: str) -> int | None:
    """The first step at which tensor ``key`` differs between two runs: logged in one only, or
    not bit-equal (dtype, shape or bytes). Steps are compared in order and the scan stops at
    the first difference; None if the runs agree at every step."""
    steps_a, steps_b = a.steps(key), b.steps(key)
    only = sorted(set(steps_a) ^ set(steps_b))
    limit = only[0] if only else None
    in_b = set(steps_b)
    common = [s for s in steps_a if (limit is None or s < limit) and s in in_b]
    for (step, x), (_, y) in zip(a.tensors(key, common), b.tensors(key, common)):
        if not bit_equal(x, y):
            return step
    return limit


# -- gradient flow -----------------------------------------------------------------------------

def layers_table(reader: RunReader, prefix: str, stat: str, *, history: pa.Table | None = None) -> pa.Table:
    """``step`` and one float64 column per tensor key under ``prefix`` (in key order, as readers
    list them) of ``stat`` (see :func:`gradexp.explorer.stats.layer_stat`); NaN where a key was not logged
    at a step or the statistic has no value (no finite element). Rows: the steps at which any
    of the keys was logged. From the history's summaries; a key without them is summarised
    from its tensors. ``history``: the run's history if the caller has it already."""
    if stat not in LAYER_STATS:
        raise ValueError(f"stat must be one of {', '.join(LAYER_STATS)}, not {stat!r}")
    keys = [k for k in reader.tensor_keys() if k.startswith(prefix)]
    if not keys:
        raise KeyError(f"no tensor key under {prefix!r}")
    table = reader.history(keys) if history is None else history
    steps = table.column("step").to_numpy().astype(np.int64)
    cols: dict[str, np.ndarray] = {}
    for k in keys:
        if k in table.column_names and pa.types.is_struct(table.column(k).type):
            cols[k] = layer_stat(table.column(k), stat)
        else:
            cols[k] = _stat_from_tensors(reader, k, steps, stat)
    logged = np.zeros(steps.size, dtype=bool)
    for k in keys:
        if k in table.column_names:
            logged |= np.asarray(table.column(k).is_valid(), dtype=bool)
        else:
            logged |= np.isin(steps, reader.steps(k))
    out: dict[str, pa.Array] = {"step": from_numpy(steps[logged])}
    out.update((k, from_numpy(v[logged])) for k, v in cols.items())
    return pa.table(out).replace_schema_metadata({"stat": stat, "prefix": prefix})


def _stat_from_tensors(reader: RunReader, key: str, steps: np.ndarray, stat: str) -> np.ndarray:
    have = reader.steps(key)
    summaries = dict(zip(have, (summarize(a) for _, a in reader.tensors(key, have))))
    return layer_stat(summaries_array([summaries.get(s) for s in steps.tolist()]), stat)


# -- routes ------------------------------------------------------------------------------------

def routes(explorer: Explorer) -> list[BaseRoute]:
    """``distribution``, ``histogram``, ``diff`` and ``layers`` under ``/api/runs/{e}/{p}/{run}/``
    and ``/api/compare``, relative to the explorer's ``/_x`` mount."""

    def arrow_response(request: Request, table: pa.Table) -> Response:
        """Arrow IPC, zstd-compressed when the client takes it, else as is: the mount's gzip
        (level 9) took 7 s for the 1.3 MB of a 2,000-step distribution here, zstd 5 ms."""
        body = _arrow.table_ipc(table).to_pybytes()
        encoding = "identity"  # keeps the GZip middleware away
        if "zstd" in request.headers.get("accept-encoding", ""):
            body, encoding = zstandard.ZstdCompressor(level=3).compress(body), "zstd"
        return Response(body, media_type=ARROW_STREAM, headers={
            **HEADERS, "Cache-Control": "no-store", "Content-Encoding": encoding, "Vary": "Accept-Encoding"})

    async def reader(request: Request) -> tuple[RunReader, tuple[str, str, str]]:
        ref = (request.path_params["entity"], request.path_params["project"], request.path_params["run_id"])
        return await explorer.run(request, *ref), ref

    def distribution_of(request: Request, run: RunReader, ref: tuple[str, str, str], key: str) -> Distribution:
        """Cached per (run, key, bins, scale, linthresh) with the steps it covers; a request
        waiting for the same computation gets its result, not a second computation."""
        q = request.query_params
        bins = _int(q, "bins", 64)
        scale = q.get("scale") or "linear"
        linthresh = _float(q, "linthresh")
        ckey = ("distribution", *ref, key, bins, scale, linthresh)
        with _lock(ckey):
            cached = explorer.cache.get(ckey)
            steps = run.steps(key)
            if cached is not None and np.array_equal(cached.steps, steps):
                return cached
            dist = build_distribution(run, key, bins=bins, scale=scale, linthresh=linthresh, previous=cached)
            explorer.cache.put(ckey, dist, dist.nbytes)
            return dist

    async def distribution(request: Request) -> Response:
        """``?key=K&bins=64&scale=linear|symlog[&linthresh=]`` -> Arrow, one row per logged step:
        ``step``, ``counts`` (list of int64 on edges common to every step), ``nan``, ``posinf``,
        ``neginf``, ``zero`` (exact zeros, also counted in their bin), ``min``, ``p1``, ``p5``,
        ``p25``, ``p50``, ``p75``, ``p95``, ``p99``, ``max`` (float64, NaN for a step without a
        finite value); schema metadata ``edges``, ``scale``, ``linthresh`` (JSON)."""
        key = _key(request)
        run, ref = await reader(request)
        dist = await explorer.in_worker(distribution_of, request, run, ref, key)
        return arrow_response(request, dist.to_arrow())

    async def histogram(request: Request) -> Response:
        """``?key=K&step=S&bins=&scale=&linthresh=`` -> JSON ``{step, edges, counts, nan, posinf,
        neginf, zero, scale, linthresh}``: step S's row of the distribution, on the same edges."""
        key = _key(request)
        step = _int(request.query_params, "step", None)
        run, ref = await reader(request)
        dist = await explorer.in_worker(distribution_of, request, run, ref, key)
        try:
            return json_response(dist.row(step))
        except KeyError:
            raise LookupError(f"tensor {key!r} has no step {step}") from None

    async def diff(request: Request) -> Response:
        """``?key=K&a=S1&b=S2`` -> Arrow ``values``: step S1 minus step S2 as float64 (``|a - b|``
        for complex), flattened row-major; schema metadata ``shape``, ``a``, ``b`` and ``stats``
        (JSON ``{bit_equal, differing, max_abs, cosine}``; ``max_abs`` and ``cosine`` may be
        ``"NaN"``)."""
        key = _key(request)
        a, b = _int(request.query_params, "a", None), _int(request.query_params, "b", None)
        run, _ = await reader(request)

        def work() -> pa.Table:
            x, y = run.tensor(key, a), run.tensor(key, b)
            try:
                d, stats = compare_arrays(x, y)
            except ValueError as e:
                raise ApiError(422, f"tensor {key!r}, steps {a} and {b}: {e}") from None
            meta = {"shape": json.dumps(list(x.shape)), "a": str(a), "b": str(b),
                    "stats": json.dumps(finite_json(stats))}
            return pa.table({"values": from_numpy(d)}).replace_schema_metadata(meta)
        return arrow_response(request, await explorer.in_worker(work))

    async def compare(request: Request) -> Response:
        """``?key=K&step=S&a=e/p/run&b=e/p/run`` -> JSON ``{bit_equal, differing, max_abs, cosine,
        first_differing_step}``: tensor K of two runs at step S (``max_abs``/``cosine`` may be
        ``"NaN"``) and the first step at which they differ (``null``: at none)."""
        key = _key(request)
        step = _int(request.query_params, "step", None)
        ref_a, ref_b = _ref(request, "a"), _ref(request, "b")
        run_a = await explorer.run(request, *ref_a)
        run_b = await explorer.run(request, *ref_b)

        def work() -> dict[str, Any]:
            x, y = run_a.tensor(key, step), run_b.tensor(key, step)
            if x.shape == y.shape:
                _, stats = compare_arrays(x, y)
            else:
                stats = {"bit_equal": False, "differing": None, "max_abs": None, "cosine": None}
            sa, sb = run_a.steps(key), run_b.steps(key)
            ckey = ("first-differing-step", ref_a, ref_b, key, len(sa), hash(tuple(sa)), len(sb), hash(tuple(sb)))
            with _lock(ckey):
                found = explorer.cache.get(ckey)
                if found is None:
                    found = (first_differing_step(run_a, run_b, key),)
                    explorer.cache.put(ckey, found, 64)
            return {**stats, "first_differing_step": found[0], "shapes": [list(x.shape), list(y.shape)],
                    "dtypes": [x.dtype.name, y.dtype.name]}
        return json_response(await explorer.in_worker(work))

    async def layers(request: Request) -> Response:
        """``?prefix=grad/&stat=l2|rms|maxabs|zero_frac|nonfinite`` -> Arrow: ``step`` and a float64
        column per tensor key under the prefix, in key order (NaN: not logged at that step,
        or no finite value); from the history's per-tensor summaries."""
        q = request.query_params
        prefix, stat = q.get("prefix", ""), q.get("stat") or "l2"
        run, ref = await reader(request)

        def work() -> pa.Table:
            _, table = history_table(explorer, ref[0], run)
            return layers_table(run, prefix, stat, history=table)
        return arrow_response(request, await explorer.in_worker(work))

    return [Route(RUN_API + "/distribution", api(distribution)),
            Route(RUN_API + "/histogram", api(histogram)),
            Route(RUN_API + "/diff", api(diff)),
            Route(RUN_API + "/layers", api(layers)),
            Route("/api/compare", api(compare))]


def _key(request: Request) -> str:
    key = request.query_params.get("key")
    if not key:
        raise ValueError("query parameter 'key' is required")
    return key


def _int(q: Any, name: str, default: int | None) -> int:
    raw = q.get(name)
    if raw is None or raw == "":
        if default is None:
            raise ValueError(f"query parameter {name!r} is required")
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"query parameter {name!r} must be an integer, not {raw!r}") from None


def _float(q: Any, name: str) -> float | None:
    raw = q.get(name)
    if raw is None or raw == "":
        return None
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"query parameter {name!r} must be a number, not {raw!r}") from None


def _ref(request: Request, name: str) -> tuple[str, str, str]:
    raw = request.query_params.get(name) or ""
    parts = raw.split("/")
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"query parameter {name!r} must name a run as entity/project/run id, not {raw!r}")
    return parts[0], parts[1], parts[2]


_LOCKS: dict[Hashable, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


def _lock(key: Hashable) -> threading.Lock:
    """One lock per cache key: a second request for a result being computed waits for it and
    reads the cache, instead of computing it again."""
    with _LOCKS_GUARD:
        if len(_LOCKS) > 1024:
            for k in [k for k, v in _LOCKS.items() if not v.locked()]:
                del _LOCKS[k]
        return _LOCKS.setdefault(key, threading.Lock())
