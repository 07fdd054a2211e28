"""Owns the milter process: checking the socket spec, the signal mask (only the signal
threads see SIGTERM/SIGINT/SIGHUP, SIGUSR1 and SIGUSR2), both transports ([milter]
transport: our protocol loop, loop.py, or libmilter through pymilter, whose C side is
libmilter.py) and `serve()`, which runs the milter on a unix or inet socket until
SIGTERM/SIGINT/SIGHUP (SIGHUP stops, as libmilter's signal thread has it) or SIGUSR2 (the
same, faster), reloads on SIGUSR1 (engine.py) and logs a summary at the end.

No Nagle stalls on inet: the listening socket gets TCP_NODELAY (the loop sets it per
connection; for libmilter see libmilter.set_nodelay_on_listener), so that our several small
replies at end of message (one per header change, then the verdict) go out at once."""

from __future__ import annotations

import functools
import grp
import json
import logging
import os
import socket
import stat
from dataclasses import dataclass
from typing import Callable

from atlas_milter import cluster_sync, pg_ship, signals
from atlas_milter.adapters.milter import libmilter
from atlas_milter.adapters.milter.engine import BUSY_WAIT, MilterEngine, make_pipeline
from atlas_milter.adapters.milter.handler import WANTED_ACTIONS, AtlasMilter
from atlas_milter.adapters.milter.loop import LoopServer
from atlas_milter.adapters.milter.metrics import STAGE_MILTER_EOM, STAGE_MILTER_MESSAGE
from atlas_milter.config import Config, MilterConfig
from atlas_milter.errors import AtlasError
from atlas_milter.notify import sd_notify
from atlas_milter.reload import GAUGE_RELOAD_FAILING, start_reload_thread
from atlas_milter.signals import FAST_STOP_SIGNAL, RELOAD_SIGNAL, STOP_SIGNALS

log = logging.getLogger(__name__)

MILTER_NAME = "atlas-milter"
LIBMILTER_TIMEOUT = 600  # seconds libmilter (and the loop transport) waits on a silent MTA before dropping it
LISTEN_BACKLOG = 256  # pending MTA connections (the loop transport's listening socket)
# Every signal the milter acts on: libmilter's stop signals (its sigwait thread, or ours
# with the loop transport), our reload and our fast stop.
MILTER_SIGNALS = STOP_SIGNALS | {RELOAD_SIGNAL, FAST_STOP_SIGNAL}
LISTENER_POLL_S = 5.0  # libmilter's listener polls its socket this long between looks at the stop flag


def block_signals() -> set[int]:
    """Block the stop signals and the reload signal in the calling thread, and so in every
    thread started after it (store writer, StatsD flusher, classify workers, the HTTP
    page): only libmilter's sigwait thread sees a stop, only our reload thread SIGUSR1.
    Unblocked in any thread, SIGTERM or SIGUSR1 could land there and kill the process.
    Call before starting any thread; returns the previous mask."""
    return signals.block(MILTER_SIGNALS)


@dataclass(frozen=True)
class SocketSpec:
    kind: str  # unix | inet | inet6
    path: str = ""
    host: str = ""
    port: int = 0
    spec: str = ""


