"""``gradexp ui``: the explorer over local run folders, read-only, for one user on this machine.

It binds the loopback address and admits a browser that presents the token printed with
the URL (as Jupyter does): ``/?token=T`` sets a cookie and redirects to the same address
without the token, so it never stays in the address bar, history or a Referer. A request
with neither answers 403. The cookie's name carries a hash of the token, so two ``gradexp ui``
on one host (cookies ignore ports) do not evict each other.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from urllib.parse import urlencode

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from .app import explorer_routes
from .catalog import LOCAL_ENTITY, LocalCatalog
from .context import AccessDenied, Explorer, Viewer
from .responses import HEADERS

__all__ = ["create_ui_app", "new_token"]


def new_token() -> str:
    return secrets.token_urlsafe(24)


def cookie_name(token: str) -> str:
    return "gx_ui_" + hashlib.sha256(token.encode()).hexdigest()[:12]


class TokenGate:
    """ASGI middleware: every request needs the token, as ``?token=`` once or as the cookie."""

    def __init__(self, app: ASGIApp, *, token: str) -> None:
        self.app = app
        self.token = token
        self.cookie = cookie_name(token)

    def _ok(self, value: str | None) -> bool:
        return bool(value) and hmac.compare_digest(value.encode(), self.token.encode())  # type: ignore[union-attr]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        if self._ok(request.cookies.get(self.cookie)):
            await self.app(scope, receive, send)
            return
        given = request.query_params.get("token")
        response: Response
        if self._ok(given) and request.method == "GET":
            rest = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
            target = request.url.path + (f"?{urlencode(rest)}" if rest else "")
            response = RedirectResponse(target, status_code=303, headers={**HEADERS, "Cache-Control": "no-store"})
            response.set_cookie(self.cookie, self.token, httponly=True, samesite="strict", path="/")
        else:
            response = PlainTextResponse(
                "403: open the address `gradexp ui` printed (it carries a token), or restart it for a new one.\n",
                status_code=403, headers={**HEADERS, "Cache-Control": "no-store"})
        await response(scope, receive, send)


def create_ui_app(dir: str | os.PathLike[str], *, token: str) -> Starlette:
    """The explorer over the run folders under ``dir``, guarded by ``token``."""

    async def authenticate(request: Request) -> Viewer:
        if request.cookies.get(cookie_name(token)) != token:  # TokenGate let nobody else in
            raise AccessDenied(403, "no valid token")
        return Viewer(user=LOCAL_ENTITY, entity=LOCAL_ENTITY)

    explorer = Explorer(LocalCatalog(dir), authenticate=authenticate, title="gradexp ui")
    app = Starlette(routes=explorer_routes(explorer))
    app.add_middleware(TokenGate, token=token)
    app.state.explorer = explorer
    return app
