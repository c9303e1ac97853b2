"""The ASGI application: the gradexp API under ``/api/v1``, and the web pages (``web``).

Every API endpoint but the health check, the OpenAPI document and the token
exchange of ``gradexp login`` needs ``Authorization: Bearer <key>``; a user sees only their own entity (another
entity's runs answer 404, as if they did not exist). The server keeps no state
between requests beyond the database and the object store, so several processes
can serve one database and one bucket behind a load balancer.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import mmap
import reprlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import sqlalchemy as sa
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gradexp._version import __version__
from gradexp.core import arrow as _arrow
from gradexp.core import format as _format
from gradexp.core.errors import CorruptPartError, RunNotFoundError
from gradexp.core.limits import MAX_KEY_LENGTH
from gradexp.server import db, explorer_catalog, history, web
from gradexp.server.openapi import (
    MODELS,
    FinishBody,
    HistoryQuery,
    PartPath,
    RecordBody,
    RowsQuery,
    RunPatch,
    RunPath,
    RunPut,
    RunsQuery,
    SidePath,
    SideQuery,
    StepQuery,
    TensorPath,
    openapi,
)
from gradexp.server.reader import FrameRef, ServerRun, rows_ipc
from gradexp.server.store import Store

JSON_BODY_MAX = 8 << 20
"""Bytes of a JSON request body: run metadata, well inside what every database takes in one
statement (MariaDB's max_allowed_packet is 16 MiB by default)."""
ARROW_STREAM = "application/vnd.apache.arrow.stream"
FRAME = "application/x-gradexp-frame"
_SPOOL_BATCH = 4 << 20
"""Bytes of an upload gathered on the event loop before a worker thread hashes and writes
them: large enough that handing off costs little, small enough that the loop never holds
more than a few of them."""
_CHECK_CHUNK = 1 << 20
T = TypeVar("T")


class ExactJSONResponse(JSONResponse):
    """JSON with non-finite floats as the tokens NaN, Infinity and -Infinity (as Python's json
    writes and reads them): runs store what their config and summary hold, and a loss that
    went NaN is what a user most needs to see. Starlette's JSONResponse refuses them (a 500)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=False, allow_nan=True, indent=None,
                          separators=(",", ":")).encode("utf-8")


@dataclass
class Config:
    db_url: str
    store_url: str
    max_body_bytes: int = 2 << 30


class Server:
    """Shared handles of one server process (engine, store) and the request handlers."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.engine = db.connect(config.db_url)
        db.migrate(self.engine)
        self.store = Store(config.store_url)

    # -- plumbing ------------------------------------------------------------------------------

    async def viewer(self, request: Request) -> db.Viewer:
        auth = request.headers.get("authorization", "")
        scheme, _, key = auth.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise HTTPException(401, "missing API key: send 'Authorization: Bearer <key>'",
                                {"WWW-Authenticate": "Bearer"})
        viewer = await run_in_threadpool(db.authenticate, self.engine, key.strip())
        if viewer is None:
            raise HTTPException(401, "invalid or revoked API key", {"WWW-Authenticate": 'Bearer error="invalid_token"'})
        request.state.user = viewer.user  # for the access log
        return viewer

    def address(self, request: Request, viewer: db.Viewer) -> tuple[str, str]:
        p = RunPath.model_validate(request.path_params)
        if p.entity != viewer.entity:
            raise HTTPException(404, f"no run {p.entity}/{p.project}/{p.run_id}")
        return p.project, p.run_id

    def run_pk(self, viewer: db.Viewer, project: str, run_id: str) -> tuple[int, int]:
        with self.engine.connect() as conn:
            pk = db.run_pk(conn, viewer.entity_id, project, run_id)
            pid = db.project_id(conn, viewer.entity_id, project, create=False)
        if pk is None or pid is None:
            raise HTTPException(404, f"no run {viewer.entity}/{project}/{run_id}")
        return pk, pid

    def open_run(self, viewer: db.Viewer, project: str, run_id: str) -> ServerRun:
        """The viewer's run, to read (in a worker thread); 404 if there is none."""
        try:
            return ServerRun(self.engine, self.store, entity_id=viewer.entity_id, entity=viewer.entity,
                             project=project, run_id=run_id)
        except RunNotFoundError as e:
            raise HTTPException(404, str(e)) from None

    async def body(self, request: Request) -> bytes:
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and int(declared) > limit:
            raise HTTPException(413, f"request body over the limit of {limit} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise HTTPException(413, f"request body over the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def json_body(self, request: Request) -> dict[str, Any]:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > JSON_BODY_MAX:
            raise HTTPException(413, f"JSON body over the limit of {JSON_BODY_MAX} bytes")
        raw = await self.body(request)
        if len(raw) > JSON_BODY_MAX:
            raise HTTPException(413, f"JSON body over the limit of {JSON_BODY_MAX} bytes")
        try:  # json, not pydantic: config and summary may hold NaN, Infinity and -Infinity
            data = json.loads(raw or b"{}")
        except ValueError as e:
            raise HTTPException(400, f"request body is not JSON: {e}") from None
        except RecursionError:
            raise HTTPException(400, "request body is nested too deeply") from None
        if not isinstance(data, dict):
            raise HTTPException(400, "request body must be a JSON object")
        return data

    # -- endpoints -----------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        return JSONResponse({"ok": True, "version": __version__})

    async def schema(self, request: Request) -> Response:
        return JSONResponse(openapi())

    async def get_viewer(self, request: Request) -> Response:
        v = await self.viewer(request)
        return JSONResponse({"user": v.user, "entity": v.entity})

    async def list_projects(self, request: Request) -> Response:
        v = await self.viewer(request)

        def work() -> list[dict[str, Any]]:
            with self.engine.connect() as conn:
                return db.list_projects(conn, v.entity_id)
        return JSONResponse({"projects": await run_in_threadpool(work)})

    async def list_runs(self, request: Request) -> Response:
        v = await self.viewer(request)
        q = RunsQuery.model_validate({**request.query_params, "tag": request.query_params.getlist("tag")})

        after: db.RunsCursor | None = None
        if q.cursor is not None:
            at, _, pk = q.cursor.rpartition("_")
            after = (float(at), int(pk))

        def work() -> dict[str, Any]:
            with self.engine.connect() as conn:
                rows, nxt = db.page_runs(conn, v.entity_id, project=q.project, status=q.status, tags=q.tag,
                                         limit=q.limit, after=after)
            return {"runs": rows, "next": None if nxt is None else f"{nxt[0]!r}_{nxt[1]}"}
        return ExactJSONResponse(await run_in_threadpool(work))

    async def put_run(self, request: Request) -> Response:
        v = await self.viewer(request)
        project, run_id = self.address(request, v)
        fields = RunPut.model_validate(await self.json_body(request)).model_dump(exclude_unset=True)

        def work() -> dict[str, Any]:
            with self.engine.begin() as conn:
                pk = db.upsert_run(conn, v.entity_id, project, run_id, fields)
                return db.run_row(conn, pk)
        return ExactJSONResponse(await run_in_threadpool(work))

    async def get_run(self, request: Request) -> Response:
        v = await self.viewer(request)
        project, run_id = self.address(request, v)

        def work() -> dict[str, Any]:
            run = self.open_run(v, project, run_id)
            return {**run.row, "parts": run.part_counts()}
        return ExactJSONResponse(await run_in_threadpool(work))

    async def patch_run(self, request: Request) -> Response:
        v = await self.viewer(request)
        project, run_id = self.address(request, v)
        fields = RunPatch.model_validate(await self.json_body(request)).model_dump(exclude_unset=True)

        def work() -> dict[str, Any]:
            pk, _ = self.run_pk(v, project, run_id)
            with self.engine.begin() as conn:
                values = db._run_values(fields)
                db.update_run(conn, pk, heartbeat_at=time.time(), **values)
                return db.run_row(conn, pk)
        return ExactJSONResponse(await run_in_threadpool(work))

    async def put_part(self, request: Request) -> Response:
        v = await self.viewer(request)
        project, run_id = self.address(request, v)
        where = PartPath.model_validate(request.path_params)
        stream, seq = where.stream, where.seq
        label = f"part {stream}/{seq}"
        with self.store.spool() as spool:
            digest, size = await self.receive(request, spool)
            claimed = request.headers.get("x-gradexp-sha256")
            if claimed and claimed.lower() != digest:
                raise HTTPException(400, "body does not match its X-Gradexp-SHA256 header (corrupted in transit?)")

            def work() -> tuple[int, dict[str, Any]]:
                pk, pid = self.run_pk(v, project, run_id)
                with self.engine.connect() as conn:
                    existing = db.part(conn, pk, stream, seq)
                if existing is not None:
                    if existing["sha256"] == digest:
                        return 200, {"stored": False, "sha256": digest}
                    raise HTTPException(409, f"{label} of this run exists with other content")
                try:
                    scan = _check_part(spool, size, label)
                except ValueError as e:
                    raise HTTPException(400, str(e)) from None
                # Content-addressed: a concurrent upload of other bytes to this (run, stream,
                # seq) writes another object, so whichever row wins names its own bytes.
                key = Store.part_key(v.entity_id, pid, run_id, stream, seq, digest)
                self.store.put_file(key, spool)
                with self.engine.begin() as conn:
                    if not db.add_part(conn, pk, stream, seq, digest, size, key, scan.frames):
                        again = db.part(conn, pk, stream, seq)  # a concurrent upload won the race
                        if again is None or again["sha256"] != digest:
                            self.store.delete(key)  # no row will ever name it
                            raise HTTPException(409, f"{label} of this run exists with other content")
                        return 200, {"stored": False, "sha256": digest}
                    db.update_run(conn, pk, heartbeat_at=time.time())
                return 201, {"stored": True, "sha256": digest}
            status, body = await run_in_threadpool(work)
        return JSONResponse(body, status_code=status)

    async def receive(self, request: Request, path: Path) -> tuple[str, int]:
        """Stream the request body into the file at ``path``; return its SHA-256 (hex) and size.

        Chunks are gathered into batches of ``_SPOOL_BATCH`` bytes; a worker thread hashes and
        writes each batch while the loop receives the next, so neither a large upload nor its
        hashing holds up other requests."""
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and int(declared) > limit:
            raise HTTPException(413, f"request body over the limit of {limit} bytes")
        sha = hashlib.sha256()
        size = 0
        with open(path, "wb") as f:
            def write(chunks: list[bytes]) -> None:
                for chunk in chunks:
                    sha.update(chunk)
                    f.write(chunk)

            writing: asyncio.Future[None] | None = None
            try:
                batch: list[bytes] = []
                batched = 0
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise HTTPException(413, f"request body over the limit of {limit} bytes")
                    batch.append(chunk)
                    batched += len(chunk)
                    if batched >= _SPOOL_BATCH:
                        if writing is not None:
                            await writing
                        writing = asyncio.ensure_future(run_in_threadpool(write, batch))
                        batch, batched = [], 0
                if writing is not None:
                    await writing
                    writing = None
                if batch:
                    await run_in_threadpool(write, batch)
            except ClientDisconnect:  # nobody reads the answer, but the access log gets no traceback
                raise HTTPException(400, f"the client went away after {size} bytes of the body") from None
            finally:
                if writing is not None:  # the body failed midway: let the worker finish with the file
                    with contextlib.suppress(Exception):
                        await writing
        return sha.hexdigest(), size

    async def finish_run(self, request: Request) -> Response:
        v = await self.viewer(request)
        project, run_id = self.address(request, v)
        body = FinishBody.model_validate(await self.json_body(request))
        exit_code, declared = body.exit_code, body.parts
        status = body.status or ("finished" if exit_code == 0 else "failed")

        def work() -> dict[str, Any]:
            pk, pid = self.run_pk(v, project, run_id)
            with self.engine.connect() as conn:
                have = db.part_counts(conn, pk)
            missing = {s: n - have.get(s, 0) for s, n in declared.items() if have.get(s, 0) < n}
            if missing:
                raise HTTPException(409, f"parts missing: {missing}; upload them, then finish again")
            history.finalize(self.engine, self.store, pk, address=(v.entity_id, pid, run_id))
            with self.engine.begin() as conn:
                db.update_run(conn, pk, status=status, exit_code=exit_code, finished_at=time.time())
                return db.run_row(conn, pk)
        return ExactJSONResponse(await run_in_threadpool(work))

    async def get_history(self, request: Request) -> Response:
        v = await self.viewer(request)
        project, run_id = self.address(request, v)
        q = HistoryQuery.model_validate(request.query_params)
        fmt, keys = q.format, q.keys

        def work() -> Any:
            run = self.open_run(v, project, run_id)
            try:
                return run.history(keys.split(",") if keys else None)
            except KeyError as e:
                raise HTTPException(404, str(e.args[0])) from None

        table = await run_in_threadpool(work)
        if fmt == "arrow":
            return Response(_arrow.table_ipc(table).to_pybytes(), media_type=ARROW_STREAM)
        if fmt == "parquet":
            data = await run_in_threadpool(history.to_parquet, table)
            return Response(data, media_type="application/vnd.apache.parquet", headers={
                "Content-Disposition": f'attachment; filename="{project}-{run_id}.parquet"'})
        return ExactJSONResponse({"columns": {name: col.to_pylist()  # format=json
                                              for name, col in zip(table.column_names, table.columns)}})

    async def put_record(self, request: Request) -> Response:
        v = await self.viewer(request)
        project, run_id = self.address(request, v)
        body = RecordBody.model_validate(await self.json_body(request)).model_dump()

        def work() -> dict[str, Any]:
            pk, pid = self.run_pk(v, project, run_id)
            data = json.dumps(body, ensure_ascii=False, allow_nan=True).encode()
            self.store.put(Store.record_key(v.entity_id, pid, run_id), data)
            with self.engine.begin() as conn:
                db.update_run(conn, pk, heartbeat_at=time.time())
            return body
        return ExactJSONResponse(await run_in_threadpool(work))

    async def get_record(self, request: Request) -> Response:
        v = await self.viewer(request)
        project, run_id = self.address(request, v)

        def work() -> dict[str, Any]:
            return self.open_run(v, project, run_id).record()
        return ExactJSONResponse(await run_in_threadpool(work))

    async def get_stream(self, request: Request) -> Response:
        """Console lines or system metrics from ``since`` on (:meth:`ServerRun.stream`)."""
        v = await self.viewer(request)
        project, run_id = self.address(request, v)
        stream = SidePath.model_validate(request.path_params).stream
        q = SideQuery.model_validate(request.query_params)

        def work() -> Any:
            return self.open_run(v, project, run_id).stream(stream, q.since)

        table = await run_in_threadpool(work)
        if q.format == "arrow":
            return Response(_arrow.table_ipc(table).to_pybytes(), media_type=ARROW_STREAM)
        return ExactJSONResponse({"columns": {name: col.to_pylist()
                                              for name, col in zip(table.column_names, table.columns)}})

    async def list_tensor_keys(self, request: Request) -> Response:
        v = await self.viewer(request)
        project, run_id = self.address(request, v)

        def work() -> list[str]:
            return self.open_run(v, project, run_id).tensor_keys()
        return JSONResponse({"keys": await run_in_threadpool(work)})

    async def tensor_steps(self, request: Request) -> Response:
        if "step" in request.query_params:  # GET .../tensors/<a key ending in "/steps">?step=N
            request.path_params["key"] += "/steps"
            return await self.get_tensor(request)
        v = await self.viewer(request)
        project, run_id = self.address(request, v)
        key = TensorPath.model_validate(request.path_params).key

        def work() -> list[int]:
            return _found(self.open_run(v, project, run_id).steps, key)
        return JSONResponse({"steps": await run_in_threadpool(work)})

    async def get_tensor(self, request: Request) -> Response:
        """The frame holding tensor ``key`` at ``step``: header and payload, as in the part."""
        v = await self.viewer(request)
        project, run_id = self.address(request, v)
        key = TensorPath.model_validate(request.path_params).key
        step = StepQuery.model_validate(request.query_params).step

        def work() -> bytes:
            return _found(self.open_run(v, project, run_id).frame, key, step)
        return Response(await run_in_threadpool(work), media_type=FRAME)

    async def tensor_rows(self, request: Request) -> Response:
        """Many steps of a tensor in one answer: an Arrow IPC stream of the stored frames
        holding them (``reader.ROWS_SCHEMA``), streamed as they are read, one range read each."""
        if "step" in request.query_params:  # GET .../tensors/<a key ending in "/rows">?step=N
            request.path_params["key"] += "/rows"
            return await self.get_tensor(request)
        v = await self.viewer(request)
        project, run_id = self.address(request, v)
        key = TensorPath.model_validate(request.path_params).key
        steps = RowsQuery.model_validate({"steps": request.query_params.getlist("steps")}).steps

        def work() -> tuple[ServerRun, list[tuple[list[int], FrameRef]]]:
            run = self.open_run(v, project, run_id)
            return run, _found(run.plan, key, steps or None)  # every check before the answer starts
        run, plan = await run_in_threadpool(work)
        return StreamingResponse(rows_ipc(run.read_plan(plan)), media_type=ARROW_STREAM)


def _found(read: Callable[..., T], *args: Any) -> T:
    """``read(*args)``, a KeyError (no such key or step) answered with 404."""
    try:
        return read(*args)
    except KeyError as e:
        raise HTTPException(404, str(e.args[0])) from None


def _check_part(path: Path, size: int, label: str) -> _format.PartScan:
    """Index the sealed part in the file at ``path`` and check every frame of it; ValueError
    naming the part (and the frame's offset) if anything is damaged."""
    if size == 0:
        raise ValueError(f"{label}: not a sealed gradexp part (empty body)")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ) as mm:
        scan = _format.scan_sealed_bytes(mm, label)  # type: ignore[arg-type]
        with memoryview(mm) as view:
            _verify_frames(view, scan, label)
    return scan


def _verify_frames(data: memoryview, scan: _format.PartScan, label: str) -> None:
    """Check every frame header against the part's index, every frame key against the
    key limit, and every payload against its zstd content checksum.

    Parts are immutable once stored, so a damaged frame let in here would make its
    tensor (or the run's history, and its finish) unreadable for good. Checking means
    decompressing, into a small reused buffer (nothing is kept): about as fast as the
    SHA-256 of the upload (docs/benchmarks.md). ValueError if anything is damaged.
    """
    scratch = bytearray(_CHECK_CHUNK)
    for info in scan.frames:
        if info.end > scan.valid_end or _format.parse_header(data, info.offset, scan.valid_end) != info:
            raise ValueError(f"{label}: the frame at byte {info.offset} does not match the part's index")
        if len(info.key) > MAX_KEY_LENGTH:
            raise ValueError(f"{label}: the frame at byte {info.offset} has a key of {len(info.key)} characters, "
                             f"over the limit of {MAX_KEY_LENGTH}: {info.key[:100]!r}...")
        with data[info.data_offset:info.end] as payload:  # let go of the buffer: the caller closes its mmap
            problem = _format.payload_problem(info, payload, scratch=scratch)
        if problem is not None:
            raise CorruptPartError(label, info.offset, problem)


_access = logging.getLogger("gradexp.access")


class AccessLog:
    """ASGI middleware: one line per HTTP request to the ``gradexp.access`` logger.

    ``<client> <user or -> "<method> <path>" <status> in=<bytes> out=<bytes> <ms>ms``. The
    path is logged without its query string (where sign-in tokens and authorization codes
    travel), percent-encoded so a key in it cannot forge a line; no header is logged. The
    user is the one a request authenticated as (``request.state.user``), if any."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        state = scope.setdefault("state", {})
        status: int | None = None
        received = sent = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            return message

        async def counting_send(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, counting_receive, counting_send)
        finally:
            client = scope.get("client")
            _access.info('%s %s "%s %s" %s in=%d out=%d %.1fms', client[0] if client else "-",
                            state.get("user") or "-", scope["method"], quote(scope["path"], safe="/:@!$&'()*+,;=~"),
                            status if status is not None else 500, received, sent,
                            (time.perf_counter() - start) * 1e3)




_LOCATION = {m.__name__: m.location for m in MODELS}
_short = reprlib.Repr()
"""The value at fault as the error message quotes it: bounded, whatever was sent."""
_short.maxlevel, _short.maxstring, _short.maxother = 2, 80, 80


async def _invalid(request: Request, exc: Exception) -> Response:
    """400 for a request the models refuse, naming each field at fault and why."""
    assert isinstance(exc, ValidationError)
    where = _LOCATION.get(exc.title, "field")
    problems = []
    for e in exc.errors(include_url=False)[:5]:
        field = ".".join(str(x) for x in e["loc"])
        if e["type"] == "extra_forbidden":
            problems.append(f"unknown {where} {field!r}")
        elif e["type"] == "missing":
            problems.append(f"missing {where} {field!r}")
        else:
            problems.append(f"invalid {where} {field!r} = {_short.repr(e['input'])}: {e['msg']}")
    return JSONResponse({"error": "; ".join(problems)}, status_code=400)


def _api(request: Request) -> bool:
    """Whether the request is the API's (errors as JSON) rather than a page's (errors as HTML)."""
    return request.url.path.startswith("/api/")


async def _http_error(request: Request, exc: Exception) -> Response:
    """An ``HTTPException`` a handler raised, or Starlette's own 404/405 (no route for the path
    or method): ``{"error": message}`` from the API, an error page from the pages."""
    assert isinstance(exc, HTTPException)
    if _api(request):
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)
    return web.error_page(request, exc.status_code, exc.detail, exc.headers)


async def _database_away(request: Request, exc: Exception) -> Response:
    """503 with ``Retry-After``: the database is busy or briefly away, and the client retries."""
    assert isinstance(exc, sa.exc.OperationalError)
    if _api(request):
        return JSONResponse({"error": f"database unavailable: {exc.orig!r}"}, status_code=503,
                            headers={"Retry-After": "1"})
    return web.error_page(request, 503, "The database is unavailable for a moment. Reload the page to try again.",
                          {"Retry-After": "1"})


def _by_method(**handlers: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """One route for several methods, so a 405 lists all of them in its Allow header."""
    handlers.setdefault("HEAD", handlers["GET"])

    async def dispatch(request: Request) -> Response:
        return await handlers[request.method](request)
    return dispatch


def create_app(*, db_url: str, store_url: str, max_body_bytes: int = 2 << 30,
               access_log: bool = True) -> Starlette:
    """The application; ``access_log`` adds :class:`AccessLog` (the caller sets up logging)."""
    s = Server(Config(db_url=db_url, store_url=store_url, max_body_bytes=max_body_bytes))
    run = "/api/v1/runs/{entity}/{project}/{run_id}"
    routes = [
        Route("/healthz", s.health),
        Route("/api/v1/openapi.json", s.schema),
        Route("/api/v1/viewer", s.get_viewer),
        Route("/api/v1/projects", s.list_projects),
        Route("/api/v1/runs", s.list_runs),
        Route(run, _by_method(GET=s.get_run, PUT=s.put_run, PATCH=s.patch_run), methods=["GET", "PUT", "PATCH"]),
        Route(run + "/parts/{stream}/{seq:int}", s.put_part, methods=["PUT"]),
        Route(run + "/finish", s.finish_run, methods=["POST"]),
        Route(run + "/history", s.get_history),
        Route(run + "/record", _by_method(GET=s.get_record, PUT=s.put_record), methods=["GET", "PUT"]),
        Route(run + "/streams/{stream}", s.get_stream),
        Route(run + "/tensors", s.list_tensor_keys),
        Route(run + "/tensors/{key:path}/steps", s.tensor_steps),
        Route(run + "/tensors/{key:path}/rows", s.tensor_rows),
        Route(run + "/tensors/{key:path}", s.get_tensor),
    ]
    routes += web.routes(s.engine)
    # last: the explorer's pages match any /<entity>/<project>[/<run id>]
    everything = [*routes, *explorer_catalog.routes(s.engine, s.store)]
    app = Starlette(routes=everything, middleware=[Middleware(AccessLog)] if access_log else [],
                    exception_handlers={ValidationError: _invalid, HTTPException: _http_error,
                                        sa.exc.OperationalError: _database_away})
    app.state.server = s
    return app
