"""Part uploads and their storage: races between conflicting uploads, streamed bodies,
frame checksums and key limits on upload, and the server's access log.

Servers are real processes (tests/services.py); parts are built with the format's own
writer, so each test controls exactly which bytes go up.
"""

from __future__ import annotations

import hashlib
import re
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
import requests
import sqlalchemy as sa

import gradexp
from gradexp.core import arrow as _arrow
from gradexp.core import format as _format
from gradexp.server import db
from gradexp.server.store import Store
from services import HOST, GradexpServer, same_bits, two_servers, wait_for


def build_part(folder: Path, frames: list[tuple[str, list[int], np.ndarray]]) -> bytes:
    """A sealed tensors part holding one frame per (key, steps, stacked rows), as the client
    writes them (no byte-shuffle, so a test can reach into a payload at a known place)."""
    folder.mkdir(parents=True, exist_ok=True)
    seq = len(list(folder.iterdir()))
    w = _format.PartWriter(folder, "tensors", seq)
    for key, steps, stacked in frames:
        raw = _arrow.tensor_ipc(key, steps, stacked, stacked.dtype, stacked.shape[1:])
        header, payload = _format.encode_frame(_format.KIND_TENSOR, raw, key=key, step_min=min(steps),
                                               step_max=max(steps), rows=len(steps))
        w.append(_format.KIND_TENSOR, header, payload, step_min=min(steps), step_max=max(steps), rows=len(steps),
                 key=key, raw=len(raw), filt=_format.FILTER_NONE, elem=1)
    return w.seal().read_bytes()


def session(key: str) -> requests.Session:
    s = requests.Session()
    s.headers["Authorization"] = f"Bearer {key}"
    return s


def put_part(s: requests.Session, base: str, stream: str, seq: int, data: bytes) -> requests.Response:
    return s.put(f"{base}/parts/{stream}/{seq}", data=data, timeout=120,
                 headers={"X-Gradexp-SHA256": hashlib.sha256(data).hexdigest()})


def read_tensor(http: requests.Session, base: str, key: str, step: int) -> np.ndarray:
    """One tensor read over plain HTTP (once: the client would retry a 500 for good)."""
    r = http.get(f"{base}/tensors/{key}", params={"step": step}, timeout=60)
    assert r.status_code == 200, f"{r.status_code}: {r.text[:200]}"
    frame = r.content
    info = _format.parse_header(frame, 0, len(frame))
    assert info is not None and info.key == key, "not the frame asked for"
    steps, arrays = _arrow.tensor_rows(_format.decode_payload(info, memoryview(frame)[info.header_len:]))
    return arrays[list(steps).index(step)]


# -- the object store itself ---------------------------------------------------------------------

def test_concurrent_puts_of_one_key_in_threads_each_write_a_whole_object(tmp_path):
    """Writers of one key in one process (threads) must not share a temporary file: each
    put succeeds and the object ends as exactly one writer's bytes."""
    store = Store(str(tmp_path / "objects"))
    key = "runs/1/1/r/history-segments/000000-000031.parquet"
    bodies = [bytes([i]) * (3 << 20) for i in range(8)]
    for _ in range(5):
        barrier = threading.Barrier(len(bodies))
        errors: list[BaseException] = []

        def put(body: bytes) -> None:
            try:
                barrier.wait(30)
                store.put(key, body)
            except BaseException as e:  # reported below
                errors.append(e)

        threads = [threading.Thread(target=put, args=(b,)) for b in bodies]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        assert store.get(key) in bodies
    assert [p.name for p in (tmp_path / "objects" / key).parent.iterdir()] == [key.rpartition("/")[2]]


# -- conflicting uploads racing -------------------------------------------------------------------

VARIANTS = 4
SEQS = 10


