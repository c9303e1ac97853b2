"""The server's web pages: sign-in, the authorization page of ``gradexp login``, API keys.

``gradexp login`` follows RFC 8252 (a loopback redirect to the CLI) with RFC 7636
PKCE (S256): ``GET /authorize`` shows who asks for access, ``POST /authorize``
redirects to ``http://127.0.0.1:PORT/...`` with a single-use code and the CLI's
``state``, and the CLI trades code + verifier for an API key at
``POST /api/v1/oauth/token``. Without a ``redirect_uri`` (``--no-browser``) the page
shows a new key to paste instead. An API key never travels in a URL.

Browser sessions are cookies (HttpOnly, SameSite=Lax, Secure over https) naming a
session row in SQL; every form carries a CSRF token: the session's own after sign-in,
a double-submit cookie on the sign-in form. Pages forbid framing (no clickjacking of
"Authorize") and are never cached.
"""

from __future__ import annotations

import datetime
import hmac
import html
import json
import re
import secrets
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import sqlalchemy as sa
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from . import accounts, db

SESSION_COOKIE = "gx_session"
LOGIN_CSRF_COOKIE = "gx_login_csrf"
CLIENT_ID = "gradexp-cli"
_CHALLENGE = re.compile(r"^[A-Za-z0-9_-]{43,128}\Z")  # base64url of a SHA-256, unpadded: 43
_VERIFIER = re.compile(r"^[A-Za-z0-9._~-]{43,128}\Z")  # RFC 7636 section 4.1
_MAX_FORM = 64 << 10
_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
                               "form-action 'self' http://127.0.0.1:*; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class PageError(Exception):
    """Ends a request with an HTML error page."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def e(value: Any) -> str:
    return html.escape(str(value), quote=True)


_CSS = """
body{font:15px/1.45 system-ui,sans-serif;max-width:46rem;margin:2rem auto;padding:0 1rem;color:#1d232a}
header{display:flex;justify-content:space-between;align-items:center;border-bottom:1px solid #dde;
 padding-bottom:.6rem;margin-bottom:1.4rem}
header a{margin-right:1rem} .brand{font-weight:700;color:#1d232a;text-decoration:none}
form.inline{display:inline} label{display:block;margin:.7rem 0 .2rem}
input[type=text],input[type=password]{width:100%;max-width:22rem;padding:.45rem;font:inherit;
 border:1px solid #aab;border-radius:4px}
button{font:inherit;padding:.45rem 1rem;border-radius:4px;border:1px solid #2a5db0;background:#2a5db0;
 color:#fff;cursor:pointer;margin-top:1rem} button.secondary{background:#fff;color:#2a5db0}
button.danger{background:#fff;color:#b02a2a;border-color:#b02a2a;margin:0;padding:.2rem .6rem}
.error{background:#fbeaea;border:1px solid #e0a0a0;padding:.6rem .8rem;border-radius:4px}
.note{background:#eef3fb;border:1px solid #b8c9e8;padding:.6rem .8rem;border-radius:4px}
code.key{display:block;font-size:1.05rem;padding:.7rem;background:#f4f4f6;border:1px solid #ccd;
 border-radius:4px;word-break:break-all;user-select:all}
table{border-collapse:collapse;width:100%} th,td{text-align:left;padding:.35rem .5rem;
 border-bottom:1px solid #eee;font-size:.92rem} .muted{color:#667}
"""


def page(title: str, body: str, *, viewer: accounts.Session | None = None, status: int = 200,
         headers: dict[str, str] | None = None) -> HTMLResponse:
    nav = ""
    if viewer is not None:
        nav = (f'<nav><a href="/keys">API keys</a><a href="/account">Account</a>'
               f'<form class="inline" method="post" action="/logout">{csrf_field(viewer.csrf)}'
               f'<button class="secondary" style="margin:0">Sign out {e(viewer.user)}</button></form></nav>')
    doc = (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
           f'<meta name="viewport" content="width=device-width,initial-scale=1">'
           f"<title>{e(title)} - gradexp</title><style>{_CSS}</style></head><body>"
           f'<header><a class="brand" href="/">gradexp</a>{nav}</header>'
           f"<main><h1>{e(title)}</h1>{body}</main></body></html>")
    return HTMLResponse(doc, status_code=status, headers={**_HEADERS, **(headers or {})})


def csrf_field(token: str) -> str:
    return f'<input type="hidden" name="csrf" value="{e(token)}">'


def _hidden(fields: dict[str, str]) -> str:
    return "".join(f'<input type="hidden" name="{e(k)}" value="{e(v)}">' for k, v in fields.items())


def _when(t: float | None) -> str:
    if t is None:
        return "never"
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _safe_next(target: str | None) -> str:
    """Only a path on this server: no scheme, no host, no ``//`` (an open redirect otherwise)."""
    if not target or not target.startswith("/") or target.startswith(("//", "/\\")):
        return "/keys"
    return target


class Web:
    """The pages, over the server's engine."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    # -- plumbing ------------------------------------------------------------------------------

    async def session(self, request: Request) -> accounts.Session | None:
        token = request.cookies.get(SESSION_COOKIE)
        if not token:
            return None
        s = await run_in_threadpool(accounts.session, self.engine, token)
        if s is not None:
            request.state.user = s.user  # for the access log
        return s

    @staticmethod
    async def body(request: Request) -> bytes:
        """The request body, at most 64 KiB (pages and the token exchange take no more)."""
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > _MAX_FORM:
                raise PageError(413, "form too large")
        return raw

    async def form(self, request: Request) -> dict[str, str]:
        """The urlencoded form body (first value of each field)."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        raw = await self.body(request)
        if ctype != "application/x-www-form-urlencoded" and raw:
            raise PageError(415, "expected a form (application/x-www-form-urlencoded)")
        parsed = parse_qs(raw.decode("utf-8", "replace"), keep_blank_values=True)
        return {k: v[0] for k, v in parsed.items()}

    @staticmethod
    def check_csrf(expected: str | None, form: dict[str, str]) -> None:
        got = form.get("csrf", "")
        if not expected or not got or not hmac.compare_digest(expected.encode(), got.encode()):
            raise PageError(403, "This form failed its CSRF check: it expired, or it was sent from another "
                                 "site. Go back, reload the page and try again.")

    @staticmethod
    def secure(request: Request) -> bool:
        return request.url.scheme == "https"

    def start_session(self, request: Request, response: Response, token: str) -> Response:
        response.set_cookie(SESSION_COOKIE, token, max_age=accounts.SESSION_SECONDS, path="/", httponly=True,
                            samesite="lax", secure=self.secure(request))
        response.delete_cookie(LOGIN_CSRF_COOKIE, path="/")
        return response

    async def require(self, request: Request) -> accounts.Session | RedirectResponse:
        """The session, or a redirect to the sign-in page that comes back here."""
        s = await self.session(request)
        if s is not None:
            return s
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse("/login?" + urlencode({"next": target}), status_code=303, headers=_HEADERS)

    # -- sign in and out ---------------------------------------------------------------------------

    def login_page(self, request: Request, csrf: str, *, next_: str, name: str = "", error: str = "",
                   status: int = 200, headers: dict[str, str] | None = None) -> HTMLResponse:
        why = ""
        if next_.startswith("/authorize"):
            why = '<p class="note">Sign in to let the gradexp command line use your account.</p>'
        err = f'<p class="error" role="alert">{e(error)}</p>' if error else ""
        body = (f"{why}{err}<form method=\"post\" action=\"/login\">{csrf_field(csrf)}{_hidden({'next': next_})}"
                f'<label for="username">User name</label>'
                f'<input type="text" id="username" name="username" value="{e(name)}" autocomplete="username" '
                f"autofocus required>"
                f'<label for="password">Password</label>'
                f'<input type="password" id="password" name="password" autocomplete="current-password" required>'
                f"<div><button type=\"submit\">Sign in</button></div></form>"
                '<p class="muted">No password yet? An administrator sets one with <code>gradexp server '
                "set-password USER</code>. The embedded server prints a one-time sign-in link when it starts "
                "until its user <code>local</code> has a password.</p>")
        response = page("Sign in", body, status=status, headers=headers)
        response.set_cookie(LOGIN_CSRF_COOKIE, csrf, max_age=3600, path="/", httponly=True, samesite="lax",
                            secure=self.secure(request))
        return response

    async def get_login(self, request: Request) -> Response:
        next_ = _safe_next(request.query_params.get("next"))
        if await self.session(request) is not None:
            return RedirectResponse(next_, status_code=303)
        csrf = request.cookies.get(LOGIN_CSRF_COOKIE) or secrets.token_urlsafe(24)
        return self.login_page(request, csrf, next_=next_)

    async def post_login(self, request: Request) -> Response:
        form = await self.form(request)
        self.check_csrf(request.cookies.get(LOGIN_CSRF_COOKIE), form)
        csrf = secrets.token_urlsafe(24)  # a fresh one for the page that answers a failure
        name, password = form.get("username", "").strip(), form.get("password", "")
        next_ = _safe_next(form.get("next"))
        address = request.client.host if request.client else "unknown"
        try:
            uid = await run_in_threadpool(accounts.sign_in, self.engine, name, password, address)
        except accounts.RateLimited as exc:
            return self.login_page(request, csrf, next_=next_, name=name, error=str(exc), status=429,
                                   headers={"Retry-After": str(int(exc.retry_after + 0.999))})
        if uid is None:
            return self.login_page(request, csrf, next_=next_, name=name, status=401,
                                   error="Wrong user name or password.")
        token = await run_in_threadpool(accounts.new_session, self.engine, uid)
        return self.start_session(request, RedirectResponse(next_, status_code=303, headers=_HEADERS), token)

    async def get_signin_link(self, request: Request) -> Response:
        """``/login/link?token=...``: the one-time link the embedded server prints at first start.

        Opening it only shows a button: link previewers and mail scanners that fetch URLs
        must not use the link up (or sign themselves in)."""
        csrf = request.cookies.get(LOGIN_CSRF_COOKIE) or secrets.token_urlsafe(24)
        body = ('<p>This one-time link signs you in without a password, once.</p>'
                f'<form method="post" action="/login/link">{csrf_field(csrf)}'
                f'{_hidden({"token": request.query_params.get("token", "")})}'
                '<button type="submit">Sign in</button></form>')
        response = page("Sign in with a one-time link", body)
        response.set_cookie(LOGIN_CSRF_COOKIE, csrf, max_age=3600, path="/", httponly=True, samesite="lax",
                            secure=self.secure(request))
        return response

    async def signin_link(self, request: Request) -> Response:
        form = await self.form(request)
        self.check_csrf(request.cookies.get(LOGIN_CSRF_COOKIE), form)
        uid = await run_in_threadpool(accounts.use_signin_link, self.engine, form.get("token", ""))
        if uid is None:
            raise PageError(400, "This sign-in link is unknown, used or expired. Restart the embedded server "
                                 "for a new one, or run `gradexp server set-password USER`.")
        token = await run_in_threadpool(accounts.new_session, self.engine, uid)
        return self.start_session(request, RedirectResponse("/account?welcome=1", status_code=303,
                                                            headers=_HEADERS), token)

    async def logout(self, request: Request) -> Response:
        s = await self.session(request)
        form = await self.form(request)
        if s is not None:
            self.check_csrf(s.csrf, form)
            await run_in_threadpool(accounts.end_session, self.engine, s.id)
        response = RedirectResponse("/login", status_code=303, headers=_HEADERS)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    # -- account -----------------------------------------------------------------------------------

    async def get_account(self, request: Request, *, error: str = "", done: str = "") -> Response:
        s = await self.require(request)
        if isinstance(s, Response):
            return s
        has = await run_in_threadpool(accounts.has_password, self.engine, s.user)
        notes = ""
        if request.query_params.get("welcome") and not has:
            notes = ('<p class="note">You are signed in with a one-time link. Set a password to sign in '
                     "again later (the link works only once).</p>")
        if error:
            notes += f'<p class="error" role="alert">{e(error)}</p>'
        if done:
            notes += f'<p class="note" role="status">{e(done)}</p>'
        current = ('<label for="current">Current password</label>'
                   '<input type="password" id="current" name="current" autocomplete="current-password" required>'
                   if has else "")
        body = (f"<p>Signed in as <b>{e(s.user)}</b> (entity <b>{e(s.entity)}</b>).</p>{notes}"
                f"<h2>{'Change' if has else 'Set'} password</h2>"
                f'<form method="post" action="/account/password">{csrf_field(s.csrf)}{current}'
                f'<label for="new">New password (at least {accounts.MIN_PASSWORD} characters)</label>'
                f'<input type="password" id="new" name="new" autocomplete="new-password" required>'
                f'<label for="confirm">New password again</label>'
                f'<input type="password" id="confirm" name="confirm" autocomplete="new-password" required>'
                f"<div><button type=\"submit\">Save password</button></div></form>")
        return page("Account", body, viewer=s, status=400 if error else 200)

    async def post_password(self, request: Request) -> Response:
        s = await self.require(request)
        if isinstance(s, Response):
            return s
        form = await self.form(request)
        self.check_csrf(s.csrf, form)
        new, confirm = form.get("new", ""), form.get("confirm", "")

        address = request.client.host if request.client else "unknown"

        def work() -> str | int:
            if accounts.password_hash(self.engine, s.user_id) is not None:
                try:  # as a sign-in: wrong guesses count towards the same rate limit
                    if accounts.sign_in(self.engine, s.user, form.get("current", ""), address) is None:
                        return "The current password is wrong."
                except accounts.RateLimited as exc:
                    return str(exc)
            if new != confirm:
                return "The two new passwords differ."
            try:
                accounts.set_password(self.engine, s.user, new)  # ends every session of the user...
            except ValueError as exc:
                return str(exc)
            return s.user_id
        outcome = await run_in_threadpool(work)
        if isinstance(outcome, str):
            return await self.get_account(request, error=outcome)
        token = await run_in_threadpool(accounts.new_session, self.engine, outcome)  # ...but this one
        return self.start_session(request, RedirectResponse("/account?saved=1", status_code=303,
                                                            headers=_HEADERS), token)

    # -- API keys ----------------------------------------------------------------------------------

    async def get_keys(self, request: Request, *, new_key: str = "", new_name: str = "",
                       message: str = "") -> Response:
        s = await self.require(request)
        if isinstance(s, Response):
            return s
        keys = await run_in_threadpool(lambda: db.list_keys(self.engine, user_id=s.user_id))
        shown = ""
        if new_key:
            shown = (f'<div class="note" role="status"><p>New key <b>{e(new_name)}</b>. Copy it now: it is stored '
                     f'only as a hash and will not be shown again.</p><code class="key" id="new-key">{e(new_key)}'
                     f"</code></div>")
        if message:
            shown += f'<p class="note" role="status">{e(message)}</p>'
        rows = []
        for k in keys:
            if k.revoked_at is None:
                action = (f'<form class="inline" method="post" action="/keys/{k.id}/revoke">{csrf_field(s.csrf)}'
                          f'<button class="danger" aria-label="Revoke {e(k.name)}">Revoke</button></form>')
                state = "active"
            else:
                action, state = "", f"revoked {_when(k.revoked_at)}"
            rows.append(f'<tr data-key-id="{k.id}"><td>{e(k.name)}</td><td><code>{e(k.prefix)}…</code></td>'
                        f"<td>{_when(k.created_at)}</td><td>{_when(k.last_used_at)}</td><td>{e(state)}</td>"
                        f"<td>{action}</td></tr>")
        table = ("<table><thead><tr><th>Name</th><th>Key</th><th>Created</th><th>Last used</th><th>State</th>"
                 f"<th></th></tr></thead><tbody>{''.join(rows)}</tbody></table>" if rows
                 else '<p class="muted">No API keys yet.</p>')
        body = (f"{shown}<p>Runs authenticate with an API key: <code>gradexp login</code> creates one for you. "
                f"Revoke a key you no longer use, or one that leaked.</p>{table}"
                f'<h2>New key</h2><form method="post" action="/keys">{csrf_field(s.csrf)}'
                f'<label for="name">Name</label><input type="text" id="name" name="name" maxlength="128" '
                f'placeholder="e.g. cluster-a" required><div><button type="submit">Create key</button></div></form>')
        return page("API keys", body, viewer=s)

    async def post_key(self, request: Request) -> Response:
        s = await self.require(request)
        if isinstance(s, Response):
            return s
        form = await self.form(request)
        self.check_csrf(s.csrf, form)
        name = form.get("name", "").strip()[:128] or "unnamed"
        key = await run_in_threadpool(db.create_key, self.engine, s.user, name=name)
        return await self.get_keys(request, new_key=key, new_name=name)

    async def revoke_key(self, request: Request) -> Response:
        s = await self.require(request)
        if isinstance(s, Response):
            return s
        form = await self.form(request)
        self.check_csrf(s.csrf, form)
        key_id = request.path_params["key_id"]
        if not await run_in_threadpool(lambda: db.revoke_key(self.engine, key_id, user_id=s.user_id)):
            raise PageError(404, "No such active key of yours.")
        return RedirectResponse("/keys?revoked=1", status_code=303, headers=_HEADERS)

    # -- gradexp login: authorization ----------------------------------------------------------------

    @staticmethod
    def grant_request(params: Any) -> dict[str, str]:
        """The checked parameters of an authorization request; PageError says what is wrong.

        Checked before anything else, and answered with a page rather than a redirect:
        a bad ``redirect_uri`` must never receive anything (RFC 6749 section 4.1.2.1).
        """
        client_id = params.get("client_id", "")
        if client_id != CLIENT_ID:
            raise PageError(400, f"Unknown client {client_id!r}: only the gradexp command line "
                                 f"({CLIENT_ID!r}) can ask for access here.")
        redirect_uri = params.get("redirect_uri", "")
        client_name = (params.get("client_name", "") or "gradexp command line")[:100]
        if not redirect_uri:  # gradexp login --no-browser: the page shows a key to paste
            return {"client_id": client_id, "client_name": client_name, "redirect_uri": ""}
        if len(redirect_uri) > 400:
            raise PageError(400, "The redirect_uri is too long (at most 400 characters).")
        u = urlsplit(redirect_uri)
        try:
            port = u.port
        except ValueError:
            port = None
        if (u.scheme != "http" or u.hostname != "127.0.0.1" or not port or u.username or u.password
                or u.fragment or u.query):
            raise PageError(400, "The redirect_uri must be a loopback address of the form "
                                 "http://127.0.0.1:PORT/PATH (RFC 8252); this request is not from gradexp login.")
        if params.get("response_type") != "code":
            raise PageError(400, "response_type must be 'code'.")
        state = params.get("state", "")
        if not 16 <= len(state) <= 512:
            raise PageError(400, "The request has no usable 'state' (16 to 512 characters).")
        challenge = params.get("code_challenge", "")
        if params.get("code_challenge_method") != "S256" or not _CHALLENGE.match(challenge):
            raise PageError(400, "The request needs a PKCE code_challenge with code_challenge_method=S256.")
        return {"client_id": client_id, "client_name": client_name, "redirect_uri": redirect_uri,
                "response_type": "code", "state": state, "code_challenge": challenge,
                "code_challenge_method": "S256"}

    async def get_authorize(self, request: Request) -> Response:
        grant = self.grant_request(request.query_params)
        s = await self.require(request)
        if isinstance(s, Response):
            return s
        if grant["redirect_uri"]:
            where = (f"<p>It will receive a new API key for your account, through "
                     f"<code>{e(grant['redirect_uri'])}</code> on this computer.</p>")
        else:
            where = "<p>The next page shows a new API key for your account, to paste into the terminal.</p>"
        body = (f'<p class="note"><b id="client">{e(grant["client_name"])}</b> asks for access to your gradexp '
                f"account <b>{e(s.user)}</b>: to create runs and read them, as you.</p>{where}"
                f'<form method="post" action="/authorize">{csrf_field(s.csrf)}{_hidden(grant)}'
                f'<button type="submit" name="decision" value="allow">Authorize</button> '
                f'<button class="secondary" type="submit" name="decision" value="deny">Deny</button></form>'
                f'<p class="muted">Only authorize a login you just started yourself.</p>')
        return page("Authorize gradexp login", body, viewer=s)

    async def post_authorize(self, request: Request) -> Response:
        s = await self.session(request)
        form = await self.form(request)
        if s is None:
            raise PageError(401, "You are not signed in any more. Run gradexp login again.")
        self.check_csrf(s.csrf, form)
        grant = self.grant_request(form)
        allow = form.get("decision") == "allow"
        if not grant["redirect_uri"]:
            if not allow:
                return page("Access denied", "<p>No key was created. You can close this tab.</p>", viewer=s)
            key, _, _ = await run_in_threadpool(accounts.key_for_user, self.engine, s.user_id,
                                                name=grant["client_name"])
            body = ('<p>Copy this key and paste it at the <code>API key:</code> prompt of '
                    f'<code>gradexp login</code>. It is shown only once.</p><code class="key" id="api-key">{e(key)}'
                    "</code>")
            return page("Your API key", body, viewer=s)
        if not allow:
            query = {"error": "access_denied", "state": grant["state"]}
        else:
            code = await run_in_threadpool(lambda: accounts.new_code(
                self.engine, s.user_id, client=grant["client_name"], redirect_uri=grant["redirect_uri"],
                challenge=grant["code_challenge"]))
            query = {"code": code, "state": grant["state"]}
        return RedirectResponse(grant["redirect_uri"] + "?" + urlencode(query), status_code=303, headers=_HEADERS)

    async def token(self, request: Request) -> Response:
        """``POST /api/v1/oauth/token``: an authorization code and its PKCE verifier for an API key."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        try:
            if ctype == "application/json":
                data = json.loads(await self.body(request))
                if not isinstance(data, dict):
                    raise ValueError
                form = {k: str(v) for k, v in data.items()}
            else:
                form = await self.form(request)
        except (ValueError, PageError):
            return _oauth_error("invalid_request", "send a form or a JSON object (at most 64 KiB)")
        if form.get("grant_type") != "authorization_code":
            return _oauth_error("unsupported_grant_type", "grant_type must be authorization_code")
        if form.get("client_id") != CLIENT_ID:
            return _oauth_error("invalid_client", f"unknown client {form.get('client_id')!r}")
        verifier = form.get("code_verifier", "")
        if not _VERIFIER.match(verifier):
            return _oauth_error("invalid_request", "code_verifier must be 43 to 128 characters of [A-Za-z0-9-._~]")

        def work() -> tuple[str, str, str]:
            uid, client, code_id = accounts.redeem_code(self.engine, form.get("code", ""), verifier,
                                                        form.get("redirect_uri", ""))
            return accounts.key_for_user(self.engine, uid, name=client, code_id=code_id)
        try:
            key, user, entity = await run_in_threadpool(work)
        except accounts.BadGrant as exc:
            return _oauth_error("invalid_grant", str(exc))
        return JSONResponse({"api_key": key, "token_type": "bearer", "user": user, "entity": entity},
                            headers={"Cache-Control": "no-store", "Pragma": "no-cache"})


def _oauth_error(code: str, description: str) -> JSONResponse:
    return JSONResponse({"error": code, "error_description": description}, status_code=400,
                        headers={"Cache-Control": "no-store"})


def _page_handler(fn: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    async def wrapped(request: Request) -> Response:
        try:
            return await fn(request)
        except PageError as exc:
            return page("Something is wrong", f'<p class="error" role="alert">{e(exc.message)}</p>',
                        status=exc.status, headers=exc.headers)
        except sa.exc.OperationalError:  # database busy or briefly away
            return page("Try again", '<p class="error" role="alert">The database is unavailable for a moment. '
                        "Reload the page to try again.</p>", status=503, headers={"Retry-After": "1"})
    return wrapped


def routes(engine: Any) -> list[Route]:
    w = Web(engine)
    return [
        Route("/login", _page_handler(w.get_login), methods=["GET"]),
        Route("/login", _page_handler(w.post_login), methods=["POST"]),
        Route("/login/link", _page_handler(w.get_signin_link), methods=["GET"]),
        Route("/login/link", _page_handler(w.signin_link), methods=["POST"]),
        Route("/logout", _page_handler(w.logout), methods=["POST"]),
        Route("/account", _page_handler(lambda r: w.get_account(
            r, done="Password saved." if r.query_params.get("saved") else "")), methods=["GET"]),
        Route("/account/password", _page_handler(w.post_password), methods=["POST"]),
        Route("/keys", _page_handler(lambda r: w.get_keys(
            r, message="Key revoked." if r.query_params.get("revoked") else "")), methods=["GET"]),
        Route("/keys", _page_handler(w.post_key), methods=["POST"]),
        Route("/keys/{key_id:int}/revoke", _page_handler(w.revoke_key), methods=["POST"]),
        Route("/authorize", _page_handler(w.get_authorize), methods=["GET"]),
        Route("/authorize", _page_handler(w.post_authorize), methods=["POST"]),
        Route("/api/v1/oauth/token", w.token, methods=["POST"]),
    ]
