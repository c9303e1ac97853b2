"""The writer thread: drains what ``log()`` queued and turns it into part files.

It owns all packing: history rows become Arrow record batches, small tensors are
batched several steps to a frame, large tensors are summarised and compressed by
a few worker threads (NumPy and zstd release the GIL) and written in order.
Every row reaches the OS within ``flush_interval`` of ``log()`` returning: the writer
writes by the age of the oldest row it has not written yet (queued, or held in its
own buffers), and ``log()`` waits (warned once, nothing dropped) while that age plus
the projected time to write the backlog exceeds a budget (:class:`Budget`). The
queue is also bounded by bytes and rows. Nothing raised here reaches the caller.
"""

from __future__ import annotations

import collections
import dataclasses
import queue
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np

from gradexp.core.buffers import BufferPool
from gradexp.core.dtypes import is_ml_dtype
from gradexp.core.errors import GradexpWarning
from gradexp.core.layout import HISTORY, TENSORS
from gradexp.core.settings import Settings
from gradexp.write.values import Prepared, Tensor

_GROUP_MAX_BYTES = 1 << 20
_HISTORY_MAX_ROWS = 50_000
_INFLIGHT_MAX_BYTES = 64 << 20
"""Encode jobs may run ahead of the writes by this many raw bytes (and by at least two per
worker): enough to keep the workers busy while the writer fsyncs a sealed 64 MiB part."""
_TRIM_EVERY = 1.0
"""Seconds between looks for pooled buffers idle long enough to unmap."""
_CHECK_EVERY = 64
"""A scalar-only log() looks at the writer's lag when the queue length is a multiple of this."""
_COST_PER_ROW = 20e-6
_COST_PER_BYTE = 30e-9
"""Writer seconds per row and per tensor byte, assumed until measured; on the busy 2-core
reference machine a 10-key row took ~10 us, and a 120 KB tensor ~3 ms (its summary is
computed row by row), a 4 MiB one ~5 ms. Erring high makes log() wait early, not late."""
_LEARN = 0.5
"""Weight of the latest measurement in the running costs: a loop's shape can change at once."""


class TimedFuture(Future):
    """A Future that also carries how long its job ran: the writer's measure of a slow machine."""

    seconds: float = 0.0


@dataclasses.dataclass(frozen=True, slots=True)
class Budget:
    """When the writer writes and when ``log()`` waits, so that every row reaches the OS
    within ``flush`` seconds of being logged (ages are from the row's ``log()``)."""

    flush: float
    """The promise: ``flush_interval``."""
    wait: float
    """``log()`` waits while the oldest unwritten row's age plus the projected time to write
    everything unwritten exceeds this. The rest of ``flush`` is margin for a busy machine."""
    write: float
    """The writer writes what it holds once the oldest held row's age plus the projected
    time to write it reaches this."""
    poll: float
    """Longest idle sleep of the writer: a scalar-only row does not wake it."""
    housekeeping: float
    """Run metadata is saved, and parts are checked for sealing by age, this often (online,
    at least every ``live_interval``, so history is sealed and uploaded that often)."""

    @classmethod
    def of(cls, s: Settings) -> Budget:
        f = s.flush_interval
        live = s.live_interval if s.mode == "online" else float("inf")
        return cls(flush=f, wait=f / 2, write=f / 4, poll=min(f / 8, 0.25), housekeeping=min(f / 2, live))


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
            t0 = time.perf_counter()
            try:
                result = fn(*args)
            except BaseException as e:  # handed to the writer, which reports it
                fut.set_exception(e)
            else:
                fut.seconds = time.perf_counter() - t0  # the writer's measure of a slow machine
                fut.set_result(result)

    def submit(self, fn: Callable[..., Any], *args: Any) -> TimedFuture:
        fut = TimedFuture()
        self._jobs.put((fut, fn, args))
        return fut

    def close(self) -> None:
        for _ in self._threads:
            self._jobs.put(None)
        for t in self._threads:
            t.join()


