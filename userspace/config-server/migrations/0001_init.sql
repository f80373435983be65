-- ferry configuration server, schema version 1.
-- One SQL text for SQLite (3.35+) and PostgreSQL (12+): TEXT and BIGINT
-- only, ids made by the server, times in Unix milliseconds.
-- Applied in one transaction by db.rs; never edit a migration that shipped,
-- add the next one.

CREATE TABLE users (
    name TEXT PRIMARY KEY,
    role TEXT NOT NULL,            -- admin | operator | viewer
    pw_hash TEXT NOT NULL,         -- argon2id PHC string
    created_ms BIGINT NOT NULL
);

CREATE TABLE sessions (
    id_hash TEXT PRIMARY KEY,      -- BLAKE3 of the cookie's secret
    user_name TEXT NOT NULL,
    csrf TEXT NOT NULL,
    expires_ms BIGINT NOT NULL
);

CREATE TABLE api_tokens (
    id TEXT PRIMARY KEY,
    hash TEXT NOT NULL UNIQUE,     -- BLAKE3 of the token's secret
    user_name TEXT NOT NULL,
    label TEXT NOT NULL,
    created_ms BIGINT NOT NULL
);

-- Every role that ever sent a heartbeat.
CREATE TABLE machines (
    role TEXT NOT NULL,
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    group_name TEXT,               -- protection group (policy), NULL for none
    first_seen_ms BIGINT NOT NULL,
    last_seen_ms BIGINT NOT NULL,
    report TEXT NOT NULL,          -- the last RoleReport, JSON
    PRIMARY KEY (role, name)
);

-- A disk as each role last reported it.
CREATE TABLE disk_reports (
    disk TEXT NOT NULL,
    role TEXT NOT NULL,
    machine TEXT NOT NULL,
    seen_ms BIGINT NOT NULL,
    report TEXT NOT NULL,          -- DiskReport, JSON
    PRIMARY KEY (disk, role, machine)
);

-- Time series for charts: one row per agent heartbeat and disk.
CREATE TABLE samples (
    disk TEXT NOT NULL,
    at_ms BIGINT NOT NULL,
    lag_ms BIGINT,
    rpo_ms BIGINT,
    churn_bps BIGINT,              -- bytes a second (integers: see db.rs heartbeat)
    sent_bps BIGINT,
    last_point_ms BIGINT,
    PRIMARY KEY (disk, at_ms)
);
CREATE INDEX samples_at ON samples (at_ms);

CREATE TABLE groups (
    name TEXT PRIMARY KEY,
    policy TEXT NOT NULL,          -- Policy, JSON
    version BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL
);

CREATE TABLE alerts (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,            -- rpo | heartbeat | resync | spool | journal | certificate | bitmap | point
    subject TEXT NOT NULL,         -- disk NAME or ROLE/NAME
    state TEXT NOT NULL,           -- raised | acknowledged | cleared
    message TEXT NOT NULL,
    raised_ms BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL,
    cleared_ms BIGINT,
    acked_by TEXT
);
-- At most one open alert per kind and subject, whichever instance raises it.
CREATE UNIQUE INDEX alerts_open ON alerts (kind, subject) WHERE state <> 'cleared';

CREATE TABLE webhooks (
    id TEXT PRIMARY KEY,
    url TEXT NOT NULL,
    secret TEXT NOT NULL,
    created_ms BIGINT NOT NULL
);

-- The outbox: each alert event for each webhook, sent at least once.
CREATE TABLE deliveries (
    id TEXT PRIMARY KEY,
    webhook_id TEXT NOT NULL,
    body TEXT NOT NULL,
    state TEXT NOT NULL,           -- pending | sent | failed
    attempts BIGINT NOT NULL,
    next_ms BIGINT NOT NULL,
    claimed_by TEXT,
    claimed_until_ms BIGINT NOT NULL,
    last_error TEXT,
    created_ms BIGINT NOT NULL,
    sent_ms BIGINT
);
CREATE INDEX deliveries_due ON deliveries (state, next_ms);

-- Work for a role, handed out in its heartbeat's answer.
CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    machine TEXT NOT NULL,
    kind TEXT NOT NULL,            -- test-failover | failover | commit | cancel | cleanup
    args TEXT NOT NULL,            -- JSON
    state TEXT NOT NULL,           -- queued | running | done | failed
    result TEXT,
    created_ms BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL
);
CREATE INDEX jobs_for ON jobs (role, machine, state);

CREATE TABLE plans (
    name TEXT PRIMARY KEY,
    body TEXT NOT NULL,            -- Plan, JSON
    updated_ms BIGINT NOT NULL
);

CREATE TABLE plan_runs (
    id TEXT PRIMARY KEY,
    plan TEXT NOT NULL,
    kind TEXT NOT NULL,            -- test-failover | failover
    state TEXT NOT NULL,           -- running | done | failed | cancelled | cleaned
    log TEXT NOT NULL,
    started_ms BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL,
    owner TEXT,                    -- instance driving it
    owner_until_ms BIGINT NOT NULL
);
-- One live run per plan, whichever instance starts it.
CREATE UNIQUE INDEX plan_runs_live ON plan_runs (plan) WHERE state IN ('running', 'ready', 'failed-over');
