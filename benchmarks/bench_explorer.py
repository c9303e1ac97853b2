"""Workload: the explorer in headless Chromium (Debian's /usr/bin/chromium, Playwright).

1. First charts: a local run of 20 metrics x 1,000,000 steps served by ``gradexp ui``, and the
   same run synced to ``gradexp server``; time from navigation start to the run page's
   first-screen charts painted (the page's ``gx-first-charts-drawn`` performance mark) and to
   all charts painted (``gx-charts-drawn``; both set after the frame that shows them). "Cold"
   is the first load after ``gradexp ui`` (or the server) started (the history is read from the
   run folder, or the server's Parquet); "warm" the loads after it (the history of a finished
   run is cached by the explorer). Target: <= 1.5 s.
2. Live: a trainer process logs one step every 0.25 s into a run that is open in the page; the
   latency of a step is from its ``log()`` returning (the trainer's clock) to the open chart
   showing that step (its ``data-last-step``, polled every 10 ms by the harness). Target: p95
   <= 2 s. Measured on ``gradexp ui`` (local folder) and on ``gradexp server`` (the trainer
   streams to it online).

Progress on stderr; the Markdown report on stdout; --json FILE for the raw numbers.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

TARGET_FIRST = 1.5
TARGET_LIVE = 2.0
CHROMIUM = "/usr/bin/chromium"

MAKE_RUN = """
import sys, numpy as np, gradexp
steps, metrics = int(sys.argv[1]), int(sys.argv[2])
run = gradexp.init("bench", id="big", dir=sys.argv[3])
rng = np.random.default_rng(0)
vals = rng.standard_normal((1000, metrics)).tolist()
names = [f"group{m % 4}/metric{m}" for m in range(metrics)]
for s in range(steps):
    row = vals[s % 1000]
    run.log(dict(zip(names, row)))
run.finish()
"""

LIVE = """
import sys, time, json, gradexp
run = gradexp.init("bench", id=sys.argv[1], dir=sys.argv[2])
for s in range(int(sys.argv[3])):
    run.log({"loss": 1.0 / (s + 1), "acc": s / 100})
    print(json.dumps({"step": s, "t": time.time()}), flush=True)
    time.sleep(float(sys.argv[4]))
