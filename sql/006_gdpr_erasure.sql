-- GDPR erasure: each request, and the keys it erased. A key is kept only as an HMAC-SHA-256 of
-- its canonical JSON text (CDC_GDPR__HASH_KEY), so the list that keeps it erased holds no
-- personal data. Writers look for the newest id of a table's entries in every batch (the
-- index below answers it from its last page).
CREATE TABLE IF NOT EXISTS _cdc_erasures (
    id           bigserial   PRIMARY KEY,
    target_table text        NOT NULL,
    scope        text        NOT NULL CHECK (scope IN ('row', 'partition')),
    key_hash     bytea       NOT NULL,
    status       text        NOT NULL DEFAULT 'completed',
    requested_by text        NOT NULL,
    requested_at timestamptz NOT NULL DEFAULT now(),
    completed_at timestamptz,
    erased       jsonb       NOT NULL DEFAULT '{}'  -- rows removed, by where they were
);

CREATE TABLE IF NOT EXISTS _cdc_erased_keys (
    id           bigserial   PRIMARY KEY,
    target_table text        NOT NULL,
    scope        text        NOT NULL CHECK (scope IN ('row', 'partition')),
    key_hash     bytea       NOT NULL,
    erasure_id   bigint      NOT NULL REFERENCES _cdc_erasures (id),
    UNIQUE (target_table, scope, key_hash)
);
CREATE INDEX IF NOT EXISTS _cdc_erased_keys_version ON _cdc_erased_keys (target_table, id);

-- Retention: housekeeping deletes by age in small batches, oldest first.
CREATE INDEX IF NOT EXISTS _cdc_dlq_records_failed_at ON _cdc_dlq_records (failed_at);
CREATE INDEX IF NOT EXISTS _cdc_reconciliation_mismatches_resolved
    ON _cdc_reconciliation_mismatches (resolved_at) WHERE status <> 'open';
CREATE INDEX IF NOT EXISTS _cdc_audit_log_at ON _cdc_audit_log (at);
