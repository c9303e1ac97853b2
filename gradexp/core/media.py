"""Media values for ``log()``: :class:`Histogram`, :class:`Image`, :class:`Table` (as in wandb).

Each is stored as one tensor, bit-exact, with what else it needs in the tensor frame's Arrow
field metadata (the same for every row of a frame): a histogram keeps its full values (or,
made from ``np_histogram=``, its counts) and its bin edges; an image its uint8 pixels and
caption; a table the Arrow IPC stream of its rows as a uint8 tensor. Readers turn the
tensor back into the object with :func:`from_frame`. Dimension labels (``log(t, name=...,
dimension_labels=...)``) travel the same way.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from gradexp.core.errors import InvalidTypeError, InvalidValueError

__all__ = ["Histogram", "Image", "Labelled", "Table", "check_dims", "from_frame", "labels"]

MEDIA = b"gradexp.media"
"""Frame metadata: the media kind (``histogram``, ``image``, ``table``); absent for a tensor."""
DIMS = b"gradexp.dims"
"""Frame metadata: the tensor's dimension labels, joined by :data:`_SEP`."""
EDGES = b"gradexp.edges"
"""Frame metadata: a histogram's bin edges, float64 little-endian bytes (exact, no text)."""
CAPTION = b"gradexp.caption"
COUNTS = b"gradexp.histogram"
"""Frame metadata of a histogram given as counts (``np_histogram=``): ``counts``; of one
given its values: the counts, int64 little-endian bytes (as computed, never recomputed)."""
_SEP = "\x1f"  # ASCII unit separator: never in a sensible label


class Histogram:
    """A histogram of ``sequence`` (``num_bins`` equal bins, NumPy's), keeping every value; or
    one given as ``np_histogram=(counts, edges)``, as ``np.histogram`` returns it.

    ``values`` (None for ``np_histogram=``), ``histogram`` (the counts) and ``bins`` (the
    edges, float64) are read back alike.
    """

    _gradexp_media = "histogram"

    def __init__(self, sequence: Any = None, *, np_histogram: tuple[Any, Any] | None = None,
                 num_bins: int = 64) -> None:
        if (sequence is None) == (np_histogram is None):
            raise InvalidValueError("Histogram takes values or np_histogram=(counts, edges), one of them")
        if np_histogram is not None:
            counts, edges = (np.asarray(a) for a in np_histogram)
            if counts.ndim != 1 or edges.shape != (counts.size + 1,):
                raise InvalidValueError(f"Histogram np_histogram=: {counts.size} counts need "
                                        f"{counts.size + 1} edges; got {edges.size}")
            self.values: np.ndarray | None = None
            self.histogram = counts
        else:
            values = _host(sequence, "Histogram")
            if values.dtype.kind not in "biuf":
                raise InvalidTypeError(f"Histogram values must be numbers; got dtype {values.dtype}")
            if not 1 <= num_bins <= 512:
                raise InvalidValueError(f"Histogram num_bins must be 1..512; got {num_bins}")
            self.values = values
            finite = values[np.isfinite(values)] if values.dtype.kind == "f" else values
            self.histogram, edges = np.histogram(finite, bins=num_bins)
        self.bins = np.asarray(edges, dtype=np.float64)

    def _gradexp_tensor(self) -> tuple[np.ndarray, dict[bytes, bytes]]:
        meta = {MEDIA: b"histogram", EDGES: self.bins.astype("<f8").tobytes()}
        if self.values is None:
            meta[COUNTS] = b"counts"
            return self.histogram, meta
        meta[COUNTS] = self.histogram.astype("<i8").tobytes()
        return self.values, meta

    def __repr__(self) -> str:
        n = "counts only" if self.values is None else f"{self.values.size} values"
        return f"<gradexp.Histogram {len(self.bins) - 1} bins, {n}>"


