"""Owns the live performance view of a daemon: `/performance` (one self-contained HTML
page: no external assets, inline CSS and a few lines of inline JS that poll the JSON every
2 s and draw SVG sparklines) and `/performance.json` (messages/s, verdict counts, per-stage
p50/p95/p99, cache hit rate, pool and writer queue depths, errors, uptime, model version,
and a ring of samples of the last minutes).

Reads `PerformanceMetrics` and the store's counters; must not touch the hot path, write
anything, or decide anything about mail. Stdlib only (`http.server`).

Threads: `start_http_server` starts two daemon threads, the HTTP server (one more thread
per request, `ThreadingHTTPServer`) and the sampler that appends one point to the history
ring every `sample_interval` seconds. Both are started with SIGTERM/SIGINT/SIGHUP and the
reload signal SIGUSR1 blocked, so those signals keep reaching the thread the daemon expects
(libmilter's sigwait thread, the milter's reload thread, or the main thread).

Access: loopback by default. Binding any other address needs a token (`[http] token`);
with a token every request must carry `Authorization: Bearer TOKEN` or `?token=TOKEN`.
Without one, the Host header must name a loopback host (a DNS-rebinding page in a
browser cannot read the figures).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import socket
import threading
import time
from collections import deque
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

from atlas_milter import __version__
from atlas_milter.errors import AtlasError
from atlas_milter.netaddr import is_loopback, is_loopback_literal
from atlas_milter.monitor import (
    COUNTER_CACHE_HIT,
    COUNTER_CACHE_MISS,
    COUNTER_VERDICT_PREFIX,
    GAUGE_POOL_INFLIGHT,
    GAUGE_WRITER_QUEUE,
    STAGE_TOTAL,
    PerformanceMetrics,
)
from atlas_milter.signals import RELOAD_SIGNAL, STOP_SIGNALS, blocked

log = logging.getLogger(__name__)

SAMPLE_INTERVAL = 5.0  # seconds between history points
HISTORY_POINTS = 120  # 10 minutes at the default interval
RATE_WINDOW = 60.0  # seconds over which messages_per_s is measured


# --- what the page shows --------------------------------------------------------------

def is_error_counter(name: str) -> bool:
    """Counters that count a failure: `*.errors`, `*.write_errors`, `milter.error.*`,
    `store.dropped`, `*.record_refused`."""
    last = name.rsplit(".", 1)[-1]
    return "error" in name.split(".") or "error" in last or last in ("dropped", "record_refused")


def current_store_stats() -> dict[str, Any] | None:
    """The process-wide store's counters, or None when the daemon has not opened it (yet).
    Deliberately not `BulkOperationManager.get_instance()`: that would create a store with
    the default path as a side effect of a page view."""
    from atlas_milter.store import current_store

    current = current_store()
    return current.stats() if current is not None else None


class ModelVersion:
    """The version of the model file a daemon runs, read once per change of the file
    (size and mtime), off the hot path. `path()` is called each time: "" means the model
    shipped in the package. The daemon loads the file at start and on reload; between a
    change on disk and the reload this shows the file's version."""

    def __init__(self, path: Callable[[], str]) -> None:
        self._path = path
        self._key: tuple | None = None
        self._version = ""
        self._lock = threading.Lock()

    def __call__(self) -> str:
        from atlas_milter.classifier import load_model

        path = self._path()
        try:
            st = os.stat(path) if path else None
        except OSError:
            return "unavailable"
        key = (path, st.st_size, st.st_mtime_ns) if st else ("",)
        with self._lock:
            if key != self._key:
                try:
                    self._version = load_model(path or None).version
                except Exception as exc:  # a broken file is the daemon's to report; show it
                    self._version = f"unreadable ({type(exc).__name__})"
                self._key = key
            return self._version


