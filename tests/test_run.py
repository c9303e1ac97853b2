"""Run lifecycle and step semantics, read back through the public API."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest

import gradexp


def history_rows(run):
    return gradexp.Api().run(run.dir).history().to_pylist()


def test_init_defaults_and_folder(tmp_path):
    run = gradexp.init()
    assert run.project == "uncategorized" and len(run.id) == 8 and run.name == run.id
    assert run.dir == (tmp_path / "gradexp-runs" / "uncategorized" / run.id)
    meta = json.loads((run.dir / "run.json").read_text())
    assert meta["status"] == "running"
    run.finish()
    assert json.loads((run.dir / "run.json").read_text())["status"] == "finished"


def test_gradexp_dir_env(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADEXP_DIR", str(tmp_path / "elsewhere"))
    with gradexp.init("p", id="abc") as run:
        assert run.dir == tmp_path / "elsewhere" / "p" / "abc"
    assert gradexp.Api().run("p/abc").id == "abc"
    assert gradexp.Api().run("abc").project == "p"


def test_bad_names_and_settings():
    with pytest.raises(ValueError, match="project"):
        gradexp.init("../escape")
    with pytest.raises(ValueError, match="run id"):
        gradexp.init("p", id="a/b")
    with pytest.raises(TypeError, match="flush_intervall"):
        gradexp.init("p", flush_intervall=1)
    with pytest.raises(ValueError, match="mode"):
        gradexp.init("p", mode="online-ish")


def test_existing_run_id_is_refused():
    gradexp.init("p", id="same").finish()
    with pytest.raises(FileExistsError, match="same"):
        gradexp.init("p", id="same")


def test_implicit_steps_and_commit_false():
    with gradexp.init("p") as run:
        run.log({"a": 1.0})
        run.log({"b": 2.0}, commit=False)
        run.log({"c": 3.0})
        run.log({"a": 4.0})
        assert run.step == 3
    rows = history_rows(run)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert (rows[1]["b"], rows[1]["c"], rows[1]["a"]) == (2.0, 3.0, None)
    assert rows[2]["a"] == 4.0


def test_explicit_steps_jump_and_repeat_without_warning():
    with gradexp.init("p") as run, warnings.catch_warnings():
        warnings.simplefilter("error")
        run.log({"a": 1.0}, step=10)
        run.log({"b": 2.0}, step=10)  # same step again: merged on read, no warning
        run.log({"a": 3.0}, step=20, commit=False)
        run.log({"b": 4.0}, step=30)  # a higher step commits the pending row
    rows = history_rows(run)
    assert [(r["step"], r["a"], r["b"]) for r in rows] == [(10, 1.0, 2.0), (20, 3.0, None),
                                                            (30, None, 4.0)]


def test_lower_step_is_kept_with_one_warning_and_last_write_wins():
    with gradexp.init("p") as run:
        for s in range(5):
            run.log({"a": float(s)})
        with pytest.warns(gradexp.GradexpWarning, match="lower than the current step"):
            run.log({"a": -1.0}, step=2)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            run.log({"b": 7.0}, step=1)  # warned once only
    rows = history_rows(run)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert rows[2]["a"] == -1.0 and rows[1]["b"] == 7.0 and rows[1]["a"] == 1.0


def test_bad_step():
    with gradexp.init("p") as run:
        with pytest.raises(TypeError):
            run.log({"a": 1}, step=1.5)
        with pytest.raises(ValueError):
            run.log({"a": 1}, step=-1)
        run.log({"a": 1}, step=np.int64(3))
    assert history_rows(run)[0]["step"] == 3


def test_bad_input_raises_before_anything_is_queued():
    with gradexp.init("p") as run:
        with pytest.raises(TypeError, match="'x/bad'"):
            run.log({"good": 1.0, "x": {"bad": {1, 2}}})
        run.log({"good": 2.0})
    rows = history_rows(run)
    assert [r["good"] for r in rows] == [2.0]


def test_summary_config_and_status():
    with gradexp.init("p", config={"lr": 0.1}, tags=["a"], notes="n") as run:
        run.log({"loss": 3.0, "acc": 0.5})
        run.log({"loss": 2.0})
        run.summary["best"] = 0.9
        run.config["epochs"] = 3
        assert gradexp.Api().run(run.dir).status == "running"
    r = gradexp.Api().run(run.dir)
    assert r.summary == {"loss": 2.0, "acc": 0.5, "best": 0.9}
    assert r.config == {"lr": 0.1, "epochs": 3}
    assert (r.status, r.tags, r.notes) == ("finished", ["a"], "n")


def test_exception_in_with_marks_failed():
    with pytest.raises(RuntimeError):
        with gradexp.init("p") as run:
            run.log({"a": 1.0})
            raise RuntimeError("boom")
    r = gradexp.Api().run(run.dir)
    assert r.status == "failed" and r.history().num_rows == 1


def test_module_level_log_goes_to_most_recent_run():
    first = gradexp.init("p")
    second = gradexp.init("p")
    gradexp.log({"x": 2.0})
    gradexp.finish()  # finishes `second`
    gradexp.log({"x": 1.0})
    gradexp.finish()
    assert history_rows(first)[0]["x"] == 1.0 and history_rows(second)[0]["x"] == 2.0
    with pytest.raises(gradexp.UsageError, match="init"):
        gradexp.log({"x": 3.0})


def test_log_after_finish_raises():
    run = gradexp.init("p")
    run.finish()
    run.finish()  # idempotent
    with pytest.raises(gradexp.UsageError, match="finished"):
        run.log({"a": 1})


def test_disabled_mode_is_a_no_op(tmp_path):
    run = gradexp.init("p", mode="disabled")
    run.log({"a": 1.0, "t": np.zeros(3)})
    run.log({"anything": object()})  # not even validated
    run.flush()
    run.finish()
    assert run.dir is None and not (tmp_path / "gradexp-runs").exists()


def test_flush_makes_data_readable_while_running():
    run = gradexp.init("p", flush_interval=60)
    run.log({"a": 1.0, "t": np.arange(4.0)})
    run.flush(fsync=True)
    r = gradexp.Api().run(run.dir)
    assert r.history().column("a").to_pylist() == [1.0]
    assert np.array_equal(r.tensor("t", 0), np.arange(4.0))
    run.log({"a": 2.0})
    run.flush()
    assert r.history().column("a").to_pylist() == [1.0, 2.0]
    run.finish()


def test_parts_seal_by_size_and_age(tmp_path):
    with gradexp.init("p", part_max_bytes=200_000, small_tensor_bytes=1024) as run:
        for s in range(20):
            run.log({"t": np.random.default_rng(s).standard_normal(20_000).astype(np.float32)})
    names = sorted(p.name for p in (run.dir / "parts").iterdir())
    assert len([n for n in names if n.startswith("tensors-")]) >= 5
    assert all(n.endswith(".gxp") for n in names), names
    r = gradexp.Api().run(run.dir)
    assert r.steps("t") == list(range(20))
    assert np.array_equal(r.tensor("t", 13),
                          np.random.default_rng(13).standard_normal(20_000).astype(np.float32))


def test_unknown_run_reference():
    with pytest.raises(gradexp.RunNotFoundError, match="nope"):
        gradexp.Api().run("nope")
    with gradexp.init("p") as run:
        run.log({"t": np.zeros(2)})
    r = gradexp.Api().run(run.dir)
    with pytest.raises(KeyError, match="'missing'.*tensor keys: t"):
        r.tensor("missing", 0)
    with pytest.raises(KeyError, match="no step 5"):
        r.tensor("t", 5)
    with pytest.raises(KeyError, match="nokey"):
        r.history(keys=["nokey"])


def test_long_drains_keep_every_row(monkeypatch):
    """Rows past the per-frame row limit within one drain of the queue were once lost."""
    from gradexp.write import writer as _writer

    monkeypatch.setattr(_writer, "_HISTORY_MAX_ROWS", 1000)
    with gradexp.init("p", flush_interval=30) as run:  # no timed flush: one long drain at finish
        for s in range(5500):
            run.log({"a": float(s)})
    table = gradexp.Api().run(run.dir).history()
    assert table.column("a").to_pylist() == [float(s) for s in range(5500)]


def test_logging_imports_no_heavy_modules(tmp_path):
    """`import gradexp` and an offline run never import pandas, torch or requests, and
    `import gradexp` alone does not import pyarrow (the writer imports it in the background)."""
    import subprocess
    import sys

    code = (
        "import sys, numpy as np, gradexp\n"
        "light = 'pyarrow' not in sys.modules\n"
        f"run = gradexp.init('p', dir={str(tmp_path)!r})\n"
        "run.log({'a': 1.0, 't': np.zeros((600, 600), np.float32)})\n"
        "run.finish()\n"
        "print(light, sorted(m for m in ('pandas', 'torch', 'requests') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "[]"]


def test_module_level_log_in_a_forked_child_warns_and_records_nothing(tmp_path):
    run = gradexp.init("p", dir=tmp_path)
    run.log({"a": 1.0})
    pid = os.fork()
    if pid == 0:  # the child: must neither raise nor write to the parent's run
        code = 3
        try:
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                gradexp.log({"a": -1.0})
                gradexp.finish()
            code = 0 if any("forked child" in str(w.message) for w in seen) else 4
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    run.finish()
    assert history_rows(run)[0]["a"] == 1.0 and len(history_rows(run)) == 1
