"""Scalar history for charts: exact rows when they fit the chart, else min, max and last
value per pixel bucket. Never a sample: a one-step spike stays in its bucket's max.

Everything here is vectorised NumPy over whole columns, and runs in a worker thread.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from gradexp.core import arrow as _arrow
from gradexp.core import pool as _pool
from gradexp.core.history import combine_history

if TYPE_CHECKING:
    from gradexp.explorer.context import Explorer
    from gradexp.read.reader import RunReader

__all__ = ["CHUNKS_MAX", "X_AXES", "FinalColumns", "chart_keys", "final_columns", "history_columns", "history_keys",
           "history_table", "prefetch", "reduce_history", "since"]

X_AXES = ("step", "_runtime", "_timestamp")
_BASE = set(X_AXES)


def chart_keys(table: pa.Table | pa.Schema) -> list[str]:
    """History columns a line chart can draw: numbers and booleans (not tensor summaries)."""
    schema = table if isinstance(table, pa.Schema) else table.schema
    return [f.name for f in schema if f.name not in _BASE
            and (pa.types.is_integer(f.type) or pa.types.is_floating(f.type) or pa.types.is_boolean(f.type))]


def as_float(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A numeric column as float64, nulls as NaN (a copy only where the type needs one)."""
    if col.type != pa.float64():
        col = pc.cast(col, pa.float64())
    if col.null_count:
        col = pc.fill_null(col, np.nan)
    return _arrow.to_numpy(col)


def _select(table: pa.Table, keys: Sequence[str]) -> pa.Table:
    missing = [k for k in keys if k not in table.column_names]
    if missing:
        raise KeyError(f"no history key {missing[0]!r}; chartable keys: {', '.join(chart_keys(table)) or '(none)'}")
    return table.select(list(X_AXES) + [k for k in dict.fromkeys(keys) if k not in _BASE])


def since(table: pa.Table, keys: Sequence[str], step: int) -> pa.Table:
    """Exact rows after ``step``: the live tail a chart appends."""
    table = _select(table, keys)
    steps = _arrow.to_numpy(table.column("step"))
    first = int(np.searchsorted(steps, step, side="right"))  # history is in step order
    return table.slice(first)


