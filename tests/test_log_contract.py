"""log()'s contract at its edges (issue #9): what it refuses, with an error naming the key or
step, instead of letting the writer die or the data change silently; how a run ends when
gradexp itself fails; and last write wins for a tensor whose size changes within a step,
read locally and through a server."""

from __future__ import annotations

import json
import subprocess
import time
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

import gradexp
from gradexp.core.client import Client
from gradexp.core.limits import MAX_KEY_LENGTH
from gradexp.sync.sender import sync
from services import GradexpServer, same_bits, unavailable


def read(run) -> gradexp.api.StoredRun:
    return gradexp.Api().run(run.dir)


# -- keys: one limit, on the whole flattened key (item 4) -----------------------------------------

def test_the_key_limit_counts_the_whole_flattened_key(tmp_path):
    run = gradexp.init("p", dir=tmp_path)
    head, tail = "h" * 600, "t" * 424  # each segment is short; the key "h.../t..." is 1,025 long
    with pytest.raises(ValueError, match=r"'hhhh.*1025 characters.*at most 1024"):
        run.log({head: {tail: np.zeros(3)}})
    with pytest.raises(ValueError, match="1025 characters"):
        run.log({head: {tail: 1.0}})
    # The longest key there is, in 4-byte UTF-8 (4,096 bytes): fits the frame header's u16.
    longest = "\U0001d538" * (MAX_KEY_LENGTH - 2) + "/x"
    x = np.arange(5, dtype=np.int32)
    run.log({longest[:-2]: {"x": x, "y": 2.5}})
    run.finish()
    r = read(run)
    assert r.status == "finished" and r.damage == []
    assert same_bits(r.tensor(longest, 0), x)
    assert r.history().column(longest[:-1] + "y").to_pylist() == [2.5]


def test_a_key_that_is_not_valid_unicode_is_refused(tmp_path):
    run = gradexp.init("p", dir=tmp_path)
    with pytest.raises(ValueError, match="surrogate"):
        run.log({"a": {"\ud800": 1.0}})
    run.log({"ok": 1})
    run.finish()
    assert read(run).status == "finished" and read(run).history().column("ok").to_pylist() == [1]


# -- values that used to kill the writer (item 6) ---------------------------------------------------

@pytest.mark.parametrize("step", [np.uint64(2**64 - 1), 2**63, np.int64(-1)])
def test_a_step_outside_int64_is_refused_and_the_run_goes_on(tmp_path, step):
    run = gradexp.init("p", dir=tmp_path)
    run.log({"x": 1}, step=5)
    with pytest.raises(ValueError, match=f"step must be.*got {int(step)}"):
        run.log({"x": 2}, step=step)
    run.log({"x": 3}, step=2**63 - 1)  # the largest step there is
    with pytest.raises(ValueError, match=f"got {2**63}"):
        run.log({"x": 4})  # the step counted up past int64
    run.finish()
    r = read(run)
    assert r.status == "finished" and "error" not in r.meta
    assert r.history().select(["step", "x"]).to_pylist() == [{"step": 5, "x": 1}, {"step": 2**63 - 1, "x": 3}]


def test_a_nested_key_of_more_than_65535_bytes_is_refused(tmp_path):
    run = gradexp.init("p", dir=tmp_path)
    run.log({"before": np.ones(3)})
    with pytest.raises(ValueError, match="'aaaa.*characters long"):
        run.log({"a" * 1000: {"b" * 1000: {"\u00e9" * 70_000: np.ones(3)}}})
    run.log({"after": np.ones(3)})
    run.finish()
    r = read(run)
    assert r.status == "finished" and sorted(r.tensor_keys()) == ["after", "before"]


# -- silent changes (item 8) -----------------------------------------------------------------------

def test_integers_are_exact_or_refused(tmp_path):
    run = gradexp.init("p", dir=tmp_path)
    big = 2**63 - 1
    run.log({"n": 1, "u": np.uint64(big)})
    for value in (2**63, -(2**63) - 1, 2**70, np.uint64(2**63), np.array(2**64 - 1, np.uint64)):
        with pytest.raises(ValueError, match=f"'n'.*{int(value)} is outside int64"):
            run.log({"n": value})
    with pytest.raises(ValueError, match="'g/n'"):
        run.log({"g": {"n": 2**64}})
    run.log({"n": big, "u": np.uint64(7)})  # one frame: no value changes another row's type
    run.finish()
    h = read(run).history()
    assert h.schema.field("n").type == pa.int64() and h.column("n").to_pylist() == [1, big]
    assert h.column("u").to_pylist() == [big, 7]


