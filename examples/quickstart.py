"""A small but real training loop in NumPy, streamed to a gradexp server, read back, exported.

Starts the embedded gradexp server (SQLite + a local folder, in ./gradexp-server),
trains a two-layer MLP on a synthetic two-spirals problem with plain SGD while
logging loss, accuracy, the learning rate and the gradient tensors every step,
reads the live history back from the server while training goes on, finishes,
reads gradients back bit-exact and exports the history to Parquet from the server.

    python examples/quickstart.py [--steps 1000] [--offline] [--dir gradexp-runs]

With --offline it needs no server and reads the run folder instead.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

import gradexp


def spirals(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    t = np.sqrt(rng.uniform(0.05, 1, n)) * 3 * np.pi
    label = rng.integers(0, 2, n)
    sign = np.where(label == 1, 1.0, -1.0)
    x = np.stack([sign * t * np.cos(t), sign * t * np.sin(t)], axis=1) / 10
    return (x + rng.normal(0, 0.02, x.shape)).astype(np.float32), label


def start_server(data_dir: Path) -> tuple[subprocess.Popen, str, str]:
    """`gradexp server` on a free loopback port; returns (process, URL, API key)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "gradexp", "server", "--port", str(port),
                             "--data-dir", str(data_dir)], stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(url + "/healthz", timeout=1)
            break
        except OSError:
            if proc.poll() is not None:
                sys.exit("the server did not start; is the extra installed? pip install -e '.[server]'")
            time.sleep(0.1)
    key = (data_dir / "local-api-key").read_text().strip()
    return proc, url, key


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.5)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--dir", default=None, help="runs folder (default: $GRADEXP_DIR or ./gradexp-runs)")
    ap.add_argument("--offline", action="store_true", help="no server: log to the run folder only")
    args = ap.parse_args()

    server, host, key = None, None, None
    if not args.offline:
        t = time.perf_counter()
        server, host, key = start_server(Path("gradexp-server").absolute())
        print(f"gradexp server: {host} (embedded: SQLite + ./gradexp-server, "
              f"started in {time.perf_counter() - t:.1f} s)")
    try:
        train(args, host, key)
    finally:
        if server is not None:
            server.terminate()
            server.wait()


def train(args: argparse.Namespace, host: str | None, key: str | None) -> None:
    rng = np.random.default_rng(0)
    x_all, y_all = spirals(8192, rng)
    w1 = (rng.standard_normal((2, args.hidden)) * 1.0).astype(np.float32)
    b1 = np.zeros(args.hidden, np.float32)
    w2 = (rng.standard_normal((args.hidden, 2)) / np.sqrt(args.hidden)).astype(np.float32)
    b2 = np.zeros(2, np.float32)

    t0 = time.perf_counter()
    run = gradexp.init("quickstart", config=args, dir=args.dir, tags=["numpy", "mlp"], host=host, api_key=key,
                       mode="offline" if host is None else "online")
    print(f"gradexp.init: {run.settings.mode} run {run.project}/{run.id} in {run.dir} "
          f"({(time.perf_counter() - t0) * 1e3:.1f} ms)")
    api = gradexp.Api(host=host, api_key=key)
    ref = str(run.dir) if host is None else f"{api.client.json('GET', '/viewer')['entity']}/{run.project}/{run.id}"

    log_time = 0.0
    for step in range(args.steps):
        idx = rng.integers(0, len(x_all), args.batch)
        x, y = x_all[idx], y_all[idx]
        h_pre = x @ w1 + b1
        h = np.tanh(h_pre)
        logits = h @ w2 + b2
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        loss = float(-np.log(p[np.arange(args.batch), y] + 1e-9).mean())
        acc = float((p.argmax(axis=1) == y).mean())

        d_logits = p
        d_logits[np.arange(args.batch), y] -= 1
        d_logits /= args.batch
        g_w2 = h.T @ d_logits
        g_b2 = d_logits.sum(axis=0)
        d_h = (d_logits @ w2.T) * (1 - h * h)
        g_w1 = x.T @ d_h
        g_b1 = d_h.sum(axis=0)
        lr = args.lr * (0.5 * (1 + np.cos(np.pi * step / args.steps)))  # cosine schedule

        t = time.perf_counter()
        gradexp.log({"loss": loss, "acc": acc, "opt": {"lr": lr},
                     "grad": {"w1": g_w1, "b1": g_b1, "w2": g_w2, "b2": g_b2}})
        log_time += time.perf_counter() - t

        for param, grad in ((w1, g_w1), (b1, g_b1), (w2, g_w2), (b2, g_b2)):
            param -= lr * grad  # mutating right after log() is safe: log() took a snapshot

        if step % max(1, args.steps // 5) == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss:.4f}  acc {acc:.3f}  lr {lr:.4f}")
        if step == args.steps // 2 and host is not None:
            time.sleep(1.5)  # history reaches the server within about two seconds of log()
            live = api.run(ref).history(keys=["loss"])
            print(f"  live from the server while training: {live.num_rows} steps so far, "
                  f"last loss {live.column('loss')[-1].as_py():.4f}")

    run.summary["final_acc"] = acc
    t = time.perf_counter()
    gradexp.finish()
    print(f"logged {args.steps} steps x 7 keys; log() took {log_time / args.steps * 1e6:.1f} us per call "
          f"on average; finish() {(time.perf_counter() - t) * 1e3:.0f} ms")

    # Read it back (from the server when there is one, else from the run folder).
    r = api.run(ref)
    hist = r.history()
    print(f"history: {hist.num_rows} rows, columns {hist.column_names}")
    last = hist.slice(hist.num_rows - 1).to_pylist()[0]
    print(f"last step: loss {last['loss']:.4f}, acc {last['acc']:.3f}, "
          f"|grad/w1| {last['grad/w1']['norm']:.4g}")
    step = args.steps // 2
    g = r.tensor("grad/w1", step=step)
    print(f"grad/w1 at step {step}: shape {g.shape}, dtype {g.dtype}, norm {np.linalg.norm(g):.4g}")
    print(f"status {r.status}; summary {r.summary}")

    from gradexp.read import export as _export

    out = run.dir / "history.parquet"
    _export.export_history(r, out)
    print(f"exported history to {out} ({out.stat().st_size / 1e3:.1f} kB); the same as "
          f"`gradexp export {ref} --parquet -o {out.name}`")
    size = sum(p.stat().st_size for p in (run.dir / "parts").iterdir())
    print(f"run folder: {len(list((run.dir / 'parts').iterdir()))} part files, {size / 1e6:.2f} MB")
    print("see it in the explorer (charts, tensors at every step, distributions): run `gradexp ui"
          + ("" if args.dir is None else f" --dir {args.dir}") + "` and open the address it prints")
    if host is not None:
        print(f"run on the server: {host}/{ref} in the explorer, {host}/api/v1/runs/{ref} in the API "
              f"(server data in ./gradexp-server; serve it again with `gradexp server --data-dir "
              f"gradexp-server`, which prints a sign-in address the first time)")


if __name__ == "__main__":
    main()
