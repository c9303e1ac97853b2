"""Explorer, tensor at a step: from a scrub (the → key) to the heatmap's pixels, in headless Chromium.

Writes a run of one 1024x1024 float32 tensor, N(0, 1), at ``--steps`` steps (each different),
serves it with ``gradexp ui`` (a subprocess, as a user starts it) and drives Debian's Chromium
(``/usr/bin/chromium``) on the run page's Tensors tab. One scrub is timed in the page: from
dispatching the → keydown to the frame after the panel's ``gx:drawn`` event (the new ImageData
is on the canvas and a frame has been produced). Three cases:

* first visit: the step was never shown; the server reads the part (from the page cache) and
  encodes the tensor;
* warm: the server has the step's answer cached (visited once before) but the page no longer
  holds it (it keeps 8 tensors): fetch, decode, colour 1M pixels, paint;
* in page: the step is among the page's 8 (scrubbing back and forth): colour and paint only.

Target (issue #11): warm <= 300 ms. Prints Markdown to stdout, progress to stderr.
Usage: python benchmarks/bench_explorer_tensor.py [--steps 24] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import requests

TARGET_MS = 300.0
KEY = "grad/fc1/weight"
TOKEN = "bench-explorer-tensor"
CHROMIUM = "/usr/bin/chromium"

SCRUB = """async (direction) => {
  const panel = document.getElementById('panel-at-step');
  const drawn = new Promise((res) => panel.addEventListener('gx:drawn', res, { once: true }));
  const t0 = performance.now();
  document.dispatchEvent(new KeyboardEvent('keydown', { key: direction, bubbles: true }));
  await drawn;
  await new Promise((r) => requestAnimationFrame(() => setTimeout(r, 0)));
  const total = performance.now() - t0;
  const fetched = performance.getEntriesByType('resource')
    .filter((e) => e.name.includes('/tensor?') && e.startTime >= t0);
  performance.clearResourceTimings();
  return [total, fetched.length ? fetched[0].responseEnd - fetched[0].startTime : null];
}"""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def write_run(root: Path, steps: int) -> None:
    import gradexp

    rng = np.random.default_rng(0)
    run = gradexp.init("bench", id="tensor-view", dir=root, mode="offline")
    for s in range(steps):
        run.log({KEY: rng.standard_normal((1024, 1024), dtype=np.float32)}, step=s)
    run.finish()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stats(ms: list[float]) -> str:
    ms = sorted(ms)
    p95 = ms[min(len(ms) - 1, round(0.95 * (len(ms) - 1)))]
    return f"{statistics.median(ms):.0f} | {p95:.0f} | {ms[-1]:.0f} | {len(ms)}"


def measure(url: str, steps: int, rounds: int) -> dict[str, Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        encodings: set[str] = set()
        page.on("response", lambda r: encodings.add(r.headers.get("content-encoding", "none"))
                if "/tensor?" in r.url else None)
        page.goto(f"{url}/local/bench/tensor-view?token={TOKEN}")
        page.click("a[data-tab=tensors]")
        page.locator(f"#tensor-list .gx-tensor-item[data-key='{KEY}'] button").click()
        page.wait_for_function(f"() => document.getElementById('panel-at-step').dataset.step === '{steps - 1}'")
        page.click("#step-scrubber .gx-step-label")  # keyboard focus on the page, not a field
        for _ in range(steps - 1):  # back to step 0, filling the server's cache
            page.evaluate(SCRUB, "ArrowLeft")
        # The page keeps the last 8 tensors shown: after a pass in one direction, the next
        # 7 steps of the pass back are in the page; the rest are server-cached misses.
        warm: list[float] = []
        in_page: list[float] = []
        fetch: list[float] = []
        for _ in range(rounds):
            for target in range(1, steps):
                ms, net = page.evaluate(SCRUB, "ArrowRight")
                (in_page if target < 8 else warm).append(ms)
                if target >= 8 and net is not None:
                    fetch.append(net)
            for target in range(steps - 2, -1, -1):
                ms, net = page.evaluate(SCRUB, "ArrowLeft")
                (in_page if target >= steps - 8 else warm).append(ms)
                if target < steps - 8 and net is not None:
                    fetch.append(net)
        for _ in range(rounds * 10):  # back and forth between two steps the page holds
            in_page.append(page.evaluate(SCRUB, "ArrowRight")[0])
            in_page.append(page.evaluate(SCRUB, "ArrowLeft")[0])
        browser.close()
    return {"warm": warm, "in_page": in_page, "fetch": fetch, "encodings": sorted(encodings)}


def first_visits(url: str, steps: int) -> list[float]:
    """A fresh server and page: every step's first showing."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{url}/local/bench/tensor-view?token={TOKEN}")
        page.click("a[data-tab=tensors]")
        page.locator(f"#tensor-list .gx-tensor-item[data-key='{KEY}'] button").click()
        page.wait_for_function(f"() => document.getElementById('panel-at-step').dataset.step === '{steps - 1}'")
        page.click("#step-scrubber .gx-step-label")
        out = [page.evaluate(SCRUB, "ArrowLeft")[0] for _ in range(steps - 1)]
        browser.close()
    return out


class UI:
    def __init__(self, root: Path) -> None:
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("GRADEXP_")}
        self.proc = subprocess.Popen([sys.executable, "-m", "gradexp", "ui", "--dir", str(root), "--port",
                                      str(self.port), "--token", TOKEN], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(f"{self.url}/?token={TOKEN}", timeout=5).ok:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("gradexp ui did not start")
            time.sleep(0.1)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(15)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=24, help="steps logged (> 8, the page's own cache)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-explorer-tensor-") as tmp:
        root = Path(tmp)
        log(f"writing {args.steps} steps of a 1024x1024 float32 tensor")
        write_run(root, args.steps)
        ui = UI(root)
        try:
            log("first visits")
            first = first_visits(ui.url, args.steps)
        finally:
            ui.stop()
        ui = UI(root)
        try:
            log("warm and in-page scrubs")
            res = measure(ui.url, args.steps, args.rounds)
        finally:
            ui.stop()
    warm = res["warm"]
    ok = statistics.median(warm) <= TARGET_MS
    print("### Explorer: tensor at a step, 1024x1024 float32, scrub to pixels (headless Chromium)\n")
    print("| case | median ms | p95 ms | max ms | scrubs |")
    print("|---|---|---|---|---|")
    print(f"| first visit (server reads the part) | {stats(first)} |")
    print(f"| warm (server cached, not in the page) | {stats(warm)} |")
    print(f"| in page (among the page's 8 tensors) | {stats(res['in_page'])} |")
    print(f"| of warm: the fetch alone (request to last byte) | {stats(res['fetch'])} |")
    print(f"\nTarget: warm <= {TARGET_MS:.0f} ms: {'met' if ok else 'NOT met'}. "
          f"Tensor responses' Content-Encoding: {', '.join(res['encodings'])}. "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
