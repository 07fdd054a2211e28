"""The command line itself: the parser of every command and its flags, `--version`, and
`main`, which turns user mistakes into one `Error:` line and a non-zero exit."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

from atlas_milter import __version__, signals
from atlas_milter.errors import AtlasError
from atlas_milter.cli.common import Stopped, _raise_stopped, _setup_logging
from atlas_milter.cli.commands import (
    cmd_classify,
    cmd_train,
    cmd_learn,
    cmd_eval,
    cmd_demo,
    cmd_migrate,
    cmd_stats,
    cmd_history,
    cmd_explain,
    cmd_quarantine,
    cmd_queue_helper,
    cmd_check_config,
    cmd_bench,
)
from atlas_milter.cli.front_doors import (
    cmd_milter,
    cmd_idle,
    cmd_backfill,
    _add_imap_flags,
    _add_daemon_flags,
)


def version_line() -> str:
    """`atlas-milter 0.1.0, shipped model default-…`: the package and the model inside it (an
    unreadable model is named in the line, not raised: --version must always answer)."""
    from atlas_milter.classifier import hot_path, load_model

    try:
        model = f"shipped model {load_model().version}"
    except AtlasError as exc:
        model = f"no usable shipped model ({exc})"
    return f"atlas-milter {__version__}, {model}, {hot_path()}"


class _VersionAction(argparse.Action):
    """--version: like argparse's own, but the model is read only when the flag is given."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        print(version_line())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="atlas-milter", description="Mail classification: milter, IMAP IDLE, backfill.")
    parser.add_argument("--version", action=_VersionAction, help="print the package and shipped model versions and exit")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE", help="TOML configuration (default /etc/atlas-milter/atlas-milter.toml when present)")
    common.add_argument("--log-level", choices=("debug", "info", "warning", "error"), help="override log_level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("classify", parents=[common], help="classify messages: files, directories, Maildirs, mboxes or - for stdin")
    p.add_argument("sources", nargs="+", metavar="SRC")
    p.add_argument("--json", action="store_true", help="one JSON object per message per line")
    p.add_argument("--model", metavar="PATH", help="model file (default: the shipped model)")
    p.add_argument("--db", metavar="PATH", help="also record each verdict in this database")
    p.set_defaults(func=cmd_classify)

    p = sub.add_parser("train", parents=[common], help="train a model from labelled mail")
    p.add_argument("--ham", nargs="+", metavar="SRC")
    p.add_argument("--spam", nargs="+", metavar="SRC")
    p.add_argument("--index", metavar="CSV", action="append",
                   help="an index.csv with path,label,split columns (repeat for several corpora)")
    p.add_argument("--split", metavar="NAME", help="use only this split of --index (e.g. train)")
    p.add_argument("--weight", metavar="SOURCE=N", action="append",
                   help="count a source's messages N times (SOURCE: an index's folder name, or a --ham/--spam source)")
    p.add_argument("--name", help="model name recorded in its version")
    p.add_argument("-o", "--output", required=True, metavar="PATH", help="model file to write (.json or .json.gz)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("learn", parents=[common], help="update a model from messages you label "
                       "(with [cluster] and no --model: every host's shared model)")
    p.add_argument("--spam", nargs="+", metavar="FILE")
    p.add_argument("--ham", nargs="+", metavar="FILE")
    p.add_argument("--model", metavar="PATH", help="model file to update (created from the shipped model if absent)")
    p.set_defaults(func=cmd_learn)

    p = sub.add_parser("eval", parents=[common], help="measure a model on labelled mail")
    p.add_argument("--index", metavar="CSV")
    p.add_argument("--split", metavar="NAME")
    p.add_argument("--ham", nargs="+", metavar="SRC")
    p.add_argument("--spam", nargs="+", metavar="SRC")
    p.add_argument("--model", metavar="PATH")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("demo", parents=[common], help="run the shipped sample mailbox through the pipeline into a database")
    p.add_argument("--db", metavar="PATH", default=None, help="database to write (default atlas-demo.db)")
    p.add_argument("--model", metavar="PATH")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("migrate", parents=[common], help="apply (or roll back) database migrations")
    p.add_argument("--db", metavar="PATH")
    p.add_argument("--rollback", action="store_true", help="undo the last applied migration")
    p.add_argument("--status", action="store_true", help="list applied and pending migrations")
    p.add_argument("--legacy-account", metavar="NAME",
                   help="give the IMAP rows written before accounts were part of the key (migration 0004) to account NAME")
    p.set_defaults(func=cmd_migrate)

    reader = argparse.ArgumentParser(add_help=False)  # the commands that read the database
    reader.add_argument("--db", metavar="PATH")
    reader.add_argument("--json", action="store_true")
    p = sub.add_parser("stats", parents=[common, reader], help="totals, top sender domains and latency from a database")
    p.add_argument("--top", type=int, default=10)
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("history", parents=[common, reader], help="the latest decisions, newest first, a page at a time")
    p.add_argument("--since", metavar="AGE|DATE", help="30m, 1h, 2d, 1w ago or an ISO date/time (UTC)")
    for flag, meta in (("--verdict", "V"), ("--action", "A"), ("--sender-domain", "DOMAIN")):
        p.add_argument(flag, metavar=meta, help=f"only decisions with this {flag[2:].replace('-', ' ')}")
    p.add_argument("--limit", type=int, default=50, metavar="N", help="rows per page (default 50)")
    p.add_argument("--before", type=int, metavar="ID", help="the decisions older than ID (the next page)")
    p.set_defaults(func=cmd_history)
    p = sub.add_parser("explain", parents=[common, reader], help="everything recorded about one decision")
    p.add_argument("key", nargs="?", metavar="REF|QUEUE_ID|MESSAGE_ID", help="the 550 reply's ref, queue id or Message-ID")
    p.add_argument("--id", type=int, metavar="ID", help="the decision with this id (picks one of several)")
    p.set_defaults(func=cmd_explain)
    p = sub.add_parser("quarantine", parents=[common, reader], help="the messages the milter put on hold: list, show, release, delete")
    p.add_argument("what", choices=("list", "show", "release", "delete"), help="list | show ID | release ID [--learn-ham] | delete ID")
    p.add_argument("key", nargs="?", metavar="ID", help="the queue id, or the reference the decision names")
    p.add_argument("--learn-ham", action="store_true", help="release: also learn the message as ham")
    p.add_argument("--body", action="store_true", help="show: print the body too")
    p.add_argument("--postfix-config", metavar="DIR", help="a Postfix instance's config directory (postsuper -c DIR)")
    p.set_defaults(func=cmd_quarantine)
    p = sub.add_parser("queue-helper", parents=[common],
                       help="(root) run the MTA's queue tools for the console of a daemon that is not root")
    p.add_argument("--socket", metavar="PATH", help="listen here (systemd's atlas-milter-queue.socket passes its own)")
    p.add_argument("--socket-group", metavar="GROUP", default="", help="the group that may connect (mode 0660)")
    p.set_defaults(func=cmd_queue_helper)

    p = sub.add_parser("bench", parents=[common], help="measure the optimised pipeline against the plain path")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--baseline", action="store_true", help="record the plain path to --baseline-file")
    mode.add_argument("--compare", action="store_true", help="plain and optimised in the same run, with ratios (default)")
    mode.add_argument("--monitoring", action="store_true", help="throughput with monitoring on vs off")
    mode.add_argument("--memory", action="store_true", help="peak memory: streaming vs load-everything")
    mode.add_argument("--run-side", metavar="FEATURES", help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true")
    p.add_argument("--repeat", type=int, default=3, metavar="N", help="runs per side; medians are reported (default 3)")
    p.add_argument("--corpus", metavar="DIR", help="the shared corpus folder (default ../shared/corpus/spamassassin or $ATLAS_CORPUS)")
    p.add_argument("--workdir", metavar="DIR", default="bench-work", help="workload Maildirs and databases (default ./bench-work)")
    p.add_argument("--baseline-file", metavar="FILE", default="bench-baseline.json")
    p.add_argument("--sizes", default="10000,50000", metavar="N,N", help="Maildir sizes for --memory")
    p.add_argument("--maildir", help=argparse.SUPPRESS)
    p.add_argument("--db", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("milter", parents=[common], help="run the milter for Postfix or Sendmail")
    p.add_argument("--socket", metavar="SPEC", help="unix:/run/atlas-milter/milter.sock (default) or inet:PORT@HOST")
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="deadline per message (default 5)")
    _add_daemon_flags(p, http=True)
    p.set_defaults(func=cmd_milter)

    p = sub.add_parser("idle", parents=[common], help="watch IMAP folders with IDLE and classify new mail")
    p.add_argument("folders", nargs="*", metavar="FOLDER", help="folders to watch (default INBOX)")
    _add_imap_flags(p, http=True)
    p.set_defaults(func=cmd_idle)

    p = sub.add_parser("backfill", parents=[common], help="classify an existing IMAP folder, Maildir or mbox")
    p.add_argument("folders", nargs="*", metavar="FOLDER", help="IMAP folders (e.g. INBOX Archive)")
    p.add_argument("--maildir", metavar="DIR", help="a local Maildir instead of IMAP")
    p.add_argument("--mbox", metavar="FILE", help="a local mbox file instead of IMAP")
    p.add_argument("--dry-run", action="store_true", help="record verdicts, act on nothing")
    p.add_argument("--since", metavar="DATE", help="only messages since this date (YYYY-MM-DD)")
    p.add_argument("--limit", type=int, metavar="N", help="at most N messages")
    p.add_argument("--chunk-size", type=int, metavar="N", help="messages per chunk")
    p.add_argument("--memory-limit-mb", type=int, metavar="MB", help="shrink chunks near this resident memory")
    _add_imap_flags(p)
    p.set_defaults(func=cmd_backfill)

    p = sub.add_parser("check-config", parents=[common], help="print the effective configuration; non-zero on errors")
    p.add_argument("--model", metavar="PATH")
    p.set_defaults(func=cmd_check_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo" and not args.db:
        args.db = "atlas-demo.db"
    if args.command not in ("milter", "idle", "queue-helper"):  # the daemons run their own shutdown
        signals.handle(signals.INTERRUPT_SIGNALS, _raise_stopped)
    try:
        _setup_logging(args.log_level or "warning")
        return args.func(args)
    except Stopped as stop:
        print(f"Error: stopped by {stop}", file=sys.stderr)
        return 128 + stop.signum
    except AtlasError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 0
