"""The live tail of a run's history on the server is read incrementally: once the explorer has
read a running run's history, a new part costs reading that part (not every part again), and
what it appends gives the same table a full read gives, last write winning, also when a part
arrives late, out of order.
"""

from __future__ import annotations

import hashlib
from types import SimpleNamespace
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st

import gradexp
from gradexp.core.history import combine_history
from gradexp.explorer.context import ResultCache
from gradexp.explorer.history import history_table
from services import GradexpServer

# -- appending a combined tail equals combining everything --------------------------------------

KEYS = ("a", "b", "c")


@st.composite
def frames(draw: Any) -> list[pa.Table]:
    """History frames as a writer makes them: steps mostly rising, sometimes repeated (a step
    logged again) or going back (a resumed run); each key present in some frames, with nulls,
    as bool, int or float (a key's type may change between frames)."""
    out = []
    step = draw(st.integers(0, 5))
    for _ in range(draw(st.integers(1, 6))):
        n = draw(st.integers(1, 8))
        steps = []
        for _ in range(n):
            step += draw(st.sampled_from([0, 1, 1, 1, 2, -3]))
            steps.append(max(step, 0))
        cols: dict[str, pa.Array] = {"step": pa.array(steps, pa.int64()),
                                     "_timestamp": pa.array(np.arange(n) + 1000.0),
                                     "_runtime": pa.array(np.arange(n) * 0.5)}
        for key in KEYS:
            kind = draw(st.sampled_from(["absent", "bool", "int", "float"]))
            if kind == "absent":
                continue
            vals = draw(st.lists(st.one_of(st.none(), st.integers(-5, 5)), min_size=n, max_size=n))
            typ = {"bool": pa.bool_(), "int": pa.int64(), "float": pa.float64()}[kind]
            cols[key] = pa.array([None if v is None else (v > 0 if kind == "bool" else
                                                          float(v) if kind == "float" else v) for v in vals], typ)
        out.append(pa.table(cols))
    return out


@settings(max_examples=300, deadline=None)
@given(frames(), st.data())
def test_appending_a_combined_tail_equals_combining_all(tables, data):
    cut = data.draw(st.integers(0, len(tables)))
    whole = combine_history(tables).combine_chunks()
    appended = combine_history([combine_history(tables[:cut]), combine_history(tables[cut:])]).combine_chunks()
    assert appended.schema == whole.schema
    assert appended.equals(whole)


# -- the server's live read ----------------------------------------------------------------------

