// The "System" group of the Charts tab: one uPlot chart per figure the run's sender process
// sampled (CPU %, memory, disk and network I/O, GPUs), over wall-clock time, beside the
// run's metric charts. A live run's figures are re-read every few seconds (a sample every
// 10 s by default: the table stays small).
import uPlot from "/_x/static/vendor/uplot/uPlot.esm.js";
import { arrow, el, firstChartsShown, runContext, runInfo, showError } from "./common.js";

const ctx = runContext();
const HEIGHT = 160;
const LIVE_MS = 2000;
// A run shorter than its sampling interval has one sample: a time axis around it, not the
// years wide one uPlot makes of a zero span.
const ONE_SAMPLE_PAD_S = 30;
function oneSampleRange(u, min, max) {
  const xs = u.data[0];  // uPlot widens a time axis of one value to 1000 days before asking
  return xs.length && xs[0] === xs[xs.length - 1] ? [xs[0] - ONE_SAMPLE_PAD_S, xs[0] + ONE_SAMPLE_PAD_S] : [min, max];
}
const root = document.getElementById("system-charts");
const grid = document.getElementById("system-grid");
const filter = document.getElementById("chart-filter");
const plots = new Map();  // key -> {box, plot}

function width() {
  const main = document.querySelector("main");
  const w = grid.clientWidth || (main && main.clientWidth) || document.body.clientWidth || 1000;
  const cols = Math.max(1, Math.floor(w / 460));
  return Math.max(240, Math.floor(w / cols) - 32);
}

// Byte figures in decimal units (psutil's counts; 23,112,835,072 did not fit the axis), other
// large ones compact ("1.2M").
const UNITS = ["B", "kB", "MB", "GB", "TB", "PB"];
const compact = new Intl.NumberFormat("en", { notation: "compact", maximumFractionDigits: 1 });
function formatter(key) {
  if (key.includes("bytes")) {
    const rate = key.endsWith("_per_s") ? "/s" : "";
    return (v) => {
      if (v == null) return "--";
      let i = 0;
      let x = Math.abs(v);
      while (x >= 1000 && i < UNITS.length - 1) { x /= 1000; i++; }
      return `${v < 0 ? "-" : ""}${i ? x.toFixed(x < 10 ? 1 : 0) : x} ${UNITS[i]}${rate}`;
    };
  }
  return (v) => (v == null ? "--" : Math.abs(v) >= 1e4 ? compact.format(v) : String(v));
}

function numbers(col) {
  const out = new Array(col.length);
  for (let i = 0; i < col.length; i++) {
    const v = col[i] === null ? NaN : Number(col[i]);
    out[i] = Number.isNaN(v) ? null : v;
  }
  return out;
}

function draw(table) {
  const keys = table.schema.fields.map((f) => f.name).filter((n) => n.startsWith("system/")).sort();
  root.hidden = keys.length === 0;
  const x = numbers(table.getChild("_timestamp").toArray());
  const w = width();  // once: reading it after a plot went in would lay the page out again
  for (const key of keys) {
    const y = numbers(table.getChild(key).toArray());
    let entry = plots.get(key);
    if (!entry) {
      const canvas = el("div", { class: "gx-chart-canvas" });
      const box = el("div", { class: "gx-chart", dataset: { key } }, el("div", { class: "gx-chart-title" }, key), canvas);
      grid.append(box);
      const fmt = formatter(key);
      const plot = new uPlot({
        width: w, height: HEIGHT, axes: [{}, { size: 80, values: (u, splits) => splits.map(fmt) }],
        scales: { x: { time: true, range: oneSampleRange } },
        // points where samples are sparse (uPlot's default), so a single sample shows
        series: [{ label: "time" }, { label: key.slice("system/".length), stroke: "#5c940d", width: 1.5, spanGaps: true,
                                      value: (u, v) => fmt(v) }],
        hooks: { setScale: [(u, scale) => { if (scale === "x") box.dataset.xSpan = String(u.scales.x.max - u.scales.x.min); }] },
      }, [x, y], canvas);
      entry = { box, plot };
      plots.set(key, entry);
    } else {
      entry.plot.setData([x, y]);
    }
    entry.box.dataset.points = String(y.filter((v) => v !== null).length);
  }
  applyFilter();
  root.dataset.ready = "1";
}

function applyFilter() {
  const q = filter.value.trim().toLowerCase();
  for (const [k, e] of plots) e.box.hidden = q !== "" && !k.toLowerCase().includes(q);
  if (plots.size) root.hidden = ![...plots.values()].some((e) => !e.box.hidden);
}

let status = null;
async function load() {
  const [table, info] = await Promise.all([arrow(`${ctx.apiBase}/system`), runInfo(ctx.apiBase)]);
  status = info.status;
  await firstChartsShown();  // below the metrics' charts: drawn after the first screen of them
  draw(table);
}

filter.addEventListener("input", applyFilter);
// Drawn while the tab was hidden, a chart took the page's width: fit it to the grid once shown.
document.addEventListener("gx:tab", (e) => {
  if (e.detail.tab === "charts") requestAnimationFrame(() => {
    const w = width();
    for (const { plot } of plots.values()) plot.setSize({ width: w, height: HEIGHT });
  });
});
load().catch(showError);
setInterval(() => {
  if (!document.hidden && status === "running") load().catch(showError);
}, LIVE_MS);
