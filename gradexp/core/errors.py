"""Exceptions and warnings, each subclassing what a user would already catch."""

from __future__ import annotations


class UsageError(RuntimeError):
    """The API was called in a state where the call makes no sense (no active run...)."""


class RunNotFoundError(LookupError):
    """A run reference did not resolve to a run folder."""


class CorruptPartError(ValueError):
    """A frame in a part file failed its checksum or could not be decoded."""

    def __init__(self, path: str, offset: int, reason: str) -> None:
        super().__init__(f"{path} at byte {offset}: {reason}")
        self.path = path
        self.offset = offset
        self.reason = reason


class GradexpWarning(UserWarning):
    """Something in gradexp's background work needs the user's attention."""


class CorruptPartWarning(GradexpWarning):
    """Reading skipped damaged frames; the intact ones were returned."""


class ApiError(RuntimeError):
    """The server answered an API call with an error."""

    def __init__(self, status: int, message: str, url: str = "") -> None:
        super().__init__(f"{status} from {url}: {message}" if url else f"{status}: {message}")
        self.status = status
        self.message = message
