// Metergate /ui: reads /admin/spend and /admin/budgets (with the session cookie) and
// draws them. No libraries and nothing loaded from elsewhere; every text from the API
// goes through textContent, never innerHTML (team, model and tag names come from callers).
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const BUCKETS = { "1h": "5m", "24h": "1h", "7d": "6h", "30d": "1d" };
const COLORS = 7; // classes c0..c6; c7 is "other"
const REFRESH_MS = 30000;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else node.setAttribute(k, v);
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

// Amounts arrive as exact decimal text; the charts need only approximate numbers.
function usd(text) {
  const [whole, frac = ""] = text.split(".");
  const cents = frac.padEnd(2, "0");
  if (whole === "0" && /^00/.test(cents) && /[1-9]/.test(frac)) return "$" + text;
  return "$" + whole.replace(/\B(?=(\d{3})+(?!\d))/g, ",") + "." + cents.slice(0, 2);
}

// A tick or tooltip amount: as many decimals as ``step`` (the tick spacing) needs.
function usdNumber(value, step) {
  if (value === 0) return "$0";
  const unit = step || value;
  const decimals = Math.min(9, Math.max(0, -Math.floor(Math.log10(unit) + 1e-9)));
  return "$" + value.toFixed(step ? decimals : Math.max(2, decimals + 1));
}

// The axis top and tick spacing: 1, 2 or 5 times a power of ten, about 5 ticks.
function niceScale(max) {
  if (max <= 0) return [0, 1];
  const rough = max / 5;
  const power = Math.pow(10, Math.floor(Math.log10(rough)));
  const step = [1, 2, 5, 10].map((m) => m * power).find((s) => s >= rough);
  return [Math.ceil(max / step - 1e-9) * step, step];
}

function count(n) {
  return Number(n).toLocaleString("en-US");
}

function pad(n) {
  return String(n).padStart(2, "0");
}

function timeLabel(ms, bucketMs) {
  const d = new Date(ms);
  const day = pad(d.getMonth() + 1) + "-" + pad(d.getDate());
  if (bucketMs >= 86400000) return day;
  const hm = pad(d.getHours()) + ":" + pad(d.getMinutes());
  return bucketMs >= 6 * 3600000 ? day + " " + hm : hm;
}

async function getJson(url) {
  const response = await fetch(url, { credentials: "same-origin", cache: "no-store" });
  if (response.status === 401) {
    window.location.reload(); // the session ended: show the sign-in form
    throw new Error("signed out");
  }
  const body = await response.json();
  if (!response.ok) throw new Error(body.error ? body.error.message : response.statusText);
  return body;
}

// -- totals -------------------------------------------------------------------------

function renderTotals(total) {
  const box = document.getElementById("totals");
  const card = (label, value, exact) =>
    el("div", { class: "card" }, el("div", { class: "label" }, label),
      el("div", { class: "value", title: exact ? "$" + exact : value }, value));
  box.replaceChildren(
    card("Spend", usd(total.cost_usd), total.cost_usd),
    card("Requests", count(total.requests)),
    card("Input tokens", count(total.input_tokens)),
    card("Output tokens", count(total.output_tokens)),
    card("Estimated requests", count(total.estimated)),
  );
}

// -- stacked bar chart ---------------------------------------------------------------

// The top groups by cost get their own colour; the rest are summed as "other".
function chartGroups(spend, column) {
  const rows = spend.rows;
  const top = rows.slice(0, rows.length > COLORS + 1 ? COLORS : COLORS + 1);
  const groups = top.map((row, i) => ({
    name: row[column], cls: "c" + i, row, points: row.series.map((p) => p.cost_nanos / 1e9),
    exact: row.series.map((p) => "$" + p.cost_usd),
  }));
  const rest = rows.slice(top.length);
  if (rest.length) {
    const points = spend.buckets.map((_, b) =>
      rest.reduce((sum, row) => sum + row.series[b].cost_nanos / 1e9, 0));
    groups.push({ name: `other (${rest.length})`, cls: "c7", row: null, points });
  }
  return groups;
}

