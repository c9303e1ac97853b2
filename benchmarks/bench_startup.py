"""Workload 4: import + init() wall time, finish() time, bytes on disk, peak RSS.

Import + init is timed in pristine interpreters (``python -c``, nothing imported
before the clock starts, NumPy included in the import time): one untimed warm-up
(warms the page cache and creates MLflow's sqlite schema), then the median of 5
(2 with ``--quick``), all in the same base folder. "import numpy" alone is the floor.

Then, in the worker's own fresh process, a comparable small training run:
1,000 steps of 10 scalars, plus a 1M-element float32 tensor every 50 steps (20 in
all; gradexp keeps them bit-exact, wandb and tensorboardX keep a histogram, MLflow an
``.npy`` artifact). Reported: finish() time, bytes on disk, peak RSS of the process
(``ru_maxrss``) and the RSS of helper processes it started (wandb's service), taken
just before finish().

gradexp target: import + init <= 0.2 s including NumPy.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

TARGET_S = 0.2
STEPS = 1000
TENSOR_EVERY = 50

SNIPPETS = {
    "numpy": """
import time; t0 = time.perf_counter()
import numpy
t1 = time.perf_counter()
""",
    "gradexp": """
import time; t0 = time.perf_counter()
import gradexp
t1 = time.perf_counter()
run = gradexp.init("bench", dir=BASE, mode="offline")
t2 = time.perf_counter()
gradexp.finish()
""",
    "wandb": """
import time; t0 = time.perf_counter()
import wandb
t1 = time.perf_counter()
run = wandb.init(project="bench", dir=BASE, mode="offline")
t2 = time.perf_counter()
run.finish()
""",
    "tensorboardX": """
import time; t0 = time.perf_counter()
from tensorboardX import SummaryWriter
t1 = time.perf_counter()
w = SummaryWriter(logdir=BASE + "/tb-" + str(time.time_ns()))
t2 = time.perf_counter()
w.close()
""",
    "mlflow": """
import time; t0 = time.perf_counter()
import mlflow
t1 = time.perf_counter()
mlflow.set_tracking_uri("sqlite:///" + BASE + "/mlflow.db")
mlflow.start_run()
t2 = time.perf_counter()
mlflow.end_run()
""",
}


def _import_init(system: str, base: Path, repeats: int) -> dict:
    code = f"BASE = {str(base)!r}\n" + SNIPPETS[system] + """
