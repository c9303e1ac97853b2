"""Exceptions and warnings.

Every exception gradexp raises on purpose derives from :class:`GradexpError`, and also from
the builtin a user would already catch, so either ``except gradexp.GradexpError`` or
``except ValueError`` works:

- :class:`UsageError` (``RuntimeError``): a call made in a state where it makes no sense.
- :class:`InvalidValueError` (``ValueError``), :class:`InvalidTypeError` (``TypeError``):
  a value ``log()``, ``init()`` or a setting refuses; the message names the key or setting.
- :class:`RunNotFoundError` (``LookupError``): a run reference that names no run.
- :class:`KeyNotFoundError` (``KeyError``): a key or step a run does not have.
- :class:`CorruptPartError` (``ValueError``): a frame failed its checksum or did not decode.
- :class:`ApiError` (``RuntimeError``): the server answered with an error.

Warnings derive from :class:`GradexpWarning` (``UserWarning``).
"""

from __future__ import annotations

__all__ = [
    "ApiError",
    "CorruptPartError",
    "CorruptPartWarning",
    "GradexpError",
    "GradexpWarning",
    "InvalidTypeError",
    "InvalidValueError",
    "KeyNotFoundError",
    "RunNotFoundError",
    "UsageError",
]


class GradexpError(Exception):
    """The root of every exception gradexp raises on purpose."""


class UsageError(GradexpError, RuntimeError):
    """The API was called in a state where the call makes no sense (no active run...)."""


class InvalidValueError(GradexpError, ValueError):
    """A value was refused (a key too long, an int outside int64, a bad setting...)."""


class InvalidTypeError(GradexpError, TypeError):
    """A value of a type gradexp cannot store was given."""


class RunNotFoundError(GradexpError, LookupError):
    """A run reference did not resolve to a run folder or a run on the server."""


class KeyNotFoundError(GradexpError, KeyError):
    """A run has no such key (or no such step of a key); the message names what it has."""

    def __str__(self) -> str:  # KeyError would quote the message as a repr
        return str(self.args[0]) if self.args else ""


class CorruptPartError(GradexpError, ValueError):
    """A frame in a part file failed its checksum or could not be decoded."""

    def __init__(self, path: str, offset: int, reason: str) -> None:
        super().__init__(f"{path} at byte {offset}: {reason}")
        self.path = path
        self.offset = offset
        self.reason = reason


class ApiError(GradexpError, RuntimeError):
    """The server answered an API call with an error."""

    def __init__(self, status: int, message: str, url: str = "") -> None:
        super().__init__(f"{status} from {url}: {message}" if url else f"{status}: {message}")
        self.status = status
        self.message = message


class LoginError(GradexpError, RuntimeError):
    """``gradexp.login()`` / ``gradexp login`` did not go through; the message says why and what to do."""


class GradexpWarning(UserWarning):
    """Something in gradexp's background work needs the user's attention."""


class CorruptPartWarning(GradexpWarning):
    """Reading skipped damaged frames; the intact ones were returned."""
