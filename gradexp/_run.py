"""Run: config, summary, step bookkeeping and lifecycle; the module-level run stack."""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import errno
import json
import os
import platform
import secrets
import socket
import string
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from pathlib import Path
from typing import Any, NoReturn

from ._errors import GradexpWarning, UsageError
from ._files import CONFIG_JSON, LOCK, PARTS, RUN_JSON, SUMMARY_JSON, check_name, to_jsonable, write_json
from ._settings import Settings, resolve
from ._values import INT_MAX, Keys, Prepared, prepare
from ._version import __version__

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

DEFAULT_PROJECT = "uncategorized"
_ID_ALPHABET = string.ascii_lowercase + string.digits


def new_run_id() -> str:
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(8))


class Config(MutableMapping):
    """The run's configuration; every change is saved to ``config.json`` at once."""

    def __init__(self, path: Path | None, data: Mapping[str, Any]) -> None:
        self._path = path
        self._data = dict(data)
        self._check(self._data)
        self._save()

    @staticmethod
    def _check(data: Mapping[str, Any]) -> None:
        for key, value in data.items():
            if not isinstance(key, str):
                raise TypeError(f"config keys must be str; got {key!r}")
            try:
                json.dumps(value, default=to_jsonable)
            except (TypeError, ValueError) as e:
                raise TypeError(f"config key {key!r}: value cannot be saved as JSON ({e})") from None

    def _save(self) -> None:
        if self._path is not None:
            write_json(self._path, self._data)

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self.update({key: value})

    def __delitem__(self, key: str) -> None:
        del self._data[key]
        self._save()

    def update(self, other: Any = (), /, **kw: Any) -> None:
        """Merge and save once (not once per key)."""
        new = dict(other, **kw)
        self._check(new)
        self._data.update(new)
        self._save()

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __getattr__(self, key: str) -> Any:
        try:
            return self.__dict__["_data"][key]
        except KeyError:
            raise AttributeError(key) from None

    def __repr__(self) -> str:
        return f"Config({self._data!r})"


class Summary(MutableMapping):
    """Last value of each logged scalar, unless assigned; saved at each flush and at finish."""

    def __init__(self) -> None:
        self._data: dict[str, Any] = {}
        self.dirty = False

    def _logged(self, scalars: Mapping[str, Any]) -> None:
        self._data.update(scalars)
        self.dirty = True

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self._data[key] = value
        self.dirty = True

    def __delitem__(self, key: str) -> None:
        del self._data[key]
        self.dirty = True

    def __iter__(self) -> Iterator[str]:
        return iter(dict(self._data))

    def __len__(self) -> int:
        return len(self._data)

    def snapshot(self) -> dict[str, Any]:
        self.dirty = False
        return self._data.copy()

    def __repr__(self) -> str:
        return f"Summary({self._data!r})"


