-- Append-only, first layer: privileges.
--
--   auditwal_writer     INSERT into audit_events (plus SELECT of the columns that
--                       INSERT ... RETURNING reads), write audit_checkpoints,
--                       create partitions ahead. No UPDATE, DELETE or TRUNCATE.
--   auditwal_retention  drop whole partitions older than a cutoff, nothing else.
--   auditwal_reader     SELECT, for auditors and dashboards.
--
-- The roles are NOLOGIN groups: grant them to the login roles of the services
-- (GRANT auditwal_writer TO my_service). Roles are global to the cluster while
-- this migration runs per database, so creating them tolerates a role that
-- already exists, one created concurrently by a migration of another database,
-- and a migrating user without CREATEROLE (then the grants are skipped with a
-- NOTICE and an administrator creates the roles and re-runs the grants).

DO $roles$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['auditwal_writer', 'auditwal_retention', 'auditwal_reader'] LOOP
        BEGIN
            IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
                EXECUTE format('CREATE ROLE %I NOLOGIN', r);
            END IF;
        EXCEPTION
            -- duplicate_object: it exists now; unique_violation: a concurrent
            -- CREATE ROLE of the same name committed first.
            WHEN duplicate_object OR unique_violation THEN
                NULL;
            WHEN insufficient_privilege THEN
                RAISE NOTICE 'auditwal: cannot create role % (no CREATEROLE); its grants are skipped', r;
        END;
    END LOOP;

    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'auditwal_writer') THEN
        EXECUTE format('GRANT USAGE ON SCHEMA %I TO auditwal_writer', current_schema());
        REVOKE ALL ON audit_events, audit_checkpoints FROM auditwal_writer;
        GRANT INSERT ON audit_events TO auditwal_writer;
        -- INSERT ... RETURNING needs SELECT on the returned columns.
        GRANT SELECT (id, event_id, occurred_at) ON audit_events TO auditwal_writer;
        GRANT USAGE ON SEQUENCE audit_events_id_seq TO auditwal_writer;
        GRANT SELECT, INSERT, UPDATE ON audit_checkpoints TO auditwal_writer;
        GRANT EXECUTE ON FUNCTION audit_ensure_partitions(integer, integer) TO auditwal_writer;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'auditwal_retention') THEN
        EXECUTE format('GRANT USAGE ON SCHEMA %I TO auditwal_retention', current_schema());
        REVOKE ALL ON audit_events, audit_checkpoints FROM auditwal_retention;
        GRANT EXECUTE ON FUNCTION audit_drop_partitions_before(timestamptz) TO auditwal_retention;
        GRANT EXECUTE ON FUNCTION audit_ensure_partitions(integer, integer) TO auditwal_retention;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'auditwal_reader') THEN
        EXECUTE format('GRANT USAGE ON SCHEMA %I TO auditwal_reader', current_schema());
        GRANT SELECT ON audit_events, audit_checkpoints TO auditwal_reader;
    END IF;
END
$roles$;

-- The SECURITY DEFINER functions are callable only through the roles above (and
-- by the owner).
REVOKE EXECUTE ON FUNCTION audit_ensure_partitions(integer, integer) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION audit_drop_partitions_before(timestamptz) FROM PUBLIC;
