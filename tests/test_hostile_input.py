"""Crafted hostile and broken messages (issue 7, "Hostile and broken input").

Every message is generated here, at test time (no big files in the repository), and goes
through the parser and the shipped model, through `Pipeline.classify` (the path the
milter and `classify` take), through `Pipeline.process_batch` (the path backfill takes),
through the milter adapter's callbacks, and through `atlas-milter classify --json` in a
subprocess. Each must get a verdict, raise nothing, and stay within a time bound and a
memory bound (tracemalloc peak of Python allocations, not counting the input itself).

The bounds are generous on purpose (a slow CI machine must not flake): they catch
unbounded work (quadratic loops, decompressing a bomb, reading a 50 MB attachment), not
ordinary slowness.
"""

from __future__ import annotations

import base64
import email.message
import encodings.aliases
import functools
import gc
import io
import json
import os
import random
import subprocess
import sys
import time
import tracemalloc
import zlib
from pathlib import Path

import Milter
import pytest

from atlas_milter.adapters import milter as am
from atlas_milter.classifier import load_model
from atlas_milter.config import load_config
from atlas_milter.message import MAX_HEADERS, MAX_PARTS, MAX_TEXT_CHARS, parse_message
from atlas_milter.pipeline import Pipeline

REPO = Path(__file__).resolve().parents[1]
TIME_BOUND_S = 2.0  # per message and path, on this machine: generous
MEMORY_BOUND = 100 * 1024 * 1024  # tracemalloc peak beyond the input itself

HEAD = (
    b"From: Hostile Sender <evil@attacker.test>\r\n"
    b"To: user@example.test\r\n"
    b"Subject: hostile\r\n"
    b"Date: Sat, 28 Nov 2026 12:00:00 +0000\r\n"
    b"Message-ID: <hostile@attacker.test>\r\n"
    b"MIME-Version: 1.0\r\n"
)


# --- generators ----------------------------------------------------------------------------


