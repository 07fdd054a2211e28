"""The commands that work on mail, models and the database: classify, train, learn, eval,
demo, migrate, stats, history, explain, quarantine, queue-helper, check-config, bench. Each parses nothing itself and
makes one library call."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections import Counter
from importlib import resources
from pathlib import Path

from atlas_milter.errors import AtlasError
from atlas_milter.verdict import format_reasons
from atlas_milter.cli.common import Stopped, _finite, _load_config
from atlas_milter.config import Config


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
        options=TrainingOptions(source_weights=weights, trusted_authserv=config.classifier.trusted_authserv_id),
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
    from atlas_milter.classifier import save_model
    from atlas_milter.sources import iter_source

    if not args.spam and not args.ham:
        raise AtlasError("learn needs --spam FILE... or --ham FILE...")
    config = _load_config(args)
    if config.cluster.enabled and not args.model:  # shared learning: every host, not a file
        return _learn_for_every_host(config, args)
    target = args.model or config.classifier.model
    if not target:
        raise AtlasError("learn updates a model file: give --model PATH (a new path starts from the shipped model)")
    model = learning.model_to_learn(target)
    model.trusted_authserv = config.classifier.trusted_authserv_id
    for label, specs in (("spam", args.spam or ()), ("ham", args.ham or ())):
        for spec in specs:
            for item in iter_source(spec):
                _, score = learning.learn_message(model, item.raw, label == "spam", config.classifier.max_bytes)
                print(f"{item.key}: learned as {label}, now scores {score:.3f}")
    save_model(model, target)
    print(f"wrote {target} (version {model.version})")
    return 0


def _learn_for_every_host(config: Config, args: argparse.Namespace) -> int:
    from atlas_milter.cluster_sync import learn_for_every_host
    from atlas_milter.sources import iter_source

    for label, specs in (("spam", args.spam or ()), ("ham", args.ham or ())):
        items = [item for spec in specs for item in iter_source(spec)]
        for item, (_, after, counted) in zip(items, learn_for_every_host(config, [i.raw for i in items], label == "spam")):
            print(f"{item.key}: learned as {label} for every host ([cluster]), now scores {after:.3f}" if counted else
                  f"{item.key}: another host learned it as {label} already (counted once)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from atlas_milter.classifier import load_model
    from atlas_milter.evaluate import evaluate, labelled_items
    from atlas_milter.policy import resolve_cutoffs

    if not args.index and not (args.ham or args.spam):
        raise AtlasError("eval needs --index CSV [--split test], or --ham SRC and --spam SRC")
    config = _load_config(args)
    model = load_model(config.classifier.model or None)
    model.compiled = config.features.compiled
    model.trusted_authserv = config.classifier.trusted_authserv_id
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
        from atlas_milter.journal import adopt_unowned_imap_rows

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
    from atlas_milter.queries import query_stats, require_database

    config = _load_config(args)
    if config.store.url and not args.db:  # every host's verdicts (pg_ship.py)
        from atlas_milter.pg_ship import PG_PASSWORD_CREDENTIAL, PG_PASSWORD_ENV, query_stats as query_pg_stats
        from atlas_milter.secrets import read_secret

        password = read_secret(config.store.password_file, PG_PASSWORD_ENV, PG_PASSWORD_CREDENTIAL, "[store] password_file")
        data = query_pg_stats(config.store.url, password, top=args.top)
    else:
        require_database(config.store.db)
        data = query_stats(config.store.db, top=args.top)
    if args.json:
        print(json.dumps(data))
        return 0
    print(f"verdicts      {data['total']} ({data['first'] or '-'} .. {data['last'] or '-'})")
    print("by verdict    " + ", ".join(f"{k} {v}" for k, v in data["by_verdict"].items()))
    print("by action     " + ", ".join(f"{k} {v}" for k, v in data["by_action"].items()))
    if "by_host" in data:
        print("by host       " + ", ".join(f"{k} {v}" for k, v in data["by_host"].items()))
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


def cmd_quarantine(args: argparse.Namespace) -> int:
    from atlas_milter import quarantine

    config = _load_config(args, **{"quarantine.postfix_config": args.postfix_config})
    if args.what != "list" and not args.key:
        raise AtlasError(f"quarantine {args.what} needs the queue id (see `atlas-milter quarantine list`)")
    if args.learn_ham and args.what != "release":
        raise AtlasError("--learn-ham goes with `quarantine release ID`")
    queue = quarantine.hold_queue(config)
    if args.what == "list":
        print(quarantine.render_entries(quarantine.entries(config, queue), args.json))
    elif args.what == "show":
        print(quarantine.render_shown(quarantine.show(config, queue, args.key, args.body), args.json))
    else:
        actor = quarantine.local_actor()
        if args.what == "delete":
            outcome = quarantine.delete(config, queue, args.key, actor)
        elif args.learn_ham:
            outcome = quarantine.release_and_learn(config, queue, args.key, actor)
        else:
            outcome = quarantine.release(config, queue, args.key, actor)
        print(json.dumps(dataclasses.asdict(outcome)) if args.json else f"{outcome.queue_id}: {outcome.detail}")
        if outcome.action == quarantine.RELEASE_LEARN:
            print("a running milter uses the updated model after a reload (systemctl reload atlas-milter)",
                  file=sys.stderr)
    return 0


def cmd_queue_helper(args: argparse.Namespace) -> int:
    import threading

    from atlas_milter import queue_helper, signals
    from atlas_milter.cli.common import _setup_logging
    from atlas_milter.quarantine import direct_queue

    config = _load_config(args)
    _setup_logging(args.log_level or config.log_level)
    stop = threading.Event()
    signals.handle(signals.STOP_SIGNALS, lambda *_: stop.set())
    with queue_helper.listening_socket(args.socket or "", args.socket_group) as sock:
        queue_helper.serve(direct_queue(config), sock, stop)
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
