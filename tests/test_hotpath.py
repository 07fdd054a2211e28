"""The compiled hot path (atlas_milter/_hotpath.c) against its references: the body block
against classifier.py (the same body features, style counts, reasons and score, to 1e-12:
the C sums the weights in order of appearance, Python in set order), the header split, URL
scan and HTML walk against message.py's code and regular expressions; on hypothesis-made
text and on every message of the spamassassin and modern corpora.

Where the extension is not built these tests skip, except under ATLAS_REQUIRE_COMPILED=1
(set by .ci/run), where they fail: CI must test the compiled path that users run."""

from __future__ import annotations

import dataclasses
import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from atlas_milter import classifier
from atlas_milter.classifier import (
    FUNCTION_WORDS,
    MAX_PAIRS,
    MAX_WORDS,
    TOP_REASONS,
    WORD_SCAN_CHARS,
    features,
    learn,
    load_model,
)
from atlas_milter.message import html_to_text, parse_message
from tests.support.corpus import load_corpus, read_index
from tests.support.markup import HTML_EDGES, HTMLISH, html_reference
from tests.support.requirements import _unavailable

SCORE_TOLERANCE = 1e-12


@pytest.fixture(scope="module")
def hotpath():
    if classifier._hotpath is None:
        _unavailable("the compiled extension atlas_milter._hotpath is not built (pip install . with a C compiler)",
                     require_env="ATLAS_REQUIRE_COMPILED")
    return classifier._hotpath


@pytest.fixture(scope="module")
def models(hotpath):
    """(compiled, pure) copies of the shipped model."""
    compiled, pure = load_model(), load_model()
    pure.compiled = False
    return compiled, pure


def reference_body(text: str, extra: list[str]) -> tuple[int, set[str]]:
    """classifier.features()' body block for a lowercased text, spelled out from its parts."""
    words = classifier._body_words(text)
    tokens = [w if w.isalpha() else classifier._word_token(w) for w in words if w not in FUNCTION_WORDS]
    body = set(tokens)
    pairs = tokens[: MAX_PAIRS + 1]
    body.update(map(" ".join, zip(pairs, pairs[1:])))
    body.update(extra)
    return len(words), body


def assert_same_score(compiled_model, pure_model, msg) -> None:
    fast, slow = compiled_model.score(msg), pure_model.score(msg)
    assert abs(fast.score - slow.score) <= SCORE_TOLERANCE, (fast.score, slow.score)
    assert [name for name, _ in fast.reasons] == [name for name, _ in slow.reasons]
    # shares are rounded to 4 decimals: a difference of 1e-16 may round the other way
    assert all(abs(a - b) <= 1.0001e-4 for (_, a), (_, b) in zip(fast.reasons, slow.reasons))


# Characters that matter to the word rules: ASCII letters in both cases, digits, the marks
# that join words ('.$€£-), the underscore (not a word character), other decimal digits
# (Arabic-Indic), letters of other scripts, numbers that are not decimal (², ½), invisible
# characters, white space of several kinds.
WORDISH = st.text(
    alphabet=st.sampled_from(list("abcxyzABCXYZ0189'.$€£-_ !%\t\n,") + ["é", "ß", "Ж", "ж", "ω", "٣", "²", "½", "\u200b", "İ", "ﬁ", "\u00a0", "中"]),
    max_size=300,
)
ANY_TEXT = st.text(max_size=200)


@settings(max_examples=400, deadline=None)
@given(st.one_of(WORDISH, ANY_TEXT), st.lists(st.sampled_from(["s:free", "fn:bank", "s:n:99", "s:free"]), max_size=4))
def test_body_features_match_the_reference(hotpath, text, extra):
    table = hotpath.Table({}, FUNCTION_WORDS, MAX_WORDS, MAX_PAIRS, WORD_SCAN_CHARS, TOP_REASONS)
    lowered = text.lower()
    n_words, found = table.body_features(lowered, extra)
    expected_words, expected = reference_body(lowered, extra)
    assert n_words == expected_words
    assert len(found) == len(set(found)) and set(found) == expected


