"""queries.py's IMAP lookups and journal.py (the synchronous writes), against a real SQLite file:
every key includes the account, since accounts share the database."""

from __future__ import annotations

from atlas_milter import journal, queries, store
from atlas_milter.migrate import apply_migrations


def test_the_lookups_of_a_missing_database_are_empty(tmp_path):
    db = tmp_path / "absent.db"
    assert queries.highest_uid(db, "INBOX", 1, account="") is None
    assert queries.folder_mark(db, "Junk", 1, account="") is None
    assert queries.uids_with_action(db, "INBOX", 1, "move", account="") == {}
    assert queries.last_record(db, "<m@x>", "dry-run", account="") is None
    assert not queries.already_learned(db, "<m@x>", "spam", account="")
    assert not db.exists()


def test_folder_marks_are_per_account_and_never_move_back(tmp_path):
    db = tmp_path / "v.db"
    apply_migrations(db)
    journal.save_folder_mark(db, "Junk", 7, 40, account="work")
    journal.save_folder_mark(db, "Junk", 7, 30, account="work")  # an older look: the mark stays
    journal.save_folder_mark(db, "Junk", 7, 5, account="")
    assert queries.folder_mark(db, "Junk", 7, account="work") == 40
    assert queries.folder_mark(db, "Junk", 7, account="") == 5
    assert queries.folder_mark(db, "Junk", 7, account="home") is None
    assert queries.folder_mark(db, "Junk", 8, account="work") is None


def test_records_and_learning_events_are_looked_up_per_account(tmp_path):
    db = tmp_path / "v.db"
    writer = store.DirectRecordWriter(db)
    try:
        base = {"source": "imap", "folder": "INBOX", "uidvalidity": 7, "verdict": "spam", "score": 0.99}
        assert writer.add_email_record({**base, "account": "work", "uid": 3, "action": "move", "message_id": "<a@x>"})
        assert writer.add_email_record({**base, "account": "home", "uid": 3, "action": "move", "message_id": "<b@x>"})
        assert writer.add_email_record({**base, "account": "home", "uid": 9, "action": "flag", "message_id": "<a@x>"})
        assert writer.add_email_record({"source": "milter", "verdict": "ham", "score": 0.1, "action": "accept",
                                        "message_id": "<c@x>"})
        assert writer.stats()["written"] == 4  # the same mailbox key under two accounts: two messages
    finally:
        writer.close()
    assert queries.highest_uid(db, "INBOX", 7, account="work") == 3
    assert queries.highest_uid(db, "INBOX", 7, account="home") == 9
    assert queries.highest_uid(db, "INBOX", 7, account="") is None
    assert queries.processed_uids(db, "INBOX", 7, "home") == {3, 9}
    assert queries.processed_uids(db, "INBOX", 7) == set()
    assert queries.uids_with_action(db, "INBOX", 7, "move", account="work") == {3: "<a@x>"}
    assert queries.last_record(db, "<a@x>", "dry-run", account="work").action == "move"
    assert queries.last_record(db, "<a@x>", "dry-run", account="home").action == "flag"
    assert queries.last_record(db, "<b@x>", "dry-run", account="work") is None
    assert queries.last_record(db, "<c@x>", "dry-run", account="work").verdict == "ham"  # the milter's: any account
    journal.add_learning_event(db, {"account": "work", "message_id": "<a@x>", "label": "spam"})
    assert queries.already_learned(db, "<a@x>", "spam", account="work")
    assert not queries.already_learned(db, "<a@x>", "spam", account="home")
    assert not queries.already_learned(db, "<a@x>", "ham", account="work")
