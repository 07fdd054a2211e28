"""Owns the connection to the shared Redis (a URL, or a Sentinel-monitored primary) and the
few commands shared learning needs, each with an explicit short timeout and behind a
circuit breaker: publishing a learn (one Lua script: the message's seen key, set with an
expiry, and the stream append in one step, so the same message learned on three hosts is
one event), reading the stream after a position, and storing and reading the snapshot the
stream is folded into (one Lua script: store it unless a newer one is there, and trim the
stream up to it).

All keys share one hash tag (`{atlas}:...` by default), so the script also runs on Redis
Cluster. redis-py's defaults wait for seconds on a hung server; here every call gives up
after [cluster] timeout, and after a failure the breaker keeps calls away for a cool-down
(counted, gauged, logged once per change of state, never per message).

Must not: block the per-message path (nothing here is called while a message is scored)
or decide what a learn means (learn_events.py).
"""

from __future__ import annotations

import base64
import logging
import threading
from typing import Any, Callable

from atlas_milter.breaker import Breaker
from atlas_milter.errors import AtlasError
from atlas_milter.learn_events import LearnEvent

log = logging.getLogger(__name__)

# KEYS[1] the message's seen key, KEYS[2] the stream; ARGV[1] the seen key's time to live
# (s), ARGV[2] the event id, ARGV[3...] the event's fields. Returns {the new entry's id, ""}
# or, when that message was learned with that label already (by any host, or by this very
# event whose reply was lost), {"", the event id that learned it}.
PUBLISH_LUA = """
if not redis.call('SET', KEYS[1], ARGV[2], 'NX', 'EX', ARGV[1]) then
  return {'', redis.call('GET', KEYS[1])}
end
local fields = {}
for i = 3, #ARGV do fields[#fields + 1] = ARGV[i] end
return {redis.call('XADD', KEYS[2], '*', unpack(fields)), ''}
"""
# KEYS[1] the snapshot hash, KEYS[2] the stream; ARGV[1] the snapshot's stream position,
# ARGV[2] its data, ARGV[3] the compacting host, ARGV[4] ms of stream to keep before now.
# Stores the snapshot unless one at or after that position is there (0), then trims the
# stream up to it, keeping the last ARGV[4] ms for hosts still reading them (1).
STORE_SNAPSHOT_LUA = """
local function id(text)
  local ms, seq = string.match(text, '^(%d+)-?(%d*)$')
  return tonumber(ms), tonumber(seq) or 0
end
local new_ms, new_seq = id(ARGV[1])
local current = redis.call('HGET', KEYS[1], 'position')
if current then
  local ms, seq = id(current)
  if new_ms < ms or (new_ms == ms and new_seq <= seq) then return 0 end
end
redis.call('HSET', KEYS[1], 'position', ARGV[1], 'data', ARGV[2], 'host', ARGV[3])
local now = redis.call('TIME')
local keep_from = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) - tonumber(ARGV[4])
local min_id
if keep_from <= new_ms then
  min_id = string.format('%.0f-0', keep_from)
else
  min_id = string.format('%.0f-%.0f', new_ms, new_seq + 1)
end
redis.call('XTRIM', KEYS[2], 'MINID', min_id)
return 1
"""
REDIS_PASSWORD_ENV = "ATLAS_REDIS_PASSWORD"
REDIS_PASSWORD_CREDENTIAL = "redis-password"
BLOCK_S = 0.1  # seconds a stream read waits for new entries (a local learn waits at most this for its swap)


class RedisDown(Exception):
    """Redis is unreachable, hung, or the breaker is open: use the local outbox."""


