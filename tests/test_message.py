"""Parsing survives what real mail throws at it, and extracts what the classifier needs."""

import base64
import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from atlas_milter.message import (
    _HREF_RE,
    _URL_RE,
    _head_end,
    fingerprint,
    html_to_text,
    parse_message,
    summarise,
)
from tests.support.markup import HTML_EDGES, HTMLISH, html_reference


def test_plain_message_headers_and_text():
    raw = (
        b"From: \"Ann Example\" <Ann@Example.ORG>\r\nReply-To: other@else.example\r\n"
        b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?= aus Berlin\r\nMessage-ID: <1@x>\r\n\r\nHello there, see https://www.example.com/a.\r\n"
    )
    msg = parse_message(raw)
    assert msg.sender == "ann@example.org"
    assert msg.sender_domain == "example.org"
    assert msg.sender_name == "Ann Example"
    assert msg.reply_to_domain == "else.example"
    assert msg.subject == "Grüße aus Berlin"
    assert "Hello there" in msg.text
    assert any("www.example.com" in u for u in msg.urls)


def test_mbox_from_line_is_not_a_header():
    msg = parse_message(b"From someone@x Mon Jan  1 00:00:00 2002\nSubject: hi\n\nbody\n")
    assert msg.subject == "hi"
    assert "body" in msg.text


def test_html_only_body_is_turned_into_text_with_links():
    raw = (
        b"Subject: offer\nContent-Type: text/html; charset=utf-8\n\n"
        b"<html><style>p{}</style><p>Buy&nbsp;now <a href='http://203.0.113.5/x'>here</a></p><img src=x></html>"
    )
    msg = parse_message(raw)
    assert msg.html_parts == 1 and msg.text_parts == 0
    assert "Buy\xa0now" in msg.text or "Buy now" in msg.text
    assert "<p>" not in msg.text and "p{}" not in msg.text
    assert "http://203.0.113.5/x" in msg.urls
    assert msg.image_tags == 1


def test_unknown_and_lying_charsets_and_bad_base64_do_not_raise():
    raw = (
        b"Subject: =?x-klingon?Q?caf=E9?=\nMIME-Version: 1.0\n"
        b"Content-Type: multipart/mixed; boundary=\"b\"\n\n--b\n"
        b"Content-Type: text/plain; charset=klingon\nContent-Transfer-Encoding: base64\n\n!!!not base64***\n"
        b"--b\nContent-Type: text/plain; charset=utf-8\n\n\xff\xfe invalid utf-8 \xe9\n"
        # the closing boundary is missing on purpose
    )
    msg = parse_message(raw)
    assert "caf" in msg.subject
    assert "invalid utf-8" in msg.text


def test_attachments_are_features_not_text():
    raw = (
        b"Subject: a\nContent-Type: multipart/mixed; boundary=b\n\n--b\nContent-Type: text/plain\n\nsee attached\n"
        b"--b\nContent-Type: application/pdf; name=\"invoice.pdf\"\nContent-Disposition: attachment; filename=\"invoice.pdf\"\n"
        b"Content-Transfer-Encoding: base64\n\nJVBERi0xLjQK\n--b--\n"
    )
    msg = parse_message(raw)
    assert msg.attachments == [("invoice.pdf", "application/pdf")]
    assert "JVBER" not in msg.text


@pytest.mark.parametrize("compiled", [True, False])
def test_attached_html_is_read_as_text_and_stays_an_attachment(compiled):
    """What a mail client shows of an attached HTML file (a common phishing form: a login
    page sent as a file) is judged like the body: its text and links are read."""
    raw = (
        b"Subject: document\nContent-Type: multipart/mixed; boundary=b\n\n--b\nContent-Type: text/plain\n\nsee attached\n"
        b"--b\nContent-Type: text/html; name=\"Payment.html\"\nContent-Disposition: attachment; filename=\"Payment.html\"\n"
        b"Content-Transfer-Encoding: base64\n\n"
        + base64.encodebytes(b"<html><body><p>Verify your mailbox password</p>"
                             b"<a href=\"http://login.example.net/verify\">sign in</a><script>var x=1;</script></body></html>")
        + b"--b--\n"
    )
    msg = parse_message(raw, compiled=compiled)
    assert msg.attachments == [("Payment.html", "text/html")]
    assert "Verify your mailbox password" in msg.text and "see attached" in msg.text
    assert "var x" not in msg.text
    assert any("login.example.net" in url for url in msg.urls)


def test_nul_bytes_and_cr_only_garbage():
    msg = parse_message(b"Subject: x\x00y\r\n\r\nbody\x00with nul\r\r\r" + bytes(range(256)))
    assert "NUL bytes" in msg.defects
    assert "with nul" in msg.text


def test_only_max_bytes_are_analysed():
    raw = b"Subject: big\n\n" + b"word " * 400_000  # 2 MB
    msg = parse_message(raw, max_bytes=64 * 1024)
    assert msg.truncated
    assert msg.size == len(raw)
    assert len(msg.text) <= 64 * 1024


def test_ten_megabyte_single_line():
    raw = b"Subject: long line\n\n" + b"x" * (10 * 1024 * 1024)
    msg = parse_message(raw)
    assert msg.truncated and msg.subject == "long line"


