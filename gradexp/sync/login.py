"""``gradexp login`` in a browser: RFC 8252 loopback redirect with RFC 7636 PKCE.

The CLI listens on 127.0.0.1 at a random port, opens the server's ``/authorize``
page with a random ``state`` and the S256 challenge of a random verifier, and
waits. The page redirects back to ``http://127.0.0.1:PORT/gradexp/callback`` with a
single-use code; the CLI checks the state, trades code + verifier for an API key
in a POST, and answers the browser with a "you can close this tab" page. The key
travels only in that POST's response. The listener answers 404 to any other
path, refuses (and keeps waiting after) a callback with the wrong state, and closes
after the one good callback or at the timeout.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import http.server
import secrets
import socket
import threading
import time
import webbrowser
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from gradexp.core.credentials import CLIENT_ID
from gradexp.core.errors import LoginError

CALLBACK_PATH = "/gradexp/callback"


@dataclass(frozen=True)
class Grant:
    api_key: str
    user: str
    entity: str


def client_name() -> str:
    return f"gradexp CLI on {socket.gethostname()}"


def pkce_pair() -> tuple[str, str]:
    """(verifier, S256 challenge): 86 random URL-safe characters and their hashed form."""
    verifier = secrets.token_urlsafe(64)
    digest = hashlib.sha256(verifier.encode()).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def manual_url(host: str) -> str:
    """The page that shows a new key to paste (``--no-browser``)."""
    return f"{host}/authorize?" + urlencode({"client_id": CLIENT_ID, "client_name": client_name()})


def exchange(host: str, *, code: str, verifier: str, redirect_uri: str, timeout: float = 30.0) -> Grant:
    """Trade an authorization code and its verifier for an API key (one POST, no retry:
    the code dies on first use)."""
    import requests

    try:
        r = requests.post(f"{host}/api/v1/oauth/token", timeout=timeout, data={
            "grant_type": "authorization_code", "code": code, "code_verifier": verifier,
            "redirect_uri": redirect_uri, "client_id": CLIENT_ID})
    except requests.RequestException as e:
        raise LoginError(f"cannot reach {host} to finish the login: {e}") from None
    try:
        body = r.json()
    except ValueError:
        body = {}
    if r.status_code != 200 or "api_key" not in body:
        why = body.get("error_description") or body.get("error") or r.text[:200]
        raise LoginError(f"{host} refused the login: {why}")
    return Grant(api_key=body["api_key"], user=body["user"], entity=body["entity"])


_PAGE = ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title>"
         "<style>body{{font:16px system-ui,sans-serif;max-width:36rem;margin:4rem auto;padding:0 1rem}}</style>"
         "</head><body><h1>{title}</h1><p>{text}</p></body></html>")


class _Listener(http.server.ThreadingHTTPServer):
    """The loopback end, served on its own thread: one good callback, then done.

    A request with the wrong ``state`` (an old tab, or another local process) is refused
    and counted, and the listener keeps waiting for the right one.
    """

    daemon_threads = True

    def __init__(self, finish: Callable[[dict[str, str]], Grant], state: str) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.finish = finish
        self.state = state
        self.outcome: Grant | LoginError | None = None
        self.done = threading.Event()
        self.lock = threading.Lock()
        self.wrong_states = 0


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Listener
    timeout = 10  # seconds: a connection that sends nothing must not hold the listener

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        url = urlsplit(self.path)
        if url.path != CALLBACK_PATH:
            self._reply(404, "Not found", "This is the gradexp login listener; nothing here.")
            return
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        if not hmac.compare_digest(query.get("state", "").encode(), self.server.state.encode()):
            with self.server.lock:
                self.server.wrong_states += 1
            self._reply(400, "Login failed", "This answer has the wrong state: it belongs to another login "
                                             "(an old tab?). Nothing was stored. Use the tab that the current "
                                             "gradexp login opened.")
            return
        with self.server.lock:  # one callback only, even if two arrive at once
            if self.server.done.is_set():
                self._reply(404, "Not found", "This login is over. You can close this tab.")
                return
            outcome = self._outcome(query)
            self.server.outcome = outcome
            self.server.done.set()
        if isinstance(outcome, Grant):
            self._reply(200, "Logged in", f"gradexp is logged in as {outcome.user}. You can close this tab.")
        else:
            self._reply(400, "Login failed", f"{outcome} You can close this tab.")

    def _outcome(self, query: dict[str, str]) -> Grant | LoginError:
        if "error" in query:
            return LoginError("access was denied in the browser" if query["error"] == "access_denied"
                              else f"the server answered {query['error']}: {query.get('error_description', '')}")
        if not query.get("code"):
            return LoginError("the browser came back without an authorization code")
        try:
            return self.server.finish(query)
        except LoginError as e:
            return e

    def _reply(self, status: int, title: str, text: str) -> None:
        body = _PAGE.format(title=html.escape(title), text=html.escape(text)).encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:  # the query holds the code: never log it
        pass


def browser_login(host: str, *, timeout: float = 300.0, open_browser: Callable[[str], bool] = webbrowser.open,
                  echo: Callable[[str], None] = print) -> Grant | None:
    """Run the loopback flow; None when no browser could be opened (the caller falls back
    to the key prompt). LoginError on denial, a refused code, or no good answer in time."""
    verifier, challenge = pkce_pair()
    state = secrets.token_urlsafe(32)

    def finish(query: dict[str, str]) -> Grant:
        return exchange(host, code=query["code"], verifier=verifier, redirect_uri=redirect_uri)

    listener = _Listener(finish, state)
    # Serve before the browser opens: a console browser (w3m, lynx) blocks webbrowser.open
    # until it exits, and the callback must be answered meanwhile.
    thread = threading.Thread(target=listener.serve_forever, kwargs={"poll_interval": 0.2},
                              name="gradexp-login-listener", daemon=True)
    thread.start()
    try:
        redirect_uri = f"http://127.0.0.1:{listener.server_address[1]}{CALLBACK_PATH}"
        url = f"{host}/authorize?" + urlencode({
            "response_type": "code", "client_id": CLIENT_ID, "client_name": client_name(),
            "redirect_uri": redirect_uri, "state": state, "code_challenge": challenge,
            "code_challenge_method": "S256"})
        try:
            opened = open_browser(url)
        except Exception:  # webbrowser can fail in odd ways on odd systems: treat as no browser
            opened = False
        if not opened and not listener.done.is_set():
            return None
        echo(f"Opened the browser at:\n  {url}\nSign in and authorize there (waiting up to {timeout:.0f} s; "
             "Ctrl-C to cancel; gradexp login --no-browser on a machine without a browser).")
        deadline = time.monotonic() + timeout
        while not listener.done.wait(min(0.5, max(0.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                why = ""
                if listener.wrong_states:
                    why = (f" ({listener.wrong_states} answer(s) with the wrong state were refused: "
                           "a tab of another login?)")
                raise LoginError(f"no answer from the browser within {timeout:.0f} s{why}; nothing was stored. "
                                 "Run gradexp login again, or gradexp login --no-browser")
        assert listener.outcome is not None
        if isinstance(listener.outcome, LoginError):
            raise listener.outcome
        return listener.outcome
    finally:
        listener.shutdown()
        listener.server_close()


def login(*, key: str | None = None, host: str | None = None, relogin: bool = False,
          timeout: float = 300.0) -> bool:
    """``gradexp.login()``: store an API key for ``host`` (default: ``$GRADEXP_HOST``, the
    last login's, else the local default), checked against the server first. Without
    ``key``, a key already stored is kept (unless ``relogin``), else the browser flow runs.
    True once a key is stored; LoginError if the server refuses it or cannot be reached."""
    import os

    from gradexp.core import credentials as _auth
    from gradexp.core.client import Client
    from gradexp.core.errors import ApiError

    host = _auth.normalize_host(host or os.environ.get("GRADEXP_HOST") or _auth.default_host()
                                or _auth.DEFAULT_HOST)
    if key is None:
        if not relogin and _auth.stored(host):
            return True
        grant = browser_login(host, timeout=timeout)
        if grant is None:
            raise LoginError(f"no browser could be opened to sign in to {host}; pass the key: "
                             f"gradexp.login(key=...) (keys are shown at {manual_url(host)})")
        _auth.store(host, grant.api_key, user=grant.user, entity=grant.entity)
        return True
    try:
        viewer = Client(host, key, timeout=15).json("GET", "/viewer", retry=False)
    except ApiError as e:
        raise LoginError(f"{host} does not accept that API key ({e.message})") from None
    except Exception as e:
        raise LoginError(f"cannot reach a gradexp server at {host}: {e}") from None
    _auth.store(host, key, user=viewer["user"], entity=viewer["entity"])
    return True
