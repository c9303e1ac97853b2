"""Run: config, summary, step bookkeeping and lifecycle; the module-level run stack."""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import errno
import fnmatch
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
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

from gradexp._version import __version__
from gradexp.core.errors import (
    GradexpWarning,
    InvalidTypeError,
    InvalidValueError,
    KeyNotFoundError,
    RunNotFoundError,
    UsageError,
)
from gradexp.core.layout import (
    CONFIG_JSON,
    HISTORY,
    LOCK,
    PARTS,
    RUN_JSON,
    SUMMARY_JSON,
    TENSORS,
    check_name,
    to_jsonable,
    write_json,
)
from gradexp.core.limits import INT_MAX, exit_code_for_record
from gradexp.core.settings import Settings, resolve
from gradexp.write.values import NUMBER, TENSOR, TEXT, Keys, Prepared, prepare

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

DEFAULT_PROJECT = "uncategorized"
_ID_ALPHABET = string.ascii_lowercase + string.digits


def new_run_id() -> str:
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(8))


class Config(MutableMapping):
    """The run's configuration; every change is saved to ``config.json`` at once (and, online,
    sent to the server). Keys read and set as items or attributes: ``config.lr = 0.1``."""

    def __init__(self, path: Path | None, data: Mapping[str, Any]) -> None:
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_data", dict(data))
        self._check(self._data)
        self._save()

    @staticmethod
    def _check(data: Mapping[str, Any]) -> None:
        for key, value in data.items():
            if not isinstance(key, str):
                raise InvalidTypeError(f"config keys must be str; got {key!r}")
            try:
                json.dumps(value, default=to_jsonable)
            except (TypeError, ValueError) as e:
                raise InvalidTypeError(f"config key {key!r}: value cannot be saved as JSON ({e})") from None

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

    def update(self, other: Any = (), /, allow_val_change: bool = True, **kw: Any) -> None:
        """Merge and save once (not once per key). Values may always change
        (``allow_val_change`` is accepted for wandb scripts)."""
        if isinstance(other, argparse.Namespace):
            other = vars(other)
        new = dict(other, **kw)
        self._check(new)
        self._data.update(new)
        self._save()

    def setdefaults(self, other: Mapping[str, Any]) -> None:
        """Set the keys of ``other`` that are not set yet (wandb's ``config.setdefaults``)."""
        self.update({k: v for k, v in other.items() if k not in self._data})

    def as_dict(self) -> dict[str, Any]:
        return dict(self._data)

    def __setattr__(self, key: str, value: Any) -> None:
        if key.startswith("_"):
            raise AttributeError(f"config keys starting with '_' are not settable as attributes "
                                 f"({key!r}); use config[{key!r}] = ...")
        self.update({key: value})

    def __delattr__(self, key: str) -> None:
        try:
            del self[key]
        except KeyError:
            raise AttributeError(key) from None

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


SUMMARIES = ("min", "max", "mean", "last", "first", "none")
"""What ``define_metric(summary=...)`` keeps of a metric (several: ``"min,max"``)."""
_NUMBER = (int, float)


