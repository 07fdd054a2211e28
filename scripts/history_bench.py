#!/usr/bin/env python3
"""`atlas-milter history` and `explain` on a large verdict database: issue 19's bar is every
history page (the first and any filtered one) in <= 100 ms on 1,000,000 rows.

    python -m scripts.history_bench [--rows 1000000] [--runs 7] [--limit 50] [--workdir DIR]

Builds the database in a temporary directory (or --workdir) with the product's migrations,
then bulk-inserts --rows decisions in one transaction (executemany: the benchmark is about
reads, so it does not pay the bulk writer's per-flush work): 30 days of mail, newest last;
verdicts 60% ham, 30% spam, 10% unsure; sender domains drawn from 5,000 with a long tail,
and one campaign domain with every 10th message of the first ten days and none since;
80% milter, 15% IMAP, 5% backfill; rejects carry a reply reference in the note as the
milter writes it. Each page is then read --runs times through `atlas_milter.history` (the
call the CLI makes, read-only connection included) and over HTTP from the console (a real
server on loopback: /history.json with the same filters, /history?q=KEY for a search); the
median and the slowest run are printed in milliseconds, with a JSON line at the end.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import sqlite3
import statistics
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import urlencode

from atlas_milter import history, web
from atlas_milter.config import load_config
from atlas_milter.console import Console
from atlas_milter.migrate import apply_migrations

BAR_MS = 100.0
TOKEN = "history-bench"
DAYS = 30
DOMAINS = [f"sender{i}.example" for i in range(5000)]
RARE_DOMAIN = DOMAINS[-1]
BURST_DOMAIN = "burst.example"
PAGES = ("first page", "--before (page 200)", "--verdict spam", "--verdict unsure --before", "--action reject",
         "--sender-domain common", "--sender-domain rare", "--since 1h", "--since now (empty)", "--since 2d", "--since 2d --verdict spam", "--since 2d --sender-domain burst (none)",
         "--verdict spam --sender-domain", "--verdict unsure --sender-domain rare",
         "--action quarantine --verdict ham",
         "--verdict ham --action move", "--verdict spam --action none --sender-domain common", "explain REF", "explain MESSAGE_ID", "explain QUEUE_ID")
COLUMNS = ("source", "account", "folder", "uidvalidity", "uid", "queue_id", "message_id", "client_ip", "sender",
           "sender_domain", "recipients_count", "subject", "score", "verdict", "action", "reasons", "model_version",
           "cache_hit", "elapsed_ms", "note", "created_at")


def rows(n: int, seed: int = 19):
    rnd = random.Random(seed)
    start = datetime.now(timezone.utc) - timedelta(days=DAYS)
    step = DAYS * 86400 / n
    for i in range(n):
        verdict = rnd.choices(("ham", "spam", "unsure"), (60, 30, 10))[0]
        source = rnd.choices(("milter", "imap", "backfill"), (80, 15, 5))[0]
        domain = DOMAINS[min(int(rnd.paretovariate(1.2)) - 1, len(DOMAINS) - 1)]
        if i < n // 3 and i % 10 == 0:
            domain = BURST_DOMAIN  # a campaign in the first ten days, silent since
        action, note = "tag", None
        if source == "milter" and verdict == "spam":
            action = rnd.choice(("reject", "reject", "quarantine", "tag"))
            note = f"ref={i:010X}" if action in ("reject", "quarantine") else None
        elif source != "milter":
            action = "move" if verdict == "spam" else "none"
        mailbox = source != "milter"
        score = {"ham": rnd.random() * 0.2, "spam": 0.9 + rnd.random() * 0.1, "unsure": 0.3 + rnd.random() * 0.4}[verdict]
        yield (source, "" if mailbox else None, "INBOX" if mailbox else None, 7 if mailbox else None,
               i if mailbox else None, None if mailbox else f"4Q{i:08X}", f"<m{i}@{domain}>", "192.0.2.1",
               f"user{i % 97}@{domain}", domain, 1 + i % 3, f"Subject number {i} about things", round(score, 6),
               verdict, action, '[["feature-a", 0.5], ["feature-b", -0.2], ["feature-c", 0.1]]', "bench-model",
               0, 12.5, note, (start + timedelta(seconds=i * step)).isoformat(timespec="milliseconds"))


def build(db: Path, n: int) -> float:
    t0 = time.perf_counter()
    apply_migrations(db)
    conn = sqlite3.connect(db)
    try:
        with conn:
            conn.executemany(f"INSERT INTO processed_emails ({', '.join(COLUMNS)}) VALUES "
                             f"({', '.join('?' * len(COLUMNS))})", rows(n))
    finally:
        conn.close()
    return time.perf_counter() - t0


def page_specs(db: Path, n: int) -> dict:
    """Each benchmarked page: ("history", filters) or ("explain", key)."""
    conn = sqlite3.connect(db)
    try:
        ref_row = conn.execute("SELECT note FROM processed_emails WHERE note LIKE 'ref=%' ORDER BY id LIMIT 1 "
                               "OFFSET ?", (n // 1000,)).fetchone()
        mid, qid = conn.execute("SELECT message_id, queue_id FROM processed_emails WHERE queue_id IS NOT NULL "
                                "AND id > ? ORDER BY id LIMIT 1", (n // 3,)).fetchone()
    finally:
        conn.close()
    deep = n - 200 * 50
    now = datetime.now(timezone.utc).isoformat()
    pages = [{}, {"before": deep}, {"verdict": "spam"}, {"verdict": "unsure", "before": deep}, {"action": "reject"},
             {"sender_domain": DOMAINS[0]}, {"sender_domain": RARE_DOMAIN}, {"since": "1h"}, {"since": now},
             {"since": "2d"}, {"since": "2d", "verdict": "spam"}, {"since": "2d", "sender_domain": BURST_DOMAIN},
             {"verdict": "spam", "sender_domain": DOMAINS[3]}, {"verdict": "unsure", "sender_domain": RARE_DOMAIN},
             {"action": "quarantine", "verdict": "ham"}, {"verdict": "ham", "action": "move"},
             {"verdict": "spam", "action": "none", "sender_domain": DOMAINS[0]}]
    keys = [ref_row[0].removeprefix("ref=") if ref_row else "none", mid.strip("<>"), qid]
    return dict(zip(PAGES, [("history", f) for f in pages] + [("explain", k) for k in keys]))


def library_call(db: Path, limit: int, spec: tuple):
    """The CLI's own library call for a page."""
    kind, arg = spec
    if kind == "history":
        return lambda: len(history.history(db, limit=limit, **arg).rows)
    return lambda: len(history.explain(db, arg).matches)


