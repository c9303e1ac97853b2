"""Object storage through ``pyarrow.fs``: a local folder by default, S3 in production.

Object keys are built here from validated ids only (database integers, checked run
ids, a fixed set of stream names), never from a raw user string, so no request can
reach outside its run's prefix.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

STREAMS = ("history", "tensors")
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")  # \Z: "$" would accept a trailing newline


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
    def part_key(entity_id: int, project_id: int, run_id: str, stream: str, seq: int) -> str:
        return f"{_run_prefix(entity_id, project_id, run_id)}/parts/{stream}-{seq:06d}.gxp"

    @staticmethod
    def history_key(entity_id: int, project_id: int, run_id: str, first: int | None = None,
                    last: int | None = None) -> str:
        prefix = _run_prefix(entity_id, project_id, run_id)
        if first is None:
            return f"{prefix}/history.parquet"
        return f"{prefix}/history-segments/{first:06d}-{last:06d}.parquet"

    def put(self, key: str, data: bytes) -> None:
        parent = key.rpartition("/")[0]
        if self.local_root is not None:
            # Write beside and rename: a reader never sees a half-written object.
            target = self.local_root / key
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, target)
            return
        if parent:
            self.fs.create_dir(parent, recursive=True)
        with self.fs.open_output_stream(key) as out:
            out.write(data)

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
    if not (isinstance(entity_id, int) and isinstance(project_id, int) and _RUN_ID.match(run_id)):
        raise ValueError(f"invalid run address {entity_id}/{project_id}/{run_id!r}")
    return f"runs/{entity_id}/{project_id}/{run_id}"
