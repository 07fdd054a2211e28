"""What every command shares: loading the config with command-line overrides, logging,
the Stopped exception a SIGTERM/SIGINT turns into, and small value helpers."""

from __future__ import annotations

import argparse
import logging
import math
import sys
from typing import Any

from atlas_milter import signals
from atlas_milter.errors import AtlasError

log = logging.getLogger("atlas_milter")


def _load_config(args: argparse.Namespace, **overrides: Any):
    from atlas_milter.config import load_config

    over = dict(overrides)
    if getattr(args, "model", None):
        over["classifier.model"] = args.model
    if getattr(args, "db", None):
        over["store.db"] = args.db
    if getattr(args, "statsd", None):
        host, _, port = args.statsd.rpartition(":")
        if not host or not port.isdigit():
            raise AtlasError(f"--statsd {args.statsd}: use HOST:PORT, e.g. 127.0.0.1:8125")
        over["statsd.host"], over["statsd.port"] = host, int(port)
    return load_config(args.config, over)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


class Stopped(Exception):
    """SIGTERM or SIGINT arrived: unwind through the commands' `finally` blocks, which
    close the pipeline and so flush every accepted verdict record to the database."""

    def __init__(self, signum: int) -> None:
        super().__init__(signals.name(signum))
        self.signum = signum


def _raise_stopped(signum: int, _frame: Any) -> None:
    raise Stopped(signum)


def _finite(value: float) -> float | None:
    return value if isinstance(value, float) and math.isfinite(value) else None
