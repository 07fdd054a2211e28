"""Owns the systemd readiness protocol (`Type=notify`): one datagram with `READY=1`,
`STOPPING=1`, `RELOADING=1` or `STATUS=…` to the unix socket named by $NOTIFY_SOCKET.

No libsystemd, no dependency: the protocol is a single `sendto`. A leading '@' in the
path means the Linux abstract namespace (a NUL byte). Without $NOTIFY_SOCKET (not run by
systemd, or Type=simple) every call is a no-op. Never raises: a daemon must not die
because its supervisor went away.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Mapping

log = logging.getLogger(__name__)


def notify_address(env: Mapping[str, str] | None = None) -> str | bytes | None:
    """The address to send to, or None when there is none (or it is not a unix socket)."""
    path = (os.environ if env is None else env).get("NOTIFY_SOCKET", "")
    if path.startswith("@"):
        return b"\0" + path[1:].encode()
    if path.startswith("/"):
        return path
    return None  # unset, empty, or a vsock address (vsock:CID:PORT), which we do not speak


def sd_notify(state: str, env: Mapping[str, str] | None = None) -> bool:
    """Send `state` (e.g. "READY=1" or "READY=1\\nSTATUS=listening") to systemd;
    True when a datagram was sent, False when there is nowhere to send or sending failed."""
    addr = notify_address(env)
    if addr is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), addr)
        return True
    except OSError as exc:
        log.warning("sd_notify(%s) failed: %s", state.split("\n", 1)[0], exc)
        return False
