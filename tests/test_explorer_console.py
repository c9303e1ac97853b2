"""The run's console output, system metrics, code and exit details in the explorer (issues #11,
#13), on `gradexp ui` and on `gradexp server`: a run that prints (an XSS line among them),
samples system metrics, runs in a git repo with an uncommitted change and raises. Also the
tensor view's axes named with the run's dimension labels.

Browser tests drive Debian's Chromium and fail on a console error, a page error, a dialog (an
XSS ``alert``) or a request to a host other than the loopback address; screenshots go to
test-artifacts/screenshots/explorer-console-*.png.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pytest
import requests
from test_explorer import PASSWORD, SHOTS, UI, XSS, Watched, charts_ready, sign_in

from gradexp.core.client import Client
from gradexp.sync.sender import sync
from services import GradexpServer, Trainer, clean_env, wait_for

REPO = Path(__file__).resolve().parents[1]
LINES = [f"epoch {i}: loss {1 / (i + 1):.3f}" for i in range(6)]
TRAIN = f"""
import time
import numpy as np
import gradexp
run = gradexp.init("loud", id="r1", system_interval=0.2)
for i, line in enumerate({LINES!r}):
    print(line, flush=True)
    run.log({{"loss": 1 / (i + 1)}}, step=i)
run.log(np.arange(24, dtype=np.float32).reshape(2, 3, 4), step=6, name="w",
        dimension_labels=["batch", "row", "col"])
print({XSS!r}, flush=True)
time.sleep(1.5)  # several system samples, one every 0.2 s
raise RuntimeError("diverged at epoch 5")
"""


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(cwd), *args], check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """The runs folder of a run that printed, sampled system metrics and raised, inside a git
    repo with an uncommitted change to the script."""
    work = tmp_path_factory.mktemp("console")
    git(work, "init", "-q", "-b", "main")
    script = work / "train.py"
    script.write_text("# first\n")
    git(work, "add", "train.py")
    git(work, "-c", "user.name=t", "-c", "user.email=t@example.invalid", "commit", "-qm", "first")
    script.write_text(textwrap.dedent(TRAIN))
    env = clean_env(PYTHONPATH=str(REPO), GRADEXP_DIR=str(work / "runs"))
    r = subprocess.run([sys.executable, str(script)], cwd=work, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "RuntimeError: diverged at epoch 5" in r.stderr
    return next((work / "runs").rglob("r1"))


@pytest.fixture(scope="module")
def ui(trained):
    u = UI(trained.parent.parent)
    yield u
    u.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory, trained):
    work = tmp_path_factory.mktemp("console-server")
    s = GradexpServer(work).start()
    s.user_with_password("ada", PASSWORD)
    s.user_with_password("bob", PASSWORD)
    s.ada_key = s.create_key("ada")
    sync(trained, Client(s.url, s.ada_key), "ada")
    yield s
    s.stop()


def check_run_page(w: Watched, base: str, entity: str, shots: Path, name: str) -> None:
    """Console lines in order with the XSS line as text, the traceback and code on the Overview,
    system charts drawn, the tensor's axes named."""
    run = f"{base}/{entity}/loud/r1"
    w.open(run + "#console", wait="#console[data-ready='1']")
    texts = w.page.eval_on_selector_all("#console span", "ss => ss.map(s => s.textContent.replace(/\\n$/, ''))")
    assert texts[:len(LINES) + 1] == [*LINES, XSS], texts
    assert any("RuntimeError: diverged at epoch 5" in t for t in texts), texts
    assert w.page.locator("#console img, main img").count() == 0
    w.page.screenshot(path=str(shots / f"explorer-console-{name}.png"), full_page=True)

    w.open(run + "#overview", wait="#run-traceback:not([hidden])")
    tb = w.page.text_content("#run-traceback") or ""
    assert tb.startswith("Traceback (most recent call last):") and tb.rstrip().endswith(
        "RuntimeError: diverged at epoch 5"), tb
    exit_card = w.page.inner_text("#run-exit")
    assert "RuntimeError" in exit_card and "diverged at epoch 5" in exit_card and "1" in exit_card
    meta = w.page.inner_text("#run-meta")
    for field in ("host", "argv", "python", "gradexp"):
        assert field in meta, (field, meta)
    assert "train.py" in meta
    w.page.wait_for_selector("#run-code #run-patch")
    code = w.page.inner_text("#run-code")
    assert "main" in code and "yes" in code and "train.py" in code, code  # branch, dirty, program
    href = w.page.get_attribute("#run-patch", "href")
    w.page.screenshot(path=str(shots / f"explorer-console-{name}-overview.png"), full_page=True)
    patch = w.page.evaluate("(u) => fetch(u).then(r => r.text())", href)
    assert "+raise RuntimeError" in patch and "-# first" in patch

    w.open(run + "#charts")
    charts_ready(w.page)
    w.page.wait_for_selector("#system-charts[data-ready='1']")
    boxes = w.page.locator("#system-charts .gx-chart")
    assert boxes.count() > 0 and w.page.locator("#system-charts canvas").count() > 0
    assert w.page.is_visible("#system-charts")
    drawn = w.page.eval_on_selector_all("#system-charts .gx-chart", "bs => bs.map(b => +b.dataset.points)")
    assert max(drawn) >= 3, drawn
    w.page.screenshot(path=str(shots / f"explorer-console-{name}-system.png"), full_page=True)

    w.open(run + "#tensors", wait="#tensor-list .gx-tensor-item")
    w.page.locator("#tensor-list .gx-tensor-item[data-key='w'] button").click()
    w.page.wait_for_selector("#panel-at-step .gx-axis-rows")
    options = w.page.eval_on_selector_all("#panel-at-step .gx-axis-cols option", "os => os.map(o => o.textContent)")
    assert options == ["batch (2)", "row (3)", "col (4)"], options
    w.check()


