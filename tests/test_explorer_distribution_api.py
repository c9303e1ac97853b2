"""The distribution, histogram, diff, compare and layers endpoints over HTTP: exact against
NumPy, computed off the event loop, cached, and incremental for a run that grows."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import requests
import uvicorn
import zstandard
from starlette.applications import Starlette

import gradexp
from gradexp.explorer.app import explorer_routes
from gradexp.explorer.catalog import LocalCatalog
from gradexp.explorer.context import Explorer, Viewer
from gradexp.explorer.stats import QUANTILE_NAMES, QUANTILES


class Watched:
    """A run reader that records the tensors read, can hide its later steps (a run that is
    still going) and can hold every tensor read until released (a slow computation)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.reads: list[int] = []
        self.visible: int | None = None
        self.hold = threading.Event()
        self.hold.set()
        self.reading = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def steps(self, key: str) -> list[int]:
        steps = self.inner.steps(key)
        return steps if self.visible is None else steps[:self.visible]

    def tensors(self, key: str, steps: Iterable[int] | None = None, *,
                reuse: bool = False) -> Iterator[tuple[int, np.ndarray]]:
        for step, a in self.inner.tensors(key, self.steps(key) if steps is None else steps, reuse=reuse):
            self.reading.set()
            assert self.hold.wait(60), "never released"
            self.reads.append(step)
            yield step, a


class Catalog(LocalCatalog):
    def __init__(self, dir: Any) -> None:
        super().__init__(dir)
        self.watched: dict[str, Watched] = {}

    def open(self, viewer: Any, entity: str, project: str, run_id: str) -> Any:
        inner = super().open(viewer, entity, project, run_id)
        return self.watched.setdefault(run_id, Watched(inner))


@pytest.fixture
def server(tmp_path):
    """The explorer over ``tmp_path``'s run folders, on loopback, in this process."""
    catalog = Catalog(tmp_path)

    async def authenticate(request: Any) -> Viewer:
        return Viewer(user="local", entity="local")

    app = Starlette(routes=explorer_routes(Explorer(catalog, authenticate=authenticate)))
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    port = srv.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", catalog
    for w in catalog.watched.values():
        w.hold.set()
    srv.should_exit = True
    thread.join(10)


