"""The explorer's tensor views (issue #11, views 4 and 6): the endpoints in
gradexp/explorer/tensors.py through the app `gradexp ui` serves, and the page driven in Debian's
Chromium over a real `gradexp ui` process.

The promise under test: a tensor whose elements encode their own index (a[i, j] = 1000*i + j,
and the like for 1-D, 3-D and 4-D) reads back, under the pointer at that index, the value the
index encodes, for every dtype; with the axes swapped, in small multiples and in the 3-D view.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pyarrow as pa
import pytest
import requests
import zstandard

import gradexp
from services import HOST, GradexpServer, WebSession, _stop, clean_env, free_port, run_python, wait_for

SHOTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "screenshots"
TOKEN = "tensor-views-test-token"
RUN = "idxrun"
STEPS = (0, 10, 20)
XSS = "<img src=x onerror=alert(1)>"


def encode(shape: tuple[int, ...], base: int) -> np.ndarray:
    """a[i0, ..., in-1] = sum(ik * base**(n-1-k)): every element names its own index."""
    idx = np.indices(shape, dtype=np.int64)
    return sum((i * base ** (len(shape) - 1 - k) for k, i in enumerate(idx)), np.zeros(shape, np.int64))


def decode(index: list[int], base: int) -> int:
    return sum(i * base ** (len(index) - 1 - k) for k, i in enumerate(index))


# key -> (array, base): bases keep every value exact in its dtype (float16: integers to 2048,
# bfloat16 to 256, uint8 to 255). int64 sits above 2**53, where a JavaScript Number would round.
I64_OFFSET = 2**60
CASES: dict[str, tuple[np.ndarray, int]] = {
    "idx/f32_1d": (encode((7,), 1000).astype(np.float32), 1000),
    "idx/f32_2d": (encode((3, 5), 1000).astype(np.float32), 1000),
    "idx/f32_3d": (encode((2, 3, 4), 100).astype(np.float32), 100),
    "idx/f32_4d": (encode((2, 3, 4, 5), 100).astype(np.float32), 100),
    "idx/f64_2d": (encode((4, 3), 1000).astype(np.float64), 1000),
    "idx/f16_2d": (encode((3, 5), 1000).astype(np.float16), 1000),
    "idx/bf16_2d": (encode((2, 7), 100).astype(ml_dtypes.bfloat16), 100),
    "idx/i64_2d": (encode((3, 5), 1000) + I64_OFFSET, 1000),
    "idx/u8_2d": (encode((2, 5), 100).astype(np.uint8), 100),
    "idx/i32_3d": (encode((3, 2, 4), 1000).astype(np.int32), 1000),
    "idx/wide_2d": (encode((40, 60), 1000).astype(np.float32), 1000),
    "idx/long_1d": (encode((5000,), 1000).astype(np.float32), 1000),
}
BOOL = np.indices((3, 4)).sum(axis=0) % 2 == 1


def per_step(step: int) -> dict[str, Any]:
    data: dict[str, Any] = {key: arr for key, (arr, _) in CASES.items()}
    data["idx/bool_2d"] = BOOL
    data["idx/c64_1d"] = (np.arange(3) - 1j * np.arange(3)).astype(np.complex64)
    data["step/x"] = np.full((2, 3), float(step), np.float32)
    data["step/scale"] = np.array([[-1.0, 1.0]], np.float32) * (step + 1)
    data[XSS] = np.zeros(3, np.float32)
    data["odd/empty"] = np.zeros((0, 5), np.float32)
    return data


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tensor-views")
    run = gradexp.init("p", id=RUN, dir=root, mode="offline")
    for s in STEPS:
        run.log(per_step(s), step=s)
    run.finish()
    return root


# -- the endpoints -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(run_dir: Path) -> Iterator[Any]:
    from starlette.testclient import TestClient

    from gradexp.explorer.ui import create_ui_app

    with TestClient(create_ui_app(run_dir, token=TOKEN), base_url=f"http://{HOST}") as c:
        assert c.get(f"/?token={TOKEN}").status_code == 200
        yield c


BASE = f"/_x/api/runs/local/p/{RUN}"


def fetch_tensor(client: Any, key: str, step: int, encoding: str = "identity") -> pa.Table:
    r = client.get(f"{BASE}/tensor", params={"key": key, "step": step}, headers={"Accept-Encoding": encoding})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/vnd.apache.arrow.stream"
    body = r.content
    if r.headers.get("content-encoding") == "zstd":  # httpx leaves zstd to us
        body = zstandard.ZstdDecompressor().decompressobj().decompress(body)
    return pa.ipc.open_stream(body).read_all()


def test_tensor_list_names_dtype_shape_and_step_count(client: Any) -> None:
    listed = {t["key"]: t for t in client.get(f"{BASE}/tensors").json()}
    expected = per_step(0)
    assert set(listed) == set(expected)
    for key, arr in expected.items():
        arr = np.asarray(arr)
        assert listed[key] == {"key": key, "dtype": arr.dtype.name, "shape": list(arr.shape),
                               "steps": len(STEPS), "dims": None}, key


def test_tensor_list_decodes_one_tensor_per_key_not_per_step(client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from gradexp.api import StoredRun

    app = client.app
    explorer = app.state.explorer
    explorer.cache = type(explorer.cache)()  # cold
    decoded: list[tuple[str, int]] = []
    original = StoredRun.tensor

    def counting(self: StoredRun, key: str, step: int) -> np.ndarray:
        decoded.append((key, step))
        return original(self, key, step)

    monkeypatch.setattr(StoredRun, "tensor", counting)
    n_keys = len(client.get(f"{BASE}/tensors").json())
    assert len(decoded) == n_keys
    client.get(f"{BASE}/tensors")
    assert len(decoded) == n_keys  # cached


@pytest.mark.parametrize("encoding", ["identity", "gzip, deflate, br, zstd"])
@pytest.mark.parametrize("key", sorted(CASES) + ["idx/bool_2d"])
def test_tensor_at_step_is_row_major_and_exact(client: Any, key: str, encoding: str) -> None:
    arr = BOOL if key == "idx/bool_2d" else CASES[key][0]
    table = fetch_tensor(client, key, 10, encoding)
    meta = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
    assert json.loads(meta["shape"]) == list(arr.shape)
    assert meta["dtype"] == arr.dtype.name
    assert meta["step"] == "10"
    assert json.loads(meta["dims"]) is None
    values = table.column("values").to_numpy()
    # row-major: element [i, j, ...] sits at its C-order offset, compared bit-exactly
    if arr.dtype.kind == "b":
        assert values.dtype == np.uint8
        np.testing.assert_array_equal(values.astype(bool), arr.reshape(-1))
    elif arr.dtype.kind == "f" and arr.dtype.itemsize < 4 or arr.dtype == ml_dtypes.bfloat16:
        assert values.dtype == np.float32
        np.testing.assert_array_equal(values, arr.astype(np.float32).reshape(-1))
        assert np.array_equal(values.astype(arr.dtype).view(np.uint16), arr.reshape(-1).view(np.uint16))
    else:
        assert values.dtype == arr.dtype
        assert values.tobytes() == np.ascontiguousarray(arr).tobytes()


def test_complex_goes_as_real_and_imaginary(client: Any) -> None:
    table = fetch_tensor(client, "idx/c64_1d", 0)
    expected = per_step(0)["idx/c64_1d"]
    np.testing.assert_array_equal(table.column("values").to_numpy(), expected.real)
    np.testing.assert_array_equal(table.column("imag").to_numpy(), expected.imag)


def test_steps_range_and_errors(client: Any) -> None:
    assert client.get(f"{BASE}/steps", params={"key": "step/x"}).json() == {"steps": list(STEPS)}
    assert client.get(f"{BASE}/tensor-range", params={"key": "step/scale"}).json() == {"min": -21.0, "max": 21.0}
    r = client.get(f"{BASE}/steps", params={"key": "nope"})
    assert r.status_code == 404 and "nope" in r.json()["error"]
    r = client.get(f"{BASE}/tensor", params={"key": "step/x", "step": 5})
    assert r.status_code == 404 and "5" in r.json()["error"]
    r = client.get(f"{BASE}/tensor", params={"key": "step/x", "step": "five"})
    assert r.status_code == 400 and "five" in r.json()["error"]
    assert client.get(f"{BASE}/tensor", params={"step": 0}).status_code == 400
    assert client.get("/_x/api/runs/local/p/no-such-run/tensors").status_code == 404
    assert client.get(f"/_x/api/runs/someone/p/{RUN}/tensors").status_code == 404


def test_fixed_range_without_history_summaries_scans_the_tensors() -> None:
    from gradexp.explorer.tensors import finite_range

    class NoSummaries:  # a reader whose history has no column for the key
        def history(self, keys: list[str]) -> pa.Table:
            raise KeyError(keys[0])

        def tensors(self, key: str) -> Iterator[tuple[int, np.ndarray]]:
            yield 0, np.array([np.nan, -3.5, np.inf], np.float32)
            yield 1, np.array([[2.0, -np.inf]], np.float64)
            yield 2, np.array([7, 1], ml_dtypes.bfloat16)

    assert finite_range(NoSummaries(), "k") == {"min": -3.5, "max": 7.0}  # type: ignore[arg-type]

    class AllNonFinite(NoSummaries):
        def tensors(self, key: str) -> Iterator[tuple[int, np.ndarray]]:
            yield 0, np.array([np.nan, np.inf], np.float32)

    assert finite_range(AllNonFinite(), "k") == {"min": None, "max": None}  # type: ignore[arg-type]


def test_tensor_endpoints_need_the_token(run_dir: Path) -> None:
    from starlette.testclient import TestClient

    from gradexp.explorer.ui import create_ui_app

    with TestClient(create_ui_app(run_dir, token=TOKEN), base_url=f"http://{HOST}") as anonymous:
        for path in ("tensors", "steps?key=step/x", "tensor?key=step/x&step=0", "tensor-range?key=step/x"):
            assert anonymous.get(f"{BASE}/{path}").status_code == 403, path


# -- the page --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ui(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`gradexp ui` over the run folder, as a user starts it; yields its base URL."""
    port = free_port()
    log = tmp_path_factory.mktemp("ui-log") / "ui.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "gradexp", "ui", "--dir", str(run_dir), "--port", str(port),
                                 "--token", TOKEN], env=clean_env(), stdout=out, stderr=subprocess.STDOUT)
    url = f"http://{HOST}:{port}"
    try:
        wait_for(lambda: requests.get(f"{url}/?token={TOKEN}", timeout=5).ok, "gradexp ui", proc=proc, log=log)
        yield url
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def page(ui: str, chromium: Any) -> Iterator[Any]:
    context = chromium.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.on("dialog", lambda d: (problems.append(f"dialog: {d.message}"), d.dismiss()))  # an XSS alert()
    page.on("request", lambda r: problems.append(f"off-host request {r.url}")
            if not r.url.startswith(ui) and not r.url.startswith(("data:", "blob:")) else None)
    page.goto(f"{ui}/local/p/{RUN}?token={TOKEN}")
    page.click("a[data-tab=tensors]")
    page.wait_for_selector("#tensor-list .gx-tensor-item")
    page.problems = problems
    SHOTS.mkdir(parents=True, exist_ok=True)
    yield page
    context.close()
    assert problems == []


