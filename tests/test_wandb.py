"""The wandb-style surface (issue #12): a wandb script under ``import gradexp as wandb``,
resume, settable metadata, define_metric summaries, media, the original gradexp package's
calls, and precision=.

What is promised: what a wandb user writes either works and is saved (read back through a
new ``Api()``, locally and from a real server) or raises an ``AttributeError`` naming the
closest gradexp call; nothing is accepted and dropped.
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import gradexp
from services import GradexpServer, clean_env, same_bits, wait_for

USER = "wb"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("wandb")
    s = GradexpServer(work, db_url=f"sqlite:///{work / 'gradexp.db'}", store_url=str(work / "objects"))
    s.key = s.user_with_key(USER)
    s.start()
    yield s
    s.stop()


def online(server, **kw):
    return gradexp.init(mode="online", host=server.url, api_key=server.key, **kw)


def remote(server, project, run_id):
    return gradexp.Api(host=server.url, api_key=server.key).run(f"{USER}/{project}/{run_id}")


# -- a wandb script, unchanged ------------------------------------------------------------------

WANDB_SCRIPT = """
import sys
import torch
from torch import nn
import gradexp as wandb

assert wandb.run is None
wandb.init(project="mnist", config={"lr": 0.05, "epochs": 2}, tags=["baseline"], group="sweep-1",
           job_type="train", notes="first try")
config = wandb.config
model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
opt = torch.optim.SGD(model.parameters(), lr=config.lr)
wandb.watch(model, log="all", log_freq=1)
wandb.define_metric("val/loss", summary="min")
wandb.define_metric("train/*", step_metric="epoch")
torch.manual_seed(0)
x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
for epoch in range(wandb.config.epochs):
    for i in range(3):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        wandb.log({"train/loss": loss.item(), "epoch": epoch})
    wandb.log({"val/loss": [0.9, 0.7][epoch]})
