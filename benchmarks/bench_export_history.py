"""Workload 6: a history of 1,000,000 steps x 10 metrics to Parquet.

gradexp: a run with 1M ``log()`` calls of 10 float metrics (100k with ``--quick``)
is written first (not timed against the target; its time is reported), then
``gradexp.read.export.export_history(r, out)`` is timed from a fresh ``StoredRun``
(it reads the history from the part files and writes the Parquet file). Best and
median of 3.

Then, on the same in-memory history table, Parquet settings are compared (median
of 3 each): gradexp's encodings (zstd, DELTA_BINARY_PACKED step, BYTE_STREAM_SPLIT
floats, dictionary only for other columns), pyarrow's defaults (snappy, dictionary)
and pyarrow defaults with zstd; file size, write time, read-back time. This checks
the claim in ``gradexp/_export.py`` ("~23% smaller and ~3x faster than the defaults").

Peers have no Parquet export and logging 10M points through them takes far longer
than this suite's budget (MLflow sync ~4.7 ms/step, tensorboardX ~45 us/point), so
they are compared on a smaller history, 20,000 steps x 10 metrics, against gradexp
on the same 20,000 steps: the time from the peer's stored data to a wide Parquet
file (same gradexp encodings) with the peer's own reader: MLflow
``MlflowClient.get_metric_history`` per key (sqlite), tensorboardX event files
parsed with its bundled protobufs. wandb offline has no local reader of its
``.wandb`` file short of syncing to a server: "no local reader".

gradexp target: export_history of 1M steps <= 0.5 s.
"""

from __future__ import annotations

import statistics
import struct
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

TARGET_S = 0.5
PEER_STEPS = 20_000
METRICS = [f"metric_{j}" for j in range(10)]


def _peer_steps(args) -> int:
    return 2_000 if args.quick else PEER_STEPS