function renderChart(box, spend, column) {
  const W = 760, H = 240, left = 56, right = 12, top = 12, bottom = 28;
  const plotW = W - left - right, plotH = H - top - bottom;
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img",
    "aria-label": `spend by ${column} over time` });
  const groups = chartGroups(spend, column);
  const buckets = spend.buckets || [];
  const stacks = buckets.map((_, b) => groups.reduce((s, g) => s + g.points[b], 0));
  const [max, step] = niceScale(Math.max(0, ...stacks));
  root.append(svg("line", { class: "axis", x1: left, y1: top + plotH, x2: W - right,
    y2: top + plotH }));
  if (!buckets.length || max === 0) {
    root.append(svg("text", { class: "empty", x: left + plotW / 2, y: top + plotH / 2,
      "text-anchor": "middle" }, "No spend in this period"));
  } else {
    for (let value = 0; value <= max * 1.0001; value += step) {
      const y = top + plotH - (plotH * value) / max;
      root.append(svg("line", { class: "axis", x1: left, y1: y, x2: W - right, y2: y }));
      root.append(svg("text", { class: "tick", x: left - 6, y: y + 4, "text-anchor": "end" },
        usdNumber(value, step)));
    }
    const slot = plotW / buckets.length;
    const barW = Math.max(1, slot * 0.72);
    buckets.forEach((start, b) => {
      let y = top + plotH;
      for (const g of groups) {
        const value = g.points[b];
        if (value <= 0) continue;
        const h = Math.max(1, (value / max) * plotH);
        y -= h;
        const rect = svg("rect", { class: "seg " + g.cls, x: left + b * slot + (slot - barW) / 2,
          y, width: barW, height: h });
        rect.append(svg("title", {},
          `${g.name} · ${timeLabel(start, spend.bucket_ms)} · ${g.exact ? g.exact[b] : usdNumber(value)}`));
        root.append(rect);
      }
    });
    const every = Math.max(1, Math.ceil(buckets.length / 8));
    buckets.forEach((start, b) => {
      if (b % every) return;
      root.append(svg("text", { class: "tick", x: left + b * slot + slot / 2, y: H - 8,
        "text-anchor": "middle" }, timeLabel(start, spend.bucket_ms)));
    });
  }
  box.replaceChildren(root);
  box.dataset.state = "ready";
  box.dataset.groups = String(groups.length);
  return groups;
}

function renderLegend(table, groups, column) {
  const head = el("tr", {}, el("th", {}, ""), el("th", {}, column), el("th", {}, "requests"),
    el("th", {}, "input tokens"), el("th", {}, "output tokens"), el("th", {}, "spend"));
  const rows = groups.map((g) => {
    const r = g.row;
    const total = g.points.reduce((a, b) => a + b, 0);
    return el("tr", { class: "group" },
      el("td", {}, el("span", { class: "swatch " + g.cls })),
      el("td", { class: "group-name" }, g.name),
      el("td", {}, r ? count(r.requests) : ""),
      el("td", {}, r ? count(r.input_tokens) : ""),
      el("td", {}, r ? count(r.output_tokens) : ""),
      el("td", { class: "cost" }, r ? usd(r.cost_usd) : usdNumber(total)));
  });
  table.replaceChildren(el("thead", {}, head), el("tbody", {}, ...rows));
}

// -- budgets ------------------------------------------------------------------------

function scopeText(scope) {
  const parts = Object.entries(scope).map(([k, v]) => `${k}=${v}`);
  return parts.length ? parts.join(", ") : "every request";
}

