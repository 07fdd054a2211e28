"""Fuzzing the parser and the classifier with hypothesis (issue 7, "Hostile and broken input").

Real messages (a few from the shared corpus, plus synthetic ones) are mutated: bytes
flipped, inserted, deleted, duplicated, truncated; random header lines added (raw bytes,
CR/LF, encoded words with odd charsets); the whole wrapped in random MIME structure. The
properties: `parse_message`, `Model.score`, `fingerprint` and `summarise` never raise, the
score is in [0, 1], and every example finishes within a time bound.

CI runs a fixed, derandomised budget (200 examples per test); run longer on demand with
ATLAS_FUZZ_EXAMPLES=20000 (and, to explore new inputs rather than the fixed ones,
ATLAS_FUZZ_RANDOM=1).
"""

from __future__ import annotations

import os
import time
from importlib import resources

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from atlas_milter.classifier import load_model
from atlas_milter.message import MAX_TEXT_CHARS, fingerprint, parse_message, summarise

EXAMPLES = int(os.environ.get("ATLAS_FUZZ_EXAMPLES", "200"))
DERANDOMIZE = os.environ.get("ATLAS_FUZZ_RANDOM", "").strip().lower() not in {"1", "true", "yes", "on"}
TIME_BOUND_S = 2.0  # per example: generous; catches unbounded work, not slowness
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,  # our own bound below, measured on the work only (not on generation)
    derandomize=DERANDOMIZE,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
    database=None,
)

CORPUS_SEEDS = 6  # per label: a handful, chosen deterministically (the largest multipart first)

SYNTHETIC = [
    b"",
    b"Subject: hi\n\nbody\n",
    b"From: a@b.test\r\nSubject: =?utf-8?B?w6l0w6k=?=\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
    b"<html><body><a href='http://1.2.3.4/x'>click</a><img src=x></body></html>\r\n",
    b"From: \"Shop\" <deals@shop.test>\r\nReply-To: x@elsewhere.test\r\nMIME-Version: 1.0\r\n"
    b"Content-Type: multipart/mixed; boundary=\"XX\"\r\n\r\n--XX\r\nContent-Type: text/plain; charset=iso-8859-1\r\n"
    b"Content-Transfer-Encoding: quoted-printable\r\n\r\nCaf=E9 $100 FREE=\r\n now\r\n--XX\r\n"
    b"Content-Type: application/zip; name=\"a.zip\"\r\nContent-Transfer-Encoding: base64\r\n\r\nUEsDBAo=\r\n--XX--\r\n",
    b"From nobody Sat Jan  1 00:00:00 2000\nFrom: x@y.test\nContent-Type: message/rfc822\n\n"
    b"Subject: inner\nContent-Type: text/plain\n\ninner body\n",
]


