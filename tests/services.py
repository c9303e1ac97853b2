"""Real services for the tests, started as throwaway processes on loopback.

PostgreSQL (initdb/pg_ctl), MariaDB (mariadb-install-db/mariadbd), an S3-protocol
server (moto's standalone server) and gradexp servers (``python -m gradexp server``).
Nothing is mocked: the code under test talks to them over TCP on 127.0.0.1. Every
wait is a bounded poll. A missing service binary skips its tests, except in CI
(``CI=true``), where it fails them: CI must run every test.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

HOST = "127.0.0.1"
START_TIMEOUT = 30.0
"""Seconds a service may take to come up (the machine is small and busy)."""
IN_CI = os.environ.get("CI") == "true"


def unavailable(what: str) -> None:
    """A service cannot be started here: fail in CI, skip elsewhere."""
    if IN_CI:
        pytest.fail(f"{what} (CI=true: every service must be available)", pytrace=False)
    pytest.skip(what)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_for(check: Callable[[], Any], what: str, *, timeout: float = START_TIMEOUT, interval: float = 0.05,
             proc: subprocess.Popen | None = None, log: Path | None = None) -> Any:
    """Poll ``check()`` until it returns something truthy (exceptions count as not yet)."""
    deadline = time.monotonic() + timeout
    error: BaseException | None = None
    while True:
        try:
            value = check()
        except Exception as e:  # not up yet
            value, error = None, e
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with {proc.returncode}{_tail(log)}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s (last error: {error!r}){_tail(log)}")
        time.sleep(interval)


def _tail(log: Path | None, n: int = 30) -> str:
    if log is None or not log.exists():
        return ""
    lines = log.read_text(errors="replace").splitlines()[-n:]
    return "\n--- " + str(log) + " ---\n" + "\n".join(lines)


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for child processes: no GRADEXP_* settings, loopback never proxied."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRADEXP_")}
    if "GRADEXP_CONFIG_DIR" in os.environ:  # the test's own (empty) credential store
        env["GRADEXP_CONFIG_DIR"] = os.environ["GRADEXP_CONFIG_DIR"]
    env.update(NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost",
               AWS_EC2_METADATA_DISABLED="true", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def _stop(proc: subprocess.Popen | None, timeout: float = 15.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


# -- PostgreSQL ----------------------------------------------------------------------------------

def _pg_bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[4])
                   if Path(p).parts[4].isdigit() else 0)
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl"):
        return Path(initdb).resolve().parent
    return None


class Postgres:
    """A throwaway cluster: trust auth, 127.0.0.1 only, socket in its own folder, no fsync."""

    def __init__(self) -> None:
        bindir = _pg_bindir()
        if bindir is None:
            unavailable("PostgreSQL is not installed (no initdb/pg_ctl; apt-get install postgresql)")
        assert bindir is not None
        self.bin = bindir
        self.as_user: list[str] = []
        if os.geteuid() == 0:  # initdb refuses root: run the cluster as the postgres system user
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                unavailable("running as root and there is no 'postgres' user to run PostgreSQL as")
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.root = Path(tempfile.mkdtemp(prefix="gx-pg-"))
        os.chmod(self.root, 0o755)
        if self.as_user:
            shutil.chown(self.root, "postgres", "postgres")
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = free_port()
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust",
                  "--no-sync", "-E", "UTF8", "--no-locale")
        opts = (f"-p {self.port} -k {self.root} -c listen_addresses={HOST} -c fsync=off "
                "-c full_page_writes=off -c synchronous_commit=off -c max_connections=200")
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w",
                  "-t", str(int(START_TIMEOUT)), "-o", opts, "start")
        wait_for(self._ping, "PostgreSQL", log=self.log)

    def _run(self, *cmd: str) -> None:
        r = subprocess.run(self.as_user + list(cmd), capture_output=True, text=True, timeout=START_TIMEOUT * 2,
                           cwd=self.root)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}{_tail(self.log)}")

    def _connect(self, dbname: str = "postgres") -> Any:
        import psycopg

        return psycopg.connect(host=HOST, port=self.port, user="postgres", dbname=dbname, autocommit=True,
                               connect_timeout=5)

    def _ping(self) -> bool:
        with self._connect() as c:
            return c.execute("SELECT 1").fetchone() == (1,)

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@{HOST}:{self.port}/{dbname}"

    def new_database(self) -> str:
        """A fresh empty database; returns its SQLAlchemy URL."""
        name = unique("gx")
        with self._connect() as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        try:
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "-t", "30", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


# -- MariaDB -------------------------------------------------------------------------------------

class MariaDB:
    """A throwaway server: own datadir, socket and port, 127.0.0.1 only, no grant tables."""

    def __init__(self) -> None:
        daemon = shutil.which("mariadbd") or next((p for p in ("/usr/sbin/mariadbd", "/usr/libexec/mariadbd")
                                                   if os.access(p, os.X_OK)), None)
        install = shutil.which("mariadb-install-db")
        if daemon is None or install is None:
            unavailable("MariaDB is not installed (no mariadbd/mariadb-install-db; apt-get install mariadb-server)")
        assert daemon is not None and install is not None
        self.root = Path(tempfile.mkdtemp(prefix="gx-maria-"))
        self.data = self.root / "data"
        self.log = self.root / "error.log"
        self.port = free_port()
        user = pwd.getpwuid(os.geteuid()).pw_name
        r = subprocess.run([install, "--no-defaults", f"--datadir={self.data}", f"--user={user}",
                            "--auth-root-authentication-method=normal", "--skip-test-db"],
                           capture_output=True, text=True, timeout=120, cwd=self.root)
        if r.returncode != 0:
            shutil.rmtree(self.root, ignore_errors=True)
            raise RuntimeError(f"mariadb-install-db failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
        self.proc: subprocess.Popen | None = subprocess.Popen(
            [daemon, "--no-defaults", f"--datadir={self.data}", f"--user={user}", f"--port={self.port}",
             f"--bind-address={HOST}", f"--socket={self.root / 'mysqld.sock'}",
             f"--pid-file={self.root / 'mysqld.pid'}", f"--log-error={self.log}", "--skip-grant-tables",
             "--skip-log-bin", "--innodb-buffer-pool-size=64M", "--innodb-flush-log-at-trx-commit=0",
             "--max-connections=300"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.root)
        try:
            wait_for(self._ping, "MariaDB", proc=self.proc, log=self.log)
        except BaseException:
            self.stop()
            raise

    def _connect(self) -> Any:
        import pymysql

        return pymysql.connect(host=HOST, port=self.port, user="root", connect_timeout=5, autocommit=True)

    def _ping(self) -> bool:
        c = self._connect()
        try:
            with c.cursor() as cur:
                cur.execute("SELECT 1")
                return cur.fetchone() == (1,)
        finally:
            c.close()

    def url(self, dbname: str) -> str:
        return f"mysql+pymysql://root@{HOST}:{self.port}/{dbname}"

    def new_database(self) -> str:
        name = unique("gx")
        c = self._connect()
        try:
            with c.cursor() as cur:
                cur.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
        finally:
            c.close()
        return self.url(name)

    def stop(self) -> None:
        try:
            _stop(self.proc, 30)
        finally:
            self.proc = None
            shutil.rmtree(self.root, ignore_errors=True)


# -- S3 (moto) -----------------------------------------------------------------------------------

S3_KEY = "testing"


class S3:
    """moto's standalone S3 server; one bucket per :meth:`new_store`."""

    def __init__(self) -> None:
        try:
            import boto3  # noqa: F401
            import moto.server  # noqa: F401
        except ImportError as e:
            unavailable(f"moto[server] and boto3 are not installed ({e}; pip install -e '.[test]')")
        self.root = Path(tempfile.mkdtemp(prefix="gx-s3-"))
        self.log = self.root / "moto.log"
        self.port = free_port()
        self.endpoint = f"http://{HOST}:{self.port}"
        with open(self.log, "wb") as out:
            self.proc: subprocess.Popen | None = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(self.port)],
                stdout=out, stderr=subprocess.STDOUT, cwd=self.root,
                env=clean_env(AWS_ACCESS_KEY_ID=S3_KEY, AWS_SECRET_ACCESS_KEY=S3_KEY))
        try:
            import requests

            wait_for(lambda: requests.get(f"{self.endpoint}/moto-api/", timeout=2).status_code < 500,
                     "moto S3 server", proc=self.proc, log=self.log)
        except BaseException:
            self.stop()
            raise

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=S3_KEY,
                            aws_secret_access_key=S3_KEY, region_name="us-east-1")

    def new_store(self, prefix: str = "gradexp") -> tuple[str, str]:
        """A fresh bucket; returns (bucket, store URL for ``gradexp server --store``)."""
        bucket = unique("gx").replace("_", "-")
        self.client().create_bucket(Bucket=bucket)
        # pyarrow.fs takes the credentials as the URL's user info (not as query parameters).
        # allow_delayed_open makes small objects one PutObject instead of a multipart upload
        # (moto 5.2.1 answers CompleteMultipartUpload with a body pyarrow rejects).
        url = (f"s3://{S3_KEY}:{S3_KEY}@{bucket}/{prefix}?endpoint_override={HOST}:{self.port}"
               "&scheme=http&region=us-east-1&allow_delayed_open=true")
        return bucket, url

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        out: list[str] = []
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for page in pages:
            out.extend(o["Key"] for o in page.get("Contents", []))
        return out

    def stop(self) -> None:
        try:
            _stop(self.proc)
        finally:
            self.proc = None
            shutil.rmtree(self.root, ignore_errors=True)


