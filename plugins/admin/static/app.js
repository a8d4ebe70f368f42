// socksflow dashboard: no framework, no build step. The server pushes one traffic sample a
// second (server-sent events); each sample refreshes the visible page of sessions and the
// tables, which are updated by diff (rows keyed by id, cells written only when they change),
// so 5000 open sessions cost one page of rows in the DOM.
"use strict";

const PAGE = 100;
const params = new URLSearchParams(location.hash.slice(1));
const token = params.get("token") || sessionStorage.getItem("socksflow-token") || "";
if (token) sessionStorage.setItem("socksflow-token", token);
const state = { offset: 0, filters: {}, traffic: [], busy: false, again: false };
const $ = (id) => document.getElementById(id);

function api(path, options = {}) {
  const headers = token ? { Authorization: "Bearer " + token } : {};
  return fetch(path, { ...options, headers }).then((response) => {
    if (!response.ok) throw new Error(path + ": " + response.status);
    return response.json();
  });
}

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : String(Math.round(n))) + " " + units[i];
}
const rate = (n) => bytes(n) + "/s";
function age(seconds) {
  if (seconds < 60) return Math.floor(seconds) + "s";
  if (seconds < 3600) return Math.floor(seconds / 60) + "m" + String(Math.floor(seconds % 60)).padStart(2, "0");
  return Math.floor(seconds / 3600) + "h" + String(Math.floor((seconds % 3600) / 60)).padStart(2, "0");
}
const clock = (t) => new Date(t * 1000).toLocaleTimeString();
const text = (v) => (v === null || v === undefined ? "–" : String(v));
const where = (rule) => (rule ? rule.replace(/^.*\//, "") : "–");  // rules.yaml:14, the path in the tooltip

function setText(node, value) {
  if (node.textContent !== value) node.textContent = value;
}

// Rows keyed by `key`, in the order given; unchanged cells are not touched.
function sync(tbody, items, key, cells, decorate) {
  const existing = new Map();
  for (const tr of tbody.rows) existing.set(tr.dataset.key, tr);
  let previous = null;
  for (const item of items) {
    const id = String(item[key]);
    let tr = existing.get(id);
    const values = cells(item);
    if (!tr) {
      tr = document.createElement("tr");
      tr.dataset.key = id;
      for (let i = 0; i < values.length; i++) tr.insertCell();
      if (decorate) decorate(tr, item, true);
    } else {
      existing.delete(id);
    }
    values.forEach((value, i) => setText(tr.cells[i], value));
    if (decorate) decorate(tr, item, false);
    const wanted = previous ? previous.nextSibling : tbody.firstChild;
    if (wanted !== tr) tbody.insertBefore(tr, wanted);
    previous = tr;
  }
  for (const tr of existing.values()) tr.remove();
}

// ------------------------------------------------------------------ sessions

function sessionCells(s) {
  return [s.id, s.client, text(s.user), text(s.command), text(s.destination), text(s.address), where(s.rule),
    bytes(s.bytes_up), bytes(s.bytes_down), rate(s.rate_up), rate(s.rate_down), age(s.age)];
}

function sessionRow(tr, s, created) {
  tr.cells[6].title = s.rule || "";
  if (!created) return;
  tr.dataset.id = s.id;
  const button = document.createElement("button");
  button.type = "button";
  button.className = "close";
  button.dataset.id = s.id;
  button.textContent = "close";
  tr.insertCell().appendChild(button);  // after the data cells, which sync() rewrites
}

function query(extra = {}) {
  const q = new URLSearchParams({ ...state.filters, ...extra });
  return q.toString();
}

async function refreshSessions() {
  const page = await api("/api/sessions?" + query({ offset: state.offset, limit: PAGE }));
  if (page.matched && state.offset >= page.matched) {
    state.offset = Math.max(0, Math.floor((page.matched - 1) / PAGE) * PAGE);
    return refreshSessions();
  }
  sync($("sessions").tBodies[0], page.sessions, "id", sessionCells, sessionRow);
  const last = Math.min(page.offset + page.sessions.length, page.matched);
  setText($("page"), page.matched ? `${page.offset + 1}–${last} of ${page.matched}` : "no sessions");
  setText($("sessions-count"), `${page.matched} shown of ${page.total} open`);
  $("prev").disabled = page.offset === 0;
  $("next").disabled = last >= page.matched;
}

// ------------------------------------------------------------------ the other tables

async function refreshRules() {
  const body = await api("/api/rules");
  const hits = body.hits;
  if (!hits) { setText($("rules-since"), "(no rules section)"); return; }
  setText($("rules-since"), `since ${clock(hits.since)}; no rule matched: ${hits.unmatched}`);
  sync($("rules").tBodies[0], hits.rules, "rule",
    (r) => [where(r.rule), r.action, String(r.hits), r.reason || ""],
    (tr, r) => {
      tr.dataset.rule = r.rule;
      tr.cells[0].title = r.rule;
      tr.classList.toggle("never", r.hits === 0);
      tr.cells[1].className = r.action;
    });
}

async function refreshUsers() {
  const body = await api("/api/users");
  sync($("users").tBodies[0], body.users, "user",
    (u) => [u.user, String(u.open), String(u.sessions), String(u.denied), bytes(u.bytes_up), bytes(u.bytes_down)]);
}

async function refreshEvents() {
  const body = await api("/api/events");
  const cells = (e) => [clock(e.time), e.client, text(e.user), e.reason];
  sync($("auth-failures").tBodies[0], body.auth_failures.slice(0, 20), "session", cells);
  sync($("refusals").tBodies[0], body.refusals.slice(0, 20), "session", cells);
}

// One refresh at a time; a sample arriving meanwhile asks for one more.
async function refresh() {
  if (state.busy) { state.again = true; return; }
  state.busy = true;
  try {
    await Promise.all([refreshSessions(), refreshRules(), refreshUsers(), refreshEvents()]);
  } catch (error) {
    setText($("status"), String(error.message || error));
  } finally {
    state.busy = false;
    if (state.again) { state.again = false; refresh(); }
  }
}

// ------------------------------------------------------------------ totals and traffic

function showTotals(t) {
  setText($("t-sessions"), String(t.sessions));
  setText($("t-ended"), String(t.ended));
  setText($("t-denied"), String(t.denied));
  setText($("t-up"), bytes(t.bytes_up));
  setText($("t-down"), bytes(t.bytes_down));
  setText($("t-rate-up"), rate(t.rate_up));
  setText($("t-rate-down"), rate(t.rate_down));
}

function drawSparkline() {
  const canvas = $("sparkline");
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth * ratio, height = canvas.clientHeight * ratio;
  if (canvas.width !== width || canvas.height !== height) { canvas.width = width; canvas.height = height; }
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, width, height);
  ctx.strokeStyle = "#dde1e6";
  ctx.beginPath(); ctx.moveTo(0, height - 0.5); ctx.lineTo(width, height - 0.5); ctx.stroke();
  const samples = state.traffic;
  if (samples.length < 2) return;
  const top = Math.max(1, ...samples.map((s) => Math.max(s.up, s.down)));
  const step = width / Math.max(59, samples.length - 1);  // a minute wide at first, then up to five
  const x0 = width - (samples.length - 1) * step;
  for (const [field, color] of [["down", "#2b7bd9"], ["up", "#d9822b"]]) {
    ctx.strokeStyle = color;
    ctx.lineWidth = 2 * ratio;
    ctx.beginPath();
    samples.forEach((s, i) => {
      const y = height - 2 - (s[field] / top) * (height - 6);
      if (i === 0) ctx.moveTo(x0 + i * step, y); else ctx.lineTo(x0 + i * step, y);
    });
    ctx.stroke();
  }
}

function connect() {
  const source = new EventSource("/api/stream" + (token ? "?token=" + encodeURIComponent(token) : ""));
  source.onopen = () => { setText($("status"), "live"); $("status").className = "status live"; };
  source.onerror = () => { setText($("status"), "reconnecting…"); $("status").className = "status"; };
  source.onmessage = (message) => {
    const data = JSON.parse(message.data);
    state.traffic.push(data.traffic);
    if (state.traffic.length > 300) state.traffic.shift();
    showTotals(data.totals);
    drawSparkline();
    refresh();
  };
}

// ------------------------------------------------------------------ controls

let typing = null;
$("filters").addEventListener("input", () => {
  clearTimeout(typing);
  typing = setTimeout(() => {
    const form = new FormData($("filters"));
    state.filters = {};
    for (const [name, value] of form.entries()) if (value) state.filters[name] = value;
    state.offset = 0;
    refresh();
  }, 250);
});
$("filters").addEventListener("submit", (event) => event.preventDefault());
$("prev").addEventListener("click", () => { state.offset = Math.max(0, state.offset - PAGE); refresh(); });
$("next").addEventListener("click", () => { state.offset += PAGE; refresh(); });
$("sessions").addEventListener("click", async (event) => {
  const button = event.target.closest("button.close");
  if (!button) return;
  button.disabled = true;
  await api("/api/sessions/" + encodeURIComponent(button.dataset.id) + "/close", { method: "POST" }).catch(() => {});
  refresh();
});
$("close-matching").addEventListener("click", async () => {
  const filters = query();
  if (!filters) { alert("Set a filter first: this closes every session that matches it."); return; }
  if (!confirm("Close every session matching " + filters + "?")) return;
  await api("/api/sessions/close?" + filters, { method: "POST" });
  refresh();
});
window.addEventListener("resize", drawSparkline);

Promise.all([api("/api/traffic"), api("/api/totals")]).then(([traffic, totals]) => {
  state.traffic = traffic.samples.slice(-300);
  showTotals(totals);
  drawSparkline();
}).catch(() => {});
refresh();
connect();
