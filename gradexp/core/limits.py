"""Limits every layer agrees on: the client refuses what the server could not store."""

from __future__ import annotations

__all__ = ["EXIT_CODE_MAX", "INT_MAX", "INT_MIN", "MAX_KEY_LENGTH", "exit_code_for_record"]

MAX_KEY_LENGTH = 1024
"""Characters in a whole flattened key ("a/b/c"): the server's key columns hold this many,
and a part's frame header (a u16 byte length) holds any such key (at most 4,096 bytes)."""

INT_MIN = -(1 << 63)
INT_MAX = (1 << 63) - 1
"""Integers are stored as int64 (history columns, steps); one outside is refused, not rounded."""

EXIT_CODE_MAX = (1 << 31) - 1


def exit_code_for_record(code: int) -> int:
    """``code`` within 32 bits, as run.json and every server database keep it: an exit code
    beyond that (which no process can exit with) is clamped, keeping its sign."""
    return max(-EXIT_CODE_MAX - 1, min(int(code), EXIT_CODE_MAX))

