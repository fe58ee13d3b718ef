// meterproxy dashboard: plain JS, no build step, no CDN. Reads the admin API with the
// token kept in sessionStorage. Money is shown as the API's exact decimal strings; floats
// are used only for bar and chart geometry.
"use strict";

const TOKEN_KEY = "meterproxy.token";
const VIEWS = {
  day: { name: "today", chart: "hour", limit: "max_cost_per_day_usd", step: 3600 },
  week: { name: "this week", chart: "day", limit: "max_cost_per_week_usd", step: 86400 },
  month: { name: "this month", chart: "day", limit: "max_cost_per_month_usd", step: 86400 },
};
// A colour per agent, any number of them: hues a golden angle apart never repeat, and
// neighbours in the list (the biggest spenders) differ most. Lightness alternates too.
const colorFor = (i) => `hsl(${(i * 137.508) % 360} ${i % 2 ? 55 : 68}% ${i % 3 === 2 ? 38 : 48}%)`;
let view = "day";
let timer = null;

const $ = (sel) => document.querySelector(sel);
const el = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
};
const usd = (s) => "$" + (s.includes(".") && s.split(".")[1].length > 6 ? Number(s).toFixed(6) : s);
const money = (s, cls = "num") => el("td", { class: cls, "data-usd": s }, usd(s));
// Calls the price table could not price cost an unknown amount, never "$0".
function cost(s, unpriced, cls = "num") {
  if (!unpriced) return money(s, cls);
  const cell = el("td", { class: cls + " unpriced", "data-usd": s, "data-unpriced": unpriced });
  cell.textContent = Number(s) > 0 ? `${usd(s)} + ${unpriced} unpriced` : "unpriced";
  cell.title = "calls of models missing from pricing.yaml: their cost is unknown";
  return cell;
}

class Unauthorized extends Error {}

async function api(path, options = {}) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  const response = await fetch(path, {
    ...options,
    headers: { Authorization: "Bearer " + token, "Content-Type": "application/json" },
  });
  if (response.status === 401 || response.status === 403) {
    const body = await response.json().catch(() => ({}));
    throw new Unauthorized((body.error && body.error.message) || "unauthorized");
  }
  if (!response.ok) throw new Error(path + ": HTTP " + response.status);
  return response.json();
}

function showLogin(message) {
  $("#main").hidden = true;
  $("#controls").hidden = true;  // nothing to switch or refresh before the token is in
  $("#login").hidden = false;
  $("#login-error").textContent = message || "";
  stopTimer();
}

async function load() {
  try {
    const agents = await api("/meter/agents");
    const win = agents.windows[view];
    const since = encodeURIComponent(win.starts);
    const [chart, intents, models, calls, outcomes] = await Promise.all([
      api(`/meter/spend?by=agent&window=${VIEWS[view].chart}&since=${since}`),
      api(`/meter/spend?by=intent&since=${since}`),
      api(`/meter/spend?by=model&since=${since}`),
      api("/meter/calls?limit=15"),
      api(`/meter/outcomes?by=agent&since=${since}`),
    ]);
    $("#login").hidden = true;
    $("#main").hidden = false;
    $("#controls").hidden = false;
    render(agents, chart, intents, models, calls, win);
    renderOutcomes(outcomes);
    $("#updated").textContent = "updated " + new Date().toLocaleTimeString();
    $("#updated").dataset.loads = String(Number($("#updated").dataset.loads || 0) + 1);
  } catch (e) {
    if (e instanceof Unauthorized) showLogin(e.message);
    else $("#updated").textContent = "refresh failed: " + e.message;
  }
}

function render(agents, chart, intents, models, calls, win) {
  for (const node of document.querySelectorAll(".range-name")) node.textContent = VIEWS[view].name;
  $(".range-detail").textContent = `(${win.starts.slice(0, 16).replace("T", " ")} - ${agents.timezone})`;
  $("#total-cost").textContent = usd(chart.total.cost_usd);
  $("#total-cost").dataset.usd = chart.total.cost_usd;
  $("#total-calls").textContent = chart.total.llm_calls;
  $("#total-refused").textContent = chart.total.refused;
  $("#reserved").textContent = usd(agents.reserved_usd);
  $("#reserved").dataset.usd = agents.reserved_usd;
  const unpriced = {};
  for (const r of chart.rows) unpriced[r.agent] = (unpriced[r.agent] || 0) + (r.unpriced || 0);
  // Biggest spender first, in the table, the chart and its legend alike.
  const order = [...agents.agents].sort((a, b) =>
    Number(b.windows[view].spent_usd) - Number(a.windows[view].spent_usd) ||
    a.agent.localeCompare(b.agent));
  const colors = new Map(order.map((a, i) => [a.agent, colorFor(i)]));
  for (const r of chart.rows) if (!colors.has(r.agent)) colors.set(r.agent, colorFor(colors.size));
  renderAgents(order, unpriced, colors);
  renderChart(chart, win, colors);
  renderTop("#intents", intents.rows, "intent", "(no intent)");
  renderTop("#models", models.rows, "model", "(none)");
  renderCalls(calls.calls);
}

