#!/usr/bin/env python3
"""Issue 15's speed bar: `atlas-milter eval` messages/s against bogofilter's batch mode on the
same messages, in the same run, interleaved.

bogofilter (Debian package `bogofilter`) gets a private wordlist registered with the index's
`train` split (`-s -B` / `-n -B`); each round then times `bogofilter -b` (batch: file names on
standard input, one terse verdict line each, `-T`) over the `test` split, and runs `atlas-milter eval
--json` on the same split in its own process (its figure: parse + score, one process, bytes
already read). Rounds alternate which side goes first. Prints each side's median and range,
the ratio of the medians, and the range of the per-round ratios (noise on this machine is
±15% between runs).

    python -m scripts.eval_speed [--index ../shared/corpus/spamassassin/index.csv] [--rounds 5]
        [--model PATH] [--json]
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_INDEX = REPO.parent / "shared" / "corpus" / "spamassassin" / "index.csv"


def split_files(index: Path) -> dict[tuple[str, str], list[str]]:
    """(split, label) -> absolute file paths, in index order."""
    files: dict[tuple[str, str], list[str]] = {}
    with index.open(newline="") as fh:
        for row in csv.DictReader(fh):
            files.setdefault((row["split"], row["label"]), []).append(str(index.parent / row["path"]))
    return files


def bogofilter_rate(binary: str, wordlist: str, paths: list[str]) -> float:
    """Messages per second of one `bogofilter -b` over `paths`."""
    started = time.perf_counter()
    proc = subprocess.run([binary, "-C", "-d", wordlist, "-b", "-T"], input="\n".join(paths) + "\n",
                          capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    verdicts = proc.stdout.count("\n")
    if proc.returncode not in (0, 1, 2) or verdicts != len(paths):
        raise SystemExit(f"Error: bogofilter -b failed (exit {proc.returncode}, {verdicts} verdicts): {proc.stderr.strip()[:200]}")
    return len(paths) / elapsed


def atlas_rate(index: Path, model: str | None) -> float:
    """The msgs_per_s that `atlas-milter eval --json` reports for the test split."""
    cmd = [sys.executable, "-m", "atlas_milter", "eval", "--index", str(index), "--split", "test", "--json"]
    if model:
        cmd += ["--model", model]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"Error: atlas-milter eval failed: {proc.stderr.strip()[:300]}")
    return float(json.loads(proc.stdout)["msgs_per_s"])


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.0f} (range {min(values):.0f}-{max(values):.0f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, default=DEFAULT_INDEX)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--model", help="model file for atlas (default: the shipped one)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    binary = shutil.which("bogofilter")
    if not binary:
        print("Error: bogofilter is not installed (apt-get install bogofilter, or scripts/bootstrap.sh --system)", file=sys.stderr)
        return 1
    if not args.index.is_file():
        print(f"Error: no index at {args.index} (give --index CSV)", file=sys.stderr)
        return 1
    if args.rounds < 1:
        print("Error: --rounds must be at least 1", file=sys.stderr)
        return 1
    files = split_files(args.index)
    test = files.get(("test", "ham"), []) + files.get(("test", "spam"), [])
    if not test:
        print(f"Error: {args.index} has no test split", file=sys.stderr)
        return 1
    bogo: list[float] = []
    atlas: list[float] = []
    with tempfile.TemporaryDirectory(prefix="atlas-speed-") as wordlist:
        for label, flag in (("spam", "-s"), ("ham", "-n")):
            paths = files.get(("train", label), [])
            if paths:
                subprocess.run([binary, "-C", "-d", wordlist, flag, "-B", *paths], check=True, capture_output=True)
        for round_no in range(args.rounds):
            steps = [lambda: bogo.append(bogofilter_rate(binary, wordlist, test)),
                     lambda: atlas.append(atlas_rate(args.index, args.model))]
            for step in steps if round_no % 2 == 0 else reversed(steps):
                step()
    ratios = [a / b for a, b in zip(atlas, bogo)]
    result = {
        "messages": len(test),
        "atlas_msgs_per_s": [round(v, 1) for v in atlas],
        "bogofilter_msgs_per_s": [round(v, 1) for v in bogo],
        "ratio_of_medians": round(statistics.median(atlas) / statistics.median(bogo), 3),
        "ratio_range": [round(min(ratios), 3), round(max(ratios), 3)],
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{len(test)} messages of the test split of {args.index}, {args.rounds} interleaved rounds")
        print(f"atlas-milter eval   {spread(atlas)} messages/s (parse + score, one process)")
        print(f"bogofilter -b       {spread(bogo)} messages/s")
        print(f"ratio               {result['ratio_of_medians']:.2f} (per round {min(ratios):.2f}-{max(ratios):.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
