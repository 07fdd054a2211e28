"""Header injection (issue 7): nothing from a message (subject, sender, file names, content
types, and so the feature names that become reasons) can put a bare CR or LF, or a new
header, into what the milter adds.

The milter builds every value it adds with `clean_header_value` (reasons, verdict,
quarantine reason) or from numbers and constants; reply texts go through
`clean_reply_text`. Both are tested directly, by example and by hypothesis, and then a
whole message goes through the adapter (pymilter's TestCtx) with a model that knows the
hostile feature names, so they really are the top reasons.
"""

from __future__ import annotations

import dataclasses
import functools
import io

import Milter
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from atlas_milter.adapters import milter as am
from atlas_milter.classifier import features, load_model
from atlas_milter.config import load_config
from atlas_milter.message import parse_message

HOSTILE = [
    "ok\r\nBcc: victim@example.test",
    "ok\nBcc: x",
    "ok\rBcc: x",
    "\r\n\r\nbody injected",
    "a\x00b\x0bc\x0cd\x1be\x7f",
    "line\u2028sep\u2029para\x85nel",  # Unicode line breaks some software honours
    "caf\u00e9 \u2603 \udcff",  # non-ASCII and a lone surrogate
    "%s %n %%",
    "x" * 10_000,
    "\r\n\tfolded-looking\r\n continuation",
    "",
]


def printable_ascii(value: str) -> bool:
    return all(0x20 <= ord(ch) <= 0x7E for ch in value)


@pytest.mark.parametrize("text", HOSTILE)
def test_clean_header_value(text):
    value = am.clean_header_value(text)
    assert "\r" not in value and "\n" not in value
    assert printable_ascii(value)
    assert len(value) <= am.HEADER_VALUE_MAX
    assert value == value.strip()


@pytest.mark.parametrize("text", HOSTILE)
def test_clean_reply_text(text):
    value = am.clean_reply_text(text)
    assert "\r" not in value and "\n" not in value and printable_ascii(value)
    assert "%" not in value.replace("%%", "")  # libmilter reads the reply as a format string


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(st.text())
def test_clean_header_value_any_text(text):
    value = am.clean_header_value(text)
    assert printable_ascii(value) and len(value) <= am.HEADER_VALUE_MAX


# A message whose attachment content type, file name, mailer and subject carry CR/LF and a
# "Bcc:" line after decoding (a folded Content-Type keeps its CRLF in the parsed value).
HOSTILE_MESSAGE = (
    b"From: =?utf-8?Q?Evil=0D=0ABcc:_x@evil.test?= <evil@attacker.test>\r\n"
    b"To: user@example.test\r\n"
    b"Subject: =?utf-8?Q?hi=0D=0ABcc:_x@evil.test?=\r\n"
    b"X-Mailer: =?utf-8?Q?evil=0D=0ABcc:_a?=\r\n"
    b"Message-ID: <m1@attacker.test>\r\n"
    b"Date: Sat, 28 Nov 2026 12:00:00 +0000\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
    b"--b\r\nContent-Type: text/plain\r\n\r\nhello\r\n"
    b"--b\r\nContent-Type: application/x\r\n bcc: x@evil.test\r\n"
    b'Content-Disposition: attachment; filename="=?utf-8?Q?a.e=0D=0Abcc:x?="\r\n\r\nAAAA\r\n'
    b"--b--\r\n"
)


def hostile_features() -> list[str]:
    body, meta = features(parse_message(HOSTILE_MESSAGE))
    found = sorted(f for f in body | meta if any(c in f for c in "\r\n") or "bcc" in f)
    assert any("\r\n" in f for f in found), found  # the attack really reaches a feature name
    return found


def test_reasons_header_with_hostile_feature_names(tmp_path):
    from tests.test_milter_adapter import Ctx  # noqa: PLC0415 - the adapter tests' TestCtx

    config = load_config(None, {"store.db": str(tmp_path / "v.db"), "statsd.enabled": False}, env={"ENABLE_PARALLEL": "false"})
    pipeline, err = am.make_pipeline(config)
    shipped = load_model()
    weights = dict(shipped.weights)
    weights.update({name: 50.0 for name in hostile_features()})  # they become the top reasons
    pipeline.reload_model(dataclasses.replace(shipped, weights=weights))
    engine = am.MilterEngine(config, pipeline, err)
    try:
        Milter.factory = functools.partial(am.AtlasMilter, engine)
        ctx = Ctx()
        assert ctx._connect() == Milter.CONTINUE
        ctx._setsymval("{i}", "INJECT1")
        rc = ctx._feedFile(io.BytesIO(HOSTILE_MESSAGE), "evil@attacker.test", "user@example.test")
        assert rc in (Milter.ACCEPT, Milter.CONTINUE)
        added = [c for c in ctx.changes if c[0] == "add"]
        names = {field for _, field, _ in added}
        assert names <= {am.HDR_VERDICT, am.HDR_SCORE, am.HDR_REASONS, am.HDR_SPAM_FLAG, am.HDR_SPAM_STATUS}
        assert am.HDR_REASONS in names
        for _, field, value in added:
            assert "\r" not in value and "\n" not in value, (field, value)
            assert printable_ascii(value), (field, value)
        reasons = dict((f, v) for _, f, v in added)[am.HDR_REASONS]
        assert "bcc" in reasons.lower()  # the hostile reason is there, flattened onto one line
        # And the message as the MTA would now have it carries no injected Bcc header.
        assert ctx._msg.get_all("Bcc") is None
    finally:
        engine.close()
