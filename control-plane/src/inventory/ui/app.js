// eastguard's inventory UI: reads /apis and draws the service graph, the operations table with
// filters, and one operation's detail. Every string from the inventory (paths, IDs, hosts) is
// attacker-influenced: it is only ever set as text (textContent, SVG text nodes), never as HTML.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
let view = null;
let selected = null;

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

function svg(tag, attrs, text) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  if (text !== undefined) e.textContent = text;
  return e;
}

function statusBadge(status) {
  return el("span", { class: "status status-" + status, "data-status": status }, status);
}

function fill(select, values) {
  const keep = select.value;
  while (select.options.length > 1) select.remove(1);
  for (const v of values) select.add(new Option(v, v));
  if (values.includes(keep)) select.value = keep;
}

function filters() {
  return {
    service: document.getElementById("f-service").value,
    status: document.getElementById("f-status").value,
    owner: document.getElementById("f-owner").value,
    caller: document.getElementById("f-caller").value,
    sensitive: document.getElementById("f-sensitive").value,
  };
}

function matches(op, f) {
  return (!f.service || op.service === f.service)
    && (!f.status || op.status === f.status)
    && (!f.owner || (f.owner === "(orphan)" ? op.orphan : op.owner === f.owner))
    && (!f.caller || (op.callers || []).some((c) => c.id === f.caller))
    && (!f.sensitive || (op.sensitive || []).some((s) => s.data_type === f.sensitive));
}

function renderTable() {
  const f = filters();
  const body = document.querySelector("#operations tbody");
  body.replaceChildren();
  const ops = view.operations.filter((op) => matches(op, f));
  for (const op of ops) {
    const callers = (op.callers || []).map((c) => c.id).join(", ");
    const tr = el("tr", { "data-key": op.service + " " + op.method + " " + op.template },
      el("td", {}, op.service),
      el("td", { class: "mono" }, op.method),
      el("td", { class: "mono" }, op.template),
      el("td", {}, statusBadge(op.status)),
      el("td", { class: "num" }, op.calls ?? 0),
      el("td", { class: "num" }, op.denied ?? 0),
      el("td", {}, op.owner ?? "(orphan)"),
      el("td", { class: "sensitive" }, [...new Set((op.sensitive || []).map((s) => s.data_type))].join(", ") || "—"),
      el("td", { class: "mono" }, callers || "—"));
    tr.addEventListener("click", () => showDetail(op, tr));
    body.append(tr);
  }
  document.getElementById("shown").textContent = ops.length + " of " + view.operations.length + " operations";
}

function showDetail(op, row) {
  if (selected) selected.classList.remove("selected");
  selected = row;
  row.classList.add("selected");
  document.getElementById("detail").hidden = false;
  document.getElementById("detail-title").textContent = op.method + " " + op.template + " on " + op.service;
  const fields = document.getElementById("detail-fields");
  fields.replaceChildren();
  const add = (k, v) => { if (v !== undefined && v !== null && v !== "") fields.append(el("dt", {}, k), el("dd", { "data-field": k }, v)); };
  add("status", op.status);
  add("spec", op.spec_file ? op.spec_file + " " + (op.spec_path || "") : "none");
  add("drift", (op.drift || []).join(", "));
  add("owner", op.owner ?? "(orphan)");
  add("status classes", Object.entries(op.status_classes || {}).map(([k, v]) => k + ": " + v).join(", "));
  add("auth schemes", (op.auth_schemes || []).join(", "));
  add("request content types", (op.request_content_types || []).join(", "));
  add("response content types", (op.response_content_types || []).join(", "));
  add("reported by", (op.workloads || []).join(", "));
  add("examples", (op.examples || []).join("  "));
  if (op.first_seen) add("first seen", new Date(op.first_seen * 1000).toISOString());
  if (op.last_seen) add("last seen", new Date(op.last_seen * 1000).toISOString());
  const sensitive = document.querySelector("#detail-sensitive tbody");
  sensitive.replaceChildren(...(op.sensitive || []).map((s) => el("tr", {},
    el("td", {}, s.data_type), el("td", {}, s.direction), el("td", { class: "mono" }, s.location),
    el("td", { class: "num" }, s.count))));
  const body = document.querySelector("#detail-callers tbody");
  body.replaceChildren();
  for (const c of op.callers || []) {
    body.append(el("tr", {},
      el("td", { class: "mono" }, c.id),
      el("td", {}, c.id.startsWith("spiffe://") ? "yes" : "no"),
      el("td", { class: "num" }, c.calls),
      el("td", { class: "num" }, c.calls - c.denied),
      el("td", { class: "num" }, c.denied)));
  }
}

// Edges caller → service over every operation: calls, denied, whether the caller was verified.
function edges() {
  const byKey = new Map();
  for (const op of view.operations) {
    for (const c of op.callers || []) {
      const key = c.id + "\u0000" + op.service;
      const e = byKey.get(key) || { caller: c.id, service: op.service, calls: 0, denied: 0 };
      e.calls += c.calls;
      e.denied += c.denied;
      byKey.set(key, e);
    }
  }
  return [...byKey.values()];
}

