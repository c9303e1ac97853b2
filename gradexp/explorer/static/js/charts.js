// The Charts tab: one uPlot chart per scalar key, grouped by the key's first path part
// ("opt/lr" under "opt"), several runs overlaid (?compare=id,id). The server reduces long
// histories to min/max/last per pixel (drawn as a band around the line, so a spike always
// shows); a drag zooms and re-fetches the range (exactly, once it fits the chart's pixels).
// While a run is live the charts poll only the rows after its last step (?since=).
import uPlot from "/_x/static/vendor/uplot/uPlot.esm.js";
import { arrow, el, runContext, runInfo, seg, showError } from "./common.js";

const ctx = runContext();
const COLORS = ["#2a5db0", "#d9480f", "#2b8a3e", "#862e9c", "#c2255c", "#1098ad", "#e67700", "#5c940d"];
const HEIGHT = 200;
const LIVE_MS = 250;  // a live chart's poll: most find nothing new (the server answers from its cache)

const params = new URLSearchParams(location.search);
const compared = (params.get("compare") || "").split(",").filter((r) => r && r !== ctx.run);
const runs = [ctx.run, ...compared].map((id, i) => ({
  id, color: COLORS[i % COLORS.length],
  base: `/_x/api/runs/${seg(ctx.entity)}/${seg(ctx.project)}/${seg(id)}`,
  info: null, data: null,
}));
const charts = new Map();  // key -> {box, plot, zoom: null | {lo, hi, data: Map(runId -> series)}}
const ui = {
  x: document.getElementById("chart-x"),
  log: document.getElementById("chart-log"),
  smooth: document.getElementById("chart-smooth"),
  filter: document.getElementById("chart-filter"),
  root: document.getElementById("chart-boxes"),
};

function chartWidth() {
  const w = ui.root.clientWidth || document.body.clientWidth || 1000;
  const cols = Math.max(1, Math.floor(w / 460));
  return Math.max(240, Math.floor(w / cols) - 32);  // room for the box's border, padding and gap
}

const column = (table, name) => {
  const c = table.getChild(name);
  return c ? c.toArray() : null;
};

function asNumbers(arr) {
  // Arrow ints come as BigInt64Array; uPlot wants plain numbers, NaN/null as gaps.
  const out = new Array(arr.length);
  for (let i = 0; i < arr.length; i++) {
    const v = Number(arr[i]);
    out[i] = Number.isNaN(v) ? null : v;
  }
  return out;
}

/** Series of one run from an Arrow history table: {x, step, keys: {key: {v, min, max}}, reduced}. */
function seriesOf(table, keys) {
  const reduced = (table.schema.metadata.get("reduced") || "0") === "1";
  const x = asNumbers(column(table, ui.x.value));
  const step = asNumbers(column(table, "step"));
  const out = { x, step, reduced, keys: {} };
  for (const k of keys) {
    const v = column(table, k);
    if (!v) continue;
    out.keys[k] = {
      v: asNumbers(v),
      min: reduced ? asNumbers(column(table, `${k}:min`)) : null,
      max: reduced ? asNumbers(column(table, `${k}:max`)) : null,
    };
  }
  return out;
}

function historyUrl(run, keys, extra = {}) {
  const q = new URLSearchParams({ keys: keys.join(","), x: ui.x.value, ...extra });
  return `${run.base}/history?${q}`;
}

/** Merge the series of `keys` from an Arrow history table into the run's data. */
function addSeries(run, table, keys) {
  const got = seriesOf(table, keys);
  if (!run.data) {
    run.data = got;
  } else {
    // A later batch of the same finished run: its x is the same; each key keeps its own anyway.
    for (const k of keys) if (got.keys[k]) run.data.keys[k] = { ...got.keys[k], x: got.x };
  }
  run.lastStep = run.data.step.length ? run.data.step[run.data.step.length - 1] : null;
}

async function fetchSeries(run, keys, buckets) {
  const wanted = keys.filter((k) => run.info.history_keys.includes(k));
  if (wanted.length) addSeries(run, await arrow(historyUrl(run, wanted, { buckets })), wanted);
}

