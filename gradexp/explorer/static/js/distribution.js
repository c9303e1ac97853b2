// The distribution of the selected tensor over its steps (#panel-distribution) and the compare
// panel (#panel-compare). The server counts every element of every logged step on bins common
// to all steps; the heatmap draws one pixel per (step, bin), colour = log count, with NaN,
// +Inf, -Inf and exact-zero counts as strips above it. Beside it: exact quantile bands.
// A click on a step moves the page there (setStep); that step's exact histogram shows below.
import uPlot from "/_x/static/vendor/uplot/uPlot.esm.js";
import { api, arrow, el, onStep, onTensor, runContext, seg, setStep, showError } from "./common.js";
import {
  EMPTY, MISSING, alarm, cellAt, columns, compact, diverging, drawLegend, ensureCss, exact, numbers, sequential,
} from "./colormap.js";

ensureCss();
const ctx = runContext();
const LIVE_MS = 2000;
const STRIPS = [["nan", "NaN"], ["posinf", "+Inf"], ["neginf", "−Inf"], ["zero", "zero"]];
const QUANTS = ["min", "p1", "p5", "p25", "p50", "p75", "p95", "p99", "max"];

const state = { key: null, step: null, bins: 64, scale: "linear", d: null, loading: 0 };

// -- the distribution panel --------------------------------------------------------------------

const root = document.getElementById("panel-distribution");
const ui = {};
if (root) build();

function build() {
  root.classList.add("gx-dist");
  ui.title = el("span", { class: "gx-muted" });
  ui.scale = el("select", { "aria-label": "value axis" },
    el("option", { value: "linear" }, "linear"), el("option", { value: "symlog" }, "symmetric log"));
  ui.bins = el("select", { "aria-label": "bins" }, ...[32, 64, 128, 256].map((b) =>
    el("option", { value: String(b), selected: b === 64 }, `${b} bins`)));
  ui.legend = el("canvas", { "aria-hidden": "true" });
  drawLegend(ui.legend, sequential);
  ui.status = el("span", { class: "gx-muted", role: "status" });
  ui.strips = el("canvas", { class: "gx-dist-strips", "aria-label": "NaN, +Inf, -Inf and zero counts per step" });
  ui.heat = el("canvas", { class: "gx-dist-heatmap", "aria-label": "histogram over steps" });
  ui.marker = el("div", { class: "gx-dist-marker", hidden: true });
  ui.valueLabels = el("div", { class: "gx-dist-labels" });
  ui.axis = el("div", { class: "gx-dist-axis" });
  ui.readout = el("div", { class: "gx-readout", "aria-live": "polite" });
  ui.quant = el("div", { class: "gx-dist-quantiles" });
  ui.histTitle = el("h3", {}, "");
  ui.bars = el("canvas", { class: "gx-hist-bars", "aria-label": "histogram at the step" });
  ui.stripNames = el("div", { class: "gx-hist-strip-names" });
  ui.histReadout = el("div", { class: "gx-readout" });
  ui.histTable = el("div", { class: "gx-hist-table" });
  const stripLabels = el("div", { class: "gx-dist-strip-labels" }, ...STRIPS.map(([, l]) => el("span", {}, l)));
  root.replaceChildren(
    el("div", { class: "gx-toolbar" }, el("h2", {}, "Distribution over steps"), ui.title, ui.scale, ui.bins,
      el("span", { class: "gx-legend" }, "count: 1", ui.legend, "max (log)"), ui.status),
    el("div", { class: "gx-dist-row" },
      el("div", { class: "gx-dist-map" },
        el("div", { class: "gx-dist-plot" },
          el("div", {}, stripLabels, ui.valueLabels),
          el("div", { class: "gx-dist-stack" }, ui.strips, ui.heat, ui.marker)),
        el("div", { class: "gx-dist-plot" }, el("span"), ui.axis),
        ui.readout),
      el("div", { class: "gx-dist-side" }, el("div", { class: "gx-muted" }, "quantiles over steps (exact)"), ui.quant)),
    el("div", { class: "gx-dist-hist" }, ui.histTitle, ui.bars, ui.stripNames, ui.histReadout, ui.histTable));
  ui.scale.addEventListener("change", () => { state.scale = ui.scale.value; reload(); });
  ui.bins.addEventListener("change", () => { state.bins = Number(ui.bins.value); reload(); });
  for (const c of [ui.heat, ui.strips]) {
    c.addEventListener("mousemove", (e) => hover(c, e));
    c.addEventListener("mouseleave", () => { ui.readout.textContent = ""; });
    c.addEventListener("click", (e) => {
      const cell = cellAt(c, e);
      if (cell && state.d) setStep(state.key, state.d.steps[state.d.start[cell.x]]);
    });
  }
  ui.bars.addEventListener("mousemove", hoverBars);
}

