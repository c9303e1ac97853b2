"""Reading a run from a server against reading its folder: ``tensors()`` and ``export --tensors``.

One run (300 steps of ``grad``, 262,144 float32 = 1 MiB a step, N(0, 1e-3), and of
``w``, 64 float32: many steps to a frame) is written offline, then uploaded with
``gradexp sync`` to an embedded server (``gradexp server``: SQLite + a local folder,
uvicorn) on loopback. Timed, alternately local and remote, ``--repeat`` times (median):

1. ``tensors("grad")`` over all 300 steps: ``Api().run(folder)`` against
   ``Api(host=...).run("local/bench/r")``, in one process, after one untimed read of each
   (the page cache, the server's first requests), every array checked bit-exact against
   the local read (outside the timer);
2. ``gradexp export REF --tensors`` of the same run, as a user runs it (a fresh process,
   wall time).

``--before PATH`` measures the code at PATH too (e.g. ``git archive main | tar -x -C
/tmp/old``: its server, its client and its CLI), in the same invocation, so before and
after come from one run of the script. Target (issue #10): remote within 2x of local.

    python benchmarks/bench_remote_read.py [--quick] [--before /tmp/old] [--repeat 5]

Prints a Markdown report on stdout, progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _common as C  # noqa: E402

STEPS = 300
ELEMENTS = 1 << 18
TARGET = 2.0

MEASURE_SRC = r'''
import json, sys, time
import numpy as np
import gradexp

folder, url, key, ref, repeat = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
want = {s: a for s, a in gradexp.Api(dir=folder).run(folder).tensors("grad")}
out = {"local": [], "remote": []}
list(gradexp.Api(host=url, api_key=key).run(ref).tensors("grad"))  # warm up the server (untimed)
for _ in range(repeat):
    for where in ("local", "remote"):
        t = time.perf_counter()
        r = gradexp.Api(dir=folder).run(folder) if where == "local" else gradexp.Api(host=url, api_key=key).run(ref)
        got = list(r.tensors("grad"))
        out[where].append(time.perf_counter() - t)
        assert [s for s, _ in got] == sorted(want), where
        for s, a in got:
            assert a.dtype == want[s].dtype and a.tobytes() == want[s].tobytes(), (where, s)
print(json.dumps(out))
'''


def env_for(code: Path, root: Path) -> dict[str, str]:
    """The code at ``code`` first on the path, no GRADEXP_* settings, no stored login."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRADEXP_")}
    env.update(PYTHONPATH=str(code), NO_PROXY="127.0.0.1", no_proxy="127.0.0.1",
               GRADEXP_CONFIG_DIR=str(root / "config"))
    return env


class Server:
    """``gradexp server --data-dir`` of the code at ``code``, on a free loopback port."""

    def __init__(self, code: Path, root: Path) -> None:
        import requests

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data = root / "server"
        self.proc = subprocess.Popen([sys.executable, "-m", "gradexp", "server", "--port", str(self.port),
                                      "--data-dir", str(self.data)], env=env_for(code, root),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_run(root: Path, steps: int) -> Path:
    """The run, written offline with this checkout's code (the format is the same before and after)."""
    import numpy as np

    import gradexp

    pool = C.pool_normal(8, ELEMENTS, 1e-3, np.float32)
    rng = np.random.default_rng(1)
    with gradexp.init("bench", id="r", dir=root / "runs", mode="offline") as run:
        for i in range(steps):
            run.log({"grad": pool[i % len(pool)] + np.float32(i * 1e-7),
                     "w": rng.standard_normal(64).astype(np.float32), "loss": 1.0 / (i + 1)})
    return Path(run.dir)


def check(cmd: list[str], env: dict[str, str], cwd: Path) -> float:
    t = time.perf_counter()
    r = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[2:4])} failed: {r.stderr.strip().splitlines()[-3:]}")
    return time.perf_counter() - t


