-- Monthly partitions, created ahead; retention by whole partitions.
--
-- Both functions are SECURITY DEFINER (they run as the owner of audit_events,
-- who alone may create, detach and drop its partitions) with search_path pinned
-- to the schema this migration runs in, pg_temp last, so a caller cannot
-- substitute objects of their own.

SELECT set_config('search_path', quote_ident(current_schema()) || ', pg_temp', true);

-- audit_ensure_partitions(months_ahead, months_back): makes sure a partition
-- exists for every UTC month from months_back before the current one to
-- months_ahead after it, and returns how many it created. Safe to call from
-- several sessions at once and as often as one likes (the sync writer and the
-- loader call it at start, and periodically).
--
-- A month whose rows already sit in the DEFAULT partition (they arrived while no
-- partition covered it) is skipped with a NOTICE: creating it would mean moving
-- those rows, i.e. deleting them from the default partition, which append-only
-- forbids. The rows stay queryable; see docs/operations.md.
CREATE OR REPLACE FUNCTION audit_ensure_partitions(
    months_ahead integer DEFAULT 3,
    months_back integer DEFAULT 1
) RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path FROM CURRENT
AS $$
DECLARE
    this_month date := date_trunc('month', now() AT TIME ZONE 'UTC')::date;
    month_start date;
    lo timestamptz;
    hi timestamptz;
    part text;
    created integer := 0;
BEGIN
    IF months_ahead NOT BETWEEN 0 AND 120 OR months_back NOT BETWEEN 0 AND 1200 THEN
        RAISE EXCEPTION 'audit_ensure_partitions: months_ahead must be in 0..120 and months_back in 0..1200'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- One caller at a time per database; the others find the work done.
    PERFORM pg_advisory_xact_lock(hashtext('auditwal.audit_ensure_partitions'));
    FOR i IN -months_back .. months_ahead LOOP
        month_start := (this_month + make_interval(months => i))::date;
        part := 'audit_events_p' || to_char(month_start, 'YYYYMM');
        CONTINUE WHEN EXISTS (
            SELECT 1 FROM pg_class c
            WHERE c.relname = part AND c.relnamespace = current_schema()::regnamespace);
        lo := month_start::timestamp AT TIME ZONE 'UTC';
        hi := (month_start + interval '1 month')::timestamp AT TIME ZONE 'UTC';
        IF EXISTS (SELECT 1 FROM audit_events_default
                   WHERE occurred_at >= lo AND occurred_at < hi) THEN
            RAISE NOTICE 'audit_ensure_partitions: not creating %, the default partition already holds rows of that month', part;
            CONTINUE;
        END IF;
        BEGIN
            EXECUTE format('CREATE TABLE %I PARTITION OF audit_events FOR VALUES FROM (%L) TO (%L)',
                           part, lo, hi);
            -- Statement-level TRUNCATE triggers are not cloned from the parent.
            EXECUTE format('CREATE TRIGGER audit_events_no_truncate BEFORE TRUNCATE ON %I '
                           'FOR EACH STATEMENT EXECUTE FUNCTION audit_reject_change()', part);
            EXECUTE format('ALTER TABLE %I ENABLE ALWAYS TRIGGER audit_events_no_truncate', part);
            EXECUTE format('ALTER TABLE %I ENABLE ALWAYS TRIGGER audit_events_no_update', part);
            EXECUTE format('ALTER TABLE %I ENABLE ALWAYS TRIGGER audit_events_no_delete', part);
            created := created + 1;
        EXCEPTION
            WHEN duplicate_table THEN
                NULL; -- created meanwhile by a session that did not take our lock
            WHEN check_violation THEN
                -- A row of that month reached the default partition between our
                -- check and the CREATE.
                RAISE NOTICE 'audit_ensure_partitions: not creating %, the default partition already holds rows of that month', part;
        END;
    END LOOP;
    RETURN created;
END
$$;

-- audit_drop_partitions_before(cutoff): retention. Detaches and drops every
-- monthly partition whose whole month ends at or before cutoff, and returns their
-- names. Never deletes rows and never touches the default partition.
CREATE OR REPLACE FUNCTION audit_drop_partitions_before(cutoff timestamptz)
RETURNS SETOF text
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path FROM CURRENT
AS $$
DECLARE
    part text;
BEGIN
    FOR part IN
        SELECT c.relname
        FROM pg_inherits i
        JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'audit_events'::regclass
          AND c.relname ~ '^audit_events_p[0-9]{6}$'
          AND (to_date(substr(c.relname, 15), 'YYYYMM') + interval '1 month')::timestamp
              AT TIME ZONE 'UTC' <= cutoff
        ORDER BY c.relname
    LOOP
        EXECUTE format('ALTER TABLE audit_events DETACH PARTITION %I', part);
        EXECUTE format('DROP TABLE %I', part);
        RETURN NEXT part;
    END LOOP;
END
$$;

SELECT audit_ensure_partitions(3, 1);
