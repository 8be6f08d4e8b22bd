// The box's own page: polls /status, /stats and /logs on this origin and draws them.
// Plain DOM and SVG, no libraries: the page must work with no network but the box's.
"use strict";

const REFRESH_MS = 3000;
const TABLE_ROWS = 25;
const SVG_NS = "http://www.w3.org/2000/svg";

const view = {
  window: localStorage.getItem("edge-agent.window") || "1h",
  newestId: null,
  records: [],
  open: new Set(),
  token: sessionStorage.getItem("edge-agent.token"),
  needToken: false,
};

function $(id) {
  return document.getElementById(id);
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  for (const child of children) {
    if (child !== null && child !== undefined) {
      node.append(child instanceof Node ? child : String(child));
    }
  }
  return node;
}

function svgEl(tag, attrs, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

class Unauthorized extends Error {}

class HttpError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function getJSON(path) {
  const headers = { Accept: "application/json" };
  if (view.token) headers.Authorization = "Bearer " + view.token;
  const response = await fetch(path, { headers, cache: "no-store" });
  if (response.status === 401) throw new Unauthorized(path);
  const body = await response.json();
  if (!response.ok) {
    throw new HttpError(response.status, (body.error && body.error.message) || response.statusText);
  }
  return body;
}

// ------------------------------------------------------------------ formatting

function fmtNumber(value, digits) {
  if (value === null || value === undefined) return "–";
  if (Math.abs(value) >= 100) return value.toFixed(0);
  return value.toPrecision(digits || 3);
}

function fmtTime(ms, withDate) {
  const d = new Date(ms);
  const time = d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
  return withDate ? d.toLocaleDateString([], { month: "short", day: "numeric" }) + " " + time : time;
}

function fmtAxisTime(ms, spanMs) {
  const d = new Date(ms);
  if (spanMs > 2 * 86400000) return d.toLocaleDateString([], { month: "short", day: "numeric" });
  return d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

function fmtAge(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  if (seconds < 90) return seconds.toFixed(0) + " s";
  if (seconds < 5400) return (seconds / 60).toFixed(0) + " min";
  if (seconds < 172800) return (seconds / 3600).toFixed(1) + " h";
  return (seconds / 86400).toFixed(1) + " days";
}

function fmtBytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i += 1;
  }
  return (i ? n.toFixed(1) : n) + " " + units[i];
}

// ------------------------------------------------------------------ charts

function frame(svg) {
  const width = Math.max(svg.clientWidth || 0, 240);
  const height = Math.max(svg.clientHeight || 0, 120);
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.replaceChildren();
  return { width, height, left: 42, right: width - 8, top: 8, bottom: height - 18 };
}

function xScale(f, stats) {
  const span = stats.end - stats.start;
  return (t) => f.left + ((t + stats.stepMs / 2 - stats.start) / span) * (f.right - f.left);
}

function drawAxes(svg, f, stats, yMax, digits) {
  for (let i = 0; i <= 4; i += 1) {
    const y = f.bottom - (i / 4) * (f.bottom - f.top);
    svg.append(svgEl("line", { class: "grid", x1: f.left, x2: f.right, y1: y, y2: y }));
    svg.append(svgEl("text", { x: f.left - 4, y: y + 3, "text-anchor": "end" },
      fmtNumber((yMax * i) / 4, digits)));
  }
  const span = stats.end - stats.start;
  for (let i = 0; i <= 4; i += 1) {
    const t = stats.start + (span * i) / 4;
    const x = f.left + (i / 4) * (f.right - f.left);
    const anchor = i === 0 ? "start" : i === 4 ? "end" : "middle";
    svg.append(svgEl("text", { x, y: f.height - 4, "text-anchor": anchor }, fmtAxisTime(t, span)));
  }
}

function drawEmpty(svg, f) {
  svg.append(svgEl("text", { class: "empty", x: f.width / 2, y: f.height / 2, "text-anchor": "middle" },
    "no requests in this window"));
}

