"""What ``log()`` accepts: flatten nested dicts, check keys and types, snapshot tensors.

Everything here runs on the caller's thread, so it does the least that keeps the
contract: validate before anything is queued, copy tensor memory once (the caller
may mutate it right after), and leave every costlier step to the writer thread.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import Any, Protocol, cast

import numpy as np

from gradexp.core.buffers import BufferPool
from gradexp.core.dtypes import is_ml_dtype
from gradexp.core.errors import InvalidTypeError, InvalidValueError
from gradexp.core.limits import INT_MAX, INT_MIN, MAX_KEY_LENGTH

# Kinds a key keeps for the life of a run: history columns need one type per key.
NUMBER = "number"
TEXT = "text"
TENSOR = "tensor"

RESERVED_KEYS = frozenset({"step"})
_NUMBER_TYPES = frozenset({int, float, bool})
_REAL_KINDS = frozenset("biuf")
_TENSOR_KINDS = frozenset("biufc")


def check_key(key: Any, *, top_level: bool) -> str:
    """Validate one key segment (or a whole flat key) and return it."""
    if type(key) is not str:
        if isinstance(key, str):
            return check_key(str(key), top_level=top_level)
        raise InvalidTypeError(f"log() keys must be str; got {type(key).__name__} {key!r}")
    if not key or "\x00" in key or key.startswith("/") or key.endswith("/") or "//" in key:
        raise InvalidValueError(f"log() key {key!r} is empty, has an empty '/' segment or a NUL byte")
    if len(key) > MAX_KEY_LENGTH:
        _too_long(key)
    if not key.isascii():
        try:
            key.encode()
        except UnicodeEncodeError:
            raise InvalidValueError(f"log() key {key!r} is not valid Unicode (it holds a lone surrogate)") from None
    if top_level and (key[0] == "_" or key in RESERVED_KEYS):
        raise InvalidValueError(
            f"log() key {key!r} is reserved: keys starting with '_' and 'step' are gradexp's "
            "own history columns (pass the step as log(..., step=N))"
        )
    return key


def _too_long(key: str) -> None:
    raise InvalidValueError(f"log() key {key[:60]!r}... is {len(key)} characters long; keys (nested ones "
                     f"counted whole, as 'a/b/c') may have at most {MAX_KEY_LENGTH}")


def tensor_from(value: Any, key: str) -> np.ndarray | None:
    """Return a NumPy view of an array-like (no copy where avoidable), or None if it is not one.

    Duck typing only: torch, jax and cupy are never imported here. A GPU tensor is
    copied to host by its own ``.cpu()``/``.get()``; that is the one device sync.
    """
    if type(value) is np.ndarray:
        return value
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch.Tensor
        return _torch_to_numpy(value, key)
    if hasattr(value, "__cuda_array_interface__") and hasattr(value, "get"):  # cupy
        return np.asarray(value.get())
    if isinstance(value, (list, tuple)):
        try:
            arr = np.asarray(value)
        except (ValueError, TypeError) as e:  # ragged nesting, or items NumPy cannot combine
            raise InvalidValueError(f"log() key {key!r}: the {type(value).__name__} is not a rectangular array "
                             f"of numbers ({e})") from None
        return arr if arr.dtype.kind in _TENSOR_KINDS else None
    ma = sys.modules.get("numpy.ma")  # not imported: nothing can be a masked array
    if ma is not None and isinstance(value, ma.MaskedArray):
        raise InvalidTypeError(f"log() key {key!r}: a masked array's mask would be lost; log "
                        "value.filled(fill) or value.data, and the mask (np.ma.getmaskarray(value)) "
                        "under a key of its own")
    if hasattr(value, "__array__"):
        return np.asarray(value)
    if hasattr(value, "__dlpack__"):
        return np.from_dlpack(value)
    return None


def _torch_to_numpy(t: Any, key: str) -> np.ndarray:
    t = t.detach()
    if getattr(t.device, "type", "cpu") != "cpu":
        t = t.cpu()
    torch = sys.modules.get(type(t).__module__.split(".")[0])
    name = str(t.dtype).rpartition(".")[2]
    if torch is not None and name in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
        import ml_dtypes  # only reached when the user logs such a tensor

        raw = t.view(torch.int16 if name == "bfloat16" else torch.uint8)
        return raw.numpy().view(getattr(ml_dtypes, name))
    if hasattr(t, "resolve_conj"):
        t = t.resolve_conj().resolve_neg()
    return t.numpy()


def storage_dtype(dtype: np.dtype) -> np.dtype:
    """The native-order dtype a snapshot of ``dtype`` is copied into."""
    if is_ml_dtype(dtype):
        return dtype
    return dtype.newbyteorder("=")


def snapshot(arr: np.ndarray, key: str, pool: BufferPool | None = None) -> np.ndarray:
    """Copy ``arr`` into native-order C-contiguous memory (the one copy ``log()`` makes).

    The result is a view of a uint8 buffer (its ``.base``) taken from ``pool``.
    """
    dtype = arr.dtype
    too_wide = dtype.itemsize > (16 if dtype.kind == "c" else 8)  # float128 has no Arrow type
    if (dtype.kind not in _TENSOR_KINDS or too_wide) and not is_ml_dtype(dtype):
        raise InvalidTypeError(
            f"log() key {key!r}: arrays of dtype {dtype} cannot be logged "
            "(numeric, bool, complex, bfloat16 and float8 arrays can)"
        )
    target = storage_dtype(dtype)
    buf = pool.take(arr.nbytes) if pool is not None else np.empty(arr.nbytes, dtype=np.uint8)
    out = buf.view(target).reshape(arr.shape) if arr.nbytes else np.empty(arr.shape, target)
    np.copyto(out, arr, casting="equiv")  # also swaps big-endian input to native order
    return out


class Keys:
    """A run's key registry: each key's kind, and the keys known to hold numbers."""

    __slots__ = ("kinds", "numbers")

    def __init__(self) -> None:
        self.kinds: dict[str, str] = {}
        self.numbers: set[str] = set()

    def add(self, new: Mapping[str, str]) -> None:
        self.kinds.update(new)
        self.numbers.update(k for k, kind in new.items() if kind is NUMBER)


class Bundle(Protocol):
    """Tensors captured together (``gradexp.watch``: a model's at one step) that travel to
    the writer as one item: the caller's thread does per-capture work, not per-tensor work,
    and the writer thread makes the :class:`Tensor` of each."""

    @property
    def keys(self) -> Sequence[str]:
        """The keys, in order."""

    @property
    def keyset(self) -> AbstractSet[str]:
        """The same keys, for membership tests."""

    def items(self) -> Iterable[tuple[str, Tensor]]:
        """Each key and its tensor (on the writer thread, or where a merge must override keys)."""


class Prepared:
    """One ``log()`` call, validated: flat scalars, tensor snapshots, bundles of tensors
    captured outside ``log()`` and the byte count of both. No key is in two of them."""

    __slots__ = ("scalars", "tensors", "bundles", "nbytes")

    def __init__(self) -> None:
        self.scalars: dict[str, Any] = {}
        self.tensors: dict[str, Tensor] = {}
        self.bundles: tuple[Bundle, ...] = ()
        self.nbytes = 0

    def tensor_items(self) -> Iterator[tuple[str, Tensor]]:
        """Every tensor: the bundles' first, then the snapshots'."""
        for b in self.bundles:
            yield from b.items()
        yield from self.tensors.items()

    def unbundle(self) -> None:
        """Turn the bundles into entries of ``tensors``, so that a merge can replace some."""
        if self.bundles:
            tensors: dict[str, Tensor] = {}
            for b in self.bundles:
                tensors.update(b.items())
            tensors.update(self.tensors)
            self.tensors = tensors
            self.bundles = ()

    def overlaps(self, other: Prepared) -> bool:
        """Does one of this row's bundles hold a key ``other`` holds too?"""
        sets = [b.keyset for b in self.bundles]
        for keys in (other.scalars, other.tensors, *(b.keys for b in other.bundles)):
            for k in keys:
                for s in sets:
                    if k in s:
                        return True
        return False


class Tensor:
    """A snapshot plus the dtype the user logged (which may be big-endian), and the frame
    metadata it carries (dimension labels, a media kind; see :mod:`gradexp.core.media`)."""

    __slots__ = ("array", "logical", "meta")

    def __init__(self, array: np.ndarray, logical: np.dtype, meta: dict[bytes, bytes] | None = None) -> None:
        self.array = array
        self.logical = logical
        self.meta = meta

    @property
    def buffer(self) -> np.ndarray:
        """The uint8 buffer the snapshot is a view of (handed back to the pool)."""
        base = self.array
        while base.base is not None and isinstance(base.base, np.ndarray):
            base = base.base
        return base


def prepare(data: Mapping[str, Any], keys: Keys, pool: BufferPool | None = None) -> Prepared:
    """Flatten, validate and snapshot ``data``; raise before anything is queued.

    A key may not change kind; new keys are registered only once the whole call
    has validated.
    """
    out = Prepared()
    if type(data) is dict:
        # Fast path, the common training-loop call: flat, Python numbers, keys seen before.
        numbers = keys.numbers
        lo, hi = INT_MIN, INT_MAX
        for k, v in data.items():
            tv = type(v)
            if k not in numbers or (tv is not float and tv is not bool
                                    and (tv is not int or not lo <= v <= hi)):
                break  # the full walk below checks (and names) whatever is not plain
        else:
            out.scalars = data.copy()
            return out
    elif not isinstance(data, Mapping):
        raise InvalidTypeError(f"log() takes a dict of values (or one value with name=...); got {type(data).__name__}")
    new_kinds: dict[str, str] = {}
    _walk(data, "", keys.kinds, new_kinds, out, pool)
    if new_kinds:
        keys.add(new_kinds)
    return out


def _walk(data: Mapping[str, Any], prefix: str, kinds: dict[str, str], new: dict[str, str],
          out: Prepared, pool: BufferPool | None) -> None:
    scalars = out.scalars
    tensors = out.tensors
    for key, value in data.items():
        if prefix:
            key = prefix + check_key(key, top_level=False)
            if len(key) > MAX_KEY_LENGTH:
                _too_long(key)  # also bounds the nesting depth (a segment and its '/')
        elif key not in kinds:
            key = check_key(key, top_level=True)
        tv = type(value)
        if tv in _NUMBER_TYPES:
            kind = NUMBER
            if tv is int and not INT_MIN <= value <= INT_MAX:
                _out_of_range(key, value)
        elif tv is str:
            kind = TEXT
        elif tv is dict or isinstance(value, Mapping):
            _walk(value, key + "/", kinds, new, out, pool)
            continue
        elif isinstance(value, np.generic) and value.dtype.kind != "c":
            kind = _scalar_kind(value, key)
        else:
            meta = None
            if hasattr(tv, "_gradexp_media"):  # gradexp.Histogram, Image, Table
                value, meta = value._gradexp_tensor()
            arr = tensor_from(value, key)
            if arr is None:
                raise InvalidTypeError(
                    f"log() key {key!r}: cannot log a value of type {tv.__module__}.{tv.__qualname__} "
                    "(log numbers, strings, arrays or tensors; nest dicts for groups)"
                )
            if meta is None and arr.ndim == 0 and (arr.dtype.kind in _REAL_KINDS or is_ml_dtype(arr.dtype)):
                value = cast(np.generic, arr[()])  # indexing a 0-d array by () gives a NumPy scalar
                kind = _scalar_kind(value, key)
            else:
                if meta is not None:
                    from gradexp.core.media import check_dims

                    check_dims(key, meta, arr.ndim)
                kind = TENSOR
        if key in scalars or key in tensors:
            raise InvalidValueError(f"log() key {key!r} is given twice in one call (a nested dict and a "
                             "'/' in a key flatten to the same name); give it once")
        seen = kinds.get(key) or new.get(key)
        if seen is None:
            new[key] = kind
        elif seen != kind:
            raise InvalidTypeError(
                f"log() key {key!r} was logged as a {seen} before and is a {kind} now; "
                "a key keeps one kind for the whole run"
            )
        if kind is not TENSOR:
            scalars[key] = value
        else:
            assert arr is not None  # the kind is TENSOR only where arr was set
            snap = snapshot(arr, key, pool)
            tensors[key] = Tensor(snap, arr.dtype, meta)
            out.nbytes += snap.nbytes


def _scalar_kind(value: np.generic, key: str) -> str:
    dtype = value.dtype
    k = dtype.kind
    if k == "f" and dtype.itemsize > 8 and not is_ml_dtype(dtype):
        raise InvalidTypeError(f"log() key {key!r}: a NumPy {dtype} scalar does not fit float64, the type "
                        "history stores numbers in; log float(value) if rounding it is fine")
    if k == "u" and dtype.itemsize == 8 and value.item() > INT_MAX:
        _out_of_range(key, value)
    if k in _REAL_KINDS or is_ml_dtype(dtype):
        return NUMBER
    if k == "U":
        return TEXT
    raise InvalidTypeError(f"log() key {key!r}: cannot log a NumPy {dtype} scalar")


def _out_of_range(key: str, value: Any) -> None:
    raise InvalidValueError(f"log() key {key!r}: {value} is outside int64 (history stores integers as "
                     "int64); log it as a float or a string")
