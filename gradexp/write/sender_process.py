"""The training process's end of the sender: spawn it, tell it to finish, wait with progress.

Online runs upload through it; every run (offline too) has it record the console, sample
system metrics and collect the code's provenance, unless all three are switched off. Kept
apart from ``_service`` so that ``import gradexp`` never imports requests.

Spawned with :func:`os.posix_spawn` (a vfork and exec in the C library), not
:mod:`subprocess`: ``init()`` neither imports ``subprocess`` (with ``locale``, tens of
ms on a busy machine) nor waits for the child to run; the child holds the console pipes
from the moment it exists, so output written right after ``init()`` reaches the terminal
even if the trainer dies at once.

The child is a ``/bin/sh`` that waits on a gate pipe before it execs Python: the
interpreter's start-up and the sender's imports (~0.3 s of CPU here) would otherwise run
while ``init()`` starts the writer, whose thread imports pyarrow, and on a machine with
few cores ``init()`` would wait for the CPU. :meth:`Sender.release` opens the gate once
the writer has its imports; a trainer that dies first closes it, so the sender still
starts and drains the console.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from gradexp.core.settings import Settings
    from gradexp.write.console import Capture
    from gradexp.write.signals import SignalWatch

__all__ = ["Sender", "SenderProcess"]


class SenderProcess:
    """The sender's process id and, once it has exited, its exit status (as :mod:`subprocess`
    gives it: ``-N`` for signal N). Reaped by the thread that reads the sender's events."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._lock = threading.Lock()
        self._exited = threading.Event()

    def reap(self) -> None:
        """Wait for the process to exit and collect its status (so no zombie is left)."""
        try:
            os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOWAIT)  # a zombie keeps its pid: kill() stays safe
            with self._lock:
                _, status = os.waitpid(self.pid, 0)
                self.returncode = os.waitstatus_to_exitcode(status)
        except ChildProcessError:  # reaped by someone else (SIGCHLD ignored, os.wait() in the program)
            pass
        finally:
            self._exited.set()

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int | None:
        """The exit status, once the process has exited within ``timeout`` seconds; else None."""
        self._exited.wait(timeout)
        return self.returncode

    def terminate(self) -> None:
        import signal

        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        import signal

        self._signal(signal.SIGKILL)

    def _signal(self, sig: int) -> None:
        with self._lock:
            if self.returncode is None and not self._exited.is_set():
                try:
                    os.kill(self.pid, sig)
                except ProcessLookupError:
                    pass


def _spawn(argv: list[str], env: dict[str, str], *, stdin: int, stdout: int, stderr: int,
          pass_fds: list[int], gate: int) -> int:
    """Start ``argv`` in a new session with ``stdin``, ``stdout`` and ``stderr`` as its
    descriptors 0-2 and ``pass_fds`` under their own numbers; no other descriptor of this
    process (as :mod:`subprocess` does with ``close_fds``). ``argv`` is exec'ed once a line
    or end of file comes out of the pipe whose read end is ``gate`` (at once if ``pass_fds``
    leave the shell no descriptor for it). Returns its pid."""
    keep = {0, 1, 2, *pass_fds}
    actions: list[tuple[Any, ...]] = [(os.POSIX_SPAWN_DUP2, stdin, 0), (os.POSIX_SPAWN_DUP2, stdout, 1),
                                      (os.POSIX_SPAWN_DUP2, stderr, 2)]
    actions += [(os.POSIX_SPAWN_CLOSE, fd) for fd in _inheritable_fds() if fd not in keep]
    # dash redirects single-digit descriptors only: the gate goes to one 3-9 leaves free; with
    # none free (pass_fds hold them all), argv starts at once, ungated.
    free = [fd for fd in range(3, 10) if fd not in keep]
    if free:
        actions.append((os.POSIX_SPAWN_DUP2, gate, free[0]))
        argv = ["/bin/sh", "-c", f'read -r _ <&{free[0]}; exec {free[0]}<&-; exec "$@"', "gradexp-sender", *argv]
    for fd in pass_fds:
        os.set_inheritable(fd, True)
    try:
        return os.posix_spawn(argv[0], argv, env, file_actions=actions, setsid=True)
    finally:
        for fd in pass_fds:
            os.set_inheritable(fd, False)