def show(page: Any, key: str) -> None:
    page.fill(".gx-tensor-search", "")
    page.locator("#tensor-list .gx-tensor-item").filter(has_text=key).first.wait_for()
    page.locator(f"#tensor-list .gx-tensor-item[data-key={json.dumps(key)}] button").click()
    page.wait_for_function("(key) => document.getElementById('panel-at-step').dataset.key === key", arg=key)
    page.wait_for_selector("#panel-at-step canvas, #panel-at-step .gx-empty")


def hover(page: Any, canvas: Any, row: int, col: int, rows: int, cols: int) -> tuple[list[int], str]:
    """Point at the centre of cell (row, col) of a `rows` x `cols` canvas; the readout's index and value."""
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    canvas.hover(position={"x": (col + 0.5) * box["width"] / cols, "y": (row + 0.5) * box["height"] / rows})
    return readout(page)


def readout(page: Any) -> tuple[list[int], str]:
    text = page.text_content("#panel-at-step .gx-readout")
    m = re.fullmatch(r"\[([\d, ]*)\] = (\S+)", text or "")
    assert m, f"readout {text!r}"
    return [int(v) for v in m.group(1).split(", ") if v], m.group(2)


def set_axes(page: Any, rows: int, cols: int) -> None:
    page.select_option("#panel-at-step .gx-axis-rows", str(rows))
    page.select_option("#panel-at-step .gx-axis-cols", str(cols))


