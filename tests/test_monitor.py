import logging
import re
import socket
import sys
import threading
import time

import pytest

from atlas_milter import monitor
from atlas_milter.config import Config, Features, StatsdConfig
from atlas_milter.monitor import (
    COUNTER_STATSD_ERRORS,
    PerformanceMetrics,
    configure_from_config,
    performance_monitor,
)


@pytest.fixture
def fake_statsd():
    """A plain UDP socket standing in for the StatsD daemon."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(2.0)
    yield sock
    sock.close()


def received_lines(sock: socket.socket, until: str) -> list[str]:
    """Read datagrams until a line matching `until` arrives (or the socket times out)."""
    lines: list[str] = []
    while not any(re.fullmatch(until, line) for line in lines):
        data, _ = sock.recvfrom(65536)
        lines.extend(data.decode("ascii").split("\n"))
    return lines


def test_percentiles_match_known_samples(metrics):
    for ms in range(100, 0, -1):  # 1..100 ms, recorded out of order
        metrics.record("parse", ms / 1000.0)
    stats = metrics.get_stats()["parse"]
    assert stats["count"] == 100
    assert stats["errors"] == 0
    assert stats["p50"] == pytest.approx(50.0)
    assert stats["p95"] == pytest.approx(95.0)
    assert stats["p99"] == pytest.approx(99.0)
    assert stats["max"] == pytest.approx(100.0)
    assert stats["mean"] == pytest.approx(50.5)
    assert stats["rate"] > 0


def test_percentiles_use_only_the_recent_window():
    m = PerformanceMetrics(window=10)
    for _ in range(1000):
        m.record("classify", 1.0)  # old, slow samples fall out of the window
    for _ in range(10):
        m.record("classify", 0.001)
    stats = m.get_stats()["classify"]
    assert stats["count"] == 1010
    assert stats["p99"] == pytest.approx(1.0)
    assert stats["max"] == pytest.approx(1000.0)  # max is since start, not windowed


def test_context_manager_times_and_counts_errors(metrics):
    with performance_monitor("store.flush"):
        time.sleep(0.002)
    with pytest.raises(ValueError):
        with performance_monitor("store.flush"):
            raise ValueError("boom")
    stats = metrics.get_stats()["store.flush"]
    assert stats["count"] == 2
    assert stats["errors"] == 1
    assert stats["max"] >= 2.0


def test_decorator_times_returns_and_reraises(metrics):
    @performance_monitor("parse")
    def parse(x: int) -> int:
        if x < 0:
            raise KeyError(x)
        return x * 2

    assert parse(21) == 42
    with pytest.raises(KeyError):
        parse(-1)
    assert parse.__name__ == "parse"
    stats = metrics.get_stats()["parse"]
    assert (stats["count"], stats["errors"]) == (2, 1)


def test_disabled_records_nothing(metrics):
    PerformanceMetrics.get_instance().configure(enabled=False)

    @performance_monitor("parse")
    def parse() -> str:
        return "ok"

    assert parse() == "ok"
    with performance_monitor("classify"):
        pass
    metrics.record("store.flush", 0.001)
    metrics.incr("cache.hit")
    metrics.set_gauge("pool.in_flight", 3)
    assert metrics.get_stats() == {}
    assert metrics.get_counters() == {}
    assert metrics.get_gauges() == {}


def test_counters_gauges_and_reset(metrics):
    metrics.incr("cache.hit")
    metrics.incr("cache.hit", 4)
    metrics.set_gauge("store.queue_depth", 7)
    metrics.set_gauge("store.queue_depth", 3)
    metrics.record("parse", 0.001)
    assert metrics.get_counters() == {"cache.hit": 5}
    assert metrics.get_gauges() == {"store.queue_depth": 3}
    metrics.reset()
    assert metrics.get_stats() == {} and metrics.get_counters() == {} and metrics.get_gauges() == {}
    assert metrics.uptime() < 5


def test_statsd_receives_timers_counters_gauges(metrics, fake_statsd):
    port = fake_statsd.getsockname()[1]
    PerformanceMetrics.get_instance().configure(enabled=True, statsd_host="127.0.0.1", statsd_port=port, flush_interval=60)
    metrics.record("parse", 0.00123)
    metrics.record("parse", 0.002)
    metrics.incr(monitor.verdict_counter("spam"), 3)
    metrics.set_gauge("pool.in_flight", 2)
    metrics.flush()
    lines = received_lines(fake_statsd, r"atlas\.pool\.in_flight:2\|g")
    timers = [float(m.group(1)) for line in lines if (m := re.fullmatch(r"atlas\.parse:([\d.]+)\|ms", line))]
    assert timers == [pytest.approx(1.23), pytest.approx(2.0)]
    assert "atlas.verdict.spam:3|c" in lines
    # Many metrics share a datagram: two timers, a counter and a gauge came in one read.
    assert len(lines) == 4


def test_flusher_thread_sends_without_explicit_flush(metrics, fake_statsd):
    port = fake_statsd.getsockname()[1]
    PerformanceMetrics.get_instance().configure(enabled=True, statsd_host="127.0.0.1", statsd_port=port, prefix="t", flush_interval=0.02)
    metrics.incr("cache.miss")
    assert "t.cache.miss:1|c" in received_lines(fake_statsd, r"t\.cache\.miss:1\|c")


def test_shutdown_flushes_what_is_left(metrics, fake_statsd):
    port = fake_statsd.getsockname()[1]
    PerformanceMetrics.get_instance().configure(enabled=True, statsd_host="127.0.0.1", statsd_port=port, flush_interval=60)
    with performance_monitor("total"):
        pass
    metrics.shutdown()
    assert any(line.startswith("atlas.total:") for line in received_lines(fake_statsd, r"atlas\.total:.*\|ms"))


def test_no_statsd_server_listening_is_not_an_error(metrics, fake_statsd):
    port = fake_statsd.getsockname()[1]
    fake_statsd.close()  # nothing listens on the port now
    PerformanceMetrics.get_instance().configure(enabled=True, statsd_host="127.0.0.1", statsd_port=port, flush_interval=60)
    metrics.record("parse", 0.001)
    metrics.flush()
    metrics.record("parse", 0.001)
    metrics.flush()
    assert metrics.get_stats()["parse"]["count"] == 2


def test_unresolvable_host_warns_once_and_disables_statsd(metrics, caplog):
    with caplog.at_level(logging.WARNING, logger="atlas_milter.monitor"):
        PerformanceMetrics.get_instance().configure(enabled=True, statsd_host="statsd.invalid", statsd_port=8125)
    assert len(caplog.records) == 1
    assert "statsd.invalid" in caplog.records[0].getMessage()
    metrics.record("parse", 0.001)  # in-memory metrics still work
    metrics.flush()
    assert metrics.get_stats()["parse"]["count"] == 1


def test_send_error_is_counted_not_raised(metrics):
    # Sending to the broadcast address without SO_BROADCAST fails with EACCES.
    PerformanceMetrics.get_instance().configure(enabled=True, statsd_host="255.255.255.255", statsd_port=8125, flush_interval=60)
    metrics.record("parse", 0.001)
    metrics.flush()
    assert metrics.get_counters()[COUNTER_STATSD_ERRORS] >= 1


@pytest.fixture
def frequent_thread_switches():
    """Switch threads every microsecond so that a missing lock shows up as lost counts."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(old)


