"""Training-loop integrations, each imported on first use so ``import gradexp`` stays light.

- :mod:`gradexp.integrations.pytorch`: ``watch``/``unwatch`` and ``log_gradient_stats``
  (also at ``gradexp.watch`` and friends).
- :mod:`gradexp.integrations.lightning`: ``GradexpLogger`` and ``GradexpWatch``.
- :mod:`gradexp.integrations.transformers`: ``GradexpCallback`` for the ``Trainer``.
"""