wandb.config.batch_size = 16
wandb.config.update({"optimizer": "sgd"})
wandb.run.summary["best_epoch"] = 0
wandb.summary.final = "done"
wandb.run.name = "renamed"
wandb.run.tags = wandb.run.tags + ("keep",)
print(wandb.run.id, wandb.run.dir)
wandb.finish()
assert wandb.run is None
"""


def test_a_typical_wandb_script_runs_unchanged_and_everything_it_sets_is_saved(tmp_path):
    r = subprocess.run([sys.executable, "-c", WANDB_SCRIPT], capture_output=True, text=True,
                       env=clean_env(), cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    run_id, run_dir = r.stdout.split()
    run = gradexp.Api().run(run_dir)  # a new reader, another process than the writer
    assert run.status == "finished"
    assert run.name == "renamed" and run.tags == ["baseline", "keep"] and run.notes == "first try"
    assert run.group == "sweep-1" and run.job_type == "train"
    assert run.config == {"lr": 0.05, "epochs": 2, "batch_size": 16, "optimizer": "sgd"}
    s = run.summary
    assert s["val/loss"] == {"min": 0.7} and s["best_epoch"] == 0 and s["final"] == "done"
    logged = [v for v in run.history(["train/loss"]).column("train/loss").to_pylist() if v is not None]
    assert len(logged) == 6 and s["train/loss"] == logged[-1]
    assert run.meta["metrics"] == {"val/loss": {"summary": "min"}, "train/*": {"step_metric": "epoch"}}
    h = run.history()
    assert h.column("step").to_pylist() == list(range(8))
    assert any(k.startswith("grad/") for k in run.tensor_keys())
    assert run.steps("param/0.weight")[:3] == [0, 1, 2]


def test_run_config_and_summary_before_init_say_to_call_init():
    assert gradexp.run is None
    with pytest.raises(gradexp.UsageError, match=r"gradexp.init\(\) before gradexp.config.lr"):
        gradexp.config.lr  # noqa: B018
    with pytest.raises(gradexp.UsageError, match=r"gradexp.init\(\) before gradexp.summary\['x'\]"):
        gradexp.summary["x"] = 1
    run = gradexp.init(config={"lr": 1})
    assert gradexp.run is run and gradexp.config.lr == 1 and "lr" in gradexp.config
    run.finish()
    assert gradexp.run is None
    with pytest.raises(gradexp.UsageError):
        gradexp.config.lr  # noqa: B018
    gradexp.finish()  # as wandb.finish(): nothing to finish is no error (cleanup paths call it)
    with pytest.raises(gradexp.UsageError, match=r"gradexp.init\(\) before gradexp.log"):
        gradexp.log({"x": 1})  # but logging to no run is


@pytest.mark.parametrize("name", ["Artifact", "log_artifact", "use_artifact", "save", "alert", "Video",
                                  "Audio", "sweep", "agent", "plot", "log_model", "mark_preempting"])
def test_unsupported_wandb_module_attributes_raise_naming_the_closest_call(name):
    with pytest.raises(AttributeError, match=rf"gradexp does not support wandb's {name}; .*gradexp"):
        getattr(gradexp, name)
    assert not hasattr(gradexp, name)


@pytest.mark.parametrize("name", ["log_artifact", "use_artifact", "save", "restore", "alert", "log_code",
                                  "mark_preempting", "sweep_id"])
def test_unsupported_wandb_run_attributes_raise_naming_the_closest_call(name):
    run = gradexp.init()
    with pytest.raises(AttributeError, match=rf"wandb's run.{name}; "):
        getattr(run, name)
    with pytest.raises(AttributeError, match="has no attribute 'no_such_thing'"):
        run.no_such_thing  # noqa: B018


@pytest.mark.parametrize("kw", [{"save_code": True}, {"sync_tensorboard": True}, {"fork_from": "x"}])
def test_unsupported_wandb_init_arguments_are_refused_not_dropped(kw):
    with pytest.raises(TypeError, match=f"does not support wandb's {next(iter(kw))}="):
        gradexp.init(**kw)


def test_mutable_looking_metadata_is_either_saved_or_refused():
    run = gradexp.init(tags=["a"])
    with pytest.raises(AttributeError):
        run.tags.append("b")  # a tuple, as wandb's: appending cannot be silently lost
    run.tags = ["a", "b"]
    run.notes = "n"
    run.finish()
    with pytest.raises(gradexp.UsageError, match="finished"):
        run.name = "late"
    r = gradexp.Api().run(run.dir)
    assert r.tags == ["a", "b"] and r.notes == "n" and r.name == run.id


def test_define_metric_summaries():
    run = gradexp.init()
    run.define_metric("loss", summary="min,max,mean,last,first")
    run.define_metric("val/*", summary="max")
    run.define_metric("noise", summary="none")
    for v in (3.0, 1.0, 2.0):
        gradexp.log({"loss": v, "val/acc": v / 10, "noise": v, "plain": v})
    run.finish()
    s = gradexp.Api().run(run.dir).summary
    assert s["loss"] == {"min": 1.0, "max": 3.0, "mean": 2.0, "last": 2.0, "first": 3.0}
    assert s["val/acc"] == {"max": 0.3} and "noise" not in s and s["plain"] == 2.0
    with pytest.raises(ValueError, match="summary must be"):
        gradexp.init().define_metric("x", summary="median")


def test_reinit():
    a = gradexp.init()
    assert gradexp.init(reinit="return_previous") is a
    b = gradexp.init(reinit=True)  # finish_previous
    assert gradexp.Api().run(a.dir).status == "finished" and gradexp.run is b


# -- resume ----------------------------------------------------------------------------------------

def test_resume_continues_the_steps_parts_config_and_summary_of_a_run(tmp_path):
    first = gradexp.init(project="p", id="r1", config={"lr": 0.1}, group="g")
    for i in range(5):
        gradexp.log({"loss": float(i), "w": np.full(3, i, np.float32)})
    first.finish()
    with pytest.raises(FileExistsError, match="resume='allow'"):
        gradexp.init(project="p", id="r1")
    with pytest.raises(FileExistsError):
        gradexp.init(project="p", id="r1", resume="never")
    with pytest.raises(gradexp.RunNotFoundError, match="resume='must'"):
        gradexp.init(project="p", id="nope", resume="must")
    again = gradexp.init(project="p", id="r1", resume="must", config={"epochs": 2})
    assert again.resumed and again.step == 5 and again.group == "g"
    assert dict(again.config) == {"lr": 0.1, "epochs": 2}
    for i in range(5, 8):
        gradexp.log({"loss": float(i), "w": np.full(3, i, np.float32)})
    with pytest.raises(TypeError, match="was logged as a number before"):
        gradexp.log({"loss": "text"})  # a key keeps its kind across the resume
    again.finish()
    r = gradexp.Api().run("p/r1")
    assert r.history().column("step").to_pylist() == list(range(8))
    assert r.history().column("loss").to_pylist() == [float(i) for i in range(8)]
    assert r.steps("w") == list(range(8)) and same_bits(r.tensor("w", 7), np.full(3, 7, np.float32))
    assert r.status == "finished" and r.summary["loss"] == 7.0 and r.config == {"lr": 0.1, "epochs": 2}


def test_resume_keeps_what_define_metric_asked_of_the_summary():
    # A resumed script need not call define_metric again: the rules saved in run.json apply.
    first = gradexp.init(project="p", id="dm")
    gradexp.define_metric("val/*", summary="min,last")
    gradexp.define_metric("val/acc", summary="max")
    for v in (0.5, 0.3, 0.4):
        gradexp.log({"val/loss": v, "val/acc": 1 - v, "loss": v})
    first.finish()
    again = gradexp.init(project="p", id="dm", resume="allow")
    gradexp.log({"val/loss": 0.9, "val/acc": 0.1, "loss": 0.9})
    assert again.summary["val/loss"] == {"min": 0.3, "last": 0.9}
    again.finish()
    s = gradexp.Api().run("p/dm").summary
    assert s["val/loss"] == {"min": 0.3, "last": 0.9} and s["val/acc"] == {"max": 0.7} and s["loss"] == 0.9


def test_resume_a_crashed_run_recovers_its_open_parts(tmp_path):
    code = textwrap.dedent("""
        import os, numpy as np, gradexp
        run = gradexp.init(project="p", id="crash")
        for i in range(4):
            gradexp.log({"loss": float(i), "w": np.full(3, i, np.float32)})
        run.flush()
        os._exit(9)
    """)
    r = subprocess.run([sys.executable, "-c", code], env=clean_env(), cwd=tmp_path, timeout=120)
    assert r.returncode == 9
    assert gradexp.Api().run("p/crash").status == "crashed"
    run = gradexp.init(project="p", id="crash", resume="allow")
    assert run.step == 4
    gradexp.log({"loss": 4.0, "w": np.full(3, 4, np.float32)})
    run.finish()
    read = gradexp.Api().run("p/crash")
    assert read.history().column("loss").to_pylist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert read.steps("w") == [0, 1, 2, 3, 4] and read.status == "finished"


def test_a_live_run_cannot_be_resumed_beside_itself():
    gradexp.init(project="p", id="live")
    with pytest.raises(gradexp.UsageError, match="still running"):
        gradexp.init(project="p", id="live", resume="allow")


def test_resume_online_appends_to_the_run_on_the_server(server):
    first = online(server, project="res", id="on1", config={"lr": 1}, group="grp", job_type="eval")
    for i in range(4):
        gradexp.log({"loss": float(i), "w": np.full(5, i, np.float64)})
    first.finish()
    r = remote(server, "res", "on1")
    assert r.status == "finished" and r.history().num_rows == 4
    again = online(server, project="res", id="on1", resume="allow")
    assert again.step == 4
    wait_for(lambda: remote(server, "res", "on1").status == "running", "the run reopened on the server",
             timeout=60, interval=0.2)
    for i in range(4, 7):
        gradexp.log({"loss": float(i), "w": np.full(5, i, np.float64)})
    again.finish()
    r = remote(server, "res", "on1")
    assert r.status == "finished"
    assert r.history().column("step").to_pylist() == list(range(7))
    assert r.history().column("loss").to_pylist() == [float(i) for i in range(7)]
    assert r.steps("w") == list(range(7)) and same_bits(r.tensor("w", 6), np.full(5, 6, np.float64))
    assert r.group == "grp" and r.job_type == "eval" and r.summary["loss"] == 6.0


def test_online_metadata_changes_reach_the_server_and_url_is_the_run_page(server):
    run = online(server, project="meta", id="m1", config={"lr": 1}, tags=["a"])
    assert run.url == f"{server.url}/{USER}/meta/m1" and run.path == f"{USER}/meta/m1"
    run.config.epochs = 3
    run.name = "named"
    run.tags = ["a", "b"]
    run.notes = "note"
    gradexp.log({"x": 1.0})

    def seen():
        r = remote(server, "meta", "m1")
        return r if (r.config.get("epochs") == 3 and r.name == "named") else None
    wait_for(seen, "config and name on the server while the run is live", timeout=60, interval=0.2)
    run.finish()
    r = gradexp.Api(host=server.url, api_key=server.key).run(f"{USER}/meta/m1")  # a new reader
    assert r.config == {"lr": 1, "epochs": 3} and r.name == "named" and r.tags == ["a", "b"]
    assert r.notes == "note"
    assert gradexp.init(project="meta", id="off").url is None


# -- media ------------------------------------------------------------------------------------------

def _media_run(**init):
    from PIL import Image as PILImage

    rng = np.random.default_rng(0)
    values = rng.standard_normal(1000).astype(np.float32)
    counts, edges = np.histogram(rng.standard_normal(50), bins=7)
    pixels = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    floats = rng.random((4, 4))
    run = gradexp.init(**init)
    gradexp.log({"h": gradexp.Histogram(values, num_bins=20),
                 "hc": gradexp.Histogram(np_histogram=(counts, edges)),
                 "img": gradexp.Image(pixels, caption="a cat"),
                 "pil": gradexp.Image(PILImage.fromarray(pixels)),
                 "gray": gradexp.Image(floats),
                 "tab": gradexp.Table(columns=["id", "label", "score"], data=[[1, "a", 0.5], [2, "b", 0.25]])})
    run.finish()
    return run, values, counts, edges, pixels, floats


def _check_media(r, values, counts, edges, pixels, floats):
    h = r.media("h", 0)
    assert isinstance(h, gradexp.Histogram) and same_bits(h.values, values)
    want_counts, want_edges = np.histogram(values, bins=20)
    assert (h.histogram == want_counts).all() and same_bits(h.bins, want_edges.astype(np.float64))
    hc = r.media("hc", 0)
    assert hc.values is None and (hc.histogram == counts).all() and same_bits(hc.bins, edges.astype(np.float64))
    img = r.media("img", 0)
    assert isinstance(img, gradexp.Image) and img.caption == "a cat" and same_bits(img.array, pixels)
    assert same_bits(r.tensor("img", 0), pixels)  # stored as the uint8 tensor
    assert same_bits(r.media("pil", 0).array, pixels) and r.media("pil", 0).caption is None
    assert same_bits(r.media("gray", 0).array, np.rint(floats * 255).astype(np.uint8))
    tab = r.media("tab", 0)
    assert isinstance(tab, gradexp.Table) and tab.columns == ["id", "label", "score"]
    assert tab.data == [[1, "a", 0.5], [2, "b", 0.25]] and tab.to_arrow().num_rows == 2


def test_media_round_trip_locally():
    run, *expected = _media_run()
    _check_media(gradexp.Api().run(run.dir), *expected)


def test_media_round_trip_through_the_server(server):
    run, *expected = _media_run(mode="online", host=server.url, api_key=server.key, project="media")
    _check_media(remote(server, "media", run.id), *expected)


def test_image_and_histogram_refuse_what_they_cannot_store():
    with pytest.raises(ValueError, match="shape"):
        gradexp.Image(np.zeros((2, 3, 5)))
    with pytest.raises(ValueError, match="one of them"):
        gradexp.Histogram()
    with pytest.raises(ValueError, match="edges"):
        gradexp.Histogram(np_histogram=([1, 2], [0.0, 1.0]))
    with pytest.raises(ValueError, match="2 values for 3 columns"):
        gradexp.Table(columns=["a", "b", "c"], data=[[1, 2]])


# -- the original gradexp package's calls -----------------------------------------------------------

def test_original_package_calls(server):
    import torch

    run = gradexp.init(project_name="orig", run_name="first", mode="online", host=server.url,
                       api_key=server.key)
    assert run.project == "orig" and run.name == "first"
    t = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    gradexp.log(t, name="acts", dimension_labels=["batch", "head", "dim"], step=3)
    gradexp.log(np.ones(2), name="plain", step=4)
    model = torch.nn.Linear(3, 2)
    model(torch.ones(1, 3)).sum().backward()
    gradexp.log_model_tensors(model, step=5)
    gradexp.log({"loss": 1.0})
    with pytest.raises(ValueError, match="name 2 dimensions; the tensor has 3"):
        gradexp.log(t, name="acts", dimension_labels=["a", "b"])
    with pytest.raises(TypeError, match="name="):
        gradexp.log(t)
    run.finish()
    for r in (gradexp.Api().run(run.dir), remote(server, "orig", run.id)):
        assert r.steps("acts") == [3] and same_bits(r.tensor("acts", 3), t.numpy())
        assert r.dims("acts") == ("batch", "head", "dim") and r.dims("plain") is None
        assert same_bits(r.tensor("param/weight", 5), model.weight.detach().numpy())
        assert same_bits(r.tensor("grad/weight", 5), model.weight.grad.numpy())
    with pytest.raises(ValueError, match="give one of them"):
        gradexp.init(project="a", project_name="b")


def _bf16_rne(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, round to nearest, ties to even (written out, no library)."""
    u = x.view(np.uint32).astype(np.uint64)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    rounded[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)  # quiet NaN, sign kept
    return rounded


