"""Metadata in SQL through SQLAlchemy 2: schema, in-place migrations, and the queries.

SQLite (the embedded default), PostgreSQL (psycopg 3) and MySQL/MariaDB (PyMySQL)
run the same code. Migrations are Alembic revisions (``migrations/versions``, one per
schema version, each in its own transaction); ``migrate()`` applies the missing ones, so
an existing database is upgraded in place. Each applied revision is also recorded in
``gradexp_schema``, the table releases before Alembic read: a server of such a release
sharing the database (a rolling upgrade, a rollback) finds its schema done rather than
running its own steps again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import secrets
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

import sqlalchemy as sa
from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Connection, Engine

from gradexp.core.limits import MAX_KEY_LENGTH  # frames.key holds a whole key; longer ones are refused on upload

_TIME = sa.Double
"""Timestamps (Unix seconds). DOUBLE: MySQL/MariaDB's FLOAT is 4 bytes and reaches the
client with 6 significant digits, an error of over an hour for a current timestamp."""
_LONG_TEXT = sa.Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")
"""JSON text of any size: MySQL/MariaDB's TEXT holds 64 KiB, less than the summary of a few
thousand metrics (elsewhere TEXT has no such limit)."""


def define_tables(md: sa.MetaData, version: int) -> None:
    """The tables as of schema ``version`` (columns carry the version that added them): the
    current ones for the queries below, older ones for the migrations that reach them."""
    def since(v: int, *cols: sa.schema.SchemaItem) -> list[sa.schema.SchemaItem]:
        return list(cols) if version >= v else []
    json_text = _LONG_TEXT if version >= 6 else sa.Text

    sa.Table("gradexp_schema", md, sa.Column("version", sa.Integer, nullable=False))
    sa.Table(
        "users", md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        sa.Column("is_admin", sa.Boolean, nullable=False, default=False),
        sa.Column("created_at", _TIME, nullable=False),
        *since(4, sa.Column("password_hash", sa.String(256), nullable=True)),
    )
    sa.Table(
        "entities", md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id"), nullable=False),
    )
    sa.Table(
        "api_keys", md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id"), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False, unique=True),
        sa.Column("created_at", _TIME, nullable=False),
        sa.Column("revoked_at", _TIME, nullable=True),
        *since(2, sa.Column("last_used_at", _TIME, nullable=True)),
    )
    sa.Table(
        "projects", md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("entity_id", sa.Integer, sa.ForeignKey("entities.id"), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.UniqueConstraint("entity_id", "name", name="uq_projects_entity_name"),
    )
    sa.Table(
        "runs", md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("project_id", sa.Integer, sa.ForeignKey("projects.id"), nullable=False),
        sa.Column("run_id", sa.String(128), nullable=False),
        sa.Column("name", sa.String(256), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("tags", json_text, nullable=False),
        sa.Column("notes", json_text, nullable=True),
        sa.Column("config", json_text, nullable=False),
        sa.Column("summary", json_text, nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.Column("updated_at", _TIME, nullable=False),
        sa.Column("finished_at", _TIME, nullable=True),
        sa.Column("exit_code", sa.Integer, nullable=True),
        sa.Column("history_object", sa.String(512), nullable=True),
        *since(2, sa.Column("heartbeat_at", _TIME, nullable=True)),
        *since(7, sa.Column("run_group", sa.String(256), nullable=True),
               sa.Column("job_type", sa.String(256), nullable=True)),
        sa.UniqueConstraint("project_id", "run_id", name="uq_runs_project_run"),
        *since(2, sa.Index("ix_runs_status", "status")),
    )
    sa.Table(
        "parts", md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("run_pk", sa.Integer, sa.ForeignKey("runs.id"), nullable=False),
        sa.Column("stream", sa.String(16), nullable=False),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("object_key", sa.String(512), nullable=False),
        sa.Column("uploaded_at", _TIME, nullable=False),
        sa.UniqueConstraint("run_pk", "stream", "seq", name="uq_parts_run_stream_seq"),
    )
    sa.Table(
        "frames", md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("run_pk", sa.Integer, sa.ForeignKey("runs.id"), nullable=False),
        sa.Column("part_id", sa.Integer, sa.ForeignKey("parts.id"), nullable=False),
        sa.Column("kind", sa.SmallInteger, nullable=False),
        sa.Column("key", sa.String(MAX_KEY_LENGTH), nullable=False),
        sa.Column("step_min", sa.BigInteger, nullable=False),
        sa.Column("step_max", sa.BigInteger, nullable=False),
        sa.Column("rows", sa.Integer, nullable=False),
        sa.Column("offset", sa.BigInteger, nullable=False),
        sa.Column("length", sa.BigInteger, nullable=False),
        sa.Index("ix_frames_run_key_step", "run_pk", "kind", "key", "step_min", mysql_length={"key": 255}),
    )
    sa.Table(
        "history_segments", md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("run_pk", sa.Integer, sa.ForeignKey("runs.id"), nullable=False),
        sa.Column("first_seq", sa.Integer, nullable=False),
        sa.Column("last_seq", sa.Integer, nullable=False),
        sa.Column("object_key", sa.String(512), nullable=False),
        sa.UniqueConstraint("run_pk", "first_seq", name="uq_segments_run_first"),
    )
    if version >= 4:
        sa.Table(
            "sessions", md,
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
            sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id"), nullable=False),
            sa.Column("csrf", sa.String(64), nullable=False),
            sa.Column("created_at", _TIME, nullable=False),
            sa.Column("expires_at", _TIME, nullable=False),
        )
        sa.Table(
            "auth_codes", md,
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("code_hash", sa.String(64), nullable=False, unique=True),
            sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id"), nullable=False),
            sa.Column("client", sa.String(64), nullable=False),
            sa.Column("redirect_uri", sa.String(512), nullable=False),
            sa.Column("challenge", sa.String(128), nullable=False),
            sa.Column("expires_at", _TIME, nullable=False),
            sa.Column("used_at", _TIME, nullable=True),
            sa.Column("key_id", sa.Integer, sa.ForeignKey("api_keys.id"), nullable=True),
        )
        sa.Table(
            "login_failures", md,
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("name", sa.String(64), nullable=False),
            sa.Column("address", sa.String(64), nullable=False),
            sa.Column("at", _TIME, nullable=False),
            sa.Index("ix_login_failures_name_at", "name", "at"),
            sa.Index("ix_login_failures_address_at", "address", "at"),
        )
        sa.Table(
            "signin_links", md,
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
            sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id"), nullable=False),
            sa.Column("expires_at", _TIME, nullable=False),
            sa.Column("used_at", _TIME, nullable=True),
        )


meta = sa.MetaData()
SCHEMA_VERSION = 7
"""The newest schema: Alembic revision ``0007`` in ``migrations/versions``."""
MIGRATIONS_DIR = Path(__file__).parent / "migrations"
define_tables(meta, SCHEMA_VERSION)
schema_version = meta.tables["gradexp_schema"]
users = meta.tables["users"]
entities = meta.tables["entities"]
api_keys = meta.tables["api_keys"]
projects = meta.tables["projects"]
runs = meta.tables["runs"]
parts = meta.tables["parts"]
frames = meta.tables["frames"]
segments = meta.tables["history_segments"]

sessions = meta.tables["sessions"]
auth_codes = meta.tables["auth_codes"]
login_failures = meta.tables["login_failures"]
signin_links = meta.tables["signin_links"]

def connect(url: str) -> Engine:
    """An engine for ``url``, with SQLite set up for several threads and processes."""
    kw: dict[str, Any] = {"future": True, "pool_pre_ping": True}
    if url.startswith("sqlite"):
        kw["connect_args"] = {"check_same_thread": False, "timeout": 30}
    engine = sa.create_engine(url, **kw)
    if url.startswith("sqlite"):
        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @sa.event.listens_for(engine, "savepoint")
        def _savepoint_inside_a_transaction(conn: Connection, _: Any) -> None:
            # Python's sqlite3 opens a transaction only before INSERT, UPDATE or DELETE, so a
            # SAVEPOINT that comes first opens one of its own, and its RELEASE commits it: what
            # the outer transaction did after that (a part's frames after its row) was no longer
            # undone with it. A server killed, or a database locked, between the two left a part
            # without frames that a retried upload found "already stored" (a tensor step lost).
            # BEGIN first makes the savepoint nest inside the outer transaction, as it does on
            # the other databases.
            dbapi = conn.connection.driver_connection
            if dbapi is not None and not dbapi.in_transaction:
                dbapi.execute("BEGIN")
    return engine


def current_version(conn: Connection) -> int:
    """The schema version of the database: its Alembic revision (``0001``... are versions
    1...), else the version a release before Alembic recorded in ``gradexp_schema``, else 0."""
    revision = MigrationContext.configure(conn).get_current_revision()
    if revision is not None:
        return int(revision)
    if not sa.inspect(conn).has_table("gradexp_schema"):
        return 0
    return conn.execute(sa.select(sa.func.max(schema_version.c.version))).scalar() or 0


@contextlib.contextmanager
def _migration_lock(engine: Engine) -> Iterator[None]:
    """Hold a lock across processes while migrating: servers (and CLI commands) starting at
    once on a fresh database would otherwise race to create the same tables."""
    # Alembic takes no lock of its own: two processes would both find the database empty.
    dialect = engine.dialect.name
    if dialect == "sqlite":
        path = engine.url.database
        if not path or path == ":memory:" or fcntl is None:
            yield
            return
        with open(f"{path}.migrate-lock", "a") as f:  # beside the database file
            fcntl.flock(f, fcntl.LOCK_EX)
            yield
        return
    if dialect not in ("postgresql", "mysql", "mariadb"):
        yield
        return
    with engine.connect() as conn:  # a session-level lock, released with the session at worst
        if dialect == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": _MIGRATION_LOCK})
        elif conn.execute(sa.text("SELECT GET_LOCK('gradexp_migrate', 600)")).scalar() != 1:
            raise RuntimeError("another process held the gradexp migration lock for 10 minutes")
        conn.commit()
        try:
            yield
        finally:
            if dialect == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": _MIGRATION_LOCK})
            else:
                conn.execute(sa.text("SELECT RELEASE_LOCK('gradexp_migrate')"))
            conn.commit()


_MIGRATION_LOCK = 0x6772616465787001  # "gradexp" + 1: a fixed advisory lock key


def _alembic(conn: Connection) -> AlembicConfig:
    """Alembic's configuration for the package's migrations, over ``conn``."""
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = conn
    return config


def migrate(engine: Engine, *, target: int = SCHEMA_VERSION) -> int:
    """Bring the database to version ``target`` with Alembic; return the version it was at.

    A database of a release before Alembic (``gradexp_schema`` at version N) is first
    stamped at revision N, then upgraded: its rows stay where they are."""
    with _migration_lock(engine), engine.connect() as conn:
        start = current_version(conn)
        config = _alembic(conn)
        if start and MigrationContext.configure(conn).get_current_revision() is None:
            command.stamp(config, revision(start))
        if start < target:
            command.upgrade(config, revision(target))
        conn.commit()
    return start


def revision(version: int) -> str:
    """The Alembic revision of schema ``version``."""
    return f"{version:04d}"


# -- users and keys ---------------------------------------------------------------------------

KEY_PREFIX = "gx_"


def hash_key(key: str) -> str:
    """Keys are 256-bit random tokens, so one SHA-256 is a sound one-way hash for them."""
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Viewer:
    user_id: int
    user: str
    entity_id: int
    entity: str
    key_id: int


def inserted_id(result: sa.CursorResult[Any]) -> int:
    """The primary key of the row a single-row INSERT made (SQLAlchemy types it optional:
    an executemany has none)."""
    key = result.inserted_primary_key
    assert key is not None
    return key[0]


def create_user(engine: Engine, name: str, *, admin: bool = False) -> int:
    now = time.time()
    with engine.begin() as conn:
        uid = inserted_id(conn.execute(sa.insert(users).values(name=name, is_admin=admin, created_at=now)))
        conn.execute(sa.insert(entities).values(name=name, user_id=uid))
    return uid


def create_key(engine: Engine, user: str, *, name: str = "default") -> str:
    """A new API key for ``user``; only its hash is stored, so this is the one chance to see it."""
    return create_key_with_id(engine, user, name=name)[0]


def create_key_with_id(engine: Engine, user: str, *, name: str = "default") -> tuple[str, int]:
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    with engine.begin() as conn:
        uid = conn.execute(sa.select(users.c.id).where(users.c.name == user)).scalar()
        if uid is None:
            raise LookupError(f"no user {user!r}")
        key_id = inserted_id(conn.execute(sa.insert(api_keys).values(
            user_id=uid, name=name[:128], prefix=key[:8], hash=hash_key(key),
            created_at=time.time())))
    return key, key_id


@dataclass(frozen=True)
class KeyInfo:
    """An API key as its owner sees it (never the key itself: only its first characters)."""

    id: int
    user: str
    name: str
    prefix: str
    created_at: float
    last_used_at: float | None
    revoked_at: float | None


def list_keys(engine: Engine, *, user: str | None = None, user_id: int | None = None) -> list[KeyInfo]:
    """Keys, newest first; of one user if ``user`` or ``user_id`` is given."""
    q = (sa.select(api_keys.c.id, users.c.name, api_keys.c.name, api_keys.c.prefix, api_keys.c.created_at,
                   api_keys.c.last_used_at, api_keys.c.revoked_at)
         .join(users, users.c.id == api_keys.c.user_id).order_by(api_keys.c.id.desc()))
    if user is not None:
        q = q.where(users.c.name == user)
    if user_id is not None:
        q = q.where(users.c.id == user_id)
    with engine.connect() as conn:
        return [KeyInfo(*row) for row in conn.execute(q)]


def revoke_key(engine: Engine, key_id: int, *, user_id: int | None = None) -> bool:
    """Revoke key ``key_id`` (only if it belongs to ``user_id``, when given); False if there
    was no such live key."""
    q = sa.update(api_keys).where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
    if user_id is not None:
        q = q.where(api_keys.c.user_id == user_id)
    with engine.begin() as conn:
        return bool(conn.execute(q.values(revoked_at=time.time())).rowcount)


def list_users(engine: Engine) -> list[dict[str, Any]]:
    keys = (sa.select(api_keys.c.user_id, sa.func.count().label("n")).where(api_keys.c.revoked_at.is_(None))
            .group_by(api_keys.c.user_id).subquery())
    q = (sa.select(users.c.name, users.c.is_admin, users.c.created_at,
                   users.c.password_hash.isnot(None).label("has_password"),
                   sa.func.coalesce(keys.c.n, 0).label("keys"))
         .outerjoin(keys, keys.c.user_id == users.c.id).order_by(users.c.name))
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(q).mappings()]


def user_count(engine: Engine) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(users)).scalar() or 0


def authenticate(engine: Engine, key: str) -> Viewer | None:
    h = hash_key(key)
    with engine.begin() as conn:
        row = conn.execute(
            sa.select(api_keys.c.id, users.c.id, users.c.name, entities.c.id, entities.c.name,
                      api_keys.c.last_used_at)
            .join(users, users.c.id == api_keys.c.user_id)
            .join(entities, entities.c.user_id == users.c.id)
            .where(api_keys.c.hash == h, api_keys.c.revoked_at.is_(None))
        ).first()
        if row is None:
            return None
        now = time.time()
        if row[5] is None or now - row[5] > 60:  # at most one write a minute per key
            conn.execute(sa.update(api_keys).where(api_keys.c.id == row[0]).values(last_used_at=now))
    return Viewer(user_id=row[1], user=row[2], entity_id=row[3], entity=row[4], key_id=row[0])


# -- projects and runs ------------------------------------------------------------------------

def entity_id(conn: Connection, name: str) -> int | None:
    return conn.execute(sa.select(entities.c.id).where(entities.c.name == name)).scalar()


def _insert_ignore(conn: Connection, table: sa.Table, values: dict[str, Any]) -> None:
    """INSERT that tolerates a concurrent insert of the same unique row (several servers)."""
    try:
        with conn.begin_nested():
            conn.execute(sa.insert(table).values(**values))
    except sa.exc.IntegrityError:
        pass


def project_id(conn: Connection, entity: int, name: str, *, create: bool) -> int | None:
    q = sa.select(projects.c.id).where(projects.c.entity_id == entity, projects.c.name == name)
    pid = conn.execute(q).scalar()
    if pid is None and create:
        _insert_ignore(conn, projects, {"entity_id": entity, "name": name, "created_at": time.time()})
        pid = conn.execute(q).scalar()
    return pid


def run_pk(conn: Connection, entity: int, project: str, run_id: str) -> int | None:
    return conn.execute(
        sa.select(runs.c.id).join(projects, projects.c.id == runs.c.project_id)
        .where(projects.c.entity_id == entity, projects.c.name == project, runs.c.run_id == run_id)
    ).scalar()


def upsert_run(conn: Connection, entity: int, project: str, run_id: str, fields: dict[str, Any]) -> int:
    pid = project_id(conn, entity, project, create=True)
    assert pid is not None
    now = time.time()
    values = _run_values(fields)
    q = sa.select(runs.c.id).where(runs.c.project_id == pid, runs.c.run_id == run_id)
    pk = conn.execute(q).scalar()
    if pk is None:
        row = {"project_id": pid, "run_id": run_id, "status": "running", "tags": "[]", "config": "{}",
               "summary": "{}", "created_at": fields.get("created_at") or now, "updated_at": now,
               "heartbeat_at": now, **values}
        _insert_ignore(conn, runs, row)
        pk = conn.execute(q).scalar()
        if pk is None:
            raise RuntimeError(f"could not create run {project}/{run_id}")
    else:
        if values.get("status") == "running":  # reopened (resumed): finished again later, history too
            values.update(finished_at=None, exit_code=None, history_object=None)
        conn.execute(sa.update(runs).where(runs.c.id == pk).values(updated_at=now, heartbeat_at=now, **values))
    return pk


def _run_values(fields: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in ("name", "notes", "job_type"):
        if name in fields:
            out[name] = fields[name]
    if fields.get("status") is not None:  # null: as if not given
        out["status"] = fields["status"]
    if "group" in fields:
        out["run_group"] = fields["group"]
    for name in ("tags", "config", "summary"):
        if name in fields:
            out[name] = json.dumps(fields[name])
    return out


def update_run(conn: Connection, pk: int, **values: Any) -> None:
    conn.execute(sa.update(runs).where(runs.c.id == pk).values(updated_at=time.time(), **values))


def run_row(conn: Connection, pk: int) -> dict[str, Any]:
    row = conn.execute(
        sa.select(runs, projects.c.name.label("project"), entities.c.name.label("entity"))
        .join(projects, projects.c.id == runs.c.project_id)
        .join(entities, entities.c.id == projects.c.entity_id)
        .where(runs.c.id == pk)).mappings().one()
    return _run_dict(row)


STALE_AFTER = 120.0
"""Seconds without a heartbeat after which a running run is reported crashed (its client
sends one every 30 s while it lives)."""


def _run_dict(row: Any) -> dict[str, Any]:
    status = row["status"]
    if status == "running" and (row["heartbeat_at"] or 0) < time.time() - STALE_AFTER:
        status = "crashed"
    return {
        "entity": row["entity"], "project": row["project"], "id": row["run_id"], "name": row["name"],
        "status": status, "tags": json.loads(row["tags"] or "[]"), "notes": row["notes"],
        "group": row["run_group"], "job_type": row["job_type"],
        "config": json.loads(row["config"] or "{}"), "summary": json.loads(row["summary"] or "{}"),
        "created_at": row["created_at"], "updated_at": row["updated_at"],
        "finished_at": row["finished_at"], "exit_code": row["exit_code"],
        "heartbeat_at": row["heartbeat_at"],
    }


RunsCursor = tuple[float, int]
"""Where a page of the runs listing ended: the last run's ``created_at`` and primary key."""


