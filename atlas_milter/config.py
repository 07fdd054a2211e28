"""Owns the configuration: one TOML file, command-line overrides, the `ENABLE_*`
environment flags and the size profiles, folded into one frozen `Config`.

Loaded once at start and passed in; no other module reads the environment or the file.
An unknown key or a bad value raises `ConfigError` naming the key, e.g.
`config: [classifier] spam_cutof: unknown key (known: ham_cutoff, max_bytes, model, spam_cutoff)`.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from atlas_milter.errors import ConfigError

DEFAULT_CONFIG_PATH = Path("/etc/atlas-milter/atlas-milter.toml")

# Size profiles: worker count, memory limit for streaming (MB), batch size for the bulk writer.
PROFILES: dict[str, dict[str, int]] = {
    "small": {"workers": 2, "memory_limit_mb": 200, "batch_size": 100},
    "medium": {"workers": 4, "memory_limit_mb": 500, "batch_size": 500},
    "large": {"workers": 8, "memory_limit_mb": 1000, "batch_size": 1000},
}

FEATURE_FLAGS = {
    "ENABLE_MONITORING": "monitoring",
    "ENABLE_CACHING": "caching",
    "ENABLE_BULK_OPS": "bulk_ops",
    "ENABLE_PARALLEL": "parallel",
    "ENABLE_STREAMING": "streaming",
    "ENABLE_COMPILED": "compiled",
}
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def auto_profile(cpus: int | None = None, mem_mb: int | None = None) -> str:
    """Pick a profile from the machine: the largest whose worker count the CPUs can feed
    and whose memory limit is at most a quarter of RAM."""
    cpus = cpus if cpus is not None else (os.cpu_count() or 1)
    if mem_mb is None:
        try:
            mem_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
        except (ValueError, OSError, AttributeError):
            mem_mb = 1024
    for name in ("large", "medium"):
        prof = PROFILES[name]
        if cpus >= prof["workers"] and mem_mb >= 4 * prof["memory_limit_mb"]:
            return name
    return "small"


@dataclass(frozen=True)
class ClassifierConfig:
    model: str = ""  # path to a model file; empty means the model shipped in the package
    spam_cutoff: float = 0.0  # 0 means: the cutoff stored in the model
    ham_cutoff: float = 0.0  # 0 means: the cutoff stored in the model
    max_bytes: int = 512 * 1024  # bytes of each message analysed; the rest is ignored
    # authserv-ids of your own verifier (OpenDKIM, OpenDMARC, ...): only their Authentication-Results are read
    trusted_authserv_id: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for ident in self.trusted_authserv_id:
            if not ident or any(ch.isspace() or ch in ";()" for ch in ident):
                raise ConfigError(f"config: [classifier] trusted_authserv_id: {ident!r} is not an authserv-id "
                                  "(the first word of your verifier's Authentication-Results, e.g. \"mx.example.org\")")
        for key in ("spam_cutoff", "ham_cutoff"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"config: [classifier] {key}: must be between 0 and 1")
        if self.spam_cutoff and self.ham_cutoff and self.ham_cutoff > self.spam_cutoff:
            raise ConfigError("config: [classifier] ham_cutoff: must not exceed spam_cutoff")
        if self.max_bytes < 1024:
            raise ConfigError("config: [classifier] max_bytes: must be at least 1024")


@dataclass(frozen=True)
class PerformanceConfig:
    profile: str = "auto"  # small | medium | large | auto
    workers: int = 0  # 0 means: from the profile
    memory_limit_mb: int = 0  # 0 means: from the profile
    batch_size: int = 0  # 0 means: from the profile
    chunk_size: int = 500  # messages per streaming chunk (the parent overlaps scoring within a chunk: measured ~8% faster than 100)
    cache_size: int = 10000  # verdicts kept in the TTL cache
    cache_ttl: float = 3600.0  # seconds a cached verdict stays valid
    flush_interval: float = 1.0  # seconds between bulk-writer flushes
    queue_size: int = 10000  # records the bulk writer may hold before it refuses more

    def __post_init__(self) -> None:
        if self.profile not in (*PROFILES, "auto"):
            raise ConfigError(
                f"config: [performance] profile: {self.profile!r} is not one of small, medium, large, auto"
            )
        for key in ("workers", "memory_limit_mb", "batch_size", "chunk_size", "cache_size", "queue_size"):
            if getattr(self, key) < 0:
                raise ConfigError(f"config: [performance] {key}: must not be negative")
        for key in ("chunk_size", "queue_size"):
            if getattr(self, key) == 0:
                raise ConfigError(f"config: [performance] {key}: must be at least 1")
        if self.cache_ttl <= 0 or self.flush_interval <= 0:
            raise ConfigError("config: [performance] cache_ttl and flush_interval: must be positive")

    def resolved(self) -> "PerformanceConfig":
        """This config with the profile's numbers filled in where a key was left at 0."""
        name = auto_profile() if self.profile == "auto" else self.profile
        prof = PROFILES[name]
        return dataclasses.replace(
            self,
            profile=name,
            workers=self.workers or prof["workers"],
            memory_limit_mb=self.memory_limit_mb or prof["memory_limit_mb"],
            batch_size=self.batch_size or prof["batch_size"],
        )


