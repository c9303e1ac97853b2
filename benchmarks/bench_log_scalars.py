"""Workload 1: log() of 10 scalars per step, 5,000 steps; caller-side latency per call.

Each call is timed with ``time.perf_counter_ns`` around it, in the training thread,
after 200 untimed warm-up calls; the dicts are built before the timed loop. GC stays
on (as in training). Peers: ``wandb.log(dict)`` (offline), tensorboardX 10x
``add_scalar`` (one "call" = the 10 add_scalar calls of a step), MLflow
``log_metrics`` on a sqlite backend, synchronous and (separately) asynchronous.

gradexp target: p50 <= 4 us, p99 <= 20 us.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

TARGET_P50_US = 4.0
TARGET_P99_US = 20.0
WARMUP = 200


def _steps(args) -> int:
    return 500 if args.quick else 5000


def _dicts(n: int) -> list[dict[str, float]]:
    rng = np.random.default_rng(0)
    vals = rng.random((n, 10)).tolist()
    return [{f"metric_{j}": row[j] for j in range(10)} for row in vals]


def _noop(d, step=None):
    return None


def _floor(dicts) -> dict:
    """The same timed loop around a no-op Python call: the timer's own overhead."""
    pc = time.perf_counter_ns
    ns = np.empty(len(dicts), dtype=np.int64)
    for i, d in enumerate(dicts):
        t = pc()
        _noop(d)
        ns[i] = pc() - t
    return C.lat_stats(ns)


def _timed(fn, dicts) -> np.ndarray:
    pc = time.perf_counter_ns
    ns = np.empty(len(dicts), dtype=np.int64)
    for i, d in enumerate(dicts):
        t = pc()
        fn(d, i + WARMUP)
        ns[i] = pc() - t
    return ns


def _result(ns, t_init, t_finish, path: Path) -> dict:
    out = C.lat_stats(ns)
    out.update(init_s=t_init, finish_s=t_finish, disk_bytes=C.dir_bytes(path),
               peak_rss_mb=C.peak_rss_mb())
    return out


def w_gradexp(args, tmp):
    n = _steps(args)
    dicts = _dicts(n + WARMUP)
    floor = _floor(dicts[WARMUP:])
    import gradexp

    t = time.perf_counter()
    run = gradexp.init("bench", dir=tmp, mode="offline")
    t_init = time.perf_counter() - t
    log = gradexp.log
    for d in dicts[:WARMUP]:
        log(d)
    ns = _timed(lambda d, s: log(d), dicts[WARMUP:])
    # run.log (no module-level lookup of the current run) for comparison
    ns_run = _timed(lambda d, s: run.log(d), dicts[WARMUP:])
    t = time.perf_counter()
    gradexp.finish()
    out = _result(ns, t_init, time.perf_counter() - t, tmp)
    out["run_log"] = C.lat_stats(ns_run)
    out["floor"] = floor
    return out


def w_wandb(args, tmp):
    n = _steps(args)
    dicts = _dicts(n + WARMUP)
    import wandb

    t = time.perf_counter()
    run = wandb.init(project="bench", dir=str(tmp), mode="offline")
    t_init = time.perf_counter() - t
    for d in dicts[:WARMUP]:
        wandb.log(d)
    ns = _timed(lambda d, s: wandb.log(d), dicts[WARMUP:])
    t = time.perf_counter()
    run.finish()
    return _result(ns, t_init, time.perf_counter() - t, tmp)


def w_tensorboardx(args, tmp):
    n = _steps(args)
    dicts = _dicts(n + WARMUP)
    from tensorboardX import SummaryWriter

    t = time.perf_counter()
    w = SummaryWriter(logdir=str(tmp / "tb"))
    t_init = time.perf_counter() - t

    def log(d, step):
        for k, v in d.items():
            w.add_scalar(k, v, step)

    for i, d in enumerate(dicts[:WARMUP]):
        log(d, i)
    ns = _timed(log, dicts[WARMUP:])
    t = time.perf_counter()
    w.close()
    return _result(ns, t_init, time.perf_counter() - t, tmp)