def list_runs(conn: Connection, entity: int, *, project: str | None = None, status: str | None = None,
              tags: Iterable[str] = (), limit: int = 1000) -> list[dict[str, Any]]:
    """The newest ``limit`` runs of ``entity`` that match (all of them: see :func:`page_runs`)."""
    return page_runs(conn, entity, project=project, status=status, tags=tags, limit=limit)[0]


def page_runs(conn: Connection, entity: int, *, project: str | None = None, status: str | None = None,
              tags: Iterable[str] = (), limit: int = 1000,
              after: RunsCursor | None = None) -> tuple[list[dict[str, Any]], RunsCursor | None]:
    """One page of ``entity``'s runs, newest first, and the cursor of the next page (None: last).

    Keyset paging on (``created_at``, id): a run created while a client pages is never shown
    twice and never shifts the pages after it.
    """
    q = (sa.select(runs, projects.c.name.label("project"), entities.c.name.label("entity"))
         .join(projects, projects.c.id == runs.c.project_id)
         .join(entities, entities.c.id == projects.c.entity_id)
         .where(projects.c.entity_id == entity)
         .order_by(runs.c.created_at.desc(), runs.c.id.desc()))
    if project:
        q = q.where(projects.c.name == project)
    if status:  # as _run_dict reports it: a running run without a recent heartbeat is crashed
        stale = runs.c.heartbeat_at.is_(None) | (runs.c.heartbeat_at < time.time() - STALE_AFTER)
        if status == "crashed":
            q = q.where((runs.c.status == "crashed") | ((runs.c.status == "running") & stale))
        elif status == "running":
            q = q.where((runs.c.status == "running") & ~stale)
        else:
            q = q.where(runs.c.status == status)
    wanted = set(tags)  # tags are JSON text: filtered here, so rows are read in batches until the page is full
    batch = limit + 1 if not wanted else max(limit + 1, 1000)
    found: list[tuple[RunsCursor, dict[str, Any]]] = []
    cursor = after
    while len(found) <= limit:
        page = q
        if cursor is not None:
            page = q.where((runs.c.created_at < cursor[0])
                           | ((runs.c.created_at == cursor[0]) & (runs.c.id < cursor[1])))
        rows = conn.execute(page.limit(batch)).mappings().all()
        for r in rows:
            d = _run_dict(r)
            # tags stored as null or an object by servers before request validation must not fail a listing
            if not wanted or (isinstance(d["tags"], list) and wanted.issubset(d["tags"])):
                found.append(((r["created_at"], r["id"]), d))
        if len(rows) < batch:
            break
        cursor = (rows[-1]["created_at"], rows[-1]["id"])
    more = len(found) > limit
    found = found[:limit]
    return [d for _, d in found], (found[-1][0] if more else None)


