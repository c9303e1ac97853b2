"""What ``gradexp server`` does: resolve where things live, bootstrap, serve."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from pathlib import Path

import click

from gradexp.server import accounts, db

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
        return cls(db_url=db_url or f"sqlite:///{data_dir / 'gradexp.db'}",
                   store_url=store_url or str(data_dir / "objects"), data_dir=data_dir, embedded=embedded)


    def sqlite_file(self) -> Path | None:
        """The database file, when the database is SQLite on disk."""
        import sqlalchemy as sa

        url = sa.engine.make_url(self.db_url)
        in_memory = url.database in (None, "", ":memory:") or url.query.get("uri") == "true"
        if url.get_backend_name() != "sqlite" or in_memory:
            return None
        assert url.database is not None  # in_memory covers None
        return Path(url.database).expanduser().absolute()


def _engine(paths: Paths, *, create: bool = False):  # type: ignore[no-untyped-def]
    """The database, migrated. Only ``create`` makes a new SQLite file (the server on its first
    start, ``create-user``); the other admin commands refuse one that is not there, so a typo
    in ``--data-dir`` or ``--db`` is an error, not a new empty database."""
    import sqlalchemy as sa

    file = paths.sqlite_file()
    if file is not None and not file.exists():
        if not create:
            raise click.ClickException(f"no server database at {file}: pass the --data-dir (or --db) that "
                                       "the server runs with; `gradexp server` creates it on its first start")
        file.parent.mkdir(parents=True, exist_ok=True)
        click.echo(f"new database {file}", err=True)
    try:
        engine = db.connect(paths.db_url)
        db.migrate(engine)
    except sa.exc.OperationalError as e:  # no such database, refused, wrong password...
        reason = " ".join(str(e.orig).split()) if e.orig is not None else str(e)
        raise click.ClickException(f"cannot open the database {_safe(paths.db_url)}: {reason}") from None
    return engine


def bootstrap(paths: Paths) -> Path | None:
    """On an empty embedded database: create admin ``local`` and keep an API key of it in a
    0600 file (so scripts on this machine can log at once; ``serve`` prints how)."""
    engine = _engine(paths, create=True)
    if db.user_count(engine):
        return None
    db.create_user(engine, BOOTSTRAP_USER, admin=True)
    key = db.create_key(engine, BOOTSTRAP_USER, name="bootstrap")
    path = paths.data_dir / KEY_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return path


def serve(paths: Paths, bind: str, port: int, *, max_body_bytes: int = 2 << 30, access_log: bool = True) -> None:
    try:
        import uvicorn

        from gradexp.server.app import create_app
    except ImportError as e:
        raise click.ClickException(f"the server needs the [server] extra ({e}): from a clone of gradexp, "
                                   "pip install -e '.[server]'") from None
    if paths.embedded:
        created = bootstrap(paths)
        key_file = paths.data_dir / KEY_FILE
        base = f"http://{_link_host(bind)}:{port}"
        if created:
            click.echo(f"Created admin user '{BOOTSTRAP_USER}'; an API key of it is in {created} (mode 0600).",
                       err=True)
        if key_file.exists():
            click.echo(f"Log runs here with `gradexp login --host {base}`, or:\n  export GRADEXP_HOST={base}\n"
                       f"  export GRADEXP_API_KEY=$(cat {key_file})", err=True)
        link = _first_signin_link(paths)
        if link:
            click.echo(f"Sign in to the web pages once with this link, then set a password:\n"
                       f"  {base}/login/link?token={link}\n"
                       f"(it works once, for {accounts.LINK_SECONDS // 3600} h; a restart prints a new one until "
                       f"'{BOOTSTRAP_USER}' has a password)", err=True)
    app = create_app(db_url=paths.db_url, store_url=paths.store_url, max_body_bytes=max_body_bytes,
                     access_log=access_log)
    if access_log:
        _log_access_to_stderr()
    click.echo(f"gradexp server on http://{bind}:{port}  (database {_safe(paths.db_url)}, "
               f"store {_safe(paths.store_url)})", err=True)
    uvicorn.run(app, host=bind, port=port, log_level="warning", access_log=False)


def _log_access_to_stderr() -> None:
    """Send the ``gradexp.access`` lines to stderr with a timestamp, unless logging was set
    up for them already (uvicorn's own access log stays off: these replace it)."""
    logger = logging.getLogger("gradexp.access")
    if logger.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def _link_host(bind: str) -> str:
    return "127.0.0.1" if bind in ("0.0.0.0", "", "::") else (f"[{bind}]" if ":" in bind else bind)


def _first_signin_link(paths: Paths) -> str | None:
    """A one-time sign-in token for the bootstrap admin while it has no password."""
    engine = _engine(paths)
    try:
        if accounts.has_password(engine, BOOTSTRAP_USER) or not db.list_users(engine):
            return None
        return accounts.new_signin_link(engine, BOOTSTRAP_USER)
    except LookupError:  # no user 'local' (the database was set up by hand)
        return None


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

    from gradexp.core.layout import NAME

    if not NAME.match(name) or len(name) > 64:
        raise click.ClickException(f"invalid user name {name!r}: letters, digits, '.', '_', '-'")
    try:
        db.create_user(_engine(paths, create=True), name, admin=admin)
    except sa.exc.IntegrityError:
        raise click.ClickException(f"user or entity {name!r} exists already") from None
    click.echo(f"created user {name!r}; give it a password with `gradexp server set-password {name}`, "
               f"or an API key with `gradexp server create-key {name}`", err=True)


def create_key(paths: Paths, user: str, *, name: str) -> None:
    try:
        key = db.create_key(_engine(paths), user, name=name)
    except LookupError as e:
        raise click.ClickException(str(e)) from None
    click.echo(key)


def set_password(paths: Paths, user: str, password: str) -> None:
    try:
        accounts.set_password(_engine(paths), user, password)
    except (LookupError, ValueError) as e:
        raise click.ClickException(str(e.args[0] if isinstance(e, LookupError) else e)) from None
    click.echo(f"password of {user!r} set; their browser sessions were signed out", err=True)


def signin_link(paths: Paths, user: str, base: str) -> None:
    try:
        token = accounts.new_signin_link(_engine(paths), user)
    except LookupError as e:
        raise click.ClickException(str(e.args[0])) from None
    click.echo(f"{base.rstrip('/')}/login/link?token={token}")


def list_users(paths: Paths) -> None:
    rows = db.list_users(_engine(paths))
    click.echo(f"{'USER':<24} {'ADMIN':<6} {'PASSWORD':<9} {'KEYS':>4}  CREATED")
    for r in rows:
        click.echo(f"{r['name']:<24} {'yes' if r['is_admin'] else 'no':<6} "
                   f"{'set' if r['has_password'] else 'none':<9} {r['keys']:>4}  {_when(r['created_at'])}")


def list_keys(paths: Paths, user: str | None, *, revoked: bool) -> None:
    keys = db.list_keys(_engine(paths), user=user)
    click.echo(f"{'ID':>5}  {'USER':<16} {'KEY':<11} {'NAME':<28} {'CREATED':<17} {'LAST USED':<17} STATE")
    for k in keys:
        if k.revoked_at is not None and not revoked:
            continue
        state = "active" if k.revoked_at is None else f"revoked {_when(k.revoked_at)}"
        click.echo(f"{k.id:>5}  {k.user:<16} {k.prefix + '...':<11} {k.name[:28]:<28} {_when(k.created_at):<17} "
                   f"{_when(k.last_used_at):<17} {state}")


def revoke_key(paths: Paths, key_id: int) -> None:
    if not db.revoke_key(_engine(paths), key_id):
        raise click.ClickException(f"no active key with id {key_id} (see `gradexp server list-keys`)")
    click.echo(f"revoked key {key_id}", err=True)


def _when(t: float | None) -> str:
    import datetime

    if t is None:
        return "never"
    return datetime.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M")
