"""What a run records of where it came from and how it went (issue #13): the console at the
file-descriptor level, the code's git state and packages, system metrics from the sender
process, and how the process ended. Every trainer is a real process, as a user runs one.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import gradexp
from services import GradexpServer, clean_env, wait_for

REPO = Path(__file__).resolve().parents[1]


def env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return clean_env(PYTHONPATH=extra.pop("PYTHONPATH", path), **extra)


def trainer(tmp_path: Path, body: str, *, name: str = "train.py", cwd: Path | None = None,
            **extra: str) -> subprocess.Popen:
    """``body`` as a script file run by a fresh interpreter; stdout and stderr into one pipe
    (as a terminal shows them), returned unread."""
    script = (cwd or tmp_path) / name
    script.write_text(textwrap.dedent(body))
    return subprocess.Popen([sys.executable, str(script)], cwd=cwd or tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=env(GRADEXP_DIR=str(tmp_path / "runs"), **extra))


def finished(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out.decode("utf-8", errors="replace")


# -- console --------------------------------------------------------------------------------------------

def test_console_holds_print_direct_writes_children_progress_bars_and_the_traceback_once_in_order(tmp_path):
    proc = trainer(tmp_path, """
        import os, subprocess, sys
        import gradexp
        from tqdm import tqdm

        run = gradexp.init("p", id="r", system_metrics=False)
        print("one: print")
        os.write(1, b"two: os.write\\n")
        subprocess.run([sys.executable, "-c", "print('three: a child process')"], check=True)
        for i in tqdm(range(300), desc="four", mininterval=0, ascii=True):
            pass
        sys.stderr.write("five: stderr\\n")
        raise ValueError("six: the error")
    """)
    code, terminal = finished(proc)
    assert code == 1, terminal
    run = gradexp.Api(dir=tmp_path / "runs").run("p/r")
    lines = run.console()
    texts = [x.text for x in lines]
    assert texts[:3] == ["one: print", "two: os.write", "three: a child process"], texts
    bar = texts[3]
    assert bar.startswith("four: 100%") and "300/300" in bar, texts  # 300 redraws, one line: the last
    assert "\r" not in bar
    assert texts[4] == "five: stderr"
    assert texts[5] == "Traceback (most recent call last):"
    assert texts[-1] == "ValueError: six: the error"
    assert sum("four:" in t for t in texts) == 1
    assert [x.line for x in lines] == list(range(len(lines)))
    assert all(x.stream == "output" for x in lines)  # one pipe for both: their exact order
    assert [x.time for x in lines] == sorted(x.time for x in lines)
    # tee'd: the terminal still shows every line, in the same order
    shown = [ln.rpartition("\r")[2] for ln in terminal.splitlines()]
    assert [t for t in shown if t in texts] == [t for t in texts if t in shown]
    assert "one: print" in shown and "ValueError: six: the error" in shown

    meta = run.meta
    assert meta["status"] == "failed" and meta["exit_code"] == 1
    assert meta["exception"]["type"] == "ValueError" and meta["exception"]["message"] == "six: the error"
    assert meta["exception"]["traceback"].endswith("ValueError: six: the error\n")
    assert 'raise ValueError("six: the error")' in meta["exception"]["traceback"]
    assert meta["finished_at"] >= meta["created_at"]


def test_stdout_and_stderr_to_different_places_stay_apart(tmp_path):
    script = tmp_path / "t.py"
    script.write_text("import sys, gradexp\ngradexp.init('p', id='r')\nprint('to out')\n"
                      "print('to err', file=sys.stderr)\ngradexp.finish()\n")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                       env=env(GRADEXP_DIR=str(tmp_path / "runs")))
    assert r.returncode == 0, r.stderr
    assert r.stdout == "to out\n" and r.stderr == "to err\n"
    lines = gradexp.Api(dir=tmp_path / "runs").run("p/r").console()
    assert {(x.stream, x.text) for x in lines} == {("stdout", "to out"), ("stderr", "to err")}


def test_a_second_run_in_the_process_gets_its_own_console_and_finish_restores_the_hooks(tmp_path):
    proc = trainer(tmp_path, """
        import sys
        import gradexp

        before = (sys.excepthook, sys.exit)
        a = gradexp.init("p", id="a")
        print("for a")
        assert sys.excepthook is not before[0]
        a.finish()
        assert (sys.excepthook, sys.exit) == before, "finish() must put the hooks back"
        print("between runs")
        b = gradexp.init("p", id="b")
        print("for b")
        b.finish()
        print("after both")
    """)
    code, terminal = finished(proc)
    assert code == 0, terminal
    assert terminal.splitlines() == ["for a", "between runs", "for b", "after both"]
    api = gradexp.Api(dir=tmp_path / "runs")
    assert [x.text for x in api.run("p/a").console()] == ["for a"]
    assert [x.text for x in api.run("p/b").console()] == ["for b"]


def test_kill_9_keeps_the_console_and_the_signal_is_recorded(tmp_path):
    proc = trainer(tmp_path, """
        import time
        import gradexp

        run = gradexp.init("p", id="r", system_metrics=False, code=False)
        for i in range(200):
            print(f"line {i}")
        print("ready", flush=True)
        time.sleep(120)
    """)
    assert proc.stdout is not None
    seen = []
    while not seen or seen[-1] != b"ready\n":
        seen.append(proc.stdout.readline())
        assert seen[-1], "the trainer ended before it was ready"
    proc.send_signal(signal.SIGKILL)
    # Not reaped yet (as a shell would at once): the sender reads how it ended from the kernel.
    run_json = tmp_path / "runs" / "p" / "r" / "run.json"
    wait_for(lambda: json.loads(run_json.read_text())["status"] == "crashed", "run marked crashed", timeout=60)
    proc.wait(30)
    proc.stdout.read()
    run = gradexp.Api(dir=tmp_path / "runs").run("p/r")
    assert [x.text for x in run.console()] == [f"line {i}" for i in range(200)] + ["ready"]
    assert run.status == "crashed"
    assert run.meta["signal"] == signal.SIGKILL and run.meta["signal_name"] == "SIGKILL"
    assert run.meta["finished_at"] >= run.meta["created_at"]


SLEEPER = """
    import signal, sys, time
    import gradexp

    run = gradexp.init("p", id="r", system_metrics=False, code=False)
    if "--own-handler" in sys.argv:
        signal.signal(signal.SIGTERM, lambda *a: print("handled", flush=True))
    print("ready", flush=True)
    def waiting_here():
        time.sleep(float(sys.argv[1]))
    waiting_here()
    if "--crash" in sys.argv:
        import ctypes
        ctypes.string_at(0)
    run.finish()
