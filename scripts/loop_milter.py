#!/usr/bin/env python3
"""EXPERIMENT, not the product: atlas-milter's own message handling (`AtlasMilter`, the
same pipeline, policy, verdict headers and record) driven by the milter protocol spoken
on ONE thread (selectors), with end of message handed to one worker thread, instead of
libmilter's thread pool and pymilter's callbacks. It answers one question for
scripts/milter_bench.py (`--modes none,loop,unix`): how much of the milter's CPU per
message is the transport (libmilter's controller polling every session, ~30 GIL
hand-overs per message, worker threads started and ended) rather than our work.

    python scripts/loop_milter.py unix:/tmp/loop.sock     # stops on SIGTERM

Only what Postfix (milter_protocol 6) needs is here: negotiation with the macro list,
macros, MAIL/RCPT/DATA/header/body/end-of-message/abort/quit, and the replies and header
changes AtlasMilter makes. No inet, no Sendmail quirks, no timeouts, no reload: a yardstick.
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import socket
import struct
import sys
import tempfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import Milter  # noqa: E402

from atlas_milter.adapters import milter as am  # noqa: E402
from atlas_milter.config import load_config  # noqa: E402

# Which no-reply bit covers each MTA command (a NOREPLY answer the MTA did not agree to is sent as 'c').
NR_BITS = {b"M": Milter.P_NR_MAIL, b"R": Milter.P_NR_RCPT, b"T": Milter.P_NR_DATA, b"L": Milter.P_NR_HDR,
           b"B": Milter.P_NR_BODY}


def packet(cmd: bytes, data: bytes = b"") -> bytes:
    return struct.pack(">I", len(data) + 1) + cmd + data


class LoopContext:
    """The part of pymilter's milterContext that AtlasMilter uses: macros, and the header
    changes and reply of one message, queued as protocol packets."""

    def __init__(self) -> None:
        self.macros: dict[str, str] = {}
        self.symlists: list[tuple[int, str]] = []
        self.changes: list[bytes] = []
        self.reply = ""
        self.priv = None

    def setpriv(self, priv) -> None:
        self.priv = priv

    def getpriv(self):
        return self.priv

    def getsymval(self, name: str):
        return self.macros.get(name)

    def setsymlist(self, stage: int, macros: str) -> None:
        self.symlists.append((stage, macros))

    def setreply(self, rcode, xcode=None, msg=None, *more) -> None:
        self.reply = " ".join(str(x) for x in (rcode, xcode, msg) if x)

    def addheader(self, field, value, idx=-1) -> None:
        data = field.encode() + b"\0" + value.encode("utf-8", "surrogateescape") + b"\0"
        self.changes.append(packet(b"h", data) if idx < 0 else packet(b"i", struct.pack(">I", idx) + data))

    def chgheader(self, field, idx, value) -> None:
        self.changes.append(packet(b"m", struct.pack(">I", idx) + field.encode() + b"\0" + value.encode() + b"\0"))

    def quarantine(self, reason) -> None:
        self.changes.append(packet(b"q", reason.encode() + b"\0"))


class Session:
    def __init__(self, sock: socket.socket, server: "LoopServer") -> None:
        self.sock = sock
        self.server = server
        self.buf = bytearray()
        self.ctx = LoopContext()
        self.milter = am.AtlasMilter(server.engine)
        self.milter._setctx(self.ctx)
        self.ctx.setpriv(self.milter)
        self.mta_protocol = 0
        self.busy = False  # end of message is on the worker

    def answer(self, cmd: bytes, rc: int) -> bytes:
        if rc == Milter.NOREPLY:
            return b"" if self.mta_protocol & NR_BITS.get(cmd, 0) else packet(b"c")
        if rc in (Milter.REJECT, Milter.TEMPFAIL):
            reply, self.ctx.reply = self.ctx.reply, ""
            if reply[:1] == ("5" if rc == Milter.REJECT else "4"):
                return packet(b"y", reply.encode() + b"\0")
            return packet(b"r" if rc == Milter.REJECT else b"t")
        return packet({Milter.CONTINUE: b"c", Milter.ACCEPT: b"a", Milter.DISCARD: b"d", Milter.SKIP: b"s"}[rc])

    def received(self, data: bytes) -> bool:
        """Handle every whole packet; False when the MTA said QUIT."""
        self.buf += data
        out = []
        pos = 0
        buf = self.buf
        while not self.busy and len(buf) - pos >= 5:
            (length,) = struct.unpack_from(">I", buf, pos)
            if len(buf) - pos - 4 < length:
                break
            cmd, payload = bytes(buf[pos + 4:pos + 5]), bytes(buf[pos + 5:pos + 4 + length])
            pos += 4 + length
            if cmd == b"Q":
                self.milter.close()
                return False
            out.append(self.command(cmd, payload))
        del buf[:pos]
        if out:
            self.sock.sendall(b"".join(out))
        return True

    def command(self, cmd: bytes, data: bytes) -> bytes:
        m = self.milter
        if cmd == b"L":
            name, value, _ = data.split(b"\0", 2)
            return self.answer(cmd, m.header_bytes(name, value))
        if cmd == b"D":
            fields = data[1:].split(b"\0")
            for i in range(0, len(fields) - 1, 2):
                name = fields[i].decode("latin-1")
                self.ctx.macros[name] = self.ctx.macros[name.strip("{}")] = fields[i + 1].decode("utf-8", "replace")
            return b""
        if cmd == b"B":
            return self.answer(cmd, m.body(data))
        if cmd == b"M":
            return self.answer(cmd, m.envfrom_bytes(*data.split(b"\0")[:-1]))
        if cmd == b"R":
            return self.answer(cmd, m.envrcpt_bytes(*data.split(b"\0")[:-1]))
        if cmd == b"T":
            return self.answer(cmd, m.data())
        if cmd == b"E":
            if data:
                m.body(data)
            self.busy = True
            self.server.end_of_message(self)
            return b""
        if cmd == b"A":
            m.abort()
            return b""
        if cmd == b"O":
            version, actions, protocol = struct.unpack(">III", data[:12])
            self.mta_protocol = protocol
            opts = [actions, protocol, 0, 0]
            m.negotiate(opts)
            reply = struct.pack(">III", min(version, 6), opts[0] & actions, opts[1] & protocol)
            for stage, macros in self.ctx.symlists:
                reply += struct.pack(">I", stage) + macros.encode() + b"\0"
            return packet(b"O", reply)
        return packet(b"c")  # connect, helo, end of headers, unknown: not negotiated

    def finish_message(self) -> bytes:
        """On the worker: end of message, its header changes and its reply."""
        rc = self.milter.eom()
        changes, self.ctx.changes = self.ctx.changes, []
        return b"".join(changes) + self.answer(b"E", rc)


class LoopServer:
    def __init__(self, engine: am.MilterEngine, path: str) -> None:
        self.engine = engine
        self.path = path
        self.selector = selectors.DefaultSelector()
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="loop-eom")
        self.done: deque[tuple[Session, bytes]] = deque()
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        self.stopping = False

    def end_of_message(self, session: Session) -> None:
        def run() -> None:
            try:
                out = session.finish_message()
            except Exception:  # noqa: BLE001 - a yardstick: answer and go on
                out = packet(b"t")
            self.done.append((session, out))
            os.write(self.wake_w, b"x")
        self.worker.submit(run)

    def serve(self) -> None:
        listener = socket.socket(socket.AF_UNIX)
        if os.path.exists(self.path):
            os.unlink(self.path)
        os.umask(0o111)  # Postfix's smtpd (user postfix) must be able to connect
        listener.bind(self.path)
        listener.listen(256)
        listener.setblocking(False)
        self.selector.register(listener, selectors.EVENT_READ, "listen")
        self.selector.register(self.wake_r, selectors.EVENT_READ, "wake")
        print(f"loop milter listening on unix:{self.path}", flush=True)
        while not self.stopping:
            for key, _ in self.selector.select(0.5):
                if key.data == "listen":
                    try:
                        conn, _ = listener.accept()
                    except BlockingIOError:
                        continue
                    self.selector.register(conn, selectors.EVENT_READ, Session(conn, self))
                elif key.data == "wake":
                    try:
                        os.read(self.wake_r, 4096)
                    except BlockingIOError:
                        pass
                    while self.done:
                        session, out = self.done.popleft()
                        session.busy = False
                        try:
                            session.sock.sendall(out)
                            if session.buf and not session.received(b""):
                                self.drop(session)
                        except OSError:
                            self.drop(session)
                else:
                    session = key.data
                    try:
                        data = session.sock.recv(262144)
                    except OSError:
                        data = b""
                    if not data or not session.received(data):
                        self.drop(session)
        listener.close()
        os.unlink(self.path)

    def drop(self, session: Session) -> None:
        session.milter.close()  # releases what the message held of the byte budget
        try:
            self.selector.unregister(session.sock)
        except (KeyError, ValueError):
            pass
        session.sock.close()


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    spec = sys.argv[1]
    if not spec.startswith("unix:"):
        print("loop_milter.py: unix:/path only", file=sys.stderr)
        return 2
    config = load_config(None, {"store.db": os.path.join(tempfile.mkdtemp(), "verdicts.db"), "statsd.enabled": False},
                         env={})
    pipeline, model_error = am.make_pipeline(config)
    engine = am.MilterEngine(config, pipeline, model_error)
    server = LoopServer(engine, spec[len("unix:"):])
    signal.signal(signal.SIGTERM, lambda *_: setattr(server, "stopping", True))
    try:
        server.serve()
    finally:
        server.worker.shutdown(wait=True)
        engine.close()
        am._log_summary(engine)
    return 0


if __name__ == "__main__":
    sys.exit(main())
