// The Gradient flow tab (#panel-layers): for every tensor under a prefix (e.g. "grad/"), one
// statistic per (layer, step) as a heatmap, one glance for the whole model. Rows are the
// tensor keys in key order, columns the steps. A click opens that tensor at that step in
// the Tensors tab (selectTensor + setStep).
import { arrow, el, runContext, runInfo, selectTensor, setStep, showError } from "./common.js";
import {
  EMPTY, MISSING, alarm, cellAt, columns, compact, drawLegend, ensureCss, exact, numbers, sequential,
} from "./colormap.js";

ensureCss();
const ctx = runContext();
const LIVE_MS = 2000;
const STATS = [["l2", "L2 norm"], ["rms", "RMS"], ["maxabs", "max |x|"], ["zero_frac", "zero fraction"],
               ["nonfinite", "non-finite count"]];
const ROW_PX = 16;

const root = document.getElementById("panel-layers");
const ui = {};
const state = { prefix: null, stat: "l2", data: null, ticket: 0, shown: false };

if (root) {
  root.classList.add("gx-flow");
  ui.prefix = el("input", { type: "search", "aria-label": "key prefix", list: "gx-flow-prefixes", size: "16" });
  ui.prefixes = el("datalist", { id: "gx-flow-prefixes" });
  ui.stat = el("select", { "aria-label": "statistic" }, ...STATS.map(([v, l]) => el("option", { value: v }, l)));
  ui.legend = el("canvas", { "aria-hidden": "true" });
  ui.legendText = el("span", {});
  ui.status = el("span", { class: "gx-muted", role: "status" });
  ui.keys = el("div", { class: "gx-flow-keys" });
  ui.heat = el("canvas", { class: "gx-flow-heatmap", "aria-label": "statistic per layer and step" });
  ui.axis = el("div", { class: "gx-dist-axis" });
  ui.readout = el("div", { class: "gx-readout", "aria-live": "polite" });
  root.replaceChildren(
    el("div", { class: "gx-toolbar" }, el("h2", {}, "Gradient flow"), el("span", {}, "tensors under"), ui.prefix,
      ui.prefixes, ui.stat, el("span", { class: "gx-legend" }, ui.legend, ui.legendText), ui.status),
    el("div", { class: "gx-flow-plot" }, ui.keys, ui.heat),
    el("div", { class: "gx-flow-plot" }, el("span"), ui.axis),
    ui.readout,
    el("div", { class: "gx-muted" }, "From each logged tensor's exact summary (L2 and RMS summed in the tensor's precision). Click a cell to open that tensor at that step."));
  ui.prefix.addEventListener("change", () => { state.prefix = ui.prefix.value; load().catch(showError); });
  ui.stat.addEventListener("change", () => { state.stat = ui.stat.value; load().catch(showError); });
  ui.heat.addEventListener("mousemove", hover);
  ui.heat.addEventListener("mouseleave", () => { ui.readout.textContent = ""; });
  ui.heat.addEventListener("click", click);
  document.addEventListener("gx:tab", (e) => { if (e.detail.tab === "flow") show().catch(showError); });
  if (location.hash === "#flow") show().catch(showError);
  setInterval(() => {
    const status = document.getElementById("run-status");
    if (!document.hidden && state.shown && !root.closest("[hidden]") && status && status.dataset.status === "running") {
      load(true).catch(showError);
    }
  }, LIVE_MS);
}

async function show() {
  if (state.prefix === null) {
    const info = await runInfo(ctx.apiBase);
    const keys = info.tensor_keys || [];
    const tops = [...new Set(keys.filter((k) => k.includes("/")).map((k) => k.split("/")[0] + "/"))];
    ui.prefixes.replaceChildren(...tops.map((t) => el("option", { value: t })));
    state.prefix = tops.includes("grad/") ? "grad/" : (tops[0] || "");
    ui.prefix.value = state.prefix;
  }
  state.shown = true;
  await load();
}

