"""The training process's end of the sender: spawn it, tell it to finish, wait with progress.

Kept apart from ``_service`` so that ``import gradexp`` never imports requests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO


class Sender:
    """A running ``python -m gradexp.sync.sender`` for one run."""

    def __init__(self, run_dir: Path, host: str, api_key: str, *, entity: str | None = None) -> None:
        self.run_dir = run_dir
        self.events: list[dict[str, Any]] = []
        self._changed = threading.Condition()
        log = open(run_dir / "sender.log", "ab")
        env = dict(os.environ)
        env.pop("GRADEXP_API_KEY", None)  # the key travels over the pipe, not in the environment
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gradexp.sync.sender"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=log, env=env, start_new_session=True, close_fds=True, text=True, bufsize=1)
        log.close()
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"run_dir": str(run_dir), "host": host, "api_key": api_key,
                                         "entity": entity}) + "\n")
        self.proc.stdin.flush()
        threading.Thread(target=self._read, args=(self.proc.stdout,), name="gradexp-sender-events",
                         daemon=True).start()

    def _read(self, out: TextIO) -> None:
        for line in out:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            with self._changed:
                self.events.append(event)
                self._changed.notify_all()
        with self._changed:
            self.events.append({"event": "exit"})
            self._changed.notify_all()

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
        if self.last("exit") is not None:
            code = self.proc.wait(5)
            return (f"gradexp: the upload failed: the sender process exited (code {code}) before it finished; "
                    f"see {log}.\n  What is left stays in {self.run_dir}; upload it with: {sync}")
        return (f"gradexp: the upload did not finish within {timeout:.0f} s (finish_timeout); what is left "
                f"stays in {self.run_dir}.\n  Upload it with: {sync}")

    def finish(self, exit_code: int, *, timeout: float, out: TextIO = sys.stderr) -> bool:
        """Ask the sender to upload the rest and finish the run; True if it did within ``timeout``."""
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(f"finish {exit_code}\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass
        deadline = time.monotonic() + timeout
        shown = 0.0
        with self._changed:
            while self.last("done", "error", "exit") is None:
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
        done = self.last("done") is not None
        if not done:
            out.write(self._why(timeout) + "\n")
            self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        if self.proc.stdin:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        return done
