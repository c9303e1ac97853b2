"""A fault-injecting HTTP/1.1 proxy on loopback, for the network-fault tests.

It sits between gradexp's client and a real server and forwards one request per
client connection: it reads the request (headers and ``Content-Length`` body), sends
it upstream on a fresh connection with ``Connection: close``, relays the whole answer
and closes, so the client's keep-alive connections never hide a request boundary.
On a seeded schedule it injects, instead of forwarding:

- ``refused``: the accepted connection is reset and the listening socket is closed
  for a moment (new connections are refused), then opened again on the same port;
- ``reset_request``: a reset in the middle of the request body (the server never sees it);
- ``reset_response``: the request reaches the server, the answer is cut by a reset,
  alternately inside its head and inside its body (the server did the work; the
  client does not know);
- ``stall``: the answer is held for several seconds, then delivered;
- ``http_500``, ``http_502``, ``http_503``, ``http_429`` synthetic answers; 503 and 429
  carry ``Retry-After``, in turn as an HTTP date and in seconds (``retry_after_forms``).

``kinds`` narrows the faults to some kinds; ``only`` to one request for each of its
strings (the first whose request line holds it); requests whose line holds a string of
``exempt`` are never faulted. Bounded: at most ``max_faults`` faults (then it only
forwards), every socket has a timeout, and after ``lifetime`` seconds it stops by
itself. ``counts`` says what was injected, ``requests`` how many requests were seen
(``seen``: their request lines; ``faulted``: which got which fault).
"""

from __future__ import annotations

import email.utils
import random
import socket
import struct
import threading
import time
from collections import Counter

HOST = "127.0.0.1"
KINDS = ("refused", "reset_request", "reset_response", "stall", "http_500", "http_502", "http_503", "http_429")
SOCKET_TIMEOUT = 120.0
"""Longest wait for one read or write (an upstream /finish may take a while on a busy machine)."""


