"""The IMAP listener's lookups with [store] url, against a real PostgreSQL: what another host
recorded and shipped (its verdicts, the UIDs it looked at, its Junk mark, its moves) answers
a host that took the account over; this host's newer local record wins; accounts stay
apart; with PostgreSQL stopped or frozen the local answer comes back within the lookup's
time limit, and at once while the breaker is open."""

from __future__ import annotations

import time

import pytest

from atlas_milter import journal
from atlas_milter.migrate import apply_migrations
from atlas_milter.pg_ship import Shipper
from atlas_milter.shared_records import LOOKUP_TIMEOUT, Lookups, SharedRecords
from atlas_milter.store import DirectRecordWriter

pytestmark = pytest.mark.integration


def write(db, records: list[dict]) -> None:
    writer = DirectRecordWriter(db)
    for record in records:
        writer.add_email_record({"source": "imap", "account": "work", "folder": "INBOX", "uidvalidity": 7,
                                 "score": 0.1, **record})
    writer.close()


@pytest.fixture
def hosts(tmp_path, postgres):
    """imap1's records shipped to PostgreSQL; imap2 with an empty database of its own."""
    db_a, db_b = tmp_path / "imap1.db", tmp_path / "imap2.db"
    apply_migrations(db_a)
    apply_migrations(db_b)
    write(db_a, [{"uid": i, "message_id": f"<m{i}@x>", "verdict": "ham", "action": "none",
                  "created_at": f"2026-12-01T10:00:0{i}.000+00:00"} for i in range(1, 6)])
    write(db_a, [{"uid": 6, "message_id": "<m6@x>", "verdict": "spam", "action": "move"}])
    journal.save_folder_mark(db_a, "Junk", 7, 12, account="work")
    shipper = Shipper(str(db_a), postgres.url, "imap1")
    assert shipper.ship_once() == 6
    shipper.ship_folder_marks()
    shared = SharedRecords(postgres.url, cooldown=2.0)
    yield db_b, shared, postgres
    shared.close()


def test_a_host_that_took_the_account_over_sees_what_the_other_recorded(hosts):
    db_b, shared, _ = hosts
    here_only, everywhere = Lookups(str(db_b), "work"), Lookups(str(db_b), "work", shared)
    assert here_only.highest_uid("INBOX", 7) is None and everywhere.highest_uid("INBOX", 7) == 6
    assert here_only.folder_mark("Junk", 7) is None and everywhere.folder_mark("Junk", 7) == 12
    assert here_only.last_record("<m3@x>", "dry-run") is None
    prior = everywhere.last_record("<m3@x>", "dry-run")
    assert (prior.verdict, prior.action, prior.folder, prior.uid) == ("ham", "none", "INBOX", 3)
    assert everywhere.uids_with_action("INBOX", 7, "move") == {6: "<m6@x>"}
    other_account = Lookups(str(db_b), "home", shared)
    assert other_account.highest_uid("INBOX", 7) is None and other_account.last_record("<m3@x>", "dry-run") is None

    # This host's own, newer record of the same message wins; its own higher UID counts.
    write(db_b, [{"uid": 9, "message_id": "<m3@x>", "verdict": "spam", "action": "learned-ham"}])
    assert everywhere.last_record("<m3@x>", "dry-run").action == "learned-ham"
    assert everywhere.highest_uid("INBOX", 7) == 9
    assert everywhere.last_record("<m2@x>", "dry-run").uid == 2


@pytest.mark.parametrize("outage", ["stop", "freeze"])
def test_without_postgresql_the_local_answer_comes_back_in_time(hosts, outage):
    db_b, shared, postgres = hosts
    write(db_b, [{"uid": 8, "message_id": "<local@x>", "verdict": "ham", "action": "none"}])
    lookups = Lookups(str(db_b), "work", shared)
    assert lookups.highest_uid("INBOX", 7) == 8 and lookups.last_record("<m1@x>", "dry-run") is not None
    postgres.stop() if outage == "stop" else postgres.freeze()
    try:
        t0 = time.monotonic()
        assert lookups.highest_uid("INBOX", 7) == 8  # the local answer
        first = time.monotonic() - t0
        t0 = time.monotonic()
        assert lookups.last_record("<m1@x>", "dry-run") is None and lookups.folder_mark("Junk", 7) is None
        rest = time.monotonic() - t0
        assert first <= LOOKUP_TIMEOUT + 0.5, first
        assert rest <= 0.1, rest  # the breaker is open (or the hung query is not queued behind)
        assert shared.breaker.is_open
    finally:
        if outage == "freeze":
            postgres.thaw()
    if outage == "stop":
        postgres.start()
    time.sleep(2.1)  # the cool-down: then it tries again (a new connection after a stop)
    assert lookups.last_record("<m1@x>", "dry-run") is not None  # PostgreSQL answers again
