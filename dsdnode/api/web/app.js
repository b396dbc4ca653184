// dsdnode web UI: swarm coverage map, live client charts, streamed chat. Plain JS, no libraries.
// Everything a peer announces is shown through textContent (never parsed as HTML): peers are hostile.
"use strict";

const REFRESH_MS = 2000;
const KEY_STORE = "dsdnode-api-key";
let apiKey = sessionStorage.getItem(KEY_STORE) || "";
let modelName = "";
const history = [];  // the chat's messages, sent whole with every request

const $ = (id) => document.getElementById(id);

function el(tag, className, text) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  if (text !== undefined) e.textContent = text;
  return e;
}

// ---- API calls (the key, once given, rides on every call) --------------------------------
class ApiError extends Error {
  constructor(status, body) {
    const err = (body && body.error) || {};
    super(err.message || `HTTP ${status}`);
    this.status = status;
    this.code = err.code || null;
  }
}

function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (apiKey) h["Authorization"] = "Bearer " + apiKey;
  return h;
}

async function readError(resp, sentKey) {
  let body = null;
  try { body = await resp.json(); } catch (_) { /* not JSON */ }
  const e = new ApiError(resp.status, body);
  // a 401 to a call sent before the user gave the current key says nothing about that key
  if (resp.status === 401 && sentKey === apiKey) askForKey(apiKey ? "the key was refused: " + e.message : "");
  return e;
}

async function getJson(path) {
  const sentKey = apiKey;
  const resp = await fetch(path, { headers: headers() });
  if (!resp.ok) throw await readError(resp, sentKey);
  return resp.json();
}

function askForKey(message) {
  const form = $("key-form");
  if (form.hidden) $("key-input").focus();  // once: later refreshes must not steal the focus
  form.hidden = false;
  $("key-error").textContent = message || "";
}

$("key-button").addEventListener("click", () => askForKey(""));
$("key-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  apiKey = $("key-input").value.trim();
  sessionStorage.setItem(KEY_STORE, apiKey);
  $("key-form").hidden = true;
  refresh();
});

// ---- swarm view ----------------------------------------------------------------------------
function ranges(layers) {
  const out = [];
  for (let i = 0; i < layers.length; i++) {
    const start = layers[i];
    while (i + 1 < layers.length && layers[i + 1] === layers[i] + 1) i++;
    out.push(start === layers[i] ? `${start}` : `${start}–${layers[i]}`);
  }
  return out.join(", ");
}

function shortId(id) { return id && id.length > 14 ? "…" + id.slice(-8) : (id || "?"); }
function fmt(x, digits) { return x === null || x === undefined ? "-" : Number(x).toFixed(digits); }

function lanesOf(peers) {
  // place servers in rows so that no two in a row overlap (first row that has room)
  const lanes = [];
  for (const p of [...peers].sort((a, b) => a.start - b.start || b.end - a.end)) {
    let lane = lanes.find((l) => l[l.length - 1].end <= p.start);
    if (!lane) { lane = []; lanes.push(lane); }
    lane.push(p);
  }
  return lanes;
}

function blockLines(p, localWeights) {
  const alive = p.rtt_ms !== null && p.rtt_ms !== undefined;
  const how = p.relayed ? "via relay" : "direct";
  const weights = p.weights ? p.weights.slice(0, 10) : "?";
  const ours = !localWeights || !p.weights || p.weights === localWeights ? "" : " (not ours)";
  const load = p.active_sessions === null || p.active_sessions === undefined ? "-"
    : `${p.active_sessions} sess, ${p.queued_positions} queued`;
  return [
    `layers ${p.start}:${p.end}`,
    `${fmt(p.throughput, 1)} tok/s · RTT ${alive ? fmt(p.rtt_ms, 1) + " ms" : "unreachable"}`,
    `load ${load} · ${p.device || "-"}`,
    `${p.reachability || "reach unknown"}, ${how}`,
    `weights ${weights}${ours} · quant ${p.quantization || "-"}`,
    p.banned ? `BANNED: ${p.banned}` : "not banned",
  ];
}

