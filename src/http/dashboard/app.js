// Herald's live dashboard. Plain JavaScript, no dependencies: it polls this node's API with the
// token typed into the page and redraws. Every value shown comes from /v1/cluster,
// /v1/cluster/placements, /v1/subscriptions, /v1/stats/series and /v1/dead-letters.
"use strict";

const REFRESH_MS = 1000;
const SERIES_EVERY = 2;     // refreshes between series reads
const DEAD_EVERY = 5;       // refreshes between dead-letter reads
const TIMELINE_MAX = 200;

const $ = (sel) => document.querySelector(sel);
const el = (tag, attrs = {}, ...children) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v;
    else if (k.startsWith("data-")) e.setAttribute(k, v);
    else e[k] = v;
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
};

let token = sessionStorage.getItem("herald-token") || "";
let round = 0;
let previous = null;          // the last cluster view, for the timeline
let previousPlacement = null; // topic/group -> "1,2"

class Unauthorized extends Error {}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (token) headers["Authorization"] = "Bearer " + token;
  const res = await fetch(path, Object.assign({}, options, { headers, cache: "no-store" }));
  if (res.status === 401) throw new Unauthorized("a token is needed");
  const text = await res.text();
  const body = text ? JSON.parse(text) : null;
  if (!res.ok) {
    const e = new Error((body && body.error && body.error.message) || res.statusText);
    e.status = res.status;
    throw e;
  }
  return body;
}

function setLive(ok, text) {
  $("#live-dot").className = "dot " + (ok ? "ok" : "bad");
  $("#live-text").textContent = text;
}

// ---- timeline --------------------------------------------------------------------------------

function note(text, tone = "") {
  const list = $("#timeline");
  const now = new Date();
  list.prepend(el("li", { class: tone }, el("time", {}, now.toLocaleTimeString()), el("span", {}, text)));
  while (list.children.length > TIMELINE_MAX) list.lastChild.remove();
}

function toneOf(status) {
  return status === "up" ? "good" : status === "down" ? "bad" : "warn";
}

function diffCluster(before, now) {
  if (!before) {
    note(`watching cluster ${now.cluster_id}: ${now.members.length} members, leader ${now.leader ?? "none"}`);
    return;
  }
  if (before.leader !== now.leader) note(`leader ${before.leader ?? "none"} → ${now.leader ?? "none"} (term ${now.term})`, "warn");
  const old = new Map(before.members.map((m) => [m.id, m]));
  for (const m of now.members) {
    const o = old.get(m.id);
    if (!o) note(`node ${m.id} joined (${m.status})`, "good");
    else if (o.status !== m.status) note(`node ${m.id}: ${o.status} → ${m.status}`, toneOf(m.status));
    else if (o.voter !== m.voter) note(`node ${m.id} is now a ${m.voter ? "voter" : "learner"}`);
    old.delete(m.id);
  }
  for (const id of old.keys()) note(`node ${id} left the cluster`, "warn");
  if (before.epoch !== now.epoch) note(`placement epoch ${before.epoch} → ${now.epoch}`);
}

function diffPlacement(before, now) {
  if (!before) return;
  for (const [sub, nodes] of now) {
    const was = before.get(sub);
    if (was !== undefined && was !== nodes) note(`${sub} moved: [${was}] → [${nodes}]`, "warn");
  }
}

// ---- members, subscriptions ------------------------------------------------------------------

function renderCluster(c) {
  $("#cluster-id").textContent = c.cluster_id;
  $("#leader").textContent = c.leader ?? "none";
  $("#term").textContent = c.term;
  $("#epoch").textContent = c.epoch;
  $("#node-id").textContent = c.node_id;
  for (const e of document.querySelectorAll(".node-id-again")) e.textContent = c.node_id;
  const problems = $("#problems");
  problems.hidden = !(c.problems && c.problems.length);
  problems.textContent = (c.problems || []).join(" · ");
  const body = $("#members tbody");
  body.replaceChildren(...c.members.map((m) => {
    const role = m.id === c.leader ? "leader" : m.voter ? "voter" : "learner";
    return el("tr", { "data-node": m.id, "data-status": m.status, "data-role": role },
      el("td", { class: "mono" }, m.id),
      el("td", {}, el("span", { class: "pill " + m.status }, m.status)),
      el("td", { class: role === "leader" ? "role-leader" : "" }, role),
      el("td", { class: "mono" }, m.id === c.node_id ? "–" : Number(m.phi).toFixed(2)),
      el("td", { class: "mono" }, m.http),
      el("td", { class: "mono" }, m.peer),
      el("td", {}, (m.handlers || []).join(", ")));
  }));
}

