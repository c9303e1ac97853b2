"""Writer promises that mutation testing found untested: fsync calls, sealing by age,
and the sampled histogram of large tensors (issue #9, item 17)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

import gradexp
from gradexp.core import format as _format
from gradexp.core.arrow import HIST_BINS
from gradexp.core.settings import Settings
from gradexp.core.stats import summarize
from gradexp.write import writer as _writer
from gradexp.write.values import Keys, prepare

# -- fsync ------------------------------------------------------------------------------------


class FsyncSpy:
    """Records every os.fsync: the path of the fd at that moment, and for a directory what
    it held then (so a test can tell an fsync before a rename from one after it)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, frozenset[str] | None]] = []
        self._real = os.fsync

    def __call__(self, fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        listing = frozenset(os.listdir(path)) if os.path.isdir(path) else None
        self.calls.append((path, listing))
        self._real(fd)

    def files(self) -> list[str]:
        return [p for p, listing in self.calls if listing is None]

    def dirs(self, folder: Path) -> list[frozenset[str]]:
        return [listing for p, listing in self.calls if listing is not None and p == str(folder)]


@pytest.fixture
def fsyncs(monkeypatch) -> FsyncSpy:
    spy = FsyncSpy()
    monkeypatch.setattr(os, "fsync", spy)
    return spy


def test_flush_with_fsync_fsyncs_every_open_part(fsyncs):
    run = gradexp.init("p", flush_interval=600, part_max_age=600)
    parts = (run.dir / "parts").resolve()
    run.log({"a": 1.0, "t": np.arange(4.0)})
    run.flush()
    assert sorted(p.name for p in parts.iterdir()) == ["history-000000.gxp.open", "tensors-000000.gxp.open"]
    fsyncs.calls.clear()
    run.flush(fsync=True)
    assert set(fsyncs.files()) >= {str(parts / "history-000000.gxp.open"), str(parts / "tensors-000000.gxp.open")}
    run.finish()


def test_finish_fsyncs_each_part_before_its_rename_and_the_folder_after(fsyncs):
    run = gradexp.init("p", flush_interval=600, part_max_age=600)
    parts = (run.dir / "parts").resolve()
    run.log({"a": 1.0, "t": np.arange(4.0), "big": np.ones(100_000, np.float32)})
    fsyncs.calls.clear()
    run.finish()
    # the writer's own parts (the sender process seals its console and system parts itself)
    sealed = sorted(p.name for p in parts.iterdir() if p.name.startswith(("history-", "tensors-")))
    assert sealed == ["history-000000.gxp", "tensors-000000.gxp"]
    for name in sealed:
        # the data is on disk under the .open name, before the rename makes it a sealed part
        assert str(parts / (name + ".open")) in fsyncs.files(), (name, fsyncs.calls)
        # and the rename itself is made durable: the folder is fsynced once it holds the new name
        assert any(name in listing and name + ".open" not in listing for listing in fsyncs.dirs(parts)), \
            (name, fsyncs.calls)


def test_recovered_part_is_fsynced_before_and_after_its_rename(tmp_path, fsyncs):
    w = _format.PartWriter(tmp_path, "history", 0)
    header, payload = _format.encode_frame(_format.KIND_HISTORY, b"x" * 100, rows=1)
    w.append(_format.KIND_HISTORY, header, payload, step_min=0, step_max=0, rows=1, key="", raw=100,
             filt=_format.FILTER_NONE, elem=1)
    w.close()  # as a crash leaves it
    fsyncs.calls.clear()
    sealed = _format.recover_part(tmp_path / "history-000000.gxp.open")
    assert fsyncs.files() == [str(tmp_path / "history-000000.gxp.open")]
    assert any(sealed.name in listing for listing in fsyncs.dirs(tmp_path))


# -- sealing by age ---------------------------------------------------------------------------


class Clock:
    """time.monotonic moved on by ``offset`` seconds (the writer and PartWriter only)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.offset

    def __getattr__(self, name: str):
        return getattr(time, name)


@pytest.fixture
def clock(monkeypatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(_writer, "time", c)
    monkeypatch.setattr(_format, "time", c)
    return c


def part_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_offline_parts_are_sealed_by_age_at_the_next_flush(clock):
    # live_interval is small on purpose: offline, it must not decide when history is sealed
    run = gradexp.init("p", part_max_age=100, live_interval=1, flush_interval=10_000)
    parts = run.dir / "parts"
    run.log({"a": 0.0, "t": np.zeros(4)})
    run.flush()
    assert part_names(parts) == ["history-000000.gxp.open", "tensors-000000.gxp.open"]
    clock.offset = 99  # younger than part_max_age: stays open
    run.log({"a": 1.0, "t": np.ones(4)})
    run.flush()
    assert part_names(parts) == ["history-000000.gxp.open", "tensors-000000.gxp.open"]
    clock.offset = 101  # older: sealed at this flush, with the rows written just before
    run.log({"a": 2.0, "t": np.full(4, 2.0)})
    run.flush()
    assert part_names(parts) == ["history-000000.gxp", "tensors-000000.gxp"]
    scans = [_format.scan_part(parts / n) for n in part_names(parts)]
    assert all(s.sealed and not s.damage for s in scans)
    r = gradexp.Api().run(run.dir)
    assert r.history().column("a").to_pylist() == [0.0, 1.0, 2.0]
    assert np.array_equal(r.tensor("t", 2), np.full(4, 2.0))
    run.log({"a": 3.0})  # the next rows start a new part
    run.flush()
    assert "history-000001.gxp.open" in part_names(parts)
    run.finish()
    assert gradexp.Api().run(run.dir).history().column("a").to_pylist() == [0.0, 1.0, 2.0, 3.0]


def test_online_history_is_sealed_every_live_interval_tensors_by_part_max_age(tmp_path, clock):
    """Online, the server sees only sealed parts: history is sealed after live_interval,
    tensors after part_max_age. (The writer alone: no sender, no server.)"""
    parts = tmp_path / "parts"
    parts.mkdir()
    s = Settings(mode="online", live_interval=10, part_max_age=100, flush_interval=10_000)
    w = _writer.Writer(parts, s, time.time(), lambda: None)
    keys = Keys()
    try:
        def log(step: int) -> None:
            w.put_row(step, time.time(), prepare({"a": float(step), "t": np.full(4, float(step))}, keys, w.pool))
            w.flush()

        log(0)
        assert part_names(parts) == ["history-000000.gxp.open", "tensors-000000.gxp.open"]
        clock.offset = 9
        log(1)
        assert part_names(parts) == ["history-000000.gxp.open", "tensors-000000.gxp.open"]
        clock.offset = 11  # history is older than live_interval, tensors younger than part_max_age
        log(2)
        names = part_names(parts)
        assert "history-000000.gxp" in names and "tensors-000000.gxp.open" in names, names
        clock.offset = 99
        log(3)
        assert "tensors-000000.gxp.open" in part_names(parts)
        clock.offset = 101
        log(4)
        names = part_names(parts)
        assert "tensors-000000.gxp" in names and "tensors-000000.gxp.open" not in names, names
    finally:
        w.flush(close=True)
    assert w.error is None


# -- histograms of large tensors --------------------------------------------------------------

HIST_EXACT = 262_144
"""Up to this many finite elements the histogram is exact; above, sampled and scaled."""


def numpy_summary(x: np.ndarray) -> dict:
    x = x.astype(np.float64).reshape(-1)
    finite = x[np.isfinite(x)]
    return {"count": x.size, "nonfinite": x.size - finite.size, "mean": finite.mean(), "std": finite.std(),
            "min": finite.min(), "max": finite.max(), "norm": np.linalg.norm(finite),
            "zero_frac": np.count_nonzero(finite == 0) / x.size,
            "hist": np.histogram(finite, bins=HIST_BINS, range=(finite.min(), finite.max()))[0]}


def assert_summary_matches_numpy(x: np.ndarray, *, exact_hist: bool) -> dict:
    got, want = summarize(x), numpy_summary(x)
    assert got["count"] == want["count"] and got["nonfinite"] == want["nonfinite"]
    assert got["zero_frac"] == want["zero_frac"]
    for k in ("mean", "std", "min", "max", "norm"):
        assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-9), k
    hist, ref = np.asarray(got["hist"]), want["hist"]
    assert hist.shape == (HIST_BINS,)
    finite = want["count"] - want["nonfinite"]
    if exact_hist:
        # Values that fall on a bin edge may be binned one side or the other by the two
        # rounding orders; a handful at most.
        assert np.abs(hist - ref).sum() <= 4
        assert hist.sum() == finite
        return got
    # Above HIST_EXACT the counts come from an evenly spaced sample, scaled to the element
    # count: the total is the element count up to rounding, each bin within a few sampling
    # standard errors of the exact count.
    stride = finite / HIST_EXACT
    assert abs(int(hist.sum()) - finite) <= HIST_BINS / 2
    tol = 5 * np.sqrt(np.maximum(ref, 1) * stride) + stride
    assert np.all(np.abs(hist - ref) <= tol), np.flatnonzero(np.abs(hist - ref) > tol)
    return got


@pytest.mark.parametrize("n", [HIST_EXACT, HIST_EXACT + 1, 1_000_003, 3_000_017])
def test_large_float_histogram_is_numpys_scaled_to_the_element_count(n):
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    assert_summary_matches_numpy(x, exact_hist=n <= HIST_EXACT)


def test_sampled_histogram_totals_the_element_count_not_the_sample_times_the_stride():
    """70 * 2**18 < n: the sample takes every 71st element, and n = 71 * m + 1, so the
    sample has m + 1 elements: times the stride that would be n + 70, not n."""
    m = 258_478
    n = 71 * m + 1
    assert n // HIST_EXACT == 70
    x = np.random.default_rng(3).random(n, dtype=np.float32)
    hist = summarize(x)["hist"]
    assert abs(sum(hist) - n) <= HIST_BINS / 2


def test_large_histogram_sample_does_not_line_up_with_rows():
    """Rows of 4: a stride that divides the row length would see only one column."""
    n_rows = HIST_EXACT  # 4 * 2**18 elements: the sample takes about every 4th
    x = np.tile(np.arange(4, dtype=np.float32), n_rows).reshape(n_rows, 4)
    got = assert_summary_matches_numpy(x, exact_hist=False)
    nonzero = np.flatnonzero(got["hist"])
    assert list(nonzero) == [0, HIST_BINS // 3, 2 * HIST_BINS // 3, HIST_BINS - 1]


def test_large_int_and_nonfinite_histograms():
    rng = np.random.default_rng(7)
    ints = rng.integers(-1000, 1000, size=700_001, dtype=np.int64)
    assert_summary_matches_numpy(ints, exact_hist=False)
    x = rng.standard_normal(900_001)
    x[3 + rng.choice(x.size - 3, 5000, replace=False)] = np.nan
    x[:3] = [np.inf, -np.inf, 0.0]
    got = assert_summary_matches_numpy(x, exact_hist=False)
    assert got["nonfinite"] == 5002


def test_online_parts_are_sealed_after_two_seconds_unless_set():
    from gradexp.core.settings import resolve

    online = {"mode": "online", "host": "http://127.0.0.1:9", "api_key": "gx_test"}
    assert resolve(online, environ={}).part_max_age == 2.0
    assert resolve({**online, "part_max_age": 30}, environ={}).part_max_age == 30.0
    assert resolve({}, environ={}).part_max_age == 60.0


def test_finish_makes_the_final_status_durable(fsyncs):
    """run.json's last write (the run's final status) is fsynced before its rename, and the
    folder after it: a power loss right after finish() cannot bring back "running"."""
    run = gradexp.init("p")
    run.log({"a": 1.0})
    folder = run.dir.resolve()
    fsyncs.calls.clear()
    run.finish()
    assert any(Path(p).parent == folder and Path(p).name.startswith(".run.json.") for p in fsyncs.files()), \
        fsyncs.calls
    assert any("run.json" in listing and not any(n.startswith(".run.json.") for n in listing)
               for listing in fsyncs.dirs(folder)), fsyncs.calls
