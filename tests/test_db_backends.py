"""The database layer and whole servers on SQLite, PostgreSQL and MariaDB, and S3 storage.

PostgreSQL and MariaDB are real throwaway servers (tests/services.py), each test in
its own fresh database; S3 is moto's standalone server.
"""

from __future__ import annotations

import hashlib
import threading
import time

import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa

import gradexp
from gradexp.core import format as _format
from gradexp.server import accounts, db
from services import (
    GradexpServer,
    assert_uploaded_exactly_once,
    check_history,
    finish_runs,
    same_bits,
    two_servers,
    values,
    wait_for,
)

BACKENDS = ["sqlite", "postgresql", "mariadb"]


@pytest.fixture(params=BACKENDS)
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'gradexp.db'}"
    service = request.getfixturevalue({"postgresql": "postgres", "mariadb": "mariadb"}[request.param])
    return service.new_database()


@pytest.fixture
def engine(db_url):
    e = db.connect(db_url)
    yield e
    e.dispose()


def offline_parts(root, n: int = 30) -> dict[str, bytes]:
    run = gradexp.init("src", id="src", dir=root, part_max_bytes=2048, part_max_age=600,
                       console=False, code=False, system_metrics=False)  # history and tensor parts only
    for s in range(n):
        run.log(values(s))
        if s % 10 == 9:
            run.flush()
    run.finish()
    return {p.name: p.read_bytes() for p in sorted((run.dir / "parts").glob("*.gxp"))}


# -- the db layer ------------------------------------------------------------------------------------

def test_migrate_creates_the_current_schema_once(engine):
    assert db.migrate(engine) == 0
    with engine.connect() as conn:
        assert db.current_version(conn) == db.SCHEMA_VERSION
        tables = set(sa.inspect(conn).get_table_names())
        versions = conn.execute(sa.select(db.schema_version.c.version).order_by(db.schema_version.c.version)).scalars()
        assert list(versions) == list(range(1, db.SCHEMA_VERSION + 1))
    assert set(db.meta.tables) <= tables
    assert db.migrate(engine) == db.SCHEMA_VERSION  # nothing left to do
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(db.schema_version)).scalar() == db.SCHEMA_VERSION


