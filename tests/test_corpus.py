"""The shipped model on the shared corpus: the quality bars, and every message survives.

Reads ../shared/corpus/spamassassin (skips clearly when absent). Speed is not asserted
here: `atlas-milter eval` reports it and `atlas-milter bench` measures it."""

from atlas_milter.classifier import load_model
from atlas_milter.evaluate import evaluate, labelled_items
from atlas_milter.message import parse_message
from atlas_milter.policy import Cutoffs


def test_shipped_model_meets_the_bars_on_the_test_split(corpus_dir):
    model = load_model()
    report = evaluate(
        model,
        labelled_items(index=str(corpus_dir / "index.csv"), split="test"),
        Cutoffs(model.spam_cutoff, model.ham_cutoff),
    )
    assert report.n == 1549
    assert report.auc >= 0.999
    assert report.ham_fpr <= 0.003
    assert report.spam_recall >= 0.97
    assert report.unsure_rate <= 0.03


def test_every_corpus_message_gets_a_verdict(corpus_dir, corpus_index):
    model = load_model()
    scored = 0
    for row in corpus_index:
        score = model.score(parse_message((corpus_dir / row["path"]).read_bytes())).score
        assert 0.0 <= score <= 1.0
        scored += 1
    assert scored == 6046
