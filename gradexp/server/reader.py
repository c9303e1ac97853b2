"""The server's own run reader: a run in the database and the object store, read in place.

The API's read routes (``app.py``) and the explorer's catalog read runs through
:class:`ServerRun`, so both answer alike. A tensor frame is located by the ``frames``
table and fetched with one range read of the part holding it; nothing is copied or
re-encoded. Every method blocks on the database and the store: call them from a worker
thread, never on the event loop.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
from sqlalchemy.engine import Engine

from .. import _arrow, _format
from .._errors import RunNotFoundError
from ..api import select_keys
from . import db, history
from .store import Store

__all__ = ["ROWS_BATCH_BYTES", "ROWS_SCHEMA", "FrameRef", "ServerRun", "rows_ipc"]

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

FrameRef = dict[str, Any]
"""A row of ``db.tensor_frames``: ``object_key``, ``offset``, ``length``, ``step_min``,
``step_max``, ``rows``, ``seq``."""

# Parts are immutable and their object keys content-addressed, so the steps a stored frame
# holds never change: learnt once per process (frames of several rows must be decoded for it).
_FRAME_STEPS: dict[tuple[str, int], np.ndarray] = {}
_FRAME_STEPS_MAX = 100_000
_FRAME_STEPS_LOCK = threading.Lock()


def decode_frame(frame: bytes, label: str) -> tuple[np.ndarray, list[np.ndarray]]:
    """A stored tensor frame (header and payload) as ``(steps, arrays)``."""
    info = _format.parse_header(frame, 0, len(frame))
    if info is None:
        raise ValueError(f"{label}: stored frame is truncated")
    return _arrow.tensor_rows(_format.decode_payload(info, memoryview(frame)[info.header_len:], label))


class ServerRun:
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
            self.meta: dict[str, Any] = db.run_row(conn, pk)

    def __repr__(self) -> str:
        return f"<gradexp.ServerRun {self.entity}/{self.project}/{self.id}>"

    # -- metadata ------------------------------------------------------------------------------

    def refresh(self) -> dict[str, Any]:
        """Read the run's record again (:attr:`meta`) and return it."""
        with self.engine.connect() as conn:
            self.meta = db.run_row(conn, self.pk)
        return self.meta

    @property
    def name(self) -> str | None:
        return self.meta.get("name")

    @property
    def tags(self) -> list[str]:
        return self.meta.get("tags") or []

    @property
    def notes(self) -> str | None:
        return self.meta.get("notes")

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

    def _no_key(self, key: str) -> KeyError:
        return KeyError(f"no tensor {key!r} in run {self.id}; tensor keys: "
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
            raise KeyError(f"{missing}: {self._no_key(key).args[0]}")
        raise KeyError(missing)

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
            raise KeyError(f"tensor {key!r} of run {self.id} has no step {missing[0]}"
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

    def tensors(self, key: str, steps: Iterable[int] | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """``(step, array)`` for the given steps (default: every logged step) in step order."""
        for wanted, data in self.read_plan(self.plan(key, steps)):
            got, arrays = decode_frame(data, f"tensor {key!r}")
            for s in wanted:
                yield s, arrays[int(np.flatnonzero(got == s)[-1])]


def rows_ipc(frames: Iterable[tuple[list[int], bytes]], *,
             batch_bytes: int = ROWS_BATCH_BYTES) -> Iterator[bytes]:
    """An Arrow IPC stream of :data:`ROWS_SCHEMA`, chunk by chunk: the schema, then a record
    batch per ``batch_bytes`` of frames, then the end-of-stream marker."""
    yield ROWS_SCHEMA.serialize().to_pybytes()
    steps: list[list[int]] = []
    data: list[bytes] = []
    size = 0
    for s, frame in frames:
        steps.append(s)
        data.append(frame)
        size += len(frame)
        if size >= batch_bytes:
            yield _rows_batch(steps, data)
            steps, data, size = [], [], 0
    if data:
        yield _rows_batch(steps, data)
    yield b"\xff\xff\xff\xff\x00\x00\x00\x00"  # end of stream


def _rows_batch(steps: list[list[int]], data: list[bytes]) -> bytes:
    """One record batch, built from buffers (``pa.array`` would import pandas: a second, once)."""
    counts = np.fromiter((len(s) for s in steps), np.int32, len(steps))
    step_offsets = np.zeros(len(steps) + 1, np.int32)
    np.cumsum(counts, out=step_offsets[1:])
    flat = np.fromiter((x for s in steps for x in s), np.int64, int(step_offsets[-1]))
    frame_offsets = np.zeros(len(data) + 1, np.int64)
    np.cumsum(np.fromiter((len(d) for d in data), np.int64, len(data)), out=frame_offsets[1:])
    columns = [pa.Array.from_buffers(ROWS_SCHEMA.field("steps").type, len(steps), [None, pa.py_buffer(step_offsets)],
                                     children=[_arrow.from_numpy(flat)]),
               pa.Array.from_buffers(pa.large_binary(), len(data),
                                     [None, pa.py_buffer(frame_offsets), pa.py_buffer(b"".join(data))])]
    return pa.record_batch(columns, schema=ROWS_SCHEMA).serialize().to_pybytes()
