"""History assembly shared by every reader and the server: combine history frames into one
table in step order (last write wins per (step, key)), select columns, write Parquet.

Parquet encoding: steps are delta-encoded and floats (the times too) byte-stream-split
before zstd: on a 1M-row history that made the file ~28% smaller than pyarrow's defaults
(15% smaller than defaults with zstd) and 1.1-1.4x faster to write (docs/benchmarks.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gradexp.core import arrow as _arrow
from gradexp.core.errors import KeyNotFoundError

__all__ = ["BASE_COLUMNS", "combine_history", "merge_steps", "select_keys", "unify_types",
           "write_history_parquet"]

BASE_COLUMNS = ("step", "_timestamp", "_runtime")


def combine_history(tables: list[pa.Table]) -> pa.Table:
    """History frames (or already combined pieces, in write order) as one table in step order."""
    if not tables:
        return pa.schema([("step", pa.int64()), ("_timestamp", pa.float64()),
                          ("_runtime", pa.float64())]).empty_table()
    return merge_steps(pa.concat_tables(unify_types(tables), promote_options="permissive"))


def select_keys(table: pa.Table, keys: Sequence[str] | None, run_id: str) -> pa.Table:
    if keys is None:
        return table
    missing = [k for k in keys if k not in table.column_names]
    if missing:
        raise KeyNotFoundError(f"no key {missing[0]!r} in the history of run {run_id}; keys: "
                       f"{', '.join(c for c in table.column_names if c not in BASE_COLUMNS)}")
    return table.select(list(BASE_COLUMNS) + [k for k in keys if k not in BASE_COLUMNS])


def unify_types(tables: list[pa.Table]) -> list[pa.Table]:
    """Give a column one type across history frames: a key logged as bool, int and float
    in different flushes becomes int64 (bool and int only) or float64 (any float)."""
    types: dict[str, set[pa.DataType]] = {}
    for t in tables:
        for f in t.schema:
            types.setdefault(f.name, set()).add(f.type)
    target = {}
    for name, ts in types.items():
        if len(ts) > 1 and all(pa.types.is_integer(t) or pa.types.is_boolean(t) or
                               pa.types.is_floating(t) for t in ts):
            exact = all(pa.types.is_boolean(t) or t == pa.int64() for t in ts)
            target[name] = pa.int64() if exact else pa.float64()
    if not target:
        return tables
    out = []
    for t in tables:
        for name, typ in target.items():
            i = t.schema.get_field_index(name)
            if i >= 0 and t.schema.field(i).type != typ:
                t = t.set_column(i, name, t.column(i).cast(typ, safe=False))
        out.append(t)
    return out


def merge_steps(table: pa.Table) -> pa.Table:
    """Sort rows by step; rows sharing a step merge, each column keeping its last non-null."""
    n = table.num_rows
    if n < 2:
        return table
    steps = _arrow.to_numpy(table.column("step"))
    if bool(np.all(steps[1:] > steps[:-1])):
        return table
    order = np.argsort(steps, kind="stable")  # stable: write order survives within a step
    table = table.take(order)
    steps = steps[order]
    starts = np.flatnonzero(np.r_[True, steps[1:] != steps[:-1]])
    if starts.size == n:
        return table
    rows = np.arange(n)
    columns = []
    for col in table.columns:
        valid = _arrow.validity(col)
        last = np.maximum.reduceat(np.where(valid, rows, -1), starts)
        missing = last < 0
        columns.append(col.take(_arrow.from_numpy(np.where(missing, 0, last), ~missing)))
    return pa.table(columns, schema=table.schema)



def write_history_parquet(table: pa.Table, where: Path | pa.NativeFile) -> None:
    """The history as Parquet, encoded for its columns (see the module docstring)."""
    encodings: dict[str, str] = {}
    for field in table.schema:
        if field.name in ("step",) and pa.types.is_integer(field.type):
            encodings[field.name] = "DELTA_BINARY_PACKED"
        elif pa.types.is_floating(field.type):
            encodings[field.name] = "BYTE_STREAM_SPLIT"
    dictionary = [f.name for f in table.schema if f.name not in encodings]
    pq.write_table(table, where, compression="zstd", use_dictionary=dictionary,
                   column_encoding=encodings, row_group_size=1 << 20)

