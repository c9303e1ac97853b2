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
from typing import TYPE_CHECKING, Any

from gradexp.core import format as _format
from gradexp.core.errors import ApiError
from gradexp.core.layout import CONFIG_JSON, LOCK, PARTS, RUN_JSON, SUMMARY_JSON, read_json, write_json
from gradexp.core.limits import exit_code_for_record
from gradexp.core.streams import CONSOLE, FATAL, PROVENANCE_JSON, SYSTEM

if TYPE_CHECKING:  # imported where used: an offline run's sender never loads the HTTP stack
    from gradexp.core.client import Client

UPLOADED_LOG = "uploaded.log"
IDLE_WAIT = 0.1
"""Online, the sender looks for newly sealed parts this often (a directory listing and a few
``stat`` calls): it is part of the time a logged step takes to show in a live chart."""
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
        self._record_sent: tuple[float, float] | None = None
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

    def _record_stamp(self) -> tuple[float, float]:
        def mtime(name: str) -> float:
            try:
                return (self.dir / name).stat().st_mtime
            except FileNotFoundError:
                return 0.0
        return mtime(RUN_JSON), mtime(PROVENANCE_JSON)

    def sync_record(self, *, deadline: float | None = None) -> None:
        """Send the run record (run.json: host, argv, program, exit details) and the code's
        provenance (provenance.json) when either changed since last sent."""
        stamp = self._record_stamp()
        if stamp == self._record_sent:
            return
        self.client.request("PUT", f"{self.path}/record", deadline=deadline, json={
            "meta": read_json(self.dir / RUN_JSON, {}), "provenance": read_json(self.dir / PROVENANCE_JSON, {})})
        self._record_sent = stamp

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
        """Upload every pending part: history (and the console and system streams) in order on
        this thread, tensor parts two at a time (a second connection keeps the server's other
        core busy: ~1.6x here)."""
        pending = self.pending()
        history = [p for p in pending if not p.name.startswith("tensors-")]
        tensors = [p for p in pending if p.name.startswith("tensors-")]
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
    up.sync_record()
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


_log_lock = threading.Lock()