def test_a_masked_array_is_refused_not_unmasked(tmp_path):
    run = gradexp.init("p", dir=tmp_path)
    m = np.ma.masked_array([1.0, 2.0, 3.0], mask=[False, True, False])
    with pytest.raises(TypeError, match=r"'g/m'.*mask.*filled"):
        run.log({"g": {"m": m}})
    with pytest.raises(TypeError, match="'c'.*mask"):
        run.log({"c": np.ma.masked})
    run.log({"m": m.filled(np.nan), "mask": np.ma.getmaskarray(m)})  # what the message advises
    run.finish()
    r = read(run)
    assert same_bits(r.tensor("mask", 0), np.array([False, True, False]))


def test_a_key_given_twice_by_flattening_is_refused(tmp_path):
    run = gradexp.init("p", dir=tmp_path)
    with pytest.raises(ValueError, match="'a/b' is given twice"):
        run.log({"a/b": 1, "a": {"b": 2}})
    with pytest.raises(ValueError, match="'a/b' is given twice"):
        run.log({"a": {"b": np.zeros(3)}, "a/b": np.ones(3)})
    run.log({"a": {"b": 2}})
    run.finish()
    assert read(run).history().column("a/b").to_pylist() == [2]


# -- finish() on gradexp's own failures (items 6 and 9) -------------------------------------------

def test_long_double_scalars_are_refused_at_log(tmp_path):
    run = gradexp.init("p", dir=tmp_path)
    for value in (np.longdouble("0.1"), np.array(np.longdouble(1))):
        with pytest.raises(TypeError, match="'x'.*does not fit float64.*float\\(value\\)"):
            run.log({"x": value})
    with pytest.raises(TypeError, match="config key 'ld'.*no exact JSON form"):
        run.config["ld"] = np.longdouble(1)
    run.log({"x": float(np.longdouble("0.1"))})
    run.finish()
    assert read(run).status == "finished"


def test_finish_records_a_summary_it_cannot_save_instead_of_raising(tmp_path):
    run = gradexp.init("p", dir=tmp_path)
    run.log({"x": 1})
    run.summary["best"] = np.longdouble(1)  # assigned, not logged: only finish() meets it
    with pytest.warns(gradexp.GradexpWarning, match="ended failed: could not save summary.json"):
        run.finish()
    r = read(run)
    assert r.status == "failed" and r.meta["exit_code"] == 0
    assert "summary.json" in r.meta["error"] and "longdouble" in r.meta["error"]
    assert r.history().column("x").to_pylist() == [1]


