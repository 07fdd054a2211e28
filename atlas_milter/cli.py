"""The `atlas-milter` command: parses options, calls one library function per command,
prints. A user mistake (bad flag, bad config key, unreadable file, locked database) is one
`Error: …` line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import sys
from collections import Counter
from importlib import resources
from pathlib import Path
from typing import Any, Iterator, Sequence

from atlas_milter import __version__, signals
from atlas_milter.errors import AtlasError
from atlas_milter.verdict import format_reasons

log = logging.getLogger("atlas_milter")


# --- helpers shared by commands -----------------------------------------------------

def _load_config(args: argparse.Namespace, **overrides: Any):
    from atlas_milter.config import load_config

    over = dict(overrides)
    if getattr(args, "model", None):
        over["classifier.model"] = args.model
    if getattr(args, "db", None):
        over["store.db"] = args.db
    if getattr(args, "statsd", None):
        host, _, port = args.statsd.rpartition(":")
        if not host or not port.isdigit():
            raise AtlasError(f"--statsd {args.statsd}: use HOST:PORT, e.g. 127.0.0.1:8125")
        over["statsd.host"], over["statsd.port"] = host, int(port)
    return load_config(args.config, over)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


class Stopped(Exception):
    """SIGTERM or SIGINT arrived: unwind through the commands' `finally` blocks, which
    close the pipeline and so flush every accepted verdict record to the database."""

    def __init__(self, signum: int) -> None:
        super().__init__(signals.name(signum))
        self.signum = signum


def _raise_stopped(signum: int, _frame: Any) -> None:
    raise Stopped(signum)


def _finite(value: float) -> float | None:
    return value if isinstance(value, float) and math.isfinite(value) else None


# --- commands -----------------------------------------------------------------------

def cmd_classify(args: argparse.Namespace) -> int:
    from atlas_milter.pipeline import Pipeline
    from atlas_milter.sources import LocalSource, source_kind

    config = _load_config(args)
    for spec in args.sources:
        source_kind(spec)  # a missing source is an error before any work starts
    unreadable: list[str] = []

    def on_error(message: str) -> None:
        unreadable.append(message)
        print(f"Error: {message}", file=sys.stderr)

    pipeline = Pipeline(config, with_store=bool(args.db))
    recorded = 0
    try:
        def show(result):
            nonlocal recorded
            if args.db:
                recorded += pipeline.record(result, source="classify", folder=None)
            if args.json:
                print(json.dumps({"path": result.key, **result.verdict.as_dict(), "subject": result.summary.subject}), flush=False)
            else:
                v = result.verdict
                print(f"{result.key}: {v.verdict.upper()} score={v.score:.3f} ({format_reasons(v.reasons)})")
            return result

        for spec in args.sources:
            pipeline.process_source(LocalSource(on_error), spec, show)
        sys.stdout.flush()
    except Stopped:
        pipeline.close()
        if args.db:
            print(f"stopped: {recorded} verdicts recorded in {config.store.db}", file=sys.stderr)
        raise
    finally:
        pipeline.close()
    return 1 if unreadable else 0


def cmd_train(args: argparse.Namespace) -> int:
    from atlas_milter.classifier import save_model
    from atlas_milter.training import TrainingOptions
    from atlas_milter.evaluate import train_from_sources

    if not args.index and not (args.ham and args.spam):
        raise AtlasError("train needs --ham SRC and --spam SRC, or --index CSV --split train")
    config = _load_config(args)
    weights = {}
    for spec in args.weight or ():
        source, _, value = spec.rpartition("=")
        try:
            weights[source] = float(value)
        except ValueError:
            source = ""
        if not source or not weights[source] > 0:
            raise AtlasError(f"--weight {spec}: expected SOURCE=N with N > 0, e.g. --weight modern=5")
    model = train_from_sources(
        args.ham or (), args.spam or (), args.index, args.split,
        name=args.name or Path(args.output).name.split(".")[0], max_bytes=config.classifier.max_bytes,
        options=TrainingOptions(source_weights=weights),
    )
    save_model(model, args.output)
    print(
        f"wrote {args.output}: {model.meta['trained_on']['ham']} ham, {model.meta['trained_on']['spam']} spam, "
        f"{len(model.weights)} features, spam cutoff {model.spam_cutoff}, ham cutoff {model.ham_cutoff}, "
        f"version {model.version}"
    )
    return 0


def cmd_learn(args: argparse.Namespace) -> int:
    from atlas_milter import learning
    from atlas_milter.sources import iter_source

    if not args.spam and not args.ham:
        raise AtlasError("learn needs --spam FILE... or --ham FILE...")
    config = _load_config(args)
    target = args.model or config.classifier.model
    if not target:
        raise AtlasError("learn updates a model file: give --model PATH (a new path starts from the shipped model)")
    model = learning.model_to_learn(target)
    for label, specs in (("spam", args.spam or ()), ("ham", args.ham or ())):
        for spec in specs:
            for item in iter_source(spec):
                _, score = learning.learn_message(model, item.raw, label == "spam", config.classifier.max_bytes)
                print(f"{item.key}: learned as {label}, now scores {score:.3f}")
    learning.save(model, target)
    print(f"wrote {target} (version {model.version})")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from atlas_milter.classifier import load_model
    from atlas_milter.evaluate import evaluate, labelled_items
    from atlas_milter.policy import resolve_cutoffs

    if not args.index and not (args.ham or args.spam):
        raise AtlasError("eval needs --index CSV [--split test], or --ham SRC and --spam SRC")
    config = _load_config(args)
    model = load_model(config.classifier.model or None)
    cutoffs = resolve_cutoffs(config.classifier, model)
    report = evaluate(model, labelled_items(args.ham or (), args.spam or (), args.index, args.split), cutoffs,
                      config.classifier.max_bytes)
    data = report.as_dict()
    if args.json:
        print(json.dumps({k: (_finite(v) if isinstance(v, float) else v) for k, v in data.items()}))
    else:
        print(f"messages      {report.n} ({report.n_ham} ham, {report.n_spam} spam)")
        print(f"ROC AUC       {report.auc:.5f}")
        print(f"spam recall   {report.spam_recall:.2%} at spam cutoff {cutoffs.spam}")
        print(f"ham FPR       {report.ham_fpr:.3%}")
        print(f"unsure        {report.unsure_rate:.2%} (ham cutoff {cutoffs.ham})")
        print(f"speed         {report.msgs_per_s:.0f} messages/s (parse + score, one process)")
        print(f"model         {report.model_version}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from atlas_milter.pipeline import Pipeline
    from atlas_milter.sources import LocalSource
    from atlas_milter.queries import query_stats

    config = _load_config(args)
    sample = resources.files("atlas_milter").joinpath("data", "sample")
    counts: Counter[str] = Counter()
    pipeline = Pipeline(config)
    try:
        def show(result):
            v = result.verdict
            counts[v.verdict] += 1
            pipeline.record(result, source="demo", folder="sample", action="record")
            print(f"{v.verdict.upper():6} {v.score:.3f}  {result.summary.subject[:60]:60}  {format_reasons(v.reasons, 2)}")
            return result

        with resources.as_file(sample) as folder:
            stats = pipeline.process_source(LocalSource(), str(folder), show)
        pipeline.flush()
    finally:
        pipeline.close()
    summary = query_stats(config.store.db)
    print(
        f"\n{stats.processed} messages in {stats.elapsed:.2f} s: "
        + ", ".join(f"{counts[k]} {k}" for k in ("spam", "unsure", "ham"))
        + f"; database {config.store.db} now holds {summary['total']} verdicts"
    )
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from atlas_milter.migrate import apply_migrations, migration_status, rollback_last

    config = _load_config(args)
    db = config.store.db
    if args.status:
        for row in migration_status(db):
            print(f"{row['version']:04d} {row['name']:40} {row['status']} {row.get('applied_at') or ''}")
        return 0
    if args.legacy_account:
        from atlas_milter.store import adopt_unowned_imap_rows

        apply_migrations(db)
        moved = adopt_unowned_imap_rows(db, args.legacy_account, only_if_alone=False)
        print(f"{moved} IMAP rows recorded before accounts were part of the key now belong to account {args.legacy_account}")
        return 0
    if args.rollback:
        undone = rollback_last(db)
        print(f"rolled back {undone}" if undone else "nothing to roll back")
        return 0
    applied = apply_migrations(db)
    print("applied " + ", ".join(applied) if applied else f"{db} is up to date")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from atlas_milter.queries import query_stats

    config = _load_config(args)
    if not Path(config.store.db).exists():
        raise AtlasError(f"{config.store.db}: no such database (give --db PATH)")
    data = query_stats(config.store.db, top=args.top)
    if args.json:
        print(json.dumps(data))
        return 0
    print(f"verdicts      {data['total']} ({data['first'] or '-'} .. {data['last'] or '-'})")
    print("by verdict    " + ", ".join(f"{k} {v}" for k, v in data["by_verdict"].items()))
    print("by action     " + ", ".join(f"{k} {v}" for k, v in data["by_action"].items()))
    lat = data["latency_ms"]
    print("latency ms    " + ", ".join(f"{k} {v}" for k, v in lat.items()))
    print("top sender domains:")
    for row in data["top_domains"]:
        print(f"  {row['domain']:40} {row.get('count', '')}  spam {row['spam']} ham {row['ham']} unsure {row['unsure']}")
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    from atlas_milter import history
    print(history.render_history(history.history(_load_config(args).store.db, limit=args.limit, since=args.since, verdict=args.verdict,
                                                 action=args.action, sender_domain=args.sender_domain, before=args.before), args.json))
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from atlas_milter import history
    found = history.explain(_load_config(args).store.db, args.key, args.id)
    print(history.render_explain(found, args.json))
    if len(found.matches) > 1:
        raise AtlasError(f"{len(found.matches)} decisions match; pick one with --id ID")
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    from atlas_milter.classifier import load_model
    from atlas_milter.config import config_as_dict

    config = _load_config(args)
    model = load_model(config.classifier.model or None)
    effective = config_as_dict(config)
    effective["performance"] = config_as_dict(config.performance.resolved())
    if effective.get("http", {}).get("token"):
        effective["http"]["token"] = "(set, not shown)"
    print(json.dumps(effective, indent=2, sort_keys=True))
    print(f"model {model.version}: spam cutoff {model.spam_cutoff}, ham cutoff {model.ham_cutoff}", file=sys.stderr)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from atlas_milter import bench

    if args.run_side:  # internal: one side of the benchmark, in its own process
        features = json.loads(args.run_side)
        print(json.dumps(bench.run_side(args.maildir, args.db, features, args.config)))
        return 0
    corpus = bench.find_corpus(args.corpus)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    say = (lambda line: print(line, file=sys.stderr)) if args.json else print
    baseline_file = Path(args.baseline_file)
    if args.baseline:
        result = bench.baseline(workdir, corpus, args.repeat, args.config, say)
        baseline_file.write_text(json.dumps(result, indent=2))
        say(f"baseline written to {baseline_file}")
    elif args.monitoring:
        result = bench.monitoring_cost(workdir, corpus, args.repeat, args.config, say)
    elif args.memory:
        sizes = [int(s) for s in args.sizes.split(",")]
        result = bench.memory(workdir, corpus, sizes, args.config, say)
    else:
        result = bench.compare(workdir, corpus, args.repeat, args.config, baseline_file, progress=say)
    if args.json:
        print(json.dumps(result))
    elif "ratios" in result:
        say("ratios (optimised vs plain, medians): " + ", ".join(f"{k} {v}" for k, v in result["ratios"].items()))
    elif "cost" in result:
        say(f"monitoring costs {result['cost']:.1%} of throughput")
    return 0


# --- front doors (each a thin call into its adapter) -----------------------------------

@contextlib.contextmanager
def _performance_page(config: Any, model_path: Any = None) -> Iterator[Any]:
    """The /performance server of a daemon ([http] listen or --http) while it runs; nothing
    when off. Started before the adapter, so a bad address fails before any mail is taken."""
    if not config.http.listen:
        yield None
        return
    from atlas_milter import web

    host, port = config.http.address()
    info = web.performance_info(model_version=web.ModelVersion(model_path or (lambda: config.classifier.model)))
    server = web.start_http_server(host, port, info, token=config.http.token)
    try:
        yield server
    finally:
        server.close()


def cmd_milter(args: argparse.Namespace) -> int:
    from atlas_milter.adapters.milter import MILTER_SIGNALS, serve

    def read_config():  # at start and on every reload (SIGUSR1): same file, same flags on top
        return _load_config(args, **{"milter.socket": args.socket, "milter.timeout": args.timeout, "http.listen": args.http})

    config = read_config()
    _front_door_logging(args, config)
    # Before the /performance page's thread starts: no stop signal may land there.
    with signals.blocked(MILTER_SIGNALS), _performance_page(config):
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


# --- parser ---------------------------------------------------------------------------

def version_line() -> str:
    """`atlas-milter 0.1.0, shipped model default-…`: the package and the model inside it (an
    unreadable model is named in the line, not raised: --version must always answer)."""
    from atlas_milter.classifier import load_model

    try:
        model = f"shipped model {load_model().version}"
    except AtlasError as exc:
        model = f"no usable shipped model ({exc})"
    return f"atlas-milter {__version__}, {model}"


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

    p = sub.add_parser("learn", parents=[common], help="update a model from messages you label")
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
    if args.command not in ("milter", "idle"):  # the daemons run their own shutdown
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
