"""StatsD end to end with the real npm `statsd` daemon: `atlas-milter classify` (and the milter
behind a real Postfix) send their stage timers and counters, read back from the daemon's
admin port with the right counts. Also: every metric the Grafana dashboard queries is one
the code emits (names taken from the constants, so a renamed metric breaks this test)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
import uuid
from importlib import resources
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "conf" / "grafana-dashboard.json"
# Where metric names are defined, as NAME = "value" constants (see architecture.md, habit 6).
METRIC_MODULES = ["atlas_milter/monitor.py", "atlas_milter/store.py", "atlas_milter/adapters/milter/metrics.py",
                  "atlas_milter/reload.py"]
CONSTANT = re.compile(r'^(STAGE|COUNTER|GAUGE)_[A-Z0-9_]+\s*=\s*"([^"]+)"', re.M)
# StatsD timer aggregates (npm statsd 0.9, percentThreshold [50, 95, 99]) and counter suffixes
# (graphite backend, legacyNamespace false).
TIMER_SUFFIXES = {"count", "count_ps", "mean", "median", "upper", "lower", "sum", "std"} | {
    f"{k}_{p}" for k in ("upper", "mean", "sum") for p in (50, 95, 99)}
COUNTER_SUFFIXES = {"rate", "count"}
KINDS = {"STAGE": "timers", "COUNTER": "counters", "GAUGE": "gauges"}


def emitted_metrics() -> dict[str, set[str]]:
    """{"timers"|"counters"|"gauges": {name or "prefix." ...}} from the constants."""
    found: dict[str, set[str]] = {"timers": set(), "counters": set(), "gauges": set()}
    for rel in METRIC_MODULES:
        path = ROOT / rel
        if path.exists():
            for kind, name in CONSTANT.findall(path.read_text()):
                found[KINDS[kind]].add(name)
    return found


def sample_dir():
    return resources.as_file(resources.files("atlas_milter").joinpath("data", "sample"))


# --- the dashboard --------------------------------------------------------------------

def dashboard_targets() -> list[str]:
    data = json.loads(DASHBOARD.read_text())
    targets = []
    for panel in data["panels"]:
        for t in panel.get("targets", []):
            targets.append(t["target"])
    return targets


def test_dashboard_is_valid_grafana_json():
    data = json.loads(DASHBOARD.read_text())
    assert data["title"] == "atlas-milter" and data["panels"]
    assert "legacyNamespace" in data["description"] and "percentThreshold" in data["description"]
    titles = " ".join(p["title"].lower() for p in data["panels"])
    for topic in ("throughput", "verdicts", "cache hit rate", "writer queue", "errors", "latency"):
        assert topic in titles, topic
    ids = [p["id"] for p in data["panels"]]
    assert len(ids) == len(set(ids))
    for p in data["panels"]:
        if p["type"] != "row":
            assert p["datasource"]["type"] == "graphite" and p["targets"], p["title"]


def test_dashboard_metrics_are_emitted():
    emitted = emitted_metrics()
    assert {"total", "parse", "classify"} <= emitted["timers"] and "verdict." in emitted["counters"]
    paths = [m for t in dashboard_targets()
             for m in re.findall(r"stats\.(timers|counters|gauges)\.\$prefix\.([A-Za-z0-9_.*]+)", t)]
    assert len(paths) >= 30
    for kind, path in paths:
        if kind == "gauges":
            name = path
        else:
            name, _, suffix = path.rpartition(".")
            allowed = TIMER_SUFFIXES if kind == "timers" else COUNTER_SUFFIXES
            assert suffix in allowed, f"{kind} {path}: .{suffix} is not a StatsD aggregate"
        ok = name in emitted[kind] or any(
            name.startswith(prefix) and re.fullmatch(r"\*|[a-z_]+", name[len(prefix):])
            for prefix in emitted[kind] if prefix.endswith("."))
        assert ok, f"dashboard queries {kind} {name!r}, which the code never emits"
    # And every stage the pipeline times has a latency panel.
    timed = {p for k, p in paths if k == "timers"}
    for stage in ("total", "parse", "classify", "cache", "store.flush"):
        assert f"{stage}.upper_95" in timed, stage


# --- classify → StatsD ----------------------------------------------------------------

def test_classify_sends_timers_and_counters(statsd_daemon, tmp_path):
    prefix = f"atlas_e2e_{uuid.uuid4().hex[:8]}"  # the daemon is shared by the session
    cfg = tmp_path / "atlas.toml"
    cfg.write_text(f'[statsd]\nhost = "127.0.0.1"\nport = {statsd_daemon.udp_port}\nprefix = "{prefix}"\n'
                   "[features]\nparallel = false\n")
    with sample_dir() as folder:
        proc = subprocess.run(
            [sys.executable, "-m", "atlas_milter", "classify", "--config", str(cfg), "--db", str(tmp_path / "v.db"),
             str(folder), str(folder)],  # twice: the second pass is all cache hits
            capture_output=True, text=True, timeout=60, cwd=tmp_path,
        )
    assert proc.returncode == 0, proc.stderr
    verdicts = re.findall(r": (SPAM|HAM|UNSURE) score=", proc.stdout)
    assert len(verdicts) == 24
    expected = {k.lower(): verdicts.count(k) for k in set(verdicts)}

    counters = statsd_daemon.wait_for("counters", f"{prefix}.verdict.spam")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # the last datagrams may trail the first one
        counters = statsd_daemon.counters()
        if sum(counters.get(f"{prefix}.verdict.{k}", 0) for k in expected) == 24:
            break
        time.sleep(0.1)
    for kind, n in expected.items():
        assert counters.get(f"{prefix}.verdict.{kind}") == n, (kind, counters)
    assert counters.get(f"{prefix}.cache.miss") == 12 and counters.get(f"{prefix}.cache.hit") == 12
    assert counters.get(f"{prefix}.store.rows_written") == 24
    assert counters.get(f"{prefix}.store.commits", 0) >= 1
    assert not counters.get(f"{prefix}.statsd.errors")

    counts = statsd_daemon.timer_counts()
    assert counts.get(f"{prefix}.total") == 24
    assert counts.get(f"{prefix}.parse") == 12 and counts.get(f"{prefix}.classify") == 12  # misses only
    assert counts.get(f"{prefix}.cache") == 24
    assert counts.get(f"{prefix}.store.flush", 0) >= 1
    timers = statsd_daemon.timers()
    assert all(v >= 0 for v in timers[f"{prefix}.total"])


# --- Postfix → milter → StatsD (and the milter's /performance.json) ----------------------

def test_milter_through_postfix_sends_metrics(statsd_daemon, postfix, tmp_path_factory):
    from tests.support.servers import free_port
    from tests.support.milter_process import inet_spec, MilterProcess, wait_milter_active
    from tests.support.smtp import new_token, send_one, with_token

    workdir = tmp_path_factory.mktemp("statsd-milter")
    prefix = f"atlas_milter_e2e_{uuid.uuid4().hex[:8]}"
    http_port = free_port()
    lib_spec, postfix_spec = inet_spec(free_port())
    config = (f'[statsd]\nhost = "127.0.0.1"\nport = {statsd_daemon.udp_port}\nprefix = "{prefix}"\n'
              f'[http]\nlisten = "127.0.0.1:{http_port}"\n')
    with sample_dir() as folder:
        mails = [p.read_bytes() for p in sorted(Path(folder).iterdir())[:6]]
    proc = MilterProcess(workdir, lib_spec, config_text=config, name="statsd").start()
    try:
        with postfix.milter_set(postfix_spec, default_action="tempfail"):
            wait_milter_active(postfix, mails[0])
            tokens = []
            for raw in mails:
                tok = new_token()
                tokens.append(tok)
                code, text = send_one(postfix.host, postfix.smtp_port, with_token(raw, tok), [postfix.user])
                assert code == 250, text
            for tok in tokens:
                postfix.wait_for_message(tok, timeout=30)

        # The milter's own figures, live from its /performance.json ([http] listen): the truth
        # StatsD must match once the flusher (1 s) has sent everything.
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/performance.json", timeout=5) as r:
            live = json.load(r)
        seen = live["counters"]["milter.messages"]
        assert seen >= len(mails) + 1  # ours and the probe(s)
        assert live["messages"] == sum(live["verdicts"].values()) == seen  # one verdict per message

        def counter(name: str) -> float:
            return statsd_daemon.counters().get(f"{prefix}.{name}", 0)

        deadline = time.monotonic() + 10
        while counter("milter.messages") < seen and time.monotonic() < deadline:
            time.sleep(0.1)
        assert counter("milter.messages") == seen
        counters = statsd_daemon.counters()
        for kind, n in live["verdicts"].items():
            assert counters.get(f"{prefix}.verdict.{kind}") == n, kind
        counts = statsd_daemon.timer_counts()
        assert counts.get(f"{prefix}.milter.eom") == seen
        assert counts.get(f"{prefix}.total") == seen
        assert counts.get(f"{prefix}.parse", 0) >= 1
    finally:
        assert proc.stop() == 0, proc.log()[-3000:]


# --- a refused reload reaches StatsD (the alert) -------------------------------------------

def test_milter_reload_outcome_reaches_statsd(statsd_daemon, tmp_path):
    import os
    import signal

    from tests.support.milter_process import MilterProcess

    prefix = f"atlas_reload_e2e_{uuid.uuid4().hex[:8]}"
    model = tmp_path / "model.json.gz"
    with resources.as_file(resources.files("atlas_milter").joinpath("data", "default-model.json.gz")) as shipped:
        good = Path(shipped).read_bytes()
    model.write_bytes(good)
    config = (f'[statsd]\nhost = "127.0.0.1"\nport = {statsd_daemon.udp_port}\nprefix = "{prefix}"\n'
              f'[classifier]\nmodel = "{model}"\n')
    proc = MilterProcess(tmp_path, f"unix:{tmp_path / 'm.sock'}", config_text=config, name="reload-statsd").start()
    try:
        def gauge() -> float | None:
            return statsd_daemon.gauges().get(f"{prefix}.reload.failing")

        assert statsd_daemon.wait_for("gauges", f"{prefix}.reload.failing") == 0  # there from the start
        model.write_bytes(good[:1000])  # a copy cut short
        os.kill(proc.pid, signal.SIGUSR1)
        assert statsd_daemon.wait_for("counters", f"{prefix}.reload.failed", timeout=10) == 1
        deadline = time.monotonic() + 5
        while gauge() != 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert gauge() == 1
        model.write_bytes(good)
        os.kill(proc.pid, signal.SIGUSR1)
        assert statsd_daemon.wait_for("counters", f"{prefix}.reload.ok", timeout=10) == 1
        deadline = time.monotonic() + 5
        while gauge() != 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert gauge() == 0
        assert proc.alive()
    finally:
        assert proc.stop() == 0, proc.log()[-3000:]
    assert "milter reload failed" in proc.log() and "Traceback" not in proc.log()
