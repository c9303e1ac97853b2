// The Console tab: the run's stdout and stderr as the terminal showed them, one line per
// console line, appended as text nodes (never parsed as HTML). While the run goes the tab
// asks only for the lines after those it shows (?since=N).
import { api, el, runContext, runInfo, showError } from "./common.js";

const ctx = runContext();
const LIVE_MS = 1000;
const box = document.getElementById("console");
const state = document.getElementById("console-state");
let next = 0;
let status = null;
let busy = false;

async function load() {
  if (busy) return;
  busy = true;
  try {
    // The status first: lines written before a run ended are all there once it reads as ended.
    const info = await runInfo(ctx.apiBase);
    const got = await api(`${ctx.apiBase}/console?since=${next}`);
    status = info.status;
    const stick = box.scrollTop + box.clientHeight >= box.scrollHeight - 4;
    const lines = got.lines.filter((x) => x.line >= next);
    box.append(...lines.map((x) => el("span", {
      class: x.stream === "stderr" ? "gx-stderr" : null, dataset: { line: String(x.line) },
      title: new Date(x.time * 1000).toISOString(),
    }, `${x.text}\n`)));
    if (lines.length) next = lines[lines.length - 1].line + 1;
    box.dataset.lines = String(next);
    if (stick) box.scrollTop = box.scrollHeight;
    state.textContent = next ? `${next} lines${status === "running" ? " (live)" : ""}` : "No console output recorded.";
    box.dataset.ready = "1";
  } finally {
    busy = false;
  }
}

let started = false;
document.addEventListener("gx:tab", (e) => {
  if (e.detail.tab !== "console" || started) return;
  started = true;
  load().catch(showError);
  setInterval(() => {
    if (!document.hidden && status === "running") load().catch(showError);
  }, LIVE_MS);
});
if (location.hash === "#console") document.dispatchEvent(new CustomEvent("gx:tab", { detail: { tab: "console" } }));
