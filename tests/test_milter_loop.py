"""The milter protocol loop (adapters/milter/loop.py) spoken to by a scripted MTA over a
unix socket: negotiation and the macro list, no-reply steps (and the answers the MTA did
not agree to skip), verdict headers and reply codes at end of message, abort, quit with a
new connection following, several connections at once, malformed and oversized packets,
and stop. The message handling behind it is the real AtlasMilter with the shipped model."""

from __future__ import annotations

import functools
import socket
import struct
import threading
import time

import Milter
import pytest

from atlas_milter.adapters import milter as am
from atlas_milter.adapters.milter.loop import MAX_PACKET, LoopServer, packet
from tests.test_milter_adapter import HAM, SPAM, make_engine

ALL_ACTIONS = 0x1FF
ALL_PROTOCOL = 0x1FFFFF  # what Postfix 3.7 offers
NO_REPLY_BITS = Milter.P_NR_CONN | Milter.P_NR_HELO | Milter.P_NR_MAIL | Milter.P_NR_RCPT | Milter.P_NR_DATA \
    | Milter.P_NR_UNKN | Milter.P_NR_HDR | Milter.P_NR_EOH | Milter.P_NR_BODY


class MTA:
    """The MTA side of one milter connection."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self.buf = b""

    def send(self, cmd: bytes, data: bytes = b"") -> None:
        self.sock.sendall(packet(cmd, data))

    def reply(self) -> tuple[bytes, bytes]:
        while True:
            if len(self.buf) >= 4:
                (n,) = struct.unpack(">I", self.buf[:4])
                if len(self.buf) >= 4 + n:
                    cmd, data, self.buf = self.buf[4:5], self.buf[5:4 + n], self.buf[4 + n:]
                    return cmd, data
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("milter closed the connection")
            self.buf += chunk

    def negotiate(self, protocol: int = ALL_PROTOCOL) -> tuple[int, int, int, bytes]:
        self.send(b"O", struct.pack(">III", 6, ALL_ACTIONS, protocol))
        cmd, data = self.reply()
        assert cmd == b"O"
        version, actions, proto = struct.unpack(">III", data[:12])
        return version, actions, proto, data[12:]

    def message(self, raw: bytes, sender: bytes = b"<a@remote.test>", rcpt: bytes = b"<user@example.test>",
                queue_id: bytes = b"4QID1") -> list[tuple[bytes, bytes]]:
        """Send one message as Postfix does; the replies that end of message brought."""
        self.send(b"M", sender + b"\0")
        self.send(b"R", rcpt + b"\0")
        self.send(b"T")
        assert self.reply()[0] == b"c"  # DATA is negotiated with a reply (the inet stall)
        head, _, body = raw.replace(b"\r\n", b"\n").partition(b"\n\n")
        for line in head.split(b"\n"):
            if line[:1] in (b" ", b"\t"):
                continue
            name, _, value = line.partition(b":")
            self.send(b"L", name + b"\0" + value.strip() + b"\0")
        self.send(b"B", body.replace(b"\n", b"\r\n"))
        assert self.reply()[0] == b"c"
        self.send(b"D", b"E" + b"i\0" + queue_id + b"\0{client_addr}\0" + b"192.0.2.7\0")
        self.send(b"E")
        out = []
        while True:
            cmd, data = self.reply()
            out.append((cmd, data))
            if cmd in b"acrtdy":
                return out

    def closed(self, within: float = 3.0) -> bool:
        """True when the milter closes the connection within `within` seconds."""
        self.sock.settimeout(within)
        try:
            return self.sock.recv(1) == b""
        except ConnectionError:
            return True
        except socket.timeout:
            return False


@pytest.fixture
def loop(tmp_path):
    """start(...) runs a LoopServer on tmp_path/m.sock and returns (path, engine, server,
    thread); `classify_delay` makes every classification that much slower, `listener_type`
    replaces the listening socket's class, the rest are [milter] settings."""
    made = []

    def start(workers=4, classify_delay=0.0, listener_type=socket.socket, **milter):
        engine = make_engine(tmp_path, **milter)
        if classify_delay:
            original = engine.pipeline.classify
            engine.pipeline.classify = lambda *a, **k: (time.sleep(classify_delay), original(*a, **k))[1]
        path = str(tmp_path / "m.sock")
        listener = listener_type(socket.AF_UNIX)
        listener.bind(path)
        listener.listen(16)
        server = LoopServer(listener, functools.partial(am.AtlasMilter, engine), workers=workers, idle_timeout=600,
                            busy_wait=am.BUSY_WAIT)
        thread = threading.Thread(target=server.serve, daemon=True)
        thread.start()
        made.append((server, thread, engine))
        return path, engine, server, thread

    yield start
    for server, thread, engine in made:
        server.stop()
        thread.join(10)
        assert not thread.is_alive()
        engine.close()


