"""End to end against a real server: what used to stop uploading for good now goes up.

Non-finite values (config, summary, history, tensors) round-trip exactly, online and
through ``gradexp sync``; damaged parts are re-sealed from their intact frames and the
rest of the run uploads (named cases and a property test over random corruption);
uploaded.log is per server; remote reads give up on a persistent 500 with a clear
error; a sender that fails says why at ``finish()``.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from requests.adapters import HTTPAdapter

import gradexp
from gradexp.core import arrow as _arrow
from gradexp.core import format as _format
from gradexp.core.client import Client
from gradexp.core.errors import ApiError
from gradexp.sync import sender as _service
from services import GradexpServer, Trainer, clean_env, same_bits, values, wait_for

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX only")

USER = "resync"


def make_server(work: Path) -> GradexpServer:
    home = work / "srv"
    home.mkdir(parents=True, exist_ok=True)
    server = GradexpServer(work, db_url=f"sqlite:///{home / 'gradexp.db'}", store_url=str(home / "objects"))
    server.key = server.user_with_key(USER)
    return server


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    server = make_server(tmp_path_factory.mktemp("resync")).start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def _no_leftover_trainers():
    yield
    Trainer.cleanup()


def remote(server: GradexpServer, project: str, run_id: str):
    return gradexp.Api(host=server.url, api_key=server.key).run(f"{USER}/{project}/{run_id}")


def sync_cli(server: GradexpServer, *args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "gradexp", "sync", "--host", server.url, "--api-key", server.key,
                        *args], capture_output=True, text=True, timeout=180, env=clean_env())
    assert r.returncode == 0, r.stdout + r.stderr
    return r


# -- 1. non-finite values ------------------------------------------------------------------------------

NONFINITE_SRC = '''
import math, sys
import numpy as np
import gradexp

project, run_id, folder = sys.argv[1:4]
nan_payload = np.array([0x7FC00001, 0xFF800000, 0x7F800000, 0x7FC00000], dtype=np.uint32).view(np.float32)
run = gradexp.init(project, id=run_id, dir=folder,
                   config={"lr": math.nan, "clip": math.inf, "floor": -math.inf, "nested": {"x": [math.nan, 1]}})
for step, v in enumerate([1.5, math.inf, -math.inf, math.nan]):
    run.log({"loss": v, "t": nan_payload * np.float32(step + 1), "big": np.full(70_000, v)}, step=step)
run.summary["best"] = -math.inf
run.finish()
'''


def check_nonfinite(server: GradexpServer, project: str, run_id: str) -> None:
    r = remote(server, project, run_id)
    assert r.status == "finished"
    cfg = r.config
    assert math.isnan(cfg["lr"]) and cfg["clip"] == math.inf and cfg["floor"] == -math.inf
    assert math.isnan(cfg["nested"]["x"][0]) and cfg["nested"]["x"][1] == 1
    summary = r.summary
    assert math.isnan(summary["loss"]) and summary["best"] == -math.inf
    loss = r.history().column("loss").to_pylist()
    assert loss[:3] == [1.5, math.inf, -math.inf] and math.isnan(loss[3])
    payload = np.array([0x7FC00001, 0xFF800000, 0x7F800000, 0x7FC00000], dtype=np.uint32).view(np.float32)
    for step, v in enumerate([1.5, math.inf, -math.inf, math.nan]):
        assert same_bits(r.tensor("t", step), payload * np.float32(step + 1)), step
        assert same_bits(r.tensor("big", step), np.full(70_000, v)), step
    # The JSON API carries the exact tokens (history as JSON, the run list).
    headers = {"Authorization": f"Bearer {server.key}"}
    base = f"{server.url}/api/v1/runs"
    h = requests.get(f"{base}/{USER}/{project}/{run_id}/history", params={"format": "json"}, headers=headers,
                     timeout=30)
    assert h.status_code == 200 and b"NaN" in h.content and b"-Infinity" in h.content
    col = json.loads(h.content)["columns"]["loss"]
    assert col[:3] == [1.5, math.inf, -math.inf] and math.isnan(col[3])
    listed = requests.get(base, params={"project": project}, headers=headers, timeout=30)
    assert listed.status_code == 200, listed.text
    assert math.isnan(json.loads(listed.content)["runs"][0]["config"]["lr"])


def test_nonfinite_values_round_trip_online(srv, tmp_path):
    env = clean_env(GRADEXP_HOST=srv.url, GRADEXP_API_KEY=srv.key)
    r = subprocess.run([sys.executable, "-c", NONFINITE_SRC, "nonfinite", "online", str(tmp_path / "runs")],
                       capture_output=True, text=True, timeout=180, env=env)
    assert r.returncode == 0 and "gradexp sync" not in r.stderr, r.stderr
    check_nonfinite(srv, "nonfinite", "online")


def test_nonfinite_values_round_trip_through_sync(srv, tmp_path):
    r = subprocess.run([sys.executable, "-c", NONFINITE_SRC, "nonfinite", "offline", str(tmp_path / "runs")],
                       capture_output=True, text=True, timeout=180, env=clean_env())
    assert r.returncode == 0, r.stderr
    out = sync_cli(srv, str(tmp_path / "runs" / "nonfinite" / "offline"))
    assert "synced 1 run(s)" in out.stderr, out.stderr
    check_nonfinite(srv, "nonfinite", "offline")


# -- 2. damaged parts ------------------------------------------------------------------------------------

STEPS = 30


def make_run(base: Path, project: str, run_id: str, *, keep_open: bool = False) -> Path:
    """An offline run of several history and tensor parts (``values(step)`` at every step).
    With ``keep_open``, a copy taken before finish(): a crashed run with ``.open`` parts."""
    run = gradexp.init(project, id=run_id, dir=base / "runs", part_max_bytes=1500)
    for s in range(STEPS):
        run.log(values(s))
        if s % 4 == 3:
            run.flush()
    if keep_open:
        copy = base / "crashed" / project / run_id
        shutil.copytree(run.dir, copy, ignore=shutil.ignore_patterns("run.lock"))
        run.finish()
        return copy
    run.finish()
    return run.dir


def frame_contents(path: Path, info: _format.FrameInfo) -> list[tuple[str, int]]:
    """(key, step) of every row a frame holds (key "" for history rows)."""
    raw = _format.read_frame(path, info)
    if info.kind == _format.KIND_TENSOR:
        steps, _ = _arrow.tensor_rows(raw)
        return [(info.key, int(s)) for s in steps]
    table = pa.ipc.open_stream(raw.tobytes()).read_all()
    return [("", int(s)) for s in table.column("step").to_pylist()]


def intact_rows(run_dir: Path, damaged: Path, changed: list[tuple[int, int]]) -> set[tuple[str, int]]:
    """Rows of every frame whose bytes no change touched (``changed``: byte ranges of ``damaged``)."""
    rows: set[tuple[str, int]] = set()
    for part in _format.list_parts(run_dir / "parts"):
        if not part.name.startswith(("history-", "tensors-")):  # the sender's console and system streams
            continue
        for info in _format.scan_part(part).frames:
            if part == damaged and any(a < info.end and info.offset < b for a, b in changed):
                continue
            rows.update(frame_contents(part, info))
    return rows


def check_reads_back(server: GradexpServer, project: str, run_id: str, rows: set[tuple[str, int]]) -> None:
    r = remote(server, project, run_id)
    assert r.status in ("finished", "crashed")
    h = r.history()
    got = dict(zip(h.column("step").to_pylist(), h.column("loss").to_pylist()))
    for key, step in sorted(rows):
        if key == "":
            assert got.get(step) == values(step)["loss"], step
        else:
            assert same_bits(r.tensor(key, step), values(step)[key]), (key, step)


def corrupt(path: Path, how: str) -> list[tuple[int, int]]:
    """Damage a sealed part in place; returns the byte ranges changed."""
    data = bytearray(path.read_bytes())
    size = len(data)
    scan = _format.scan_part(path)
    index_at = scan.valid_end  # the index frame's offset
    if how == "junk after the trailer":
        path.write_bytes(bytes(data) + b"junk after the trailer")
        return [(size, size + 22)]
    if how == "bit in the index":
        at = index_at + 70
    elif how == "bit in the trailer":
        at = size - 14
    elif how == "zeroed magic":
        data[:8] = bytes(8)
        path.write_bytes(bytes(data))
        return [(0, 8)]
    else:
        raise ValueError(how)
    data[at] ^= 0x08
    path.write_bytes(bytes(data))
    return [(at, at + 1)]


@pytest.mark.parametrize("how, stream", [("junk after the trailer", "tensors"), ("bit in the index", "history"),
                                         ("bit in the trailer", "tensors"), ("zeroed magic", "history")])
def test_sync_reseals_a_damaged_part_and_uploads_the_rest(srv, tmp_path, how, stream):
    """Damage outside the frames loses no row: the re-sealed part is the original, byte for byte."""
    run_id = how.replace(" ", "-")
    run_dir = make_run(tmp_path, "damaged", run_id)
    victim = _format.list_parts(run_dir / "parts", stream)[1]
    n_parts = len(_format.list_parts(run_dir / "parts"))
    before = victim.read_bytes()
    changed = corrupt(victim, how)
    damaged_bytes = victim.read_bytes()
    rows = intact_rows(run_dir, victim, changed)
    assert len(rows) == STEPS * 3  # every frame intact: history, "w" and "ids" at every step

    out = sync_cli(srv, str(run_dir))
    assert "synced 1 run(s)" in out.stderr and f"({n_parts} parts uploaded)" in out.stdout, out.stderr
    lines = [ln for ln in out.stderr.splitlines() if "was damaged" in ln]
    assert len(lines) == 1 and victim.name in lines[0] and " lost " not in lines[0], out.stderr
    assert ("skipped 22 unreadable bytes" if how == "junk after the trailer" else "nothing lost") in lines[0]
    assert (victim.parent / (victim.name + ".damaged")).read_bytes() == damaged_bytes
    assert victim.read_bytes() == before
    check_reads_back(srv, "damaged", run_id, rows)


def test_a_crashed_runs_open_part_with_damaged_payloads_is_resealed_on_recovery(srv, tmp_path):
    run_dir = make_run(tmp_path, "damaged", "open-payload", keep_open=True)
    open_parts = [p for p in _format.list_parts(run_dir / "parts") if p.name.endswith(_format.OPEN_SUFFIX)]
    assert open_parts, "the copy has no open part"
    victim = open_parts[-1]
    frames = _format.scan_part(victim).frames
    assert len(frames) >= 2
    data = bytearray(victim.read_bytes())
    at = frames[0].data_offset + frames[0].stored // 2
    data[at] ^= 0x40  # the header still parses: only the payload's checksum shows it
    victim.write_bytes(bytes(data))
    rows = intact_rows(run_dir, victim, [(at, at + 1)])

    out = sync_cli(srv, str(run_dir))
    lines = [ln for ln in out.stderr.splitlines() if "was damaged" in ln]
    assert len(lines) == 1 and victim.name in lines[0] and "lost 1 frame" in lines[0], out.stderr
    assert (victim.parent / (victim.name + ".damaged")).read_bytes() == bytes(data)
    assert not victim.exists()
    sealed = victim.with_name(victim.name[: -len(_format.OPEN_SUFFIX)])
    assert _format.sealed_problem(sealed.read_bytes(), payloads=True) is None
    r = remote(srv, "damaged", "open-payload")
    assert r.status == "crashed"
    check_reads_back(srv, "damaged", "open-payload", rows)


class StrictParts(HTTPAdapter):
    """The server's check of every frame's checksum, in front of a real server: a part whose
    frames do not all decode gets the server's 400 (whether or not that server checks)."""

    refused = 0

    def send(self, request: requests.PreparedRequest, **kw: Any) -> requests.Response:
        if request.method == "PUT" and "/parts/" in (request.url or ""):
            problem = _format.sealed_problem(bytes(request.body or b""), payloads=True)
            if problem is not None:
                StrictParts.refused += 1
                r = requests.Response()
                r.status_code, r.reason, r.url, r.request = 400, "Bad Request", request.url or "", request
                r._content = json.dumps({"error": problem}).encode()
                return r
        return super().send(request, **kw)


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    base = tmp_path_factory.mktemp("template")
    return make_run(base, "fuzz", "template")


