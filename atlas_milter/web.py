"""Owns a daemon's HTTP server and who may use it: the live performance view
(`/performance`, the page of performance_page.py, and `/performance.json`: messages/s,
verdict counts, per-stage p50/p95/p99, cache hit rate, pool and writer queue depths,
errors, uptime, model version, and a ring of samples of the last minutes), and the admin's
console pages of console.py when the daemon gives one.

Reads `PerformanceMetrics` and the store's counters; must not touch the hot path, write
anything, or decide anything about mail. Stdlib only (`http.server`).

Threads: `start_http_server` starts two daemon threads, the HTTP server (one more thread
per request, `ThreadingHTTPServer`) and the sampler that appends one point to the history
ring every `sample_interval` seconds. Both are started with SIGTERM/SIGINT/SIGHUP and the
reload signal SIGUSR1 blocked, so those signals keep reaching the thread the daemon expects
(libmilter's sigwait thread, the milter's reload thread, or the main thread).

Access: loopback by default. Binding any other address needs a token (`[http] token_file`);
with a token every request must carry `Authorization: Bearer TOKEN`, `?token=TOKEN` or the
session cookie a console page sets. Without one, the Host header must name a loopback host
(a DNS-rebinding page in a browser cannot read the figures). The console always needs the
token or a reverse proxy's `auth_header`, and its POSTs a CSRF token (`_console_caller`).
"""

from __future__ import annotations

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
from typing import Any, Callable, Mapping
from urllib.parse import parse_qs, urlencode, urlsplit

from atlas_milter import __version__, cluster_sync, pg_ship
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
from atlas_milter.performance_page import HISTORY_POINTS, PAGE, PAGE_CSP, SAMPLE_INTERVAL
from atlas_milter.signals import RELOAD_SIGNAL, STOP_SIGNALS, blocked

log = logging.getLogger(__name__)

TOKEN_ENV = "ATLAS_HTTP_TOKEN"
TOKEN_CREDENTIAL = "http-token"
SESSION_COOKIE = "atlas_console"
MAX_FORM_BYTES = 4096
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
        cluster, shipper = cluster_sync.current(), pg_ship.current()
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
            "cluster": cluster.status() if cluster is not None else None,
            "fleet": shipper.fleet if shipper is not None else None,  # every host, from PostgreSQL
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


def read_token(http: Any, env: Mapping[str, str] | None = None) -> str:
    """The [http] token: `token`, else the file `token_file`, else ATLAS_HTTP_TOKEN, else
    the systemd credential http-token; "" when none is given."""
    from atlas_milter.secrets import read_secret

    return http.token or read_secret(http.token_file, TOKEN_ENV, TOKEN_CREDENTIAL, "[http] token_file", env)


def start_http_server(
    address: str,
    port: int,
    info: Callable[[], dict[str, Any]],
    token: str = "",
    sample_interval: float = SAMPLE_INTERVAL,
    history_points: int = HISTORY_POINTS,
    console: Any = None,
    auth_header: str = "",
) -> PerformanceServer:
    """Serve /performance and /performance.json on address:port (port 0: any free port)
    from daemon threads; returns at once. `info()` gives the snapshot (see
    `performance_info`); `console` (a console.Console) adds the admin's pages, which need
    `token` or a reverse proxy's `auth_header`. AtlasError for a non-loopback address
    without `token`, `auth_header` on a non-loopback address, or when the address cannot
    be bound."""
    address = address or "127.0.0.1"
    where = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
    if not token and not is_loopback(address):
        raise AtlasError(f"--http {where}: a non-loopback address needs a token ([http] token_file)")
    if auth_header and not is_loopback(address):
        raise AtlasError(f"--http {where}: [http] auth_header trusts a reverse proxy on this host; "
                         "bind to loopback (127.0.0.1 or ::1) so only the proxy can send it")
    history = History(info, sample_interval, history_points)
    history.sample()  # the baseline: charts and messages/s have a first point at once
    secret = os.urandom(32)  # signs the session cookie and the CSRF tokens of this run
    handler = type("Handler", (_Handler,), {
        "info": staticmethod(info), "history": history, "token": token, "console": console,
        "auth_header": auth_header, "secret": secret,
        "session": _sign(secret, "session", token) if token else ""})
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