"""


def sleeper(tmp_path: Path, *args: str) -> subprocess.Popen:
    (tmp_path / "sleeper.py").write_text(textwrap.dedent(SLEEPER))
    proc = subprocess.Popen([sys.executable, str(tmp_path / "sleeper.py"), *args], cwd=tmp_path,
                            stdout=subprocess.PIPE, text=True, env=env(GRADEXP_DIR=str(tmp_path / "runs")))
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    return proc


def test_sigterm_is_recorded_with_every_threads_stack_even_when_reaped_at_once(tmp_path):
    proc = sleeper(tmp_path, "120")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == -signal.SIGTERM  # still dies of it, reaped at once as a shell would
    run_json = tmp_path / "runs" / "p" / "r" / "run.json"
    wait_for(lambda: json.loads(run_json.read_text())["status"] == "crashed", "run marked crashed", timeout=60)
    meta = gradexp.Api(dir=tmp_path / "runs").run("p/r").meta
    assert meta["signal"] == signal.SIGTERM and meta["signal_name"] == "SIGTERM"
    assert "in waiting_here" in meta["stack"] and "sleeper.py" in meta["stack"]


def test_a_segfault_is_recorded(tmp_path):
    proc = sleeper(tmp_path, "0", "--crash")
    assert proc.wait(60) == -signal.SIGSEGV
    run_json = tmp_path / "runs" / "p" / "r" / "run.json"
    wait_for(lambda: json.loads(run_json.read_text())["status"] == "crashed", "run marked crashed", timeout=60)
    meta = gradexp.Api(dir=tmp_path / "runs").run("p/r").meta
    assert meta["signal_name"] == "SIGSEGV" and meta["signal"] == signal.SIGSEGV
    assert "Segmentation fault" in meta["stack"] and "sleeper.py" in meta["stack"]


def test_a_programs_own_signal_handler_is_left_alone(tmp_path):
    proc = sleeper(tmp_path, "3", "--own-handler")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and out == "handled\n"
    meta = gradexp.Api(dir=tmp_path / "runs").run("p/r").meta
    assert meta["status"] == "finished" and "signal" not in meta


# -- the sender process: spawned in init() without subprocess, not waited for after finish() --------------

def test_output_written_right_after_init_by_a_process_that_dies_at_once_is_shown_and_recorded(tmp_path):
    proc = trainer(tmp_path, """
        import os, signal
        import gradexp

        gradexp.init("p", id="r", system_metrics=False, code=False)
        os.write(1, b"last words\\n")
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    code, terminal = finished(proc)
    assert code == -signal.SIGKILL
    assert terminal == "last words\n"  # the sender held the pipe before init() returned
    run_json = tmp_path / "runs" / "p" / "r" / "run.json"
    wait_for(lambda: json.loads(run_json.read_text())["status"] == "crashed", "run marked crashed", timeout=60)
    assert [x.text for x in gradexp.Api(dir=tmp_path / "runs").run("p/r").console()] == ["last words"]


