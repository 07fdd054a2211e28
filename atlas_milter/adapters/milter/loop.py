"""Owns the milter protocol spoken by atlas-milter itself (`[milter] transport = "loop"`):
one thread accepts the MTA's connections and reads and writes the packets of all of them
(selectors), drives one `AtlasMilter` per connection through the same callbacks libmilter
and pymilter would call, and hands each end of message to a worker thread. The message
handling, policy and failure actions are AtlasMilter's, unchanged.

Why it exists: on libmilter (Debian builds it with its worker pool) every command goes
through a controller thread that polls all idle sessions, worker threads come and go, and
pymilter takes and releases the GIL once per callback, ~30 times a message; measured inside
Postfix, that transport costs 0.3-0.7 ms of the milter's ~2 ms of CPU per message
(scripts/milter_bench.py --modes none,unix,unix-libmilter). Here a read returns every packet
waiting on a connection, the GIL changes hands about twice a message, and no thread is
started per connection. The framing is wire.py's: compiled where built, and a message's
run of header packets (two per header: Postfix sends a macro packet before each) reaches
the milter as one block, one call instead of ~50.

What it implements of the protocol (milter protocol 2-6, as Postfix and Sendmail speak it):
option negotiation with the macro list of end of message (version 6), macros, connect,
HELO, MAIL, RCPT, DATA, header, end of headers, body, end of message, abort, quit and quit
with a new connection following; the replies continue/accept/reject/tempfail/discard/skip,
reply codes, and the header changes and quarantine AtlasMilter asks for. A no-reply step
the MTA did not agree to is answered with continue, as libmilter does. Packets larger than
MAX_PACKET or malformed ones end the connection (the MTA then applies its default action);
a connection silent for `idle_timeout` seconds is closed. An end of message that finds
every worker taken and waits longer than `busy_wait` gets the milter's busy action.

Must not: block the loop on anything but the sockets (end of message runs on the worker
pool), or answer a message before its end-of-message work is done.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import queue
import selectors
import socket
import struct
import threading
import time
from collections import deque
from typing import Any, Callable

import Milter

from atlas_milter.adapters.milter import wire
from atlas_milter.adapters.milter.replies import FORGED_PREFIXES
from atlas_milter.throttle import LogThrottle

log = logging.getLogger(__name__)

MAX_PACKET = 2 * 2**20  # bytes: Postfix and Sendmail send body chunks of at most 64 KB (1 MB negotiated)
RECV_BYTES = 256 * 1024
PROTOCOL_VERSION = 6
STOP_GRACE = 10.0  # seconds a stop waits for messages in progress to be answered
ACCEPT_ERROR_PAUSE = 0.05  # seconds the loop pauses after a failed accept (e.g. out of file descriptors)
ACCEPT_ERROR_LOG_INTERVAL = 10.0

# MTA commands whose step can be negotiated as "no reply", and the bit that says so.
_NR_BIT = {
    b"C": Milter.P_NR_CONN, b"H": Milter.P_NR_HELO, b"M": Milter.P_NR_MAIL, b"R": Milter.P_NR_RCPT,
    b"T": Milter.P_NR_DATA, b"U": Milter.P_NR_UNKN, b"L": Milter.P_NR_HDR, b"N": Milter.P_NR_EOH,
    b"B": Milter.P_NR_BODY,
}
_ALL_NR = sum(set(_NR_BIT.values()))  # distinct bits
_MACRO_STAGES = (b"E", b"N", b"L", b"T", b"R", b"M", b"H", b"C")  # latest first
_MESSAGE_STAGES = (b"E", b"N", b"L", b"T", b"R")  # MAIL's own macros arrive just before MAIL
_REPLY = {Milter.CONTINUE: b"c", Milter.ACCEPT: b"a", Milter.DISCARD: b"d", Milter.REJECT: b"r",
          Milter.TEMPFAIL: b"t", Milter.SKIP: b"s"}


FORGED_PREFIXES_BYTES = tuple(prefix.encode("ascii") for prefix in FORGED_PREFIXES)


class ProtocolError(Exception):
    """The MTA sent something this side cannot follow: the connection is closed."""


def packet(cmd: bytes, data: bytes = b"") -> bytes:
    return struct.pack(">I", len(data) + 1) + cmd + data


def _strings(data: bytes) -> list[bytes]:
    """NUL-terminated strings of a packet."""
    return data.split(b"\0")[:-1]


class LoopContext:
    """What AtlasMilter (through Milter.Base) calls on pymilter's milterContext: macros,
    the macro list for negotiation, and the reply and header changes of one message,
    queued as packets for the end-of-message answer."""

    def __init__(self) -> None:
        self.macros: dict[bytes, dict[str, str]] = {}  # per stage (the command they came with)
        self.symlists: list[tuple[int, str]] = []
        self.changes: list[bytes] = []
        self.reply = ""
        self._priv: Any = None

    def setpriv(self, priv: Any) -> None:
        self._priv = priv

    def getpriv(self) -> Any:
        return self._priv

    def getsymval(self, name: str) -> str | None:
        """The macro from the latest stage that sent it, as libmilter looks them up."""
        for stage in _MACRO_STAGES:
            value = self.macros.get(stage, {}).get(name)
            if value is not None:
                return value
        return None

    def set_macros(self, stage: bytes, fields: list[bytes]) -> None:
        macros: dict[str, str] = {}
        for name, value in zip(fields[::2], fields[1::2]):
            key = name.decode("latin-1")
            macros[key] = macros[key[1:-1] if key.startswith("{") else "{" + key + "}"] = value.decode("utf-8", "replace")
        self.macros[stage] = macros

    def new_message(self) -> None:
        """MAIL FROM: the macros of the previous message's stages and any reply it set are gone."""
        for stage in _MESSAGE_STAGES:
            self.macros.pop(stage, None)
        self.reply = ""

    def setsymlist(self, stage: int, macros: str) -> None:
        self.symlists.append((stage, macros))

    def setreply(self, rcode: str, xcode: str | None = None, msg: str | None = None, *more: str) -> None:
        self.reply = " ".join(part for part in (rcode, xcode, msg) if part)

    def addheader(self, field: str, value: str, idx: int = -1) -> None:
        data = _enc(field) + b"\0" + _enc(value) + b"\0"
        self.changes.append(packet(b"h", data) if idx < 0 else packet(b"i", struct.pack(">I", idx) + data))

    def chgheader(self, field: str, idx: int, value: str) -> None:
        self.changes.append(packet(b"m", struct.pack(">I", idx) + _enc(field) + b"\0" + _enc(value or "") + b"\0"))

    def quarantine(self, reason: str) -> None:
        self.changes.append(packet(b"q", _enc(reason) + b"\0"))


