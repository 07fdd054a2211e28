"""Owns leases in the shared Redis: with [cluster], exactly one host watches an IMAP account.
A listener holds `{prefix}:lease:imap:<user>@<server>` (SET NX PX with its own token),
renews it well inside its time to live (a Lua script: only the holder extends it), and
gives it up on a clean stop. Another host configured for the same account waits as a
standby and takes the lease over once the holder has stopped renewing it (a crash, a
network split): within one time to live.

A holder that cannot renew (Redis down, or another host holds the lease) stops watching
before its lease can have expired, so two hosts never act on one mailbox at once; while
Redis is down nobody can take a lease over, and the holder keeps the mailbox until its
time to live runs out. The new holder starts from the mailbox as it is then (what
arrived between the holder's last message and the takeover stays unclassified, never
acted on twice).

Must not: watch mailboxes or touch mail (adapters/imap/listener.py does, when it holds the lease).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from typing import Any, Callable

from atlas_milter.redis_link import RedisDown, RedisLink, link_from_config
from atlas_milter.signals import RELOAD_SIGNAL, STOP_SIGNALS, blocked

log = logging.getLogger(__name__)

# KEYS[1] the lease; ARGV[1] our token, ARGV[2] the time to live (ms). 1 when ours and extended.
RENEW_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class Lease:
    """One lease: `acquire()` and `renew()` say whether we hold it; `release()` on a clean stop."""

    def __init__(self, link: RedisLink, name: str, ttl: float, prefix: str = "atlas") -> None:
        self.link = link
        self.key = f"{{{prefix}}}:lease:{name}"
        self.ttl_ms = int(ttl * 1000)
        self.token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.renewed_at = 0.0  # monotonic time of the last successful acquire/renew
        self._renew = link.client.register_script(RENEW_LUA)
        self._release = link.client.register_script(RELEASE_LUA)

    def acquire(self) -> bool:
        try:
            ok = self.link.call(lambda: self.link.client.set(self.key, self.token, nx=True, px=self.ttl_ms))
        except RedisDown:
            return False
        if ok:
            self.renewed_at = time.monotonic()
        return bool(ok)

    def renew(self) -> bool:
        """Extend our lease; False when it is not ours any more or Redis cannot say."""
        try:
            ok = self.link.call(lambda: self._renew(keys=[self.key], args=[self.token, self.ttl_ms]))
        except RedisDown:
            return False
        if ok:
            self.renewed_at = time.monotonic()
        return bool(ok)

    def still_safe(self, margin: float) -> bool:
        """Has our last renewal still `margin` seconds of its time to live left?"""
        return time.monotonic() - self.renewed_at < self.ttl_ms / 1000 - margin

    def holder(self) -> str:
        try:
            return self.link.call(lambda: self.link.client.get(self.key)) or ""
        except RedisDown:
            return ""

    def release(self) -> None:
        try:
            self.link.call(lambda: self._release(keys=[self.key], args=[self.token]))
        except RedisDown:
            pass


class LeaseKeeper:
    """Renews a held lease every third of its time to live from a thread; calls
    `on_lost(why)` once, and stops, when it cannot renew and the last renewal is less than
    a third of the time to live from running out (or another host holds the lease)."""

    def __init__(self, lease: Lease, on_lost: Callable[[str], None]) -> None:
        self.lease = lease
        self.on_lost = on_lost
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="atlas-lease", daemon=True)

    def start(self) -> "LeaseKeeper":
        with blocked(STOP_SIGNALS | {RELOAD_SIGNAL}):
            self._thread.start()
        return self

    def _run(self) -> None:
        ttl = self.lease.ttl_ms / 1000
        while not self._stop.wait(ttl / 3):
            if self.lease.renew():
                continue
            holder = self.lease.holder()
            if holder and holder != self.lease.token:
                self.on_lost(f"host {holder.split(':')[0]} holds the lease of {self.lease.key} now")
                return
            if not self.lease.still_safe(ttl / 3):
                self.on_lost(f"cannot renew the lease of {self.lease.key} (Redis unreachable)")
                return

    def stop(self) -> None:
        """A clean stop: the lease is given up at once (a standby takes over without waiting)."""
        self._stop.set()
        self._thread.join(5)
        self.lease.release()


def hold_imap_account(cluster: Any, user: str, server: str, stopping: threading.Event,
                      on_lost: Callable[[str], None]) -> LeaseKeeper | None:
    """Wait (as a standby) until this host holds the lease of the IMAP account user@server,
    then keep it; None when `stopping` is set first."""
    lease = Lease(link_from_config(cluster), f"imap:{user}@{server}", cluster.lease_ttl, cluster.key_prefix)
    said = False
    while not lease.acquire():
        if not said:
            holder = lease.holder()
            log.info("imap: %s@%s is watched by %s; standing by to take over", user, server,
                     holder.split(":")[0] if holder else "another host (or Redis is unreachable)")
            said = True
        if stopping.wait(lease.ttl_ms / 5000):
            return None
    log.info("imap: holding the lease of %s@%s (time to live %g s)", user, server, lease.ttl_ms / 1000)
    return LeaseKeeper(lease, on_lost).start()
