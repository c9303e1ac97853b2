"""Alembic migrations: a database made by the last release before Alembic is adopted and
upgraded in place on SQLite, PostgreSQL and MariaDB, with every row kept; a fresh database
gets the same schema; upgrading again changes nothing.

The old release is the package as of ``PRE_ALEMBIC`` (``git archive``), run in child
processes with ``PYTHONPATH`` pointing at that copy.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

import gradexp
from gradexp.server import db
from services import GradexpServer, check_history, clean_env, run_python, same_bits, values

PRE_ALEMBIC = "1ec2b46ce43a84f810aa8b9c646cabb03174febb"
"""The last commit whose server migrated with its own steps (``gradexp_schema`` at 6)."""
REPO = Path(__file__).resolve().parent.parent
BACKENDS = ["sqlite", "postgresql", "mariadb"]


@pytest.fixture(scope="module")
def old_release(tmp_path_factory) -> Path:
    where = tmp_path_factory.mktemp("pre-alembic")
    archive = subprocess.run(["git", "-C", str(REPO), "archive", PRE_ALEMBIC, "gradexp"], capture_output=True,
                             timeout=120)
    assert archive.returncode == 0, f"git archive {PRE_ALEMBIC} failed: {archive.stderr.decode()}"
    subprocess.run(["tar", "-x", "-C", str(where)], input=archive.stdout, check=True, timeout=120)
    assert not (where / "gradexp" / "server" / "migrations").exists()
    return where


@pytest.fixture(params=BACKENDS)
def db_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'gradexp.db'}"
    service = request.getfixturevalue({"postgresql": "postgres", "mariadb": "mariadb"}[request.param])
    return service.new_database()


def old_python(old_release: Path, code: str) -> str:
    r = run_python(code, env=clean_env(PYTHONPATH=str(old_release)), timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def schema(url: str) -> dict[str, Any]:
    """Tables, columns (type, nullability), indexes and unique constraints, as the database reports them."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            insp = sa.inspect(conn)
            out: dict[str, Any] = {}
            for table in sorted(set(insp.get_table_names()) - {"alembic_version"}):
                out[table] = {
                    "columns": [(c["name"], str(c["type"]), c["nullable"]) for c in insp.get_columns(table)],
                    "indexes": sorted((i["name"], tuple(i["column_names"]), bool(i["unique"]))
                                      for i in insp.get_indexes(table)),
                    "unique": sorted((u["name"] or "", tuple(u["column_names"]))
                                     for u in insp.get_unique_constraints(table)),
                }
            return out
    finally:
        engine.dispose()


def versions(url: str) -> tuple[list[int], str | None]:
    """The rows of ``gradexp_schema`` and the Alembic revision (None without its table)."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            rows = sorted(conn.execute(sa.text("SELECT version FROM gradexp_schema")).scalars())
            revision = None
            if sa.inspect(conn).has_table("alembic_version"):
                revision = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()
        return rows, revision
    finally:
        engine.dispose()


def test_a_database_of_the_release_before_alembic_is_upgraded_in_place(old_release, db_url, tmp_path, monkeypatch):
    store = tmp_path / "objects"
    n = 12
    with monkeypatch.context() as m:  # the old release: its server, its CLI, its client
        m.setenv("PYTHONPATH", str(old_release))
        old = GradexpServer(tmp_path / "old", db_url=db_url, store_url=str(store))
        old.create_user("u")  # by the old release's CLI, on the schema it makes
        key = old.create_key("u")
        old.start()
        try:
            old_python(old_release, f"""
import gradexp
assert gradexp.__file__.startswith({str(old_release)!r}), gradexp.__file__
from services import values
run = gradexp.init("legacy", id="r-old", dir={str(tmp_path / 'runs')!r}, host={old.url!r}, api_key={key!r},
                   config={{"lr": 0.5}}, tags=["before"], finish_timeout=120)
for s in range({n}):
    run.log(values(s))
