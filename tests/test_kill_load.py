"""The kill -9 promise under load: everything logged more than ``flush_interval`` before a
``kill -9`` reads back, for any mix of scalars and tensors, with the CPU oversubscribed.

Trainers (default settings: ``flush_interval`` 1 s) run loops of five shapes while two CPU
burners spin and several trainers run at once. Each trainer appends ``step time`` to a side
file with ``os.write`` right after the ``log()`` that committed the step, so the record is
in the kernel before the kill can come. The test kills each at a random moment and reads
the run folder back: every step recorded more than ``flush_interval`` before the kill must
be there with its values and tensors.
"""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import gradexp
from services import CpuBurners, clean_env, same_bits

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX only")

FLUSH = 1.0  # the default flush_interval, which the trainers keep
SHAPES = ("scalars", "small", "big", "uncommitted", "mix")
KILLS_PER_SHAPE = 21
AT_ONCE = 4
"""Trainers running at the same time (with the two burners: 6+ busy processes on 2 cores)."""

# What a trainer logs at a step is a pure function of (shape, step), so the test can check it.
LOOPS = '''
import numpy as np

SCALAR, SMALL, BIG, UNCOMMITTED = 0, 1, 2, 3
MIX = [SCALAR] * 14 + [SMALL] * 4 + [BIG, UNCOMMITTED]
SMALL_SIZES = (16, 300, 4_000, 30_000)  # float32 elements: all below small_tensor_bytes
BIG_ELEMS = 1 << 20  # 4 MiB of float32
_big_pool = []


def kinds(shape, steps):
    """The kind of row each of ``steps`` (an int array) is in loop ``shape``."""
    if shape == "mix":
        return np.asarray(MIX)[(steps * 7919) % len(MIX)]
    fixed = {"scalars": SCALAR, "small": SMALL, "big": BIG, "uncommitted": UNCOMMITTED}[shape]
    return np.full(len(steps), fixed)


def kind_of(shape, step):
    return MIX[(step * 7919) % len(MIX)] if shape == "mix" else int(kinds(shape, np.array([step]))[0])


def small(step, j):
    return np.full(SMALL_SIZES[j % 4], step + j, np.float32)


def big(step):
    if not _big_pool:
        _big_pool.extend(np.random.default_rng(k).standard_normal(BIG_ELEMS, np.float32) * np.float32(1e-3)
                         for k in range(4))
    a = _big_pool[step % 4].copy()
    a[0] = step
    return a


def calls(kind, step):
    """The (data, commit) of the log() calls that make up the row of ``step``."""
    base = {"loss": step * 0.25 + 1 / 3, "i": step}
    if kind == SCALAR:
        return [({**base, **{f"a{j}": step + j / 8 for j in range(8)}}, True)]
    if kind == SMALL:
        return [({**base, **{f"t{j}": small(step, j) for j in range(8)}}, True)]
    if kind == BIG:
        return [({**base, "g": big(step)}, True)]
    return [({"loss": base["loss"]}, False), ({"t0": small(step, 0)}, False),
            ({"i": step, "u": 2 * step}, True)]
'''
_ns: dict = {}
exec(LOOPS, _ns)
kinds, small, big = _ns["kinds"], _ns["small"], _ns["big"]
big(0)  # the pool, made once here: the checks run in several threads
SCALAR, SMALL, BIG, UNCOMMITTED = _ns["SCALAR"], _ns["SMALL"], _ns["BIG"], _ns["UNCOMMITTED"]

TRAINER = LOOPS + textwrap.dedent('''
    import os, sys, time
    import gradexp

    shape, root, marks = sys.argv[1], sys.argv[2], sys.argv[3]
    run = gradexp.init("p", id="r", dir=root, mode="offline")
    fd = os.open(marks, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    if shape in ("big", "mix"):
        big(0)  # the pool of random tensors, made before the first row
    deadline = time.monotonic() + 120  # the test kills us long before
    step = 0
    while time.monotonic() < deadline:
        kind = kind_of(shape, step)
        for data, commit in calls(kind, step):
            run.log(data, commit=commit)
        if kind != SCALAR or not step & 15:  # tight scalar loops: every 16th step is enough
            os.write(fd, b"%d %.6f\\n" % (step, time.time()))
        step += 1
''')