def set_index(page: Any, dim: int, value: int) -> None:
    page.locator(f"#panel-at-step .gx-axis-index[data-dim='{dim}']").fill(str(value))


def expected_text(key: str, index: list[int]) -> str:
    if key == "idx/bool_2d":
        return "True" if BOOL[tuple(index)] else "False"
    arr, base = CASES[key]
    value = decode(index, base) + (I64_OFFSET if arr.dtype == np.int64 else 0)
    assert arr[tuple(index)] == value
    return str(value)


@pytest.mark.parametrize("key", ["idx/f32_2d", "idx/f64_2d", "idx/f16_2d", "idx/bf16_2d", "idx/i64_2d",
                                 "idx/u8_2d", "idx/bool_2d", "idx/wide_2d"])
def test_2d_heatmap_reads_back_every_index(page: Any, key: str) -> None:
    shape = BOOL.shape if key == "idx/bool_2d" else CASES[key][0].shape
    show(page, key)
    canvas = page.locator("#panel-at-step canvas.gx-heatmap")
    rows, cols = shape
    cells = [(i, j) for i in range(rows) for j in range(cols)]
    if len(cells) > 40:  # a 40 x 60 grid: its corners, edges and a scatter inside
        cells = [(0, 0), (0, cols - 1), (rows - 1, 0), (rows - 1, cols - 1), (1, 2), (2, 1), (17, 43), (39, 7)]
    for i, j in cells:
        index, value = hover(page, canvas, i, j, rows, cols)
        assert index == [i, j]
        assert value == expected_text(key, index)
    page.screenshot(path=str(SHOTS / f"explorer-tensor-heatmap-{key.split('/')[1]}.png"), full_page=True)


