-- 0010_ship_marks: with [store] url, how far this database's verdict rows have been shipped
-- to PostgreSQL (atlas_milter/pg_ship.py). `db_id` names this SQLite file in PostgreSQL
-- (made once, at the first shipment): with the local row id it is the primary key there,
-- so a batch sent again after a crash is written once. The mark moves only after
-- PostgreSQL has committed the batch.

CREATE TABLE IF NOT EXISTS ship_marks (
    target TEXT PRIMARY KEY,
    db_id TEXT NOT NULL,
    last_id INTEGER NOT NULL
);

-- rollback:
-- DROP TABLE IF EXISTS ship_marks;
