"""One reader interface over run folders, a server over HTTP and the server's own store: the
same answers from each, many steps of a tensor per request, and runs listed on a server.

A real server (``python -m gradexp server``) on loopback; requests are counted by a
forwarding proxy (tests/faultproxy.py with no faults), which also cuts a streamed answer
in the middle for the resume test.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import requests

import gradexp
from faultproxy import FaultProxy
from gradexp.core.client import Client
from gradexp.read.reader import RunReader
from gradexp.sync.sender import sync
from services import GradexpServer, Trainer, clean_env, same_bits, wait_for

USER = "reader"
STEPS = 1200
BIG_EVERY = 40
BIG = (125_000,)
"""float32, 500 kB a step: a frame of its own each, and more than one record batch (8 MiB) in all."""
REWRITTEN = 5
"""The step at which ``w`` is logged again, in another shape: the last write wins."""


def log_mixed(run: Any) -> None:
    """Small tensors many to a frame, large ones alone, int64, bfloat16, a rewrite in another shape."""
    import ml_dtypes

    for step in range(STEPS):
        rng = np.random.default_rng(step)
        data = {"loss": step * 0.5, "w": rng.standard_normal((4, 3)).astype(np.float32),
                "ids": np.arange(5, dtype=np.int64) * step,
                "half": rng.standard_normal(6).astype(ml_dtypes.bfloat16)}
        if step % BIG_EVERY == 0:
            data["big"] = rng.standard_normal(BIG).astype(np.float32)
        run.log(data, step=step)
    with pytest.warns(gradexp.GradexpWarning, match="lower than the current step"):
        run.log({"w": np.full(2, 7.0)}, step=REWRITTEN)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("remote-read")
    srv = GradexpServer(work, db_url=f"sqlite:///{work / 'gradexp.db'}", store_url=str(work / "objects"))
    srv.key = srv.user_with_key(USER)
    srv.create_user("other")
    srv.other_key = srv.create_key("other")
    srv.start()
    runs = work / "runs"
    client = Client(srv.url, srv.key)
    for run_id, tags, fail in (("mixed", ["a", "b"], False), ("plain", ["a"], False), ("broken", [], True)):
        run = gradexp.init("rr", id=run_id, dir=runs, tags=tags, config={"lr": 0.1, "run": run_id},
                           part_max_bytes=1 << 20)
        if run_id == "mixed":
            log_mixed(run)
        else:
            run.log({"loss": 1.0, "w": np.ones(3, np.float32)})
        run.finish(exit_code=1 if fail else 0)
        sync(run.dir, client, USER)
    other = gradexp.init("elsewhere", id="own", dir=runs)
    other.log({"loss": 2.0})
    other.finish()
    sync(other.dir, client, USER)
    srv.runs = runs
    yield srv
    srv.stop()


@pytest.fixture
def proxy(server):
    p = FaultProxy(server.port, seed=0, rate=0.0, lifetime=600)
    yield p
    p.stop()


def local(server: GradexpServer, run_id: str = "mixed", project: str = "rr"):
    return gradexp.Api(dir=server.runs).run(f"{project}/{run_id}")


def remote(server: GradexpServer, run_id: str = "mixed", project: str = "rr", *, url: str | None = None):
    return gradexp.Api(host=url or server.url, api_key=server.key).run(f"{USER}/{project}/{run_id}")


def in_store(server: GradexpServer, run_id: str = "mixed"):
    from gradexp.server import db
    from gradexp.server.reader import ServerRun
    from gradexp.server.store import Store

    engine = db.connect(server.db_url)
    with engine.connect() as conn:
        entity_id = db.entity_id(conn, USER)
    assert entity_id is not None
    return ServerRun(engine, Store(server.store_url), entity_id=entity_id, entity=USER, project="rr",
                     run_id=run_id)


def tensor_requests(p: FaultProxy, start: int) -> list[str]:
    return [line for line in p.seen[start:] if "/tensors/" in line]


def assert_same_pairs(got: list[tuple[int, np.ndarray]], want: list[tuple[int, np.ndarray]]) -> None:
    assert [s for s, _ in got] == [s for s, _ in want]
    for (s, a), (_, b) in zip(got, want):
        assert same_bits(a, b), s


def assert_reuse_alike(got: Iterator[tuple[int, np.ndarray]], want: list[tuple[int, np.ndarray]]) -> None:
    """``tensors(..., reuse=True)``: each array right while it is the current one, and the
    caller's to overwrite (as the distribution view sorts it in place) without harm to the next."""
    for (s, a), (t, b) in zip(got, want, strict=True):
        assert s == t and same_bits(a, b), s
        a.reshape(-1).view(np.uint8)[:] = 0xAB


