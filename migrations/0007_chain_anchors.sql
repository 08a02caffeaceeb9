-- Retention keeps the hash chain verifiable (docs/integrity.md): before a
-- monthly partition is dropped, audit_drop_partitions_before records, per
-- chain stream, the LSN and hash of the newest row the partition held. The
-- first remaining row's link names that LSN; verify-db takes the hash from
-- here to check it, and reports the cut. The anchor needs no signature: a
-- wrong hash cannot make the remaining rows verify up to the next signed
-- checkpoint.

SELECT set_config('search_path', quote_ident(current_schema()) || ', pg_temp', true);

CREATE TABLE IF NOT EXISTS audit_chain_anchors (
    stream_id text        NOT NULL,
    lsn       bigint      NOT NULL,
    hash      bytea       NOT NULL,
    -- The partition whose drop left this anchor.
    dropped   text        NOT NULL,
    cut_at    timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT audit_chain_anchors_pkey PRIMARY KEY (stream_id, lsn)
);

CREATE OR REPLACE TRIGGER audit_chain_anchors_no_update
    BEFORE UPDATE ON audit_chain_anchors
    FOR EACH ROW EXECUTE FUNCTION audit_reject_change();
CREATE OR REPLACE TRIGGER audit_chain_anchors_no_delete
    BEFORE DELETE ON audit_chain_anchors
    FOR EACH ROW EXECUTE FUNCTION audit_reject_change();
CREATE OR REPLACE TRIGGER audit_chain_anchors_no_truncate
    BEFORE TRUNCATE ON audit_chain_anchors
    FOR EACH STATEMENT EXECUTE FUNCTION audit_reject_change();
ALTER TABLE audit_chain_anchors ENABLE ALWAYS TRIGGER audit_chain_anchors_no_update;
ALTER TABLE audit_chain_anchors ENABLE ALWAYS TRIGGER audit_chain_anchors_no_delete;
ALTER TABLE audit_chain_anchors ENABLE ALWAYS TRIGGER audit_chain_anchors_no_truncate;

DO $grants$
BEGIN
    -- Anchors are written only by audit_drop_partitions_before (SECURITY
    -- DEFINER). A signing sync writer whose statement got no answer looks
    -- for that statement's first row (or checkpoint) by stream and LSN
    -- (src/pg/sync_chain.rs): it may read those two columns, no content.
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'auditwal_writer') THEN
        REVOKE ALL ON audit_chain_anchors FROM auditwal_writer;
        GRANT SELECT (stream_id, lsn) ON audit_events TO auditwal_writer;
        GRANT SELECT (stream_id, lsn) ON audit_chain_checkpoints TO auditwal_writer;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'auditwal_retention') THEN
        REVOKE ALL ON audit_chain_anchors FROM auditwal_retention;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'auditwal_reader') THEN
        GRANT SELECT ON audit_chain_anchors TO auditwal_reader;
    END IF;
END
$grants$;

-- As in 0003, plus the anchors, written before each DETACH in the same
-- transaction (the function's caller's).
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
        EXECUTE format(
            'INSERT INTO audit_chain_anchors (stream_id, lsn, hash, dropped) '
            'SELECT DISTINCT ON (stream_id) stream_id, lsn, chain_hash, %L FROM %I '
            'WHERE stream_id IS NOT NULL AND chain_hash IS NOT NULL '
            'ORDER BY stream_id, lsn DESC ON CONFLICT DO NOTHING',
            part, part);
        EXECUTE format('ALTER TABLE audit_events DETACH PARTITION %I', part);
        EXECUTE format('DROP TABLE %I', part);
        RETURN NEXT part;
    END LOOP;
END
$$;
