"""The loop transport's packet framing (adapters/milter/wire.py): the compiled splitter
against its reference on hypothesis-made packet streams, and a session fed through the
gathered header runs against the same session fed packet by packet (the message bytes the
milter classifies, the forged verdict headers it will delete, the macros and the replies),
on made-up headers, at the size cap, over the memory budget, and on every message of the
spamassassin and modern corpora."""

from __future__ import annotations

import struct

import Milter
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from atlas_milter.adapters import milter as am
from atlas_milter.adapters.milter import wire
from atlas_milter.adapters.milter.loop import FORGED_PREFIXES_BYTES, MAX_PACKET, ProtocolError, Session, packet
from tests.support.corpus import load_corpus, read_index
from tests.support.requirements import _unavailable
from tests.test_milter_adapter import make_engine

PREFIXES = FORGED_PREFIXES_BYTES
ALL_PROTOCOL = 0x1FFFFF  # what Postfix 3.7 offers: every no-reply step


@pytest.fixture(scope="module")
def compiled_split():
    if wire._hotpath is None:
        _unavailable("the compiled extension atlas_milter._hotpath is not built (pip install . with a C compiler)",
                     require_env="ATLAS_REQUIRE_COMPILED")
    return wire._hotpath.split_commands


# --- the splitter ---------------------------------------------------------------------------
names = st.sampled_from([b"Subject", b"X-Spam-Flag", b"x-atlas-verdict", b"X-SPAM-Status", b"X-Spa", b"Received",
                         b"", b"\xc0-Spam-x", b"X-Atlas-"])
values = st.binary(max_size=40) | st.sampled_from([b"a\nb", b"a\r\nb", b"a\r\r\nb", b"\r", b"\n", b"x\n\tfolded\r\n y"])
header_packets = st.builds(lambda n, v: (b"L", n.replace(b"\0", b"") + b"\0" + v.replace(b"\0", b"") + b"\0"),
                           names, values)
odd_headers = st.builds(lambda d: (b"L", d), st.binary(max_size=12))  # any number of NULs
macro_packets = st.builds(lambda stage, body: (b"D", stage + body), st.sampled_from([b"L", b"E", b"T", b""]),
                          st.binary(max_size=16))
other_packets = st.tuples(st.sampled_from([b"B", b"M", b"R", b"T", b"N", b"A", b"K", b"O", b"E", b"Q"]),
                          st.binary(max_size=20))
streams = st.lists(header_packets | odd_headers | macro_packets | other_packets, max_size=30)


@settings(max_examples=400, deadline=None)
@given(streams, st.integers(min_value=0, max_value=6), st.sampled_from([None, 0, 2**30]))
def test_the_compiled_splitter_gives_what_the_reference_gives(compiled_split, stream, cut, bad_length):
    data = b"".join(packet(cmd, body) for cmd, body in stream)
    if bad_length is not None:  # a packet header the loop must refuse
        data += struct.pack(">I", bad_length) + b"L"
    data = data[: max(0, len(data) - cut)]  # a packet not complete yet stays in the buffer
    for buf in (data, bytearray(data)):
        assert compiled_split(buf, MAX_PACKET, PREFIXES) == wire.split_commands_reference(buf, MAX_PACKET, PREFIXES)


def test_a_header_run_is_one_item_with_its_lines_forged_names_and_last_macros():
    data = (packet(b"D", b"L") + packet(b"L", b"Subject\0hi\nthere\0")
            + packet(b"D", b"L{x}\0y\0") + packet(b"L", b"X-Spam-Flag\0YES\0")
            + packet(b"B", b"body") + packet(b"E") + packet(b"Q"))
    consumed, items, bad = wire.split_commands_reference(data, MAX_PACKET, PREFIXES)
    assert bad == -1 and consumed == len(data) - len(packet(b"Q"))  # stops after end of message
    run, block, forged, macros = items[0][1:]
    assert items[0][0] == wire.HEADER_RUN and list(wire.packets(run))[1] == (b"L", b"Subject\0hi\nthere\0")
    assert block == b"Subject: hi\r\nthere\r\nX-Spam-Flag: YES\r\n"
    assert forged == [b"X-Spam-Flag"] and macros == b"{x}\0y\0"
    assert items[1:] == [(b"B", b"body"), (b"E", b"")]


def test_a_packet_of_a_bad_length_ends_the_connection(compiled_split):
    for split in (compiled_split, wire.split_commands_reference):
        session = Session(None, lambda: Milter.Base(), split)
        session.inbuf += packet(b"D", b"L") + struct.pack(">I", MAX_PACKET + 1) + b"L"
        with pytest.raises(ProtocolError, match=f"packet of {MAX_PACKET + 1} bytes"):
            session.commands()


# --- a session through the runs against the same session packet by packet -----------------
def content_packets(raw: bytes) -> bytes:
    """The header and body packets Postfix sends for `raw` (a macro packet before each)."""
    head, _, body = raw.replace(b"\r\n", b"\n").partition(b"\n\n")
    headers: list[bytes] = []
    for line in head.split(b"\n"):
        if line[:1] in (b" ", b"\t") and headers:
            headers[-1] += b"\n" + line
        elif line:
            headers.append(line)
    out = []
    for header in headers:
        name, _, value = header.partition(b":")
        out.append(packet(b"D", b"L") + packet(b"L", name.replace(b"\0", b"") + b"\0" + value.lstrip().replace(b"\0", b"") + b"\0"))
    body = body.replace(b"\n", b"\r\n")
    out += [packet(b"B", body[i:i + 65535]) for i in range(0, len(body), 65535)]
    return b"".join(out)


