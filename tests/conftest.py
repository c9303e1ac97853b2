"""Shared fixtures: every test runs in its own folder with no GRADEXP_* settings leaking in."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    for name in list(os.environ):
        if name.startswith("GRADEXP_"):
            monkeypatch.delenv(name)
    # Credentials a developer stored with `gradexp login` must not turn test runs online.
    monkeypatch.setenv("GRADEXP_CONFIG_DIR", str(tmp_path / ".gradexp-config"))
    monkeypatch.chdir(tmp_path)
    yield
    import gradexp.write.run as _run

    for run in list(_run._runs):  # a failing test must not leave a run open for the next one
        run.finish()


# -- real services (tests/services.py): started once per session, on first use -----------------

@pytest.fixture(scope="session")
def postgres():
    from services import Postgres

    pg = Postgres()
    yield pg
    pg.stop()


@pytest.fixture(scope="session")
def mariadb():
    from services import MariaDB

    db = MariaDB()
    yield db
    db.stop()


@pytest.fixture(scope="session")
def s3():
    from services import S3

    server = S3()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def chromium():
    """Debian's headless Chromium driven by Playwright (never a downloaded browser)."""
    from services import unavailable

    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("playwright is not installed: pip install -e '.[test]'")
    if not os.access(CHROMIUM, os.X_OK):
        unavailable(f"no {CHROMIUM}: apt-get install chromium")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield browser
        browser.close()


CHROMIUM = "/usr/bin/chromium"


# -- order: the longest files first ------------------------------------------------------------

LONGEST_FIRST = ("test_faults.py", "test_api_validation.py", "test_resync.py", "test_migrations.py",
                 "test_accounts.py", "test_streaming.py", "test_parts_store.py", "test_roundtrip.py",
                 "test_kill_load.py")
"""Files that take minutes (summed test durations of a parallel run, 2026-12-01). scripts/test.sh
hands whole files to its workers in collection order: started last, one of these would leave
the other workers idle while it runs."""


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its order
