"""Explorer: the distribution view of a 1M-element float32 tensor over 2,000 steps (8 GB raw).

Writes the run (``--steps`` steps of 1M float32, N(0, 1e-3) from a pool of 8 arrays, each step
scaled differently so the per-step ranges differ), then measures:

* compute, cold: ``build_distribution`` (every step read, decoded, sorted; 64 bins) with the
  run's part files evicted from the page cache (``posix_fadvise(DONTNEED)``, no root needed),
  in this process, split over ``WORKERS`` threads (with ``--single`` also on one thread);
* the per-step parts of that time on 20 steps: read + decode, and the one sort;
* with ``--browser``: ``gradexp ui`` on the run folder and headless Chromium (Debian's, through
  Playwright): the run page opened on the tensor until the heatmap is drawn — cold (fresh
  server process, page cache evicted) and cached (the page loaded again: the server answers
  from its cache).

Targets (issue #11): first draw <= 30 s cold, <= 1 s cached. ``--steps 200`` for a quick run
(the cold figure then scales with the steps: the work is per step). The run is deleted
afterwards unless ``--keep``; ``--reuse RUN_DIR`` measures a kept run again. The CPU seconds
of the computation are reported beside its wall time: on a machine other processes load, they
tell what the same work takes on idle cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

ELEMENTS = 1_000_000
POOL = 8
KEY = "grad/fc1/weight"


def evict(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def write_run(root: Path, steps: int) -> Path:
    need = steps * ELEMENTS * 4 * 1.1
    free = shutil.disk_usage(root).free
    if free < need + 5e9:
        raise SystemExit(f"not enough free disk: {free / 1e9:.1f} GB free, need {need / 1e9:.1f} GB + 5 GB")
    import gradexp

    pool = C.pool_normal(POOL, ELEMENTS, 1e-3, np.float32)
    t = time.perf_counter()
    with gradexp.init("bench", dir=root, mode="offline") as run:
        for s in range(steps):
            run.log({KEY: pool[s % POOL] * np.float32(1 + (s % 97) / 50)}, step=s)
    C.log(f"wrote {steps} x 1M float32 in {time.perf_counter() - t:.1f} s")
    return Path(run.dir)


def compute(run_dir: Path, *, single: bool) -> dict[str, Any]:
    import gradexp
    from gradexp.explorer.distributions import WORKERS, build_distribution
    from gradexp.explorer.stats import step_histogram

    out: dict[str, Any] = {"workers": WORKERS}
    for workers in sorted({WORKERS, 1} if single else {WORKERS}, reverse=True):
        evict(run_dir)
        t, cpu = time.perf_counter(), time.process_time()
        dist = build_distribution(gradexp.Api().run(run_dir), KEY, bins=64, workers=workers)
        out[f"cold_s_{workers}"] = time.perf_counter() - t
        out[f"cpu_s_{workers}"] = time.process_time() - cpu  # all threads: what a loaded machine hides
        C.log(f"compute cold, {workers} thread(s): {out[f'cold_s_{workers}']:.2f} s, "
              f"{out[f'cpu_s_{workers}']:.1f} CPU s")
    out["steps"] = int(dist.steps.size)
    r = gradexp.Api().run(run_dir)
    sample = r.steps(KEY)[:: max(1, dist.steps.size // 20)][:20]
    evict(run_dir)
    read, sort = [], []
    for s in sample:  # as build_distribution does it: reused buffers, sorted in place
        t = time.perf_counter()
        _, a = next(r.tensors(KEY, [s], reuse=True))
        t1 = time.perf_counter()
        step_histogram(a, dist.edges, overwrite=True)
        read.append(t1 - t)
        sort.append(time.perf_counter() - t1)
    out["read_ms"] = statistics.median(read) * 1e3
    out["histogram_ms"] = statistics.median(sort) * 1e3
    return out


def browser(run_dir: Path) -> dict[str, Any]:
    """First draw of the distribution heatmap in headless Chromium, cold and cached."""
    import re
    import subprocess

    from playwright.sync_api import sync_playwright

    evict(run_dir)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRADEXP_")}
    proc = subprocess.Popen([sys.executable, "-m", "gradexp", "ui", "--dir", str(run_dir.parent.parent),
                             "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        url = None
        assert proc.stdout is not None
        for line in proc.stdout:
            m = re.search(r"(http://127\.0\.0\.1:\d+/\S*)", line)
            if m:
                url = m.group(1)
                break
        if url is None:
            raise RuntimeError("gradexp ui printed no URL")
        out: dict[str, Any] = {}
        with sync_playwright() as p:
            b = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True)
            page = b.new_page()
            page.goto(url)  # signs in with the one-time token
            base = url.split("?")[0].rstrip("/")
            target = f"{base}/local/bench/{run_dir.name}#tensors"
            for mode in ("cold", "cached"):
                page.goto("about:blank")  # a new document each time, not a same-page hash change
                t = time.perf_counter()
                page.goto(target)
                page.evaluate("k => document.dispatchEvent(new CustomEvent('gx:tensor', {detail: {key: k}}))", KEY)
                page.wait_for_selector("#panel-distribution canvas.gx-dist-heatmap[data-drawn]",
                                       timeout=600_000)
                out[f"{mode}_s"] = time.perf_counter() - t
                C.log(f"browser first draw, {mode}: {out[f'{mode}_s']:.2f} s")
            b.close()
        return out
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--dir", type=Path, help="where to write the run (default: a temporary folder)")
    ap.add_argument("--browser", action="store_true", help="also time the page in headless Chromium")
    ap.add_argument("--keep", action="store_true", help="keep the run folder")
    ap.add_argument("--reuse", type=Path, metavar="RUN_DIR", help="measure a run written before (with --keep)")
    ap.add_argument("--single", action="store_true", help="also time the computation on one thread")
    ap.add_argument("--json", type=Path, help="also write the results as JSON")
    args = ap.parse_args()
    import tempfile

    if args.reuse:
        run_dir = args.reuse.absolute()
        root = run_dir.parent.parent
        args.keep = True
        import gradexp

        args.steps = len(gradexp.Api().run(run_dir).steps(KEY))
    else:
        root = Path(args.dir or tempfile.mkdtemp(prefix="gxbench-dist-"))
        root.mkdir(parents=True, exist_ok=True)
        run_dir = write_run(root, args.steps)
    try:
        res: dict[str, Any] = {"steps": args.steps, "raw_gb": args.steps * ELEMENTS * 4 / 1e9,
                               "disk_gb": C.dir_bytes(run_dir / "parts") / 1e9, "cpus": os.cpu_count()}
        res.update(compute(run_dir, single=args.single))
        if args.browser:
            res["browser"] = browser(run_dir)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    w = res["workers"]
    lines = [f"### Explorer distribution view: 1M float32 x {res['steps']:,} steps "
             f"({res['raw_gb']:.1f} GB raw, {res['disk_gb']:.1f} GB on disk), {res['cpus']} CPUs", "",
             "| measure | time |", "| --- | --- |",
             f"| compute, page cache evicted, {w} threads | {C.fmt(res[f'cold_s_{w}'])} s "
             f"({C.fmt(res[f'cpu_s_{w}'])} CPU s) |"]
    if "cold_s_1" in res and w != 1:
        lines.append(f"| compute, page cache evicted, 1 thread | {C.fmt(res['cold_s_1'])} s "
                     f"({C.fmt(res['cpu_s_1'])} CPU s) |")
    lines += [f"| per step: read + decode (median of 20) | {C.fmt(res['read_ms'])} ms |",
              f"| per step: sort + histogram + quantiles (median of 20) | {C.fmt(res['histogram_ms'])} ms |"]
    if "browser" in res:
        b = res["browser"]
        lines += [f"| browser first draw, cold (new server, page cache evicted) | {C.fmt(b['cold_s'])} s |",
                  f"| browser first draw, cached (page reloaded) | {C.fmt(b['cached_s'])} s |"]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