def test_1d_chart_reads_back_every_index(page: Any) -> None:
    show(page, "idx/f32_1d")
    canvas = page.locator("#panel-at-step canvas.gx-line")
    for i in range(7):
        assert hover(page, canvas, 0, i, 1, 7) == ([i], str(i))
    page.select_option("#panel-at-step .gx-mode", "bar")
    canvas = page.locator("#panel-at-step canvas.gx-line")
    assert hover(page, canvas, 0, 5, 1, 7) == ([5], "5")
    page.screenshot(path=str(SHOTS / "explorer-tensor-1d.png"), full_page=True)
    show(page, "idx/long_1d")  # more elements than pixels: drawn per pixel, read per element
    canvas = page.locator("#panel-at-step canvas.gx-line")
    box = canvas.bounding_box()
    for fraction in (0.0001, 0.25, 0.5, 0.9999):
        canvas.hover(position={"x": fraction * box["width"], "y": box["height"] / 2})
        index, value = readout(page)
        assert value == str(index[0]) and abs(index[0] - fraction * 5000) <= 10
    show(page, "idx/c64_1d")  # [0, 1-1j, 2-2j]
    canvas = page.locator("#panel-at-step canvas.gx-line")
    assert [hover(page, canvas, 0, i, 1, 3) for i in range(3)] == [([0], "0+0j"), ([1], "1-1j"), ([2], "2-2j")]