def test_many_threads_recording_add_up(metrics, fake_statsd, frequent_thread_switches):
    port = fake_statsd.getsockname()[1]
    PerformanceMetrics.get_instance().configure(enabled=True, statsd_host="127.0.0.1", statsd_port=port, flush_interval=0.005)
    threads_n, per_thread = 8, 2000
    start = threading.Barrier(threads_n)

    def work() -> None:
        start.wait()
        for _ in range(per_thread):
            with performance_monitor("classify"):
                pass
            metrics.incr("cache.hit")

    threads = [threading.Thread(target=work) for _ in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert metrics.get_stats()["classify"]["count"] == threads_n * per_thread
    assert metrics.get_counters()["cache.hit"] == threads_n * per_thread


def test_configure_from_config(metrics, fake_statsd):
    port = fake_statsd.getsockname()[1]
    cfg = Config(statsd=StatsdConfig(host="127.0.0.1", port=port, prefix="cfg"))
    configure_from_config(cfg)
    metrics.incr("cache.hit")
    metrics.flush()
    assert "cfg.cache.hit:1|c" in received_lines(fake_statsd, r"cfg\.cache\.hit:1\|c")

    configure_from_config(Config(features=Features(monitoring=False)))
    metrics.incr("cache.hit")
    assert metrics.get_counters() == {"cache.hit": 1}


def test_configure_from_config_statsd_disabled(metrics, fake_statsd):
    port = fake_statsd.getsockname()[1]
    configure_from_config(Config(statsd=StatsdConfig(enabled=False, port=port)))
    metrics.incr("cache.hit")
    metrics.flush()
    fake_statsd.settimeout(0.05)
    with pytest.raises(socket.timeout):
        fake_statsd.recvfrom(65536)
    assert metrics.get_counters() == {"cache.hit": 1}


def test_get_instance_is_a_singleton():
    assert PerformanceMetrics.get_instance() is PerformanceMetrics.get_instance()
