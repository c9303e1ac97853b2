"""The writer thread: drains what ``log()`` queued and turns it into part files.

It owns all packing: history rows become Arrow record batches, small tensors are
batched several steps to a frame, large tensors are summarised and compressed by
a few worker threads (NumPy and zstd release the GIL) and written in order.
Everything queued reaches the OS within ``flush_interval``. The queue is bounded
by bytes and rows: when it is full, ``log()`` blocks (and warns once) instead of
dropping data or growing memory. Nothing raised here reaches the caller.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ._errors import GradexpWarning
from ._settings import Settings
from ._values import BufferPool, Prepared, Tensor

HISTORY = "history"
TENSORS = "tensors"
_GROUP_MAX_BYTES = 1 << 20
_HISTORY_MAX_ROWS = 50_000
_INFLIGHT_MAX_BYTES = 64 << 20
"""Encode jobs may run ahead of the writes by this many raw bytes (and by at least two per
worker): enough to keep the workers busy while the writer fsyncs a sealed 64 MiB part."""
_TRIM_EVERY = 1.0
"""Seconds between looks for pooled buffers idle long enough to unmap."""
_LAG_CHECK_ROWS = 1024
"""log() looks at the age of the oldest queued row once this many rows are queued."""


class _Workers:
    """A few daemon threads for encode jobs.

    Not a ThreadPoolExecutor: that one refuses work once interpreter shutdown has
    begun, which is exactly when an atexit ``finish()`` needs it.
    """

    def __init__(self, n: int) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._loop, name=f"gradexp-encode-{i}", daemon=True)
                         for i in range(n)]
        for t in self._threads:
            t.start()

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fut, fn, args = job
            try:
                fut.set_result(fn(*args))
            except BaseException as e:  # handed to the writer, which reports it
                fut.set_exception(e)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        fut: Future = Future()
        self._jobs.put((fut, fn, args))
        return fut

    def close(self) -> None:
        for _ in self._threads:
            self._jobs.put(None)
        for t in self._threads:
            t.join()


def _encode_tensor(key: str, steps: list[int], arrays: list[np.ndarray], logical: np.dtype,
                   summarise: bool, pool: BufferPool) -> list[Any]:
    """Summary (for a single large tensor) and the frame (header, payload) of the rows; the
    payload is compressed into a buffer of ``pool``, handed back once written."""
    from ._arrow import shuffle_width, tensor_ipc
    from ._format import KIND_TENSOR, encode_frame
    from ._summary import summarize

    first = arrays[0]
    summary = summarize(first) if summarise else None
    stacked = first[None] if len(arrays) == 1 else np.stack(arrays)
    raw = tensor_ipc(key, steps, stacked, logical, first.shape, reuse=True)  # compressed right below
    elem = shuffle_width(first)
    # Byte-shuffle lifts the ratio on dense floats (1.08 -> 1.19 for float32 here) but
    # hurts sparse tensors, whose zero runs zstd already finds: skip it for those.
    if elem > 1 and summary is not None and (summary["zero_frac"] or 0.0) > 0.5:
        elem = 0
    header, payload = encode_frame(KIND_TENSOR, raw, key=key, step_min=min(steps),
                                   step_max=max(steps), rows=len(steps), shuffle_elem=elem,
                                   into=pool.take)
    return [summary, header, payload, len(raw), elem]  # a list: the writer drops the bytes once written


class _Group:
    """Small tensors of one key (same dtype and shape) waiting to share a frame."""

    __slots__ = ("logical", "shape", "dtype", "steps", "arrays", "nbytes", "_summaries")

    def __init__(self, t: Tensor) -> None:
        self.logical = t.logical
        self.shape = t.array.shape
        self.dtype = t.array.dtype
        self.steps: list[int] = []
        self.arrays: list[np.ndarray] = []
        self.nbytes = 0
        self._summaries: list[dict[str, Any]] | None = None

    def summaries(self) -> list[dict[str, Any]]:
        """Computed once per row (before the arrays are dropped); the history may be written
        while the group is still filling, so rows added since are summarised on the next call."""
        done = self._summaries or []
        if len(done) < len(self.arrays):
            from ._summary import summarize_rows

            self._summaries = done + summarize_rows(np.stack(self.arrays[len(done):]))
        return self._summaries

    def fits(self, t: Tensor) -> bool:
        return t.array.shape == self.shape and t.array.dtype == self.dtype and t.logical == self.logical


class Writer:
    """Background writer of one run's part files."""

    def __init__(self, parts_dir: Path, settings: Settings, start_time: float,
                 on_flush: Callable[[], None]) -> None:
        self._dir = parts_dir
        self._s = settings
        self._start = start_time
        self._on_flush = on_flush
        self._q: collections.deque = collections.deque()
        self._wake = threading.Event()
        self._cv = threading.Condition()
        self._queued_bytes = 0
        self._warned_full = False
        # A row may wait this long in the queue, so that what log() took reaches the OS
        # within flush_interval even when a loop logs faster than the writer can write:
        # the writer flushes every flush_interval / 2, and writing takes time too.
        self._max_lag = settings.flush_interval / 5
        self._max_rows = settings.queue_max_rows
        self._check_rows = min(settings.queue_max_rows, _LAG_CHECK_ROWS)
        # Idle buffers for a full queue of snapshots plus the payloads in flight.
        self.pool = BufferPool(settings.queue_max_bytes + _INFLIGHT_MAX_BYTES)
        self.error: BaseException | None = None
        # Writer-thread state.
        self._parts: dict[str, Any] = {}
        self._seq = {HISTORY: 0, TENSORS: 0}
        self._rows: list[tuple[int, float, dict[str, Any], dict[str, Any]]] = []
        self._groups: dict[str, _Group] = {}
        self._inflight: collections.deque = collections.deque()
        self._inflight_bytes = 0
        self._workers: _Workers | None = None
        self._last_flush = self._last_trim = time.monotonic()
        live = self._live = settings.mode == "online"
        # Online, history parts are sealed (and so uploaded) every live_interval: the server
        # cannot see an open part, and history should be visible within about two seconds.
        self._max_age = {HISTORY: settings.live_interval if live else settings.part_max_age,
                         TENSORS: settings.part_max_age}
        self._flush_every = min(settings.flush_interval / 2, settings.live_interval if live else 1e9)
        self._thread = threading.Thread(target=self._main, name="gradexp-writer", daemon=True)
        self._thread.start()

    # -- caller side ---------------------------------------------------------------------

    def put_row(self, step: int, ts: float, p: Prepared) -> None:
        n = p.nbytes
        queued = len(self._q)
        # A backlog's age is looked at on one call in 256: cheap enough for the hot path.
        if n or queued >= self._check_rows and (queued >= self._max_rows or not queued & 255):
            self._reserve(n, ts)
        self._q.append((step, ts, p))
        if n and not self._wake.is_set():
            self._wake.set()

    def _lag(self, now: float) -> float:
        """Seconds the oldest queued row has waited (0 when the queue starts with a flush)."""
        try:
            head = self._q[0]
        except IndexError:
            return 0.0
        ts = head[1]
        return now - ts if type(ts) is float else 0.0

    def _reserve(self, n: int, now: float) -> None:
        s = self._s
        if not self._wake.is_set():
            self._wake.set()  # rows are piling up: keep the writer at them, not asleep
        with self._cv:
            while self.error is None and (
                    (self._queued_bytes and self._queued_bytes + n > s.queue_max_bytes)
                    or len(self._q) >= self._max_rows
                    or (len(self._q) >= self._check_rows and self._lag(now) > self._max_lag)):
                if not self._warned_full:
                    self._warned_full = True
                    warnings.warn(
                        "gradexp: log() is waiting for the writer to catch up (the queue holds "
                        f"{self._queued_bytes / 2**20:.0f} MiB and {len(self._q)} rows, the oldest "
                        f"{self._lag(now):.2f} s old; limits queue_max_bytes={s.queue_max_bytes}, "
                        f"queue_max_rows={s.queue_max_rows}, and rows may wait "
                        f"{self._max_lag:g} s so that they reach the disk within flush_interval). "
                        "Nothing is dropped.", GradexpWarning, stacklevel=5)
                self._wake.set()
                self._cv.wait(0.02)
                now = time.time()
            self._queued_bytes += n

    def _release(self, n: int) -> None:
        with self._cv:
            self._queued_bytes -= n
            self._cv.notify_all()

    def flush(self, *, fsync: bool = False, close: bool = False) -> None:
        """Write everything queued so far to the OS (and fsync); with ``close``, seal and stop."""
        if not self._thread.is_alive():
            return
        done = threading.Event()
        self._q.append(("close" if close else "flush", done, fsync))
        self._wake.set()
        while not done.wait(0.1):
            if not self._thread.is_alive():
                return
        if close:
            self._thread.join()

    # -- writer thread -------------------------------------------------------------------

    def _main(self) -> None:
        tick = min(self._flush_every / 2, 0.25)
        try:
            # Import pyarrow here, in the background, right after init(): `import gradexp`
            # stays light, and the first flush (or a quick finish()) does not pay for it.
            from . import _arrow, _summary  # noqa: F401

            while True:
                self._wake.wait(tick)
                self._wake.clear()
                if self._drain():
                    return
                self._write_ready()
                now = time.monotonic()
                if now - self._last_flush >= self._flush_every:
                    self._flush()
                if now - self._last_trim >= _TRIM_EVERY:
                    self._last_trim = now
                    self.pool.trim(now)
        except BaseException as e:  # never reaches the training loop
            self.error = e
            warnings.warn(f"gradexp: the background writer failed and logging has stopped: {e!r}. "
                          f"Everything written before is readable from {self._dir.parent}; the "
                          "run will end failed, with this reason in run.json.",
                          GradexpWarning, stacklevel=1)
            with self._cv:
                self._cv.notify_all()
            self._abandon()

    def _drain(self) -> bool:
        """Process what is queued; True once a close has been handled.

        Returns early once a flush is due, so a log() loop that never pauses (the queue is
        never empty) cannot hold back flushes: they are the flush_interval guarantee.
        """
        q = self._q
        waiting = False
        due = self._last_flush + self._flush_every
        while q:
            if waiting and time.monotonic() >= due:
                self._wake.set()  # more is queued: come straight back after the flush
                break
            item = q.popleft()
            if len(item) == 3 and type(item[0]) is str:
                kind, done, fsync = item
                self._flush(fsync=fsync, seal=kind == "close")
                done.set()
                if kind == "close":
                    if self._workers:
                        self._workers.close()
                    self.pool.clear()
                    return True
                continue
            step, ts, p = item
            tsum: dict[str, Any] = {}
            for key, t in p.tensors.items():
                tsum[key] = self._add_tensor(key, step, t)
            self._rows.append((step, ts, p.scalars, tsum))  # not a cached local: writing swaps it
            if len(self._rows) >= _HISTORY_MAX_ROWS:
                self._write_history()
            waiting = True
        if waiting and len(q) < self._s.queue_max_rows:
            with self._cv:
                self._cv.notify_all()
        return False

    def _add_tensor(self, key: str, step: int, t: Tensor) -> Any:
        arr = t.array
        if arr.nbytes >= self._s.small_tensor_bytes:
            if key in self._groups:  # its rows were logged first: their frame must come first
                self._write_group(key)
            if self._workers is None:
                self._workers = _Workers(self._s.workers)
            fut = self._workers.submit(_encode_tensor, key, [step], [arr], t.logical, True, self.pool)
            fut.add_done_callback(self._wake_up)  # write it (and free queue room) at once
            self._inflight.append((fut, key, step, t))
            self._inflight_bytes += arr.nbytes
            while (len(self._inflight) > 2 * self._s.workers
                   and self._inflight_bytes > _INFLIGHT_MAX_BYTES):
                self._write_one(self._inflight.popleft())
            return fut
        g = self._groups.get(key)
        if g is not None and not g.fits(t):
            self._write_group(key)
            g = None
        if g is None:
            g = self._groups[key] = _Group(t)
        ref = (g, len(g.steps))  # resolved to a summary when the history is written
        g.steps.append(step)
        g.arrays.append(arr)
        g.nbytes += arr.nbytes
        if g.nbytes >= _GROUP_MAX_BYTES:
            self._write_group(key)
        return ref

    def _wake_up(self, _: Future) -> None:
        if not self._wake.is_set():
            self._wake.set()

    def _write_ready(self) -> None:
        while self._inflight and self._inflight[0][0].done():
            self._write_one(self._inflight.popleft())

    def _write_one(self, item: tuple[Future, str, int, Tensor]) -> None:
        fut, key, step, t = item
        self._inflight_bytes -= t.array.nbytes
        result = fut.result()
        _, header, payload, raw, elem = result
        self._append(TENSORS, header, payload, key=key, steps=(step, step), rows=1, raw=raw, elem=elem)
        result[1] = result[2] = None  # the history row keeps this future for its summary only
        self._give_payload(payload)
        self.pool.give(t.buffer)  # encoded: the snapshot's memory can take the next one
        self._release(t.array.nbytes)

    def _give_payload(self, payload: np.ndarray | list[Any]) -> None:
        """Hand a written payload's buffer back to the pool (it is a view of one)."""
        view = payload[0] if isinstance(payload, list) else payload
        if isinstance(view.base, np.ndarray):
            self.pool.give(view.base)

    def _write_group(self, key: str) -> None:
        # Readers take a (key, step)'s last frame as its last write, so a large tensor of this
        # key logged before the group's rows (still encoding) is written first.
        last = -1
        for i, item in enumerate(self._inflight):
            if item[1] == key:
                last = i
        for _ in range(last + 1):
            self._write_one(self._inflight.popleft())
        g = self._groups.pop(key)
        g.summaries()
        _, header, payload, raw, elem = _encode_tensor(key, g.steps, g.arrays, g.logical, False,
                                                       self.pool)
        g.arrays = []
        self._append(TENSORS, header, payload, key=key, steps=(min(g.steps), max(g.steps)),
                     rows=len(g.steps), raw=raw, elem=elem)
        self._give_payload(payload)
        self._release(g.nbytes)

    def _write_history(self) -> None:
        from ._arrow import history_ipc, rows_to_batch
        from ._format import KIND_HISTORY, encode_frame

        rows, self._rows = self._rows, []
        if not rows:
            return
        tensor_keys: dict[str, None] = {}
        for r in rows:
            tensor_keys.update(dict.fromkeys(r[3]))
        summaries = {k: [_resolve(r[3].get(k)) for r in rows] for k in tensor_keys}
        steps = [r[0] for r in rows]
        batch = rows_to_batch(steps, [r[1] for r in rows], self._start, [r[2] for r in rows], summaries)
        raw = history_ipc(batch)
        header, payload = encode_frame(KIND_HISTORY, raw, step_min=min(steps), step_max=max(steps),
                                       rows=len(rows))
        self._append(HISTORY, header, payload, key="", steps=(min(steps), max(steps)),
                     rows=len(rows), raw=len(raw), elem=0)

    def _append(self, stream: str, header: bytes, payload: bytes, *, key: str,
                steps: tuple[int, int], rows: int, raw: int, elem: int) -> None:
        from ._format import FILTER_NONE, FILTER_SHUFFLE, KIND_HISTORY, KIND_TENSOR, PartWriter

        part = self._parts.get(stream)
        if part is None:
            part = self._parts[stream] = PartWriter(self._dir, stream, self._seq[stream])
            self._seq[stream] += 1
        part.append(KIND_HISTORY if stream == HISTORY else KIND_TENSOR, header, payload,
                    step_min=steps[0], step_max=steps[1], rows=rows, key=key, raw=raw,
                    filt=FILTER_SHUFFLE if elem > 1 else FILTER_NONE, elem=max(elem, 1))
        if part.size >= self._s.part_max_bytes:
            self._seal(stream)

    def _seal(self, stream: str) -> None:
        part = self._parts.pop(stream, None)
        if part is not None:
            part.seal(drop_cache=not self._live)

    def _flush(self, *, fsync: bool = False, seal: bool = False) -> None:
        while self._inflight:
            self._write_one(self._inflight.popleft())
        for key in list(self._groups):
            self._write_group(key)
        self._write_history()
        now = time.monotonic()
        for stream, part in list(self._parts.items()):
            if seal or now - part.created >= self._max_age[stream]:
                self._seal(stream)
            elif fsync:
                part.fsync()
        self._last_flush = now
        try:
            self._on_flush()
        except Exception as e:  # metadata is best effort; the data path goes on
            warnings.warn(f"gradexp: could not save run metadata: {e!r}", GradexpWarning, stacklevel=1)

    def _abandon(self) -> None:
        """After a failure: release waiters and close files (parts stay open for recovery)."""
        for part in self._parts.values():
            try:
                part.close()
            except OSError:
                pass
        self._parts.clear()
        while self._q:
            item = self._q.popleft()
            if len(item) == 3 and type(item[0]) is str:
                item[1].set()
        if self._workers:
            self._workers.close()
        self.pool.clear()


def _resolve(s: Any) -> Any:
    """A history cell's summary: from a worker's future, or from a small-tensor group."""
    if isinstance(s, Future):
        return s.result()[0]
    if isinstance(s, tuple):
        return s[0].summaries()[s[1]]
    return s
