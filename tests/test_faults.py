"""Network faults and server restarts between the client and a real server lose and duplicate nothing.

A fault proxy (tests/faultproxy.py) sits between gradexp's client and a real
``gradexp server`` and, on a seeded schedule, refuses connections, resets requests
and answers half-way, stalls answers, and answers 500/502/503/429 (``Retry-After`` in
seconds and as an HTTP date). Online runs stream through it while the real server is
killed and restarted several times, on SQLite and on PostgreSQL; then an offline run is
synced through it (the server killed and restarted once more on the way), twice.
Afterwards the server must hold exactly the local run folder: every part once, history
and every tensor bit for bit, the run finished; the sender logged its retries
(rate-limited) and no traceback. The tallies are printed at the end (-s).
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import gradexp
import services
from faultproxy import KINDS, FaultProxy
from gradexp.core.client import RETRY_LOG_EVERY
from gradexp.sync.sender import DONE_MARK, UPLOADED_LOG
from services import GradexpServer, Trainer, assert_uploaded_exactly_once, check_history, clean_env, same_bits

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX only")

USER = "faulty"
SEGMENTS = 4
"""The online run logs in this many stretches; the server is killed and restarted between them."""
STEPS_PER_SEGMENT = 25
BIG_EVERY = 10
"""Every this many steps the trainer also logs a 4 MB tensor."""

# The test trainer (services.TRAINER_SRC) with a 4 MB float32 tensor every BIG_EVERY steps.
FAULT_TRAINER_SRC = services.TRAINER_SRC.replace(
    "run.log(values(step))",
    f"run.log({{**values(step), **({{'big': np.random.default_rng(10_000 + step).standard_normal(1 << 20)"
    f".astype(np.float32)}} if step % {BIG_EVERY} == 0 else {{}})}})")
assert FAULT_TRAINER_SRC != services.TRAINER_SRC

TALLY: dict[str, Counter] = {"faults": Counter(), "on": Counter(), "other": Counter()}


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    f, o = TALLY["faults"], TALLY["other"]
    print(f"\nfault tally: {sum(f.values())} faults injected over {o['requests']} proxied requests "
          f"({', '.join(f'{k} {f[k]}' for k in KINDS)}); {o['restarts']} server restarts "
          f"({o['upstream_down']} requests met a dead server); {o['online_runs']} online runs, "
          f"{o['synced_runs']} synced runs; {o['rows']} history rows, {o['tensors']} tensors "
          f"({o['big']} of 4 MB), {o['parts']} parts checked equal to the local folders, each on the server once; "
          f"faults hit: {dict(TALLY['on'].most_common())}")


@pytest.fixture(autouse=True)
def _no_leftover_trainers():
    yield
    Trainer.cleanup()


@pytest.fixture(params=["sqlite", "postgresql"])
def server(request, tmp_path):
    home = tmp_path / "srv"
    home.mkdir()
    if request.param == "sqlite":
        srv = GradexpServer(tmp_path, data_dir=home)
    else:
        srv = GradexpServer(tmp_path, db_url=request.getfixturevalue("postgres").new_database(),
                            store_url=str(home / "objects"))
    srv.key = srv.user_with_key(USER)
    srv.start()
    yield srv
    srv.stop()


def _what(request_line: str) -> str:
    """``PUT part``, ``POST finish``, ``PATCH run``, ``GET viewer``: what a faulted request was."""
    method, path = request_line.split()[:2]
    if "/parts/" in path:
        return f"{method} part"
    if path.endswith("/finish") or path.endswith("/viewer"):
        return f"{method} {path.rsplit('/', 1)[1]}"
    return f"{method} run"


def _db_url(server: GradexpServer) -> str:
    return server.db_url or f"sqlite:///{server.data_dir / 'gradexp.db'}"


def _same_run(local_dir: Path, server: GradexpServer, project: str, run_id: str, *, big: bool = True) -> None:
    """The server's run equals the local folder: history and every tensor, bit for bit,
    every part once. Tallies what was checked."""
    local = gradexp.Api().run(local_dir)
    remote = gradexp.Api(host=server.url, api_key=server.key).run(f"{USER}/{project}/{run_id}")
    assert remote.status == "finished", remote.meta
    lh, rh = local.history(), remote.history()
    assert lh.num_rows > 0 and rh.column_names == lh.column_names
    for name in lh.column_names:
        assert rh.column(name).equals(lh.column(name)), name
    keys = local.tensor_keys()
    assert sorted(remote.tensor_keys()) == sorted(keys) and ("big" in keys) == big
    for key in keys:
        steps = local.steps(key)
        assert remote.steps(key) == steps, key
        for s in steps:
            assert same_bits(remote.tensor(key, s), local.tensor(key, s)), (key, s)
    assert_uploaded_exactly_once(_db_url(server), USER, project, run_id, local_dir)
    TALLY["other"]["rows"] += lh.num_rows
    TALLY["other"]["tensors"] += sum(len(local.steps(k)) for k in keys)
    TALLY["other"]["big"] += len(local.steps("big")) if big else 0
    TALLY["other"]["parts"] += len(services.local_parts(local_dir))


_LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ) gradexp sender: ")
_RETRY = re.compile(r" from (GET|PUT|PATCH|POST) \S+; retry \d+ in \d+\.\d s"
                    r"( \(\d+ more retries since the last line\))?$")


def _check_sender_log(path: Path) -> int:
    """sender.log: stamped lines only, no traceback, retries logged at most once per
    RETRY_LOG_EVERY per client (the sender has two). Returns the number of retry lines."""
    text = path.read_text()
    assert "Traceback" not in text, text
    stamps = []
    for line in text.splitlines():
        m = _LOG_LINE.match(line)
        assert m, f"not a sender.log line: {line!r}\n{text}"
        if _RETRY.search(line):
            stamps.append(time.mktime(time.strptime(m.group(1), "%Y-%m-%dT%H:%M:%SZ")))
    assert stamps, f"no retry logged:\n{text}"
    for i, t in enumerate(stamps):  # whole seconds: one client's lines are >= 10 apart
        assert sum(1 for u in stamps[i:] if u - t < RETRY_LOG_EVERY) <= 2, text
    return len(stamps)


def test_online_runs_and_sync_through_faults_and_restarts(server, tmp_path, monkeypatch, request):
    # Never GET /viewer: sync gives its first request 5 attempts in 30 s (a wrong host must fail
    # fast), which a run of random faults could use up; the next test faults it on purpose.
    proxy = FaultProxy(server.port, seed=9, rate=0.35, max_faults=150, lifetime=300,
                       exempt=("GET /api/v1/viewer ",))
    try:
        # -- an online run: faults throughout, the server killed and restarted between segments --
        monkeypatch.setattr(services, "TRAINER_SRC", FAULT_TRAINER_SRC)
        n = SEGMENTS * STEPS_PER_SEGMENT
        stops = tuple(STEPS_PER_SEGMENT * (i + 1) - 1 for i in range(SEGMENTS))
        t = Trainer(tmp_path, "online", steps=n, stops=stops, sleep=0.01, part_max_bytes=16_384,
                    env=clean_env(GRADEXP_HOST=proxy.url, GRADEXP_API_KEY=server.key))
        for stop in stops[:-1]:
            t.wait_step(stop)
            time.sleep(0.7)  # the segment's history parts are sealed (0.5 s) and on their way
            server.kill()
            t.go(stop)      # the next segment is logged while the server is down ...
            t.wait_step(stop + 1)
            time.sleep(0.5)
            server.start()  # ... and the server comes back: same port, database and store
            TALLY["other"]["restarts"] += 1
        t.wait_step(n - 1)
        t.go(n - 1)
        assert t.wait(150) == 0, t.stderr
        assert "gradexp sync" not in t.stderr, t.stderr
        _same_run(t.run_dir, server, "stream", "online")
        check_history(gradexp.Api(host=server.url, api_key=server.key).run(f"{USER}/stream/online").history(),
                      range(n))
        assert (t.run_dir / UPLOADED_LOG).read_text().splitlines()[-1] == f"{DONE_MARK} {proxy.url}/{USER}"
        _check_sender_log(t.run_dir / "sender.log")
        TALLY["other"]["online_runs"] += 1

        # -- an offline run synced through the same proxy, twice --------------------------------
        with gradexp.init("stream", id="offline", dir=tmp_path / "offline", part_max_bytes=16_384) as run:
            for s in range(60):
                v = services.values(s)
                if s % BIG_EVERY == 0:
                    v["big"] = np.random.default_rng(20_000 + s).standard_normal(1 << 20).astype(np.float32)
                run.log(v)
                if s % 7 == 6:
                    run.flush()
        cmd = [sys.executable, "-m", "gradexp", "sync", "--host", proxy.url, "--api-key", server.key,
               "--dir", str(tmp_path / "offline")]
        mark = len(proxy.seen)
        sync = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env())
        try:  # the server is killed and restarted once the sync is sending parts
            services.wait_for(lambda: any("/parts/" in line for line in proxy.seen[mark:]), "sync sending parts",
                              timeout=120)
            server.kill()
            time.sleep(0.5)
            server.start()
            TALLY["other"]["restarts"] += 1
            out, err = sync.communicate(timeout=240)
        finally:
            if sync.poll() is None:
                sync.kill()
                sync.wait(30)
        first = subprocess.CompletedProcess(cmd, sync.returncode, out, err)
        assert first.returncode == 0 and "synced 1 run(s)" in first.stderr, first.stdout + first.stderr
        assert "Traceback" not in first.stderr, first.stderr
        _same_run(run.dir, server, "stream", "offline")
        log = (run.dir / UPLOADED_LOG).read_text()
        before = gradexp.Api(host=server.url, api_key=server.key).run(f"{USER}/stream/offline").meta
        seen = len(proxy.seen)
        again = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=clean_env())
        assert again.returncode == 0 and "synced 0 run(s); 1 already synced" in again.stderr, again.stderr
        assert "parts uploaded" not in again.stdout
        assert all(line.startswith("GET /api/v1/viewer ") for line in proxy.seen[seen:]), proxy.seen[seen:]
        assert (run.dir / UPLOADED_LOG).read_text() == log
        assert gradexp.Api(host=server.url, api_key=server.key).run(f"{USER}/stream/offline").meta == before
        TALLY["other"]["synced_runs"] += 1
    finally:
        proxy.stop()
        TALLY["faults"].update(proxy.counts)
        TALLY["on"].update(_what(line) for _, line in proxy.faulted)
        TALLY["other"]["requests"] += proxy.requests
        TALLY["other"]["upstream_down"] += proxy.upstream_down
    # Every kind of fault was injected at least once (the schedule goes through all kinds in turn).
    assert set(proxy.counts) == set(KINDS), proxy.counts


def test_sync_survives_each_fault_on_its_first_and_last_request(tmp_path):
    """`gradexp sync` asks the server who the key belongs to first: a transient fault
    there (a reset, a 503 during a deploy) is retried like every later request. And
    its last request, POST /finish, is retried after a fault too, even one that came
    after the server had finished the run (a reset of its answer)."""
    server = GradexpServer(tmp_path, data_dir=tmp_path / "srv")
    server.key = server.user_with_key(USER)
    server.start()
    try:
        for kind in KINDS:
            with gradexp.init("stream", id=kind, dir=tmp_path / kind) as run:
                run.log(services.values(0))
            # 429 and 503 on /finish (a logged retry): Retry-After of 2 s in seconds, then as a date
            forms = ("date", "seconds") if kind == "http_429" else ("seconds", "date")
            proxy = FaultProxy(server.port, seed=1, rate=1.0, max_faults=2, kinds=(kind,), lifetime=120,
                               only=("GET /api/v1/viewer ", "/finish "), retry_after=2, retry_after_forms=forms)
            try:
                r = subprocess.run([sys.executable, "-m", "gradexp", "sync", "--host", proxy.url, "--api-key",
                                    server.key, "--dir", str(tmp_path / kind)],
                                   capture_output=True, text=True, timeout=120, env=clean_env())
            finally:
                proxy.stop()
            assert r.returncode == 0 and "synced 1 run(s)" in r.stderr, (kind, r.stderr)
            assert "Traceback" not in r.stderr, r.stderr
            assert proxy.seen[0] == "GET /api/v1/viewer HTTP/1.1", proxy.seen
            assert [(k, line.split()[1].rsplit("/", 1)[1]) for k, line in proxy.faulted] == \
                [(kind, "viewer"), (kind, "finish")], proxy.faulted
            if kind in ("http_429", "http_503"):  # Retry-After honoured: backoff alone waits <= 0.5 s
                wait = re.search(rf"{kind[5:]} [A-Za-z ]+ from POST \S+/finish; retry 1 in (\d+\.\d) s", r.stderr)
                assert wait, r.stderr
                assert (wait.group(1) == "2.0") if kind == "http_429" else (0.6 <= float(wait.group(1)) <= 3.0), \
                    r.stderr
            _same_run(run.dir, server, "stream", kind, big=False)
            TALLY["faults"].update(proxy.counts)
            TALLY["on"].update(_what(line) for _, line in proxy.faulted)
            TALLY["other"]["requests"] += proxy.requests
            TALLY["other"]["synced_runs"] += 1
    finally:
        server.stop()