@pytest.mark.parametrize("size", [1000, 300_000])  # grouped small tensors, and one large frame
def test_precision_bf16_stores_round_to_nearest_even(size):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(size) * 10).astype(np.float32)
    ties = np.array([0x3F808000, 0x3F818000, 0xBF808000, 0x3F80FFFF, 0x7F7FFFFF], np.uint32).view(np.float32)
    x[:5] = ties  # exactly halfway: down to even, up to even; and one that rounds up to infinity
    run = gradexp.init(precision="bf16")
    gradexp.log({"x": x, "d": x.astype(np.float64), "i": np.arange(5), "h": np.ones(3, np.float16)})
    run.finish()
    r = gradexp.Api().run(run.dir)
    got = r.tensor("x", 0)
    assert got.dtype.name == "bfloat16" and got.shape == x.shape
    assert (got.view(np.uint16) == _bf16_rne(x)).all()
    assert got.view(np.uint16)[4] == 0x7F80  # the largest float32 rounds to +inf
    assert r.tensor("d", 0).dtype.name == "bfloat16"
    assert r.tensor("i", 0).dtype == np.int64 and r.tensor("h", 0).dtype == np.float16  # not floats wider
    assert r.history()["x"][0].as_py()["count"] == size


def test_precision_fp16_and_default_keep():
    x = np.array([1 / 3, 65520.0, 1e-8, math.pi], np.float64)
    run = gradexp.init(precision="fp16")
    gradexp.log({"x": x})
    run.finish()
    got = gradexp.Api().run(run.dir).tensor("x", 0)
    with np.errstate(over="ignore"):
        want = x.astype(np.float16)  # NumPy's cast: round to nearest even, 65520 to inf
    assert got.dtype == np.float16 and same_bits(got, want) and np.isinf(got[1])
    run = gradexp.init()
    gradexp.log({"x": x})
    run.finish()
    assert same_bits(gradexp.Api().run(run.dir).tensor("x", 0), x)
    with pytest.raises(ValueError, match="precision must be one of"):
        gradexp.init(precision="fp8")