def test_a_trainer_that_dies_inside_init_before_the_senders_start_up_still_has_its_output_shown(tmp_path):
    # The sender's interpreter waits on a gate that init() opens as it returns; a trainer
    # killed before that (here: while its writer starts) must not leave it waiting.
    proc = trainer(tmp_path, """
        import os, signal
        import gradexp
        from gradexp.write import writer

        def dies(*args, **kwargs):
            os.write(1, b"last words\\n")
            os.kill(os.getpid(), signal.SIGKILL)

        writer.Writer.__init__ = dies
        gradexp.init("p", id="r", system_metrics=False, code=False)
    """)
    code, terminal = finished(proc)
    assert code == -signal.SIGKILL
    assert terminal == "last words\n"
    run_json = tmp_path / "runs" / "p" / "r" / "run.json"
    wait_for(lambda: json.loads(run_json.read_text())["status"] == "crashed", "run marked crashed", timeout=60)
    assert [x.text for x in gradexp.Api(dir=tmp_path / "runs").run("p/r").console()] == ["last words"]


def test_a_process_forked_before_the_senders_start_up_does_not_hold_it_back(tmp_path):
    # A child forked inside init() (as a data loader's workers may be, right after it)
    # inherits the gate; the sender must start all the same, not once that child exits.
    proc = trainer(tmp_path, """
        import os, signal, time
        import gradexp
        from gradexp.write import writer

        start = writer.Writer.__init__
        forked = []

        def forks_first(self, *args, **kwargs):
            pid = os.fork()
            if pid == 0:  # keeps every descriptor but the terminal's, as a worker would
                os.close(1)
                os.close(2)
                time.sleep(120)
                os._exit(0)
            forked.append(pid)
            start(self, *args, **kwargs)

        writer.Writer.__init__ = forks_first
        run = gradexp.init("p", id="r", system_metrics=False, code=False)
        t = time.monotonic()
        print("hello", flush=True)
        run.finish()
        os.kill(forked[0], signal.SIGKILL)
        os.waitpid(forked[0], 0)
        print(f"finish took {time.monotonic() - t:.0f} s", file=os.fdopen(os.dup(1), "w"))
    """)
    code, terminal = finished(proc)
    lines = terminal.splitlines()
    assert code == 0 and lines[0] == "hello", terminal
    assert float(lines[1].split()[2]) < 30, terminal  # the forked child lives 120 s
    assert [x.text for x in gradexp.Api(dir=tmp_path / "runs").run("p/r").console()] == ["hello"]


