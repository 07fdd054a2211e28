#!/usr/bin/env python3
"""Issue 17's backfill bar: `atlas-milter backfill --maildir DIR --dry-run` over the corpus's
distinct messages (no copies: the cache cannot help), timed as a command, start-up included,
on the plain path (every ENABLE_* flag off, so the pure-Python classifier too) and optimised
(the defaults), and optimised with only ENABLE_COMPILED=false, alternating in rounds.

    python -m scripts.maildir_backfill_bench [--corpus ../shared/corpus/spamassassin]
        [--workdir bench-work] [--rounds 3] [--json]

The Maildir is built once under --workdir (atlas_milter.bench.build_workload with no copies)
and each run writes a fresh database beside it. Prints each side's median wall time, the
ratio of the medians to the plain side and the per-round ratios (this machine's noise is
±15% between runs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from atlas_milter.bench import ALL_OFF, build_workload, find_corpus
from atlas_milter.errors import AtlasError

SIDES = {  # name -> environment
    "plain": {f"ENABLE_{name.upper()}": "false" for name in ALL_OFF},
    "optimised": {},
    "optimised-pure": {"ENABLE_COMPILED": "false"},
}


def run_backfill(maildir: Path, db: Path, env: dict[str, str]) -> float:
    """Wall seconds of one `atlas-milter backfill --maildir --dry-run`, start-up included."""
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "atlas_milter", "backfill", "--maildir", str(maildir), "--dry-run", "--db", str(db)]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env})
    took = time.perf_counter() - started
    if proc.returncode != 0:
        raise AtlasError(f"backfill failed (exit {proc.returncode}): {proc.stderr.strip()[-300:]}")
    return took


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", help="the shared corpus folder (default ../shared/corpus/spamassassin or $ATLAS_CORPUS)")
    parser.add_argument("--workdir", type=Path, default=Path("bench-work"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.rounds < 1:
            raise AtlasError("--rounds must be at least 1")
        corpus = find_corpus(args.corpus)
        maildir = build_workload(corpus, args.workdir / "distinct", copies=0)
        messages = len(os.listdir(maildir / "cur"))
        seconds: dict[str, list[float]] = {name: [] for name in SIDES}
        for round_no in range(args.rounds):
            names = list(SIDES)
            for name in names[round_no % len(names):] + names[: round_no % len(names)]:
                seconds[name].append(run_backfill(maildir, args.workdir / f"distinct-{name}.db", SIDES[name]))
    except AtlasError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    plain = seconds["plain"]
    result: dict = {"messages": messages, "seconds": {k: [round(v, 2) for v in vs] for k, vs in seconds.items()}}
    for name in ("optimised", "optimised-pure"):
        rounds = [p / o for p, o in zip(plain, seconds[name])]
        result[name] = {"speedup_of_medians": round(statistics.median(plain) / statistics.median(seconds[name]), 2),
                        "speedup_per_round": [round(r, 2) for r in rounds],
                        "median_of_round_speedups": round(statistics.median(rounds), 2)}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"backfill --maildir of {messages} distinct messages, {args.rounds} rounds, wall time with start-up")
        for name, values in seconds.items():
            print(f"  {name:15} median {statistics.median(values):6.2f} s  (rounds: {', '.join(f'{v:.2f}' for v in values)})")
        for name in ("optimised", "optimised-pure"):
            r = result[name]
            print(f"  plain / {name:15} {r['speedup_of_medians']:.2f} (median of rounds' ratios {r['median_of_round_speedups']:.2f}: "
                  f"{', '.join(map(str, r['speedup_per_round']))})   bar: optimised >= 3")
    return 0


if __name__ == "__main__":
    sys.exit(main())
