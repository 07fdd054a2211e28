"""The crafted hostile messages of tests/test_hostile_input.py (imported, not copied), sent over
SMTP through the real Postfix and a real milter process (issue 7: "each is classified within a
time and memory bound"). test_hostile_input drives the milter's callbacks in-process; here the
bytes go the way mail goes: smtplib -> Postfix smtpd/cleanup -> libmilter -> AtlasMilter.

Postfix's message_size_limit (10 MB by default) is raised to 64 MB for this module (and
virtual_mailbox_limit with it), so the 50 MB messages reach the milter too. For each message: the client gets 250 and the delivered
copy carries a real verdict (spam/ham/unsure, never "unchecked"), or 550 with the reference
id (spam_action = "reject"); the milter's own end-of-message time stays within its deadline;
the milter process is still alive; its peak resident memory (VmHWM) stays within a bound.
"""

from __future__ import annotations

import json
import re
import shutil
import time
import urllib.request
from pathlib import Path

import pytest

from tests.support.servers import free_port
from tests.test_hostile_input import CRAFTED
from tests.support.milter_process import milter_workdir, MilterProcess, unix_spec, wait_milter_active
from tests.support.smtp import new_token, send_one, with_token

pytestmark = pytest.mark.integration

SIZE_LIMIT = 64 * 1024 * 1024
DEADLINE_S = 5.0  # [milter] timeout (the default)
RSS_BOUND_KB = 150 * 1024  # peak RSS beyond the warm milter's (the analysis cap is 512 KiB a message)
HAM = (b"From: Alice <alice@friends.test>\r\nTo: user@example.test\r\nSubject: lunch on friday\r\n"
       b"Message-ID: <probe@friends.test>\r\n\r\nShall we meet at noon at the usual place?\r\n")


def proc_status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def eom_max_ms(http_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/performance.json", timeout=5) as resp:
        return json.load(resp)["stages"]["milter.eom"]["max"]


@pytest.fixture(scope="module")
def hostile_milter(postfix):
    """A milter process (spam rejected, /performance.json on loopback) behind the session
    Postfix, whose size limit is raised for the module and put back afterwards."""
    work = milter_workdir("atlas-hostile-pf-")
    http_port = free_port()
    milter = MilterProcess(work, unix_spec(work / "m.sock")[0], name="hostile", config_text=(
        f'[milter]\nsocket_mode = 0o666\nspam_action = "reject"\ntimeout = {DEADLINE_S}\n'
        f'[http]\nlisten = "127.0.0.1:{http_port}"\n[statsd]\nenabled = false\n'))
    milter.start()
    # virtual(8) refuses to start when its mailbox limit is below the message size limit.
    postfix.postconf(message_size_limit=str(SIZE_LIMIT), virtual_mailbox_limit=str(2 * SIZE_LIMIT))
    try:
        with postfix.milter_set(milter.socket_spec, default_action="tempfail"):
            wait_milter_active(postfix, HAM)
            yield milter, http_port, proc_status(milter.pid)["VmRSS"]
    finally:
        # Postfix's defaults, as the other tests saw them
        postfix.postconf(message_size_limit="10240000", virtual_mailbox_limit="51200000")
        postfix.reload()
        rc = milter.stop()
        log = milter.log()
        shutil.rmtree(work, ignore_errors=True)
    assert rc == 0, log[-3000:]
    assert "Traceback" not in log


@pytest.mark.parametrize("name", list(CRAFTED))
def test_hostile_message_through_postfix(name, postfix, hostile_milter):
    milter, http_port, warm_rss = hostile_milter
    token = new_token()
    raw = with_token(CRAFTED[name](), token)
    t0 = time.monotonic()
    code, text = send_one(postfix.host, postfix.smtp_port, raw, [postfix.user], timeout=120)
    took = time.monotonic() - t0
    raw = None  # the 50 MB ones: let them go before the next parametrised run

    assert milter.alive(), f"{name}: the milter died\n{milter.log()[-3000:]}"
    assert code in (250, 550), f"{name}: {code} {text}"
    if code == 550:
        assert re.search(r"ref [0-9A-F]{10}", text), text
        assert not [p for p in postfix.mailbox_messages() if token.encode() in p.read_bytes()]
    else:
        (path,) = postfix.wait_for_message(token, timeout=60)
        data = path.read_bytes()
        path.unlink()
        verdict = re.search(rb"\nX-Atlas-Verdict: (\w+)", data)
        assert verdict and verdict.group(1) in (b"spam", b"ham", b"unsure"), f"{name}: {verdict}"
    # The milter's own time from end of message to its reply, worst so far.
    assert eom_max_ms(http_port) <= DEADLINE_S * 1000, name
    # The whole SMTP transaction, 50 MB over loopback included: bounded, not just "eventually".
    assert took <= 60, f"{name}: {took:.1f} s"
    # Peak resident memory of the milter so far (VmHWM), against the warm milter's.
    after = proc_status(milter.pid)
    assert after["VmHWM"] - warm_rss <= RSS_BOUND_KB, (name, warm_rss, after)
    print(f"\n{name}: {code} in {took:.2f} s; milter RSS {after['VmRSS']} kB, peak {after['VmHWM']} kB (warm {warm_rss} kB)")
