-- 0002_add_performance_indexes: indexes for the read queries (stats, resumable backfill,
-- lookups by queue id). Safe to run again by hand:
--     sqlite3 atlas-milter.db < migrations/add_performance_indexes.sql

CREATE INDEX IF NOT EXISTS idx_processed_emails_uid_folder ON processed_emails (uid, folder);
CREATE INDEX IF NOT EXISTS idx_processed_emails_created_at ON processed_emails (created_at);
CREATE INDEX IF NOT EXISTS idx_processed_emails_verdict ON processed_emails (verdict);
CREATE INDEX IF NOT EXISTS idx_processed_emails_sender_domain ON processed_emails (sender_domain);
CREATE INDEX IF NOT EXISTS idx_processed_emails_queue_id ON processed_emails (queue_id);
CREATE INDEX IF NOT EXISTS idx_domains_domain ON domains (domain);

-- rollback:
-- DROP INDEX IF EXISTS idx_domains_domain;
-- DROP INDEX IF EXISTS idx_processed_emails_queue_id;
-- DROP INDEX IF EXISTS idx_processed_emails_sender_domain;
-- DROP INDEX IF EXISTS idx_processed_emails_verdict;
-- DROP INDEX IF EXISTS idx_processed_emails_created_at;
-- DROP INDEX IF EXISTS idx_processed_emails_uid_folder;
