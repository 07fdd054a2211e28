"""Owns training and evaluating models from labelled mail sources: reading ham/spam
sources (or an index.csv with a split), the quality figures (ROC AUC, spam recall, ham
false-positive rate, unsure rate) and the scoring speed of one process.

It reads sources and calls the classifier; it writes no database and starts no workers,
so `eval` measures the classifier itself: parse + score, in one process, model loaded.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from atlas_milter.classifier import Model, TrainingOptions, train_model
from atlas_milter.errors import SourceError
from atlas_milter.message import DEFAULT_MAX_BYTES, ParsedMessage, parse_message
from atlas_milter.policy import Cutoffs, label_for
from atlas_milter.sources import MailItem, iter_source
from atlas_milter.verdict import HAM, SPAM, UNSURE


def labelled_items(
    ham: Iterable[str] = (),
    spam: Iterable[str] = (),
    index: str | Sequence[str] | None = None,
    split: str | None = None,
    on_error: Callable[[str], None] | None = None,
) -> Iterator[MailItem]:
    """Messages with their labels, from --ham/--spam sources and/or index.csv files."""
    for _, item in _sourced_items(ham, spam, index, split, on_error):
        yield item


def _sourced_items(ham, spam, index, split, on_error=None) -> Iterator[tuple[str, MailItem]]:
    """(source name, labelled message): an index's source is its folder's name (the
    corpus), a --ham/--spam source is named as given."""
    kwargs = {"on_error": on_error} if on_error else {}
    indexes = [index] if isinstance(index, str) else list(index or ())
    if split and not indexes:
        raise SourceError("--split needs --index")
    for path in indexes:
        for item in iter_source(path, split, **kwargs):
            yield Path(path).resolve().parent.name, item
    for label, specs in (("ham", ham), ("spam", spam)):
        for spec in specs:
            for item in iter_source(spec, **kwargs):
                yield spec, MailItem(item.key, item.raw, label)


def train_from_sources(
    ham: Iterable[str] = (),
    spam: Iterable[str] = (),
    index: str | Sequence[str] | None = None,
    split: str | None = None,
    name: str = "model",
    max_bytes: int = DEFAULT_MAX_BYTES,
    options: TrainingOptions | None = None,
) -> Model:
    """Train on labelled sources. `options.source_weights` is keyed by source name: an
    index's folder name (e.g. "modern" for .../modern/index.csv) or a --ham/--spam spec."""
    options = options or TrainingOptions()
    ham, spam = list(ham), list(spam)
    hams: list[ParsedMessage] = []
    spams: list[ParsedMessage] = []
    ham_sources: list[str] = []
    spam_sources: list[str] = []
    for source, item in _sourced_items(ham, spam, index, split):
        is_spam = item.label == "spam"
        (spams if is_spam else hams).append(parse_message(item.raw, max_bytes))
        (spam_sources if is_spam else ham_sources).append(source)
    if not hams or not spams:
        raise SourceError(f"training needs ham and spam messages (found {len(hams)} ham, {len(spams)} spam)")
    unknown = set(options.source_weights) - set(ham_sources) - set(spam_sources)
    if unknown:
        raise SourceError(f"--weight names {', '.join(sorted(unknown))}, which is not a training source "
                          f"(sources: {', '.join(sorted(set(ham_sources + spam_sources)))})")
    model = train_model(hams, spams, options, name=name, ham_sources=ham_sources, spam_sources=spam_sources)
    model.meta["sources"] = {"index": index, "split": split, "ham": ham, "spam": spam}
    return model


def roc_auc(spam_scores: list[float], ham_scores: list[float]) -> float:
    """Probability that a random spam scores above a random ham (ties count half)."""
    if not spam_scores or not ham_scores:
        return float("nan")
    pairs = sorted([(s, 1) for s in spam_scores] + [(s, 0) for s in ham_scores])
    rank_sum = 0.0
    i = 0
    while i < len(pairs):
        j = i
        while j + 1 < len(pairs) and pairs[j + 1][0] == pairs[i][0]:
            j += 1
        average_rank = (i + j) / 2 + 1
        rank_sum += average_rank * sum(1 for k in range(i, j + 1) if pairs[k][1])
        i = j + 1
    n_spam, n_ham = len(spam_scores), len(ham_scores)
    return (rank_sum - n_spam * (n_spam + 1) / 2) / (n_spam * n_ham)


@dataclass
class EvalReport:
    n: int
    n_ham: int
    n_spam: int
    spam_recall: float
    ham_fpr: float
    auc: float
    unsure_rate: float
    msgs_per_s: float
    spam_cutoff: float
    ham_cutoff: float
    model_version: str
    counts: dict

    def as_dict(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def evaluate(model: Model, items: Iterable[MailItem], cutoffs: Cutoffs, max_bytes: int = DEFAULT_MAX_BYTES) -> EvalReport:
    """Score every labelled message; the speed counts parse + score only (bytes already read)."""
    batch = [(item.label, item.raw) for item in items]
    if not batch:
        raise SourceError("no labelled messages to evaluate")
    scores: list[tuple[str | None, float]] = []
    started = time.perf_counter()
    for label, raw in batch:
        scores.append((label, model.score(parse_message(raw, max_bytes)).score))
    elapsed = time.perf_counter() - started
    spam_scores = [s for label, s in scores if label == "spam"]
    ham_scores = [s for label, s in scores if label == "ham"]
    counts = {f"{truth}_as_{kind}": 0 for truth in ("ham", "spam") for kind in (HAM, UNSURE, SPAM)}
    for label, s in scores:
        counts[f"{label}_as_{label_for(s, cutoffs)}"] += 1
    n = len(scores)
    return EvalReport(
        n=n,
        n_ham=len(ham_scores),
        n_spam=len(spam_scores),
        spam_recall=counts["spam_as_spam"] / len(spam_scores) if spam_scores else float("nan"),
        ham_fpr=counts["ham_as_spam"] / len(ham_scores) if ham_scores else float("nan"),
        auc=roc_auc(spam_scores, ham_scores),
        unsure_rate=(counts["ham_as_unsure"] + counts["spam_as_unsure"]) / n,
        msgs_per_s=n / elapsed if elapsed > 0 else float("inf"),
        spam_cutoff=cutoffs.spam,
        ham_cutoff=cutoffs.ham,
        model_version=model.version,
        counts=counts,
    )