function budgetBar(agent) {
  const limits = agent.limits.filter((l) => l.scope === "agent" && l.limit_usd !== undefined);
  const limit = limits.find((l) => l.limit === VIEWS[view].limit) || limits[0];
  if (!limit) {
    const cell = el("td", { class: "budget muted" }, "no cost limit");
    const pi = perIntent(agent);
    if (pi) cell.replaceChildren(pi);
    return cell;
  }
  const max = Number(limit.limit_usd) || 1e-12;
  const spent = Math.min(Number(limit.spent_usd) / max, 1);
  const reserved = Math.min(Number(limit.reserved_usd) / max, 1 - spent);
  const bar = el("span", { class: "bar" + (Number(limit.remaining_usd) <= 0 ? " over" : "") },
    el("span", { class: "spent" }), el("span", { class: "reserved" }));
  bar.children[0].style.width = (spent * 100).toFixed(2) + "%";
  bar.children[1].style.left = (spent * 100).toFixed(2) + "%";
  bar.children[1].style.width = (reserved * 100).toFixed(2) + "%";
  return el("td", { class: "budget", "data-limit": limit.limit },
    bar, el("span", { class: "barlabel" },
      `${usd(limit.spent_usd)} + ${usd(limit.reserved_usd)} reserved of ${usd(limit.limit_usd)}` +
      ` (${limit.limit.replace("max_cost_per_", "").replace("_usd", "")})`),
    runway(limit), perIntent(agent));
}

// When the limit runs out at the spend rate of the last 15 minutes (the API's runway).
function runway(limit) {
  if (limit.runway_seconds === undefined || limit.runway_seconds === null) return "";
  const soon = limit.runs_out_before_reset;
  return el("span", { class: "runway" + (soon ? " soon" : ""),
    "data-runway-seconds": String(limit.runway_seconds) },
    soon ? `${limit.runway} at the current rate (${usd(limit.rate_usd_per_minute)}/min)`
      : `lasts until the reset at the current rate (${usd(limit.rate_usd_per_minute)}/min)`);
}

// Cost per outcome: intents closed as success, failure or abandoned, and what one success cost.
function renderOutcomes(report) {
  const body = $("#outcomes tbody");
  body.replaceChildren();
  const rows = report.rows.filter((r) => r.success_intents + r.failure_intents +
    r.abandoned_intents > 0);
  $("#outcomes-empty").hidden = rows.length > 0;
  for (const r of rows) {
    body.append(el("tr", { "data-agent": r.agent }, el("td", {}, r.agent),
      el("td", { class: "num" }, r.success_intents), el("td", { class: "num" }, r.failure_intents),
      el("td", { class: "num" }, r.abandoned_intents), el("td", { class: "num" }, r.open_intents),
      money(r.success_cost_usd), money(r.failure_cost_usd),
      r.cost_per_success_usd === null ? el("td", { class: "num muted" }, "-")
        : money(r.cost_per_success_usd)));
  }
}

// A per-intent cost limit applies to each of the agent's tasks: say so beside its budget.
function perIntent(agent) {
  const limit = agent.policy && agent.policy.max_cost_per_intent_usd;
  if (limit === undefined || limit === null) return "";
  return el("span", { class: "perintent", "data-per-intent": String(limit) },
    `at most ${usd(String(limit))} per intent (${agent.policy.action_on_breach || "block"})`);
}

function renderAgents(list, unpriced, colors) {
  const body = $("#agents tbody");
  body.replaceChildren();
  for (const a of list) {
    const w = a.windows[view];
    const action = el("td");
    if (a.state === "paused") {
      const button = el("button", { class: "resume", title: a.paused_reason || "" }, "Resume");
      button.addEventListener("click", async () => {
        button.disabled = true;
        await api(`/meter/agents/${encodeURIComponent(a.agent)}/resume`, { method: "POST", body: "{}" });
        await load();
      });
      action.append(button);
    }
    const swatch = el("i", { class: "swatch" });
    swatch.style.background = colors.get(a.agent);
    body.append(el("tr", { "data-agent": a.agent },
      el("td", {}, swatch, a.agent),
      el("td", { class: "state state-" + a.state }, a.state),
      cost(w.spent_usd, unpriced[a.agent] || 0, "num spent"),
      money(w.reserved_usd, "num reserved"),
      budgetBar(a),
      action));
  }
  if (!list.length) body.append(el("tr", {}, el("td", { colSpan: 6, class: "muted" }, "no agents yet")));
}