function drawLatency(svg, points, stats, unit) {
  const f = frame(svg);
  if (!points.length) {
    drawAxes(svg, f, stats, 1, 2);
    drawEmpty(svg, f);
    return;
  }
  const yMax = Math.max(...points.map((p) => p.p95)) * 1.1 || 1;
  const countMax = Math.max(...points.map((p) => p.count));
  drawAxes(svg, f, stats, yMax, 2);
  const x = xScale(f, stats);
  const y = (v) => f.bottom - (v / yMax) * (f.bottom - f.top);
  // Request counts as faint bars along the bottom fifth, behind the lines.
  const barWidth = Math.max(1, ((f.right - f.left) * stats.stepMs) / (stats.end - stats.start) - 1);
  const barSpace = (f.bottom - f.top) / 5;
  for (const p of points) {
    const h = Math.max(1, (p.count / countMax) * barSpace);
    const bar = svgEl("rect", { class: "count", x: x(p.time) - barWidth / 2, y: f.bottom - h, width: barWidth, height: h });
    bar.append(svgEl("title", {}, `${p.count} requests`));
    svg.append(bar);
  }
  for (const key of ["p95", "p50"]) {
    const path = points.map((p, i) => `${i ? "L" : "M"}${x(p.time).toFixed(1)},${y(p[key]).toFixed(1)}`).join("");
    svg.append(svgEl("path", { class: `line ${key}`, d: path }));
    for (const p of points) {
      const dot = svgEl("circle", { class: `point ${key}`, cx: x(p.time), cy: y(p[key]), r: 2.5, "data-time": p.time });
      dot.append(svgEl("title", {},
        `${fmtTime(p.time, true)}  median ${fmtNumber(p.p50)} ${unit}, p95 ${fmtNumber(p.p95)} ${unit}, ${p.count} requests`));
      svg.append(dot);
    }
  }
}

const STATUSES = ["ok", "error", "cancelled"];

function drawRequests(svg, points, stats) {
  const f = frame(svg);
  if (!points.length) {
    drawAxes(svg, f, stats, 1, 2);
    drawEmpty(svg, f);
    return;
  }
  const yMax = Math.max(...points.map((p) => p.total)) * 1.1;
  drawAxes(svg, f, stats, yMax, 2);
  const x = xScale(f, stats);
  const barWidth = Math.max(1, ((f.right - f.left) * stats.stepMs) / (stats.end - stats.start) - 1);
  for (const p of points) {
    let base = f.bottom;
    const others = Object.keys(p.by_status).filter((s) => !STATUSES.includes(s));
    for (const status of [...STATUSES, ...others]) {
      const n = p.by_status[status] || 0;
      if (!n) continue;
      const h = (n / yMax) * (f.bottom - f.top);
      const bar = svgEl("rect", { class: `bar ${STATUSES.includes(status) ? status : "unknown"}`, x: x(p.time) - barWidth / 2, y: base - h, width: barWidth, height: h });
      bar.append(svgEl("title", {}, `${fmtTime(p.time, true)}  ${n} ${status}`));
      svg.append(bar);
      base -= h;
    }
  }
}

// ------------------------------------------------------------------ panels

function fill(id, rows) {
  $(id).replaceChildren(...rows.flatMap(([label, value, title]) => {
    const dd = el("dd", title ? { title } : {}, value);
    return [el("dt", {}, label), dd];
  }));
}

