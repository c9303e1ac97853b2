"""Threads, backpressure, fork, several runs at once, and a failing writer."""

from __future__ import annotations

import os
import signal
import threading
import time
import warnings

import numpy as np
import pytest

import gradexp
from gradexp.core import format as _format
from gradexp.write import writer as _writer

TIMEOUT = 60  # generous: these must not flake on a loaded 2-core machine


def poll(cond, timeout: float = TIMEOUT, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def join_all(threads, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
        assert not t.is_alive(), f"{t.name} is stuck"


def log_from_threads(run: gradexp.Run, n: int, body) -> tuple[list[BaseException], list[str]]:
    """Run ``body(i)`` on ``n`` threads released together, then finish ``run``; return the
    errors the threads raised and the gradexp warnings seen meanwhile."""
    errors: list[BaseException] = []
    start = threading.Barrier(n)

    def worker(i: int) -> None:
        try:
            start.wait()
            body(i)
        except BaseException as e:  # noqa: BLE001 - reported to the caller
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for t in threads:
            t.start()
        join_all(threads)
        run.finish()
    return errors, gradexp_warnings(caught)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def gradexp_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, gradexp.GradexpWarning)]



class BackgroundLogger(threading.Thread):
    """Logs ``make_row(j)`` for j = 0, 1, ... until ``stop`` is set; keeps its count and any error."""

    def __init__(self, target_run: gradexp.Run, make_row, *, pause: float = 0.0) -> None:
        super().__init__(daemon=True)
        self.target_run = target_run
        self.make_row = make_row
        self.pause = pause
        self.stop = threading.Event()
        self.logged = 0
        self.errors: list[BaseException] = []

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                self.target_run.log(self.make_row(self.logged))
                self.logged += 1
                if self.pause:
                    time.sleep(self.pause)
        except BaseException as e:  # noqa: BLE001
            self.errors.append(e)

# -- threads --------------------------------------------------------------------------------


def test_threads_with_distinct_keys_implicit_steps(tmp_path):
    T, N = 4, 250
    run = gradexp.init("p", dir=tmp_path, flush_interval=0.2)

    def body(i: int) -> None:
        for j in range(N):
            run.log({f"t{i}": {"x": i * 100_000 + j, "v": np.full((2, 3), j, np.int32)}})

    errors, warned = log_from_threads(run, T, body)
    assert errors == []
    assert warned == []

    stored = gradexp.Api().run(run.dir)
    assert stored.status == "finished" and stored.damage == []
    table = stored.history()
    assert table.column("step").to_pylist() == list(range(T * N))  # one row per log() call
    cols = table.to_pydict()
    present = np.zeros(T * N, dtype=int)
    for i in range(T):
        xs = cols[f"t{i}/x"]
        mine = [s for s, x in enumerate(xs) if x is not None]
        present[mine] += 1
        assert [xs[s] for s in mine] == [i * 100_000 + j for j in range(N)]  # all, in call order
        assert stored.steps(f"t{i}/v") == mine
        for j, (s, arr) in enumerate(stored.tensors(f"t{i}/v")):
            assert s == mine[j] and same_bits(arr, np.full((2, 3), j, np.int32))
    assert (present == 1).all()  # each row holds exactly one thread's call


def test_threads_with_distinct_keys_explicit_steps(tmp_path):
    T, N = 4, 200
    run = gradexp.init("p", dir=tmp_path, flush_interval=0.2)

    def body(i: int) -> None:
        for j in range(N):
            run.log({f"k{i}": float(i + j / 8), f"g{i}": np.arange(5, dtype=np.float32) * j}, step=j)

    errors, warned = log_from_threads(run, T, body)
    assert errors == []
    assert len(warned) <= 1  # a lagging thread's lower step: warned once at most

    stored = gradexp.Api().run(run.dir)
    table = stored.history()
    assert table.column("step").to_pylist() == list(range(N))  # rows of one step merged
    cols = table.to_pydict()
    for i in range(T):
        assert cols[f"k{i}"] == [float(i + j / 8) for j in range(N)]
        assert stored.steps(f"g{i}") == list(range(N))
        for j in (0, 1, N // 2, N - 1):
            assert same_bits(stored.tensor(f"g{i}", j), np.arange(5, dtype=np.float32) * j)


# -- backpressure ----------------------------------------------------------------------------


def test_full_queue_blocks_log_and_warns_once(tmp_path, monkeypatch):
    gate = threading.Event()
    encode = _writer._encode_tensor

    def gated(*args):
        assert gate.wait(TIMEOUT)
        return encode(*args)

    monkeypatch.setattr(_writer, "_encode_tensor", gated)
    K = 12
    arrays = [np.random.default_rng(k).standard_normal(300_000).astype(np.float32) for k in range(K)]
    run = gradexp.init("p", dir=tmp_path, flush_interval=0.2, queue_max_bytes=1, workers=1)
    done = [0]
    errors: list[BaseException] = []

    def logger() -> None:
        try:
            for k, a in enumerate(arrays):
                run.log({"w": a, "i": k})
                done[0] = k + 1
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=logger)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.start()
        poll(lambda: len(gradexp_warnings(caught)) >= 1, what="the queue-full warning")
        time.sleep(0.5)
        # The writer cannot encode, so the first snapshot fills the queue and log() waits.
        assert t.is_alive() and done[0] == 1
        gate.set()
        join_all([t])
        run.finish()
    assert errors == [] and done[0] == K
    msgs = gradexp_warnings(caught)
    assert len(msgs) == 1 and "waiting for the writer" in msgs[0], msgs

    stored = gradexp.Api().run(run.dir)
    assert stored.history().column("i").to_pylist() == list(range(K))
    assert stored.steps("w") == list(range(K))
    for k, a in enumerate(arrays):
        assert same_bits(stored.tensor("w", k), a)


