-- Row ids: a BRIN index in place of the (id, occurred_at) primary key.
--
-- Every index is paid on every insert, and the unique B-tree on (id, occurred_at)
-- was the one index the design does not ask for: nothing needs its uniqueness
-- (id comes from one sequence), and the sync bench spent about a fifth of its
-- index maintenance on it. Lookups by row id (`WHERE id = $1`, the id a sync
-- caller got back) stay cheap with BRIN: id grows with insertion order, which is
-- each partition's physical order, so a lookup reads one block range per
-- partition instead of the whole table. The unique (event_id, occurred_at)
-- constraint still identifies every row (and serves replay's ON CONFLICT).
--
-- Idempotent: IF EXISTS / IF NOT EXISTS, and the migrator's lock serialises
-- concurrent runs.

ALTER TABLE audit_events DROP CONSTRAINT IF EXISTS audit_events_pkey;

CREATE INDEX IF NOT EXISTS audit_events_id_brin
    ON audit_events USING brin (id);