def read_marks(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(steps, times) the trainer recorded; a line torn by the kill is left out."""
    text = path.read_bytes().decode()
    lines = text.split("\n")[:-1]  # the last piece has no newline: torn (or empty)
    pairs = [line.split() for line in lines]
    return (np.array([int(s) for s, _ in pairs], dtype=np.int64),
            np.array([float(t) for _, t in pairs], dtype=np.float64))


def missing_steps(stored, shape: str, due: int) -> dict[str, np.ndarray]:
    """Per what is checked, the steps <= ``due`` that should be there and are not (or are wrong)."""
    steps = np.arange(due + 1)
    kind = kinds(shape, steps)
    out: dict[str, np.ndarray] = {}
    table = stored.history()
    got = np.asarray(table.column("step").to_numpy(zero_copy_only=False), dtype=np.int64)
    have = np.isin(steps, got)
    out["history"] = steps[~have]
    if have.all():
        rows = table.slice(0, due + 1)
        assert rows.column("step").to_pylist() == steps.tolist()  # one row per step, in order
        loss = rows.column("loss").to_numpy(zero_copy_only=False)
        assert (loss == steps * 0.25 + 1 / 3).all(), "a row has the wrong loss"
        if (kind == UNCOMMITTED).any():  # the three commit=False/True calls merged into one row
            u = np.asarray(rows.column("u").to_pylist(), dtype=object)
            assert (u[kind == UNCOMMITTED] == 2 * steps[kind == UNCOMMITTED]).all()
    expect = {"g": steps[kind == BIG], "t0": steps[(kind == SMALL) | (kind == UNCOMMITTED)]}
    expect.update({f"t{j}": steps[kind == SMALL] for j in range(1, 8)})
    for key, want in expect.items():
        if len(want):
            out[key] = np.setdiff1d(want, np.asarray(stored.steps(key), dtype=np.int64) if
                                    key in stored.tensor_keys() else np.empty(0, np.int64))
            if not len(out[key]):  # spot-check the bits of the last one due
                s = int(want[-1])
                expected = big(s) if key == "g" else small(s, int(key[1:]))
                assert same_bits(stored.tensor(key, s), expected), (key, s)
    return {k: v for k, v in out.items() if len(v)}


def kill_one(tmp: Path, shape: str, i: int, delay: float) -> dict:
    """Run a trainer of loop ``shape``, kill -9 it ``delay`` s after its first row, and report
    what was due (logged more than FLUSH before the kill) and what of it is missing."""
    root = tmp / f"{shape}-{i}"
    root.mkdir()
    marks = root / "marks"
    marks.touch()
    proc = subprocess.Popen([sys.executable, "-c", TRAINER, shape, str(root), str(marks)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=clean_env(), cwd=root)
    try:
        deadline = time.monotonic() + 90
        while marks.stat().st_size == 0:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, f"{shape}: no row logged within 90 s"
            time.sleep(0.02)
        time.sleep(delay)
        killed_at = time.time()
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = proc.stderr.read().decode()
    assert proc.returncode == -signal.SIGKILL, stderr
    steps, times = read_marks(marks)
    due_mask = times <= killed_at - FLUSH
    out = {"shape": shape, "i": i, "delay": delay, "logged": int(steps[-1]) if len(steps) else -1,
           "due": int(steps[due_mask].max()) if due_mask.any() else -1, "missing": {}, "oldest_s": 0.0}
    if out["due"] >= 0:
        stored = gradexp.Api().run(root / "p" / "r")
        assert stored.damage == [], stored.damage  # a torn tail of an open part is not damage
        missing = missing_steps(stored, shape, out["due"])
        if missing:
            first = min(int(v.min()) for v in missing.values())
            # It was logged before the first record of a step at or after it.
            out["oldest_s"] = killed_at - float(times[np.searchsorted(steps, first)])
            out["missing"] = {k: len(v) for k, v in missing.items()}
    _remove(root)
    return out


def _remove(root: Path) -> None:
    """Delete a killed trainer's folder. Its sender process outlives it by design (it records how
    the trainer ended and writes the last console lines and system sample), so files can appear
    while the tree is removed: retry until the sender is done."""
    deadline = time.monotonic() + 60
    while True:
        try:
            shutil.rmtree(root)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.fixture(scope="module")
def burners():
    b = CpuBurners(2)
    yield b
    b.stop()


def test_kill_9_under_load_keeps_everything_logged_a_flush_interval_before(tmp_path, burners):
    rng = random.Random(9)
    jobs = [(shape, i, rng.uniform(1.2, 3.5)) for i in range(KILLS_PER_SHAPE) for shape in SHAPES]
    with ThreadPoolExecutor(AT_ONCE) as pool:
        results = list(pool.map(lambda job: kill_one(tmp_path, *job), jobs))
    checked = [r for r in results if r["due"] >= 0]
    lost = [r for r in checked if r["missing"]]
    assert len(checked) >= 0.9 * len(jobs), "too few kills came late enough to check anything"
    summary = (f"{len(lost)} of {len(checked)} kills lost rows logged more than {FLUSH} s before "
               f"the kill; the oldest was logged {max((r['oldest_s'] for r in lost), default=0):.2f} s "
               "before it:\n" + "\n".join(f"  {r}" for r in lost))
    print(summary)
    assert not lost, summary
