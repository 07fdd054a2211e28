"""The cross-corpus matrix and the online benchmark loop (atlas_milter.evaluate) on small
synthetic corpora written here, and scripts/cross_eval.py / scripts/online_bench.py as a
user runs them: on the shared corpus (spamassassin and modern only: cheap, and never
trec07p, which CI may not hold), and with a missing corpus (one `Error:` line)."""

from __future__ import annotations

import csv
import json
import math
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from atlas_milter.classifier import load_model
from atlas_milter.training import TrainingOptions
from atlas_milter.errors import SourceError
from atlas_milter.evaluate import (
    AtlasLearner,
    MatrixRow,
    cross_corpus_matrix,
    empty_model,
    evaluate,
    labelled_items,
    online_run,
    parse_rows,
    read_corpus,
    summarise,
)
from atlas_milter.message import parse_message
from atlas_milter.policy import Cutoffs

REPO = Path(__file__).resolve().parents[1]
FAST = TrainingOptions(epochs=4, min_count=1, bags=1)

# Two synthetic "corpora" with different vocabularies: what one teaches transfers partly.
HAM_A = ["Subject: Re: patch {i}\n\nThe patch {i} fixes the build; tests pass on my board, thanks for the review.\n",
         "Subject: meeting {i}\n\nNotes from meeting {i}: we release on Friday after the review of the branch.\n"]
SPAM_A = ["Subject: FREE cash {i}!!!\nContent-Type: text/html\n\n<p>Click here to claim your free cash prize {i} now!</p>\n",
          "Subject: cheap pills {i}\n\nOrder cheap pills now, lowest prices, offer {i}, click here to claim.\n"]
HAM_B = ["Subject: your order {i} has shipped\n\nYour order {i} has shipped and will arrive on Tuesday. Track the parcel in your account.\n",
         "Subject: Delivery Status Notification {i}\n\nThis is the mail system. Your message {i} could not be delivered to the recipient.\n"]
SPAM_B = ["Subject: account suspended {i}\n\nVerify your account {i} now or it will be suspended, click here to claim access.\n",
          "Subject: you won {i}\n\nYou won a free prize {i}! Claim it now, click here, limited offer.\n"]


