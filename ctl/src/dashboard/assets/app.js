// The dashboard's pages, drawn from /api/* (the same JSON as
// `procurator-ctl … --output json`). The URL's fragment names the page,
// so each can be linked to: #/fleet, #/deployments, #/deployment/ID,
// #/machine/NAME. Text goes in with textContent only: nothing an agent
// reports can become markup.
"use strict";

const page = document.getElementById("page");
const statusLine = document.getElementById("status");
// The live deployment page's event source, closed when the page changes.
let live = null;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : String(child ?? ""));
  }
  return node;
}

function link(href, text) {
  return el("a", { href }, text);
}

function stateCell(state) {
  return el("td", { class: "state-" + state }, state);
}

// `6h5k23a2…-nixos-system-web-1`, as ctl's tables shorten store paths.
function shortPath(path) {
  const m = /^\/nix\/store\/([0-9a-z]{32})(-.*)$/.exec(path || "");
  return m ? m[1].slice(0, 8) + "…" + m[2] : path || "-";
}

function table(caption, headers, rows) {
  const head = el("tr", {}, ...headers.map((h) => el("th", { scope: "col" }, h)));
  return el("table", {}, el("caption", {}, caption), el("thead", {}, head), el("tbody", {}, ...rows));
}

async function api(path) {
  const response = await fetch(path, { credentials: "same-origin" });
  const body = await response.json().catch(() => ({ error: response.statusText }));
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

function show(title, ...content) {
  document.title = title + " · Procurator";
  page.replaceChildren(el("h1", {}, title), ...content);
  page.focus();
}

async function fleet() {
  const agents = await api("/api/agents");
  const search = el("input", { type: "search", id: "filter", "aria-label": "Filter machines by name" });
  const rows = agents.map((a) =>
    el("tr", { "data-machine": a.machine },
      el("td", {}, link("#/machine/" + encodeURIComponent(a.machine), a.machine)),
      el("td", {}, a.connected ? "connected" : "not connected"),
      el("td", {}, el("code", { title: a.currentSystem || "" }, shortPath(a.currentSystem))),
      el("td", {}, a.certificate && a.certificate.notAfter ? a.certificate.notAfter : "-")));
  const body = table(agents.length + " machines", ["Machine", "Connection", "Runs", "Certificate ends"], rows);
  search.addEventListener("input", () => {
    const wanted = search.value.trim();
    for (const row of rows) row.hidden = wanted !== "" && !row.dataset.machine.includes(wanted);
  });
  show("Fleet", el("label", { for: "filter" }, "Filter: "), search, body);
}

async function deploymentList() {
  const list = await api("/api/deployments");
  const rows = list.map((d) =>
    el("tr", {},
      el("td", {}, link("#/deployment/" + encodeURIComponent(d.id), d.id)),
      el("td", {}, el("code", {}, (d.gitCommit || "").slice(0, 12))),
      stateCell(d.state),
      el("td", {}, d.counts.ok + " ok, " + d.counts.failed + " failed, " + d.counts.total + " in all"),
      el("td", {}, d.submittedBy || "-"),
      el("td", {}, d.createdAt || "-")));
  show("Deployments", table(list.length + " newest", ["Deployment", "Commit", "State", "Machines", "Submitted by", "Created"], rows));
}

async function deployment(id, pageToken) {
  const d = await api("/api/deployments/" + encodeURIComponent(id));
  const query = pageToken ? "?page_token=" + encodeURIComponent(pageToken) : "";
  const rows = await api("/api/deployments/" + encodeURIComponent(id) + "/machines" + query);
  const counts = Object.entries(d.machineCounts || {}).map(([label, n]) => n + " " + label).join(", ");
  const shown = new Map();
  const body = rows.machines.map((m) => {
    const state = stateCell(m.state + (m.failedPhase ? " (" + m.failedPhase + ")" : ""));
    const reason = el("td", {}, m.reason || "");
    shown.set(m.machine, { state, reason });
    return el("tr", {},
      el("td", {}, link("#/machine/" + encodeURIComponent(m.machine), m.machine)),
      state,
      el("td", {}, el("code", { title: m.closure }, shortPath(m.closure))),
      reason);
  });
  const more = rows.nextPageToken
    ? el("p", {}, link("#/deployment/" + encodeURIComponent(id) + "/" + encodeURIComponent(rows.nextPageToken), "Next machines"))
    : "";
  const stateWord = el("strong", { class: "state-" + d.state }, d.state);
  const countText = el("span", {}, counts);
  show("Deployment " + d.id,
    el("p", {}, "State: ", stateWord, " · commit ", el("code", {}, d.gitCommit), " · ", countText),
    table(d.counts.total + " machines", ["Machine", "State", "Closure", "Reason"], body),
    more);
  if (d.finishedAt) return;
  // Live: each event moves its row; the counts are read again at most
  // once a second. The browser resumes after the last event id by itself.
  let recount = null;
  live = new EventSource("/api/deployments/" + encodeURIComponent(id) + "/events");
  live.addEventListener("update", (message) => {
    const e = JSON.parse(message.data);
    const row = e.machine && shown.get(e.machine);
    if (row) {
      const label = e.state + (e.failedPhase ? " (" + e.failedPhase + ")" : "");
      row.state.textContent = label;
      row.state.className = "state-" + e.state;
      row.reason.textContent = e.message || "";
    }
    recount = recount || setTimeout(async () => {
      recount = null;
      const now = await api("/api/deployments/" + encodeURIComponent(id));
      countText.textContent = Object.entries(now.machineCounts || {}).map(([label, n]) => n + " " + label).join(", ");
    }, 1000);
  });
  live.addEventListener("finished", (message) => {
    const e = JSON.parse(message.data);
    stateWord.textContent = e.state;
    stateWord.className = "state-" + e.state;
    statusLine.textContent = "Deployment " + id + " " + e.state;
    live.close();
  });
}

async function machine(name) {
  const history = await api("/api/machines/" + encodeURIComponent(name));
  const rows = history.map((e) =>
    el("tr", {},
      el("td", {}, link("#/deployment/" + encodeURIComponent(e.deploymentId), e.deploymentId)),
      stateCell(e.state + (e.failedPhase ? " (" + e.failedPhase + ")" : "")),
      el("td", {}, e.startedAt || "-"),
      el("td", {}, e.reason || ""),
      el("td", {}, e.hasLog ? el("button", { type: "button", "data-deployment": e.deploymentId }, "Show log") : "-")));
  const output = el("pre", { id: "log", "aria-label": "Activation log" });
  const logs = table("Deployments, newest first", ["Deployment", "State", "Started", "Reason", "Log"], rows);
  logs.addEventListener("click", async (event) => {
    const id = event.target.dataset && event.target.dataset.deployment;
    if (!id) return;
    const log = await api("/api/machines/" + encodeURIComponent(name) + "/log?deployment=" + encodeURIComponent(id));
    output.textContent = "# " + log.machine + " in " + log.deploymentId + " (" + log.state + ")\n" + log.output;
    output.focus();
  });
  show("Machine " + name, logs, output);
}

async function route() {
  if (live) {
    live.close();
    live = null;
  }
  const parts = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
  statusLine.textContent = "";
  try {
    if (parts[0] === "deployments") await deploymentList();
    else if (parts[0] === "deployment" && parts[1]) await deployment(parts[1], parts[2]);
    else if (parts[0] === "machine" && parts[1]) await machine(parts[1]);
    else await fleet();
  } catch (error) {
    page.replaceChildren(el("h1", {}, "Cannot show this page"), el("p", { class: "error" }, error.message));
  }
}

window.addEventListener("hashchange", route);
route();
