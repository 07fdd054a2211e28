"""Owns the /performance page itself: one self-contained HTML document (inline CSS, a few
lines of inline JS that poll /performance.json every 2 s and draw SVG sparklines) and the
Content-Security-Policy that allows exactly that script and style. web.py serves it.

Must not: read any figure itself (the script fetches them) or put data into the markup.
"""

from __future__ import annotations

import base64
import hashlib

HISTORY_POINTS = 120  # 10 minutes at the default interval
SAMPLE_INTERVAL = 5.0  # seconds between history points


# --- the page -----------------------------------------------------------------------------
# Static: every figure is put in place by the script with textContent / SVG attributes,
# never as markup, so nothing the JSON carries can become HTML. The CSP allows exactly
# this script and this style (by hash) and fetches to this origin.

_STYLE = """
:root { --fg:#1d2330; --muted:#667085; --line:#2f6fde; --bad:#c8362d; --ok:#16803c; --card:#fff; --bg:#f3f5f9; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg); background: var(--bg); }
header { display: flex; flex-wrap: wrap; gap: .4em 1.4em; align-items: baseline; padding: 14px 22px; background: #1d2330; color: #fff; }
header h1 { font-size: 19px; margin: 0; font-weight: 600; }
header span { color: #c9d1e0; font-size: 13px; }
#state { margin-left: auto; font-weight: 600; }
#state[data-state="live"] { color: #7ee2a0; } #state[data-state="stale"] { color: #ff9b8f; }
main { padding: 16px 22px; max-width: 1250px; }
.tiles { display: grid; grid-template-columns: repeat(auto-fill, minmax(215px, 1fr)); gap: 12px; }
.tile { background: var(--card); border-radius: 8px; padding: 10px 14px 8px; box-shadow: 0 1px 2px rgba(0,0,0,.08); }
.tile h2 { margin: 0; font-size: 12px; font-weight: 600; text-transform: uppercase; letter-spacing: .04em; color: var(--muted); }
.tile .v { font-size: 30px; font-weight: 650; font-variant-numeric: tabular-nums; white-space: nowrap; }
.tile .sub { font-size: 12px; color: var(--muted); min-height: 1.4em; }
.tile.bad .v { color: var(--bad); }
svg.spark { display: block; width: 100%; height: 34px; }
svg.spark polyline { fill: none; stroke: var(--line); stroke-width: 1.6; vector-effect: non-scaling-stroke; }
svg.spark polygon { fill: rgba(47,111,222,.12); stroke: none; }
.tile.bad svg.spark polyline { stroke: var(--bad); }
.verdicts { display: flex; height: 10px; border-radius: 5px; overflow: hidden; margin: 8px 0 4px; background: #e4e8ef; }
.verdicts i { display: block; }
.k-spam { background: #c8362d; } .k-unsure { background: #e0a526; } .k-ham { background: #16803c; } .k-other { background: #8a94a6; }
table { border-collapse: collapse; width: 100%; margin-top: 16px; background: var(--card); border-radius: 8px; overflow: hidden; box-shadow: 0 1px 2px rgba(0,0,0,.08); }
th, td { padding: 6px 12px; text-align: right; font-variant-numeric: tabular-nums; border-bottom: 1px solid #edf0f5; }
th:first-child, td:first-child { text-align: left; }
th { font-size: 12px; text-transform: uppercase; color: var(--muted); font-weight: 600; background: #fafbfd; }
td.err { color: var(--bad); font-weight: 600; }
p.note { color: var(--muted); font-size: 12px; }
"""

