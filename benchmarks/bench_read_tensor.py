"""Workload 5: read one 4 MB tensor at a given step from a run of 2,500 such tensors (10 GB).

gradexp writes the run (2,500 x 1M float32, N(0, 1e-3), round-robin from a pool of 8
distinct arrays; 200 with ``--quick``), then times ``r.tensor("grad", step)`` at
random steps:

* fresh: ``gradexp.Api().run(dir)`` then ``tensor()`` (a new reader each time, as in
  a notebook or a dashboard request; the run's files are in the page cache);
* cold: as fresh, after ``posix_fadvise(DONTNEED)`` evicted every part file from the
  page cache (no root needed; the nearest to a first read from disk);
* warm: one ``StoredRun`` reused (after one untimed read).

Every returned tensor is checked bit-exact against what was logged (outside the timer).
The run is deleted afterwards. Free disk is checked first.

Peer: MLflow, the only one that keeps the tensor, as ``.npy`` artifacts
(``np.save`` + ``log_artifact``), read back with
``mlflow.artifacts.download_artifacts`` + ``np.load``; 250 artifacts (1 GB), because
one file per step makes the run size irrelevant to a read. wandb and tensorboardX keep
only histograms, so there is no tensor to read.

gradexp target: median <= 10 ms.
"""

from __future__ import annotations

import os
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

TARGET_MS = 10.0
ELEMENTS = 1_000_000
POOL = 8


