// Tensors tab: the tensor list (#tensor-list), the step scrubber (#step-scrubber) and the
// tensor at a step (#panel-at-step): 1-D chart, 2-D heatmap, N-D with an axis picker and small
// multiples, and a 3-D surface or bar field (tensor3d.js, loaded on first use).
//
// Indexing: the server sends the tensor flattened ROW-MAJOR with its shape. Element
// [i0, i1, ..., in-1] sits at sum(ik * strides[k]) with strides[k] = prod(shape[k+1:]); every view
// below reads values through `offsetOf` / the same strides and nothing else.

import { api, arrow, runContext, runInfo, onStep, setStep, onTensor, selectTensor } from './common.js';

const STYLE = new URL('../css/tensor.css', import.meta.url).href;
const CACHE_SIZE = 8;          // tensors kept in memory: stepping back and forth stays warm
const MAX_MULTIPLES = 64;      // small multiples drawn at most
const MAX_CANVAS = 16384;      // a side longer than this cannot be a canvas
const PLAY_MS = 250;           // play: at most 4 steps a second
const LIVE_MS = 1500;          // a running run's list and steps are polled this often

// ---------------------------------------------------------------------------------- helpers

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === 'class') node.className = v;
    else if (k === 'text') node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

function rowMajorStrides(shape) {
  const strides = new Array(shape.length);
  let s = 1;
  for (let k = shape.length - 1; k >= 0; k--) { strides[k] = s; s *= shape[k]; }
  return strides;
}

export function offsetOf(strides, index) {
  let o = 0;
  for (let k = 0; k < index.length; k++) o += index[k] * strides[k];
  return o;
}

const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);

function bf16round(v) {  // round-to-nearest-even to bfloat16 (the top 16 bits of a float32)
  f32[0] = v;
  const bits = u32[0];
  u32[0] = ((bits + 0x7fff + ((bits >>> 16) & 1)) >>> 16) << 16;
  return f32[0];
}

const ROUND = {
  float32: Math.fround,
  float16: Math.f16round ?? Math.fround,
  bfloat16: bf16round,
};

// The shortest decimal that reads back to the same value in the tensor's own dtype (as NumPy
// prints it), so what the readout shows IS the stored value.
function formatNumber(v, dtype) {
  if (typeof v === 'bigint') return v.toString();
  if (Number.isNaN(v)) return 'nan';
  if (v === Infinity) return 'inf';
  if (v === -Infinity) return '-inf';
  const round = ROUND[dtype];
  if (!round) return String(v);
  for (let p = 1; p <= 17; p++) {
    const s = v.toPrecision(p);
    if (round(Number(s)) === v) return String(Number(s));
  }
  return String(v);
}

// ------------------------------------------------------------------------------------- data

const ctx = runContext();
const enc = encodeURIComponent;
const tensorCache = new Map();

async function fetchTensor(key, step) {
  const table = await arrow(`${ctx.apiBase}/tensor?key=${enc(key)}&step=${enc(step)}`);
  const meta = table.schema.metadata;
  const shape = JSON.parse(meta.get('shape'));
  const dtype = meta.get('dtype');
  const dims = JSON.parse(meta.get('dims') ?? 'null');
  const values = table.getChild('values').toArray();
  const imagCol = table.getChild('imag');
  const imag = imagCol ? imagCol.toArray() : null;
  // `num`: the numbers colours are taken from (magnitude for complex, Number for 64-bit ints).
  let num = values;
  if (imag) {
    num = new Float64Array(values.length);
    for (let k = 0; k < values.length; k++) num[k] = Math.hypot(values[k], imag[k]);
  } else if (values instanceof BigInt64Array || values instanceof BigUint64Array) {
    num = Float64Array.from(values, Number);
  }
  let lo = Infinity, hi = -Infinity;
  for (let k = 0; k < num.length; k++) {
    const v = num[k];
    if (v < lo) lo = v;
    if (v > hi) hi = v;  // NaN fails both tests; ±Inf are excluded below
  }
  if (lo === -Infinity || hi === Infinity) {
    lo = Infinity; hi = -Infinity;
    for (let k = 0; k < num.length; k++) {
      const v = num[k];
      if (Number.isFinite(v)) { if (v < lo) lo = v; if (v > hi) hi = v; }
    }
  }
  return { key, step, shape, dtype, dims, values, imag, num, strides: rowMajorStrides(shape),
           lo: lo <= hi ? lo : 0, hi: lo <= hi ? hi : 0 };
}