def variant_parts(folder: Path) -> dict[tuple[int, int], bytes]:
    """(variant, seq) -> a part holding tensor "w" (its own frame, read without decoding) at
    step ``seq`` and "b" (two rows, decoded on read) at steps ``seq`` and ``seq + 1000``,
    filled with a value unique to (variant, seq)."""
    out = {}
    for v in range(VARIANTS):
        for s in range(SEQS):
            mark = v * 1000 + s
            w = np.full((1, 70_000), mark, np.float32)
            b = np.full((2, 5), mark, np.int64)
            out[(v, s)] = build_part(folder / f"v{v}", [("w", [s], w), ("b", [s, s + 1000], b)])
    return out


@pytest.fixture(params=["sqlite+folder", "postgresql+folder", "postgresql+s3"])
def shared(request, tmp_path):
    """(db URL, store URL): one database and one store for two servers."""
    database, store = request.param.split("+")
    if database == "sqlite":
        db_url = f"sqlite:///{tmp_path / 'gradexp.db'}"
    else:
        db_url = request.getfixturevalue("postgres").new_database()
    store_url = str(tmp_path / "objects") if store == "folder" else request.getfixturevalue("s3").new_store()[1]
    return db_url, store_url


def test_conflicting_concurrent_uploads_leave_exactly_the_winners_bytes(shared, tmp_path):
    """Different bytes PUT at once to one (run, stream, seq), through two server processes on
    one database and one store, from several threads: one upload wins (201), the others get
    409, and every read afterwards returns the winner's values, through either server."""
    db_url, store_url = shared
    with two_servers(tmp_path, db_url, store_url) as (a, b, key):
        parts = variant_parts(tmp_path / "parts")
        base = {srv.url: f"{srv.url}/api/v1/runs/u/race/r" for srv in (a, b)}
        assert session(key).put(base[a.url], json={}, timeout=30).status_code == 200
        codes: dict[tuple[int, int], int] = {}
        errors: list[BaseException] = []

        def upload(srv: GradexpServer, v: int, s: int, barrier: threading.Barrier) -> None:
            try:
                http = session(key)
                barrier.wait(30)
                codes[(v, s)] = put_part(http, base[srv.url], "tensors", s, parts[(v, s)]).status_code
            except BaseException as e:  # reported below
                errors.append(e)

        for s in range(SEQS):
            barrier = threading.Barrier(VARIANTS)
            threads = [threading.Thread(target=upload, args=((a, b)[v % 2], v, s, barrier)) for v in range(VARIANTS)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
        assert not errors, errors
        winners = {}
        for s in range(SEQS):
            got = sorted(codes[(v, s)] for v in range(VARIANTS))
            assert got == [201] + [409] * (VARIANTS - 1), (s, got)
            winners[s] = next(v for v in range(VARIANTS) if codes[(v, s)] == 201)

        wrong = []
        for srv in (a, b):
            http = session(key)
            for s in range(SEQS):
                mark = winners[s] * 1000 + s
                try:
                    w, b1, b2 = (read_tensor(http, base[srv.url], k, step)
                                 for k, step in (("w", s), ("b", s), ("b", s + 1000)))
                except (AssertionError, ValueError, requests.RequestException) as e:
                    # another upload's bytes at the winner's offsets (or a 500 reading them)
                    wrong.append((srv.url, s, str(e)[:200]))
                    continue
                if not (same_bits(w, np.full(70_000, mark, np.float32))
                        and same_bits(b1, np.full(5, mark, np.int64)) and same_bits(b2, b1)):
                    wrong.append((srv.url, s, f"read {w[0]}, {b1[0]}; the winner wrote {mark}"))
        assert not wrong, f"{len(wrong)} of {2 * SEQS} reads disagree with the winning upload: {wrong}"
        engine = db.connect(db_url)
        try:
            with engine.connect() as conn:
                rows = conn.execute(sa.select(db.parts.c.seq, db.parts.c.sha256, db.parts.c.object_key)).all()
        finally:
            engine.dispose()
        store = Store(store_url)
        assert len(rows) == SEQS
        for seq, sha, object_key in rows:  # the row's object holds exactly the row's bytes
            assert hashlib.sha256(store.get(object_key)).hexdigest() == sha == \
                hashlib.sha256(parts[(winners[seq], seq)]).hexdigest()


# -- what an upload is checked for ----------------------------------------------------------------

@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    work = tmp_path_factory.mktemp("parts-store")
    server = GradexpServer(work, db_url=f"sqlite:///{work / 'gradexp.db'}", store_url=str(work / "objects"))
    server.key = server.user_with_key("u")
    server.objects = work / "objects"
    server.start()
    yield server
    server.stop()


def new_run(srv: GradexpServer, run_id: str) -> str:
    base = f"{srv.url}/api/v1/runs/u/checks/{run_id}"
    assert session(srv.key).put(base, json={}, timeout=30).status_code == 200
    return base


def stored(srv: GradexpServer, run_id: str) -> list[Path]:
    return [p for p in srv.objects.rglob("*") if p.is_file() and f"/{run_id}/" in p.as_posix()]


def test_a_damaged_tensor_frame_is_refused_naming_the_part_and_the_frame(srv, tmp_path):
    """One flipped bit in a tensor frame's payload (its header and the part's index intact):
    400 naming the part and the frame's offset, and nothing stored; the intact part goes in."""
    arrays = [np.arange(i * 1000, i * 1000 + 60_000, dtype=np.float32)[None] for i in range(3)]
    good = build_part(tmp_path / "p", [("w", [i], arrays[i]) for i in range(3)])
    frames = _format.scan_sealed_bytes(good, "good").frames
    base = new_run(srv, "damaged")
    http = session(srv.key)
    for target in frames:  # the first, a middle and the last frame
        for where in (target.data_offset + 20, (target.data_offset + target.end) // 2, target.end - 2):
            bad = bytearray(good)
            bad[where] ^= 0x10
            r = put_part(http, base, "tensors", 0, bytes(bad))
            assert r.status_code == 400, (where, r.status_code, r.text)
            msg = r.json()["error"]
            assert "part tensors/0" in msg and f"at byte {target.offset}:" in msg, msg
    assert stored(srv, "damaged") == []
    assert http.get(base, timeout=30).json()["parts"] == {}
    assert put_part(http, base, "tensors", 0, good).status_code == 201
    run = gradexp.Api(host=srv.url, api_key=srv.key).run("u/checks/damaged")
    assert same_bits(run.tensor("w", 2), arrays[2][0])


def test_frame_keys_over_the_limit_are_refused_naming_the_key(srv, tmp_path):
    """A tensor key over 1,024 characters: 400 naming the key (on PostgreSQL it was a 500
    that the client retried forever), nothing stored; 1,024 characters go in and read back."""
    base = new_run(srv, "long-keys")
    http = session(srv.key)
    x = np.ones((1, 3), np.float32)
    too_long = "k" * 1000 + "/over-" + "z" * 19  # 1,025 characters
    r = put_part(http, base, "tensors", 0, build_part(tmp_path / "long", [("ok", [0], x), (too_long, [1], x)]))
    assert r.status_code == 400, r.text
    msg = r.json()["error"]
    assert "part tensors/0" in msg and "1025 characters" in msg and "1024" in msg and too_long[:100] in msg, msg
    assert stored(srv, "long-keys") == []
    longest = "\U0001F600" * 1024  # 1,024 characters of 4 bytes each
    assert put_part(http, base, "tensors", 0, build_part(tmp_path / "max", [(longest, [0], x)])).status_code == 201
    run = gradexp.Api(host=srv.url, api_key=srv.key).run("u/checks/long-keys")
    assert run.tensor_keys() == [longest]
    assert same_bits(run.tensor(longest, 0), x[0])


def test_an_upload_is_received_into_a_file_not_memory_and_an_aborted_one_leaves_nothing(srv, tmp_path):
    """The body of an upload goes to a spool file as it arrives (the server never holds a
    whole part in memory); a client that goes away midway leaves no file and no part."""
    base = new_run(srv, "aborted")
    path = base.removeprefix(srv.url) + "/parts/tensors/0"
    size = 64 << 20
    sent = 24 << 20
    spool = srv.objects / ".incoming"
    with socket.create_connection((HOST, srv.port), timeout=30) as sock:
        sock.sendall((f"PUT {path} HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {srv.key}\r\n"
                      f"Content-Length: {size}\r\nContent-Type: application/octet-stream\r\n\r\n").encode())
        chunk = b"\0" * (1 << 20)
        for _ in range(sent // len(chunk)):
            sock.sendall(chunk)
        # Most of what was sent is on disk while the rest has not come (socket buffers hold some).
        files = wait_for(lambda: [p for p in spool.iterdir() if p.stat().st_size >= sent // 2],
                         "the upload's spool file", timeout=60)
        assert len(files) == 1
    wait_for(lambda: not list(spool.iterdir()), "the aborted upload's spool file to go", timeout=60)
    assert wait_for(lambda: access_lines(srv, f'"PUT {path}" 400'), "the aborted upload in the access log")
    assert "Traceback" not in srv.log.read_text(errors="replace")
    assert stored(srv, "aborted") == []
    assert session(srv.key).get(base, timeout=30).json()["parts"] == {}


@pytest.fixture
def every_database(tmp_path, request) -> dict[str, str]:
    """A new empty database on each backend; MariaDB's made with the server's default
    character set (latin1 on MariaDB 10), as a plain ``CREATE DATABASE`` makes it."""
    maria = request.getfixturevalue("mariadb")
    name = "gx_plain_" + hashlib.sha256(str(tmp_path).encode()).hexdigest()[:10]
    c = maria._connect()
    try:
        with c.cursor() as cur:
            cur.execute(f"CREATE DATABASE `{name}`")
    finally:
        c.close()
    return {"sqlite": f"sqlite:///{tmp_path / 'k.db'}",
            "postgresql": request.getfixturevalue("postgres").new_database(), "mariadb": maria.url(name)}


EXACT_KEYS = ["\U0001F600" * 1024, "w", "W", "w ", "\u00e9", "e"]
"""The longest key (1,024 four-byte characters) and keys only an exact comparison tells apart."""


def add_frames(engine: sa.engine.Engine, run_id: str, keys: list[str], tmp_path: Path) -> int:
    """A run with one tensors part holding one frame per key; returns the run's pk."""
    data = build_part(tmp_path / run_id, [(k, [0], np.full((1, 2), i, np.float32)) for i, k in enumerate(keys)])
    scan = _format.scan_sealed_bytes(data, run_id)
    with engine.begin() as conn:
        pk = db.upsert_run(conn, db.entity_id(conn, "u"), "p", run_id, {})
        assert db.add_part(conn, pk, "tensors", 0, hashlib.sha256(data).hexdigest(), len(data), "k", scan.frames)
    return pk


def check_exact(engine: sa.engine.Engine, pk: int, keys: list[str], name: str) -> None:
    with engine.connect() as conn:
        assert sorted(db.tensor_keys(conn, pk)) == sorted(keys), name
        for k in keys:
            rows = db.tensor_frames(conn, pk, k, 0)
            assert len(rows) == 1, (name, k, len(rows))


def test_frame_keys_are_stored_and_found_exactly_on_every_database(every_database, tmp_path):
    """frames.key holds any key up to 1,024 characters (four-byte ones too), and finding a
    key's frames never finds another key's (a case or trailing-space variant)."""
    for name, url in every_database.items():
        engine = db.connect(url)
        try:
            db.migrate(engine)
            db.create_user(engine, "u")
            check_exact(engine, add_frames(engine, "r", EXACT_KEYS, tmp_path), EXACT_KEYS, name)
        finally:
            engine.dispose()


def test_migration_5_upgrades_a_version_4_database_in_place(every_database, tmp_path):
    """A version-4 database keeps its frames through the upgrade, which makes keys exact."""
    for name, url in every_database.items():
        engine = db.connect(url)
        try:
            assert db.migrate(engine, target=4) == 0
            db.create_user(engine, "u")
            old = ["grad/W", "grad/x"]
            before = add_frames(engine, "before", old, tmp_path)
            assert db.migrate(engine) == 4
            with engine.connect() as conn:
                assert db.current_version(conn) == db.SCHEMA_VERSION >= 5
            check_exact(engine, before, old, name)
            check_exact(engine, add_frames(engine, "after", EXACT_KEYS, tmp_path), EXACT_KEYS, name)
        finally:
            engine.dispose()


# -- the access log -------------------------------------------------------------------------------

def access_lines(srv: GradexpServer, marker: str) -> list[str]:
    return [line for line in srv.log.read_text(errors="replace").splitlines() if marker in line]


def test_every_request_is_in_the_access_log_without_secrets(srv, tmp_path):
    """On by default: one line per request with method, path, status, bytes, duration and
    user; never an API key, a sign-in token or anything from the query string."""
    from services import WebSession

    base = new_run(srv, "logged")
    http = session(srv.key)
    part = build_part(tmp_path / "p", [("w", [0], np.ones((1, 8), np.float32))])
    assert put_part(http, base, "tensors", 0, part).status_code == 201
    assert http.get(f"{base}/tensors/w", params={"step": 0, "secret": "q-s3cr3t"}, timeout=30).status_code == 200
    assert requests.get(f"{srv.url}/api/v1/viewer", headers={"Authorization": "Bearer gx_wrong-key-xyz"},
                        timeout=30).status_code == 401
    token = srv.cli("signin-link", "u", "--base-url", srv.url).strip().rpartition("token=")[2]
    assert len(token) > 20
    assert requests.get(f"{srv.url}/login/link", params={"token": token}, timeout=30).status_code == 200
    srv.user_with_password("web-user", "a long enough password")
    web = WebSession(srv.url)
    assert web.sign_in("web-user", "a long enough password").status_code == 303
    assert web.get("/keys").status_code == 200

    path = base.removeprefix(srv.url)

    def logged() -> list[str]:
        return access_lines(srv, '"GET /keys"')
    wait_for(logged, "the access log line of the last request", timeout=30)
    text = srv.log.read_text(errors="replace")
    for secret in (srv.key, "gx_wrong-key-xyz", token, "q-s3cr3t", "a long enough password"):
        assert secret not in text
    [put] = access_lines(srv, f'"PUT {path}/parts/tensors/0"')
    assert re.search(rf' u "PUT {re.escape(path)}/parts/tensors/0" 201 in={len(part)} out=\d+ \d+\.\dms$', put), put
    [get] = access_lines(srv, f'"GET {path}/tensors/w"')
    assert re.search(r' u "GET \S+/tensors/w" 200 in=0 out=\d{3,} \d+\.\dms$', get), get
    assert any(re.search(r' - "GET /api/v1/viewer" 401 in=0 out=\d+ \d+\.\dms$', x)
               for x in access_lines(srv, '"GET /api/v1/viewer"'))
    assert re.search(r' - "GET /login/link" 200 ', access_lines(srv, '"GET /login/link"')[-1])
    assert re.search(r' web-user "GET /keys" 200 ', logged()[-1])


def test_the_access_log_can_be_turned_off(tmp_path):
    server = GradexpServer(tmp_path, data_dir=tmp_path / "data")
    where = server._where
    server._where = lambda: [*where(), "--no-access-log"]  # type: ignore[method-assign]
    server.start()
    try:
        assert requests.get(f"{server.url}/api/v1/openapi.json", timeout=30).status_code == 200
        assert server.healthy()
    finally:
        server.stop()
    assert not access_lines(server, "/api/v1/openapi.json") and not access_lines(server, "/healthz")
