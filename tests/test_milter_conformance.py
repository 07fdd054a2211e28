"""Protocol conformance against a milter client nobody here wrote (PyPI `miltertest`, the
MTA side of the protocol), talking to the real `atlas-milter milter` process on a free
inet port. Every step honours what the milter negotiated: SMFIP_NO* steps are not sent,
SMFIP_NR_* steps are sent without waiting for a reply (the `step` pattern of
shared/docs/infra-recipes.md)."""

from __future__ import annotations

import re
import socket
import sqlite3
from importlib import resources

import pytest

miltertest = pytest.importorskip("miltertest")
from miltertest import constants as C  # noqa: E402

from tests.support.milter_process import inet_spec, MilterProcess  # noqa: E402
from tests.support.servers import free_port  # noqa: E402

SAMPLE = resources.files("atlas_milter").joinpath("data", "sample")
HAM = SAMPLE.joinpath("03-family.eml").read_bytes()
SPAM = SAMPLE.joinpath("10-lottery.eml").read_bytes()

CONFIG = """
[classifier]
max_bytes = 4096
[statsd]
enabled = false
[milter]
spam_action = "reject"
[milter.recipients."tagged@example.test"]
spam_action = "tag"
"""


@pytest.fixture(scope="module", params=["loop", "libmilter"])
def milter_proc(tmp_path_factory, request):
    """The milter on either transport: our protocol loop or libmilter."""
    port = free_port()
    proc = MilterProcess(tmp_path_factory.mktemp("conformance"), inet_spec(port)[0],
                         config_text=CONFIG.replace("[milter]\n", f'[milter]\ntransport = "{request.param}"\n', 1))
    proc.start()
    proc.port = port
    yield proc
    assert proc.stop() == 0
    assert "Traceback" not in proc.log(), proc.log()


def split(raw: bytes) -> tuple[list[tuple[str, str]], str]:
    head, _, body = raw.replace(b"\r\n", b"\n").partition(b"\n\n")
    headers: list[list[str]] = []
    for line in head.decode("latin-1").split("\n"):
        if line[:1] in (" ", "\t") and headers:
            headers[-1][1] += "\n" + line
        elif ":" in line:
            name, _, value = line.partition(":")
            headers.append([name, value.lstrip(" ")])
    # miltertest 1.0 wants str buffers (it encodes them as UTF-8)
    return [(n, v) for n, v in headers], body.replace(b"\n", b"\r\n").decode("utf-8", "replace")


class Session:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.conn = miltertest.MilterConnection(self.sock)
        self.actions, self.prot, self.symlists = self._optneg()

    def _optneg(self) -> tuple[int, int, dict[int, str]]:
        """OPTNEG by hand: miltertest 1.0 does not decode the macro lists (SMFIR_SETSYMLIST
        data) that follow the three words in the milter's reply; check them here too."""
        actions, protocol = miltertest.codec.optneg_mta_capable(C.SMFI_V6_ACTS, C.SMFI_V6_PROT)
        self.sock.sendall(miltertest.codec.encode_optneg(actions, protocol))
        data = b""
        while len(data) < 4 or len(data) < 4 + int.from_bytes(data[:4], "big"):
            chunk = self.sock.recv(4096)
            assert chunk, "milter closed the connection during OPTNEG"
            data += chunk
        size = int.from_bytes(data[:4], "big")
        payload = data[4:4 + size]
        assert payload[:1] == C.SMFIC_OPTNEG.encode()
        version, ract, rprot = (int.from_bytes(payload[i:i + 4], "big") for i in (1, 5, 9))
        assert version in (2, 6) and ract & actions == ract and rprot & protocol == rprot
        rest, symlists = payload[13:], {}
        while rest:
            where = int.from_bytes(rest[:4], "big")
            macros, _, rest = rest[4:].partition(b"\0")
            symlists[where] = macros.decode()
        return ract, rprot, symlists

    def step(self, skip: int, nr: int, cmd: str, **kw):
        if self.prot & skip:
            return None
        if self.prot & nr:
            self.conn._send(cmd, **kw)
            return None
        reply = self.conn.send_ar(cmd, **kw)
        return reply

    def message(self, raw: bytes, rcpts=("user@example.test",), queue_id="CONF1", sender="<a@remote.test>"):
        headers, body = split(raw)
        self.step(C.SMFIP_NOMAIL, C.SMFIP_NR_MAIL, C.SMFIC_MAIL, args=[sender])
        for rcpt in rcpts:
            self.step(C.SMFIP_NORCPT, C.SMFIP_NR_RCPT, C.SMFIC_RCPT, args=[f"<{rcpt}>"])
        self.step(C.SMFIP_NODATA, C.SMFIP_NR_DATA, C.SMFIC_DATA)
        for name, value in headers:
            self.step(C.SMFIP_NOHDRS, C.SMFIP_NR_HDR, C.SMFIC_HEADER, name=name, value=value)
        self.step(C.SMFIP_NOEOH, C.SMFIP_NR_EOH, C.SMFIC_EOH)
        skipped = False
        if not self.prot & C.SMFIP_NOBODY:
            for start in range(0, len(body), C.MILTER_CHUNK_SIZE):
                reply = self.conn.send_get(C.SMFIC_BODY, buf=body[start:start + C.MILTER_CHUNK_SIZE])
                if reply[0] == C.SMFIR_SKIP:
                    skipped = True
                    break
                assert reply[0] == C.SMFIR_CONTINUE, reply
        self.conn.send_macro(C.SMFIC_BODYEOB, **{"{i}": queue_id, "{client_addr}": "192.0.2.1"})
        self.skipped = skipped
        return self.conn.send_eom()

    def close(self) -> None:
        self.conn._send(C.SMFIC_QUIT)
        self.sock.close()


