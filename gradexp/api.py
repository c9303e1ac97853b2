"""Read runs back: history as Arrow, tensors as NumPy, from finished, running or crashed runs.

Reading never modifies a run folder. Sealed parts are indexed from their index
frame, open parts by walking frame headers, so one tensor at one step costs one
range read and one frame's decompression, whatever the size of the run.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from . import _arrow, _format
from ._errors import CorruptPartError, CorruptPartWarning, RunNotFoundError
from ._files import CONFIG_JSON, LOCK, PARTS, RUN_JSON, SUMMARY_JSON, read_json
from ._run import is_locked
from ._settings import resolve
from ._writer import HISTORY, TENSORS
from .core.streams import CONSOLE, PROVENANCE_JSON, SYSTEM, ConsoleLine, console_lines

__all__ = ["Api", "StoredRun"]

_BASE_COLUMNS = ("step", "_timestamp", "_runtime")


class Api:
    """Entry point of the read side.

    Local runs live under ``dir`` (default ``$GRADEXP_DIR`` or ``./gradexp-runs``);
    runs on a server (``host``, ``api_key``, defaulting to ``$GRADEXP_HOST`` and
    ``$GRADEXP_API_KEY``) are named ``"entity/project/run_id"``.
    """

    def __init__(self, *, dir: str | os.PathLike[str] | None = None, host: str | None = None,
                 api_key: str | None = None) -> None:
        s = resolve({"dir": dir, "host": host, "api_key": api_key})
        self.dir = s.dir.absolute()
        self.host = s.host
        self._api_key = s.api_key
        self._client: Any = None

    @property
    def client(self) -> Any:
        """The HTTP client for :attr:`host` (made on first use)."""
        if self._client is None:
            from ._client import Client

            self._client = Client(self.host, self._api_key)
        return self._client

    def run(self, ref: str | os.PathLike[str]) -> Any:
        """A run: a folder path, ``"project/run_id"`` or a bare run id under :attr:`dir`, or
        ``"entity/project/run_id"`` on :attr:`host`. Returns a :class:`StoredRun` for local
        runs and a :class:`gradexp._remote.RemoteRun` for remote ones; both read alike."""
        path = Path(ref)
        if self.host and isinstance(ref, str) and ref.count("/") == 2 and not path.exists():
            from ._remote import RemoteRun

            return RemoteRun(self.client, ref)
        candidates = [path]
        if not path.is_absolute():
            candidates.append(self.dir / path)
            if len(path.parts) == 1:
                candidates.extend(sorted(self.dir.glob(f"*/{path.name}")))
        for c in candidates:
            if (c / RUN_JSON).is_file():
                return StoredRun(c)
        raise RunNotFoundError(f"no run {str(ref)!r}: not a run folder, and not found under {self.dir} "
                               "(refer to a run as a folder path, 'project/run_id' or a run id)")

    def runs(self, project: str | None = None) -> list[StoredRun]:
        """Every run under :attr:`dir` (of one project if given), newest first."""
        pattern = f"{project}/*/{RUN_JSON}" if project else f"*/*/{RUN_JSON}"
        runs = [StoredRun(p.parent) for p in self.dir.glob(pattern)]
        return sorted(runs, key=lambda r: r.meta.get("created_at", 0), reverse=True)


class StoredRun:
    """A run folder, read-only."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.dir = Path(path).absolute()
        meta = read_json(self.dir / RUN_JSON)
        if meta is None:
            raise RunNotFoundError(f"{self.dir} is not a gradexp run folder (no {RUN_JSON})")
        self.meta: dict[str, Any] = meta
        self._scans: dict[Path, tuple[tuple[int, int], _format.PartScan]] = {}
        self._by_key: tuple[tuple[int, ...], dict[str, list[tuple[Path, _format.FrameInfo]]]] | None = None
        self._warned_damage: set[tuple[str, int]] = set()

    # -- metadata ------------------------------------------------------------------------------

    id = property(lambda self: self.meta["id"])
    name = property(lambda self: self.meta.get("name"))
    project = property(lambda self: self.meta.get("project"))
    tags = property(lambda self: self.meta.get("tags", []))
    notes = property(lambda self: self.meta.get("notes"))

    @property
    def config(self) -> dict[str, Any]:
        return read_json(self.dir / CONFIG_JSON, {})

    @property
    def summary(self) -> dict[str, Any]:
        return read_json(self.dir / SUMMARY_JSON, {})

    @property
    def status(self) -> str:
        """``running``, ``finished``, ``failed`` or ``crashed`` (its process died unfinished)."""
        self.meta = read_json(self.dir / RUN_JSON, self.meta)
        status = self.meta.get("status", "running")
        if status == "running" and not is_locked(self.dir / LOCK):
            return "crashed"
        return status

    def __repr__(self) -> str:
        return f"<gradexp.StoredRun {self.project}/{self.id} {self.dir}>"

    # -- indexes -------------------------------------------------------------------------------

    def _parts(self, stream: str) -> list[_format.PartScan]:
        for _ in range(3):
            try:
                return [self._scan(p) for p in _format.list_parts(self.dir / PARTS, stream)]
            except FileNotFoundError:
                continue  # an open part was sealed (renamed) while we listed: list again
        return [self._scan(p) for p in _format.list_parts(self.dir / PARTS, stream)]

    def _scan(self, path: Path) -> _format.PartScan:
        st = path.stat()
        stamp = (st.st_size, st.st_mtime_ns)
        cached = self._scans.get(path) or _SEALED.get(path)
        if cached is not None and cached[0] == stamp:
            self._scans[path] = cached
            return cached[1]
        scan = _format.scan_part(path)
        self._scans[path] = (stamp, scan)
        if scan.sealed and not scan.damage:
            _remember_sealed(path, (stamp, scan))
        for d in scan.damage:
            self._report(d.path, d.offset, d.reason)
        return scan

    def _report(self, path: str, offset: int, reason: str) -> None:
        if (path, offset) not in self._warned_damage:
            self._warned_damage.add((path, offset))
            warnings.warn(f"gradexp: skipped damaged data in {path} at byte {offset}: {reason}",
                          CorruptPartWarning, stacklevel=4)

    @property
    def damage(self) -> list[_format.Damage]:
        """Byte ranges that could not be read (found by indexing; decode errors are raised)."""
        return [d for stream in (HISTORY, TENSORS, CONSOLE, SYSTEM) for s in self._parts(stream) for d in s.damage]

    def _tensor_frames(self, key: str | None = None) -> list[tuple[Path, _format.FrameInfo]]:
        """Tensor frames (of one key), in write order; indexed by key once per change of parts."""
        scans = self._parts(TENSORS)
        stamp = tuple(id(s) for s in scans)
        if self._by_key is None or self._by_key[0] != stamp:
            by_key: dict[str, list[tuple[Path, _format.FrameInfo]]] = {}
            for path, info in _format.iter_frames(scans, _format.KIND_TENSOR):
                by_key.setdefault(info.key, []).append((path, info))
            self._by_key = (stamp, by_key)
        index = self._by_key[1]
        if key is None:
            return [item for frames in index.values() for item in frames]
        return index.get(key, [])

    # -- history -------------------------------------------------------------------------------

    def history(self, keys: Sequence[str] | None = None) -> pa.Table:
        """The scalar history as an Arrow table: ``step``, ``_timestamp``, ``_runtime`` and a
        column per key (tensor keys hold a struct of summaries), one row per step in step
        order; where a (step, key) was logged twice the last write wins."""
        return select_keys(self._stream_table(HISTORY), keys, self.id)

    def system(self, keys: Sequence[str] | None = None) -> pa.Table:
        """System metrics sampled by the sender process: ``step`` (the sample's number),
        ``_timestamp`` (its wall time), ``_runtime`` and one column per ``system/...`` figure."""
        return select_keys(self._stream_table(SYSTEM), keys, self.id)

    def console(self, since: int = 0) -> list[ConsoleLine]:
        """The run's console output, one :class:`~gradexp.core.streams.ConsoleLine` (line
        number, time, stream, text) per line as the terminal showed it, from line ``since``."""
        return console_lines(self._stream_table(CONSOLE), since)

    @property
    def provenance(self) -> dict[str, Any]:
        """The code's provenance: ``git`` (commit, branch, remote, dirty, patch), ``program`` and
        ``packages`` (docs/provenance.md); empty if not recorded (yet)."""
        return read_json(self.dir / PROVENANCE_JSON, {})

    def _stream_table(self, stream: str) -> pa.Table:
        tables = []
        for path, info in _format.iter_frames(self._parts(stream), _format.KIND_HISTORY):
            try:
                raw = _format.read_frame(path, info)
            except CorruptPartError as e:
                self._report(e.path, e.offset, e.reason)
                continue
            batch = _arrow.history_batch(raw)
            tables.append(pa.Table.from_batches([batch]))
        return combine_history(tables)

    def keys(self) -> list[str]:
        """Every logged key: scalars (history columns) and tensors."""
        names = dict.fromkeys(n for n in self.history().column_names if n not in _BASE_COLUMNS)
        names.update(dict.fromkeys(self.tensor_keys()))
        return list(names)

    def tensor_keys(self) -> list[str]:
        return list(dict.fromkeys(f.key for _, f in self._tensor_frames()))

    # -- tensors -------------------------------------------------------------------------------

    def _rows(self, key: str) -> dict[int, tuple[Path, _format.FrameInfo]]:
        """step -> the frame holding its last write, for one key."""
        frames = self._tensor_frames(key)
        if not frames:
            raise KeyError(f"no tensor {key!r} in run {self.id}; tensor keys: "
                           f"{', '.join(self.tensor_keys()) or '(none)'}")
        where: dict[int, tuple[Path, _format.FrameInfo]] = {}
        for path, info in frames:
            if info.rows == 1 or info.step_min == info.step_max:
                where[info.step_min] = (path, info)
            else:
                try:
                    steps, _ = _arrow.tensor_rows(_format.read_frame(path, info))
                except CorruptPartError as e:
                    self._report(e.path, e.offset, e.reason)
                    continue
                for s in steps.tolist():
                    where[s] = (path, info)
        return where

    def steps(self, key: str) -> list[int]:
        """The steps at which tensor ``key`` was logged, ascending."""
        return sorted(self._rows(key))

    def tensor(self, key: str, step: int) -> np.ndarray:
        """Tensor ``key`` at ``step``: bit-exact, in the dtype and shape it was logged with."""
        frames = self._tensor_frames(key)
        if not frames:
            self._rows(key)  # raises the KeyError that names the keys
        for path, info in reversed(frames):  # last write wins
            if info.step_min <= step <= info.step_max:
                steps, arrays = _arrow.tensor_rows(_format.read_frame(path, info))
                hits = np.flatnonzero(steps == step)
                if hits.size:
                    return arrays[int(hits[-1])]
        raise KeyError(f"tensor {key!r} of run {self.id} has no step {step}")

    def tensors(self, key: str) -> Iterator[tuple[int, np.ndarray]]:
        """``(step, array)`` for every logged step of ``key``, in step order."""
        where = self._rows(key)
        cache: tuple[_format.FrameInfo | None, Any] = (None, None)
        for step in sorted(where):
            path, info = where[step]
            if cache[0] is not info:
                cache = (info, _arrow.tensor_rows(_format.read_frame(path, info)))
            steps, arrays = cache[1]
            yield step, arrays[int(np.flatnonzero(steps == step)[-1])]


# Sealed parts never change: their indexes are shared by every reader in the process.
_SEALED: dict[Path, tuple[tuple[int, int], _format.PartScan]] = {}
_SEALED_MAX = 100_000


def _remember_sealed(path: Path, entry: tuple[tuple[int, int], _format.PartScan]) -> None:
    if len(_SEALED) >= _SEALED_MAX:
        _SEALED.clear()
    _SEALED[path] = entry


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
        raise KeyError(f"no key {missing[0]!r} in the history of run {run_id}; keys: "
                       f"{', '.join(c for c in table.column_names if c not in _BASE_COLUMNS)}")
    return table.select(list(_BASE_COLUMNS) + [k for k in keys if k not in _BASE_COLUMNS])


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