function renderSwarm(r) {
  const n = r.num_layers || 0;
  modelName = r.model;
  $("model").textContent = `${r.model} · ${n} layers`;
  const live = r.peers.filter((p) => p.rtt_ms !== null && p.rtt_ms !== undefined).length;
  const state = r.route.ready ? "route ok" : "no route";
  $("route-state").textContent = state;
  $("route-state").className = "badge " + (r.route.ready ? "ok" : "bad");
  $("route-state").title = r.route.detail;
  $("swarm-summary").textContent = `${live} live server${live === 1 ? "" : "s"}, ` +
    (r.uncovered_layers.length ? `layers ${ranges(r.uncovered_layers)} not covered` : "every layer covered") +
    ` · checked ${new Date(r.checked * 1000).toLocaleTimeString()}`;
  $("swarm-error").textContent = "";

  const lanes = $("lanes");
  lanes.replaceChildren();
  for (const lane of lanesOf(r.peers)) {
    const row = el("div", "lane");
    for (const p of lane) {
      const alive = p.rtt_ms !== null && p.rtt_ms !== undefined;
      const b = el("div", "block server-block" + (alive ? "" : " dead") + (p.banned ? " banned" : ""));
      b.dataset.peer = p.peer_id;
      b.dataset.start = p.start;
      b.dataset.end = p.end;
      b.dataset.alive = alive;
      b.style.left = `${(100 * p.start) / n}%`;
      b.style.width = `calc(${(100 * (Math.min(p.end, n) - p.start)) / n}% - 3px)`;
      b.title = `${p.peer_id}\n${(p.addrs || []).join("\n")}`;
      b.appendChild(el("div", "title", shortId(p.peer_id)));
      for (const line of blockLines(p, r.local_weights)) b.appendChild(el("div", "", line));
      row.appendChild(b);
    }
    lanes.appendChild(row);
  }

  const bar = $("coverage-bar");
  bar.replaceChildren();
  (r.coverage || []).forEach((c, i) => {
    const cell = el("div", "layer" + (c === 0 ? " gap" : c > 1 ? " c2" : ""));
    cell.title = `layer ${i}: ${c} live server${c === 1 ? "" : "s"}`;
    bar.appendChild(cell);
  });
  const axis = $("layer-axis");
  axis.replaceChildren();
  const step = n > 40 ? 10 : 5;
  for (let i = 0; i <= n; i += step) {
    const t = el("span", "", String(i));
    t.style.left = `${(100 * i) / n}%`;
    axis.appendChild(t);
  }
  const gaps = $("gaps");
  gaps.replaceChildren();
  if (r.uncovered_layers.length) {
    gaps.appendChild(el("div", "gap", `gap: layers ${ranges(r.uncovered_layers)} are served by no live server`));
  }
  $("banned").textContent = r.banned.length
    ? "banned by this client: " + r.banned.map((b) => `${shortId(b.peer_id)} (${b.reason})`).join("; ") : "";
}

async function refreshSwarm() {
  try {
    renderSwarm(await getJson("/v1/swarm"));
  } catch (e) {
    $("swarm-error").textContent = e.status === 401 ? "the API key is needed to see the swarm" : `swarm: ${e.message}`;
    $("route-state").textContent = "unknown";
    $("route-state").className = "badge";
  }
}

