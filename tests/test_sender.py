"""The client's retries and the uploader, without a server: an in-process fake behind
requests' transport interface (``Client(transport=...)``) and a fake clock.

What is promised: transient failures (connection errors, 429, 5xx) are retried with
jittered exponential backoff, ``Retry-After`` is honoured in both of its forms, a
deadline or an attempt bound ends the retries without waiting past it, final 4xx
answers are raised at once, every retry is logged (rate-limited, no secrets), JSON
bodies carry NaN and ±Infinity, and parts go up history first, in seq order.
"""

from __future__ import annotations

import email.utils
import http.server
import json
import math
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
import urllib3.util.retry
from requests.adapters import BaseAdapter
from requests.structures import CaseInsensitiveDict

import gradexp
from gradexp.core import client as _client
from gradexp.core import format as _format
from gradexp.core.client import Client
from gradexp.core.errors import ApiError
from gradexp.sync import sender as _service
from gradexp.sync.sender import DONE_MARK, UPLOADED_LOG, Uploader
from services import clean_env, values

HOST = "http://upload.test"

Answer = tuple[int, dict[str, str], Any]


class FakeServer(BaseAdapter):
    """requests' transport interface, answered in process: first from ``script`` (answers or
    exceptions, in turn), then by ``handler``. Records every request; thread-safe."""

    def __init__(self, handler: Callable[[requests.PreparedRequest], Answer] | None = None) -> None:
        super().__init__()
        self.script: list[Answer | Exception] = []
        self.handler = handler or (lambda request: (200, {}, {}))
        self.requests: list[requests.PreparedRequest] = []
        self._lock = threading.Lock()

    def send(self, request: requests.PreparedRequest, **kw: Any) -> requests.Response:
        with self._lock:
            self.requests.append(request)
            item = self.script.pop(0) if self.script else None
        if isinstance(item, Exception):
            raise item
        status, headers, body = item if item is not None else self.handler(request)
        r = requests.Response()
        r.status_code = status
        r.reason = {200: "OK", 201: "Created", 429: "Too Many Requests", 500: "Internal Server Error",
                    502: "Bad Gateway", 503: "Service Unavailable"}.get(status, "")
        r.headers = CaseInsensitiveDict(headers)
        r._content = body if isinstance(body, bytes) else json.dumps(body).encode()
        r.url = request.url or ""
        r.request = request
        return r

    def close(self) -> None:
        pass


