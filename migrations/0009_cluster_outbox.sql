-- 0009_cluster_outbox: with [cluster] configured, a learn made on this host waits here until
-- the shared Redis has taken it (atlas_milter/cluster_sync.py): it survives a restart or a
-- crash of the daemon while Redis is away, and is shipped exactly once when Redis returns.
-- `event` is the learn event as JSON (host, event id, fingerprint, label, weight changes).

CREATE TABLE IF NOT EXISTS cluster_outbox (
    event_id TEXT PRIMARY KEY,
    created_at TEXT NOT NULL,
    event TEXT NOT NULL
);

-- rollback:
-- DROP TABLE IF EXISTS cluster_outbox;