function reload() {
  if (state.key) load(state.key).catch(showError);
}

async function load(key, quiet = false) {
  const ticket = ++state.loading;
  if (!quiet) ui.status.textContent = "computing…";
  const q = new URLSearchParams({ key, bins: String(state.bins), scale: state.scale });
  const t = await arrow(`${ctx.apiBase}/distribution?${q}`);
  if (ticket !== state.loading || key !== state.key) return;  // a newer request won
  state.d = parse(t);
  ui.status.textContent = `${state.d.steps.length} steps, every element`;
  draw();
}

function parse(t) {
  const steps = numbers(t.getChild("step"));
  const n = steps.length;
  const edges = JSON.parse(t.schema.metadata.get("edges"));
  const bins = edges.length - 1;
  const counts = new Float64Array(n * bins);
  const col = t.getChild("counts");
  for (let i = 0; i < n; i++) {
    const row = col.get(i).toArray();
    for (let b = 0; b < bins; b++) counts[i * bins + b] = Number(row[b]);
  }
  const strips = {};
  for (const [name] of STRIPS) strips[name] = numbers(t.getChild(name));
  const q = {};
  for (const name of QUANTS) q[name] = Array.from(t.getChild(name).toArray());
  return { steps, n, edges, bins, counts, strips, q, scale: t.schema.metadata.get("scale"),
           linthresh: JSON.parse(t.schema.metadata.get("linthresh") || "null"), ...columns(n) };
}


function draw() {
  const d = state.d;
  drawHeat(d);
  drawStrips(d);
  const labels = [];
  for (let k = 4; k >= 0; k--) labels.push(el("span", {}, compact(d.edges[Math.round((k * d.bins) / 4)])));
  ui.valueLabels.replaceChildren(...labels);
  ui.axis.replaceChildren(el("span", {}, `step ${d.steps[0] ?? ""}`), el("span", {}, `step ${d.steps[d.n - 1] ?? ""}`));
  drawQuantiles(d);
  showStep();
  ui.heat.dataset.scale = d.scale;
  ui.heat.dataset.drawn = String(d.n);
}

/** Counts per (column, bin): a column's steps summed. */
function columnCounts(d) {
  if (d.cols === d.n) return d.counts;
  const out = new Float64Array(d.cols * d.bins);
  for (let i = 0; i < d.n; i++) {
    const o = d.col[i] * d.bins;
    for (let b = 0; b < d.bins; b++) out[o + b] += d.counts[i * d.bins + b];
  }
  return out;
}

function columnSums(d, v) {
  const out = new Float64Array(d.cols);
  for (let i = 0; i < d.n; i++) out[d.col[i]] += v[i];
  return out;
}

function drawHeat(d) {
  const w = d.cols, h = d.bins;
  d.colCounts = columnCounts(d);
  ui.heat.width = w;
  ui.heat.height = h;
  const g = ui.heat.getContext("2d");
  const img = g.createImageData(w, h);
  let max = 0;
  for (let i = 0; i < d.colCounts.length; i++) if (d.colCounts[i] > max) max = d.colCounts[i];
  const lmax = Math.log1p(max) || 1;
  for (let s = 0; s < w; s++) {
    for (let b = 0; b < h; b++) {
      const c = d.colCounts[s * h + b];
      const rgb = c > 0 ? sequential(Math.log1p(c) / lmax) : EMPTY;
      img.data.set([rgb[0], rgb[1], rgb[2], 255], ((h - 1 - b) * w + s) * 4);
    }
  }
  g.putImageData(img, 0, 0);
}

