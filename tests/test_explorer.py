"""The explorer (issue #11): history reduction, `gradexp ui` and the pages on `gradexp server`.

Browser tests drive Debian's Chromium (Playwright), fail on any console error, page error or
request to a host other than the loopback address, and save screenshots of every page to
test-artifacts/screenshots/explorer-*.png.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
import pytest
import requests

import gradexp
from gradexp.explorer.context import ResultCache
from gradexp.explorer.history import reduce_history, since
from services import GradexpServer, Trainer, WebSession, clean_env, free_port, run_python, wait_for

XSS = "<img src=x onerror=alert(1)>"
PASSWORD = "correct horse battery"
SHOTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "screenshots"


# -- history reduction -------------------------------------------------------------------------

def history(n: int, **columns: np.ndarray) -> pa.Table:
    steps = np.arange(n, dtype=np.int64)
    return pa.table({"step": steps, "_timestamp": 1.7e9 + steps * 0.5, "_runtime": steps * 0.5, **columns})


def test_a_one_step_spike_survives_reduction():
    n = 1_000_000
    loss = np.full(n, 0.5)
    loss[654_321] = 1e6  # one step in a million, between any two evenly spaced samples
    loss[123_457] = -3.0
    t = history(n, loss=loss)
    for buckets in (100, 777, 2000):
        r = reduce_history(t, ["loss"], buckets=buckets)
        assert r.num_rows <= buckets and r.schema.metadata[b"reduced"] == b"1"
        assert np.nanmax(r.column("loss:max").to_numpy()) == 1e6
        assert np.nanmin(r.column("loss:min").to_numpy()) == -3.0
        spike = int(np.flatnonzero(r.column("loss:max").to_numpy() == 1e6)[0])
        assert r.column("step")[max(spike - 1, 0)].as_py() < 654_321 <= r.column("step")[spike].as_py()


def test_reduction_matches_a_bucket_by_bucket_count():
    rng = np.random.default_rng(7)
    n = 20_000
    v = rng.standard_normal(n)
    v[rng.integers(0, n, 500)] = np.nan
    valid = rng.random(n) > 0.3  # a key logged at some steps only (nulls)
    t = history(n, v=pa.array(v, mask=~valid), k=pa.array(np.arange(n) % 5 == 0))
    r = reduce_history(t, ["v", "k"], buckets=300)
    edges = np.linspace(0, n - 1, 301)
    bucket = np.minimum(((np.arange(n) - 0) / ((n - 1) / 300)).astype(np.int64), 299)
    got_max = r.column("v:max").to_numpy(zero_copy_only=False)
    got_min = r.column("v:min").to_numpy(zero_copy_only=False)
    got_last = r.column("v").to_numpy(zero_copy_only=False)
    assert r.num_rows == 300 and len(edges) == 301
    for b in range(300):
        vals = v[(bucket == b) & valid & ~np.isnan(v)]
        if vals.size:
            assert got_max[b] == vals.max() and got_min[b] == vals.min() and got_last[b] == vals[-1]
        else:
            assert np.isnan(got_max[b]) and np.isnan(got_min[b])
    assert np.array_equal(r.column("k:max").to_numpy(), np.ones(300))  # every bucket holds a True


def test_few_rows_and_zoom_come_back_exact():
    n = 10_000
    v = np.random.default_rng(1).standard_normal(n)
    t = history(n, loss=v, count=pa.array(np.arange(n, dtype=np.int64) * 3))
    small = reduce_history(t.slice(0, 50), ["loss"], buckets=50)
    assert small.schema.metadata[b"reduced"] == b"0" and small.column("loss").to_pylist() == v[:50].tolist()
    zoom = reduce_history(t, ["loss", "count"], buckets=800, lo=4000, hi=4500)
    assert zoom.schema.metadata[b"reduced"] == b"0"
    assert zoom.column("step").to_pylist() == list(range(4000, 4501))
    assert zoom.column("loss").to_pylist() == v[4000:4501].tolist()
    assert zoom.column("count").type == pa.int64()  # exact rows keep their own type
    by_time = reduce_history(t, ["loss"], x="_runtime", buckets=800, lo=100.0, hi=110.0)
    assert by_time.column("step").to_pylist() == list(range(200, 221))
    tail = since(t, ["loss"], 9_990)
    assert tail.column("step").to_pylist() == list(range(9_991, 10_000))
    with pytest.raises(KeyError, match="nope"):
        reduce_history(t, ["nope"])


def test_result_cache_is_bounded_by_bytes():
    cache = ResultCache(max_bytes=100)
    for i in range(10):
        cache.put(("k", i), i, 30)
    assert cache.nbytes <= 100 and len(cache) == 3
    assert cache.get(("k", 0)) is None and cache.get(("k", 9)) == 9
    cache.put(("big",), "x", 101)
    assert cache.get(("big",)) is None


# -- browsers --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shots():
    SHOTS.mkdir(parents=True, exist_ok=True)
    return SHOTS


class Watched:
    """A page whose console errors, page errors, dialogs and off-host requests are collected."""

    def __init__(self, context) -> None:
        self.page = context.new_page()
        self.problems: list[str] = []
        self.requests: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.problems.append(f"console: {m.text}"))
        self.page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        self.page.on("dialog", lambda d: (self.problems.append(f"dialog: {d.message}"), d.dismiss()))
        self.page.on("request", lambda r: self.requests.append(r.url))

    def check(self) -> None:
        foreign = [u for u in self.requests if not u.startswith("data:") and urlsplit(u).hostname != "127.0.0.1"]
        assert not foreign, f"requests to other hosts: {foreign}"
        assert not self.problems, self.problems

    def open(self, url: str, *, wait: str = "body") -> None:
        self.page.goto(url)
        self.page.wait_for_selector(wait)


def charts_ready(page) -> None:
    page.wait_for_selector("body[data-charts-ready='1']")


def meta_row(page, name: str) -> str:
    """The value the run page's metadata table shows for ``name`` ("" if no such row)."""
    return page.evaluate("""name => {
      const th = [...document.querySelectorAll('#run-meta th')].find(h => h.textContent === name);
      return th ? th.nextElementSibling.textContent : ''; }""", name)


