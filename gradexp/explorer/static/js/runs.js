// The runs table of a project: status, start, duration, last step, chosen config and summary
// columns; filter, sort, and a multi-select that opens the selected runs overlaid in charts.
import { api, badge, el, flatten, fmtDuration, fmtTime, fmtValue, num, seg, showError } from "./common.js";

const { entity, project } = document.body.dataset;
const base = `/${seg(entity)}/${seg(project)}`;
const state = { runs: [], sort: { col: "created", dir: -1 }, selected: new Set(), columns: null };

const FIXED = [
  { id: "name", label: "Name", get: (r) => r.name || r.id },
  { id: "status", label: "Status", get: (r) => r.status },
  { id: "created", label: "Started", get: (r) => r.created_at },
  { id: "duration", label: "Duration", get: duration, num: true },
  { id: "step", label: "Last step", get: (r) => r.last_step, num: true },
];

function duration(r) {
  if (!r.created_at) return null;
  const end = r.finished_at || (r.status === "running" ? Date.now() / 1000 : r.heartbeat_at);
  return end ? end - r.created_at : null;
}

function extraColumns() {
  const cfg = new Set(), sum = new Set();
  for (const r of state.runs) {
    Object.keys(flatten(r.config)).forEach((k) => cfg.add(k));
    Object.keys(r.summary || {}).forEach((k) => { if (!k.startsWith("_")) sum.add(k); });
  }
  return [...[...cfg].sort().map((k) => ({ id: `config:${k}`, label: k, group: "config", key: k })),
          ...[...sum].sort().map((k) => ({ id: `summary:${k}`, label: k, group: "summary", key: k }))];
}

function value(r, col) {
  const f = FIXED.find((c) => c.id === col.id);
  if (f) return f.get(r);
  const v = col.group === "config" ? flatten(r.config)[col.key] : (r.summary || {})[col.key];
  return num(v);
}

function cell(r, col) {
  const v = value(r, col);
  if (col.id === "name") return el("td", {}, el("a", { href: `${base}/${seg(r.id)}` }, v));
  if (col.id === "status") return el("td", {}, badge(v));
  if (col.id === "created") return el("td", {}, fmtTime(v));
  if (col.id === "duration") return el("td", { class: "num" }, fmtDuration(v));
  return el("td", { class: typeof v === "number" ? "num" : "" }, fmtValue(v));
}

function chosen() {
  const extra = extraColumns();
  if (state.columns === null) {  // default: the first few config and summary keys
    state.columns = new Set([...extra.filter((c) => c.group === "config").slice(0, 3),
                             ...extra.filter((c) => c.group === "summary").slice(0, 4)].map((c) => c.id));
  }
  return { extra, cols: [...FIXED, ...extra.filter((c) => state.columns.has(c.id))] };
}

function matches(r) {
  const q = document.getElementById("run-search").value.trim().toLowerCase();
  const status = document.getElementById("run-status").value;
  if (status && r.status !== status) return false;
  if (!q) return true;
  return [r.name, r.id, r.notes, ...(r.tags || [])].some((s) => s && String(s).toLowerCase().includes(q));
}

function compare(a, b) {
  if (a === b) return 0;
  if (a === null || a === undefined || Number.isNaN(a)) return 1;
  if (b === null || b === undefined || Number.isNaN(b)) return -1;
  return a < b ? -1 : 1;
}

function draw() {
  const { extra, cols } = chosen();
  const picker = document.querySelector("#run-columns .gx-columns");
  picker.replaceChildren(...extra.map((c) => el("label", {},
    el("input", { type: "checkbox", checked: state.columns.has(c.id), onchange: (e) => {
      if (e.target.checked) state.columns.add(c.id); else state.columns.delete(c.id);
      draw();
    } }), ` ${c.group}: ${c.label}`)));
  const head = el("tr", {}, el("th", {}, ""), ...cols.map((c) => el("th", {
    class: `gx-sortable${c.num ? " num" : ""}`, dataset: { col: c.id },
    "aria-sort": state.sort.col === c.id ? (state.sort.dir > 0 ? "ascending" : "descending") : null,
    onclick: () => {
      state.sort = { col: c.id, dir: state.sort.col === c.id ? -state.sort.dir : 1 };
      draw();
    } }, c.group ? `${c.group === "config" ? "⚙ " : "Σ "}${c.label}` : c.label)));
  document.querySelector("#runs thead").replaceChildren(head);
  const sortCol = cols.find((c) => c.id === state.sort.col) || FIXED[2];
  const rows = state.runs.filter(matches).sort((a, b) => state.sort.dir * compare(value(a, sortCol), value(b, sortCol)));
  document.querySelector("#runs tbody").replaceChildren(...rows.map((r) => el("tr", { dataset: { run: r.id } },
    el("td", {}, el("input", { type: "checkbox", "aria-label": `select ${r.id}`, checked: state.selected.has(r.id),
      onchange: (e) => { if (e.target.checked) state.selected.add(r.id); else state.selected.delete(r.id); updateCompare(); } })),
    ...cols.map((c) => cell(r, c)))));
  document.getElementById("runs-count").textContent = `${rows.length} of ${state.runs.length} runs`;
  updateCompare();
}

function updateCompare() {
  const button = document.getElementById("compare");
  button.disabled = state.selected.size < 1;
  button.textContent = state.selected.size > 1 ? `Compare ${state.selected.size} runs` : "Open selected";
}

document.getElementById("compare").addEventListener("click", () => {
  const ids = [...state.selected];
  const rest = ids.slice(1).map(seg).join(",");
  window.location.href = `${base}/${seg(ids[0])}${rest ? `?compare=${rest}` : ""}#charts`;
});
document.getElementById("run-search").addEventListener("input", draw);
document.getElementById("run-status").addEventListener("change", draw);

async function load() {
  const { runs } = await api(`/_x/api/runs/${seg(entity)}/${seg(project)}`);
  state.runs = runs;
  const ids = new Set(runs.map((r) => r.id));
  for (const id of state.selected) if (!ids.has(id)) state.selected.delete(id);
  draw();
}

load().catch(showError);
// Live while anything runs: statuses, steps and summaries move.
setInterval(() => {
  if (!document.hidden && state.runs.some((r) => r.status === "running")) load().catch(showError);
}, 2000);
