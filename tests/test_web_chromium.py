"""/performance in a real browser: headless Debian Chromium loads the page from the
in-process server, the inline script fetches /performance.json and fills the figures, and
the rendered DOM agrees with the JSON. The metrics are real: the shipped sample mailbox
goes through a Pipeline first.

Set ATLAS_WEB_SCREENSHOT=/tmp/performance.png to also save a screenshot of the page."""

from __future__ import annotations

import json
import os
import re
import subprocess
import urllib.request
from html.parser import HTMLParser
from importlib import resources
from pathlib import Path

import pytest

from tests.support.requirements import require_binary

from atlas_milter import web
from atlas_milter.config import load_config
from atlas_milter.monitor import PerformanceMetrics
from atlas_milter.pipeline import Pipeline
from atlas_milter.sources import LocalSource

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--virtual-time-budget=5000",
]


class _Figures(HTMLParser):
    """Text of every element with an id, and the cells of each stage row."""

    def __init__(self) -> None:
        super().__init__()
        self.by_id: dict[str, str] = {}
        self.attrs_by_id: dict[str, dict] = {}
        self.stages: dict[str, list[str]] = {}
        self.hosts: dict[str, list[str]] = {}
        self._rows = self.stages  # the table of the open row
        self._open: list[tuple[str | None, str | None]] = []  # (id, stage) per open element
        self._row: str | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if a.get("id"):
            self.by_id.setdefault(a["id"], "")
            self.attrs_by_id[a["id"]] = a
        if tag == "tr" and (a.get("data-stage") or a.get("data-host")):
            self._row = a.get("data-stage") or a["data-host"]
            self._rows = self.stages if a.get("data-stage") else self.hosts
            self._rows[self._row] = []
        if tag == "td" and self._row is not None:
            self._rows[self._row].append("")
        if tag not in ("br", "meta", "input"):
            self._open.append((a.get("id"), tag))

    def handle_endtag(self, tag):
        if tag == "tr":
            self._row = None
        while self._open:
            _, t = self._open.pop()
            if t == tag:
                break

    def handle_data(self, data):
        for ident, _ in self._open:
            if ident:
                self.by_id[ident] += data
        if self._row is not None and self._open and self._open[-1][1] == "td":
            self._rows[self._row][-1] += data


def run_chromium(binary: str, tmp: Path, url: str, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HOME=str(tmp), XDG_CONFIG_HOME=str(tmp / "xdg"), XDG_CACHE_HOME=str(tmp / "xdg"))
    return subprocess.run([binary, *CHROMIUM_FLAGS, f"--user-data-dir={tmp / 'profile'}", *extra, url],
                          capture_output=True, text=True, timeout=90, env=env)


@pytest.fixture
def live_server(tmp_path):
    metrics = PerformanceMetrics.get_instance()
    metrics.reset()
    config = load_config(None, {"store.db": str(tmp_path / "v.db"), "statsd.enabled": False,
                                "features.parallel": False}, env={})
    pipeline = Pipeline(config)
    try:
        with resources.as_file(resources.files("atlas_milter").joinpath("data", "sample")) as folder:
            for _ in range(3):  # rounds 2 and 3 are cache hits
                pipeline.process_source(LocalSource(), str(folder), lambda r: pipeline.record(r, source="web-test"))
        pipeline.flush()
        info = web.performance_info(metrics, model_version=web.ModelVersion(lambda: ""))
        with web.start_http_server("127.0.0.1", 0, info, sample_interval=0.2) as srv:
            yield srv
    finally:
        pipeline.close()


