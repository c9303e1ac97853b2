"""NumPy <-> Arrow for frame contents: tensor batches, history batches, part indexes.

Tensors are canonical ``arrow.fixed_shape_tensor`` columns. Types Arrow lacks are
stored bit-exact in a storage type, with the logged dtype in field metadata:
bool as uint8, complex as a trailing axis of 2 floats, bfloat16/float8 as
unsigned ints of their width. Big-endian input is stored native and the
logged byte order restored on read.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from gradexp.core.buffers import scratch
from gradexp.core.dtypes import is_ml_dtype

META_DTYPE = b"gradexp.dtype"
META_SHAPE = b"gradexp.shape"
HIST_BINS = 64

SUMMARY_TYPE = pa.struct([
    ("count", pa.int64()),
    ("nonfinite", pa.int64()),
    ("zero_frac", pa.float64()),
    ("mean", pa.float64()),
    ("std", pa.float64()),
    ("min", pa.float64()),
    ("max", pa.float64()),
    ("norm", pa.float64()),
    ("hist", pa.list_(pa.int64())),
])


# -- NumPy <-> Arrow without pandas ----------------------------------------------------------
# pa.array() and Array.to_numpy() import pandas whenever it is installed (0.25 s, and a
# heavy module the user never asked for), so arrays are built from and read as buffers.

def from_numpy(values: np.ndarray, valid: np.ndarray | None = None,
               type: pa.DataType | None = None) -> pa.Array:
    """A primitive Arrow array over ``values`` (zero-copy where the dtype allows)."""
    values = np.ascontiguousarray(values)
    typ = type if type is not None else pa.from_numpy_dtype(values.dtype)
    data = np.packbits(values, bitorder="little") if values.dtype == np.bool_ else values
    bitmap = None if valid is None or valid.all() else pa.py_buffer(np.packbits(valid, bitorder="little"))
    return pa.Array.from_buffers(typ, len(values), [bitmap, pa.py_buffer(data)])


def strings(values: Sequence[str | None]) -> pa.Array:
    encoded = [b"" if v is None else str(v).encode() for v in values]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    valid = np.fromiter((v is not None for v in values), bool, len(values))
    bitmap = None if valid.all() else pa.py_buffer(np.packbits(valid, bitorder="little"))
    return pa.Array.from_buffers(pa.large_string(), len(encoded),
                                 [bitmap, pa.py_buffer(offsets), pa.py_buffer(b"".join(encoded))])


_NUMPY_TYPES = {pa.from_numpy_dtype(np.dtype(c)): np.dtype(c) for c in "bBhHiIlLqQefd"}


def to_numpy(arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Values of a primitive, null-free numeric array, read from its buffer."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    dtype = _NUMPY_TYPES[arr.type]
    buf = arr.buffers()[1]
    return np.frombuffer(buf, dtype=dtype, count=len(arr) + arr.offset)[arr.offset:] if buf else \
        np.empty(0, dtype)


def validity(arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """True where ``arr`` holds a value."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    bitmap = arr.buffers()[0]
    if bitmap is None or arr.null_count == 0:
        return np.ones(len(arr), bool)
    bits = np.unpackbits(np.frombuffer(bitmap, np.uint8), bitorder="little")
    return bits[arr.offset:arr.offset + len(arr)].astype(bool)


def dtype_token(dtype: np.dtype) -> str:
    """What goes in ``gradexp.dtype``: NumPy's ``dtype.str``, or the ml_dtypes name."""
    return dtype.name if is_ml_dtype(dtype) else dtype.str


def dtype_from_token(token: str) -> np.dtype:
    if token[:1] in "<>|=":
        return np.dtype(token)
    import ml_dtypes  # bfloat16, float8_*: the reader needs the type to hand it back

    return np.dtype(getattr(ml_dtypes, token))


def storage_view(arr: np.ndarray) -> np.ndarray:
    """Reinterpret a native snapshot as an Arrow-representable array (no copy)."""
    k = arr.dtype.kind
    if is_ml_dtype(arr.dtype):
        uint = np.dtype(f"u{arr.dtype.itemsize}")
        return arr.view(uint) if arr.size else np.empty(arr.shape, uint)  # (an empty view keeps V)
    if k == "b":
        return arr.view(np.uint8)
    if k == "c":
        part = np.dtype(f"f{arr.dtype.itemsize // 2}")
        return arr.reshape(-1).view(part).reshape(arr.shape + (2,))
    return arr


def shuffle_width(arr: np.ndarray) -> int:
    """Element width for the byte-shuffle filter (a complex value shuffles per component)."""
    return arr.dtype.itemsize // 2 if arr.dtype.kind == "c" else arr.dtype.itemsize


