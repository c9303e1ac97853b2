"""Server-side history: read it from uploaded parts, compact small parts, Parquet at finish.

Object stores cannot append, and live history arrives as many small parts (one a
second from a running client). Reads combine: compacted segments (Parquet objects
covering a run of parts) plus the parts after them. Once ``COMPACT_AT`` parts have
piled up after the last segment, the next read writes them into a new segment, so
a read touches a bounded number of small objects however long the run. At finish
the whole history becomes one Parquet object.
"""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
from sqlalchemy.engine import Engine

from gradexp.core import arrow as _arrow
from gradexp.core import format as _format
from gradexp.core import pool as _pool
from gradexp.core.history import combine_history, write_history_parquet
from gradexp.server import db
from gradexp.server.store import Store

__all__ = ["COMPACT_AT", "Mark", "final_file", "finalize", "from_parquet", "part_tables", "read", "read_marked",
           "read_tail", "to_parquet"]

COMPACT_AT = 32


def part_tables(data: bytes, label: str) -> list[pa.Table]:
    """The history frames of one sealed part, decoded."""
    scan = _format.scan_sealed_bytes(data, label)
    out = []
    for info in scan.frames:
        if info.kind == _format.KIND_HISTORY:
            raw = _format.decode_payload(info, memoryview(data)[info.data_offset:info.end], label)
            out.append(pa.Table.from_batches([_arrow.history_batch(raw)]))
    return out


def to_parquet(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    write_history_parquet(table, sink)
    return sink.getvalue().to_pybytes()


def from_parquet(data: bytes) -> pa.Table:
    return pq.read_table(io.BytesIO(data))


def final_file(engine: Engine, store: Store, pk: int) -> pq.ParquetFile | None:
    """The history once it was made final (:func:`finalize`), as a Parquet file to read column
    by column: the object is fetched, nothing of it is decoded yet. None before it is final."""
    with engine.connect() as conn:
        final = conn.execute(db.sa.select(db.runs.c.history_object).where(db.runs.c.id == pk)).scalar()
    return pq.ParquetFile(pa.BufferReader(store.get(final))) if final else None


Mark = tuple[int, int]
"""What a read of a live history covered: (its highest history part seq, how many history
parts it had at or below that seq). See :func:`read_tail`."""


def read(engine: Engine, store: Store, pk: int, *, address: tuple[int, int, str]) -> pa.Table:
    """The run's history, combined in write order and merged by step."""
    return read_marked(engine, store, pk, address=address)[0]


def _decoded(store: Store, parts: list[dict]) -> list[list[pa.Table]]:
    """The history frames of each part, fetched and decoded on the shared pool."""
    return _pool.map_ordered(lambda p: part_tables(store.get(p["object_key"]), p["object_key"]), parts)


def _compact_run(parts: list[dict], done: int) -> int:
    """How many parts after seq ``done`` follow it with no gap (the ones a segment may take):
    a part still missing (uploaded late, out of order) must not end up behind a segment, where
    no read would look for it."""
    n = 0
    while n < len(parts) and parts[n]["seq"] == done + 1 + n:
        n += 1
    return n


def read_marked(engine: Engine, store: Store, pk: int, *,
                address: tuple[int, int, str]) -> tuple[pa.Table, Mark | None]:
    """:func:`read`, and the :data:`Mark` of what it read (None once the history is final)."""
    with engine.connect() as conn:
        final = conn.execute(db.sa.select(db.runs.c.history_object).where(db.runs.c.id == pk)).scalar()
        if final:
            return from_parquet(store.get(final)), None
        segs = db.history_segments(conn, pk)
        parts = db.history_parts(conn, pk)
    done = segs[-1]["last_seq"] if segs else -1
    tail = [p for p in parts if p["seq"] > done]
    pieces = [from_parquet(store.get(s["object_key"])) for s in segs]
    per_part = _decoded(store, tail)
    tail_tables = [t for tables in per_part for t in tables]
    n = _compact_run(tail, done)
    if n >= COMPACT_AT:
        _write_segment(engine, store, pk, address, tail[0]["seq"], tail[n - 1]["seq"],
                       [t for tables in per_part[:n] for t in tables])
    return combine_history(pieces + tail_tables), _mark(parts)


def _mark(parts: list[dict]) -> Mark:
    return (parts[-1]["seq"], len(parts)) if parts else (-1, 0)


def read_tail(engine: Engine, store: Store, pk: int, mark: Mark, *,
              address: tuple[int, int, str]) -> tuple[pa.Table, Mark] | None:
    """The rows of the history parts stored since a read that gave ``mark``, combined (to
    append to what that read gave, last write winning), and the new mark: a live chart's
    read costs the parts that are new, however long the run. None when appending would not
    give what a full read gives now: the history was made final, or a part at or below the
    mark's seq came late (then read it all again). Compaction goes on as in :func:`read`,
    reading only the parts it compacts."""
    last, count = mark
    with engine.connect() as conn:
        final = conn.execute(db.sa.select(db.runs.c.history_object).where(db.runs.c.id == pk)).scalar()
        if final:
            return None
        segs = db.history_segments(conn, pk)
        parts = db.history_parts(conn, pk)
    if sum(1 for p in parts if p["seq"] <= last) != count:
        return None
    new = [p for p in parts if p["seq"] > last]
    done = segs[-1]["last_seq"] if segs else -1
    tail = [p for p in parts if p["seq"] > done]
    n = _compact_run(tail, done)
    compact = tail[:n] if n >= COMPACT_AT else []
    wanted = {p["seq"]: p for p in compact + new}
    got = dict(zip(wanted, _decoded(store, list(wanted.values()))))
    if compact:
        _write_segment(engine, store, pk, address, compact[0]["seq"], compact[-1]["seq"],
                       [t for p in compact for t in got[p["seq"]]])
    return combine_history([t for p in new for t in got[p["seq"]]]), _mark(parts)


def _write_segment(engine: Engine, store: Store, pk: int, address: tuple[int, int, str], first: int,
                   last: int, tables: list[pa.Table]) -> None:
    key = Store.history_key(*address, first, last)
    store.put(key, to_parquet(combine_history(tables)))
    with engine.begin() as conn:
        db.add_segment(conn, pk, first, last, key)


def finalize(engine: Engine, store: Store, pk: int, *, address: tuple[int, int, str]) -> str:
    """Compact the whole history into one Parquet object and record it; returns its key."""
    table = read(engine, store, pk, address=address)
    key = Store.history_key(*address)
    store.put(key, to_parquet(table))
    with engine.begin() as conn:
        db.update_run(conn, pk, history_object=key)
    return key