def write_corpus(root: Path, name: str, ham: list[str], spam: list[str], n: int) -> Path:
    """n messages per template and label, listed in the order of their number (so both labels
    come early); every fourth is test. Groups: one per template."""
    folder = root / name
    folder.mkdir(parents=True)
    rows = []
    for label, templates in (("ham", ham), ("spam", spam)):
        for t, template in enumerate(templates):
            for i in range(n):
                path = f"{label}{t}-{i}.eml"
                (folder / path).write_text(template.format(i=i))
                rows.append({"path": path, "label": label, "group": f"{name}-{label}{t}",
                             "split": "test" if i % 4 == 0 else "train", "bytes": 0})
    rows.sort(key=lambda r: (int(r["path"].split("-")[1].split(".")[0]), r["path"]))  # labels interleaved
    with open(folder / "index.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "label", "group", "split", "bytes"])
        writer.writeheader()
        writer.writerows(rows)
    return folder


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpora")
    write_corpus(root, "a", HAM_A, SPAM_A, 12)
    write_corpus(root, "b", HAM_B, SPAM_B, 12)
    return root, {name: read_corpus(root / name) for name in ("a", "b")}


def test_read_corpus_keeps_splits_labels_and_groups(corpora):
    _, loaded = corpora
    a = loaded["a"]
    assert (len(a.train), len(a.test)) == (36, 12)
    assert {m.group for m in a.test} == {"a-ham0", "a-ham1", "a-spam0", "a-spam1"}
    assert len(a.test_features) == len(a.test)


def test_read_corpus_without_index_is_a_source_error(tmp_path):
    with pytest.raises(SourceError, match="no index.csv"):
        read_corpus(tmp_path / "absent")


def test_parse_rows():
    rows = parse_rows(["a+b:a", "shipped:b", "b", "model=m.json:a+b"], ["a", "b"])
    assert rows == [MatrixRow(("a", "b"), ("a",)), MatrixRow((), ("b",), ""), MatrixRow(("b",), ("a", "b")),
                    MatrixRow((), ("a", "b"), "m.json")]
    assert [r.name for r in rows] == ["a+b", "shipped", "b", "model m.json"]
    assert [r.name for r in parse_rows(["all"], ["a", "b"])] == ["a", "b", "a+b", "shipped"]
    with pytest.raises(SourceError, match="unknown corpus 'c'"):
        parse_rows(["a:c"], ["a", "b"])
    weighted = parse_rows(["a+b*5:a"], ["a", "b"])
    assert weighted == [MatrixRow(("a", "b"), ("a",), weights=(("b", 5.0),))] and weighted[0].name == "a+b*5"
    with pytest.raises(SourceError, match="is not CORPUS"):
        parse_rows(["a+b*x"], ["a", "b"])


def test_summarise_counts_at_the_cutoffs():
    q = summarise([("spam", 0.95), ("spam", 0.5), ("spam", 0.05), ("ham", 0.92), ("ham", 0.01), ("ham", 0.02)],
                  Cutoffs(spam=0.9, ham=0.1))
    assert (q["n"], q["n_ham"], q["n_spam"]) == (6, 3, 3)
    assert q["spam_recall"] == pytest.approx(1 / 3) and q["ham_fpr"] == pytest.approx(1 / 3)
    assert q["unsure_rate"] == pytest.approx(1 / 6)
    assert q["auc"] == pytest.approx(7 / 9)  # spam 0.95 beats all three ham, 0.5 and 0.05 two each


@pytest.mark.parametrize("jobs", [1, 2])
def test_matrix_trains_each_row_once_and_scores_every_test_set(corpora, jobs):
    _, loaded = corpora
    rows = parse_rows(["a", "a+b", "shipped:b"], ["a", "b"])
    cells = cross_corpus_matrix(loaded, rows, jobs=jobs, options=FAST, calibration_folds=2)
    assert [(c.row, c.test) for c in cells] == [
        ("a", "a"), ("a", "b"), ("a", "all"), ("a+b", "a"), ("a+b", "b"), ("a+b", "all"), ("shipped", "b")]
    by = {(c.row, c.test): c for c in cells}
    assert by["a", "a"].n_train == 36 and by["a+b", "b"].n_train == 72
    assert by["a", "a"].model_version == by["a", "b"].model_version  # one model per row
    assert by["a", "a"].quality["auc"] == 1.0
    assert by["a+b", "b"].quality["auc"] >= by["a", "b"].quality["auc"]  # in-domain training helps
    all_cell = by["a", "all"]
    assert all_cell.quality["n"] == 24 and set(all_cell.groups) == {"a-ham0", "a-ham1", "a-spam0", "a-spam1",
                                                                      "b-ham0", "b-ham1", "b-spam0", "b-spam1"}
    for group, q in by["a", "b"].groups.items():
        assert q["n"] == 3
        assert math.isnan(q["ham_fpr"]) if "spam" in group else math.isnan(q["spam_recall"])
    json.dumps([c.as_dict() for c in cells], allow_nan=False)  # NaN becomes null


def test_matrix_scores_equal_the_product_scores(corpora):
    """The matrix scores cached features; they must be what Model.score gives, cell for cell."""
    root, loaded = corpora
    model = load_model()
    cell = cross_corpus_matrix(loaded, parse_rows(["shipped:b"], ["a", "b"]))[0]
    report = evaluate(model, labelled_items(index=str(root / "b" / "index.csv"), split="test"),
                      Cutoffs(model.spam_cutoff, model.ham_cutoff))
    assert cell.quality["counts"] == report.counts
    assert cell.quality["auc"] == pytest.approx(report.auc)


def test_online_run_figures_and_convergence():
    stream = []
    for i in range(60):
        label, template = ("spam", SPAM_A[i % 2]) if i % 3 else ("ham", HAM_A[i % 2])
        raw = template.format(i=i).encode()
        stream.append((label, raw, parse_message(raw)))
    learner = AtlasLearner(empty_model())
    immediate = online_run(learner, stream, windows=3)
    assert immediate["taught"] == 60 and immediate["learner"] == "atlas"
    assert len(immediate["one_minus_auc_pct_windows"]) == 3
    assert immediate["one_minus_auc_pct_second_half"] == 0.0  # separable: learnt within the first half
    assert immediate["spam_recall_second_half"] == 1.0 and immediate["ham_fpr_second_half"] == 0.0
    assert immediate["learn_ms"] > 0 and immediate["classify_ms"] > 0
    delayed = online_run(AtlasLearner(empty_model()), stream, teach_first=0)
    assert delayed["taught"] == 0 and delayed["one_minus_auc_pct"] == 50.0  # never taught: every score ties


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120, cwd=REPO)


