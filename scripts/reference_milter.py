#!/usr/bin/env python3
"""The two reference milters of shared/docs/performance-notes.md, for calibrating
scripts/milter_bench.py: what any pymilter milter costs inside Postfix on this machine,
measured in the same run as atlas-milter.

    python -m scripts.reference_milter noop  unix:/tmp/ref.sock   # only eom, accepts
    python -m scripts.reference_milter parse unix:/tmp/ref.sock   # buffers the message, parses it
                                                                  # with compat32, adds one header

Not part of the product: a yardstick. Stops on SIGTERM (libmilter's signal thread).
"""

from __future__ import annotations

import email.parser
import email.policy
import os
import sys

import Milter


class NoopMilter(Milter.Base):
    """Every step but end-of-message negotiated away; accepts."""

    def eom(self) -> int:
        return Milter.ACCEPT


class ParseMilter(Milter.Base):
    """Collects headers and body (no replies until end of message), parses, tags."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    @Milter.noreply
    def envfrom(self, mailfrom: str, *params: str) -> int:
        self.parts = []
        return Milter.CONTINUE

    @Milter.noreply
    def header(self, name: str, value: str) -> int:
        self.parts.append(f"{name}: {value}\r\n".encode("utf-8", "surrogateescape"))
        return Milter.CONTINUE

    @Milter.noreply
    def eoh(self) -> int:
        self.parts.append(b"\r\n")
        return Milter.CONTINUE

    def body(self, chunk: bytes) -> int:
        self.parts.append(chunk)
        return Milter.CONTINUE

    def eom(self) -> int:
        msg = email.parser.BytesParser(policy=email.policy.compat32).parsebytes(b"".join(self.parts))
        self.addheader("X-Reference", "parsed %d parts" % len(list(msg.walk())))
        return Milter.ACCEPT


def main() -> int:
    kind, spec = sys.argv[1], sys.argv[2]
    Milter.factory = {"noop": NoopMilter, "parse": ParseMilter}[kind]
    Milter.set_flags(Milter.ADDHDRS)
    os.umask(0o111)  # the unix socket must be writable by Postfix's smtpd/cleanup (user postfix)
    print(f"reference milter {kind} listening on {spec}", flush=True)
    Milter.runmilter("reference", spec, 30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
