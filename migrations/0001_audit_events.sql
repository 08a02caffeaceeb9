-- The audit table, its indexes, the default partition and the loader's checkpoints.
--
-- audit_events is range-partitioned by occurred_at, one partition per UTC month
-- (created ahead by audit_ensure_partitions, migration 0003). The DEFAULT partition
-- catches every row no monthly partition covers, so no row is ever rejected for
-- lack of a partition.
--
-- COPY's fast path is kept on purpose: no INSERT triggers, and the only defaults
-- are nextval (id) and now() (recorded_at); event_id and occurred_at are always
-- sent by the client.

CREATE TABLE IF NOT EXISTS audit_events (
    -- bigserial, not an identity column: PostgreSQL 15 refuses identity columns on
    -- partitioned tables.
    id          bigserial        NOT NULL,
    event_id    uuid             NOT NULL,
    occurred_at timestamptz      NOT NULL,
    action      text             NOT NULL,
    actor_id    text,
    actor_type  text,
    target_type text,
    target_id   text,
    target_name text,
    tenant_id   text,
    outcome     text,
    reason      text,
    ip          inet,
    user_agent  text,
    request_id  text,
    before      jsonb,
    after       jsonb,
    metadata    jsonb,
    -- The WAL stream and LSN a loaded row came from; both NULL for sync rows.
    stream_id   text,
    lsn         bigint,
    sample_rate double precision NOT NULL DEFAULT 1.0,
    recorded_at timestamptz      NOT NULL DEFAULT now(),
    CONSTRAINT audit_events_outcome_check
        CHECK (outcome IN ('success', 'failure', 'denied')),
    CONSTRAINT audit_events_sample_rate_check
        CHECK (sample_rate > 0 AND sample_rate <= 1),
    CONSTRAINT audit_events_stream_lsn_check
        CHECK ((stream_id IS NULL) = (lsn IS NULL)),
    -- A unique constraint on a partitioned table must include the partition key.
    CONSTRAINT audit_events_pkey PRIMARY KEY (id, occurred_at),
    CONSTRAINT audit_events_event_id_key UNIQUE (event_id, occurred_at)
) PARTITION BY RANGE (occurred_at);

CREATE TABLE IF NOT EXISTS audit_events_default PARTITION OF audit_events DEFAULT;

-- Time ranges: BRIN, tiny and cheap to maintain on an append-mostly table whose
-- physical order follows occurred_at.
CREATE INDEX IF NOT EXISTS audit_events_occurred_at_brin
    ON audit_events USING brin (occurred_at);
-- An actor's events over time, a target's history, a tenant's events. Partial:
-- rows without the key (common for tenant_id) cost no index entry, and a query
-- `WHERE actor_id = $1` still uses the index (equality implies NOT NULL).
CREATE INDEX IF NOT EXISTS audit_events_actor_idx
    ON audit_events (actor_id, occurred_at) WHERE actor_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS audit_events_target_idx
    ON audit_events (target_type, target_id, occurred_at) WHERE target_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS audit_events_tenant_idx
    ON audit_events (tenant_id, occurred_at) WHERE tenant_id IS NOT NULL;

-- The loader's progress, one row per WAL stream, committed in the same
-- transaction as the rows it covers.
CREATE TABLE IF NOT EXISTS audit_checkpoints (
    stream_id  text        PRIMARY KEY,
    lsn        bigint      NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