class Image:
    """An image, stored as its uint8 pixels: ``(H, W)``, ``(H, W, 3)`` or ``(H, W, 4)``.

    Takes a NumPy array or array-like (a torch ``(C, H, W)`` tensor is moved to ``(H, W,
    C)``, as wandb does), a PIL image, or a file path (read with PIL). Floats are taken as
    0..1 when every value is, else as 0..255; both are rounded to nearest and clipped.
    """

    _gradexp_media = "image"

    def __init__(self, data_or_path: Any, mode: str | None = None, caption: str | None = None) -> None:
        if isinstance(data_or_path, str):
            from PIL import Image as PILImage  # only for a path

            data_or_path = PILImage.open(data_or_path)
        if type(data_or_path).__module__.startswith("PIL."):
            if mode is not None:
                data_or_path = data_or_path.convert(mode)
            arr = np.asarray(data_or_path)
        else:
            arr = _host(data_or_path, "Image")
            if hasattr(data_or_path, "detach") and arr.ndim == 3 and arr.shape[0] in (1, 3, 4) \
                    and arr.shape[-1] not in (1, 3, 4):
                arr = np.moveaxis(arr, 0, -1)  # torch's channels-first
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
            raise InvalidValueError(f"Image takes (H, W), (H, W, 3) or (H, W, 4) pixels; got shape {arr.shape}")
        if arr.dtype != np.uint8:
            if arr.dtype.kind not in "biuf":
                raise InvalidTypeError(f"Image pixels must be numbers; got dtype {arr.dtype}")
            f = arr.astype(np.float64)
            if arr.dtype.kind in "bf" and f.size and np.nanmin(f) >= 0 and np.nanmax(f) <= 1:
                f = f * 255
            arr = np.clip(np.rint(np.nan_to_num(f)), 0, 255).astype(np.uint8)
        if caption is not None and not isinstance(caption, str):
            raise InvalidTypeError(f"Image caption must be a str; got {type(caption).__name__}")
        self.array: np.ndarray = arr
        self.caption = caption

    def _gradexp_tensor(self) -> tuple[np.ndarray, dict[bytes, bytes]]:
        meta = {MEDIA: b"image"}
        if self.caption is not None:
            meta[CAPTION] = self.caption.encode()
        return self.array, meta

    def __repr__(self) -> str:
        return f"<gradexp.Image {self.array.shape} caption={self.caption!r}>"


class Table:
    """Rows of values under named columns, stored as an Arrow table (its IPC stream).

    ``Table(columns=[...], data=[[...], ...])``, ``Table(dataframe=df)`` or
    ``Table.from_arrow(t)``; rows can be added with :meth:`add_data`. Read back, ``columns``
    and ``data`` are as given (Arrow's types), and :meth:`to_arrow` is the table.
    """

    _gradexp_media = "table"

    def __init__(self, columns: Sequence[str] | None = None, data: Sequence[Sequence[Any]] | None = None,
                 *, dataframe: Any = None) -> None:
        if dataframe is not None:
            import pyarrow as pa

            self._arrow: Any = pa.Table.from_pandas(dataframe, preserve_index=False)
            self.columns = list(self._arrow.column_names)
            self.data = [list(r.values()) for r in self._arrow.to_pylist()]
            return
        rows = [list(r) for r in (data or [])]
        if columns is None:
            columns = [f"col{i}" for i in range(len(rows[0]))] if rows else []
        self.columns = [str(c) for c in columns]
        if len(set(self.columns)) != len(self.columns):
            raise InvalidValueError(f"Table columns must be distinct; got {self.columns}")
        for r in rows:
            self._check_row(r)
        self.data = rows
        self._arrow = None

    @classmethod
    def from_arrow(cls, table: Any) -> Table:
        t = cls(columns=table.column_names)
        t.data = [list(r.values()) for r in table.to_pylist()]
        t._arrow = table
        return t

    def _check_row(self, row: Sequence[Any]) -> None:
        if len(row) != len(self.columns):
            raise InvalidValueError(f"Table row {list(row)!r} has {len(row)} values for "
                                    f"{len(self.columns)} columns {self.columns}")

    def add_data(self, *values: Any) -> None:
        """Append one row."""
        self._check_row(values)
        self.data.append(list(values))
        self._arrow = None

    def to_arrow(self) -> Any:
        """The rows as a ``pyarrow.Table``."""
        if self._arrow is None:
            import pyarrow as pa

            try:
                self._arrow = pa.table({c: [r[i] for r in self.data] for i, c in enumerate(self.columns)})
            except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
                raise InvalidTypeError(f"Table: a column holds values Arrow cannot store together ({e})") from None
        return self._arrow

    def _gradexp_tensor(self) -> tuple[np.ndarray, dict[bytes, bytes]]:
        import pyarrow as pa

        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, self.to_arrow().schema) as w:
            w.write_table(self.to_arrow())
        return np.frombuffer(sink.getvalue(), dtype=np.uint8), {MEDIA: b"table"}

    def __repr__(self) -> str:
        return f"<gradexp.Table {len(self.data)} rows, columns {self.columns}>"