@dataclass(frozen=True)
class StoreConfig:
    db: str = "atlas-milter.db"  # SQLite database of verdicts
    url: str = ""  # postgresql://USER@HOST:PORT/DB: also ship every verdict there (pg_ship.py); "" = SQLite only
    password_file: str = ""  # the PostgreSQL password (or ATLAS_PG_PASSWORD, or the systemd credential pg-password)
    ship_interval: float = 1.0  # seconds between shipments to PostgreSQL

    def __post_init__(self) -> None:
        if self.url and not self.url.startswith(("postgresql://", "postgres://")):
            raise ConfigError(f"config: [store] url: {self.url.split('@')[-1]!r}: use postgresql://USER@HOST:PORT/DB")
        if self.ship_interval <= 0:
            raise ConfigError("config: [store] ship_interval must be positive (seconds)")


@dataclass(frozen=True)
class StatsdConfig:
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 8125
    prefix: str = "atlas"

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ConfigError(f"config: [statsd] port: {self.port} is not a port number")


@dataclass(frozen=True)
class HttpConfig:
    """[http]: the /performance page and JSON (atlas_milter/web.py) of `milter` and `idle`."""

    listen: str = ""  # HOST:PORT, e.g. 127.0.0.1:8080 ([::1]:8080 for IPv6); "" = off
    token: str = ""  # required to bind a non-loopback address: clients send Authorization: Bearer TOKEN or ?token=TOKEN
    token_file: str = ""  # the token from a file instead (or ATLAS_HTTP_TOKEN, or the systemd credential http-token)
    auth_header: str = ""  # e.g. "X-Remote-User": a reverse proxy on loopback authenticated the user and names them here
    show_bodies: bool = False  # the console may show a held message's body

    def __post_init__(self) -> None:
        if self.listen:
            self.address()  # a malformed listen is an error at load time, not at start

    def address(self) -> tuple[str, int]:
        """(host, port) from `listen`; ConfigError when it is not HOST:PORT."""
        host, _, port = self.listen.rpartition(":")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        if not host or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ConfigError(f"config: [http] listen: {self.listen!r}: use HOST:PORT, e.g. 127.0.0.1:8080")
        return host, int(port)


