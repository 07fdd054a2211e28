"""atlas_milter.web: the /performance.json figures, the history ring, access rules (loopback,
token, Host), the page's self-containment, and the --http / [http] wiring of the CLI."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from atlas_milter import web
from atlas_milter.cli import _performance_page, build_parser
from atlas_milter.config import load_config
from atlas_milter.errors import AtlasError, ConfigError
from atlas_milter.monitor import PerformanceMetrics


def recorded_metrics() -> PerformanceMetrics:
    m = PerformanceMetrics()
    for ms in (1, 2, 3, 4, 100):
        m.record("total", ms / 1000.0)
        m.record("parse", ms / 2000.0)
    m.record("classify", 0.5, error=True)
    for kind, n in (("spam", 3), ("ham", 1), ("unsure", 1)):
        m.incr(f"verdict.{kind}", n)
    m.incr("cache.hit", 1)
    m.incr("cache.miss", 4)
    m.incr("store.write_errors", 2)
    m.incr("milter.error.timeout")
    m.incr("store.rows_written", 5)
    m.set_gauge("pool.in_flight", 3)
    m.set_gauge("store.queue_depth", 7)
    return m


def get(url: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


@pytest.fixture(scope="module")
def server():
    info = web.performance_info(recorded_metrics(), store_stats=lambda: None, model_version=lambda: "m-1")
    with web.start_http_server("127.0.0.1", 0, info, sample_interval=0.05, history_points=4) as srv:
        yield srv


def test_info_figures():
    data = web.performance_info(recorded_metrics(), store_stats=lambda: None, model_version=lambda: "m-1")()
    assert data["messages"] == 5
    assert data["verdicts"] == {"ham": 1, "spam": 3, "unsure": 1}
    assert data["model_version"] == "m-1"
    assert data["cache"] == {"hits": 1, "misses": 4, "hit_rate": 0.2}
    assert data["pool_in_flight"] == 3 and data["writer_queue_depth"] == 7  # gauges when no store
    total = data["stages"]["total"]
    assert (total["p50"], total["p95"], total["p99"], total["count"]) == (3.0, 100.0, 100.0, 5)
    assert data["errors_by_name"] == {"classify (stage)": 1, "store.write_errors": 2, "milter.error.timeout": 1}
    assert data["errors"] == 4
    assert data["uptime_s"] >= 0 and data["messages_per_s_avg"] > 0


def test_info_prefers_the_live_store_queue():
    store = {"mode": "bulk", "queued": 42, "written": 1, "dropped": 0}
    data = web.performance_info(recorded_metrics(), store_stats=lambda: store)()
    assert data["writer_queue_depth"] == 42 and data["store"] == store


def test_error_counter_names():
    for name in ("statsd.errors", "store.write_errors", "store.dropped", "milter.error.busy", "milter.record_refused"):
        assert web.is_error_counter(name), name
    for name in ("verdict.spam", "cache.miss", "store.commits", "milter.messages", "milter.action.reject"):
        assert not web.is_error_counter(name), name


def test_json_endpoint_and_history_ring(server):
    time.sleep(0.3)  # several samples at 0.05 s
    status, headers, body = get(server.url + ".json")
    assert status == 200 and headers["Content-Type"] == "application/json"
    data = json.loads(body)
    assert data["messages"] == 5 and data["verdicts"]["spam"] == 3
    points = data["history"]["points"]
    assert 2 <= len(points) <= 4  # bounded ring
    assert points[0]["messages"] == 5 and points[-1]["messages_per_s"] == 0.0  # nothing new since start
    assert data["messages_per_s"] == data["messages_per_s_avg"]  # under 1 s of history: the lifetime average


def test_history_rate_over_recent_samples():
    counts = iter([10, 40])
    history = web.History(lambda: {"messages": next(counts), "messages_per_s_avg": 1.0, "stages": {},
                                   "cache": {"hit_rate": None}, "writer_queue_depth": 0, "pool_in_flight": 0,
                                   "errors": 0})
    first = history.sample()
    assert first["messages_per_s"] is None
    assert history.rate(10, fallback=1.0) == 1.0  # one sample, too recent: the lifetime average
    history._ring[0]["t"] -= 10.0  # pretend that sample is 10 s old
    second = history.sample()
    assert 2.5 < second["messages_per_s"] < 3.5  # 30 messages in ~10 s
    assert 2.5 < history.rate(40, fallback=0.0) < 3.5


def test_page_is_self_contained_and_locked_down(server):
    status, headers, body = get(server.url)
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    page = body.decode()
    assert not re.search(r"<(link|img|iframe)\b|\bsrc=|@import|url\(", page), "external asset in the page"
    assert re.findall(r"https?://[^\s\"'<>]+", page) == ["http://www.w3.org/2000/svg"]  # the SVG namespace only
    csp = headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "'unsafe-inline'" not in csp
    assert headers["X-Content-Type-Options"] == "nosniff" and headers["Cache-Control"] == "no-store"
    assert "innerHTML" not in page  # figures go in as text, never as markup
    status, headers, _ = get(server.url.replace("/performance", "/"))
    assert status == 200  # urllib follows the redirect to /performance


def test_unknown_path_is_404(server):
    assert get(server.url.replace("/performance", "/etc/passwd"))[0] == 404


def test_foreign_host_header_refused_without_token(server):
    assert get(server.url + ".json", {"Host": "attacker.example"})[0] == 403
    assert get(server.url + ".json", {"Host": f"localhost:{server.port}"})[0] == 200


def test_non_loopback_needs_a_token():
    with pytest.raises(AtlasError, match=r"--http 0\.0\.0\.0:0: a non-loopback address needs a token"):
        web.start_http_server("0.0.0.0", 0, lambda: {})


def test_token_required_when_set():
    info = web.performance_info(recorded_metrics(), store_stats=lambda: None)
    with web.start_http_server("127.0.0.1", 0, info, token="s3cret") as srv:
        assert get(srv.url + ".json")[0] == 401
        assert get(srv.url + ".json", {"Authorization": "Bearer wrong"})[0] == 401
        assert get(srv.url + ".json", {"Authorization": "Bearer s3cret"})[0] == 200
        assert get(srv.url + ".json?token=s3cret")[0] == 200
        assert get(srv.url + "?token=s3cret")[0] == 200
        # With a token the Host check is not needed (and would break reverse proxies).
        assert get(srv.url + ".json?token=s3cret", {"Host": "stats.example.org"})[0] == 200


def test_bind_failure_is_one_line_error(server):
    with pytest.raises(AtlasError, match=r"--http 127\.0\.0\.1:\d+: cannot listen"):
        web.start_http_server("127.0.0.1", server.port, lambda: {})


def test_ipv6_loopback():
    info = web.performance_info(recorded_metrics(), store_stats=lambda: None)
    try:
        srv = web.start_http_server("::1", 0, info)
    except AtlasError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    with srv:
        assert srv.url.startswith("http://[::1]:")
        assert get(srv.url + ".json")[0] == 200


def _blocked_signals(tid: int) -> int:
    with open(f"/proc/self/task/{tid}/status") as fh:
        return int(re.search(r"^SigBlk:\s*([0-9a-f]+)", fh.read(), re.M).group(1), 16)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_server_threads_block_stop_signals(server):
    # libmilter's sigwait thread must be the one to see SIGTERM/SIGHUP, the reload thread
    # SIGUSR1, never ours.
    threads = [t for t in threading.enumerate() if t.name.startswith("atlas-http")]
    assert threads
    for t in threads:
        mask = _blocked_signals(t.native_id)
        for sig in (15, 2, 1, 10):
            assert mask & (1 << (sig - 1)), f"{t.name} does not block signal {sig}"
    assert not _blocked_signals(threading.main_thread().native_id) & (1 << 14)  # the caller's mask is restored


def test_model_version_follows_the_file(tmp_path):
    from atlas_milter.classifier import load_model, save_model

    default = web.ModelVersion(lambda: "")()
    assert default == load_model(None).version
    path = tmp_path / "m.json"
    assert web.ModelVersion(lambda: str(path))() == "unavailable"
    model = load_model(None)
    save_model(model, path)
    probe = web.ModelVersion(lambda: str(path))
    assert probe() == model.version
    path.write_text("not a model")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert probe().startswith("unreadable")


# --- CLI and config --------------------------------------------------------------------

def test_http_flag_on_daemon_commands():
    parser = build_parser()
    assert parser.parse_args(["milter", "--http", "127.0.0.1:8080"]).http == "127.0.0.1:8080"
    assert parser.parse_args(["idle", "--http", "[::1]:8080"]).http == "[::1]:8080"


def test_http_config_section(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[http]\nlisten = "[::1]:9090"\ntoken = "t"\n')
    config = load_config(cfg, env={})
    assert config.http.address() == ("::1", 9090) and config.http.token == "t"
    assert load_config(None, {"http.listen": "127.0.0.1:0"}, env={}).http.address() == ("127.0.0.1", 0)
    with pytest.raises(ConfigError, match=r"\[http\] listen: 'nonsense': use HOST:PORT"):
        load_config(None, {"http.listen": "nonsense"}, env={})


def test_performance_page_context():
    config = load_config(None, {"http.listen": "127.0.0.1:0"}, env={})
    with _performance_page(config) as srv:
        assert get(srv.url + ".json")[0] == 200
    off = load_config(None, {}, env={})
    with _performance_page(off) as srv:
        assert srv is None


def test_milter_refuses_public_http_without_token(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "atlas_milter", "milter", "--socket", "inet:1@127.0.0.1", "--db", str(tmp_path / "x.db"),
         "--http", "0.0.0.0:8080"],
        capture_output=True, text=True, timeout=30, cwd=tmp_path,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "Error: --http 0.0.0.0:8080: a non-loopback address needs a token ([http] token_file)"
    )
