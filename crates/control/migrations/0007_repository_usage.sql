-- cairn metadata, schema version 7: what each tenant takes in the backup repository.
-- The stored bytes (after dedup and compression) of the distinct blobs its backups reference,
-- as the latest garbage collection of the backup repository counted them.
CREATE TABLE repository_usage (
    tenant_id TEXT PRIMARY KEY,
    bytes BIGINT NOT NULL,
    measured_at TEXT NOT NULL
);