def _log(line: str) -> None:
    """One line in sender.log (the sender's stderr), with the UTC time: whole, written at
    once (``print`` writes the text and its newline apart, and two clients' threads log)."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with _log_lock:
        sys.stderr.write(f"{stamp} gradexp sender: {line}\n")
        sys.stderr.flush()


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
    """``python -m gradexp.sync.sender``: read the handshake from stdin, start recording the console,
    system metrics and code, upload until told to stop (online), and finish."""
    hello = json.loads(sys.stdin.readline())
    run_dir = Path(hello["run_dir"])
    side = _Recorders(hello, run_dir)  # first: the trainer's output waits in the console pipe
    try:
        if hello.get("host"):
            try:
                _serve(hello, run_dir, side)
                return
            except Exception as e:  # a final answer (not a transient one) or a bug: say so, leave it to sync
                what, todo = failure(e, run_dir)
                if not isinstance(e, ApiError):
                    traceback.print_exc()
                _log(f"{what}; {todo}")
                _emit("error", message=what, hint=todo)
                if side.told is not None:  # already finishing (or the trainer is gone): say so now
                    side.close()
                    _emit("done", url=None)
                    return
        _record(side)  # offline, or online once uploading stopped: the run is still recorded
    finally:
        side.close()
        if side.console is not None:  # show what child processes that outlive the run still print
            side.console.eof.wait()


class _Recorders:
    """What the sender records for every run, online or not: the console (tee and lines), system
    metrics, the code's provenance, and the trainer's commands (``finish N``, EOF)."""

    def __init__(self, hello: dict[str, Any], run_dir: Path) -> None:
        from gradexp.sync.streams import StreamWriter

        self.run_dir = run_dir
        self.pid: int | None = hello.get("pid")
        self.commands: list[str] = []
        self.trainer_done = threading.Event()
        """Set once the trainer is gone (its end of our stdin closed): nobody waits on us then."""
        self.told: str | None = None
        """The last command taken (``finish N`` or ``eof``), once one was."""
        self.wake = threading.Event()
        self.ended_at: float | None = None
        self.console: Any = None
        self.system: Any = None
        self.code_done = threading.Event()
        self._exit: dict[str, Any] = {}
        self._exit_seen = threading.Event()
        self._closed = False
        start = float(hello.get("start_time") or time.time())
        age = float(hello.get("part_max_age") or 60.0)
        if hello.get("console"):
            from gradexp.sync.console import ConsoleRecorder

            self.console = ConsoleRecorder(
                [(name, read, term) for name, read, term in hello["console"]],
                StreamWriter(run_dir / PARTS, CONSOLE, start, part_max_age=age),
                flush_interval=float(hello.get("flush_interval") or 1.0), log=_log)
        if hello.get("console") or hello.get("system_interval"):
            threading.Thread(target=_warm_arrow, name="gradexp-warm-up", daemon=True).start()
        threading.Thread(target=self._read_commands, name="gradexp-commands", daemon=True).start()
        self._signal_text: dict[str, bytes] = {}
        self._signals_done = threading.Event()
        if hello.get("signals"):
            threading.Thread(target=self._watch_signals, args=(hello["signals"],), name="gradexp-signals",
                             daemon=True).start()
        else:
            self._signals_done.set()
        if self.pid is not None:
            threading.Thread(target=self._watch_exit, args=(self.pid,), name="gradexp-exit", daemon=True).start()
        if hello.get("system_interval"):
            try:
                from gradexp.sync.system import SystemSampler

                self.system = SystemSampler(self.pid or os.getppid(),
                                            StreamWriter(run_dir / PARTS, SYSTEM, start, part_max_age=age),
                                            interval=float(hello["system_interval"]), log=_log)
            except ImportError as e:
                _log(f"no system metrics: {e} (pip install psutil)")
        if hello.get("code"):
            threading.Thread(target=self._collect_code, args=(hello["code"],), name="gradexp-code",
                             daemon=True).start()
        else:
            self.code_done.set()

    def _read_commands(self) -> None:
        for line in sys.stdin:
            self.commands.append(line.strip())
            self.wake.set()
        self.ended_at = time.time()
        self.commands.append("eof")
        self.trainer_done.set()
        self.wake.set()

    def _watch_exit(self, pid: int) -> None:
        """How the trainer ended, read from the kernel the moment it does (see :func:`exit_status`)."""
        try:
            self._exit.update(exit_status(pid, wait=None) or {})
        finally:
            self._exit_seen.set()

    def _watch_signals(self, channels: list[list[Any]]) -> None:
        """Read the pipes :mod:`gradexp.write.signals` has faulthandler write into, until the
        trainer closes them (at finish, or by dying)."""
        import select

        names = {int(fd): str(name) for name, fd in channels}
        poller = select.poll()
        for fd in names:
            poller.register(fd, select.POLLIN)
        try:
            while names:
                for fd, _ in poller.poll():
                    data = os.read(fd, 1 << 16)
                    if data:
                        got = self._signal_text.get(names[fd], b"")
                        self._signal_text[names[fd]] = (got + data)[:STACK_MAX_BYTES]
                    else:
                        poller.unregister(fd)
                        os.close(fd)
                        del names[fd]
        finally:
            self._signals_done.set()

    def exit_details(self) -> dict[str, Any]:
        """How the dead trainer ended: the signal and every thread's stack where faulthandler
        wrote them, else the signal or exit code the kernel still held (see :func:`exit_status`)."""
        self._signals_done.wait(2.0)
        for name, text in list(self._signal_text.items()):
            return _signal_details(name, text.decode("utf-8", errors="replace"))
        self._exit_seen.wait(2.0)
        return dict(self._exit)

    def _collect_code(self, code: dict[str, Any]) -> None:
        from gradexp.core.provenance import collect

        _background()  # git inherits it
        try:
            write_json(self.run_dir / PROVENANCE_JSON, collect(code.get("program") or {}, code.get("sys_path") or []))
        except Exception as e:  # best effort: the run goes on without it
            _log(f"could not record the code's provenance: {e!r}")
        finally:
            self.code_done.set()

    def next_command(self) -> str | None:
        """The trainer's next command; ``stop`` (finish() begins: write the last console lines
        and system metrics, and say so) is answered here."""
        while self.commands:
            cmd = self.commands.pop(0)
            if cmd != "stop":
                self.told = cmd
                return cmd
            self.close()
            _emit("recorded")
        return None

    def close(self, *, console_wait: float = 2.0) -> None:
        """Stop recording: the console once the trainer's side of its pipes is closed (at most
        ``console_wait`` s more), system metrics now; seal their parts."""
        if self._closed:
            return
        self._closed = True
        if self.console is not None:
            self.console.close(wait=console_wait)
        if self.system is not None:
            self.system.close()
        self.code_done.wait(60.0)


def _background() -> None:
    """Run the calling thread at nice 10 (on Linux niceness is per thread): work the sender
    does ahead of need must not take CPU from the trainer on a busy machine."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):
        pass