class Run:
    """One training run. Create with :func:`gradexp.init`."""

    def __init__(self, project: str | None = None, *, name: str | None = None, id: str | None = None,
                 config: Mapping[str, Any] | argparse.Namespace | None = None,
                 tags: list[str] | tuple[str, ...] | None = None, notes: str | None = None,
                 settings: Settings) -> None:
        self.settings = settings
        self.project = check_name("project", project or DEFAULT_PROJECT)
        self.id = check_name("run id", id) if id is not None else new_run_id()
        self.name = name if name is not None else self.id
        self.tags = [str(t) for t in (tags or ())]
        self.notes = notes
        self.start_time = time.time()
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._keys = Keys()
        self._step = 0
        self._max_step = -1
        self._pending: Prepared | None = None
        self._warned: set[str] = set()
        self._finished = False
        self._exception: BaseException | None = None
        """The error that ended the run (an uncaught exception, one leaving a ``with`` block)."""
        # Rows captured outside log() (gradexp.watch): each source hands over what it holds,
        # or None, and log() merges it into the row it records.
        self._row_sources: list[Callable[[Keys], Prepared | None]] = []
        self.summary = Summary()
        if isinstance(config, argparse.Namespace):
            config = vars(config)
        if config is not None and not isinstance(config, Mapping):
            raise TypeError(f"config must be a dict or argparse.Namespace; got {type(config).__name__}")
        if settings.mode == "online" and not (settings.host and settings.api_key):
            missing = (f"there is no API key for {settings.host}" if settings.host else "no server (host) is set")
            warnings.warn(f"gradexp: online mode needs a server and an API key, but {missing}; "
                          "this run is offline. Run `gradexp login` (or set GRADEXP_HOST and "
                          "GRADEXP_API_KEY), then upload it with `gradexp sync`.",
                          GradexpWarning, stacklevel=3)
            settings = dataclasses.replace(settings, mode="offline")
            self.settings = settings
        self.disabled = settings.mode == "disabled"
        self._sender: Any = None
        if self.disabled:
            self.dir = None
            self.config = Config(None, config or {})
            self._writer = None
            return
        self.dir = (settings.dir / self.project / self.id).absolute()
        try:
            (self.dir / PARTS).mkdir(parents=True, exist_ok=False)
        except FileExistsError:
            raise FileExistsError(f"run folder {self.dir} exists already; pick another run id") from None
        self._lock_fd = _hold_lock(self.dir / LOCK)
        self._meta: dict[str, Any] = {
            "id": self.id, "name": self.name, "project": self.project, "tags": self.tags,
            "notes": notes, "status": "running", "created_at": self.start_time,
            "host": socket.gethostname(), "pid": self._pid, "python": platform.python_version(),
            "gradexp": __version__, "format": 1, "argv": sys.argv, "program": program(),
        }
        write_json(self.dir / RUN_JSON, self._meta)
        self.config = Config(self.dir / CONFIG_JSON, config or {})
        if settings.mode == "online" or settings.console or settings.system_metrics or settings.code:
            self._start_sender()
        from ._writer import Writer

        self._writer = Writer(self.dir / PARTS, settings, self.start_time, self._save_summary)

    def _start_sender(self) -> None:
        """A separate process: uploads never make the training loop wait, it records the console
        and system metrics and collects the code's provenance off this process, and it finishes
        the run (marking it crashed, with the signal) if this process dies.

        Spawned here, not by a thread: output written right after ``init()`` must reach the
        terminal even if the process dies a moment later, so the sender holds the console
        pipe before ``init()`` returns. Before the writer starts, whose thread's pyarrow
        import would compete for the GIL with ``subprocess`` and the fork."""
        from ._spawn import Sender
        from .write.signals import SignalWatch

        s = self.settings
        assert self.dir is not None
        capture = None
        if s.console:
            from .write.console import Capture

            capture = Capture()
            capture.start()
        signals = SignalWatch()
        signals.start()
        try:
            self._sender = Sender(self.dir, s, start_time=self.start_time, capture=capture, signals=signals,
                                  program=self._meta["program"] if s.code else None)
        except BaseException:
            signals.stop()
            if capture is not None:
                capture.stop()
            raise

    # -- logging ---------------------------------------------------------------------------

    @property
    def step(self) -> int:
        """The step the next ``log()`` without ``step=`` goes to."""
        return self._step

    def log(self, data: Mapping[str, Any], step: int | None = None, commit: bool = True) -> None:
        """Record ``data`` at ``step`` (default: the current step).

        Nested dicts flatten to ``a/b`` keys. ``commit=False`` keeps the row open so
        later calls at the same step merge into it. A step lower than the current one
        is recorded with one warning; readers return rows in step order and keep the
        last write of a (step, key).
        """
        # a disabled run has no writer (the same test as self.disabled, and it narrows the type)
        if self._finished or self._writer is None or self._pid != _pid or self._writer.error:
            return self._inactive_log()
        if step is not None and (type(step) is not int or not 0 <= step <= INT_MAX):
            step = _check_step(step)
        with self._lock:
            p = prepare(data, self._keys, self._writer.pool)
            for source in self._row_sources:
                captured = source(self._keys)
                if captured is not None:
                    _merge(captured, p)  # the caller's own keys win
                    p = captured
            cur = self._step
            s = cur if step is None else step
            if s > INT_MAX:  # counted up past the last int64 step
                _check_step(s)
            if s > cur:
                if self._pending is not None:
                    self._emit(cur, self._pending)
                    self._pending = None
                self._step = cur = s
            elif s < cur:
                if s < self._max_step and "step" not in self._warned:
                    self._warned.add("step")
                    warnings.warn(f"gradexp: step {s} is lower than the current step {cur}; the "
                                  "row is recorded, and readers merge rows by step (last write "
                                  "wins). This is warned about once.", GradexpWarning, stacklevel=2)
                self._emit(s, p)
                return
            pending = self._pending
            if pending is None:
                pending = p
            else:
                _merge(pending, p)
            if commit:
                self._emit(cur, pending)
                self._pending = None
                self._step = cur + 1
            else:
                self._pending = pending

    def _emit(self, step: int, p: Prepared) -> None:
        if step > self._max_step:
            self._max_step = step
        if p.scalars:
            self.summary._logged(p.scalars)
        assert self._writer is not None  # rows reach _emit only from a run that writes
        self._writer.put_row(step, time.time(), p)

    def _inactive_log(self) -> None:
        if self.disabled:
            return
        if self._pid != os.getpid():
            reason = ("log() in a forked child process is ignored; the run belongs to the parent "
                      "(call gradexp.init() in the child for a run of its own)")
        elif self._finished:
            raise UsageError(f"run {self.id} is finished; call gradexp.init() for a new run")
        else:
            reason = "log() is ignored because the background writer failed (warned above)"
        if reason not in self._warned:
            self._warned.add(reason)
            warnings.warn(f"gradexp: {reason}", GradexpWarning, stacklevel=3)

    # -- lifecycle ---------------------------------------------------------------------------

    def flush(self, *, fsync: bool = False) -> None:
        """Write everything logged so far to the part files (and ``fsync`` them if asked)."""
        if self.disabled or self._pid != os.getpid() or self._finished:
            return
        assert self._writer is not None  # only a disabled run has none
        self._writer.flush(fsync=fsync)  # an open commit=False row stays open

    def _save_summary(self) -> None:
        if self.summary.dirty:
            assert self.dir is not None  # the writer calls this, and only a disabled run has no folder
            write_json(self.dir / SUMMARY_JSON, self.summary.snapshot())

    def finish(self, exit_code: int = 0) -> None:
        """Flush, seal the part files and mark the run finished (or failed if ``exit_code``).

        Never raises for gradexp's own failures (a failed writer, a full disk): the run is
        marked ``failed`` with the reason in ``run.json`` (``error``), and a warning says so.
        """
        exit_code = exit_code_for_record(exit_code)
        if self._finished or self._pid != os.getpid():
            return
        with self._lock:
            if self._finished:
                return
            self._finished = True
            if self._pending is not None and not self.disabled:
                self._emit(self._step, self._pending)
                self._pending = None
        _forget(self)
        if self.disabled:
            return
        if self._exception is None and exit_code and _uncaught:  # atexit after an uncaught exception
            self._exception = _uncaught[-1]
        errors: list[str] = []
        assert self._writer is not None and self.dir is not None  # only a disabled run has none
        self._writer.flush(fsync=True, close=True)  # never raises: a failure is kept in .error
        if self._writer.error is not None:  # warned about when it happened
            errors.append(f"the background writer failed: {self._writer.error!r}")
        warned = len(errors)
        try:
            self.summary.dirty = True
            self._save_summary()
        except Exception as e:  # a full disk, or a summary value assigned that JSON cannot hold
            errors.append(f"could not save {SUMMARY_JSON}: {e!r}")
        if self._sender is not None:
            self._sender.stop_recording(timeout=min(self.settings.finish_timeout, 30.0))
        now = time.time()
        self._meta.update(status="failed" if exit_code or errors else "finished", exit_code=exit_code,
                          finished_at=now, runtime=now - self.start_time)
        if self._exception is not None:
            self._meta["exception"] = describe_exception(self._exception)
        if errors:
            self._meta["error"] = "; ".join(errors)
        try:
            _write_meta(self.dir / RUN_JSON, self._meta)
        except OSError as e:
            errors.append(f"could not save {RUN_JSON} ({e!r}), so the run reads as crashed")
        os.close(self._lock_fd)
        if len(errors) > warned:
            warnings.warn(f"gradexp: run {self.id} ended failed: {'; '.join(errors[warned:])}. What was "
                          f"written before is readable from {self.dir}.", GradexpWarning, stacklevel=2)
        if self._sender is not None:
            self._sender.finish(exit_code, timeout=self.settings.finish_timeout)

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            code = 0
        elif isinstance(exc, SystemExit):  # sys.exit(n) inside the block: the process's code
            code = _status_code(exc.code)
        else:
            code = 1
            self._exception = exc
        self.finish(exit_code=code)

    def __repr__(self) -> str:
        return f"<gradexp.Run {self.project}/{self.id} name={self.name!r} dir={self.dir}>"


