"""The model: features, scores with reasons, training, learning and the model file format."""

import gzip
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from atlas_milter.classifier import (
    Model,
    TrainingOptions,
    features,
    learn,
    load_model,
    save_model,
    train_model,
)
from atlas_milter.errors import ModelError
from atlas_milter.message import parse_message

HAM = [
    b"Subject: Re: build failure on arm\n\nThe patch fixes the linker error, tests pass on my board. Thanks for the review.\n",
    b"Subject: meeting notes\n\nNotes from today's meeting: we agreed to release on Friday after the review.\n",
    b"Subject: Re: patch review\n\nI reviewed the patch; the tests pass and the code is fine. Merge it please.\n",
    b"Subject: lunch on friday?\n\nAre you free for lunch on Friday? The new place near the office looks good.\n",
]
SPAM = [
    b"Subject: FREE money!!!\nContent-Type: text/html\n\n<p>Click here to claim your FREE cash prize now! <a href='http://198.51.100.7/x'>CLAIM</a></p>\n",
    b"Subject: Cheap meds, no prescription!\nContent-Type: text/html\n\n<p>Order cheap pills now, lowest prices, click here!</p>\n",
    b"Subject: You WON $1,000,000!\n\nClaim your prize now, send your bank details to claim the money. Click here.\n",
    b"Subject: Make money fast!!!\nContent-Type: text/html\n\n<p>Earn cash from home, free offer, click here now!</p>\n",
]


def parsed(raws):
    return [parse_message(r) for r in raws]


@pytest.fixture(scope="module")
def tiny_model():
    return train_model(parsed(HAM * 3), parsed(SPAM * 3), TrainingOptions(epochs=8, min_count=1, bags=1), name="tiny", calibration_folds=2)


def test_features_cover_body_subject_sender_urls_and_structure():
    body, meta = features(parse_message(SPAM[0]))
    assert "claim" in body and "s:free" in body
    assert "sig:html-only" in meta and "sig:url-numeric-host" in meta and "sig:subject-exclaims" in meta


def test_features_do_not_depend_on_the_process_hash_seed():
    """More URL hosts than are used: the ones kept must not depend on set order, which
    changes with PYTHONHASHSEED (a message scored differently after a restart)."""
    import subprocess
    import sys

    links = " ".join(f"http://www.site{i}.example/p" for i in range(80))
    raw = f"Subject: links\n\n{links}\n"
    code = (
        "import sys; from atlas_milter.message import parse_message; from atlas_milter.classifier import features; "
        "print(sorted(features(parse_message(sys.stdin.buffer.read()))[1]))"
    )
    outs = {
        subprocess.run([sys.executable, "-c", code], input=raw.encode(), capture_output=True, check=True,
                       env={**__import__("os").environ, "PYTHONHASHSEED": seed}).stdout
        for seed in ("1", "2", "3")
    }
    assert len(outs) == 1
    assert outs.pop().count(b"url:") == 50


def test_list_and_relay_headers_are_not_features():
    raw = b"Received: from relay.lists.example\nList-Id: <dev.lists.example>\nIn-Reply-To: <a@b>\nX-Spam-Status: Yes\nSubject: hi\n\nhello\n"
    body, meta = features(parse_message(raw))
    everything = " ".join(body | meta)
    assert "lists" not in everything and "relay" not in everything and "x-spam" not in everything


def test_scores_separate_and_reasons_point_the_right_way(tiny_model):
    spam = tiny_model.score(parse_message(b"Subject: FREE cash prize!!!\nContent-Type: text/html\n\n<p>Click here to claim now!</p>"))
    ham = tiny_model.score(parse_message(b"Subject: Re: patch review\n\nThe tests pass on my board, thanks for the review.\n"))
    assert 0.0 <= ham.score < spam.score <= 1.0
    assert spam.reasons and all(w > 0 for _, w in spam.reasons)
    assert ham.reasons and all(w < 0 for _, w in ham.reasons)
    assert spam.model_version.startswith("tiny-")


def test_cutoffs_are_ordered_and_calibration_recorded(tiny_model):
    assert 0.0 <= tiny_model.ham_cutoff <= tiny_model.spam_cutoff <= 1.0
    assert tiny_model.meta["calibration"]["out_of_fold"]


def test_training_needs_both_classes():
    with pytest.raises(ModelError):
        train_model(parsed(HAM), [], TrainingOptions(bags=1), calibration_folds=0)


def test_save_and_load_round_trip(tmp_path, tiny_model):
    for name in ("m.json", "m.json.gz"):
        save_model(tiny_model, tmp_path / name)
        again = load_model(tmp_path / name)
        assert again.version == tiny_model.version
        msg = parse_message(SPAM[1])
        assert abs(again.score(msg).score - tiny_model.score(msg).score) < 1e-3


def test_model_file_is_data_only(tmp_path):
    bad = tmp_path / "evil.json"
    bad.write_bytes(b"\x80\x04cos\nsystem\n(S'touch /tmp/pwned'\ntR.")  # a pickle payload
    with pytest.raises(ModelError, match="not an atlas-milter model"):
        load_model(bad)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"format": "atlas-milter-model", "format_version": 99, "weights": {}}))
    with pytest.raises(ModelError, match="format version"):
        load_model(wrong)
    garbage = tmp_path / "garbage.json.gz"
    garbage.write_bytes(gzip.compress(b"{not json"))
    with pytest.raises(ModelError):
        load_model(garbage)
    with pytest.raises(ModelError, match="no such file"):
        load_model(tmp_path / "absent.json")


def test_learning_moves_the_score_toward_the_label(tiny_model):
    model = Model(dict(tiny_model.weights), tiny_model.bias, tiny_model.spam_cutoff, tiny_model.ham_cutoff,
                  tiny_model.temperature, dict(tiny_model.meta))
    sneaky = parse_message(b"Subject: quarterly update\n\nPlease review the quarterly update from our partners.\n")
    before = model.score(sneaky).score
    after = learn(model, sneaky, is_spam=True)
    assert after > before and after >= model.spam_cutoff
    assert model.version != tiny_model.version
    after_ham = learn(model, sneaky, is_spam=False)
    assert after_ham < after
    learnt = model.version
    assert learn(model, sneaky, is_spam=False) == after_ham  # already past the ham cutoff: nothing to change
    assert model.version == learnt and model.meta["learned"] == 3


def test_shipped_model_loads_and_scores():
    model = load_model()
    assert model.version.startswith("default-")
    assert model.score(parse_message(SPAM[0])).score > model.score(parse_message(HAM[0])).score


# Letters and digits (ASCII and not), the marks words may contain, separators, long runs.
_WORDISH = st.sampled_from(list("ab9Z_ -.'$€£\n\tüß١Жé") + ["x" * 24, "y" * 30])


@settings(max_examples=500, deadline=None)
@given(st.lists(_WORDISH, max_size=300).map("".join))
def test_words_finds_exactly_what_the_word_pattern_finds(text):
    from atlas_milter.classifier import WORD_SCAN_CHARS, _WORD_RE, _words

    lowered = text.lower()
    assert _words(lowered) == _WORD_RE.findall(lowered, 0, WORD_SCAN_CHARS)


def test_words_scan_stops_where_the_word_pattern_does():
    from atlas_milter.classifier import WORD_SCAN_CHARS, _WORD_RE, _words

    for text in ("word " * 20_000, "x" * 59_990 + " abc-def ghi", "ab" * 40_000):
        assert _words(text) == _WORD_RE.findall(text, 0, WORD_SCAN_CHARS)
