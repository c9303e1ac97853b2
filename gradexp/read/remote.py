"""Runs on a gradexp server, with the same read API as local run folders."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any
from urllib.parse import quote, urlencode

import numpy as np
import pyarrow as pa
import requests
import urllib3

from gradexp.core import arrow as _arrow
from gradexp.core import format as _format
from gradexp.core.client import TRANSPORT_ERRORS, Client
from gradexp.core.errors import ApiError, InvalidValueError, KeyNotFoundError, RunNotFoundError
from gradexp.core.history import BASE_COLUMNS, select_keys
from gradexp.core.streams import ConsoleLine, console_lines
from gradexp.read.reader import RecordFields, TensorMedia

READ_ATTEMPTS = 4
"""Attempts per read: a 5xx or a dropped connection is retried with backoff (~4 s in all),
then the read fails. A reader is a person or a script waiting, not a sender outliving an outage."""
READ_DEADLINE = 60.0
"""Seconds a read may spend retrying (``Retry-After`` included)."""
ROWS_QUERY_CHARS = 6000
"""Longest query string of one request for many steps of a tensor (a request line must stay
within what servers and proxies accept: 8 KiB for nginx); more steps take more requests."""
ROWS_STEPS_MAX = 1000
"""Steps one such request names at most (the server's limit)."""


def _quote_key(key: str) -> str:
    """A tensor key as URL path segments. Dots are escaped too: HTTP clients resolve '.' and
    '..' segments (a key "a/../b" would reach the server as "b"), the server decodes them back."""
    return quote(key, safe="/").replace(".", "%2E")


def _decode(frame: bytes | memoryview, what: str, *,
            reuse: bool = False) -> tuple[np.ndarray, list[np.ndarray], dict[bytes, bytes]]:
    """A frame as the server stores it (header and payload) as ``(steps, arrays, metadata)``
    (``reuse``: decoded into per-thread buffers, see :func:`gradexp.core.format.decode_payload`)."""
    info = _format.parse_header(frame, 0, len(frame))
    if info is None:
        raise InvalidValueError(f"short frame from the server for {what}")
    return _arrow.tensor_frame(_format.decode_payload(info, memoryview(frame)[info.header_len:], what,
                                                      reuse=reuse))


def _rows(batch: pa.RecordBatch) -> Iterator[tuple[list[int], memoryview]]:
    """The rows of a record batch of a rows stream: (steps asked for, the frame holding them),
    read from the buffers (``to_numpy``/``as_py`` would import pandas, or copy each frame)."""
    steps, frames = batch.column(0), batch.column(1)
    step_offsets = np.frombuffer(steps.buffers()[1], np.int32, len(steps) + 1, steps.offset * 4)
    values = _arrow.to_numpy(steps.values).tolist()
    frame_offsets = np.frombuffer(frames.buffers()[1], np.int64, len(frames) + 1, frames.offset * 8).tolist()
    data = memoryview(frames.buffers()[2])
    for i in range(len(batch)):
        yield (values[step_offsets[i]:step_offsets[i + 1]],
               data[frame_offsets[i]:frame_offsets[i + 1]])


def _step_chunks(steps: list[int]) -> Iterator[list[int]]:
    """``steps`` in pieces that each fit one request's query string."""
    chunk: list[int] = []
    chars = 0
    for s in steps:
        n = len("&steps=") + len(str(s))
        if chunk and (chars + n > ROWS_QUERY_CHARS or len(chunk) >= ROWS_STEPS_MAX):
            yield chunk
            chunk, chars = [], 0
        chunk.append(s)
        chars += n
    if chunk:
        yield chunk


class RemoteRun(RecordFields, TensorMedia):
    """A run on a server (``entity/project/run_id``); reads only, live runs included.

    ``meta`` is the run's record as the server lists it, if known (one request fewer)."""

    def __init__(self, client: Client, ref: str, *, meta: dict[str, Any] | None = None) -> None:
        self.client = client
        self.entity, self.project, self.id = ref.split("/")
        self.path = f"/runs/{self.entity}/{self.project}/{self.id}"
        self._record: dict[str, Any] = {}
        self._record_final = False
        if meta is not None:  # a listing's row: the record is fetched on the first refresh
            self.meta: dict[str, Any] = meta
            return
        try:
            row: dict[str, Any] = client.json("GET", self.path, retry=False)
        except ApiError as e:
            if e.status == 404:
                raise RunNotFoundError(f"no run {ref!r} on {client.host}") from None
            raise
        self.meta = self._with_record(row)

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

    @property
    def damage(self) -> list[_format.Damage]:
        """Always empty: a server stores no part without checking every frame of it."""
        return []


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
                raise KeyNotFoundError(e.message) from None
            raise
        return pa.ipc.open_stream(r.content).read_all()

    def tensor_keys(self) -> list[str]:
        return self._get("/tensors", "the tensor keys").json()["keys"]

    def keys(self) -> list[str]:
        names = dict.fromkeys(n for n in self.history().column_names
                              if n not in BASE_COLUMNS)
        names.update(dict.fromkeys(self.tensor_keys()))
        return list(names)

    def steps(self, key: str) -> list[int]:
        try:
            return self._get(f"/tensors/{_quote_key(key)}/steps", f"the steps of tensor {key!r}").json()["steps"]
        except ApiError as e:
            if e.status == 404:
                raise KeyNotFoundError(e.message) from None
            raise

    def tensor(self, key: str, step: int) -> np.ndarray:
        """One request; the server answers with one range read of the part holding it."""
        return self._frame(key, step)[0]

    def _frame(self, key: str, step: int) -> tuple[np.ndarray, dict[bytes, bytes]]:
        try:
            r = self._get(f"/tensors/{_quote_key(key)}", f"tensor {key!r} at step {step}", params={"step": step})
        except ApiError as e:
            if e.status == 404:
                raise KeyNotFoundError(e.message) from None
            raise
        steps, arrays, meta = _decode(r.content, f"tensor {key!r} at step {step}")
        return arrays[int(np.flatnonzero(steps == step)[-1])], meta

    def tensors(self, key: str, steps: Iterable[int] | None = None, *,
                reuse: bool = False) -> Iterator[tuple[int, np.ndarray]]:
        """``(step, array)`` for the given steps (default: every logged step), in step order;
        each array the caller's to modify, with ``reuse`` valid only until the next is asked for.

        Many steps per request: the server streams the stored frames holding them (Arrow
        IPC, one range read each), decoded here as they arrive. A step not logged raises
        ``KeyError`` before anything is yielded from its request. A connection that breaks
        mid-stream is asked again for the steps not yet yielded."""
        if steps is None:
            yield from self._rows(key, None, reuse)
            return
        for chunk in _step_chunks(sorted(set(steps))):
            yield from self._rows(key, chunk, reuse)

    def _rows(self, key: str, steps: list[int] | None, reuse: bool = False) -> Iterator[tuple[int, np.ndarray]]:
        what = f"tensor {key!r}"
        last: int | None = None
        for attempt in range(READ_ATTEMPTS):
            if last is not None:  # resuming after a broken stream: only what is left
                rest = [s for s in (self.steps(key) if steps is None else steps) if s > last]
                if not rest:
                    return
                steps = rest
            query = "" if steps is None else "?" + urlencode([("steps", s) for s in steps])
            try:
                r = self._get(f"/tensors/{_quote_key(key)}/rows{query}", f"the steps of {what}", stream=True)
            except ApiError as e:
                if e.status == 404:
                    raise KeyNotFoundError(e.message) from None
                raise
            r.raw.decode_content = True  # whatever Content-Encoding the server chose
            try:
                with r:
                    for batch in pa.ipc.open_stream(r.raw):
                        for asked, frame in _rows(batch):
                            got, arrays, _ = _decode(frame, what, reuse=reuse)
                            for s in asked:
                                yield s, arrays[int(np.flatnonzero(got == s)[-1])]
                                last = s
                return
            except (*TRANSPORT_ERRORS, urllib3.exceptions.HTTPError, pa.ArrowInvalid, OSError) as e:
                if attempt + 1 >= READ_ATTEMPTS:
                    raise requests.ConnectionError(
                        f"reading the steps of {what} of run {self.entity}/{self.project}/{self.id}: the answer "
                        f"from {self.client.host} broke off {READ_ATTEMPTS} times: {e}") from None
