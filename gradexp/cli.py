"""The ``gradexp`` command line."""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from gradexp._version import __version__

if TYPE_CHECKING:
    from gradexp.api import Api
    from gradexp.core.client import Client
    from gradexp.core.errors import ApiError
    from gradexp.server.cli import Paths

_DIR_OPTION = click.option("--dir", "base_dir", type=click.Path(file_okay=False, path_type=Path),
                           default=None, help="Folder of runs (default: $GRADEXP_DIR or ./gradexp-runs).")

SERVER_MODULES = frozenset({"starlette", "uvicorn", "httptools", "uvloop", "sqlalchemy", "psycopg", "pymysql",
                            "jinja2"})
"""Top-level modules of the ``[server]`` extra (pyproject.toml)."""

SERVER_EXTRA = ("install the [server] extra: from a clone of gradexp, pip install -e '.[server]'; "
                "from a built wheel, pip install 'dist/gradexp-<version>-py3-none-any.whl[server]' "
                "(the name gradexp on the package index is another project)")

VIEWER_ATTEMPTS = 5
VIEWER_DEADLINE = 30.0
"""`gradexp sync`'s first request (whose key is this?) is tried this often within this
many seconds: ~4 s of backoff for a refused connection, a Retry-After of up to ~30 s."""


class _Commands(click.Group):
    """The top command group: a failure the user can act on ends as one ``Error:`` line.

    Those are gradexp's own errors (a run not found, a server's refusal, a damaged part),
    a server that cannot be reached, and the operating system's refusals (``OSError``: a
    missing folder, a full disk, a denied permission), whose messages name what is at
    fault. Every other exception is a bug in gradexp and keeps its traceback.
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as e:
            message = _user_error(e)
            if message is None:
                raise
            raise click.ClickException(message) from None


def _user_error(e: BaseException) -> str | None:
    """One line for an error the user can act on; None for a bug."""
    from gradexp.core.errors import ApiError, CorruptPartError, RunNotFoundError, UsageError

    if isinstance(e, ApiError):
        return _api_error(e)
    if isinstance(e, (RunNotFoundError, CorruptPartError, UsageError)):
        return str(e)
    if isinstance(e, ModuleNotFoundError) and (e.name or "").partition(".")[0] in SERVER_MODULES:
        return f"the gradexp server needs the module {e.name!r}: {SERVER_EXTRA}"
    requests = sys.modules.get("requests")  # nothing can have raised its errors if it is not loaded
    if requests is not None and isinstance(e, (requests.ConnectionError, requests.Timeout)):
        if e.request is None:  # raised by gradexp with its own message
            return str(e)
        return f"cannot reach {e.request.url}: {'timed out' if isinstance(e, requests.Timeout) else _reason(e)}"
    if requests is not None and isinstance(e, requests.JSONDecodeError):
        return f"the server's answer is not JSON: is --host a gradexp server? ({e})"
    if isinstance(e, OSError):
        return str(e)
    return None


def _reason(e: BaseException) -> str:
    """The innermost cause of a network error ("Connection refused"), not urllib3's chain."""
    seen: set[int] = set()
    todo: list[BaseException] = [e]
    found: OSError | None = None
    while todo:
        x = todo.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.strerror:
            found = x
        todo.extend(c for c in (x.__cause__, x.__context__, getattr(x, "reason", None), *x.args)
                    if isinstance(c, BaseException))
    return found.strerror if found is not None and found.strerror else str(e)


def _api_error(e: ApiError) -> str:
    """An ApiError as one line, with what to do about a key the server refuses."""
    if e.status == 401:
        return f"{e}; the server does not accept this API key: run `gradexp login` or pass --api-key"
    return str(e)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="gradexp")
def main() -> None:
    """gradexp: experiment tracking that keeps the tensors."""


