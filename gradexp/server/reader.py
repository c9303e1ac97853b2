"""The server's own run reader: a run in the database and the object store, read in place.

The API's read routes (``app.py``) and the explorer's catalog read runs through
:class:`ServerRun`, so both answer alike. A tensor frame is located by the ``frames``
table and fetched with one range read of the part holding it; nothing is copied or
re-encoded. Every method blocks on the database and the store: call them from a worker
thread, never on the event loop.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from sqlalchemy.engine import Engine

from gradexp.core import arrow as _arrow
from gradexp.core import format as _format
from gradexp.core import media as _media
from gradexp.core.errors import KeyNotFoundError, RunNotFoundError
from gradexp.core.history import combine_history, select_keys
from gradexp.core.streams import CONSOLE, SYSTEM, ConsoleLine, console_lines
from gradexp.read.reader import RecordFields
from gradexp.server import db, history
from gradexp.server.history import Mark
from gradexp.server.store import Store

__all__ = ["OWN_BATCH_BYTES", "ROWS_BATCH_BYTES", "ROWS_SCHEMA", "FrameRef", "ServerRun", "rows_ipc"]

_BASE_COLUMNS = ("step", "_timestamp", "_runtime")

ROWS_SCHEMA = pa.schema([
    pa.field("steps", pa.list_(pa.field("item", pa.int64(), nullable=False)), nullable=False),
    pa.field("frame", pa.large_binary(), nullable=False),
])
"""The rows of a tensor as the API streams them: one row per stored frame, ``frame`` its bytes
as stored (docs/format.md: header, then the zstd payload), ``steps`` the requested steps it
answers, ascending. Rows come in step order."""
ROWS_BATCH_BYTES = 8 << 20
"""Frame bytes gathered into one record batch of a rows stream (a larger frame goes alone):
the server holds at most about this much of a stream in memory."""

OWN_BATCH_BYTES = 256 << 10
"""A frame this large is a record batch of its own (a batch costs ~300 bytes of header)."""

FrameRef = dict[str, Any]
"""A row of ``db.tensor_frames``: ``object_key``, ``offset``, ``length``, ``step_min``,
``step_max``, ``rows``, ``seq``."""

# Parts are immutable and their object keys content-addressed, so the steps a stored frame
# holds never change: learnt once per process (frames of several rows must be decoded for it).
_FRAME_STEPS: dict[tuple[str, int], np.ndarray] = {}
_FRAME_STEPS_MAX = 100_000
_FRAME_STEPS_LOCK = threading.Lock()


def decode_frame(frame: bytes, label: str, *, reuse: bool = False) -> tuple[np.ndarray, list[np.ndarray]]:
    """A stored tensor frame (header and payload) as ``(steps, arrays)`` (``reuse``: decoded
    into per-thread buffers, see :func:`gradexp.core.format.decode_payload`)."""
    info = _format.parse_header(frame, 0, len(frame))
    if info is None:
        raise ValueError(f"{label}: stored frame is truncated")
    return _arrow.tensor_rows(_format.decode_payload(info, memoryview(frame)[info.header_len:], label,
                                                     reuse=reuse))


class ServerRun(RecordFields):
    """A run of entity ``entity`` (database id ``entity_id``) on this server, read-only.

    ``RunNotFoundError`` if the run does not exist. Metadata is re-read from the database on
    each access of :attr:`status`, :attr:`config` and :attr:`summary`, as a live run changes.
    """

    def __init__(self, engine: Engine, store: Store, *, entity_id: int, entity: str, project: str,
                 run_id: str) -> None:
        self.engine = engine
        self.store = store
        self.entity = entity
        self.entity_id = entity_id
        self.project = project
        self.id = run_id
        with engine.connect() as conn:
            pk = db.run_pk(conn, entity_id, project, run_id)
            pid = db.project_id(conn, entity_id, project, create=False)
            if pk is None or pid is None:
                raise RunNotFoundError(f"no run {entity}/{project}/{run_id}")
            self.pk, self.project_pk = pk, pid
            self._row: dict[str, Any] = db.run_row(conn, pk)
        self._record: dict[str, Any] | None = None
        self._record_final = False

    def __repr__(self) -> str:
        return f"<gradexp.ServerRun {self.entity}/{self.project}/{self.id}>"

    # -- metadata ------------------------------------------------------------------------------

    def refresh(self) -> dict[str, Any]:
        """Read the run's row again (:attr:`meta`: the row over the record the client sent,
        as :class:`~gradexp.read.remote.RemoteRun` has it) and return it."""
        with self.engine.connect() as conn:
            self._row = db.run_row(conn, self.pk)
        return self.meta

    @property
    def meta(self) -> dict[str, Any]:
        """The run's row over the ``meta`` of the record the client sent (host, argv, python,
        program, exception, signal). The record is read at first use and again until the run
        has ended (the tensor routes never pay for it)."""
        if self._record is None or (not self._record_final and self._row.get("status") != "running"):
            self._record = self.record().get("meta") or {}
            self._record_final = self._row.get("status") != "running"
        return {**self._record, **self._row}

    @meta.setter
    def meta(self, value: dict[str, Any]) -> None:
        self._row = value

    @property
    def row(self) -> dict[str, Any]:
        """The run's row in the database alone (as last read)."""
        return self._row

    def record(self) -> dict[str, Any]:
        """The record the client sent last: ``meta`` (run.json: host, argv, python, program,
        exception, signal) and ``provenance``; both empty if none was sent."""
        key = self.store.record_key(self.entity_id, self.project_pk, self.id)
        if not self.store.exists(key):
            return {"meta": {}, "provenance": {}}
        return json.loads(self.store.get(key))

    @property
    def provenance(self) -> dict[str, Any]:
        """The code's provenance (git state and patch, program, packages); empty if none was sent."""
        return self.record().get("provenance") or {}

    def stream(self, stream: str, since: int = 0) -> pa.Table:
        """Side stream ``stream`` (``console``, ``system``) from row ``since`` on: the frames
        holding those rows, one range read each (the frame index in SQL says where), merged by
        step as history is."""
        with self.engine.connect() as conn:
            rows = db.stream_frames(conn, self.pk, stream, since)
        tables = []
        for r in rows:
            frame = self.store.get_range(r["object_key"], r["offset"], r["length"])
            info = _format.parse_header(frame, 0, len(frame))
            if info is None:
                raise ValueError(f"{r['object_key']}: stored frame is truncated")
            raw = _format.decode_payload(info, memoryview(frame)[info.header_len:], r["object_key"])
            tables.append(pa.Table.from_batches([_arrow.history_batch(raw)]))
        table = combine_history(tables)
        if since and table.num_rows:
            table = table.filter(pc.greater_equal(table.column("step"), since))
        return table

    def console(self, since: int = 0) -> list[ConsoleLine]:
        """The run's console lines from line ``since`` on (only the frames holding them are read)."""
        return console_lines(self.stream(CONSOLE, since), since)

    def system(self, keys: Sequence[str] | None = None) -> pa.Table:
        """System metrics sampled by the run's sender process (``system/...`` columns)."""
        return select_keys(self.stream(SYSTEM), keys, self.id)

    @property
    def config(self) -> dict[str, Any]:
        return self.refresh()["config"]

    @property
    def summary(self) -> dict[str, Any]:
        return self.refresh()["summary"]

    @property
    def status(self) -> str:
        """``running``, ``finished``, ``failed`` or ``crashed`` (running without a heartbeat
        for ``db.STALE_AFTER`` seconds)."""
        return self.refresh()["status"]

    @property
    def damage(self) -> list[_format.Damage]:
        """Always empty: the server checks every frame of a part before storing it."""
        return []

    def part_counts(self) -> dict[str, int]:
        """Parts stored, per stream."""
        with self.engine.connect() as conn:
            return db.part_counts(conn, self.pk)

    # -- history -------------------------------------------------------------------------------

    def history(self, keys: Sequence[str] | None = None) -> pa.Table:
        """``step``, ``_timestamp``, ``_runtime`` and one column per key, in step order
        (``KeyError`` naming the keys there are for a key not in it)."""
        table = history.read(self.engine, self.store, self.pk,
                             address=(self.entity_id, self.project_pk, self.id))
        return select_keys(table, keys, self.id)

    def final_history(self) -> pq.ParquetFile | None:
        """Once the run ended and its history was made final: that history as one Parquet file,
        whose schema and columns can be read each alone (a chart decodes only the columns it
        draws); None before. The same rows as :meth:`history`."""
        return history.final_file(self.engine, self.store, self.pk)

    def history_delta(self, mark: Mark | None) -> tuple[Mark | None, pa.Table, bool]:
        """For a reader kept while a run goes live: ``(mark, table, whole)``. With ``mark``
        None, or when the parts stored since ``mark`` cannot simply extend what was read then
        (the history was made final, a part came late), the whole history (``whole`` True);
        else only the rows stored since, to append to what was read then (last write wins,
        :func:`gradexp.core.history.combine_history`). Pass the returned mark next time."""
        address = (self.entity_id, self.project_pk, self.id)
        if mark is not None:
            tail = history.read_tail(self.engine, self.store, self.pk, mark, address=address)
            if tail is not None:
                return tail[1], tail[0], False
        table, new = history.read_marked(self.engine, self.store, self.pk, address=address)
        return new, table, True

    def keys(self) -> list[str]:
        names = dict.fromkeys(n for n in self.history().column_names if n not in _BASE_COLUMNS)
        names.update(dict.fromkeys(self.tensor_keys()))
        return list(names)

    def tensor_keys(self) -> list[str]:
        """Tensor keys, sorted."""
        with self.engine.connect() as conn:
            return db.tensor_keys(conn, self.pk)

    # -- tensors -------------------------------------------------------------------------------

    def _frames(self, key: str, step: int | None = None) -> list[FrameRef]:
        """Frames of ``key`` (holding ``step`` if given), in write order."""
        with self.engine.connect() as conn:
            return db.tensor_frames(conn, self.pk, key, step)[::-1]

    def _no_key(self, key: str) -> KeyNotFoundError:
        return KeyNotFoundError(f"no tensor {key!r} in run {self.id}; tensor keys: "
                        f"{', '.join(self.tensor_keys()) or '(none)'}")

    def read_frame(self, ref: FrameRef) -> bytes:
        """The frame's bytes as stored: one range read."""
        return self.store.get_range(ref["object_key"], ref["offset"], ref["length"])

    def _steps_of(self, ref: FrameRef) -> np.ndarray:
        if ref["rows"] == 1 or ref["step_min"] == ref["step_max"]:
            return np.array([ref["step_min"]], np.int64)
        where = (ref["object_key"], ref["offset"])
        steps = _FRAME_STEPS.get(where)
        if steps is None:
            steps, _ = decode_frame(self.read_frame(ref), ref["object_key"])
            steps = steps.copy()  # not a view that keeps the whole decoded frame alive
            with _FRAME_STEPS_LOCK:
                if len(_FRAME_STEPS) >= _FRAME_STEPS_MAX:
                    _FRAME_STEPS.clear()
                _FRAME_STEPS[where] = steps
        return steps

    def _where(self, key: str) -> dict[int, FrameRef]:
        """step -> the frame holding its last write."""
        frames = self._frames(key)
        if not frames:
            raise self._no_key(key)
        where: dict[int, FrameRef] = {}
        for ref in frames:
            for s in self._steps_of(ref).tolist():
                where[s] = ref
        return where

    def steps(self, key: str) -> list[int]:
        """The steps at which tensor ``key`` was logged, ascending."""
        return sorted(self._where(key))

    def frame(self, key: str, step: int) -> bytes:
        """The stored frame holding tensor ``key`` at ``step`` (its last write)."""
        for ref in reversed(self._frames(key, step)):  # last write first
            if ref["rows"] == 1 or ref["step_min"] == ref["step_max"]:
                return self.read_frame(ref)
            data = self.read_frame(ref)
            steps, _ = decode_frame(data, ref["object_key"])
            if (steps == step).any():
                return data
        missing = f"tensor {key!r} of run {self.id} has no step {step}"
        if not self._frames(key):
            raise KeyNotFoundError(f"{missing}: {self._no_key(key).args[0]}")
        raise KeyNotFoundError(missing)

    def dims(self, key: str, step: int | None = None) -> tuple[str, ...] | None:
        """The dimension labels tensor ``key`` was logged with (at ``step``, default its last
        step), or None if it has none."""
        at = self.steps(key)[-1] if step is None else step
        frame = self.frame(key, at)
        info = _format.parse_header(frame, 0, len(frame))
        if info is None:
            raise ValueError(f"tensor {key!r} at step {at}: stored frame is truncated")
        return _media.labels(_arrow.tensor_frame(_format.decode_payload(info, memoryview(frame)[info.header_len:],
                                                                        key))[2])

    def tensor(self, key: str, step: int) -> np.ndarray:
        """Tensor ``key`` at ``step``: bit-exact, in the dtype and shape it was logged with."""
        steps, arrays = decode_frame(self.frame(key, step), f"tensor {key!r} at step {step}")
        return arrays[int(np.flatnonzero(steps == step)[-1])]

    def plan(self, key: str, steps: Iterable[int] | None = None) -> list[tuple[list[int], FrameRef]]:
        """Which frame to read for which steps of ``key`` (default: every logged step), in step
        order: consecutive steps in one frame share an entry. ``KeyError`` for a step or key
        that is not there, before anything is read."""
        where = self._where(key)
        wanted = sorted(where) if steps is None else sorted(set(steps))
        missing = [s for s in wanted if s not in where]
        if missing:
            raise KeyNotFoundError(f"tensor {key!r} of run {self.id} has no step {missing[0]}"
                           + (f" (nor {len(missing) - 1} more of the steps asked for)" if len(missing) > 1 else ""))
        out: list[tuple[list[int], FrameRef]] = []
        for s in wanted:
            ref = where[s]
            if out and out[-1][1] is ref:
                out[-1][0].append(s)
            else:
                out.append(([s], ref))
        return out

    def read_plan(self, plan: Iterable[tuple[list[int], FrameRef]]) -> Iterator[tuple[list[int], bytes]]:
        """``(steps, frame bytes)`` for each entry of :meth:`plan`, one range read each."""
        for steps, ref in plan:
            yield steps, self.read_frame(ref)

    def tensors(self, key: str, steps: Iterable[int] | None = None, *,
                reuse: bool = False) -> Iterator[tuple[int, np.ndarray]]:
        """``(step, array)`` for the given steps (default: every logged step) in step order;
        each array the caller's to modify, with ``reuse`` valid only until the next is asked for."""
        for wanted, data in self.read_plan(self.plan(key, steps)):
            got, arrays = decode_frame(data, f"tensor {key!r}", reuse=reuse)
            for s in wanted:
                yield s, arrays[int(np.flatnonzero(got == s)[-1])]