@dataclass(frozen=True)
class ClusterConfig:
    """[cluster]: learning shared between hosts through Redis (atlas_milter/cluster_sync.py)."""

    redis: str = ""  # redis://HOST:PORT/DB (rediss:// for TLS); "" and no sentinels = off
    redis_cluster: bool = False  # `redis` is one node of a Redis Cluster (every key has one hash tag: one slot)
    sentinels: tuple[str, ...] = ()  # ["HOST:PORT", ...] of Redis Sentinels watching `sentinel_service`
    sentinel_service: str = "atlas"
    password_file: str = ""  # or ATLAS_REDIS_PASSWORD, or the systemd credential redis-password
    host: str = ""  # this host's name in the shared stream ("" = the machine's host name)
    key_prefix: str = "atlas"  # keys are {PREFIX}:learn, {PREFIX}:snapshot, ... (one hash tag: Redis Cluster works)
    timeout: float = 0.25  # seconds any Redis call may take before Redis counts as down
    cooldown: float = 1.0  # seconds the breaker keeps calls away after a failure
    min_replicas: int = 0  # a learn leaves the outbox once this many replicas have it (WAIT); 1 with Sentinel
    lease_ttl: float = 10.0  # seconds: an IMAP account's watcher renews its lease within this; a standby takes over after
    compact_every: int = 1000  # stream entries after the last snapshot that make a host fold them into a new one
    keep_stream: float = 600.0  # seconds of stream kept after a snapshot, for hosts still reading them
    seen_days: float = 30.0  # a message learned again with the same label within this counts once

    def __post_init__(self) -> None:
        if self.min_replicas < 0:
            raise ConfigError("config: [cluster] min_replicas must be 0 or more")
        if self.timeout <= 0 or self.cooldown <= 0 or self.lease_ttl < 1:
            raise ConfigError("config: [cluster] timeout and cooldown must be positive, lease_ttl at least 1 (seconds)")
        if self.redis_cluster and (not self.redis or self.sentinels or self.min_replicas):
            raise ConfigError("config: [cluster] redis_cluster = true needs redis = one node's URL, and neither "
                              "sentinels nor min_replicas (Redis Cluster has its own failover; WAIT is not used there)")
        if self.compact_every < 1 or self.keep_stream < 0 or self.seen_days <= 0:
            raise ConfigError("config: [cluster] compact_every must be 1 or more, keep_stream 0 or more (seconds), "
                              "seen_days positive")
        if self.redis and not self.redis.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(f"config: [cluster] redis: {self.redis.split('@')[-1]!r}: use redis://HOST:PORT/DB")

    @property
    def enabled(self) -> bool:
        return bool(self.redis or self.sentinels)


QUARANTINE_MTAS = ("postfix", "sendmail")


@dataclass(frozen=True)
class QuarantineConfig:
    """[quarantine]: where the milter's `quarantine` action holds mail (atlas_milter/mta_queue.py)."""

    mta: str = "postfix"  # postfix (the hold queue) | sendmail (its quarantine)
    postfix_config: str = ""  # postqueue/postsuper/postcat -c DIR; "" = Postfix's default
    sendmail_config: str = ""  # sendmail -C FILE; "" = Sendmail's default
    sendmail_queue: str = "/var/spool/mqueue"  # Sendmail's QueueDirectory (its quarantined hf files are deleted here)
    command_prefix: tuple[str, ...] = ()  # e.g. ["sudo", "-n"]: releasing and deleting are root's
    helper_socket: str = ""  # the socket of `atlas-milter queue-helper` (root) for a daemon that is not root

    def __post_init__(self) -> None:
        if self.mta not in QUARANTINE_MTAS:
            raise ConfigError(f"config: [quarantine] mta: {self.mta!r} is not one of {', '.join(QUARANTINE_MTAS)}")


MILTER_ACTIONS = ("tag", "reject", "quarantine", "discard", "tempfail", "accept")
ERROR_ACTIONS = ("accept", "tempfail")
MILTER_CLASSIFY_MODES = ("inline", "thread", "pool")
MILTER_TRANSPORTS = ("loop", "libmilter")
# Keys of a [milter.recipients."user@example.org"] or [milter.domains."example.org"] table.
MILTER_RULE_KEYS = ("opt_out", "spam_action", "unsure_action", "spam_cutoff", "ham_cutoff")