import json, sys
t2 = globals().get("t2", t1)
sys.stderr.write("@@" + json.dumps({"import_s": t1 - t0, "init_s": t2 - t1}) + "\\n")
"""
    env = {k: v for k, v in __import__("os").environ.items()}
    samples = []
    for i in range(repeats + 1):
        p = subprocess.run([sys.executable, "-c", code], cwd=base, env=env, capture_output=True,
                           text=True, timeout=120)
        line = [x for x in p.stderr.splitlines() if x.startswith("@@")]
        if p.returncode != 0 or not line:
            raise RuntimeError(f"{system} import/init failed: {p.stderr.strip()[-300:]}")
        if i:  # the first is a warm-up
            samples.append(json.loads(line[-1][2:]))
    imp = [s["import_s"] for s in samples]
    ini = [s["init_s"] for s in samples]
    tot = [a + b for a, b in zip(imp, ini)]
    return {"import_s": statistics.median(imp), "init_s": statistics.median(ini),
            "total_s": statistics.median(tot), "total_min_s": min(tot), "total_max_s": max(tot),
            "repeats": repeats}


def _workload(log_scalars, log_tensor):
    rng = np.random.default_rng(0)
    vals = rng.random((STEPS, 10)).tolist()
    pool = C.pool_normal(4, 1_000_000, 1e-3, np.float32)
    t0 = time.perf_counter()
    for s in range(STEPS):
        d = {f"metric_{j}": vals[s][j] for j in range(10)}
        if s % TENSOR_EVERY == 0:
            log_tensor(d, pool[(s // TENSOR_EVERY) % len(pool)], s)
        else:
            log_scalars(d, s)
    return time.perf_counter() - t0


def _done(out, t_loop, fin, folder: Path):
    out["loop_s"] = t_loop
    out["helper_rss_mb"] = C.helper_rss_mb()
    t = time.perf_counter()
    fin()
    out["finish_s"] = time.perf_counter() - t
    out["disk_bytes"] = C.dir_bytes(folder)
    out["peak_rss_mb"] = C.peak_rss_mb()
    return out


def _reps(args) -> int:
    return 2 if args.quick else 5


def w_numpy(args, tmp):
    return _import_init("numpy", tmp, _reps(args))


def w_gradexp(args, tmp):
    out = _import_init("gradexp", tmp / "ii", _mk(tmp / "ii", _reps(args)))
    import gradexp

    run = gradexp.init("bench", dir=tmp / "run", mode="offline")

    def tensor(d, a, s):
        d["grad"] = a
        run.log(d)

    t = _workload(lambda d, s: run.log(d), tensor)
    return _done(out, t, gradexp.finish, tmp / "run")


def w_wandb(args, tmp):
    out = _import_init("wandb", tmp / "ii", _mk(tmp / "ii", _reps(args)))
    import wandb

    (tmp / "run").mkdir()
    run = wandb.init(project="bench", dir=str(tmp / "run"), mode="offline")

    def tensor(d, a, s):
        d["grad"] = wandb.Histogram(a)
        wandb.log(d)

    t = _workload(lambda d, s: wandb.log(d), tensor)
    return _done(out, t, run.finish, tmp / "run")


def w_tensorboardx(args, tmp):
    out = _import_init("tensorboardX", tmp / "ii", _mk(tmp / "ii", _reps(args)))
    from tensorboardX import SummaryWriter

    w = SummaryWriter(logdir=str(tmp / "run"))

    def scalars(d, s):
        for k, v in d.items():
            w.add_scalar(k, v, s)

    def tensor(d, a, s):
        scalars(d, s)
        w.add_histogram("grad", a, s)

    t = _workload(scalars, tensor)
    return _done(out, t, w.close, tmp / "run")


def w_mlflow(args, tmp):
    out = _import_init("mlflow", tmp / "ii", _mk(tmp / "ii", _reps(args)))
    import mlflow

    (tmp / "run").mkdir()
    mlflow.set_tracking_uri(f"sqlite:///{tmp}/run/mlflow.db")
    exp = mlflow.create_experiment("bench", artifact_location=(tmp / "run" / "artifacts").as_uri())
    mlflow.start_run(experiment_id=exp)
    stage = tmp / "stage"
    stage.mkdir()

    def tensor(d, a, s):
        mlflow.log_metrics(d, step=s)
        p = stage / f"grad_{s:06d}.npy"
        np.save(p, a)
        mlflow.log_artifact(str(p), artifact_path="grad")

    t = _workload(lambda d, s: mlflow.log_metrics(d, step=s), tensor)
    return _done(out, t, mlflow.end_run, tmp / "run")


def _mk(path: Path, reps: int) -> int:
    path.mkdir(parents=True, exist_ok=True)
    return reps


SYSTEMS = [
    C.System("numpy", "numpy", w_numpy),
    C.System("gradexp", "gradexp", w_gradexp),
    C.System("wandb", "wandb", w_wandb),
    C.System("tensorboardX", "tensorboardX", w_tensorboardx),
    C.System("mlflow", "mlflow", w_mlflow),
]

LABELS = {
    "numpy": "floor: `import numpy`",
    "gradexp": "gradexp",
    "wandb": "wandb offline",
    "tensorboardX": "tensorboardX",
    "mlflow": "MLflow sqlite",
}


def report(res: dict, quick: bool) -> str:
    g = res.get("gradexp", {})
    lines = ["### 4. Start-up, finish, disk and memory", "",
             "Import + init in a fresh interpreter (median of "
             f"{2 if quick else 5} after a warm-up; range in brackets):", ""]
    rows = []
    for name in LABELS:
        r = res.get(name)
        if not C.ok(r):
            rows.append([LABELS[name], C.status(r), "", "", "", ""])
            continue
        rows.append([LABELS[name], C.fmt(r["import_s"]), C.fmt(r["init_s"]) if name != "numpy" else "-",
                     f"{C.fmt(r['total_s'])} [{C.fmt(r['total_min_s'])}-{C.fmt(r['total_max_s'])}]",
                     "1.00x" if name == "gradexp" else C.ratio(r["total_s"], g.get("total_s"))])
    lines.append(C.table(["system", "import s", "init s", "import + init s", "peer/gradexp"], rows))
    lines += ["", f"Small run ({STEPS:,} steps x 10 scalars + {STEPS // TENSOR_EVERY} tensors of 1M "
                  "float32; gradexp keeps the tensors, wandb/tensorboardX keep histograms, MLflow "
                  ".npy artifacts):", ""]
    rows = []
    for name in ("gradexp", "wandb", "tensorboardX", "mlflow"):
        r = res.get(name)
        if not C.ok(r):
            rows.append([LABELS[name], C.status(r)] + [""] * 7)
            continue
        rows.append([LABELS[name], C.fmt(r["loop_s"]), C.fmt(r["finish_s"]),
                     "1.00x" if name == "gradexp" else C.ratio(r["finish_s"], g.get("finish_s")),
                     C.fmt(r["disk_bytes"] / C.MB), C.fmt(r["peak_rss_mb"]),
                     "1.00x" if name == "gradexp" else C.ratio(r["peak_rss_mb"], g.get("peak_rss_mb")),
                     C.fmt(r["helper_rss_mb"])])
    lines.append(C.table(["system", "logging loop s", "finish() s", "finish peer/gradexp",
                          "disk MB", "peak RSS MB", "RSS peer/gradexp", "helper procs RSS MB"], rows))
    if C.ok(g):
        lines += ["", f"gradexp target import + init <= {TARGET_S:g} s: "
                      f"**{C.verdict(g['total_s'] <= TARGET_S)}** ({C.fmt(g['total_s'])} s)."]
    return "\n".join(lines)


def runs(quick: bool):
    return [(s.name, s.name, None, 300.0) for s in SYSTEMS]


if __name__ == "__main__":
    C.main(__file__, "Workload 4: start-up, finish, disk, memory", SYSTEMS, report, runs)