def test_no_headers_at_all():
    msg = parse_message(b"just some text without any header")
    assert msg.sender == "" and isinstance(msg.text, str)


def test_deeply_nested_mime_gets_a_result():
    depth = 1200
    parts = b"".join(b"--b%d\nContent-Type: multipart/mixed; boundary=\"b%d\"\n\n" % (i, i + 1) for i in range(depth))
    raw = b"Subject: deep\nContent-Type: multipart/mixed; boundary=\"b0\"\n\n" + parts + b"--b1200\nContent-Type: text/plain\n\ndeep text\n"
    msg = parse_message(raw)
    assert msg.subject == "deep" or msg.defects  # parsed or read as plain text, never raised


def test_fingerprint_ignores_envelope_and_recipient_but_not_the_body():
    base = b"From: Shop <a@shop.example>\nTo: %s\nSubject: Deal\nMessage-ID: <%s>\n\nBuy   NOW\n"
    one = fingerprint(base % (b"x@y", b"1"))
    two = fingerprint(b"From mbox-line\n" + base % (b"z@w", b"2"))
    other = fingerprint((base % (b"x@y", b"1")).replace(b"NOW", b"later"))
    assert (one.sender, one.subject, one.body_digest) == (two.sender, two.subject, two.body_digest)
    assert one.body_digest != other.body_digest
    assert one.message_id == "<1>"


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=12).map(lambda b: bytes(b"\r\na"[x % 3] for x in b)))
def test_head_end_is_the_first_blank_line(raw):
    match = re.search(rb"\r?\n\r?\n", raw)
    assert _head_end(raw) == ((match.start(), match.end()) if match else (len(raw), len(raw)))


# The link patterns as first written; message.py spells them so that the regex engine can skip ahead.
PLAIN_URL_RE = re.compile(r"""(?i)\b(?:https?://|www\.)[^\s"'<>()\[\]{}\\^`|]{2,300}""")
PLAIN_HREF_RE = re.compile(r"""(?i)\b(?:href|src)\s*=\s*["']?\s*([^"'\s>]{1,300})""")
LINK_PIECES = ["h", "H", "w", "W", "s", "S", "\u017f", "ttp", "TTPS", "://", "ww.", "WW.", "ref", "REF", "rc", "Rc",
               "=", " ", "'", '"', ".", "_", "x", "\u00e9", "\u0301", "1", "<", ">", "\n", "http://a.b", "www.x.y"]


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.sampled_from(LINK_PIECES), max_size=30).map("".join))
def test_link_patterns_find_what_the_plain_ones_find(text):
    assert _URL_RE.findall(text) == PLAIN_URL_RE.findall(text)
    assert _HREF_RE.findall(text) == PLAIN_HREF_RE.findall(text)


def test_body_digest_folds_ascii_case_and_white_space_only():
    def digest(body: bytes) -> str:
        return fingerprint(b"Subject: s\n\n" + body).body_digest

    assert digest(b"Buy NOW\r\n\tcheap\x0b\x0cpills") == digest(b"buynowcheappills")
    # Non-ASCII bytes are neither case-folded nor taken for white space.
    assert digest(b"\xc4\xe4") != digest(b"\xe4\xe4")
    assert digest(b"a\xa0b") != digest(b"ab")


def test_summarise_decodes_sender_and_subject():
    fp = fingerprint(b"From: =?utf-8?q?J=C3=B6rg?= <J@Example.DE>\nSubject: =?utf-8?b?w5xiZXI=?=\n\nx")
    summary = summarise(fp)
    assert summary.sender == "j@example.de" and summary.sender_domain == "example.de"
    assert summary.subject == "Über"


@settings(max_examples=800, deadline=None)
@given(st.one_of(HTMLISH, st.text(max_size=200)))
def test_html_stripping_matches_the_regular_expressions(markup):
    """The pure-Python HTML walk (the compiled one has its own test in test_hotpath.py)."""
    assert html_to_text(markup, compiled=False) == html_reference(markup)


@pytest.mark.parametrize("markup", HTML_EDGES)
def test_html_stripping_at_the_edges(markup):
    assert html_to_text(markup, compiled=False) == html_reference(markup)


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("part", [
    "<script>x" * 28000,  # openers that are never closed (the regex: each scans to the end)
    "<!--x" * 50000,
    "<" * 250000,  # no ">" at all (the regex: 4,000 characters scanned per "<")
    "<<<<" * 999 + ">" + "<" * 60000 + "<style>a</style>" * 5000,
])
def test_hostile_html_gets_a_verdict_in_linear_time(part, compiled):
    """A 250 KB HTML part built to make the regular expressions take quadratic time (minutes
    on the pure path): parsed in well under the milter's 5 s deadline either way. Not a
    speed target: the limit only tells linear from quadratic."""
    raw = ("Subject: x\nContent-Type: text/html\n\n" + part).encode()
    started = time.perf_counter()
    msg = parse_message(raw, compiled=compiled)
    assert time.perf_counter() - started < 5
    assert msg.html_parts == 1 and "unparseable" not in " ".join(msg.defects)