def rows(proc):
    con = sqlite3.connect(proc.db)
    try:
        return con.execute("SELECT queue_id, verdict, action, note, client_ip FROM processed_emails").fetchall()
    finally:
        con.close()


def wait_row(proc, queue_id):
    from tests.support.servers import wait_until

    box = {}

    def ready():
        box["rows"] = [r for r in rows(proc) if r[0] == queue_id]
        return bool(box["rows"])

    wait_until(ready, timeout=10, what=f"verdict row {queue_id}")
    return box["rows"][0]


def test_negotiation(milter_proc):
    s = Session(milter_proc.port)
    try:
        assert s.actions == C.SMFIF_ADDHDRS | C.SMFIF_CHGHDRS | C.SMFIF_QUARANTINE | C.SMFIF_SETSYMLIST
        for skipped in (C.SMFIP_NOCONNECT, C.SMFIP_NOHELO, C.SMFIP_NOEOH, C.SMFIP_NOUNKNOWN):
            assert s.prot & skipped
        for nr in (C.SMFIP_NR_MAIL, C.SMFIP_NR_RCPT, C.SMFIP_NR_HDR):
            assert s.prot & nr
        assert not s.prot & (C.SMFIP_NOMAIL | C.SMFIP_NORCPT | C.SMFIP_NOHDRS | C.SMFIP_NOBODY)
        # DATA with a reply: the answer ACKs the MTA's DATA-stage packet (no Nagle stall on inet)
        assert not s.prot & (C.SMFIP_NODATA | C.SMFIP_NR_DATA)
        # End of message only: an end-of-header list would make Postfix send it with every header
        assert s.symlists == {C.SMFIM_EOM: "{i} {auth_authen} {client_addr}"}
    finally:
        s.close()


def test_ham_is_tagged(milter_proc):
    s = Session(milter_proc.port)
    try:
        replies = s.message(HAM, queue_id="CONFHAM")
    finally:
        s.close()
    assert replies[-1][0] == C.SMFIR_ACCEPT
    added = {r[1]["name"]: r[1]["value"] for r in replies if r[0] == C.SMFIR_ADDHEADER}
    assert added["X-Atlas-Verdict"] == "ham" and added["X-Spam-Flag"] == "NO"
    assert re.match(r"No, score=\d\.\d{3} required=\d\.\d{3}$", added["X-Spam-Status"])
    assert wait_row(milter_proc, "CONFHAM")[1:3] == ("ham", "tag")


def test_spam_is_rejected_with_reference(milter_proc):
    s = Session(milter_proc.port)
    try:
        replies = s.message(SPAM, queue_id="CONFSPAM")
    finally:
        s.close()
    [reply] = replies
    assert reply[0] == C.SMFIR_REPLYCODE and reply[1]["smtpcode"] == "550"
    ref = re.fullmatch(r"5\.7\.1 Message rejected as spam \(ref ([0-9A-F]{10})\)", reply[1]["text"]).group(1)
    row = wait_row(milter_proc, "CONFSPAM")
    assert row[1:3] == ("spam", "reject") and f"ref={ref}" in row[3] and row[4] == "192.0.2.1"


def test_several_messages_and_forged_headers_on_one_connection(milter_proc):
    s = Session(milter_proc.port)
    try:
        first = s.message(SPAM, rcpts=("tagged@example.test",), queue_id="CONF2A")
        forged = b"X-Spam-Flag: NO\nX-Atlas-Verdict: ham\n" + SPAM
        second = s.message(forged, rcpts=("tagged@example.test",), queue_id="CONF2B")
        third = s.message(HAM, queue_id="CONF2C")
    finally:
        s.close()
    assert first[-1][0] == C.SMFIR_ACCEPT and not any(r[0] == C.SMFIR_CHGHEADER for r in first)
    kinds = [r[0] for r in second]
    changes = [(r[1]["name"], r[1]["index"], r[1]["value"]) for r in second if r[0] == C.SMFIR_CHGHEADER]
    assert sorted(changes) == [("X-Atlas-Verdict", 1, ""), ("X-Spam-Flag", 1, "")]
    assert kinds.index(C.SMFIR_CHGHEADER) < kinds.index(C.SMFIR_ADDHEADER)
    assert {r[1]["name"]: r[1]["value"] for r in second if r[0] == C.SMFIR_ADDHEADER}["X-Spam-Flag"] == "YES"
    assert {r[1]["name"]: r[1]["value"] for r in third if r[0] == C.SMFIR_ADDHEADER}["X-Atlas-Verdict"] == "ham"


def test_body_over_the_cap_gets_skip(milter_proc):
    s = Session(milter_proc.port)
    try:
        assert s.prot & C.SMFIP_SKIP
        big = HAM.replace(b"\n\n", b"\n\n" + b"filler line of text\n" * 5000, 1)
        replies = s.message(big, queue_id="CONFBIG")
        assert s.skipped
    finally:
        s.close()
    assert replies[-1][0] == C.SMFIR_ACCEPT


def test_abort_then_next_message(milter_proc):
    s = Session(milter_proc.port)
    try:
        s.step(C.SMFIP_NOMAIL, C.SMFIP_NR_MAIL, C.SMFIC_MAIL, args=["<x@remote.test>"])
        s.step(C.SMFIP_NOHDRS, C.SMFIP_NR_HDR, C.SMFIC_HEADER, name="Subject", value="half a message")
        s.conn._send(C.SMFIC_ABORT)
        replies = s.message(HAM, queue_id="CONFAFTERABORT")
    finally:
        s.close()
    assert replies[-1][0] == C.SMFIR_ACCEPT