def test_the_sender_waits_for_its_gate_and_starts_ungated_when_no_descriptor_is_left_for_it(tmp_path):
    # The shell that holds the gate can only redirect descriptors 3-9; with all of them
    # handed to the sender, it must still start (at once), not fail init().
    proc = trainer(tmp_path, """
        import os, select, sys
        from gradexp.write.sender_process import _spawn

        while (fd := os.open(os.devnull, os.O_RDONLY)) < 10:  # 3-9 all open here
            pass
        os.close(fd)
        LIST = "import os; print(sorted(int(f) for f in os.listdir('/proc/self/fd')), flush=True)"

        def start(passed):
            out_r, out_w = os.pipe()
            gate_r, gate_w = os.pipe()
            pid = _spawn([sys.executable, "-c", LIST], dict(os.environ), stdin=0, stdout=out_w, stderr=2,
                         pass_fds=passed, gate=gate_r)
            os.close(out_w)
            os.close(gate_r)
            early = bool(select.select([out_r], [], [], 3.0)[0])
            try:
                os.write(gate_w, b"\\n")
            except BrokenPipeError:  # ungated: nobody holds the gate
                pass
            os.close(gate_w)
            fds = os.read(out_r, 4096).decode().strip()
            os.waitpid(pid, 0)
            return early, fds

        print("gated:", *start([3, 4, 6, 7, 8, 9]))  # 5 left for the gate
        print("ungated:", *start(list(range(3, 10))))
    """)
    code, terminal = finished(proc)
    assert code == 0, terminal
    gated, ungated = terminal.splitlines()
    # the gated one ran only once the gate opened, and holds what it was handed, not the gate
    # (5 is the listing's own descriptor: with the gate leaked, that would be 10)
    assert gated == "gated: False [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]", gated
    assert ungated == "ungated: True [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]", ungated


def test_init_spawns_the_sender_without_importing_subprocess(tmp_path):
    # subprocess (with locale and signal's enums) cost init() tens of ms on a busy machine
    proc = trainer(tmp_path, """
        import sys
        import gradexp

        run = gradexp.init("p", id="r")
        loaded = "subprocess" in sys.modules
        run.finish()
        print("subprocess imported:", loaded)
    """)
    code, terminal = finished(proc)
    assert code == 0 and terminal == "subprocess imported: False\n", terminal


def test_the_sender_holds_none_of_the_trainers_descriptors_but_the_ones_handed_to_it(tmp_path):
    proc = trainer(tmp_path, """
        import os
        import gradexp

        r, w = os.pipe()
        os.set_inheritable(w, True)  # the program's own, inheritable (as from a launcher)
        run = gradexp.init("p", id="r", system_metrics=False, code=False)
        pid = run._sender.proc.pid
        held = set()
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                held.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
            except OSError:  # closed meanwhile
                pass
        console = {os.readlink(f"/proc/self/fd/{c.read}") for c in run._sender._capture.channels}
        print("holds the program's pipe:", os.readlink(f"/proc/self/fd/{w}") in held)
        print("holds the console pipe:", console <= held)
        print("console pipe inheritable here:", any(os.get_inheritable(c.read) for c in run._sender._capture.channels))
        run.finish()
    """)
    code, terminal = finished(proc)
    assert code == 0, terminal
    assert terminal.splitlines() == ["holds the program's pipe: False", "holds the console pipe: True",
                                     "console pipe inheritable here: False"]


