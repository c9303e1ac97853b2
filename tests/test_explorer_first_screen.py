"""The run page of an ended run asks for the charts on its first screen before the others, and
still draws every chart, each with its data (Debian's Chromium over `gradexp ui`)."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import pytest
from test_explorer import UI, Watched, charts_ready, points

import gradexp

KEYS = [f"layer{g}/metric{m}" for g in range(4) for m in range(6)]
STEPS = 3000


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    work = tmp_path_factory.mktemp("first-screen")
    with gradexp.init("many", id="m1", dir=work) as run:
        for s in range(STEPS):
            run.log({k: float((s * (i + 1)) % 97) for i, k in enumerate(KEYS)})
    u = UI(work)
    yield u
    u.stop()


def test_first_screen_charts_come_first_and_every_chart_is_drawn(ui, chromium):
    context = chromium.new_context(viewport={"width": 1280, "height": 700})
    w = Watched(context)
    w.open(ui.url)
    w.open(ui.base + "/local/many/m1#charts")
    charts_ready(w.page)
    asked = [parse_qs(urlsplit(u).query)["keys"][0].split(",") for u in w.requests
             if urlsplit(u).path.endswith("/history")]
    assert len(asked) == 2, asked
    first, rest = asked
    assert first and rest and not set(first) & set(rest)
    assert sorted(first + rest) == sorted(KEYS)
    on_screen = w.page.evaluate("""() => Array.from(document.querySelectorAll('.gx-chart'))
        .filter(b => b.getBoundingClientRect().top < innerHeight).map(b => b.dataset.key)""")
    assert sorted(first) == sorted(on_screen)
    for key in KEYS:  # every chart drawn, with all its buckets
        assert w.page.locator(f".gx-chart[data-key='{key}'] .uplot").count() == 1, key
        assert points(w.page, key) > 200, key
        assert w.page.get_attribute(f".gx-chart[data-key='{key}']", "data-reduced") == "1"
    marks = w.page.evaluate("""() => ['gx-first-charts-drawn', 'gx-charts-drawn']
        .map(n => performance.getEntriesByName(n)[0].startTime)""")
    assert marks[0] <= marks[1]
    w.check()
    context.close()


def test_the_rest_is_asked_for_once_the_first_screen_is_answered(ui, chromium):
    """Asked for together, the two answers were reduced at once on the server's two cores and
    the first came later; the rest is asked for once the first screen's answer is in."""
    context = chromium.new_context(viewport={"width": 1280, "height": 700})
    w = Watched(context)
    events: list[tuple[str, str]] = []
    w.page.on("request", lambda r: urlsplit(r.url).path.endswith("/history") and events.append(("asked", r.url)))
    w.page.on("requestfinished",
              lambda r: urlsplit(r.url).path.endswith("/history") and events.append(("answered", r.url)))
    w.open(ui.url)
    w.open(ui.base + "/local/many/m1#charts")
    charts_ready(w.page)
    asked = [u for what, u in events if what == "asked"]
    assert len(asked) == 2, events
    first, rest = asked
    assert events.index(("answered", first)) < events.index(("asked", rest)), events
    w.check()
    context.close()


def test_the_first_screen_is_the_screen_the_page_shows(ui, chromium):
    """The address's #charts picks the tab and does not scroll the page: the first screen the
    charts choose is the one shown when they are drawn (the page used to be scrolled to an
    element named "charts" at a moment that raced the choice)."""
    for _ in range(3):
        context = chromium.new_context(viewport={"width": 1280, "height": 700})
        w = Watched(context)
        w.open(ui.url)
        w.open(ui.base + "/local/many/m1#charts")
        charts_ready(w.page)
        assert w.page.evaluate("scrollY") == 0
        w.check()
        context.close()
