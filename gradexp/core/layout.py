"""The run folder: its file and stream names, the name rule, the run lock, atomic JSON writes.

Everything that reads or writes run folders (writer, sender, readers, server store) takes
these names from here.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from gradexp.core.errors import InvalidTypeError, InvalidValueError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

RUN_JSON = "run.json"
CONFIG_JSON = "config.json"
SUMMARY_JSON = "summary.json"
LOCK = "run.lock"
PARTS = "parts"

HISTORY = "history"
TENSORS = "tensors"
CONSOLE = "console"
SYSTEM = "system"
STREAMS = (HISTORY, TENSORS, CONSOLE, SYSTEM)
"""The part streams of a run: ``parts/<stream>-<seq>.gxp`` (console and system metrics are
written by the sender process, the others by the writer thread)."""
FATAL = "fatal"
"""The signal channel of fatal errors (trainer to sender): faulthandler's text names the
signal (``Segmentation fault``). Here, not in :mod:`gradexp.core.streams`, so that
``init()`` does not import that module (its ``NamedTuple`` costs ms to build)."""

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
"""Entity, project and run ids (JSON Schema form, where ``$`` ends the input): safe in URLs,
object keys and file names."""
NAME = re.compile(NAME_PATTERN[:-1] + r"\Z")  # \Z: Python's "$" would accept a trailing newline


def check_name(what: str, value: Any) -> str:
    """Project names and run ids become folder names: letters, digits, '.', '_', '-' only."""
    if not isinstance(value, str):
        raise InvalidTypeError(f"{what} must be a str; got {type(value).__name__}")
    if not NAME.match(value) or value in (".", ".."):
        raise InvalidValueError(f"{what} {value!r} must be 1-128 letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit")
    return value


def to_jsonable(value: Any) -> Any:
    """``json.dumps(default=...)`` hook: NumPy scalars and small arrays, paths."""
    if isinstance(value, np.generic):
        item = value.item()
        if isinstance(item, np.generic):  # np.longdouble: no Python type holds it exactly
            raise InvalidTypeError(f"NumPy {value.dtype} value {value!r} has no exact JSON form")
        return item
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=repr)
    raise InvalidTypeError(f"{type(value).__name__} is not JSON serialisable")


def write_json(path: Path, data: Any, *, fsync: bool = False) -> None:
    """Write ``data`` as JSON via a temp file (mode 0600) and rename, so readers never see
    half a file; with ``fsync`` it is on disk before the rename, and the rename is made
    durable by an fsync of the folder."""
    text = json.dumps(data, indent=2, default=to_jsonable, allow_nan=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if fsync:
            dfd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def read_json(path: Path, default: Any = None) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return default


def is_locked(path: Path) -> bool:
    """True while a live process holds the run's lock."""
    if fcntl is None:
        return True
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing our own descriptor drops a lock we took
    return False