def test_a_sender_that_outlives_finish_is_reaped_once_it_exits(tmp_path):
    # finish() does not wait for the sender process to exit (only for it to have recorded and
    # finished the run); one that stays on, showing a child's output, must not be left a zombie
    # in a process that goes on (a notebook running one run after another).
    go = tmp_path / "go"
    proc = trainer(tmp_path, f"""
        import os, subprocess, sys, time
        import gradexp

        run = gradexp.init("p", id="r", system_metrics=False, code=False)
        child = subprocess.Popen([sys.executable, "-c", "import os, time\\n"
                                  "while not os.path.exists({str(go)!r}): time.sleep(0.05)"])
        pid = run._sender.proc.pid
        run.finish()
        open({str(go)!r}, "w").close()  # the child, and with it the sender, may end now
        child.wait()
        deadline = time.monotonic() + 60
        state = "?"
        while time.monotonic() < deadline:
            try:
                with open(f"/proc/{{pid}}/stat") as f:
                    state = f.read().rpartition(")")[2].split()[0]
            except FileNotFoundError:
                state = "reaped"
                break
            time.sleep(0.05)
        print("sender:", state)
    """)
    code, terminal = finished(proc)
    assert code == 0 and terminal == "sender: reaped\n", terminal
    assert gradexp.Api(dir=tmp_path / "runs").run("p/r").status == "finished"


def test_a_run_that_finishes_at_once_has_its_console_a_system_sample_and_provenance(tmp_path):
    # finish() of a run shorter than the sender's start-up waits for all three
    proc = trainer(tmp_path, """
        import gradexp

        run = gradexp.init("p", id="r")
        print("the only line")
        run.finish()
    """)
    code, terminal = finished(proc)
    assert code == 0 and terminal == "the only line\n", terminal
    run = gradexp.Api(dir=tmp_path / "runs").run("p/r")
    assert [x.text for x in run.console()] == ["the only line"]
    assert run.system().num_rows >= 1
    assert run.provenance["packages"]["numpy"] == np.__version__
    assert run.provenance["program"]["path"] == str(tmp_path / "train.py")


def test_packages_are_what_importlib_metadata_reads(tmp_path):
    from importlib import metadata

    from gradexp.core.provenance import distributions

    site = tmp_path / "site"
    wheel = site / "fake_pkg-1.2.3.dist-info"
    wheel.mkdir(parents=True)
    (wheel / "METADATA").write_text("Metadata-Version: 2.1\nName: Fake-Pkg\nVersion: 1.2.3\nSummary: s\n\n"
                                    "Name: not-the-name\nVersion: 9.9\n")  # the description
    egg = site / "old_egg.egg-info"
    egg.mkdir()
    (egg / "PKG-INFO").write_text("Metadata-Version: 1.0\nVersion: 0.1\nName: old-egg\n\nlong\n")
    path = [str(site), *sys.path]
    expected: dict[str, str] = {}
    for dist in metadata.distributions(path=path):
        name = dist.metadata["Name"]
        if name and name not in expected:
            expected[name] = dist.version
    got = distributions(path)
    assert got["Fake-Pkg"] == "1.2.3" and got["old-egg"] == "0.1"
    assert got == expected and list(got) == sorted(expected, key=str.lower)


def test_carriage_returns_collapse_as_a_terminal_shows_them():
    from gradexp.sync.console import LineCutter

    cut = LineCutter()
    assert cut.feed(b"abcdef\rXY") == []
    assert cut.feed(b"\rZ\n") == ["ZYcdef"]  # overwritten from the start, the rest still shown
    assert cut.feed(b"10%\r20%\r100%\r\n") == ["100%"]  # a trailing \r erases nothing
    assert cut.feed("é".encode()[:1]) == []
    assert cut.feed("é".encode()[1:] + b"\n") == ["é"]  # a character split across reads
    assert cut.feed(b"no newline") == []
    assert cut.rest() == "no newline" and cut.rest() is None


