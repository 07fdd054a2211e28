"""The log throttle: once per interval per key, counting what it held back."""

from atlas_milter.throttle import LogThrottle


def test_once_per_interval_per_key_and_counts_what_it_held_back():
    now = [100.0]
    throttle = LogThrottle(10.0, clock=lambda: now[0])
    assert throttle.due("a") == 0  # the first line always goes out
    assert throttle.due("a") is None and throttle.due("a") is None
    assert throttle.due("b") == 0  # another kind has its own interval
    now[0] += 10.0
    assert throttle.due("a") == 2  # due again, and says how many were held back
    assert throttle.due("a") is None


def test_force_lets_a_line_through_and_restarts_the_interval():
    now = [0.0]
    throttle = LogThrottle(60.0, clock=lambda: now[0])
    assert throttle.due() == 0
    now[0] += 1.0
    assert throttle.due(force=True) == 0
    now[0] += 59.5
    assert throttle.due() is None  # the forced line restarted the interval
