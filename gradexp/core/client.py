"""HTTP client for the server API: one ``requests.Session``, retries with backoff.

Transient failures (connection errors, timeouts, 429, 5xx) are retried with
exponential backoff and jitter, honouring ``Retry-After`` (in seconds or as an
HTTP date), until ``deadline`` or ``attempts`` run out (or forever when neither is
given: the sender outlives server outages). Other failures raise
:class:`gradexp.ApiError` at once. The retry policy (which answers, how long to wait,
how many attempts) is urllib3's :class:`~urllib3.util.Retry`.

JSON bodies are sent with the tokens ``NaN``, ``Infinity`` and ``-Infinity`` for
non-finite floats (what Python's ``json`` writes): a loss that went NaN is data.
The transport is ``requests``' adapter interface: pass ``transport=`` to send
through another one (tests use an in-process fake server).
"""

from __future__ import annotations

import json as _json
import random
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import requests
from requests.adapters import BaseAdapter
from urllib3 import HTTPResponse
from urllib3.exceptions import InvalidHeader, MaxRetryError
from urllib3.util import Retry

from gradexp._version import __version__
from gradexp.core.errors import ApiError

_RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
MAX_WAIT = 30.0
"""Longest backoff between two attempts (a ``Retry-After`` may ask for up to 300 s)."""
MAX_RETRY_AFTER = 300
"""Longest wait a ``Retry-After`` gets (seconds)."""
RETRY_LOG_EVERY = 10.0
"""Seconds between two retry lines of one client (the ones between are counted, not shown)."""


TRANSPORT_ERRORS = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)
"""Failures of the connection, retried like 5xx answers. ChunkedEncodingError: the connection
broke inside the answer's body (the request may have been done: every request here is safe
to repeat)."""


class _Policy(Retry):
    """urllib3's Retry with full jitter: each wait is drawn between half and all of the
    exponential step (urllib3 adds its jitter on top of the step, and skips the first wait),
    so clients that failed together do not come back together."""

    RETRY_AFTER_STATUS_CODES = _RETRY_STATUS  # a Retry-After alone makes no other answer retried

    def get_backoff_time(self) -> float:
        step = min(self.backoff_max, self.backoff_factor * 2 ** min(len(self.history), 10))
        return step * random.uniform(0.5, 1.0)


POLICY = _Policy(total=None, connect=None, read=None, status=None, other=None, allowed_methods=None,
                 status_forcelist=_RETRY_STATUS, backoff_factor=0.25, backoff_max=MAX_WAIT,
                 retry_after_max=MAX_RETRY_AFTER, respect_retry_after_header=True, raise_on_status=False)
"""Which answers are retried and how long to wait before the next attempt. Every request of
the client is safe to repeat (``allowed_methods=None``: all methods)."""


