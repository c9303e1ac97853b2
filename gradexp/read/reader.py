"""The interface every run reader implements: local folders, a server over HTTP, the server's
own database and store. The explorer, export and ``Api()`` read through it and nothing else."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pyarrow as pa

from gradexp.core import media as _media
from gradexp.core.streams import ConsoleLine

__all__ = ["RecordFields", "RunReader", "TensorMedia"]


@runtime_checkable
class RunReader(Protocol):
    """A run, read-only, finished or live.

    Metadata (``meta`` holds the run record: name, tags, notes, host, argv, versions, times,
    exit code) is re-read on each access of :attr:`status`, :attr:`config` and :attr:`summary`,
    so a live run's reader stays current. Tensors come back bit-exact in their logged dtype and
    shape; where a (key, step) was written twice the last write wins.
    """

    meta: dict[str, Any]

    @property
    def id(self) -> str: ...
    @property
    def project(self) -> str: ...
    @property
    def name(self) -> str | None: ...
    @property
    def tags(self) -> list[str]: ...
    @property
    def notes(self) -> str | None: ...
    @property
    def config(self) -> dict[str, Any]: ...
    @property
    def summary(self) -> dict[str, Any]: ...
    @property
    def status(self) -> str:
        """``running``, ``finished``, ``failed`` or ``crashed``."""
        ...

    @property
    def damage(self) -> list[Any]:
        """Byte ranges that could not be read (``gradexp.core.format.Damage``)."""
        ...

    def history(self, keys: Sequence[str] | None = None) -> pa.Table:
        """``step``, ``_timestamp``, ``_runtime`` and one column per key, in step order."""
        ...

    def keys(self) -> list[str]:
        """Every logged key: history columns and tensors."""
        ...

    def tensor_keys(self) -> list[str]:
        """Tensor keys, sorted (a server cannot cheaply tell the order they were first written)."""
        ...

    def steps(self, key: str) -> list[int]:
        """The steps at which tensor ``key`` was logged, ascending (``KeyError`` if none)."""
        ...

    def tensor(self, key: str, step: int) -> np.ndarray:
        """Tensor ``key`` at ``step`` (``KeyError`` naming what exists if absent)."""
        ...

    def tensors(self, key: str, steps: Iterable[int] | None = None, *,
                reuse: bool = False) -> Iterator[tuple[int, np.ndarray]]:
        """``(step, array)`` for the given steps (default: every logged step) in step order.

        Each array is the caller's own to modify. With ``reuse`` a reader may decode into
        memory it reuses per thread: each array is then valid only until the next one is
        asked for, and a thread runs one such iteration at a time (a caller that reduces each
        step at once, as the distribution view does, touches no fresh memory per step)."""
        ...

    def console(self, since: int = 0) -> list[ConsoleLine]:
        """The run's console output from line ``since`` on, one line each (number, time,
        stream, text) as the terminal showed it; empty if none was captured."""
        ...

    def system(self, keys: Sequence[str] | None = None) -> pa.Table:
        """System metrics sampled by the run's sender process: ``step``, ``_timestamp``,
        ``_runtime`` and one column per ``system/...`` figure."""
        ...

    @property
    def provenance(self) -> dict[str, Any]:
        """The code's provenance: ``git`` (commit, branch, remote, dirty, patch), ``program``,
        ``packages`` (docs/provenance.md); empty if not recorded."""
        ...


class RecordFields:
    """The run record's fields, which every reader takes from ``meta`` alike."""

    meta: dict[str, Any]

    @property
    def name(self) -> str | None:
        return self.meta.get("name")

    @property
    def tags(self) -> list[str]:
        return self.meta.get("tags") or []

    @property
    def notes(self) -> str | None:
        return self.meta.get("notes")

    @property
    def group(self) -> str | None:
        return self.meta.get("group")

    @property
    def job_type(self) -> str | None:
        return self.meta.get("job_type")


class _Framed(Protocol):
    def steps(self, key: str) -> list[int]: ...
    def _frame(self, key: str, step: int) -> tuple[np.ndarray, dict[bytes, bytes]]: ...


class TensorMedia:
    """Dimension labels and media of a tensor, for readers that decode a step's frame with
    its field metadata (``_frame``) and list a key's steps (``steps``)."""

    def dims(self: _Framed, key: str, step: int | None = None) -> tuple[str, ...] | None:
        """The dimension labels tensor ``key`` was logged with (at ``step``, default its last
        step), or None if it has none."""
        return _media.labels(self._frame(key, self.steps(key)[-1] if step is None else step)[1])

    def media(self: _Framed, key: str, step: int) -> Any:
        """What was logged under ``key`` at ``step``: a :class:`gradexp.Histogram`,
        :class:`gradexp.Image` or :class:`gradexp.Table` as logged, else the tensor."""
        return _media.from_frame(*self._frame(key, step))