def assert_read_alike(a: RunReader, b: RunReader) -> None:
    """Every question of the RunReader interface, the same answer from both readers."""
    assert a.history().equals(b.history())
    assert a.history(["loss"]).equals(b.history(["loss"]))
    assert a.keys() == b.keys()
    assert a.tensor_keys() == b.tensor_keys()
    assert (a.config, a.summary, a.status, a.name, a.tags, a.notes, a.id, a.project) == \
           (b.config, b.summary, b.status, b.name, b.tags, b.notes, b.id, b.project)
    assert a.damage == b.damage == []
    for key in a.tensor_keys():
        steps = a.steps(key)
        assert steps == b.steps(key), key
        assert_same_pairs(list(b.tensors(key)), list(a.tensors(key)))
        some = steps[::7][::-1] + steps[:2]  # unordered, repeated
        assert_same_pairs(list(b.tensors(key, some)), list(a.tensors(key, some)))
        for reader in (a, b):
            assert_reuse_alike(reader.tensors(key, some, reuse=True), list(a.tensors(key, some)))
        for s in (steps[0], steps[len(steps) // 2], steps[-1]):
            assert same_bits(a.tensor(key, s), b.tensor(key, s)), (key, s)
    for reader in (a, b):
        with pytest.raises(KeyError, match="nope"):
            reader.steps("nope")


# -- the interface ----------------------------------------------------------------------------------

def test_local_remote_and_server_readers_are_run_readers_and_answer_alike(server):
    here, there, store = local(server), remote(server), in_store(server)
    for reader in (here, there, store):
        assert isinstance(reader, RunReader), type(reader)
    assert here.tensor_keys() == ["big", "half", "ids", "w"]
    assert here.steps("big") == list(range(0, STEPS, BIG_EVERY))
    assert here.tensor("w", REWRITTEN).shape == (2,)  # the rewrite won
    assert_read_alike(here, there)
    assert_read_alike(here, store)
    other = remote(server, "broken")
    assert (other.status, local(server, "broken").status) == ("failed", "failed")


def test_a_live_run_reads_alike_locally_and_on_the_server(server, tmp_path):
    n = 30
    t = Trainer(tmp_path, "live", steps=n, stops=(n - 1,), project="live",
                env=clean_env(GRADEXP_HOST=server.url, GRADEXP_API_KEY=server.key))
    try:
        t.wait_step(n - 1)
        here = gradexp.Api(dir=t.dir).run("live/live")

        def caught_up():
            there = remote(server, "live", "live")
            return all(there.steps(k) == here.steps(k) for k in here.tensor_keys()) and \
                there.history().equals(here.history()) and there.summary == here.summary
        wait_for(caught_up, "the server to hold what the trainer logged", timeout=60, interval=0.3)
        assert here.status == "running"
        assert_read_alike(here, remote(server, "live", "live"))
        t.go(n - 1)
        assert t.wait(120) == 0, t.stderr
    finally:
        Trainer.cleanup()


def test_steps_asked_for_that_were_not_logged_raise_key_error_naming_them(server):
    for reader in (local(server), remote(server), in_store(server)):
        with pytest.raises(KeyError, match="no step 3"):
            list(reader.tensors("big", [0, 3]))
        with pytest.raises(KeyError, match="'nope'"):
            list(reader.tensors("nope", [0]))
        assert list(reader.tensors("big", [])) == []


# -- many steps per request -------------------------------------------------------------------------

def test_tensors_streams_every_step_in_one_request_and_tensor_is_one(server, proxy):
    r = remote(server, url=proxy.url)
    start = len(proxy.seen)
    got = list(r.tensors("w"))
    assert len(got) == STEPS and tensor_requests(proxy, start) == [
        f"GET /api/v1/runs/{USER}/rr/mixed/tensors/w/rows HTTP/1.1"]
    start = len(proxy.seen)
    some = list(r.tensors("big", range(0, 300, BIG_EVERY)))
    assert [s for s, _ in some] == list(range(0, 300, BIG_EVERY))
    assert len(tensor_requests(proxy, start)) == 1
    start = len(proxy.seen)
    r.tensor("w", 7)
    assert len(tensor_requests(proxy, start)) == 1


def test_long_step_lists_take_a_few_requests_each_within_the_limits(server, proxy):
    r, here = remote(server, url=proxy.url), local(server)
    wanted = list(range(STEPS - 1, -1, -1))  # every step, asked for one by one, backwards
    start = len(proxy.seen)
    assert_same_pairs(list(r.tensors("ids", wanted)), list(here.tensors("ids")))
    lines = tensor_requests(proxy, start)
    assert 2 <= len(lines) <= 4 and all(len(line) < 8192 for line in lines), [len(x) for x in lines]


def test_a_stream_cut_in_the_middle_is_resumed_without_repeating_a_step(server):
    here = local(server)
    for key in ("big", "w"):
        p = FaultProxy(server.port, seed=3, rate=1.0, max_faults=2, kinds=("reset_response",),
                       only=("/rows", "/rows"), lifetime=300)
        try:
            r = remote(server, url=p.url)
            assert_same_pairs(list(r.tensors(key)), list(here.tensors(key)))
            assert p.counts["reset_response"] == 2
        finally:
            p.stop()


def test_the_rows_endpoint_is_an_arrow_stream_in_bounded_batches(server):
    url = f"{server.url}/api/v1/runs/{USER}/rr/mixed/tensors/big/rows"
    auth = {"Authorization": f"Bearer {server.key}"}
    r = requests.get(url, headers=auth, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"] == "application/vnd.apache.arrow.stream"
    reader = pa.ipc.open_stream(r.content)
    assert reader.schema.names == ["steps", "frame"]
    batches = list(reader)
    sizes = [sum(len(f) for f in b.column("frame").to_pylist()) for b in batches]
    largest = max(len(f) for b in batches for f in b.column("frame").to_pylist())
    assert len(batches) >= 2 and max(sizes) < (8 << 20) + largest, sizes
    steps = [s for b in batches for row in b.column("steps").to_pylist() for s in row]
    assert steps == list(range(0, STEPS, BIG_EVERY))
    # Steps asked for by name, one missing: 404 naming it, before anything is streamed.
    r = requests.get(url, params=[("steps", 40), ("steps", 41)], headers=auth, timeout=60)
    assert r.status_code == 404 and "no step 41" in r.json()["error"]
    r = requests.get(url, params=[("steps", "x")], headers=auth, timeout=60)
    assert r.status_code == 400 and "steps" in r.json()["error"]
    r = requests.get(url, headers={"Authorization": f"Bearer {server.other_key}"}, timeout=60)
    assert r.status_code == 404  # another entity's run does not exist for them


# -- listing runs on a server --------------------------------------------------------------------------

def test_api_runs_lists_the_runs_on_the_server_with_filters(server):
    api = gradexp.Api(host=server.url, api_key=server.key, dir=server.runs / "nothing-here")
    listed = api.runs(f"{USER}/rr")
    assert sorted(r.id for r in listed) == ["broken", "mixed", "plain"]
    assert all(isinstance(r, RunReader) and type(r).__name__ == "RemoteRun" for r in listed)
    mixed = next(r for r in listed if r.id == "mixed")
    assert mixed.tags == ["a", "b"] and mixed.config == {"lr": 0.1, "run": "mixed"}
    assert_same_pairs(list(mixed.tensors("big")), list(local(server).tensors("big")))
    assert [r.id for r in api.runs(f"{USER}/rr", tags=["a", "b"])] == ["mixed"]
    assert sorted(r.id for r in api.runs(f"{USER}/rr", tags=["a"])) == ["mixed", "plain"]
    assert [r.id for r in api.runs(f"{USER}/rr", status="failed")] == ["broken"]
    everything = api.runs()  # a host set: every project of the viewer
    assert {(r.project, r.id) for r in everything} >= {("rr", "mixed"), ("elsewhere", "own")}
    assert api.runs("other/rr") == []  # another entity's runs are not there for this user
    assert [r.id for r in gradexp.Api(dir=server.runs).runs("rr", status="failed")] == ["broken"]


def test_api_runs_follows_the_pages_of_a_long_listing(server):
    """More runs than one page holds (1,000): Api().runs pages through all of them, once each."""
    from gradexp.server import db

    engine = db.connect(server.db_url)
    try:
        with engine.begin() as conn:
            me = db.entity_id(conn, USER)
            assert me is not None
            for i in range(1003):
                db.upsert_run(conn, me, "many", f"m{i:04d}", {"created_at": 1_700_000_000.0 + i // 3})
    finally:
        engine.dispose()
    api = gradexp.Api(host=server.url, api_key=server.key, dir=server.runs / "nothing-here")
    listed = [r.id for r in api.runs(f"{USER}/many")]
    assert len(listed) == 1003 and set(listed) == {f"m{i:04d}" for i in range(1003)}
    first = requests.get(f"{server.url}/api/v1/runs", params={"project": "many"}, timeout=60,
                         headers={"Authorization": f"Bearer {server.key}"}).json()
    assert len(first["runs"]) == 1000 and first["next"]
    r = requests.get(f"{server.url}/api/v1/runs", params={"cursor": "1e9_x"}, timeout=60,
                     headers={"Authorization": f"Bearer {server.key}"})
    assert r.status_code in (400, 422) and "cursor" in r.text


def test_gradexp_runs_with_host_prints_the_server_runs(server, tmp_path):
    def gx(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "gradexp", "runs", *args], capture_output=True, text=True,
                              timeout=120, env=clean_env(GRADEXP_API_KEY=server.key), cwd=tmp_path)

    r = gx("--host", server.url, "rr", "--tag", "a")
    assert r.returncode == 0, r.stderr
    refs = [line.split("\t")[0] for line in r.stdout.splitlines()]
    assert sorted(refs) == [f"{USER}/rr/mixed", f"{USER}/rr/plain"]
    assert all(line.split("\t")[1].strip() == "finished" for line in r.stdout.splitlines())
    r = gx("--host", server.url, "--status", "failed")
    assert r.returncode == 0 and r.stdout.split("\t")[0] == f"{USER}/rr/broken", r.stderr
    r = gx("--host", server.url, "nosuch/rr")
    assert r.returncode == 0 and r.stdout == "" and "no runs of project nosuch/rr" in r.stderr
    local_listing = gx("--dir", str(server.runs), "rr")  # no --host: the folders, as before
    assert sorted(line.split("\t")[0] for line in local_listing.stdout.splitlines()) == \
        ["rr/broken", "rr/mixed", "rr/plain"]


def test_export_tensors_from_the_server_matches_the_local_export(server, tmp_path):
    import pyarrow.parquet as pq

    def export(ref: str, out: Path, *extra: str) -> None:
        r = subprocess.run([sys.executable, "-m", "gradexp", "export", ref, "--tensors", "-o", str(out), *extra],
                           capture_output=True, text=True, timeout=300, env=clean_env(), cwd=tmp_path)
        assert r.returncode == 0, r.stderr

    export(str(server.runs / "rr" / "mixed"), tmp_path / "here.parquet")
    export(f"{USER}/rr/mixed", tmp_path / "there.parquet", "--host", server.url, "--api-key", server.key)
    here = sorted(p.name for p in (tmp_path / "here.tensors").iterdir())
    assert here == sorted(p.name for p in (tmp_path / "there.tensors").iterdir()) and here
    for name in here:
        assert pq.read_table(tmp_path / "here.tensors" / name).equals(pq.read_table(tmp_path / "there.tensors" / name))


ROUTE_KEYS = ["rows", "opt/rows", "x/rows/rows", "a/rows/steps", "b/steps/rows", "c/steps"]
"""Keys that end like the routes under ``.../tensors/{key}``: each still reaches its own tensor."""


def test_keys_ending_like_the_routes_read_back_through_every_route(server, tmp_path):
    run = gradexp.init("keys", id="routes", dir=tmp_path)
    for s in range(3):
        run.log({k: np.full(2, s * 100 + i, np.int16) for i, k in enumerate(ROUTE_KEYS)})
    run.finish()
    sync(run.dir, Client(server.url, server.key), USER)
    r = remote(server, "routes", "keys")
    assert r.tensor_keys() == sorted(ROUTE_KEYS)
    for i, k in enumerate(ROUTE_KEYS):
        assert r.steps(k) == [0, 1, 2], k
        assert [(s, a.tolist()) for s, a in r.tensors(k)] == [(s, [s * 100 + i] * 2) for s in range(3)], k
        assert [s for s, _ in r.tensors(k, [2, 0])] == [0, 2], k
        assert r.tensor(k, 1).tolist() == [100 + i] * 2, k


def test_a_frame_damaged_on_the_server_is_skipped_by_export_as_locally(server, tmp_path):
    """The rows stream sends frames as stored; the client checks each as it decodes it. A
    damaged one fails ``tensors()`` with CorruptPartError, and export skips just that tensor."""
    from gradexp.core import format as _format

    run = gradexp.init("dmg", id="dmg", dir=tmp_path / "runs")
    for s in range(4):
        run.log({"big": np.full(BIG, s, np.float32)}, step=s)
    run.finish()
    sync(run.dir, Client(server.url, server.key), USER)
    hit = 0
    for part in _format.list_parts(run.dir / "parts", "tensors"):
        body = part.read_bytes()
        for info in _format.scan_part(part).frames:
            if info.kind == _format.KIND_TENSOR and info.step_min == 2:
                for stored in (p for p in Path(server.store_url).rglob("*.gxp") if p.read_bytes() == body):
                    data = bytearray(body)
                    data[info.data_offset + info.stored // 2] ^= 0x20
                    stored.write_bytes(bytes(data))
                    hit += 1
    assert hit == 1
    r = remote(server, "dmg", "dmg")
    with pytest.raises(gradexp.CorruptPartError):
        list(r.tensors("big"))
    assert [s for s, _ in r.tensors("big", [0, 1, 3])] == [0, 1, 3]
    out = subprocess.run([sys.executable, "-m", "gradexp", "export", f"{USER}/dmg/dmg", "--tensors", "-o",
                          str(tmp_path / "d.parquet"), "--host", server.url, "--api-key", server.key],
                         capture_output=True, text=True, timeout=300, env=clean_env(), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "'big' at step 2" in out.stderr and "3 (1 damaged, skipped)" in out.stderr, out.stderr


# -- console, system metrics, provenance --------------------------------------------------------------

def test_console_system_and_provenance_read_alike_from_the_folder_the_server_and_its_store(server, tmp_path):
    """A run that prints, samples system metrics and raises: the same lines, table, record and
    provenance through every reader (ServerRun read none of them before)."""
    import os
    import textwrap

    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent("""
        import time
        import gradexp
        run = gradexp.init("rr", id="loud", system_interval=0.2, code=True)
        for i in range(5):
            print(f"line {i}")
            run.log({"loss": float(i)}, step=i)
        time.sleep(1.0)
        raise ValueError("the end")
    """))
    repo = str(Path(__file__).resolve().parents[1])
    env = clean_env(PYTHONPATH=os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH", "")) if p),
                    GRADEXP_DIR=str(server.runs))
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    sync(server.runs / "rr" / "loud", Client(server.url, server.key), USER)
    here, there, store = local(server, "loud"), remote(server, "loud"), in_store(server, "loud")
    lines = here.console()
    assert [x.text for x in lines[:5]] == [f"line {i}" for i in range(5)]
    assert any("ValueError: the end" in x.text for x in lines)
    assert here.system().num_rows > 0
    for other in (there, store):
        assert other.console() == lines
        assert other.console(3) == lines[3:]
        assert other.system().equals(here.system())
        assert other.provenance == here.provenance
        for field in ("host", "argv", "python", "program", "exception", "exit_code"):
            assert other.meta.get(field) == here.meta.get(field), field
    assert store.meta["exception"]["type"] == "ValueError"
