"""Shared harness of the benchmark scripts: one subprocess per system, JSON back, Markdown out.

Every ``bench_*.py`` script defines workers (one function per system: gradexp and
each peer) and a ``report`` function that turns their results into Markdown. The
parent process only spawns workers and formats: each worker runs in a fresh
interpreter (``python bench_x.py --worker NAME --result FILE``), so imports,
threads and memory of one system never touch another's numbers. A peer that is not
importable is reported as "not installed"; a worker that fails is reported with the
tail of its stderr. Neither fails the script.

Progress goes to stderr; stdout carries only the Markdown report (``run_all.py``
collects it).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MB = 1e6  # throughput counts raw (uncompressed) bytes, MB = 10^6 bytes
MiB = 1 << 20

NOT_INSTALLED = "not installed"

# Keep peers offline, quiet and local.
PEER_ENV = {
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "WANDB_CONSOLE": "off",
    "WANDB_DISABLE_GIT": "true",
    "WANDB_DISABLE_CODE": "true",
    "WANDB_ERROR_REPORTING": "false",
    "MLFLOW_ENABLE_ASYNC_LOGGING": "false",
    "MLFLOW_TRACKING_URI": "",
    "DO_NOT_TRACK": "1",
}


@dataclass(frozen=True)
class System:
    """One column of a comparison: ``module`` must be importable for the worker to run."""

    name: str
    module: str
    fn: Callable[[argparse.Namespace, Path], dict[str, Any]]
    note: str = ""


def available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def version_of(dist: str) -> str:
    """Installed version of a distribution (``protobuf``, ``tensorboardX``...)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return NOT_INSTALLED


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- worker side -----------------------------------------------------------------------------

def lat_stats(ns: np.ndarray) -> dict[str, float]:
    """p50/p99/mean/max of per-call latencies given in nanoseconds, returned in microseconds."""
    a = np.asarray(ns, dtype=np.float64) / 1e3
    return {"p50_us": float(np.percentile(a, 50)), "p99_us": float(np.percentile(a, 99)),
            "mean_us": float(a.mean()), "max_us": float(a.max()), "n": int(a.size)}


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB  # Linux: KiB


def helper_rss_mb() -> float:
    """Current RSS of this process's descendants (wandb's service, MLflow's helpers), MB."""
    try:
        import psutil
    except ImportError:
        return float("nan")
    total = 0
    for child in psutil.Process().children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:
            pass
    return total / MB


def dir_bytes(path: Path, pattern: str = "**/*") -> int:
    return sum(p.stat().st_size for p in Path(path).glob(pattern) if p.is_file())


