"""What recording the console, system metrics and the code's provenance costs the trainer.

Each sample is a fresh interpreter (``python -c``) that times ``import gradexp`` +
``init()``, then 200 untimed and 20,000 timed ``run.log()`` calls of 10 scalars (each
call timed with ``perf_counter_ns``, dicts built first, as in bench_log_scalars), a
``print()`` every 100 steps (a training loop's progress line), then ``finish()``.
Five configurations, alternated so drift on a shared machine hits all alike:

- ``on``: the defaults (console captured, code collected, system metrics) with
  ``system_interval=0.5`` (20x the default rate, so sampling happens during the loop);
- ``off``: ``console=False, code=False, system_metrics=False`` (no sender process offline);
- ``console``, ``code``, ``system``: one of the three on (system metrics at the same
  rate), the other two off: what each costs alone (each needs the sender process).

Reported per configuration: median over the samples of init() time, log() p50 and p99,
and finish() time, and every sample's figures.  ``--quick``: 3 samples each (default 7).

``--pause S`` waits S seconds between the loop and ``finish()``: the loop above lasts well
under a second, shorter than the sender process's start-up, whose end such a run's
``finish()`` waits for; a run of a few seconds shows what ``finish()`` costs once it has
started. ``--repo DIR`` (repeatable) times the given source trees instead of this one, one
sample of each tree and configuration in turn (before and after a change, in one loop, so
drift on a shared machine hits both alike).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys, time
t0 = time.perf_counter()
import gradexp
import numpy as np
SETTINGS = json.loads(sys.argv[1])
rng = np.random.default_rng(0)
dicts = [{f"metric_{j}": v for j, v in enumerate(row)} for row in rng.random((20200, 10)).tolist()]
t1 = time.perf_counter()
run = gradexp.init("bench", dir=sys.argv[2], mode="offline", **SETTINGS)
t2 = time.perf_counter()
log = run.log
for d in dicts[:200]:
    log(d)
pc = time.perf_counter_ns
ns = np.empty(20000, dtype=np.int64)
for i, d in enumerate(dicts[200:]):
    if i % 100 == 0:
        print(f"step {i}", flush=True)
    t = pc()
    log(d)
    ns[i] = pc() - t
time.sleep(float(sys.argv[3]))
t3 = time.perf_counter()
run.finish()
t4 = time.perf_counter()
sys.stderr.write("@@" + json.dumps({"init_s": t2 - t1, "p50_us": float(np.percentile(ns, 50)) / 1e3,
                                    "p99_us": float(np.percentile(ns, 99)) / 1e3, "finish_s": t4 - t3}) + "\\n")
"""

CONFIGS = {
    "on": {"system_interval": 0.5},
    "off": {"console": False, "code": False, "system_metrics": False},
    "console": {"code": False, "system_metrics": False},
    "code": {"console": False, "system_metrics": False},
    "system": {"console": False, "code": False, "system_interval": 0.5},
}


def sample(name: str, base: Path, *, repo: Path = REPO, pause: float = 0.0) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(repo), os.environ.get("PYTHONPATH")) if p)}
    p = subprocess.run([sys.executable, "-c", CHILD, json.dumps(CONFIGS[name]), str(base), str(pause)],
                       capture_output=True, text=True, timeout=600, env=env, cwd=base)
    line = [x for x in p.stderr.splitlines() if x.startswith("@@")]
    if p.returncode != 0 or not line:
        raise RuntimeError(f"{name}: {p.stderr[-500:]}")
    return json.loads(line[-1][2:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--pause", type=float, default=0.0, metavar="S", help="seconds between the loop and finish()")
    ap.add_argument("--repo", type=Path, action="append", metavar="DIR",
                    help="a source tree to time (repeatable; default: this checkout)")
    ap.add_argument("--configs", default=",".join(CONFIGS), metavar="A,B",
                    help=f"which configurations, comma-separated (default: {','.join(CONFIGS)})")
    args = ap.parse_args()
    configs = args.configs.split(",")
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown:
        ap.error(f"unknown configuration {unknown[0]!r}; known: {', '.join(CONFIGS)}")
    n = 3 if args.quick else 7
    repos: list[Path] = args.repo or [REPO]
    got: dict[str, list[dict[str, float]]] = {f"{r}:{c}" if len(repos) > 1 else c: [] for r in repos for c in configs}
    with tempfile.TemporaryDirectory() as tmp:
        for repo in repos:
            sample("on", Path(tmp), repo=repo)  # warm-up: page cache, byte-code
        for _ in range(n):
            for repo in repos:
                for name in configs:
                    key = f"{repo}:{name}" if len(repos) > 1 else name
                    got[key].append(sample(name, Path(tmp), repo=repo, pause=args.pause))
    out: dict[str, Any] = {name: {k: statistics.median(s[k] for s in samples) for k in samples[0]}
                           for name, samples in got.items()}
    for name, samples in got.items():
        out[name]["all"] = {k: [round(s[k], 6) for s in samples] for k in samples[0]}
    out["samples"] = n
    out["pause_s"] = args.pause
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