def parse_socket(spec: str) -> SocketSpec:
    """Check a libmilter socket spec before libmilter sees it: unix:/path (local:/path) or
    inet:PORT@HOST / inet6:PORT@HOST. Raises AtlasError with what to fix."""
    kind, sep, rest = spec.partition(":")
    if not sep:
        if spec.startswith("/"):
            kind, rest = "unix", spec
        else:
            raise AtlasError(f"--socket {spec}: use unix:/path/milter.sock or inet:PORT@HOST (e.g. inet:8894@127.0.0.1)")
    kind = kind.lower()
    if kind in ("unix", "local"):
        if not rest.startswith("/"):
            raise AtlasError(f"--socket {spec}: the unix socket path must be absolute")
        parent = os.path.dirname(rest)
        if not os.path.isdir(parent):
            raise AtlasError(f"--socket {spec}: directory {parent} does not exist (create it, e.g. systemd RuntimeDirectory=)")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise AtlasError(f"--socket {spec}: cannot create a socket in {parent} (permission denied)")
        if os.path.lexists(rest) and not stat.S_ISSOCK(os.lstat(rest).st_mode):
            raise AtlasError(f"--socket {spec}: {rest} exists and is not a socket (remove it or choose another path)")
        return SocketSpec("unix", path=rest, spec=f"unix:{rest}")
    if kind in ("inet", "inet6"):
        port_s, at, host = rest.partition("@")
        if not port_s.isdigit() or not 0 < int(port_s) < 65536:
            raise AtlasError(f"--socket {spec}: {port_s!r} is not a port number (libmilter syntax is inet:PORT@HOST)")
        if at and host:
            try:
                socket.getaddrinfo(host, int(port_s), socket.AF_INET6 if kind == "inet6" else socket.AF_INET)
            except OSError:
                raise AtlasError(f"--socket {spec}: host {host!r} does not resolve") from None
        return SocketSpec(kind, host=host, port=int(port_s), spec=f"{kind}:{port_s}@{host}" if host else f"{kind}:{port_s}")
    raise AtlasError(f"--socket {spec}: unknown socket type {kind!r} (use unix: or inet:)")


def socket_gid(group: str) -> int:
    """The gid of `[milter] socket_group` (a name or a number), or a one-line AtlasError."""
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise AtlasError(f"[milter] socket_group: no group named {group!r} on this machine") from None


def _connect_once(sock: SocketSpec) -> None:
    """One connection to our own socket, closed at once (wakes libmilter's listener)."""
    if sock.kind == "unix":
        family, address = socket.AF_UNIX, sock.path
    else:
        family, address = (socket.AF_INET6 if sock.kind == "inet6" else socket.AF_INET), (sock.host, sock.port)
    try:
        with socket.socket(family, socket.SOCK_STREAM) as wake:
            wake.settimeout(0.5)
            wake.connect(address)
    except OSError:
        pass  # closed already: the listener has let go


def _listening(engine: MilterEngine, sock: SocketSpec) -> None:
    mc = engine.config.milter
    log.info("atlas-milter %s listening on %s (transport=%s, classify=%s, timeout %gs, spam_action=%s, on_error=%s)",
             MILTER_NAME, sock.spec, mc.transport, mc.classify, mc.timeout, mc.spam_action, mc.on_error)
    sd_notify("READY=1")  # systemd Type=notify: the socket is open


def _serve_libmilter(engine: MilterEngine, sock: SocketSpec) -> None:
    """libmilter (through pymilter) runs the protocol: a thread per connection from its pool."""
    mc = engine.config.milter
    libmilter.listen(functools.partial(AtlasMilter, engine), WANTED_ACTIONS, MILTER_NAME, sock.spec,
                     LIBMILTER_TIMEOUT, mc.socket)
    if sock.kind == "unix":
        _own_socket(sock, mc)
    else:
        if not libmilter.set_nodelay_on_listener(sock.port):
            log.warning("milter: could not set TCP_NODELAY on %s; expect ~40 ms stalls per message", sock.spec)
    start_reload_thread(lambda: libmilter.stop_now(lambda: _connect_once(sock)), signals=(FAST_STOP_SIGNAL,))
    _listening(engine, sock)
    libmilter.run(mc.socket)


def _serve_loop(engine: MilterEngine, sock: SocketSpec) -> None:
    """Our own protocol loop (loop.py) on the same socket spec."""
    listener = _listen(sock)
    if sock.kind == "unix":
        _own_socket(sock, engine.config.milter)
    server = LoopServer(listener, functools.partial(AtlasMilter, engine), workers=engine.max_in_flight + 4,
                        idle_timeout=LIBMILTER_TIMEOUT, nodelay=sock.kind != "unix", busy_wait=BUSY_WAIT,
                        compiled=engine.config.features.compiled)

    def stop(why: str) -> None:
        log.info("atlas-milter: stop requested (%s)", why)
        server.stop()

    start_reload_thread(lambda: stop("SIGTERM, SIGINT or SIGHUP"), signals=STOP_SIGNALS)
    start_reload_thread(lambda: stop("SIGUSR2"), signals=(FAST_STOP_SIGNAL,))
    _listening(engine, sock)
    server.serve()