def test_3d_tensor_with_axes_swapped(page: Any) -> None:
    """a[i, j, k] shown with rows = k and columns = i (j fixed by its slider)."""
    show(page, "idx/f32_3d")  # shape (2, 3, 4), a = 100*100*i + 100*j + k
    canvas = page.locator("#panel-at-step canvas.gx-heatmap")
    assert hover(page, canvas, 2, 3, 3, 4) == ([0, 2, 3], "203")  # default: rows j, columns k, i = 0
    set_axes(page, 2, 0)
    set_index(page, 1, 2)
    canvas = page.locator("#panel-at-step canvas.gx-heatmap")
    for k in range(4):
        for i in range(2):
            assert hover(page, canvas, k, i, 4, 2) == ([i, 2, k], str(10000 * i + 200 + k))
    page.screenshot(path=str(SHOTS / "explorer-tensor-3d-axes.png"), full_page=True)
    show(page, "idx/i32_3d")  # (3, 2, 4), a = 1000**2*i + 1000*j + k, int32
    set_axes(page, 2, 1)
    set_index(page, 0, 2)
    canvas = page.locator("#panel-at-step canvas.gx-heatmap")
    assert hover(page, canvas, 3, 1, 4, 2) == ([2, 1, 3], str(2_001_003))


def test_4d_tensor_index_sliders_and_small_multiples(page: Any) -> None:
    show(page, "idx/f32_4d")  # (2, 3, 4, 5), a = 100**3*i + 100**2*j + 100*k + l
    set_index(page, 0, 1)
    set_index(page, 1, 2)
    canvas = page.locator("#panel-at-step canvas.gx-heatmap")
    assert hover(page, canvas, 3, 4, 4, 5) == ([1, 2, 3, 4], "1020304")
    set_axes(page, 3, 1)  # rows l, columns j; i = 1 and k by slider
    set_index(page, 2, 1)
    canvas = page.locator("#panel-at-step canvas.gx-heatmap")
    assert hover(page, canvas, 4, 0, 5, 3) == ([1, 0, 1, 4], "1000104")
    page.select_option("#panel-at-step .gx-axis-multiples", "2")  # one small heatmap per k
    canvases = page.locator("#panel-at-step canvas.gx-heatmap")
    assert canvases.count() == 4
    for k in range(4):
        assert hover(page, canvases.nth(k), 2, 1, 5, 3) == ([1, 1, k, 2], str(1_010_002 + 100 * k))
    page.screenshot(path=str(SHOTS / "explorer-tensor-4d-multiples.png"), full_page=True)


def test_scrubber_moves_every_panel_to_the_next_step(page: Any) -> None:
    page.evaluate("""() => { window.gxSteps = [];
        document.addEventListener('gx:step', (e) => window.gxSteps.push(e.detail)); }""")
    show(page, "step/x")  # the value is the step
    canvas = page.locator("#panel-at-step canvas.gx-heatmap")
    assert hover(page, canvas, 1, 2, 2, 3) == ([1, 2], "20")  # opens at the last step
    page.click("#step-scrubber .gx-step-label")  # focus off the search box
    page.keyboard.press("ArrowLeft")
    page.wait_for_function("() => document.getElementById('panel-at-step').dataset.step === '10'")
    assert hover(page, canvas.first, 1, 2, 2, 3)[1] == "10"
    assert page.text_content("#step-scrubber .gx-step-label").startswith("step 10")
    page.keyboard.press("ArrowLeft")
    page.wait_for_function("() => document.getElementById('panel-at-step').dataset.step === '0'")
    page.keyboard.press("ArrowRight")
    page.wait_for_function("() => document.getElementById('panel-at-step').dataset.step === '10'")
    page.click("#step-scrubber .gx-step-play")
    page.wait_for_function("() => document.getElementById('panel-at-step').dataset.step === '20'")
    page.wait_for_function("() => document.querySelector('#step-scrubber .gx-step-play').textContent === 'Play'")
    heard = page.evaluate("() => window.gxSteps")
    assert [d["step"] for d in heard if d["key"] == "step/x"][-4:] == [10, 0, 10, 20]
    page.screenshot(path=str(SHOTS / "explorer-tensor-scrubber.png"), full_page=True)