class Clock:
    """Stands in for the ``time`` module of the client and of urllib3's Retry, and for the
    client's stop event: waiting advances the clock instead of sleeping, and every wait is
    recorded."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.waits: list[float] = []
        self.stopped = False

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now + 1.7e9

    def wait(self, seconds: float) -> bool:
        self.waits.append(seconds)
        self.now += seconds
        return self.stopped

    def is_set(self) -> bool:
        return self.stopped


@pytest.fixture
def clock(monkeypatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(_client, "time", c)
    monkeypatch.setattr(urllib3.util.retry, "time", c)  # urllib3's Retry reads a Retry-After date with it
    return c


def make_client(clock: Clock, fake: FakeServer, **kw: Any) -> Client:
    c = Client(kw.pop("host", HOST), "gx_secret_key", transport=fake, **kw)
    c.stop = clock  # type: ignore[assignment]
    return c


def error(status: int, headers: dict[str, str] | None = None) -> Answer:
    return status, headers or {}, {"error": f"status {status}"}


# -- retries -----------------------------------------------------------------------------------------

def test_429_waits_the_retry_after_seconds(clock):
    fake = FakeServer()
    fake.script = [error(429, {"Retry-After": "7"}), (200, {}, {"ok": True})]
    assert make_client(clock, fake).json("GET", "/viewer") == {"ok": True}
    assert clock.waits == [7.0] and len(fake.requests) == 2


def test_503_waits_until_the_retry_after_http_date(clock):
    fake = FakeServer()
    when = email.utils.formatdate(clock.time() + 120, usegmt=True)  # "Tue, 01 Dec 2026 05:00:00 GMT"
    fake.script = [error(503, {"Retry-After": when}), (200, {}, {})]
    make_client(clock, fake).request("GET", "/viewer")
    assert len(clock.waits) == 1 and 119 <= clock.waits[0] <= 120, clock.waits


def test_a_retry_after_date_in_the_past_retries_at_once(clock):
    fake = FakeServer()
    fake.script = [error(503, {"Retry-After": email.utils.formatdate(clock.time() - 60, usegmt=True)}),
                   (200, {}, {})]
    make_client(clock, fake).request("GET", "/viewer")
    assert clock.waits == [0.0]


def test_5xx_backs_off_exponentially_with_jitter_up_to_a_cap(clock):
    fake = FakeServer()
    fake.script = [error(s) for s in (500, 502, 503, 504, 500, 502, 503, 504, 500, 500, 500)] + [(200, {}, {})]
    make_client(clock, fake).request("PUT", "/runs/a/b/c", json={})
    assert len(clock.waits) == 11 and len(fake.requests) == 12
    for attempt, wait in enumerate(clock.waits, 1):
        cap = min(_client.MAX_WAIT, 0.25 * 2 ** attempt)
        assert cap / 2 <= wait <= cap, (attempt, wait)
    assert clock.waits[-1] <= _client.MAX_WAIT
    assert len(set(clock.waits)) == len(clock.waits)  # jittered: no two clients retry in step


def test_connection_errors_and_timeouts_are_retried(clock):
    fake = FakeServer()
    fake.script = [requests.ConnectionError("refused"), requests.ConnectTimeout("slow"),
                   requests.ReadTimeout("stalled"), (201, {}, {"sha256": "x"})]
    r = make_client(clock, fake).request("PUT", "/runs/a/b/c/parts/history/0", data=b"x")
    assert r.status_code == 201 and len(clock.waits) == 3


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 413])
def test_final_answers_are_raised_at_once(clock, status):
    fake = FakeServer()
    fake.script = [error(status)]
    with pytest.raises(ApiError) as e:
        make_client(clock, fake).request("GET", "/viewer")
    assert e.value.status == status and f"status {status}" in str(e.value)
    assert len(fake.requests) == 1 and clock.waits == []


def test_the_deadline_ends_retries_without_waiting_past_it(clock):
    fake = FakeServer(lambda request: error(503))
    start = clock.now
    with pytest.raises(ApiError) as e:
        make_client(clock, fake).request("GET", "/viewer", deadline=start + 20)
    assert e.value.status == 503
    assert clock.now <= start + 20 and sum(clock.waits) <= 20
    assert len(fake.requests) >= 4  # it did retry, until the next wait would pass the deadline


def test_the_deadline_bounds_each_attempts_socket_timeout(clock):
    """A host that never answers: each attempt waits at most until the deadline (at least
    1 s), not the client's 60 s timeout, so `gradexp sync`'s first request gives up in time."""
    timeouts: list[float] = []

    class Silent(FakeServer):
        def send(self, request: requests.PreparedRequest, **kw: Any) -> requests.Response:
            timeouts.append(kw["timeout"])
            clock.now += kw["timeout"]  # the socket waited that long for nothing
            raise requests.Timeout("no answer")

    start = clock.now
    with pytest.raises(requests.Timeout):
        make_client(clock, Silent()).request("GET", "/viewer", deadline=start + 30)
    assert timeouts[0] == 30 and all(1.0 <= t <= 30 for t in timeouts), timeouts
    assert clock.now <= start + 30 + 1.0, (clock.now - start, timeouts)


def test_a_retry_after_beyond_the_deadline_fails_at_once(clock):
    fake = FakeServer()
    fake.script = [error(429, {"Retry-After": "120"})]
    with pytest.raises(ApiError):
        make_client(clock, fake).request("GET", "/viewer", deadline=clock.now + 60)
    assert clock.waits == [] and len(fake.requests) == 1


def test_attempts_bound_the_retries(clock):
    fake = FakeServer(lambda request: error(500))
    with pytest.raises(ApiError):
        make_client(clock, fake).request("GET", "/viewer", attempts=3)
    assert len(fake.requests) == 3 and len(clock.waits) == 2


def test_without_deadline_it_retries_until_stopped(clock):
    fake = FakeServer(lambda request: error(502))
    c = make_client(clock, fake)

    def stop_after_50(seconds: float) -> bool:
        clock.waits.append(seconds)
        clock.now += seconds
        return len(clock.waits) >= 50
    clock.wait = stop_after_50  # type: ignore[method-assign]
    with pytest.raises(ApiError):
        c.request("PUT", "/runs/a/b/c", json={})
    assert len(fake.requests) == 50 and max(clock.waits) <= _client.MAX_WAIT


def test_each_retry_is_logged_rate_limited_and_without_secrets(clock):
    fake = FakeServer()
    fake.script = [error(502, {"Retry-After": "1"})] * 30 + [(200, {}, {})]
    lines: list[str] = []
    c = make_client(clock, fake, host="http://user:hunter2@127.0.0.1:9/", on_retry=lines.append)
    c.request("PUT", "/runs/a/b/c/parts/tensors/3", data=b"x")
    assert lines[0] == ("502 Bad Gateway from PUT http://127.0.0.1:9/api/v1/runs/a/b/c/parts/tensors/3; "
                        "retry 1 in 1.0 s")
    # 30 retries 1 s apart: a line per RETRY_LOG_EVERY (10) seconds, the retries between counted.
    assert len(lines) == 3, lines
    assert lines[1].endswith("retry 11 in 1.0 s (9 more retries since the last line)")
    assert not any("hunter2" in ln or "gx_secret_key" in ln or "user" in ln for ln in lines)


def test_json_bodies_carry_nan_and_infinities(clock):
    fake = FakeServer()
    body = {"summary": {"loss": math.nan, "best": -math.inf}, "config": {"clip": math.inf, "lr": 0.1}}
    make_client(clock, fake).request("PUT", "/runs/a/b/c", json=body)
    sent = fake.requests[0]
    assert sent.headers["Content-Type"] == "application/json"
    assert b"NaN" in sent.body and b"-Infinity" in sent.body
    got = json.loads(sent.body)
    assert math.isnan(got["summary"]["loss"]) and got["summary"]["best"] == -math.inf
    assert got["config"] == {"clip": math.inf, "lr": 0.1}


# -- over a real socket: requests' own HTTPAdapter, the real clock -----------------------------------

class Scripted(http.server.ThreadingHTTPServer):
    """A loopback HTTP server answering GETs from ``script`` (status, headers), in turn."""

    def __init__(self, script: list[tuple[int, dict[str, str]]]) -> None:
        self.script = script
        self.seen: list[float] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(handler) -> None:
                self.seen.append(time.time())
                status, headers = self.script.pop(0) if self.script else (200, {})
                body = json.dumps({"error": f"status {status}"} if status >= 400 else {"ok": True}).encode()
                handler.send_response(status)
                for k, v in {**headers, "Content-Type": "application/json",
                             "Content-Length": str(len(body))}.items():
                    handler.send_header(k, v)
                handler.end_headers()
                handler.wfile.write(body)

            def log_message(handler, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def __enter__(self) -> Scripted:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()
        self.server_close()


def test_over_a_socket_429_waits_until_an_http_date_and_400_is_final():
    when = email.utils.formatdate(math.ceil(time.time()) + 2, usegmt=True)
    with Scripted([(429, {"Retry-After": when}), (400, {})]) as srv:
        c = Client(srv.url, "gx_secret_key")
        with pytest.raises(ApiError) as e:
            c.request("GET", "/viewer")
        assert e.value.status == 400 and len(srv.seen) == 2  # 429 retried, 400 not
        assert srv.seen[1] >= email.utils.parsedate_to_datetime(when).timestamp() - 1.0  # not before the date


def test_stopping_ends_a_long_retry_after_wait_at_once():
    """A sender that stops does not sit out a server's Retry-After (up to 300 s)."""
    with Scripted([(503, {"Retry-After": "300"})]) as srv:
        c = Client(srv.url, "gx_secret_key")
        threading.Timer(0.5, c.stop.set).start()
        start = time.monotonic()
        with pytest.raises(ApiError) as e:
            c.request("GET", "/viewer")
        assert e.value.status == 503 and len(srv.seen) == 1
        assert time.monotonic() - start < 120