function loadTensor(key, step) {
  const id = `${key}\n${step}`;
  let p = tensorCache.get(id);
  if (p) { tensorCache.delete(id); tensorCache.set(id, p); return p; }
  p = fetchTensor(key, step);
  p.catch(() => tensorCache.delete(id));
  tensorCache.set(id, p);
  while (tensorCache.size > CACHE_SIZE) tensorCache.delete(tensorCache.keys().next().value);
  return p;
}

function valueText(t, offset) {
  if (t.dtype === 'bool') return t.values[offset] ? 'True' : 'False';
  if (!t.imag) return formatNumber(t.values[offset], t.dtype);
  const part = t.dtype === 'complex64' ? 'float32' : 'float64';  // the dtype of each half
  const im = t.imag[offset];
  const sign = im < 0 || Object.is(im, -0) ? '-' : '+';
  return `${formatNumber(t.values[offset], part)}${sign}${formatNumber(Math.abs(im), part)}j`;
}

function dimName(t, k) {
  return t.dims && t.dims[k] ? t.dims[k] : `dim ${k}`;
}

function indexText(t, index) {
  if (t.dims) return `[${index.map((v, k) => `${t.dims[k] ?? k}=${v}`).join(', ')}]`;
  return `[${index.join(', ')}]`;
}

function readoutText(t, index) {
  return `${indexText(t, index)} = ${valueText(t, offsetOf(t.strides, index))}`;
}

// ---------------------------------------------------------------------------- colour scale

// Diverging blue - white - red, symmetric about 0; NaN grey, +Inf / -Inf the darkest ends.
const LUT = new Uint32Array(256);
const NAN_PX = rgba(160, 160, 160);
const POS_INF_PX = rgba(103, 0, 13);
const NEG_INF_PX = rgba(8, 48, 107);
function rgba(r, g, b) { return (255 << 24 | b << 16 | g << 8 | r) >>> 0; }
(() => {
  const stops = [[5, 48, 97], [33, 102, 172], [67, 147, 195], [146, 197, 222], [209, 229, 240],
                 [247, 247, 247], [253, 219, 199], [244, 165, 130], [214, 96, 77], [178, 24, 43],
                 [103, 0, 31]];
  for (let i = 0; i < 256; i++) {
    const x = (i / 255) * (stops.length - 1);
    const a = Math.min(Math.floor(x), stops.length - 2);
    const f = x - a;
    const c = stops[a].map((v, k) => Math.round(v + (stops[a + 1][k] - v) * f));
    LUT[i] = rgba(c[0], c[1], c[2]);
  }
})();

function colourOf(v, amp) {
  if (Number.isNaN(v)) return NAN_PX;
  if (v === Infinity) return POS_INF_PX;
  if (v === -Infinity) return NEG_INF_PX;
  const i = Math.round((v / amp + 1) * 127.5);
  return LUT[i < 0 ? 0 : i > 255 ? 255 : i];
}

export function lutColour(v, amp) {  // [r, g, b] in 0..1, for WebGL
  const c = colourOf(v, amp);
  return [(c & 255) / 255, ((c >>> 8) & 255) / 255, ((c >>> 16) & 255) / 255];
}

