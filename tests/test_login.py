"""`gradexp login` (gradexp/_login.py) end to end: the real CLI in a subprocess, a real
server on loopback, and Debian's Chromium (Playwright) clicking through sign-in and
authorize. Screenshots of the pages go to test-artifacts/screenshots/.
"""

from __future__ import annotations

import re
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from gradexp.core import credentials as _auth
from gradexp.sync import login as _login
from services import GradexpServer, WebSession, clean_env, run_python, wait_for

PASSWORD = "correct horse battery"
SHOTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "screenshots"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = GradexpServer(tmp_path_factory.mktemp("login-server")).start()
    s.user_with_password("ada", PASSWORD)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def shots():
    SHOTS.mkdir(parents=True, exist_ok=True)
    return SHOTS


class LoginCLI:
    """``gradexp login ARGS`` as a child process whose "browser" records the URL it is given."""

    def __init__(self, tmp: Path, *args: str) -> None:
        self.opened = tmp / f"opened-{time.monotonic_ns()}.txt"
        browser = tmp / "record-url"
        browser.write_text('#!/bin/sh\nprintf "%s\\n" "$1" >> "$OPENED_URLS"\n')
        browser.chmod(0o755)
        env = clean_env(BROWSER=str(browser), OPENED_URLS=str(self.opened))
        self.proc = subprocess.Popen([sys.executable, "-m", "gradexp", "login", *args], env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     start_new_session=True)  # no terminal: the hidden prompt reads stdin
        self.output = ""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output += line

    def browser_url(self) -> str:
        wait_for(lambda: self.opened.exists() and self.opened.read_text().strip(), "the CLI to open a browser",
                 proc=self.proc)
        return self.opened.read_text().split()[0]

    def printed_url(self) -> str:
        m = wait_for(lambda: re.search(r"(http://\S+/authorize\?\S+)", self.output), "the CLI to print a URL",
                     proc=self.proc)
        return m.group(1)

    def wait(self, timeout: float = 60) -> tuple[int, str]:
        rc = self.proc.wait(timeout)
        self._reader.join(10)
        return rc, self.output

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture()
def login_cli(tmp_path):
    started: list[LoginCLI] = []

    def start(*args: str) -> LoginCLI:
        started.append(LoginCLI(tmp_path, *args))
        return started[-1]
    yield start
    for cli in started:
        cli.close()


def sign_in(page, user: str = "ada", password: str = PASSWORD) -> None:
    page.fill("#username", user)
    page.fill("#password", password)
    page.click("button[type=submit]")