class Client:
    def __init__(self, host: str, api_key: str, *, timeout: float = 60.0, transport: BaseAdapter | None = None,
                 on_retry: Callable[[str], None] | None = None) -> None:
        if not host:
            raise ValueError("no server: set GRADEXP_HOST or pass host=")
        if not api_key:
            raise ValueError(f"no API key for {host}: set GRADEXP_API_KEY or pass api_key=")
        self.host = host.rstrip("/")
        self.timeout = timeout
        self.transport = transport
        self.session = requests.Session()
        if transport is not None:
            self.session.mount("http://", transport)
            self.session.mount("https://", transport)
        self.session.headers["Authorization"] = f"Bearer {api_key}"
        self.session.headers["User-Agent"] = f"gradexp/{__version__}"
        self.stop = threading.Event()
        """Set to make a waiting retry give up (the caller is shutting down)."""
        self.on_retry = on_retry
        """Called with one line per retry (at most one per RETRY_LOG_EVERY s): the sender's log."""
        self._retry_lock = threading.Lock()
        self._retry_shown = -RETRY_LOG_EVERY
        self._retry_hidden = 0

    def clone(self) -> Client:
        """Another client (own connection) to the same server with the same key and hooks."""
        other = Client(self.host, str(self.session.headers["Authorization"])[7:], timeout=self.timeout,
                       transport=self.transport, on_retry=self.on_retry)
        other.stop = self.stop
        return other

    def request(self, method: str, path: str, *, deadline: float | None = None, attempts: int | None = None,
                retry: bool = True, json: Any = None, **kw: Any) -> requests.Response:
        """Send, retrying transient failures; raise ApiError for a final 4xx/5xx answer.

        ``deadline`` (a ``time.monotonic()`` value) and ``attempts`` bound the retries, and
        the deadline each attempt's socket timeout too; the last failure is raised when
        either runs out. ``retry=False`` is one attempt.
        """
        url = f"{self.host}/api/v1{path}"
        if json is not None:
            kw["data"] = _json.dumps(json, allow_nan=True).encode()
            kw["headers"] = {**kw.get("headers", {}), "Content-Type": "application/json"}
        # The policy is urllib3's Retry, but the loop is here rather than in an HTTPAdapter
        # mounted with max_retries=POLICY: urllib3 keeps one socket timeout for all the attempts
        # of a request, where the deadline must shorten each one (a host that never answers
        # would hold `gradexp sync` for attempts x 60 s); urllib3 sleeps in time.sleep, where a
        # stopping sender must end a wait of up to MAX_RETRY_AFTER s at once (stop.wait); each
        # retry is logged for the sender's log; and the transport seam (Client(transport=...),
        # the in-process fakes of tests/test_sender.py) is a requests adapter, which replaces
        # the HTTPAdapter a mounted Retry would live in.
        policy = POLICY.new(total=None if attempts is None else attempts - 1) if retry else POLICY.new(total=0)
        while True:
            timeout = self.timeout
            if deadline is not None:  # no single wait past the deadline (a host that never answers)
                timeout = max(1.0, min(timeout, deadline - time.monotonic()))
            answer: HTTPResponse | None = None
            try:
                r = self.session.request(method, url, timeout=timeout, **kw)
            except TRANSPORT_ERRORS as e:
                error: Exception = e
                what = type(e).__name__
            else:
                if r.status_code < 400:
                    return r
                error = ApiError(r.status_code, _message(r), url)
                if not policy.is_retry(method, r.status_code):
                    raise error
                answer = HTTPResponse(headers=dict(r.headers), status=r.status_code)
                what = f"{r.status_code} {r.reason or ''}".strip()
            try:
                policy = policy.increment(method, url, response=answer, error=None if answer else error)
            except MaxRetryError:
                raise error from None
            wait = _retry_after(policy, answer)
            if wait is None:
                wait = policy.get_backoff_time()
            if deadline is not None and time.monotonic() + wait > deadline:
                raise error
            self._log_retry(f"{what} from {method} {_safe_url(url)}; retry {len(policy.history)} in {wait:.1f} s")
            if self.stop.wait(wait):
                raise error

    def _log_retry(self, line: str) -> None:
        if self.on_retry is None:
            return
        with self._retry_lock:
            now = time.monotonic()
            if now - self._retry_shown < RETRY_LOG_EVERY:
                self._retry_hidden += 1
                return
            hidden, self._retry_hidden, self._retry_shown = self._retry_hidden, 0, now
        self.on_retry(line + (f" ({hidden} more retries since the last line)" if hidden else ""))

    def json(self, method: str, path: str, **kw: Any) -> Any:
        return self.request(method, path, **kw).json()


def _safe_url(url: str) -> str:
    """The URL without user info or query (where secrets could be)."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


def _message(r: requests.Response) -> str:
    try:
        return str(r.json().get("error") or r.text)
    except (ValueError, AttributeError):
        return r.text[:500]


def _retry_after(policy: Retry, answer: HTTPResponse | None) -> float | None:
    """The answer's ``Retry-After`` in seconds (RFC 9110: delay-seconds or an HTTP date), at
    most MAX_RETRY_AFTER; None without one, or with one that is neither."""
    if answer is None:
        return None
    try:
        return policy.get_retry_after(answer)
    except InvalidHeader:
        return None