// ---- live charts (canvas) -------------------------------------------------------------------
const COLORS = ["#2b6cb0", "#c05621", "#2f855a", "#805ad5", "#b83280", "#718096"];
const CHARTS = [
  { id: "tps", title: "tokens/s", series: (g) => [["tok/s", g.map((x) => x.tokens_per_s)]] },
  { id: "acc", title: "accepted drafts / round", series: (g) => [["accepted", g.map((x) => x.accepted_per_round)]] },
  { id: "k", title: "k (draft depth) and tree size", series: (g) => [["k", g.map((x) => x.k)], ["tree nodes", g.map((x) => x.tree_nodes)]] },
  { id: "link", title: "per-hop link time (ms)", series: (g) => {
      const links = Math.max(0, ...g.map((x) => x.hop_link_ms.length));
      return Array.from({ length: links }, (_, i) => [`${i + 1}→${i + 2}`, g.map((x) => x.hop_link_ms[i] ?? null)]);
    } },
  { id: "fail", title: "failovers", series: (g) => [["failovers", g.map((x) => x.failovers)]] },
];

function setupCharts() {
  const box = $("charts");
  for (const c of CHARTS) {
    const card = el("div", "chart");
    card.dataset.chart = c.id;
    const label = el("div", "label");
    label.appendChild(el("span", "", c.title));
    c.valueEl = el("span", "muted", "no generation yet");
    label.appendChild(c.valueEl);
    c.canvas = el("canvas");
    card.appendChild(label);
    card.appendChild(c.canvas);
    box.appendChild(card);
  }
}

function drawChart(c, gens) {
  const canvas = c.canvas, dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth, h = canvas.clientHeight;
  canvas.width = w * dpr; canvas.height = h * dpr;
  const ctx = canvas.getContext("2d");
  ctx.scale(dpr, dpr);
  ctx.clearRect(0, 0, w, h);
  const series = c.series(gens);
  const values = series.flatMap(([, v]) => v).filter((v) => v !== null && isFinite(v));
  const top = (Math.max(0, ...values) || 1) * 1.1;  // all zero (no failovers): a scale of 1
  const pad = 4, n = gens.length;
  ctx.strokeStyle = "#d9dde3"; ctx.lineWidth = 1;
  ctx.beginPath(); ctx.moveTo(0, h - pad); ctx.lineTo(w, h - pad); ctx.stroke();
  ctx.fillStyle = "#667080"; ctx.font = "10px system-ui, sans-serif";
  ctx.fillText(top.toPrecision(3), 2, 10);
  series.forEach(([, v], s) => {
    ctx.strokeStyle = COLORS[s % COLORS.length]; ctx.fillStyle = ctx.strokeStyle; ctx.lineWidth = 1.5;
    ctx.beginPath();
    let pen = false;
    v.forEach((y, i) => {
      if (y === null || !isFinite(y)) { pen = false; return; }
      const x = n === 1 ? w / 2 : pad + ((w - 2 * pad) * i) / (n - 1);
      const py = h - pad - ((h - 2 * pad - 8) * y) / top;
      if (pen) ctx.lineTo(x, py); else ctx.moveTo(x, py);
      pen = true;
      ctx.fillRect(x - 1.5, py - 1.5, 3, 3);
    });
    ctx.stroke();
  });
  const last = series.map(([name, v]) => `${name} ${fmt(v[v.length - 1], 2)}`).join(" · ");
  c.valueEl.textContent = n ? last : "no generation yet";
}

async function refreshStats() {
  try {
    const s = await getJson("/v1/stats");
    $("charts").dataset.generations = s.generations.length;
    for (const c of CHARTS) drawChart(c, s.generations);
  } catch (_) { /* shown by the swarm view */ }
}

// ---- chat ---------------------------------------------------------------------------------
function statsLine(d) {
  if (!d) return "stopped early (no statistics)";
  const route = d.route.map((h) => `${shortId(h.peer_id)} [${h.start}:${h.end})`).join(" → ");
  let audit = "not audited (in-process chain)";
  if (d.audit) {
    audit = d.audit.audits > 0 ? `audited (${d.audit.audits} audits, ${d.audit.positions} block rows recomputed, drafts included` +
      (d.audit.unaudited ? `, ${d.audit.unaudited} without an auditor)` : ")")
      : "not audited (no other server holds these layers)";
    if (d.audit.mismatches) audit += `, ${d.audit.mismatches} mismatches caught`;
    if (d.unaudited_layers && d.unaudited_layers.length) audit += ` · layers ${d.unaudited_layers.map(r => r.join("-")).join(", ")} unaudited`;
  }
  const dsd = d.speculative ? `${fmt(d.accepted_per_round, 2)} accepted/round, k ${fmt(d.k, 1)}` : "plain decoding";
  return `${d.tokens} tokens · ${fmt(d.tokens_per_s, 2)} tok/s · ${dsd} · ${d.rounds} rounds · ` +
    `failovers ${d.failovers} · route ${route || "-"} · ${audit}`;
}