@settings(max_examples=400, deadline=None)
@given(st.one_of(WORDISH, ANY_TEXT), st.integers(min_value=0, max_value=320))
def test_style_counts_match_the_reference(hotpath, text, scan_chars):
    assert hotpath.style_counts(text, scan_chars) == classifier._style_counts(text, scan_chars)


@pytest.mark.parametrize("text", [
    "word " * (MAX_WORDS + 50),  # more words than are used
    ("alpha beta gamma delta " * 20000)[: WORD_SCAN_CHARS + 37],  # longer than is scanned
    "x" * (WORD_SCAN_CHARS - 3) + " tail words here",  # a run cut at the end of the scan
    "a1b2c3d4e5f6g7h8i9j0" * 7 + "-" + "q" * 51,  # runs longer than a word, cut in 25s
    "o'neil u.s.a $5.99 €12 £3 re-use -dash- 'quote' a.b.c.d.e.f.g.h.i.j.k.l.m.n.o.p.q.r.s",
])
def test_body_features_at_the_limits(hotpath, text):
    table = hotpath.Table({}, FUNCTION_WORDS, MAX_WORDS, MAX_PAIRS, WORD_SCAN_CHARS, TOP_REASONS)
    n_words, found = table.body_features(text.lower(), [])
    assert (n_words, set(found)) == reference_body(text.lower(), [])


# What the URL rule looks at: h/w in both cases, the rest of "https://" and "www." (with the
# long s that (?i:s) matches), word characters before them, the characters that end a URL
# (quotes, brackets, Unicode white space) and other text.
URLISH = st.lists(
    st.one_of(
        st.sampled_from(["http://", "https://", "HTTPS://", "hTtPſ://", "www.", "WwW.", "ww.", "http:/", "htp://"]),
        st.text(alphabet=st.sampled_from(list("ab.-_/:9xhwH\"'<>()[]{}\\^`| \t\n") + ["é", "\u00a0", "\u2028", "\x1c", "中", "٣"]),
                max_size=12),
    ),
    max_size=12,
).map("".join)


@settings(max_examples=800, deadline=None)
@given(st.one_of(URLISH, ANY_TEXT))
def test_url_finding_matches_the_reference(hotpath, text):
    from atlas_milter.message import _URL_RE

    assert hotpath.find_urls(text) == _URL_RE.findall(text)


@pytest.mark.parametrize("text", [
    "see http://" + "a" * 400 + " and www.x",  # a URL longer than 300 characters is cut there
    "xhttp://no.example _www.no.example éwww.no.example (https://yes.example/a?b=c) www.ok",
    "http://a", "http://", "www.a", "https://ab", "a\u00a0www.example.com\u2028end",
])
def test_url_finding_at_the_edges(hotpath, text):
    from atlas_milter.message import _URL_RE

    assert hotpath.find_urls(text) == _URL_RE.findall(text)


@settings(max_examples=800, deadline=None)
@given(st.one_of(HTMLISH, st.text(max_size=200)))
def test_html_stripping_matches_the_regular_expressions(hotpath, markup):
    assert html_to_text(markup, compiled=True) == html_reference(markup)


@pytest.mark.parametrize("markup", HTML_EDGES)
def test_html_stripping_at_the_edges(hotpath, markup):
    assert html_to_text(markup, compiled=True) == html_reference(markup)


HEADER_LINES = st.lists(
    st.one_of(
        st.builds(lambda name, value, cr: f"{name}:{value}{cr}",
                  st.text(alphabet=st.sampled_from(list("Ab-_!~9") + ["é", " ", "\udc80"]), max_size=8),
                  st.text(alphabet=st.sampled_from(list(" \tab:=?\r") + ["ü", "\udcff"]), max_size=12),
                  st.sampled_from(["", "\r", "\r\r"])),
        st.builds(lambda lead, rest: lead + rest, st.sampled_from([" ", "\t"]), st.text(max_size=10)),
        st.text(max_size=10),
    ),
    max_size=8,
).map("\n".join)


