// vici-balancer dashboard. No framework and no build step: the daemon pushes one JSON document
// over server-sent events (/api/events) whenever it changes; this script draws it. Everything
// from the server is put in the page as text (textContent), never as HTML.
"use strict";

const SEVERITY = { down: 0, stale: 1, suspect: 2, drained: 3, up: 4 };
const COLORS = {
  up: "#1a7f37", suspect: "#bf8700", down: "#cf222e", stale: "#6e7781", drained: "#8250df",
};

const state = {
  doc: null,           // the last dashboard document
  receivedAt: 0,       // performance.now() when it arrived: ages count on from there locally
  points: [],          // chart history: [{t, lines: {ip: n}}], oldest first
  windowS: 900,
  rows: new Map(),     // server_ip -> {tr, cells}
};

const $ = (id) => document.getElementById(id);

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

// A DOWN or stale server's live lines are unknown (null in the status document).
function known(value) {
  return value === null || value === undefined ? "?" : value;
}

function setText(node, text) {
  const value = text === undefined || text === null ? "" : String(text);
  if (node.textContent !== value) node.textContent = value;
}

function fmtAge(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  if (seconds < 60) return `${seconds.toFixed(seconds < 10 ? 1 : 0)}s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)}m ${Math.floor(seconds % 60)}s`;
  return `${Math.floor(seconds / 3600)}h ${Math.floor((seconds % 3600) / 60)}m`;
}

function fmtTime(epoch) {
  if (!epoch) return "–";
  return new Date(epoch * 1000).toLocaleTimeString([], { hour12: false });
}

function sinceReceived() {
  return (performance.now() - state.receivedAt) / 1000;
}

function ipKey(ip) {
  return ip.split(".").map((p) => p.padStart(3, "0")).join(".");
}

// ------------------------------------------------------------------ the stream

function connect() {
  const source = new EventSource("/api/events");
  source.addEventListener("dashboard", (event) => {
    let doc;
    try {
      doc = JSON.parse(event.data);
    } catch (err) {
      return;
    }
    setStream("live", "live");
    receive(doc);
  });
  source.onopen = () => setStream("live", "live");
  source.onerror = () => {
    // EventSource reconnects by itself (the server asks for 2 s); a closed source does not.
    if (source.readyState === EventSource.CLOSED) {
      setStream("broken", "disconnected: reload the page (a token may be needed: /?token=…)");
    } else {
      setStream("connecting", "reconnecting…");
    }
  };
}

function setStream(kind, text) {
  const node = $("stream");
  node.className = `stream ${kind}`;
  setText(node, text);
}

function receive(doc) {
  state.doc = doc;
  state.receivedAt = performance.now();
  if (doc.history) {
    state.points = doc.history.points.slice();
    state.windowS = doc.history.window_s;
  }
  if (doc.point) {
    const last = state.points[state.points.length - 1];
    if (!last || doc.point.t > last.t) state.points.push(doc.point);
  }
  const cutoff = doc.generated_at - state.windowS;
  while (state.points.length && state.points[0].t < cutoff) state.points.shift();
  render();
}

// ------------------------------------------------------------------ drawing

// How long drawing a document takes in this browser (read by bench/dashboard.py).
window.vbRenderStats = { renders: 0, totalMs: 0, maxMs: 0 };

function render() {
  const doc = state.doc;
  if (!doc) return;
  const started = performance.now();
  draw(doc);
  const ms = performance.now() - started;
  const stats = window.vbRenderStats;
  stats.renders += 1;
  stats.totalMs += ms;
  stats.maxMs = Math.max(stats.maxMs, ms);
}

function draw(doc) {
  renderHeader(doc);
  renderAlerts(doc);
  renderTiles(doc);
  renderGlance(doc);
  renderServers(doc);
  renderCycle(doc);
  renderCarriers(doc);
  renderDecisions(doc);
  drawCluster();
  tick();
}

function renderHeader(doc) {
  const d = doc.daemon;
  setText($("daemon"), `${d.name} · v${d.version} · ${d.mode}`);
  const role = $("role");
  if (!d.balancing) {
    role.className = "badge tracking";
    setText(role, "tracking only");
  } else if (d.leader) {
    role.className = "badge leader";
    setText(role, d.leader_epoch == null ? "leader" : `leader · epoch ${d.leader_epoch}`);
  } else {
    role.className = "badge standby";
    setText(role, "standby");
  }
}