_examples = {"n": 0}

corruptions = st.one_of(
    st.tuples(st.just("flip"), st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 7)),
                                        min_size=1, max_size=3)),
    st.tuples(st.just("overwrite"), st.tuples(st.floats(0, 1, exclude_max=True), st.binary(min_size=1, max_size=64))),
    st.tuples(st.just("truncate"), st.floats(0, 1, exclude_max=True)),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("zero magic"), st.none()),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(which=st.integers(0, 10_000), corruption=corruptions)
def test_random_corruption_of_a_part_never_stops_sync(srv, template, tmp_path_factory, which, corruption):
    """Any damage to one sealed part: sync completes, and every frame it did not touch reads
    back from the server."""
    _examples["n"] += 1
    run_id = f"fuzz{_examples['n']}"
    run_dir = tmp_path_factory.mktemp("fuzz") / "fuzz" / run_id
    shutil.copytree(template, run_dir)
    meta = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps({**meta, "id": run_id}))
    parts = _format.list_parts(run_dir / "parts")
    victim = parts[which % len(parts)]
    data = bytearray(victim.read_bytes())
    kind, arg = corruption
    if kind == "flip":
        changed = []
        for where, bit in arg:
            at = int(where * len(data))
            data[at] ^= 1 << bit
            changed.append((at, at + 1))
    elif kind == "overwrite":
        at = int(arg[0] * len(data))
        blob = arg[1][: len(data) - at]
        data[at:at + len(blob)] = blob
        changed = [(at, at + len(blob))]
    elif kind == "truncate":
        at = int(arg * len(data))
        del data[at:]
        changed = [(at, 1 << 62)]
    elif kind == "append":
        data += arg
        changed = [(len(data) - len(arg), len(data))]
    else:
        data[:8] = bytes(8)
        changed = [(0, 8)]
    rows = intact_rows(run_dir, victim, changed)
    victim.write_bytes(bytes(data))

    client = Client(srv.url, srv.key, transport=StrictParts())
    lines: list[str] = []
    n, did = _service.sync(run_dir, client, USER, report=lines.append)
    assert did and n == len(parts)
    assert len(lines) <= 1, lines
    if lines:
        assert victim.name in lines[0] and (victim.parent / (victim.name + ".damaged")).exists()
    check_reads_back(srv, "fuzz", run_id, rows)


