"""The real-server fixtures work: Postfix delivers, Dovecot stores, StatsD records."""

from __future__ import annotations

import smtplib
import socket
import time
import uuid
from email.message import EmailMessage

import pytest

from tests.support.servers import parse_inspect

def _message(subject: str, msgid: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "sender@remote.test"
    msg["To"] = "user@example.test"
    msg["Subject"] = subject
    msg["Message-ID"] = msgid
    msg.set_content("Hello from the atlas-milter smoke test.\n")
    return msg


@pytest.mark.integration
def test_postfix_delivers_to_maildir(postfix):
    msgid = f"<smoke-{uuid.uuid4().hex}@remote.test>"
    with smtplib.SMTP(postfix.host, postfix.smtp_port, timeout=10) as smtp:
        refused = smtp.send_message(_message("postfix smoke", msgid))
    assert refused == {}
    [delivered] = postfix.wait_for_message(msgid, timeout=15)
    data = delivered.read_bytes()
    assert b"Subject: postfix smoke" in data
    assert b"Delivered-To: user@example.test" in data
    assert delivered.parent.parent == postfix.maildir
    assert "status=sent" in postfix.maillog()


@pytest.mark.integration
def test_postfix_rejects_unknown_local_user(postfix):
    with smtplib.SMTP(postfix.host, postfix.smtp_port, timeout=10) as smtp:
        smtp.ehlo()
        smtp.mail("sender@remote.test")
        code, reply = smtp.rcpt("nobody-here@example.test")
    assert code == 550, (code, reply)
    assert b"User unknown" in reply


@pytest.mark.integration
def test_dovecot_login_append_select(dovecot):
    msgid = f"<smoke-{uuid.uuid4().hex}@remote.test>"
    raw = _message("dovecot smoke", msgid).as_bytes()
    with dovecot.client() as imap:
        before = imap.select_folder("INBOX")[b"EXISTS"]
        imap.append("INBOX", raw)
        info = imap.select_folder("INBOX")
        assert info[b"EXISTS"] == before + 1
        uids = imap.search(["HEADER", "Message-ID", msgid])
        assert len(uids) == 1
        fetched = imap.fetch(uids, ["RFC822"])[uids[0]][b"RFC822"]
        assert b"Subject: dovecot smoke" in fetched
    assert dovecot.password_file.read_text().strip() == dovecot.password


@pytest.mark.integration
def test_dovecot_rejects_wrong_password(dovecot):
    from imapclient.exceptions import LoginError

    with dovecot.client(login=False) as imap:
        with pytest.raises(LoginError):
            imap.login(dovecot.user, dovecot.password + "-wrong")


@pytest.mark.integration
def test_statsd_records_timer_and_counter(statsd_daemon):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"atlas.test:5|ms", (statsd_daemon.host, statsd_daemon.udp_port))
        s.sendto(b"atlas.test_count:3|c", (statsd_daemon.host, statsd_daemon.udp_port))
    assert statsd_daemon.wait_for("timers", "atlas.test") == [5.0]
    assert statsd_daemon.wait_for("counters", "atlas.test_count") == 3.0
    assert statsd_daemon.counters()["statsd.packets_received"] >= 2


@pytest.mark.integration
def test_statsd_timer_count_past_node_display_limit(statsd_daemon):
    statsd_daemon.send(*(f"atlas.many:{i}|ms" for i in range(150)))
    statsd_daemon.wait_for("timers", "atlas.many")
    # UDP on loopback: all 150 arrive, but allow the last few to be still in flight.
    counts = {}
    for _ in range(50):
        counts = statsd_daemon.timer_counts()
        if counts.get("atlas.many") == 150:
            break
        time.sleep(0.05)
    assert counts["atlas.many"] == 150
    assert len(statsd_daemon.timers()["atlas.many"]) == 100  # Node shows at most 100 items


def test_parse_inspect_formats():
    reply = (
        "{ 'atlas.a': [ 12.159881, 7.5 ],\n  plain: 3,\n  \"it's\": -1.5e-3,\n"
        "  'atlas.b': [\n    1, 2, 3,\n    ... 1 more item\n  ] }"
    )
    assert parse_inspect(reply) == {
        "atlas.a": [12.159881, 7.5],
        "plain": 3.0,
        "it's": -0.0015,
        "atlas.b": [1.0, 2.0, 3.0],
    }


def test_corpus_fixtures(corpus_dir, corpus_index):
    assert corpus_index, "index.csv has no rows"
    assert {row["label"] for row in corpus_index} <= {"ham", "spam"}
    first = corpus_index[0]
    assert (corpus_dir / first["path"]).stat().st_size == first["bytes"]
