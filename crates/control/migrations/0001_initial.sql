-- cairn metadata, schema version 1. Portable SQL: SQLite now, PostgreSQL later.
CREATE TABLE tenants (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    admin BIGINT NOT NULL,
    created_at TEXT NOT NULL
);
-- Only a hash of each token is kept, so a copy of the database does not hand out access.
CREATE TABLE tokens (
    hash TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants (id),
    created_at TEXT NOT NULL
);
CREATE TABLE vms (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants (id),
    name TEXT NOT NULL,
    state TEXT NOT NULL,
    root_volume_id TEXT NOT NULL,
    template_id TEXT,
    created_at TEXT NOT NULL,
    UNIQUE (tenant_id, name)
);
CREATE TABLE volumes (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants (id),
    name TEXT NOT NULL,
    size BIGINT NOT NULL,
    state TEXT NOT NULL,
    vm_id TEXT,
    role TEXT NOT NULL,
    -- A root disk, or a data disk restored from a root-disk snapshot: R7 keeps it with its VM.
    from_root_disk BIGINT NOT NULL,
    source_kind TEXT NOT NULL,
    source_ref TEXT,
    created_at TEXT NOT NULL,
    UNIQUE (tenant_id, name)
);
CREATE INDEX volumes_by_vm ON volumes (vm_id);
-- A snapshot outlives its volume and VM (R8), so it copies what it needs to say about them.
CREATE TABLE snapshots (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants (id),
    name TEXT NOT NULL,
    volume_id TEXT NOT NULL,
    volume_name TEXT NOT NULL,
    vm_id TEXT,
    disk_role TEXT NOT NULL,
    group_id TEXT,
    origin TEXT NOT NULL,
    consistency TEXT NOT NULL,
    created_at TEXT NOT NULL,
    UNIQUE (tenant_id, name)
);
CREATE INDEX snapshots_by_volume ON snapshots (volume_id);
CREATE INDEX snapshots_by_vm ON snapshots (vm_id);
CREATE TABLE templates (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants (id),
    name TEXT NOT NULL,
    size BIGINT NOT NULL,
    state TEXT NOT NULL,
    source_kind TEXT NOT NULL,
    source_ref TEXT,
    created_at TEXT NOT NULL,
    UNIQUE (tenant_id, name)
);
CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants (id),
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    resource_id TEXT NOT NULL,
    path TEXT NOT NULL,
    bytes_done BIGINT NOT NULL,
    bytes_total BIGINT NOT NULL,
    error TEXT,
    created_at TEXT NOT NULL,
    finished_at TEXT
);
-- The first answer to a creating call, replayed when a client retries with the same key.
CREATE TABLE idempotency_keys (
    tenant_id TEXT NOT NULL,
    key TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    status BIGINT NOT NULL,
    body TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (tenant_id, key)
);
