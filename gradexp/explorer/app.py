"""The explorer's routes: pages, their JSON/Arrow data under ``/_x/api``, static files under
``/_x/static``. One set for ``gradexp server`` and ``gradexp ui``; the host passes an
:class:`~gradexp.explorer.context.Explorer` that knows its catalog and how to authenticate.

Pages are Jinja2 templates (autoescaped) filled in by ES modules; every response forbids
inline script and any other host (``CONTENT_SECURITY_POLICY``). Columns travel as Arrow IPC
streams, gzip-compressed by HTTP.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import jinja2
import pyarrow as pa
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from gradexp.explorer import distributions, history, tensors
from gradexp.explorer.catalog import run_info
from gradexp.explorer.context import AccessDenied, Explorer, Viewer
from gradexp.explorer.responses import HEADERS, RUN_API, ApiError, api, arrow_response, json_response
from gradexp.read.reader import RunReader

__all__ = ["explorer_routes"]

HERE = Path(__file__).parent
_PAGE_HEADERS = {**HEADERS, "Cache-Control": "no-store"}
_RESERVED = {"_x", "api", "login", "logout", "keys", "account", "authorize", "healthz", "favicon.ico"}
"""First path segments that are never an entity: the host's own routes answer them."""
VIEW_MODULES = ("tensor.js", "distribution.js", "flow.js")
"""The run page's tensor views (their own modules): each is loaded where it is installed."""
_MAX_BUCKETS = 20_000
GZIP_LEVEL = 6
"""zlib level of the data responses: on a reduced 1M-step history (200 KB of Arrow) level 9
(Starlette's default) took 32 ms for 1% fewer bytes than level 6's 4 ms (docs/benchmarks.md)."""
_MAX_PATCH = 64 << 10

_templates = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                                undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def render(request: Request, template: str, *, status: int = 200, **context: Any) -> HTMLResponse:
    html = _templates.get_template(template).render(request=request, **context)
    return HTMLResponse(html, status_code=status, headers=_PAGE_HEADERS)


def explorer_routes(explorer: Explorer) -> list[BaseRoute]:
    """Every explorer route, to append AFTER the host's own routes (the page routes match any
    ``/<entity>/<project>[/<run>]``). The data routes, the view modules' among them (their
    ``routes(explorer)``, paths relative to ``/_x``: see :mod:`.responses`), are mounted at
    ``/_x`` behind gzip."""
    x = _Handlers(explorer)
    run = RUN_API
    data: list[BaseRoute] = [
        Route("/api/projects", api(x.projects)),
        Route("/api/runs/{entity}/{project}", api(x.runs)),
        Route(run, api(x.run), methods=["GET", "PATCH"]),
        Route(run + "/history", api(x.history)),
        Route(run + "/console", api(x.console)),
        Route(run + "/system", api(x.system)),
        Route(run + "/provenance", api(x.provenance)),
        Route(run + "/patch", api(x.git_patch)),
        *tensors.routes(explorer),
        *distributions.routes(explorer),
        Mount("/static", app=StaticFiles(directory=HERE / "static"), name="static"),
    ]
    return [
        Mount("/_x", routes=data, middleware=[Middleware(GZipMiddleware, minimum_size=2048,
                                                             compresslevel=GZIP_LEVEL)]),
        Route("/", x.page(x.projects_page)),
        Route("/{entity}/{project}", x.page(x.runs_page)),
        Route("/{entity}/{project}/{run_id}", x.page(x.run_page)),
    ]


