"""Run every gradexp benchmark and print one Markdown report.

    pip install -e .[bench]
    python benchmarks/run_all.py            # full suite, ~10-15 min on 2 cores
    python benchmarks/run_all.py --quick    # smoke run, ~2 min
    python benchmarks/run_all.py --out results.md --json-dir benchmarks/results

Each script runs in its own process, and each system (gradexp, wandb, tensorboardX,
MLflow) in a process of its own inside it. Peers that are not installed are reported
as such. The report starts with the machine and the versions measured.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _common as C  # noqa: E402

SCRIPTS = [
    "bench_log_scalars.py",
    "bench_log_tensor.py",
    "bench_ingest.py",
    "bench_startup.py",
    "bench_read_tensor.py",
    "bench_export_history.py",
    "bench_server.py",
    "bench_remote_read.py",
    "bench_watch.py",
]


def _busy_jiffies() -> int:
    """Busy CPU time of the whole machine so far, in clock ticks (from /proc/stat)."""
    try:
        f = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return 0
    user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in f[:8])
    return user + nice + system + irq + softirq + steal


def _children_cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def source_fingerprint() -> str:
    """sha256 of gradexp's sources: gradexp changes under active development, and this
    names the code a report measured."""
    import hashlib

    try:
        import gradexp
    except ImportError:
        return "gradexp not importable"
    pkg = Path(gradexp.__file__).parent
    h = hashlib.sha256()
    newest = 0.0
    for f in sorted(pkg.glob("*.py")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
        newest = max(newest, f.stat().st_mtime)
    when = datetime.datetime.fromtimestamp(newest).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
    return f"sha256 {h.hexdigest()[:16]} over gradexp/*.py (newest file modified {when})"


def machine() -> str:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = "?"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                ram = f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    mods = ["gradexp", "numpy", "pyarrow", "zstandard", "ml_dtypes", "wandb", "tensorboardX", "mlflow",
            "protobuf", "psutil"]
    versions = ", ".join(f"{m} {C.version_of(m)}" for m in mods)
    try:
        import zstandard

        libzstd = ".".join(map(str, zstandard.ZSTD_VERSION))
    except Exception:
        libzstd = "?"
    return "\n".join([
        f"- Date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
        f"- CPU: {os.cpu_count()} logical cores (nproc {len(os.sched_getaffinity(0))}), {cpu}",
        f"- RAM: {ram}",
        f"- OS: {platform.platform()}",
        f"- Python {platform.python_version()} ({platform.python_implementation()})",
        f"- Versions: {versions}; libzstd {libzstd}",
        f"- gradexp source: {source_fingerprint()}",
        f"- Load average at start: {os.getloadavg()[0]:.2f} (1 min)",
    ])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short smoke run of every script")
    ap.add_argument("--out", metavar="FILE", help="also write the Markdown report to FILE")
    ap.add_argument("--json-dir", metavar="DIR", help="write each script's raw results as JSON here")
    ap.add_argument("--only", metavar="SCRIPTS", help="comma-separated script names (e.g. bench_ingest)")
    args = ap.parse_args()
    scripts = SCRIPTS
    if args.only:
        want = {s if s.endswith(".py") else s + ".py" for s in args.only.split(",")}
        scripts = [s for s in SCRIPTS if s in want]
    parts = [f"## gradexp benchmarks{' (--quick)' if args.quick else ''}", "", machine(), ""]
    t0 = time.perf_counter()
    failed = 0
    for script in scripts:
        cmd = [sys.executable, str(HERE / script)]
        if args.quick:
            cmd.append("--quick")
        if args.json_dir:
            Path(args.json_dir).mkdir(parents=True, exist_ok=True)
            cmd += ["--json", str(Path(args.json_dir) / (Path(script).stem + ".json"))]
        C.log(f"== {script}")
        busy0, own0, w0 = _busy_jiffies(), _children_cpu(), time.perf_counter()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        wall = time.perf_counter() - w0
        foreign = (_busy_jiffies() - busy0) / os.sysconf("SC_CLK_TCK") - (_children_cpu() - own0)
        noise = (f"_Other processes on the machine used {max(foreign, 0):.0f} CPU-seconds during "
                 f"this script's {wall:.0f} s ({max(foreign, 0) / wall:.2f} cores on average"
                 f"{'; numbers likely disturbed' if foreign / wall > 0.25 else ''})._")
        C.log(noise)
        if proc.returncode != 0:
            failed += 1
            parts += [f"### {script}", "", f"failed with exit code {proc.returncode}", "", noise, ""]
        else:
            parts += [proc.stdout.strip(), "", noise, ""]
    parts.append(f"_Total: {time.perf_counter() - t0:.0f} s._")
    report = "\n".join(parts) + "\n"
    sys.stdout.write(report)
    if args.out:
        Path(args.out).write_text(report)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
