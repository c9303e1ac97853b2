"""The sender: uploads a run folder's sealed parts to the server, in order, exactly once.

One sender process per online run (``python -m gradexp.sync.sender``), spawned by
``init()`` and connected to it by a pipe: the training process writes
``finish <exit code>`` when it is done, and EOF without that means it died. Then
the sender seals the part the trainer left open, uploads everything and marks the
run crashed. ``gradexp sync`` runs the same :class:`Uploader` in the foreground.

What was uploaded is appended to ``uploaded.log`` in the run folder, one line per
part, ``<part name> <sha256> <server>``, and ``#finished <server>`` once the run is
finished there; ``<server>`` is the host URL and entity (``https://host/alice``). So
nothing is sent twice to one server, a later sync continues where this stopped, and
a folder synced to one server still uploads in full to another. Lines without a
server (written by earlier versions) say only that the part went *somewhere*: they count for
no server, so such a folder is sent again, and a server that has the parts already
answers each with 200 (the same bytes are a no-op). The server's idempotent part
upload also covers the gap between a PUT and its log line.

A part that is not a well-formed sealed part (damaged on disk), or that the server
refuses as damaged (400), is re-sealed from its intact frames under the same name
(:func:`gradexp.core.format.reseal_part`; the original is kept as ``<name>.damaged``),
one line says what was lost, and the upload goes on.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gradexp.core import format as _format
from gradexp.core.client import Client
from gradexp.core.errors import ApiError
from gradexp.core.layout import CONFIG_JSON, LOCK, PARTS, RUN_JSON, SUMMARY_JSON, read_json, write_json
from gradexp.core.limits import exit_code_for_record

UPLOADED_LOG = "uploaded.log"
DONE_MARK = "#finished"
HEARTBEAT = 30.0


def _stderr(line: str) -> None:
    print(f"gradexp: {line}", file=sys.stderr, flush=True)


class Uploader:
    """Uploads one run folder to one server (``client``'s host, as ``entity``). Not
    thread-safe; one per run. ``report`` is told, in one line, about each damaged part."""

    def __init__(self, run_dir: Path, client: Client, entity: str, *,
                 report: Callable[[str], None] = _stderr) -> None:
        self.dir = Path(run_dir)
        self.client = client
        meta = read_json(self.dir / RUN_JSON)
        if meta is None:
            raise FileNotFoundError(f"{self.dir} is not a gradexp run folder (no {RUN_JSON})")
        self.meta: dict[str, Any] = meta
        self.path = f"/runs/{entity}/{meta['project']}/{meta['id']}"
        self.url = f"{client.host}/{entity}/{meta['project']}/{meta['id']}"
        self.server = f"{client.host}/{entity}"
        """What uploaded.log lines name: the server and the entity the parts went to."""
        self.report = report
        self._log = self.dir / UPLOADED_LOG
        self.uploaded, self.finished = self._read_log()
        self._meta_stamp: tuple[int, int, int] | None = None
        self._last_beat = 0.0
        self.sent_bytes = 0
        self._lock = threading.Lock()
        self._second: Client | None = None

    def _read_log(self) -> tuple[set[str], bool]:
        """Parts uploaded to this server, and whether the run was finished there."""
        try:
            lines = self._log.read_text().splitlines()
        except FileNotFoundError:
            return set(), False
        names: set[str] = set()
        finished = False
        for line in lines:
            fields = line.split()
            if not fields:
                continue
            if fields[0] == DONE_MARK:
                finished = finished or fields[1:] == [self.server]
            elif not fields[0].startswith("#") and fields[2:] == [self.server]:
                names.add(fields[0])
        return names, finished

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
        # status "running" reopens a run finished on the server: a resumed run appends to it.
        self.client.request("PUT", self.path, deadline=deadline, json={
            **_described(m), "created_at": m.get("created_at"), "status": "running",
            "config": read_json(self.dir / CONFIG_JSON, {}), "summary": read_json(self.dir / SUMMARY_JSON, {})})
        self._meta_stamp = self._stamp()

    def _stamp(self) -> tuple[int, int, int]:
        def mtime(name: str) -> int:
            try:
                return (self.dir / name).stat().st_mtime_ns
            except FileNotFoundError:
                return 0
        return mtime(CONFIG_JSON), mtime(SUMMARY_JSON), mtime(RUN_JSON)

    def sync_meta(self, *, deadline: float | None = None) -> None:
        """Send config, summary, name, tags and notes if they changed; otherwise a heartbeat
        every 30 s."""
        stamp = self._stamp()
        now = time.monotonic()
        if stamp != self._meta_stamp:
            meta = read_json(self.dir / RUN_JSON, self.meta)
            self.client.request("PATCH", self.path, deadline=deadline, json={
                **_described(meta), "config": read_json(self.dir / CONFIG_JSON, {}),
                "summary": read_json(self.dir / SUMMARY_JSON, {})})
            self._meta_stamp = stamp
            self._last_beat = now
        elif now - self._last_beat >= HEARTBEAT:
            self.client.request("PATCH", self.path, deadline=deadline, json={})
            self._last_beat = now

    def upload(self, part: Path, *, deadline: float | None = None, client: Client | None = None) -> None:
        data = part.read_bytes()
        if _format.sealed_problem(data) is not None:  # damaged on disk: the server would refuse it
            part, data = self._repair(part)
        try:
            r = self._put(part, data, deadline=deadline, client=client)
        except ApiError as e:
            # The server checks every frame (payloads too); a damaged one is a 400.
            if e.status != 400 or _format.sealed_problem(data, payloads=True) is None:
                raise
            part, data = self._repair(part)
            r = self._put(part, data, deadline=deadline, client=client)
        with self._lock:
            self._append_log(f"{part.name} {r.json().get('sha256', '')} {self.server}")
            self.uploaded.add(part.name)
            self.sent_bytes += len(data)

    def _put(self, part: Path, data: bytes, *, deadline: float | None, client: Client | None) -> Any:
        stream, _, seq = part.name[: -len(_format.PART_SUFFIX)].rpartition("-")
        # No client-side hash: every frame carries zstd's content checksum, which the server
        # checks, and TCP/TLS guard the transfer; the server's SHA-256 (returned) is what
        # makes re-uploads idempotent. Hashing here cost ~1 ms/MB.
        return (client or self.client).request("PUT", f"{self.path}/parts/{stream}/{int(seq)}", data=data,
                                               deadline=deadline,
                                               headers={"Content-Type": "application/octet-stream"})

    def _repair(self, part: Path) -> tuple[Path, bytes]:
        """Re-seal a damaged part from its intact frames (same name), say what was lost."""
        repair = _format.reseal_part(part)
        self.report(str(repair))
        return repair.path, repair.path.read_bytes()

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
            self._second = self.client.clone()
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
        self._append_log(f"{DONE_MARK} {self.server}")
        self.finished = True

    def recover(self) -> list[Path]:
        """Seal parts a dead trainer left open (only when no live process holds the run)."""
        from gradexp.core.layout import is_locked

        if is_locked(self.dir / LOCK):
            raise RuntimeError(f"run {self.dir} is still running")
        return [_format.recover_part(p, report=lambda r: self.report(str(r)))
                for p in _format.list_parts(self.dir / PARTS) if p.name.endswith(_format.OPEN_SUFFIX)]


def _described(meta: dict[str, Any]) -> dict[str, Any]:
    """What run.json says of a run that the server keeps: name, tags, notes, group, job type."""
    return {"name": meta.get("name"), "tags": meta.get("tags", []), "notes": meta.get("notes"),
            "group": meta.get("group"), "job_type": meta.get("job_type")}


def final_status(meta: dict[str, Any]) -> tuple[str, int | None]:
    status = meta.get("status", "running")
    if status in ("finished", "failed"):
        code = meta.get("exit_code")
        return status, None if code is None else exit_code_for_record(code)
    return "crashed", None


def sync(run_dir: Path, client: Client, entity: str, *, progress: Callable[[int], None] | None = None,
         report: Callable[[str], None] = _stderr) -> tuple[int, bool]:
    """Upload a run that is not running any more, and finish it on the server.

    Returns (parts uploaded, whether there was anything to do). Idempotent.
    """
    if client.on_retry is None:  # in the foreground, a retry is news too
        client.on_retry = report
    up = Uploader(run_dir, client, entity, report=report)
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
    """One event for the training process. Once it is gone (crashed), events go nowhere:
    stdout is pointed at /dev/null so neither this nor the exit's flush raises."""
    try:
        sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
        sys.stdout.flush()
    except (BrokenPipeError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _log(line: str) -> None:
    """One line in sender.log (the sender's stderr), with the UTC time."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    print(f"{stamp} gradexp sender: {line}", file=sys.stderr, flush=True)


def _warn(line: str) -> None:
    """Something the user should know (a damaged part): in sender.log and at finish()."""
    _log(line)
    _emit("warning", message=line)


def failure(error: BaseException, run_dir: Path) -> tuple[str, str]:
    """(what failed, what to do) for an error that stopped uploading."""
    sync = f"gradexp sync {run_dir}"
    if isinstance(error, ApiError):
        if error.status in (401, 403):
            return (f"the server refused the API key ({error})",
                    f"sign in again with `gradexp login` (or set GRADEXP_API_KEY to a valid key), then run: {sync}")
        return (f"the server refused the upload ({error})",
                f"the server's answer says why; once that is fixed, run: {sync} (details in {run_dir}/sender.log)")
    return (f"the sender failed: {type(error).__name__}: {error}",
            f"the traceback is in {run_dir}/sender.log; what is left stays in the run folder, "
            f"upload it with: {sync}")


def main() -> None:
    """``python -m gradexp.sync.sender``: read the handshake from stdin, then upload until told to stop."""
    hello = json.loads(sys.stdin.readline())
    run_dir = Path(hello["run_dir"])
    try:
        _serve(hello, run_dir)
    except Exception as e:  # a final answer (not a transient one) or a bug: say so, leave it to sync
        what, todo = failure(e, run_dir)
        if not isinstance(e, ApiError):
            traceback.print_exc()
        _log(f"{what}; {todo}")
        _emit("error", message=what, hint=todo)


def _serve(hello: dict[str, Any], run_dir: Path) -> None:
    client = Client(hello["host"], hello["api_key"], on_retry=_log)
    entity = hello.get("entity") or client.json("GET", "/viewer")["entity"]
    up = Uploader(run_dir, client, entity, report=_warn)
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
        if not registered:
            up.put_run()
            registered = True
            _emit("registered", url=up.url, entity=entity)
        up.upload_pending()
        up.sync_meta()
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
        size = part.stat().st_size
        up.upload(part)
        sent += size
        _emit("progress", sent=sent, total=total)
    up.meta = read_json(up.dir / RUN_JSON, up.meta)
    if up.meta.get("status") == "failed":  # the trainer's finish() found a failure of gradexp's own
        status = "failed"
    up.sync_meta()
    up.finish(status, code)
    _emit("done", url=up.url)


def _crashed(up: Uploader) -> None:
    """The trainer died: wait for its lock to fall, seal what it left open, upload, mark crashed."""
    from gradexp.core.layout import is_locked

    deadline = time.monotonic() + 30
    while is_locked(up.dir / LOCK) and time.monotonic() < deadline:
        time.sleep(0.1)
    if is_locked(up.dir / LOCK):
        _log("the training process is gone but something still holds the run: "
             f"`gradexp sync {up.dir}` finishes it once that has exited")
        return
    up.recover()
    meta = read_json(up.dir / RUN_JSON, up.meta)
    if meta.get("status") == "running":
        meta["status"] = "crashed"
        write_json(up.dir / RUN_JSON, meta)
    up.meta = meta
    status, code = final_status(meta)
    up.upload_pending()
    up.finish(status, code)
    _log(f"the training process exited without finish(); uploaded the rest and marked the run {status}")
    _emit("done", url=up.url)


if __name__ == "__main__":
    main()
