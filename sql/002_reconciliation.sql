-- Reconciliation: what a job was asked (options), how it went (details), who ran it, and the
-- indexes the HTTP filters and the scheduler's "last job of this table and strategy" need.
ALTER TABLE _cdc_reconciliation_jobs ADD COLUMN IF NOT EXISTS options jsonb NOT NULL DEFAULT '{}';
ALTER TABLE _cdc_reconciliation_jobs ADD COLUMN IF NOT EXISTS details jsonb NOT NULL DEFAULT '{}';
ALTER TABLE _cdc_reconciliation_jobs ADD COLUMN IF NOT EXISTS trigger text NOT NULL DEFAULT 'manual';
ALTER TABLE _cdc_reconciliation_jobs ADD COLUMN IF NOT EXISTS owner text;
CREATE INDEX IF NOT EXISTS _cdc_reconciliation_jobs_last
    ON _cdc_reconciliation_jobs (target_table, strategy, created_at DESC);
CREATE INDEX IF NOT EXISTS _cdc_reconciliation_jobs_status
    ON _cdc_reconciliation_jobs (status) WHERE status IN ('pending', 'running');

ALTER TABLE _cdc_reconciliation_mismatches ADD COLUMN IF NOT EXISTS details jsonb NOT NULL DEFAULT '{}';
CREATE INDEX IF NOT EXISTS _cdc_reconciliation_mismatches_job
    ON _cdc_reconciliation_mismatches (job_id, id);
CREATE INDEX IF NOT EXISTS _cdc_reconciliation_mismatches_open
    ON _cdc_reconciliation_mismatches (target_table, kind, status);
