-- Control tables of cdc-sink. Applied once by `python -m cdc_sink migrate` (tracked in
-- _cdc_migrations); every statement is idempotent so a partly applied file can be re-run.

-- Where each consumer group stands in each Kafka partition. `next_offset` is the first offset
-- not yet applied; it moves in the same transaction as the data. `epoch` is a fencing token:
-- a worker claims the partition by bumping it and only commits while it still holds it.
CREATE TABLE IF NOT EXISTS _cdc_checkpoints (
    consumer_group text        NOT NULL,
    topic          text        NOT NULL,
    kafka_partition integer    NOT NULL,
    next_offset    bigint      NOT NULL,
    epoch          bigint      NOT NULL DEFAULT 0,
    owner          text,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, topic, kafka_partition)
);

-- Every version of every target table's schema, as the sink saw it.
CREATE TABLE IF NOT EXISTS _cdc_schema_metadata (
    target_table      text        NOT NULL,
    version           integer     NOT NULL,
    keyspace_name     text        NOT NULL,
    source_table      text        NOT NULL,
    key_columns       text[]      NOT NULL,
    partition_columns text[],
    columns           jsonb       NOT NULL,  -- {"column": "cql type"} in column order
    created_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (target_table, version)
);

-- Tombstones the merge needs after the rows they deleted are gone from the target table:
-- partition and range tombstones, and dead rows whose cell tombstones still shadow older writes.
-- Entries older than the grace period (CDC_SINK__TOMBSTONE_GRACE_SECONDS) are pruned.
CREATE TABLE IF NOT EXISTS _cdc_tombstones (
    target_table  text        NOT NULL,
    kind          text        NOT NULL CHECK (kind IN ('partition', 'range', 'row')),
    partition_key jsonb       NOT NULL,  -- JSON array: the partition key, or a row's full key
    scope         jsonb       NOT NULL DEFAULT '[]',  -- a range's bounds; '[]' otherwise
    state         jsonb,                 -- a dead row's cell timestamps and row tombstone
    ts_us         bigint      NOT NULL,  -- the newest timestamp the entry carries
    recorded_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (target_table, kind, partition_key, scope)
);
CREATE INDEX IF NOT EXISTS _cdc_tombstones_ts ON _cdc_tombstones (ts_us);

-- Records that could not be applied, with their context (see the dead-letter queue).
CREATE TABLE IF NOT EXISTS _cdc_dlq_records (
    id               bigserial   PRIMARY KEY,
    source_topic     text        NOT NULL,
    source_partition integer     NOT NULL,
    source_offset    bigint      NOT NULL,
    record_key       bytea,
    record_value     bytea,
    headers          jsonb       NOT NULL DEFAULT '[]',
    error_class      text        NOT NULL,
    error_message    text        NOT NULL,
    stage            text        NOT NULL,
    schema_id        integer,
    failed_at        timestamptz NOT NULL DEFAULT now(),
    status           text        NOT NULL DEFAULT 'pending',
    replayed_at      timestamptz,
    UNIQUE (source_topic, source_partition, source_offset)
);

CREATE TABLE IF NOT EXISTS _cdc_reconciliation_jobs (
    id               bigserial   PRIMARY KEY,
    target_table     text        NOT NULL,
    strategy         text        NOT NULL,
    window_start     timestamptz,
    window_end       timestamptz,
    status           text        NOT NULL DEFAULT 'pending',
    cassandra_rows   bigint,
    postgres_rows    bigint,
    mismatches       bigint,
    drift_percentage double precision,
    started_at       timestamptz,
    finished_at      timestamptz,
    error            text,
    created_at       timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS _cdc_reconciliation_mismatches (
    id           bigserial   PRIMARY KEY,
    job_id       bigint      NOT NULL REFERENCES _cdc_reconciliation_jobs (id) ON DELETE CASCADE,
    target_table text        NOT NULL,
    row_key      jsonb       NOT NULL,
    kind         text        NOT NULL,
    columns      text[]      NOT NULL DEFAULT '{}',
    status       text        NOT NULL DEFAULT 'open',
    resolution   text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    resolved_at  timestamptz
);

CREATE TABLE IF NOT EXISTS _cdc_audit_log (
    id         bigserial   PRIMARY KEY,
    at         timestamptz NOT NULL DEFAULT now(),
    actor      text        NOT NULL,
    action     text        NOT NULL,
    details    jsonb       NOT NULL DEFAULT '{}'
);
