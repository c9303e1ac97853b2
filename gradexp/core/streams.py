"""The run's side streams, written by the sender process: console output and system metrics.

Both are parts like the history (``console-000000.gxp``, ``system-000000.gxp``) holding
history frames, so they are crash-safe, recovered and uploaded like every other part, and
read back with the history's merge rule (rows by ``step``, last write wins).

- ``console``: one row per terminal line, ``step`` the line number (from 0), ``_timestamp``
  the wall time its newline arrived, ``stream`` (``stdout``, ``stderr``, or ``output`` when
  both went to one terminal or file and were captured as one, in their exact order) and
  ``text``.
- ``system``: one row per sample, ``step`` the sample number, ``_timestamp`` its wall time,
  one column per figure under ``system/``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from gradexp.core.layout import CONSOLE, FATAL, SYSTEM

__all__ = ["CONSOLE", "FATAL", "PROVENANCE_JSON", "SIDE_STREAMS", "SYSTEM", "ConsoleLine", "console_lines"]

SIDE_STREAMS = (CONSOLE, SYSTEM)
PROVENANCE_JSON = "provenance.json"
"""Git state, entry point and installed distributions, written by the sender process."""


class ConsoleLine(NamedTuple):
    """One line of a run's console output, as a terminal showed it."""

    line: int
    """The line's number, from 0."""
    time: float
    """Unix time at which the line ended (its newline arrived)."""
    stream: str
    """``stdout``, ``stderr`` or ``output`` (both, captured as one)."""
    text: str


def console_lines(table: Any, since: int = 0) -> list[ConsoleLine]:
    """The rows of a console table (``pyarrow.Table`` in line order) as :class:`ConsoleLine`."""
    if table.num_rows == 0 or "text" not in table.column_names:
        return []
    cols = [table.column(n).to_pylist() for n in ("step", "_timestamp", "stream", "text")]
    return [ConsoleLine(n, t, s or "", x or "") for n, t, s, x in zip(*cols) if n >= since]