def test_negotiation_asks_for_what_the_milter_uses_and_the_end_of_message_macros(loop):
    path, *_ = loop()
    version, actions, protocol, lists = MTA(path).negotiate()
    assert version == 6
    assert actions == Milter.ADDHDRS | Milter.CHGHDRS | Milter.QUARANTINE | Milter.SETSYMLIST
    # not sent at all: connect, HELO, end of headers, unknown commands; no reply: MAIL, RCPT, headers
    for bit in (Milter.P_NOCONNECT, Milter.P_NOHELO, Milter.P_NOEOH, Milter.P_NOUNKNOWN,
                Milter.P_NR_MAIL, Milter.P_NR_RCPT, Milter.P_NR_HDR, Milter.P_SKIP):
        assert protocol & bit, hex(bit)
    assert not protocol & (Milter.P_NOHDRS | Milter.P_NOBODY | Milter.P_NR_BODY)
    stage, = struct.unpack(">I", lists[:4])
    assert stage == Milter.M_EOM and lists[4:].rstrip(b"\0").split() == [b"{i}", b"{auth_authen}", b"{client_addr}"]


def test_ham_is_tagged_with_the_verdict_headers_and_accepted(loop):
    path, engine, *_ = loop()
    mta = MTA(path)
    mta.negotiate()
    replies = mta.message(HAM)
    assert replies[-1] == (b"a", b"")
    added = dict(d.rstrip(b"\0").split(b"\0") for c, d in replies if c == b"h")
    assert added[b"X-Atlas-Verdict"] == b"ham" and added[b"X-Spam-Flag"] == b"NO"
    assert added[b"X-Spam-Status"].startswith(b"No, score=")
    engine.pipeline.flush(timeout=10)
    assert engine.metrics.get_counters()["milter.messages"] == 1


def test_spam_is_rejected_with_the_configured_reply_code(loop):
    path, *_ = loop(spam_action="reject")
    mta = MTA(path)
    mta.negotiate()
    cmd, data = mta.message(SPAM)[-1]
    assert cmd == b"y" and data.startswith(b"550 5.7.1 Message rejected as spam (ref ")


def test_steps_the_mta_cannot_leave_unanswered_are_answered(loop):
    """An MTA without no-reply steps (milter protocol before 6) gets a continue for each
    header, as libmilter gives it."""
    path, *_ = loop()
    mta = MTA(path)
    _, _, protocol, _ = mta.negotiate(ALL_PROTOCOL & ~NO_REPLY_BITS)
    assert not protocol & NO_REPLY_BITS
    mta.send(b"M", b"<a@remote.test>\0")
    assert mta.reply()[0] == b"c"
    mta.send(b"L", b"Subject\0hello\0")
    assert mta.reply()[0] == b"c"