class Summary(MutableMapping):
    """Last value of each logged scalar (or what :meth:`Run.define_metric` asks for: the
    ``{"min": ...}`` of a metric), unless assigned; saved at each flush and at finish.
    Keys read and set as items or attributes: ``summary.best = 0.1``."""

    def __init__(self, data: Mapping[str, Any] | None = None) -> None:
        object.__setattr__(self, "_data", dict(data or {}))
        # Changed since the last snapshot; a list, so log() sets it without a __setattr__ call.
        object.__setattr__(self, "_dirty", [False])
        object.__setattr__(self, "_rules", [])  # (name or glob, summaries), newest first
        object.__setattr__(self, "_resolved", {})  # key -> summaries (None: the last value)
        object.__setattr__(self, "_means", {})  # key -> (sum, count) of this process
        values: dict[str, Any] = self._data
        dirty, rules, aggregate = self._dirty, self._rules, self._aggregate

        def logged(scalars: Mapping[str, Any]) -> None:
            # log()'s path: a closure, as a class with __getattr__ is slow at every attribute
            dirty[0] = True
            if rules:
                aggregate(scalars)
            else:
                values.update(scalars)

        object.__setattr__(self, "logged", logged)
        """Take a logged row's scalars (``log()`` calls this)."""

    @property
    def dirty(self) -> bool:
        return self._dirty[0]

    def touch(self) -> None:
        """Mark the summary changed: saved at the next flush."""
        self._dirty[0] = True

    def _define(self, name: str, how: tuple[str, ...]) -> None:
        self._rules.insert(0, (name, how))
        self._resolved.clear()

    def _how(self, key: str) -> tuple[str, ...] | None:
        try:
            return self._resolved[key]
        except KeyError:
            how = next((h for pattern, h in self._rules if fnmatch.fnmatchcase(key, pattern)), None)
            self._resolved[key] = how
            return how

    def _aggregate(self, scalars: Mapping[str, Any]) -> None:
        for key, value in scalars.items():
            how = self._how(key)
            if how is None:
                self._data[key] = value
                continue
            if not how or not isinstance(value, _NUMBER) and not hasattr(value, "dtype"):
                if how:  # a string under a numeric summary: its last value
                    self._data[key] = value
                continue
            entry = self._data.get(key)
            if not isinstance(entry, dict):
                entry = self._data[key] = {}
            v = value.item() if hasattr(value, "item") else value
            for agg in how:
                old = entry.get(agg)
                if agg == "last" or old is None and agg != "mean":
                    if agg != "first" or "first" not in entry:
                        entry[agg] = v
                elif agg == "min" and v < old or agg == "max" and v > old:
                    entry[agg] = v
                elif agg == "mean":
                    total, n = self._means.get(key, (0.0, 0))
                    self._means[key] = (total + v, n + 1)
                    entry["mean"] = (total + v) / (n + 1)

    def __getattr__(self, key: str) -> Any:
        try:
            return self.__dict__["_data"][key]
        except KeyError:
            raise AttributeError(f"the summary has no key {key!r}") from None

    def __setattr__(self, key: str, value: Any) -> None:
        if key.startswith("_"):
            raise AttributeError(f"summary keys starting with '_' are not settable as attributes ({key!r})")
        self[key] = value

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self._data[key] = value
        self._dirty[0] = True

    def __delitem__(self, key: str) -> None:
        del self._data[key]
        self._dirty[0] = True

    def __iter__(self) -> Iterator[str]:
        return iter(dict(self._data))

    def __len__(self) -> int:
        return len(self._data)

    def snapshot(self) -> dict[str, Any]:
        self._dirty[0] = False
        return {k: dict(v) if isinstance(v, dict) else v for k, v in self._data.items()}

    def __repr__(self) -> str:
        return f"Summary({self._data!r})"


_RUN_UNSUPPORTED = {
    "log_artifact": "gradexp has no artifacts: log tensors with run.log(), or keep files in run.dir",
    "use_artifact": "gradexp has no artifacts: read another run's tensors with gradexp.Api().run(ref)",
    "link_artifact": "gradexp has no artifacts or registry: refer to runs as 'entity/project/run_id'",
    "log_model": "gradexp has no model registry: log the weights with gradexp.log_model_tensors(model)",
    "use_model": "gradexp has no model registry: read weights back with gradexp.Api().run(ref).tensor(key, step)",
    "save": "gradexp does not upload files: keep them in run.dir; log arrays with run.log()",
    "restore": "gradexp does not store files: read logged values with gradexp.Api().run(ref)",
    "log_code": "gradexp does not save code: run.json records sys.argv",
    "alert": "gradexp sends no alerts: watch the run with gradexp.Api().run(ref).summary",
    "mark_preempting": "a run killed unfinished is marked crashed; continue it with "
                       "gradexp.init(id=..., resume='allow')",
    "sweep_id": "gradexp has no sweeps: put the parameters in init(config=...)",
    "status": "read a run's status with gradexp.Api().run(ref).status",
    "plot_table": "gradexp draws no custom charts: log a gradexp.Table, read it with Api().run(ref).media()",
    "upsert_artifact": "gradexp has no artifacts: log tensors with run.log()",
    "project_name": "use run.project",
}
"""wandb Run attributes gradexp does not have, with the closest gradexp call."""


