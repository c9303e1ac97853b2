"""Read runs back: :class:`Api` finds runs in local folders or on a server and returns readers
(:class:`gradexp.read.RunReader`) that read them alike."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from gradexp.core.errors import RunNotFoundError
from gradexp.core.layout import RUN_JSON
from gradexp.core.settings import resolve
from gradexp.read.local import StoredRun

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
        self._client: Any = None

    @property
    def client(self) -> Any:
        """The HTTP client for :attr:`host` (made on first use)."""
        if self._client is None:
            from gradexp.core.client import Client

            self._client = Client(self.host, self._api_key)
        return self._client

    def run(self, ref: str | os.PathLike[str]) -> Any:
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

    def runs(self, project: str | None = None) -> list[StoredRun]:
        """Every run under :attr:`dir` (of one project if given), newest first."""
        pattern = f"{project}/*/{RUN_JSON}" if project else f"*/*/{RUN_JSON}"
        runs = [StoredRun(p.parent) for p in self.dir.glob(pattern)]
        return sorted(runs, key=lambda r: r.meta.get("created_at", 0), reverse=True)

