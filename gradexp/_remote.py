"""Runs on a gradexp server, with the same read API as local run folders."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import quote

import numpy as np
import pyarrow as pa
import requests

from . import _arrow, _format
from ._client import TRANSPORT_ERRORS, Client
from ._errors import ApiError, RunNotFoundError
from .core.streams import ConsoleLine, console_lines

READ_ATTEMPTS = 4
"""Attempts per read: a 5xx or a dropped connection is retried with backoff (~4 s in all),
then the read fails. A reader is a person or a script waiting, not a sender outliving an outage."""
READ_DEADLINE = 60.0
"""Seconds a read may spend retrying (``Retry-After`` included)."""


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
            row: dict[str, Any] = client.json("GET", self.path, retry=False)
        except ApiError as e:
            if e.status == 404:
                raise RunNotFoundError(f"no run {ref!r} on {client.host}") from None
            raise
        self._record: dict[str, Any] = {}
        self._record_final = False
        self.meta: dict[str, Any] = self._with_record(row)

    def _get(self, path: str, what: str, **kw: Any) -> requests.Response:
        """GET with bounded retries; a failure says what was being read and the server's reason."""
        url = f"{self.client.host}/api/v1{self.path}{path}"
        try:
            return self.client.request("GET", self.path + path, attempts=READ_ATTEMPTS,
                                       deadline=time.monotonic() + READ_DEADLINE, **kw)
        except ApiError as e:
            if e.status == 404:
                raise
            raise ApiError(e.status, f"reading {what} of run {self.entity}/{self.project}/{self.id} failed: "
                                     f"{e.message}", url) from None
        except TRANSPORT_ERRORS as e:
            raise requests.ConnectionError(
                f"reading {what} of run {self.entity}/{self.project}/{self.id}: {self.client.host} "
                f"could not be reached: {e}") from None

    name = property(lambda self: self.meta.get("name"))
    tags = property(lambda self: self.meta.get("tags", []))
    notes = property(lambda self: self.meta.get("notes"))

    def _with_record(self, row: dict[str, Any]) -> dict[str, Any]:
        """The server's run row over the record the client sent (run.json: host, argv, program,
        the exception or signal that ended it), fetched at first and once the run has ended."""
        if not self._record or (not self._record_final and row.get("status") != "running"):
            try:
                self._record = self._get("/record", "the run's record").json().get("meta") or {}
            except ApiError as e:
                if e.status != 404:  # a server from before records: the row alone
                    raise
            self._record_final = row.get("status") != "running"
        return {**self._record, **row}

    def _refresh(self) -> dict[str, Any]:
        self.meta = self._with_record(self._get("", "the run's metadata").json())
        return self.meta

    @property
    def provenance(self) -> dict[str, Any]:
        """The code's provenance (git state and patch, program, packages); empty if none was sent."""
        return self._get("/record", "the run's record").json().get("provenance") or {}

    def console(self, since: int = 0) -> list[ConsoleLine]:
        """The run's console lines from line ``since`` on (only those travel)."""
        r = self._get("/streams/console", "the console output", params={"since": since})
        return console_lines(pa.ipc.open_stream(r.content).read_all(), since)

    def system(self, keys: Sequence[str] | None = None) -> pa.Table:
        """System metrics sampled by the run's sender process (``system/...`` columns)."""
        from .api import select_keys

        table = pa.ipc.open_stream(self._get("/streams/system", "the system metrics").content).read_all()
        return select_keys(table, keys, self.id)

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
            r = self._get("/history", "the history", params=params)
        except ApiError as e:
            if e.status == 404 and keys is not None:
                raise KeyError(e.message) from None
            raise
        return pa.ipc.open_stream(r.content).read_all()

    def tensor_keys(self) -> list[str]:
        return self._get("/tensors", "the tensor keys").json()["keys"]

    def keys(self) -> list[str]:
        names = dict.fromkeys(n for n in self.history().column_names
                              if n not in ("step", "_timestamp", "_runtime"))
        names.update(dict.fromkeys(self.tensor_keys()))
        return list(names)

    def steps(self, key: str) -> list[int]:
        try:
            return self._get(f"/tensors/{_quote_key(key)}/steps", f"the steps of tensor {key!r}").json()["steps"]
        except ApiError as e:
            if e.status == 404:
                raise KeyError(e.message) from None
            raise

    def tensor(self, key: str, step: int) -> np.ndarray:
        """One request; the server answers with one range read of the part holding it."""
        try:
            r = self._get(f"/tensors/{_quote_key(key)}", f"tensor {key!r} at step {step}", params={"step": step})
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