def _enc(text: str | bytes) -> bytes:
    return text if isinstance(text, bytes) else text.encode("utf-8", "surrogateescape")


class Session:
    """One MTA connection: its read buffer, its pending output and its AtlasMilter."""

    def __init__(self, sock: socket.socket, factory: Callable[[], Milter.Base],
                 split: Callable[..., wire.Split] = wire.split_commands_reference) -> None:
        self.sock = sock
        self.factory = factory
        self.split = split
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.busy = False  # end of message is on a worker: nothing more is read until it answers
        self.closing = False  # QUIT seen: the connection closes once the output is sent
        self.last_active = time.monotonic()
        self.sent_protocol = 0  # the protocol flags the MTA agreed to (offered and asked for)
        self.negotiated: tuple[int, int] | None = None
        self.ctx = LoopContext()
        self.milter = self._new_milter()

    def _new_milter(self) -> Milter.Base:
        milter = self.factory()
        milter._setctx(self.ctx)
        self.ctx.setpriv(milter)
        if self.negotiated is not None:  # QUIT_NC: the next connection keeps what was negotiated
            milter._actions, milter._protocol = self.negotiated
        return milter

    # -- packets in ---------------------------------------------------------------------------
    def commands(self) -> list[tuple]:
        """Take the whole packets waiting in the buffer, up to and including an end of message:
        (cmd, data) each, a run of header packets as one wire.HEADER_RUN item."""
        consumed, items, bad = self.split(self.inbuf, MAX_PACKET, FORGED_PREFIXES_BYTES)
        if bad >= 0:
            raise ProtocolError(f"packet of {bad} bytes")
        del self.inbuf[:consumed]
        return items

    def answer(self, cmd: bytes, rc: int) -> bytes:
        """The packet libmilter would send for a callback's return code."""
        if rc == Milter.NOREPLY:  # libmilter answers itself when the MTA did not agree to no reply
            return b"" if self.sent_protocol & _NR_BIT.get(cmd, 0) else packet(b"c")
        if rc in (Milter.REJECT, Milter.TEMPFAIL):
            reply, self.ctx.reply = self.ctx.reply, ""
            if reply[:1] == ("5" if rc == Milter.REJECT else "4"):
                return packet(b"y", _enc(reply) + b"\0")
        if rc == Milter.SKIP and not self.sent_protocol & Milter.P_SKIP:
            rc = Milter.CONTINUE
        try:
            return packet(_REPLY[rc])
        except KeyError:
            raise ProtocolError(f"callback returned {rc}") from None

    def header_run(self, run: bytes, block: bytes, forged: list[bytes], macros: bytes | None) -> bytes:
        """A run of header packets: taken as one block when the MTA agreed to send headers
        without a reply and the message has room for all of them, else packet by packet
        (where the size cap or the memory budget cuts, and with the replies owed)."""
        if macros is not None:
            self.ctx.set_macros(b"L", _strings(macros))
        if not block:
            return b""
        if self.sent_protocol & Milter.P_NR_HDR and self.milter.header_block(block, forged):
            return b""
        return b"".join(self.command(cmd, data) for cmd, data in wire.packets(run))

    def command(self, cmd: bytes, data: bytes) -> bytes:
        """Run one command (not end of message) through the milter; the bytes to send back."""
        m = self.milter
        if cmd == b"L":
            parts = _strings(data)
            if len(parts) != 2:
                raise ProtocolError("malformed header packet")
            return self.answer(cmd, m.header_bytes(parts[0], parts[1]))
        if cmd == b"B":
            return self.answer(cmd, m.body(data))
        if cmd == b"D":
            if data:
                self.ctx.set_macros(data[:1], _strings(data[1:]))
            return b""
        if cmd in (b"M", b"R"):
            args = _strings(data)
            if not args:
                raise ProtocolError("MAIL or RCPT without an address")
            if cmd == b"R":
                return self.answer(cmd, m.envrcpt_bytes(*args))
            self.ctx.new_message()
            return self.answer(cmd, m.envfrom_bytes(*args))
        if cmd == b"T":
            return self.answer(cmd, m.data())
        if cmd == b"N":
            return self.answer(cmd, m.eoh())
        if cmd == b"O":
            return self.negotiate(data)
        if cmd in (b"C", b"H", b"U"):  # connect, HELO, unknown command: AtlasMilter does not use them
            return self.answer(cmd, Milter.CONTINUE)
        if cmd == b"A":
            m.abort()
            return b""
        if cmd == b"K":  # quit, a new connection follows on this socket
            m.close()
            self.ctx = LoopContext()
            self.milter = self._new_milter()
            return b""
        raise ProtocolError(f"unknown command {cmd!r}")

    def negotiate(self, data: bytes) -> bytes:
        if len(data) < 12:
            raise ProtocolError("short option negotiation")
        version, actions, protocol = struct.unpack(">III", data[:12])
        if version < 2:
            raise ProtocolError(f"milter protocol version {version} is too old")
        # As libmilter: the milter is offered every no-reply step, whatever the MTA supports,
        # and the steps the MTA cannot skip an answer are answered here (answer()).
        opts = [actions, protocol | _ALL_NR, 0, 0]
        if self.milter.negotiate(opts) == Milter.ALL_OPTS:  # the milter could not decide: everything offered
            opts = [actions, protocol, 0, 0]
        wanted_actions, wanted_protocol = opts[0] & actions, opts[1]
        self.sent_protocol = wanted_protocol & protocol
        self.negotiated = (wanted_actions, wanted_protocol)
        self.milter._actions, self.milter._protocol = wanted_actions, wanted_protocol
        reply = struct.pack(">III", min(version, PROTOCOL_VERSION), wanted_actions, self.sent_protocol)
        if version >= 6 and wanted_actions & Milter.SETSYMLIST:
            for stage, macros in self.ctx.symlists:
                reply += struct.pack(">I", stage) + macros.encode("ascii") + b"\0"
        self.ctx.symlists = []
        return packet(b"O", reply)

    def end_of_message(self, data: bytes, busy: str = "") -> bytes:
        """On a worker: end of message (a last body chunk first, if the MTA sent one with
        it), then the header changes and the reply. `busy`: why the milter's busy action
        applies instead (the message waited too long for a thread)."""
        m = self.milter
        if data:
            m.body(data)
        rc = m.eom(busy) if busy else m.eom()
        changes = self.ctx.changes
        self.ctx.changes = []
        return b"".join(changes) + self.answer(b"E", rc)