def test_colour_scale_per_step_or_fixed(page: Any) -> None:
    show(page, "step/scale")  # [[-(s+1), s+1]]: per step the range is the step's, fixed it is 21
    legend = page.locator("#panel-at-step .gx-legend")
    page.click("#step-scrubber .gx-step-label")
    page.keyboard.press("ArrowLeft")
    page.keyboard.press("ArrowLeft")
    page.wait_for_function("() => document.getElementById('panel-at-step').dataset.step === '0'")
    assert legend.text_content() == "-11this step"
    page.select_option("#panel-at-step .gx-scale", "fixed")
    page.wait_for_function("() => document.querySelector('#panel-at-step .gx-legend').textContent.includes('fixed')")
    assert legend.text_content() == "-2121fixed across steps"
    page.keyboard.press("ArrowRight")
    page.wait_for_function("() => document.getElementById('panel-at-step').dataset.step === '10'")
    assert legend.text_content() == "-2121fixed across steps"
    page.select_option("#panel-at-step .gx-scale", "step")
    page.wait_for_function("() => document.querySelector('#panel-at-step .gx-legend').textContent === '-1111this step'")


def canvas_colours(page: Any) -> int:
    """Distinct colours on the WebGL canvas (drawn with preserveDrawingBuffer)."""
    return page.evaluate("""() => {
        const src = document.querySelector('#panel-at-step canvas.gx-3d-canvas');
        const c = document.createElement('canvas'); c.width = src.width; c.height = src.height;
        const g = c.getContext('2d'); g.drawImage(src, 0, 0);
        const d = new Uint32Array(g.getImageData(0, 0, c.width, c.height).data.buffer);
        return new Set(d).size; }""")


@pytest.mark.parametrize("mode", ["surface", "bars"])
def test_3d_mode_renders_and_reads_back(page: Any, mode: str) -> None:
    show(page, "idx/wide_2d")  # 40 x 60, a = 1000*i + j
    page.select_option("#panel-at-step .gx-mode", mode)
    canvas = page.locator("#panel-at-step canvas.gx-3d-canvas")
    canvas.wait_for()
    assert page.evaluate("() => !!document.querySelector('#panel-at-step canvas.gx-3d-canvas')"
                         ".getContext('webgl2')")
    page.wait_for_function("() => document.getElementById('panel-at-step').dataset.drawn")
    assert canvas_colours(page) > 20  # a coloured surface, not a blank canvas
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    seen = set()
    for fx, fy in [(0.5, 0.5), (0.45, 0.5), (0.55, 0.5), (0.5, 0.46)]:
        page.evaluate("() => { document.querySelector('#panel-at-step .gx-readout').textContent = ''; }")
        canvas.hover(position={"x": box["width"] * fx, "y": box["height"] * fy})
        page.wait_for_function("() => document.querySelector('#panel-at-step .gx-readout').textContent !== ''")
        index, value = readout(page)
        assert len(index) == 2 and 0 <= index[0] < 40 and 0 <= index[1] < 60
        assert value == str(1000 * index[0] + index[1])
        seen.add(tuple(index))
    assert len(seen) > 1  # the pointer picks different elements, not one stuck value
    # dragging rotates the view: other pixels
    before = page.evaluate("() => document.querySelector('#panel-at-step canvas.gx-3d-canvas').toDataURL()")
    page.mouse.move(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.5)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.7, box["y"] + box["height"] * 0.6, steps=5)
    page.mouse.up()
    after = page.evaluate("() => document.querySelector('#panel-at-step canvas.gx-3d-canvas').toDataURL()")
    assert after != before
    page.screenshot(path=str(SHOTS / f"explorer-tensor-3d-{mode}.png"), full_page=True)
    page.select_option("#panel-at-step .gx-mode", "heatmap")


def test_empty_tensor(page: Any) -> None:
    page.fill(".gx-tensor-search", "")
    page.locator("#tensor-list .gx-tensor-item[data-key='odd/empty'] button").click()
    page.wait_for_selector("#panel-at-step .gx-empty")
    assert page.text_content("#panel-at-step .gx-empty") == "no elements (shape [0, 5])"