def _check_step(step: Any) -> int:
    import numpy as np

    if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
        raise TypeError(f"step must be an int; got {type(step).__name__} {step!r}")
    if not 0 <= step <= INT_MAX:
        raise ValueError(f"step must be >= 0 and < 2**63 (steps are int64); got {step}")
    return int(step)


def _write_meta(path: Path, meta: Mapping[str, Any]) -> None:
    """Write ``run.json``, atomically; on a full disk, in place over its own blocks.

    The atomic write needs room for a second copy. The status at the end of a run
    matters most exactly when the disk is full, so then the file is overwritten in
    place when the new text fits the space the file already holds (padded with
    spaces, which JSON ignores, so it never shrinks and never shows a torn tail).
    """
    try:
        write_json(path, meta, fsync=True)  # the run's final status survives a power loss
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        text = json.dumps(meta, indent=2, default=to_jsonable, allow_nan=True).encode()
        fd = os.open(path, os.O_WRONLY)
        try:
            st = os.fstat(fd)
            if len(text) > max(st.st_size, st.st_blocks * 512):
                raise
            os.pwrite(fd, text.ljust(st.st_size), 0)
            os.fsync(fd)
        finally:
            os.close(fd)


def _merge(into: Prepared, p: Prepared) -> None:
    into.scalars.update(p.scalars)
    for key, t in p.tensors.items():
        old = into.tensors.get(key)
        if old is not None:
            into.nbytes -= old.array.nbytes
        into.tensors[key] = t
    into.nbytes += p.nbytes