def test_off_switches_in_settings_and_environment(tmp_path):
    proc = trainer(tmp_path, """
        import gradexp

        run = gradexp.init("p", id="r")
        print("not recorded")
        assert run._sender is None  # nothing left to do for a sender process offline
        run.finish()
    """, GRADEXP_CONSOLE="false", GRADEXP_SYSTEM_METRICS="0", GRADEXP_CODE="off")
    code, terminal = finished(proc)
    assert code == 0 and terminal == "not recorded\n", terminal
    run = gradexp.Api(dir=tmp_path / "runs").run("p/r")
    assert run.console() == [] and run.system().num_rows == 0 and run.provenance == {}
    with pytest.raises(ValueError, match="console"):
        gradexp.init("p", console="maybe")


# -- code ---------------------------------------------------------------------------------------------

def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True,
                          env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
                               "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}).stdout.strip()


def test_a_run_in_a_git_repo_records_commit_branch_remote_without_credentials_and_the_patch(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    (repo / "model.py").write_text("LR = 0.1\n")
    git(repo, "add", "model.py")
    git(repo, "commit", "-q", "-m", "first")
    git(repo, "remote", "add", "origin", "https://alice:s3cr3t-t0ken@git.example.com/team/x.git")
    (repo / "model.py").write_text("LR = 0.2\n")  # uncommitted
    proc = trainer(tmp_path, """
        import gradexp
        gradexp.init("p", id="r").finish()
    """, cwd=repo)
    code, terminal = finished(proc)
    assert code == 0, terminal
    run = gradexp.Api(dir=tmp_path / "runs").run("p/r")
    prov = run.provenance
    g = prov["git"]
    assert g["commit"] == git(repo, "rev-parse", "HEAD") and g["branch"] == "main"
    assert g["dirty"] is True
    assert g["remote"] == "https://git.example.com/team/x.git"
    assert "-LR = 0.1\n+LR = 0.2\n" in g["patch"] and g["patch_omitted"] == []
    applied = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(repo), str(applied)], check=True)
    subprocess.run(["git", "-C", str(applied), "apply"], input=g["patch"], text=True, check=True)
    assert (applied / "model.py").read_text() == "LR = 0.2\n"  # the patch is the change itself
    assert prov["program"]["path"] == str(repo / "train.py")
    assert prov["packages"]["numpy"] == np.__version__
    for f in run.dir.rglob("*"):  # the secret is nowhere in the run folder
        if f.is_file():
            assert b"s3cr3t" not in f.read_bytes(), f


def test_a_patch_over_the_cap_keeps_whole_files_and_names_the_rest(tmp_path):
    from gradexp.core.provenance import PATCH_MAX_BYTES, git_state

    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    for name in ("a.txt", "b.txt"):
        (repo / name).write_text("x\n")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "first")
    (repo / "a.txt").write_text("small change\n")
    (repo / "b.txt").write_text("y" * (PATCH_MAX_BYTES + 10) + "\n")
    g = git_state(repo)
    assert g is not None and g["dirty"]
    assert "+small change" in g["patch"] and "yyyy" not in g["patch"]
    assert g["patch_omitted"] == ["b.txt"]
    assert len(g["patch"].encode()) <= PATCH_MAX_BYTES


@pytest.mark.parametrize("url, safe", [
    ("https://user:token@host/x.git", "https://host/x.git"),
    ("https://ghp_abc123@github.com/o/r.git", "https://github.com/o/r.git"),
    ("http://u:p@host:8080/x", "http://host:8080/x"),
    ("ssh://git:pw@host/x.git", "ssh://git@host/x.git"),
    ("ssh://git@host/x.git", "ssh://git@host/x.git"),
    ("git@github.com:o/r.git", "git@github.com:o/r.git"),
    ("/srv/repos/x.git", "/srv/repos/x.git"),
])
def test_credentials_are_stripped_from_remote_urls(url, safe):
    from gradexp.core.provenance import strip_credentials

    assert strip_credentials(url) == safe


# -- system metrics -------------------------------------------------------------------------------------

