"""The distribution, compare and gradient-flow computations over real run folders: every step,
common edges, exact counts and quantiles, incremental for live runs, and the first step at
which two runs differ."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

import gradexp
from gradexp.explorer.distributions import build_distribution, first_differing_step, layers_table
from gradexp.explorer.stats import QUANTILES


class Counting:
    """A reader that counts the tensors read through it and may alter its history."""

    def __init__(self, inner: Any, *, history: Any = None) -> None:
        self.inner = inner
        self.reads: list[int] = []
        self._history = history

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def history(self, keys: Any = None) -> pa.Table:
        if self._history is not None:
            return self._history(self.inner.history(keys))
        return self.inner.history(keys)

    def tensors(self, key: str, steps: Iterable[int] | None = None, *,
                reuse: bool = False) -> Iterator[tuple[int, np.ndarray]]:
        for step, a in self.inner.tensors(key, steps, reuse=reuse):
            self.reads.append(step)
            yield step, a


def _tensors(n_steps: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for s in range(n_steps):
        a = (rng.standard_normal((7, 13)) * (1 + s)).astype(np.float32)
        if s % 3 == 1:
            a[0, :4] = [np.nan, np.inf, -np.inf, np.nan]
        a[1, :s % 5] = 0
        out.append(a)
    return out


def _log(d: Any, arrays: list[np.ndarray], steps: list[int] | None = None, key: str = "grad/w") -> Any:
    with gradexp.init("p", dir=d) as run:
        for step, a in zip(steps or range(len(arrays)), arrays):
            run.log({key: a}, step=step)
    return gradexp.Api().run(run.dir)


def _assert_exact(dist: Any, arrays: list[np.ndarray], steps: list[int]) -> None:
    assert dist.steps.tolist() == steps
    finite_all = np.concatenate([a[np.isfinite(a)] for a in arrays])
    assert dist.edges[0] == finite_all.min() and dist.edges[-1] == finite_all.max()
    for i, a in enumerate(arrays):
        f = a[np.isfinite(a)]
        np.testing.assert_array_equal(dist.counts[i], np.histogram(f, dist.edges)[0])
        assert dist.counts[i].sum() == f.size  # nothing dropped
        assert (dist.nan[i], dist.posinf[i], dist.neginf[i], dist.zero[i]) == (
            np.isnan(a).sum(), np.isposinf(a).sum(), np.isneginf(a).sum(), (a == 0).sum())
        np.testing.assert_array_equal(dist.quantiles[i], np.quantile(f.astype(np.float64), QUANTILES))


@pytest.mark.parametrize("scale", ["linear", "symlog"])
@pytest.mark.parametrize("workers", [1, 3])
def test_every_step_on_common_edges(tmp_path, scale, workers):
    arrays = _tensors(11)
    steps = [s * 10 for s in range(11)]
    r = Counting(_log(tmp_path, arrays, steps))
    dist = build_distribution(r, "grad/w", bins=32, scale=scale, workers=workers)
    _assert_exact(dist, arrays, steps)
    assert sorted(r.reads) == steps  # one pass: the range came from the summaries
    assert dist.counts.shape == (11, 32)


def test_summaries_that_disagree_or_are_missing(tmp_path):
    arrays = _tensors(6)
    r = _log(tmp_path, arrays)

    def narrower(table: pa.Table) -> pa.Table:  # every summary claims a smaller range
        col = table.column("grad/w").combine_chunks()
        fields = {f.name: col.field(f.name) for f in col.type}
        fields["min"] = pc.multiply(fields["min"], 0.5)
        fields["max"] = pc.multiply(fields["max"], 0.5)
        return table.set_column(table.column_names.index("grad/w"), "grad/w",
                                pa.StructArray.from_arrays(list(fields.values()), list(fields)))

    def without(table: pa.Table) -> pa.Table:
        return table.drop_columns(["grad/w"])

    for alter in (narrower, without):
        _assert_exact(build_distribution(Counting(r, history=alter), "grad/w", bins=20),
                      arrays, list(range(6)))


def test_live_run_adds_new_steps_incrementally(tmp_path):
    arrays = _tensors(9)
    first = _log(tmp_path / "a", arrays[:6])
    base = build_distribution(first, "grad/w", bins=16)
    # the same run later: three more steps, inside the first six's range
    inside = [a / 100 for a in arrays[6:]]
    r = Counting(_log(tmp_path / "b", arrays[:6] + inside))
    grown = build_distribution(r, "grad/w", bins=16, previous=base)
    assert sorted(r.reads) == [6, 7, 8]  # (read by two threads: in either order)
    np.testing.assert_array_equal(grown.edges, base.edges)
    fresh = build_distribution(r, "grad/w", bins=16)
    assert grown.counts[6:].sum() == fresh.counts[6:].sum()
    for i, a in enumerate(arrays[:6] + inside):
        np.testing.assert_array_equal(grown.counts[i], np.histogram(a[np.isfinite(a)], grown.edges)[0])
    # three more steps outside: new edges, every step recounted, no pass for the range
    outside = [a * 100 for a in arrays[6:]]
    r = Counting(_log(tmp_path / "c", arrays[:6] + outside))
    regrown = build_distribution(r, "grad/w", bins=16, previous=base)
    assert sorted(r.reads) == sorted([6, 7, 8, *range(9)])
    _assert_exact(regrown, arrays[:6] + outside, list(range(9)))
    # nothing new: the cached result itself
    assert build_distribution(first, "grad/w", bins=16, previous=base) is base


def test_distribution_of_all_nonfinite_and_constant_steps(tmp_path):
    arrays = [np.full(5, np.nan, np.float32), np.full(5, 2.0, np.float32), np.zeros(0, np.float32)]
    dist = build_distribution(_log(tmp_path, arrays), "grad/w", bins=4)
    assert dist.edges[0] == 1.5 and dist.edges[-1] == 2.5  # one value: np.histogram's range
    assert dist.nan.tolist() == [5, 0, 0] and dist.counts.sum(axis=1).tolist() == [0, 5, 0]
    assert np.isnan(dist.quantiles[0]).all() and (dist.quantiles[1] == 2.0).all()


def test_parameters_are_checked(tmp_path):
    r = _log(tmp_path, _tensors(2))
    for kwargs, word in (({"bins": 0}, "bins"), ({"scale": "log"}, "scale"),
                         ({"scale": "symlog", "linthresh": -1.0}, "linthresh")):
        with pytest.raises(ValueError, match=word):
            build_distribution(r, "grad/w", **kwargs)
    with pytest.raises(KeyError, match="nope"):
        build_distribution(r, "nope")


def test_first_differing_step(tmp_path):
    arrays = _tensors(8)
    a = Counting(_log(tmp_path / "a", arrays))
    same = _log(tmp_path / "same", [x.copy() for x in arrays])
    assert first_differing_step(a, same, "grad/w") is None
    changed = [x.copy() for x in arrays]
    changed[5][3, 3] = np.nextafter(changed[5][3, 3], np.float32(np.inf))  # one ulp
    changed[7][0, 0] += 1
    b = _log(tmp_path / "b", changed)
    a.reads.clear()
    assert first_differing_step(a, b, "grad/w") == 5
    assert a.reads == [0, 1, 2, 3, 4, 5]  # stops at the first difference
    zero = [x.copy() for x in arrays]
    zero[2][1, 0] = -zero[2][1, 0]  # 0.0 -> -0.0: equal as numbers, not as bits
    assert first_differing_step(a, _log(tmp_path / "z", zero), "grad/w") == 2
    shorter = _log(tmp_path / "short", arrays[:3] + arrays[4:], steps=[0, 1, 2, 4, 5, 6, 7])
    assert first_differing_step(a, shorter, "grad/w") == 3  # step 3 is logged in one run only


def test_layers_equal_numpy(tmp_path):
    rng = np.random.default_rng(3)
    logged: dict[str, dict[int, np.ndarray]] = {"grad/fc1": {}, "grad/fc2": {}}
    with gradexp.init("p", dir=tmp_path) as run:
        for step in range(5):
            row: dict[str, Any] = {"loss": 1.0, "act/fc1": rng.standard_normal(3)}
            for k, n in (("grad/fc1", 40_000), ("grad/fc2", 300)):
                if k == "grad/fc2" and step == 2:
                    continue
                a = rng.standard_normal(n).astype(np.float32)
                a[: step * 10] = 0
                if step == 3:
                    a[-1] = np.nan
                row[k] = logged[k][step] = a
            run.log(row, step=step)
    r = gradexp.Api().run(run.dir)
    for stat in ("l2", "rms", "maxabs", "zero_frac", "nonfinite"):
        t = layers_table(r, "grad/", stat)
        assert t.column_names == ["step", "grad/fc1", "grad/fc2"]
        assert t.column("step").to_pylist() == list(range(5))
        for k, by_step in logged.items():
            got = t.column(k).to_numpy()
            for step in range(5):
                if step not in by_step:
                    assert np.isnan(got[step])
                    continue
                a = by_step[step]
                f = a[np.isfinite(a)].astype(np.float64)
                want = {"l2": np.sqrt(np.sum(f * f)), "rms": np.sqrt(np.mean(f * f)),
                        "maxabs": np.abs(f).max(), "zero_frac": np.mean(a == 0),
                        "nonfinite": np.count_nonzero(~np.isfinite(a))}[stat]
                if stat in ("l2", "rms"):
                    assert got[step] == pytest.approx(want, rel=1e-6)
                else:
                    assert got[step] == want
    # a reader whose history has no summaries: computed from the tensors, same answer
    bare = Counting(r, history=lambda t: t.drop_columns([c for c in t.column_names if c.startswith("grad/")]))
    for stat in ("maxabs", "nonfinite", "zero_frac"):
        got, want = layers_table(bare, "grad/", stat), layers_table(r, "grad/", stat)
        assert got.column_names == want.column_names
        for name in got.column_names:
            np.testing.assert_array_equal(got.column(name).to_numpy(), want.column(name).to_numpy())
    assert bare.reads
    with pytest.raises(KeyError, match="nothing/"):
        layers_table(r, "nothing/", "l2")
    with pytest.raises(ValueError, match="stat"):
        layers_table(r, "grad/", "mean")


@pytest.mark.parametrize("workers", [1, 2])
def test_half_precision_steps_batched_in_frames_equal_numpy(tmp_path, workers):
    """Small float16/bfloat16 tensors (several steps in one stored frame, each sorted in place
    in the frame's reused buffer) with NaN, ±Inf, ±0 and subnormals: every step's counts,
    strips and quantiles equal NumPy's on the values widened to float64."""
    import ml_dtypes

    rng = np.random.default_rng(5)
    for dtype in (np.float16, ml_dtypes.bfloat16):
        tiny = float(ml_dtypes.finfo(dtype).smallest_subnormal)
        arrays = []
        for s in range(12):
            a = (rng.standard_normal(40) * 10.0 ** (s % 4 - 2)).astype(dtype)
            a[: s % 6] = np.array([np.nan, np.inf, -np.inf, -0.0, tiny, 0.0][: s % 6], dtype=dtype)
            arrays.append(a)
        key = f"grad/{np.dtype(dtype).name}"
        r = _log(tmp_path / key.replace("/", "-"), arrays, key=key)
        dist = build_distribution(r, key, bins=24, scale="symlog", workers=workers)
        for i, a in enumerate(arrays):
            v = a.astype(np.float64)
            f = v[np.isfinite(v)]
            np.testing.assert_array_equal(dist.counts[i], np.histogram(f, dist.edges)[0])
            assert (dist.nan[i], dist.posinf[i], dist.neginf[i], dist.zero[i]) == (
                np.isnan(v).sum(), np.isposinf(v).sum(), np.isneginf(v).sum(), (v == 0).sum())
            np.testing.assert_array_equal(dist.quantiles[i], np.quantile(f, QUANTILES))
        assert r.tensor(key, 7).tobytes() == arrays[7].tobytes()  # the run is as it was