def list_projects(conn: Connection, entity: int) -> list[dict[str, Any]]:
    q = (sa.select(projects.c.name, projects.c.created_at, sa.func.count(runs.c.id).label("runs"))
         .outerjoin(runs, runs.c.project_id == projects.c.id)
         .where(projects.c.entity_id == entity).group_by(projects.c.id, projects.c.name, projects.c.created_at)
         .order_by(projects.c.name))
    return [dict(r) for r in conn.execute(q).mappings()]


# -- parts and frames --------------------------------------------------------------------------

def part(conn: Connection, pk: int, stream: str, seq: int) -> dict[str, Any] | None:
    row = conn.execute(sa.select(parts).where(parts.c.run_pk == pk, parts.c.stream == stream,
                                              parts.c.seq == seq)).mappings().first()
    return dict(row) if row else None


def add_part(conn: Connection, pk: int, stream: str, seq: int, sha256: str, size: int, object_key: str,
             index: list[Any]) -> bool:
    """Record an uploaded part and its frames; False if an identical part was already there."""
    try:
        with conn.begin_nested():
            part_id = inserted_id(conn.execute(sa.insert(parts).values(
                run_pk=pk, stream=stream, seq=seq, sha256=sha256, size=size, object_key=object_key,
                uploaded_at=time.time())))
    except sa.exc.IntegrityError:
        return False
    if index:
        conn.execute(sa.insert(frames), [
            {"run_pk": pk, "part_id": part_id, "kind": f.kind, "key": f.key, "step_min": f.step_min,
             "step_max": f.step_max, "rows": f.rows, "offset": f.offset, "length": f.end - f.offset}
            for f in index])
    return True