FAKE_NVML = '''
NVML_TEMPERATURE_GPU = 0
class _U: gpu = 87
class _M: used = 3 << 30; total = 16 << 30
def nvmlInit(): pass
def nvmlDeviceGetCount(): return 1
def nvmlDeviceGetHandleByIndex(i): return i
def nvmlDeviceGetUtilizationRates(h): return _U()
def nvmlDeviceGetMemoryInfo(h): return _M()
def nvmlDeviceGetTemperature(h, kind): return 61
def nvmlDeviceGetPowerUsage(h): raise RuntimeError("not supported on this board")
'''

BUSY = """
    import time
    import gradexp

    run = gradexp.init("p", id="r", system_interval=0.25, console=False, code=False)
    end = time.monotonic() + 4
    n = 0
    while time.monotonic() < end:  # the GIL is never let go of on purpose
        n += 1
    run.log({"n": n})
    run.finish()
"""


def test_system_metrics_come_every_interval_while_the_trainer_is_busy_and_gpu_figures_are_absent(tmp_path):
    code, out = finished(trainer(tmp_path, BUSY))
    assert code == 0, out
    run = gradexp.Api(dir=tmp_path / "runs").run("p/r")
    table = run.system()
    rows = table.to_pylist()
    # 4 s at 0.25 s: 16 samples on an idle machine; a busy one may start the sender late
    assert len(rows) >= 4, rows
    assert [r["step"] for r in rows] == list(range(len(rows)))
    gaps = np.diff([r["_timestamp"] for r in rows])
    assert np.median(gaps) < 1.0, gaps
    for r in rows:
        assert r["system/proc/rss_bytes"] > 10 << 20  # the trainer's, not the sender's
        assert r["system/memory/available_bytes"] > 0 and 0 <= r["system/cpu_percent"] <= 100
    assert max(r["system/proc/cpu_percent"] for r in rows[1:]) > 5  # the busy loop (a shared machine gives it less)
    assert not any(c.startswith("system/gpu") for c in table.column_names)  # absent, not zero
    assert "system/cpu_percent" not in run.history().column_names  # a stream of its own


def test_gpu_figures_where_the_management_library_reports_a_device(tmp_path):
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "pynvml.py").write_text(FAKE_NVML)
    path = os.pathsep.join([str(fake), str(REPO), os.environ.get("PYTHONPATH", "")])
    code, out = finished(trainer(tmp_path, BUSY.replace("+ 4", "+ 1.5"), PYTHONPATH=path))
    assert code == 0, out
    rows = gradexp.Api(dir=tmp_path / "runs").run("p/r").system().to_pylist()
    assert rows
    r = rows[-1]
    assert r["system/gpu/0/utilization_percent"] == 87 and r["system/gpu/0/temperature_c"] == 61
    assert r["system/gpu/0/memory_used_bytes"] == 3 << 30
    assert "system/gpu/0/power_w" not in r  # the board does not report it: absent
    assert not any(k.startswith("system/gpu/1/") for k in r)


# -- the server -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = GradexpServer(tmp_path_factory.mktemp("prov-server")).start()
    key = srv.user_with_key("alice")
    yield srv, key
    srv.stop()


SERVED = """
    import os, sys
    import gradexp

    run = gradexp.init("p", id=os.environ["RUN_ID"], system_interval=0.2)
    for i in range(5):
        print(f"line {i}")
        run.log({"i": i})
    os.write(2, b"to stderr\\n")
    import time; time.sleep(0.6)
    raise KeyError("gone")
"""