class FaultProxy:
    def __init__(self, upstream_port: int, *, seed: int, rate: float = 0.3, max_faults: int = 200,
                 lifetime: float = 600.0, refuse_for: float = 1.0, stall_for: float = 3.0,
                 retry_after: int = 1, retry_after_forms: tuple[str, ...] = ("date", "seconds"),
                 kinds: tuple[str, ...] = KINDS, only: tuple[str, ...] | None = None,
                 exempt: tuple[str, ...] = ()) -> None:
        assert kinds and set(kinds) <= set(KINDS), kinds
        self.upstream = (HOST, upstream_port)
        self.kinds = kinds
        self._only = None if only is None else list(only)
        self._exempt = exempt
        self.rng = random.Random(seed)
        self.rate = rate
        self.max_faults = max_faults
        self.refuse_for = refuse_for
        self.stall_for = stall_for
        self.retry_after = retry_after
        self.counts: Counter[str] = Counter()
        self.requests = 0
        self.seen: list[str] = []
        """Every request line, in the order they came."""
        self.faulted: list[tuple[str, str]] = []
        """(kind, request line) of every fault."""
        self.upstream_down = 0
        """Requests answered with a reset because the real server was down (not injected)."""
        self._order: list[str] = []
        self._forms = retry_after_forms
        self._answers = 0
        self._cut_body = False
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._deadline = time.monotonic() + lifetime
        self.listener = self._listen(0)
        self.port = self.listener.getsockname()[1]
        self.url = f"http://{HOST}:{self.port}"
        self._thread = threading.Thread(target=self._accept_loop, name="faultproxy", daemon=True)
        self._thread.start()

    # -- the schedule ------------------------------------------------------------------------------

    def _next_fault(self, head: bytes) -> str | None:
        """The fault for the next request, or None: every kind in turn (shuffled rounds)."""
        with self._lock:
            self.requests += 1
            self.seen.append(head.split(b"\r\n", 1)[0].decode("latin-1"))
            if any(s in self.seen[-1] for s in self._exempt):
                return None
            if sum(self.counts.values()) >= self.max_faults or self.rng.random() >= self.rate:
                return None
            if self._only is not None:
                match = [s for s in self._only if s in self.seen[-1]]
                if not match:
                    return None
                self._only.remove(match[0])
            if not self._order:
                self._order = list(self.kinds)
                self.rng.shuffle(self._order)
            kind = self._order.pop()
            self.counts[kind] += 1
            self.faulted.append((kind, self.seen[-1]))
            return kind

    def _retry_after_value(self) -> str:
        with self._lock:
            form = self._forms[self._answers % len(self._forms)]
            self._answers += 1
        if form == "date":  # one second more: an HTTP date has whole seconds
            return email.utils.formatdate(time.time() + self.retry_after + 1, usegmt=True)
        return str(self.retry_after)

    # -- sockets -------------------------------------------------------------------------------

    @staticmethod
    def _listen(port: int) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((HOST, port))
        s.listen(64)
        s.settimeout(0.2)
        return s

    def _accept_loop(self) -> None:
        while not self._stopped.is_set() and time.monotonic() < self._deadline:
            try:
                conn, _ = self.listener.accept()
            except (TimeoutError, BlockingIOError):
                continue
            except OSError:  # closed for a refusal: it is open again in a moment
                if self._stopped.is_set():
                    return
                time.sleep(0.05)
                continue
            conn.settimeout(SOCKET_TIMEOUT)
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()
        self.listener.close()

    def _refuse_for_a_while(self) -> None:
        """Close the listening socket (connections are refused), then listen again on the port."""
        with self._lock:
            self.listener.close()
            time.sleep(self.refuse_for)
            deadline = time.monotonic() + 30
            while True:
                try:
                    self.listener = self._listen(self.port)
                    return
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(10)
        self.listener.close()

    # -- one request ---------------------------------------------------------------------------

    def _handle(self, conn: socket.socket) -> None:
        try:
            head, body_start = _read_head(conn)
            if head is None:  # the client closed an idle keep-alive connection
                conn.close()
                return
            fault = self._next_fault(head)
            length = _content_length(head)
            if fault == "refused":
                _reset(conn)
                self._refuse_for_a_while()
                return
            if fault == "reset_request":
                if length > 1:  # cut inside the body: read some of it, then reset
                    _read_exact(conn, body_start, max(1, length // 2))
                _reset(conn)
                return
            body = _read_exact(conn, body_start, length)
            if fault is not None and fault.startswith("http_"):
                conn.sendall(self._synthetic(int(fault[5:])))
                conn.close()
                return
            try:
                answer = self._forward(head, body)
            except OSError:  # the real server is down (killed by the test): as it would look
                with self._lock:
                    self.upstream_down += 1
                _reset(conn)
                return
            if fault == "reset_response":
                conn.sendall(answer[: self._cut(answer)])
                _reset(conn)
                return
            if fault == "stall":
                time.sleep(self.stall_for)
            conn.sendall(answer)
            conn.close()
        except OSError:
            conn.close()

    def _cut(self, answer: bytes) -> int:
        """Where to cut an answer: alternately inside its head and inside its body."""
        with self._lock:
            self._cut_body = not self._cut_body
            in_body = self._cut_body
        head_end = answer.find(b"\r\n\r\n") + 4
        if in_body and len(answer) - head_end > 1:
            return head_end + (len(answer) - head_end) // 2
        return head_end // 2

    def _synthetic(self, status: int) -> bytes:
        reason = {500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable",
                  429: "Too Many Requests"}[status]
        body = b'{"error": "injected by the fault proxy"}'
        headers = [f"HTTP/1.1 {status} {reason}", "Content-Type: application/json",
                   f"Content-Length: {len(body)}", "Connection: close"]
        if status in (429, 503):
            headers.append(f"Retry-After: {self._retry_after_value()}")
        return ("\r\n".join(headers) + "\r\n\r\n").encode() + body

    def _forward(self, head: bytes, body: bytes) -> bytes:
        lines = head.split(b"\r\n")
        kept = [line for line in lines[1:] if line and not line.lower().startswith(b"connection:")]
        request = b"\r\n".join([lines[0], *kept, b"Connection: close", b"", b""]) + body
        with socket.create_connection(self.upstream, timeout=SOCKET_TIMEOUT) as up:
            up.sendall(request)
            chunks = []
            while True:
                chunk = up.recv(1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
        answer = b"".join(chunks)
        if not answer:
            raise ConnectionResetError("empty answer from the server")
        return answer


def _reset(conn: socket.socket) -> None:
    """Close with a TCP RST (linger 0), not a FIN."""
    try:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        conn.close()


def _read_head(conn: socket.socket) -> tuple[bytes | None, bytes]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = conn.recv(1 << 16)
        if not chunk:
            return None, b""
        buf += chunk
        if len(buf) > 1 << 20:
            raise ConnectionError("request head over 1 MiB")
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head, rest


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
        if name.strip().lower() == b"transfer-encoding":
            raise ConnectionError("chunked request bodies are not supported by the fault proxy")
    return 0


def _read_exact(conn: socket.socket, have: bytes, n: int) -> bytes:
    parts = [have]
    got = len(have)
    while got < n:
        chunk = conn.recv(min(1 << 16, n - got))
        if not chunk:
            raise ConnectionError("the client closed mid-body")
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)[:n] if n else b""
