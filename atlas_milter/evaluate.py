"""Owns training and evaluating models from labelled mail sources: reading ham/spam
sources (or an index.csv with a split), the quality figures (ROC AUC, spam recall, ham
false-positive rate, unsure rate), the scoring speed of one process, and the cross-corpus
matrix (train on the train splits of some corpora, test on the test splits of others;
scripts/cross_eval.py prints it), and the online benchmark's loop (classify in arrival
order, then teach; scripts/online_bench.py).

It reads sources and calls the classifier; it writes no database, so `eval` measures the
classifier itself: parse + score, in one process, model loaded. Only the matrix starts
worker processes (forked, one trained model per row).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import multiprocessing
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol, Sequence

from atlas_milter.classifier import Model, features, learn, load_model
from atlas_milter.training import TrainingOptions, train_model
from atlas_milter.errors import SourceError
from atlas_milter.message import DEFAULT_MAX_BYTES, ParsedMessage, parse_message
from atlas_milter.policy import Cutoffs, label_for
from atlas_milter.sources import MailItem, index_rows, iter_source
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
    model.prepare()  # the compiled table is part of loading the model, as at a milter's start
    started = time.perf_counter()
    for label, raw in batch:
        scores.append((label, model.score(parse_message(raw, max_bytes, model.compiled)).score))
    elapsed = time.perf_counter() - started
    quality = summarise(scores, cutoffs)
    return EvalReport(
        n=quality["n"],
        n_ham=quality["n_ham"],
        n_spam=quality["n_spam"],
        spam_recall=quality["spam_recall"],
        ham_fpr=quality["ham_fpr"],
        auc=quality["auc"],
        unsure_rate=quality["unsure_rate"],
        msgs_per_s=len(scores) / elapsed if elapsed > 0 else float("inf"),
        spam_cutoff=cutoffs.spam,
        ham_cutoff=cutoffs.ham,
        model_version=model.version,
        counts=quality["counts"],
    )


# --- cross-corpus matrix ----------------------------------------------------------------
#
# Train on the `train` split of one set of corpora, test on the `test` split of others, so
# that a modelling choice is judged on mail unlike its training mail. Each corpus is a folder
# with an index.csv (`path,label,group,split,...`) like the shared corpus's.

@dataclass(frozen=True, slots=True)
class CorpusMessage:
    label: str  # "ham" / "spam"
    group: str  # the index's group column (the corpus name when it has none)
    msg: ParsedMessage


@dataclass
class Corpus:
    """One corpus read once: parsed train messages, test messages with their features."""

    name: str
    train: list[CorpusMessage]
    test: list[CorpusMessage]
    test_features: list = field(default_factory=list)  # features(msg) of each test message

    def __post_init__(self) -> None:
        if not self.test_features:
            self.test_features = [features(m.msg) for m in self.test]


def read_corpus(folder: str | Path, max_bytes: int = DEFAULT_MAX_BYTES,
                progress: Callable[[str], None] | None = None) -> Corpus:
    """Parse every train and test message listed in `folder`/index.csv (once)."""
    folder = Path(folder)
    index = folder / "index.csv"
    if not index.is_file():
        raise SourceError(f"corpus {folder}: no index.csv there (is --corpus-root right?)")
    splits: dict[str, list[CorpusMessage]] = {"train": [], "test": []}
    for row, label, file in index_rows(index, None, frozenset({"path", "label", "split"})):
        if row.get("split") not in splits:
            continue
        try:
            raw = file.read_bytes()
        except OSError as exc:
            raise SourceError(f"corpus {folder.name}: cannot read {row['path']}: {exc.strerror or exc}") from None
        group = (row.get("group") or "").strip() or folder.name
        splits[row["split"]].append(CorpusMessage(label, group, parse_message(raw, max_bytes)))
    corpus = Corpus(folder.name, splits["train"], splits["test"])
    if progress:
        progress(f"read {corpus.name}: {len(corpus.train)} train, {len(corpus.test)} test messages")
    return corpus


SHIPPED = "shipped"  # the train side of a row that scores the model shipped in the package


@dataclass(frozen=True)
class MatrixRow:
    """Train a model on the train splits of `train` (or load `model`: a path, "" for the
    shipped one), then score the test split of each corpus in `tests`."""

    train: tuple[str, ...] = ()
    tests: tuple[str, ...] = ()
    model: str | None = None
    weights: tuple[tuple[str, float], ...] = ()  # (corpus, how many times its messages count)

    @property
    def name(self) -> str:
        if self.model is not None:
            return SHIPPED if not self.model else f"model {self.model}"
        weight = dict(self.weights)
        return "+".join(f"{name}*{weight[name]:g}" if name in weight else name for name in self.train)


# spamassassin+modern*5 is how the shipped model is trained (README: "The model").
DEFAULT_ROWS = ("spamassassin", "modern", "trec07p", "spamassassin+modern", "spamassassin+modern*5",
                "spamassassin+trec07p", SHIPPED)


def parse_rows(specs: Sequence[str], corpora: Sequence[str]) -> list[MatrixRow]:
    """Rows from specs like `spamassassin+modern*5:trec07p+modern` (no `:TESTS` part: every
    corpus; `*N`: that corpus's messages count N times in training), `shipped[:TESTS]`, `model=PATH[:TESTS]`, `default` or `all` (every non-empty
    combination of the corpora, plus the shipped model)."""
    rows: list[MatrixRow] = []
    for spec in specs:
        if spec == "default":
            rows.extend(parse_rows(DEFAULT_ROWS, corpora))
            continue
        if spec == "all":
            combos = ["+".join(c) for k in range(1, len(corpora) + 1) for c in itertools.combinations(corpora, k)]
            rows.extend(parse_rows([*combos, SHIPPED], corpora))
            continue
        train_part, _, test_part = spec.rpartition(":") if ":" in spec else (spec, "", "")
        tests = tuple(test_part.split("+")) if test_part else tuple(corpora)
        if train_part == SHIPPED:
            row = MatrixRow(tests=tests, model="")
        elif train_part.startswith("model="):
            row = MatrixRow(tests=tests, model=train_part.removeprefix("model="))
        else:
            names, weights = [], []
            for part in train_part.split("+"):
                name, star, weight = part.partition("*")
                names.append(name)
                if star:
                    try:
                        weights.append((name, float(weight)))
                    except ValueError:
                        raise SourceError(f"row {spec!r}: {part!r} is not CORPUS*N") from None
            row = MatrixRow(train=tuple(names), tests=tests, weights=tuple(weights))
        for name in (*row.train, *row.tests):
            if name not in corpora:
                raise SourceError(f"row {spec!r}: unknown corpus {name!r} (have: {', '.join(corpora)})")
        if not row.tests or (row.model is None and not row.train):
            raise SourceError(f"row {spec!r}: use TRAIN[+TRAIN...][:TEST[+TEST...]], shipped or model=PATH")
        rows.append(row)
    return rows


def summarise(scored: Sequence[tuple[str, float]], cutoffs: Cutoffs) -> dict:
    """Quality of (label, score) pairs at the cutoffs: n, AUC, spam recall, ham FPR, unsure rate."""
    counts = {f"{truth}_as_{kind}": 0 for truth in ("ham", "spam") for kind in (HAM, UNSURE, SPAM)}
    for label, s in scored:
        counts[f"{label}_as_{label_for(s, cutoffs)}"] += 1
    spam_scores = [s for label, s in scored if label == "spam"]
    ham_scores = [s for label, s in scored if label == "ham"]
    n = len(scored)
    return {
        "n": n,
        "n_ham": len(ham_scores),
        "n_spam": len(spam_scores),
        "auc": roc_auc(spam_scores, ham_scores),
        "spam_recall": counts["spam_as_spam"] / len(spam_scores) if spam_scores else float("nan"),
        "ham_fpr": counts["ham_as_spam"] / len(ham_scores) if ham_scores else float("nan"),
        "unsure_rate": (counts["ham_as_unsure"] + counts["spam_as_unsure"]) / n if n else float("nan"),
        "counts": counts,
    }


@dataclass
class MatrixCell:
    """One (row, test set) of the matrix; `test` is a corpus name or "all" (every test set of the row)."""

    row: str
    test: str
    spam_cutoff: float
    ham_cutoff: float
    model_version: str
    train_seconds: float
    n_train: int
    quality: dict  # summarise() of the whole test set
    groups: dict[str, dict]  # group -> summarise() of that group's messages

    def as_dict(self) -> dict:
        def clean(v):
            if isinstance(v, float):
                return round(v, 6) if math.isfinite(v) else None
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            return v
        return clean(dict(self.__dict__))


# Read by the row workers: set before they are forked, so the parsed corpora are shared
# copy-on-write instead of being pickled to each process.
_MATRIX_INPUT: dict = {}


def _run_row(i: int) -> tuple[int, dict]:
    """Train (or load) row i's model and score every test message of its test corpora."""
    corpora: dict[str, Corpus] = _MATRIX_INPUT["corpora"]
    row: MatrixRow = _MATRIX_INPUT["rows"][i]
    started = time.perf_counter()
    if row.model is not None:
        model = load_model(row.model or None)
        n_train = sum(model.meta.get("trained_on", {}).values()) if isinstance(model.meta.get("trained_on"), dict) else 0
    else:
        msgs = [(name, m) for name in row.train for m in corpora[name].train]
        hams = [(name, m.msg) for name, m in msgs if m.label == "ham"]
        spams = [(name, m.msg) for name, m in msgs if m.label == "spam"]
        if not hams or not spams:
            raise SourceError(f"row {row.name}: training needs ham and spam ({len(hams)} ham, {len(spams)} spam)")
        options = dataclasses.replace(_MATRIX_INPUT["options"] or TrainingOptions(), source_weights=dict(row.weights))
        model = train_model([m for _, m in hams], [m for _, m in spams], options, name=row.name,
                            calibration_folds=_MATRIX_INPUT["calibration_folds"],
                            ham_sources=[name for name, _ in hams], spam_sources=[name for name, _ in spams])
        n_train = len(msgs)
    train_seconds = time.perf_counter() - started
    # model.probability(model.margin(f)) is exactly Model.score(msg).score, with the
    # test features computed once for every row.
    scores = {name: [model.probability(model.margin(f)) for f in corpora[name].test_features] for name in row.tests}
    return i, {
        "scores": scores,
        "cutoffs": (model.spam_cutoff, model.ham_cutoff),
        "version": model.version,
        "train_seconds": train_seconds,
        "n_train": n_train,
    }