@pytest.fixture(scope="module")
def seeds(corpus_dir):
    import csv  # noqa: PLC0415

    with open(corpus_dir / "index.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    chosen = []
    for label in ("ham", "spam"):
        mine = sorted((r for r in rows if r["label"] == label), key=lambda r: (-int(r["bytes"]), r["path"]))
        multipart = [r for r in mine[:400] if b"multipart" in (corpus_dir / r["path"]).read_bytes()[:8192].lower()]
        plain = [r for r in reversed(mine) if int(r["bytes"]) > 1500][:CORPUS_SEEDS // 2]
        chosen += multipart[: CORPUS_SEEDS - len(plain)] + plain
    messages = [(corpus_dir / r["path"]).read_bytes() for r in chosen]
    sample = resources.files("atlas_milter").joinpath("data", "sample")
    messages += [p.read_bytes() for p in sorted(sample.iterdir(), key=lambda p: p.name) if p.name.endswith(".eml")][:4]
    return messages + SYNTHETIC


@pytest.fixture(scope="module")
def model():
    return load_model()


# --- strategies ---------------------------------------------------------------------------

CHARSETS = ["utf-8", "iso-8859-1", "cp1252", "koi8-r", "shift_jis", "gb2312", "utf-16", "utf-7",
            "x-unknown", "zlib_codec", "base64_codec", "rot_13", "", "\xff", "utf-8'en'"]
ENCODINGS = ["7bit", "8bit", "base64", "quoted-printable", "binary", "x-uuencode", "gzip", "", "b\x00se64"]
CTYPES = ["text/plain", "text/html", "application/octet-stream", "image/png", "message/rfc822",
          "text/x-unknown", "multipart/mixed", "multipart/alternative", "", "text", "/", "a/b/c"]
NAMES = ["Subject", "From", "Reply-To", "Return-Path", "Message-ID", "Content-Type", "Content-Transfer-Encoding",
         "Content-Disposition", "X-Mailer", "Date", "MIME-Version", "Received", "X-Atlas-Verdict", "X"]

raw_bytes = st.binary(max_size=64)
text_bits = st.text(max_size=40)
encoded_word = st.builds(
    lambda cs, enc, payload: b"=?" + cs.encode("utf-8", "replace") + b"?" + enc + b"?" + payload + b"?=",
    st.sampled_from(CHARSETS), st.sampled_from([b"B", b"Q", b"b", b"X", b""]), raw_bytes,
)
header_value = st.one_of(
    raw_bytes,
    text_bits.map(lambda t: t.encode("utf-8", "surrogatepass")),
    encoded_word,
    st.lists(st.one_of(encoded_word, raw_bytes), max_size=5).map(b"\r\n ".join),
    st.sampled_from([b"\r\nBcc: x@evil.test", b"\n\n", b"\r", b"\x00", b"a" * 5000, b"=?", b";;boundary=\"\""]),
)
header_line = st.builds(
    lambda name, value: name + b": " + value + b"\r\n",
    st.one_of(st.sampled_from(NAMES).map(str.encode), raw_bytes),
    header_value,
)


def _mime_leaf(ctype: str, charset: str, cte: str, body: bytes) -> bytes:
    return (
        f"Content-Type: {ctype}; charset=\"{charset}\"\r\nContent-Transfer-Encoding: {cte}\r\n\r\n".encode(
            "utf-8", "surrogatepass"
        )
        + body
    )


mime_leaf = st.builds(
    _mime_leaf, st.sampled_from(CTYPES), st.sampled_from(CHARSETS), st.sampled_from(ENCODINGS),
    st.one_of(st.binary(max_size=300), st.just(b"PGh0bWw+PGEgaHJlZj1odHRwOi8veC50ZXN0Lz5oaTwvYT4="), st.just(b"=E9=ZZ=\r\n")),
)


def _multipart(boundary: bytes, parts: list[bytes], close: bool, subtype: str) -> bytes:
    out = [b"Content-Type: multipart/" + subtype.encode() + b"; boundary=\"" + boundary + b"\"\r\n\r\npreamble\r\n"]
    for part in parts:
        out.append(b"--" + boundary + b"\r\n" + part + b"\r\n")
    if close:
        out.append(b"--" + boundary + b"--\r\n")
    return b"".join(out)


mime_tree = st.recursive(
    mime_leaf,
    lambda children: st.one_of(
        st.builds(
            _multipart,
            st.sampled_from([b"b", b"=_x", b"", b"--", b"a b", b"\xff"]),
            st.lists(children, max_size=4),
            st.booleans(),
            st.sampled_from(["mixed", "alternative", "related", "signed", "digest"]),
        ),
        children.map(lambda inner: b"Content-Type: message/rfc822\r\n\r\nSubject: inner\r\n" + inner),
    ),
    max_leaves=12,
)


@st.composite
def mutated(draw, seeds):
    raw = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(0, 8))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "duplicate", "header", "nul", "crlf"]))
        at = draw(st.integers(0, 1 << 20)) % (len(raw) + 1)
        if op == "flip" and raw:
            raw[min(at, len(raw) - 1)] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            raw[at:at] = draw(st.binary(min_size=1, max_size=200))
        elif op == "delete":
            del raw[at : at + draw(st.integers(1, 5000))]
        elif op == "truncate":
            del raw[at:]
        elif op == "duplicate":
            piece = raw[at : at + draw(st.integers(1, 2000))]
            raw[at:at] = piece * draw(st.integers(1, 20))
        elif op == "header":
            raw[0:0] = draw(header_line)
        elif op == "nul":
            raw[at:at] = b"\x00" * draw(st.integers(1, 50))
        elif op == "crlf":
            raw[at:at] = draw(st.sampled_from([b"\r", b"\n", b"\r\n", b"\n\n", b"\r\n\r\n", b"\n "]))
    return bytes(raw)


@st.composite
def synthetic_mime(draw):
    headers = b"".join(draw(st.lists(header_line, max_size=6)))
    return headers + b"MIME-Version: 1.0\r\n" + draw(mime_tree)


# --- properties ---------------------------------------------------------------------------


def check(raw: bytes, model) -> None:
    t0 = time.perf_counter()
    parsed = parse_message(raw)
    score = model.score(parsed)
    summary = summarise(fingerprint(raw))
    took = time.perf_counter() - t0
    assert 0.0 <= score.score <= 1.0
    assert len(parsed.text) <= MAX_TEXT_CHARS
    assert isinstance(summary.subject, str) and len(summary.subject) <= 500
    assert took <= TIME_BOUND_S, f"{took:.2f} s for a {len(raw)}-byte message"


@FUZZ
@given(data=st.data())
def test_mutated_messages(seeds, model, data):
    check(data.draw(mutated(seeds), label="message"), model)


@FUZZ
@given(raw=synthetic_mime())
def test_random_mime_structure(model, raw):
    check(raw, model)


@FUZZ
@given(raw=st.binary(max_size=4096))
def test_random_bytes(model, raw):
    check(raw, model)