def test_browser_login_end_to_end(server, chromium, login_cli, shots, tmp_path):
    cli = login_cli("--host", server.url)
    url = cli.browser_url()
    assert url.startswith(f"{server.url}/authorize?") and "code_challenge_method=S256" in url
    context = chromium.new_context()
    page = context.new_page()
    seen: list[str] = []  # every URL the browser requested, redirects included
    page.on("request", lambda r: seen.append(r.url))
    page.goto(url)
    assert page.inner_text("h1") == "Sign in"
    page.screenshot(path=str(shots / "1-sign-in.png"), full_page=True)
    sign_in(page)
    page.wait_for_url("**/authorize?**")
    assert page.inner_text("h1") == "Authorize gradexp login"
    assert page.inner_text("#client") == f"gradexp CLI on {socket.gethostname()}"
    page.screenshot(path=str(shots / "2-authorize.png"), full_page=True)
    page.click("button[value=allow]")
    page.wait_for_url(re.compile(r"http://127\.0\.0\.1:\d+/gradexp/callback\?.*"))
    assert "You can close this tab" in page.inner_text("body")
    page.screenshot(path=str(shots / "3-logged-in.png"), full_page=True)
    rc, out = cli.wait()
    assert rc == 0, out
    assert f"Logged in to {server.url} as ada" in out

    stored = _auth.stored(server.url)
    key = stored["api_key"]
    assert key.startswith("gx_") and stored["user"] == "ada"
    assert key not in out, "the key is never printed"
    assert not [u for u in seen if key in u], "the key never appears in a URL"
    assert key not in server.log.read_text()
    path = _auth.config_dir() / _auth.FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    # The callback's code is dead now: reloading the page cannot log in twice.
    callback = next(u for u in seen if "/gradexp/callback?" in u)
    with pytest.raises(requests.ConnectionError):
        requests.get(callback, timeout=5)  # the listener has closed
    context.close()

    # A script with no settings at all now streams to the server.
    r = run_python("import gradexp\n"
                   "run = gradexp.init('afterLogin')\n"
                   "assert run.settings.mode == 'online', run.settings.mode\n"
                   "run.log({'loss': 0.5}); run.finish(); print(run.id)", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    runs = requests.get(f"{server.url}/api/v1/runs?project=afterLogin", timeout=30,
                        headers={"Authorization": f"Bearer {key}"}).json()["runs"]
    assert [(x["id"], x["status"]) for x in runs] == [(r.stdout.strip(), "finished")]


def test_browser_login_with_an_existing_session_and_deny(server, chromium, login_cli, shots):
    context = chromium.new_context()
    page = context.new_page()
    page.goto(f"{server.url}/login")
    sign_in(page)
    page.wait_for_url("**/keys")
    page.screenshot(path=str(shots / "4-api-keys.png"), full_page=True)
    cli = login_cli("--host", server.url)
    page.goto(cli.browser_url())  # signed in already: straight to the authorize page
    assert page.inner_text("h1") == "Authorize gradexp login"
    page.click("button[value=deny]")
    assert "access was denied" in page.inner_text("body")
    rc, out = cli.wait()
    assert rc == 1 and "access was denied in the browser" in out
    assert _auth.stored(server.url) is None
    context.close()


def test_no_browser_flow_shows_a_key_to_paste(server, chromium, login_cli, shots):
    cli = login_cli("--host", server.url, "--no-browser")
    url = cli.printed_url()
    assert not cli.opened.exists(), "--no-browser opens no browser"
    context = chromium.new_context()
    page = context.new_page()
    page.goto(url)
    sign_in(page)
    page.wait_for_url("**/authorize?**")
    page.click("button[value=allow]")
    key = page.inner_text("#api-key").strip()
    page.screenshot(path=str(shots / "5-no-browser-key.png"), full_page=True)
    context.close()
    assert cli.proc.stdin is not None
    cli.proc.stdin.write(key + "\n")
    cli.proc.stdin.flush()
    rc, out = cli.wait()
    assert rc == 0 and "Logged in" in out, out
    assert key not in out
    assert _auth.stored(server.url)["api_key"] == key


def test_keys_page_revokes_in_the_browser(server, chromium, shots):
    context = chromium.new_context()
    page = context.new_page()
    page.goto(f"{server.url}/keys")
    sign_in(page)
    page.fill("#name", "to-revoke")
    page.click("text=Create key")
    key = page.inner_text("#new-key").strip()
    assert requests.get(f"{server.url}/api/v1/viewer", headers={"Authorization": f"Bearer {key}"},
                        timeout=30).status_code == 200
    page.click("button[aria-label='Revoke to-revoke']")
    assert "Key revoked." in page.inner_text("body")
    page.screenshot(path=str(shots / "6-key-revoked.png"), full_page=True)
    assert requests.get(f"{server.url}/api/v1/viewer", headers={"Authorization": f"Bearer {key}"},
                        timeout=30).status_code == 401
    context.close()


# -- the loopback listener, without a browser -----------------------------------------------------

def test_wrong_state_is_refused_and_the_right_answer_still_wins(server, login_cli):
    cli = login_cli("--host", server.url)
    url = cli.browser_url()
    query = parse_qs(urlsplit(url).query)
    redirect = query["redirect_uri"][0]
    base = redirect.rsplit("/gradexp/callback", 1)[0]
    idle = socket.create_connection(("127.0.0.1", urlsplit(redirect).port))  # says nothing, holds nothing up
    assert requests.get(base + "/favicon.ico", timeout=10).status_code == 404  # only the expected path
    assert requests.get(base + "/other?code=x&state=" + query["state"][0], timeout=10).status_code == 404
    r = requests.get(redirect, params={"code": "x", "state": "not-the-state"}, timeout=10)
    assert r.status_code == 400 and "wrong state" in r.text
    assert cli.proc.poll() is None and _auth.stored(server.url) is None  # still waiting for the real one
    web = WebSession(server.url)  # the real answer, through a browser stand-in
    web.sign_in("ada", PASSWORD)
    page = web.get(url[len(server.url):])
    back = web.post("/authorize", {"csrf": web.csrf(page.text), **{k: v[0] for k, v in query.items()},
                                   "decision": "allow"}).headers["location"]
    assert requests.get(back, timeout=30).status_code == 200
    rc, out = cli.wait()
    assert rc == 0 and "Logged in" in out, out
    assert _auth.stored(server.url)["user"] == "ada"
    idle.close()


def test_only_wrong_states_time_out_with_a_hint(server, login_cli):
    cli = login_cli("--host", server.url, "--timeout", "3")
    query = parse_qs(urlsplit(cli.browser_url()).query)
    requests.get(query["redirect_uri"][0], params={"code": "x", "state": "stale"}, timeout=10)
    rc, out = cli.wait()
    assert rc == 1 and "1 answer(s) with the wrong state were refused" in out and "nothing was stored" in out
    assert _auth.stored(server.url) is None


def test_a_refused_code_fails_with_the_servers_reason(server, login_cli):
    cli = login_cli("--host", server.url)
    query = parse_qs(urlsplit(cli.browser_url()).query)
    r = requests.get(query["redirect_uri"][0], params={"code": "forged", "state": query["state"][0]}, timeout=30)
    assert r.status_code == 400 and "Login failed" in r.text
    rc, out = cli.wait()
    assert rc == 1 and "refused the login: unknown authorization code" in out


def test_no_answer_times_out_and_closes_the_listener(server, login_cli):
    cli = login_cli("--host", server.url, "--timeout", "1")
    redirect = parse_qs(urlsplit(cli.browser_url()).query)["redirect_uri"][0]
    rc, out = cli.wait()
    assert rc == 1 and "no answer from the browser within 1 s" in out
    with pytest.raises(requests.ConnectionError):
        requests.get(redirect, timeout=5)


def test_login_in_python_checks_the_key_then_stores_it(server):
    # gradexp.login(key=, host=), as wandb.login: a refused key raises the error root's
    # LoginError and stores nothing; an accepted one is stored for the runs started after.
    import gradexp

    key = server.user_with_key("linus")
    with pytest.raises(gradexp.LoginError, match="does not accept that API key") as refused:
        gradexp.login(key="gx_not_a_key", host=server.url)
    assert isinstance(refused.value, gradexp.GradexpError) and _auth.stored(server.url) is None
    assert gradexp.login(key=key, host=server.url) is True
    assert _auth.stored(server.url)["entity"] == "linus" and _auth.default_host() == _auth.normalize_host(server.url)
    assert gradexp.login(host=server.url) is True  # a stored key is kept: no browser


def test_unreachable_server_fails_before_opening_a_browser(login_cli):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cli = login_cli("--host", f"http://127.0.0.1:{port}")
    rc, out = cli.wait()
    assert rc == 1 and "cannot reach a gradexp server" in out and not cli.opened.exists()


def test_no_browser_available_falls_back_to_the_prompt():
    assert _login.browser_login("http://127.0.0.1:9", open_browser=lambda url: False) is None
    verifier, challenge = _login.pkce_pair()
    assert 43 <= len(verifier) <= 128 and re.fullmatch(r"[A-Za-z0-9_-]{43}", challenge)
