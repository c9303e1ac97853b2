"""Runs on a gradexp server, with the same read API as local run folders."""

from __future__ import annotations

from typing import Any, Iterator, Sequence
from urllib.parse import quote

import numpy as np
import pyarrow as pa

from . import _arrow, _format
from ._client import Client
from ._errors import ApiError, RunNotFoundError


def _quote_key(key: str) -> str:
    """A tensor key as URL path segments. Dots are escaped too: HTTP clients resolve '.' and
    '..' segments (a key "a/../b" would reach the server as "b"), the server decodes them back."""
    return quote(key, safe="/").replace(".", "%2E")


class RemoteRun:
    """A run on a server (``entity/project/run_id``); reads only, live runs included."""

    def __init__(self, client: Client, ref: str) -> None:
        self.client = client
        self.entity, self.project, self.id = ref.split("/")
        self.path = f"/runs/{self.entity}/{self.project}/{self.id}"
        try:
            self.meta: dict[str, Any] = client.json("GET", self.path, retry=False)
        except ApiError as e:
            if e.status == 404:
                raise RunNotFoundError(f"no run {ref!r} on {client.host}") from None
            raise

    name = property(lambda self: self.meta.get("name"))
    tags = property(lambda self: self.meta.get("tags", []))
    notes = property(lambda self: self.meta.get("notes"))

    def _refresh(self) -> dict[str, Any]:
        self.meta = self.client.json("GET", self.path)
        return self.meta

    @property
    def config(self) -> dict[str, Any]:
        return self._refresh()["config"]

    @property
    def summary(self) -> dict[str, Any]:
        return self._refresh()["summary"]

    @property
    def status(self) -> str:
        return self._refresh()["status"]

    def __repr__(self) -> str:
        return f"<gradexp.RemoteRun {self.entity}/{self.project}/{self.id} on {self.client.host}>"

    def history(self, keys: Sequence[str] | None = None) -> pa.Table:
        params = {"format": "arrow"}
        if keys is not None:
            params["keys"] = ",".join(keys)
        try:
            r = self.client.request("GET", f"{self.path}/history", params=params)
        except ApiError as e:
            if e.status == 404 and keys is not None:
                raise KeyError(e.message) from None
            raise
        return pa.ipc.open_stream(r.content).read_all()

    def tensor_keys(self) -> list[str]:
        return self.client.json("GET", f"{self.path}/tensors")["keys"]

    def keys(self) -> list[str]:
        names = dict.fromkeys(n for n in self.history().column_names
                              if n not in ("step", "_timestamp", "_runtime"))
        names.update(dict.fromkeys(self.tensor_keys()))
        return list(names)

    def steps(self, key: str) -> list[int]:
        try:
            return self.client.json("GET", f"{self.path}/tensors/{_quote_key(key)}/steps")["steps"]
        except ApiError as e:
            if e.status == 404:
                raise KeyError(e.message) from None
            raise

    def tensor(self, key: str, step: int) -> np.ndarray:
        """One request; the server answers with one range read of the part holding it."""
        try:
            r = self.client.request("GET", f"{self.path}/tensors/{_quote_key(key)}", params={"step": step})
        except ApiError as e:
            if e.status == 404:
                raise KeyError(e.message) from None
            raise
        frame = r.content
        info = _format.parse_header(frame, 0, len(frame))
        if info is None:
            raise ValueError(f"short frame from {self.client.host} for {key!r} at step {step}")
        steps, arrays = _arrow.tensor_rows(_format.decode_payload(info, memoryview(frame)[info.header_len:]))
        return arrays[int(np.flatnonzero(steps == step)[-1])]

    def tensors(self, key: str) -> Iterator[tuple[int, np.ndarray]]:
        for step in self.steps(key):
            yield step, self.tensor(key, step)