function drawStrips(d) {
  const w = d.cols;
  ui.strips.width = w;
  ui.strips.height = STRIPS.length;
  const g = ui.strips.getContext("2d");
  const img = g.createImageData(w, STRIPS.length);
  d.colStrips = {};
  STRIPS.forEach(([name], r) => {
    const v = d.colStrips[name] = columnSums(d, d.strips[name]);
    let max = 0;
    for (const x of v) if (x > max) max = x;
    const lmax = Math.log1p(max) || 1;
    for (let s = 0; s < w; s++) {
      const rgb = v[s] > 0 ? (name === "zero" ? sequential(0.15 + 0.85 * Math.log1p(v[s]) / lmax)
                                              : alarm(Math.log1p(v[s]) / lmax)) : EMPTY;
      img.data.set([rgb[0], rgb[1], rgb[2], 255], (r * w + s) * 4);
    }
  });
  g.putImageData(img, 0, 0);
}

function hover(canvas, e) {
  const d = state.d;
  const cell = d && cellAt(canvas, e);
  if (!cell) return;
  const first = d.start[cell.x], last = d.start[cell.x + 1] - 1;
  const where = first === last ? `step ${d.steps[first]}` : `steps ${d.steps[first]}–${d.steps[last]} (summed)`;
  if (canvas === ui.strips) {
    const [name, label] = STRIPS[cell.y];
    ui.readout.textContent = `${where} · ${label}: ${d.colStrips[name][cell.x]}`;
    return;
  }
  const b = d.bins - 1 - cell.y;
  const close = b === d.bins - 1 ? "]" : ")";
  ui.readout.textContent = `${where} · [${exact(d.edges[b])}, ${exact(d.edges[b + 1])}${close} · count ${d.colCounts[cell.x * d.bins + b]}`;
}

let plot = null;
function drawQuantiles(d) {
  const x = d.steps;
  const series = QUANTS.map((name) => d.q[name].map((v) => (Number.isFinite(v) ? v : null)));
  const width = Math.max(260, ui.quant.clientWidth || 360);
  const line = (label, stroke, w = 1) => ({ label, stroke, width: w, points: { show: false } });
  const opts = {
    width, height: 300,
    scales: { x: { time: false }, y: d.scale === "symlog" ? { distr: 4, asinh: d.linthresh || 1 } : {} },
    series: [{ label: "step" },
      line("min", "#adb5bd"), line("p1", "#91a7ff"), line("p5", "#748ffc"), line("p25", "#4c6ef5"),
      line("p50", "#1d3ea8", 2), line("p75", "#4c6ef5"), line("p95", "#748ffc"), line("p99", "#91a7ff"),
      line("max", "#adb5bd")],
    bands: [[9, 1], [8, 2], [7, 3], [6, 4]].map(([hi, lo], i) => ({ series: [hi, lo], fill: `rgba(76,110,245,${0.06 + 0.06 * i})` })),
    axes: [{}, { size: 64 }],  // room for labels such as "39,000" and "1.5e-7" (the default clipped them)
    legend: { live: true },
    // Off the chart, the legend shows the values at the selected step (else the last), not "--".
    hooks: { draw: [(u) => markStep(u)], setCursor: [(u) => { if (u.cursor.idx == null) stepLegend(u); }] },
  };
  if (plot) plot.destroy();
  plot = new uPlot(opts, [x, ...series], ui.quant);
  stepLegend(plot);
  plot.over.addEventListener("click", () => {
    const i = plot.cursor.idx;
    if (i !== null && i !== undefined && state.d) setStep(state.key, state.d.steps[i]);
  });
}

function stepLegend(u) {
  if (state.d && state.d.n) u.setLegend({ idx: stepIndex(state.d) }, false);
}

function markStep(u) {
  if (state.step === null) return;
  const x = u.valToPos(state.step, "x", true);
  const g = u.ctx;
  g.save();
  g.strokeStyle = "#e8590c";
  g.lineWidth = 2;
  g.beginPath();
  g.moveTo(x, u.bbox.top);
  g.lineTo(x, u.bbox.top + u.bbox.height);
  g.stroke();
  g.restore();
}