def _host(value: Any, what: str) -> np.ndarray:
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch
        value = value.detach().cpu()
        if "bfloat16" in str(value.dtype):
            value = value.float()
    cupy = sys.modules.get("cupy")
    if cupy is not None and isinstance(value, cupy.ndarray):
        value = value.get()
    try:
        return np.asarray(value)
    except (TypeError, ValueError) as e:
        raise InvalidTypeError(f"{what}: cannot make an array of {type(value).__name__} ({e})") from None


class Labelled:
    """A tensor with named dimensions, as ``log(t, name=..., dimension_labels=...)`` gives it."""

    _gradexp_media = "dims"

    def __init__(self, value: Any, labels: Sequence[str]) -> None:
        labels = [labels] if isinstance(labels, str) else list(labels)
        if not all(isinstance(x, str) and x and _SEP not in x for x in labels):
            raise InvalidValueError(f"dimension_labels must be non-empty strings; got {labels!r}")
        self.value = value
        self.labels = labels

    def _gradexp_tensor(self) -> tuple[Any, dict[bytes, bytes]]:
        return self.value, {DIMS: _SEP.join(self.labels).encode()}


def check_dims(key: str, meta: dict[bytes, bytes], ndim: int) -> None:
    """The labels in ``meta`` must name each of the tensor's ``ndim`` dimensions."""
    found = labels(meta)
    if found is not None and len(found) != ndim:
        raise InvalidValueError(f"log() key {key!r}: dimension_labels {list(found)!r} name {len(found)} "
                                f"dimensions; the tensor has {ndim}")


def labels(meta: dict[bytes, bytes]) -> tuple[str, ...] | None:
    """The dimension labels in a frame's metadata, if any."""
    raw = meta.get(DIMS)
    return None if raw is None else tuple(raw.decode().split(_SEP))


def from_frame(array: np.ndarray, meta: dict[bytes, bytes]) -> Any:
    """The logged value a tensor frame holds: a media object, or the array itself."""
    kind = meta.get(MEDIA)
    if kind == b"histogram":
        edges = np.frombuffer(meta[EDGES], dtype="<f8").astype(np.float64)
        h = Histogram.__new__(Histogram)
        h.bins = edges
        counts = meta[COUNTS]
        if counts == b"counts":
            h.values, h.histogram = None, array
        else:
            h.values, h.histogram = array, np.frombuffer(counts, dtype="<i8").astype(np.int64)
        return h
    if kind == b"image":
        img = Image.__new__(Image)
        img.array = array
        caption = meta.get(CAPTION)
        img.caption = None if caption is None else caption.decode()
        return img
    if kind == b"table":
        import pyarrow as pa

        return Table.from_arrow(pa.ipc.open_stream(pa.py_buffer(array.tobytes())).read_all())
    return array