def test_list_search_chips_and_xss_key_as_text(page: Any) -> None:
    items = page.locator("#tensor-list .gx-tensor-item")
    keys = [items.nth(i).get_attribute("data-key") for i in range(items.count())]
    assert sorted(keys) == sorted(per_step(0))
    xss = page.locator("#tensor-list .gx-tensor-item").filter(has_text="onerror").first
    assert xss.locator(".gx-tensor-key").text_content() == XSS
    assert page.locator("#tensor-list img").count() == 0
    assert "float32 [3] · 3 steps" in xss.text_content()
    chips = page.locator("#tensor-list .gx-chip")
    assert {chips.nth(i).text_content() for i in range(chips.count())} >= {"idx", "f32_2d", "step", "x", XSS}
    page.click("#tensor-list .gx-chip[data-part='step']")
    shown = page.locator("#tensor-list .gx-tensor-item")
    assert sorted(shown.nth(i).get_attribute("data-key") for i in range(shown.count())) == ["step/scale", "step/x"]
    page.click("#tensor-list .gx-chip[data-part='x']")
    assert shown.count() == 1 and shown.first.get_attribute("data-key") == "step/x"
    page.click("#tensor-list .gx-chip[data-part='step']")
    page.click("#tensor-list .gx-chip[data-part='x']")
    page.fill(".gx-tensor-search", "f32_")
    assert shown.count() == 4
    page.screenshot(path=str(SHOTS / "explorer-tensor-list.png"), full_page=True)
    page.fill(".gx-tensor-search", "")
    show(page, XSS)
    assert page.locator("#panel-at-step img").count() == 0
    assert XSS in page.text_content("#panel-at-step .gx-at-caption")


LIVE_TRAINER = """
import sys, time, pathlib, numpy as np, gradexp
root, stop = sys.argv[1], pathlib.Path(sys.argv[2])
run = gradexp.init("p", id="liverun", dir=root, mode="offline")
step = 0
while not stop.exists() and step < 2000:
    run.log({"live/w": np.full((2, 3), float(step), np.float32)}, step=step)
    print(step, flush=True)
    step += 1
    time.sleep(0.3)
run.finish()
"""


def test_live_run_gains_steps_and_follows_the_last(run_dir: Path, ui: str, chromium: Any, tmp_path: Path) -> None:
    stop = tmp_path / "stop"
    trainer = subprocess.Popen([sys.executable, "-c", LIVE_TRAINER, str(run_dir), str(stop)], env=clean_env(),
                               stdout=subprocess.PIPE, text=True)
    context = chromium.new_context(viewport={"width": 1280, "height": 900})
    try:
        assert trainer.stdout is not None
        wait_for(lambda: int(trainer.stdout.readline()) >= 2, "the trainer's first steps", proc=trainer)
        page = context.new_page()
        page.goto(f"{ui}/local/p/liverun?token={TOKEN}")
        page.click("a[data-tab=tensors]")
        page.wait_for_selector("#panel-at-step canvas.gx-heatmap")
        first = int(page.get_attribute("#panel-at-step", "data-step"))
        # the scrubber follows the new last step, and the panel shows it: value == step
        page.wait_for_function("(s) => Number(document.getElementById('panel-at-step').dataset.step) >= s + 3",
                               arg=first, timeout=20_000)
        canvas = page.locator("#panel-at-step canvas.gx-heatmap")
        index, value = hover(page, canvas, 1, 2, 2, 3)
        shown = int(page.get_attribute("#panel-at-step", "data-step"))
        assert index == [1, 2] and int(value) in (shown, shown + 1, shown + 2)  # it may move on meanwhile
        label = page.text_content("#step-scrubber .gx-step-label")
        m = re.match(r"step (\d+) \((\d+) of (\d+)\)", label or "")
        assert m and m.group(2) == m.group(3), label
        count = page.locator("#tensor-list .gx-tensor-item[data-key='live/w'] .gx-tensor-meta")
        assert int(re.search(r"· (\d+) steps", count.text_content()).group(1)) > first + 1
        page.screenshot(path=str(SHOTS / "explorer-tensor-live.png"), full_page=True)
    finally:
        context.close()
        stop.touch()
        trainer.wait(60)


