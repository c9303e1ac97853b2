"""What every explorer endpoint shares: who is asking, which run they may read, a worker
thread for anything heavier than a dict lookup, and a bounded cache of computed results."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio.to_thread
from starlette.requests import Request

from ..read.reader import RunReader
from .catalog import Catalog

__all__ = ["AccessDenied", "Explorer", "ResultCache", "Viewer"]

T = TypeVar("T")


@dataclass(frozen=True)
class Viewer:
    """Who is asking. ``csrf`` is the token an edit must echo in ``X-CSRF-Token`` (a browser
    session's); ``None`` for API-key requests, which browsers cannot forge. ``key`` is what the
    host needs to apply its access rule (the server's viewer record)."""

    user: str
    entity: str
    csrf: str | None = None
    key: Any = None


class AccessDenied(Exception):
    """The request has no valid credentials: 401/403 for the API, a sign-in redirect for pages."""

    def __init__(self, status: int, message: str, *, sign_in: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.sign_in = sign_in


Authenticate = Callable[[Request], Awaitable[Viewer]]
"""Returns the viewer of a request, or raises :class:`AccessDenied`."""


class ResultCache:
    """A least-recently-used cache of computed results, bounded by their total size in bytes.

    Keys are tuples naming the input (run, key, parameters); values are immutable results.
    Thread-safe: workers fill it while the event loop reads it."""

    def __init__(self, max_bytes: int = 512 << 20) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._items: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()
        self._stripes = [threading.Lock() for _ in range(64)]

    def computing(self, key: Hashable) -> threading.Lock:
        """A lock to hold while computing the value of ``key``, so that concurrent requests
        for it (a page's first requests, two viewers) compute it once: the others wait, then
        find it cached. Striped: unrelated keys rarely share one."""
        return self._stripes[hash(key) % len(self._stripes)]

    def get(self, key: Hashable) -> Any | None:
        with self._lock:
            hit = self._items.get(key)
            if hit is None:
                return None
            self._items.move_to_end(key)
            return hit[0]

    def put(self, key: Hashable, value: Any, nbytes: int) -> None:
        """Keep ``value`` (``nbytes`` large); one larger than the whole cache is not kept."""
        if nbytes > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.nbytes -= old[1]
            self._items[key] = (value, nbytes)
            self.nbytes += nbytes
            while self.nbytes > self.max_bytes:
                _, (_, size) = self._items.popitem(last=False)
                self.nbytes -= size

    def __len__(self) -> int:
        return len(self._items)


class Explorer:
    """The explorer's shared state, handed to every route module.

    ``authenticate`` says who a request comes from (the server: a session cookie or an API
    key; ``gradexp ui``: its token cookie). ``catalog`` applies the access rule."""

    def __init__(self, catalog: Catalog, *, authenticate: Authenticate, title: str = "gradexp",
                 cache_bytes: int = 512 << 20, nav: list[tuple[str, str]] | None = None) -> None:
        self.catalog = catalog
        self.authenticate = authenticate
        self.title = title
        self.cache = ResultCache(cache_bytes)
        self.nav = nav or []
        """Extra links for the page header: (label, path), e.g. the server's API keys page."""

    async def viewer(self, request: Request) -> Viewer:
        viewer = await self.authenticate(request)
        request.state.user = viewer.user  # for the access log
        return viewer

    async def run(self, request: Request, entity: str, project: str, run_id: str) -> RunReader:
        """The run a request names, if its viewer may read it (``LookupError`` -> 404 otherwise,
        the same answer as for a run that does not exist)."""
        viewer = await self.viewer(request)
        return await self.in_worker(self.catalog.open, viewer, entity, project, run_id)

    async def in_worker(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a worker thread: reading parts and computing on arrays never runs on
        the event loop, which keeps serving other requests meanwhile."""
        return await anyio.to_thread.run_sync(lambda: fn(*args))