def tensor_ipc(key: str, steps: Sequence[int], stacked: np.ndarray, logical: np.dtype,
               shape: tuple[int, ...], *, reuse: bool = False,
               meta: dict[bytes, bytes] | None = None) -> pa.Buffer:
    """An IPC stream of one batch: ``step`` and ``key`` (fixed_shape_tensor), one row a step.

    ``stacked`` holds the rows' snapshots, shape ``(len(steps), *shape)``. ``meta`` (dimension
    labels, a media kind: the same for every row) joins the field's metadata.
    """
    store = storage_view(stacked)
    phys_shape = store.shape[1:] or (1,)
    size = int(np.prod(phys_shape, dtype=np.int64))
    value_type = pa.from_numpy_dtype(store.dtype)
    ttype = pa.fixed_shape_tensor(value_type, list(phys_shape))
    storage = pa.Array.from_buffers(pa.list_(value_type, size), len(steps), [None],
                                    children=[from_numpy(store.reshape(-1))])
    field = pa.field(key, ttype, nullable=False, metadata={
        **(meta or {}), META_DTYPE: dtype_token(logical).encode(), META_SHAPE: json.dumps(list(shape)).encode()})
    schema = pa.schema([pa.field("step", pa.int64(), nullable=False), field])
    batch = pa.record_batch([from_numpy(np.asarray(steps, np.int64)),
                             pa.ExtensionArray.from_storage(ttype, storage)], schema=schema)
    return _ipc(batch, reuse=reuse)


