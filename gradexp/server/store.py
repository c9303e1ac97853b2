"""Object storage through ``pyarrow.fs``: a local folder by default, S3 in production.

Object keys are built here from validated ids only (database integers, checked run
ids, a fixed set of stream names, hex digests), never from a raw user string, so no
request can reach outside its run's prefix.

A part's key holds the SHA-256 of its bytes: an object under a part key only ever has
that one content, so concurrent uploads of different bytes to one (run, stream, seq)
write different objects, and the key recorded in SQL by the upload that won always
names the winner's bytes.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

from gradexp.core.layout import NAME, STREAMS

_SHA256 = re.compile(r"^[0-9a-f]{64}\Z")
_COPY_CHUNK = 8 << 20
_SPOOL = ".incoming"
"""Folder (under a local store's root) of request bodies being received."""


class Store:
    """Immutable objects under one root (a folder, or ``s3://bucket/prefix``)."""

    def __init__(self, url: str) -> None:
        self.url = url
        if "://" not in url or url.startswith("file://"):
            root = Path(urlparse(url).path if url.startswith("file://") else url).expanduser().absolute()
            root.mkdir(parents=True, exist_ok=True)
            self.fs: pafs.FileSystem = pafs.SubTreeFileSystem(str(root), pafs.LocalFileSystem())
            self.local_root: Path | None = root
        else:
            fs, path = pafs.FileSystem.from_uri(url)
            self.fs = pafs.SubTreeFileSystem(path.rstrip("/"), fs) if path.strip("/") else fs
            self.local_root = None

    @staticmethod
    def part_key(entity_id: int, project_id: int, run_id: str, stream: str, seq: int, sha256: str) -> str:
        """The key of a part with these bytes (their SHA-256 in hex): content-addressed."""
        if stream not in STREAMS or not isinstance(seq, int) or not _SHA256.match(sha256):
            raise ValueError(f"invalid part address {stream!r}/{seq!r}/{sha256!r}")
        return f"{_run_prefix(entity_id, project_id, run_id)}/parts/{stream}-{seq:06d}-{sha256}.gxp"

    @staticmethod
    def history_key(entity_id: int, project_id: int, run_id: str, first: int | None = None,
                    last: int | None = None) -> str:
        prefix = _run_prefix(entity_id, project_id, run_id)
        if first is None:
            return f"{prefix}/history.parquet"
        return f"{prefix}/history-segments/{first:06d}-{last:06d}.parquet"

    @staticmethod
    def record_key(entity_id: int, project_id: int, run_id: str) -> str:
        """The run's record (run.json and provenance, as the client sent them last)."""
        return f"{_run_prefix(entity_id, project_id, run_id)}/record.json"

    def put(self, key: str, data: bytes) -> None:
        if self.local_root is not None:
            target = self._local_target(key)
            # Write beside and rename: a reader never sees a half-written object. The
            # temporary name is unique (mkstemp), so concurrent writers of one key, in any
            # thread or process, each rename a whole object of their own.
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, target)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise
            return
        self._make_parent(key)
        with self.fs.open_output_stream(key) as out:
            out.write(data)

    def put_file(self, key: str, path: Path) -> None:
        """Store the file at ``path`` (a spool file of :meth:`spool`) as ``key``; the file is
        consumed: moved into place in a local store, copied (then left to the caller) in S3."""
        if self.local_root is not None:
            os.replace(path, self._local_target(key))  # the spool folder is inside the root
            return
        self._make_parent(key)
        with open(path, "rb") as src, self.fs.open_output_stream(key) as out:
            shutil.copyfileobj(src, out, _COPY_CHUNK)

    @contextlib.contextmanager
    def spool(self) -> Iterator[Path]:
        """A new empty file to receive an upload into, removed afterwards if still there.

        For a local store it sits inside the root (so :meth:`put_file` is one rename);
        for S3 in the system's temporary folder (``$TMPDIR``)."""
        folder = None
        if self.local_root is not None:
            folder = self.local_root / _SPOOL
            folder.mkdir(exist_ok=True)
        fd, name = tempfile.mkstemp(dir=folder, prefix="gradexp-upload-", suffix=".tmp")
        os.close(fd)
        try:
            yield Path(name)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)

    def delete(self, key: str) -> None:
        """Remove an object; a missing one is not an error."""
        if self.local_root is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.local_root / key)
            return
        with contextlib.suppress(FileNotFoundError):
            self.fs.delete_file(key)

    def _local_target(self, key: str) -> Path:
        assert self.local_root is not None
        target = self.local_root / key
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def _make_parent(self, key: str) -> None:
        parent = key.rpartition("/")[0]
        if parent:
            self.fs.create_dir(parent, recursive=True)

    def get(self, key: str) -> bytes:
        with self.fs.open_input_stream(key) as f:
            return f.read()

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        """One range read."""
        with self.fs.open_input_file(key) as f:
            return f.read_at(length, offset)

    def exists(self, key: str) -> bool:
        return self.fs.get_file_info(key).type != pafs.FileType.NotFound


def _run_prefix(entity_id: int, project_id: int, run_id: str) -> str:
    if not (isinstance(entity_id, int) and isinstance(project_id, int) and NAME.match(run_id)):
        raise ValueError(f"invalid run address {entity_id}/{project_id}/{run_id!r}")
    return f"runs/{entity_id}/{project_id}/{run_id}"