def _encode_tensor(key: str, steps: list[int], arrays: list[np.ndarray], logical: np.dtype,
                   summarise: bool, pool: BufferPool, meta: dict[bytes, bytes] | None = None) -> list[Any]:
    """Summary (for a single large tensor) and the frame (header, payload) of the rows; the
    payload is compressed into a buffer of ``pool``, handed back once written."""
    from gradexp.core.arrow import shuffle_width, tensor_ipc
    from gradexp.core.format import KIND_TENSOR, encode_frame
    from gradexp.core.stats import summarize

    first = arrays[0]
    summary = summarize(first) if summarise else None
    stacked = first[None] if len(arrays) == 1 else np.stack(arrays)
    raw = tensor_ipc(key, steps, stacked, logical, first.shape, reuse=True, meta=meta)  # compressed right below
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

    __slots__ = ("logical", "shape", "dtype", "meta", "steps", "arrays", "nbytes", "_summaries")

    def __init__(self, t: Tensor) -> None:
        self.logical = t.logical
        self.meta = t.meta
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
            from gradexp.core.stats import summarize_rows

            done = done + summarize_rows(np.stack(self.arrays[len(done):]))
            self._summaries = done
        return done

    def fits(self, t: Tensor) -> bool:
        return (t.array.shape == self.shape and t.array.dtype == self.dtype and t.logical == self.logical
                and t.meta == self.meta)


@dataclasses.dataclass(frozen=True, slots=True)
class _Flush:
    """A request queued behind the rows before it: write them (``fsync``), or seal and stop."""

    done: threading.Event
    fsync: bool = False
    close: bool = False