function smooth(values, alpha) {
  if (!alpha) return values;
  // Debiased exponential moving average (as TensorBoard's), skipping gaps.
  const out = new Array(values.length);
  let acc = 0, weight = 0;
  for (let i = 0; i < values.length; i++) {
    const v = values[i];
    if (v === null || !isFinite(v)) { out[i] = v; continue; }
    acc = acc * alpha + (1 - alpha) * v;
    weight = weight * alpha + (1 - alpha);
    out[i] = acc / weight;
  }
  return out;
}

function positive(values) {
  return ui.log.checked ? values.map((v) => (v !== null && v > 0 ? v : null)) : values;
}

/** uPlot data for one key: x, then (value, min, max) per run, aligned on x. */
function plotData(key, chart) {
  const alpha = Number(ui.smooth.value);
  const tables = [];
  for (const run of runs) {
    const d = chart.zoom ? chart.zoom.data.get(run.id) : run.data;
    const s = d && d.keys[key];
    if (!s) { tables.push([[], [], [], []]); continue; }
    const x = s.x || d.x;
    const none = s.min ? null : x.map(() => null);
    tables.push([x, positive(smooth(s.v, alpha)), positive(s.min || none), positive(s.max || none)]);
  }
  if (tables.length === 1) return tables[0];
  return uPlot.join(tables);
}

function makePlot(key, chart, width = chartWidth()) {
  const series = [{ label: ui.x.value === "_timestamp" ? "time" : ui.x.value }];
  const bands = [];
  runs.forEach((run, i) => {
    const label = runs.length > 1 ? (run.info && run.info.name) || run.id : key;
    series.push({ label, stroke: run.color, width: 1.5, spanGaps: true, points: { show: false } });
    series.push({ label: `${label} min`, stroke: `${run.color}99`, width: 1, spanGaps: true, points: { show: false } });
    series.push({ label: `${label} max`, stroke: `${run.color}99`, width: 1, spanGaps: true, points: { show: false } });
    bands.push({ series: [3 * i + 3, 3 * i + 2], fill: `${run.color}33` });
  });
  const opts = {
    width, height: HEIGHT, series, bands,
    legend: { show: true, live: true },
    scales: { x: { time: ui.x.value === "_timestamp" }, y: ui.log.checked ? { distr: 3 } : {} },
    axes: [{}, { size: 64 }],  // room for labels such as "10,000" and "1.5e-7"
    cursor: { drag: { x: true, y: false, setScale: false } },
    hooks: { setSelect: [(u) => zoomTo(key, u)] },
  };
  if (chart.plot) chart.plot.destroy();
  chart.plot = new uPlot(opts, plotData(key, chart), chart.canvas);
  Object.assign(chart.canvas.style, { width: "", minHeight: "" });  // the plot has its room now (and resizes)
  // The legend names each run once: its min/max band series have no row of their own.
  chart.plot.root.querySelectorAll(".u-legend .u-series").forEach((row, i) => {
    if (i > 0 && (i - 1) % 3 !== 0) row.hidden = true;
  });
  chart.plot.over.addEventListener("dblclick", () => {
    chart.zoom = null;
    redraw(key);
  });
  mark(key, chart);
}

function mark(key, chart) {
  const d = runs[0].data;
  const s = d && d.keys[key];
  chart.box.dataset.points = s ? String(s.v.filter((v) => v !== null).length) : "0";
  chart.box.dataset.lastStep = runs[0].lastStep === null ? "" : String(runs[0].lastStep);
  chart.box.dataset.zoomed = chart.zoom ? "1" : "0";
  chart.box.dataset.reduced = (chart.zoom ? chart.zoom.data.get(runs[0].id) : d)?.reduced ? "1" : "0";
}

function redraw(key) {
  const chart = charts.get(key);
  if (!chart || !chart.plot) return;
  chart.plot.setData(plotData(key, chart), true);
  mark(key, chart);
}

async function zoomTo(key, u) {
  const { left, width } = u.select;
  if (width < 3) return;
  const lo = u.posToVal(left, "x"), hi = u.posToVal(left + width, "x");
  u.setSelect({ left: 0, width: 0, top: 0, height: 0 }, false);
  const chart = charts.get(key);
  try {
    const data = new Map();
    await Promise.all(runs.map(async (run) => {
      if (!run.info || !run.info.history_keys.includes(key)) return;
      const table = await arrow(historyUrl(run, [key], { buckets: u.bbox.width / devicePixelRatio | 0, lo, hi }));
      data.set(run.id, seriesOf(table, [key]));
    }));
    chart.zoom = { lo, hi, data };
    chart.plot.setData(plotData(key, chart), false);
    chart.plot.setScale("x", { min: lo, max: hi });
    mark(key, chart);
  } catch (err) {
    showError(err);
  }
}

