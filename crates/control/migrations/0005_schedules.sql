-- cairn metadata, schema version 5: schedules, their runs, and protected snapshots and backups.
CREATE TABLE schedules (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants (id),
    name TEXT NOT NULL,
    -- 'volume' or 'vm' (every disk of the VM at one instant).
    target_kind TEXT NOT NULL,
    target_id TEXT NOT NULL,
    -- 'snapshot' or 'backup'.
    action TEXT NOT NULL,
    -- A second repository each backup is copied to after it is made (NULL: none).
    copy_to TEXT,
    -- As users write it: 'daily 03:00', 'weekly sun 03:00', 'monthly 31 03:00', 'cron 0 3 * * *'.
    frequency TEXT NOT NULL,
    time_zone TEXT NOT NULL,
    -- JSON: the retention rules (keep_last, keep_within, keep_daily...).
    retention TEXT NOT NULL,
    -- JSON: pre and post hooks and what a failing pre hook does (NULL: no hooks).
    hooks TEXT,
    paused BIGINT NOT NULL,
    -- The next nominal firing (RFC 3339 UTC); a run starts at it plus the schedule's jitter.
    next_run_at TEXT NOT NULL,
    created_at TEXT NOT NULL,
    UNIQUE (tenant_id, name)
);
CREATE INDEX schedules_by_target ON schedules (target_id);
CREATE INDEX schedules_by_next_run ON schedules (next_run_at);
-- Every run of a schedule. (schedule_id, due_at) is unique, so a firing is claimed once even
-- across restarts.
CREATE TABLE schedule_runs (
    id TEXT PRIMARY KEY,
    schedule_id TEXT NOT NULL,
    tenant_id TEXT NOT NULL,
    due_at TEXT NOT NULL,
    started_at TEXT NOT NULL,
    finished_at TEXT,
    -- running, succeeded, failed.
    state TEXT NOT NULL,
    -- started (nothing made yet), taken (its snapshots exist, or its backup job runs), done.
    stage TEXT NOT NULL,
    late BIGINT NOT NULL,
    -- Asked for with run-now rather than due.
    manual BIGINT NOT NULL,
    consistency TEXT,
    job_id TEXT,
    bytes BIGINT NOT NULL,
    pruned BIGINT NOT NULL,
    -- Why it failed.
    error TEXT,
    -- What went wrong without failing it: a failing pre hook with crash-consistent fallback.
    warning TEXT,
    UNIQUE (schedule_id, due_at)
);
CREATE INDEX schedule_runs_by_state ON schedule_runs (state);
ALTER TABLE snapshots ADD COLUMN schedule_id TEXT;
ALTER TABLE snapshots ADD COLUMN run_id TEXT;
ALTER TABLE snapshots ADD COLUMN protected BIGINT NOT NULL DEFAULT 0;
ALTER TABLE backups ADD COLUMN schedule_id TEXT;
ALTER TABLE backups ADD COLUMN run_id TEXT;
ALTER TABLE backups ADD COLUMN protected BIGINT NOT NULL DEFAULT 0;
CREATE INDEX snapshots_by_schedule ON snapshots (schedule_id);
CREATE INDEX backups_by_schedule ON backups (schedule_id);