def test_concurrent_migrations_of_a_fresh_database(db_url):
    """Servers starting at once on an empty database: one migrates, the others find it done."""
    n = 3
    barrier = threading.Barrier(n)
    started: list[int] = []
    errors: list[BaseException] = []

    def start() -> None:
        e = db.connect(db_url)
        try:
            barrier.wait(30)
            started.append(db.migrate(e))
        except BaseException as ex:  # reported below
            errors.append(ex)
        finally:
            e.dispose()

    threads = [threading.Thread(target=start) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert sorted(started) == [0] + [db.SCHEMA_VERSION] * (n - 1)
    e = db.connect(db_url)
    try:
        with e.connect() as conn:
            versions = conn.execute(sa.select(db.schema_version.c.version)).scalars().all()
        assert sorted(versions) == list(range(1, db.SCHEMA_VERSION + 1))
        db.create_user(e, "after")
        assert db.authenticate(e, db.create_key(e, "after")).user == "after"
    finally:
        e.dispose()


def test_users_keys_and_authentication(engine):
    db.migrate(engine)
    assert db.user_count(engine) == 0
    alice_id = db.create_user(engine, "alice", admin=True)
    db.create_user(engine, "bob")
    with pytest.raises(sa.exc.IntegrityError):
        db.create_user(engine, "alice")
    with pytest.raises(LookupError):
        db.create_key(engine, "carol")
    k1 = db.create_key(engine, "alice", name="laptop")
    k2 = db.create_key(engine, "alice")
    kb = db.create_key(engine, "bob")
    assert len({k1, k2, kb}) == 3 and all(k.startswith(db.KEY_PREFIX) and len(k) > 40 for k in (k1, k2, kb))
    assert db.user_count(engine) == 2

    v = db.authenticate(engine, k1)
    assert v is not None and (v.user, v.entity, v.user_id) == ("alice", "alice", alice_id)
    assert db.authenticate(engine, k2).key_id != v.key_id
    assert db.authenticate(engine, kb).entity == "bob"
    for bad in ("", "gx_nope", k1[:-1], k1 + "x", k1.upper()):
        assert db.authenticate(engine, bad) is None, bad
    with engine.connect() as conn:  # only the hash is stored, and use is recorded
        rows = conn.execute(sa.select(db.api_keys)).mappings().all()
    assert not any(k1 in str(dict(r)) for r in rows)
    assert {r["hash"] for r in rows} == {hashlib.sha256(k.encode()).hexdigest() for k in (k1, k2, kb)}
    assert all(r["last_used_at"] is not None for r in rows)
    with engine.begin() as conn:
        conn.execute(sa.update(db.api_keys).where(db.api_keys.c.id == v.key_id).values(revoked_at=time.time()))
    assert db.authenticate(engine, k1) is None
    assert db.authenticate(engine, k2).user == "alice"


def test_runs_parts_and_frames(engine, tmp_path):
    db.migrate(engine)
    db.create_user(engine, "alice")
    db.create_user(engine, "bob")
    parts = offline_parts(tmp_path)
    with engine.begin() as conn:
        alice, bob = db.entity_id(conn, "alice"), db.entity_id(conn, "bob")
        pk = db.upsert_run(conn, alice, "proj", "r1", {"name": "first", "tags": ["a", "b"], "config": {"lr": 0.5},
                                                     "created_at": 1000.0})
        assert db.upsert_run(conn, alice, "proj", "r1", {"notes": "again", "summary": {"loss": 1.5}}) == pk
        other = db.upsert_run(conn, alice, "proj", "r2", {"tags": ["b"]})
        bobs = db.upsert_run(conn, bob, "proj", "r1", {})
        assert len({pk, other, bobs}) == 3
    with engine.connect() as conn:
        row = db.run_row(conn, pk)
        assert (row["entity"], row["project"], row["id"], row["name"], row["status"]) == (
            "alice", "proj", "r1", "first", "running")
        assert row["tags"] == ["a", "b"] and row["config"] == {"lr": 0.5} and row["summary"] == {"loss": 1.5}
        assert row["notes"] == "again" and row["created_at"] == 1000.0
        assert db.run_pk(conn, alice, "proj", "r1") == pk and db.run_pk(conn, bob, "proj", "r1") == bobs
        assert db.run_pk(conn, alice, "proj", "nope") is None
        assert db.project_id(conn, alice, "nope", create=False) is None
        pid = db.project_id(conn, alice, "proj", create=False)

    with engine.begin() as conn:
        for name, data in parts.items():
            stream, _, seq = name[:-4].rpartition("-")
            scan = _format.scan_sealed_bytes(data, name)
            key = f"runs/{alice}/{pid}/r1/parts/{name}"
            assert db.add_part(conn, pk, stream, int(seq), hashlib.sha256(data).hexdigest(), len(data), key,
                               scan.frames)
        name, data = next(iter(parts.items()))
        stream, _, seq = name[:-4].rpartition("-")
        assert not db.add_part(conn, pk, stream, int(seq), "0" * 64, 1, "elsewhere", [])  # same (run, stream, seq)
    with engine.connect() as conn:
        counts = db.part_counts(conn, pk)
        assert counts == {s: sum(n.startswith(s + "-") for n in parts) for s in ("history", "tensors")}
        assert db.part(conn, pk, stream, int(seq))["sha256"] == hashlib.sha256(data).hexdigest()
        assert db.part(conn, pk, "history", 99) is None
        assert [p["seq"] for p in db.history_parts(conn, pk)] == list(range(counts["history"]))
        assert db.tensor_keys(conn, pk) == ["ids", "w"]
        assert db.tensor_keys(conn, other) == []
        frames = db.tensor_frames(conn, pk, "w", 17)
        assert frames and all(f["step_min"] <= 17 <= f["step_max"] for f in frames)
        assert frames[0]["object_key"].startswith(f"runs/{alice}/{pid}/r1/parts/tensors-")
        # The frame found is the one holding step 17: decode it from the part's bytes.
        part_name = frames[0]["object_key"].rpartition("/")[2]
        blob = parts[part_name][frames[0]["offset"]:frames[0]["offset"] + frames[0]["length"]]
        info = _format.parse_header(blob, 0, len(blob))
        from gradexp.core import arrow as _arrow

        steps, arrays = _arrow.tensor_rows(_format.decode_payload(info, memoryview(blob)[info.header_len:]))
        assert same_bits(arrays[list(steps).index(17)], values(17)["w"])
        assert {s for f in db.tensor_frames(conn, pk, "w") for s in range(f["step_min"], f["step_max"] + 1)} == set(
            range(30))

    with engine.begin() as conn:
        db.update_run(conn, other, status="finished", exit_code=0, finished_at=time.time())
        db.add_segment(conn, pk, 0, 1, "seg-a")
        db.add_segment(conn, pk, 0, 1, "seg-b")  # a concurrent writer's duplicate is ignored
    with engine.connect() as conn:
        assert [s["object_key"] for s in db.history_segments(conn, pk)] == ["seg-a"]
        ids = lambda **kw: sorted(r["id"] for r in db.list_runs(conn, alice, **kw))  # noqa: E731
        assert ids() == ["r1", "r2"]
        assert ids(status="finished") == ["r2"] and ids(status="running") == ["r1"]
        assert ids(tags=["a"]) == ["r1"] and ids(tags=["b"]) == ["r1", "r2"] and ids(tags=["a", "c"]) == []
        assert ids(project="other") == []
        assert [r["entity"] for r in db.list_runs(conn, bob)] == ["bob"]
        assert db.list_projects(conn, alice) == [{"name": "proj", "created_at": pytest.approx(time.time(), abs=120),
                                                  "runs": 2}]


def test_a_run_without_heartbeat_is_crashed_in_listings_too(engine):
    """A run whose client stopped sending heartbeats reads as crashed; filtering agrees."""
    db.migrate(engine)
    db.create_user(engine, "alice")
    with engine.begin() as conn:
        alice = db.entity_id(conn, "alice")
        stale = db.upsert_run(conn, alice, "p", "stale", {})
        db.upsert_run(conn, alice, "p", "live", {})
        db.update_run(conn, stale, heartbeat_at=time.time() - db.STALE_AFTER - 60)
    with engine.connect() as conn:
        assert db.run_row(conn, stale)["status"] == "crashed"
        shown = {r["id"]: r["status"] for r in db.list_runs(conn, alice)}
        assert shown == {"stale": "crashed", "live": "running"}
        assert [r["id"] for r in db.list_runs(conn, alice, status="crashed")] == ["stale"]
        assert [r["id"] for r in db.list_runs(conn, alice, status="running")] == ["live"]


def test_runs_page_by_keyset_with_ties_and_runs_created_between_pages(engine):
    """Paging the runs listing shows every run once, newest first, also when runs share a
    creation time (the id breaks the tie), when tags are filtered after the query, and when a
    run is created between two pages."""
    db.migrate(engine)
    db.create_user(engine, "alice")
    t0 = 1_700_000_000.123456
    with engine.begin() as conn:
        alice = db.entity_id(conn, "alice")
        for i in range(11):  # pairs of runs created in the same instant
            db.upsert_run(conn, alice, "p", f"r{i:02d}", {"created_at": t0 + i // 2, "tags": ["odd"] if i % 2 else []})
    with engine.connect() as conn:
        everything = [r["id"] for r in db.list_runs(conn, alice)]
        assert len(everything) == 11
        for limit, tags in ((1, ()), (2, ()), (3, ()), (10, ()), (11, ()), (2, ("odd",)), (4, ("odd",))):
            wanted = [r["id"] for r in db.list_runs(conn, alice, tags=tags)]  # before this round's new run
            seen: list[str] = []
            after = None
            pages = 0
            while True:
                rows, after = db.page_runs(conn, alice, tags=tags, limit=limit, after=after)
                assert len(rows) <= limit
                seen += [r["id"] for r in rows]
                pages += 1
                if after is None:
                    break
                if pages == 1:  # a run created meanwhile is newer: it never enters a later page
                    with engine.begin() as writer:
                        db.upsert_run(writer, alice, "p", f"new-{limit}-{len(tags)}", {"tags": ["odd"]})
            assert seen == wanted, (limit, tags)
        assert everything == [f"r{i:02d}" for i in (10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0)]  # newest first, ties by id


def test_migration_from_version_1_keeps_the_rows(engine):
    assert db.migrate(engine, target=1) == 0
    with engine.connect() as conn:
        assert db.current_version(conn) == 1
        insp = sa.inspect(conn)
        assert "heartbeat_at" not in {c["name"] for c in insp.get_columns("runs")}
        assert "last_used_at" not in {c["name"] for c in insp.get_columns("api_keys")}
    mysql = engine.dialect.name in ("mysql", "mariadb")
    if mysql:  # as the first servers made it there: 4-byte FLOAT timestamps
        with engine.begin() as conn:
            conn.execute(sa.text("ALTER TABLE runs MODIFY COLUMN created_at FLOAT NOT NULL"))
            conn.execute(sa.text("ALTER TABLE runs MODIFY COLUMN finished_at FLOAT NULL"))
    uid = db.create_user(engine, "old")  # users and entities are the same in v1
    key = "gx_" + "k" * 43
    with engine.begin() as conn:  # rows as a version-1 server wrote them
        eid = db.entity_id(conn, "old")
        conn.execute(sa.text("INSERT INTO api_keys (user_id, name, prefix, hash, created_at) "
                             "VALUES (:u, 'v1', :p, :h, 5.0)"), {"u": uid, "p": key[:8], "h": db.hash_key(key)})
        conn.execute(sa.text("INSERT INTO projects (entity_id, name, created_at) VALUES (:e, 'legacy', 6.0)"),
                     {"e": eid})
        pid = conn.execute(sa.text("SELECT id FROM projects WHERE name = 'legacy'")).scalar()
        conn.execute(sa.text(
            "INSERT INTO runs (project_id, run_id, name, status, tags, config, summary, created_at, updated_at) "
            "VALUES (:p, 'r-old', 'before upgrade', 'finished', '[\"t\"]', '{\"lr\": 1}', '{\"loss\": 0.5}', "
            "7.0, 8.0)"),
            {"p": pid})

    assert db.migrate(engine) == 1
    with engine.connect() as conn:
        assert db.current_version(conn) == db.SCHEMA_VERSION
        insp = sa.inspect(conn)
        assert "heartbeat_at" in {c["name"] for c in insp.get_columns("runs")}
        assert "last_used_at" in {c["name"] for c in insp.get_columns("api_keys")}
        assert "ix_runs_status" in {i["name"] for i in insp.get_indexes("runs")}
        assert "password_hash" in {c["name"] for c in insp.get_columns("users")}
        assert {"sessions", "auth_codes", "login_failures", "signin_links"} <= set(insp.get_table_names())
        pk = db.run_pk(conn, eid, "legacy", "r-old")
        row = db.run_row(conn, pk)
    assert row["name"] == "before upgrade" and row["tags"] == ["t"] and row["config"] == {"lr": 1}
    assert row["summary"] == {"loss": 0.5} and row["created_at"] == 7.0 and row["status"] == "finished"
    assert row["heartbeat_at"] is None
    v = db.authenticate(engine, key)  # the old key still works, and now records its use
    assert v is not None and v.user == "old"
    with engine.connect() as conn:
        assert conn.execute(sa.select(db.api_keys.c.last_used_at)).scalar() is not None
        # The upgraded schema takes new rows with the new columns.
    now = time.time()
    with engine.begin() as conn:
        new = db.upsert_run(conn, eid, "legacy", "r-new", {})
        db.update_run(conn, new, finished_at=now + 0.25)
        row = db.run_row(conn, new)
    assert row["heartbeat_at"] == pytest.approx(now, abs=5) and row["status"] == "running"
    assert row["created_at"] == pytest.approx(now, abs=5) and row["finished_at"] == now + 0.25  # full precision
    if mysql:
        with engine.connect() as conn:
            types = {c["name"]: c["type"] for c in sa.inspect(conn).get_columns("runs")}
        assert all(isinstance(types[c], sa.Double) for c in ("created_at", "finished_at", "heartbeat_at")), types
    assert db.migrate(engine) == db.SCHEMA_VERSION


def test_accounts_on_every_backend(engine):
    """Passwords, the sign-in rate limit, sessions, single-use codes and links in each database."""
    db.migrate(engine)
    uid = db.create_user(engine, "acc")
    accounts.set_password(engine, "acc", "a good password")
    assert accounts.sign_in(engine, "acc", "a good password", "10.0.0.1") == uid
    for _ in range(accounts.MAX_FAILURES):
        assert accounts.sign_in(engine, "acc", "wrong", "10.0.0.1") is None
    with pytest.raises(accounts.RateLimited):
        accounts.sign_in(engine, "acc", "a good password", "10.0.0.1")
    assert accounts.sign_in(engine, "acc", "a good password", "10.0.0.2") == uid  # others are not locked out
    token = accounts.new_session(engine, uid)
    s = accounts.session(engine, token)
    assert s is not None and (s.user, s.entity) == ("acc", "acc") and len(s.csrf) >= 24
    accounts.end_session(engine, s.id)
    assert accounts.session(engine, token) is None
    verifier = "v" * 50
    challenge = accounts._b64(hashlib.sha256(verifier.encode()).digest())
    code = accounts.new_code(engine, uid, client="c", redirect_uri="http://127.0.0.1:9/cb", challenge=challenge)
    assert accounts.redeem_code(engine, code, verifier, "http://127.0.0.1:9/cb")[:2] == (uid, "c")
    with pytest.raises(accounts.BadGrant, match="already used"):
        accounts.redeem_code(engine, code, verifier, "http://127.0.0.1:9/cb")
    link = accounts.new_signin_link(engine, "acc")
    assert accounts.use_signin_link(engine, link) == uid and accounts.use_signin_link(engine, link) is None


# -- whole servers ---------------------------------------------------------------------------------

def test_a_part_upload_that_fails_after_its_row_is_retried_into_a_whole_part(db_url, tmp_path, monkeypatch):
    """A part upload whose database transaction fails after the part's row went in (the server
    killed, the database locked for longer than its timeout) leaves nothing of the part: the
    sender's retry stores it with every frame. On SQLite the row used to be committed on its own
    (Python's sqlite3 let the savepoint around it commit), so the retry met an "identical part,
    already stored" without frames, the finish's part counts matched, and a tensor step was
    gone from a run the sender reported synced."""
    import uvicorn

    from gradexp.core.client import Client
    from gradexp.server.app import create_app
    from gradexp.sync.sender import sync

    with gradexp.init("p", id="r", dir=tmp_path / "runs", part_max_bytes=2048, console=False, code=False,
                      system_metrics=False) as run:
        for s in range(30):
            run.log(values(s))
            if s % 10 == 9:
                run.flush()
    local = gradexp.Api().run(run.dir)
    assert sum(p.name.startswith("tensors-") for p in (run.dir / "parts").glob("*.gxp")) >= 2

    app = create_app(db_url=db_url, store_url=str(tmp_path / "objects"), access_log=False)
    engine = app.state.server.engine
    db.create_user(engine, "u")
    key = db.create_key(engine, "u")
    failed: list[tuple[str, int]] = []
    add_part = db.add_part

    def add_part_then_fail_once(conn, pk, stream, seq, *args, **kw):
        added = add_part(conn, pk, stream, seq, *args, **kw)
        if added and stream == "tensors" and not failed:
            failed.append((stream, seq))
            raise sa.exc.OperationalError("INSERT INTO frames ...", {}, Exception("database is locked"))
        return added

    monkeypatch.setattr(db, "add_part", add_part_then_fail_once)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: srv.started or not thread.is_alive(), "the server started", timeout=30, interval=0.02)
        url = f"http://127.0.0.1:{srv.servers[0].sockets[0].getsockname()[1]}"
        retries: list[str] = []
        assert sync(run.dir, Client(url, key, on_retry=retries.append), "u", report=retries.append) != (0, False)
        assert failed and retries and "503" in retries[0], (failed, retries)  # the failure was met and retried
        remote = gradexp.Api(host=url, api_key=key).run("u/p/r")
        assert remote.status == "finished"
        assert sorted(remote.tensor_keys()) == sorted(local.tensor_keys())
        for k in local.tensor_keys():
            assert remote.steps(k) == local.steps(k), k
            for s in local.steps(k):
                assert same_bits(remote.tensor(k, s), local.tensor(k, s)), (k, s)
        assert_uploaded_exactly_once(db_url, "u", "p", "r", run.dir)
    finally:
        srv.should_exit = True
        thread.join(10)
        engine.dispose()


def log_online(server: GradexpServer, key: str, tmp_path, run_id: str, n: int):
    """An online run in this process; returns (run, remote view) once the server has every row."""
    run = gradexp.init("rt", id=run_id, dir=tmp_path / "runs", host=server.url, api_key=key, finish_timeout=90)
    assert run.settings.mode == "online"
    for s in range(n):
        run.log(values(s))
    api = gradexp.Api(host=server.url, api_key=key)

    def rows():
        try:
            return api.run(f"u/rt/{run_id}").history().num_rows == n
        except gradexp.RunNotFoundError:
            return False
    wait_for(rows, f"history of {run_id} on the server", timeout=30, interval=0.1)
    return run, api


def test_server_round_trip(db_url, tmp_path):
    store = tmp_path / "objects"
    server = GradexpServer(tmp_path, db_url=db_url, store_url=str(store))
    key = server.user_with_key("u")
    server.start()
    try:
        n = 25
        run, api = log_online(server, key, tmp_path, "r", n)
        live = api.run("u/rt/r")
        assert live.status == "running"
        check_history(live.history(), range(n))
        wait_for(lambda: live.steps("w") == list(range(n)), "tensors on the server", timeout=30, interval=0.2)
        for s in (0, 11, n - 1):
            assert same_bits(live.tensor("w", s), values(s)["w"]) and same_bits(live.tensor("ids", s), values(s)["ids"])
        assert not list(store.glob("runs/*/*/r/history.parquet"))
        run.finish()
        done = api.run("u/rt/r")
        assert done.status == "finished" and done.summary["loss"] == values(n - 1)["loss"]
        check_history(done.history(), range(n))
        objects = list(store.glob("runs/*/*/r/history.parquet"))
        assert len(objects) == 1
        check_history(pq.read_table(objects[0]), range(n))
        assert_uploaded_exactly_once(db_url, "u", "rt", "r", run.dir)
    finally:
        finish_runs()
        server.stop()


def test_two_servers_share_one_postgres_database_and_one_s3_bucket(postgres, s3, tmp_path):
    db_url = postgres.new_database()
    bucket, store_url = s3.new_store("prod")
    with two_servers(tmp_path, db_url, store_url) as (a, b, key):
        try:
            # Streamed to A, read through B, live and after finish.
            n = 25
            run, _ = log_online(a, key, tmp_path, "via-a", n)
            via_b = gradexp.Api(host=b.url, api_key=key)
            check_history(via_b.run("u/rt/via-a").history(), range(n))
            run.finish()
            r = via_b.run("u/rt/via-a")
            assert r.status == "finished"
            check_history(r.history(), range(n))
            for s in range(n):
                assert same_bits(r.tensor("w", s), values(s)["w"])
            keys = s3.keys(bucket, "prod/")
            assert [k for k in keys if k.endswith("/via-a/history.parquet")]
            assert all(k.startswith("prod/runs/") for k in keys if not k.endswith("/")), keys
            assert_uploaded_exactly_once(db_url, "u", "rt", "via-a", run.dir)

            # The same parts uploaded to both servers at once: each stored exactly once.
            parts = offline_parts(tmp_path / "src")
            import requests

            session = requests.Session()
            session.headers["Authorization"] = f"Bearer {key}"
            path = "/api/v1/runs/u/rt/both"
            assert session.put(a.url + path, json={"tags": ["race"]}, timeout=30).status_code == 200
            results: dict[tuple[str, str], int] = {}
            errors: list[BaseException] = []

            def upload(server: GradexpServer, name: str, data: bytes, barrier: threading.Barrier) -> None:
                try:
                    stream, _, seq = name[:-4].rpartition("-")
                    s = requests.Session()
                    s.headers["Authorization"] = f"Bearer {key}"
                    barrier.wait(30)
                    r = s.put(f"{server.url}{path}/parts/{stream}/{int(seq)}", data=data, timeout=60,
                              headers={"X-Gradexp-SHA256": hashlib.sha256(data).hexdigest()})
                    results[(server.url, name)] = r.status_code
                    assert r.status_code in (200, 201), r.text
                    assert r.json()["stored"] == (r.status_code == 201)
                except BaseException as e:  # reported below
                    errors.append(e)

            for name, data in parts.items():
                barrier = threading.Barrier(2)
                threads = [threading.Thread(target=upload, args=(srv, name, data, barrier)) for srv in (a, b)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(90)
            assert not errors, errors
            for name in parts:
                assert sorted(results[(srv.url, name)] for srv in (a, b)) == [200, 201], name
            counts = session.get(b.url + path, timeout=30).json()["parts"]
            assert sum(counts.values()) == len(parts)
            r = session.post(a.url + path + "/finish", json={"exit_code": 0, "parts": counts}, timeout=60)
            assert r.status_code == 200 and r.json()["status"] == "finished"
            both = gradexp.Api(host=b.url, api_key=key).run("u/rt/both")
            check_history(both.history(), range(30))
            assert both.steps("ids") == list(range(30))
            assert same_bits(both.tensor("ids", 29), values(29)["ids"])
            assert_uploaded_exactly_once(db_url, "u", "rt", "both", tmp_path / "src" / "src" / "src")
        finally:
            finish_runs()
