"""gradexp: an experiment tracker that keeps the tensors of a training run.

    run = gradexp.init("mnist", config={"lr": 1e-3})
    gradexp.log({"loss": loss, "grad": w.grad})
    gradexp.finish()

    gradexp.Api().run(run.dir).tensor("grad", step=500)

wandb scripts run under ``import gradexp as wandb``: ``gradexp.run`` (None before
``init()``), ``gradexp.config`` and ``gradexp.summary`` (the current run's), ``define_metric``,
``watch``, ``login``, ``Histogram``, ``Image``, ``Table``. What gradexp does not have raises an
``AttributeError`` naming the closest gradexp call.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from gradexp._version import __version__
from gradexp.core.errors import (
    ApiError,
    CorruptPartError,
    CorruptPartWarning,
    GradexpError,
    GradexpWarning,
    InvalidTypeError,
    InvalidValueError,
    KeyNotFoundError,
    LoginError,
    RunNotFoundError,
    UsageError,
)
from gradexp.core.media import Histogram, Image, Table
from gradexp.core.settings import Settings
from gradexp.write.run import Run, current, init

__all__ = [
    "Api",
    "ApiError",
    "CorruptPartError",
    "CorruptPartWarning",
    "GradexpError",
    "GradexpWarning",
    "Histogram",
    "Image",
    "InvalidTypeError",
    "InvalidValueError",
    "KeyNotFoundError",
    "LoginError",
    "RemoteRun",
    "Run",
    "RunNotFoundError",
    "Settings",
    "StoredRun",
    "Table",
    "UsageError",
    "__version__",
    "config",
    "define_metric",
    "finish",
    "init",
    "log",
    "log_gradient_stats",
    "log_model_tensors",
    "login",
    "run",
    "summary",
    "unwatch",
    "watch",
]


def log(data: Mapping[str, Any] | Any, step: int | None = None, commit: bool = True, *,
        name: str | None = None, dimension_labels: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
        ) -> None:
    """Log ``data`` to the most recent run (see :meth:`Run.log`); ``log(tensor, name=...,
    dimension_labels=...)`` as in the original gradexp package."""
    if name is None and dimension_labels is None:
        current().log(data, step, commit)
    else:
        current().log(data, step, commit, name=name, dimension_labels=dimension_labels)


def finish(exit_code: int = 0, quiet: bool | None = None) -> None:
    """Finish the most recent run (see :meth:`Run.finish`); with no run active, nothing to do
    (as ``wandb.finish()``: scripts call it in cleanup paths). ``quiet`` is accepted for wandb
    scripts (gradexp prints nothing at finish but upload progress and problems)."""
    try:
        run = current()
    except UsageError:
        return
    run.finish(exit_code)


def define_metric(name: str, step_metric: str | None = None, *, summary: str | None = None,
                  goal: str | None = None, hidden: bool | None = None, step_sync: bool | None = None,
                  overwrite: bool | None = None) -> None:
    """What the current run's summary keeps of ``name`` (see :meth:`Run.define_metric`)."""
    current().define_metric(name, step_metric, summary=summary, goal=goal, hidden=hidden,
                            step_sync=step_sync, overwrite=overwrite)


def login(key: str | None = None, host: str | None = None, *, relogin: bool = False,
          timeout: float = 300.0, anonymous: str | None = None) -> bool:
    """Store an API key for ``host`` (checked with the server), as ``gradexp login`` does; runs
    started afterwards are online. Without ``key`` a stored key is kept, else the browser
    sign-in runs. ``anonymous`` is accepted as ``"never"`` only (gradexp has no anonymous mode)."""
    if anonymous not in (None, "never"):
        raise InvalidValueError(f"gradexp has no anonymous mode (anonymous={anonymous!r}); create a "
                                "user on the server and pass its key: gradexp.login(key=...)")
    from gradexp.sync.login import login as _login

    return _login(key=key, host=host, relogin=relogin, timeout=timeout)


