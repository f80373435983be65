-- Version 2: a job handed out is acknowledged when the role's heartbeat
-- first lists it; one never acknowledged is handed out again (its answer
-- was lost). NULL: not acknowledged.
ALTER TABLE jobs ADD COLUMN acked_ms BIGINT;
