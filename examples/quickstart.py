"""A small but real training loop in NumPy, logged with gradexp, then read back and exported.

Trains a two-layer MLP on a synthetic two-spirals problem with plain SGD, logging
loss, accuracy, the learning rate and the gradient tensors of both layers every
step. Then it reads the run back (history as Arrow, gradients as NumPy, bit-exact)
and exports the history to Parquet.

    python examples/quickstart.py [--steps 1000] [--dir gradexp-runs]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import gradexp


def spirals(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    t = np.sqrt(rng.uniform(0.05, 1, n)) * 3 * np.pi
    label = rng.integers(0, 2, n)
    sign = np.where(label == 1, 1.0, -1.0)
    x = np.stack([sign * t * np.cos(t), sign * t * np.sin(t)], axis=1) / 10
    return (x + rng.normal(0, 0.02, x.shape)).astype(np.float32), label


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.5)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--dir", default=None, help="runs folder (default: $GRADEXP_DIR or ./gradexp-runs)")
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    x_all, y_all = spirals(8192, rng)
    w1 = (rng.standard_normal((2, args.hidden)) * 1.0).astype(np.float32)
    b1 = np.zeros(args.hidden, np.float32)
    w2 = (rng.standard_normal((args.hidden, 2)) / np.sqrt(args.hidden)).astype(np.float32)
    b2 = np.zeros(2, np.float32)

    t0 = time.perf_counter()
    run = gradexp.init("quickstart", config=args, dir=args.dir, tags=["numpy", "mlp"])
    print(f"gradexp.init: run {run.project}/{run.id} in {run.dir} ({(time.perf_counter() - t0) * 1e3:.1f} ms)")

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

    run.summary["final_acc"] = acc
    t = time.perf_counter()
    gradexp.finish()
    print(f"logged {args.steps} steps x 7 keys; log() took {log_time / args.steps * 1e6:.1f} us per call "
          f"on average; finish() {(time.perf_counter() - t) * 1e3:.0f} ms")

    # Read it back.
    r = gradexp.Api().run(run.dir)
    hist = r.history()
    print(f"history: {hist.num_rows} rows, columns {hist.column_names}")
    last = hist.slice(hist.num_rows - 1).to_pylist()[0]
    print(f"last step: loss {last['loss']:.4f}, acc {last['acc']:.3f}, "
          f"|grad/w1| {last['grad/w1']['norm']:.4g}")
    step = args.steps // 2
    g = r.tensor("grad/w1", step=step)
    print(f"grad/w1 at step {step}: shape {g.shape}, dtype {g.dtype}, norm {np.linalg.norm(g):.4g}")
    print(f"status {r.status}; summary {r.summary}")

    from gradexp import _export

    out = run.dir / "history.parquet"
    _export.export_history(r, out)
    print(f"exported history to {out} ({out.stat().st_size / 1e3:.1f} kB); the same as "
          f"`gradexp export {run.project}/{run.id} --parquet -o {out.name}`")
    size = sum(p.stat().st_size for p in (run.dir / "parts").iterdir())
    print(f"run folder: {len(list((run.dir / 'parts').iterdir()))} part files, {size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
