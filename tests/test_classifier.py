"""The model: features, scores with reasons, training, learning and the model file format."""

import gzip
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from atlas_milter import classifier
from atlas_milter.classifier import (
    Model,
    features,
    learn,
    load_model,
    save_model,
)
from atlas_milter.training import TrainingOptions, choose_cutoffs, train_model
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


def meta_of(raw: str) -> set[str]:
    return features(parse_message(raw.encode()))[1]


def test_the_sending_software_is_not_a_feature():
    """Spam software forges the popular clients' headers: X-Mailer and friends would only
    say which year a corpus was collected in."""
    meta = meta_of("X-Mailer: Microsoft Outlook Express 6.00\nX-MimeOLE: Produced By Microsoft\n"
                   "User-Agent: Mutt/1.4\nX-Priority: 3\nSubject: hi\n\nhello there\n")
    assert not [f for f in meta if f.startswith(("hdr:", "mailer:"))]


def test_a_delivery_report_and_its_sender_are_recognised():
    report = ("From: Mail Delivery System <MAILER-DAEMON@mx.example.org>\nSubject: Undelivered Mail\n"
              "Content-Type: multipart/report; report-type=delivery-status; boundary=b\n\n"
              "--b\nContent-Type: text/plain\n\nThe mail could not be delivered.\n"
              "--b\nContent-Type: message/delivery-status\n\nStatus: 5.1.1\n--b--\n")
    meta = meta_of(report)
    assert {"sig:delivery-report", "sig:from-mailer-daemon"} <= meta
    assert not {"sig:delivery-report", "sig:from-mailer-daemon"} & meta_of("From: a@mx.example.org\nSubject: x\n\nhi\n")


def test_one_click_unsubscribe_needs_both_headers():
    both = "List-Unsubscribe: <https://news.example.com/u>\nList-Unsubscribe-Post: List-Unsubscribe=One-Click\n"
    assert "sig:one-click-unsubscribe" in meta_of(both + "Subject: news\n\nhello\n")
    assert "sig:one-click-unsubscribe" not in meta_of("List-Unsubscribe: <mailto:u@lists.example.com>\nSubject: news\n\nhello\n")


@pytest.mark.parametrize("signer, expected", [
    ("mail.shop.example.com", "dkim:from-domain"),
    ("bulk-sender.example.net", "dkim:other-domain"),
])
def test_a_dkim_signature_is_compared_with_the_from_domain(signer, expected):
    meta = meta_of(f"From: Shop <orders@shop.example.com>\nDKIM-Signature: v=1; a=rsa-sha256;\n d={signer}; s=s1; b=abc\n"
                   "Subject: your order\n\nthanks\n")
    assert expected in meta and not ({"dkim:from-domain", "dkim:other-domain"} - {expected}) & meta


def test_hidden_characters_and_look_alike_letters():
    assert "sig:invisible-characters" in meta_of("Subject: offer\n\nfr\u200bee mon\u200bey\n")
    assert "sig:mixed-script-word" in meta_of("Subject: P\u0430yPal account\n\nverify now\n")
    plain = meta_of("Subject: \u041f\u0440\u0438\u0432\u0435\u0442 hello\n\n\u0434\u0440\u0443\u0433 friend caf\u00e9\n")
    assert not {"sig:invisible-characters", "sig:mixed-script-word"} & plain


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab \n") + list(classifier._INVISIBLE) + ["\u200e", "é", "中"]), max_size=40),
       st.integers(min_value=0, max_value=45))
def test_invisible_characters_are_found_as_the_character_class_finds_them(text, end):
    import re

    expected = re.compile("[" + classifier._INVISIBLE + "]").search(text, 0, end) is not None
    assert classifier._has_invisible(text, end) is expected


def test_links_shorteners_and_a_display_name_naming_another_domain():
    meta = meta_of("From: \"support@bank.example.com\" <x@mailer.example.net>\nSubject: s\n\nsee https://bit.ly/abc\n")
    assert {"sig:url-shortener", "sig:links-elsewhere", "sig:from-name-other-domain"} <= meta
    own = meta_of("From: Shop <orders@shop.example.com>\nSubject: s\n\nsee https://www.shop.example.com/o/1\n")
    assert "sig:links-to-sender" in own and not {"sig:url-shortener", "sig:links-elsewhere", "sig:from-name-other-domain"} & own


