#!/usr/bin/env python3
"""Backfill over a real Dovecot: optimised vs plain throughput (same run, same folder), and
peak memory as the folder grows.

    python scripts/backfill_bench.py [--sizes 10000,50000] [--ratio-messages 2000]

Starts a private Dovecot (tests/servers.py; needs root and dovecot installed), fills one
folder with the shared corpus APPENDed repeatedly (MULTIAPPEND, unique Message-IDs, mixed
order), then runs `atlas-milter backfill FOLDER --dry-run` as subprocesses with fresh
databases, so every run sees the same folder:

* plain: every ENABLE_* off - one message fetched per round trip, inline scoring, no cache,
  one INSERT + COMMIT per message, whole folder loaded first;
* optimised: the defaults - UID chunks per round trip, worker pool, cache, bulk writer,
  streaming.

The ratio runs use the first --ratio-messages UIDs (distinct corpus messages, so no cache
hits from repeats). The memory runs process the whole folder at each size with the
optimised path (later copies of the corpus are cache hits: see the cache_hit share).
Prints a table and a JSON line.
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
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from servers import DovecotInstance  # noqa: E402

FLAGS = ("ENABLE_MONITORING", "ENABLE_CACHING", "ENABLE_BULK_OPS", "ENABLE_PARALLEL", "ENABLE_STREAMING")
FOLDER = "bench"
_MSGID = re.compile(rb"(?im)^message-id:.*(?:\r?\n[ \t].*)*\r?\n")


def corpus_dir(arg: str | None) -> Path:
    for cand in (arg, os.environ.get("ATLAS_CORPUS"), str(REPO.parent / "shared" / "corpus" / "spamassassin")):
        if cand and (Path(cand) / "index.csv").is_file():
            return Path(cand)
    sys.exit("Error: shared corpus not found (give --corpus DIR or set ATLAS_CORPUS)")


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


def run_backfill(dovecot: DovecotInstance, work: Path, name: str, plain: bool, limit: int | None) -> dict:
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
    argv = [sys.executable, "-m", "atlas_milter", "backfill", FOLDER, "--dry-run", "--config", str(conf),
            "--host", dovecot.host, "--port", str(dovecot.port), "--plain", "--user", dovecot.user,
            "--password-file", str(dovecot.password_file), "--db", str(db)]
    if limit:
        argv += ["--limit", str(limit)]
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=work)
    out = proc.stdout.read().decode()
    _pid, status, usage = os.wait4(proc.pid, 0)
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
        "peak_mb_any_process": round(usage.ru_maxrss / 1024), "rows": rows, "cache_hit_share": round(hits / max(1, rows), 3),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10000,50000", help="folder sizes for the memory runs (default 10000,50000)")
    ap.add_argument("--ratio-messages", type=int, default=2000, help="messages per side in the ratio runs")
    ap.add_argument("--repeat", type=int, default=1, help="ratio runs per side (the best is kept)")
    ap.add_argument("--corpus", help="the shared corpus folder")
    ap.add_argument("--workdir", help="where to keep Dovecot and the databases (default: a temp dir, removed)")
    args = ap.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    corpus = load_corpus(corpus_dir(args.corpus))
    base = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="atlas-bfbench-"))
    base.mkdir(parents=True, exist_ok=True)
    os.chmod(base, 0o755)
    work = base / "runs"
    work.mkdir(exist_ok=True)
    dovecot = DovecotInstance(base / "dovecot")
    dovecot.start()
    result: dict = {"corpus_messages": len(corpus), "cpus": os.cpu_count()}
    try:
        have = 0
        first = max(sizes[0], args.ratio_messages)
        secs = fill(dovecot, corpus, 0, first)
        result["fill"] = [{"from": 0, "to": first, "seconds": round(secs, 1), "msgs_per_s": round(first / secs)}]
        print(f"APPENDed {first} messages in {secs:.1f} s ({first / secs:.0f}/s)", flush=True)
        have = first

        plain = [run_backfill(dovecot, work, "plain", True, args.ratio_messages) for _ in range(args.repeat)]
        opt = [run_backfill(dovecot, work, "optimised", False, args.ratio_messages) for _ in range(args.repeat)]
        p = max(plain, key=lambda r: r["msgs_per_s"])
        o = max(opt, key=lambda r: r["msgs_per_s"])
        result["ratio"] = {"plain": p, "optimised": o, "ratio": round(o["msgs_per_s"] / p["msgs_per_s"], 2),
                           "ratio_wall": round(p["wall_s"] / o["wall_s"], 2)}
        print(f"plain     {p['messages']} msgs {p['msgs_per_s']:8.1f} msg/s (wall {p['wall_s']} s)", flush=True)
        print(f"optimised {o['messages']} msgs {o['msgs_per_s']:8.1f} msg/s (wall {o['wall_s']} s)", flush=True)
        print(f"ratio optimised/plain: {result['ratio']['ratio']}x (wall-clock incl. start-up: {result['ratio']['ratio_wall']}x)", flush=True)

        result["memory"] = []
        for size in sizes:
            if size > have:
                secs = fill(dovecot, corpus, have, size)
                result["fill"].append({"from": have, "to": size, "seconds": round(secs, 1), "msgs_per_s": round((size - have) / secs)})
                print(f"APPENDed {have}..{size} in {secs:.1f} s ({(size - have) / secs:.0f}/s)", flush=True)
                have = size
            r = run_backfill(dovecot, work, f"full-{size}", False, None)
            result["memory"].append({"folder": size, **r})
            print(f"folder {size:6}: {r['messages']} msgs in {r['seconds']} s ({r['msgs_per_s']} msg/s), peak "
                  f"{r['peak_mb_parent']} MB parent / {r['peak_mb_any_process']} MB largest process, "
                  f"cache hits {r['cache_hit_share']:.0%}", flush=True)
    finally:
        dovecot.stop()
        if not args.workdir:
            shutil.rmtree(base, ignore_errors=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
