"""Where the explorer finds runs: a :class:`Catalog` lists projects and runs a viewer may see
and opens one as a :class:`~gradexp.read.reader.RunReader`.

:class:`LocalCatalog` serves run folders (``<dir>/<project>/<run id>/``) under the entity
``local``, read-only; the server's catalog (``gradexp.server.explorer_catalog``) serves its
database and store with the API's access rule.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast, runtime_checkable

from .._files import RUN_JSON, check_name, read_json
from ..read.reader import RunReader

__all__ = ["LOCAL_ENTITY", "Catalog", "LocalCatalog", "ProjectInfo", "RunInfo"]

LOCAL_ENTITY = "local"


@dataclass(frozen=True)
class ProjectInfo:
    """One row of the projects page."""

    entity: str
    name: str
    runs: int
    last_activity: float | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RunInfo:
    """One row of the runs table. ``summary`` and ``config`` are the run's own (flat or
    nested); the table picks columns from them."""

    entity: str
    project: str
    id: str
    name: str | None
    status: str
    created_at: float | None
    finished_at: float | None
    heartbeat_at: float | None
    last_step: int | None
    tags: list[str] = field(default_factory=list)
    notes: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@runtime_checkable
class Catalog(Protocol):
    """The runs a viewer may see. ``viewer`` is whatever the host's authentication returned
    (:class:`gradexp.explorer.context.Viewer`)."""

    read_only: bool

    def projects(self, viewer: Any) -> list[ProjectInfo]: ...

    def runs(self, viewer: Any, entity: str, project: str) -> list[RunInfo]:
        """Newest first; ``LookupError`` for a project the viewer may not see."""
        ...

    def open(self, viewer: Any, entity: str, project: str, run_id: str) -> RunReader:
        """The run, or ``LookupError`` if it does not exist or the viewer may not see it."""
        ...

    def update(self, viewer: Any, entity: str, project: str, run_id: str, *, name: str | None = None,
               notes: str | None = None, tags: list[str] | None = None) -> None:
        """Rename the run and set its notes and tags (``None`` leaves a field as it is);
        ``PermissionError`` where runs are read-only."""
        ...


class LocalCatalog:
    """Run folders under ``dir``, as the entity ``local``: every viewer sees every run (the
    app that serves it guards access with its own token), nobody edits them."""

    read_only = True

    def __init__(self, dir: str | os.PathLike[str], *, open_readers: int = 64) -> None:
        self.dir = Path(dir).absolute()
        self._readers: OrderedDict[Path, RunReader] = OrderedDict()
        self._max = open_readers
        self._lock = threading.Lock()

    def _entity(self, entity: str) -> None:
        if entity != LOCAL_ENTITY:
            raise LookupError(f"no entity {entity!r} here: local runs belong to {LOCAL_ENTITY!r}")

    def projects(self, viewer: Any) -> list[ProjectInfo]:
        out: list[ProjectInfo] = []
        if not self.dir.is_dir():
            return out
        for p in sorted(self.dir.iterdir()):
            runs = [r.parent for r in p.glob(f"*/{RUN_JSON}")] if p.is_dir() else []
            if not runs:
                continue
            last = max(_mtime(r) for r in runs)
            out.append(ProjectInfo(entity=LOCAL_ENTITY, name=p.name, runs=len(runs), last_activity=last))
        return sorted(out, key=lambda x: x.last_activity or 0, reverse=True)

    def _project_dir(self, entity: str, project: str) -> Path:
        self._entity(entity)
        try:
            check_name("project", project)
        except ValueError:
            raise LookupError(f"no project {project!r}") from None
        folder = self.dir / project
        if not folder.is_dir():
            raise LookupError(f"no project {project!r} under {self.dir}")
        return folder

    def runs(self, viewer: Any, entity: str, project: str) -> list[RunInfo]:
        folder = self._project_dir(entity, project)
        out = []
        for meta_path in folder.glob(f"*/{RUN_JSON}"):
            try:
                reader = self._reader(meta_path.parent)
            except LookupError:
                continue
            out.append(run_info(reader, entity=LOCAL_ENTITY, heartbeat_at=_mtime(meta_path.parent)))
        return sorted(out, key=lambda r: r.created_at or 0, reverse=True)

    def open(self, viewer: Any, entity: str, project: str, run_id: str) -> RunReader:
        folder = self._project_dir(entity, project)
        try:
            check_name("run id", run_id)
        except ValueError:
            raise LookupError(f"no run {run_id!r}") from None
        return self._reader(folder / run_id)

    def update(self, viewer: Any, entity: str, project: str, run_id: str, *, name: str | None = None,
               notes: str | None = None, tags: list[str] | None = None) -> None:
        raise PermissionError("local runs are read-only in the explorer: edit them on a server after "
                              "`gradexp sync`")

    def _reader(self, path: Path) -> RunReader:
        """One reader per run folder, kept (readers cache their part indexes)."""
        with self._lock:
            reader = self._readers.get(path)
            if reader is not None:
                self._readers.move_to_end(path)
                return reader
        if read_json(path / RUN_JSON) is None:
            raise LookupError(f"no run folder {path}")
        from ..api import StoredRun

        reader = cast(RunReader, StoredRun(path))
        with self._lock:
            self._readers[path] = reader
            while len(self._readers) > self._max:
                self._readers.popitem(last=False)
        return reader


def _mtime(folder: Path) -> float:
    """Last activity of a run folder: its newest file among metadata and parts."""
    times = []
    for name in (RUN_JSON, "summary.json", "parts"):
        try:
            times.append((folder / name).stat().st_mtime)
        except OSError:
            pass
    return max(times, default=0.0)


def run_info(reader: RunReader, *, entity: str, heartbeat_at: float | None = None) -> RunInfo:
    """The runs-table row of a reader (status and summary re-read: a live run moves)."""
    status = reader.status
    meta = reader.meta
    summary = reader.summary
    counted = getattr(reader, "last_step", None)  # readers that know it without reading the history
    last = counted() if callable(counted) else None
    return RunInfo(entity=entity, project=str(reader.project), id=reader.id, name=reader.name, status=status,
                   created_at=meta.get("created_at"), finished_at=meta.get("finished_at"),
                   heartbeat_at=heartbeat_at or meta.get("heartbeat_at"),
                   last_step=last if isinstance(last, int) else None, tags=list(reader.tags or []),
                   notes=reader.notes, config=reader.config, summary=summary)
