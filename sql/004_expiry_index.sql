-- The expiry task looks for rows whose TTL has passed (`_cdc_expires_at <= now`) every few
-- seconds. Tables created before this version have no index for it, so each pass scanned the
-- whole table: add the partial index the sink now creates with every table. The name is the
-- one cdc_sink.tables.expiry_index_name gives. Building it locks the table against writes for
-- as long as the build takes (only rows with a TTL are indexed).
DO $$
DECLARE
    target text;
BEGIN
    FOR target IN
        SELECT DISTINCT m.target_table FROM _cdc_schema_metadata m
        WHERE to_regclass(quote_ident(m.target_table)) IS NOT NULL
    LOOP
        EXECUTE format(
            'CREATE INDEX IF NOT EXISTS %I ON %I (_cdc_expires_at) '
            'WHERE _cdc_expires_at IS NOT NULL',
            '_cdc_expiry_' || left(md5(target), 16),
            target
        );
    END LOOP;
END
$$;