def cross_corpus_matrix(
    corpora: dict[str, Corpus],
    rows: Sequence[MatrixRow],
    jobs: int = 1,
    options: TrainingOptions | None = None,
    calibration_folds: int = 4,
    progress: Callable[[str], None] | None = None,
) -> list[MatrixCell]:
    """Every row's model scored on each of its test sets, plus an "all" cell when a row has
    more than one. Rows train in `jobs` forked processes, biggest training set first; each
    model's own cutoffs (those train_model placed, or the file's) decide the verdicts."""
    say = progress or (lambda _msg: None)
    _MATRIX_INPUT.update(corpora=corpora, rows=list(rows), options=options, calibration_folds=calibration_folds)
    def cost(i: int) -> int:
        return sum(len(corpora[name].train) for name in rows[i].train)

    order = sorted(range(len(rows)), key=cost, reverse=True)
    results: dict[int, dict] = {}
    started = time.perf_counter()

    def done(i: int, result: dict) -> None:
        results[i] = result
        say(f"[{len(results)}/{len(rows)}] {rows[i].name}: {result['train_seconds']:.0f} s "
            f"({time.perf_counter() - started:.0f} s elapsed)")

    try:
        say(f"{len(rows)} rows in {max(1, min(jobs, len(rows)))} process(es): "
            + ", ".join(f"{rows[i].name} ({cost(i)} training messages)" for i in order))
        if jobs <= 1 or len(rows) <= 1:
            for i in order:
                done(*_run_row(i))
        else:
            with multiprocessing.get_context("fork").Pool(min(jobs, len(rows))) as pool:
                for i, result in pool.imap_unordered(_run_row, order):
                    done(i, result)
    finally:
        _MATRIX_INPUT.clear()

    cells: list[MatrixCell] = []
    for i, row in enumerate(rows):
        result = results[i]
        cutoffs = Cutoffs(*result["cutoffs"])
        tests = list(row.tests) + (["all"] if len(row.tests) > 1 else [])
        for test in tests:
            names = row.tests if test == "all" else (test,)
            scored = [(m, s) for name in names for m, s in zip(corpora[name].test, result["scores"][name])]
            by_group: dict[str, list[tuple[str, float]]] = {}
            for m, s in scored:
                by_group.setdefault(m.group, []).append((m.label, s))
            cells.append(MatrixCell(
                row=row.name, test=test, spam_cutoff=cutoffs.spam, ham_cutoff=cutoffs.ham,
                model_version=result["version"], train_seconds=result["train_seconds"], n_train=result["n_train"],
                quality=summarise([(m.label, s) for m, s in scored], cutoffs),
                groups={g: summarise(v, cutoffs) for g, v in sorted(by_group.items())},
            ))
    return cells