def tensor_rows(raw: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Decode a tensor frame: (steps, arrays), each array a writable view into ``raw``."""
    steps, arrays, _ = tensor_frame(raw)
    return steps, arrays


def tensor_frame(raw: np.ndarray) -> tuple[np.ndarray, list[np.ndarray], dict[bytes, bytes]]:
    """Decode a tensor frame: (steps, arrays, the field's metadata) -- the metadata holds
    the logged dtype and shape, and dimension labels and a media kind where given."""
    batch = _read_batch(raw)
    field = batch.schema.field(1)
    meta = field.metadata or {}
    logical = dtype_from_token(meta[META_DTYPE].decode())
    shape = tuple(json.loads(meta[META_SHAPE]))
    values = batch.column(1).storage.values
    buf = values.buffers()[1]
    start = buf.address - raw.ctypes.data if buf is not None else 0
    native = logical if is_ml_dtype(logical) else logical.newbyteorder("=")
    per_row = int(np.prod(shape, dtype=np.int64)) * native.itemsize
    steps = to_numpy(batch.column(0))
    flat = raw[start + values.offset * values.type.byte_width:
               start + values.offset * values.type.byte_width + per_row * len(steps)]
    arrays = []
    for i in range(len(steps)):
        a = flat[i * per_row:(i + 1) * per_row].view(native).reshape(shape)
        if not logical.isnative and not is_ml_dtype(logical):
            a = a.astype(logical)
        arrays.append(a)
    return steps, arrays, dict(meta)


def history_ipc(batch: pa.RecordBatch) -> pa.Buffer:
    return _ipc(batch)


def history_batch(raw: np.ndarray) -> pa.RecordBatch:
    return _read_batch(raw)


def _ipc(batch: pa.RecordBatch, *, reuse: bool = False) -> pa.Buffer:
    """The batch as an IPC stream; with ``reuse``, in a per-thread buffer valid until the
    thread's next such call (the writer compresses it at once; fresh memory is slow here)."""
    if not reuse:
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, batch.schema) as w:
            w.write_batch(batch)
        return sink.getvalue()
    mock = pa.MockOutputStream()
    with pa.ipc.new_stream(mock, batch.schema) as w:
        w.write_batch(batch)
    size = mock.size()
    buf = pa.py_buffer(scratch("ipc", size))
    sink = pa.FixedSizeBufferWriter(buf)
    with pa.ipc.new_stream(sink, batch.schema) as w:
        w.write_batch(batch)
    return buf


def _read_batch(raw: np.ndarray) -> pa.RecordBatch:
    reader = pa.ipc.open_stream(pa.py_buffer(raw))
    batches = list(reader)
    if len(batches) != 1:
        return pa.Table.from_batches(batches, reader.schema).combine_chunks().to_batches()[0]
    return batches[0]


def summaries_array(items: Sequence[dict[str, Any] | None]) -> pa.Array:
    """The history cells of a tensor key: a summary struct per row (null where not logged)."""
    if items and all(s is not None and s["mean"] is not None for s in items):
        return _full_summaries_array(items)  # type: ignore[arg-type]
    present = np.fromiter((s is not None for s in items), bool, len(items))
    rows = [s if s is not None else _NULL_SUMMARY for s in items]
    children = []
    for field in SUMMARY_TYPE:
        if field.name == "hist":
            lists = [r["hist"] for r in rows]
            offsets = np.zeros(len(lists) + 1, dtype=np.int32)
            np.cumsum([len(h) for h in lists], out=offsets[1:])
            flat = np.fromiter((c for h in lists for c in h), np.int64, int(offsets[-1]))
            children.append(pa.Array.from_buffers(field.type, len(lists),
                                                  [None, pa.py_buffer(offsets)],
                                                  children=[from_numpy(flat)]))
            continue
        vals = [r[field.name] for r in rows]
        valid = np.fromiter((v is not None for v in vals), bool, len(vals))
        dtype = np.int64 if field.type == pa.int64() else np.float64
        data = np.array([0 if v is None else v for v in vals], dtype=dtype)
        children.append(from_numpy(data, valid, field.type))
    mask = None if present.all() else from_numpy(~present)
    return pa.StructArray.from_arrays(children, fields=list(SUMMARY_TYPE), mask=mask)


def _full_summaries_array(items: Sequence[dict[str, Any]]) -> pa.Array:
    """``summaries_array`` when every row is logged and has finite values (so no field is
    null and every histogram has ``HIST_BINS`` counts): a NumPy array per field, not the
    per-value null checks; a third of the time for one row (the writer's usual batch)."""
    children = []
    for field in SUMMARY_TYPE:
        if field.name == "hist":
            offsets = np.arange(len(items) + 1, dtype=np.int32) * HIST_BINS
            flat = np.array([s["hist"] for s in items], np.int64).reshape(-1)
            children.append(pa.Array.from_buffers(field.type, len(items), [None, pa.py_buffer(offsets)],
                                                  children=[from_numpy(flat)]))
        else:
            dtype = np.int64 if field.type == pa.int64() else np.float64
            children.append(from_numpy(np.array([s[field.name] for s in items], dtype), None, field.type))
    return pa.StructArray.from_arrays(children, fields=list(SUMMARY_TYPE))


_NULL_SUMMARY: dict[str, Any] = {f.name: (None if f.name != "hist" else []) for f in SUMMARY_TYPE}


# -- history rows -> record batch ---------------------------------------------------------

def _column(values: list[Any]) -> pa.Array:
    """One history column from Python/NumPy scalars (None where a row lacks the key)."""
    present = [v for v in values if v is not None]
    valid = np.fromiter((v is not None for v in values), bool, len(values))
    if present and all(type(v) is str or isinstance(v, np.str_) for v in present):
        return strings(values).cast(pa.string())
    if present and all(isinstance(v, (bool, np.bool_)) for v in present):
        return from_numpy(np.array([bool(v) if v is not None else False for v in values]), valid)
    items = [None if v is None else (v.item() if isinstance(v, np.generic) else v) for v in values]
    if all(type(v) is int or type(v) is bool for v in items if v is not None):
        try:
            return from_numpy(np.array([0 if v is None else v for v in items], np.int64), valid)
        except OverflowError:  # beyond int64: float64, like every other tool that reads this
            return from_numpy(np.array([np.nan if v is None else float(v) for v in items]), valid)
    return from_numpy(np.array([np.nan if v is None else float(v) for v in items], np.float64), valid)


def rows_to_batch(steps: list[int], times: list[float], start: float,
                  rows: list[dict[str, Any]], summary_keys: dict[str, list[Any]]) -> pa.RecordBatch:
    """Build a history batch: step, _timestamp, _runtime, one column per key."""
    keys: dict[str, None] = {}
    for row in rows:
        keys.update(dict.fromkeys(row))
    ts = np.asarray(times, dtype=np.float64)
    arrays = [from_numpy(np.asarray(steps, np.int64)), from_numpy(ts), from_numpy(ts - start)]
    names = ["step", "_timestamp", "_runtime"]
    for key in keys:
        names.append(key)
        arrays.append(_column([row.get(key) for row in rows]))
    for key, items in summary_keys.items():
        names.append(key)
        arrays.append(summaries_array(items))
    return pa.record_batch(arrays, names=names)


def table_ipc(table: pa.Table) -> pa.Buffer:
    """An Arrow IPC stream of a whole table (what the server sends for history)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue()


_INDEX_SCHEMA = pa.schema([
    ("offset", pa.uint64()), ("kind", pa.uint8()), ("filter", pa.uint8()), ("elem", pa.uint8()),
    ("stored", pa.uint64()), ("raw", pa.uint64()), ("step_min", pa.int64()),
    ("step_max", pa.int64()), ("rows", pa.uint32()), ("key", pa.string()),
])


def index_to_ipc(frames: Sequence[Any]) -> pa.Buffer:
    """A part's index frame from its frames' headers (``format.FrameInfo``, read by attribute)."""
    cols = [strings([f.key for f in frames]).cast(pa.string()) if field.name == "key" else
            from_numpy(np.array([getattr(f, field.name) for f in frames],
                                dtype=_NUMPY_TYPES[field.type]))
            for field in _INDEX_SCHEMA]
    return _ipc(pa.record_batch(cols, schema=_INDEX_SCHEMA))


def index_from_ipc(raw: np.ndarray) -> list[tuple[Any, ...]]:
    """An index frame's rows, fields in ``format.FrameInfo`` order."""
    cols = _read_batch(raw).to_pydict()
    return list(zip(*(cols[n] for n in _INDEX_SCHEMA.names)))