async function load(quiet = false) {
  const ticket = ++state.ticket;
  if (!quiet) ui.status.textContent = "loading…";
  const q = new URLSearchParams({ prefix: state.prefix, stat: state.stat });
  let t;
  try {
    t = await arrow(`${ctx.apiBase}/layers?${q}`);
  } catch (err) {
    if (err.status === 404) {
      ui.status.textContent = `no tensor key starts with "${state.prefix}"`;
      return;
    }
    throw err;
  }
  if (ticket !== state.ticket) return;
  const steps = numbers(t.getChild("step"));
  const keys = t.schema.fields.map((f) => f.name).filter((n) => n !== "step");
  const values = keys.map((k) => Array.from(t.getChild(k).toArray()));
  state.data = { steps, keys, ...columns(steps.length) };
  state.data.shown = values.map((v) => columnMax(state.data, v));
  ui.status.textContent = `${keys.length} tensors × ${steps.length} steps`;
  draw();
}

function colourOf(stat, lo, hi) {
  if (stat === "nonfinite") {
    const l = Math.log1p(hi) || 1;
    return (v) => (v > 0 ? alarm(Math.log1p(v) / l) : EMPTY);
  }
  if (stat === "zero_frac") return (v) => sequential(v);
  // norms span decades: log colour between the smallest positive and the largest value
  const a = Math.log10(lo), b = Math.log10(hi);
  return (v) => (v > 0 ? sequential(b > a ? (Math.log10(v) - a) / (b - a) : 1) : sequential(0));
}

/** A row's value per pixel column: the step's, or the largest of the column's steps (NaN if none). */
function columnMax(d, v) {
  if (d.cols === v.length) return v;
  const out = new Float64Array(d.cols).fill(NaN);
  for (let i = 0; i < v.length; i++) {
    const c = d.col[i];
    if (!Number.isNaN(v[i]) && !(out[c] >= v[i])) out[c] = v[i];
  }
  return out;
}

function draw() {
  const { steps, keys, shown } = state.data;
  const w = state.data.cols, h = Math.max(1, keys.length);
  let lo = Infinity, hi = -Infinity;
  for (const row of shown) {
    for (const v of row) {
      if (!Number.isFinite(v)) continue;
      if (v > 0 && v < lo) lo = v;
      if (v > hi) hi = v;
    }
  }
  const colour = colourOf(state.stat, lo, hi);
  ui.heat.width = w;
  ui.heat.height = h;
  ui.heat.style.height = `${Math.max(48, h * ROW_PX)}px`;
  ui.keys.style.height = ui.heat.style.height;
  ui.keys.style.gridTemplateRows = `repeat(${h}, 1fr)`;
  const g = ui.heat.getContext("2d");
  const img = g.createImageData(w, h);
  shown.forEach((row, r) => {
    for (let s = 0; s < w; s++) {
      const v = row[s];
      const rgb = Number.isNaN(v) ? MISSING : colour(v);
      img.data.set([rgb[0], rgb[1], rgb[2], 255], (r * w + s) * 4);
    }
  });
  g.putImageData(img, 0, 0);
  ui.keys.replaceChildren(...keys.map((k) => el("span", { title: k }, k)));
  ui.axis.replaceChildren(el("span", {}, `step ${steps[0] ?? ""}`), el("span", {}, `step ${steps[steps.length - 1] ?? ""}`));
  drawLegend(ui.legend, state.stat === "nonfinite" ? alarm : sequential);
  ui.legendText.textContent = state.stat === "zero_frac" ? "0 … 1"
    : state.stat === "nonfinite" ? `0 … ${compact(hi)}` : `${compact(lo)} … ${compact(hi)} (log)`;
  ui.heat.dataset.drawn = String(w);
}

function hover(e) {
  const d = state.data;
  const cell = d && cellAt(ui.heat, e);
  if (!cell) return;
  const label = STATS.find(([v]) => v === state.stat)[1];
  const v = d.shown[cell.y][cell.x];
  const first = d.start[cell.x], last = d.start[cell.x + 1] - 1;
  const where = first === last ? `step ${d.steps[first]}` : `steps ${d.steps[first]}–${d.steps[last]} (max)`;
  ui.readout.textContent = `${d.keys[cell.y]} · ${where} · ${label} ${Number.isNaN(v) ? "— (not logged or no finite value)" : exact(v)}`;
}

function click(e) {
  const d = state.data;
  const cell = d && cellAt(ui.heat, e);
  if (!cell) return;
  const key = d.keys[cell.y], step = d.steps[d.start[cell.x]];
  location.hash = "#tensors";
  selectTensor(key);
  setStep(key, step);
}
