"""The explorer's tensor endpoints: the list of tensor keys, one tensor at one step, its steps.

A tensor goes to the browser as an Arrow IPC stream whose ``values`` column is the tensor's
data flattened in ROW-MAJOR (C) order; the schema metadata carries ``shape`` and ``dims`` (JSON),
``dtype`` (the logged dtype's name) and ``step``. The browser indexes ``values`` with the
row-major strides of ``shape`` and nothing else, so what it shows under ``[i, j, ...]`` is
``a[i, j, ...]`` for every shape and dtype.

Every read goes through :class:`gradexp.read.reader.RunReader`, in a worker thread.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import zstandard
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from gradexp.core.arrow import from_numpy
from gradexp.explorer.responses import ARROW_STREAM, HEADERS, RUN_API, api, json_response
from gradexp.write.values import is_ml_dtype

if TYPE_CHECKING:
    from gradexp.explorer.context import Explorer
    from gradexp.read.reader import RunReader

__all__ = ["dims_of", "finite_range", "routes", "tensor_info", "tensor_ipc"]


class BadRequest(ValueError):
    """A query parameter is missing or malformed (answered 400, naming it)."""


def wire_values(arr: np.ndarray) -> tuple[pa.Array, pa.Array | None]:
    """``arr`` flattened row-major as Arrow values the browser can read, exactly.

    float16 and the ml_dtypes floats (bfloat16, float8_*) widen to float32, which holds each
    of their values exactly; bool goes as uint8 0/1; complex as two float columns (real,
    imaginary); every other dtype goes as is, in native byte order. (Arrow arrays over the
    buffers: ``pa.array`` would import pandas, a second on a server's first tensor.)
    """
    flat = np.ascontiguousarray(arr).reshape(-1)
    dt = flat.dtype
    if is_ml_dtype(dt) or (dt.kind == "f" and dt.itemsize < 4):
        return from_numpy(flat.astype(np.float32)), None
    if dt.kind == "b":
        return from_numpy(flat.view(np.uint8)), None
    if dt.kind == "c":
        part = np.float32 if dt.itemsize <= 8 else np.float64
        return from_numpy(flat.real.astype(part)), from_numpy(flat.imag.astype(part))
    if not dt.isnative:
        flat = flat.astype(dt.newbyteorder("="))
    return from_numpy(flat), None


def dtype_name(dt: np.dtype) -> str:
    """The dtype as users know it: ``float32``, ``bfloat16``, ``bool`` (byte order dropped)."""
    return dt.name


def tensor_ipc(arr: np.ndarray, *, step: int, dims: Sequence[str] | None = None) -> bytes:
    """One tensor as an Arrow IPC stream: ``values`` (and ``imag`` for complex), row-major.
    ``dims`` (JSON in the schema metadata) names the axes, or is ``null``; labels that do not
    match the tensor's number of axes are dropped."""
    values, imag = wire_values(arr)
    columns = {"values": values} if imag is None else {"values": values, "imag": imag}
    named = list(dims) if dims is not None and len(dims) == arr.ndim else None
    meta = {"shape": json.dumps(list(arr.shape)), "dtype": dtype_name(arr.dtype),
            "step": str(step), "dims": json.dumps(named)}
    table = pa.table(columns).replace_schema_metadata(meta)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def tensor_info(reader: RunReader, key: str, first_step: int) -> dict[str, Any]:
    """``{dtype, shape, dims}`` of tensor ``key`` as first logged (at ``first_step``).

    The reader holds no dtype or shape outside the tensors themselves, so this decodes one
    tensor per key, once: the caller caches it per (run, key, first step), so a live page that
    lists the tensors every second or two decodes nothing new as steps arrive.
    """
    arr = reader.tensor(key, first_step)
    return {"dtype": dtype_name(arr.dtype), "shape": list(arr.shape), "dims": dims_of(reader, key, first_step)}


def dims_of(reader: RunReader, key: str, step: int) -> list[str] | None:
    """The dimension labels tensor ``key`` was logged with at ``step`` (``log(t, name=...,
    dimension_labels=[...])``), where the reader knows them (its ``dims`` method), else None."""
    dims = getattr(reader, "dims", None)
    if dims is None:
        return None
    got = dims(key, step)
    return None if got is None else [str(d) for d in got]


def finite_range(reader: RunReader, key: str) -> dict[str, float | None]:
    """The least and greatest finite value of tensor ``key`` over all its steps (complex: by
    magnitude, bool as 0/1), from the history's per-step summaries where the run has them."""
    try:
        column = reader.history([key]).column(key)
    except KeyError:
        column = None
    if column is not None and pa.types.is_struct(column.type) and column.null_count == 0:
        lo = pc.min(pc.struct_field(column, "min")).as_py()
        hi = pc.max(pc.struct_field(column, "max")).as_py()
        return {"min": lo, "max": hi}
    lo_v, hi_v = np.inf, -np.inf
    for _, arr in reader.tensors(key):
        x = _magnitude(arr)
        x = x[np.isfinite(x)]
        if x.size:
            lo_v, hi_v = min(lo_v, float(x.min())), max(hi_v, float(x.max()))
    return {"min": lo_v, "max": hi_v} if lo_v <= hi_v else {"min": None, "max": None}


def _magnitude(arr: np.ndarray) -> np.ndarray:
    """The real values a colour scale is over: magnitudes of complex, 0/1 for bool."""
    k = arr.dtype.kind
    if k == "c":
        return np.abs(arr)
    if k == "b":
        return arr.view(np.uint8)
    if is_ml_dtype(arr.dtype):
        return arr.astype(np.float32)
    return arr


def _query(request: Request, name: str) -> str:
    value = request.query_params.get(name)
    if value is None or value == "":
        raise BadRequest(f"query parameter {name!r} is required")
    return value


def _step(request: Request) -> int:
    raw = _query(request, "step")
    try:
        return int(raw)
    except ValueError:
        raise BadRequest(f"query parameter 'step' must be an integer, not {raw!r}") from None


def routes(explorer: Explorer) -> list[BaseRoute]:
    """The tensor endpoints, ``/api/runs/{entity}/{project}/{run_id}/...`` under ``/_x``.

    Errors answer as every explorer endpoint does (``responses.api``): an unknown run, key or step
    404 with a message naming it, a malformed parameter 400.
    """
    def labels(reader: RunReader, ref: tuple[str, str, str], key: str) -> list[str] | None:
        """The labels of ``key`` as first logged (cached with its dtype and shape: a scrub reads
        one frame, not two)."""
        first = reader.steps(key)[0]
        ckey = ("tensor-info", *ref, key, first)
        info = explorer.cache.get(ckey)
        if info is None:
            info = tensor_info(reader, key, first)
            explorer.cache.put(ckey, info, 256 + len(key))
        return info["dims"]

    async def reader_for(request: Request) -> tuple[RunReader, tuple[str, str, str]]:
        p = request.path_params
        ref = (p["entity"], p["project"], p["run_id"])
        return await explorer.run(request, *ref), ref

    async def list_tensors(request: Request) -> Response:
        """``GET .../tensors`` -> JSON ``[{key, dtype, shape, steps, dims}]`` in key order: dtype and
        shape as first logged, ``steps`` the number of logged steps."""
        reader, ref = await reader_for(request)

        def work() -> list[dict[str, Any]]:
            out = []
            for key in sorted(reader.tensor_keys()):
                steps = reader.steps(key)
                ckey = ("tensor-info", *ref, key, steps[0])
                info = explorer.cache.get(ckey)
                if info is None:
                    info = tensor_info(reader, key, steps[0])
                    explorer.cache.put(ckey, info, 256 + len(key))
                out.append({"key": key, "dtype": info["dtype"], "shape": info["shape"], "steps": len(steps),
                            "dims": info["dims"]})
            return out

        return json_response(await explorer.in_worker(work))

    async def steps_of(request: Request) -> Response:
        """``GET .../steps?key=K`` -> JSON ``{steps: [...]}`` ascending."""
        key = _query(request, "key")
        reader, _ = await reader_for(request)
        return json_response({"steps": await explorer.in_worker(reader.steps, key)})

    async def tensor_at(request: Request) -> Response:
        """``GET .../tensor?key=K&step=S`` -> Arrow IPC of the tensor, row-major (see module).

        Sent zstd-compressed when the client accepts it, else uncompressed (never gzip, see
        below): a 1024x1024 float32 tensor compresses with zstd in milliseconds.
        """
        key, step = _query(request, "key"), _step(request)
        reader, ref = await reader_for(request)
        zstd = "zstd" in request.headers.get("accept-encoding", "")
        ckey = ("tensor-ipc", *ref, key, step, zstd)
        body = explorer.cache.get(ckey)
        if body is None:
            def work() -> bytes:
                data = tensor_ipc(reader.tensor(key, step), step=step, dims=labels(reader, ref, key))
                out = zstandard.ZstdCompressor(level=1).compress(data) if zstd else data  # one a call: not thread-safe
                if reader.status != "running":  # a live run may rewrite a step: last write wins
                    explorer.cache.put(ckey, out, len(out))
                return out
            body = await explorer.in_worker(work)
        # Without zstd the bytes go as they are: gzip gains ~7% on float data for ~170 ms per
        # 4 MB here, longer than the whole scrub should take; "identity" keeps GZip away.
        headers = {**HEADERS, "Cache-Control": "no-store", "Vary": "Accept-Encoding",
                   "Content-Encoding": "zstd" if zstd else "identity"}
        return Response(body, media_type=ARROW_STREAM, headers=headers)

    async def value_range(request: Request) -> Response:
        """``GET .../tensor-range?key=K`` -> JSON ``{min, max}`` over the finite values of every
        step (``null`` when there is none), for a colour scale fixed across steps.

        Taken from the per-step summaries in the history (exact min and max, no tensor decoded);
        a run logged without summaries is scanned step by step instead.
        """
        key = _query(request, "key")
        reader, ref = await reader_for(request)

        def work() -> dict[str, float | None]:
            steps = reader.steps(key)
            ckey = ("tensor-range", *ref, key, len(steps), steps[-1])
            cached = explorer.cache.get(ckey)
            if cached is None:
                cached = finite_range(reader, key)
                explorer.cache.put(ckey, cached, 64)
            return cached

        return json_response(await explorer.in_worker(work))

    return [Route(f"{RUN_API}/tensors", api(list_tensors)),
            Route(f"{RUN_API}/tensor", api(tensor_at)),
            Route(f"{RUN_API}/steps", api(steps_of)),
            Route(f"{RUN_API}/tensor-range", api(value_range))]
