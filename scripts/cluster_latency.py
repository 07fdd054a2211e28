#!/usr/bin/env python3
"""How long a learn on host A takes to be in force on host B (issue 18: p99 <= 1 s).

A private Redis (tests/support/servers.py) and N "hosts", each a ClusterLearning with its own
verdict database, in this process (as tests/test_cluster_learning.py runs them). Host A
learns a new message every 1/RATE s; for each, the time from A's learn() until every other
host has swapped in a model that holds it. Prints p50, p95, p99 and max, and with
--compact-every the snapshots the stream was folded into meanwhile.

    python -m scripts.cluster_latency --learns 300 --rate 5 --hosts 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from importlib import resources
from pathlib import Path

from tests.support.servers import RedisInstance, private_tmpdir

from atlas_milter.classifier import load_model
from atlas_milter.cluster_sync import ClusterLearning
from atlas_milter.migrate import apply_migrations
from atlas_milter.redis_link import RedisLink

MAX_BYTES = 512 * 1024


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--learns", type=int, default=300)
    ap.add_argument("--rate", type=float, default=5.0, help="learns a second on host A")
    ap.add_argument("--hosts", type=int, default=3)
    ap.add_argument("--compact-every", type=int, default=100)
    args = ap.parse_args(argv)

    sample = resources.files("atlas_milter").joinpath("data", "sample")
    raws = [p.read_bytes() for p in sorted(sample.iterdir(), key=lambda p: p.name) if p.name.endswith(".eml")]
    redis = RedisInstance(private_tmpdir("atlas-latency-")).start()
    work = Path(tempfile.mkdtemp(prefix="atlas-latency-"))
    hosts: list[ClusterLearning] = []
    applied: list[int] = []  # per host: learns in force (its last swap)
    changed = threading.Condition()
    try:
        base = load_model()
        for i in range(args.hosts):
            db = work / f"mx{i}.db"
            apply_migrations(db)

            def use_model(model, i=i) -> None:
                with changed:
                    applied[i] = hosts[i].shared.applied_count if i < len(hosts) else 0
                    changed.notify_all()

            applied.append(0)
            hosts.append(ClusterLearning(RedisLink(redis.url), str(db), base, use_model, host=f"mx{i}",
                                         max_bytes=MAX_BYTES, compact_every=args.compact_every))
        for host in hosts:
            host.start()
        delays = []
        for n in range(1, args.learns + 1):
            started = time.perf_counter()
            hosts[0].learn(raws[n % len(raws)] + f"\nlatency run {n}\n".encode(), is_spam=n % 2 == 0)
            with changed:
                if not changed.wait_for(lambda: min(applied[1:]) >= n, timeout=10):
                    print(f"learn {n} did not reach every host within 10 s", file=sys.stderr)
                    return 1
            delays.append(time.perf_counter() - started)
            time.sleep(max(0.0, 1.0 / args.rate - delays[-1]))
        ms = sorted(1000 * d for d in delays)
        q = statistics.quantiles(ms, n=100)
        print(f"{len(ms)} learns on mx0, in force on {args.hosts - 1} other host(s): p50 {q[49]:.0f} ms, "
              f"p95 {q[94]:.0f} ms, p99 {q[98]:.0f} ms, max {ms[-1]:.0f} ms   (bar: p99 <= 1000 ms)")
        print("status:", [h.status()["version"] for h in hosts], "snapshot at", hosts[0].status()["snapshot"])
        return 0
    finally:
        for host in hosts:
            host.stop()
        redis.stop()


if __name__ == "__main__":
    sys.exit(main())
