"""The quarantine and the console end to end: a real Postfix, the milter (a real subprocess)
with spam_action = "quarantine" and its console on HTTP. Spam sent through Postfix lands in
the hold queue; the command line and the pages find each message by its reference and show
its reasons (headless Chromium renders the quarantine and a decision, screenshots kept); one
is released from the page (the form's POST, with its CSRF token) and delivered exactly once, one is released and
learned as ham from the page (the milter reloads onto the new model and the same message
then scores ham), one is deleted from the command line and never delivered. Then the
milter is reloaded with spam_action = "reject", and a refused message is found by the
reference in its 550 reply, from the command line and from the page, in one step."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path
from urllib.parse import urlencode

import pytest

from tests.support.requirements import require_binary
from tests.test_web_chromium import run_chromium
from tests.support.milter_process import MilterProcess, milter_workdir, unix_spec, wait_milter_active
from tests.support.servers import free_port, wait_until
from tests.support.smtp import new_token, send_one, with_token

pytestmark = pytest.mark.integration

TOKEN = "console-e2e-token"
SAMPLE = resources.files("atlas_milter").joinpath("data", "sample")
SPAM = ["07-crypto-scam.eml", "09-phishing.eml", "10-lottery.eml"]
HAM = "03-family.eml"


def cli(proc: MilterProcess, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "atlas_milter", *args, "--config", str(proc.config_path),
                           "--db", str(proc.db)], capture_output=True, text=True, timeout=60)


class Browser:
    """An HTTP client that keeps the console's session cookie, as a browser would."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.cookie = ""

    def request(self, method: str, path: str, form: dict | None = None) -> tuple[int, dict, str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        headers = {"Cookie": self.cookie} if self.cookie else {}
        body = None
        if form is not None:
            body = urlencode(form)
            headers.update({"Content-Type": "application/x-www-form-urlencoded",
                            "Origin": f"http://127.0.0.1:{self.port}"})
        try:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            result = resp.status, dict(resp.getheaders()), resp.read().decode()
        finally:
            conn.close()
        if "Set-Cookie" in result[1]:
            self.cookie = result[1]["Set-Cookie"].split(";")[0]
        return result


def chromium_page(chromium: str, tmp_path: Path, port: int, path: str, shot: str) -> str:
    """The page as headless Chromium renders it (logged in with ?token=), and a screenshot
    of it in $ATLAS_ARTEFACTS (else the test's tmp dir)."""
    url = f"http://127.0.0.1:{port}{path}?token={TOKEN}"
    proc = run_chromium(chromium, tmp_path, url, "--dump-dom")
    assert proc.returncode == 0, proc.stderr[-2000:]
    shots = Path(os.environ.get("ATLAS_ARTEFACTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    run_chromium(chromium, tmp_path, url, "--hide-scrollbars", "--window-size=1400,900", f"--screenshot={shots / shot}")
    assert (shots / shot).stat().st_size > 10_000
    return proc.stdout


def fields(page: str) -> dict[str, str]:
    return dict(re.findall(r'<dd data-field="([^"]+)">([^<]*)</dd>', page))


@pytest.fixture
def quarantining(postfix, tmp_path):
    workdir = milter_workdir("atlas-quarantine-")
    port = free_port()
    (workdir / "token").write_text(TOKEN + "\n")
    config = (f"[statsd]\nenabled = false\n[milter]\nsocket_mode = 0o666\nspam_action = \"quarantine\"\n"
              f"[quarantine]\npostfix_config = \"{postfix.conf_dir}\"\n"
              f"[http]\nlisten = \"127.0.0.1:{port}\"\ntoken_file = \"{workdir / 'token'}\"\n")
    lib, _ = unix_spec(workdir / "q.sock")
    proc = MilterProcess(workdir, lib, config_text=config, name="q").start()
    try:
        with postfix.milter_set(proc.socket_spec):
            wait_milter_active(postfix, (SAMPLE / HAM).read_bytes())
            yield proc, port
    finally:
        proc.stop()
        postfix.delete_held()  # leave the session's Postfix as we found it


def test_quarantine_release_learn_delete_and_the_reject_reference(postfix, quarantining, tmp_path):
    proc, port = quarantining
    tokens = {}
    for name in SPAM:
        tokens[name] = new_token()
        code, text = send_one(postfix.host, postfix.smtp_port, with_token((SAMPLE / name).read_bytes(), tokens[name]),
                              [postfix.user])
        assert code == 250, text
    wait_until(lambda: len(postfix.held_ids()) == 3, timeout=30, what="three messages on hold")

    # The command line: every held message beside the decision that held it.
    def listing() -> list[dict]:
        out = cli(proc, "quarantine", "list", "--json", "--postfix-config", str(postfix.conf_dir))
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    # The records reach the database in the writer's next batch (at most a second or two).
    wait_until(lambda: all(e["decision_id"] for e in listing()), timeout=20, what="the decisions recorded")
    listed = listing()
    assert {e["queue_id"] for e in listed} == postfix.held_ids()
    for entry in listed:
        assert entry["verdict"] == "spam" and entry["score"] >= 0.9 and entry["reasons"] and entry["ref"]
    entries = {name: next(e for e in listed if tokens[name] in cli(proc, "quarantine", "show", e["queue_id"]).stdout)
               for name in SPAM}
    release, learn, delete = (entries[name] for name in SPAM)

    # The pages: the session cookie from ?token=, the search box finds the decision by its reference.
    browser = Browser(port)
    assert browser.request("GET", "/quarantine")[0] == 401
    status, headers, _ = browser.request("GET", f"/quarantine?token={TOKEN}")
    assert status == 303 and browser.cookie
    status, headers, _ = browser.request("GET", f"/history?q={release['ref']}")
    assert status == 303 and headers["Location"] == f"/decision/{release['decision_id']}"
    status, _, page = browser.request("GET", headers["Location"])
    assert status == 200 and fields(page)["action"] == "quarantine" and fields(page)["reference"] == release["ref"]
    assert release["reasons"][0][0] in page
    status, _, page = browser.request("GET", "/quarantine")
    csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', page).group(1)
    for entry in listed:
        assert f'data-queue-id="{entry["queue_id"]}"' in page

    # The same two pages in headless Chromium (screenshots kept): each held message with its
    # reference and strongest reason, and the decision with every reason.
    chromium = require_binary("chromium")
    dom = chromium_page(chromium, tmp_path, port, "/quarantine", "quarantine-postfix.png")
    for entry in listed:
        row = re.search(rf'<tr data-queue-id="{entry["queue_id"]}">.*?</tr>', dom, re.S).group(0)
        assert entry["ref"] in row and entry["reasons"][0][0] in row
    dom = chromium_page(chromium, tmp_path, port, f"/decision/{release['decision_id']}", "decision-postfix.png")
    assert len(re.findall(r'<td class="num">[+-]\d\.\d{3}</td>', dom)) == len(release["reasons"])

    # Release from the page: delivered, exactly once.
    status, headers, _ = browser.request("POST", f"/quarantine/{release['queue_id']}/release", {"csrf": csrf})
    assert status == 303, headers
    postfix.wait_for_message(tokens[SPAM[0]], timeout=30)
    assert release["queue_id"] not in postfix.held_ids()

    # Release and learn from the page: delivered, the milter reloads, the same message scores ham.
    status, headers, _ = browser.request("POST", f"/quarantine/{learn['queue_id']}/learn", {"csrf": csrf})
    assert status == 303, headers
    postfix.wait_for_message(tokens[SPAM[1]], timeout=30)
    wait_until(lambda: "milter reloaded" in proc.log(), timeout=20, what="the milter's reload after learning")
    again = new_token()
    code, _ = send_one(postfix.host, postfix.smtp_port, with_token((SAMPLE / SPAM[1]).read_bytes(), again),
                       [postfix.user])
    assert code == 250
    (delivered,) = postfix.wait_for_message(again, timeout=30)
    head = delivered.read_bytes().split(b"\n\n", 1)[0]
    assert b"X-Atlas-Verdict: ham" in head, head.decode(errors="replace")

    # Delete from the command line: gone from the queue, never delivered.
    out = cli(proc, "quarantine", "delete", delete["queue_id"], "--postfix-config", str(postfix.conf_dir))
    assert out.returncode == 0, out.stderr
    assert delete["queue_id"] not in postfix.held_ids()
    out = cli(proc, "quarantine", "delete", delete["queue_id"], "--postfix-config", str(postfix.conf_dir))
    assert out.returncode == 1 and out.stderr.strip().startswith("Error: ") and "not in the postfix hold queue" in out.stderr
    time.sleep(2)  # a queue run or two: nothing of it may arrive
    assert not [p for p in postfix.mailbox_messages() if tokens[SPAM[2]].encode() in p.read_bytes()]
    assert len(postfix.wait_for_message(tokens[SPAM[0]])) == 1  # the released one still once

    # Every action recorded, with who did it.
    status, _, page = browser.request("GET", "/quarantine")
    assert page.count("token from 127.0.0.1") == 2 and "release+learn" in page and "delete" in page
    out = cli(proc, "quarantine", "list", "--postfix-config", str(postfix.conf_dir))
    assert out.returncode == 0 and out.stdout.strip().endswith("nothing held")

    # Reject by policy: the reference of the 550 reply finds the decision, on both sides.
    proc.config_path.write_text(proc.config_path.read_text().replace('spam_action = "quarantine"',
                                                                      'spam_action = "reject"'))
    reloads = proc.log().count("milter reloaded")
    proc.proc.send_signal(signal.SIGUSR1)
    wait_until(lambda: proc.log().count("milter reloaded") > reloads, timeout=20, what="the reload to reject")
    code, text = send_one(postfix.host, postfix.smtp_port, with_token((SAMPLE / SPAM[2]).read_bytes(), new_token()),
                          [postfix.user])
    assert code == 550, text
    ref = re.search(r"ref ([0-9A-Z]+)", text).group(1)
    wait_until(lambda: cli(proc, "explain", ref).returncode == 0, timeout=10, what="the rejected decision recorded")
    out = cli(proc, "explain", ref)
    assert "action        reject" in out.stdout and f"reference     {ref}" in out.stdout
    assert re.search(r"\n +\+\d\.\d{3}  \S", out.stdout)
    status, headers, _ = browser.request("GET", f"/history?q={ref.lower()}")
    assert status == 303
    status, _, page = browser.request("GET", headers["Location"])
    assert fields(page)["action"] == "reject" and fields(page)["reference"] == ref
    assert re.fullmatch(r"\d+\.\d ms: parse [\d.]+ ms, classify [\d.]+ ms, rest [\d.]+ ms", fields(page)["time taken"])
    assert re.search(r'<td class="num">\+\d\.\d{3}</td><td>', page)
