"""What the explorer's endpoints answer with, shared by every route module (``app``, and the
tensor and distribution views): the security headers, JSON with non-finite numbers spelt
out, Arrow IPC streams, and one error convention.

Route modules return ``list[BaseRoute]`` with paths relative to ``/_x`` (the data routes are
mounted there, behind gzip): a run's endpoints start with :data:`RUN_API`.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Any

import pyarrow as pa
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .. import _arrow
from .context import AccessDenied

__all__ = ["ARROW_STREAM", "CONTENT_SECURITY_POLICY", "HEADERS", "RUN_API", "ApiError", "api", "arrow_response",
           "finite_json", "json_response"]

RUN_API = "/api/runs/{entity}/{project}/{run_id}"
"""A run's data endpoints, under ``/_x`` (``Explorer.run`` takes these path parameters)."""
ARROW_STREAM = "application/vnd.apache.arrow.stream"
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
                           "connect-src 'self'; font-src 'self'; worker-src 'self' blob:; base-uri 'none'; "
                           "form-action 'self'; frame-ancestors 'none'")
HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class ApiError(Exception):
    """Ends an API request with a JSON ``{"error": message}`` and ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def finite_json(value: Any) -> Any:
    """``value`` with non-finite floats as the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"``
    (JSON has no token for them; a loss that went NaN must still show)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {str(k): finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def json_response(content: Any, status: int = 200) -> JSONResponse:
    """JSON for the pages: non-finite floats as strings (see :func:`finite_json`)."""
    return JSONResponse(finite_json(content), status_code=status, headers={**HEADERS, "Cache-Control": "no-store"})


def arrow_response(table: pa.Table) -> Response:
    """``table`` as an Arrow IPC stream (compressed on the way by the mount's gzip)."""
    return Response(_arrow.table_ipc(table).to_pybytes(), media_type=ARROW_STREAM,
                    headers={**HEADERS, "Cache-Control": "no-store"})


def api(fn: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """An API endpoint: errors as JSON with their status (a run the viewer may not see is a
    404, exactly as one that does not exist)."""
    async def wrapped(request: Request) -> Response:
        try:
            return await fn(request)
        except AccessDenied as e:
            return json_response({"error": e.message}, e.status)
        except ApiError as e:
            return json_response({"error": e.message}, e.status)
        except LookupError as e:
            return json_response({"error": str(e.args[0]) if e.args else "not found"}, 404)
        except PermissionError as e:
            return json_response({"error": str(e)}, 403)
        except ValueError as e:
            return json_response({"error": str(e)}, 400)
    return wrapped