def performance_info(
    metrics: PerformanceMetrics | None = None,
    store_stats: Callable[[], dict[str, Any] | None] = current_store_stats,
    model_version: Callable[[], str] | None = None,
    extra: dict[str, Any] | None = None,
) -> Callable[[], dict[str, Any]]:
    """The `info` callback for `start_http_server`: a snapshot of `metrics` (the process-wide
    ones by default), the store's counters and the model version, as plain JSON data."""

    def info() -> dict[str, Any]:
        m = metrics or PerformanceMetrics.get_instance()
        stats = m.get_stats()
        counters = m.get_counters()
        gauges = m.get_gauges()
        store = store_stats() if store_stats else None
        total = stats.get(STAGE_TOTAL, {})
        hits, misses = counters.get(COUNTER_CACHE_HIT, 0), counters.get(COUNTER_CACHE_MISS, 0)
        errors = {f"{name} (stage)": int(s["errors"]) for name, s in stats.items() if s.get("errors")}
        errors.update({name: n for name, n in counters.items() if is_error_counter(name) and n})
        queue = store["queued"] if store else gauges.get(GAUGE_WRITER_QUEUE, 0)
        return {
            "version": __version__,
            "model_version": model_version() if model_version else "",
            "uptime_s": round(m.uptime(), 1),
            "monitoring": m.enabled,
            "messages": int(total.get("count", 0)),
            "messages_per_s_avg": float(total.get("rate", 0.0)),
            "verdicts": {k[len(COUNTER_VERDICT_PREFIX):]: n for k, n in sorted(counters.items())
                         if k.startswith(COUNTER_VERDICT_PREFIX)},
            "stages": {name: {k: s[k] for k in ("count", "errors", "mean", "p50", "p95", "p99", "max")}
                       for name, s in sorted(stats.items())},
            "cache": {"hits": hits, "misses": misses,
                      "hit_rate": round(hits / (hits + misses), 4) if hits + misses else None},
            "pool_in_flight": gauges.get(GAUGE_POOL_INFLIGHT, 0),
            "writer_queue_depth": queue,
            "store": store,
            "errors": sum(errors.values()),
            "errors_by_name": errors,
            "counters": dict(sorted(counters.items())),
            **(extra or {}),
        }

    return info


class History:
    """A bounded ring of samples (one every `interval` seconds) and the recent rate."""

    def __init__(self, info: Callable[[], dict[str, Any]], interval: float = SAMPLE_INTERVAL,
                 points: int = HISTORY_POINTS) -> None:
        self.info = info
        self.interval = interval
        self._ring: deque[dict[str, Any]] = deque(maxlen=points)
        self._lock = threading.Lock()

    def sample(self, now: dict[str, Any] | None = None) -> dict[str, Any]:
        data = now if now is not None else self.info()
        t = time.time()
        with self._lock:
            prev = self._ring[-1] if self._ring else None
            dt = t - prev["t"] if prev else 0.0
            # The first point has no interval to measure over: null, drawn as a gap-free 0.
            per_s = round(max((data.get("messages", 0) - prev["messages"]) / dt, 0.0), 3) if prev and dt > 0 else None
            total = data.get("stages", {}).get(STAGE_TOTAL, {})
            point = {
                "t": round(t, 3),
                "messages": data.get("messages", 0),
                "messages_per_s": per_s,
                "p95_ms": total.get("p95", 0.0),
                "cache_hit_rate": data.get("cache", {}).get("hit_rate"),
                "writer_queue_depth": data.get("writer_queue_depth", 0),
                "pool_in_flight": data.get("pool_in_flight", 0),
                "errors": data.get("errors", 0),
            }
            self._ring.append(point)
        return point

    def points(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._ring)

    def rate(self, messages: int, fallback: float) -> float:
        """Messages per second over the last RATE_WINDOW seconds of samples (the lifetime
        average until two samples exist)."""
        now = time.time()
        with self._lock:
            base = next((p for p in self._ring if now - p["t"] <= RATE_WINDOW), None)
        if base is None or now - base["t"] < 1.0:
            return fallback
        return round(max(messages - base["messages"], 0) / (now - base["t"]), 3)

    def run(self, stop: threading.Event) -> None:
        while not stop.wait(self.interval):
            try:
                self.sample()
            except Exception:  # a sampling bug must not end the history
                log.exception("http: sampling the metrics failed")


# --- the HTTP server ------------------------------------------------------------------