def _values(n: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    # training-curve-like: a slow trend plus noise, one column per metric
    t = np.arange(n, dtype=np.float64)[:, None]
    return np.exp(-t / max(n / 5, 1)) + 0.01 * rng.standard_normal((n, len(METRICS)))


FLUSH_EVERY = 20_000


def _write_gradexp(tmp: Path, n: int, flush_every: int | None = FLUSH_EVERY):
    """Log ``n`` steps; with ``flush_every``, ``run.flush()`` every that many steps.

    The periodic flush guards against a writer bug found while writing this suite
    (rows that one writer drain took in after the 50,000th buffered row were dropped;
    fixed in gradexp/_writer.py on 2026-11-23). ``_history_loss`` checks, without any
    flush, that it stays fixed; the exported history is checked complete either way.
    """
    import gradexp

    vals = _values(n).tolist()
    run = gradexp.init("bench", dir=tmp, mode="offline")
    t0 = time.perf_counter()
    log = run.log
    for i, row in enumerate(vals):
        log(dict(zip(METRICS, row)))
        if flush_every and i % flush_every == flush_every - 1:
            run.flush()
    t_log = time.perf_counter() - t0
    gradexp.finish()
    return Path(run.dir), t_log, time.perf_counter() - t0


def _history_loss(tmp: Path, n: int = 200_000) -> dict:
    """Log ``n`` steps at full speed with default settings, no flush; count stored rows."""
    import gradexp

    run_dir, _, _ = _write_gradexp(tmp, n, flush_every=None)
    return {"logged": n, "stored": gradexp.Api().run(run_dir).history().num_rows}


def _gradexp_export(run_dir: Path, out: Path, reps: int):
    import gradexp
    from gradexp.read import export as _export

    times, hist_times = [], []
    for _ in range(reps):
        out.unlink(missing_ok=True)
        t = time.perf_counter()
        r = gradexp.Api().run(run_dir)
        _export.export_history(r, out)
        times.append(time.perf_counter() - t)
        t = time.perf_counter()
        gradexp.Api().run(run_dir).history()
        hist_times.append(time.perf_counter() - t)
    return times, hist_times


def _write_variant(table, out: Path, variant: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    if variant == "gradexp":
        enc = {}
        for f in table.schema:
            if f.name == "step" and pa.types.is_integer(f.type):
                enc[f.name] = "DELTA_BINARY_PACKED"
            elif pa.types.is_floating(f.type):
                enc[f.name] = "BYTE_STREAM_SPLIT"
        dic = [f.name for f in table.schema if f.name not in enc]
        pq.write_table(table, out, compression="zstd", use_dictionary=dic, column_encoding=enc,
                       row_group_size=1 << 20)
    elif variant == "default":
        pq.write_table(table, out)
    elif variant == "zstd":
        pq.write_table(table, out, compression="zstd")
    elif variant == "zstd-nodict":
        pq.write_table(table, out, compression="zstd", use_dictionary=False)
    else:
        raise ValueError(variant)


VARIANTS = {
    "gradexp": "gradexp encodings (zstd, DELTA step, BYTE_STREAM_SPLIT floats)",
    "default": "pyarrow defaults (snappy, dictionary)",
    "zstd": "pyarrow defaults + zstd",
    "zstd-nodict": "zstd, no dictionary, plain encodings",
}


def _compare(table, tmp: Path, reps: int) -> dict:
    import pyarrow.parquet as pq

    # Interleaved (round-robin over variants, writes first, then reads): measuring one
    # variant after another let machine noise and allocator state favour whichever came first.
    paths = {v: tmp / f"cmp-{v}.parquet" for v in VARIANTS}
    w: dict[str, list[float]] = {v: [] for v in VARIANTS}
    r: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(reps):
        for v, p in paths.items():
            p.unlink(missing_ok=True)
            t = time.perf_counter()
            _write_variant(table, p, v)
            w[v].append(time.perf_counter() - t)
    for _ in range(reps):
        for v, p in paths.items():
            t = time.perf_counter()
            back = pq.read_table(p)
            r[v].append(time.perf_counter() - t)
            assert back.num_rows == table.num_rows
    return {v: {"write_s": statistics.median(w[v]), "read_s": statistics.median(r[v]),
                "bytes": paths[v].stat().st_size} for v in VARIANTS}


def w_gradexp(args, tmp):
    n = 100_000 if args.quick else 1_000_000
    reps = 3
    run_dir, t_log, t_write = _write_gradexp(tmp / "big", n)
    out_path = tmp / "history.parquet"
    times, hist_times = _gradexp_export(run_dir, out_path, reps)
    import pyarrow.parquet as pq

    import gradexp

    table = gradexp.Api().run(run_dir).history()
    back = pq.read_table(out_path)
    assert back.num_rows == n == table.num_rows, (back.num_rows, n)
    res = {"steps": n, "columns": table.num_columns, "log_s": t_log, "write_run_s": t_write,
           "export_best_s": min(times), "export_median_s": statistics.median(times),
           "history_median_s": statistics.median(hist_times), "file_bytes": out_path.stat().st_size,
           "compare": _compare(table, tmp, reps)}
    # the small, side-by-side size
    small_dir, _, t_small = _write_gradexp(tmp / "small", _peer_steps(args))
    st, _ = _gradexp_export(small_dir, tmp / "small.parquet", reps)
    res["history_check"] = _history_loss(tmp / "check", 100_000 if args.quick else 200_000)
    res["small"] = {"steps": _peer_steps(args), "write_run_s": t_small, "export_s": statistics.median(st),
                    "file_bytes": (tmp / "small.parquet").stat().st_size}
    return res


def _wide_table(steps_by_key: dict[str, tuple[list[int], list[float]]]):
    """Pivot per-key (steps, values) into one row per step (the shape of gradexp's export)."""
    import pyarrow as pa

    all_steps = np.unique(np.concatenate([np.asarray(s, dtype=np.int64) for s, _ in steps_by_key.values()]))
    cols = {"step": pa.array(all_steps)}
    for key, (s, v) in steps_by_key.items():
        idx = np.searchsorted(all_steps, np.asarray(s, dtype=np.int64))
        col = np.full(all_steps.size, np.nan)
        col[idx] = v
        cols[key] = pa.array(col, mask=np.isnan(col))
    return pa.table(cols)


def w_mlflow(args, tmp):
    n = _peer_steps(args)
    import mlflow
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    exp = mlflow.create_experiment("bench", artifact_location=(tmp / "artifacts").as_uri())
    run = mlflow.start_run(experiment_id=exp)
    rid = run.info.run_id
    client = MlflowClient(uri)
    vals = _values(n)
    ts = int(time.time() * 1000)
    t0 = time.perf_counter()
    batch = []
    for s in range(n):  # log_batch: up to 1,000 metrics per call (the fast path)
        batch.extend(Metric(k, float(vals[s, j]), ts, s) for j, k in enumerate(METRICS))
        if len(batch) >= 1000:
            client.log_batch(rid, metrics=batch, synchronous=True)
            batch = []
    if batch:
        client.log_batch(rid, metrics=batch, synchronous=True)
    mlflow.end_run()
    t_write = time.perf_counter() - t0
    times = []
    for _ in range(3):
        out = tmp / "history.parquet"
        out.unlink(missing_ok=True)
        t = time.perf_counter()
        c = MlflowClient(uri)
        data = {}
        for k in METRICS:
            hist = c.get_metric_history(rid, k)
            data[k] = ([m.step for m in hist], [m.value for m in hist])
        table = _wide_table(data)
        _write_variant(table, out, "gradexp")
        times.append(time.perf_counter() - t)
    assert table.num_rows == n
    return {"steps": n, "write_run_s": t_write, "export_s": statistics.median(times),
            "file_bytes": out.stat().st_size}


def _read_tfrecords(path: Path):
    data = path.read_bytes()
    pos, n = 0, len(data)
    head = struct.Struct("<QI")
    while pos + 12 <= n:
        (length, _) = head.unpack_from(data, pos)
        pos += 12
        yield data[pos:pos + length]
        pos += length + 4


def w_tensorboardx(args, tmp):
    n = _peer_steps(args)
    from tensorboardX import SummaryWriter
    from tensorboardX.proto.event_pb2 import Event

    vals = _values(n).tolist()
    w = SummaryWriter(logdir=str(tmp / "tb"))
    t0 = time.perf_counter()
    for s in range(n):
        for k, v in zip(METRICS, vals[s]):
            w.add_scalar(k, v, s)
    w.close()
    t_write = time.perf_counter() - t0
    times = []
    for _ in range(3):
        out = tmp / "history.parquet"
        out.unlink(missing_ok=True)
        t = time.perf_counter()
        data: dict[str, tuple[list[int], list[float]]] = {}
        for f in sorted((tmp / "tb").glob("events.out.tfevents.*")):
            for rec in _read_tfrecords(f):
                ev = Event.FromString(rec)
                if ev.HasField("summary"):
                    for v in ev.summary.value:
                        s_, v_ = data.setdefault(v.tag, ([], []))
                        s_.append(ev.step)
                        v_.append(v.simple_value)
        table = _wide_table(data)
        _write_variant(table, out, "gradexp")
        times.append(time.perf_counter() - t)
    assert table.num_rows == n, table.num_rows
    return {"steps": n, "write_run_s": t_write, "export_s": statistics.median(times),
            "file_bytes": out.stat().st_size}


SYSTEMS = [
    C.System("gradexp", "gradexp", w_gradexp),
    C.System("mlflow", "mlflow", w_mlflow),
    C.System("tensorboardX", "tensorboardX", w_tensorboardx),
]


def runs(quick: bool):
    return [(s.name, s.name, None, 400.0) for s in SYSTEMS]


def report(res: dict, quick: bool) -> str:
    g = res.get("gradexp", {})
    lines = ["### 6. History to Parquet", ""]
    if not C.ok(g):
        return "\n".join(lines + [f"gradexp: {C.status(g)}"])
    n = g["steps"]
    lines += [
        f"gradexp run of {n:,} steps x 10 float metrics ({g['columns']} columns with step, "
        f"_timestamp, _runtime): logging loop {C.fmt(g['log_s'])} s, with finish() "
        f"{C.fmt(g['write_run_s'])} s ({C.fmt(n / g['write_run_s'])} steps/s; `run.flush()` every "
        f"{FLUSH_EVERY:,} steps, see below).", "",
        C.table(["what", "best of 3 s", "median s", "file MB"], [
            ["`export_history(Api().run(dir), out)`", C.fmt(g["export_best_s"]),
             C.fmt(g["export_median_s"]), C.fmt(g["file_bytes"] / C.MB)],
            ["of which `history()` (read parts -> Arrow)", "-", C.fmt(g["history_median_s"]), "-"],
        ]), "",
        f"gradexp target export of {n:,} steps <= {TARGET_S:g} s: "
        f"**{C.verdict(g['export_median_s'] <= TARGET_S)}** (median {C.fmt(g['export_median_s'])} s, "
        f"best {C.fmt(g['export_best_s'])} s).", "",
        f"Parquet settings on the same {n:,}-row table (median of 3):", ""]
    cmp = g["compare"]
    base = cmp["gradexp"]
    rows = []
    for v, label in VARIANTS.items():
        c = cmp[v]
        rows.append([label, C.fmt(c["bytes"] / C.MB), C.ratio(c["bytes"], base["bytes"]),
                     C.fmt(c["write_s"]), C.ratio(c["write_s"], base["write_s"]), C.fmt(c["read_s"])])
    lines.append(C.table(["settings", "file MB", "size vs gradexp", "write s", "write time vs gradexp",
                          "read s"], rows))
    d, z = cmp["default"], cmp["zstd"]
    lines += ["", f"gradexp's encodings vs pyarrow defaults: {100 * (1 - base['bytes'] / d['bytes']):.0f}% "
                  f"smaller, {d['write_s'] / base['write_s']:.2f}x the write speed; vs defaults + zstd: "
                  f"{100 * (1 - base['bytes'] / z['bytes']):.0f}% smaller, "
                  f"{z['write_s'] / base['write_s']:.2f}x the write speed.", ""]
    hc = g["history_check"]
    lines += [f"History completeness check (default settings, no flush, logging at full speed): "
              f"{hc['logged']:,} steps logged, **{hc['stored']:,}** rows in `history()`"
              + (" (complete)." if hc["stored"] == hc["logged"] else
                 f" ({100 * (1 - hc['stored'] / hc['logged']):.0f}% LOST: the writer drops rows, see "
                 "docs/benchmarks.md). The 1M-step run above flushes every "
                 f"{FLUSH_EVERY:,} steps to stay complete (checked)."), ""]
    sm = g["small"]
    lines += [f"Side by side on {sm['steps']:,} steps x 10 metrics (stored run -> wide Parquet file):", ""]
    rows = [["gradexp `export_history`", C.fmt(sm["write_run_s"]), C.fmt(sm["export_s"]), "1.00x",
             C.fmt(sm["file_bytes"] / C.MB)]]
    for name, label in (("mlflow", "MLflow sqlite: `log_batch` / `get_metric_history` per key"),
                        ("tensorboardX", "tensorboardX: `add_scalar` / parse event files")):
        r = res.get(name)
        if not C.ok(r):
            rows.append([label, C.status(r), "", "", ""])
            continue
        rows.append([label, C.fmt(r["write_run_s"]), C.fmt(r["export_s"]),
                     C.ratio(r["export_s"], sm["export_s"]) + ("" if r["steps"] == sm["steps"] else
                                                              f" ({r['steps']:,} steps)"),
                     C.fmt(r["file_bytes"] / C.MB)])
    rows.append(["wandb offline", "not installed" if not C.available("wandb") else
                 "no local reader of offline runs", "", "", ""])
    lines.append(C.table(["system", "writing the run s", "to Parquet s (median of 3)",
                          "peer/gradexp", "file MB"], rows))
    return "\n".join(lines)


if __name__ == "__main__":
    C.main(__file__, "Workload 6: history to Parquet", SYSTEMS, report, runs)
