"""What ``gradexp server`` does: resolve where things live, bootstrap, serve."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import click

from . import db

BOOTSTRAP_USER = "local"
KEY_FILE = "local-api-key"


@dataclasses.dataclass(frozen=True)
class Paths:
    db_url: str
    store_url: str
    data_dir: Path
    embedded: bool
    """True when the database is the default SQLite file (then a first user is bootstrapped)."""

    @classmethod
    def resolve(cls, db_url: str | None, store_url: str | None, data_dir: Path | None) -> Paths:
        if data_dir is None:
            env = os.environ.get("GRADEXP_SERVER_DIR")
            if env:
                data_dir = Path(env)
            else:
                import platformdirs

                data_dir = Path(platformdirs.user_data_dir("gradexp")) / "server"
        data_dir = data_dir.expanduser().absolute()
        db_url = db_url or os.environ.get("GRADEXP_SERVER_DB")
        store_url = store_url or os.environ.get("GRADEXP_SERVER_STORE")
        embedded = db_url is None
        if db_url is None or store_url is None:
            data_dir.mkdir(parents=True, exist_ok=True)
        return cls(db_url=db_url or f"sqlite:///{data_dir / 'gradexp.db'}",
                   store_url=store_url or str(data_dir / "objects"), data_dir=data_dir, embedded=embedded)


def _engine(paths: Paths):  # type: ignore[no-untyped-def]
    engine = db.connect(paths.db_url)
    db.migrate(engine)
    return engine


def bootstrap(paths: Paths) -> Path | None:
    """On an empty embedded database: create user ``local`` and keep its key in a 0600 file."""
    engine = _engine(paths)
    if db.user_count(engine):
        return None
    db.create_user(engine, BOOTSTRAP_USER, admin=True)
    key = db.create_key(engine, BOOTSTRAP_USER, name="bootstrap")
    path = paths.data_dir / KEY_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return path


def serve(paths: Paths, bind: str, port: int, *, max_body_bytes: int = 2 << 30) -> None:
    try:
        import uvicorn

        from .app import create_app
    except ImportError as e:
        raise click.ClickException(f"the server needs its extra: pip install 'gradexp[server]' ({e})") from None
    if paths.embedded:
        created = bootstrap(paths)
        key_file = paths.data_dir / KEY_FILE
        if created:
            click.echo(f"Created user '{BOOTSTRAP_USER}'; its API key is in {created} (mode 0600).", err=True)
        if key_file.exists():
            click.echo(f"Log runs here with:\n  export GRADEXP_HOST=http://{bind}:{port}\n"
                       f"  export GRADEXP_API_KEY=$(cat {key_file})", err=True)
    app = create_app(db_url=paths.db_url, store_url=paths.store_url, max_body_bytes=max_body_bytes)
    click.echo(f"gradexp server on http://{bind}:{port}  (database {_safe(paths.db_url)}, "
               f"store {_safe(paths.store_url)})", err=True)
    uvicorn.run(app, host=bind, port=port, log_level="warning", access_log=False)


def _safe(url: str) -> str:
    """The URL without a password or secret key in it."""
    from urllib.parse import urlsplit, urlunsplit

    if "://" not in url or ("@" not in url and "secret" not in url and "password" not in url):
        return url
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2] if "@" in parts.netloc else parts.netloc
    user = parts.username if parts.scheme not in ("s3", "gs") else None  # there it is a credential
    if user:
        netloc = f"{user}@{netloc}"
    query = "&".join(q for q in parts.query.split("&") if not q.startswith(("secret_key", "access_key",
                                                                              "session_token", "password")))
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def create_user(paths: Paths, name: str, *, admin: bool) -> None:
    import sqlalchemy as sa

    from ..server.store import _RUN_ID

    if not _RUN_ID.match(name) or len(name) > 64:
        raise click.ClickException(f"invalid user name {name!r}: letters, digits, '.', '_', '-'")
    try:
        db.create_user(_engine(paths), name, admin=admin)
    except sa.exc.IntegrityError:
        raise click.ClickException(f"user or entity {name!r} exists already") from None
    click.echo(f"created user {name!r}", err=True)


def create_key(paths: Paths, user: str, *, name: str) -> None:
    try:
        key = db.create_key(_engine(paths), user, name=name)
    except LookupError as e:
        raise click.ClickException(str(e)) from None
    click.echo(key)