class RedisLink:
    """The shared Redis of one host: `publish(event)`, `read(after, block_s)`, `ping()`."""

    def __init__(self, url: str = "", sentinels: tuple[str, ...] = (), service: str = "atlas", password: str = "",
                 prefix: str = "atlas", timeout: float = 0.25, cooldown: float = 1.0, min_replicas: int = 0,
                 seen_ttl: int = 30 * 86400, redis_cluster: bool = False) -> None:
        if not url and not sentinels:
            raise AtlasError("[cluster]: give redis = \"redis://HOST:PORT/DB\" or sentinels = [\"HOST:PORT\", ...]")
        self.timeout = timeout
        self.min_replicas = min_replicas
        self.seen_ttl = seen_ttl
        self.prefix = prefix
        if redis_cluster and (sentinels or min_replicas):
            raise AtlasError("[cluster] redis_cluster: give redis = one node's URL, and no sentinels or min_replicas")
        self.redis_cluster = redis_cluster
        self.client = _client(url, sentinels, service, password, timeout, redis_cluster)
        # A blocking read waits BLOCK_S on purpose: its own connection, with room for that.
        self.reader = _client(url, sentinels, service, password, BLOCK_S + timeout, redis_cluster)
        where = f"sentinel {','.join(sentinels)} service {service}" if sentinels else url.split("@")[-1]  # no password
        self.breaker = Breaker(cooldown, f"cluster: Redis at {where}")
        self.stream_key = f"{{{prefix}}}:learn"
        self.snapshot_key = f"{{{prefix}}}:snapshot"
        self._publish = self.client.register_script(PUBLISH_LUA)
        self._store_snapshot = self.client.register_script(STORE_SNAPSHOT_LUA)

    def call(self, fn: Any) -> Any:
        """`fn()` (redis-py calls) through the breaker: RedisDown when Redis is unreachable,
        hung or read-only (a replica after a failover), or the breaker is open."""
        import redis

        if not self.breaker.allow():
            raise RedisDown("breaker open")
        try:
            result = fn()
        except (redis.ConnectionError, redis.TimeoutError, OSError, redis.exceptions.ClusterError,
                redis.exceptions.RedisClusterException) as exc:  # a Redis Cluster down or without its slot
            self.breaker.failure(type(exc).__name__)
            raise RedisDown(str(exc)) from None
        except redis.ResponseError as exc:
            if "READONLY" in str(exc) or "LOADING" in str(exc) or "MASTERDOWN" in str(exc):
                self.breaker.failure(str(exc).split()[0])  # a replica after a failover, or a restart
                raise RedisDown(str(exc)) from None
            raise
        self.breaker.success()
        return result

    def ping(self) -> bool:
        try:
            return bool(self.call(self.client.ping))
        except RedisDown:
            return False

    def publish(self, event: LearnEvent) -> tuple[str, str, bool]:
        """Append the event to the stream: (its entry id, "", replicated); or, when that
        message was learned with that label before, ("", the event id that did,
        replicated). `replicated`: `min_replicas` replicas have this connection's writes
        (WAIT, in the same round trip): until they do, a learn stays in the outbox, so a
        failover cannot lose it. RedisDown when Redis cannot take it now."""
        seen_key = f"{{{self.prefix}}}:seen:{event.fingerprint}:{event.label}"  # expires after seen_ttl
        argv = [self.seen_ttl, event.event_id, *[x for kv in event.fields().items() for x in kv]]

        if self.redis_cluster:  # one node holds every key (the hash tag): the script alone
            entry, first = self.call(lambda: self._publish(keys=[seen_key, self.stream_key], args=argv))
            return entry or "", first or "", True

        def run() -> Any:
            pipe = self.client.pipeline(transaction=False)  # one connection: WAIT covers the script's write
            self._publish(keys=[seen_key, self.stream_key], args=argv, client=pipe)
            if self.min_replicas > 0:  # WAIT's own limit stays inside the socket timeout
                pipe.execute_command("ROLE")
                pipe.execute_command("WAIT", self.min_replicas, max(1, int(self.timeout * 600)))
            return pipe.execute()

        replies = self.call(run)
        entry, first = replies[0]
        replicated = True
        if self.min_replicas > 0:
            # As many replicas as asked, or every replica there is: a primary left alone after
            # a failover cannot do better, and keeping learns out of the stream helps nobody.
            connected = len(replies[1][2]) if replies[1] and replies[1][0] == "master" else 0
            replicated = int(replies[2]) >= min(self.min_replicas, connected)
        return entry or "", first or "", replicated

    def read(self, after: str, block: bool = False, count: int = 500) -> list[tuple[str, dict[str, str]]]:
        """Stream entries after `after` ("0": from the start); with `block`, waiting up to
        BLOCK_S for the first one."""
        if block:
            reply = self.call(lambda: self.reader.xread({self.stream_key: after}, count=count,
                                                         block=int(BLOCK_S * 1000)))
        else:
            reply = self.call(lambda: self.client.xread({self.stream_key: after}, count=count))
        if not reply:
            return []
        entries = next(iter(reply.values()))[0] if isinstance(reply, dict) else reply[0][1]  # RESP3 / RESP2
        return [(entry_id, data) for entry_id, data in entries]


    def snapshot_position(self) -> str:
        """The stream position of the latest snapshot ("0": none yet)."""
        return self.call(lambda: self.client.hget(self.snapshot_key, "position")) or "0"

    def read_snapshot(self) -> tuple[str, bytes] | None:
        """(position, data) of the latest snapshot, or None. Read on the connection with room
        for a larger reply."""
        found = self.call(lambda: self.reader.hmget(self.snapshot_key, ["position", "data"]))
        if not found or not found[0] or not found[1]:
            return None
        return found[0], base64.b64decode(found[1])

    def store_snapshot(self, position: str, data: bytes, host: str, keep_ms: int) -> bool:
        """Store a snapshot taken at `position` and trim the stream up to it (keeping the last
        `keep_ms` of entries); False when a snapshot at or after `position` is there."""
        encoded = base64.b64encode(data).decode()
        return bool(self.call(lambda: self._store_snapshot(
            keys=[self.snapshot_key, self.stream_key], args=[position, encoded, host, keep_ms], client=self.reader)))


