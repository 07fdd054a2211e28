"""Owns streaming over a mail source: `StreamingEmailProcessor` walks a lazy source in
chunks, so backfilling a mailbox of any size holds at most one chunk of raw messages,
and shrinks the chunk when the process's resident memory nears its limit. Also the
memory probes `current_rss_mb()` / `peak_rss_mb()` (from /proc and getrusage, no psutil).

Must not: read mail itself (the source does), keep results (the caller's `fn` collects
what it needs, e.g. by enqueueing to the store), or stop on one bad message.

The function contract is the same with and without a pool: `fn(item)` gets one
`(key, raw_bytes)` tuple and returns anything; returning `SKIPPED` counts the message
as skipped, raising counts it as an error (one log line naming the key). With a
process pool, `fn` must be a picklable top-level function (see `atlas_milter.pool`).
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import logging
import os
import resource
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol

from atlas_milter.pool import ItemError, ParallelEmailProcessor

log = logging.getLogger(__name__)

Item = tuple[str, bytes]

SHRINK_ABOVE = 0.8  # of memory_limit_mb: halve the chunk
GROW_BELOW = 0.5  # of memory_limit_mb: double it again, up to chunk_size


class _Sentinel(enum.Enum):
    SKIPPED = "skipped"  # an enum member pickles by name, so it survives a worker process


SKIPPED = _Sentinel.SKIPPED


class MessageSource(Protocol):
    def iter_messages(self, folder: str) -> Iterator[Item]: ...


@dataclass
class StreamStats:
    processed: int = 0  # fn returned normally
    skipped: int = 0  # fn returned SKIPPED
    errors: int = 0  # fn raised
    elapsed: float = 0.0  # seconds
    peak_memory_mb: float = 0.0
    chunks: int = 0
    final_chunk_size: int = 0

    @property
    def total(self) -> int:
        return self.processed + self.skipped + self.errors


def current_rss_mb() -> float:
    """Resident memory of this process now, in MiB (Linux /proc; elsewhere the peak)."""
    try:
        with open("/proc/self/statm", "rb") as fh:
            resident_pages = int(fh.read().split()[1])
    except (OSError, IndexError, ValueError):
        return peak_rss_mb()
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """The highest resident memory this process has had, in MiB. Linux: VmHWM of this
    program's memory; getrusage's ru_maxrss is kept across exec(), so a process started by
    a big parent would report the parent's peak."""
    try:
        with open("/proc/self/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except (OSError, IndexError, ValueError):
        pass
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024  # bytes on macOS, KiB on Linux


class StreamingEmailProcessor:
    """Runs `fn` over a source in chunks of at most `chunk_size` messages, adapting the
    chunk to `memory_limit_mb`. With `pool`, each chunk is spread over its workers."""

    def __init__(
        self,
        chunk_size: int = 100,
        memory_limit_mb: float = 500,
        pool: ParallelEmailProcessor | None = None,
        rss_probe: Callable[[], float] = current_rss_mb,
    ) -> None:
        if chunk_size < 1:
            raise ValueError("chunk_size must be at least 1")
        if memory_limit_mb <= 0:
            raise ValueError("memory_limit_mb must be positive")
        self.chunk_size = chunk_size
        self.memory_limit_mb = memory_limit_mb
        self.pool = pool
        self._rss_probe = rss_probe

    def process_email_stream(
        self,
        source: MessageSource,
        folder: str,
        fn: Callable[[Item], Any] | None,
        on_chunk: Callable[[StreamStats], None] | None = None,
        batch_fn: Callable[[list[Item]], list[Any]] | None = None,
    ) -> StreamStats:
        """Call `fn((key, raw))` for every message of `folder`; return the counts.
        With `batch_fn`, each whole chunk goes to `batch_fn(chunk)` instead, which returns
        one result per item (so a caller can share work across a chunk, e.g. a cache)."""
        stats = StreamStats(final_chunk_size=self.chunk_size)
        started = time.monotonic()
        messages = source.iter_messages(folder)
        size = self.chunk_size
        while chunk := list(itertools.islice(messages, size)):
            self._process_chunk(chunk, fn, stats, batch_fn)
            del chunk  # drop the raw messages before the next chunk is read
            rss = self._rss_probe()
            size = self._next_size(size, rss)
            stats.chunks += 1
            stats.final_chunk_size = size
            stats.peak_memory_mb = max(stats.peak_memory_mb, rss)
            stats.elapsed = time.monotonic() - started
            if on_chunk is not None:
                on_chunk(dataclasses.replace(stats))
        stats.peak_memory_mb = max(stats.peak_memory_mb, peak_rss_mb())
        stats.elapsed = time.monotonic() - started
        return stats

    def _process_chunk(
        self,
        chunk: list[Item],
        fn: Callable[[Item], Any] | None,
        stats: StreamStats,
        batch_fn: Callable[[list[Item]], list[Any]] | None = None,
    ) -> None:
        if batch_fn is not None:
            results = batch_fn(chunk)
        elif self.pool is not None:
            results = self.pool.process_emails_parallel(chunk, fn, batch_size=len(chunk))
        else:
            results = [self._call(fn, i, item) for i, item in enumerate(chunk)]
        for result in results:
            if isinstance(result, ItemError):
                stats.errors += 1
                log.warning("stream: %s: %s", chunk[result.index][0], result.error)
            elif result is SKIPPED:
                stats.skipped += 1
            else:
                stats.processed += 1

    @staticmethod
    def _call(fn: Callable[[Item], Any], index: int, item: Item) -> Any:
        try:
            return fn(item)
        except Exception as exc:
            return ItemError(index, f"{type(exc).__name__}: {exc}")

    def _next_size(self, size: int, rss_mb: float) -> int:
        if rss_mb > SHRINK_ABOVE * self.memory_limit_mb:
            return max(1, size // 2)
        if rss_mb < GROW_BELOW * self.memory_limit_mb:
            return min(self.chunk_size, size * 2)
        return size