function renderGraph() {
  const es = edges();
  const callers = [...new Set(es.map((e) => e.caller))].sort();
  const services = [...new Set(view.operations.map((op) => op.service))].sort();
  const rowH = 40, boxW = 380, gap = 260, top = 10;
  const height = top * 2 + Math.max(callers.length, services.length, 1) * rowH;
  const width = boxW * 2 + gap + 20;
  const root = svg("svg", { width, height, viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": "service graph" });
  const y = (i) => top + i * rowH + rowH / 2;
  const node = (x, i, label, kind) => {
    const g = svg("g", { class: "node " + kind, "data-id": label });
    g.append(svg("rect", { x, y: y(i) - 14, width: boxW, height: 28, rx: 5 }));
    g.append(svg("text", { x: x + 8, y: y(i) + 4 }, label));
    root.append(g);
  };
  for (const e of es) {
    const a = callers.indexOf(e.caller), b = services.indexOf(e.service);
    const x1 = 10 + boxW, x2 = 10 + boxW + gap;
    const cls = ["edge", e.denied > 0 ? "denied" : "allowed"];
    const mtls = e.caller.startsWith("spiffe://");
    if (!mtls) cls.push("plaintext");
    const path = svg("path", {
      class: cls.join(" "),
      d: `M ${x1} ${y(a)} C ${x1 + gap / 2} ${y(a)}, ${x2 - gap / 2} ${y(b)}, ${x2} ${y(b)}`,
      "data-caller": e.caller, "data-service": e.service, "data-calls": e.calls, "data-denied": e.denied,
      "data-mtls": mtls ? "yes" : "no",
    });
    path.append(svg("title", {}, `${e.caller} → ${e.service}: ${e.calls} calls, ${e.denied} denied, ${mtls ? "mTLS" : "plaintext"}`));
    root.append(path);
    root.append(svg("text", { class: "edge-label", x: x1 + gap / 2 - 40, y: (y(a) + y(b)) / 2 - 4 },
      `${e.calls} / ${e.denied} denied${mtls ? " · mTLS" : ""}`));
  }
  callers.forEach((c, i) => node(10, i, c, "caller"));
  services.forEach((s, i) => node(10 + boxW + gap, i, s, "service"));
  document.getElementById("graph").replaceChildren(root);
}

function render() {
  const s = view.summary || {};
  document.getElementById("summary").textContent = Object.entries(s).map(([k, v]) => `${v} ${k}`).join(" · ")
    + (view.dropped_rows ? ` · ${view.dropped_rows} rows dropped at the store's bounds` : "");
  const ops = view.operations;
  fill(document.getElementById("f-service"), [...new Set(ops.map((o) => o.service))].sort());
  fill(document.getElementById("f-status"), [...new Set(ops.map((o) => o.status))].sort());
  fill(document.getElementById("f-owner"), [...new Set(ops.map((o) => o.owner ?? "(orphan)"))].sort());
  fill(document.getElementById("f-caller"), [...new Set(ops.flatMap((o) => (o.callers || []).map((c) => c.id)))].sort());
  fill(document.getElementById("f-sensitive"), [...new Set(ops.flatMap((o) => (o.sensitive || []).map((s) => s.data_type)))].sort());
  renderGraph();
  renderTable();
  const errors = Object.entries(view.spec_errors || {});
  const section = document.getElementById("spec-errors");
  section.hidden = errors.length === 0;
  section.querySelector("ul").replaceChildren(...errors.map(([f, e]) => el("li", {}, f + ": " + e)));
}

const SEVERITY = ["Unknown", "Informational", "Low", "Medium", "High", "Critical", "Fatal"];

async function loadEvents() {
  const kind = document.getElementById("f-event").value;
  const r = await fetch("../apis/events?limit=200" + (kind ? "&class=" + encodeURIComponent(kind) : ""),
    { headers: { accept: "application/json" } });
  if (!r.ok) throw new Error("/apis/events: HTTP " + r.status);
  const events = await r.json();
  document.querySelector("#events tbody").replaceChildren(...events.map((e) => el("tr",
    { "data-class": String(e.class_uid) },
    el("td", { class: "mono" }, new Date(e.time_ms).toISOString()),
    el("td", {}, e.workload),
    el("td", {}, e.class_name),
    el("td", {}, SEVERITY[e.severity_id] ?? String(e.severity_id)),
    el("td", {}, e.message))));
}

async function load() {
  try {
    const r = await fetch("../apis", { headers: { accept: "application/json" } });
    if (!r.ok) throw new Error("/apis: HTTP " + r.status);
    view = await r.json();
    document.getElementById("error").hidden = true;
    render();
    await loadEvents();
    document.body.dataset.loaded = "true";
  } catch (e) {
    const p = document.getElementById("error");
    p.hidden = false;
    p.textContent = "cannot read the inventory: " + e.message;
  }
}

document.getElementById("filters").addEventListener("change", renderTable);
document.getElementById("f-event").addEventListener("change", () => loadEvents().catch((e) => {
  const p = document.getElementById("error");
  p.hidden = false;
  p.textContent = "cannot read the events: " + e.message;
}));
load();
