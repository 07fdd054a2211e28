#!/usr/bin/env python3
"""CPU time per message of parsing, feature extraction and scoring, in one process.

The messages are the test split of the shared corpus as the milter sees them (CRLF line
ends, mbox "From " line removed, a Received header on top). Each step runs over all of
them `--passes` times; the fastest pass is reported (thread CPU time, so other processes
on the machine count as little as possible). Inside the milter the same steps cost more:
the caches are cold after Postfix ran (see scripts/milter_bench.py).

    python -m scripts.classify_cost [--passes 9]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from tests.support.corpus import load_corpus, read_index

from atlas_milter.classifier import features, load_model
from atlas_milter.message import DEFAULT_MAX_BYTES, parse_message
from atlas_milter.pipeline import analyse

REPO = Path(__file__).resolve().parents[1]

RECEIVED = b"Received: from client.test (client.test [127.0.0.1]) by mx.atlas.test (Postfix) with ESMTP id 4AbC; Sat, 28 Nov 2026 17:00:00 +0000\r\n"


def fastest(step, items, passes: int) -> float:
    """ms per item of the fastest pass."""
    best = float("inf")
    for _ in range(passes):
        started = time.thread_time()
        for item in items:
            step(item)
        best = min(best, time.thread_time() - started)
    return best / len(items) * 1000.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--passes", type=int, default=9)
    ap.add_argument("--corpus", default=os.environ.get("ATLAS_CORPUS", str(REPO.parent / "shared" / "corpus" / "spamassassin")))
    args = ap.parse_args()
    corpus = Path(args.corpus)
    rows = read_index(corpus, "test")
    raws = [RECEIVED + raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") for _, raw in load_corpus(corpus, rows)]
    model = load_model()
    parsed = [parse_message(raw) for raw in raws]
    costs = {
        "parse": fastest(parse_message, raws, args.passes),
        "features": fastest(features, parsed, args.passes),
        "score (features, weights, reasons)": fastest(model.score, parsed, args.passes),
        "parse + score": fastest(lambda raw: analyse(raw, model, DEFAULT_MAX_BYTES), raws, args.passes),
    }
    print(f"{len(raws)} test-split messages, fastest of {args.passes} passes, thread CPU ms per message:")
    for step, ms in costs.items():
        print(f"  {step:36s} {ms:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