@settings(max_examples=600, deadline=None)
@given(HEADER_LINES)
def test_header_split_matches_the_reference(hotpath, head):
    from atlas_milter.message import _split_headers_reference

    assert hotpath.split_headers(head) == _split_headers_reference(head)


def test_every_corpus_message_scores_the_same(hotpath, models, corpus_dir):
    """Every message of the spamassassin and modern corpora: the same header split and
    parse, the same body features as features(), the same score and the same reasons,
    compiled and pure."""
    from atlas_milter.message import _head_end, _split_headers_reference

    compiled, pure = models
    table = compiled._compiled_table()
    checked = 0
    for folder in (corpus_dir, corpus_dir.parent / "modern"):
        for _, raw in load_corpus(folder, read_index(folder)):
            head = raw[: _head_end(raw)[0]].decode("ascii", "surrogateescape")
            assert hotpath.split_headers(head) == _split_headers_reference(head)
            msg = parse_message(raw)
            assert msg == parse_message(raw, compiled=False)
            body, _ = features(msg)
            n_words, found = table.body_features(msg.text.lower(), classifier._named_tokens(msg))
            assert set(found) == body and len(found) == len(body)
            assert_same_score(compiled, pure, msg)
            checked += 1
    assert checked > 6000


def test_a_learned_model_scores_the_same_compiled_and_pure(models):
    """learn() changes the weights in place: the compiled table follows (it is rebuilt for
    the new version), so both paths still agree after it."""
    compiled = load_model()
    pure = load_model()
    pure.compiled = False
    msg = parse_message(b"Subject: quarterly figures\n\nThe quarterly figures for the northern region are attached.\n")
    before = compiled.score(msg).score
    learn(compiled, msg, is_spam=True)
    learn(pure, msg, is_spam=True)
    assert compiled.score(msg).score > before
    assert_same_score(compiled, pure, msg)


def test_a_pickled_model_leaves_its_table_behind_and_builds_its_own(models):
    compiled, pure = models
    msg = parse_message(b"Subject: Your order has shipped\n\nTrack your parcel at https://shop.example.com/track\n")
    compiled.prepare()
    copy = pickle.loads(pickle.dumps(compiled))
    assert copy._table is None
    assert copy.score(msg) == compiled.score(msg)
    assert_same_score(copy, pure, msg)


NAMES = st.one_of(st.sampled_from(["free", "money", "free money", "n:999", "s:free", "ж", "中文", "é" * 30, "a" * 40]),
                  st.text(min_size=1, max_size=40))


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(NAMES, st.floats(-5, 5), max_size=40), st.dictionaries(NAMES, st.floats(-5, 5), max_size=40),
       st.one_of(WORDISH, ANY_TEXT))
def test_an_updated_table_is_the_table_of_the_updated_weights(hotpath, weights, changes, text):
    """Table(w).updated(changes) scores exactly as Table(w | changes): weights changed and
    names added, inline and long keys, non-ASCII names, and growth past the table's room."""
    limits = (FUNCTION_WORDS, MAX_WORDS, MAX_PAIRS, WORD_SCAN_CHARS, TOP_REASONS)
    old = hotpath.Table(weights, *limits)
    updated, built = old.updated(changes), hotpath.Table({**weights, **changes}, *limits)
    assert updated.size() == built.size() == len({**weights, **changes})
    extra = [name for name in list(changes)[:4] if name.isascii()]
    lowered = (text + " " + " ".join(changes)).lower()
    assert updated.score_body(lowered, extra) == built.score_body(lowered, extra)
    assert old.score_body(lowered, extra) == hotpath.Table(weights, *limits).score_body(lowered, extra)  # untouched