_SCRIPT = """
"use strict";
const $ = (id) => document.getElementById(id);
const token = new URLSearchParams(location.search).get("token");
const SVGNS = "http://www.w3.org/2000/svg";
function num(x, digits) {
  if (x === null || x === undefined || Number.isNaN(x)) return "\\u2013";
  if (digits === undefined) digits = Math.abs(x) >= 100 || Number.isInteger(x) ? 0 : Math.abs(x) >= 10 ? 1 : 2;
  return x.toFixed(digits);
}
function count(n) { return n >= 1e6 ? (n / 1e6).toFixed(2) + "M" : String(Math.round(n)); }
function pct(x) { return x === null || x === undefined ? "\\u2013" : (x * 100).toFixed(1) + " %"; }
function dur(s) {
  s = Math.floor(s); const d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600), m = Math.floor(s % 3600 / 60);
  return d ? d + "d " + h + "h" : h ? h + "h " + m + "m" : m + "m " + (s % 60) + "s";
}
function set(id, text) { const el = $(id); if (el.textContent !== text) el.textContent = text; }
function spark(id, values) {
  const svg = $(id); while (svg.firstChild) svg.removeChild(svg.firstChild);
  const v = values.map((x) => (x === null || x === undefined ? 0 : x));
  if (v.length < 2) return;
  const max = Math.max(...v, 1e-9), W = 100, H = 30, step = W / (v.length - 1);
  const pts = v.map((x, i) => (i * step).toFixed(2) + "," + (H - 1 - (x / max) * (H - 3)).toFixed(2));
  const area = document.createElementNS(SVGNS, "polygon");
  area.setAttribute("points", "0," + H + " " + pts.join(" ") + " " + W + "," + H);
  const line = document.createElementNS(SVGNS, "polyline");
  line.setAttribute("points", pts.join(" "));
  svg.appendChild(area); svg.appendChild(line);
}
function render(d) {
  const h = d.history.points, col = (k) => h.map((p) => p[k]);
  set("model", d.model_version || "\\u2013"); set("version", "atlas-milter " + d.version);
  set("uptime", "up " + dur(d.uptime_s));
  set("rate", num(d.messages_per_s)); set("rate-sub", "avg " + num(d.messages_per_s_avg) + " /s since start");
  set("messages", count(d.messages)); spark("rate-chart", col("messages_per_s"));
  const order = ["spam", "unsure", "ham"];
  const kinds = Object.keys(d.verdicts).sort((a, b) => (order.indexOf(a) + 1 || 9) - (order.indexOf(b) + 1 || 9)), total = kinds.reduce((a, k) => a + d.verdicts[k], 0);
  set("verdict-spam", count(d.verdicts.spam || 0)); set("verdict-unsure", count(d.verdicts.unsure || 0));
  set("verdict-ham", count(d.verdicts.ham || 0));
  const bar = $("verdict-bar"); while (bar.firstChild) bar.removeChild(bar.firstChild);
  for (const k of kinds) {
    const i = document.createElement("i"); i.className = ["spam", "unsure", "ham"].includes(k) ? "k-" + k : "k-other";
    i.style.width = (total ? 100 * d.verdicts[k] / total : 0) + "%"; i.title = k + " " + d.verdicts[k]; bar.appendChild(i);
  }
  set("cache", pct(d.cache.hit_rate)); set("cache-sub", count(d.cache.hits) + " hits, " + count(d.cache.misses) + " misses");
  spark("cache-chart", col("cache_hit_rate"));
  set("p95", num((d.stages.total || {}).p95)); spark("p95-chart", col("p95_ms"));
  set("p95-sub", "p50 " + num((d.stages.total || {}).p50) + " \\u00b7 p99 " + num((d.stages.total || {}).p99) + " ms");
  set("queue", count(d.writer_queue_depth)); spark("queue-chart", col("writer_queue_depth"));
  set("queue-sub", d.store ? count(d.store.written) + " written, " + count(d.store.dropped) + " dropped" : "no store");
  set("inflight", count(d.pool_in_flight)); spark("inflight-chart", col("pool_in_flight"));
  set("errors", count(d.errors)); spark("errors-chart", col("errors"));
  $("errors-tile").classList.toggle("bad", d.errors > 0);
  const names = Object.keys(d.errors_by_name);
  set("errors-sub", names.length ? names.map((n) => n + " " + d.errors_by_name[n]).join(", ") : "none");
  const body = $("stages"); while (body.firstChild) body.removeChild(body.firstChild);
  for (const [name, s] of Object.entries(d.stages)) {
    const tr = document.createElement("tr"); tr.dataset.stage = name;
    const cells = [name, count(s.count), num(s.p50), num(s.p95), num(s.p99), num(s.mean), num(s.max), count(s.errors)];
    cells.forEach((c, i) => { const td = document.createElement("td"); td.textContent = c; if (i === 7 && s.errors) td.className = "err"; tr.appendChild(td); });
    body.appendChild(tr);
  }
  const fleet = d.fleet, hosts = $("hosts");
  $("fleet").hidden = !fleet && !d.cluster;
  while (hosts.firstChild) hosts.removeChild(hosts.firstChild);
  for (const [name, f] of Object.entries(fleet ? fleet.hosts : {})) {
    const tr = document.createElement("tr"); tr.dataset.host = name;
    const cells = [name + (name === fleet.this_host ? " (this host)" : ""), count(f.last_5m), count(f.spam_5m),
                   count(f.last_hour), count(f.spam_hour), new Date(f.latest).toLocaleTimeString()];
    cells.forEach((c) => { const td = document.createElement("td"); td.textContent = c; tr.appendChild(td); });
    hosts.appendChild(tr);
  }
  set("fleet-sub", (fleet ? "from PostgreSQL, as of " + new Date(fleet.as_of * 1000).toLocaleTimeString() : "no shared store")
      + (d.cluster ? " \u00b7 shared model " + d.cluster.version + (d.cluster.redis_up ? "" : " (Redis unreachable)") : ""));
  set("updated", new Date(d.generated_at * 1000).toLocaleTimeString());
  set("points", String(h.length)); set("interval", String(d.history.interval_s));
}
async function poll() {
  try {
    const r = await fetch("performance.json", { cache: "no-store", headers: token ? { Authorization: "Bearer " + token } : {} });
    if (!r.ok) throw new Error("HTTP " + r.status);
    render(await r.json());
    $("state").dataset.state = "live"; set("state", "\\u25cf live");
  } catch (e) {
    $("state").dataset.state = "stale"; set("state", "\\u25cf stale: " + e.message);
  } finally {
    setTimeout(poll, 2000);
  }
}
poll();
"""