# -- 3. uploaded.log per server ----------------------------------------------------------------------------

def test_a_folder_synced_to_one_server_uploads_in_full_to_another(srv, tmp_path):
    other = make_server(tmp_path / "b").start()
    try:
        run_dir = make_run(tmp_path, "two", "servers")
        parts = _format.list_parts(run_dir / "parts")
        # Partly to A first (an interrupted sync), then all of it to B, then the rest to A.
        up = _service.Uploader(run_dir, Client(srv.url, srv.key), USER)
        up.put_run()
        for part in up.pending()[:2]:
            up.upload(part)
        out = sync_cli(other, str(run_dir))
        assert f"({len(parts)} parts uploaded)" in out.stdout, out.stdout + out.stderr
        b = gradexp.Api(host=other.url, api_key=other.key).run(f"{USER}/two/servers")
        assert b.status == "finished" and b.history().num_rows == STEPS
        out = sync_cli(srv, str(run_dir))
        assert f"({len(parts) - 2} parts uploaded)" in out.stdout, out.stdout + out.stderr
        a = remote(srv, "two", "servers")
        assert a.status == "finished" and a.history().num_rows == STEPS
        assert "synced 0 run(s)" in sync_cli(other, str(run_dir)).stderr
        # An uploaded.log from before records named their server counts for none: the
        # folder goes up again, and a server that has it all takes that as a no-op.
        log = run_dir / _service.UPLOADED_LOG
        old_lines = [ln.split()[0] if ln.startswith("#") else " ".join(ln.split()[:2])
                     for ln in log.read_text().splitlines()]
        log.write_text("".join(ln + "\n" for ln in old_lines))
        out = sync_cli(srv, str(run_dir))
        assert f"({len(parts)} parts uploaded)" in out.stdout, out.stdout + out.stderr
        a = remote(srv, "two", "servers")
        assert a.status == "finished" and a.history().num_rows == STEPS and sum(a.meta["parts"].values()) == len(parts)
    finally:
        other.stop()