@main.command()
@click.argument("run")
@click.option("--parquet", "fmt", flag_value="parquet", default=True,
              help="Write Parquet (the default, and for now the only format).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="History file to write (default: ./<project>-<run id>.parquet).")
@click.option("--tensors", is_flag=True,
              help="Also write every tensor, one Parquet file per key, to <output stem>.tensors/.")
@_DIR_OPTION
@click.option("--host", default=None, help="Server for entity/project/run_id refs (default: $GRADEXP_HOST).")
@click.option("--api-key", default=None, help="API key (default: $GRADEXP_API_KEY).")
def export(run: str, fmt: str, output: Path | None, tensors: bool, base_dir: Path | None,
           host: str | None, api_key: str | None) -> None:
    """Export RUN to Parquet: a run folder, project/run_id or a run id under --dir, or
    entity/project/run_id on the server."""
    from gradexp.api import Api
    from gradexp.core.errors import RunNotFoundError
    from gradexp.read import export as _export

    api = Api(dir=base_dir, host=host, api_key=api_key)
    if api.host and run.count("/") == 2 and not Path(run).exists():  # a server's run, as Api.run decides
        _client(api)
    try:
        stored = api.run(run)
    except RunNotFoundError as e:
        hint = ""
        if not api.host and run.count("/") == 2:
            hint = ("; for a run on a server (entity/project/run_id) run `gradexp login`, "
                    "or pass --host and --api-key")
        raise click.ClickException(f"{e}{hint}") from None
    out = output or Path(f"{stored.project}-{stored.id}.parquet")
    if not out.parent.is_dir():
        raise click.ClickException(f"cannot write {out}: there is no folder {out.parent}")
    t0 = time.perf_counter()
    with _warning_lines():
        table = stored.history()
    try:
        _export.write_history_parquet(table, out)
    except OSError as e:  # a full disk, a denied permission...
        raise click.ClickException(f"cannot write {out}: {e}") from None
    click.echo(f"history: {table.num_rows} steps x {table.num_columns} columns -> {out} "
               f"({out.stat().st_size / 1e6:.2f} MB, {time.perf_counter() - t0:.2f} s)", err=True)
    if tensors:
        folder = out.with_name(out.stem + ".tensors")
        total = _export.tensor_count(stored)
        with _warning_lines(), click.progressbar(length=max(total, 1), label="tensors", file=sys.stderr,
                                                 show_pos=True, show_percent=True) as bar:
            done = _export.export_tensors(stored, folder, progress=bar.update)
        skipped = f" ({done.skipped} damaged, skipped)" if done.skipped else ""
        click.echo(f"tensors: {done.written}{skipped} in {len(done.paths)} files -> {folder}/", err=True)


@contextlib.contextmanager
def _warning_lines() -> Iterator[None]:
    """gradexp's warnings in the block (damaged data skipped...) as one ``Warning:`` line each,
    printed after it: not through a progress bar, not as Python's two-line format."""
    from gradexp.core.errors import GradexpWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", GradexpWarning)
        try:
            yield
        finally:
            for w in caught:
                click.echo(f"Warning: {str(w.message).removeprefix('gradexp: ')}", err=True)


def _client(api: Api) -> Client:
    """``api.client``, or one line saying how to name a server and a key."""
    if not api.host:
        raise click.ClickException("not logged in: run `gradexp login`, or pass --host and --api-key "
                                   "(or set GRADEXP_HOST and GRADEXP_API_KEY)")
    try:
        return api.client
    except ValueError:  # the client refuses a host without a key
        raise click.ClickException(f"no API key for {api.host}: run `gradexp login --host {api.host}`, "
                                   "or pass --api-key (or set GRADEXP_API_KEY)") from None


@main.command("runs")
@click.argument("project", required=False)
@_DIR_OPTION
@click.option("--host", default=None, help="List the runs on this server (default for an entity/project "
                                           "PROJECT: $GRADEXP_HOST, else the last `gradexp login`'s).")
@click.option("--api-key", default=None, help="API key (default: $GRADEXP_API_KEY, else the one `gradexp login` "
                                              "stored).")
@click.option("--status", type=click.Choice(["running", "finished", "failed", "crashed"]), default=None,
              help="Only runs with this status.")
@click.option("--tag", "tags", multiple=True, help="Only runs with this tag (repeat: all of them).")
def runs_(project: str | None, base_dir: Path | None, host: str | None, api_key: str | None,
          status: str | None, tags: tuple[str, ...]) -> None:
    """List runs (of PROJECT, if given), newest first: the run folders under --dir, or with
    --host or an entity/project PROJECT the runs on the server."""
    from gradexp.api import Api

    api = Api(dir=base_dir, host=host, api_key=api_key)
    remote = host is not None or (project is not None and "/" in project)
    filters: dict[str, Any] = {k: v for k, v in (("status", status), ("tags", tags)) if v}
    if remote:
        client = _client(api)
        if project is not None and (project.count("/") > 1 or "" in project.split("/")):
            raise click.ClickException(f"a project on a server is entity/project (or a project of yours), "
                                       f"not {project!r}")
        if project is not None and "/" not in project:  # a project of the viewer's
            project = f"{client.json('GET', '/viewer')['entity']}/{project}"
        found = api.runs(project, **filters)
        where = f"on {api.host}"
    else:
        api.host = ""  # the run folders, whatever server is set up
        found = api.runs(project, **filters)
        where = f"under {api.dir}"
    described = "".join([f" with status {status}" if status else ""] + [f" tagged {t!r}" for t in tags])
    if not found and project and not remote and not filters:
        projects = sorted({r.project for r in api.runs()})
        there = f"projects there: {', '.join(projects)}" if projects else "there are no runs there"
        raise click.ClickException(f"no runs of project {project!r} under {api.dir}; {there}")
    if not found:
        click.echo(f"no runs{f' of project {project}' if project else ''}{described} {where}", err=True)
        return
    for r in found:
        created = datetime.datetime.fromtimestamp(r.meta.get("created_at", 0)).strftime("%Y-%m-%d %H:%M")
        if remote:  # the listing's own record: no request per run
            ref, state = f"{r.meta['entity']}/{r.project}/{r.id}", r.meta["status"]
        else:
            ref, state = f"{r.project}/{r.id}", r.status
        click.echo(f"{ref}\t{state:<9}\t{created}\t{r.name}")


_HOST_OPTION = click.option("--host", default=None,
                            help="gradexp server (default: $GRADEXP_HOST, else the last `gradexp login`'s).")
_KEY_OPTION = click.option("--api-key", default=None,
                           help="API key (default: $GRADEXP_API_KEY, else the one `gradexp login` stored).")


@main.command()
@click.argument("run")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines until the run ends.")
@click.option("--timestamps", "-t", is_flag=True, help="Prefix each line with its local time.")
@click.option("--interval", type=click.FloatRange(min=0.1), default=1.0, show_default=True,
              help="Seconds between two looks for new lines (--follow).")
@_DIR_OPTION
@_HOST_OPTION
@_KEY_OPTION
def logs(run: str, follow: bool, timestamps: bool, interval: float, base_dir: Path | None, host: str | None,
         api_key: str | None) -> None:
    """Print RUN's console output (stdout and stderr as its terminal showed them): a run
    folder, project/run_id or a run id under --dir, or entity/project/run_id on the server."""
    from gradexp.api import Api
    from gradexp.core.errors import RunNotFoundError

    api = Api(dir=base_dir, host=host, api_key=api_key)
    if api.host and run.count("/") == 2 and not Path(run).exists():
        _client(api)
    try:
        stored = api.run(run)
    except RunNotFoundError as e:
        raise click.ClickException(str(e)) from None
    shown = 0
    while True:
        ended = not follow or stored.status != "running"  # looked at first: no line is missed at the end
        with _warning_lines():
            lines = stored.console(since=shown)
        for line in lines:
            prefix = datetime.datetime.fromtimestamp(line.time).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + " " \
                if timestamps else ""
            click.echo(prefix + line.text)
            shown = line.line + 1
        if ended:
            return
        time.sleep(interval)


@main.command()
@click.argument("run_dirs", nargs=-1, type=click.Path(file_okay=False, exists=True, path_type=Path))
@_HOST_OPTION
@_KEY_OPTION
@_DIR_OPTION
def sync(run_dirs: tuple[Path, ...], host: str | None, api_key: str | None, base_dir: Path | None) -> None:
    """Upload offline, crashed or interrupted runs: RUN_DIRS (run folders, or project
    folders for all their runs), else every run under --dir.

    Idempotent: parts already uploaded are not sent again, and a run that is
    fully synced is skipped. Runs that are still running are left to their sender.
    """
    from gradexp.api import Api
    from gradexp.core.errors import ApiError
    from gradexp.core.layout import LOCK, RUN_JSON, is_locked, read_json
    from gradexp.sync import sender as _service

    api = Api(dir=base_dir, host=host, api_key=api_key)
    if run_dirs:
        dirs = [d for folder in run_dirs for d in _runs_in(folder)]
    else:
        dirs = sorted(p.parent for p in api.dir.glob(f"*/*/{RUN_JSON}"))
    client = _client(api)
    try:
        # Retried a little (a reset or a 503 while a proxy restarts must not end the sync),
        # but bounded: a wrong host or a server that is down still fails within seconds.
        entity = client.json("GET", "/viewer", attempts=VIEWER_ATTEMPTS,
                             deadline=time.monotonic() + VIEWER_DEADLINE)["entity"]
    except ApiError as e:
        raise click.ClickException(_api_error(e)) from None
    if not dirs:
        click.echo(f"no runs under {api.dir}", err=True)
        return
    synced = skipped = 0
    for d in dirs:
        if (d / LOCK).exists() and is_locked(d / LOCK):
            click.echo(f"{d}: still running; its own sender uploads it", err=True)
            skipped += 1
            continue
        # the entity init(entity=...) named, else the login's
        run_entity = read_json(d / RUN_JSON, {}).get("entity") or entity
        up = _service.Uploader(d, client, run_entity)
        if up.finished and not up.pending():
            skipped += 1
            continue
        with click.progressbar(length=max(up.pending_bytes(), 1), label=f"{up.meta['project']}/{up.meta['id']}",
                               file=sys.stderr, show_percent=True) as bar:
            try:
                n, _ = _service.sync(d, client, run_entity, progress=bar.update)
            except ApiError as e:
                hint = (f" (the run names entity {run_entity!r}, given to init(entity=...); this key writes "
                        f"as {entity!r})" if run_entity != entity and e.status in (403, 404) else "")
                raise click.ClickException(f"{d}: {_api_error(e)}{hint}") from None
        click.echo(f"{up.url}  ({n} parts uploaded)")
        synced += 1
    click.echo(f"synced {synced} run(s); {skipped} already synced or still running", err=True)


def _runs_in(folder: Path) -> list[Path]:
    """The run folders a folder on the command line names: itself if it is one, else the runs
    of a project folder, else those of a folder of projects; none is an error."""
    from gradexp.core.layout import RUN_JSON

    if (folder / RUN_JSON).is_file():
        return [folder]
    found = sorted(p.parent for p in folder.glob(f"*/{RUN_JSON}"))
    found = found or sorted(p.parent for p in folder.glob(f"*/*/{RUN_JSON}"))
    if not found:
        raise click.ClickException(f"{folder} is not a run folder (it has no {RUN_JSON}), nor a project "
                                   "folder or a folder of projects with runs in it")
    return found


@main.group(invoke_without_command=True)
@click.option("--host", "bind", default="127.0.0.1", show_default=True,
              help="Address to bind; 0.0.0.0 to serve other machines.")
@click.option("--port", default=8080, show_default=True, type=int)
@click.option("--db", "db_url", default=None,
              help="SQLAlchemy URL (default: SQLite in the data dir), e.g. postgresql+psycopg://u@h/db.")
@click.option("--store", "store_url", default=None,
              help="Object store: a folder or s3://bucket/prefix?endpoint_override=... "
                   "(default: a folder in the data dir).")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the embedded defaults live (default: the user data dir).")
@click.option("--max-body", "max_body", type=click.IntRange(min=1), default=2 << 30, show_default=True,
              help="Largest request body (an uploaded part) in bytes; larger ones get 413.")
@click.option("--access-log/--no-access-log", "access_log", default=True, show_default=True,
              envvar="GRADEXP_SERVER_ACCESS_LOG",
              help="One line per request on stderr (method, path, status, bytes, ms, user).")
@click.pass_context
def server(ctx: click.Context, bind: str, port: int, db_url: str | None, store_url: str | None,
           data_dir: Path | None, max_body: int, access_log: bool) -> None:
    """Run the gradexp server (needs the [server] extra: pip install -e '.[server]' in a clone)."""
    from gradexp.server import cli as server_cli

    ctx.obj = server_cli.Paths.resolve(db_url, store_url, data_dir)
    if ctx.invoked_subcommand is None:
        server_cli.serve(ctx.obj, bind, port, max_body_bytes=max_body, access_log=access_log)


@server.command("create-user")
@click.argument("name")
@click.option("--admin", is_flag=True, help="Make the user an administrator.")
@click.pass_obj
def create_user(paths: Paths, name: str, admin: bool) -> None:
    """Create a user (and their entity) in the server's database."""
    from gradexp.server import cli as server_cli

    server_cli.create_user(paths, name, admin=admin)


@server.command("create-key")
@click.argument("user")
@click.option("--name", default="default", show_default=True, help="A name to recognise the key by.")
@click.pass_obj
def create_key(paths: Paths, user: str, name: str) -> None:
    """Create an API key for USER and print it (it is stored only as a hash)."""
    from gradexp.server import cli as server_cli

    server_cli.create_key(paths, user, name=name)


@server.command("set-password")
@click.argument("user")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input (scripts).")
@click.pass_obj
def set_password(paths: Paths, user: str, password_stdin: bool) -> None:
    """Set USER's password for the web pages (asked twice at a hidden prompt)."""
    from gradexp.server import cli as server_cli

    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = click.prompt("New password", hide_input=True, confirmation_prompt=True, err=True)
    server_cli.set_password(paths, user, password)


@server.command("signin-link")
@click.argument("user")
@click.option("--base-url", default="http://127.0.0.1:8080", show_default=True,
              help="The server's address as the user's browser reaches it.")
@click.pass_obj
def signin_link(paths: Paths, user: str, base_url: str) -> None:
    """Print a one-time sign-in link for USER (valid 24 h; for a forgotten password)."""
    from gradexp.server import cli as server_cli

    server_cli.signin_link(paths, user, base_url)


@server.command("list-users")
@click.pass_obj
def list_users(paths: Paths) -> None:
    """List users: admin or not, password set or not, active keys."""
    from gradexp.server import cli as server_cli

    server_cli.list_users(paths)


@server.command("list-keys")
@click.argument("user", required=False)
@click.option("--revoked", is_flag=True, help="Also list revoked keys.")
@click.pass_obj
def list_keys(paths: Paths, user: str | None, revoked: bool) -> None:
    """List API keys (of USER, or everyone's): id, first characters, name, last use."""
    from gradexp.server import cli as server_cli

    server_cli.list_keys(paths, user, revoked=revoked)


@server.command("revoke-key")
@click.argument("key_id", type=int)
@click.pass_obj
def revoke_key(paths: Paths, key_id: int) -> None:
    """Revoke the API key with id KEY_ID (from list-keys); it stops working at once."""
    from gradexp.server import cli as server_cli

    server_cli.revoke_key(paths, key_id)


@main.command()
@_DIR_OPTION
@click.option("--port", default=0, show_default="a free port", type=click.IntRange(0, 65535))
@click.option("--host", "bind", default="127.0.0.1", show_default=True,
              help="Address to bind (loopback: only this machine's browsers can connect).")
@click.option("--token", default=None, envvar="GRADEXP_UI_TOKEN",
              help="The token the URL carries (default: a new random one; also GRADEXP_UI_TOKEN).")
def ui(base_dir: Path | None, port: int, bind: str, token: str | None) -> None:
    """Browse local runs in the explorer (read-only): charts, tensors, distributions.

    Serves the run folders under --dir (default $GRADEXP_DIR or ./gradexp-runs), running,
    finished or crashed, with no server and no account. Prints a URL with a one-time token:
    opening it signs this browser in; a request without it gets 403. Needs the [server] extra.
    """
    import socket

    import uvicorn

    from gradexp.core.settings import resolve
    from gradexp.explorer.ui import create_ui_app, new_token

    folder = resolve({"dir": base_dir}).dir.absolute()
    token = token or new_token()
    sock = socket.socket(socket.AF_INET6 if ":" in bind else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((bind, port))
        sock.listen(128)  # connections wait in the backlog from now on, while uvicorn starts
    except OSError as e:
        raise click.ClickException(f"cannot listen on {bind}:{port}: {e.strerror}") from None
    host = f"[{bind}]" if ":" in bind else bind
    click.echo(f"gradexp ui: runs under {folder}", err=True)
    click.echo(f"Open http://{host}:{sock.getsockname()[1]}/?token={token}", err=True)
    config = uvicorn.Config(create_ui_app(folder, token=token), log_level="warning", access_log=False)
    uvicorn.Server(config).run(sockets=[sock])


@main.command()
@click.option("--host", default=None, help="Server (default: GRADEXP_HOST, the last login's, "
                                           "else http://127.0.0.1:8080).")
@click.option("--key", "key", default=None, envvar="GRADEXP_API_KEY",
              help="Store this API key without asking (for CI; also GRADEXP_API_KEY).")
@click.option("--no-browser", is_flag=True,
              help="Do not open a browser: print the URL of a page that shows a key to paste here.")
@click.option("--timeout", type=click.FloatRange(min=1), default=300, show_default=True,
              help="Seconds to wait for the browser.")
def login(host: str | None, key: str | None, no_browser: bool, timeout: float) -> None:
    """Sign in through the browser and store an API key for later runs.

    Opens the server's authorize page; after you sign in and click Authorize, the
    server hands this command a new API key (RFC 8252 loopback redirect with PKCE).
    With --no-browser, or when no browser can be opened, the page shows the key and
    you paste it at a hidden prompt. The key is stored per host in the user config
    dir (mode 0600) and never printed.
    """
    from gradexp.core import credentials as _auth
    from gradexp.sync import login as _login

    host = _auth.normalize_host(host or os.environ.get("GRADEXP_HOST") or _auth.default_host()
                                or _auth.DEFAULT_HOST)
    if key:
        viewer = _viewer(host, key)
    else:
        _reachable(host)
        grant = None
        if not no_browser:
            try:
                grant = _login.browser_login(host, timeout=timeout, echo=lambda m: click.echo(m, err=True))
            except _login.LoginError as e:
                raise click.ClickException(str(e)) from None
            if grant is None:
                click.echo("No browser could be opened here; use the page below from any browser.", err=True)
        if grant is None:
            click.echo(f"Open this page in a browser, sign in, authorize, and paste the key it shows:\n"
                       f"  {_login.manual_url(host)}", err=True)
            key = click.prompt("API key", hide_input=True, err=True).strip()
            viewer = _viewer(host, key)
        else:
            key, viewer = grant.api_key, {"user": grant.user, "entity": grant.entity}
    path = _auth.store(host, key, user=viewer["user"], entity=viewer["entity"])
    click.echo(f"Logged in to {host} as {viewer['user']} (entity {viewer['entity']}); key stored in {path}",
               err=True)


def _reachable(host: str) -> None:
    import requests

    try:
        requests.get(f"{host}/healthz", timeout=10).raise_for_status()
    except requests.RequestException as e:
        raise click.ClickException(f"cannot reach a gradexp server at {host}: {e}") from None


def _viewer(host: str, key: str) -> dict:
    from gradexp.core.client import Client
    from gradexp.core.errors import ApiError

    try:
        return Client(host, key, timeout=15).json("GET", "/viewer", retry=False)
    except ApiError as e:
        if e.status == 401:
            raise click.ClickException(f"{host} does not accept that API key ({e.message})") from None
        raise click.ClickException(str(e)) from None
    except Exception as e:
        raise click.ClickException(f"cannot reach {host}: {e}") from None


@main.command()
@click.option("--host", default=None, help="Server (default: GRADEXP_HOST or the last login's).")
def whoami(host: str | None) -> None:
    """Show the user, entity and host that runs go to."""
    from gradexp.core.settings import resolve

    s = resolve({"host": host})
    if not s.host:
        raise click.ClickException("not logged in: run `gradexp login` (runs are offline until then)")
    if not s.api_key:
        raise click.ClickException(f"no API key for {s.host}: run `gradexp login --host {s.host}`")
    viewer = _viewer(s.host, s.api_key)
    click.echo(f"user {viewer['user']}, entity {viewer['entity']}, host {s.host}")


@main.command()
@click.option("--host", default=None, help="Server (default: GRADEXP_HOST or the last login's).")
def logout(host: str | None) -> None:
    """Forget the API key stored for a host."""
    from gradexp.core import credentials as _auth

    host = host or os.environ.get("GRADEXP_HOST") or _auth.default_host()
    if not host:
        raise click.ClickException("not logged in anywhere")
    if _auth.forget(host):
        click.echo(f"Forgot the key for {_auth.normalize_host(host)}.", err=True)
    else:
        click.echo(f"No key was stored for {_auth.normalize_host(host)}.", err=True)


if __name__ == "__main__":  # pragma: no cover
    main()