def _tile(key: str, title: str, chart: bool = True, sub: str = "") -> str:
    spark = f'<svg class="spark" id="{key}-chart" viewBox="0 0 100 30" preserveAspectRatio="none"></svg>' if chart else ""
    return (f'<section class="tile" id="{key}-tile"><h2>{title}</h2><div class="v" id="{key}">\u2013</div>'
            f'<div class="sub" id="{key}-sub">{sub}</div>{spark}</section>')


def csp_hash(text: str) -> str:
    """The CSP source that allows exactly this inline script or style."""
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


_BODY = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>atlas-milter performance</title><style>{_STYLE}</style></head>
<body>
<header><h1>atlas-milter &middot; performance</h1><span id="version">atlas-milter</span>
<span>model <b id="model">&ndash;</b></span><span id="uptime"></span><span>updated <b id="updated">&ndash;</b></span>
<span id="state" data-state="loading">&#9679; loading</span></header>
<main>
<noscript><p class="note">This page needs JavaScript; the same figures are at <a href="performance.json">performance.json</a>.</p></noscript>
<div class="tiles">
{_tile("rate", "Messages / s (last minute)")}
<section class="tile" id="verdicts-tile"><h2>Messages &amp; verdicts</h2><div class="v" id="messages">&ndash;</div>
<div class="verdicts" id="verdict-bar"></div>
<div class="sub">spam <b id="verdict-spam">&ndash;</b> &middot;
unsure <b id="verdict-unsure">&ndash;</b> &middot; ham <b id="verdict-ham">&ndash;</b></div></section>
{_tile("p95", "Latency p95 (ms)")}
{_tile("cache", "Cache hit rate")}
{_tile("queue", "Writer queue depth")}
{_tile("inflight", "Pool in flight")}
{_tile("errors", "Errors")}
</div>
<table><thead><tr><th>stage</th><th>count</th><th>p50 ms</th><th>p95 ms</th><th>p99 ms</th><th>mean ms</th><th>max ms</th><th>errors</th></tr></thead>
<tbody id="stages"></tbody></table>
<section id="fleet" hidden><h2>Hosts</h2><p class="note" id="fleet-sub"></p>
<table><thead><tr><th>host</th><th>messages, 5 min</th><th>spam, 5 min</th><th>messages, hour</th><th>spam, hour</th>
<th>latest</th></tr></thead><tbody id="hosts"></tbody></table></section>
<p class="note">Charts: the last <span id="points">{HISTORY_POINTS}</span> samples, one every <span id="interval">{SAMPLE_INTERVAL:g}</span> s. Percentiles over the last 4096 messages per stage.
Raw figures: <a href="performance.json">performance.json</a>.</p>
</main>
<script>{_SCRIPT}</script>
</body></html>
"""

PAGE = _BODY.encode()
PAGE_CSP = (
    f"default-src 'none'; script-src {csp_hash(_SCRIPT)}; style-src {csp_hash(_STYLE)}; "
    "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