/** The row of the current step (the last logged step at or before it). */
function stepIndex(d) {
  if (state.step === null) return d.n - 1;
  let lo = 0, hi = d.n - 1, found = -1;
  while (lo <= hi) {
    const mid = (lo + hi) >> 1;
    if (d.steps[mid] <= state.step) { found = mid; lo = mid + 1; } else hi = mid - 1;
  }
  return found < 0 ? 0 : found;
}

function showStep() {
  const d = state.d;
  if (!d || !d.n) return;
  const i = stepIndex(d);
  ui.marker.hidden = false;
  ui.marker.style.left = `${((d.col[i] + 0.5) / d.cols) * 100}%`;
  if (plot) {
    plot.redraw(false, false);
    if (plot.cursor.idx == null) stepLegend(plot);
  }
  drawBars(d, i);
}

/** Where the step histogram's parts sit, in canvas pixels: the bins from 0, then a gap, then
 * one bar per strip (NaN, +Inf, -Inf, zero), wide enough for its name. */
function barsLayout(bins) {
  const bin = 8, gap = 40, strip = 64;
  return { bin, gap, strip, strips: bins * bin + gap, width: bins * bin + gap + STRIPS.length * strip };
}

function drawBars(d, i) {
  const step = d.steps[i];
  const counts = Array.from(d.counts.subarray(i * d.bins, (i + 1) * d.bins));
  ui.histTitle.textContent = `Histogram at step ${step} (exact, same bins)`;
  ui.bars.dataset.step = String(step);
  const L = barsLayout(d.bins);
  ui.bars.width = L.width;
  ui.bars.height = 280;  // drawn at half size, as the bins' canvas pixels
  const g = ui.bars.getContext("2d");
  g.clearRect(0, 0, ui.bars.width, ui.bars.height);
  const max = counts.reduce((m, c) => Math.max(m, c), 1);
  const base = ui.bars.height;
  const top = base - 20;
  g.fillStyle = "#4c6ef5";
  counts.forEach((c, b) => {
    const bh = (c / max) * top;
    g.fillRect(b * L.bin, base - bh, Math.max(1, L.bin - 1), bh);
  });
  // NaN, +Inf, -Inf and zero counts of the step, right of the bins, each named under its bar
  // (as text below the canvas, which is stretched to the page's width; zero in purple: those
  // values are also in their bin).
  const sx = L.strips, sw = L.strip;
  const smax = Math.max(1, ...STRIPS.map(([n]) => d.strips[n][i]), max);
  g.fillStyle = "#adb5bd";
  g.fillRect(L.strips - L.gap / 2, 0, 2, base);
  STRIPS.forEach(([n], k) => {
    const c = d.strips[n][i];
    const bh = (c / smax) * top;
    g.fillStyle = n === "zero" ? "#862e9c" : "#e03131";
    g.fillRect(sx + k * sw + 4, base - bh, sw - 8, bh);
  });
  ui.stripNames.replaceChildren(...STRIPS.map(([n, label], k) => {
    const name = el("span", { dataset: { strip: n } }, label);
    name.style.left = `${((sx + (k + 0.5) * sw) / L.width) * 100}%`;  // under its bar
    return name;
  }));
  ui.bars.dataset.drawn = "1";
  const rows = counts.map((c, b) => el("tr", {}, el("td", {}, exact(d.edges[b])), el("td", {}, exact(d.edges[b + 1])),
    el("td", { class: "gx-count" }, String(c))));
  const stripRows = STRIPS.map(([n, label]) => el("tr", { dataset: { strip: n } },
    el("th", { colspan: "2" }, n === "zero" ? "exact zeros (also in their bin)" : label),
    el("td", { class: "gx-count" }, String(d.strips[n][i]))));
  ui.histTable.replaceChildren(el("details", {}, el("summary", {}, `bin counts at step ${step}`),
    el("table", { class: "gx-hist-counts" },
      el("thead", {}, el("tr", {}, el("th", {}, "from"), el("th", {}, "to"), el("th", {}, "count"))),
      el("tbody", {}, ...rows, ...stripRows))));
}