# -- the uploader ------------------------------------------------------------------------------------

def strict_server(stored: dict[str, bytes]) -> Callable[[requests.PreparedRequest], Answer]:
    """A fake of the server's part checks: a part that is not a sealed part, or has a frame
    that fails its checksum, is a 400 (as the server answers); others are stored."""
    import hashlib

    def handle(request: requests.PreparedRequest) -> Answer:
        path = (request.path_url or "").split("/api/v1", 1)[1]
        if "/parts/" in path:
            body = bytes(request.body or b"")
            problem = _format.sealed_problem(body, payloads=True)
            if problem is not None:
                return 400, {}, {"error": problem}
            stored[path] = body
            return 201, {}, {"stored": True, "sha256": hashlib.sha256(body).hexdigest()}
        return 200, {}, {}
    return handle


def offline_run(tmp_path: Path, run_id: str = "r", steps: int = 40) -> Path:
    with gradexp.init("up", id=run_id, dir=tmp_path / "runs", part_max_bytes=1500) as run:
        for s in range(steps):
            run.log(values(s))
            if s % 5 == 4:
                run.flush()
    return run.dir


def part_puts(fake: FakeServer) -> list[tuple[str, int]]:
    out = []
    for r in fake.requests:
        if r.method == "PUT" and "/parts/" in (r.url or ""):
            stream, seq = (r.url or "").rsplit("/", 2)[-2:]
            out.append((stream, int(seq)))
    return out