class Run:
    """One session of the loop transport with a real AtlasMilter, driven like loop._run()."""

    def __init__(self, engine, split, gathered: bool, protocol: int = ALL_PROTOCOL) -> None:
        self.session = Session(None, lambda: am.AtlasMilter(engine), split)
        self.gathered = gathered
        self.session.negotiate(struct.pack(">III", 6, 0x1FF, protocol))

    def feed(self, data: bytes) -> bytes:
        session = self.session
        session.inbuf += data
        out = []
        for item in session.commands():
            if item[0] == wire.HEADER_RUN:
                if self.gathered:
                    out.append(session.header_run(*item[1:]))
                else:  # what the loop did before the runs: every packet through command()
                    out += [session.command(cmd, data) for cmd, data in wire.packets(item[1])]
            else:
                out.append(session.command(*item))
        return b"".join(out)

    def message(self, raw: bytes, chunk: int = 0) -> tuple:
        """Envelope and content (in pieces of `chunk` bytes, as reads split them); what the
        milter holds at end of message."""
        replies = self.feed(packet(b"M", b"<a@remote.test>\0") + packet(b"R", b"<u@example.test>\0") + packet(b"T"))
        data = content_packets(raw)
        for start in range(0, len(data), chunk or len(data) or 1):
            replies += self.feed(data[start:start + (chunk or len(data))])
        m = self.session.milter
        state = (m._raw(), list(m.forged), m.truncated, m.over_budget, self.session.ctx.macros.get(b"L"), replies)
        m._reset()
        return state


HEADERS = (b"Received: from a\n\tby b\nSubject: caf\xc3\xa9 \r\n  folded\nX-Spam-Flag: YES\nx-spam-flag: NO\n"
           b"X-Atlas-Verdict: ham\nX-Spam-Status: Yes\nFrom: <a@b.c>\n\nbody\nline\n")


@pytest.mark.parametrize("chunk", [0, 1, 7, 50])
def test_gathered_headers_give_the_milter_what_packets_one_by_one_give(compiled_split, tmp_path, chunk):
    engine = make_engine(tmp_path)
    try:
        for split in (compiled_split, wire.split_commands_reference):
            gathered = Run(engine, split, True).message(HEADERS, chunk)
            assert gathered == Run(engine, split, False).message(HEADERS, chunk)
            raw, forged = gathered[:2]
            assert raw.startswith(b"Received: from a\r\n\tby b\r\nSubject: caf\xc3\xa9 \r\n  folded\r\n")
            assert forged == [("X-Spam-Flag", 1), ("x-spam-flag", 2), ("X-Atlas-Verdict", 1), ("X-Spam-Status", 1)]
        assert engine.buffered == 0
    finally:
        engine.close()


def test_at_the_size_cap_the_headers_are_cut_where_they_were(compiled_split, tmp_path):
    engine = make_engine(tmp_path)
    engine.max_bytes = 120
    try:
        for size in (40, 90, 119, 120, 121, 200):
            engine.max_bytes = size
            gathered = Run(engine, compiled_split, True).message(HEADERS)
            assert gathered == Run(engine, compiled_split, False).message(HEADERS)
            assert len(gathered[0]) <= size and gathered[2] == (size < len(HEADERS) + 20)
    finally:
        engine.close()


def test_over_the_memory_budget_the_headers_go_one_by_one(compiled_split, tmp_path):
    engine = make_engine(tmp_path)
    try:
        budget = engine.reserve  # room for two headers' worth of bytes, then nothing
        room = [60]

        def reserve(n: int) -> bool:
            if n > room[0]:
                return False
            room[0] -= n
            return budget(n)

        engine.reserve = reserve
        gathered = Run(engine, compiled_split, True).message(HEADERS)
        room[0] = 60
        assert gathered == Run(engine, compiled_split, False).message(HEADERS)
        assert gathered[3] and gathered[2]  # over budget, truncated
    finally:
        engine.close()


def test_an_mta_that_wants_a_reply_per_header_gets_one(compiled_split, tmp_path):
    engine = make_engine(tmp_path)
    try:
        protocol = ALL_PROTOCOL & ~Milter.P_NR_HDR
        gathered = Run(engine, compiled_split, True, protocol).message(HEADERS)
        assert gathered == Run(engine, compiled_split, False, protocol).message(HEADERS)
        assert gathered[-1].count(packet(b"c")) == 7 + 1 + 1  # the headers, DATA and the body chunk
    finally:
        engine.close()


def test_every_corpus_message_reaches_the_milter_the_same(compiled_split, tmp_path, corpus_dir):
    engine = make_engine(tmp_path)
    try:
        n = 0
        for folder in (corpus_dir, corpus_dir.parent / "modern"):
            for _, raw in load_corpus(folder, read_index(folder)):
                assert Run(engine, compiled_split, True).message(raw) == Run(engine, compiled_split, False).message(raw)
                n += 1
        assert n > 6000
    finally:
        engine.close()
