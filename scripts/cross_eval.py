#!/usr/bin/env python3
"""The cross-corpus evaluation matrix (issue 15): train on the `train` split of one set of
corpora, test on the `test` split of each corpus, with ROC AUC, spam recall, ham FPR and
unsure rate at each model's own cutoffs, and the same per `group` of the test mail.

This script owns the command line and the printing; the work is
`atlas_milter.evaluate.cross_corpus_matrix`. Each message is parsed once per run; rows
train in parallel forked processes (`--jobs`), each with the product's `train_model`
exactly as `atlas-milter train` runs it. Progress goes to stderr.

    python -m scripts.cross_eval [--corpus-root ../shared/corpus] [--jobs 2] [--json]
        [--rows default|all|SPEC ...]   SPEC: TRAIN[+TRAIN...][:TEST[+TEST...]], shipped[:TESTS],
                                        model=PATH[:TESTS]; no :TESTS part = every corpus
    python -m scripts.cross_eval --rows shipped          # the shipped model on every test split
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from atlas_milter.errors import AtlasError
from atlas_milter.evaluate import MatrixCell, cross_corpus_matrix, parse_rows, read_corpus

REPO = Path(__file__).resolve().parents[1]
CORPORA = ("spamassassin", "modern", "trec07p")


def pct(value: float | None, digits: int = 2) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{100 * value:.{digits}f}%"


def print_matrix(cells: list[MatrixCell], header: str) -> None:
    print(header)
    print(f"{'train → test':40s} {'n':>6s} {'AUC':>7s} {'1-AUC':>7s} {'recall':>7s} {'ham FPR':>7s} "
          f"{'unsure':>7s}  cutoffs (spam/ham)")
    row = None
    for cell in cells:
        if cell.row != row:
            row = cell.row
            trained = f"trained on {cell.n_train} in {cell.train_seconds:.0f} s" if cell.train_seconds > 1 else ""
            print(f"-- {row}: {cell.model_version} {trained}")
        q = cell.quality
        auc = q["auc"]
        print(f"{cell.row + ' → ' + cell.test:40s} {q['n']:6d} {auc:7.4f} {pct(1 - auc):>7s} "
              f"{pct(q['spam_recall'], 1):>7s} {pct(q['ham_fpr']):>7s} {pct(q['unsure_rate'], 1):>7s}  "
              f"{cell.spam_cutoff:.2f}/{cell.ham_cutoff:.2f}")
        if cell.test == "all" or len(cell.groups) < 2:
            continue
        for group, g in cell.groups.items():  # a group's AUC is left out: most groups hold one label
            recall = pct(g["spam_recall"], 1) if g["n_spam"] else ""
            fpr = pct(g["ham_fpr"]) if g["n_ham"] else ""
            print(f"{'    ' + group:40s} {g['n']:6d} {'':7s} {'':7s} {recall:>7s} {fpr:>7s} {pct(g['unsure_rate'], 1):>7s}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[8:]))
    ap.add_argument("--corpus-root", default=str(REPO.parent / "shared" / "corpus"),
                    help="folder holding one folder per corpus, each with an index.csv (default: ../shared/corpus)")
    ap.add_argument("--corpora", default=",".join(CORPORA), help=f"corpora to read, comma-separated (default: {','.join(CORPORA)})")
    ap.add_argument("--rows", nargs="+", default=["default"], help="rows: default, all, or specs (see above)")
    ap.add_argument("--jobs", type=int, default=2, help="rows trained at once, in forked processes (default 2)")
    ap.add_argument("--json", action="store_true", help="print one JSON object with every cell instead of the table")
    ap.add_argument("--save-json", metavar="PATH", help="also write that JSON object to PATH")
    args = ap.parse_args(argv)

    def progress(msg: str) -> None:
        print(f"cross_eval: {msg}", file=sys.stderr, flush=True)

    started = time.perf_counter()
    try:
        names = [n for n in args.corpora.split(",") if n]
        rows = parse_rows(args.rows, names)
        needed = sorted({n for row in rows for n in (*row.train, *row.tests)}, key=names.index)
        corpora = {n: read_corpus(Path(args.corpus_root) / n, progress=progress) for n in needed}
        cells = cross_corpus_matrix(corpora, rows, jobs=args.jobs, progress=progress)
    except AtlasError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    seconds = time.perf_counter() - started
    header = (f"Cross-corpus matrix: models trained on the train split of the row's corpora, tested on the "
              f"test split of each column's corpus; verdicts at each model's own cutoffs. {seconds:.0f} s.")
    result = {"header": header, "seconds": round(seconds, 1),
              "corpora": {n: {"train": len(c.train), "test": len(c.test)} for n, c in corpora.items()},
              "cells": [cell.as_dict() for cell in cells]}
    if args.save_json:
        Path(args.save_json).write_text(json.dumps(result, indent=1) + "\n")
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print_matrix(cells, header)
    return 0


if __name__ == "__main__":
    sys.exit(main())