def test_history_parts_go_up_first_in_seq_order(tmp_path, clock):
    run_dir = offline_run(tmp_path)
    parts = _format.list_parts(run_dir / "parts")
    n_hist = sum(p.name.startswith("history-") for p in parts)
    n_tens = sum(p.name.startswith("tensors-") for p in parts)
    assert n_hist >= 3 and n_tens >= 3
    fake = FakeServer(strict_server({}))
    up = Uploader(run_dir, make_client(clock, fake), "alice")
    assert up.upload_pending() == len(parts)
    puts = part_puts(fake)
    side = [p for p in puts if p[0] in ("console", "system")]  # the sender's own streams, in order too
    assert side == sorted(side) and len(side) == len(parts) - n_hist - n_tens
    puts = [p for p in puts if p not in side]
    assert puts[:n_hist] == [("history", i) for i in range(n_hist)]  # in order, before any tensor part
    assert sorted(puts[n_hist:]) == [("tensors", i) for i in range(n_tens)]  # each once


def test_uploaded_log_is_per_server(tmp_path, clock):
    run_dir = offline_run(tmp_path)
    names = sorted(p.name for p in _format.list_parts(run_dir / "parts"))
    a, b = FakeServer(strict_server({})), FakeServer(strict_server({}))
    up_a = Uploader(run_dir, make_client(clock, a, host="http://a.test"), "alice")
    for part in up_a.pending()[:3]:  # partly sent to A...
        up_a.upload(part)
    up_b = Uploader(run_dir, make_client(clock, b, host="http://b.test"), "alice")
    assert [p.name for p in up_b.pending()] == names  # ...counts for nothing on B
    up_b.upload_pending()
    up_b.finish("finished", 0)
    assert len(part_puts(b)) == len(names)
    # The same server under another entity is another destination too.
    assert len(Uploader(run_dir, make_client(clock, b, host="http://b.test"), "bob").pending()) == len(names)
    again_a = Uploader(run_dir, make_client(clock, a, host="http://a.test"), "alice")
    assert len(again_a.pending()) == len(names) - 3 and not again_a.finished
    again_b = Uploader(run_dir, make_client(clock, b, host="http://b.test"), "alice")
    assert again_b.pending() == [] and again_b.finished
    log = (run_dir / UPLOADED_LOG).read_text().splitlines()
    assert log[-1] == f"{DONE_MARK} http://b.test/alice"
    assert all(ln.split()[2] in ("http://a.test/alice", "http://b.test/alice") for ln in log[:-1])


