"""Owns the framing of the milter protocol for the loop transport (loop.py): splitting a
connection's buffer into whole packets, with each run of header packets gathered into one
item so that a message's ~25 headers (and the macro packet Postfix sends before each) cost
one call instead of ~50.

`split_commands_reference` is the definition and the fallback; `_hotpath.split_commands` is
the same compiled (tests/test_milter_wire.py keeps them equal), used where the extension is
built and ENABLE_COMPILED is on.

Must not: interpret a packet beyond its framing, the header packets' two strings and the
macro packets' stage (the session does that), or consume a packet that is not complete.
"""

from __future__ import annotations

from typing import Callable, Iterator

try:
    from atlas_milter import _hotpath
except ImportError:  # not built: the reference below serves
    _hotpath = None

HEADER_RUN = b"*"  # the command of a gathered run of header packets (no milter command uses it)

# (bytes consumed, items, the bad packet length that ends the connection or -1). An item is
# (cmd, data), or (HEADER_RUN, the run's packets, the headers as "Name: value\r\n" lines,
# the names starting with one of the prefixes, the last macro packet's strings or None).
Split = tuple[int, list[tuple], int]


def _is_header_packet(cmd: bytes, data: bytes) -> bool:
    """A header ('L' with exactly its two NUL-terminated strings) or a macro packet for the
    header stage ('D' whose stage byte is 'L'): what Postfix sends for every header."""
    if cmd == b"D":
        return data[:1] == b"L"
    return cmd == b"L" and data.count(b"\0") == 2


def header_line(name: bytes, value: bytes) -> bytes:
    """One header as the message holds it: folded values arrive with bare LF, mail wants CRLF."""
    return name + b": " + value.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") + b"\r\n"


def split_commands_reference(buf: bytes | bytearray, max_packet: int, prefixes: tuple[bytes, ...]) -> Split:
    """The whole packets waiting in `buf`, up to and including an end of message ('E') or
    quit ('Q'). `prefixes`: lowercase ASCII name prefixes whose headers are listed (the
    verdict headers a sender may have forged)."""
    items: list[tuple] = []
    pos, end = 0, len(buf)
    run_start = -1
    lines: list[bytes] = []
    forged: list[bytes] = []
    macros: bytes | None = None

    def close_run(stop: int) -> None:
        items.append((HEADER_RUN, bytes(buf[run_start:stop]), b"".join(lines), forged, macros))

    while end - pos >= 4:
        length = int.from_bytes(buf[pos:pos + 4], "big")
        if length < 1 or length > max_packet:
            return pos, items, length
        if end - pos - 4 < length:
            break
        cmd = bytes(buf[pos + 4:pos + 5])
        data = bytes(buf[pos + 5:pos + 4 + length])
        if _is_header_packet(cmd, data):
            if run_start < 0:
                run_start, lines, forged, macros = pos, [], [], None
            if cmd == b"D":
                macros = data[1:]
            else:
                name, value = data.split(b"\0")[:2]
                lines.append(header_line(name, value))
                if name.lower().startswith(prefixes):
                    forged.append(name)
        else:
            if run_start >= 0:
                close_run(pos)
                run_start = -1
            items.append((cmd, data))
        pos += 4 + length
        if cmd in (b"E", b"Q"):
            break
    if run_start >= 0:
        close_run(pos)
    return pos, items, -1


def packets(run: bytes) -> Iterator[tuple[bytes, bytes]]:
    """(cmd, data) of each packet of a gathered run, to handle them one by one."""
    pos = 0
    while pos < len(run):
        length = int.from_bytes(run[pos:pos + 4], "big")
        yield run[pos + 4:pos + 5], run[pos + 5:pos + 4 + length]
        pos += 4 + length


def splitter(compiled: bool) -> Callable[[bytes | bytearray, int, tuple[bytes, ...]], Split]:
    return _hotpath.split_commands if compiled and _hotpath is not None else split_commands_reference