function renderStatus(s) {
  $("pipeline").textContent = s.pipeline;
  $("model-name").textContent = s.model.name;
  document.title = `${s.pipeline} · edge-agent`;
  const badge = $("state");
  badge.textContent = s.state;
  badge.className = "badge " + (s.ready ? "ready" : "bad");
  const banner = $("banner");
  if (s.ready) {
    banner.hidden = true;
  } else {
    const what = {
      loading: "The model is loading: requests get 503 until it is ready.",
      restarting: "The engine is restarting: requests get 503 for a moment.",
      swapping: "The model is being replaced: requests get 503 until the new one serves.",
      error: "The model failed: this box serves no inference.",
      draining: "The daemon is shutting down: no new requests are taken.",
    }[s.state] || "Not ready.";
    banner.textContent = `${what} (${s.reason})`;
    banner.className = "banner" + (s.state === "error" ? " bad" : "");
    banner.hidden = false;
  }
  const q = s.queue;
  fill("now", [
    ["busy slots", `${q.busy_slots} of ${q.slots}`],
    ["queued", `${q.queued} (limit ${q.max_queue})`],
    ["in flight", q.in_flight],
    ["uptime", fmtAge(s.uptime_s)],
    ["log", s.logs.enabled ? `${s.logs.records} records, ${fmtBytes(s.logs.disk_bytes)} of ${fmtBytes(s.logs.max_bytes)}` : "off"],
    ...(s.logs.append_failures ? [["lost records", s.logs.append_failures]] : []),
  ]);
  const e = s.engine;
  fill("engine", [
    ["model", `${s.model.name} (${s.model.status})`],
    ["sha256", s.model.sha.slice(0, 16) + "…", s.model.sha],
    ["version", s.model.version],
    ["backend", e.backend + (e.detail ? ` · ${e.detail}` : "")],
    ["configuration", e.configuration || "–", e.configuration_reason || ""],
    ...(e.cpu_features.length ? [["CPU features", e.cpu_features.join(" ")]] : []),
    ["threads", e.threads],
    ["slots", `${e.slots} × ${e.context_length} tokens`],
    ["prefix cache", e.prefix_cache ? "on" : "off"],
    ["restarts", e.restarts + (e.pid ? ` (engine pid ${e.pid})` : "")],
  ]);
  const u = s.upload;
  fill("upload", [
    ["collector", u.enabled ? u.url : "none configured (records stay on the box)"],
    ["backlog", `${u.backlog_records} records` + (u.backlog_age_s !== null ? `, oldest ${fmtAge(u.backlog_age_s)}` : "")],
    ["last upload", u.last_success ? fmtTime(u.last_success, true) : "none since start"],
    ["uploaded", `${u.uploaded_records} records in ${u.successes} batches`],
    ["failures", u.failures + (u.last_error ? ` (last: ${u.last_error})` : "")],
    ["dropped by cap", u.dropped_records],
    ["parked", u.parked_records],
  ]);
}

function renderStats(stats) {
  const unit = stats.step.slice(-1) === "h" ? 3600000 : 60000;
  const view_ = { start: stats.start, end: stats.end, stepMs: parseInt(stats.step, 10) * unit };
  drawLatency($("chart-ttft"), stats.ttft, view_, "s");
  drawLatency($("chart-tps"), stats.tps, view_, "tok/s");
  drawRequests($("chart-requests"), stats.requests, view_);
  const total = stats.requests.reduce((sum, p) => sum + p.total, 0);
  const failed = stats.requests.reduce((sum, p) => sum + (p.total - (p.by_status.ok || 0)), 0);
  $("request-totals").textContent = `${total} in ${stats.window}, ${failed} not ok`;
}

// ------------------------------------------------------------------ latest inferences

function completionText(record) {
  const out = record.out && record.out.json;
  if (!out) return null;
  try {
    const body = JSON.parse(out);
    const texts = (body.choices || []).map((c) => (c.message ? c.message.content : c.text));
    if (texts.length) return texts.filter((t) => t !== null && t !== undefined).join("\n---\n");
    if (Array.isArray(body)) return body.map((r) => (r.out && r.out.generated_text) || "").join("\n---\n");
  } catch (err) {
    return out;
  }
  return null;
}

function pretty(value) {
  return typeof value === "string" ? value : JSON.stringify(value, null, 2);
}

function detailRow(record) {
  const parts = [];
  const text = completionText(record);
  if (text !== null) parts.push(el("h3", {}, "completion"), el("pre", { class: "completion" }, text));
  if (record.error) parts.push(el("h3", {}, "error"), el("pre", {}, record.error));
  parts.push(el("h3", {}, "in"), el("pre", {}, pretty(record.in)));
  parts.push(el("h3", {}, "params (effective)"), el("pre", {}, pretty(record.params)));
  parts.push(el("h3", {}, "metrics"), el("pre", {}, pretty(record.metrics)));
  let out = record.out && record.out.json;
  try {
    out = JSON.stringify(JSON.parse(out), null, 2);
  } catch (err) {
    // not JSON: shown as stored
  }
  parts.push(el("h3", {}, "out"), el("pre", {}, out === null ? "null" : out));
  parts.push(el("p", { class: "muted" }, `id ${record.id} · ${(record.model && record.model.name) || ""} · ${record.backend || ""}`));
  return el("tr", { class: "detail" }, el("td", { colspan: 7 }, el("div", { class: "detail" }, ...parts)));
}