def points(page, key: str) -> int:
    return int(page.get_attribute(f".gx-chart[data-key='{key}']", "data-points") or 0)


LOG_RUNS = f'''
import gradexp, math, numpy as np
run = gradexp.init("vision", id="r1", name={XSS!r}, config={{"lr": 0.1, "model": {{"depth": 4}}}},
                   tags=["baseline"], group="sweep-1", job_type="train")
for i in range(3000):
    run.log({{"loss": math.exp(-i / 500), "opt/lr": 0.1 * 0.999 ** i, {XSS!r}: i % 7}})
run.log({{"loss": 1e4}}, step=1500)
run.finish()
run = gradexp.init("vision", id="r2", config={{"lr": 0.2}})
for i in range(500):
    run.log({{"loss": 2 * math.exp(-i / 300)}})
run.finish()
'''


class UI:
    """``gradexp ui`` as a child process; ``url`` is the address it printed (with the token)."""

    def __init__(self, runs: Path) -> None:
        self.runs = runs
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "gradexp", "ui", "--dir", str(runs), "--port",
                                      str(self.port)], env=clean_env(), stderr=subprocess.PIPE, text=True)
        self.output = ""
        threading.Thread(target=self._read, daemon=True).start()
        m = wait_for(lambda: re.search(r"Open (http://\S+)", self.output), "gradexp ui to print its URL",
                     proc=self.proc)
        self.url = m.group(1)
        self.base = f"http://127.0.0.1:{self.port}"

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.output += line

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(15)


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    work = tmp_path_factory.mktemp("ui")
    r = run_python(LOG_RUNS, cwd=work)
    assert r.returncode == 0, r.stderr
    u = UI(work / "gradexp-runs")
    yield u
    u.stop()


