"""The credential store: API keys per server host, in the user config dir.

One JSON file, ``credentials.json``, mode 0600 in a 0700 folder, written to a
temporary file and renamed, never printed. ``$GRADEXP_CONFIG_DIR`` moves it.
Precedence, applied by ``_settings.resolve``: an explicit argument, then
``GRADEXP_HOST``/``GRADEXP_API_KEY``, then what is stored here.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from gradexp.core.layout import write_json

DEFAULT_HOST = "http://127.0.0.1:8080"
CLIENT_ID = "gradexp-cli"
"""The OAuth client id of ``gradexp login``: the only client the server's authorize page serves."""
FILE = "credentials.json"


def config_dir() -> Path:
    env = os.environ.get("GRADEXP_CONFIG_DIR")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_config_dir("gradexp"))


def normalize_host(host: str) -> str:
    host = host.strip().rstrip("/")
    if "://" not in host:
        host = "http://" + host
    return host


def _load() -> dict[str, Any]:
    try:
        data = json.loads((config_dir() / FILE).read_text())
    except FileNotFoundError:
        return {"hosts": {}}
    except ValueError:
        return {"hosts": {}}  # a damaged file is as good as none; the next save replaces it
    data.setdefault("hosts", {})
    return data


def _save(data: dict[str, Any]) -> Path:
    folder = config_dir()
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(folder, 0o700)
    write_json(folder / FILE, data, fsync=True)  # a 0600 temp file, renamed
    return folder / FILE


def default_host() -> str | None:
    """The host of the last ``gradexp login``."""
    return _load().get("default_host")


def stored(host: str) -> dict[str, Any] | None:
    """What is stored for ``host``: ``api_key``, ``user``, ``entity``, ``saved_at``."""
    return _load()["hosts"].get(normalize_host(host))


def store(host: str, api_key: str, *, user: str, entity: str) -> Path:
    data = _load()
    host = normalize_host(host)
    data["hosts"][host] = {"api_key": api_key, "user": user, "entity": entity, "saved_at": time.time()}
    data["default_host"] = host
    return _save(data)


def forget(host: str) -> bool:
    """Drop the key stored for ``host``; True if there was one."""
    data = _load()
    host = normalize_host(host)
    if data["hosts"].pop(host, None) is None:
        return False
    if data.get("default_host") == host:
        data["default_host"] = next(iter(data["hosts"]), None)
    _save(data)
    return True
