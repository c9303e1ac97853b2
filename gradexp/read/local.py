"""Read a local run folder: history as Arrow, tensors as NumPy, from finished, running or
crashed runs.

Reading never modifies a run folder. Sealed parts are indexed from their index
frame, open parts by walking frame headers, so one tensor at one step costs one
range read and one frame's decompression, whatever the size of the run.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from gradexp.core import arrow as _arrow
from gradexp.core import format as _format
from gradexp.core import pool as _pool
from gradexp.core.errors import CorruptPartError, CorruptPartWarning, KeyNotFoundError, RunNotFoundError
from gradexp.core.history import BASE_COLUMNS, combine_history, select_keys
from gradexp.core.layout import CONFIG_JSON, HISTORY, LOCK, PARTS, RUN_JSON, SUMMARY_JSON, TENSORS, is_locked, read_json
from gradexp.core.streams import CONSOLE, PROVENANCE_JSON, SYSTEM, ConsoleLine, console_lines
from gradexp.read.reader import RecordFields, TensorMedia

__all__ = ["StoredRun"]


class StoredRun(RecordFields, TensorMedia):
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
    project = property(lambda self: self.meta.get("project"))

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
        # Every frame decodes into its slice of one allocation (64-byte aligned, so Arrow reads
        # the slices in place): NumPy backs a large one with huge pages, where a fresh
        # allocation per frame faulted its pages in one by one and the pool's threads queued
        # on the kernel for it. 20 x 1M steps (318 frames, 185 MB): 2 threads 0.31-0.35 s
        # -> 0.17 s (docs/benchmarks.md).
        items = list(_format.iter_frames(self._parts(stream), _format.KIND_HISTORY))
        ends = np.cumsum([-(-info.raw // 64) * 64 for _, info in items], dtype=np.int64)
        block = np.empty(int(ends[-1]) if items else 0, np.uint8)

        def load(k: int) -> pa.Table | CorruptPartError:
            path, info = items[k]
            start = int(ends[k - 1]) if k else 0
            try:
                raw = _format.read_frame(path, info, into=block[start:start + info.raw])
                return pa.Table.from_batches([_arrow.history_batch(raw)])
            except CorruptPartError as e:
                return e
        tables = []
        for got in _pool.map_ordered(load, range(len(items))):
            if isinstance(got, CorruptPartError):
                self._report(got.path, got.offset, got.reason)
            else:
                tables.append(got)
        return combine_history(tables)

    def last_step(self) -> int | None:
        """The highest step in the history, from the part indexes (nothing is decompressed)."""
        return max((info.step_max for _, info in _format.iter_frames(self._parts(HISTORY), _format.KIND_HISTORY)),
                   default=None)

    def keys(self) -> list[str]:
        """Every logged key: scalars (history columns) and tensors."""
        names = dict.fromkeys(n for n in self.history().column_names if n not in BASE_COLUMNS)
        names.update(dict.fromkeys(self.tensor_keys()))
        return list(names)

    def tensor_keys(self) -> list[str]:
        """Tensor keys, sorted (as a server lists them)."""
        return sorted({f.key for _, f in self._tensor_frames()})

    # -- tensors -------------------------------------------------------------------------------

    def _rows(self, key: str) -> dict[int, tuple[Path, _format.FrameInfo]]:
        """step -> the frame holding its last write, for one key."""
        frames = self._tensor_frames(key)
        if not frames:
            raise KeyNotFoundError(f"no tensor {key!r} in run {self.id}; tensor keys: "
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
        return self._frame(key, step)[0]

    def _frame(self, key: str, step: int) -> tuple[np.ndarray, dict[bytes, bytes]]:
        """Tensor ``key`` at ``step`` and its frame's metadata (last write wins)."""
        frames = self._tensor_frames(key)
        if not frames:
            self._rows(key)  # raises the KeyError that names the keys
        for path, info in reversed(frames):
            if info.step_min <= step <= info.step_max:
                steps, arrays, meta = _arrow.tensor_frame(_format.read_frame(path, info))
                hits = np.flatnonzero(steps == step)
                if hits.size:
                    return arrays[int(hits[-1])], meta
        raise KeyNotFoundError(f"tensor {key!r} of run {self.id} has no step {step}")

    def tensors(self, key: str, steps: Iterable[int] | None = None, *,
                reuse: bool = False) -> Iterator[tuple[int, np.ndarray]]:
        """``(step, array)`` for the given steps of ``key`` (default: every logged step), each
        once, in step order; ``KeyError`` naming a step that was not logged, before any is read.
        Each array is the caller's to modify; with ``reuse``, valid only until the next one is
        asked for (frames decode into per-thread buffers)."""
        where = self._rows(key)
        wanted = sorted(where) if steps is None else sorted(set(steps))
        missing = [s for s in wanted if s not in where]
        if missing:
            raise KeyNotFoundError(f"tensor {key!r} of run {self.id} has no step {missing[0]}"
                                   + (f" (nor {len(missing) - 1} more of the steps asked for)"
                                      if len(missing) > 1 else ""))
        cache: tuple[_format.FrameInfo | None, Any] = (None, None)
        for step in wanted:
            path, info = where[step]
            if cache[0] is not info:
                cache = (info, _arrow.tensor_rows(_format.read_frame(path, info, reuse=reuse)))
            steps, arrays = cache[1]
            yield step, arrays[int(np.flatnonzero(steps == step)[-1])]


# Sealed parts never change: their indexes are shared by every reader in the process.
_SEALED: dict[Path, tuple[tuple[int, int], _format.PartScan]] = {}
_SEALED_MAX = 100_000


def _remember_sealed(path: Path, entry: tuple[tuple[int, int], _format.PartScan]) -> None:
    if len(_SEALED) >= _SEALED_MAX:
        _SEALED.clear()
    _SEALED[path] = entry

