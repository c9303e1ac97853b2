"""Read runs back: :class:`Api` finds runs in local folders or on a server and returns readers
(:class:`gradexp.read.RunReader`) that read them alike."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradexp.core.errors import InvalidValueError, RunNotFoundError, UsageError
from gradexp.core.layout import RUN_JSON
from gradexp.core.settings import resolve
from gradexp.read.local import StoredRun
from gradexp.read.reader import RunReader

if TYPE_CHECKING:
    from gradexp.core.client import Client
    from gradexp.read.remote import RemoteRun

__all__ = ["Api", "StoredRun"]

class Api:
    """Entry point of the read side.

    Local runs live under ``dir`` (default ``$GRADEXP_DIR`` or ``./gradexp-runs``);
    runs on a server (``host``, ``api_key``, defaulting to ``$GRADEXP_HOST`` and
    ``$GRADEXP_API_KEY``) are named ``"entity/project/run_id"``.
    """

    def __init__(self, *, dir: str | os.PathLike[str] | None = None, host: str | None = None,
                 api_key: str | None = None) -> None:
        s = resolve({"dir": dir, "host": host, "api_key": api_key})
        self.dir = s.dir.absolute()
        self.host = s.host
        self._api_key = s.api_key
        self._client: Client | None = None

    @property
    def client(self) -> Client:
        """The HTTP client for :attr:`host` (made on first use)."""
        if self._client is None:
            from gradexp.core.client import Client

            self._client = Client(self.host, self._api_key)
        return self._client

    def run(self, ref: str | os.PathLike[str]) -> StoredRun | RemoteRun:
        """A run: a folder path, ``"project/run_id"`` or a bare run id under :attr:`dir`, or
        ``"entity/project/run_id"`` on :attr:`host`. Returns a :class:`StoredRun` for local
        runs and a :class:`gradexp.read.remote.RemoteRun` for remote ones; both read alike."""
        path = Path(ref)
        if self.host and isinstance(ref, str) and ref.count("/") == 2 and not path.exists():
            from gradexp.read.remote import RemoteRun

            return RemoteRun(self.client, ref)
        candidates = [path]
        if not path.is_absolute():
            candidates.append(self.dir / path)
            if len(path.parts) == 1:
                candidates.extend(sorted(self.dir.glob(f"*/{path.name}")))
        for c in candidates:
            if (c / RUN_JSON).is_file():
                return StoredRun(c)
        raise RunNotFoundError(f"no run {str(ref)!r}: not a run folder, and not found under {self.dir} "
                               "(refer to a run as a folder path, 'project/run_id' or a run id)")

    def runs(self, project: str | None = None, *, status: str | None = None,
             tags: Iterable[str] = ()) -> list[RunReader]:
        """Runs, newest first, with ``status`` and all of ``tags`` if given.

        ``"entity/project"`` lists that project's runs on :attr:`host`, and no project with a
        host set every run of the viewer there (:class:`gradexp.read.remote.RemoteRun`, the
        newest 1,000 at most); a user sees their own entity's runs only, so another
        entity's project lists none. A bare
        ``"project"``, or no project and no host, lists the run folders under :attr:`dir`
        (:class:`StoredRun`)."""
        if project is None and self.host:
            return self._server_runs(None, None, status=status, tags=tags)
        if project is not None and "/" in project:
            entity, _, name = project.partition("/")
            if not entity or not name or "/" in name:
                raise InvalidValueError(f"a project on a server is 'entity/project', not {project!r}")
            return self._server_runs(entity, name, status=status, tags=tags)
        return self._local_runs(project, status=status, tags=tags)

    def _local_runs(self, project: str | None, *, status: str | None = None,
                    tags: Iterable[str] = ()) -> list[RunReader]:
        wanted = set(tags)
        pattern = f"{project}/*/{RUN_JSON}" if project else f"*/*/{RUN_JSON}"
        runs = [StoredRun(p.parent) for p in self.dir.glob(pattern)]
        runs = [r for r in runs if (status is None or r.status == status) and wanted.issubset(r.tags)]
        return sorted(runs, key=lambda r: r.meta.get("created_at", 0), reverse=True)

    def _server_runs(self, entity: str | None, project: str | None, *, status: str | None = None,
                     tags: Iterable[str] = ()) -> list[RunReader]:
        """Runs on :attr:`host` (of the viewer's entity: another's has none to show)."""
        from gradexp.read.remote import RemoteRun

        if not self.host:
            raise UsageError(f"runs of {entity}/{project} are on a server, and no host is set: pass host= "
                             "(or set GRADEXP_HOST, or run `gradexp login`)")
        params: list[tuple[str, str]] = [("project", project)] if project else []
        params += [("status", status)] if status else []
        params += [("tag", t) for t in dict.fromkeys(tags)]
        rows: list[dict[str, Any]] = []
        cursor: str | None = None
        while True:  # the server answers a page at a time; "next" names where the following one starts
            page = self.client.json("GET", "/runs", params=params + ([("cursor", cursor)] if cursor else []))
            rows += page["runs"]
            cursor = page.get("next")
            if not cursor:
                break
        return [RemoteRun(self.client, f"{r['entity']}/{r['project']}/{r['id']}", meta=r)
                for r in rows if entity is None or r["entity"] == entity]

