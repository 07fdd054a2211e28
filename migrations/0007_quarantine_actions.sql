-- 0007_quarantine_actions: who released, learned or deleted which held message, and when.
-- `atlas-milter quarantine` and the console's /quarantine page write one row per action
-- (the outcome too: a release that failed is recorded as failed), and the page lists the
-- latest ones. `actor` is the admin as the front end knows them: the Unix user of the
-- command line, the reverse proxy's user, or "token" and the client address.

CREATE TABLE IF NOT EXISTS quarantine_actions (
    id INTEGER PRIMARY KEY,
    created_at TEXT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,          -- release | release+learn | delete
    queue_id TEXT NOT NULL,
    decision_id INTEGER,           -- processed_emails.id of the decision that held it, if known
    outcome TEXT NOT NULL,         -- done | failed
    detail TEXT
);
CREATE INDEX IF NOT EXISTS idx_quarantine_actions_queue_id ON quarantine_actions (queue_id);

-- rollback:
-- DROP INDEX IF EXISTS idx_quarantine_actions_queue_id;
-- DROP TABLE IF EXISTS quarantine_actions;