run.finish()
""".replace("from services import values", _values_src()))
        finally:
            old.stop()
    assert versions(db_url) == ([1, 2, 3, 4, 5, 6], None)  # as the old release left it: no Alembic yet

    new = GradexpServer(tmp_path / "new", db_url=db_url, store_url=str(store), port=old.port)
    new.start()  # upgrades in place at start
    try:
        assert versions(db_url) == (list(range(1, db.SCHEMA_VERSION + 1)), db.revision(db.SCHEMA_VERSION))
        api = gradexp.Api(host=new.url, api_key=key)  # the old key still signs in
        assert api.client.json("GET", "/viewer") == {"user": "u", "entity": "u"}
        run = api.run("u/legacy/r-old")
        assert run.status == "finished" and run.config == {"lr": 0.5} and run.tags == ["before"]
        assert run.summary["loss"] == values(n - 1)["loss"]
        check_history(run.history(), range(n))
        assert run.steps("w") == list(range(n))
        for s in range(n):
            assert same_bits(run.tensor("w", s), values(s)["w"]) and same_bits(run.tensor("ids", s), values(s)["ids"])
        new.create_user("after")  # the upgraded schema takes new rows
    finally:
        new.stop()

    before = schema(db_url), versions(db_url)
    engine = db.connect(db_url)
    try:
        assert db.migrate(engine) == db.SCHEMA_VERSION  # a second upgrade: nothing to do
    finally:
        engine.dispose()
    assert (schema(db_url), versions(db_url)) == before


def test_a_fresh_database_gets_the_schema_the_old_release_made(old_release, db_url, tmp_path, request):
    """Alembic's revisions build what the old steps built (and the revisions since add to it),
    column for column, on each backend."""
    if request.node.callspec.params["db_url"] == "sqlite":
        old_url = f"sqlite:///{tmp_path / 'old.db'}"
    else:
        service = request.getfixturevalue("postgres" if db_url.startswith("postgresql") else "mariadb")
        old_url = service.new_database()
    old_python(old_release, f"""
from gradexp.server import db
assert db.migrate(db.connect({old_url!r})) == 0
""")
    engine = db.connect(db_url)
    try:
        assert db.migrate(engine) == 0
        with engine.connect() as conn:
            assert db.current_version(conn) == db.SCHEMA_VERSION
        assert db.migrate(engine) == db.SCHEMA_VERSION
    finally:
        engine.dispose()
    old = db.connect(old_url)  # the old release's database, brought up to date by the revisions since
    try:
        db.migrate(old)
    finally:
        old.dispose()
    assert schema(db_url) == schema(old_url)
    assert versions(db_url) == (list(range(1, db.SCHEMA_VERSION + 1)), db.revision(db.SCHEMA_VERSION))


def test_a_partly_upgraded_old_database_is_finished_from_where_it_stopped(old_release, db_url):
    """A database an older release left at version 3 gets revisions 4 to 6 only."""
    old_python(old_release, f"""
from gradexp.server import db
e = db.connect({db_url!r})
assert db.migrate(e, target=3) == 0
db.create_user(e, "early")
""")
    engine = db.connect(db_url)
    try:
        assert db.migrate(engine) == 3
        assert db.authenticate(engine, db.create_key(engine, "early")).user == "early"
    finally:
        engine.dispose()
    assert versions(db_url) == (list(range(1, db.SCHEMA_VERSION + 1)), db.revision(db.SCHEMA_VERSION))


def _values_src() -> str:
    """``values()`` of tests/services.py, for a child process that imports no test module."""
    import services

    return services.VALUES_SRC


def test_the_migrations_cannot_run_outside_gradexp(tmp_path):
    """Alembic's command line without gradexp's connection says how to migrate instead."""
    ini = tmp_path / "alembic.ini"
    ini.write_text(f"[alembic]\nscript_location = {db.MIGRATIONS_DIR}\n")
    r = subprocess.run([sys.executable, "-m", "alembic", "-c", str(ini), "upgrade", "head"], capture_output=True,
                       text=True, timeout=120, env=clean_env())
    assert r.returncode != 0 and "gradexp.server.db.migrate" in r.stderr