function drawSlice(canvas, t, view, fixed, amp) {
  const H = t.shape[view.r], W = t.shape[view.c];
  const sr = t.strides[view.r], sc = t.strides[view.c];
  canvas.width = W; canvas.height = H;
  const g = canvas.getContext('2d');
  const img = g.createImageData(W, H);
  const px = new Uint32Array(img.data.buffer);
  const base = offsetOf(t.strides, fixed);   // fixed[view.r] and fixed[view.c] are 0
  const num = t.num, scale = 127.5 / amp;
  for (let y = 0; y < H; y++) {
    let o = base + y * sr;
    const row = y * W;
    for (let x = 0; x < W; x++, o += sc) {
      const v = num[o];
      let i = (v * scale + 127.5 + 0.5) | 0;   // truncation == round for the non-negative range
      if (i >= 0 && i <= 255 && v - v === 0) px[row + x] = LUT[i];  // v - v: NaN for NaN, ±Inf
      else px[row + x] = colourOf(v, amp);
    }
  }
  g.putImageData(img, 0, 0);
}

// ----------------------------------------------------------------------------------- list

function mountList(root) {
  const search = el('input', { type: 'search', class: 'gx-tensor-search', placeholder: 'Search tensors',
                                'aria-label': 'Search tensors' });
  const chips = el('div', { class: 'gx-chips' });
  const list = el('ul', { class: 'gx-tensor-items' });
  const status = el('div', { class: 'gx-tensor-status' });
  root.replaceChildren(search, chips, list, status);
  const active = new Set();
  let items = [];
  let selected = null;

  function render() {
    const q = search.value.trim().toLowerCase();
    const shown = items.filter((t) => (!q || t.key.toLowerCase().includes(q))
      && [...active].every((p) => t.key.split('/').includes(p)));
    list.replaceChildren(...shown.map((t) => {
      const li = el('li', { class: 'gx-tensor-item' + (t.key === selected ? ' selected' : '') });
      li.dataset.key = t.key;
      const btn = el('button', { type: 'button' },
        el('span', { class: 'gx-tensor-key', text: t.key }),
        el('span', { class: 'gx-tensor-meta',
                     text: `${t.dtype} [${t.shape.join(', ')}] · ${t.steps} step${t.steps === 1 ? '' : 's'}` }));
      btn.addEventListener('click', () => selectTensor(t.key));
      li.append(btn);
      return li;
    }));
    status.textContent = `${shown.length} of ${items.length} tensors`;
  }

  function renderChips() {
    const parts = [];
    for (const t of items) for (const p of t.key.split('/')) if (p && !parts.includes(p)) parts.push(p);
    chips.replaceChildren(...parts.map((p) => {
      const b = el('button', { type: 'button', class: 'gx-chip' + (active.has(p) ? ' active' : ''), text: p });
      b.setAttribute('aria-pressed', String(active.has(p)));
      b.dataset.part = p;
      b.addEventListener('click', () => {
        if (active.has(p)) active.delete(p); else active.add(p);
        renderChips(); render();
      });
      return b;
    }));
  }

  search.addEventListener('input', render);
  onTensor((d) => { selected = d.key; render(); });

  return {
    count(key) { const t = items.find((x) => x.key === key); return t ? t.steps : null; },
    async refresh() {  // re-rendered only when something changed: scroll and focus stay
      const fresh = await api(`${ctx.apiBase}/tensors`);
      if (JSON.stringify(fresh) !== JSON.stringify(items)) { items = fresh; renderChips(); render(); }
      return items;
    },
  };
}

// ------------------------------------------------------------------------------- scrubber