class Run:
    """One training run. Create with :func:`gradexp.init`."""

    def __init__(self, project: str | None = None, *, name: str | None = None, id: str | None = None,
                 config: Mapping[str, Any] | argparse.Namespace | None = None,
                 tags: Sequence[str] | None = None, notes: str | None = None,
                 group: str | None = None, job_type: str | None = None, entity: str | None = None,
                 resume: str | None = None, settings: Settings) -> None:
        self.settings = settings
        self.project = check_name("project", project or DEFAULT_PROJECT)
        self.id = check_name("run id", id) if id is not None else new_run_id()
        self.entity = check_name("entity", entity) if entity is not None else None
        self.start_time = time.time()
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._meta_lock = threading.Lock()
        self._keys = Keys()
        self._step = 0
        self._max_step = -1
        self._pending: Prepared | None = None
        self._warned: set[str] = set()
        self._finished = False
        self._exception: BaseException | None = None
        """The error that ended the run (an uncaught exception, one leaving a ``with`` block)."""
        self.resumed = False
        # Rows captured outside log() (gradexp.watch): each source hands over what it holds,
        # or None, and log() merges it into the row it records.
        self._row_sources: list[Callable[[Keys], Prepared | None]] = []
        self.summary = Summary()
        self._summary_logged = self.summary.logged
        if isinstance(config, argparse.Namespace):
            config = vars(config)
        if config is not None and not isinstance(config, Mapping):
            raise InvalidTypeError(f"config must be a dict or argparse.Namespace; got {type(config).__name__}")
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
        self._meta: dict[str, Any] = {
            "id": self.id, "name": self.id, "project": self.project, "tags": [],
            "notes": None, "group": group, "job_type": job_type, "status": "running",
            "created_at": self.start_time, "host": socket.gethostname(), "pid": self._pid,
            "python": platform.python_version(), "gradexp": __version__, "format": 1, "argv": sys.argv,
            "program": program(),
        }
        if self.entity is not None:  # gradexp sync uploads an offline run there, not to the login's entity
            self._meta["entity"] = self.entity
        if self.disabled:
            self.dir = None
            self.config = Config(None, config or {})
            self._set_meta(name=name, tags=tags, notes=notes)
            self._writer = None
            return
        self.dir = (settings.dir / self.project / self.id).absolute()
        exists = (self.dir / RUN_JSON).is_file()
        if exists and resume in (None, "never"):
            raise FileExistsError(f"run folder {self.dir} exists already; pick another run id, or "
                                  "continue the run with init(id=..., resume='allow')")
        if not exists and resume == "must":
            raise RunNotFoundError(f"resume='must': there is no run {self.project}/{self.id} under "
                                   f"{settings.dir} to continue")
        first_seq: dict[str, int] | None = None
        if exists:
            first_seq = self._resume(config or {})
        else:
            try:
                (self.dir / PARTS).mkdir(parents=True, exist_ok=False)
            except FileExistsError:
                raise FileExistsError(f"run folder {self.dir} exists already; pick another run id") from None
            self._lock_fd = _hold_lock(self.dir / LOCK)
            self.config = Config(self.dir / CONFIG_JSON, config or {})
        self._set_meta(name=name, tags=tags, notes=notes, group=group, job_type=job_type)
        if settings.mode == "online" or settings.console or settings.system_metrics or settings.code:
            self._start_sender()
        from gradexp.write.writer import Writer

        # The sender's start-up waits until the writer has its imports: both at once, on a
        # machine with few cores, made init() wait for the CPU.
        release = self._sender.release if self._sender is not None else None
        try:
            self._writer = Writer(self.dir / PARTS, settings, self.start_time, self._save_summary,
                                  first_seq=first_seq, on_ready=release)
        except BaseException:
            if release is not None:
                release()
            raise

    def _start_sender(self) -> None:
        """A separate process: uploads never make the training loop wait, it records the console
        and system metrics and collects the code's provenance off this process, and it finishes
        the run (marking it crashed, with the signal) if this process dies.

        Spawned here, not by a thread: output written right after ``init()`` must reach the
        terminal even if the process dies a moment later, so the sender holds the console
        pipe before ``init()`` returns. ``posix_spawn`` makes that cheap (no ``subprocess``
        import, no wait for the child to run); before the writer starts, whose thread's
        pyarrow import would compete for the GIL."""
        from gradexp.write.sender_process import Sender
        from gradexp.write.signals import SignalWatch

        s = self.settings
        assert self.dir is not None
        capture = None
        if s.console:
            from gradexp.write.console import Capture

            capture = Capture()
            capture.start()
        signals = SignalWatch()
        signals.start()
        try:
            self._sender = Sender(self.dir, s, start_time=self.start_time, capture=capture, signals=signals,
                                  program=self._meta["program"] if s.code else None, entity=self.entity)
        except BaseException:
            signals.stop()
            if capture is not None:
                capture.stop()
            raise

    def _resume(self, config: Mapping[str, Any]) -> dict[str, int]:
        """Continue the run in :attr:`dir`: take its lock, seal what a crash left open, and
        carry on after its last step, its parts, config, summary and metadata."""
        from gradexp.core import format as _format
        from gradexp.core.layout import read_json

        assert self.dir is not None
        try:
            self._lock_fd = _hold_lock(self.dir / LOCK)
        except BlockingIOError:
            raise UsageError(f"run {self.project}/{self.id} is still running in another process "
                             f"({self.dir}); it can be resumed once that has finished or died") from None
        for part in _format.list_parts(self.dir / PARTS):
            if part.name.endswith(_format.OPEN_SUFFIX):
                _format.recover_part(part)
        seqs = {HISTORY: 0, TENSORS: 0}
        last = -1
        for part in _format.list_parts(self.dir / PARTS):
            stream, _, seq = part.name[:-len(_format.PART_SUFFIX)].rpartition("-")
            if stream in seqs:
                seqs[stream] = max(seqs[stream], int(seq) + 1)
            for info in _format.scan_part(part).frames:
                last = max(last, info.step_max)
                if info.kind == _format.KIND_TENSOR:
                    self._keys.add({info.key: TENSOR})
        old = read_json(self.dir / RUN_JSON, {})
        summary = read_json(self.dir / SUMMARY_JSON, {})
        # Scalars' kinds from their last values: a key keeps its kind across a resume.
        self._keys.add({k: NUMBER if isinstance(v, (int, float)) else TEXT
                        for k, v in summary.items() if isinstance(v, (int, float, str)) and k not in self._keys.kinds})
        self.summary = Summary(summary)
        for name, entry in old.get("metrics", {}).items():  # define_metric's rules carry over
            if isinstance(entry, dict) and isinstance(entry.get("summary"), str):
                self.summary._define(name, _summaries(name, entry["summary"]))
        self._summary_logged = self.summary.logged
        self.config = Config(self.dir / CONFIG_JSON, {**read_json(self.dir / CONFIG_JSON, {}), **config})
        for k in ("finished_at", "exit_code", "runtime", "error"):
            old.pop(k, None)
        self.start_time = old.get("created_at", self.start_time)
        self._meta.update({k: v for k, v in old.items() if k not in ("status", "host", "pid", "argv", "python")})
        self._meta["resumed_at"] = [*old.get("resumed_at", []), time.time()]
        self._step = last + 1
        self._max_step = last
        self.resumed = True
        return seqs

    # -- metadata (run.json) -------------------------------------------------------------------

    def _set_meta(self, **fields: Any) -> None:
        """Set and save run.json fields given (None: keep)."""
        new = {k: v for k, v in fields.items() if v is not None}
        if "tags" in new:
            tags = new["tags"]
            if isinstance(tags, str) or not isinstance(tags, (list, tuple, set, frozenset)):
                raise InvalidTypeError(f"tags must be a list of str; got {type(tags).__name__}")
            new["tags"] = [str(t) for t in tags]
        for k in ("name", "notes", "group", "job_type"):
            if k in new and not isinstance(new[k], str):
                raise InvalidTypeError(f"run {k} must be a str; got {type(new[k]).__name__}")
        if self._finished:
            raise UsageError(f"run {self.id} is finished: its metadata can no longer change (resume it "
                             "with gradexp.init(id=..., resume='allow'))")
        with self._meta_lock:
            self._meta.update(new)
            if self.dir is not None:
                write_json(self.dir / RUN_JSON, self._meta)

    @property
    def name(self) -> str:
        """The run's display name (default: its id); setting it saves it."""
        return self._meta["name"]

    @name.setter
    def name(self, value: str) -> None:
        self._set_meta(name=value)

    @property
    def tags(self) -> tuple[str, ...]:
        """The run's tags; assign a new sequence to change them (``run.tags += ("best",)``)."""
        return tuple(self._meta["tags"])

    @tags.setter
    def tags(self, value: Sequence[str]) -> None:
        self._set_meta(tags=value)

    @property
    def notes(self) -> str | None:
        return self._meta["notes"]

    @notes.setter
    def notes(self, value: str) -> None:
        self._set_meta(notes=value)

    @property
    def group(self) -> str | None:
        """The group given to ``init(group=...)`` (runs of one experiment)."""
        return self._meta.get("group")

    @property
    def job_type(self) -> str | None:
        return self._meta.get("job_type")

    @property
    def path(self) -> str:
        """``entity/project/id`` (``project/id`` while the entity is unknown)."""
        entity = self._entity()
        return f"{entity}/{self.project}/{self.id}" if entity else f"{self.project}/{self.id}"

    @property
    def offline(self) -> bool:
        return self._sender is None

    @property
    def url(self) -> str | None:
        """The run's page on the server (``<host>/<entity>/<project>/<id>``); None offline."""
        if self._sender is None:
            return None
        entity = self._entity()
        if entity is None:
            return None
        return f"{self.settings.host.rstrip('/')}/{entity}/{self.project}/{self.id}"

    def get_url(self) -> str | None:
        return self.url

    def _entity(self) -> str | None:
        """The entity given to init(), else the one the sender registered the run under."""
        if self.entity is None and self._sender is not None:
            self.entity = self._sender.entity(timeout=30.0)
        return self.entity

    def define_metric(self, name: str, step_metric: str | None = None, *, summary: str | None = None,
                      goal: str | None = None, hidden: bool | None = None, step_sync: bool | None = None,
                      overwrite: bool | None = None) -> None:
        """Say what the summary keeps of ``name`` (a key, or a glob such as ``"val/*"``):
        ``summary="min"``, ``"max"``, ``"mean"``, ``"last"``, ``"first"``, several joined by
        commas, or ``"none"`` (the summary leaves it out). The summary then holds
        ``{"min": ..., ...}`` under the key, as wandb's does. ``step_metric`` (the key to
        chart it against) and ``goal`` are saved in ``run.json`` (``metrics``) for readers.
        ``hidden``, ``step_sync`` and ``overwrite`` are accepted; gradexp has nothing to hide
        and does not add the step metric to rows.
        """
        if not isinstance(name, str) or not name:
            raise InvalidTypeError(f"define_metric name must be a non-empty str; got {name!r}")
        if summary is not None:
            self.summary._define(name, _summaries(name, summary))
        if goal is not None and goal not in ("minimize", "maximize"):
            raise InvalidValueError(f"define_metric({name!r}, goal={goal!r}): goal must be 'minimize' or 'maximize'")
        entry = {k: v for k, v in (("step_metric", step_metric), ("summary", summary), ("goal", goal))
                 if v is not None}
        metrics = dict(self._meta.get("metrics", {}))
        metrics[name] = entry
        self._set_meta(metrics=metrics)



    # -- logging ---------------------------------------------------------------------------

    @property
    def step(self) -> int:
        """The step the next ``log()`` without ``step=`` goes to."""
        return self._step

    def log(self, data: Mapping[str, Any] | Any, step: int | None = None, commit: bool = True, *,
            name: str | None = None, dimension_labels: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
            ) -> None:
        """Record ``data`` at ``step`` (default: the current step).

        Nested dicts flatten to ``a/b`` keys. ``commit=False`` keeps the row open so
        later calls at the same step merge into it. A step lower than the current one
        is recorded with one warning; readers return rows in step order and keep the
        last write of a (step, key).

        As in the original gradexp package, ``log(tensor, name="w", dimension_labels=["in",
        "out"])`` is ``log({"w": tensor})`` with the tensor's dimensions named (readers:
        ``dims(key)``); with a dict, ``dimension_labels`` maps keys to their labels.
        """
        if name is not None or dimension_labels is not None:
            data = _named(data, name, dimension_labels)
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
            self._summary_logged(p.scalars)
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
        if self._sender is not None:  # its last console lines and system sample, while the writer flushes
            self._sender.stop_recording()
        self._writer.flush(fsync=True, close=True)  # never raises: a failure is kept in .error
        if self._writer.error is not None:  # warned about when it happened
            errors.append(f"the background writer failed: {self._writer.error!r}")
        warned = len(errors)
        try:
            self.summary.touch()
            self._save_summary()
        except Exception as e:  # a full disk, or a summary value assigned that JSON cannot hold
            errors.append(f"could not save {SUMMARY_JSON}: {e!r}")
        if self._sender is not None:
            self._sender.wait_recorded(timeout=min(self.settings.finish_timeout, 30.0))
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