run.finish()
"""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def env() -> dict[str, str]:
    from services import clean_env

    return clean_env()


class UI:
    def __init__(self, runs: Path) -> None:
        from services import free_port

        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "gradexp", "ui", "--dir", str(runs), "--port",
                                      str(self.port)], env=env(), stderr=subprocess.PIPE, text=True)
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            m = re.search(r"Open (http://\S+)", line)
            if m:
                self.url = m.group(1)
                break
        self.base = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(15)


def make_run(folder: Path, steps: int, metrics: int) -> None:
    if (folder / "bench" / "big" / "run.json").exists():
        log(f"reusing the run in {folder}")
        return
    log(f"logging {metrics} metrics x {steps:,} steps into {folder} ...")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", MAKE_RUN, str(steps), str(metrics), str(folder)], check=True, env=env())
    log(f"  {time.perf_counter() - t0:.0f} s")


def first_charts(browser: Any, ui: UI, reps: int) -> dict[str, Any]:
    return _first_charts(browser, ui.base + "/local/bench/big", reps, sign_in=lambda page: page.goto(ui.url))


def _first_charts(browser: Any, address: str, reps: int, *, sign_in: Any) -> dict[str, Any]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    sign_in(page)
    times, firsts = [], []
    for i in range(reps + 1):
        page.goto(address + f"?load={i}#charts")  # a new document each time
        page.wait_for_selector("body[data-charts-ready='1']", timeout=120_000)
        ms = page.evaluate("performance.getEntriesByName('gx-charts-drawn')[0].startTime")
        first = page.evaluate("(performance.getEntriesByName('gx-first-charts-drawn')[0]"  # (a page that draws all
                              " || performance.getEntriesByName('gx-charts-drawn')[0]).startTime")  # at once)
        shown = page.evaluate("document.querySelectorAll('.gx-chart .uplot').length")
        charts = page.locator(".gx-chart canvas").count()
        times.append(ms / 1000)
        firsts.append(first / 1000)
        log(f"  {'cold' if i == 0 else 'warm'}: {first:.0f} ms to the first screen's charts, {ms:.0f} ms to all "
            f"{charts} charts drawn ({shown} plots)")
    context.close()
    return {"cold_s": times[0], "warm_s": times[1:], "first_cold_s": firsts[0], "first_warm_s": firsts[1:],
            "charts": charts}


def live(browser: Any, base: str, page_path: str, runs_dir: Path, run_id: str, *, steps: int, every: float,
         trainer_env: dict[str, str], sign_in: Any = None) -> dict[str, Any]:
    proc = subprocess.Popen([sys.executable, "-c", LIVE, run_id, str(runs_dir), str(steps), str(every)],
                            stdout=subprocess.PIPE, text=True, env=trainer_env)
    logged: dict[int, float] = {}

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            item = json.loads(line)
            logged[item["step"]] = item["t"]
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    while len(logged) < 3:
        time.sleep(0.05)
    context = browser.new_context()
    page = context.new_page()
    if sign_in:
        sign_in(page)
    page.goto(base + page_path)
    page.wait_for_selector("body[data-charts-ready='1']", timeout=60_000)
    seen: dict[int, float] = {}
    last = -1
    while proc.poll() is None or len(seen) < len(logged) - 1:
        value = page.get_attribute(".gx-chart[data-key='loss']", "data-last-step")
        now = time.time()
        if value:
            step = int(value)
            if last < 0:  # what the page showed when it opened: logged before, not a latency
                last = step
            elif step > last:
                for s in range(last + 1, step + 1):
                    seen.setdefault(s, now)
                last = step
        if proc.poll() is not None and last >= max(logged, default=0):
            break
        time.sleep(0.01)
    reader.join(5)
    context.close()
    lat = np.array([seen[s] - logged[s] for s in seen if s in logged])
    return {"n": int(lat.size), "p50_s": float(np.percentile(lat, 50)), "p95_s": float(np.percentile(lat, 95)),
            "max_s": float(lat.max())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="100,000 steps, fewer repetitions")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--metrics", type=int, default=20)
    ap.add_argument("--data-dir", type=Path, default=None, help="keep (and reuse) the big run here")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--no-server", action="store_true", help="skip the live measurement on gradexp server")
    args = ap.parse_args()
    steps = args.steps or (100_000 if args.quick else 1_000_000)
    reps = 2 if args.quick else 5
    from playwright.sync_api import sync_playwright

    from services import GradexpServer, clean_env

    results: dict[str, Any] = {"steps": steps, "metrics": args.metrics}
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data_dir or Path(tmp) / "runs"
        make_run(data, steps, args.metrics)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
            ui = UI(data)
            try:
                log(f"first charts, {args.metrics} x {steps:,} steps:")
                results["first_charts"] = first_charts(browser, ui, reps)
                log("live on gradexp ui:")
                live_dir = Path(tmp) / "live"
                ui_live = UI(live_dir)
                try:
                    results["live_ui"] = _live_ui(browser, ui_live, live_dir, 40 if args.quick else 120)
                finally:
                    ui_live.stop()
                log(f"  {results['live_ui']}")
            finally:
                ui.stop()
            if not args.no_server:
                log(f"first charts on gradexp server, {args.metrics} x {steps:,} steps:")
                results["first_charts_server"] = first_charts_server(browser, data, Path(tmp), reps)
                log("live on gradexp server:")
                srv = GradexpServer(Path(tmp) / "server").start()
                try:
                    srv.user_with_password("bench", "bench password 1")
                    key = srv.create_key("bench")

                    results["live_server"] = live(
                        browser, srv.url, "/bench/bench/live#charts", Path(tmp) / "srv-runs", "live",
                        steps=40 if args.quick else 120, every=0.25, sign_in=lambda page: _sign_in(page, srv.url),
                        trainer_env=clean_env(GRADEXP_HOST=srv.url, GRADEXP_API_KEY=key))
                    log(f"  {results['live_server']}")
                finally:
                    srv.stop()
            browser.close()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print(report(results))
    return 0


def first_charts_server(browser: Any, data: Path, work: Path, reps: int) -> dict[str, Any]:
    """The big run synced to a ``gradexp server`` (which keeps a finished run's history as one
    Parquet object), the server restarted, then the run page loaded as on ``gradexp ui``."""
    from services import GradexpServer, clean_env

    srv = GradexpServer(work / "server-big").start()
    try:
        srv.user_with_password("bench", "bench password 1")
        key = srv.create_key("bench")
        log("  syncing the run to the server ...")
        subprocess.run([sys.executable, "-m", "gradexp", "sync", str(data / "bench" / "big")], check=True,
                       env=clean_env(GRADEXP_HOST=srv.url, GRADEXP_API_KEY=key), capture_output=True)
        srv.stop()
        srv.start()  # cold: nothing of the run in the server's memory
        return _first_charts(browser, srv.url + "/bench/bench/big", reps, sign_in=lambda page: _sign_in(page, srv.url))
    finally:
        srv.stop()


def _sign_in(page: Any, url: str) -> None:
    page.goto(url + "/login?next=/")
    page.fill("#username", "bench")
    page.fill("#password", "bench password 1")
    page.click("button[type=submit]")
    page.wait_for_url(url + "/")


def _live_ui(browser: Any, ui: UI, live_dir: Path, steps: int) -> dict[str, Any]:
    return live(browser, ui.base, "/local/bench/live#charts", live_dir, "live", steps=steps, every=0.25,
                trainer_env=env(), sign_in=lambda page: page.goto(ui.url))


def report(r: dict[str, Any]) -> str:
    lines = [
        "### Explorer (headless Chromium)", "",
        f"Run page with {r['metrics']} metrics x {r['steps']:,} steps, navigation to the first screen's charts and "
        f"to all charts painted (target <= {TARGET_FIRST} s):", "",
        "| where | load | first screen s | all charts s |", "| --- | --- | ---: | ---: |",
    ]
    for name, key in (("`gradexp ui`", "first_charts"), ("`gradexp server`", "first_charts_server")):
        if key in r:
            fc = r[key]
            warm, first_warm = np.array(fc["warm_s"]), np.array(fc["first_warm_s"])
            lines += [f"| {name} | cold (first after start) | {fc['first_cold_s']:.2f} | {fc['cold_s']:.2f} |",
                      f"| {name} | warm, median of {warm.size} | {np.median(first_warm):.2f} | {np.median(warm):.2f} |",
                      f"| {name} | warm, worst | {first_warm.max():.2f} | {warm.max():.2f} |"]
    lines += [
        "", f"Live: a logged step to the open chart showing it (target p95 <= {TARGET_LIVE} s):", "",
        "| where | steps | p50 s | p95 s | max s |", "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, key in (("`gradexp ui`", "live_ui"), ("`gradexp server`", "live_server")):
        if key in r:
            x = r[key]
            lines.append(f"| {name} | {x['n']} | {x['p50_s']:.2f} | {x['p95_s']:.2f} | {x['max_s']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