function renderRecords() {
  const rows = [];
  for (const r of view.records) {
    const m = r.metrics || {};
    const open = view.open.has(r.id);
    const row = el("tr", { class: "record" + (open ? " open" : ""), "data-id": r.id },
      el("td", {}, fmtTime(r.time, true)),
      el("td", {}, r.endpoint),
      el("td", { class: "status-" + r.status }, r.status),
      el("td", {}, m.prompt_tokens),
      el("td", {}, m.completion_tokens),
      el("td", {}, fmtNumber(m.ttft)),
      el("td", {}, fmtNumber(m.tps)));
    row.addEventListener("click", () => {
      if (view.open.has(r.id)) view.open.delete(r.id);
      else view.open.add(r.id);
      renderRecords();
    });
    rows.push(row);
    if (open) rows.push(detailRow(r));
  }
  $("latest").tBodies[0].replaceChildren(...rows);
  $("latest-note").textContent = view.records.length ? "click a row for the whole record" : "no inferences yet";
}

async function refreshRecords() {
  const since = view.newestId ? `&since=${encodeURIComponent(view.newestId)}` : "";
  const page = await getJSON(`/logs?limit=${TABLE_ROWS}${since}`);
  if (!page.data.length) return;
  // A gap (more new records than one page) starts the table over from the newest.
  view.records = page.has_more && view.newestId ? page.data : [...page.data, ...view.records];
  view.records = view.records.slice(0, TABLE_ROWS);
  view.newestId = view.records[0].id;
  const kept = new Set(view.records.map((r) => r.id));
  for (const id of view.open) if (!kept.has(id)) view.open.delete(id);
  renderRecords();
}

// ------------------------------------------------------------------ the loop

let refreshing = false;

async function refresh() {
  // A slow box must not pile up overlapping refreshes.
  if (refreshing) return;
  refreshing = true;
  try {
    await refreshOnce();
  } finally {
    refreshing = false;
  }
}

async function refreshOnce() {
  const results = await Promise.allSettled([
    getJSON("/status").then(renderStatus),
    getJSON(`/stats?window=${encodeURIComponent(view.window)}`).then(renderStats),
    refreshRecords(),
  ]);
  const failures = results.filter((r) => r.status === "rejected").map((r) => r.reason);
  view.needToken = failures.some((e) => e instanceof Unauthorized);
  $("token-form").hidden = !view.needToken;
  // A box with its inference log switched off has no history to show: say so, calmly.
  const isLogOff = (e) => e instanceof HttpError && e.status === 404;
  const logOff = failures.find(isLogOff);
  if (logOff) $("latest-note").textContent = logOff.message;
  const other = failures.find((e) => !(e instanceof Unauthorized) && !isLogOff(e));
  if (other) {
    const banner = $("banner");
    banner.textContent = `Cannot read the box: ${other.message}`;
    banner.className = "banner bad";
    banner.hidden = false;
  }
  $("updated").textContent = "updated " + fmtTime(Date.now());
}

function selectWindow(name) {
  view.window = name;
  localStorage.setItem("edge-agent.window", name);
  for (const button of document.querySelectorAll("#windows button")) {
    button.classList.toggle("active", button.dataset.window === name);
  }
}

function start() {
  selectWindow(view.window);
  for (const button of document.querySelectorAll("#windows button")) {
    button.addEventListener("click", () => {
      selectWindow(button.dataset.window);
      refresh();
    });
  }
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    view.token = $("token").value.trim() || null;
    if (view.token) sessionStorage.setItem("edge-agent.token", view.token);
    else sessionStorage.removeItem("edge-agent.token");
    refresh();
  });
  refresh();
  setInterval(() => {
    if (!document.hidden) refresh();
  }, REFRESH_MS);
}

document.addEventListener("DOMContentLoaded", start);
