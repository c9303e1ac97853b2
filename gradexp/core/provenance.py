"""Where a run's code came from: git state, entry point, installed distributions.

Collected by the sender process (``git`` runs there, and ``importlib.metadata`` walks the
training process's ``sys.path`` there), so ``init()`` pays nothing for it. Environment
variables are never recorded. What is kept, and its limits:

- ``git``: ``commit``, ``branch`` (None when detached), ``remote`` (the URL of ``origin``,
  else of the first remote, with any user name and password removed from http(s) URLs and
  any password from others), ``dirty`` (tracked files differ from HEAD; untracked files do
  not count), ``root``, and ``patch``: ``git diff HEAD`` (text, binary files named only),
  whole files up to ``PATCH_MAX_BYTES`` in all; files that do not fit are listed in
  ``patch_omitted``.
- ``program``: the entry point (script path, or ``-m module``), ``cwd``, ``executable``.
- ``packages``: ``{name: version}`` of every installed distribution.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

__all__ = ["PATCH_MAX_BYTES", "collect", "distributions", "git_state", "strip_credentials"]

PATCH_MAX_BYTES = 1 << 20
"""Bytes of ``git diff HEAD`` kept with a run (whole files only; the rest are named)."""
_GIT_TIMEOUT = 30.0


def strip_credentials(url: str) -> str:
    """``url`` without secrets: http(s) URLs lose their user info entirely (a token is often
    passed as the user name), other URLs (``ssh://git@host/x``) their password."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if not parts.netloc or "@" not in parts.netloc:
        return url  # scp-like "git@host:x.git" has no password to lose
    userinfo, _, host = parts.netloc.rpartition("@")
    if parts.scheme.lower() in ("http", "https", "ftp", "ftps"):
        netloc = host
    else:
        netloc = f"{userinfo.partition(':')[0]}@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _git(where: Path, *args: str) -> str | None:
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0", "GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C"}
    try:
        r = subprocess.run(["git", "-C", str(where), *args], capture_output=True, timeout=_GIT_TIMEOUT,
                           env=env, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):  # no git installed, or a hung filesystem
        return None
    if r.returncode != 0:
        return None
    return r.stdout.decode("utf-8", errors="replace")


def git_state(where: Path) -> dict[str, Any] | None:
    """The git state of the work tree holding ``where``; None outside one (or without git)."""
    root = _git(where, "rev-parse", "--show-toplevel")
    if root is None:
        return None
    out: dict[str, Any] = {"root": root.strip()}
    commit = _git(where, "rev-parse", "--verify", "-q", "HEAD")
    out["commit"] = commit.strip() if commit else None
    branch = _git(where, "symbolic-ref", "--short", "-q", "HEAD")
    out["branch"] = branch.strip() if branch else None
    remotes = (_git(where, "remote") or "").split()
    remote = "origin" if "origin" in remotes else (remotes[0] if remotes else None)
    url = _git(where, "config", "--get", f"remote.{remote}.url") if remote else None
    out["remote"] = strip_credentials(url.strip()) if url else None
    status = _git(where, "status", "--porcelain", "--untracked-files=no")
    out["dirty"] = bool(status and status.strip())
    if out["dirty"] and out["commit"]:
        diff = _git(where, "diff", "HEAD", "--no-color", "--no-ext-diff")
        out["patch"], out["patch_omitted"] = _cap_patch(diff or "")
    else:
        out["patch"], out["patch_omitted"] = "", []
    return out


def _cap_patch(diff: str) -> tuple[str, list[str]]:
    """Whole files of ``diff`` up to ``PATCH_MAX_BYTES``; the paths of the files left out."""
    files = ["diff --git " + f for f in diff.split("\ndiff --git ")]
    files[0] = files[0].removeprefix("diff --git ")
    kept: list[str] = []
    omitted: list[str] = []
    size = 0
    for f in files:
        n = len(f.encode("utf-8", errors="replace")) + 1
        if size + n <= PATCH_MAX_BYTES:
            kept.append(f)
            size += n
        else:
            head = f.split("\n", 1)[0]
            omitted.append(head.removeprefix("diff --git ").split(" b/")[0].removeprefix("a/"))
    text = "\n".join(kept)
    if text and not text.endswith("\n"):
        text += "\n"
    return text, omitted


def distributions(path: list[str] | None = None) -> dict[str, str]:
    """``{name: version}`` of the distributions installed on ``path`` (default ``sys.path``),
    sorted by name: what ``pip freeze`` lists, without a subprocess."""
    from importlib import metadata

    found: dict[str, str] = {}
    for dist in metadata.distributions(path=path) if path is not None else metadata.distributions():
        try:
            name, version = _name_version(dist.read_text("METADATA") or dist.read_text("PKG-INFO") or "")
        except OSError:
            continue
        if name and name not in found:  # the first on the path wins, as for imports
            found[name] = version
    return dict(sorted(found.items(), key=lambda kv: kv[0].lower()))


def _name_version(text: str) -> tuple[str | None, str]:
    """``Name`` and ``Version`` from a distribution's core metadata, read from its header lines
    alone: ``Distribution.metadata`` parses the whole file (the long description too) as an
    e-mail message, once per field asked for, 20x slower over a few hundred distributions."""
    fields: dict[str, str] = {}
    for line in text.partition("\n\n")[0].splitlines():
        key, sep, value = line.partition(":")
        if sep and key in ("Name", "Version") and key not in fields:
            fields[key] = value.strip()
    return fields.get("Name"), fields.get("Version", "")


def collect(program: dict[str, Any], sys_path: list[str]) -> dict[str, Any]:
    """Everything above for a process whose ``program`` (``path`` or ``module``, ``cwd``,
    ``executable``) and ``sys.path`` the training process sent."""
    where = Path(program.get("path") or program.get("cwd") or ".")
    if where.is_file():
        where = where.parent
    return {"program": program, "git": git_state(where), "packages": distributions(sys_path)}