def _arrays(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for s in range(n):
        a = (rng.standard_normal((9, 11)) * (s + 1)).astype(np.float32)
        a[s % 9, :s % 4] = [np.nan, np.inf, -np.inf][:s % 4]
        a[(s + 1) % 9, :3] = 0
        out.append(a)
    return out


def _run(root: Any, arrays: list[np.ndarray], key: str = "grad/fc1/w", **extra: np.ndarray) -> str:
    with gradexp.init("proj", dir=root) as run:
        for step, a in enumerate(arrays):
            run.log({key: a, **{k: v * (step + 1) for k, v in extra.items()}}, step=step)
    return run.id


def _table(resp: requests.Response) -> pa.Table:
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "application/vnd.apache.arrow.stream"
    return pa.ipc.open_stream(resp.content).read_all()


def test_distribution_and_histogram_equal_numpy(server, tmp_path):
    base, _ = server
    arrays = _arrays(7)
    rid = _run(tmp_path, arrays)
    api = f"{base}/_x/api/runs/local/proj/{rid}"
    for scale in ("linear", "symlog"):
        t = _table(requests.get(f"{api}/distribution", params={"key": "grad/fc1/w", "bins": 24, "scale": scale}))
        meta = t.schema.metadata
        edges = np.array(json.loads(meta[b"edges"]))
        assert meta[b"scale"].decode() == scale and edges.size == 25
        assert t.column("step").to_pylist() == list(range(7))
        for i, a in enumerate(arrays):
            f = a[np.isfinite(a)]
            counts = np.histogram(f, edges)[0]
            assert t.column("counts")[i].as_py() == counts.tolist()
            assert [t.column(c)[i].as_py() for c in ("nan", "posinf", "neginf", "zero")] == [
                np.isnan(a).sum(), np.isposinf(a).sum(), np.isneginf(a).sum(), (a == 0).sum()]
            assert [t.column(n)[i].as_py() for n in QUANTILE_NAMES] == \
                np.quantile(f.astype(np.float64), QUANTILES).tolist()
            h = requests.get(f"{api}/histogram", params={"key": "grad/fc1/w", "step": i, "bins": 24, "scale": scale})
            assert h.status_code == 200, h.text
            assert h.json()["edges"] == edges.tolist() and h.json()["counts"] == counts.tolist()
            assert h.json()["nan"] == np.isnan(a).sum()
    # zstd for a client that takes it (gzip at level 9 is seconds for a big distribution), else as is
    plain = requests.get(f"{api}/distribution", params={"key": "grad/fc1/w"}, headers={"Accept-Encoding": "gzip"})
    assert plain.headers["content-encoding"] == "identity"
    packed = requests.get(f"{api}/distribution", params={"key": "grad/fc1/w"}, headers={"Accept-Encoding": "zstd"},
                          stream=True)
    assert packed.headers["content-encoding"] == "zstd"
    raw = zstandard.ZstdDecompressor().stream_reader(packed.raw).read()
    assert pa.ipc.open_stream(raw).read_all().equals(_table(plain))
    for params, status in (({"key": "grad/fc1/w", "bins": "x"}, 400), ({"key": "grad/fc1/w", "scale": "log"}, 400),
                           ({"key": "grad/fc1/w", "bins": 0}, 400), ({}, 400), ({"key": "nope"}, 404)):
        r = requests.get(f"{api}/distribution", params=params)
        assert r.status_code == status, (params, r.text)
        assert r.json()["error"]
    assert requests.get(f"{api}/histogram", params={"key": "grad/fc1/w", "step": 99}).status_code == 404
    assert requests.get(f"{base}/_x/api/runs/local/proj/nosuchrun/distribution",
                        params={"key": "grad/fc1/w"}).status_code == 404


def test_distribution_is_computed_off_the_event_loop(server, tmp_path):
    base, catalog = server
    rid = _run(tmp_path, _arrays(4))
    api = f"{base}/_x/api/runs/local/proj/{rid}"
    assert requests.get(api, timeout=30).status_code == 200  # opens the run: its reader is watched now
    watched = catalog.watched[rid]
    watched.hold.clear()
    slow: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: slow.update(r=requests.get(
        f"{api}/distribution", params={"key": "grad/fc1/w"}, timeout=120)))
    thread.start()
    assert watched.reading.wait(30), "the distribution never started reading"
    # the distribution is stuck in its first tensor read; the server answers meanwhile
    other = requests.get(api, timeout=30)
    assert other.status_code == 200 and other.json()["id"] == rid
    assert "r" not in slow
    watched.hold.set()
    thread.join(120)
    assert slow["r"].status_code == 200


def test_cache_answers_without_recomputing_and_grows_with_the_run(server, tmp_path):
    base, catalog = server
    arrays = _arrays(8)
    arrays[5] /= 100  # steps 5 and 6 lie inside the range of steps 0-4
    arrays[6] /= 100
    arrays[7] *= 1000  # the last step widens the range
    rid = _run(tmp_path, arrays)
    api = f"{base}/_x/api/runs/local/proj/{rid}"
    requests.get(api, timeout=30)
    watched = catalog.watched[rid]
    watched.visible = 5  # the run has logged 5 steps so far
    params = {"key": "grad/fc1/w", "bins": 16}
    first = _table(requests.get(f"{api}/distribution", params=params))
    assert sorted(watched.reads) == [0, 1, 2, 3, 4] and first.num_rows == 5
    watched.reads.clear()
    again = _table(requests.get(f"{api}/distribution", params=params))
    h = requests.get(f"{api}/histogram", params={**params, "step": 3})
    assert watched.reads == [] and again.equals(first) and h.status_code == 200  # from the cache
    watched.visible = 7  # two more steps, inside the range: only they are read
    grown = _table(requests.get(f"{api}/distribution", params=params))
    assert sorted(watched.reads) == [5, 6] and grown.num_rows == 7
    assert grown.schema.metadata[b"edges"] == first.schema.metadata[b"edges"]
    assert grown.slice(0, 5).column("counts").equals(first.column("counts"))
    watched.reads.clear()
    watched.visible = None  # step 7 lies outside: new edges, every step counted again
    wide = _table(requests.get(f"{api}/distribution", params=params))
    assert sorted(watched.reads) == sorted([7, *range(8)]) and wide.num_rows == 8
    edges = np.array(json.loads(wide.schema.metadata[b"edges"]))
    for i, a in enumerate(arrays):
        assert wide.column("counts")[i].as_py() == np.histogram(a[np.isfinite(a)], edges)[0].tolist()
    watched.reads.clear()
    requests.get(f"{api}/distribution", params={**params, "bins": 17})  # other bins: computed anew
    assert len(watched.reads) == 8


