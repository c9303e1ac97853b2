// Shared by every explorer page and view: data fetching, the page's run, and the events that
// keep the views of a run page in step. DOM is built with el() (text nodes only): run names,
// keys and values are never parsed as HTML.
import { tableFromIPC } from "/_x/static/vendor/apache-arrow/arrow.esm.js";

export { tableFromIPC };

async function fetchOk(path, opts = {}) {
  const res = await fetch(path, { credentials: "same-origin", ...opts });
  if (!res.ok) {
    let detail = "";
    try { detail = (await res.json()).error || ""; } catch (e) { /* not JSON */ }
    const err = new Error(`${opts.method || "GET"} ${path}: HTTP ${res.status}${detail ? ": " + detail : ""}`);
    err.status = res.status;
    throw err;
  }
  return res;
}

/** Fetch JSON (with the page's credentials); throws an Error naming the URL and status. */
export async function api(path, opts = {}) {
  const res = await fetchOk(path, opts);
  return res.json();
}

const inFlight = new Map();

/** The run's JSON (GET `path`): callers while a request for it is under way share that request.
 * Every module of a run page asks for the run as it starts; a cold server answered those
 * one after another (~0.15 s each), and the charts' request came second. */
export function runInfo(path) {
  if (!inFlight.has(path)) {
    const got = api(path);
    inFlight.set(path, got);
    const done = () => inFlight.delete(path);
    got.then(done, done);
  }
  return inFlight.get(path);
}

/** Fetch an Arrow IPC stream as an apache-arrow Table. */
export async function arrow(path, opts = {}) {
  const res = await fetchOk(path, opts);
  return tableFromIPC(new Uint8Array(await res.arrayBuffer()));
}

/** The run this page shows: {entity, project, run, apiBase} (from <body data-...>). */
export function runContext() {
  const d = document.body.dataset;
  return { entity: d.entity, project: d.project, run: d.run, apiBase: d.apiBase, readOnly: d.readOnly === "true",
           csrf: d.csrf || null };
}

/** Resolves once the Charts tab drew its first screen (or gave up): panels below it wait, so
 * the first charts are not drawn after theirs (the page has one main thread). */
export function firstChartsShown() {
  if (document.body.dataset.firstCharts === "1") return Promise.resolve();
  return new Promise((resolve) => document.addEventListener("gx:first-charts", () => resolve(), { once: true }));
}

/** Listen for the step every panel shows: fn({key, step}). */
export function onStep(fn) {
  document.addEventListener("gx:step", (e) => fn(e.detail));
}

/** Move every panel of the page to `step` (of tensor `key`). */
export function setStep(key, step) {
  document.dispatchEvent(new CustomEvent("gx:step", { detail: { key, step } }));
}

/** Listen for the tensor the page shows: fn({key}). */
export function onTensor(fn) {
  document.addEventListener("gx:tensor", (e) => fn(e.detail));
}

/** Show tensor `key` in every panel. */
export function selectTensor(key) {
  document.dispatchEvent(new CustomEvent("gx:tensor", { detail: { key } }));
}

/** A JSON number that may be "NaN", "Infinity" or "-Infinity" (the API's spelling) as a Number. */
export function num(v) {
  if (v === "NaN") return NaN;
  if (v === "Infinity") return Infinity;
  if (v === "-Infinity") return -Infinity;
  return v;
}

/** Create an element: el("td", {class: "num", title: "x"}, "text", child...). Strings become text nodes. */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "dataset") Object.assign(node.dataset, v);
    else if (k.startsWith("on") && typeof v === "function") node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

/** A path segment, escaped for a URL. */
export const seg = (s) => encodeURIComponent(s);

/** Seconds since the epoch as local date and time. */
export function fmtTime(t) {
  if (t === null || t === undefined) return "";
  const d = new Date(t * 1000);
  const p = (n) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ${p(d.getHours())}:${p(d.getMinutes())}`;
}

/** A duration in seconds as "1h 02m", "3m 04s", "5.2s". */
export function fmtDuration(s) {
  if (s === null || s === undefined || !isFinite(s)) return "";
  if (s < 60) return `${s.toFixed(1)}s`;
  const m = Math.floor(s / 60), h = Math.floor(m / 60);
  if (h) return `${h}h ${String(m % 60).padStart(2, "0")}m`;
  return `${m}m ${String(Math.floor(s % 60)).padStart(2, "0")}s`;
}

/** A value for a table cell: numbers compactly, objects as JSON. */
export function fmtValue(v) {
  v = num(v);
  if (v === null || v === undefined) return "";
  if (typeof v === "number") {
    if (!isFinite(v)) return String(v);
    if (Number.isInteger(v)) return String(v);
    const a = Math.abs(v);
    return a !== 0 && (a < 1e-3 || a >= 1e6) ? v.toExponential(4) : String(+v.toPrecision(6));
  }
  if (typeof v === "object") return JSON.stringify(v);
  return String(v);
}

/** The status badge of a run. */
export function badge(status) {
  return el("span", { class: `gx-badge gx-${status}`, dataset: { status } }, status);
}

/** Nested objects flattened to dotted keys ({a: {b: 1}} -> {"a.b": 1}); lists stay values. */
export function flatten(obj, prefix = "", out = {}) {
  for (const [k, v] of Object.entries(obj || {})) {
    const key = prefix ? `${prefix}.${k}` : k;
    if (v && typeof v === "object" && !Array.isArray(v)) flatten(v, key, out);
    else out[key] = v;
  }
  return out;
}

/** Show an error on the page (and in the console, where tests look). */
export function showError(err) {
  console.error(err);
  let box = document.getElementById("gx-errors");
  if (!box) {
    box = el("div", { id: "gx-errors", class: "gx-error", role: "alert" });
    document.querySelector("main").prepend(box);
  }
  box.append(el("div", {}, err && err.message ? err.message : String(err)));
}
