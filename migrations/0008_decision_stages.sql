-- 0008_decision_stages: each scored decision records where its time went, so
-- `atlas-milter explain` and the console's /decision page can say how long each stage took:
-- a JSON object of milliseconds, {"parse": .., "classify": .., "rest": ..} ("rest": the
-- fingerprint, the cache lookup and the worker pool's queue), or {"cache hit": ..}. NULL
-- where nothing was scored and on rows written before this migration.

ALTER TABLE processed_emails ADD COLUMN stage_ms TEXT;

-- rollback:
-- ALTER TABLE processed_emails DROP COLUMN stage_ms;