def measure(code: Path, run_dir: Path, root: Path, repeat: int) -> dict[str, Any]:
    """Both measurements with the code at ``code``: its server, its reader, its CLI."""
    env = env_for(code, root)
    server = Server(code, root)
    try:
        check([sys.executable, "-m", "gradexp", "sync", str(run_dir), "--host", server.url, "--api-key", server.key],
              env, root)
        ref = "local/bench/r"
        C.log(f"  [{code}] tensors() x {repeat}...")
        r = subprocess.run([sys.executable, "-c", MEASURE_SRC, str(run_dir), server.url, server.key, ref,
                            str(repeat)], env=env, cwd=root, capture_output=True, text=True, timeout=3600)
        if r.returncode != 0:
            raise RuntimeError(f"tensors() failed: {r.stderr.strip().splitlines()[-3:]}")
        iterate = json.loads(r.stdout)
        C.log(f"  [{code}] export --tensors x {repeat}...")
        export: dict[str, list[float]] = {"local": [], "remote": []}
        for i in range(repeat):
            for where, target in (("local", str(run_dir)), ("remote", ref)):
                out = root / f"{where}-{i}.parquet"
                extra = ["--host", server.url, "--api-key", server.key] if where == "remote" else []
                export[where].append(check([sys.executable, "-m", "gradexp", "export", target, "--tensors",
                                            "-o", str(out), *extra], env, root))
                shutil.rmtree(out.with_name(out.stem + ".tensors"), ignore_errors=True)
                out.unlink(missing_ok=True)
    finally:
        server.stop()
    med = {f"{what}_{where}_s": statistics.median(times[where])
           for what, times in (("tensors", iterate), ("export", export)) for where in ("local", "remote")}
    return {**med, "raw": {"tensors": iterate, "export": export}}


def report(res: dict[str, Any], steps: int, repeat: int) -> str:
    lines = ["### Remote reads against local reads", "",
             f"One run: {steps} steps of `grad` ({ELEMENTS:,} float32 = 1 MiB) and of `w` (64 float32), "
             f"read from its folder and from an embedded server on loopback; medians of {repeat}, "
             "local and remote alternating.", ""]
    rows = []
    for name in ("before", "after"):
        m = res.get(name)
        if not m:
            continue
        for what, label in (("tensors", f"`tensors(\"grad\")`, {steps} steps"),
                            ("export", "`gradexp export --tensors` (wall, fresh process)")):
            local, remote = m[f"{what}_local_s"], m[f"{what}_remote_s"]
            rows.append([name, label, C.fmt(local), C.fmt(remote), C.ratio(remote, local),
                         C.verdict(remote <= TARGET * local) if name == "after" else ""])
    lines.append(C.table(["code", "read", "local s", "remote s", "remote/local", f"within {TARGET:g}x"], rows))
    if "before" in res and "after" in res:
        b, a = res["before"], res["after"]
        lines += ["", "Remote, before/after: " + ", ".join(
            f"{what} {C.fmt(b[f'{what}_remote_s'])} -> {C.fmt(a[f'{what}_remote_s'])} s "
            f"({C.ratio(b[f'{what}_remote_s'], a[f'{what}_remote_s'])} faster)" for what in ("tensors", "export")) + "."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="60 steps, 2 repeats")
    ap.add_argument("--before", type=Path, default=None, help="the code to compare with (a source tree)")
    ap.add_argument("--repeat", type=int, default=None)
    ap.add_argument("--json", metavar="FILE", help="also write the raw results as JSON")
    args = ap.parse_args()
    steps = 60 if args.quick else STEPS
    repeat = args.repeat or (2 if args.quick else 5)
    root = Path(tempfile.mkdtemp(prefix="gxbench-remote-"))
    t0 = time.perf_counter()
    try:
        run_dir = write_run(root, steps)
        res: dict[str, Any] = {}
        variants = ([("before", args.before.resolve())] if args.before else []) + [("after", HERE.parent)]
        for name, code in variants:
            C.log(f"{name}: {code}")
            work = root / name
            work.mkdir()
            res[name] = measure(code, run_dir, work, repeat)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    print(report(res, steps, repeat))
    print(f"\n_bench_remote_read.py{' --quick' if args.quick else ''}: {time.perf_counter() - t0:.0f} s wall._")


if __name__ == "__main__":
    main()