class _LazyCluster:
    """A redis-py RedisCluster made on first use: its constructor asks a node for the slot
    map, and a daemon must start (and count Redis as down) while the cluster is down."""

    def __init__(self, make: Callable[[], Any]) -> None:
        self._make = make
        self._client: Any = None
        self._lock = threading.Lock()

    def register_script(self, script: str) -> Any:
        from redis.commands.core import Script

        return Script(self, script.encode())  # as bytes: no encoder needed, so no connection yet

    def __getattr__(self, name: str) -> Any:
        with self._lock:
            if self._client is None:
                self._client = self._make()
        return getattr(self._client, name)


def _client(url: str, sentinels: tuple[str, ...], service: str, password: str, timeout: float,
            redis_cluster: bool = False) -> Any:
    """A redis-py client whose every call gives up after `timeout` and is never retried."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry
    from redis.sentinel import Sentinel

    # redis-py's default retries a failed call 10 times with a growing back-off: seconds of
    # stall against a dead or hung server. None here: the breaker and the outbox handle it.
    options: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout,
                               "decode_responses": True, "retry": Retry(NoBackoff(), 0), "health_check_interval": 0}
    if password:
        options["password"] = password
    if sentinels:
        sentinel = Sentinel([_host_port(s) for s in sentinels],
                            sentinel_kwargs={"socket_timeout": timeout, "socket_connect_timeout": timeout}, **options)
        return sentinel.master_for(service, **options)
    if redis_cluster:
        from redis.cluster import RedisCluster

        del options["health_check_interval"]
        return _LazyCluster(lambda: RedisCluster.from_url(url, **options))
    return redis.Redis.from_url(url, **options)


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise AtlasError(f"[cluster] sentinels: {text!r}: use HOST:PORT")
    return host.strip("[]"), int(port)


def link_from_config(cc: Any) -> "RedisLink":
    """The RedisLink [cluster] describes (the password from its file, the environment or the
    systemd credential redis-password)."""
    from atlas_milter.secrets import read_secret

    password = read_secret(cc.password_file, REDIS_PASSWORD_ENV, REDIS_PASSWORD_CREDENTIAL, "[cluster] password_file")
    return RedisLink(cc.redis, cc.sentinels, cc.sentinel_service, password, cc.key_prefix, cc.timeout, cc.cooldown,
                     cc.min_replicas, int(cc.seen_days * 86400), cc.redis_cluster)