def test_diff_and_compare_runs(server, tmp_path):
    base, _ = server
    arrays = _arrays(6)
    rid_a = _run(tmp_path, arrays)
    changed = [a.copy() for a in arrays]
    changed[4][2, 5] += 1
    rid_b = _run(tmp_path, changed)
    api = f"{base}/_x/api/runs/local/proj/{rid_a}"
    t = _table(requests.get(f"{api}/diff", params={"key": "grad/fc1/w", "a": 3, "b": 1}))
    want = arrays[3].astype(np.float64) - arrays[1].astype(np.float64)
    np.testing.assert_array_equal(t.column("values").to_numpy(), want.reshape(-1))
    meta = t.schema.metadata
    assert json.loads(meta[b"shape"]) == [9, 11]
    stats = json.loads(meta[b"stats"])
    both = np.isfinite(want)
    assert stats["max_abs"] == np.abs(want[both]).max() and stats["bit_equal"] is False
    cmp = f"{base}/_x/api/compare"
    r = requests.get(cmp, params={"key": "grad/fc1/w", "step": 2, "a": f"local/proj/{rid_a}",
                                  "b": f"local/proj/{rid_b}"})
    assert r.status_code == 200, r.text
    assert r.json()["bit_equal"] is True and r.json()["max_abs"] == 0.0
    assert r.json()["first_differing_step"] == 4
    r = requests.get(cmp, params={"key": "grad/fc1/w", "step": 4, "a": f"local/proj/{rid_a}",
                                  "b": f"local/proj/{rid_b}"})
    assert r.json()["bit_equal"] is False and r.json()["max_abs"] == 1.0 and r.json()["differing"] == 1
    same = requests.get(cmp, params={"key": "grad/fc1/w", "step": 0, "a": f"local/proj/{rid_a}",
                                     "b": f"local/proj/{rid_a}"})
    assert same.json()["first_differing_step"] is None
    bad = requests.get(cmp, params={"key": "grad/fc1/w", "step": 0, "a": "proj/x", "b": f"local/proj/{rid_a}"})
    assert bad.status_code == 400 and "entity/project/run id" in bad.json()["error"]
    gone = requests.get(cmp, params={"key": "grad/fc1/w", "step": 0, "a": "local/proj/nope",
                                     "b": f"local/proj/{rid_a}"})
    assert gone.status_code == 404


def test_layers(server, tmp_path):
    base, _ = server
    rng = np.random.default_rng(5)
    arrays = _arrays(5)
    rid = _run(tmp_path, arrays, key="grad/fc1/w", **{"grad/fc2/w": rng.standard_normal(50).astype(np.float32),
                                                     "act/fc1": np.ones(3, np.float32)})
    api = f"{base}/_x/api/runs/local/proj/{rid}"
    t = _table(requests.get(f"{api}/layers", params={"prefix": "grad/", "stat": "nonfinite"}))
    assert t.column_names == ["step", "grad/fc1/w", "grad/fc2/w"]
    assert t.column("grad/fc1/w").to_pylist() == [int((~np.isfinite(a)).sum()) for a in arrays]
    t = _table(requests.get(f"{api}/layers", params={"prefix": "grad/", "stat": "maxabs"}))
    assert t.column("grad/fc1/w").to_pylist() == [float(np.abs(a[np.isfinite(a)]).max()) for a in arrays]
    assert requests.get(f"{api}/layers", params={"prefix": "grad/", "stat": "mean"}).status_code == 400
    assert requests.get(f"{api}/layers", params={"prefix": "zzz/"}).status_code == 404
