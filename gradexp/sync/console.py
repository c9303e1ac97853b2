"""Console capture, the sender's end: tee the trainer's output to the terminal, record its lines.

One thread moves bytes: it reads the pipes the training process's descriptors 1 and 2
point into (:mod:`gradexp.write.console`), writes every byte on to the terminal (or file)
they pointed at before, unchanged and at once, and cuts the bytes into lines as a terminal
shows them: a carriage return goes back to the start of the line and what follows
overwrites it (a progress bar redrawn a thousand times is one line, its last state). A
second thread writes the finished lines to the ``console`` stream every
``flush_interval``. Both live in the sender process, so a trainer killed with SIGKILL
loses nothing it wrote: the pipe is drained to its end.
"""

from __future__ import annotations

import os
import re
import select
import threading
import time
from collections.abc import Callable

from gradexp.sync.streams import StreamWriter

__all__ = ["ConsoleRecorder", "LineCutter"]

MAX_LINE = 1 << 20
"""A line longer than this (bytes, after carriage returns) is cut, so memory stays bounded."""
_TOKENS = re.compile(rb"(\r|\n)")


class LineCutter:
    """Bytes in, lines out, as a terminal would show them (carriage returns collapsed)."""

    def __init__(self) -> None:
        self._line = bytearray()
        self._col = 0

    def feed(self, data: bytes) -> list[str]:
        done: list[str] = []
        for token in _TOKENS.split(data):
            if token == b"\n":
                done.append(self._take())
            elif token == b"\r":
                self._col = 0
            elif token:
                self._line[self._col:self._col + len(token)] = token
                self._col += len(token)
                if len(self._line) >= MAX_LINE:
                    done.append(self._take())
        return done

    def rest(self) -> str | None:
        """The unfinished last line, if any (at the end of the output)."""
        return self._take() if self._line else None

    def _take(self) -> str:
        text = self._line.decode("utf-8", errors="replace")
        self._line = bytearray()
        self._col = 0
        return text


class ConsoleRecorder:
    """Tee ``channels`` (name, pipe read end, terminal descriptor) and record their lines."""

    def __init__(self, channels: list[tuple[str, int, int]], writer: StreamWriter, *, flush_interval: float,
                 log: Callable[[str], None]) -> None:
        self._channels = {fd: (name, term, LineCutter()) for name, fd, term in channels}
        self._writer = writer
        self._flush = flush_interval
        self._log = log
        self._lines: list[tuple[float, str, str]] = []
        self._lock = threading.Lock()
        self._count = 0
        self._recording = True
        self.eof = threading.Event()
        self._stop = threading.Event()
        self._tee = threading.Thread(target=self._tee_loop, name="gradexp-console-tee", daemon=True)
        self._write = threading.Thread(target=self._write_loop, name="gradexp-console-write", daemon=True)
        self._tee.start()
        self._write.start()

    def _tee_loop(self) -> None:
        poller = select.poll()
        for fd in self._channels:
            poller.register(fd, select.POLLIN)
        live = set(self._channels)
        while live:
            for fd, _ in poller.poll():
                name, term, cutter = self._channels[fd]
                try:
                    data = os.read(fd, 1 << 16)
                except OSError:
                    data = b""
                now = time.time()
                if not data:  # every writer closed its end
                    poller.unregister(fd)
                    live.discard(fd)
                    rest = cutter.rest()
                    if rest is not None:
                        self._add(now, name, [rest])
                    os.close(fd)
                    if term >= 0:  # let go of the terminal: whoever reads it sees its end
                        os.close(term)
                    continue
                if term >= 0:
                    term = self._show(fd, term, data)
                self._add(now, name, cutter.feed(data))
        self.eof.set()

    def _show(self, fd: int, term: int, data: bytes) -> int:
        """Write ``data`` on to the terminal; -1 once it is gone (a closed terminal, a full disk)."""
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(term, view):]
        except OSError as e:
            self._log(f"console output can no longer be shown (recorded still): {e}")
            name, _, cutter = self._channels[fd]
            self._channels[fd] = (name, -1, cutter)
            os.close(term)
            return -1
        return term

    def _add(self, now: float, name: str, lines: list[str]) -> None:
        if lines and self._recording:
            with self._lock:
                self._lines.extend((now, name, text) for text in lines)

    def _write_loop(self) -> None:
        while not self._stop.wait(self._flush):
            self._write_lines()
            self._writer.seal_if_old()

    def _write_lines(self) -> None:
        with self._lock:
            lines, self._lines = self._lines, []
        if not lines:
            return
        first = self._count
        self._count += len(lines)
        self._writer.write(list(range(first, first + len(lines))), [t for t, _, _ in lines],
                           [{"stream": s, "text": x} for _, s, x in lines])

    def close(self, *, wait: float) -> None:
        """Record until every writer of the pipes has closed them (at most ``wait`` seconds:
        child processes may hold them longer), then write the rest and seal the stream. The
        terminal keeps getting their output afterwards, unrecorded."""
        self.eof.wait(wait)
        self._stop.set()
        self._write.join()
        self._recording = False
        self._write_lines()
        self._writer.seal()