function resetText(budget) {
  if (!budget.period_reset) return "never resets (total)";
  // "2026-12-01T00:00:00+01:00" -> "2026-12-01 00:00 +01:00"
  const m = /^(\d{4}-\d\d-\d\d)T(\d\d:\d\d)(?::\d\d(?:\.\d+)?)?(.*)$/.exec(budget.period_reset);
  const when = m ? `${m[1]} ${m[2]} ${m[3].replace("Z", "+00:00")}`.trim() : budget.period_reset;
  const ms = Date.parse(budget.period_reset) - Date.now();
  const hours = Math.max(0, Math.round(ms / 3600000));
  const left = hours >= 48 ? `${Math.round(hours / 24)} days` : `${hours} h`;
  return `resets ${when} (${budget.timezone}), in ${left}`;
}

function renderBudget(b) {
  const meta = b.limit_nanos === null
    ? scopeText(b.scope)
    : `${scopeText(b.scope)} · ${b.period} · ${b.enforce}`;
  const head = el("div", { class: "head" },
    el("div", {}, el("span", { class: "name" }, b.name), " ", el("span", { class: "meta" }, meta)));
  const item = el("div", { class: "budget", "data-name": b.name }, head);
  if (b.limit_nanos === null) {
    const rates = [];
    if (b.requests_per_minute) rates.push(`${count(b.requests_per_minute)} requests/min`);
    if (b.tokens_per_minute) rates.push(`${count(b.tokens_per_minute)} tokens/min`);
    item.append(el("div", { class: "amounts" }, "rate limits only: " + rates.join(", ")));
    return item;
  }
  const pct = b.percent_spent === null ? 0 : b.percent_spent;
  head.append(el("span", { class: "pct" }, b.percent_spent === null ? "–" : pct.toFixed(2) + "%"));
  if (pct >= 100) item.classList.add("over");
  else if (pct >= 80) item.classList.add("warn");
  const limit = b.limit_nanos || 1;
  const spentPct = Math.min(100, (b.spent_nanos / limit) * 100);
  const heldPct = Math.min(100 - spentPct, (b.reserved_nanos / limit) * 100);
  const spent = el("div", { class: "spent" });
  const held = el("div", { class: "held" });
  spent.style.width = spentPct + "%"; // CSSOM, allowed by the CSP (no inline style attribute)
  held.style.width = heldPct + "%";
  const bar = el("div", { class: "bar", role: "progressbar", "aria-valuemin": "0",
    "aria-valuemax": "100", "aria-valuenow": String(pct) }, spent, held);
  item.append(bar,
    el("div", { class: "amounts" },
      `${usd(b.spent_usd)} spent + ${usd(b.reserved_usd)} reserved of ${usd(b.limit_usd)}` +
      ` · ${usd(b.remaining_usd)} left`),
    el("div", { class: "reset" }, resetText(b)));
  return item;
}

function renderBudgets(list) {
  const box = document.getElementById("budgets");
  const items = list.budgets.map(renderBudget);
  if (!items.length) items.push(el("p", { class: "meta" }, "No budgets are configured."));
  box.replaceChildren(...items);
  box.dataset.state = "ready";
}

// -- loading ------------------------------------------------------------------------

async function load() {
  const status = document.getElementById("status");
  const range = document.getElementById("range").value;
  const query = `since=${encodeURIComponent(range)}&bucket=${BUCKETS[range]}`;
  try {
    const [byTeam, byModel, budgets] = await Promise.all([
      getJson(`/admin/spend?group_by=team&${query}`),
      getJson(`/admin/spend?group_by=model&${query}`),
      getJson("/admin/budgets"),
    ]);
    renderTotals(byTeam.total);
    for (const [column, spend] of [["team", byTeam], ["model", byModel]]) {
      const groups = renderChart(document.getElementById("chart-" + column), spend, column);
      renderLegend(document.getElementById("legend-" + column), groups, column);
    }
    renderBudgets(budgets);
    status.textContent = "Updated " + new Date().toLocaleTimeString("en-GB") +
      " · refreshes every 30 s";
    status.classList.remove("error");
  } catch (err) {
    status.textContent = "Could not load: " + err.message;
    status.classList.add("error");
  }
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("range").addEventListener("change", load);
  document.getElementById("refresh").addEventListener("click", load);
  load();
  setInterval(load, REFRESH_MS);
});
