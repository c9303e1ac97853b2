"""One shared pool of worker threads for work that releases the GIL: zstd decompression of
frames, NumPy reductions over whole columns. The explorer's cold reads spend most of their
time there, so on a machine with more than one core they finish sooner spread over it."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

__all__ = ["MIN_ITEMS", "map_ordered"]

T = TypeVar("T")
R = TypeVar("R")

MIN_ITEMS = 4
"""Fewer items than this run in the calling thread (a hop to the pool costs more)."""

_POOL: ThreadPoolExecutor | None = None
_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(min(4, os.cpu_count() or 1), thread_name_prefix="gradexp-pool")
        return _POOL


def map_ordered(fn: Callable[[T], R], items: Sequence[T], *, min_items: int = MIN_ITEMS) -> list[R]:
    """``[fn(item) for item in items]``, in order, on the shared pool (up to 4 threads) when there
    are at least ``min_items``. The first exception ``fn`` raises is raised here; ``fn`` should
    return the errors it expects (say, a damaged frame to report) rather than raise them.
    ``fn`` must not itself wait on this pool."""
    if len(items) < max(2, min_items) or (os.cpu_count() or 1) < 2:
        return [fn(item) for item in items]
    return list(_pool().map(fn, items))