def _evict(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _stats_ms(xs: list[float]) -> dict:
    a = np.asarray(xs) * 1e3
    return {"median_ms": float(np.median(a)), "p90_ms": float(np.percentile(a, 90)),
            "min_ms": float(a.min()), "max_ms": float(a.max()), "n": int(a.size)}


def w_gradexp(args, tmp):
    n = 200 if args.quick else int(args.extra.get("n", 2500))
    free = shutil.disk_usage(tmp).free
    need = n * ELEMENTS * 4 * 1.1
    if free < need + 5e9:
        raise RuntimeError(f"not enough free disk: {free / 1e9:.1f} GB free, need {need / 1e9:.1f} GB + 5 GB")
    pool = C.pool_normal(POOL, ELEMENTS, 1e-3, np.float32)
    import gradexp

    run = gradexp.init("bench", dir=tmp, mode="offline")
    t0 = time.perf_counter()
    for i in range(n):
        run.log({"grad": pool[i % POOL]})
    gradexp.finish()
    t_write = time.perf_counter() - t0
    run_dir = Path(run.dir)
    disk = C.dir_bytes(run_dir / "parts")
    n_parts = len(list((run_dir / "parts").glob("tensors-*")))
    rng = random.Random(1)
    k_fresh, k_warm = (10, 30) if args.quick else (40, 200)
    out = {"tensors": n, "write_s": t_write, "write_mbps": n * ELEMENTS * 4 / t_write / C.MB,
           "disk_bytes": disk, "n_parts": n_parts, "free_disk_gb": free / 1e9}
    try:
        def check(step, arr):
            if not np.array_equal(arr.view(np.uint32), pool[step % POOL].view(np.uint32)):
                raise AssertionError(f"tensor at step {step} differs from what was logged")

        for mode in ("fresh", "cold"):
            t_open, t_read, t_total = [], [], []
            for _ in range(k_fresh):
                step = rng.randrange(n)
                if mode == "cold":
                    _evict(run_dir)
                t = time.perf_counter()
                r = gradexp.Api().run(run_dir)
                t1 = time.perf_counter()
                arr = r.tensor("grad", step)
                t2 = time.perf_counter()
                check(step, arr)
                t_open.append(t1 - t)
                t_read.append(t2 - t1)
                t_total.append(t2 - t)
            out[mode] = {**_stats_ms(t_total), "open_median_ms": statistics.median(t_open) * 1e3,
                         "tensor_median_ms": statistics.median(t_read) * 1e3}
        r = gradexp.Api().run(run_dir)
        r.tensor("grad", 0)
        times = []
        for _ in range(k_warm):
            step = rng.randrange(n)
            t = time.perf_counter()
            arr = r.tensor("grad", step)
            times.append(time.perf_counter() - t)
            check(step, arr)
        out["warm"] = _stats_ms(times)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    out["peak_rss_mb"] = C.peak_rss_mb()
    return out


def w_mlflow(args, tmp):
    n = 50 if args.quick else 250
    pool = C.pool_normal(POOL, ELEMENTS, 1e-3, np.float32)
    import mlflow
    from mlflow.artifacts import download_artifacts

    uri = f"sqlite:///{tmp}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    exp = mlflow.create_experiment("bench", artifact_location=(tmp / "artifacts").as_uri())
    run = mlflow.start_run(experiment_id=exp)
    stage = tmp / "stage"
    stage.mkdir()
    t0 = time.perf_counter()
    for i in range(n):
        p = stage / f"grad_{i:06d}.npy"
        np.save(p, pool[i % POOL])
        mlflow.log_artifact(str(p), artifact_path="grad")
        p.unlink()
    mlflow.end_run()
    t_write = time.perf_counter() - t0
    rid = run.info.run_id
    rng = random.Random(1)
    k_fresh, k_warm = (10, 30) if args.quick else (40, 200)
    out = {"tensors": n, "write_s": t_write, "write_mbps": n * ELEMENTS * 4 / t_write / C.MB,
           "disk_bytes": C.dir_bytes(tmp / "artifacts")}
    dl = tmp / "dl"

    def read(step):
        shutil.rmtree(dl, ignore_errors=True)
        path = download_artifacts(run_id=rid, artifact_path=f"grad/grad_{step:06d}.npy",
                                  dst_path=str(dl), tracking_uri=uri)
        return np.load(path)

    for mode, k in (("fresh", k_fresh), ("cold", k_fresh), ("warm", k_warm)):
        times = []
        for _ in range(k):
            step = rng.randrange(n)
            if mode == "cold":
                _evict(tmp / "artifacts")
            t = time.perf_counter()
            arr = read(step)
            times.append(time.perf_counter() - t)
            if not np.array_equal(arr, pool[step % POOL]):
                raise AssertionError("mlflow artifact differs")
        out[mode] = _stats_ms(times)
    out["peak_rss_mb"] = C.peak_rss_mb()
    return out


SYSTEMS = [
    C.System("gradexp", "gradexp", w_gradexp),
    C.System("mlflow", "mlflow", w_mlflow),
]


def runs(quick: bool):
    return [("gradexp", "gradexp", None, 600.0), ("mlflow", "mlflow", None, 300.0)]


def report(res: dict, quick: bool) -> str:
    g = res.get("gradexp", {})
    lines = ["### 5. Read one 4 MB tensor at a random step", ""]
    if C.ok(g):
        lines += [f"gradexp run: {g['tensors']:,} tensors of 1M float32 = "
                  f"{g['tensors'] * ELEMENTS * 4 / 1e9:.1f} GB raw, {g['disk_bytes'] / 1e9:.2f} GB in "
                  f"{g['n_parts']} tensor parts; written (log + finish) in {C.fmt(g['write_s'])} s "
                  f"= {C.fmt(g['write_mbps'])} MB/s. Free disk before: {g['free_disk_gb']:.0f} GB.", ""]
    rows = []
    for name, label in (("gradexp", "gradexp `tensor()`"),
                        ("mlflow", "MLflow `download_artifacts` + `np.load`")):
        r = res.get(name)
        if not C.ok(r):
            rows.append([label, C.status(r)] + [""] * 6)
            continue
        for mode, what in (("fresh", "fresh reader"), ("cold", "fresh reader, page cache evicted"),
                           ("warm", "warm reader")):
            m = r[mode]
            gm = g.get(mode, {}) if C.ok(g) else {}
            rows.append([label, what, C.fmt(r["tensors"]), C.fmt(m["median_ms"]), C.fmt(m["p90_ms"]),
                         C.fmt(m["n"]),
                         "1.00x" if name == "gradexp" else C.ratio(m["median_ms"], gm.get("median_ms"))])
    for name in ("wandb", "tensorboardX"):
        rows.append([name, "not installed" if not C.available(name) else
                     "keeps histograms only: no tensor to read", "", "", "", "", ""])
    lines.append(C.table(["system", "reader", "tensors in run", "median ms", "p90 ms", "samples",
                          "median peer/gradexp"], rows))
    if C.ok(g):
        f = g["fresh"]
        lines += ["", f"gradexp fresh reader split: `Api().run()` {C.fmt(f['open_median_ms'])} ms + "
                      f"first `tensor()` {C.fmt(f['tensor_median_ms'])} ms (medians).", ""]
        lines.append("gradexp target median <= 10 ms: " + ", ".join(
            f"{m} **{C.verdict(g[m]['median_ms'] <= TARGET_MS)}** ({C.fmt(g[m]['median_ms'])} ms)"
            for m in ("fresh", "cold", "warm")) + ".")
    return "\n".join(lines)


if __name__ == "__main__":
    C.main(__file__, "Workload 5: read one tensor", SYSTEMS, report, runs)
