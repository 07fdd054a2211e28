"""The IMAP tests' own helpers (tests/support/imap.py) do what they say."""

from tests.support.imap import with_message_id


def test_with_message_id_replaces_header_and_from_line():
    raw = b"From a@b Mon Jan  1 00:00:00 2001\nMessage-Id: <old@x>\n  folded\nSubject: hi\n\nbody\n"
    out = with_message_id(raw, "<new@y>")
    assert out.startswith(b"Message-ID: <new@y>\r\n")
    assert b"old@x" not in out and b"folded" not in out and b"From a@b" not in out
    assert b"Subject: hi" in out
