import os
import threading
import time

import pytest

from atlas_milter.monitor import GAUGE_POOL_INFLIGHT
from atlas_milter.pool import ItemError, ParallelEmailProcessor, PoolBusy

# Worker-side functions must be top-level so worker processes can import them.
_WORKER_STATE: dict[str, object] = {}


def _init_worker(model_name: str) -> None:
    _WORKER_STATE["model"] = model_name


def _with_worker_state(item: int) -> tuple[object, int, int]:
    return _WORKER_STATE.get("model"), item * item, os.getpid()


def _square_or_fail(item: int) -> int:
    if item % 7 == 3:
        raise ValueError(f"bad item {item}")
    return item * item


def _die(_item: int) -> None:
    os._exit(1)


def _wait_until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.001)


@pytest.mark.parametrize("workers", [1, 3])
def test_threads_keep_order_and_report_item_errors(workers):
    with ParallelEmailProcessor(worker_count=workers, use_processes=False) as pool:
        results = pool.process_emails_parallel(range(50), _square_or_fail, batch_size=8)
    assert len(results) == 50
    for i, result in enumerate(results):
        if i % 7 == 3:
            assert result == ItemError(i, f"ValueError: bad item {i}")
        else:
            assert result == i * i


def test_batches_pull_the_input_lazily():
    pulled = 0
    done_before_pull: list[int] = []
    processed = 0
    lock = threading.Lock()

    def source():
        nonlocal pulled
        for i in range(40):
            pulled += 1
            with lock:
                done_before_pull.append(pulled - 1 - processed)
            yield i

    def count(item: int) -> int:
        nonlocal processed
        with lock:
            processed += 1
        return item

    with ParallelEmailProcessor(worker_count=2, use_processes=False) as pool:
        assert pool.process_emails_parallel(source(), count, batch_size=10) == list(range(40))
    assert max(done_before_pull) < 10  # never more than one batch taken ahead


def test_processes_run_initializer_keep_order_and_report_errors():
    with ParallelEmailProcessor(worker_count=2, initializer=_init_worker, initargs=("model-v3",)) as pool:
        assert pool.use_processes
        states = pool.process_emails_parallel(range(20), _with_worker_state, batch_size=7)
        mixed = pool.process_emails_parallel(range(10), _square_or_fail)
        assert pool.run(_with_worker_state, 5, timeout=10)[:2] == ("model-v3", 25)
    assert [s[:2] for s in states] == [("model-v3", i * i) for i in range(20)]
    assert all(s[2] != os.getpid() for s in states)
    assert mixed[3] == ItemError(3, "ValueError: bad item 3")
    assert mixed[:3] == [0, 1, 4] and mixed[4:] == [i * i for i in range(4, 10)]


def test_processes_reject_unpicklable_fn():
    with ParallelEmailProcessor(worker_count=2) as pool:
        with pytest.raises(TypeError, match="top-level function"):
            pool.process_emails_parallel([1, 2], lambda x: x)


def test_dead_worker_fails_its_items_and_the_pool_recovers():
    with ParallelEmailProcessor(worker_count=2) as pool:
        results = pool.process_emails_parallel(range(4), _die)
        assert all(isinstance(r, ItemError) and "BrokenProcessPool" in r.error for r in results)
        assert [r.index for r in results] == [0, 1, 2, 3]
        assert pool.process_emails_parallel(range(4), _square_or_fail) == [0, 1, 4, ItemError(3, "ValueError: bad item 3")]


def test_run_returns_result_and_raises_fn_errors():
    with ParallelEmailProcessor(worker_count=1, use_processes=False) as pool:
        assert pool.run(pow, 2, 10, timeout=1) == 1024
        with pytest.raises(ValueError, match="bad item 3"):
            pool.run(_square_or_fail, 3)


def test_run_timeout_then_pool_busy_until_the_worker_is_free(metrics):
    release = threading.Event()
    with ParallelEmailProcessor(worker_count=1, use_processes=False, max_in_flight=1) as pool:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            pool.run(release.wait, 10, timeout=0.05)
        assert time.monotonic() - started < 2
        # The timed-out call still occupies the only worker: back-pressure, not a queue.
        assert pool.in_flight == 1
        assert metrics.get_gauges()[GAUGE_POOL_INFLIGHT] == 1
        with pytest.raises(PoolBusy):
            pool.run(pow, 2, 2, timeout=1)
        release.set()
        _wait_until(lambda: pool.in_flight == 0)
        assert pool.run(pow, 2, 2, timeout=1) == 4
    assert metrics.get_gauges()[GAUGE_POOL_INFLIGHT] == 0


def test_max_in_flight_counts_concurrent_callers():
    release = threading.Event()
    entered = threading.Semaphore(0)

    def block() -> str:
        entered.release()
        release.wait(10)
        return "done"

    pool = ParallelEmailProcessor(worker_count=2, use_processes=False, max_in_flight=2)
    results: list[str] = []
    callers = [threading.Thread(target=lambda: results.append(pool.run(block, timeout=10))) for _ in range(2)]
    for t in callers:
        t.start()
    for _ in callers:
        assert entered.acquire(timeout=5)
    with pytest.raises(PoolBusy):
        pool.run(block, timeout=1)
    release.set()
    for t in callers:
        t.join()
    assert results == ["done", "done"]
    pool.shutdown()


def test_shutdown_refuses_new_work():
    pool = ParallelEmailProcessor(worker_count=2, use_processes=False)
    assert pool.run(pow, 3, 2) == 9
    pool.shutdown()
    with pytest.raises(RuntimeError):
        pool.run(pow, 3, 2)
    assert pool.in_flight == 0


def test_shutdown_without_wait_cancels_queued_work():
    started, release = threading.Event(), threading.Event()

    def block() -> str:
        started.set()
        release.wait(10)
        return "done"

    pool = ParallelEmailProcessor(worker_count=1, use_processes=False)
    # _submit is what run() and the batches use; calling it directly keeps the order exact.
    running, _ = pool._submit(block)
    assert started.wait(5)  # the only worker is busy, so the next two wait in the queue
    queued = [pool._submit(block)[0] for _ in range(2)]
    assert pool.in_flight == 3
    pool.shutdown(wait=False)
    assert all(f.cancelled() for f in queued)
    release.set()
    assert running.result(timeout=5) == "done"
    _wait_until(lambda: pool.in_flight == 0)