def nested_1000() -> bytes:
    depth = 1000
    out = [HEAD]
    for i in range(depth):
        if i:
            out.append(b"\r\n--b%d\r\n" % (i - 1))
        out.append(b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n' % i)
    out.append(b"--b%d\r\nContent-Type: text/plain\r\n\r\ndeep inside\r\n" % (depth - 1))
    for i in reversed(range(depth)):
        out.append(b"--b%d--\r\n" % i)
    return b"".join(out)


def nested_rfc822_1000() -> bytes:
    # message/rfc822 inside message/rfc822, 1,000 deep.
    out = [HEAD]
    for _ in range(1000):
        out.append(b"Content-Type: message/rfc822\r\n\r\nSubject: inner\r\n")
    out.append(b"Content-Type: text/plain\r\n\r\nbottom\r\n")
    return b"".join(out)


def parts_10000() -> bytes:
    out = [HEAD, b'Content-Type: multipart/mixed; boundary="p"\r\n\r\n']
    for i in range(10_000):
        out.append(b"--p\r\nContent-Type: text/plain\r\n\r\npart %d buy now\r\n" % i)
    out.append(b"--p--\r\n")
    return b"".join(out)


def attachment_50mb() -> bytes:
    line = base64.b64encode(bytes(range(256))[:57]) + b"\r\n"  # 76 chars + CRLF
    body = line * (50 * 1024 * 1024 // len(line))
    return b"".join([
        HEAD,
        b'Content-Type: multipart/mixed; boundary="a"\r\n\r\n',
        b"--a\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n",
        b'--a\r\nContent-Type: application/octet-stream; name="big.bin"\r\n'
        b"Content-Transfer-Encoding: base64\r\n"
        b'Content-Disposition: attachment; filename="big.bin"\r\n\r\n',
        body,
        b"--a--\r\n",
    ])


def text_attachment_50mb() -> bytes:
    # The same size as an inline text part: the parser must not decode all of it.
    line = base64.b64encode(b"cheap pills " * 4 + b"now! ")[:76] + b"\r\n"
    body = line * (50 * 1024 * 1024 // len(line))
    return HEAD + b"Content-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\n" + body


def line_10mb_body() -> bytes:
    return HEAD + b"Content-Type: text/plain\r\n\r\n" + b"x" * (10 * 1024 * 1024)


def line_10mb_only() -> bytes:
    # The whole message is one line: no newline anywhere.
    return b"Subject: " + b"word " * (2 * 1024 * 1024)


def nul_everywhere() -> bytes:
    plain = HEAD + b"Content-Type: text/plain\r\n\r\nhello there, buy cheap stuff at http://x.test/\r\n"
    return b"\x00".join(bytes([c]) for c in plain) + b"\x00" * 1000


def invalid_utf8_headers() -> bytes:
    return (
        b"From: \xff\xfe\xc3( <\xe2\x82@bad\xc0\xaf.test>\r\n"
        b"Subject: \xed\xa0\x80 surrogate \xf4\x90\x80\x80 over max \xc0\x80 overlong\r\n"
        b"Reply-To: \x80\x81\x82@\xfe.test\r\n"
        b"X-Mailer: \xff\xff\xff\r\n"
        b"Content-Type: text/plain; charset=\xff\xfe\r\n"
        b"Content-Disposition: attachment; filename=\"\xc3\x28.exe\"\r\n"
        b"\r\nbody \xff\xfe\r\n"
    )


UNKNOWN_CHARSETS = [
    "x-unknown", "utf-99", "", "../../etc/passwd", "a" * 1000, "utf-8'en'", "\u2603",
    "base64_codec", "zlib_codec", "bz2_codec", "rot_13", "uu_codec", "hex_codec", "idna",
    "punycode", "raw_unicode_escape", "unicode_escape", "mbcs", "oem",
]


def all_charsets() -> list[str]:
    return sorted(set(encodings.aliases.aliases.values())) + UNKNOWN_CHARSETS


def encoded_words_every_charset() -> bytes:
    payload = base64.b64encode(b"caf\xe9 \xff\xfe free money").decode()
    words_b = [f"=?{cs}?B?{payload}?=" for cs in all_charsets()]
    words_q = [f"=?{cs}?Q?caf=E9_=FF=FE_=00?=" for cs in all_charsets()]
    broken = ["=?utf-8?B?!!!!?=", "=?utf-8?X?abc?=", "=?utf-8?Q?=ZZ?=", "=??B?YQ==?=", "=?utf-8?B?", "=?" * 500]
    subject = " ".join(words_b + words_q + broken)
    from_ = " ".join(words_b[:50]) + " <x@y.test>"
    parts = [
        HEAD.replace(b"Subject: hostile\r\n", b"").replace(b"From: Hostile Sender <evil@attacker.test>\r\n", b""),
        b"Subject: " + subject.encode("ascii", "replace") + b"\r\n",
        b"From: " + from_.encode("ascii", "replace") + b"\r\n",
        b'Content-Type: multipart/mixed; boundary="c"\r\n\r\n',
    ]
    # And one text part per charset (more than MAX_PARTS of them: the cap applies).
    for cs in all_charsets():
        parts.append(
            b"--c\r\nContent-Type: text/plain; charset=\"" + cs.encode("ascii", "replace") + b"\"\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n" + base64.b64encode(b"caf\xe9 \xff\xfe\x00 text") + b"\r\n"
        )
    parts.append(b"--c--\r\n")
    return b"".join(parts)


def base64_garbage() -> bytes:
    rng = random.Random(7)
    junk = bytes(rng.choice(b"!@#$%^&*()=ABCxyz09+/\r\n \t") for _ in range(200_000))
    return b"".join([
        HEAD,
        b'Content-Type: multipart/alternative; boundary="g"\r\n\r\n',
        b"--g\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\n", junk, b"\r\n",
        b"--g\r\nContent-Type: text/html\r\nContent-Transfer-Encoding: base64\r\n\r\nPGh0bWw+===\r\nQ\r\n====\r\n",
        b"--g\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n=ZZ=\r\n=0=\r\n" + b"=" * 10_000 + b"\r\n",
        b"--g\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: x-uuencode\r\n\r\nbegin 644 f\r\n" + junk[:5000] + b"\r\nend\r\n",
        b"--g--\r\n",
    ])


def header_1mb() -> bytes:
    return HEAD.replace(b"Subject: hostile", b"Subject: " + b"A" * (1024 * 1024)) + b"\r\nbody\r\n"


def header_1mb_folded() -> bytes:
    folded = b"\r\n ".join([b"=?utf-8?B?" + base64.b64encode(b"spam" * 12) + b"?="] * (1024 * 1024 // 80))
    return HEAD + b"X-Long: " + folded + b"\r\n\r\nbody\r\n"


def headers_100000() -> bytes:
    return HEAD + b"".join(b"X-H%d: v\r\n" % i for i in range(100_000)) + b"\r\nbody\r\n"


def _bomb(expanded: int = 256 * 1024 * 1024) -> bytes:
    """zlib stream of `expanded` zero bytes (about 250 KiB): built chunk by chunk."""
    comp = zlib.compressobj(9)
    chunk = bytes(1024 * 1024)
    out = [comp.compress(chunk) for _ in range(expanded // len(chunk))]
    out.append(comp.flush())
    return b"".join(out)


@functools.lru_cache(maxsize=1)
def bomb_bytes() -> bytes:
    return _bomb()


def zip_bomb() -> bytes:
    stream = bomb_bytes()
    gz = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff" + stream[2:-4]  # gzip framing around the deflate data
    b64 = lambda data: base64.encodebytes(data).replace(b"\n", b"\r\n")  # noqa: E731
    return b"".join([
        HEAD,
        b'Content-Type: multipart/mixed; boundary="z"\r\n\r\n',
        b"--z\r\nContent-Type: text/plain\r\n\r\nopen the attachment\r\n",
        b'--z\r\nContent-Type: application/gzip; name="bomb.gz"\r\nContent-Transfer-Encoding: base64\r\n\r\n', b64(gz),
        b'--z\r\nContent-Type: application/zip; name="bomb.zip"\r\nContent-Transfer-Encoding: base64\r\n\r\n', b64(stream),
        # A text part that claims a decompressing "charset" and a gzip encoding: never decompressed.
        b'--z\r\nContent-Type: text/plain; charset="zlib_codec"\r\nContent-Encoding: gzip\r\n'
        b"Content-Transfer-Encoding: base64\r\n\r\n", b64(stream),
        b'--z\r\nContent-Type: text/html; charset="zlib"\r\nContent-Transfer-Encoding: base64\r\n\r\n', b64(stream),
        b"--z--\r\n",
    ])


def empty() -> bytes:
    return b""


def only_headers() -> bytes:
    return HEAD.rstrip(b"\r\n")


def only_headers_blank() -> bytes:
    return HEAD + b"\r\n"


def binary_garbage() -> bytes:
    return random.Random(42).randbytes(2 * 1024 * 1024)


def boundary_storm() -> bytes:
    # Thousands of boundaries and MIME headers inside one part; unterminated multipart.
    return HEAD + b'Content-Type: multipart/mixed; boundary=""\r\n\r\n' + b"--\r\nContent-Type: multipart/mixed\r\n\r\n" * 20_000


def html_tag_storm() -> bytes:
    # Unclosed tags, comments and scripts: the regex HTML-to-text must stay linear.
    html = b"<a href=x" * 50_000 + b"<!--" * 20_000 + b"<script>" * 20_000 + b"<img " * 20_000
    return HEAD + b"Content-Type: text/html\r\n\r\n" + html


CRAFTED = {
    f.__name__: f
    for f in (
        nested_1000, nested_rfc822_1000, parts_10000, attachment_50mb, text_attachment_50mb,
        line_10mb_body, line_10mb_only, nul_everywhere, invalid_utf8_headers,
        encoded_words_every_charset, base64_garbage, header_1mb, header_1mb_folded, headers_100000,
        zip_bomb, empty, only_headers, only_headers_blank, binary_garbage, boundary_storm, html_tag_storm,
    )
}
SMALL = ["nested_1000", "nul_everywhere", "invalid_utf8_headers", "encoded_words_every_charset",
         "zip_bomb", "empty", "only_headers", "binary_garbage", "headers_100000"]


# --- helpers -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    return load_model()


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    db = tmp_path_factory.mktemp("hostile") / "v.db"
    config = load_config(None, {"store.db": str(db), "statsd.enabled": False}, env={"ENABLE_PARALLEL": "false"})
    pipe = Pipeline(config)
    yield pipe
    pipe.close()


def bounded(fn, *args):
    """(result, seconds, tracemalloc peak bytes) of fn(*args): timed once without tracing
    (tracing slows Python down), then traced once for the memory peak."""
    gc.collect()
    t0 = time.perf_counter()
    result = fn(*args)
    took = time.perf_counter() - t0
    gc.collect()
    tracemalloc.start()
    try:
        fn(*args)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, took, peak


def check_bounds(name: str, took: float, peak: int) -> None:
    assert took <= TIME_BOUND_S, f"{name}: {took:.2f} s"
    assert peak <= MEMORY_BOUND, f"{name}: peak {peak / 2**20:.1f} MiB of Python allocations"


# --- tests -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CRAFTED))
def test_parse_and_score_bounded(name, model):
    raw = CRAFTED[name]()

    def run(data):
        parsed = parse_message(data)
        return parsed, model.score(parsed)

    (parsed, score), took, peak = bounded(run, raw)
    check_bounds(name, took, peak)
    assert 0.0 <= score.score <= 1.0
    assert len(parsed.text) <= MAX_TEXT_CHARS
    assert len(parsed.headers) <= MAX_HEADERS
    assert len(parsed.content_types) <= MAX_PARTS
    assert len(parsed.subject) <= 500


@pytest.mark.parametrize("name", list(CRAFTED))
def test_pipeline_classify_bounded(name, pipeline):
    raw = CRAFTED[name]()

    def run(data):
        if pipeline.cache is not None:
            pipeline.cache.clear()
        return pipeline.classify(data, key=name)

    result, took, peak = bounded(run, raw)
    check_bounds(name, took, peak)
    assert result.verdict.verdict in ("spam", "ham", "unsure")
    assert 0.0 <= result.verdict.score <= 1.0
    # The record a verdict leaves is written too (hostile subjects and senders in SQLite).
    assert pipeline.record(result, source="hostile-test")


def test_batch_path_all_crafted(pipeline):
    """The backfill path (process_batch): every crafted message in one chunk, one result each."""
    items = [(name, CRAFTED[name]()) for name in CRAFTED if "50mb" not in name]
    t0 = time.perf_counter()
    results = pipeline.process_batch(items)
    took = time.perf_counter() - t0
    assert [r.key for r in results] == [name for name, _ in items]  # no ItemError among them
    assert took <= TIME_BOUND_S * len(items)
    assert pipeline.flush(timeout=30)


def _milter_feed(engine, raw: bytes):
    """Drive the AtlasMilter callbacks the way libmilter does, splitting the message ourselves
    (pymilter's TestCtx parses the message with the email package first, which is not what
    is under test and has its own limits on hostile input)."""
    from tests.test_milter_adapter import Ctx  # noqa: PLC0415 - reuse the adapter tests' context

    Milter.factory = functools.partial(am.AtlasMilter, engine)
    ctx = Ctx()
    assert ctx._connect() == Milter.CONTINUE
    ctx._setsymval("{i}", "HOSTILE1")
    assert ctx._envfrom("<evil@attacker.test>") == Milter.CONTINUE
    assert ctx._envrcpt("<user@example.test>") == Milter.CONTINUE
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        head, sep, body = raw.partition(b"\n\n")
    for line in head.replace(b"\r\n", b"\n").split(b"\n"):
        name, colon, value = line.partition(b":")
        if colon and name and b" " not in name:
            ctx._priv.header_bytes(name.decode("latin-1"), value.strip())
    ctx._msg = email.message.Message()  # where TestCtx.addheader records what we add
    rc = ctx._feed_body(io.BytesIO(body))
    assert rc in (Milter.CONTINUE, Milter.SKIP)
    return ctx._eom(), ctx


@pytest.mark.parametrize("name", list(CRAFTED))
def test_milter_bounded(name, tmp_path):
    raw = CRAFTED[name]()
    config = load_config(None, {"store.db": str(tmp_path / "m.db"), "statsd.enabled": False}, env={"ENABLE_PARALLEL": "false"})
    pipe, err = am.make_pipeline(config)
    engine = am.MilterEngine(config, pipe, err)
    try:
        t0 = time.perf_counter()
        rc, ctx = _milter_feed(engine, raw)
        took = time.perf_counter() - t0
        assert rc in (Milter.ACCEPT, Milter.REJECT, Milter.TEMPFAIL, Milter.DISCARD, Milter.CONTINUE)
        assert took <= TIME_BOUND_S * 2, f"{name}: {took:.2f} s"  # includes feeding 50 MB in 8 KiB chunks
        added = ctx.added()
        assert added.get("X-Atlas-Verdict") in ("spam", "ham", "unsure", None)
        assert engine.buffered == 0  # the buffer budget was given back
        for _, field, value in (c for c in ctx.changes if c[0] == "add"):
            assert "\r" not in value and "\n" not in value, (field, value)
    finally:
        engine.close()


def test_classify_cli_json(tmp_path):
    """`python -m atlas_milter classify --json DIR` over a few crafted files: exit 0, one JSON line each."""
    src = tmp_path / "mail"
    src.mkdir()
    for name in SMALL:
        (src / f"{name}.eml").write_bytes(CRAFTED[name]())
    env = {**os.environ, "ENABLE_PARALLEL": "false", "PYTHONPATH": str(REPO)}
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[store]\ndb = "{tmp_path / "cli.db"}"\n[statsd]\nenabled = false\n')
    proc = subprocess.run(
        [sys.executable, "-m", "atlas_milter", "classify", "--config", str(cfg), "--json", str(src)],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert sorted(Path(obj["path"]).stem for obj in lines) == sorted(SMALL)
    for obj in lines:
        assert 0.0 <= obj["score"] <= 1.0


def test_deep_nesting_in_a_small_thread_stack(tmp_path):
    """The email package recurses once per nesting level (through C frames: generators
    delegating with `yield from`). The parser catches RecursionError, but in a thread the
    C stack must also hold out: libmilter starts its threads with the glibc default stack
    (RLIMIT_STACK, 8 MiB); 1 MiB is checked here with margin (256 KiB would crash)."""
    script = tmp_path / "deep.py"
    script.write_text(
        "import sys, threading\n"
        f"sys.path.insert(0, {str(REPO)!r})  # the checkout, whose tests package holds the crafted inputs\n"
        "import tests.test_hostile_input as h\n"
        "from atlas_milter.message import parse_message\n"
        "threading.stack_size(1024 * 1024)\n"
        "out = []\n"
        "def run():\n"
        "    for name in ('nested_1000', 'nested_rfc822_1000', 'boundary_storm'):\n"
        "        out.append(parse_message(h.CRAFTED[name]()).size)\n"
        "t = threading.Thread(target=run); t.start(); t.join()\n"
        "assert len(out) == 3, out\n"
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
