-- Version 2: a job handed out is acknowledged when the role's heartbeat
-- first lists it; one never acknowledged is handed out again (its answer
-- was lost). NULL: not acknowledged.
ALTER TABLE jobs ADD COLUMN acked_ms BIGINT;
-- The run a job belongs to (NULL: none): when the run ends, is interrupted
-- or moves on, its jobs no role acknowledged are expired.
ALTER TABLE jobs ADD COLUMN run_id TEXT;
CREATE INDEX jobs_run ON jobs (run_id);