class LoopServer:
    """The accept/read/write loop over all connections, and the worker pool for end of message."""

    def __init__(self, listener: socket.socket, factory: Callable[[], Milter.Base], workers: int,
                 idle_timeout: float, nodelay: bool = False, busy_wait: float = 0.05, compiled: bool = True) -> None:
        self.listener = listener
        self.split = wire.splitter(compiled)  # compiled (ENABLE_COMPILED, where built) or the reference
        self.busy_wait = busy_wait  # an end of message waiting longer for a thread gets the busy action
        self.factory = factory
        self.idle_timeout = idle_timeout
        self.nodelay = nodelay
        self.selector = selectors.DefaultSelector()
        # A fixed set of end-of-message threads, all started now: the thread count stays the same.
        self.jobs: queue.SimpleQueue[tuple[Session, bytes, float] | None] = queue.SimpleQueue()
        self._in_flight = 0  # ends of message queued or running, not yet answered
        self._in_flight_lock = threading.Lock()
        self.workers = [threading.Thread(target=self._work, name=f"atlas-milter-eom-{n}", daemon=True)
                        for n in range(workers)]
        for thread in self.workers:
            thread.start()
        self.finished: deque[tuple[Session, bytes | None]] = deque()
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self.sessions: set[Session] = set()
        self._stop = threading.Event()
        self._closed = False
        self._pipe_lock = threading.Lock()  # a wake-up never writes to the pipe while serve() closes it
        self._accept_failure_log = LogThrottle(ACCEPT_ERROR_LOG_INTERVAL)

    def stop(self) -> None:
        """From any thread: accept no more connections, answer the messages in progress, return."""
        self._stop.set()
        self._wake()

    def _wake(self) -> None:
        with self._pipe_lock:
            if self._closed:  # serve() has returned and closed the pipe (a late second stop signal)
                return
            try:
                os.write(self.wake_w, b"x")
            except BlockingIOError:
                pass  # a wake-up is pending already

    def serve(self) -> None:
        self.listener.setblocking(False)
        self.selector.register(self.listener, selectors.EVENT_READ, "listen")
        self.selector.register(self.wake_r, selectors.EVENT_READ, "wake")
        last_sweep = time.monotonic()
        try:
            while not self._stop.is_set():
                for key, events in self.selector.select(1.0):
                    self._event(key, events)
                now = time.monotonic()
                if now - last_sweep >= 1.0:
                    last_sweep = now
                    for session in [s for s in self.sessions if not s.busy and now - s.last_active > self.idle_timeout]:
                        log.info("milter: closing a connection silent for %g s", self.idle_timeout)
                        self._drop(session)
            self.selector.unregister(self.listener)
            self.listener.close()
            deadline = time.monotonic() + STOP_GRACE
            while any(s.busy for s in self.sessions) and time.monotonic() < deadline:
                for key, events in self.selector.select(0.1):  # the listener is gone already
                    self._event(key, events)
        finally:
            for session in list(self.sessions):
                self._drop(session)
            for _ in self.workers:  # not joined: a hung classification must not hold the exit
                self.jobs.put(None)
            self.selector.close()
            with self._pipe_lock:
                self._closed = True
                os.close(self.wake_r)
                os.close(self.wake_w)

    def _event(self, key: selectors.SelectorKey, events: int) -> None:
        if key.data == "listen":
            self._accept()
        elif key.data == "wake":
            try:
                while os.read(self.wake_r, 4096):
                    pass
            except BlockingIOError:
                pass
            while self.finished:
                session, out = self.finished.popleft()
                session.busy = False
                if out is None:
                    self._drop(session)
                else:
                    self._send(session, out)
                    self._run(session)
        else:
            session = key.data
            if events & selectors.EVENT_WRITE:
                self._flush(session)
            if events & selectors.EVENT_READ:
                self._read(session)

    def _accept(self) -> None:
        for _ in range(64):
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and the like: keep serving the others, without spinning
                if self._accept_failure_log.due() is not None:
                    log.error("milter: cannot accept MTA connections: %s (raise LimitNOFILE?)", exc)
                time.sleep(ACCEPT_ERROR_PAUSE)
                return
            conn.setblocking(False)
            if self.nodelay:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            session = Session(conn, self.factory, self.split)
            self.sessions.add(session)
            self.selector.register(conn, selectors.EVENT_READ, session)

    def _read(self, session: Session) -> None:
        try:
            data = session.sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the MTA closed the connection
            self._drop(session)
            return
        session.last_active = time.monotonic()
        session.inbuf += data
        if not session.busy:
            self._run(session)

    def _run(self, session: Session) -> None:
        """Handle the commands waiting on `session` until an end of message goes to a worker."""
        while not session.busy and session in self.sessions:
            try:
                commands = session.commands()
                if not commands:
                    return
                out = []
                for item in commands:
                    cmd = item[0]
                    if cmd == wire.HEADER_RUN:
                        out.append(session.header_run(*item[1:]))
                    elif cmd == b"Q":
                        session.milter.close()
                        session.closing = True
                    elif cmd == b"E":
                        session.busy = True
                        # Timed only when every thread is taken by an earlier one: a free thread may
                        # still need a moment to get the GIL (a reload parsing a model holds it),
                        # which is not "busy".
                        with self._in_flight_lock:
                            queued_at = time.monotonic() if self._in_flight >= len(self.workers) else math.inf
                            self._in_flight += 1
                        self.jobs.put((session, item[1], queued_at))
                    else:
                        out.append(session.command(cmd, item[1]))
            except ProtocolError as exc:
                log.warning("milter: closing a connection: %s", exc)
                self._drop(session)
                return
            except Exception as exc:  # noqa: BLE001 - a bug here ends one connection, not the milter
                log.error("milter: closing a connection after an internal error: %s: %s", type(exc).__name__, exc,
                          exc_info=True)
                self._drop(session)
                return
            self._send(session, b"".join(out))
            if session.closing and not session.outbuf:
                self._drop(session)
                return

    def _work(self) -> None:
        while (job := self.jobs.get()) is not None:
            session, data, queued_at = job
            waited = max(0.0, time.monotonic() - queued_at)
            busy = f"no end-of-message thread free for {waited * 1000:.0f} ms" if waited > self.busy_wait else ""
            try:
                self._end_of_message(session, data, busy)
            finally:
                with self._in_flight_lock:
                    self._in_flight -= 1

    def _end_of_message(self, session: Session, data: bytes, busy: str) -> None:
        try:
            out: bytes | None = session.end_of_message(data, busy)
        except Exception as exc:  # noqa: BLE001 - AtlasMilter.eom catches its own; this is the packet layer
            log.error("milter: end of message failed: %s: %s", type(exc).__name__, exc, exc_info=True)
            out = None
        self.finished.append((session, out))
        self._wake()

    def _send(self, session: Session, data: bytes) -> None:
        if not data or session not in self.sessions:
            return
        session.outbuf += data
        self._flush(session)

    def _flush(self, session: Session) -> None:
        try:
            while session.outbuf:
                sent = session.sock.send(session.outbuf)
                del session.outbuf[:sent]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.ECONNRESET):
                log.warning("milter: writing to the MTA failed: %s", exc)
            self._drop(session)
            return
        wanted = selectors.EVENT_READ | (selectors.EVENT_WRITE if session.outbuf else 0)
        if self.selector.get_key(session.sock).events != wanted:
            self.selector.modify(session.sock, wanted, session)
        if session.closing and not session.outbuf:
            self._drop(session)

    def _drop(self, session: Session) -> None:
        if session not in self.sessions:
            return
        self.sessions.discard(session)
        try:
            self.selector.unregister(session.sock)
        except (KeyError, ValueError):
            pass
        session.sock.close()
        if not session.busy and not session.closing:
            try:
                session.milter.close()  # releases the message's share of the byte budget
            except Exception:  # noqa: BLE001
                log.error("milter: close failed", exc_info=True)
