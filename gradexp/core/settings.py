"""Settings from keyword arguments, then ``GRADEXP_*`` environment variables, then defaults."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gradexp.core.errors import InvalidTypeError, InvalidValueError

MODES = ("online", "offline", "disabled")
PRECISIONS = ("", "fp32", "fp16", "bf16")
MiB = 1 << 20


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    """Every knob of a run; ``init(**settings)`` takes these names."""

    dir: Path = Path("gradexp-runs")
    mode: str = "offline"
    """``online`` streams to ``host``: the default once a host is configured (argument,
    ``GRADEXP_HOST`` or ``gradexp login``)."""
    host: str = ""
    """The gradexp server, e.g. ``http://127.0.0.1:8080``."""
    api_key: str = dataclasses.field(default="", repr=False)
    finish_timeout: float = 120.0
    """Seconds ``finish()`` waits for the upload before leaving the rest for ``gradexp sync``."""
    sender_linger: float = 3600.0
    """Online: seconds the sender process keeps trying to upload once the training process has
    died without ``finish()`` (a server that is down, say); then it exits and ``gradexp sync``
    uploads the rest. (``finish()`` itself waits ``finish_timeout`` at most.)"""
    live_interval: float = 0.5
    """Online: history parts are sealed, and so uploaded, at least this often."""
    flush_interval: float = 1.0
    """Seconds within which a logged record reaches the OS (is written to its part file)."""
    queue_max_bytes: int = 512 * MiB
    """Bytes of tensor snapshots that may wait for the writer before ``log()`` blocks."""
    queue_max_rows: int = 100_000
    """Rows that may wait for the writer before ``log()`` blocks."""
    part_max_bytes: int = 64 * MiB
    """A part is sealed once it holds this many bytes..."""
    part_max_age: float = 60.0
    """...or once it is this many seconds old (online runs: 2 s unless set)."""
    workers: int = 2
    """Threads that summarise and compress large tensors (NumPy and zstd release the GIL)."""
    small_tensor_bytes: int = 256 * 1024
    """Tensors below this size are batched, several steps to a frame."""
    precision: str = ""
    """Storage dtype of float tensors: ``""`` keeps the logged dtype (bit-exact); ``fp32``,
    ``fp16`` or ``bf16`` store wider floats in that type, rounded to nearest (ties to even)
    on the writer thread: lossy, and ``log()`` costs the same."""
    console: bool = True
    """Record the process's stdout and stderr (file-descriptor level, still shown on the
    terminal) as the run's ``console`` stream (docs/provenance.md)."""
    code: bool = True
    """Record the git commit, branch, remote, dirty flag and diff, the entry point and the
    installed distributions (in the sender process, off the training loop)."""
    system_metrics: bool = True
    """Sample CPU, memory, disk, network and GPU figures in the sender process."""
    system_interval: float = 10.0
    """Seconds between two system-metrics samples."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InvalidValueError(f"mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        if self.precision not in PRECISIONS:
            raise InvalidValueError(f"precision must be one of fp32, fp16, bf16 (or '' for the logged "
                                    f"dtype); got {self.precision!r}")
        for name in ("flush_interval", "part_max_age", "live_interval", "finish_timeout", "sender_linger",
                     "system_interval"):
            if not getattr(self, name) > 0:
                raise InvalidValueError(f"{name} must be > 0; got {getattr(self, name)!r}")
        for name in ("queue_max_bytes", "queue_max_rows", "part_max_bytes", "workers"):
            if getattr(self, name) < 1:
                raise InvalidValueError(f"{name} must be >= 1; got {getattr(self, name)!r}")


_FIELDS = {f.name: f for f in dataclasses.fields(Settings)}


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def _coerce(name: str, value: Any) -> Any:
    default = _FIELDS[name].default
    if isinstance(default, Path):
        return Path(value).expanduser()
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        word = str(value).strip().lower()
        if word in _TRUE or word in _FALSE:
            return word in _TRUE
        raise ValueError(f"setting {name!r}: cannot use {value!r} as a bool (use true/false, 1/0, on/off)")
    kind: type = type(default)  # every field has a default: never dataclasses.MISSING
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise InvalidValueError(f"setting {name!r}: cannot use {value!r} as {kind.__name__}") from None


def resolve(overrides: Mapping[str, Any], *, environ: Mapping[str, str] | None = None) -> Settings:
    """Merge ``overrides`` (None means unset) over ``GRADEXP_<NAME>`` variables over defaults."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for name in _FIELDS:
        raw = overrides.get(name)
        if raw is None:
            raw = env.get(f"GRADEXP_{name.upper()}") or None
        if raw is not None:
            values[name] = _coerce(name, raw)
    unknown = set(overrides) - set(_FIELDS)
    if unknown:
        raise InvalidTypeError(
            f"unknown setting {sorted(unknown)[0]!r}; known settings: {', '.join(sorted(_FIELDS))}"
        )
    if "host" not in values or "api_key" not in values:
        _from_credentials(values)
    if "mode" not in values:
        # A host without a key still means online was wanted: init() says what is missing.
        values["mode"] = "online" if values.get("host") else "offline"
    if values["mode"] == "online" and "part_max_age" not in values:
        values["part_max_age"] = 2.0
    return Settings(**values)


def _from_credentials(values: dict[str, Any]) -> None:
    """Fill host and key from what ``gradexp login`` stored (after arguments and env)."""
    from gradexp.core import credentials as _auth

    host = values.get("host") or _auth.default_host()
    if not host:
        return
    values["host"] = host
    if "api_key" not in values:
        entry = _auth.stored(host)
        if entry:
            values["api_key"] = entry["api_key"]