# -- gradexp servers -----------------------------------------------------------------------------

class GradexpServer:
    """``python -m gradexp server`` on a free loopback port, as a child process.

    Either ``data_dir`` (embedded SQLite + folder) or ``db_url`` and ``store_url``.
    :meth:`kill` and :meth:`start` again keep the port, database and store.
    """

    def __init__(self, workdir: Path, *, db_url: str | None = None, store_url: str | None = None,
                 data_dir: Path | None = None, port: int | None = None, max_body: int | None = None) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.db_url = db_url
        self.store_url = store_url
        self.data_dir = Path(data_dir) if data_dir is not None else None
        if self.data_dir is None and (db_url is None or store_url is None):
            self.data_dir = self.workdir / "data"
        self.port = port or free_port()
        self.max_body = max_body
        self.url = f"http://{HOST}:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log = self.workdir / f"server-{self.port}.log"
        self.starts = 0

    def _where(self) -> list[str]:
        args: list[str] = []
        if self.db_url:
            args += ["--db", self.db_url]
        if self.store_url:
            args += ["--store", self.store_url]
        if self.data_dir is not None:
            args += ["--data-dir", str(self.data_dir)]
        return args

    def cli(self, *args: str, timeout: float = 90, input: str | None = None) -> str:
        """``gradexp server <where> ARGS``; returns stdout, raises with stderr on failure."""
        r = subprocess.run([sys.executable, "-m", "gradexp", "server", *self._where(), *args],
                           capture_output=True, text=True, timeout=timeout, env=clean_env(), cwd=self.workdir,
                           input=input)
        if r.returncode != 0:
            raise RuntimeError(f"gradexp server {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
        return r.stdout

    def create_user(self, name: str) -> None:
        self.cli("create-user", name)

    def create_key(self, user: str) -> str:
        key = self.cli("create-key", user).strip()
        assert key.startswith("gx_") and "\n" not in key, key
        return key

    # The users most tests need are made in this process, with the functions the admin commands
    # call: a CLI run costs an interpreter start and the server's imports (~2 s of CPU). The
    # commands themselves are tested through the CLI (create_user, create_key, cli:
    # test_accounts.py, test_cli.py), and so is a release's own CLI (test_migrations.py).

    def user_with_key(self, name: str) -> str:
        """A new user and an API key of it."""
        from gradexp.server import db

        with self._database() as engine:
            db.create_user(engine, name)
            return db.create_key(engine, name)

    def user_with_password(self, name: str, password: str) -> None:
        from gradexp.server import accounts, db

        with self._database() as engine:
            db.create_user(engine, name)
            accounts.set_password(engine, name, password)

    @contextlib.contextmanager
    def _database(self) -> Iterator[Any]:
        """The server's database (made when it is the embedded SQLite file), migrated."""
        from gradexp.server import db

        if self.db_url is None:
            assert self.data_dir is not None
            self.data_dir.mkdir(parents=True, exist_ok=True)
        engine = db.connect(self.db_url or f"sqlite:///{self.data_dir / 'gradexp.db'}")
        try:
            db.migrate(engine)
            yield engine
        finally:
            engine.dispose()

    def start(self, *, wait: bool = True) -> GradexpServer:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        cmd = [sys.executable, "-m", "gradexp", "server", "--port", str(self.port), *self._where()]
        if self.max_body is not None:
            cmd += ["--max-body", str(self.max_body)]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=clean_env(),
                                         cwd=self.workdir)
        self.starts += 1
        if wait:
            self.wait_up()
        return self

    def healthy(self) -> bool:
        import requests

        try:
            return requests.get(f"{self.url}/healthz", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def wait_up(self, timeout: float = START_TIMEOUT) -> None:
        try:
            wait_for(self.healthy, f"gradexp server on port {self.port}", timeout=timeout, proc=self.proc,
                     log=self.log)
        except BaseException:
            self.stop()
            raise

    def kill(self) -> None:
        """SIGKILL: no shutdown, no goodbye."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        _stop(self.proc)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@contextlib.contextmanager
def two_servers(workdir: Path, db_url: str, store_url: str, *,
                user: str = "u") -> Iterator[tuple[GradexpServer, GradexpServer, str]]:
    """Two server processes on one database and one store (as behind a load balancer), both
    up, with an API key for ``user``; both stopped afterwards."""
    a = GradexpServer(workdir / "a", db_url=db_url, store_url=store_url)
    b = GradexpServer(workdir / "b", db_url=db_url, store_url=store_url)
    key = a.user_with_key(user)
    a.start(wait=False)
    b.start(wait=False)
    try:
        a.wait_up()
        b.wait_up()
        yield a, b, key
    finally:
        a.stop()
        b.stop()


def run_python(code: str, *, env: dict[str, str] | None = None, cwd: Path | None = None,
               timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          env=env or clean_env(), cwd=cwd)


def spawn_python(code: str, *, env: dict[str, str] | None = None, cwd: Path | None = None,
                 stdout: Any = subprocess.PIPE, stderr: Any = subprocess.PIPE) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code], stdout=stdout, stderr=stderr, text=True,
                            env=env or clean_env(), cwd=cwd)


# -- deterministic training data ------------------------------------------------------------------

VALUES_SRC = '''
import numpy as np

def values(step):
    """What a test trainer logs at ``step``: a pure function of the step, checkable exactly."""
    return {"loss": step * 0.25 + 1 / 3, "acc": step / 1000, "epoch": step // 10,
            "w": np.random.default_rng(step).standard_normal((4, 3)).astype(np.float32),
            "ids": (np.arange(6, dtype=np.int64) * step) - 7}
'''
_ns: dict[str, Any] = {}
exec(VALUES_SRC, _ns)
values: Callable[[int], dict[str, Any]] = _ns["values"]
TENSOR_KEYS = ("ids", "w")


def same_bits(a: Any, b: Any) -> bool:
    import numpy as np

    return (a.dtype == b.dtype and a.shape == b.shape
            and np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes())


def check_history(table: Any, steps: Any) -> None:
    """``table`` holds exactly one row per step in ``steps``, with the logged scalars."""
    got = table.column("step").to_pylist()
    assert got == sorted(steps), f"steps {got[:10]}... (n={len(got)}) != expected (n={len(list(steps))})"
    loss = table.column("loss").to_pylist()
    acc = table.column("acc").to_pylist()
    epoch = table.column("epoch").to_pylist()
    for i, s in enumerate(got):
        v = values(s)
        assert (loss[i], acc[i], epoch[i]) == (v["loss"], v["acc"], v["epoch"]), s


# -- a training process ------------------------------------------------------------------------------

TRAINER_SRC = VALUES_SRC + '''
import json, os, sys, time
import gradexp

def say(**fields):
    print(json.dumps(fields), flush=True)

def wait_file(path, timeout=180):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise SystemExit(f"no {path} within {timeout} s")
        time.sleep(0.02)

A = json.loads(sys.argv[1])
t0 = time.monotonic()
run = gradexp.init(A["project"], id=A["id"], dir=A["dir"], config={"lr": 0.1, "layers": [3, 4]},
                   tags=["stream"], **A["settings"])
say(init_s=time.monotonic() - t0, dir=str(run.dir))
step = 0
for stop in A["stops"] + [None]:  # log up to each stop, then wait for the test's go file
    end = A["steps"] if stop is None else stop + 1
    while step < end:
        run.log(values(step))
        say(step=step, t=time.time())
        step += 1
        if A["sleep"]:
            time.sleep(A["sleep"])
    if stop is not None:
        say(waiting=stop)
        wait_file(os.path.join(A["control"], f"go-{stop}"))
t1 = time.monotonic()
run.finish()
say(finish_s=time.monotonic() - t1)
'''


def _children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (OSError, ValueError):
        return []


def _kill_sender(pid: int) -> None:
    """SIGKILL ``pid`` if it is still a gradexp sender (not a process that reused the id)."""
    try:
        if b"gradexp.sync.sender" in Path(f"/proc/{pid}/cmdline").read_bytes():
            os.kill(pid, signal.SIGKILL)
    except (OSError, ProcessLookupError):
        pass


class Trainer:
    """A training script in its own process, logging ``values(step)`` for steps 0..steps-1.

    At each step in ``stops`` it waits for :meth:`go` (so the test decides when the run
    goes on and when it finishes). Its JSON lines on stdout are collected as they come.
    :meth:`cleanup` (after each test) kills what is left of it and of its sender process.
    """

    started: list[Trainer] = []

    def __init__(self, workdir: Path, run_id: str, *, steps: int, stops: tuple[int, ...] = (),
                 sleep: float = 0.0, project: str = "stream", env: dict[str, str] | None = None,
                 **settings: Any) -> None:
        import json
        import threading

        self.control = Path(workdir) / f"control-{run_id}"
        self.control.mkdir(parents=True)
        self.dir = Path(workdir) / "runs"
        self.project, self.id = project, run_id
        self.run_dir = self.dir / project / run_id
        self.steps = steps
        self.lines: list[dict[str, Any]] = []
        self.stderr = ""
        args = json.dumps({"project": project, "id": run_id, "dir": str(self.dir), "settings": settings,
                           "steps": steps, "stops": list(stops), "sleep": sleep, "control": str(self.control)})
        self.proc = subprocess.Popen([sys.executable, "-c", TRAINER_SRC, args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env or clean_env(), cwd=workdir)
        self._cv = threading.Condition()
        self.helpers: list[int] = []
        Trainer.started.append(self)

        def read_out() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                try:
                    item = json.loads(line)
                except ValueError:
                    continue
                if "init_s" in item:  # init() has spawned the sender: remember it, to clean up after a failure
                    self.helpers = _children(self.proc.pid)
                with self._cv:
                    self.lines.append(item)
                    self._cv.notify_all()

        def read_err() -> None:
            assert self.proc.stderr is not None
            self.stderr = self.proc.stderr.read()

        self._threads = [threading.Thread(target=read_out, daemon=True), threading.Thread(target=read_err, daemon=True)]
        for t in self._threads:
            t.start()

    def first(self, field: str, timeout: float = START_TIMEOUT * 2) -> dict[str, Any]:
        """The first line holding ``field`` (waiting for it)."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                for item in self.lines:
                    if field in item:
                        return item
                if self.proc.poll() is not None and not self._threads[0].is_alive():
                    raise RuntimeError(f"trainer exited ({self.proc.returncode}) without {field!r}:\n{self.stderr}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"trainer: no {field!r} within {timeout:.0f} s; stderr:\n{self.stderr}")
                self._cv.wait(min(left, 0.2))

    def wait_step(self, step: int, timeout: float = START_TIMEOUT * 2) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                for item in self.lines:
                    if item.get("step") == step:
                        return item
                if self.proc.poll() is not None and not self._threads[0].is_alive():
                    raise RuntimeError(f"trainer exited ({self.proc.returncode}) before step {step}:\n{self.stderr}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"trainer: no step {step} within {timeout:.0f} s; stderr:\n{self.stderr}")
                self._cv.wait(min(left, 0.2))

    def logged(self) -> list[tuple[int, float]]:
        with self._cv:
            return [(i["step"], i["t"]) for i in self.lines if "step" in i]

    def go(self, stop: int) -> None:
        (self.control / f"go-{stop}").touch()

    def wait(self, timeout: float = 120) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        for t in self._threads:
            t.join(10)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    @classmethod
    def cleanup(cls) -> None:
        """Kill trainers a failed test left running, and their senders (which would retry forever)."""
        while cls.started:
            t = cls.started.pop()
            t.kill()
            for pid in t.helpers:
                _kill_sender(pid)


def finish_runs(timeout: float = 30) -> None:
    """Finish the runs this process left open (a failed test) while their server is still up."""
    import gradexp.write.run as _run

    for run in list(_run._runs):
        sender = run._sender
        run.settings = dataclasses.replace(run.settings, finish_timeout=timeout)
        try:
            run.finish()
        finally:
            if sender is not None and sender.proc.poll() is None:
                sender.proc.kill()
                sender.proc.wait(30)


# -- what the server holds ---------------------------------------------------------------------------

def local_parts(run_dir: Path) -> dict[tuple[str, int], tuple[str, dict[int, int]]]:
    """(stream, seq) -> (sha256, {frame kind: count}) of a run folder's sealed parts."""
    import hashlib

    from gradexp.core import format as _format

    out = {}
    for p in sorted((Path(run_dir) / "parts").glob("*.gxp")):
        stream, _, seq = p.name[:-4].rpartition("-")
        kinds: dict[int, int] = {}
        for f in _format.scan_part(p).frames:
            kinds[f.kind] = kinds.get(f.kind, 0) + 1
        out[(stream, int(seq))] = (hashlib.sha256(p.read_bytes()).hexdigest(), kinds)
    return out


def assert_uploaded_exactly_once(db_url: str, entity: str, project: str, run_id: str, run_dir: Path) -> None:
    """The server's database holds every sealed part of ``run_dir`` once, with exactly its frames."""
    import sqlalchemy as sa

    from gradexp.server import db

    local = local_parts(run_dir)
    assert local, f"no sealed parts in {run_dir}"
    engine = db.connect(db_url)
    try:
        with engine.connect() as conn:
            eid = db.entity_id(conn, entity)
            pk = db.run_pk(conn, eid, project, run_id)
            assert pk is not None, f"no run {entity}/{project}/{run_id} in the database"
            rows = conn.execute(sa.select(db.parts.c.id, db.parts.c.stream, db.parts.c.seq, db.parts.c.sha256)
                                .where(db.parts.c.run_pk == pk)).all()
            frames = conn.execute(sa.select(db.frames.c.part_id, db.frames.c.kind, sa.func.count())
                                  .where(db.frames.c.run_pk == pk)
                                  .group_by(db.frames.c.part_id, db.frames.c.kind)).all()
    finally:
        engine.dispose()
    by_id = {r.id: (r.stream, r.seq) for r in rows}
    assert len(by_id) == len(rows) == len({(r.stream, r.seq) for r in rows})
    server = {(r.stream, r.seq): (r.sha256, {}) for r in rows}
    for part_id, kind, n in frames:
        server[by_id[part_id]][1][kind] = n
    local_cmp = {k: (sha, {kd: n for kd, n in kinds.items() if kd != 3}) for k, (sha, kinds) in local.items()}
    assert server == local_cmp


class WebSession:
    """A browser stand-in on plain HTTP: cookies, forms with their CSRF tokens, no JavaScript
    (the pages need none). For the flows Chromium does not have to click through."""

    def __init__(self, base: str) -> None:
        import requests

        self.base = base
        self.http = requests.Session()

    @staticmethod
    def csrf(page: str) -> str:
        import re

        m = re.search(r'name="csrf" value="([^"]+)"', page)
        assert m, f"no CSRF field in the page:\n{page[:2000]}"
        return m.group(1)

    def get(self, path: str, **kw: Any):
        return self.http.get(self.base + path, timeout=30, **kw)

    def post(self, path: str, data: dict[str, str], **kw: Any):
        kw.setdefault("allow_redirects", False)
        return self.http.post(self.base + path, data=data, timeout=30, **kw)

    def sign_in(self, user: str, password: str, *, next: str = "/keys"):
        from urllib.parse import quote

        page = self.get(f"/login?next={quote(next)}")
        return self.post("/login", {"csrf": self.csrf(page.text), "username": user, "password": password,
                                    "next": next})

    def form_post(self, page_path: str, action: str, data: dict[str, str]):
        """POST a form of the page at ``page_path``, with that page's CSRF token."""
        return self.post(action, {"csrf": self.csrf(self.get(page_path).text), **data})


# -- a busy machine ------------------------------------------------------------------------------------

class CpuBurners:
    """``n`` processes spinning on the CPU until :meth:`stop`: the load under which a
    timing promise must still hold."""

    def __init__(self, n: int = 2) -> None:
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"], env=clean_env())
                      for _ in range(n)]

    def stop(self) -> None:
        for p in self.procs:
            _stop(p, timeout=5)
