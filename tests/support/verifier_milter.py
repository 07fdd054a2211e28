#!/usr/bin/env python3
"""A stand-in for the admin's own verifier (OpenDKIM, OpenDMARC) in front of atlas-milter,
for tests/test_auth_results_postfix.py: at end of message it inserts one
Authentication-Results field at the top, as OpenDKIM does, with the results given on the
command line. Not part of the product.

    python tests/support/verifier_milter.py unix:/path.sock "mx.atlas.test; dmarc=fail header.from=x.example"

Stops on SIGTERM (libmilter's signal thread)."""

from __future__ import annotations

import os
import sys

import Milter


class Verifier(Milter.Base):
    results = ""

    def eom(self) -> int:
        self.addheader("Authentication-Results", self.results, 0)
        return Milter.CONTINUE


def main() -> None:
    spec, Verifier.results = sys.argv[1], sys.argv[2]
    Milter.factory = Verifier
    Milter.set_flags(Milter.ADDHDRS)
    os.umask(0)  # Postfix (another user) connects to the socket
    print("verifier milter listening on", spec, flush=True)
    Milter.runmilter("verifier", spec, 60)


if __name__ == "__main__":
    main()