function hoverBars(e) {
  const d = state.d;
  const cell = d && cellAt(ui.bars, e);
  if (!cell) return;
  const i = stepIndex(d);
  const L = barsLayout(d.bins);
  if (cell.x < L.strips - L.gap) {
    const b = Math.min(d.bins - 1, Math.floor(cell.x / L.bin));
    ui.histReadout.textContent = `[${exact(d.edges[b])}, ${exact(d.edges[b + 1])}${b === d.bins - 1 ? "]" : ")"} · count ${d.counts[i * d.bins + b]}`;
  } else if (cell.x >= L.strips) {
    const k = Math.min(STRIPS.length - 1, Math.floor((cell.x - L.strips) / L.strip));
    ui.histReadout.textContent = `${STRIPS[k][1]}: ${d.strips[STRIPS[k][0]][i]}`;
  }
}

// -- the compare panel -------------------------------------------------------------------------

const box = document.getElementById("panel-compare");
const cmp = {};
if (box) buildCompare();

function buildCompare() {
  box.classList.add("gx-dist");
  cmp.a = el("input", { type: "number", "aria-label": "step A", step: "1" });
  cmp.b = el("input", { type: "number", "aria-label": "step B", step: "1" });
  cmp.go = el("button", { type: "button" }, "a − b");
  cmp.stats = el("div", { class: "gx-stats", role: "status" });
  cmp.heat = el("canvas", { class: "gx-diff-heatmap", "aria-label": "difference heatmap" });
  cmp.readout = el("div", { class: "gx-readout" });
  cmp.run = el("select", { "aria-label": "other run" });
  cmp.runGo = el("button", { type: "button" }, "compare");
  cmp.runStats = el("div", { class: "gx-stats", role: "status" });
  box.replaceChildren(
    el("h2", {}, "Compare"),
    el("div", { class: "gx-toolbar" }, el("span", {}, "step A"), cmp.a, el("span", {}, "minus step B"), cmp.b, cmp.go),
    cmp.stats, cmp.heat, cmp.readout,
    el("div", { class: "gx-toolbar" }, el("span", {}, "the same tensor in run"), cmp.run, cmp.runGo),
    cmp.runStats);
  cmp.heat.hidden = true;
  for (const input of [cmp.a, cmp.b]) input.addEventListener("input", () => { cmpPinned = true; });
  cmp.go.addEventListener("click", () => diff().catch(showError));
  cmp.runGo.addEventListener("click", () => compareRuns().catch(showError));
  cmp.heat.addEventListener("mousemove", hoverDiff);
  api(`/_x/api/runs/${seg(ctx.entity)}/${seg(ctx.project)}`).then(({ runs }) => {
    const others = runs.filter((r) => r.id !== ctx.run);
    cmp.run.replaceChildren(...others.map((r) => el("option", { value: r.id }, r.name ? `${r.name} (${r.id})` : r.id)));
    cmp.runGo.disabled = !others.length;
  }).catch(showError);
}

// Steps A and B follow the selected step (and the step before it) until the user types
// one: then they are the user's for this tensor, kept through loads and live updates.
let cmpPinned = false;
function followStep() {
  const d = state.d;
  if (!box || !d || !d.n || cmpPinned) return;
  const i = stepIndex(d);
  cmp.a.value = String(d.steps[i]);
  cmp.b.value = String(d.steps[Math.max(0, i - 1)]);
}

let diffData = null;
async function diff() {
  if (!state.key) return;
  const q = new URLSearchParams({ key: state.key, a: cmp.a.value, b: cmp.b.value });
  const t = await arrow(`${ctx.apiBase}/diff?${q}`);
  const meta = t.schema.metadata;
  const shape = JSON.parse(meta.get("shape"));
  const stats = JSON.parse(meta.get("stats"));
  const values = t.getChild("values").toArray();
  diffData = { shape, values, layout: layoutOf(shape, values.length), a: meta.get("a"), b: meta.get("b") };
  cmp.stats.replaceChildren(
    el("span", {}, el("b", {}, "max |Δ| "), String(stats.max_abs)),
    el("span", {}, el("b", {}, "cosine "), String(stats.cosine)),
    el("span", {}, el("b", {}, "elements differing "), `${stats.differing} of ${values.length}`),
    el("span", {}, stats.bit_equal ? "bit-equal" : "not bit-equal"));
  drawDiff(Number(stats.max_abs));
}