def _named(data: Any, name: str | None,
           labels: Sequence[str] | Mapping[str, Sequence[str]] | None) -> dict[str, Any]:
    """The dict ``log(value, name=..., dimension_labels=...)`` stands for."""
    from gradexp.core.media import Labelled

    if name is not None:
        if isinstance(data, Mapping):
            raise InvalidTypeError("log(..., name=...) names one value; pass the value, not a dict")
        if isinstance(labels, Mapping):
            raise InvalidTypeError(f"log(value, name={name!r}): dimension_labels must be a list of labels")
        return {name: data if labels is None else Labelled(data, labels)}
    if not isinstance(data, Mapping):
        raise InvalidTypeError(f"log() takes a dict of values, or one value with name=...; got {type(data).__name__}")
    if not isinstance(labels, Mapping):
        raise InvalidTypeError("log(dict, dimension_labels=...): give a dict of key -> labels")
    missing = [k for k in labels if k not in data]
    if missing:
        raise KeyNotFoundError(f"dimension_labels names {missing[0]!r}, which this log() call does not hold")
    return {k: Labelled(v, labels[k]) if k in labels else v for k, v in data.items()}


class _Unsupported:
    """A wandb Run attribute gradexp does not have: reading it raises AttributeError naming
    the closest gradexp call. (A descriptor, not ``Run.__getattr__``: a class with
    ``__getattr__`` pays for it at every attribute access, log()'s included.)"""

    def __init__(self, closest: str) -> None:
        self.closest = closest

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: object, owner: type | None = None) -> Any:
        raise AttributeError(f"gradexp does not support wandb's run.{self.name}; {self.closest}")