def _warm_arrow() -> None:
    """Build one throwaway frame of text and figures, as the console and system streams write
    them, in the background while the trainer runs: pyarrow's import and first use
    (``pyarrow.compute``, for text) otherwise fall on the first write, which for a run shorter
    than the flush or sampling interval is the last one, inside the trainer's ``finish()``."""
    _background()
    from gradexp.core import arrow as _arrow

    _arrow.history_ipc(_arrow.rows_to_batch([0], [0.0], 0.0, [{"text": "", "figure": 0.0}], {}))


STACK_MAX_BYTES = 256 << 10
"""Bytes kept of the stacks faulthandler writes when a signal kills the trainer."""
_FATAL_NAMES = {"Segmentation fault": "SIGSEGV", "Floating point exception": "SIGFPE", "Aborted": "SIGABRT",
                "Bus error": "SIGBUS", "Illegal instruction": "SIGILL"}


def _signal_details(channel: str, text: str) -> dict[str, Any]:
    """``signal``, ``signal_name`` and ``stack`` from what faulthandler wrote on ``channel``
    (a signal's name, or ``fatal``, whose first line names the error)."""
    import signal

    name = channel
    if channel == FATAL:
        first = text.partition("\n")[0].removeprefix("Fatal Python error: ").strip()
        name = _FATAL_NAMES.get(first, first)
    out: dict[str, Any] = {"signal_name": name, "stack": text}
    sig = getattr(signal, name, None)
    if sig is not None:
        out["signal"] = int(sig)
    return out


def exit_status(pid: int, *, wait: float | None) -> dict[str, Any] | None:
    """``{"signal": n, "signal_name": "SIGKILL"}`` or ``{"exit_code": n}`` for process ``pid`` once
    it has ended, as far as a process that is not its parent can tell (Linux): a pidfd says when
    it ends, and ``/proc/<pid>/stat`` holds its wait status until its parent reaps it. None once
    that is gone, elsewhere, or if ``pid`` is still alive after ``wait`` seconds."""
    import select
    import signal

    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        if not poller.poll(None if wait is None else int(wait * 1000)):
            return None
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    finally:
        os.close(fd)
    fields = stat.rpartition(")")[2].split()
    if len(fields) < 50 or fields[0] != "Z":
        return None
    status = int(fields[49])
    if os.WIFSIGNALED(status):
        n = os.WTERMSIG(status)
        try:
            name = signal.Signals(n).name
        except ValueError:
            name = f"signal {n}"
        return {"signal": n, "signal_name": name}
    if os.WIFEXITED(status):
        return {"exit_code": os.WEXITSTATUS(status)}
    return None


