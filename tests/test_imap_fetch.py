"""The raw FETCH answer reader (adapters/imap/fetch.py) on byte streams: no server needed."""

from __future__ import annotations

import io

import pytest

from atlas_milter.adapters.imap.fetch import read_fetch_answer, uid_set


def test_uid_set_is_compact_and_exact():
    assert uid_set([5, 1, 2, 3, 9, 10, 12]) == "1:3,5,9:10,12"
    assert uid_set([7]) == "7"


def _answer(*lines: bytes):
    return io.BytesIO(b"".join(lines))


def test_fetch_answer_reader_takes_literals_and_skips_the_rest():
    body1 = b"Subject: a\r\n\r\nline ending like a literal {12}\r\nmore\r\n"
    body2 = b"Subject: b\r\n\r\n\xe9\x00binary"
    f = _answer(
        b"* 3 EXPUNGE\r\n",
        b"* 1 FETCH (UID 10 BODY[] {%d}\r\n" % len(body1), body1, b")\r\n",
        b"* 2 FETCH (FLAGS (\\Seen))\r\n",  # unsolicited
        b"* 4 FETCH (BODY[] {%d}\r\n" % len(body2), body2, b" UID 12)\r\n",  # UID after the body
        b"* 5 FETCH (UID 99 BODY[] {1}\r\n", b"x", b")\r\n",  # not asked for
        b"A7 OK Fetch completed.\r\n",
    )
    assert read_fetch_answer(f, b"A7", {10, 12, 13}) == {10: body1, 12: body2}
    assert f.read() == b""  # read exactly to the end of the answer


def test_fetch_answer_reader_falls_back_errors_and_bye():
    from imapclient.exceptions import IMAPClientAbortError, IMAPClientError

    quoted = _answer(b'* 1 FETCH (UID 10 BODY[] "")\r\n', b"A1 OK done\r\n")
    assert read_fetch_answer(quoted, b"A1", {10}) is None  # caller asks imapclient instead
    with pytest.raises(IMAPClientError):
        read_fetch_answer(_answer(b"A2 NO [SERVERBUG] oops\r\n"), b"A2", {1})
    with pytest.raises(IMAPClientAbortError):
        read_fetch_answer(_answer(b"* BYE shutting down\r\n"), b"A3", {1})
    with pytest.raises(IMAPClientAbortError):
        read_fetch_answer(_answer(b"* 1 FETCH (UID 1 BODY[] {5}\r\n", b"ab"), b"A4", {1})


def test_uid_set_ignores_order_and_repeats():
    assert uid_set([3, 3, 2, 1, 1]) == "1:3"
    assert uid_set([10, 8, 6]) == "6,8,10"


def test_a_body_that_looks_like_the_completion_is_read_as_a_body():
    body = b"Subject: x\r\n\r\nA9 OK Fetch completed.\r\n* BYE not really\r\n"
    f = _answer(b"* 1 FETCH (UID 4 BODY[] {%d}\r\n" % len(body), body, b")\r\n", b"A9 OK done\r\n")
    assert read_fetch_answer(f, b"A9", {4}) == {4: body}
    assert f.read() == b""


def test_a_body_without_any_uid_asks_for_the_fallback():
    f = _answer(b"* 1 FETCH (BODY[] {2}\r\n", b"hi", b")\r\n", b"A5 OK done\r\n")
    assert read_fetch_answer(f, b"A5", {1}) is None
    assert f.read() == b""  # the whole answer was still read


def test_read_fetch_refuses_outside_the_selected_state():
    from imapclient.exceptions import IMAPClientError

    from atlas_milter.adapters.imap.fetch import read_fetch

    class NotSelected:
        state = "AUTH"

    with pytest.raises(IMAPClientError, match="illegal in state AUTH"):
        read_fetch(NotSelected(), [1])
