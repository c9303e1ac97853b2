"""Console capture, the training process's end: stdout and stderr through a pipe to the sender.

At the file-descriptor level, so output of C extensions and of child processes (which
inherit descriptors 1 and 2) is captured as well as ``print``. The sender process reads
the pipe, writes every byte on to where the descriptors pointed before (the terminal keeps
showing everything) and records the lines. When 1 and 2 lead to the same place (one
terminal, or ``> log 2>&1``), both go through one pipe, so their order is kept exactly; to
different places, through one pipe each, so each still reaches its own (the order between
the two is then the order the sender read them in).

Nothing here runs per line in this process: after :meth:`Capture.start` the kernel moves
the bytes. ``sys.stdout`` is made line-buffered while capturing (as it is on a terminal),
so a ``print`` is timestamped when printed and keeps its place among direct writes.
"""

from __future__ import annotations

import os
import sys
import threading

__all__ = ["Capture"]

PIPE_BYTES = 1 << 20
"""Pipe capacity asked for (Linux caps unprivileged pipes at 1 MiB by default): output the
sender has not read yet waits there, and a writer blocks only once it is full."""
_F_SETPIPE_SZ = 1031


class _Channel:
    """One pipe (a plain class: ``@dataclass`` builds its methods with ``exec`` at import, ms
    that ``init()`` would pay)."""

    __slots__ = ("fds", "name", "original", "pipe_ino", "read", "saved")

    def __init__(self, name: str, fds: tuple[int, ...], read: int, original: int, saved: tuple[int, ...],
                 pipe_ino: int) -> None:
        self.name = name
        self.fds = fds
        """The descriptors redirected into this pipe (1, 2 or both)."""
        self.read = read
        """This process's copy of the pipe's read end: kept open so a write never fails with
        EPIPE if the sender dies; drained to the terminal then."""
        self.original = original
        """A duplicate of where ``fds`` pointed before: where the sender writes the bytes on to."""
        self.saved = saved
        """Duplicates of each of ``fds`` as they were, to put back at :meth:`Capture.stop`."""
        self.pipe_ino = pipe_ino


class Capture:
    """Descriptors 1 and 2 redirected into pipes; :attr:`channels` says what to hand the sender."""

    def __init__(self) -> None:
        self.channels: list[_Channel] = []
        self._line_buffering: bool | None = None
        self._stopped = False
        self._lock = threading.Lock()

    def start(self) -> None:
        _flush_python_streams()
        open_fds = [fd for fd in (1, 2) if _is_open(fd)]  # a daemon may run without them
        if open_fds == [1, 2] and _same_file(1, 2):
            groups: list[tuple[str, tuple[int, ...]]] = [("output", (1, 2))]
        else:
            groups = [("stdout" if fd == 1 else "stderr", (fd,)) for fd in open_fds]
        for name, fds in groups:
            r, w = os.pipe()
            try:
                import fcntl

                fcntl.fcntl(w, _F_SETPIPE_SZ, PIPE_BYTES)
            except (ImportError, OSError):  # another OS, or a lower limit: the default size
                pass
            saved = tuple(os.dup(fd) for fd in fds)
            original = os.dup(fds[0])
            for fd in fds:
                os.dup2(w, fd)  # inheritable: child processes write into the pipe too
            ino = os.fstat(w).st_ino
            os.close(w)
            self.channels.append(_Channel(name, fds, r, original, saved, ino))
        out = sys.stdout
        if hasattr(out, "reconfigure") and _fileno(out) == 1 and not out.line_buffering:
            self._line_buffering = False
            out.reconfigure(line_buffering=True)

    def stop(self) -> None:
        """Put descriptors 1 and 2 back (those still pointing into our pipes) and let go of
        the pipes; output still in them reaches the terminal through the sender."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        _flush_python_streams()
        self._restore()
        for ch in self.channels:
            os.close(ch.read)
            os.close(ch.original)
        if self._line_buffering is not None and hasattr(sys.stdout, "reconfigure"):
            try:
                sys.stdout.reconfigure(line_buffering=self._line_buffering)
            except (ValueError, OSError):
                pass

    def abandon(self) -> None:
        """The sender is gone: put the descriptors back at once and copy what is left in the
        pipes (and what child processes still write into them) to the terminal."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        self._restore()
        for ch in self.channels:
            threading.Thread(target=_drain, args=(ch.read, ch.original), name="gradexp-console-drain",
                             daemon=True).start()

    def _restore(self) -> None:
        for ch in self.channels:
            for fd, saved in zip(ch.fds, ch.saved):
                try:
                    if os.fstat(fd).st_ino == ch.pipe_ino:  # not redirected again since (a later run)
                        os.dup2(saved, fd)
                except OSError:
                    pass
                os.close(saved)


def _drain(read: int, to: int) -> None:
    try:
        while data := os.read(read, 1 << 16):
            try:
                os.write(to, data)
            except OSError:
                pass
    finally:
        os.close(read)
        os.close(to)


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _same_file(a: int, b: int) -> bool:
    try:
        sa, sb = os.fstat(a), os.fstat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _fileno(stream: object) -> int | None:
    try:
        return stream.fileno()  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):
        return None


def _flush_python_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
