"""Owns how the daemons and the CLI treat POSIX signals: the names of the signals they
use, blocking them around thread starts (a thread inherits the mask of the thread that
starts it, so a blocked signal can only reach the thread that waits for it) and
installing handlers. Knows nothing of what a stop or a reload does."""

from __future__ import annotations

import contextlib
import signal
from typing import Any, Callable, Iterable, Iterator, Mapping

STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})  # stop (libmilter's sigwait thread has SIGHUP so)
RELOAD_SIGNAL = signal.SIGUSR1  # not SIGHUP: libmilter takes that as "stop" (as OpenDKIM does)
# The milter's: stop as SIGTERM does, without libmilter's wait of up to 5 s for its listener
# to notice (systemd/atlas-milter.service sends it: KillSignal=SIGUSR2).
FAST_STOP_SIGNAL = signal.SIGUSR2
INTERRUPT_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})  # what stops a command or the IMAP listener
# The IMAP listener has no libmilter: SIGHUP reloads its model there, as does the milter's SIGUSR1.
IDLE_RELOAD_SIGNALS = frozenset({signal.SIGHUP, RELOAD_SIGNAL})


def name(signum: int) -> str:
    """SIGTERM, SIGUSR1, ...: how logs and messages name a signal."""
    return signal.Signals(signum).name


def wait(signals: Iterable[int]) -> int:
    """Wait in this thread until one of `signals` (blocked in every thread) arrives; return it."""
    return signal.sigwait(set(signals))


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


def handle(signals: Iterable[int], handler: Callable[[int, Any], Any]) -> dict[int, Any]:
    """Run `handler(signum, frame)` in the main thread when one of `signals` arrives;
    returns the handlers it replaced (for `restore_handlers`)."""
    return {signum: signal.signal(signum, handler) for signum in signals}


def restore_handlers(previous: Mapping[int, Any]) -> None:
    """Put back the handlers `handle` returned."""
    for signum, handler in previous.items():
        signal.signal(signum, handler)
