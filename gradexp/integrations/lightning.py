"""Lightning: ``GradexpLogger`` records a Trainer's metrics and hyperparameters in a gradexp
run; ``GradexpWatch`` keeps the model's gradients (parameters, updates) at the logged steps.

    trainer = Trainer(logger=GradexpLogger("digits"), callbacks=[GradexpWatch(log="all")])

Works with ``lightning`` (``lightning.pytorch``) or the older ``pytorch_lightning`` package.
"""

from __future__ import annotations

from argparse import Namespace
from collections.abc import Mapping
from typing import Any

try:
    from lightning.fabric.utilities.logger import (
        _convert_json_serializable,
        _convert_params,
        _sanitize_callable_params,
    )
    from lightning.pytorch import Callback, LightningModule, Trainer
    from lightning.pytorch.loggers.logger import Logger, rank_zero_experiment
    from lightning.pytorch.utilities.rank_zero import rank_zero_only
except ImportError:  # pragma: no cover - the standalone package (other classes, the same API)
    from lightning_fabric.utilities.logger import (
        _convert_json_serializable,
        _convert_params,
        _sanitize_callable_params,
    )
    from pytorch_lightning import Callback, LightningModule, Trainer  # type: ignore[assignment]
    from pytorch_lightning.loggers.logger import Logger, rank_zero_experiment  # type: ignore[assignment]
    from pytorch_lightning.utilities.rank_zero import rank_zero_only

from gradexp.integrations.pytorch import unwatch, watch
from gradexp.write.run import DEFAULT_PROJECT, Run, init, new_run_id

__all__ = ["GradexpLogger", "GradexpWatch"]


class GradexpLogger(Logger):
    """A Lightning logger writing to a gradexp run.

    The run is started (on rank 0 only) the first time Lightning needs it, with ``project``
    and the keyword arguments of :func:`gradexp.init`; or pass ``run=`` to log into one you
    started. Metrics go to the run's history at Lightning's step (``trainer.global_step``
    for training metrics), hyperparameters to its config. ``finalize`` flushes; a failed fit
    finishes the run as failed, a successful one leaves it open for ``test()``/``predict()``
    (it is finished by ``gradexp.finish()``, ``logger.experiment.finish()`` or at exit).
    """

    def __init__(self, project: str | None = None, *, run: Run | None = None, **init_kwargs: Any) -> None:
        super().__init__()
        self._run = run
        self._project = run.project if run is not None else (project or DEFAULT_PROJECT)
        self._id = run.id if run is not None else init_kwargs.pop("id", None) or new_run_id()
        self._init_kwargs = init_kwargs

    @property
    def name(self) -> str:
        """The project."""
        return self._project

    @property
    def version(self) -> str:
        """The run id (fixed at construction, so every rank agrees on it)."""
        return self._id

    @property
    @rank_zero_experiment
    def experiment(self) -> Run:
        """The gradexp run, started on first use."""
        if self._run is None:
            self._run = init(self._project, id=self._id, **self._init_kwargs)
        return self._run

    @rank_zero_only
    def log_hyperparams(self, params: Mapping[str, Any] | Namespace, *args: Any, **kwargs: Any) -> None:
        # _convert_params passes any Mapping through (it converts only a Namespace); its hint says dict
        params = _convert_json_serializable(_sanitize_callable_params(_convert_params(params)))  # type: ignore[arg-type]
        self.experiment.config.update(params)

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.experiment.log(dict(metrics), step=step)

    @rank_zero_only
    def save(self) -> None:
        if self._run is not None:
            self._run.flush()

    @rank_zero_only
    def finalize(self, status: str) -> None:
        if self._run is None:
            return
        if status == "success":
            self._run.flush()
        else:
            self._run.finish(exit_code=1)


class GradexpWatch(Callback):
    """Calls :func:`gradexp.watch` on the LightningModule for the length of ``fit``.

    Tensors are captured at the optimizer steps whose metrics Lightning logs (every
    ``log_every_n_steps``), so they land in the same rows; pass ``log_freq`` to capture
    every ``log_freq`` steps instead. With one optimizer, gradients are the clipped ones
    and updates can be kept; with several, gradients are captured as they accumulate.
    The run is the :class:`GradexpLogger`'s if the Trainer has one, else the current run.
    """

    def __init__(self, log: str = "gradients", log_freq: int | None = None, prefix: str | None = None,
                 *, all_ranks: bool = False) -> None:
        self._watch: dict[str, Any] = {"log": log, "prefix": prefix, "all_ranks": all_ranks}
        self._log_freq = log_freq

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.global_rank != 0 and not self._watch["all_ranks"]:
            return
        run = next((lg.experiment for lg in trainer.loggers if isinstance(lg, GradexpLogger)), None)
        optimizers = trainer.optimizers
        when = None
        if self._log_freq is None:
            connector = trainer._logger_connector  # what Lightning's own LearningRateMonitor asks
            when = lambda: connector.should_update_logs  # noqa: E731
        watch(pl_module, optimizers[0] if len(optimizers) == 1 else None,
              log_freq=self._log_freq or 1, run=run, when=when, **self._watch)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        unwatch(pl_module)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        unwatch(pl_module)