def _mlflow_start(tmp):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
    exp = mlflow.create_experiment("bench", artifact_location=(tmp / "artifacts").as_uri())
    return mlflow, mlflow.start_run(experiment_id=exp)


def w_mlflow(args, tmp, synchronous=True):
    n = _steps(args)
    dicts = _dicts(n + WARMUP)
    t = time.perf_counter()
    mlflow, _ = _mlflow_start(tmp)
    t_init = time.perf_counter() - t
    for i, d in enumerate(dicts[:WARMUP]):
        mlflow.log_metrics(d, step=i, synchronous=synchronous)
    ns = _timed(lambda d, s: mlflow.log_metrics(d, step=s, synchronous=synchronous), dicts[WARMUP:])
    t = time.perf_counter()
    mlflow.end_run()
    return _result(ns, t_init, time.perf_counter() - t, tmp)


def w_mlflow_async(args, tmp):
    return w_mlflow(args, tmp, synchronous=False)


SYSTEMS = [
    C.System("gradexp", "gradexp", w_gradexp),
    C.System("wandb", "wandb", w_wandb),
    C.System("tensorboardX", "tensorboardX", w_tensorboardx),
    C.System("mlflow", "mlflow", w_mlflow),
    C.System("mlflow-async", "mlflow", w_mlflow_async),
]

LABELS = {
    "gradexp": "gradexp `log(dict)`",
    "wandb": "wandb offline `log(dict)`",
    "tensorboardX": "tensorboardX 10x `add_scalar`",
    "mlflow": "MLflow sqlite `log_metrics` (sync)",
    "mlflow-async": "MLflow sqlite `log_metrics(synchronous=False)`",
}


def report(res: dict, quick: bool) -> str:
    g = res.get("gradexp", {})
    n = g.get("n", 500 if quick else 5000)
    lines = [f"### 1. `log()` of 10 scalars per step ({n:,} timed steps after {WARMUP} warm-up)", ""]
    rows = []
    for name in ("gradexp", "wandb", "tensorboardX", "mlflow", "mlflow-async"):
        r = res.get(name)
        if not C.ok(r):
            rows.append([LABELS[name], C.status(r), "", "", "", "", "", ""])
            continue
        rows.append([LABELS[name], C.fmt(r["p50_us"]), C.fmt(r["p99_us"]), C.fmt(r["mean_us"]),
                     "1.00x" if name == "gradexp" else C.ratio(r["p50_us"], g.get("p50_us")),
                     "1.00x" if name == "gradexp" else C.ratio(r["p99_us"], g.get("p99_us")),
                     C.fmt(r["init_s"]), C.fmt(r["finish_s"])])
    lines.append(C.table(["system", "p50 µs", "p99 µs", "mean µs", "p50 peer/gradexp",
                          "p99 peer/gradexp", "init s", "finish s"], rows))
    if C.ok(g):
        fl, rl = g["floor"], g["run_log"]
        lines += ["", f"Timer floor (same loop around a no-op call): p50 {C.fmt(fl['p50_us'])} µs, "
                      f"p99 {C.fmt(fl['p99_us'])} µs. gradexp `run.log(dict)` (no current-run lookup): "
                      f"p50 {C.fmt(rl['p50_us'])} µs, p99 {C.fmt(rl['p99_us'])} µs.",
                  "",
                  f"gradexp target p50 <= {TARGET_P50_US:g} µs: "
                  f"**{C.verdict(g['p50_us'] <= TARGET_P50_US)}** ({C.fmt(g['p50_us'])} µs); "
                  f"p99 <= {TARGET_P99_US:g} µs: **{C.verdict(g['p99_us'] <= TARGET_P99_US)}** "
                  f"({C.fmt(g['p99_us'])} µs)."]
    return "\n".join(lines)


def runs(quick: bool):
    return [(s.name, s.name, None, 300.0) for s in SYSTEMS]


if __name__ == "__main__":
    C.main(__file__, "Workload 1: log() of 10 scalars", SYSTEMS, report, runs)