function renderAlerts(doc) {
  const box = $("alerts");
  box.replaceChildren();
  const add = (text, error) => box.appendChild(el("div", error ? "error" : "", text));
  if (doc.store_error) add(doc.store_error, true);
  if (doc.status) for (const problem of doc.status.problems) add(problem, false);
  if (doc.decisions_error) add(doc.decisions_error, false);
}

function servers(doc) {
  return doc.status ? doc.status.servers : [];
}

function renderTiles(doc) {
  const list = servers(doc);
  const t = doc.status ? doc.status.totals : null;
  const up = $("t-up");
  if (t) {
    setText(up, `${t.up} / ${t.servers}`);
    up.classList.toggle("bad", t.up < t.servers);
    const counts = {};
    for (const s of list) counts[s.health] = (counts[s.health] || 0) + 1;
    setText($("t-up-sub"), ["down", "stale", "suspect", "drained"]
      .filter((h) => counts[h]).map((h) => `${counts[h]} ${h}`).join(" · "));
    setText($("t-trunks"), `${t.trunk_lines} / ${t.max_trunks}`);
    setText($("t-trunks-sub"), t.max_trunks ? `${Math.round((100 * t.trunk_lines) / t.max_trunks)}% of max_vicidial_trunks` : "");
    setText($("t-agents"), t.agent_phones);
  }
  let minute = 0;
  let total = 0;
  for (const p of Object.values(doc.placed)) {
    minute += p.last_minute;
    total += p.total;
  }
  setText($("t-placed"), minute);
  setText($("t-placed-sub"), `${total} since the daemon started`);
  let open = 0;
  let half = 0;
  for (const c of doc.carriers) {
    const states = [c.state, ...Object.values(c.servers).map((s) => s.state)];
    open += states.filter((s) => s === "open").length;
    half += states.filter((s) => s === "half-open").length;
  }
  const breakers = $("t-breakers");
  setText(breakers, open);
  breakers.classList.toggle("bad", open > 0);
  setText($("t-breakers-sub"), half ? `${half} half-open (probing)` : `${doc.carriers.length} carriers`);
}

function renderGlance(doc) {
  // One square per server in server order: with 50 servers the odd one out stands out.
  const box = $("glance");
  const list = serverOrder(servers(doc), "server");
  while (box.children.length > list.length) box.lastChild.remove();
  while (box.children.length < list.length) {
    const square = box.appendChild(el("a"));
    square.href = "#";
    square.addEventListener("click", (event) => {
      event.preventDefault();
      showRow(square.dataset.serverIp);
    });
  }
  list.forEach((s, i) => {
    const square = box.children[i];
    square.dataset.serverIp = s.server_ip;
    const full = s.max_trunks && s.trunk_lines !== null && s.trunk_lines >= s.max_trunks;
    square.className = `${s.health}${full ? " full" : ""}`;
    square.title = `${s.server_id || s.server_ip} (${s.server_ip}): ${s.health}, ${known(s.trunk_lines)}/${s.max_trunks} trunk lines`;
  });
}

function showRow(ip) {
  const row = state.rows.get(ip);
  if (!row) return;
  if (row.tr.hidden) {
    $("filter").value = "";
    renderServers(state.doc);
  }
  for (const other of state.rows.values()) other.tr.classList.remove("target");
  row.tr.classList.add("target");
  row.tr.scrollIntoView({ block: "center" });
}

function serverOrder(list, how) {
  const sorted = list.slice();
  const byIp = (a, b) => (ipKey(a.server_ip) < ipKey(b.server_ip) ? -1 : 1);
  if (how === "server") sorted.sort(byIp);
  else if (how === "load") {
    const load = (s) => (s.max_trunks ? (s.trunk_lines || 0) / s.max_trunks : 0);
    sorted.sort((a, b) => load(b) - load(a) || byIp(a, b));
  } else {
    sorted.sort((a, b) => (SEVERITY[a.health] ?? 9) - (SEVERITY[b.health] ?? 9) || byIp(a, b));
  }
  return sorted;
}