def part_counts(conn: Connection, pk: int) -> dict[str, int]:
    q = sa.select(parts.c.stream, sa.func.count()).where(parts.c.run_pk == pk).group_by(parts.c.stream)
    return {s: n for s, n in conn.execute(q)}


def history_parts(conn: Connection, pk: int) -> list[dict[str, Any]]:
    q = sa.select(parts).where(parts.c.run_pk == pk, parts.c.stream == "history").order_by(parts.c.seq)
    return [dict(r) for r in conn.execute(q).mappings()]


def tensor_frames(conn: Connection, pk: int, key: str, step: int | None = None) -> list[dict[str, Any]]:
    """Frames of tensor ``key`` (holding ``step`` if given), last write first."""
    q = (sa.select(frames.c.step_min, frames.c.step_max, frames.c.rows, frames.c.offset, frames.c.length,
                   parts.c.object_key, parts.c.seq)
         .join(parts, parts.c.id == frames.c.part_id)
         .where(frames.c.run_pk == pk, frames.c.kind == 2, frames.c.key == key))
    if step is not None:
        q = q.where(frames.c.step_min <= step, frames.c.step_max >= step)
    q = q.order_by(parts.c.seq.desc(), frames.c.offset.desc())
    return [dict(r) for r in conn.execute(q).mappings()]


