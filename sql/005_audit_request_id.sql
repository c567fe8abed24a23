-- Who changed what, and through which request: the request id also appears in the log lines
-- written while the request ran. Resume requests are kept for every pod to act on: the pod
-- holding a paused partition may not be the one the request reached.
ALTER TABLE _cdc_audit_log ADD COLUMN IF NOT EXISTS request_id text;

CREATE TABLE IF NOT EXISTS _cdc_resume_requests (
    id           bigserial   PRIMARY KEY,
    requested_at timestamptz NOT NULL DEFAULT now(),
    topic        text,                   -- NULL: every topic
    partition    integer                 -- NULL: every partition of the topic(s)
);