/** Rows x columns to draw a tensor of `shape` in: the last dim across, the others down
 * (row-major), or wrapped rows when that is too large for a canvas (the readout still names
 * each element's full index). */
function layoutOf(shape, n) {
  const cols = shape.length ? shape[shape.length - 1] : 1;
  const rows = cols ? n / cols : 0;
  if (cols >= 1 && cols <= 8192 && rows <= 8192) return { cols, rows };
  const w = Math.min(n, 1024);
  return { cols: w, rows: Math.ceil(n / w) };
}

function drawDiff(maxAbs) {
  const { values, layout } = diffData;
  const { cols, rows } = layout;
  cmp.heat.width = Math.max(1, cols);
  cmp.heat.height = Math.max(1, rows);
  const g = cmp.heat.getContext("2d");
  const img = g.createImageData(cmp.heat.width, cmp.heat.height);
  const scale = maxAbs > 0 && Number.isFinite(maxAbs) ? maxAbs : 1;
  for (let i = 0; i < values.length; i++) {
    const v = values[i];
    const rgb = Number.isNaN(v) ? MISSING : diverging(Math.max(-1, Math.min(1, v / scale)));
    img.data.set([rgb[0], rgb[1], rgb[2], 255], i * 4);
  }
  g.putImageData(img, 0, 0);
  cmp.heat.hidden = false;
  cmp.heat.style.aspectRatio = `${cmp.heat.width} / ${cmp.heat.height}`;
  cmp.heat.dataset.drawn = "1";
}

function unravel(flat, shape) {
  const idx = new Array(shape.length);
  for (let k = shape.length - 1; k >= 0; k--) {
    idx[k] = flat % shape[k];
    flat = Math.floor(flat / shape[k]);
  }
  return idx;
}

function hoverDiff(e) {
  if (!diffData) return;
  const cell = cellAt(cmp.heat, e);
  if (!cell) return;
  const flat = cell.y * diffData.layout.cols + cell.x;
  if (flat >= diffData.values.length) return;
  cmp.readout.textContent = `[${unravel(flat, diffData.shape).join(", ")}] · a − b = ${exact(diffData.values[flat])}`;
}

async function compareRuns() {
  const other = cmp.run.value;
  if (!state.d || !state.d.n || !other) return;
  const step = state.d.steps[stepIndex(state.d)];
  const q = new URLSearchParams({ key: state.key, step: String(step), a: `${ctx.entity}/${ctx.project}/${ctx.run}`,
                                  b: `${ctx.entity}/${ctx.project}/${other}` });
  cmp.runStats.replaceChildren(el("span", { class: "gx-muted" }, "comparing every step…"));
  const r = await api(`/_x/api/compare?${q}`);
  const first = r.first_differing_step;
  cmp.runStats.replaceChildren(
    el("span", {}, el("b", {}, `step ${step}: `), r.bit_equal ? "bit-equal" : "not bit-equal"),
    el("span", {}, el("b", {}, "max |Δ| "), String(r.max_abs)),
    el("span", {}, el("b", {}, "elements differing "), String(r.differing)),
    el("span", {}, el("b", {}, "first differing step "), first === null ? "none: equal at every step"
      : el("a", { href: "#tensors", class: "gx-first-diff", onclick: (ev) => { ev.preventDefault(); setStep(state.key, first); } },
        String(first))));
}

// -- page events -------------------------------------------------------------------------------

onTensor(({ key }) => {
  if (!key || key === state.key) return;
  state.key = key;
  state.d = null;
  cmpPinned = false;
  if (ui.title) ui.title.textContent = key;
  if (root) load(key).then(followStep).catch(showError);
});

onStep(({ key, step }) => {
  if (key && state.key && key !== state.key) return;
  state.step = step;
  showStep();
  followStep();
});

setInterval(() => {
  const status = document.getElementById("run-status");
  if (!document.hidden && state.key && root && status && status.dataset.status === "running") {
    load(state.key, true).catch(showError);
  }
}, LIVE_MS);
