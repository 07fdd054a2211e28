"""Owns how the daemons and the CLI treat POSIX signals: the names of the signals they
use, blocking them around thread starts (a thread inherits the mask of the thread that
starts it, so a blocked signal can only reach the thread that waits for it) and
installing handlers. Knows nothing of what a stop or a reload does."""

from __future__ import annotations

import contextlib
import signal
from typing import Any, Callable, Iterable, Iterator

STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})  # stop (libmilter's sigwait thread has SIGHUP so)
RELOAD_SIGNAL = signal.SIGUSR1  # not SIGHUP: libmilter takes that as "stop" (as OpenDKIM does)
# The milter's: stop as SIGTERM does, without libmilter's wait of up to 5 s for its listener
# to notice (systemd/atlas-milter.service sends it: KillSignal=SIGUSR2).
FAST_STOP_SIGNAL = signal.SIGUSR2


def block(signals: Iterable[int]) -> set[int]:
    """Block `signals` in the calling thread and every thread it starts from now on;
    returns the previous mask (for `restore`)."""
    return signal.pthread_sigmask(signal.SIG_BLOCK, set(signals))


def restore(mask: Iterable[int]) -> None:
    """Put back a mask returned by `block`."""
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)


@contextlib.contextmanager
def blocked(signals: Iterable[int]) -> Iterator[None]:
    """`signals` blocked in this thread for the block (threads started inside keep them
    blocked), the previous mask restored after it."""
    old = block(signals)
    try:
        yield
    finally:
        restore(old)


def handle(signals: Iterable[int], handler: Callable[[int, Any], Any]) -> None:
    """Run `handler(signum, frame)` in the main thread when one of `signals` arrives."""
    for signum in signals:
        signal.signal(signum, handler)