def _own_socket(sock: SocketSpec, mc: MilterConfig) -> None:
    """Give a unix socket the configured group and mode (the MTA's user must be able to write it)."""
    if mc.socket_group:
        os.chown(sock.path, -1, socket_gid(mc.socket_group))
    os.chmod(sock.path, mc.socket_mode)


def _listen(sock: SocketSpec) -> socket.socket:
    """The listening socket for `sock` (a stale unix socket file is replaced, as libmilter does)."""
    try:
        if sock.kind == "unix":
            if os.path.lexists(sock.path):
                os.unlink(sock.path)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(sock.path)
        else:
            listener = socket.socket(socket.AF_INET6 if sock.kind == "inet6" else socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((sock.host, sock.port))
        listener.listen(LISTEN_BACKLOG)
    except OSError as exc:
        raise AtlasError(f"--socket {sock.spec}: cannot listen ({exc.strerror or exc}); is another milter using it?") from None
    return listener


def serve(config: Config, read_config: Callable[[], Config] | None = None) -> int:
    """Run the milter on config.milter.socket until SIGTERM/SIGINT/SIGHUP or SIGUSR2 (a
    signal thread catches them and stops accepting; messages in progress are answered).
    SIGUSR1 reloads: `read_config()` (default: `config` again) and the model it names are
    read and swapped in (MilterEngine.reload). Exit code 0 on a clean stop. Bad socket
    spec or unusable path: AtlasError."""
    mc = config.milter
    sock = parse_socket(mc.socket)
    old_mask = block_signals()
    libmilter.limit_malloc_arenas()  # before the store writer and libmilter's threads (cmd_milter may have started /performance)
    pipeline, model_error = make_pipeline(config)
    libmilter.release_free_heap()
    # Again: starting a worker pool starts multiprocessing's resource tracker, which unblocks
    # SIGINT and SIGTERM in this thread when done; the reload thread must not inherit that.
    block_signals()
    if model_error:
        log.error("milter: %s; every message gets on_error=%s until the model is fixed", model_error, mc.on_error)
    engine = MilterEngine(config, pipeline, model_error)
    engine.metrics.set_gauge(GAUGE_RELOAD_FAILING, 0)
    # [cluster]: learns of every host reach this milter's model through Redis, off the
    # per-message path (cluster_sync.py); a reload keeps the shared model.
    cluster = None if model_error else cluster_sync.from_config(config, pipeline.model, engine.use_model)
    if cluster is not None:
        engine.shared_model = cluster.current_model
        cluster.start()
        if mc.classify == "pool":
            log.warning("milter: classify = \"pool\" with [cluster]: every shared learn starts new worker "
                        "processes; \"inline\" (the default) just swaps the model")

    def reload() -> None:
        engine.reload(read_config or (lambda: config))
        libmilter.release_free_heap()  # the old model and the new one's file

    start_reload_thread(reload)
    # [store] url: every verdict also goes to PostgreSQL, from the SQLite outbox (pg_ship.py).
    shipper = pg_ship.from_config(config)
    if shipper is not None:
        shipper.start()
    try:
        if mc.transport == "loop":
            _serve_loop(engine, sock)
        else:
            _serve_libmilter(engine, sock)
        log.info("atlas-milter stopping: finishing records")
        sd_notify("STOPPING=1")
    finally:
        if cluster is not None:
            cluster.stop()
        try:
            engine.close()
            if shipper is not None:  # after the last records are in SQLite: one more shipment
                shipper.stop()
        finally:
            signals.restore(old_mask)
            _log_summary(engine)
            if sock.kind == "unix":
                try:
                    os.unlink(sock.path)
                except OSError:
                    pass
    return 0


def _log_summary(engine: MilterEngine) -> None:
    stats = engine.metrics.get_stats()
    keep = {k: v for k, v in stats.items() if k in (STAGE_MILTER_EOM, STAGE_MILTER_MESSAGE, "total", "parse", "classify")}
    counters = {k: v for k, v in engine.metrics.get_counters().items() if k.startswith(("milter.", "verdict.", "cache.", "reload."))}
    log.info("atlas-milter stopped: %s", json.dumps({"timers_ms": keep, "counters": counters}, sort_keys=True))
