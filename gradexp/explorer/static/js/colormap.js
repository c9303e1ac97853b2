// Colours and small helpers shared by the distribution, compare and gradient-flow views.

// viridis at five stops (matplotlib's), interpolated linearly: dark = few, yellow = many.
const VIRIDIS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
// RdBu reversed at five stops: blue < 0 < red.
const DIVERGING = [[33, 102, 172], [146, 197, 222], [247, 247, 247], [244, 165, 130], [178, 24, 43]];

export const EMPTY = [246, 246, 249];
export const MISSING = [200, 200, 206];

function ramp(stops, t) {
  if (!(t >= 0)) t = 0;
  if (t > 1) t = 1;
  const x = t * (stops.length - 1);
  const i = Math.min(stops.length - 2, Math.floor(x));
  const f = x - i;
  const a = stops[i], b = stops[i + 1];
  return [a[0] + (b[0] - a[0]) * f, a[1] + (b[1] - a[1]) * f, a[2] + (b[2] - a[2]) * f];
}

/** Sequential colour of t in [0, 1]. */
export const sequential = (t) => ramp(VIRIDIS, t);

/** Diverging colour of t in [-1, 1] (0 = white). */
export const diverging = (t) => ramp(DIVERGING, (t + 1) / 2);

/** Red of growing strength for t in [0, 1] (non-finite counts); t = 0 still shows. */
export const alarm = (t) => [255 - 60 * t, 150 - 150 * t, 140 - 140 * t];

/** Fill a canvas with a left-to-right legend of colour(t), t from 0 to 1. */
export function drawLegend(canvas, colour) {
  canvas.width = 128;
  canvas.height = 1;
  const g = canvas.getContext("2d");
  const img = g.createImageData(128, 1);
  for (let x = 0; x < 128; x++) {
    const c = colour(x / 127);
    img.data.set([c[0], c[1], c[2], 255], x * 4);
  }
  g.putImageData(img, 0, 0);
}

/** The cell under a mouse event on a canvas drawn one pixel per cell (scaled by CSS). */
export function cellAt(canvas, event) {
  const r = canvas.getBoundingClientRect();
  const x = Math.floor(((event.clientX - r.left) / r.width) * canvas.width);
  const y = Math.floor(((event.clientY - r.top) / r.height) * canvas.height);
  if (x < 0 || y < 0 || x >= canvas.width || y >= canvas.height) return null;
  return { x, y };
}

/** A number as text: exact (shortest round-trip form) or compact for axis labels. */
export function exact(v) {
  if (v === null || v === undefined) return "—";
  return String(v);
}

export function compact(v) {
  if (v === null || v === undefined || Number.isNaN(v)) return "—";
  if (!Number.isFinite(v)) return String(v);
  if (v === 0) return "0";
  const a = Math.abs(v);
  return a < 1e-3 || a >= 1e5 ? v.toExponential(2) : String(+v.toPrecision(4));
}

let linked = false;
/** Load the views' stylesheet once (the CSP allows only our own files, no inline style). */
export function ensureCss() {
  if (linked) return;
  linked = true;
  const link = document.createElement("link");
  link.rel = "stylesheet";
  link.href = "/_x/static/css/distribution.css";
  document.head.append(link);
}

/** Arrow int64 columns arrive as BigInt64Array: plain numbers instead. */
export function numbers(vector) {
  const a = vector.toArray();
  return a instanceof BigInt64Array || a instanceof BigUint64Array ? Array.from(a, Number) : Array.from(a);
}

const MAX_COLUMNS = 4096;
/** Pixel columns for n steps: one per step up to 4,096 (a canvas has at most 32,767), else
 * runs of consecutive steps that the views sum (counts) or take the maximum of (statistics),
 * never sample. start[c] is the first step index of column c; col[i] the column of step i. */
export function columns(n) {
  const cols = Math.max(1, Math.min(n, MAX_COLUMNS));
  const start = new Int32Array(cols + 1);
  const col = new Int32Array(n);
  for (let c = 0; c <= cols; c++) start[c] = Math.floor((c * n) / cols);
  for (let c = 0; c < cols; c++) col.fill(c, start[c], start[c + 1]);
  return { cols, start, col };
}