def _record(side: _Recorders) -> None:
    """Without uploads: record until the trainer finishes or dies."""
    while True:
        cmd = side.next_command()
        if cmd is not None and cmd.startswith("finish"):
            side.close()
            _emit("done", url=None)
            return
        if cmd == "eof":
            side.close(console_wait=5.0)
            _mark_ended(side, recover=False)
            _emit("done", url=None)
            return
        side.wake.wait(1.0)
        side.wake.clear()


def _mark_ended(side: _Recorders, *, recover: bool) -> dict[str, Any]:
    """The trainer died without finish(): once its lock is free, seal what it left open (with
    ``recover``: online, to upload it; offline that is left to readers and `gradexp sync`) and
    write in run.json that it crashed, how it ended (signal or exit code, as far as the kernel
    told) and when. Returns run.json as written."""
    from gradexp.core.layout import is_locked

    run_dir = side.run_dir
    deadline = time.monotonic() + 30
    while is_locked(run_dir / LOCK) and time.monotonic() < deadline:
        time.sleep(0.1)
    meta = read_json(run_dir / RUN_JSON, {})
    if is_locked(run_dir / LOCK):
        _log("the training process is gone but something still holds the run: "
             f"`gradexp sync {run_dir}` finishes it once that has exited")
        return meta
    for p in _format.list_parts(run_dir / PARTS) if recover else []:
        if p.name.endswith(_format.OPEN_SUFFIX):
            _format.recover_part(p, report=lambda r: _warn(str(r)))
    if meta.get("status") == "running":
        meta["status"] = "crashed"
        meta["finished_at"] = side.ended_at or time.time()
        meta.update(side.exit_details())
        write_json(run_dir / RUN_JSON, meta, fsync=True)
    return meta


def _serve(hello: dict[str, Any], run_dir: Path, side: _Recorders) -> None:
    from gradexp.core.client import Client

    client = Client(hello["host"], hello["api_key"], on_retry=_log)
    threading.Thread(target=_linger, args=(side, client, float(hello.get("linger") or 3600.0)),
                     name="gradexp-linger", daemon=True).start()
    entity = hello.get("entity") or client.json("GET", "/viewer")["entity"]
    up = Uploader(run_dir, client, entity, report=_warn)
    registered = False
    while True:
        if not registered:
            up.put_run()
            registered = True
            _emit("registered", url=up.url, entity=entity)
        up.upload_pending()
        up.sync_meta()
        up.sync_record()
        cmd = side.next_command()
        if cmd is not None and cmd.startswith("finish"):
            code = int(cmd.split()[1]) if len(cmd.split()) > 1 else 0
            side.close()
            _finish(up, "finished" if code == 0 else "failed", code)
            return
        if cmd == "eof":
            side.close(console_wait=5.0)
            _crashed(up, side)
            return
        side.wake.wait(IDLE_WAIT)
        side.wake.clear()


def _linger(side: _Recorders, client: Client, seconds: float) -> None:
    """Once the trainer is gone, keep trying for ``seconds`` (a server that is down, say), then
    end every request and retry wait: the rest is left to ``gradexp sync``. (A trainer that
    calls finish() ends its sender itself after ``finish_timeout``.)"""
    side.trainer_done.wait()
    if not client.stop.wait(seconds):
        _log(f"gave up uploading {seconds:.0f} s after the training process ended (sender_linger)")
        client.stop.set()


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
    up.sync_record()
    up.finish(status, code)
    _emit("done", url=up.url)


def _crashed(up: Uploader, side: _Recorders) -> None:
    """The trainer died: wait for its lock to fall, seal what it left open, upload, mark crashed."""
    meta = _mark_ended(side, recover=True)
    if meta.get("status") == "running":  # still held by something: left to `gradexp sync`
        return
    up.meta = meta
    status, code = final_status(meta)
    up.upload_pending()
    up.sync_record()
    up.finish(status, code)
    _log(f"the training process exited without finish(); uploaded the rest and marked the run {status}")
    _emit("done", url=up.url)


if __name__ == "__main__":
    main()
