"""HTTP client for the server API: one ``requests.Session``, retries with backoff.

Transient failures (connection errors, timeouts, 429, 5xx) are retried with
exponential backoff and full jitter, honouring ``Retry-After``, until ``deadline``
(or forever when there is none: the sender outlives server outages). Other
failures raise :class:`gradexp.ApiError` at once.
"""

from __future__ import annotations

import random
import threading
import time
from typing import Any

import requests

from ._errors import ApiError
from ._version import __version__

_RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


class Client:
    def __init__(self, host: str, api_key: str, *, timeout: float = 60.0) -> None:
        if not host:
            raise ValueError("no server: set GRADEXP_HOST or pass host=")
        if not api_key:
            raise ValueError(f"no API key for {host}: set GRADEXP_API_KEY or pass api_key=")
        self.host = host.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {api_key}"
        self.session.headers["User-Agent"] = f"gradexp/{__version__}"
        self.stop = threading.Event()
        """Set to make a waiting retry give up (the caller is shutting down)."""

    def request(self, method: str, path: str, *, deadline: float | None = None, retry: bool = True,
                **kw: Any) -> requests.Response:
        """Send, retrying transient failures; raise ApiError for a final 4xx/5xx answer."""
        url = f"{self.host}/api/v1{path}"
        attempt = 0
        while True:
            wait: float | None = None
            try:
                r = self.session.request(method, url, timeout=self.timeout, **kw)
            except (requests.ConnectionError, requests.Timeout) as e:
                error: Exception = e
            else:
                if r.status_code < 400:
                    return r
                error = ApiError(r.status_code, _message(r), url)
                if r.status_code not in _RETRY_STATUS:
                    raise error
                wait = _retry_after(r)
            if not retry:
                raise error
            attempt += 1
            if wait is None:
                wait = min(30.0, 0.25 * 2 ** min(attempt, 10)) * random.uniform(0.5, 1.0)
            if deadline is not None and time.monotonic() + wait > deadline:
                raise error
            if self.stop.wait(wait):
                raise error

    def json(self, method: str, path: str, **kw: Any) -> Any:
        return self.request(method, path, **kw).json()


def _message(r: requests.Response) -> str:
    try:
        return str(r.json().get("error") or r.text)
    except ValueError:
        return r.text[:500]


def _retry_after(r: requests.Response) -> float | None:
    value = r.headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, min(float(value), 300.0))
    except ValueError:
        return None
