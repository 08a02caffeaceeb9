-- Append-only, second layer: triggers that reject UPDATE, DELETE and TRUNCATE of
-- audit rows for everyone, the owner included. (The first layer, privileges, is
-- migration 0004.) Retention never deletes rows: it detaches and drops whole
-- partitions (docs/operations.md), which these triggers do not see.

CREATE OR REPLACE FUNCTION audit_reject_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_events is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'Retention detaches and drops whole partitions; see docs/operations.md.';
END
$$;

-- Row-level triggers on the partitioned table are cloned to every partition,
-- present and future. BEFORE, not AFTER: the change is refused before any work.
CREATE OR REPLACE TRIGGER audit_events_no_update
    BEFORE UPDATE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_reject_change();
CREATE OR REPLACE TRIGGER audit_events_no_delete
    BEFORE DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_reject_change();
-- Statement-level triggers are not cloned: TRUNCATE of a single partition is
-- caught by the same trigger created on each partition (here for the default
-- partition, by audit_ensure_partitions for the monthly ones).
CREATE OR REPLACE TRIGGER audit_events_no_truncate
    BEFORE TRUNCATE ON audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION audit_reject_change();
CREATE OR REPLACE TRIGGER audit_events_no_truncate
    BEFORE TRUNCATE ON audit_events_default
    FOR EACH STATEMENT EXECUTE FUNCTION audit_reject_change();

-- ENABLE ALWAYS: the triggers fire even with session_replication_role = replica,
-- the usual way to skip triggers.
ALTER TABLE audit_events ENABLE ALWAYS TRIGGER audit_events_no_update;
ALTER TABLE audit_events ENABLE ALWAYS TRIGGER audit_events_no_delete;
ALTER TABLE audit_events ENABLE ALWAYS TRIGGER audit_events_no_truncate;
ALTER TABLE audit_events_default ENABLE ALWAYS TRIGGER audit_events_no_update;
ALTER TABLE audit_events_default ENABLE ALWAYS TRIGGER audit_events_no_delete;
ALTER TABLE audit_events_default ENABLE ALWAYS TRIGGER audit_events_no_truncate;