def _hold_lock(path: Path) -> int:
    """Hold an exclusive lock for the life of the run: a reader that can take it knows we died."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


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


# -- the module-level run stack -------------------------------------------------------------

_runs: list[Run] = []
_runs_lock = threading.Lock()
_uncaught: list[BaseException] = []
_exit_code: list[int] = []  # what the main thread last passed to sys.exit()


def init(project: str | None = None, *, name: str | None = None, id: str | None = None,
         config: Mapping[str, Any] | argparse.Namespace | None = None,
         tags: list[str] | tuple[str, ...] | None = None, notes: str | None = None,
         dir: str | os.PathLike[str] | None = None, mode: str | None = None,
         **settings: Any) -> Run:
    """Start a run and make it the target of :func:`gradexp.log`.

    Returns in milliseconds and needs no network. ``mode`` is ``"offline"`` (the
    default) or ``"disabled"`` (every call a no-op). The run folder is
    ``<dir>/<project>/<id>``, ``dir`` defaulting to ``$GRADEXP_DIR`` or ``./gradexp-runs``.
    Further keyword arguments are :class:`gradexp.Settings` fields.
    """
    s = resolve({"dir": dir, "mode": mode, **settings})
    run = Run(project, name=name, id=id, config=config, tags=tags, notes=notes, settings=s)
    with _runs_lock:
        _runs.append(run)
    _install_hooks()
    return run


def current() -> Run:
    """The most recent unfinished run of this process."""
    runs = _runs
    if runs:
        run = runs[-1]
        if run._pid == _pid:
            return run
    with _runs_lock:
        for run in reversed(_runs):
            if run._pid == _pid:
                return run
        if _runs:  # a forked child: the parent's run answers, and its log() warns and ignores
            return _runs[-1]
    raise UsageError("no active run: call gradexp.init() before gradexp.log()")


def _forget(run: Run) -> None:
    with _runs_lock:
        if run in _runs:
            _runs.remove(run)
        last = not _runs
    if last:
        _remove_hooks()


def _finish_all() -> None:
    code = 1 if _uncaught else (_exit_code[-1] if _exit_code else 0)
    for run in list(reversed(_runs)):
        try:
            run.finish(exit_code=code)
        except Exception as e:
            warnings.warn(f"gradexp: could not finish run {run.id} at exit: {e!r}", GradexpWarning, stacklevel=1)


def _status_code(status: object) -> int:
    """The exit status Python makes of ``SystemExit(status)``: None is 0, an int itself,
    anything else (a message, printed) 1."""
    if status is None:
        return 0
    return int(status) if isinstance(status, int) else 1


EXIT_CODE_MAX = (1 << 31) - 1


def exit_code_for_record(code: int) -> int:
    """``code`` within 32 bits, as run.json and every server database keep it: an exit code
    beyond that (which no process can exit with) is clamped, keeping its sign."""
    return max(-EXIT_CODE_MAX - 1, min(int(code), EXIT_CODE_MAX))


_hooks: list[tuple[Any, Any, Any, Any]] = []
"""While runs are active: (our excepthook, the one before it, our sys.exit, the one before it)."""
_atexit_registered = False


def _install_hooks() -> None:
    """Hook sys.excepthook (an uncaught exception marks runs failed and is recorded with its
    traceback) and sys.exit (atexit cannot see the exit code), in a chain: the hooks before
    them still run. :func:`_remove_hooks` puts them back when the last run finishes."""
    global _atexit_registered
    if not _atexit_registered:
        _atexit_registered = True
        atexit.register(_finish_all)
    if _hooks:
        return
    _uncaught.clear()
    _exit_code.clear()
    previous = sys.excepthook

    def hook(tp: Any, value: BaseException, tb: Any) -> None:
        _uncaught.append(value)  # an uncaught exception marks forgotten runs failed at exit
        previous(tp, value, tb)

    # A bare `raise SystemExit(n)` outside a `with` block stays unseen: such a run ends
    # "finished".
    exit_ = sys.exit

    def exit_hook(status: object = None) -> NoReturn:
        if threading.current_thread() is threading.main_thread():
            _exit_code[:] = [_status_code(status)]
        exit_(status)  # type: ignore[arg-type]  # sys.exit takes any object; typeshed lists str, int, None

    sys.excepthook = hook
    sys.exit = exit_hook
    _hooks.append((hook, previous, exit_hook, exit_))


def _remove_hooks() -> None:
    """Put back what sys.excepthook and sys.exit were, unless someone hooked them after us
    (then ours stay in their chain, harmless)."""
    if not _hooks:
        return
    hook, previous, exit_hook, exit_ = _hooks.pop()
    if sys.excepthook is hook:
        sys.excepthook = previous
    if sys.exit is exit_hook:
        sys.exit = exit_


def describe_exception(exc: BaseException) -> dict[str, str]:
    """What run.json keeps of the error that ended a run: its type, message and traceback."""
    import traceback

    tp = type(exc)
    name = tp.__qualname__ if tp.__module__ in ("builtins", "__main__") else f"{tp.__module__}.{tp.__qualname__}"
    return {"type": name, "message": str(exc),
            "traceback": "".join(traceback.format_exception(tp, exc, exc.__traceback__))}


def program() -> dict[str, Any]:
    """The entry point: the script's path or the ``-m`` module, the working folder, the interpreter."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    spec = getattr(main, "__spec__", None)
    return {"path": os.path.abspath(path) if path else None, "module": spec.name if spec is not None else None,
            "cwd": os.getcwd(), "executable": sys.executable}


_pid = os.getpid()  # os.getpid() is a system call; log() compares against this instead


def _after_fork_in_child() -> None:
    global _runs_lock, _pid
    _pid = os.getpid()
    _runs_lock = threading.Lock()
    for run in _runs:
        run._lock = threading.Lock()  # a parent thread may have held it at fork time


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
