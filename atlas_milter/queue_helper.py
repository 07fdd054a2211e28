"""Owns privilege separation for the quarantine. Releasing and deleting held mail need root
(`postsuper` refuses anyone else), and the milter runs as an unprivileged user under a
hardened unit. So a small root service, `atlas-milter queue-helper` (systemd:
atlas-milter-queue.socket), runs the MTA's queue tools on the daemon's behalf, and the
daemon's console talks to it through `HelperQueue`, a HoldQueue like any other.

The protocol is one JSON line each way per connection: {"op": "held" | "read" | "release"
| "delete", "queue_id": ID} and {"ok": ...} or {"error": "one line"}. Only those four
operations exist; queue ids are checked before anything runs (mta_queue.check_queue_id).
Who may ask is decided by the socket file's owner, group and mode (root:atlas-milter 0660);
every request is logged with the asking process's uid and pid (SO_PEERCRED).

Must not: run anything but the four operations, take any argument but a checked queue id,
or read the verdict database (the console records what it did).
"""

from __future__ import annotations

import base64
import grp
import json
import logging
import os
import socket
import struct
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any

from atlas_milter.errors import AtlasError
from atlas_milter.mta_queue import Held, HoldQueue, check_queue_id

log = logging.getLogger(__name__)

MAX_REQUEST = 1024  # bytes of one request line
CLIENT_TIMEOUT = 90.0  # seconds the client waits: the helper's command limit (30 s) and then some
REQUEST_TIMEOUT = 10.0  # seconds the helper waits for a client to send its request
SD_LISTEN_FDS_START = 3
OPS = ("held", "read", "release", "delete")


# -- the client, in the unprivileged daemon ---------------------------------------------------

class HelperQueue:
    """The MTA's hold queue, reached through the queue helper's socket."""

    def __init__(self, socket_path: str, name: str = "postfix", timeout: float = CLIENT_TIMEOUT) -> None:
        self.socket_path = socket_path
        self.name = name
        self._timeout = timeout

    def _ask(self, op: str, queue_id: str = "") -> Any:
        request = json.dumps({"op": op, "queue_id": check_queue_id(queue_id) if queue_id else ""}).encode() + b"\n"
        where = f"the queue helper at {self.socket_path}"
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(self._timeout)
                sock.connect(self.socket_path)
                sock.sendall(request)
                reply = sock.makefile("rb").readline()
        except (FileNotFoundError, ConnectionRefusedError):
            raise AtlasError(f"{where} is not running (systemctl enable --now atlas-milter-queue.socket)") from None
        except PermissionError:
            raise AtlasError(f"{where}: permission denied (this user needs the socket's group, atlas-milter)") from None
        except socket.timeout:
            raise AtlasError(f"{where} did not answer within {self._timeout:g} s") from None
        except OSError as exc:
            raise AtlasError(f"{where}: {exc.strerror or exc}") from None
        try:
            answer = json.loads(reply)
        except ValueError:
            raise AtlasError(f"{where} gave no answer (see its log: journalctl -u atlas-milter-queue)") from None
        if "error" in answer:
            raise AtlasError(str(answer["error"]))
        return answer.get("ok")

    def held(self) -> list[Held]:
        return [Held(h["queue_id"], h["arrival"], h["size"], h["sender"], tuple(h["recipients"]), h.get("reason", ""))
                for h in self._ask("held")]

    def read(self, queue_id: str) -> bytes:
        return base64.b64decode(self._ask("read", queue_id))

    def release(self, queue_id: str) -> None:
        self._ask("release", queue_id)

    def delete(self, queue_id: str) -> None:
        self._ask("delete", queue_id)


# -- the service, as root ---------------------------------------------------------------------

def answer(queue: HoldQueue, request: bytes) -> dict[str, Any]:
    """The reply to one request line (never raises for a bad request)."""
    try:
        data = json.loads(request)
        op, queue_id = data["op"], data.get("queue_id") or ""
        if op not in OPS or not isinstance(queue_id, str):
            raise ValueError
    except (ValueError, KeyError, TypeError):
        return {"error": f"queue helper: not a request (one JSON line: op one of {', '.join(OPS)}, queue_id)"}
    try:
        if op == "held":
            return {"ok": [asdict(h) for h in queue.held()]}
        check_queue_id(queue_id)
        if op == "read":
            return {"ok": base64.b64encode(queue.read(queue_id)).decode()}
        getattr(queue, op)(queue_id)
        return {"ok": True}
    except AtlasError as exc:
        return {"error": str(exc)}


def _peer(conn: socket.socket) -> str:
    try:
        pid, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
        return f"uid {uid} pid {pid}"
    except OSError:
        return "unknown peer"


def handle(queue: HoldQueue, conn: socket.socket) -> None:
    with conn:
        conn.settimeout(REQUEST_TIMEOUT)
        try:
            request = conn.makefile("rb").readline(MAX_REQUEST)
        except OSError:
            return
        reply = answer(queue, request)
        try:
            shown = json.loads(request)
        except ValueError:
            shown = "(not JSON)"
        log.info("queue helper: %s asked %s: %s", _peer(conn), shown, "ok" if "ok" in reply else reply["error"])
        try:
            conn.sendall(json.dumps(reply).encode() + b"\n")
        except OSError:
            pass


def listening_socket(path: str, group: str = "", mode: int = 0o660) -> socket.socket:
    """systemd's socket (socket activation) when it passed one, else a new one at `path`,
    owned by `group` with `mode`."""
    if os.environ.get("LISTEN_PID") == str(os.getpid()) and int(os.environ.get("LISTEN_FDS", "0")) >= 1:
        return socket.socket(fileno=SD_LISTEN_FDS_START)
    if not path:
        raise AtlasError("queue-helper: give --socket PATH (or start it from atlas-milter-queue.socket)")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        Path(path).unlink(missing_ok=True)
        sock.bind(path)
        os.chmod(path, mode)
        if group:
            os.chown(path, -1, grp.getgrnam(group).gr_gid)
        sock.listen(16)
    except KeyError:
        sock.close()
        raise AtlasError(f"queue-helper: --socket-group {group}: no such group") from None
    except OSError as exc:
        sock.close()
        raise AtlasError(f"queue-helper: {path}: {exc.strerror or exc}") from None
    return sock


def serve(queue: HoldQueue, sock: socket.socket, stop: threading.Event | None = None) -> None:
    """Answer requests one at a time until `stop` is set (or forever)."""
    sock.settimeout(0.5)
    log.info("queue helper: serving the %s hold queue", queue.name)
    while stop is None or not stop.is_set():
        try:
            conn, _ = sock.accept()
        except socket.timeout:
            continue
        handle(queue, conn)
