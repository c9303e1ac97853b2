"""`gradexp export`: Parquet that pyarrow, pandas and DuckDB read back."""

from __future__ import annotations

import duckdb
import ml_dtypes
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import gradexp
from gradexp.cli import main


@pytest.fixture
def run_dir(tmp_path):
    rng = np.random.default_rng(1)
    with gradexp.init("proj", id="r1", dir=tmp_path / "runs") as run:
        for step in range(50):
            run.log({"loss": 1.0 / (step + 1), "acc": np.float32(step / 50), "opt": {"lr": 1e-3},
                     "note": f"s{step}", "grad": rng.standard_normal((8, 4)).astype(np.float32),
                     "w": np.full(3, step, dtype=ml_dtypes.bfloat16)})
        run.log({"grad": np.zeros((2, 2), np.float32)})  # the shape changes once
    return run.dir


def test_export_history_read_by_pyarrow_pandas_duckdb(run_dir, tmp_path):
    out = tmp_path / "h.parquet"
    result = CliRunner().invoke(main, ["export", str(run_dir), "--parquet", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "51 steps" in result.output
    table = pq.read_table(out)
    assert table.column_names[:3] == ["step", "_timestamp", "_runtime"]
    assert table.column("loss").to_pylist()[:3] == [1.0, 0.5, 1.0 / 3]
    assert table.column("opt/lr").to_pylist()[0] == 1e-3
    df = table.to_pandas()
    assert df["note"].iloc[7] == "s7" and len(df) == 51
    con = duckdb.connect()
    rows = con.execute(
        f"SELECT step, loss, grad.norm, \"opt/lr\" FROM read_parquet('{out}') WHERE step < 2 ORDER BY step"
    ).fetchall()
    assert rows[0][0] == 0 and rows[0][1] == 1.0 and rows[1][3] == 1e-3
    assert rows[0][2] == pytest.approx(np.linalg.norm(
        np.random.default_rng(1).standard_normal((8, 4)).astype(np.float64).astype(np.float32)), rel=1e-5)


def test_export_tensors(run_dir, tmp_path):
    out = tmp_path / "h.parquet"
    result = CliRunner().invoke(main, ["export", str(run_dir), "-o", str(out), "--tensors"])
    assert result.exit_code == 0, result.output
    folder = tmp_path / "h.tensors"
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["grad.1.parquet", "grad.parquet", "w.parquet"]
    t = pq.read_table(folder / "grad.parquet")
    assert isinstance(t.schema.field("grad").type, pa.FixedShapeTensorType)
    assert t.column("step").to_pylist() == list(range(50))
    arrs = t.column("grad").combine_chunks().to_numpy_ndarray()
    expect = np.random.default_rng(1).standard_normal((8, 4)).astype(np.float32)
    assert np.array_equal(arrs[0], expect)
    assert pq.read_table(folder / "grad.1.parquet").column("step").to_pylist() == [50]
    w = pq.read_table(folder / "w.parquet")
    assert w.schema.field("w").metadata[b"gradexp.dtype"] == b"bfloat16"
    n = duckdb.connect().execute(f"SELECT count(*) FROM read_parquet('{folder / 'grad.parquet'}')").fetchone()
    assert n == (50,)


def test_export_by_reference_and_unknown_run(run_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("GRADEXP_DIR", str(tmp_path / "runs"))
    result = CliRunner().invoke(main, ["export", "proj/r1"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "proj-r1.parquet").exists()
    result = CliRunner().invoke(main, ["export", "nope"])
    assert result.exit_code != 0 and "no run 'nope'" in result.output


def test_runs_listing(run_dir, tmp_path):
    result = CliRunner().invoke(main, ["runs", "--dir", str(tmp_path / "runs")])
    assert result.exit_code == 0 and "proj/r1" in result.output and "finished" in result.output


def test_python_dash_m(run_dir):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "gradexp", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and gradexp.__version__ in out.stdout