def test_page_renders_the_live_figures(live_server, tmp_path):
    chromium = require_binary("chromium")
    proc = run_chromium(chromium, tmp_path, live_server.url, "--dump-dom")
    assert proc.returncode == 0, proc.stderr[-2000:]
    with urllib.request.urlopen(live_server.url + ".json", timeout=5) as r:
        data = json.load(r)
    page = _Figures()
    page.feed(proc.stdout)

    # The script ran, fetched the JSON and rendered it (not the static placeholders).
    assert page.attrs_by_id["state"].get("data-state") == "live", page.by_id.get("state")
    assert data["messages"] == 36  # 12 sample messages, three rounds
    assert page.by_id["messages"].strip() == str(data["messages"])
    for kind in ("spam", "unsure", "ham"):
        assert page.by_id[f"verdict-{kind}"].strip() == str(data["verdicts"].get(kind, 0)), kind
    assert sum(data["verdicts"].values()) == data["messages"]
    assert page.by_id["cache"].strip() == f"{data['cache']['hit_rate'] * 100:.1f} %"
    assert page.by_id["model"].strip() == data["model_version"] != ""
    assert page.by_id["errors"].strip() == str(data["errors"]) == "0"
    assert page.by_id["queue"].strip() == str(data["writer_queue_depth"])
    # One table row per stage, with the JSON's count and p95.
    assert set(page.stages) == set(data["stages"]) >= {"total", "parse", "classify", "cache", "store.flush"}
    for name, cells in page.stages.items():
        assert cells[0] == name
        assert cells[1] == str(data["stages"][name]["count"])
        assert float(cells[3]) == pytest.approx(data["stages"][name]["p95"], abs=0.06, rel=0.01)
    # The charts were drawn from the history ring (several samples at 0.2 s by now).
    assert re.search(r'<svg[^>]*id="rate-chart"[^>]*>\s*<polygon', proc.stdout)

    shot = os.environ.get("ATLAS_WEB_SCREENSHOT")
    if shot:
        proc = run_chromium(chromium, tmp_path, live_server.url, "--hide-scrollbars", "--window-size=1280,720",
                            f"--screenshot={shot}")
        assert proc.returncode == 0 and Path(shot).stat().st_size > 10_000, proc.stderr[-2000:]


def test_with_a_shared_store_the_page_shows_every_host(live_server, tmp_path, postgres, monkeypatch):
    """[store] url: the shipper's summary of every host's last hour in PostgreSQL is a table
    on the page, this host marked."""
    from atlas_milter import pg_ship
    from atlas_milter.migrate import apply_migrations
    from atlas_milter.store import DirectRecordWriter

    from atlas_milter import cluster_sync

    chromium = require_binary("chromium")
    monkeypatch.setattr(pg_ship, "_current", None)  # whatever another test left: this test sets it
    monkeypatch.setattr(cluster_sync, "_current", None)
    shippers = []
    for host, n_spam, n_ham in (("mx1", 3, 5), ("mx2", 1, 2)):
        db = tmp_path / f"{host}.db"
        apply_migrations(db)
        writer = DirectRecordWriter(db)
        for i in range(n_spam + n_ham):
            writer.add_email_record({"source": "milter", "verdict": "spam" if i < n_spam else "ham", "score": 0.5})
        writer.close()
        shipper = pg_ship.Shipper(str(db), postgres.url, host)
        assert shipper.ship_once() == n_spam + n_ham
        shippers.append(shipper)
    hidden = _Figures()
    hidden.feed(run_chromium(chromium, tmp_path, live_server.url, "--dump-dom").stdout)
    assert "hidden" in hidden.attrs_by_id["fleet"] and not hidden.hosts  # no shared store: no table

    this_host = shippers[0]
    this_host.fleet = this_host.refresh_fleet()
    monkeypatch.setattr(pg_ship, "_current", this_host)  # as Shipper.start() registers it in a daemon
    proc = run_chromium(chromium, tmp_path, live_server.url, "--dump-dom")
    page = _Figures()
    page.feed(proc.stdout)
    assert "hidden" not in page.attrs_by_id["fleet"]
    assert page.hosts["mx1"][:5] == ["mx1 (this host)", "8", "3", "8", "3"]
    assert page.hosts["mx2"][:5] == ["mx2", "3", "1", "3", "1"]
    assert "from PostgreSQL" in page.by_id["fleet-sub"]