def _sign(secret: bytes, purpose: str, value: str) -> str:
    return hmac.new(secret, f"{purpose}\0{value}".encode(), hashlib.sha256).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    info: Callable[[], dict[str, Any]]
    history: History
    token: str
    console: Any  # console.Console or None
    auth_header: str
    secret: bytes
    session: str  # the session cookie's value: signed from the token, valid for this run
    server_version = "atlas-milter"
    sys_version = ""
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._respond(head=False)

    def do_HEAD(self) -> None:  # noqa: N802
        self._respond(head=True)

    def do_POST(self) -> None:  # noqa: N802
        url = urlsplit(self.path)
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            self._send(HTTPStatus.BAD_REQUEST, b"bad Content-Length\n", "text/plain; charset=utf-8", False)
            return
        form = parse_qs(self.rfile.read(min(length, MAX_FORM_BYTES)).decode("utf-8", "replace")) if length > 0 else {}
        if length > MAX_FORM_BYTES:
            self.close_connection = True
        if self.console is None or not self.console.handles(url.path):
            self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain; charset=utf-8", False)
            return
        caller = self._console_caller(url, head=False, post=True)
        if caller is None:
            return
        if caller.csrf and not self._same_origin_form(form, caller.csrf):
            self._send(HTTPStatus.FORBIDDEN, b"cross-site request refused (reload the page and try again)\n",
                       "text/plain; charset=utf-8", False)
            return
        self._send_page(lambda: self.console.post(url.path, caller), head=False)

    # -- the console's access rules ------------------------------------------------------------
    # Every console page and action needs the token (Authorization: Bearer, or once as
    # ?token= which sets a session cookie and is then dropped from the URL) or the reverse
    # proxy's auth header. A request authenticated by something the browser adds on its
    # own (the cookie, the proxy's header) must send its CSRF token with a POST.

    def _cookie(self) -> str:
        for part in (self.headers.get("Cookie") or "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == SESSION_COOKIE:
                return value
        return ""

    def _bearer(self) -> str | None:
        """The token of an `Authorization: Bearer` header, or None when there is none."""
        auth = self.headers.get("Authorization", "")
        return auth[7:].strip() if auth[:7].lower() == "bearer " else None

    def _is_token(self, given: str) -> bool:
        return hmac.compare_digest(given.encode(), self.token.encode())

    def _has_session(self) -> bool:
        return bool(self.session) and hmac.compare_digest(self._cookie().encode(), self.session.encode())

    def _proxy_user(self) -> str:
        """The user the reverse proxy authenticated ([http] auth_header), or ""."""
        return (self.headers.get(self.auth_header) or "").strip() if self.auth_header else ""

    def _console_caller(self, url: Any, head: bool, post: bool = False) -> Any:
        from atlas_milter.console import Caller

        client = self.client_address[0]
        bearer = self._bearer() if self.token else None
        if bearer is not None:
            if self._is_token(bearer):
                return Caller(f"token from {client}", "")
        elif self.token and self._has_session():
            return Caller(f"token from {client}", _sign(self.secret, "csrf", self.session))
        elif self.token and not post and "token" in (q := parse_qs(url.query)):
            if self._is_token(q["token"][0]):
                rest = urlencode([(k, v) for k, vs in q.items() if k != "token" for v in vs])
                self._send(HTTPStatus.SEE_OTHER, b"", "text/plain", head, {
                    "Location": url.path + (f"?{rest}" if rest else ""),
                    "Set-Cookie": f"{SESSION_COOKIE}={self.session}; HttpOnly; SameSite=Strict; Path=/"})
                return None
        elif user := self._proxy_user():
            return Caller(f"{user[:120]} (via {self.auth_header})", _sign(self.secret, "csrf", "proxy:" + user))
        if not self.token and not self.auth_header:
            self._send(HTTPStatus.FORBIDDEN, b"the console needs [http] token_file (or auth_header behind a proxy)\n",
                       "text/plain; charset=utf-8", head)
        else:
            self._send(HTTPStatus.UNAUTHORIZED, b"token required: open the page once with ?token=TOKEN\n",
                       "text/plain; charset=utf-8", head, {"WWW-Authenticate": 'Bearer realm="atlas-milter"'})
        return None

    def _same_origin_form(self, form: dict[str, list[str]], csrf: str) -> bool:
        given = (form.get("csrf") or [""])[0]
        if not hmac.compare_digest(given.encode(), csrf.encode()):
            return False
        if (self.headers.get("Sec-Fetch-Site") or "same-origin") not in ("same-origin", "none"):
            return False
        origin = self.headers.get("Origin")
        # Behind a reverse proxy the browser's host may arrive as X-Forwarded-Host instead.
        hosts = {self.headers.get("Host") or "", *(self.headers.get("X-Forwarded-Host") or "").split(",")}
        return origin is None or urlsplit(origin).netloc in {h.strip() for h in hosts if h.strip()}

    def _send_page(self, build: Callable[[], Any], head: bool) -> None:
        """Send the console page `build()` makes; a bug there is a logged 500, not a dropped connection."""
        try:
            page = build()
        except Exception:
            log.exception("http: building %s failed", self.path.split("?")[0])
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, b"internal error (see the daemon's log)\n",
                       "text/plain; charset=utf-8", head)
            return
        self._send(HTTPStatus(page.status), page.body, page.content_type, head, page.headers)

    def _respond(self, head: bool) -> None:
        url = urlsplit(self.path)
        if self.console is not None and self.console.handles(url.path):
            caller = self._console_caller(url, head)
            if caller is not None:
                self._send_page(lambda: self.console.get(url.path, parse_qs(url.query), caller), head)
            return
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
            bearer = self._bearer()
            if bearer is not None:
                ok = self._is_token(bearer)
            elif "token" in (q := parse_qs(query)):
                ok = self._is_token(q["token"][0])
            else:
                ok = self._has_session()  # the console's session cookie
            if not ok:
                self._send(HTTPStatus.UNAUTHORIZED, b"token required\n", "text/plain; charset=utf-8", False,
                           {"WWW-Authenticate": 'Bearer realm="atlas-milter"'})
                return False
            return True
        if self._proxy_user():
            return True  # the reverse proxy authenticated the user
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
