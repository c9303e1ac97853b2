"""The credential store and `gradexp login --key` / `whoami` / `logout`, against a real server."""

from __future__ import annotations

import os
import stat

import pytest
from click.testing import CliRunner

import gradexp
from gradexp.cli import main
from gradexp.core import credentials as _auth
from gradexp.core import settings as _settings


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from services import GradexpServer

    s = GradexpServer(tmp_path_factory.mktemp("auth-server"))
    s.start()
    s.key = s.user_with_key("ada")
    yield s
    s.stop()


def test_store_is_private_atomic_and_per_host(tmp_path):
    path = _auth.store("127.0.0.1:9", "k-one", user="u", entity="u")
    _auth.store("http://other:1/", "k-two", user="v", entity="v")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    assert _auth.stored("http://127.0.0.1:9")["api_key"] == "k-one"
    assert _auth.stored("other:1")["api_key"] == "k-two"
    assert _auth.default_host() == "http://other:1"
    assert not [p for p in path.parent.iterdir() if p.name != path.name], "no temp files left behind"
    assert _auth.forget("other:1") and not _auth.forget("other:1")
    assert _auth.default_host() == "http://127.0.0.1:9"


def test_precedence_argument_env_stored(monkeypatch):
    _auth.store("http://stored:1", "stored-key", user="u", entity="u")
    s = _settings.resolve({})
    assert (s.host, s.api_key, s.mode) == ("http://stored:1", "stored-key", "online")
    monkeypatch.setenv("GRADEXP_API_KEY", "env-key")
    assert _settings.resolve({}).api_key == "env-key"
    assert _settings.resolve({"api_key": "arg-key"}).api_key == "arg-key"
    monkeypatch.setenv("GRADEXP_HOST", "http://env:2")
    s = _settings.resolve({})
    assert (s.host, s.api_key) == ("http://env:2", "env-key")
    assert _settings.resolve({"host": "http://arg:3"}).host == "http://arg:3"


def test_online_without_key_falls_back_with_one_hint():
    with pytest.warns(gradexp.GradexpWarning, match="gradexp login"):
        run = gradexp.init("p", host="http://127.0.0.1:9")
    assert run.settings.mode == "offline"
    run.log({"a": 1.0})
    run.finish()
    assert gradexp.Api().run(run.dir).history().num_rows == 1


def test_login_whoami_logout(server, tmp_path):
    cli = CliRunner()
    r = cli.invoke(main, ["login", "--host", server.url, "--key", "gx_wrong"])
    assert r.exit_code != 0 and "does not accept" in r.output
    assert _auth.stored(server.url) is None
    r = cli.invoke(main, ["login", "--host", server.url, "--key", server.key])
    assert r.exit_code == 0, r.output
    assert server.key not in r.output, "the key is never echoed"
    assert "Logged in" in r.output and "ada" in r.output
    r = cli.invoke(main, ["whoami"])
    assert r.exit_code == 0 and f"user ada, entity ada, host {server.url}" in r.output
    # A run with no settings at all now streams to the stored host.
    with gradexp.init("viaLogin") as run:
        assert run.settings.mode == "online" and run.settings.host == server.url
        run.log({"x": 1.0})
    remote = gradexp.Api().run(f"ada/viaLogin/{run.id}")
    assert remote.status == "finished" and remote.history().column("x").to_pylist() == [1.0]
    r = cli.invoke(main, ["logout"])
    assert r.exit_code == 0 and "Forgot" in r.output
    r = cli.invoke(main, ["whoami"])
    assert r.exit_code != 0 and "gradexp login" in r.output


def test_login_no_browser_prompts_hidden(server):
    r = CliRunner().invoke(main, ["login", "--host", server.url, "--no-browser"], input=server.key + "\n")
    assert r.exit_code == 0, r.output
    assert f"{server.url}/authorize?client_id=gradexp-cli" in r.output
    assert server.key not in r.output
    assert _auth.stored(server.url)["api_key"] == server.key
