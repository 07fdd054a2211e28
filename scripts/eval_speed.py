#!/usr/bin/env python3
"""Issues 15 and 17's speed bar: `atlas-milter eval` messages/s against bogofilter's batch mode
on the same messages, in the same run, interleaved; and the pure-Python classifier
(ENABLE_COMPILED=false) beside the compiled one, so the compiled hot path's own speed-up is
measured in the same rounds.

bogofilter (Debian package `bogofilter`) gets a private wordlist registered with the index's
`train` split (`-s -B` / `-n -B`); each round then times `bogofilter -b` (batch: file names on
standard input, one terse verdict line each, `-T`) over the `test` split, and runs `atlas-milter eval
--json` on the same split in its own process (its figure: parse + score, one process, bytes
already read): compiled, and pure (ENABLE_COMPILED=false). `--before DIR` adds a third
atlas side: the package of another checkout (e.g. `git worktree add /tmp/old COMMIT`), run
with this venv, for a before/after in the same rounds. Rounds rotate which side goes first.
Prints each side's median and range, the ratio of the medians to bogofilter, and the range
of the per-round ratios (noise on this machine is ±15% between runs).

    python -m scripts.eval_speed [--index ../shared/corpus/spamassassin/index.csv] [--rounds 5]
        [--model PATH] [--before DIR] [--json]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
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


def atlas_rate(index: Path, model: str | None, env: dict[str, str] | None = None, tree: Path = REPO) -> float:
    """The msgs_per_s that `atlas-milter eval --json` reports for the test split, run in
    `tree` (`python -m` imports the atlas_milter of its working directory first)."""
    cmd = [sys.executable, "-m", "atlas_milter", "eval", "--index", str(index), "--split", "test", "--json"]
    if model:
        cmd += ["--model", model]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=tree)
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
    parser.add_argument("--before", type=Path, help="another checkout whose atlas_milter to time as well (the 'before')")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.before and not (args.before / "atlas_milter" / "__init__.py").is_file():
        print(f"Error: --before {args.before} holds no atlas_milter package", file=sys.stderr)
        return 1
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
    # atlas sides: (extra environment, checkout)
    sides = {"compiled": ({}, REPO), "pure": ({"ENABLE_COMPILED": "false"}, REPO)}
    if args.before:
        sides["before"] = ({}, args.before.resolve())
    rates: dict[str, list[float]] = {name: [] for name in ("bogofilter", *sides)}
    with tempfile.TemporaryDirectory(prefix="atlas-speed-") as wordlist:
        for label, flag in (("spam", "-s"), ("ham", "-n")):
            paths = files.get(("train", label), [])
            if paths:
                subprocess.run([binary, "-C", "-d", wordlist, flag, "-B", *paths], check=True, capture_output=True)
        order = list(rates)
        for round_no in range(args.rounds):
            for name in order[round_no % len(order):] + order[: round_no % len(order)]:
                if name == "bogofilter":
                    rates[name].append(bogofilter_rate(binary, wordlist, test))
                else:
                    rates[name].append(atlas_rate(args.index.resolve(), args.model, *sides[name]))
    bogo = rates["bogofilter"]
    result: dict = {"messages": len(test), "bogofilter_msgs_per_s": [round(v, 1) for v in bogo]}
    for name in sides:
        ratios = [a / b for a, b in zip(rates[name], bogo)]
        result[name] = {
            "msgs_per_s": [round(v, 1) for v in rates[name]],
            "ratio_of_medians": round(statistics.median(rates[name]) / statistics.median(bogo), 3),
            "ratio_range": [round(min(ratios), 3), round(max(ratios), 3)],
        }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{len(test)} messages of the test split of {args.index}, {args.rounds} interleaved rounds")
        print(f"bogofilter -b          {spread(bogo)} messages/s")
        for name in sides:
            r = result[name]
            print(f"atlas eval, {name:9}  {spread(rates[name])} messages/s (parse + score, one process); "
                  f"to bogofilter {r['ratio_of_medians']:.2f} (per round {r['ratio_range'][0]:.2f}-{r['ratio_range'][1]:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