def test_tiny_queue_drops_nothing(tmp_path):
    K = 25
    arrays = [np.random.default_rng(k).standard_normal(200_000).astype(np.float32) for k in range(K)]
    run = gradexp.init("p", dir=tmp_path, flush_interval=0.2, queue_max_bytes=1, workers=2,
                       part_max_bytes=2_000_000)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for a in arrays:
            run.log({"w": a, "small": a[:10]})
            a[:] = -1  # mutating after log() must not change what is stored
        run.finish()
    assert len(gradexp_warnings(caught)) == 1  # the queue-full warning, once
    stored = gradexp.Api().run(run.dir)
    for k in range(K):
        fresh = np.random.default_rng(k).standard_normal(200_000).astype(np.float32)
        assert same_bits(stored.tensor("w", k), fresh)
        assert same_bits(stored.tensor("small", k), fresh[:10])


# -- fork ------------------------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # 3.12+: fork() with threads running
def test_fork_while_another_thread_logs(tmp_path):
    run = gradexp.init("p", dir=tmp_path, flush_interval=0.2)
    t = BackgroundLogger(run, lambda j: {"x": j, "v": np.full(4, j, np.float64),
                                         "b": np.full(70_000, j, np.float32) if j % 25 == 0
                                         else np.zeros(1, np.float32)}, pause=0.0005)
    t.start()
    try:
        poll(lambda: t.logged >= 50, what="the logging thread")
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: only async-signal-safe-ish work, and always os._exit
            code = 3
            try:
                os.close(r)
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    run.log({"child": 1.0, "x": -1})
                    run.log({"x": -2, "v": np.full(4, -1.0)}, step=0)
                    run.flush()
                    run.finish()
                msgs = gradexp_warnings(caught)
                os.write(w, repr(msgs).encode())
                code = 0 if len(msgs) == 1 and "forked child" in msgs[0] else 2
            except BaseException as e:  # noqa: BLE001
                try:
                    os.write(w, repr(e).encode())
                except BaseException:  # noqa: BLE001
                    pass
            finally:
                os._exit(code)
        os.close(w)
        at_fork = t.logged
        deadline = time.monotonic() + TIMEOUT
        while True:
            wpid, status = os.waitpid(pid, os.WNOHANG)
            if wpid:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pytest.fail("the forked child deadlocked in run.log()")
            time.sleep(0.01)
        with os.fdopen(r, "rb") as f:
            said = f.read().decode()
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, said
        poll(lambda: t.logged >= at_fork + 100, what="the parent to keep logging")
    finally:
        t.stop.set()
        join_all([t])
    run.finish()
    assert t.errors == []

    n = t.logged
    stored = gradexp.Api().run(run.dir)
    assert stored.status == "finished" and stored.damage == []
    table = stored.history()
    assert "child" not in table.column_names and "child" not in stored.keys()
    assert table.column("step").to_pylist() == list(range(n))
    assert table.column("x").to_pylist() == list(range(n))
    assert stored.steps("v") == list(range(n))
    for s, arr in stored.tensors("v"):
        assert same_bits(arr, np.full(4, s, np.float64)), s
    for s in range(0, n, 25):
        assert same_bits(stored.tensor("b", s), np.full(70_000, s, np.float32))


# -- several runs ----------------------------------------------------------------------------


