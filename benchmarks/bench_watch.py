"""Workload 8: the training-step cost of ``gradexp.watch(model, optimizer, log="all")``.

A small CNN on ``sklearn.datasets.load_digits`` (conv 1->32->64, linear 1024->128->10:
151,306 parameters in 8 tensors, 0.6 MB per kind), batch 64, SGD with momentum, one
torch thread. Each step is ``zero_grad``, forward, backward, ``step``, then
``run.log({"loss": ...})``; the step is timed around all of it. Three loops over the same
batches, each with its own model, optimizer and run, interleaved in rounds of
``ROUND`` steps so that load from the rest of the machine falls on all three alike:

* plain: the step alone;
* watch: the step with ``watch(model, opt, log="all")``: each step's gradients,
  parameters and updates (24 tensors, 1.8 MB) kept in that step's row;
* copy: the step plus what a user keeping the same tensors in host memory writes by
  hand: ``[p.grad.detach().clone() ...]`` and ``[p.detach().clone() ...]`` before the
  step, ``torch._foreach_sub(params, before)`` after it, all kept until the next step
  (the allocator reuses the memory the step before freed). No writer, no files.

After each round of a loop, its run is flushed (untimed), so the writer work one loop
left behind does not fall on the next loop's steps.

The caller's cost is the training thread's CPU time from the end of backward to the end
of ``log()`` (``time.thread_time_ns``), so the writer threads' work, which runs beside
training, is not counted in it; wall times of that tail and of the whole step are
reported too, as is the CPU each loop's other threads (its writer) used per step.

gradexp target: watch's caller cost over plain <= 1.2x copy's over plain (medians).

``--before PATH`` runs the worker on the code at PATH too (``git archive main | tar -x -C
/tmp/old``), alternating before and after ``--repeat`` times (default 4, 2 with
``--quick``), and reports every run and the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

TARGET_RATIO = 1.2
WARMUP = 20
ROUND = 25
BATCH = 64


def _rounds(args) -> int:
    return 4 if args.quick else 24


def w_gradexp(args, tmp):
    import torch
    from sklearn.datasets import load_digits
    from torch import nn

    import gradexp

    torch.set_num_threads(1)
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16
    y = torch.tensor(y, dtype=torch.long)
    batches = [(x[i:i + BATCH], y[i:i + BATCH]) for i in range(0, len(x) - BATCH + 1, BATCH)]

    def cnn() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1),
                             nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU(),
                             nn.Linear(128, 10))

    loops = {}
    for name in ("plain", "watch", "copy"):
        model = cnn()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        run = gradexp.init("bench", name=name, dir=tmp, mode="offline")
        if name == "watch":
            gradexp.watch(model, opt, log="all", run=run)
        loops[name] = (model, opt, run)
    params = {name: list(m.parameters()) for name, (m, _, _) in loops.items()}
    kept: list = []

    def step(name: str, i: int) -> tuple[int, int, int]:
        """Wall time of the whole step; wall and thread CPU time of its tail (from the end
        of backward to the end of log(): all that watch adds to the training thread)."""
        model, opt, run = loops[name]
        xb, yb = batches[i % len(batches)]
        t = time.perf_counter_ns()
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(xb), yb)
        loss.backward()
        tail, cpu = time.perf_counter_ns(), time.thread_time_ns()
        if name == "copy":
            ps = params[name]
            grads = [p.grad.detach().clone() for p in ps]
            before = [p.detach().clone() for p in ps]
            opt.step()
            with torch.no_grad():
                kept[:] = [grads, before, torch._foreach_sub(ps, before)]
        else:
            opt.step()
        run.log({"loss": loss.item()})
        end, cpu_end = time.perf_counter_ns(), time.thread_time_ns()
        return end - t, end - tail, cpu_end - cpu

    for name in loops:
        for i in range(WARMUP):
            step(name, i)
    ns: dict[str, list[tuple[int, int, int]]] = {name: [] for name in loops}
    other_ns = dict.fromkeys(loops, 0)  # CPU of the other threads (the writers) in each loop's rounds
    for _, _, run in loops.values():
        run.flush()
    for r in range(_rounds(args)):
        for name in loops:
            cpu0, thread0 = time.process_time_ns(), time.thread_time_ns()
            for i in range(ROUND):
                ns[name].append(step(name, WARMUP + r * ROUND + i))
            loops[name][2].flush()  # this loop's writer work is done before the next loop starts
            other_ns[name] += (time.process_time_ns() - cpu0) - (time.thread_time_ns() - thread0)
    t = time.perf_counter()
    for _, _, run in loops.values():
        run.finish()
    out: dict[str, Any] = {}
    for name, v in ns.items():
        a = np.array(v)
        out[name] = {"step": C.lat_stats(a[:, 0]), "tail": C.lat_stats(a[:, 1]), "tail_cpu": C.lat_stats(a[:, 2]),
                     "other_threads_cpu_us": other_ns[name] / 1e3 / len(v)}
    n_params = sum(p.numel() for p in params["plain"])
    out.update(finish_s=time.perf_counter() - t, tensors=3 * len(params["plain"]),
               mb_per_step=3 * 4 * n_params / C.MB, torch=torch.__version__)
    return out


SYSTEMS = [C.System("gradexp", "torch", w_gradexp)]


def costs(g: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """Per timing (tail thread CPU, tail wall, whole step wall): the p50 of watch and of
    copy, each over plain's, in µs."""
    def extra(name: str, what: str) -> float:
        return g[name][what]["p50_us"] - g["plain"][what]["p50_us"]

    return {what: (extra("watch", what), extra("copy", what)) for what in ("tail_cpu", "tail", "step")}