# -- 13. remote reads give up -------------------------------------------------------------------------------

def test_a_remote_read_that_keeps_failing_raises_a_clear_error(srv, tmp_path):
    run_dir = make_run(tmp_path, "reads", "broken")
    sync_cli(srv, str(run_dir))
    r = remote(srv, "reads", "broken")
    assert same_bits(r.tensor("w", 5), values(5)["w"])
    # Damage the stored copy of every tensor part (behind the server's back): reads answer 500.
    objects = srv.workdir / "srv" / "objects"
    for part in _format.list_parts(run_dir / "parts", "tensors"):
        body = part.read_bytes()
        frames = _format.scan_part(part).frames
        for stored in (p for p in objects.rglob("*") if p.is_file() and p.read_bytes() == body):
            data = bytearray(body)
            for info in frames:
                data[info.data_offset + info.stored // 2] ^= 0x20
            stored.write_bytes(bytes(data))
    box: dict[str, Any] = {}

    def read() -> None:
        try:
            box["value"] = r.steps("w")
        except Exception as e:
            box["error"] = e
    t = threading.Thread(target=read, daemon=True)
    t0 = time.monotonic()
    t.start()
    t.join(120)
    assert not t.is_alive(), "the read is still retrying after 120 s"
    e = box.get("error")
    assert isinstance(e, ApiError) and e.status == 500, box
    assert f"run {USER}/reads/broken" in str(e) and "'w'" in str(e), str(e)
    assert time.monotonic() - t0 < 60


# -- 14. a failed sender says why at finish() -----------------------------------------------------------------

FAIL_SRC = '''
import sys, time
import gradexp

run = gradexp.init("fails", id=sys.argv[1], dir=sys.argv[2], finish_timeout=120)
run.log({"loss": 1.0})
print("ready", flush=True)
sys.stdin.readline()
t0 = time.monotonic()
run.finish()
print(f"finish took {time.monotonic() - t0:.1f}", flush=True)
'''


def test_a_revoked_key_makes_finish_say_so_and_what_to_do(srv, tmp_path):
    key = srv.create_key(USER)
    env = clean_env(GRADEXP_HOST=srv.url, GRADEXP_API_KEY=key)
    p = subprocess.Popen(
        [sys.executable, "-c", FAIL_SRC, "revoked", str(tmp_path / "runs")], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    run_dir = tmp_path / "runs" / "fails" / "revoked"
    wait_for(lambda: (run_dir / "uploaded.log").exists(), "the first upload", timeout=60)
    key_id = max(int(ln.split()[0]) for ln in srv.cli("list-keys", USER).splitlines() if ln.split()[:1] != ["ID"])
    srv.cli("revoke-key", str(key_id))
    out, err = p.communicate("go\n", timeout=180)
    assert p.returncode == 0, err
    assert "did not finish within" not in err, err
    assert "refused the API key" in err and "gradexp login" in err and f"gradexp sync {run_dir}" in err, err


def test_a_trainer_crash_leaves_no_traceback_in_sender_log(srv, tmp_path):
    t = Trainer(tmp_path, "crash", steps=5, stops=(4,), env=clean_env(GRADEXP_HOST=srv.url, GRADEXP_API_KEY=srv.key))
    t.wait_step(4)
    t.kill()
    wait_for(lambda: remote(srv, "stream", "crash").status == "crashed", "the run marked crashed", timeout=60,
             interval=0.2)
    log = t.run_dir / "sender.log"
    wait_for(lambda: all(not (pid and Path(f"/proc/{pid}").exists()) for pid in t.helpers),
             "the sender's exit", timeout=30)
    text = log.read_text()
    assert "Traceback" not in text and "BrokenPipeError" not in text, text
    assert "marked the run crashed" in text, text


def test_a_sender_that_fails_on_its_own_says_why_at_finish(srv, tmp_path):
    """Not a server's answer but a failure in the sender itself (here: a "part" that is a
    folder): finish() says what failed and where the traceback is, not a timeout."""
    env = clean_env(GRADEXP_HOST=srv.url, GRADEXP_API_KEY=srv.key)
    p = subprocess.Popen([sys.executable, "-c", FAIL_SRC, "broken-sender", str(tmp_path / "runs")],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    run_dir = tmp_path / "runs" / "fails" / "broken-sender"
    (run_dir / "parts" / "history-000099.gxp").mkdir()
    out, err = p.communicate("go\n", timeout=180)
    assert p.returncode == 0, err
    assert "did not finish within" not in err, err
    assert "the sender failed: IsADirectoryError" in err and f"{run_dir}/sender.log" in err, err
    assert f"gradexp sync {run_dir}" in err, err
    assert "Traceback" in (run_dir / "sender.log").read_text()
