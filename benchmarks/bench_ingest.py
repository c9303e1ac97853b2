"""Workload 3: sustained ingest of dense 4 MiB gradients, log() to durable local files.

Throughput is raw (uncompressed) bytes logged / wall time from the first ``log()``
to the return of ``finish()`` (which fsyncs and seals every part), MB = 10^6 bytes.
The compression ratio is raw bytes logged / bytes of the run's part files on disk.
Tensors are taken round-robin from a pool of 8 distinct N(0, 1e-3) arrays generated
before the clock starts, so data generation is not timed but zstd sees different
data each call (8 x 4 MiB is more than any zstd L1 window).

Peers do not keep raw tensors through their logging APIs; the two that can store the
bytes at all are measured on float32 with fewer tensors: tensorboardX writing a raw
``TensorProto`` summary per step, and MLflow ``np.save`` + ``log_artifact``. Their
files are fsynced before the clock stops, to match gradexp's durability. "disk floor"
is plain ``os.write`` of the same bytes to one file + fsync (no compression).

gradexp targets: >= 600 MB/s for float32 gradients; ratio >= 1.15 (float32), >= 1.4 (bfloat16).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

TARGET_MBPS = 600.0
TARGET_RATIO = {"float32": 1.15, "bfloat16": 1.4}
TENSOR_BYTES = 4 * C.MiB
POOL = 8


def _dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _pool(dtype_name: str) -> list[np.ndarray]:
    dt = _dtype(dtype_name)
    return C.pool_normal(POOL, TENSOR_BYTES // dt.itemsize, 1e-3, dt)


def _count(args, peer: bool) -> int:
    if args.quick:
        return 16 if peer else 64
    return int(args.extra.get("n", 64 if peer else 1000))


def _fsync_tree(path: Path) -> None:
    for p in path.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _result(n, pool, t_log, t_total, disk, extra=None) -> dict:
    raw = n * pool[0].nbytes
    out = {"tensors": n, "raw_bytes": raw, "disk_bytes": disk, "log_s": t_log, "total_s": t_total,
           "mbps": raw / t_total / C.MB, "caller_mbps": raw / t_log / C.MB,
           "ratio": raw / disk if disk else float("nan"), "peak_rss_mb": C.peak_rss_mb()}
    out.update(extra or {})
    return out


def w_gradexp(args, tmp):
    dt = args.extra.get("dtype", "float32")
    pool, n = _pool(dt), _count(args, False)
    import gradexp

    settings = {k: int(v) for k, v in args.extra.items() if k in ("workers",)}
    run = gradexp.init("bench", dir=tmp, mode="offline", **settings)
    run.log({"warmup": 0.0})
    pc = time.perf_counter
    t0 = pc()
    for i in range(n):
        run.log({"grad": pool[i % POOL]})
    t_log = pc() - t0
    gradexp.finish()
    t_total = pc() - t0
    parts = Path(run.dir) / "parts"
    disk = C.dir_bytes(parts, "tensors-*")
    return _result(n, pool, t_log, t_total, disk,
                   {"dtype": dt, "all_parts_bytes": C.dir_bytes(parts),
                    "n_parts": len(list(parts.glob("tensors-*")))})


def w_disk_floor(args, tmp):
    pool, n = _pool("float32"), _count(args, False)
    pc = time.perf_counter
    path = tmp / "raw.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    t0 = pc()
    for i in range(n):
        os.write(fd, pool[i % POOL].data)
    t_log = pc() - t0
    os.fsync(fd)
    os.close(fd)
    t_total = pc() - t0
    return _result(n, pool, t_log, t_total, path.stat().st_size, {"dtype": "float32"})


def w_tensorboardx(args, tmp):
    pool, n = _pool("float32"), _count(args, True)
    from tensorboardX import SummaryWriter
    from tensorboardX.proto.summary_pb2 import Summary
    from tensorboardX.proto.tensor_pb2 import TensorProto
    from tensorboardX.proto.tensor_shape_pb2 import TensorShapeProto
    from tensorboardX.proto.types_pb2 import DT_FLOAT

    w = SummaryWriter(logdir=str(tmp / "tb"))
    fw = w._get_file_writer()
    pc = time.perf_counter
    t0 = pc()
    for i in range(n):
        a = pool[i % POOL]
        tp = TensorProto(dtype=DT_FLOAT, tensor_content=a.tobytes(),
                         tensor_shape=TensorShapeProto(dim=[TensorShapeProto.Dim(size=a.size)]))
        fw.add_summary(Summary(value=[Summary.Value(tag="grad", tensor=tp)]), i)
    t_log = pc() - t0
    w.close()
    _fsync_tree(tmp / "tb")
    t_total = pc() - t0
    return _result(n, pool, t_log, t_total, C.dir_bytes(tmp / "tb"), {"dtype": "float32"})


def w_mlflow(args, tmp):
    pool, n = _pool("float32"), _count(args, True)
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
    exp = mlflow.create_experiment("bench", artifact_location=(tmp / "artifacts").as_uri())
    mlflow.start_run(experiment_id=exp)
    stage = tmp / "stage"
    stage.mkdir()
    pc = time.perf_counter
    t0 = pc()
    for i in range(n):
        p = stage / f"grad_{i:06d}.npy"
        np.save(p, pool[i % POOL])
        mlflow.log_artifact(str(p), artifact_path="grad")
    t_log = pc() - t0
    mlflow.end_run()
    _fsync_tree(tmp / "artifacts")
    t_total = pc() - t0
    return _result(n, pool, t_log, t_total, C.dir_bytes(tmp / "artifacts"), {"dtype": "float32"})


SYSTEMS = [
    C.System("gradexp", "gradexp", w_gradexp),
    C.System("disk-floor", "numpy", w_disk_floor),
    C.System("tensorboardX", "tensorboardX", w_tensorboardx),
    C.System("mlflow", "mlflow", w_mlflow),
]


def runs(quick: bool):
    return [
        ("gradexp float32", "gradexp", {"dtype": "float32"}, 300.0),
        ("gradexp bfloat16", "gradexp", {"dtype": "bfloat16"}, 300.0),
        ("gradexp float32 workers=1", "gradexp", {"dtype": "float32", "workers": "1"}, 300.0),
        ("disk floor float32", "disk-floor", None, 300.0),
        ("tensorboardX float32", "tensorboardX", None, 300.0),
        ("mlflow float32", "mlflow", None, 300.0),
    ]


LABELS = {
    "gradexp float32": "gradexp float32 (default: 2 workers)",
    "gradexp bfloat16": "gradexp bfloat16",
    "gradexp float32 workers=1": "gradexp float32, `workers=1`",
    "disk floor float32": "floor: `os.write` raw bytes + fsync",
    "tensorboardX float32": "tensorboardX raw `TensorProto` summary",
    "mlflow float32": "MLflow `np.save` + `log_artifact`",
}


def report(res: dict, quick: bool) -> str:
    g = res.get("gradexp float32", {})
    lines = ["### 3. Sustained ingest of 4 MiB dense N(0, 1e-3) tensors to durable local files", ""]
    rows = []
    for name, label in LABELS.items():
        r = res.get(name)
        if not C.ok(r):
            rows.append([label, C.status(r)] + [""] * 7)
            continue
        same = g if r.get("dtype") == "float32" else res.get("gradexp bfloat16", {})
        rows.append([label, C.fmt(r["tensors"]), C.fmt(r["raw_bytes"] / C.MB), C.fmt(r["mbps"]),
                     C.fmt(r["caller_mbps"]), C.fmt(r["ratio"]),
                     C.fmt(r["total_s"]), C.fmt(r["peak_rss_mb"]),
                     "1.00x" if name.startswith("gradexp") and r is same else
                     C.ratio(same.get("mbps") and r["mbps"], same.get("mbps"))])
    lines.append(C.table(["system", "tensors", "raw MB", "MB/s to durable (incl. finish)",
                          "MB/s caller (log() loop only)", "raw/disk ratio", "total s",
                          "peak RSS MB", "throughput vs gradexp (same dtype, default settings)"], rows))
    verdicts = []
    r = res.get("gradexp float32")
    if C.ok(r):
        verdicts.append(
            f"gradexp float32: throughput >= {TARGET_MBPS:g} MB/s **{C.verdict(r['mbps'] >= TARGET_MBPS)}** "
            f"({C.fmt(r['mbps'])} MB/s); ratio >= {TARGET_RATIO['float32']:g} "
            f"**{C.verdict(r['ratio'] >= TARGET_RATIO['float32'])}** ({r['ratio']:.3f}).")
    r = res.get("gradexp bfloat16")
    if C.ok(r):  # the throughput target is set for float32 gradients; bfloat16 has a ratio target
        verdicts.append(
            f"gradexp bfloat16: ratio >= {TARGET_RATIO['bfloat16']:g} "
            f"**{C.verdict(r['ratio'] >= TARGET_RATIO['bfloat16'])}** ({r['ratio']:.3f}); "
            f"throughput {C.fmt(r['mbps'])} MB/s (the {TARGET_MBPS:g} MB/s target is set for float32).")
    for v in verdicts:
        lines += ["", v]
    return "\n".join(lines)


if __name__ == "__main__":
    C.main(__file__, "Workload 3: sustained ingest", SYSTEMS, report, runs)