@pytest.mark.parametrize("how", ["online", "sync"])
def test_console_system_metrics_and_record_reach_the_server(server, tmp_path, how):
    srv, key = server
    run_id = f"r-{how}"
    extra = {"RUN_ID": run_id}
    if how == "online":
        extra.update(GRADEXP_HOST=srv.url, GRADEXP_API_KEY=key)
    code, out = finished(trainer(tmp_path, SERVED, **extra))
    assert code == 1, out
    local = gradexp.Api(dir=tmp_path / "runs").run(f"p/{run_id}")
    if how == "sync":
        r = subprocess.run([sys.executable, "-m", "gradexp", "sync", str(local.dir), "--host", srv.url,
                            "--api-key", key], capture_output=True, text=True, timeout=120, env=env())
        assert r.returncode == 0, r.stderr
    remote = gradexp.Api(host=srv.url, api_key=key).run(f"alice/p/{run_id}")
    assert remote.status == "failed"
    lines = remote.console()
    assert lines == local.console() and len(lines) >= 7
    assert [x.text for x in lines[:6]] == [f"line {i}" for i in range(5)] + ["to stderr"]
    assert lines[-1].text == "KeyError: 'gone'"
    assert remote.console(since=3) == lines[3:]
    assert remote.system().equals(local.system()) and remote.system().num_rows >= 1
    assert remote.meta["exception"]["type"] == "KeyError" and remote.meta["exit_code"] == 1
    assert remote.meta["argv"] == local.meta["argv"]
    assert remote.provenance == local.provenance and remote.provenance["packages"]["numpy"] == np.__version__


def test_gradexp_logs_prints_the_console_and_follows_a_live_run(tmp_path):
    go = tmp_path / "go"
    proc = trainer(tmp_path, f"""
        import os, time
        import gradexp

        run = gradexp.init("p", id="r", system_metrics=False, code=False)
        print("first", flush=True)
        while not os.path.exists({str(go)!r}):
            time.sleep(0.05)
        print("second")
        run.finish()
    """)
    assert proc.stdout is not None and proc.stdout.readline() == b"first\n"
    cmd = [sys.executable, "-m", "gradexp", "logs", "p/r", "--follow", "--interval", "0.2",
           "--dir", str(tmp_path / "runs")]
    follow = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env())
    assert follow.stdout is not None
    assert follow.stdout.readline() == "first\n"
    time.sleep(0.5)
    assert follow.poll() is None  # still following: the run is running
    go.touch()
    finished(proc)
    out, _ = follow.communicate(timeout=60)
    assert out == "second\n" and follow.returncode == 0
    r = subprocess.run(cmd[:5] + ["--dir", str(tmp_path / "runs")], capture_output=True, text=True, env=env(),
                       timeout=60)
    assert r.returncode == 0 and r.stdout == "first\nsecond\n", r.stderr


# -- the sender's life after the trainer ------------------------------------------------------------------

@pytest.mark.parametrize("how", ["exit", "SIGTERM"])
def test_the_sender_gives_up_sender_linger_seconds_after_the_trainer_died(tmp_path, how):
    # Online against a host that never answers: once the trainer has died without finish(),
    # its sender keeps trying for sender_linger seconds, then exits, saying so, and leaves the
    # rest to `gradexp sync` -- it must not stay on the machine for good (one did, for hours).
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    proc = trainer(tmp_path, f"""
        import os
        import gradexp

        run = gradexp.init("p", id="r", mode="online", host="http://127.0.0.1:{port}", api_key="gx_" + "k" * 43,
                           entity="someone", finish_timeout=1, sender_linger=3, code=False, system_metrics=False)
        print("sender", run._sender.proc.pid, flush=True)
        run.log({{"loss": 1.0}})
        if {how == "exit"!r}:
            os._exit(3)
        os.kill(os.getpid(), 15)
    """)
    code, terminal = finished(proc)
    assert code in (3, -15), terminal
    pid = int(next(line for line in terminal.splitlines() if line.startswith("sender ")).split()[1])
    t0 = time.monotonic()
    while Path(f"/proc/{pid}").exists() and time.monotonic() - t0 < 90:
        time.sleep(0.2)
    gone_after = time.monotonic() - t0
    assert not Path(f"/proc/{pid}").exists(), f"the sender still runs {gone_after:.0f} s after the trainer ended"
    log = (tmp_path / "runs" / "p" / "r" / "sender.log").read_text()
    assert "gave up uploading 3 s after the training process ended (sender_linger)" in log, log
    assert "gradexp sync" in log, log
