"""SharedModel without Redis: events applied in stream order, snapshots of the stream's part
and hosts that start from one, duplicates, and this host's own events."""

from __future__ import annotations

from importlib import resources

import pytest

from atlas_milter.classifier import load_model
from atlas_milter.learn_events import LearnEvent, SharedModel, make_event
from tests.support.requirements import _unavailable

SAMPLE = resources.files("atlas_milter").joinpath("data", "sample")
MESSAGES = [p.read_bytes() for p in sorted(SAMPLE.iterdir()) if p.name.endswith(".eml")]
MAX_BYTES = 512 * 1024


@pytest.fixture(scope="module")
def base():
    return load_model()


@pytest.fixture(scope="module")
def stream(base):
    """Twelve learns as the stream would hold them: (entry id, event), made on the model as it
    stood on the learning host, so later events build on earlier ones."""
    host = SharedModel(base, "mx1")
    entries = []
    for i in range(12):
        raw = MESSAGES[i % len(MESSAGES)] + f"\nvariant {i}\n".encode()
        event, _, _ = make_event(host.model(), raw, i % 3 == 0, MAX_BYTES, "mx1")
        entry = f"1700000000{i:03d}-0"
        host.apply_stream(entry, event)
        entries.append((entry, event))
    return entries


def applied(base, entries, start: SharedModel | None = None) -> SharedModel:
    shared = start or SharedModel(base, "mx2")
    for entry, event in entries:
        shared.apply_stream(entry, event)
    return shared


def test_a_host_that_starts_from_a_snapshot_ends_with_the_same_weights_as_one_that_saw_every_event(base, stream):
    everything = applied(base, stream)
    at_seven = applied(base, stream[:7]).snapshot()

    newcomer = SharedModel(base, "mx3")
    assert newcomer.adopt(at_seven)
    assert newcomer.position == stream[6][0] and newcomer.applied_count == 7
    applied(base, stream[5:], newcomer)  # the tail, overlapping what the snapshot holds: ignored
    assert newcomer.model().weights == everything.model().weights  # bit for bit, not only close
    assert newcomer.version == everything.version and newcomer.applied_count == 12
    assert everything.model().weights != base.weights


def test_a_snapshot_that_is_not_ahead_changes_nothing(base, stream):
    host = applied(base, stream[:9])
    before = host.model().weights
    assert not host.adopt(applied(base, stream[:4]).snapshot())
    assert host.position == stream[8][0] and host.model().weights == before


def test_a_blob_that_is_not_a_snapshot_is_refused(base):
    host = SharedModel(base, "mx1")
    for blob in (b"", b"not zlib", __import__("zlib").compress(b'{"format": "other"}'),
                 __import__("zlib").compress(b'{"format": "atlas-learn-snapshot-1", "position": "x"}')):
        with pytest.raises(ValueError, match="not a learning snapshot"):
            host.adopt(blob)
    assert host.position == "0"


def test_an_event_the_stream_holds_twice_counts_once_also_across_a_snapshot(base, stream):
    entry, event = stream[3]
    once = applied(base, stream[:5])
    twice = applied(base, stream[:5] + [("1700000000999-0", event)])
    assert twice.model().weights == once.model().weights and twice.applied_count == 5
    newcomer = SharedModel(base, "mx3")
    newcomer.adopt(applied(base, stream[:5]).snapshot())
    newcomer.apply_stream("1700000000999-0", event)  # the second copy, after the snapshot
    assert newcomer.model().weights == once.model().weights


def test_own_events_count_until_the_stream_or_a_snapshot_holds_them(base, stream):
    host = applied(base, stream[:3])
    entry, event = stream[3]
    own = LearnEvent("mx2", event.event_id, event.fingerprint, event.label, event.deltas)
    host.add_local(own)
    assert host.version.endswith("+1local")
    with_own = host.model().weights
    assert with_own != applied(base, stream[:3]).model().weights

    host.shipped[own.event_id] = entry  # Redis took it as that entry
    assert host.adopt(applied(base, stream[:6]).snapshot())
    assert not host.pending and "+" not in host.version  # the snapshot holds it: not counted twice
    assert host.model().weights == applied(base, stream[:6]).model().weights

    unshipped = LearnEvent("mx2", "not-on-the-stream", "fp", "spam", {"w:newword": 0.5})
    host.add_local(unshipped)
    host.adopt(applied(base, stream[:8]).snapshot())
    assert list(host.pending) == ["not-on-the-stream"]  # still waiting to be shipped: still counts
    assert host.model().weights["w:newword"] == 0.5


def test_each_models_table_follows_from_the_previous_ones_changes(base, stream):
    """What the cluster thread does at each swap: the next model's compiled table is the one
    in force with the weights that changed since set (take_changes); it scores every sample
    exactly as a table built from all the weights. Dropping an own event asks for a rebuild."""
    from atlas_milter.classifier import _hotpath
    from atlas_milter.message import parse_message

    if _hotpath is None:
        _unavailable("the compiled extension atlas_milter._hotpath is not built", require_env="ATLAS_REQUIRE_COMPILED")
    host = SharedModel(base, "mx2")
    assert host.take_changes() is None  # the first model: a whole table
    in_force = host.model()
    in_force.prepare()
    parsed = [parse_message(raw, MAX_BYTES) for raw in MESSAGES]
    for step in (stream[:3], stream[3:8], stream[8:]):
        for entry, event in step:
            host.apply_stream(entry, event)
        noted_by_the_stream = {feature for _, event in step for feature in event.deltas}
        own = {feature: 0.25 for _, event in stream for feature in event.deltas if feature not in noted_by_the_stream}
        assert own  # features of the sample messages that only this own event changes
        host.add_local(LearnEvent("mx2", f"own-{step[0][0]}", "fp", "spam", {**own, "never-seen-before": 0.25}))
        derived, whole = host.model(), host.model()
        derived.prepare(in_force, host.take_changes())
        whole.prepare()
        assert derived._table[1] is not whole._table[1]
        assert [derived.score(m) for m in parsed] == [whole.score(m) for m in parsed]
        in_force = derived
    host.drop_pending("own-" + stream[0][0])
    assert host.take_changes() is None
