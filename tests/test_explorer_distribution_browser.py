"""The distribution, compare and gradient-flow views in Debian's Chromium (Playwright) over
`gradexp ui`: the heatmaps draw, a click on a step shows that step's histogram with NumPy's
counts, the flow heatmap opens the tensor clicked. Screenshots go to test-artifacts/screenshots/.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest

import gradexp
from services import clean_env, wait_for

SHOTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "screenshots"
KEY = "grad/fc1/weight"
STEPS = 30


def _grad(step: int) -> np.ndarray:
    rng = np.random.default_rng(step)
    a = (rng.standard_normal((48, 20)) * np.exp(-step / 10)).astype(np.float32)
    a[:, : step % 7] = 0  # dead units: exact zeros
    if step % 5 == 3:
        a[0, 0], a[1, 1], a[2, 2] = np.nan, np.inf, -np.inf
    return a


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """`gradexp ui` over two runs of one project; yields (base URL, run ids, logged arrays)."""
    root = tmp_path_factory.mktemp("ui-runs")
    logged: dict[int, np.ndarray] = {}
    ids = []
    for name in ("a", "b"):
        with gradexp.init("proj", dir=root, name=name) as run:
            for step in range(STEPS):
                g = _grad(step) if name == "a" or step < 17 else _grad(step) * 2
                logged.setdefault(step, g)
                run.log({KEY: g, "grad/fc1/bias": g[:, 0].copy(), "grad/fc2/weight": g[:10] * 3,
                         "loss": float(step)}, step=step)
        ids.append(run.id)
    proc = subprocess.Popen([sys.executable, "-m", "gradexp", "ui", "--dir", str(root)], env=clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out: list[str] = []
    threading.Thread(target=lambda: out.extend(iter(proc.stdout.readline, "")), daemon=True).start()  # type: ignore[union-attr]
    try:
        m = wait_for(lambda: re.search(r"(http://127\.0\.0\.1:\d+/\?token=\S+)", "".join(out)),
                     "gradexp ui to print its URL", proc=proc)
        yield m.group(1), ids, logged
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def page(chromium, ui):
    url, _, _ = ui
    context = chromium.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    foreign: list[str] = []
    page.on("request", lambda r: foreign.append(r.url) if urlsplit(r.url).hostname not in ("127.0.0.1", None)
            and not r.url.startswith("data:") else None)
    page.goto(url)  # the token signs this browser in
    yield page
    context.close()
    assert not errors, errors
    assert not foreign, foreign


def _open_tensor(page, base: str, run_id: str) -> None:
    page.goto(f"{base}/local/proj/{run_id}#tensors")
    page.wait_for_function("() => document.body.dataset.run !== undefined")
    page.evaluate("k => document.dispatchEvent(new CustomEvent('gx:tensor', {detail: {key: k}}))", KEY)
    page.wait_for_selector("canvas.gx-dist-heatmap[data-drawn]")


HEAT_SIZE = "() => { const c = document.querySelector('canvas.gx-dist-heatmap'); return [c.width, c.height]; }"
COLOURED = """() => { const c = document.querySelector('canvas.gx-dist-heatmap');
    const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let n = 0;
    for (let i = 0; i < d.length; i += 4) if (d[i] !== 246 || d[i + 1] !== 246) n++; return n; }"""
BIN_ROWS = """() => Array.from(document.querySelectorAll('.gx-hist-counts tbody tr:not([data-strip])'),
    r => Array.from(r.cells, c => Number(c.textContent)))"""
STRIP_ROWS = """() => Object.fromEntries(Array.from(document.querySelectorAll('.gx-hist-counts tr[data-strip]'),
    r => [r.dataset.strip, Number(r.cells[1].textContent)]))"""


def test_distribution_heatmap_and_step_histogram(page, ui):
    url, ids, logged = ui
    base = url.split("/?")[0]
    SHOTS.mkdir(parents=True, exist_ok=True)
    _open_tensor(page, base, ids[0])
    heat = page.locator("canvas.gx-dist-heatmap")
    assert heat.get_attribute("data-drawn") == str(STEPS)
    assert page.evaluate(HEAT_SIZE) == [STEPS, 64]
    assert page.evaluate(COLOURED) > STEPS  # not blank
    page.screenshot(path=str(SHOTS / "explorer-dist-1-heatmap.png"), full_page=True)
    finite_all = np.concatenate([x[np.isfinite(x)] for x in logged.values()])
    for scale in ("linear", "symlog"):
        page.select_option("#panel-distribution select[aria-label='value axis']", scale)
        page.wait_for_selector(f"canvas.gx-dist-heatmap[data-scale={scale}]")
        for step in (13, 18):  # a click on the column of the step shows its histogram
            box = heat.bounding_box()
            assert box is not None
            heat.click(position={"x": (step + 0.5) / STEPS * box["width"], "y": box["height"] / 2})
            page.wait_for_selector(f"canvas.gx-hist-bars[data-step='{step}']")
            rows = page.evaluate(BIN_ROWS)
            edges = [rows[0][0]] + [r[1] for r in rows]
            assert [r[0] for r in rows[1:]] == edges[1:-1]
            counts = [r[2] for r in rows]
            a = logged[step]
            f = a[np.isfinite(a)]
            assert counts == np.histogram(f, np.array(edges))[0].tolist()
            assert sum(counts) == f.size
            assert page.evaluate(STRIP_ROWS) == {
                "nan": int(np.isnan(a).sum()), "posinf": int(np.isposinf(a).sum()),
                "neginf": int(np.isneginf(a).sum()), "zero": int((a == 0).sum())}
            # the edges are the distribution's own: from the finite min to the finite max of all steps
            assert edges[0] == float(finite_all.min()) and edges[-1] == float(finite_all.max())
        if scale == "linear":
            page.locator(".gx-hist-counts").evaluate("t => t.closest('details').open = true")
            heat.hover(position={"x": 3, "y": 100})
            readout = page.locator("#panel-distribution .gx-readout").first.inner_text()
            assert re.match(r"step \d+ · \[.*\) · count \d+", readout)
            page.screenshot(path=str(SHOTS / "explorer-dist-2-step-histogram.png"), full_page=True)
    page.screenshot(path=str(SHOTS / "explorer-dist-3-symlog.png"), full_page=True)


def test_compare_steps_and_runs(page, ui):
    url, ids, logged = ui
    base = url.split("/?")[0]
    _open_tensor(page, base, ids[0])
    page.fill("#panel-compare input[aria-label='step A']", "4")
    page.fill("#panel-compare input[aria-label='step B']", "2")
    # a step chosen elsewhere (the scrubber, a live run's newest step, the view's load
    # finishing) must not overwrite what the user typed
    page.evaluate("k => document.dispatchEvent(new CustomEvent('gx:step', {detail: {key: k, step: 9}}))", KEY)
    assert page.input_value("#panel-compare input[aria-label='step A']") == "4"
    assert page.input_value("#panel-compare input[aria-label='step B']") == "2"
    page.click("#panel-compare button:text('a − b')")
    page.wait_for_selector("canvas.gx-diff-heatmap[data-drawn]")
    d = logged[4].astype(np.float64) - logged[2].astype(np.float64)
    stats = page.locator("#panel-compare .gx-stats").first.inner_text().replace("\n", " ")
    m = re.search(r"max \|Δ\| (\S+)", stats)
    assert m and float(m.group(1)) == np.abs(d[np.isfinite(d)]).max()
    heat = page.locator("canvas.gx-diff-heatmap")
    box = heat.bounding_box()
    assert box is not None
    i, j = 7, 13  # row 7, column 13 of the 48 x 20 tensor
    heat.hover(position={"x": (j + 0.5) / 20 * box["width"], "y": (i + 0.5) / 48 * box["height"]})
    index, value = page.locator("#panel-compare .gx-readout").inner_text().split(" · a − b = ")
    assert index == f"[{i}, {j}]" and float(value) == d[i, j]
    page.select_option("#panel-compare select[aria-label='other run']", ids[1])
    page.click("#panel-compare button:text('compare')")
    page.wait_for_selector("#panel-compare .gx-first-diff")
    assert page.locator("#panel-compare .gx-first-diff").inner_text() == "17"
    page.screenshot(path=str(SHOTS / "explorer-dist-4-compare.png"), full_page=True)


def test_flow_heatmap_opens_the_clicked_tensor(page, ui):
    url, ids, _ = ui
    base = url.split("/?")[0]
    page.goto(f"{base}/local/proj/{ids[0]}#flow")
    page.wait_for_selector("canvas.gx-flow-heatmap[data-drawn]")
    keys = page.locator(".gx-flow-keys span").all_inner_texts()
    assert keys == ["grad/fc1/bias", KEY, "grad/fc2/weight"]  # in key order
    page.screenshot(path=str(SHOTS / "explorer-flow-1-l2.png"), full_page=True)
    heat = page.locator("canvas.gx-flow-heatmap")
    box = heat.bounding_box()
    assert box is not None
    page.evaluate("""() => { window.__picked = [];
        document.addEventListener('gx:tensor', e => window.__picked.push(['tensor', e.detail.key]));
        document.addEventListener('gx:step', e => window.__picked.push(['step', e.detail.key, e.detail.step])); }""")
    heat.hover(position={"x": (21 + 0.5) / STEPS * box["width"], "y": (2 + 0.5) / 3 * box["height"]})
    assert page.locator("#panel-layers .gx-readout").inner_text().startswith("grad/fc2/weight · step 21 · L2 norm ")
    heat.click(position={"x": (21 + 0.5) / STEPS * box["width"], "y": (2 + 0.5) / 3 * box["height"]})
    picked = page.evaluate("() => window.__picked")
    assert picked[:2] == [["tensor", "grad/fc2/weight"], ["step", "grad/fc2/weight", 21]]
    # the scrubber loads the tensor's steps after the click: it must keep the clicked step, not jump to the last
    page.wait_for_function("() => window.__picked.length >= 3")
    assert {tuple(e) for e in page.evaluate("() => window.__picked")[1:]} == {("step", "grad/fc2/weight", 21)}
    assert page.locator("#step-scrubber").get_attribute("data-step") == "21"
    page.wait_for_function("() => location.hash === '#tensors'")
    page.wait_for_selector("canvas.gx-dist-heatmap[data-drawn]")
    assert page.locator("#panel-distribution .gx-hist-bars").get_attribute("data-step") == "21"
    page.goto(f"{base}/local/proj/{ids[0]}#flow")
    page.wait_for_selector("canvas.gx-flow-heatmap[data-drawn]")
    page.select_option("#panel-layers select[aria-label='statistic']", "nonfinite")
    page.wait_for_function("() => document.querySelector('#panel-layers .gx-legend span')"
                           ".textContent.startsWith('0 …')")
    page.screenshot(path=str(SHOTS / "explorer-flow-2-nonfinite.png"), full_page=True)


def test_more_steps_than_pixel_columns(chromium, tmp_path):
    """5,000 steps: 4,096 columns, each a run of consecutive steps summed (none dropped)."""
    with gradexp.init("long", dir=tmp_path) as run:
        for step in range(5000):
            run.log({"grad/w": np.arange(8, dtype=np.float32) * (step % 10)}, step=step)
    proc = subprocess.Popen([sys.executable, "-m", "gradexp", "ui", "--dir", str(tmp_path)], env=clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out: list[str] = []
    threading.Thread(target=lambda: out.extend(iter(proc.stdout.readline, "")), daemon=True).start()  # type: ignore[union-attr]
    context = chromium.new_context(viewport={"width": 1400, "height": 1000})
    try:
        m = wait_for(lambda: re.search(r"(http://127\.0\.0\.1:\d+/\?token=\S+)", "".join(out)),
                     "gradexp ui to print its URL", proc=proc)
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(m.group(1))
        base = m.group(1).split("/?")[0]
        page.goto(f"{base}/local/long/{run.id}#tensors")
        page.wait_for_function("() => document.body.dataset.run !== undefined")
        page.evaluate("k => document.dispatchEvent(new CustomEvent('gx:tensor', {detail: {key: k}}))", "grad/w")
        page.wait_for_selector("canvas.gx-dist-heatmap[data-drawn]")
        assert page.evaluate("() => document.querySelector('canvas.gx-dist-heatmap').width") == 4096
        heat = page.locator("canvas.gx-dist-heatmap")
        box = heat.bounding_box()
        assert box is not None
        summed = 0
        for x in np.linspace(1, box["width"] - 1, 40):
            heat.hover(position={"x": float(x), "y": box["height"] - 1})
            readout = page.locator("#panel-distribution .gx-readout").first.inner_text()
            m = re.fullmatch(r"(?:step (\d+)|steps (\d+)–(\d+) \(summed\)) · \[0, \S+\) · count (\d+)", readout)
            assert m, readout
            first, last = (int(m[1]), int(m[1])) if m[1] else (int(m[2]), int(m[3]))
            assert last - first <= 1
            summed += last > first
            # the lowest bin holds each step's zeros: all 8 elements at steps 0, 10, ..., else one
            assert int(m[4]) == sum(8 if s % 10 == 0 else 1 for s in range(first, last + 1))
        assert summed  # some columns are two steps (5,000 over 4,096 columns)
        page.goto(f"{base}/local/long/{run.id}#flow")
        page.wait_for_selector("canvas.gx-flow-heatmap[data-drawn]")
        assert page.evaluate("() => document.querySelector('canvas.gx-flow-heatmap').width") == 4096
        assert not errors, errors
    finally:
        context.close()
        proc.terminate()
        proc.wait(10)


LEGEND = """() => Array.from(document.querySelectorAll('.gx-dist-quantiles .u-legend .u-series'),
    r => [r.querySelector('.u-label').textContent, r.querySelector('.u-value').textContent])"""
STRIP_NAMES = """() => { const c = document.querySelector('canvas.gx-hist-bars').getBoundingClientRect();
    return Array.from(document.querySelectorAll('.gx-hist-strip-names span'), s => {
        const r = s.getBoundingClientRect();
        return [s.textContent, (r.left + r.width / 2 - c.left) / c.width, r.top >= c.bottom - 1]; }); }"""


def test_quantile_legend_and_step_histogram_strips_are_labelled(page, ui):
    """The quantile chart's legend shows the values at the selected step (the last one at
    first) while the pointer is off the chart, not '--'; the step histogram's NaN, +Inf,
    -Inf and zero bars are named."""
    url, ids, logged = ui
    base = url.split("/?")[0]
    _open_tensor(page, base, ids[0])
    page.wait_for_selector("canvas.gx-hist-bars[data-drawn]")

    def legend_at(step: int) -> dict[str, str]:
        rows = dict(page.evaluate(LEGEND))
        assert rows.get("step") == str(step), rows
        return rows

    def check(step: int) -> None:
        rows = legend_at(step)
        f = logged[step][np.isfinite(logged[step])].astype(np.float64)
        for name, q in (("min", 0.0), ("p50", 0.5), ("max", 1.0)):
            assert rows[name] != "--"
            assert float(rows[name].replace(",", "")) == pytest.approx(float(np.quantile(f, q)), rel=1e-2, abs=1e-3)

    check(STEPS - 1)
    quant = page.locator(".gx-dist-quantiles .u-over")
    box = quant.bounding_box()
    assert box is not None
    quant.hover(position={"x": box["width"] * 0.3, "y": box["height"] / 2})  # on the chart: the hovered step
    page.mouse.move(1, 1)  # off it: the selected step again
    check(STEPS - 1)
    heat = page.locator("canvas.gx-dist-heatmap")
    hbox = heat.bounding_box()
    assert hbox is not None
    heat.click(position={"x": (13 + 0.5) / STEPS * hbox["width"], "y": hbox["height"] / 2})
    page.wait_for_selector("canvas.gx-hist-bars[data-step='13']")
    page.mouse.move(1, 1)
    check(13)
    names = page.evaluate(STRIP_NAMES)  # named, left to right, under the bars right of the bins
    assert [n for n, _, _ in names] == ["NaN", "+Inf", "−Inf", "zero"]
    centres = [x for _, x, _ in names]
    assert 0.6 < centres[0] < centres[1] < centres[2] < centres[3] < 1 and all(below for _, _, below in names)