def _worker_main(systems: Sequence[System], argv: Sequence[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", required=True)
    ap.add_argument("--result", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tmp", required=True)
    ap.add_argument("--arg", action="append", default=[])
    args = ap.parse_args(argv)
    args.extra = dict(a.split("=", 1) for a in args.arg)
    system = {s.name: s for s in systems}[args.worker]
    tmp = Path(args.tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    out = system.fn(args, tmp)
    Path(args.result).write_text(json.dumps(out))


# -- parent side -----------------------------------------------------------------------------

def run_worker(script: str, system: System, *, quick: bool, timeout: float,
               extra: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one worker in a fresh interpreter; its result dict, or {"status": ...} if none."""
    if not available(system.module):
        return {"status": NOT_INSTALLED}
    tmp = Path(tempfile.mkdtemp(prefix=f"gxbench-{system.name}-"))
    result = tmp / "result.json"
    cmd = [sys.executable, script, "--worker", system.name, "--result", str(result),
           "--tmp", str(tmp / "work")]
    if quick:
        cmd.append("--quick")
    for k, v in (extra or {}).items():
        cmd += ["--arg", f"{k}={v}"]
    env = {**os.environ, **PEER_ENV}
    env = {k: v for k, v in env.items() if not (k == "MLFLOW_TRACKING_URI" and not v)}
    env = {k: v for k, v in env.items() if not k.startswith("GRADEXP_")}
    t0 = time.perf_counter()
    label = system.name + (f" {extra}" if extra else "")
    log(f"  [{label}] running...")
    try:
        proc = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True,
                              text=True, timeout=timeout)
        if proc.returncode != 0 or not result.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            log(f"  [{label}] FAILED (exit {proc.returncode}):\n    " + "\n    ".join(tail))
            return {"status": "failed: " + (tail[-1][:120] if tail else f"exit {proc.returncode}")}
        out = json.loads(result.read_text())
        out.setdefault("status", "ok")
        log(f"  [{label}] done in {time.perf_counter() - t0:.1f} s")
        return out
    except subprocess.TimeoutExpired:
        log(f"  [{label}] TIMED OUT after {timeout:.0f} s")
        return {"status": f"timed out after {timeout:.0f} s"}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def parse_args(description: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--quick", action="store_true", help="short smoke run")
    ap.add_argument("--json", metavar="FILE", help="also write the raw results as JSON")
    ap.add_argument("--only", metavar="NAMES", help="comma-separated systems to run")
    return ap.parse_args(argv)


def main(script: str, title: str, systems: Sequence[System],
         report: Callable[[dict[str, Any], bool], str],
         runs: Callable[[bool], list[tuple[str, str, dict[str, str] | None, float]]] | None = None) -> None:
    """Entry point of a benchmark script (worker or parent, depending on ``--worker``).

    ``runs(quick)`` lists (result name, system name, extra args, timeout s); by default one
    run per system.
    """
    argv = sys.argv[1:]
    if "--worker" in argv:
        _worker_main(systems, argv)
        return
    args = parse_args(title, argv)
    by_name = {s.name: s for s in systems}
    plan = runs(args.quick) if runs else [(s.name, s.name, None, 600.0) for s in systems]
    if args.only:
        keep = set(args.only.split(","))
        plan = [p for p in plan if p[1] in keep or p[0] in keep]
    log(f"{title}{' (quick)' if args.quick else ''}")
    results: dict[str, Any] = {}
    t0 = time.perf_counter()
    for rname, sname, extra, timeout in plan:
        results[rname] = run_worker(script, by_name[sname], quick=args.quick, timeout=timeout,
                                    extra=extra)
    elapsed = time.perf_counter() - t0
    results["_meta"] = {"elapsed_s": elapsed, "quick": args.quick,
                        "versions": {s.module: version_of(s.module) for s in systems}}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print(report(results, args.quick))
    print(f"\n_{Path(script).name}{' --quick' if args.quick else ''}: {elapsed:.0f} s wall._")
    sys.stdout.flush()


# -- formatting ------------------------------------------------------------------------------

def ok(r: dict[str, Any] | None) -> bool:
    return bool(r) and r.get("status") == "ok"


def status(r: dict[str, Any] | None) -> str:
    return (r or {}).get("status", "not run")


def fmt(x: Any, digits: int = 3) -> str:
    """A number with ``digits`` significant digits (no scientific notation for usual ranges)."""
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
        return f"{x:,}"
    x = float(x)
    if x != x:
        return "n/a"
    if x == 0:
        return "0"
    mag = abs(x)
    if mag >= 10 ** digits:
        return f"{x:,.0f}"
    decimals = max(0, digits - 1 - int(np.floor(np.log10(mag))))
    return f"{x:.{decimals}f}"


def ratio(peer: Any, base: Any) -> str:
    try:
        if peer is None or base is None or float(base) == 0:
            return "-"
        r = float(peer) / float(base)
        return f"{r:,.0f}x" if r >= 100 else (f"{r:.1f}x" if r >= 10 else f"{r:.2f}x")
    except (TypeError, ValueError):
        return "-"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines)


def verdict(passed: bool | None) -> str:
    return "-" if passed is None else ("PASS" if passed else "FAIL")


def pool_normal(n_arrays: int, elements: int, scale: float, dtype: Any, seed: int = 0) -> list[np.ndarray]:
    """Distinct N(0, scale) arrays (generated once, outside any timed loop)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_arrays):
        a = rng.standard_normal(elements, dtype=np.float32)
        a *= scale
        out.append(a.astype(dtype) if np.dtype(dtype) != np.float32 else a)
    return out
