#!/usr/bin/env python3
"""Online benchmark in the TREC spam-track style (issue 15), with bogofilter as the yardstick.

Goes through a corpus in arrival order (index.csv order; trec07p by default), classifies
each message, then teaches its true label: every message (immediate feedback) or only the
first 5,000 (delayed feedback). Learners: atlas from an empty model, atlas from the shipped
model (both through the product's `Model.score` and `classifier.learn`), and bogofilter from
an empty wordlist (a private `-d` directory; one `bogofilter -TT` process to classify and one
`-s`/`-n` to register each message, as a mail system would run it). Reports (1 - ROC AUC) in
percent over all messages, over the second half and over five slices in order; spam recall,
ham FPR and unsure rate over the second half at each learner's own cutoffs (atlas: the
model's; bogofilter: its defaults, spam 0.99 / ham 0.45); ms per classify and per learn.

bogofilter reads the headers too. Upstream filters' verdict headers (`X-Spam-*`, which most
trec07p ham carries) are taken out of what it sees by default, as atlas never uses them
(`--bogofilter-input raw` feeds the bytes unchanged).

This script owns the command line, the bogofilter runner and the printing; the loop and
the figures are `atlas_milter.evaluate.online_run`. The corpus is read at run time only.

    python -m scripts.online_bench [--corpus ../shared/corpus/trec07p] [--limit N] [--json]
        [--learners atlas-empty,atlas-shipped,bogofilter] [--feedback immediate,delayed]
        [--delay 5000] [--jobs 2]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import multiprocessing
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from atlas_milter.classifier import load_model
from atlas_milter.errors import AtlasError, SourceError
from atlas_milter.evaluate import AtlasLearner, empty_model, online_run
from atlas_milter.message import ParsedMessage, parse_message
from atlas_milter.verdict import HAM, SPAM, UNSURE

REPO = Path(__file__).resolve().parents[1]
LEARNERS = ("atlas-empty", "atlas-shipped", "bogofilter")
_HEADER_END = re.compile(rb"\r?\n\r?\n")
_VERDICT_HEADER = re.compile(rb"^x-spam-[^:\n]*:.*\n(?:[ \t].*\n)*", re.I | re.M)


def strip_verdict_headers(raw: bytes) -> bytes:
    """`raw` without its X-Spam-* header fields (other filters' verdicts); the header's line
    ends become LF, the body is untouched."""
    blank = _HEADER_END.search(raw)
    head, body = (raw, b"") if blank is None else (raw[: blank.end()], raw[blank.end():])
    return _VERDICT_HEADER.sub(b"", head.replace(b"\r\n", b"\n")) + body


class Bogofilter:
    """bogofilter with a private, initially empty wordlist, one process per step."""

    CODES = {0: SPAM, 1: HAM, 2: UNSURE}

    def __init__(self, strip: bool = True, name: str = "bogofilter") -> None:
        self.binary = shutil.which("bogofilter")
        if not self.binary:
            raise AtlasError("bogofilter is not installed (apt-get install bogofilter, or scripts/bootstrap.sh --system)")
        # In memory when the machine has /dev/shm: registering syncs the wordlist to disk, which
        # doubled the cost of each registration on a busy disk.
        shm = "/dev/shm" if Path("/dev/shm").is_dir() else None
        self.dir = tempfile.mkdtemp(prefix="atlas-bogofilter-", dir=shm)
        self.strip = strip
        self.name = name

    def _run(self, flags: list[str], raw: bytes) -> subprocess.CompletedProcess:
        data = strip_verdict_headers(raw) if self.strip else raw
        # -C: no config file, so its compiled-in defaults (cutoffs 0.99 / 0.45) apply.
        return subprocess.run([self.binary, "-C", "-d", self.dir, *flags], input=data, capture_output=True)

    def classify(self, raw: bytes, msg: ParsedMessage) -> tuple[float, str]:
        if not Path(self.dir, "wordlist.db").exists():
            return 0.5, UNSURE  # nothing registered yet: bogofilter refuses to score
        proc = self._run(["-TT"], raw)
        if proc.returncode not in self.CODES:
            raise AtlasError(f"bogofilter failed (exit {proc.returncode}): {proc.stderr.decode(errors='replace').strip()[:200]}")
        return float(proc.stdout.split()[0]), self.CODES[proc.returncode]

    def learn(self, raw: bytes, msg: ParsedMessage, is_spam: bool) -> None:
        proc = self._run(["-s" if is_spam else "-n"], raw)
        if proc.returncode != 0:
            raise AtlasError(f"bogofilter registration failed (exit {proc.returncode}): {proc.stderr.decode(errors='replace').strip()[:200]}")

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def read_stream(corpus: Path, limit: int | None) -> list[tuple[str, bytes, ParsedMessage]]:
    """(label, raw, parsed) of every message of corpus/index.csv, in the index's order."""
    index = corpus / "index.csv"
    if not index.is_file():
        raise SourceError(f"corpus {corpus}: no index.csv there (give --corpus)")
    stream = []
    with open(index, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            if limit is not None and len(stream) >= limit:
                break
            if row.get("label") not in ("ham", "spam"):
                continue
            try:
                raw = (corpus / row["path"]).read_bytes()
            except OSError as exc:
                raise SourceError(f"corpus {corpus.name}: cannot read a listed message: {exc.strerror or exc}") from None
            stream.append((row["label"], raw, parse_message(raw)))
    if not stream:
        raise SourceError(f"corpus {corpus}: no labelled messages")
    return stream


_STREAM: list = []  # set before the run workers fork: shared copy-on-write


def progress(msg: str) -> None:
    print(f"online_bench: {msg}", file=sys.stderr, flush=True)


def make_learner(kind: str, bogofilter_raw: bool):
    if kind == "atlas-empty":
        return AtlasLearner(empty_model(), kind)
    if kind == "atlas-shipped":
        return AtlasLearner(load_model(), kind)
    if kind == "bogofilter":
        return Bogofilter(strip=not bogofilter_raw, name="bogofilter" + (" (raw)" if bogofilter_raw else ""))
    raise AtlasError(f"unknown learner {kind!r} (have: {', '.join(LEARNERS)})")


def run_one(job: tuple[str, int | None, bool]) -> dict:
    kind, teach_first, bogofilter_raw = job
    learner = make_learner(kind, bogofilter_raw)
    try:
        result = online_run(learner, _STREAM, teach_first, progress=progress)
        progress(f"done: {json.dumps(result)}")  # a run's figures as soon as it ends: the whole benchmark is long
        return result
    finally:
        if isinstance(learner, Bogofilter):
            learner.close()


def fmt(value: float, spec: str) -> str:
    return "-" if value is None or not math.isfinite(value) else format(value, spec)


def print_table(results: list[dict], header: str) -> None:
    print(header)
    print(f"{'learner':16s} {'feedback':11s} {'taught':>6s} {'1-AUC%':>7s} {'2nd half':>8s} {'recall':>7s} {'ham FPR':>7s} "
          f"{'unsure':>7s} {'cls ms':>6s} {'learn ms':>8s}  1-AUC% per fifth")
    for r in results:
        print(f"{r['learner']:16s} {r['feedback']:11s} {r['taught']:6d} {fmt(r['one_minus_auc_pct'], '7.3f')} "
              f"{fmt(r['one_minus_auc_pct_second_half'], '8.3f')} {fmt(100 * r['spam_recall_second_half'], '6.2f')}% "
              f"{fmt(100 * r['ham_fpr_second_half'], '6.2f')}% {fmt(100 * r['unsure_rate_second_half'], '6.2f')}% "
              f"{fmt(r['classify_ms'], '6.2f')} {fmt(r['learn_ms'], '8.2f')}  "
              + " ".join(fmt(w, ".2f") for w in r["one_minus_auc_pct_windows"]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[20:]))
    ap.add_argument("--corpus", default=str(REPO.parent / "shared" / "corpus" / "trec07p"),
                    help="a corpus folder whose index.csv lists the messages in arrival order (default: ../shared/corpus/trec07p)")
    ap.add_argument("--limit", type=int, help="only the first N messages")
    ap.add_argument("--learners", default=",".join(LEARNERS), help=f"comma-separated (default: {','.join(LEARNERS)})")
    ap.add_argument("--feedback", default="immediate,delayed", help="immediate, delayed or both (default)")
    ap.add_argument("--delay", type=int, default=5000, help="delayed feedback teaches only this many first messages (default 5000)")
    ap.add_argument("--bogofilter-input", choices=("strip-verdicts", "raw"), default="strip-verdicts",
                    help="what bogofilter sees: the message without X-Spam-* headers (default) or unchanged")
    ap.add_argument("--jobs", type=int, default=2, help="runs at once, in forked processes (default 2)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON instead of the table")
    args = ap.parse_args(argv)

    started = time.perf_counter()
    try:
        kinds = [k for k in args.learners.split(",") if k]
        for kind in kinds:
            if kind not in LEARNERS:
                raise AtlasError(f"unknown learner {kind!r} (have: {', '.join(LEARNERS)})")
        if "bogofilter" in kinds and not shutil.which("bogofilter"):
            raise AtlasError("bogofilter is not installed (apt-get install bogofilter, or scripts/bootstrap.sh --system)")
        modes = {"immediate": None, "delayed": args.delay}
        feedback = [f for f in args.feedback.split(",") if f]
        if not feedback or any(f not in modes for f in feedback):
            raise AtlasError(f"--feedback {args.feedback}: use immediate, delayed or immediate,delayed")
        _STREAM[:] = read_stream(Path(args.corpus), args.limit)
        progress(f"{len(_STREAM)} messages read and parsed")
        jobs = [(k, modes[f], args.bogofilter_input == "raw") for k in kinds for f in feedback]
        jobs.sort(key=lambda job: job[0] != "bogofilter")  # the slowest runs first; results keep this order
        if args.jobs <= 1 or len(jobs) <= 1:
            results = [run_one(job) for job in jobs]
        else:
            with multiprocessing.get_context("fork").Pool(min(args.jobs, len(jobs))) as pool:
                results = list(pool.imap(run_one, jobs, chunksize=1))
    except AtlasError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    seconds = time.perf_counter() - started
    header = (f"Online benchmark on {Path(args.corpus).name}: {len(_STREAM)} messages in arrival order, classify then "
              f"teach (immediate: every message; delayed: the first {args.delay}); recall/FPR/unsure over the second "
              f"half at each learner's cutoffs; bogofilter input: {args.bogofilter_input}. {seconds:.0f} s.")
    if args.json:
        print(json.dumps({"header": header, "seconds": round(seconds, 1), "results": results}, indent=1))
    else:
        print_table(results, header)
    return 0


if __name__ == "__main__":
    sys.exit(main())