def rows_ipc(frames: Iterable[tuple[list[int], bytes]], *,
             batch_bytes: int = ROWS_BATCH_BYTES) -> Iterator[bytes | memoryview]:
    """An Arrow IPC stream of :data:`ROWS_SCHEMA`, chunk by chunk: the schema, then record
    batches, then the end-of-stream marker. A frame of :data:`OWN_BATCH_BYTES` or more goes
    in a batch of its own and is sent from the memory it was read into; smaller ones are
    gathered into batches of up to ``batch_bytes``. (Copying 250 MB of frames into batches,
    and batches into messages, took 0.7 of the 0.9 s of CPU the answer cost.)"""
    sink = _Chunks()
    with pa.ipc.new_stream(pa.PythonFile(sink, mode="w"), ROWS_SCHEMA) as writer:
        yield from sink.take()
        steps: list[list[int]] = []
        data: list[bytes] = []
        size = 0
        for s, frame in frames:
            if data and (len(frame) >= OWN_BATCH_BYTES or size + len(frame) > batch_bytes
                         or len(data[-1]) >= OWN_BATCH_BYTES):
                writer.write_batch(_rows_batch(steps, data))
                yield from sink.take()
                steps, data, size = [], [], 0
            steps.append(s)
            data.append(frame)
            size += len(frame)
        if data:
            writer.write_batch(_rows_batch(steps, data))
            yield from sink.take()
    yield from sink.take()  # the end-of-stream marker


