import logging
import threading

import pytest

from atlas_milter.pool import ParallelEmailProcessor
from atlas_milter.stream import (
    SKIPPED,
    StreamingEmailProcessor,
    StreamStats,
    current_rss_mb,
    peak_rss_mb,
)


class FakeSource:
    """Generates synthetic messages lazily and records how far ahead of `fn` it is read."""

    def __init__(self, n: int = 1000) -> None:
        self.n = n
        self.yielded = 0
        self.handled = 0
        self.max_ahead = 0  # yielded but not yet handled by fn
        self.folders: list[str] = []
        self._lock = threading.Lock()

    def iter_messages(self, folder: str):
        self.folders.append(folder)
        for i in range(self.n):
            raw = f"From: s{i}@example.org\r\nSubject: message {i}\r\n\r\n{'body ' * 50}\r\n".encode()
            with self._lock:
                self.yielded += 1
                self.max_ahead = max(self.max_ahead, self.yielded - self.handled)
            yield f"{folder}/{i}", raw

    def handled_one(self) -> None:
        with self._lock:
            self.handled += 1


def classify(source: FakeSource):
    def fn(item):
        key, raw = item
        source.handled_one()
        index = int(key.rsplit("/", 1)[1])
        assert raw.startswith(f"From: s{index}@".encode())
        if index % 10 == 0:
            return SKIPPED
        if index % 25 == 1:
            raise ValueError("unparseable")
        return len(raw)

    return fn


def _count_bytes(item):  # top-level so a process pool can use it
    key, raw = item
    if key.endswith("/13"):
        raise ValueError("bad")
    return SKIPPED if key.endswith("0") else len(raw)


def test_counts_and_incremental_reading(caplog):
    source = FakeSource(1000)
    streamer = StreamingEmailProcessor(chunk_size=64, memory_limit_mb=100_000)
    with caplog.at_level(logging.WARNING, logger="atlas_milter.stream"):
        stats = streamer.process_email_stream(source, "INBOX", classify(source))
    assert source.folders == ["INBOX"]
    assert stats.skipped == 100
    assert stats.errors == 40
    assert stats.processed == 1000 - 100 - 40
    assert stats.total == 1000
    assert stats.chunks == 16  # ceil(1000 / 64)
    assert stats.final_chunk_size == 64
    assert stats.elapsed > 0
    assert stats.peak_memory_mb >= current_rss_mb() * 0.5
    assert source.max_ahead <= 64  # never more than one chunk read ahead of fn
    error_lines = [r.getMessage() for r in caplog.records]
    assert len(error_lines) == 40
    assert error_lines[0] == "stream: INBOX/1: ValueError: unparseable"


def test_tiny_memory_limit_shrinks_chunks_to_one():
    source = FakeSource(200)
    progress: list[StreamStats] = []
    streamer = StreamingEmailProcessor(chunk_size=32, memory_limit_mb=1)
    stats = streamer.process_email_stream(source, "INBOX", classify(source), on_chunk=progress.append)
    assert stats.total == 200
    assert stats.final_chunk_size == 1
    sizes = [b.total - a.total for a, b in zip([StreamStats()] + progress, progress)]
    assert sizes[:6] == [32, 16, 8, 4, 2, 1]
    assert set(sizes[6:]) == {1}
    assert stats.chunks == len(progress) == 6 + (200 - 63)
    assert source.max_ahead <= 32


def test_chunk_grows_back_when_memory_falls():
    readings = iter([90.0, 90.0, 90.0, 60.0, 10.0, 10.0, 10.0] + [10.0] * 100)
    source = FakeSource(300)
    progress: list[StreamStats] = []
    streamer = StreamingEmailProcessor(chunk_size=40, memory_limit_mb=100, rss_probe=lambda: next(readings))
    stats = streamer.process_email_stream(source, "x", classify(source), on_chunk=progress.append)
    sizes = [b.total - a.total for a, b in zip([StreamStats()] + progress, progress)]
    # 90 > 80: halve; 60 is between 50 and 80: keep; 10 < 50: double, up to chunk_size.
    assert sizes[:7] == [40, 20, 10, 5, 5, 10, 20]
    assert set(sizes[7:-1]) == {40}
    assert stats.total == 300
    assert stats.peak_memory_mb >= 90.0


def test_on_chunk_gets_snapshots():
    source = FakeSource(10)
    progress: list[StreamStats] = []
    StreamingEmailProcessor(chunk_size=4, memory_limit_mb=100_000).process_email_stream(
        source, "x", classify(source), on_chunk=progress.append
    )
    assert [p.total for p in progress] == [4, 8, 10]
    assert [p.chunks for p in progress] == [1, 2, 3]


def test_empty_source():
    stats = StreamingEmailProcessor().process_email_stream(FakeSource(0), "x", lambda item: None)
    assert (stats.total, stats.chunks) == (0, 0)


def test_with_a_thread_pool():
    source = FakeSource(300)
    with ParallelEmailProcessor(worker_count=3, use_processes=False) as pool:
        streamer = StreamingEmailProcessor(chunk_size=50, memory_limit_mb=100_000, pool=pool)
        stats = streamer.process_email_stream(source, "INBOX", classify(source))
    assert (stats.processed, stats.skipped, stats.errors) == (300 - 30 - 12, 30, 12)
    assert source.max_ahead <= 50


def test_with_a_process_pool_skipped_survives_pickling(caplog):
    with ParallelEmailProcessor(worker_count=2) as pool:
        streamer = StreamingEmailProcessor(chunk_size=20, memory_limit_mb=100_000, pool=pool)
        with caplog.at_level(logging.WARNING, logger="atlas_milter.stream"):
            stats = streamer.process_email_stream(FakeSource(50), "box", _count_bytes)
    assert (stats.processed, stats.skipped, stats.errors) == (50 - 5 - 1, 5, 1)
    assert [r.getMessage() for r in caplog.records] == ["stream: box/13: ValueError: bad"]


def test_memory_probes():
    rss = current_rss_mb()
    assert 1 < rss < 100_000
    assert peak_rss_mb() >= rss * 0.9


def test_rejects_bad_settings():
    with pytest.raises(ValueError):
        StreamingEmailProcessor(chunk_size=0)
    with pytest.raises(ValueError):
        StreamingEmailProcessor(memory_limit_mb=0)