function mountScrubber(root, drawnOn) {
  const prev = el('button', { type: 'button', class: 'gx-step-prev', title: 'Previous step (←)', text: '◀' });
  const play = el('button', { type: 'button', class: 'gx-step-play', title: 'Play', text: 'Play' });
  const next = el('button', { type: 'button', class: 'gx-step-next', title: 'Next step (→)', text: '▶' });
  const range = el('input', { type: 'range', min: '0', max: '0', value: '0', class: 'gx-step-range',
                              'aria-label': 'Step' });
  const label = el('span', { class: 'gx-step-label' });
  root.replaceChildren(prev, play, next, range, label);
  let key = null, steps = [], pos = 0, timer = null;
  let loading = false, wanted = null;  // a step asked for (e.g. a click in another panel) while the steps load

  function show() {
    range.max = String(Math.max(steps.length - 1, 0));
    range.value = String(pos);
    label.textContent = steps.length ? `step ${steps[pos]} (${pos + 1} of ${steps.length})` : 'no steps';
    root.dataset.step = steps.length ? String(steps[pos]) : '';
  }
  function go(i) {
    if (!steps.length) return;
    pos = Math.max(0, Math.min(steps.length - 1, i));
    show();
    setStep(key, steps[pos]);
  }
  function stop() { clearTimeout(timer); timer = null; play.textContent = 'Play'; play.title = 'Play'; }
  function tick() {  // the next step once this one is drawn (or after 2 s), never piling requests up
    if (pos >= steps.length - 1) { stop(); return; }
    const started = performance.now();
    let done = false;
    const after = () => {
      if (done || !timer) return;
      done = true;
      timer = setTimeout(tick, Math.max(PLAY_MS - (performance.now() - started), 0));
    };
    drawnOn.addEventListener('gx:drawn', after, { once: true });
    timer = setTimeout(after, 2000);
    go(pos + 1);
  }
  prev.addEventListener('click', () => go(pos - 1));
  next.addEventListener('click', () => go(pos + 1));
  range.addEventListener('input', () => go(Number(range.value)));
  play.addEventListener('click', () => {
    if (timer) { stop(); return; }
    if (pos >= steps.length - 1) go(0);
    play.textContent = 'Pause'; play.title = 'Pause';
    timer = setTimeout(tick, PLAY_MS);
  });
  document.addEventListener('keydown', (e) => {
    const tag = e.target instanceof Element ? e.target.tagName : '';
    if (!key || e.altKey || e.ctrlKey || e.metaKey || tag === 'TEXTAREA' || tag === 'SELECT'
        || (tag === 'INPUT' && e.target.type !== 'range')) return;
    if (e.target === range) e.preventDefault();  // the slider moves by our step list, not its own
    if (e.key === 'ArrowLeft') { e.preventDefault(); go(pos - 1); }
    else if (e.key === 'ArrowRight') { e.preventDefault(); go(pos + 1); }
  });
  onStep((d) => {  // another panel moved the step: follow it
    const { key: k, step } = d;
    if (k !== key) return;
    if (loading) { wanted = step; return; }
    const i = steps.indexOf(step);
    if (i >= 0 && i !== pos) { pos = i; show(); }
  });

  return {
    async load(k) {
      stop();
      key = k;
      loading = true;
      wanted = null;
      try {
        steps = (await api(`${ctx.apiBase}/steps?key=${enc(k)}`)).steps;
      } finally {
        if (key === k) loading = false;
      }
      if (k !== key) return;  // another tensor was selected meanwhile
      const asked = wanted === null ? -1 : steps.indexOf(wanted);
      pos = asked >= 0 ? asked : steps.length - 1;  // the step asked for, else the last
      show();
      setStep(key, steps[pos]);
    },
    async extend() {  // a live run logged more steps: at the last step, follow the new last
      if (!key) return;
      const k = key;
      const fresh = (await api(`${ctx.apiBase}/steps?key=${enc(k)}`)).steps;
      if (k !== key || fresh.length === steps.length) return;
      const atEnd = pos === steps.length - 1 && !timer;
      steps = fresh;
      if (atEnd) go(steps.length - 1); else show();
    },
  };
}

// --------------------------------------------------------------------------- at a step

