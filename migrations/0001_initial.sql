-- 0001_initial: one row per classified message, per-domain counters, learning events.
-- Timestamps are UTC ISO-8601 text. The migrator records this file in schema_migrations.

CREATE TABLE IF NOT EXISTS processed_emails (
    id INTEGER PRIMARY KEY,
    source TEXT,               -- milter | imap | backfill | classify | bench
    folder TEXT,               -- IMAP folder or mailbox path (backfill)
    uidvalidity INTEGER,
    uid INTEGER,
    queue_id TEXT,             -- MTA queue id (milter)
    message_id TEXT,
    client_ip TEXT,
    sender TEXT,
    sender_domain TEXT,
    recipients_count INTEGER,
    subject TEXT,
    score REAL,
    verdict TEXT,              -- ham | unsure | spam
    action TEXT,
    reasons TEXT,              -- JSON list of [feature, weight]
    model_version TEXT,
    cache_hit INTEGER NOT NULL DEFAULT 0,
    elapsed_ms REAL,
    error TEXT,
    note TEXT,
    created_at TEXT NOT NULL
);

-- An IMAP/backfill message is recorded once; writers use INSERT OR IGNORE against this.
CREATE UNIQUE INDEX IF NOT EXISTS uq_processed_emails_mailbox_uid
    ON processed_emails (folder, uidvalidity, uid) WHERE uid IS NOT NULL;

CREATE TABLE IF NOT EXISTS domains (
    domain TEXT PRIMARY KEY,
    ham INTEGER NOT NULL DEFAULT 0,
    spam INTEGER NOT NULL DEFAULT 0,
    unsure INTEGER NOT NULL DEFAULT 0,
    last_seen TEXT
);

CREATE TABLE IF NOT EXISTS learning_events (
    id INTEGER PRIMARY KEY,
    created_at TEXT NOT NULL,
    source TEXT,
    message_id TEXT,
    sender_domain TEXT,
    label TEXT NOT NULL,       -- what the user says: ham | spam
    previous_verdict TEXT,
    previous_score REAL,
    folder TEXT,
    uid INTEGER,
    note TEXT
);

-- rollback:
-- DROP TABLE IF EXISTS learning_events;
-- DROP TABLE IF EXISTS domains;
-- DROP TABLE IF EXISTS processed_emails;
