"""End to end: training processes stream to a real server through the sender process.

The trainers are separate processes (tests/services.py: Trainer) logging a pure
function of the step, so every value read back from the server is checked exactly.
Servers are killed with SIGKILL and restarted, trainers are killed with SIGKILL, and
the server is absent at init() or never comes back.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

import gradexp
from gradexp.sync.sender import DONE_MARK, UPLOADED_LOG
from services import (
    GradexpServer,
    Trainer,
    assert_uploaded_exactly_once,
    check_history,
    clean_env,
    same_bits,
    values,
    wait_for,
)

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX only")

USER = "trainer"


@pytest.fixture(autouse=True)
def _no_leftover_trainers():
    yield
    Trainer.cleanup()


def make_server(work, **kw) -> GradexpServer:
    home = work / "srv"
    home.mkdir(parents=True, exist_ok=True)
    server = GradexpServer(work, db_url=f"sqlite:///{home / 'gradexp.db'}", store_url=str(home / "objects"), **kw)
    server.key = server.user_with_key(USER)
    return server


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    server = make_server(tmp_path_factory.mktemp("stream")).start()
    yield server
    server.stop()


def remote(server: GradexpServer, run_id: str, project: str = "stream"):
    return gradexp.Api(host=server.url, api_key=server.key).run(f"{USER}/{project}/{run_id}")


def server_history(server: GradexpServer, run_id: str, project: str = "stream"):
    """The run's history on the server, or None while the server does not know the run."""
    try:
        return remote(server, run_id, project).history()
    except gradexp.RunNotFoundError:
        return None


def wait_rows(server: GradexpServer, run_id: str, rows: int, timeout: float):
    def enough():
        h = server_history(server, run_id)
        return h if h is not None and h.num_rows >= rows else None
    return wait_for(enough, f"{rows} history rows of {run_id} on the server", timeout=timeout, interval=0.1)


def check_tensors(r, steps) -> None:
    assert r.tensor_keys() == ["ids", "w"]
    assert r.steps("w") == list(steps) and r.steps("ids") == list(steps)
    for s in steps:
        v = values(s)
        assert same_bits(r.tensor("w", s), v["w"]), s
        assert same_bits(r.tensor("ids", s), v["ids"]), s


def trainer_env(server: GradexpServer, **extra: str) -> dict[str, str]:
    return clean_env(GRADEXP_HOST=server.url, GRADEXP_API_KEY=server.key, **extra)


def uploaded_log(trainer: Trainer) -> list[str]:
    return (trainer.run_dir / UPLOADED_LOG).read_text().splitlines()


def done_line(server: GradexpServer) -> str:
    """uploaded.log's last line once the run is finished on ``server`` (records are per server)."""
    return f"{DONE_MARK} {server.url}/{USER}"


# -- the happy path, live --------------------------------------------------------------------------

def test_online_run_is_live_on_the_server_then_finished(shared, tmp_path):
    n = 30
    t = Trainer(tmp_path, "live", steps=n, stops=(n - 1,), env=trainer_env(shared))  # online through the env
    t.wait_step(n - 1)
    t0 = time.monotonic()
    live = wait_rows(shared, "live", n, timeout=10)  # history parts are sealed and sent every 0.5 s
    visible_after = time.monotonic() - t0
    check_history(live, range(n))
    r = remote(shared, "live")
    assert r.status == "running" and r.config == {"lr": 0.1, "layers": [3, 4]} and r.tags == ["stream"]
    # Tensor parts seal every part_max_age (2 s online): poll until all are there, then check every bit.
    wait_for(lambda: r.steps("w") == list(range(n)) and r.steps("ids") == list(range(n)), "live tensors",
             timeout=20, interval=0.2)
    check_tensors(r, range(n))
    assert r.status == "running"

    t.go(n - 1)
    assert t.wait(120) == 0, t.stderr
    assert "gradexp sync" not in t.stderr, t.stderr
    meta = remote(shared, "live").meta
    assert meta["status"] == "finished" and meta["exit_code"] == 0 and meta["finished_at"]
    assert meta["summary"]["loss"] == values(n - 1)["loss"]
    log = uploaded_log(t)
    assert log[-1] == done_line(shared)
    assert sorted(line.split()[0] for line in log[:-1]) == sorted(p.name for p in (t.run_dir / "parts").iterdir())
    assert_uploaded_exactly_once(shared.db_url, USER, "stream", "live", t.run_dir)
    final = remote(shared, "live")
    check_history(final.history(), range(n))
    check_tensors(final, range(n))
    parquet = list((shared.workdir / "srv" / "objects").glob("runs/*/*/live/history.parquet"))
    assert len(parquet) == 1
    check_history(pq.read_table(parquet[0]), range(n))
    assert visible_after < 10


