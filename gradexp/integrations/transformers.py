"""Hugging Face Transformers: ``GradexpCallback`` records a ``Trainer``'s logs in a gradexp run
and keeps the model's gradients (parameters, updates) at the logged steps.

    Trainer(model, args, train_dataset=ds, callbacks=[GradexpCallback("glue", log="all")])

Set ``report_to="none"`` (or leave gradexp out of it) so nothing else logs the same run.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from gradexp.core.errors import UsageError
from gradexp.integrations.pytorch import unwatch, watch
from gradexp.write.run import Run, current, init

__all__ = ["GradexpCallback"]


class GradexpCallback(TrainerCallback):
    """Logs the Trainer's ``logs`` at ``state.global_step`` and calls :func:`gradexp.watch`.

    The run is ``run``, else the current one, else one this callback starts with ``project``
    and the keyword arguments of :func:`gradexp.init` (its config: the TrainingArguments
    and the model's config), and finishes at the end of training. Tensors are captured at
    the optimizer step of each step the Trainer logs (``logging_steps``), after gradient
    clipping (the point ``on_pre_optimizer_step`` sees), or every ``log_freq`` steps if
    given; ``log=None`` logs metrics only. Only the main process logs, unless ``all_ranks``.
    """

    def __init__(self, project: str | None = None, *, log: str | None = "gradients",
                 log_freq: int | None = None, prefix: str | None = None, all_ranks: bool = False,
                 run: Run | None = None, **init_kwargs: Any) -> None:
        self._project = project
        self._log = log
        self._log_freq = log_freq
        self._prefix = prefix
        self._all_ranks = all_ranks
        self._run = run
        self._init_kwargs = init_kwargs
        self._owns = False
        self._model: torch.nn.Module | None = None

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: torch.nn.Module | None = None, optimizer: Any = None, **kwargs: Any) -> None:
        if not (state.is_world_process_zero or self._all_ranks):
            return
        if self._run is None or self._run._finished:
            try:
                self._run = current()
            except UsageError:
                config = {"trainer": args.to_sanitized_dict()}
                model_config = getattr(model, "config", None)
                if model_config is not None and hasattr(model_config, "to_diff_dict"):
                    config["model"] = model_config.to_diff_dict()
                self._run = init(self._project, config=config, **self._init_kwargs)
                self._owns = True
        if self._log is None or model is None:
            return
        when = None
        if self._log_freq is None:
            def when() -> bool:  # will the step being taken be logged? (DefaultFlowCallback's rule)
                step = state.global_step + 1
                return (step == 1 and args.logging_first_step) or (
                    args.logging_strategy != "steps" or step % state.logging_steps == 0)
        watch(model, optimizer, log=self._log, log_freq=self._log_freq or 1, prefix=self._prefix,
              all_ranks=self._all_ranks, run=self._run, when=when)
        self._model = model

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if self._run is not None and logs and not self._run._finished:
            self._run.log(logs, step=state.global_step)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        if self._model is not None:
            unwatch(self._model)
            self._model = None
        if self._owns and self._run is not None:
            self._run.finish()
            self._owns = False