def test_ui_shows_console_system_code_and_exit(ui, chromium):
    SHOTS.mkdir(parents=True, exist_ok=True)
    context = chromium.new_context(viewport={"width": 1280, "height": 900})
    w = Watched(context)
    w.open(ui.url, wait="#projects tbody tr")
    check_run_page(w, ui.base, "local", SHOTS, "ui")
    context.close()


def test_server_shows_console_system_code_and_exit(server, chromium):
    SHOTS.mkdir(parents=True, exist_ok=True)
    context = chromium.new_context(viewport={"width": 1280, "height": 900})
    w = Watched(context)
    sign_in(w.page, server.url, "ada")
    check_run_page(w, server.url, "ada", SHOTS, "server")
    context.close()


def test_console_endpoint_since_and_access(server):
    base = f"{server.url}/_x/api/runs/ada/loud/r1"
    ada = {"Authorization": f"Bearer {server.ada_key}"}
    all_lines = requests.get(base + "/console", headers=ada, timeout=30).json()["lines"]
    assert [x["text"] for x in all_lines[:len(LINES)]] == LINES
    assert [x["line"] for x in all_lines] == list(range(len(all_lines)))
    tail = requests.get(base + "/console?since=3", headers=ada, timeout=30).json()["lines"]
    assert tail == all_lines[3:]
    assert requests.get(base + "/console?since=x", headers=ada, timeout=30).status_code == 400
    table = pa.ipc.open_stream(requests.get(base + "/system", headers=ada, timeout=30).content).read_all()
    assert table.num_rows > 0 and any(n.startswith("system/") for n in table.column_names)
    bob = {"Authorization": f"Bearer {server.create_key('bob')}"}
    for path in ("/console", "/system", "/provenance", "/patch"):
        assert requests.get(base + path, timeout=30).status_code == 401, path
        assert requests.get(base + path, headers=bob, timeout=30).status_code == 404, path


def test_tensor_endpoints_carry_the_dimension_labels(server, ui):
    ada = requests.Session()
    ada.headers["Authorization"] = f"Bearer {server.ada_key}"
    local = requests.Session()
    local.get(ui.url, timeout=30)  # the token, as a cookie
    for http, base in ((ada, f"{server.url}/_x/api/runs/ada/loud/r1"), (local, f"{ui.base}/_x/api/runs/local/loud/r1")):
        listed = {t["key"]: t for t in http.get(base + "/tensors", timeout=30).json()}
        assert listed["w"]["dims"] == ["batch", "row", "col"], base
        r = http.get(base + "/tensor", params={"key": "w", "step": 6}, headers={"Accept-Encoding": "identity"},
                     timeout=30)
        meta = pa.ipc.open_stream(r.content).schema.metadata
        assert meta[b"dims"] == b'["batch", "row", "col"]', base


def test_console_of_a_running_run_is_tailed_while_open(tmp_path, chromium):
    """The trainer prints a JSON line at init, per step and when it waits (its line after
    ``finish()`` is not captured): the open Console
    tab gains the lines printed after it opened, asking only for those (``since=``)."""
    t = Trainer(tmp_path, "live", steps=20, stops=(9,))
    try:
        t.first("waiting")
        u = UI(t.dir)
        try:
            context = chromium.new_context()
            w = Watched(context)
            w.open(u.url)
            w.open(f"{u.base}/local/stream/live#console", wait="#console[data-ready='1']")
            lines = lambda: int(w.page.get_attribute("#console", "data-lines") or 0)  # noqa: E731
            wait_for(lambda: lines() == 12, "init, steps 0-9 and 'waiting' in the console")
            first = len(w.requests)
            t.go(9)
            assert t.wait() == 0
            wait_for(lambda: lines() == 22, "steps 10-19 in the open console")
            assert w.page.inner_text("#console-state") == "22 lines"
            texts = w.page.eval_on_selector_all("#console span", "ss => ss.map(s => JSON.parse(s.textContent))")
            assert [x["step"] for x in texts if "step" in x] == list(range(20))
            polls = [r for r in w.requests[first:] if "/console?" in r]
            assert polls and all("since=0" not in r for r in polls), polls  # only the tail is fetched
            w.check()
            context.close()
        finally:
            u.stop()
    finally:
        Trainer.cleanup()
