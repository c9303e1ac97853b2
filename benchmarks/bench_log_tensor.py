"""Workload 2: log() of a 1,000,000-element float32 tensor, 200 steps; caller-side latency.

The reference is ``arr.copy()`` of the same array in the same process (result dropped,
so its memory is reused, as NumPy users see it). Three phases per system, 200 calls each:

* first burst: back to back, right after init() and 10 warm-up calls (whose buffers
  it reuses first). Most memory the snapshots need is new to the process here, and
  touching fresh pages is slow on the reference machine, so this is the cold-start
  cost, reported but not the target;
* burst: back to back again, after a flush (steady state: the writer competes for the
  CPU, and once it falls behind, ``log()`` waits on the bounded queue). With the
  default 512 MiB queue, 134 of the 200 calls (plus what the writer finishes meanwhile)
  fit before the first wait, so the median is a call that did not wait; a longer burst
  is bound by ingest (workload 3);
* paced: each call after ``time.sleep(0.01)``, like a training step that leaves the CPU
  to background threads. A copy timed in a tight loop runs with hot caches; after a
  pause it does not, so this phase also times ``arr.copy()`` of another pool array after
  the same pause (between the calls, which are thus 20 ms apart) and compares like
  with like.

A floor runs the same phases in a process of its own: ``kept.append(arr.copy())``, the
least any logger that keeps the tensor must do (all copies are let go at each flush), so
it pays the same fresh-memory cost in its first burst that gradexp's snapshots do.

The arrays come from a pool of 4 distinct N(0, 1e-3) arrays generated up front.
gradexp keeps every tensor bit-exact; the peers keep only a histogram:
``wandb.log({"g": wandb.Histogram(arr)})``, tensorboardX ``add_histogram``. MLflow
has no tensor type: its row is ``np.save`` to a new .npy file + ``log_artifact``.

gradexp target: p50 <= 2x the copy (burst: the tight-loop copy; paced: the paced copy).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

TARGET_RATIO = 2.0
ELEMENTS = 1_000_000
WARMUP = 10
PACE_S = 0.01
PHASES = (("first", "first burst: back to back, right after init (memory new to the process)"),
          ("b2b", "burst: back to back, after a first burst and a flush (steady state)"),
          ("paced", f"paced: `time.sleep({PACE_S})` before each call"))


def _n(args) -> int:
    return 40 if args.quick else 200


def _pool():
    return C.pool_normal(4, ELEMENTS, 1e-3, np.float32)


def _copy_ref(pool, n) -> dict:
    pc = time.perf_counter_ns
    ns = np.empty(n, dtype=np.int64)
    for i in range(n):
        a = pool[i % len(pool)]
        t = pc()
        a.copy()
        ns[i] = pc() - t
    return C.lat_stats(ns)


def _phases(log, pool, n, flush=None) -> dict:
    pc = time.perf_counter_ns
    for i in range(WARMUP):
        log(pool[i % len(pool)], i)
    if flush:
        flush()
    out = {}
    step = WARMUP
    for phase, _ in PHASES:
        ns = np.empty(n, dtype=np.int64)
        copies = np.empty(n, dtype=np.int64)
        for i in range(n):
            a = pool[i % len(pool)]
            if phase == "paced":  # a paused copy of another array, then a paused call
                time.sleep(PACE_S)
                c = pool[(i + 2) % len(pool)]
                t = pc()
                c.copy()
                copies[i] = pc() - t
                time.sleep(PACE_S)
            t = pc()
            log(a, step)
            ns[i] = pc() - t
            step += 1
        out[phase] = C.lat_stats(ns)
        if phase == "paced":
            out["copy_paced"] = C.lat_stats(copies)
        if flush:
            flush()
    return out


def _finish(out, t_init, fin, tmp):
    t = time.perf_counter()
    fin()
    out.update(init_s=t_init, finish_s=time.perf_counter() - t, disk_bytes=C.dir_bytes(tmp),
               peak_rss_mb=C.peak_rss_mb())
    return out


def w_gradexp(args, tmp):
    pool, n = _pool(), _n(args)
    import gradexp

    copy = _copy_ref(pool, n)
    t = time.perf_counter()
    run = gradexp.init("bench", dir=tmp, mode="offline")
    t_init = time.perf_counter() - t
    out = _phases(lambda a, s: run.log({"g": a}), pool, n, flush=run.flush)
    out["copy"] = copy
    out["copy_after"] = _copy_ref(pool, n)
    return _finish(out, t_init, gradexp.finish, tmp)


def w_kept_copy(args, tmp):
    """Floor: a "logger" that only keeps a copy per call and lets go of them all at flush
    (no writer, no queue). What a snapshot costs at the least, memory effects included."""
    pool, n = _pool(), _n(args)
    copy = _copy_ref(pool, n)
    kept: list[np.ndarray] = []
    out = _phases(lambda a, s: kept.append(a.copy()), pool, n, flush=kept.clear)
    out["copy"] = copy
    return _finish(out, 0.0, kept.clear, tmp)


def w_wandb(args, tmp):
    pool, n = _pool(), _n(args)
    import wandb

    copy = _copy_ref(pool, n)
    t = time.perf_counter()
    run = wandb.init(project="bench", dir=str(tmp), mode="offline")
    t_init = time.perf_counter() - t
    out = _phases(lambda a, s: wandb.log({"g": wandb.Histogram(a)}), pool, n)
    out["copy"] = copy
    return _finish(out, t_init, run.finish, tmp)


def w_tensorboardx(args, tmp):
    pool, n = _pool(), _n(args)
    from tensorboardX import SummaryWriter

    copy = _copy_ref(pool, n)
    t = time.perf_counter()
    w = SummaryWriter(logdir=str(tmp / "tb"))
    t_init = time.perf_counter() - t
    out = _phases(lambda a, s: w.add_histogram("g", a, s), pool, n)
    out["copy"] = copy
    return _finish(out, t_init, w.close, tmp)


def w_mlflow(args, tmp):
    pool, n = _pool(), _n(args)
    import mlflow

    copy = _copy_ref(pool, n)
    t = time.perf_counter()
    mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
    exp = mlflow.create_experiment("bench", artifact_location=(tmp / "artifacts").as_uri())
    mlflow.start_run(experiment_id=exp)
    t_init = time.perf_counter() - t
    stage = tmp / "stage"
    stage.mkdir()

    def log(a, s):
        p = stage / f"g_{s:06d}.npy"
        np.save(p, a)
        mlflow.log_artifact(str(p), artifact_path="g")

    out = _phases(log, pool, n)
    out["copy"] = copy
    return _finish(out, t_init, mlflow.end_run, tmp)


SYSTEMS = [
    C.System("gradexp", "gradexp", w_gradexp),
    C.System("kept-copy", "numpy", w_kept_copy),
    C.System("wandb", "wandb", w_wandb),
    C.System("tensorboardX", "tensorboardX", w_tensorboardx),
    C.System("mlflow", "mlflow", w_mlflow),
]

LABELS = {
    "gradexp": "gradexp `log({'g': arr})` (keeps the tensor)",
    "kept-copy": "floor: `kept.append(arr.copy())`, all let go at each flush",
    "wandb": "wandb `log({'g': Histogram(arr)})` (histogram only)",
    "tensorboardX": "tensorboardX `add_histogram` (histogram only)",
    "mlflow": "MLflow `np.save` + `log_artifact` (.npy file)",
}


def _ref(r: dict, phase: str) -> dict:
    """The copy a phase is compared with: the paused copy when paced, else the tight loop."""
    return r["copy_paced"] if phase == "paced" else r["copy"]


def report(res: dict, quick: bool) -> str:
    g = res.get("gradexp", {})
    n = _n(type("A", (), {"quick": quick}))
    lines = [f"### 2. `log()` of a 1,000,000-element float32 tensor ({n} timed steps per phase)", ""]
    for phase, title in PHASES:
        rows = []
        for name in ("gradexp", "kept-copy", "wandb", "tensorboardX", "mlflow"):
            r = res.get(name)
            if not C.ok(r):
                rows.append([LABELS[name], C.status(r), "", "", "", "", ""])
                continue
            p, ref = r[phase], _ref(r, phase)
            gp = g[phase] if C.ok(g) else {}
            rows.append([LABELS[name], C.fmt(p["p50_us"] / 1e3), C.fmt(p["p99_us"] / 1e3),
                         C.fmt(ref["p50_us"] / 1e3), C.ratio(p["p50_us"], ref["p50_us"]),
                         "1.00x" if name == "gradexp" else C.ratio(p["p50_us"], gp.get("p50_us")),
                         "1.00x" if name == "gradexp" else C.ratio(p["p99_us"], gp.get("p99_us"))])
        copy_col = ("`arr.copy()` p50 ms (same process, after the same pause)" if phase == "paced"
                    else "`arr.copy()` p50 ms (same process, tight loop)")
        lines += [f"**{title}**", "",
                  C.table(["system", "p50 ms", "p99 ms", copy_col, "p50 / copy",
                           "p50 peer/gradexp", "p99 peer/gradexp"], rows), ""]
    if C.ok(g):
        cp = g["copy"]
        ratio = {ph: g[ph]["p50_us"] / _ref(g, ph)["p50_us"] for ph, _ in PHASES}
        lines += [
            f"gradexp: tight-loop copy p50 {C.fmt(cp['p50_us'])} µs before the run, "
            f"{C.fmt(g['copy_after']['p50_us'])} µs after it; copy after a {PACE_S * 1e3:g} ms "
            f"pause {C.fmt(g['copy_paced']['p50_us'])} µs; paced `log()` against the tight-loop "
            f"copy {g['paced']['p50_us'] / cp['p50_us']:.2f}x; finish() {C.fmt(g['finish_s'])} s; "
            f"peak RSS {C.fmt(g['peak_rss_mb'])} MB.", "",
            f"gradexp target p50 <= {TARGET_RATIO:g}x copy: burst "
            f"**{C.verdict(ratio['b2b'] <= TARGET_RATIO)}** ({ratio['b2b']:.2f}x), paced "
            f"**{C.verdict(ratio['paced'] <= TARGET_RATIO)}** ({ratio['paced']:.2f}x). "
            f"The first burst, which pays for memory new to the process, took {ratio['first']:.2f}x."]
        f = res.get("kept-copy")
        if C.ok(f):
            lines += ["", "gradexp p50 against the floor (a kept copy, its own process): " + ", ".join(
                f"{t.split(':')[0]} {g[ph]['p50_us'] / f[ph]['p50_us']:.2f}x" for ph, t in PHASES) + "."]
    return "\n".join(lines)


def runs(quick: bool):
    return [(s.name, s.name, None, 300.0) for s in SYSTEMS]


if __name__ == "__main__":
    C.main(__file__, "Workload 2: log() of a 1M-element float32 tensor", SYSTEMS, report, runs)