function handlerText(h) {
  if (!h) return "";
  if (h.kind === "rust") return "rust:" + h.name;
  if (h.kind === "webhook") return "webhook " + h.url;
  return h.kind;
}

function renderSubscriptions(subs, placements, members) {
  const status = new Map(members.map((m) => [m.id, m.status]));
  const where = new Map(placements.map((p) => [p.topic + "/" + p.group, p.nodes || []]));
  const body = $("#subscriptions tbody");
  body.replaceChildren(...subs.map((s) => {
    const key = s.topic + "/" + s.group;
    const nodes = where.get(key) || [];
    return el("tr", { class: "placement", "data-sub": key, "data-nodes": nodes.join(",") },
      el("td", { class: "mono" }, key),
      el("td", {}, handlerText(s.handler)),
      el("td", {}, s.instances),
      el("td", {}, ...(nodes.length
        ? nodes.map((n) => el("span", { class: "chip " + (status.get(n) || "") }, n))
        : [el("span", { class: "error" }, "not placed")])));
  }));
  return new Map([...where].map(([k, v]) => [k, v.join(",")]));
}

// ---- charts ----------------------------------------------------------------------------------

const COLORS = { published: "#58a6ff", delivered: "#3fb950", errors: "#d29922", dead_letters: "#f85149", p99_ms: "#a371f7" };

function drawChart(canvas, values, color) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth, h = canvas.clientHeight;
  canvas.width = Math.max(1, Math.round(w * dpr));
  canvas.height = Math.max(1, Math.round(h * dpr));
  const g = canvas.getContext("2d");
  g.scale(dpr, dpr);
  g.clearRect(0, 0, w, h);
  const nums = values.map((v) => (v == null ? null : Number(v)));
  const max = Math.max(1e-9, ...nums.filter((v) => v != null));
  const pad = 4;
  const x = (i) => pad + (i * (w - 2 * pad)) / Math.max(1, nums.length - 1);
  const y = (v) => h - pad - (v / max) * (h - 2 * pad);
  g.strokeStyle = "#26303b";
  g.lineWidth = 1;
  g.beginPath(); g.moveTo(0, h - pad + 0.5); g.lineTo(w, h - pad + 0.5); g.stroke();
  g.strokeStyle = color;
  g.fillStyle = color + "22";
  g.lineWidth = 1.5;
  g.beginPath();
  let started = false, first = 0, last = 0;
  nums.forEach((v, i) => {
    if (v == null) return;
    if (!started) { g.moveTo(x(i), y(v)); started = true; first = i; } else g.lineTo(x(i), y(v));
    last = i;
  });
  g.stroke();
  if (started) {
    g.lineTo(x(last), h - pad); g.lineTo(x(first), h - pad); g.closePath(); g.fill();
  }
}

function chartCard(id, title, values, color, attrs, unit) {
  let card = document.getElementById(id);
  if (!card) {
    card = el("div", Object.assign({ class: "chart", id }, attrs),
      el("div", { class: "title" }, el("span", {}, title), el("b", {})),
      el("canvas", {}));
  }
  const nums = values.filter((v) => v != null);
  const latest = nums.length ? nums[nums.length - 1] : null;
  const total = nums.reduce((a, b) => a + b, 0);
  card.setAttribute("data-total", String(Math.round(total * 100) / 100));
  card.setAttribute("data-latest", latest == null ? "" : String(latest));
  card.querySelector(".title b").textContent = latest == null ? "–" : (unit === "ms" ? latest.toFixed(1) + " ms" : latest.toFixed(1) + "/s");
  return { card, draw: () => drawChart(card.querySelector("canvas"), values, color) };
}