# --- online (TREC spam-track style) benchmark ---------------------------------------------
#
# Messages in arrival order: classify each, then teach its true label (immediate feedback),
# or teach only the first N (delayed feedback). scripts/online_bench.py runs it for the
# product's `learn()` and for bogofilter as the yardstick.

class OnlineLearner(Protocol):
    name: str

    def classify(self, raw: bytes, msg: ParsedMessage) -> tuple[float, str]:
        """(score in 0..1, verdict HAM / UNSURE / SPAM at the learner's own cutoffs)."""

    def learn(self, raw: bytes, msg: ParsedMessage, is_spam: bool) -> None: ...


class AtlasLearner:
    """The product's online path: `Model.score` to classify, `classifier.learn` to teach."""

    def __init__(self, model: Model, name: str = "atlas") -> None:
        self.model = model
        self.name = name

    def classify(self, raw: bytes, msg: ParsedMessage) -> tuple[float, str]:
        score = self.model.score(msg).score
        return score, label_for(score, Cutoffs(self.model.spam_cutoff, self.model.ham_cutoff))

    def learn(self, raw: bytes, msg: ParsedMessage, is_spam: bool) -> None:
        learn(self.model, msg, is_spam)


def empty_model() -> Model:
    """What "start from nothing" means for atlas: no weights, bias 0, temperature 1 and the
    Model class's default cutoffs (spam 0.9, ham 0.1)."""
    return Model(weights={}, meta={"name": "empty"})