def test_several_messages_forged_headers_abort_and_quit_nc_on_one_connection(loop):
    path, *_ = loop()
    mta = MTA(path)
    mta.negotiate()
    forged = b"X-Atlas-Verdict: ham\r\nX-Spam-Flag: NO\r\n" + SPAM
    replies = mta.message(forged, queue_id=b"4QID2")
    assert (b"m", struct.pack(">I", 1) + b"X-Atlas-Verdict\0\0") in replies  # the forged copy removed
    assert replies[-1][0] == b"a"
    mta.send(b"M", b"<b@remote.test>\0")
    mta.send(b"A")  # the client gave up: the next message starts clean
    assert mta.message(HAM, queue_id=b"4QID3")[-1][0] == b"a"
    mta.send(b"K")  # quit, a new connection follows on this socket
    assert mta.message(HAM, queue_id=b"4QID4")[-1][0] == b"a"
    mta.send(b"Q")
    assert mta.closed()


def test_connections_are_served_side_by_side(loop):
    path, *_ = loop()
    first, second = MTA(path), MTA(path)
    first.negotiate()
    second.negotiate()
    first.send(b"M", b"<a@remote.test>\0")  # first stays in the middle of a message
    assert second.message(HAM)[-1][0] == b"a"
    assert first.message(SPAM)[-1][0] == b"a"


@pytest.mark.parametrize("bad", [
    struct.pack(">I", MAX_PACKET + 1) + b"B",  # larger than any MTA sends
    struct.pack(">I", 0),  # a packet without a command
    packet(b"L", b"no terminator"),  # a header that is not two strings
    packet(b"Z"),  # no such command
    packet(b"M"),  # MAIL without an address
])
def test_malformed_packets_end_the_connection_and_nothing_else(loop, bad):
    path, *_ = loop()
    mta = MTA(path)
    mta.negotiate()
    mta.sock.sendall(bad)
    assert mta.closed()
    other = MTA(path)  # the milter still serves
    other.negotiate()
    assert other.message(HAM)[-1][0] == b"a"


def test_stop_answers_the_message_in_progress_then_returns(loop):
    path, _, server, thread = loop(workers=2, classify_delay=0.5)
    mta = MTA(path)
    mta.negotiate()
    done = []
    sender = threading.Thread(target=lambda: done.append(mta.message(HAM)[-1][0]))
    sender.start()
    time.sleep(0.2)  # end of message is being classified
    server.stop()
    sender.join(10)
    thread.join(10)
    assert done == [b"a"] and not thread.is_alive()


def test_a_message_that_waits_for_a_thread_gets_the_busy_action(loop):
    """With every end-of-message thread taken, a message does not queue past the milter's
    busy wait: it gets on_busy (tempfail by default) at once, as on libmilter."""
    path, engine, *_ = loop(workers=1, classify_delay=0.4)
    mtas = [MTA(path) for _ in range(3)]
    for mta in mtas:
        mta.negotiate()
    results: dict[int, bytes] = {}
    senders = [threading.Thread(target=lambda i=i: results.__setitem__(i, mtas[i].message(HAM)[-1]))
               for i in range(3)]
    started = time.monotonic()
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join(10)
    took = time.monotonic() - started
    answers = sorted(cmd + b" " + data[:9] for cmd, data in results.values())
    assert answers == [b"a ", b"y 451 4.7.1", b"y 451 4.7.1"], answers
    assert took < 1.5, took  # the two busy answers did not wait for the slow one
    assert engine.metrics.get_counters()["milter.error.busy"] == 2


class FlakyListener(socket.socket):
    """A listening socket whose first accepts fail as when the process is out of file descriptors."""

    failures = 3

    def accept(self):
        if FlakyListener.failures:
            FlakyListener.failures -= 1
            raise OSError(24, "Too many open files")
        return super().accept()


def test_accept_failures_are_logged_once_and_serving_goes_on(loop, caplog):
    path, *_ = loop(workers=1, listener_type=FlakyListener)
    mta = MTA(path)
    mta.negotiate()
    assert mta.message(HAM)[-1][0] == b"a"
    failures = [r for r in caplog.records if "cannot accept MTA connections" in r.getMessage()]
    assert len(failures) == 1 and "Too many open files" in failures[0].getMessage()