def test_several_runs_open_at_once(tmp_path):
    a = gradexp.init("p", id="a", dir=tmp_path, flush_interval=0.2)
    gradexp.init("p", id="b", dir=tmp_path, flush_interval=0.2)
    gradexp.log({"x": 1, "t": np.arange(3)})  # to b, the most recent
    a.log({"y": 2.0, "t": np.arange(4.0)})
    c = gradexp.init("q", id="c", dir=tmp_path, flush_interval=0.2)
    gradexp.log({"z": "to c"})
    c.finish()
    gradexp.log({"x": 3})  # b again
    gradexp.finish()  # finishes b
    gradexp.log({"y": 4.0})  # now a
    errors: list[BaseException] = []

    def both(run, key, base) -> None:  # two runs fed from two threads at once
        try:
            for j in range(150):
                run.log({key: base + j})
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    d = gradexp.init("p", id="d", dir=tmp_path, flush_interval=0.2)
    threads = [threading.Thread(target=both, args=(a, "y", 1000.0)),
               threading.Thread(target=both, args=(d, "w", 5000))]
    for t in threads:
        t.start()
    join_all(threads)
    d.finish()
    a.finish()
    assert errors == []
    with pytest.raises(gradexp.UsageError):
        gradexp.log({"x": 0})

    api = gradexp.Api()
    ra, rb, rc, rd = (api.run(tmp_path / p / i) for p, i in (("p", "a"), ("p", "b"), ("q", "c"),
                                                           ("p", "d")))
    assert rb.history().to_pydict()["x"] == [1, 3] and set(rb.keys()) == {"x", "t"}
    assert same_bits(rb.tensor("t", 0), np.arange(3))
    assert rc.history().to_pydict()["z"] == ["to c"] and rc.keys() == ["z"]
    assert ra.history().to_pydict()["y"] == [2.0, 4.0] + [1000.0 + j for j in range(150)]
    assert set(ra.keys()) == {"y", "t"} and same_bits(ra.tensor("t", 0), np.arange(4.0))
    assert rd.history().to_pydict()["w"] == [5000 + j for j in range(150)] and rd.keys() == ["w"]
    assert all(r.status == "finished" for r in (ra, rb, rc, rd))


# -- writer failure --------------------------------------------------------------------------


def _fail_append(*args, **kwargs):
    raise OSError(28, "No space left on device")


def _fail_encode(*args, **kwargs):
    raise MemoryError("cannot encode")


@pytest.mark.parametrize("where", ["append", "encode"])
def test_writer_failure_never_reaches_log(tmp_path, monkeypatch, where):
    run = gradexp.init("p", dir=tmp_path, flush_interval=0.2, queue_max_bytes=1)
    big = [np.random.default_rng(j).standard_normal(70_000).astype(np.float32) for j in range(20)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gradexp.GradexpWarning)  # the queue-full one
        for j in range(20):
            run.log({"x": j, "v": np.full(3, j, np.int16), "big": big[j]})
        run.flush()
    if where == "append":
        monkeypatch.setattr(_format.PartWriter, "append", _fail_append)
    else:
        monkeypatch.setattr(_writer, "_encode_tensor", _fail_encode)
    errors: list[BaseException] = []

    def more() -> None:  # with a one-byte queue, log() may be waiting when the writer dies
        try:
            for j in range(20, 300):
                run.log({"x": j, "v": np.full(3, j, np.int16), "big": big[j % 20]})
            run.flush()
            run.log({"x": 0})
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = threading.Thread(target=more)
        t.start()
        join_all([t])  # must not hang
        run.flush()
        run.finish()
    assert errors == []
    msgs = gradexp_warnings(caught)
    failed = [m for m in msgs if "background writer failed and logging has stopped" in m]
    assert len(failed) == 1, msgs
    ignored = [m for m in msgs if "ignored because the background writer failed" in m]
    assert len(ignored) <= 1 and len(msgs) == len(failed) + len(ignored), msgs

    stored = gradexp.Api().run(run.dir)
    assert stored.status == "failed" and stored.meta["exit_code"] == 0  # the reason is recorded
    assert ("No space" if where == "append" else "cannot encode") in stored.meta["error"]
    assert stored.damage == []
    table = stored.history()
    steps = table.column("step").to_pylist()
    assert steps[:20] == list(range(20)) and steps == list(range(len(steps)))
    assert table.column("x").to_pylist() == steps
    for s, arr in stored.tensors("v"):
        assert same_bits(arr, np.full(3, s, np.int16))
    for s in range(20):
        assert same_bits(stored.tensor("big", s), big[s])


