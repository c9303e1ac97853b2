"""gradexp: an experiment tracker that keeps the tensors of a training run.

    run = gradexp.init("mnist", config={"lr": 1e-3})
    gradexp.log({"loss": loss, "grad": w.grad})
    gradexp.finish()

    gradexp.Api().run(run.dir).tensor("grad", step=500)
"""

from __future__ import annotations

from collections.abc import Mapping
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
    RunNotFoundError,
    UsageError,
)
from gradexp.core.settings import Settings
from gradexp.write.run import Run, current, init

__all__ = [
    "Api",
    "ApiError",
    "CorruptPartError",
    "CorruptPartWarning",
    "GradexpError",
    "GradexpWarning",
    "InvalidTypeError",
    "InvalidValueError",
    "KeyNotFoundError",
    "RemoteRun",
    "Run",
    "RunNotFoundError",
    "Settings",
    "StoredRun",
    "UsageError",
    "__version__",
    "finish",
    "init",
    "log",
    "log_gradient_stats",
    "unwatch",
    "watch",
]


def log(data: Mapping[str, Any], step: int | None = None, commit: bool = True) -> None:
    """Log ``data`` to the most recent run (see :meth:`Run.log`)."""
    current().log(data, step, commit)


def finish(exit_code: int = 0) -> None:
    """Finish the most recent run (see :meth:`Run.finish`)."""
    current().finish(exit_code)


def __getattr__(name: str) -> Any:
    # The read side pulls in pyarrow; keep it out of `import gradexp` until it is used.
    if name in ("Api", "StoredRun"):
        from gradexp import api

        return getattr(api, name)
    if name in ("watch", "unwatch", "log_gradient_stats"):  # imports torch: only when used
        from gradexp.integrations import pytorch

        return getattr(pytorch, name)
    if name == "RemoteRun":
        from gradexp.read.remote import RemoteRun

        return RemoteRun
    raise AttributeError(f"module 'gradexp' has no attribute {name!r}")