def _inheritable_fds() -> list[int]:
    """This process's descriptors above 2 that a child would inherit (the program's own)."""
    try:
        names = os.listdir("/dev/fd")
    except OSError:
        return []
    found = []
    for name in names:
        fd = int(name)
        try:
            if fd > 2 and os.get_inheritable(fd):
                found.append(fd)
        except OSError:  # the listing's own descriptor, closed by now
            pass
    return found


class Sender:
    """A running ``python -m gradexp.sync.sender`` for one run.

    ``capture`` (console capture, started) hands the sender its pipes; ``program`` (the
    entry point, see :func:`gradexp.write.run.program`) asks it for the code's provenance.
    """

    def __init__(self, run_dir: Path, settings: Settings, *, start_time: float, capture: Capture | None = None,
                 signals: SignalWatch | None = None, program: dict[str, Any] | None = None,
                 entity: str | None = None) -> None:
        self.run_dir = run_dir
        self.online = settings.mode == "online"
        self.events: list[dict[str, Any]] = []
        self._changed = threading.Condition()
        self._capture = capture
        self._signals = signals
        self._finishing = False
        channels = capture.channels if capture is not None else []
        watched = signals.channels if signals is not None else []
        hello: dict[str, Any] = {
            "run_dir": str(run_dir), "pid": os.getpid(), "start_time": start_time,
            "host": settings.host if self.online else None, "api_key": settings.api_key if self.online else None,
            "console": [[c.name, c.read, c.original] for c in channels],
            "signals": [[name, fd] for name, fd in watched],
            "system_interval": settings.system_interval if settings.system_metrics else None,
            "code": {"program": program, "sys_path": sys.path} if program is not None else None,
            "flush_interval": settings.flush_interval, "part_max_age": settings.part_max_age,
            "entity": entity, "linger": settings.sender_linger,
        }
        env = dict(os.environ)
        env.pop("GRADEXP_API_KEY", None)  # the key travels over the pipe, not in the environment
        cmd_read, cmd_write = os.pipe()  # commands to the sender: its stdin
        ev_read, ev_write = os.pipe()  # its events: its stdout
        gate_read, self._gate = os.pipe()  # see release()
        try:
            log = os.open(run_dir / "sender.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o666)
            try:
                pid = _spawn([sys.executable, "-m", "gradexp.sync.sender"], env, stdin=cmd_read, stdout=ev_write,
                             stderr=log, pass_fds=[fd for c in channels for fd in (c.read, c.original)]
                             + [fd for _, fd in watched], gate=gate_read)
            finally:
                os.close(log)
        except BaseException:
            os.close(cmd_write)
            os.close(ev_read)
            os.close(self._gate)
            raise
        finally:
            os.close(cmd_read)
            os.close(ev_write)
            os.close(gate_read)
        self.proc = SenderProcess(pid)
        if signals is not None:
            signals.handed_over()
        self._commands = open(cmd_write, "w", encoding="utf-8")
        self._command(json.dumps(hello))
        self._events: TextIO | None = open(ev_read, encoding="utf-8")

    def release(self) -> None:
        """Let the sender's interpreter start, and read its events (once the trainer's own
        start-up is done: a thread's start waits for the OS to run it, ms on a busy machine;
        the sender has nothing to say before it runs)."""
        with self._changed:
            gate, self._gate = self._gate, -1
            events, self._events = self._events, None
        if gate >= 0:
            try:
                os.write(gate, b"\n")  # a process forked meanwhile holds the gate open too
            except OSError:  # nobody reads it: spawned ungated (see _spawn), or gone
                pass
            finally:
                os.close(gate)
        if events is not None:
            threading.Thread(target=self._read, args=(events,), name="gradexp-sender-events", daemon=True).start()

    def _command(self, line: str) -> bool:
        """Send one line to the sender; False if it is gone."""
        try:
            self._commands.write(line + "\n")
            self._commands.flush()
        except (BrokenPipeError, OSError, ValueError):
            return False
        return True

    def _read(self, out: TextIO) -> None:
        for line in out:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            with self._changed:
                self.events.append(event)
                self._changed.notify_all()
        out.close()
        with self._changed:
            self.events.append({"event": "exit"})
            self._changed.notify_all()
            finishing = self._finishing
        if self._capture is not None and not finishing:
            # The sender died under a live run: output must not wait on a pipe nobody reads.
            self._capture.abandon()
        self.proc.reap()

    def entity(self, *, timeout: float) -> str | None:
        """The entity the run is registered under, once the sender has registered it (None if
        it has not within ``timeout`` seconds, or failed)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                e = self.last("registered")
                if e is not None:
                    return e.get("entity")
                left = deadline - time.monotonic()
                if left <= 0 or self.last("error", "exit") is not None:
                    return None
                self._changed.wait(min(left, 1.0))

    def last(self, *names: str) -> dict[str, Any] | None:
        for e in reversed(self.events):
            if e["event"] in names:
                return e
        return None

    def _why(self, timeout: float) -> str:
        """What stopped the upload, and what to do about it (the sender's own words if it said)."""
        err = self.last("error")
        log = self.run_dir / "sender.log"
        sync = f"gradexp sync {self.run_dir}"
        if err is not None:
            return f"gradexp: the upload failed: {err['message']}.\n  {err.get('hint') or 'Run: ' + sync}"
        what = "upload" if self.online else "sender process (console, system metrics, code)"
        if self.last("exit") is not None and self.last("done") is None:
            code = self.proc.wait(5)
            return (f"gradexp: the {what} failed: the sender process exited (code {code}) before it finished; "
                    f"see {log}." + (f"\n  What is left stays in {self.run_dir}; upload it with: {sync}"
                                     if self.online else ""))
        if not self.online:
            return f"gradexp: the {what} did not finish within {timeout:.0f} s (finish_timeout); see {log}"
        return (f"gradexp: the upload did not finish within {timeout:.0f} s (finish_timeout); what is left "
                f"stays in {self.run_dir}.\n  Upload it with: {sync}")

    def stop_recording(self) -> None:
        """Stop console capture and have the sender write the last console lines and system
        metrics; :meth:`wait_recorded` waits for it (so they are complete once run.json says
        the run ended). Apart, so that the trainer flushes its own rows meanwhile."""
        with self._changed:
            self._finishing = True
        if self._signals is not None:
            self._signals.stop()
        if self._capture is not None:
            self._capture.stop()
        self._command("stop")

    def wait_recorded(self, *, timeout: float) -> None:
        """Wait (at most ``timeout`` seconds) for the sender to have done what
        :meth:`stop_recording` asked, or to be gone."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self.last("recorded", "exit") is None and (left := deadline - time.monotonic()) > 0:
                self._changed.wait(min(left, 1.0))

    def finish(self, exit_code: int, *, timeout: float, out: TextIO = sys.stderr) -> bool:
        """Ask the sender to upload the rest and finish the run (after :meth:`stop_recording`);
        True if it did within ``timeout``."""
        with self._changed:
            self._finishing = True
        if self._capture is not None:
            self._capture.stop()
        self._command(f"finish {exit_code}")
        deadline = time.monotonic() + timeout
        shown = 0.0
        with self._changed:
            while self.last("done", "exit") is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(min(left, 1.0))
                p = self.last("progress")
                if p and p["total"] and time.monotonic() - shown >= 1.0:
                    shown = time.monotonic()
                    out.write(f"\rgradexp: uploading {p['sent'] / 1e6:.1f}/{p['total'] / 1e6:.1f} MB")
                    out.flush()
        if shown:
            out.write("\n")
        for e in self.events:
            if e["event"] == "warning":
                out.write(f"gradexp: {e['message']}\n")
        done = self.last("done") is not None and self.last("error") is None
        finished = self.last("done") is not None
        if not done:
            out.write(self._why(timeout) + "\n")
        if not finished:  # stuck, or gone: end it
            self.proc.terminate()
            if self.proc.wait(5) is None:
                self.proc.kill()
        # Done: not waited for. It exits by itself (once child processes that outlive the run
        # have stopped printing through it) and the event reader reaps it.
        try:
            self._commands.close()
        except OSError:
            pass
        return done