@dataclass(frozen=True)
class MilterConfig:
    """[milter]: owned by the milter adapter (atlas_milter/adapters/milter/)."""

    socket: str = "unix:/run/atlas-milter/milter.sock"  # libmilter syntax: unix:PATH or inet:PORT@HOST
    transport: str = "loop"  # loop (the protocol on one thread: adapters/milter/loop.py) | libmilter (pymilter's)
    socket_mode: int = 0o660  # permissions of a unix socket (the MTA's user must be able to write it)
    socket_group: str = ""  # group of a unix socket, e.g. "postfix" (empty: the milter's own group)
    timeout: float = 5.0  # seconds from end of message to a reply, whatever happens
    spam_action: str = "tag"  # tag | reject | quarantine | discard | tempfail | accept (accept = no headers)
    unsure_action: str = "tag"
    on_error: str = "accept"  # accept (with a header saying so) | tempfail
    on_busy: str = "tempfail"  # too much work in flight: tempfail (back-pressure) | accept (unchecked)
    reject_text: str = "Message rejected as spam (ref {ref})"
    tempfail_text: str = "Message deferred, try again later (ref {ref})"
    classify: str = "inline"  # inline (on the end-of-message thread) | thread (deadline enforced) | pool (processes)
    max_in_flight: int = 32  # messages classified at once; beyond this: on_busy
    max_buffered_mb: int = 256  # message bytes held across all connections; beyond this: on_busy
    skip_authenticated: bool = True  # {auth_authen} set: a submission from our own user, not scored
    trusted_networks: list[str] = ()  # client networks not scored, e.g. ["10.0.0.0/8", "::1/128"]
    allow_senders: list[str] = ()  # envelope senders not scored: "a@x.org", "x.org", ".x.org" (subdomains)
    deny_senders: list[str] = ()  # envelope senders that are spam without scoring (same forms)
    recipients: dict[str, dict] = field(default_factory=dict)  # [milter.recipients."a@x.org"] rules
    domains: dict[str, dict] = field(default_factory=dict)  # [milter.domains."x.org"] rules

    def __post_init__(self) -> None:
        import ipaddress

        for key in ("spam_action", "unsure_action"):
            if getattr(self, key) not in MILTER_ACTIONS:
                raise ConfigError(f"config: [milter] {key}: {getattr(self, key)!r} is not one of {', '.join(MILTER_ACTIONS)}")
        for key in ("on_error", "on_busy"):
            if getattr(self, key) not in ERROR_ACTIONS:
                raise ConfigError(f"config: [milter] {key}: {getattr(self, key)!r} is not one of accept, tempfail")
        if self.transport not in MILTER_TRANSPORTS:
            raise ConfigError(f"config: [milter] transport: {self.transport!r} is not one of {', '.join(MILTER_TRANSPORTS)}")
        if self.classify not in MILTER_CLASSIFY_MODES:
            raise ConfigError(f"config: [milter] classify: {self.classify!r} is not one of {', '.join(MILTER_CLASSIFY_MODES)}")
        if self.timeout <= 0:
            raise ConfigError("config: [milter] timeout: must be positive")
        for key in ("max_in_flight", "max_buffered_mb"):
            if getattr(self, key) < 1:
                raise ConfigError(f"config: [milter] {key}: must be at least 1")
        for key in ("reject_text", "tempfail_text"):
            try:
                text = getattr(self, key).format(ref="R")
            except (KeyError, IndexError, ValueError) as exc:
                raise ConfigError(f"config: [milter] {key}: only {{ref}} may be substituted ({exc})") from None
            if any(c in text for c in "\r\n\0"):
                raise ConfigError(f"config: [milter] {key}: must be one line")
        for net in self.trusted_networks:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise ConfigError(f"config: [milter] trusted_networks: {net!r} is not an IP network") from None
        for section in ("recipients", "domains"):
            rules = {}
            for name, table in getattr(self, section).items():
                where = f"[milter.{section}.{name!r}]"
                if not isinstance(table, dict):
                    raise ConfigError(f"config: {where}: expected a table")
                rule = {}
                for key, value in table.items():
                    k = key.replace("-", "_")
                    if k not in MILTER_RULE_KEYS:
                        raise ConfigError(f"config: {where} {key}: unknown key (known: {', '.join(MILTER_RULE_KEYS)})")
                    if k == "opt_out" and not isinstance(value, bool):
                        raise ConfigError(f"config: {where} {key}: expected true or false")
                    if k.endswith("_action") and value not in MILTER_ACTIONS:
                        raise ConfigError(f"config: {where} {key}: {value!r} is not one of {', '.join(MILTER_ACTIONS)}")
                    if k.endswith("_cutoff"):
                        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                            raise ConfigError(f"config: {where} {key}: must be a number between 0 and 1")
                        value = float(value)
                    rule[k] = value
                rules[normalise_address(name)] = rule
            object.__setattr__(self, section, rules)