@pytest.fixture
def full_disk(tmp_path):
    """A 2 MiB tmpfs: a real filesystem that fills up (mounting needs root)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        unavailable(f"cannot mount a small tmpfs here (it needs root): {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_finish_on_a_full_disk_marks_the_run_failed_without_raising(full_disk):
    run = gradexp.init("p", dir=full_disk)
    rng = np.random.default_rng(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(40):  # 400 KB of incompressible floats a step into 2 MiB
            run.log({"x": step, "w": rng.standard_normal(100_000).astype(np.float32)})
            run.flush()
            if run._writer.error is not None:
                break
        assert isinstance(run._writer.error, OSError), "the disk never filled up"
        run.log({"x": -1})  # ignored, with a warning: the writer has stopped
        run.finish()  # must not raise
        run.finish()
    msgs = [str(w.message) for w in caught if issubclass(w.category, gradexp.GradexpWarning)]
    assert any("background writer failed" in m and "No space left" in m for m in msgs), msgs
    meta = json.loads((Path(run.dir) / "run.json").read_text())  # still whole JSON
    assert meta["status"] == "failed" and "No space left on device" in meta["error"]
    r = read(run)
    assert r.status == "failed"
    steps = r.history().column("step").to_pylist()
    assert steps == list(range(len(steps)))  # what reached the disk reads back, in order


# -- clear errors for malformed values (item 16) -----------------------------------------------------

def test_a_ragged_list_names_its_key(tmp_path):
    run = gradexp.init("p", dir=tmp_path)
    with pytest.raises(ValueError, match="'g/x'.*not a rectangular array"):
        run.log({"g": {"x": [[1, 2], [3]]}})
    run.finish()


def test_a_very_deep_dict_names_its_key_instead_of_recursing(tmp_path):
    run = gradexp.init("p", dir=tmp_path)
    deep: dict = {"leaf": 1.0}
    for _ in range(1500):
        deep = {"a": deep}
    with pytest.raises(ValueError, match="'a/a/a/.*characters long"):
        run.log(deep)
    loop: dict = {}
    loop["self"] = loop
    with pytest.raises(ValueError, match="'self/self/"):
        run.log(loop)
    run.finish()


# -- last write wins when a tensor's size changes within a step (item 7) ----------------------------

SIZES = {"S": 4, "L": 200_000, "B": 4_000_000}
"""S is batched with other small tensors of its key; L and B are large frames, encoded by workers
(B for long enough that the writer goes on without it)."""
ORDERS = {
    "small-then-large": "SL",
    "large-then-small": "LS",
    "small-large-small": "SLS",
    "large-small-large": "LSL",
    "small-small-large": "SSL",
    "big-then-small-flushed-early": "BS+",  # "+": a small tensor of another shape at step 4
}


def log_order(run, order: str) -> int:
    """Log ``k`` at step 3 in the sizes ``order`` names (each filled with its position); return
    the position of the last write at step 3."""
    last = 0
    for i, c in enumerate(order):
        if c == "+":  # another shape: the group holding step 3 is written out at once
            run.log({"k": np.full(7, -1.0)}, step=4)
        else:
            run.log({"k": np.full(SIZES[c], float(i))}, step=3)
            last = i
    return last


def check_last_write(r, order: str, last: int) -> None:
    want = np.full(SIZES[order[last]], float(last))
    got = r.tensor("k", 3)
    assert got.shape == want.shape and same_bits(got, want), (order, got.shape, got[:3])
    assert dict(r.tensors("k"))[3].shape == want.shape
    summary = r.history().to_pylist()[0]["k"]  # the history's summary agrees with the tensor
    assert summary["count"] == want.size and summary["mean"] == float(last)


@pytest.mark.parametrize("order", ORDERS.values(), ids=ORDERS.keys())
def test_last_write_wins_whatever_the_sizes(tmp_path, order):
    run = gradexp.init("p", dir=tmp_path)
    last = log_order(run, order)
    run.finish()
    check_last_write(read(run), order, last)


@pytest.mark.parametrize("order", ORDERS.values(), ids=ORDERS.keys())
def test_last_write_wins_when_the_writer_writes_between_the_logs(tmp_path, order, monkeypatch):
    """The writer writes by the age of what it holds: with a short flush_interval and a pause
    after each log(), every write of step 3 goes out in a write of its own (the history too),
    not all at once at finish(). The last write still wins."""
    run = gradexp.init("p", dir=tmp_path, flush_interval=0.05)
    real_log = run.log

    def log_and_wait(data, step=None, commit=True):
        real_log(data, step, commit)
        time.sleep(0.15)  # three flush_intervals: the writer has written what it held

    monkeypatch.setattr(run, "log", log_and_wait)
    last = log_order(run, order)
    run.finish()
    r = read(run)
    check_last_write(r, order, last)
    from gradexp.core import format as _format

    history_frames = [f for p in _format.list_parts(run.dir / "parts", "history")
                      for f in _format.scan_part(p).frames if f.kind == _format.KIND_HISTORY]
    assert len(history_frames) >= 2, history_frames  # written between the logs, not once at finish


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def server(request, tmp_path_factory):
    work = tmp_path_factory.mktemp(f"lww-{request.param}")
    if request.param == "sqlite":
        db_url = f"sqlite:///{work / 'gradexp.db'}"
    else:
        db_url = request.getfixturevalue("postgres").new_database()
    srv = GradexpServer(work, db_url=db_url, store_url=str(work / "objects"))
    srv.key = srv.user_with_key("ann")
    srv.start()
    yield srv
    srv.stop()


def test_last_write_wins_through_the_server(server, tmp_path):
    client = Client(server.url, server.key)
    runs = {}
    for order in ORDERS.values():
        run = gradexp.init("lww", dir=tmp_path, part_max_bytes=64 << 10)  # several tensors parts
        runs[order] = (run.id, log_order(run, order))
        run.finish()
        sync(run.dir, client, "ann")
    api = gradexp.Api(host=server.url, api_key=server.key)
    for order, (run_id, last) in runs.items():
        r = api.run(f"ann/lww/{run_id}")
        check_last_write(r, order, last)
        assert r.steps("k") == ([3, 4] if "+" in order else [3])


def test_a_failed_writer_ends_the_run_failed_on_the_server_too(server, tmp_path, monkeypatch):
    from gradexp.core import format as _format

    run = gradexp.init("failing", dir=tmp_path, mode="online", host=server.url, api_key=server.key)
    run.log({"x": 1})
    run.flush()

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_format.PartWriter, "append", no_space)
    with pytest.warns(gradexp.GradexpWarning, match="background writer failed"):
        run.log({"x": 2})
        run.flush()
        run.finish()
    assert read(run).status == "failed" and "No space left" in read(run).meta["error"]
    remote = gradexp.Api(host=server.url, api_key=server.key).run(f"ann/failing/{run.id}")
    assert remote.status == "failed"


def test_an_exit_code_beyond_32_bits_is_recorded_clamped(tmp_path):
    """Every server database keeps exit codes in 32 bits: finish(exit_code=2**40) must not
    make the run impossible to upload, so run.json records it clamped (sign kept)."""
    import json

    from gradexp.sync import sender as _service

    for given, kept in ((2**40, 2**31 - 1), (-(10**30), -(2**31)), (3, 3)):
        run = gradexp.init("p", dir=tmp_path)
        run.finish(exit_code=given)
        meta = json.loads((run.dir / "run.json").read_text())
        assert meta["status"] == "failed" and meta["exit_code"] == kept, meta
        assert _service.final_status({**meta, "exit_code": given}) == ("failed", kept)