# -- the server goes away ----------------------------------------------------------------------------

def test_server_killed_and_restarted_during_a_run_loses_and_duplicates_nothing(tmp_path):
    server = make_server(tmp_path).start()
    try:
        n = 60
        t = Trainer(tmp_path, "bounce", steps=n, stops=(29, n - 1), sleep=0.01, env=trainer_env(server))
        t.wait_step(29)
        wait_rows(server, "bounce", 10, timeout=30)  # streaming has started
        server.kill()
        t.go(29)
        t.wait_step(n - 1)  # steps 30.. logged while the server is down
        time.sleep(1.0)     # ... and sealed into parts the sender is retrying
        server.start()      # same port, database and store
        t.go(n - 1)
        assert t.wait(150) == 0, t.stderr
        assert "gradexp sync" not in t.stderr, t.stderr
        r = remote(server, "bounce")
        assert r.status == "finished"
        check_history(r.history(), range(n))
        check_tensors(r, range(n))
        assert uploaded_log(t)[-1] == done_line(server)
        assert_uploaded_exactly_once(server.db_url, USER, "stream", "bounce", t.run_dir)
    finally:
        server.stop()


def test_trainer_killed_the_sender_uploads_the_rest_and_marks_the_run_crashed(shared, tmp_path):
    t = Trainer(tmp_path, "killed", steps=100_000, sleep=0.01, env=trainer_env(shared))
    t.wait_step(50)
    wait_rows(shared, "killed", 1, timeout=30)
    time.sleep(1.5)
    killed_at = time.time()
    t.kill()
    # Every step logged 1.5 s or more before the kill had been flushed to the OS (flush_interval 1 s).
    before = [s for s, ts in t.logged() if ts <= killed_at - 1.5]
    last_logged = max(s for s, _ in t.logged())
    assert before == list(range(len(before))) and len(before) >= 50

    def crashed():
        try:
            return remote(shared, "killed").status == "crashed"
        except gradexp.RunNotFoundError:
            return False
    wait_for(crashed, "the run marked crashed on the server", timeout=60, interval=0.2)
    # The sender writes its log line once the server has answered the finish.
    wait_for(lambda: uploaded_log(t)[-1] == done_line(shared), "the sender's last log line", timeout=30)
    r = remote(shared, "killed")
    assert r.meta["exit_code"] is None
    h = r.history()
    steps = h.column("step").to_pylist()
    assert steps == list(range(len(steps))), "a gap in the recovered history"
    assert len(before) <= len(steps) <= last_logged + 1
    check_history(h, range(len(steps)))
    got = r.steps("w")
    assert set(before) <= set(got) and got == list(range(len(got)))
    for s in before[:: max(1, len(before) // 20)] + before[-3:]:
        assert same_bits(r.tensor("w", s), values(s)["w"]), s
    assert_uploaded_exactly_once(shared.db_url, USER, "stream", "killed", t.run_dir)
    assert gradexp.Api().run(t.run_dir).status == "crashed"


def test_server_down_at_init_then_the_run_streams_once_it_is_up(tmp_path):
    server = make_server(tmp_path)  # user and key exist; nothing listens on the port yet
    try:
        n = 20
        t = Trainer(tmp_path, "late", steps=n, stops=(n - 1,), env=trainer_env(server))
        init = t.first("init_s")
        assert init["init_s"] < 1.0, init
        t.wait_step(n - 1)
        assert not server.healthy()
        server.start()
        check_history(wait_rows(server, "late", n, timeout=45), range(n))
        t.go(n - 1)
        assert t.wait(120) == 0, t.stderr
        r = remote(server, "late")
        assert r.status == "finished"
        check_tensors(r, range(n))
        assert_uploaded_exactly_once(server.db_url, USER, "stream", "late", t.run_dir)
    finally:
        server.stop()


# -- gradexp sync ------------------------------------------------------------------------------------

def sync(server: GradexpServer, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "gradexp", "sync", *args], capture_output=True, text=True,
                       timeout=120, env=env or clean_env())
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def test_sync_uploads_an_offline_run_once(shared, tmp_path):
    n = 25
    with gradexp.init("stream", id="offline", dir=tmp_path / "runs", part_max_bytes=2048) as run:
        assert run.settings.mode == "offline"
        for s in range(n):
            run.log(values(s))
            if s % 8 == 7:
                run.flush()
    parts = sorted(p.name for p in (run.dir / "parts").iterdir())
    assert len(parts) >= 4

    first = sync(shared, "--host", shared.url, "--api-key", shared.key, "--dir", str(tmp_path / "runs"))
    assert "synced 1 run(s)" in first.stderr, first.stderr
    assert f"({len(parts)} parts uploaded)" in first.stdout, first.stdout
    r = remote(shared, "offline")
    assert r.status == "finished" and r.config == {} and r.meta["summary"]["loss"] == values(n - 1)["loss"]
    check_history(r.history(), range(n))
    check_tensors(r, range(n))
    assert_uploaded_exactly_once(shared.db_url, USER, "stream", "offline", run.dir)
    log = (run.dir / UPLOADED_LOG).read_text().splitlines()
    assert log[-1] == done_line(shared) and sorted(x.split()[0] for x in log[:-1]) == parts
    before = remote(shared, "offline").meta

    again = sync(shared, "--dir", str(tmp_path / "runs"), env=trainer_env(shared))  # host and key from the env
    assert "synced 0 run(s); 1 already synced" in again.stderr, again.stderr
    assert "parts uploaded" not in again.stdout
    assert remote(shared, "offline").meta == before  # not even touched
    assert (run.dir / UPLOADED_LOG).read_text().splitlines() == log


def test_finish_timeout_leaves_the_rest_to_sync(tmp_path):
    server = make_server(tmp_path).start()
    try:
        n = 40
        timeout = 3.0
        t = Trainer(tmp_path, "orphan", steps=n, stops=(19,), env=trainer_env(server), finish_timeout=timeout)
        t.wait_step(19)
        wait_rows(server, "orphan", 1, timeout=30)
        server.kill()  # and it does not come back while the trainer finishes
        t.go(19)
        assert t.wait(60) == 0, t.stderr
        took = t.first("finish_s")["finish_s"]
        assert timeout - 0.5 <= took <= timeout + 10, took
        assert "gradexp sync" in t.stderr and str(t.run_dir) in t.stderr, t.stderr
        assert f"within {timeout:.0f} s" in t.stderr, t.stderr
        assert done_line(server) not in (t.run_dir / UPLOADED_LOG).read_text().splitlines()

        server.start()
        r = remote(server, "orphan")
        assert r.status == "running" and r.history().num_rows < n  # the server has only what came before
        out = sync(server, str(t.run_dir), "--host", server.url, "--api-key", server.key)
        assert "synced 1 run(s)" in out.stderr, out.stderr
        r = remote(server, "orphan")
        assert r.status == "finished" and r.meta["exit_code"] == 0
        check_history(r.history(), range(n))
        check_tensors(r, range(n))
        assert_uploaded_exactly_once(server.db_url, USER, "stream", "orphan", t.run_dir)
        assert (t.run_dir / UPLOADED_LOG).read_text().splitlines()[-1] == done_line(server)
    finally:
        server.stop()