def stream_frames(conn: Connection, pk: int, stream: str, since: int = 0) -> list[dict[str, Any]]:
    """History frames of a side stream (console, system) holding rows from step ``since`` on,
    in write order."""
    q = (sa.select(frames.c.offset, frames.c.length, parts.c.object_key)
         .join(parts, parts.c.id == frames.c.part_id)
         .where(frames.c.run_pk == pk, parts.c.stream == stream, frames.c.kind == 1, frames.c.step_max >= since)
         .order_by(parts.c.seq, frames.c.offset))
    return [dict(r) for r in conn.execute(q).mappings()]


def tensor_keys(conn: Connection, pk: int) -> list[str]:
    q = sa.select(frames.c.key).where(frames.c.run_pk == pk, frames.c.kind == 2).distinct().order_by(frames.c.key)
    return [k for (k,) in conn.execute(q)]


def history_segments(conn: Connection, pk: int) -> list[dict[str, Any]]:
    q = sa.select(segments).where(segments.c.run_pk == pk).order_by(segments.c.first_seq)
    return [dict(r) for r in conn.execute(q).mappings()]


def add_segment(conn: Connection, pk: int, first: int, last: int, object_key: str) -> None:
    _insert_ignore(conn, segments, {"run_pk": pk, "first_seq": first, "last_seq": last,
                                    "object_key": object_key})