class PerformanceServer:
    """What `start_http_server` returns: `.port`, `.url`, `.history`, `.close()`."""

    def __init__(self, httpd: ThreadingHTTPServer, history: History, stop: threading.Event,
                 threads: list[threading.Thread]) -> None:
        self.httpd = httpd
        self.history = history
        self._stop = stop
        self._threads = threads
        host, port = httpd.server_address[:2]
        self.host, self.port = str(host), int(port)
        shown = f"[{self.host}]" if ":" in self.host else self.host
        self.url = f"http://{shown}:{self.port}/performance"

    def close(self) -> None:
        self._stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        for t in self._threads:
            t.join(timeout=5.0)

    def __enter__(self) -> PerformanceServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def start_http_server(
    address: str,
    port: int,
    info: Callable[[], dict[str, Any]],
    token: str = "",
    sample_interval: float = SAMPLE_INTERVAL,
    history_points: int = HISTORY_POINTS,
) -> PerformanceServer:
    """Serve /performance and /performance.json on address:port (port 0: any free port)
    from daemon threads; returns at once. `info()` gives the snapshot (see
    `performance_info`). AtlasError for a non-loopback address without `token`, or when
    the address cannot be bound."""
    address = address or "127.0.0.1"
    where = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
    if not token and not is_loopback(address):
        raise AtlasError(f"--http {where}: a non-loopback address needs a token ([http] token)")
    history = History(info, sample_interval, history_points)
    history.sample()  # the baseline: charts and messages/s have a first point at once
    handler = type("Handler", (_Handler,), {"info": staticmethod(info), "history": history, "token": token})
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    server_cls = type("Server", (ThreadingHTTPServer,), {"address_family": family, "daemon_threads": True})
    try:
        httpd = server_cls((address, port), handler)
    except OSError as exc:
        raise AtlasError(f"--http {where}: cannot listen ({exc.strerror or exc})") from None
    stop = threading.Event()
    threads = [
        threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.25}, name="atlas-http", daemon=True),
        threading.Thread(target=history.run, args=(stop,), name="atlas-http-sampler", daemon=True),
    ]
    # Threads inherit the signal mask: block the stop signals while starting them.
    with blocked(STOP_SIGNALS | {RELOAD_SIGNAL}):
        for t in threads:
            t.start()
    server = PerformanceServer(httpd, history, stop, threads)
    log.info("http: /performance on %s%s", server.url, " (token required)" if token else "")
    return server


class _Handler(BaseHTTPRequestHandler):
    info: Callable[[], dict[str, Any]]
    history: History
    token: str
    server_version = "atlas-milter"
    sys_version = ""
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._respond(head=False)

    def do_HEAD(self) -> None:  # noqa: N802
        self._respond(head=True)

    def _respond(self, head: bool) -> None:
        url = urlsplit(self.path)
        if not self._allowed(url.query):
            return
        if url.path in ("/", ""):
            self._send(HTTPStatus.FOUND, b"", "text/plain", head, {"Location": "/performance"})
        elif url.path == "/performance":
            self._send(HTTPStatus.OK, PAGE, "text/html; charset=utf-8", head, {"Content-Security-Policy": PAGE_CSP})
        elif url.path == "/performance.json":
            try:
                body = json.dumps(self.snapshot(), allow_nan=False).encode()
            except Exception:
                log.exception("http: building /performance.json failed")
                self._send(HTTPStatus.INTERNAL_SERVER_ERROR, b'{"error": "internal error"}\n', "application/json", head)
                return
            self._send(HTTPStatus.OK, body, "application/json", head)
        else:
            self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain; charset=utf-8", head)

    def snapshot(self) -> dict[str, Any]:
        data = self.info()
        data["messages_per_s"] = self.history.rate(data.get("messages", 0), data.get("messages_per_s_avg", 0.0))
        data["generated_at"] = round(time.time(), 3)
        data["history"] = {"interval_s": self.history.interval, "points": self.history.points()}
        return data

    def _allowed(self, query: str) -> bool:
        if self.token:
            given = ""
            auth = self.headers.get("Authorization", "")
            if auth[:7].lower() == "bearer ":
                given = auth[7:].strip()
            elif "token" in (q := parse_qs(query)):
                given = q["token"][0]
            if not hmac.compare_digest(given.encode(), self.token.encode()):
                self._send(HTTPStatus.UNAUTHORIZED, b"token required\n", "text/plain; charset=utf-8", False,
                           {"WWW-Authenticate": 'Bearer realm="atlas-milter"'})
                return False
            return True
        host = (self.headers.get("Host") or "").strip()
        name = host[1:host.index("]")] if host.startswith("[") and "]" in host else host.rsplit(":", 1)[0]
        if not is_loopback_literal(name):  # a Host header is never resolved: the client chose it
            self._send(HTTPStatus.FORBIDDEN, b"loopback only (set [http] token to serve other hosts)\n",
                       "text/plain; charset=utf-8", False)
            return False
        return True

    def _send(self, status: HTTPStatus, body: bytes, ctype: str, head: bool,
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("X-Frame-Options", "DENY")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's signature)
        log.debug("http: %s %s", self.address_string(), format % args)


# --- the page ---------------------------------------------------------------------------
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


def _csp_hash(text: str) -> str:
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
<p class="note">Charts: the last <span id="points">{HISTORY_POINTS}</span> samples, one every <span id="interval">{SAMPLE_INTERVAL:g}</span> s. Percentiles over the last 4096 messages per stage.
Raw figures: <a href="performance.json">performance.json</a>.</p>
</main>
<script>{_SCRIPT}</script>
</body></html>
"""

PAGE = _BODY.encode()
PAGE_CSP = (
    f"default-src 'none'; script-src {_csp_hash(_SCRIPT)}; style-src {_csp_hash(_STYLE)}; "
    "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