function describeError(e) {
  if (e.code === "swarm_unavailable") return "No route through the swarm: " + e.message;
  if (e.status === 401) return "The server needs an API key: enter it above and send again.";
  return e.message;
}

async function* sseEvents(resp) {
  // server-sent events: "event: NAME" (optional) and "data: JSON" lines, a blank line ends one
  const reader = resp.body.getReader(), decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const raw = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      let name = "message", data = "";
      for (const line of raw.split("\n")) {
        if (line.startsWith("event: ")) name = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      yield { name, data };
    }
  }
}

async function send(ev) {
  ev.preventDefault();
  const text = $("prompt").value.trim();
  if (!text) return;
  $("send").disabled = true;
  const transcript = $("transcript");
  transcript.appendChild(el("div", "msg user", text));
  const answer = el("div", "msg assistant answer");
  const body = el("span", "text");
  const stats = el("div", "stats", "waiting for a route…");
  answer.append(body, stats);
  answer.dataset.chunks = "0";
  transcript.appendChild(answer);
  transcript.scrollTop = transcript.scrollHeight;
  history.push({ role: "user", content: text });
  const k = $("dsd-k").value;
  const request = {
    model: modelName, messages: history, stream: true, dsd_stats: true,
    max_tokens: Number($("max-tokens").value) || 128, temperature: Number($("temperature").value) || 0,
    dsd_k: k === "auto" ? "auto" : Number(k),
  };
  const t0 = performance.now();
  try {
    if (!modelName) modelName = (await getJson("/v1/models")).data[0].id;
    request.model = modelName;
    const sentKey = apiKey;
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers({ "Content-Type": "application/json" }), body: JSON.stringify(request),
    });
    if (!resp.ok) throw await readError(resp, sentKey);
    let pieces = 0;
    for await (const e of sseEvents(resp)) {
      if (e.data === "[DONE]") break;
      const chunk = JSON.parse(e.data);
      if (e.name === "error") throw new ApiError(503, chunk);
      const choice = chunk.choices[0];
      if (choice && choice.delta && choice.delta.content) {
        body.textContent += choice.delta.content;
        answer.dataset.chunks = String(++pieces);
        const s = (performance.now() - t0) / 1000;
        stats.textContent = `streaming… ${pieces} pieces in ${s.toFixed(1)} s`;
        transcript.scrollTop = transcript.scrollHeight;
      }
      if (choice && choice.finish_reason) stats.textContent = statsLine(chunk.dsd);
    }
    history.push({ role: "assistant", content: body.textContent });
    answer.dataset.done = "true";
    $("prompt").value = "";
  } catch (e) {
    history.pop();  // the question stays on screen; send it again once the swarm can answer
    answer.className = "msg error chat-error";
    answer.replaceChildren(el("span", "", describeError(e)));
  } finally {
    $("send").disabled = false;
    refreshStats();
  }
}

$("chat-form").addEventListener("submit", send);
$("prompt").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) $("chat-form").requestSubmit();
});
$("clear").addEventListener("click", () => { history.length = 0; $("transcript").replaceChildren(); });

// ---- start ----------------------------------------------------------------------------------
function refresh() { refreshSwarm(); refreshStats(); }
setupCharts();
refresh();
setInterval(refresh, REFRESH_MS);
