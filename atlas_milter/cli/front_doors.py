"""The front doors as commands: milter, idle and backfill, each a thin call into its
adapter, with the /performance page of a daemon and the IMAP connection flags."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
from typing import Any, Iterator

from atlas_milter import signals
from atlas_milter.cli.common import _load_config, _setup_logging


@contextlib.contextmanager
def _performance_page(config: Any, model_path: Any = None, holds_mail: bool = False) -> Iterator[Any]:
    """The /performance server and the admin's console of a daemon ([http] listen or
    --http) while it runs; nothing when off. Started before the adapter, so a bad address
    fails before any mail is taken. `holds_mail`: the milter, whose console has the
    quarantine; a release-and-learn there reloads the milter (SIGUSR1) onto the new model."""
    if not config.http.listen:
        yield None
        return
    from atlas_milter import web
    from atlas_milter.console import Console

    host, port = config.http.address()
    info = web.performance_info(model_version=web.ModelVersion(model_path or (lambda: config.classifier.model)))
    queue = after_learn = None
    if holds_mail:
        from atlas_milter.quarantine import hold_queue

        queue = hold_queue(config)
        after_learn = lambda: os.kill(os.getpid(), signals.RELOAD_SIGNAL)  # noqa: E731
    server = web.start_http_server(host, port, info, token=web.read_token(config.http),
                                   console=Console(config, queue, after_learn), auth_header=config.http.auth_header)
    try:
        yield server
    finally:
        server.close()


def cmd_milter(args: argparse.Namespace) -> int:
    from atlas_milter.adapters.milter import MILTER_SIGNALS, serve
    from atlas_milter.learning import with_learned_model

    def read_config():  # at start and on every reload (SIGUSR1): same file, same flags on top
        # The model learning writes (release-and-learn from the quarantine) when there is one.
        return with_learned_model(_load_config(args, **{"milter.socket": args.socket, "milter.timeout": args.timeout,
                                                        "http.listen": args.http}))

    config = read_config()
    _front_door_logging(args, config)
    # Before the /performance page's thread starts: no stop signal may land there.
    with signals.blocked(MILTER_SIGNALS), _performance_page(config, holds_mail=True):
        return serve(config, read_config)


def _imap_overrides(args: argparse.Namespace) -> dict[str, Any]:
    security = "starttls" if args.starttls else "plain" if args.plain else "tls" if args.tls else None
    over = {
        "imap.host": args.host, "imap.port": args.port, "imap.user": args.user,
        "imap.password_file": args.password_file, "imap.security": security, "imap.ca_file": args.ca_file,
    }
    if getattr(args, "folders", None) and args.command == "idle":
        over["imap.folders"] = list(args.folders)
    return over


def _imap_config(args: argparse.Namespace, **other: Any):
    """The config with the IMAP flags applied: to [imap], or with --account NAME on top of
    that account's table (flags win over the file)."""
    import dataclasses

    imap_flags = _imap_overrides(args)
    if not args.account:
        return _load_config(args, **imap_flags, **other)
    config = _load_config(args, **other)
    flags = {key.split(".", 1)[1]: value for key, value in imap_flags.items()}
    return dataclasses.replace(config, imap=config.imap.for_account(args.account, flags))


def _front_door_logging(args: argparse.Namespace, config: Any) -> None:
    level = args.log_level or config.log_level
    _setup_logging(level)
    logging.getLogger().setLevel(getattr(logging, level.upper(), logging.INFO))  # basicConfig ran already in main()


def cmd_idle(args: argparse.Namespace) -> int:
    from atlas_milter.adapters.imap.listener import run_idle
    from atlas_milter.learning import with_learned_model

    config = _imap_config(args, **{"http.listen": args.http})
    _front_door_logging(args, config)
    with _performance_page(config, lambda: with_learned_model(config).classifier.model):
        return run_idle(config, account=args.account, force_plain=args.force_plain)


def cmd_backfill(args: argparse.Namespace) -> int:
    from atlas_milter.backfill import run_backfill

    config = _imap_config(
        args, **{"performance.chunk_size": args.chunk_size, "performance.memory_limit_mb": args.memory_limit_mb}
    )
    _front_door_logging(args, config)
    return run_backfill(
        config, folders=list(args.folders), maildir=args.maildir, mbox=args.mbox, dry_run=args.dry_run,
        since=args.since, limit=args.limit, account=args.account, force_plain=args.force_plain,
    )


def _add_imap_flags(p: argparse.ArgumentParser, http: bool = False) -> None:
    p.add_argument("--host", help="IMAP server")
    p.add_argument("--port", type=int, help="IMAP port (default 993 with --tls, 143 otherwise)")
    sec = p.add_mutually_exclusive_group()
    sec.add_argument("--tls", action="store_true", help="implicit TLS (default)")
    sec.add_argument("--starttls", action="store_true", help="STARTTLS on the plain port")
    sec.add_argument("--plain", action="store_true", help="no TLS (loopback only unless --force-plain)")
    p.add_argument("--force-plain", action="store_true", help="allow --plain to a non-loopback server")
    p.add_argument("--ca-file", metavar="FILE", help="PEM CA certificate(s) to trust for the server's certificate, besides the system's (a private CA or a self-signed certificate)")
    p.add_argument("--user", help="IMAP login")
    p.add_argument("--password-file", metavar="FILE", help="file holding the password (or ATLAS_IMAP_PASSWORD, or a systemd credential)")
    p.add_argument("--account", metavar="NAME", help="an account from the [accounts] tables of the config file")
    _add_daemon_flags(p, http)


def _add_daemon_flags(p: argparse.ArgumentParser, http: bool = False) -> None:
    """The flags every front door shares: database, model, StatsD (and the /performance page)."""
    p.add_argument("--db", metavar="PATH", help="verdict database")
    p.add_argument("--model", metavar="PATH", help="model file (default: the shipped model)")
    p.add_argument("--statsd", metavar="HOST:PORT", help="StatsD target")
    if http:
        p.add_argument("--http", metavar="HOST:PORT", help="serve /performance and /performance.json here (e.g. 127.0.0.1:8080)")
