// The projects page: one row per project with its run count and last activity.
import { api, el, fmtTime, seg, showError } from "./common.js";

async function load() {
  const { projects } = await api("/_x/api/projects");
  const body = document.querySelector("#projects tbody");
  body.replaceChildren(...projects.map((p) => el("tr", { dataset: { project: p.name } },
    el("td", {}, el("a", { href: `/${seg(p.entity)}/${seg(p.name)}` }, p.name)),
    el("td", {}, p.entity),
    el("td", { class: "num" }, p.runs),
    el("td", {}, fmtTime(p.last_activity)))));
  document.getElementById("projects-empty").hidden = projects.length > 0;
}

load().catch(showError);
setInterval(() => { if (!document.hidden) load().catch(showError); }, 5000);