class CountingStore:
    """The server's store with a count of the objects fetched in full."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.fetched: list[str] = []

    def get(self, key: str) -> bytes:
        self.fetched.append(key)
        return self.store.get(key)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    work = tmp_path_factory.mktemp("tail")
    home = work / "srv"
    home.mkdir()
    server = GradexpServer(work, db_url=f"sqlite:///{home / 'gradexp.db'}", store_url=str(home / "store" / "objects"))
    server.keys = {"alice": server.user_with_key("alice")}
    server.start()
    yield server
    server.stop()


def put_part(srv: GradexpServer, path: str, name: str, data: bytes) -> None:
    stream, _, seq = name[: -len(".gxp")].rpartition("-")
    r = requests.put(f"{srv.url}/api/v1{path}/parts/{stream}/{int(seq)}", data=data, timeout=30, headers={
        "Authorization": f"Bearer {srv.keys['alice']}", "Content-Type": "application/octet-stream",
        "X-Gradexp-SHA256": hashlib.sha256(data).hexdigest()})
    assert r.status_code == 201, r.text


def test_a_live_history_read_on_the_server_reads_only_the_new_parts(srv, tmp_path):
    from gradexp.server import db
    from gradexp.server.history import COMPACT_AT
    from gradexp.server.reader import ServerRun
    from gradexp.server.store import Store

    n = COMPACT_AT + 10
    run = gradexp.init("src", id="tail", dir=tmp_path, part_max_bytes=1, part_max_age=600)
    for s in range(n):
        run.log({"loss": 1.0 / (s + 1), "acc": s / n}, step=s // 2)  # two writes per step: the last one wins
        run.flush()  # one row per part
    run.finish()
    parts = {p.name: p.read_bytes() for p in sorted((run.dir / "parts").glob("history-*.gxp"))}
    names = list(parts)
    assert len(names) == n
    path = "/runs/alice/live/tail"
    r = requests.put(f"{srv.url}/api/v1{path}", json={}, timeout=30,
                     headers={"Authorization": f"Bearer {srv.keys['alice']}"})
    assert r.status_code == 200, r.text

    engine = db.connect(srv.db_url)
    with engine.connect() as conn:
        entity_id = db.entity_id(conn, "alice")
    assert entity_id is not None
    store = CountingStore(Store(srv.store_url))
    explorer = SimpleNamespace(cache=ResultCache())

    def read() -> pa.Table:
        reader = ServerRun(engine, store, entity_id=entity_id, entity="alice", project="live",  # type: ignore[arg-type]
                           run_id="tail")
        return history_table(explorer, "alice", reader)[1]  # type: ignore[arg-type]

    def full() -> pa.Table:
        reader = ServerRun(engine, Store(srv.store_url), entity_id=entity_id, entity="alice", project="live",
                           run_id="tail")
        return reader.history().combine_chunks()

    late = names[7]
    first = [x for x in names[:12] if x != late]
    for name in first:
        put_part(srv, path, name, parts[name])
    assert read().equals(full())
    assert len(store.fetched) == len(first)
    # Live: each new part is the one part read.
    for name in names[12:16]:
        put_part(srv, path, name, parts[name])
        store.fetched.clear()
        got = read()
        assert [f.rpartition("/")[2][:len(name) - 4] for f in store.fetched] == [name[:-4]]
        assert got.equals(full())
    # A part that comes late, below what was read: read in full again, and nothing is lost.
    put_part(srv, path, late, parts[late])
    store.fetched.clear()
    got = read()
    assert len(store.fetched) == 16
    assert got.equals(full())
    assert got.column("step").to_pylist() == list(range(8))
    assert got.column("loss").to_pylist() == [1.0 / (2 * s + 2) for s in range(8)]  # the last write of each step
    # On to compaction: the segment is written from the parts after the last one, and the
    # reads stay incremental across it.
    for name in names[16:]:
        put_part(srv, path, name, parts[name])
        store.fetched.clear()
        got = read()
        assert got.equals(full())
        assert len(store.fetched) <= COMPACT_AT + 1
    assert got.column("step").to_pylist() == list(range(n // 2))


# -- a run folder's history, decoded on the pool -------------------------------------------------

@pytest.mark.filterwarnings("ignore:gradexp. step 0 is lower than the current step")
def test_run_folder_history_decoded_in_parallel_keeps_order_and_reports_damage(tmp_path):
    """Many history frames are decoded on the shared pool: the rows come back in write order
    (last write wins), and a damaged frame is reported once, by path and offset, and skipped."""
    import warnings

    from gradexp.core import format as F
    from gradexp.core.errors import CorruptPartWarning
    from gradexp.read.local import StoredRun

    run = gradexp.init("par", id="p", dir=tmp_path, part_max_age=600)
    for s in range(40):
        run.log({"x": float(s), "y": -float(s)}, step=s % 30)  # steps 0-9 written twice: the last wins
        if s % 2:
            run.flush()  # a frame every two rows
    run.finish()
    history = [p for p in sorted((run.dir / "parts").glob("history-*.gxp"))]
    frames = [(p, i) for p in history for i in F.scan_part(p).frames if i.kind == F.KIND_HISTORY]
    assert len(frames) >= 20
    got = StoredRun(run.dir).history()
    assert got.column("step").to_pylist() == list(range(30))
    assert got.column("x").to_pylist() == [float(s + 30 if s < 10 else s) for s in range(30)]
    path, bad = frames[5]  # rows 10 and 11 (steps logged once)
    blob = bytearray(path.read_bytes())
    blob[bad.data_offset + bad.stored // 2] ^= 0x10
    path.write_bytes(bytes(blob))
    from gradexp.read import local

    local._SEALED.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = StoredRun(run.dir).history()
    damage = [w for w in caught if issubclass(w.category, CorruptPartWarning)]
    assert len(damage) == 1 and str(path) in str(damage[0].message) and f"byte {bad.offset}" in str(damage[0].message)
    assert got.column("step").to_pylist() == [s for s in range(30) if s not in (10, 11)]
    assert got.column("x").to_pylist() == [float(s + 30 if s < 10 else s) for s in range(30) if s not in (10, 11)]