def test_an_old_uploaded_log_without_servers_counts_for_no_server(tmp_path, clock):
    """Logs written before records named their server: the parts went *somewhere*; they are
    sent again (a server that has them answers 200, as for any repeated upload)."""
    run_dir = offline_run(tmp_path)
    names = [p.name for p in _format.list_parts(run_dir / "parts")]
    (run_dir / UPLOADED_LOG).write_text("".join(f"{n} {'0' * 64}\n" for n in names) + DONE_MARK + "\n")
    up = Uploader(run_dir, make_client(clock, FakeServer()), "alice")
    assert [p.name for p in up.pending()] == names and not up.finished


def test_a_part_the_server_refuses_as_damaged_is_resealed_and_the_upload_goes_on(tmp_path, clock):
    run_dir = offline_run(tmp_path)
    victim = _format.list_parts(run_dir / "parts", "tensors")[1]
    frames = _format.scan_part(victim).frames
    data = bytearray(victim.read_bytes())
    data[frames[0].data_offset + frames[0].stored // 2] ^= 0x10  # a payload bit: the index still reads
    victim.write_bytes(bytes(data))
    assert _format.sealed_problem(bytes(data)) is None  # well-formed: only the server's check finds it
    stored: dict[str, bytes] = {}
    fake = FakeServer(strict_server(stored))
    lines: list[str] = []
    up = Uploader(run_dir, make_client(clock, fake), "alice", report=lines.append)
    n = len(up.pending())
    assert up.upload_pending() == n
    up.finish("finished", 0)
    assert len(lines) == 1, lines
    assert f"{victim.name} was damaged" in lines[0] and f"lost 1 frame ({frames[0].rows} row" in lines[0]
    assert (victim.parent / (victim.name + ".damaged")).read_bytes() == bytes(data)
    assert len(stored) == n  # every part went up, the re-sealed one under its own seq
    kept = _format.scan_part(victim).frames
    assert [(f.key, f.step_min) for f in kept] == [(f.key, f.step_min) for f in frames[1:]]


def test_sync_reports_its_retries_too(tmp_path, clock):
    run_dir = offline_run(tmp_path)
    fake = FakeServer(strict_server({}))
    fake.script = [error(502)]
    lines: list[str] = []
    n, did = _service.sync(run_dir, make_client(clock, fake), "alice", report=lines.append)
    assert did and n == len(_format.list_parts(run_dir / "parts"))
    assert len(lines) == 1 and lines[0].startswith("502 Bad Gateway from PUT http://upload.test/api/v1/runs/alice/up/r")


def test_sender_log_lines_from_threads_stay_whole(tmp_path):
    # the sender has two clients, each with threads that log retries: a line written in two
    # pieces (print's text, then its newline) interleaved with another's
    log = tmp_path / "sender.log"
    script = """
import threading
from gradexp.sync.sender import _log
def many(i):
    for j in range(2000):
        _log(f"thread {i} line {j}")
ts = [threading.Thread(target=many, args=(i,)) for i in range(6)]
for t in ts: t.start()
for t in ts: t.join()
"""
    with open(log, "w") as err:
        subprocess.run([sys.executable, "-c", script], stderr=err, check=True, timeout=120,
                       env=clean_env(PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    lines = log.read_text().splitlines()
    assert len(lines) == 12_000
    whole = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ gradexp sender: thread \d line \d+")
    bad = [x for x in lines if not whole.fullmatch(x)]
    assert not bad, bad[:3]