class Writer:
    """Background writer of one run's part files."""

    def __init__(self, parts_dir: Path, settings: Settings, start_time: float,
                 on_flush: Callable[[], None], *, first_seq: dict[str, int] | None = None,
                 on_ready: Callable[[], None] | None = None) -> None:
        """``first_seq``: the sequence number of each stream's first part (a resumed run
        continues after its parts). ``on_ready`` is called on the writer's thread once it has
        imported what writing needs (or failed to): work that would compete with that for
        the CPU waits for it."""
        self._dir = parts_dir
        self._s = settings
        self._b = Budget.of(settings)
        self._start = start_time
        self._on_flush = on_flush
        # Rows are plain (step, time, Prepared) tuples: a tuple is the cheapest thing log() can
        # queue (a dataclass costs ~0.2 us more per call); flush requests are _Flush objects.
        self._q: collections.deque[tuple[int, float, Prepared] | _Flush] = collections.deque()
        self._wake = threading.Event()
        # log() waits on one of two conditions (one lock): for room in the queue (each tensor
        # written or row taken may make some), or, holding back, for the writer to catch up.
        # The writer wakes a held-back log() only once it can go on (a write of the held rows,
        # or tensors written that shrink the backlog enough): every wake-up costs the training
        # thread tens of microseconds of CPU (a timed wait and a GIL hand-over) on a busy machine.
        lock = threading.Lock()
        self._room = threading.Condition(lock)
        self._written = threading.Condition(lock)
        self._holding = 0  # log() calls holding back now (changed under the lock)
        self._queued_bytes = 0  # tensor bytes logged and not yet written (queued or held)
        self._warned_wait = False
        self._waited = 0.0  # seconds log() has waited for the writer to catch up
        self._max_rows = settings.queue_max_rows
        # Idle buffers for a full queue of snapshots plus the payloads in flight.
        self.pool = BufferPool(settings.queue_max_bytes + _INFLIGHT_MAX_BYTES)
        self.error: BaseException | None = None
        # Shared with log() (written by the writer thread only): the log() time of the oldest
        # row taken off the queue and not yet written, how many such rows there are, and the
        # measured cost of writing (seconds per row, and per tensor byte).
        self._held: float | None = None
        self._held_rows = 0
        self._cost_row = _COST_PER_ROW
        self._cost_byte = _COST_PER_BYTE
        self._encode_byte = 0.0  # seconds per byte of one encode job, start to end
        # Writer-thread state. Since the last write: seconds spent on the rows held, of those
        # on tensors, and the tensor bytes written.
        self._busy = self._tensor_time = 0.0
        self._written_bytes = 0
        self._parts: dict[str, Any] = {}
        self._seq = {HISTORY: 0, TENSORS: 0, **(first_seq or {})}
        self._precision = precision_dtype(settings.precision) if settings.precision else None
        self._rows: list[tuple[int, float, dict[str, Any], dict[str, Any]]] = []
        self._groups: dict[str, _Group] = {}
        self._inflight: collections.deque = collections.deque()
        self._inflight_bytes = 0
        self._workers: _Workers | None = None
        self._last_flush = self._last_meta = self._last_trim = time.monotonic()
        live = self._live = settings.mode == "online"
        # Online, history parts are sealed (and so uploaded) every live_interval: the server
        # cannot see an open part, and history should be visible within about two seconds.
        self._max_age = {HISTORY: settings.live_interval if live else settings.part_max_age,
                         TENSORS: settings.part_max_age}
        self._ready = threading.Event()  # the writer has imported what writing needs
        self._on_ready = on_ready
        self._thread = threading.Thread(target=self._main, name="gradexp-writer", daemon=True)
        self._thread.start()

    # -- caller side ---------------------------------------------------------------------

    def put_row(self, step: int, ts: float, p: Prepared) -> None:
        n = p.nbytes
        q = self._q
        queued = len(q)
        if not queued and not self._ready.is_set():
            self._wait_ready()
        if n or queued >= self._max_rows:
            self._reserve(n)
        q.append((step, ts, p))
        if n:
            if not self._wake.is_set():
                self._wake.set()
            if n * self._encode_byte > self._b.wait:
                # Encoding this row alone would outlast the budget (a huge tensor, a very busy
                # machine): log() returns once the row is written.
                self._hold_back(until=ts)
            elif self._behind(ts):
                self._hold_back()
        # Scalar rows look at the writer's lag on one call in _CHECK_EVERY (and whenever the
        # queue was empty): cheap enough for the hot path, and a writer that stopped writing
        # lets the queue grow through the next multiple.
        elif not queued & (_CHECK_EVERY - 1) and self._behind(ts):
            self._hold_back()

    def _oldest(self) -> float | None:
        """log() time of the oldest row not yet written to the OS (None: all written)."""
        held = self._held  # set before the row leaves the queue, cleared once written
        if held is not None:
            return held
        try:
            head = self._q[0]
        except IndexError:
            return None
        return None if isinstance(head, _Flush) else head[1]  # a flush request: a write is under way

    def _backlog(self, rows: int | None = None) -> float:
        """Projected seconds to write ``rows`` rows (default: every unwritten one) and every
        unwritten tensor byte."""
        if rows is None:
            rows = len(self._q) + self._held_rows
        return rows * self._cost_row + self._queued_bytes * self._cost_byte

    def _behind(self, now: float) -> bool:
        """Would the oldest unwritten row, written after the backlog, miss ``Budget.wait``?"""
        oldest = self._oldest()
        return oldest is not None and now - oldest + self._backlog() > self._b.wait

    def _hold_back(self, *, until: float | None = None) -> None:
        """Wait until the writer can write everything unwritten within the budget (and, with
        ``until``, has written every row logged then)."""
        # A busy machine delays the writer by tens of milliseconds now and then: not worth a
        # warning; waits adding up to twice flush_interval are.
        start = time.time()
        with self._written:
            self._holding += 1
            while self.error is None and (self._behind(now := time.time()) or until is not None
                                          and (self._oldest() or now) <= until):
                if self._waited + now - start >= 2 * self._b.flush:
                    age = now - (self._oldest() or now)
                    self._warn_wait(f"the oldest row not yet written was logged {age:.2f} s "
                                    f"ago and writing the {len(self._q) + self._held_rows} rows and "
                                    f"{self._queued_bytes / 2**20:.0f} MiB behind it would take "
                                    f"~{self._backlog():.2f} s more; log() waits beyond "
                                    f"{self._b.wait:g} s so that every row reaches the disk within "
                                    f"flush_interval={self._b.flush:g} s")
                if not self._wake.is_set():
                    self._wake.set()
                # the writer notifies once this log() can go on (or has failed); the timeout
                # is a safety net, and keeps the warning above on time
                self._written.wait(self._b.write)
            self._holding -= 1
        self._waited += time.time() - start

    def _wait_ready(self) -> None:
        """Before the first rows, wait for the writer's imports (pyarrow, in the background
        since init()): on a busy machine they take a good part of flush_interval."""
        while not self._ready.wait(0.1) and self.error is None and self._thread.is_alive():
            pass

    def _reserve(self, n: int) -> None:
        """Wait for room in the queue for ``n`` tensor bytes and one row."""
        s = self._s
        if not self._wake.is_set():
            self._wake.set()  # rows are piling up: keep the writer at them, not asleep
        with self._room:
            while self.error is None and (
                    (self._queued_bytes and self._queued_bytes + n > s.queue_max_bytes)
                    or len(self._q) >= self._max_rows):
                self._warn_wait(f"the queue holds {self._queued_bytes / 2**20:.0f} MiB and "
                                f"{len(self._q)} rows; limits queue_max_bytes={s.queue_max_bytes}, "
                                f"queue_max_rows={s.queue_max_rows}")
                self._wake.set()
                self._room.wait(0.02)
            self._queued_bytes += n

    def _warn_wait(self, why: str) -> None:
        if not self._warned_wait:
            self._warned_wait = True
            warnings.warn(f"gradexp: log() is waiting for the writer to catch up ({why}). "
                          "Nothing is dropped. This is warned about once.", GradexpWarning, stacklevel=6)

    def _release(self, n: int) -> None:
        self._written_bytes += n  # (writer thread)
        with self._room:
            self._queued_bytes -= n
            self._room.notify_all()
            if self._holding and not self._behind(time.time()):
                self._written.notify_all()

    def flush(self, *, fsync: bool = False, close: bool = False) -> None:
        """Write everything queued so far to the OS (and fsync); with ``close``, seal and stop."""
        if not self._thread.is_alive():
            return
        done = threading.Event()
        self._q.append(_Flush(done, fsync=fsync, close=close))
        self._wake.set()
        while not done.wait(0.1):
            if not self._thread.is_alive():
                return
        if close:
            self._thread.join()

    # -- writer thread -------------------------------------------------------------------

    def _main(self) -> None:
        try:
            # Import pyarrow here, in the background, right after init(): `import gradexp`
            # stays light, and the first flush (or a quick finish()) does not pay for it.
            # pyarrow.compute (casts: string columns, the index at a seal) takes 0.2 s more,
            # a second or more on a busy machine: not in the middle of a write.
            try:
                import pyarrow.compute  # noqa: F401

                from gradexp.core import arrow, stats  # noqa: F401
            finally:
                if self._on_ready is not None:
                    self._on_ready()
            self._ready.set()
            while True:
                self._wake.wait(self._sleep())
                self._wake.clear()
                t0 = time.perf_counter()
                if self._drain():
                    return
                self._write_ready()
                self._busy += time.perf_counter() - t0
                now = time.monotonic()
                if self._write_due(time.time()) or now - self._last_flush >= self._b.housekeeping:
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
            with self._room:
                self._room.notify_all()
                self._written.notify_all()
            self._abandon()

    def _sleep(self) -> float:
        """Seconds until a write is due by age (scalar rows do not wake the writer), at most
        ``Budget.poll``, and no later than the next housekeeping flush."""
        b = self._b
        left = min(b.poll, self._last_flush + b.housekeeping - time.monotonic())
        oldest = self._oldest()
        if oldest is not None:
            left = min(left, oldest + b.write - self._backlog() - time.time())
        return max(left, 0.0)

    def _write_due(self, now: float) -> bool:
        """True once the oldest held row, written after what is held, would reach
        ``Budget.write``."""
        held = self._held
        return held is not None and now - held + self._backlog(self._held_rows) >= self._b.write

    def _drain(self) -> bool:
        """Process what is queued; True once a close has been handled.

        Returns early once a write is due, so a log() loop that never pauses (the queue is
        never empty) cannot hold back writes: they are the flush_interval guarantee. Each
        call takes rows for at least a quarter of ``Budget.write`` first, so a backlog of old
        rows is written in batches, not a frame per row.
        """
        q = self._q
        waiting = heavy = False
        batch_until = time.time() + self._b.write / 4
        while q:
            if waiting and (heavy or not self._held_rows & 7):  # after a row with tensors, or 8 rows
                now = time.time()
                if now >= batch_until and self._write_due(now):
                    self._wake.set()  # more is queued: come straight back after the write
                    break
            item = q[0]
            if isinstance(item, _Flush):
                q.popleft()
                self._flush(fsync=item.fsync, seal=item.close, meta=True)
                item.done.set()
                if item.close:
                    if self._workers:
                        self._workers.close()
                    self.pool.clear()
                    return True
                continue
            step, ts, p = item
            if self._held is None:
                self._held = ts  # before the row leaves the queue: log() always sees its age
            q.popleft()
            self._held_rows += 1
            tsum: dict[str, Any] = {}
            for key, t in p.tensor_items() if p.bundles else p.tensors.items():
                tsum[key] = self._add_tensor(key, step, t)
            self._rows.append((step, ts, p.scalars, tsum))  # not a cached local: writing swaps it
            if len(self._rows) >= _HISTORY_MAX_ROWS:
                self._write_history()
            waiting, heavy = True, bool(p.nbytes)
        if waiting and len(q) < self._s.queue_max_rows:
            with self._room:
                self._room.notify_all()
        return False

    def _add_tensor(self, key: str, step: int, t: Tensor) -> Any:
        if self._precision is not None and _narrows(t.array.dtype, self._precision):
            t = self._cast(t)
        arr = t.array
        if arr.nbytes >= self._s.small_tensor_bytes:
            if key in self._groups:  # its rows were logged first: their frame must come first
                self._write_group(key)
            if self._workers is None:
                self._workers = _Workers(self._s.workers)
            fut = self._workers.submit(_encode_tensor, key, [step], [arr], t.logical, True, self.pool, t.meta)
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

    def _cast(self, t: Tensor) -> Tensor:
        """``t`` in the storage dtype (``precision``): NumPy's and ml_dtypes' casts round to
        nearest, ties to even (beyond the target's range: +-inf). The copy goes into a pool
        buffer, and the snapshot's goes back."""
        src = t.array
        target = self._precision
        assert target is not None
        n = src.size * target.itemsize
        buf = self.pool.take(n) if n else np.empty(0, np.uint8)
        out = buf.view(target).reshape(src.shape) if n else np.empty(src.shape, target)
        with np.errstate(over="ignore"):  # beyond the target's range is +-inf: the rounded value
            out[...] = src
        self.pool.give(t.buffer)
        self._release(src.nbytes - out.nbytes)  # the rest is released once written, as for any tensor
        return Tensor(out, target, t.meta)

    def _wake_up(self, _: Future) -> None:
        if not self._wake.is_set():
            self._wake.set()

    def _write_ready(self) -> None:
        while self._inflight and self._inflight[0][0].done():
            self._write_one(self._inflight.popleft())

    def _write_one(self, item: tuple[TimedFuture, str, int, Tensor]) -> None:
        fut, key, step, t = item
        t0 = time.perf_counter()
        self._inflight_bytes -= t.array.nbytes
        result = fut.result()
        self._encode_byte += _LEARN * (fut.seconds / max(t.array.nbytes, 1) - self._encode_byte)
        _, header, payload, raw, elem = result
        self._append(TENSORS, header, payload, key=key, steps=(step, step), rows=1, raw=raw, elem=elem)
        result[1] = result[2] = None  # the history row keeps this future for its summary only
        self._give_payload(payload)
        self.pool.give(t.buffer)  # encoded: the snapshot's memory can take the next one
        self._release(t.array.nbytes)
        self._tensor_time += time.perf_counter() - t0

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
                                                       self.pool, g.meta)
        g.arrays = []
        self._append(TENSORS, header, payload, key=key, steps=(min(g.steps), max(g.steps)),
                     rows=len(g.steps), raw=raw, elem=elem)
        self._give_payload(payload)
        self._release(g.nbytes)

    def _write_history(self, upto: int | None = None) -> None:
        """Write the rows held (the first ``upto`` of them) as one history frame."""
        from gradexp.core.arrow import history_ipc, rows_to_batch
        from gradexp.core.format import KIND_HISTORY, encode_frame

        rows, self._rows = self._rows[:upto], self._rows[len(self._rows) if upto is None else upto:]
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

    def _append(self, stream: str, header: bytes, payload: bytes | np.ndarray | list[bytes | np.ndarray], *,
                key: str, steps: tuple[int, int], rows: int, raw: int, elem: int) -> None:
        from gradexp.core.format import FILTER_NONE, FILTER_SHUFFLE, KIND_HISTORY, KIND_TENSOR, PartWriter

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

    def _flush(self, *, fsync: bool = False, seal: bool = False, meta: bool = False) -> None:
        """Write everything held to the OS, seal parts that are due, and say so to log();
        save run metadata with ``meta`` or once per ``Budget.housekeeping``."""
        t0 = time.perf_counter()
        while self._inflight:
            if not self._inflight[0][0].done():
                self._write_before_encode()
            self._write_one(self._inflight.popleft())
        t1 = time.perf_counter()
        for key in list(self._groups):
            self._write_group(key)
        self._tensor_time += time.perf_counter() - t1
        self._write_history()
        self._learn(self._busy + time.perf_counter() - t0)
        self._held, self._held_rows = None, 0
        with self._written:
            self._written.notify_all()  # log() may be waiting for these rows to be written
        now = time.monotonic()
        for stream, part in list(self._parts.items()):
            if seal or now - part.created >= self._max_age[stream]:
                self._seal(stream)
            elif fsync:
                part.fsync()
        self._last_flush = now
        if meta or now - self._last_meta >= self._b.housekeeping:
            self._last_meta = now
            try:
                self._on_flush()
            except Exception as e:  # metadata is best effort; the data path goes on
                warnings.warn(f"gradexp: could not save run metadata: {e!r}", GradexpWarning, stacklevel=1)

    def _write_before_encode(self) -> None:
        """Write the history rows before the one waiting for the oldest encode job: a slow
        encode (a busy machine) holds back only its row and those after it."""
        fut = self._inflight[0][0]
        upto = next((i for i, r in enumerate(self._rows) if any(v is fut for v in r[3].values())),
                    len(self._rows))  # (a full history batch may have taken its row already)
        if upto:
            self._write_history(upto)

    def _learn(self, busy: float) -> None:
        """Update the running costs from what writing the rows held took, from their drain
        to now (wall time: a busy machine's delays count). Groups of small tensors filled
        and written while draining count as row cost."""
        rows, nbytes, tensors = self._held_rows, self._written_bytes, self._tensor_time
        if nbytes:
            self._cost_byte += _LEARN * (tensors / nbytes - self._cost_byte)
        if rows:
            self._cost_row += _LEARN * (max(busy - tensors, 0.0) / rows - self._cost_row)
        self._busy = self._tensor_time = 0.0
        self._written_bytes = 0

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
            if isinstance(item, _Flush):
                item.done.set()
        if self._workers:
            self._workers.close()
        self.pool.clear()


def precision_dtype(precision: str) -> np.dtype:
    """The storage dtype of ``Settings.precision``: fp32, fp16 or bf16."""
    if precision == "bf16":
        import ml_dtypes  # only for bf16

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype({"fp32": np.float32, "fp16": np.float16}[precision])


def _narrows(dtype: np.dtype, target: np.dtype) -> bool:
    """Is ``dtype`` a float type that ``target`` stores in fewer bytes? (16-bit floats are
    kept as they are under fp16 and bf16: neither holds the other.)"""
    return (dtype.kind == "f" or is_ml_dtype(dtype)) and dtype.itemsize > target.itemsize


def _resolve(s: Any) -> Any:
    """A history cell's summary: from a worker's future, or from a small-tensor group."""
    if isinstance(s, Future):
        return s.result()[0]
    if isinstance(s, tuple):
        return s[0].summaries()[s[1]]
    return s
