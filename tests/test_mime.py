"""The fast MIME parse (atlas_milter/mime.py) against the email package's FeedParser, its
reference: the same tree (headers, payloads, preamble, epilogue, default types, defects) on
generated messages full of the structures and mistakes real mail has, and on every message
of the spamassassin and modern corpora."""

from __future__ import annotations

from email.parser import BytesParser
from email.policy import compat32

from hypothesis import given, settings
from hypothesis import strategies as st

from atlas_milter import mime
from atlas_milter.message import _IndexedMessage, _strip_mbox_from, parse_message
from tests.support.corpus import load_corpus, read_index

REFERENCE = BytesParser(_class=_IndexedMessage, policy=compat32)


def tree(msg) -> dict:
    """Everything of a parsed Message that the parse decides."""
    payload = msg._payload
    return {
        "headers": list(msg._headers),
        "preamble": msg.preamble,
        "epilogue": msg.epilogue,
        "default_type": msg.get_default_type(),
        "defects": [type(d).__name__ for d in msg.defects],
        "unixfrom": msg._unixfrom,
        "payload": [tree(part) for part in payload] if isinstance(payload, list) else payload,
    }


def assert_same_tree(raw: bytes) -> bool:
    """True when mime.py parsed it (and gave the FeedParser's tree), False when it declined."""
    fast = mime.parse(raw.decode("ascii", "surrogateescape"), _IndexedMessage)
    if fast is None:
        return False
    assert tree(fast) == tree(REFERENCE.parsebytes(raw))
    return True


# --- generated messages --------------------------------------------------------------------
EOL = st.sampled_from(["\n", "\r\n", "\r"])
TEXT_LINE = st.sampled_from(["hello world", "", "--", "-- ", "--not-a-boundary", "From me", " indented",
                             "Subject: not a header here", "=?utf-8?q?x?=", "caf\udce9", "a:b"])
BOUNDARY = st.sampled_from(["b1", "==_x_==", "simple", "a b", "b1.inner"])


@st.composite
def header_block(draw, ctype: str | None) -> list[str]:
    lines = draw(st.lists(st.sampled_from(["X-A: 1", "Subject: hi", "X-Cont: first", "\tcontinued", " more",
                                           "From: a@example.com", "X-Empty:", ":nameless", "Bad header",
                                           "From somebody"]), max_size=3))
    if ctype:
        lines.append(f"Content-Type: {ctype}")
    if draw(st.booleans()):
        lines.append(draw(st.sampled_from(["Content-Transfer-Encoding: 7bit", "Content-Transfer-Encoding: base64"])))
    return lines


@st.composite
def entity(draw, depth: int = 0) -> list[str]:
    """The lines of one message or part: headers, blank line (mostly), body."""
    kinds = ["text", "text", "multipart", "rfc822", "status", "digest"] if depth < 3 else ["text"]
    kind = draw(st.sampled_from(kinds))
    if kind in ("multipart", "digest"):
        boundary = draw(BOUNDARY)
        subtype = "digest" if kind == "digest" else draw(st.sampled_from(["mixed", "alternative"]))
        param = draw(st.sampled_from([f'boundary="{boundary}"', f"boundary={boundary}", ""]))
        lines = draw(header_block(f"multipart/{subtype}; {param}"))
        body = draw(st.lists(TEXT_LINE, max_size=2))  # preamble
        for _ in range(draw(st.integers(0, 3))):
            body.append(f"--{boundary}" + draw(st.sampled_from(["", "  ", "\t", "x"])))
            if draw(st.integers(0, 5)) == 0:
                body.append(f"--{boundary}")  # a repeated boundary
            body.extend(draw(entity(depth + 1)))
        if draw(st.integers(0, 4)) > 0:
            body.append(f"--{boundary}--" + draw(st.sampled_from(["", " "])))
        body.extend(draw(st.lists(TEXT_LINE, max_size=2)))  # epilogue
    elif kind == "rfc822":
        lines = draw(header_block("message/rfc822"))
        body = draw(entity(depth + 1))
    elif kind == "status":
        lines = draw(header_block("message/delivery-status"))
        body = ["Reporting-MTA: dns; mx.example", "", "Final-Recipient: rfc822; a@example.com", "Status: 5.1.1"]
        body += draw(st.lists(st.sampled_from(["", "Action: failed", "junk line"]), max_size=3))
    else:
        lines = draw(header_block(draw(st.sampled_from([None, "text/plain", "text/html; charset=utf-8"]))))
        body = draw(st.lists(TEXT_LINE, max_size=4))
    separator = [""] if draw(st.integers(0, 6)) > 0 else []
    return lines + separator + body


@settings(max_examples=800, deadline=None)
@given(entity(), EOL, st.booleans())
def test_generated_messages_parse_to_the_feedparsers_tree(lines, eol, final_eol):
    raw = (eol.join(lines) + (eol if final_eol else "")).encode("ascii", "surrogateescape")
    assert_same_tree(raw)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_arbitrary_bytes_parse_to_the_feedparsers_tree_or_are_declined(raw):
    assert_same_tree(raw)


def test_every_corpus_message_parses_to_the_feedparsers_tree(corpus_dir):
    parsed = declined = 0
    for folder in (corpus_dir, corpus_dir.parent / "modern"):
        for _, raw in load_corpus(folder, read_index(folder)):
            if assert_same_tree(_strip_mbox_from(raw)):
                parsed += 1
            else:
                declined += 1
    assert parsed > 6500 and declined == 0, (parsed, declined)


def test_parse_message_gives_the_same_result_either_way(corpus_dir):
    """The whole ParsedMessage, fast path or the email package's parser alone."""
    folder = corpus_dir.parent / "modern"
    for _, raw in load_corpus(folder, read_index(folder)):
        assert parse_message(raw) == parse_message(raw, compiled=False)
