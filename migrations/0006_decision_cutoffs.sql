-- 0006_decision_cutoffs: each decision records the cutoffs its label was given with, so
-- `atlas-milter explain` can say how far the score was from them even after the model or the
-- config changed. NULL where nothing was scored (skipped, unchecked) and on rows written
-- before this migration.

ALTER TABLE processed_emails ADD COLUMN spam_cutoff REAL;
ALTER TABLE processed_emails ADD COLUMN ham_cutoff REAL;

-- rollback:
-- ALTER TABLE processed_emails DROP COLUMN ham_cutoff;
-- ALTER TABLE processed_emails DROP COLUMN spam_cutoff;