function renderChart(report, win, colors) {
  const start = Date.parse(win.starts) / 1000;
  const end = Date.parse(win.resets) / 1000;
  const step = VIEWS[view].step;
  const slots = Math.max(1, Math.round((end - start) / step));
  const agents = [...colors.keys()].filter((a) => report.rows.some((r) => r.agent === a));
  const totals = Array.from({ length: slots }, () => agents.map(() => 0));
  for (const row of report.rows) {
    const i = Math.min(slots - 1, Math.max(0, Math.floor((Date.parse(row.window_start) / 1000 - start + step / 2) / step)));
    totals[i][agents.indexOf(row.agent)] += Number(row.cost_usd);
  }
  const top = Math.max(1e-12, ...totals.map((s) => s.reduce((a, b) => a + b, 0)));
  // Drawn at the box's own pixel width: text keeps its size on a phone, nothing stretches.
  const W = Math.max(200, Math.round($("#chart").clientWidth - 16) || 1000);
  const H = 200, pad = 28, bw = (W - pad) / slots;
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);

  const label = document.createElementNS(ns, "text");
  label.setAttribute("x", "0"); label.setAttribute("y", "12"); label.setAttribute("font-size", "11");
  label.setAttribute("fill", "#6b7385"); label.textContent = "$" + top.toPrecision(3);
  svg.append(label);
  totals.forEach((stack, i) => {
    let y = H - 14;
    stack.forEach((v, j) => {
      if (!v) return;
      const h = (v / top) * (H - 30);
      const rect = document.createElementNS(ns, "rect");
      rect.setAttribute("x", String(pad + i * bw + 1));
      rect.setAttribute("width", String(Math.max(bw - 2, 1)));
      rect.setAttribute("y", String(y - h));
      rect.setAttribute("height", String(h));
      rect.setAttribute("fill", colors.get(agents[j]));
      rect.setAttribute("data-agent", agents[j]);
      const title = document.createElementNS(ns, "title");
      title.textContent = `${agents[j]}: $${v.toFixed(6)}`;
      rect.append(title);
      svg.append(rect);
      y -= h;
    });
  });
  const every = Math.ceil(slots / Math.max(2, Math.floor((W - pad) / 44)));  // ~44 px a label
  for (let i = 0; i < slots; i += every) {
    const tick = document.createElementNS(ns, "text");
    tick.setAttribute("x", String(pad + i * bw + 2));
    tick.setAttribute("y", String(H - 2));
    tick.setAttribute("font-size", "11");
    tick.setAttribute("fill", "#6b7385");
    tick.textContent = slotLabel(win.starts, i);
    svg.append(tick);
  }
  $("#chart").replaceChildren(svg);
  $("#legend").replaceChildren(...agents.map((a) => el("span", { "data-agent": a }, el("i"), a)));
  for (const n of $("#legend").children) n.firstChild.style.background = colors.get(n.dataset.agent);
}

// Slot labels in the proxy's time zone, from the window start's own date and hour.
function slotLabel(starts, i) {
  if (VIEWS[view].step === 3600) return String((Number(starts.slice(11, 13)) + i) % 24).padStart(2, "0") + "h";
  const day = new Date(starts.slice(0, 10) + "T00:00:00Z");
  day.setUTCDate(day.getUTCDate() + i);
  return day.toISOString().slice(5, 10);
}

function renderTop(selector, rows, key, empty) {
  const body = $(selector + " tbody");
  body.replaceChildren();
  const sorted = rows
    .filter((r) => r.llm_calls > 0 || Number(r.cost_usd) > 0)  // refusals alone: not spend
    .sort((a, b) => Number(b.cost_usd) - Number(a.cost_usd))
    .slice(0, 10);
  for (const r of sorted) {
    body.append(el("tr", { "data-key": r[key] }, el("td", {}, r[key] || empty),
      el("td", { class: "num" }, r.llm_calls), cost(r.cost_usd, r.unpriced || 0)));
  }
}

function renderCalls(rows) {
  const body = $("#calls tbody");
  body.replaceChildren();
  for (const c of rows) {
    const note = c.refused ? "refused" : c.error ? c.error.slice(0, 60) : c.usage_source === "estimated" ? "estimated" : "";
    body.append(el("tr", { "data-id": c.id },
      el("td", {}, c.started_at.slice(11, 19)), el("td", {}, c.agent), el("td", {}, c.intent || "-"),
      el("td", {}, c.model_requested || "-"), el("td", { class: "num" }, c.status),
      el("td", { class: "num" }, c.input_tokens), el("td", { class: "num" }, c.output_tokens),
      c.cost_usd === null ? el("td", { class: "num" }, "unpriced") : money(c.cost_usd),
      el("td", { class: "muted" }, note)));
  }
}

function stopTimer() { if (timer) { clearInterval(timer); timer = null; } }
function startTimer() {
  stopTimer();
  if ($("#autorefresh").checked) timer = setInterval(load, 5000);
}

$("#login").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $("#token").value.trim());
  $("#token").value = "";
  load().then(startTimer);
});
$("#logout").addEventListener("click", () => { sessionStorage.removeItem(TOKEN_KEY); showLogin(); });
$("#autorefresh").addEventListener("change", startTimer);
for (const button of document.querySelectorAll("#views button")) {
  button.addEventListener("click", () => {
    view = button.dataset.view;
    for (const b of document.querySelectorAll("#views button")) b.classList.toggle("active", b === button);
    load();
  });
}

if (sessionStorage.getItem(TOKEN_KEY)) load().then(startTimer);
else showLogin();
