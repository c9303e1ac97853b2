"""The explorer on ``gradexp server``: its catalog over the server's database and store, and
who a request comes from (a browser session, or an API key).

The access rule is the API's: a viewer sees only their own entity's projects and runs;
any other address answers 404, as if it did not exist. Reads are CSRF-safe by being reads;
the one write (rename, notes, tags) needs the session's CSRF token in ``X-CSRF-Token``, or an
API key (which no other site can make a browser send).
"""

from __future__ import annotations

from typing import Any, cast
from urllib.parse import urlencode

import sqlalchemy as sa
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.routing import BaseRoute

from .. import _format
from ..explorer.app import explorer_routes
from ..explorer.catalog import ProjectInfo, RunInfo
from ..explorer.context import AccessDenied, Explorer, Viewer
from ..read.reader import RunReader
from . import accounts, db
from .reader import ServerRun
from .store import Store
from .web import SESSION_COOKIE

__all__ = ["ServerCatalog", "routes"]


class ServerCatalog:
    """Runs in the server's database and store; renames and notes are written back there (so
    ``Api()`` sees them too)."""

    read_only = False

    def __init__(self, engine: Any, store: Store) -> None:
        self.engine = engine
        self.store = store

    def _entity_id(self, viewer: Viewer, entity: str) -> int:
        if entity != viewer.entity:
            raise LookupError(f"no entity {entity!r}")
        with self.engine.connect() as conn:
            found = db.entity_id(conn, entity)
        if found is None:
            raise LookupError(f"no entity {entity!r}")
        return found

    def projects(self, viewer: Viewer) -> list[ProjectInfo]:
        eid = self._entity_id(viewer, viewer.entity)
        p, r = db.projects, db.runs
        q = (sa.select(p.c.name, sa.func.count(r.c.id).label("runs"),
                       sa.func.max(sa.func.coalesce(r.c.heartbeat_at, r.c.updated_at)).label("last"))
             .outerjoin(r, r.c.project_id == p.c.id).where(p.c.entity_id == eid)
             .group_by(p.c.id, p.c.name))
        with self.engine.connect() as conn:
            rows = conn.execute(q).mappings().all()
        out = [ProjectInfo(entity=viewer.entity, name=row["name"], runs=int(row["runs"]), last_activity=row["last"])
               for row in rows if row["runs"]]
        return sorted(out, key=lambda x: x.last_activity or 0, reverse=True)

    def runs(self, viewer: Viewer, entity: str, project: str) -> list[RunInfo]:
        eid = self._entity_id(viewer, entity)
        with self.engine.connect() as conn:
            pid = db.project_id(conn, eid, project, create=False)
            if pid is None:
                raise LookupError(f"no project {entity}/{project}")
            rows = db.list_runs(conn, eid, project=project, limit=10_000)
            frames, runs = db.frames, db.runs  # last steps from the frame index: no part is read
            last = dict(conn.execute(
                sa.select(runs.c.run_id, sa.func.max(frames.c.step_max)).join(frames, frames.c.run_pk == runs.c.id)
                .where(runs.c.project_id == pid, frames.c.kind == _format.KIND_HISTORY).group_by(runs.c.run_id)).all())
        return [RunInfo(entity=entity, project=project, id=r["id"], name=r["name"], status=r["status"],
                        created_at=r["created_at"], finished_at=r["finished_at"], heartbeat_at=r["heartbeat_at"],
                        last_step=last.get(r["id"]), tags=list(r["tags"] or []), notes=r["notes"],
                        config=r["config"] or {}, summary=r["summary"] or {}) for r in rows]

    def open(self, viewer: Viewer, entity: str, project: str, run_id: str) -> RunReader:
        eid = self._entity_id(viewer, entity)
        return cast(RunReader, ServerRun(self.engine, self.store, entity_id=eid, entity=entity, project=project,
                                         run_id=run_id))

    def update(self, viewer: Viewer, entity: str, project: str, run_id: str, *, name: str | None = None,
               notes: str | None = None, tags: list[str] | None = None) -> None:
        eid = self._entity_id(viewer, entity)
        fields = {k: v for k, v in (("name", name), ("notes", notes), ("tags", tags)) if v is not None}
        with self.engine.begin() as conn:
            pk = db.run_pk(conn, eid, project, run_id)
            if pk is None:
                raise LookupError(f"no run {entity}/{project}/{run_id}")
            if fields:
                db.update_run(conn, pk, **db._run_values(fields))


def routes(engine: Any, store: Store) -> list[BaseRoute]:
    """The explorer's routes for this server: append after the server's own."""

    async def authenticate(request: Request) -> Viewer:
        auth = request.headers.get("authorization", "")
        scheme, _, key = auth.partition(" ")
        if scheme.lower() == "bearer" and key.strip():
            v = await run_in_threadpool(db.authenticate, engine, key.strip())
            if v is None:
                raise AccessDenied(401, "invalid or revoked API key")
            return Viewer(user=v.user, entity=v.entity, key=v)
        s = await run_in_threadpool(accounts.session, engine, request.cookies.get(SESSION_COOKIE))
        if s is None:
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            raise AccessDenied(401, "sign in first (or send 'Authorization: Bearer <key>')",
                               sign_in="/login?" + urlencode({"next": target}))
        return Viewer(user=s.user, entity=s.entity, csrf=s.csrf, key=s)

    explorer = Explorer(ServerCatalog(engine, store), authenticate=authenticate,
                        nav=[("API keys", "/keys"), ("Account", "/account")])
    return explorer_routes(explorer)

