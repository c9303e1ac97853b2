"""Which signal killed the training process, told by the process itself as it dies.

The sender is not the trainer's parent, so it cannot wait for it, and an interactive
shell reaps a killed process before anyone else can read its status. So, for each
signal whose default action ends the process and that nobody handles (``SIGTERM``,
``SIGHUP``, ``SIGQUIT``, ``SIGUSR1``, ``SIGUSR2``, ``SIGXCPU``), :mod:`faulthandler`
writes the stacks of all threads into a pipe of that signal's own and then lets the
default action end the process as before (``chain=True``); with faulthandler not
already enabled, fatal errors (``SIGSEGV``, ``SIGFPE``, ``SIGABRT``, ``SIGBUS``,
``SIGILL``) write theirs into one more. The sender holds the read ends: bytes on one
name the signal. Nothing runs in Python when a signal arrives; a handler the program
installs later simply replaces this one. SIGKILL cannot be watched this way.
"""

from __future__ import annotations

import faulthandler
import os
import signal

from gradexp.core.layout import FATAL

__all__ = ["FATAL", "SignalWatch"]

_WATCHED = ("SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGXCPU")
_active = False  # one watch per process: faulthandler keeps one registration per signal


class SignalWatch:
    """Pipes that faulthandler writes into when the process dies of a signal; :attr:`channels`
    is ``[(signal name or "fatal", read end)]`` for the sender."""

    def __init__(self) -> None:
        self.channels: list[tuple[str, int]] = []
        self._registered: list[tuple[signal.Signals, int]] = []
        self._fatal: int | None = None
        self._started = False

    def start(self) -> None:
        global _active
        if _active or not hasattr(faulthandler, "register"):
            return
        _active = self._started = True
        for name in _WATCHED:
            sig = getattr(signal, name, None)
            if sig is None or signal.getsignal(sig) is not signal.SIG_DFL:
                continue  # handled by the program: it may not die of it
            r, w = os.pipe()
            faulthandler.register(sig, file=w, all_threads=True, chain=True)
            self._registered.append((sig, w))
            self.channels.append((name, r))
        if not faulthandler.is_enabled():
            r, w = os.pipe()
            faulthandler.enable(file=w, all_threads=True)
            self._fatal = w
            self.channels.append((FATAL, r))

    def handed_over(self) -> None:
        """The sender holds the read ends now: close ours (a write after the sender is gone
        then fails quietly, inside faulthandler)."""
        for _, r in self.channels:
            os.close(r)
        self.channels = []

    def stop(self) -> None:
        """Unregister (where the program did not install a handler of its own since) and close."""
        global _active
        if not self._started:
            return
        self._started = _active = False
        for sig, w in self._registered:
            if signal.getsignal(sig) is signal.SIG_DFL:  # still ours: put the default back
                faulthandler.unregister(sig)
            os.close(w)
        if self._fatal is not None:
            faulthandler.disable()
            os.close(self._fatal)
        self.handed_over()