def test_scripts_give_one_error_line_for_a_missing_corpus(tmp_path):
    proc = run_script("scripts/cross_eval.py", "--corpus-root", str(tmp_path), "--rows", "shipped")
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith("Error: corpus")
    assert "Traceback" not in proc.stderr
    proc = run_script("scripts/online_bench.py", "--corpus", str(tmp_path), "--learners", "atlas-empty")
    assert proc.returncode == 1 and proc.stderr.strip() == f"Error: corpus {tmp_path}: no index.csv there (give --corpus)"


def test_online_bench_script_on_a_synthetic_corpus(tmp_path):
    folder = write_corpus(tmp_path, "a", HAM_A, SPAM_A, 10)
    proc = run_script("scripts/online_bench.py", "--corpus", str(folder), "--learners", "atlas-empty,atlas-shipped",
                      "--delay", "10", "--json", "--jobs", "1")
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)["results"]
    assert [(r["learner"], r["feedback"], r["taught"]) for r in results] == [
        ("atlas-empty", "immediate", 40), ("atlas-empty", "first 10", 10),
        ("atlas-shipped", "immediate", 40), ("atlas-shipped", "first 10", 10)]


def test_cross_eval_shipped_model_on_the_shared_corpus(corpus_dir):
    """The script's shipped-model row on spamassassin and modern agrees with `evaluate`."""
    proc = run_script("scripts/cross_eval.py", "--corpus-root", str(corpus_dir.parent), "--corpora",
                      "spamassassin,modern", "--rows", "shipped", "--json")
    assert proc.returncode == 0, proc.stderr
    cells = {c["test"]: c for c in json.loads(proc.stdout)["cells"]}
    assert set(cells) == {"spamassassin", "modern", "all"}
    model = load_model()
    for name in ("spamassassin", "modern"):
        report = evaluate(model, labelled_items(index=str(corpus_dir.parent / name / "index.csv"), split="test"),
                          Cutoffs(model.spam_cutoff, model.ham_cutoff))
        assert cells[name]["quality"]["n"] == report.n
        assert cells[name]["quality"]["counts"] == report.counts
    assert {"bounces", "foff-ham", "foff-spam"} == set(cells["modern"]["groups"])
    assert cells["all"]["quality"]["n"] == cells["spamassassin"]["quality"]["n"] + cells["modern"]["quality"]["n"]


def test_strip_verdict_headers_keeps_everything_else():
    from scripts.online_bench import strip_verdict_headers

    raw = (b"From: a@b.example\r\nX-Spam-Status: No, score=-2.6\r\n\ttests=BAYES_00\r\nSubject: hi\r\n"
           b"X-Spam-Level: \r\n\r\nX-Spam-Status: this line is body text\r\n")
    assert strip_verdict_headers(raw) == (b"From: a@b.example\nSubject: hi\n\n"
                                          b"X-Spam-Status: this line is body text\r\n")
    assert strip_verdict_headers(b"Subject: x\n\nbody\n") == b"Subject: x\n\nbody\n"


