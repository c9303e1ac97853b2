"""Rows of a side stream (console, system) as history frames in parts of their own.

Used by the sender process. A frame reaches the OS at each :meth:`StreamWriter.write`
(one ``writev``), so what was written survives any crash; parts are sealed by age (and
at close), and only sealed parts are uploaded.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from gradexp.core import format as _format

__all__ = ["StreamWriter"]

PART_MAX_BYTES = 8 << 20


class StreamWriter:
    """Appends rows of one stream (``console`` or ``system``) to ``<stream>-<seq>.gxp.open``."""

    def __init__(self, parts_dir: Path, stream: str, start_time: float, *, part_max_age: float) -> None:
        self.dir = parts_dir
        self.stream = stream
        self.start = start_time
        self.max_age = part_max_age
        existing = _format.list_parts(parts_dir, stream)
        self._seq = 1 + max((int(p.name.split(".")[0].rpartition("-")[2]) for p in existing), default=-1)
        self._part: _format.PartWriter | None = None

    def write(self, steps: list[int], times: list[float], rows: list[dict[str, Any]]) -> None:
        """One frame holding these rows."""
        if not rows:
            return
        from gradexp.core import arrow as _arrow

        batch = _arrow.rows_to_batch(steps, times, self.start, rows, {})
        raw = _arrow.history_ipc(batch)
        header, payload = _format.encode_frame(_format.KIND_HISTORY, raw, step_min=min(steps),
                                               step_max=max(steps), rows=len(rows))
        if self._part is None:
            self._part = _format.PartWriter(self.dir, self.stream, self._seq)
            self._seq += 1
        self._part.append(_format.KIND_HISTORY, header, payload, step_min=min(steps), step_max=max(steps),
                          rows=len(rows), key="", raw=len(raw), filt=_format.FILTER_NONE, elem=1)
        if self._part.size >= PART_MAX_BYTES:
            self.seal()

    def seal_if_old(self) -> None:
        if self._part is not None and time.monotonic() - self._part.created >= self.max_age:
            self.seal()

    def seal(self) -> None:
        part, self._part = self._part, None
        if part is not None:
            part.seal(drop_cache=False)