function group(key) {
  const i = key.indexOf("/");
  return i > 0 ? key.slice(0, i) : "";
}

/** Lay out one (empty) box per key, grouped; the plots are made by draw(). */
function build() {
  for (const c of charts.values()) c.plot && c.plot.destroy();
  charts.clear();
  const keys = [...new Set(runs.flatMap((r) => (r.info ? r.info.history_keys : [])))].sort();
  const groups = new Map();
  for (const k of keys) {
    if (!groups.has(group(k))) groups.set(group(k), []);
    groups.get(group(k)).push(k);
  }
  const sections = [];
  const width = chartWidth();
  for (const [name, ks] of [...groups.entries()].sort((a, b) => (a[0] === "" ? -1 : a[0].localeCompare(b[0])))) {
    const grid = el("div", { class: "gx-chart-grid" });
    for (const k of ks) {
      const canvas = el("div", { class: "gx-chart-canvas" });
      Object.assign(canvas.style, { width: `${width}px`, minHeight: `${HEIGHT}px` });  // the plot's room
      const box = el("div", { class: "gx-chart", dataset: { key: k } }, el("div", { class: "gx-chart-title" }, k), canvas);
      grid.append(box);
      charts.set(k, { box, canvas, plot: null, zoom: null });
    }
    sections.push(el("section", { class: "gx-chart-group", dataset: { group: name } },
      el("h2", {}, name || "metrics"), grid));
  }
  if (!keys.length) sections.push(el("p", { class: "gx-muted", id: "charts-empty" }, "No scalars logged yet."));
  ui.root.replaceChildren(...sections);
  applyFilter();
}

/** Make the plots of `keys` (all of them by default). */
function draw(keys = [...charts.keys()]) {
  const width = chartWidth();  // once: reading it after a plot went in would lay the page out again
  for (const k of keys) makePlot(k, charts.get(k), width);
}

function applyFilter() {
  const q = ui.filter.value.trim().toLowerCase();
  for (const [k, c] of charts) c.box.hidden = q !== "" && !k.toLowerCase().includes(q);
  for (const s of ui.root.querySelectorAll(".gx-chart-group")) {
    s.hidden = ![...s.querySelectorAll(".gx-chart")].some((b) => !b.hidden);
  }
}

/** Resolves once what was drawn so far is on the screen: uPlot renders in a microtask after
 * it is given data, the browser paints at its next frame. The page's marks are set after it. */
const painted = () => new Promise((resolve) => requestAnimationFrame(() => setTimeout(resolve, 0)));

/** Keys whose boxes are on the first screen (laid out, not filtered out). */
function onScreen() {
  const bottom = window.innerHeight || document.documentElement.clientHeight;
  return [...charts].filter(([, c]) => !c.box.hidden && c.box.getBoundingClientRect().top < bottom).map(([k]) => k);
}

/** Tell the tab's other panels (System) that the first screen's charts are drawn, or failed. */
function announceFirstCharts() {
  if (document.body.dataset.firstCharts === "1") return;
  document.body.dataset.firstCharts = "1";
  document.dispatchEvent(new CustomEvent("gx:first-charts"));
}

let loading = 0;  // the latest loadAll's ticket: an older one stops where it is
let busy = 0;  // loads under way: the live poll waits for them
async function loadAll() {
  busy++;
  try {
    await load(++loading);
  } finally {
    busy--;
  }
}

