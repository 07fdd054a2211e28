#!/usr/bin/env python3
"""Backfill over a real Dovecot: optimised vs plain throughput (same run, same folders), on
two workloads, and peak memory as the folder grows.

    python -m scripts.backfill_bench [--sizes 10000,50000] [--ratio-messages 2000] [--repeat 3]
                                     [--workloads unique,campaign]

Starts a private Dovecot (tests/support/servers.py; needs root and dovecot installed), fills the
folders by MULTIAPPEND, then runs `atlas-milter backfill FOLDER --dry-run` as subprocesses
with fresh databases, so every run sees the same folder:

* plain: every ENABLE_* off - one message fetched per round trip, inline scoring, no cache,
  one INSERT + COMMIT per message, whole folder loaded first;
* optimised: the defaults - UID chunks per round trip (the next chunks prefetched while
  the pool scores), worker pool, cache, bulk writer, streaming.

Workloads for the ratio (plain and optimised runs alternate, --repeat each; medians):

* unique: the first --ratio-messages UIDs of the folder `bench`, distinct corpus messages
  in mixed order with unique Message-IDs (no cache hits: the worst case for the cache);
* campaign: the issue-3 workload in the folder `campaign` - every shared-corpus message,
  each spam followed by 5 copies re-sent to other recipients (new To: and Message-ID,
  `atlas_milter.bench.recipient_copy`), 15,526 messages, as `atlas-milter bench` uses.

The memory runs process the whole folder `bench` at each --sizes with the optimised path
(later copies of the corpus are cache hits: see the cache_hit share) and report the peak
resident memory (VmHWM) of the backfill process; its worker processes hold the model and
one slice of messages each, whatever the folder size. Prints a table and a JSON line.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.support.servers import DovecotInstance

from atlas_milter.bench import CAMPAIGN_COPIES, recipient_copy, find_corpus

REPO = Path(__file__).resolve().parents[1]

FLAGS = ("ENABLE_MONITORING", "ENABLE_CACHING", "ENABLE_BULK_OPS", "ENABLE_PARALLEL", "ENABLE_STREAMING")
FOLDER = "bench"
CAMPAIGN_FOLDER = "campaign"
_MSGID = re.compile(rb"(?im)^message-id:.*(?:\r?\n[ \t].*)*\r?\n")


def corpus_dir(arg: str | None) -> Path:
    default = REPO.parent / "shared" / "corpus" / "spamassassin"
    try:
        return find_corpus(arg or os.environ.get("ATLAS_CORPUS") or str(default))
    except Exception as exc:  # AtlasError: one line
        sys.exit(f"Error: {exc}")


def load_corpus(corpus: Path) -> list[bytes]:
    with open(corpus / "index.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    random.Random(1).shuffle(rows)
    out = []
    for row in rows:
        raw = (corpus / row["path"]).read_bytes()
        if raw.startswith(b"From "):
            raw = raw.split(b"\n", 1)[1]
        out.append(_MSGID.sub(b"", raw, count=1))
    return out


def fill(dovecot: DovecotInstance, corpus: list[bytes], start: int, stop: int, batch: int = 500) -> float:
    """APPEND corpus messages number start..stop-1 (cycling) with unique Message-IDs; seconds taken."""
    t0 = time.monotonic()
    with dovecot.client(timeout=120) as c:
        if not c.folder_exists(FOLDER):
            c.create_folder(FOLDER)
        for i in range(start, stop, batch):
            msgs = [b"Message-ID: <bench-%d@atlas.test>\r\n" % n + corpus[n % len(corpus)] for n in range(i, min(stop, i + batch))]
            c.multiappend(FOLDER, msgs)
    return time.monotonic() - t0


def campaign_messages(corpus: Path) -> list[bytes]:
    """The issue-3 workload, in the order `atlas-milter bench` writes its Maildir: every
    corpus message, each spam followed by its recipient copies."""
    with open(corpus / "index.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    out = []
    for row in rows:
        raw = (corpus / row["path"]).read_bytes()
        if raw.startswith(b"From "):
            raw = raw.split(b"\n", 1)[1]
        out.append(raw)
        if row["label"] == "spam":
            out.extend(recipient_copy(raw, n + 1) for n in range(CAMPAIGN_COPIES))
    return out


def fill_campaign(dovecot: DovecotInstance, msgs: list[bytes], batch: int = 500) -> float:
    t0 = time.monotonic()
    with dovecot.client(timeout=120) as c:
        c.create_folder(CAMPAIGN_FOLDER)
        for i in range(0, len(msgs), batch):
            c.multiappend(CAMPAIGN_FOLDER, msgs[i : i + batch])
    return time.monotonic() - t0


def run_backfill(dovecot: DovecotInstance, work: Path, name: str, plain: bool, limit: int | None,
                 folder: str = FOLDER) -> dict:
    db = work / f"{name}.db"
    for suffix in ("", "-wal", "-shm"):
        Path(str(db) + suffix).unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for flag in FLAGS:
        env.pop(flag, None)
        if plain:
            env[flag] = "false"
    conf = work / "bench.toml"
    conf.write_text('[statsd]\nenabled = false\n[imap]\nspam_action = "record"\n')
    argv = [sys.executable, "-m", "atlas_milter", "backfill", folder, "--dry-run", "--config", str(conf),
            "--host", dovecot.host, "--port", str(dovecot.port), "--plain", "--user", dovecot.user,
            "--password-file", str(dovecot.password_file), "--db", str(db)]
    if limit:
        argv += ["--limit", str(limit)]
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=work)
    out = proc.stdout.read().decode()
    _pid, status, _usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"Error: {name} backfill failed:\n{out}")
    m = re.search(r": (\d+) messages in ([\d.]+) s \(([\d.]+) msg/s\)", out)
    peak = re.search(r"peak memory (\d+) MB", out)
    conn = sqlite3.connect(db)
    rows, hits = conn.execute("SELECT count(*), coalesce(sum(cache_hit), 0) FROM processed_emails").fetchone()
    conn.close()
    return {
        "name": name, "messages": int(m.group(1)), "seconds": float(m.group(2)), "msgs_per_s": float(m.group(3)),
        "wall_s": round(wall, 2), "peak_mb_parent": int(peak.group(1)),
        "rows": rows, "cache_hit_share": round(hits / max(1, rows), 3),
    }


def median_side(runs: list[dict]) -> dict:
    """The run with the median throughput (odd counts), plus the medians of every figure."""
    ordered = sorted(runs, key=lambda r: r["msgs_per_s"])
    mid = ordered[(len(ordered) - 1) // 2]
    return {**mid, "median_msgs_per_s": round(statistics.median(r["msgs_per_s"] for r in runs), 1),
            "median_wall_s": round(statistics.median(r["wall_s"] for r in runs), 2),
            "runs_msgs_per_s": [r["msgs_per_s"] for r in runs]}


def ratio_runs(dovecot: DovecotInstance, work: Path, folder: str, limit: int | None, repeat: int, label: str) -> dict:
    """Plain and optimised alternately, `repeat` times each (so both sides see the same
    machine load over time); medians and their ratio."""
    plain, opt = [], []
    for i in range(repeat):
        plain.append(run_backfill(dovecot, work, f"{label}-plain", True, limit, folder))
        opt.append(run_backfill(dovecot, work, f"{label}-optimised", False, limit, folder))
        print(f"  {label} run {i + 1}: plain {plain[-1]['msgs_per_s']:7.1f} msg/s, optimised "
              f"{opt[-1]['msgs_per_s']:7.1f} msg/s (cache hits {opt[-1]['cache_hit_share']:.0%})", flush=True)
    p, o = median_side(plain), median_side(opt)
    out = {"plain": p, "optimised": o, "repeat": repeat,
           "ratio": round(o["median_msgs_per_s"] / p["median_msgs_per_s"], 2),
           "ratio_wall": round(p["median_wall_s"] / o["median_wall_s"], 2)}
    print(f"{label:9} plain     {p['messages']} msgs median {p['median_msgs_per_s']:8.1f} msg/s (wall {p['median_wall_s']} s)", flush=True)
    print(f"{label:9} optimised {o['messages']} msgs median {o['median_msgs_per_s']:8.1f} msg/s (wall {o['median_wall_s']} s)", flush=True)
    print(f"{label:9} ratio optimised/plain (medians of {repeat}): {out['ratio']}x "
          f"(wall-clock incl. start-up: {out['ratio_wall']}x)", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10000,50000", help="folder sizes for the memory runs (default 10000,50000; empty: none)")
    ap.add_argument("--ratio-messages", type=int, default=2000, help="messages per side in the unique-workload ratio runs")
    ap.add_argument("--repeat", type=int, default=3, help="ratio runs per side and workload; medians are reported (default 3)")
    ap.add_argument("--workloads", default="unique,campaign", help="ratio workloads: unique, campaign (default both)")
    ap.add_argument("--corpus", help="the shared corpus folder")
    ap.add_argument("--workdir", help="where to keep Dovecot and the databases (default: a temp dir, removed)")
    args = ap.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(",") if s.strip())
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if set(workloads) - {"unique", "campaign"}:
        sys.exit("Error: --workloads: unique and/or campaign")
    if args.repeat < 1:
        sys.exit("Error: --repeat must be at least 1")
    cdir = corpus_dir(args.corpus)
    corpus = load_corpus(cdir)
    base = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="atlas-bfbench-"))
    base.mkdir(parents=True, exist_ok=True)
    os.chmod(base, 0o755)
    work = base / "runs"
    work.mkdir(exist_ok=True)
    dovecot = DovecotInstance(base / "dovecot")
    dovecot.start()
    result: dict = {"corpus_messages": len(corpus), "cpus": os.cpu_count(), "repeat": args.repeat}
    try:
        first = max(sizes[:1] + [args.ratio_messages])
        secs = fill(dovecot, corpus, 0, first)
        result["fill"] = [{"folder": FOLDER, "from": 0, "to": first, "seconds": round(secs, 1), "msgs_per_s": round(first / secs)}]
        print(f"APPENDed {first} messages to {FOLDER} in {secs:.1f} s ({first / secs:.0f}/s)", flush=True)
        have = first
        if "campaign" in workloads:
            msgs = campaign_messages(cdir)
            secs = fill_campaign(dovecot, msgs)
            result["fill"].append({"folder": CAMPAIGN_FOLDER, "from": 0, "to": len(msgs), "seconds": round(secs, 1),
                                   "msgs_per_s": round(len(msgs) / secs)})
            print(f"APPENDed {len(msgs)} messages to {CAMPAIGN_FOLDER} in {secs:.1f} s ({len(msgs) / secs:.0f}/s)", flush=True)
            del msgs
        # One untimed pass over each folder first: Dovecot builds its index and cache files on
        # the first read of a freshly appended folder, which would penalise whichever side runs first.
        run_backfill(dovecot, work, "warm-up", False, args.ratio_messages)
        if "campaign" in workloads:
            run_backfill(dovecot, work, "warm-up", False, None, CAMPAIGN_FOLDER)

        result["ratios"] = {}
        if "unique" in workloads:
            result["ratios"]["unique"] = ratio_runs(dovecot, work, FOLDER, args.ratio_messages, args.repeat, "unique")
        if "campaign" in workloads:
            result["ratios"]["campaign"] = ratio_runs(dovecot, work, CAMPAIGN_FOLDER, None, args.repeat, "campaign")

        result["memory"] = []
        for size in sizes:
            if size > have:
                secs = fill(dovecot, corpus, have, size)
                result["fill"].append({"folder": FOLDER, "from": have, "to": size, "seconds": round(secs, 1),
                                       "msgs_per_s": round((size - have) / secs)})
                print(f"APPENDed {have}..{size} in {secs:.1f} s ({(size - have) / secs:.0f}/s)", flush=True)
                have = size
            r = run_backfill(dovecot, work, f"full-{size}", False, None)
            result["memory"].append({"folder": size, **r})
            print(f"folder {size:6}: {r['messages']} msgs in {r['seconds']} s ({r['msgs_per_s']} msg/s), peak "
                  f"{r['peak_mb_parent']} MB (backfill process), "
                  f"cache hits {r['cache_hit_share']:.0%}", flush=True)
        if len(result["memory"]) >= 2:
            lo, hi = result["memory"][0], result["memory"][-1]
            result["memory_growth"] = round(hi["peak_mb_parent"] / lo["peak_mb_parent"] - 1, 3)
            print(f"peak memory {lo['folder']} -> {hi['folder']} messages: {result['memory_growth']:+.1%}", flush=True)
    finally:
        dovecot.stop()
        if not args.workdir:
            shutil.rmtree(base, ignore_errors=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