def normalise_address(address: str) -> str:
    """The form in which envelope addresses and the config's address and domain keys are
    compared: no surrounding blanks or angle brackets, lower case."""
    return address.strip().strip("<>").lower()


IMAP_SECURITY = ("tls", "starttls", "plain")
IMAP_SPAM_ACTIONS = ("move", "flag", "record")


@dataclass(frozen=True)
class ImapConfig:
    """[imap]: owned by the IMAP side (atlas_milter/adapters/imap/, atlas_milter/backfill.py)."""

    host: str = ""
    port: int = 0  # 0 means: 993 for tls, 143 otherwise
    security: str = "tls"  # tls | starttls | plain
    user: str = ""
    password_file: str = ""  # or ATLAS_IMAP_PASSWORD, or the systemd credential imap-password
    ca_file: str = ""  # PEM file of CA certificates to trust as well as the system's (a private CA, a self-signed server)
    folders: list[str] = ("INBOX",)
    junk_folder: str = "Junk"  # used when the server marks no folder \Junk; created if missing
    trash_folder: str = "Trash"  # used when the server marks no folder \Trash (moves there teach nothing)
    spam_action: str = "move"  # move | flag | record
    timeout: float = 30.0  # seconds a command may take before the connection counts as dead
    keepalive: float = 300.0  # seconds between NOOP checks while idling (a silent dead link is noticed)
    idle_renew: float = 1500.0  # seconds before IDLE is re-issued (RFC 2177: under 29 minutes)
    reconnect_initial: float = 1.0  # first reconnect delay, doubled per failure, with jitter
    reconnect_max: float = 300.0  # longest reconnect delay
    learn: bool = True  # learn from the user's moves into and out of the Junk folder
    learn_model: str = ""  # model file learning writes when [classifier] model is empty ("" = <db>.model.json.gz)
    # [imap.accounts.NAME] tables: any key above except `accounts`, overriding [imap] for
    # `--account NAME` (e.g. host, user, password_file, folders).
    accounts: dict[str, dict] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.security not in IMAP_SECURITY:
            raise ConfigError(f"config: [imap] security: {self.security!r} is not one of tls, starttls, plain")
        if self.spam_action not in IMAP_SPAM_ACTIONS:
            raise ConfigError(f"config: [imap] spam_action: {self.spam_action!r} is not one of move, flag, record")
        if not 0 <= self.port < 65536:
            raise ConfigError(f"config: [imap] port: {self.port} is not a port number")
        for key in ("timeout", "keepalive", "idle_renew", "reconnect_initial", "reconnect_max"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"config: [imap] {key}: must be positive")
        if self.idle_renew > 29 * 60:
            raise ConfigError("config: [imap] idle_renew: must be at most 1740 seconds (RFC 2177: 29 minutes)")
        known = {f.name for f in dataclasses.fields(self)} - {"accounts"}
        for name, table in self.accounts.items():
            if not isinstance(table, dict):
                raise ConfigError(f"config: [imap.accounts.{name}]: expected a table")
            for key in table:
                if key.replace("-", "_") not in known:
                    raise ConfigError(
                        f"config: [imap.accounts.{name}] {key}: unknown key (known: {', '.join(sorted(known))})"
                    )

    def for_account(self, name: str | None, overrides: Mapping[str, Any] | None = None) -> "ImapConfig":
        """This section with account `name`'s table laid over it (None: [imap] itself), then
        `overrides` ({key: value}, e.g. command-line flags; None values ignored) on top."""
        values: dict[str, Any] = {}
        if name:
            if name not in self.accounts:
                known = ", ".join(sorted(self.accounts)) or "none configured"
                raise ConfigError(f"config: [imap.accounts]: no account {name!r} (known: {known})")
            hints = typing.get_type_hints(ImapConfig)
            for key, value in self.accounts[name].items():
                key = key.replace("-", "_")
                values[key] = _check_type(value, hints[key], f"[imap.accounts.{name}] {key}")
        for key, value in (overrides or {}).items():
            if value is not None:
                values[key] = tuple(value) if isinstance(value, list) else value
        return dataclasses.replace(self, accounts={}, **values) if (name or values) else self


