"""The milter front door: Postfix or Sendmail hand each message to `AtlasMilter`, which has
it classified through the core and answers with the reply the policy's Action maps to.
One file per concern:

    replies.py    header names, SMTP replies, sanitising, the Action -> reply table
    metrics.py    metric names and failure kinds
    engine.py     MilterEngine: shared state, slots, byte budget, deadline, reload
    handler.py    AtlasMilter: one connection's callbacks, end of message
    loop.py       the milter protocol spoken by atlas-milter itself (transport "loop")
    libmilter.py  everything touching libmilter's C side (pymilter's `milter`, ctypes)
    runtime.py    socket spec, signal mask, both transports, `serve()`

This package adapts a protocol; it decides nothing (thresholds and actions are
atlas_milter.policy's). The names below are its public API (the CLI, tests, scripts); the metric names are
in metrics.py."""

from atlas_milter.adapters.milter.engine import (
    BUSY_WAIT,
    ClassifyFailed,
    MilterEngine,
    MilterState,
    make_pipeline,
    restart_only_changes,
)
from atlas_milter.adapters.milter.handler import AtlasMilter
from atlas_milter.adapters.milter.libmilter import limit_malloc_arenas, set_nodelay_on_listener
from atlas_milter.adapters.milter.replies import (
    HDR_REASONS,
    HDR_SCORE,
    HDR_SPAM_FLAG,
    HDR_SPAM_STATUS,
    HDR_VERDICT,
    HEADER_VALUE_MAX,
    REPLIES,
    clean_header_value,
    clean_reply_text,
)
from atlas_milter.adapters.milter.runtime import MILTER_SIGNALS, SocketSpec, block_signals, parse_socket, serve

__all__ = [
    "BUSY_WAIT", "ClassifyFailed", "MilterEngine", "MilterState", "make_pipeline", "restart_only_changes",
    "AtlasMilter", "limit_malloc_arenas", "set_nodelay_on_listener",
    "HDR_REASONS", "HDR_SCORE", "HDR_SPAM_FLAG", "HDR_SPAM_STATUS", "HDR_VERDICT", "HEADER_VALUE_MAX", "REPLIES",
    "clean_header_value", "clean_reply_text",
    "MILTER_SIGNALS", "SocketSpec", "block_signals", "parse_socket", "serve",
]
