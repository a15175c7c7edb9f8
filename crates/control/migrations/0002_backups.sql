-- cairn metadata, schema version 2: backups in the backup repository.
CREATE TABLE backups (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants (id),
    -- The backup record's id in the repository.
    record_id TEXT NOT NULL,
    volume_id TEXT NOT NULL,
    volume_name TEXT NOT NULL,
    vm_id TEXT,
    disk_role TEXT NOT NULL,
    group_id TEXT,
    created_at TEXT NOT NULL,
    size BIGINT NOT NULL,
    bytes_read BIGINT NOT NULL,
    bytes_added BIGINT NOT NULL,
    -- The engine checkpoint (a deleted snapshot's change tracking) the next backup of this
    -- volume reads changes since; only the newest backup of a volume keeps one.
    checkpoint BIGINT
);
CREATE INDEX backups_by_volume ON backups (volume_id);
CREATE INDEX backups_by_vm ON backups (vm_id);