def test_ui_needs_its_token(ui):
    assert ui.url.startswith(f"http://127.0.0.1:{ui.port}/?token=")
    for path in ("/", "/local/vision", "/local/vision/r1", "/_x/api/projects", "/_x/api/runs/local/vision/r1/history",
                 "/_x/static/js/common.js"):
        assert requests.get(ui.base + path, timeout=10).status_code == 403, path
    assert requests.get(ui.base + "/?token=wrong", timeout=10).status_code == 403
    s = requests.Session()
    r = s.get(ui.url, timeout=10, allow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/"  # the token leaves the address bar
    assert s.get(ui.base + "/_x/api/projects", timeout=10).json()["projects"][0]["name"] == "vision"
    assert s.patch(ui.base + "/_x/api/runs/local/vision/r1", json={"name": "x"}, timeout=10).status_code == 403
    page = s.get(ui.base + "/local/vision/r1", timeout=10)
    csp = page.headers["content-security-policy"]
    assert "script-src 'self';" in csp and "default-src 'none'" in csp and "unsafe" not in csp
    data = s.get(ui.base + "/_x/api/runs/local/vision/r1/history?keys=loss&buckets=5000", timeout=10)
    assert data.headers["content-type"] == "application/vnd.apache.arrow.stream"
    assert data.headers["content-encoding"] == "gzip"  # columns move compressed
    table = pa.ipc.open_stream(data.content).read_all()
    assert table.num_rows == 3000 and table.column("loss")[1500].as_py() == 1e4


def test_ui_pages_render_safely(ui, chromium, shots):
    context = chromium.new_context(viewport={"width": 1280, "height": 900})
    w = Watched(context)
    w.open(ui.url, wait="#projects tbody tr")
    assert w.page.inner_text("#projects tbody tr td") == "vision"
    w.page.screenshot(path=str(shots / "explorer-projects.png"), full_page=True)

    w.open(ui.base + "/local/vision", wait="#runs tbody tr")
    assert w.page.locator("#runs tbody tr").count() == 2
    assert w.page.inner_text("#runs tbody tr[data-run='r1'] td:nth-child(2)") == XSS
    assert w.page.inner_text("#runs tbody tr[data-run='r1'] .gx-badge") == "finished"
    assert w.page.inner_text("tr[data-run='r1'] td:nth-child(6)") == "2999"  # last step
    w.page.fill("#run-search", "baseline")
    assert w.page.locator("#runs tbody tr").count() == 1
    w.page.fill("#run-search", "")
    w.page.screenshot(path=str(shots / "explorer-runs.png"), full_page=True)
    w.page.check("tr[data-run='r1'] input[type=checkbox]")
    w.page.check("tr[data-run='r2'] input[type=checkbox]")
    w.page.click("#compare")
    w.page.wait_for_url("**/local/vision/**compare=**")
    charts_ready(w.page)
    assert "r2" in w.page.inner_text("#chart-compare")
    w.page.screenshot(path=str(shots / "explorer-compare.png"), full_page=True)

    w.open(ui.base + "/local/vision/r1#charts")
    charts_ready(w.page)
    assert w.page.inner_text("h1") == XSS
    assert w.page.inner_text(f".gx-chart[data-key='{XSS}'] .gx-chart-title") == XSS
    assert w.page.locator("main img").count() == 0
    groups = w.page.eval_on_selector_all(".gx-chart-group", "gs => gs.map(g => g.dataset.group)")
    assert "opt" in groups and w.page.locator(".gx-chart-group[data-group='opt'] .gx-chart[data-key='opt/lr']").count()
    w.page.screenshot(path=str(shots / "explorer-charts.png"), full_page=True)

    w.open(ui.base + "/local/vision/r1#overview", wait="#run-meta tbody tr")
    assert meta_row(w.page, "group") == "sweep-1" and meta_row(w.page, "job type") == "train"
    w.page.wait_for_selector("#run-config tbody th")
    assert "model.depth" in w.page.inner_text("#run-config")
    assert w.page.get_attribute("#edit-name", "readonly") is not None  # read-only in gradexp ui
    assert w.page.is_hidden("#edit-save")
    w.page.screenshot(path=str(shots / "explorer-overview.png"), full_page=True)

    w.open(ui.base + "/local/vision/nope")
    assert w.page.inner_text("h1") == "Not available"
    w.problems = [p for p in w.problems if "404" not in p]  # the page's own status
    w.check()
    context.close()


def test_ui_zoom_refetches_exact_rows(ui, chromium):
    context = chromium.new_context(viewport={"width": 1280, "height": 900})
    w = Watched(context)
    w.open(ui.url)
    w.open(ui.base + "/local/vision/r1#charts")
    charts_ready(w.page)
    box = w.page.locator(".gx-chart[data-key='loss'] .u-over").bounding_box()
    assert w.page.get_attribute(".gx-chart[data-key='loss']", "data-reduced") == "1"
    w.page.mouse.move(box["x"] + box["width"] * 0.49, box["y"] + 20)
    w.page.mouse.down()
    w.page.mouse.move(box["x"] + box["width"] * 0.52, box["y"] + 30)
    w.page.mouse.up()
    w.page.wait_for_selector(".gx-chart[data-key='loss'][data-zoomed='1']")
    assert w.page.get_attribute(".gx-chart[data-key='loss']", "data-reduced") == "0"
    assert any("lo=" in u and "hi=" in u for u in w.requests)
    w.check()
    context.close()


SERIES_PIXELS = """c => { const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let n = 0;
    for (let i = 0; i < d.length; i += 4) if (d[i] === 92 && d[i + 1] === 148 && d[i + 2] === 13) n++; return n; }"""


def test_a_system_chart_of_a_run_with_one_sample_shows_it(ui, chromium, shots):
    # a run shorter than system_interval has one sample (taken as it starts): a line needs
    # two, so the chart must draw the point, on a time axis around it (not years wide)
    r1 = gradexp.Api(dir=ui.runs).run("vision/r1")
    assert r1.system().num_rows == 1
    context = chromium.new_context(viewport={"width": 1280, "height": 900})
    w = Watched(context)
    w.open(ui.url)
    w.open(f"{ui.base}/local/vision/r1#charts")
    charts_ready(w.page)
    w.page.wait_for_selector("#system-charts[data-ready='1']")
    canvas = w.page.locator("#system-charts .gx-chart[data-key='system/memory/percent'] canvas")
    canvas.scroll_into_view_if_needed()
    assert canvas.evaluate(SERIES_PIXELS) > 0  # the series' colour, #5c940d
    span = w.page.get_attribute("#system-charts .gx-chart[data-key='system/memory/percent']", "data-x-span")
    assert span is not None and 0 < float(span) <= 120, span
    w.page.screenshot(path=str(shots / "explorer-system-one-sample.png"), full_page=True)
    w.check()
    context.close()


def test_ui_chart_of_a_running_run_gains_points(tmp_path, chromium):
    t = Trainer(tmp_path, "live", steps=60, stops=(19, 39))
    try:
        t.first("waiting")
        u = UI(t.dir)
        try:
            context = chromium.new_context()
            w = Watched(context)
            w.open(u.url)
            w.open(f"{u.base}/local/stream/live#charts")
            charts_ready(w.page)
            wait_for(lambda: points(w.page, "loss") == 20, "the first 20 steps in the chart")
            assert w.page.inner_text("#run-status") == "running"
            first = len(w.requests)
            t.go(19)
            wait_for(lambda: points(w.page, "loss") == 40, "steps 20-39 to appear in the open chart")
            polls = [r for r in w.requests[first:] if "/history?" in r]
            assert polls and all("since=" in r for r in polls), polls  # only the tail is fetched
            t.go(39)
            assert t.wait() == 0
            wait_for(lambda: points(w.page, "loss") == 60 and w.page.inner_text("#run-status") == "finished",
                     "the last steps and the finished status")
            w.check()
            context.close()
        finally:
            u.stop()
    finally:
        Trainer.cleanup()


# -- gradexp server --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("explorer-server")
    s = GradexpServer(work).start()
    s.user_with_password("ada", PASSWORD)
    s.user_with_password("bob", PASSWORD)
    s.ada_key = s.create_key("ada")
    s.bob_key = s.create_key("bob")
    r = run_python(LOG_RUNS, cwd=work, env=clean_env(GRADEXP_HOST=s.url, GRADEXP_API_KEY=s.ada_key))
    assert r.returncode == 0, r.stderr
    yield s
    s.stop()


def sign_in(page, base: str, user: str) -> None:
    page.goto(base + "/")
    page.wait_for_url("**/login?**")
    page.fill("#username", user)
    page.fill("#password", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(base + "/")
    page.wait_for_selector("#projects")


def test_server_pages_after_sign_in(server, chromium, shots):
    context = chromium.new_context(viewport={"width": 1280, "height": 900})
    w = Watched(context)
    sign_in(w.page, server.url, "ada")
    w.page.wait_for_selector("#projects tbody tr")
    assert w.page.inner_text("#projects tbody tr td") == "vision"
    w.page.screenshot(path=str(shots / "explorer-server-projects.png"), full_page=True)
    w.open(server.url + "/ada/vision", wait="#runs tbody tr[data-run='r1']")
    assert w.page.inner_text("tr[data-run='r1'] td:nth-child(6)") == "2999"  # last step
    w.page.screenshot(path=str(shots / "explorer-server-runs.png"), full_page=True)
    # the address `gradexp sync` and the sender print opens the run
    w.open(server.url + "/ada/vision/r1#charts")
    charts_ready(w.page)
    assert w.page.inner_text("h1") == XSS
    assert w.page.locator(".gx-chart[data-key='opt/lr']").count() == 1
    w.page.screenshot(path=str(shots / "explorer-server-charts.png"), full_page=True)

    w.open(server.url + "/ada/vision/r1#overview", wait="#run-meta tbody tr")
    assert meta_row(w.page, "group") == "sweep-1" and meta_row(w.page, "job type") == "train"
    w.page.fill("#edit-name", "renamed <b>run</b>")
    w.page.fill("#edit-tags", "best, keep")
    w.page.fill("#edit-notes", "notes in place")
    w.page.click("#edit-save")
    w.page.locator("#edit-state", has_text=re.compile("^saved$")).wait_for()
    assert w.page.inner_text("h1") == "renamed <b>run</b>"
    w.page.screenshot(path=str(shots / "explorer-server-overview.png"), full_page=True)
    w.check()
    context.close()
    # persisted on the server, as the API (and so Api()) reads it
    got = requests.get(f"{server.url}/api/v1/runs/ada/vision/r1", timeout=10,
                       headers={"Authorization": f"Bearer {server.ada_key}"}).json()
    assert (got["name"], got["tags"], got["notes"]) == ("renamed <b>run</b>", ["best", "keep"], "notes in place")


def test_server_explorer_access_rule(server, chromium):
    api = "/_x/api/runs/ada/vision/r1"
    assert requests.get(server.url + api, timeout=10).status_code == 401
    ada = {"Authorization": f"Bearer {server.ada_key}"}
    bob = {"Authorization": f"Bearer {server.bob_key}"}
    assert requests.get(server.url + api, headers=ada, timeout=10).json()["id"] == "r1"
    for path in (api, api + "/history", "/_x/api/runs/ada/vision"):
        assert requests.get(server.url + path, headers=bob, timeout=10).status_code == 404, path
    assert requests.patch(server.url + api, json={"name": "bob was here"}, headers=bob, timeout=10).status_code == 404
    assert requests.get(server.url + "/_x/api/projects", headers=bob, timeout=10).json() == {"projects": []}

    session = WebSession(server.url)
    session.sign_in("bob", PASSWORD)
    assert session.get(api).status_code == 404
    assert session.get("/ada/vision/r1").status_code == 404
    assert session.get("/ada/vision").status_code == 404
    # a browser session edits only with its CSRF token
    alice = WebSession(server.url)
    alice.sign_in("ada", PASSWORD)
    assert alice.http.patch(server.url + api, json={"name": "forged"}, timeout=10).status_code == 403

    context = chromium.new_context()
    w = Watched(context)
    sign_in(w.page, server.url, "bob")
    w.open(server.url + "/ada/vision/r1")
    assert w.page.inner_text("h1") == "Not available"
    assert XSS not in w.page.content()
    context.close()


def test_server_chart_of_a_running_run_gains_points(server, chromium, tmp_path):
    env = clean_env(GRADEXP_HOST=server.url, GRADEXP_API_KEY=server.ada_key)
    t = Trainer(tmp_path, "live", steps=60, stops=(19, 39), env=env)
    try:
        t.first("waiting")
        context = chromium.new_context()
        w = Watched(context)
        sign_in(w.page, server.url, "ada")
        w.open(f"{server.url}/ada/stream/live#charts")
        charts_ready(w.page)
        wait_for(lambda: points(w.page, "loss") == 20, "the first 20 steps in the chart")
        t.go(19)
        wait_for(lambda: points(w.page, "loss") == 40, "steps 20-39 to appear in the open chart")
        t.go(39)
        assert t.wait() == 0
        wait_for(lambda: points(w.page, "loss") == 60, "the last steps")
        w.check()
        context.close()
    finally:
        Trainer.cleanup()
