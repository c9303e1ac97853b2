"""Server and streaming: upload throughput, log-to-visible latency, 32 concurrent runs, compaction.

Starts the embedded server (``gradexp server``: SQLite + a local folder, uvicorn, one
process) on a free loopback port and measures, against the issue's targets:

1. upload throughput of tensor parts (dense float32 N(0, 1e-3), 4 MiB each) with the
   sender's own code (``gradexp sync``), in MB/s of compressed parts (target >= 300);
2. time from ``log()`` to visible through the API for an online run, p50/p95 over
   many probes (target p95 <= 2 s);
3. 32 concurrent runs uploading parts to one server, one process each: 5xx count
   (target 0) and part PUT latency p50/p99 (target p99 <= 200 ms);
4. Parquet compaction at finish for 1,000,000 steps x 10 metrics (the finish call);
5. latency of small requests (``GET /healthz``, ``GET`` a run) while a 256 MB part
   uploads: p50/p99/max, to see whether the upload stalls the server.

    python benchmarks/bench_server.py [--quick] [--only upload,stall,...]

Prints a Markdown report on stdout, progress on stderr.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests

import gradexp
from gradexp.core.client import Client
from gradexp.sync import sender as _service

MB = 1e6


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, root: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data = root / "server"
        self.proc = subprocess.Popen([sys.executable, "-m", "gradexp", "server", "--port", str(self.port),
                                      "--data-dir", str(self.data)], stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            try:
                requests.get(self.url + "/healthz", timeout=1)
                break
            except requests.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("server did not start") from None
                time.sleep(0.1)
        self.key = (self.data / "local-api-key").read_text().strip()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()


def offline_run(root: Path, name: str, fn) -> Path:  # type: ignore[no-untyped-def]
    with gradexp.init("bench", id=name, dir=root / "runs", mode="offline") as run:
        fn(run)
    return run.dir


def parts_bytes(run_dir: Path) -> int:
    return sum(p.stat().st_size for p in (run_dir / "parts").iterdir())


def bench_upload(server: Server, root: Path, n: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    pool = [(rng.standard_normal(1 << 20) * 1e-3).astype(np.float32) for _ in range(8)]

    def fill(run) -> None:  # type: ignore[no-untyped-def]
        for i in range(n):
            run.log({"grad": pool[i % len(pool)] + np.float32(i * 1e-7)})

    d = offline_run(root, "upload", fill)
    size = parts_bytes(d)
    client = Client(server.url, server.key)
    t = time.perf_counter()
    parts, _ = _service.sync(d, client, "local")
    dt = time.perf_counter() - t
    return {"tensors": n, "raw_MB": n * 4 * 1.048576, "parts": parts, "compressed_MB": size / MB,
            "seconds": dt, "MBps": size / MB / dt}


def bench_visible(server: Server, root: Path, probes: int) -> dict[str, float]:
    run = gradexp.init("bench", id="visible", dir=root / "runs", host=server.url, api_key=server.key)
    s = requests.Session()
    s.headers["Authorization"] = f"Bearer {server.key}"
    url = f"{server.url}/api/v1/runs/local/bench/visible/history"
    lat = []
    for i in range(probes):
        t0 = time.perf_counter()
        run.log({"probe": float(i)}, step=i)
        while True:
            r = s.get(url, params={"format": "json", "keys": "probe"}, timeout=10)
            if r.status_code == 200 and i in r.json()["columns"]["step"]:
                break
            if time.perf_counter() - t0 > 30:
                raise RuntimeError(f"probe {i} not visible after 30 s")
            time.sleep(0.02)
        lat.append(time.perf_counter() - t0)
        time.sleep(0.1 + (i % 5) * 0.05)  # spread the probes over the sealing cycle
    run.finish()
    a = np.array(lat)
    return {"probes": probes, "p50_s": float(np.percentile(a, 50)), "p95_s": float(np.percentile(a, 95)),
            "max_s": float(a.max())}


def _concurrent_worker(args: tuple[str, str, str, int, float, object]) -> tuple[list[float], list[int]]:
    """Upload one run's parts: paced like a live run (one part per ``interval`` seconds, random
    phase), or back to back when ``interval`` is 0."""
    url, key, run_dir, idx, interval, barrier = args
    d = Path(run_dir)
    s = requests.Session()
    s.headers["Authorization"] = f"Bearer {key}"
    base = f"{url}/api/v1/runs/local/concurrent/{d.name}"
    s.put(base, json={}).raise_for_status()
    parts = sorted((d / "parts").glob("*.gxp"))
    blobs = [(p.name, p.read_bytes()) for p in parts]
    barrier.wait()  # type: ignore[attr-defined]
    lat, codes = [], []
    start = time.perf_counter() + interval * np.random.default_rng(idx).random()
    for i, (name, data) in enumerate(blobs):
        stream, _, seq = name[:-4].rpartition("-")
        wait = start + i * interval - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        t = time.perf_counter()
        r = s.put(f"{base}/parts/{stream}/{int(seq)}", data=data)
        lat.append(time.perf_counter() - t)
        codes.append(r.status_code)
    return lat, codes


def bench_concurrent(server: Server, root: Path, runs: int, steps: int, interval: float) -> dict[str, float]:
    rng = np.random.default_rng(1)
    dirs = []
    for i in range(runs):
        # A run as it streams online: small history parts and tensor parts of ~1 MiB.
        with gradexp.init("concurrent", id=f"r{i:02d}-{interval}", dir=root / "runs", mode="offline",
                          part_max_bytes=1 << 20) as run:
            for s in range(steps):
                run.log({"loss": float(s), "grad": (rng.standard_normal(65536) * 1e-3).astype(np.float32)})
                if s % 10 == 9:
                    run.flush()
        dirs.append(run.dir)
    n_parts = sum(len(list((d / "parts").glob("*.gxp"))) for d in dirs)
    log(f"  {runs} runs, {n_parts} parts")
    with mp.Manager() as m:
        barrier = m.Barrier(runs)
        t = time.perf_counter()
        with mp.Pool(runs) as pool:
            out = pool.map(_concurrent_worker, [(server.url, server.key, str(d), i, interval, barrier)
                                                 for i, d in enumerate(dirs)])
        wall = time.perf_counter() - t
    lat = np.array([x for lats, _ in out for x in lats])
    codes = [c for _, cs in out for c in cs]
    return {"runs": runs, "puts": len(codes), "5xx": sum(c >= 500 for c in codes),
            "non_2xx": sum(c >= 300 for c in codes), "p50_ms": float(np.percentile(lat, 50) * 1e3),
            "p99_ms": float(np.percentile(lat, 99) * 1e3), "max_ms": float(lat.max() * 1e3),
            "wall_s": wall}


def bench_compaction(server: Server, root: Path, steps: int) -> dict[str, float]:
    def fill(run) -> None:  # type: ignore[no-untyped-def]
        row = {f"m{i}": 0.0 for i in range(10)}
        for s in range(steps):
            for i in range(10):
                row[f"m{i}"] = s * 0.001 + i
            run.log(row)

    d = offline_run(root, "compaction", fill)
    client = Client(server.url, server.key)
    up = _service.Uploader(d, client, "local")
    up.put_run()
    up.upload_pending()
    t = time.perf_counter()
    up.finish("finished", 0)
    dt = time.perf_counter() - t
    h = gradexp.Api(host=server.url, api_key=server.key).run("local/bench/compaction").history()
    assert h.num_rows == steps, h.num_rows
    return {"steps": steps, "metrics": 10, "history_parts": len([n for n in up.uploaded if n.startswith("history")]),
            "finish_s": dt}


def bench_stall(server: Server, root: Path, mb: int, rounds: int) -> dict[str, float]:
    """Small requests, back to back from one client, while another client uploads one part of
    ``mb`` MB (dense float32 tensors, 4 MiB each): their latency, and the upload's time."""
    import threading

    rng = np.random.default_rng(2)
    pool = [(rng.standard_normal(1 << 20) * 1e-3).astype(np.float32) for _ in range(8)]
    n = int(mb * MB / (3.5 * 1.048576 * MB)) + 1  # compressed ~3.5 MiB each

    def fill(run) -> None:  # type: ignore[no-untyped-def]
        for i in range(n):
            run.log({"grad": pool[i % len(pool)] + np.float32(i * 1e-7)})

    with gradexp.init("bench", id="stall", dir=root / "runs", mode="offline", part_max_bytes=4 << 30) as run:
        fill(run)
    [part] = sorted((run.dir / "parts").glob("tensors-*.gxp"))
    data = part.read_bytes()
    s = requests.Session()
    s.headers["Authorization"] = f"Bearer {server.key}"
    base = f"{server.url}/api/v1/runs/local/bench/stall"
    s.put(base, json={}).raise_for_status()
    lat: list[float] = []
    uploads: list[float] = []
    for r in range(rounds):
        done = threading.Event()

        def upload() -> None:
            up = requests.Session()
            up.headers["Authorization"] = f"Bearer {server.key}"
            t = time.perf_counter()
            resp = up.put(f"{base}/parts/tensors/{r}", data=data, timeout=600)
            uploads.append(time.perf_counter() - t)
            assert resp.status_code == 201, resp.text
            done.set()

        th = threading.Thread(target=upload)
        th.start()
        probe = 0
        while not done.is_set():
            t = time.perf_counter()
            target = "/healthz" if probe % 2 else "/api/v1/runs/local/bench/stall"
            s.get(server.url + target, timeout=600).raise_for_status()
            lat.append(time.perf_counter() - t)
            probe += 1
            time.sleep(0.002)
        th.join()
    a = np.array(lat) * 1e3
    return {"part_MB": len(data) / MB, "rounds": rounds, "probes": len(lat), "p50_ms": float(np.percentile(a, 50)),
            "p99_ms": float(np.percentile(a, 99)), "max_ms": float(a.max()),
            "upload_s": float(np.median(uploads)), "upload_MBps": len(data) / MB / float(np.median(uploads))}