for _name, _closest in _RUN_UNSUPPORTED.items():
    _attr = _Unsupported(_closest)
    _attr.__set_name__(Run, _name)
    setattr(Run, _name, _attr)


def _check_step(step: Any) -> int:
    import numpy as np

    if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
        raise InvalidTypeError(f"step must be an int; got {type(step).__name__} {step!r}")
    if not 0 <= step <= INT_MAX:
        raise InvalidValueError(f"step must be >= 0 and < 2**63 (steps are int64); got {step}")
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
    """Merge ``p`` into ``into``, ``p``'s keys winning. A bundle holding a key that the other
    side holds too is unbundled first (rare: a key logged both ways in one row)."""
    if into.bundles and into.overlaps(p):
        into.unbundle()
    if p.bundles:
        if p.overlaps(into):
            p.unbundle()
        else:
            into.bundles += p.bundles
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


# -- the module-level run stack -------------------------------------------------------------

_runs: list[Run] = []
_runs_lock = threading.Lock()
_uncaught: list[BaseException] = []
_exit_code: list[int] = []  # what the main thread last passed to sys.exit()


_INIT_UNSUPPORTED = {
    "save_code": "gradexp does not save code; run.json records sys.argv",
    "sync_tensorboard": "gradexp does not read TensorBoard logs; call gradexp.log() where you write them",
    "tensorboard": "gradexp does not read TensorBoard logs; call gradexp.log() where you write them",
    "monitor_gym": "gradexp does not record gym videos; log frames with gradexp.Image",
    "anonymous": "gradexp has no anonymous mode; runs are offline until `gradexp login`",
    "magic": "gradexp has no magic mode; call gradexp.watch(model, optimizer)",
    "fork_from": "gradexp cannot fork runs; continue one with init(id=..., resume='allow')",
    "resume_from": "gradexp cannot rewind runs; continue one with init(id=..., resume='allow')",
    "config_exclude_keys": "filter the dict you pass as init(config=...)",
    "config_include_keys": "filter the dict you pass as init(config=...)",
    "force": "gradexp runs offline without a login: use mode='online' to need a server",
}
"""wandb ``init()`` arguments gradexp does not take, with the closest gradexp call."""
RESUME = ("allow", "must", "never")
REINIT = ("default", "create_new", "finish_previous", "return_previous")


