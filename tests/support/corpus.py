"""The shared corpus as the tests and the bench scripts read it: index rows in a fixed mixed
order, raw messages without an mbox "From " line, a deterministic pick of ham and spam."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterable


def read_index(corpus_dir: Path, split: str | None = None) -> list[dict]:
    """The rows of the corpus's index.csv (of `split` when given), ordered by content hash:
    ham and spam mixed, in the same order on every run."""
    with open(Path(corpus_dir) / "index.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if split is None or r["split"] == split]
    rows.sort(key=lambda r: r["path"].rsplit("/", 1)[-1].split(".")[-1])
    return rows


def load_corpus(corpus_dir: Path, rows: Iterable[dict]) -> list[tuple[dict, bytes]]:
    """(row, raw bytes) with any mbox "From " line removed (it is not a header)."""
    out = []
    for row in rows:
        raw = (Path(corpus_dir) / row["path"]).read_bytes()
        if raw.startswith(b"From "):
            raw = raw.split(b"\n", 1)[1] if b"\n" in raw else b""
        out.append((row, raw))
    return out


def pick(rows: list[dict], split: str, n_ham: int, n_spam: int) -> list[dict]:
    """A deterministic mix: every k-th message of each label in `split`."""
    out = []
    for label, n in (("ham", n_ham), ("spam", n_spam)):
        cand = [r for r in rows if r["split"] == split and r["label"] == label]
        step = max(1, len(cand) // max(n, 1))
        out.extend(cand[::step][:n])
    return out