async function load(ticket) {
  const buckets = chartWidth();
  await Promise.all(runs.map(async (r) => { r.info = await runInfo(r.base); }));
  if (ticket !== loading) return;
  for (const r of runs) { r.data = null; r.lastStep = null; }
  const keys = () => [...charts.keys()];
  if (runs.some((r) => r.info.status === "running")) {
    // Live: every key in one answer per run (two answers could end at different steps), and
    // the charts replaced only once it is here.
    const all = [...new Set(runs.flatMap((r) => r.info.history_keys))];
    await Promise.all(runs.map((r) => fetchSeries(r, all, buckets)));
    if (ticket !== loading) return;
    build();
    draw();
    await painted();
    performance.mark("gx-first-charts-drawn");
    announceFirstCharts();
  } else {
    // Ended: lay the boxes out, ask for the first screen's charts, then for the rest, and
    // draw each as it comes.
    build();
    const first = onScreen();
    const rest = keys().filter((k) => !first.includes(k));
    await Promise.all(runs.map((r) => fetchSeries(r, first, buckets)));
    if (ticket !== loading) return;
    // The rest is asked for now, not with the first: reduced alone (2 cores), the first screen's
    // answer came ~0.1 s sooner; the server reduces the rest while the browser draws.
    const restDone = rest.length ? Promise.all(runs.map((r) => fetchSeries(r, rest, buckets))) : null;
    draw(first);
    await painted();
    performance.mark("gx-first-charts-drawn");
    announceFirstCharts();
    if (restDone) {
      await restDone;
      if (ticket !== loading) return;
      draw(rest);
      await painted();
    }
  }
  document.getElementById("chart-compare").textContent =
    runs.length > 1 ? `comparing ${runs.map((r) => (r.info && r.info.name) || r.id).join(", ")}` : "";
  document.body.dataset.chartsReady = "1";
  performance.mark("gx-charts-drawn");
}

// -- live: append the rows after the last step --------------------------------------------------

function append(run, table) {
  const keys = run.info.history_keys;
  const tail = seriesOf(table, keys);
  const d = run.data;
  const extend = (to, from) => { for (const v of from) to.push(v); };  // no spread: a tail may be long
  extend(d.x, tail.x);
  extend(d.step, tail.step);
  for (const k of keys) {
    const s = d.keys[k], t = tail.keys[k];
    if (s.x && s.x !== d.x) extend(s.x, tail.x);
    extend(s.v, t.v);
    if (s.min) {
      extend(s.min, t.v);
      extend(s.max, t.v);
    }
  }
  run.lastStep = tail.step[tail.step.length - 1];
}

/** Fetch the rows of one run logged after its last drawn step: {changed, reload}. */
async function pollRun(run) {
  if (run.info.status !== "running") return { changed: false, reload: false };
  if (run.data === null || run.lastStep === null) return { changed: false, reload: true };  // all of it is new
  const table = await arrow(`${run.base}/history?${new URLSearchParams({ x: ui.x.value, since: run.lastStep })}`);
  const names = table.schema.fields.map((f) => f.name).filter((n) => !["step", "_runtime", "_timestamp"].includes(n));
  if (names.some((n) => !run.info.history_keys.includes(n))) return { changed: false, reload: true };  // a new key
  if (table.numRows === 0) {  // quiet: has it ended?
    run.info = { ...run.info, status: (await runInfo(run.base)).status };
    return { changed: false, reload: false };
  }
  append(run, table);
  // the tail outgrew the chart's pixels: reduce again
  return { changed: true, reload: run.data.step.length > 4 * chartWidth() };
}

let polling = false;
async function poll() {
  if (polling || busy || document.hidden || runs.some((r) => !r.info)) return;
  polling = true;
  try {
    const got = await Promise.all(runs.map(pollRun));
    if (got.some((g) => g.reload)) await loadAll();
    else if (got.some((g) => g.changed)) for (const [k, c] of charts) if (!c.zoom) redraw(k);
  } catch (err) {
    showError(err);
  } finally {
    polling = false;
  }
}

ui.x.addEventListener("change", () => loadAll().catch(showError));
ui.log.addEventListener("change", () => draw());
ui.smooth.addEventListener("input", () => { for (const k of charts.keys()) redraw(k); });
ui.filter.addEventListener("input", applyFilter);
let resizeTimer = null;
window.addEventListener("resize", () => {
  clearTimeout(resizeTimer);
  resizeTimer = setTimeout(() => {
    const width = chartWidth();
    for (const c of charts.values()) c.plot && c.plot.setSize({ width, height: HEIGHT });
  }, 200);
});

loadAll().catch(showError).finally(announceFirstCharts);
setInterval(poll, LIVE_MS);