function newRow(ip) {
  const tr = el("tr");
  tr.dataset.serverIp = ip;
  const cells = {};
  const td = (name, className) => {
    const cell = el("td", className);
    cells[name] = cell;
    tr.appendChild(cell);
    return cell;
  };
  const name = td("name");
  cells.sid = name.appendChild(el("span", "sid"));
  name.appendChild(el("span", "ip", ip));
  const health = td("health", "health-cell");
  cells.badge = health.appendChild(el("span", "badge health"));
  cells.tag = health.appendChild(el("span", "tag"));
  const trunks = td("trunks", "num");
  const meter = trunks.appendChild(el("span", "meter"));
  cells.trunkText = meter.appendChild(el("span", "trunks"));
  const bar = meter.appendChild(el("span", "bar"));
  cells.fill = bar.appendChild(el("span", "fill"));
  cells.fill.style.display = "block";
  td("agents", "num agents");
  td("local", "num");
  td("rtt", "num");
  td("age", "num age");
  td("placed", "num placed");
  const chart = td("chart");
  cells.canvas = chart.appendChild(el("canvas", "spark"));
  cells.canvas.width = 180;
  cells.canvas.height = 18;
  return { tr, cells };
}

function renderServers(doc) {
  const tbody = $("servers").tBodies[0];
  const filter = $("filter").value.trim().toLowerCase();
  const all = servers(doc);
  const seen = new Set();
  const shown = [];
  for (const s of serverOrder(all, $("sort").value)) {
    seen.add(s.server_ip);
    let row = state.rows.get(s.server_ip);
    if (!row) {
      row = newRow(s.server_ip);
      state.rows.set(s.server_ip, row);
    }
    updateRow(row, s, doc);
    const match = !filter || s.server_ip.includes(filter) || (s.server_id || "").toLowerCase().includes(filter);
    row.tr.hidden = !match;
    if (match) shown.push(s);
    tbody.appendChild(row.tr); // appending an attached row moves it: this is the sort
  }
  for (const [ip, row] of state.rows) {
    if (!seen.has(ip)) {
      row.tr.remove();
      state.rows.delete(ip);
    }
  }
  let empty = tbody.querySelector("tr.empty");
  if (!all.length) {
    if (!empty) {
      empty = el("tr", "empty");
      const td = empty.appendChild(el("td", "", "no server known yet"));
      td.colSpan = 9;
    }
    tbody.appendChild(empty);
  } else if (empty) empty.remove();
  setText($("servers-count"), filter ? `${shown.length} of ${all.length} shown` : `${all.length} servers`);
}

function updateRow(row, s, doc) {
  const c = row.cells;
  row.tr.className = s.health + (row.tr.classList.contains("target") ? " target" : "");
  row.tr.dataset.health = s.health;
  row.tr.dataset.drained = s.drained ? "yes" : "no";
  setText(c.sid, s.server_id || "–");
  c.badge.className = `badge health ${s.health}`;
  setText(c.badge, s.health.toUpperCase());
  c.badge.title = s.health_reason || "";
  const notes = [];
  if (s.drained) notes.push(`tracked ${s.tracked_health}`);
  if (s.health === "stale") notes.push("no fresh state");
  setText(c.tag, notes.join(", "));
  setText(c.trunkText, `${known(s.trunk_lines)} / ${s.max_trunks}`);
  const ratio = s.max_trunks ? Math.min(1, (s.trunk_lines || 0) / s.max_trunks) : 0;
  c.fill.style.width = `${Math.round(ratio * 100)}%`;
  c.fill.className = `fill${ratio >= 1 ? " full" : ratio >= 0.85 ? " high" : ""}`;
  setText(c.agents, known(s.agent_phones));
  setText(c.local, known(s.local));
  setText(c.rtt, s.rtt_ms === null ? "–" : `${s.rtt_ms.toFixed(1)} ms`);
  const placed = doc.placed[s.server_ip];
  setText(c.placed, placed ? `${placed.last_minute} / ${placed.total}` : "0 / 0");
  row.server = s;
  drawSpark(c.canvas, s);
}

function tick() {
  // Ages run on between pushes without asking the server (the server pushes on change only).
  const elapsed = sinceReceived();
  for (const row of state.rows.values()) {
    const s = row.server;
    if (!s) continue;
    setText(row.cells.age, s.last_event_age_s === null ? "–" : fmtAge(s.last_event_age_s + elapsed));
  }
  const doc = state.doc;
  if (!doc) return;
  setText($("updated"), `updated ${fmtAge(elapsed)} ago`);
  const last = doc.daemon.last_cycle_at;
  setText($("t-cycle"), last ? `${fmtAge(doc.generated_at - last + elapsed)} ago` : "none");
}