def reduce_history(table: pa.Table, keys: Sequence[str], *, x: str = "step", buckets: int = 1000,
                   lo: float | None = None, hi: float | None = None) -> pa.Table:
    """The rows of ``table`` whose ``x`` lies in ``[lo, hi]``, for a chart ``buckets`` pixels wide.

    At most ``buckets`` rows: returned exactly (all columns, their own types). More: the range
    is cut into ``buckets`` equal intervals of ``x`` and each non-empty one gives one row, with
    ``x`` and the other axes of its last row, ``<key>`` the last value logged in it, and
    ``<key>:min`` / ``<key>:max`` the extremes of its values (float64; NaN where the bucket has
    none of that key). Schema metadata ``reduced`` says which (``"0"`` / ``"1"``).
    """
    if x not in X_AXES:
        raise ValueError(f"x must be one of {', '.join(X_AXES)}; got {x!r}")
    if buckets < 1:
        raise ValueError(f"buckets must be at least 1; got {buckets}")
    table = _select(table, keys)
    xs = as_float(table.column(x))
    order = None
    if xs.size > 1 and not bool(np.all(xs[1:] >= xs[:-1])):  # time can step back (a resumed run)
        order = np.argsort(xs, kind="stable")
        xs = xs[order]
    first = 0 if lo is None else int(np.searchsorted(xs, lo, side="left"))
    end = xs.size if hi is None else int(np.searchsorted(xs, hi, side="right"))
    rows = np.arange(first, end) if order is None else order[first:end]
    if end - first <= buckets:
        exact = table.take(_arrow.from_numpy(rows)) if order is not None else table.slice(first, end - first)
        return exact.replace_schema_metadata({"reduced": "0"})
    xin = xs[first:end]
    span_lo = float(xin[0]) if lo is None else float(lo)
    span_hi = float(xin[-1]) if hi is None else float(hi)
    width = (span_hi - span_lo) / buckets or 1.0
    bucket = np.minimum(((xin - span_lo) / width).astype(np.int64), buckets - 1)
    starts = np.flatnonzero(np.r_[True, bucket[1:] != bucket[:-1]])
    lasts = np.r_[starts[1:], bucket.size] - 1
    pick = rows[lasts]
    arrays: list[pa.Array] = [table.column(a).take(_arrow.from_numpy(pick)) for a in X_AXES]
    names = list(X_AXES)
    index = np.arange(bucket.size)

    def one(key: str) -> list[pa.Array]:
        v = as_float(table.column(key))
        v = v[first:end] if order is None else v[rows]
        missing = np.isnan(v)
        if not missing.any():  # the common case: a value at every step, no NaN
            vmin, vmax, last = np.minimum.reduceat(v, starts), np.maximum.reduceat(v, starts), v[lasts]
        else:
            valid = ~missing
            vmin = np.minimum.reduceat(np.where(valid, v, np.inf), starts)
            vmax = np.maximum.reduceat(np.where(valid, v, -np.inf), starts)
            last_at = np.maximum.reduceat(np.where(valid, index, -1), starts)
            empty = last_at < 0
            vmin[empty] = np.nan
            vmax[empty] = np.nan
            last = np.where(empty, np.nan, v[np.maximum(last_at, 0)])
        return [_arrow.from_numpy(last), _arrow.from_numpy(vmin), _arrow.from_numpy(vmax)]

    keys = table.column_names[len(X_AXES):]
    for key, got in zip(keys, _pool.map_ordered(one, keys)):  # NumPy's reductions release the GIL
        arrays += got
        names += [key, f"{key}:min", f"{key}:max"]
    return pa.table(arrays, names=names).replace_schema_metadata({"reduced": "1"})


CHUNKS_MAX = 16
"""A live history extended by appended tails is made one chunk again past this many. A whole
read stays in the chunks it was decoded in (a run folder's: one per history frame): a
reduction copies only the columns it reads into one array, where making the whole table one
chunk first copied every column (184 MB, 0.1-0.2 s of a cold run page on 20 x 1M steps)."""


def history_table(explorer: Explorer, entity: str, reader: RunReader) -> tuple[Any, pa.Table]:
    """The run's whole history and its stamp, kept in the explorer's cache until the run
    changes: a live run's chart polls often, and most polls find nothing new (the stamp is the
    reader's part counts or last step, cheap index reads; see :func:`_stamp`). A reader that
    offers ``history_delta`` (the server's) is asked only for the rows stored since the cached
    read, which it appends: a live run's read costs what is new, not the whole run."""
    key = ("history", entity, reader.project, reader.id)
    with explorer.cache.computing(key):
        stamp = _stamp(reader)
        cached = explorer.cache.get(key)
        if cached is not None and stamp is not None and cached[0] == stamp:
            return cached[0], cached[1]
        delta = getattr(reader, "history_delta", None)
        mark = None
        if callable(delta):
            mark, table, whole = delta(cached[2] if cached is not None else None)
            if not whole and cached is not None:
                table = combine_history([cached[1], table])
        else:
            table = reader.history()
        if mark is not None and table.num_rows and table.column(0).num_chunks > CHUNKS_MAX:
            table = table.combine_chunks()  # a live table grown by many appended tails
        if stamp is not None:
            explorer.cache.put(key, (stamp, table, mark), table.nbytes)
        return stamp, table


def _stamp(reader: RunReader) -> Any:
    """What changes whenever the run's history may have: its status and, from readers that
    offer them, its stored part counts (the server's) or its last step (a run folder's).
    ``None`` for a running run whose reader offers neither (read anew each time)."""
    status = reader.status
    for name in ("part_counts", "last_step"):
        fn = getattr(reader, name, None)
        if callable(fn):
            return status, name, fn()
    return None if status == "running" else (status,)