class _Handlers:
    def __init__(self, explorer: Explorer) -> None:
        self.x = explorer

    # -- pages ---------------------------------------------------------------------------------

    def page(self, fn: Callable[[Request, Viewer], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        async def wrapped(request: Request) -> Response:
            if request.path_params.get("entity") in _RESERVED:
                raise HTTPException(404)
            try:
                viewer = await self.x.viewer(request)
            except AccessDenied as e:
                if e.sign_in:
                    return RedirectResponse(e.sign_in, status_code=303, headers=_PAGE_HEADERS)
                return render(request, "error.html", status=e.status, message=e.message, **self.common(None))
            try:
                return await fn(request, viewer)
            except LookupError as e:
                return render(request, "error.html", status=404, message=str(e.args[0]) if e.args else "not found",
                              **self.common(viewer))
        return wrapped

    def common(self, viewer: Viewer | None) -> dict[str, Any]:
        return {"title": self.x.title, "viewer": viewer, "nav": self.x.nav, "read_only": self.x.catalog.read_only}

    async def projects_page(self, request: Request, viewer: Viewer) -> Response:
        return render(request, "projects.html", **self.common(viewer))

    async def runs_page(self, request: Request, viewer: Viewer) -> Response:
        e, p = request.path_params["entity"], request.path_params["project"]
        await self.x.in_worker(self.x.catalog.runs, viewer, e, p)  # 404 before drawing a page
        return render(request, "runs.html", entity=e, project=p, **self.common(viewer))

    async def run_page(self, request: Request, viewer: Viewer) -> Response:
        e, p, r = (request.path_params[k] for k in ("entity", "project", "run_id"))
        reader = await self.x.in_worker(self.x.catalog.open, viewer, e, p, r)
        modules = [m for m in VIEW_MODULES if (HERE / "static" / "js" / m).is_file()]
        page = render(request, "run.html", entity=e, project=p, run=r, run_name=reader.name or r,
                      view_modules=modules, **self.common(viewer))
        # Read the history while the browser loads the page's scripts: its charts ask for it next.
        page.background = BackgroundTask(history.prefetch, self.x, e, reader)
        return page

    # -- data ----------------------------------------------------------------------------------

    async def projects(self, request: Request) -> Response:
        viewer = await self.x.viewer(request)
        found = await self.x.in_worker(self.x.catalog.projects, viewer)
        return json_response({"projects": [p.to_json() for p in found]})

    async def runs(self, request: Request) -> Response:
        """Rows of the runs table; config and summary values may be ``"NaN"``/``"Infinity"``."""
        viewer = await self.x.viewer(request)
        e, p = request.path_params["entity"], request.path_params["project"]
        found = await self.x.in_worker(self.x.catalog.runs, viewer, e, p)
        return json_response({"runs": [r.to_json() for r in found], "read_only": self.x.catalog.read_only})

    async def _reader(self, request: Request) -> RunReader:
        e, p, r = (request.path_params[k] for k in ("entity", "project", "run_id"))
        return await self.x.run(request, e, p, r)

    async def run(self, request: Request) -> Response:
        """The run: metadata, config, summary (numbers may be ``"NaN"``/``"Infinity"``), status,
        chartable history keys, tensor keys, count of damaged byte ranges. PATCH sets name,
        notes and tags (a browser session must echo its CSRF token in ``X-CSRF-Token``)."""
        if request.method == "PATCH":
            return await self.patch(request)
        reader = await self._reader(request)
        e = request.path_params["entity"]

        def work() -> dict[str, Any]:
            keys, last_step = history.history_keys(self.x, e, reader)
            info = run_info(reader, entity=e).to_json()
            info.update(meta=reader.meta, history_keys=keys, tensor_keys=reader.tensor_keys(),
                        damage=len(reader.damage), last_step=last_step, read_only=self.x.catalog.read_only)
            return info
        return json_response(await self.x.in_worker(work))

    async def patch(self, request: Request) -> Response:
        viewer = await self.x.viewer(request)
        if viewer.csrf is not None and request.headers.get("x-csrf-token") != viewer.csrf:
            raise ApiError(403, "missing or wrong X-CSRF-Token header (reload the page)")
        raw = await request.body()
        if len(raw) > _MAX_PATCH:
            raise ApiError(413, f"body over {_MAX_PATCH} bytes")
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            raise ApiError(400, "body is not JSON") from None
        if not isinstance(body, dict) or set(body) - {"name", "notes", "tags"}:
            raise ApiError(400, "send a JSON object with only name, notes and tags")
        name, notes, tags = body.get("name"), body.get("notes"), body.get("tags")
        if name is not None and (not isinstance(name, str) or len(name) > 256):
            raise ApiError(400, "name must be a string of at most 256 characters")
        if notes is not None and (not isinstance(notes, str) or len(notes) > 16_000):
            raise ApiError(400, "notes must be a string of at most 16000 characters")
        if tags is not None and (not isinstance(tags, list) or not all(isinstance(t, str) and 0 < len(t) <= 64
                                                                          for t in tags)):
            raise ApiError(400, "tags must be a list of strings of 1 to 64 characters")
        e, p, r = (request.path_params[k] for k in ("entity", "project", "run_id"))

        def work() -> None:
            self.x.catalog.update(viewer, e, p, r, name=name, notes=notes, tags=tags)
        await self.x.in_worker(work)
        return json_response({"ok": True})

    async def history(self, request: Request) -> Response:
        """``?keys=a,b&x=step|_runtime|_timestamp&buckets=N&lo=&hi=`` -> Arrow: exact rows when at
        most ``buckets`` fall in ``[lo, hi]``, else per bucket ``<key>`` (last), ``<key>:min``,
        ``<key>:max`` (see :func:`gradexp.explorer.history.reduce_history`). ``?since=STEP``: the
        exact rows after STEP. Without ``keys``, every chartable key."""
        reader = await self._reader(request)
        q = request.query_params
        keys = [k for k in q.get("keys", "").split(",") if k] or None
        x = q.get("x", "step")
        try:
            buckets = int(q.get("buckets", "1000"))
            lo = float(q["lo"]) if q.get("lo") else None
            hi = float(q["hi"]) if q.get("hi") else None
            after = int(q["since"]) if q.get("since") else None
        except ValueError:
            raise ApiError(400, "buckets and since must be integers, lo and hi numbers") from None
        if not 1 <= buckets <= _MAX_BUCKETS:
            raise ApiError(400, f"buckets must be 1 to {_MAX_BUCKETS}; got {buckets}")
        e = request.path_params["entity"]

        def work() -> pa.Table:
            try:
                if after is not None:
                    _, table = history.history_table(self.x, e, reader)
                    return history.since(table, keys if keys is not None else history.chart_keys(table), after)
                # the columns drawn (an ended run's final history: decoded alone)
                stamp, table = history.history_columns(self.x, e, reader, keys)
                chosen = table.column_names[len(history.X_AXES):]
                return reduced(self.x, e, reader, stamp, table, chosen, x=x, buckets=buckets, lo=lo, hi=hi)
            except KeyError as exc:
                raise LookupError(exc.args[0]) from None
        return arrow_response(await self.x.in_worker(work))


    async def console(self, request: Request) -> Response:
        """``?since=N`` -> ``{"lines": [{line, time, stream, text}, ...]}``: the run's console
        output from line N on (a live page asks only for the lines after those it shows)."""
        reader = await self._reader(request)
        try:
            since = int(request.query_params.get("since", "0"))
        except ValueError:
            raise ApiError(400, "since must be an integer") from None
        if since < 0:
            raise ApiError(400, f"since must be 0 or more; got {since}")

        def work() -> dict[str, Any]:
            return {"lines": [x._asdict() for x in reader.console(since)]}
        return json_response(await self.x.in_worker(work))

    async def system(self, request: Request) -> Response:
        """The run's system metrics as Arrow: ``step`` (sample number), ``_timestamp``,
        ``_runtime`` and one column per ``system/...`` figure."""
        reader = await self._reader(request)
        return arrow_response(await self.x.in_worker(reader.system))

    async def provenance(self, request: Request) -> Response:
        """The code's provenance without the patch and package list (``has_patch`` says
        whether ``/patch`` has one; ``packages`` is their count)."""
        reader = await self._reader(request)

        def work() -> dict[str, Any]:
            prov = reader.provenance
            git = dict(prov.get("git") or {})
            patch = git.pop("patch", None)
            return {"program": prov.get("program"), "git": git, "has_patch": bool(patch),
                    "packages": len(prov.get("packages") or [])}
        return json_response(await self.x.in_worker(work))

    async def git_patch(self, request: Request) -> Response:
        """The uncommitted diff against the recorded commit, as a ``.patch`` download."""
        reader = await self._reader(request)

        def work() -> str:
            patch = (reader.provenance.get("git") or {}).get("patch")
            if not patch:
                raise LookupError(f"run {reader.id} recorded no patch")
            return str(patch)
        text = await self.x.in_worker(work)
        name = "".join(c if c.isalnum() or c in "-_." else "_" for c in reader.id)
        return PlainTextResponse(text, media_type="text/x-diff", headers={
            **HEADERS, "Cache-Control": "no-store", "Content-Disposition": f'attachment; filename="{name}.patch"'})


def reduced(explorer: Explorer, entity: str, reader: RunReader, stamp: Any, table: pa.Table, keys: list[str], *,
            x: str, buckets: int, lo: float | None, hi: float | None) -> pa.Table:
    """:func:`history.reduce_history`, remembered per history stamp (a page reload or a second
    viewer of a big run costs a cache lookup)."""
    key = ("reduced", entity, reader.project, reader.id, tuple(keys), x, buckets, lo, hi)
    cached = explorer.cache.get(key)
    if cached is not None and stamp is not None and cached[0] == stamp:
        return cached[1]
    out = history.reduce_history(table, keys, x=x, buckets=buckets, lo=lo, hi=hi)
    if stamp is not None:
        explorer.cache.put(key, (stamp, out), out.nbytes)
    return out