def online_run(
    learner: OnlineLearner,
    stream: Sequence[tuple[str, bytes, ParsedMessage]],
    teach_first: int | None = None,
    windows: int = 5,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Classify each (label, raw, parsed) message in order, then teach its label: every one
    (`teach_first` None) or only the first `teach_first`. Figures: (1 - ROC AUC) in percent
    over all messages, over the second half and over `windows` equal slices in order (does it
    converge?); spam recall, ham FPR and unsure rate over the second half at the learner's
    cutoffs; and milliseconds per classify and per learn (wall clock, this process plus any
    child it waits for)."""
    results: list[tuple[str, float, str]] = []
    classify_s = learn_s = 0.0
    taught = 0
    for i, (label, raw, msg) in enumerate(stream):
        t0 = time.perf_counter()
        score, verdict = learner.classify(raw, msg)
        t1 = time.perf_counter()
        classify_s += t1 - t0
        results.append((label, score, verdict))
        if teach_first is None or i < teach_first:
            learner.learn(raw, msg, label == "spam")
            learn_s += time.perf_counter() - t1
            taught += 1
        if progress and (i + 1) % 2000 == 0:
            progress(f"{learner.name}: {i + 1}/{len(stream)}")

    def one_minus_auc(part: Sequence[tuple[str, float, str]]) -> float:
        auc = roc_auc([s for lab, s, _ in part if lab == "spam"], [s for lab, s, _ in part if lab == "ham"])
        return 100 * (1 - auc)

    n = len(results)
    second = results[n // 2:]
    counts = {(lab, v): 0 for lab in ("ham", "spam") for v in (HAM, UNSURE, SPAM)}
    for lab, _, verdict in second:
        counts[lab, verdict] += 1
    n_spam2 = sum(v for (lab, _), v in counts.items() if lab == "spam")
    n_ham2 = len(second) - n_spam2
    size = max(1, n // windows)
    return {
        "learner": learner.name,
        "feedback": "immediate" if teach_first is None else f"first {teach_first}",
        "n": n,
        "taught": taught,
        "one_minus_auc_pct": one_minus_auc(results),
        "one_minus_auc_pct_second_half": one_minus_auc(second),
        "one_minus_auc_pct_windows": [one_minus_auc(results[k:k + size]) for k in range(0, size * windows, size)],
        "spam_recall_second_half": counts["spam", SPAM] / n_spam2 if n_spam2 else float("nan"),
        "ham_fpr_second_half": counts["ham", SPAM] / n_ham2 if n_ham2 else float("nan"),
        "unsure_rate_second_half": (counts["ham", UNSURE] + counts["spam", UNSURE]) / len(second) if second else float("nan"),
        "classify_ms": 1000 * classify_s / n if n else float("nan"),
        "learn_ms": 1000 * learn_s / taught if taught else float("nan"),
    }
