"""Owns one question about hosts: is this name or address on this machine (loopback)?

Both front doors ask it before sending something unprotected (a password over plain IMAP,
the /performance page without a token). Must not: connect anywhere or cache answers.
"""

from __future__ import annotations

import ipaddress
import socket

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


def is_loopback_literal(host: str) -> bool:
    """True for a loopback IP literal (127.0.0.0/8, ::1; `[::1]` and a `%zone` accepted) or
    one of the conventional loopback names. Never resolves: for Host headers and the like."""
    name = host.strip()
    if name.lower() in LOOPBACK_NAMES:
        return True
    name = name[1:-1] if name.startswith("[") and name.endswith("]") else name
    try:
        return ipaddress.ip_address(name.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def is_loopback(host: str) -> bool:
    """True for what `is_loopback_literal` accepts, and for a name that resolves to loopback
    addresses only (e.g. the host's own name mapped to 127.0.1.1 in /etc/hosts). A name that
    does not resolve, or resolves to any other address, is not loopback."""
    if is_loopback_literal(host):
        return True
    name = host.strip()
    if not name or name.startswith("["):
        return False
    try:
        ipaddress.ip_address(name.split("%", 1)[0])
        return False  # an address that is not loopback: nothing to resolve
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(name, None)
    except (OSError, UnicodeError):
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)