function renderCycle(doc) {
  const balance = doc.status ? doc.status.balance : null;
  const d = doc.daemon;
  const campaigns = $("campaigns").tBodies[0];
  const cycleServers = $("cycle-servers").tBodies[0];
  campaigns.replaceChildren();
  cycleServers.replaceChildren();
  if (!balance) {
    setText($("cycle-meta"), d.balancing ? "no recent cycle (no daemon is leading)" : "balancing is disabled on this daemon");
    setText($("t-cycle-sub"), d.balancing ? "no daemon leading" : "balancing disabled");
    emptyRow(campaigns, 4, "no cycle");
    emptyRow(cycleServers, 6, "no cycle");
    return;
  }
  const how = balance.stopped || balance.skipped || "active";
  setText($("cycle-meta"), `cycle ${balance.cycle_id} · ${balance.mode} · ${how} · ${d.cycles} cycles by this daemon, every ${d.cycle_interval_s}s`);
  setText($("t-cycle-sub"), `${how} · ${d.cycles} cycles${d.call_errors ? ` · ${d.call_errors} call errors` : ""}`);
  for (const c of balance.campaigns) {
    const tr = campaigns.appendChild(el("tr"));
    tr.dataset.campaign = c.campaign_id;
    tr.append(el("td", "", c.campaign_id), el("td", "num", c.shortage), el("td", "num", c.filling),
      el("td", "num", c.placed_last_minute));
  }
  if (!balance.campaigns.length) emptyRow(campaigns, 4, "no campaign short of lines");
  for (const s of balance.servers) {
    const placed = doc.placed[s.server_ip];
    const tr = cycleServers.appendChild(el("tr"));
    tr.append(el("td", "", s.server_ip), el("td", "", s.balance_active ? "Y" : "N"), el("td", "num", s.rank),
      el("td", "num", s.allowed_for_balance), el("td", "num", s.outbalance_calls),
      el("td", "num", placed ? placed.last_minute : 0));
  }
  if (!balance.servers.length) emptyRow(cycleServers, 6, "no server in the cycle");
}

function emptyRow(tbody, span, text) {
  const tr = tbody.appendChild(el("tr", "empty"));
  const td = tr.appendChild(el("td", "", text));
  td.colSpan = span;
}

function renderCarriers(doc) {
  const tbody = $("carriers").tBodies[0];
  tbody.replaceChildren();
  if (!doc.carriers.length) {
    emptyRow(tbody, 4, "no carrier configured");
    return;
  }
  for (const c of doc.carriers) {
    const tr = tbody.appendChild(el("tr"));
    tr.dataset.carrier = c.carrier;
    tr.appendChild(el("td", "sid", c.carrier));
    const wide = tr.appendChild(el("td"));
    const badge = wide.appendChild(el("span", `badge ${c.state}`, c.state));
    badge.title = c.reason || "";
    if (c.reason && c.state !== "closed") wide.appendChild(el("span", "tag", c.reason));
    const entries = Object.entries(c.servers).sort((a, b) => (ipKey(a[0]) < ipKey(b[0]) ? -1 : 1));
    tr.appendChild(el("td", "num", entries.reduce((n, [, s]) => n + s.lines, 0)));
    const cell = tr.appendChild(el("td"));
    const chips = cell.appendChild(el("div", "chips"));
    // With many servers only the ones in trouble get a chip; the rest are counted.
    const many = entries.length > 12;
    let closed = 0;
    for (const [ip, s] of entries) {
      if (many && s.state === "closed") {
        closed += 1;
        continue;
      }
      const text = s.state === "closed" ? ip : `${ip} ${s.state.toUpperCase()}${s.reason ? ` — ${s.reason}` : ""}`;
      const chip = chips.appendChild(el("span", `chip ${s.state}`, text));
      chip.dataset.server = ip;
      chip.dataset.state = s.state;
      chip.title = `${c.carrier} on ${ip}: ${s.state}, ${s.lines} lines`;
    }
    if (closed) chips.appendChild(el("span", "tag", `closed on ${closed} more servers`));
    if (!entries.length) chips.appendChild(el("span", "tag", "no server has this carrier yet"));
  }
}

