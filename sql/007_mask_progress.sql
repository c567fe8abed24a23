-- Progress of `python -m cdc_sink mask apply`: one row per target table, the last key it
-- rewrote and the fingerprint of the rules (and hash key) it rewrote with, so an interrupted
-- run resumes where it stopped and a rule change starts over.
CREATE TABLE IF NOT EXISTS _cdc_mask_progress (
    target_table text        PRIMARY KEY,
    fingerprint  text        NOT NULL,
    columns      text[]      NOT NULL,
    last_key     jsonb,
    rows_done    bigint      NOT NULL DEFAULT 0,
    rows_written bigint      NOT NULL DEFAULT 0,
    started_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz
);