def test_online_bench_runs_bogofilter_as_the_yardstick(tmp_path):
    from tests.support.requirements import require_binary

    require_binary("bogofilter")
    folder = write_corpus(tmp_path, "a", HAM_A, SPAM_A, 10)
    proc = run_script("scripts/online_bench.py", "--corpus", str(folder), "--learners", "bogofilter",
                      "--feedback", "immediate", "--json")
    assert proc.returncode == 0, proc.stderr
    (result,) = json.loads(proc.stdout)["results"]
    assert result["learner"] == "bogofilter" and result["taught"] == 40
    assert result["one_minus_auc_pct_second_half"] < 5  # it learnt the two vocabularies


def test_eval_speed_times_every_side_on_the_same_test_split(tmp_path):
    """bogofilter, the compiled and the pure-Python classifier, and a --before checkout
    (this one again, as a stand-in), in the same rounds."""
    from tests.support.requirements import require_binary

    require_binary("bogofilter")
    folder = write_corpus(tmp_path, "a", HAM_A, SPAM_A, 10)
    proc = run_script("scripts/eval_speed.py", "--index", str(folder / "index.csv"), "--rounds", "2", "--json",
                      "--before", str(REPO))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["messages"] == 12  # every fourth of 2 templates x 2 labels x 10
    assert len(result["bogofilter_msgs_per_s"]) == 2 and all(v > 0 for v in result["bogofilter_msgs_per_s"])
    for side in ("compiled", "pure", "before"):
        assert len(result[side]["msgs_per_s"]) == 2 and all(v > 0 for v in result[side]["msgs_per_s"])
        # With two rounds the ratio of the medians is a mediant of the two rounds' ratios: between them.
        low, high = result[side]["ratio_range"]
        assert low - 0.001 <= result[side]["ratio_of_medians"] <= high + 0.001


def test_maildir_backfill_bench_times_plain_and_optimised_backfills(tmp_path):
    """Every side backfills every message of the Maildir it builds, in every round."""
    folder = write_corpus(tmp_path, "a", HAM_A, SPAM_A, 6)
    proc = run_script("scripts/maildir_backfill_bench.py", "--corpus", str(folder), "--workdir", str(tmp_path / "w"),
                      "--rounds", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["messages"] == 24 and len(os.listdir(tmp_path / "w" / "distinct" / "cur")) == 24
    assert {side: len(v) for side, v in result["seconds"].items()} == {"plain": 2, "optimised": 2, "optimised-pure": 2}
    for side in ("plain", "optimised", "optimised-pure"):
        db = sqlite3.connect(tmp_path / "w" / f"distinct-{side}.db")
        assert db.execute("SELECT count(*) FROM processed_emails WHERE action = 'dry-run'").fetchone()[0] == 24
        db.close()
    assert len(result["optimised"]["speedup_per_round"]) == 2


def test_maildir_backfill_bench_gives_one_error_line_without_a_corpus(tmp_path):
    proc = run_script("scripts/maildir_backfill_bench.py", "--corpus", str(tmp_path), "--workdir", str(tmp_path / "w"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"Error: no corpus at {tmp_path}: --corpus names the folder holding index.csv"


def test_eval_speed_refuses_a_before_tree_without_the_package(tmp_path):
    proc = run_script("scripts/eval_speed.py", "--before", str(tmp_path))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"Error: --before {tmp_path} holds no atlas_milter package"


def test_eval_speed_gives_one_error_line_for_a_missing_index(tmp_path):
    proc = run_script("scripts/eval_speed.py", "--index", str(tmp_path / "index.csv"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"Error: no index at {tmp_path / 'index.csv'} (give --index CSV)"