def http_call(server, spec: tuple):
    """The console's request for a page: /history.json with the filters, or the search box
    (/history?q=KEY, answered with the decision's page address)."""
    kind, arg = spec
    path = "/history.json?" + urlencode(arg) if kind == "history" else "/history?" + urlencode({"q": arg})

    def call() -> int:
        conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
        try:
            conn.request("GET", path, headers={"Authorization": f"Bearer {TOKEN}"})
            resp = conn.getresponse()
            body = resp.read()
        finally:
            conn.close()
        if kind == "history":
            assert resp.status == 200, (path, resp.status, body[:200])
            return len(json.loads(body)["rows"])
        return 1 if resp.status == 303 else 0

    return call


def measure(calls: dict, runs: int) -> dict:
    result = {}
    for name, call in calls.items():
        times, count = [], 0
        for _ in range(runs):
            t0 = time.perf_counter()
            count = call()
            times.append((time.perf_counter() - t0) * 1000)
        result[name] = {"median_ms": round(statistics.median(times), 2), "max_ms": round(max(times), 2), "rows": count}
    return result


def report(title: str, result: dict) -> float:
    print(title)
    for name, r in result.items():
        flag = "ok" if r["median_ms"] <= BAR_MS else f"OVER the {BAR_MS:g} ms bar"
        print(f"  {name:38} {r['median_ms']:8.2f} ms  (max {r['max_ms']:.2f} ms, {r['rows']} rows)  {flag}")
    return max(r["median_ms"] for r in result.values())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000, help="decisions in the database (default 1000000)")
    ap.add_argument("--runs", type=int, default=7, help="runs per page; the median is reported (default 7)")
    ap.add_argument("--limit", type=int, default=50, help="rows per page (default 50, the CLI's)")
    ap.add_argument("--workdir", metavar="DIR", help="where to build the database (default: a temporary directory)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        db = Path(tmp) / "history-bench.db"
        built = build(db, args.rows)
        print(f"{args.rows} rows built in {built:.1f} s ({db.stat().st_size / 1e6:.0f} MB); "
              f"{args.runs} runs per page of {args.limit}, median and slowest:")
        specs = page_specs(db, args.rows)
        cli = measure({name: library_call(db, args.limit, spec) for name, spec in specs.items()}, args.runs)
        config = load_config(None, {"store.db": str(db)}, env={})
        with web.start_http_server("127.0.0.1", 0, lambda: {}, token=TOKEN, console=Console(config),
                                   sample_interval=3600) as server:
            pages = measure({name: http_call(server, spec) for name, spec in specs.items()}, args.runs)
    worst_cli = report("command line (atlas_milter.history):", cli)
    worst_http = report("console over HTTP (/history.json, and /history?q= for the search box):", pages)
    print(json.dumps({"rows": args.rows, "runs": args.runs, "limit": args.limit, "bar_ms": BAR_MS,
                      "worst_median_ms": worst_cli, "pages": cli,
                      "console": {"worst_median_ms": worst_http, "pages": pages}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