function mountPanel(root) {
  const controls = el('div', { class: 'gx-at-controls' });
  const axes = el('div', { class: 'gx-axes' });
  const figure = el('div', { class: 'gx-at-figure' });
  const readout = el('div', { class: 'gx-readout', 'aria-live': 'polite' });
  const caption = el('div', { class: 'gx-at-caption' });
  const legend = el('div', { class: 'gx-legend' });
  root.replaceChildren(controls, axes, caption, legend, figure, readout);

  const mode = el('select', { class: 'gx-mode', 'aria-label': 'View' });
  const scaleSel = el('select', { class: 'gx-scale', 'aria-label': 'Colour scale' },
    el('option', { value: 'step', text: 'scale per step' }),
    el('option', { value: 'fixed', text: 'scale fixed across steps' }));
  controls.replaceChildren(mode, scaleSel);

  let t = null;                  // the tensor on show
  let view = null;               // {r, c, index: [...], multiples: dim or -1}
  let want = null;               // the latest requested {key, step}: late answers are dropped
  let fixedRange = null;         // {key, min, max} for 'fixed'
  let viewer3d = null;
  let pointed = null;            // the index last pointed at: scrubbing updates its value

  function point(index) {
    pointed = index;
    readout.textContent = readoutText(t, index);
    readout.dataset.index = JSON.stringify(index);
  }

  const is3d = () => mode.value === 'surface' || mode.value === 'bars';

  function setModes(ndim) {
    const opts = ndim === 1 ? [['line', 'line'], ['bar', 'bar']]
      : [['heatmap', 'heatmap'], ['surface', '3-D surface'], ['bars', '3-D bars']];
    if ([...mode.options].map((o) => o.value).join() === opts.map((o) => o[0]).join()) return;
    mode.replaceChildren(...opts.map(([v, text]) => el('option', { value: v, text })));
  }

  function freshView(shape) {
    const n = shape.length;
    return { r: Math.max(n - 2, 0), c: Math.max(n - 1, 0), index: shape.map(() => 0), multiples: -1 };
  }

  function renderAxes() {
    axes.replaceChildren();
    if (!t || t.shape.length < 2) return;
    const n = t.shape.length;
    const dimOptions = (sel) => t.shape.map((size, k) => {
      const o = el('option', { value: String(k), text: `${dimName(t, k)} (${size})` });
      if (k === sel) o.selected = true;
      return o;
    });
    const rows = el('select', { class: 'gx-axis-rows', 'aria-label': 'Rows' }, ...dimOptions(view.r));
    const cols = el('select', { class: 'gx-axis-cols', 'aria-label': 'Columns' }, ...dimOptions(view.c));
    const pick = (which, other) => (e) => {
      const k = Number(e.target.value);
      if (k === view[other]) view[other] = view[which];  // picking the other axis's dim swaps them
      view[which] = k;
      if (view.multiples === view.r || view.multiples === view.c) view.multiples = -1;
      renderAxes(); draw();
    };
    rows.addEventListener('change', pick('r', 'c'));
    cols.addEventListener('change', pick('c', 'r'));
    axes.append(el('label', {}, 'rows ', rows), el('label', {}, 'columns ', cols));
    if (n > 2) {
      if (is3d()) view.multiples = -1;  // 3-D draws one slice
      const others = t.shape.map((_, k) => k).filter((k) => k !== view.r && k !== view.c);
      const mult = el('select', { class: 'gx-axis-multiples', 'aria-label': 'Small multiples' },
        el('option', { value: '-1', text: 'none' }),
        ...others.map((k) => el('option', { value: String(k), text: dimName(t, k) })));
      mult.value = String(view.multiples);
      mult.addEventListener('change', () => { view.multiples = Number(mult.value); renderAxes(); draw(); });
      if (!is3d()) axes.append(el('label', {}, 'small multiples over ', mult));
      for (const k of others) {
        if (k === view.multiples) continue;
        const slider = el('input', { type: 'range', min: '0', max: String(t.shape[k] - 1),
                                     value: String(view.index[k]), class: 'gx-axis-index',
                                     'aria-label': `index of ${dimName(t, k)}` });
        slider.dataset.dim = String(k);
        const out = el('span', { class: 'gx-axis-index-value', text: String(view.index[k]) });
        slider.addEventListener('input', () => {
          view.index[k] = Number(slider.value); out.textContent = slider.value; draw();
        });
        axes.append(el('label', {}, `${dimName(t, k)} `, slider, out));
      }
    }
  }

  function renderLegend(amp, show) {
    if (!show) { legend.replaceChildren(); return; }
    const bar = el('canvas', { class: 'gx-legend-bar', width: '256', height: '1' });
    const g = bar.getContext('2d');
    const img = g.createImageData(256, 1);
    new Uint32Array(img.data.buffer).set(LUT);
    g.putImageData(img, 0, 0);
    const fmt = (v) => formatNumber(v, 'float64').replace(/(\.\d{3})\d+/, '$1');
    legend.replaceChildren(el('span', { text: fmt(-amp) }), bar, el('span', { text: fmt(amp) }),
      el('span', { class: 'gx-legend-note', text: scaleSel.value === 'fixed' ? 'fixed across steps' : 'this step' }));
  }

  function amplitude() {
    let lo = t.lo, hi = t.hi;
    if (scaleSel.value === 'fixed' && fixedRange && fixedRange.key === t.key && fixedRange.min !== null) {
      lo = fixedRange.min; hi = fixedRange.max;
    }
    return Math.max(Math.abs(lo), Math.abs(hi)) || 1;
  }

  function hoverCanvas(canvas, fixed) {
    canvas.addEventListener('pointermove', (e) => {
      const rect = canvas.getBoundingClientRect();
      const x = Math.floor(((e.clientX - rect.left) / rect.width) * canvas.width);
      const y = Math.floor(((e.clientY - rect.top) / rect.height) * canvas.height);
      if (x < 0 || y < 0 || x >= canvas.width || y >= canvas.height) return;
      const index = fixed.slice();
      index[view.r] = y; index[view.c] = x;
      point(index);
    });
  }

  function sizeCanvas(canvas, W, H, maxW, maxH) {
    const cell = Math.min(maxW / W, maxH / H, 40);
    canvas.style.width = `${Math.max(1, Math.round(W * cell))}px`;
    canvas.style.height = `${Math.max(1, Math.round(H * cell))}px`;
  }

  function drawHeatmaps(amp) {
    const W = t.shape[view.c], H = t.shape[view.r];
    if (W > MAX_CANVAS || H > MAX_CANVAS) {
      figure.replaceChildren(el('p', { text: `A ${H}×${W} slice is too large to draw; pick other dimensions.` }));
      return;
    }
    const width = Math.max(figure.clientWidth || root.clientWidth || 800, 200);
    const fixed = view.index.slice();
    fixed[view.r] = 0; fixed[view.c] = 0;
    if (view.multiples < 0) {
      const canvas = el('canvas', { class: 'gx-heatmap' });
      drawSlice(canvas, t, view, fixed, amp);
      sizeCanvas(canvas, W, H, width, Math.max(window.innerHeight * 0.7, 300));
      hoverCanvas(canvas, fixed);
      figure.replaceChildren(canvas);
      return;
    }
    const m = view.multiples;
    const count = Math.min(t.shape[m], MAX_MULTIPLES);
    const cols = Math.ceil(Math.sqrt(count));
    const grid = el('div', { class: 'gx-multiples' });
    grid.style.gridTemplateColumns = `repeat(${cols}, auto)`;
    for (let p = 0; p < count; p++) {
      const f = fixed.slice();
      f[m] = p;
      const canvas = el('canvas', { class: 'gx-heatmap' });
      canvas.dataset.multiple = String(p);
      drawSlice(canvas, t, view, f, amp);
      sizeCanvas(canvas, W, H, width / cols - 12, 240);
      hoverCanvas(canvas, f);
      grid.append(el('figure', {}, canvas, el('figcaption', { text: `${dimName(t, m)} = ${p}` })));
    }
    figure.replaceChildren(grid);
    if (t.shape[m] > count) figure.append(el('p', { text: `first ${count} of ${t.shape[m]} shown` }));
  }

  function drawLine(amp) {
    const n = t.shape[0];
    const canvas = el('canvas', { class: 'gx-line' });
    const width = Math.max(figure.clientWidth || root.clientWidth || 800, 200);
    const height = 240, dpr = window.devicePixelRatio || 1;
    canvas.width = Math.round(width * dpr); canvas.height = Math.round(height * dpr);
    canvas.style.width = `${width}px`; canvas.style.height = `${height}px`;
    const g = canvas.getContext('2d');
    g.scale(dpr, dpr);
    const lo = Math.min(t.lo, 0, scaleSel.value === 'fixed' ? -amp : t.lo);
    const hi = Math.max(t.hi, 0, scaleSel.value === 'fixed' ? amp : t.hi);
    const span = hi - lo || 1;
    const X = (i) => ((i + 0.5) / n) * width;
    const Y = (v) => height - 4 - ((v - lo) / span) * (height - 8);
    g.strokeStyle = '#999'; g.beginPath(); g.moveTo(0, Y(0)); g.lineTo(width, Y(0)); g.stroke();
    const num = t.num;
    if (n > 2 * width) {  // more elements than pixels: each pixel column spans its elements' min..max
      const cols = Math.floor(width);
      g.fillStyle = '#2166ac';
      for (let px = 0; px < cols; px++) {
        let a = Infinity, b = -Infinity;
        const end = Math.floor(((px + 1) * n) / cols);
        for (let i = Math.floor((px * n) / cols); i < end; i++) {
          const v = num[i];
          if (v < a) a = v;
          if (v > b) b = v;  // NaN fails both; ±Inf are left out below
        }
        if (mode.value === 'bar') { a = Math.min(a, 0); b = Math.max(b, 0); }
        if (!Number.isFinite(a) || !Number.isFinite(b)) continue;
        g.fillRect(px, Y(b), 1, Math.max(Y(a) - Y(b), 1));
      }
    } else if (mode.value === 'bar') {
      const w = Math.max(width / n - 1, 0.5);
      for (let i = 0; i < n; i++) {
        const v = num[i];
        if (!Number.isFinite(v)) continue;
        g.fillStyle = v < 0 ? '#2166ac' : '#b2182b';
        g.fillRect(X(i) - w / 2, Math.min(Y(v), Y(0)), w, Math.abs(Y(v) - Y(0)));
      }
    } else {
      g.strokeStyle = '#2166ac'; g.beginPath();
      let pen = false;
      for (let i = 0; i < n; i++) {
        const v = num[i];
        if (!Number.isFinite(v)) { pen = false; continue; }
        if (pen) g.lineTo(X(i), Y(v)); else g.moveTo(X(i), Y(v));
        pen = true;
      }
      g.stroke();
    }
    canvas.addEventListener('pointermove', (e) => {
      const rect = canvas.getBoundingClientRect();
      const i = Math.floor(((e.clientX - rect.left) / rect.width) * n);
      if (i < 0 || i >= n) return;
      point([i]);
    });
    figure.replaceChildren(canvas);
  }

  async function draw3d(amp) {
    if (!viewer3d) {
      const { Viewer3D } = await import('./tensor3d.js');
      viewer3d = new Viewer3D(point);
    }
    if (!viewer3d.host.isConnected || figure.firstChild !== viewer3d.host) figure.replaceChildren(viewer3d.host);
    const fixed = view.index.slice();
    fixed[view.r] = 0; fixed[view.c] = 0;
    viewer3d.show(t, { r: view.r, c: view.c, fixed }, amp, mode.value === 'bars' ? 'bars' : 'surface');
  }

  async function draw() {
    if (!t) return;
    const n = t.shape.length;
    caption.textContent = `${t.key} · step ${t.step} · ${t.dtype} [${t.shape.join(', ')}]`;
    root.dataset.key = t.key;
    root.dataset.step = String(t.step);
    if (scaleSel.value === 'fixed' && (!fixedRange || fixedRange.key !== t.key)) {
      const key = t.key;
      const r = await api(`${ctx.apiBase}/tensor-range?key=${enc(key)}`);
      fixedRange = { key, min: r.min, max: r.max };
    }
    const amp = amplitude();
    renderLegend(amp, n >= 2);
    if (t.values.length === 0) {
      figure.replaceChildren(el('p', { class: 'gx-empty', text: `no elements (shape [${t.shape.join(', ')}])` }));
    } else if (n === 1) drawLine(amp);
    else if (is3d()) await draw3d(amp);
    else drawHeatmaps(amp);
    root.dataset.drawn = `${t.key}\n${t.step}\n${performance.now()}`;
    root.dispatchEvent(new CustomEvent('gx:drawn', { detail: { key: t.key, step: t.step } }));
  }

  mode.addEventListener('change', () => { if (t) renderAxes(); draw(); });
  // Drawn while its tab was hidden (no width yet): draw again once it has one.
  let drawnWidth = 0;
  new ResizeObserver(() => {
    const w = figure.clientWidth;
    if (t && w && Math.abs(w - drawnWidth) > 40) { drawnWidth = w; draw(); }
  }).observe(figure);
  scaleSel.addEventListener('change', () => draw());

  return {
    async show(key, step) {
      want = { key, step };
      let next;
      try {
        next = await loadTensor(key, step);
      } catch (err) {
        if (want.key === key && want.step === step) {
          figure.replaceChildren(el('p', { class: 'gx-error', text: String(err.message ?? err) }));
        }
        return;
      }
      if (want.key !== key || want.step !== step) return;
      const sameLayout = t && t.key === key && t.shape.join() === next.shape.join();
      t = next;
      if (!sameLayout) { view = freshView(t.shape); setModes(t.shape.length); renderAxes(); pointed = null; }
      if (pointed) point(pointed);
      else { readout.textContent = ''; delete readout.dataset.index; }
      await draw();
    },
  };
}