def init(project: str | None = None, *, entity: str | None = None, name: str | None = None,
         config: Mapping[str, Any] | argparse.Namespace | None = None,
         tags: Sequence[str] | None = None, notes: str | None = None, group: str | None = None,
         job_type: str | None = None, id: str | None = None, resume: bool | str | None = None,
         dir: str | os.PathLike[str] | None = None, mode: str | None = None,
         reinit: bool | str | None = None, project_name: str | None = None, run_name: str | None = None,
         precision: str | None = None, allow_val_change: bool | None = None,
         settings: Settings | None = None, **kwargs: Any) -> Run:
    """Start a run and make it the target of :func:`gradexp.log`.

    Returns in milliseconds and needs no network. ``mode`` is ``"offline"`` (the
    default), ``"online"`` (the default once a server is configured) or ``"disabled"``
    (every call a no-op). The run folder is ``<dir>/<project>/<id>``, ``dir`` defaulting to
    ``$GRADEXP_DIR`` or ``./gradexp-runs``.

    ``resume``: ``"allow"`` (or True) continues the run ``id`` if it exists, ``"must"``
    requires it to, ``"never"`` (and None) refuses an existing id. A continued run appends
    to its folder (and its run on the server), its steps going on after its last one.
    ``reinit``: None and ``"create_new"`` start another run beside any active one (the
    newest gets :func:`gradexp.log`); True and ``"finish_previous"`` finish active runs
    first; False and ``"return_previous"`` return the active run if there is one.
    ``project_name``, ``run_name`` and ``precision`` are the original gradexp package's
    names (``precision``: see :attr:`Settings.precision`). Further keyword arguments, or a
    ``settings=gradexp.Settings(...)``, are :class:`gradexp.Settings` fields.
    """
    for arg, closest in _INIT_UNSUPPORTED.items():
        if kwargs.get(arg) not in (None, False):
            raise InvalidTypeError(f"gradexp.init() does not support wandb's {arg}=; {closest}")
        kwargs.pop(arg, None)
    project = _alias("project", project, "project_name", project_name)
    name = _alias("name", name, "run_name", run_name)
    if resume is True:
        resume = "allow"
    elif resume is False:
        resume = None
    if resume is not None and resume not in RESUME:
        raise InvalidValueError(f"resume must be one of {', '.join(RESUME)} (or True/False); got {resume!r}"
                                + ("; gradexp continues a run only by its id: init(id=..., resume='allow')"
                                   if resume == "auto" else ""))
    if resume == "must" and id is None:
        raise InvalidValueError("resume='must' needs the id of the run to continue: init(id=..., resume='must')")
    if reinit is True:
        reinit = "finish_previous"
    elif reinit is False:
        reinit = "return_previous"
    if reinit is not None and reinit not in REINIT:
        raise InvalidValueError(f"reinit must be one of {', '.join(REINIT)} (or True/False); got {reinit!r}")
    if reinit == "return_previous":
        try:
            return current()
        except UsageError:
            pass
    elif reinit == "finish_previous":
        for old in [r for r in _runs if r._pid == _pid]:
            old.finish()
    overrides: dict[str, Any] = {}
    if settings is not None:
        if not isinstance(settings, Settings):
            raise InvalidTypeError(f"settings= must be a gradexp.Settings; got {type(settings).__name__} "
                                   "(pass wandb settings as keyword arguments of init())")
        overrides = {f.name: getattr(settings, f.name) for f in dataclasses.fields(Settings)
                     if getattr(settings, f.name) != f.default}
    given = {"dir": dir, "mode": mode, "precision": precision, **kwargs}
    s = resolve({**overrides, **{k: v for k, v in given.items() if v is not None}})
    run = Run(project, name=name, id=id, config=config, tags=tags, notes=notes, group=group,
              job_type=job_type, entity=entity, resume=resume, settings=s)
    with _runs_lock:
        _runs.append(run)
    _install_hooks()
    return run


def _alias(name: str, value: Any, old: str, old_value: Any) -> Any:
    if old_value is None:
        return value
    if value is not None and value != old_value:
        raise InvalidValueError(f"init() got {name}={value!r} and {old}={old_value!r}; give one of them")
    return old_value


def _summaries(name: str, summary: str) -> tuple[str, ...]:
    """``define_metric``'s ``summary=`` as the aggregations it names (empty for ``"none"``)."""
    parts = tuple(p.strip() for p in summary.split(",") if p.strip())
    bad = [p for p in parts if p not in SUMMARIES]
    if bad or not parts or ("none" in parts and len(parts) > 1):
        raise InvalidValueError(f"define_metric({name!r}, summary={summary!r}): summary must be "
                                f"one or more of {', '.join(SUMMARIES[:-1])} joined by ',', or 'none'")
    return () if parts == ("none",) else parts


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