def ratio(g: dict[str, Any]) -> float:
    w, c = costs(g)["tail_cpu"]
    return w / c if c > 0 else float("nan")


def report(res: dict, quick: bool) -> str:
    g = res.get("gradexp", {})
    lines = ["### 8. `watch(model, optimizer, log=\"all\")`: digits CNN step time", ""]
    if not C.ok(g):
        return "\n".join(lines + [f"not run: {C.status(g)}"])
    labels = {"plain": "step + `log(loss)`",
              "watch": f"same, `watch(log=\"all\")`: {g['tensors']} tensors, {C.fmt(g['mb_per_step'])} MB kept",
              "copy": "same, `clone()` of grads + params, `_foreach_sub` after (the copy floor)"}
    rows = []
    for name in ("plain", "watch", "copy"):
        r = g[name]
        rows.append([labels[name], C.fmt(r["step"]["p50_us"]), C.fmt(r["step"]["p99_us"]),
                     C.fmt(r["tail"]["p50_us"]), C.fmt(r["tail_cpu"]["p50_us"]), C.fmt(r["other_threads_cpu_us"])])
    lines.append(C.table(["loop", "step p50 µs", "step p99 µs", "tail p50 µs (wall)",
                          "tail p50 µs (thread CPU)", "other threads' CPU µs/step"], rows))
    cost = costs(g)
    w, c = cost["tail_cpu"]
    r = ratio(g)
    lines += ["", f"{g['plain']['step']['n']:,} timed steps per loop, interleaved (torch {g['torch']}, "
                  "1 thread). The tail runs from the end of backward to the end of `log()`. "
                  f"gradexp target: watch's caller cost <= {TARGET_RATIO:g}x the copy's (tail thread "
                  f"CPU over plain): **{C.verdict(r <= TARGET_RATIO)}** ({r:.2f}x; {C.fmt(w)} µs "
                  f"against {C.fmt(c)} µs per step). Over plain, in wall time: tail {C.fmt(cost['tail'][0])} "
                  f"µs against {C.fmt(cost['tail'][1])} µs, whole step {C.fmt(cost['step'][0])} µs against "
                  f"{C.fmt(cost['step'][1])} µs: the writer's summaries, encoding and compression run on "
                  "other threads (the last column), and on a busy machine they compete with training."]
    return "\n".join(lines)


def report_ab(rounds: list[dict[str, dict[str, Any]]]) -> str:
    """Every before/after pair of worker runs, then the medians."""
    lines = ["### 8. `watch(log=\"all\")`: before and after, alternating runs", ""]
    rows = []
    per: dict[str, dict[str, list[float]]] = {}
    for i, pair in enumerate(rounds, 1):
        for name in ("before", "after"):
            g = pair.get(name, {})
            if not C.ok(g):
                rows.append([str(i), name, C.status(g), "", "", "", "", ""])
                continue
            cost = costs(g)
            vals = {"plain": g["plain"]["tail_cpu"]["p50_us"], "watch": cost["tail_cpu"][0],
                    "copy": cost["tail_cpu"][1], "ratio": ratio(g), "step": cost["step"][0],
                    "writer": g["watch"]["other_threads_cpu_us"]}
            for k, v in vals.items():
                per.setdefault(name, {}).setdefault(k, []).append(v)
            rows.append([str(i), name] + [C.fmt(vals[k]) if k != "ratio" else f"{vals[k]:.2f}x"
                                          for k in ("plain", "watch", "copy", "ratio", "step", "writer")])
    for name, vals in per.items():
        rows.append(["median", name] + [C.fmt(statistics.median(vals[k])) if k != "ratio"
                                        else f"{statistics.median(vals[k]):.2f}x"
                                        for k in ("plain", "watch", "copy", "ratio", "step", "writer")])
    lines.append(C.table(["run", "code", "plain tail CPU p50 µs", "watch over plain µs", "copy over plain µs",
                          "watch / copy", "watch step wall over plain µs", "watch writer CPU µs/step"], rows))
    return "\n".join(lines)


def runs(quick: bool):
    return [("gradexp", "gradexp", None, 900.0)]


def main_ab(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description="Workload 8, before and after")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--before", type=Path, required=True, help="the code to compare with (a source tree)")
    ap.add_argument("--repeat", type=int, default=None)
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    repeat = args.repeat or (2 if args.quick else 4)
    system = SYSTEMS[0]
    code = {"before": str(args.before.resolve()), "after": str(Path(__file__).resolve().parent.parent)}
    old = os.environ.get("PYTHONPATH")
    t0 = time.perf_counter()
    rounds: list[dict[str, dict[str, Any]]] = []
    try:
        for i in range(repeat):
            pair = {}
            for name in ("before", "after") if i % 2 == 0 else ("after", "before"):
                C.log(f"run {i + 1}/{repeat}: {name}")
                os.environ["PYTHONPATH"] = code[name]  # the worker imports gradexp from there
                pair[name] = C.run_worker(__file__, system, quick=args.quick, timeout=900.0)
            rounds.append(pair)
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old
    if args.json:
        Path(args.json).write_text(json.dumps(rounds, indent=2))
    print(report_ab(rounds))
    print(f"\n_bench_watch.py --before{' --quick' if args.quick else ''}: {time.perf_counter() - t0:.0f} s wall._")


if __name__ == "__main__":
    if "--before" in sys.argv and "--worker" not in sys.argv:
        main_ab(sys.argv[1:])
    else:
        C.main(__file__, "Workload 8: watch(log='all') step time", SYSTEMS, report, runs)