class FinalColumns:
    """An ended run's final history (one Parquet file, the server's), decoded column by column
    as charts ask for them, each column once. A run page's first screen then decodes its
    axes and the keys it draws, not the whole history (on 20 keys x 1M steps: 8 of 23
    columns)."""

    def __init__(self, file: pq.ParquetFile) -> None:
        self.file = file
        self.schema: pa.Schema = file.schema_arrow  # (its empty_table() would import pandas: 0.3 s)
        meta = file.metadata
        groups = [meta.row_group(i) for i in range(meta.num_row_groups)]
        stored = sum(g.column(j).total_compressed_size for g in groups for j in range(g.num_columns))
        decoded = max(sum(g.total_byte_size for g in groups), 8 * meta.num_rows * meta.num_columns)
        self.nbytes = meta.serialized_size + stored + decoded
        """The memory it comes to hold, estimated: the file as stored and every column decoded."""
        self._columns: dict[str, pa.ChunkedArray] = {}
        self._lock = threading.Lock()

    def table(self, keys: Sequence[str]) -> pa.Table:
        """The axes and ``keys``, decoding those not decoded yet (``KeyError`` naming a key
        that is not in the history)."""
        names = list(X_AXES) + [k for k in dict.fromkeys(keys) if k not in _BASE]
        missing = [k for k in names if k not in self.schema.names]
        if missing:
            raise KeyError(f"no history key {missing[0]!r}; chartable keys: "
                           f"{', '.join(chart_keys(self.schema)) or '(none)'}")
        with self._lock:
            wanted = [n for n in names if n not in self._columns]
            if wanted:
                got = self.file.read(columns=wanted)
                self._columns.update(zip(wanted, got.columns))
            return pa.table([self._columns[n] for n in names], names=names)


def final_columns(explorer: Explorer, entity: str, reader: RunReader) -> tuple[Any, FinalColumns] | None:
    """The run's :class:`FinalColumns` and stamp, if it ended and its reader keeps its history
    as one final file (the server's ``final_history``); None otherwise (a run folder, a live
    run: :func:`history_table` then reads the whole history)."""
    opener = getattr(reader, "final_history", None)
    if not callable(opener):
        return None
    key = ("final", entity, reader.project, reader.id)
    with explorer.cache.computing(key):
        stamp = _stamp(reader)
        if stamp is None or stamp[0] == "running":
            return None
        cached = explorer.cache.get(key)
        if cached is not None and cached[0] == stamp:
            return cached[0], cached[1]
        file = opener()
        if file is None:
            return None
        columns = FinalColumns(file)
        explorer.cache.put(key, (stamp, columns), columns.nbytes)
        return stamp, columns


def history_columns(explorer: Explorer, entity: str, reader: RunReader,
                    keys: Sequence[str] | None) -> tuple[Any, pa.Table]:
    """The axes and ``keys`` (every chartable key if None) of the run's history, and its stamp:
    decoded alone from an ended run's final file, else taken from the whole history."""
    final = final_columns(explorer, entity, reader)
    if final is not None:
        stamp, columns = final
        return stamp, columns.table(keys if keys is not None else chart_keys(columns.schema))
    stamp, table = history_table(explorer, entity, reader)
    return stamp, _select(table, keys if keys is not None else chart_keys(table))


def history_keys(explorer: Explorer, entity: str, reader: RunReader) -> tuple[list[str], int | None]:
    """The run's chartable keys and last step (from an ended run's final file: its schema and
    step column only)."""
    final = final_columns(explorer, entity, reader)
    if final is not None:
        keys, steps = chart_keys(final[1].schema), final[1].table([]).column("step")
    else:
        _, table = history_table(explorer, entity, reader)
        keys, steps = chart_keys(table), table.column("step")
    return keys, int(steps[-1].as_py()) if len(steps) else None


def prefetch(explorer: Explorer, entity: str, reader: RunReader) -> None:
    """What a run page asks for first, read while the browser loads the page's scripts: the
    history's keys and axes (all of it where there is no final file)."""
    history_keys(explorer, entity, reader)