function renderSeries(s) {
  const box = $("#charts");
  const cards = [];
  const safe = (k) => k.replace(/[^A-Za-z0-9_.-]/g, "_");
  for (const [topic, t] of Object.entries(s.topics)) {
    // Unrouted events share "(other)": chart it only once some arrived.
    if (topic === "(other)" && !t.published.some((v) => v > 0)) continue;
    cards.push(chartCard("c-pub-" + safe(topic), topic + " · published", t.published, COLORS.published,
      { "data-topic": topic, "data-series": "published" }, "/s"));
  }
  for (const [sub, x] of Object.entries(s.subscriptions)) {
    for (const [name, label, unit] of [["delivered", "handled", "/s"], ["errors", "errors", "/s"], ["dead_letters", "dead-lettered", "/s"], ["p99_ms", "handler p99", "ms"]]) {
      cards.push(chartCard("c-" + name + "-" + safe(sub), sub + " · " + label, x[name], COLORS[name],
        { "data-sub": sub, "data-series": name }, unit));
    }
  }
  if (!cards.length) return;
  box.replaceChildren(...cards.map((c) => c.card));
  for (const c of cards) c.draw();
}

// ---- dead letters ----------------------------------------------------------------------------

function renderDeadLetters(list) {
  const body = $("#dead-letters tbody");
  $("#dead-note").textContent = list.length ? "" : "None.";
  body.replaceChildren(...list.map((d) => {
    const id = d.id || (d.event && d.event.id) || "";
    const button = el("button", { type: "button" }, "replay");
    button.addEventListener("click", async () => {
      button.disabled = true;
      try {
        await api("/v1/dead-letters/" + encodeURIComponent(id) + "/replay", { method: "POST" });
        note(`dead letter ${id} replayed`, "good");
        await refreshDeadLetters();
      } catch (e) {
        note(`replay of ${id} failed: ${e.message}`, "bad");
        button.disabled = false;
      }
    });
    return el("tr", { "data-dead": id },
      el("td", { class: "mono", title: "dead letter " + id }, d.event_id || id),
      el("td", { class: "mono" }, (d.topic || "") + "/" + (d.group || "")),
      el("td", {}, d.attempts ?? ""),
      el("td", { class: "err", title: d.error || "" }, d.error || ""),
      el("td", {}, button));
  }));
}

async function refreshDeadLetters() {
  try {
    const answer = await api("/v1/dead-letters?limit=20");
    renderDeadLetters(Array.isArray(answer) ? answer : (answer.dead_letters || answer.items || []));
  } catch (e) {
    if (e instanceof Unauthorized || e.status === 403) {
      $("#dead-note").textContent = "Dead letters hold event data: they need a token with the admin scope.";
      $("#dead-letters tbody").replaceChildren();
    } else {
      $("#dead-note").textContent = "Cannot list dead letters: " + e.message;
    }
  }
}

// ---- the loop --------------------------------------------------------------------------------

async function refresh() {
  round += 1;
  try {
    const [cluster, placements, subs] = await Promise.all([
      api("/v1/cluster"), api("/v1/cluster/placements"), api("/v1/subscriptions"),
    ]);
    $("#login").hidden = true;
    diffCluster(previous, cluster);
    previous = cluster;
    renderCluster(cluster);
    const placed = renderSubscriptions(subs, placements, cluster.members);
    diffPlacement(previousPlacement, placed);
    previousPlacement = placed;
    if (round % SERIES_EVERY === 1 || SERIES_EVERY === 1) renderSeries(await api("/v1/stats/series?seconds=300"));
    if (round % DEAD_EVERY === 1) await refreshDeadLetters();
    setLive(true, "live · " + new Date().toLocaleTimeString());
  } catch (e) {
    if (e instanceof Unauthorized) {
      $("#login").hidden = false;
      setLive(false, "needs a token");
    } else {
      setLive(false, "no answer: " + e.message);
    }
  } finally {
    setTimeout(refresh, REFRESH_MS);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("#login").addEventListener("submit", (ev) => {
    ev.preventDefault();
    token = $("#token").value.trim();
    sessionStorage.setItem("herald-token", token);
    $("#token").value = "";
  });
  refresh();
});