def test_the_spam_cutoff_holds_on_all_ham_and_on_every_source_of_ham():
    """Pooled, 1 false positive in 1,000 ham is within 0.3%; but it is 1 in 10 of the small
    source's ham, over the 1% a source may have, so the cutoff must rise above it."""
    probs = [0.1] * 990 + [0.2] * 9 + [0.8] + [0.99] * 50
    labels = [0] * 1000 + [1] * 50
    assert choose_cutoffs(probs, labels, 0.003)[0] == 0.5
    sources = ["big"] * 990 + ["small"] * 10 + ["big"] * 50
    assert choose_cutoffs(probs, labels, 0.003, sources)[0] == 0.81
    assert choose_cutoffs(probs, labels, 0.003, sources, source_ham_fpr=0.1)[0] == 0.5
    # and the pooled target still holds: 4 false positives in 1,000 ham are over 0.3%
    probs[:4] = [0.7] * 4
    assert choose_cutoffs(probs, labels, 0.003, sources)[0] == 0.81
    assert choose_cutoffs(probs[:990] + [0.2] * 10 + probs[1000:], labels, 0.003)[0] == 0.71


def test_a_source_weight_makes_its_messages_count_more():
    """Two near-identical messages, one ham and one spam: the one whose source is weighted
    pulls the model to its side."""
    ham = parsed(HAM * 2 + [b"Subject: note\n\nzanzibar quarterly report attached\n"])
    spam = parsed(SPAM * 2 + [b"Subject: note\n\nzanzibar quarterly report inside\n"])
    sources = {"ham_sources": ["old"] * (len(ham) - 1) + ["new"], "spam_sources": ["old"] * (len(spam) - 1) + ["new2"]}
    probe = parse_message(b"Subject: note\n\nzanzibar quarterly report\n")

    def probe_score(weights):
        opts = TrainingOptions(epochs=8, min_count=1, bags=1, source_weights=weights)
        return train_model(ham, spam, opts, calibration_folds=0, **sources).score(probe).score

    assert probe_score({"new": 20}) < probe_score({}) < probe_score({"new2": 20})
    with pytest.raises(ModelError, match="one source name per training message"):
        train_model(ham, spam, ham_sources=["x"])


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


@given(st.text(alphabet="ABZab1_. \u00e9\u0410!", max_size=40))
@settings(max_examples=300, deadline=None)
def test_shouted_words_are_what_the_plain_pattern_finds(text):
    import re

    from atlas_milter.classifier import _CAPS_WORD_RE

    assert _CAPS_WORD_RE.findall(text) == re.findall(r"\b[A-Z]{2,}\b", text)


def test_body_style_signals():
    words = " ".join(["word"] * 30)
    assert {"sig:body-shouts", "sig:body-exclaims", "sig:body-money", "sig:body-percentages"} <= meta_of(
        f"Subject: s\n\nBUY NOW CHEAP PILLS {words} BEST DEAL EVER FREE SHIPPING TODAY ONLY HURRY LIMITED "
        "STOCK NEW PRICE SALE WOW!!! only $9 or $19, 50% off, 70% less, 90% more\n")
    assert not [f for f in meta_of(f"Subject: s\n\nA calm note. {words}. Thanks!\n") if f.startswith("sig:body-")]


def test_a_learned_model_scores_the_same_after_a_save(tmp_path, tiny_model):
    """The IMAP listener keeps using the model it learned in memory; a restart loads the file."""
    import copy

    model = copy.deepcopy(tiny_model)
    save_model(model, tmp_path / "m.json")
    model = load_model(tmp_path / "m.json")
    msg = parse_message(b"Subject: quarterly partner update\n\nPlease see the quarterly update from our partners.\n")
    learn(model, msg, True)
    save_model(model, tmp_path / "m.json")
    assert load_model(tmp_path / "m.json").score(msg).score == model.score(msg).score
