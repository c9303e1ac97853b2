"""POST .../finish refuses a final status that is not one (issue #9, item 17): "running"
and other values get a 4xx and leave the run exactly as it was, with nothing stored."""

from __future__ import annotations

import pytest
import requests

from services import GradexpServer


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    work = tmp_path_factory.mktemp("blindspots-server")
    home = work / "srv"
    home.mkdir()
    server = GradexpServer(work, db_url=f"sqlite:///{home / 'gradexp.db'}", store_url=str(home / "store"))
    server.key = server.user_with_key("alice")
    server.home = home
    server.start()
    yield server
    server.stop()


def call(srv, method: str, path: str, **kw) -> requests.Response:
    return requests.request(method, f"{srv.url}/api/v1/runs/alice/fin{path}", timeout=60,
                            headers={"Authorization": f"Bearer {srv.key}"}, **kw)


def stored(srv) -> list[str]:
    store = srv.home / "store"
    return sorted(p.relative_to(store).as_posix() for p in store.rglob("*") if p.is_file()) if store.exists() else []


@pytest.mark.parametrize("status", ["running", "deleted", "Finished", "finished ", 1, True, ["finished"],
                                    {"status": "finished"}])
def test_finish_refuses_a_status_that_is_not_final(srv, status):
    run = f"/r-{abs(hash(repr(status)))}"
    assert call(srv, "PUT", run, json={"name": "n"}).status_code == 200
    before, objects = call(srv, "GET", run).json(), stored(srv)
    assert before["status"] == "running"
    for body in ({"status": status}, {"status": status, "exit_code": 0, "parts": {}}):
        r = call(srv, "POST", run + "/finish", json=body)
        assert 400 <= r.status_code < 500, (body, r.status_code, r.text)
        assert call(srv, "GET", run).json() == before  # still running, nothing changed
        assert stored(srv) == objects  # no history.parquet written for it
    r = call(srv, "POST", run + "/finish", json={"status": "crashed", "exit_code": 0, "parts": {}})
    assert r.status_code == 200 and r.json()["status"] == "crashed"  # a real final status still works