class _Chunks:
    """The output file of :func:`rows_ipc`'s writer: buffers of 64 KiB or more are kept as
    they are given (a frame's own memory), smaller writes (message headers) are joined."""

    closed = False

    def __init__(self) -> None:
        self.parts: list[bytes | memoryview] = []
        self.small = bytearray()

    def write(self, data: Any) -> int:
        view = memoryview(data)
        if view.nbytes >= 1 << 16:
            self._flush_small()
            self.parts.append(view)
        else:
            self.small += view
        return view.nbytes

    def _flush_small(self) -> None:
        if self.small:
            self.parts.append(bytes(self.small))
            self.small.clear()

    def take(self) -> list[bytes | memoryview]:
        self._flush_small()
        out, self.parts = self.parts, []
        return out

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def _rows_batch(steps: list[list[int]], data: list[bytes]) -> pa.RecordBatch:
    """One record batch, built from buffers (``pa.array`` would import pandas: a second, once);
    a single frame's bytes are used in place."""
    counts = np.fromiter((len(s) for s in steps), np.int32, len(steps))
    step_offsets = np.zeros(len(steps) + 1, np.int32)
    np.cumsum(counts, out=step_offsets[1:])
    flat = np.fromiter((x for s in steps for x in s), np.int64, int(step_offsets[-1]))
    frame_offsets = np.zeros(len(data) + 1, np.int64)
    np.cumsum(np.fromiter((len(d) for d in data), np.int64, len(data)), out=frame_offsets[1:])
    columns = [pa.Array.from_buffers(ROWS_SCHEMA.field("steps").type, len(steps), [None, pa.py_buffer(step_offsets)],
                                     children=[_arrow.from_numpy(flat)]),
               pa.Array.from_buffers(pa.large_binary(), len(data),
                                     [None, pa.py_buffer(frame_offsets),
                                      pa.py_buffer(data[0] if len(data) == 1 else b"".join(data))])]
    return pa.record_batch(columns, schema=ROWS_SCHEMA)
