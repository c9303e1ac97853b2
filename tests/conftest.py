"""Shared fixtures: every test runs in its own folder with no GRADEXP_* settings leaking in."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    for name in list(os.environ):
        if name.startswith("GRADEXP_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    yield
    import gradexp._run as _run

    for run in list(_run._runs):  # a failing test must not leave a run open for the next one
        run.finish()