def test_a_model_prepared_from_the_previous_one_scores_as_one_built_whole(models):
    """Shared learning's swap: the next model's table is the previous one's updated with the
    weights that changed, and scores exactly as a table built from all of them."""
    previous = load_model()
    previous.prepare()
    msg = parse_message(b"Subject: quarterly figures\n\nThe quarterly figures for the northern region are attached.\n")
    changed = {"quarterly": 3.0, "figures": 2.5, "northern region": 1.0, "brand-new-word": 4.0}
    derived, whole = (dataclasses.replace(previous, weights={**previous.weights, **changed}) for _ in range(2))
    derived.prepare(previous, changed)
    assert derived._table[1] is not previous._table[1]
    assert derived.score(msg) == whole.score(msg) and derived.score(msg).score > previous.score(msg).score


def test_the_table_refuses_what_is_not_a_model(hotpath):
    with pytest.raises(TypeError):
        hotpath.Table({1: 0.5}, FUNCTION_WORDS, MAX_WORDS, MAX_PAIRS, WORD_SCAN_CHARS, TOP_REASONS)
    with pytest.raises(TypeError):
        hotpath.Table({"a": "heavy"}, FUNCTION_WORDS, MAX_WORDS, MAX_PAIRS, WORD_SCAN_CHARS, TOP_REASONS)
    with pytest.raises(ValueError):
        hotpath.Table({}, FUNCTION_WORDS, -1, MAX_PAIRS, WORD_SCAN_CHARS, TOP_REASONS)
    table = hotpath.Table({"a\ud800b": 1.0}, FUNCTION_WORDS, MAX_WORDS, MAX_PAIRS, WORD_SCAN_CHARS, TOP_REASONS)
    assert table.size() == 1


def test_enable_compiled_false_scores_with_the_reference(hotpath, tmp_path):
    """ENABLE_COMPILED=false (the plain path of the benchmark) scores with pure Python."""
    from atlas_milter.config import load_config
    from atlas_milter.pipeline import Pipeline

    msg = parse_message(b"Subject: hello\n\nJust checking in about the meeting.\n")
    for flag, uses_table in (("false", False), ("true", True)):
        config = load_config(None, overrides={"store.db": str(tmp_path / "v.db"), "statsd.enabled": False},
                             env={"ENABLE_COMPILED": flag, "ENABLE_PARALLEL": "false"})
        pipeline = Pipeline(config, with_store=False)
        try:
            pipeline.model.score(msg)
            assert (pipeline.model._table is not None) is uses_table
        finally:
            pipeline.close()


def test_version_says_which_classifier_runs(hotpath):
    from atlas_milter.cli import version_line

    assert version_line().endswith("classifier: compiled")


def test_without_the_extension_the_reference_classifies_the_same(hotpath, tmp_path):
    """Where the extension could not be built (no compiler at install), the package still
    imports, --version says so, and the pure-Python reference gives the same verdicts."""
    import json
    import subprocess
    import sys
    from importlib import resources

    sample = resources.files("atlas_milter").joinpath("data", "sample")
    hide = "import sys; sys.modules['atlas_milter._hotpath'] = None; from atlas_milter.cli import main; "

    def run(argv: list[str], without: bool) -> str:
        code = (hide if without else "from atlas_milter.cli import main; ") + f"import sys; sys.exit(main({argv!r}))"
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    assert "classifier: pure Python (the compiled extension atlas_milter._hotpath is not built)" in run(["--version"], True)
    argv = ["classify", "--json", str(sample)]
    pure = [json.loads(line) for line in run(argv, True).splitlines()]
    compiled = [json.loads(line) for line in run(argv, False).splitlines()]
    assert len(pure) == len(compiled) >= 10
    for a, b in zip(pure, compiled):
        assert a["verdict"] == b["verdict"] and abs(a["score"] - b["score"]) <= SCORE_TOLERANCE
