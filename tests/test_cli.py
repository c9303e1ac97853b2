"""The command line as a user meets it: each failure they can act on is one ``Error:`` line
on stderr with a non-zero exit code, no traceback, and names what is at fault.

Every command runs as a real ``python -m gradexp`` process (the one users start), against
a real server on loopback where one is needed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import gradexp
from gradexp.cli import main
from gradexp.core import format as _format
from services import GradexpServer, clean_env, free_port

REPO = Path(__file__).resolve().parents[1]
BIG = 100_000
"""Elements of the tensor logged in damage tests: large enough for a frame of its own."""


def gx(*args: str, cwd: Path | None = None, code: str | None = None,
       **env: str) -> subprocess.CompletedProcess:
    """``python -m gradexp ARGS`` (or ``python -c CODE ARGS``) with this checkout first on the path."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "gradexp", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=cwd,
                          env=clean_env(PYTHONPATH=path, COLUMNS="200", **env))


def one_error(r: subprocess.CompletedProcess, *names: str) -> str:
    """The single ``Error:`` line of a failed command, checked to name each of ``names``."""
    assert r.returncode != 0, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


def make_run(runs: Path, project: str, run_id: str, *, steps: int = 4) -> Path:
    rng = np.random.default_rng(0)
    with gradexp.init(project, id=run_id, dir=runs, mode="offline") as run:
        for step in range(steps):
            run.log({"loss": 1.0 / (step + 1), "big": rng.standard_normal(BIG).astype(np.float32)})
    return run.dir


