"""End to end through a real Postfix on loopback: smtplib → Postfix smtpd → atlas-milter
(a real subprocess on a unix socket) → Maildir. Shared-corpus messages are tagged by
default or rejected with 550 by policy; the verdict rows match what the clients saw;
a killed milter gives Postfix's milter_default_action; a slow classifier gives the
on_error action within the deadline."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.support.corpus import load_corpus, pick
from tests.support.milter_process import db_rows, milter_workdir, MilterProcess, unix_spec, wait_milter_active
from tests.support.smtp import delivered_by_token, header, new_token, send_one, with_token

pytestmark = pytest.mark.integration

BASE_CONFIG = "[statsd]\nenabled = false\n[milter]\nsocket_mode = 0o666\n"
RECEIVED_ID = re.compile(rb"Received: from .*?\n\s+by mx\.atlas\.test \(Postfix\) with E?SMTP id ([0-9A-F]+)", re.S)
SLOW_PRELUDE = (
    "import time, atlas_milter.pipeline as p\n"
    "_analyse = p.analyse\n"
    "p.analyse = lambda *a, **k: (time.sleep(2.0), _analyse(*a, **k))[1]\n"
)


@pytest.fixture(scope="module")
def workdir():
    path = milter_workdir("atlas-milter-e2e-")
    yield path
    import shutil

    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def messages(corpus_dir, corpus_index):
    rows = pick(corpus_index, "test", 50, 50)
    return load_corpus(corpus_dir, rows)


def start_milter(workdir: Path, name: str, extra: str = "", prelude: str = "") -> MilterProcess:
    lib, _ = unix_spec(workdir / f"{name}.sock")
    return MilterProcess(workdir, lib, config_text=BASE_CONFIG + extra, prelude=prelude, name=name).start()


def postfix_spec(proc: MilterProcess) -> str:
    return proc.socket_spec  # unix:/path is the same in both syntaxes


def tokened(messages) -> list[tuple[str, bytes]]:
    """(token, message carrying that token) for each (path, raw) of `messages`."""
    out = []
    for _, raw in messages:
        tok = new_token()
        out.append((tok, with_token(raw, tok)))
    return out


def send_all(postfix, items, clients=8):
    """Send (token, raw) pairs concurrently, one SMTP session each: {token: (code, text)}."""
    def one(item):
        token, raw = item
        return token, send_one(postfix.host, postfix.smtp_port, raw, [postfix.user])

    with ThreadPoolExecutor(clients) as pool:
        return dict(pool.map(one, items))


@pytest.mark.parametrize("transport", ["loop", "libmilter"])
def test_corpus_tagged_by_default_and_rows_match(postfix, workdir, messages, transport):
    proc = start_milter(workdir, f"tag-{transport}", f'transport = "{transport}"\n')
    items = tokened(messages)
    try:
        with postfix.milter_set(postfix_spec(proc), default_action="tempfail"):
            wait_milter_active(postfix, messages[0][1])
            replies = send_all(postfix, items)
        assert {code for code, _ in replies.values()} == {250}, replies
        delivered = delivered_by_token(postfix, set(replies))
        assert len(delivered) == len(items)
    finally:
        assert proc.stop() == 0
    rows = {r["queue_id"]: r for r in db_rows(proc)}
    assert len(rows) >= len(items)  # plus the probe(s) of wait_milter_active
    seen = {"ham": 0, "spam": 0}
    for tok, data in delivered.items():
        verdict = header(data, "X-Atlas-Verdict")
        assert len(verdict) == 1, data[:2000]  # ours only: forged copies removed, no duplicates
        assert header(data, "X-Spam-Flag") == ["YES" if verdict[0] == "spam" else "NO"]
        [status] = header(data, "X-Spam-Status")
        assert re.fullmatch(r"(Yes|No), score=\d\.\d{3} required=\d\.\d{3}", status)
        assert len(header(data, "X-Atlas-Score")) == 1
        qid = RECEIVED_ID.search(data.replace(b"\r\n", b"\n")).group(1).decode()
        row = rows[qid]
        assert row["verdict"] == verdict[0] and row["action"] == "tag"
        assert f"{row['score']:.3f}" == header(data, "X-Atlas-Score")[0]
        assert row["client_ip"] == "127.0.0.1" and row["recipients_count"] == 1
        seen[verdict[0]] = seen.get(verdict[0], 0) + 1
    assert seen["spam"] >= 30 and seen["ham"] >= 30, seen  # the model works on this mix
    assert "Traceback" not in proc.log()
    assert "sent no {client_addr}" not in proc.log()  # Postfix sends our end-of-message macros
    # On libmilter the headers above went through it with the GIL held (libmilter.add_header), not the fallback.
    gil_held = "verdict headers are added through libmilter with the GIL held" in proc.log()
    assert gil_held == (transport == "libmilter")
    assert f"(transport={transport}," in proc.log()


def test_corpus_spam_rejected_with_550_when_configured(postfix, workdir, messages):
    proc = start_milter(workdir, "reject", '\nspam_action = "reject"\n')
    items = tokened(messages)
    try:
        with postfix.milter_set(postfix_spec(proc), default_action="tempfail"):
            wait_milter_active(postfix, messages[0][1])
            replies = send_all(postfix, items)
        accepted = {tok for tok, (code, _) in replies.items() if code == 250}
        rejected = {tok: text for tok, (code, text) in replies.items() if code == 550}
        assert len(accepted) + len(rejected) == len(items), replies
        assert len(rejected) >= 30
        delivered = delivered_by_token(postfix, accepted)
        assert set(delivered) == accepted
    finally:
        assert proc.stop() == 0
    rows = db_rows(proc)
    refs = {m.group(1) for m in (re.search(r"ref=([0-9A-F]{10})", r["note"] or "") for r in rows) if m}
    for text in rejected.values():
        m = re.fullmatch(r"5\.7\.1 Message rejected as spam \(ref ([0-9A-F]{10})\)", text)
        assert m, text
        assert m.group(1) in refs  # the admin can find the row from the bounce
    assert sum(r["action"] == "reject" for r in rows) == len(rejected)
    assert sum(r["action"] == "tag" for r in rows) >= len(accepted)  # plus the probe(s)
    assert all(r["verdict"] == "spam" for r in rows if r["action"] == "reject")
    for data in delivered.values():
        assert header(data, "X-Spam-Flag") == ["NO"]


def test_killed_milter_gives_postfix_default_action(postfix, workdir, messages):
    proc = start_milter(workdir, "killed")
    _, raw = messages[0]
    with postfix.milter_set(postfix_spec(proc), default_action="tempfail"):
        wait_milter_active(postfix, raw)
        proc.kill()
        code, text = send_one(postfix.host, postfix.smtp_port, with_token(raw, new_token()), [postfix.user])
    assert code == 451 and "4.7.1" in text, (code, text)


@pytest.mark.parametrize("sig,within", [(signal.SIGUSR2, 1.5), (signal.SIGTERM, 7.0)])
def test_stop_signals_flush_the_records_and_sigusr2_is_at_once(postfix, workdir, messages, sig, within):
    """systemd's KillSignal: SIGUSR2 stops as SIGTERM does, without libmilter's wait of up to
    5 s for its listener (the milter wakes it). Either way the verdict rows are flushed."""
    proc = start_milter(workdir, f"stop-{sig.name}")
    _, raw = messages[0]
    with postfix.milter_set(postfix_spec(proc), default_action="tempfail"):
        wait_milter_active(postfix, raw)
        code, _ = send_one(postfix.host, postfix.smtp_port, with_token(raw, new_token()), [postfix.user])
        assert code == 250
        proc.stop_signal = sig
        started = time.monotonic()
        rc = proc.stop(timeout=10)
        took = time.monotonic() - started
    assert rc == 0 and took < within, (rc, took)
    assert ("stop requested (SIGUSR2)" in proc.log()) == (sig == signal.SIGUSR2)
    assert "Traceback" not in proc.log()
    assert len(db_rows(proc)) >= 2  # the probe and the message: flushed before exit


@pytest.mark.parametrize("statsd,complaint", [
    ("host = \"statsd.invalid\"", "StatsD disabled"),  # DNS fails: warned once, metrics off
    ("host = \"127.0.0.1\"\nport = PORT", None),  # nothing listens: UDP sends go nowhere, silently
])
def test_statsd_unresolvable_or_unreachable_mail_still_flows(postfix, workdir, messages, statsd, complaint):
    """StatsD is a side channel: a name that does not resolve or a port nobody listens on
    changes nothing for the mail: tagged, recorded, no traceback."""
    from tests.support.servers import free_port

    config = BASE_CONFIG.replace("[statsd]\nenabled = false\n", "")
    config += "[statsd]\nenabled = true\n" + statsd.replace("PORT", str(free_port("udp"))) + "\n"
    proc = MilterProcess(workdir, unix_spec(workdir / "statsd-fault.sock")[0], config_text=config,
                         name=f"statsd-fault-{'dns' if complaint else 'port'}").start()
    items = tokened(messages[:10])
    try:
        with postfix.milter_set(postfix_spec(proc), default_action="tempfail"):
            wait_milter_active(postfix, messages[10][1])
            replies = send_all(postfix, items)
        assert {code for code, _ in replies.values()} == {250}, replies
        delivered = delivered_by_token(postfix, {tok for tok, _ in items})
        assert all(len(header(data, "X-Atlas-Verdict")) == 1 for data in delivered.values()) and len(delivered) == 10
    finally:
        assert proc.stop() == 0
    log = proc.log()
    assert "Traceback" not in log
    if complaint:
        assert log.count(complaint) == 1, log[-2000:]
    assert len(db_rows(proc)) >= 10


@pytest.mark.parametrize("default_action,expect", [("tempfail", 451), ("accept", 250)])
def test_kill_9_mid_message_gives_postfix_default_action_and_loses_nothing(postfix, workdir, messages,
                                                                           default_action, expect):
    """Eight messages sit in the milter's end of message (the classifier sleeps 2 s) when it is
    killed with SIGKILL: every client gets Postfix's milter_default_action for its message
    (451: it will retry; or 250: delivered once, untagged). A new milter then tags the retries."""
    proc = start_milter(workdir, f"kill9-{default_action}", prelude=SLOW_PRELUDE)
    items = tokened(messages[:8])
    with postfix.milter_set(postfix_spec(proc), default_action=default_action):
        wait_milter_active(postfix, messages[8][1])
        with ThreadPoolExecutor(len(items)) as pool:
            futures = {tok: pool.submit(send_one, postfix.host, postfix.smtp_port, raw, [postfix.user])
                       for tok, raw in items}
            time.sleep(1.0)  # every message is now inside the milter's eom, in the sleeping classifier
            assert proc.alive()
            proc.kill()
            replies = {tok: f.result() for tok, f in futures.items()}
    assert {code for code, _ in replies.values()} == {expect}, replies
    tokens = {tok for tok, _ in items}
    if expect == 250:
        delivered = delivered_by_token(postfix, tokens)
        assert set(delivered) == tokens  # delivered once each (delivered_by_token fails on a second copy)
        assert all(header(data, "X-Atlas-Verdict") == [] for data in delivered.values())
        return
    assert delivered_by_token(postfix, tokens, timeout=2.0) == {}
    # The clients retry once a milter is back: every message is delivered, tagged, once.
    again = start_milter(workdir, f"kill9-{default_action}-restarted")
    try:
        with postfix.milter_set(postfix_spec(again), default_action=default_action):
            wait_milter_active(postfix, messages[8][1])
            codes = send_all(postfix, items)
        assert {code for code, _ in codes.values()} == {250}, codes
        delivered = delivered_by_token(postfix, tokens)
        assert set(delivered) == tokens
        assert all(len(header(data, "X-Atlas-Verdict")) == 1 for data in delivered.values())
    finally:
        assert again.stop() == 0


@pytest.mark.parametrize("on_error,expect", [("accept", 250), ("tempfail", 451)])
def test_slow_classifier_gets_on_error_within_deadline(postfix, workdir, messages, on_error, expect):
    extra = f'\nclassify = "thread"\ntimeout = 0.5\non_error = "{on_error}"\n'
    proc = start_milter(workdir, f"slow-{on_error}", extra, prelude=SLOW_PRELUDE)
    _, raw = messages[1]
    tok = new_token()
    try:
        with postfix.milter_set(postfix_spec(proc), default_action="tempfail"):
            # no probe here: every message through this milter takes the slow path
            time.sleep(1.0)  # smtpd processes from before the reload are gone
            t0 = time.monotonic()
            code, text = send_one(postfix.host, postfix.smtp_port, with_token(raw, tok), [postfix.user])
            took = time.monotonic() - t0
        assert code == expect, (code, text)
        assert took < 1.8, took  # the classifier sleeps 2 s; the deadline is 0.5 s
        if expect == 250:
            [data] = delivered_by_token(postfix, {tok}).values()
            assert header(data, "X-Atlas-Verdict") == ["unchecked"]
            assert header(data, "X-Spam-Flag") == []
        else:
            assert "4.7.1" in text and "ref" in text
    finally:
        assert proc.stop() == 0
    [row] = db_rows(proc)
    assert row["verdict"] == "unchecked" and row["error"].startswith("timeout")


def test_unix_socket_mode_and_group_are_configurable(tmp_path):
    """[milter] socket_mode and socket_group: the MTA's group, and only it, may connect."""
    import grp
    import stat

    group = grp.getgrgid(os.getgid()).gr_name if os.getgid() != 0 else "daemon"
    gid = grp.getgrnam(group).gr_gid
    sock = tmp_path / "m.sock"
    milter = MilterProcess(tmp_path, f"unix:{sock}", config_text=f'[statsd]\nenabled = false\n[milter]\nsocket_mode = 0o660\nsocket_group = "{group}"\n')
    milter.start()
    try:
        st = sock.stat()
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == gid
    finally:
        milter.stop()
    bad = MilterProcess(tmp_path / "bad", f"unix:{tmp_path / 'bad.sock'}", config_text='[milter]\nsocket_group = "no-such-group-xyz"\n')
    proc = subprocess.run(bad.argv(), capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 1
    assert "socket_group" in proc.stderr and "Traceback" not in proc.stderr
