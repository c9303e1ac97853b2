"""An ended run on the server keeps its history as one Parquet object: the explorer reads the
keys a chart draws from it, each column once and no other (a run page's first screen of
20 x 1M steps decodes 8 columns of 23), and answers exactly what a read of the whole history
answers."""

from __future__ import annotations

import math
import subprocess
import sys
from types import SimpleNamespace
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

import gradexp
from gradexp.explorer.context import ResultCache
from gradexp.explorer.history import X_AXES, chart_keys, history_columns, history_keys, reduce_history
from services import GradexpServer, clean_env

STEPS = 5000


class CountingFile:
    """A Parquet file that records the columns decoded from it."""

    def __init__(self, file: Any) -> None:
        self.file = file
        self.decoded: list[str] = []

    def read(self, columns: list[str]) -> pa.Table:
        self.decoded += columns
        return self.file.read(columns=columns)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.file, name)


@pytest.fixture(scope="module")
def ended(tmp_path_factory):
    """A finished run synced to a server (so its history was made final), and its reader."""
    from gradexp.server import db
    from gradexp.server.reader import ServerRun
    from gradexp.server.store import Store

    work = tmp_path_factory.mktemp("final-columns")
    home = work / "srv"
    home.mkdir()
    srv = GradexpServer(work, db_url=f"sqlite:///{home / 'gradexp.db'}", store_url=str(home / "store" / "objects"))
    key = srv.user_with_key("alice")
    srv.start()
    try:
        with gradexp.init("cols", id="done", dir=work / "runs") as run:
            for s in range(STEPS):
                row: dict[str, Any] = {"a": math.sin(s), "flag": s % 3 == 0, "count": s * 7}
                if s % 10:  # logged at 9 steps of 10: a NaN bucket edge
                    row["sparse"] = float(s % 97) if s != 1234 else 1e9  # one spike
                run.log(row, step=s)
            run.log({"a": -5.0}, step=STEPS - 1)  # the last step logged twice: the last write wins
            run.log({"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, step=STEPS)  # a tensor: not a chart key
        subprocess.run([sys.executable, "-m", "gradexp", "sync", str(run.dir)], check=True, capture_output=True,
                       env=clean_env(GRADEXP_HOST=srv.url, GRADEXP_API_KEY=key), timeout=120)
        engine = db.connect(srv.db_url)
        with engine.connect() as conn:
            entity_id = db.entity_id(conn, "alice")
        assert entity_id is not None

        def reader() -> Any:
            return ServerRun(engine, Store(srv.store_url), entity_id=entity_id, entity="alice", project="cols",
                             run_id="done")
        yield reader
        engine.dispose()
    finally:
        srv.stop()


def counted(reader: Any) -> tuple[Any, list[CountingFile]]:
    files: list[CountingFile] = []
    opener = reader.final_history

    def final_history() -> Any:
        file = opener()
        assert file is not None, "the finished run's history was not made final"
        files.append(CountingFile(file))
        return files[-1]
    reader.final_history = final_history
    return reader, files


def test_an_ended_runs_chart_decodes_only_its_columns_and_answers_as_the_whole_history(ended):
    whole = ended().history()
    explorer = SimpleNamespace(cache=ResultCache())
    reader, files = counted(ended())

    keys, last = history_keys(explorer, "alice", reader)  # type: ignore[arg-type]
    assert keys == chart_keys(whole) and set(keys) == {"a", "flag", "count", "sparse"}  # not the tensor "w"
    assert last == whole.column("step")[-1].as_py() == STEPS
    assert files and sorted(files[0].decoded) == sorted(X_AXES)  # the schema and the axes only

    for asked in (["sparse"], ["a", "sparse"], ["count", "flag"]):
        _, got = history_columns(explorer, "alice", reader, asked)  # type: ignore[arg-type]
        assert got.column_names == list(X_AXES) + asked
        assert got.equals(whole.select(list(X_AXES) + asked)), asked
        for buckets in (7, 640):
            assert reduce_history(got, asked, buckets=buckets).equals(reduce_history(whole, asked, buckets=buckets))
        assert reduce_history(got, asked, buckets=50, lo=1000, hi=1300).equals(
            reduce_history(whole, asked, buckets=50, lo=1000, hi=1300))
    assert len(files) == 1  # opened once, then kept
    decoded = files[0].decoded
    assert sorted(decoded) == sorted(list(X_AXES) + ["sparse", "a", "count", "flag"])  # each once, no other
    assert reduce_history(got, ["count"], buckets=10).column("count:max").to_pylist()[-1] == (STEPS - 1) * 7

    _, every = history_columns(explorer, "alice", reader, None)  # type: ignore[arg-type]
    assert every.column_names == list(X_AXES) + keys
    with pytest.raises(KeyError, match="no history key 'nope'"):
        history_columns(explorer, "alice", reader, ["nope"])  # type: ignore[arg-type]


def test_a_spike_is_in_its_bucket_read_by_column(ended):
    explorer = SimpleNamespace(cache=ResultCache())
    _, got = history_columns(explorer, "alice", ended(), ["sparse"])  # type: ignore[arg-type]
    reduced = reduce_history(got, ["sparse"], buckets=100)
    assert max(reduced.column("sparse:max").to_pylist()) == 1e9
