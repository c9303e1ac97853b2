"""The Parquet encodings `gradexp export` promises (issue #9, item 17): steps delta-encoded,
floats byte-stream-split, everything zstd, read from the written files' own metadata."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import gradexp
from gradexp.cli import main
from gradexp.server.history import to_parquet


@pytest.fixture
def run_dir(tmp_path):
    with gradexp.init("proj", id="enc", dir=tmp_path / "runs") as run:
        for step in range(200):
            run.log({"loss": 1.0 / (step + 1), "lr": np.float32(0.1), "epoch": step // 50, "tag": f"t{step % 3}",
                     "grad": np.full((4, 4), step, np.float32)}, step=step * 2)
    return run.dir


def column_chunks(path) -> dict[str, pq.ColumnChunkMetaData]:
    meta = pq.ParquetFile(path).metadata
    assert meta.num_row_groups >= 1
    rg = meta.row_group(0)
    return {rg.column(i).path_in_schema: rg.column(i) for i in range(rg.num_columns)}


def check_history_encodings(chunks: dict[str, pq.ColumnChunkMetaData]) -> None:
    assert "DELTA_BINARY_PACKED" in chunks["step"].encodings
    for name in ("_timestamp", "_runtime", "loss", "lr"):  # float64 and float32 columns
        assert "BYTE_STREAM_SPLIT" in chunks[name].encodings, (name, chunks[name].encodings)
    assert "RLE_DICTIONARY" in chunks["tag"].encodings  # the rest keeps dictionaries
    for name, chunk in chunks.items():
        assert chunk.compression == "ZSTD", (name, chunk.compression)


def test_history_export_encodings(run_dir, tmp_path):
    out = tmp_path / "h.parquet"
    result = CliRunner().invoke(main, ["export", str(run_dir), "-o", str(out)])
    assert result.exit_code == 0, result.output
    check_history_encodings(column_chunks(out))
    table = pq.read_table(out)  # and the values survive the encodings
    assert table.column("step").to_pylist() == [2 * s for s in range(200)]
    assert table.column("loss").to_pylist() == [1.0 / (s + 1) for s in range(200)]


def test_server_history_parquet_encodings(run_dir, tmp_path):
    """The server's history.parquet is written by the same function."""
    out = tmp_path / "server.parquet"
    out.write_bytes(to_parquet(gradexp.Api().run(run_dir).history()))
    check_history_encodings(column_chunks(out))


def test_tensor_export_is_zstd(run_dir, tmp_path):
    out = tmp_path / "h.parquet"
    result = CliRunner().invoke(main, ["export", str(run_dir), "-o", str(out), "--tensors"])
    assert result.exit_code == 0, result.output
    chunks = column_chunks(tmp_path / "h.tensors" / "grad.parquet")
    assert chunks and all(c.compression == "ZSTD" for c in chunks.values()), \
        {n: c.compression for n, c in chunks.items()}