def damage_frame(part: Path, key: str, step: int) -> None:
    """Flip one byte in the middle of the payload of ``key``'s frame at ``step``."""
    scan = _format.scan_part(part)
    info = next(f for f in scan.frames if f.key == key and f.step_min == step == f.step_max)
    data = bytearray(part.read_bytes())
    data[info.data_offset + info.stored // 2] ^= 0xFF
    part.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = GradexpServer(tmp_path_factory.mktemp("cli-server"))
    s.start()
    s.key = s.user_with_key("ada")
    yield s
    s.stop()


# -- export ----------------------------------------------------------------------------------

def test_export_to_a_missing_folder(tmp_path):
    make_run(tmp_path / "gradexp-runs", "proj", "r1", steps=1)
    r = gx("export", "proj/r1", "-o", str(tmp_path / "nonexistent" / "dir" / "out.parquet"), cwd=tmp_path)
    one_error(r, "cannot write", str(tmp_path / "nonexistent" / "dir"))


LIMIT_FILE_SIZE = """
import resource, runpy, signal, sys

# The OS refuses to grow any file past 1 kB (EFBIG), as a full disk refuses with ENOSPC.
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))
sys.argv[0] = "gradexp"
runpy.run_module("gradexp", run_name="__main__", alter_sys=True)
"""


def test_export_refused_by_the_file_system(tmp_path):
    make_run(tmp_path / "gradexp-runs", "proj", "r1", steps=1)
    one_error(gx("export", "proj/r1", "-o", "out.parquet", code=LIMIT_FILE_SIZE, cwd=tmp_path),
              "cannot write out.parquet", "File too large")


def test_export_from_a_server_that_refuses_the_key(server, tmp_path):
    one_error(gx("export", "ada/proj/r1", "--host", server.url, "--api-key", "gx_not_a_key", cwd=tmp_path),
              "401", "gradexp login", "--api-key")


def test_export_from_a_host_without_a_key(server, tmp_path):
    one_error(gx("export", "ada/proj/r1", "--host", server.url, cwd=tmp_path),
              f"no API key for {server.url}", "gradexp login", "--api-key")


def test_export_from_a_host_nobody_listens_on(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    one_error(gx("export", "ada/proj/r1", "--host", url, "--api-key", "gx_x", cwd=tmp_path),
              f"cannot reach {url}", "refused")


def test_export_of_a_server_ref_without_a_host_says_how_to_name_one(tmp_path):
    one_error(gx("export", "ada/proj/r1", cwd=tmp_path), "'ada/proj/r1'", "--host", "gradexp login")


def test_export_tensors_skips_a_damaged_local_frame(tmp_path):
    run_dir = make_run(tmp_path / "gradexp-runs", "proj", "r1")
    damage_frame(next((run_dir / "parts").glob("tensors-*.gxp")), "big", 2)
    r = gx("export", "proj/r1", "-o", "h.parquet", "--tensors", cwd=tmp_path)
    assert_skipped_step_2(r, tmp_path, run_dir)


def test_export_tensors_skips_a_damaged_frame_on_the_server(server, tmp_path):
    run_dir = make_run(tmp_path / "gradexp-runs", "proj", "dmg")
    r = gx("sync", str(run_dir), "--host", server.url, "--api-key", server.key, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    stored = list(server.data_dir.glob("objects/runs/*/*/dmg/parts/tensors-*.gxp"))
    assert len(stored) == 1, stored
    damage_frame(stored[0], "big", 2)
    r = gx("export", "ada/proj/dmg", "-o", "h.parquet", "--tensors", "--host", server.url,
           "--api-key", server.key, cwd=tmp_path)
    assert_skipped_step_2(r, tmp_path, run_dir)


def assert_skipped_step_2(r: subprocess.CompletedProcess, where: Path, run_dir: Path) -> None:
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    warned = [line for line in r.stderr.splitlines() if line.startswith("Warning: ")]
    assert len(warned) == 1 and "'big' at step 2" in warned[0], r.stderr
    assert "3 (1 damaged, skipped)" in r.stderr
    table = pq.read_table(where / "h.tensors" / "big.parquet")
    assert table.column("step").to_pylist() == [0, 1, 3]
    got = table.column("big").combine_chunks().to_numpy_ndarray()
    local = gradexp.Api().run(run_dir)  # the same run, read from its folder
    for row, step in enumerate((0, 1, 3)):
        assert np.array_equal(got[row], local.tensor("big", step))


# -- runs and sync ---------------------------------------------------------------------------

def test_runs_of_an_unknown_project_lists_the_projects(tmp_path):
    make_run(tmp_path / "gradexp-runs", "mnist", "r1", steps=1)
    make_run(tmp_path / "gradexp-runs", "cifar", "r2", steps=1)
    one_error(gx("runs", "nosuchproject", cwd=tmp_path), "'nosuchproject'", "cifar, mnist")


def test_sync_a_project_folder_syncs_its_runs(server, tmp_path):
    for run_id in ("p1", "p2"):
        make_run(tmp_path / "gradexp-runs", "folderproj", run_id, steps=2)
    r = gx("sync", str(tmp_path / "gradexp-runs" / "folderproj"), "--host", server.url, "--api-key", server.key,
           cwd=tmp_path)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "synced 2 run(s)" in r.stderr
    api = gradexp.Api(host=server.url, api_key=server.key)
    for run_id in ("p1", "p2"):
        assert api.run(f"ada/folderproj/{run_id}").history().num_rows == 2


SYNC_ENTITY = """
import gradexp, sys
run = gradexp.init("entproj", id=sys.argv[1], entity=sys.argv[2], mode="offline")
run.log({"loss": 1.0})
run.finish()
"""


def test_sync_uploads_an_offline_run_to_the_entity_init_named(server, tmp_path):
    # init(entity=...) offline is kept in run.json: sync puts the run there, not under the
    # login's entity; an entity the key may not write to is refused, not silently rerouted.
    server.user_with_key("grace")
    for run_id, entity in (("mine", "ada"), ("theirs", "grace")):
        r = gx(run_id, entity, code=SYNC_ENTITY, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
    runs = tmp_path / "gradexp-runs" / "entproj"
    r = gx("sync", str(runs / "mine"), "--host", server.url, "--api-key", server.key, cwd=tmp_path)
    assert r.returncode == 0 and f"{server.url}/ada/entproj/mine" in r.stdout, r.stderr
    r = gx("sync", str(runs / "theirs"), "--host", server.url, "--api-key", server.key, cwd=tmp_path)
    error = [line for line in r.stderr.splitlines() if line.startswith("Error:")]
    assert r.returncode == 1 and len(error) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "'grace', given to init(entity=...); this key writes as 'ada'" in error[0], error
    api = gradexp.Api(host=server.url, api_key=server.key)
    assert api.run("ada/entproj/mine").history().num_rows == 1
    with pytest.raises(gradexp.RunNotFoundError):
        api.run("ada/entproj/theirs")


def test_sync_a_folder_without_runs(server, tmp_path):
    (tmp_path / "empty").mkdir()
    one_error(gx("sync", "empty", "--host", server.url, "--api-key", server.key, cwd=tmp_path),
              "empty is not a run folder")


def test_sync_when_not_logged_in_says_to_log_in(tmp_path):
    make_run(tmp_path / "gradexp-runs", "proj", "r1", steps=1)
    one_error(gx("sync", cwd=tmp_path), "not logged in", "gradexp login", "--host")


def test_sync_with_a_refused_key(server, tmp_path):
    make_run(tmp_path / "gradexp-runs", "proj", "r1", steps=1)
    one_error(gx("sync", "--host", server.url, "--api-key", "gx_not_a_key", cwd=tmp_path), "401", "gradexp login")


# -- server ----------------------------------------------------------------------------------

@pytest.mark.parametrize("args", [["list-users"], ["list-keys"], ["create-key", "ada"], ["revoke-key", "1"],
                                  ["signin-link", "ada"], ["set-password", "ada", "--password-stdin"]])
def test_admin_commands_refuse_a_data_dir_that_is_not_there(tmp_path, args):
    typo = tmp_path / "typo"
    one_error(gx("server", "--data-dir", str(typo), *args, cwd=tmp_path), str(typo / "gradexp.db"), "--data-dir")
    assert not typo.exists()


def test_admin_commands_refuse_a_sqlite_database_that_is_not_there(tmp_path):
    one_error(gx("server", "--db", f"sqlite:///{tmp_path / 'typo.db'}", "list-users", cwd=tmp_path),
              str(tmp_path / "typo.db"))
    assert not (tmp_path / "typo.db").exists()


def test_create_user_makes_a_new_database_and_says_so(tmp_path):
    r = gx("server", "--data-dir", str(tmp_path / "new"), "create-user", "eve", cwd=tmp_path)
    assert r.returncode == 0 and f"new database {tmp_path / 'new' / 'gradexp.db'}" in r.stderr, r.stderr
    r = gx("server", "--data-dir", str(tmp_path / "new"), "list-users", cwd=tmp_path)
    assert r.returncode == 0 and "eve" in r.stdout, r.stderr


BLOCK_SERVER_EXTRA = """
import importlib.abc, runpy, sys

class NotInstalled(importlib.abc.MetaPathFinder):
    # The [server] extra's modules, as if they had never been installed.
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {"starlette", "uvicorn", "httptools", "uvloop", "sqlalchemy",
                                      "psycopg", "pymysql"}:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NotInstalled())
sys.argv[0] = "gradexp"
runpy.run_module("gradexp", run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize("args", [[], ["list-users"]])
def test_server_without_the_server_extra_says_what_to_install(tmp_path, args):
    r = gx("server", "--data-dir", str(tmp_path / "data"), *args, code=BLOCK_SERVER_EXTRA, cwd=tmp_path)
    one_error(r, "[server] extra", "pip install -e '.[server]'")


# -- what stays as it was --------------------------------------------------------------------

def test_a_bug_keeps_its_traceback(monkeypatch):
    """Only errors a user can act on become one line: anything else is a bug and must show."""
    def broken(self, project=None):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(gradexp.Api, "runs", broken)
    result = CliRunner().invoke(main, ["runs"])
    assert isinstance(result.exception, ZeroDivisionError)


def test_offline_fallback_warning_reads_right():
    with pytest.warns(gradexp.GradexpWarning) as caught:
        gradexp.init("p", mode="online").finish()
    message = str(caught[0].message)
    assert "but no server (host) is set" in message and "there is no server" not in message