// ------------------------------------------------------------------------------------ wire

function start() {
  const listRoot = document.getElementById('tensor-list');
  const scrubRoot = document.getElementById('step-scrubber');
  const panelRoot = document.getElementById('panel-at-step');
  if (!listRoot || !scrubRoot || !panelRoot) return;
  const link = el('link', { rel: 'stylesheet', href: STYLE });
  document.head.append(link);
  const list = mountList(listRoot);
  const scrubber = mountScrubber(scrubRoot, panelRoot);  // play waits for the panel's draws
  const panel = mountPanel(panelRoot);
  let current = null;
  onTensor((d) => {
    const { key } = d;
    if (key === current) return;
    current = key;
    scrubber.load(key).catch((err) => console.error(err));
  });
  onStep((d) => {
    const { key, step } = d;
    if (key === current) panel.show(key, step);
  });
  list.refresh().then((items) => {
    if (items.length && current === null) selectTensor(items[0].key);
  }).catch((err) => {
    listRoot.append(el('p', { class: 'gx-error', text: String(err.message ?? err) }));
  });

  // Live: while the run is running, new keys and steps show within LIVE_MS.
  let running = null, polls = 0, busy = false;
  async function poll() {
    if (busy || document.hidden) return;
    busy = true;
    try {
      if (running === null || polls++ % 10 === 0) running = (await runInfo(ctx.apiBase)).status === 'running';
      if (!running) return;
      const known = list.count(current);
      const items = await list.refresh();
      const now = items.find((t) => t.key === current);
      if (now && now.steps !== known) await scrubber.extend();
      if (current === null && items.length) selectTensor(items[0].key);
    } catch (err) {
      console.error(err);
    } finally {
      busy = false;
    }
  }
  setInterval(poll, LIVE_MS);
}

start();
