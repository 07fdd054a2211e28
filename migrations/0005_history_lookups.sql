-- 0005_history_lookups: what `atlas-milter history` and `atlas-milter explain` look up.
-- History pages are keyset-paginated on id (the primary key); each filter needs an index
-- whose entries are in id order for one value, which a one-column index is (SQLite keeps
-- the rowid as its last key). 0002 and 0003 gave verdict, sender_domain, created_at,
-- queue_id and message_id theirs; the action filter had none.
--
-- The milter writes the reference id of a 550/451 reply (and of a quarantine) at the end
-- of the record's note, as "...; ref=XXXXXXXXXX". The index is on what follows the first
-- "ref=", so `explain REF` finds the row in one step on rows written before this migration
-- too; the query must repeat the expression and the WHERE exactly (queries.py does).

CREATE INDEX IF NOT EXISTS idx_processed_emails_action ON processed_emails (action);
-- Two or three filters together: one index for exactly those columns keeps the page in id
-- order; with only one of them SQLite walks that filter's rows testing the others, which
-- on a million rows takes up to a second when none match (spam tagged ham, say).
CREATE INDEX IF NOT EXISTS idx_processed_emails_verdict_action ON processed_emails (verdict, action);
CREATE INDEX IF NOT EXISTS idx_processed_emails_verdict_domain ON processed_emails (verdict, sender_domain);
CREATE INDEX IF NOT EXISTS idx_processed_emails_action_domain ON processed_emails (action, sender_domain);
CREATE INDEX IF NOT EXISTS idx_processed_emails_verdict_action_domain
    ON processed_emails (verdict, action, sender_domain);
CREATE INDEX IF NOT EXISTS idx_processed_emails_ref
    ON processed_emails (substr(note, instr(note, 'ref=') + 4)) WHERE instr(note, 'ref=') > 0;

-- rollback:
-- DROP INDEX IF EXISTS idx_processed_emails_ref;
-- DROP INDEX IF EXISTS idx_processed_emails_verdict_action_domain;
-- DROP INDEX IF EXISTS idx_processed_emails_action_domain;
-- DROP INDEX IF EXISTS idx_processed_emails_verdict_domain;
-- DROP INDEX IF EXISTS idx_processed_emails_verdict_action;
-- DROP INDEX IF EXISTS idx_processed_emails_action;
