"""The server's HTTP API, exercised with plain requests against a real server process.

One server (SQLite + a local store, a 1 MiB body limit) serves the whole module; every
test uses its own run ids. The parts uploaded are real sealed parts written by an
offline run, so the server parses exactly what a client would send.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests

import gradexp
from services import HOST, GradexpServer, check_history, same_bits, values

LIMIT = 1 << 20
STEPS = 40


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    work = tmp_path_factory.mktemp("api")
    home = work / "srv"
    home.mkdir()
    server = GradexpServer(work, db_url=f"sqlite:///{home / 'gradexp.db'}", store_url=str(home / "store" / "objects"),
                           max_body=LIMIT)
    server.keys = {name: server.user_with_key(name) for name in ("alice", "bob")}
    server.home = home
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """A finished offline run with several history and tensors parts: {part name: bytes}."""
    d = tmp_path_factory.mktemp("offline")
    run = gradexp.init("src", id="src", dir=d, part_max_bytes=2048, part_max_age=600)
    for step in range(STEPS):
        run.log(values(step))
        if step % 10 == 9:
            run.flush()  # size-based sealing happens at a flush: several parts per stream
    run.finish()
    parts = {p.name: p.read_bytes() for p in sorted((run.dir / "parts").glob("*.gxp"))}
    assert sum(n.startswith("history-") for n in parts) >= 2 and sum(n.startswith("tensors-") for n in parts) >= 2
    return {"dir": run.dir, "parts": parts}


class Client:
    def __init__(self, srv: GradexpServer, user: str | None) -> None:
        self.base = srv.url + "/api/v1"
        self.user = user
        self.s = requests.Session()
        if user is not None:
            self.s.headers["Authorization"] = f"Bearer {srv.keys[user]}"

    def __call__(self, method: str, path: str, **kw) -> requests.Response:
        kw.setdefault("timeout", 30)
        return self.s.request(method, self.base + path, **kw)

    def put_part(self, run: str, name: str, data: bytes, *, sha: str | None = None) -> requests.Response:
        stream, _, seq = name[: -len(".gxp")].rpartition("-")
        return self("PUT", f"{run}/parts/{stream}/{int(seq)}", data=data, headers={
            "Content-Type": "application/octet-stream",
            "X-Gradexp-SHA256": sha if sha is not None else hashlib.sha256(data).hexdigest()})


@pytest.fixture(scope="module")
def alice(srv):
    return Client(srv, "alice")


@pytest.fixture(scope="module")
def bob(srv):
    return Client(srv, "bob")


def new_run(client: Client, project: str, run_id: str, **fields) -> str:
    path = f"/runs/{client.user}/{project}/{run_id}"
    r = client("PUT", path, json=fields)
    assert r.status_code == 200, r.text
    return path


def store_files(srv: GradexpServer) -> list[Path]:
    return sorted(p for p in (srv.home / "store").rglob("*") if p.is_file())


# -- authentication ------------------------------------------------------------------------------

def test_requests_without_a_valid_key_get_401(srv, alice, offline):
    anon = Client(srv, None)
    path = new_run(alice, "auth", "r1")
    before = store_files(srv)
    for headers in ({}, {"Authorization": "Bearer gx_not-a-key"}, {"Authorization": "Bearer "},
                    {"Authorization": f"Basic {srv.keys['alice']}"}, {"Authorization": srv.keys["alice"]}):
        for method, p, kw in (("GET", "/viewer", {}), ("GET", "/runs", {}), ("GET", path, {}),
                              ("PUT", path + "/parts/history/0", {"data": offline["parts"]["history-000000.gxp"]}),
                              ("POST", path + "/finish", {"json": {}})):
            r = anon(method, p, headers=headers, **kw)
            assert r.status_code == 401, (method, p, headers, r.status_code, r.text)
            assert "error" in r.json()
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert store_files(srv) == before  # nothing was stored by the refused upload
    assert alice("GET", path).json()["parts"] == {}
    r = alice("GET", "/viewer")
    assert r.status_code == 200 and r.json() == {"user": "alice", "entity": "alice"}


# -- part uploads --------------------------------------------------------------------------------

def test_part_upload_is_idempotent_and_conflicts_are_409(srv, alice, offline):
    path = new_run(alice, "parts", "idem")
    parts = offline["parts"]
    h0, h1 = parts["history-000000.gxp"], parts["history-000001.gxp"]
    r = alice.put_part(path, "history-000000.gxp", h0)
    assert r.status_code == 201, r.text
    assert r.json() == {"stored": True, "sha256": hashlib.sha256(h0).hexdigest()}
    objects = [p for p in store_files(srv) if "/idem/" in p.as_posix()]
    assert len(objects) == 1 and objects[0].read_bytes() == h0

    for _ in range(2):  # the same bytes again (a retry after a lost answer): a no-op 200
        r = alice.put_part(path, "history-000000.gxp", h0)
        assert r.status_code == 200, r.text
        assert r.json() == {"stored": False, "sha256": hashlib.sha256(h0).hexdigest()}

    r = alice.put_part(path, "history-000000.gxp", h1)  # other (valid) content at the same seq
    assert r.status_code == 409, r.text
    assert "other content" in r.json()["error"]
    assert objects[0].read_bytes() == h0  # the stored object was not replaced
    assert [p for p in store_files(srv) if "/idem/" in p.as_posix()] == objects
    assert alice("GET", path).json()["parts"] == {"history": 1}
    got = pa.ipc.open_stream(alice("GET", path + "/history").content).read_all()
    assert got.num_rows > 0 and got.column("step").to_pylist() == list(range(got.num_rows))


def test_bodies_that_are_not_sealed_parts_get_400(srv, alice, offline):
    path = new_run(alice, "parts", "bad")
    good = offline["parts"]["history-000000.gxp"]
    rng = np.random.default_rng(0)
    cases = {
        "random bytes": rng.integers(0, 256, 5000, dtype=np.uint8).tobytes(),
        "empty": b"",
        "truncated": good[:-17],
        "one byte flipped": good[:100] + bytes([good[100] ^ 0xFF]) + good[101:],
        "json": b'{"loss": 1}',
    }
    for what, body in cases.items():
        r = alice.put_part(path, "history-000000.gxp", body)
        assert r.status_code == 400, (what, r.status_code, r.text)
        assert r.json()["error"], what
    # A valid part whose digest header does not match (corrupted in transit).
    r = alice.put_part(path, "history-000000.gxp", good, sha=hashlib.sha256(b"other").hexdigest())
    assert r.status_code == 400 and "X-Gradexp-SHA256" in r.json()["error"]
    r = alice("PUT", path + "/parts/metrics/0", data=good)  # not a stream
    assert r.status_code == 400 and "stream" in r.json()["error"]
    assert alice("PUT", path + "/parts/history/-1", data=good).status_code == 404
    assert alice("GET", path).json()["parts"] == {}
    assert not [p for p in store_files(srv) if "/bad/" in p.as_posix()]
    # The same part, intact, still goes in.
    assert alice.put_part(path, "history-000000.gxp", good).status_code == 201


def test_bodies_over_the_limit_get_413(srv, alice, offline):
    path = new_run(alice, "parts", "big")
    big = os.urandom(LIMIT + 1)
    r = alice.put_part(path, "history-000000.gxp", big)  # declared length over the limit
    assert r.status_code == 413, r.text
    assert str(LIMIT) in r.json()["error"]

    def chunks():  # no Content-Length: counted while it streams in
        for _ in range(5):
            yield os.urandom(LIMIT // 4)
    r = alice("PUT", path + "/parts/history/0", data=chunks(), headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 413, r.text
    r = alice("PATCH", path, data=json.dumps({"notes": "x" * (LIMIT + 10)}),
              headers={"Content-Type": "application/json"})
    assert r.status_code == 413, r.text
    assert alice("GET", path).json()["parts"] == {}
    assert alice("GET", path).json()["notes"] is None
    # A body just under the limit is read (and here rejected for what it is, not its size).
    r = alice.put_part(path, "history-000000.gxp", os.urandom(LIMIT - 1))
    assert r.status_code == 400, r.text


# -- isolation between users ---------------------------------------------------------------------

def test_a_user_cannot_read_or_write_another_users_run(srv, alice, bob, offline):
    path = new_run(alice, "private", "mine", config={"secret": 1}, tags=["t"])
    part = offline["parts"]["history-000000.gxp"]
    assert alice.put_part(path, "history-000000.gxp", part).status_code == 201
    before = alice("GET", path).json()
    attempts = [
        ("GET", path, {}), ("GET", path + "/history", {}), ("GET", path + "/history?format=json", {}),
        ("GET", path + "/tensors", {}), ("GET", path + "/tensors/w/steps", {}), ("GET", path + "/tensors/w?step=0", {}),
        ("PUT", path, {"json": {"name": "hijacked"}}), ("PATCH", path, {"json": {"config": {"secret": 2}}}),
        ("PUT", path + "/parts/history/1", {"data": offline["parts"]["history-000001.gxp"]}),
        ("PUT", path + "/parts/history/0", {"data": part}),
        ("POST", path + "/finish", {"json": {"exit_code": 0, "parts": {}}}),
    ]
    for method, p, kw in attempts:
        r = bob(method, p, **kw)
        assert r.status_code == 404, (method, p, r.status_code, r.text)
        assert "secret" not in r.text
    # Bob's own namespace has no such run, and his listings do not show Alice's.
    assert bob("GET", "/runs/bob/private/mine").status_code == 404
    bobs = bob("GET", "/runs").json()["runs"]
    assert all(r["entity"] == "bob" for r in bobs) and "mine" not in [r["id"] for r in bobs]
    assert "private" not in [p["name"] for p in bob("GET", "/projects").json()["projects"]]
    after = alice("GET", path).json()
    assert after == before  # not even a heartbeat
    assert after["name"] is None and after["config"] == {"secret": 1} and after["parts"] == {"history": 1}


# -- hostile ids ---------------------------------------------------------------------------------

def raw_request(srv: GradexpServer, method: str, target: str, body: bytes = b"",
                key: str | None = None) -> tuple[int, bytes]:
    """Send ``target`` as is (no client-side normalisation of '..' or escapes)."""
    conn = http.client.HTTPConnection(HOST, srv.port, timeout=30)
    try:
        conn.putrequest(method, target, skip_accept_encoding=True)
        conn.putheader("Authorization", f"Bearer {key or srv.keys['alice']}")
        conn.putheader("Content-Length", str(len(body)))
        conn.putheader("Content-Type", "application/octet-stream")
        conn.endheaders()
        if body:
            conn.send(body)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def test_path_traversal_ids_are_rejected_and_nothing_escapes_the_store(srv, alice, offline):
    new_run(alice, "trav", "ok")
    part = offline["parts"]["history-000000.gxp"]
    long = "a" * 129
    bad_segments = ["..", ".", "%2E%2E", "%2e%2e", "..%2F..", "..%2F..%2F..%2Fescaped", "a%2Fb", "%2Fescaped",
                    "..%5C..%5Cescaped", "-leading-dash", ".hidden", "a%00b", "a%20b", "%C3%A9", long, "b" * 5000,
                    "..%252F..", "~root", "ok%0A", "trav%0A", "alice%0A", "ok%0D%0A"]
    seen = []
    for seg in bad_segments:
        for target in (f"/api/v1/runs/alice/trav/{seg}", f"/api/v1/runs/alice/{seg}/ok",
                       f"/api/v1/runs/{seg}/trav/ok"):
            for method, suffix, body in (("PUT", "/parts/history/0", part), ("PUT", "", b"{}"),
                                         ("GET", "/history", b""), ("GET", "", b"")):
                status, text = raw_request(srv, method, target + suffix, body)
                seen.append(status)
                assert status in (400, 404), (method, target + suffix, status, text[:200])
    assert 400 in seen  # the id check answered, not only the router
    # Literal '..' path segments, unescaped.
    for target in ("/api/v1/runs/alice/../../../escaped/parts/history/0",
                   "/api/v1/runs/alice/trav/../ok/parts/history/0", "/api/v1/runs/../alice/trav/ok/parts/history/0"):
        status, text = raw_request(srv, "PUT", target, part)
        assert status in (400, 404), (target, status, text[:200])

    # Nothing was written for any of them: only the untouched run 'ok' exists in project trav.
    runs = alice("GET", "/runs", params={"project": "trav"}).json()["runs"]
    assert [r["id"] for r in runs] == ["ok"] and alice("GET", "/runs/alice/trav/ok").json()["parts"] == {}
    names = {p["name"] for p in alice("GET", "/projects").json()["projects"]}
    assert not any(n.startswith((".", "%")) or "/" in n or n == long for n in names), names
    # Every object lives under <store>/runs/<entity id>/<project id>/<valid run id>/...
    root = srv.home / "store" / "objects"
    for p in store_files(srv):
        rel = p.relative_to(root).parts
        assert rel[0] == "runs" and rel[1].isdigit() and rel[2].isdigit(), p
        assert rel[3][0].isalnum() and len(rel[3]) <= 128 and rel[4] in ("parts", "history.parquet",
                                                                          "history-segments"), p
    # And nothing at all appeared beside the server's folder.
    outside = sorted(p.name for p in srv.home.parent.rglob("*") if not p.is_relative_to(srv.home)
                     and p.name.startswith("escaped"))
    assert outside == []
    assert {p.name for p in srv.home.iterdir()} <= {"gradexp.db", "gradexp.db-shm", "gradexp.db-wal",
                                                    "gradexp.db.migrate-lock", "store"}
    assert [p.name for p in (srv.home / "store").iterdir()] == ["objects"]


# -- finish --------------------------------------------------------------------------------------

def test_finish_with_missing_declared_parts_is_409(srv, alice, offline):
    path = new_run(alice, "fin", "finr")
    parts = offline["parts"]
    assert alice.put_part(path, "history-000000.gxp", parts["history-000000.gxp"]).status_code == 201
    assert alice.put_part(path, "tensors-000000.gxp", parts["tensors-000000.gxp"]).status_code == 201
    r = alice("POST", path + "/finish", json={"exit_code": 0, "parts": {"history": 2, "tensors": 1}})
    assert r.status_code == 409, r.text
    assert "parts missing" in r.json()["error"] and "'history': 1" in r.json()["error"]
    run = alice("GET", path).json()
    assert run["status"] == "running" and run["finished_at"] is None
    run_objects = [p for p in store_files(srv) if "/finr/" in p.as_posix()]
    assert len(run_objects) == 2 and all("/finr/parts/" in p.as_posix() for p in run_objects)  # no Parquet yet
    for bad in ({"exit_code": "zero"}, {"parts": [1]}, {"status": "exploded"}):
        r = alice("POST", path + "/finish", json=bad)
        assert r.status_code == 400, (bad, r.text)
    assert alice("POST", path + "/finish", data=b"not json").status_code == 400
    assert alice("POST", "/runs/alice/fin/nope/finish", json={}).status_code == 404

    assert alice.put_part(path, "history-000001.gxp", parts["history-000001.gxp"]).status_code == 201
    r = alice("POST", path + "/finish", json={"exit_code": 3, "parts": {"history": 2, "tensors": 1}})
    assert r.status_code == 200, r.text
    run = r.json()
    assert run["status"] == "failed" and run["exit_code"] == 3 and run["finished_at"] is not None


# -- reading ---------------------------------------------------------------------------------------

def upload_all(client: Client, path: str, parts: dict[str, bytes]) -> None:
    for name, data in parts.items():
        r = client.put_part(path, name, data)
        assert r.status_code == 201, (name, r.text)


def test_history_formats_arrow_json_parquet(srv, alice, offline):
    path = new_run(alice, "fmt", "fmtrun", config={"lr": 0.1})
    upload_all(alice, path, offline["parts"])
    local = gradexp.Api().run(offline["dir"]).history()
    check_history(local, range(STEPS))

    def fetch(fmt: str, **params) -> requests.Response:
        r = alice("GET", path + "/history", params={"format": fmt, **params})
        assert r.status_code == 200, r.text
        return r

    for finished in (False, True):
        if finished:
            counts = alice("GET", path).json()["parts"]
            r = alice("POST", path + "/finish", json={"exit_code": 0, "parts": counts})
            assert r.status_code == 200 and r.json()["status"] == "finished"
            assert [p for p in store_files(srv) if p.as_posix().endswith("/fmtrun/history.parquet")]
        r = fetch("arrow")
        assert r.headers["content-type"] == "application/vnd.apache.arrow.stream"
        arrow = pa.ipc.open_stream(r.content).read_all()
        check_history(arrow, range(STEPS))
        assert arrow.select(["step", "loss", "acc", "epoch"]).equals(local.select(["step", "loss", "acc", "epoch"]))
        assert arrow.column("w").to_pylist() == local.column("w").to_pylist()  # tensor summaries

        r = fetch("parquet")
        assert r.headers["content-type"] == "application/vnd.apache.parquet"
        assert 'filename="fmt-fmtrun.parquet"' in r.headers["content-disposition"]
        parquet = pq.read_table(io.BytesIO(r.content))
        check_history(parquet, range(STEPS))
        assert parquet.column("_timestamp").to_pylist() == local.column("_timestamp").to_pylist()

        r = fetch("json")
        cols = r.json()["columns"]
        assert cols["step"] == list(range(STEPS))
        assert cols["loss"] == [values(s)["loss"] for s in range(STEPS)]
        assert cols["epoch"] == [values(s)["epoch"] for s in range(STEPS)]
        assert cols["w"][5]["max"] == pytest.approx(float(values(5)["w"].max()))

        sel = pa.ipc.open_stream(fetch("arrow", keys="loss").content).read_all()
        assert sel.column_names == ["step", "_timestamp", "_runtime", "loss"]
        r = alice("GET", path + "/history", params={"keys": "loss,nope"})
        assert r.status_code == 404 and "nope" in r.json()["error"]
        r = alice("GET", path + "/history", params={"format": "xml"})
        assert r.status_code == 400 and "xml" in r.json()["error"]

        # Tensors through the same API, bit-exact, via the client library.
        remote = gradexp.Api(host=srv.url, api_key=srv.keys["alice"]).run("alice/fmt/fmtrun")
        assert remote.tensor_keys() == ["ids", "w"]
        assert remote.steps("w") == list(range(STEPS))
        for s in (0, 17, STEPS - 1):
            assert same_bits(remote.tensor("w", s), values(s)["w"])
            assert same_bits(remote.tensor("ids", s), values(s)["ids"])
        with pytest.raises(KeyError):
            remote.tensor("w", STEPS)
        assert remote.config == {"lr": 0.1}


def test_openapi_document(srv):
    r = requests.get(srv.url + "/api/v1/openapi.json", timeout=30)  # no key needed
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    doc = json.loads(r.content)
    assert doc["openapi"].startswith("3.") and doc["info"]["version"] == gradexp.__version__
    run = "/api/v1/runs/{entity}/{project}/{run_id}"
    expected = {"/healthz": {"get"}, "/api/v1/viewer": {"get"}, "/api/v1/projects": {"get"}, "/api/v1/runs": {"get"},
                run: {"put", "get", "patch"}, run + "/parts/{stream}/{seq}": {"put"}, run + "/finish": {"post"},
                run + "/history": {"get"}, run + "/tensors": {"get"}, run + "/tensors/{key}/steps": {"get"},
                run + "/tensors/{key}/rows": {"get"}, run + "/tensors/{key}": {"get"},
                "/api/v1/oauth/token": {"post"}, run + "/record": {"get", "put"}, run + "/streams/{stream}": {"get"}}
    assert {p: set(ops) for p, ops in doc["paths"].items()} == expected
    for p, ops in doc["paths"].items():
        for op in ops.values():
            assert "200" in op["responses"], p
            declared = {x["name"] for x in op["parameters"] if x["in"] == "path"}
            assert declared == {seg[1:-1] for seg in p.split("/") if seg.startswith("{")}, p
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    # Every documented path answers (401 without a key, 400 for a token request without a
    # code; not 404 for an unknown route).
    for p in expected:
        concrete = (p.replace("{entity}", "alice").replace("{project}", "p").replace("{run_id}", "r")
                    .replace("{stream}", "history").replace("{seq}", "0").replace("{key}", "w"))
        method = sorted(expected[p])[0].upper()
        status = requests.request(method, srv.url + concrete, timeout=30).status_code
        assert status in ((400,) if "oauth" in p else (200, 401)), (p, status)


def test_list_runs_filters_by_project_status_and_tag(srv, alice, bob):
    made = {("filt-a", "a1"): ["x"], ("filt-a", "a2"): ["x", "y"], ("filt-a", "a3"): [],
            ("filt-b", "b1"): ["x", "y"], ("filt-b", "b2"): ["y"]}
    for (project, run_id), tags in made.items():
        new_run(alice, project, run_id, tags=tags, name=f"name-{run_id}")
    for run_id, project, status in (("a2", "filt-a", "finished"), ("b1", "filt-b", "failed"),
                                    ("b2", "filt-b", "finished")):
        r = alice("POST", f"/runs/alice/{project}/{run_id}/finish",
                  json={"exit_code": 0 if status == "finished" else 1, "parts": {}})
        assert r.status_code == 200 and r.json()["status"] == status
    new_run(bob, "filt-a", "bob1", tags=["x"])

    def ids(**params) -> set[str]:
        r = alice("GET", "/runs", params=params)
        assert r.status_code == 200, r.text
        runs = r.json()["runs"]
        assert all(x["entity"] == "alice" for x in runs)
        return {x["id"] for x in runs if x["project"].startswith("filt-")}

    assert ids(project="filt-a") == {"a1", "a2", "a3"}
    assert ids(project="filt-b") == {"b1", "b2"}
    assert ids(project="filt-c") == set()
    assert ids(status="finished") == {"a2", "b2"}
    assert ids(status="failed") == {"b1"}
    assert ids(status="running", project="filt-a") == {"a1", "a3"}
    assert ids(tag="x") == {"a1", "a2", "b1"}
    assert ids(tag=["x", "y"]) == {"a2", "b1"}
    assert ids(tag="y", status="finished") == {"a2", "b2"}
    assert ids(tag="y", status="finished", project="filt-b") == {"b2"}
    assert ids(tag="x", project="filt-b", status="failed") == {"b1"}
    assert ids(tag="nope") == set()
    one = alice("GET", "/runs", params={"project": "filt-a", "tag": "y"}).json()["runs"]
    assert len(one) == 1 and one[0]["name"] == "name-a2" and one[0]["tags"] == ["x", "y"]
    created = [r["created_at"] for r in alice("GET", "/runs", params={"project": "filt-a"}).json()["runs"]]
    assert created == sorted(created, reverse=True)  # newest first
    bob_runs = bob("GET", "/runs", params={"project": "filt-a"}).json()["runs"]
    assert [r["id"] for r in bob_runs] == ["bob1"]
    projects = {p["name"]: p["runs"] for p in alice("GET", "/projects").json()["projects"]}
    assert projects["filt-a"] == 3 and projects["filt-b"] == 2


def test_history_of_many_small_parts_is_compacted_without_losing_a_late_part(srv, alice, tmp_path):
    """Live history arrives as many small parts; reads compact them into Parquet segments.
    A part uploaded out of order (after later ones were compacted around it) still counts."""
    from gradexp.server.history import COMPACT_AT

    n = COMPACT_AT + 12
    run = gradexp.init("src", id="many", dir=tmp_path, part_max_bytes=1, part_max_age=600)
    for s in range(n):
        run.log({k: v for k, v in values(s).items() if k in ("loss", "acc", "epoch")})
        run.flush()  # every flush seals a part: one step per part
    run.finish()
    parts = {p.name: p.read_bytes() for p in sorted((run.dir / "parts").glob("history-*.gxp"))}
    names = list(parts)
    assert len(names) == n
    path = new_run(alice, "compact", "many")
    late = names[5]

    def history() -> pa.Table:
        r = alice("GET", path + "/history")
        assert r.status_code == 200, r.text
        return pa.ipc.open_stream(r.content).read_all()

    def segments() -> list[str]:
        return sorted(p.name for p in store_files(srv) if "/many/history-segments/" in p.as_posix())

    for name in names[: COMPACT_AT + 4]:
        if name != late:
            assert alice.put_part(path, name, parts[name]).status_code == 201
    check_history(history(), [s for s in range(COMPACT_AT + 4) if s != 5])
    assert segments() == []  # nothing compacted across the gap
    assert alice.put_part(path, late, parts[late]).status_code == 201
    check_history(history(), range(COMPACT_AT + 4))
    assert segments() == [f"000000-{COMPACT_AT + 3:06d}.parquet"]
    check_history(history(), range(COMPACT_AT + 4))  # read from the segment now
    for name in names[COMPACT_AT + 4:]:
        assert alice.put_part(path, name, parts[name]).status_code == 201
    check_history(history(), range(n))
    r = alice("POST", path + "/finish", json={"exit_code": 0, "parts": {"history": n}})
    assert r.status_code == 200, r.text
    check_history(history(), range(n))
    final = [p for p in store_files(srv) if p.as_posix().endswith("/many/history.parquet")]
    assert len(final) == 1
    check_history(pq.read_table(final[0]), range(n))


AWKWARD_KEYS = ["opt/steps", "x/steps/steps", "a b", "p%2Fq", "q?x=1#f", "../up", "..", "./x", "a/./b",
                "ünï/cödé", "+&=;,"]


def test_tensor_keys_with_url_syntax_in_them_read_back(srv, alice, tmp_path):
    """Keys are free text: '/steps' suffixes, dot segments, '%', '?', '#' all reach the right tensor."""
    with gradexp.init("src", id="keys", dir=tmp_path) as run:
        for s in range(3):
            run.log({k: np.full((2, 2), s * 100 + i, np.int16) for i, k in enumerate(AWKWARD_KEYS)})
    path = new_run(alice, "keys", "awk")
    upload_all(alice, path, {p.name: p.read_bytes() for p in sorted((run.dir / "parts").glob("*.gxp"))})
    r = gradexp.Api(host=srv.url, api_key=srv.keys["alice"]).run("alice/keys/awk")
    assert sorted(r.tensor_keys()) == sorted(AWKWARD_KEYS)
    for i, k in enumerate(AWKWARD_KEYS):
        assert r.steps(k) == [0, 1, 2], k
        for s in range(3):
            assert same_bits(r.tensor(k, s), np.full((2, 2), s * 100 + i, np.int16)), (k, s)
    with pytest.raises(KeyError):
        r.tensor("opt", 0)
    with pytest.raises(KeyError):
        r.steps("up")