SECTIONS = ("upload", "visible", "concurrent", "burst", "compaction", "stall")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", type=Path, default=None, help="also write the measurements here")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {', '.join(SECTIONS)}")
    args = ap.parse_args()
    q = args.quick
    only = set(args.only.split(","))
    root = Path(tempfile.mkdtemp(prefix="gradexp-bench-server-"))
    server = Server(root)
    out: dict[str, dict[str, float]] = {}
    try:
        if "upload" in only:
            log("upload throughput...")
            out["upload"] = bench_upload(server, root, 30 if q else 250)
        if "visible" in only:
            log("log -> visible...")
            out["visible"] = bench_visible(server, root, 10 if q else 60)
        if "concurrent" in only:
            log("32 concurrent runs, streaming (a part every 0.5 s each)...")
            out["concurrent"] = bench_concurrent(server, root, 32, 20 if q else 60, 0.5)
        if "burst" in only:
            log("32 concurrent runs, back to back...")
            out["concurrent_burst"] = bench_concurrent(server, root, 32, 20 if q else 60, 0.0)
        if "compaction" in only:
            log("compaction at finish...")
            out["compaction"] = bench_compaction(server, root, 100_000 if q else 1_000_000)
        if "stall" in only:
            log("small requests while a 256 MB part uploads...")
            out["stall"] = bench_stall(server, root, 64 if q else 256, 1 if q else 3)
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
    if args.json is not None:
        import json

        args.json.write_text(json.dumps(out, indent=2))
    ok = lambda b: "yes" if b else "**no**"  # noqa: E731
    print("### Server and streaming (embedded server: SQLite + local folder, one uvicorn process)\n")
    print("| measure | result | target | met |")
    print("| --- | --- | --- | --- |")
    if "upload" in out:
        up = out["upload"]
        print(f"| upload of tensor parts (`gradexp sync`, {up['parts']} parts, {up['compressed_MB']:.0f} MB "
              f"compressed from {up['raw_MB']:.0f} MB raw) | {up['MBps']:.0f} MB/s compressed "
              f"({up['seconds']:.2f} s) | >= 300 MB/s | {ok(up['MBps'] >= 300)} |")
    if "visible" in out:
        vis = out["visible"]
        print(f"| `log()` to visible through the API ({vis['probes']} probes) | p50 {vis['p50_s']:.2f} s, "
              f"p95 {vis['p95_s']:.2f} s, max {vis['max_s']:.2f} s | p95 <= 2 s | {ok(vis['p95_s'] <= 2)} |")
    for label, name in (("streaming, a part every 0.5 s per run", "concurrent"),
                        ("back to back (stress)", "concurrent_burst")):
        if name in out:
            c = out[name]
            print(f"| 32 concurrent runs, {label}: {c['puts']} part PUTs of ~1 MiB | {c['5xx']} 5xx "
                  f"({c['non_2xx']} non-2xx); PUT p50 {c['p50_ms']:.0f} ms, p99 {c['p99_ms']:.0f} ms, "
                  f"max {c['max_ms']:.0f} ms; {c['wall_s']:.1f} s wall | 0 5xx, p99 <= 200 ms | "
                  f"{ok(c['5xx'] == 0 and c['p99_ms'] <= 200)} |")
    if "compaction" in out:
        comp = out["compaction"]
        print(f"| Parquet compaction at finish, {comp['steps']:,} steps x 10 metrics "
              f"({comp['history_parts']} history parts) | {comp['finish_s']:.2f} s | (measured) | |")
    if "stall" in out:
        st = out["stall"]
        print(f"| small requests (`GET /healthz`, `GET` a run) during a {st['part_MB']:.0f} MB part upload "
              f"({st['probes']} over {st['rounds']} uploads) | p50 {st['p50_ms']:.1f} ms, p99 {st['p99_ms']:.1f} ms, "
              f"max {st['max_ms']:.0f} ms; the upload {st['upload_s']:.2f} s ({st['upload_MBps']:.0f} MB/s) | "
              f"(measured) | |")
    print()


if __name__ == "__main__":
    main()
