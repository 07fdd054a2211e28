"""The console in a real browser: headless Debian Chromium opens /history, /decision/ID,
/quarantine and one held message, logging in with ?token= (the session cookie), and the
history script fills its table from /history.json. The decisions come from hostile
messages run through the real parser and pipeline: subjects and senders carrying <script>,
event handlers, HTML in encoded words, and bidi overrides. No script of theirs may run (the
payloads would change the title or mark the body), no element of theirs may exist, and
their text must be on the page as text, with bidi overrides shown as '?'.

Screenshots of every page are kept in $ATLAS_ARTEFACTS (CI keeps them), else in the test's
tmp dir."""

from __future__ import annotations

import base64
import os
import re
from pathlib import Path

import pytest

from tests.support.console import MemoryQueue, TOKEN
from tests.support.requirements import require_binary
from tests.test_web_chromium import run_chromium

from atlas_milter import web
from atlas_milter.config import load_config
from atlas_milter.console import Console
from atlas_milter.pipeline import Pipeline

PAYLOAD = "document.title='PWNED';document.body.dataset.pwned='1'"


def b64_word(text: str) -> str:
    return f"=?utf-8?b?{base64.b64encode(text.encode()).decode()}?="


HOSTILE_HEADERS = [
    ("Subject", b64_word(f"<script>{PAYLOAD}</script>")),  # HTML in an encoded word
    ("Subject", f'=?iso-8859-1?q?=3Cimg_src=3Dx_onerror=3D=22{PAYLOAD.replace(" ", "_").replace("=", "=3D")}=22=3E?='),
    ("Subject", b64_word("\u202egpj.exe\u202c invoice attached")),  # a right-to-left override
    ("Subject", f'"><svg onload="{PAYLOAD}"><b>bold</b>'),
    ("From", f'"<img src=x onerror={PAYLOAD}>" <evil@spam.example>'),
]


def hostile_message(i: int, name: str, value: str) -> bytes:
    headers = {"From": "Prize Desk <win@spam.example>", "Subject": "You have won!!!"}
    headers[name] = value
    return (f"From: {headers['From']}\nTo: user@example.test\nSubject: {headers['Subject']}\n"
            f"Message-ID: <hostile-{i}@spam.example>\nMIME-Version: 1.0\nContent-Type: text/html\n\n"
            f"<html><body><a href='http://192.0.2.7/claim'>Claim your $1,000,000 prize now!</a></body></html>\n").encode()


@pytest.fixture
def console_server(tmp_path):
    db = tmp_path / "v.db"
    config = load_config(None, {"store.db": str(db), "statsd.enabled": False, "features.parallel": False,
                                "http.show_bodies": True}, env={})
    pipeline = Pipeline(config)
    held = {}
    try:
        for i, (name, value) in enumerate(HOSTILE_HEADERS):
            raw = hostile_message(i, name, value)
            queue_id = f"4QHOST{i:04d}"
            held[queue_id] = raw
            result = pipeline.classify(raw, queue_id)
            pipeline.record(result, source="milter", action="quarantine", queue_id=queue_id, note=f"ref=HOSTREF{i:03d}")
        pipeline.flush()
    finally:
        pipeline.close()
    console = Console(config, MemoryQueue(held))
    with web.start_http_server("127.0.0.1", 0, lambda: {"messages": 0}, token=TOKEN, console=console,
                               sample_interval=60) as srv:
        yield srv, sorted(held)


def artefacts(tmp_path: Path) -> Path:
    path = Path(os.environ.get("ATLAS_ARTEFACTS") or tmp_path / "artefacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


def open_page(chromium: str, tmp_path: Path, srv, path: str, shot: str) -> str:
    sep = "&" if "?" in path else "?"
    url = f"http://127.0.0.1:{srv.port}{path}{sep}token={TOKEN}"
    proc = run_chromium(chromium, tmp_path, url, "--dump-dom")
    assert proc.returncode == 0, proc.stderr[-2000:]
    png = artefacts(tmp_path) / shot
    proc2 = run_chromium(chromium, tmp_path, url, "--hide-scrollbars", "--window-size=1400,900", f"--screenshot={png}")
    assert proc2.returncode == 0 and png.stat().st_size > 10_000, proc2.stderr[-2000:]
    return proc.stdout


def assert_inert(dom: str, scripts: int) -> None:
    title = re.search(r"<title>(.*?)</title>", dom, re.S).group(1)
    assert "PWNED" not in title and title.startswith("atlas-milter")
    assert "data-pwned" not in dom
    assert not re.search(r"<(img|svg|b)\b", dom)  # none of the payloads' elements exist
    assert len(re.findall(r"<script\b", dom)) == scripts
    assert "\u202e" not in dom


def test_hostile_subjects_render_inert_on_every_page(console_server, tmp_path):
    chromium = require_binary("chromium")
    srv, queue_ids = console_server

    dom = open_page(chromium, tmp_path, srv, "/history", "history.png")
    assert_inert(dom, scripts=1)
    # The script ran: one row per decision, the subjects as text.
    rows = re.findall(r'<tr data-id="(\d+)" data-verdict="(\w+)">', dom)
    assert [int(r[0]) for r in rows] == list(range(len(HOSTILE_HEADERS), 0, -1)), dom[-3000:]
    assert f"&lt;script&gt;{PAYLOAD}&lt;/script&gt;" in dom
    assert "?gpj.exe? invoice attached" in dom
    assert "&lt;img src=x onerror=" in dom

    for i in range(1, len(HOSTILE_HEADERS) + 1):
        dom = open_page(chromium, tmp_path, srv, f"/decision/{i}", f"decision-{i}.png")
        assert_inert(dom, scripts=0)
        assert re.search(r'<dd data-field="reference">HOSTREF00\d</dd>', dom)

    dom = open_page(chromium, tmp_path, srv, "/quarantine", "quarantine.png")
    assert_inert(dom, scripts=0)
    assert len(re.findall(r"<tr data-queue-id=", dom)) == len(queue_ids)
    assert dom.count('name="csrf"') == 3 * len(queue_ids)

    dom = open_page(chromium, tmp_path, srv, f"/quarantine/{queue_ids[0]}", "held.png")
    assert_inert(dom, scripts=0)
    assert "Claim your $1,000,000 prize now!" in dom  # show_bodies = true: the body, as text


def test_the_first_history_page_updates_itself(console_server, tmp_path):
    """A decision recorded after the page loaded appears without a reload: the script's
    poll of /history.json picks it up (the server records it right after the first poll)."""
    chromium = require_binary("chromium")
    srv, _ = console_server
    console = srv.httpd.RequestHandlerClass.console
    first_poll = console.history_data
    polls = []

    def history_data(q):
        data = first_poll(q)
        polls.append(len(data["rows"]))
        if len(polls) == 1:  # the page has its first rows: now a new decision arrives
            from atlas_milter.store import DirectRecordWriter

            writer = DirectRecordWriter(console.db)
            writer.add_email_record({"source": "milter", "queue_id": "4QLATE0001", "subject": "arrived later",
                                     "score": 0.01, "verdict": "ham", "action": "tag"})
            writer.close()
        return data

    console.history_data = history_data
    dom = open_page(chromium, tmp_path, srv, "/history", "history-live.png")
    assert len(polls) >= 2, polls
    rows = re.findall(r'<tr data-id="(\d+)"', dom)
    assert rows[0] == str(len(HOSTILE_HEADERS) + 1) and "arrived later" in dom
