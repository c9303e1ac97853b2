"""The sender: uploads a run folder's sealed parts to the server, in order, exactly once.

One sender process per online run (``python -m gradexp._service``), spawned by
``init()`` and connected to it by a pipe: the training process writes
``finish <exit code>`` when it is done, and EOF without that means it died. Then
the sender seals the part the trainer left open, uploads everything and marks the
run crashed. ``gradexp sync`` runs the same :class:`Uploader` in the foreground.

What was uploaded is appended to ``uploaded.log`` in the run folder (one part name
per line), so nothing is sent twice and a later sync continues where this stopped;
the server's idempotent part upload covers the gap between a PUT and its log line.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from . import _format
from ._client import Client
from ._errors import ApiError
from ._files import CONFIG_JSON, LOCK, PARTS, RUN_JSON, SUMMARY_JSON, read_json, write_json

UPLOADED_LOG = "uploaded.log"
DONE_MARK = "#finished"
HEARTBEAT = 30.0


class Uploader:
    """Uploads one run folder. Not thread-safe; one per run."""

    def __init__(self, run_dir: Path, client: Client, entity: str) -> None:
        self.dir = Path(run_dir)
        self.client = client
        meta = read_json(self.dir / RUN_JSON)
        if meta is None:
            raise FileNotFoundError(f"{self.dir} is not a gradexp run folder (no {RUN_JSON})")
        self.meta: dict[str, Any] = meta
        self.path = f"/runs/{entity}/{meta['project']}/{meta['id']}"
        self.url = f"{client.host}/{entity}/{meta['project']}/{meta['id']}"
        self._log = self.dir / UPLOADED_LOG
        self.uploaded, self.finished = self._read_log()
        self._meta_stamp: tuple[float, float] | None = None
        self._last_beat = 0.0
        self.sent_bytes = 0
        self._lock = threading.Lock()
        self._second: Client | None = None

    def _read_log(self) -> tuple[set[str], bool]:
        try:
            lines = self._log.read_text().splitlines()
        except FileNotFoundError:
            return set(), False
        names = {ln.split()[0] for ln in lines if ln and not ln.startswith("#")}
        return names, DONE_MARK in lines

    def _append_log(self, line: str) -> None:
        with open(self._log, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    # -- what to send ----------------------------------------------------------------------------

    def pending(self) -> list[Path]:
        """Sealed parts not uploaded yet, in (stream, seq) order."""
        return [p for p in _format.list_parts(self.dir / PARTS)
                if p.name.endswith(_format.PART_SUFFIX) and p.name not in self.uploaded]

    def pending_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.pending())

    # -- sending ---------------------------------------------------------------------------------

    def put_run(self, *, deadline: float | None = None) -> None:
        m = self.meta
        self.client.request("PUT", self.path, deadline=deadline, json={
            "name": m.get("name"), "tags": m.get("tags", []), "notes": m.get("notes"),
            "created_at": m.get("created_at"), "config": read_json(self.dir / CONFIG_JSON, {}),
            "summary": read_json(self.dir / SUMMARY_JSON, {})})
        self._meta_stamp = self._stamp()

    def _stamp(self) -> tuple[float, float]:
        def mtime(name: str) -> float:
            try:
                return (self.dir / name).stat().st_mtime
            except FileNotFoundError:
                return 0.0
        return mtime(CONFIG_JSON), mtime(SUMMARY_JSON)

    def sync_meta(self, *, deadline: float | None = None) -> None:
        """Send config and summary if they changed; otherwise a heartbeat every 30 s."""
        stamp = self._stamp()
        now = time.monotonic()
        if stamp != self._meta_stamp:
            self.client.request("PATCH", self.path, deadline=deadline, json={
                "config": read_json(self.dir / CONFIG_JSON, {}),
                "summary": read_json(self.dir / SUMMARY_JSON, {})})
            self._meta_stamp = stamp
            self._last_beat = now
        elif now - self._last_beat >= HEARTBEAT:
            self.client.request("PATCH", self.path, deadline=deadline, json={})
            self._last_beat = now

    def upload(self, part: Path, *, deadline: float | None = None, client: Client | None = None) -> None:
        data = part.read_bytes()
        stream, _, seq = part.name[: -len(_format.PART_SUFFIX)].rpartition("-")
        # No client-side hash: every frame carries zstd's content checksum, which the server
        # checks for history frames, and TCP/TLS guard the transfer; the server's SHA-256
        # (returned) is what makes re-uploads idempotent. Hashing here cost ~1 ms/MB.
        r = (client or self.client).request("PUT", f"{self.path}/parts/{stream}/{int(seq)}", data=data,
                                            deadline=deadline,
                                            headers={"Content-Type": "application/octet-stream"})
        with self._lock:
            self._append_log(f"{part.name} {r.json().get('sha256', '')}")
            self.uploaded.add(part.name)
            self.sent_bytes += len(data)

    def upload_pending(self, *, deadline: float | None = None,
                       progress: Callable[[int], None] | None = None) -> int:
        """Upload every pending part: history in order on this thread, tensor parts two at a
        time (a second connection keeps the server's other core busy: ~1.6x here)."""
        pending = self.pending()
        history = [p for p in pending if p.name.startswith("history-")]
        tensors = [p for p in pending if not p.name.startswith("history-")]
        for part in history:
            self.upload(part, deadline=deadline)
            if progress is not None:
                progress(part.stat().st_size)
        if len(tensors) < 2:
            for part in tensors:
                self.upload(part, deadline=deadline)
                if progress is not None:
                    progress(part.stat().st_size)
            return len(pending)
        if self._second is None:
            self._second = Client(self.client.host, self.client.session.headers["Authorization"][7:],
                                  timeout=self.client.timeout)
            self._second.stop = self.client.stop
        queue = list(reversed(tensors))
        errors: list[BaseException] = []

        def worker(client: Client) -> None:
            while not errors:
                with self._lock:
                    if not queue:
                        return
                    part = queue.pop()
                try:
                    self.upload(part, deadline=deadline, client=client)
                except BaseException as e:
                    errors.append(e)
                    return
                if progress is not None:
                    with self._lock:
                        progress(part.stat().st_size)

        helper = threading.Thread(target=worker, args=(self._second,), name="gradexp-upload", daemon=True)
        helper.start()
        worker(self.client)
        helper.join()
        if errors:
            raise errors[0]
        return len(pending)

    def finish(self, status: str, exit_code: int | None, *, deadline: float | None = None) -> None:
        counts: dict[str, int] = {}
        for name in self.uploaded:
            stream = name.rpartition("-")[0]
            counts[stream] = counts.get(stream, 0) + 1
        self.client.request("POST", f"{self.path}/finish", deadline=deadline,
                            json={"exit_code": exit_code, "status": status, "parts": counts})
        self._append_log(DONE_MARK)
        self.finished = True

    def recover(self) -> list[Path]:
        """Seal parts a dead trainer left open (only when no live process holds the run)."""
        from ._run import is_locked

        if is_locked(self.dir / LOCK):
            raise RuntimeError(f"run {self.dir} is still running")
        return [_format.recover_part(p) for p in _format.list_parts(self.dir / PARTS)
                if p.name.endswith(_format.OPEN_SUFFIX)]


def final_status(meta: dict[str, Any]) -> tuple[str, int | None]:
    status = meta.get("status", "running")
    if status in ("finished", "failed"):
        return status, meta.get("exit_code")
    return "crashed", None


def sync(run_dir: Path, client: Client, entity: str, *,
         progress: Callable[[int], None] | None = None) -> tuple[int, bool]:
    """Upload a run that is not running any more, and finish it on the server.

    Returns (parts uploaded, whether there was anything to do). Idempotent.
    """
    up = Uploader(run_dir, client, entity)
    if up.finished and not up.pending():
        return 0, False
    up.recover()
    up.meta = read_json(up.dir / RUN_JSON, up.meta)
    up.put_run()
    n = up.upload_pending(progress=progress)
    status, code = final_status(up.meta)
    if status == "crashed" and up.meta.get("status") == "running":
        up.meta["status"] = "crashed"
        write_json(up.dir / RUN_JSON, up.meta)
    up.finish(status, code)
    return n, True


# -- the sender process ---------------------------------------------------------------------------

def _emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def main() -> None:
    """``python -m gradexp._service``: read the handshake from stdin, then upload until told to stop."""
    hello = json.loads(sys.stdin.readline())
    client = Client(hello["host"], hello["api_key"])
    run_dir = Path(hello["run_dir"])
    entity = hello.get("entity") or client.json("GET", "/viewer")["entity"]
    up = Uploader(run_dir, client, entity)
    commands: list[str] = []
    wake = threading.Event()

    def read_commands() -> None:
        for line in sys.stdin:
            commands.append(line.strip())
            wake.set()
        commands.append("eof")
        wake.set()

    threading.Thread(target=read_commands, daemon=True).start()
    registered = False
    while True:
        try:
            if not registered:
                up.put_run()
                registered = True
                _emit("registered", url=up.url)
            up.upload_pending()
            up.sync_meta()
        except ApiError as e:  # a final answer (not a transient one): say so and leave it to sync
            _emit("error", message=str(e))
            print(f"gradexp sender: {e}", file=sys.stderr)
            return
        if commands:
            cmd = commands.pop(0)
            if cmd.startswith("finish"):
                code = int(cmd.split()[1]) if len(cmd.split()) > 1 else 0
                _finish(up, "finished" if code == 0 else "failed", code)
                return
            if cmd == "eof":
                _crashed(up)
                return
        wake.wait(0.2)
        wake.clear()


def _finish(up: Uploader, status: str, code: int | None) -> None:
    total = up.pending_bytes()
    sent = 0
    for part in up.pending():
        up.upload(part)
        sent += part.stat().st_size
        _emit("progress", sent=sent, total=total)
    up.meta = read_json(up.dir / RUN_JSON, up.meta)
    if up.meta.get("status") == "failed":  # the trainer's finish() found a failure of gradexp's own
        status = "failed"
    up.sync_meta()
    up.finish(status, code)
    _emit("done", url=up.url)


def _crashed(up: Uploader) -> None:
    """The trainer died: wait for its lock to fall, seal what it left open, upload, mark crashed."""
    from ._run import is_locked

    deadline = time.monotonic() + 30
    while is_locked(up.dir / LOCK) and time.monotonic() < deadline:
        time.sleep(0.1)
    if is_locked(up.dir / LOCK):
        return  # something still holds the run (a forked child): `gradexp sync` finishes it later
    up.recover()
    meta = read_json(up.dir / RUN_JSON, up.meta)
    if meta.get("status") == "running":
        meta["status"] = "crashed"
        write_json(up.dir / RUN_JSON, meta)
    up.meta = meta
    status, code = final_status(meta)
    up.upload_pending()
    up.finish(status, code)
    _emit("done", url=up.url)


if __name__ == "__main__":
    main()