# -- reading a live run ------------------------------------------------------------------------


def test_reading_while_the_writer_seals_parts(tmp_path):
    """A reader of a running run never fails, and always sees a gap-free prefix of the steps,
    while parts are being written, sealed and renamed under it."""
    run = gradexp.init("p", dir=tmp_path, flush_interval=0.05, part_max_bytes=8_000,
                       part_max_age=0.1)
    t = BackgroundLogger(run, lambda j: {"x": j, "v": np.full(50, j, np.int64)}, pause=0.001)
    t.start()
    stored = gradexp.Api().run(run.dir)
    seen = 0
    try:
        poll(lambda: t.logged > 20, what="the logging thread")
        deadline = time.monotonic() + 2.5
        while time.monotonic() < deadline:
            steps = stored.history().column("step").to_pylist()
            assert steps == list(range(len(steps)))
            assert len(steps) >= seen  # never goes back
            seen = len(steps)
            if "v" not in stored.tensor_keys():  # history rows can reach the disk before the first
                continue                          # group of small tensors does (a busy machine)
            last = stored.steps("v")[-1]
            assert same_bits(stored.tensor("v", last), np.full(50, last, np.int64))
            for s, arr in stored.tensors("v"):
                assert same_bits(arr, np.full(50, s, np.int64))
    finally:
        t.stop.set()
        join_all([t])
        run.finish()
    assert t.errors == [] and seen > 0
    assert len([p for p in (run.dir / "parts").iterdir()]) > 4  # parts were sealed meanwhile
    assert stored.history().column("x").to_pylist() == list(range(t.logged))
    assert stored.steps("v") == list(range(t.logged))


# -- the writer thread under sustained load ---------------------------------------------------


def test_flushes_keep_coming_while_the_queue_never_empties(tmp_path, monkeypatch):
    """log() outpacing the writer must not hold back its flushes (flush_interval is a promise)."""
    add = _writer.Writer._add_tensor

    def slow_add(self, *args):  # the writer takes 0.2 ms a row: the queue never runs dry
        time.sleep(0.0002)
        return add(self, *args)

    monkeypatch.setattr(_writer.Writer, "_add_tensor", slow_add)
    run = gradexp.init("p", dir=tmp_path, flush_interval=0.2, queue_max_rows=2000)
    t = BackgroundLogger(run, lambda j: {"x": j, "g": np.full(4, j, np.int32)})
    stored = gradexp.Api().run(run.dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gradexp.GradexpWarning)  # the queue-full one
        t.start()
        try:
            poll(lambda: stored.history().num_rows > 0, timeout=15,
                 what="a flush while log() keeps the queue full")
            seen = stored.history().num_rows
            assert stored.steps("g")[-1] >= seen - 1  # the rows' small tensors were written too
            assert len(run._writer._q) > 0 and t.is_alive()  # it was flushed while still busy
        finally:
            t.stop.set()
            join_all([t])
            run.finish()
    assert t.errors == []
    n = t.logged
    table = stored.history()
    assert table.column("x").to_pylist() == list(range(n))
    for s, arr in stored.tensors("g"):
        assert same_bits(arr, np.full(4, s, np.int32))


def test_history_written_while_a_tensor_group_fills(tmp_path, monkeypatch):
    """The history may be written (every _HISTORY_MAX_ROWS rows) before a group of small
    tensors is: the rows' summaries must still come out right, and the writer must not fail."""
    monkeypatch.setattr(_writer, "_HISTORY_MAX_ROWS", 7)
    arrays = [np.random.default_rng(j).standard_normal(16).astype(np.float32) for j in range(100)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with gradexp.init("p", dir=tmp_path, flush_interval=30.0) as run:  # no timed flushes
            for j, a in enumerate(arrays):
                run.log({"x": j, "g": a})
    assert gradexp_warnings(caught) == []
    stored = gradexp.Api().run(run.dir)
    assert "writer_error" not in stored.meta
    cols = stored.history().to_pydict()
    assert cols["x"] == list(range(100))
    for j, (summary, a) in enumerate(zip(cols["g"], arrays)):
        assert summary["count"] == 16 and summary["nonfinite"] == 0, j
        assert (summary["min"], summary["max"]) == (float(a.min()), float(a.max())), j
        assert summary["mean"] == pytest.approx(float(a.astype(np.float64).mean()), rel=1e-9, abs=1e-12)
    assert [s for s, _ in stored.tensors("g")] == list(range(100))
    for s, arr in stored.tensors("g"):
        assert same_bits(arr, arrays[s])
