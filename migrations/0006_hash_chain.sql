-- The hash chain (docs/integrity.md): each loaded row's link and the WAL record it
-- came from, the loader's place in each stream's chain, and the signed checkpoints.
--
-- The new audit_events columns come after recorded_at (ADD COLUMN appends): the
-- COPY names its columns, so their place in the table does not matter. All three
-- are NULL for sync rows and for rows loaded before this migration. Adding
-- nullable columns without a default rewrites nothing, whatever the table's size.

ALTER TABLE audit_events
    -- The LSN of the link before this row's in its stream's chain.
    ADD COLUMN IF NOT EXISTS chain_prev_lsn bigint,
    -- SHA-256 over the row's link (chain::link_hash).
    ADD COLUMN IF NOT EXISTS chain_hash bytea,
    -- The WAL record's payload, the bytes the hash covers; verify-db checks the
    -- other columns against it.
    ADD COLUMN IF NOT EXISTS wal_payload bytea;

-- Where the loader's chain stands per stream, advanced with lsn in the batch
-- transaction: the next batch's first link follows (chain_lsn, chain_head).
ALTER TABLE audit_checkpoints
    ADD COLUMN IF NOT EXISTS chain_lsn bigint NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS chain_head bytea;

-- Every signed checkpoint the loader has read, stored in the transaction of the
-- batch that read its WAL record. Not partitioned: dropping a month of rows leaves
-- the checkpoints, which are what verify-db anchors on.
CREATE TABLE IF NOT EXISTS audit_chain_checkpoints (
    stream_id text        NOT NULL,
    -- The checkpoint record's own LSN.
    lsn       bigint      NOT NULL,
    -- The last event LSN it covers, and the chain's head there (parsed from note).
    size      bigint      NOT NULL,
    head      bytea       NOT NULL,
    -- The signed note, verbatim: verify-db checks its signature.
    note      text        NOT NULL,
    loaded_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT audit_chain_checkpoints_pkey PRIMARY KEY (stream_id, lsn)
);

CREATE OR REPLACE TRIGGER audit_chain_checkpoints_no_update
    BEFORE UPDATE ON audit_chain_checkpoints
    FOR EACH ROW EXECUTE FUNCTION audit_reject_change();
CREATE OR REPLACE TRIGGER audit_chain_checkpoints_no_delete
    BEFORE DELETE ON audit_chain_checkpoints
    FOR EACH ROW EXECUTE FUNCTION audit_reject_change();
CREATE OR REPLACE TRIGGER audit_chain_checkpoints_no_truncate
    BEFORE TRUNCATE ON audit_chain_checkpoints
    FOR EACH STATEMENT EXECUTE FUNCTION audit_reject_change();
ALTER TABLE audit_chain_checkpoints ENABLE ALWAYS TRIGGER audit_chain_checkpoints_no_update;
ALTER TABLE audit_chain_checkpoints ENABLE ALWAYS TRIGGER audit_chain_checkpoints_no_delete;
ALTER TABLE audit_chain_checkpoints ENABLE ALWAYS TRIGGER audit_chain_checkpoints_no_truncate;

DO $grants$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'auditwal_writer') THEN
        REVOKE ALL ON audit_chain_checkpoints FROM auditwal_writer;
        GRANT INSERT ON audit_chain_checkpoints TO auditwal_writer;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'auditwal_retention') THEN
        REVOKE ALL ON audit_chain_checkpoints FROM auditwal_retention;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'auditwal_reader') THEN
        GRANT SELECT ON audit_chain_checkpoints TO auditwal_reader;
    END IF;
END
$grants$;