function renderDecisions(doc) {
  const tbody = $("decisions").tBodies[0];
  tbody.replaceChildren();
  for (const d of doc.decisions) {
    const tr = tbody.appendChild(el("tr"));
    tr.dataset.kind = d.kind;
    const reason = el("td", "reason", d.reason);
    tr.append(el("td", "", fmtTime(d.decided_at)), el("td", "", d.kind), el("td", "", d.campaign_id),
      el("td", "num", d.lead_id ?? ""), el("td", "", d.server_ip), el("td", "", d.carrier_id),
      el("td", "", d.outcome), reason);
  }
  if (!doc.decisions.length) emptyRow(tbody, 8, doc.decisions_error ? "unavailable" : "no decision logged yet");
}

// ------------------------------------------------------------------ charts

function prepare(canvas) {
  // Draw at the screen's pixel density so lines stay sharp.
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || canvas.width;
  const height = canvas.clientHeight || canvas.height;
  if (canvas.width !== Math.round(width * ratio)) canvas.width = Math.round(width * ratio);
  if (canvas.height !== Math.round(height * ratio)) canvas.height = Math.round(height * ratio);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  return { ctx, width, height };
}

function span() {
  // The window ends at the newest document; until the daemon has run for a whole window it
  // starts at the first point, so a young daemon's chart is not a sliver at the right edge.
  const end = state.doc ? state.doc.generated_at : Date.now() / 1000;
  const first = state.points.length ? state.points[0].t : end;
  return [Math.min(Math.max(end - state.windowS, first), end - 1), end];
}

function plot(canvas, values, limit, color) {
  // values: [[t, n]]; x spans the whole window ending at the newest point; y from 0 to the
  // larger of the limit (max_vicidial_trunks) and the highest value.
  const { ctx, width, height } = prepare(canvas);
  const [start, end] = span();
  const top = Math.max(limit || 0, ...values.map((v) => v[1]), 1);
  const x = (t) => ((t - start) / (end - start)) * (width - 2) + 1;
  const y = (n) => height - 2 - (n / top) * (height - 4);
  if (limit) {
    ctx.strokeStyle = "#d0d7de";
    ctx.setLineDash([3, 3]);
    ctx.beginPath();
    ctx.moveTo(0, y(limit));
    ctx.lineTo(width, y(limit));
    ctx.stroke();
    ctx.setLineDash([]);
  }
  if (!values.length) return;
  ctx.beginPath();
  values.forEach(([t, n], i) => (i ? ctx.lineTo(x(t), y(n)) : ctx.moveTo(x(t), y(n))));
  ctx.strokeStyle = color;
  ctx.lineWidth = 1.5;
  ctx.stroke();
  ctx.lineTo(x(values[values.length - 1][0]), height);
  ctx.lineTo(x(values[0][0]), height);
  ctx.closePath();
  ctx.globalAlpha = 0.15;
  ctx.fillStyle = color;
  ctx.fill();
  ctx.globalAlpha = 1;
}

function drawSpark(canvas, s) {
  const values = [];
  for (const p of state.points) {
    const n = p.lines[s.server_ip];
    if (n !== undefined) values.push([p.t, n]);
  }
  plot(canvas, values, s.max_trunks, COLORS[s.health] || COLORS.stale);
}

function drawCluster() {
  const doc = state.doc;
  const limit = doc.status ? doc.status.totals.max_trunks : 0;
  const values = state.points.map((p) => [p.t, Object.values(p.lines).reduce((a, b) => a + b, 0)]);
  plot($("cluster-chart"), values, limit, "#0969da");
  const [start, end] = span();
  const full = end - start >= state.windowS - 1;
  setText($("chart-label"), full ? "cluster trunk lines, last 15 minutes"
    : `cluster trunk lines, last ${fmtAge(end - start)} (since the daemon started; up to 15 minutes)`);
}

// ------------------------------------------------------------------ start

$("filter").addEventListener("input", () => state.doc && renderServers(state.doc));
$("sort").addEventListener("change", () => state.doc && renderServers(state.doc));
window.addEventListener("resize", () => state.doc && render());
setInterval(tick, 1000);
connect();