@dataclass(frozen=True)
class Features:
    """The `ENABLE_*` switches; all on by default. Off gives the plain sequential path."""

    monitoring: bool = True
    caching: bool = True
    bulk_ops: bool = True
    parallel: bool = True
    streaming: bool = True
    compiled: bool = True  # the hot path: the compiled classifier (where built) and mime.py


@dataclass(frozen=True)
class Config:
    log_level: str = "info"
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    performance: PerformanceConfig = field(default_factory=PerformanceConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    statsd: StatsdConfig = field(default_factory=StatsdConfig)
    features: Features = field(default_factory=Features)
    milter: MilterConfig = field(default_factory=MilterConfig)
    imap: ImapConfig = field(default_factory=ImapConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    quarantine: QuarantineConfig = field(default_factory=QuarantineConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def __post_init__(self) -> None:
        if self.log_level not in ("debug", "info", "warning", "error"):
            raise ConfigError(f"config: log_level: {self.log_level!r} is not one of debug, info, warning, error")


def _check_type(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool):
        if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
            return value
        raise ConfigError(f"config: {where}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
    if origin in (list, tuple):
        (item,) = typing.get_args(hint)[:1]
        if not isinstance(value, list):
            raise ConfigError(f"config: {where}: expected a list, got {type(value).__name__}")
        return tuple(_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config: {where}: expected a table, got {type(value).__name__}")
        return value
    return value


def build_section(cls: type, table: Mapping[str, Any], where: str) -> Any:
    """Build dataclass `cls` from a TOML table, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name not in known:
            raise ConfigError(f"config: {where}{key}: unknown key (known: {', '.join(sorted(known))})")
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"config: [{name}]: expected a table")
            kwargs[name] = build_section(hint, value, f"[{name}] ")
        else:
            kwargs[name] = _check_type(value, hint, f"{where}{key}")
    return cls(**kwargs)


def parse_bool_flag(name: str, value: str) -> bool:
    low = value.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ConfigError(f"environment: {name}={value!r}: use true or false")


def features_from_env(env: Mapping[str, str]) -> dict[str, bool]:
    return {attr: parse_bool_flag(var, env[var]) for var, attr in FEATURE_FLAGS.items() if var in env}


def load_config(
    path: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> Config:
    """Read the TOML file (or the default one when present), apply the `ENABLE_*` flags from
    `env` and then `overrides` ({"section.key": value}, e.g. from CLI flags), and validate."""
    env = os.environ if env is None else env
    data: dict[str, Any] = {}
    if path is None and DEFAULT_CONFIG_PATH.is_file():
        path = DEFAULT_CONFIG_PATH
    if path is not None:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config: {path}: no such file (pass --config with an existing file)") from None
        except PermissionError:
            raise ConfigError(f"config: {path}: permission denied") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config: {path}: not valid TOML: {exc}") from None
    feats = features_from_env(env)
    if feats:
        data.setdefault("features", {}).update(feats)
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        section, _, key = dotted.rpartition(".")
        target = data.setdefault(section, {}) if section else data
        target[key] = value
    return build_section(Config, data, "")


def config_as_dict(config: Any) -> dict[str, Any]:
    """The effective configuration as plain data (for `check-config` and the docs test)."""
    return dataclasses.asdict(config)
