// The run page: tabs, the header (name, status) and the Overview tab (metadata, config,
// summary; name, tags and notes edited in place where the catalog allows).
import { api, badge, el, flatten, fmtDuration, fmtTime, fmtValue, runContext, runInfo, showError } from "./common.js";

const ctx = runContext();
const TABS = ["overview", "charts", "tensors", "flow", "console"];

function showTab() {
  const want = (location.hash || "#charts").slice(1);
  const tab = TABS.includes(want) ? want : "charts";
  for (const t of TABS) {
    document.getElementById(`tab-${t}`).hidden = t !== tab;
    const link = document.querySelector(`[data-tab="${t}"]`);
    link.setAttribute("aria-selected", String(t === tab));
    link.classList.toggle("gx-active", t === tab);
  }
  document.dispatchEvent(new CustomEvent("gx:tab", { detail: { tab } }));
}
window.addEventListener("hashchange", showTab);
showTab();

function kvRows(obj) {
  const flat = flatten(obj);
  const keys = Object.keys(flat).sort();
  if (!keys.length) return [el("tr", {}, el("td", { class: "gx-muted" }, "(none)"))];
  return keys.map((k) => el("tr", {}, el("th", {}, k), el("td", {}, fmtValue(flat[k]))));
}

function metaRows(info) {
  const m = info.meta || {};
  const end = info.finished_at || (info.status === "running" ? Date.now() / 1000 : info.heartbeat_at);
  const rows = [
    ["status", badge(info.status)],
    ["id", info.id],
    ["project", `${info.entity}/${info.project}`],
    ["group", m.group ?? ""],
    ["job type", m.job_type ?? ""],
    ["started", fmtTime(info.created_at)],
    ["finished", fmtTime(info.finished_at)],
    ["duration", info.created_at && end ? fmtDuration(end - info.created_at) : ""],
    ["last step", info.last_step ?? ""],
    ["host", m.host ?? ""],
    ["argv", Array.isArray(m.argv) ? m.argv.join(" ") : (m.argv ?? "")],
    ["python", m.python ?? ""],
    ["gradexp", m.gradexp ?? ""],
    ["versions", m.versions ? JSON.stringify(m.versions) : ""],
    ["damaged ranges", info.damage || 0],
  ];
  return rows.filter(([, v]) => v !== "").map(([k, v]) => el("tr", {}, el("th", {}, k), el("td", {}, v)));
}

const kv = (rows) => rows.filter(([, v]) => v !== "" && v !== null && v !== undefined)
  .map(([k, v]) => el("tr", {}, el("th", {}, k), el("td", {}, v)));

/** The Exit card: exit code, the uncaught exception (its traceback as text in a <pre>), the signal. */
function fillExit(info) {
  const m = info.meta || {};
  const exc = m.exception || null;
  const sig = m.signal_name || (m.signal !== undefined && m.signal !== null ? `signal ${m.signal}` : "");
  const rows = kv([
    ["exit code", m.exit_code ?? ""],
    ["exception", exc ? exc.type : ""],
    ["message", exc ? exc.message : ""],
    ["signal", sig],
  ]);
  document.getElementById("run-exit").hidden = rows.length === 0 && !(exc && exc.traceback);
  document.querySelector("#run-exit-kv tbody").replaceChildren(...rows);
  const tb = document.getElementById("run-traceback");
  tb.textContent = exc && exc.traceback ? exc.traceback : "";
  tb.hidden = !tb.textContent;
}

let provenance = null;
/** The Code card: program, git commit, branch, remote, dirty flag and the patch to download. */
async function fillCode(info) {
  if (provenance === null || (!provenance.git.commit && !provenance.program && info.status === "running")) {
    provenance = await api(`${ctx.apiBase}/provenance`);
  }
  const m = info.meta || {};
  const p = provenance;
  const program = p.program || m.program || {};
  const git = p.git || {};
  const omitted = git.patch_omitted && git.patch_omitted.length ? ` (left out: ${git.patch_omitted.join(", ")})` : "";
  const patch = p.has_patch ? el("span", {}, el("a", { href: `${ctx.apiBase}/patch`, download: `${ctx.run}.patch`,
                                                       id: "run-patch" }, "download patch"), omitted) : "";
  const rows = kv([
    ["program", program.path || program.module || ""],
    ["cwd", program.cwd || ""],
    ["commit", git.commit || ""],
    ["branch", git.branch || ""],
    ["remote", git.remote || ""],
    ["dirty", git.commit ? (git.dirty ? "yes" : "no") : ""],
    ["patch", patch],
    ["packages", p.packages ? String(p.packages) : ""],
  ]);
  document.querySelector("#run-code tbody").replaceChildren(
    ...(rows.length ? rows : [el("tr", {}, el("td", { class: "gx-muted" }, "(not recorded)"))]));
}

let editing = false;
let lastInfo = null;

function fill(info) {
  lastInfo = info;
  document.getElementById("run-name").textContent = info.name || info.id;
  document.title = `${info.name || info.id} - ${info.project} - gradexp`;
  document.getElementById("run-status").replaceWith(Object.assign(badge(info.status), { id: "run-status" }));
  document.querySelector("#run-meta tbody").replaceChildren(...metaRows(info));
  fillExit(info);
  fillCode(info).catch(showError);
  document.querySelector("#run-config tbody").replaceChildren(...kvRows(info.config));
  document.querySelector("#run-summary tbody").replaceChildren(...kvRows(info.summary));
  if (!editing) {
    document.getElementById("edit-name").value = info.name || "";
    document.getElementById("edit-tags").value = (info.tags || []).join(", ");
    document.getElementById("edit-notes").value = info.notes || "";
  }
  const ro = info.read_only;
  for (const id of ["edit-name", "edit-tags", "edit-notes"]) document.getElementById(id).readOnly = ro;
  document.getElementById("edit-save").hidden = ro;
  if (ro) document.getElementById("edit-state").textContent = "read-only here";
}

for (const id of ["edit-name", "edit-tags", "edit-notes"]) {
  document.getElementById(id).addEventListener("input", () => { editing = true; });
}

document.getElementById("edit-save").addEventListener("click", async () => {
  const state = document.getElementById("edit-state");
  const body = {
    name: document.getElementById("edit-name").value.trim() || null,
    notes: document.getElementById("edit-notes").value,
    tags: document.getElementById("edit-tags").value.split(",").map((t) => t.trim()).filter(Boolean),
  };
  state.textContent = "saving…";
  try {
    const headers = { "Content-Type": "application/json" };
    if (ctx.csrf) headers["X-CSRF-Token"] = ctx.csrf;
    await api(ctx.apiBase, { method: "PATCH", headers, body: JSON.stringify(body) });
    editing = false;
    await refresh({ fresh: true });
    state.textContent = "saved";
  } catch (err) {
    state.textContent = "not saved";
    showError(err);
  }
});

async function refresh({ fresh = false } = {}) {
  const info = await (fresh ? api(ctx.apiBase) : runInfo(ctx.apiBase));  // fresh: not a request sent before a save
  fill(info);
  return info;
}

refresh().catch(showError);
setInterval(() => {
  if (!document.hidden && lastInfo && lastInfo.status === "running") refresh().catch(showError);
}, 2000);
