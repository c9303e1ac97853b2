"""Memory the hot paths reuse: a pool of large buffers and per-thread scratch space.

Hand-written on purpose (no library pools anonymous mappings by size with an idle timeout):
touching fresh memory costs ~1.5 ms per 4 MiB here against ~0.3 ms to copy into memory
already touched (docs/benchmarks.md), and that difference is most of a tensor ``log()``.
"""

from __future__ import annotations

import mmap
import threading
import time

import numpy as np

__all__ = ["BufferPool", "scratch"]

_scratch_local = threading.local()


def scratch(name: str, size: int) -> np.ndarray:
    """A per-thread buffer reused across calls: fresh memory is slow to touch on first use."""
    buf = getattr(_scratch_local, name, None)
    if buf is None or buf.size < size:
        buf = np.empty(max(size, 1 << 20), dtype=np.uint8)
        setattr(_scratch_local, name, buf)
    return buf[:size]



# Private (copy-on-write) anonymous memory: a forked child never shares the pool's pages.
_PRIVATE = {"flags": mmap.MAP_PRIVATE} if hasattr(mmap, "MAP_PRIVATE") else {}


class BufferPool:
    """Reused buffers for large snapshots and compressed payloads.

    Fresh memory is slow to touch on first use (page faults: ~1.5 ms per 4 MiB on the
    reference machine, against ~0.3 ms to copy into memory already touched), so the
    writer hands a buffer back once it is done with it and the next ``log()`` of the
    same size copies into it. The pool keeps up to ``max_bytes`` of idle buffers (a full
    queue's worth, so a second burst of ``log()`` calls runs at copy speed) and unmaps
    those idle for ``idle_s`` seconds, so a run that stops logging large tensors gives
    the memory back. Buffers are private anonymous mappings: page-aligned, not
    madvised for transparent huge pages as NumPy's large arrays are (compaction
    stalls cost more than huge pages save here), and returned to the OS the moment
    they are unmapped.
    """

    MIN_BYTES = 1 << 20

    def __init__(self, max_bytes: int, *, idle_s: float = 30.0) -> None:
        self._free: dict[int, list[tuple[float, np.ndarray]]] = {}
        self._bytes = 0
        self._max = max_bytes
        self._idle_s = idle_s
        self._lock = threading.Lock()

    @property
    def idle_bytes(self) -> int:
        """Bytes held in idle buffers."""
        return self._bytes

    def take(self, nbytes: int) -> np.ndarray:
        """A writable uint8 buffer of ``nbytes``: a reused one when the pool has one."""
        if nbytes < self.MIN_BYTES:
            return np.empty(nbytes, dtype=np.uint8)
        with self._lock:
            free = self._free.get(nbytes)
            if free:
                self._bytes -= nbytes
                return free.pop()[1]
        return np.frombuffer(mmap.mmap(-1, nbytes, **_PRIVATE), dtype=np.uint8)

    def give(self, buf: np.ndarray) -> None:
        """Keep ``buf`` for a later ``take`` (if there is room); nothing may use it after."""
        n = buf.nbytes
        if n >= self.MIN_BYTES:
            now = time.monotonic()
            with self._lock:
                if self._bytes + n <= self._max:
                    self._free.setdefault(n, []).append((now, buf))  # taken last in, first out
                    self._bytes += n

    def clear(self) -> None:
        """Drop every idle buffer (the run is over; its memory goes back to the OS)."""
        with self._lock:
            self._free.clear()
            self._bytes = 0

    def trim(self, now: float | None = None) -> int:
        """Drop buffers idle for ``idle_s`` seconds; return the bytes released."""
        cutoff = (time.monotonic() if now is None else now) - self._idle_s
        released = 0
        with self._lock:
            for n, free in self._free.items():
                old = 0
                while old < len(free) and free[old][0] <= cutoff:  # the oldest sit at the bottom
                    old += 1
                if old:
                    del free[:old]
                    released += old * n
            for n in [n for n, free in self._free.items() if not free]:
                del self._free[n]
            self._bytes -= released
        return released

