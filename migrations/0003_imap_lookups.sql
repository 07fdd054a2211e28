-- 0003_imap_lookups: what the IMAP listener looks up. It finds our last verdict for each
-- new message by Message-ID (learning from the user's moves), and remembers how far it
-- has read each folder it watches without recording (the Junk folder), so moves made
-- while it was stopped are still learned.

CREATE INDEX IF NOT EXISTS idx_processed_emails_message_id ON processed_emails (message_id);
CREATE INDEX IF NOT EXISTS idx_learning_events_message_id ON learning_events (message_id, label);

CREATE TABLE IF NOT EXISTS imap_folder_marks (
    folder TEXT NOT NULL,
    uidvalidity INTEGER NOT NULL,
    last_uid INTEGER NOT NULL,     -- highest UID the listener has looked at
    updated_at TEXT NOT NULL,
    PRIMARY KEY (folder, uidvalidity)
);

-- rollback:
-- DROP TABLE IF EXISTS imap_folder_marks;
-- DROP INDEX IF EXISTS idx_learning_events_message_id;
-- DROP INDEX IF EXISTS idx_processed_emails_message_id;
