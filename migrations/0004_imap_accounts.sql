-- 0004_imap_accounts: IMAP progress and records are keyed by account as well as by folder,
-- UIDVALIDITY and UID. Every account (every `atlas-milter-idle@NAME` unit, every
-- `backfill --account NAME`) shares the one [store] db, and two mailboxes on different
-- accounts may well share a folder name and a UIDVALIDITY: keyed by the mailbox alone, one
-- account took the other's UIDs as already processed and skipped that mail.
--
-- `account` is the --account NAME ([imap.accounts.NAME]), or '' for the [imap] section used
-- without --account. Rows written before this migration do not say which account wrote
-- them, so they go to '' (the documented default): right for a host that ran without
-- --account. A host that ran a single `--account NAME` can give its rows to that account:
--     UPDATE processed_emails SET account = 'NAME' WHERE account = '';
--     UPDATE imap_folder_marks SET account = 'NAME' WHERE account = '';
--     UPDATE learning_events SET account = 'NAME' WHERE account = '';
-- Rows of other sources (milter, classify) have no mailbox and keep account NULL.
-- Rolling back keeps, of the rows two accounts recorded under one folder, UIDVALIDITY and
-- UID, the older one: the old unique index cannot hold both.

ALTER TABLE processed_emails ADD COLUMN account TEXT;
UPDATE processed_emails SET account = '' WHERE uid IS NOT NULL;

-- An IMAP/backfill message is recorded once per account; writers use INSERT OR IGNORE against this.
DROP INDEX IF EXISTS uq_processed_emails_mailbox_uid;
CREATE UNIQUE INDEX uq_processed_emails_mailbox_uid
    ON processed_emails (account, folder, uidvalidity, uid) WHERE uid IS NOT NULL;

ALTER TABLE learning_events ADD COLUMN account TEXT;
UPDATE learning_events SET account = '' WHERE source = 'imap';

-- The primary key changes, which SQLite can only do by building the table again.
CREATE TABLE imap_folder_marks_new (
    account TEXT NOT NULL,
    folder TEXT NOT NULL,
    uidvalidity INTEGER NOT NULL,
    last_uid INTEGER NOT NULL,     -- highest UID the listener has looked at
    updated_at TEXT NOT NULL,
    PRIMARY KEY (account, folder, uidvalidity)
);
INSERT INTO imap_folder_marks_new (account, folder, uidvalidity, last_uid, updated_at)
    SELECT '', folder, uidvalidity, last_uid, updated_at FROM imap_folder_marks;
DROP TABLE imap_folder_marks;
ALTER TABLE imap_folder_marks_new RENAME TO imap_folder_marks;

-- rollback:
-- DROP INDEX IF EXISTS uq_processed_emails_mailbox_uid;
-- DELETE FROM processed_emails WHERE uid IS NOT NULL AND id NOT IN
--     (SELECT min(id) FROM processed_emails WHERE uid IS NOT NULL GROUP BY folder, uidvalidity, uid);
-- CREATE UNIQUE INDEX uq_processed_emails_mailbox_uid
--     ON processed_emails (folder, uidvalidity, uid) WHERE uid IS NOT NULL;
-- ALTER TABLE processed_emails DROP COLUMN account;
-- ALTER TABLE learning_events DROP COLUMN account;
-- CREATE TABLE imap_folder_marks_old (
--     folder TEXT NOT NULL,
--     uidvalidity INTEGER NOT NULL,
--     last_uid INTEGER NOT NULL,
--     updated_at TEXT NOT NULL,
--     PRIMARY KEY (folder, uidvalidity)
-- );
-- INSERT INTO imap_folder_marks_old (folder, uidvalidity, last_uid, updated_at)
--     SELECT folder, uidvalidity, max(last_uid), max(updated_at) FROM imap_folder_marks GROUP BY folder, uidvalidity;
-- DROP TABLE imap_folder_marks;
-- ALTER TABLE imap_folder_marks_old RENAME TO imap_folder_marks;