class _Current:
    """``gradexp.config`` / ``gradexp.summary``: that of the current run, whichever it is."""

    __slots__ = ("_what",)

    def __init__(self, what: str) -> None:
        object.__setattr__(self, "_what", what)

    def _target(self, use: str) -> Any:
        try:
            run = current()
        except UsageError:
            raise UsageError(f"call gradexp.init() before gradexp.{self._what}{use}") from None
        return getattr(run, self._what)

    def __getattr__(self, key: str) -> Any:
        return getattr(self._target(f".{key}"), key)

    def __setattr__(self, key: str, value: Any) -> None:
        setattr(self._target(f".{key}"), key, value)

    def __delattr__(self, key: str) -> None:
        delattr(self._target(f".{key}"), key)

    def __getitem__(self, key: str) -> Any:
        return self._target(f"[{key!r}]")[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self._target(f"[{key!r}]")[key] = value

    def __delitem__(self, key: str) -> None:
        del self._target(f"[{key!r}]")[key]

    def __contains__(self, key: object) -> bool:
        return key in self._target(" (in)")

    def __iter__(self) -> Iterator[str]:
        return iter(self._target(" (iteration)"))

    def __len__(self) -> int:
        return len(self._target(" (len)"))

    def __eq__(self, other: object) -> bool:
        return dict(self._target(" (==)")) == other

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        try:
            return repr(self._target(""))
        except UsageError:
            return f"<gradexp.{self._what}: no run yet (call gradexp.init())>"


config: Any = _Current("config")
"""The current run's config (``gradexp.config.lr``); UsageError before :func:`init`."""
summary: Any = _Current("summary")
"""The current run's summary; UsageError before :func:`init`."""

_UNSUPPORTED = {
    "Artifact": "gradexp has no artifacts: log tensors with gradexp.log(), read them with gradexp.Api()",
    "log_artifact": "gradexp has no artifacts: log tensors with gradexp.log()",
    "use_artifact": "gradexp has no artifacts: read another run's tensors with gradexp.Api().run(ref)",
    "log_model": "gradexp has no model registry: log the weights with gradexp.log_model_tensors(model)",
    "use_model": "gradexp has no model registry: read weights with gradexp.Api().run(ref).tensor(key, step)",
    "link_model": "gradexp has no model registry: refer to runs as 'entity/project/run_id'",
    "save": "gradexp does not upload files: keep them in run.dir; log arrays with gradexp.log()",
    "restore": "gradexp does not store files: read logged values with gradexp.Api().run(ref)",
    "alert": "gradexp sends no alerts: read the run's summary with gradexp.Api().run(ref).summary",
    "AlertLevel": "gradexp sends no alerts",
    "Video": "gradexp has no video type: log the frames as a uint8 array, or each as a gradexp.Image",
    "Audio": "gradexp has no audio type: log the samples as an array with gradexp.log()",
    "Object3D": "gradexp has no 3D type: log the points as an array with gradexp.log()",
    "Molecule": "gradexp has no molecule type: log the data as an array or a gradexp.Table",
    "Html": "gradexp has no HTML type: log text as a string with gradexp.log()",
    "Plotly": "gradexp draws no custom charts: log the data as a gradexp.Table",
    "Graph": "gradexp has no graph type: log the edges as a gradexp.Table",
    "plot": "gradexp draws no custom charts: log the data as a gradexp.Table",
    "plot_table": "gradexp draws no custom charts: log the data as a gradexp.Table",
    "sweep": "gradexp has no sweeps: start one run per setting with gradexp.init(config=...)",
    "agent": "gradexp has no sweeps: start one run per setting with gradexp.init(config=...)",
    "controller": "gradexp has no sweeps: start one run per setting with gradexp.init(config=...)",
    "mark_preempting": "a run killed unfinished is marked crashed; continue it with "
                       "gradexp.init(id=..., resume='allow')",
    "setup": "gradexp needs no setup: call gradexp.init()",
    "teardown": "gradexp needs no teardown: call gradexp.finish()",
    "require": "gradexp has no optional features to require",
    "log_code": "gradexp does not save code: run.json records sys.argv",
    "Error": "catch gradexp.GradexpError",
    "errors": "gradexp's exceptions are in gradexp (gradexp.GradexpError and its subclasses)",
    "apis": "read runs with gradexp.Api()",
    "sklearn": "gradexp has no scikit-learn plots: log arrays or a gradexp.Table",
    "keras": "gradexp has no Keras callback: call gradexp.log() in a keras.callbacks.LambdaCallback",
    "tensorboard": "gradexp does not read TensorBoard logs: call gradexp.log() where you write them",
    "integration": "gradexp's integrations are gradexp.integrations.lightning and .transformers",
    "BoundingBoxes2D": "gradexp has no box overlays: log the boxes as an array or a gradexp.Table",
    "ImageMask": "gradexp has no mask overlays: log the mask as its own gradexp.Image",
    "Classes": "gradexp has no class sets: put the class names in init(config=...)",
    "termlog": "print to stderr",
    "termwarn": "use warnings.warn",
    "termerror": "print to stderr",
}
"""wandb module attributes gradexp does not have, with the closest gradexp call."""


def __getattr__(name: str) -> Any:
    if name == "run":  # wandb.run: the current run, None before init() and after finish()
        try:
            return current()
        except UsageError:
            return None
    # The read side pulls in pyarrow; keep it out of `import gradexp` until it is used.
    if name in ("Api", "StoredRun"):
        from gradexp import api

        return getattr(api, name)
    if name in ("watch", "unwatch", "log_gradient_stats", "log_model_tensors"):  # imports torch: only when used
        from gradexp.integrations import pytorch

        return getattr(pytorch, name)
    if name == "RemoteRun":
        from gradexp.read.remote import RemoteRun

        return RemoteRun
    closest = _UNSUPPORTED.get(name)
    if closest is not None:
        raise AttributeError(f"gradexp does not support wandb's {name}; {closest}")
    raise AttributeError(f"module 'gradexp' has no attribute {name!r}")