# -- on gradexp server: the same views over the server's database and store -----------------------

SERVER_RUN = """
import numpy as np, gradexp
idx = np.indices((3, 5))
run = gradexp.init("vision", id="t1")
for s in (0, 1):
    run.log({"grad/w": (1000 * idx[0] + idx[1] + 100 * s).astype(np.float32),
             "grad/b": np.arange(4, dtype=np.int64) - 2 ** 62}, step=s)
run.finish()
"""
PASSWORD = "correct horse battery"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    work = tmp_path_factory.mktemp("tensor-server")
    s = GradexpServer(work).start()
    s.user_with_password("ada", PASSWORD)
    s.create_user("bob")
    s.ada_key = s.create_key("ada")
    s.bob_key = s.create_key("bob")
    r = run_python(SERVER_RUN, cwd=work, env=clean_env(GRADEXP_HOST=s.url, GRADEXP_API_KEY=s.ada_key))
    assert r.returncode == 0, r.stderr
    yield s
    s.stop()


def test_server_tensor_endpoints_and_access(server: Any) -> None:
    base = f"{server.url}/_x/api/runs/ada/vision/t1"
    ada = {"Authorization": f"Bearer {server.ada_key}"}
    listed = requests.get(f"{base}/tensors", headers=ada, timeout=30).json()
    assert listed == [{"key": "grad/b", "dtype": "int64", "shape": [4], "steps": 2, "dims": None},
                      {"key": "grad/w", "dtype": "float32", "shape": [3, 5], "steps": 2, "dims": None}]
    r = requests.get(f"{base}/tensor", params={"key": "grad/w", "step": 1}, headers=ada, timeout=30)
    table = pa.ipc.open_stream(r.content).read_all()  # requests undoes gzip; zstd was not asked for
    np.testing.assert_array_equal(table.column("values").to_numpy().reshape(3, 5),
                                  1000 * np.indices((3, 5))[0] + np.indices((3, 5))[1] + 100)
    r = requests.get(f"{base}/tensor", params={"key": "grad/b", "step": 0}, headers=ada, timeout=30)
    assert pa.ipc.open_stream(r.content).read_all().column("values").to_pylist() == [-2**62, 1 - 2**62,
                                                                                      2 - 2**62, 3 - 2**62]
    assert requests.get(f"{base}/steps", params={"key": "grad/w"}, headers=ada, timeout=30).json() == {"steps": [0, 1]}
    assert requests.get(f"{base}/tensor-range", params={"key": "grad/w"}, headers=ada,
                        timeout=30).json() == {"min": 0.0, "max": 2104.0}
    bob = {"Authorization": f"Bearer {server.bob_key}"}
    for path in ("tensors", "tensor?key=grad/w&step=0", "steps?key=grad/w", "tensor-range?key=grad/w"):
        assert requests.get(f"{base}/{path}", headers=bob, timeout=30).status_code == 404, path
        assert requests.get(f"{base}/{path}", timeout=30).status_code == 401, path


def test_server_tensor_view_in_the_browser(server: Any, chromium: Any) -> None:
    session = WebSession(server.url)
    session.sign_in("ada", PASSWORD)
    context = chromium.new_context(viewport={"width": 1280, "height": 900})
    context.add_cookies([{"name": c.name, "value": c.value or "", "url": server.url}
                         for c in session.http.cookies])
    page = context.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    try:
        page.goto(f"{server.url}/ada/vision/t1#tensors")
        page.click("a[data-tab=tensors]")
        show(page, "grad/w")
        canvas = page.locator("#panel-at-step canvas.gx-heatmap")
        assert hover(page, canvas, 2, 3, 3, 5) == ([2, 3], "2103")
        page.click("#step-scrubber .gx-step-label")
        page.keyboard.press("ArrowLeft")
        page.wait_for_function("() => document.getElementById('panel-at-step').dataset.step === '0'")
        assert readout(page) == ([2, 3], "2003")
        page.screenshot(path=str(SHOTS / "explorer-tensor-server.png"), full_page=True)
        assert errors == []
    finally:
        context.close()
